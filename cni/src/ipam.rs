//! Address allocation from the node's pod CIDRs, kept in the state dir under a file lock (as
//! host-local does), so ADD and DEL need no daemon and allocations survive meshd restarts.
//!
//! `DIR/ADDR` holds `CONTAINERID\nIFNAME\n` and, for a Kubernetes pod, `NAMESPACE/NAME\n`;
//! `DIR/last_reserved_ip.V4|V6` remembers where the last search ended, so a just-released
//! address is not handed out again at once.

use crate::error::*;
use ipnet::IpNet;
use nix::fcntl::{Flock, FlockArg};
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// At most this many candidates are tried per range (IPv6 ranges are huge).
const MAX_PROBES: u128 = 1 << 16;

pub struct Store {
    dir: PathBuf,
    _lock: Flock<fs::File>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish()
    }
}

fn io(what: &str, path: &Path, e: impl std::fmt::Display) -> CniError {
    CniError::new(
        IO_FAILURE,
        what.to_string(),
        format!("{}: {e}", path.display()),
    )
}

impl Store {
    /// Opens (creating) the allocation dir of network `name` and takes its exclusive lock.
    pub fn lock(state_dir: &Path, name: &str) -> Result<Store> {
        let dir = state_dir.join("cni").join("networks").join(name);
        fs::create_dir_all(&dir).map_err(|e| io("cannot create the allocation dir", &dir, e))?;
        let lock_path = dir.join("lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io("cannot open the allocation lock", &lock_path, e))?;
        let lock = Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| io("cannot lock the allocations", &lock_path, e))?;
        Ok(Store { dir, _lock: lock })
    }

