//! `keyctl graph` against a real mesh: three meshd nodes with a pod each and a "laptop" running
//! wireguard-go (registered with `keyctl peer add`), on the cluster's dir registry.
//!
//! 1. After pings between every pair of pods and from the laptop, the DOT names every node with
//!    its pod CIDR, endpoint and key fingerprint (from meshd's own status), every node pair is
//!    "up", the laptop sits in the dashed `cluster_external` subgraph with "up" links.
//! 2. Graphviz `dot -Tsvg` parses the DOT (exit 0) and `keyctl graph --format svg` yields an SVG
//!    document (written to env `WEFT_GRAPH_SVG` when set: docs/mesh.svg is made this way).
//! 3. The registry flags work before and after the subcommand (same DOT either way).
//! 4. node-2's meshd is stopped; pings towards its pod make node-0 and node-1 report the link
//!    unanswered: within their next reports no node-2 edge is "up" any more, the others are.
//!
//! Needs root, wireguard-go, wireguard-tools, graphviz and the workspace binaries; run serially:
//!   cargo build --workspace --bins && cargo test -p weft-tests --test graph -- --test-threads=1

use std::io::Write as _;
use std::time::{Duration, Instant};
use weft_tests::{keyctl_in, peer_of, Cluster, Node, PingOpts, Pod};

const READY: Duration = Duration::from_secs(20);
const LAPTOP_IP: &str = "10.99.0.1";

fn keyctl_ok(c: &Cluster, args: &[&str]) -> String {
    let sw = c.switch_ns.clone().expect("switch namespace");
    let out = keyctl_in(&sw, args, Duration::from_secs(60)).expect("keyctl");
    assert!(
        out.status.success(),
        "keyctl {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.debug_report()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `keyctl graph` DOT (registry flags after the subcommand).
fn graph(c: &Cluster) -> String {
    keyctl_ok(c, &["graph", "--registry", &c.registry.spec()])
}

/// The edge line between `a` and `b` (nodes are sorted, so `a` < `b`).
fn edge<'a>(dot: &'a str, a: &str, b: &str) -> &'a str {
    let prefix = format!("  \"{a}\" -- \"{b}\" [");
    dot.lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no edge {a} -- {b}:\n{dot}"))
}

fn is_up(line: &str) -> bool {
    line.contains("[label=\"up\"")
}

fn ping_ok(p: &Pod, dst: impl std::fmt::Display) -> bool {
    p.ping(dst, &PingOpts::count(3).interval(0.05).wait(1))
        .is_ok_and(|r| r.received > 0)
}

