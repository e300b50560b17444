//! Writing sysctls under `/proc/sys` (network sysctls are per network namespace: the
//! calling thread's namespace is the one affected).

use std::path::PathBuf;

use crate::SysError;

/// Resolves a sysctl name to its `/proc/sys` path. Accepts an absolute path
/// (`/proc/sys/net/ipv4/ip_forward`), a slash form relative to `/proc/sys`
/// (`net/ipv4/ip_forward`) or the dotted form (`net.ipv4.ip_forward`; only when the
/// name contains no `/`).
pub fn sysctl_path(name: &str) -> Result<PathBuf, SysError> {
    if name.is_empty() || name.split('/').any(|c| c == "..") {
        return Err(SysError::InvalidArgument(format!(
            "bad sysctl name {name:?}"
        )));
    }
    if name.starts_with('/') {
        return Ok(PathBuf::from(name));
    }
    let rel = if name.contains('/') {
        name.to_string()
    } else {
        name.replace('.', "/")
    };
    Ok(PathBuf::from("/proc/sys").join(rel))
}

/// Writes `value` to sysctl `name` (see [`sysctl_path`] for the accepted forms).
pub fn write_sysctl(name: &str, value: &str) -> Result<(), SysError> {
    let path = sysctl_path(name)?;
    std::fs::write(&path, value)
        .map_err(|e| SysError::io(format!("write {value:?} to {}", path.display()), e))
}

/// Reads sysctl `name`, trimmed.
pub fn read_sysctl(name: &str) -> Result<String, SysError> {
    let path = sysctl_path(name)?;
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|e| SysError::io(format!("read {}", path.display()), e))
}

/// Which forwarding sysctls [`enable_forwarding`] turned on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarding {
    /// `net.ipv4.ip_forward` is 1 (always true when `enable_forwarding` returns Ok).
    pub ipv4: bool,
    /// `net.ipv6.conf.all.forwarding` is 1.
    pub ipv6: bool,
}

/// Sets `net.ipv4.ip_forward=1` and, if `ipv6`, `net.ipv6.conf.all.forwarding=1`.
/// Failing to enable IPv4 forwarding is an error; failing IPv6 (e.g. IPv6 disabled in
/// the namespace) is only logged and reported as `ipv6: false`.
pub fn enable_forwarding(ipv6: bool) -> Result<Forwarding, SysError> {
    enable_forwarding_in(std::path::Path::new("/proc/sys"), ipv6)
}

/// Writes `value` to the sysctl file `rel` under `proc_sys` unless it already holds it (so a
/// read-only `/proc/sys`, as in an unprivileged container, is fine when the host set it).
fn ensure_sysctl(proc_sys: &std::path::Path, rel: &str, value: &str) -> Result<(), SysError> {
    let path = proc_sys.join(rel);
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value)
        .map_err(|e| SysError::io(format!("write {value:?} to {}", path.display()), e))
}

/// [`enable_forwarding`] with the sysctl tree at `proc_sys` (`/proc/sys`, or where a container
/// has the host's mounted writable, e.g. `/host/proc/sys`). A sysctl already on is not written.
pub fn enable_forwarding_in(
    proc_sys: &std::path::Path,
    ipv6: bool,
) -> Result<Forwarding, SysError> {
    ensure_sysctl(proc_sys, "net/ipv4/ip_forward", "1")?;
    let ipv6 = ipv6
        && match ensure_sysctl(proc_sys, "net/ipv6/conf/all/forwarding", "1") {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "could not enable IPv6 forwarding");
                false
            }
        };
    Ok(Forwarding { ipv4: true, ipv6 })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_already_on_is_not_written() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("net/ipv4");
        std::fs::create_dir_all(&f).unwrap();
        // Already on: left as it is (a write would leave "1" without the newline).
        std::fs::write(f.join("ip_forward"), "1\n").unwrap();
        let r = enable_forwarding_in(tmp.path(), false).unwrap();
        assert!(r.ipv4 && !r.ipv6);
        assert_eq!(
            std::fs::read_to_string(f.join("ip_forward")).unwrap(),
            "1\n"
        );
        std::fs::write(f.join("ip_forward"), "0\n").unwrap();
        enable_forwarding_in(tmp.path(), false).unwrap();
        assert_eq!(std::fs::read_to_string(f.join("ip_forward")).unwrap(), "1");
        let missing = tempfile::tempdir().unwrap();
        assert!(enable_forwarding_in(missing.path(), false).is_err());
    }

    #[test]
    fn paths() {
        let p = |s| sysctl_path(s).unwrap();
        assert_eq!(
            p("net.ipv4.ip_forward"),
            PathBuf::from("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            p("net/ipv4/ip_forward"),
            PathBuf::from("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            p("net/ipv4/conf/eth0.100/rp_filter"),
            PathBuf::from("/proc/sys/net/ipv4/conf/eth0.100/rp_filter")
        );
        assert_eq!(
            p("/proc/sys/net/ipv6/conf/all/forwarding"),
            PathBuf::from("/proc/sys/net/ipv6/conf/all/forwarding")
        );
        assert!(sysctl_path("").is_err());
        assert!(sysctl_path("net/../../etc/passwd").is_err());
    }

    #[test]
    fn read_works_unprivileged() {
        let v = read_sysctl("net.ipv4.ip_forward").unwrap();
        assert!(v == "0" || v == "1");
    }
}
