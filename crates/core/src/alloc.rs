//! Pod CIDR allocation: which block of the cluster pool a node should hold, decided from the
//! claims every node has written (sans-IO; the registry layer lists the claims and writes the
//! result with a compare-and-swap over the whole claims collection).
//!
//! A claim ([`Claim`]) lives under the claiming node's own name, so a node only ever writes its
//! own claim (which lets etcd RBAC confine each node to its own keys). Two claims may name the
//! same block: a reclaimed block is claimed again by its new owner while the old owner's claim
//! stays where it is. The owner of a block is the claim with the highest `generation`; a claim
//! on a block always gets a generation above every claim on that block it can see, and the CAS
//! makes claims serial, so ownership is never ambiguous.
//!
//! In: this node's name, the pool and block size, the block this node remembers (its state dir),
//! the claims, the names and pod ranges of the nodes that are live (have a record), the time
//! (unix seconds) and how long an owner must be gone before its block is taken.
//! Out: the claim to write ([`Allocation`]) or why none can be ([`AllocError`]).

use crate::record::check_name;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// A node's claim on one block of the pool, stored under the node's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claim {
    /// The claiming node (the same as the object's name).
    pub node: String,
    /// The claimed block.
    pub pod_cidr: Ipv4Net,
    /// Above every other claim on this block at the time it was made; the highest one owns it.
    pub generation: u64,
    /// Unix seconds when the owner last confirmed it (it does so periodically while it runs).
    pub renewed_at: u64,
}

/// Why a claim object was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error("claim is not valid JSON: {0}")]
    Json(String),
    #[error("claim field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
}

