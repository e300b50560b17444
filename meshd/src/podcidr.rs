//! This node's pod range when no --pod-cidr is given: claimed through the registry
//! (`weft_registry::claims`), remembered in `STATE_DIR/pod-cidr`, renewed while meshd runs.

use crate::config::{AllocConfig, Config};
use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use weft_registry::claims::{claim_pod_cidr, ClaimFailure, ClaimRequest};
use weft_registry::Registry;

/// `STATE_DIR/pod-cidr`: the block this node claimed last, one line.
pub const STATE_FILE: &str = "pod-cidr";

/// How long one claim attempt may take before start-up falls back to the remembered block.
const ATTEMPT_LIMIT: Duration = Duration::from_secs(5);

/// The remembered block, if the file exists and holds one inside the pool with the right size.
pub fn remembered(state_dir: &Path, alloc: &AllocConfig) -> Option<Ipv4Net> {
    let path = state_dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).ok()?;
    match text.trim().parse::<Ipv4Net>() {
        Ok(n) if alloc.pool.contains(&n) && n.prefix_len() == alloc.block_len => Some(n),
        Ok(n) => {
            tracing::warn!(file = %path.display(), block = %n, pool = %alloc.pool, size = alloc.block_len,
                "ignoring the remembered pod CIDR: outside the pool or of another size");
            None
        }
        Err(_) => {
            tracing::warn!(file = %path.display(), "ignoring a malformed remembered pod CIDR");
            None
        }
    }
}

fn remember(state_dir: &Path, block: Ipv4Net) -> Result<()> {
    let path = state_dir.join(STATE_FILE);
    let tmp = state_dir.join(format!(".{STATE_FILE}.tmp{}", std::process::id()));
    std::fs::write(&tmp, format!("{block}\n"))
        .and_then(|_| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))
}

/// Forgets the remembered block (on `leave`).
pub fn forget(state_dir: &Path) {
    let _ = std::fs::remove_file(state_dir.join(STATE_FILE));
}

fn request(cfg: &Config, alloc: &AllocConfig, remembered: Option<Ipv4Net>) -> ClaimRequest {
    ClaimRequest {
        node: cfg.node_name.clone(),
        pool: alloc.pool,
        block_len: alloc.block_len,
        remembered,
        reclaim_after: alloc.reclaim_after,
        renew_only: false,
    }
}

/// Claims this node's block at start-up. Returns it and whether the registry confirmed it.
///
/// When the registry cannot be reached, the remembered block is used at once (confirmed later by
/// the renewal task); without one, meshd keeps trying (jittered backoff, capped at 2 s) since
/// it cannot route pods without a range. A full pool or a bad size is an error, not a wait.
pub async fn obtain(
    cfg: &Config,
    alloc: &AllocConfig,
    registry: &dyn Registry,
) -> Result<(Ipv4Net, bool)> {
    let remembered = remembered(&cfg.state_dir, alloc);
    let req = request(cfg, alloc, remembered);
    let mut backoff = Duration::from_millis(200);
    loop {
        let why = match tokio::time::timeout(ATTEMPT_LIMIT, claim_pod_cidr(registry, &req)).await {
            Ok(Ok(a)) => {
                let block = a.claim.pod_cidr;
                if remembered != Some(block) {
                    remember(&cfg.state_dir, block)?;
                }
                tracing::info!(pod_cidr = %block, how = ?a.how, "pod CIDR claimed");
                return Ok((block, true));
            }
            Ok(Err(ClaimFailure::Alloc(e))) => {
                return Err(anyhow::Error::new(e).context("claiming a pod CIDR"))
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {ATTEMPT_LIMIT:?}"),
        };
        if let Some(block) = remembered {
            tracing::warn!(pod_cidr = %block, reason = %why,
                "cannot claim a pod CIDR now; using the remembered one (confirmed when the registry answers)");
            return Ok((block, false));
        }
        tracing::warn!(reason = %why, "cannot claim a pod CIDR yet; retrying");
        tokio::time::sleep(crate::daemon::jittered(backoff)).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Renews the claim on `block` for as long as meshd runs: every quarter of the reclaim period
/// (1 s to 1 h), or every 2 s while unconfirmed. `state` holds what `meshd status` shows:
/// `held`, `unconfirmed: ...` or `lost: ...` (the block was taken while this node was gone; a
/// restart moves to a new block).
pub fn spawn_renewal(
    cfg: &Config,
    alloc: &AllocConfig,
    registry: Arc<dyn Registry>,
    block: Ipv4Net,
    confirmed: bool,
    state: Arc<Mutex<String>>,
) -> tokio::task::JoinHandle<()> {
    let req = ClaimRequest {
        renew_only: true,
        ..request(cfg, alloc, Some(block))
    };
    let period = (alloc.reclaim_after / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    let set = move |s: String| {
        if let Ok(mut g) = state.lock() {
            *g = s;
        }
    };
    set(if confirmed {
        "held".into()
    } else {
        "unconfirmed: registry unreachable at start".into()
    });
    tokio::spawn(async move {
        let mut wait = if confirmed { period } else { Duration::ZERO };
        loop {
            tokio::time::sleep(wait).await;
            wait = match tokio::time::timeout(ATTEMPT_LIMIT, claim_pod_cidr(&*registry, &req)).await
            {
                Ok(Ok(_)) => {
                    set("held".into());
                    period
                }
                Ok(Err(e @ ClaimFailure::Lost { .. })) => {
                    tracing::error!(error = %e, "this node's pod CIDR was reclaimed by another node; pods here may clash with that node's — restart meshd to claim a new block");
                    set(format!("lost: {e}"));
                    period
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot renew the pod CIDR claim; retrying");
                    set(format!("unconfirmed: {e}"));
                    period.min(Duration::from_secs(2))
                }
                Err(_) => {
                    set("unconfirmed: registry did not answer".into());
                    period.min(Duration::from_secs(2))
                }
            };
        }
    })
}
