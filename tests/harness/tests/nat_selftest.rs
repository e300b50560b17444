//! Self-test of the multi-site topology (`weft_tests::sites`) with plain UDP sockets opened inside
//! the node namespaces (no meshd): each NAT and blocking property the NAT-traversal tests will rely
//! on really holds. Need root; run serially:
//!   cargo test -p weft-tests --test nat_selftest -- --test-threads=1

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};
use weft_tests::{
    harness_namespaces, Cluster, ClusterOpts, NatKind, Node, PingOpts, SiteSpec, MESH_PORT,
};

const PP: NatKind = NatKind::PortPreserving;
const SYM: NatKind = NatKind::Symmetric;
/// Port of the public "observer" sockets (what a STUN server would see).
const OBS_PORT: u16 = 3478;
/// How long to wait for datagrams that should (or should not) arrive.
const SETTLE: Duration = Duration::from_millis(300);

fn cluster(n: usize, sites: Vec<SiteSpec>) -> Cluster {
    Cluster::new(
        n,
        ClusterOpts {
            sites,
            ..Default::default()
        },
    )
    .expect("cluster with sites")
}

/// A UDP socket on `port` in node `n`, with a short read timeout.
fn sock(n: &Node, port: u16) -> UdpSocket {
    let s = n.udp_socket(port).expect("udp socket in node");
    s.set_read_timeout(Some(Duration::from_millis(20)))
        .expect("read timeout");
    s
}

fn send(s: &UdpSocket, to: SocketAddrV4, msg: &str) {
    s.send_to(msg.as_bytes(), to).expect("udp send");
}

/// Waits for datagrams in flight to arrive (or be dropped).
fn settle() {
    std::thread::sleep(SETTLE);
}

