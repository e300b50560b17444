//! End-to-end tests of meshd with the etcd registry: a real etcd runs in the switch namespace
//! (198.18.0.1:2379, see `Cluster::start_etcd`) and the nodes reach it over the underlay.
//! Need root, etcd (scripts/install-test-deps.sh) and the workspace binaries; run serially:
//!   cargo build --workspace --bins && cargo test -p weft-tests --test etcd -- --test-threads=1

use std::time::{Duration, Instant};
use weft_tests::{Cluster, Etcd, Node, PingOpts, Pod};

const READY: Duration = Duration::from_secs(20);
/// Lease TTL the tests give meshd, so an expiry is quick to observe.
const TTL: &str = "5";

fn setup() {
    weft_tests::set_nettool(env!("CARGO_BIN_EXE_weft-nettool"));
}

fn etcd_args(etcd: &Etcd) -> Vec<String> {
    vec![
        "--registry".into(),
        etcd.spec(),
        "--etcd-lease-ttl".into(),
        TTL.into(),
    ]
}

fn start(n: &Node, args: &[String]) {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    n.start_meshd(&refs).expect("start meshd");
}

/// n nodes, meshd on etcd on the first `running` of them, each claiming its pod range (no
/// --pod-cidr) and with one pod; mesh ready.
fn etcd_mesh(n: usize, running: usize) -> (Cluster, Etcd, Vec<Pod>) {
    setup();
    let c = Cluster::with_nodes(n).expect("cluster");
    let etcd = c.start_etcd().expect("etcd");
    for i in 0..running {
        claim(c.node(i), &etcd_args(&etcd));
    }
    let pods: Vec<Pod> = (0..running)
        .map(|i| c.node(i).add_pod(0).expect("pod"))
        .collect();
    c.wait_mesh_ready(READY).expect("mesh ready");
    (c, etcd, pods)
}

/// Starts meshd claiming its pod range; returns the range.
fn claim(n: &Node, args: &[String]) -> String {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    n.start_meshd_claiming(&refs).expect("start meshd")
}

fn claim_of(etcd: &Etcd, node: &str) -> Option<serde_json::Value> {
    let out = etcd
        .etcdctl(&["get", &format!("/weft/claims/{node}"), "--print-value-only"])
        .expect("get claim");
    serde_json::from_str(out.trim()).ok()
}

fn peer_names(n: &Node) -> Vec<String> {
    n.status_peer_names().unwrap_or_default()
}

fn public_key_of(n: &Node) -> String {
    n.status_json().expect("status")["node"]["publicKey"]
        .as_str()
        .expect("publicKey")
        .to_string()
}

