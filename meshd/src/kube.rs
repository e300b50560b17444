//! `--registry kube`: what meshd takes from its own Node before it starts, and the watch of that
//! one Node (a field selector: meshd never watches all Nodes).
//!
//! In: the config and the API server. Out: the endpoints (`--endpoint`, else the
//! `weft.dev/force-endpoint` annotation, else the Node's InternalIPs then ExternalIPs) and pod
//! ranges (`--pod-cidr`, else `Node.spec.podCIDRs`, else a claimed block) meshd runs with.
//! `Node.spec.podCIDRs` are remembered in `STATE_DIR/node-pod-cidrs`, so a meshd started while
//! the API server is down comes up with them.

use crate::config::Config;
use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use weft_registry::kube::node::NodeInfo;
use weft_registry::KubeRegistry;

/// `STATE_DIR/node-pod-cidrs`: the Node's `spec.podCIDRs` as last read, one per line.
pub const NODE_CIDRS_FILE: &str = "node-pod-cidrs";

/// How long start-up waits for the Node before going on without it, when nothing is remembered
/// of it (a first start); with remembered pod ranges, [`NODE_WAIT_REMEMBERED`] (a restart
/// during an API server outage must not keep the data path down).
const NODE_WAIT: Duration = Duration::from_secs(10);
const NODE_WAIT_REMEMBERED: Duration = Duration::from_secs(1);

/// What the Node gave meshd at start.
#[derive(Debug, Default)]
pub struct FromNode {
    pub endpoints: Option<Vec<SocketAddr>>,
    /// With a location: the Node's InternalIPs, for the nodes of that location.
    pub private_endpoints: Option<Vec<SocketAddr>>,
}

/// Opens the registry and reads this node's Node (bounded: an unreachable API server does not
/// hold meshd up; the remembered pod ranges are used then). Sets `cfg.pod_cidrs` (and clears
/// the claim) when the Node has pod ranges and none were given.
pub async fn start(cfg: &mut Config) -> Result<(Arc<KubeRegistry>, FromNode)> {
    let Some(kube) = &cfg.kube else {
        bail!("not --registry kube");
    };
    let registry = Arc::new(
        KubeRegistry::open(kube.options(&cfg.node_name)).context("opening the kube registry")?,
    );
    let wait = if remembered(&cfg.state_dir).is_empty() {
        NODE_WAIT
    } else {
        NODE_WAIT_REMEMBERED
    };
    let info = read_node(&registry, &cfg.node_name, wait).await;
    let mut out = FromNode::default();
    let node_cidrs = match &info {
        Some(i) => {
            if cfg.location.is_none() {
                match i.location.as_deref().map(weft_core::record::check_location) {
                    Some(Ok(())) => cfg.location = i.location.clone(),
                    Some(Err(e)) => tracing::warn!(error = %e,
                        "ignoring the Node's location (weft.dev/location annotation or topology.kubernetes.io/region label)"),
                    None => {}
                }
            }
            let scoped = NodeInfo {
                location: cfg.location.clone(),
                ..i.clone()
            };
            let (public, private) = scoped
                .scoped_endpoints(cfg.listen_port)
                .map_err(anyhow::Error::msg)
                .context("taking this node's endpoint from its Node")?;
            if cfg.endpoints.is_empty() && !cfg.behind_nat {
                out.endpoints = Some(public);
            }
            if cfg.private_endpoints.is_empty() && cfg.location.is_some() {
                out.private_endpoints = Some(private);
            }
            if !i.pod_cidrs.is_empty() {
                remember(&cfg.state_dir, &i.pod_cidrs);
            }
            i.pod_cidrs.clone()
        }
        None => remembered(&cfg.state_dir),
    };
    if cfg.pod_cidrs.is_empty() && !node_cidrs.is_empty() {
        check_node_cidrs(&node_cidrs, &cfg.cluster_cidrs)?;
        tracing::info!(pod_cidrs = ?node_cidrs, "pod ranges from the Node's spec.podCIDRs");
        cfg.pod_cidrs = node_cidrs;
        cfg.alloc = None;
    }
    Ok((registry, out))
}

