//! This node's own `Node` object: what meshd takes from it (its addresses for the endpoint, the
//! `weft.dev/force-endpoint` annotation, `spec.podCIDRs`, its uid for owner references) and a
//! watch of that one object (a field selector on its name: meshd never watches all Nodes).

use super::{Inner, KubeRegistry, FORCE_ENDPOINT_ANNOTATION};

/// Annotation naming the node's location; else its `topology.kubernetes.io/region` label.
pub const LOCATION_ANNOTATION: &str = "weft.dev/location";
/// The well-known region label, the default location.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
use crate::RegistryError;
use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use std::net::{IpAddr, SocketAddr};
use tokio::sync::mpsc;
use tracing::warn;

/// What meshd uses of its Node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeInfo {
    pub name: String,
    pub uid: String,
    /// `status.addresses` of type InternalIP, in order.
    pub internal_ips: Vec<IpAddr>,
    /// `status.addresses` of type ExternalIP, in order.
    pub external_ips: Vec<IpAddr>,
    /// `spec.podCIDRs` (or `spec.podCIDR`), as set by the controller manager, k3s or kubeadm.
    pub pod_cidrs: Vec<IpNet>,
    /// The `weft.dev/force-endpoint` annotation, unparsed.
    pub force_endpoint: Option<String>,
    /// The `weft.dev/location` annotation, else the `topology.kubernetes.io/region` label.
    pub location: Option<String>,
}

impl NodeInfo {
    /// Reads a Node object. Addresses or ranges that do not parse are skipped with a warning.
    pub fn from_node(node: &Node) -> NodeInfo {
        let name = node.metadata.name.clone().unwrap_or_default();
        let addrs = |t: &str| -> Vec<IpAddr> {
            node.status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .into_iter()
                .flatten()
                .filter(|a| a.type_ == t)
                .filter_map(|a| match a.address.parse() {
                    Ok(ip) => Some(ip),
                    Err(_) => {
                        warn!(node = %name, address = %a.address, "skipping a Node address that is not an IP");
                        None
                    }
                })
                .collect()
        };
        let spec = node.spec.as_ref();
        let mut cidrs: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
        if cidrs.is_empty() {
            cidrs.extend(spec.and_then(|s| s.pod_cidr.clone()));
        }
        let pod_cidrs = cidrs
            .iter()
            .filter_map(|c| match c.parse::<IpNet>() {
                Ok(n) => Some(n),
                Err(_) => {
                    warn!(node = %name, pod_cidr = %c, "skipping a Node pod CIDR that does not parse");
                    None
                }
            })
            .collect();
        NodeInfo {
            uid: node.metadata.uid.clone().unwrap_or_default(),
            internal_ips: addrs("InternalIP"),
            external_ips: addrs("ExternalIP"),
            pod_cidrs,
            force_endpoint: node
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(FORCE_ENDPOINT_ANNOTATION).cloned()),
            location: node
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LOCATION_ANNOTATION).cloned())
                .or_else(|| {
                    node.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(REGION_LABEL).cloned())
                })
                .filter(|l| !l.is_empty()),
            name,
        }
    }

    /// The endpoints peers should use, on WireGuard port `port`: the forced one if the
    /// annotation is set (`IP` or `IP:PORT`), else the InternalIPs then the ExternalIPs.
    pub fn endpoints(&self, port: u16) -> Result<Vec<SocketAddr>, String> {
        if let Some(f) = self.forced(port)? {
            return Ok(vec![f]);
        }
        let eps: Vec<SocketAddr> = self
            .internal_ips
            .iter()
            .chain(&self.external_ips)
            .map(|ip| SocketAddr::new(*ip, port))
            .collect();
        if eps.is_empty() {
            return Err(format!(
                "Node {} has no InternalIP or ExternalIP address; set --endpoint or the annotation {FORCE_ENDPOINT_ANNOTATION}",
                self.name
            ));
        }
        Ok(eps)
    }

    /// With a location: (public, private) endpoints: the forced one or the ExternalIPs (none:
    /// the node is behind NAT), and the InternalIPs for the nodes of its location. Without a
    /// location: [`NodeInfo::endpoints`], all public.
    pub fn scoped_endpoints(
        &self,
        port: u16,
    ) -> Result<(Vec<SocketAddr>, Vec<SocketAddr>), String> {
        if self.location.is_none() {
            return Ok((self.endpoints(port)?, Vec::new()));
        }
        let public = match self.forced(port)? {
            Some(f) => vec![f],
            None => self
                .external_ips
                .iter()
                .map(|ip| SocketAddr::new(*ip, port))
                .collect(),
        };
        let private = self
            .internal_ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, port))
            .filter(|e| !public.contains(e))
            .collect();
        Ok((public, private))
    }

    /// The `weft.dev/force-endpoint` annotation, parsed.
    fn forced(&self, port: u16) -> Result<Option<SocketAddr>, String> {
        if let Some(f) = &self.force_endpoint {
            let f = f.trim();
            let ep = f
                .parse::<SocketAddr>()
                .or_else(|_| f.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, port)))
                .map_err(|_| {
                    format!("annotation {FORCE_ENDPOINT_ANNOTATION}={f:?} is not IP or IP:PORT")
                })?;
            return Ok(Some(ep));
        }
        Ok(None)
    }
}

pub(super) async fn get_node(inner: &Inner, name: &str) -> Result<Option<Node>, RegistryError> {
    let api: Api<Node> = Api::all(inner.client().await?);
    inner
        .call("reading", format!("nodes/{name}"), api.get_opt(name))
        .await
}

