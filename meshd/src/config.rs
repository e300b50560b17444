//! Flags of `meshd run`, each also read from `WEFT_<FLAG>`, and their validation.
//!
//! Everything is checked here before any socket, TUN or route exists; a bad value exits 64
//! with a message naming the flag.

use clap::Args;
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use weft_core::record::check_name;

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// This node's name (a lowercase DNS name). Default: `NODE_NAME` (the downward API in the
    /// DaemonSet), else the hostname.
    #[arg(long, env = "WEFT_NODE_NAME")]
    pub node_name: Option<String>,
    /// Where node records live: dir:PATH (a directory shared by all nodes),
    /// etcd://HOST:PORT[,HOST:PORT...] (etcds:// or --etcd-ca for TLS; user and password from
    /// WEFT_ETCD_USERNAME / WEFT_ETCD_PASSWORD) or kube (the Kubernetes API server: custom
    /// resources of group weft.dev; see --kubeconfig and --kube-api-server).
    #[arg(
        long,
        env = "WEFT_REGISTRY",
        default_value = "dir:/var/lib/weft/registry"
    )]
    pub registry: String,
    /// Name of the TUN interface.
    #[arg(long, env = "WEFT_INTERFACE", default_value = "weft0")]
    pub interface: String,
    /// UDP port for WireGuard.
    #[arg(long, env = "WEFT_LISTEN_PORT", default_value_t = 51820)]
    pub listen_port: u16,
    /// Public underlay address other nodes reach this one at, IP[:PORT]; repeat for several,
    /// tried in order. Nodes of other locations use these. Default: the address of the
    /// interface holding the default route (none with --behind-nat).
    #[arg(long = "endpoint", env = "WEFT_ENDPOINT", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// This node's location (cloud region, site). Nodes of one location reach each other on
    /// their --private-endpoint addresses, other nodes on --endpoint.
    #[arg(long, env = "WEFT_LOCATION")]
    pub location: Option<String>,
    /// Private underlay address, IP[:PORT], for the nodes of this --location only; repeat for
    /// several. Default with --location: the default-route address, unless it is an --endpoint.
    #[arg(
        long = "private-endpoint",
        env = "WEFT_PRIVATE_ENDPOINT",
        value_delimiter = ','
    )]
    pub private_endpoints: Vec<String>,
    /// This node is behind NAT: it publishes no public endpoint; it reaches the nodes it can
    /// (other locations' public endpoints), they learn its address from its packets, and those
    /// links send a keepalive every --nat-keepalive to keep the NAT mapping open.
    #[arg(long, env = "WEFT_BEHIND_NAT")]
    pub behind_nat: bool,
    /// Keepalive interval (seconds, 1-3600) on links this node reaches through NAT.
    #[arg(long, env = "WEFT_NAT_KEEPALIVE", default_value_t = 25)]
    pub nat_keepalive: u16,
    /// Find paths through NAT and fall back to relays: ping peers and relays, punch holes
    /// between nodes behind NAT, send through a relay node when no direct path works. The
    /// MTU leaves room for the relay header (44 bytes). Every node of a mesh should agree.
    #[arg(long, env = "WEFT_USE_RELAYS")]
    pub use_relays: bool,
    /// Relay for mesh members whose direct paths fail (needs a public --endpoint). Implies
    /// --use-relays.
    #[arg(long, env = "WEFT_RELAY")]
    pub relay: bool,
    /// This node's pod range: one IPv4 and optionally one IPv6 CIDR. Absent: a block of
    /// --node-cidr-size is claimed from the first IPv4 --cluster-cidr through the registry (and
    /// kept across restarts).
    #[arg(long = "pod-cidr", env = "WEFT_POD_CIDR", value_delimiter = ',')]
    pub pod_cidrs: Vec<String>,
    /// Without --pod-cidr: prefix length of the block this node claims (24 for a /24).
    #[arg(long, env = "WEFT_NODE_CIDR_SIZE", default_value_t = 24)]
    pub node_cidr_size: u8,
    /// Without --pod-cidr: how long a block's owner must have been gone (no record, no renewal)
    /// before another node may take the block when no free one is left, e.g. 24h, 90m, 30s.
    #[arg(long, env = "WEFT_CIDR_RECLAIM_AFTER", default_value = "24h")]
    pub cidr_reclaim_after: String,
    /// The whole cluster's pod ranges; kept unreachable (fail closed) outside the mesh routes.
    #[arg(
        long = "cluster-cidr",
        env = "WEFT_CLUSTER_CIDR",
        value_delimiter = ',',
        default_value = "10.42.0.0/16"
    )]
    pub cluster_cidrs: Vec<String>,
    /// Holds private.key (created 0600 if absent, reused on restart).
    #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft")]
    pub state_dir: PathBuf,
    /// Unix socket for `meshd status` and `meshd leave`.
    #[arg(long, env = "WEFT_API_SOCKET", default_value = "/run/weft/meshd.sock")]
    pub api_socket: PathBuf,
    /// Directory of the WireGuard userspace API socket `IFNAME.sock` that `wg show` and
    /// WireGuard exporters read (read-only: `wg set` is refused); `off`: no socket.
    #[arg(long, env = "WEFT_WG_UAPI_DIR", default_value = "/var/run/wireguard")]
    pub wg_uapi_dir: String,
    /// MTU of the TUN and of pods. Default: the underlay MTU minus 80.
    #[arg(long, env = "WEFT_MTU")]
    pub mtu: Option<u32>,
    /// Send a keepalive every SECS seconds (for nodes behind NAT); 0 or absent: off.
    #[arg(long, env = "WEFT_PERSISTENT_KEEPALIVE")]
    pub persistent_keepalive: Option<u16>,
    /// Rotate this node's key by itself once it is older than this (e.g. 30d, 12h); absent or
    /// 0: only when `keyctl rotate` asks.
    #[arg(long, env = "WEFT_KEY_MAX_AGE")]
    pub key_max_age: Option<String>,
    /// File holding the cluster secret (32 bytes in base64, e.g. from `wg genpsk`), the same on
    /// every node; in Kubernetes a Secret mounted into the DaemonSet. With it, every pair of
    /// nodes uses a WireGuard PSK derived from it (`keyctl psk rotate` changes them all). It
    /// must not be readable by group or others. It never enters the registry.
    #[arg(long, env = "WEFT_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// With --cluster-secret-file: a missing file means "no cluster PSK" (logged) instead of an
    /// error, for a DaemonSet whose Secret volume is optional. A file that exists is checked
    /// as always.
    #[arg(long, env = "WEFT_CLUSTER_SECRET_OPTIONAL")]
    pub cluster_secret_optional: bool,
    /// Where the sysctl tree is (meshd turns on IP forwarding there when it is off): /proc/sys,
    /// or in an unprivileged container the host's mounted writable, e.g. /host/proc/sys.
    #[arg(long, env = "WEFT_PROC_SYS_DIR", default_value = "/proc/sys")]
    pub proc_sys_dir: PathBuf,
    /// Masquerade pod traffic leaving the cluster ranges (to the node's address): meshd writes
    /// nftables table `weft` over netlink once at start (no `nft` binary needed). Then the
    /// CNI plugin need not (`meshd install-cni --ip-masq false`).
    #[arg(long, env = "WEFT_MASQUERADE")]
    pub masquerade: bool,
    /// Kubernetes NetworkPolicy enforcement: `auto` (on with `--registry kube`), `on` or
    /// `off`. meshd watches Pods, Namespaces and NetworkPolicies and writes nftables table
    /// `inet weft-policy` over netlink (no `nft` binary needed).
    #[arg(long, env = "WEFT_NETWORK_POLICY", default_value = "auto")]
    pub network_policy: String,
    /// Keep established connections a policy change now denies (by default their conntrack
    /// entries are removed, so they stop within a second).
    #[arg(long, env = "WEFT_KEEP_ESTABLISHED_FLOWS")]
    pub keep_established_flows: bool,
    /// TUN offloads: `on` (TSO/USO super-packets from the kernel, segmented by meshd, and
    /// received TCP segments coalesced before they go to the kernel; each falls back when the
    /// kernel lacks it) or `off` (one plain packet per read and write).
    #[arg(long, env = "WEFT_OFFLOAD", default_value = "on")]
    pub offload: String,
    /// Data-path workers: `auto` (one per CPU meshd may run on, at most 16) or a number from 1
    /// to 64. Each worker is a thread with its own TUN queue (`IFF_MULTI_QUEUE`) and UDP socket
    /// (`SO_REUSEPORT`); every peer's encryption state lives in one worker's shard.
    #[arg(long, env = "WEFT_WORKERS", default_value = "auto")]
    pub workers: String,
    /// Log format: text or json.
    #[arg(long, env = "WEFT_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// A warning that repeats for the same peer or record (a peer that does not answer, a
    /// refused record) gets one line per this many seconds (1-86400), carrying the count of
    /// those held back as `repeated`.
    #[arg(long, env = "WEFT_LOG_REPEAT_INTERVAL", default_value_t = 60)]
    pub log_repeat_interval: u64,
    /// etcd registry: key prefix; records live at PREFIX/nodes/NAME.
    #[arg(long, env = "WEFT_ETCD_PREFIX", default_value = "/weft")]
    pub etcd_prefix: String,
    /// etcd registry: CA bundle (PEM) to verify etcd with; turns on TLS.
    #[arg(long, env = "WEFT_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// etcd registry: client certificate (PEM) for mutual TLS; needs --etcd-key and --etcd-ca.
    #[arg(long, env = "WEFT_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// etcd registry: client key (PEM) for mutual TLS; needs --etcd-cert.
    #[arg(long, env = "WEFT_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// etcd registry: TTL in seconds of the lease this node's record is bound to (kept alive
    /// while meshd runs; the record disappears this long after meshd dies).
    #[arg(long, env = "WEFT_ETCD_LEASE_TTL", default_value_t = 60)]
    pub etcd_lease_ttl: u64,
    /// kube registry: a kubeconfig file. Absent: KUBECONFIG, else the in-cluster ServiceAccount
    /// token (the DaemonSet's).
    #[arg(long, env = "WEFT_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// kube registry: the API server's real address, https://HOST:PORT, replacing the
    /// kubeconfig's or the in-cluster one (the `kubernetes` Service IP may not route before the
    /// network plugin is up).
    #[arg(long, env = "WEFT_KUBE_API_SERVER")]
    pub kube_api_server: Option<String>,
    /// Serve /healthz (liveness) and /readyz (TUN up, routes installed, registry synced) over
    /// HTTP on ADDR:PORT, for the kubelet's probes. Absent: off.
    #[arg(long, env = "WEFT_HEALTH_LISTEN")]
    pub health_listen: Option<String>,
    /// Serve Prometheus metrics (OpenMetrics text) at GET /metrics on ADDR:PORT. Absent: off.
    /// The DaemonSet serves them on the node IP, port 9473.
    #[arg(long, env = "WEFT_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
}

