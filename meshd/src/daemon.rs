//! `meshd run`: sets up the node (fail-closed routes first), starts the data-path workers (one
//! thread each, with its own TUN queue and UDP socket, see [`crate::worker`]) over the node's
//! shards ([`crate::shards`]), then one control event loop drives the shards with timer ticks,
//! registry events (node records, external peers, revocations, rotation requests) and API
//! requests, and sends what those ask for (handshakes, keepalives).

use crate::api::{NodeInfo, Status};
use crate::config::Config;
use crate::keyfile;
use crate::revocations::{self, Revocations};
use crate::shards::Shards;
use crate::worker::{Worker, WorkerStatus};
use anyhow::{Context, Result};
use ipnet::IpNet;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};
use weft_core::control::{
    filter_revoked, filter_revoked_external, PskGeneration, Revocation, PSK_OBJECT,
};
use weft_core::external::ExternalPeer;
use weft_core::node::Output;
use weft_core::reconcile::{desired_peer_set, plan};
use weft_core::record::{mesh_address, NodeRecord, SCHEMA_VERSION};
use weft_registry::{Connectivity, Event, Object, Registry};
use weft_sys::{Netlink, Route, RouteKind, Tun, DEV_ROUTE_METRIC};

const TICK: Duration = Duration::from_millis(250);

enum ApiRequest {
    Status(oneshot::Sender<String>),
    Leave(oneshot::Sender<String>),
}

enum Exit {
    Stop,
    Leave(oneshot::Sender<String>),
    /// A data-path worker ended (index, why): meshd stops and exits with an error.
    WorkerEnded(u16, String),
}

/// The data-path worker threads.
struct Workers {
    status: Vec<Arc<std::sync::Mutex<WorkerStatus>>>,
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

struct Daemon {
    cfg: Config,
    /// The node's state, one shard per data-path worker.
    shards: Arc<Shards>,
    own: NodeRecord,
    mtu: u32,
    /// The TUN interface's name (its queues belong to the workers).
    ifname: String,
    /// A handle on worker 0's UDP socket for what the control loop sends (handshakes and
    /// keepalives its calls produce); never read from here.
    control_udp: std::net::UdpSocket,
    udp_v6: bool,
    /// Outputs taken from the shards by the control loop.
    control_outs: Vec<Output>,
    nl: Netlink,
    registry: Arc<dyn Registry>,
    records: BTreeMap<String, NodeRecord>,
    refused: BTreeMap<String, String>,
    /// External standard WireGuard peers (`peers/NAME`, written by `keyctl peer add`).
    externals: BTreeMap<String, ExternalPeer>,
    refused_external: BTreeMap<String, String>,
    /// Whether node records are known (a first listing, or the cache): external peers are
    /// checked against the nodes, so none is added before.
    nodes_known: bool,
    routes: HashSet<Route>,
    connectivity: String,
    /// The task writing this node's record until the registry accepts it.
    publisher: Option<tokio::task::JoinHandle<()>>,
    /// What became of that write, for `status` ("published", "publishing", or
    /// "not published: ERROR" while the registry refuses it, for example for lack of permission).
    own_record: Arc<std::sync::Mutex<String>>,
    /// Renews this node's pod CIDR claim (when the range was claimed, not given).
    renewal: Option<tokio::task::JoinHandle<()>>,
    /// What `meshd status` says about that claim.
    claim_state: Option<Arc<std::sync::Mutex<String>>>,
    /// `STATE_DIR/peers.json` and `STATE_DIR/external-peers.json`, and when they are due.
    cache: PeerCache,
    /// This node's key rotation.
    rotation: crate::rotation::Rotation,
    /// Revocations by node name (`keyctl revoke`): records they do not admit are refused.
    revocations: Revocations,
    /// The revocation cache last written (to skip identical writes).
    revocations_cached: String,
    /// Why this node itself is revoked, as last logged.
    self_revoked: Option<String>,
    /// This node's link health report (`health/NAME`) and its writer.
    health: Health,
    /// What the kubelet's probes see (`--health-listen`).
    ready: Arc<crate::probes::Readiness>,
    /// The data-path workers.
    workers: Workers,
    /// What `/metrics` reads of the control loop's state (written every tick).
    metrics: Arc<std::sync::Mutex<crate::metrics::ControlState>>,
    /// Unix seconds of the last listing or change read from the registry.
    registry_last_sync: f64,
    /// The WireGuard UAPI socket file, removed when the daemon goes.
    _uapi_file: Option<SocketFile>,
    /// Warnings that repeat (a peer that does not answer, a refused record): one line per
    /// `--log-repeat-interval` each.
    repeats: crate::logging::Repeats,
    /// NetworkPolicy enforcement (`--network-policy`).
    policy: Option<crate::netpol::Policy>,
}

/// A socket file removed when this drops.
struct SocketFile(std::path::PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The link health report last written, when, and the task writing one.
#[derive(Default)]
struct Health {
    /// Which links send without hearing back.
    links: weft_core::health::LinkWatch,
    published: Option<weft_core::health::HealthReport>,
    checked: Option<Instant>,
    written: Option<Instant>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// How often the link health is looked at; a changed report is written at once.
const HEALTH_CHECK: Duration = Duration::from_secs(2);
/// A report is written at least this often even when nothing changed (readers call a report
/// stale after three of these).
const HEALTH_INTERVAL: Duration = Duration::from_secs(30);
/// The nftables table of `--masquerade` (`ip weft`, `ip6 weft`).
const MASQ_TABLE: &str = "weft";
/// Without heartbeats ([`Registry::heartbeats`]): the least time between two report writes.
const HEALTH_MIN_GAP: Duration = Duration::from_secs(10);

/// The write state of the peer cache. It is written at most once per [`PEER_CACHE_INTERVAL`] (a
/// burst of registry events costs one write, not one per event), and at shutdown.
#[derive(Default)]
struct PeerCache {
    /// The text last written (identical writes are skipped).
    written: String,
    /// The same for the external peers.
    written_external: String,
    /// The records changed since the last write.
    dirty: bool,
    /// When the last write was made or tried.
    last: Option<Instant>,
}

/// Shortest time between two writes of the peer cache.
const PEER_CACHE_INTERVAL: Duration = Duration::from_secs(1);
/// Most registry events taken in before one reconcile (keeps the loop responsive under a flood).
const EVENT_BATCH: usize = 4096;

/// How long start-up waits for the registry before going on without it.
const REGISTRY_STARTUP_WAIT: Duration = Duration::from_secs(1);

/// `STATE_DIR/peers.json`: the last known records (this node's too), so meshd started while the
/// registry is unreachable comes up with its peers.
pub const PEER_CACHE_FILE: &str = "peers.json";

/// `STATE_DIR/external-peers.json`: the last known external peer records, for the same reason.
pub const EXTERNAL_CACHE_FILE: &str = "external-peers.json";

/// Reads the peer cache; a missing or bad file (or bad entries in it) is logged and skipped.
fn load_peer_cache(state_dir: &std::path::Path) -> Vec<NodeRecord> {
    load_cache(state_dir, PEER_CACHE_FILE)
}

/// Reads a cache of registry objects (a JSON list); a missing or bad file (or bad entries in it)
/// is logged and skipped.
fn load_cache<T: Object>(state_dir: &std::path::Path, file: &str) -> Vec<T> {
    let path = state_dir.join(file);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the peer cache");
            return Vec::new();
        }
    };
    let items: Vec<serde_json::Value> = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignoring a malformed peer cache");
            return Vec::new();
        }
    };
    items
        .into_iter()
        .filter_map(|v| match T::decode(v.to_string().as_bytes()) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "skipping a cached record");
                None
            }
        })
        .collect()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random wait in [d/2, d] (spreads retries of many nodes).
