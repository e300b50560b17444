//! The compiler and the program on the upstream e2e model: namespaces x, y, z × pods a, b, c
//! over three nodes, reachability checked cell by cell through each node's program (a
//! cross-node cell must pass the source node's program and the destination node's).

use super::compile::{compile, LocalPod, State};
use super::model::{parse_namespace, PodInfo, Policy};
use super::program::{Decision, Packet, Proto};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::IpAddr;

pub(crate) const PODS: [&str; 9] = [
    "x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c",
];

/// The model: pod i on node i % 3 with address 10.42.NODE.(10 + i).
pub(crate) struct Model {
    pub state: State,
}

pub(crate) fn pod_ip(i: usize) -> IpAddr {
    format!("10.42.{}.{}", i % 3, 10 + i)
        .parse()
        .expect("test data")
}

impl Model {
    pub fn new() -> Model {
        let mut state = State::default();
        for ns in ["x", "y", "z"] {
            let (n, l) = parse_namespace(&json!({"metadata": {"name": ns, "labels": {"ns": ns}}}))
                .expect("test data");
            state.namespaces.insert(n, l);
        }
        for (i, key) in PODS.iter().enumerate() {
            let (ns, name) = key.split_once('/').expect("test data");
            let mut containers = Vec::new();
            for port in [80, 81] {
                for proto in ["TCP", "UDP", "SCTP"] {
                    let p = proto.to_lowercase();
                    containers.push(json!({"name": format!("cont-{port}-{p}"),
                        "ports": [{"name": format!("serve-{port}-{p}"), "containerPort": port, "protocol": proto}]}));
                }
            }
            let pod = PodInfo::parse(&json!({
                "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
                "spec": {"nodeName": format!("node-{}", i % 3), "containers": containers},
                "status": {"podIP": pod_ip(i).to_string()}
            }))
            .expect("test data");
            state.pods.insert(key.to_string(), pod);
        }
        Model { state }
    }

    pub fn apply(&mut self, v: Value) {
        let p = Policy::parse(&v).expect("test data");
        self.state.policies.insert(p.key(), p);
    }

    /// `.`/`X` rows (from) × columns (to), diagonal `.`.
    pub fn grid(&self, proto: Proto, port: u16) -> Vec<String> {
        let progs: Vec<_> = (0..3)
            .map(|n| {
                let local: Vec<LocalPod> = PODS
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % 3 == n)
                    .map(|(i, k)| {
                        let (ns, name) = k.split_once('/').expect("test data");
                        LocalPod {
                            namespace: ns.into(),
                            name: name.into(),
                            ips: vec![pod_ip(i)],
                        }
                    })
                    .collect();
                let range = format!("10.42.{n}.0/24").parse().expect("test data");
                compile(&self.state, &[range], &local, &BTreeMap::new()).program
            })
            .collect();
        (0..9)
            .map(|s| {
                (0..9)
                    .map(|d| {
                        if s == d {
                            return '.';
                        }
                        let pkt = Packet {
                            src: pod_ip(s),
                            dst: pod_ip(d),
                            proto: Some(proto),
                            dport: port,
                        };
                        let ok = progs[s % 3].evaluate(&pkt) == Decision::Accept
                            && progs[d % 3].evaluate(&pkt) == Decision::Accept;
                        if ok {
                            '.'
                        } else {
                            'X'
                        }
                    })
                    .collect()
            })
            .collect()
    }
}

fn np(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

fn rows(s: &[&str]) -> Vec<String> {
    s.iter().map(|r| r.to_string()).collect()
}

#[test]
fn no_policy_everything_reachable() {
    let m = Model::new();
    assert!(m.grid(Proto::Tcp, 80).iter().all(|r| r == "........."));
}

#[test]
fn default_deny_ingress_and_allow_from_namespace() {
    let mut m = Model::new();
    m.apply(np("x", "deny", json!({"podSelector": {}})));
    let g = m.grid(Proto::Tcp, 80);
    // Nobody reaches x's pods (columns 0-2) except from themselves.
    for (s, row) in g.iter().enumerate() {
        for (d, c) in row.chars().enumerate() {
            let expect = if s == d || d >= 3 { '.' } else { 'X' };
            assert_eq!(c, expect, "{} -> {}", PODS[s], PODS[d]);
        }
    }
    m.apply(np(
        "x",
        "from-y",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
    ));
    assert_eq!(
        m.grid(Proto::Tcp, 80),
        rows(&[
            ".XX......",
            "X.X......",
            "XX.......",
            ".XX......",
            ".XX......",
            ".XX......",
            "XXX......",
            "XXX......",
            "XXX......",
        ])
    );
}

#[test]
fn named_ports_and_end_port() {
    let mut m = Model::new();
    m.apply(np(
        "x",
        "named",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "ingress": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]}),
    ));
    let open = rows(&["........."; 9]);
    let col0_closed: Vec<String> = (0..9)
        .map(|s| {
            if s == 0 {
                ".........".into()
            } else {
                "X........".into()
            }
        })
        .collect();
    assert_eq!(m.grid(Proto::Udp, 81), open);
    assert_eq!(m.grid(Proto::Udp, 80), col0_closed);
    assert_eq!(m.grid(Proto::Tcp, 81), col0_closed);
    m.apply(np(
        "x",
        "named",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "ingress": [{"ports": [{"port": 79, "endPort": 80}]}]}),
    ));
    assert_eq!(m.grid(Proto::Tcp, 80), open);
    assert_eq!(m.grid(Proto::Tcp, 81), col0_closed);
}