/// Settings of the kube registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeConfig {
    pub kubeconfig: Option<PathBuf>,
    pub api_server: Option<String>,
}

impl KubeConfig {
    /// The registry options for node `node` (owner of what it writes), field manager `meshd`.
    pub fn options(&self, node: &str) -> weft_registry::KubeOptions {
        weft_registry::KubeOptions {
            kubeconfig: self.kubeconfig.clone(),
            api_server: self.api_server.clone(),
            node: Some(node.to_string()),
            ..weft_registry::KubeOptions::default()
        }
    }
}

/// Settings of the etcd registry (unused with dir:). The user name and password are not here:
/// they are read from the environment when the registry is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    pub prefix: String,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub lease_ttl_secs: u64,
}

impl EtcdConfig {
    /// The registry options: these settings plus the credentials from the environment.
    pub fn options(&self) -> weft_registry::EtcdOptions {
        weft_registry::EtcdOptions {
            prefix: self.prefix.clone(),
            ca_file: self.ca.clone(),
            cert_file: self.cert.clone(),
            key_file: self.key.clone(),
            lease_ttl: std::time::Duration::from_secs(self.lease_ttl_secs),
            ..weft_registry::EtcdOptions::from_env()
        }
    }
}

/// An endpoint flag before the default port is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub node_name: String,
    pub registry: String,
    pub interface: String,
    pub listen_port: u16,
    /// Empty: find the default-route address at start-up (unless `behind_nat`).
    pub endpoints: Vec<SocketAddr>,
    /// `--location`.
    pub location: Option<String>,
    /// `--private-endpoint` (empty with a location: the default-route address).
    pub private_endpoints: Vec<SocketAddr>,
    /// `--behind-nat`: publish no public endpoint.
    pub behind_nat: bool,
    /// `--nat-keepalive` (seconds).
    pub nat_keepalive: u16,
    /// `--use-relays` (or `--relay`).
    pub use_relays: bool,
    /// `--relay`.
    pub relay: bool,
    /// Empty when the range is to be claimed (see `alloc`).
    pub pod_cidrs: Vec<IpNet>,
    /// Set when no --pod-cidr was given: how to claim one.
    pub alloc: Option<AllocConfig>,
    pub cluster_cidrs: Vec<IpNet>,
    pub state_dir: PathBuf,
    pub api_socket: PathBuf,
    /// `--wg-uapi-dir` (None: off).
    pub wg_uapi_dir: Option<PathBuf>,
    pub mtu: Option<u32>,
    pub persistent_keepalive: Option<u16>,
    pub json_logs: bool,
    /// `--log-repeat-interval`.
    pub log_repeat_interval: Duration,
    pub etcd: EtcdConfig,
    /// `--proc-sys-dir`.
    pub proc_sys_dir: PathBuf,
    /// `--masquerade`.
    pub masquerade: bool,
    /// `--network-policy`, resolved (needs `--registry kube`).
    pub network_policy: bool,
    /// `--keep-established-flows`.
    pub keep_established_flows: bool,
    /// Set with `--registry kube`.
    pub kube: Option<KubeConfig>,
    /// `--health-listen`.
    pub health_listen: Option<SocketAddr>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// `--key-max-age`: rotate by itself past this age.
    pub key_max_age: Option<std::time::Duration>,
    /// `--cluster-secret-file`, read and checked.
    pub cluster_secret: Option<SecretFile>,
    /// `--offload on`.
    pub offload: bool,
    /// `--workers`, resolved (`auto` becomes the CPU count).
    pub workers: u16,
}

