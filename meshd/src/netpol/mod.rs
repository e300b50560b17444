//! NetworkPolicy enforcement on this node (`--registry kube`, unless `--network-policy off`).
//!
//! In: the Pods, Namespaces and NetworkPolicies the API server has ([`watch`]), and the pods
//! weft-cni attaches here (`pod-add` / `pod-del` on the API socket, with the addresses the
//! plugin gave them, before the API server knows them). Out: nftables table `inet weft-policy`
//! (weft-core compiles it, weft-sys writes it in one atomic netlink batch per change), the
//! conntrack entries of flows a change now denies removed (unless `--keep-established-flows`),
//! the answer to `pod-add` once that pod's policies are in force, and what status, metrics and
//! logs show: policies per local pod, drops per pod and policy.
//!
//! Fail closed: the table stays in the kernel when meshd stops; an address of this node's pod
//! ranges that is no pod placed under its policies (attached while meshd was down, or not yet
//! seen in the API server) is in the guard set, so nothing forwarded reaches it or leaves it.
//! Until all three watches have listed once, the table in force is kept as it is (a first start
//! installs the guard alone).

mod kernel;
pub mod watch;

use anyhow::{Context, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use watch::{Change, Ev};
use weft_core::netpol::compile::{compile, LocalPod, PodPolicies, State};
use weft_core::netpol::program::{Counter, Decision, Packet, Program, Proto};

/// How long `pod-add` waits for the pod to be seen in the API server before answering that it
/// is isolated (guarded) for now.
const ADD_WAIT: Duration = Duration::from_secs(8);
/// Drop counters are read (status, metrics, logs) this often.
const COUNTER_EVERY: Duration = Duration::from_secs(1);
/// Where the pods weft-cni attached are remembered across restarts.
const LOCAL_FILE: &str = "policy-pods.json";

pub struct Options {
    pub node: String,
    pub pod_ranges: Vec<IpNet>,
    pub state_dir: PathBuf,
    pub keep_established: bool,
    pub log_interval: Duration,
}

/// A pod weft-cni attached (`pod-add`'s request).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Attached {
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
}

/// `pod-add`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddReply {
    /// `placed`: under its policies; `isolated`: guarded (nothing forwarded reaches it) until
    /// meshd sees it in the API server; `error`: see `error`.
    pub state: String,
    #[serde(default)]
    pub ingress_policies: Vec<String>,
    #[serde(default)]
    pub egress_policies: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

enum Msg {
    Add(Attached, oneshot::Sender<AddReply>),
    Del(String),
}

/// What status and metrics read (written by the engine).
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub synced: bool,
    pub generation: u64,
    pub last_apply_ms: f64,
    pub last_apply_unix: f64,
    pub last_error: Option<String>,
    pub watch_errors: BTreeMap<String, String>,
    pub pods: Vec<PodPolicies>,
    /// Drop counters of the pods' chains, by chain name.
    pub drops: BTreeMap<String, Counter>,
    pub guard_drops: Counter,
    pub flows_cut: u64,
    pub refused: BTreeMap<String, String>,
    pub counts: (usize, usize, usize),
    pub sets: usize,
    pub elements: usize,
    pub chains: usize,
    pub rules: usize,
    /// The policies (`NAMESPACE/NAME`) the program in force was compiled from.
    pub applied: Vec<String>,
}

/// The handle the daemon keeps.
#[derive(Clone)]
pub struct Policy {
    tx: mpsc::Sender<Msg>,
    pub snapshot: Arc<Mutex<Snapshot>>,
}

impl Policy {
    /// `pod-add`: registers the pod and answers once its policy state is in force.
    pub async fn add(&self, a: Attached) -> AddReply {
        let (otx, orx) = oneshot::channel();
        if self.tx.send(Msg::Add(a, otx)).await.is_err() {
            return AddReply::error("the policy engine stopped");
        }
        orx.await
            .unwrap_or_else(|_| AddReply::error("the policy engine stopped"))
    }

    pub async fn del(&self, key: String) {
        let _ = self.tx.send(Msg::Del(key)).await;
    }

