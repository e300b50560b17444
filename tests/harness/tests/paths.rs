//! Multi-cloud paths on the netns harness: locations, nodes behind NAT, hole punching and relays.
//!
//! `mesh_across_nat_sites` (dir registry) and `mesh_across_nat_sites_etcd` (the same on etcd),
//! sites:
//! - `cloud`: node-0 and node-1, public, both relays (`--relay`);
//! - `site-a`: node-2 and node-3 behind a port-preserving NAT (5 s UDP conntrack timeout);
//! - `site-b`: node-4 behind a port-preserving NAT;
//! - `site-c`: node-5 behind a symmetric NAT (a new public port per destination).
//!
//! Every node runs with `--use-relays` and its site as `--location`; the NAT'd ones with
//! `--behind-nat`. Checked: every pod reaches every pod both ways; node-2 and node-3 use their
//! private endpoints (capture on site-a's LAN), the public nodes learnt the NAT'd nodes'
//! addresses; site-a and site-b punch a direct path within 10 s of starting (capture on the
//! routers: datagrams between the two NATs' public addresses), site-c is relayed to everyone
//! behind NAT (no datagram between its NAT and another NAT); a marker pinged across relayed
//! links never shows on any relay interface or relay TUN; DF pings at the pod MTU pass a relayed
//! path and one byte more is refused; the relay in use is killed under a 20 Hz ping: traffic
//! moves to the other relay within 5 s (the loss is printed); node-5's key rotates while
//! relayed, then node-5 is revoked and the relay refuses to carry its datagrams.
//!
//! `nat_idle_blocked_sites_etcd` (etcd registry): node-0 public relay, node-1 public, node-2
//! behind a port-preserving NAT, node-3 behind a symmetric one. All pods reach each other;
//! 60 s idle across site-a's NAT (5 s UDP timeout), then node-1's pod pings node-2's pod first:
//! answered (node-2's NAT keepalive kept its mapping); UDP between node-1's site and site-a is
//! blocked: node-1 and node-2 fall back to the relay; unblocked: they go direct again.
//!
//! Needs root and the workspace binaries; run serially:
//!   cargo build --workspace --bins && cargo test -p weft-tests --test paths -- --test-threads=1

use std::time::{Duration, Instant};
use weft_tests::{Cluster, ClusterOpts, Marker, NatKind, Node, PingOpts, Pod, SiteSpec};

/// Mesh MTU with relays: 1500 - 80 - 44.
const POD_MTU: u32 = 1376;

fn peer(n: &Node, name: &str) -> serde_json::Value {
    n.status_peer(name)
        .ok()
        .flatten()
        .unwrap_or(serde_json::Value::Null)
}

fn path_of(n: &Node, name: &str) -> (String, Option<String>) {
    let p = peer(n, name);
    (
        p["path"].as_str().unwrap_or("?").to_string(),
        p["relay"].as_str().map(String::from),
    )
}

fn ping_ok(p: &Pod, dst: impl std::fmt::Display) -> bool {
    p.ping(dst, &PingOpts::count(2).interval(0.1).wait(2))
        .is_ok_and(|r| r.received > 0)
}

