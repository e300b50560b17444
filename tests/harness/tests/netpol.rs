//! Kubernetes NetworkPolicy enforcement end to end: upstream's netpol model (namespaces x, y,
//! z; pods a, b, c; TCP, UDP and SCTP on ports 80 and 81) on a 3-node weft mesh with meshd
//! `--registry kube` on a real kube-apiserver, pods attached by weft-cni (see
//! `weft_tests::netpol`). Cases come from tests/netpol/cases.json. Need root, the workspace
//! binaries (meshd, weft-cni, weft-netpol-agent), cnitool, the reference CNI plugins and the
//! Kubernetes binaries; run serially:
//!   cargo build --workspace --bins && cargo test -p weft-tests --test netpol -- --test-threads=1
//! `WEFT_NETPOL_CASES=substring` runs only the matching cases of `truth_tables`;
//! `WEFT_NETPOL_MESHD_ARGS` adds meshd flags.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weft_tests::cni::allocation_files;
use weft_tests::netpol::cases::load_cases;
use weft_tests::netpol::{agent_bin, Grid, NetpolModel, NetpolOpts, Proto};
use weft_tests::util::{ns_cmd, run_in_netns, spawn_owned, Proc};
use weft_tests::{drops_of, wait_until, CNI_NET};

fn setup() {
    weft_tests::set_nettool(env!("CARGO_BIN_EXE_weft-nettool"));
    weft_tests::netpol::set_agent(env!("CARGO_BIN_EXE_weft-netpol-agent"));
}

fn model_with(opts: NetpolOpts) -> NetpolModel {
    setup();
    NetpolModel::new(opts).unwrap_or_else(|e| panic!("netpol model: {e:#}"))
}

fn model() -> NetpolModel {
    model_with(NetpolOpts::default())
}

fn nonce(what: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{what}-{}-{}", std::process::id(), t.subsec_nanos())
}

