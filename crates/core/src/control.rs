//! Operator requests stored in the registry by `keyctl` (written by the admin user only; nodes
//! read them): key rotation requests, revocations and the cluster PSK generation.
//!
//! In: JSON bytes from the registry, and node records (and external peer records) to check
//! against revocations. Out: checked values, or an error naming the bad field; the records a
//! revocation admits ([`filter_revoked`], [`filter_revoked_external`]). Revocations are by name,
//! and names are unique across nodes and external peers (see [`crate::reconcile::
//! desired_peer_set`]), so `keyctl revoke NAME` works for both.

use crate::external::ExternalPeer;
use crate::keys::PublicKey;
use crate::record::{check_name, NodeRecord};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Why a control object was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("not valid JSON for this object: {0}")]
    Json(String),
    #[error("field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
}

fn parse<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ControlError> {
    serde_json::from_slice(bytes).map_err(|e| ControlError::Json(e.to_string()))
}

fn check_node(node: &str) -> Result<(), ControlError> {
    check_name(node).map_err(|e| ControlError::Field {
        field: "node",
        reason: e.to_string(),
    })
}

/// `rotations/NAME`: node NAME should rotate its key until its record's `keyGeneration` reaches
/// `generation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationRequest {
    pub node: String,
    /// The key generation the node must reach (its current one + 1 when requested).
    pub generation: u64,
    /// Unix seconds.
    #[serde(default)]
    pub requested_at: u64,
}

