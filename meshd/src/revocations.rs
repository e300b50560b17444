//! Revocations (`revocations/NAME`, written by `keyctl revoke` / `keyctl readmit`): watched like
//! the node records, kept in memory by the event loop, and cached in
//! `STATE_DIR/revocations.json` so a meshd started while the registry is unreachable still
//! refuses revoked nodes (the peer cache holds their records too).
//!
//! Deciding which records a revocation refuses is weft-core's
//! ([`weft_core::control::filter_revoked`]); this module only moves revocations around.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use weft_core::control::Revocation;
use weft_registry::{Connectivity, Event, Object, Registry, Typed};

/// `STATE_DIR/revocations.json`: the last known revocations.
pub const REVOCATION_CACHE_FILE: &str = "revocations.json";

/// How long start-up waits for the registry's revocations before using the cache.
pub const STARTUP_WAIT: Duration = Duration::from_secs(1);

/// The revocations by node name.
pub type Revocations = BTreeMap<String, Revocation>;

/// Reads the revocation cache; a missing or bad file (or bad entries in it) is logged and
/// skipped.
pub fn load_cache(state_dir: &Path) -> Revocations {
    let path = state_dir.join(REVOCATION_CACHE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Revocations::new(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the revocation cache");
            return Revocations::new();
        }
    };
    let items: Vec<serde_json::Value> = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignoring a malformed revocation cache");
            return Revocations::new();
        }
    };
    items
        .into_iter()
        .filter_map(|v| match Revocation::from_json(v.to_string().as_bytes()) {
            Ok(r) => Some((r.node.clone(), r)),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "skipping a cached revocation");
                None
            }
        })
        .collect()
}

/// Writes the revocation cache atomically when it changed (`last` is the text last written).
pub fn save_cache(state_dir: &Path, revocations: &Revocations, last: &mut String) {
    let items: Vec<&Revocation> = revocations.values().collect();
    let text = match serde_json::to_string(&items) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode the revocation cache");
            return;
        }
    };
    if text == *last {
        return;
    }
    let path = state_dir.join(REVOCATION_CACHE_FILE);
    let tmp = state_dir.join(format!(
        ".{REVOCATION_CACHE_FILE}.tmp{}",
        std::process::id()
    ));
    match std::fs::write(&tmp, &text).and_then(|_| std::fs::rename(&tmp, &path)) {
        Ok(()) => *last = text,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot write the revocation cache")
        }
    }
}

/// The revocations at start-up: listed from the registry (bounded by [`STARTUP_WAIT`]), else
/// the cache, so the first reconcile already refuses revoked nodes.
pub async fn initial(registry: &Arc<dyn Registry>, state_dir: &Path) -> Revocations {
    let typed: Typed<Revocation> = Typed::new(registry.clone());
    match tokio::time::timeout(STARTUP_WAIT, typed.list()).await {
        Ok(Ok((items, _))) => items.into_iter().map(|r| (r.node.clone(), r)).collect(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not list revocations; using the cached ones");
            load_cache(state_dir)
        }
        Err(_) => {
            tracing::warn!("registry did not list revocations in time; using the cached ones");
            load_cache(state_dir)
        }
    }
}

/// Applies a watch event to the known revocations; true if they changed. An unreachable
/// registry changes nothing: a revocation is never lifted because it cannot be read.
pub fn apply(revocations: &mut Revocations, ev: Event<Revocation>) -> bool {
    match ev {
        Event::Reset { items, .. } => {
            let new: Revocations = items.into_iter().map(|r| (r.node.clone(), r)).collect();
            let changed = new != *revocations;
            *revocations = new;
            changed
        }
        Event::Upsert { item, .. } => {
            let changed = revocations.get(&item.node) != Some(&item);
            revocations.insert(item.node.clone(), item);
            changed
        }
        Event::Delete { name, .. } => revocations.remove(&name).is_some(),
        Event::Status(Connectivity::Connected) => false,
        Event::Status(Connectivity::Unreachable(why)) => {
            tracing::debug!(reason = %why, "revocations unreadable; keeping the known ones");
            false
        }
    }
}

/// Forwards the events of one collection to the event loop; retries with backoff when the
/// watch cannot start or stops.
pub async fn watch<T: Object>(registry: Arc<dyn Registry>, tx: mpsc::Sender<Event<T>>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match Typed::<T>::new(registry.clone()).watch(None).await {
            Ok(mut w) => {
                backoff = Duration::from_millis(200);
                while let Some(ev) = w.next().await {
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
                tracing::warn!(collection = %T::KIND, "registry watch stopped; restarting");
            }
            Err(e) => {
                tracing::warn!(collection = %T::KIND, error = %e, "cannot watch the registry");
                let _ = tx
                    .send(Event::Status(Connectivity::Unreachable(e.to_string())))
                    .await;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_core::PrivateKey;
    use weft_registry::Revision;

    fn rev(node: &str) -> Revocation {
        Revocation {
            node: node.into(),
            revoked_keys: vec![PrivateKey::generate().public_key()],
            approved_key: None,
            approved_next_key: None,
            revoked_at: 7,
        }
    }

    #[test]
    fn events_and_cache() {
        let mut known = Revocations::new();
        let (a, b) = (rev("a"), rev("b"));
        assert!(apply(
            &mut known,
            Event::Reset {
                items: vec![a.clone()],
                revision: Revision(1)
            }
        ));
        assert!(!apply(
            &mut known,
            Event::Upsert {
                item: a.clone(),
                revision: Revision(2)
            }
        ));
        assert!(apply(
            &mut known,
            Event::Upsert {
                item: b.clone(),
                revision: Revision(3)
            }
        ));
        // Unreachable never lifts a revocation.
        assert!(!apply(
            &mut known,
            Event::Status(Connectivity::Unreachable("down".into()))
        ));
        assert_eq!(known.len(), 2);

        let dir = tempfile::tempdir().expect("tmp");
        let mut last = String::new();
        save_cache(dir.path(), &known, &mut last);
        assert!(!last.is_empty());
        assert_eq!(load_cache(dir.path()), known);

        assert!(apply(
            &mut known,
            Event::Delete {
                name: "a".into(),
                revision: Revision(4)
            }
        ));
        assert_eq!(known.keys().collect::<Vec<_>>(), ["b"]);
        std::fs::write(dir.path().join(REVOCATION_CACHE_FILE), "not json").expect("write");
        assert!(load_cache(dir.path()).is_empty());
    }
}