/// With no NetworkPolicy at all every pod reaches every other pod on every protocol and port:
/// the model, the agents and the probers work (including the raw-socket SCTP emulation).
#[test]
fn no_policy_all_reachable() {
    let m = model();
    let keys = m.keys();
    let all = Grid::all(&keys, true);
    let t = Instant::now();
    let mut bad = Vec::new();
    let mut cells = 0;
    for proto in Proto::ALL {
        for port in [80, 81] {
            let c = m
                .expect_eventually(proto, port, &all, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("{proto}/{port}: {e:#}"));
            cells += c.cells;
            eprintln!(
                "{proto}/{port}: first probe {} of {} cells wrong, {} rounds, {:?}",
                c.first_mismatches.len(),
                c.cells,
                c.rounds,
                c.elapsed
            );
            if !c.converged() {
                bad.push(format!(
                    "{proto}/{port}:\n{}",
                    c.last.pretty_against(Some(&all))
                ));
            }
        }
    }
    eprintln!("no policy: {cells} cells checked in {:?}", t.elapsed());
    assert!(
        bad.is_empty(),
        "unreachable cells without any policy:\n{}",
        bad.join("\n")
    );

    // Negative control, by hand: every pod namespace drops conntrack-invalid packets both ways
    // (so the emulated SCTP INIT/INIT-ACK must be valid for netfilter, checksum included) and
    // y/b drops everything to port 81. The probers must see exactly y/b's column closed on 81.
    let yb = keys.iter().position(|k| k == "y/b").expect("y/b");
    for p in &m.pods {
        let mut rules = String::from(
            "table inet weft_selftest {\n\
             chain input { type filter hook input priority 0; policy accept; ct state invalid counter drop; }\n\
             chain output { type filter hook output priority 0; policy accept; ct state invalid counter drop; }\n}\n",
        );
        if p.key() == "y/b" {
            rules.push_str(
                "add rule inet weft_selftest input meta l4proto { tcp, udp, sctp } th dport 81 counter drop\n",
            );
        }
        nft_in(&p.netns, &rules);
    }
    let mut closed81 = Grid::all(&keys, true);
    for (i, row) in closed81.cells.iter_mut().enumerate() {
        if i != yb {
            row[yb] = Some(false);
        }
    }
    for proto in Proto::ALL {
        for (port, want) in [(80, &all), (81, &closed81)] {
            let g = m.probe_matrix(proto, port).expect("probe");
            let wrong = g.mismatches(want);
            assert!(
                wrong.is_empty(),
                "negative control {proto}/{port}:\n{}\nnft in y/b:\n{}",
                g.pretty_against(Some(want)),
                weft_tests::util::run_in(&m.pods[yb].netns, "nft", &["list", "ruleset"])
                    .unwrap_or_default()
            );
        }
    }
    let invalid: String = m
        .pods
        .iter()
        .filter_map(|p| weft_tests::util::run_in(&p.netns, "nft", &["list", "ruleset"]).ok())
        .flat_map(|r| {
            r.lines()
                .filter(|l| l.contains("invalid") && !l.contains("packets 0 "))
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        invalid.is_empty(),
        "conntrack called probe packets invalid:\n{invalid}"
    );
    for p in &m.pods {
        let _ = weft_tests::util::run_in(
            &p.netns,
            "nft",
            &["delete", "table", "inet", "weft_selftest"],
        );
    }
    eprintln!(
        "negative control: y/b's column closed on port 81 for TCP, UDP and SCTP, no invalid packet"
    );
}

/// Loads nftables `rules` (a file's text) in network namespace `ns`.
fn nft_in(ns: &str, rules: &str) {
    let path =
        std::env::temp_dir().join(format!("weft-netpol-nft-{}-{ns}.nft", std::process::id()));
    std::fs::write(&path, rules).expect("write rules");
    let r = weft_tests::util::run_in(ns, "nft", &["-f", &path.display().to_string()]);
    let _ = std::fs::remove_file(&path);
    if let Err(e) = r {
        panic!("nft in {ns}: {e:#}\n{rules}");
    }
}

/// Every case of tests/netpol/cases.json on one model.
#[test]
fn truth_tables() {
    let file = load_cases().unwrap_or_else(|e| panic!("{e:#}"));
    let filter = std::env::var("WEFT_NETPOL_CASES").ok();
    let mut opts = NetpolOpts::default();
    if let Some(ports) = file.model["ports"].as_array() {
        opts.ports = ports
            .iter()
            .filter_map(|p| p.as_u64().and_then(|p| u16::try_from(p).ok()))
            .collect();
    }
    let m = model_with(opts);
    let t = Instant::now();
    let mut failed = Vec::new();
    let mut summary = Vec::new();
    let (mut checked, mut wrong, mut run) = (0, 0, 0);
    for case in &file.cases {
        let name = case["name"].as_str().unwrap_or("(unnamed)");
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        run += 1;
        eprintln!("=== case {run}: {name}");
        let r = match m.run_case_with(case, &file.model) {
            Ok(r) => r,
            Err(e) => {
                failed.push(format!("{name}: error: {e:#}"));
                summary.push(format!("ERROR {name}"));
                continue;
            }
        };
        checked += r.cells_checked;
        wrong += r.cells_mismatched;
        let line = format!(
            "{} {name}: {} cells, {} wrong, {} {:?} (case {:?})",
            if r.passed() { "ok  " } else { "FAIL" },
            r.cells_checked,
            r.cells_mismatched,
            if r.passed() {
                "converged in"
            } else {
                "gave up after"
            },
            r.max_converge,
            r.elapsed
        );
        eprintln!("{line}");
        summary.push(line);
        if !r.passed() {
            failed.push(format!("{name}:\n{}", r.failures()));
        }
    }
    eprintln!(
        "truth tables: {run} cases, {checked} cells checked, {wrong} wrong, {:?}\n{}",
        t.elapsed(),
        summary.join("\n")
    );
    assert!(run > 0, "no case ran (filter {filter:?})");
    assert!(
        failed.is_empty(),
        "{} of {run} cases failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// What the prober of [`isolated_from_first_packet`] saw.
#[derive(Debug, Default)]
struct FirstPacket {
    ip: Option<Ipv4Addr>,
    /// When the address appeared in the IPAM dir, from the start of ADD.
    ip_seen: Option<Duration>,
    before_return: u64,
    after_return: u64,
    leaks: Vec<String>,
}

/// A pod selected by a deny-all-ingress policy is isolated from its very first packet: x/a
/// probes the new pod x/d (TCP SYNs and UDP, its server already listening in its namespace)
/// from the moment its address is allocated, while the CNI ADD runs and after it returned; no
/// probe may ever reach it (an accept, an echo, a RST or an ICMP port-unreachable all count).
#[test]
fn isolated_from_first_packet() {
    let m = model();
    m.apply_policy(&json!({
        "metadata": {"name": "deny-d", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "d"}}, "policyTypes": ["Ingress"]},
    }))
    .expect("policy");
    let node = 1; // x/a is on node 0: the probes cross the mesh
    let alloc_dir = m.m.c.node(node).cni_alloc_dir(CNI_NET);
    let before: Vec<String> = allocation_files(&alloc_dir);
    let uid = m
        .create_pod_object("x", "d", node, &json!({"pod": "d"}))
        .expect("Pod x/d");
    let netns = m.create_pod_netns(node).expect("netns");
    let (server, udp_log) = m.start_server("x", "d", &netns).expect("server in x/d");
    let src_ns = m.pod("x/a").expect("x/a").netns.clone();
    let stop = AtomicBool::new(false);
    let returned = AtomicBool::new(false);
    let seen = Mutex::new(FirstPacket::default());
    let t0 = Instant::now();
    let add = std::thread::scope(|s| {
        let prober = s.spawn(|| {
            run_in_netns(&src_ns, || {
                let mut ip = None;
                while !stop.load(Ordering::SeqCst) {
                    let Some(dst) = ip.or_else(|| {
                        allocation_files(&alloc_dir)
                            .into_iter()
                            .find(|f| !before.contains(f))
                            .and_then(|f| f.parse::<Ipv4Addr>().ok())
                    }) else {
                        std::thread::sleep(Duration::from_micros(200));
                        continue;
                    };
                    if ip.is_none() {
                        ip = Some(dst);
                        if let Ok(mut g) = seen.lock() {
                            g.ip = Some(dst);
                            g.ip_seen = Some(t0.elapsed());
                        }
                    }
                    let after = returned.load(Ordering::SeqCst);
                    let leak = probe_once(dst);
                    if let Ok(mut g) = seen.lock() {
                        if after {
                            g.after_return += 1;
                        } else {
                            g.before_return += 1;
                        }
                        if let Some(l) = leak {
                            g.leaks.push(format!(
                                "{l} at {:?} ({} ADD returned)",
                                t0.elapsed(),
                                if after { "after" } else { "before" }
                            ));
                        }
                    }
                }
                Ok(())
            })
        });
        let add = m.cni_add(node, &netns, "x", "d", &uid);
        returned.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::SeqCst);
        let p = prober.join();
        if !matches!(p, Ok(Ok(()))) {
            eprintln!("prober ended badly: {p:?}");
        }
        add
    });
    let (ip, _cid, took) = add.unwrap_or_else(|e| panic!("CNI ADD of x/d: {e:#}"));
    drop(server);
    // What the server saw, however late a probe's packet arrived.
    let udp_seen = std::fs::read_to_string(&udp_log).unwrap_or_default();
    let tcp_seen = std::fs::read_to_string(m.dir.join("x-d.tcp.log")).unwrap_or_default();
    let g = seen.into_inner().unwrap_or_default();
    eprintln!(
        "x/d at {ip}: ADD took {took:?}; address seen by the prober {:?} after ADD started; \
         {} probes before ADD returned, {} after; {} leaks",
        g.ip_seen,
        g.before_return,
        g.after_return,
        g.leaks.len()
    );
    assert_eq!(g.ip, Some(ip), "the prober found another address");
    assert!(g.after_return > 0, "no probe ran after ADD returned");
    eprintln!(
        "x/d's server: {} UDP datagrams, {} TCP connections",
        udp_seen.lines().count(),
        tcp_seen.lines().count()
    );
    let head = |v: Vec<&str>| -> String {
        let n = v.len();
        let mut s: String = v.iter().take(10).map(|l| format!("  {l}\n")).collect();
        if n > 10 {
            s.push_str(&format!("  ... {} more\n", n - 10));
        }
        s
    };
    assert!(
        g.leaks.is_empty() && udp_seen.is_empty() && tcp_seen.is_empty(),
        "x/d was reachable despite deny-all-ingress: {} probes reached it:\n{}\
         UDP datagrams at the server:\n{}TCP connections at the server:\n{}",
        g.leaks.len(),
        head(g.leaks.iter().map(String::as_str).collect()),
        head(udp_seen.lines().collect()),
        head(tcp_seen.lines().collect()),
    );
    // The prober can see a reachable x/d: once the policy is gone, it is.
    m.delete_policy("x/deny-d").expect("delete policy");
    let (server, udp_log) = m.start_server("x", "d-2", &netns).expect("server");
    let ok = wait_until(Duration::from_secs(10), || {
        m.probe_from("x/a", &[(Proto::Tcp, ip, 80)])
            .is_ok_and(|r| r.iter().all(|p| p.ok))
    });
    drop((server, udp_log));
    assert!(ok, "x/d never became reachable once the policy was deleted");
}

