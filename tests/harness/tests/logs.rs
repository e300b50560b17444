//! meshd's JSON logs on a real mesh: every line is one JSON object carrying `node` and `event`,
//! lines about one peer carry `peer`, and warnings that repeat are rate-limited with a count.
//!
//! Three nodes; meshd runs on node-0 and node-1 with `--log-format json
//! --log-repeat-interval 6`. node-2's record is a ghost: a real key nobody holds, node-2's
//! underlay address where nothing listens. A pod on node-0 pings into node-2's pod range at
//! 10 Hz for 24 s, so node-0 has packets queued for a peer that never answers (a health check
//! every 2 s sees it: about 12 occurrences). Meanwhile an "intruder" record is rewritten 40
//! times over 24 s, alternating between a default route and a range holding its own endpoint (each
//! rewrite a new refusal reason). Then node-0's log must hold at most one `peer_unanswered` line per 6 s for
//! node-2 (with `repeated` counting the rest) and likewise for `record_refused`, while node-0
//! and node-1 keep pinging each other. No key material appears in any line.
//!
//! Needs root and the workspace binaries; run serially:
//!   cargo build --workspace --bins && cargo test -p weft-tests --test logs -- --test-threads=1

use serde_json::Value;
use std::time::{Duration, Instant};
use weft_tests::{wg_genkey, Cluster, PingOpts, RecordSpec};

const INTERVAL_SECS: u64 = 6;

fn lines_of(log: &str) -> Vec<Value> {
    log.lines()
        // The harness marks each start of meshd in its log file.
        .filter(|l| !l.trim().is_empty() && !l.starts_with("===== harness:"))
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .unwrap_or_else(|e| panic!("a meshd log line is not one JSON object ({e}): {l}"))
        })
        .collect()
}

fn events<'a>(lines: &'a [Value], event: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["event"] == event).collect()
}

