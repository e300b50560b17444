//! ADD, DEL, CHECK, GC and STATUS: the veth pair, addresses, routes and masquerade a pod needs,
//! and their exact removal. Every ADD step is undone when a later one fails.

use crate::conf::{Env, NetConf, NodeInfo};
use crate::error::*;
use crate::ipam::Store;
use ipnet::IpNet;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use weft_sys::{Netlink, Route, RouteKind};

/// The pod's IPv4 gateway: link-local, answered by proxy ARP on the host veth.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pod's IPv6 gateway: a link-local address on the host veth.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// `wft` + 11 hex characters of SHA-256(container id "/" ifname): 14 bytes, unique per
/// attachment, the same in every call for it.
pub fn host_ifname(cid: &str, ifname: &str) -> String {
    let h = Sha256::digest(format!("{cid}/{ifname}").as_bytes());
    format!("wft{}", &hex::encode(h)[..11])
}

pub fn is_host_ifname(name: &str) -> bool {
    name.len() == 14 && name.starts_with("wft") && name[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(feature = "failpoints")]
fn failpoint(name: &str) -> Result<()> {
    if std::env::var("WEFT_CNI_FAILPOINT").as_deref() == Ok(name) {
        return Err(CniError::new(
            SETUP_FAILED,
            format!("failpoint {name}"),
            "injected by WEFT_CNI_FAILPOINT",
        ));
    }
    Ok(())
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
fn failpoint(_name: &str) -> Result<()> {
    Ok(())
}

fn open_netns(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| {
        CniError::new(
            UNKNOWN_CONTAINER,
            "the container's network namespace does not exist",
            format!("{}: {e}", path.display()),
        )
    })
}

/// A netlink handle whose socket lives in the namespace open at `ns` (this thread returns to
/// its own namespace before this returns).
fn netlink_in(ns: &File) -> Result<Netlink> {
    use nix::sched::{setns, CloneFlags};
    let home = File::open("/proc/thread-self/ns/net")
        .map_err(|e| CniError::setup("cannot open this thread's netns", e))?;
    setns(ns, CloneFlags::CLONE_NEWNET)
        .map_err(|e| CniError::setup("cannot enter the container netns", e))?;
    let nl = Netlink::new();
    setns(&home, CloneFlags::CLONE_NEWNET)
        .map_err(|e| CniError::setup("cannot return to the host netns", e))?;
    Ok(nl?)
}

/// Addresses that came from IPAM, and how to give them back.
enum Lease {
    Own { state_dir: PathBuf, network: String },
    Delegated { raw: Value },
}

struct Undo<'a> {
    env: &'a Env,
    lease: Option<Lease>,
    host_if: Option<String>,
}

impl Undo<'_> {
    async fn run(self, host: &Netlink) {
        if let Some(h) = &self.host_if {
            // Deleting one end removes the pair, wherever the other end is.
            let _ = host.delete_link(h).await;
        }
        match self.lease {
            Some(Lease::Own { state_dir, network }) => {
                if let Ok(s) = Store::lock(&state_dir, &network) {
                    s.release(&self.env.container_id, &self.env.ifname);
                }
            }
            Some(Lease::Delegated { raw }) => {
                let _ = exec_ipam("DEL", self.env, &raw);
            }
            None => {}
        }
    }
}

pub async fn add(env: &Env, conf: &NetConf) -> Result<Value> {
    let host = Netlink::new()?;
    let mut undo = Undo {
        env,
        lease: None,
        host_if: None,
    };
    match add_steps(env, conf, &host, &mut undo).await {
        Ok(v) => Ok(v),
        Err(e) => {
            undo.run(&host).await;
            Err(e)
        }
    }
}

