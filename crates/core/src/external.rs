//! External standard WireGuard peers (`peers/NAME` in the registry, written by `keyctl peer`): a
//! laptop or a VM outside the cluster that makes its own key and runs plain WireGuard.
//!
//! In: JSON bytes from the registry, and the node records and other external peers to check a
//! peer against. Out: a checked [`ExternalPeer`] or an error naming the field at fault
//! ([`ExternalError`]); the [`PeerConfig`] every node adds for it; the conflicts with nodes and
//! other external peers ([`check_against`]), which `keyctl peer add` refuses and meshd refuses
//! too ([`crate::reconcile::desired_peer_set`]: node records take precedence).
//!
//! Only public keys are stored. An external peer has no preshared key: a standard peer cannot
//! derive the cluster's pairwise keys, so its pairs stay PSK-less.

use crate::keys::PublicKey;
use crate::peer::{PeerConfig, PeerKind, PeerPsk};
use crate::record::{check_name, NodeRecord};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Schema version written by this build.
pub const SCHEMA_VERSION: u32 = 1;
/// Most ranges one external peer may route.
pub const MAX_ALLOWED_IPS: usize = 64;

/// `peers/NAME`: one external standard WireGuard peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalPeer {
    pub schema: u32,
    pub name: String,
    /// The peer's own public key (its private key never reaches weft).
    pub public_key: PublicKey,
    /// The addresses the peer sends from and receives at; no node's pod range may overlap them.
    pub allowed_ips: Vec<IpNet>,
    /// Where nodes reach it; without one, each node learns it from the peer's first
    /// authenticated handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
    /// Unix seconds when `keyctl peer add` registered it.
    #[serde(default)]
    pub created_at: u64,
    /// The node keys (node name -> public key) of the config last printed for the peer by
    /// `keyctl peer add` / `keyctl peer config`: a node whose key is no longer this one cannot be
    /// reached with that config (`keyctl status` flags it stale).
    #[serde(default)]
    pub config_keys: BTreeMap<String, PublicKey>,
    /// Unix seconds when that config was printed (0: never).
    #[serde(default)]
    pub config_printed_at: u64,
}

/// Who holds something an external peer wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Node(String),
    Peer(String),
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Node(n) => write!(f, "node {n}"),
            Owner::Peer(n) => write!(f, "external peer {n}"),
        }
    }
}

/// Why an external peer record was refused. Each variant names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExternalError {
    #[error("not valid JSON for an external peer record: {0}")]
    Json(String),
    #[error("field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("field `allowedIps`: {cidr} overlaps {other_cidr} of {owner}")]
    Overlap {
        cidr: IpNet,
        owner: Owner,
        other_cidr: IpNet,
    },
    #[error("field `allowedIps`: {cidr} contains the underlay endpoint {endpoint} of {owner}")]
    ContainsEndpoint {
        cidr: IpNet,
        owner: Owner,
        endpoint: SocketAddr,
    },
    #[error("field `endpoint`: {endpoint} lies inside {cidr}, routed to {owner}")]
    EndpointInside {
        endpoint: SocketAddr,
        owner: Owner,
        cidr: IpNet,
    },
    #[error("field `name`: {name:?} is the name of {owner}")]
    NameTaken { name: String, owner: Owner },
    #[error("field `publicKey`: {key} is the key of {owner}")]
    KeyTaken { key: String, owner: Owner },
}

impl ExternalError {
    /// The record field at fault (`name`, `publicKey`, `allowedIps`, `endpoint`, ...), if one.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            ExternalError::Json(_) => None,
            ExternalError::Field { field, .. } => Some(field),
            ExternalError::Overlap { .. } | ExternalError::ContainsEndpoint { .. } => {
                Some("allowedIps")
            }
            ExternalError::EndpointInside { .. } => Some("endpoint"),
            ExternalError::NameTaken { .. } => Some("name"),
            ExternalError::KeyTaken { .. } => Some("publicKey"),
        }
    }
}

