//! UDP segmentation offload and batching on the WireGuard socket: `UDP_SEGMENT` (GSO) sends
//! many equal-sized datagrams to one destination as one message, `sendmmsg` sends several such
//! messages per call; `UDP_GRO` lets the kernel hand over many datagrams of one flow as one
//! message, with their size in a control message, and `recvmmsg` reads several per call.
//!
//! In: a tokio `UdpSocket` from [`crate::bind_udp`] or [`crate::register_udp`], buffers, a
//! segment size, a destination. Out: bytes sent/received, the sender and the segment size of
//! what was received. Each call goes through tokio's readiness (`try_io`/`async_io`), so they
//! mix with the socket's own `send_to`/`recv_from`.

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
    // SAFETY: `msg` is the header the kernel just filled in; `cmsg` is still alive.
    let segment = unsafe { gro_segment(&msg, n) };
    Ok((n, from, segment))
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

/// Like `UdpSocket::recv_from`, with `UDP_GRO`: `(bytes, sender, segment size)`.
pub async fn recv_gro(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
    sock.async_io(Interest::READABLE, || recvmsg_gro(sock.as_raw_fd(), buf))
        .await
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

/// Most messages one [`recv_batch`] or [`send_batch`] moves (`recvmmsg`/`sendmmsg`).
pub const MMSG_MAX: usize = 8;

/// What one received message held: `len` bytes from `from`, datagrams of `segment` bytes (the
/// last one may be shorter; `segment == len` when the kernel did not coalesce).
#[derive(Debug, Clone, Copy)]
pub struct RecvMeta {
    pub len: usize,
    pub from: SocketAddr,
    pub segment: usize,
}

/// Reusable buffers for [`recv_batch`]: up to [`MMSG_MAX`] messages per call. With one buffer
/// it reads with a plain `recvfrom` (no `recvmmsg`, no control messages).
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("buffers", &self.bufs.len())
            .field("received", &self.meta)
            .finish()
    }
}

impl RecvBatch {
    /// `messages` (1..=[`MMSG_MAX`]) buffers of `size` bytes.
    pub fn new(messages: usize, size: usize) -> Self {
        let messages = messages.clamp(1, MMSG_MAX);
        RecvBatch {
            bufs: (0..messages).map(|_| vec![0u8; size]).collect(),
            meta: Vec::with_capacity(messages),
        }
    }

    /// Messages the last call received.
    pub fn len(&self) -> usize {
        self.meta.len()
    }

    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    /// Message `i` of the last call: its bytes, sender and segment size.
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr, usize)> {
        let m = self.meta.get(i)?;
        let buf = self.bufs.get(i)?.get(..m.len)?;
        Some((buf, m.from, m.segment))
    }
}

/// Reads the `UDP_GRO` segment size from a received message's control data (`len` if absent).
///
/// # Safety
/// `msg` must be a header the kernel just filled in, whose control buffer is still alive.
unsafe fn gro_segment(msg: &libc::msghdr, len: usize) -> usize {
    let mut segment = len;
    // SAFETY: the caller guarantees `msg` and its control buffer; the CMSG macros stay within
    // `msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                if v > 0 {
                    segment = v as usize;
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    segment.min(len.max(1))
}

