//! Root-only: the error paths of `Tun::open_queues` and `udp::bind_udp_group` close every
//! descriptor they opened and leave no device behind. This is its own test binary with a
//! single test, so nothing else in the process opens or closes descriptors while we count
//! them (and lowering RLIMIT_NOFILE affects no other test). The work runs on a thread that
//! `unshare`s its own network namespace, which disappears with it.
//! Without root (or without `/dev/net/tun`) the test prints a note and passes.

#![allow(clippy::unwrap_used)]

use nix::sched::{unshare, CloneFlags};
use weft_sys::{udp, SysError, Tun};

/// The open descriptors (the directory's own, closed again, is not among them).
fn open_fds() -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect();
    fds.retain(|fd| nix::fcntl::fcntl(*fd, nix::fcntl::FcntlArg::F_GETFD).is_ok());
    fds.sort_unstable();
    fds
}

fn nofile_limit() -> libc::rlimit {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through the pointer, which outlives the call.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim
}

fn set_nofile_limit(lim: &libc::rlimit) {
    // SAFETY: setrlimit reads one `rlimit` from the pointer, which outlives the call.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, lim) }, 0);
}

/// Lowers the soft RLIMIT_NOFILE so that exactly `n` more descriptors can be opened;
/// restores it on drop.
struct FdBudget {
    saved: libc::rlimit,
}

impl FdBudget {
    fn allow(n: usize) -> FdBudget {
        let saved = nofile_limit();
        let open = open_fds();
        let mut free = (0..).filter(|fd| !open.contains(fd));
        // Descriptors are allocated lowest first: the limit is the (n+1)-th free number.
        let limit = free.nth(n).unwrap();
        set_nofile_limit(&libc::rlimit {
            rlim_cur: limit as libc::rlim_t,
            rlim_max: saved.rlim_max,
        });
        FdBudget { saved }
    }
}

impl Drop for FdBudget {
    fn drop(&mut self) {
        set_nofile_limit(&self.saved);
    }
}

fn link_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

#[track_caller]
fn assert_no_leak<T: std::fmt::Debug>(what: &str, f: impl FnOnce() -> Result<T, SysError>) {
    let before = open_fds();
    let r = f();
    assert!(r.is_err(), "{what}: expected an error, got {r:?}");
    assert_eq!(open_fds(), before, "{what}: descriptors leaked ({r:?})");
}

#[test]
fn error_paths_close_every_descriptor() {
    if !nix::unistd::geteuid().is_root() || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipping: needs root and /dev/net/tun");
        return;
    }
    std::thread::spawn(|| {
        unshare(CloneFlags::CLONE_NEWNET).unwrap();

        // Bad names and counts: refused before anything is opened.
        for name in ["this-name-is-way-too-long", "a/b", "a\0b"] {
            for queues in [1, 3] {
                assert_no_leak(name, || Tun::open_queues(name, queues, true));
            }
        }
        assert_no_leak("0 queues", || Tun::open_queues("weft0", 0, false));
        assert_no_leak("0 sockets", || udp::bind_udp_group(0, 0));

        // A name the kernel refuses, multi-queue or not.
        for queues in [1, 2] {
            assert_no_leak("a b", || Tun::open_queues("a b", queues, false));
        }

        // A multi-queue open of an existing single-queue device.
        let single = Tun::open_queues("weft1", 1, false).unwrap();
        assert_no_leak("multi on single", || {
            let r = Tun::open_queues("weft1", 3, true);
            assert!(r.as_ref().is_err_and(|e| e.is_multi_queue_unsupported()));
            r
        });
        // And the other way round.
        drop(single);
        assert!(!link_exists("weft1"));
        let multi = Tun::open_queues("weft1", 2, false).unwrap();
        assert_no_leak("single on multi", || Tun::open_queues("weft1", 1, false));
        drop(multi);
        assert!(!link_exists("weft1"));

        // Failing after the first queue (out of descriptors): the queue that created the
        // device is closed again, so the device is gone.
        for opened in [1, 2] {
            assert_no_leak("EMFILE mid-way", || {
                let _budget = FdBudget::allow(opened);
                let r = Tun::open_queues("wleak0", 3, true);
                assert_eq!(r.as_ref().err().and_then(|e| e.errno()), Some(libc::EMFILE));
                r
            });
            assert!(!link_exists("wleak0"), "device left behind");
        }
        assert_eq!(Tun::open_queues("wleak0", 3, true).unwrap().len(), 3);
        assert!(!link_exists("wleak0"));

        // UDP: a port held by a plain socket, for one socket and a group.
        let plain = std::net::UdpSocket::bind("[::]:0").unwrap();
        let port = plain.local_addr().unwrap().port();
        assert_no_leak("UDP port in use (1)", || udp::bind_udp_group(port, 1));
        assert_no_leak("UDP port in use (3)", || udp::bind_udp_group(port, 3));
        drop(plain);
        // Failing after the first socket of a group: it is closed (the port is free again).
        for opened in [1, 2] {
            let before = open_fds();
            let r = {
                let _budget = FdBudget::allow(opened);
                udp::bind_udp_group(port, 3)
            };
            assert_eq!(r.as_ref().err().and_then(|e| e.errno()), Some(libc::EMFILE));
            assert_eq!(open_fds(), before, "UDP EMFILE mid-way: leaked");
            drop(std::net::UdpSocket::bind(("::", port)).unwrap());
        }
        assert_eq!(udp::bind_udp_group(port, 3).unwrap().len(), 3);
    })
    .join()
    .unwrap();
}
