//! The netns cluster: a switch/router namespace with a bridge, N node namespaces on it, pods in
//! their own namespaces behind each node, and the processes (meshd, wireguard-go, boringtun-cli)
//! that run inside the nodes.
//!
//! Naming: every namespace is `wt-<pid>-<seq>-<role>` (role `sw`, `n<i>`, `n<i>p<k>`, and `r<s>`
//! for the NAT router of site `s`, see [`crate::sites`]); interfaces are created directly inside
//! those namespaces (never in the root namespace) and carry a per-test short id `wt<4 hex>` where a
//! name could matter outside the namespace (TUN names of wireguard-go/boringtun, whose UAPI
//! sockets live in the shared /var/run/wireguard).

use crate::capture::Capture;
use crate::sites::{SiteSpec, SiteState};
use crate::traffic::{ping, BgPing, PingOpts, PingResult};
use crate::util::{
    find_program, ns_cmd, require_root, run, run_args, run_in, run_timeout, tail, wait_for,
    wait_until, workspace_bin, HarnessLock, Proc,
};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Namespaces this harness creates start with this.
pub const NS_PREFIX: &str = "wt-";
/// The underlay: switch/router address and the first node address (node i = .10+i).
pub const UNDERLAY_ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
pub const CLUSTER_CIDR: &str = "10.42.0.0/16";
pub const MESH_PORT: u16 = 51820;
/// Link-local gateway every pod routes through (Calico style, answered by proxy ARP).
pub const POD_GATEWAY: &str = "169.254.1.1";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Cluster options.
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    /// MTU of the underlay links (bridge ports and node eth0).
    pub underlay_mtu: u32,
    /// MTU of pod interfaces (both veth ends); the mesh MTU (underlay - 80).
    pub pod_mtu: u32,
    /// Two nodes joined by one veth pair, no switch namespace (benchmarks). Needs exactly 2 nodes.
    pub direct_link: bool,
    /// Give the switch/router routes to every pod CIDR via its node (a flat routed network: then a
    /// plaintext leak also *works*, not only shows up on the bridge). Default off.
    pub router_pod_routes: bool,
    /// Keep the temp dir (logs, captures) even on success. Also env `WEFT_KEEP_TMP=1`.
    pub keep_tmp: bool,
    /// Sites (locations, NAT routers), see [`crate::sites`]; empty: the flat topology.
    pub sites: Vec<SiteSpec>,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            underlay_mtu: 1500,
            pod_mtu: 1420,
            direct_link: false,
            router_pod_routes: false,
            keep_tmp: false,
            sites: Vec::new(),
        }
    }
}

/// The shared registry directory (`dir:` backend): `<dir>/nodes/<name>.json`.
#[derive(Debug, Clone)]
pub struct Registry {
    pub dir: PathBuf,
}

/// A node record as meshd reads it from the registry.
#[derive(Debug, Clone)]
pub struct RecordSpec {
    pub name: String,
    pub public_key: String,
    pub endpoints: Vec<String>,
    pub pod_cidrs: Vec<String>,
    pub key_generation: u64,
}

impl RecordSpec {
    pub fn to_json(&self) -> Value {
        json!({
            "schema": 1,
            "name": self.name,
            "publicKey": self.public_key,
            "endpoints": self.endpoints,
            "podCidrs": self.pod_cidrs,
            "keyGeneration": self.key_generation,
        })
    }
}

/// A low-order X25519 point (all zeros) in base64: must be refused as a peer key.
pub const LOW_ORDER_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

impl Registry {
    pub fn nodes_dir(&self) -> PathBuf {
        self.dir.join("nodes")
    }

    /// `dir:PATH` spec for meshd's `--registry`.
    pub fn spec(&self) -> String {
        format!("dir:{}", self.dir.display())
    }

    pub fn record_path(&self, name: &str) -> PathBuf {
        self.nodes_dir().join(format!("{name}.json"))
    }

    /// Writes raw bytes as `nodes/<file_name>` atomically (dotted temp file + rename; the dir
    /// backend ignores dotfiles). `file_name` includes the extension, e.g. "junk.json".
    pub fn write_raw(&self, file_name: &str, bytes: &[u8]) -> Result<PathBuf> {
        let dir = self.nodes_dir();
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".{file_name}.tmp.harness"));
        let dst = dir.join(file_name);
        std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &dst).with_context(|| format!("renaming to {}", dst.display()))?;
        Ok(dst)
    }

    /// Writes a well-formed node record `nodes/<name>.json`.
    pub fn write_record(&self, r: &RecordSpec) -> Result<PathBuf> {
        let bytes = serde_json::to_vec_pretty(&r.to_json())?;
        self.write_raw(&format!("{}.json", r.name), &bytes)
    }

    /// Deletes `nodes/<name>.json`.
    pub fn remove_record(&self, name: &str) -> Result<()> {
        let p = self.record_path(name);
        std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))
    }

    /// Reads and parses `nodes/<name>.json`.
    pub fn read_record(&self, name: &str) -> Result<Value> {
        let p = self.record_path(name);
        let b = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display()))
    }

    /// Names of the record files present (without `.json`, dotfiles skipped).
    pub fn record_names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.nodes_dir())
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| !n.starts_with('.'))
                    .filter_map(|n| n.strip_suffix(".json").map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    // ---- bad files ----

    /// `nodes/<name>.json` containing something that is not JSON.
    pub fn write_garbage(&self, name: &str) -> Result<PathBuf> {
        self.write_raw(
            &format!("{name}.json"),
            b"{\"schema\":1, \"name\": \"x\", this is not json \x00\xff",
        )
    }

    /// A record whose public key is too short (16 bytes).
    pub fn write_short_key(&self, name: &str, endpoint: &str, pod_cidr: &str) -> Result<PathBuf> {
        self.write_record(&RecordSpec {
            name: name.into(),
            public_key: "AAECAwQFBgcICQoLDA0ODw==".into(),
            endpoints: vec![endpoint.into()],
            pod_cidrs: vec![pod_cidr.into()],
            key_generation: 0,
        })
    }

    /// A record whose public key is the low-order all-zero point.
    pub fn write_low_order_key(
        &self,
        name: &str,
        endpoint: &str,
        pod_cidr: &str,
    ) -> Result<PathBuf> {
        self.write_record(&RecordSpec {
            name: name.into(),
            public_key: LOW_ORDER_KEY.into(),
            endpoints: vec![endpoint.into()],
            pod_cidrs: vec![pod_cidr.into()],
            key_generation: 0,
        })
    }
}

/// Which userspace WireGuard implementation runs a standard (non-weft) peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgImpl {
    /// Debian's wireguard-go.
    WireguardGo,
    /// `boringtun-cli` 0.7.1 from crates.io.
    Boringtun,
}

/// A peer entry for `wg set`.
#[derive(Debug, Clone)]
pub struct WgPeer {
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    pub persistent_keepalive: Option<u32>,
}

/// A `wg genkey` / `wg pubkey` pair.
#[derive(Debug, Clone)]
pub struct WgKeys {
    pub private_key: String,
    pub public_key: String,
}

/// Generates a key pair with `wg genkey` / `wg pubkey`.
pub fn wg_genkey() -> Result<WgKeys> {
    let private_key = run_args("wg", &["genkey"])?.trim().to_string();
    let public_key = wg_pubkey(&private_key)?;
    Ok(WgKeys {
        private_key,
        public_key,
    })
}

