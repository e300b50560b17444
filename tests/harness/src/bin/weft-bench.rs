//! weft-bench: the data path benchmark. Two network namespaces joined by one veth pair carry
//! traffic over one data path at a time, all four in one run:
//!   veth          plain veth, no encryption (the ceiling)
//!   wireguard-go  Debian's wireguard-go
//!   boringtun     boringtun-cli 0.7.1 (cargo install; PATH or ~/.cargo/bin)
//!   meshd         two weft meshd sharing a temp dir registry (release build: WEFT_BIN_DIR or
//!                 target/release; `cargo build --release -p weft-meshd`)
//!
//! Node 0 sends, node 1 runs the iperf3 server. Each path gets `--runs` runs (default 3); a run is
//!   ping   `--pings` pings (default 100) at 10 ms over the idle tunnel;
//!   tcp1   iperf3 TCP, one stream, `--seconds` (default 10), Gbit/s received;
//!   tcp4   iperf3 TCP, four parallel streams (-P 4), Gbit/s received (sum);
//!   udp    iperf3 UDP with `--udp-size` (default 64) byte payloads for `--seconds`: packets/s
//!          that came out of the tunnel at the receiver (from the rx counters of node 1's tunnel
//!          interface, so a receiving iperf3 that cannot keep up does not count: (bytes - headers
//!          * packets) / payload with the IP, UDP and link-layer headers, since meshd writes many
//!          datagrams as one USO super-packet) and loss %
//!          against what iperf3 sent. The offered rate (`--udp-rate`): `auto` (default) sweeps
//!          first, 2 s per step: -b 0, then 0.9 times what -b 0 got through, 1.25 times more
//!          each step until two steps in a row get less through than the best, the offer passes
//!          what iperf3 sent at -b 0, or 10 steps; the run proper offers the rate that got the
//!          most through. On two cores an unlimited sender takes a core from the tunnel's
//!          processes and gets less through than a sender just above the tunnel's capacity, so
//!          -b 0 alone measures the sender as much as the path. `max` is -b 0 only, a number
//!          fixes the packets/s. A run with no loss in which iperf3 could not send as fast as
//!          asked is marked sender-bound (veth). iperf3's own count, the sending tunnel's queue
//!          drops and the receiving socket's buffer overflows are in the JSON.
//! The table gives the median of the runs per column and p50/p99 over all pings.
//!
//! CPU: utime + stime (all threads) of the WireGuard process of both nodes from /proc/PID/stat,
//! read before and after every TCP run; the table gives CPU seconds (both nodes together) per GB
//! (1e9 bytes received by iperf3) over all TCP runs. Memory: VmRSS of node 0's and node 1's
//! process after the runs (the table shows the larger), then `--peers` peers (default 100) on
//! node 0: meshd gets `--peers - 1` more registry records (fresh keys, a /28 each inside the
//! cluster CIDR, endpoints on the underlay where nobody listens) and its VmRSS is read once its
//! status lists them all; wireguard-go and boringtun-cli get as many `wg set ... peer` entries.
//! `--peers 0` skips it.
//!
//! Ratios: each figure divided by boringtun-cli's and by wireguard-go's; the issue's targets are
//! checked against them. A measurement that fails is reported (stderr, and under the table) and
//! the others go on; a path that cannot be set up is "unavailable: reason".
//!
//! Usage (root): weft-bench [--runs N (3)] [--seconds S (10)] [--pings N (100)] [--peers N (100)]
//!                          [--udp-size BYTES (64)] [--udp-rate auto|max|PPS (auto)]
//!                          [--only veth,wireguard-go,boringtun,meshd] [--json FILE]

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use weft_core::PrivateKey;
use weft_tests::perf::{cpu_secs, iperf, json_f64};
use weft_tests::util::{
    find_program, median, ns_cmd, percentile, run_args, run_in, run_timeout, tail, wait_until, Proc,
};
use weft_tests::{
    wg_genkey, Cluster, ClusterOpts, Node, PingOpts, RecordSpec, WgImpl, WgPeer, MESH_PORT,
};

const PATHS: &[&str] = &["veth", "wireguard-go", "boringtun", "meshd"];

const USAGE: &str = "weft-bench [--runs N] [--seconds S] [--pings N] [--peers N] \
                     [--udp-size BYTES] [--udp-rate PPS] [--only veth,wireguard-go,boringtun,meshd] [--json FILE]";

/// Fake peers get /28s from here on (node-0 and node-1 have 10.42.1.0/24 and 10.42.2.0/24).
const FIRST_FAKE_RANGE: Ipv4Addr = Ipv4Addr::new(10, 42, 16, 0);
const MAX_PEERS: usize = (256 - 16) * 16;
/// Nobody has this address on the direct-link underlay: handshakes to fake peers go nowhere.
const FAKE_ENDPOINT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// The issue's targets.
const TCP_VS_BORINGTUN: f64 = 5.0;
const TCP_VS_WIREGUARD_GO: f64 = 4.0;
const PPS_VS_BORINGTUN: f64 = 3.0;
const RSS_PEERS_MAX_MIB: f64 = 32.0;
const TARGET_PEERS: usize = 100;

/// How fast iperf3 offers the UDP packets.
#[derive(Debug, Clone, Copy, PartialEq)]
enum UdpRate {
    /// Sweep offered rates and keep the one the tunnel delivers most of (see the module docs).
    Auto,
    /// Unlimited (iperf3 -b 0).
    Max,
    /// Packets per second.
    Fixed(u64),
}

/// The sweep's first offered rate, as a multiple of what the tunnel delivered at -b 0; each step
/// offers SWEEP_GROWTH times the previous one, until two steps in a row get less through than
/// the best so far, the offer is beyond what iperf3 managed to send at -b 0, or SWEEP_MAX_STEPS.
const SWEEP_START: f64 = 0.9;
const SWEEP_GROWTH: f64 = 1.25;
const SWEEP_MAX_STEPS: usize = 10;
/// Seconds of each sweep step.
const SWEEP_SECS: u32 = 2;

