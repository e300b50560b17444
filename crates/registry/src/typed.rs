//! The typed layer: objects decoded and checked on the way out of the registry, validated on the
//! way in. A bad object is logged (naming its file/key and the error) and skipped; it never ends
//! a watch.

use crate::{
    BoxError, Connectivity, Kind, RawEvent, Registry, RegistryError, Revision, WatchStream,
};
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tracing::{debug, warn};
use weft_core::{NodeRecord, RecordError};

/// A type stored in one registry collection.
pub trait Object: Clone + Send + Sync + 'static {
    /// The collection it lives in.
    const KIND: Kind;
    /// Decode / validation error; its message should name the field at fault.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Parses and checks stored bytes.
    fn decode(bytes: &[u8]) -> Result<Self, Self::Error>;
    /// The bytes to store.
    fn encode(&self) -> Vec<u8>;
    /// The name the object must be stored under.
    fn object_name(&self) -> &str;
    /// Checks a value before it is stored.
    fn validate(&self) -> Result<(), Self::Error>;
}

impl Object for NodeRecord {
    const KIND: Kind = Kind::Nodes;
    type Error = RecordError;

    fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        NodeRecord::from_json(bytes)
    }
    fn encode(&self) -> Vec<u8> {
        self.to_json()
    }
    fn object_name(&self) -> &str {
        &self.name
    }
    fn validate(&self) -> Result<(), RecordError> {
        self.check()
    }
}

/// `Object` for a JSON object type with `from_json`, `to_json` and `check`, stored under the name
/// `$name` gives for it.
macro_rules! json_object {
    ($t:ty, $kind:expr, $err:ty, |$s:ident| $name:expr) => {
        impl Object for $t {
            const KIND: Kind = $kind;
            type Error = $err;

            fn decode(bytes: &[u8]) -> Result<Self, Self::Error> {
                <$t>::from_json(bytes)
            }
            fn encode(&self) -> Vec<u8> {
                self.to_json()
            }
            fn object_name(&self) -> &str {
                let $s = self;
                $name
            }
            fn validate(&self) -> Result<(), Self::Error> {
                self.check()
            }
        }
    };
}

use weft_core::control::ControlError;
json_object!(
    weft_core::control::RotationRequest,
    Kind::Rotations,
    ControlError,
    |r| &r.node
);
json_object!(
    weft_core::control::Revocation,
    Kind::Revocations,
    ControlError,
    |r| &r.node
);
json_object!(
    weft_core::control::PskGeneration,
    Kind::Psk,
    ControlError,
    |_r| weft_core::control::PSK_OBJECT
);
json_object!(
    weft_core::health::HealthReport,
    Kind::Health,
    weft_core::health::HealthError,
    |r| &r.node
);
json_object!(
    weft_core::external::ExternalPeer,
    Kind::Peers,
    weft_core::external::ExternalError,
    |r| &r.name
);

/// One event of a typed watch; see [`RawEvent`] for the meaning of each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<T> {
    /// Every valid object, sorted by name. Replaces what the consumer knew.
    Reset {
        items: Vec<T>,
        revision: Revision,
    },
    Upsert {
        item: T,
        revision: Revision,
    },
    Delete {
        name: String,
        revision: Revision,
    },
    Status(Connectivity),
}

/// Why a stored object was not accepted.
fn decode_object<T: Object>(
    registry: &dyn Registry,
    name: &str,
    bytes: &[u8],
) -> Result<T, RegistryError> {
    let item = T::decode(bytes).map_err(|e| RegistryError::Decode {
        location: registry.location(T::KIND, name),
        source: Box::new(e),
    })?;
    if item.object_name() != name {
        return Err(RegistryError::NameMismatch {
            location: registry.location(T::KIND, name),
            record_name: item.object_name().to_string(),
        });
    }
    Ok(item)
}

/// The name `item` is stored under, once the name and the object are checked.
fn checked_name<T: Object>(item: &T) -> Result<&str, RegistryError> {
    let name = item.object_name();
    crate::check_object_name(T::KIND, name)?;
    item.validate().map_err(|e| RegistryError::Invalid {
        kind: T::KIND,
        name: name.to_string(),
        source: Box::new(e) as BoxError,
    })?;
    Ok(name)
}

async fn put_object<T: Object>(
    registry: &dyn Registry,
    item: &T,
) -> Result<Revision, RegistryError> {
    let name = checked_name(item)?;
    registry.put(T::KIND, name, &item.encode()).await
}

