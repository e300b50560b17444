//! The custom resources of the `kube` backend (group `weft.dev`, version `v1alpha1`, all
//! cluster-scoped), one per registry collection ([`Kind`]). The CRD YAML in `deploy/crds/` is
//! generated from these types ([`crds`], [`crd_yaml`]); a test fails when the committed files
//! differ (`WEFT_WRITE_CRDS=1 cargo test -p weft-registry crds` rewrites them).
//!
//! Each spec mirrors the JSON of the weft-core type stored in that collection, less the field
//! that holds the object's name (that is `metadata.name`); tests round-trip every type through
//! its spec so the two cannot drift apart. Names: a kubectl user types `kubectl get meshnodes`
//! (`mn`), `meshnodehealths` (`mnh`), `meshpodcidrclaims` (`mpc`), `meshpeers` (`mp`),
//! `meshrevocations` (`mrev`), `meshkeyrotations` (`mkr`), `meshpskgenerations` (`mpsk`).

use crate::Kind;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// API group of every weft resource.
pub const GROUP: &str = "weft.dev";
/// API version of every weft resource.
pub const VERSION: &str = "v1alpha1";

/// A node of the mesh: its WireGuard key, endpoints and pod ranges (`weft_core::NodeRecord`).
/// Written only by that node's meshd (server-side apply, field manager `meshd`), owned by its
/// Node so that deleting the Node deletes it. Changes only when the record does.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "MeshNode",
    plural = "meshnodes",
    shortname = "mn",
    category = "weft",
    status = "MeshNodeStatus",
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".spec.endpoints[0]"}"#,
    printcolumn = r#"{"name":"Pod CIDR","type":"string","jsonPath":".spec.podCidrs[0]"}"#,
    printcolumn = r#"{"name":"Key","type":"string","jsonPath":".status.keyFingerprint"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Rotating","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"KeyRotating\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshNodeSpec {
    /// Record schema version.
    pub schema: u32,
    /// The node's WireGuard public key (base64).
    pub public_key: String,
    /// Where peers reach the node (IP:PORT), tried in order: its public endpoints, used by
    /// nodes of other locations. Empty for a node behind NAT (peers learn its address from its
    /// packets).
    pub endpoints: Vec<String>,
    /// Private endpoints (IP:PORT), used before `endpoints` by the nodes of the same location.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub private_endpoints: Vec<String>,
    /// The node's location (cloud region, site; by default its `topology.kubernetes.io/region`
    /// label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// The node relays for mesh members whose direct paths fail.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub relay: bool,
    /// The pod ranges routed to the node.
    pub pod_cidrs: Vec<String>,
    /// Goes up with every new key.
    #[serde(default)]
    pub key_generation: u64,
    /// The key the node is rotating to (both keys work until the rotation ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<String>,
    /// Unix seconds when the current key was made.
    #[serde(default)]
    pub key_created_at: u64,
    /// The cluster PSK generation the node uses (absent: no cluster PSK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_generation: Option<u64>,
}

/// One condition of a [`MeshNode`] (the shape of `metav1.Condition`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready` or `KeyRotating`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One CamelCase word.
    pub reason: String,
    #[serde(default)]
    pub message: String,
    /// When the status last changed (RFC 3339).
    pub last_transition_time: String,
    /// The spec generation the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// What meshd says of its node; written through the status subresource only when a condition
/// (or the key) changes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshNodeStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The first 8 characters of the public key, as `keyctl status` shows them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_fingerprint: Option<String>,
}

/// A node's view of its links (`weft_core::health::HealthReport`), written by that node when a
/// link changes state (at most once per 10 s). No meshd watches this kind, so these writes
/// never fan out to the nodes. Whether a report is stale follows from its Node's Ready
/// condition, not from rewrites.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "MeshNodeHealth",
    plural = "meshnodehealths",
    shortname = "mnh",
    category = "weft",
    printcolumn = r#"{"name":"Up","type":"integer","jsonPath":".spec.summary.up"}"#,
    printcolumn = r#"{"name":"Idle","type":"integer","jsonPath":".spec.summary.idle"}"#,
    printcolumn = r#"{"name":"Down","type":"integer","jsonPath":".spec.summary.down"}"#,
    printcolumn = r#"{"name":"Down peers","type":"string","jsonPath":".spec.summary.downPeers"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshNodeHealthSpec {
    /// Unix seconds when the node made the report.
    pub reported_at: u64,
    /// The reporting interval the node declares (seconds).
    pub interval_secs: u64,
    pub links: Vec<LinkHealthSpec>,
    /// Counts for `kubectl get` (derived from `links` when written).
    #[serde(default)]
    pub summary: LinkSummary,
}

