//! A layer-3 TUN device (`IFF_TUN | IFF_NO_PI`) driven by tokio, optionally with the kernel's
//! offloads (`IFF_VNET_HDR` + `TUNSETOFFLOAD`): then every packet read or written starts with a
//! 10-byte `virtio_net_hdr`, reads may be TSO/USO super-packets of up to 64 KiB, and writes may be
//! GRO-coalesced super-packets (see `weft_core::offload` for both).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::SysError;

const TUN_PATH: &str = "/dev/net/tun";

/// `IFF_VNET_HDR`: packets carry a `virtio_net_hdr`.
const IFF_VNET_HDR: libc::c_int = 0x4000;
/// `TUNSETOFFLOAD` = `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `TUNSETVNETHDRSZ` = `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// Offload flags of `TUNSETOFFLOAD` (linux/if_tun.h).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_USO4: u32 = 0x20;
pub const TUN_F_USO6: u32 = 0x40;
/// Length of the `virtio_net_hdr` (without `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;

/// A TUN device. Packets are raw IP packets (no packet-info header).
///
/// `recv` and `send` take `&self`, so one task can read while another writes
/// (share it in an `Arc`). Dropping the `Tun` closes the file descriptor, which
/// deletes the (non-persistent) interface.
#[derive(Debug)]
pub struct Tun {
    fd: AsyncFd<OwnedFd>,
    name: String,
    /// The `TUN_F_*` offloads the kernel accepted; `None`: opened without `IFF_VNET_HDR`.
    offloads: Option<u32>,
}

/// Checks an interface name the way the kernel will (length < IFNAMSIZ, no NUL),
/// and returns it as a NUL-padded `ifr_name` array.
pub(crate) fn ifname_to_c(name: &str) -> Result<[libc::c_char; libc::IFNAMSIZ], SysError> {
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) || bytes.contains(&b'/') {
        return Err(SysError::InvalidName(name.to_string()));
    }
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (dst, src) in out.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(out)
}

