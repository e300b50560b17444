//! The `kube` backend: the registry as cluster-scoped custom resources of group `weft.dev`
//! ([`crd`]), so that in a Kubernetes cluster weft needs nothing but the API server.
//!
//! - Each collection ([`Kind`]) is one resource; an object's registry name is its
//!   `metadata.name` and its value is the `spec` (plus the name field), so the bytes the typed
//!   layer decodes are exactly those the other backends store. Pod CIDR claims are named after
//!   their block (`10-42-3-0-24`, see [`claims`]) so the API server itself refuses a second
//!   claim on a block.
//! - Writes are server-side apply with this process's field manager (`meshd` / `keyctl`).
//!   [`Registry::put_owned`] adds an ownerReference to this node's Node object, so the garbage
//!   collector deletes a node's MeshNode and MeshNodeHealth when its Node is deleted: a node's
//!   presence follows its Node, never a rewritten timestamp. After a MeshNode write the status
//!   subresource gets the conditions `Ready` and `KeyRotating`, only when they change.
//! - Watches are `kube-runtime` watchers: the initial list (buffered until complete: nothing is
//!   removed before the first full list), then events; after `410 Gone` or a broken watch they
//!   list again. `Init`..`InitDone` becomes one [`RawEvent::Reset`]; a failing watch reports
//!   [`RawEvent::Status`] `Unreachable` once and never deletes anything.
//! - Credentials: the in-cluster ServiceAccount token, or a kubeconfig (`--kubeconfig` /
//!   `KUBECONFIG`); [`KubeOptions::api_server`] replaces the server address (the `kubernetes`
//!   Service IP may not route before the network plugin is up). Tokens never reach logs.
//! - 403 is [`RegistryError::PermissionDenied`] naming who was refused and the API server's
//!   message (RBAC or the admission policy in `deploy/admission-policy.yaml`).

mod cas;
pub mod claims;
pub mod crd;
pub mod node;
mod watch;

use crate::WatchStream;
use crate::{
    check_object_name, check_size, Kind, RawEvent, Registry, RegistryError, Revision, Snapshot,
};
pub(crate) use crd::{resource_of, ResourceMap, GROUP, VERSION};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, OnceCell};
use tracing::{debug, warn};

/// Field manager of meshd's writes.
pub const MESHD_FIELD_MANAGER: &str = "meshd";
/// Annotation on a Node that forces this endpoint (`IP` or `IP:PORT`), as Kilo's
/// `force-endpoint`.
pub const FORCE_ENDPOINT_ANNOTATION: &str = "weft.dev/force-endpoint";

/// Options of the kube backend.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// A kubeconfig file; `None`: `KUBECONFIG`, else the in-cluster ServiceAccount, else
    /// `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// The API server's address (`https://HOST:PORT`), replacing the one of the kubeconfig or
    /// of the in-cluster environment (`KUBERNETES_SERVICE_HOST`).
    pub api_server: Option<String>,
    /// Field manager of server-side apply.
    pub field_manager: String,
    /// This process's node (meshd): owner of what [`Registry::put_owned`] writes.
    pub node: Option<String>,
    /// Limit of each request that is not a watch. Default 5 s.
    pub request_timeout: Duration,
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            kubeconfig: None,
            api_server: None,
            field_manager: MESHD_FIELD_MANAGER.into(),
            node: None,
            request_timeout: Duration::from_secs(5),
        }
    }
}

impl KubeOptions {
    /// Checks the flags without contacting anything: the kubeconfig can be read, the API server
    /// address is an https URL, the field manager is set. `Err((flag, reason))`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if let Some(p) = &self.kubeconfig {
            kube::config::Kubeconfig::read_from(p)
                .map_err(|e| ("kubeconfig", format!("cannot read {}: {e}", p.display())))?;
        }
        if let Some(s) = &self.api_server {
            check_api_server(s).map_err(|e| ("kube-api-server", e))?;
        }
        if self.field_manager.is_empty() || self.field_manager.len() > 128 {
            return Err(("field-manager", "must be 1-128 characters".into()));
        }
        Ok(())
    }
}

