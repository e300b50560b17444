//! Reconcile: desired peers (from node records and external peer records) against applied
//! peers, as commands.
//!
//! Changing one peer's key, endpoints or CIDRs yields one `Update` for that peer alone, so no
//! other peer is disturbed. Node records take precedence over external peers
//! ([`desired_peer_set`]).

use crate::external::{check_against, ExternalError, ExternalPeer, Owner};
use crate::keys::PublicKey;
use crate::peer::{PeerConfig, PeerKind, PeerPsk};
use crate::record::{validate_against, NodeRecord, RecordError};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Add(PeerConfig),
    Update(PeerConfig),
    Remove(String),
}

/// The peer a record describes, as node `own` sees it: the endpoints it may use in order (the
/// peer's private endpoints first when both nodes name the same location, then its public
/// ones), and whether `own` reaches it through NAT (`own` publishes no public endpoint and
/// uses no private endpoint of the peer: its links then need persistent keepalives to keep the
/// NAT mapping open).
pub fn peer_config(own: &NodeRecord, r: &NodeRecord) -> PeerConfig {
    let same_location = own.location.is_some() && own.location == r.location;
    let private: Vec<SocketAddr> = if same_location {
        r.private_endpoints.clone()
    } else {
        Vec::new()
    };
    let mut endpoints = private.clone();
    for ep in &r.endpoints {
        if !endpoints.contains(ep) {
            endpoints.push(*ep);
        }
    }
    PeerConfig {
        name: r.name.clone(),
        kind: PeerKind::Node,
        public_key: r.public_key,
        next_public_key: r.next_public_key,
        endpoints,
        private_endpoints: private,
        location: r.location.clone(),
        through_nat: own.endpoints.is_empty() && !same_location_private(own, r),
        relay: r.relay && !r.endpoints.is_empty(),
        allowed_ips: r.pod_cidrs.clone(),
        key_generation: r.key_generation,
        psk: PeerPsk::Cluster(r.psk_generation),
    }
}

/// Whether `own` reaches `r` on a private endpoint (same location, and `r` names one).
fn same_location_private(own: &NodeRecord, r: &NodeRecord) -> bool {
    own.location.is_some() && own.location == r.location && !r.private_endpoints.is_empty()
}

/// Picks the records this node will peer with: never its own name, never a record that
/// conflicts with this node's own record or with one accepted before it (records taken in
/// name order, so every node reaches the same verdict about two foreign records).
/// Returns the peers and the refused records with their reason.
///
/// O(n log n): a record is compared with every accepted one ([`validate_against`], for the exact
/// reason) only when an index of the accepted ranges, endpoints and keys shows a conflict.
pub fn desired_peers(
    own: &NodeRecord,
    records: impl IntoIterator<Item = NodeRecord>,
) -> (Vec<PeerConfig>, Vec<(String, RecordError)>) {
    let s = select_nodes(own, records);
    let peers = s
        .accepted
        .iter()
        .skip(1)
        .map(|r| peer_config(own, r))
        .collect();
    (peers, s.refused)
}

/// The peers this node wants, node records and external peers together, with what was refused.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DesiredPeers {
    /// Node peers first (by name), then external peers (by name).
    pub peers: Vec<PeerConfig>,
    pub refused_nodes: Vec<(String, RecordError)>,
    pub refused_external: Vec<(String, ExternalError)>,
}

