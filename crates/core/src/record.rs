//! The node record every node publishes: name, public key, endpoints, pod CIDRs.
//!
//! JSON via serde; unknown fields are ignored so two versions can run side by side during a
//! rolling upgrade. [`NodeRecord::from_json`] refuses a bad record with an error naming the field;
//! [`validate_against`] refuses records that would break routing given the other nodes.

use crate::keys::PublicKey;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Current schema version written by this build.
pub const SCHEMA_VERSION: u32 = 1;

/// Node names follow Kubernetes node names (DNS subdomain, at most 253 bytes).
pub const MAX_NAME_LEN: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    /// Schema version of this record; readers accept any version whose fields they know.
    pub schema: u32,
    pub name: String,
    pub public_key: PublicKey,
    /// Public underlay endpoints, tried in order until one completes a handshake: what peers
    /// of other locations (and every peer, when the node names no location) use. Empty for a
    /// node behind NAT: peers then learn its address from its authenticated packets.
    pub endpoints: Vec<SocketAddr>,
    /// Private underlay endpoints, used (before `endpoints`) by the peers of this node's own
    /// `location` only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub private_endpoints: Vec<SocketAddr>,
    /// The node's location (a cloud region, a site): nodes of one location reach each other on
    /// their private endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// The node relays for mesh members whose direct paths fail (it needs a public endpoint).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub relay: bool,
    /// Pod ranges routed to this node: one IPv4 and optionally one IPv6.
    pub pod_cidrs: Vec<IpNet>,
    /// Bumped each time the node's key changes.
    #[serde(default)]
    pub key_generation: u64,
    /// During a key rotation: the key the node is moving to. Peers accept handshakes from both
    /// keys until the record names the new key as `publicKey` (and this is gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<PublicKey>,
    /// Unix seconds when `publicKey` was made (0: unknown), for key age in `keyctl status`.
    #[serde(default)]
    pub key_created_at: u64,
    /// The cluster PSK generation this node uses (`keyctl psk rotate` bumps it). Present only
    /// when the node holds the cluster secret; pairs use the lower of their two generations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_generation: Option<u64>,
}

/// Why a record was refused. Each variant names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record is not valid JSON for a node record: {0}")]
    Json(String),
    #[error("field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("field `podCidrs`: {cidr} overlaps {other_cidr} of node {other}")]
    Overlap {
        cidr: IpNet,
        other: String,
        other_cidr: IpNet,
    },
    #[error("field `podCidrs`: {cidr} contains underlay endpoint {endpoint} of node {node}")]
    ContainsEndpoint {
        cidr: IpNet,
        node: String,
        endpoint: SocketAddr,
    },
}

fn field(field: &'static str, reason: impl Into<String>) -> RecordError {
    RecordError::Field {
        field,
        reason: reason.into(),
    }
}

/// serde_json reports "missing field `x`" / "invalid ... at line"; map the messages that name a
/// field onto that field so operators see which one is wrong.
fn json_error(e: serde_json::Error) -> RecordError {
    let msg = e.to_string();
    for (json, f) in [
        ("publicKey", "publicKey"),
        ("podCidrs", "podCidrs"),
        ("endpoints", "endpoints"),
        ("name", "name"),
        ("schema", "schema"),
        ("keyGeneration", "keyGeneration"),
        ("nextPublicKey", "nextPublicKey"),
        ("keyCreatedAt", "keyCreatedAt"),
        ("privateEndpoints", "privateEndpoints"),
        ("location", "location"),
        ("relay", "relay"),
    ] {
        if msg.contains(&format!("`{json}`")) {
            return field(f, msg);
        }
    }
    RecordError::Json(msg)
}