async fn add_steps(
    env: &Env,
    conf: &NetConf,
    host: &Netlink,
    undo: &mut Undo<'_>,
) -> Result<Value> {
    let node = crate::conf::read_node_info(&conf.state_dir)?;
    let netns_path = env.netns.as_deref().ok_or_else(|| {
        CniError::new(
            INVALID_ENV,
            "invalid CNI environment variables: CNI_NETNS",
            "missing",
        )
    })?;
    let ns = open_netns(netns_path)?;
    let cont = netlink_in(&ns)?;
    if cont.link_index(&env.ifname).await?.is_some() {
        return Err(CniError::new(
            IFACE_EXISTS,
            format!("interface {} already exists in the container", env.ifname),
            netns_path.display().to_string(),
        ));
    }

    // Addresses.
    let ips: Vec<IpAddr> = match &conf.ipam {
        None => {
            let store = Store::lock(&conf.state_dir, &conf.name)?;
            let ips = store.allocate(
                &node.pod_cidrs,
                &node.mesh_addresses,
                &env.container_id,
                &env.ifname,
                env.pod.as_deref(),
            )?;
            undo.lease = Some(Lease::Own {
                state_dir: conf.state_dir.clone(),
                network: conf.name.clone(),
            });
            ips
        }
        Some(_) => {
            let r = exec_ipam("ADD", env, &conf.raw)?;
            undo.lease = Some(Lease::Delegated {
                raw: conf.raw.clone(),
            });
            ipam_addresses(&r)?
        }
    };
    failpoint("after-ipam")?;

    // The veth pair, created in the host namespace, one end moved into the container.
    let host_if = host_ifname(&env.container_id, &env.ifname);
    // Leftovers of an ADD that crashed half way for this same attachment.
    host.delete_link(&host_if).await?;
    // The container end is created inside the container's namespace under its final name:
    // moving a link between namespaces afterwards would cost an RCU grace period.
    host.add_veth_into(&host_if, &env.ifname, ns.as_raw_fd(), node.mtu)
        .await?;
    undo.host_if = Some(host_if.clone());
    failpoint("after-veth")?;
    failpoint("after-move")?;

    // Container side.
    cont.link_up(&env.ifname).await?;
    for ip in &ips {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        cont.add_address(&env.ifname, *ip, len).await?;
    }
    failpoint("after-container-addr")?;
    let has_v4 = ips.iter().any(IpAddr::is_ipv4);
    let has_v6 = ips.iter().any(IpAddr::is_ipv6);
    if has_v4 {
        cont.replace_route(&Route {
            dst: IpNet::from(IpAddr::V4(GATEWAY_V4)),
            kind: RouteKind::Dev {
                ifname: env.ifname.clone(),
                src: None,
            },
            metric: 0,
        })
        .await?;
        cont.replace_route(&Route {
            dst: "0.0.0.0/0"
                .parse()
                .map_err(|e| CniError::setup("route", e))?,
            kind: RouteKind::Via {
                ifname: env.ifname.clone(),
                gateway: GATEWAY_V4.into(),
            },
            metric: 0,
        })
        .await?;
    }

    // Host side: up, proxy ARP for the gateway, a host route per address.
    host.link_up(&host_if).await?;
    let sysctl = |k: &str, v: &str| weft_sys::write_sysctl(k, v);
    sysctl(&format!("net/ipv4/conf/{host_if}/proxy_arp"), "1")?;
    sysctl(&format!("net/ipv4/neigh/{host_if}/proxy_delay"), "0")?;
    if has_v6 {
        host.add_address(&host_if, GATEWAY_V6.into(), 64).await?;
        cont.replace_route(&Route {
            dst: "::/0".parse().map_err(|e| CniError::setup("route", e))?,
            kind: RouteKind::Via {
                ifname: env.ifname.clone(),
                gateway: GATEWAY_V6.into(),
            },
            metric: 0,
        })
        .await?;
    }
    for ip in &ips {
        host.replace_route(&Route {
            dst: IpNet::from(*ip),
            kind: RouteKind::Dev {
                ifname: host_if.clone(),
                src: None,
            },
            metric: 0,
        })
        .await?;
    }
    failpoint("after-host-route")?;

    if conf.ip_masq {
        ensure_masquerade(&node)?;
    }
    if node.network_policy {
        crate::policy::place(env, conf, &ips).await?;
    }
    failpoint("before-result")?;

    let host_mac = host.link_mac(&host_if).await?.unwrap_or_default();
    let cont_mac = cont.link_mac(&env.ifname).await?.unwrap_or_default();
    Ok(result(
        &conf.cni_version,
        &host_if,
        &host_mac,
        &env.ifname,
        &cont_mac,
        &netns_path.display().to_string(),
        &ips,
    ))
}