pub(crate) fn jittered(d: Duration) -> Duration {
    use rand::Rng;
    let ms = d.as_millis().max(2) as u64;
    Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms))
}

pub async fn run(mut cfg: Config) -> Result<()> {
    let (key, created) = keyfile::load_or_create(&cfg.state_dir)?;
    let public = key.public_key();
    tracing::info!(node = %cfg.node_name, key = %public, created, "node key");

    let nl = Netlink::new().context("opening rtnetlink")?;
    // Fail closed before anything else: a packet for a pod range never follows the default
    // route in plaintext, whether or not meshd is running. These routes outlive meshd.
    for c in &cfg.cluster_cidrs {
        nl.replace_route(&Route::unreachable(*c))
            .await
            .with_context(|| format!("installing unreachable route for {c}"))?;
    }

    // Probes bind first: a port in use is a start-up error, before any TUN exists.
    let probes = crate::probes::bind_flag("health-listen", cfg.health_listen).await?;
    let metrics_listener = crate::probes::bind_flag("metrics-listen", cfg.metrics_listen).await?;
    let ready = Arc::new(crate::probes::Readiness::default());
    ready.tick();
    if let Some(l) = probes {
        crate::probes::spawn(l, ready.clone());
    }
    // --registry kube: the endpoint and pod ranges may come from this node's Node.
    let (kube, node_endpoints, node_private) = if cfg.kube.is_some() {
        let (k, from) = crate::kube::start(&mut cfg).await?;
        (Some(k), from.endpoints, from.private_endpoints)
    } else {
        (None, None, None)
    };

    let underlay = nl.default_route_source().await.ok().flatten();
    let endpoints = if cfg.behind_nat {
        Vec::new()
    } else if let (true, Some(eps)) = (cfg.endpoints.is_empty(), &node_endpoints) {
        eps.clone()
    } else if cfg.endpoints.is_empty() {
        match &underlay {
            Some((_, ip, _)) => vec![std::net::SocketAddr::new(*ip, cfg.listen_port)],
            None => anyhow::bail!(
                "no --endpoint given and no interface holds a default route to take it from"
            ),
        }
    } else {
        cfg.endpoints.clone()
    };
    // Private endpoints (for the nodes of this location): the flag's, the Node's InternalIPs,
    // else the default-route address unless it is public already.
    let private_endpoints = if !cfg.private_endpoints.is_empty() {
        cfg.private_endpoints.clone()
    } else if let Some(p) = node_private {
        p
    } else if cfg.location.is_some() {
        underlay
            .iter()
            .map(|(_, ip, _)| std::net::SocketAddr::new(*ip, cfg.listen_port))
            .filter(|e| !endpoints.contains(e))
            .collect()
    } else {
        Vec::new()
    };
    // With relays, a datagram may carry the relay header too (44 bytes).
    let relay_room = if cfg.use_relays {
        weft_core::pathmsg::RELAY_OVERHEAD as u32
    } else {
        0
    };
    let mtu = match (cfg.mtu, &underlay) {
        (Some(m), _) => m,
        (None, Some((_, _, m))) => m.saturating_sub(80 + relay_room).max(576),
        (None, None) => 1420 - relay_room,
    };
    let has_v6 = cfg.pod_cidrs.iter().any(|c| matches!(c, IpNet::V6(_)));
    let fwd = weft_sys::enable_forwarding_in(&cfg.proc_sys_dir, has_v6)
        .with_context(|| format!("enabling forwarding under {}", cfg.proc_sys_dir.display()))?;
    tracing::debug!(?fwd, "forwarding");

    let registry: Arc<dyn Registry> = match &kube {
        Some(k) => k.clone(),
        None => weft_registry::open_with(
            &cfg.registry,
            &weft_registry::OpenOptions {
                etcd: cfg.etcd.options(),
                ..Default::default()
            },
        )
        .context("opening the registry")?,
    };
    // Without --pod-cidr, claim a block first: everything below (the mesh address, the record,
    // node.json for the CNI plugin) needs it.
    let claim = match cfg.alloc.clone() {
        Some(alloc) => {
            let (block, confirmed) = crate::podcidr::obtain(&cfg, &alloc, &*registry).await?;
            cfg.pod_cidrs = vec![IpNet::V4(block)];
            Some((alloc, block, confirmed))
        }
        None => None,
    };
    let cached = load_peer_cache(&cfg.state_dir);
    let cached_external: Vec<ExternalPeer> = load_cache(&cfg.state_dir, EXTERNAL_CACHE_FILE);
    // Listed alongside the previous record, so even the first reconcile refuses revoked nodes.
    let initial_revocations = tokio::spawn({
        let (registry, state_dir) = (registry.clone(), cfg.state_dir.clone());
        async move { revocations::initial(&registry, &state_dir).await }
    });
    // Bounded: a registry that cannot be reached must not hold up the data path.
    let previous = match tokio::time::timeout(
        REGISTRY_STARTUP_WAIT,
        weft_registry::get_node(&*registry, &cfg.node_name),
    )
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not read this node's previous record");
            cached.iter().find(|r| r.name == cfg.node_name).cloned()
        }
        Err(_) => {
            tracing::warn!("registry did not answer; using this node's cached record");
            cached.iter().find(|r| r.name == cfg.node_name).cloned()
        }
    };
    // The cluster PSK generation: the registry's, else the one this node last published.
    let psk_generation = match &cfg.cluster_secret {
        None => None,
        Some(_) => Some(
            match tokio::time::timeout(
                REGISTRY_STARTUP_WAIT,
                weft_registry::Typed::<PskGeneration>::new(registry.clone()).get(PSK_OBJECT),
            )
            .await
            {
                Ok(Ok(Some(p))) => p.generation,
                _ => previous
                    .as_ref()
                    .and_then(|r| r.psk_generation)
                    .unwrap_or(0),
            },
        ),
    };
    let key_generation = match &previous {
        Some(r) if r.public_key == public => r.key_generation.max(1),
        Some(r) => r.key_generation + 1,
        None => 1,
    };
    let own = NodeRecord {
        schema: SCHEMA_VERSION,
        name: cfg.node_name.clone(),
        public_key: public,
        endpoints,
        private_endpoints,
        location: cfg.location.clone(),
        relay: cfg.relay,
        pod_cidrs: cfg.pod_cidrs.clone(),
        key_generation,
        next_public_key: None,
        key_created_at: keyfile::created_at(&cfg.state_dir),
        psk_generation,
    };
    own.check().context("this node's own record is invalid")?;
    let known_revocations = match initial_revocations.await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "listing revocations failed; using the cached ones");
            revocations::load_cache(&cfg.state_dir)
        }
    };

    let queues = match Tun::open_queues(&cfg.interface, usize::from(cfg.workers), cfg.offload) {
        Err(e) if cfg.workers > 1 && e.is_multi_queue_unsupported() => {
            tracing::warn!(error = %e, "no multi-queue TUN here; one data-path worker");
            Tun::open_queues(&cfg.interface, 1, cfg.offload)
        }
        r => r,
    }
    .context("creating the TUN device")?;
    let ifname = queues
        .first()
        .map(|q| q.name().to_string())
        .context("the TUN device has no queue")?;
    nl.set_mtu(&ifname, mtu)
        .await
        .context("setting the TUN MTU")?;
    for c in &cfg.pod_cidrs {
        if let Some(addr) = mesh_address(c) {
            let len = if addr.is_ipv4() { 32 } else { 128 };
            nl.add_address(&ifname, addr, len)
                .await
                .with_context(|| format!("adding mesh address {addr}"))?;
        }
    }
    nl.link_up(&ifname).await.context("bringing the TUN up")?;
    if cfg.masquerade {
        weft_sys::nft::install_masquerade(MASQ_TABLE, &cfg.pod_cidrs, &cfg.cluster_cidrs)
            .context("installing the pod masquerade")?;
        tracing::info!(
            table = MASQ_TABLE,
            "pod masquerade installed (nftables over netlink)"
        );
    }
    ready
        .tun_up
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let sockets = weft_sys::udp::bind_udp_group(cfg.listen_port, queues.len())
        .with_context(|| format!("binding UDP port {}", cfg.listen_port))?;
    let control_udp = sockets
        .first()
        .context("no UDP socket")?
        .try_clone()
        .context("sharing the UDP socket with the control loop")?;
    let udp_v6 = control_udp.local_addr().is_ok_and(|a| a.is_ipv6());

    // NetworkPolicy: the guard is in force before the CNI plugin can be told meshd is here.
    let policy = match (&kube, cfg.network_policy) {
        (Some(k), true) => {
            let client = k
                .client()
                .await
                .context("the Kubernetes client for NetworkPolicy enforcement")?;
            Some(crate::netpol::start(
                crate::netpol::Options {
                    node: cfg.node_name.clone(),
                    pod_ranges: cfg.pod_cidrs.clone(),
                    state_dir: cfg.state_dir.clone(),
                    keep_established: cfg.keep_established_flows,
                    log_interval: cfg.log_repeat_interval,
                },
                client,
            )?)
        }
        _ => {
            // Off: a table left by an earlier run with enforcement on would keep guarding every
            // new pod; it goes.
            match weft_sys::nft::policy::policy_installed() {
                Ok(true) => {
                    weft_sys::nft::policy::remove_policy()
                        .context("removing table inet weft-policy (--network-policy off)")?;
                    tracing::info!("NetworkPolicy enforcement off: table inet weft-policy removed");
                }
                Ok(false) => {}
                Err(e) => tracing::debug!(error = %e, "looking for table inet weft-policy"),
            }
            None
        }
    };
    write_node_file(&cfg, mtu)?;
    let listener = bind_api(&cfg.api_socket)?;
    // The WireGuard UAPI socket: bound before anything else is set up, so a second meshd for
    // this interface stops here; removed when `uapi_file` drops (every exit path).
    let uapi = match &cfg.wg_uapi_dir {
        Some(dir) => {
            let path = crate::uapi::socket_path(dir, &ifname);
            let l =
                crate::uapi::bind(&path).context("the WireGuard UAPI socket (--wg-uapi-dir)")?;
            Some((l, SocketFile(path)))
        }
        None => None,
    };
    let (api_tx, mut api_rx) = mpsc::channel(16);
    tokio::spawn(serve_api(listener, api_tx, policy.clone()));

    let (ev_tx, mut ev_rx) = mpsc::channel(256);
    tokio::spawn(watch_collection::<NodeRecord>(registry.clone(), ev_tx));
    let (ext_tx, mut ext_rx) = mpsc::channel(256);
    tokio::spawn(watch_collection::<ExternalPeer>(registry.clone(), ext_tx));
    let (rot_tx, mut rot_rx) = mpsc::channel(16);
    tokio::spawn(watch_rotation_requests(
        registry.clone(),
        cfg.node_name.clone(),
        rot_tx,
    ));
    let (rev_tx, mut rev_rx) = mpsc::channel(64);
    tokio::spawn(revocations::watch::<Revocation>(registry.clone(), rev_tx));

    let shards = Shards::new(key, cfg.persistent_keepalive, queues.len() as u16)
        .context("setting up the node's shards")?;
    for i in 0..shards.count() {
        shards.lock(i).set_nat_keepalive(Some(cfg.nat_keepalive));
    }
    shards.set_paths(
        cfg.use_relays,
        cfg.relay,
        &own.endpoints,
        &own.private_endpoints,
    );
    let uapi_file = match uapi {
        Some((listener, file)) => {
            let shards = shards.clone();
            let port = cfg.listen_port;
            let keepalive = cfg.persistent_keepalive.unwrap_or(0);
            let snapshot: crate::uapi::Snapshot = Arc::new(move || {
                let now = crate::metrics::unix_now();
                crate::uapi::device(shards.peer_status(), port, keepalive, now)
            });
            tokio::spawn(crate::uapi::serve(listener, snapshot));
            tracing::info!(socket = %file.0.display(), "WireGuard UAPI socket (wg show)");
            Some(file)
        }
        None => None,
    };
    if let (Some(sf), Some(g)) = (&cfg.cluster_secret, psk_generation) {
        shards.set_cluster_secret(&sf.secret, g);
        tracing::info!(file = %sf.path.display(), generation = g, "cluster PSK on");
    }
    let (psk_tx, mut psk_rx) = mpsc::channel(16);
    if cfg.cluster_secret.is_some() {
        tokio::spawn(watch_psk_generation(registry.clone(), psk_tx));
    }
    // A rotation cut short by a restart resumes with the key it had announced.
    let mut own = own;
    let mut rotation = crate::rotation::Rotation::default();
    if let Some(ms) = std::env::var("WEFT_TEST_ROTATION_DWELL_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        rotation.dwell = Duration::from_millis(ms.min(60_000));
        tracing::warn!(
            ms,
            "test knob: every key rotation phase lasts at least this long"
        );
    }
    match keyfile::load_next(&cfg.state_dir)? {
        Some(next) if next.public_key() != own.public_key => {
            let next_pub = next.public_key();
            shards
                .set_next_key(&next)
                .context("resuming the key rotation")?;
            own.next_public_key = Some(next_pub);
            rotation.announce(next_pub, "resumed after a restart", Instant::now());
            tracing::info!(next = %next_pub.fingerprint(), "resuming the key rotation");
        }
        Some(_) => keyfile::remove_next(&cfg.state_dir),
        None => {}
    }
    // The workers start now; until the first reconcile their shards have no peers, so they
    // only count what they read and drop it.
    let (stop, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut workers = Workers {
        status: Vec::new(),
        stop,
        threads: Vec::new(),
    };
    for (i, (tun, udp)) in queues.into_iter().zip(sockets).enumerate() {
        let status = Arc::new(std::sync::Mutex::new(WorkerStatus::default()));
        workers.status.push(status.clone());
        let w = Worker {
            index: i as u16,
            tun,
            udp,
            shards: shards.clone(),
            offload: cfg.offload,
            mtu: mtu as usize,
            status,
            stop: stop_rx.clone(),
        };
        match crate::worker::spawn(w, done_tx.clone()) {
            Ok(t) => workers.threads.push(t),
            Err(e) => {
                let _ = workers.stop.send(true);
                return Err(e).context("starting a data-path worker");
            }
        }
    }
    drop(done_tx);
    let repeats = crate::logging::Repeats::new(cfg.log_repeat_interval);
    let mut d = Daemon {
        policy,
        cfg,
        shards,
        own,
        mtu,
        ifname: ifname.clone(),
        control_udp,
        udp_v6,
        control_outs: Vec::new(),
        nl,
        registry,
        records: BTreeMap::new(),
        refused: BTreeMap::new(),
        externals: cached_external
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect(),
        refused_external: BTreeMap::new(),
        nodes_known: false,
        routes: HashSet::new(),
        connectivity: "connecting".into(),
        publisher: None,
        own_record: Arc::new(std::sync::Mutex::new("publishing".into())),
        renewal: None,
        claim_state: None,
        cache: PeerCache::default(),
        rotation,
        revocations: known_revocations,
        revocations_cached: String::new(),
        self_revoked: None,
        health: Health::default(),
        workers,
        ready,
        repeats,
        _uapi_file: uapi_file,
        metrics: Arc::default(),
        registry_last_sync: 0.0,
    };
    d.check_self_revoked();
    if !cached.is_empty() {
        // Come up with the last known peers (the registry may be unreachable right now); the
        // watch's first Reset replaces them.
        tracing::info!(
            records = cached.len(),
            external = d.externals.len(),
            "starting from the cached peer set"
        );
        d.records = cached.into_iter().map(|r| (r.name.clone(), r)).collect();
        d.nodes_known = true;
        d.reconcile().await;
    }
    if let Some((alloc, block, confirmed)) = claim {
        let state = Arc::new(std::sync::Mutex::new(String::new()));
        d.renewal = Some(crate::podcidr::spawn_renewal(
            &d.cfg,
            &alloc,
            d.registry.clone(),
            block,
            confirmed,
            state.clone(),
        ));
        d.claim_state = Some(state);
    }
    if let Some(l) = metrics_listener {
        let registry = crate::metrics::registry(crate::metrics::Metrics {
            shards: d.shards.clone(),
            workers: d.workers.status.clone(),
            control: d.metrics.clone(),
            state_dir: d.cfg.state_dir.clone(),
            policy: d.policy.as_ref().map(|p| p.snapshot.clone()),
        });
        crate::probes::serve_http(l, crate::metrics::handler(Arc::new(registry)));
        tracing::info!(listen = ?d.cfg.metrics_listen, "Prometheus metrics at /metrics");
    }
    d.spawn_publish();
    if let Some(k) = kube {
        crate::kube::spawn_node_watch(
            k,
            d.own.name.clone(),
            d.cfg.listen_port,
            if d.cfg.endpoints.is_empty() {
                d.own.endpoints.clone()
            } else {
                Vec::new()
            },
            d.own.pod_cidrs.clone(),
        );
    }
    tracing::info!(
        interface = %ifname, mtu, port = d.cfg.listen_port,
        endpoints = ?d.own.endpoints, pod_cidrs = ?d.own.pod_cidrs, "meshd running"
    );

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let exit = loop {
        tokio::select! {
            Some((index, why)) = done_rx.recv() => break Exit::WorkerEnded(index, why),
            _ = tick.tick() => {
                d.ready.tick();
                d.shards.handle_timeout(Instant::now());
                d.flush();
                d.save_peer_cache(false);
                d.drive_rotation().await;
                d.report_health();
                d.update_metrics();
            },
            Some(generation) = psk_rx.recv() => d.set_psk_generation(generation),
            Some(generation) = rot_rx.recv() => {
                if generation > d.rotation.requested {
                    tracing::info!(generation, "key rotation requested");
                }
                d.rotation.requested = d.rotation.requested.max(generation);
                d.drive_rotation().await;
            },
            ev = ev_rx.recv() => match ev {
                Some(ev) => {
                    // Take in every event already queued, then reconcile once: a burst of N
                    // records costs one pass over the peers instead of N.
                    let mut publish = d.handle_event(ev);
                    let mut taken = 1;
                    while taken < EVENT_BATCH {
                        match ev_rx.try_recv() {
                            Ok(ev) => publish |= d.handle_event(ev),
                            Err(_) => break,
                        }
                        taken += 1;
                    }
                    if taken > 1 {
                        tracing::debug!(events = taken, "registry events batched");
                    }
                    if publish {
                        d.spawn_publish();
                    }
                    d.reconcile().await;
                    d.cache.dirty = true;
                    d.save_peer_cache(false);
                }
                None => {
                    tracing::error!("registry watch ended; restarting it");
                    let (tx, rx) = mpsc::channel(256);
                    ev_rx = rx;
                    tokio::spawn(watch_collection::<NodeRecord>(d.registry.clone(), tx));
                }
            },
            ev = ext_rx.recv() => match ev {
                Some(ev) => {
                    // Batched like the node records: one reconcile for a burst.
                    d.handle_external_event(ev);
                    let mut taken = 1;
                    while taken < EVENT_BATCH {
                        match ext_rx.try_recv() {
                            Ok(ev) => d.handle_external_event(ev),
                            Err(_) => break,
                        }
                        taken += 1;
                    }
                    d.reconcile().await;
                    d.cache.dirty = true;
                    d.save_peer_cache(false);
                }
                None => {
                    tracing::error!("external peer watch ended; restarting it");
                    let (tx, rx) = mpsc::channel(256);
                    ext_rx = rx;
                    tokio::spawn(watch_collection::<ExternalPeer>(d.registry.clone(), tx));
                }
            },
            ev = rev_rx.recv() => match ev {
                Some(ev) => {
                    if revocations::apply(&mut d.revocations, ev) {
                        d.check_self_revoked();
                        d.reconcile().await;
                    }
                    revocations::save_cache(&d.cfg.state_dir, &d.revocations, &mut d.revocations_cached);
                }
                None => {
                    tracing::error!("revocation watch ended; restarting it");
                    let (tx, rx) = mpsc::channel(64);
                    rev_rx = rx;
                    tokio::spawn(revocations::watch::<Revocation>(d.registry.clone(), tx));
                }
            },
            Some(req) = api_rx.recv() => match req {
                ApiRequest::Status(reply) => {
                    let _ = reply.send(d.status_json());
                }
                ApiRequest::Leave(reply) => break Exit::Leave(reply),
            },
            _ = sigterm.recv() => break Exit::Stop,
            _ = sigint.recv() => break Exit::Stop,
        }
    };
    let failed = match &exit {
        Exit::WorkerEnded(index, why) => Some(format!("data-path worker {index} ended: {why}")),
        _ => None,
    };
    if let Some(f) = &failed {
        tracing::error!("{f}; stopping");
    }
    d.shutdown(exit).await;
    match failed {
        Some(f) => Err(anyhow::anyhow!(f)),
        None => Ok(()),
    }
}

