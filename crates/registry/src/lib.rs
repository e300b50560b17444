//! weft-registry: where nodes publish their records and learn about everyone else's.
//!
//! In: a registry spec such as `dir:/var/lib/weft/registry` (see [`open`]), objects to publish
//! (raw bytes through [`Registry::put`], or typed values such as a [`weft_core::NodeRecord`]
//! through [`Typed`] / [`put_node`]). Out: point reads and listings, and watch streams of
//! events: a full [`RawEvent::Reset`] listing first (and again after every resync), then
//! [`RawEvent::Upsert`] / [`RawEvent::Delete`] per change and [`RawEvent::Status`] when the
//! registry becomes unreachable or reachable again. An unreachable registry never produces
//! deletes: "record deleted" and "cannot see the registry" are different events.
//!
//! The registry is a set of typed collections ([`Kind`]): node records and pod CIDR claims (see
//! [`claims`]: claimed with a compare-and-swap over the whole collection, [`Registry::
//! put_if_unchanged`]), rotation requests, revocations and external standard WireGuard peers
//! (written by keyctl). [`Registry`] is the raw, object-safe, backend-neutral interface (held as
//! `Arc<dyn Registry>`); [`Typed`] decodes and validates on top of it, skipping (and logging)
//! objects that fail to parse so one bad record never ends a watch (a warning per object that
//! keeps changing at most once per [`repeat_interval`]). Backends: [`dir`] (one JSON file per
//! object, the embedded default), [`etcd`] (one key per object, a node's own record bound to a
//! lease, see [`Registry::put_owned`]) and [`kube`] (cluster-scoped CRDs, server-side apply,
//! kube-runtime watchers).
//!
//! # Design (the overview is in ARCHITECTURE.md)
//!
//! **weft-registry** (`crates/registry`) defines the object-safe `Registry` trait: typed
//! collections with put/get/delete/list and a watch that begins with a `Reset` and then sends
//! `Upsert`/`Delete`. `Status(Unreachable)` is separate from any deletion. The `dir:PATH` backend
//! keeps one JSON file per object, written atomically (temp file + rename), and sees changes through
//! inotify with a periodic rescan as a fallback. The typed layer decodes records and logs and skips
//! bad ones without stopping the watch. `list_for_update` + `put_if_unchanged` are a
//! compare-and-swap over a whole collection (a digest of the listing checked under a file lock for
//! `dir`, a transaction comparing every key's mod revision for etcd); `claims::claim_pod_cidr` runs
//! `alloc::decide` in that loop so each node writes only its own `claims/NAME`.
//!
//! The `etcd://HOST:PORT[,...]` backend (`etcd-client`, tonic) keeps each object at
//! `PREFIX/<kind>/<name>` (prefix `/weft` by default) and is opened with `open_with(spec,
//! OpenOptions { etcd: EtcdOptions })` (prefix, TLS files, lease TTL; user and password from
//! `WEFT_ETCD_USERNAME` / `WEFT_ETCD_PASSWORD`). It connects lazily and bounds every request with a
//! timeout. A request that etcd refuses for an expired or unknown auth token is repeated once on
//! a new, logged-in connection (etcd-client never renews its token). A refusal for lack of
//! permission is `RegistryError::PermissionDenied`, never an unreachable registry.
//! `Registry::put_owned` (a plain `put` for `dir`) writes a node's own record bound to a
//! lease; a keeper task keeps the lease alive and, if etcd reports it gone, grants a new one and
//! rewrites every owned object. `delete` forgets the object before deleting it so the keeper never
//! writes it back. A watch lists, sends `Reset`, and watches from the list's revision + 1; when the
//! etcd watch is cancelled (compaction), breaks or cannot start, it lists again and sends a new
//! `Reset`. A failed list sends `Status(Unreachable)` once, retries with jittered backoff capped at
//! 2 s, and is followed by `Status(Connected)` and a `Reset` when a list succeeds. Keys that are not
//! `PREFIX/<kind>/<valid-name>` are logged once and skipped.
//!
//! The `kube` backend (`kube/`, kube-rs 5 with k8s-openapi 0.29) maps each collection onto one
//! cluster-scoped custom resource of `weft.dev/v1alpha1` (`kube/crd.rs`: the spec types, from which
//! `deploy/crds/` is generated and checked by a unit test, and `RESOURCES`, the collection ↔ kind
//! table). A value's JSON less its name field is the `spec`; `to_spec` / `from_object` convert, and
//! a test round-trips every weft-core type through its spec type. Writes are server-side apply with
//! the field manager of `KubeOptions` (`meshd`, `keyctl`); `put_owned` adds an ownerReference to
//! this node's Node (uid looked up once; a failed lookup fails the write, since applying without
//! the field would make server-side apply drop the owner) and, for a MeshNode, patches the status
//! subresource only when its conditions or key fingerprint change. `heartbeats()` is false: meshd
//! writes no periodic health report on this backend. `list_for_update` / `put_if_unchanged` (`kube/cas.rs`) keep each listing's resourceVersions
//! under the snapshot number and write one object with the API server's optimistic concurrency
//! (create: 409 if it appeared; replace with the listed resourceVersion: 409 if it changed), so
//! keyctl's revocations, rotation requests and external peers use it too; unlike etcd and dir it
//! does not see changes to other objects of the collection. Claims (`kube/claims.rs`) are objects named
//! after their block: `put_if_unchanged` creates the block's object (409 AlreadyExists means
//! someone else took it) or replaces it with the resourceVersion it was listed at (409 Conflict),
//! using the listing `list_for_update` kept under the snapshot number; a node that moves to another
//! block deletes its old one with that resourceVersion as precondition. Watches
//! (`kube/watch.rs`) are kube-runtime watchers whose `Init`/`InitApply`/`InitDone` is buffered into
//! one `Reset`, with a capped backoff (250 ms to 4 s). `kube/node.rs` reads this node's Node
//! (`NodeInfo`: uid, InternalIP/ExternalIP, `spec.podCIDRs`, the `weft.dev/force-endpoint`
//! annotation) and watches it with a field selector. 403 is `PermissionDenied` with the API
//! server's message (RBAC, or the admission policy in `deploy/admission-policy.yaml`).