#[derive(Debug)]
struct Args {
    runs: usize,
    seconds: u32,
    pings: u32,
    peers: usize,
    udp_size: u32,
    udp_rate: UdpRate,
    only: Vec<String>,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        runs: 3,
        seconds: 10,
        pings: 100,
        peers: TARGET_PEERS,
        udp_size: 64,
        udp_rate: UdpRate::Auto,
        only: PATHS.iter().map(|s| s.to_string()).collect(),
        json: None,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let val = || {
            v.get(i + 1)
                .cloned()
                .ok_or_else(|| anyhow!("{} needs a value", v[i]))
        };
        match v[i].as_str() {
            "--runs" => a.runs = val()?.parse().context("--runs")?,
            "--seconds" => a.seconds = val()?.parse().context("--seconds")?,
            "--pings" => a.pings = val()?.parse().context("--pings")?,
            "--peers" => a.peers = val()?.parse().context("--peers")?,
            "--udp-size" => a.udp_size = val()?.parse().context("--udp-size")?,
            "--udp-rate" => {
                a.udp_rate = match val()?.as_str() {
                    "auto" => UdpRate::Auto,
                    "max" => UdpRate::Max,
                    n => UdpRate::Fixed(n.parse().context("--udp-rate: auto, max or packets/s")?),
                }
            }
            "--json" => a.json = Some(PathBuf::from(val()?)),
            "--only" => {
                a.only = val()?
                    .split(',')
                    .map(|s| match s.trim() {
                        "boringtun-cli" => "boringtun".to_string(),
                        "wg-go" | "wireguard" => "wireguard-go".to_string(),
                        other => other.to_string(),
                    })
                    .collect();
                for p in &a.only {
                    if !PATHS.contains(&p.as_str()) {
                        bail!("unknown data path {p}; known: {}", PATHS.join(","));
                    }
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
        i += 2;
    }
    if a.runs == 0 || a.seconds == 0 || a.pings == 0 {
        bail!("--runs, --seconds and --pings must be positive");
    }
    if a.peers > MAX_PEERS {
        bail!("--peers must be at most {MAX_PEERS}");
    }
    // iperf3 needs 16 bytes for its UDP header; 1392 + 28 fills the 1420-byte tunnel MTU.
    if !(16..=1392).contains(&a.udp_size) {
        bail!("--udp-size must be in 16..=1392");
    }
    Ok(a)
}

/// One iperf3 TCP run.
#[derive(Debug, Clone)]
struct TcpRun {
    /// 1-based.
    run: usize,
    streams: u32,
    gbits: f64,
    /// Bytes received by the iperf3 server.
    bytes: f64,
    /// CPU seconds of the WireGuard process of each node during the run (empty for veth or when
    /// /proc could not be read).
    cpu_secs: Vec<f64>,
}

/// One iperf3 UDP run.
#[derive(Debug, Clone, Default)]
struct UdpRun {
    /// 1-based (0 in sweep steps).
    run: usize,
    /// Offered packets/s (None: unlimited, -b 0).
    offered_pps: Option<u64>,
    /// Duration as the iperf3 receiver measured it.
    seconds: f64,
    /// Datagrams iperf3 sent.
    sent: u64,
    /// Packets that came out of node 1's tunnel interface (its rx counter) during the run.
    delivered: u64,
    /// Datagrams the receiving iperf3 read.
    app_received: u64,
    /// Node 0's tunnel interface: packets the WireGuard process took (tx) and dropped because
    /// its queue was full.
    sender_if_tx: u64,
    sender_if_dropped: u64,
    /// UDP receive-buffer overflows in node 1 (/proc/net/snmp RcvbufErrors).
    rcvbuf_errors: u64,
    /// The sweep that picked `offered_pps` (short runs), with `--udp-rate auto`.
    sweep: Vec<UdpRun>,
}

impl UdpRun {
    fn sent_pps(&self) -> f64 {
        self.sent as f64 / self.seconds.max(1e-3)
    }
    /// Nothing was lost and iperf3 could not even send what was asked: the sender, not the
    /// path, set the rate.
    fn sender_bound(&self) -> bool {
        // (`Option::is_none_or` needs Rust 1.82; the workspace's rust-version is 1.80.)
        let short_of_offer = match self.offered_pps {
            None => true,
            Some(o) => self.sent_pps() < 0.95 * o as f64,
        };
        self.loss_pct() < 1.0 && short_of_offer
    }
    fn offered(&self) -> String {
        self.offered_pps
            .map(|o| format!("{:.1}", o as f64 / 1e3))
            .unwrap_or_else(|| "max".into())
    }
    fn sweep_summary(&self) -> String {
        self.sweep
            .iter()
            .map(|u| format!("{} -> {:.1}", u.offered(), u.pps() / 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    }
    fn summary(&self) -> String {
        format!(
            "offered {} kpps, sent {:.1} kpps, out of the tunnel {:.1} kpps ({:.1} % lost{}), \
             iperf3 read {:.1} kpps; sender queue drops {}, receiver RcvbufErrors {}",
            self.offered(),
            self.sent_pps() / 1e3,
            self.pps() / 1e3,
            self.loss_pct(),
            if self.sender_bound() {
                ", sender-bound"
            } else {
                ""
            },
            self.app_received as f64 / self.seconds.max(1e-3) / 1e3,
            self.sender_if_dropped,
            self.rcvbuf_errors
        )
    }
    fn pps(&self) -> f64 {
        self.delivered as f64 / self.seconds.max(1e-3)
    }
    fn loss_pct(&self) -> f64 {
        if self.sent == 0 {
            return 100.0;
        }
        (self.sent.saturating_sub(self.delivered)) as f64 / self.sent as f64 * 100.0
    }
}

/// Memory with many peers on node 0.
#[derive(Debug, Clone)]
struct ManyPeers {
    peers: usize,
    rss_kib: u64,
    hwm_kib: u64,
    /// Seconds from the first record/peer written until all were listed.
    listed_after_secs: f64,
    /// The tunnel still carried pings afterwards.
    still_pings: bool,
}

#[derive(Debug, Default)]
struct PathResult {
    name: String,
    detail: String,
    unavailable: Option<String>,
    tcp: Vec<TcpRun>,
    udp: Vec<UdpRun>,
    rtts_ms: Vec<f64>,
    ping_sent: u32,
    ping_received: u32,
    /// (node name, VmRSS KiB, VmHWM KiB) after the runs.
    mem_after_runs: Vec<(String, u64, u64)>,
    many_peers: Option<ManyPeers>,
    errors: Vec<String>,
}

/// The figures of the table (medians over runs).
#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    tcp1: Option<f64>,
    tcp4: Option<f64>,
    udp_pps: Option<f64>,
    udp_loss_pct: Option<f64>,
    /// Some UDP run was bound by the sender (no loss), not by the path.
    udp_sender_bound: bool,
    ping_p50: Option<f64>,
    ping_p99: Option<f64>,
    cpu_s_per_gb: Option<f64>,
    rss_mib: Option<f64>,
    rss_peers_mib: Option<f64>,
}

impl PathResult {
    fn has_process(&self) -> bool {
        self.name != "veth"
    }

    fn tcp_gbits(&self, streams: u32) -> Vec<f64> {
        self.tcp
            .iter()
            .filter(|t| t.streams == streams)
            .map(|t| t.gbits)
            .collect()
    }

    /// CPU seconds (both nodes) per 1e9 bytes over all TCP runs whose CPU was read.
    fn cpu_s_per_gb(&self) -> Option<f64> {
        let runs: Vec<&TcpRun> = self.tcp.iter().filter(|t| !t.cpu_secs.is_empty()).collect();
        let bytes: f64 = runs.iter().map(|t| t.bytes).sum();
        if runs.is_empty() || bytes <= 0.0 {
            return None;
        }
        let cpu: f64 = runs.iter().map(|t| t.cpu_secs.iter().sum::<f64>()).sum();
        Some(cpu / (bytes / 1e9))
    }

    fn figures(&self) -> Figures {
        if self.unavailable.is_some() {
            return Figures::default();
        }
        let udp_pps: Vec<f64> = self.udp.iter().map(UdpRun::pps).collect();
        let udp_loss: Vec<f64> = self.udp.iter().map(UdpRun::loss_pct).collect();
        Figures {
            tcp1: median(&self.tcp_gbits(1)),
            tcp4: median(&self.tcp_gbits(4)),
            udp_pps: median(&udp_pps),
            udp_loss_pct: median(&udp_loss),
            udp_sender_bound: self.udp.iter().any(UdpRun::sender_bound),
            ping_p50: percentile(&self.rtts_ms, 50.0),
            ping_p99: percentile(&self.rtts_ms, 99.0),
            cpu_s_per_gb: self.cpu_s_per_gb(),
            rss_mib: self
                .mem_after_runs
                .iter()
                .map(|(_, rss, _)| mib(*rss))
                .reduce(f64::max),
            rss_peers_mib: self.many_peers.as_ref().map(|m| mib(m.rss_kib)),
        }
    }

    fn label(&self) -> String {
        match self.name.as_str() {
            "veth" => "plain veth (no encryption)".to_string(),
            "wireguard-go" => format!("wireguard-go ({})", self.detail.trim()),
            "boringtun" => format!("boringtun-cli ({})", self.detail.trim()),
            "meshd" => "weft meshd (release)".to_string(),
            o => o.to_string(),
        }
    }

    fn fail(&mut self, what: &str, e: &anyhow::Error) {
        let msg = format!("{what}: {e:#}");
        eprintln!("weft-bench: {}: {msg}", self.name);
        self.errors.push(msg);
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("weft-bench: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = weft_tests::util::require_root() {
        eprintln!("weft-bench: {e:#}");
        std::process::exit(2);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "weft-bench: {} run(s) per path of {} pings, iperf3 TCP 1 and 4 streams and UDP {} B \
         ({} s each); {} peers for the memory figure; loadavg at start: {}",
        args.runs,
        args.pings,
        args.udp_size,
        args.seconds,
        args.peers,
        load.trim()
    );
    let mut results = Vec::new();
    for p in PATHS {
        if !args.only.iter().any(|o| o == p) {
            continue;
        }
        eprintln!("weft-bench: === {p}");
        let mut r = PathResult {
            name: p.to_string(),
            ..Default::default()
        };
        let t0 = Instant::now();
        if let Err(e) = bench_path(p, &args, &mut r) {
            let msg = format!("{e:#}");
            eprintln!("weft-bench: {p} unavailable: {msg}");
            r.unavailable = Some(msg.lines().next().unwrap_or("").to_string());
        }
        eprintln!("weft-bench: {p} took {:.0} s", t0.elapsed().as_secs_f64());
        results.push(r);
    }
    let load_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let targets = targets(&results, &args);
    let table = render(&results, &targets, &args, &load, &load_end);
    print!("{table}");
    if let Some(path) = &args.json {
        let v = to_json(&results, &targets, &args, &load, &load_end, &table);
        let written = serde_json::to_vec_pretty(&v)
            .context("encoding JSON")
            .and_then(|b| {
                std::fs::write(path, b).with_context(|| format!("writing {}", path.display()))
            });
        if let Err(e) = written {
            eprintln!("weft-bench: {e:#}");
            std::process::exit(1);
        }
        eprintln!("weft-bench: JSON written to {}", path.display());
    }
}

fn meshd_release_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("WEFT_BIN_DIR") {
        let d = PathBuf::from(d);
        if d.join("meshd").is_file() {
            return Ok(d);
        }
        bail!("WEFT_BIN_DIR={} has no meshd", d.display());
    }
    let ws = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/release");
    if ws.join("meshd").is_file() {
        return Ok(ws);
    }
    bail!(
        "no release meshd in {} (run `cargo build --release -p weft-meshd` or set WEFT_BIN_DIR)",
        ws.display()
    )
}

/// The WireGuard process of a node.
#[derive(Debug, Clone)]
struct WgProc {
    node: String,
    pid: u32,
}

fn wg_proc(node: &Node, pid: Option<u32>, comm: &str) -> Result<WgProc> {
    let pid = pid.ok_or_else(|| anyhow!("no {comm} process on {}", node.name))?;
    let c = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .with_context(|| format!("reading /proc/{pid}/comm"))?;
    if c.trim() != comm {
        bail!("pid {pid} on {} is {:?}, not {comm}", node.name, c.trim());
    }
    Ok(WgProc {
        node: node.name.clone(),
        pid,
    })
}

/// Both nodes' WireGuard processes, or none (CPU and memory then are not measured, and the
/// reason is recorded; throughput and ping still are).
fn wg_procs(r: &mut PathResult, nodes: [(&Node, Option<u32>); 2], comm: &str) -> Vec<WgProc> {
    match nodes
        .iter()
        .map(|(n, pid)| wg_proc(n, *pid, comm))
        .collect::<Result<Vec<_>>>()
    {
        Ok(v) => v,
        Err(e) => {
            r.fail(
                "finding the WireGuard processes (no CPU or memory figures)",
                &e,
            );
            Vec::new()
        }
    }
}

fn bench_path(p: &str, args: &Args, r: &mut PathResult) -> Result<()> {
    // Check prerequisites before building namespaces.
    let meshd_dir = if p == "meshd" {
        Some(meshd_release_dir()?)
    } else {
        None
    };
    if p == "boringtun" && find_program("boringtun-cli").is_none() {
        bail!("boringtun-cli not installed (scripts/install-test-deps.sh)");
    }
    if p == "wireguard-go" && find_program("wireguard-go").is_none() {
        bail!("wireguard-go not installed (scripts/install-test-deps.sh)");
    }
    let c = Cluster::new(
        2,
        ClusterOpts {
            direct_link: true,
            ..Default::default()
        },
    )?;
    let (n0, n1) = (c.node(0), c.node(1));
    // Target address, the tunnel interface of each node, the WireGuard processes.
    let (target, ifnames, procs) = match p {
        "veth" => {
            r.detail = "veth pair, no encryption".into();
            (
                n1.underlay_ip.to_string(),
                ["eth0".to_string(), "eth0".to_string()],
                Vec::new(),
            )
        }
        "wireguard-go" | "boringtun" => {
            let (kind, comm) = if p == "boringtun" {
                (WgImpl::Boringtun, "boringtun-cli")
            } else {
                (WgImpl::WireguardGo, "wireguard-go")
            };
            let (k0, k1) = (wg_genkey()?, wg_genkey()?);
            let peer = |k: &weft_tests::WgKeys, n: &Node| WgPeer {
                public_key: k.public_key.clone(),
                endpoint: Some(format!("{}:{MESH_PORT}", n.underlay_ip)),
                allowed_ips: vec![n.pod_cidr.clone()],
                persistent_keepalive: None,
            };
            let if0 = n0.start_wg(kind, &k0.private_key, MESH_PORT, &[peer(&k1, n1)])?;
            let if1 = n1.start_wg(kind, &k1.private_key, MESH_PORT, &[peer(&k0, n0)])?;
            c.wait_mesh_ready(Duration::from_secs(20))?;
            r.detail = match kind {
                WgImpl::WireguardGo => version("wireguard-go", &["--version"]),
                WgImpl::Boringtun => version(
                    &find_program("boringtun-cli")
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    &["--version"],
                ),
            };
            let procs = wg_procs(r, [(n0, n0.wg_pid()), (n1, n1.wg_pid())], comm);
            (n1.mesh_ip.to_string(), [if0, if1], procs)
        }
        "meshd" => {
            let dir = meshd_dir.ok_or_else(|| anyhow!("no meshd dir"))?;
            weft_tests::set_bin_dir(&dir);
            let bin = weft_tests::workspace_bin("meshd")?;
            r.detail = format!("{}", bin.display());
            n0.start_meshd(&[])?;
            n1.start_meshd(&[])?;
            c.wait_mesh_ready(Duration::from_secs(20))?;
            let procs = wg_procs(r, [(n0, n0.meshd_pid()), (n1, n1.meshd_pid())], "meshd");
            (
                n1.mesh_ip.to_string(),
                ["weft0".to_string(), "weft0".to_string()],
                procs,
            )
        }
        other => bail!("unknown path {other}"),
    };
    // Reachability first: up to 15 s, since a first handshake initiation lost to a peer that was
    // not listening yet is retried only after WireGuard's 5 s REKEY_TIMEOUT.
    let mut pr = n0.ping(&target, &PingOpts::count(3).interval(0.05).wait(2))?;
    let start = std::time::Instant::now();
    while !pr.any_received() && start.elapsed() < Duration::from_secs(15) {
        pr = n0.ping(&target, &PingOpts::count(1).wait(1))?;
    }
    if !pr.any_received() {
        bail!("{target} not reachable over {p}: {}", pr.output);
    }
    // iperf3 server in node 1.
    let log = c.tmp.join("iperf3-server.log");
    let mut srv_cmd = ns_cmd(&n1.ns, "iperf3");
    srv_cmd.args(["-s", "-B", &target, "--forceflush"]);
    let _srv = Proc::spawn_logged("iperf3 -s", &mut srv_cmd, Some(&log))?;
    if !wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("Server listening")
    }) {
        bail!("iperf3 server did not start: {}", tail(&log, 10));
    }
    for run in 1..=args.runs {
        match n0.ping(&target, &PingOpts::count(args.pings).interval(0.01).wait(2)) {
            Ok(pr) => {
                eprintln!(
                    "weft-bench: {p} run {run}: ping {}/{} p50 {} ms p99 {} ms",
                    pr.received,
                    pr.transmitted,
                    fmt_opt(percentile(&pr.rtts_ms, 50.0), 3),
                    fmt_opt(percentile(&pr.rtts_ms, 99.0), 3)
                );
                r.ping_sent += pr.transmitted;
                r.ping_received += pr.received;
                r.rtts_ms.extend(pr.rtts_ms.iter().copied());
            }
            Err(e) => r.fail(&format!("run {run} ping"), &e),
        }
        for streams in [1, 4] {
            match tcp_run(&n0.ns, &target, args.seconds, streams, &procs) {
                Ok((t, cpu_err)) => {
                    eprintln!(
                        "weft-bench: {p} run {run}: TCP {streams} stream(s) {:.3} Gbit/s, CPU s \
                         {:?}",
                        t.gbits, t.cpu_secs
                    );
                    if let Some(e) = cpu_err {
                        r.fail(&format!("run {run} TCP {streams} CPU"), &e);
                    }
                    r.tcp.push(TcpRun { run, ..t });
                }
                Err(e) => r.fail(&format!("run {run} iperf3 TCP -P {streams}"), &e),
            }
        }
        // Let queues drain between measurements.
        std::thread::sleep(Duration::from_millis(500));
        match udp_measure(n0, n1, &ifnames, &target, args) {
            Ok(u) => {
                if !u.sweep.is_empty() {
                    eprintln!(
                        "weft-bench: {p} run {run}: UDP sweep (offered -> out of the tunnel, \
                         kpps): {}",
                        u.sweep_summary()
                    );
                }
                eprintln!(
                    "weft-bench: {p} run {run}: UDP {} B: {}",
                    args.udp_size,
                    u.summary()
                );
                r.udp.push(UdpRun { run, ..u });
            }
            Err(e) => r.fail(&format!("run {run} iperf3 UDP"), &e),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    if !procs.is_empty() {
        for wp in &procs {
            match mem_kib(wp.pid) {
                Ok((rss, hwm)) => r.mem_after_runs.push((wp.node.clone(), rss, hwm)),
                Err(e) => r.fail(&format!("memory of {}", wp.node), &e),
            }
        }
        eprintln!(
            "weft-bench: {p}: VmRSS/VmHWM KiB after the runs: {:?}",
            r.mem_after_runs
        );
        if args.peers > 0 {
            match many_peers(p, &c, n0, &ifnames[0], &procs[0], &target, args.peers) {
                Ok(m) => {
                    eprintln!(
                        "weft-bench: {p}: {} peers listed after {:.1} s; VmRSS {:.1} MiB, VmHWM \
                         {:.1} MiB; tunnel still pings: {}",
                        m.peers,
                        m.listed_after_secs,
                        mib(m.rss_kib),
                        mib(m.hwm_kib),
                        m.still_pings
                    );
                    r.many_peers = Some(m);
                }
                Err(e) => r.fail(&format!("{} peers", args.peers), &e),
            }
        }
    }
    Ok(())
}

fn version(prog: &str, args: &[&str]) -> String {
    let mut c = std::process::Command::new(prog);
    c.args(args).stdin(Stdio::null());
    run_timeout(&mut c, Duration::from_secs(5))
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}

/// CPU seconds of each process (utime + stime, all threads).
fn procs_cpu(procs: &[WgProc]) -> Result<Vec<f64>> {
    procs.iter().map(|p| cpu_secs(p.pid)).collect()
}

/// One TCP run with `streams` parallel streams; the error is about reading CPU times (the run
/// itself counts).
fn tcp_run(
    ns: &str,
    target: &str,
    secs: u32,
    streams: u32,
    procs: &[WgProc],
) -> Result<(TcpRun, Option<anyhow::Error>)> {
    let cpu0 = procs_cpu(procs);
    let v = iperf(ns, target, secs, &["-P", &streams.to_string()])?;
    let cpu1 = procs_cpu(procs);
    let bps = json_f64(&v, &["end", "sum_received", "bits_per_second"])?;
    let bytes = json_f64(&v, &["end", "sum_received", "bytes"])?;
    let (cpu_secs, err) = match (cpu0, cpu1) {
        (Ok(a), Ok(b)) => (b.iter().zip(&a).map(|(b, a)| b - a).collect(), None),
        (Err(e), _) | (_, Err(e)) => (Vec::new(), Some(e)),
    };
    Ok((
        TcpRun {
            run: 0,
            streams,
            gbits: bps / 1e9,
            bytes,
            cpu_secs,
        },
        err,
    ))
}

/// Packet counters of one interface in a namespace.
#[derive(Debug, Clone, Copy)]
struct LinkStats {
    rx_packets: u64,
    rx_bytes: u64,
    tx_packets: u64,
    tx_bytes: u64,
    tx_dropped: u64,
    /// Link-layer header bytes counted in the byte counters (14 on Ethernet, 0 on a TUN).
    l2_header: u64,
}

/// Datagrams of `payload` bytes in `bytes` bytes that crossed an interface as `packets` packets,
/// each with one `headers`-byte IP + UDP header: a GSO/GRO super-packet counts once in the
/// interface's packet counter but carries many datagrams behind one header, so the datagrams
/// are (bytes - headers * packets) / payload; without super-packets that is the packet count.
fn datagrams(bytes: u64, packets: u64, headers: u64, payload: u64) -> u64 {
    bytes.saturating_sub(headers * packets) / payload.max(1)
}

fn link_stats(ns: &str, ifname: &str) -> Result<LinkStats> {
    let out = run_args("ip", &["-n", ns, "-s", "-j", "link", "show", "dev", ifname])?;
    let v: Value =
        serde_json::from_str(&out).with_context(|| format!("`ip -s -j link` output: {out}"))?;
    let s = &v[0]["stats64"];
    let get = |dir: &str, k: &str| {
        s[dir][k]
            .as_u64()
            .ok_or_else(|| anyhow!("no stats64.{dir}.{k} for {ifname} in {ns}"))
    };
    Ok(LinkStats {
        rx_packets: get("rx", "packets")?,
        rx_bytes: get("rx", "bytes")?,
        tx_packets: get("tx", "packets")?,
        tx_bytes: get("tx", "bytes")?,
        l2_header: if v[0]["link_type"].as_str() == Some("ether") {
            14
        } else {
            0
        },
        tx_dropped: get("tx", "dropped")?,
    })
}

/// A counter of the `Udp:` lines of /proc/net/snmp in namespace `ns`.
fn udp_snmp(ns: &str, name: &str) -> Result<u64> {
    let s = run_in(ns, "cat", &["/proc/net/snmp"])?;
    let mut lines = s.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = lines
        .next()
        .zip(lines.next())
        .ok_or_else(|| anyhow!("no Udp: lines in /proc/net/snmp of {ns}"))?;
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| anyhow!("no Udp {name} in /proc/net/snmp of {ns}"))
}

/// One UDP measurement as `--udp-rate` says: a sweep (auto), -b 0 (max) or a fixed rate.
fn udp_measure(
    n0: &Node,
    n1: &Node,
    ifnames: &[String; 2],
    target: &str,
    args: &Args,
) -> Result<UdpRun> {
    let once = |rate: Option<u64>, secs: u32| {
        let r = udp_run(n0, n1, ifnames, target, args.udp_size, secs, rate);
        // Let the queues drain.
        std::thread::sleep(Duration::from_millis(300));
        r
    };
    match args.udp_rate {
        UdpRate::Max => once(None, args.seconds),
        UdpRate::Fixed(pps) => once(Some(pps), args.seconds),
        UdpRate::Auto => {
            let step = SWEEP_SECS.min(args.seconds);
            let probe = once(None, step).context("sweep at -b 0")?;
            let d0 = probe.pps();
            if d0 < 1.0 {
                bail!("the tunnel delivered nothing at -b 0");
            }
            let sender_max = probe.sent_pps();
            let mut best = (None, d0);
            let mut sweep = vec![probe];
            let mut rate = d0 * SWEEP_START;
            let mut worse = 0;
            for _ in 0..SWEEP_MAX_STEPS {
                if rate > sender_max || worse >= 2 {
                    break;
                }
                let r = rate.round() as u64;
                // A failed step counts as a worse one.
                match once(Some(r), step) {
                    Ok(u) => {
                        if u.pps() > best.1 {
                            best = (Some(r), u.pps());
                            worse = 0;
                        } else {
                            worse += 1;
                        }
                        sweep.push(u);
                    }
                    Err(e) => {
                        eprintln!("weft-bench: UDP sweep step at {r}/s failed: {e:#}");
                        worse += 1;
                    }
                }
                rate *= SWEEP_GROWTH;
            }
            let mut u = once(best.0, args.seconds)?;
            u.sweep = sweep;
            Ok(u)
        }
    }
}

/// One UDP run: iperf3 -u from node 0 at `rate` packets/s (None: -b 0) for `secs`, counters of
/// both tunnel interfaces around it.
fn udp_run(
    n0: &Node,
    n1: &Node,
    ifnames: &[String; 2],
    target: &str,
    size: u32,
    secs: u32,
    rate: Option<u64>,
) -> Result<UdpRun> {
    let tx0 = link_stats(&n0.ns, &ifnames[0])?;
    let rx0 = link_stats(&n1.ns, &ifnames[1])?;
    let rcvbuf0 = udp_snmp(&n1.ns, "RcvbufErrors")?;
    // iperf3 -b counts payload bits.
    let bitrate = rate.unwrap_or(0) * u64::from(size) * 8;
    let v = iperf(
        &n0.ns,
        target,
        secs,
        &["-u", "-b", &bitrate.to_string(), "-l", &size.to_string()],
    )?;
    let tx1 = link_stats(&n0.ns, &ifnames[0])?;
    let rx1 = link_stats(&n1.ns, &ifnames[1])?;
    let rcvbuf1 = udp_snmp(&n1.ns, "RcvbufErrors")?;
    let sent = json_f64(&v, &["end", "sum_sent", "packets"])? as u64;
    let seen = json_f64(&v, &["end", "sum_received", "packets"])? as u64;
    let lost = json_f64(&v, &["end", "sum_received", "lost_packets"])? as u64;
    let seconds = json_f64(&v, &["end", "sum_received", "seconds"])?;
    if seconds <= 0.0 || sent == 0 {
        bail!("iperf3 UDP sent {sent} datagrams in {seconds} s");
    }
    let headers = if target.contains(':') { 48 } else { 28 } + rx0.l2_header;
    let size = u64::from(size);
    Ok(UdpRun {
        run: 0,
        offered_pps: rate,
        seconds,
        sent,
        delivered: datagrams(
            rx1.rx_bytes.saturating_sub(rx0.rx_bytes),
            rx1.rx_packets.saturating_sub(rx0.rx_packets),
            headers,
            size,
        ),
        app_received: seen.saturating_sub(lost),
        sender_if_tx: datagrams(
            tx1.tx_bytes.saturating_sub(tx0.tx_bytes),
            tx1.tx_packets.saturating_sub(tx0.tx_packets),
            headers,
            size,
        ),
        sender_if_dropped: tx1.tx_dropped.saturating_sub(tx0.tx_dropped),
        rcvbuf_errors: rcvbuf1.saturating_sub(rcvbuf0),
        sweep: Vec::new(),
    })
}

/// `(VmRSS, VmHWM)` in KiB.
fn mem_kib(pid: u32) -> Result<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// A fake peer: registry name, public key, endpoint and pod range.
struct FakePeer {
    name: String,
    public_key: String,
    endpoint: String,
    pod_cidr: String,
}

fn fake_peers(n: usize) -> Vec<FakePeer> {
    let base = u32::from(FIRST_FAKE_RANGE);
    (0..n)
        .map(|i| FakePeer {
            name: format!("bench-{i:04}"),
            public_key: PrivateKey::generate().public_key().to_base64(),
            endpoint: format!("{FAKE_ENDPOINT_IP}:{}", 20_000 + i),
            pod_cidr: format!("{}/28", Ipv4Addr::from(base + (i as u32) * 16)),
        })
        .collect()
}

/// Gives node 0 `peers` peers in all (the real one plus fakes) and reads its process's memory
/// once it lists them all.
fn many_peers(
    p: &str,
    c: &Cluster,
    n0: &Node,
    ifname: &str,
    proc0: &WgProc,
    target: &str,
    peers: usize,
) -> Result<ManyPeers> {
    let fakes = fake_peers(peers.saturating_sub(1));
    let t0 = Instant::now();
    let listed = || -> Result<usize> {
        if p == "meshd" {
            Ok(n0.status_peer_names()?.len())
        } else {
            Ok(n0.exec("wg", &["show", ifname, "peers"])?.lines().count())
        }
    };
    if p == "meshd" {
        for f in &fakes {
            c.registry.write_record(&RecordSpec {
                name: f.name.clone(),
                public_key: f.public_key.clone(),
                endpoints: vec![f.endpoint.clone()],
                pod_cidrs: vec![f.pod_cidr.clone()],
                key_generation: 0,
            })?;
        }
    } else {
        let mut a: Vec<&str> = vec!["set", ifname];
        for f in &fakes {
            a.extend([
                "peer",
                &f.public_key,
                "endpoint",
                &f.endpoint,
                "allowed-ips",
                &f.pod_cidr,
            ]);
        }
        n0.exec("wg", &a)?;
    }
    let mut last = 0;
    let ok = wait_until(Duration::from_secs(60), || {
        last = listed().unwrap_or(last);
        last >= peers
    });
    if !ok {
        bail!("{} lists {last} peers after 60 s, not {peers}", n0.name);
    }
    let listed_after_secs = t0.elapsed().as_secs_f64();
    // Let the first handshake initiations to the new peers go out.
    std::thread::sleep(Duration::from_secs(3));
    let (rss_kib, hwm_kib) = mem_kib(proc0.pid)?;
    let still_pings = n0
        .ping(target, &PingOpts::count(3).interval(0.05).wait(2))
        .map(|r| r.all_received())
        .unwrap_or(false);
    Ok(ManyPeers {
        peers: last,
        rss_kib,
        hwm_kib,
        listed_after_secs,
        still_pings,
    })
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "n/a".into())
}

/// A column of the table: header, the figure, digits, whether it needs a process (else "-" for
/// veth), whether a ratio makes sense.
struct Column {
    header: &'static str,
    get: fn(&Figures) -> Option<f64>,
    digits: usize,
    per_process: bool,
    ratio: bool,
}

const UDP_HEADER: &str = "UDP kpps";
const PEERS_HEADER: &str = "RSS MiB, N peers";

fn columns() -> Vec<Column> {
    vec![
        Column {
            header: "TCP 1 stream Gbit/s",
            get: |f| f.tcp1,
            digits: 3,
            per_process: false,
            ratio: true,
        },
        Column {
            header: "TCP 4 streams Gbit/s",
            get: |f| f.tcp4,
            digits: 3,
            per_process: false,
            ratio: true,
        },
        Column {
            header: UDP_HEADER,
            get: |f| f.udp_pps.map(|p| p / 1e3),
            digits: 1,
            per_process: false,
            ratio: true,
        },
        Column {
            header: "UDP loss %",
            get: |f| f.udp_loss_pct,
            digits: 1,
            per_process: false,
            ratio: false,
        },
        Column {
            header: "ping p50 ms",
            get: |f| f.ping_p50,
            digits: 3,
            per_process: false,
            ratio: true,
        },
        Column {
            header: "ping p99 ms",
            get: |f| f.ping_p99,
            digits: 3,
            per_process: false,
            ratio: true,
        },
        Column {
            header: "CPU s/GB",
            get: |f| f.cpu_s_per_gb,
            digits: 2,
            per_process: true,
            ratio: true,
        },
        Column {
            header: "RSS MiB",
            get: |f| f.rss_mib,
            digits: 1,
            per_process: true,
            ratio: true,
        },
        Column {
            header: PEERS_HEADER,
            get: |f| f.rss_peers_mib,
            digits: 1,
            per_process: true,
            ratio: true,
        },
    ]
}

fn header_of(c: &Column, args: &Args) -> String {
    c.header
        .replace("N peers", &format!("{} peers", args.peers))
}

fn anchor<'a>(results: &'a [PathResult], name: &str) -> Option<&'a PathResult> {
    results
        .iter()
        .find(|r| r.name == name && r.unavailable.is_none())
}

