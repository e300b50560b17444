//! weft-etcd-bench: how fast one meshd on the etcd registry takes in many node records, and what
//! 1000 peers cost it.
//!
//! Each mode runs on a fresh one-node cluster: a real etcd (Debian's) in the switch namespace
//! (`Cluster::start_etcd`) and one meshd (release build: `WEFT_BIN_DIR` or target/release) with
//! `--registry etcd://198.18.0.1:2379 --log-format json`. A load generator then writes `--peers`
//! valid node records (fresh X25519 keys, a distinct /28 inside the cluster CIDR 10.42.0.0/16
//! each, endpoint 198.18.0.1:<20000+i> on the underlay where nobody listens, so the handshakes
//! meshd starts go nowhere outside the bench's namespaces). It writes them with meshd's own etcd
//! client (`weft_registry`, from a thread that entered the switch namespace, see
//! `Etcd::with_client`):
//!   steady  at `--rate` records/s (default 200),
//!   burst   all at once (`--concurrency` puts in flight, default 64).
//! The write time of a record is the wall clock just before its put is issued.
//!
//! "Installed in the data path" is meshd's `peer routed` log line (info; emitted once every route
//! of a peer is in the kernel, after the peer was added to the node). Its timestamp (same machine,
//! same wall clock) minus the write time is the latency. At the end the bench checks that
//! `meshd status` lists every peer and the kernel holds every route.
//!
//! Resources come from /proc/<meshd pid>: VmRSS and VmHWM once every peer is installed, CPU
//! seconds (utime + stime, all threads) from the first write until the last peer is installed
//! (the bench polls the log every 50 ms, so up to 50 ms of idle time is included), and CPU %
//! over an idle window (`--idle`, default 10 s; also per 10 s when longer) right after, while
//! nothing changes. meshd still retries the handshakes of its unreachable peers every 5 s then,
//! until boringtun gives up after 90 s.
//!
//! Usage (root): weft-etcd-bench [--peers N (1000)] [--rate R (200)] [--modes steady,burst]
//!                               [--concurrency N (64)] [--idle SECS (10)] [--timeout SECS (120)]
//!                               [--json FILE]

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use weft_core::record::{NodeRecord, SCHEMA_VERSION};
use weft_core::PrivateKey;
use weft_tests::util::{percentile, run_args};
use weft_tests::Cluster;

/// First pod range handed out (10.42.16.0/28); node-0 has 10.42.1.0/24.
const FIRST_RANGE: Ipv4Addr = Ipv4Addr::new(10, 42, 16, 0);
/// Ranges are /28: 16 addresses each.
const RANGE_LEN: u8 = 28;
/// At most this many records fit between 10.42.16.0 and 10.42.255.255.
const MAX_PEERS: usize = (256 - 16) * 16;
/// meshd's log line once a peer's routes are in place.
const ROUTED_MSG: &str = "peer routed";

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
    peers: usize,
    rate: f64,
    modes: Vec<Mode>,
    concurrency: usize,
    idle: Duration,
    timeout: Duration,
    json: Option<PathBuf>,
}

const USAGE: &str = "weft-etcd-bench [--peers N] [--rate R] [--modes steady,burst] \
                     [--concurrency N] [--idle SECS] [--timeout SECS] [--json FILE]";