/// One UDP datagram and one TCP SYN to `dst` port 80 (short timeouts, so that many probes fit
/// into the ADD; the server's logs catch a late arrival); Some(what) when either reached the pod.
fn probe_once(dst: Ipv4Addr) -> Option<String> {
    let sa = SocketAddr::from((dst, 80));
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect(sa).ok()?;
    let n = nonce("first");
    let _ = s.send(n.as_bytes());
    match TcpStream::connect_timeout(&sa, Duration::from_millis(20)) {
        Ok(_) => return Some("TCP connection accepted".into()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Some("TCP RST (the SYN reached the pod)".into())
        }
        Err(_) => {}
    }
    s.set_read_timeout(Some(Duration::from_millis(5))).ok()?;
    let mut buf = [0u8; 256];
    match s.recv(&mut buf) {
        Ok(k) if &buf[..k] == n.as_bytes() => Some("UDP echoed".into()),
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Some("ICMP port unreachable (the datagram reached the pod)".into())
        }
        Err(_) => None,
    }
}

/// A `weft-netpol-agent stream` with the arrival time of every line it printed.
struct Stream {
    _proc: Proc,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Stream {
    fn start(netns: &str, ip: Ipv4Addr, port: u16) -> Stream {
        let agent = agent_bin().expect("agent");
        let mut cmd = ns_cmd(netns, agent);
        cmd.args([
            "stream",
            "--ip",
            &ip.to_string(),
            "--port",
            &port.to_string(),
        ])
        .args(["--interval-ms", "100"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        let mut child = spawn_owned(&mut cmd).expect("stream");
        let out = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { return };
                if let Ok(mut v) = l2.lock() {
                    v.push((Instant::now(), l));
                }
            }
        });
        Stream {
            _proc: Proc::from_child("stream", child),
            lines,
        }
    }

