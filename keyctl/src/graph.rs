//! `keyctl graph`: the mesh as Graphviz DOT.
//!
//! In: the registry contents keyctl reads for `status --peers` ([`crate::status::Contents`]
//! with the nodes' health reports) and the [`crate::status::Status`] built from them
//! (fingerprints, revocations, the link rows). Out: one DOT document, deterministic (everything sorted by name): a box per
//! node with its name, pod CIDRs, endpoints and key fingerprint (marked when revoked or when its
//! health report is stale); one undirected edge per node pair coloured by the worse of the two
//! ends' fresh reports (up green, idle blue, no handshake / unanswered red, no report grey dashed);
//! external peers in a dashed `cluster_external` subgraph with an edge from every node that
//! reports a link to them; and a legend. Only public facts: names, addresses, fingerprints.

use crate::status::{Contents, LinkRow, RevocationState, Status};
use std::collections::BTreeMap;
use std::fmt::Write;
use weft_core::health::LinkState;

/// How an edge looks: its label, colour and style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edge {
    Up,
    Idle,
    Down(LinkState),
    /// Neither end reports the link (no report, or the report does not list the peer).
    NoReport,
}

impl Edge {
    fn from_state(s: LinkState) -> Edge {
        match s {
            LinkState::Up => Edge::Up,
            LinkState::Idle => Edge::Idle,
            other => Edge::Down(other),
        }
    }

    fn rank(self) -> u8 {
        match self {
            Edge::Up => 0,
            Edge::Idle => 1,
            Edge::Down(_) => 2,
            Edge::NoReport => 3,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Edge::Up => "up",
            Edge::Idle => "idle",
            Edge::Down(LinkState::Unanswered) => "unanswered",
            Edge::Down(_) => "no handshake",
            Edge::NoReport => "no report",
        }
    }

    fn attrs(self) -> &'static str {
        match self {
            Edge::Up => "color=\"#2e7d32\", fontcolor=\"#2e7d32\", penwidth=2",
            Edge::Idle => "color=\"#1565c0\", fontcolor=\"#1565c0\"",
            Edge::Down(_) => "color=\"#c62828\", fontcolor=\"#c62828\", penwidth=2",
            Edge::NoReport => "color=\"#9e9e9e\", fontcolor=\"#9e9e9e\", style=dashed",
        }
    }
}

/// A DOT double-quoted string: backslashes and quotes escaped, line breaks as `\n`.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A label of several lines, each escaped (`\n` separates them in DOT).
fn label(lines: &[String]) -> String {
    let q: Vec<String> = lines
        .iter()
        .map(|l| {
            let q = quote(l);
            q[1..q.len() - 1].to_string()
        })
        .collect();
    format!("\"{}\"", q.join("\\n"))
}

fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The state `node` reports for its link to `peer` (None: no such row, or the node's report is
/// stale: older than three of its intervals, so the node may be down).
fn reported(links: &[LinkRow], node: &str, peer: &str) -> Option<Edge> {
    links
        .iter()
        .find(|l| l.node == node && l.peer.as_deref() == Some(peer) && !l.stale)
        .and_then(|l| l.state)
        .map(Edge::from_state)
}

/// The DOT document of the mesh. `s` must be built from `c` with health reports read.
pub fn dot(c: &Contents, s: &Status) -> String {
    let links: &[LinkRow] = s.links.as_deref().unwrap_or(&[]);
    let stale: BTreeMap<&str, bool> = links.iter().map(|l| (l.node.as_str(), l.stale)).collect();
    let mut records: Vec<_> = c.records.iter().collect();
    records.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = String::new();
    let _ = writeln!(out, "graph weft {{");
    let _ = writeln!(
        out,
        "  label={}; labelloc=t; fontname=\"Helvetica\"; layout=dot; rankdir=LR;",
        quote(&format!("weft mesh ({})", s.registry))
    );
    let _ = writeln!(
        out,
        "  node [shape=box, style=\"rounded,filled\", fillcolor=\"#f5f5f5\", fontname=\"Helvetica\", fontsize=10];"
    );
    let _ = writeln!(out, "  edge [fontname=\"Helvetica\", fontsize=9];");
    let _ = writeln!(out, "  subgraph cluster_mesh {{");
    let _ = writeln!(out, "    label=\"nodes\"; style=solid; color=\"#607d8b\";");
    for r in &records {
        let status = s.nodes.iter().find(|n| n.name == r.name);
        let mut lines = vec![
            r.name.clone(),
            format!("pod {}", join(&r.pod_cidrs)),
            format!("endpoint {}", join(&r.endpoints)),
            format!("key {}", r.public_key.fingerprint()),
        ];
        let mut fill = "#f5f5f5";
        if let Some(rev) = status.and_then(|n| n.revocation.as_ref()) {
            if rev.state != RevocationState::Readmitted {
                lines.push("REVOKED".into());
                fill = "#ffcdd2";
            }
        }
        if r.next_public_key.is_some() {
            lines.push("rotating key".into());
        }
        if stale.get(r.name.as_str()) == Some(&true) {
            lines.push("report stale".into());
            fill = "#fff9c4";
        }
        let _ = writeln!(
            out,
            "    {} [label={}, fillcolor=\"{fill}\"];",
            quote(&r.name),
            label(&lines)
        );
    }
    let _ = writeln!(out, "  }}");
    if !c.externals.is_empty() {
        let mut externals: Vec<_> = c.externals.iter().collect();
        externals.sort_by(|a, b| a.name.cmp(&b.name));
        let _ = writeln!(out, "  subgraph cluster_external {{");
        let _ = writeln!(
            out,
            "    label=\"external peers\"; style=dashed; color=\"#795548\";"
        );
        for p in externals {
            let lines = vec![
                p.name.clone(),
                format!("allowed {}", join(&p.allowed_ips)),
                match p.endpoint {
                    Some(e) => format!("endpoint {e}"),
                    None => "endpoint learned".into(),
                },
                format!("key {}", p.public_key.fingerprint()),
            ];
            let _ = writeln!(
                out,
                "    {} [label={}, shape=component, fillcolor=\"#efebe9\"];",
                quote(&p.name),
                label(&lines)
            );
        }
        let _ = writeln!(out, "  }}");
    }
    // Node pairs: the worse of the two ends' reports.
    for (i, a) in records.iter().enumerate() {
        for b in &records[i + 1..] {
            let ends = [
                reported(links, &a.name, &b.name),
                reported(links, &b.name, &a.name),
            ];
            let edge = ends
                .iter()
                .flatten()
                .copied()
                .max_by_key(|e| e.rank())
                .unwrap_or(Edge::NoReport);
            let one_sided = ends.iter().any(Option::is_none) && edge != Edge::NoReport;
            let text = if one_sided {
                format!("{} (one end)", edge.label())
            } else {
                edge.label().to_string()
            };
            let _ = writeln!(
                out,
                "  {} -- {} [label={}, {}];",
                quote(&a.name),
                quote(&b.name),
                quote(&text),
                edge.attrs()
            );
        }
    }
    // External peers: each node's own report of its link to them.
    let mut externals: Vec<_> = c.externals.iter().map(|p| p.name.as_str()).collect();
    externals.sort();
    for r in &records {
        for p in &externals {
            if let Some(edge) = reported(links, &r.name, p) {
                let _ = writeln!(
                    out,
                    "  {} -- {} [label={}, {}];",
                    quote(&r.name),
                    quote(p),
                    quote(edge.label()),
                    edge.attrs()
                );
            }
        }
    }
    let _ = writeln!(out, "  subgraph cluster_legend {{");
    let _ = writeln!(
        out,
        "    label=\"legend\"; style=dotted; color=\"#9e9e9e\"; fontsize=9;"
    );
    let _ = writeln!(
        out,
        "    node [shape=point, width=0.05, label=\"\", style=invis];"
    );
    for (i, e) in [
        Edge::Up,
        Edge::Idle,
        Edge::Down(LinkState::NoHandshake),
        Edge::NoReport,
    ]
    .iter()
    .enumerate()
    {
        let _ = writeln!(
            out,
            "    legend_{i}a -- legend_{i}b [label={}, {}];",
            quote(e.label()),
            e.attrs()
        );
    }
    let _ = writeln!(out, "  }}");
    let _ = writeln!(out, "}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::tests::rec;
    use crate::status::view;
    use weft_core::external::ExternalPeer;
    use weft_core::health::{HealthReport, LinkHealth};
    use weft_core::PrivateKey;

    fn report(node: &str, links: &[(&str, LinkState)], at: u64) -> HealthReport {
        HealthReport {
            node: node.into(),
            reported_at: at,
            interval_secs: 5,
            links: links
                .iter()
                .map(|(p, s)| LinkHealth {
                    peer: (*p).into(),
                    state: *s,
                    handshake_age_secs: None,
                    psk_generation: None,
                    key_pairs: 1,
                    queued: 0,
                    endpoint: None,
                    endpoint_source: weft_core::peer::EndpointSource::None,
                    relay: None,
                })
                .collect(),
        }
    }

    #[test]
    fn edges_take_the_worse_end_and_output_is_sorted() {
        let c = Contents {
            records: vec![rec("c", 3, 1), rec("a", 1, 1), rec("b", 2, 1)],
            health: Some(vec![
                report(
                    "a",
                    &[
                        ("b", LinkState::Up),
                        ("c", LinkState::Up),
                        ("laptop", LinkState::Up),
                    ],
                    1000,
                ),
                report(
                    "b",
                    &[("a", LinkState::Up), ("c", LinkState::Unanswered)],
                    1000,
                ),
                // c's report is old: stale.
                report("c", &[("a", LinkState::Up), ("b", LinkState::Up)], 900),
            ]),
            externals: vec![ExternalPeer {
                schema: 1,
                name: "laptop".into(),
                public_key: PrivateKey::generate().public_key(),
                allowed_ips: vec!["10.99.0.1/32".parse().expect("cidr")],
                endpoint: None,
                created_at: 0,
                config_keys: Default::default(),
                config_printed_at: 0,
            }],
            ..Contents::default()
        };
        let s = view("dir:/x".into(), &c, 1001);
        let d = dot(&c, &s);
        assert!(d.contains("\"a\" -- \"b\" [label=\"up\""), "{d}");
        assert!(d.contains("\"a\" -- \"c\" [label=\"up (one end)\""), "{d}");
        assert!(
            d.contains("\"b\" -- \"c\" [label=\"unanswered (one end)\""),
            "{d}"
        );
        assert!(d.contains("\"a\" -- \"laptop\" [label=\"up\""), "{d}");
        assert!(d.contains("pod 10.42.1.0/24\\nendpoint 198.18.0.11:51820\\nkey "));
        assert!(d.contains("report stale"), "{d}");
        let ext = d
            .find("subgraph cluster_external")
            .expect("external cluster");
        assert!(d[ext..].contains("style=dashed"));
        assert!(d.find("\"a\" [").expect("a") < d.find("\"b\" [").expect("b"));
        // The same contents in another order give the same document.
        let mut c2 = c.clone();
        c2.records.reverse();
        assert_eq!(dot(&c2, &view("dir:/x".into(), &c2, 1001)), d);
        // Without reports every pair is dashed "no report".
        let c3 = Contents {
            health: Some(vec![]),
            ..c.clone()
        };
        let d3 = dot(&c3, &view("dir:/x".into(), &c3, 1001));
        assert!(d3.contains("\"a\" -- \"b\" [label=\"no report\""), "{d3}");
        assert!(d3.contains("style=dashed"));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
        assert_eq!(label(&["x\"".into(), "y".into()]), "\"x\\\"\\ny\"");
    }
}