fn ifname_from_c(raw: &[libc::c_char; libc::IFNAMSIZ]) -> String {
    let bytes: Vec<u8> = raw
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The most queues one TUN device can have (the kernel's `MAX_TAP_QUEUES` today; some older
/// kernels allowed only 8, and attaching more fails there with `E2BIG`).
pub const MAX_QUEUES: usize = 256;

/// One queue of a TUN device, opened (and the device created or attached) but not yet
/// registered with any tokio runtime, so it can be moved to the thread whose runtime will
/// drive it ([`Tun::from_queue`]). Dropping it closes the queue; the (non-persistent)
/// device is deleted when its last queue is closed.
#[derive(Debug)]
pub struct TunQueue {
    fd: OwnedFd,
    name: String,
    /// The `TUN_F_*` offloads the kernel accepted; `None`: opened without `IFF_VNET_HDR`.
    offloads: Option<u32>,
}

impl TunQueue {
    /// The interface name the kernel assigned (the same for every queue of a device).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `TUN_F_*` offloads in force; `None` when packets carry no `virtio_net_hdr`.
    pub fn offloads(&self) -> Option<u32> {
        self.offloads
    }
}

impl Tun {
    /// Creates (or attaches to) the TUN interface `name` in the calling thread's
    /// network namespace. An empty name lets the kernel choose (`tunN`); a name
    /// containing `%d` is a kernel template. Returns the device with its actual name.
    ///
    /// Must be called from within a tokio runtime (the fd is registered with it).
    /// The interface is created down; bring it up with [`crate::Netlink::link_up`].
    pub fn create(name: &str) -> Result<Tun, SysError> {
        Self::open(name, false)
    }

    /// Like [`Tun::create`], with `IFF_VNET_HDR` and the TSO/USO/checksum offloads the kernel
    /// accepts (USO needs Linux 6.2; without it TSO and checksum offload are asked for alone).
    /// Every packet read and written then starts with a [`VNET_HDR_LEN`]-byte header. If the
    /// kernel refuses every offload the device still carries the header (with no GSO).
    pub fn create_offload(name: &str) -> Result<Tun, SysError> {
        Self::open(name, true)
    }

    fn open(name: &str, vnet_hdr: bool) -> Result<Tun, SysError> {
        ifname_to_c(name)?;
        SysError::require_runtime("Tun::create")?;
        let queue = Self::open_queues(name, 1, vnet_hdr)?
            .pop()
            .ok_or_else(|| SysError::Unexpected("open_queues(1) returned no queue".into()))?;
        Self::register(queue)
    }

    /// Opens `queues` (1..=[`MAX_QUEUES`]) queues of the TUN interface `name` in the calling
    /// thread's network namespace (same name rules as [`Tun::create`]), without registering
    /// them with tokio: no runtime is needed, and each [`TunQueue`] can be moved to its own
    /// thread and registered there with [`Tun::from_queue`]. The device is created down.
    ///
    /// * `queues == 1` opens exactly what [`Tun::create`] / [`Tun::create_offload`] open
    ///   (no `IFF_MULTI_QUEUE`).
    /// * `queues > 1` sets `IFF_MULTI_QUEUE` on every queue: the first `TUNSETIFF` creates the
    ///   device (or attaches to an existing multi-queue one) and resolves a `%d` template or
    ///   empty name; the others attach by the actual name. The kernel hands each packet it
    ///   routes into the device to one queue, chosen by a symmetric hash of the flow (for
    ///   TCP/UDP the 5-tuple), or, for a flow whose packets userspace recently wrote on some
    ///   queue, that queue (the kernel's flow table, entries expire after about 3 s idle).
    ///   Packets written on any queue enter the stack the same way.
    /// * `offload` adds `IFF_VNET_HDR`, `TUNSETVNETHDRSZ` 10 and the same `TUNSETOFFLOAD`
    ///   fallback ladder as [`Tun::create_offload`] on every queue; all queues report the
    ///   same offloads (the kernel keeps them per device), or this fails.
    ///
    /// If the kernel refuses `IFF_MULTI_QUEUE` (`EINVAL`: a kernel without multi-queue TUN, or
    /// an interface of that name that exists without it), the error is
    /// [`SysError::MultiQueueUnsupported`] (see [`SysError::is_multi_queue_unsupported`]);
    /// one queue may still work. On any error every queue opened so far is closed, so a
    /// device this call created is deleted again.
    pub fn open_queues(
        name: &str,
        queues: usize,
        offload: bool,
    ) -> Result<Vec<TunQueue>, SysError> {
        let ifr_name = ifname_to_c(name)?;
        if queues == 0 || queues > MAX_QUEUES {
            return Err(SysError::InvalidArgument(format!(
                "TUN queue count {queues} (must be 1..={MAX_QUEUES})"
            )));
        }
        let multi = queues > 1;
        let first = open_queue(name, ifr_name, multi, offload)?;
        let attach_name = ifname_to_c(&first.name)?;
        let mut out = Vec::with_capacity(queues);
        out.push(first);
        for i in 1..queues {
            // On error `out` is dropped, closing every queue opened so far.
            let q = open_queue(&out[0].name, attach_name, multi, offload)?;
            if q.offloads != out[0].offloads {
                return Err(SysError::Unexpected(format!(
                    "TUN {}: queue {i} got offloads {:?}, queue 0 got {:?}",
                    q.name, q.offloads, out[0].offloads
                )));
            }
            out.push(q);
        }
        tracing::debug!(
            requested = name,
            name = %out[0].name,
            queues,
            offloads = ?out[0].offloads,
            "opened TUN device"
        );
        Ok(out)
    }

    /// Registers a queue from [`Tun::open_queues`] with the current tokio runtime (it then
    /// must be used from that runtime only). Errors outside a runtime; the queue is then
    /// dropped (closed).
    pub fn from_queue(q: TunQueue) -> Result<Tun, SysError> {
        SysError::require_runtime("Tun::from_queue")?;
        Self::register(q)
    }

    fn register(q: TunQueue) -> Result<Tun, SysError> {
        // SAFETY: `OwnedFd::as_raw_fd` always returns the same descriptor, which stays
        // open until the `OwnedFd` (owned by the `AsyncFd`) is dropped.
        let fd = unsafe {
            AsyncFd::register_with_interest(q.fd, Interest::READABLE | Interest::WRITABLE)
        }
        .map_err(|e| SysError::io("register TUN fd with tokio", e.into()))?;
        Ok(Tun {
            fd,
            name: q.name,
            offloads: q.offloads,
        })
    }

    /// The `TUN_F_*` offloads in force; `None` when packets carry no `virtio_net_hdr`.
    pub fn offloads(&self) -> Option<u32> {
        self.offloads
    }

    /// The interface name the kernel assigned.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one IP packet into `buf`, returning its length. A packet longer than
    /// `buf` is truncated, so size `buf` for the interface MTU.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| read_fd(inner.get_ref(), buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads one packet if one is waiting, or fails with `WouldBlock`: for draining a burst
    /// after [`Tun::recv`] without going back to the scheduler for every packet.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.fd
            .try_io(Interest::READABLE, |inner| read_fd(inner, buf))
    }

    /// Writes one packet if the device takes it now, or fails with `WouldBlock`.
    pub fn try_send(&self, pkt: &[u8]) -> io::Result<usize> {
        self.fd
            .try_io(Interest::WRITABLE, |inner| write_fd(inner, pkt))
    }

    /// Writes one IP packet to the interface (i.e. delivers it to the kernel's
    /// network stack), returning the number of bytes written.
    pub async fn send(&self, pkt: &[u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|inner| write_fd(inner.get_ref(), pkt)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

fn read_fd(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    nix::unistd::read(fd.as_raw_fd(), buf).map_err(io::Error::from)
}

fn write_fd(fd: &OwnedFd, pkt: &[u8]) -> io::Result<usize> {
    nix::unistd::write(fd, pkt).map_err(io::Error::from)
}

/// Opens /dev/net/tun and binds it to the device `ifr_name` (`name` is what the caller asked
/// for, for messages) with `IFF_TUN | IFF_NO_PI`, plus `IFF_MULTI_QUEUE` when `multi` and
/// `IFF_VNET_HDR` with the offload ladder when `vnet_hdr`. The fd is closed on error.
fn open_queue(
    name: &str,
    ifr_name: [libc::c_char; libc::IFNAMSIZ],
    multi: bool,
    vnet_hdr: bool,
) -> Result<TunQueue, SysError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(|e| SysError::io(format!("open {TUN_PATH}"), e))?;
    let fd: OwnedFd = file.into();

    // SAFETY: `ifreq` is a plain C struct (array + union of plain data); the
    // all-zero bit pattern is a valid value for it.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    ifr.ifr_name = ifr_name;
    let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
    if vnet_hdr {
        flags |= IFF_VNET_HDR;
    }
    if multi {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;

    // SAFETY: `fd` is an open /dev/net/tun descriptor we own, and `ifr` is a
    // valid, properly initialised `struct ifreq` that outlives the call; TUNSETIFF
    // reads the name and flags from it and writes back the chosen name.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETIFF,
            &mut ifr as *mut libc::ifreq,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if multi && err.raw_os_error() == Some(libc::EINVAL) {
            // EINVAL also means a name the kernel will not register (e.g. "a b"); only an
            // old kernel or an existing interface is a refusal of IFF_MULTI_QUEUE as such.
            let reason = if tun_features(&fd).is_some_and(|f| f & libc::IFF_MULTI_QUEUE == 0) {
                Some("the kernel does not support multi-queue TUN devices")
            } else if !name.is_empty()
                && !name.contains('%')
                && nix::net::if_::if_nametoindex(name).is_ok()
            {
                Some("the interface exists without IFF_MULTI_QUEUE (or is not a TUN device)")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(SysError::MultiQueueUnsupported {
                    name: name.to_string(),
                    reason: reason.to_string(),
                });
            }
        }
        return Err(SysError::io(format!("TUNSETIFF {name:?}"), err));
    }
    let actual = ifname_from_c(&ifr.ifr_name);
    let offloads = if vnet_hdr {
        Some(set_offloads(&fd)?)
    } else {
        None
    };
    Ok(TunQueue {
        fd,
        name: actual,
        offloads,
    })
}

/// The `IFF_*` flags this kernel's TUN driver supports (`TUNGETFEATURES`).
fn tun_features(fd: &OwnedFd) -> Option<libc::c_int> {
    let mut features: libc::c_uint = 0;
    // SAFETY: TUNGETFEATURES writes one unsigned int through the pointer, which outlives
    // the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETFEATURES, &mut features) };
    (rc == 0).then_some(features as libc::c_int)
}

/// `TUNSETVNETHDRSZ` 10, then the most offloads the kernel accepts, from TSO+USO+checksum
/// down to none; returns what it accepted.
fn set_offloads(fd: &OwnedFd) -> Result<u32, SysError> {
    let len = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which outlives the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &len) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return Err(SysError::io("TUNSETVNETHDRSZ", err));
    }
    let wanted = [
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6,
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
        TUN_F_CSUM,
        0,
    ];
    for w in wanted {
        // SAFETY: TUNSETOFFLOAD takes the flags as the ioctl argument itself.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, w as libc::c_ulong) };
        if rc == 0 {
            return Ok(w);
        }
        tracing::debug!(
            flags = w,
            error = %io::Error::last_os_error(),
            "TUNSETOFFLOAD refused; trying fewer offloads"
        );
    }
    Ok(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ifname_validation() {
        assert!(ifname_to_c("weft0").is_ok());
        assert!(ifname_to_c("").is_ok());
        assert!(ifname_to_c("123456789012345").is_ok());
        assert!(matches!(
            ifname_to_c("1234567890123456"),
            Err(SysError::InvalidName(_))
        ));
        assert!(ifname_to_c("a\0b").is_err());
        assert!(ifname_to_c("a/b").is_err());
    }

    #[test]
    fn create_outside_runtime_is_an_error() {
        assert!(matches!(Tun::create("weft0"), Err(SysError::NoRuntime(_))));
    }

    #[test]
    fn open_queues_rejects_bad_arguments_before_opening() {
        assert!(matches!(
            Tun::open_queues("weft0", 0, false),
            Err(SysError::InvalidArgument(_))
        ));
        assert!(matches!(
            Tun::open_queues("weft0", MAX_QUEUES + 1, true),
            Err(SysError::InvalidArgument(_))
        ));
        assert!(matches!(
            Tun::open_queues("1234567890123456", 2, false),
            Err(SysError::InvalidName(_))
        ));
    }

    #[test]
    fn ifname_roundtrip() {
        let c = ifname_to_c("weft0").unwrap();
        assert_eq!(ifname_from_c(&c), "weft0");
        let c = ifname_to_c("123456789012345").unwrap();
        assert_eq!(ifname_from_c(&c), "123456789012345");
    }
}