/// One link of a [`MeshNodeHealth`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LinkHealthSpec {
    /// The peer node.
    pub peer: String,
    /// `up`, `idle`, `no-handshake` or `unanswered`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_age_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_generation: Option<u64>,
    pub key_pairs: u32,
    #[serde(default)]
    pub queued: u32,
    /// The endpoint the link uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// `private`, `public`, `learned` or `none`.
    #[serde(default = "no_source")]
    pub endpoint_source: String,
    /// The relay the link goes through (absent: direct).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
}

fn no_source() -> String {
    "none".into()
}

/// Link counts of a [`MeshNodeHealth`]: `down` are links with no working session.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LinkSummary {
    pub up: u32,
    pub idle: u32,
    pub down: u32,
    /// The peers whose links are down, comma-separated ("" when none).
    pub down_peers: String,
}

/// A pod CIDR block held by a node (`weft_core::alloc::Claim`), named after the block
/// (`10-42-3-0-24`), so the API server refuses a second claim on a block (409).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "MeshPodCIDRClaim",
    plural = "meshpodcidrclaims",
    shortname = "mpc",
    category = "weft",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node"}"#,
    printcolumn = r#"{"name":"Pod CIDR","type":"string","jsonPath":".spec.podCidr"}"#,
    printcolumn = r#"{"name":"Generation","type":"integer","priority":1,"jsonPath":".spec.generation"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshPodCIDRClaimSpec {
    /// The node holding the block.
    pub node: String,
    pub pod_cidr: String,
    pub generation: u64,
    /// Unix seconds of the last renewal.
    pub renewed_at: u64,
}

/// An external standard WireGuard peer (`weft_core::external::ExternalPeer`), written by
/// `keyctl peer add` (admins only).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "MeshPeer",
    plural = "meshpeers",
    shortname = "mp",
    category = "weft",
    status = "MeshPeerStatus",
    printcolumn = r#"{"name":"Allowed IPs","type":"string","jsonPath":".spec.allowedIps"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".spec.endpoint"}"#,
    printcolumn = r#"{"name":"Config","type":"string","jsonPath":".status.config"}"#,
    printcolumn = r#"{"name":"Checked","type":"date","priority":1,"jsonPath":".status.checkedAt"}"#,
    printcolumn = r#"{"name":"Key","type":"string","priority":1,"jsonPath":".spec.publicKey"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshPeerSpec {
    pub schema: u32,
    pub public_key: String,
    pub allowed_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub created_at: u64,
    /// Node keys the peer's last printed config holds, by node (for `keyctl peer` to say
    /// whether that config is stale).
    #[serde(default)]
    pub config_keys: BTreeMap<String, String>,
    #[serde(default)]
    pub config_printed_at: u64,
}

/// Whether the config last printed for a [`MeshPeer`] still reaches every node, as keyctl last
/// found it (`keyctl status`, `peer list`, `peer add`, `peer config` and `rotate` refresh it;
/// written only when the verdict changes). `keyctl status` always computes it afresh; this is
/// what `kubectl get meshpeers` shows in between.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshPeerStatus {
    /// `up to date`, or `STALE: ` and why (`node-1 key changed`, `node-3 joined`).
    #[serde(default)]
    pub config: String,
    /// Whether the peer's config no longer reaches every node.
    #[serde(default)]
    pub config_stale: bool,
    /// When keyctl came to this verdict (RFC 3339).
    #[serde(default)]
    pub checked_at: String,
}

/// A revocation of a node's keys (`weft_core::control::Revocation`), written by `keyctl
/// revoke` / `readmit` (admins only).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "MeshRevocation",
    plural = "meshrevocations",
    shortname = "mrev",
    category = "weft",
    printcolumn = r#"{"name":"Revoked keys","type":"string","jsonPath":".spec.revokedKeys"}"#,
    printcolumn = r#"{"name":"Approved key","type":"string","jsonPath":".spec.approvedKey"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshRevocationSpec {
    pub revoked_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_next_key: Option<String>,
    #[serde(default)]
    pub revoked_at: u64,
}