/// `STATE_DIR/node.json`: what the CNI plugin needs to know about this node (pod CIDRs, cluster
/// CIDRs, mesh addresses, MTU), replaced atomically. It stays while meshd restarts.
pub const NODE_FILE: &str = "node.json";

fn write_node_file(cfg: &Config, mtu: u32) -> Result<()> {
    let info = serde_json::json!({
        "name": cfg.node_name,
        "podCidrs": cfg.pod_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "clusterCidrs": cfg.cluster_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "meshAddresses": cfg.pod_cidrs.iter().filter_map(mesh_address).map(|a| a.to_string()).collect::<Vec<_>>(),
        "mtu": mtu,
        "networkPolicy": cfg.network_policy,
    });
    let path = cfg.state_dir.join(NODE_FILE);
    let tmp = cfg
        .state_dir
        .join(format!(".{NODE_FILE}.tmp{}", std::process::id()));
    std::fs::write(&tmp, format!("{info:#}\n"))
        .and_then(|_| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))
}

fn bind_api(path: &std::path::Path) -> Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    bind_unix_socket(path)
}

/// Binds a unix socket at `path`, made 0600 under umask 077. An existing socket file is
/// replaced only when nothing answers on it; if something does, this fails.
pub(crate) fn bind_unix_socket(path: &std::path::Path) -> Result<UnixListener> {
    if path.exists() || path.symlink_metadata().is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another process is answering on {}; refusing to replace it (is a second meshd \
                 running for this interface?)",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    // SAFETY: umask only swaps the process's file mode mask; restored right after the bind.
    let old = unsafe { libc::umask(0o077) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = bound.with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

async fn serve_api(
    listener: UnixListener,
    tx: mpsc::Sender<ApiRequest>,
    policy: Option<crate::netpol::Policy>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let tx = tx.clone();
        let policy = policy.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let read = tokio::time::timeout(
                Duration::from_secs(5),
                BufReader::new(r).read_line(&mut line),
            )
            .await;
            if !matches!(read, Ok(Ok(_))) {
                return;
            }
            if let Some(reply) = crate::netpol::api_request(policy.as_ref(), line.trim()).await {
                let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
                return;
            }
            let (otx, orx) = oneshot::channel();
            let req = match line.trim() {
                "status" => ApiRequest::Status(otx),
                "leave" => ApiRequest::Leave(otx),
                other => {
                    let msg = serde_json::json!({"error": format!("unknown request {other:?}; use status, leave, pod-add or pod-del")});
                    let _ = w.write_all(format!("{msg}\n").as_bytes()).await;
                    return;
                }
            };
            if tx.send(req).await.is_err() {
                return;
            }
            if let Ok(reply) = orx.await {
                let _ = w.write_all(reply.as_bytes()).await;
                let _ = w.write_all(b"\n").await;
            }
        });
    }
}