fn field(field: &'static str, reason: impl Into<String>) -> ExternalError {
    ExternalError::Field {
        field,
        reason: reason.into(),
    }
}

/// Parses a list of CIDRs (`10.99.0.1/32`, or a bare address as its host route) as given to
/// `keyctl peer add --allowed-ips`, comma-separated.
pub fn parse_allowed_ips(s: &str) -> Result<Vec<IpNet>, ExternalError> {
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(field("allowedIps", format!("{s:?}: empty entry")));
        }
        let net = match part.parse::<IpNet>() {
            Ok(n) => n,
            Err(_) => part
                .parse::<std::net::IpAddr>()
                .map(IpNet::from)
                .map_err(|_| field("allowedIps", format!("{part:?} is not a CIDR")))?,
        };
        v.push(net);
    }
    Ok(v)
}

impl ExternalPeer {
    /// Parses and checks one record on its own (not against nodes or other peers). Unknown
    /// fields are ignored.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ExternalError> {
        let raw: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ExternalError::Json(e.to_string()))?;
        let obj = raw.as_object().ok_or_else(|| {
            ExternalError::Json("an external peer record must be a JSON object".into())
        })?;
        let schema = obj
            .get("schema")
            .ok_or_else(|| field("schema", "missing"))?
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| field("schema", "must be a positive integer"))?;
        let name = obj
            .get("name")
            .ok_or_else(|| field("name", "missing"))?
            .as_str()
            .ok_or_else(|| field("name", "must be a string"))?
            .to_string();
        let public_key = obj
            .get("publicKey")
            .ok_or_else(|| field("publicKey", "missing"))?
            .as_str()
            .ok_or_else(|| field("publicKey", "must be a string"))?
            .parse::<PublicKey>()
            .map_err(|e| field("publicKey", e.to_string()))?;
        let mut allowed_ips = Vec::new();
        for c in obj
            .get("allowedIps")
            .ok_or_else(|| field("allowedIps", "missing"))?
            .as_array()
            .ok_or_else(|| field("allowedIps", "must be a list of CIDR strings"))?
        {
            let s = c
                .as_str()
                .ok_or_else(|| field("allowedIps", "each CIDR must be a string"))?;
            allowed_ips.push(
                s.parse::<IpNet>()
                    .map_err(|_| field("allowedIps", format!("{s:?} is not a CIDR")))?,
            );
        }
        let endpoint = match obj.get("endpoint") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let s = v
                    .as_str()
                    .ok_or_else(|| field("endpoint", "must be an ip:port string"))?;
                Some(
                    s.parse::<SocketAddr>()
                        .map_err(|_| field("endpoint", format!("{s:?} is not ip:port")))?,
                )
            }
        };
        let uint = |name: &'static str| -> Result<u64, ExternalError> {
            match obj.get(name) {
                None | Some(serde_json::Value::Null) => Ok(0),
                Some(v) => v
                    .as_u64()
                    .ok_or_else(|| field(name, "must be a non-negative integer")),
            }
        };
        let created_at = uint("createdAt")?;
        let config_printed_at = uint("configPrintedAt")?;
        let mut config_keys = BTreeMap::new();
        match obj.get("configKeys") {
            None | Some(serde_json::Value::Null) => {}
            Some(v) => {
                let m = v.as_object().ok_or_else(|| {
                    field("configKeys", "must be an object of node name -> public key")
                })?;
                for (node, key) in m {
                    check_name(node)
                        .map_err(|e| field("configKeys", format!("node {node:?}: {e}")))?;
                    let key = key
                        .as_str()
                        .ok_or_else(|| field("configKeys", format!("{node}: must be a string")))?
                        .parse::<PublicKey>()
                        .map_err(|e| field("configKeys", format!("{node}: {e}")))?;
                    config_keys.insert(node.clone(), key);
                }
            }
        }
        let peer = ExternalPeer {
            schema,
            name,
            public_key,
            allowed_ips,
            endpoint,
            created_at,
            config_keys,
            config_printed_at,
        };
        peer.check()?;
        Ok(peer)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain strings, numbers, lists and maps cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Checks that need only this record.
    pub fn check(&self) -> Result<(), ExternalError> {
        if self.schema == 0 {
            return Err(field("schema", "must be at least 1"));
        }
        check_name(&self.name).map_err(|e| field("name", e.to_string()))?;
        if self.allowed_ips.is_empty() {
            return Err(field("allowedIps", "at least one range is required"));
        }
        if self.allowed_ips.len() > MAX_ALLOWED_IPS {
            return Err(field(
                "allowedIps",
                format!("at most {MAX_ALLOWED_IPS} ranges"),
            ));
        }
        for (i, c) in self.allowed_ips.iter().enumerate() {
            if c.prefix_len() == 0 {
                return Err(field("allowedIps", format!("{c} is a default route")));
            }
            if c.trunc() != *c {
                return Err(field(
                    "allowedIps",
                    format!("{c} has host bits set (did you mean {})?", c.trunc()),
                ));
            }
            if let Some(o) = self.allowed_ips[..i]
                .iter()
                .find(|o| o.contains(c) || c.contains(*o))
            {
                return Err(field("allowedIps", format!("{c} overlaps {o}")));
            }
        }
        if let Some(ep) = &self.endpoint {
            if ep.port() == 0 {
                return Err(field("endpoint", format!("{ep}: port 0")));
            }
            if ep.ip().is_unspecified() || ep.ip().is_multicast() {
                return Err(field("endpoint", format!("{ep}: not a unicast address")));
            }
            if let Some(c) = self.allowed_ips.iter().find(|c| c.contains(&ep.ip())) {
                return Err(field(
                    "endpoint",
                    format!("{ep} lies inside the peer's own allowed IPs ({c})"),
                ));
            }
        }
        Ok(())
    }

    /// The peer every node adds for it: its key, its ranges, its endpoint if known. No next key
    /// (a standard peer holds one key) and no preshared key.
    pub fn peer_config(&self) -> PeerConfig {
        PeerConfig {
            name: self.name.clone(),
            kind: PeerKind::External,
            public_key: self.public_key,
            next_public_key: None,
            endpoints: self.endpoint.into_iter().collect(),
            private_endpoints: Vec::new(),
            location: None,
            through_nat: false,
            relay: false,
            allowed_ips: self.allowed_ips.clone(),
            key_generation: 0,
            psk: PeerPsk::Never,
        }
    }

    /// The underlay endpoints of this peer, as a slice (empty without one).
    fn endpoints(&self) -> &[SocketAddr] {
        self.endpoint.as_slice()
    }
}

