//! weft-registry-bench: how fast one meshd takes in many node records from a registry, what 1000
//! peers cost it, and how many registry requests it makes when nothing changes: the kube
//! registry (MeshNodes on a real kube-apiserver) and the etcd registry side by side.
//!
//! Each (backend, mode) runs on a fresh one-node cluster with one meshd (release build:
//! `WEFT_BIN_DIR` or target/release) and `--log-format json`:
//!   kube  a real kube-apiserver v1.37.2 in the switch namespace (`Cluster::start_kube`, no
//!         controller manager) with an audit log, `kubectl apply --server-side -k deploy/`, the
//!         Node object of node-0 (InternalIP, spec.podCIDRs), and meshd with
//!         `--registry kube --kubeconfig FILE` holding a ServiceAccount token of
//!         weft-system/meshd bound to a Pod on node-0 (neither --endpoint nor --pod-cidr: both
//!         come from the Node), as `KubeMesh::start_meshd` in tests/kube.rs;
//!   etcd  a real etcd (Debian's) in the switch namespace (`Cluster::start_etcd`) and meshd with
//!         `--registry etcd://198.18.0.1:2379`.
//! A load generator then writes `--records` valid node records (fresh X25519 keys, a distinct /28
//! inside the cluster CIDR 10.42.0.0/16 each, endpoint 198.51.100.X:P, unique per record, where
//! nobody listens) with meshd's own registry client (`weft_registry::put_node`, from a thread that
//! entered the switch namespace): on kube as the admin (client certificate in system:masters,
//! field manager `weft-registry-bench`, server-side apply), on etcd without authentication.
//!   steady  at `--rate` records/s (default 200),
//!   burst   all at once (`--concurrency` writes in flight, default 64).
//! The write time of a record is the wall clock just before its write is issued.
//!
//! "Installed in the data path" is meshd's `peer routed` log line (info; emitted once every route
//! of a peer is in the kernel, after the peer was added to the node). Its timestamp (same
//! machine, same wall clock) minus the write time is the latency. Reading the log costs meshd
//! nothing and gives each peer's own time; polling `meshd status --json` every 50 ms would make
//! meshd serialise 1000 peers 20 times a second (load on the process measured) and quantise every
//! latency to the poll interval. At the end the bench checks that `meshd status` lists every peer
//! and the kernel holds every route.
//!
//! On kube the audit log also tells when the API server completed each write, which splits the
//! latency into the write itself and "API server done -> routed" (watch delivery and meshd).
//!
//! Resources come from /proc/<meshd pid>: VmRSS and VmHWM once every peer is installed, CPU
//! seconds (utime + stime, all threads) from the first write until the last peer is installed
//! (the log is polled every 50 ms, so up to 50 ms of idle time is included), and CPU % over an
//! idle window (`--idle`, default 60 s, reported per 10 s with VmRSS) that starts `--settle`
//! seconds (default 5) after the last peer was installed. The RSS target is checked against the
//! highest VmRSS seen. boringtun logs `CONNECTION_EXPIRED` (ERROR) once per bench peer 90 s
//! after its first handshake initiation; those are counted apart from meshd's warnings.
//!
//! Requests meshd makes, counted on the server's side:
//!   kube  the API server's audit log (policy: level Metadata for everything, stage
//!         RequestReceived omitted): every request of user
//!         `system:serviceaccount:weft-system:meshd` received in the window, once per audit ID,
//!         by verb and resource. A watch is one (long) request, counted when it is received.
//!   etcd  etcd's /metrics (gRPC server counters) before and after the window: unary calls
//!         started plus messages received on streams (each lease keep-alive, each watch
//!         request). meshd is etcd's only client in the baseline and idle windows (during the
//!         load the generator's own list and writes are counted too, and said so).
//! Windows: `--baseline` seconds (default 30) before the load, with 0 bench peers; the load
//! (first write until the last peer is installed); the idle window.
//!
//! Usage (root): weft-registry-bench [--records N (1000)] [--backends kube,etcd] [--modes steady]
//!                               [--rate R (200)] [--concurrency N (64)] [--idle SECS (60)]
//!                               [--settle SECS (5)] [--baseline SECS (30)]
//!                               [--timeout SECS (180)] [--json FILE|-]

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use weft_core::record::{NodeRecord, SCHEMA_VERSION};
use weft_core::PrivateKey;
use weft_tests::kube::{KubeControlPlane, KubeOpts};
use weft_tests::perf::cpu_secs;
use weft_tests::util::{ns_cmd, percentile, run_args, run_in_netns, run_timeout};
use weft_tests::{Cluster, Etcd, Node};

/// First pod range handed out (10.42.16.0/28); node-0 has 10.42.1.0/24.
const FIRST_RANGE: Ipv4Addr = Ipv4Addr::new(10, 42, 16, 0);
/// Ranges are /28: 16 addresses each.
const RANGE_LEN: u8 = 28;
/// At most this many records fit between 10.42.16.0 and 10.42.255.255.
const MAX_RECORDS: usize = (256 - 16) * 16;
/// meshd's log line once a peer's routes are in place.
const ROUTED_MSG: &str = "peer routed";
/// The Kubernetes namespace and ServiceAccount of meshd in deploy/.
const NS: &str = "weft-system";
const MESHD_SA: &str = "meshd";
/// The user meshd's pod-bound token authenticates as.
const MESHD_USER: &str = "system:serviceaccount:weft-system:meshd";
/// Field manager of the load generator's server-side applies.
const FIELD_MANAGER: &str = "weft-registry-bench";
/// Target: p99 of write -> installed.
const TARGET_P99_MS: f64 = 1000.0;
/// Target: VmRSS at N peers.
const TARGET_RSS_MIB: f64 = 64.0;
/// What "O(1) per node per 30 s" is held to: at most this many requests per 30 s of idling
/// (one meshd: per node), whatever N is.
const TARGET_IDLE_PER_30S: f64 = 10.0;
/// Minimal audit policy: every request at level Metadata, one event per stage past
/// RequestReceived (ResponseStarted for watches, ResponseComplete for all).
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages:
  - RequestReceived