fn parse_args() -> Result<Args> {
    let mut a = Args {
        peers: 1000,
        rate: 200.0,
        modes: vec![Mode::Steady, Mode::Burst],
        concurrency: 64,
        idle: Duration::from_secs(10),
        timeout: Duration::from_secs(120),
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
            "--peers" => a.peers = val()?.parse().context("--peers")?,
            "--rate" => a.rate = val()?.parse().context("--rate")?,
            "--concurrency" => a.concurrency = val()?.parse().context("--concurrency")?,
            "--idle" => a.idle = Duration::from_secs(val()?.parse().context("--idle")?),
            "--timeout" => a.timeout = Duration::from_secs(val()?.parse().context("--timeout")?),
            "--json" => a.json = Some(PathBuf::from(val()?)),
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
    if a.peers == 0 || a.peers > MAX_PEERS {
        bail!("--peers must be in 1..={MAX_PEERS}");
    }
    if !(a.rate > 0.0 && a.rate.is_finite()) {
        bail!("--rate must be positive");
    }
    if a.concurrency == 0 || a.modes.is_empty() {
        bail!("--concurrency and --modes must not be empty");
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("weft-etcd-bench: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = weft_tests::util::require_root().and_then(|_| run(&args)) {
        eprintln!("weft-etcd-bench: {e:#}");
        std::process::exit(1);
    }
}

/// What one mode measured.
#[derive(Debug, Default)]
struct ModeResult {
    mode: &'static str,
    /// From the first put issued until the last acknowledged.
    write_secs: f64,
    /// Per record, ms from its put being issued to meshd's `peer routed` line.
    latency_ms: Vec<f64>,
    /// Per record, ms from its put being acknowledged to `peer routed`.
    latency_ack_ms: Vec<f64>,
    /// From the first put issued until the last peer was routed.
    all_routed_secs: f64,
    rss_start_kib: u64,
    rss_kib: u64,
    hwm_kib: u64,
    rss_after_idle_kib: u64,
    cpu_load_secs: f64,
    idle_cpu_pct: f64,
    /// CPU % per 10 s of the idle window.
    idle_cpu_pct_per_10s: Vec<f64>,
    status_peers: usize,
    kernel_routes: usize,
}

fn run(args: &Args) -> Result<()> {
    let dir = meshd_release_dir()?;
    weft_tests::set_bin_dir(&dir);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "weft-etcd-bench: {} records per mode ({}), steady rate {}/s, meshd from {}; loadavg at \
         start: {}",
        args.peers,
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
    for &mode in &args.modes {
        eprintln!("weft-etcd-bench: === {}", mode.name());
        results.push(run_mode(args, mode)?);
    }
    let table = render(args, &results);
    print!("{table}");
    if let Some(path) = &args.json {
        let modes: Vec<Value> = results
            .iter()
            .map(|r| {
                json!({
                    "mode": r.mode,
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
                    "statusPeers": r.status_peers,
                    "kernelRoutes": r.kernel_routes,
                })
            })
            .collect();
        let v = json!({
            "peers": args.peers,
            "rate": args.rate,
            "concurrency": args.concurrency,
            "idleSecs": args.idle.as_secs_f64(),
            "loadavgStart": load.trim(),
            "modes": modes,
            "table": table,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("weft-etcd-bench: wrote {}", path.display());
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

fn render(args: &Args, results: &[ModeResult]) -> String {
    let mut t = format!(
        "\nweft-etcd-bench: {} node records written to etcd, one meshd (release) watching; \
         latency = put issued -> meshd `peer routed` log line\n\n",
        args.peers
    );
    t.push_str(
        "| mode | writes took s | all routed after s | p50 ms | p99 ms | max ms | VmRSS MiB (start) \
         | VmRSS MiB | VmHWM MiB | CPU s during load | idle CPU % |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        let label = match r.mode {
            "steady" => format!("steady {}/s", args.rate),
            other => format!("{other} ({} in flight)", args.concurrency),
        };
        t.push_str(&format!(
            "| {label} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |\n",
            r.write_secs,
            r.all_routed_secs,
            pct(&r.latency_ms, 50.0),
            pct(&r.latency_ms, 99.0),
            pct(&r.latency_ms, 100.0),
            mib(r.rss_start_kib),
            mib(r.rss_kib),
            mib(r.hwm_kib),
            r.cpu_load_secs,
            r.idle_cpu_pct,
        ));
    }
    t.push_str(&format!(
        "\ntargets: p99 <= 1000 ms, VmRSS <= 64 MiB at {} peers; idle CPU % over {} s after the \
         load (100 % = one core)\n",
        args.peers,
        args.idle.as_secs()
    ));
    for r in results {
        if r.idle_cpu_pct_per_10s.len() > 1 {
            let per: Vec<String> = r
                .idle_cpu_pct_per_10s
                .iter()
                .map(|p| format!("{p:.1}"))
                .collect();
            t.push_str(&format!(
                "{}: idle CPU % per 10 s: {}\n",
                r.mode,
                per.join(" ")
            ));
        }
        t.push_str(&format!(
            "{}: latency from put acknowledged p50 {:.1} ms, p99 {:.1} ms; VmRSS after idle {:.1} \
             MiB; status lists {} peers, kernel holds {} routes on weft0\n",
            r.mode,
            pct(&r.latency_ack_ms, 50.0),
            pct(&r.latency_ack_ms, 99.0),
            mib(r.rss_after_idle_kib),
            r.status_peers,
            r.kernel_routes
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

/// The records the generator writes: `bench-NNNN`, fresh keys, distinct /28s.
fn make_records(n: usize) -> Result<Vec<NodeRecord>> {
    let base = u32::from(FIRST_RANGE);
    (0..n)
        .map(|i| {
            let net = Ipv4Addr::from(base + (i as u32) * (1 << (32 - RANGE_LEN)));
            let r = NodeRecord {
                schema: SCHEMA_VERSION,
                name: format!("bench-{i:04}"),
                public_key: PrivateKey::generate().public_key(),
                endpoints: vec![SocketAddr::new(
                    weft_tests::cluster::UNDERLAY_ROUTER.into(),
                    20_000 + i as u16,
                )],
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

/// One record written: its name and when its put was issued and acknowledged.
#[derive(Debug)]
struct Written {
    name: String,
    sent: SystemTime,
    acked: SystemTime,
}

/// Writes the records with meshd's etcd client (run by `Etcd::with_client`).
async fn write_all(
    reg: Arc<dyn weft_registry::Registry>,
    records: &[NodeRecord],
    mode: Mode,
    args: &Args,
) -> Result<Vec<Written>> {
    // Connect before the clock starts.
    reg.list(weft_registry::Kind::Nodes)
        .await
        .context("listing (connecting to etcd)")?;
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

/// utime + stime of the process (all threads), in seconds.
fn cpu_secs(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the `(comm)`: state is the first, utime the 12th, stime the 13th.
    let rest = s
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("odd /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("odd /proc/{pid}/stat"))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((num(11)? + num(12)?) / hz)
}

/// Seconds since the epoch of an RFC 3339 UTC timestamp as tracing-subscriber writes it
/// (`2026-11-26T16:02:00.123456Z`).
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

fn run_mode(args: &Args, mode: Mode) -> Result<ModeResult> {
    let records = make_records(args.peers)?;
    let c = Cluster::with_nodes(1)?;
    let etcd = c.start_etcd()?;
    let node = c.node(0);
    node.start_meshd(&["--registry", &etcd.spec(), "--log-format", "json"])?;
    node.wait_status(Duration::from_secs(20), |st| {
        st["registry"].as_str() == Some("connected")
    })?;
    let pid = node.meshd_pid().ok_or_else(|| anyhow!("no meshd pid"))?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "meshd" {
        bail!("pid {pid} is {comm:?}, not meshd");
    }
    let mut log = LogTail::open(&node.meshd_log_path())?;
    // Let start-up settle (own record published, first list done).
    std::thread::sleep(Duration::from_secs(1));
    log.poll()?;
    let (rss_start_kib, _) = mem_kib(pid)?;
    let cpu0 = cpu_secs(pid)?;

    let t0 = Instant::now();
    let written = etcd.with_client(|reg| write_all(reg, &records, mode, args))?;
    let first_sent = written
        .iter()
        .map(|w| epoch_secs(w.sent))
        .fold(f64::INFINITY, f64::min);
    let last_acked = written
        .iter()
        .map(|w| epoch_secs(w.acked))
        .fold(0.0, f64::max);
    eprintln!(
        "weft-etcd-bench: {} records written in {:.2} s",
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
    if status_peers != args.peers || kernel_routes != args.peers {
        bail!(
            "meshd status lists {status_peers} bench peers and weft0 has {kernel_routes} /28 \
             routes; expected {}",
            args.peers
        );
    }

    let idle_start = Instant::now();
    let mut idle_cpu_pct_per_10s = Vec::new();
    let mut last = cpu1;
    while idle_start.elapsed() < args.idle {
        let step = (args.idle - idle_start.elapsed()).min(Duration::from_secs(10));
        std::thread::sleep(step);
        let now = cpu_secs(pid)?;
        idle_cpu_pct_per_10s.push((now - last) / step.as_secs_f64().max(1e-3) * 100.0);
        last = now;
    }
    let cpu2 = cpu_secs(pid)?;
    let (rss_after_idle_kib, _) = mem_kib(pid)?;
    let idle_cpu_pct = (cpu2 - cpu1) / idle_start.elapsed().as_secs_f64().max(1e-3) * 100.0;
    let warnings = node
        .meshd_log()
        .lines()
        .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
        .count();
    eprintln!(
        "weft-etcd-bench: {}: all {} routed {:.2} s after the first write; {warnings} warning(s) \
         in meshd's log",
        mode.name(),
        args.peers,
        last_routed - first_sent
    );
    Ok(ModeResult {
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
        status_peers,
        kernel_routes,
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
        let r = make_records(3).expect("records");
        assert_eq!(r[1].pod_cidrs[0].to_string(), "10.42.16.16/28");
        assert_ne!(r[0].public_key, r[1].public_key);
    }
}
