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

/// n nodes with one pod each, meshd on etcd on the first `running` of them, mesh ready.
fn etcd_mesh(n: usize, running: usize) -> (Cluster, Etcd, Vec<Pod>) {
    setup();
    let c = Cluster::with_nodes(n).expect("cluster");
    let etcd = c.start_etcd().expect("etcd");
    let pods: Vec<Pod> = (0..n).map(|i| c.node(i).add_pod(0).expect("pod")).collect();
    for i in 0..running {
        start(c.node(i), &etcd_args(&etcd));
    }
    c.wait_mesh_ready(READY).expect("mesh ready");
    (c, etcd, pods)
}

fn all_pods_ping(c: &Cluster, pods: &[Pod]) {
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
                c.debug_report()
            );
        }
    }
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

/// 3 nodes form a mesh through etcd (records at /weft/nodes/NAME, each bound to a lease). A node
/// killed with SIGKILL stays a peer until its lease runs out, then leaves every peer list;
/// restarted, it rejoins under the same key with the same public key. `meshd leave` deletes the
/// record at once.
#[test]
fn etcd_mesh_expiry_rejoin_and_leave() {
    let (c, etcd, pods) = etcd_mesh(3, 3);
    all_pods_ping(&c, &pods);
    let keys = etcd.keys("/weft/").expect("keys");
    assert_eq!(
        keys,
        [
            "/weft/nodes/node-0",
            "/weft/nodes/node-1",
            "/weft/nodes/node-2"
        ]
    );
    for k in &keys {
        assert!(
            etcd.lease_of(k).expect("lease").is_some(),
            "{k} is not bound to a lease"
        );
    }
    for i in 0..3 {
        let st = c.node(i).status_json().expect("status");
        assert_eq!(st["registry"].as_str(), Some("connected"), "{st}");
    }

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

    // Restarted with the same state dir: same key, back in etcd and in every peer list.
    start(n2, &etcd_args(&etcd));
    assert_eq!(public_key_of(n2), key2, "public key changed across restart");
    c.wait_mesh_ready(READY).expect("mesh ready after rejoin");
    assert!(etcd
        .keys("/weft/")
        .expect("keys")
        .contains(&"/weft/nodes/node-2".to_string()));
    all_pods_ping(&c, &pods);

    // leave: the record goes at once (no waiting for the lease), the peers drop node-1.
    c.node(1).meshd_leave().expect("leave");
    assert!(
        weft_tests::wait_until(Duration::from_secs(3), || !etcd
            .keys("/weft/")
            .unwrap_or_default()
            .contains(&"/weft/nodes/node-1".to_string())),
        "node-1's record still in etcd after leave"
    );
    for i in [0, 2] {
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
    let (c, mut etcd, pods) = etcd_mesh(4, 3);
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
    all_pods_ping(&c, &pods[..3]);

    // A node added now is reachable from every pod (and reaches them) within 5 s.
    let added = Instant::now();
    start(c.node(3), &etcd_args(&etcd));
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