/// [`desired_peers`] plus the external peers: node records are picked first and take precedence,
/// then each external peer (in name order) is accepted only if it conflicts with no accepted node
/// (this node included) and no external peer accepted before it ([`check_against`]: name, keys,
/// overlapping ranges, ranges holding an endpoint), and its name is not the name of any node
/// record (accepted or not), so names stay unique across both kinds.
pub fn desired_peer_set(
    own: &NodeRecord,
    records: impl IntoIterator<Item = NodeRecord>,
    externals: impl IntoIterator<Item = ExternalPeer>,
) -> DesiredPeers {
    let records: Vec<NodeRecord> = records.into_iter().collect();
    let node_names: BTreeSet<String> = records
        .iter()
        .map(|r| r.name.clone())
        .chain(std::iter::once(own.name.clone()))
        .collect();
    let Selection {
        accepted,
        refused: refused_nodes,
        mut keys,
        mut index,
    } = select_nodes(own, records);
    // Next keys of accepted nodes are taken too (a handshake from one finds that node).
    let own_next = own.next_public_key.map(|k| (k, 0));
    keys.extend(
        accepted
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.next_public_key.map(|k| (k, i)))
            .chain(own_next),
    );
    let mut externals: Vec<ExternalPeer> = externals.into_iter().collect();
    externals.sort_by(|a, b| a.name.cmp(&b.name));
    let mut taken: Vec<ExternalPeer> = Vec::new();
    let mut refused_external = Vec::new();
    for p in externals {
        let verdict = if node_names.contains(&p.name) {
            Err(ExternalError::NameTaken {
                name: p.name.clone(),
                owner: Owner::Node(p.name.clone()),
            })
        } else if let Some(node) = keys.get(&p.public_key).and_then(|&i| accepted.get(i)) {
            Err(ExternalError::KeyTaken {
                key: p.public_key.fingerprint(),
                owner: Owner::Node(node.name.clone()),
            })
        } else if index.may_conflict(&p.allowed_ips, p.endpoint.as_slice())
            || taken.iter().any(|t| t.public_key == p.public_key)
        {
            check_against(&p, &accepted, &taken)
        } else {
            Ok(())
        };
        match verdict {
            Ok(()) => {
                index.insert(&p.allowed_ips, p.endpoint.as_slice());
                taken.push(p);
            }
            Err(e) => refused_external.push((p.name.clone(), e)),
        }
    }
    let peers = accepted
        .iter()
        .skip(1)
        .map(|r| peer_config(own, r))
        .chain(taken.iter().map(ExternalPeer::peer_config))
        .collect();
    DesiredPeers {
        peers,
        refused_nodes,
        refused_external,
    }
}

/// The node records taken (this node's own first), the refused ones, and the index of what the
/// taken ones route.
struct Selection {
    accepted: Vec<NodeRecord>,
    refused: Vec<(String, RecordError)>,
    /// Key -> position in `accepted` (accepted keys are distinct).
    keys: HashMap<PublicKey, usize>,
    index: ConflictIndex,
}

fn endpoints_of(r: &NodeRecord) -> Vec<SocketAddr> {
    r.all_endpoints().copied().collect()
}

fn select_nodes(own: &NodeRecord, records: impl IntoIterator<Item = NodeRecord>) -> Selection {
    let mut records: Vec<NodeRecord> = records.into_iter().filter(|r| r.name != own.name).collect();
    records.sort_by(|a, b| a.name.cmp(&b.name));
    let mut accepted: Vec<NodeRecord> = vec![own.clone()];
    let mut keys: HashMap<PublicKey, usize> = HashMap::from([(own.public_key, 0)]);
    let mut index = ConflictIndex::new();
    index.insert(&own.pod_cidrs, &endpoints_of(own));
    let mut refused = Vec::new();
    for r in records {
        if r.public_key == own.public_key {
            refused.push((
                r.name.clone(),
                RecordError::Field {
                    field: "publicKey",
                    reason: format!("same key as this node ({})", own.name),
                },
            ));
            continue;
        }
        if let Some(dup) = keys.get(&r.public_key).and_then(|&i| accepted.get(i)) {
            refused.push((
                r.name.clone(),
                RecordError::Field {
                    field: "publicKey",
                    reason: format!("same key as node {}", dup.name),
                },
            ));
            continue;
        }
        let verdict = if index.may_conflict(&r.pod_cidrs, &endpoints_of(&r)) {
            validate_against(&r, &accepted)
        } else {
            Ok(())
        };
        match verdict {
            Ok(()) => {
                keys.insert(r.public_key, accepted.len());
                index.insert(&r.pod_cidrs, &endpoints_of(&r));
                accepted.push(r);
            }
            Err(e) => refused.push((r.name.clone(), e)),
        }
    }
    Selection {
        accepted,
        refused,
        keys,
        index,
    }
}