/// 5 nodes form a mesh through etcd (records at /weft/nodes/NAME, each bound to a lease), each
/// with a pod range it claimed (/weft/claims/NAME, all distinct). A node killed with SIGKILL
/// stays a peer until its lease runs out, then leaves every peer list; restarted (with its
/// remembered range deleted from the state dir, so only etcd's claim can give it back), it rejoins
/// under the same key with the same range. `meshd leave` deletes the record and releases the
/// claim at once.
#[test]
fn etcd_mesh_expiry_rejoin_and_leave() {
    let (c, etcd, pods) = etcd_mesh(5, 5);
    c.assert_pods_ping(&pods.iter().collect::<Vec<_>>());
    // Records, claims, and the link health reports (written within a 2 s check of starting).
    let want: Vec<String> = ["claims", "health", "nodes"]
        .iter()
        .flat_map(|k| (0..5).map(move |i| format!("/weft/{k}/node-{i}")))
        .collect();
    let mut keys = Vec::new();
    weft_tests::wait_until(Duration::from_secs(10), || {
        keys = etcd.keys("/weft/").unwrap_or_default();
        keys == want
    });
    assert_eq!(keys, want);
    for k in keys.iter().filter(|k| !k.starts_with("/weft/claims/")) {
        assert!(
            etcd.lease_of(k).expect("lease").is_some(),
            "{k} is not bound to a lease"
        );
    }
    let mut ranges: Vec<String> = c.nodes.iter().map(|n| n.current_pod_cidr()).collect();
    for (i, n) in c.nodes.iter().enumerate() {
        let st = n.status_json().expect("status");
        assert_eq!(st["registry"].as_str(), Some("connected"), "{st}");
        assert_eq!(st["podCidrClaim"].as_str(), Some("held"), "{st}");
        let cl = claim_of(&etcd, &n.name).expect("claim");
        assert_eq!(cl["podCidr"].as_str(), Some(ranges[i].as_str()), "{cl}");
        assert!(etcd
            .lease_of(&format!("/weft/claims/{}", n.name))
            .expect("lease")
            .is_none());
    }
    ranges.sort();
    ranges.dedup();
    assert_eq!(ranges.len(), 5, "a range was claimed twice: {ranges:?}");

    // SIGKILL: nobody deletes the record, the lease expires after the TTL (5 s).
    let n2 = c.node(2);
    let key2 = public_key_of(n2);
    n2.stop_meshd(libc::SIGKILL).expect("SIGKILL");
    let killed = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..2 {
        assert!(
            peer_names(c.node(i)).contains(&"node-2".to_string()),
            "node-{i} dropped node-2 before its lease could expire"
        );
    }
    for i in 0..2 {
        let gone = weft_tests::wait_until(Duration::from_secs(15), || {
            !peer_names(c.node(i)).contains(&"node-2".to_string())
        });
        assert!(
            gone,
            "node-{i} still lists node-2 {:?} after SIGKILL\n{}",
            killed.elapsed(),
            c.debug_report()
        );
    }
    eprintln!(
        "node-2 left every peer list {:?} after SIGKILL",
        killed.elapsed()
    );
    assert!(!etcd
        .keys("/weft/")
        .expect("keys")
        .contains(&"/weft/nodes/node-2".to_string()));

    // Restarted with the same state dir (key kept) but without the remembered range: etcd's
    // claim gives the same range back.
    let range2 = n2.current_pod_cidr();
    std::fs::remove_file(n2.state_dir().join("pod-cidr")).expect("remembered range");
    assert_eq!(
        claim(n2, &etcd_args(&etcd)),
        range2,
        "range changed across restart"
    );
    assert_eq!(public_key_of(n2), key2, "public key changed across restart");
    c.wait_mesh_ready(READY).expect("mesh ready after rejoin");
    assert!(etcd
        .keys("/weft/")
        .expect("keys")
        .contains(&"/weft/nodes/node-2".to_string()));
    c.assert_pods_ping(&pods.iter().collect::<Vec<_>>());

    // leave: the record and the claim go at once (no waiting for the lease), the peers drop
    // node-1.
    c.node(1).meshd_leave().expect("leave");
    assert!(
        weft_tests::wait_until(Duration::from_secs(3), || {
            let keys = etcd.keys("/weft/").unwrap_or_default();
            !keys.contains(&"/weft/nodes/node-1".to_string())
                && !keys.contains(&"/weft/claims/node-1".to_string())
                && !keys.contains(&"/weft/health/node-1".to_string())
        }),
        "node-1's record, claim or health report still in etcd after leave"
    );
    for i in [0, 2, 3, 4] {
        assert!(
            weft_tests::wait_until(Duration::from_secs(3), || !peer_names(c.node(i))
                .contains(&"node-1".to_string())),
            "node-{i} still lists node-1 after leave"
        );
    }
}

