//! From policies, pods and namespaces to the [`Program`] of one node.
//!
//! In: a [`State`] (what the API server says), the node's pod ranges and its [`LocalPod`]s (the
//! pods the CNI plugin attached here, with the addresses it gave them: known before the API
//! server has them), and the drop counters of the program in force. Out: [`Compiled`]: the
//! program and, per local pod, the policies that select it.
//!
//! The program's shape: one chain per (policy, direction) holding that policy's rules, whose
//! peers are address sets (pods' addresses and ipBlocks as interval sets), so the number of
//! rules depends on the policies, not on how many pods they select; one chain per isolated local
//! pod and direction that jumps to the chains of the policies selecting it and ends with a
//! counted drop (the pod's drops, shown per pod and policy); maps from a local pod's address to
//! its chain. Addresses of this node's pod ranges that belong to no pod placed under its
//! policies (not yet seen in the API server) are in the guard set: dropped both ways.

use super::model::{Labels, Peer, PodInfo, Policy, PolicyError, PortSpec, Rule as PolicyRule};
use super::program::{
    AddrSet, Chain, Counter, Family, Match, Program, Rule, Verdict, GUARD4, GUARD6,
};
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What the API server says, keyed by `NAMESPACE/NAME` (namespaces by name).
#[derive(Debug, Clone, Default)]
pub struct State {
    pub namespaces: BTreeMap<String, Labels>,
    pub pods: BTreeMap<String, PodInfo>,
    pub policies: BTreeMap<String, Policy>,
    /// Policies that could not be read, with why. Each still isolates the pods of its
    /// namespace for ingress, allowing nothing (fail closed).
    pub refused: BTreeMap<String, PolicyError>,
}

/// A pod attached on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPod {
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
}

impl LocalPod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A local pod as the program treats it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPolicies {
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    /// Seen in the API server, so under its policies (else guarded: unreachable).
    pub placed: bool,
    /// Policies isolating it for ingress / egress (`NAMESPACE/NAME`; a refused policy too).
    pub ingress: Vec<String>,
    pub egress: Vec<String>,
    /// The chains whose final rule counts its drops (when isolated that way).
    pub ingress_chain: Option<String>,
    pub egress_chain: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Compiled {
    pub program: Program,
    pub pods: Vec<PodPolicies>,
}

/// Inclusive integer ranges of one family, kept sorted and merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Ranges(Vec<(u128, u128)>);

fn bounds(n: &IpNet) -> (u128, u128) {
    match n {
        IpNet::V4(n) => (
            u32::from(n.network()) as u128,
            u32::from(n.broadcast()) as u128,
        ),
        IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast())),
    }
}

fn ip_num(ip: &IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(*a) as u128,
        IpAddr::V6(a) => u128::from(*a),
    }
}

fn num_ip(f: Family, n: u128) -> IpAddr {
    match f {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

impl Ranges {
    fn add(&mut self, lo: u128, hi: u128) {
        self.0.push((lo, hi));
        self.0.sort_unstable();
        let mut out: Vec<(u128, u128)> = Vec::with_capacity(self.0.len());
        for &(lo, hi) in &self.0 {
            match out.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => out.push((lo, hi)),
            }
        }
        self.0 = out;
    }

    fn extend(&mut self, other: &Ranges) {
        for &(lo, hi) in &other.0 {
            self.add(lo, hi);
        }
    }

    fn remove(&mut self, lo: u128, hi: u128) {
        let mut out = Vec::with_capacity(self.0.len() + 1);
        for &(a, b) in &self.0 {
            if b < lo || a > hi {
                out.push((a, b));
                continue;
            }
            if a < lo {
                out.push((a, lo - 1));
            }
            if b > hi {
                out.push((hi + 1, b));
            }
        }
        self.0 = out;
    }

    fn contains(&self, n: u128) -> bool {
        self.0.iter().any(|&(a, b)| a <= n && n <= b)
    }
}

/// Addresses of both families.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Addrs {
    v4: Ranges,
    v6: Ranges,
}

impl Addrs {
    fn fam(&mut self, f: Family) -> &mut Ranges {
        match f {
            Family::V4 => &mut self.v4,
            Family::V6 => &mut self.v6,
        }
    }