    /// The `policy` part of `meshd status`.
    pub fn status(&self) -> serde_json::Value {
        let s = match self.snapshot.lock() {
            Ok(s) => s.clone(),
            Err(_) => return serde_json::json!({"error": "poisoned"}),
        };
        let drops = |c: &Option<String>| -> u64 {
            c.as_ref()
                .and_then(|c| s.drops.get(c))
                .map(|c| c.packets)
                .unwrap_or(0)
        };
        let pods: Vec<serde_json::Value> = s
            .pods
            .iter()
            .map(|p| {
                serde_json::json!({
                    "namespace": p.namespace, "name": p.name, "ips": p.ips,
                    "placed": p.placed,
                    "ingressPolicies": p.ingress, "egressPolicies": p.egress,
                    "drops": {"ingress": drops(&p.ingress_chain), "egress": drops(&p.egress_chain)},
                })
            })
            .collect();
        serde_json::json!({
            "enabled": true,
            "synced": s.synced,
            "generation": s.generation,
            "lastApplyMs": s.last_apply_ms,
            "lastApplyUnix": s.last_apply_unix,
            "lastError": s.last_error,
            "watchErrors": s.watch_errors,
            "pods": pods,
            "guardDrops": s.guard_drops.packets,
            "flowsCut": s.flows_cut,
            "refusedPolicies": s.refused,
            "seen": {"pods": s.counts.0, "namespaces": s.counts.1, "policies": s.counts.2},
            "program": {"sets": s.sets, "elements": s.elements, "chains": s.chains, "rules": s.rules},
            "appliedPolicies": s.applied,
        })
    }
}

impl AddReply {
    fn error(e: &str) -> AddReply {
        AddReply {
            state: "error".into(),
            ingress_policies: Vec::new(),
            egress_policies: Vec::new(),
            error: Some(e.into()),
        }
    }
}

struct Engine {
    opts: Options,
    state: State,
    synced: [bool; 3],
    /// Pods weft-cni attached here, by key.
    attached: BTreeMap<String, Attached>,
    /// Keys weft-cni deleted that the API server still lists (their address may be reused).
    gone: std::collections::BTreeSet<String>,
    waiters: Vec<(String, Instant, oneshot::Sender<AddReply>)>,
    snapshot: Arc<Mutex<Snapshot>>,
    pods: Vec<PodPolicies>,
    dirty: bool,
    repeats: weft_core::repeats::Repeats,
    last_drops: BTreeMap<String, u64>,
}