/// etcd is down for 30 s while pods ping each other at 20 Hz: no packet is lost, meshd reports
/// the registry unreachable and keeps every peer. Meanwhile node 0's meshd is restarted: it comes
/// up from its cached peer set (the registry cannot be read) and routes again. When etcd returns
/// everyone resyncs (all peers, registry connected); a node added right after is reachable from
/// all within 5 s, and a leave is seen by the others.
#[test]
fn etcd_outage_keeps_traffic_flowing() {
    let (c, mut etcd, mut pods) = etcd_mesh(4, 3);
    let opts = PingOpts::count(700).interval(0.05).wait(1);
    // 1 <-> 2 for the whole test; 0 -> 1 until node 0's meshd is restarted.
    let long: Vec<_> = [(1, 2), (2, 1)]
        .iter()
        .map(|&(a, b)| pods[a].bg_ping(pods[b].ip, &opts).expect("bg ping"))
        .collect();
    let short = pods[0].bg_ping(pods[1].ip, &opts).expect("bg ping");
    std::thread::sleep(Duration::from_secs(2));
    etcd.stop();
    let down = Instant::now();
    for n in &c.nodes[..3] {
        n.wait_status(Duration::from_secs(10), |st| {
            st["registry"]
                .as_str()
                .is_some_and(|r| r.starts_with("unreachable"))
        })
        .expect("registry reported unreachable");
    }
    std::thread::sleep(Duration::from_secs(8));
    let r = short.stop();
    assert!(r.transmitted >= 150, "ping ran too short: {}", r.output);
    assert_eq!(
        r.lost(),
        0,
        "0 -> 1 lost {:?} during the outage",
        r.lost_seqs()
    );

    // Restart node 0 while etcd is still down: it must come up from its cache and route.
    let n0 = c.node(0);
    n0.stop_meshd(libc::SIGTERM).expect("SIGTERM");
    start(n0, &etcd_args(&etcd));
    let st = n0
        .wait_status(Duration::from_secs(5), |st| {
            st["peers"].as_array().is_some_and(|p| p.len() == 2)
        })
        .expect("restarted meshd has its cached peers");
    assert!(
        st["registry"].as_str().is_some_and(|r| r != "connected"),
        "etcd is down, yet: {st}"
    );
    assert!(
        st["podCidrClaim"]
            .as_str()
            .is_some_and(|r| r.starts_with("unconfirmed")),
        "etcd is down, yet: {st}"
    );
    assert_eq!(
        st["node"]["podCidrs"][0].as_str(),
        Some(n0.current_pod_cidr().as_str()),
        "the restart did not keep the remembered range"
    );
    for (a, b) in [(0, 1), (1, 0), (0, 2), (2, 0)] {
        let bg = pods[a]
            .bg_ping(pods[b].ip, &PingOpts::count(200).interval(0.05).wait(1))
            .expect("bg ping");
        let ok = weft_tests::wait_until(Duration::from_secs(5), || bg.replies_so_far() > 0);
        let r = bg.stop();
        assert!(
            ok,
            "{} -> {}: no reply within 5 s of the restart during the outage: {}\n{}",
            pods[a].ip,
            pods[b].ip,
            r.output,
            c.debug_report()
        );
    }

    std::thread::sleep(Duration::from_secs(30).saturating_sub(down.elapsed()));
    for n in &c.nodes[..3] {
        assert_eq!(
            peer_names(n).len(),
            2,
            "{} lost a peer during the outage",
            n.name
        );
    }
    etcd.start().expect("etcd back");
    for n in &c.nodes[..3] {
        n.wait_status(Duration::from_secs(10), |st| {
            st["registry"].as_str() == Some("connected")
                && st["podCidrClaim"].as_str() == Some("held")
                && st["peers"].as_array().is_some_and(|p| p.len() == 2)
        })
        .expect("resynced after etcd returned");
    }
    // Past the old lease of node 0's first meshd (5 s TTL): its record must survive, rebound to
    // the new meshd's lease.
    std::thread::sleep(Duration::from_secs(7));
    for n in &c.nodes[..3] {
        assert_eq!(
            peer_names(n).len(),
            2,
            "{} lost a peer after etcd returned\n{}",
            n.name,
            c.debug_report()
        );
    }
    for p in long {
        let r = p.stop();
        assert!(r.transmitted >= 600, "ping ran too short: {}", r.output);
        assert_eq!(
            r.lost(),
            0,
            "lost {:?} of {} during the etcd outage\n{}",
            r.lost_seqs(),
            r.transmitted,
            c.debug_report()
        );
    }
    c.assert_pods_ping(&pods.iter().collect::<Vec<_>>());

    // A node added now is reachable from every pod (and reaches them) within 5 s.
    let added = Instant::now();
    claim(c.node(3), &etcd_args(&etcd));
    pods.push(c.node(3).add_pod(0).expect("pod"));
    assert!(
        added.elapsed() < Duration::from_secs(5),
        "meshd took {:?} to start",
        added.elapsed()
    );
    let bgs: Vec<_> = (0..3)
        .flat_map(|i| [(i, 3), (3, i)])
        .map(|(a, b)| {
            (
                a,
                b,
                pods[a]
                    .bg_ping(pods[b].ip, &PingOpts::count(200).interval(0.05).wait(1))
                    .expect("bg ping"),
            )
        })
        .collect();
    for (a, b, bg) in bgs {
        let left = Duration::from_secs(5).saturating_sub(added.elapsed());
        let ok = weft_tests::wait_until(left, || bg.replies_so_far() > 0);
        let r = bg.stop();
        assert!(
            ok,
            "{} -> {}: no reply within 5 s of adding node-3: {}\n{}",
            pods[a].ip,
            pods[b].ip,
            r.output,
            c.debug_report()
        );
    }
    eprintln!(
        "node-3 reachable both ways from all {:?} after its start",
        added.elapsed()
    );

    // The registry works again: a leave is seen by the others.
    c.node(2).meshd_leave().expect("leave");
    for i in [0, 1, 3] {
        assert!(weft_tests::wait_until(Duration::from_secs(5), || {
            !peer_names(c.node(i)).contains(&"node-2".to_string())
        }));
    }
}