/// `https://HOST[:PORT]` with nothing after the authority.
pub fn check_api_server(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("{s:?} is not a URL such as https://10.0.0.1:6443: {e}"))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none() {
        return Err(format!(
            "{s:?}: the API server address must be https://HOST[:PORT]"
        ));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(format!("{s:?}: no path after HOST:PORT"));
    }
    Ok(uri)
}

/// The registry on a Kubernetes API server.
pub struct KubeRegistry {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    options: KubeOptions,
    client: OnceCell<Client>,
    /// Who this process is, for refusals ("ServiceAccount weft-system/meshd").
    who: String,
    /// The last status written per MeshNode (conditions without times), so it is written only
    /// when it changes.
    node_status: Mutex<HashMap<String, (Value, crd::MeshNodeStatus)>>,
    /// This node's Node uid, once known (owner of owned objects).
    node_uid: Mutex<Option<String>>,
    /// The specs written by `put_owned`, so they can be applied again under a new owner when
    /// the Node is re-created with the same name ([`KubeRegistry::node_seen`]).
    owned: Mutex<std::collections::BTreeMap<(Kind, String), Value>>,
    /// Listings taken for a compare-and-swap of claims, by snapshot number.
    snapshots: Mutex<cas::Snapshots>,
}

impl fmt::Debug for KubeRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeRegistry")
            .field("api_server", &self.inner.options.api_server)
            .field("kubeconfig", &self.inner.options.kubeconfig)
            .field("field_manager", &self.inner.options.field_manager)
            .finish()
    }
}

impl KubeRegistry {
    /// Checks the options; connects lazily (opening never blocks or fails because the API
    /// server is down).
    pub fn open(options: KubeOptions) -> Result<Self, RegistryError> {
        options
            .check()
            .map_err(|(flag, reason)| RegistryError::BadSpec {
                spec: "kube".into(),
                reason: format!("--{flag}: {reason}"),
            })?;
        let who = match &options.kubeconfig {
            Some(p) => format!("the user of {}", p.display()),
            None => "this ServiceAccount".into(),
        };
        Ok(KubeRegistry {
            inner: Arc::new(Inner {
                options,
                client: OnceCell::new(),
                who,
                node_status: Mutex::new(HashMap::new()),
                node_uid: Mutex::new(None),
                owned: Mutex::new(std::collections::BTreeMap::new()),
                snapshots: Mutex::new(cas::Snapshots::default()),
            }),
        })
    }

    /// The Kubernetes client (made on first use).
    pub async fn client(&self) -> Result<Client, RegistryError> {
        self.inner.client().await
    }
}

