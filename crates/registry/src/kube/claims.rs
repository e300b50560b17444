//! Pod CIDR claims on the API server: one `MeshPodCIDRClaim` per block, named after the block
//! (`10.42.3.0/24` is `10-42-3-0-24`), with `spec.node` the holder.
//!
//! The registry's claim protocol ([`crate::claims`]) lists the claims, decides, and writes this
//! node's claim only if nothing changed ([`crate::Registry::put_if_unchanged`]). Here that write is the
//! API server's own concurrency control on the block's object: a new block is created (a
//! second creation is refused with 409 AlreadyExists) and a held block (renewal, or a reclaim
//! from a node gone past the reclaim period) is replaced with the resourceVersion it was listed
//! at (a change in between is refused with 409 Conflict; the listings are kept by
//! [`super::cas`]). So no block is ever held twice, even
//! by nodes deciding from the same listing. When a node moves to another block, its old
//! block's object is deleted (with the listed resourceVersion as precondition).

use super::{from_object, list_raw, revision_of, Inner};
use crate::{Kind, RegistryError, Revision, Snapshot};
use kube::api::{DeleteParams, DynamicObject, PostParams, Preconditions};
use serde_json::{json, Value};

/// The object name of a block: `10.42.3.0/24` is `10-42-3-0-24` (`:` of IPv6 becomes `-` too).
pub fn block_object_name(block: &str) -> String {
    block
        .chars()
        .map(|c| match c {
            '.' | '/' | ':' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

fn claim_of(node: &str, value: &[u8]) -> Result<(String, Value), RegistryError> {
    let invalid = |reason: String| RegistryError::Invalid {
        kind: Kind::Claims,
        name: node.to_string(),
        source: reason.into(),
    };
    let spec: Value =
        serde_json::from_slice(value).map_err(|e| invalid(format!("not JSON: {e}")))?;
    if spec.get("node").and_then(Value::as_str) != Some(node) {
        return Err(RegistryError::NameMismatch {
            location: format!("meshpodcidrclaims (node {node})"),
            record_name: spec
                .get("node")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string(),
        });
    }
    let block = spec
        .get("podCidr")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("no podCidr".into()))?;
    Ok((block_object_name(block), spec))
}

fn object(
    name: &str,
    spec: &Value,
    resource_version: Option<&str>,
) -> Result<DynamicObject, RegistryError> {
    let mut metadata = json!({ "name": name });
    if let Some(rv) = resource_version {
        metadata["resourceVersion"] = json!(rv);
    }
    serde_json::from_value(json!({
        "apiVersion": format!("{}/{}", super::GROUP, super::VERSION),
        "kind": "MeshPodCIDRClaim",
        "metadata": metadata,
        "spec": spec,
    }))
    .map_err(|e| RegistryError::Internal(format!("building a claim object: {e}")))
}

/// The objects of `node`'s claims: (block object, holder, resourceVersion).
async fn claims_of(inner: &Inner, node: &str) -> Result<Vec<DynamicObject>, RegistryError> {
    let (items, _) = list_raw(inner, Kind::Claims).await?;
    Ok(items
        .into_iter()
        .filter(|o| {
            o.data
                .get("spec")
                .and_then(|s| s.get("node"))
                .and_then(Value::as_str)
                == Some(node)
        })
        .collect())
}

pub(super) async fn get(inner: &Inner, node: &str) -> Result<Option<Vec<u8>>, RegistryError> {
    let mut mine: Vec<(u64, Vec<u8>)> = claims_of(inner, node)
        .await?
        .iter()
        .filter_map(|o| {
            let generation = o.data.get("spec")?.get("generation")?.as_u64()?;
            Some((generation, from_object(Kind::Claims, o)?.1))
        })
        .collect();
    mine.sort();
    Ok(mine.pop().map(|(_, v)| v))
}

pub(super) async fn delete(inner: &Inner, node: &str) -> Result<bool, RegistryError> {
    let api = inner.api(Kind::Claims).await?;
    let mut any = false;
    for o in claims_of(inner, node).await? {
        let Some(name) = o.metadata.name.clone() else {
            continue;
        };
        let dp = DeleteParams {
            preconditions: o.metadata.resource_version.clone().map(|rv| Preconditions {
                resource_version: Some(rv),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&name, &dp).await {
            Ok(_) => any = true,
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(inner.error("deleting", format!("meshpodcidrclaims/{name}"), e)),
        }
    }
    Ok(any)
}

/// A plain write of a claim (not a compare-and-swap): create the block's object, or replace it
/// when this node already holds it.
pub(super) async fn put(
    inner: &Inner,
    node: &str,
    value: &[u8],
) -> Result<Revision, RegistryError> {
    let (name, spec) = claim_of(node, value)?;
    let api = inner.api(Kind::Claims).await?;
    let target = format!("meshpodcidrclaims/{name}");
    let existing = inner
        .call("reading", target.clone(), api.get_opt(&name))
        .await?;
    let obj = match existing {
        None => {
            inner
                .call(
                    "creating",
                    target,
                    api.create(&PostParams::default(), &object(&name, &spec, None)?),
                )
                .await?
        }
        Some(o) => {
            let holder = o
                .data
                .get("spec")
                .and_then(|s| s.get("node"))
                .and_then(Value::as_str);
            if holder != Some(node) {
                return Err(RegistryError::Backend {
                    op: "writing",
                    target,
                    reason: format!("the block is held by node {}", holder.unwrap_or("?")),
                });
            }
            let rv = o.metadata.resource_version.clone();
            inner
                .call(
                    "replacing",
                    target,
                    api.replace(
                        &name,
                        &PostParams::default(),
                        &object(&name, &spec, rv.as_deref())?,
                    ),
                )
                .await?
        }
    };
    Ok(revision_of(&obj))
}

pub(super) async fn list_for_update(
    inner: &Inner,
) -> Result<(Vec<(String, Vec<u8>)>, Snapshot), RegistryError> {
    super::cas::list_for_update(inner, Kind::Claims).await
}

pub(super) async fn put_if_unchanged(
    inner: &Inner,
    node: &str,
    value: &[u8],
    snapshot: Snapshot,
) -> Result<bool, RegistryError> {
    let (name, spec) = claim_of(node, value)?;
    let listed = super::cas::listing(inner, snapshot)?;
    let api = inner.api(Kind::Claims).await?;
    let target = format!("meshpodcidrclaims/{name}");
    let result = match listed.get(&name) {
        None => {
            api.create(&PostParams::default(), &object(&name, &spec, None)?)
                .await
        }
        Some(l) => {
            api.replace(
                &name,
                &PostParams::default(),
                &object(&name, &spec, Some(&l.resource_version))?,
            )
            .await
        }
    };
    match result {
        Ok(_) => {}
        // AlreadyExists (someone created the block since the listing) or Conflict (it changed).
        Err(kube::Error::Api(s)) if s.code == 409 => return Ok(false),
        // Deleted since the listing: decide again.
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(false),
        Err(e) => return Err(inner.error("claiming", target, e)),
    }
    // This node's other blocks (it moved): free them, unless they changed since the listing.
    for (other, l) in listed.iter().filter(|(n, l)| **n != name && l.node == node) {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: Some(l.resource_version.clone()),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(other, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => {
                tracing::warn!(block = %other, error = %inner.error("freeing", format!("meshpodcidrclaims/{other}"), e), "could not free this node's previous block")
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_names_are_object_names() {
        assert_eq!(block_object_name("10.42.3.0/24"), "10-42-3-0-24");
        assert_eq!(block_object_name("fd00:42::/64"), "fd00-42---64");
        assert!(crate::check_object_name(Kind::Claims, &block_object_name("10.42.3.0/24")).is_ok());
    }

    #[test]
    fn a_claim_must_name_its_node() {
        let v = br#"{"node":"a","podCidr":"10.42.1.0/24","generation":1,"renewedAt":2}"#;
        assert_eq!(claim_of("a", v).expect("ok").0, "10-42-1-0-24");
        assert!(matches!(
            claim_of("b", v),
            Err(RegistryError::NameMismatch { .. })
        ));
        assert!(matches!(
            claim_of("a", b"{}"),
            Err(RegistryError::NameMismatch { .. })
        ));
    }
}
