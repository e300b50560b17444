//! weft-path-bench: direct against relayed between two nodes behind NAT, in one run.
//!
//! Topology (the netns harness with sites): node-0 public relay (`--relay`); node-1 behind a
//! port-preserving NAT (site-a), node-2 behind another (site-b); every meshd with
//! `--use-relays` (mesh MTU 1376). One pod on node-1 and one on node-2.
//!
//! 1. direct: node-1 and node-2 punch a direct path (status `path: direct`).
//! 2. relayed: UDP between site-a and site-b is blocked at the switch; both fall back to
//!    node-0 (status `path: relayed`).
//!
//! Each mode gets `--runs` runs (default 3) of: iperf3 TCP, one stream, `--seconds` (default 10)
//! from node-1's pod to node-2's pod (Gbit/s received), then `--pings` pings (default 200) at
//! 10 ms (p50 and p99 RTT). In relayed mode the relay's meshd CPU (utime + stime, all threads)
//! is read around each TCP run: CPU seconds per GB forwarded. Medians are printed side by side
//! with the anchors measured on this machine (docs/testing.md, shared anchors).
//!
//! Needs root, iperf3 and the workspace binaries (release build recommended):
//!   cargo build --release --workspace --bins && sudo target/release/weft-path-bench

use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};
use weft_tests::perf::{cpu_secs, iperf, json_f64};
use weft_tests::util::{ns_cmd, Proc};
use weft_tests::{Cluster, ClusterOpts, NatKind, PingOpts, Pod, SiteSpec};

