//! End-to-end tests of meshd in a netns cluster (see weft_tests docs for the topology).
//! Need root and the workspace binaries; run serially:
//!   cargo build --workspace --bins && cargo test -p weft-tests --test mesh -- --test-threads=1
//! `soak_200s_with_rekeys` alone takes ~4 minutes.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use weft_tests::{
    drops_of, tcp_transfer, udp_send, wg_genkey, Cluster, Marker, Node, PingOpts, Pod, RecordSpec,
    TcpOpts, UdpReceiver, UdpSend, MESH_PORT,
};

const READY: Duration = Duration::from_secs(20);

fn setup() {
    weft_tests::set_nettool(env!("CARGO_BIN_EXE_weft-nettool"));
}

/// n nodes with one pod each and meshd everywhere, mesh ready.
fn start_mesh(n: usize) -> (Cluster, Vec<Pod>) {
    setup();
    let c = Cluster::with_nodes(n).expect("cluster");
    let pods: Vec<Pod> = (0..n).map(|i| c.node(i).add_pod(0).expect("pod")).collect();
    for i in 0..n {
        c.node(i).start_meshd(&[]).expect("start meshd");
    }
    c.wait_mesh_ready(READY).expect("mesh ready");
    (c, pods)
}

fn assert_ping(c: &Cluster, ns: &str, from_desc: &str, to: Ipv4Addr, opts: &PingOpts) {
    let r = weft_tests::ping(ns, &to.to_string(), opts).expect("ping");
    assert!(
        r.all_received(),
        "{from_desc} -> {to}: {}/{} replies\n{}\n{}",
        r.received,
        r.transmitted,
        r.output,
        c.debug_report()
    );
}

fn pod_ping(c: &Cluster, from: &Pod, to: Ipv4Addr) {
    assert_ping(
        c,
        &from.ns,
        &from.ns,
        to,
        &PingOpts::count(3).interval(0.05),
    );
}

fn assert_tcp(c: &Cluster, from: &Pod, to: &Pod, bytes: u64, marker: &str) {
    let t = tcp_transfer(&from.ns, &to.ns, &to.ip_str(), &TcpOpts::new(bytes, marker))
        .unwrap_or_else(|e| panic!("tcp {} -> {}: {e:#}\n{}", from.ip, to.ip, c.debug_report()));
    assert!(t.complete(), "tcp {} -> {}: {t:?}", from.ip, to.ip);
    assert!(
        t.peer.starts_with(&format!("{}:", from.ip)),
        "no SNAT expected: {t:?}"
    );
}

/// Waits until a ping from `ns` to `dst` gets a reply; returns how long it took.
fn time_to_first_reply(ns: &str, dst: Ipv4Addr, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let bg = weft_tests::BgPing::start(
        ns,
        &dst.to_string(),
        &PingOpts::count((limit.as_secs_f64() / 0.05) as u32 + 1)
            .interval(0.05)
            .wait(1),
    )
    .expect("bg ping");
    let got = weft_tests::wait_until(limit, || bg.replies_so_far() > 0);
    let elapsed = start.elapsed();
    let _ = bg.stop();
    got.then_some(elapsed)
}

// ---------------------------------------------------------------------------------------------
// a. connectivity