/// `wg pubkey` of a private key.
pub fn wg_pubkey(private_key: &str) -> Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running wg pubkey")?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow!("stdin"))?
        .write_all(format!("{private_key}\n").as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("wg pubkey failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A running standard WireGuard device in a node.
#[derive(Debug)]
pub struct WgDevice {
    pub kind: WgImpl,
    pub ifname: String,
    pub public_key: String,
    pub listen_port: u16,
    proc: Proc,
}

/// A pod: its own namespace with `eth0` (address /32, default via 169.254.1.1) and a host veth in
/// the node namespace.
#[derive(Debug, Clone)]
pub struct Pod {
    pub node_index: usize,
    pub index: usize,
    pub ns: String,
    pub node_ns: String,
    pub ip: Ipv4Addr,
    /// The host-side veth (in the node namespace).
    pub host_if: String,
    pub mtu: u32,
}

impl Pod {
    pub fn ip_str(&self) -> String {
        self.ip.to_string()
    }

    pub fn ping(&self, dst: impl std::fmt::Display, opts: &PingOpts) -> Result<PingResult> {
        ping(&self.ns, &dst.to_string(), opts)
    }

    pub fn bg_ping(&self, dst: impl std::fmt::Display, opts: &PingOpts) -> Result<BgPing> {
        BgPing::start(&self.ns, &dst.to_string(), opts)
    }

    /// Capture on the pod's host-side veth (in the node namespace): what the pod receives/sends.
    pub fn capture_host_side(&self, cluster: &Cluster, filter: &str) -> Result<Capture> {
        cluster.capture(&self.node_ns, &self.host_if, filter)
    }
}

/// One node namespace.
#[derive(Debug)]
pub struct Node {
    pub index: usize,
    /// Node name in the registry: `node-<i>`.
    pub name: String,
    pub ns: String,
    pub underlay_ip: Ipv4Addr,
    pub underlay_if: String,
    /// 10.42.(i+1).0/24
    pub pod_cidr: String,
    /// 10.42.(i+1).1 (on weft0 / the wireguard TUN)
    pub mesh_ip: Ipv4Addr,
    /// Per-node temp dir: logs, state dir, API socket, keys.
    pub dir: PathBuf,
    pub registry: Registry,
    short: String,
    pod_mtu: u32,
    pods: Mutex<Vec<Pod>>,
    meshd: Mutex<Option<Proc>>,
    meshd_extra: Mutex<Vec<String>>,
    /// Extra environment of meshd (etcd credentials), kept for restarts.
    meshd_env: Mutex<Vec<(String, String)>>,
    wg: Mutex<Option<WgDevice>>,
    /// Set by [`Node::start_meshd_claiming`]: meshd runs without `--pod-cidr`.
    claiming: std::sync::atomic::AtomicBool,
    /// The range meshd claimed and its mesh address (see [`Node::current_pod_cidr`]).
    claimed: Mutex<Option<(String, Ipv4Addr)>>,
    /// Default flags left out of meshd's command line ([`Node::omit_default_args`]).
    omitted: Mutex<Vec<String>>,
}

/// The whole test topology. Dropping it kills every process and deletes every namespace.
#[derive(Debug)]
pub struct Cluster {
    /// `wt-<pid>-<seq>`: prefix of every namespace of this cluster.
    pub prefix: String,
    /// `wt<4 hex>`: prefix of interface names that must be unique machine-wide.
    pub short: String,
    pub tmp: PathBuf,
    pub registry: Registry,
    /// The switch/router namespace (None with `direct_link`).
    pub switch_ns: Option<String>,
    pub bridge: String,
    pub nodes: Vec<Node>,
    pub opts: ClusterOpts,
    captures: AtomicU32,
    pub(crate) site_state: SiteState,
    _lock: HarnessLock,
}

fn ns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// Namespaces named by this harness's scheme (`wt-<pid>-<seq>-...`) currently present.
pub fn harness_namespaces() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| is_harness_ns(n))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn is_harness_ns(n: &str) -> bool {
    let Some(rest) = n.strip_prefix(NS_PREFIX) else {
        return false;
    };
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next().unwrap_or("");
    let seq = parts.next().unwrap_or("");
    let role = parts.next().unwrap_or("");
    !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && !seq.is_empty()
        && seq.bytes().all(|b| b.is_ascii_digit())
        && !role.is_empty()
}

/// Kills every process inside namespace `ns` and deletes it.
pub fn destroy_namespace(ns: &str) {
    for _ in 0..3 {
        let pids = Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let pids: Vec<i32> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for p in pids {
            // SAFETY: plain syscall.
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
}

/// Removes leftovers of earlier (crashed) harness runs: namespaces of our naming scheme and stale
/// wireguard UAPI sockets of our TUN naming scheme. Called with the harness lock held, so no live
/// cluster exists anywhere (a live one holds the lock).
pub fn remove_leftovers() {
    crate::kubelet::remove_leftovers();
    for ns in harness_namespaces() {
        eprintln!("weft-tests: removing leftover namespace {ns}");
        destroy_namespace(&ns);
    }
    if let Ok(rd) = std::fs::read_dir("/var/run/wireguard") {
        for e in rd.filter_map(|e| e.ok()) {
            let n = e.file_name().to_string_lossy().into_owned();
            if is_harness_tun_sock(&n) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// `meshd status --json --api-socket SOCK`, run in namespace `ns`, parsed.
pub fn meshd_status_at(ns: &str, sock: &Path) -> Result<Value> {
    let mut cmd = crate::util::ns_cmd(ns, workspace_bin("meshd")?);
    cmd.args(["status", "--json", "--api-socket"]).arg(sock);
    let out = run_timeout(&mut cmd, Duration::from_secs(10))?;
    if !out.status.success() {
        bail!(
            "meshd status failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("meshd status output is not JSON")
}

/// Names of the peers in a meshd status, in its order.
pub fn status_peer_names_of(st: &Value) -> Vec<String> {
    st["peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn is_harness_tun_sock(n: &str) -> bool {
    // wt<4 hex>[gb]<digits>.sock
    let Some(stem) = n.strip_suffix(".sock") else {
        return false;
    };
    let b = stem.as_bytes();
    b.len() >= 8
        && stem.starts_with("wt")
        && b[2..6].iter().all(u8::is_ascii_hexdigit)
        && (b[6] == b'g' || b[6] == b'b')
        && b[7..].iter().all(u8::is_ascii_digit)
}

impl Cluster {
    /// Builds the topology (see the crate docs). Blocks while another cluster exists.
    pub fn new(n_nodes: usize, opts: ClusterOpts) -> Result<Cluster> {
        require_root()?;
        if n_nodes == 0 || n_nodes > 200 {
            bail!("n_nodes must be 1..=200");
        }
        if opts.direct_link && n_nodes != 2 {
            bail!("direct_link needs exactly 2 nodes");
        }
        crate::sites::validate(&opts.sites, n_nodes, opts.direct_link)?;
        let lock = HarnessLock::acquire()?;
        remove_leftovers();
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("{NS_PREFIX}{}-{seq}", std::process::id());
        let short = format!("wt{:04x}", rand::random::<u16>());
        let tmp = std::env::temp_dir().join("weft-tests").join(&prefix);
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let registry = Registry {
            dir: tmp.join("registry"),
        };
        std::fs::create_dir_all(registry.nodes_dir())?;
        let mut c = Cluster {
            prefix: prefix.clone(),
            short: short.clone(),
            tmp: tmp.clone(),
            registry: registry.clone(),
            switch_ns: None,
            bridge: format!("{short}br"),
            nodes: Vec::new(),
            opts: opts.clone(),
            captures: AtomicU32::new(0),
            site_state: SiteState::default(),
            _lock: lock,
        };
        // From here on, an error drops `c`, which deletes whatever was created.
        let mtu = opts.underlay_mtu.to_string();
        if !opts.direct_link {
            let sw = format!("{prefix}-sw");
            run_args("ip", &["netns", "add", &sw])?;
            c.switch_ns = Some(sw.clone());
            run_args("ip", &["-n", &sw, "link", "set", "lo", "up"])?;
            sysctls(
                &sw,
                &[
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ],
            )?;
            run_args(
                "ip",
                &["-n", &sw, "link", "add", &c.bridge, "type", "bridge"],
            )?;
            run_args(
                "ip",
                &["-n", &sw, "link", "set", &c.bridge, "mtu", &mtu, "up"],
            )?;
            run_args(
                "ip",
                &[
                    "-n",
                    &sw,
                    "addr",
                    "add",
                    &format!("{UNDERLAY_ROUTER}/{UNDERLAY_PREFIX_LEN}"),
                    "dev",
                    &c.bridge,
                ],
            )?;
            c.build_site_routers()?;
        }
        for i in 0..n_nodes {
            let ns = format!("{prefix}-n{i}");
            let dir = tmp.join(format!("node-{i}"));
            std::fs::create_dir_all(&dir)?;
            run_args("ip", &["netns", "add", &ns])?;
            let node = Node {
                index: i,
                name: format!("node-{i}"),
                ns: ns.clone(),
                underlay_ip: crate::sites::node_addr(&opts.sites, i).0,
                underlay_if: "eth0".into(),
                pod_cidr: format!("10.42.{}.0/24", i + 1),
                mesh_ip: Ipv4Addr::new(10, 42, i as u8 + 1, 1),
                dir,
                registry: registry.clone(),
                short: short.clone(),
                pod_mtu: opts.pod_mtu,
                pods: Mutex::new(Vec::new()),
                meshd: Mutex::new(None),
                meshd_extra: Mutex::new(Vec::new()),
                meshd_env: Mutex::new(Vec::new()),
                wg: Mutex::new(None),
                claiming: Default::default(),
                claimed: Mutex::new(None),
                omitted: Mutex::new(Vec::new()),
            };
            c.nodes.push(node);
            run_args("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            sysctls(
                &ns,
                &[
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ],
            )?;
            // On the switch bridge, or on the LAN bridge of its site's NAT router.
            if let Some((sw, bridge)) = c.node_port(i) {
                let port = format!("{short}n{i}");
                run_args(
                    "ip",
                    &[
                        "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                        "netns", &ns,
                    ],
                )?;
                run_args(
                    "ip",
                    &[
                        "-n", &sw, "link", "set", &port, "master", &bridge, "mtu", &mtu, "up",
                    ],
                )?;
            }
        }
        if opts.direct_link {
            let (a, b) = (&c.nodes[0].ns, &c.nodes[1].ns);
            run_args(
                "ip",
                &[
                    "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
                    "netns", b,
                ],
            )?;
        }
        for n in &c.nodes {
            run_args(
                "ip",
                &["-n", &n.ns, "link", "set", "eth0", "mtu", &mtu, "up"],
            )?;
            run_args(
                "ip",
                &[
                    "-n",
                    &n.ns,
                    "addr",
                    "add",
                    &format!("{}/{UNDERLAY_PREFIX_LEN}", n.underlay_ip),
                    "dev",
                    "eth0",
                ],
            )?;
            if let Some(sw) = &c.switch_ns {
                let gateway = crate::sites::node_addr(&opts.sites, n.index).1;
                run_args(
                    "ip",
                    &[
                        "-n",
                        &n.ns,
                        "route",
                        "add",
                        "default",
                        "via",
                        &gateway.to_string(),
                    ],
                )?;
                // A NATed node's private address is not routable from the switch.
                if opts.router_pod_routes && !c.is_natted(n.index) {
                    run_args(
                        "ip",
                        &[
                            "-n",
                            sw,
                            "route",
                            "add",
                            &n.pod_cidr,
                            "via",
                            &n.underlay_ip.to_string(),
                        ],
                    )?;
                }
            }
        }
        // Underlay sanity check.
        for n in &c.nodes {
            let target = match &c.switch_ns {
                Some(_) => crate::sites::node_addr(&c.opts.sites, n.index).1,
                None => c.nodes[1 - n.index].underlay_ip,
            };
            let ok = wait_until(Duration::from_secs(5), || {
                ping(&n.ns, &target.to_string(), &PingOpts::count(1).wait(1))
                    .map(|r| r.any_received())
                    .unwrap_or(false)
            });
            if !ok {
                bail!("underlay not working: {} cannot ping {target}", n.ns);
            }
        }
        Ok(c)
    }

    /// `Cluster::new(n, ClusterOpts::default())`.
    pub fn with_nodes(n: usize) -> Result<Cluster> {
        Cluster::new(n, ClusterOpts::default())
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Underlay addresses of all nodes.
    /// The plaintext checks of an underlay capture: no packet carries `marker`, every IPv4
    /// packet sent by or to a node is WireGuard UDP (or an ICMP error about one), and no pod
    /// address (10.42.0.0/16) appears on the underlay.
    pub fn assert_underlay_encrypted(
        &self,
        b: &crate::capture::Packets,
        marker: &crate::capture::Marker,
    ) {
        let leaked = b.marker_packets(marker);
        assert!(
            leaked.is_empty(),
            "{} packets with the marker on the underlay, e.g. {:?}",
            leaked.len(),
            leaked
                .iter()
                .take(5)
                .map(|p| p.summary())
                .collect::<Vec<_>>()
        );
        let v = b.ipv4_violations_of_hosts(&self.underlay_ips(), &[MESH_PORT]);
        assert!(
            v.is_empty(),
            "{} IPv4 packets of nodes on the underlay that are not UDP port {MESH_PORT}: {:?}",
            v.len(),
            &v[..v.len().min(10)]
        );
        let pod_range = b.ipv4_touching(Ipv4Addr::new(10, 42, 0, 0), 16);
        assert!(
            pod_range.is_empty(),
            "pod addresses on the underlay: {:?}",
            &pod_range[..pod_range.len().min(10)]
        );
    }

    pub fn underlay_ips(&self) -> Vec<Ipv4Addr> {
        self.nodes.iter().map(|n| n.underlay_ip).collect()
    }

    /// Where all inter-node traffic can be seen: (namespace, interface) of the bridge, or node 0's
    /// eth0 with `direct_link`.
    pub fn underlay_tap(&self) -> (String, String) {
        match &self.switch_ns {
            Some(sw) => (sw.clone(), self.bridge.clone()),
            None => (self.nodes[0].ns.clone(), "eth0".into()),
        }
    }

    /// Starts a capture on `ns`/`iface` into this cluster's temp dir.
    pub fn capture(&self, ns: &str, iface: &str, filter: &str) -> Result<Capture> {
        let n = self.captures.fetch_add(1, Ordering::SeqCst);
        let file = self
            .tmp
            .join(format!("capture-{n}-{}.pcap", iface.replace('/', "_")));
        Capture::start_to(ns, iface, filter, &file)
    }

    /// Captures everything crossing the underlay bridge.
    pub fn capture_underlay(&self, filter: &str) -> Result<Capture> {
        let (ns, iface) = self.underlay_tap();
        self.capture(&ns, &iface, filter)
    }

    /// Nodes currently running meshd.
    pub fn meshd_nodes(&self) -> Vec<&Node> {
        self.nodes.iter().filter(|n| n.meshd_running()).collect()
    }

    /// Waits until every mesh member (nodes running meshd or a standard WireGuard device) has a
    /// completed handshake with every other member, nudging missing pairs with pings between mesh
    /// addresses. Fails with the status of every node and log tails.
    pub fn wait_mesh_ready(&self, timeout: Duration) -> Result<()> {
        let members: Vec<&Node> = self
            .nodes
            .iter()
            .filter(|n| n.meshd_running() || n.wg_ifname().is_some())
            .collect();
        if members.len() < 2 {
            return Ok(());
        }
        let mut last_missing = Vec::new();
        let ok = wait_until(timeout, || {
            let missing = self.missing_handshakes(&members);
            if missing.is_empty() {
                return true;
            }
            // Nudge: one ping per missing pair, in parallel.
            let pings: Vec<BgPing> = missing
                .iter()
                .filter_map(|(a, b)| {
                    BgPing::start(
                        &members[*a].ns,
                        &members[*b].current_mesh_ip().to_string(),
                        &PingOpts::count(1)
                            .wait(1)
                            .source(members[*a].current_mesh_ip().to_string()),
                    )
                    .ok()
                })
                .collect();
            for p in pings {
                let _ = p.finish();
            }
            last_missing = missing;
            false
        });
        if ok {
            return Ok(());
        }
        let pairs: Vec<String> = last_missing
            .iter()
            .map(|(a, b)| format!("{} -> {}", members[*a].name, members[*b].name))
            .collect();
        bail!(
            "mesh not ready after {timeout:?}; missing handshakes: {pairs:?}\n{}",
            self.debug_report()
        )
    }

    fn missing_handshakes(&self, members: &[&Node]) -> Vec<(usize, usize)> {
        let mut missing = Vec::new();
        // Public keys of every member (needed for the wg side).
        let keys: Vec<Option<String>> = members.iter().map(|n| n.public_key().ok()).collect();
        for (a, na) in members.iter().enumerate() {
            if na.meshd_running() {
                let st = na.status_json().ok();
                for (b, nb) in members.iter().enumerate() {
                    if a == b {
                        continue;
                    }
                    let done = st
                        .as_ref()
                        .and_then(|s| peer_of(s, &nb.name))
                        .is_some_and(|p| p["latestHandshakeSecsAgo"].as_f64().is_some());
                    if !done {
                        missing.push((a, b));
                    }
                }
            } else if na.wg_ifname().is_some() {
                let hs = na.wg_latest_handshakes().unwrap_or_default();
                for (b, _) in members.iter().enumerate() {
                    if a == b {
                        continue;
                    }
                    let done = keys[b]
                        .as_ref()
                        .is_some_and(|k| hs.iter().any(|(pk, ts)| pk == k && *ts > 0));
                    if !done {
                        missing.push((a, b));
                    }
                }
            }
        }
        missing
    }

    /// Every pod pings every pod on another node (3 pings at 50 ms); fails the test with the
    /// cluster's debug report on the first pair that loses one.
    pub fn assert_pods_ping(&self, pods: &[&Pod]) {
        for a in pods {
            for b in pods {
                if a.node_index == b.node_index {
                    continue;
                }
                let r = a
                    .ping(b.ip, &PingOpts::count(3).interval(0.05))
                    .expect("ping");
                assert!(
                    r.all_received(),
                    "{} -> {}: {}/{}\n{}",
                    a.ip,
                    b.ip,
                    r.received,
                    r.transmitted,
                    self.debug_report()
                );
            }
        }
    }

    /// Status JSON (or error) and log tail of every node: for failure messages.
    pub fn debug_report(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            s.push_str(&format!("===== {} ({})\n", n.name, n.ns));
            if n.meshd_running() {
                match n.status_json() {
                    Ok(v) => s.push_str(&format!("status: {v}\n")),
                    Err(e) => s.push_str(&format!("status error: {e:#}\n")),
                }
            }
            if let Some(i) = n.wg_ifname() {
                s.push_str(&format!(
                    "wg show: {}\n",
                    run_in(&n.ns, "wg", &["show", &i]).unwrap_or_else(|e| e.to_string())
                ));
            }
            let log = n.meshd_log_path();
            if log.exists() {
                s.push_str(&format!("meshd log tail:\n{}\n", tail(&log, 30)));
            }
        }
        s
    }

    /// Writes a registry record for a standard WireGuard node (e.g. wireguard-go) running in node
    /// `i` so meshd nodes take it as a peer.
    pub fn register_external(
        &self,
        i: usize,
        public_key: &str,
        listen_port: u16,
    ) -> Result<PathBuf> {
        let n = &self.nodes[i];
        self.registry.write_record(&RecordSpec {
            name: n.name.clone(),
            public_key: public_key.to_string(),
            endpoints: vec![format!("{}:{listen_port}", n.underlay_ip)],
            pod_cidrs: vec![n.pod_cidr.clone()],
            key_generation: 0,
        })
    }

    /// Adds an external standard WireGuard peer `name` with address `ip` as an operator would:
    /// `keyctl peer add NAME --public-key K --allowed-ips IP/32`, then Debian's wireguard-go in
    /// node `i` configured from the printed wg-quick config (private key filled in). Waits
    /// until it reaches every pod in `pods` (10 s each). Returns its key pair.
    pub fn add_wireguard_go_peer(
        &self,
        i: usize,
        name: &str,
        ip: &str,
        pods: &[Pod],
    ) -> Result<WgKeys> {
        let keys = wg_genkey()?;
        let (code, conf, err) = self.keyctl(&[
            "peer",
            "add",
            name,
            "--public-key",
            &keys.public_key,
            "--allowed-ips",
            &format!("{ip}/32"),
        ])?;
        if code != Some(0) {
            bail!("keyctl peer add {name}: {err}");
        }
        let conf = conf.replace(
            "PrivateKey = <paste the private key of this peer here>",
            &format!("PrivateKey = {}", keys.private_key),
        );
        let peer = self.node(i);
        peer.start_wg_quick(WgImpl::WireguardGo, &conf)?;
        for p in pods {
            let ok = crate::util::wait_until(Duration::from_secs(10), || {
                peer.ping(p.ip, &PingOpts::count(2).interval(0.05).wait(1))
                    .is_ok_and(|r| r.received > 0)
            });
            if !ok {
                bail!("{name} -> pod {} fails\n{}", p.ip, self.debug_report());
            }
        }
        Ok(keys)
    }

    /// Writes a ghost record for node `i` (which runs no meshd): its name, pod range and
    /// underlay address with a fresh key nobody holds, so the meshd nodes get a peer that never
    /// answers. Returns the key pair.
    pub fn write_ghost_record(&self, i: usize) -> Result<WgKeys> {
        let ghost = self.node(i);
        let keys = wg_genkey()?;
        self.registry.write_record(&RecordSpec {
            name: ghost.name.clone(),
            public_key: keys.public_key.clone(),
            endpoints: vec![format!("{}:{MESH_PORT}", ghost.underlay_ip)],
            pod_cidrs: vec![ghost.current_pod_cidr()],
            key_generation: 1,
        })?;
        Ok(keys)
    }

    /// Adds a pod to each of the first `n` nodes, starts meshd on them with `env` (default
    /// flags) and waits until they form a mesh (20 s). Returns the pods.
    pub fn start_mesh_env(&self, n: usize, env: &[(String, String)]) -> Result<Vec<Pod>> {
        let pods = (0..n)
            .map(|i| self.node(i).add_pod(0))
            .collect::<Result<Vec<_>>>()?;
        for i in 0..n {
            self.node(i).start_meshd_env(&[], env)?;
        }
        self.wait_mesh_ready(Duration::from_secs(20))?;
        Ok(pods)
    }

    /// The real keyctl binary on this cluster's dir registry, run in the switch namespace:
    /// (exit code, stdout, stderr). 60 s limit.
    pub fn keyctl(&self, args: &[&str]) -> Result<(Option<i32>, String, String)> {
        let bin = workspace_bin("keyctl")?;
        let sw = self
            .switch_ns
            .clone()
            .ok_or_else(|| anyhow!("no switch namespace"))?;
        let mut cmd = ns_cmd(&sw, bin);
        cmd.args(args)
            .args(["--registry", &self.registry.spec()])
            .env_remove("WEFT_REGISTRY");
        let out = run_timeout(&mut cmd, Duration::from_secs(60))?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Peer entries for a standard WireGuard node in node `me`: every other node that runs meshd
    /// (key from its status, else its registry record) or has a WireGuard device.
    pub fn wg_peers_for(&self, me: usize) -> Result<Vec<WgPeer>> {
        let mut v = Vec::new();
        for n in &self.nodes {
            if n.index == me {
                continue;
            }
            if n.meshd_running() || n.wg_ifname().is_some() {
                v.push(n.wg_peer()?);
            }
        }
        Ok(v)
    }

    /// Kills all processes and deletes all namespaces now (also done on drop).
    pub fn teardown(&mut self) {
        for n in &self.nodes {
            if let Ok(mut m) = n.meshd.lock() {
                if let Some(mut p) = m.take() {
                    p.terminate();
                }
            }
            if let Ok(mut w) = n.wg.lock() {
                if let Some(mut d) = w.take() {
                    d.proc.terminate();
                    let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", d.ifname));
                }
            }
        }
        let mine: Vec<String> = harness_namespaces()
            .into_iter()
            .filter(|n| n.starts_with(&format!("{}-", self.prefix)))
            .collect();
        // Pods first, then nodes and site routers, then the switch.
        let mut ordered = mine.clone();
        ordered.sort_by_key(|n| {
            let role = n.rsplit('-').next().unwrap_or("");
            (
                if role.contains('p') {
                    0
                } else if role == "sw" {
                    2
                } else {
                    1
                },
                n.clone(),
            )
        });
        for ns in ordered {
            destroy_namespace(&ns);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            eprintln!("weft-tests: test failed; cluster {} state:", self.prefix);
            for n in &self.nodes {
                let log = n.meshd_log_path();
                if log.exists() {
                    eprintln!(
                        "----- {} meshd log tail ({}):\n{}",
                        n.name,
                        log.display(),
                        tail(&log, 40)
                    );
                }
            }
        }
        self.teardown();
        let keep = self.opts.keep_tmp || panicking || std::env::var_os("WEFT_KEEP_TMP").is_some();
        if keep {
            eprintln!(
                "weft-tests: logs and captures kept in {}",
                self.tmp.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

fn sysctls(ns: &str, kv: &[&str]) -> Result<()> {
    let mut args = vec!["-qw"];
    args.extend_from_slice(kv);
    run_in(ns, "sysctl", &args).map(|_| ())
}

/// The peer object named `name` in a meshd status JSON.
pub fn peer_of<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["peers"]
        .as_array()?
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
}

/// Counter `name` of a part of a meshd status JSON (e.g. `offload`, one of `workers`);
/// panics when it is missing.
pub fn counter_of(part: &Value, name: &str) -> u64 {
    part.get(name)
        .and_then(|x| x.as_u64())
        .unwrap_or_else(|| panic!("no counter {name} in {part}"))
}

/// Device-wide drop counter `reason` from a meshd status JSON (0 when absent).
pub fn drops_of(status: &Value, reason: &str) -> u64 {
    status["drops"][reason].as_u64().unwrap_or(0)
}

impl Node {
    /// Part `key` of this node's meshd status JSON (`offload`, `workers`, ...); panics when
    /// the status cannot be read or lacks it.
    pub fn status_part(&self, key: &str) -> Value {
        let st = self.status_json().expect("status");
        st.get(key)
            .cloned()
            .unwrap_or_else(|| panic!("no {key} in status of {}: {st}", self.name))
    }

    // ---------------- pods ----------------

    /// Adds pod `k` with the cluster's pod MTU: namespace, veth, 10.42.(i+1).(10+k)/32, default
    /// via 169.254.1.1; /32 route and proxy ARP on the host side.
    pub fn add_pod(&self, k: usize) -> Result<Pod> {
        self.add_pod_mtu(k, self.pod_mtu)
    }

    /// [`Node::add_pod`] with an explicit MTU.
    pub fn add_pod_mtu(&self, k: usize, mtu: u32) -> Result<Pod> {
        if k > 200 {
            bail!("pod index too large");
        }
        let ns = format!("{}p{k}", self.ns);
        let net: ipnet::Ipv4Net = self.current_pod_cidr().parse().context("pod range")?;
        let ip = Ipv4Addr::from(u32::from(net.network()) + 10 + k as u32);
        if !net.contains(&ip) {
            bail!("pod {k} does not fit in {net}");
        }
        let host_if = format!("{}p{k}", self.short);
        let m = mtu.to_string();
        if ns_exists(&ns) {
            bail!("pod {k} already exists on {}", self.name);
        }
        run_args("ip", &["netns", "add", &ns])?;
        run_args(
            "ip",
            &[
                "-n", &self.ns, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ],
        )?;
        run_args("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        run_args("ip", &["-n", &ns, "link", "set", "eth0", "mtu", &m, "up"])?;
        run_args(
            "ip",
            &["-n", &ns, "addr", "add", &format!("{ip}/32"), "dev", "eth0"],
        )?;
        run_args(
            "ip",
            &[
                "-n",
                &ns,
                "route",
                "add",
                POD_GATEWAY,
                "dev",
                "eth0",
                "scope",
                "link",
            ],
        )?;
        run_args(
            "ip",
            &[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                POD_GATEWAY,
                "dev",
                "eth0",
            ],
        )?;
        run_args(
            "ip",
            &["-n", &self.ns, "link", "set", &host_if, "mtu", &m, "up"],
        )?;
        sysctls(
            &self.ns,
            &[
                &format!("net.ipv4.conf.{host_if}.proxy_arp=1"),
                &format!("net.ipv4.neigh.{host_if}.proxy_delay=0"),
                &format!("net.ipv4.conf.{host_if}.rp_filter=0"),
            ],
        )?;
        run_args(
            "ip",
            &[
                "-n",
                &self.ns,
                "route",
                "add",
                &format!("{ip}/32"),
                "dev",
                &host_if,
            ],
        )?;
        let pod = Pod {
            node_index: self.index,
            index: k,
            ns,
            node_ns: self.ns.clone(),
            ip,
            host_if,
            mtu,
        };
        if let Ok(mut p) = self.pods.lock() {
            p.push(pod.clone());
        }
        Ok(pod)
    }

    /// Pods added so far.
    pub fn pods(&self) -> Vec<Pod> {
        self.pods.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Pod `k` (added earlier).
    pub fn pod(&self, k: usize) -> Option<Pod> {
        self.pods().into_iter().find(|p| p.index == k)
    }

    // ---------------- commands in the node ----------------

    /// Runs a program inside the node namespace (fails on non-zero exit).
    pub fn exec(&self, prog: &str, args: &[&str]) -> Result<String> {
        run_in(&self.ns, prog, args)
    }

    /// Runs `ip ARGS` in the node namespace.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["-n", self.ns.as_str()];
        a.extend_from_slice(args);
        run_args("ip", &a)
    }

    pub fn ping(&self, dst: impl std::fmt::Display, opts: &PingOpts) -> Result<PingResult> {
        ping(&self.ns, &dst.to_string(), opts)
    }

    /// Adds `netem ARGS` (e.g. "delay 20ms loss 1%") as root qdisc of the node's underlay veth.
    /// Kernels without sch_netem (this development VM has none): a pure `loss N%` falls back to
    /// [`Node::set_loss`] (nftables); anything else fails with a clear error.
    pub fn netem(&self, args: &str) -> Result<()> {
        let mut a = vec![
            "qdisc",
            "replace",
            "dev",
            self.underlay_if.as_str(),
            "root",
            "netem",
        ];
        a.extend(args.split_whitespace());
        match self.exec("tc", &a) {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("qdisc kind is unknown") => {
                let words: Vec<&str> = args.split_whitespace().collect();
                if let ["loss", pct] = words.as_slice() {
                    let pct: f64 = pct
                        .trim_end_matches('%')
                        .parse()
                        .context("loss percentage")?;
                    return self.set_loss(pct);
                }
                bail!("tc netem is not available in this kernel (CONFIG_NET_SCH_NETEM); only `loss N%` can be emulated here (nftables): {e}")
            }
            Err(e) => Err(e),
        }
    }

    /// Whether the kernel supports `tc ... netem` (tried on the node's loopback).
    pub fn netem_supported(&self) -> bool {
        let ok = self
            .exec(
                "tc",
                &["qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms"],
            )
            .is_ok();
        if ok {
            let _ = self.exec("tc", &["qdisc", "del", "dev", "lo", "root"]);
        }
        ok
    }

    /// Drops `percent`% of packets leaving the node's underlay interface (random, nftables
    /// `numgen` in a postrouting chain, so both local and forwarded packets). 0 removes it.
    pub fn set_loss(&self, percent: f64) -> Result<()> {
        let _ = self.exec("nft", &["delete", "table", "inet", "wtimpair"]);
        if percent <= 0.0 {
            return Ok(());
        }
        let n = ((percent * 100.0).round() as u64).min(10_000);
        let script = format!(
            "table inet wtimpair {{\n  chain post {{\n    type filter hook postrouting priority 0; policy accept;\n    \
             oifname \"{}\" {}drop\n  }}\n}}\n",
            self.underlay_if,
            if n >= 10_000 { String::new() } else { format!("numgen random mod 10000 < {n} ") }
        );
        let f = self.dir.join("impair.nft");
        std::fs::write(&f, script)?;
        self.exec("nft", &["-f", &f.display().to_string()])
            .map(|_| ())
    }

    /// Removes netem and nftables impairments.
    pub fn clear_netem(&self) {
        let _ = self.exec("tc", &["qdisc", "del", "dev", &self.underlay_if, "root"]);
        let _ = self.exec("nft", &["delete", "table", "inet", "wtimpair"]);
    }

    // ---------------- meshd ----------------

    pub fn meshd_log_path(&self) -> PathBuf {
        self.dir.join("meshd.log")
    }

    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("meshd.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The default `meshd run` arguments of this node (see the crate docs).
    pub fn meshd_default_args(&self) -> Vec<(String, String)> {
        vec![
            ("--node-name".into(), self.name.clone()),
            ("--registry".into(), self.registry.spec()),
            ("--interface".into(), "weft0".into()),
            ("--listen-port".into(), MESH_PORT.to_string()),
            (
                "--endpoint".into(),
                format!("{}:{MESH_PORT}", self.underlay_ip),
            ),
            ("--pod-cidr".into(), self.current_pod_cidr()),
            ("--cluster-cidr".into(), CLUSTER_CIDR.into()),
            ("--state-dir".into(), self.state_dir().display().to_string()),
            (
                "--api-socket".into(),
                self.api_socket().display().to_string(),
            ),
            ("--log-format".into(), "text".into()),
            // Every node's interface is weft0: each gets its own WireGuard UAPI directory (see
            // `Node::wg` to run `wg` against it).
            (
                "--wg-uapi-dir".into(),
                self.wg_uapi_dir().display().to_string(),
            ),
        ]
    }

    /// This node's `--wg-uapi-dir` (meshd's `weft0.sock` is in it).
    pub fn wg_uapi_dir(&self) -> PathBuf {
        self.dir.join("wireguard")
    }

    /// Runs Debian's `wg ARGS` against this node's meshd: in a private mount namespace with
    /// the node's UAPI directory bind-mounted on /var/run/wireguard (where `wg` looks).
    /// Returns (exit ok, stdout, stderr). 10 s limit.
    pub fn wg(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let quoted: Vec<String> = args
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
            .collect();
        let script = format!(
            "mkdir -p /var/run/wireguard && mount --bind '{}' /var/run/wireguard && exec wg {}",
            self.wg_uapi_dir().display(),
            quoted.join(" ")
        );
        let mut cmd = std::process::Command::new("unshare");
        cmd.args(["-m", "--propagation", "private", "sh", "-c", &script]);
        let out = crate::util::run_timeout(&mut cmd, Duration::from_secs(10))
            .with_context(|| format!("wg {args:?} on {}", self.name))?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    fn meshd_argv(&self, extra: &[String]) -> Vec<String> {
        let mut v = vec!["run".to_string()];
        let claiming = self.claiming.load(std::sync::atomic::Ordering::Relaxed);
        let omitted = self.omitted.lock().map(|o| o.clone()).unwrap_or_default();
        for (k, val) in self.meshd_default_args() {
            if claiming && k == "--pod-cidr" || omitted.contains(&k) {
                continue;
            }
            let overridden = extra
                .iter()
                .any(|e| e == &k || e.starts_with(&format!("{k}=")));
            if !overridden {
                v.push(k);
                v.push(val);
            }
        }
        v.extend(extra.iter().cloned());
        v
    }

    /// Starts `meshd run` in the node namespace with the default arguments (an `extra` flag that
    /// also has a default replaces it) and waits until its API answers `status` (15 s).
    pub fn start_meshd(&self, extra: &[&str]) -> Result<()> {
        self.spawn_meshd(extra)?;
        self.wait_meshd_api(Duration::from_secs(15))
    }

    /// Starts meshd without `--pod-cidr` (it claims a range through the registry), waits for its
    /// API and returns the claimed range; from then on [`Node::current_pod_cidr`] /
    /// [`Node::current_mesh_ip`] (and pods added later) use it. Later restarts also claim.
    pub fn start_meshd_claiming(&self, extra: &[&str]) -> Result<String> {
        self.claiming
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut c) = self.claimed.lock() {
            *c = None;
        }
        self.start_meshd(extra)?;
        self.refresh_claimed()
    }

    /// From the next start on, meshd runs without these default flags (for example `--endpoint`
    /// and `--pod-cidr`, which `--registry kube` takes from the Node object). With
    /// `--pod-cidr` among them, read the range meshd chose with [`Node::refresh_claimed`].
    pub fn omit_default_args(&self, flags: &[&str]) {
        if let Ok(mut o) = self.omitted.lock() {
            *o = flags.iter().map(|f| f.to_string()).collect();
        }
        if flags.contains(&"--pod-cidr") {
            self.set_claiming(true);
        }
    }

    /// From the next start on, meshd runs without `--pod-cidr` (it claims a range); after it is
    /// up, [`Node::refresh_claimed`] reads the range. `false` goes back to the fixed range.
    pub fn set_claiming(&self, on: bool) {
        self.claiming
            .store(on, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut c) = self.claimed.lock() {
            *c = None;
        }
    }

    /// [`Node::start_meshd_claiming`] without waiting for the API or reading the range (for many
    /// nodes started at the same moment); call [`Node::wait_meshd_api`] and
    /// [`Node::refresh_claimed`] after.
    pub fn spawn_meshd_claiming(&self, extra: &[&str]) -> Result<()> {
        self.claiming
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut c) = self.claimed.lock() {
            *c = None;
        }
        self.spawn_meshd(extra)
    }

    /// Reads the pod range meshd runs with (from `status`) into [`Node::current_pod_cidr`].
    pub fn refresh_claimed(&self) -> Result<String> {
        let st = self.status_json()?;
        let cidr = st["node"]["podCidrs"][0]
            .as_str()
            .ok_or_else(|| anyhow!("status has no podCidrs: {st}"))?
            .to_string();
        let net: ipnet::Ipv4Net = cidr.parse().context("claimed range")?;
        let mesh = net
            .hosts()
            .next()
            .ok_or_else(|| anyhow!("{cidr} has no host"))?;
        if let Ok(mut c) = self.claimed.lock() {
            *c = Some((cidr.clone(), mesh));
        }
        Ok(cidr)
    }

    /// This node's pod range: the one meshd claimed, else the fixed 10.42.(i+1).0/24.
    pub fn current_pod_cidr(&self) -> String {
        self.claimed
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|(n, _)| n.clone()))
            .unwrap_or_else(|| self.pod_cidr.clone())
    }

    /// This node's mesh address: the first host of [`Node::current_pod_cidr`].
    pub fn current_mesh_ip(&self) -> Ipv4Addr {
        self.claimed
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|(_, m)| *m))
            .unwrap_or(self.mesh_ip)
    }

    /// [`Node::start_meshd`] with extra environment variables for meshd (such as
    /// `WEFT_ETCD_USERNAME` / `WEFT_ETCD_PASSWORD`), also used by [`Node::restart_meshd`].
    pub fn start_meshd_env(&self, extra: &[&str], env: &[(String, String)]) -> Result<()> {
        if let Ok(mut e) = self.meshd_env.lock() {
            *e = env.to_vec();
        }
        self.start_meshd(extra)
    }

    /// Starts meshd without waiting for its API (with the environment of the last
    /// [`Node::start_meshd_env`], if any).
    pub fn spawn_meshd(&self, extra: &[&str]) -> Result<()> {
        let bin = workspace_bin("meshd")?;
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut guard = self.meshd.lock().map_err(|_| anyhow!("poisoned"))?;
        if let Some(p) = guard.as_mut() {
            if p.running() {
                bail!("meshd already running on {}", self.name);
            }
        }
        let mut cmd = crate::util::ns_cmd(&self.ns, &bin);
        cmd.args(self.meshd_argv(&extra));
        cmd.env("RUST_BACKTRACE", "1");
        if let Ok(env) = self.meshd_env.lock() {
            cmd.envs(env.iter().map(|(k, v)| (k, v)));
        }
        let p = Proc::spawn_logged(
            &format!("meshd {}", self.name),
            &mut cmd,
            Some(&self.meshd_log_path()),
        )?;
        *guard = Some(p);
        if let Ok(mut e) = self.meshd_extra.lock() {
            *e = extra;
        }
        Ok(())
    }

    /// Waits until `meshd status` answers; fails early (with the log tail) if meshd exits.
    pub fn wait_meshd_api(&self, timeout: Duration) -> Result<()> {
        let mut last_err = String::new();
        let ok = wait_until(timeout, || {
            if !self.meshd_running() {
                return true;
            }
            match self.status_json() {
                Ok(_) => true,
                Err(e) => {
                    last_err = format!("{e:#}");
                    false
                }
            }
        });
        if !self.meshd_running() {
            let st = self
                .meshd
                .lock()
                .ok()
                .and_then(|mut g| g.as_mut().and_then(Proc::exit_status));
            bail!(
                "meshd on {} exited ({st:?}); log tail:\n{}",
                self.name,
                tail(&self.meshd_log_path(), 40)
            );
        }
        if !ok {
            bail!(
                "meshd on {} did not answer status within {timeout:?} ({last_err}); log tail:\n{}",
                self.name,
                tail(&self.meshd_log_path(), 40)
            );
        }
        Ok(())
    }

    /// Whether meshd (started by the harness) is running.
    pub fn meshd_running(&self) -> bool {
        self.meshd
            .lock()
            .ok()
            .and_then(|mut g| g.as_mut().map(Proc::running))
            .unwrap_or(false)
    }

    /// meshd's pid.
    pub fn meshd_pid(&self) -> Option<u32> {
        self.meshd
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(Proc::pid))
    }

    /// Sends `signal` (libc::SIGTERM, SIGKILL, ...) and waits up to 10 s for meshd to exit
    /// (then SIGKILL and an error). Returns the exit status.
    pub fn stop_meshd(&self, signal: i32) -> Result<Option<ExitStatus>> {
        let p = self.meshd.lock().map_err(|_| anyhow!("poisoned"))?.take();
        match p {
            None => Ok(None),
            Some(mut p) => {
                let r = p.stop(signal, Duration::from_secs(10));
                r.map(Some)
            }
        }
    }

    /// SIGTERM, then start again with the same arguments (same state dir); waits for the API.
    pub fn restart_meshd(&self) -> Result<()> {
        self.stop_meshd(libc::SIGTERM)?;
        let extra = self
            .meshd_extra
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default();
        let refs: Vec<&str> = extra.iter().map(String::as_str).collect();
        self.start_meshd(&refs)
    }

    /// Runs `meshd ARGS` (a CLI subcommand) in the node namespace; returns (success, stdout,
    /// stderr). 10 s limit.
    pub fn meshd_cli(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let bin = workspace_bin("meshd")?;
        let mut cmd = crate::util::ns_cmd(&self.ns, &bin);
        cmd.args(args);
        let out = run_timeout(&mut cmd, Duration::from_secs(10))?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// `meshd status --json --api-socket PATH`, parsed.
    pub fn status_json(&self) -> Result<Value> {
        meshd_status_at(&self.ns, &self.api_socket())
            .with_context(|| format!("meshd status on {}", self.name))
    }

    /// The status entry of peer `name`.
    pub fn status_peer(&self, name: &str) -> Result<Option<Value>> {
        Ok(peer_of(&self.status_json()?, name).cloned())
    }

    /// Names of the peers in status.
    pub fn status_peer_names(&self) -> Result<Vec<String>> {
        Ok(status_peer_names_of(&self.status_json()?))
    }

    /// `meshd leave --api-socket PATH`.
    pub fn meshd_leave(&self) -> Result<()> {
        let sock = self.api_socket().display().to_string();
        let (ok, _, err) = self.meshd_cli(&["leave", "--api-socket", &sock])?;
        if !ok {
            bail!("meshd leave failed: {}", err.trim());
        }
        Ok(())
    }

    /// The meshd log so far.
    pub fn meshd_log(&self) -> String {
        std::fs::read_to_string(self.meshd_log_path()).unwrap_or_default()
    }

    /// This node's public key: from meshd status, else its WireGuard device, else its registry
    /// record.
    pub fn public_key(&self) -> Result<String> {
        if self.meshd_running() {
            if let Ok(st) = self.status_json() {
                if let Some(k) = st["node"]["publicKey"].as_str() {
                    return Ok(k.to_string());
                }
            }
        }
        if let Some(k) = self
            .wg
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|d| d.public_key.clone()))
        {
            return Ok(k);
        }
        let r = self.registry.read_record(&self.name)?;
        r["publicKey"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| anyhow!("record of {} has no publicKey", self.name))
    }

    /// How a standard WireGuard peer should see this node: its key, underlay endpoint (meshd's
    /// port, or the wg device's listen port) and pod CIDR.
    pub fn wg_peer(&self) -> Result<WgPeer> {
        let port = self
            .wg
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|d| d.listen_port))
            .unwrap_or(MESH_PORT);
        Ok(WgPeer {
            public_key: self.public_key()?,
            endpoint: Some(format!("{}:{port}", self.underlay_ip)),
            allowed_ips: vec![self.pod_cidr.clone()],
            persistent_keepalive: None,
        })
    }

    // ---------------- standard WireGuard (wireguard-go / boringtun-cli) ----------------

    /// Runs Debian's wireguard-go in this node: TUN `wt<id>g<i>`, key, port, peers, address
    /// 10.42.(i+1).1/32 and a route per peer allowed-ip. Returns the interface name.
    pub fn start_wireguard_go(
        &self,
        private_key: &str,
        listen_port: u16,
        peers: &[WgPeer],
    ) -> Result<String> {
        self.start_wg(WgImpl::WireguardGo, private_key, listen_port, peers)
    }

    /// Like [`Node::start_wireguard_go`] for either implementation.
    pub fn start_wg(
        &self,
        kind: WgImpl,
        private_key: &str,
        listen_port: u16,
        peers: &[WgPeer],
    ) -> Result<String> {
        let mut guard = self.wg.lock().map_err(|_| anyhow!("poisoned"))?;
        if guard.is_some() {
            bail!("a WireGuard device already runs on {}", self.name);
        }
        let (ifname, proc) = self.spawn_wg(kind)?;
        let public_key = wg_pubkey(private_key)?;
        let keyfile = self.dir.join(format!("{ifname}.key"));
        write_secret(&keyfile, private_key)?;
        let kf = keyfile.display().to_string();
        let port = listen_port.to_string();
        // Private key first, peers in separate calls (boringtun panics on a peer before the key).
        self.exec(
            "wg",
            &["set", &ifname, "private-key", &kf, "listen-port", &port],
        )?;
        *guard = Some(WgDevice {
            kind,
            ifname: ifname.clone(),
            public_key,
            listen_port,
            proc,
        });
        drop(guard);
        self.ip(&[
            "link",
            "set",
            &ifname,
            "mtu",
            &self.pod_mtu.to_string(),
            "up",
        ])?;
        self.ip(&[
            "addr",
            "add",
            &format!("{}/32", self.mesh_ip),
            "dev",
            &ifname,
        ])?;
        for p in peers {
            self.wg_set_peer(p)?;
        }
        Ok(ifname)
    }

    /// Runs a standard WireGuard device configured like `wg-quick up` would from a wg-quick
    /// config (such as the one `keyctl peer add` prints, with its private key filled in): see
    /// [`Node::wg_quick_apply`]. Returns the interface name.
    pub fn start_wg_quick(&self, kind: WgImpl, conf: &str) -> Result<String> {
        let private_key = wg_quick_values(conf, "PrivateKey")
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("the config has no PrivateKey"))?;
        let public_key = wg_pubkey(&private_key)?;
        let listen_port = wg_quick_values(conf, "ListenPort")
            .first()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        {
            let mut guard = self.wg.lock().map_err(|_| anyhow!("poisoned"))?;
            if guard.is_some() {
                bail!("a WireGuard device already runs on {}", self.name);
            }
            let (ifname, proc) = self.spawn_wg(kind)?;
            *guard = Some(WgDevice {
                kind,
                ifname,
                public_key,
                listen_port,
                proc,
            });
        }
        let ifname = self
            .wg_ifname()
            .ok_or_else(|| anyhow!("no WireGuard device"))?;
        self.ip(&[
            "link",
            "set",
            &ifname,
            "mtu",
            &self.pod_mtu.to_string(),
            "up",
        ])?;
        self.wg_quick_apply(conf)?;
        Ok(ifname)
    }

    /// Applies a wg-quick config to the running device as `wg-quick` would: `wg-quick strip`
    /// (drops `Address` and the other wg-quick-only fields), `wg setconf` with the result
    /// (replacing every peer), then the `Address`es on the interface and a route per peer
    /// `AllowedIPs` entry through it (both replacing what was there).
    pub fn wg_quick_apply(&self, conf: &str) -> Result<()> {
        let ifname = self
            .wg_ifname()
            .ok_or_else(|| anyhow!("no WireGuard device on {}", self.name))?;
        // wg-quick names the interface after the file.
        let path = self.dir.join(format!("{ifname}.conf"));
        write_secret(&path, conf)?;
        let stripped = run_args("wg-quick", &["strip", &path.display().to_string()])
            .context("wg-quick strip (wireguard-tools)")?;
        let stripped_path = self.dir.join(format!("{ifname}.stripped.conf"));
        write_secret(&stripped_path, &stripped)?;
        self.exec(
            "wg",
            &["setconf", &ifname, &stripped_path.display().to_string()],
        )?;
        self.ip(&["addr", "flush", "dev", &ifname])?;
        for a in wg_quick_values(conf, "Address") {
            self.ip(&["addr", "add", &a, "dev", &ifname])?;
        }
        self.ip(&["route", "flush", "dev", &ifname])?;
        for a in wg_quick_values(conf, "AllowedIPs") {
            self.ip(&["route", "replace", &a, "dev", &ifname])?;
        }
        Ok(())
    }

    /// Starts the wireguard-go / boringtun process of a standard device and waits for its UAPI
    /// socket. The caller configures it.
    fn spawn_wg(&self, kind: WgImpl) -> Result<(String, Proc)> {
        let (letter, log) = match kind {
            WgImpl::WireguardGo => ('g', self.dir.join("wireguard-go.log")),
            WgImpl::Boringtun => ('b', self.dir.join("boringtun.log")),
        };
        let ifname = format!("{}{letter}{}", self.short, self.index);
        let sock = PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
        let _ = std::fs::remove_file(&sock);
        let mut cmd = match kind {
            WgImpl::WireguardGo => {
                let mut c = crate::util::ns_cmd(&self.ns, "wireguard-go");
                c.args(["-f", &ifname]).env("WG_PROCESS_FOREGROUND", "1");
                c
            }
            WgImpl::Boringtun => {
                let bin = find_program("boringtun-cli").ok_or_else(|| {
                    anyhow!("boringtun-cli not found (scripts/install-test-deps.sh installs it)")
                })?;
                let mut c = crate::util::ns_cmd(&self.ns, bin);
                c.args(["-f", "--disable-drop-privileges", "-l"])
                    .arg(self.dir.join("boringtun-internal.log"))
                    .arg(&ifname)
                    .env("WG_SUDO", "1");
                c
            }
        };
        let mut proc =
            Proc::spawn_logged(&format!("{kind:?} {}", self.name), &mut cmd, Some(&log))?;
        let up = wait_until(Duration::from_secs(10), || sock.exists() || !proc.running());
        if !up || !proc.running() {
            bail!(
                "{kind:?} on {} did not create {} ; log:\n{}",
                self.name,
                sock.display(),
                tail(&log, 20)
            );
        }
        Ok((ifname, proc))
    }

    /// Adds or updates a peer on the node's standard WireGuard device and routes its allowed IPs
    /// to the device.
    pub fn wg_set_peer(&self, p: &WgPeer) -> Result<()> {
        let ifname = self
            .wg_ifname()
            .ok_or_else(|| anyhow!("no WireGuard device on {}", self.name))?;
        let mut args: Vec<String> = vec![
            "set".into(),
            ifname.clone(),
            "peer".into(),
            p.public_key.clone(),
        ];
        if let Some(e) = &p.endpoint {
            args.extend(["endpoint".into(), e.clone()]);
        }
        args.extend(["allowed-ips".into(), p.allowed_ips.join(",")]);
        if let Some(k) = p.persistent_keepalive {
            args.extend(["persistent-keepalive".into(), k.to_string()]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.exec("wg", &refs)?;
        for a in &p.allowed_ips {
            self.ip(&["route", "replace", a, "dev", &ifname])?;
        }
        Ok(())
    }

    /// Interface name of the node's standard WireGuard device.
    pub fn wg_ifname(&self) -> Option<String> {
        self.wg
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|d| d.ifname.clone()))
    }

    /// Pid of the process behind the node's standard WireGuard device (wireguard-go or
    /// boringtun-cli; `ip netns exec` execs it, so the pid is the implementation's own).
    pub fn wg_pid(&self) -> Option<u32> {
        self.wg
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|d| d.proc.pid()))
    }

    /// `wg show IF latest-handshakes` as (public key, unix time; 0 = never).
    pub fn wg_latest_handshakes(&self) -> Result<Vec<(String, u64)>> {
        let ifname = self
            .wg_ifname()
            .ok_or_else(|| anyhow!("no WireGuard device"))?;
        let out = self.exec("wg", &["show", &ifname, "latest-handshakes"])?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((it.next()?.to_string(), it.next()?.parse().ok()?))
            })
            .collect())
    }

    /// Stops the standard WireGuard device.
    pub fn stop_wg(&self) {
        if let Some(mut d) = self.wg.lock().ok().and_then(|mut g| g.take()) {
            d.proc.terminate();
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", d.ifname));
        }
    }

    /// Address of pod `k` of this node (whether or not it exists).
    pub fn pod_ip(&self, k: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 42, self.index as u8 + 1, 10 + k as u8)
    }

    /// Waits until `f(status)` holds for this node's meshd status.
    pub fn wait_status(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        let mut last = Value::Null;
        let r = wait_for(timeout, || {
            let st = self.status_json().ok()?;
            let ok = f(&st);
            last = st.clone();
            ok.then_some(st)
        });
        r.ok_or_else(|| {
            anyhow!(
                "status condition not met on {} within {timeout:?}; last status: {last}",
                self.name
            )
        })
    }
}