/// One target of the issue and whether it is met.
#[derive(Debug)]
struct Target {
    what: String,
    /// None: not measured.
    met: Option<bool>,
    figures: String,
}

fn targets(results: &[PathResult], args: &Args) -> Vec<Target> {
    let m = anchor(results, "meshd").map(PathResult::figures);
    let b = anchor(results, "boringtun").map(PathResult::figures);
    let w = anchor(results, "wireguard-go").map(PathResult::figures);
    let get = |f: Option<Figures>, g: fn(&Figures) -> Option<f64>| f.as_ref().and_then(g);
    let ratio_target = |what: String,
                        unit: &str,
                        anchor_name: &str,
                        mv: Option<f64>,
                        av: Option<f64>,
                        want: f64| {
        match (mv, av) {
            (Some(mv), Some(av)) if av > 0.0 => Target {
                what,
                met: Some(mv / av >= want),
                figures: format!(
                    "meshd {mv:.3} {unit}, {anchor_name} {av:.3} {unit}: {:.2}×",
                    mv / av
                ),
            },
            _ => Target {
                what,
                met: None,
                figures: format!("meshd {}, {anchor_name} {}", fmt_opt(mv, 3), fmt_opt(av, 3)),
            },
        }
    };
    let mut t = vec![
        ratio_target(
            format!("TCP single stream ≥ {TCP_VS_BORINGTUN}× boringtun-cli"),
            "Gbit/s",
            "boringtun-cli",
            get(m, |f| f.tcp1),
            get(b, |f| f.tcp1),
            TCP_VS_BORINGTUN,
        ),
        ratio_target(
            format!("TCP single stream ≥ {TCP_VS_WIREGUARD_GO}× wireguard-go"),
            "Gbit/s",
            "wireguard-go",
            get(m, |f| f.tcp1),
            get(w, |f| f.tcp1),
            TCP_VS_WIREGUARD_GO,
        ),
    ];
    let (mp, bp) = (get(m, |f| f.ping_p50), get(b, |f| f.ping_p50));
    t.push(Target {
        what: "ping p50 ≤ boringtun-cli's".into(),
        met: mp.zip(bp).map(|(mp, bp)| mp <= bp),
        figures: format!(
            "meshd {} ms, boringtun-cli {} ms",
            fmt_opt(mp, 3),
            fmt_opt(bp, 3)
        ),
    });
    t.push(ratio_target(
        format!(
            "UDP {} B packets/s ≥ {PPS_VS_BORINGTUN}× boringtun-cli",
            args.udp_size
        ),
        "kpps",
        "boringtun-cli",
        get(m, |f| f.udp_pps.map(|p| p / 1e3)),
        get(b, |f| f.udp_pps.map(|p| p / 1e3)),
        PPS_VS_BORINGTUN,
    ));
    let rss = get(m, |f| f.rss_peers_mib);
    t.push(Target {
        what: format!("meshd RSS ≤ {RSS_PEERS_MAX_MIB} MiB with {TARGET_PEERS} peers"),
        met: if args.peers == TARGET_PEERS {
            rss.map(|v| v <= RSS_PEERS_MAX_MIB)
        } else {
            None
        },
        figures: format!("meshd {} MiB with {} peers", fmt_opt(rss, 1), args.peers),
    });
    t
}

