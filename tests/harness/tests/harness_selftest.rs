//! Tests of the harness itself, with standard WireGuard (wireguard-go) instead of meshd, so the
//! harness is validated independently of weft. Need root; run serially:
//!   cargo test -p weft-tests --test harness_selftest -- --test-threads=1

use std::time::Duration;
use weft_tests::{
    harness_namespaces, tcp_transfer, wg_genkey, Cluster, ClusterOpts, Marker, PingOpts, TcpOpts,
    WgPeer, MESH_PORT,
};

fn setup() {
    weft_tests::set_nettool(env!("CARGO_BIN_EXE_weft-nettool"));
}

/// Two wireguard-go nodes as each other's peers: pod-to-pod ICMP and TCP work through them; the
/// bridge only ever sees UDP between the listen ports and never the marker; the TUN sees it.
#[test]
fn wireguard_go_pair_encrypts_pod_traffic() {
    setup();
    let c = Cluster::with_nodes(2).expect("cluster");
    let (n0, n1) = (c.node(0), c.node(1));
    let p0 = n0.add_pod(0).expect("pod0");
    let p1 = n1.add_pod(0).expect("pod1");
    let (k0, k1) = (wg_genkey().expect("key"), wg_genkey().expect("key"));
    let peer = |k: &weft_tests::WgKeys, n: &weft_tests::Node| WgPeer {
        public_key: k.public_key.clone(),
        endpoint: Some(format!("{}:{MESH_PORT}", n.underlay_ip)),
        allowed_ips: vec![n.pod_cidr.clone()],
        persistent_keepalive: None,
    };
    let if0 = n0
        .start_wireguard_go(&k0.private_key, MESH_PORT, &[peer(&k1, n1)])
        .expect("wg-go 0");
    n1.start_wireguard_go(&k1.private_key, MESH_PORT, &[peer(&k0, n0)])
        .expect("wg-go 1");
    c.wait_mesh_ready(Duration::from_secs(15))
        .expect("handshake");

    let marker = Marker::random();
    let bridge = c.capture_underlay("").expect("bridge capture");
    let tun = c.capture(&n0.ns, &if0, "").expect("tun capture");

    let r = p0
        .ping(p1.ip, &PingOpts::count(10).interval(0.05).pattern(&marker))
        .expect("ping");
    assert!(r.all_received(), "pod0 -> pod1 ping: {}", r.output);
    let r = p1
        .ping(p0.ip, &PingOpts::count(5).interval(0.05).pattern(&marker))
        .expect("ping");
    assert!(r.all_received(), "pod1 -> pod0 ping: {}", r.output);
    for (from, to) in [(&p0, &p1), (&p1, &p0)] {
        let t = tcp_transfer(
            &from.ns,
            &to.ns,
            &to.ip_str(),
            &TcpOpts::new(300_000, marker.hex()),
        )
        .expect("tcp");
        assert!(t.complete(), "{t:?}");
        assert_eq!(t.marker_count, 300_000 / 16, "{t:?}");
        assert!(t.peer.starts_with(&from.ip_str()), "{t:?}");
    }
    // Node itself (source = its mesh address) reaches the remote pod.
    let r = n0
        .ping(
            p1.ip,
            &PingOpts::count(3)
                .interval(0.05)
                .source(n0.mesh_ip.to_string()),
        )
        .expect("ping");
    assert!(r.all_received(), "node0 -> pod1: {}", r.output);

    let b = bridge.stop().expect("stop bridge");
    let t = tun.stop().expect("stop tun");
    assert!(b.len() > 100, "bridge capture too small: {}", b.len());
    assert!(!b.contains_marker(&marker), "marker leaked onto the bridge");
    let v = b.ipv4_violations(&c.underlay_ips(), &[MESH_PORT]);
    assert!(v.is_empty(), "non-WireGuard IPv4 between nodes: {v:?}");
    assert!(b
        .ipv4_touching("10.42.0.0".parse().expect("ip"), 16)
        .is_empty());
    let marker_pkts = t.marker_packets(&marker).len();
    assert!(
        marker_pkts >= 15,
        "TUN capture (control) must see the marker, saw {marker_pkts}"
    );
    assert!(
        b.wireguard_data_count() >= marker_pkts,
        "{} WireGuard data packets < {} marker packets",
        b.wireguard_data_count(),
        marker_pkts
    );
    let prefix = c.prefix.clone();
    drop(c);
    let left: Vec<String> = harness_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

/// Negative control: with no encryption and a routed underlay, the same capture DOES see the
/// marker and non-UDP packets between nodes, so the leak checks are able to fail. Also checks
/// the pod MTU behaviour that the mesh MTU test relies on.
#[test]
fn plaintext_is_detected_without_encryption() {
    setup();
    let c = Cluster::new(
        2,
        ClusterOpts {
            router_pod_routes: true,
            ..Default::default()
        },
    )
    .expect("cluster");
    let p0 = c.node(0).add_pod(0).expect("pod");
    let p1 = c.node(1).add_pod(0).expect("pod");
    let marker = Marker::random();
    let bridge = c.capture_underlay("").expect("capture");
    let r = p0
        .ping(p1.ip, &PingOpts::count(3).interval(0.05).pattern(&marker))
        .expect("ping");
    assert!(r.all_received(), "{}", r.output);
    let t = tcp_transfer(
        &p1.ns,
        &p0.ns,
        &p0.ip_str(),
        &TcpOpts::new(50_000, marker.hex()),
    )
    .expect("tcp");
    assert!(t.complete());
    let b = bridge.stop().expect("stop");
    assert!(
        b.contains_marker(&marker),
        "plain capture must see the marker"
    );
    assert!(b.count_containing(marker.ascii()) > 0, "ASCII marker (TCP)");
    assert!(
        b.count_containing(&marker.raw()) >= 3,
        "raw marker (ping -p)"
    );
    assert!(!b
        .ipv4_touching("10.42.0.0".parse().expect("ip"), 16)
        .is_empty());
    assert!(!b.ipv4_violations(&[], &[MESH_PORT]).is_empty());
    assert_eq!(b.wireguard_data_count(), 0);

    // Pod MTU 1420: 1392 bytes of ICMP payload + 28 = 1420 fits with DF, 1393 does not.
    let ok = p0
        .ping(p1.ip, &PingOpts::count(2).interval(0.05).size(1392).df())
        .expect("ping");
    assert!(ok.all_received(), "{}", ok.output);
    let big = p0
        .ping(p1.ip, &PingOpts::count(1).size(1393).df())
        .expect("ping");
    assert!(!big.any_received() && big.too_big(), "{}", big.output);
}

/// Leftovers of a crashed run (a namespace of our scheme with a process in it) are removed by
/// the next Cluster::new; a cluster dropped while panicking leaves nothing behind; netem works.
#[test]
fn cleanup_leftovers_panics_and_netem() {
    setup();
    let fake = "wt-99999999-0-n0";
    let _ = std::process::Command::new("ip")
        .args(["netns", "add", fake])
        .status();
    let mut sleeper = std::process::Command::new("ip")
        .args(["netns", "exec", fake, "sleep", "600"])
        .spawn()
        .expect("sleep");
    std::thread::sleep(Duration::from_millis(200));
    let prefix;
    {
        let c = Cluster::with_nodes(2).expect("cluster");
        prefix = c.prefix.clone();
        assert!(
            !harness_namespaces().iter().any(|n| n == fake),
            "leftover not removed"
        );
        let st = weft_tests::wait_for(Duration::from_secs(5), || sleeper.try_wait().ok().flatten());
        assert!(st.is_some(), "process in leftover namespace not killed");
        // Impairments on node 0's underlay: loss (nftables fallback when netem is missing).
        let (n0, n1) = (c.node(0), c.node(1));
        n0.set_loss(100.0).expect("loss");
        let r = n0
            .ping(n1.underlay_ip, &PingOpts::count(3).interval(0.05).wait(1))
            .expect("ping");
        assert_eq!(r.received, 0, "{}", r.output);
        n0.netem("loss 50%").expect("netem loss");
        let r = n0
            .ping(
                n1.underlay_ip,
                &PingOpts::count(100).interval(0.005).wait(1),
            )
            .expect("ping");
        assert!(
            r.received > 20 && r.received < 80,
            "50% loss gave {}",
            r.output
        );
        n0.clear_netem();
        let r = n0
            .ping(n1.underlay_ip, &PingOpts::count(20).interval(0.005))
            .expect("ping");
        assert!(r.all_received(), "{}", r.output);
        if n0.netem_supported() {
            n0.netem("delay 30ms").expect("netem");
            let r = n0
                .ping(n1.underlay_ip, &PingOpts::count(3).interval(0.05))
                .expect("ping");
            assert!(
                r.all_received() && r.p50_ms().unwrap_or(0.0) >= 30.0,
                "{}",
                r.output
            );
            n0.clear_netem();
        } else {
            eprintln!("tc netem not in this kernel: delay emulation skipped");
        }
    }
    assert!(!harness_namespaces().iter().any(|n| n.starts_with(&prefix)));

    let seen = std::sync::Mutex::new(String::new());
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let c = Cluster::with_nodes(3).expect("cluster");
        *seen.lock().expect("lock") = c.prefix.clone();
        let _ = c.node(2).add_pod(0).expect("pod");
        assert!(harness_namespaces().len() >= 5);
        panic!("deliberate panic with a live cluster");
    }));
    assert!(res.is_err());
    let prefix = seen.lock().expect("lock").clone();
    assert!(!prefix.is_empty());
    let left: Vec<String> = harness_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect();
    assert!(left.is_empty(), "left after panic: {left:?}");
    // Its logs were kept (as for any failed test); this panic was deliberate.
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join("weft-tests").join(&prefix));
}