    fn add_ip(&mut self, ip: &IpAddr) {
        let n = ip_num(ip);
        self.fam(Family::of(ip)).add(n, n);
    }

    fn add_net(&mut self, n: &IpNet) {
        let (lo, hi) = bounds(n);
        self.fam(family_of_net(n)).add(lo, hi);
    }

    fn remove_net(&mut self, n: &IpNet) {
        let (lo, hi) = bounds(n);
        self.fam(family_of_net(n)).remove(lo, hi);
    }

    fn extend(&mut self, o: &Addrs) {
        self.v4.extend(&o.v4);
        self.v6.extend(&o.v6);
    }

    fn contains(&self, ip: &IpAddr) -> bool {
        match Family::of(ip) {
            Family::V4 => self.v4.contains(ip_num(ip)),
            Family::V6 => self.v6.contains(ip_num(ip)),
        }
    }
}

fn family_of_net(n: &IpNet) -> Family {
    match n {
        IpNet::V4(_) => Family::V4,
        IpNet::V6(_) => Family::V6,
    }
}

/// A chain or set name: readable when short, else a stable digest (the kernel's limit is 256).
fn name(prefix: &str, key: &str) -> String {
    let n = format!("{prefix}/{key}");
    if n.len() <= 200 {
        return n;
    }
    // FNV-1a: stable across runs and builds.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in key.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{prefix}/#{h:016x}")
}

/// Builds the program's sets, numbering them.
struct Sets {
    sets: Vec<AddrSet>,
}

impl Sets {
    /// The set of `f` addresses in `a` (None when there are none: a rule on it cannot match).
    fn add(&mut self, a: &Addrs, f: Family) -> Option<String> {
        let r = match f {
            Family::V4 => &a.v4,
            Family::V6 => &a.v6,
        };
        if r.0.is_empty() {
            return None;
        }
        let ranges: Vec<(IpAddr, IpAddr)> =
            r.0.iter()
                .map(|&(lo, hi)| (num_ip(f, lo), num_ip(f, hi)))
                .collect();
        // The same addresses again (a policy's rules often share peers): one set.
        if let Some(s) = self
            .sets
            .iter()
            .find(|s| s.family == f && s.ranges == ranges)
        {
            return Some(s.name.clone());
        }
        let name = format!("s{}", self.sets.len());
        self.sets.push(AddrSet {
            name: name.clone(),
            family: f,
            ranges,
        });
        Some(name)
    }
}

/// The local pods a policy selects, with their addresses.
type Selected<'a> = Vec<(&'a PodInfo, Vec<IpAddr>)>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Ingress,
    Egress,
}

struct Ctx<'a> {
    state: &'a State,
    /// Every pod's addresses: a local pod's from the CNI plugin, others' from the API server.
    ips: BTreeMap<String, Vec<IpAddr>>,
}

impl Ctx<'_> {
    /// Pods a selector may pick: not hostNetwork, not finished, with an address.
    fn pods(&self) -> impl Iterator<Item = (&PodInfo, &Vec<IpAddr>)> {
        self.state.pods.values().filter_map(|p| {
            if p.host_network || p.finished {
                return None;
            }
            let ips = self.ips.get(&p.key())?;
            (!ips.is_empty()).then_some((p, ips))
        })
    }

    fn peer_addrs(&self, policy_ns: &str, peers: &[Peer]) -> Addrs {
        let mut a = Addrs::default();
        for peer in peers {
            match peer {
                Peer::Block(b) => {
                    let mut block = Addrs::default();
                    block.add_net(&b.cidr);
                    for e in &b.except {
                        block.remove_net(e);
                    }
                    a.extend(&block);
                }
                Peer::Pods { pod, namespace } => {
                    for (p, ips) in self.pods() {
                        let ns_ok = match namespace {
                            None => p.namespace == policy_ns,
                            Some(sel) => self
                                .state
                                .namespaces
                                .get(&p.namespace)
                                .is_some_and(|l| sel.matches(l)),
                        };
                        if ns_ok && pod.matches(&p.labels) {
                            for ip in ips {
                                a.add_ip(ip);
                            }
                        }
                    }
                }
            }
        }
        a
    }
}

