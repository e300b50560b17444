//! `keyctl psk rotate`: bumps the cluster PSK generation (`psk/cluster`) and, with `--wait`,
//! follows the node records until every node holding the cluster secret publishes it.
//!
//! Only a generation number is written: the cluster secret and the PSKs derived from it stay on
//! the nodes. [`progress`] is pure (records in, who is done out).

use anyhow::{Context, Result};
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_core::control::{PskGeneration, PSK_OBJECT};
use weft_core::NodeRecord;
use weft_registry::{Registry, Typed};

/// Where the nodes stand with respect to one PSK generation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Nodes publishing the generation (or a later one).
    pub done: Vec<String>,
    /// Nodes holding the secret that still publish an older generation.
    pub behind: Vec<String>,
    /// Nodes whose record names no PSK generation: they hold no cluster secret, and no node
    /// with the secret can reach them.
    pub without_secret: Vec<String>,
}

pub fn progress(records: &[NodeRecord], generation: u64) -> Progress {
    let mut p = Progress::default();
    for r in records {
        match r.psk_generation {
            Some(g) if g >= generation => p.done.push(r.name.clone()),
            Some(_) => p.behind.push(r.name.clone()),
            None => p.without_secret.push(r.name.clone()),
        }
    }
    p
}

/// Writes generation current + 1 and returns it.
pub async fn bump(registry: &Arc<dyn Registry>, now: u64) -> Result<u64> {
    let typed = Typed::<PskGeneration>::new(registry.clone());
    let current = typed
        .get(PSK_OBJECT)
        .await
        .context("reading the cluster PSK generation")?
        .map_or(0, |p| p.generation);
    let next = current + 1;
    typed
        .put(&PskGeneration {
            generation: next,
            requested_at: now,
        })
        .await
        .context("writing the cluster PSK generation")?;
    Ok(next)
}

/// Polls the node records until no node holding the secret is behind `generation`, or the
/// timeout passes. Returns the last progress seen.
pub async fn wait(
    registry: &Arc<dyn Registry>,
    generation: u64,
    timeout: Duration,
    poll: Duration,
) -> Result<Progress> {
    let start = Instant::now();
    loop {
        let (records, _) = weft_registry::list_nodes(&**registry)
            .await
            .context("reading the node records")?;
        let p = progress(&records, generation);
        if p.behind.is_empty() || start.elapsed() >= timeout {
            return Ok(p);
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::tests::rec;

    #[test]
    fn sorts_nodes_by_generation() {
        let mut a = rec("a", 1, 1);
        a.psk_generation = Some(3);
        let mut b = rec("b", 2, 1);
        b.psk_generation = Some(2);
        let c = rec("c", 3, 1);
        let mut d = rec("d", 4, 1);
        d.psk_generation = Some(4);
        let p = progress(&[a, b, c, d], 3);
        assert_eq!(p.done, ["a", "d"]);
        assert_eq!(p.behind, ["b"]);
        assert_eq!(p.without_secret, ["c"]);
    }
}