struct Args {
    runs: usize,
    seconds: u32,
    pings: u32,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        runs: 3,
        seconds: 10,
        pings: 200,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = |name: &str| -> Result<u64> {
            it.next()
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{name} needs a number"))
        };
        match flag.as_str() {
            "--runs" => a.runs = val("--runs")?.max(1) as usize,
            "--seconds" => a.seconds = val("--seconds")?.clamp(1, 600) as u32,
            "--pings" => a.pings = val("--pings")?.clamp(10, 100_000) as u32,
            "-h" | "--help" => {
                println!("weft-path-bench [--runs N] [--seconds S] [--pings N]");
                std::process::exit(0);
            }
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

#[derive(Default)]
struct Mode {
    gbits: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    relay_cpu_s: f64,
    relay_bytes: f64,
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn path_of(c: &Cluster, from: usize, to: &str) -> String {
    c.node(from)
        .status_peer(to)
        .ok()
        .flatten()
        .and_then(|p| p["path"].as_str().map(String::from))
        .unwrap_or_default()
}

fn measure(
    c: &Cluster,
    src: &Pod,
    dst: &Pod,
    a: &Args,
    relay_pid: Option<u32>,
    m: &mut Mode,
) -> Result<()> {
    for run in 0..a.runs {
        let cpu0 = relay_pid.map(cpu_secs).transpose()?;
        let v = iperf(&src.ns, &dst.ip.to_string(), a.seconds, &[])?;
        let cpu1 = relay_pid.map(cpu_secs).transpose()?;
        let gbit = json_f64(&v, &["end", "sum_received", "bits_per_second"])? / 1e9;
        let bytes = json_f64(&v, &["end", "sum_received", "bytes"])?;
        if let (Some(x), Some(y)) = (cpu0, cpu1) {
            m.relay_cpu_s += y - x;
            m.relay_bytes += bytes;
        }
        let r = src.ping(dst.ip, &PingOpts::count(a.pings).interval(0.01).wait(1))?;
        eprintln!(
            "  run {}: TCP {gbit:.2} Gbit/s, ping p50 {:?} p99 {:?} ms, {}/{} replies",
            run + 1,
            r.p50_ms(),
            r.p99_ms(),
            r.received,
            r.transmitted
        );
        m.gbits.push(gbit);
        m.p50.extend(r.p50_ms());
        m.p99.extend(r.p99_ms());
    }
    let _ = c;
    Ok(())
}

fn main() -> Result<()> {
    let a = parse_args()?;
    weft_tests::util::require_root()?;
    let opts = ClusterOpts {
        pod_mtu: 1376,
        sites: vec![
            SiteSpec::public("cloud", &[0]),
            SiteSpec::nat("site-a", NatKind::PortPreserving, &[1]),
            SiteSpec::nat("site-b", NatKind::PortPreserving, &[2]),
        ],
        ..Default::default()
    };
    let c = Cluster::new(3, opts)?;
    let pods: Vec<Pod> = (0..3)
        .map(|i| c.node(i).add_pod(0))
        .collect::<Result<_>>()?;
    for i in 0..3 {
        let n = c.node(i);
        let site = c.site_of(i).and_then(|s| c.site_name(s)).unwrap_or("none");
        let mut args = vec!["--use-relays", "--location", site];
        if i == 0 {
            args.push("--relay");
        } else {
            n.omit_default_args(&["--endpoint"]);
            args.push("--behind-nat");
        }
        n.start_meshd(&args)?;
    }
    let direct = weft_tests::wait_until(Duration::from_secs(15), || {
        path_of(&c, 1, "node-2") == "direct"
            && c.node(1)
                .status_peer("node-2")
                .ok()
                .flatten()
                .is_some_and(|p| p["latestHandshakeSecsAgo"].is_number())
    });
    if !direct {
        bail!(
            "node-1 and node-2 did not get a direct path:\n{}",
            c.debug_report()
        );
    }
    let log = c.tmp.join("iperf3-server.log");
    let mut srv = ns_cmd(&pods[2].ns, "iperf3");
    srv.args(["-s", "-B", &pods[2].ip.to_string()]);
    let _srv = Proc::spawn_logged("iperf3 -s", &mut srv, Some(&log))?;
    std::thread::sleep(Duration::from_millis(500));

    eprintln!("direct (punched through both NATs):");
    let mut d = Mode::default();
    measure(&c, &pods[1], &pods[2], &a, None, &mut d)?;

    c.block_udp_between_sites(1, 2)?;
    let t = Instant::now();
    let relayed = weft_tests::wait_until(Duration::from_secs(60), || {
        let _ = pods[1].ping(pods[2].ip, &PingOpts::count(1).wait(1));
        path_of(&c, 1, "node-2") == "relayed" && path_of(&c, 2, "node-1") == "relayed"
    });
    if !relayed {
        bail!("no fallback to the relay:\n{}", c.debug_report());
    }
    eprintln!(
        "relayed through node-0 (UDP between the sites blocked; fallback after {:?}):",
        t.elapsed()
    );
    let relay_pid = c.node(0).meshd_pid().context("relay meshd pid")?;
    let mut r = Mode::default();
    measure(&c, &pods[1], &pods[2], &a, Some(relay_pid), &mut r)?;

    let f = |x: Option<f64>, unit: &str| x.map_or("-".to_string(), |v| format!("{v:.2}{unit}"));
    println!();
    println!(
        "weft-path-bench: {} run(s) per path, iperf3 TCP 1 stream {} s, {} pings at 10 ms; mesh MTU 1376",
        a.runs, a.seconds, a.pings
    );
    println!(
        "{:<44} {:>12} {:>12} {:>12} {:>16}",
        "path", "TCP Gbit/s", "ping p50", "ping p99", "relay CPU s/GB"
    );
    let cpu_gb = (r.relay_bytes > 0.0).then(|| r.relay_cpu_s / (r.relay_bytes / 1e9));
    for (name, m, cpu) in [
        ("weft direct, two NATs punched", &d, "-".to_string()),
        ("weft relayed through a third node", &r, f(cpu_gb, "")),
    ] {
        println!(
            "{:<44} {:>12} {:>12} {:>12} {:>16}",
            name,
            f(median(&m.gbits), ""),
            f(median(&m.p50), " ms"),
            f(median(&m.p99), " ms"),
            cpu
        );
    }
    println!("anchors (docs/testing.md, this machine, two namespaces on one veth, no NAT):");
    println!(
        "{:<44} {:>12} {:>12}",
        "  meshd, veth (weft-bench 2026-12-02)", "2.09", "0.43 ms"
    );
    println!(
        "{:<44} {:>12} {:>12}",
        "  wireguard-go with offloads, veth", "1.27", "0.72 ms"
    );
    println!(
        "{:<44} {:>12} {:>12}",
        "  boringtun-cli 0.7.1, veth", "0.54-0.64", "0.25 ms"
    );
    if let (Some(dg), Some(rg)) = (median(&d.gbits), median(&r.gbits)) {
        println!(
            "relayed / direct throughput: {:.0} %; relay CPU {} s per GB forwarded",
            100.0 * rg / dg.max(1e-9),
            f(cpu_gb, "")
        );
    }
    Ok(())
}
