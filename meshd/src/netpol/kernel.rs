//! The kernel side, through weft-sys: the table, its counters, conntrack.
//!
//! In: a compiled program. Out: the table written, the drop counters read back (summed per
//! chain: each pod chain has one counted rule, its final drop), conntrack entries listed and
//! removed.

use anyhow::Result;
use std::collections::BTreeMap;
use weft_core::netpol::program::{Counter, Program, GUARD4};
use weft_sys::nft::conntrack::CtFlow;

/// Drop counters as read from the kernel.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Per chain: the sum of its counted rules.
    pub chains: BTreeMap<String, Counter>,
    pub guard: Counter,
}

impl Counters {
    /// The start values for a new program: per chain, and the guard under [`GUARD4`].
    pub fn by_chain(&self) -> BTreeMap<String, Counter> {
        let mut m = self.chains.clone();
        m.insert(GUARD4.to_string(), self.guard);
        m
    }
}

pub fn installed() -> Result<bool> {
    Ok(weft_sys::nft::policy::policy_installed()?)
}

pub fn apply(p: &Program) -> Result<()> {
    let a = weft_sys::nft::policy::apply_policy(p)?;
    if a.attempts > 1 {
        tracing::debug!(
            generation = a.generation,
            attempts = a.attempts,
            "policy table written; other writers' commits made earlier listings stale"
        );
    }
    Ok(())
}

pub fn read() -> Result<Counters> {
    let c = weft_sys::nft::policy::read_counters()?;
    let mut out = Counters {
        guard: c.guard,
        ..Default::default()
    };
    for (chain, rules) in c.chains {
        let mut sum = Counter::default();
        for (_, r) in rules {
            sum.packets += r.packets;
            sum.bytes += r.bytes;
        }
        out.chains.insert(chain, sum);
    }
    Ok(out)
}

pub fn flows() -> Result<Vec<CtFlow>> {
    Ok(weft_sys::nft::conntrack::conntrack_flows()?)
}

pub fn delete(flows: &[CtFlow]) -> Result<usize> {
    Ok(weft_sys::nft::conntrack::conntrack_delete(flows)?)
}
