//! The objects NetworkPolicy enforcement reads, as the API server serves them (JSON, camelCase;
//! unknown fields ignored): `NetworkPolicy` (networking.k8s.io/v1), and the parts of Pods and
//! Namespaces that policies look at. [`Policy::parse`] checks a policy once, so compiling never
//! meets a bad one: a port name with `endPort`, a bad CIDR, an unknown protocol or selector
//! operator is an error naming the field.

use super::program::Proto;
use ipnet::IpNet;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;

pub type Labels = BTreeMap<String, String>;

/// A bad policy, with the field that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PolicyError {
    pub field: String,
    pub reason: String,
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.into(),
        reason: reason.into(),
    }
}

// ---- the API's JSON --------------------------------------------------------------------------

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    labels: Option<Labels>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LabelSelectorJson {
    #[serde(default)]
    match_labels: Option<Labels>,
    #[serde(default)]
    match_expressions: Option<Vec<RequirementJson>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequirementJson {
    key: String,
    operator: String,
    #[serde(default)]
    values: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(i64),
    Str(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PortJson {
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    port: Option<IntOrString>,
    #[serde(default)]
    end_port: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IpBlockJson {
    cidr: String,
    #[serde(default)]
    except: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PeerJson {
    #[serde(default)]
    pod_selector: Option<LabelSelectorJson>,
    #[serde(default)]
    namespace_selector: Option<LabelSelectorJson>,
    #[serde(default)]
    ip_block: Option<IpBlockJson>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuleJson {
    #[serde(default, alias = "to")]
    from: Option<Vec<PeerJson>>,
    #[serde(default)]
    ports: Option<Vec<PortJson>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecJson {
    #[serde(default)]
    pod_selector: LabelSelectorJson,
    #[serde(default)]
    ingress: Option<Vec<RuleJson>>,
    #[serde(default)]
    egress: Option<Vec<RuleJson>>,
    #[serde(default)]
    policy_types: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
struct PolicyJson {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: SpecJson,
}

// ---- checked forms ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
    pub values: Vec<String>,
}

/// A label selector: every `match_labels` pair and every requirement must hold; empty selects
/// everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub labels: Labels,
    pub exprs: Vec<Requirement>,
}

impl Selector {
    fn parse(s: &LabelSelectorJson, field: &str) -> Result<Selector, PolicyError> {
        let mut exprs = Vec::new();
        for (i, r) in s.match_expressions.iter().flatten().enumerate() {
            let f = format!("{field}.matchExpressions[{i}]");
            let values = r.values.clone().unwrap_or_default();
            let op = match r.operator.as_str() {
                "In" => Op::In,
                "NotIn" => Op::NotIn,
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => return Err(err(f + ".operator", format!("unknown operator {other:?}"))),
            };
            if matches!(op, Op::In | Op::NotIn) && values.is_empty() {
                return Err(err(f + ".values", "In and NotIn need values"));
            }
            if matches!(op, Op::Exists | Op::DoesNotExist) && !values.is_empty() {
                return Err(err(f + ".values", "Exists and DoesNotExist take no values"));
            }
            exprs.push(Requirement {
                key: r.key.clone(),
                op,
                values,
            });
        }
        Ok(Selector {
            labels: s.match_labels.clone().unwrap_or_default(),
            exprs,
        })
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.exprs.iter().all(|r| {
                let have = labels.get(&r.key);
                match r.op {
                    Op::In => have.is_some_and(|v| r.values.contains(v)),
                    Op::NotIn => have.is_none_or(|v| !r.values.contains(v)),
                    Op::Exists => have.is_some(),
                    Op::DoesNotExist => have.is_none(),
                }
            })
    }
}

/// The port of a policy port: a number range, a container port name, or every port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    Any,
    Range(u16, u16),
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub proto: Proto,
    pub port: PortSpec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpBlock {
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
}

/// One peer of a rule. `pod` and `namespace` absent and no block never happens (refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Pods: `namespace` None = the policy's own namespace.
    Pods {
        pod: Selector,
        namespace: Option<Selector>,
    },
    Block(IpBlock),
}

/// A rule: `peers` None = every source (ingress) or destination (egress); `ports` empty =
/// every port and protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub peers: Option<Vec<Peer>>,
    pub ports: Vec<Port>,
}

/// A checked NetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub selector: Selector,
    /// `Some` when the policy isolates for ingress (policyTypes), with its rules.
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

fn parse_proto(p: Option<&str>, field: &str) -> Result<Proto, PolicyError> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Proto::Tcp),
        "UDP" => Ok(Proto::Udp),
        "SCTP" => Ok(Proto::Sctp),
        other => Err(err(field, format!("unknown protocol {other:?}"))),
    }
}

fn parse_net(s: &str, field: &str) -> Result<IpNet, PolicyError> {
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|e| err(field, format!("{s:?} is not a CIDR: {e}")))
}