/// The rules of one policy rule, for one direction.
fn rule_rules(
    ctx: &Ctx,
    sets: &mut Sets,
    policy: &Policy,
    rule: &PolicyRule,
    dir: Dir,
    selected: &[(&PodInfo, Vec<IpAddr>)],
    out: &mut Vec<Rule>,
) {
    let peers = rule
        .peers
        .as_ref()
        .map(|p| ctx.peer_addrs(&policy.namespace, p));
    let accept = |matches: Vec<Match>| Rule {
        matches,
        counter: None,
        verdict: Verdict::Accept,
    };
    for f in [Family::V4, Family::V6] {
        // The peer condition: None = any peer; Some(None) = no peer of this family (skip).
        let peer_match = match &peers {
            None => None,
            Some(a) => match sets.add(a, f) {
                Some(s) => Some(match dir {
                    Dir::Ingress => Match::Saddr(s),
                    Dir::Egress => Match::Daddr(s),
                }),
                None => continue,
            },
        };
        let with_peer = |mut m: Vec<Match>| {
            if let Some(p) = &peer_match {
                m.insert(0, p.clone());
            }
            m
        };
        if rule.ports.is_empty() {
            out.push(accept(with_peer(Vec::new())));
            continue;
        }
        for port in &rule.ports {
            match &port.port {
                PortSpec::Any => out.push(accept(with_peer(vec![Match::Proto(port.proto)]))),
                PortSpec::Range(lo, hi) => out.push(accept(with_peer(vec![
                    Match::Proto(port.proto),
                    Match::Dport { lo: *lo, hi: *hi },
                ]))),
                PortSpec::Named(pname) => {
                    // The destination pods that have the name, by the number it stands for.
                    let mut by_port: BTreeMap<u16, Addrs> = BTreeMap::new();
                    match dir {
                        Dir::Ingress => {
                            for (p, ips) in selected {
                                if let Some(n) = p.named_port(pname, port.proto) {
                                    for ip in ips {
                                        by_port.entry(n).or_default().add_ip(ip);
                                    }
                                }
                            }
                        }
                        Dir::Egress => {
                            for (p, ips) in ctx.pods() {
                                let Some(n) = p.named_port(pname, port.proto) else {
                                    continue;
                                };
                                for ip in ips {
                                    if peers.as_ref().is_none_or(|a| a.contains(ip)) {
                                        by_port.entry(n).or_default().add_ip(ip);
                                    }
                                }
                            }
                        }
                    }
                    for (n, dst) in by_port {
                        let Some(dset) = sets.add(&dst, f) else {
                            continue;
                        };
                        let mut m = vec![
                            Match::Daddr(dset),
                            Match::Proto(port.proto),
                            Match::Dport { lo: n, hi: n },
                        ];
                        // Egress: the destination set is already within the peers.
                        if dir == Dir::Ingress {
                            if let Some(p) = &peer_match {
                                m.insert(0, p.clone());
                            }
                        }
                        out.push(accept(m));
                    }
                }
            }
        }
    }
}