pub mod claims;
pub mod dir;
pub mod etcd;
pub mod kube;
mod typed;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

pub use dir::{DirOptions, DirRegistry};
pub use etcd::{EtcdOptions, EtcdRegistry};
pub use kube::{KubeOptions, KubeRegistry};
pub use typed::{
    delete_node, get_node, list_nodes, nodes, put_node, put_own_node, put_owned_object,
    repeat_interval, set_repeat_interval, watch_nodes, Event, Object, Typed, TypedWatch,
};

/// Largest object a backend stores or reads (1 MiB); node records are a few hundred bytes.
pub const MAX_OBJECT_BYTES: usize = 1 << 20;

/// A collection in the registry. Each has a stable name used as directory / key prefix /
/// resource name by the backends, so it must never change once released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Kind {
    /// Node records ([`weft_core::NodeRecord`]), one per node, named after the node.
    Nodes,
    /// Pod CIDR claims ([`weft_core::alloc::Claim`]), one per node, named after the node.
    Claims,
    /// Key rotation requests ([`weft_core::control::RotationRequest`]), written by keyctl.
    Rotations,
    /// Revocations ([`weft_core::control::Revocation`]), written by keyctl (admin only).
    Revocations,
    /// The cluster PSK generation ([`weft_core::control::PskGeneration`]), one object named
    /// `cluster`, written by keyctl (admin only).
    Psk,
    /// Link health reports ([`weft_core::health::HealthReport`]), one per node, named after the
    /// node, written by that node.
    Health,
    /// External standard WireGuard peers ([`weft_core::external::ExternalPeer`]), written by
    /// `keyctl peer` (admin only), named after the peer.
    Peers,
}