/// 20 nodes start meshd at the same moment, each claiming a /24 from a pool of 32 (so claims
/// collide and the compare-and-swap has to sort them out): every node gets a range, no range is
/// claimed twice (in the nodes' own view and in etcd), and the mesh is fully connected (every
/// pair has a handshake and every node pings every other's mesh address). A 21st node asking for
/// a /20 finds no room and exits with a clear error instead of waiting.
#[test]
fn twenty_nodes_at_once_claim_distinct_ranges() {
    setup();
    const N: usize = 20;
    let c = Cluster::with_nodes(N + 1).expect("cluster");
    let etcd = c.start_etcd().expect("etcd");
    let mut args = etcd_args(&etcd);
    args.extend(["--cluster-cidr".into(), "10.42.0.0/19".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    for n in &c.nodes[..N] {
        n.spawn_meshd_claiming(&refs).expect("spawn meshd");
    }
    let mut ranges = Vec::new();
    for n in &c.nodes[..N] {
        n.wait_meshd_api(Duration::from_secs(30)).expect("meshd up");
        ranges.push(n.refresh_claimed().expect("claimed range"));
    }
    eprintln!("{N} nodes claimed ranges within {:?}", t0.elapsed());
    let mut distinct = ranges.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), N, "a range was claimed twice: {ranges:?}");
    for (n, r) in c.nodes[..N].iter().zip(&ranges) {
        let net: ipnet::Ipv4Net = r.parse().expect("range");
        assert_eq!(net.prefix_len(), 24, "{r}");
        assert!("10.42.0.0/19"
            .parse::<ipnet::Ipv4Net>()
            .expect("pool")
            .contains(&net));
        let cl = claim_of(&etcd, &n.name).expect("claim in etcd");
        assert_eq!(cl["podCidr"].as_str(), Some(r.as_str()), "{cl}");
    }
    c.wait_mesh_ready(Duration::from_secs(90))
        .expect("full mesh of 20");
    eprintln!("full mesh of {N} after {:?}", t0.elapsed());
    for n in &c.nodes[..N] {
        assert_eq!(peer_names(n).len(), N - 1, "{} peers", n.name);
    }
    // Every node pings every other node's mesh address (one node's pings in parallel).
    for a in &c.nodes[..N] {
        let pings: Vec<_> = c.nodes[..N]
            .iter()
            .filter(|b| b.index != a.index)
            .map(|b| {
                let opts = PingOpts::count(1)
                    .wait(2)
                    .source(a.current_mesh_ip().to_string());
                (
                    b.name.clone(),
                    weft_tests::BgPing::start(&a.ns, &b.current_mesh_ip().to_string(), &opts)
                        .expect("ping"),
                )
            })
            .collect();
        for (b, p) in pings {
            let r = p.finish().expect("ping result");
            assert!(r.all_received(), "{} -> {b}: {}", a.name, r.output);
        }
    }

    // No room for a /20 (every /20 of the pool overlaps a claimed /24): a clear error, at once.
    let last = c.node(N);
    let mut full = refs.clone();
    full.extend(["--node-cidr-size", "20"]);
    let t = Instant::now();
    let e = last
        .start_meshd_claiming(&full)
        .expect_err("the pool has no free /20");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let log = last.meshd_log();
    assert!(
        log.contains("no free /20 left in 10.42.0.0/19"),
        "{e:#}\nlog:\n{log}"
    );
    assert!(claim_of(&etcd, &last.name).is_none());
}