/// Compiles the program for a node whose pod ranges are `pod_ranges` and whose attached pods
/// are `local`. `counters` holds the drop counters of the program in force, by chain name
/// (and [`GUARD4`] for the guard), so the new program starts from them.
pub fn compile(
    state: &State,
    pod_ranges: &[IpNet],
    local: &[LocalPod],
    counters: &BTreeMap<String, Counter>,
) -> Compiled {
    let mut ips: BTreeMap<String, Vec<IpAddr>> = state
        .pods
        .values()
        .map(|p| (p.key(), p.ips.clone()))
        .collect();
    for l in local {
        if !l.ips.is_empty() {
            ips.insert(l.key(), l.ips.clone());
        }
    }
    let ctx = Ctx { state, ips };
    let mut sets = Sets { sets: Vec::new() };
    let mut program = Program::default();
    let mut pods = Vec::new();

    // Local pods and the policies that select them.
    let mut guard = Addrs::default();
    for n in pod_ranges {
        guard.add_net(n);
    }
    // Policy chains needed: (policy key, dir) -> pods selected (with their addresses).
    let mut needed: BTreeMap<(String, bool), Selected> = BTreeMap::new();
    for l in local {
        let info = state
            .pods
            .get(&l.key())
            .filter(|p| !p.host_network && !p.finished);
        let mut pp = PodPolicies {
            namespace: l.namespace.clone(),
            name: l.name.clone(),
            ips: l.ips.clone(),
            placed: info.is_some(),
            ingress: Vec::new(),
            egress: Vec::new(),
            ingress_chain: None,
            egress_chain: None,
        };
        let Some(info) = info else {
            pods.push(pp);
            continue;
        };
        for ip in &l.ips {
            guard.fam(Family::of(ip)).remove(ip_num(ip), ip_num(ip));
        }
        for pol in state.policies.values() {
            if pol.namespace != l.namespace || !pol.selector.matches(&info.labels) {
                continue;
            }
            if pol.ingress.is_some() {
                pp.ingress.push(pol.key());
                needed
                    .entry((pol.key(), true))
                    .or_default()
                    .push((info, l.ips.clone()));
            }
            if pol.egress.is_some() {
                pp.egress.push(pol.key());
                needed
                    .entry((pol.key(), false))
                    .or_default()
                    .push((info, l.ips.clone()));
            }
        }
        for key in state.refused.keys() {
            if key.split('/').next() == Some(l.namespace.as_str()) {
                pp.ingress.push(key.clone());
            }
        }
        for (ingress, list, map) in [
            (true, &pp.ingress, &mut program.ingress),
            (false, &pp.egress, &mut program.egress),
        ] {
            if list.is_empty() {
                continue;
            }
            let chain_name = name(if ingress { "in" } else { "eg" }, &l.key());
            let mut rules: Vec<Rule> = list
                .iter()
                .filter(|k| state.policies.contains_key(*k))
                .map(|k| Rule {
                    matches: Vec::new(),
                    counter: None,
                    verdict: Verdict::Jump(name(if ingress { "pol-in" } else { "pol-eg" }, k)),
                })
                .collect();
            rules.push(Rule {
                matches: Vec::new(),
                counter: Some(counters.get(&chain_name).copied().unwrap_or_default()),
                verdict: Verdict::Drop,
            });
            for ip in &l.ips {
                // An address is one pod's: a second local pod claiming it (a stale API
                // object) gets no entry, else the kernel would refuse the whole map.
                if map.iter().any(|(m, _)| m == ip) {
                    continue;
                }
                map.push((*ip, chain_name.clone()));
            }
            program.chains.push(Chain {
                name: chain_name.clone(),
                rules,
            });
            if ingress {
                pp.ingress_chain = Some(chain_name);
            } else {
                pp.egress_chain = Some(chain_name);
            }
        }
        pods.push(pp);
    }

    for ((key, ingress), selected) in &needed {
        let Some(pol) = state.policies.get(key) else {
            continue;
        };
        let (dir, rules, prefix) = if *ingress {
            (Dir::Ingress, pol.ingress.as_deref(), "pol-in")
        } else {
            (Dir::Egress, pol.egress.as_deref(), "pol-eg")
        };
        let mut out = Vec::new();
        for rule in rules.unwrap_or(&[]) {
            rule_rules(&ctx, &mut sets, pol, rule, dir, selected, &mut out);
        }
        program.chains.push(Chain {
            name: name(prefix, key),
            rules: out,
        });
    }

    program.sets = sets.sets;
    for (f, n) in [(Family::V4, GUARD4), (Family::V6, GUARD6)] {
        let r = match f {
            Family::V4 => &guard.v4,
            Family::V6 => &guard.v6,
        };
        program.sets.push(AddrSet {
            name: n.to_string(),
            family: f,
            ranges: r
                .0
                .iter()
                .map(|&(lo, hi)| (num_ip(f, lo), num_ip(f, hi)))
                .collect(),
        });
    }
    program.guard_counter = counters.get(GUARD4).copied().unwrap_or_default();
    // Deterministic order (the same state compiles to the same program).
    program.ingress.sort();
    program.egress.sort();
    Compiled { program, pods }
}
