//! Reconcile: desired peers (from registry records) against applied peers, as commands.
//!
//! Changing one peer's key, endpoints or CIDRs yields one `Update` for that peer alone, so no
//! other peer is disturbed.

use crate::keys::PublicKey;
use crate::peer::{PeerConfig, PeerPsk};
use crate::record::{validate_against, NodeRecord, RecordError};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Add(PeerConfig),
    Update(PeerConfig),
    Remove(String),
}

/// The peer a record describes.
pub fn peer_config(r: &NodeRecord) -> PeerConfig {
    PeerConfig {
        name: r.name.clone(),
        public_key: r.public_key,
        next_public_key: r.next_public_key,
        endpoints: r.endpoints.clone(),
        allowed_ips: r.pod_cidrs.clone(),
        key_generation: r.key_generation,
        psk: PeerPsk::Cluster(r.psk_generation),
    }
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
    let mut records: Vec<NodeRecord> = records.into_iter().filter(|r| r.name != own.name).collect();
    records.sort_by(|a, b| a.name.cmp(&b.name));
    let mut accepted: Vec<NodeRecord> = vec![own.clone()];
    // Key -> position in `accepted` (accepted keys are distinct).
    let mut keys: HashMap<PublicKey, usize> = HashMap::from([(own.public_key, 0)]);
    let mut index = ConflictIndex::new();
    index.insert(own);
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
        let verdict = if index.may_conflict(&r) {
            validate_against(&r, &accepted)
        } else {
            Ok(())
        };
        match verdict {
            Ok(()) => {
                keys.insert(r.public_key, accepted.len());
                index.insert(&r);
                accepted.push(r);
            }
            Err(e) => refused.push((r.name.clone(), e)),
        }
    }
    let peers = accepted.iter().skip(1).map(peer_config).collect();
    (peers, refused)
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

    fn may_conflict(&self, r: &NodeRecord) -> bool {
        if !self.exact {
            return true;
        }
        r.pod_cidrs.iter().any(|c| {
            let (first, last) = (c.network(), c.broadcast());
            self.range_meets(first, last) || self.endpoints.range(first..=last).next().is_some()
        }) || r
            .endpoints
            .iter()
            .any(|ep| self.range_meets(ep.ip(), ep.ip()))
    }

    fn insert(&mut self, r: &NodeRecord) {
        for c in &r.pod_cidrs {
            let (first, last) = (c.network(), c.broadcast());
            if self.range_meets(first, last) {
                self.exact = false;
            }
            self.ranges.insert(first, last);
        }
        self.endpoints.extend(r.endpoints.iter().map(|e| e.ip()));
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
            pod_cidrs: vec![format!("10.42.{i}.0/24").parse().expect("cidr")],
            key_generation: 1,
            next_public_key: None,
            key_created_at: 0,
            psk_generation: None,
        }
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
        assert_eq!(cmds, vec![Command::Update(peer_config(&b2))]);

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
        assert_eq!(peers, vec![peer_config(&good)]);
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
        (accepted.iter().skip(1).map(peer_config).collect(), refused)
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