rules:
  - level: Metadata
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Kube,
    Etcd,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Kube => "kube",
            Backend::Etcd => "etcd",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Steady,
    Burst,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Steady => "steady",
            Mode::Burst => "burst",
        }
    }
}

#[derive(Debug)]
struct Args {
    records: usize,
    backends: Vec<Backend>,
    modes: Vec<Mode>,
    rate: f64,
    concurrency: usize,
    idle: Duration,
    settle: Duration,
    baseline: Duration,
    timeout: Duration,
    json: Option<PathBuf>,
}

const USAGE: &str =
    "weft-registry-bench [--records N] [--backends kube,etcd] [--modes steady,burst] \
                     [--rate R] [--concurrency N] [--idle SECS] [--settle SECS] \
                     [--baseline SECS] [--timeout SECS] [--json FILE|-]";

fn parse_args() -> Result<Args> {
    let mut a = Args {
        records: 1000,
        backends: vec![Backend::Kube, Backend::Etcd],
        modes: vec![Mode::Steady],
        rate: 200.0,
        concurrency: 64,
        idle: Duration::from_secs(60),
        settle: Duration::from_secs(5),
        baseline: Duration::from_secs(30),
        timeout: Duration::from_secs(180),
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
        let secs = |name: &str| -> Result<Duration> {
            Ok(Duration::from_secs(
                val()?.parse().context(name.to_string())?,
            ))
        };
        match v[i].as_str() {
            "--records" => a.records = val()?.parse().context("--records")?,
            "--rate" => a.rate = val()?.parse().context("--rate")?,
            "--concurrency" => a.concurrency = val()?.parse().context("--concurrency")?,
            "--idle" => a.idle = secs("--idle")?,
            "--settle" => a.settle = secs("--settle")?,
            "--baseline" => a.baseline = secs("--baseline")?,
            "--timeout" => a.timeout = secs("--timeout")?,
            "--json" => a.json = Some(PathBuf::from(val()?)),
            "--backends" => {
                a.backends = val()?
                    .split(',')
                    .map(|b| match b.trim() {
                        "kube" => Ok(Backend::Kube),
                        "etcd" => Ok(Backend::Etcd),
                        other => Err(anyhow!("unknown backend {other}; known: kube,etcd")),
                    })
                    .collect::<Result<_>>()?;
            }
            "--modes" => {
                a.modes = val()?
                    .split(',')
                    .map(|m| match m.trim() {
                        "steady" => Ok(Mode::Steady),
                        "burst" => Ok(Mode::Burst),
                        other => Err(anyhow!("unknown mode {other}; known: steady,burst")),
                    })
                    .collect::<Result<_>>()?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
        i += 2;
    }
    if a.records == 0 || a.records > MAX_RECORDS {
        bail!("--records must be in 1..={MAX_RECORDS}");
    }
    if !(a.rate > 0.0 && a.rate.is_finite()) {
        bail!("--rate must be positive");
    }
    if a.concurrency == 0 || a.modes.is_empty() || a.backends.is_empty() {
        bail!("--concurrency, --modes and --backends must not be empty");
    }
    if a.idle.is_zero() {
        bail!("--idle must be at least 1 s");
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("weft-registry-bench: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = weft_tests::util::require_root().and_then(|_| run(&args)) {
        eprintln!("weft-registry-bench: {e:#}");
        std::process::exit(1);
    }
}

/// Requests meshd made in one window, as the server counted them.
#[derive(Debug, Default, Clone)]
struct Requests {
    secs: f64,
    /// By `verb resource` (kube) or gRPC method (etcd).
    by_kind: BTreeMap<String, u64>,
    /// kube: meshd's watches still open at the end of the window, by resource.
    open_watches: Option<BTreeMap<String, u64>>,
}

impl Requests {
    fn total(&self) -> u64 {
        self.by_kind.values().sum()
    }

    fn per_min(&self) -> f64 {
        self.total() as f64 * 60.0 / self.secs.max(1e-3)
    }

    fn summary(&self) -> String {
        if self.by_kind.is_empty() {
            return "none".into();
        }
        self.by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn to_json(&self) -> Value {
        json!({
            "secs": self.secs,
            "total": self.total(),
            "perMin": self.per_min(),
            "byKind": self.by_kind,
            "openWatches": self.open_watches,
        })
    }
}

/// What one (backend, mode) measured.
#[derive(Debug, Default)]
struct RunResult {
    backend: &'static str,
    mode: &'static str,
    /// From the first write issued until the last acknowledged.
    write_secs: f64,
    /// Per record, ms from its write being issued to meshd's `peer routed` line.
    latency_ms: Vec<f64>,
    /// Per record, ms from its write being acknowledged to `peer routed`.
    latency_ack_ms: Vec<f64>,
    /// From the first write issued until the last peer was routed.
    all_routed_secs: f64,
    rss_start_kib: u64,
    rss_kib: u64,
    hwm_kib: u64,
    rss_after_idle_kib: u64,
    cpu_load_secs: f64,
    idle_cpu_pct: f64,
    /// CPU % per 10 s of the idle window.
    idle_cpu_pct_per_10s: Vec<f64>,
    /// VmRSS at the end of each 10 s of the idle window.
    idle_rss_kib_per_10s: Vec<u64>,
    baseline_requests: Option<Requests>,
    load_requests: Requests,
    idle_requests: Requests,
    status_peers: usize,
    kernel_routes: usize,
    /// WARN/ERROR lines in meshd's log, less boringtun's `CONNECTION_EXPIRED` (counted apart).
    warnings: usize,
    /// boringtun giving up the handshake with a peer that never answered (90 s after its first
    /// initiation): expected once per bench peer when the window reaches that far.
    handshakes_expired: usize,
    /// kube: per record, ms from the API server completing its write (the audit log's
    /// `stageTimestamp`) to `peer routed`: the watch path and meshd alone.
    latency_server_ms: Vec<f64>,
}

fn run(args: &Args) -> Result<()> {
    let dir = meshd_release_dir()?;
    weft_tests::set_bin_dir(&dir);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "weft-registry-bench: {} records per run, backends {}, modes {}, steady rate {}/s, meshd from \
         {}; loadavg at start: {}",
        args.records,
        args.backends
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>()
            .join(","),
        args.modes
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(","),
        args.rate,
        dir.display(),
        load.trim()
    );
    let mut results = Vec::new();
    for &backend in &args.backends {
        for &mode in &args.modes {
            eprintln!(
                "weft-registry-bench: === {} {}",
                backend.name(),
                mode.name()
            );
            results.push(
                run_one(args, backend, mode)
                    .with_context(|| format!("{} {}", backend.name(), mode.name()))?,
            );
        }
    }
    let table = render(args, &results);
    if let Some(path) = &args.json {
        let runs: Vec<Value> = results
            .iter()
            .map(|r| {
                json!({
                    "backend": r.backend,
                    "mode": r.mode,
                    "records": args.records,
                    "writeSecs": r.write_secs,
                    "allRoutedSecs": r.all_routed_secs,
                    "latencyMs": stats(&r.latency_ms),
                    "latencyFromAckMs": stats(&r.latency_ack_ms),
                    "rssStartKiB": r.rss_start_kib,
                    "rssKiB": r.rss_kib,
                    "hwmKiB": r.hwm_kib,
                    "rssAfterIdleKiB": r.rss_after_idle_kib,
                    "cpuLoadSecs": r.cpu_load_secs,
                    "idleCpuPct": r.idle_cpu_pct,
                    "idleCpuPctPer10s": r.idle_cpu_pct_per_10s,
                    "idleRssKiBPer10s": r.idle_rss_kib_per_10s,
                    "writeMs": stats(&write_ms(r)),
                    "baselineRequests": r.baseline_requests.as_ref().map(Requests::to_json),
                    "loadRequests": r.load_requests.to_json(),
                    "idleRequests": r.idle_requests.to_json(),
                    "statusPeers": r.status_peers,
                    "kernelRoutes": r.kernel_routes,
                    "meshdWarnings": r.warnings,
                    "handshakesExpired": r.handshakes_expired,
                    "latencyFromServerMs": stats(&r.latency_server_ms),
                    "targets": {
                        "p99": met(pct(&r.latency_ms, 99.0) <= TARGET_P99_MS),
                        "rss": met(mib(rss_max(r)) <= TARGET_RSS_MIB),
                        "idleRequests": met(idle_met(&r.idle_requests)),
                    },
                })
            })
            .collect();
        let v = json!({
            "records": args.records,
            "rate": args.rate,
            "concurrency": args.concurrency,
            "idleSecs": args.idle.as_secs_f64(),
            "settleSecs": args.settle.as_secs_f64(),
            "baselineSecs": args.baseline.as_secs_f64(),
            "loadavgStart": load.trim(),
            "runs": runs,
            "table": table,
        });
        let text = serde_json::to_string_pretty(&v)?;
        if path.as_os_str() == "-" {
            println!("{text}");
        } else {
            print!("{table}");
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("weft-registry-bench: wrote {}", path.display());
        }
    } else {
        print!("{table}");
    }
    Ok(())
}

fn stats(v: &[f64]) -> Value {
    json!({"p50": pct(v, 50.0), "p99": pct(v, 99.0), "max": pct(v, 100.0), "min": pct(v, 0.0)})
}

fn pct(v: &[f64], q: f64) -> f64 {
    percentile(v, q).unwrap_or(f64::NAN)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The highest VmRSS seen: once all were installed, every 10 s of the idle window, after it.
fn rss_max(r: &RunResult) -> u64 {
    r.idle_rss_kib_per_10s
        .iter()
        .copied()
        .chain([r.rss_kib, r.rss_after_idle_kib])
        .max()
        .unwrap_or(0)
}

/// Per record, ms from its write being issued to it being acknowledged.
fn write_ms(r: &RunResult) -> Vec<f64> {
    r.latency_ms
        .iter()
        .zip(&r.latency_ack_ms)
        .map(|(a, b)| a - b)
        .collect()
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "not met"
    }
}

fn idle_met(r: &Requests) -> bool {
    r.total() as f64 * 30.0 / r.secs.max(1e-3) <= TARGET_IDLE_PER_30S
}

fn render(args: &Args, results: &[RunResult]) -> String {
    let mut t = format!(
        "\nweft-registry-bench: {} node records written (kube: MeshNodes by server-side apply as \
         admin; etcd: keys), one meshd (release) watching; latency = write issued -> meshd \
         `peer routed` log line; requests counted by the server (kube: audit log, user {MESHD_USER}; \
         etcd: gRPC counters)\n\n",
        args.records
    );
    t.push_str(
        "| backend | mode | N | p50 ms | p99 ms | max ms | RSS MiB | RSS MiB after idle \
         | CPU s during load | idle CPU % | idle requests/min |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        let mode = match r.mode {
            "steady" => format!("steady {}/s", args.rate),
            other => format!("{other} ({} in flight)", args.concurrency),
        };
        t.push_str(&format!(
            "| {} | {mode} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.1} |\n",
            r.backend,
            r.latency_ms.len(),
            pct(&r.latency_ms, 50.0),
            pct(&r.latency_ms, 99.0),
            pct(&r.latency_ms, 100.0),
            mib(r.rss_kib),
            mib(r.rss_after_idle_kib),
            r.cpu_load_secs,
            r.idle_cpu_pct,
            r.idle_requests.per_min(),
        ));
    }
    t.push_str(&format!(
        "\ntargets: p99 <= {TARGET_P99_MS:.0} ms, VmRSS <= {TARGET_RSS_MIB:.0} MiB at {} peers, \
         idle requests O(1) per node per 30 s (held to <= {TARGET_IDLE_PER_30S:.0} per 30 s, \
         whatever N); idle window {} s starting {} s after the last peer was installed (CPU: \
         100 % = one core)\n",
        args.records,
        args.idle.as_secs(),
        args.settle.as_secs()
    ));
    for r in results {
        let who = format!("{} {}", r.backend, r.mode);
        t.push_str(&format!(
            "{who}: p99 {:.1} ms: {}; VmRSS (highest seen) {:.1} MiB: {}; idle {:.1} requests \
             per 30 s: {}\n",
            pct(&r.latency_ms, 99.0),
            met(pct(&r.latency_ms, 99.0) <= TARGET_P99_MS),
            mib(rss_max(r)),
            met(mib(rss_max(r)) <= TARGET_RSS_MIB),
            r.idle_requests.total() as f64 * 30.0 / r.idle_requests.secs.max(1e-3),
            met(idle_met(&r.idle_requests)),
        ));
        t.push_str(&format!(
            "{who}: writes took {:.2} s, all routed {:.2} s after the first; each write took \
             p50 {:.1} / p99 {:.1} ms; write acknowledged -> routed p50 {:.1} / p99 {:.1} ms{}\n",
            r.write_secs,
            r.all_routed_secs,
            pct(&write_ms(r), 50.0),
            pct(&write_ms(r), 99.0),
            pct(&r.latency_ack_ms, 50.0),
            pct(&r.latency_ack_ms, 99.0),
            if r.latency_server_ms.is_empty() {
                String::new()
            } else {
                format!(
                    "; API server done (audit) -> routed p50 {:.1} / p99 {:.1} / max {:.1} ms",
                    pct(&r.latency_server_ms, 50.0),
                    pct(&r.latency_server_ms, 99.0),
                    pct(&r.latency_server_ms, 100.0)
                )
            },
        ));
        t.push_str(&format!(
            "{who}: VmRSS {:.1} MiB at start, VmHWM {:.1} MiB; status lists {} peers, kernel \
             holds {} routes on weft0; meshd's log: {} warning(s)/error(s) besides {} boringtun \
             CONNECTION_EXPIRED (handshakes to the unreachable bench peers given up after 90 s)\n",
            mib(r.rss_start_kib),
            mib(r.hwm_kib),
            r.status_peers,
            r.kernel_routes,
            r.warnings,
            r.handshakes_expired,
        ));
        if r.idle_cpu_pct_per_10s.len() > 1 {
            let per: Vec<String> = r
                .idle_cpu_pct_per_10s
                .iter()
                .map(|p| format!("{p:.1}"))
                .collect();
            t.push_str(&format!("{who}: idle CPU % per 10 s: {}\n", per.join(" ")));
            let rss: Vec<String> = r
                .idle_rss_kib_per_10s
                .iter()
                .map(|k| format!("{:.1}", mib(*k)))
                .collect();
            t.push_str(&format!(
                "{who}: idle VmRSS MiB per 10 s: {}\n",
                rss.join(" ")
            ));
        }
        let watches = |q: &Requests| {
            q.open_watches
                .as_ref()
                .map(|w| {
                    let list: Vec<String> = w.iter().map(|(k, n)| format!("{k} {n}")).collect();
                    format!(
                        "; {} watch(es) open at the end ({})",
                        w.values().sum::<u64>(),
                        list.join(", ")
                    )
                })
                .unwrap_or_default()
        };
        if let Some(b) = &r.baseline_requests {
            t.push_str(&format!(
                "{who}: requests at 0 bench peers ({:.0} s before the load): {:.1}/min: {}{}\n",
                b.secs,
                b.per_min(),
                b.summary(),
                watches(b)
            ));
        }
        let generator = if r.backend == "etcd" {
            " (etcd counts every client: the generator's list and writes are in it)"
        } else {
            ""
        };
        t.push_str(&format!(
            "{who}: requests during the load ({:.1} s){generator}: {}: {}\n",
            r.load_requests.secs,
            r.load_requests.total(),
            r.load_requests.summary()
        ));
        t.push_str(&format!(
            "{who}: requests while idle ({:.0} s): {:.1}/min: {}{}\n",
            r.idle_requests.secs,
            r.idle_requests.per_min(),
            r.idle_requests.summary(),
            watches(&r.idle_requests)
        ));
    }
    t
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

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// The records the generator writes: `bench-NNNN`, fresh keys, distinct /28s, distinct
/// endpoints 198.51.100.(1..=250):(51820 + i/250).
fn make_records(n: usize) -> Result<Vec<NodeRecord>> {
    let base = u32::from(FIRST_RANGE);
    (0..n)
        .map(|i| {
            let net = Ipv4Addr::from(base + (i as u32) * (1 << (32 - RANGE_LEN)));
            let host = Ipv4Addr::new(198, 51, 100, (i % 250 + 1) as u8);
            let port = 51_820 + (i / 250) as u16;
            let r = NodeRecord {
                schema: SCHEMA_VERSION,
                name: format!("bench-{i:04}"),
                public_key: PrivateKey::generate().public_key(),
                endpoints: vec![SocketAddr::new(host.into(), port)],
                private_endpoints: Vec::new(),
                location: None,
                relay: false,
                pod_cidrs: vec![format!("{net}/{RANGE_LEN}").parse()?],
                key_generation: 1,
                next_public_key: None,
                key_created_at: 0,
                psk_generation: None,
            };
            r.check()
                .with_context(|| format!("generated record {} is invalid", r.name))?;
            Ok(r)
        })
        .collect()
}

/// One record written: its name and when its write was issued and acknowledged.
#[derive(Debug)]
struct Written {
    name: String,
    sent: SystemTime,
    acked: SystemTime,
}

/// Writes the records with meshd's registry client (on a thread in the switch namespace).
async fn write_all(
    reg: Arc<dyn weft_registry::Registry>,
    records: &[NodeRecord],
    mode: Mode,
    args: &Args,
) -> Result<Vec<Written>> {
    // Connect before the clock starts.
    reg.list(weft_registry::Kind::Nodes)
        .await
        .context("listing (connecting to the registry)")?;
    let sem = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        if mode == Mode::Steady {
            let at = start + Duration::from_secs_f64(i as f64 / args.rate);
            tokio::time::sleep_until(at).await;
        }
        let permit = sem.clone().acquire_owned().await?;
        let reg = reg.clone();
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            let sent = SystemTime::now();
            let res = weft_registry::put_node(&*reg, &r).await;
            let acked = SystemTime::now();
            drop(permit);
            match res {
                Ok(_) => Ok(Written {
                    name: r.name,
                    sent,
                    acked,
                }),
                Err(e) => Err(anyhow!("writing {}: {e}", r.name)),
            }
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

/// Runs `write_all` with a registry client of `backend` on a current-thread runtime in the
/// switch namespace `ns`.
fn write_records(
    backend: Backend,
    ns: &str,
    registry: RegistrySpec,
    records: &[NodeRecord],
    mode: Mode,
    args: &Args,
) -> Result<Vec<Written>> {
    run_in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a tokio runtime")?;
        let reg: Arc<dyn weft_registry::Registry> = match registry {
            RegistrySpec::Kube(kubeconfig) => Arc::new(
                weft_registry::KubeRegistry::open(weft_registry::KubeOptions {
                    kubeconfig: Some(kubeconfig),
                    field_manager: FIELD_MANAGER.into(),
                    // Under load the API server may take longer than meshd's 5 s default.
                    request_timeout: Duration::from_secs(30),
                    ..weft_registry::KubeOptions::default()
                })
                .context("opening the kube registry as admin")?,
            ),
            RegistrySpec::Etcd(spec) => {
                weft_registry::open_with(&spec, &weft_registry::OpenOptions::default())
                    .context("opening the etcd registry")?
            }
        };
        rt.block_on(write_all(reg, records, mode, args))
            .with_context(|| format!("writing the records to {}", backend.name()))
    })
}

/// How the load generator reaches the registry.
enum RegistrySpec {
    /// The admin kubeconfig.
    Kube(PathBuf),
    /// `etcd://...`
    Etcd(String),
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

/// Seconds since the epoch of an RFC 3339 UTC timestamp as tracing-subscriber and the audit log
/// write it (`2026-11-26T16:02:00.123456Z`).
fn parse_timestamp(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min, sec) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    // Days from the civil date (Howard Hinnant's algorithm).
    let yy = if m <= 2 { y - 1 } else { y };
    let era = if yy >= 0 { yy } else { yy - 399 } / 400;
    let yoe = yy - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3_600 + min * 60) as f64 + sec)
}