impl KubeRegistry {
    /// Reads this node's Node object; `None` if there is none of that name.
    pub async fn node_info(&self, name: &str) -> Result<Option<NodeInfo>, RegistryError> {
        Ok(get_node(&self.inner, name)
            .await?
            .map(|n| NodeInfo::from_node(&n)))
    }

    /// Watches one Node (a field selector on its name). Sends its info whenever it is listed or
    /// changes; `None` when it is deleted. Stops when the receiver is dropped.
    pub async fn watch_node(
        &self,
        name: &str,
    ) -> Result<mpsc::Receiver<Option<NodeInfo>>, RegistryError> {
        let api: Api<Node> = Api::all(self.inner.client().await?);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let (tx, rx) = mpsc::channel(8);
        let name = name.to_string();
        tokio::spawn(async move {
            let stream =
                watcher::watcher(api, config).backoff(super::watch::WatchBackoff::default());
            futures::pin_mut!(stream);
            let mut listed: Option<Option<NodeInfo>> = None;
            loop {
                let ev = tokio::select! {
                    e = stream.next() => e,
                    () = tx.closed() => return,
                };
                let out = match ev {
                    None => return,
                    Some(Ok(Event::Init)) => {
                        listed = Some(None);
                        None
                    }
                    Some(Ok(Event::InitApply(n))) => {
                        listed = Some(Some(NodeInfo::from_node(&n)));
                        None
                    }
                    Some(Ok(Event::InitDone)) => listed.take(),
                    Some(Ok(Event::Apply(n))) => Some(Some(NodeInfo::from_node(&n))),
                    Some(Ok(Event::Delete(_))) => Some(None),
                    Some(Err(e)) => {
                        tracing::debug!(node = %name, error = %e, "watching this node's Node");
                        None
                    }
                };
                if let Some(info) = out {
                    if tx.send(info).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(json: serde_json::Value) -> Node {
        serde_json::from_value(json).expect("node")
    }

    #[test]
    fn endpoints_follow_the_annotation_then_internal_then_external() {
        let n = node(serde_json::json!({
            "metadata": {"name": "a", "uid": "u1"},
            "spec": {"podCIDRs": ["10.42.7.0/24", "fd00:42:7::/64"]},
            "status": {"addresses": [
                {"type": "Hostname", "address": "a"},
                {"type": "ExternalIP", "address": "203.0.113.7"},
                {"type": "InternalIP", "address": "192.168.1.7"},
                {"type": "InternalIP", "address": "not-an-ip"}]}
        }));
        let info = NodeInfo::from_node(&n);
        assert_eq!(info.uid, "u1");
        assert_eq!(info.pod_cidrs.len(), 2);
        assert_eq!(
            info.endpoints(51820).expect("eps"),
            vec![
                "192.168.1.7:51820".parse::<SocketAddr>().expect("ep"),
                "203.0.113.7:51820".parse().expect("ep")
            ]
        );
        let mut forced = info.clone();
        forced.force_endpoint = Some("198.51.100.1".into());
        assert_eq!(
            forced.endpoints(51820).expect("forced"),
            vec!["198.51.100.1:51820".parse::<SocketAddr>().expect("ep")]
        );
        forced.force_endpoint = Some("198.51.100.1:4000".into());
        assert_eq!(forced.endpoints(51820).expect("forced")[0].port(), 4000);
        forced.force_endpoint = Some("nope".into());
        assert!(forced.endpoints(51820).is_err());
        let bare = NodeInfo::from_node(&node(serde_json::json!({"metadata": {"name": "b"}})));
        assert!(bare
            .endpoints(51820)
            .expect_err("none")
            .contains("--endpoint"));
        let single = NodeInfo::from_node(&node(
            serde_json::json!({"metadata": {"name": "c"}, "spec": {"podCIDR": "10.42.9.0/24"}}),
        ));
        assert_eq!(
            single.pod_cidrs,
            vec!["10.42.9.0/24".parse::<IpNet>().expect("net")]
        );
    }

    /// The region label names the location (the annotation wins); with a location the
    /// InternalIPs are private endpoints and the ExternalIPs (or the forced one) public ones;
    /// a node with only InternalIPs then has no public endpoint (behind NAT).
    #[test]
    fn location_scopes_the_endpoints() {
        let n = node(serde_json::json!({
            "metadata": {"name": "a", "labels": {"topology.kubernetes.io/region": "eu-west-1"}},
            "status": {"addresses": [
                {"type": "ExternalIP", "address": "203.0.113.7"},
                {"type": "InternalIP", "address": "10.0.1.7"}]}
        }));
        let info = NodeInfo::from_node(&n);
        assert_eq!(info.location.as_deref(), Some("eu-west-1"));
        let (public, private) = info.scoped_endpoints(51820).expect("scoped");
        assert_eq!(
            public,
            vec!["203.0.113.7:51820".parse::<SocketAddr>().expect("ep")]
        );
        assert_eq!(
            private,
            vec!["10.0.1.7:51820".parse::<SocketAddr>().expect("ep")]
        );
        let n = node(serde_json::json!({
            "metadata": {"name": "b",
                "labels": {"topology.kubernetes.io/region": "eu-west-1"},
                "annotations": {"weft.dev/location": "edge-7"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.7.2"}]}
        }));
        let info = NodeInfo::from_node(&n);
        assert_eq!(info.location.as_deref(), Some("edge-7"));
        let (public, private) = info.scoped_endpoints(51820).expect("scoped");
        assert!(public.is_empty(), "only an InternalIP: behind NAT");
        assert_eq!(private.len(), 1);
        let plain = NodeInfo {
            location: None,
            ..info
        };
        let (public, private) = plain.scoped_endpoints(51820).expect("plain");
        assert_eq!(
            public.len(),
            1,
            "no location: every address is public, as before"
        );
        assert!(private.is_empty());
    }
}