/// meshd flags for node `i` of a cluster with sites.
fn start(c: &Cluster, i: usize, relay: bool, extra: &[&str]) {
    let n = c.node(i);
    let site = c.site_of(i).and_then(|s| c.site_name(s)).unwrap_or("none");
    let mut args: Vec<String> = vec![
        "--use-relays".into(),
        "--location".into(),
        site.into(),
        "--nat-keepalive".into(),
        "2".into(),
    ];
    if relay {
        args.push("--relay".into());
    }
    if c.is_natted(i) {
        n.omit_default_args(&["--endpoint"]);
        args.push("--behind-nat".into());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    n.start_meshd(&refs).expect("start meshd");
}

fn all_pods_reach_each_other(c: &Cluster, pods: &[Pod]) {
    for a in pods {
        for b in pods {
            if a.node_index == b.node_index {
                continue;
            }
            let ok = weft_tests::wait_until(Duration::from_secs(10), || ping_ok(a, b.ip));
            assert!(ok, "{} -> {}\n{}", a.ip, b.ip, c.debug_report());
        }
    }
}

#[test]
fn mesh_across_nat_sites() {
    mesh_across_nat_sites_on(false);
}

/// The same on etcd: the records with locations and no public endpoints, rotation and
/// revocation through etcd.
#[test]
fn mesh_across_nat_sites_etcd() {
    mesh_across_nat_sites_on(true);
}

/// Runs keyctl against the cluster's registry (`registry`: its `--registry` value).
fn keyctl(c: &Cluster, registry: &str, args: &[&str]) -> (Option<i32>, String) {
    let sw = c.switch_ns.clone().expect("switch namespace");
    let mut a: Vec<&str> = args.to_vec();
    a.extend(["--registry", registry]);
    let out = weft_tests::keyctl_in(&sw, &a, Duration::from_secs(60)).expect("keyctl");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn mesh_across_nat_sites_on(etcd: bool) {
    weft_tests::set_nettool(env!("CARGO_BIN_EXE_weft-nettool"));
    let opts = ClusterOpts {
        pod_mtu: POD_MTU,
        sites: vec![
            SiteSpec::public("cloud", &[0, 1]),
            SiteSpec::nat("site-a", NatKind::PortPreserving, &[2, 3]).udp_timeout(5),
            SiteSpec::nat("site-b", NatKind::PortPreserving, &[4]).udp_timeout(5),
            SiteSpec::nat("site-c", NatKind::Symmetric, &[5]).udp_timeout(5),
        ],
        ..Default::default()
    };
    let c = Cluster::new(6, opts).expect("cluster");
    let etcd = etcd.then(|| c.start_etcd().expect("etcd"));
    let registry = match &etcd {
        Some(e) => e.spec(),
        None => c.registry.spec(),
    };
    let reg = ["--registry", registry.as_str()];
    let pods: Vec<Pod> = (0..6).map(|i| c.node(i).add_pod(0).expect("pod")).collect();
    let (wan_a, wan_b, wan_c) = (
        c.site_public_ip(1).expect("a"),
        c.site_public_ip(2).expect("b"),
        c.site_public_ip(3).expect("c"),
    );
    // Capture on the NAT routers' public side from the start.
    let cap_a = c
        .capture(c.site_router_ns(1).expect("router a"), "wan", "udp")
        .expect("capture a");
    let cap_c = c
        .capture(c.site_router_ns(3).expect("router c"), "wan", "udp")
        .expect("capture c");
    let cap_lan_a = c
        .capture(&c.node(2).ns, "eth0", "udp")
        .expect("capture site-a lan");
    start(&c, 0, true, &reg);
    start(&c, 1, true, &reg);
    let t_start = Instant::now();
    for i in 2..6 {
        start(&c, i, false, &reg);
    }
    let started = t_start.elapsed();

    // Hole punching: site-a and site-b reach each other directly within 10 s of both starting.
    // Direct, at the other NAT's public address, with a handshake (not just "no relay yet").
    let direct_to = |from: usize, to: usize, wan: std::net::Ipv4Addr| {
        let p = peer(c.node(from), &format!("node-{to}"));
        p["path"] == "direct"
            && p["latestHandshakeSecsAgo"].is_number()
            && p["endpoint"]
                .as_str()
                .is_some_and(|e| e.starts_with(&format!("{wan}:")))
    };
    let punched = weft_tests::wait_until(Duration::from_secs(10), || {
        direct_to(2, 4, wan_b) && direct_to(4, 2, wan_a)
    });
    let t_punch = t_start.elapsed();
    assert!(
        punched,
        "site-a and site-b not direct within 10 s:\n{}",
        c.debug_report()
    );
    eprintln!(
        "nodes started within {started:?}; node-2 <-> node-4 direct (punched) {t_punch:?} after the first NAT'd node started"
    );
    all_pods_reach_each_other(&c, &pods);

    // Paths and their reasons.
    let p = peer(c.node(2), "node-3");
    assert_eq!(p["endpointSource"], "private", "{p}");
    assert_eq!(p["path"], "direct");
    assert!(
        p["endpoint"]
            .as_str()
            .unwrap_or("")
            .starts_with("192.168.2."),
        "{p}"
    );
    let p = peer(c.node(2), "node-0");
    assert_eq!(p["endpointSource"], "public", "{p}");
    assert_eq!(
        p["keepaliveSecs"], 2,
        "the NAT'd side keeps its mapping: {p}"
    );
    let p = peer(c.node(0), "node-2");
    assert_eq!(p["endpointSource"], "learned", "{p}");
    assert!(
        p["endpointReason"].as_str().unwrap_or("").contains("NAT"),
        "{p}"
    );
    assert_eq!(
        p["endpoint"]
            .as_str()
            .map(|e| e.starts_with(&wan_a.to_string())),
        Some(true),
        "node-0 sees node-2 at site-a's public address: {p}"
    );
    let p = peer(c.node(2), "node-4");
    assert_eq!(p["path"], "direct");
    assert!(
        p["endpoint"]
            .as_str()
            .unwrap_or("")
            .starts_with(&wan_b.to_string()),
        "{p}"
    );
    for (a, b) in [(2, 5), (5, 2), (4, 5), (5, 4), (3, 5)] {
        let (path, relay) = path_of(c.node(a), &format!("node-{b}"));
        assert_eq!(
            path,
            "relayed",
            "node-{a} -> node-{b}\n{}",
            c.debug_report()
        );
        assert!(matches!(relay.as_deref(), Some("node-0") | Some("node-1")));
    }
    let st = c.node(2).status_json().expect("status");
    assert_eq!(
        st["paths"]["reflexiveAddress"].as_str(),
        Some(format!("{wan_a}:51820").as_str()),
        "port-preserving NAT: {}",
        st["paths"]
    );
    let sock = c.node(2).api_socket().display().to_string();
    let text = c
        .node(2)
        .meshd_cli(&["status", "--api-socket", &sock])
        .expect("status text")
        .1;
    assert!(text.contains("relay:node-"), "{text}");
    assert!(text.contains("location site-a"), "{text}");
    eprintln!("meshd status on node-2:\n{text}");

    // No plaintext on any relay: ping node-2's pod <-> node-5's pod (relayed) with a marker.
    let marker = Marker::random();
    let relay_caps: Vec<_> = (0..2)
        .flat_map(|i| {
            let ns = c.node(i).ns.clone();
            [
                c.capture(&ns, "eth0", "").expect("relay eth0"),
                c.capture(&ns, "weft0", "").expect("relay tun"),
            ]
        })
        .collect();
    let dst_cap = pods[5].capture_host_side(&c, "icmp").expect("pod capture");
    let r = pods[2]
        .ping(
            pods[5].ip,
            &PingOpts::count(20).interval(0.05).pattern(&marker),
        )
        .expect("ping");
    assert!(r.all_received(), "relayed ping lost: {r:?}");
    let r = pods[5]
        .ping(
            pods[2].ip,
            &PingOpts::count(20).interval(0.05).pattern(&marker),
        )
        .expect("ping");
    assert!(r.all_received(), "relayed ping lost: {r:?}");
    let seen = dst_cap.stop().expect("pod capture");
    assert!(
        seen.contains_marker(&marker),
        "the marker went out (sanity)"
    );
    let mut relay_packets = 0;
    for cap in relay_caps {
        let pk = cap.stop().expect("relay capture");
        relay_packets += pk.len();
        assert!(
            !pk.contains_marker(&marker),
            "plaintext marker on a relay interface or TUN"
        );
    }
    assert!(
        relay_packets > 40,
        "the relays carried the pings ({relay_packets} packets)"
    );

    // Path MTU on a relayed path: DF at the pod MTU passes, one byte more is refused.
    let fits = POD_MTU - 28;
    let r = pods[2]
        .ping(
            pods[5].ip,
            &PingOpts::count(3).interval(0.1).size(fits).df(),
        )
        .expect("df ping");
    assert!(
        r.all_received(),
        "DF ping of {POD_MTU} bytes relayed: {r:?}"
    );
    let r = pods[2]
        .ping(pods[5].ip, &PingOpts::count(1).size(fits + 1).df())
        .expect("df ping");
    assert!(r.too_big() && r.received == 0, "one byte more: {r:?}");

    // The captures on the NATs: a/b direct, c never direct with another NAT.
    let pa = cap_a.stop().expect("capture a");
    let direct_ab = pa
        .ipv4()
        .filter(|(_, i)| (i.src == wan_a && i.dst == wan_b) || (i.src == wan_b && i.dst == wan_a))
        .count();
    assert!(
        direct_ab > 0,
        "no datagram between the two NATs' public addresses"
    );
    let pc = cap_c.stop().expect("capture c");
    let c_to_nat = pc
        .ipv4()
        .filter(|(_, i)| {
            let other = if i.src == wan_c { i.dst } else { i.src };
            other == wan_a || other == wan_b
        })
        .filter(|(p, _)| p.wireguard_type().is_some_and(|t| t == 4))
        .count();
    assert_eq!(
        c_to_nat, 0,
        "site-c exchanged data directly with another NAT"
    );
    let lan = cap_lan_a.stop().expect("lan capture");
    let (n2, n3) = (c.node(2).underlay_ip, c.node(3).underlay_ip);
    let private = lan
        .ipv4()
        .filter(|(_, i)| (i.src == n2 && i.dst == n3) || (i.src == n3 && i.dst == n2))
        .count();
    assert!(
        private > 0,
        "node-2 and node-3 did not talk on their private addresses"
    );
    eprintln!(
        "captures: {direct_ab} datagrams between the site-a and site-b NATs (direct), 0 data between site-c and another NAT, {private} on site-a's LAN between node-2 and node-3"
    );

    // Relay failover under a 20 Hz ping from node-2's pod to node-5's pod.
    let (_, used) = path_of(c.node(2), "node-5");
    let used = used.expect("relayed");
    let dead = if used == "node-0" { 0 } else { 1 };
    let ping = weft_tests::BgPing::start(
        &pods[2].ns,
        &pods[5].ip.to_string(),
        &PingOpts::count(300).interval(0.05).wait(1),
    )
    .expect("bg ping");
    std::thread::sleep(Duration::from_secs(3));
    let t_kill = Instant::now();
    c.node(dead).stop_meshd(9).expect("kill relay");
    let moved = weft_tests::wait_until(Duration::from_secs(10), || {
        path_of(c.node(2), "node-5").1.is_some_and(|r| r != used)
    });
    let t_moved = t_kill.elapsed();
    let r = ping.finish().expect("ping");
    assert!(
        moved,
        "node-2 still on the dead relay:\n{}",
        c.debug_report()
    );
    let lost = r.lost_seqs();
    let gap = lost.len() as f64 * 0.05;
    eprintln!(
        "relay {used} killed under 20 Hz ping: node-2 moved to the other relay after {t_moved:?}; {} of {} pings lost ({gap:.2} s of traffic)",
        lost.len(),
        r.transmitted
    );
    assert!(
        gap <= 5.0,
        "failover took more than 5 s: {} lost",
        lost.len()
    );
    assert!(r.received > 200, "{r:?}");

    // Key rotation on a relayed link, then revocation: a revoked node cannot use the relay.
    let live = 1 - dead;
    let (code, out) = keyctl(&c, &registry, &["rotate", "--node", "node-5", "--wait"]);
    assert_eq!(code, Some(0), "{out}");
    let rotated = weft_tests::wait_until(Duration::from_secs(30), || {
        c.node(2)
            .status_json()
            .ok()
            .and_then(|st| weft_tests::peer_of(&st, "node-5").cloned())
            .is_some_and(|p| p["keyGeneration"].as_u64().unwrap_or(0) >= 2)
    });
    assert!(rotated, "node-5's rotation not seen:\n{}", c.debug_report());
    assert!(
        ping_ok(&pods[2], pods[5].ip),
        "relayed link after the rotation"
    );
    assert_eq!(path_of(c.node(2), "node-5").0, "relayed");
    let refused_before = c.node(live).status_json().expect("st")["paths"]["stats"]["relayRefused"]
        .as_u64()
        .unwrap_or(0);
    let (code, out) = keyctl(&c, &registry, &["revoke", "node-5"]);
    assert_eq!(code, Some(0), "{out}");
    let gone = weft_tests::wait_until(Duration::from_secs(15), || {
        c.node(live).status_peer("node-5").ok().flatten().is_none()
            && c.node(2).status_peer("node-5").ok().flatten().is_none()
    });
    assert!(gone, "node-5 not removed:\n{}", c.debug_report());
    let r = pods[5]
        .ping(pods[2].ip, &PingOpts::count(10).interval(0.1).wait(1))
        .expect("ping");
    assert_eq!(r.received, 0, "a revoked node still reached node-2: {r:?}");
    let refused = weft_tests::wait_until(Duration::from_secs(5), || {
        c.node(live).status_json().expect("st")["paths"]["stats"]["relayRefused"]
            .as_u64()
            .unwrap_or(0)
            > refused_before
    });
    assert!(refused, "the relay did not refuse the revoked node");
    assert!(ping_ok(&pods[2], pods[4].ip), "the others still talk");
}

#[test]
fn nat_idle_blocked_sites_etcd() {
    weft_tests::set_nettool(env!("CARGO_BIN_EXE_weft-nettool"));
    let opts = ClusterOpts {
        pod_mtu: POD_MTU,
        sites: vec![
            SiteSpec::public("cloud-a", &[0]),
            SiteSpec::public("cloud-b", &[1]),
            SiteSpec::nat("site-a", NatKind::PortPreserving, &[2]).udp_timeout(5),
            SiteSpec::nat("site-c", NatKind::Symmetric, &[3]).udp_timeout(5),
        ],
        ..Default::default()
    };
    let c = Cluster::new(4, opts).expect("cluster");
    let etcd = c.start_etcd().expect("etcd");
    let reg = ["--registry".to_string(), etcd.spec()];
    let reg: Vec<&str> = reg.iter().map(String::as_str).collect();
    let pods: Vec<Pod> = (0..4).map(|i| c.node(i).add_pod(0).expect("pod")).collect();
    start(&c, 0, true, &reg);
    for i in 1..4 {
        start(&c, i, false, &reg);
    }
    all_pods_reach_each_other(&c, &pods);
    assert_eq!(path_of(c.node(2), "node-3").0, "relayed");
    assert_eq!(path_of(c.node(2), "node-1").0, "direct");
    assert_eq!(peer(c.node(1), "node-2")["endpointSource"], "learned");

    // 60 s idle across site-a's NAT (UDP timeout 5 s); then node-1's pod speaks first.
    eprintln!("idle for 60 s");
    std::thread::sleep(Duration::from_secs(60));
    let mappings = c.nat_mappings(2).unwrap_or_default();
    // The mapping towards node-1 (not a relay: nothing but node-2's NAT keepalive on that link
    // refreshes it) is still there after 60 s with a 5 s UDP timeout.
    let n1 = c.node(1).underlay_ip.to_string();
    assert!(
        mappings.iter().any(|m| m.contains(&format!("dst={n1} "))),
        "no mapping towards node-1 after the idle minute: {mappings:?}"
    );
    let r = pods[1]
        .ping(pods[2].ip, &PingOpts::count(3).interval(0.2).wait(2))
        .expect("ping");
    assert!(
        r.received > 0,
        "after 60 s idle the far side could not reach the NAT'd node: {r:?}\nmappings: {mappings:?}\n{}",
        c.debug_report()
    );
    eprintln!(
        "after 60 s idle (5 s UDP timeout), node-1 -> node-2 answered: {}/{} (first rtt {:?} ms)",
        r.received,
        r.transmitted,
        r.avg_ms()
    );

    // UDP blocked between cloud-b and site-a: node-1 and node-2 fall back to the relay.
    c.block_udp_between_sites(1, 2).expect("block");
    let relayed = weft_tests::wait_until(Duration::from_secs(40), || {
        // Traffic makes WireGuard notice: a handshake after 15 s unanswered, 5 s more.
        let _ = pods[1].ping(pods[2].ip, &PingOpts::count(1).wait(1));
        path_of(c.node(1), "node-2").0 == "relayed" && path_of(c.node(2), "node-1").0 == "relayed"
    });
    assert!(relayed, "no fallback to the relay:\n{}", c.debug_report());
    assert!(ping_ok(&pods[1], pods[2].ip) && ping_ok(&pods[2], pods[1].ip));
    c.unblock_udp_between_sites(1, 2).expect("unblock");
    let t = Instant::now();
    let direct = weft_tests::wait_until(Duration::from_secs(25), || {
        path_of(c.node(1), "node-2").0 == "direct" && path_of(c.node(2), "node-1").0 == "direct"
    });
    assert!(direct, "not direct again:\n{}", c.debug_report());
    eprintln!("UDP unblocked: direct again after {:?}", t.elapsed());
    assert!(ping_ok(&pods[1], pods[2].ip));
    drop(etcd);
}