impl NodeRecord {
    /// Parses and checks one record on its own (not against other nodes).
    pub fn from_json(bytes: &[u8]) -> Result<Self, RecordError> {
        // Parse into a loose shape first so a bad value is reported with its field name.
        let raw: serde_json::Value = serde_json::from_slice(bytes).map_err(json_error)?;
        let obj = raw
            .as_object()
            .ok_or_else(|| RecordError::Json("a node record must be a JSON object".into()))?;
        for (name, _) in [
            ("schema", ()),
            ("name", ()),
            ("publicKey", ()),
            ("endpoints", ()),
            ("podCidrs", ()),
        ] {
            if !obj.contains_key(name) {
                return Err(field(static_field(name), "missing".to_string()));
            }
        }
        let public_key = obj
            .get("publicKey")
            .and_then(|v| v.as_str())
            .ok_or_else(|| field("publicKey", "must be a string"))?
            .parse::<PublicKey>()
            .map_err(|e| field("publicKey", e.to_string()))?;
        let endpoints = endpoint_list(obj.get("endpoints"), "endpoints")?;
        let private_endpoints = match obj.get("privateEndpoints") {
            None | Some(serde_json::Value::Null) => Vec::new(),
            v => endpoint_list(v, "privateEndpoints")?,
        };
        let location = match obj.get("location") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(
                v.as_str()
                    .ok_or_else(|| field("location", "must be a string"))?
                    .to_string(),
            ),
        };
        let mut pod_cidrs = Vec::new();
        for c in obj
            .get("podCidrs")
            .and_then(|v| v.as_array())
            .ok_or_else(|| field("podCidrs", "must be a list of CIDR strings"))?
        {
            let s = c
                .as_str()
                .ok_or_else(|| field("podCidrs", "each CIDR must be a string"))?;
            pod_cidrs.push(
                s.parse::<IpNet>()
                    .map_err(|_| field("podCidrs", format!("{s:?} is not a CIDR")))?,
            );
        }
        let schema = obj
            .get("schema")
            .and_then(|v| v.as_u64())
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| field("schema", "must be a positive integer"))?;
        let name = obj
            .get("name")
            .and_then(|v| v.as_str())
            .ok_or_else(|| field("name", "must be a string"))?
            .to_string();
        let key_generation = match obj.get("keyGeneration") {
            None => 0,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| field("keyGeneration", "must be a non-negative integer"))?,
        };
        let next_public_key = match obj.get("nextPublicKey") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(
                v.as_str()
                    .ok_or_else(|| field("nextPublicKey", "must be a string"))?
                    .parse::<PublicKey>()
                    .map_err(|e| field("nextPublicKey", e.to_string()))?,
            ),
        };
        let key_created_at = match obj.get("keyCreatedAt") {
            None => 0,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| field("keyCreatedAt", "must be a non-negative integer"))?,
        };
        let psk_generation = match obj.get("pskGeneration") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .ok_or_else(|| field("pskGeneration", "must be a non-negative integer"))?,
            ),
        };
        let relay = match obj.get("relay") {
            None | Some(serde_json::Value::Null) => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| field("relay", "must be true or false"))?,
        };
        let record = NodeRecord {
            relay,
            schema,
            name,
            public_key,
            endpoints,
            private_endpoints,
            location,
            pod_cidrs,
            key_generation,
            next_public_key,
            key_created_at,
            psk_generation,
        };
        record.check()?;
        Ok(record)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain strings, numbers and lists cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Checks that need only this record.
    pub fn check(&self) -> Result<(), RecordError> {
        if self.schema == 0 {
            return Err(field("schema", "must be at least 1"));
        }
        if self.next_public_key == Some(self.public_key) {
            return Err(field("nextPublicKey", "must differ from publicKey"));
        }
        check_name(&self.name)?;
        check_endpoints(&self.endpoints, "endpoints")?;
        check_endpoints(&self.private_endpoints, "privateEndpoints")?;
        if let Some(l) = &self.location {
            check_location(l)?;
        }
        let v4 = self
            .pod_cidrs
            .iter()
            .filter(|c| matches!(c, IpNet::V4(_)))
            .count();
        let v6 = self.pod_cidrs.len() - v4;
        if v4 != 1 || v6 > 1 {
            return Err(field(
                "podCidrs",
                "exactly one IPv4 range and at most one IPv6 range",
            ));
        }
        for c in &self.pod_cidrs {
            if c.prefix_len() == 0 {
                return Err(field("podCidrs", format!("{c} is a default route")));
            }
            if c.trunc() != *c {
                return Err(field(
                    "podCidrs",
                    format!("{c} has host bits set (did you mean {})?", c.trunc()),
                ));
            }
            if c.hosts().nth(1).is_none() {
                // The first host address is the node's mesh address; a pod needs another.
                return Err(field("podCidrs", format!("{c} is too small")));
            }
            for ep in self.all_endpoints() {
                if c.contains(&ep.ip()) {
                    return Err(RecordError::ContainsEndpoint {
                        cidr: *c,
                        node: self.name.clone(),
                        endpoint: *ep,
                    });
                }
            }
        }
        Ok(())
    }

    /// Every underlay endpoint the record names: private, then public.
    pub fn all_endpoints(&self) -> impl Iterator<Item = &SocketAddr> {
        self.private_endpoints.iter().chain(&self.endpoints)
    }

    /// The node's own address on the mesh: the first host address of each pod CIDR.
    pub fn mesh_addresses(&self) -> Vec<std::net::IpAddr> {
        self.pod_cidrs.iter().filter_map(mesh_address).collect()
    }
}