fn epoch_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn now_epoch() -> f64 {
    epoch_secs(SystemTime::now())
}

/// Reads meshd's JSON log as it grows and remembers when each peer was first routed.
struct LogTail {
    reader: BufReader<std::fs::File>,
    routed: HashMap<String, f64>,
    partial: String,
}

impl LogTail {
    fn open(path: &Path) -> Result<LogTail> {
        let mut f =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        f.seek(SeekFrom::Start(0))?;
        Ok(LogTail {
            reader: BufReader::new(f),
            routed: HashMap::new(),
            partial: String::new(),
        })
    }

    /// Reads what was appended since the last call.
    fn poll(&mut self) -> Result<()> {
        loop {
            let n = self.reader.read_line(&mut self.partial)?;
            if n == 0 || !self.partial.ends_with('\n') {
                return Ok(());
            }
            let line = std::mem::take(&mut self.partial);
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["fields"]["message"].as_str() != Some(ROUTED_MSG) {
                continue;
            }
            let (Some(peer), Some(ts)) = (
                v["fields"]["peer"].as_str(),
                v["timestamp"].as_str().and_then(parse_timestamp),
            ) else {
                continue;
            };
            self.routed.entry(peer.to_string()).or_insert(ts);
        }
    }
}

/// Counts meshd's requests on the server's side.
enum Counter {
    /// The API server's audit log.
    Audit(PathBuf),
    /// etcd's `/metrics`, fetched with curl in this (switch) namespace from this URL.
    EtcdMetrics { ns: String, url: String },
}

