//! The dual-stack UDP socket that carries WireGuard traffic ([`bind_udp`]), or a group of them
//! sharing one port with `SO_REUSEPORT` for one socket per data-path thread
//! ([`bind_udp_group`] + [`register_udp`]), and address helpers.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsFd;

use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use crate::SysError;

/// Receive and send buffer size requested for the UDP socket.
pub const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Binds a UDP socket on `port` (0 = ephemeral) for both address families: `[::]:port`
/// with `IPV6_V6ONLY` off, falling back to `0.0.0.0:port` when IPv6 is unavailable in
/// the namespace. Buffers are set to 4 MiB (`SO_*BUFFORCE` first, which ignores
/// `rmem_max`/`wmem_max` when we have CAP_NET_ADMIN; plain `SO_*BUF` otherwise).
/// No `SO_REUSEPORT`: a port in use is an error.
///
/// Must be called from within a tokio runtime. Use [`canonical`] on received source
/// addresses and [`to_socket_family`] on destinations. Same as [`bind_udp_group`]`(port, 1)`
/// followed by [`register_udp`].
pub fn bind_udp(port: u16) -> Result<UdpSocket, SysError> {
    SysError::require_runtime("bind_udp")?;
    let socket = bind_udp_group(port, 1)?
        .pop()
        .ok_or_else(|| SysError::Unexpected("bind_udp_group(1) returned no socket".into()))?;
    register_udp(socket)
}

/// Binds `count` (>= 1) UDP sockets on one port, each dual-stack like [`bind_udp`]
/// (`[::]:port` with `IPV6_V6ONLY` off; if IPv6 is unavailable, all of them `0.0.0.0:port`),
/// with the same 4 MiB buffers, non-blocking and close-on-exec, not registered with tokio
/// (no runtime needed; move each to its thread and [`register_udp`] it there).
///
/// * `count == 1`: exactly what [`bind_udp`] binds (no `SO_REUSEPORT`; a port in use is an
///   error).
/// * `count > 1`: an `SO_REUSEPORT` group. The first socket binds `port` (0 = ephemeral)
///   *without* `SO_REUSEPORT`, so a port already bound by anyone, including another
///   `SO_REUSEPORT` group, is an error rather than a group we silently join (and an ephemeral
///   port is a free one); it then gets `SO_REUSEPORT` and the others bind the port it got
///   with `SO_REUSEPORT` set.
///
/// The kernel delivers each incoming datagram to one socket of the group, chosen by a hash of
/// its 4-tuple (source and destination address and port) over the sockets in the group: all
/// datagrams from one remote endpoint reach the same socket, in order, as long as the group
/// does not change (closing a socket re-spreads the flows). Sending works from any socket
/// (all have the same local port). While the group exists, another process of the *same
/// user* that sets `SO_REUSEPORT` can bind the port and join it, taking a share of the
/// traffic: meshd guards against a second instance through its API socket.
///
/// On error every socket bound so far is closed.
pub fn bind_udp_group(port: u16, count: usize) -> Result<Vec<std::net::UdpSocket>, SysError> {
    if count == 0 {
        return Err(SysError::InvalidArgument(
            "UDP socket group of 0 sockets".into(),
        ));
    }
    let (first, domain) = match bind_v6(port) {
        Ok(s) => (s, Domain::IPV6),
        Err(e6) => {
            tracing::info!(port, error = %e6, "IPv6 UDP bind failed, falling back to IPv4 only");
            let s = bind_v4(port).map_err(|e4| {
                SysError::io(format!("bind UDP port {port} (IPv6 failed: {e6})"), e4)
            })?;
            (s, Domain::IPV4)
        }
    };
    if count == 1 {
        return Ok(vec![finish(first)?]);
    }
    first
        .set_reuse_port(true)
        .map_err(|e| SysError::io("set SO_REUSEPORT on UDP socket", e))?;
    let bound = first
        .local_addr()
        .map_err(|e| SysError::io("UDP socket local address", e))?
        .as_socket()
        .map(|a| a.port())
        .ok_or_else(|| SysError::Unexpected("UDP socket bound to a non-IP address".into()))?;
    let mut out = Vec::with_capacity(count);
    out.push(finish(first)?);
    for i in 1..count {
        // On error `out` is dropped, closing every socket bound so far.
        let s = bind_reuseport(domain, bound).map_err(|e| {
            SysError::io(
                format!("bind UDP port {bound} with SO_REUSEPORT (socket {i} of {count})"),
                e,
            )
        })?;
        out.push(finish(s)?);
    }
    tracing::debug!(port = bound, count, "bound UDP SO_REUSEPORT group");
    Ok(out)
}

/// Registers a socket from [`bind_udp_group`] with the current tokio runtime (it then must be
/// used from that runtime only). Errors outside a runtime; the socket is then closed.
pub fn register_udp(s: std::net::UdpSocket) -> Result<UdpSocket, SysError> {
    SysError::require_runtime("register_udp")?;
    s.set_nonblocking(true)
        .map_err(|e| SysError::io("set UDP socket non-blocking", e))?;
    UdpSocket::from_std(s).map_err(|e| SysError::io("register UDP socket with tokio", e))
}

/// Buffers, non-blocking, and the std type.
fn finish(socket: Socket) -> Result<std::net::UdpSocket, SysError> {
    set_buffers(&socket);
    socket
        .set_nonblocking(true)
        .map_err(|e| SysError::io("set UDP socket non-blocking", e))?;
    Ok(socket.into())
}