fn parse_port(p: &PortJson, field: &str) -> Result<Port, PolicyError> {
    let proto = parse_proto(p.protocol.as_deref(), &format!("{field}.protocol"))?;
    let num = |n: i64, f: String| {
        u16::try_from(n)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| err(f, format!("{n} is not a port (1-65535)")))
    };
    let port = match (&p.port, p.end_port) {
        (None, None) => PortSpec::Any,
        (None, Some(_)) => return Err(err(format!("{field}.endPort"), "endPort needs port")),
        (Some(IntOrString::Int(n)), end) => {
            let lo = num(*n, format!("{field}.port"))?;
            let hi = match end {
                Some(e) => num(e, format!("{field}.endPort"))?,
                None => lo,
            };
            if hi < lo {
                return Err(err(format!("{field}.endPort"), "endPort is below port"));
            }
            PortSpec::Range(lo, hi)
        }
        (Some(IntOrString::Str(s)), end) => {
            if let Ok(n) = s.parse::<i64>() {
                // An IntOrString holding digits is a number.
                return parse_port(
                    &PortJson {
                        protocol: p.protocol.clone(),
                        port: Some(IntOrString::Int(n)),
                        end_port: end,
                    },
                    field,
                );
            }
            if end.is_some() {
                return Err(err(
                    format!("{field}.endPort"),
                    "endPort needs a numeric port, not a name",
                ));
            }
            if s.is_empty() || s.len() > 15 {
                return Err(err(format!("{field}.port"), format!("bad port name {s:?}")));
            }
            PortSpec::Named(s.clone())
        }
    };
    Ok(Port { proto, port })
}

fn parse_rules(rules: &[RuleJson], dir: &str) -> Result<Vec<Rule>, PolicyError> {
    let peer_key = if dir == "ingress" { "from" } else { "to" };
    let mut out = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let f = format!("spec.{dir}[{i}]");
        let mut ports = Vec::new();
        for (j, p) in r.ports.iter().flatten().enumerate() {
            ports.push(parse_port(p, &format!("{f}.ports[{j}]"))?);
        }
        let peers = match &r.from {
            None => None,
            Some(v) if v.is_empty() => None,
            Some(v) => {
                let mut peers = Vec::new();
                for (j, p) in v.iter().enumerate() {
                    let pf = format!("{f}.{peer_key}[{j}]");
                    match (&p.pod_selector, &p.namespace_selector, &p.ip_block) {
                        (None, None, None) => {
                            return Err(err(
                                pf,
                                "a peer needs podSelector, namespaceSelector or ipBlock",
                            ))
                        }
                        (_, _, Some(b)) => {
                            if p.pod_selector.is_some() || p.namespace_selector.is_some() {
                                return Err(err(pf, "ipBlock goes alone"));
                            }
                            let cidr = parse_net(&b.cidr, &format!("{pf}.ipBlock.cidr"))?;
                            let mut except = Vec::new();
                            for (k, e) in b.except.iter().flatten().enumerate() {
                                let n = parse_net(e, &format!("{pf}.ipBlock.except[{k}]"))?;
                                if !cidr.contains(&n) {
                                    return Err(err(
                                        format!("{pf}.ipBlock.except[{k}]"),
                                        format!("{n} is not inside {cidr}"),
                                    ));
                                }
                                except.push(n);
                            }
                            peers.push(Peer::Block(IpBlock { cidr, except }));
                        }
                        (pod, ns, None) => {
                            let pod = match pod {
                                Some(s) => Selector::parse(s, &format!("{pf}.podSelector"))?,
                                None => Selector::default(),
                            };
                            let namespace = match ns {
                                Some(s) => {
                                    Some(Selector::parse(s, &format!("{pf}.namespaceSelector"))?)
                                }
                                None => None,
                            };
                            peers.push(Peer::Pods { pod, namespace });
                        }
                    }
                }
                Some(peers)
            }
        };
        out.push(Rule { peers, ports });
    }
    Ok(out)
}