/// The first host address of a range (10.42.1.1 for 10.42.1.0/24).
pub fn mesh_address(cidr: &IpNet) -> Option<std::net::IpAddr> {
    match cidr {
        IpNet::V4(n) => {
            let base = u32::from(n.network());
            Some(std::net::Ipv4Addr::from(base.checked_add(1)?).into())
        }
        IpNet::V6(n) => {
            let base = u128::from(n.network());
            Some(std::net::Ipv6Addr::from(base.checked_add(1)?).into())
        }
    }
}

/// A list of `ip:port` strings (`what` names the field in errors).
fn endpoint_list(
    v: Option<&serde_json::Value>,
    what: &'static str,
) -> Result<Vec<SocketAddr>, RecordError> {
    let mut out = Vec::new();
    for ep in v
        .and_then(|v| v.as_array())
        .ok_or_else(|| field(what, "must be a list of ip:port strings"))?
    {
        let s = ep
            .as_str()
            .ok_or_else(|| field(what, "each endpoint must be a string"))?;
        out.push(
            s.parse::<SocketAddr>()
                .map_err(|_| field(what, format!("{s:?} is not ip:port")))?,
        );
    }
    Ok(out)
}

/// Most endpoints one record may name per scope.
pub const MAX_ENDPOINTS: usize = 8;

fn check_endpoints(eps: &[SocketAddr], what: &'static str) -> Result<(), RecordError> {
    if eps.len() > MAX_ENDPOINTS {
        return Err(field(what, format!("at most {MAX_ENDPOINTS} endpoints")));
    }
    for ep in eps {
        if ep.port() == 0 {
            return Err(field(what, format!("{ep}: port 0")));
        }
        if ep.ip().is_unspecified() || ep.ip().is_multicast() {
            return Err(field(what, format!("{ep}: not a unicast address")));
        }
    }
    Ok(())
}

/// Location names: what a Kubernetes label value allows (1 to 63 of `A-Za-z0-9-_.`, starting
/// and ending alphanumeric), so a `topology.kubernetes.io/region` label is always one.
pub fn check_location(l: &str) -> Result<(), RecordError> {
    let ok = !l.is_empty()
        && l.len() <= 63
        && l.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && l.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && l.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(field(
            "location",
            format!("{l:?} is not a label value (1-63 of A-Z a-z 0-9 - _ ., alphanumeric ends)"),
        ))
    }
}

fn static_field(name: &str) -> &'static str {
    match name {
        "schema" => "schema",
        "name" => "name",
        "publicKey" => "publicKey",
        "endpoints" => "endpoints",
        _ => "podCidrs",
    }
}

/// Node names: lowercase RFC 1123 subdomain, as Kubernetes requires. They become file names and
/// registry keys, so `/`, `..` and the like must never pass.
pub fn check_name(name: &str) -> Result<(), RecordError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(field(
            "name",
            format!("must be 1 to {MAX_NAME_LEN} characters"),
        ));
    }
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let ends_ok = name
        .bytes()
        .next()
        .zip(name.bytes().last())
        .is_some_and(|(a, z)| a.is_ascii_alphanumeric() && z.is_ascii_alphanumeric());
    if !ok_chars || !ends_ok || name.contains("..") {
        return Err(field(
            "name",
            format!("{name:?} is not a lowercase DNS name (a-z, 0-9, '-', '.')"),
        ));
    }
    Ok(())
}

