//! NetworkPolicy enforcement against the real kernel: `weft_sys::nft::policy` writes hand-built
//! `Program`s into a node namespace that forwards between pod namespaces (veth pairs, /32
//! routes, proxy ARP, as the CNI plugin sets them up), and real TCP/UDP traffic shows the
//! kernel decides as `Program::evaluate` does. Conntrack listing/deletion too. Needs root; run
//! serially:
//!   cargo test -p weft-tests --test nft_policy -- --test-threads=1
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_core::netpol::program::{
    AddrSet, Chain, Counter, Decision, Family, Match, Packet, Program, Proto, Rule, Verdict,
    GUARD4, GUARD6,
};
use weft_sys::netns::run_in;
use weft_sys::nft::conntrack::{conntrack_delete, conntrack_flows};
use weft_sys::nft::policy::{
    apply_policy, apply_policy_with, policy_batch, policy_installed, policy_listing, read_counters,
    remove_policy,
};

const PROBE: Duration = Duration::from_millis(300);

fn sh(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sysctl(ns: &str, key: &str, val: &str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    run_in(ns, || std::fs::write(&path, val))
        .expect("netns")
        .unwrap_or_else(|e| panic!("{path}: {e}"));
}

/// A node namespace and pods behind veth pairs. Deleted on drop (also on panic).
struct Topo {
    node: String,
    pods: Vec<Pod>,
    all: Vec<String>,
}

#[derive(Clone)]
struct Pod {
    ns: String,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
}

impl Drop for Topo {
    fn drop(&mut self) {
        for ns in self.all.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Topo {
    /// A node with `n` pods: pod k is 10.77.0.(10+k) and fd77::(10+k).
    fn new(n: u8) -> Topo {
        assert!(
            // SAFETY: a plain syscall without arguments.
            unsafe { libc::geteuid() } == 0,
            "nft_policy tests need root"
        );
        let tag = format!(
            "wnft-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let node = format!("{tag}-node");
        let mut t = Topo {
            node: node.clone(),
            pods: Vec::new(),
            all: Vec::new(),
        };
        sh(&["netns", "add", &node]);
        t.all.push(node.clone());
        sh(&["-n", &node, "link", "set", "lo", "up"]);
        // Proxy ARP answers for addresses routed out of another interface: a default route.
        // (A veth pair: there may be no dummy module.)
        sh(&[
            "-n", &node, "link", "add", "up0", "type", "veth", "peer", "name", "up1",
        ]);
        sh(&["-n", &node, "link", "set", "up0", "up"]);
        sh(&["-n", &node, "link", "set", "up1", "up"]);
        sh(&["-n", &node, "route", "add", "default", "dev", "up0"]);
        sysctl(&node, "net.ipv4.ip_forward", "1");
        sysctl(&node, "net.ipv6.conf.all.forwarding", "1");
        sysctl(&node, "net.ipv4.conf.all.rp_filter", "0");
        for k in 0..n {
            let ns = format!("{tag}-p{k}");
            let v4 = Ipv4Addr::new(10, 77, 0, 10 + k);
            let v6: Ipv6Addr = format!("fd77::{:x}", 10 + k).parse().unwrap();
            let host = format!("vp{k}");
            sh(&["netns", "add", &ns]);
            t.all.push(ns.clone());
            sh(&[
                "-n", &node, "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            sh(&["-n", &ns, "link", "set", "lo", "up"]);
            sh(&["-n", &ns, "link", "set", "eth0", "up"]);
            sh(&["-n", &ns, "addr", "add", &format!("{v4}/32"), "dev", "eth0"]);
            sh(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{v6}/128"),
                "dev",
                "eth0",
                "nodad",
            ]);
            sh(&[
                "-n",
                &ns,
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ]);
            sh(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ]);
            sh(&[
                "-n", &ns, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
            ]);
            sh(&["-n", &node, "link", "set", &host, "up"]);
            sh(&[
                "-n",
                &node,
                "addr",
                "add",
                "fe80::1/64",
                "dev",
                &host,
                "nodad",
            ]);
            sysctl(&node, &format!("net.ipv4.conf.{host}.proxy_arp"), "1");
            sysctl(&node, &format!("net.ipv4.neigh.{host}.proxy_delay"), "0");
            sysctl(&node, &format!("net.ipv4.conf.{host}.rp_filter"), "0");
            sh(&[
                "-n",
                &node,
                "route",
                "add",
                &format!("{v4}/32"),
                "dev",
                &host,
            ]);
            sh(&[
                "-n",
                &node,
                "-6",
                "route",
                "add",
                &format!("{v6}/128"),
                "dev",
                &host,
            ]);
            t.pods.push(Pod { ns, v4, v6 });
        }
        t
    }

    fn apply(&self, p: &Program) {
        run_in(&self.node, || apply_policy(p))
            .expect("netns")
            .unwrap_or_else(|e| panic!("apply_policy: {e}"));
    }

    fn pod(&self, k: usize) -> &Pod {
        &self.pods[k]
    }
}

/// A TCP listener on `port` in `pod` (all addresses), accepting in the background.
fn listen_tcp(pod: &Pod, port: u16) -> TcpListener {
    run_in(&pod.ns, || TcpListener::bind(("::", port)))
        .expect("netns")
        .expect("bind tcp")
}

fn udp_socket(pod: &Pod, port: u16) -> UdpSocket {
    let s = run_in(&pod.ns, || UdpSocket::bind(("::", port)))
        .expect("netns")
        .expect("bind udp");
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    s
}

/// Whether a TCP connection from `from` to `to:port` is set up (refused counts as reachable:
/// the RST came back through the node).
fn tcp_reaches(from: &Pod, to: IpAddr, port: u16) -> bool {
    let r = run_in(&from.ns, || {
        TcpStream::connect_timeout(&SocketAddr::new(to, port), PROBE)
    })
    .expect("netns");
    match r {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => true,
        Err(_) => false,
    }
}

fn drain(s: &UdpSocket) -> usize {
    let mut n = 0;
    let mut buf = [0u8; 2048];
    while s.recv_from(&mut buf).is_ok() {
        n += 1;
    }
    n
}

/// Whether a UDP datagram from `from` reaches `rx` (bound in the pod at `to`, port `port`).
fn udp_reaches(from: &Pod, rx: &UdpSocket, to: IpAddr, port: u16) -> bool {
    drain(rx);
    let tx = udp_socket(from, 0);
    tx.send_to(b"probe", SocketAddr::new(to, port)).unwrap();
    let deadline = Instant::now() + PROBE;
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        if rx.recv_from(&mut buf).is_ok() {
            return true;
        }
    }
    false
}

fn range(lo: &str, hi: &str) -> (IpAddr, IpAddr) {
    (lo.parse().unwrap(), hi.parse().unwrap())
}

fn set(name: &str, family: Family, ranges: Vec<(IpAddr, IpAddr)>) -> AddrSet {
    AddrSet {
        name: name.into(),
        family,
        ranges,
    }
}

fn one(ip: IpAddr) -> (IpAddr, IpAddr) {
    (ip, ip)
}

fn rule(matches: Vec<Match>, verdict: Verdict) -> Rule {
    Rule {
        matches,
        counter: None,
        verdict,
    }
}

fn guards(v4: Vec<(IpAddr, IpAddr)>) -> Vec<AddrSet> {
    vec![
        set(GUARD4, Family::V4, v4),
        set(GUARD6, Family::V6, Vec::new()),
    ]
}

/// `Program::evaluate` for a new connection.
fn model(p: &Program, src: IpAddr, dst: IpAddr, proto: Proto, dport: u16) -> bool {
    p.evaluate(&Packet {
        src,
        dst,
        proto: Some(proto),
        dport,
    }) == Decision::Accept
}

/// Probes TCP and checks kernel and model agree; returns the kernel's answer.
fn tcp_check(p: &Program, from: &Pod, to: IpAddr, port: u16) -> bool {
    let src = if to.is_ipv4() {
        IpAddr::V4(from.v4)
    } else {
        IpAddr::V6(from.v6)
    };
    let k = tcp_reaches(from, to, port);
    assert_eq!(
        k,
        model(p, src, to, Proto::Tcp, port),
        "kernel and Program::evaluate disagree on tcp {src} -> {to}:{port}"
    );
    k
}

fn udp_check(p: &Program, from: &Pod, rx: &UdpSocket, to: IpAddr, port: u16) -> bool {
    let src = if to.is_ipv4() {
        IpAddr::V4(from.v4)
    } else {
        IpAddr::V6(from.v6)
    };
    let k = udp_reaches(from, rx, to, port);
    assert_eq!(
        k,
        model(p, src, to, Proto::Udp, port),
        "kernel and Program::evaluate disagree on udp {src} -> {to}:{port}"
    );
    k
}

fn v4(p: &Pod) -> IpAddr {
    IpAddr::V4(p.v4)
}

fn v6(p: &Pod) -> IpAddr {
    IpAddr::V6(p.v6)
}

/// Pod 2 isolated for ingress: only pod 0 (v4 and v6), only TCP 80 (and UDP 53).
fn ingress_program(t: &Topo) -> Program {
    let (a, c) = (t.pod(0), t.pod(2));
    Program {
        sets: {
            let mut s = guards(Vec::new());
            s.push(set("src-a4", Family::V4, vec![one(v4(a))]));
            s.push(set("src-a6", Family::V6, vec![one(v6(a))]));
            s
        },
        egress: Vec::new(),
        ingress: vec![(v4(c), "in/c".into()), (v6(c), "in/c".into())],
        chains: vec![
            Chain {
                name: "in/c".into(),
                rules: vec![
                    rule(
                        vec![Match::Saddr("src-a4".into())],
                        Verdict::Jump("ports/c".into()),
                    ),
                    rule(
                        vec![Match::Saddr("src-a6".into())],
                        Verdict::Jump("ports/c".into()),
                    ),
                    Rule {
                        matches: Vec::new(),
                        counter: Some(Counter::default()),
                        verdict: Verdict::Drop,
                    },
                ],
            },
            Chain {
                name: "ports/c".into(),
                rules: vec![
                    rule(
                        vec![Match::Proto(Proto::Tcp), Match::Dport { lo: 80, hi: 80 }],
                        Verdict::Accept,
                    ),
                    rule(
                        vec![Match::Proto(Proto::Udp), Match::Dport { lo: 50, hi: 60 }],
                        Verdict::Accept,
                    ),
                ],
            },
        ],
        guard_counter: Counter::default(),
    }
}

#[test]
fn a_ingress_isolation_tcp_v4_v6() {
    let t = Topo::new(3);
    let (a, b, c) = (t.pod(0), t.pod(1), t.pod(2));
    let _l80 = listen_tcp(c, 80);
    let _l81 = listen_tcp(c, 81);
    let empty = Program {
        sets: guards(Vec::new()),
        ..Default::default()
    };
    // No table: everything passes (v4 and v6).
    assert!(!run_in(&t.node, policy_installed).unwrap().unwrap());
    assert!(tcp_check(&empty, a, v4(c), 81));
    assert!(tcp_check(&empty, b, v6(c), 80));
    let p = ingress_program(&t);
    t.apply(&p);
    assert!(run_in(&t.node, policy_installed).unwrap().unwrap());
    if let Ok(o) = Command::new("ip")
        .args(["netns", "exec", &t.node, "nft", "list", "ruleset"])
        .output()
    {
        eprintln!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert!(tcp_check(&p, a, v4(c), 80));
    assert!(!tcp_check(&p, a, v4(c), 81));
    assert!(!tcp_check(&p, b, v4(c), 80));
    assert!(tcp_check(&p, a, v6(c), 80));
    assert!(!tcp_check(&p, a, v6(c), 81));
    assert!(!tcp_check(&p, b, v6(c), 80));
    // c itself is not isolated for egress, and a/b not for ingress.
    assert!(tcp_check(&p, c, v4(a), 81));
    assert!(tcp_check(&p, b, v4(a), 81));
    // Removing the table lets everything through again; removing twice is fine.
    run_in(&t.node, remove_policy).unwrap().unwrap();
    run_in(&t.node, remove_policy).unwrap().unwrap();
    assert!(!run_in(&t.node, policy_installed).unwrap().unwrap());
    assert_eq!(
        run_in(&t.node, read_counters).unwrap().unwrap(),
        Default::default()
    );
    assert!(tcp_check(&empty, b, v4(c), 80));
}

#[test]
fn b_egress_isolation_and_c_udp() {
    let t = Topo::new(3);
    let (a, b, c) = (t.pod(0), t.pod(1), t.pod(2));
    let _l = listen_tcp(b, 443);
    let _l2 = listen_tcp(c, 443);
    let rx_b = udp_socket(b, 5353);
    let rx_c = udp_socket(c, 5353);
    let rx_c2 = udp_socket(c, 5354);
    // a may only talk to b (TCP 443, UDP 5353-5353) and to c over UDP 5353..5360.
    let p = Program {
        sets: {
            let mut s = guards(Vec::new());
            s.push(set("b4", Family::V4, vec![one(v4(b))]));
            s.push(set("c4", Family::V4, vec![one(v4(c))]));
            s
        },
        egress: vec![(v4(a), "eg/a".into())],
        ingress: Vec::new(),
        chains: vec![Chain {
            name: "eg/a".into(),
            rules: vec![
                rule(
                    vec![
                        Match::Daddr("b4".into()),
                        Match::Proto(Proto::Tcp),
                        Match::Dport { lo: 443, hi: 443 },
                    ],
                    Verdict::Accept,
                ),
                rule(
                    vec![
                        Match::Daddr("b4".into()),
                        Match::Proto(Proto::Udp),
                        Match::Dport { lo: 5353, hi: 5353 },
                    ],
                    Verdict::Accept,
                ),
                rule(
                    vec![
                        Match::Daddr("c4".into()),
                        Match::Proto(Proto::Udp),
                        Match::Dport { lo: 5350, hi: 5353 },
                    ],
                    Verdict::Accept,
                ),
                rule(Vec::new(), Verdict::Drop),
            ],
        }],
        guard_counter: Counter::default(),
    };
    t.apply(&p);
    assert!(tcp_check(&p, a, v4(b), 443));
    assert!(!tcp_check(&p, a, v4(c), 443));
    // Only v4 of a is isolated here: v6 passes.
    assert!(tcp_check(&p, a, v6(c), 443));
    assert!(tcp_check(&p, b, v4(c), 443));
    // UDP.
    assert!(udp_check(&p, a, &rx_b, v4(b), 5353));
    assert!(udp_check(&p, a, &rx_c, v4(c), 5353));
    assert!(!udp_check(&p, a, &rx_c2, v4(c), 5354));
    assert!(udp_check(&p, b, &rx_c2, v4(c), 5354));
}

#[test]
fn d_guard_and_e_counters() {
    let t = Topo::new(4);
    let (a, c, d) = (t.pod(0), t.pod(2), t.pod(3));
    let _l = listen_tcp(c, 80);
    let _l2 = listen_tcp(d, 80);
    let _l3 = listen_tcp(a, 80);
    let mut p = ingress_program(&t);
    // d's address is in the guard: no placed pod there as far as the node knows.
    p.sets[0].ranges = vec![one(v4(d))];
    p.guard_counter = Counter {
        packets: 7000,
        bytes: 700_000,
    };
    // A counter with a start value on the accepting rule.
    p.chains[1].rules[0].counter = Some(Counter {
        packets: 1000,
        bytes: 100_000,
    });
    t.apply(&p);
    let c0 = run_in(&t.node, read_counters).unwrap().unwrap();
    assert_eq!(
        c0.guard,
        Counter {
            packets: 7000,
            bytes: 700_000
        }
    );
    assert!(!tcp_check(&p, a, v4(d), 80));
    assert!(!tcp_check(&p, d, v4(a), 80));
    assert!(tcp_check(&p, a, v4(c), 80));
    assert!(!tcp_check(&p, t.pod(1), v4(c), 80));
    let c1 = run_in(&t.node, read_counters).unwrap().unwrap();
    eprintln!("counters after probes: {c1:?}");
    assert!(c1.guard.packets >= 7002, "{c1:?}");
    assert!(c1.guard.bytes > 700_000);
    let ports = &c1.chains["ports/c"];
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].0, 0);
    // One SYN accepted (later packets are ct established).
    assert_eq!(ports[0].1.packets, 1001, "{c1:?}");
    let dropped = &c1.chains["in/c"];
    assert_eq!(dropped[0].0, 2);
    assert!(dropped[0].1.packets >= 1, "pod 1's SYNs: {c1:?}");
    // Replace with the counts carried over: they survive.
    p.guard_counter = c1.guard;
    p.chains[1].rules[0].counter = Some(ports[0].1);
    p.chains[0].rules[2].counter = Some(dropped[0].1);
    t.apply(&p);
    let c2 = run_in(&t.node, read_counters).unwrap().unwrap();
    assert_eq!(c2, c1);
    assert!(tcp_check(&p, a, v4(c), 80));
    let c3 = run_in(&t.node, read_counters).unwrap().unwrap();
    assert_eq!(c3.chains["ports/c"][0].1.packets, 1002);
}

#[test]
fn f_atomic_replace_under_traffic() {
    let t = Topo::new(3);
    let (a, b, c) = (t.pod(0), t.pod(1), t.pod(2));
    let denied = udp_socket(c, 7000);
    let allowed = udp_socket(c, 7001);
    // Two programs: both deny a -> c:7000 and allow a -> c:7001, with different shapes.
    let base = |extra: usize| {
        let mut chains = vec![Chain {
            name: "in/c".into(),
            rules: vec![
                rule(
                    vec![
                        Match::Proto(Proto::Udp),
                        Match::Dport { lo: 7001, hi: 7001 },
                    ],
                    Verdict::Accept,
                ),
                rule(Vec::new(), Verdict::Jump("tail".into())),
            ],
        }];
        chains.push(Chain {
            name: "tail".into(),
            rules: (0..extra)
                .map(|i| {
                    rule(
                        vec![
                            Match::Proto(Proto::Tcp),
                            Match::Dport {
                                lo: 10000 + i as u16,
                                hi: 10000 + i as u16,
                            },
                        ],
                        Verdict::Accept,
                    )
                })
                .chain(std::iter::once(rule(Vec::new(), Verdict::Drop)))
                .collect(),
        });
        let mut sets = guards(Vec::new());
        sets.push(set(
            "other",
            Family::V4,
            vec![range("10.0.0.0", &format!("10.0.{extra}.255"))],
        ));
        Program {
            sets,
            egress: Vec::new(),
            ingress: vec![(v4(c), "in/c".into()), (v4(b), "tail".into())],
            chains,
            guard_counter: Counter::default(),
        }
    };
    let (p1, p2) = (base(3), base(50));
    t.apply(&p1);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let tx = udp_socket(a, 0);
    let dst_c = v4(c);
    let sender = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for port in [7000, 7001] {
                    let _ = tx.send_to(b"spray", SocketAddr::new(dst_c, port));
                }
                sent.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(50));
            }
        })
    };
    let stop_rx = Arc::new(AtomicBool::new(false));
    let counter = |s: UdpSocket, stop: Arc<AtomicBool>| {
        std::thread::spawn(move || {
            let mut n = 0u64;
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if s.recv_from(&mut buf).is_ok() {
                    n += 1;
                }
            }
            n
        })
    };
    let rd = counter(denied, stop_rx.clone());
    let ra = counter(allowed, stop_rx.clone());
    let start = Instant::now();
    // 600 replaces: with the table deleted and written again in each batch, about one run in
    // seven of 200 let a denied packet through; this many make such a leak likely to show.
    const REPLACES: u64 = 600;
    for i in 0..REPLACES {
        t.apply(if i % 2 == 0 { &p2 } else { &p1 });
    }
    let flips = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    stop_rx.store(true, Ordering::Relaxed);
    let (nd, na) = (rd.join().unwrap(), ra.join().unwrap());
    eprintln!(
        "{REPLACES} replaces in {flips:?}; {} bursts sent; allowed received {na}, denied received {nd}",
        sent.load(Ordering::Relaxed)
    );
    assert!(na > 100, "allowed traffic must flow during the flips");
    assert_eq!(nd, 0, "a denied packet got through during a replace");
    // REPLACES + 1 writes: that generation is in force, the one before it is kept (for
    // packets that were still in the old base chain rules), nothing older is left.
    let listed = run_in(&t.node, policy_listing).unwrap().unwrap();
    assert_eq!(listed.current(), Some(REPLACES + 1));
    let gens: std::collections::BTreeSet<&str> = listed
        .chains
        .iter()
        .chain(&listed.sets)
        .map(|n| n.rsplit_once(".g").map_or("", |(_, g)| g))
        .collect();
    let want = [REPLACES.to_string(), (REPLACES + 1).to_string()];
    assert_eq!(
        gens,
        want.iter().map(String::as_str).collect(),
        "{listed:?}"
    );
    assert_eq!(listed.base, [true, true]);
    assert!(!model(&p1, v4(a), v4(c), Proto::Udp, 7000));
    assert!(model(&p2, v4(a), v4(c), Proto::Udp, 7001));
}