impl Kind {
    /// Every collection this build knows.
    pub const ALL: &'static [Kind] = &[
        Kind::Nodes,
        Kind::Claims,
        Kind::Rotations,
        Kind::Revocations,
        Kind::Psk,
        Kind::Health,
        Kind::Peers,
    ];

    /// The stable collection name ("nodes").
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Nodes => "nodes",
            Kind::Claims => "claims",
            Kind::Rotations => "rotations",
            Kind::Revocations => "revocations",
            Kind::Psk => "psk",
            Kind::Health => "health",
            Kind::Peers => "peers",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A position in a registry's change history. Ordered within one backend instance; what it means
/// beyond that depends on the backend (the `dir` backend uses a per-process counter, etcd uses
/// its revisions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Revision(pub u64);

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

/// What a whole collection looked like when it was listed by [`Registry::list_for_update`];
/// [`Registry::put_if_unchanged`] compares against it. Opaque: an etcd revision, or a digest of
/// the listing for the `dir` backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Snapshot(pub u64);

/// Whether a watch can currently see the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connectivity {
    Connected,
    /// The registry cannot be read; the reason is for humans. Consumers keep what they have.
    Unreachable(String),
}

/// One event of a raw watch. Values are the bytes as stored; see [`TypedWatch`] for decoded ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawEvent {
    /// The complete contents of the collection, sorted by name. Replaces everything the consumer
    /// knew: names it had that are absent here were deleted. Sent first on every watch and again
    /// after a resync (for example when the registry comes back after being unreachable).
    Reset {
        items: Vec<(String, Vec<u8>)>,
        revision: Revision,
    },
    /// An object was created or its content changed.
    Upsert {
        name: String,
        value: Vec<u8>,
        revision: Revision,
    },
    /// An object was deleted from the registry (never sent because the registry is unreachable).
    Delete { name: String, revision: Revision },
    /// Connectivity changed. A watch starts connected: its first event is a `Reset`, or
    /// `Status(Unreachable)` if the registry cannot be read at that moment. After
    /// `Unreachable`, the next `Connected` is followed by a `Reset`.
    Status(Connectivity),
}

/// The receiving end of a watch. Dropping it stops the backend's watcher.
#[derive(Debug)]
pub struct WatchStream {
    rx: tokio::sync::mpsc::Receiver<RawEvent>,
}

impl WatchStream {
    /// Wraps a channel fed by a backend's watcher task (for backend implementations).
    pub fn new(rx: tokio::sync::mpsc::Receiver<RawEvent>) -> Self {
        WatchStream { rx }
    }

    /// The next event; `None` only when the backend's watcher has stopped for good.
    pub async fn next(&mut self) -> Option<RawEvent> {
        self.rx.recv().await
    }

    pub fn into_inner(self) -> tokio::sync::mpsc::Receiver<RawEvent> {
        self.rx
    }
}

/// A decoding or validation error of some object type, boxed so every kind can report its own.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry spec {spec:?} is malformed: {reason}")]
    BadSpec { spec: String, reason: String },
    #[error("registry scheme `{scheme}` is not supported (supported: dir:PATH, etcd://HOST:PORT[,HOST:PORT...], kube)")]
    NotSupportedYet { scheme: String },
    #[error(
        "unknown registry scheme `{scheme}` (supported: dir:PATH, etcd://HOST:PORT[,HOST:PORT...], kube)"
    )]
    UnknownScheme { scheme: String },
    #[error("invalid object name {name:?} in {kind}: {reason}")]
    InvalidName {
        kind: Kind,
        name: String,
        reason: weft_core::RecordError,
    },
    #[error("object {kind}/{name} is {size} bytes, more than the limit of {MAX_OBJECT_BYTES}")]
    TooLarge {
        kind: Kind,
        name: String,
        size: usize,
    },
    #[error("refusing to store invalid object {kind}/{name}: {source}")]
    Invalid {
        kind: Kind,
        name: String,
        #[source]
        source: BoxError,
    },
    #[error("object {location} cannot be decoded: {source}")]
    Decode {
        location: String,
        #[source]
        source: BoxError,
    },
    #[error("object {location} holds a record named {record_name:?}; the names must match")]
    NameMismatch {
        location: String,
        record_name: String,
    },
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A remote registry (etcd) refused or did not answer; `target` never holds credentials.
    #[error("{op} {target}: {reason}")]
    Backend {
        op: &'static str,
        target: String,
        reason: String,
    },
    /// The registry refused the operation for lack of permission (an etcd user whose role may
    /// not write this key, see deploy/etcd/README.md). Retrying does not help until an operator
    /// changes the permissions.
    #[error("{op} {target}: permission denied: {who} may not do this ({reason})")]
    PermissionDenied {
        op: &'static str,
        target: String,
        /// Who was refused, for humans ("etcd user \"weft-node-a\"").
        who: String,
        reason: String,
    },
    #[error("registry internal error: {0}")]
    Internal(String),
}