/// A point in time, with etcd's counters then.
struct Mark {
    at: f64,
    metrics: BTreeMap<String, f64>,
}

impl Counter {
    fn mark(&self) -> Result<Mark> {
        let metrics = match self {
            Counter::Audit(_) => BTreeMap::new(),
            Counter::EtcdMetrics { ns, url } => etcd_counters(ns, url)?,
        };
        Ok(Mark {
            at: now_epoch(),
            metrics,
        })
    }

    /// meshd's requests between two marks.
    fn between(&self, a: &Mark, b: &Mark) -> Result<Requests> {
        let secs = b.at - a.at;
        match self {
            Counter::Audit(path) => audit_requests(path, MESHD_USER, a.at, b.at),
            Counter::EtcdMetrics { .. } => {
                let by_kind = b
                    .metrics
                    .iter()
                    .filter_map(|(k, v)| {
                        let d = (v - a.metrics.get(k).copied().unwrap_or(0.0)).round();
                        (d >= 1.0).then(|| (k.clone(), d as u64))
                    })
                    .collect();
                Ok(Requests {
                    secs,
                    by_kind,
                    open_watches: None,
                })
            }
        }
    }
}

/// etcd's gRPC request counters: unary calls started (`Range`, `Put`, ...) and messages received
/// on streams (`LeaseKeepAlive msgs`, `Watch msgs`).
fn etcd_counters(ns: &str, url: &str) -> Result<BTreeMap<String, f64>> {
    let mut cmd = ns_cmd(ns, "curl");
    cmd.args(["-sS", "--max-time", "5", url]);
    let out = run_timeout(&mut cmd, Duration::from_secs(10))?;
    if !out.status.success() {
        bail!(
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let counters = parse_etcd_metrics(&text);
    if counters.is_empty() {
        bail!("no gRPC server counters in etcd's {url}");
    }
    Ok(counters)
}

fn parse_etcd_metrics(text: &str) -> BTreeMap<String, f64> {
    let label = |labels: &str, name: &str| -> Option<String> {
        let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
        let len = labels[start..].find('"')?;
        Some(labels[start..start + len].to_string())
    };
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let (unary, rest) = if let Some(r) = line.strip_prefix("grpc_server_started_total{") {
            (true, r)
        } else if let Some(r) = line.strip_prefix("grpc_server_msg_received_total{") {
            (false, r)
        } else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let (Some(method), Some(kind), Ok(v)) = (
            label(labels, "grpc_method"),
            label(labels, "grpc_type"),
            value.trim().parse::<f64>(),
        ) else {
            continue;
        };
        match (unary, kind == "unary") {
            (true, true) => {
                out.insert(method, v);
            }
            (false, false) => {
                out.insert(format!("{method} msgs"), v);
            }
            _ => {}
        }
    }
    out
}

/// The requests of `user` the API server received in `[from, to)` (epoch seconds), from its
/// audit log: one per audit ID, by `verb resource[/subresource]`; and the user's watches still
/// open at `to` (a ResponseStarted without a ResponseComplete).
fn audit_requests(path: &Path, user: &str, from: f64, to: f64) -> Result<Requests> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(count_audit(&text, user, from, to))
}