#[test]
fn g_interval_sets_with_holes() {
    let t = Topo::new(4);
    let (a, b, c, d) = (t.pod(0), t.pod(1), t.pod(2), t.pod(3));
    let _l = listen_tcp(c, 80);
    let _l6 = listen_tcp(a, 80);
    // ipBlock 0.0.0.0/0 except 10.77.0.11/32 (pod b) and except 10.77.0.13 (pod d):
    // the first range starts at 0, the last ends at the family's last address.
    let all_but = set(
        "v4-holes",
        Family::V4,
        vec![
            range("0.0.0.0", "10.77.0.10"),
            range("10.77.0.12", "10.77.0.12"),
            range("10.77.0.14", "255.255.255.255"),
        ],
    );
    // v6: fd77::/112 except fd77::b, and a range ending at the last address.
    let v6set = set(
        "v6-holes",
        Family::V6,
        vec![
            range("fd77::", "fd77::a"),
            range("fd77::c", "fd77::ffff"),
            range("fe00::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
        ],
    );
    let mut sets = guards(Vec::new());
    sets.push(all_but);
    sets.push(v6set);
    let p = Program {
        sets,
        egress: Vec::new(),
        ingress: vec![(v4(c), "in/c".into()), (v6(a), "in/a6".into())],
        chains: vec![
            Chain {
                name: "in/c".into(),
                rules: vec![
                    rule(vec![Match::Saddr("v4-holes".into())], Verdict::Accept),
                    rule(Vec::new(), Verdict::Drop),
                ],
            },
            Chain {
                name: "in/a6".into(),
                rules: vec![
                    rule(vec![Match::Saddr("v6-holes".into())], Verdict::Accept),
                    rule(Vec::new(), Verdict::Drop),
                ],
            },
        ],
        guard_counter: Counter::default(),
    };
    t.apply(&p);
    assert!(tcp_check(&p, a, v4(c), 80));
    assert!(!tcp_check(&p, b, v4(c), 80));
    assert!(!tcp_check(&p, d, v4(c), 80));
    assert!(tcp_check(&p, c, v6(a), 80));
    assert!(!tcp_check(&p, b, v6(a), 80));
    assert!(tcp_check(&p, d, v6(a), 80));
}

#[test]
fn h_conntrack_established_then_deleted() {
    let t = Topo::new(3);
    let (a, c) = (t.pod(0), t.pod(2));
    let l = listen_tcp(c, 80);
    let allow = Program {
        sets: guards(Vec::new()),
        ..Default::default()
    };
    let deny = Program {
        sets: guards(Vec::new()),
        egress: Vec::new(),
        ingress: vec![(v4(c), "deny".into())],
        chains: vec![Chain {
            name: "deny".into(),
            rules: vec![rule(Vec::new(), Verdict::Drop)],
        }],
        guard_counter: Counter::default(),
    };
    t.apply(&allow);
    let mut client = run_in(&a.ns, || {
        TcpStream::connect_timeout(&SocketAddr::new(v4(c), 80), Duration::from_secs(2))
    })
    .unwrap()
    .unwrap();
    let (mut server, _) = l.accept().unwrap();
    // An IPv6 connection too, to see both families in the dump.
    let client6 = run_in(&t.pod(1).ns, || {
        TcpStream::connect_timeout(&SocketAddr::new(v6(c), 80), Duration::from_secs(2))
    })
    .unwrap()
    .unwrap();
    let local6 = client6.local_addr().unwrap();
    server
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut buf = [0u8; 16];
    client.write_all(b"one").unwrap();
    assert_eq!(server.read(&mut buf).unwrap(), 3);
    t.apply(&deny);
    // A new connection is refused, the established one carries on.
    assert!(!tcp_check(&deny, a, v4(c), 80));
    client.write_all(b"two").unwrap();
    assert_eq!(server.read(&mut buf).unwrap(), 3, "ct established accepts");
    // Find the flow and delete its entry.
    let flows = run_in(&t.node, conntrack_flows).unwrap().unwrap();
    let ours: Vec<_> = flows
        .iter()
        .copied()
        .filter(|f| f.src == v4(a) && f.dst == v4(c) && f.proto == 6 && f.dport == 80)
        .collect();
    let local = client.local_addr().unwrap();
    assert!(
        ours.iter().any(|f| f.sport == local.port()),
        "flow of {local} not in {flows:?}"
    );
    assert!(
        flows.iter().any(|f| f.src == v6(t.pod(1))
            && f.dst == v6(c)
            && f.proto == 6
            && f.sport == local6.port()
            && f.dport == 80),
        "flow of {local6} not in {flows:?}"
    );
    let n = run_in(&t.node, || conntrack_delete(&ours))
        .unwrap()
        .unwrap();
    assert!(n >= 1, "deleted {n}");
    // Deleting again: already gone, no error.
    assert_eq!(
        run_in(&t.node, || conntrack_delete(&ours))
            .unwrap()
            .unwrap(),
        0
    );
    client.write_all(b"three").unwrap();
    match server.read(&mut buf) {
        Ok(n) => panic!("{n} bytes got through after the entry was deleted"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        ),
    }
    assert!(!model(&deny, v4(a), v4(c), Proto::Tcp, 80));
    // ICMP entries list with ports 0 and can be deleted too.
    let ok = Command::new("ip")
        .args(["netns", "exec", &a.ns, "ping", "-c1", "-W1"])
        .arg(t.pod(1).v4.to_string())
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    eprintln!("ping a -> b: {ok}");
    if ok {
        let flows = run_in(&t.node, conntrack_flows).unwrap().unwrap();
        let icmp: Vec<_> = flows.iter().copied().filter(|f| f.proto == 1).collect();
        assert!(!icmp.is_empty(), "{flows:?}");
        assert!(icmp.iter().all(|f| f.sport == 0 && f.dport == 0));
        assert_eq!(
            run_in(&t.node, || conntrack_delete(&icmp))
                .unwrap()
                .unwrap(),
            icmp.len()
        );
    }
}

#[test]
fn i_refusals_are_named_and_atomic() {
    let t = Topo::new(3);
    let (a, c) = (t.pod(0), t.pod(2));
    let _l = listen_tcp(c, 80);
    let p = ingress_program(&t);
    t.apply(&p);
    // Jumps nested as deep as the kernel allows (a map's chain is one jump from the base
    // chain, the kernel's limit is 16 levels) apply; one more is refused, and a refused
    // program leaves the old one in place.
    let deep = |n: usize| {
        let mut deep = p.clone();
        for i in 0..n {
            deep.chains.push(Chain {
                name: format!("d{i}"),
                rules: vec![rule(Vec::new(), Verdict::Jump(format!("d{}", i + 1)))],
            });
        }
        deep.chains.push(Chain {
            name: format!("d{n}"),
            rules: Vec::new(),
        });
        deep.ingress.push((v4(a), "d0".into()));
        deep
    };
    t.apply(&deep(14));
    let e = run_in(&t.node, || apply_policy(&deep(15)))
        .unwrap()
        .unwrap_err();
    eprintln!("deep: {e}");
    t.apply(&p);
    let e = run_in(&t.node, || apply_policy(&deep(15)))
        .unwrap()
        .unwrap_err();
    eprintln!("deep: {e}");
    assert!(tcp_check(&p, a, v4(c), 80));
    assert!(!tcp_check(&p, t.pod(1), v4(c), 80));
    // A name the kernel would refuse.
    let mut long = p.clone();
    long.chains[0].name = "x".repeat(256);
    assert!(policy_batch(&long).is_err());
}

#[test]
fn j_big_program_applies_fast() {
    let t = Topo::new(1);
    let mut sets = guards(Vec::new());
    // 10,000 elements: 100 sets of 50 ranges (two elements each).
    for s in 0..100u32 {
        let ranges = (0..50u32)
            .map(|r| {
                let base = (10u32 << 24) | (s << 16) | (r << 8);
                (
                    IpAddr::V4(Ipv4Addr::from(base)),
                    IpAddr::V4(Ipv4Addr::from(base | 0x7f)),
                )
            })
            .collect();
        sets.push(set(&format!("set-{s}"), Family::V4, ranges));
    }
    let mut chains = Vec::new();
    for c in 0..1000u32 {
        chains.push(Chain {
            name: format!("namespace-{c}/policy-{c}/ingress"),
            rules: (0..5u32)
                .map(|r| Rule {
                    matches: vec![
                        Match::Saddr(format!("set-{}", (c + r) % 100)),
                        Match::Proto(Proto::Tcp),
                        Match::Dport {
                            lo: 1000 + r as u16,
                            hi: 2000 + r as u16,
                        },
                    ],
                    counter: Some(Counter {
                        packets: r as u64,
                        bytes: 0,
                    }),
                    verdict: Verdict::Accept,
                })
                .collect(),
        });
    }
    let ingress = (0..1000u32)
        .map(|i| {
            (
                IpAddr::V4(Ipv4Addr::from((10u32 << 24) | (200 << 16) | i)),
                format!("namespace-{i}/policy-{i}/ingress"),
            )
        })
        .collect();
    let p = Program {
        sets,
        egress: Vec::new(),
        ingress,
        chains,
        guard_counter: Counter::default(),
    };
    let build = Instant::now();
    let batch = policy_batch(&p).unwrap();
    let built = build.elapsed();
    let mut times = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        t.apply(&p);
        times.push(start.elapsed());
    }
    let rd = Instant::now();
    let counters = run_in(&t.node, read_counters).unwrap().unwrap();
    let read = rd.elapsed();
    eprintln!(
        "big program: batch {} bytes built in {built:?}; applies took {times:?}; read_counters {read:?}",
        batch.len()
    );
    assert_eq!(counters.chains.len(), 1000);
    assert_eq!(
        counters.chains["namespace-7/policy-7/ingress"][3].1.packets,
        3
    );
    assert!(
        times.iter().all(|d| *d < Duration::from_secs(1)),
        "{times:?}"
    );
}

