//! weft-bench: TCP throughput (iperf3, one stream) and ping RTT between two network namespaces
//! joined by one veth pair, for several data paths, all in one run:
//!   veth          plain veth, no encryption (the ceiling)
//!   wireguard-go  Debian's wireguard-go
//!   boringtun     boringtun-cli 0.7.1 (cargo install; PATH or ~/.cargo/bin)
//!   meshd         two weft meshd sharing a temp registry (release build: WEFT_BIN_DIR or
//!                 target/release; `cargo build --release -p weft-meshd`)
//! Each path: `--runs` runs (default 3) of `iperf3 -t --seconds` (default 10) and 50 pings at
//! 10 ms; the table shows the median throughput and p50/p99 of all pings. A path that cannot be
//! set up is reported as "unavailable: reason" and the others still run.
//!
//! Usage (root): weft-bench [--runs N] [--seconds S] [--pings N] [--only veth,meshd,...]
//!                          [--json FILE]

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use weft_tests::util::{find_program, median, percentile, run_timeout, tail, wait_until, Proc};
use weft_tests::{wg_genkey, Cluster, ClusterOpts, PingOpts, WgImpl, WgPeer, MESH_PORT};

const PATHS: &[&str] = &["veth", "wireguard-go", "boringtun", "meshd"];

#[derive(Debug)]
struct Args {
    runs: usize,
    seconds: u32,
    pings: u32,
    only: Vec<String>,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        runs: 3,
        seconds: 10,
        pings: 50,
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
            "--runs" => a.runs = val()?.parse()?,
            "--seconds" => a.seconds = val()?.parse()?,
            "--pings" => a.pings = val()?.parse()?,
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
                println!(
                    "weft-bench [--runs N] [--seconds S] [--pings N] [--only {}] [--json FILE]",
                    PATHS.join(",")
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
        i += 2;
    }
    if a.runs == 0 || a.seconds == 0 {
        bail!("--runs and --seconds must be positive");
    }
    Ok(a)
}

#[derive(Debug, Default)]
struct PathResult {
    name: String,
    detail: String,
    unavailable: Option<String>,
    gbits: Vec<f64>,
    rtts_ms: Vec<f64>,
    ping_sent: u32,
    ping_received: u32,
    errors: Vec<String>,
}

impl PathResult {
    fn tcp_median(&self) -> Option<f64> {
        median(&self.gbits)
    }
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
        "weft-bench: {} run(s) x {} s iperf3 + {} pings per path; loadavg at start: {}",
        args.runs,
        args.seconds,
        args.pings,
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
        if let Err(e) = bench_path(p, &args, &mut r) {
            let msg = format!("{e:#}");
            eprintln!("weft-bench: {p} unavailable: {msg}");
            r.unavailable = Some(msg.lines().next().unwrap_or("").to_string());
        }
        results.push(r);
    }
    let table = render_table(&results, &args);
    println!("{table}");
    if let Some(path) = &args.json {
        let v = to_json(&results, &args, &load);
        if let Err(e) = std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap_or_default()) {
            eprintln!("weft-bench: writing {}: {e}", path.display());
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
    let target = match p {
        "veth" => {
            r.detail = "veth pair, no encryption".into();
            n1.underlay_ip.to_string()
        }
        "wireguard-go" | "boringtun" => {
            let kind = if p == "boringtun" {
                WgImpl::Boringtun
            } else {
                WgImpl::WireguardGo
            };
            let (k0, k1) = (wg_genkey()?, wg_genkey()?);
            let peer = |k: &weft_tests::WgKeys, n: &weft_tests::Node| WgPeer {
                public_key: k.public_key.clone(),
                endpoint: Some(format!("{}:{MESH_PORT}", n.underlay_ip)),
                allowed_ips: vec![n.pod_cidr.clone()],
                persistent_keepalive: None,
            };
            n0.start_wg(kind, &k0.private_key, MESH_PORT, &[peer(&k1, n1)])?;
            n1.start_wg(kind, &k1.private_key, MESH_PORT, &[peer(&k0, n0)])?;
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
            n1.mesh_ip.to_string()
        }
        "meshd" => {
            let dir = meshd_dir.ok_or_else(|| anyhow!("no meshd dir"))?;
            weft_tests::set_bin_dir(&dir);
            let bin = weft_tests::workspace_bin("meshd")?;
            r.detail = format!("{}", bin.display());
            n0.start_meshd(&[])?;
            n1.start_meshd(&[])?;
            c.wait_mesh_ready(Duration::from_secs(20))?;
            n1.mesh_ip.to_string()
        }
        other => bail!("unknown path {other}"),
    };
    // Reachability first.
    let pr = n0.ping(&target, &PingOpts::count(3).interval(0.05).wait(2))?;
    if !pr.any_received() {
        bail!("{target} not reachable over {p}: {}", pr.output);
    }
    // iperf3 server in node 1.
    let log = c.tmp.join("iperf3-server.log");
    let mut srv_cmd = weft_tests::util::ns_cmd(&n1.ns, "iperf3");
    srv_cmd.args(["-s", "-B", &target, "--forceflush"]);
    let _srv = Proc::spawn_logged("iperf3 -s", &mut srv_cmd, Some(&log))?;
    if !wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("Server listening")
    }) {
        bail!("iperf3 server did not start: {}", tail(&log, 10));
    }
    for run in 0..args.runs {
        match iperf(&n0.ns, &target, args.seconds) {
            Ok(g) => {
                eprintln!("weft-bench: {p} run {}: {g:.3} Gbit/s", run + 1);
                r.gbits.push(g);
            }
            Err(e) => {
                eprintln!("weft-bench: {p} run {}: iperf3 failed: {e:#}", run + 1);
                r.errors.push(format!("{e:#}"));
            }
        }
        let pr = n0.ping(&target, &PingOpts::count(args.pings).interval(0.01).wait(2))?;
        r.ping_sent += pr.transmitted;
        r.ping_received += pr.received;
        r.rtts_ms.extend(pr.rtts_ms.iter().copied());
    }
    if r.gbits.is_empty() {
        bail!("every iperf3 run failed: {}", r.errors.join("; "));
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

fn iperf(ns: &str, target: &str, secs: u32) -> Result<f64> {
    let mut c = weft_tests::util::ns_cmd(ns, "iperf3");
    c.args([
        "-c",
        target,
        "-t",
        &secs.to_string(),
        "-J",
        "--connect-timeout",
        "5000",
    ]);
    let out = run_timeout(&mut c, Duration::from_secs(u64::from(secs) + 30))?;
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 output not JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("iperf3 JSON without end.sum_received.bits_per_second"))?;
    Ok(bps / 1e9)
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "n/a".into())
}