fn count_audit(text: &str, user: &str, from: f64, to: f64) -> Requests {
    let mut seen: HashSet<String> = HashSet::new();
    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    let mut watch_started: HashMap<String, String> = HashMap::new();
    let mut watch_done: HashSet<String> = HashSet::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["user"]["username"].as_str() != Some(user) {
            continue;
        }
        let (Some(id), Some(received)) = (
            v["auditID"].as_str(),
            v["requestReceivedTimestamp"]
                .as_str()
                .and_then(parse_timestamp),
        ) else {
            continue;
        };
        let verb = v["verb"].as_str().unwrap_or("?");
        if verb == "watch" && received < to {
            match v["stage"].as_str() {
                Some("ResponseStarted") => {
                    watch_started.insert(id.to_string(), resource_of(&v));
                }
                // Ended before `to` only if the event's own time is before it.
                Some("ResponseComplete") | Some("Panic")
                    if v["stageTimestamp"]
                        .as_str()
                        .and_then(parse_timestamp)
                        .is_some_and(|t| t < to) =>
                {
                    watch_done.insert(id.to_string());
                }
                _ => {}
            }
        }
        if received < from || received >= to || !seen.insert(id.to_string()) {
            continue;
        }
        *by_kind
            .entry(format!("{verb} {}", resource_of(&v)))
            .or_default() += 1;
    }
    let mut open: BTreeMap<String, u64> = BTreeMap::new();
    for (id, what) in watch_started {
        if !watch_done.contains(&id) {
            *open.entry(what).or_default() += 1;
        }
    }
    Requests {
        secs: to - from,
        by_kind,
        open_watches: Some(open),
    }
}

