//! The three watches NetworkPolicy enforcement needs: Pods, Namespaces and NetworkPolicies,
//! cluster-wide (`kube-runtime`'s watcher, relisting by itself after an error or `410 Gone`).
//!
//! In: a client. Out: [`Change`]s on a channel. A complete list arrives as one `Reset` (a
//! partial list never reaches the engine, so nothing is dropped before a complete list has
//! been read); after that `Apply` / `Delete` one object at a time. Objects are parsed by
//! weft-core ([`PodInfo::parse`], [`Policy::parse`], [`parse_namespace`]): a policy that cannot
//! be read comes as `Err` and is enforced fail-closed.

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use tokio::sync::mpsc;
use weft_core::netpol::model::{parse_namespace, Labels, PodInfo, Policy, PolicyError};

/// A policy as read: checked, or refused with why (keyed `NAMESPACE/NAME`).
pub type PolicyRead = Result<Policy, (String, PolicyError)>;

#[derive(Debug)]
pub enum Ev<T> {
    Reset(Vec<T>),
    Apply(T),
    /// `NAMESPACE/NAME` (a namespace: its name).
    Delete(String),
}

#[derive(Debug)]
pub enum Change {
    Pods(Ev<PodInfo>),
    Namespaces(Ev<(String, Labels)>),
    Policies(Ev<PolicyRead>),
    /// A watch cannot list or watch (shown in status until its next complete list).
    Error(&'static str, String),
}

fn key_of(meta: &kube::api::ObjectMeta) -> String {
    match &meta.namespace {
        Some(ns) => format!("{ns}/{}", meta.name.clone().unwrap_or_default()),
        None => meta.name.clone().unwrap_or_default(),
    }
}

/// Runs one watch until the engine is gone. `parse` turns an object into what the engine
/// takes (`None`: skipped with a warning); `wrap` makes the change.
async fn run<K, T>(
    api: Api<K>,
    what: &'static str,
    parse: fn(&serde_json::Value) -> Option<T>,
    wrap: fn(Ev<T>) -> Change,
    tx: mpsc::Sender<Change>,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    K: Send + Sync + 'static,
    T: Send + 'static,
{
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut init: Vec<T> = Vec::new();
    let obj = |o: &K| -> Option<T> {
        let v = serde_json::to_value(o).ok()?;
        parse(&v)
    };
    while let Some(ev) = stream.next().await {
        let change = match ev {
            Ok(Event::Init) => {
                init.clear();
                continue;
            }
            Ok(Event::InitApply(o)) => {
                if let Some(t) = obj(&o) {
                    init.push(t);
                }
                continue;
            }
            Ok(Event::InitDone) => wrap(Ev::Reset(std::mem::take(&mut init))),
            Ok(Event::Apply(o)) => match obj(&o) {
                Some(t) => wrap(Ev::Apply(t)),
                None => continue,
            },
            Ok(Event::Delete(o)) => wrap(Ev::Delete(key_of(o.meta()))),
            Err(e) => Change::Error(what, e.to_string()),
        };
        if tx.send(change).await.is_err() {
            return;
        }
    }
}

fn parse_pod(v: &serde_json::Value) -> Option<PodInfo> {
    match PodInfo::parse(v) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(error = %e, "skipping a Pod that cannot be read");
            None
        }
    }
}

fn parse_ns(v: &serde_json::Value) -> Option<(String, Labels)> {
    match parse_namespace(v) {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!(error = %e, "skipping a Namespace that cannot be read");
            None
        }
    }
}

fn parse_policy(v: &serde_json::Value) -> Option<PolicyRead> {
    let key = format!(
        "{}/{}",
        v["metadata"]["namespace"].as_str().unwrap_or_default(),
        v["metadata"]["name"].as_str().unwrap_or_default()
    );
    Some(Policy::parse(v).map_err(|e| {
        tracing::warn!(policy = %key, error = %e,
            "a NetworkPolicy cannot be read: its namespace's pods are isolated for ingress, allowing nothing");
        (key, e)
    }))
}

/// Starts the three watches.
pub fn spawn(client: Client, tx: mpsc::Sender<Change>) {
    tokio::spawn(run::<Pod, PodInfo>(
        Api::all(client.clone()),
        "pods",
        parse_pod,
        Change::Pods,
        tx.clone(),
    ));
    tokio::spawn(run::<Namespace, (String, Labels)>(
        Api::all(client.clone()),
        "namespaces",
        parse_ns,
        Change::Namespaces,
        tx.clone(),
    ));
    tokio::spawn(run::<NetworkPolicy, PolicyRead>(
        Api::all(client),
        "networkpolicies",
        parse_policy,
        Change::Policies,
        tx,
    ));
}
