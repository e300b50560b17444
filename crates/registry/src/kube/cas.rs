//! Compare-and-swap on the API server ([`crate::Registry::list_for_update`] /
//! [`crate::Registry::put_if_unchanged`]).
//!
//! A listing keeps every object's resourceVersion under a snapshot number. A write after it
//! creates the object if the listing had none of that name (409 AlreadyExists when one appeared
//! since) or replaces it with the resourceVersion it was listed at (409 Conflict when it
//! changed since, 404 when it went): the API server's own optimistic concurrency, per object.
//! Unlike the etcd and dir backends this does not notice a change to *another* object of the
//! collection since the listing; what weft writes this way is checked per object (a node's
//! claim is on its block's object, see [`super::claims`]; a revocation, rotation request or
//! external peer is one object per name), and keyctl is the only writer of those.

use super::{from_object, list_raw, resource_of, Inner, GROUP, VERSION};
use crate::{Kind, RegistryError, Snapshot};
use kube::api::{DynamicObject, PostParams};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// How many listings are kept (an attempt uses the newest one).
const KEPT: usize = 64;

/// One object as listed: its registry name (a claim's node) and resourceVersion.
#[derive(Debug, Clone)]
pub(crate) struct Listed {
    pub node: String,
    pub resource_version: String,
}

/// Listings taken by [`list_for_update`], by snapshot number; keyed by object name.
#[derive(Debug, Default)]
pub(crate) struct Snapshots {
    next: u64,
    taken: BTreeMap<u64, BTreeMap<String, Listed>>,
}

/// Lists `kind` and keeps what was listed under a new snapshot number.
pub(super) async fn list_for_update(
    inner: &Inner,
    kind: Kind,
) -> Result<(Vec<(String, Vec<u8>)>, Snapshot), RegistryError> {
    let (items, _) = list_raw(inner, kind).await?;
    let mut listed = BTreeMap::new();
    let mut out = Vec::new();
    for o in &items {
        let (Some(name), Some(rv)) = (o.metadata.name.clone(), o.metadata.resource_version.clone())
        else {
            continue;
        };
        if let Some((registry_name, bytes)) = from_object(kind, o) {
            listed.insert(
                name,
                Listed {
                    node: registry_name.clone(),
                    resource_version: rv,
                },
            );
            out.push((registry_name, bytes));
        }
    }
    out.sort();
    let mut snaps = inner
        .snapshots
        .lock()
        .map_err(|_| RegistryError::Internal("snapshot lock poisoned".into()))?;
    snaps.next += 1;
    let id = snaps.next;
    snaps.taken.insert(id, listed);
    while snaps.taken.len() > KEPT {
        snaps.taken.pop_first();
    }
    Ok((out, Snapshot(id)))
}

/// What snapshot `snapshot` listed, by object name.
pub(super) fn listing(
    inner: &Inner,
    snapshot: Snapshot,
) -> Result<BTreeMap<String, Listed>, RegistryError> {
    inner
        .snapshots
        .lock()
        .map_err(|_| RegistryError::Internal("snapshot lock poisoned".into()))?
        .taken
        .get(&snapshot.0)
        .cloned()
        .ok_or_else(|| RegistryError::Internal(format!("unknown snapshot {}", snapshot.0)))
}

/// Writes object `name` of `kind` with `spec` if it did not change since `snapshot`; false when
/// it did (list again and decide again).
pub(super) async fn put_if_unchanged(
    inner: &Inner,
    kind: Kind,
    name: &str,
    spec: Value,
    snapshot: Snapshot,
) -> Result<bool, RegistryError> {
    let listed = listing(inner, snapshot)?;
    let r = resource_of(kind);
    let mut metadata = json!({ "name": name });
    if let Some(l) = listed.get(name) {
        metadata["resourceVersion"] = json!(l.resource_version);
    }
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": r.crd_kind,
        "metadata": metadata,
        "spec": spec,
    }))
    .map_err(|e| RegistryError::Internal(format!("building a {} object: {e}", r.crd_kind)))?;
    let api = inner.api(kind).await?;
    let result = match listed.get(name) {
        None => api.create(&PostParams::default(), &obj).await,
        Some(_) => api.replace(name, &PostParams::default(), &obj).await,
    };
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(false),
        Err(e) => Err(inner.error("writing", format!("{}/{name}", r.plural), e)),
    }
}