/// A key rotation request for one node (`weft_core::control::RotationRequest`), written by
/// `keyctl rotate` (admins only).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "MeshKeyRotation",
    plural = "meshkeyrotations",
    shortname = "mkr",
    category = "weft",
    printcolumn = r#"{"name":"Generation","type":"integer","jsonPath":".spec.generation"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshKeyRotationSpec {
    /// Rotate until the node's key generation is at least this.
    pub generation: u64,
    #[serde(default)]
    pub requested_at: u64,
}

/// The cluster PSK generation (`weft_core::control::PskGeneration`), one object named
/// `cluster`, written by `keyctl psk rotate` (admins only).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "MeshPSKGeneration",
    plural = "meshpskgenerations",
    shortname = "mpsk",
    category = "weft",
    printcolumn = r#"{"name":"Generation","type":"integer","jsonPath":".spec.generation"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshPSKGenerationSpec {
    pub generation: u64,
    #[serde(default)]
    pub requested_at: u64,
}

/// How one registry collection maps onto its resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceMap {
    pub kind: Kind,
    /// The resource's kind (`MeshNode`).
    pub crd_kind: &'static str,
    /// The resource's plural name (`meshnodes`).
    pub plural: &'static str,
    /// The field of the stored JSON that holds the object's name, moved to `metadata.name`
    /// (None: the name is not in the value, or, for claims, stays in the spec).
    pub name_field: Option<&'static str>,
}

/// Every collection's resource.
pub const RESOURCES: &[ResourceMap] = &[
    ResourceMap {
        kind: Kind::Nodes,
        crd_kind: "MeshNode",
        plural: "meshnodes",
        name_field: Some("name"),
    },
    ResourceMap {
        kind: Kind::Claims,
        crd_kind: "MeshPodCIDRClaim",
        plural: "meshpodcidrclaims",
        name_field: None,
    },
    ResourceMap {
        kind: Kind::Rotations,
        crd_kind: "MeshKeyRotation",
        plural: "meshkeyrotations",
        name_field: Some("node"),
    },
    ResourceMap {
        kind: Kind::Revocations,
        crd_kind: "MeshRevocation",
        plural: "meshrevocations",
        name_field: Some("node"),
    },
    ResourceMap {
        kind: Kind::Psk,
        crd_kind: "MeshPSKGeneration",
        plural: "meshpskgenerations",
        name_field: None,
    },
    ResourceMap {
        kind: Kind::Health,
        crd_kind: "MeshNodeHealth",
        plural: "meshnodehealths",
        name_field: Some("node"),
    },
    ResourceMap {
        kind: Kind::Peers,
        crd_kind: "MeshPeer",
        plural: "meshpeers",
        name_field: Some("name"),
    },
];

/// The resource of a collection.
pub fn resource_of(kind: Kind) -> &'static ResourceMap {
    RESOURCES
        .iter()
        .find(|r| r.kind == kind)
        .unwrap_or(&RESOURCES[0])
}

/// Every CRD weft ships, in [`RESOURCES`] order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    use kube::CustomResourceExt;
    vec![
        MeshNode::crd(),
        MeshPodCIDRClaim::crd(),
        MeshKeyRotation::crd(),
        MeshRevocation::crd(),
        MeshPSKGeneration::crd(),
        MeshNodeHealth::crd(),
        MeshPeer::crd(),
    ]
}