async fn read_node(registry: &KubeRegistry, name: &str, wait: Duration) -> Option<NodeInfo> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut backoff = Duration::from_millis(200);
    loop {
        match registry.node_info(name).await {
            Ok(Some(i)) => return Some(i),
            Ok(None) => tracing::warn!(node = name, "no Node object of this name"),
            Err(e) => tracing::warn!(node = name, error = %e, "cannot read this node's Node"),
        }
        if tokio::time::Instant::now() + backoff > deadline {
            tracing::warn!(
                node = name,
                "going on without this node's Node (remembered pod ranges, default-route endpoint)"
            );
            return None;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One IPv4 and at most one IPv6 range, each inside a cluster range (fail-closed routes).
fn check_node_cidrs(cidrs: &[IpNet], cluster: &[IpNet]) -> Result<()> {
    let v4 = cidrs.iter().filter(|c| matches!(c, IpNet::V4(_))).count();
    if v4 != 1 || cidrs.len() - v4 > 1 {
        bail!("the Node's spec.podCIDRs {cidrs:?} must hold one IPv4 and at most one IPv6 range");
    }
    if let Some(c) = cidrs
        .iter()
        .find(|c| !cluster.iter().any(|k| k.contains(*c)))
    {
        bail!("the Node's pod range {c} is outside every --cluster-cidr {cluster:?}: set --cluster-cidr to the cluster's pod range");
    }
    Ok(())
}

fn remember(state_dir: &Path, cidrs: &[IpNet]) {
    let path = state_dir.join(NODE_CIDRS_FILE);
    let text: String = cidrs.iter().map(|c| format!("{c}\n")).collect();
    if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
        return;
    }
    let tmp = state_dir.join(format!(".{NODE_CIDRS_FILE}.tmp{}", std::process::id()));
    if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &path)) {
        tracing::warn!(file = %path.display(), error = %e, "cannot remember the Node's pod ranges");
    }
}

fn remembered(state_dir: &Path) -> Vec<IpNet> {
    std::fs::read_to_string(state_dir.join(NODE_CIDRS_FILE))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Watches this node's Node for as long as meshd runs and says when something meshd took from
/// it at start changed (a restart picks the change up).
pub fn spawn_node_watch(
    registry: Arc<KubeRegistry>,
    name: String,
    port: u16,
    endpoints: Vec<SocketAddr>,
    pod_cidrs: Vec<IpNet>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut rx = loop {
            match registry.watch_node(&name).await {
                Ok(rx) => break rx,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot watch this node's Node yet");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        };
        while let Some(info) = rx.recv().await {
            match info {
                None => tracing::warn!(node = %name, "this node's Node object was deleted"),
                Some(i) => {
                    match registry.node_seen(&i.uid).await {
                        Ok(0) => {}
                        Ok(n) => tracing::warn!(node = %name, uid = %i.uid, objects = n,
                            "this node's Node was re-created: its objects are owned by the new one"),
                        Err(e) => tracing::warn!(node = %name, error = %e,
                            "this node's Node was re-created, but its objects could not be written again; retrying at the next change"),
                    }
                    if i.endpoints(port).ok().is_some_and(|e| e != endpoints)
                        && !endpoints.is_empty()
                    {
                        tracing::info!(node = %name, now = ?i.endpoints(port).ok(), running = ?endpoints,
                            "the Node's addresses or force-endpoint annotation changed; restart meshd to publish them");
                    }
                    if !i.pod_cidrs.is_empty() && i.pod_cidrs != pod_cidrs {
                        tracing::warn!(node = %name, node_pod_cidrs = ?i.pod_cidrs, running = ?pod_cidrs,
                            "the Node's spec.podCIDRs differ from the ranges meshd runs with");
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ranges_are_checked_and_remembered() {
        let cluster: Vec<IpNet> = vec!["10.42.0.0/16".parse().expect("net")];
        let ok: Vec<IpNet> = vec!["10.42.3.0/24".parse().expect("net")];
        assert!(check_node_cidrs(&ok, &cluster).is_ok());
        let outside: Vec<IpNet> = vec!["10.99.3.0/24".parse().expect("net")];
        assert!(check_node_cidrs(&outside, &cluster).is_err());
        let two_v4: Vec<IpNet> = vec![ok[0], "10.42.4.0/24".parse().expect("net")];
        assert!(check_node_cidrs(&two_v4, &cluster).is_err());
        let tmp = tempfile::tempdir().expect("tmp");
        assert!(remembered(tmp.path()).is_empty());
        remember(tmp.path(), &ok);
        assert_eq!(remembered(tmp.path()), ok);
    }
}