    /// Arrival times of the echoes.
    fn echoes(&self) -> Vec<Instant> {
        self.lines
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|(_, l)| l.starts_with("echo "))
                    .map(|(t, _)| *t)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn wait_flowing(&self, n: usize) -> bool {
        wait_until(Duration::from_secs(10), || self.echoes().len() >= n)
    }

    fn text(&self) -> String {
        self.lines
            .lock()
            .map(|v| v.iter().map(|(_, l)| format!("{l}\n")).collect())
            .unwrap_or_default()
    }
}

fn deny_y_b() -> Value {
    json!({
        "metadata": {"name": "deny-y-b", "namespace": "y"},
        "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]},
    })
}

/// An established TCP connection x/a -> y/b (a line every 100 ms, echoed) stops carrying data
/// within 1 s of a policy denying it; with meshd `--keep-established-flows` it survives while
/// new connections are refused.
#[test]
fn live_flow_cut() {
    let m = model();
    let (a, b) = ("x/a", "y/b");
    let a_ns = m.pod(a).expect("x/a").netns.clone();
    let b_ip = m.pod_ip(b).expect("y/b");
    let mut failures = Vec::new();

    // 1. Default: the flow is cut.
    let s = Stream::start(&a_ns, b_ip, 80);
    assert!(s.wait_flowing(5), "the stream never flowed:\n{}", s.text());
    m.apply_policy(&deny_y_b()).expect("policy");
    let applied = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let echoes = s.echoes();
    let late: Vec<Duration> = echoes
        .iter()
        .filter(|t| **t > applied + Duration::from_secs(1))
        .map(|t| *t - applied)
        .collect();
    let last = echoes.last().map(|t| t.saturating_duration_since(applied));
    eprintln!(
        "default: {} echoes, last {last:?} after the policy was applied, {} later than 1 s",
        echoes.len(),
        late.len()
    );
    if !late.is_empty() {
        failures.push(format!(
            "the established flow still carried {} echoes more than 1 s after the policy \
             (last at {last:?})",
            late.len()
        ));
    }
    drop(s);
    m.delete_policy("y/deny-y-b").expect("delete policy");

    // 2. meshd --keep-established-flows: the flow survives, new connections do not.
    let restarted = m.restart_meshd(&["--keep-established-flows"]);
    if let Err(e) = &restarted {
        failures.push(format!(
            "restarting meshd with --keep-established-flows: {e:#}"
        ));
    }
    if restarted.is_ok() {
        let s = Stream::start(&a_ns, b_ip, 80);
        if !s.wait_flowing(5) {
            failures.push(format!("the second stream never flowed:\n{}", s.text()));
        } else {
            m.apply_policy(&deny_y_b()).expect("policy");
            let applied = Instant::now();
            std::thread::sleep(Duration::from_secs(3));
            let after = s
                .echoes()
                .iter()
                .filter(|t| **t > applied + Duration::from_secs(1))
                .count();
            eprintln!("--keep-established-flows: {after} echoes from 1 s to 3 s after the policy");
            if after < 10 {
                failures.push(format!(
                    "with --keep-established-flows the flow carried only {after} echoes 1-3 s \
                     after the policy (want >= 10)"
                ));
            }
            let new = m.probe_from(a, &[(Proto::Tcp, b_ip, 80)]).expect("probe");
            if new.iter().any(|p| p.ok) {
                failures.push("a new connection x/a -> y/b passed the policy".into());
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A policy lets UDP from x/a (node 0) into y/b (node 1). A packet to y/b forged with x/a's
/// source address from x/c (node 2) must not arrive, while a genuine one from x/a does; y/b's
/// node counts the forged one in `drops.sourceNotAllowed`.
#[test]
fn forged_source() {
    let m = model();
    let (a, b, c) = ("x/a", "y/b", "x/c");
    let (pa, pb, pc) = (
        m.pod(a).expect("x/a"),
        m.pod(b).expect("y/b"),
        m.pod(c).expect("x/c"),
    );
    assert!(
        pa.node != pb.node && pc.node != pa.node && pc.node != pb.node,
        "x/a, y/b, x/c must be on three nodes"
    );
    m.apply_policy(&json!({
        "metadata": {"name": "udp-from-x-a", "namespace": "y"},
        "spec": {
            "podSelector": {"matchLabels": {"pod": "b"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}},
                          "podSelector": {"matchLabels": {"pod": "a"}}}],
                "ports": [{"protocol": "UDP", "port": 80}],
            }],
        },
    }))
    .expect("policy");
    let mut failures = Vec::new();
    let t = Instant::now();
    let enforced = wait_until(Duration::from_secs(10), || {
        let ok_a = m.probe_from(a, &[(Proto::Udp, pb.ip, 80)]);
        let ok_c = m.probe_from(c, &[(Proto::Udp, pb.ip, 80)]);
        matches!((ok_a, ok_c), (Ok(x), Ok(y)) if x[0].ok && !y[0].ok)
    });
    eprintln!("policy enforced: {enforced} after {:?}", t.elapsed());
    if !enforced {
        failures.push("the policy never held (x/a -> y/b UDP open, x/c -> y/b closed)".into());
    }
    let node_b = m.m.c.node(pb.node);
    let drops_before = drops_of(&node_b.status_json().expect("status"), "sourceNotAllowed");
    let agent = agent_bin().expect("agent");
    let forged = nonce("forged");
    let genuine = nonce("genuine");
    for (ns, payload) in [(&pc.netns, &forged), (&pa.netns, &genuine)] {
        for _ in 0..3 {
            let out = weft_tests::util::run_in(
                ns,
                &agent.display().to_string(),
                &[
                    "spoof",
                    "--src",
                    &pa.ip.to_string(),
                    "--dst",
                    &pb.ip.to_string(),
                    "--port",
                    "80",
                    "--payload",
                    payload,
                ],
            );
            if let Err(e) = out {
                panic!("spoof from {ns}: {e:#}");
            }
        }
    }
    let arrived = wait_until(Duration::from_secs(3), || {
        pb.udp_log_text().contains(&genuine)
    });
    let drops_grew = wait_until(Duration::from_secs(3), || {
        node_b
            .status_json()
            .is_ok_and(|s| drops_of(&s, "sourceNotAllowed") > drops_before)
    });
    let log = pb.udp_log_text();
    let drops_after = drops_of(&node_b.status_json().expect("status"), "sourceNotAllowed");
    eprintln!(
        "y/b's UDP log:\n{log}sourceNotAllowed on {}: {drops_before} -> {drops_after}",
        node_b.name
    );
    if !arrived {
        failures.push("the genuine datagram from x/a never arrived".into());
    }
    if log.contains(&forged) {
        failures.push("the datagram forged with x/a's address from x/c arrived at y/b".into());
    }
    if !drops_grew {
        failures.push(format!(
            "drops.sourceNotAllowed on {} did not grow ({drops_before} -> {drops_after})",
            node_b.name
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Drops by policy are visible: `meshd status` lists the policies selecting each local pod and
/// counts its drops per direction; a rate-limited log line names the policy.
#[test]
fn drops_are_visible_per_pod_and_policy() {
    let m = model();
    let deny = json!({
        "metadata": {"name": "deny-x-a", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"]},
    });
    m.apply_policy(&deny).expect("policy");
    let a_ip = m.pod_ip("x/a").expect("x/a");
    let targets = vec![(Proto::Tcp, a_ip, 80); 3];
    assert!(
        wait_until(Duration::from_secs(10), || m
            .probe_from("y/b", &targets[..1])
            .is_ok_and(|r| !r[0].ok)),
        "the policy never held"
    );
    let r = m.probe_from("y/b", &targets).expect("probe");
    assert!(r.iter().all(|r| !r.ok), "{r:?}");
    let node = &m.m.c.nodes[m.pod("x/a").expect("x/a").node];
    let mut seen = Value::Null;
    let ok = wait_until(Duration::from_secs(5), || {
        let Ok(st) = m.node_status_of("x/a") else {
            return false;
        };
        seen = st["policy"].clone();
        seen["pods"].as_array().into_iter().flatten().any(|p| {
            p["namespace"] == "x"
                && p["name"] == "a"
                && p["placed"] == true
                && p["ingressPolicies"] == json!(["x/deny-x-a"])
                && p["egressPolicies"] == json!([])
                && p["drops"]["ingress"].as_u64().unwrap_or(0) >= 3
        })
    });
    assert!(ok, "status of x/a's node: {seen:#}");
    eprintln!(
        "status policy: generation {} lastApplyMs {} program {}",
        seen["generation"], seen["lastApplyMs"], seen["program"]
    );
    let logged = wait_until(Duration::from_secs(5), || {
        let log = node.meshd_log();
        log.lines().any(|l| {
            l.contains("NetworkPolicy dropped packets")
                && l.contains("x/deny-x-a")
                && l.contains("x/a")
        })
    });
    assert!(
        logged,
        "no log line naming the policy:\n{}",
        node.meshd_log()
    );
}