fn render_table(results: &[PathResult], args: &Args) -> String {
    let meshd = results
        .iter()
        .find(|r| r.name == "meshd" && r.unavailable.is_none())
        .and_then(PathResult::tcp_median);
    let mut s = String::new();
    s.push_str(&format!(
        "Two netns joined by a veth pair; iperf3 TCP 1 stream {} s, median of {} run(s); {} pings at 10 ms per run, p50/p99 over all runs.\n\n",
        args.seconds, args.runs, args.pings
    ));
    s.push_str(
        "| data path | TCP Gbit/s | ratio to meshd (path / meshd) | ping p50 ms | p99 ms |\n",
    );
    s.push_str("|---|---|---|---|---|\n");
    for r in results {
        let label = match r.name.as_str() {
            "veth" => "plain veth (no encryption)".to_string(),
            "wireguard-go" => format!("wireguard-go ({})", r.detail.trim()),
            "boringtun" => format!("boringtun-cli ({})", r.detail.trim()),
            "meshd" => "weft meshd (release)".to_string(),
            o => o.to_string(),
        };
        if let Some(u) = &r.unavailable {
            s.push_str(&format!(
                "| {label} | unavailable: {} | | | |\n",
                u.replace('|', "/")
            ));
            continue;
        }
        let tcp = r.tcp_median();
        let ratio = match (tcp, meshd) {
            (Some(t), Some(m)) if m > 0.0 => format!("{:.2}", t / m),
            _ => "n/a".into(),
        };
        s.push_str(&format!(
            "| {label} | {} | {ratio} | {} | {} |\n",
            fmt_opt(tcp, 3),
            fmt_opt(percentile(&r.rtts_ms, 50.0), 3),
            fmt_opt(percentile(&r.rtts_ms, 99.0), 3),
        ));
    }
    s
}

fn to_json(results: &[PathResult], args: &Args, load: &str) -> Value {
    json!({
        "runs": args.runs,
        "seconds": args.seconds,
        "pingsPerRun": args.pings,
        "loadavgAtStart": load.trim(),
        "paths": results.iter().map(|r| json!({
            "name": r.name,
            "detail": r.detail,
            "unavailable": r.unavailable,
            "tcpGbitsRuns": r.gbits,
            "tcpGbitsMedian": r.tcp_median(),
            "pingP50Ms": percentile(&r.rtts_ms, 50.0),
            "pingP99Ms": percentile(&r.rtts_ms, 99.0),
            "pingAvgMs": if r.rtts_ms.is_empty() { None } else { Some(r.rtts_ms.iter().sum::<f64>() / r.rtts_ms.len() as f64) },
            "pingSent": r.ping_sent,
            "pingReceived": r.ping_received,
            "errors": r.errors,
        })).collect::<Vec<_>>(),
    })
}