/// Runs `dot -Tsvg` on `dot_text`; returns the SVG.
fn graphviz(dot_text: &str) -> String {
    let mut child = std::process::Command::new("dot")
        .arg("-Tsvg")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("graphviz dot (apt-get install graphviz)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(dot_text.as_bytes())
        .expect("write dot");
    let out = child.wait_with_output().expect("dot");
    assert!(
        out.status.success(),
        "dot rejects keyctl's DOT: {}\n{dot_text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the SVG shows `text` (Graphviz writes `-` as `&#45;`).
fn svg_has(svg: &str, text: &str) -> bool {
    svg.contains(text) || svg.contains(&text.replace('-', "&#45;"))
}

fn node_facts(n: &Node) -> (String, String, String) {
    let st = n.status_json().expect("status");
    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    (
        s(&st["node"]["podCidrs"][0]),
        s(&st["node"]["endpoints"][0]),
        s(&st["node"]["publicKey"]).chars().take(8).collect(),
    )
}

#[test]
fn graph_of_a_real_mesh() {
    weft_tests::set_nettool(env!("CARGO_BIN_EXE_weft-nettool"));
    let t0 = Instant::now();
    let c = Cluster::with_nodes(4).expect("cluster");
    let pods: Vec<Pod> = (0..3).map(|i| c.node(i).add_pod(0).expect("pod")).collect();
    for i in 0..3 {
        c.node(i).start_meshd(&[]).expect("meshd");
    }
    c.wait_mesh_ready(READY).expect("mesh ready");
    let spec = c.registry.spec();

    // An external peer, configured from what keyctl prints.
    let keys = c
        .add_wireguard_go_peer(3, "laptop", LAPTOP_IP, &pods)
        .expect("wireguard-go laptop");
    for a in &pods {
        for b in &pods {
            if a.ip != b.ip {
                assert!(ping_ok(a, b.ip), "{} -> {}", a.ip, b.ip);
            }
        }
    }
    for i in 0..3 {
        c.node(i)
            .wait_status(READY, |st| {
                peer_of(st, "laptop").is_some_and(|p| p["latestHandshakeSecsAgo"].is_number())
            })
            .expect("handshake with the laptop");
    }

    // 1. Every node, edge and the laptop, once the nodes' reports show it (every 2 s on change).
    let t_up = Instant::now();
    let mut dot = String::new();
    let all_up = weft_tests::wait_until(Duration::from_secs(20), || {
        dot = graph(&c);
        ["node-0", "node-1", "node-2"].iter().all(|n| {
            dot.lines()
                .any(|l| l.starts_with(&format!("  \"{n}\" -- \"laptop\" [label=\"up\"")))
        }) && is_up(edge(&dot, "node-0", "node-1"))
            && is_up(edge(&dot, "node-0", "node-2"))
            && is_up(edge(&dot, "node-1", "node-2"))
    });
    assert!(all_up, "not every link up:\n{dot}\n{}", c.debug_report());
    eprintln!(
        "every link up in keyctl graph {:?} after the pings",
        t_up.elapsed()
    );
    for i in 0..3 {
        let n = c.node(i);
        let (cidr, endpoint, fp) = node_facts(n);
        assert!(!cidr.is_empty() && !endpoint.is_empty() && fp.len() == 8);
        let line = dot
            .lines()
            .find(|l| l.starts_with(&format!("    \"{}\" [label=", n.name)))
            .unwrap_or_else(|| panic!("no node line for {}:\n{dot}", n.name));
        for want in [
            format!("pod {cidr}"),
            format!("endpoint {endpoint}"),
            format!("key {fp}"),
        ] {
            assert!(line.contains(&want), "{want} missing: {line}");
        }
    }
    let ext = &dot[dot
        .find("subgraph cluster_external {")
        .expect("external cluster")..];
    let ext = &ext[..ext.find("\n  }").expect("cluster end")];
    assert!(ext.contains("style=dashed"), "{ext}");
    assert!(
        ext.contains("\"laptop\" [label=\"laptop\\nallowed 10.99.0.1/32"),
        "{ext}"
    );
    assert!(
        ext.contains(&format!("key {}", &keys.public_key[..8])),
        "{ext}"
    );
    assert!(!dot.contains(&keys.private_key));
    eprintln!("keyctl graph DOT of the test mesh:\n{dot}");

    // 2. Graphviz parses it; --format svg renders.
    let svg = graphviz(&dot);
    assert!(svg.contains("<svg") && svg_has(&svg, "node-2"), "{svg}");
    let rendered = keyctl_ok(&c, &["graph", "--format", "svg", "--registry", &spec]);
    assert!(
        rendered.contains("<svg") && rendered.trim_end().ends_with("</svg>"),
        "{rendered}"
    );
    for n in ["node-0", "node-1", "node-2", "laptop"] {
        assert!(svg_has(&rendered, n), "{n} missing from the SVG");
    }
    let out = std::env::temp_dir().join(format!("weft-graph-{}.svg", std::process::id()));
    let path = out.to_string_lossy().into_owned();
    keyctl_ok(
        &c,
        &["--registry", &spec, "graph", "--format", "svg", "-o", &path],
    );
    let written = std::fs::read_to_string(&out).expect("--output file");
    assert!(written.contains("<svg"), "{written}");
    let _ = std::fs::remove_file(&out);
    if let Some(p) = std::env::var_os("WEFT_GRAPH_SVG") {
        std::fs::write(&p, &rendered).expect("WEFT_GRAPH_SVG");
        eprintln!("SVG written to {}", p.to_string_lossy());
    }

    // 3. Registry flags before the subcommand give the same graph.
    let before = keyctl_ok(&c, &["--registry", &spec, "graph"]);
    let strip = |d: &str| -> String {
        d.lines()
            .filter(|l| !l.contains("report stale"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(&before), strip(&graph(&c)));
    let bad = keyctl_in(
        c.switch_ns.as_deref().expect("switch"),
        &["graph", "--registry", "dir:/nonexistent/weft"],
        Duration::from_secs(30),
    )
    .expect("keyctl");
    assert_eq!(bad.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--registry"));

    // 4. node-2 stops: its links stop being up in the others' reports.
    c.node(2).stop_meshd(libc::SIGKILL).expect("stop node-2");
    let t_stop = Instant::now();
    let down = weft_tests::wait_until(Duration::from_secs(60), || {
        // Traffic towards node-2 is what shows its silence (no answer within 15 s).
        let _ = ping_ok(&pods[0], pods[2].ip);
        let _ = ping_ok(&pods[1], pods[2].ip);
        dot = graph(&c);
        !is_up(edge(&dot, "node-0", "node-2")) && !is_up(edge(&dot, "node-1", "node-2"))
    });
    assert!(
        down,
        "node-2's links still up:\n{dot}\n{}",
        c.debug_report()
    );
    eprintln!(
        "node-2's links no longer up {:?} after its meshd stopped:\n{}\n{}",
        t_stop.elapsed(),
        edge(&dot, "node-0", "node-2"),
        edge(&dot, "node-1", "node-2")
    );
    assert!(is_up(edge(&dot, "node-0", "node-1")), "{dot}");
    graphviz(&dot);
    eprintln!("graph test took {:?}", t0.elapsed());
}