async fn get_object<T: Object>(
    registry: &dyn Registry,
    name: &str,
) -> Result<Option<T>, RegistryError> {
    match registry.get(T::KIND, name).await? {
        None => Ok(None),
        Some(bytes) => decode_object(registry, name, &bytes).map(Some),
    }
}

pub(crate) async fn list_objects<T: Object>(
    registry: &dyn Registry,
) -> Result<(Vec<T>, Revision), RegistryError> {
    let (raw, revision) = registry.list(T::KIND).await?;
    let items = raw
        .into_iter()
        .filter_map(
            |(name, bytes)| match decode_object(registry, &name, &bytes) {
                Ok(item) => Some(item),
                Err(e) => {
                    warn!(error = %e, "skipping invalid registry object");
                    None
                }
            },
        )
        .collect();
    Ok((items, revision))
}

/// A typed view of one collection.
pub struct Typed<T> {
    registry: Arc<dyn Registry>,
    _type: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Typed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Typed")
            .field("registry", &self.registry)
            .field("type", &std::any::type_name::<T>())
            .finish()
    }
}

impl<T> Clone for Typed<T> {
    fn clone(&self) -> Self {
        Typed {
            registry: self.registry.clone(),
            _type: PhantomData,
        }
    }
}

impl<T: Object> Typed<T> {
    pub fn new(registry: Arc<dyn Registry>) -> Self {
        Typed {
            registry,
            _type: PhantomData,
        }
    }

    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.registry
    }

    /// Validates `item` and stores it under its own name.
    pub async fn put(&self, item: &T) -> Result<Revision, RegistryError> {
        put_object(&*self.registry, item).await
    }

    /// Reads and decodes one object. A stored object that does not decode, or whose name does not
    /// match, is an error here (a watch would skip it).
    pub async fn get(&self, name: &str) -> Result<Option<T>, RegistryError> {
        get_object(&*self.registry, name).await
    }

    pub async fn delete(&self, name: &str) -> Result<bool, RegistryError> {
        self.registry.delete(T::KIND, name).await
    }

    /// Every valid object, sorted by name; invalid ones are logged and skipped.
    pub async fn list(&self) -> Result<(Vec<T>, Revision), RegistryError> {
        list_objects(&*self.registry).await
    }

    pub async fn watch(&self, from: Option<Revision>) -> Result<TypedWatch<T>, RegistryError> {
        let raw = self.registry.watch(T::KIND, from).await?;
        Ok(TypedWatch::new(raw, self.registry.clone()))
    }
}

/// A decoded watch. Invalid objects are skipped with a warning naming the object's location and
/// the error, once per content change.
///
/// "Skipped" means the last valid version of that object, if any, stays in force: a valid
/// record overwritten with garbage is not an upsert of garbage nor a delete, so consumers keep
/// the previous version (it is also kept in later `Reset`s while the garbage stays). Deleting
/// the file deletes the object as usual.
pub struct TypedWatch<T> {
    raw: WatchStream,
    registry: Arc<dyn Registry>,
    /// The last valid version of each object delivered to the consumer.
    known: BTreeMap<String, T>,
    /// Per object, a hash of the invalid content last warned about.
    warned: HashMap<String, u64>,
    /// Invalid objects that keep changing get one warning per [`repeat_interval`].
    repeats: weft_core::repeats::Repeats,
}

/// Seconds between two warnings about the same invalid object that keeps changing.
static REPEAT_INTERVAL_SECS: AtomicU64 = AtomicU64::new(60);

/// Sets how often a warning about the same invalid registry object may repeat (meshd's
/// `--log-repeat-interval`); watches made afterwards use it.
pub fn set_repeat_interval(d: std::time::Duration) {
    REPEAT_INTERVAL_SECS.store(d.as_secs().max(1), Ordering::Relaxed);
}

/// See [`set_repeat_interval`].
pub fn repeat_interval() -> std::time::Duration {
    std::time::Duration::from_secs(REPEAT_INTERVAL_SECS.load(Ordering::Relaxed))
}

impl<T> std::fmt::Debug for TypedWatch<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedWatch")
            .field("registry", &self.registry)
            .field("type", &std::any::type_name::<T>())
            .field("known", &self.known.len())
            .finish()
    }
}

/// The event of a warning about an invalid registry object.
const REFUSED: &str = "registry_object_refused";

fn content_hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

impl<T: Object> TypedWatch<T> {
    /// Decodes a raw watch of `T::KIND` on `registry` (for custom backends and tests).
    pub fn new(raw: WatchStream, registry: Arc<dyn Registry>) -> Self {
        TypedWatch {
            raw,
            registry,
            known: BTreeMap::new(),
            warned: HashMap::new(),
            repeats: weft_core::repeats::Repeats::new(repeat_interval()),
        }
    }