impl RegistryError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RegistryError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Checks an object name: a lowercase DNS name ([`weft_core::record::check_name`]). Names become
/// file names and keys, so this is what keeps `..` and `/` out of paths.
pub fn check_object_name(kind: Kind, name: &str) -> Result<(), RegistryError> {
    weft_core::record::check_name(name).map_err(|reason| RegistryError::InvalidName {
        kind,
        name: name.to_string(),
        reason,
    })
}

/// Checks a value's size against [`MAX_OBJECT_BYTES`].
pub(crate) fn check_size(kind: Kind, name: &str, value: &[u8]) -> Result<(), RegistryError> {
    if value.len() > MAX_OBJECT_BYTES {
        return Err(RegistryError::TooLarge {
            kind,
            name: name.to_string(),
            size: value.len(),
        });
    }
    Ok(())
}

/// The raw, backend-neutral registry interface. Object-safe: hold it as `Arc<dyn Registry>`.
///
/// Names are checked with [`check_object_name`] by every backend; values are opaque bytes of at
/// most [`MAX_OBJECT_BYTES`].
#[async_trait::async_trait]
pub trait Registry: Send + Sync + fmt::Debug {
    /// What this registry is, for logs ("dir:/var/lib/weft/registry"). Never contains secrets.
    fn describe(&self) -> String;

    /// Where one object lives, for log lines about it (a file path, a key).
    fn location(&self, kind: Kind, name: &str) -> String {
        format!("{}/{kind}/{name}", self.describe())
    }

    /// Creates or replaces an object. Readers see either the old or the new value, never a mix.
    async fn put(&self, kind: Kind, name: &str, value: &[u8]) -> Result<Revision, RegistryError>;

    /// Creates or replaces an object that belongs to this process (a node's own record): backends
    /// with leases bind it to one that lives as long as this registry handle keeps it alive, and
    /// write it again if the lease is lost. Backends without leases (such as `dir`) store it like
    /// [`Registry::put`], which is the default.
    async fn put_owned(
        &self,
        kind: Kind,
        name: &str,
        value: &[u8],
    ) -> Result<Revision, RegistryError> {
        self.put(kind, name, value).await
    }

    /// Whether objects should be rewritten now and then to show that their writer lives (the
    /// health reports' `reportedAt`). `false` for registries whose readers learn presence
    /// otherwise (kube: the Node's Ready condition), where every rewrite would be load for
    /// nothing.
    fn heartbeats(&self) -> bool {
        true
    }

    /// Shows on external peer `name` whether the config last printed for it is stale
    /// (`summary`: "up to date" or "STALE: node-1 key changed"), where the backend has a place
    /// that a person looks at: kube writes MeshPeer `.status` (a `kubectl get meshpeers` column)
    /// when the verdict differs from the one there. `Ok(false)` when nothing was written: the
    /// verdict did not change, or the backend has no such place (dir, etcd: `keyctl status`
    /// derives it afresh each time, which is the default).
    async fn put_peer_config_status(
        &self,
        _name: &str,
        _stale: bool,
        _summary: &str,
    ) -> Result<bool, RegistryError> {
        Ok(false)
    }