impl KubeRegistry {
    /// Tells the registry what this node's Node looks like now (from the watch of that Node).
    /// When its uid changed (the Node was deleted and created again under the same name, so
    /// the garbage collector deleted what the old Node owned), every object this process
    /// owns is applied again with an owner reference to the new Node. Returns how many.
    pub async fn node_seen(&self, uid: &str) -> Result<usize, RegistryError> {
        if uid.is_empty() {
            return Ok(0);
        }
        let previous = match self.inner.node_uid.lock() {
            Ok(mut g) => g.replace(uid.to_string()),
            Err(_) => return Ok(0),
        };
        if previous.as_deref().is_none_or(|p| p == uid) {
            return Ok(0);
        }
        if let Ok(mut g) = self.inner.node_status.lock() {
            g.clear();
        }
        let owned: Vec<((Kind, String), Value)> = self
            .inner
            .owned
            .lock()
            .map(|g| g.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        for ((kind, name), spec) in &owned {
            let obj = self.inner.apply(*kind, name, spec.clone(), true).await?;
            if *kind == Kind::Nodes {
                self.inner.update_node_status(name, spec, &obj).await;
            }
        }
        Ok(owned.len())
    }
}

/// The client configuration: kubeconfig file, `KUBECONFIG`, in-cluster, with the API server
/// address replaced when one is given.
pub async fn client_config(options: &KubeOptions) -> Result<kube::Config, RegistryError> {
    let bad = |reason: String| RegistryError::Backend {
        op: "configuring the Kubernetes client",
        target: "kube".into(),
        reason,
    };
    let kco = kube::config::KubeConfigOptions::default();
    let mut config = match &options.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| bad(format!("reading {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kco)
                .await
                .map_err(|e| bad(format!("kubeconfig {}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| bad(format!("no kubeconfig and not in a cluster: {e}")))?,
    };
    if let Some(s) = &options.api_server {
        config.cluster_url = check_api_server(s).map_err(bad)?;
    }
    config.connect_timeout = Some(options.request_timeout);
    Ok(config)
}

impl Inner {
    async fn client(&self) -> Result<Client, RegistryError> {
        self.client
            .get_or_try_init(|| async {
                let config = client_config(&self.options).await?;
                Client::try_from(config).map_err(|e| RegistryError::Backend {
                    op: "making the Kubernetes client",
                    target: "kube".into(),
                    reason: e.to_string(),
                })
            })
            .await
            .cloned()
    }

    pub(crate) async fn api(&self, kind: Kind) -> Result<Api<DynamicObject>, RegistryError> {
        Ok(Api::all_with(
            self.client().await?,
            &api_resource(resource_of(kind)),
        ))
    }

    fn target(&self, kind: Kind, name: &str) -> String {
        format!("{}/{name}", resource_of(kind).plural)
    }

    /// A kube error as a registry error: 403 names who was refused.
    pub(crate) fn error(&self, op: &'static str, target: String, e: kube::Error) -> RegistryError {
        match &e {
            kube::Error::Api(s) if s.code == 403 => RegistryError::PermissionDenied {
                op,
                target,
                who: self.who.clone(),
                reason: s.message.clone(),
            },
            kube::Error::Api(s) => RegistryError::Backend {
                op,
                target,
                reason: format!("{} ({}, {})", s.message, s.code, s.reason),
            },
            other => RegistryError::Backend {
                op,
                target,
                reason: other.to_string(),
            },
        }
    }

    /// Runs one request with the request timeout.
    pub(crate) async fn call<T>(
        &self,
        op: &'static str,
        target: String,
        fut: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, RegistryError> {
        match tokio::time::timeout(self.options.request_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error(op, target, e)),
            Err(_) => Err(RegistryError::Backend {
                op,
                target,
                reason: format!(
                    "the API server did not answer within {:?}",
                    self.options.request_timeout
                ),
            }),
        }
    }

    /// Server-side apply of `spec` as object `name` (with an owner reference to this node's Node
    /// when `owned`).
    async fn apply(
        &self,
        kind: Kind,
        name: &str,
        spec: Value,
        owned: bool,
    ) -> Result<DynamicObject, RegistryError> {
        let r = resource_of(kind);
        let mut metadata = json!({ "name": name });
        if owned {
            if let Some(owner) = self.owner_reference().await? {
                metadata["ownerReferences"] = json!([owner]);
            }
        }
        let body = json!({
            "apiVersion": format!("{GROUP}/{VERSION}"),
            "kind": r.crd_kind,
            "metadata": metadata,
            "spec": spec,
        });
        let api = self.api(kind).await?;
        let pp = PatchParams::apply(&self.options.field_manager).force();
        self.call(
            "writing",
            self.target(kind, name),
            api.patch(name, &pp, &Patch::Apply(&body)),
        )
        .await
    }

    /// The ownerReference to this node's Node, looked up once. `Ok(None)` (with a warning) when
    /// there is no such Node: the object is written without an owner. A failed lookup is an
    /// error: applying without the owner would make server-side apply remove the one this
    /// field manager set before.
    async fn owner_reference(&self) -> Result<Option<Value>, RegistryError> {
        let Some(node) = self.options.node.as_deref() else {
            return Ok(None);
        };
        let cached = self.node_uid.lock().ok().and_then(|g| g.clone());
        let uid = match cached {
            Some(u) => u,
            None => match node::get_node(self, node).await? {
                Some(n) => {
                    let Some(uid) = n.metadata.uid.clone() else {
                        return Ok(None);
                    };
                    if let Ok(mut g) = self.node_uid.lock() {
                        *g = Some(uid.clone());
                    }
                    uid
                }
                None => {
                    warn!(
                        node,
                        "no Node object of this name: writing without an owner reference"
                    );
                    return Ok(None);
                }
            },
        };
        Ok(Some(
            json!({ "apiVersion": "v1", "kind": "Node", "name": node, "uid": uid }),
        ))
    }

    /// Writes the MeshNode's status when its conditions or key differ from what was written last.
    async fn update_node_status(&self, name: &str, record: &Value, applied: &DynamicObject) {
        let generation = applied.metadata.generation;
        let want = node_status(record, generation, None);
        let key = status_key(&want);
        let previous = self
            .node_status
            .lock()
            .ok()
            .and_then(|g| g.get(name).cloned());
        if previous.as_ref().is_some_and(|(k, _)| *k == key) {
            return;
        }
        // Keep the transition time of conditions whose status did not change (from what this
        // process wrote, else from the object).
        let old = previous.map(|(_, s)| s).or_else(|| {
            applied
                .data
                .get("status")
                .and_then(|s| serde_json::from_value(s.clone()).ok())
        });
        let status = node_status(record, generation, old.as_ref());
        let body = json!({
            "apiVersion": format!("{GROUP}/{VERSION}"),
            "kind": "MeshNode",
            "metadata": { "name": name },
            "status": status,
        });
        let pp = PatchParams::apply(&self.options.field_manager).force();
        let result = match self.api(Kind::Nodes).await {
            Ok(api) => {
                self.call(
                    "writing the status of",
                    self.target(Kind::Nodes, name),
                    api.patch_status(name, &pp, &Patch::Apply(&body)),
                )
                .await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(_) => {
                if let Ok(mut g) = self.node_status.lock() {
                    g.insert(name.to_string(), (key, status));
                }
            }
            Err(e) => warn!(error = %e, "could not write the MeshNode status"),
        }
    }
}

/// The API resource of a collection.
pub fn api_resource(r: &ResourceMap) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, r.crd_kind), r.plural)
}

/// RFC 3339 time of now (UTC, seconds).
fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    k8s_openapi::jiff::Timestamp::from_second(secs as i64)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// The status of a MeshNode whose record is `record`: `Ready` (published by a running meshd)
/// and `KeyRotating` (a next key announced), keeping `old`'s transition times where the
/// status did not change.
fn node_status(
    record: &Value,
    generation: Option<i64>,
    old: Option<&crd::MeshNodeStatus>,
) -> crd::MeshNodeStatus {
    let rotating = record.get("nextPublicKey").is_some_and(|v| !v.is_null());
    let fingerprint = record
        .get("publicKey")
        .and_then(Value::as_str)
        .map(|k| k.chars().take(8).collect::<String>());
    let condition = |type_: &str, status: bool, reason: &str, message: &str| {
        let status = if status { "True" } else { "False" }.to_string();
        let since = old
            .and_then(|o| o.conditions.iter().find(|c| c.type_ == type_))
            .filter(|c| c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(now_rfc3339);
        crd::Condition {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message: message.into(),
            last_transition_time: since,
            observed_generation: generation,
        }
    };
    crd::MeshNodeStatus {
        conditions: vec![
            condition(
                "Ready",
                true,
                "Published",
                "meshd runs on this node and published its record",
            ),
            if rotating {
                condition(
                    "KeyRotating",
                    true,
                    "NextKeyAnnounced",
                    "the node announced its next key; both keys work until every peer moved",
                )
            } else {
                condition("KeyRotating", false, "Stable", "one key in use")
            },
        ],
        observed_generation: generation,
        key_fingerprint: fingerprint,
    }
}

/// What decides whether a status must be written again: everything but the times.
fn status_key(s: &crd::MeshNodeStatus) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    if let Some(cs) = v.get_mut("conditions").and_then(Value::as_array_mut) {
        for c in cs {
            if let Some(o) = c.as_object_mut() {
                o.remove("lastTransitionTime");
            }
        }
    }
    v
}

/// The spec of object `name` from the stored bytes: the JSON less the name field (which must
/// match the name), plus what `kubectl get` shows (the link summary of a health report).
pub(crate) fn to_spec(kind: Kind, name: &str, value: &[u8]) -> Result<Value, RegistryError> {
    let invalid = |reason: String| RegistryError::Invalid {
        kind,
        name: name.to_string(),
        source: reason.into(),
    };
    let mut spec: Map<String, Value> =
        serde_json::from_slice(value).map_err(|e| invalid(format!("not a JSON object: {e}")))?;
    if let Some(field) = resource_of(kind).name_field {
        match spec.remove(field) {
            Some(Value::String(s)) if s == name => {}
            Some(other) => {
                return Err(RegistryError::NameMismatch {
                    location: format!("{}/{name}", resource_of(kind).plural),
                    record_name: other.as_str().unwrap_or("?").to_string(),
                })
            }
            None => return Err(invalid(format!("no `{field}` field"))),
        }
    }
    if kind == Kind::Health {
        spec.insert("summary".into(), link_summary(&spec));
    }
    Ok(Value::Object(spec))
}

/// The link counts of a health report's spec.
fn link_summary(spec: &Map<String, Value>) -> Value {
    let (mut up, mut idle, mut down, mut down_peers) = (0u32, 0u32, 0u32, Vec::new());
    for l in spec
        .get("links")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match l.get("state").and_then(Value::as_str) {
            Some("up") => up += 1,
            Some("idle") => idle += 1,
            _ => {
                down += 1;
                if let Some(p) = l.get("peer").and_then(Value::as_str) {
                    down_peers.push(p.to_string());
                }
            }
        }
    }
    json!({ "up": up, "idle": idle, "down": down, "downPeers": down_peers.join(",") })
}

/// The registry name and stored bytes of an object (its spec with the name field put back);
/// `None` for an object without a spec object.
pub(crate) fn from_object(kind: Kind, obj: &DynamicObject) -> Option<(String, Vec<u8>)> {
    let name = obj.metadata.name.clone()?;
    let mut spec = obj.data.get("spec")?.as_object()?.clone();
    if let Some(field) = resource_of(kind).name_field {
        spec.insert(field.into(), Value::String(name.clone()));
    }
    if kind == Kind::Health {
        spec.remove("summary");
    }
    let name = if kind == Kind::Claims {
        spec.get("node")?.as_str()?.to_string()
    } else {
        name
    };
    serde_json::to_vec(&Value::Object(spec))
        .ok()
        .map(|b| (name, b))
}

/// The revision of an object (its resourceVersion, 0 when not a number).
pub(crate) fn revision_of(obj: &DynamicObject) -> Revision {
    Revision(
        obj.metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    )
}

#[async_trait::async_trait]
impl Registry for KubeRegistry {
    fn describe(&self) -> String {
        match (
            &self.inner.options.api_server,
            &self.inner.options.kubeconfig,
        ) {
            (Some(s), _) => format!("kube:{s}"),
            (None, Some(p)) => format!("kube:{}", p.display()),
            (None, None) => "kube".into(),
        }
    }

    fn location(&self, kind: Kind, name: &str) -> String {
        format!("{}.{GROUP}/{name}", resource_of(kind).plural)
    }

    fn heartbeats(&self) -> bool {
        false
    }

    async fn put(&self, kind: Kind, name: &str, value: &[u8]) -> Result<Revision, RegistryError> {
        check_object_name(kind, name)?;
        check_size(kind, name, value)?;
        if kind == Kind::Claims {
            return claims::put(&self.inner, name, value).await;
        }
        let spec = to_spec(kind, name, value)?;
        let obj = self.inner.apply(kind, name, spec, false).await?;
        Ok(revision_of(&obj))
    }

    async fn put_owned(
        &self,
        kind: Kind,
        name: &str,
        value: &[u8],
    ) -> Result<Revision, RegistryError> {
        check_object_name(kind, name)?;
        check_size(kind, name, value)?;
        if kind == Kind::Claims {
            return claims::put(&self.inner, name, value).await;
        }
        let spec = to_spec(kind, name, value)?;
        let obj = self.inner.apply(kind, name, spec.clone(), true).await?;
        if let Ok(mut g) = self.inner.owned.lock() {
            g.insert((kind, name.to_string()), spec.clone());
        }
        if kind == Kind::Nodes {
            self.inner.update_node_status(name, &spec, &obj).await;
        }
        Ok(revision_of(&obj))
    }

    async fn put_peer_config_status(
        &self,
        name: &str,
        stale: bool,
        summary: &str,
    ) -> Result<bool, RegistryError> {
        check_object_name(Kind::Peers, name)?;
        let api = self.inner.api(Kind::Peers).await?;
        let target = self.inner.target(Kind::Peers, name);
        let Some(obj) = self
            .inner
            .call("reading", target.clone(), api.get_opt(name))
            .await?
        else {
            return Ok(false);
        };
        let now = obj.data.get("status");
        if now.and_then(|s| s.get("config")).and_then(Value::as_str) == Some(summary)
            && now
                .and_then(|s| s.get("configStale"))
                .and_then(Value::as_bool)
                == Some(stale)
        {
            return Ok(false);
        }
        let body = json!({
            "apiVersion": format!("{GROUP}/{VERSION}"),
            "kind": resource_of(Kind::Peers).crd_kind,
            "metadata": { "name": name },
            "status": crd::MeshPeerStatus {
                config: summary.to_string(),
                config_stale: stale,
                checked_at: now_rfc3339(),
            },
        });
        let pp = PatchParams::apply(&self.inner.options.field_manager).force();
        self.inner
            .call(
                "writing the status of",
                target,
                api.patch_status(name, &pp, &Patch::Apply(&body)),
            )
            .await?;
        Ok(true)
    }

    async fn get(&self, kind: Kind, name: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        check_object_name(kind, name)?;
        if kind == Kind::Claims {
            return claims::get(&self.inner, name).await;
        }
        let api = self.inner.api(kind).await?;
        let obj = self
            .inner
            .call("reading", self.inner.target(kind, name), api.get_opt(name))
            .await?;
        Ok(obj.and_then(|o| from_object(kind, &o)).map(|(_, v)| v))
    }

    async fn delete(&self, kind: Kind, name: &str) -> Result<bool, RegistryError> {
        check_object_name(kind, name)?;
        if kind == Kind::Claims {
            return claims::delete(&self.inner, name).await;
        }
        if let Ok(mut g) = self.inner.owned.lock() {
            g.remove(&(kind, name.to_string()));
        }
        let api = self.inner.api(kind).await?;
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {
                if let Ok(mut g) = self.inner.node_status.lock() {
                    g.remove(name);
                }
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(e) => Err(self
                .inner
                .error("deleting", self.inner.target(kind, name), e)),
        }
    }

    async fn list(&self, kind: Kind) -> Result<(Vec<(String, Vec<u8>)>, Revision), RegistryError> {
        let (items, rv) = list_raw(&self.inner, kind).await?;
        let mut out: Vec<(String, Vec<u8>)> =
            items.iter().filter_map(|o| from_object(kind, o)).collect();
        out.sort();
        if kind == Kind::Claims {
            out.dedup_by(|a, b| a.0 == b.0);
        }
        Ok((out, rv))
    }

    async fn list_for_update(
        &self,
        kind: Kind,
    ) -> Result<(Vec<(String, Vec<u8>)>, Snapshot), RegistryError> {
        if kind == Kind::Claims {
            return claims::list_for_update(&self.inner).await;
        }
        cas::list_for_update(&self.inner, kind).await
    }

    async fn put_if_unchanged(
        &self,
        kind: Kind,
        name: &str,
        value: &[u8],
        snapshot: Snapshot,
    ) -> Result<bool, RegistryError> {
        check_object_name(kind, name)?;
        check_size(kind, name, value)?;
        if kind == Kind::Claims {
            return claims::put_if_unchanged(&self.inner, name, value, snapshot).await;
        }
        let spec = to_spec(kind, name, value)?;
        cas::put_if_unchanged(&self.inner, kind, name, spec, snapshot).await
    }

    async fn watch(
        &self,
        kind: Kind,
        _from: Option<Revision>,
    ) -> Result<WatchStream, RegistryError> {
        let api = self.inner.api(kind).await?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(watch::run(api, kind, tx));
        Ok(WatchStream::new(rx))
    }
}

/// Every object of a collection and the list's resourceVersion.
pub(crate) async fn list_raw(
    inner: &Inner,
    kind: Kind,
) -> Result<(Vec<DynamicObject>, Revision), RegistryError> {
    let api = inner.api(kind).await?;
    let list = inner
        .call(
            "listing",
            resource_of(kind).plural.to_string(),
            api.list(&ListParams::default()),
        )
        .await?;
    let rv = Revision(
        list.metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    debug!(kind = %kind, objects = list.items.len(), "listed");
    Ok((list.items, rv))
}

/// Sends an event; false when the consumer is gone.
pub(crate) async fn send(tx: &mpsc::Sender<RawEvent>, ev: RawEvent) -> bool {
    tx.send(ev).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_conversion_round_trips_and_checks_names() {
        let record = br#"{"schema":1,"name":"n1","publicKey":"k","endpoints":[],"podCidrs":[]}"#;
        let spec = to_spec(Kind::Nodes, "n1", record).expect("spec");
        assert!(spec.get("name").is_none(), "the name moves to metadata");
        assert!(matches!(
            to_spec(Kind::Nodes, "n2", record),
            Err(RegistryError::NameMismatch { .. })
        ));
        assert!(matches!(
            to_spec(Kind::Nodes, "n1", b"[1]"),
            Err(RegistryError::Invalid { .. })
        ));
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "MeshNode",
            "metadata": {"name": "n1", "resourceVersion": "42"}, "spec": spec,
        }))
        .expect("object");
        let (name, bytes) = from_object(Kind::Nodes, &obj).expect("back");
        assert_eq!(name, "n1");
        let back: Value = serde_json::from_slice(&bytes).expect("json");
        let orig: Value = serde_json::from_slice(record).expect("json");
        assert_eq!(back, orig);
        assert_eq!(revision_of(&obj), Revision(42));
    }