/// The ranges and endpoints two parties route, and whether they conflict: ranges that overlap,
/// or a range that contains the other's endpoint (its datagrams would be routed into the mesh).
fn routing_conflict(
    peer: &ExternalPeer,
    owner: Owner,
    cidrs: &[IpNet],
    endpoints: &[SocketAddr],
) -> Result<(), ExternalError> {
    for c in &peer.allowed_ips {
        if let Some(oc) = cidrs.iter().find(|oc| oc.contains(c) || c.contains(*oc)) {
            return Err(ExternalError::Overlap {
                cidr: *c,
                owner,
                other_cidr: *oc,
            });
        }
        if let Some(ep) = endpoints.iter().find(|ep| c.contains(&ep.ip())) {
            return Err(ExternalError::ContainsEndpoint {
                cidr: *c,
                owner,
                endpoint: *ep,
            });
        }
    }
    for ep in peer.endpoints() {
        if let Some(oc) = cidrs.iter().find(|oc| oc.contains(&ep.ip())) {
            return Err(ExternalError::EndpointInside {
                endpoint: *ep,
                owner,
                cidr: *oc,
            });
        }
    }
    Ok(())
}

/// Checks an external peer against node records and other external peers: its name may not be a
/// node's, its key may not be a node's (current or next) or another peer's, and its ranges may
/// not overlap any node's pod ranges or another peer's ranges, nor contain an endpoint of either
/// (and its endpoint may not lie in their ranges). Entries named like `peer` are skipped in
/// `others` (its previous version).
pub fn check_against<'a>(
    peer: &ExternalPeer,
    nodes: impl IntoIterator<Item = &'a NodeRecord>,
    others: impl IntoIterator<Item = &'a ExternalPeer>,
) -> Result<(), ExternalError> {
    for n in nodes {
        let owner = || Owner::Node(n.name.clone());
        if n.name == peer.name {
            return Err(ExternalError::NameTaken {
                name: peer.name.clone(),
                owner: owner(),
            });
        }
        if n.public_key == peer.public_key || n.next_public_key == Some(peer.public_key) {
            return Err(ExternalError::KeyTaken {
                key: peer.public_key.fingerprint(),
                owner: owner(),
            });
        }
        routing_conflict(peer, owner(), &n.pod_cidrs, &n.endpoints)?;
    }
    for o in others {
        if o.name == peer.name {
            continue;
        }
        let owner = || Owner::Peer(o.name.clone());
        if o.public_key == peer.public_key {
            return Err(ExternalError::KeyTaken {
                key: peer.public_key.fingerprint(),
                owner: owner(),
            });
        }
        routing_conflict(peer, owner(), &o.allowed_ips, o.endpoints())?;
        // The other way round: our ranges must not swallow its endpoint either.
        for ep in o.endpoints() {
            if let Some(c) = peer.allowed_ips.iter().find(|c| c.contains(&ep.ip())) {
                return Err(ExternalError::ContainsEndpoint {
                    cidr: *c,
                    owner: owner(),
                    endpoint: *ep,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    fn key() -> PublicKey {
        PrivateKey::generate().public_key()
    }

    pub(crate) fn peer(name: &str, cidr: &str) -> ExternalPeer {
        ExternalPeer {
            schema: SCHEMA_VERSION,
            name: name.into(),
            public_key: key(),
            allowed_ips: vec![cidr.parse().expect("cidr")],
            endpoint: None,
            created_at: 5,
            config_keys: BTreeMap::new(),
            config_printed_at: 0,
        }
    }

    fn node(name: &str, i: u8) -> NodeRecord {
        NodeRecord {
            schema: crate::record::SCHEMA_VERSION,
            name: name.into(),
            public_key: key(),
            endpoints: vec![format!("198.18.0.{}:51820", 10 + i).parse().expect("ep")],
            private_endpoints: Vec::new(),
            location: None,
            relay: false,
            pod_cidrs: vec![format!("10.42.{i}.0/24").parse().expect("cidr")],
            key_generation: 1,
            next_public_key: None,
            key_created_at: 0,
            psk_generation: None,
        }
    }

    #[test]
    fn round_trip_and_unknown_fields_ignored() {
        let mut p = peer("laptop", "10.99.0.1/32");
        p.endpoint = Some("203.0.113.7:51820".parse().expect("ep"));
        p.config_keys.insert("node-0".into(), key());
        p.config_printed_at = 9;
        let mut v: serde_json::Value = serde_json::from_slice(&p.to_json()).expect("json");
        assert_eq!(v["allowedIps"][0], "10.99.0.1/32");
        assert_eq!(v["endpoint"], "203.0.113.7:51820");
        v["futureField"] = serde_json::json!([1, 2]);
        let back = ExternalPeer::from_json(v.to_string().as_bytes()).expect("parse");
        assert_eq!(back, p);
        // Optional fields may be absent.
        let minimal = serde_json::json!({
            "schema": 1, "name": "vm-1", "publicKey": key().to_base64(),
            "allowedIps": ["10.99.1.0/24", "fd99::/64"],
        });
        let m = ExternalPeer::from_json(minimal.to_string().as_bytes()).expect("minimal");
        assert_eq!(m.endpoint, None);
        assert!(m.config_keys.is_empty());
        let cfg = m.peer_config();
        assert_eq!(cfg.kind, PeerKind::External);
        assert!(cfg.endpoints.is_empty() && cfg.next_public_key.is_none());
        assert_eq!(cfg.allowed_ips, m.allowed_ips);
    }

    fn err_field(v: serde_json::Value) -> &'static str {
        match ExternalPeer::from_json(v.to_string().as_bytes()) {
            Err(e) => e.field().unwrap_or("json"),
            Ok(p) => panic!("accepted {p:?}"),
        }
    }

    #[test]
    fn bad_records_name_their_field() {
        let good: serde_json::Value =
            serde_json::from_slice(&peer("laptop", "10.99.0.1/32").to_json()).expect("json");
        let with = |k: &str, v: serde_json::Value| {
            let mut g = good.clone();
            g[k] = v;
            g
        };
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (with("name", "../x".into()), "name"),
            (with("name", "Laptop".into()), "name"),
            (with("name", 7.into()), "name"),
            (with("publicKey", "AAAA".into()), "publicKey"),
            (with("publicKey", crate_low_order().into()), "publicKey"),
            (with("allowedIps", serde_json::json!([])), "allowedIps"),
            (
                with("allowedIps", serde_json::json!("10.0.0.0/8")),
                "allowedIps",
            ),
            (
                with("allowedIps", serde_json::json!(["nope"])),
                "allowedIps",
            ),
            (
                with("allowedIps", serde_json::json!(["0.0.0.0/0"])),
                "allowedIps",
            ),
            (
                with("allowedIps", serde_json::json!(["::/0"])),
                "allowedIps",
            ),
            (
                with("allowedIps", serde_json::json!(["10.99.0.1/24"])),
                "allowedIps",
            ),
            (
                with(
                    "allowedIps",
                    serde_json::json!(["10.99.0.0/24", "10.99.0.5/32"]),
                ),
                "allowedIps",
            ),
            (with("endpoint", "nope".into()), "endpoint"),
            (with("endpoint", "10.0.0.1:0".into()), "endpoint"),
            (with("endpoint", "0.0.0.0:51820".into()), "endpoint"),
            (with("endpoint", "10.99.0.1:51820".into()), "endpoint"),
            (with("schema", 0.into()), "schema"),
            (with("schema", "one".into()), "schema"),
            (with("createdAt", (-1).into()), "createdAt"),
            (with("configPrintedAt", "x".into()), "configPrintedAt"),
            (with("configKeys", serde_json::json!(["a"])), "configKeys"),
            (
                with("configKeys", serde_json::json!({"N/1": key().to_base64()})),
                "configKeys",
            ),
            (
                with("configKeys", serde_json::json!({"node-0": "short"})),
                "configKeys",
            ),
        ];
        for (v, want) in cases {
            assert_eq!(err_field(v.clone()), want, "{v}");
        }
        for missing in ["schema", "name", "publicKey", "allowedIps"] {
            let mut g = good.clone();
            g.as_object_mut().expect("obj").remove(missing);
            assert_eq!(err_field(g), missing);
        }
        assert!(matches!(
            ExternalPeer::from_json(b"{not json"),
            Err(ExternalError::Json(_))
        ));
        assert!(matches!(
            ExternalPeer::from_json(b"[1]"),
            Err(ExternalError::Json(_))
        ));
        let too_many: Vec<String> = (0..=MAX_ALLOWED_IPS)
            .map(|i| format!("10.99.{i}.0/24"))
            .collect();
        assert_eq!(
            err_field(with("allowedIps", serde_json::json!(too_many))),
            "allowedIps"
        );
    }

    fn crate_low_order() -> &'static str {
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
    }

    #[test]
    fn allowed_ips_flag_parsing() {
        let v = parse_allowed_ips("10.99.0.1/32, 10.99.1.0/24,fd99::1").expect("parse");
        assert_eq!(
            v.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["10.99.0.1/32", "10.99.1.0/24", "fd99::1/128"]
        );
        assert!(parse_allowed_ips("").is_err());
        assert!(parse_allowed_ips("10.99.0.1/32,").is_err());
        assert!(parse_allowed_ips("10.99.0.1/33").is_err());
        assert!(parse_allowed_ips("laptop").is_err());
    }

    #[test]
    fn conflicts_with_nodes_and_peers() {
        let (a, b) = (node("node-a", 1), node("node-b", 2));
        let nodes = [a.clone(), b.clone()];
        let ok = peer("laptop", "10.99.0.1/32");
        assert_eq!(check_against(&ok, &nodes, []), Ok(()));

        // Overlap with a node's pod range, either way round: names the node.
        for (cidr, who) in [("10.42.2.7/32", "node-b"), ("10.42.0.0/16", "node-a")] {
            let p = peer("laptop", cidr);
            match check_against(&p, &nodes, []) {
                Err(ExternalError::Overlap { owner, .. }) => {
                    assert_eq!(owner, Owner::Node(who.into()), "{cidr}")
                }
                other => panic!("{cidr}: {other:?}"),
            }
        }
        let e = check_against(&peer("laptop", "10.42.2.0/28"), &nodes, []).expect_err("overlap");
        assert!(e.to_string().contains("node node-b"), "{e}");
        assert_eq!(e.field(), Some("allowedIps"));
        // A range holding a node's underlay endpoint would swallow the node's tunnel.
        let e = check_against(&peer("laptop", "198.18.0.0/24"), &nodes, []).expect_err("ep");
        assert!(matches!(e, ExternalError::ContainsEndpoint { .. }), "{e}");
        // The peer's endpoint inside a node's pod range would be routed into the mesh.
        let mut inside = ok.clone();
        inside.endpoint = Some("10.42.1.9:51820".parse().expect("ep"));
        let e = check_against(&inside, &nodes, []).expect_err("endpoint");
        assert_eq!(e.field(), Some("endpoint"));
        // Name and keys of nodes.
        let mut named = ok.clone();
        named.name = "node-a".into();
        assert!(matches!(
            check_against(&named, &nodes, []),
            Err(ExternalError::NameTaken { .. })
        ));
        let mut same_key = ok.clone();
        same_key.public_key = b.public_key;
        assert_eq!(
            check_against(&same_key, &nodes, []).map_err(|e| e.field()),
            Err(Some("publicKey"))
        );
        let mut rotating = b.clone();
        rotating.next_public_key = Some(key());
        let mut next_key = ok.clone();
        next_key.public_key = rotating.next_public_key.expect("next");
        assert!(check_against(&next_key, [&a, &rotating], []).is_err());

        // Other external peers: overlap and key; its own previous version is skipped.
        let vm = peer("vm", "10.99.0.0/24");
        let e = check_against(&ok, &nodes, [&vm]).expect_err("peer overlap");
        assert!(
            matches!(&e, ExternalError::Overlap { owner: Owner::Peer(p), .. } if p == "vm"),
            "{e}"
        );
        assert!(e.to_string().contains("external peer vm"), "{e}");
        let mut vm_key = peer("vm", "10.98.0.0/24");
        vm_key.public_key = ok.public_key;
        assert!(matches!(
            check_against(&ok, &nodes, [&vm_key]),
            Err(ExternalError::KeyTaken { .. })
        ));
        let mut previous = ok.clone();
        previous.allowed_ips = vec!["10.99.0.0/30".parse().expect("cidr")];
        assert_eq!(check_against(&ok, &nodes, [&previous]), Ok(()));
        // Endpoints of other peers inside our ranges, and ours inside theirs.
        let mut far = peer("far", "10.97.0.0/24");
        far.endpoint = Some("10.99.0.1:4000".parse().expect("ep"));
        assert!(matches!(
            check_against(&ok, &nodes, [&far]),
            Err(ExternalError::ContainsEndpoint { .. })
        ));
        let mut mine = ok.clone();
        mine.endpoint = Some("10.97.0.3:4000".parse().expect("ep"));
        let far2 = peer("far", "10.97.0.0/24");
        assert!(matches!(
            check_against(&mine, &nodes, [&far2]),
            Err(ExternalError::EndpointInside { .. })
        ));
    }
}