fn recvmmsg_gro(fd: RawFd, batch: &mut RecvBatch) -> io::Result<usize> {
    batch.meta.clear();
    let n = batch.bufs.len().min(MMSG_MAX);
    // SAFETY: all-zero is a valid value for these plain C structs.
    let mut storages: [libc::sockaddr_storage; MMSG_MAX] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut iovs: [libc::iovec; MMSG_MAX] = unsafe { std::mem::zeroed() };
    let mut cmsgs: [CmsgBuf; MMSG_MAX] = std::array::from_fn(|_| CmsgBuf([0; 64]));
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; MMSG_MAX] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        iovs[i] = libc::iovec {
            iov_base: batch.bufs[i].as_mut_ptr().cast(),
            iov_len: batch.bufs[i].len(),
        };
        let h = &mut hdrs[i].msg_hdr;
        h.msg_name = (&mut storages[i] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
        h.msg_control = cmsgs[i].0.as_mut_ptr().cast();
        h.msg_controllen = cmsgs[i].0.len() as _;
    }
    // SAFETY: the first `n` headers point at buffers, addresses and control buffers that live
    // until the end of this function; the kernel writes within the lengths given.
    let r = unsafe {
        libc::recvmmsg(
            fd,
            hdrs.as_mut_ptr(),
            n as libc::c_uint,
            0,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    for i in 0..r as usize {
        let len = hdrs[i].msg_len as usize;
        // SAFETY: the kernel wrote `msg_namelen` bytes of a socket address into `storages[i]`.
        let addr = unsafe { SockAddr::new(storages[i], hdrs[i].msg_hdr.msg_namelen) };
        let Some(from) = addr.as_socket() else {
            continue;
        };
        // SAFETY: header `i` was just filled in by the kernel; its control buffer is alive.
        let segment = unsafe { gro_segment(&hdrs[i].msg_hdr, len) };
        batch.meta.push(RecvMeta { len, from, segment });
    }
    Ok(batch.meta.len())
}

fn recv_plain(sock: &UdpSocket, batch: &mut RecvBatch) -> io::Result<usize> {
    batch.meta.clear();
    let (len, from) = sock.try_recv_from(&mut batch.bufs[0])?;
    batch.meta.push(RecvMeta {
        len,
        from,
        segment: len,
    });
    Ok(1)
}

/// Receives what is waiting, up to the batch's size: with more than one buffer one `recvmmsg`
/// (each message may be a `UDP_GRO` batch), else one plain `recvfrom`. Returns the number of
/// messages, read with [`RecvBatch::get`].
pub fn try_recv_batch(sock: &UdpSocket, batch: &mut RecvBatch) -> io::Result<usize> {
    if batch.bufs.len() == 1 {
        return recv_plain(sock, batch);
    }
    sock.try_io(Interest::READABLE, || recvmmsg_gro(sock.as_raw_fd(), batch))
}

/// Waits for the socket, then like [`try_recv_batch`].
pub async fn recv_batch(sock: &UdpSocket, batch: &mut RecvBatch) -> io::Result<usize> {
    if batch.bufs.len() == 1 {
        batch.meta.clear();
        let (len, from) = sock.recv_from(&mut batch.bufs[0]).await?;
        batch.meta.push(RecvMeta {
            len,
            from,
            segment: len,
        });
        return Ok(1);
    }
    sock.async_io(Interest::READABLE, || recvmmsg_gro(sock.as_raw_fd(), batch))
        .await
}

/// One message for [`send_batch`]: `buf` to `dst`, cut by the kernel into datagrams of
/// `segment` bytes when `segment < buf.len()` (`UDP_SEGMENT`).
#[derive(Debug, Clone, Copy)]
pub struct SendMsg<'a> {
    pub dst: SocketAddr,
    pub buf: &'a [u8],
    pub segment: usize,
}

fn sendmmsg_gso(fd: RawFd, msgs: &[SendMsg<'_>]) -> io::Result<usize> {
    let n = msgs.len().min(MMSG_MAX);
    if n == 0 {
        return Ok(0);
    }
    let addrs: [Option<SockAddr>; MMSG_MAX] =
        std::array::from_fn(|i| msgs.get(i).filter(|_| i < n).map(|m| SockAddr::from(m.dst)));
    // SAFETY: all-zero is a valid value for these plain C structs.
    let mut iovs: [libc::iovec; MMSG_MAX] = unsafe { std::mem::zeroed() };
    let mut cmsgs: [CmsgBuf; MMSG_MAX] = std::array::from_fn(|_| CmsgBuf([0; 64]));
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; MMSG_MAX] = unsafe { std::mem::zeroed() };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
    for (i, m) in msgs.iter().take(n).enumerate() {
        let Some(addr) = &addrs[i] else {
            continue;
        };
        iovs[i] = libc::iovec {
            iov_base: m.buf.as_ptr() as *mut libc::c_void,
            iov_len: m.buf.len(),
        };
        let h = &mut hdrs[i].msg_hdr;
        h.msg_name = addr.as_ptr() as *mut libc::c_void;
        h.msg_namelen = addr.len();
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
        if m.segment < m.buf.len() {
            let seg = u16::try_from(m.segment).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "GSO segment over 64 KiB")
            })?;
            h.msg_control = cmsgs[i].0.as_mut_ptr().cast();
            h.msg_controllen = space as _;
            // SAFETY: the control buffer holds 64 > CMSG_SPACE(2) bytes, so the first header
            // and its data lie inside it.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(h);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg);
            }
        }
    }
    // SAFETY: the first `n` headers point at addresses, buffers and control data that live
    // until the end of this function.
    let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as libc::c_uint, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// Sends up to [`MMSG_MAX`] messages with one `sendmmsg`, in order; returns how many went out
