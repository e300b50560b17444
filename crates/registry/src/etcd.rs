//! The `etcd://HOST:PORT[,HOST:PORT...]` backend: one key per object, `PREFIX/<kind>/<name>`.
//!
//! - Values are the object bytes as-is (JSON for node records). Keys under the collection
//!   prefix that are not `PREFIX/<kind>/<valid-name>` (for example `PREFIX/nodes/a/b`) and values
//!   larger than [`MAX_OBJECT_BYTES`] are skipped with a log line (once per key in a watch).
//!   Keys outside `PREFIX/<kind>/` are never read.
//! - [`Registry::put_owned`] binds the object to this process's lease (TTL
//!   [`EtcdOptions::lease_ttl`], default 60 s), kept alive by a background task. If the lease is
//!   lost (it expired while etcd was unreachable, or etcd lost its data) a new one is granted and
//!   every owned object is written again. Dropping the registry (or the process dying) stops the
//!   keep-alives, so the objects disappear one TTL later; [`Registry::delete`] removes one at once.
//! - A watch lists the collection, sends a `Reset` at the list's revision, then watches from that
//!   revision + 1. When the watch is cancelled (compaction), breaks (disconnect) or cannot start,
//!   it lists again and sends a fresh `Reset`, so no change is missed or applied twice. While
//!   etcd cannot be listed it sends `Status(Unreachable)` once and retries with jittered backoff
//!   (capped at 2 s); when a list succeeds again, `Status(Connected)` and a `Reset` follow. It never
//!   sends a `Delete` because etcd is unreachable.
//! - The client connects lazily (so opening never blocks or fails because etcd is down) and every
//!   unary call has a timeout ([`EtcdOptions::request_timeout`]).
//! - Credentials (`WEFT_ETCD_USERNAME` / `WEFT_ETCD_PASSWORD`, see [`EtcdOptions::from_env`]) never
//!   appear in specs, descriptions or errors; a spec with `user@` in it is refused. A request
//!   etcd refuses for an expired or unknown auth token is repeated once after logging in again
//!   (etcd-client never renews its token). A client certificate's CN can be the etcd user
//!   instead (etcd's `--client-cert-auth`).
//! - A request etcd refuses for lack of permission (an RBAC role that does not cover the key,
//!   see deploy/etcd/README.md) is [`RegistryError::PermissionDenied`], naming the user.

use crate::{
    check_object_name, check_size, Connectivity, Kind, RawEvent, Registry, RegistryError, Revision,
};
use crate::{Snapshot, WatchStream, MAX_OBJECT_BYTES};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, WatchOptions,
};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};
use tracing::{debug, info, warn};

/// Environment variable holding the etcd user name.
pub const ENV_USERNAME: &str = "WEFT_ETCD_USERNAME";
/// Environment variable holding the etcd password.
pub const ENV_PASSWORD: &str = "WEFT_ETCD_PASSWORD";
/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/weft";
/// Default TTL of the lease owned objects are bound to.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(60);
/// Longest wait between retries of a watch.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Options of the etcd backend (everything but the endpoints, which come from the spec).
#[derive(Clone)]
pub struct EtcdOptions {
    /// Key prefix, `/weft` by default: objects live at `PREFIX/<kind>/<name>`.
    pub prefix: String,
    /// CA bundle (PEM) to verify the servers with; setting it switches to TLS.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS; needs `cert_file`.
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// TTL of the lease owned objects are bound to (at least 2 s). Default 60 s.
    pub lease_ttl: Duration,
    /// Limit on each unary request (get, put, delete, lease grant). Default 3 s.
    pub request_timeout: Duration,
    /// Limit on opening a connection. Default 2 s.
    pub connect_timeout: Duration,
    /// Tests only: a pause between a watch's list and the creation of its etcd watch, so a test
    /// can change and compact history in between. Zero by default.
    #[doc(hidden)]
    pub test_watch_delay: Duration,
}

impl fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("prefix", &self.prefix)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("lease_ttl", &self.lease_ttl)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            prefix: DEFAULT_PREFIX.into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password: None,
            lease_ttl: DEFAULT_LEASE_TTL,
            request_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(2),
            test_watch_delay: Duration::ZERO,
        }
    }
}