impl RotationRequest {
    pub fn from_json(bytes: &[u8]) -> Result<Self, ControlError> {
        let r: RotationRequest = parse(bytes)?;
        r.check()?;
        Ok(r)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub fn check(&self) -> Result<(), ControlError> {
        check_node(&self.node)?;
        if self.generation == 0 {
            return Err(ControlError::Field {
                field: "generation",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// The name of the one [`PskGeneration`] object (`psk/cluster`).
pub const PSK_OBJECT: &str = "cluster";

/// `psk/cluster`: the cluster PSK generation every node should use. `keyctl psk rotate` bumps
/// it; each node then derives new PSKs (see [`crate::psk`]) and publishes the generation in its
/// record. Only a number: the cluster secret itself never enters the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PskGeneration {
    pub generation: u64,
    /// Unix seconds.
    #[serde(default)]
    pub requested_at: u64,
}

impl PskGeneration {
    pub fn from_json(bytes: &[u8]) -> Result<Self, ControlError> {
        parse(bytes)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Every generation number is valid; the check exists for symmetry with the other objects.
    pub fn check(&self) -> Result<(), ControlError> {
        Ok(())
    }
}

/// `revocations/NAME`: node NAME's listed keys are refused everywhere, and the node takes part in
/// the mesh only with exactly `approvedKey` (set by `keyctl readmit`), never with a key it merely
/// publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocation {
    pub node: String,
    /// Keys never accepted again for this node (the one revoked, and earlier ones).
    pub revoked_keys: Vec<PublicKey>,
    /// The one key the operator approved after the revocation, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_key: Option<PublicKey>,
    /// The successor of the approved key: the next key the readmitted node announced in a
    /// rotation that `keyctl rotate` asked for, approved by keyctl when it saw the announcement
    /// (a node cannot approve its own keys). Admitted like the approved key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_next_key: Option<PublicKey>,
    /// Unix seconds.
    #[serde(default)]
    pub revoked_at: u64,
}

impl Revocation {
    pub fn from_json(bytes: &[u8]) -> Result<Self, ControlError> {
        let r: Revocation = parse(bytes)?;
        r.check()?;
        Ok(r)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub fn check(&self) -> Result<(), ControlError> {
        check_node(&self.node)?;
        for (field, key) in [
            ("approvedKey", &self.approved_key),
            ("approvedNextKey", &self.approved_next_key),
        ] {
            if key.is_some_and(|k| self.revoked_keys.contains(&k)) {
                return Err(ControlError::Field {
                    field,
                    reason: "is one of the revoked keys".into(),
                });
            }
        }
        if self.approved_next_key.is_some() && self.approved_key.is_none() {
            return Err(ControlError::Field {
                field: "approvedNextKey",
                reason: "needs an approvedKey it succeeds".into(),
            });
        }
        if self.approved_next_key.is_some() && self.approved_next_key == self.approved_key {
            return Err(ControlError::Field {
                field: "approvedNextKey",
                reason: "must differ from approvedKey".into(),
            });
        }
        Ok(())
    }

    /// Whether a node publishing `key` may be a peer: only with the approved key (or its approved
    /// successor), and never with a revoked one.
    pub fn admits(&self, key: &PublicKey) -> bool {
        !self.revoked_keys.contains(key)
            && (self.approved_key.as_ref() == Some(key)
                || self.approved_next_key.as_ref() == Some(key))
    }

    /// [`Revocation::admits`] with the reason when it does not.
    pub fn verdict(&self, key: &PublicKey) -> Result<(), Revoked> {
        if self.revoked_keys.contains(key) {
            return Err(Revoked::KeyRevoked {
                key: key.fingerprint(),
            });
        }
        if self.approved_next_key.as_ref() == Some(key) {
            return Ok(());
        }
        match &self.approved_key {
            Some(a) if a == key => Ok(()),
            approved => Err(Revoked::NotApproved {
                key: key.fingerprint(),
                approved: approved.map(|a| a.fingerprint()),
            }),
        }
    }
}

/// Why a node record is refused because of its node's revocation. Every message starts with
/// "revoked" (that is what `meshd status` lists under `refusedRecords`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Revoked {
    #[error("revoked: key {key} was revoked (keyctl revoke)")]
    KeyRevoked { key: String },
    #[error("revoked: key {key} is not the key approved by keyctl readmit ({})",
        approved.as_deref().map_or_else(|| "none approved yet".to_string(), |a| format!("approved: {a}")))]
    NotApproved {
        key: String,
        approved: Option<String>,
    },
}

/// Applies revocations (by node name) to node records: which records a node may peer with, and
/// the refused ones with their reason.
///
/// A record whose node has no revocation passes unchanged. One whose node has a revocation passes
/// only if the revocation admits its `publicKey` ([`Revocation::admits`]); its `nextPublicKey`
/// is kept only if admitted too, and dropped otherwise, so a key the operator did not approve
/// never becomes a peer key (not even mid-rotation). Revocations for names without a record are
/// simply kept by the caller: they apply when the node appears.
pub fn filter_revoked(
    records: impl IntoIterator<Item = NodeRecord>,
    revocations: &BTreeMap<String, Revocation>,
) -> (Vec<NodeRecord>, Vec<(String, Revoked)>) {
    let mut admitted = Vec::new();
    let mut refused = Vec::new();
    for mut r in records {
        let Some(rev) = revocations.get(&r.name) else {
            admitted.push(r);
            continue;
        };
        match rev.verdict(&r.public_key) {
            Ok(()) => {
                if r.next_public_key.is_some_and(|k| !rev.admits(&k)) {
                    r.next_public_key = None;
                }
                admitted.push(r);
            }
            Err(why) => refused.push((r.name.clone(), why)),
        }
    }
    (admitted, refused)
}

/// [`filter_revoked`] for external peers: one whose name has a revocation passes only while
/// its key is exactly the approved one (an external peer has no next key).
pub fn filter_revoked_external(
    peers: impl IntoIterator<Item = ExternalPeer>,
    revocations: &BTreeMap<String, Revocation>,
) -> (Vec<ExternalPeer>, Vec<(String, Revoked)>) {
    let mut admitted = Vec::new();
    let mut refused = Vec::new();
    for p in peers {
        match revocations
            .get(&p.name)
            .map(|rev| rev.verdict(&p.public_key))
        {
            None | Some(Ok(())) => admitted.push(p),
            Some(Err(why)) => refused.push((p.name.clone(), why)),
        }
    }
    (admitted, refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    #[test]
    fn external_peers_revoked_by_name() {
        let (old, fresh) = (key(), key());
        let peer = |name: &str, k: PublicKey| ExternalPeer {
            schema: 1,
            name: name.into(),
            public_key: k,
            allowed_ips: vec!["10.99.0.1/32".parse().expect("cidr")],
            endpoint: None,
            created_at: 0,
            config_keys: BTreeMap::new(),
            config_printed_at: 0,
        };
        let (laptop, vm) = (peer("laptop", old), peer("vm", key()));
        let mut revs = BTreeMap::new();
        revs.insert(
            "laptop".to_string(),
            Revocation {
                node: "laptop".into(),
                revoked_keys: vec![old],
                approved_key: None,
                approved_next_key: None,
                revoked_at: 1,
            },
        );
        let (ok, refused) = filter_revoked_external(vec![laptop.clone(), vm.clone()], &revs);
        assert_eq!(ok, vec![vm.clone()]);
        assert_eq!(refused.len(), 1);
        assert!(refused[0].1.to_string().starts_with("revoked"));
        // Re-added with a new key: refused until that key is approved.
        let laptop2 = peer("laptop", fresh);
        assert!(filter_revoked_external(vec![laptop2.clone()], &revs)
            .0
            .is_empty());
        if let Some(r) = revs.get_mut("laptop") {
            r.approved_key = Some(fresh);
        }
        assert_eq!(
            filter_revoked_external(vec![laptop2.clone(), laptop], &revs).0,
            vec![laptop2]
        );
    }

    #[test]
    fn revocation_admits_only_the_approved_key() {
        let (a, b) = (
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
        );
        let mut r = Revocation {
            node: "n1".into(),
            revoked_keys: vec![a],
            approved_key: None,
            approved_next_key: None,
            revoked_at: 1,
        };
        assert!(!r.admits(&a) && !r.admits(&b));
        r.approved_key = Some(b);
        assert!(!r.admits(&a) && r.admits(&b));
        assert_eq!(Revocation::from_json(&r.to_json()), Ok(r.clone()));
        // An approved successor (keyctl rotate of a readmitted node) is admitted too.
        let c = PrivateKey::generate().public_key();
        r.approved_next_key = Some(c);
        assert!(r.admits(&b) && r.admits(&c) && !r.admits(&a));
        assert!(r.verdict(&c).is_ok() && r.check().is_ok());
        assert_eq!(Revocation::from_json(&r.to_json()), Ok(r.clone()));
        r.approved_next_key = Some(a);
        assert!(r.check().is_err(), "a revoked successor");
        r.approved_next_key = Some(b);
        assert!(r.check().is_err(), "successor equal to the approved key");
        r.approved_next_key = None;
        r.approved_key = Some(a);
        assert!(r.check().is_err());
        assert!(Revocation::from_json(br#"{"node":"N","revokedKeys":[]}"#).is_err());
        assert!(Revocation::from_json(br#"{"node":"n","revokedKeys":["x"]}"#).is_err());
    }

    fn record(name: &str, i: u8, key: PublicKey) -> NodeRecord {
        NodeRecord {
            schema: crate::record::SCHEMA_VERSION,
            name: name.into(),
            public_key: key,
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

    fn key() -> PublicKey {
        PrivateKey::generate().public_key()
    }

    #[test]
    fn filter_revoked_refuses_revoked_and_unapproved_keys() {
        let (old, fresh, other) = (key(), key(), key());
        let a = record("a", 1, key());
        let b = record("b", 2, old);
        let mut revs = BTreeMap::new();
        // Without revocations everything passes unchanged.
        let (ok, refused) = filter_revoked(vec![a.clone(), b.clone()], &revs);
        assert_eq!(ok, vec![a.clone(), b.clone()]);
        assert!(refused.is_empty());

        let mut rev = Revocation {
            node: "b".into(),
            revoked_keys: vec![old],
            approved_key: None,
            approved_next_key: None,
            revoked_at: 1,
        };
        revs.insert("b".to_string(), rev.clone());
        // A revocation for a node without a record is kept by the caller and changes nothing.
        revs.insert(
            "ghost".to_string(),
            Revocation {
                node: "ghost".into(),
                revoked_keys: vec![],
                approved_key: None,
                approved_next_key: None,
                revoked_at: 1,
            },
        );
        // The revoked key, published again: refused.
        let (ok, refused) = filter_revoked(vec![a.clone(), b.clone()], &revs);
        assert_eq!(ok, vec![a.clone()]);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, "b");
        assert!(matches!(refused[0].1, Revoked::KeyRevoked { .. }));
        assert!(
            refused[0].1.to_string().starts_with("revoked"),
            "{}",
            refused[0].1
        );
        // A fresh key the node merely publishes: refused too.
        let b_fresh = record("b", 2, fresh);
        let (ok, refused) = filter_revoked(vec![b_fresh.clone()], &revs);
        assert!(ok.is_empty());
        assert_eq!(
            refused[0].1,
            Revoked::NotApproved {
                key: fresh.fingerprint(),
                approved: None
            }
        );
        assert!(refused[0].1.to_string().starts_with("revoked"));
        // Approved: exactly that key passes, any other does not.
        rev.approved_key = Some(fresh);
        revs.insert("b".to_string(), rev.clone());
        let (ok, refused) = filter_revoked(vec![b_fresh.clone()], &revs);
        assert_eq!(ok, vec![b_fresh.clone()]);
        assert!(refused.is_empty());
        let (ok, refused) = filter_revoked(vec![record("b", 2, other), b.clone()], &revs);
        assert!(ok.is_empty());
        assert_eq!(refused.len(), 2);
        assert!(refused[0].1.to_string().contains(&fresh.fingerprint()));
        // An unapproved next key is dropped; the approved current key stays a peer.
        let mut rotating = b_fresh.clone();
        rotating.next_public_key = Some(other);
        let (ok, _) = filter_revoked(vec![rotating.clone()], &revs);
        assert_eq!(ok, vec![b_fresh.clone()]);
        rotating.next_public_key = Some(old);
        let (ok, _) = filter_revoked(vec![rotating], &revs);
        assert_eq!(ok[0].next_public_key, None);
        // Unrevoked nodes keep their next key.
        let mut a_rot = a.clone();
        a_rot.next_public_key = Some(other);
        let (ok, _) = filter_revoked(vec![a_rot.clone()], &revs);
        assert_eq!(ok, vec![a_rot]);
    }

    #[test]
    fn rotation_request_checks() {
        let r = RotationRequest {
            node: "n1".into(),
            generation: 3,
            requested_at: 5,
        };
        assert_eq!(RotationRequest::from_json(&r.to_json()), Ok(r));
        assert!(RotationRequest::from_json(br#"{"node":"n1","generation":0}"#).is_err());
        assert!(RotationRequest::from_json(br#"{"node":"n1"}"#).is_err());
    }
}