/// Most workers `--workers auto` picks.
pub const AUTO_WORKERS_MAX: usize = 16;
/// Most workers `--workers N` accepts.
pub const WORKERS_MAX: u16 = 64;

/// `--workers`: `auto` (the CPUs this process may run on, at most [`AUTO_WORKERS_MAX`]) or
/// 1..=[`WORKERS_MAX`].
pub fn parse_workers(v: &str) -> Result<u16, String> {
    match v.trim() {
        "auto" => Ok(std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, AUTO_WORKERS_MAX) as u16),
        n => match n.parse::<u16>() {
            Ok(w) if (1..=WORKERS_MAX).contains(&w) => Ok(w),
            _ => Err(format!(
                "{n:?}: use auto or a number from 1 to {WORKERS_MAX}"
            )),
        },
    }
}

/// The cluster secret and the file it came from. Configs compare equal by path only, and
/// `Debug` shows only the path.
#[derive(Debug, Clone)]
pub struct SecretFile {
    pub path: PathBuf,
    pub secret: weft_core::psk::ClusterSecret,
}

impl PartialEq for SecretFile {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path
    }
}
impl Eq for SecretFile {}

/// Largest cluster secret file read (a base64 key and some whitespace).
const MAX_SECRET_FILE: u64 = 4096;