pub fn result(
    version: &str,
    host_if: &str,
    host_mac: &str,
    ifname: &str,
    mac: &str,
    sandbox: &str,
    ips: &[IpAddr],
) -> Value {
    let old = version.starts_with("0.");
    let ip_entries: Vec<Value> = ips
        .iter()
        .map(|ip| {
            let (len, gw, fam) = match ip {
                IpAddr::V4(_) => (32, IpAddr::from(GATEWAY_V4), "4"),
                IpAddr::V6(_) => (128, IpAddr::from(GATEWAY_V6), "6"),
            };
            let mut e = json!({"address": format!("{ip}/{len}"), "gateway": gw.to_string(), "interface": 1});
            if old {
                e["version"] = json!(fam);
            }
            e
        })
        .collect();
    let mut routes = Vec::new();
    if ips.iter().any(IpAddr::is_ipv4) {
        routes.push(json!({"dst": "0.0.0.0/0", "gw": GATEWAY_V4.to_string()}));
    }
    if ips.iter().any(IpAddr::is_ipv6) {
        routes.push(json!({"dst": "::/0", "gw": GATEWAY_V6.to_string()}));
    }
    json!({
        "cniVersion": version,
        "interfaces": [
            {"name": host_if, "mac": host_mac},
            {"name": ifname, "mac": mac, "sandbox": sandbox},
        ],
        "ips": ip_entries,
        "routes": routes,
        "dns": {},
    })
}

/// DEL: releases the addresses and removes the veth pair; succeeds when any of it is gone.
pub async fn del(env: &Env, conf: &NetConf) -> Result<()> {
    if crate::conf::read_node_info(&conf.state_dir).is_ok_and(|n| n.network_policy) {
        crate::policy::forget(env, conf).await;
    }
    let host = Netlink::new()?;
    host.delete_link(&host_ifname(&env.container_id, &env.ifname))
        .await?;
    // If the host end is gone but the container end survived (it cannot, as a pair, but a
    // runtime may hand us a netns someone else configured), leave the container alone.
    match &conf.ipam {
        None => {
            let store = Store::lock(&conf.state_dir, &conf.name)?;
            store.release(&env.container_id, &env.ifname);
        }
        Some(_) => {
            exec_ipam("DEL", env, &conf.raw)?;
        }
    }
    Ok(())
}