    #[test]
    fn health_summary_names_the_down_peers() {
        let report = br#"{"node":"a","reportedAt":1,"intervalSecs":30,"links":[
            {"peer":"b","state":"up","keyPairs":1},{"peer":"c","state":"no-handshake","keyPairs":0},
            {"peer":"d","state":"idle","keyPairs":1},{"peer":"e","state":"unanswered","keyPairs":1}]}"#;
        let spec = to_spec(Kind::Health, "a", report).expect("spec");
        assert_eq!(
            spec["summary"],
            json!({"up": 1, "idle": 1, "down": 2, "downPeers": "c,e"})
        );
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "MeshNodeHealth",
            "metadata": {"name": "a"}, "spec": spec,
        }))
        .expect("object");
        let (_, bytes) = from_object(Kind::Health, &obj).expect("back");
        let back: Value = serde_json::from_slice(&bytes).expect("json");
        assert!(back.get("summary").is_none());
        assert_eq!(back["node"], "a");
    }

    #[test]
    fn status_changes_only_with_conditions_or_key() {
        let a = json!({"publicKey": "AAAAAAAAAAAA", "endpoints": []});
        let s1 = node_status(&a, Some(1), None);
        let s2 = node_status(&a, Some(1), Some(&s1));
        assert_eq!(status_key(&s1), status_key(&s2));
        assert_eq!(
            s1.conditions[0].last_transition_time,
            s2.conditions[0].last_transition_time
        );
        let rotating = json!({"publicKey": "AAAAAAAAAAAA", "nextPublicKey": "B"});
        let s3 = node_status(&rotating, Some(2), Some(&s1));
        assert_ne!(status_key(&s1), status_key(&s3));
        assert_eq!(s3.conditions[1].status, "True");
        assert_eq!(s3.key_fingerprint.as_deref(), Some("AAAAAAAA"));
    }

    #[test]
    fn api_server_flag_is_checked() {
        assert!(check_api_server("https://10.0.0.1:6443").is_ok());
        assert!(check_api_server("http://10.0.0.1:6443").is_err());
        assert!(check_api_server("https://10.0.0.1:6443/api").is_err());
        assert!(check_api_server("10.0.0.1").is_err());
    }
}