/// `resource[/subresource]` of an audit event (its request URI when it has no object).
fn resource_of(v: &Value) -> String {
    let r = &v["objectRef"];
    let mut what = r["resource"].as_str().unwrap_or("").to_string();
    if let Some(sub) = r["subresource"].as_str().filter(|s| !s.is_empty()) {
        what = format!("{what}/{sub}");
    }
    if what.is_empty() {
        what = v["requestURI"].as_str().unwrap_or("?").to_string();
    }
    what
}

/// `(WARN/ERROR lines, of which boringtun's CONNECTION_EXPIRED)` of meshd's JSON log: the
/// first less the second, and the second.
fn count_warnings(log: &str) -> (usize, usize) {
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
        .collect();
    let expired = bad
        .iter()
        .filter(|l| l.contains("CONNECTION_EXPIRED"))
        .count();
    (bad.len() - expired, expired)
}

/// The user of the admin kubeconfig's client certificate.
fn kube_admin_user(kube: Option<&KubeControlPlane>) -> Result<String> {
    let kube = kube.ok_or_else(|| anyhow!("no control plane"))?;
    let who = kube.whoami(&kube.admin_kubeconfig)?;
    who["username"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| anyhow!("auth whoami: no username in {who}"))
}

/// When the API server completed each successful write of a MeshNode by `user` (epoch seconds
/// of the audit event's `stageTimestamp`, stage ResponseComplete), by name; the last one wins.
fn audit_writes_done(path: &Path, user: &str) -> Result<HashMap<String, f64>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = HashMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["user"]["username"].as_str() != Some(user)
            || v["stage"].as_str() != Some("ResponseComplete")
            || v["objectRef"]["resource"].as_str() != Some("meshnodes")
            || !matches!(v["verb"].as_str(), Some("patch" | "create" | "update"))
            || !v["responseStatus"]["code"]
                .as_u64()
                .is_some_and(|c| (200..300).contains(&c))
        {
            continue;
        }
        let (Some(name), Some(at)) = (
            v["objectRef"]["name"].as_str(),
            v["stageTimestamp"].as_str().and_then(parse_timestamp),
        ) else {
            continue;
        };
        out.insert(name.to_string(), at);
    }
    Ok(out)
}

/// A kubeconfig for node `node`'s meshd: a token of weft-system/meshd bound to a Pod on it.
fn node_kubeconfig(kube: &KubeControlPlane, node: &Node) -> Result<PathBuf> {
    let token = kube
        .pod_bound_token(NS, MESHD_SA, &node.name)
        .context("pod-bound token of weft-system/meshd")?;
    kube.kubeconfig_with_token(&token, node.dir.join("kubeconfig"))
}

/// The control plane with an audit log, deploy/ applied server-side and the Node of `node`.
fn start_kube(c: &Cluster, node: &Node) -> Result<(KubeControlPlane, PathBuf)> {
    let policy = c.tmp.join("audit-policy.yaml");
    std::fs::write(&policy, AUDIT_POLICY)
        .with_context(|| format!("writing {}", policy.display()))?;
    let audit_log = c.tmp.join("kube-audit.log");
    let kube = c.start_kube(KubeOpts {
        apiserver_args: vec![
            format!("--audit-policy-file={}", policy.display()),
            format!("--audit-log-path={}", audit_log.display()),
        ],
        ..KubeOpts::default()
    })?;
    eprintln!(
        "weft-registry-bench: kube-apiserver ready after {:.1} s",
        kube.apiserver_ready_after.as_secs_f64()
    );
    kube.kubectl(&[
        "apply",
        "--server-side",
        "--field-manager=weft-registry-bench",
        "-k",
        &deploy_dir().display().to_string(),
    ])
    .context("kubectl apply --server-side -k deploy/")?;
    kube.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd",
        "--all",
        "--timeout=60s",
    ])
    .context("waiting for the CRDs")?;
    kube.create_node(&node.name, node.underlay_ip, &[node.pod_cidr.as_str()])
        .context("creating the Node object")?;
    Ok((kube, audit_log))
}