#[test]
fn egress_ip_block_with_except() {
    let mut m = Model::new();
    // x/a may reach node 1's range except y/b (10.42.1.14).
    m.apply(np(
        "x",
        "egress",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"ipBlock": {"cidr": "10.42.1.0/24", "except": ["10.42.1.14/32"]}}]}]}),
    ));
    let g = m.grid(Proto::Tcp, 80);
    // Row x/a: only pods on node 1 (indices 1, 4, 7) but not y/b (4).
    assert_eq!(g[0], "..XXXXX.X");
    assert!(g[1..].iter().all(|r| r == "........."));
}

#[test]
fn refused_policy_isolates_its_namespace() {
    let mut m = Model::new();
    let bad = np(
        "y",
        "bad",
        json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}),
    );
    let e = Policy::parse(&bad).expect_err("ICMP is no policy protocol");
    assert_eq!(e.field, "spec.ingress[0].ports[0].protocol");
    m.state.refused.insert("y/bad".into(), e);
    let g = m.grid(Proto::Tcp, 80);
    for (s, row) in g.iter().enumerate() {
        for (d, c) in row.chars().enumerate() {
            let expect = if s == d || !(3..6).contains(&d) {
                '.'
            } else {
                'X'
            };
            assert_eq!(c, expect, "{} -> {}", PODS[s], PODS[d]);
        }
    }
}

#[test]
fn unplaced_local_pod_is_guarded() {
    let m = Model::new();
    let range = "10.42.0.0/24".parse().expect("test data");
    let local = vec![LocalPod {
        namespace: "x".into(),
        name: "new".into(),
        ips: vec!["10.42.0.99".parse().expect("test data")],
    }];
    let c = compile(&m.state, &[range], &local, &BTreeMap::new());
    assert!(!c.pods[0].placed);
    let pkt = Packet {
        src: pod_ip(1),
        dst: "10.42.0.99".parse().expect("test data"),
        proto: Some(Proto::Tcp),
        dport: 80,
    };
    assert_eq!(c.program.evaluate(&pkt), Decision::Guard);
}