/// The pod ranges and endpoint addresses of the accepted records, to tell in O(log n) whether a
/// record may conflict with any of them ([`validate_against`]'s checks: overlapping ranges, a
/// range containing an endpoint, either way round). It never misses a conflict; a hit is then
/// checked exactly.
struct ConflictIndex {
    /// Accepted ranges as first -> last address. Prefixes either nest or are disjoint; while these
    /// are disjoint, the only one that can reach an address is the last one starting at or before
    /// it.
    ranges: BTreeMap<IpAddr, IpAddr>,
    endpoints: BTreeSet<IpAddr>,
    /// False once two indexed ranges meet (possible only within one record, which is not
    /// checked against itself): then every record is checked exactly.
    exact: bool,
}

impl ConflictIndex {
    fn new() -> Self {
        ConflictIndex {
            ranges: BTreeMap::new(),
            endpoints: BTreeSet::new(),
            exact: true,
        }
    }

    /// Whether an indexed range meets [first, last] (same address family).
    fn range_meets(&self, first: IpAddr, last: IpAddr) -> bool {
        self.ranges.range(first..=last).next().is_some()
            || self
                .ranges
                .range(..first)
                .next_back()
                .is_some_and(|(_, end)| *end >= first)
    }

    /// Whether a party routing `cidrs` with underlay `endpoints` may conflict with an indexed one.
    fn may_conflict(&self, cidrs: &[IpNet], endpoints: &[SocketAddr]) -> bool {
        if !self.exact {
            return true;
        }
        cidrs.iter().any(|c| {
            let (first, last) = (c.network(), c.broadcast());
            self.range_meets(first, last) || self.endpoints.range(first..=last).next().is_some()
        }) || endpoints
            .iter()
            .any(|ep| self.range_meets(ep.ip(), ep.ip()))
    }

    fn insert(&mut self, cidrs: &[IpNet], endpoints: &[SocketAddr]) {
        for c in cidrs {
            let (first, last) = (c.network(), c.broadcast());
            if self.range_meets(first, last) {
                self.exact = false;
            }
            self.ranges.insert(first, last);
        }
        self.endpoints.extend(endpoints.iter().map(|e| e.ip()));
    }
}

