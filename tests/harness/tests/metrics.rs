//! meshd's Prometheus metrics on a real mesh, read by promtool and by a real Prometheus server.
//!
//! Three meshd nodes (`--metrics-listen NODE_IP:9473`) with a cluster PSK secret: node-0 and
//! node-1 with a pod each, node-2 claiming its pod range; node-3's record is a ghost (a key
//! nobody holds, nothing listening), so node-0 has a peer that never answers.
//!
//! 1. `GET /metrics` without an OpenMetrics Accept header gives the classic text format, which
//!    `promtool check metrics` (Debian's prometheus package) passes without a warning; with
//!    the header it is OpenMetrics (ends with `# EOF`).
//! 2. Values move with traffic: after 40 pings pod-0 -> pod-1, node-0's receive/transmit bytes
//!    for node-1 grew by at least the ICMP bytes, its last-handshake timestamp is recent, the
//!    workers' TUN packet counters grew; 200 packets at the ghost overflow its queue
//!    (`weft_drops_total{reason="queueFull"}` grows), its handshake attempts and failures
//!    (no response within 5 s) grow.
//! 3. A real Prometheus server (Debian's) scrapes node-0 as OpenMetrics and answers queries for
//!    the per-peer series.
//! 4. The ghost's record deleted: its series are gone from the next scrape.
//! 5. No private key in any scrape; every metric the Grafana dashboard
//!    (deploy/grafana/weft-dashboard.json) queries is one meshd exports.
//!
//! Needs root, curl, prometheus (promtool) and the workspace binaries; run serially:
//!   cargo build --workspace --bins && cargo test -p weft-tests --test metrics -- --test-threads=1

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};
use weft_tests::{Cluster, Node, PingOpts};

const PORT: u16 = 9473;
/// A cluster secret for the PSK metrics (32 bytes, base64).
const SECRET: &str = "q0E9bGmSIcHGYkHnUczk3P/U6N1ZRCpB5cFa4ZDl4Xo=";
const OPENMETRICS: &str = "application/openmetrics-text;version=1.0.0";

fn scrape(n: &Node, accept: Option<&str>) -> String {
    let url = format!("http://{}:{PORT}/metrics", n.underlay_ip);
    let mut args = vec!["-sS", "--max-time", "5"];
    if let Some(a) = accept {
        args.extend(["-H", a]);
    }
    args.push(&url);
    n.exec("curl", &args).expect("curl /metrics")
}

/// Samples of a classic-text scrape: `name{labels}` -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The value of the sample named `name` whose labels include every `key="value"` in `with`.
fn value(s: &BTreeMap<String, f64>, name: &str, with: &[(&str, &str)]) -> Option<f64> {
    s.iter()
        .find(|(k, _)| {
            (k.as_str() == name || k.starts_with(&format!("{name}{{")))
                && with
                    .iter()
                    .all(|(lk, lv)| k.contains(&format!("{lk}=\"{lv}\"")))
        })
        .map(|(_, v)| *v)
}