/// `{{ip NS/POD}}` and `{{cidr NS/POD LEN}}` in a case's policy JSON.
fn substitute(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").expect("closed template") + start;
        let parts: Vec<&str> = rest[start + 2..end].split_whitespace().collect();
        let i = PODS.iter().position(|p| *p == parts[1]).expect("known pod");
        let ip = pod_ip(i);
        match parts[0] {
            "ip" => out.push_str(&ip.to_string()),
            "cidr" => {
                let len: u8 = parts[2].parse().expect("prefix length");
                let net = ipnet::IpNet::new(ip, len).expect("prefix").trunc();
                out.push_str(&net.to_string());
            }
            other => panic!("unknown template {other}"),
        }
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Every cell of every upstream spec's truth table (tests/netpol/cases.json, ported from
/// kubernetes' test/e2e/network/netpol) through the compiled programs of three nodes.
#[test]
fn upstream_truth_tables() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/netpol/cases.json");
    let text = std::fs::read_to_string(path).expect("tests/netpol/cases.json");
    let doc: Value = serde_json::from_str(&text).expect("cases.json is JSON");
    let cases = doc["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 48, "the 48 upstream specs");
    let (mut cells, mut bad) = (0usize, Vec::new());
    for case in cases {
        let name = case["name"].as_str().unwrap_or("?");
        let mut m = Model::new();
        for step in case["steps"].as_array().expect("steps") {
            for action in step["actions"].as_array().expect("actions") {
                let (kind, arg) = action
                    .as_object()
                    .and_then(|o| o.iter().next())
                    .expect("action");
                match kind.as_str() {
                    "createPolicy" | "updatePolicy" => {
                        let v: Value =
                            serde_json::from_str(&substitute(&arg.to_string())).expect("policy");
                        m.apply(v);
                    }
                    "deletePolicy" => {
                        m.state.policies.remove(arg.as_str().expect("key"));
                    }
                    "setPodLabels" => {
                        let pod = m
                            .state
                            .pods
                            .get_mut(arg["pod"].as_str().expect("pod"))
                            .expect("known pod");
                        pod.labels = serde_json::from_value(arg["labels"].clone()).expect("labels");
                    }
                    "setNamespaceLabels" => {
                        let ns = arg["namespace"].as_str().expect("namespace");
                        let (n, l) = parse_namespace(
                            &json!({"metadata": {"name": ns, "labels": arg["labels"]}}),
                        )
                        .expect("namespace");
                        m.state.namespaces.insert(n, l);
                    }
                    other => panic!("{name}: unknown action {other}"),
                }
            }
            for e in step["expect"].as_array().expect("expect") {
                let proto = match e["protocol"].as_str() {
                    Some("TCP") => Proto::Tcp,
                    Some("UDP") => Proto::Udp,
                    Some("SCTP") => Proto::Sctp,
                    other => panic!("{name}: protocol {other:?}"),
                };
                let port = e["port"].as_u64().expect("port") as u16;
                let want: Vec<String> = serde_json::from_value(e["grid"].clone()).expect("grid");
                let got = m.grid(proto, port);
                for (s, from) in PODS.iter().enumerate() {
                    for (d, to) in PODS.iter().enumerate() {
                        if s == d {
                            continue;
                        }
                        cells += 1;
                        let (w, g) = (want[s].as_bytes()[d], got[s].as_bytes()[d]);
                        if w != g {
                            bad.push(format!(
                                "{name}: {} {port} {} -> {}: want {} got {}",
                                e["protocol"], from, to, w as char, g as char
                            ));
                        }
                    }
                }
            }
        }
    }
    println!("{cells} cells checked, {} wrong", bad.len());
    assert!(
        bad.is_empty(),
        "{} of {cells} cells wrong:\n{}",
        bad.len(),
        bad.join("\n")
    );
    assert_eq!(cells, 4680);
}

#[test]
fn bad_policies_name_the_field() {
    let cases = [
        (
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 90}]}]}),
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}),
            "spec.egress[0].to[0].ipBlock.cidr",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]}]}),
            "spec.ingress[0].from[0].ipBlock.except[0]",
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near", "values": ["b"]}]}}),
            "spec.podSelector.matchExpressions[0].operator",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]}),
            "spec.ingress[0].ports[0].port",
        ),
        (
            json!({"podSelector": {}, "policyTypes": ["Sideways"]}),
            "spec.policyTypes[0]",
        ),
    ];
    for (spec, field) in cases {
        let e = Policy::parse(&np("x", "bad", spec)).expect_err(field);
        assert_eq!(e.field, field, "{e}");
    }
    // The defaults: Ingress always; Egress only with egress rules.
    let p = Policy::parse(&np("x", "p", json!({"podSelector": {}}))).expect("valid");
    assert!(p.ingress.is_some() && p.egress.is_none());
    let p = Policy::parse(&np("x", "p", json!({"podSelector": {}, "egress": []}))).expect("valid");
    assert!(p.ingress.is_some() && p.egress.is_some());
    let p = Policy::parse(&np(
        "x",
        "p",
        json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    ))
    .expect("valid");
    assert!(p.ingress.is_none() && p.egress.is_some());
}

#[test]
fn an_address_claimed_twice_maps_once() {
    let mut m = Model::new();
    m.apply(np("x", "deny", json!({"podSelector": {}})));
    let range = "10.42.0.0/24".parse().expect("net");
    let ip = pod_ip(0);
    let local = vec![
        LocalPod {
            namespace: "x".into(),
            name: "a".into(),
            ips: vec![ip],
        },
        LocalPod {
            namespace: "x".into(),
            name: "b".into(),
            ips: vec![ip],
        },
    ];
    let c = compile(&m.state, &[range], &local, &BTreeMap::new());
    assert_eq!(c.program.ingress.len(), 1, "{:?}", c.program.ingress);
}