fn run_one(args: &Args, backend: Backend, mode: Mode) -> Result<RunResult> {
    let records = make_records(args.records)?;
    let c = Cluster::with_nodes(1)?;
    let node = c.node(0);
    let switch_ns = c
        .switch_ns
        .clone()
        .ok_or_else(|| anyhow!("the cluster has no switch namespace"))?;
    // Declared after `c`: dropped (stopped) before the cluster goes.
    let mut kube: Option<KubeControlPlane> = None;
    let mut etcd: Option<Etcd> = None;
    let (counter, spec) = match backend {
        Backend::Kube => {
            let (k, audit_log) = start_kube(&c, node)?;
            let kc = node_kubeconfig(&k, node)?.display().to_string();
            node.omit_default_args(&["--endpoint", "--pod-cidr"]);
            node.start_meshd(&[
                "--registry",
                "kube",
                "--kubeconfig",
                &kc,
                "--log-format",
                "json",
            ])?;
            node.refresh_claimed()?;
            let spec = RegistrySpec::Kube(k.admin_kubeconfig.clone());
            kube = Some(k);
            (Counter::Audit(audit_log), spec)
        }
        Backend::Etcd => {
            let e = c.start_etcd()?;
            node.start_meshd(&["--registry", &e.spec(), "--log-format", "json"])?;
            let counter = Counter::EtcdMetrics {
                ns: switch_ns.clone(),
                url: format!("{}/metrics", e.client_url()),
            };
            let spec = RegistrySpec::Etcd(e.spec());
            etcd = Some(e);
            (counter, spec)
        }
    };
    node.wait_status(Duration::from_secs(30), |st| {
        st["registry"].as_str() == Some("connected")
    })?;
    let pid = node.meshd_pid().ok_or_else(|| anyhow!("no meshd pid"))?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "meshd" {
        bail!("pid {pid} is {comm:?}, not meshd");
    }
    let mut log = LogTail::open(&node.meshd_log_path())?;
    // Let start-up settle (own record published, first lists done, watches open).
    std::thread::sleep(Duration::from_secs(3));
    log.poll()?;
    let baseline_requests = if args.baseline.is_zero() {
        None
    } else {
        let a = counter.mark()?;
        std::thread::sleep(args.baseline);
        let b = counter.mark()?;
        Some(counter.between(&a, &b)?)
    };
    let (rss_start_kib, _) = mem_kib(pid)?;
    let load_mark = counter.mark()?;
    let cpu0 = cpu_secs(pid)?;

    let t0 = Instant::now();
    let written = write_records(backend, &switch_ns, spec, &records, mode, args)?;
    let first_sent = written
        .iter()
        .map(|w| epoch_secs(w.sent))
        .fold(f64::INFINITY, f64::min);
    let last_acked = written
        .iter()
        .map(|w| epoch_secs(w.acked))
        .fold(0.0, f64::max);
    eprintln!(
        "weft-registry-bench: {} records written in {:.2} s",
        written.len(),
        last_acked - first_sent
    );
    let want: Vec<&str> = written.iter().map(|w| w.name.as_str()).collect();
    let deadline = t0 + args.timeout;
    loop {
        log.poll()?;
        if want.iter().all(|n| log.routed.contains_key(*n)) {
            break;
        }
        if Instant::now() > deadline {
            let missing = want
                .iter()
                .filter(|n| !log.routed.contains_key(**n))
                .count();
            bail!(
                "{missing} of {} peers not routed within {:?}; meshd log: {}",
                want.len(),
                args.timeout,
                node.meshd_log_path().display()
            );
        }
        if !node.meshd_running() {
            bail!("meshd exited; log: {}", node.meshd_log_path().display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let cpu1 = cpu_secs(pid)?;
    let (rss_kib, hwm_kib) = mem_kib(pid)?;
    let load_end = counter.mark()?;
    let load_requests = counter.between(&load_mark, &load_end)?;
    let last_routed = want
        .iter()
        .filter_map(|n| log.routed.get(*n))
        .fold(0.0, |a: f64, b| a.max(*b));

    let mut latency_ms = Vec::with_capacity(written.len());
    let mut latency_ack_ms = Vec::with_capacity(written.len());
    for w in &written {
        let routed = log
            .routed
            .get(&w.name)
            .ok_or_else(|| anyhow!("{} not routed", w.name))?;
        latency_ms.push((routed - epoch_secs(w.sent)) * 1e3);
        latency_ack_ms.push((routed - epoch_secs(w.acked)) * 1e3);
    }

    // Cross-checks: meshd lists every peer, the kernel has every route.
    let st = node.status_json()?;
    let status_peers = st["peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("bench-")))
                .count()
        })
        .unwrap_or(0);
    let routes = run_args(
        "ip",
        &["-n", &node.ns, "-4", "route", "show", "dev", "weft0"],
    )?;
    let kernel_routes = routes
        .lines()
        .filter(|l| l.contains(&format!("/{RANGE_LEN} ")))
        .count();
    if status_peers != args.records || kernel_routes != args.records {
        bail!(
            "meshd status lists {status_peers} bench peers and weft0 has {kernel_routes} /28 \
             routes; expected {}",
            args.records
        );
    }

    std::thread::sleep(args.settle);
    let idle_mark = counter.mark()?;
    let idle_start = Instant::now();
    let cpu_idle0 = cpu_secs(pid)?;
    let mut idle_cpu_pct_per_10s = Vec::new();
    let mut idle_rss_kib_per_10s = Vec::new();
    let mut last = cpu_idle0;
    while idle_start.elapsed() < args.idle {
        let step = (args.idle - idle_start.elapsed()).min(Duration::from_secs(10));
        std::thread::sleep(step);
        let now = cpu_secs(pid)?;
        idle_cpu_pct_per_10s.push((now - last) / step.as_secs_f64().max(1e-3) * 100.0);
        idle_rss_kib_per_10s.push(mem_kib(pid)?.0);
        last = now;
    }
    let cpu2 = cpu_secs(pid)?;
    let idle_end = counter.mark()?;
    let idle_secs = idle_start.elapsed().as_secs_f64();
    let (rss_after_idle_kib, _) = mem_kib(pid)?;
    // Requests received before the end of the window reach the audit log when they complete.
    std::thread::sleep(Duration::from_secs(1));
    let idle_requests = counter.between(&idle_mark, &idle_end)?;
    let idle_cpu_pct = (cpu2 - cpu_idle0) / idle_secs.max(1e-3) * 100.0;
    let (warnings, handshakes_expired) = count_warnings(&node.meshd_log());
    let latency_server_ms = match &counter {
        Counter::Audit(path) => {
            let done = audit_writes_done(path, &kube_admin_user(kube.as_ref())?)?;
            written
                .iter()
                .filter_map(|w| Some((log.routed.get(&w.name)? - done.get(&w.name)?) * 1e3))
                .collect()
        }
        Counter::EtcdMetrics { .. } => Vec::new(),
    };
    eprintln!(
        "weft-registry-bench: {} {}: all {} routed {:.2} s after the first write; idle requests \
         {:.1}/min ({}); {warnings} warning(s) in meshd's log besides \
         {handshakes_expired} boringtun CONNECTION_EXPIRED",
        backend.name(),
        mode.name(),
        args.records,
        last_routed - first_sent,
        idle_requests.per_min(),
        idle_requests.summary()
    );
    drop(kube.take());
    drop(etcd.take());
    Ok(RunResult {
        backend: backend.name(),
        mode: mode.name(),
        write_secs: last_acked - first_sent,
        latency_ms,
        latency_ack_ms,
        all_routed_secs: last_routed - first_sent,
        rss_start_kib,
        rss_kib,
        hwm_kib,
        rss_after_idle_kib,
        cpu_load_secs: cpu1 - cpu0,
        idle_cpu_pct,
        idle_cpu_pct_per_10s,
        idle_rss_kib_per_10s,
        baseline_requests,
        load_requests,
        idle_requests,
        status_peers,
        kernel_routes,
        warnings,
        handshakes_expired,
        latency_server_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("1970-01-01T00:00:00Z"), Some(0.0));
        let t = parse_timestamp("2026-11-26T16:02:00.250000Z").expect("parses");
        // date -u -d 2026-11-26T16:02:00Z +%s
        assert!((t - 1_795_708_920.25).abs() < 1e-6, "{t}");
        assert_eq!(parse_timestamp("garbage"), None);
    }

    #[test]
    fn records_are_distinct_and_valid() {
        let r = make_records(1000).expect("records");
        assert_eq!(r[1].pod_cidrs[0].to_string(), "10.42.16.16/28");
        assert_ne!(r[0].public_key, r[1].public_key);
        let eps: HashSet<SocketAddr> = r.iter().map(|x| x.endpoints[0]).collect();
        assert_eq!(eps.len(), 1000);
        assert_eq!(r[999].endpoints[0].to_string(), "198.51.100.250:51823");
    }

    #[test]
    fn audit_events_are_counted_once_per_request() {
        // (audit ID, stage, verb, user, received at s, stage at s), times after 2026-01-01.
        let events = [
            // A watch opened in the window and still open.
            ("w1", "ResponseStarted", "watch", MESHD_USER, 10.0, 10.001),
            // A watch opened before the window: not counted, but open.
            ("w0", "ResponseStarted", "watch", MESHD_USER, 1.0, 1.001),
            // A watch opened and ended in the window.
            ("w2", "ResponseStarted", "watch", MESHD_USER, 11.0, 11.001),
            ("w2", "ResponseComplete", "watch", MESHD_USER, 11.0, 12.0),
            ("p1", "ResponseComplete", "patch", MESHD_USER, 12.0, 12.01),
            // Someone else.
            (
                "a1",
                "ResponseComplete",
                "patch",
                "kubernetes-admin",
                12.0,
                12.01,
            ),
            // After the window.
            ("g1", "ResponseComplete", "get", MESHD_USER, 30.0, 30.01),
        ];
        let ts = |s: f64| format!("2026-01-01T00:00:{s:09.6}Z");
        let text: Vec<String> = events
            .iter()
            .map(|(id, stage, verb, user, recv, at)| {
                json!({
                    "auditID": id, "stage": stage, "verb": verb, "user": {"username": user},
                    "objectRef": {"resource": "meshnodes", "apiGroup": "weft.dev"},
                    "requestReceivedTimestamp": ts(*recv), "stageTimestamp": ts(*at),
                })
                .to_string()
            })
            .collect();
        let from = parse_timestamp(&ts(5.0)).expect("ts");
        let to = parse_timestamp(&ts(20.0)).expect("ts");
        let r = count_audit(&text.join("\n"), MESHD_USER, from, to);
        assert_eq!(r.by_kind.get("watch meshnodes"), Some(&2));
        assert_eq!(r.by_kind.get("patch meshnodes"), Some(&1));
        assert_eq!(r.total(), 3);
        let open = r.open_watches.as_ref().expect("open watches");
        assert_eq!(open.get("meshnodes"), Some(&2));
        assert!((r.per_min() - 12.0).abs() < 1e-6, "{}", r.per_min());
    }

    #[test]
    fn boringtun_expiries_are_counted_apart() {
        let log = [
            r#"{"level":"INFO","fields":{"message":"peer routed"}}"#,
            r#"{"level":"ERROR","fields":{"message":"CONNECTION_EXPIRED(REKEY_ATTEMPT_TIME)"}}"#,
            r#"{"level":"WARN","fields":{"message":"the Kubernetes API server cannot be watched"}}"#,
        ]
        .join("\n");
        assert_eq!(count_warnings(&log), (1, 1));
    }

    #[test]
    fn etcd_counters_are_parsed() {
        let text = r#"# HELP grpc_server_started_total Total number of RPCs started on the server.
grpc_server_started_total{grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 12
grpc_server_started_total{grpc_method="Watch",grpc_service="etcdserverpb.Watch",grpc_type="bidi_stream"} 3
grpc_server_msg_received_total{grpc_method="LeaseKeepAlive",grpc_service="etcdserverpb.Lease",grpc_type="bidi_stream"} 40
grpc_server_msg_received_total{grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 12
"#;
        let m = parse_etcd_metrics(text);
        assert_eq!(m.get("Range"), Some(&12.0));
        assert_eq!(m.get("LeaseKeepAlive msgs"), Some(&40.0));
        assert_eq!(m.get("Watch"), None);
        assert_eq!(m.len(), 2);
    }
}