impl Policy {
    /// A policy from the API server's JSON.
    pub fn parse(v: &serde_json::Value) -> Result<Policy, PolicyError> {
        let p: PolicyJson =
            serde_json::from_value(v.clone()).map_err(|e| err("(object)", e.to_string()))?;
        if p.metadata.name.is_empty() || p.metadata.namespace.is_empty() {
            return Err(err("metadata", "a policy needs a name and a namespace"));
        }
        let selector = Selector::parse(&p.spec.pod_selector, "spec.podSelector")?;
        let (ingress, egress) = match &p.spec.policy_types {
            Some(t) if !t.is_empty() => {
                let mut i = false;
                let mut e = false;
                for (k, t) in t.iter().enumerate() {
                    match t.as_str() {
                        "Ingress" => i = true,
                        "Egress" => e = true,
                        other => {
                            return Err(err(
                                format!("spec.policyTypes[{k}]"),
                                format!("unknown policy type {other:?}"),
                            ))
                        }
                    }
                }
                (i, e)
            }
            // The API's default: Ingress always, Egress when there are egress rules.
            _ => (true, p.spec.egress.is_some()),
        };
        let ingress_rules = if ingress {
            Some(parse_rules(
                p.spec.ingress.as_deref().unwrap_or(&[]),
                "ingress",
            )?)
        } else {
            None
        };
        let egress_rules = if egress {
            Some(parse_rules(
                p.spec.egress.as_deref().unwrap_or(&[]),
                "egress",
            )?)
        } else {
            None
        };
        Ok(Policy {
            namespace: p.metadata.namespace,
            name: p.metadata.name,
            selector,
            ingress: ingress_rules,
            egress: egress_rules,
        })
    }

    /// `NAMESPACE/NAME`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A container port a named policy port can resolve to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub proto: Proto,
    pub port: u16,
}

/// What policies look at in a Pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// `status.podIPs` (empty until the kubelet reports them).
    pub ips: Vec<IpAddr>,
    pub node: Option<String>,
    pub ports: Vec<NamedPort>,
    /// hostNetwork pods have their node's address; selectors never pick them.
    pub host_network: bool,
    /// Succeeded or Failed: its address may already be another pod's.
    pub finished: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPortJson {
    #[serde(default)]
    name: Option<String>,
    container_port: i64,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerJson {
    #[serde(default)]
    ports: Option<Vec<ContainerPortJson>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpecJson {
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    host_network: Option<bool>,
    #[serde(default)]
    containers: Vec<ContainerJson>,
    #[serde(default)]
    init_containers: Vec<ContainerJson>,
}

#[derive(Debug, Clone, Deserialize)]
struct PodIpJson {
    ip: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatusJson {
    #[serde(default)]
    phase: Option<String>,
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pod_ips: Option<Vec<PodIpJson>>,
}

#[derive(Debug, Clone, Deserialize)]
struct PodJson {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: PodSpecJson,
    #[serde(default)]
    status: PodStatusJson,
}

impl PodInfo {
    /// A Pod from the API server's JSON. Bad addresses and ports are skipped (the API server
    /// validated them; a pod is never refused whole, or it would escape its policies).
    pub fn parse(v: &serde_json::Value) -> Result<PodInfo, PolicyError> {
        let p: PodJson =
            serde_json::from_value(v.clone()).map_err(|e| err("(object)", e.to_string()))?;
        if p.metadata.name.is_empty() || p.metadata.namespace.is_empty() {
            return Err(err("metadata", "a pod needs a name and a namespace"));
        }
        let mut ips: Vec<IpAddr> = p
            .status
            .pod_ips
            .iter()
            .flatten()
            .filter_map(|i| i.ip.parse().ok())
            .collect();
        if let Some(ip) = p.status.pod_ip.as_deref().and_then(|s| s.parse().ok()) {
            if !ips.contains(&ip) {
                ips.insert(0, ip);
            }
        }
        let mut ports = Vec::new();
        // Sidecars (restartable init containers) serve too.
        for c in p.spec.containers.iter().chain(&p.spec.init_containers) {
            for cp in c.ports.iter().flatten() {
                let (Some(name), Ok(port)) = (&cp.name, u16::try_from(cp.container_port)) else {
                    continue;
                };
                let Ok(proto) = parse_proto(cp.protocol.as_deref(), "") else {
                    continue;
                };
                ports.push(NamedPort {
                    name: name.clone(),
                    proto,
                    port,
                });
            }
        }
        Ok(PodInfo {
            namespace: p.metadata.namespace,
            name: p.metadata.name,
            labels: p.metadata.labels.unwrap_or_default(),
            ips,
            node: p.spec.node_name,
            ports,
            host_network: p.spec.host_network.unwrap_or(false),
            finished: matches!(p.status.phase.as_deref(), Some("Succeeded" | "Failed")),
        })
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The port `name` resolves to for `proto` (the first container port with that name).
    pub fn named_port(&self, name: &str, proto: Proto) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.proto == proto)
            .map(|p| p.port)
    }
}

/// A Namespace's name and labels (from its JSON).
pub fn parse_namespace(v: &serde_json::Value) -> Result<(String, Labels), PolicyError> {
    let m: Meta = serde_json::from_value(v.get("metadata").cloned().unwrap_or_default())
        .map_err(|e| err("metadata", e.to_string()))?;
    if m.name.is_empty() {
        return Err(err("metadata.name", "a namespace needs a name"));
    }
    let mut labels = m.labels.unwrap_or_default();
    // The API server sets it (1.21+); older objects get it here.
    labels
        .entry("kubernetes.io/metadata.name".into())
        .or_insert_with(|| m.name.clone());
    Ok((m.name, labels))
}
