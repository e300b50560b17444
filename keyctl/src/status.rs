//! `keyctl status`: every node with its key fingerprint, age and generation, its rotation state
//! (a pending `rotations/NAME` request, or a `nextPublicKey` in its record) and its revocation
//! (`revocations/NAME`); then every external peer (`peers/NAME`) with its key fingerprint,
//! allowed IPs, whether the config last printed for it is stale, and why meshd refuses it, if it
//! does. Only public keys appear.
//!
//! [`view`] is pure (registry contents and the time in, rows out); [`render`] makes the table.

use crate::peer::{config_nodes, staleness, Staleness};
use ipnet::IpNet;
use serde::Serialize;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use weft_core::control::{PskGeneration, Revocation, RotationRequest};
use weft_core::external::{check_against, ExternalError, ExternalPeer, Owner};
use weft_core::health::{HealthReport, LinkState};
use weft_core::{NodeRecord, PublicKey};

/// What the registry holds, as read by keyctl.
#[derive(Debug, Clone, Default)]
pub struct Contents {
    pub records: Vec<NodeRecord>,
    pub rotations: Vec<RotationRequest>,
    pub revocations: Vec<Revocation>,
    /// `psk/cluster`, if `keyctl psk rotate` ever ran.
    pub psk: Option<PskGeneration>,
    /// The nodes' link health reports (read only for `--peers`; `None`: not asked for).
    pub health: Option<Vec<HealthReport>>,
    pub externals: Vec<ExternalPeer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The registry, as meshd's logs name it (never with credentials).
    pub registry: String,
    /// Unix seconds when the registry was read.
    pub time: u64,
    /// The cluster PSK generation nodes are asked to use (0 before any `keyctl psk rotate`).
    pub psk_generation: u64,
    pub nodes: Vec<NodeStatus>,
    pub external_peers: Vec<ExternalStatus>,
    /// With `--peers`: every link as each node reports it, and nodes with no report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub links: Option<Vec<LinkRow>>,
}

/// One link as one end reports it (`peer` and `state` absent: the node reported nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkRow {
    pub node: String,
    pub peer: Option<String>,
    pub state: Option<LinkState>,
    pub handshake_age_secs: Option<u64>,
    pub psk_generation: Option<u64>,
    pub key_pairs: Option<u32>,
    /// Seconds since the node made the report; null: no report.
    pub report_age_secs: Option<u64>,
    /// The report is older than three of the node's reporting intervals (the node may be down).
    pub stale: bool,
}

/// The link rows: each report's links, and a row for every node with a record but no report.
fn link_rows(records: &[NodeRecord], health: &[HealthReport], now: u64) -> Vec<LinkRow> {
    let mut rows = Vec::new();
    let names: BTreeSet<&str> = records
        .iter()
        .map(|r| r.name.as_str())
        .chain(health.iter().map(|h| h.node.as_str()))
        .collect();
    for name in names {
        match health.iter().find(|h| h.node == name) {
            None => rows.push(LinkRow {
                node: name.to_string(),
                peer: None,
                state: None,
                handshake_age_secs: None,
                psk_generation: None,
                key_pairs: None,
                report_age_secs: None,
                stale: false,
            }),
            Some(h) => {
                let age = now.saturating_sub(h.reported_at);
                for l in &h.links {
                    rows.push(LinkRow {
                        node: name.to_string(),
                        peer: Some(l.peer.clone()),
                        state: Some(l.state),
                        // The age when the report was made plus the report's own age.
                        handshake_age_secs: l.handshake_age_secs.map(|a| a + age),
                        psk_generation: l.psk_generation,
                        key_pairs: Some(l.key_pairs),
                        report_age_secs: Some(age),
                        stale: h.is_stale(now),
                    });
                }
            }
        }
    }
    rows
}

/// One external standard WireGuard peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalStatus {
    pub name: String,
    pub public_key: PublicKey,
    pub fingerprint: String,
    pub allowed_ips: Vec<IpNet>,
    /// Null: nodes learn it from the peer's first handshake.
    pub endpoint: Option<SocketAddr>,
    pub created_at: u64,
    /// When the config was last printed (`keyctl peer add` / `peer config`); 0: never.
    pub config_printed_at: u64,
    /// `stale`, `changedKeys`, `newNodes`: whether that config still reaches every node.
    #[serde(flatten)]
    pub config: Staleness,
    pub revocation: Option<RevocationStatus>,
    /// Why meshd refuses this peer (revoked, or a conflict with a node or an earlier peer);
    /// null when it takes it.
    pub refused: Option<String>,
}