/// Forwards the key generations `keyctl rotate` asks of this node (`rotations/NAME`) to the loop.
async fn watch_rotation_requests(registry: Arc<dyn Registry>, name: String, tx: mpsc::Sender<u64>) {
    use weft_core::control::RotationRequest;
    let typed = weft_registry::Typed::<RotationRequest>::new(registry);
    let mut backoff = Duration::from_millis(200);
    loop {
        match typed.watch(None).await {
            Ok(mut w) => {
                backoff = Duration::from_millis(200);
                while let Some(ev) = w.next().await {
                    let gens: Vec<u64> = match ev {
                        Event::Reset { items, .. } => items
                            .into_iter()
                            .filter(|r| r.node == name)
                            .map(|r| r.generation)
                            .collect(),
                        Event::Upsert { item, .. } if item.node == name => vec![item.generation],
                        _ => Vec::new(),
                    };
                    for g in gens {
                        if tx.send(g).await.is_err() {
                            return;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot watch rotation requests"),
        }
        tokio::time::sleep(jittered(backoff)).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Refusals by name, with their reasons as text (a revocation's reason after any other).
fn reasons<A: std::fmt::Display, B: std::fmt::Display>(
    refused: Vec<(String, A)>,
    revoked: Vec<(String, B)>,
) -> BTreeMap<String, String> {
    refused
        .into_iter()
        .map(|(n, e)| (n, e.to_string()))
        .chain(revoked.into_iter().map(|(n, e)| (n, e.to_string())))
        .collect()
}

/// Logs each refusal whose reason is new since `before` (event `event`, one line per name per
/// `--log-repeat-interval` at most, with the count of those held back); a name no longer refused
/// is forgotten, so its next refusal logs at once.
fn log_new_refusals(
    repeats: &mut crate::logging::Repeats,
    before: &BTreeMap<String, String>,
    now: &BTreeMap<String, String>,
    event: &'static str,
    what: &str,
) {
    let at = Instant::now();
    for (name, why) in now {
        if before.get(name) != Some(why) {
            if let Some(repeated) = repeats.hit(event, name, at) {
                tracing::warn!(peer = %name, event, reason = %why, repeated, "{what}");
            }
        }
    }
    for name in repeats.keys(event) {
        if !now.contains_key(&name) {
            repeats.clear(event, &name);
        }
    }
}

/// Forwards the cluster PSK generation (`psk/cluster`, bumped by `keyctl psk rotate`) to the
/// loop.
async fn watch_psk_generation(registry: Arc<dyn Registry>, tx: mpsc::Sender<u64>) {
    let typed = weft_registry::Typed::<PskGeneration>::new(registry);
    let mut backoff = Duration::from_millis(200);
    loop {
        match typed.watch(None).await {
            Ok(mut w) => {
                backoff = Duration::from_millis(200);
                while let Some(ev) = w.next().await {
                    let generation = match ev {
                        Event::Reset { items, .. } => items.iter().map(|p| p.generation).max(),
                        Event::Upsert { item, .. } => Some(item.generation),
                        _ => None,
                    };
                    if let Some(g) = generation {
                        if tx.send(g).await.is_err() {
                            return;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot watch the PSK generation"),
        }
        tokio::time::sleep(jittered(backoff)).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Forwards the registry events of one collection (node records, external peers) to the loop.
/// Retries with backoff when the watch cannot start.
async fn watch_collection<T: Object>(registry: Arc<dyn Registry>, tx: mpsc::Sender<Event<T>>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match weft_registry::Typed::<T>::new(registry.clone())
            .watch(None)
            .await
        {
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

impl Daemon {
    /// Every [`HEALTH_CHECK`]: builds the link health report and writes it (in the background,
    /// bound to this node's lease) when a link changed state or [`HEALTH_INTERVAL`] passed.
    fn report_health(&mut self) {
        let now = Instant::now();
        if self
            .health
            .checked
            .is_some_and(|t| now.duration_since(t) < HEALTH_CHECK)
        {
            return;
        }
        self.health.checked = Some(now);
        let peers = self.shards.peer_status();
        let unanswered = self.health.links.observe(now, &peers);
        let report = weft_core::health::HealthReport::from_status_watched(
            &self.own.name,
            &peers,
            &unanswered,
            unix_now(),
            HEALTH_INTERVAL.as_secs(),
        );
        self.log_unanswered(&report, &peers, now);
        // Registries whose readers tell presence otherwise (kube: the Node's Ready condition)
        // get no periodic rewrites, and a changed report at most every HEALTH_MIN_GAP.
        let heartbeats = self.registry.heartbeats();
        if !heartbeats
            && self
                .health
                .written
                .is_some_and(|t| now.duration_since(t) < HEALTH_MIN_GAP)
        {
            return;
        }
        let due = heartbeats
            && self
                .health
                .written
                .is_none_or(|t| now.duration_since(t) >= HEALTH_INTERVAL);
        let changed = self
            .health
            .published
            .as_ref()
            .is_none_or(|p| p.differs(&report));
        if !due && !changed {
            return;
        }
        if let Some(h) = self.health.task.take() {
            h.abort();
        }
        self.health.written = Some(now);
        self.health.published = Some(report.clone());
        let registry = self.registry.clone();
        self.health.task = Some(tokio::spawn(async move {
            if let Err(e) = weft_registry::put_owned_object(&*registry, &report).await {
                tracing::debug!(error = %e, "could not write the link health report");
            }
        }));
    }

    /// Writes what `/metrics` reads of the control loop's state.
    fn update_metrics(&mut self) {
        if self.cfg.metrics_listen.is_none() {
            return;
        }
        let phase = self.rotation.phase_name().to_string();
        let state = crate::metrics::ControlState {
            registry_connected: self.connectivity.starts_with("connected"),
            registry_last_sync: self.registry_last_sync,
            key_generation: self.own.key_generation,
            rotation_phase: phase,
            claim: self
                .claim_state
                .as_ref()
                .and_then(|s| s.lock().ok().map(|g| g.clone())),
            refused_records: self.refused.len(),
            refused_external_peers: self.refused_external.len(),
        };
        if let Ok(mut m) = self.metrics.lock() {
            *m = state;
        }
    }

    /// Warns about links that send without an answer (unanswered, or never handshaked with
    /// packets waiting), once per `--log-repeat-interval` per peer with the count held back; a
    /// link that is up again gets one line saying so. Idle links are left alone.
    fn log_unanswered(
        &mut self,
        report: &weft_core::health::HealthReport,
        peers: &[weft_core::node::PeerStatus],
        now: Instant,
    ) {
        use weft_core::health::LinkState;
        const EVENT: &str = "peer_unanswered";
        for l in &report.links {
            let silent = l.state == LinkState::Unanswered
                || (l.state == LinkState::NoHandshake && l.queued > 0);
            if silent {
                if let Some(repeated) = self.repeats.hit(EVENT, &l.peer, now) {
                    let endpoint = peers
                        .iter()
                        .find(|p| p.name == l.peer)
                        .and_then(|p| p.endpoint.clone())
                        .unwrap_or_else(|| "-".into());
                    tracing::warn!(
                        peer = %l.peer,
                        event = EVENT,
                        state = ?l.state,
                        endpoint,
                        queued = l.queued,
                        repeated,
                        "peer does not answer"
                    );
                }
            } else if l.state == LinkState::Up {
                if let Some(held) = self.repeats.clear(EVENT, &l.peer) {
                    tracing::info!(peer = %l.peer, event = "peer_answers", held, "peer answers again");
                }
            }
        }
        for peer in self.repeats.keys(EVENT) {
            if !report.links.iter().any(|l| l.peer == peer) {
                self.repeats.clear(EVENT, &peer);
            }
        }
    }

    /// Moves to a newer cluster PSK generation and publishes it; peers start the handshakes on
    /// it when they see the record. An older generation (a deleted or rewritten object) is
    /// ignored: generations only go up.
    fn set_psk_generation(&mut self, generation: u64) {
        let Some(current) = self.shards.psk_generation() else {
            return;
        };
        if generation <= current {
            return;
        }
        self.shards.set_psk_generation(generation);
        self.own.psk_generation = Some(generation);
        self.spawn_publish();
    }

    /// Starts a key rotation (if none is under way): a new key, stored 0600 in the state dir,
    /// added to the device and announced in the record as the next key.
    fn start_rotation(&mut self, reason: &str) {
        if !self.rotation.is_idle() {
            return;
        }
        let key = match keyfile::create_next(&self.cfg.state_dir) {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot store a next key; not rotating");
                return;
            }
        };
        let public = key.public_key();
        if let Err(e) = self.shards.set_next_key(&key) {
            tracing::error!(error = %e, "cannot use the next key; not rotating");
            keyfile::remove_next(&self.cfg.state_dir);
            return;
        }
        self.own.next_public_key = Some(public);
        self.rotation.announce(public, reason, Instant::now());
        tracing::info!(next = %public.fingerprint(), reason, "key rotation started");
        self.spawn_publish();
    }

    /// Moves the rotation along (called on every tick and rotation request).
    async fn drive_rotation(&mut self) {
        use crate::rotation::Step;
        // A node readmitted after a revocation is admitted only with keys the operator
        // approved: keyctl rotate approves its next key when it sees the announcement.
        let revocation = self.revocations.get(&self.own.name).cloned();
        if self.rotation.is_idle() {
            if self.rotation.requested > self.own.key_generation {
                self.start_rotation("requested by keyctl rotate");
            } else if let Some(max) = self.cfg.key_max_age {
                let age = unix_now().saturating_sub(self.own.key_created_at);
                if self.own.key_created_at > 0 && age >= max.as_secs() {
                    if revocation.is_some() {
                        if !self.rotation.held {
                            tracing::warn!(
                                "key older than --key-max-age, but this node was readmitted after a \
                                 revocation: it rotates only through `keyctl rotate`, which \
                                 approves its next key"
                            );
                            self.rotation.held = true;
                        }
                    } else {
                        self.start_rotation("key older than --key-max-age");
                    }
                }
            }
            return;
        }
        if let (Some(rev), Some(next)) = (&revocation, self.rotation.next) {
            if !rev.admits(&next) {
                // Peers would refuse the next key: wait in the announced phase (the old key
                // keeps working) until keyctl approves it.
                if !self.rotation.held {
                    tracing::warn!(
                        next = %next.fingerprint(),
                        "waiting for the operator to approve the next key (keyctl rotate does \
                         when it sees the announcement): this node was readmitted after a revocation"
                    );
                    self.rotation.held = true;
                }
                return;
            }
        }
        let announced = self.records.get(&self.own.name).is_some_and(|r| {
            r.next_public_key.is_some() && r.next_public_key == self.rotation.next
        });
        let progress = self.shards.rotation_progress();
        match self.rotation.poll(Instant::now(), announced, &progress) {
            Step::Nothing => {}
            Step::Initiate => {
                tracing::info!("handshaking with every peer on the next key");
                self.shards.initiate_next();
                self.flush();
            }
            Step::Retire { not_moved } => {
                if !not_moved.is_empty() && !announced {
                    // Peers cannot have learnt the next key (the registry does not show it):
                    // keep both keys until it does.
                    return;
                }
                if !not_moved.is_empty() {
                    tracing::warn!(
                        ?not_moved,
                        "retiring the old key although these peers have not moved to the new one"
                    );
                }
                self.retire_old_key();
            }
        }
    }

    /// The last step of a rotation: the next key becomes this node's key, on disk first.
    fn retire_old_key(&mut self) {
        let Some(next) = self.shards.next_key() else {
            return;
        };
        if let Err(e) = keyfile::promote_next(&self.cfg.state_dir) {
            tracing::error!(error = %format!("{e:#}"), "cannot store the new key; keeping the old one");
            return;
        }
        self.shards.promote_next_key();
        self.flush();
        let secs = self
            .rotation
            .started
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or_default();
        self.own.public_key = next;
        self.own.next_public_key = None;
        self.own.key_generation += 1;
        self.own.key_created_at = unix_now();
        self.rotation.finished();
        tracing::info!(
            key = %next.fingerprint(), generation = self.own.key_generation, secs,
            "key rotation finished"
        );
        self.spawn_publish();
    }

    /// Writes this node's record in the background (bound to this process's lease where the
    /// registry has leases), retrying with jittered backoff capped at 2 s until it is accepted.
    /// Never blocks the event loop, so an unreachable registry cannot stall the data path.
    fn spawn_publish(&mut self) {
        if let Some(h) = self.publisher.take() {
            h.abort();
        }
        let registry = self.registry.clone();
        let own = self.own.clone();
        if let Ok(mut g) = self.own_record.lock() {
            *g = "publishing".into();
        }
        let state = self.own_record.clone();
        let set = move |s: String| {
            if let Ok(mut g) = state.lock() {
                *g = s;
            }
        };
        self.publisher = Some(tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            let mut last_error = String::new();
            loop {
                match weft_registry::put_own_node(&*registry, &own).await {
                    Ok(_) => {
                        tracing::debug!("published this node's record");
                        set("published".into());
                        return;
                    }
                    Err(e) => {
                        let e = e.to_string();
                        // Once per distinct error: a refusal (permission denied) repeats forever.
                        if e != last_error {
                            tracing::warn!(error = %e, "could not publish this node's record; will retry");
                        }
                        set(format!("not published: {e}"));
                        last_error = e;
                    }
                }
                tokio::time::sleep(jittered(backoff)).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }));
    }

    /// Writes the known records to the peer cache (atomically) if they changed since the last
    /// write and that write is at least [`PEER_CACHE_INTERVAL`] old, or at once with `now`.
    fn save_peer_cache(&mut self, now: bool) {
        if !self.cache.dirty
            || (!now
                && self
                    .cache
                    .last
                    .is_some_and(|t| t.elapsed() < PEER_CACHE_INTERVAL))
        {
            return;
        }
        self.cache.last = Some(Instant::now());
        let items: Vec<serde_json::Value> = self
            .records
            .values()
            .filter_map(|r| serde_json::from_slice(&r.to_json()).ok())
            .collect();
        let text = serde_json::Value::Array(items).to_string();
        let external: Vec<serde_json::Value> = self
            .externals
            .values()
            .filter_map(|p| serde_json::from_slice(&p.to_json()).ok())
            .collect();
        let external = serde_json::Value::Array(external).to_string();
        let mut ok = true;
        if text != self.cache.written {
            ok &= self.write_cache(PEER_CACHE_FILE, &text);
            if ok {
                self.cache.written = text;
            }
        }
        if external != self.cache.written_external {
            let written = self.write_cache(EXTERNAL_CACHE_FILE, &external);
            if written {
                self.cache.written_external = external;
            }
            ok &= written;
        }
        // Stays dirty after a failure: tried again after the interval.
        self.cache.dirty = !ok;
    }

    /// Replaces `STATE_DIR/file` atomically; false (logged) if it could not.
    fn write_cache(&self, file: &str, text: &str) -> bool {
        let path = self.cfg.state_dir.join(file);
        let tmp = self
            .cfg
            .state_dir
            .join(format!(".{file}.tmp{}", std::process::id()));
        match std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &path)) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot write the peer cache");
                false
            }
        }
    }

    /// Applies a registry event to the known records. Returns true if our own record should be
    /// written again (the registry came back after being unreachable).
    fn handle_event(&mut self, ev: Event<NodeRecord>) -> bool {
        if !matches!(ev, Event::Status(Connectivity::Unreachable(_))) {
            self.registry_last_sync = crate::metrics::unix_now();
        }
        match ev {
            Event::Reset { items, .. } => {
                self.records = items.into_iter().map(|r| (r.name.clone(), r)).collect();
                self.nodes_known = true;
                self.ready
                    .registry_synced
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                let was_down = !self.connectivity.starts_with("connected");
                self.connectivity = "connected".into();
                // After an outage, write our record again in case the registry lost it; a
                // record deleted while the registry was readable stays deleted (`leave`).
                was_down && !self.records.contains_key(&self.own.name)
            }
            Event::Upsert { item, .. } => {
                self.records.insert(item.name.clone(), item);
                false
            }
            Event::Delete { name, .. } => {
                self.records.remove(&name);
                false
            }
            Event::Status(Connectivity::Connected) => {
                let was_down = self.connectivity.starts_with("unreachable");
                self.connectivity = "connected".into();
                was_down
            }
            Event::Status(Connectivity::Unreachable(why)) => {
                // Keep every peer: an unreadable registry is not a deleted record.
                self.connectivity = format!("unreachable: {why}");
                false
            }
        }
    }

    /// Applies an event of the external peer watch. Its connectivity is the registry's, which
    /// the node record watch already reports; an unreachable registry removes nothing.
    fn handle_external_event(&mut self, ev: Event<ExternalPeer>) {
        match ev {
            Event::Reset { items, .. } => {
                self.externals = items.into_iter().map(|p| (p.name.clone(), p)).collect();
            }
            Event::Upsert { item, .. } => {
                self.externals.insert(item.name.clone(), item);
            }
            Event::Delete { name, .. } => {
                self.externals.remove(&name);
            }
            Event::Status(c) => tracing::debug!(?c, "external peer watch"),
        }
    }

    /// Logs loudly (once per change) when a revocation refuses this node's own key: every other
    /// node drops it, so it is cut off from the mesh until an operator readmits it.
    fn check_self_revoked(&mut self) {
        let why = self
            .revocations
            .get(&self.own.name)
            .and_then(|r| r.verdict(&self.own.public_key).err())
            .map(|e| e.to_string());
        if why != self.self_revoked {
            match &why {
                Some(w) => tracing::error!(
                    node = %self.own.name, key = %self.own.public_key, reason = %w,
                    "THIS NODE IS REVOKED: every other node refuses it; an operator must run \
                     `keyctl readmit` with a new key"
                ),
                None if self.self_revoked.is_some() => {
                    tracing::warn!(node = %self.own.name, "this node is no longer revoked")
                }
                None => {}
            }
            self.self_revoked = why;
        }
    }

    async fn reconcile(&mut self) {
        let own = self.own.name.clone();
        let (admitted, revoked) = filter_revoked(
            self.records.values().filter(|r| r.name != own).cloned(),
            &self.revocations,
        );
        // Until the node records are known an external peer cannot be checked against them.
        let externals = self
            .externals
            .values()
            .filter(|_| self.nodes_known)
            .cloned();
        let (externals, ext_revoked) = filter_revoked_external(externals, &self.revocations);
        // Node records take precedence: externals are checked against the accepted nodes.
        let set = desired_peer_set(&self.own, admitted, externals);
        let desired = set.peers;
        let refused = reasons(set.refused_nodes, revoked);
        log_new_refusals(
            &mut self.repeats,
            &self.refused,
            &refused,
            "record_refused",
            "refusing node record",
        );
        self.refused = refused;
        let refused_external = reasons(set.refused_external, ext_revoked);
        log_new_refusals(
            &mut self.repeats,
            &self.refused_external,
            &refused_external,
            "external_peer_refused",
            "refusing external peer record",
        );
        self.refused_external = refused_external;
        let current = self.shards.peer_configs();
        let cmds = plan(&desired, current.iter());
        for cmd in cmds {
            tracing::debug!(?cmd, "reconcile");
            if let Err(e) = self.shards.apply(cmd) {
                tracing::warn!(error = %e, "peer change refused");
            }
        }
        self.flush();
        self.sync_routes().await;
        if self.nodes_known {
            self.ready
                .routes
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn src_for(&self, dst: &IpNet) -> Option<IpAddr> {
        self.own
            .pod_cidrs
            .iter()
            .filter_map(mesh_address)
            .find(|a| a.is_ipv4() == matches!(dst, IpNet::V4(_)))
    }

    async fn sync_routes(&mut self) {
        let ifname = self.ifname.clone();
        let configs = self.shards.peer_configs();
        // Each wanted route with the peer it belongs to.
        let mut want: HashMap<Route, &str> = HashMap::new();
        for p in &configs {
            for net in &p.allowed_ips {
                let route = Route {
                    dst: *net,
                    kind: RouteKind::Dev {
                        ifname: ifname.clone(),
                        src: self.src_for(net),
                    },
                    metric: DEV_ROUTE_METRIC,
                };
                want.insert(route, p.name.as_str());
            }
        }
        let stale: Vec<Route> = self
            .routes
            .iter()
            .filter(|r| !want.contains_key(*r))
            .cloned()
            .collect();
        let new: Vec<(Route, String)> = want
            .iter()
            .filter(|(r, _)| !self.routes.contains(*r))
            .map(|(r, name)| (r.clone(), name.to_string()))
            .collect();
        for r in stale {
            match self.nl.delete_route(&r).await {
                Ok(()) => {
                    self.routes.remove(&r);
                }
                Err(e) => tracing::warn!(error = %e, dst = %r.dst, "removing route"),
            }
        }
        // Peers that got a route now: once all of theirs are in place they are in the data path.
        let mut routed: BTreeMap<String, usize> = BTreeMap::new();
        let mut failed: HashSet<String> = HashSet::new();
        for (r, name) in new {
            match self.nl.replace_route(&r).await {
                Ok(()) => {
                    self.routes.insert(r);
                    *routed.entry(name).or_default() += 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, dst = %r.dst, peer = %name, "adding route");
                    failed.insert(name);
                }
            }
        }
        for (name, routes) in routed {
            if !failed.contains(&name) {
                tracing::info!(peer = %name, routes, "peer routed");
            }
        }
    }

    /// Sends what the control loop's calls asked for (handshakes, keepalives, packets that
    /// waited for a session) through worker 0's socket. A full socket buffer drops the datagram;
    /// the timers send handshakes and keepalives again.
    fn flush(&mut self) {
        self.shards.drain_outputs(&mut self.control_outs);
        for o in self.control_outs.drain(..) {
            match o {
                Output::Transmit { dst, payload } => {
                    let to = weft_sys::to_socket_family(dst, self.udp_v6);
                    if let Err(e) = self.control_udp.send_to(&payload, to) {
                        tracing::debug!(error = %e, dst = %to, "UDP send");
                    }
                }
                // Only datagrams read by a worker decrypt into packets, and the worker takes
                // those under the shard's lock.
                Output::Deliver(_) => {
                    tracing::debug!("control loop got a decrypted packet; dropped")
                }
            }
        }
    }

    fn status_json(&self) -> String {
        let (workers, offload) = crate::worker::merged(&self.workers.status);
        let st = Status {
            node: NodeInfo {
                name: self.own.name.clone(),
                public_key: self.own.public_key.to_base64(),
                key_generation: self.own.key_generation,
                psk_generation: self.shards.psk_generation(),
                listen_port: self.cfg.listen_port,
                interface: self.ifname.clone(),
                mtu: self.mtu,
                endpoints: self.own.endpoints.iter().map(|e| e.to_string()).collect(),
                private_endpoints: self
                    .own
                    .private_endpoints
                    .iter()
                    .map(|e| e.to_string())
                    .collect(),
                location: self.own.location.clone(),
                behind_nat: self.own.endpoints.is_empty(),
                mesh_addresses: self
                    .own
                    .mesh_addresses()
                    .iter()
                    .map(|a| a.to_string())
                    .collect(),
                pod_cidrs: self.own.pod_cidrs.iter().map(|c| c.to_string()).collect(),
                cluster_cidrs: self
                    .cfg
                    .cluster_cidrs
                    .iter()
                    .map(|c| c.to_string())
                    .collect(),
            },
            registry: self.connectivity.clone(),
            own_record: self
                .own_record
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default(),
            rotation: self.rotation.status(&self.shards.rotation_progress()),
            pod_cidr_claim: self
                .claim_state
                .as_ref()
                .and_then(|s| s.lock().ok().map(|g| g.clone())),
            peers: self.shards.peer_status(),
            refused_records: self.refused.clone(),
            refused_external_peers: self.refused_external.clone(),
            drops: self.shards.drops().by_name(),
            paths: self.shards.paths(self.cfg.use_relays, self.cfg.relay),
            offload,
            workers,
            policy: self.policy.as_ref().map(|p| p.status()),
        };
        serde_json::to_string(&st).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    async fn shutdown(mut self, exit: Exit) {
        let routes: Vec<Route> = self.routes.drain().collect();
        for r in &routes {
            if let Err(e) = self.nl.delete_route(r).await {
                tracing::debug!(error = %e, dst = %r.dst, "removing route");
            }
        }
        let _ = std::fs::remove_file(&self.cfg.api_socket);
        match exit {
            Exit::Stop | Exit::WorkerEnded(..) => {
                self.save_peer_cache(true);
                // The record stays so a restart is seamless; the unreachable routes stay so
                // nothing leaks while meshd is away.
                tracing::info!("stopping: record and fail-closed routes kept");
            }
            Exit::Leave(reply) => {
                if let Some(h) = self.publisher.take() {
                    h.abort();
                }
                let _ = std::fs::remove_file(self.cfg.state_dir.join(PEER_CACHE_FILE));
                if let Some(h) = self.health.task.take() {
                    h.abort();
                }
                let _ = self
                    .registry
                    .delete(weft_registry::Kind::Health, &self.own.name)
                    .await;
                let _ = std::fs::remove_file(self.cfg.state_dir.join(EXTERNAL_CACHE_FILE));
                let deleted = self
                    .registry
                    .delete(weft_registry::Kind::Nodes, &self.own.name)
                    .await;
                if let Some(h) = self.renewal.take() {
                    // Leaving for good: the block is free for the next node at once.
                    h.abort();
                    if let Err(e) = self
                        .registry
                        .delete(weft_registry::Kind::Claims, &self.own.name)
                        .await
                    {
                        tracing::warn!(error = %e, "could not release the pod CIDR claim");
                    }
                    crate::podcidr::forget(&self.cfg.state_dir);
                }
                let _ = std::fs::remove_file(self.cfg.state_dir.join(NODE_FILE));
                for c in &self.cfg.cluster_cidrs {
                    if let Err(e) = self.nl.delete_route(&Route::unreachable(*c)).await {
                        tracing::warn!(error = %e, cidr = %c, "removing unreachable route");
                    }
                }
                let msg = match deleted {
                    Ok(_) => serde_json::json!({"left": true, "node": self.own.name}),
                    Err(e) => serde_json::json!({"left": false, "error": e.to_string()}),
                };
                tracing::info!(%msg, "left the mesh");
                let _ = reply.send(msg.to_string());
                // Give the API task a moment to write the reply.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // The workers own the TUN queues: once the last one is closed the interface (and with
        // it any route through it) is gone.
        let _ = self.workers.stop.send(true);
        for t in self.workers.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a data-path worker panicked");
            }
        }
    }
}