/// Reclaiming: with a pool of two /24s held by node-0 and node-1, node-1 dies (SIGKILL). A node
/// started before node-1 has been gone for --cidr-reclaim-after finds the pool full and exits
/// with a clear error; started after, it takes node-1's range. node-1, back, learns its range is
/// gone and (the pool being full) exits with a clear error instead of using it.
#[test]
fn a_range_is_reclaimed_only_after_its_owner_is_gone_long_enough() {
    setup();
    let c = Cluster::with_nodes(3).expect("cluster");
    let etcd = c.start_etcd().expect("etcd");
    let mut args = etcd_args(&etcd);
    args.extend([
        "--cluster-cidr".into(),
        "10.42.0.0/23".into(),
        "--cidr-reclaim-after".into(),
        "8s".into(),
    ]);
    let r0 = claim(c.node(0), &args);
    let r1 = claim(c.node(1), &args);
    assert_ne!(r0, r1);
    c.wait_mesh_ready(READY).expect("mesh");
    c.node(1).stop_meshd(libc::SIGKILL).expect("SIGKILL");
    let killed = Instant::now();

    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let e = c
        .node(2)
        .start_meshd_claiming(&refs)
        .expect_err("too early to reclaim");
    assert!(
        c.node(2).meshd_log().contains("no free /24 left"),
        "{e:#}\n{}",
        c.node(2).meshd_log()
    );

    // Lease (5 s) expired and 8 s since node-1's last renewal (every 2 s): reclaimable.
    std::thread::sleep(Duration::from_secs(11).saturating_sub(killed.elapsed()));
    let r2 = claim(c.node(2), &args);
    assert_eq!(r2, r1, "node-2 did not take node-1's range");
    assert!(c.node(2).meshd_log().contains("reclaimed the pod CIDR"));
    c.wait_mesh_ready(READY).expect("mesh with node-2");

    let e = c
        .node(1)
        .start_meshd(&refs)
        .expect_err("node-1 has no range left");
    let log = c.node(1).meshd_log();
    assert!(
        log.contains("previous pod CIDR was reclaimed") || log.contains("no free /24 left"),
        "{e:#}\n{log}"
    );
    assert_eq!(
        claim_of(&etcd, "node-2").expect("claim")["podCidr"].as_str(),
        Some(r1.as_str())
    );
    assert_eq!(peer_names(c.node(0)), vec!["node-2".to_string()]);
}