/// CHECK: the attachment still looks the way `prevResult` says.
pub async fn check(env: &Env, conf: &NetConf) -> Result<()> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            INVALID_CONFIG,
            "CHECK needs prevResult",
            "the config has no prevResult",
        )
    })?;
    if conf.ipam.is_none() {
        let store = Store::lock(&conf.state_dir, &conf.name)?;
        if store.find(&env.container_id, &env.ifname).is_empty() {
            return Err(CniError::new(
                UNKNOWN_CONTAINER,
                format!(
                    "no attachment for container {} ifname {}",
                    env.container_id, env.ifname
                ),
                "weft-cni never added it, or it was deleted",
            ));
        }
    }
    let fail =
        |what: String| CniError::new(CHECK_FAILED, what, "the attachment differs from prevResult");
    let host = Netlink::new()?;
    let host_if = host_ifname(&env.container_id, &env.ifname);
    if host.link_index(&host_if).await?.is_none() {
        return Err(fail(format!("host interface {host_if} is missing")));
    }
    let netns = env
        .netns
        .as_deref()
        .ok_or_else(|| fail("no CNI_NETNS".into()))?;
    let ns = open_netns(netns)?;
    let cont = netlink_in(&ns)?;
    if cont.link_index(&env.ifname).await?.is_none() {
        return Err(fail(format!(
            "interface {} is missing in the container",
            env.ifname
        )));
    }
    let have: Vec<IpAddr> = cont
        .addresses(&env.ifname)
        .await?
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    let routes = cont.routes_via(&env.ifname).await?;
    let host_routes = host.routes_via(&host_if).await?;
    for ip in prev["ips"].as_array().into_iter().flatten() {
        let addr: IpNet = ip["address"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                CniError::new(DECODE_FAILURE, "bad prevResult", format!("ips entry {ip}"))
            })?;
        if !have.contains(&addr.addr()) {
            return Err(fail(format!(
                "address {} is missing on {}",
                addr.addr(),
                env.ifname
            )));
        }
        if !host_routes.contains(&IpNet::from(addr.addr())) {
            return Err(fail(format!("host route to {} is missing", addr.addr())));
        }
        let default: IpNet = if addr.addr().is_ipv4() {
            "0.0.0.0/0"
                .parse()
                .map_err(|e| CniError::setup("route", e))?
        } else {
            "::/0".parse().map_err(|e| CniError::setup("route", e))?
        };
        if !routes.contains(&default) {
            return Err(fail(format!(
                "default route {default} is missing in the container"
            )));
        }
    }
    Ok(())
}

/// GC: releases every allocation (and host veth) whose attachment is not listed as valid.
pub async fn gc(conf: &NetConf) -> Result<()> {
    let valid = conf.valid_attachments.clone().unwrap_or_default();
    let host = Netlink::new()?;
    let keep: std::collections::BTreeSet<String> =
        valid.iter().map(|(c, i)| host_ifname(c, i)).collect();
    if conf.ipam.is_none() {
        let store = Store::lock(&conf.state_dir, &conf.name)?;
        for (_, cid, ifname) in store.all() {
            if !valid.contains(&(cid.clone(), ifname.clone())) {
                store.release(&cid, &ifname);
                let _ = host.delete_link(&host_ifname(&cid, &ifname)).await;
            }
        }
    }
    for name in host.link_names().await? {
        if is_host_ifname(&name) && !keep.contains(&name) {
            let _ = host.delete_link(&name).await;
        }
    }
    Ok(())
}

/// STATUS: ready when meshd has written the node file and answers on its socket.
pub async fn status(conf: &NetConf) -> Result<()> {
    let unavailable = |d: String| CniError::new(NOT_AVAILABLE, "weft is not ready", d);
    crate::conf::read_node_info(&conf.state_dir).map_err(|e| unavailable(e.details))?;
    match crate::policy::ask_raw(conf, "status", std::time::Duration::from_secs(2)).await {
        Ok(reply)
            if serde_json::from_slice::<Value>(&reply).is_ok_and(|v| v.get("node").is_some()) =>
        {
            Ok(())
        }
        Ok(_) => Err(unavailable(
            "meshd answered, but not with its status".into(),
        )),
        // A timeout reads "no answer in 2 s".
        Err(e) => Err(unavailable(format!("{}: {e}", conf.meshd_socket.display()))),
    }
}

/// nftables masquerade for pod traffic leaving the cluster ranges, once per network namespace:
/// written over netlink ([`weft_sys::nft`]), so no `nft` binary is needed on the host (k3s
/// nodes have none). A marker under /run/weft-cni (per namespace cookie and rule digest) makes
/// later ADDs skip it; meshd `--masquerade` installs the same rule once at start instead.
fn ensure_masquerade(node: &NodeInfo) -> Result<()> {
    let batch = weft_sys::nft::masquerade_rules(MASQ_TABLE, &node.pod_cidrs, &node.cluster_cidrs)
        .map_err(|e| CniError::setup("building the masquerade rules", e.to_string()))?;
    if batch.is_empty() {
        return Ok(());
    }
    let marker_dir = Path::new("/run/weft-cni");
    let digest = hex::encode(Sha256::digest(&batch));
    let marker = marker_dir.join(format!(
        "masq-{}-{}",
        netns_cookie().unwrap_or(0),
        &digest[..16]
    ));
    if marker.exists() {
        return Ok(());
    }
    weft_sys::nft::install_masquerade(MASQ_TABLE, &node.pod_cidrs, &node.cluster_cidrs).map_err(
        |e| {
            CniError::setup(
                "installing the masquerade rules (nftables over netlink)",
                e.to_string(),
            )
        },
    )?;
    let _ = std::fs::create_dir_all(marker_dir);
    let _ = std::fs::write(&marker, digest);
    Ok(())
}