/// (at least one, or an error for the first). The caller sends the rest again.
pub fn try_send_batch(sock: &UdpSocket, msgs: &[SendMsg<'_>]) -> io::Result<usize> {
    sock.try_io(Interest::WRITABLE, || sendmmsg_gso(sock.as_raw_fd(), msgs))
}

/// Waits for the socket, then like [`try_send_batch`].
pub async fn send_batch(sock: &UdpSocket, msgs: &[SendMsg<'_>]) -> io::Result<usize> {
    sock.async_io(Interest::WRITABLE, || sendmmsg_gso(sock.as_raw_fd(), msgs))
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

    async fn recv_n(s: &UdpSocket, want: usize) -> Vec<Vec<u8>> {
        let mut d = Vec::new();
        let mut buf = vec![0u8; 65_536];
        while d.len() < want {
            let (n, _) =
                tokio::time::timeout(std::time::Duration::from_secs(5), s.recv_from(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
            d.push(buf[..n].to_vec());
        }
        d
    }

    /// One `sendmmsg` carries GSO batches to two receivers and a plain datagram; one
    /// `recvmmsg` then returns messages from two senders.
    #[tokio::test]
    async fn sendmmsg_to_two_receivers_and_recvmmsg_from_two_senders() {
        let rx1 = crate::bind_udp(0).unwrap();
        let rx2 = crate::bind_udp(0).unwrap();
        let tx = crate::bind_udp(0).unwrap();
        let v6 = crate::udp::socket_is_v6(&tx).unwrap();
        let to = |s: &UdpSocket| {
            crate::to_socket_family(
                SocketAddr::from(([127, 0, 0, 1], s.local_addr().unwrap().port())),
                v6,
            )
        };
        let a = vec![0xAA; 3 * 500];
        let b = vec![0xBB; 2 * 700 + 10];
        let c = vec![0xCC; 33];
        let msgs = [
            SendMsg {
                dst: to(&rx1),
                buf: &a,
                segment: 500,
            },
            SendMsg {
                dst: to(&rx2),
                buf: &b,
                segment: 700,
            },
            SendMsg {
                dst: to(&rx1),
                buf: &c,
                segment: 33,
            },
        ];
        let mut sent = 0;
        while sent < msgs.len() {
            sent += send_batch(&tx, &msgs[sent..]).await.unwrap();
        }
        let d1 = recv_n(&rx1, 4).await;
        assert_eq!(d1[..3], vec![vec![0xAA; 500]; 3][..]);
        assert_eq!(d1[3], c);
        let d2 = recv_n(&rx2, 3).await;
        assert_eq!(d2[..2], vec![vec![0xBB; 700]; 2][..]);
        assert_eq!(d2[2], vec![0xBB; 10]);

        // Two senders, one receiver: recvmmsg returns both (one call or a few).
        let rx = crate::bind_udp(0).unwrap();
        enable_gro(&rx);
        let other = crate::bind_udp(0).unwrap();
        send_gso(&tx, &[1u8; 100], 100, to(&rx)).await.unwrap();
        send_gso(&other, &[2u8; 200], 200, to(&rx)).await.unwrap();
        let mut batch = RecvBatch::new(MMSG_MAX, 65_536);
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let n = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                recv_batch(&rx, &mut batch),
            )
            .await
            .unwrap()
            .unwrap();
            assert_eq!(n, batch.len());
            for i in 0..n {
                let (bytes, from, seg) = batch.get(i).unwrap();
                assert_eq!(seg, bytes.len());
                seen.push((crate::canonical(from).port(), bytes.to_vec()));
            }
        }
        seen.sort();
        let mut want = vec![
            (tx.local_addr().unwrap().port(), vec![1u8; 100]),
            (other.local_addr().unwrap().port(), vec![2u8; 200]),
        ];
        want.sort();
        assert_eq!(seen, want);

        // One buffer: plain recvfrom.
        let mut one = RecvBatch::new(1, 2048);
        send_gso(&tx, &[3u8; 50], 50, to(&rx)).await.unwrap();
        assert_eq!(recv_batch(&rx, &mut one).await.unwrap(), 1);
        assert_eq!(one.get(0).unwrap().0, &[3u8; 50][..]);
        assert!(one.get(1).is_none());
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