/// Checks `record` against the records already accepted (`others`, which excludes a previous
/// version of the same node): no pod range may overlap another node's, and no range may contain
/// another node's underlay endpoint.
pub fn validate_against<'a>(
    record: &NodeRecord,
    others: impl IntoIterator<Item = &'a NodeRecord>,
) -> Result<(), RecordError> {
    for other in others {
        if other.name == record.name {
            continue;
        }
        for c in &record.pod_cidrs {
            for oc in &other.pod_cidrs {
                if c.contains(oc) || oc.contains(c) {
                    return Err(RecordError::Overlap {
                        cidr: *c,
                        other: other.name.clone(),
                        other_cidr: *oc,
                    });
                }
            }
            for ep in other.all_endpoints() {
                if c.contains(&ep.ip()) {
                    return Err(RecordError::ContainsEndpoint {
                        cidr: *c,
                        node: other.name.clone(),
                        endpoint: *ep,
                    });
                }
            }
        }
        // The reverse direction: the other node's range must not swallow our endpoints.
        for oc in &other.pod_cidrs {
            for ep in record.all_endpoints() {
                if oc.contains(&ep.ip()) {
                    return Err(RecordError::ContainsEndpoint {
                        cidr: *oc,
                        node: record.name.clone(),
                        endpoint: *ep,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Which records of a set to accept: records are taken oldest name first (sorted by name, so every
/// node reaches the same verdict), and a record that conflicts with one already taken is refused.
/// Returns the accepted records and the refused ones with their reason.
pub fn select_consistent(
    mut records: Vec<NodeRecord>,
) -> (Vec<NodeRecord>, Vec<(NodeRecord, RecordError)>) {
    records.sort_by(|a, b| a.name.cmp(&b.name));
    let mut accepted: Vec<NodeRecord> = Vec::new();
    let mut refused = Vec::new();
    for r in records {
        match validate_against(&r, &accepted) {
            Ok(()) => accepted.push(r),
            Err(e) => refused.push((r, e)),
        }
    }
    (accepted, refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    fn rec(name: &str, ep: &str, cidr: &str) -> NodeRecord {
        NodeRecord {
            schema: SCHEMA_VERSION,
            name: name.into(),
            public_key: PrivateKey::generate().public_key(),
            endpoints: vec![ep.parse().expect("ep")],
            private_endpoints: Vec::new(),
            location: None,
            relay: false,
            pod_cidrs: vec![cidr.parse().expect("cidr")],
            key_generation: 1,
            next_public_key: None,
            key_created_at: 0,
            psk_generation: None,
        }
    }

    #[test]
    fn round_trip_and_unknown_fields_ignored() {
        let mut r = rec("node-a", "192.0.2.1:51820", "10.42.1.0/24");
        r.psk_generation = Some(3);
        let mut v: serde_json::Value = serde_json::from_slice(&r.to_json()).expect("json");
        v["futureField"] = serde_json::json!({"x": 1});
        let back = NodeRecord::from_json(v.to_string().as_bytes()).expect("parse");
        assert_eq!(back, r);
    }

    fn err_field(json: serde_json::Value) -> String {
        match NodeRecord::from_json(json.to_string().as_bytes()) {
            Err(RecordError::Field { field, .. }) => field.to_string(),
            Err(RecordError::ContainsEndpoint { .. }) => "podCidrs".into(),
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn node_behind_nat_publishes_private_endpoints_and_a_location_only() {
        let mut v: serde_json::Value =
            serde_json::from_slice(&rec("edge-1", "192.0.2.1:51820", "10.42.1.0/24").to_json())
                .expect("json");
        v["endpoints"] = serde_json::json!([]);
        v["privateEndpoints"] = serde_json::json!(["192.168.1.10:51820"]);
        v["location"] = "site-a".into();
        let r = NodeRecord::from_json(v.to_string().as_bytes()).expect("a NAT'd node's record");
        assert!(r.endpoints.is_empty());
        assert_eq!(r.location.as_deref(), Some("site-a"));
        assert_eq!(
            r.all_endpoints().map(|e| e.to_string()).collect::<Vec<_>>(),
            ["192.168.1.10:51820"]
        );
        // Round trip, and an old-style record has neither field in its JSON.
        assert_eq!(NodeRecord::from_json(&r.to_json()).expect("back"), r);
        let old = rec("n", "192.0.2.1:51820", "10.42.1.0/24").to_json();
        let s = String::from_utf8(old).expect("utf8");
        assert!(
            !s.contains("privateEndpoints") && !s.contains("location"),
            "{s}"
        );
    }

    #[test]
    fn bad_records_name_their_field() {
        let good = serde_json::from_slice::<serde_json::Value>(
            &rec("node-a", "192.0.2.1:51820", "10.42.1.0/24").to_json(),
        )
        .expect("json");
        let with = |k: &str, v: serde_json::Value| {
            let mut g = good.clone();
            g[k] = v;
            g
        };
        assert_eq!(err_field(with("publicKey", "AAAA".into())), "publicKey");
        assert_eq!(
            err_field(with(
                "publicKey",
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()
            )),
            "publicKey"
        );
        assert_eq!(
            err_field(with("endpoints", serde_json::json!(["nope"]))),
            "endpoints"
        );
        let nine: Vec<String> = (1..=9).map(|i| format!("192.0.2.{i}:51820")).collect();
        assert_eq!(
            err_field(with("endpoints", serde_json::json!(nine))),
            "endpoints"
        );
        assert_eq!(
            err_field(with("privateEndpoints", serde_json::json!(["0.0.0.0:1"]))),
            "privateEndpoints"
        );
        assert_eq!(
            err_field(with("location", serde_json::json!("eu west"))),
            "location"
        );
        assert_eq!(
            err_field(with("location", serde_json::json!(7))),
            "location"
        );
        // A private endpoint inside the node's own pod range is refused like a public one.
        let mut inside = with("privateEndpoints", serde_json::json!(["10.42.1.9:51820"]));
        inside["location"] = "eu-west-1".into();
        assert_eq!(err_field(inside), "podCidrs");
        assert_eq!(
            err_field(with("podCidrs", serde_json::json!(["0.0.0.0/0"]))),
            "podCidrs"
        );
        assert_eq!(
            err_field(with("podCidrs", serde_json::json!(["10.42.1.1/24"]))),
            "podCidrs"
        );
        assert_eq!(
            err_field(with("podCidrs", serde_json::json!(["192.0.2.0/24"]))),
            "podCidrs"
        );
        assert_eq!(err_field(with("name", "../etc".into())), "name");
        assert_eq!(err_field(with("name", "Upper".into())), "name");
        assert_eq!(err_field(with("schema", "one".into())), "schema");
        assert_eq!(
            err_field(with("pskGeneration", serde_json::json!(-1))),
            "pskGeneration"
        );
        let mut missing = good.clone();
        missing.as_object_mut().expect("obj").remove("podCidrs");
        assert_eq!(err_field(missing), "podCidrs");
        assert!(matches!(
            NodeRecord::from_json(b"{not json"),
            Err(RecordError::Json(_))
        ));
    }

    #[test]
    fn ipv6_range_optional() {
        let mut r = rec("node-a", "192.0.2.1:51820", "10.42.1.0/24");
        r.pod_cidrs.push("fd00:42:1::/64".parse().expect("v6"));
        assert!(r.check().is_ok());
        assert_eq!(
            r.mesh_addresses(),
            vec![
                "10.42.1.1".parse::<std::net::IpAddr>().expect("ip"),
                "fd00:42:1::1".parse().expect("ip")
            ]
        );
    }

    #[test]
    fn overlap_and_endpoint_inside_range_refused() {
        let a = rec("node-a", "192.0.2.1:51820", "10.42.1.0/24");
        let b = rec("node-b", "192.0.2.2:51820", "10.42.1.128/25");
        assert!(matches!(
            validate_against(&b, [&a]),
            Err(RecordError::Overlap { .. })
        ));
        let c = rec("node-c", "192.0.2.3:51820", "192.0.2.0/30");
        assert!(matches!(
            validate_against(&c, [&a]),
            Err(RecordError::ContainsEndpoint { .. })
        ));
        let d = rec("node-d", "192.0.2.4:51820", "10.42.4.0/24");
        assert!(validate_against(&d, [&a]).is_ok());
        let (ok, bad) = select_consistent(vec![b.clone(), d.clone(), a.clone()]);
        assert_eq!(
            ok.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["node-a", "node-d"]
        );
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0.name, "node-b");
    }
}