/// 3 nodes, 1 pod each: every pod reaches every pod on other nodes (ICMP and TCP, both
/// directions); each node itself (source = its mesh address) reaches remote pods.
#[test]
fn a_all_pods_reach_all_pods() {
    let (c, pods) = start_mesh(3);
    let marker = Marker::random();
    for a in &pods {
        for b in &pods {
            if a.node_index == b.node_index {
                continue;
            }
            pod_ping(&c, a, b.ip);
            assert_tcp(&c, a, b, 200_000, marker.hex());
        }
    }
    for n in &c.nodes {
        for p in &pods {
            if p.node_index == n.index {
                continue;
            }
            assert_ping(
                &c,
                &n.ns,
                &n.name,
                p.ip,
                &PingOpts::count(3)
                    .interval(0.05)
                    .source(n.mesh_ip.to_string()),
            );
            let t = tcp_transfer(
                &n.ns,
                &p.ns,
                &p.ip_str(),
                &TcpOpts::new(100_000, marker.hex()).bind(n.mesh_ip.to_string()),
            )
            .unwrap_or_else(|e| panic!("tcp {} -> {}: {e:#}\n{}", n.name, p.ip, c.debug_report()));
            assert!(t.complete(), "{t:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// b. no plaintext

/// A bridge capture during transfers, a meshd restart (SIGTERM + start while a marked ping
/// runs) and after a SIGKILL (traffic still attempted) never holds the marker; every IPv4 packet
/// on the bridge is UDP to/from port 51820; WireGuard data packets >= marker packets seen on the
/// TUN of a node (the control, which must see the marker).
#[test]
fn b_no_plaintext_on_the_underlay() {
    let (c, pods) = start_mesh(3);
    let marker = Marker::random();
    let bridge = c.capture_underlay("").expect("bridge capture");
    let control = c
        .capture(&c.node(0).ns, "weft0", "")
        .expect("weft0 capture");

    // Phase 1: transfers between all pods.
    for a in &pods {
        for b in &pods {
            if a.node_index != b.node_index {
                assert_ping(
                    &c,
                    &a.ns,
                    &a.ns,
                    b.ip,
                    &PingOpts::count(3).interval(0.05).pattern(&marker),
                );
                assert_tcp(&c, a, b, 100_000, marker.hex());
            }
        }
    }

    // Phase 2: restart node 1's meshd while marked pings run both ways (20 Hz).
    let long = PingOpts::count(200).interval(0.05).wait(1).pattern(&marker);
    let bg01 = pods[0].bg_ping(pods[1].ip, &long).expect("bg");
    let bg10 = pods[1].bg_ping(pods[0].ip, &long).expect("bg");
    std::thread::sleep(Duration::from_millis(500));
    c.node(1).stop_meshd(libc::SIGTERM).expect("SIGTERM meshd");
    // Traffic keeps being attempted while meshd is down.
    let _ = udp_send(
        &pods[1].ns,
        &format!("{}:9999", pods[0].ip),
        &UdpSend {
            count: 20,
            marker: Some(marker.hex().into()),
            ..Default::default()
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    c.node(1).start_meshd(&[]).expect("restart meshd");
    c.wait_mesh_ready(READY).expect("mesh ready after restart");
    std::thread::sleep(Duration::from_secs(1));
    let _ = bg01.stop();
    let _ = bg10.stop();

    // Phase 3: SIGKILL node 1's meshd; traffic continues to be attempted both ways.
    let bg01 = pods[0]
        .bg_ping(
            pods[1].ip,
            &PingOpts::count(60).interval(0.05).wait(1).pattern(&marker),
        )
        .expect("bg");
    let bg10 = pods[1]
        .bg_ping(
            pods[0].ip,
            &PingOpts::count(60).interval(0.05).wait(1).pattern(&marker),
        )
        .expect("bg");
    c.node(1).stop_meshd(libc::SIGKILL).expect("SIGKILL meshd");
    for (from, to) in [
        (&pods[1], &pods[0]),
        (&pods[0], &pods[1]),
        (&pods[1], &pods[2]),
    ] {
        let _ = udp_send(
            &from.ns,
            &format!("{}:9999", to.ip),
            &UdpSend {
                count: 20,
                size: 200,
                marker: Some(marker.hex().into()),
                ..Default::default()
            },
        );
        let _ = tcp_transfer(
            &from.ns,
            &to.ns,
            &to.ip_str(),
            &TcpOpts::new(10_000, marker.hex()).timeout(Duration::from_secs(2)),
        );
    }
    // The node itself (mesh address gone with the TUN: use its underlay source) too.
    let _ = weft_tests::ping(
        &c.node(1).ns,
        &pods[0].ip_str(),
        &PingOpts::count(5).interval(0.05).wait(1).pattern(&marker),
    );
    let _ = bg01.stop();
    let _ = bg10.stop();

    let b = bridge.stop().expect("stop bridge");
    let t = control.stop().expect("stop control");
    eprintln!(
        "bridge: {} packets, {} WireGuard data, {} handshake; weft0 control: {} packets, {} with the marker",
        b.len(),
        b.wireguard_data_count(),
        b.wireguard_handshake_count(),
        t.len(),
        t.marker_packets(&marker).len()
    );
    c.assert_underlay_encrypted(&b, &marker);
    let control_marker = t.marker_packets(&marker).len();
    assert!(
        control_marker > 0,
        "control capture on node-0 weft0 must contain the marker"
    );
    assert!(
        b.wireguard_data_count() >= control_marker,
        "WireGuard data packets on the bridge ({}) < marker packets on weft0 ({control_marker})",
        b.wireguard_data_count()
    );
    assert_eq!(
        b.dropped_by_kernel, 0,
        "capture dropped packets: {}",
        b.tcpdump_report
    );
}

// ---------------------------------------------------------------------------------------------
// c. path MTU

/// Pod MTU = mesh MTU 1420: `ping -M do -s 1392` passes pod to pod, `-s 1393` fails with
/// "message too long" / "Frag needed".
#[test]
fn c_path_mtu() {
    let (c, pods) = start_mesh(2);
    let mtu: u32 = 1420;
    let link = c
        .node(0)
        .ip(&["-o", "link", "show", "weft0"])
        .expect("weft0");
    assert!(link.contains(&format!("mtu {mtu} ")), "weft0 MTU: {link}");
    for (a, b) in [(&pods[0], &pods[1]), (&pods[1], &pods[0])] {
        assert_ping(
            &c,
            &a.ns,
            &a.ns,
            b.ip,
            &PingOpts::count(3).interval(0.05).size(mtu - 28).df(),
        );
        let r = a
            .ping(
                b.ip,
                &PingOpts::count(2)
                    .interval(0.05)
                    .size(mtu - 27)
                    .df()
                    .wait(1),
            )
            .expect("ping");
        assert!(
            r.received == 0 && r.too_big(),
            "{} -> {} with {} bytes: {}",
            a.ip,
            b.ip,
            mtu - 27,
            r.output
        );
    }
    // From the node itself too (weft0 MTU).
    let n = c.node(0);
    assert_ping(
        &c,
        &n.ns,
        &n.name,
        pods[1].ip,
        &PingOpts::count(2)
            .interval(0.05)
            .size(mtu - 28)
            .df()
            .source(n.mesh_ip.to_string()),
    );
    let r = n
        .ping(
            pods[1].ip,
            &PingOpts::count(1)
                .size(mtu - 27)
                .df()
                .source(n.mesh_ip.to_string())
                .wait(1),
        )
        .expect("ping");
    assert!(r.received == 0 && r.too_big(), "{}", r.output);
    // Bulk TCP (full-size segments) works.
    assert_tcp(&c, &pods[0], &pods[1], 2_000_000, "mtu-check");
}

// ---------------------------------------------------------------------------------------------
// d. crypto-routing

/// Node C sends, through its tunnel to A, a packet whose inner source belongs to B's pod range.
/// A drops it (drops.sourceNotAllowed grows) and A's pod never receives it.
#[test]
fn d_crypto_routing_drops_foreign_source() {
    let (c, pods) = start_mesh(3);
    let (a, node_c) = (c.node(0), c.node(2));
    let spoof = "10.42.2.99"; // inside node-1 (B)'s pod range
                              // (This kernel has no dummy module: put the address on lo.)
    node_c
        .ip(&["addr", "add", &format!("{spoof}/32"), "dev", "lo"])
        .expect("addr");
    // Control: C's own traffic to A's pod works.
    assert_ping(
        &c,
        &node_c.ns,
        "node-2",
        pods[0].ip,
        &PingOpts::count(2)
            .interval(0.05)
            .source(node_c.mesh_ip.to_string()),
    );

    let before = drops_of(&a.status_json().expect("status A"), "sourceNotAllowed");
    let tx_before = node_c
        .status_peer(&a.name)
        .expect("status C")
        .and_then(|p| p["txBytes"].as_u64())
        .unwrap_or(0);
    let pod_cap = pods[0].capture_host_side(&c, "").expect("pod veth capture");
    let tun_cap = c.capture(&a.ns, "weft0", "").expect("A weft0 capture");
    let rx = UdpReceiver::start(&pods[0].ns, "0.0.0.0:9999", Duration::from_secs(4), None)
        .expect("udp recv");
    let sent = udp_send(
        &node_c.ns,
        &format!("{}:9999", pods[0].ip),
        &UdpSend {
            count: 20,
            size: 100,
            bind: Some(spoof.into()),
            interval_ms: 10,
            ..Default::default()
        },
    )
    .expect("udp send");
    assert_eq!(sent, 20);
    let _ = weft_tests::ping(
        &node_c.ns,
        &pods[0].ip_str(),
        &PingOpts::count(5).interval(0.05).source(spoof).wait(1),
    );
    let got = rx.finish().expect("udp recv result");
    let pod_pk = pod_cap.stop().expect("stop");
    let tun_pk = tun_cap.stop().expect("stop");

    let st = a.status_json().expect("status A");
    let after = drops_of(&st, "sourceNotAllowed");
    let tx_after = node_c
        .status_peer(&a.name)
        .expect("status C")
        .and_then(|p| p["txBytes"].as_u64())
        .unwrap_or(0);
    assert!(
        tx_after > tx_before,
        "C did not send anything to A (txBytes {tx_before} -> {tx_after})"
    );
    assert!(
        after >= before + 20,
        "A's drops.sourceNotAllowed {before} -> {after}; status {st}"
    );
    assert_eq!(
        got.received, 0,
        "A's pod received spoofed datagrams: {got:?}"
    );
    let spoof_ip: Ipv4Addr = spoof.parse().expect("ip");
    for (what, p) in [("A's pod veth", &pod_pk), ("A's weft0", &tun_pk)] {
        let bad: Vec<String> = p
            .ipv4()
            .filter(|(_, i)| i.src == spoof_ip)
            .map(|(pk, _)| pk.summary())
            .collect();
        assert!(bad.is_empty(), "{what} saw packets from {spoof}: {bad:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// e. interop with wireguard-go

/// Starts meshd on nodes 0..n-1 and wireguard-go on the last node, with a registry record for it.
fn mixed_mesh(n: usize) -> (Cluster, Vec<Pod>) {
    setup();
    let c = Cluster::with_nodes(n).expect("cluster");
    let pods: Vec<Pod> = (0..n).map(|i| c.node(i).add_pod(0).expect("pod")).collect();
    for i in 0..n - 1 {
        c.node(i).start_meshd(&[]).expect("meshd");
    }
    let wg = n - 1;
    let keys = wg_genkey().expect("keys");
    c.register_external(wg, &keys.public_key, MESH_PORT)
        .expect("record");
    let peers = c.wg_peers_for(wg).expect("peers");
    assert_eq!(peers.len(), n - 1);
    c.node(wg)
        .start_wireguard_go(&keys.private_key, MESH_PORT, &peers)
        .expect("wireguard-go");
    c.wait_mesh_ready(Duration::from_secs(30))
        .expect("mesh ready");
    (c, pods)
}

/// A wireguard-go node (record in the registry) and meshd nodes exchange pings and TCP both ways.
#[test]
fn e_interop_with_wireguard_go() {
    let (c, pods) = mixed_mesh(3);
    let wg = &pods[2];
    for m in &pods[..2] {
        pod_ping(&c, m, wg.ip);
        pod_ping(&c, wg, m.ip);
        assert_tcp(&c, m, wg, 500_000, "interop-m2w");
        assert_tcp(&c, wg, m, 500_000, "interop-w2m");
    }
    // The meshd side shows the wireguard-go node as a peer with a handshake.
    let p = c
        .node(0)
        .status_peer("node-2")
        .expect("status")
        .expect("peer node-2");
    assert!(p["latestHandshakeSecsAgo"].as_f64().is_some(), "{p}");
    assert_eq!(p["endpoint"].as_str(), Some("198.18.0.12:51820"), "{p}");
}

// ---------------------------------------------------------------------------------------------
// f. soak

/// 200 s (> REJECT_AFTER_TIME 180 s, so sessions are rekeyed) of 5 Hz pings between meshd
/// nodes and between meshd and wireguard-go, both initiating sides: zero loss.
#[test]
fn f_soak_200s_with_rekeys() {
    let (c, pods) = mixed_mesh(3);
    let secs = std::env::var("WEFT_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200u32);
    let opts = PingOpts::count(secs * 5).interval(0.2).wait(2);
    let pairs = [(0usize, 1usize), (1, 0), (0, 2), (2, 1)];
    // The soak measures rekeys, not bring-up (e_interop covers that): every pair answers first.
    // wireguard-go started after meshd can take one 5 s handshake retry to reach a meshd node.
    for (a, b) in pairs {
        let once = PingOpts::count(1).wait(1);
        let up = weft_tests::wait_until(Duration::from_secs(30), || {
            pods[a]
                .ping(pods[b].ip, &once)
                .is_ok_and(|r| r.all_received())
        });
        assert!(
            up,
            "pod{a} -> pod{b} never answered before the soak\n{}",
            c.debug_report()
        );
    }
    let pings: Vec<_> = pairs
        .iter()
        .map(|(a, b)| {
            (
                (a, b),
                pods[*a].bg_ping(pods[*b].ip, &opts).expect("bg ping"),
            )
        })
        .collect();
    let mut failures = Vec::new();
    for ((a, b), p) in pings {
        let r = p.finish().expect("ping finished");
        if r.transmitted < secs * 5 || r.lost() > 0 {
            failures.push(format!(
                "pod{a} -> pod{b}: {}/{} received, lost icmp_seq {:?}",
                r.received,
                r.transmitted,
                r.lost_seqs()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "loss during soak: {failures:?}\n{}",
        c.debug_report()
    );
    // Sessions were renewed during the soak (REKEY_AFTER_TIME 120 s).
    if secs >= 200 {
        for (n, peer) in [(0, "node-1"), (0, "node-2"), (1, "node-2")] {
            let p = c.node(n).status_peer(peer).expect("status").expect("peer");
            let age = p["latestHandshakeSecsAgo"].as_f64().unwrap_or(f64::MAX);
            assert!(
                age < 150.0,
                "node-{n} -> {peer}: last handshake {age} s ago, no rekey? {p}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// g. restart, record removal, bad registry files, garbage datagrams

fn public_key_of(n: &Node) -> String {
    n.status_json().expect("status")["node"]["publicKey"]
        .as_str()
        .expect("publicKey")
        .to_string()
}

/// SIGTERM + start with the same state dir keeps the public key; the mesh recovers within 5 s
/// with traffic started from the restarted side, then (second restart) from the other side.
#[test]
fn g1_restart_keeps_key_and_recovers() {
    let (c, pods) = start_mesh(2);
    let n1 = c.node(1);
    let key = public_key_of(n1);
    for (round, (from, to)) in [(&pods[1], &pods[0]), (&pods[0], &pods[1])]
        .into_iter()
        .enumerate()
    {
        n1.stop_meshd(libc::SIGTERM).expect("SIGTERM");
        let started = Instant::now();
        n1.start_meshd(&[]).expect("start again");
        assert_eq!(public_key_of(n1), key, "public key changed across restart");
        let t = time_to_first_reply(&from.ns, to.ip, Duration::from_secs(5));
        assert!(
            t.is_some(),
            "round {round}: no reply {} -> {} within 5 s of the restart\n{}",
            from.ip,
            to.ip,
            c.debug_report()
        );
        eprintln!(
            "round {round}: recovered {:?} after start ({:?} ping)",
            started.elapsed(),
            t
        );
        pod_ping(&c, from, to.ip);
        pod_ping(&c, to, from.ip);
    }
    // The record still carries the same key.
    let rec = c.registry.read_record("node-1").expect("record");
    assert_eq!(rec["publicKey"].as_str(), Some(key.as_str()));
}

/// Deleting a node's record file removes it from every peer's status within 2 s and makes its
/// pods unreachable (no plaintext fallback either).
#[test]
fn g2_deleted_record_removes_peer() {
    let (c, pods) = start_mesh(3);
    pod_ping(&c, &pods[0], pods[2].ip);
    c.registry.remove_record("node-2").expect("rm record");
    let deadline = Duration::from_secs(2);
    for i in 0..2 {
        let gone = weft_tests::wait_until(deadline, || {
            c.node(i)
                .status_peer_names()
                .map(|n| !n.iter().any(|x| x == "node-2"))
                .unwrap_or(false)
        });
        assert!(
            gone,
            "node-{i} still lists node-2 2 s after its record was deleted\n{}",
            c.debug_report()
        );
    }
    for p in &pods[..2] {
        let r = p
            .ping(pods[2].ip, &PingOpts::count(3).interval(0.1).wait(1))
            .expect("ping");
        assert_eq!(
            r.received, 0,
            "pod of deleted node still reachable: {}",
            r.output
        );
    }
    // The others still work.
    pod_ping(&c, &pods[0], pods[1].ip);
    pod_ping(&c, &pods[1], pods[0].ip);
}

/// `meshd leave` deletes the node's record and the others drop it.
#[test]
fn g2b_leave_removes_node() {
    let (c, _pods) = start_mesh(3);
    c.node(2).meshd_leave().expect("leave");
    assert!(
        weft_tests::wait_until(Duration::from_secs(5), || !c
            .registry
            .record_names()
            .contains(&"node-2".to_string())),
        "record still there: {:?}",
        c.registry.record_names()
    );
    for i in 0..2 {
        assert!(weft_tests::wait_until(Duration::from_secs(2), || {
            c.node(i)
                .status_peer_names()
                .map(|n| !n.contains(&"node-2".to_string()))
                .unwrap_or(false)
        }));
    }
}

/// Garbage JSON, a short key, a low-order key and a record whose pod CIDR overlaps an existing
/// node's are skipped; the mesh keeps working and a new node still joins; nothing is ever sent to
/// the bad records' endpoints.
#[test]
fn g3_bad_registry_files_are_skipped() {
    setup();
    let c = Cluster::with_nodes(3).expect("cluster");
    let pods: Vec<Pod> = (0..3).map(|i| c.node(i).add_pod(0).expect("pod")).collect();
    c.node(0).start_meshd(&[]).expect("meshd 0");
    c.node(1).start_meshd(&[]).expect("meshd 1");
    c.wait_mesh_ready(READY).expect("ready");
    let bridge = c.capture_underlay("").expect("capture");
    let reg = &c.registry;
    reg.write_garbage("garbage").expect("garbage");
    reg.write_raw("empty.json", b"").expect("empty");
    reg.write_short_key("shortkey", "198.18.0.97:51820", "10.42.97.0/24")
        .expect("short");
    reg.write_low_order_key("loworder", "198.18.0.98:51820", "10.42.98.0/24")
        .expect("low order");
    let someone = wg_genkey().expect("key");
    reg.write_record(&RecordSpec {
        name: "overlap".into(),
        public_key: someone.public_key,
        endpoints: vec!["198.18.0.99:51820".into()],
        pod_cidrs: vec!["10.42.1.0/25".into()], // inside node-0's 10.42.1.0/24
        key_generation: 0,
    })
    .expect("overlap");
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..2 {
        let n = c.node(i);
        assert!(
            n.meshd_running(),
            "meshd on node-{i} died\n{}",
            n.meshd_log()
        );
        let names = n.status_peer_names().expect("status");
        for bad in ["garbage", "empty", "shortkey", "loworder", "overlap"] {
            assert!(
                !names.iter().any(|x| x == bad),
                "node-{i} took bad record {bad}: {names:?}"
            );
        }
        let other = format!("node-{}", 1 - i);
        assert!(names.contains(&other), "node-{i} lost {other}: {names:?}");
    }
    pod_ping(&c, &pods[0], pods[1].ip);
    pod_ping(&c, &pods[1], pods[0].ip);
    // Traffic to the bad records' pod ranges goes nowhere (and not to their endpoints).
    let _ = pods[0].ping("10.42.98.10", &PingOpts::count(2).interval(0.1).wait(1));
    let _ = pods[0].ping("10.42.97.10", &PingOpts::count(2).interval(0.1).wait(1));
    // A new valid node still joins.
    c.node(2).start_meshd(&[]).expect("meshd 2");
    c.wait_mesh_ready(READY).expect("ready with node-2");
    pod_ping(&c, &pods[2], pods[0].ip);
    pod_ping(&c, &pods[1], pods[2].ip);
    let b = bridge.stop().expect("stop");
    let bad_eps: Vec<Ipv4Addr> = ["198.18.0.97", "198.18.0.98", "198.18.0.99"]
        .iter()
        .map(|s| s.parse().expect("ip"))
        .collect();
    let to_bad: Vec<String> = b
        .ipv4()
        .filter(|(_, i)| bad_eps.contains(&i.dst))
        .map(|(p, _)| p.summary())
        .collect();
    assert!(
        to_bad.is_empty(),
        "packets sent to bad records' endpoints: {to_bad:?}"
    );
}

/// A 65507-byte UDP datagram and ~1000 random datagrams (some with WireGuard headers) sent to a
/// node's listen port do not crash meshd: it still answers status and forwards pings.
#[test]
fn g4_garbage_datagrams_do_not_crash() {
    let (c, pods) = start_mesh(2);
    let target = format!("{}:{MESH_PORT}", c.node(0).underlay_ip);
    let sw = c.switch_ns.clone().expect("switch ns");
    // The attacker sits on the underlay (the switch namespace).
    udp_send(
        &sw,
        &target,
        &UdpSend {
            size: 65507,
            random: true,
            ..Default::default()
        },
    )
    .expect("big datagram");
    let mut total = 1;
    for (size, prefix) in [
        (1usize, vec![]),
        (3, vec![]),
        (4, vec![4u8, 0, 0, 0]),
        (32, vec![4, 0, 0, 0]),
        (64, vec![3, 0, 0, 0]),
        (92, vec![2, 0, 0, 0]),
        (148, vec![1, 0, 0, 0]),
        (200, vec![4, 0, 0, 0]),
        (1400, vec![]),
        (1500, vec![4, 0, 0, 0]),
    ] {
        total += udp_send(
            &sw,
            &target,
            &UdpSend {
                size,
                count: 100,
                random: true,
                prefix,
                ..Default::default()
            },
        )
        .expect("random datagrams");
    }
    assert!(total >= 1000, "sent {total}");
    std::thread::sleep(Duration::from_millis(500));
    let n0 = c.node(0);
    assert!(
        n0.meshd_running(),
        "meshd died after garbage\n{}",
        n0.meshd_log()
    );
    let st = n0.status_json().expect("status after garbage");
    eprintln!("drops after garbage: {}", st["drops"]);
    pod_ping(&c, &pods[0], pods[1].ip);
    pod_ping(&c, &pods[1], pods[0].ip);
}