/// The datagrams queued on `s`: (source, payload).
fn queued(s: &UdpSocket) -> Vec<(SocketAddrV4, String)> {
    let mut v = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        match s.recv_from(&mut buf) {
            Ok((n, SocketAddr::V4(a))) => {
                v.push((a, String::from_utf8_lossy(&buf[..n]).into_owned()));
            }
            Ok((_, SocketAddr::V6(a))) => panic!("IPv6 source {a}"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return v
            }
            // An ICMP error reported on the socket, not a datagram.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// The source `obs` saw for each tag (payload) among its queued datagrams.
fn observed(obs: &UdpSocket) -> BTreeMap<String, SocketAddrV4> {
    queued(obs).into_iter().map(|(a, tag)| (tag, a)).collect()
}

/// Where the observer saw `tag` come from.
fn at(m: &BTreeMap<String, SocketAddrV4>, tag: &str) -> SocketAddrV4 {
    *m.get(tag)
        .unwrap_or_else(|| panic!("{tag:?} not seen by the public node: {m:?}"))
}

fn obs_addr(n: &Node) -> SocketAddrV4 {
    SocketAddrV4::new(n.underlay_ip, OBS_PORT)
}

fn wan(c: &Cluster, s: usize) -> Ipv4Addr {
    c.site_public_ip(s).expect("NAT site has a WAN address")
}

fn mappings(c: &Cluster, s: usize) -> String {
    c.nat_mappings(s).expect("conntrack -L").join("\n")
}

/// Whether datagrams tagged `tag` are among `got`.
fn has(got: &[(SocketAddrV4, String)], tag: &str) -> bool {
    got.iter().any(|(_, t)| t == tag)
}

/// Mapping behaviour (port-preserving vs symmetric) seen by two public nodes, replies pass,
/// unsolicited datagrams do not; captures work on a router's `wan`.
#[test]
fn mapping_and_filtering() {
    let c = cluster(
        4,
        vec![
            SiteSpec::nat("pp", PP, &[0]),
            SiteSpec::nat("sym", SYM, &[1]),
        ],
    );
    let (n0, n1, p2, p3) = (c.node(0), c.node(1), c.node(2), c.node(3));
    assert!(c.is_natted(0) && c.is_natted(1) && !c.is_natted(2));
    let r0 = c.site_router_ns(0).expect("router ns").to_string();
    let cap = c.capture(&r0, "wan", "udp").expect("capture on router wan");
    let (s0, s1) = (sock(n0, MESH_PORT), sock(n1, MESH_PORT));
    let (o2, o3) = (sock(p2, OBS_PORT), sock(p3, OBS_PORT));
    for (s, tag) in [(&s0, "n0"), (&s1, "n1")] {
        send(s, obs_addr(p2), tag);
        send(s, obs_addr(p3), tag);
    }
    settle();
    let (seen2, seen3) = (observed(&o2), observed(&o3));
    // Port-preserving: WAN:51820 towards both destinations.
    for m in [&seen2, &seen3] {
        assert_eq!(
            at(m, "n0"),
            SocketAddrV4::new(wan(&c, 0), MESH_PORT),
            "{m:?}"
        );
    }
    // Symmetric: the WAN address, another port per destination.
    let (a, b) = (at(&seen2, "n1"), at(&seen3, "n1"));
    assert_eq!((*a.ip(), *b.ip()), (wan(&c, 1), wan(&c, 1)));
    assert_ne!(
        a.port(),
        b.port(),
        "symmetric NAT gave one port to two destinations\n{}",
        mappings(&c, 1)
    );
    eprintln!(
        "port-preserving: {} and {}; symmetric: {a} and {b}",
        at(&seen2, "n0"),
        at(&seen3, "n0")
    );
    let m0 = mappings(&c, 0);
    assert!(
        m0.contains("sport=51820") && m0.contains(&format!("dst={}", p2.underlay_ip)),
        "{m0}"
    );

    // Replies to a mapping pass; the node sees the public node's real address.
    send(&o2, at(&seen2, "n0"), "reply0");
    send(&o2, a, "reply1");
    settle();
    let (g0, g1) = (queued(&s0), queued(&s1));
    assert_eq!(g0, vec![(obs_addr(p2), "reply0".to_string())]);
    assert_eq!(g1, vec![(obs_addr(p2), "reply1".to_string())]);

    // Unsolicited: a public socket with no mapping towards it, to WAN:51820 and to the symmetric
    // NAT's port that node 3 saw (from another source port than the mapped one).
    let u3 = sock(p3, 4000);
    send(
        &u3,
        SocketAddrV4::new(wan(&c, 0), MESH_PORT),
        "unsolicited0",
    );
    send(&u3, b, "unsolicited1");
    settle();
    let (g0, g1) = (queued(&s0), queued(&s1));
    assert!(g0.is_empty(), "unsolicited datagram reached node 0: {g0:?}");
    assert!(g1.is_empty(), "unsolicited datagram reached node 1: {g1:?}");

    let pk = cap.stop().expect("stop capture");
    let from_wan: Vec<_> = pk
        .ipv4()
        .filter(|(_, i)| i.src == wan(&c, 0) && i.src_port == Some(MESH_PORT))
        .map(|(_, i)| i.dst)
        .collect();
    assert!(
        from_wan.contains(&p2.underlay_ip) && from_wan.contains(&p3.underlay_ip),
        "router wan capture: {}",
        pk.dump(20)
    );
    assert!(
        pk.ipv4()
            .all(|(_, i)| i.src != n0.underlay_ip && i.dst != n0.underlay_ip),
        "private address on the WAN: {}",
        pk.dump(20)
    );
}

/// Each NAT'd node tells the observer, then both send to the other's observed address a few
/// times. Returns (a got b's datagrams, b got a's).
fn punch(
    a: (&UdpSocket, &str),
    b: (&UdpSocket, &str),
    obs: &UdpSocket,
    o: SocketAddrV4,
) -> (bool, bool) {
    send(a.0, o, a.1);
    send(b.0, o, b.1);
    settle();
    let seen = observed(obs);
    let (ea, eb) = (at(&seen, a.1), at(&seen, b.1));
    for k in 0..5 {
        send(a.0, eb, &format!("{}-{k}", a.1));
        send(b.0, ea, &format!("{}-{k}", b.1));
        std::thread::sleep(Duration::from_millis(50));
    }
    settle();
    let (ga, gb) = (queued(a.0), queued(b.0));
    eprintln!(
        "punch {} ({ea}) <-> {} ({eb}): {} got {:?}, {} got {:?}",
        a.1, b.1, a.1, ga, b.1, gb
    );
    (
        ga.iter().any(|(_, t)| t.starts_with(b.1)),
        gb.iter().any(|(_, t)| t.starts_with(a.1)),
    )
}

/// Hole punching works between two port-preserving sites, not with a symmetric one.
#[test]
fn hole_punching() {
    let c = cluster(
        5,
        vec![
            SiteSpec::nat("pp-a", PP, &[0]),
            SiteSpec::nat("pp-b", PP, &[1]),
            SiteSpec::nat("sym-a", SYM, &[2]),
            SiteSpec::nat("sym-b", SYM, &[3]),
        ],
    );
    let s: Vec<UdpSocket> = (0..4).map(|i| sock(c.node(i), MESH_PORT)).collect();
    let obs = sock(c.node(4), OBS_PORT);
    let o = obs_addr(c.node(4));
    let pp = punch((&s[0], "pp-a"), (&s[1], "pp-b"), &obs, o);
    assert_eq!(
        pp,
        (true, true),
        "port-preserving <-> port-preserving\n{}\n{}",
        mappings(&c, 0),
        mappings(&c, 1)
    );
    let mixed = punch((&s[0], "pp-a"), (&s[2], "sym-a"), &obs, o);
    assert_eq!(mixed, (false, false), "port-preserving <-> symmetric");
    let sym = punch((&s[2], "sym-a"), (&s[3], "sym-b"), &obs, o);
    assert_eq!(sym, (false, false), "symmetric <-> symmetric");
}

/// With `udp_timeout_secs = 3` an idle mapping is gone after 5 s, one refreshed every second
/// survives 6 s; the timeout is the router's own (the switch keeps the kernel's).
#[test]
fn udp_mapping_timeout() {
    let c = cluster(2, vec![SiteSpec::nat("pp", PP, &[0]).udp_timeout(3)]);
    let r = c.site_router_ns(0).expect("router").to_string();
    let sw = c.switch_ns.clone().expect("switch");
    for key in [
        "net.netfilter.nf_conntrack_udp_timeout",
        "net.netfilter.nf_conntrack_udp_timeout_stream",
    ] {
        let get = |ns: &str| {
            weft_tests::sh_in(ns, &format!("sysctl -n {key}"))
                .expect("sysctl")
                .trim()
                .to_string()
        };
        assert_eq!(get(&r), "3", "{key} in the router");
        assert_ne!(get(&sw), "3", "{key} leaked out of the router namespace");
    }
    let (n0, p1) = (c.node(0), c.node(1));
    let (idle, busy) = (sock(n0, MESH_PORT), sock(n0, MESH_PORT + 1));
    let obs = sock(p1, OBS_PORT);
    let t0 = Instant::now();
    send(&idle, obs_addr(p1), "idle");
    send(&busy, obs_addr(p1), "busy");
    settle();
    let seen = observed(&obs);
    let (ei, eb) = (at(&seen, "idle"), at(&seen, "busy"));
    // Control: replies pass while the mappings are fresh.
    send(&obs, ei, "r-idle");
    send(&obs, eb, "r-busy");
    let last_idle = Instant::now();
    settle();
    assert!(has(&queued(&idle), "r-idle"), "fresh reply to idle");
    assert!(has(&queued(&busy), "r-busy"), "fresh reply to busy");
    let mut k = 0;
    let mut replied_idle = false;
    while t0.elapsed() < Duration::from_secs(6) || !replied_idle {
        std::thread::sleep(Duration::from_millis(1000));
        k += 1;
        send(&busy, obs_addr(p1), &format!("keepalive-{k}"));
        if !replied_idle && last_idle.elapsed() >= Duration::from_secs(5) {
            let m = mappings(&c, 0);
            send(&obs, ei, "late-idle");
            settle();
            let g = queued(&idle);
            assert!(
                !has(&g, "late-idle"),
                "a mapping idle for {:?} still passed a reply\n{m}",
                last_idle.elapsed()
            );
            assert!(
                !m.contains("sport=51820 "),
                "idle mapping still listed:\n{m}"
            );
            replied_idle = true;
        }
    }
    assert!(replied_idle);
    let m = mappings(&c, 0);
    assert!(m.contains("sport=51821 "), "refreshed mapping gone:\n{m}");
    send(&obs, eb, "late-busy");
    settle();
    let g = queued(&busy);
    assert!(
        has(&g, "late-busy"),
        "refreshed mapping dropped a reply after {:?}: {g:?}\n{m}",
        t0.elapsed()
    );
}

/// `block_udp_between_sites` drops UDP between two sites only, ICMP passes, unblock restores.
#[test]
fn block_udp_between_sites() {
    let c = cluster(
        4,
        vec![
            SiteSpec::nat("pp-a", PP, &[0]),
            SiteSpec::nat("pp-b", PP, &[1]),
            SiteSpec::public("dc", &[2]),
        ],
    );
    let (n0, n1, p2, p3) = (c.node(0), c.node(1), c.node(2), c.node(3));
    let (s0, s1) = (sock(n0, MESH_PORT), sock(n1, MESH_PORT));
    let (o2, o3) = (sock(p2, OBS_PORT), sock(p3, OBS_PORT));
    let e0 = SocketAddrV4::new(wan(&c, 0), MESH_PORT);
    // Baseline: both ways through the mapping.
    send(&s0, obs_addr(p2), "before");
    settle();
    assert!(has(&queued(&o2), "before"));
    send(&o2, e0, "before-reply");
    settle();
    assert!(has(&queued(&s0), "before-reply"));

    c.block_udp_between_sites(0, 2).expect("block");
    send(&s0, obs_addr(p2), "blocked");
    send(&s0, obs_addr(p3), "other");
    send(&o2, e0, "blocked-reply");
    settle();
    assert!(queued(&o2).is_empty(), "UDP site 0 -> site 2 passed");
    assert!(queued(&s0).is_empty(), "UDP site 2 -> site 0 passed");
    assert!(
        has(&queued(&o3), "other"),
        "a node in no site was blocked too"
    );
    for (ns, dst) in [(&n0.ns, p2.underlay_ip), (&p2.ns, wan(&c, 0))] {
        let r = weft_tests::ping(
            ns,
            &dst.to_string(),
            &PingOpts::count(2).interval(0.1).wait(1),
        )
        .expect("ping");
        assert!(
            r.all_received(),
            "ICMP {ns} -> {dst} while UDP is blocked: {}",
            r.output
        );
    }
    // Another pair of sites is not affected: hole punching site 0 <-> site 1 works.
    let e1 = SocketAddrV4::new(wan(&c, 1), MESH_PORT);
    for k in 0..3 {
        send(&s0, e1, &format!("p0-{k}"));
        send(&s1, e0, &format!("p1-{k}"));
        std::thread::sleep(Duration::from_millis(50));
    }
    settle();
    assert!(
        has(&queued(&s1), "p0-2"),
        "site 0 -> site 1 while 0/2 blocked"
    );
    assert!(
        has(&queued(&s0), "p1-2"),
        "site 1 -> site 0 while 0/2 blocked"
    );

    c.unblock_udp_between_sites(2, 0).expect("unblock");
    send(&s0, obs_addr(p2), "after");
    send(&o2, e0, "after-reply");
    settle();
    assert!(
        has(&queued(&o2), "after"),
        "UDP site 0 -> site 2 after unblock"
    );
    assert!(
        has(&queued(&s0), "after-reply"),
        "UDP site 2 -> site 0 after unblock"
    );
    assert!(c.block_udp_between_sites(1, 1).is_err());
    assert!(c.block_udp_between_sites(0, 9).is_err());
}

/// Nodes of one NAT site talk directly on the LAN; the API reports the topology; the router
/// namespaces go with the cluster and with the leftover sweep.
#[test]
fn same_site_lan_api_and_teardown() {
    // A leftover router namespace of a crashed run is swept by the next cluster.
    let fake = format!("wt-{}-9999-r0", std::process::id());
    weft_tests::cluster::cmd(std::process::Command::new("ip").args(["netns", "add", &fake]))
        .expect("fake leftover");
    let c = cluster(
        4,
        vec![
            SiteSpec::nat("home", PP, &[0, 1]),
            SiteSpec::public("dc", &[2]),
        ],
    );
    assert!(
        !harness_namespaces().contains(&fake),
        "leftover router ns not removed"
    );
    let prefix = c.prefix.clone();
    assert_eq!(
        (c.site_of(0), c.site_of(1), c.site_of(2), c.site_of(3)),
        (Some(0), Some(0), Some(1), None)
    );
    assert_eq!(c.site_router_ns(0), Some(format!("{prefix}-r0").as_str()));
    assert_eq!(c.site_router_ns(1), None);
    assert_eq!(c.site_public_ip(0), Some(Ipv4Addr::new(198, 18, 0, 200)));
    assert_eq!(c.site_public_ip(1), None);
    assert_eq!(
        (c.site_name(0), c.site_name(1), c.site_name(2)),
        (Some("home"), Some("dc"), None)
    );
    assert_eq!(c.node(0).underlay_ip, Ipv4Addr::new(192, 168, 1, 10));
    assert_eq!(c.node(1).underlay_ip, Ipv4Addr::new(192, 168, 1, 11));
    assert_eq!(c.node(2).underlay_ip, Ipv4Addr::new(198, 18, 0, 12));
    assert_eq!(c.node(3).underlay_ip, Ipv4Addr::new(198, 18, 0, 13));
    assert!(c
        .node(0)
        .meshd_default_args()
        .contains(&("--endpoint".into(), "192.168.1.10:51820".into())));
    assert!(c.nat_mappings(1).is_err(), "a public site has no router");

    let (n0, n1, p2) = (c.node(0), c.node(1), c.node(2));
    let (s0, s1) = (sock(n0, MESH_PORT), sock(n1, MESH_PORT));
    send(&s0, SocketAddrV4::new(n1.underlay_ip, MESH_PORT), "lan");
    settle();
    let g = queued(&s1);
    assert_eq!(
        g,
        vec![(
            SocketAddrV4::new(n0.underlay_ip, MESH_PORT),
            "lan".to_string()
        )],
        "LAN peer saw a translated source"
    );
    // Two nodes of the site, the same source port, the same destination: the first keeps the
    // port, the second gets another (a real property of Linux NAT the mesh tests must expect).
    let o2 = sock(p2, OBS_PORT);
    send(&s0, obs_addr(p2), "first");
    settle();
    let a = observed(&o2);
    send(&s1, obs_addr(p2), "second");
    settle();
    let b = observed(&o2);
    let (first, second) = (at(&a, "first"), at(&b, "second"));
    assert_eq!(first, SocketAddrV4::new(wan(&c, 0), MESH_PORT));
    assert_eq!(*second.ip(), wan(&c, 0));
    assert_ne!(second.port(), MESH_PORT, "{}", mappings(&c, 0));

    drop((s0, s1, o2));
    drop(c);
    let left: Vec<String> = harness_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}