impl Claim {
    /// Parses and checks a claim.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ClaimError> {
        let c: Claim =
            serde_json::from_slice(bytes).map_err(|e| ClaimError::Json(e.to_string()))?;
        c.check()?;
        Ok(c)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// A valid node name, a network address (no host bits), a generation of at least 1.
    pub fn check(&self) -> Result<(), ClaimError> {
        check_name(&self.node).map_err(|e| ClaimError::Field {
            field: "node",
            reason: e.to_string(),
        })?;
        if self.pod_cidr.network() != self.pod_cidr.addr() {
            return Err(ClaimError::Field {
                field: "podCidr",
                reason: format!("{} has host bits set", self.pod_cidr),
            });
        }
        if self.pod_cidr.prefix_len() > 30 {
            return Err(ClaimError::Field {
                field: "podCidr",
                reason: format!("{} is smaller than a /30", self.pod_cidr),
            });
        }
        if self.generation == 0 {
            return Err(ClaimError::Field {
                field: "generation",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// What to decide with.
#[derive(Debug, Clone)]
pub struct AllocRequest<'a> {
    pub node: &'a str,
    /// The cluster range blocks are cut from.
    pub pool: Ipv4Net,
    /// Prefix length of each node's block (24 for a /24).
    pub block_len: u8,
    /// The block this node held last time (from its state dir), preferred if still free.
    pub remembered: Option<Ipv4Net>,
    /// Nodes with a record in the registry, with their pod ranges (records of nodes that do not
    /// allocate count too: their ranges are never handed out).
    pub live: &'a BTreeMap<String, Vec<ipnet::IpNet>>,
    /// Unix seconds.
    pub now: u64,
    /// Seconds an owner must have been gone (no record, no renewal) before its block is taken.
    pub reclaim_after: u64,
}

/// How the block was obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum How {
    /// This node already owned it; the claim is renewed.
    Kept,
    /// A block nobody owned.
    New,
    /// A block whose owner (named) had been gone longer than the reclaim period.
    Reclaimed { from: String, gone_secs: u64 },
}

/// The decision: write `claim` under this node's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub claim: Claim,
    pub how: How,
    /// This node's previous claim, if it lost that block to a reclaim while it was away.
    pub lost: Option<(Ipv4Net, String)>,
}

/// Why no block can be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("--node-cidr-size /{block_len} does not fit in the pool {pool} (needs a prefix of {min}-30)", min = pool.prefix_len())]
    BadBlockSize { pool: Ipv4Net, block_len: u8 },
    #[error("no free /{block_len} left in {pool}: all {total} blocks are held by live nodes or by nodes gone less than {reclaim_after}s{}", oldest.as_ref().map(|(n, s)| format!(" (the longest gone, {n}, for {s}s)")).unwrap_or_default())]
    Exhausted {
        pool: Ipv4Net,
        block_len: u8,
        total: u64,
        reclaim_after: u64,
        /// The owner gone longest and for how many seconds, if any owner is gone.
        oldest: Option<(String, u64)>,
    },
}

/// FNV-1a, so every build and platform starts a node's search at the same block.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Owner claims (highest generation per block; ties broken by node name so every node agrees).
pub fn owners(claims: &[Claim]) -> HashMap<Ipv4Net, &Claim> {
    let mut owners: HashMap<Ipv4Net, &Claim> = HashMap::new();
    for c in claims {
        match owners.get(&c.pod_cidr) {
            Some(o) if (o.generation, &o.node) >= (c.generation, &c.node) => {}
            _ => {
                owners.insert(c.pod_cidr, c);
            }
        }
    }
    owners
}

/// Decides which block `req.node` should hold. Pure: the same inputs give the same answer.
///
/// In order: the block this node owns already (renewed); the remembered block if it is free;
/// the first free block, searching from a point derived from the node name (so nodes starting
/// together rarely collide); the block of the owner gone longest, if gone past the reclaim
/// period; else [`AllocError::Exhausted`]. A block is free when no owner claim and no live
/// record's range overlaps it.
pub fn decide(req: &AllocRequest<'_>, claims: &[Claim]) -> Result<Allocation, AllocError> {
    let (pool, len) = (req.pool, req.block_len);
    if len < pool.prefix_len() || len > 30 {
        return Err(AllocError::BadBlockSize {
            pool,
            block_len: len,
        });
    }
    let owners = owners(claims);
    let top_generation = |block: &Ipv4Net| {
        claims
            .iter()
            .filter(|c| c.pod_cidr == *block)
            .map(|c| c.generation)
            .max()
            .unwrap_or(0)
    };
    let mine = claims.iter().find(|c| c.node == req.node);
    let mut lost = None;
    if let Some(m) = mine {
        let owner = owners.get(&m.pod_cidr).map(|o| o.node.as_str());
        if owner == Some(req.node) && pool.contains(&m.pod_cidr) {
            return Ok(Allocation {
                claim: Claim {
                    renewed_at: req.now.max(m.renewed_at),
                    ..m.clone()
                },
                how: How::Kept,
                lost: None,
            });
        }
        if let Some(o) = owner.filter(|o| *o != req.node) {
            lost = Some((m.pod_cidr, o.to_string()));
        }
    }
    // Blocks held by someone else: owner claims of other nodes, and other live nodes' ranges.
    let taken_by = |block: &Ipv4Net| -> Option<&Claim> {
        owners
            .values()
            .find(|o| o.node != req.node && overlaps(&o.pod_cidr, block))
            .copied()
    };
    let live_overlap = |block: &Ipv4Net| {
        req.live.iter().any(|(n, cidrs)| {
            n != req.node
                && cidrs.iter().any(|c| match c {
                    ipnet::IpNet::V4(c) => overlaps(c, block),
                    ipnet::IpNet::V6(_) => false,
                })
        })
    };
    let free = |block: &Ipv4Net| taken_by(block).is_none() && !live_overlap(block);
    let claim = |block: Ipv4Net| Claim {
        node: req.node.to_string(),
        pod_cidr: block,
        generation: top_generation(&block) + 1,
        renewed_at: req.now,
    };

    if let Some(r) = req.remembered {
        if r.prefix_len() >= pool.prefix_len() && pool.contains(&r) && free(&r) {
            return Ok(Allocation {
                claim: claim(r),
                how: How::New,
                lost,
            });
        }
    }
    let total: u64 = 1u64 << (len - pool.prefix_len());
    let start = fnv1a(req.node) % total;
    let block_at = |i: u64| -> Option<Ipv4Net> {
        let base = u32::from(pool.network()) as u64 + (i << (32 - u32::from(len)));
        Ipv4Net::new(std::net::Ipv4Addr::from(u32::try_from(base).ok()?), len).ok()
    };
    for k in 0..total {
        let Some(block) = block_at((start + k) % total) else {
            continue;
        };
        if free(&block) {
            return Ok(Allocation {
                claim: claim(block),
                how: How::New,
                lost,
            });
        }
    }
    // Everything is held: take the block of the owner gone longest, if long enough.
    let mut gone: Vec<(&Claim, u64)> = owners
        .values()
        .filter(|o| o.node != req.node && !req.live.contains_key(&o.node))
        .filter(|o| o.pod_cidr.prefix_len() == len && pool.contains(&o.pod_cidr))
        .map(|o| (*o, req.now.saturating_sub(o.renewed_at)))
        .collect();
    gone.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.node.cmp(&b.0.node)));
    if let Some((o, secs)) = gone.first() {
        if *secs > req.reclaim_after && !live_overlap(&o.pod_cidr) {
            return Ok(Allocation {
                claim: claim(o.pod_cidr),
                how: How::Reclaimed {
                    from: o.node.clone(),
                    gone_secs: *secs,
                },
                lost,
            });
        }
    }
    Err(AllocError::Exhausted {
        pool,
        block_len: len,
        total,
        reclaim_after: req.reclaim_after,
        oldest: gone.first().map(|(o, s)| (o.node.clone(), *s)),
    })
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(b) || b.contains(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("net")
    }

    fn req<'a>(node: &'a str, live: &'a BTreeMap<String, Vec<ipnet::IpNet>>) -> AllocRequest<'a> {
        AllocRequest {
            node,
            pool: net("10.42.0.0/22"),
            block_len: 24,
            remembered: None,
            live,
            now: 1_000_000,
            reclaim_after: 86_400,
        }
    }

    fn claim(node: &str, cidr: &str, generation: u64, renewed_at: u64) -> Claim {
        Claim {
            node: node.into(),
            pod_cidr: net(cidr),
            generation,
            renewed_at,
        }
    }

    /// Runs nodes one after another (as the CAS serialises them) and returns the claims.
    fn allocate_all(names: &[&str], pool: &str) -> Vec<Claim> {
        let live = BTreeMap::new();
        let mut claims: Vec<Claim> = Vec::new();
        for n in names {
            let a = decide(
                &AllocRequest {
                    pool: net(pool),
                    ..req(n, &live)
                },
                &claims,
            )
            .expect("allocation");
            claims.retain(|c| c.node != *n);
            claims.push(a.claim);
        }
        claims
    }

    #[test]
    fn every_node_gets_a_distinct_block_until_the_pool_is_full() {
        let names: Vec<String> = (0..256).map(|i| format!("node-{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let claims = allocate_all(&refs, "10.42.0.0/16");
        let mut blocks: Vec<Ipv4Net> = claims.iter().map(|c| c.pod_cidr).collect();
        blocks.sort();
        blocks.dedup();
        assert_eq!(blocks.len(), 256);
        assert!(blocks.iter().all(|b| b.prefix_len() == 24));

        let live = BTreeMap::new();
        let e = decide(
            &AllocRequest {
                pool: net("10.42.0.0/16"),
                ..req("one-too-many", &live)
            },
            &claims,
        )
        .expect_err("pool is full");
        assert!(matches!(e, AllocError::Exhausted { total: 256, .. }), "{e}");
        assert!(e.to_string().contains("no free /24 left in 10.42.0.0/16"));
    }

    #[test]
    fn a_node_keeps_its_block_and_prefers_the_remembered_one() {
        let live = BTreeMap::new();
        let claims = vec![claim("a", "10.42.2.0/24", 1, 5)];
        let a = decide(&req("a", &live), &claims).expect("keep");
        assert_eq!(a.how, How::Kept);
        assert_eq!(a.claim.pod_cidr, net("10.42.2.0/24"));
        assert_eq!(a.claim.renewed_at, 1_000_000, "renewed");

        let b = decide(
            &AllocRequest {
                remembered: Some(net("10.42.3.0/24")),
                ..req("b", &live)
            },
            &claims,
        )
        .expect("remembered");
        assert_eq!(b.claim.pod_cidr, net("10.42.3.0/24"));
        // Remembered but taken: another block.
        let c = decide(
            &AllocRequest {
                remembered: Some(net("10.42.2.0/24")),
                ..req("c", &live)
            },
            &claims,
        )
        .expect("other");
        assert_ne!(c.claim.pod_cidr, net("10.42.2.0/24"));
    }

    #[test]
    fn live_records_ranges_are_never_handed_out() {
        let mut live = BTreeMap::new();
        for i in 0..3 {
            live.insert(
                format!("static-{i}"),
                vec![format!("10.42.{i}.0/24").parse().expect("net")],
            );
        }
        let a = decide(&req("a", &live), &[]).expect("one left");
        assert_eq!(a.claim.pod_cidr, net("10.42.3.0/24"));
    }

    #[test]
    fn reclaim_only_after_the_owner_is_gone_long_enough() {
        let names = ["a", "b", "c", "d"];
        let claims = allocate_all(&names, "10.42.0.0/22");
        let mut live: BTreeMap<String, Vec<ipnet::IpNet>> = BTreeMap::new();
        for n in ["a", "b", "d"] {
            live.insert(n.into(), vec![]);
        }
        // c is gone, but renewed 1000 s ago: not yet.
        let mut claims: Vec<Claim> = claims
            .into_iter()
            .map(|mut c| {
                c.renewed_at = 1_000_000 - 1000;
                c
            })
            .collect();
        let e = decide(&req("e", &live), &claims).expect_err("too early");
        assert!(
            matches!(&e, AllocError::Exhausted { oldest: Some((n, 1000)), .. } if n == "c"),
            "{e:?}"
        );
        // Long gone: reclaimed with a higher generation.
        let c_block = claims.iter().find(|c| c.node == "c").expect("c").pod_cidr;
        for c in &mut claims {
            if c.node == "c" {
                c.renewed_at = 1;
            }
        }
        let a = decide(&req("e", &live), &claims).expect("reclaim");
        assert_eq!(a.claim.pod_cidr, c_block);
        assert_eq!(a.claim.generation, 2);
        assert!(matches!(a.how, How::Reclaimed { ref from, .. } if from == "c"));
        // A live owner is never reclaimed, however old its renewal.
        live.insert("c".into(), vec![]);
        assert!(decide(&req("e", &live), &claims).is_err());
        live.remove("c");

        // c comes back: its block is e's now, so c is told and gets another (none: pool full).
        claims.push(a.claim);
        let e_owner = owners(&claims)[&c_block].node.clone();
        assert_eq!(e_owner, "e");
        live.insert("e".into(), vec![]);
        let back = decide(&req("c", &live), &claims).expect_err("pool is full for c");
        assert!(matches!(back, AllocError::Exhausted { .. }));
        // With room in a bigger pool, c gets a new block and learns it lost the old one.
        let back = decide(
            &AllocRequest {
                pool: net("10.42.0.0/21"),
                ..req("c", &live)
            },
            &claims,
        )
        .expect("new block");
        assert_ne!(back.claim.pod_cidr, c_block);
        assert_eq!(back.lost, Some((c_block, "e".to_string())));
    }

    #[test]
    fn bad_claims_and_sizes_are_refused() {
        for bad in [
            r#"{"node":"A","podCidr":"10.42.0.0/24","generation":1,"renewedAt":0}"#,
            r#"{"node":"a","podCidr":"10.42.0.1/24","generation":1,"renewedAt":0}"#,
            r#"{"node":"a","podCidr":"10.42.0.0/24","generation":0,"renewedAt":0}"#,
            r#"{"node":"a","podCidr":"10.42.0.0/31","generation":1,"renewedAt":0}"#,
            r#"{"node":"a","podCidr":"fd00::/64","generation":1,"renewedAt":0}"#,
            r#"{"node":"a"}"#,
            "not json",
        ] {
            assert!(Claim::from_json(bad.as_bytes()).is_err(), "{bad}");
        }
        let good = claim("a", "10.42.0.0/24", 3, 7);
        assert_eq!(Claim::from_json(&good.to_json()), Ok(good));
        let live = BTreeMap::new();
        for len in [15, 31] {
            let r = AllocRequest {
                pool: net("10.42.0.0/16"),
                block_len: len,
                ..req("a", &live)
            };
            assert!(matches!(
                decide(&r, &[]),
                Err(AllocError::BadBlockSize { .. })
            ));
        }
    }
}