impl EtcdOptions {
    /// Defaults, with the user name and password taken from `WEFT_ETCD_USERNAME` /
    /// `WEFT_ETCD_PASSWORD` (empty values count as unset).
    pub fn from_env() -> Self {
        let var = |k| std::env::var(k).ok().filter(|v: &String| !v.is_empty());
        EtcdOptions {
            username: var(ENV_USERNAME),
            password: var(ENV_PASSWORD),
            ..EtcdOptions::default()
        }
    }

    /// Checks the prefix, TTL, the TLS file combination and the credentials pair. Does not read
    /// files (see [`EtcdRegistry::open`]).
    pub fn check(&self) -> Result<(), String> {
        check_prefix(&self.prefix)?;
        if self.lease_ttl < Duration::from_secs(2) {
            return Err(format!(
                "lease TTL {:?} is too short (at least 2 s)",
                self.lease_ttl
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("a client certificate and key must be given together".into());
        }
        if self.cert_file.is_some() && self.ca_file.is_none() {
            return Err("a client certificate needs a CA (TLS) as well".into());
        }
        if self.username.is_some() != self.password.is_some() {
            return Err(format!(
                "{ENV_USERNAME} and {ENV_PASSWORD} must be set together"
            ));
        }
        Ok(())
    }
}

/// Checks the etcd flags meshd and keyctl share: the key prefix, that each TLS file given can be
/// read, and their combination (a certificate needs its key and a CA). The error names the flag
/// (`etcd-prefix`, `etcd-ca`, `etcd-cert`, `etcd-key`) and says what is wrong.
pub fn check_flags(
    prefix: &str,
    ca: Option<&std::path::Path>,
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> Result<(), (&'static str, String)> {
    check_prefix(prefix).map_err(|e| ("etcd-prefix", e))?;
    for (flag, path) in [("etcd-ca", ca), ("etcd-cert", cert), ("etcd-key", key)] {
        if let Some(p) = path {
            if let Err(e) = std::fs::File::open(p) {
                return Err((flag, format!("cannot read {}: {e}", p.display())));
            }
        }
    }
    match (cert.is_some(), key.is_some()) {
        (true, false) => return Err(("etcd-key", "--etcd-cert needs --etcd-key".into())),
        (false, true) => return Err(("etcd-cert", "--etcd-key needs --etcd-cert".into())),
        _ => {}
    }
    if cert.is_some() && ca.is_none() {
        return Err((
            "etcd-ca",
            "a client certificate needs --etcd-ca (TLS)".into(),
        ));
    }
    Ok(())
}

/// Checks a key prefix: starts with `/`, does not end with one, printable ASCII without spaces.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.starts_with('/') || prefix.len() < 2 || prefix.ends_with('/') {
        return Err(format!(
            "prefix {prefix:?} must start with '/' and not end with one, for example /weft"
        ));
    }
    if prefix.len() > 200 || !prefix.bytes().all(|b| b.is_ascii_graphic()) || prefix.contains("//")
    {
        return Err(format!(
            "prefix {prefix:?} must be at most 200 printable ASCII characters without spaces or '//'"
        ));
    }
    Ok(())
}

/// Parses the endpoints of an `etcd://HOST:PORT[,HOST:PORT...]` spec (the part after `://`).
/// Errors never quote the input when it could hold credentials.
pub fn parse_endpoints(rest: &str) -> Result<Vec<String>, String> {
    if rest.contains('@') {
        return Err(format!(
            "credentials do not belong in the spec; set {ENV_USERNAME} and {ENV_PASSWORD}"
        ));
    }
    let rest = rest.trim_end_matches('/');
    let mut out = Vec::new();
    for ep in rest.split(',') {
        let ep = ep.trim();
        let Some((host, port)) = ep.rsplit_once(':') else {
            return Err(format!("endpoint {ep:?} is not HOST:PORT"));
        };
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(format!("endpoint {ep:?} has no valid port")),
        }
        let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            v6.parse::<std::net::Ipv6Addr>().is_ok()
        } else {
            !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        };
        if !host_ok {
            return Err(format!("endpoint {ep:?} has no valid host"));
        }
        out.push(ep.to_string());
    }
    if out.is_empty() {
        return Err("no endpoint".into());
    }
    Ok(out)
}