    /// Reads one object; `None` if it does not exist.
    async fn get(&self, kind: Kind, name: &str) -> Result<Option<Vec<u8>>, RegistryError>;

    /// Deletes an object; `false` if it did not exist.
    async fn delete(&self, kind: Kind, name: &str) -> Result<bool, RegistryError>;

    /// All objects of a collection, sorted by name, with the revision they were read at.
    async fn list(&self, kind: Kind) -> Result<(Vec<(String, Vec<u8>)>, Revision), RegistryError>;

    /// Lists a collection for a compare-and-swap: the objects (as [`Registry::list`]) and a
    /// [`Snapshot`] to hand to [`Registry::put_if_unchanged`].
    async fn list_for_update(
        &self,
        kind: Kind,
    ) -> Result<(Vec<(String, Vec<u8>)>, Snapshot), RegistryError>;

    /// Writes one object (not bound to a lease) only if no object of the collection was created
    /// or changed since `snapshot` was taken; `Ok(false)` if one was (list again and decide
    /// again). A deletion since the snapshot may go unnoticed (etcd), so a decision must stay
    /// safe when an object it saw has disappeared; for claims it does (a deleted claim only frees
    /// a block). This is how nodes claim pod CIDRs without two ever holding the same one.
    async fn put_if_unchanged(
        &self,
        kind: Kind,
        name: &str,
        value: &[u8],
        snapshot: Snapshot,
    ) -> Result<bool, RegistryError>;

    /// Watches a collection. The stream begins with a [`RawEvent::Reset`]. `from` lets backends
    /// with a history resume after that revision; backends without one (such as `dir`) ignore it
    /// and always begin with a `Reset`, which consumers must handle anyway.
    async fn watch(&self, kind: Kind, from: Option<Revision>)
        -> Result<WatchStream, RegistryError>;
}

/// Options of every backend, for [`open_with`].
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    pub etcd: EtcdOptions,
    pub kube: KubeOptions,
}

/// Opens a registry from its spec, with the etcd credentials from the environment
/// ([`EtcdOptions::from_env`]) and default options otherwise; see [`open_with`].
pub fn open(spec: &str) -> Result<Arc<dyn Registry>, RegistryError> {
    open_with(
        spec,
        &OpenOptions {
            etcd: EtcdOptions::from_env(),
            kube: KubeOptions::default(),
        },
    )
}

/// Opens a registry from its spec.
///
/// Supported: `dir:PATH` (created if missing), `etcd://HOST:PORT[,HOST:PORT...]` (`etcds://`
/// for TLS; TLS is also used whenever a CA file is set) and `kube` (the Kubernetes API server of
/// [`OpenOptions::kube`]). Errors never contain credentials.
pub fn open_with(spec: &str, options: &OpenOptions) -> Result<Arc<dyn Registry>, RegistryError> {
    let spec = spec.trim();
    if is_kube_spec(spec) {
        return Ok(Arc::new(KubeRegistry::open(options.kube.clone())?));
    }
    let Some((scheme, rest)) = spec.split_once(':') else {
        return Err(RegistryError::BadSpec {
            spec: redact(spec),
            reason: "expected SCHEME:..., for example dir:/var/lib/weft/registry".into(),
        });
    };
    match scheme {
        "dir" => {
            if rest.is_empty() {
                return Err(RegistryError::BadSpec {
                    spec: spec.to_string(),
                    reason: "dir: needs a path, for example dir:/var/lib/weft/registry".into(),
                });
            }
            Ok(Arc::new(DirRegistry::open(rest)?))
        }
        "etcd" | "etcds" => {
            let endpoints = parse_etcd_spec(spec)?.1;
            Ok(Arc::new(EtcdRegistry::open(
                scheme,
                endpoints,
                options.etcd.clone(),
            )?))
        }
        // Only the scheme goes into the error: the rest may hold credentials.
        "kube" | "k8s" | "kubernetes" | "crd" => Err(RegistryError::NotSupportedYet {
            scheme: scheme.to_string(),
        }),
        _ => Err(RegistryError::UnknownScheme {
            scheme: scheme.to_string(),
        }),
    }
}