fn render(
    results: &[PathResult],
    targets: &[Target],
    args: &Args,
    load: &str,
    load_end: &str,
) -> String {
    let cols = columns();
    let mut s = format!(
        "\nTwo netns joined by a veth pair. Per path {} run(s): {} pings at 10 ms, iperf3 TCP 1 and \
         4 streams and UDP {} B payloads ({}), {} s each. Medians over the runs; ping p50/p99 \
         over all pings; UDP kpps = packets out of the receiver's tunnel per second, loss against \
         iperf3's sent count; CPU = both nodes' WireGuard processes per 1e9 bytes over all TCP \
         runs; RSS = the larger node after the runs, then node 0 with {} peers. loadavg {} at \
         start, {} at the end.\n\n",
        args.runs,
        args.pings,
        args.udp_size,
        match args.udp_rate {
            UdpRate::Auto => format!(
                "offered at the rate that got the most through in a sweep of {SWEEP_SECS} s steps: \
                 -b 0, then from {SWEEP_START} times what -b 0 got through up by {SWEEP_GROWTH}x \
                 per step while it helps"
            ),
            UdpRate::Max => "-b 0".to_string(),
            UdpRate::Fixed(pps) => format!("offered at {pps} packets/s"),
        },
        args.seconds,
        args.peers,
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        load_end.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    );
    // Main table.
    s.push_str("| data path |");
    for c in &cols {
        s.push_str(&format!(" {} |", header_of(c, args)));
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|".repeat(cols.len()));
    s.push('\n');
    for r in results {
        s.push_str(&format!("| {} |", r.label()));
        if let Some(u) = &r.unavailable {
            s.push_str(&format!(" unavailable: {} |", u.replace('|', "/")));
            s.push_str(&" |".repeat(cols.len() - 1));
            s.push('\n');
            continue;
        }
        let f = r.figures();
        for c in &cols {
            let cell = if (c.per_process && !r.has_process())
                || (c.header == PEERS_HEADER && args.peers == 0)
            {
                "-".to_string()
            } else if c.header == UDP_HEADER && f.udp_sender_bound {
                format!("{}*", fmt_opt((c.get)(&f), c.digits))
            } else {
                fmt_opt((c.get)(&f), c.digits)
            };
            s.push_str(&format!(" {cell} |"));
        }
        s.push('\n');
    }
    if results.iter().any(|r| r.figures().udp_sender_bound) {
        s.push_str(
            "\n\\* sender-bound: no loss and iperf3 sent less than offered, so the path carries \
             more than this.\n",
        );
    }
    // Ratio tables.
    for (anchor_name, anchor_label) in [
        ("boringtun", "boringtun-cli"),
        ("wireguard-go", "wireguard-go"),
    ] {
        s.push_str(&format!(
            "\nRatios to {anchor_label} (figure / {anchor_label}'s; for ping, CPU and RSS lower is \
             better):\n\n"
        ));
        let Some(a) = anchor(results, anchor_name) else {
            let why = if results.iter().any(|r| r.name == anchor_name) {
                "unavailable"
            } else {
                "not in this run (--only)"
            };
            s.push_str(&format!("{anchor_label} {why}: no ratios.\n"));
            continue;
        };
        let af = a.figures();
        let rcols: Vec<&Column> = cols.iter().filter(|c| c.ratio).collect();
        s.push_str("| data path |");
        for c in &rcols {
            s.push_str(&format!(" {} |", header_of(c, args)));
        }
        s.push_str("\n|---|");
        s.push_str(&"---:|".repeat(rcols.len()));
        s.push('\n');
        for r in results.iter().filter(|r| r.unavailable.is_none()) {
            let f = r.figures();
            s.push_str(&format!("| {} |", r.label()));
            for c in &rcols {
                let cell = if (c.per_process && !r.has_process())
                    || (c.header == PEERS_HEADER && args.peers == 0)
                {
                    "-".to_string()
                } else {
                    match ((c.get)(&f), (c.get)(&af)) {
                        (Some(x), Some(y)) if y > 0.0 => format!("{:.2}", x / y),
                        _ => "n/a".into(),
                    }
                };
                s.push_str(&format!(" {cell} |"));
            }
            s.push('\n');
        }
    }
    s.push_str("\nTargets (issue 6):\n\n");
    for t in targets {
        let verdict = match t.met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        s.push_str(&format!("- {}: {verdict} ({})\n", t.what, t.figures));
    }
    // Per-run figures and anything that went wrong.
    s.push_str("\nPer run:\n\n```\n");
    for r in results.iter().filter(|r| r.unavailable.is_none()) {
        for run in 1..=args.runs {
            for t in r.tcp.iter().filter(|t| t.run == run) {
                s.push_str(&format!(
                    "{} run {run}: TCP {} {:.3} Gbit/s{}\n",
                    r.name,
                    if t.streams == 1 {
                        "1 stream ".to_string()
                    } else {
                        format!("{} streams", t.streams)
                    },
                    t.gbits,
                    if t.cpu_secs.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " (CPU s {})",
                            t.cpu_secs
                                .iter()
                                .map(|c| format!("{c:.2}"))
                                .collect::<Vec<_>>()
                                .join(" + ")
                        )
                    }
                ));
            }
            for u in r.udp.iter().filter(|u| u.run == run) {
                if !u.sweep.is_empty() {
                    s.push_str(&format!(
                        "{} run {run}: UDP sweep (offered -> out of the tunnel, kpps): {}\n",
                        r.name,
                        u.sweep_summary()
                    ));
                }
                s.push_str(&format!(
                    "{} run {run}: UDP {} B: {}\n",
                    r.name,
                    args.udp_size,
                    u.summary()
                ));
            }
        }
        if !r.mem_after_runs.is_empty() {
            s.push_str(&format!(
                "{}: after the runs VmRSS {}\n",
                r.name,
                r.mem_after_runs
                    .iter()
                    .map(|(n, rss, hwm)| format!(
                        "{n} {:.1} MiB (VmHWM {:.1})",
                        mib(*rss),
                        mib(*hwm)
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if let Some(m) = &r.many_peers {
            s.push_str(&format!(
                "{}: node-0 with {} peers VmRSS {:.1} MiB (VmHWM {:.1}){}\n",
                r.name,
                m.peers,
                mib(m.rss_kib),
                mib(m.hwm_kib),
                if m.still_pings {
                    ""
                } else {
                    " (the tunnel no longer answered pings)"
                }
            ));
        }
    }
    s.push_str("```\n");
    let errors: Vec<String> = results
        .iter()
        .flat_map(|r| {
            let mut v: Vec<String> = r
                .errors
                .iter()
                .map(|e| format!("{}: {e}", r.name))
                .collect();
            if let Some(u) = &r.unavailable {
                v.push(format!("{}: unavailable: {u}", r.name));
            }
            v
        })
        .collect();
    if !errors.is_empty() {
        s.push_str("\nFailed measurements:\n\n");
        for e in errors {
            s.push_str(&format!("- {}\n", e.lines().next().unwrap_or("")));
        }
    }
    s
}

fn figures_json(f: &Figures) -> Value {
    json!({
        "tcp1Gbits": f.tcp1,
        "tcp4Gbits": f.tcp4,
        "udpPps": f.udp_pps,
        "udpLossPct": f.udp_loss_pct,
        "pingP50Ms": f.ping_p50,
        "pingP99Ms": f.ping_p99,
        "cpuSecsPerGB": f.cpu_s_per_gb,
        "rssMiB": f.rss_mib,
        "rssManyPeersMiB": f.rss_peers_mib,
    })
}

fn ratios_json(f: &Figures, a: Option<Figures>) -> Value {
    let Some(a) = a else {
        return Value::Null;
    };
    let r = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) if y > 0.0 => Some(x / y),
        _ => None,
    };
    json!({
        "tcp1Gbits": r(f.tcp1, a.tcp1),
        "tcp4Gbits": r(f.tcp4, a.tcp4),
        "udpPps": r(f.udp_pps, a.udp_pps),
        "pingP50Ms": r(f.ping_p50, a.ping_p50),
        "pingP99Ms": r(f.ping_p99, a.ping_p99),
        "cpuSecsPerGB": r(f.cpu_s_per_gb, a.cpu_s_per_gb),
        "rssMiB": r(f.rss_mib, a.rss_mib),
        "rssManyPeersMiB": r(f.rss_peers_mib, a.rss_peers_mib),
    })
}

fn to_json(
    results: &[PathResult],
    targets: &[Target],
    args: &Args,
    load: &str,
    load_end: &str,
    table: &str,
) -> Value {
    let b = anchor(results, "boringtun").map(PathResult::figures);
    let w = anchor(results, "wireguard-go").map(PathResult::figures);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "runs": args.runs,
        "seconds": args.seconds,
        "pingsPerRun": args.pings,
        "udpSize": args.udp_size,
        "peers": args.peers,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "kernel": kernel.trim(),
        "loadavgAtStart": load.trim(),
        "loadavgAtEnd": load_end.trim(),
        "paths": results.iter().map(|r| {
            let f = r.figures();
            json!({
                "name": r.name,
                "detail": r.detail,
                "unavailable": r.unavailable,
                "figures": figures_json(&f),
                "ratioToBoringtun": ratios_json(&f, b),
                "ratioToWireguardGo": ratios_json(&f, w),
                "tcpRuns": r.tcp.iter().map(|t| json!({
                    "run": t.run,
                    "streams": t.streams,
                    "gbits": t.gbits,
                    "bytes": t.bytes,
                    "cpuSecs": t.cpu_secs,
                })).collect::<Vec<_>>(),
                "udpRuns": r.udp.iter().map(|u| json!({
                    "run": u.run,
                    "offeredPps": u.offered_pps,
                    "senderBound": u.sender_bound(),
                    "sweep": u.sweep.iter().map(|w| json!({
                        "offeredPps": w.offered_pps,
                        "seconds": w.seconds,
                        "sent": w.sent,
                        "delivered": w.delivered,
                        "pps": w.pps(),
                    })).collect::<Vec<_>>(),
                    "seconds": u.seconds,
                    "sent": u.sent,
                    "delivered": u.delivered,
                    "pps": u.pps(),
                    "lossPct": u.loss_pct(),
                    "iperf3Received": u.app_received,
                    "senderIfTx": u.sender_if_tx,
                    "senderIfDropped": u.sender_if_dropped,
                    "receiverRcvbufErrors": u.rcvbuf_errors,
                })).collect::<Vec<_>>(),
                "pingSent": r.ping_sent,
                "pingReceived": r.ping_received,
                "pingAvgMs": if r.rtts_ms.is_empty() { None } else { Some(r.rtts_ms.iter().sum::<f64>() / r.rtts_ms.len() as f64) },
                "memAfterRuns": r.mem_after_runs.iter().map(|(n, rss, hwm)| json!({
                    "node": n, "rssKiB": rss, "hwmKiB": hwm,
                })).collect::<Vec<_>>(),
                "manyPeers": r.many_peers.as_ref().map(|m| json!({
                    "peers": m.peers,
                    "rssKiB": m.rss_kib,
                    "hwmKiB": m.hwm_kib,
                    "listedAfterSecs": m.listed_after_secs,
                    "stillPings": m.still_pings,
                })),
                "errors": r.errors,
            })
        }).collect::<Vec<_>>(),
        "targets": targets.iter().map(|t| json!({
            "target": t.what,
            "met": t.met,
            "figures": t.figures,
        })).collect::<Vec<_>>(),
        "table": table,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_peers_are_distinct() {
        let f = fake_peers(3);
        assert_eq!(f[0].pod_cidr, "10.42.16.0/28");
        assert_eq!(f[1].pod_cidr, "10.42.16.16/28");
        assert_eq!(f[2].endpoint, "198.18.0.1:20002");
        assert_ne!(f[0].public_key, f[1].public_key);
    }

    #[test]
    fn udp_loss() {
        let u = UdpRun {
            seconds: 2.0,
            sent: 1000,
            delivered: 250,
            ..Default::default()
        };
        assert_eq!(u.pps(), 125.0);
        assert_eq!(u.loss_pct(), 75.0);
    }

    #[test]
    fn datagrams_behind_super_packets() {
        // 10 plain 64-byte datagrams over IPv4: 10 packets of 92 bytes.
        assert_eq!(datagrams(920, 10, 28, 64), 10);
        // 3 USO super-packets of 40, 40 and 20 datagrams.
        assert_eq!(datagrams(3 * 28 + 100 * 64, 3, 28, 64), 100);
        assert_eq!(datagrams(0, 0, 28, 64), 0);
        assert_eq!(datagrams(10, 1, 28, 0), 0);
    }
}