/// Reads and checks `--cluster-secret-file`: a regular file, not readable by group or others,
/// holding 32 bytes in base64.
fn read_secret_file(path: &std::path::Path) -> Result<SecretFile, ConfigError> {
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt as _;
    let flag = "cluster-secret-file";
    let meta =
        std::fs::metadata(path).map_err(|e| bad(flag, format!("{}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(bad(flag, format!("{} is not a file", path.display())));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(bad(
            flag,
            format!(
                "{} has mode {mode:o}: it must not be readable by group or others (chmod 600; \
                 in Kubernetes set the Secret volume's defaultMode to 0400)",
                path.display()
            ),
        ));
    }
    let mut text = zeroize::Zeroizing::new(String::new());
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SECRET_FILE).read_to_string(&mut text))
        .map_err(|e| bad(flag, format!("{}: {e}", path.display())))?;
    let secret = weft_core::psk::ClusterSecret::from_base64(&text)
        .map_err(|e| bad(flag, format!("{}: {e}", path.display())))?;
    Ok(SecretFile {
        path: path.to_path_buf(),
        secret,
    })
}

/// How this node claims its pod range when none is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocConfig {
    /// The first IPv4 --cluster-cidr.
    pub pool: ipnet::Ipv4Net,
    pub block_len: u8,
    pub reclaim_after: std::time::Duration,
}

/// Parses a duration such as `24h`, `90m`, `30s`, `1d` or `1h30m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut any = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(format!("{s:?}: unknown unit {c:?} (use s, m, h or d)")),
        };
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?}: a number must come before {c:?}"))?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("{s:?} is too long"))?;
        num.clear();
        any = true;
    }
    if !num.is_empty() || !any {
        return Err(format!("{s:?} is not a duration such as 24h, 90m or 30s"));
    }
    Ok(std::time::Duration::from_secs(total))
}

/// A flag with a bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value for --{flag}: {reason}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub reason: String,
}

fn bad(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        reason: reason.into(),
    }
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into a buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    std::str::from_utf8(&buf[..end])
        .ok()
        .map(|s| s.to_lowercase())
}

/// `IP:PORT`, `[IPv6]:PORT`, or a bare `IPv6:PORT` (what `$(NODE_IP):9464` gives in a
/// DaemonSet on an IPv6 node).
fn parse_listen(s: &str) -> Option<SocketAddr> {
    let s = s.trim();
    s.parse().ok().or_else(|| {
        let (ip, port) = s.rsplit_once(':')?;
        Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?))
    })
}

fn parse_cidr(flag: &'static str, s: &str) -> Result<IpNet, ConfigError> {
    let net: IpNet = s
        .trim()
        .parse()
        .map_err(|_| bad(flag, format!("{s:?} is not a CIDR such as 10.42.1.0/24")))?;
    if net.trunc() != net {
        return Err(bad(
            flag,
            format!("{net} has host bits set (did you mean {}?)", net.trunc()),
        ));
    }
    if net.prefix_len() == 0 {
        return Err(bad(flag, format!("{net} is a default route")));
    }
    Ok(net)
}

