//! UDP segmentation offload on the WireGuard socket: `UDP_SEGMENT` (GSO) sends many
//! equal-sized datagrams to one destination with one `sendmsg`, and `UDP_GRO` lets the kernel
//! hand over many datagrams of one flow in one `recvmsg`, with their size in a control message.
//!
//! In: a tokio `UdpSocket` from [`crate::bind_udp`], buffers, a segment size, a destination.
//! Out: bytes sent/received, the sender and the segment size of what was received. Each call
//! goes through tokio's readiness (`try_io`/`async_io`), so they mix with the socket's own
//! `send_to`/`recv_from`.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use socket2::SockAddr;
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// `UDP_SEGMENT` (linux/udp.h): the GSO segment size, as a socket option or a cmsg (u16).
const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO` (linux/udp.h): deliver coalesced datagrams; the cmsg carries the size (int).
const UDP_GRO: libc::c_int = 104;
/// Most segments one GSO send may carry (the kernel's `UDP_MAX_SEGMENTS` since Linux 5.5;
/// 64 before, which is what we stay under).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Most payload bytes one GSO send may carry (IPv4's 65,535 less its IP and UDP headers).
pub const GSO_MAX_BYTES: usize = 65_507;

/// Room for one `int` control message (UDP_GRO's), aligned as the kernel wants it.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// Whether the kernel knows `UDP_SEGMENT` on this socket (Linux 4.18+).
pub fn gso_supported(sock: &UdpSocket) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            UDP_SEGMENT,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0
}

/// Turns on `UDP_GRO` (Linux 5.0+). `false` when the kernel refused it; datagrams then arrive
/// one per `recvmsg`, which [`recv_gro`] handles the same way (segment size = length).
pub fn enable_gro(sock: &UdpSocket) -> bool {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads one int from the pointer, which outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            UDP_GRO,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// One `recvmsg`: the bytes (maybe many datagrams of `segment` bytes each, the last one
/// possibly shorter), their sender and the segment size (the whole length when not coalesced).
fn recvmsg_gro(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
    let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cmsg = CmsgBuf([0; 64]);
    // SAFETY: all-zero is a valid msghdr; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = storage.as_mut_ptr().cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.0.len() as _;
    // SAFETY: `msg` describes valid buffers (see above) for the duration of the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel wrote `msg_namelen` bytes of a socket address into `storage`.
    let from = unsafe { SockAddr::new(storage.assume_init(), msg.msg_namelen) }
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "sender is not an IP address"))?;
    let mut segment = n;
    // SAFETY: `msg` is the header the kernel just filled in; the CMSG macros walk its control
    // buffer within `msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                if v > 0 {
                    segment = v as usize;
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n, from, segment.min(n.max(1))))
}

/// One `sendmsg` of `buf` to `dst`, cut by the kernel into datagrams of `segment` bytes (the
/// last one may be shorter) when `segment < buf.len()`.
fn sendmsg_gso(fd: RawFd, buf: &[u8], segment: usize, dst: SocketAddr) -> io::Result<usize> {
    let addr = SockAddr::from(dst);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cmsg = CmsgBuf([0; 64]);
    // SAFETY: all-zero is a valid msghdr; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = addr.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = addr.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if segment < buf.len() {
        let seg = u16::try_from(segment)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "GSO segment over 64 KiB"))?;
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
        msg.msg_control = cmsg.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds `space` bytes (64 > CMSG_SPACE(2)), so the first
        // header and its data lie inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg);
        }
    }
    // SAFETY: `msg` describes valid buffers (see above) for the duration of the call.
    let n = unsafe { libc::sendmsg(fd, &msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Like `UdpSocket::try_recv_from`, with `UDP_GRO`: `(bytes, sender, segment size)`.
pub fn try_recv_gro(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
    sock.try_io(Interest::READABLE, || recvmsg_gro(sock.as_raw_fd(), buf))
}

/// Like `UdpSocket::recv_from`, with `UDP_GRO`: `(bytes, sender, segment size)`.
pub async fn recv_gro(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
    sock.async_io(Interest::READABLE, || recvmsg_gro(sock.as_raw_fd(), buf))
        .await
}

/// Like `UdpSocket::try_send_to`, with `UDP_SEGMENT` when `segment < buf.len()`.
///
/// `EIO` means the egress device cannot checksum GSO datagrams: the caller should stop using
/// GSO and send the datagrams one by one (what [`is_gso_unsupported`] tells).
pub fn try_send_gso(
    sock: &UdpSocket,
    buf: &[u8],
    segment: usize,
    dst: SocketAddr,
) -> io::Result<usize> {
    sock.try_io(Interest::WRITABLE, || {
        sendmsg_gso(sock.as_raw_fd(), buf, segment, dst)
    })
}

/// Like `UdpSocket::send_to`, with `UDP_SEGMENT` when `segment < buf.len()`.
pub async fn send_gso(
    sock: &UdpSocket,
    buf: &[u8],
    segment: usize,
    dst: SocketAddr,
) -> io::Result<usize> {
    sock.async_io(Interest::WRITABLE, || {
        sendmsg_gso(sock.as_raw_fd(), buf, segment, dst)
    })
    .await
}

/// Whether a GSO send failed because the path cannot do GSO (`EIO`: no checksum offload on
/// the egress device; `EINVAL`/`ENOPROTOOPT`: the kernel does not know `UDP_SEGMENT`).
pub fn is_gso_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO) | Some(libc::EINVAL) | Some(libc::ENOPROTOOPT)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// GSO out, GRO in, over loopback (unprivileged): 10 datagrams of 1000 bytes and a 7-byte
    /// tail sent with one call arrive as the same 11 datagrams, coalesced or not.
    #[tokio::test]
    async fn gso_send_gro_receive_over_loopback() {
        let rx = crate::bind_udp(0).unwrap();
        let tx = crate::bind_udp(0).unwrap();
        assert!(gso_supported(&tx));
        let gro = enable_gro(&rx);
        let port = rx.local_addr().unwrap().port();
        let dst = crate::to_socket_family(
            SocketAddr::from(([127, 0, 0, 1], port)),
            crate::udp::socket_is_v6(&tx).unwrap(),
        );
        let mut payload = Vec::new();
        for i in 0..10u8 {
            payload.extend(std::iter::repeat_n(i, 1000));
        }
        payload.extend([0xEE; 7]);
        let n = send_gso(&tx, &payload, 1000, dst).await.unwrap();
        assert_eq!(n, payload.len());

        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut buf = vec![0u8; 65_536];
        while got.len() < 11 {
            let (n, from, seg) =
                tokio::time::timeout(std::time::Duration::from_secs(5), recv_gro(&rx, &mut buf))
                    .await
                    .unwrap()
                    .unwrap();
            assert_eq!(
                crate::canonical(from).port(),
                tx.local_addr().unwrap().port()
            );
            if !gro {
                assert_eq!(seg, n);
            }
            got.extend(buf[..n].chunks(seg).map(|c| c.to_vec()));
        }
        assert_eq!(got.len(), 11);
        for (i, d) in got.iter().take(10).enumerate() {
            assert_eq!(d.len(), 1000);
            assert!(d.iter().all(|&b| b == i as u8));
        }
        assert_eq!(got[10], vec![0xEE; 7]);
    }

    /// A segment size over 64 KiB is refused before the kernel sees it.
    #[tokio::test]
    async fn oversized_segment_is_refused() {
        let tx = crate::bind_udp(0).unwrap();
        let dst = tx.local_addr().unwrap();
        let buf = vec![0u8; 70_000];
        let e = send_gso(&tx, &buf, 66_000, dst).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