/// One node: from its record, its rotation request and its revocation (any may be missing;
/// a revocation for a node without a record is listed too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    pub has_record: bool,
    pub public_key: Option<PublicKey>,
    /// The first 8 base64 characters of the public key.
    pub fingerprint: Option<String>,
    pub key_generation: Option<u64>,
    /// Unix seconds when the key was made; 0 when the node does not know.
    pub key_created_at: Option<u64>,
    /// `time - keyCreatedAt`; null when unknown.
    pub key_age_secs: Option<u64>,
    /// The cluster PSK generation the node publishes (null: it holds no cluster secret).
    pub psk_generation: Option<u64>,
    pub next_public_key: Option<PublicKey>,
    pub rotation: RotationStatus,
    pub revocation: Option<RevocationStatus>,
    /// Whether meshd takes this record as a peer as far as revocations go (null: no record).
    pub admitted: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RotationState {
    /// No rotation pending.
    Idle,
    /// A rotation request names a generation the record has not reached, and the node has not
    /// published its next key yet.
    Requested,
    /// The record names a `nextPublicKey`: the node is moving to it.
    Rotating,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationStatus {
    pub state: RotationState,
    /// The generation of the `rotations/NAME` request, if one exists (reached or not).
    pub requested_generation: Option<u64>,
    pub requested_at: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevocationState {
    /// Refused, and no key approved yet.
    Revoked,
    /// A key was approved (`keyctl readmit`) but the node does not publish it (yet).
    AwaitingApprovedKey,
    /// The node publishes the approved key: it is a peer again.
    Readmitted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RevocationStatus {
    pub state: RevocationState,
    pub revoked_keys: Vec<PublicKey>,
    pub approved_key: Option<PublicKey>,
    /// The approved successor while a readmitted node rotates.
    pub approved_next_key: Option<PublicKey>,
    pub revoked_at: u64,
}

/// Builds the status from the registry contents at unix time `now`.
pub fn view(registry: String, c: &Contents, now: u64) -> Status {
    let names: BTreeSet<&str> = c
        .records
        .iter()
        .map(|r| r.name.as_str())
        .chain(c.rotations.iter().map(|r| r.node.as_str()))
        .chain(c.revocations.iter().map(|r| r.node.as_str()))
        .collect();
    let nodes = names
        .into_iter()
        .filter(|name| {
            // A revocation of an external peer's name belongs to that peer's row.
            c.records.iter().any(|r| r.name == *name)
                || c.rotations.iter().any(|r| r.node == *name)
                || !c.externals.iter().any(|p| p.name == *name)
        })
        .map(|name| {
            let rec = c.records.iter().find(|r| r.name == name);
            let req = c.rotations.iter().find(|r| r.node == name);
            let rev = c.revocations.iter().find(|r| r.node == name);
            node_status(name, rec, req, rev, now)
        })
        .collect();
    Status {
        registry,
        time: now,
        psk_generation: c.psk.as_ref().map_or(0, |p| p.generation),
        nodes,
        links: c.health.as_ref().map(|h| link_rows(&c.records, h, now)),
        external_peers: external_view(c),
    }
}

/// The external peers, in name order, as meshd sees them: each checked against the nodes a
/// config names and the peers before it (node records take precedence).
pub fn external_view(c: &Contents) -> Vec<ExternalStatus> {
    let nodes = config_nodes(c.records.clone(), &c.revocations);
    let mut externals = c.externals.clone();
    externals.sort_by(|a, b| a.name.cmp(&b.name));
    let mut taken: Vec<ExternalPeer> = Vec::new();
    let mut out = Vec::new();
    for p in externals {
        let rev = c.revocations.iter().find(|r| r.node == p.name);
        let refused = match rev.map(|r| r.verdict(&p.public_key)) {
            Some(Err(why)) => Some(why.to_string()),
            _ => {
                let verdict = if c.records.iter().any(|r| r.name == p.name) {
                    Err(ExternalError::NameTaken {
                        name: p.name.clone(),
                        owner: Owner::Node(p.name.clone()),
                    })
                } else {
                    check_against(&p, &nodes, &taken)
                };
                verdict.err().map(|e| e.to_string())
            }
        };
        let revocation = rev.map(|v| RevocationStatus {
            state: if v.admits(&p.public_key) {
                RevocationState::Readmitted
            } else if v.approved_key.is_some() {
                RevocationState::AwaitingApprovedKey
            } else {
                RevocationState::Revoked
            },
            revoked_keys: v.revoked_keys.clone(),
            approved_key: v.approved_key,
            approved_next_key: None,
            revoked_at: v.revoked_at,
        });
        out.push(ExternalStatus {
            name: p.name.clone(),
            public_key: p.public_key,
            fingerprint: p.public_key.fingerprint(),
            allowed_ips: p.allowed_ips.clone(),
            endpoint: p.endpoint,
            created_at: p.created_at,
            config_printed_at: p.config_printed_at,
            config: staleness(&p, &nodes),
            revocation,
            refused: refused.clone(),
        });
        if refused.is_none() {
            taken.push(p);
        }
    }
    out
}

/// The external peers' table (also `keyctl peer list`).
pub fn render_external(peers: &[ExternalStatus]) -> String {
    let mut rows = vec![[
        "EXTERNAL PEER".to_string(),
        "KEY".into(),
        "ALLOWED IPS".into(),
        "ENDPOINT".into(),
        "CONFIG".into(),
        "STATE".into(),
    ]];
    for p in peers {
        rows.push([
            p.name.clone(),
            p.fingerprint.clone(),
            p.allowed_ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            p.endpoint
                .map(|e| e.to_string())
                .unwrap_or_else(|| "(learnt)".into()),
            p.config.describe(p.config_printed_at > 0),
            match (&p.refused, &p.revocation) {
                (Some(why), _) if why.starts_with("revoked") => "REVOKED".to_string(),
                (Some(why), _) => format!("refused: {why}"),
                (None, Some(_)) => "readmitted (approved key)".to_string(),
                (None, None) => "-".to_string(),
            },
        ]);
    }
    table(&rows)
}

/// Left-aligned columns, two spaces apart, no trailing blanks.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(widths).enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn node_status(
    name: &str,
    rec: Option<&NodeRecord>,
    req: Option<&RotationRequest>,
    rev: Option<&Revocation>,
    now: u64,
) -> NodeStatus {
    let state = match rec {
        Some(r) if r.next_public_key.is_some() => RotationState::Rotating,
        Some(r) if req.is_some_and(|q| q.generation > r.key_generation) => RotationState::Requested,
        // A request for a node without a record waits for the node.
        None if req.is_some() => RotationState::Requested,
        _ => RotationState::Idle,
    };
    let revocation = rev.map(|v| RevocationStatus {
        state: match (rec, v.approved_key) {
            (Some(r), _) if v.admits(&r.public_key) => RevocationState::Readmitted,
            (_, Some(_)) => RevocationState::AwaitingApprovedKey,
            (_, None) => RevocationState::Revoked,
        },
        revoked_keys: v.revoked_keys.clone(),
        approved_key: v.approved_key,
        approved_next_key: v.approved_next_key,
        revoked_at: v.revoked_at,
    });
    NodeStatus {
        name: name.to_string(),
        has_record: rec.is_some(),
        public_key: rec.map(|r| r.public_key),
        fingerprint: rec.map(|r| r.public_key.fingerprint()),
        key_generation: rec.map(|r| r.key_generation),
        key_created_at: rec.map(|r| r.key_created_at),
        psk_generation: rec.and_then(|r| r.psk_generation),
        key_age_secs: rec
            .filter(|r| r.key_created_at > 0)
            .map(|r| now.saturating_sub(r.key_created_at)),
        next_public_key: rec.and_then(|r| r.next_public_key),
        rotation: RotationStatus {
            state,
            requested_generation: req.map(|q| q.generation),
            requested_at: req.map(|q| q.requested_at),
        },
        revocation,
        admitted: rec.map(|r| match rev {
            None => true,
            Some(v) => v.admits(&r.public_key),
        }),
    }
}

/// The `--peers` table: one row per link as each end reports it.
fn render_links(links: &[LinkRow]) -> String {
    let mut rows = vec![[
        "NODE".to_string(),
        "PEER".into(),
        "LINK".into(),
        "HANDSHAKE".into(),
        "PSK".into(),
        "PAIRS".into(),
        "REPORTED".into(),
    ]];
    let dash = || "-".to_string();
    for l in links {
        let state = match l.state {
            None => "(no report)".to_string(),
            Some(LinkState::Up) => "up".into(),
            Some(LinkState::Idle) => "idle".into(),
            Some(LinkState::NoHandshake) => "NO HANDSHAKE".into(),
            Some(LinkState::Unanswered) => "UNANSWERED".into(),
        };
        rows.push([
            l.node.clone(),
            l.peer.clone().unwrap_or_else(dash),
            state,
            l.handshake_age_secs
                .map(|a| format!("{} ago", human_secs(a)))
                .unwrap_or_else(dash),
            l.psk_generation.map(|g| g.to_string()).unwrap_or_else(dash),
            l.key_pairs.map(|p| p.to_string()).unwrap_or_else(dash),
            match (l.report_age_secs, l.stale) {
                (None, _) => dash(),
                (Some(a), false) => format!("{} ago", human_secs(a)),
                (Some(a), true) => format!("{} ago (STALE)", human_secs(a)),
            },
        ]);
    }
    let mut out = table(&rows);
    let n = |f: &dyn Fn(&LinkRow) -> bool| links.iter().filter(|l| f(l)).count();
    out.push_str(&format!(
        "\n{} links up, {} idle, {} without a handshake; {} nodes without a report, {} stale\n",
        n(&|l| l.state == Some(LinkState::Up)),
        n(&|l| l.state == Some(LinkState::Idle)),
        n(&|l| l.state == Some(LinkState::NoHandshake)),
        n(&|l| l.state.is_none()),
        links
            .iter()
            .filter(|l| l.stale)
            .map(|l| &l.node)
            .collect::<BTreeSet<_>>()
            .len(),
    ));
    out
}

/// A duration for people: `45s`, `12m`, `3h12m`, `5d3h`.
pub fn human_secs(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// The table for people.
pub fn render(s: &Status) -> String {
    let mut rows = vec![[
        "NODE".to_string(),
        "KEY".into(),
        "GEN".into(),
        "AGE".into(),
        "PSK".into(),
        "ROTATION".into(),
        "REVOCATION".into(),
    ]];
    for n in &s.nodes {
        let dash = || "-".to_string();
        let rotation = match n.rotation.state {
            RotationState::Idle => dash(),
            RotationState::Requested => format!(
                "requested gen {}",
                n.rotation.requested_generation.unwrap_or_default()
            ),
            RotationState::Rotating => format!(
                "rotating to {}",
                n.next_public_key
                    .map(|k| k.fingerprint())
                    .unwrap_or_default()
            ),
        };
        let mut revocation = match &n.revocation {
            None => dash(),
            Some(r) => match (r.state, r.approved_key) {
                (RevocationState::Revoked, _) => "REVOKED".to_string(),
                (RevocationState::AwaitingApprovedKey, Some(k)) => {
                    format!("REVOKED, waiting for approved key {}", k.fingerprint())
                }
                (RevocationState::AwaitingApprovedKey, None) => "REVOKED".to_string(),
                (RevocationState::Readmitted, _) => "readmitted (approved key)".to_string(),
            },
        };
        if !n.has_record {
            revocation = if revocation == "-" {
                "(no record)".into()
            } else {
                format!("{revocation} (no record)")
            };
        }
        rows.push([
            n.name.clone(),
            n.fingerprint.clone().unwrap_or_else(dash),
            n.key_generation.map(|g| g.to_string()).unwrap_or_else(dash),
            match (n.has_record, n.key_age_secs) {
                (false, _) => dash(),
                (true, None) => "unknown".into(),
                (true, Some(a)) => human_secs(a),
            },
            match (n.has_record, n.psk_generation) {
                (false, _) => dash(),
                (true, None) => "none".into(),
                (true, Some(g)) if g < s.psk_generation => format!("{g} (behind)"),
                (true, Some(g)) => g.to_string(),
            },
            rotation,
            revocation,
        ]);
    }
    let mut out = table(&rows);
    if !s.external_peers.is_empty() {
        out.push('\n');
        out.push_str(&render_external(&s.external_peers));
    }
    let count = |f: &dyn Fn(&NodeStatus) -> bool| s.nodes.iter().filter(|n| f(n)).count();
    out.push_str(&format!(
        "\n{} nodes with a record, {} rotating or requested, {} refused by a revocation\n",
        count(&|n| n.has_record),
        count(&|n| n.rotation.state != RotationState::Idle),
        count(&|n| n.admitted == Some(false)),
    ));
    if let Some(links) = &s.links {
        out.push('\n');
        out.push_str(&render_links(links));
    }
    let psk_on = count(&|n| n.psk_generation.is_some());
    if psk_on > 0 || s.psk_generation > 0 {
        out.push_str(&format!(
            "cluster PSK generation {}: {} nodes on it, {} behind, {} without the cluster secret\n",
            s.psk_generation,
            count(&|n| n.psk_generation.is_some_and(|g| g >= s.psk_generation)),
            count(&|n| n.psk_generation.is_some_and(|g| g < s.psk_generation)),
            count(&|n| n.has_record && n.psk_generation.is_none()),
        ));
    }
    if !s.external_peers.is_empty() {
        let ext =
            |f: &dyn Fn(&ExternalStatus) -> bool| s.external_peers.iter().filter(|p| f(p)).count();
        out.push_str(&format!(
            "{} external peers, {} with a stale config, {} refused\n",
            s.external_peers.len(),
            ext(&|p| p.config.stale),
            ext(&|p| p.refused.is_some()),
        ));
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use weft_core::record::SCHEMA_VERSION;
    use weft_core::PrivateKey;

    pub fn rec(name: &str, i: u8, generation: u64) -> NodeRecord {
        NodeRecord {
            schema: SCHEMA_VERSION,
            name: name.into(),
            public_key: PrivateKey::generate().public_key(),
            endpoints: vec![format!("198.18.0.{}:51820", 10 + i).parse().expect("ep")],
            private_endpoints: Vec::new(),
            location: None,
            relay: false,
            pod_cidrs: vec![format!("10.42.{i}.0/24").parse().expect("cidr")],
            key_generation: generation,
            next_public_key: None,
            key_created_at: 1_000,
            psk_generation: None,
        }
    }

    #[test]
    fn states_and_table() {
        let mut a = rec("a", 1, 1);
        a.psk_generation = Some(2);
        let mut b = rec("b", 2, 3);
        b.psk_generation = Some(1);
        b.next_public_key = Some(PrivateKey::generate().public_key());
        let mut c = rec("c", 3, 2);
        c.key_created_at = 0;
        let d = rec("d", 4, 5);
        let approved = PrivateKey::generate().public_key();
        let contents = Contents {
            records: vec![a.clone(), b.clone(), c.clone(), d.clone()],
            rotations: vec![
                // c: pending; d: already reached.
                RotationRequest {
                    node: "c".into(),
                    generation: 3,
                    requested_at: 900,
                },
                RotationRequest {
                    node: "d".into(),
                    generation: 5,
                    requested_at: 800,
                },
            ],
            revocations: vec![
                Revocation {
                    node: "c".into(),
                    revoked_keys: vec![c.public_key],
                    approved_key: None,
                    approved_next_key: None,
                    revoked_at: 950,
                },
                Revocation {
                    node: "d".into(),
                    revoked_keys: vec![PrivateKey::generate().public_key()],
                    approved_key: Some(d.public_key),
                    approved_next_key: None,
                    revoked_at: 950,
                },
                Revocation {
                    node: "ghost".into(),
                    revoked_keys: vec![],
                    approved_key: Some(approved),
                    approved_next_key: None,
                    revoked_at: 960,
                },
            ],
            psk: Some(PskGeneration {
                generation: 2,
                requested_at: 990,
            }),
            health: None,
            externals: Vec::new(),
        };
        let s = view("dir:/x".into(), &contents, 4_700);
        let names: Vec<&str> = s.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d", "ghost"]);
        let [na, nb, nc, nd, ng] = &s.nodes[..] else {
            panic!("five rows")
        };
        assert_eq!(na.rotation.state, RotationState::Idle);
        assert_eq!(na.key_age_secs, Some(3_700));
        assert_eq!(na.admitted, Some(true));
        assert_eq!(nb.rotation.state, RotationState::Rotating);
        assert_eq!(nc.rotation.state, RotationState::Requested);
        assert_eq!(nc.key_age_secs, None);
        assert_eq!(
            nc.revocation.as_ref().map(|r| r.state),
            Some(RevocationState::Revoked)
        );
        assert_eq!(nc.admitted, Some(false));
        assert_eq!(nd.rotation.state, RotationState::Idle);
        assert_eq!(nd.rotation.requested_generation, Some(5));
        assert_eq!(
            nd.revocation.as_ref().map(|r| r.state),
            Some(RevocationState::Readmitted)
        );
        assert_eq!(nd.admitted, Some(true));
        assert!(!ng.has_record);
        assert_eq!(ng.admitted, None);
        assert_eq!(
            ng.revocation.as_ref().map(|r| r.state),
            Some(RevocationState::AwaitingApprovedKey)
        );

        let json = serde_json::to_value(&s).expect("json");
        assert_eq!(json["nodes"][1]["rotation"]["state"], "rotating");
        assert_eq!(json["nodes"][2]["revocation"]["state"], "revoked");
        assert_eq!(
            json["nodes"][4]["revocation"]["state"],
            "awaiting-approved-key"
        );
        assert_eq!(
            json["nodes"][0]["publicKey"].as_str(),
            Some(a.public_key.to_base64().as_str())
        );

        let table = render(&s);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("NODE"), "{table}");
        assert!(lines[1].contains(&a.public_key.fingerprint()), "{table}");
        assert!(lines[1].contains("1h1m"), "{table}");
        assert!(lines[2].contains("rotating to"), "{table}");
        assert!(
            lines[3].contains("requested gen 3") && lines[3].contains("REVOKED"),
            "{table}"
        );
        assert!(lines[3].contains("unknown"), "{table}");
        assert!(lines[4].contains("readmitted"), "{table}");
        assert!(
            lines[5].contains("waiting for approved key") && lines[5].contains("(no record)"),
            "{table}"
        );
        assert!(
            table.contains("4 nodes with a record, 2 rotating or requested, 1 refused"),
            "{table}"
        );
        assert!(lines[2].contains("1 (behind)"), "{table}");
        assert!(lines[3].contains("none"), "{table}");
        assert!(
            table.contains(
                "cluster PSK generation 2: 1 nodes on it, 1 behind, 2 without the cluster secret"
            ),
            "{table}"
        );
        assert_eq!(json["pskGeneration"], 2);
        assert_eq!(json["nodes"][0]["pskGeneration"], 2);
    }

    #[test]
    fn links_from_health_reports() {
        use weft_core::health::LinkHealth;
        let records = vec![rec("a", 1, 1), rec("b", 2, 1), rec("c", 3, 1)];
        let link = |peer: &str, state, age| LinkHealth {
            peer: peer.into(),
            state,
            handshake_age_secs: age,
            psk_generation: Some(1),
            key_pairs: 1,
            queued: 0,
            endpoint: None,
            endpoint_source: weft_core::peer::EndpointSource::None,
            relay: None,
        };
        let health = vec![
            HealthReport {
                node: "a".into(),
                reported_at: 990,
                interval_secs: 30,
                links: vec![
                    link("b", LinkState::Up, Some(5)),
                    link("c", LinkState::NoHandshake, None),
                ],
            },
            HealthReport {
                node: "b".into(),
                reported_at: 800,
                interval_secs: 30,
                links: vec![link("a", LinkState::Up, Some(1))],
            },
        ];
        let contents = Contents {
            records,
            health: Some(health),
            ..Contents::default()
        };
        let s = view("dir:/x".into(), &contents, 1_000);
        let links = s.links.as_ref().expect("links");
        assert_eq!(links.len(), 4);
        assert_eq!(
            links[0].handshake_age_secs,
            Some(15),
            "age at report + report age"
        );
        assert!(!links[0].stale);
        assert!(links[2].stale, "b reported 200 s ago with a 30 s interval");
        assert_eq!(links[3].node, "c");
        assert_eq!(links[3].state, None);
        let table = render(&s);
        assert!(table.contains("NO HANDSHAKE"), "{table}");
        assert!(table.contains("(STALE)"), "{table}");
        assert!(table.contains("(no report)"), "{table}");
        assert!(
            table.contains(
                "2 links up, 0 idle, 1 without a handshake; 1 nodes without a report, 1 stale"
            ),
            "{table}"
        );
        let json = serde_json::to_value(&s).expect("json");
        assert_eq!(json["links"][1]["state"], "no-handshake");
        // Without --peers there is no links section at all.
        let plain = view("dir:/x".into(), &Contents::default(), 1_000);
        assert!(serde_json::to_value(&plain)
            .expect("json")
            .get("links")
            .is_none());
    }

    #[test]
    fn external_peers_stale_refused_and_revoked() {
        use std::collections::BTreeMap;
        let (a, b) = (rec("node-a", 1, 1), rec("node-b", 2, 1));
        let ext = |name: &str, cidr: &str| ExternalPeer {
            schema: 1,
            name: name.into(),
            public_key: PrivateKey::generate().public_key(),
            allowed_ips: vec![cidr.parse().expect("cidr")],
            endpoint: None,
            created_at: 10,
            config_keys: BTreeMap::from([
                ("node-a".to_string(), a.public_key),
                ("node-b".to_string(), b.public_key),
            ]),
            config_printed_at: 20,
        };
        let laptop = ext("laptop", "10.99.0.1/32");
        let thief = ext("thief", "10.42.2.0/28");
        let gone = ext("gone", "10.99.1.0/24");
        // node-b rotates and retires the key laptop's config names.
        let mut b2 = b.clone();
        b2.public_key = PrivateKey::generate().public_key();
        let contents = Contents {
            records: vec![a.clone(), b2.clone()],
            rotations: vec![],
            revocations: vec![Revocation {
                node: "gone".into(),
                revoked_keys: vec![gone.public_key],
                approved_key: None,
                approved_next_key: None,
                revoked_at: 30,
            }],
            externals: vec![thief, laptop.clone(), gone],
            ..Contents::default()
        };
        let s = view("dir:/x".into(), &contents, 100);
        // The revocation of an external peer's name is shown on the peer, not as a node.
        assert_eq!(
            s.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            ["node-a", "node-b"]
        );
        let names: Vec<&str> = s.external_peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["gone", "laptop", "thief"]);
        let [pg, pl, pt] = &s.external_peers[..] else {
            panic!("three peers")
        };
        assert!(pl.config.stale && pl.refused.is_none());
        assert_eq!(pl.config.changed_keys[0].node, "node-b");
        assert!(
            pt.refused
                .as_deref()
                .is_some_and(|r| r.contains("node node-b")),
            "{pt:?}"
        );
        assert!(pg
            .refused
            .as_deref()
            .is_some_and(|r| r.starts_with("revoked")));
        let json = serde_json::to_value(&s).expect("json");
        assert_eq!(json["externalPeers"][1]["stale"], true);
        assert_eq!(json["externalPeers"][1]["changedKeys"][0]["node"], "node-b");
        assert_eq!(json["externalPeers"][1]["allowedIps"][0], "10.99.0.1/32");
        assert_eq!(
            json["externalPeers"][1]["fingerprint"].as_str(),
            Some(laptop.public_key.fingerprint().as_str())
        );
        let table = render(&s);
        let line = table
            .lines()
            .find(|l| l.starts_with("laptop"))
            .unwrap_or_default();
        assert!(
            line.contains(&laptop.public_key.fingerprint())
                && line.contains("10.99.0.1/32")
                && line.contains("(learnt)")
                && line.contains("STALE: node-b key changed"),
            "{table}"
        );
        assert!(table.contains("REVOKED"), "{table}");
        assert!(
            table.contains("3 external peers, 3 with a stale config, 2 refused"),
            "{table}"
        );
        // Mid-rotation (next key announced, old key still current): not stale.
        let mut b_rot = b.clone();
        b_rot.next_public_key = Some(b2.public_key);
        let s = view(
            "dir:/x".into(),
            &Contents {
                records: vec![a, b_rot],
                externals: vec![laptop],
                ..Contents::default()
            },
            100,
        );
        assert!(!s.external_peers[0].config.stale);
        assert!(render(&s).contains("up to date"));
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_secs(0), "0s");
        assert_eq!(human_secs(59), "59s");
        assert_eq!(human_secs(61), "1m");
        assert_eq!(human_secs(3_661), "1h1m");
        assert_eq!(human_secs(90_000), "1d1h");
    }
}