/// Whether a spec names the Kubernetes backend: `kube` (or `kube:`, `k8s`, `kubernetes`).
/// Where the API server is comes from [`KubeOptions`], never from the spec.
pub fn is_kube_spec(spec: &str) -> bool {
    matches!(
        spec.trim(),
        "kube" | "kube:" | "k8s" | "k8s:" | "kubernetes" | "kubernetes:"
    )
}

/// Checks an `etcd://` / `etcds://` spec without opening it: (scheme, endpoints).
pub fn parse_etcd_spec(spec: &str) -> Result<(&str, Vec<String>), RegistryError> {
    let spec = spec.trim();
    let (scheme, rest) = spec
        .split_once("://")
        .filter(|(s, _)| *s == "etcd" || *s == "etcds")
        .ok_or_else(|| RegistryError::BadSpec {
            spec: redact(spec),
            reason: "expected etcd://HOST:PORT[,HOST:PORT...]".into(),
        })?;
    let endpoints = etcd::parse_endpoints(rest).map_err(|reason| RegistryError::BadSpec {
        spec: redact(spec),
        reason,
    })?;
    Ok((scheme, endpoints))
}

/// A spec for an error message: anything that may hold credentials (`user:pw@`) is cut.
fn redact(spec: &str) -> String {
    match spec.split_once("://") {
        Some((scheme, rest)) if rest.contains('@') => format!("{scheme}://<redacted>"),
        _ if spec.contains('@') => "<redacted>".into(),
        _ => spec.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_specs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let spec = format!("dir:{}", tmp.path().join("reg").display());
        let reg = open(&spec).expect("open dir");
        assert!(reg.describe().starts_with("dir:"));
        assert!(
            tmp.path().join("reg/nodes").is_dir(),
            "open creates the collection dirs"
        );

        let e = open("etcd://user:secret@10.0.0.1:2379").expect_err("etcd");
        let msg = e.to_string();
        assert!(msg.contains("WEFT_ETCD_USERNAME"), "{msg}");
        assert!(!msg.contains("secret"), "credentials leaked into {msg}");
        for bad in [
            "etcd://",
            "etcd://h",
            "etcd://h:0",
            "etcd://h:x",
            "etcd:h:1",
            "etcd://a b:1",
        ] {
            assert!(
                matches!(open(bad), Err(RegistryError::BadSpec { .. })),
                "{bad}"
            );
        }
        let tls_without_ca = open("etcds://127.0.0.1:2379").expect_err("etcds without CA");
        assert!(
            tls_without_ca.to_string().contains("CA"),
            "{tls_without_ca}"
        );
        assert!(is_kube_spec("kube") && is_kube_spec("kube:") && !is_kube_spec("kube:x"));
        assert!(matches!(
            open("kube:https://x"),
            Err(RegistryError::NotSupportedYet { .. })
        ));
        assert!(matches!(
            open("ftp:x"),
            Err(RegistryError::UnknownScheme { .. })
        ));
        assert!(matches!(
            open("/just/a/path"),
            Err(RegistryError::BadSpec { .. })
        ));
        assert!(matches!(open("dir:"), Err(RegistryError::BadSpec { .. })));
    }

    #[test]
    fn kind_names_are_stable() {
        assert_eq!(Kind::Nodes.as_str(), "nodes");
        assert_eq!(Kind::Claims.as_str(), "claims");
        assert_eq!(Kind::Rotations.as_str(), "rotations");
        assert_eq!(Kind::Revocations.as_str(), "revocations");
        assert_eq!(Kind::Psk.as_str(), "psk");
        assert_eq!(Kind::Health.as_str(), "health");
        assert_eq!(Kind::ALL.len(), 7);
        assert_eq!(Kind::Peers.as_str(), "peers");
    }
}