/// Starts enforcement: installs the guard if no table is in force, starts the watches.
pub fn start(opts: Options, client: kube::Client) -> Result<Policy> {
    let installed = kernel::installed().context("looking for table inet weft-policy")?;
    if !installed {
        let c = compile(&State::default(), &opts.pod_ranges, &[], &BTreeMap::new());
        kernel::apply(&c.program)
            .context("installing the NetworkPolicy guard (table inet weft-policy)")?;
        tracing::info!("NetworkPolicy: guard installed until the first complete listing");
    }
    let attached: BTreeMap<String, Attached> = std::fs::read(opts.state_dir.join(LOCAL_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<Vec<Attached>>(&b).ok())
        .unwrap_or_default()
        .into_iter()
        .map(|a| (format!("{}/{}", a.namespace, a.name), a))
        .collect();
    let (tx, rx) = mpsc::channel(64);
    let (ctx, crx) = mpsc::channel(256);
    watch::spawn(client, ctx);
    let snapshot = Arc::new(Mutex::new(Snapshot::default()));
    let engine = Engine {
        repeats: weft_core::repeats::Repeats::new(opts.log_interval),
        opts,
        state: State::default(),
        synced: [false; 3],
        attached,
        gone: Default::default(),
        waiters: Vec::new(),
        snapshot: snapshot.clone(),
        pods: Vec::new(),
        dirty: true,
        last_drops: BTreeMap::new(),
    };
    tokio::spawn(engine.run(rx, crx));
    Ok(Policy { tx, snapshot })
}

fn apply_ev<T>(map: &mut BTreeMap<String, T>, ev: Ev<T>, key: impl Fn(&T) -> String) {
    match ev {
        Ev::Reset(all) => {
            map.clear();
            for t in all {
                map.insert(key(&t), t);
            }
        }
        Ev::Apply(t) => {
            map.insert(key(&t), t);
        }
        Ev::Delete(k) => {
            map.remove(&k);
        }
    }
}

impl Engine {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, mut crx: mpsc::Receiver<Change>) {
        let mut tick = tokio::time::interval(COUNTER_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => self.msg(m),
                    None => return,
                },
                c = crx.recv() => match c {
                    Some(c) => self.change(c),
                    None => return,
                },
                _ = tick.tick() => {
                    self.read_counters().await;
                    self.expire_waiters();
                }
            }
            // Everything already queued goes into the same transaction.
            while let Ok(c) = crx.try_recv() {
                self.change(c);
            }
            while let Ok(m) = rx.try_recv() {
                self.msg(m);
            }
            if self.dirty && self.synced.iter().all(|s| *s) {
                self.apply().await;
            }
        }
    }

    fn msg(&mut self, m: Msg) {
        match m {
            Msg::Add(a, reply) => {
                let key = format!("{}/{}", a.namespace, a.name);
                self.gone.remove(&key);
                // An address is one pod's: a pod attached again replaces the one before.
                self.attached
                    .retain(|k, o| *k == key || !o.ips.iter().any(|ip| a.ips.contains(ip)));
                self.attached.insert(key.clone(), a);
                self.save_attached();
                self.waiters.push((key, Instant::now() + ADD_WAIT, reply));
                self.dirty = true;
            }
            Msg::Del(key) => {
                if self.attached.remove(&key).is_some() {
                    self.save_attached();
                }
                self.gone.insert(key);
                self.dirty = true;
            }
        }
    }

    fn save_attached(&self) {
        let list: Vec<&Attached> = self.attached.values().collect();
        let path = self.opts.state_dir.join(LOCAL_FILE);
        let tmp = path.with_extension("tmp");
        let ok = serde_json::to_vec(&list).ok().is_some_and(|b| {
            std::fs::write(&tmp, b).is_ok() && std::fs::rename(&tmp, &path).is_ok()
        });
        if !ok {
            tracing::warn!(file = %path.display(), "could not save the attached pods");
        }
    }

    fn change(&mut self, c: Change) {
        // A watch error changes nothing to apply; anything else does.
        self.dirty |= !matches!(c, Change::Error(..));
        match c {
            Change::Pods(ev) => {
                if matches!(ev, Ev::Reset(_)) {
                    self.synced[0] = true;
                    self.clear_watch_error("pods");
                }
                if let Ev::Delete(k) = &ev {
                    self.gone.remove(k);
                }
                apply_ev(&mut self.state.pods, ev, |p| p.key());
            }
            Change::Namespaces(ev) => {
                if matches!(ev, Ev::Reset(_)) {
                    self.synced[1] = true;
                    self.clear_watch_error("namespaces");
                }
                match ev {
                    Ev::Reset(all) => self.state.namespaces = all.into_iter().collect(),
                    Ev::Apply((n, l)) => {
                        self.state.namespaces.insert(n, l);
                    }
                    Ev::Delete(n) => {
                        self.state.namespaces.remove(&n);
                    }
                }
            }
            Change::Policies(ev) => {
                let reset = matches!(ev, Ev::Reset(_));
                if reset {
                    self.synced[2] = true;
                    self.clear_watch_error("networkpolicies");
                }
                let mut all: BTreeMap<String, watch::PolicyRead> = if reset {
                    BTreeMap::new()
                } else {
                    let mut m: BTreeMap<String, watch::PolicyRead> = self
                        .state
                        .policies
                        .iter()
                        .map(|(k, p)| (k.clone(), Ok(p.clone())))
                        .collect();
                    for (k, e) in &self.state.refused {
                        m.insert(k.clone(), Err((k.clone(), e.clone())));
                    }
                    m
                };
                apply_ev(&mut all, ev, |r| match r {
                    Ok(p) => p.key(),
                    Err((k, _)) => k.clone(),
                });
                self.state.policies.clear();
                self.state.refused.clear();
                for (k, r) in all {
                    match r {
                        Ok(p) => {
                            self.state.policies.insert(k, p);
                        }
                        Err((_, e)) => {
                            self.state.refused.insert(k, e);
                        }
                    }
                }
            }
            Change::Error(what, e) => {
                if let Some(more) = self.repeats.hit("policy-watch", what, Instant::now()) {
                    tracing::warn!(watch = what, error = %e, repeats = more,
                        "NetworkPolicy watch failing; the rules in force stay");
                }
                if let Ok(mut s) = self.snapshot.lock() {
                    s.watch_errors.insert(what.to_string(), e);
                }
            }
        }
    }

    fn clear_watch_error(&self, what: &str) {
        if let Ok(mut s) = self.snapshot.lock() {
            s.watch_errors.remove(what);
        }
    }

    /// The pods of this node: those weft-cni attached, and those the API server shows on this
    /// node with an address in its ranges (attached while meshd was down, or before it kept
    /// them).
    fn local(&self) -> Vec<LocalPod> {
        let mut out: Vec<LocalPod> = self
            .attached
            .values()
            .map(|a| LocalPod {
                namespace: a.namespace.clone(),
                name: a.name.clone(),
                ips: a.ips.clone(),
            })
            .collect();
        let taken: std::collections::BTreeSet<IpAddr> =
            out.iter().flat_map(|l| l.ips.iter().copied()).collect();
        for p in self.state.pods.values() {
            let key = p.key();
            if p.node.as_deref() != Some(self.opts.node.as_str())
                || p.host_network
                || p.finished
                || self.attached.contains_key(&key)
                || self.gone.contains(&key)
            {
                continue;
            }
            let ips: Vec<IpAddr> = p
                .ips
                .iter()
                .filter(|ip| self.opts.pod_ranges.iter().any(|r| r.contains(*ip)))
                .filter(|ip| !taken.contains(ip))
                .copied()
                .collect();
            if !ips.is_empty() {
                out.push(LocalPod {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    ips,
                });
            }
        }
        out
    }

    async fn apply(&mut self) {
        self.dirty = false;
        let started = Instant::now();
        let local = self.local();
        let state = self.state.clone();
        let ranges = self.opts.pod_ranges.clone();
        let keep = self.opts.keep_established;
        let res = tokio::task::spawn_blocking(
            move || -> Result<(weft_core::netpol::compile::Compiled, Counters, u64)> {
                let counters = kernel::read().unwrap_or_default();
                let c = compile(&state, &ranges, &local, &counters.by_chain());
                kernel::apply(&c.program).context("writing table inet weft-policy")?;
                let cut = if keep {
                    0
                } else {
                    cut_denied(&c.program).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "removing the conntrack entries of denied flows");
                0
            })
                };
                Ok((c, counters, cut))
            },
        )
        .await;
        let elapsed = started.elapsed().as_secs_f64();
        match res {
            Ok(Ok((c, counters, cut))) => {
                let p = &c.program;
                let generation = {
                    let mut s = match self.snapshot.lock() {
                        Ok(s) => s,
                        Err(_) => return,
                    };
                    s.synced = true;
                    s.generation += 1;
                    s.last_apply_ms = elapsed * 1000.0;
                    s.last_apply_unix = crate::metrics::unix_now();
                    s.last_error = None;
                    s.pods = c.pods.clone();
                    s.drops = counters.chains.clone();
                    s.guard_drops = counters.guard;
                    s.flows_cut += cut;
                    s.refused = self
                        .state
                        .refused
                        .iter()
                        .map(|(k, e)| (k.clone(), e.to_string()))
                        .collect();
                    s.counts = (
                        self.state.pods.len(),
                        self.state.namespaces.len(),
                        self.state.policies.len(),
                    );
                    s.sets = p.sets.len();
                    s.elements = p.sets.iter().map(|s| s.ranges.len()).sum::<usize>()
                        + p.ingress.len()
                        + p.egress.len();
                    s.chains = p.chains.len();
                    s.applied = self
                        .state
                        .policies
                        .keys()
                        .chain(self.state.refused.keys())
                        .cloned()
                        .collect();
                    s.rules = p.chains.iter().map(|c| c.rules.len()).sum();
                    s.generation
                };
                tracing::debug!(
                    generation,
                    ms = elapsed * 1000.0,
                    flows_cut = cut,
                    "NetworkPolicy program applied"
                );
                if cut > 0 {
                    tracing::info!(
                        flows = cut,
                        "NetworkPolicy: established flows a change now denies were cut"
                    );
                }
                self.pods = c.pods;
                self.answer_waiters();
            }
            Ok(Err(e)) => self.failed(format!("{e:#}")),
            Err(e) => self.failed(e.to_string()),
        }
    }

    fn failed(&mut self, e: String) {
        // Retried at every change and every tick: one line per --log-repeat-interval.
        if let Some(more) = self.repeats.hit("policy-apply", "", Instant::now()) {
            tracing::error!(error = %e, repeats = more, "NetworkPolicy: the new rules could not be written; the rules in force stay");
        }
        if let Ok(mut s) = self.snapshot.lock() {
            s.last_error = Some(e);
        }
        // Try again at the next change or tick.
        self.dirty = true;
    }

    fn answer_waiters(&mut self) {
        let mut keep = Vec::new();
        for (key, deadline, reply) in std::mem::take(&mut self.waiters) {
            match self
                .pods
                .iter()
                .find(|p| format!("{}/{}", p.namespace, p.name) == key)
            {
                Some(p) if p.placed => {
                    let _ = reply.send(AddReply {
                        state: "placed".into(),
                        ingress_policies: p.ingress.clone(),
                        egress_policies: p.egress.clone(),
                        error: None,
                    });
                }
                _ => keep.push((key, deadline, reply)),
            }
        }
        self.waiters = keep;
    }

    fn expire_waiters(&mut self) {
        let now = Instant::now();
        let (late, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|(_, d, _)| *d <= now);
        self.waiters = keep;
        for (key, _, reply) in late {
            tracing::warn!(pod = %key, "pod-add: the pod is not in the API server yet; it stays isolated until it is");
            let _ = reply.send(AddReply {
                state: "isolated".into(),
                ingress_policies: Vec::new(),
                egress_policies: Vec::new(),
                error: None,
            });
        }
    }

    async fn read_counters(&mut self) {
        let Ok(Ok(counters)) = tokio::task::spawn_blocking(kernel::read).await else {
            return;
        };
        let now = Instant::now();
        for p in &self.pods {
            for (dir, chain, policies) in [
                ("ingress", &p.ingress_chain, &p.ingress),
                ("egress", &p.egress_chain, &p.egress),
            ] {
                let Some(chain) = chain else { continue };
                let n = counters.chains.get(chain).map(|c| c.packets).unwrap_or(0);
                let before = self.last_drops.insert(chain.clone(), n).unwrap_or(n);
                if n > before {
                    let key = format!("{}/{} {dir}", p.namespace, p.name);
                    if let Some(more) = self.repeats.hit("policy-drop", &key, now) {
                        tracing::warn!(
                            pod = %format!("{}/{}", p.namespace, p.name),
                            direction = dir,
                            policies = %policies.join(","),
                            packets = n - before,
                            total = n,
                            repeats = more,
                            "NetworkPolicy dropped packets (no policy selecting the pod allows them)"
                        );
                    }
                }
            }
        }
        if let Ok(mut s) = self.snapshot.lock() {
            s.drops = counters.chains;
            s.guard_drops = counters.guard;
        }
    }
}