fn bind_v6(port: u16) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV6, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
    s.set_only_v6(false)?;
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    Ok(s)
}

fn bind_v4(port: u16) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    Ok(s)
}

/// A further member of an `SO_REUSEPORT` group on `port`, of the family of the first.
fn bind_reuseport(domain: Domain, port: u16) -> io::Result<Socket> {
    let s = Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    let addr = if domain == Domain::IPV6 {
        s.set_only_v6(false)?;
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
    } else {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
    };
    s.bind(&addr.into())?;
    Ok(s)
}

fn set_buffers(socket: &Socket) {
    let fd = socket.as_fd();
    if let Err(e) = setsockopt(&fd, sockopt::RcvBufForce, &UDP_BUFFER_BYTES) {
        tracing::debug!(error = %e, "SO_RCVBUFFORCE failed, trying SO_RCVBUF");
        if let Err(e) = socket.set_recv_buffer_size(UDP_BUFFER_BYTES) {
            tracing::warn!(error = %e, "could not set UDP receive buffer size");
        }
    }
    if let Err(e) = setsockopt(&fd, sockopt::SndBufForce, &UDP_BUFFER_BYTES) {
        tracing::debug!(error = %e, "SO_SNDBUFFORCE failed, trying SO_SNDBUF");
        if let Err(e) = socket.set_send_buffer_size(UDP_BUFFER_BYTES) {
            tracing::warn!(error = %e, "could not set UDP send buffer size");
        }
    }
}

/// Turns an IPv4-mapped IPv6 address (`[::ffff:a.b.c.d]:p`) into plain IPv4
/// (`a.b.c.d:p`); every other address is returned unchanged.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Maps `addr` into the family of the socket that will send to it: IPv4 becomes
/// IPv4-mapped IPv6 on an IPv6 socket; IPv4-mapped IPv6 becomes IPv4 on an IPv4
/// socket. (A real IPv6 address on an IPv4 socket is returned unchanged and the
/// send will fail.)
pub fn to_socket_family(addr: SocketAddr, socket_is_v6: bool) -> SocketAddr {
    match (addr, socket_is_v6) {
        (SocketAddr::V4(v4), true) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        (SocketAddr::V6(_), false) => canonical(addr),
        _ => addr,
    }
}

/// Whether `socket` is an IPv6 (dual-stack) socket, i.e. what to pass as
/// `socket_is_v6` to [`to_socket_family`].
pub fn socket_is_v6(socket: &UdpSocket) -> io::Result<bool> {
    Ok(socket.local_addr()?.is_ipv6())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn canonical_unmaps_v4() {
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:51820".parse().unwrap();
        assert_eq!(canonical(mapped), "192.0.2.7:51820".parse().unwrap());
        let v6: SocketAddr = "[2001:db8::1]:51820".parse().unwrap();
        assert_eq!(canonical(v6), v6);
        let v4: SocketAddr = "192.0.2.7:1".parse().unwrap();
        assert_eq!(canonical(v4), v4);
        // IPv4-compatible (deprecated ::a.b.c.d) is not IPv4-mapped.
        let compat: SocketAddr = "[::192.0.2.7]:1".parse().unwrap();
        assert_eq!(canonical(compat), compat);
    }

    #[test]
    fn to_socket_family_roundtrip() {
        let v4: SocketAddr = "192.0.2.7:51820".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:51820".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:51820".parse().unwrap();
        assert_eq!(to_socket_family(v4, true), mapped);
        assert_eq!(to_socket_family(v4, false), v4);
        assert_eq!(to_socket_family(mapped, false), v4);
        assert_eq!(to_socket_family(mapped, true), mapped);
        assert_eq!(to_socket_family(v6, true), v6);
        assert_eq!(canonical(to_socket_family(v4, true)), v4);
    }

    #[test]
    fn bind_outside_runtime_is_an_error() {
        assert!(matches!(bind_udp(0), Err(SysError::NoRuntime(_))));
    }

    #[test]
    fn group_needs_no_runtime_and_registering_does() {
        assert!(matches!(
            bind_udp_group(0, 0),
            Err(SysError::InvalidArgument(_))
        ));
        let group = bind_udp_group(0, 3).unwrap();
        assert_eq!(group.len(), 3);
        let port = group[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        for s in &group {
            assert_eq!(s.local_addr().unwrap().port(), port);
            assert!(socket2::SockRef::from(s).reuse_port().unwrap());
        }
        let single = bind_udp_group(0, 1).unwrap();
        assert!(!socket2::SockRef::from(&single[0]).reuse_port().unwrap());
        let s = group.into_iter().next().unwrap();
        assert!(matches!(register_udp(s), Err(SysError::NoRuntime(_))));
    }

    #[tokio::test]
    async fn bind_ephemeral_loopback_roundtrip() {
        // Works unprivileged: ephemeral port, traffic only over loopback.
        let sock = bind_udp(0).unwrap();
        let port = sock.local_addr().unwrap().port();
        let is_v6 = socket_is_v6(&sock).unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"hi", ("127.0.0.1", port)).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = sock.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hi");
        let from = canonical(from);
        assert_eq!(from, client.local_addr().unwrap());
        sock.send_to(b"yo", to_socket_family(from, is_v6))
            .await
            .unwrap();
        let (n, _) = client.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"yo");
    }
}