    /// Every allocation: (address, container id, ifname).
    pub fn all(&self) -> Vec<(IpAddr, String, String)> {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Ok(ip) = name.replace('_', ":").parse::<IpAddr>() else {
                continue;
            };
            let text = fs::read_to_string(e.path()).unwrap_or_default();
            let mut lines = text.lines();
            let cid = lines.next().unwrap_or("").trim().to_string();
            let ifname = lines.next().unwrap_or("").trim().to_string();
            out.push((ip, cid, ifname));
        }
        out.sort();
        out
    }

    fn file(&self, ip: IpAddr) -> PathBuf {
        // ':' is legal in file names but awkward in tools; host-local keeps it, we use '_'.
        self.dir.join(ip.to_string().replace(':', "_"))
    }

    /// The addresses already held by this attachment.
    pub fn find(&self, cid: &str, ifname: &str) -> Vec<IpAddr> {
        self.all()
            .into_iter()
            .filter(|(_, c, i)| c == cid && i == ifname)
            .map(|(ip, _, _)| ip)
            .collect()
    }

    /// One address per range for the attachment (the ones it already holds, if any).
    pub fn allocate(
        &self,
        ranges: &[IpNet],
        reserved: &[IpAddr],
        cid: &str,
        ifname: &str,
        pod: Option<&str>,
    ) -> Result<Vec<IpAddr>> {
        let held = self.find(cid, ifname);
        let mut out = Vec::new();
        for range in ranges {
            if let Some(ip) = held.iter().find(|ip| range.contains(*ip)) {
                out.push(*ip);
                continue;
            }
            let ip = self.pick(range, reserved)?;
            let path = self.file(ip);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| io("cannot record the allocation", &path, e))?;
            // No fsync (host-local does none either): after a crash the pods are set up anew,
            // and the file is created before any address is configured.
            let pod_line = pod.map(|p| format!("{p}\n")).unwrap_or_default();
            f.write_all(format!("{cid}\n{ifname}\n{pod_line}").as_bytes())
                .map_err(|e| io("cannot record the allocation", &path, e))?;
            let fam = if ip.is_ipv4() { "V4" } else { "V6" };
            let _ = fs::write(
                self.dir.join(format!("last_reserved_ip.{fam}")),
                ip.to_string(),
            );
            out.push(ip);
        }
        Ok(out)
    }

    fn pick(&self, range: &IpNet, reserved: &[IpAddr]) -> Result<IpAddr> {
        let (base, size): (u128, u128) = match range {
            IpNet::V4(n) => (
                u128::from(u32::from(n.network())),
                1u128 << (32 - n.prefix_len()),
            ),
            IpNet::V6(n) => (
                u128::from(n.network()),
                1u128
                    .checked_shl(u32::from(128 - n.prefix_len()))
                    .unwrap_or(u128::MAX),
            ),
        };
        let v4 = matches!(range, IpNet::V4(_));
        let to_ip = |x: u128| -> IpAddr {
            if v4 {
                IpAddr::from(std::net::Ipv4Addr::from(x as u32))
            } else {
                IpAddr::from(std::net::Ipv6Addr::from(x))
            }
        };
        // Usable offsets: 2 .. size-1 (0 is the network, 1 the node's mesh address, and for
        // IPv4 the last one is the broadcast address).
        let first = 2u128;
        let end = if v4 { size.saturating_sub(1) } else { size };
        if end <= first {
            return Err(CniError::new(
                TRY_AGAIN_LATER,
                "pod range too small",
                range.to_string(),
            ));
        }
        let span = end - first;
        let fam = if v4 { "V4" } else { "V6" };
        let start = fs::read_to_string(self.dir.join(format!("last_reserved_ip.{fam}")))
            .ok()
            .and_then(|s| s.trim().parse::<IpAddr>().ok())
            .filter(|ip| range.contains(ip))
            .map(|ip| match ip {
                IpAddr::V4(a) => u128::from(u32::from(a)),
                IpAddr::V6(a) => u128::from(a),
            })
            .map(|x| (x - base + 1).max(first))
            .unwrap_or(first);
        for k in 0..span.min(MAX_PROBES) {
            let off = first + (start - first + k) % span;
            let ip = to_ip(base + off);
            if reserved.contains(&ip) {
                continue;
            }
            if !self.file(ip).exists() {
                return Ok(ip);
            }
        }
        Err(CniError::new(
            TRY_AGAIN_LATER,
            format!("no free address left in {range}"),
            "every address of the node's pod range is allocated; release some (DEL or GC)",
        ))
    }

    /// Releases every address of the attachment; returns them.
    pub fn release(&self, cid: &str, ifname: &str) -> Vec<IpAddr> {
        let ips = self.find(cid, ifname);
        for ip in &ips {
            let _ = fs::remove_file(self.file(*ip));
        }
        ips
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_distinct_skips_reserved_and_reuses_for_same_attachment() {
        let tmp = tempfile::tempdir().expect("tmp");
        let range: IpNet = "10.42.1.0/29".parse().expect("net");
        let s = Store::lock(tmp.path(), "weft").expect("lock");
        let mesh: IpAddr = "10.42.1.1".parse().expect("ip");
        let mut got = Vec::new();
        for i in 0..5 {
            let ip = s
                .allocate(&[range], &[mesh], &format!("c{i}"), "eth0", None)
                .expect("alloc")[0];
            got.push(ip);
        }
        let want: Vec<IpAddr> = (2..=6)
            .map(|h| format!("10.42.1.{h}").parse().expect("ip"))
            .collect();
        assert_eq!(got, want);
        // .7 is the broadcast address: the range is full.
        let e = s
            .allocate(&[range], &[mesh], "c9", "eth0", None)
            .expect_err("full");
        assert_eq!(e.code, TRY_AGAIN_LATER);
        assert_eq!(
            s.allocate(&[range], &[mesh], "c3", "eth0", None)
                .expect("same")[0],
            want[3]
        );
        assert_eq!(s.release("c3", "eth0"), vec![want[3]]);
        assert!(s.release("c3", "eth0").is_empty());
        assert_eq!(
            s.allocate(&[range], &[mesh], "c9", "eth0", None)
                .expect("freed")[0],
            want[3]
        );
        // A Kubernetes pod's identity is a third line of its allocation file.
        s.release("c9", "eth0");
        let ip = s
            .allocate(&[range], &[mesh], "c9", "eth0", Some("default/web-1"))
            .expect("again")[0];
        let text = fs::read_to_string(s.file(ip)).expect("allocation file");
        assert_eq!(text, "c9\neth0\ndefault/web-1\n");
        assert_eq!(s.find("c9", "eth0"), vec![ip]);
    }
}