/// Commands that turn `applied` into `desired`. Removes come first, so a key or range that
/// moves from one peer to another is free before it is claimed.
pub fn plan<'a>(
    desired: &[PeerConfig],
    applied: impl IntoIterator<Item = &'a PeerConfig>,
) -> Vec<Command> {
    let applied: BTreeMap<&str, &PeerConfig> =
        applied.into_iter().map(|p| (p.name.as_str(), p)).collect();
    let want: BTreeMap<&str, &PeerConfig> = desired.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut cmds = Vec::new();
    for name in applied.keys() {
        if !want.contains_key(name) {
            cmds.push(Command::Remove((*name).to_string()));
        }
    }
    // A peer whose key now belongs to a different applied peer must go first too.
    for (name, cfg) in &want {
        match applied.get(name) {
            None => cmds.push(Command::Add((*cfg).clone())),
            Some(cur) if *cur != *cfg => cmds.push(Command::Update((*cfg).clone())),
            Some(_) => {}
        }
    }
    cmds
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;
    use crate::record::SCHEMA_VERSION;

    fn rec(name: &str, i: u8) -> NodeRecord {
        NodeRecord {
            schema: SCHEMA_VERSION,
            name: name.into(),
            public_key: PrivateKey::generate().public_key(),
            endpoints: vec![format!("198.18.0.{}:51820", 10 + i).parse().expect("ep")],
            private_endpoints: Vec::new(),
            location: None,
            relay: false,
            pod_cidrs: vec![format!("10.42.{i}.0/24").parse().expect("cidr")],
            key_generation: 1,
            next_public_key: None,
            key_created_at: 0,
            psk_generation: None,
        }
    }

    /// Private endpoints go to the nodes of the same location only, before the public ones;
    /// a node with no public endpoint reaches other locations through NAT.
    #[test]
    fn endpoints_by_location() {
        let rec = |name: &str, public: &[&str], private: &[&str], loc: Option<&str>, net: &str| {
            let mut r: NodeRecord = NodeRecord::from_json(
                serde_json::json!({
                    "schema": 1, "name": name,
                    "publicKey": crate::keys::PrivateKey::generate().public_key().to_base64(),
                    "endpoints": public, "podCidrs": [net],
                })
                .to_string()
                .as_bytes(),
            )
            .expect("record");
            r.private_endpoints = private.iter().map(|e| e.parse().expect("ep")).collect();
            r.location = loc.map(String::from);
            r
        };
        let a = rec(
            "a",
            &["203.0.113.1:51820"],
            &["10.0.0.1:51820"],
            Some("eu"),
            "10.42.1.0/24",
        );
        let b = rec(
            "b",
            &["203.0.113.2:51820"],
            &["10.0.0.2:51820"],
            Some("eu"),
            "10.42.2.0/24",
        );
        let c = rec(
            "c",
            &["198.51.100.3:51820"],
            &["10.1.0.3:51820"],
            Some("us"),
            "10.42.3.0/24",
        );
        let nat = rec(
            "n",
            &[],
            &["192.168.1.10:51820"],
            Some("edge"),
            "10.42.4.0/24",
        );
        let old = rec("o", &["192.0.2.5:51820"], &[], None, "10.42.5.0/24");
        let eps = |own: &NodeRecord, r: &NodeRecord| -> Vec<String> {
            peer_config(own, r)
                .endpoints
                .iter()
                .map(|e| e.to_string())
                .collect()
        };
        assert_eq!(eps(&a, &b), ["10.0.0.2:51820", "203.0.113.2:51820"]);
        assert_eq!(peer_config(&a, &b).private_endpoints.len(), 1);
        assert_eq!(eps(&a, &c), ["198.51.100.3:51820"]);
        assert_eq!(eps(&a, &nat), Vec::<String>::new());
        assert_eq!(
            eps(&old, &a),
            ["203.0.113.1:51820"],
            "no location: public only"
        );
        assert_eq!(peer_config(&a, &old).location, None);
        assert!(!peer_config(&a, &c).through_nat);
        assert!(
            peer_config(&nat, &a).through_nat,
            "the NAT'd node keeps its mapping open"
        );
        let nat2 = rec(
            "m",
            &[],
            &["192.168.1.11:51820"],
            Some("edge"),
            "10.42.6.0/24",
        );
        assert!(
            !peer_config(&nat, &nat2).through_nat,
            "same site: private, no NAT"
        );
        assert_eq!(eps(&nat, &nat2), ["192.168.1.11:51820"]);
        // Through desired_peers too.
        let (peers, refused) = desired_peers(&nat, vec![a.clone(), nat2.clone()]);
        assert!(refused.is_empty());
        assert_eq!(peers.len(), 2);
        assert!(peers.iter().any(|p| p.name == "a" && p.through_nat));
    }

    #[test]
    fn add_update_remove_touch_only_changed_peers() {
        let own = rec("a", 1);
        let b = rec("b", 2);
        let c = rec("c", 3);
        let (peers, refused) = desired_peers(&own, vec![own.clone(), b.clone(), c.clone()]);
        assert!(refused.is_empty());
        let cmds = plan(&peers, []);
        assert_eq!(cmds.len(), 2);
        assert!(cmds.iter().all(|c| matches!(c, Command::Add(_))));

        // Change only b's key: one Update for b, nothing for c.
        let mut b2 = b.clone();
        b2.public_key = PrivateKey::generate().public_key();
        let (peers2, _) = desired_peers(&own, vec![b2.clone(), c.clone()]);
        let cmds = plan(&peers2, &peers);
        assert_eq!(cmds, vec![Command::Update(peer_config(&own, &b2))]);

        // c disappears: one Remove.
        let (peers3, _) = desired_peers(&own, vec![b2.clone()]);
        assert_eq!(plan(&peers3, &peers2), vec![Command::Remove("c".into())]);
        assert!(plan(&peers3, &peers3).is_empty());
    }

    #[test]
    fn conflicting_records_refused() {
        let own = rec("a", 1);
        let mut thief = rec("b", 2);
        thief.pod_cidrs = own.pod_cidrs.clone();
        let mut dup_key = rec("c", 3);
        dup_key.public_key = own.public_key;
        let good = rec("d", 4);
        let (peers, refused) = desired_peers(&own, vec![thief, dup_key, good.clone()]);
        assert_eq!(peers, vec![peer_config(&own, &good)]);
        let names: Vec<&str> = refused.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["b", "c"]);
    }

    /// The straightforward O(n^2) selection `desired_peers` must agree with.
    fn desired_peers_naive(
        own: &NodeRecord,
        records: Vec<NodeRecord>,
    ) -> (Vec<PeerConfig>, Vec<(String, RecordError)>) {
        let mut records: Vec<NodeRecord> =
            records.into_iter().filter(|r| r.name != own.name).collect();
        records.sort_by(|a, b| a.name.cmp(&b.name));
        let mut accepted: Vec<NodeRecord> = vec![own.clone()];
        let mut refused = Vec::new();
        for r in records {
            if r.public_key == own.public_key {
                refused.push((
                    r.name.clone(),
                    RecordError::Field {
                        field: "publicKey",
                        reason: format!("same key as this node ({})", own.name),
                    },
                ));
                continue;
            }
            if let Some(dup) = accepted.iter().find(|a| a.public_key == r.public_key) {
                refused.push((
                    r.name.clone(),
                    RecordError::Field {
                        field: "publicKey",
                        reason: format!("same key as node {}", dup.name),
                    },
                ));
                continue;
            }
            match validate_against(&r, &accepted) {
                Ok(()) => accepted.push(r),
                Err(e) => refused.push((r.name.clone(), e)),
            }
        }
        (
            accepted
                .iter()
                .skip(1)
                .map(|r| peer_config(own, r))
                .collect(),
            refused,
        )
    }

    /// Random record sets full of conflicts (nested and equal ranges, endpoints inside ranges,
    /// shared keys and names, both families, odd records with two ranges of one family): the
    /// indexed selection gives exactly the naive one's peers and refusals with their reasons.
    #[test]
    fn indexed_selection_matches_naive() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        let keys: Vec<_> = (0..12)
            .map(|_| PrivateKey::generate().public_key())
            .collect();
        let pick_cidr = |next: &mut dyn FnMut(u64) -> u64| -> ipnet::IpNet {
            let (a, b, c) = (next(2), next(4), next(4) * 64);
            let s = match next(6) {
                0 => format!("10.{a}.0.0/16"),
                1 => format!("10.{a}.{b}.0/24"),
                2 => format!("10.{a}.{b}.{c}/26"),
                3 => format!("10.{a}.{b}.{}/28", c + 16 * next(4)),
                4 => format!("fd00:{a}::/48"),
                _ => format!("fd00:{a}:{b}::/64"),
            };
            s.parse().expect("cidr")
        };
        let mk = |name: String, next: &mut dyn FnMut(u64) -> u64| {
            let mut pod_cidrs = vec![pick_cidr(next)];
            if next(4) == 0 {
                pod_cidrs.push(pick_cidr(next));
            }
            let endpoints = (0..=next(2))
                .map(|_| {
                    let s = match next(4) {
                        0 => format!("10.{}.{}.{}:51820", next(2), next(4), next(256)),
                        1 => format!("[fd00:{}:{}::7]:51820", next(2), next(4)),
                        _ => format!("198.18.0.{}:51820", next(250)),
                    };
                    s.parse().expect("endpoint")
                })
                .collect();
            NodeRecord {
                schema: SCHEMA_VERSION,
                name,
                public_key: keys[next(keys.len() as u64) as usize],
                endpoints,
                private_endpoints: Vec::new(),
                location: None,
                relay: false,
                pod_cidrs,
                key_generation: 1,
                next_public_key: None,
                key_created_at: 0,
                psk_generation: None,
            }
        };
        let (mut accepted, mut refused) = (0, 0);
        for round in 0..400 {
            let own = mk(format!("n{}", next(30)), &mut next);
            let n = 1 + next(40);
            let records: Vec<NodeRecord> = (0..n)
                .map(|_| mk(format!("n{}", next(30)), &mut next))
                .collect();
            let fast = desired_peers(&own, records.clone());
            let naive = desired_peers_naive(&own, records);
            assert_eq!(fast, naive, "round {round}");
            accepted += fast.0.len();
            refused += fast.1.len();
        }
        // Both verdicts are common, so both paths were taken.
        assert!(accepted > 1000 && refused > 1000, "{accepted} {refused}");
    }

    fn ext(name: &str, cidr: &str) -> ExternalPeer {
        ExternalPeer {
            schema: crate::external::SCHEMA_VERSION,
            name: name.into(),
            public_key: PrivateKey::generate().public_key(),
            allowed_ips: vec![cidr.parse().expect("cidr")],
            endpoint: None,
            created_at: 0,
            config_keys: BTreeMap::new(),
            config_printed_at: 0,
        }
    }

    #[test]
    fn external_peers_join_after_nodes_and_conflicts_are_refused() {
        let own = rec("a", 1);
        let b = rec("b", 2);
        let laptop = ext("laptop", "10.99.0.1/32");
        // Overlaps node b's pod range: refused naming b, even though b sorts after it.
        let thief = ext("aaa-thief", "10.42.2.128/25");
        // Overlaps this node's own range.
        let greedy = ext("greedy", "10.42.0.0/16");
        // Overlaps laptop, which sorts first and wins.
        let late = ext("next-laptop", "10.99.0.0/24");
        // A node's name; and a node's key.
        let named = ext("b", "10.98.0.0/24");
        let mut same_key = ext("vm", "10.97.0.0/24");
        same_key.public_key = b.public_key;
        // Allowed IPs holding a node's underlay endpoint.
        let underlay = ext("underlay", "198.18.0.0/24");
        let d = desired_peer_set(
            &own,
            vec![own.clone(), b.clone()],
            vec![
                late.clone(),
                laptop.clone(),
                thief,
                greedy,
                named,
                same_key,
                underlay,
            ],
        );
        assert_eq!(d.peers, vec![peer_config(&own, &b), laptop.peer_config()]);
        assert!(d.refused_nodes.is_empty());
        let why: BTreeMap<&str, String> = d
            .refused_external
            .iter()
            .map(|(n, e)| (n.as_str(), e.to_string()))
            .collect();
        assert_eq!(
            why.keys().copied().collect::<Vec<_>>(),
            ["aaa-thief", "b", "greedy", "next-laptop", "underlay", "vm"]
        );
        assert!(why["aaa-thief"].contains("node b"), "{why:?}");
        assert!(why["greedy"].contains("node a"), "{why:?}");
        assert!(
            why["next-laptop"].contains("external peer laptop"),
            "{why:?}"
        );
        assert!(why["b"].contains("node b"), "{why:?}");
        assert!(why["vm"].contains("publicKey"), "{why:?}");
        assert!(why["underlay"].contains("endpoint"), "{why:?}");

        // Node records take precedence: a node that appears later with an overlapping range is
        // taken and the external peer dropped (one Remove, one Add).
        let mut c = rec("c", 3);
        c.pod_cidrs = vec!["10.99.0.0/24".parse().expect("cidr")];
        let d2 = desired_peer_set(&own, vec![b.clone(), c.clone()], vec![laptop.clone()]);
        assert_eq!(d2.peers, vec![peer_config(&own, &b), peer_config(&own, &c)]);
        assert_eq!(d2.refused_external.len(), 1);
        let cmds = plan(&d2.peers, &d.peers);
        assert_eq!(
            cmds,
            vec![
                Command::Remove("laptop".into()),
                Command::Add(peer_config(&own, &c))
            ]
        );
        // A rotating node's next key is taken as well.
        let mut rot = b.clone();
        let next = PrivateKey::generate().public_key();
        rot.next_public_key = Some(next);
        let mut thief_key = ext("laptop", "10.99.0.1/32");
        thief_key.public_key = next;
        let d3 = desired_peer_set(&own, vec![rot], vec![thief_key]);
        assert_eq!(d3.peers.len(), 1);
        assert_eq!(d3.refused_external[0].1.field(), Some("publicKey"));
        // Without externals it is desired_peers.
        let d4 = desired_peer_set(&own, vec![b.clone()], vec![]);
        assert_eq!(d4.peers, desired_peers(&own, vec![b]).0);
    }

    /// The indexed external selection agrees with checking every external against every
    /// accepted node and external, on random sets full of conflicts.
    #[test]
    fn indexed_external_selection_matches_naive() {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        let keys: Vec<_> = (0..10)
            .map(|_| PrivateKey::generate().public_key())
            .collect();
        let (mut accepted, mut refused) = (0, 0);
        for round in 0..300 {
            let own = rec("n0", 1);
            let nodes: Vec<NodeRecord> = (0..next(6))
                .map(|i| {
                    let mut r = rec(&format!("n{}", i + 1), 2 + next(6) as u8);
                    if next(4) == 0 {
                        r.public_key = keys[next(keys.len() as u64) as usize];
                    }
                    r
                })
                .collect();
            let externals: Vec<ExternalPeer> = (0..1 + next(8))
                .map(|_| {
                    let name = match next(5) {
                        0 => format!("n{}", next(4)),
                        _ => format!("e{}", next(10)),
                    };
                    let cidr = match next(4) {
                        0 => format!("10.42.{}.0/25", next(8)),
                        1 => format!("10.99.{}.0/24", next(3)),
                        2 => format!("10.99.0.{}/32", next(4)),
                        _ => format!("198.18.0.{}/32", 10 + next(8)),
                    };
                    let mut p = ext(&name, &cidr);
                    p.public_key = keys[next(keys.len() as u64) as usize];
                    if next(3) == 0 {
                        p.endpoint = Some(
                            format!("10.99.{}.9:4000", next(3))
                                .parse()
                                .expect("endpoint"),
                        );
                    }
                    p
                })
                .collect();
            // Names are unique within a collection.
            let mut externals: Vec<ExternalPeer> = externals
                .into_iter()
                .map(|p| (p.name.clone(), p))
                .collect::<BTreeMap<_, _>>()
                .into_values()
                .collect();
            externals.retain(|p| p.check().is_ok());
            let fast = desired_peer_set(&own, nodes.clone(), externals.clone());
            // Naive: the accepted node records, then each external against all of them.
            let (node_peers, _) = desired_peers(&own, nodes.clone());
            let mut taken_nodes: Vec<NodeRecord> = vec![own.clone()];
            taken_nodes.extend(
                nodes
                    .iter()
                    .filter(|n| node_peers.iter().any(|p| p.name == n.name))
                    .cloned(),
            );
            let mut taken: Vec<ExternalPeer> = Vec::new();
            let mut naive_refused = Vec::new();
            for p in externals {
                let v = if nodes.iter().any(|n| n.name == p.name) || p.name == own.name {
                    Err(())
                } else {
                    check_against(&p, &taken_nodes, &taken).map_err(|_| ())
                };
                match v {
                    Ok(()) => taken.push(p),
                    Err(()) => naive_refused.push(p.name.clone()),
                }
            }
            let fast_ext: Vec<&str> = fast
                .peers
                .iter()
                .filter(|p| p.kind == PeerKind::External)
                .map(|p| p.name.as_str())
                .collect();
            let naive_ext: Vec<&str> = taken.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(fast_ext, naive_ext, "round {round}");
            let fast_refused: Vec<&str> = fast
                .refused_external
                .iter()
                .map(|(n, _)| n.as_str())
                .collect();
            assert_eq!(fast_refused, naive_refused, "round {round}");
            accepted += fast_ext.len();
            refused += fast_refused.len();
        }
        assert!(accepted > 200 && refused > 200, "{accepted} {refused}");
    }

    /// 1000 records that all pass, and then one that conflicts with the last of them.
    #[test]
    fn large_selection() {
        let own = rec("a", 1);
        let mut records: Vec<NodeRecord> = (0..1000u32)
            .map(|i| {
                let mut r = rec(&format!("b{i:04}"), 2);
                let net = std::net::Ipv4Addr::from(0x0a2a_1000 + i * 16);
                r.pod_cidrs = vec![format!("{net}/28").parse().expect("cidr")];
                r.endpoints = vec![format!("198.18.0.1:{}", 20_000 + i).parse().expect("ep")];
                r
            })
            .collect();
        let mut bad = rec("c", 3);
        bad.pod_cidrs = vec!["10.42.78.0/24".parse().expect("cidr")];
        records.push(bad);
        let (peers, refused) = desired_peers(&own, records);
        assert_eq!(peers.len(), 1000);
        assert_eq!(refused.len(), 1);
        assert!(
            matches!(&refused[0].1, RecordError::Overlap { other, .. } if other == "b0992"),
            "{refused:?}"
        );
    }
}