fn promtool_check(text: &str) -> (bool, String) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    (
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Metric names the dashboard's PromQL expressions use.
fn dashboard_metrics() -> BTreeSet<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/grafana/weft-dashboard.json"
    );
    let text = std::fs::read_to_string(path).expect("the dashboard");
    let v: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    if k == "expr" || k == "query" {
                        if let Some(s) = x.as_str() {
                            out.push(s.to_string());
                        }
                    }
                    walk(x, out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&v, &mut exprs);
    assert!(exprs.len() >= 8, "the dashboard has panels: {exprs:?}");
    exprs
        .iter()
        .flat_map(|e| {
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("weft_"))
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn metrics_move_with_traffic_and_pass_promtool_and_prometheus() {
    weft_tests::set_nettool(env!("CARGO_BIN_EXE_weft-nettool"));
    let c = Cluster::with_nodes(4).expect("cluster");
    // All with a cluster PSK secret; node-0 and node-1 with pods; node-2 claims its pod range.
    let mut pods = Vec::new();
    for i in 0..3 {
        let n = c.node(i);
        let listen = format!("{}:{PORT}", n.underlay_ip);
        let secret = n.dir.join("cluster-secret");
        let mut args = vec!["--metrics-listen".to_string(), listen];
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::write(&secret, format!("{SECRET}\n")).expect("secret file");
            std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))
                .expect("chmod");
        }
        args.extend(["--cluster-secret-file".into(), secret.display().to_string()]);
        if i < 2 {
            pods.push(n.add_pod(0).expect("pod"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if i < 2 {
            n.start_meshd(&args).expect("meshd");
        } else {
            n.start_meshd_claiming(&args)
                .expect("meshd claiming its range");
        }
    }
    let ghost = c.node(3);
    c.write_ghost_record(ghost.index).expect("ghost record");
    c.wait_mesh_ready(Duration::from_secs(20)).expect("mesh");
    let n0 = c.node(0);
    let n1 = c.node(1);

    // 1. Formats.
    let om = scrape(n0, Some(&format!("Accept: {OPENMETRICS}")));
    assert!(
        om.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF:\n{om}"
    );
    let before_text = scrape(n0, None);
    let (ok, lint) = promtool_check(&before_text);
    assert!(ok, "promtool check metrics:\n{lint}\n{before_text}");
    let before = samples(&before_text);

    // 2. Traffic.
    let r = pods[0]
        .ping(pods[1].ip, &PingOpts::count(40).interval(0.02).wait(1))
        .expect("ping");
    assert_eq!(r.received, 40, "{}", r.output);
    let flood = pods[0]
        .ping(
            ghost.current_mesh_ip(),
            &PingOpts::count(200).interval(0.01).wait(1),
        )
        .expect("ping the ghost");
    assert_eq!(flood.received, 0);
    // The ghost's initiations time out after 5 s each.
    std::thread::sleep(Duration::from_secs(6));
    let after_text = scrape(n0, None);
    let (ok, lint) = promtool_check(&after_text);
    assert!(ok, "promtool check metrics:\n{lint}\n{after_text}");
    let after = samples(&after_text);
    let peer1 = [("peer", n1.name.as_str()), ("kind", "node")];
    for name in [
        "weft_peer_receive_bytes_total",
        "weft_peer_transmit_bytes_total",
    ] {
        let (b, a) = (
            value(&before, name, &peer1).expect(name),
            value(&after, name, &peer1).expect(name),
        );
        assert!(
            a - b >= 40.0 * 84.0,
            "{name} for node-1 grew by {} (want >= 40 ICMP packets of 84 bytes)",
            a - b
        );
    }
    let hs = value(&after, "weft_peer_last_handshake_timestamp_seconds", &peer1)
        .expect("handshake timestamp");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    assert!(
        now - hs < 180.0 && now >= hs - 1.0,
        "handshake at {hs}, now {now}"
    );
    assert_eq!(value(&after, "weft_peer_key_pairs", &peer1), Some(1.0));
    let tun = |s: &BTreeMap<String, f64>| -> f64 {
        s.iter()
            .filter(|(k, _)| k.starts_with("weft_worker_tun_packets_total{"))
            .map(|(_, v)| v)
            .sum()
    };
    assert!(tun(&after) - tun(&before) >= 40.0, "worker TUN packets");
    let full = |s: &BTreeMap<String, f64>| {
        value(s, "weft_drops_total", &[("reason", "queueFull")]).unwrap_or(0.0)
    };
    assert!(
        full(&after) - full(&before) >= 50.0,
        "200 packets at a peer that never answers overflow its queue of 128: {} -> {}",
        full(&before),
        full(&after)
    );
    let g = [("peer", ghost.name.as_str())];
    let attempts = value(&after, "weft_peer_handshake_attempts_total", &g).expect("attempts");
    let failures = value(&after, "weft_peer_handshake_failures_total", &g).expect("failures");
    assert!(
        attempts >= 2.0 && failures >= 1.0,
        "ghost: {attempts} attempts, {failures} failures"
    );
    assert_eq!(
        value(&after, "weft_peer_handshake_failures_total", &peer1),
        Some(0.0),
        "a live peer has no failed handshakes"
    );
    assert_eq!(value(&after, "weft_registry_connected", &[]), Some(1.0));
    assert!(
        value(&after, "weft_registry_last_sync_timestamp_seconds", &[]).is_some_and(|t| t > 1.7e9)
    );
    assert_eq!(
        value(&after, "weft_key_rotation_state", &[("phase", "idle")]),
        Some(1.0)
    );
    assert_eq!(value(&after, "weft_peers", &[]), Some(3.0));
    assert!(value(&after, "weft_build_info", &[("component", "meshd")]) == Some(1.0));

    // 3. A real Prometheus server scrapes it (OpenMetrics) and answers queries.
    let dir = n0.dir.join("prometheus");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let conf = dir.join("prometheus.yml");
    std::fs::write(
        &conf,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: weft\n    \
             static_configs:\n      - targets: ['{}:{PORT}']\n",
            n0.underlay_ip
        ),
    )
    .expect("prometheus.yml");
    let prom_port = 19090;
    let mut prom = weft_tests::util::ns_cmd(&n0.ns, "prometheus");
    prom.args([
        &format!("--config.file={}", conf.display()),
        &format!("--storage.tsdb.path={}", dir.join("data").display()),
        &format!("--web.listen-address=127.0.0.1:{prom_port}"),
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("log"));
    let mut prom = prom.spawn().expect("prometheus");
    let query = |q: &str| -> serde_json::Value {
        let url = format!("http://127.0.0.1:{prom_port}/api/v1/query");
        let out = n0
            .exec(
                "curl",
                &[
                    "-sS",
                    "--max-time",
                    "3",
                    "-G",
                    &url,
                    "--data-urlencode",
                    &format!("query={q}"),
                ],
            )
            .unwrap_or_default();
        serde_json::from_str(&out).unwrap_or(serde_json::Value::Null)
    };
    let t = Instant::now();
    let mut series = 0;
    while t.elapsed() < Duration::from_secs(30) {
        let v = query("weft_peer_receive_bytes_total");
        series = v["data"]["result"].as_array().map_or(0, |a| a.len());
        if series == 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let up = query("up{job=\"weft\"}");
    let _ = prom.kill();
    let _ = prom.wait();
    assert_eq!(
        series,
        3,
        "Prometheus sees node-0's three peers; up: {up}\nlog: {}",
        std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
    );
    println!(
        "Prometheus scraped node-0 after {:?}: {series} peer series",
        t.elapsed()
    );

    // 4. A removed peer's series go.
    c.registry
        .remove_record(&ghost.name)
        .expect("remove the ghost");
    let gone = weft_tests::wait_until(Duration::from_secs(10), || {
        !scrape(n0, None).contains(&format!("peer=\"{}\"", ghost.name))
    });
    assert!(gone, "the ghost's series stay after its record went");

    // 5. No key material; the dashboard asks only for what meshd exports.
    let secret = std::fs::read_to_string(n0.state_dir().join("private.key")).expect("key");
    assert!(!after_text.contains(secret.trim()) && !om.contains(secret.trim()));
    // Every family meshd declares, on node-0 (cluster PSK) and node-2 (claimed range).
    let claiming = scrape(c.node(2), None);
    assert!(
        claiming.contains("weft_pod_cidr_claim_state{state=\"held\"} 1"),
        "node-2 holds its claimed range:\n{claiming}"
    );
    assert!(
        after_text.contains("weft_psk_generation "),
        "node-0 uses a cluster PSK"
    );
    let exported: BTreeSet<String> = [after_text.as_str(), claiming.as_str()]
        .iter()
        .flat_map(|t| t.lines())
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(String::from)
        .collect();
    let used = dashboard_metrics();
    let missing: Vec<&String> = used.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, which meshd does not export"
    );
    println!(
        "dashboard queries {} metrics, all exported; scrape excerpt:\n{}",
        used.len(),
        after_text
            .lines()
            .filter(|l| l.contains(&n1.name)
                || l.contains("queueFull")
                || l.starts_with("weft_key")
                || l.starts_with("weft_registry"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