/// Every value of `KEY = VALUE` lines named `key` in a wg-quick config (comma-separated values
/// split, comments ignored), in order.
pub fn wg_quick_values(conf: &str, key: &str) -> Vec<String> {
    conf.lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case(key))
        .flat_map(|(_, v)| {
            v.split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn write_secret(path: &Path, s: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    writeln!(f, "{s}")?;
    Ok(())
}

/// Runs a command and returns stdout (re-export for tests that need odd commands).
pub fn cmd(c: &mut Command) -> Result<String> {
    run(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn naming_schemes() {
        assert!(is_harness_ns("wt-1234-0-sw"));
        assert!(is_harness_ns("wt-1234-12-n0p3"));
        assert!(is_harness_ns("wt-1234-12-r3"));
        assert!(!is_harness_ns("wt-abc-0-sw"));
        assert!(!is_harness_ns("wt-1234-sw"));
        assert!(!is_harness_ns("weft-1234-0-sw"));
        assert!(is_harness_tun_sock("wt0a1fg0.sock"));
        assert!(is_harness_tun_sock("wt0a1fb12.sock"));
        assert!(!is_harness_tun_sock("wg0.sock"));
        assert!(!is_harness_tun_sock("wtzzzzg0.sock"));
    }

    #[test]
    fn meshd_args_override() {
        let n = Node {
            index: 1,
            name: "node-1".into(),
            ns: "x".into(),
            underlay_ip: Ipv4Addr::new(198, 18, 0, 11),
            underlay_if: "eth0".into(),
            pod_cidr: "10.42.2.0/24".into(),
            mesh_ip: Ipv4Addr::new(10, 42, 2, 1),
            dir: PathBuf::from("/tmp/x/node-1"),
            registry: Registry {
                dir: PathBuf::from("/tmp/x/registry"),
            },
            short: "wt0000".into(),
            pod_mtu: 1420,
            pods: Mutex::new(Vec::new()),
            meshd: Mutex::new(None),
            meshd_extra: Mutex::new(Vec::new()),
            meshd_env: Mutex::new(Vec::new()),
            wg: Mutex::new(None),
            claiming: Default::default(),
            claimed: Mutex::new(None),
            omitted: Mutex::new(Vec::new()),
        };
        let v = n.meshd_argv(&[
            "--listen-port".into(),
            "51999".into(),
            "--mtu".into(),
            "1300".into(),
        ]);
        let s = v.join(" ");
        assert!(
            s.starts_with("run --node-name node-1 --registry dir:/tmp/x/registry"),
            "{s}"
        );
        assert!(!s.contains("--listen-port 51820"), "{s}");
        assert!(s.contains("--listen-port 51999"), "{s}");
        assert!(s.contains("--endpoint 198.18.0.11:51820"), "{s}");
        assert!(s.contains("--pod-cidr 10.42.2.0/24"), "{s}");
    }
}
