//! Network-namespace helpers: run code inside a named namespace.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

use crate::SysError;

/// Where `ip netns` keeps named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// The path of a namespace given by name (`/run/netns/NAME`) or by path (anything
/// containing a `/`, e.g. `/proc/1234/ns/net` or a CNI `CNI_NETNS`).
pub fn path_of(name_or_path: &str) -> PathBuf {
    if name_or_path.contains('/') {
        PathBuf::from(name_or_path)
    } else {
        Path::new(NETNS_RUN_DIR).join(name_or_path)
    }
}

/// Whether the named namespace (or namespace path) exists.
pub fn exists(name_or_path: &str) -> bool {
    !name_or_path.is_empty() && path_of(name_or_path).exists()
}

/// Runs `f` on a fresh thread that has entered the network namespace `name_or_path`
/// (see [`path_of`]) and returns its result. Only that thread changes namespace, so
/// sockets, TUN devices, netlink handles and `/proc/sys/net` writes made by `f` belong
/// to the target namespace; to use tokio inside, build a current-thread runtime in `f`.
/// A panic in `f` is propagated to the caller.
pub fn run_in<F, R>(name_or_path: &str, f: F) -> Result<R, SysError>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let path = path_of(name_or_path);
    let ns =
        File::open(&path).map_err(|e| SysError::io(format!("open netns {}", path.display()), e))?;
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("netns-{name_or_path}"))
            .spawn_scoped(scope, move || {
                setns(&ns, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| SysError::io(format!("setns {}", path.display()), e.into()))?;
                drop(ns);
                Ok(f())
            })
            .map_err(|e| SysError::io("spawn netns thread", e))?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(path_of("blue"), PathBuf::from("/run/netns/blue"));
        assert_eq!(path_of("/proc/1/ns/net"), PathBuf::from("/proc/1/ns/net"));
        assert!(!exists(""));
        assert!(!exists("wsys-definitely-not-there"));
    }

    #[test]
    fn missing_namespace_is_an_error() {
        let r = run_in("wsys-definitely-not-there", || 1);
        assert!(matches!(r, Err(SysError::Io { .. })));
    }
}
