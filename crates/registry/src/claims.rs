//! Pod CIDR claims: the I/O around [`weft_core::alloc::decide`].
//!
//! Each node writes only its own claim, `claims/<node>` (so etcd RBAC can confine a node to its
//! own keys). A claim is taken with a compare-and-swap over the whole collection
//! ([`Registry::list_for_update`] then [`Registry::put_if_unchanged`]): two nodes deciding at
//! the same time from the same listing cannot both succeed, the loser lists again and decides
//! again. The live set (who has a node record) is read before each attempt.

use crate::typed::{list_objects, Object};
use crate::{Kind, Registry, RegistryError};
use ipnet::{IpNet, Ipv4Net};
use std::collections::BTreeMap;
use std::time::Duration;
use tracing::{info, warn};
use weft_core::alloc::{decide, AllocError, AllocRequest, Allocation, Claim, ClaimError, How};
use weft_core::NodeRecord;

impl Object for Claim {
    const KIND: Kind = Kind::Claims;
    type Error = ClaimError;

    fn decode(bytes: &[u8]) -> Result<Self, ClaimError> {
        Claim::from_json(bytes)
    }
    fn encode(&self) -> Vec<u8> {
        self.to_json()
    }
    fn object_name(&self) -> &str {
        &self.node
    }
    fn validate(&self) -> Result<(), ClaimError> {
        self.check()
    }
}

/// How this node wants its block.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub node: String,
    pub pool: Ipv4Net,
    pub block_len: u8,
    /// The block held last time (state dir) or now (renewal).
    pub remembered: Option<Ipv4Net>,
    pub reclaim_after: Duration,
    /// Renewal of a block in use: only `remembered` may be written; losing it is an error
    /// ([`ClaimFailure::Lost`]) instead of a move to another block.
    pub renew_only: bool,
}

/// Why no claim was written.
#[derive(Debug, thiserror::Error)]
pub enum ClaimFailure {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error("pod CIDR {block} is now held by node {owner} (this node was gone longer than the reclaim period)")]
    Lost { block: Ipv4Net, owner: String },
    #[error("the claims kept changing: gave up after {attempts} attempts")]
    Contended { attempts: u32 },
}