    /// The next event; `None` only when the backend's watcher has stopped for good.
    pub async fn next(&mut self) -> Option<Event<T>> {
        loop {
            match self.raw.next().await? {
                RawEvent::Reset { items, revision } => {
                    let mut known = BTreeMap::new();
                    for (name, bytes) in items {
                        if let Some(item) = self.accept(&name, &bytes) {
                            known.insert(name, item);
                        } else if let Some(previous) = self.known.remove(&name) {
                            known.insert(name, previous);
                        }
                    }
                    self.warned.retain(|n, _| known.contains_key(n));
                    self.known = known;
                    return Some(Event::Reset {
                        items: self.known.values().cloned().collect(),
                        revision,
                    });
                }
                RawEvent::Upsert {
                    name,
                    value,
                    revision,
                } => {
                    if let Some(item) = self.accept(&name, &value) {
                        self.known.insert(name, item.clone());
                        return Some(Event::Upsert { item, revision });
                    }
                }
                RawEvent::Delete { name, revision } => {
                    self.warned.remove(&name);
                    self.repeats.clear(REFUSED, &name);
                    if self.known.remove(&name).is_some() {
                        return Some(Event::Delete { name, revision });
                    }
                    debug!(object = %self.registry.location(T::KIND, &name), "invalid registry object deleted");
                }
                RawEvent::Status(c) => return Some(Event::Status(c)),
            }
        }
    }

    /// Decodes one object, logging (once per content) why it is skipped.
    fn accept(&mut self, name: &str, bytes: &[u8]) -> Option<T> {
        match decode_object::<T>(&*self.registry, name, bytes) {
            Ok(item) => {
                self.warned.remove(name);
                self.repeats.clear(REFUSED, name);
                Some(item)
            }
            Err(e) => {
                let hash = content_hash(bytes);
                if self.warned.get(name) != Some(&hash) {
                    self.warned.insert(name.to_string(), hash);
                    let keeping = self.known.contains_key(name);
                    if let Some(repeated) = self.repeats.hit(REFUSED, name, Instant::now()) {
                        warn!(
                            event = REFUSED,
                            kind = %T::KIND,
                            name,
                            object = %self.registry.location(T::KIND, name),
                            error = %e,
                            keeping_previous_version = keeping,
                            repeated,
                            "skipping invalid registry object"
                        );
                    }
                }
                None
            }
        }
    }
}

/// The node-record collection of `registry`.
pub fn nodes(registry: &Arc<dyn Registry>) -> Typed<NodeRecord> {
    Typed::new(registry.clone())
}

/// Validates and publishes a node record under its own name.
pub async fn put_node(
    registry: &dyn Registry,
    record: &NodeRecord,
) -> Result<Revision, RegistryError> {
    put_object(registry, record).await
}

/// Validates and publishes this node's own record: bound to the registry's lease where the
/// backend has leases ([`Registry::put_owned`]).
pub async fn put_own_node(
    registry: &dyn Registry,
    record: &NodeRecord,
) -> Result<Revision, RegistryError> {
    put_owned_object(registry, record).await
}

/// Validates and writes an object this node owns (its record, its health report): bound to the
/// registry's lease where the backend has leases ([`Registry::put_owned`]), so it goes when the
/// node does.
pub async fn put_owned_object<T: Object>(
    registry: &dyn Registry,
    item: &T,
) -> Result<Revision, RegistryError> {
    let name = checked_name(item)?;
    registry.put_owned(T::KIND, name, &item.encode()).await
}

/// Reads one node record (an error if the stored one is invalid).
pub async fn get_node(
    registry: &dyn Registry,
    name: &str,
) -> Result<Option<NodeRecord>, RegistryError> {
    get_object(registry, name).await
}

pub async fn delete_node(registry: &dyn Registry, name: &str) -> Result<bool, RegistryError> {
    registry.delete(Kind::Nodes, name).await
}

/// Every valid node record; invalid ones are logged and skipped.
pub async fn list_nodes(
    registry: &dyn Registry,
) -> Result<(Vec<NodeRecord>, Revision), RegistryError> {
    list_objects(registry).await
}

/// Watches node records, decoded; see [`TypedWatch`].
pub async fn watch_nodes(
    registry: &Arc<dyn Registry>,
    from: Option<Revision>,
) -> Result<TypedWatch<NodeRecord>, RegistryError> {
    nodes(registry).watch(from).await
}