/// The etcd registry. Cheap to share (`Arc<dyn Registry>`); all clones of the underlying client
/// share one HTTP/2 connection per endpoint.
pub struct EtcdRegistry {
    inner: Arc<Inner>,
}

impl fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("describe", &self.inner.describe)
            .finish()
    }
}

struct Inner {
    urls: Vec<String>,
    describe: String,
    options: EtcdOptions,
    connect: ConnectOptions,
    client: Mutex<Option<Client>>,
    owned: Mutex<Owned>,
}

/// Objects bound to this process's lease.
#[derive(Default)]
struct Owned {
    lease: Option<i64>,
    records: BTreeMap<(Kind, String), Vec<u8>>,
    /// The lease was lost; every record must be written again with the new one.
    dirty: bool,
    keeper_running: bool,
}

fn read_file(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(path).map_err(|e| RegistryError::io(what, path, e))
}

impl EtcdRegistry {
    /// Opens the registry at `endpoints` (`HOST:PORT`, see [`parse_endpoints`]). Reads the TLS
    /// files now, so a bad path fails here; does not contact etcd.
    pub fn open(
        scheme: &str,
        endpoints: Vec<String>,
        options: EtcdOptions,
    ) -> Result<Self, RegistryError> {
        let bad = |reason: String| RegistryError::BadSpec {
            spec: format!("{scheme}://{}", endpoints.join(",")),
            reason,
        };
        options.check().map_err(bad)?;
        let tls = options.ca_file.is_some() || scheme == "etcds";
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(false);
        if tls {
            let Some(ca) = &options.ca_file else {
                return Err(bad("etcds:// needs a CA file (--etcd-ca)".into()));
            };
            let mut t = etcd_client::TlsOptions::new().ca_certificate(
                etcd_client::Certificate::from_pem(read_file("reading the etcd CA", ca)?),
            );
            if let (Some(c), Some(k)) = (&options.cert_file, &options.key_file) {
                t = t.identity(etcd_client::Identity::from_pem(
                    read_file("reading the etcd client certificate", c)?,
                    read_file("reading the etcd client key", k)?,
                ));
            }
            connect = connect.with_tls(t);
        }
        if let (Some(u), Some(p)) = (&options.username, &options.password) {
            connect = connect.with_user(u.clone(), p.clone());
        }
        let proto = if tls { "https" } else { "http" };
        let urls = endpoints.iter().map(|e| format!("{proto}://{e}")).collect();
        let describe = format!("{scheme}://{}{}", endpoints.join(","), options.prefix);
        Ok(EtcdRegistry {
            inner: Arc::new(Inner {
                urls,
                describe,
                options,
                connect,
                client: Mutex::new(None),
                owned: Mutex::new(Owned::default()),
            }),
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.options.prefix
    }
}

fn etcd_err(op: &'static str, target: String, e: impl fmt::Display) -> RegistryError {
    RegistryError::Backend {
        op,
        target,
        reason: e.to_string(),
    }
}

/// An etcd client error as one readable line: the gRPC message and code, or a transport error
/// with its causes (etcd-client and tonic print only "transport error" for, say, a server
/// certificate signed by an unknown CA).
pub(crate) fn describe_error(e: &etcd_client::Error) -> String {
    let mut out = match e {
        etcd_client::Error::GRpcStatus(s) => {
            let mut out = s.message().to_string();
            append_causes(&mut out, std::error::Error::source(s));
            out.push_str(&format!(" (gRPC {:?})", s.code()));
            out
        }
        etcd_client::Error::TransportError(t) => {
            let mut out = "cannot connect".to_string();
            append_causes(&mut out, Some(t));
            out
        }
        other => other.to_string(),
    };
    if out.contains("UnknownIssuer") {
        out.push_str(" (is --etcd-ca the CA that signed etcd's server certificate?)");
    }
    out
}

/// Appends ": cause" for each error in the chain that adds something.
fn append_causes(out: &mut String, mut cause: Option<&(dyn std::error::Error + 'static)>) {
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && text != "transport error" && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
}

/// etcd's message if `e` is a gRPC `PermissionDenied` (code 7; tonic is not a direct
/// dependency).
fn permission_denied(e: &etcd_client::Error) -> Option<String> {
    match e {
        etcd_client::Error::GRpcStatus(s) if s.code() as i32 == 7 => Some(s.message().to_string()),
        _ => None,
    }
}

impl Inner {
    fn kind_prefix(&self, kind: Kind) -> String {
        format!("{}/{}/", self.options.prefix, kind.as_str())
    }

    fn key(&self, kind: Kind, name: &str) -> Result<String, RegistryError> {
        check_object_name(kind, name)?;
        Ok(format!("{}{name}", self.kind_prefix(kind)))
    }

    /// The shared client, connecting on first use.
    async fn client(&self) -> Result<Client, RegistryError> {
        let mut guard = self.client.lock().await;
        if let Some(c) = &*guard {
            return Ok(c.clone());
        }
        let c = self.connect().await?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// A new client (a new connection; logs in when a user is set).
    async fn connect(&self) -> Result<Client, RegistryError> {
        let connect = Client::connect(self.urls.clone(), Some(self.connect.clone()));
        tokio::time::timeout(self.options.request_timeout, connect)
            .await
            .map_err(|_| etcd_err("connecting to", self.describe.clone(), "timed out"))?
            .map_err(|e| self.error("connecting to", &self.describe, &e))
    }

    /// A client error as a [`RegistryError`]: `PermissionDenied` when etcd refused for lack of
    /// permission, `Backend` otherwise. Never contains the password.
    fn error(&self, op: &'static str, target: &str, e: &etcd_client::Error) -> RegistryError {
        if let Some(reason) = permission_denied(e) {
            let who = match &self.options.username {
                Some(u) => format!("etcd user {u:?}"),
                None if self.options.cert_file.is_some() => {
                    "the etcd user named by this client certificate's CN".into()
                }
                None => "an anonymous etcd client".into(),
            };
            return RegistryError::PermissionDenied {
                op,
                target: target.to_string(),
                who,
                reason,
            };
        }
        etcd_err(op, target.to_string(), describe_error(e))
    }

    /// Runs one unary request with the request timeout.
    ///
    /// etcd-client 0.14 logs in once, when it connects, and never renews its token, while etcd
    /// forgets a simple token `--auth-token-ttl` (300 s by default) after its last use, and all
    /// tokens when it restarts. So when etcd rejects the token, this connects (and logs in)
    /// again, replaces the shared client and retries the request once. Streams already open
    /// (watch, lease keep-alive) are not affected: etcd checks the token when they start.
    async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        target: &str,
        f: F,
    ) -> Result<T, RegistryError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let client = self.client().await?;
        let e = match tokio::time::timeout(self.options.request_timeout, f(client)).await {
            Err(_) => return Err(etcd_err(op, target.to_string(), "timed out")),
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e,
        };
        if !is_auth_error(&e) {
            return Err(self.error(op, target, &e));
        }
        if self.options.username.is_none() {
            *self.client.lock().await = None;
            return Err(self.error(op, target, &e));
        }
        debug!(error = %describe_error(&e), "etcd rejected the auth token; logging in again");
        let fresh = {
            let mut guard = self.client.lock().await;
            *guard = None;
            let c = self.connect().await?;
            *guard = Some(c.clone());
            c
        };
        match tokio::time::timeout(self.options.request_timeout, f(fresh)).await {
            Err(_) => Err(etcd_err(op, target.to_string(), "timed out")),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if is_auth_error(&e) {
                    *self.client.lock().await = None;
                }
                Err(self.error(op, target, &e))
            }
        }
    }

    async fn list_raw(
        &self,
        kind: Kind,
        warned: Option<&mut HashSet<String>>,
    ) -> Result<(Vec<(String, Vec<u8>)>, i64), RegistryError> {
        let prefix = self.kind_prefix(kind);
        let mut resp = self
            .call("listing", &prefix, |mut c| {
                let p = prefix.clone();
                async move { c.get(p, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut items = Vec::new();
        let mut local = HashSet::new();
        let warned = warned.unwrap_or(&mut local);
        let mut seen = HashSet::new();
        for kv in resp.take_kvs() {
            let (key, value) = kv.into_key_value();
            match self.classify(kind, &key, &value) {
                Ok(name) => items.push((name, value)),
                Err(why) => {
                    let k = String::from_utf8_lossy(&key).into_owned();
                    if !warned.contains(&k) {
                        warn!(key = %k, reason = %why, "ignoring etcd key");
                    }
                    seen.insert(k);
                }
            }
        }
        // Warn again about a foreign key only after it went away and came back.
        warned.retain(|k| seen.contains(k));
        warned.extend(seen);
        items.sort();
        Ok((items, revision))
    }

    /// The object name of a key under `PREFIX/<kind>/`, or why the key is not an object.
    fn classify(&self, kind: Kind, key: &[u8], value: &[u8]) -> Result<String, String> {
        let prefix = self.kind_prefix(kind);
        let name = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix(&prefix))
            .ok_or_else(|| "not under the collection prefix".to_string())?;
        check_object_name(kind, name)
            .map_err(|_| format!("not named {prefix}<lowercase-dns-name>"))?;
        if value.len() > MAX_OBJECT_BYTES {
            return Err(format!(
                "value is {} bytes, more than the limit of {MAX_OBJECT_BYTES}",
                value.len()
            ));
        }
        Ok(name.to_string())
    }

    async fn grant(&self) -> Result<i64, RegistryError> {
        let ttl = self.options.lease_ttl.as_secs() as i64;
        let r = self
            .call("granting a lease on", &self.describe, |mut c| async move {
                c.lease_grant(ttl, None).await
            })
            .await?;
        info!(
            lease = format!("{:x}", r.id()),
            ttl = r.ttl(),
            "etcd lease granted"
        );
        Ok(r.id())
    }

    async fn put_with_lease(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<i64, RegistryError> {
        let r = self
            .call("writing", key, |mut c| {
                let (k, v) = (key.to_string(), value.to_vec());
                async move {
                    let opts = lease.map(|l| PutOptions::new().with_lease(l));
                    c.put(k, v, opts).await
                }
            })
            .await?;
        Ok(r.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// Grants a new lease if there is none, and rewrites every owned record if the lease was lost.
    /// Called with the owned state locked.
    async fn ensure_lease(&self, owned: &mut Owned) -> Result<i64, RegistryError> {
        let lease = match owned.lease {
            Some(l) => l,
            None => {
                let l = self.grant().await?;
                owned.lease = Some(l);
                l
            }
        };
        if owned.dirty {
            for ((kind, name), value) in &owned.records {
                let key = self.key(*kind, name)?;
                self.put_with_lease(&key, value, Some(lease)).await?;
            }
            owned.dirty = false;
            info!(
                records = owned.records.len(),
                "re-published owned records under a new lease"
            );
        }
        Ok(lease)
    }
}

/// etcd rejected the token: `Unauthenticated` (gRPC code 16), which is what etcd answers with
/// "invalid auth token" once the token expired or etcd restarted.
fn is_auth_error(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() as i32 == 16 || s.message().contains("auth token")
        }
        _ => false,
    }
}

fn is_lease_not_found(e: &RegistryError) -> bool {
    matches!(e, RegistryError::Backend { reason, .. } if reason.contains("requested lease not found"))
}

/// A random wait in [backoff/2, backoff].
fn jittered(backoff: Duration) -> Duration {
    use rand::Rng;
    let ms = backoff.as_millis().max(2) as u64;
    Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms))
}

#[async_trait::async_trait]
impl Registry for EtcdRegistry {
    fn describe(&self) -> String {
        self.inner.describe.clone()
    }

    fn location(&self, kind: Kind, name: &str) -> String {
        format!("{}{name}", self.inner.kind_prefix(kind))
    }

    async fn put(&self, kind: Kind, name: &str, value: &[u8]) -> Result<Revision, RegistryError> {
        let key = self.inner.key(kind, name)?;
        check_size(kind, name, value)?;
        // A plain put detaches the object from our lease.
        self.inner
            .owned
            .lock()
            .await
            .records
            .remove(&(kind, name.to_string()));
        let rev = self.inner.put_with_lease(&key, value, None).await?;
        Ok(Revision(rev.max(0) as u64))
    }

    async fn put_owned(
        &self,
        kind: Kind,
        name: &str,
        value: &[u8],
    ) -> Result<Revision, RegistryError> {
        let key = self.inner.key(kind, name)?;
        check_size(kind, name, value)?;
        let mut owned = self.inner.owned.lock().await;
        let mut lease = self.inner.ensure_lease(&mut owned).await?;
        let rev = match self.inner.put_with_lease(&key, value, Some(lease)).await {
            Err(e) if is_lease_not_found(&e) => {
                warn!("etcd lease expired; granting a new one");
                owned.lease = None;
                owned.dirty = true;
                lease = self.inner.ensure_lease(&mut owned).await?;
                self.inner.put_with_lease(&key, value, Some(lease)).await?
            }
            r => r?,
        };
        owned
            .records
            .insert((kind, name.to_string()), value.to_vec());
        if !owned.keeper_running {
            owned.keeper_running = true;
            tokio::spawn(run_keeper(Arc::downgrade(&self.inner)));
        }
        Ok(Revision(rev.max(0) as u64))
    }

    async fn get(&self, kind: Kind, name: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        let key = self.inner.key(kind, name)?;
        let mut resp = self
            .inner
            .call("reading", &key, |mut c| {
                let k = key.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        match resp.take_kvs().into_iter().next() {
            None => Ok(None),
            Some(kv) => {
                let (_, value) = kv.into_key_value();
                if value.len() > MAX_OBJECT_BYTES {
                    return Err(RegistryError::TooLarge {
                        kind,
                        name: name.to_string(),
                        size: value.len(),
                    });
                }
                Ok(Some(value))
            }
        }
    }

    async fn delete(&self, kind: Kind, name: &str) -> Result<bool, RegistryError> {
        let key = self.inner.key(kind, name)?;
        // Forget it first so the keeper cannot write it back.
        let mut owned = self.inner.owned.lock().await;
        owned.records.remove(&(kind, name.to_string()));
        let r = self
            .inner
            .call("deleting", &key, |mut c| {
                let k = key.clone();
                async move { c.delete(k, None::<DeleteOptions>).await }
            })
            .await?;
        drop(owned);
        Ok(r.deleted() > 0)
    }

    async fn list(&self, kind: Kind) -> Result<(Vec<(String, Vec<u8>)>, Revision), RegistryError> {
        let (items, rev) = self.inner.list_raw(kind, None).await?;
        Ok((items, Revision(rev.max(0) as u64)))
    }

    async fn list_for_update(
        &self,
        kind: Kind,
    ) -> Result<(Vec<(String, Vec<u8>)>, Snapshot), RegistryError> {
        let (items, rev) = self.inner.list_raw(kind, None).await?;
        Ok((items, Snapshot(rev.max(0) as u64)))
    }

    async fn put_if_unchanged(
        &self,
        kind: Kind,
        name: &str,
        value: &[u8],
        snapshot: Snapshot,
    ) -> Result<bool, RegistryError> {
        let key = self.inner.key(kind, name)?;
        check_size(kind, name, value)?;
        self.inner
            .owned
            .lock()
            .await
            .records
            .remove(&(kind, name.to_string()));
        // Every key of the collection must be unmodified since the snapshot's revision: a range
        // compare, so it needs read access to the whole collection (and write only to `key`).
        let since = i64::try_from(snapshot.0)
            .ok()
            .and_then(|r| r.checked_add(1))
            .ok_or_else(|| RegistryError::Internal(format!("bad snapshot {}", snapshot.0)))?;
        let prefix = self.inner.kind_prefix(kind);
        let resp = self
            .inner
            .call("claiming", &key, |mut c| {
                let txn = Txn::new()
                    .when([
                        Compare::mod_revision(prefix.clone(), CompareOp::Less, since).with_prefix(),
                    ])
                    .and_then([TxnOp::put(key.clone(), value.to_vec(), None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(resp.succeeded())
    }

    async fn watch(
        &self,
        kind: Kind,
        _from: Option<Revision>,
    ) -> Result<WatchStream, RegistryError> {
        let (tx, rx) = mpsc::channel(256);
        info!(registry = %self.inner.describe, %kind, "watching registry");
        tokio::spawn(run_watch(self.inner.clone(), kind, tx));
        Ok(WatchStream::new(rx))
    }
}

/// Why a watch session ended.
enum WatchEnd {
    /// The consumer dropped the stream.
    Dropped,
    /// Start over with a list (compaction, disconnect, error); the reason is for the log.
    Relist(String),
}

async fn run_watch(inner: Arc<Inner>, kind: Kind, tx: mpsc::Sender<RawEvent>) {
    let mut reachable = true;
    let mut backoff = Duration::from_millis(100);
    let mut warned = HashSet::new();
    loop {
        if tx.is_closed() {
            break;
        }
        let listed = tokio::select! {
            _ = tx.closed() => break,
            r = inner.list_raw(kind, Some(&mut warned)) => r,
        };
        let (items, revision) = match listed {
            Ok(l) => l,
            Err(e) => {
                if reachable {
                    warn!(registry = %inner.describe, error = %e, "etcd unreachable; keeping the last known records");
                    reachable = false;
                    if tx
                        .send(RawEvent::Status(Connectivity::Unreachable(e.to_string())))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                tokio::select! {
                    _ = tx.closed() => break,
                    _ = tokio::time::sleep(jittered(backoff)) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if !reachable {
            info!(registry = %inner.describe, "etcd reachable again; resyncing");
            if tx
                .send(RawEvent::Status(Connectivity::Connected))
                .await
                .is_err()
            {
                break;
            }
            reachable = true;
        }
        backoff = Duration::from_millis(100);
        let reset = RawEvent::Reset {
            items,
            revision: Revision(revision.max(0) as u64),
        };
        if tx.send(reset).await.is_err() {
            break;
        }
        if !inner.options.test_watch_delay.is_zero() {
            tokio::time::sleep(inner.options.test_watch_delay).await;
        }
        match watch_from(&inner, kind, revision + 1, &tx, &mut warned).await {
            WatchEnd::Dropped => break,
            WatchEnd::Relist(why) => {
                info!(registry = %inner.describe, reason = %why, "etcd watch ended; listing again");
                // A short pause so a flapping connection does not spin.
                tokio::select! {
                    _ = tx.closed() => break,
                    _ = tokio::time::sleep(jittered(Duration::from_millis(100))) => {}
                }
            }
        }
    }
    debug!(registry = %inner.describe, "registry watch dropped; stopping");
}

async fn watch_from(
    inner: &Inner,
    kind: Kind,
    start: i64,
    tx: &mpsc::Sender<RawEvent>,
    warned: &mut HashSet<String>,
) -> WatchEnd {
    let prefix = inner.kind_prefix(kind);
    let client = match inner.client().await {
        Ok(c) => c,
        Err(e) => return WatchEnd::Relist(e.to_string()),
    };
    let mut wc = client.watch_client();
    let opts = WatchOptions::new().with_prefix().with_start_revision(start);
    let created = tokio::time::timeout(
        inner.options.request_timeout,
        wc.watch(prefix.clone(), Some(opts)),
    )
    .await;
    let (_watcher, mut stream) = match created {
        Err(_) => return WatchEnd::Relist("creating the watch timed out".into()),
        Ok(Err(e)) => {
            return WatchEnd::Relist(format!("creating the watch: {}", describe_error(&e)))
        }
        Ok(Ok(w)) => w,
    };
    debug!(%prefix, start, "etcd watch created");
    loop {
        let msg = tokio::select! {
            _ = tx.closed() => return WatchEnd::Dropped,
            m = stream.message() => m,
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => return WatchEnd::Relist("the watch stream ended".into()),
            Err(e) => {
                return WatchEnd::Relist(format!("watch stream error: {}", describe_error(&e)))
            }
        };
        if resp.canceled() {
            return WatchEnd::Relist(if resp.compact_revision() > 0 {
                format!(
                    "history compacted up to revision {} (watching from {start})",
                    resp.compact_revision()
                )
            } else {
                format!("watch cancelled: {}", resp.cancel_reason())
            });
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let revision = Revision(kv.mod_revision().max(0) as u64);
            let value = if ev.event_type() == EventType::Put {
                kv.value()
            } else {
                &[]
            };
            let name = match inner.classify(kind, kv.key(), value) {
                Ok(n) => n,
                Err(why) => {
                    let k = String::from_utf8_lossy(kv.key()).into_owned();
                    if ev.event_type() == EventType::Delete {
                        warned.remove(&k);
                    } else if warned.insert(k.clone()) {
                        warn!(key = %k, reason = %why, "ignoring etcd key");
                    }
                    continue;
                }
            };
            let out = match ev.event_type() {
                EventType::Put => RawEvent::Upsert {
                    name,
                    value: value.to_vec(),
                    revision,
                },
                EventType::Delete => RawEvent::Delete { name, revision },
            };
            if tx.send(out).await.is_err() {
                return WatchEnd::Dropped;
            }
        }
    }
}

/// Why a keep-alive session ended.
enum KeepEnd {
    /// The registry was dropped or nothing is owned any more.
    Stop,
    /// etcd says the lease no longer exists.
    Lost,
    /// The owned state changed (new lease, nothing owned): look at it again.
    Restart,
    /// Cannot reach etcd; try again later.
    Error(String),
}

/// Keeps the lease alive while the registry exists; re-grants and re-publishes if it is lost.
async fn run_keeper(weak: Weak<Inner>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let (lease, dirty) = {
            let mut owned = inner.owned.lock().await;
            if owned.records.is_empty() {
                owned.keeper_running = false;
                debug!("no owned records; lease keeper stopping");
                return;
            }
            (owned.lease, owned.dirty)
        };
        let end = match lease {
            Some(l) if !dirty => {
                let session = KeepSession {
                    client: inner.client().await,
                    lease: l,
                    interval: (inner.options.lease_ttl / 3).max(Duration::from_millis(500)),
                    timeout: inner.options.request_timeout,
                };
                drop(inner);
                session.run(&weak).await
            }
            _ => {
                let mut owned = inner.owned.lock().await;
                match inner.ensure_lease(&mut owned).await {
                    Ok(_) => continue,
                    Err(e) => KeepEnd::Error(e.to_string()),
                }
            }
        };
        match end {
            KeepEnd::Stop => {
                if let Some(inner) = weak.upgrade() {
                    inner.owned.lock().await.keeper_running = false;
                }
                return;
            }
            KeepEnd::Restart => {}
            KeepEnd::Lost => {
                warn!("etcd lease lost; granting a new one and re-publishing owned records");
                if let Some(inner) = weak.upgrade() {
                    let mut owned = inner.owned.lock().await;
                    if owned.lease == lease {
                        owned.lease = None;
                        owned.dirty = true;
                    }
                }
                backoff = Duration::from_millis(200);
            }
            KeepEnd::Error(e) => {
                debug!(error = %e, "etcd lease keep-alive failed; retrying");
                tokio::time::sleep(jittered(backoff)).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One keep-alive stream for one lease. Holds no strong reference to the registry.
struct KeepSession {
    client: Result<Client, RegistryError>,
    lease: i64,
    interval: Duration,
    timeout: Duration,
}

impl KeepSession {
    async fn run(self, weak: &Weak<Inner>) -> KeepEnd {
        let client = match self.client {
            Ok(c) => c,
            Err(e) => return KeepEnd::Error(e.to_string()),
        };
        let mut lc = client.lease_client();
        let opened = tokio::time::timeout(self.timeout, lc.keep_alive(self.lease)).await;
        let (mut keeper, mut stream) = match opened {
            Err(_) => return KeepEnd::Error("opening the keep-alive stream timed out".into()),
            Ok(Err(e)) => return KeepEnd::Error(describe_error(&e)),
            Ok(Ok(s)) => s,
        };
        loop {
            if let Err(e) = keeper.keep_alive().await {
                return KeepEnd::Error(describe_error(&e));
            }
            match tokio::time::timeout(self.timeout, stream.message()).await {
                Err(_) => return KeepEnd::Error("keep-alive timed out".into()),
                Ok(Err(e)) => return KeepEnd::Error(describe_error(&e)),
                Ok(Ok(None)) => return KeepEnd::Error("keep-alive stream ended".into()),
                Ok(Ok(Some(r))) if r.ttl() <= 0 => return KeepEnd::Lost,
                Ok(Ok(Some(_))) => {}
            }
            // Sleep in small steps so a dropped registry ends us promptly.
            let until = tokio::time::Instant::now() + self.interval;
            while tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(250).min(self.interval)).await;
                if weak.strong_count() == 0 {
                    return KeepEnd::Stop;
                }
            }
            let Some(inner) = weak.upgrade() else {
                return KeepEnd::Stop;
            };
            let owned = inner.owned.lock().await;
            if owned.records.is_empty() || owned.lease != Some(self.lease) || owned.dirty {
                return KeepEnd::Restart;
            }
        }
    }
}