/// Attempts before [`ClaimFailure::Contended`]; each conflict means another node's claim landed,
/// so with n nodes starting together the last one needs at most about n attempts.
pub const MAX_ATTEMPTS: u32 = 64;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Claims (or renews) this node's pod CIDR. Returns the allocation that was written.
pub async fn claim_pod_cidr(
    registry: &dyn Registry,
    req: &ClaimRequest,
) -> Result<Allocation, ClaimFailure> {
    for attempt in 1..=MAX_ATTEMPTS {
        let (records, _) = list_objects::<NodeRecord>(registry).await?;
        let live: BTreeMap<String, Vec<IpNet>> =
            records.into_iter().map(|r| (r.name, r.pod_cidrs)).collect();
        let (raw, snapshot) = registry.list_for_update(Kind::Claims).await?;
        let claims: Vec<Claim> = raw
            .iter()
            .filter_map(|(name, bytes)| match Claim::from_json(bytes) {
                Ok(c) if c.node == *name => Some(c),
                Ok(c) => {
                    warn!(location = %registry.location(Kind::Claims, name), claim_node = %c.node, "skipping a claim stored under another node's name");
                    None
                }
                Err(e) => {
                    warn!(location = %registry.location(Kind::Claims, name), error = %e, "skipping an invalid claim");
                    None
                }
            })
            .collect();
        let alloc = decide(
            &AllocRequest {
                node: &req.node,
                pool: req.pool,
                block_len: req.block_len,
                remembered: req.remembered,
                live: &live,
                now: unix_now(),
                reclaim_after: req.reclaim_after.as_secs(),
            },
            &claims,
        )?;
        if req.renew_only && Some(alloc.claim.pod_cidr) != req.remembered {
            let block = req.remembered.unwrap_or(alloc.claim.pod_cidr);
            let owner = weft_core::alloc::owners(&claims)
                .get(&block)
                .map(|o| o.node.clone())
                .unwrap_or_else(|| "(a live node's record)".into());
            return Err(ClaimFailure::Lost { block, owner });
        }
        if registry
            .put_if_unchanged(Kind::Claims, &req.node, &alloc.claim.to_json(), snapshot)
            .await?
        {
            match &alloc.how {
                How::Kept => {}
                How::New => info!(pod_cidr = %alloc.claim.pod_cidr, attempt, "claimed a pod CIDR"),
                How::Reclaimed { from, gone_secs } => info!(
                    pod_cidr = %alloc.claim.pod_cidr, %from, gone_secs, attempt,
                    "reclaimed the pod CIDR of a node gone longer than the reclaim period"
                ),
            }
            if let Some((old, owner)) = &alloc.lost {
                warn!(%old, %owner, new = %alloc.claim.pod_cidr, "this node's previous pod CIDR was reclaimed while it was away");
            }
            return Ok(alloc);
        }
        // Someone else's claim landed in between: wait a little (spread the retries) and decide
        // again from a fresh listing.
        let ms = {
            use rand::Rng;
            rand::thread_rng().gen_range(5..=20 + 10 * u64::from(attempt.min(20)))
        };
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    Err(ClaimFailure::Contended {
        attempts: MAX_ATTEMPTS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DirRegistry;
    use std::sync::Arc;

    fn req(node: &str) -> ClaimRequest {
        ClaimRequest {
            node: node.into(),
            pool: "10.42.0.0/20".parse().expect("pool"),
            block_len: 24,
            remembered: None,
            reclaim_after: Duration::from_secs(3600),
            renew_only: false,
        }
    }

    /// 16 claimers on one directory (separate registry handles, as separate processes would
    /// have) at the same moment: 16 distinct blocks, and the 17th is told the pool is full.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_claims_on_a_dir_registry_never_collide() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut tasks = Vec::new();
        for i in 0..16 {
            let reg: Arc<dyn Registry> = Arc::new(DirRegistry::open(tmp.path()).expect("open"));
            tasks.push(tokio::spawn(async move {
                claim_pod_cidr(&*reg, &req(&format!("n{i}"))).await
            }));
        }
        let mut blocks = Vec::new();
        for t in tasks {
            blocks.push(t.await.expect("join").expect("claim").claim.pod_cidr);
        }
        blocks.sort();
        blocks.dedup();
        assert_eq!(blocks.len(), 16, "{blocks:?}");
        let reg = DirRegistry::open(tmp.path()).expect("open");
        let e = claim_pod_cidr(&reg, &req("n16"))
            .await
            .expect_err("pool is full");
        assert!(
            matches!(e, ClaimFailure::Alloc(AllocError::Exhausted { .. })),
            "{e}"
        );

        // Renewal keeps the block; renewing a block someone else holds is refused.
        let mine = claim_pod_cidr(&reg, &req("n3")).await.expect("keep");
        assert_eq!(mine.how, How::Kept);
        let renew = |block| ClaimRequest {
            remembered: Some(block),
            renew_only: true,
            ..req("n3")
        };
        let again = claim_pod_cidr(&reg, &renew(mine.claim.pod_cidr))
            .await
            .expect("renew");
        assert_eq!(again.claim.pod_cidr, mine.claim.pod_cidr);
        let other = blocks
            .iter()
            .find(|b| **b != mine.claim.pod_cidr)
            .copied()
            .expect("another block");
        let e = claim_pod_cidr(&reg, &renew(other))
            .await
            .expect_err("not ours");
        assert!(matches!(e, ClaimFailure::Lost { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_stale_snapshot_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let reg = DirRegistry::open(tmp.path()).expect("open");
        let (_, snap) = reg.list_for_update(Kind::Claims).await.expect("list");
        assert!(reg
            .put_if_unchanged(Kind::Claims, "a", b"{}", snap)
            .await
            .expect("first"));
        assert!(
            !reg.put_if_unchanged(Kind::Claims, "b", b"{}", snap)
                .await
                .expect("second"),
            "a write since the snapshot must make the CAS fail"
        );
        let (items, snap2) = reg.list_for_update(Kind::Claims).await.expect("list");
        assert_eq!(items.len(), 1);
        assert!(reg
            .put_if_unchanged(Kind::Claims, "b", b"{}", snap2)
            .await
            .expect("fresh"));
    }
}