#[test]
fn k_older_layout_replaced_and_a_stale_batch_refused() {
    let t = Topo::new(3);
    let (a, b, c) = (t.pod(0), t.pod(1), t.pod(2));
    let _l80 = listen_tcp(c, 80);
    // The layout of an older weft (unversioned names, written by `nft`): pod c drops all.
    let old = format!(
        "table inet weft-policy {{\n\
         chain in/c {{ counter drop; }}\n\
         map ingress4 {{ type ipv4_addr : verdict; elements = {{ {} : jump in/c }}; }}\n\
         set guard4 {{ type ipv4_addr; flags interval; }}\n\
         chain egress {{ type filter hook forward priority -2; policy accept; ip saddr @guard4 drop; }}\n\
         chain ingress {{ type filter hook forward priority -1; policy accept; ip daddr vmap @ingress4; }}\n\
         }}\n",
        c.v4
    );
    let f = std::env::temp_dir().join(format!("{}-old.nft", t.node));
    std::fs::write(&f, old).unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &t.node, "nft", "-f"])
        .arg(&f)
        .output()
        .expect("nft");
    let _ = std::fs::remove_file(&f);
    assert!(
        out.status.success(),
        "nft -f: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!tcp_reaches(a, v4(c), 80), "the old layout drops");
    let p = ingress_program(&t);
    t.apply(&p);
    let listed = run_in(&t.node, policy_listing).unwrap().unwrap();
    assert_eq!(listed.current(), Some(1));
    let mut names: Vec<&str> = listed
        .chains
        .iter()
        .chain(&listed.sets)
        .map(|s| s.as_str())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "egress4.g1",
            "egress6.g1",
            "guard4.g1",
            "guard6.g1",
            "in/c.g1",
            "ingress4.g1",
            "ingress6.g1",
            "ports/c.g1",
            "src-a4.g1",
            "src-a6.g1"
        ],
        "nothing of the older layout is left"
    );
    assert!(tcp_check(&p, a, v4(c), 80));
    assert!(!tcp_check(&p, b, v4(c), 80));
    // Another writer (of another table, as kube-proxy or a CNI plugin) commits between the
    // listing and the batch: the kernel refuses the stale batch (ERESTART: the ruleset
    // generation id it carries is gone) and it is listed, built and sent again.
    let pods: Vec<ipnet::IpNet> = vec!["10.77.0.0/24".parse().unwrap()];
    let other = |attempt: u32| {
        if attempt <= 2 {
            weft_sys::nft::install_masquerade("weft-other", &pods, &pods).unwrap();
        }
    };
    let a1 = run_in(&t.node, || apply_policy_with(&p, other))
        .unwrap()
        .unwrap();
    assert_eq!((a1.generation, a1.attempts), (2, 3));
    // Writes alternate between two programs; each is whole.
    let mut empty = p.clone();
    empty.ingress.clear();
    for i in 0..60u64 {
        let prog = if i % 2 == 0 { &empty } else { &p };
        let a = run_in(&t.node, || apply_policy(prog)).unwrap().unwrap();
        assert_eq!((a.generation, a.attempts), (i + 3, 1));
        if i == 0 {
            assert!(tcp_check(&empty, b, v4(c), 80));
        }
    }
    let listed = run_in(&t.node, policy_listing).unwrap().unwrap();
    assert_eq!(listed.current(), Some(62));
    assert!(tcp_check(&p, a, v4(c), 80));
    assert!(!tcp_check(&p, b, v4(c), 80));
    assert!(!tcp_check(&p, a, v4(c), 81));
}
