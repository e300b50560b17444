//! Operator requests stored in the registry by `keyctl` (written by the admin user only; nodes
//! read them): key rotation requests and revocations.
//!
//! In: JSON bytes from the registry. Out: checked values, or an error naming the bad field.

use crate::keys::PublicKey;
use crate::record::check_name;
use serde::{Deserialize, Serialize};

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
        if let Some(k) = &self.approved_key {
            if self.revoked_keys.contains(k) {
                return Err(ControlError::Field {
                    field: "approvedKey",
                    reason: "is one of the revoked keys".into(),
                });
            }
        }
        Ok(())
    }

    /// Whether a node publishing `key` may be a peer: only with the approved key, and never with
    /// a revoked one.
    pub fn admits(&self, key: &PublicKey) -> bool {
        !self.revoked_keys.contains(key) && self.approved_key.as_ref() == Some(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

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
            revoked_at: 1,
        };
        assert!(!r.admits(&a) && !r.admits(&b));
        r.approved_key = Some(b);
        assert!(!r.admits(&a) && r.admits(&b));
        assert_eq!(Revocation::from_json(&r.to_json()), Ok(r.clone()));
        r.approved_key = Some(a);
        assert!(r.check().is_err());
        assert!(Revocation::from_json(br#"{"node":"N","revokedKeys":[]}"#).is_err());
        assert!(Revocation::from_json(br#"{"node":"n","revokedKeys":["x"]}"#).is_err());
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