/// The nftables table of the masquerade rule (`ip weft-cni`, `ip6 weft-cni`).
const MASQ_TABLE: &str = "weft-cni";

/// A per-boot unique id of the current network namespace (`SO_NETNS_COOKIE`), so the
/// masquerade marker of a deleted namespace never matches a new one.
fn netns_cookie() -> Option<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket/getsockopt/close on a descriptor we own; `cookie` and `len` are
    // valid for writes of the sizes given.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        );
        libc::close(fd);
        (rc == 0).then_some(cookie)
    }
}

/// Runs the delegated IPAM plugin (`ipam.type`, found in `CNI_PATH`) with the same
/// environment and configuration.
fn exec_ipam(cmd: &str, env: &Env, raw: &Value) -> Result<Value> {
    let kind = raw["ipam"]["type"].as_str().unwrap_or_default();
    let bin = env
        .cni_path
        .iter()
        .map(|d| d.join(kind))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                IPAM_FAILED,
                format!("IPAM plugin {kind:?} not found"),
                format!("CNI_PATH={:?}", env.cni_path),
            )
        })?;
    use std::io::Write;
    let mut child = std::process::Command::new(&bin)
        .env("CNI_COMMAND", cmd)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            CniError::new(
                IPAM_FAILED,
                format!("cannot run {}", bin.display()),
                e.to_string(),
            )
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(raw.to_string().as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| {
        CniError::new(
            IPAM_FAILED,
            format!("{} failed", bin.display()),
            e.to_string(),
        )
    })?;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    if !out.status.success() {
        return Err(CniError::new(
            IPAM_FAILED,
            format!(
                "IPAM plugin {kind} failed: {}",
                v["msg"].as_str().unwrap_or("")
            ),
            format!(
                "{} {}",
                v["details"].as_str().unwrap_or(""),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(v)
}

fn ipam_addresses(r: &Value) -> Result<Vec<IpAddr>> {
    let ips: Vec<IpAddr> = r["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["address"].as_str())
        .filter_map(|s| s.parse::<IpNet>().ok())
        .map(|n| n.addr())
        .collect();
    if ips.is_empty() {
        return Err(CniError::new(
            IPAM_FAILED,
            "the IPAM plugin returned no address",
            r.to_string(),
        ));
    }
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_short_stable_and_distinct() {
        let a = host_ifname("c1", "eth0");
        assert_eq!(a.len(), 14);
        assert!(is_host_ifname(&a));
        assert_eq!(a, host_ifname("c1", "eth0"));
        assert_ne!(a, host_ifname("c1", "eth1"));
        assert_ne!(a, host_ifname("c2", "eth0"));
        assert!(!is_host_ifname("wftg0000000000"));
        assert!(!is_host_ifname("eth0"));
    }

    #[test]
    fn result_shape_follows_version() {
        let ips: Vec<IpAddr> = vec!["10.42.1.5".parse().expect("ip")];
        let old = result("0.4.0", "wft1", "aa", "eth0", "bb", "/run/netns/p", &ips);
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["cniVersion"], "0.4.0");
        let new = result("1.1.0", "wft1", "aa", "eth0", "bb", "/run/netns/p", &ips);
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["ips"][0]["address"], "10.42.1.5/32");
        assert_eq!(new["interfaces"][1]["sandbox"], "/run/netns/p");
        assert_eq!(new["routes"][0]["gw"], "169.254.1.1");
    }
}