/// A CRD as the YAML file committed in `deploy/crds/`, with a header saying where it comes from.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    Ok(format!(
        "# Generated from crates/registry/src/kube/crd.rs; do not edit.\n\
         # Regenerate: WEFT_WRITE_CRDS=1 cargo test -p weft-registry crds\n{}",
        serde_yaml::to_string(crd)?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;
    use serde_json::Value;
    use std::path::PathBuf;

    fn crd_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds")
    }

    /// The committed CRDs are exactly what the types generate; `WEFT_WRITE_CRDS=1` rewrites them.
    #[test]
    fn crds_match_deploy() {
        let write = std::env::var_os("WEFT_WRITE_CRDS").is_some();
        let mut stale = Vec::new();
        for (crd, r) in crds().iter().zip(RESOURCES) {
            assert_eq!(crd.spec.names.plural, r.plural);
            assert_eq!(crd.spec.names.kind, r.crd_kind);
            assert_eq!(
                crd.spec.scope, "Cluster",
                "{} must be cluster-scoped",
                r.plural
            );
            assert_eq!(crd.spec.group, GROUP);
            let yaml = crd_yaml(crd).expect("yaml");
            let path = crd_dir().join(format!("{}.yaml", r.plural));
            if write {
                std::fs::create_dir_all(crd_dir()).expect("mkdir deploy/crds");
                std::fs::write(&path, &yaml).expect("write crd");
            } else if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                stale.push(path.display().to_string());
            }
        }
        assert!(
            stale.is_empty(),
            "deploy/crds differs from the Rust types: {stale:?}; run WEFT_WRITE_CRDS=1 cargo test -p weft-registry crds and commit"
        );
    }

    /// The value of `T` (a weft-core type) as JSON less its name field, through spec type `S`
    /// and back: nothing is lost or renamed.
    fn round_trip<S: Serialize + DeserializeOwned>(value: Value, name_field: Option<&str>) {
        let mut spec = value.clone();
        if let (Some(f), Some(o)) = (name_field, spec.as_object_mut()) {
            o.remove(f);
        }
        let typed: S = serde_json::from_value(spec.clone()).expect("spec parses");
        let mut back = serde_json::to_value(&typed).expect("spec serialises");
        if let Some(o) = back.as_object_mut() {
            o.remove("summary");
        }
        assert_eq!(back, spec, "spec type drops or renames a field");
    }

    #[test]
    fn specs_mirror_the_core_types() {
        use weft_core::keys::PrivateKey;
        let key = PrivateKey::generate().public_key();
        let next = PrivateKey::generate().public_key();
        let record = weft_core::NodeRecord {
            schema: weft_core::record::SCHEMA_VERSION,
            name: "n1".into(),
            public_key: key,
            endpoints: vec!["192.0.2.1:51820".parse().expect("ep")],
            private_endpoints: vec!["10.0.0.1:51820".parse().expect("ep")],
            location: Some("eu-west-1".into()),
            relay: true,
            pod_cidrs: vec!["10.42.1.0/24".parse().expect("cidr")],
            key_generation: 3,
            next_public_key: Some(next),
            key_created_at: 17,
            psk_generation: Some(2),
        };
        round_trip::<MeshNodeSpec>(
            serde_json::from_slice(&record.to_json()).expect("json"),
            Some("name"),
        );
        let claim = weft_core::alloc::Claim {
            node: "n1".into(),
            pod_cidr: "10.42.1.0/24".parse().expect("cidr"),
            generation: 4,
            renewed_at: 99,
        };
        round_trip::<MeshPodCIDRClaimSpec>(
            serde_json::from_slice(&claim.to_json()).expect("json"),
            None,
        );
        let rot = weft_core::control::RotationRequest {
            node: "n1".into(),
            generation: 5,
            requested_at: 6,
        };
        round_trip::<MeshKeyRotationSpec>(
            serde_json::from_slice(&rot.to_json()).expect("json"),
            Some("node"),
        );
        let rev = weft_core::control::Revocation {
            node: "n1".into(),
            revoked_keys: vec![key],
            approved_key: Some(next),
            approved_next_key: Some(key),
            revoked_at: 8,
        };
        round_trip::<MeshRevocationSpec>(
            serde_json::from_slice(&rev.to_json()).expect("json"),
            Some("node"),
        );
        let psk = weft_core::control::PskGeneration {
            generation: 9,
            requested_at: 10,
        };
        round_trip::<MeshPSKGenerationSpec>(
            serde_json::from_slice(&psk.to_json()).expect("json"),
            None,
        );
        let health = weft_core::health::HealthReport {
            node: "n1".into(),
            reported_at: 11,
            interval_secs: 30,
            links: vec![weft_core::health::LinkHealth {
                peer: "n2".into(),
                state: weft_core::health::LinkState::NoHandshake,
                handshake_age_secs: Some(3),
                psk_generation: Some(1),
                key_pairs: 1,
                queued: 2,
                endpoint: None,
                endpoint_source: weft_core::peer::EndpointSource::None,
                relay: None,
            }],
        };
        round_trip::<MeshNodeHealthSpec>(
            serde_json::from_slice(&health.to_json()).expect("json"),
            Some("node"),
        );
        let peer = weft_core::external::ExternalPeer {
            schema: 1,
            name: "laptop".into(),
            public_key: key,
            allowed_ips: vec!["10.99.0.2/32".parse().expect("cidr")],
            endpoint: Some("192.0.2.9:51820".parse().expect("ep")),
            created_at: 12,
            config_keys: [("n1".to_string(), next)].into_iter().collect(),
            config_printed_at: 13,
        };
        round_trip::<MeshPeerSpec>(
            serde_json::from_slice(&peer.to_json()).expect("json"),
            Some("name"),
        );
    }
}