impl RunArgs {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let node_name = match &self.node_name {
            Some(n) => n.clone(),
            None => match std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()) {
                Some(n) => n.to_lowercase(),
                None => {
                    hostname().ok_or_else(|| bad("node-name", "no hostname; set --node-name"))?
                }
            },
        };
        check_name(&node_name).map_err(|e| bad("node-name", e.to_string()))?;

        let registry = self.registry.trim().to_string();
        let etcd = self.validate_etcd()?;
        let kube_config = KubeConfig {
            kubeconfig: self.kubeconfig.clone(),
            api_server: self.kube_api_server.clone(),
        };
        weft_registry::KubeOptions {
            kubeconfig: kube_config.kubeconfig.clone(),
            api_server: kube_config.api_server.clone(),
            ..Default::default()
        }
        .check()
        .map_err(|(flag, reason)| bad(flag, reason))?;
        let kube = weft_registry::is_kube_spec(&registry).then_some(kube_config);
        match registry.split_once(':') {
            _ if kube.is_some() => {}
            Some(("dir", path)) if !path.is_empty() => {}
            Some(("etcd" | "etcds", _)) => {
                // The error names the problem without quoting the spec (it may hold secrets).
                weft_registry::parse_etcd_spec(&registry)
                    .map_err(|e| bad("registry", e.to_string()))?;
                if registry.starts_with("etcds:") && etcd.ca.is_none() {
                    return Err(bad("etcd-ca", "etcds:// needs a CA file"));
                }
                let env = weft_registry::EtcdOptions::from_env();
                if env.username.is_some() != env.password.is_some() {
                    return Err(bad(
                        "registry",
                        "WEFT_ETCD_USERNAME and WEFT_ETCD_PASSWORD must be set together",
                    ));
                }
            }
            _ => {
                return Err(bad(
                    "registry",
                    "expected dir:PATH, etcd://HOST:PORT[,HOST:PORT...] or kube",
                ))
            }
        }

        let iface = &self.interface;
        if iface.is_empty()
            || iface.len() > 15
            || iface == "."
            || iface == ".."
            || iface
                .bytes()
                .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
        {
            return Err(bad(
                "interface",
                format!("{iface:?} is not an interface name (1-15 bytes, no '/', ':' or spaces)"),
            ));
        }
        if self.listen_port == 0 {
            return Err(bad("listen-port", "must be 1-65535"));
        }

        let endpoints = self.parse_endpoints(&self.endpoints, "endpoint")?;
        let private_endpoints =
            self.parse_endpoints(&self.private_endpoints, "private-endpoint")?;
        if self.behind_nat && !endpoints.is_empty() {
            return Err(bad(
                "behind-nat",
                "a node behind NAT publishes no --endpoint (peers learn its address from its packets)",
            ));
        }
        if self.relay && self.behind_nat {
            return Err(bad(
                "relay",
                "a relay needs a public endpoint; a node --behind-nat cannot relay",
            ));
        }
        if !(1..=3600).contains(&self.nat_keepalive) {
            return Err(bad("nat-keepalive", "must be 1-3600 seconds"));
        }
        let location = match &self.location {
            None => None,
            Some(l) => {
                weft_core::record::check_location(l).map_err(|e| bad("location", e.to_string()))?;
                Some(l.clone())
            }
        };
        if !private_endpoints.is_empty() && location.is_none() && kube.is_none() {
            return Err(bad(
                "private-endpoint",
                "needs --location (private endpoints are for the nodes of one location)",
            ));
        }

        let cluster_cidrs = self
            .cluster_cidrs
            .iter()
            .map(|c| parse_cidr("cluster-cidr", c))
            .collect::<Result<Vec<_>, _>>()?;
        if cluster_cidrs.is_empty() {
            return Err(bad("cluster-cidr", "at least one is required"));
        }
        let pod_cidrs = self
            .pod_cidrs
            .iter()
            .map(|c| parse_cidr("pod-cidr", c))
            .collect::<Result<Vec<_>, _>>()?;
        let reclaim_after =
            parse_duration(&self.cidr_reclaim_after).map_err(|e| bad("cidr-reclaim-after", e))?;
        if reclaim_after.as_secs() == 0 {
            return Err(bad("cidr-reclaim-after", "must be at least 1s"));
        }
        let alloc = if pod_cidrs.is_empty() {
            let pool = cluster_cidrs
                .iter()
                .find_map(|c| match c {
                    IpNet::V4(v4) => Some(*v4),
                    IpNet::V6(_) => None,
                })
                .ok_or_else(|| {
                    bad(
                        "cluster-cidr",
                        "without --pod-cidr an IPv4 cluster range is needed to claim a block from",
                    )
                })?;
            let len = self.node_cidr_size;
            if len < pool.prefix_len() || len > 30 {
                return Err(bad(
                    "node-cidr-size",
                    format!(
                        "/{len} does not fit in --cluster-cidr {pool}: use {}-30",
                        pool.prefix_len()
                    ),
                ));
            }
            Some(AllocConfig {
                pool,
                block_len: len,
                reclaim_after,
            })
        } else {
            None
        };
        let v4 = pod_cidrs
            .iter()
            .filter(|c| matches!(c, IpNet::V4(_)))
            .count();
        if alloc.is_none() && (v4 != 1 || pod_cidrs.len() - v4 > 1) {
            return Err(bad(
                "pod-cidr",
                "give exactly one IPv4 and at most one IPv6 range",
            ));
        }
        for p in &pod_cidrs {
            if p.hosts().nth(1).is_none() {
                return Err(bad(
                    "pod-cidr",
                    format!("{p} is too small for a mesh address and pods"),
                ));
            }
            if !cluster_cidrs.iter().any(|c| c.contains(p)) {
                return Err(bad(
                    "pod-cidr",
                    format!(
                        "{p} is outside every --cluster-cidr, so it would not be kept fail-closed"
                    ),
                ));
            }
            if let Some(ep) = endpoints.iter().find(|e| p.contains(&e.ip())) {
                return Err(bad(
                    "pod-cidr",
                    format!("{p} contains this node's endpoint {ep}"),
                ));
            }
        }
        if let Some(ep) = endpoints
            .iter()
            .chain(&private_endpoints)
            .find(|e| cluster_cidrs.iter().any(|c| c.contains(&e.ip())))
        {
            return Err(bad(
                if endpoints.contains(ep) {
                    "endpoint"
                } else {
                    "private-endpoint"
                },
                format!("{ep} is inside a --cluster-cidr: tunnel traffic would route into itself"),
            ));
        }

        if let Some(mtu) = self.mtu {
            let min = if pod_cidrs.iter().any(|c| matches!(c, IpNet::V6(_))) {
                1280
            } else {
                576
            };
            if !(min..=65_455).contains(&mtu) {
                return Err(bad("mtu", format!("{mtu} is outside {min}-65455")));
            }
        }
        let persistent_keepalive = match self.persistent_keepalive {
            None | Some(0) => None,
            Some(s) => Some(s),
        };
        let json_logs = match self.log_format.as_str() {
            "text" => false,
            "json" => true,
            other => return Err(bad("log-format", format!("{other:?}: use text or json"))),
        };
        if !(1..=86_400).contains(&self.log_repeat_interval) {
            return Err(bad(
                "log-repeat-interval",
                format!("{} is outside 1-86400 seconds", self.log_repeat_interval),
            ));
        }
        let log_repeat_interval = Duration::from_secs(self.log_repeat_interval);
        if self.state_dir.as_os_str().is_empty() {
            return Err(bad("state-dir", "must not be empty"));
        }
        if self.api_socket.as_os_str().is_empty() || self.api_socket.as_os_str().len() > 107 {
            return Err(bad(
                "api-socket",
                "must be a path of 1-107 bytes (a unix socket path)",
            ));
        }
        let wg_uapi_dir = match self.wg_uapi_dir.trim() {
            "off" => None,
            d if d.starts_with('/') && d.len() + 1 + 15 + ".sock".len() <= 107 => {
                Some(PathBuf::from(d))
            }
            d => {
                return Err(bad(
                    "wg-uapi-dir",
                    format!(
                        "{d:?}: want an absolute directory of at most 86 bytes (the socket path \
                         DIR/IFNAME.sock must fit a unix socket address) or off"
                    ),
                ))
            }
        };
        let key_max_age = match self.key_max_age.as_deref().map(str::trim) {
            None | Some("") | Some("0") => None,
            Some(v) => {
                let d = parse_duration(v).map_err(|e| bad("key-max-age", e))?;
                if d.as_secs() < 10 {
                    return Err(bad("key-max-age", "must be at least 10s (or 0 for off)"));
                }
                Some(d)
            }
        };
        let cluster_secret = match self.cluster_secret_file.as_deref() {
            Some(p) if self.cluster_secret_optional && !p.exists() => {
                tracing::info!(file = %p.display(), "no cluster secret file (optional): no cluster PSK");
                None
            }
            Some(p) => Some(read_secret_file(p)?),
            None => None,
        };
        let offload = match self.offload.trim() {
            "on" => true,
            "off" => false,
            other => return Err(bad("offload", format!("{other:?}: use on or off"))),
        };
        let workers = parse_workers(&self.workers).map_err(|e| bad("workers", e))?;
        let listen = |flag: &'static str, v: &Option<String>| {
            v.as_deref()
                .map(|h| {
                    parse_listen(h).ok_or_else(|| bad(flag, format!("{h:?} is not ADDR:PORT")))
                })
                .transpose()
        };
        let health_listen = listen("health-listen", &self.health_listen)?;
        let metrics_listen = listen("metrics-listen", &self.metrics_listen)?;
        if metrics_listen.is_some() && metrics_listen == health_listen {
            return Err(bad(
                "metrics-listen",
                "must differ from --health-listen (each serves its own port)",
            ));
        }
        if !self.proc_sys_dir.is_absolute() {
            return Err(bad("proc-sys-dir", "must be an absolute path"));
        }
        let network_policy = match (self.network_policy.as_str(), kube.is_some()) {
            ("auto", k) => k,
            ("off", _) => false,
            ("on", true) => true,
            ("on", false) => return Err(bad(
                "network-policy",
                "on needs --registry kube (policies, pods and namespaces come from the API server)",
            )),
            (other, _) => {
                return Err(bad(
                    "network-policy",
                    format!("{other:?}: use auto, on or off"),
                ))
            }
        };
        Ok(Config {
            network_policy,
            keep_established_flows: self.keep_established_flows,
            proc_sys_dir: self.proc_sys_dir.clone(),
            masquerade: self.masquerade,
            kube,
            health_listen,
            metrics_listen,
            workers,
            key_max_age,
            cluster_secret,
            offload,
            node_name,
            registry,
            interface: iface.clone(),
            listen_port: self.listen_port,
            endpoints,
            location,
            private_endpoints,
            behind_nat: self.behind_nat,
            nat_keepalive: self.nat_keepalive,
            use_relays: self.use_relays || self.relay,
            relay: self.relay,
            pod_cidrs,
            alloc,
            cluster_cidrs,
            state_dir: self.state_dir.clone(),
            api_socket: self.api_socket.clone(),
            wg_uapi_dir,
            mtu: self.mtu,
            persistent_keepalive,
            json_logs,
            log_repeat_interval,
            etcd,
        })
    }

    /// `IP[:PORT]` values of flag `flag` (the port defaults to --listen-port).
    fn parse_endpoints(
        &self,
        values: &[String],
        flag: &'static str,
    ) -> Result<Vec<SocketAddr>, ConfigError> {
        let mut out = Vec::new();
        for e in values {
            let e = e.trim();
            let ep = if let Ok(sa) = e.parse::<SocketAddr>() {
                sa
            } else if let Ok(ip) = e
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
            {
                SocketAddr::new(ip, self.listen_port)
            } else {
                return Err(bad(flag, format!("{e:?} is not IP or IP:PORT")));
            };
            if ep.port() == 0 || ep.ip().is_unspecified() || ep.ip().is_multicast() {
                return Err(bad(flag, format!("{ep} is not a unicast IP:PORT")));
            }
            if out.len() == weft_core::record::MAX_ENDPOINTS {
                return Err(bad(
                    flag,
                    format!("at most {} addresses", weft_core::record::MAX_ENDPOINTS),
                ));
            }
            out.push(ep);
        }
        Ok(out)
    }

    /// The etcd flags, checked whatever the registry (a bad value is a mistake either way).
    fn validate_etcd(&self) -> Result<EtcdConfig, ConfigError> {
        if !(2..=86_400).contains(&self.etcd_lease_ttl) {
            return Err(bad("etcd-lease-ttl", "must be 2-86400 seconds"));
        }
        weft_registry::etcd::check_flags(
            &self.etcd_prefix,
            self.etcd_ca.as_deref(),
            self.etcd_cert.as_deref(),
            self.etcd_key.as_deref(),
        )
        .map_err(|(flag, reason)| bad(flag, reason))?;
        Ok(EtcdConfig {
            prefix: self.etcd_prefix.clone(),
            ca: self.etcd_ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            lease_ttl_secs: self.etcd_lease_ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["meshd", "--node-name", "n1", "--pod-cidr", "10.42.1.0/24"];
        v.extend_from_slice(args);
        T::try_parse_from(v).expect("clap").a.validate()
    }

    #[test]
    fn defaults_and_good_values() {
        let c = parse(&[
            "--endpoint",
            "198.18.0.11",
            "--endpoint",
            "[2001:db8::1]:5000",
        ])
        .expect("ok");
        assert_eq!(c.listen_port, 51820);
        assert_eq!(c.endpoints[0], "198.18.0.11:51820".parse().expect("ep"));
        assert_eq!(c.endpoints[1], "[2001:db8::1]:5000".parse().expect("ep"));
        assert_eq!(
            c.cluster_cidrs,
            vec!["10.42.0.0/16".parse::<IpNet>().expect("net")]
        );
        assert_eq!(c.interface, "weft0");
        // NetworkPolicy: `auto` is on only with --registry kube.
        assert!(!c.network_policy && !c.keep_established_flows);
        let k = [
            "--registry",
            "kube",
            "--kube-api-server",
            "https://10.0.0.1:6443",
        ];
        let c = parse(&k).expect("kube");
        assert!(c.network_policy);
        let c = parse(&[&k[..], &["--network-policy", "off"]].concat()).expect("off");
        assert!(!c.network_policy);
        let c = parse(&[&k[..], &["--keep-established-flows"]].concat()).expect("keep");
        assert!(c.network_policy && c.keep_established_flows);
        assert_eq!(c.etcd.prefix, "/weft");
        assert_eq!(c.etcd.lease_ttl_secs, 60);
        let c = parse(&[
            "--registry",
            "etcd://127.0.0.1:2379,[::1]:2379,etcd.example:2379",
            "--etcd-prefix",
            "/k/weft",
            "--etcd-lease-ttl",
            "5",
        ])
        .expect("etcd ok");
        assert_eq!(c.etcd.prefix, "/k/weft");
        assert_eq!(c.etcd.lease_ttl_secs, 5);
    }

    #[test]
    fn registry_errors_do_not_quote_credentials() {
        let e = parse(&["--registry", "etcd://u:secret@127.0.0.1:2379"]).expect_err("creds");
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn each_bad_value_names_its_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--endpoint", "nope"], "endpoint"),
            (&["--endpoint", "10.42.9.9"], "endpoint"),
            (&["--pod-cidr", "10.42.2.0/24"], "pod-cidr"),
            (&["--cluster-cidr", "10.42.0.0/33"], "cluster-cidr"),
            (&["--interface", "a-very-long-interface-name"], "interface"),
            (&["--interface", "we/ft"], "interface"),
            (&["--mtu", "100"], "mtu"),
            (&["--behind-nat", "--endpoint", "192.0.2.1"], "behind-nat"),
            (&["--relay", "--behind-nat"], "relay"),
            (&["--location", "eu west"], "location"),
            (&["--private-endpoint", "10.0.0.1"], "private-endpoint"),
            (
                &["--location", "a", "--private-endpoint", "nope"],
                "private-endpoint",
            ),
            (&["--nat-keepalive", "0"], "nat-keepalive"),
            (&["--registry", "etcd://127.0.0.1"], "registry"),
            (
                &["--registry", "etcd://u:secret@127.0.0.1:2379"],
                "registry",
            ),
            (&["--registry", "etcds://127.0.0.1:2379"], "etcd-ca"),
            (&["--registry", "kube:x"], "registry"),
            (
                &["--registry", "kube", "--kube-api-server", "http://x"],
                "kube-api-server",
            ),
            (&["--health-listen", "nope"], "health-listen"),
            (&["--proc-sys-dir", "proc"], "proc-sys-dir"),
            (&["--registry", "/tmp/x"], "registry"),
            (&["--etcd-prefix", "weft"], "etcd-prefix"),
            (&["--etcd-prefix", "/weft/"], "etcd-prefix"),
            (&["--etcd-lease-ttl", "1"], "etcd-lease-ttl"),
            (&["--etcd-ca", "/nonexistent/ca.pem"], "etcd-ca"),
            (&["--etcd-cert", "/nonexistent/c.pem"], "etcd-cert"),
            (&["--log-format", "xml"], "log-format"),
            (&["--log-repeat-interval", "0"], "log-repeat-interval"),
            (&["--wg-uapi-dir", "relative/dir"], "wg-uapi-dir"),
            (&["--wg-uapi-dir", ""], "wg-uapi-dir"),
            (&["--metrics-listen", "9473"], "metrics-listen"),
            (&["--metrics-listen", "host:port"], "metrics-listen"),
            (
                &[
                    "--metrics-listen",
                    "127.0.0.1:9",
                    "--health-listen",
                    "127.0.0.1:9",
                ],
                "metrics-listen",
            ),
            (&["--log-repeat-interval", "90000"], "log-repeat-interval"),
            (&["--listen-port", "0"], "listen-port"),
            (&["--key-max-age", "5s"], "key-max-age"),
            (&["--key-max-age", "often"], "key-max-age"),
            (
                &["--cluster-secret-file", "/nonexistent/secret"],
                "cluster-secret-file",
            ),
            (&["--cluster-secret-file", "/tmp"], "cluster-secret-file"),
            (&["--offload", "maybe"], "offload"),
            (&["--workers", "0"], "workers"),
            (&["--workers", "65"], "workers"),
            (&["--workers", "many"], "workers"),
            (&["--network-policy", "on"], "network-policy"),
            (&["--network-policy", "yes"], "network-policy"),
        ];
        for (args, flag) in cases {
            let e = parse(args).expect_err("should fail");
            assert_eq!(e.flag, *flag, "{args:?}: {e}");
        }
        let e = T::try_parse_from([
            "meshd",
            "--node-name",
            "Bad_Name",
            "--pod-cidr",
            "10.42.1.0/24",
        ])
        .expect("clap")
        .a
        .validate()
        .expect_err("bad name");
        assert_eq!(e.flag, "node-name");
        // A pod range outside the cluster range.
        let e = T::try_parse_from(["meshd", "--node-name", "n1", "--pod-cidr", "10.50.1.0/24"])
            .expect("clap")
            .a
            .validate()
            .expect_err("outside");
        assert_eq!(e.flag, "pod-cidr");
        let alloc = |args: &[&str]| {
            let mut v = vec!["meshd", "--node-name", "n1"];
            v.extend_from_slice(args);
            T::try_parse_from(v).expect("clap").a.validate()
        };
        for (args, flag) in [
            (&["--node-cidr-size", "15"][..], "node-cidr-size"),
            (&["--node-cidr-size", "31"], "node-cidr-size"),
            (&["--cluster-cidr", "fd00:42::/48"], "cluster-cidr"),
            (&["--cidr-reclaim-after", "soon"], "cidr-reclaim-after"),
            (&["--cidr-reclaim-after", "0s"], "cidr-reclaim-after"),
            (&["--cidr-reclaim-after", "10"], "cidr-reclaim-after"),
        ] {
            let e = alloc(args).expect_err("bad");
            assert_eq!(e.flag, flag, "{args:?}: {e}");
        }
    }

    #[test]
    fn without_pod_cidr_a_block_is_claimed() {
        let c = T::try_parse_from(["meshd", "--node-name", "n1"])
            .expect("clap")
            .a
            .validate()
            .expect("alloc");
        assert!(c.pod_cidrs.is_empty());
        assert_eq!(
            c.alloc,
            Some(AllocConfig {
                pool: "10.42.0.0/16".parse().expect("net"),
                block_len: 24,
                reclaim_after: std::time::Duration::from_secs(86_400),
            })
        );
        assert!(parse(&[]).expect("static").alloc.is_none());
        assert_eq!(parse_duration("1h30m").map(|d| d.as_secs()), Ok(5400));
        assert_eq!(parse_duration("2d").map(|d| d.as_secs()), Ok(172_800));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn cluster_secret_file_is_checked_and_never_shown() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let good = "q0E9bGmSIcHGYkHnUczk3P/U6N1ZRCpB5cFa4ZDl4Xo=";
        let write = |name: &str, text: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
            p.to_string_lossy().into_owned()
        };
        let ok = write("ok", &format!("{good}\n"), 0o600);
        let c = parse(&["--cluster-secret-file", &ok]).expect("good secret");
        let sf = c.cluster_secret.as_ref().expect("secret");
        assert!(!format!("{c:?}").contains(good), "Debug shows the secret");
        assert_eq!(sf.path.to_string_lossy(), ok);
        for (name, text, mode) in [
            ("readable", good, 0o644),
            ("group", good, 0o640),
            ("short", "AAAA", 0o600),
            ("garbage", "not a key", 0o400),
        ] {
            let p = write(name, text, mode);
            let e = parse(&["--cluster-secret-file", &p]).expect_err(name);
            assert_eq!(e.flag, "cluster-secret-file", "{name}: {e}");
            assert!(
                !e.to_string().contains(good),
                "{name}: error shows the secret"
            );
        }
    }

    #[test]
    fn listen_addresses_and_optional_secret() {
        assert_eq!(parse_listen("10.0.0.1:9464"), "10.0.0.1:9464".parse().ok());
        assert_eq!(
            parse_listen("[fd00::1]:9464"),
            "[fd00::1]:9464".parse().ok()
        );
        assert_eq!(parse_listen("fd00::1:9464"), "[fd00::1]:9464".parse().ok());
        assert_eq!(parse_listen("nope"), None);
        let missing = "/nonexistent/weft/secret";
        assert!(parse(&["--cluster-secret-file", missing]).is_err());
        let cfg = parse(&[
            "--cluster-secret-file",
            missing,
            "--cluster-secret-optional",
        ])
        .expect("optional secret");
        assert!(cfg.cluster_secret.is_none());
    }
}