#[test]
fn json_logs_carry_node_peer_event_and_repeats_are_rate_limited() {
    weft_tests::set_nettool(env!("CARGO_BIN_EXE_weft-nettool"));
    let c = Cluster::with_nodes(3).expect("cluster");
    let args = [
        "--log-format",
        "json",
        "--log-repeat-interval",
        &INTERVAL_SECS.to_string(),
    ];
    let p0 = c.node(0).add_pod(0).expect("pod on node-0");
    let p1 = c.node(1).add_pod(0).expect("pod on node-1");
    for i in 0..2 {
        c.node(i).start_meshd(&args).expect("meshd");
    }
    // The ghost: node-2's name, ranges and underlay address, a key no meshd holds.
    let ghost = c.node(2);
    let ghost_key = c.write_ghost_record(ghost.index).expect("ghost record");
    c.wait_mesh_ready(Duration::from_secs(20))
        .expect("node-0 and node-1 mesh");

    let ghost_dst = ghost.current_mesh_ip().to_string();
    let ping = p0
        .bg_ping(
            &ghost_dst,
            &PingOpts {
                count: 240,
                interval: 0.1,
                wait: 1,
                ..Default::default()
            },
        )
        .expect("ping into the ghost's range");
    // The intruder: alternating overlaps, so every rewrite is a new refusal reason.
    let intruder_key = wg_genkey().expect("wg genkey");
    let started = Instant::now();
    for k in 0..40 {
        // A default route, then a range holding its own endpoint: refused on their own, so
        // the refusal never knocks out a real node.
        let (endpoint, range) = if k % 2 == 0 {
            ("192.0.2.77:51820", "0.0.0.0/0")
        } else {
            ("10.42.200.1:51820", "10.42.200.0/24")
        };
        c.registry
            .write_record(&RecordSpec {
                name: "intruder".into(),
                public_key: intruder_key.public_key.clone(),
                endpoints: vec![endpoint.into()],
                pod_cidrs: vec![range.into()],
                key_generation: 1,
            })
            .expect("intruder record");
        std::thread::sleep(Duration::from_millis(600));
    }
    let refused_for = started.elapsed();
    let pinged = ping.stop();
    assert_eq!(
        pinged.received, 0,
        "nothing answers in the ghost's range: {}",
        pinged.output
    );
    // The mesh itself is unharmed.
    let ok = p0
        .ping(p1.ip, &PingOpts::default())
        .expect("ping node-0 -> node-1 pod");
    assert_eq!(
        ok.received, 3,
        "node-0 pod reaches node-1 pod: {}",
        ok.output
    );

    let log = c.node(0).meshd_log();
    let lines = lines_of(&log);
    assert!(lines.len() > 5, "meshd logged too little:\n{log}");
    for l in &lines {
        assert_eq!(
            l["node"],
            c.node(0).name.as_str(),
            "every line names the node: {l}"
        );
        assert!(
            l["event"].as_str().is_some_and(|e| !e.is_empty()),
            "every line has an event: {l}"
        );
        assert!(l["timestamp"].is_string() && l["level"].is_string(), "{l}");
    }
    for secret in [&ghost_key.private_key, &intruder_key.private_key] {
        assert!(!log.contains(secret.as_str()), "a private key in the log");
    }
    let own_key =
        std::fs::read_to_string(c.node(0).state_dir().join("private.key")).unwrap_or_default();
    if !own_key.trim().is_empty() {
        assert!(
            !log.contains(own_key.trim()),
            "node-0's private key in its log"
        );
    }

    // The peer that never answers: rate-limited, with the count of what was held back.
    let unanswered = events(&lines, "peer_unanswered");
    let window = refused_for;
    let most = window.as_secs() / INTERVAL_SECS + 2;
    assert!(
        !unanswered.is_empty() && unanswered.len() as u64 <= most,
        "peer_unanswered: {} lines in {window:?}, want 1..={most}:\n{unanswered:#?}",
        unanswered.len()
    );
    for l in &unanswered {
        assert_eq!(l["peer"], ghost.name.as_str(), "{l}");
        assert_eq!(l["level"], "WARN", "{l}");
        assert!(
            l["endpoint"]
                .as_str()
                .is_some_and(|e| e.contains(&ghost.underlay_ip.to_string())),
            "{l}"
        );
    }
    let held: u64 = unanswered
        .iter()
        .filter_map(|l| l["repeated"].as_u64())
        .sum();
    assert!(
        held >= 3,
        "the lines after the first say how many were held back (sum {held}):\n{unanswered:#?}"
    );

    // The refused record rewritten 40 times: a line per interval, the rest counted.
    // Each rewrite is refused when decoded (a default route, a range holding its endpoint).
    let refused = events(&lines, "registry_object_refused");
    let most = refused_for.as_secs() / INTERVAL_SECS + 2;
    assert!(
        !refused.is_empty() && refused.len() as u64 <= most,
        "record_refused: {} lines in {refused_for:?}, want 1..={most}:\n{refused:#?}",
        refused.len()
    );
    for l in &refused {
        assert_eq!(l["name"], "intruder", "{l}");
        assert!(
            l["error"].as_str().is_some_and(|r| r.contains("podCidrs")),
            "{l}"
        );
    }
    let held: u64 = refused.iter().filter_map(|l| l["repeated"].as_u64()).sum();
    let seen = refused.len() as u64 + held;
    assert!(
        held >= 5 && seen >= 10,
        "most of the 40 refusals were counted, not logged (lines {}, held {held}):\n{refused:#?}",
        refused.len()
    );
    // Lines from inside weft-core's per-peer spans carry the peer too.
    let core_peer_lines: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("weft_core"))
        })
        .collect();
    for l in &core_peer_lines {
        if l["message"].as_str().is_some_and(|m| m.contains("peer")) {
            assert!(
                l.get("peer").is_some(),
                "a weft-core peer line without peer: {l}"
            );
        }
    }
    println!(
        "{} lines; peer_unanswered {} lines (held {}); registry_object_refused {} lines; first unanswered line:\n{}",
        lines.len(),
        unanswered.len(),
        unanswered.iter().filter_map(|l| l["repeated"].as_u64()).sum::<u64>(),
        refused.len(),
        unanswered.first().map(|l| l.to_string()).unwrap_or_default()
    );
}