use kernel::Counters;

/// Removes the conntrack entries of flows `program` denies (their next packet is a new flow
/// and is judged by the rules now in force). Returns how many.
fn cut_denied(program: &Program) -> Result<u64> {
    let flows = kernel::flows().context("listing conntrack entries")?;
    let denied: Vec<_> = flows
        .into_iter()
        .filter(|f| {
            let pkt = Packet {
                src: f.src,
                dst: f.dst,
                proto: Proto::from_number(f.proto),
                dport: f.dport,
            };
            program.evaluate(&pkt) != Decision::Accept
        })
        .collect();
    if denied.is_empty() {
        return Ok(0);
    }
    let n = kernel::delete(&denied).context("deleting conntrack entries")?;
    Ok(n as u64)
}

/// The API socket's policy requests: `pod-add {"namespace","name","ips"}` (weft-cni ADD;
/// answered once the pod's policies are in force) and `pod-del {"namespace","name"}`. `None`:
/// not a policy request.
pub async fn api_request(policy: Option<&Policy>, line: &str) -> Option<String> {
    let (verb, body) = line.split_once(' ').unwrap_or((line, ""));
    match verb {
        "pod-add" => {
            let reply = match (policy, serde_json::from_str::<Attached>(body)) {
                (None, _) => AddReply {
                    state: "disabled".into(),
                    ingress_policies: Vec::new(),
                    egress_policies: Vec::new(),
                    error: None,
                },
                (Some(_), Err(e)) => AddReply::error(&format!("bad pod-add request: {e}")),
                (Some(p), Ok(a)) => p.add(a).await,
            };
            Some(serde_json::to_string(&reply).unwrap_or_default())
        }
        "pod-del" => {
            #[derive(Deserialize)]
            struct Del {
                namespace: String,
                name: String,
            }
            let reply = match (policy, serde_json::from_str::<Del>(body)) {
                (None, _) => serde_json::json!({"state": "disabled"}),
                (Some(_), Err(e)) => {
                    serde_json::json!({"state": "error", "error": format!("bad pod-del request: {e}")})
                }
                (Some(p), Ok(d)) => {
                    p.del(format!("{}/{}", d.namespace, d.name)).await;
                    serde_json::json!({"state": "deleted"})
                }
            };
            Some(reply.to_string())
        }
        _ => None,
    }
}
