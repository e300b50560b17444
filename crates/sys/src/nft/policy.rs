//! NetworkPolicy enforcement: the node's [`Program`] as nftables table `inet weft-policy`.
//!
//! In: a [`Program`] (`weft_core::netpol::program`: address sets, the egress/ingress maps of
//! isolated pods, regular chains of rules, guard counter start values) and what the table
//! holds now ([`Installed`], listed from the kernel). Out: one nf_tables batch
//! ([`policy_batch_for`]) that atomically replaces the program in force with the frame
//! documented in `program.rs` (guard sets, four verdict maps, base chains `egress`/`ingress`
//! on the forward hook, the program's chains), sent by [`apply_policy`]; [`remove_policy`],
//! [`policy_installed`], [`policy_listing`], and [`read_counters`] (per chain, the counters of its rules, and the
//! guard's drop total, read back from the kernel).
//!
//! **Why generations.** A transaction is atomic for the ruleset, but a packet reads the
//! generation bit anew at each base chain it enters and at each set lookup. Deleting the table
//! and writing it again in one batch therefore leaks: the new base chains are hooked before
//! the commit (empty, policy accept) and the old ones are empty after it, so a packet that
//! meets the new chain before the commit and the old one after passes both (measured: in 2 of
//! 15 runs of 200 replaces, one of ~22,000 denied packets got through). So nothing a packet may be using is ever changed in
//! place: the base chains stay (hooked once), and every set, map and regular chain is written
//! under a versioned name `NAME.gGEN` (see [`installed`]). A write creates generation `GEN+1`,
//! flushes the base chains' rules and adds ones that look up `GEN+1`'s maps and guards, and
//! deletes the generations older than `GEN`; `GEN` itself stays untouched until the next
//! write, for packets still in the old base chain rules. Each base chain then sees the old
//! program or the new one whole, and its lookups agree with its rules.
//!
//! Batch order: the batch begins with the ruleset generation id of the listing (the kernel
//! refuses the batch with `ERESTART` if anything changed since; [`apply_policy`] lists again
//! and retries), then: table (create if absent), the base chains (created if absent, else
//! their rules flushed), the stale generations (their chains' rules flushed, their sets and
//! maps deleted, their chains deleted), then generation `GEN+1`: the address sets and their
//! elements, the four maps (empty), every regular chain (empty), the regular chains' rules,
//! the maps' elements (`addr : jump CHAIN`), the base chains' rules. Sets come before the rules
//! that look them up and chains before the rules and map elements that jump to them;
//! everything is referenced by name (and sets also by `NFTA_SET_ID`), which the kernel resolves
//! against objects created earlier in the batch. Error reports name objects by their program
//! names, without the generation.
//!
//! Interval sets are encoded as `nft` does: a range `[lo, hi]` is an element at `lo` and an
//! `NFT_SET_ELEM_INTERVAL_END` element at `hi + 1` (none when `hi` is the family's last
//! address), preceded by an interval end at `0` when the first range does not start there.
//!
//! Everything the kernel would refuse with a bare `EINVAL`/`ENOENT`/`ELOOP`/`EMLINK` (bad or
//! duplicate names, unknown sets or chains, jump loops, jumps nested deeper than the kernel's
//! 16 levels, unsorted ranges) is refused here first as [`SysError::InvalidArgument`].

mod installed;

use super::*;
pub use installed::Installed;
use installed::{generation, unversioned, versioned, GEN_SUFFIX_MAX};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use weft_core::netpol::program::{
    AddrSet, Counter, Family, Match, Program, Rule, Verdict, GUARD4, GUARD6, TABLE,
};

/// The base chain of the egress side (hook forward, priority -2).
pub const EGRESS_CHAIN: &str = "egress";
/// The base chain of the ingress side (hook forward, priority -1).
pub const INGRESS_CHAIN: &str = "ingress";
/// The verdict maps, in the order (egress v4, egress v6, ingress v4, ingress v6).
pub const MAPS: [&str; 4] = ["egress4", "egress6", "ingress4", "ingress6"];

const NF_INET_FORWARD: u32 = 2;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_DELSET: u16 = 11;
/// `NFNL_BATCH_GENID`: the ruleset generation a batch was built for.
const NFNL_BATCH_GENID: u16 = 1;

const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_ID: u16 = 10;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_MAP: u32 = 0x8;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
/// nftables' datatype numbers (userspace only; `nft list` shows addresses with them).
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;

const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;

const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_DREG: u16 = 3;
const NFTA_LOOKUP_SET_ID: u16 = 4;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFT_CT_STATE: u32 = 0;
/// `NF_CT_STATE_BIT(IP_CT_ESTABLISHED) | NF_CT_STATE_BIT(IP_CT_RELATED)`.
const CT_STATE_ESTABLISHED_RELATED: u32 = 0x2 | 0x4;
const NFTA_RANGE_SREG: u16 = 1;
const NFTA_RANGE_OP: u16 = 2;
const NFTA_RANGE_FROM_DATA: u16 = 3;
const NFTA_RANGE_TO_DATA: u16 = 4;
const NFT_RANGE_EQ: u32 = 0;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;

/// The kernel's `NFT_NAME_MAXLEN - 1` (names of tables, sets and chains) less the longest
/// generation suffix: the longest program name.
const MAX_NAME: usize = 255 - GEN_SUFFIX_MAX;
/// The kernel's `NFT_JUMP_STACK_SIZE`: a chain at this many jumps from a base chain is refused
/// (`EMLINK`).
const JUMP_STACK: usize = 16;
/// Set or map elements per message (their list is one attribute, 64 KiB at most).
const ELEMS_BYTES: usize = 60_000;

/// Counters read back from the kernel by [`read_counters`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyCounters {
    /// Per regular chain: (index of the rule in the chain, its counter), for the rules that
    /// have one.
    pub chains: BTreeMap<String, Vec<(usize, Counter)>>,
    /// Everything the guard dropped (v4 and v6, by source and by destination).
    pub guard: Counter,
}

/// A batch being built, with what each message is (by sequence number) for error reports.
struct Batch {
    buf: Vec<u8>,
    /// `what[seq - 1]`.
    what: Vec<String>,
}

impl Batch {
    /// A batch for ruleset generation `genid` (0: any).
    fn new(genid: u32) -> Batch {
        let mut b = Batch {
            buf: Vec::with_capacity(1 << 16),
            what: Vec::new(),
        };
        let mut m = b.msg_raw(NFNL_MSG_BATCH_BEGIN, libc::NLM_F_REQUEST as u16, 0);
        if genid != 0 {
            m.u32(NFNL_BATCH_GENID, genid);
        }
        b.push(m, "the batch as a whole (commit)".into());
        b
    }

    fn next_seq(&self) -> u32 {
        self.what.len() as u32 + 1
    }

    fn msg_raw(&self, kind: u16, flags: u16, family: u8) -> Msg {
        Msg::new(kind, flags, self.next_seq(), family, NFNL_SUBSYS_NFTABLES)
    }

    /// An nf_tables message of family inet; `create` adds `NLM_F_CREATE` (and `NLM_F_APPEND`
    /// for rules).
    fn msg(&self, kind: u16, create: bool) -> Msg {
        let mut flags = libc::NLM_F_REQUEST as u16;
        if create {
            flags |= libc::NLM_F_CREATE as u16;
            if kind == NFT_MSG_NEWRULE {
                flags |= libc::NLM_F_APPEND as u16;
            }
        }
        let mut m = Msg::new(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            flags,
            self.next_seq(),
            NFPROTO_INET,
            0,
        );
        m.str(NFTA_TABLE_NAME, TABLE); // NFTA_*_TABLE is attribute 1 in every message here
        m
    }

    fn push(&mut self, m: Msg, what: String) {
        self.buf.extend(m.finish());
        self.what.push(what);
    }

    fn finish(mut self) -> Batch {
        let m = self.msg_raw(NFNL_MSG_BATCH_END, libc::NLM_F_REQUEST as u16, 0);
        self.push(m, "the end of the batch".into());
        self
    }

    fn describe(&self, seq: u32) -> String {
        seq.checked_sub(1)
            .and_then(|i| self.what.get(i as usize))
            .cloned()
            .unwrap_or_else(|| format!("message {seq}"))
    }
}

fn invalid(s: String) -> SysError {
    SysError::InvalidArgument(s)
}

fn check_name(what: &str, name: &str) -> Result<(), SysError> {
    if name.is_empty() || name.len() > MAX_NAME || name.bytes().any(|b| b == 0) {
        return Err(invalid(format!(
            "nftables {what} name {name:?}: must be 1 to {MAX_NAME} bytes without NUL"
        )));
    }
    Ok(())
}

fn family_of(f: Family) -> (u8, u32, u32) {
    // nfproto, key type, key length
    match f {
        Family::V4 => (NFPROTO_IPV4, TYPE_IPADDR, 4),
        Family::V6 => (NFPROTO_IPV6, TYPE_IP6ADDR, 16),
    }
}

fn addr_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn addr_num(ip: &IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(*a) as u128,
        IpAddr::V6(a) => u128::from(*a),
    }
}

fn num_bytes(f: Family, n: u128) -> Vec<u8> {
    match f {
        Family::V4 => (n as u32).to_be_bytes().to_vec(),
        Family::V6 => n.to_be_bytes().to_vec(),
    }
}

fn family_max(f: Family) -> u128 {
    match f {
        Family::V4 => u32::MAX as u128,
        Family::V6 => u128::MAX,
    }
}

/// The interval elements of `set`: (key, is an interval end), in order. Adjacent ranges are
/// merged; unsorted or overlapping ranges, or addresses of the other family, are refused.
pub(crate) fn interval_elements(set: &AddrSet) -> Result<Vec<(Vec<u8>, bool)>, SysError> {
    let mut merged: Vec<(u128, u128)> = Vec::with_capacity(set.ranges.len());
    for (lo, hi) in &set.ranges {
        if Family::of(lo) != set.family || Family::of(hi) != set.family {
            return Err(invalid(format!(
                "set {:?}: range {lo}-{hi} is not of the set's family",
                set.name
            )));
        }
        let (l, h) = (addr_num(lo), addr_num(hi));
        if l > h {
            return Err(invalid(format!(
                "set {:?}: empty range {lo}-{hi}",
                set.name
            )));
        }
        match merged.last_mut() {
            Some(last) if last.1 >= l => {
                return Err(invalid(format!(
                    "set {:?}: ranges not sorted and disjoint at {lo}-{hi}",
                    set.name
                )))
            }
            Some(last) if last.1 + 1 == l => last.1 = h,
            _ => merged.push((l, h)),
        }
    }
    let f = set.family;
    let mut out = Vec::with_capacity(merged.len() * 2 + 1);
    if merged.first().is_some_and(|(l, _)| *l != 0) {
        out.push((num_bytes(f, 0), true));
    }
    for (l, h) in merged {
        out.push((num_bytes(f, l), false));
        if h != family_max(f) {
            out.push((num_bytes(f, h + 1), true));
        }
    }
    Ok(out)
}

/// `meta KEY` into register 1, compared to one byte.
fn meta_eq(m: &mut Msg, key: u32, value: u8) {
    expr_start(m, "meta");
    m.begin(NFTA_EXPR_DATA)
        .u32(NFTA_META_DREG, NFT_REG_1)
        .u32(NFTA_META_KEY, key)
        .end()
        .end();
    cmp(m, NFT_CMP_EQ, &[value]);
}

/// `meta nfproto F; F saddr|daddr @set` (`vmap @set` when `vmap`).
fn addr_lookup(m: &mut Msg, f: Family, dst: bool, set: &str, id: u32, vmap: bool) {
    let (nfproto, _, len) = family_of(f);
    meta_eq(m, NFT_META_NFPROTO, nfproto);
    let off = match (f, dst) {
        (Family::V4, false) => 12,
        (Family::V4, true) => 16,
        (Family::V6, false) => 8,
        (Family::V6, true) => 24,
    };
    payload(m, NFT_PAYLOAD_NETWORK_HEADER, off, len);
    expr_start(m, "lookup");
    m.begin(NFTA_EXPR_DATA)
        .str(NFTA_LOOKUP_SET, set)
        .u32(NFTA_LOOKUP_SET_ID, id)
        .u32(NFTA_LOOKUP_SREG, NFT_REG_1);
    if vmap {
        m.u32(NFTA_LOOKUP_DREG, NFT_REG_VERDICT);
    }
    m.end().end();
}

fn counter(m: &mut Msg, c: &Counter) {
    expr_start(m, "counter");
    m.begin(NFTA_EXPR_DATA)
        .u64(NFTA_COUNTER_BYTES, c.bytes)
        .u64(NFTA_COUNTER_PACKETS, c.packets)
        .end()
        .end();
}

fn verdict_data(m: &mut Msg, code: u32, chain: Option<&str>) {
    m.begin(NFTA_DATA_VERDICT).u32(NFTA_VERDICT_CODE, code);
    if let Some(c) = chain {
        m.str(NFTA_VERDICT_CHAIN, c);
    }
    m.end();
}

/// `v`; a jump goes to the chain of generation `gen`.
fn verdict(m: &mut Msg, v: &Verdict, gen: u64) {
    expr_start(m, "immediate");
    m.begin(NFTA_EXPR_DATA)
        .u32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT)
        .begin(NFTA_IMMEDIATE_DATA);
    match v {
        Verdict::Accept => verdict_data(m, NF_ACCEPT, None),
        Verdict::Drop => verdict_data(m, NF_DROP, None),
        Verdict::Jump(c) => verdict_data(m, NFT_JUMP, Some(&versioned(c, gen))),
    }
    m.end().end().end();
}

/// What [`validate`] learned: set ids (for `NFTA_SET_ID`) and families by name; and the
/// generation being written.
struct Index<'a> {
    sets: HashMap<&'a str, (u32, Family)>,
    gen: u64,
}

/// Refuses, before the kernel does, what the kernel would refuse; see the module doc.
fn validate(prog: &Program) -> Result<Index<'_>, SysError> {
    let mut sets = HashMap::new();
    for (i, s) in prog.sets.iter().enumerate() {
        check_name("set", &s.name)?;
        if MAPS.contains(&s.name.as_str()) {
            return Err(invalid(format!(
                "set name {:?} is reserved for a map",
                s.name
            )));
        }
        let want = match s.name.as_str() {
            GUARD4 => Some(Family::V4),
            GUARD6 => Some(Family::V6),
            _ => None,
        };
        if want.is_some_and(|f| f != s.family) {
            return Err(invalid(format!("set {:?} has the wrong family", s.name)));
        }
        if sets
            .insert(s.name.as_str(), (i as u32 + 1, s.family))
            .is_some()
        {
            return Err(invalid(format!("two sets named {:?}", s.name)));
        }
    }
    let mut chains: HashMap<&str, usize> = HashMap::new();
    for (i, c) in prog.chains.iter().enumerate() {
        check_name("chain", &c.name)?;
        if c.name == EGRESS_CHAIN || c.name == INGRESS_CHAIN {
            return Err(invalid(format!(
                "chain name {:?} is reserved for a base chain",
                c.name
            )));
        }
        if chains.insert(c.name.as_str(), i).is_some() {
            return Err(invalid(format!("two chains named {:?}", c.name)));
        }
    }
    let mut jumps: Vec<Vec<usize>> = vec![Vec::new(); prog.chains.len()];
    for (ci, c) in prog.chains.iter().enumerate() {
        for (ri, r) in c.rules.iter().enumerate() {
            let at = || format!("rule {ri} of chain {:?}", c.name);
            let mut proto = false;
            for m in &r.matches {
                match m {
                    Match::Saddr(s) | Match::Daddr(s) => {
                        if !sets.contains_key(s.as_str()) {
                            return Err(invalid(format!("{}: no set {s:?}", at())));
                        }
                    }
                    Match::Proto(_) => proto = true,
                    Match::Dport { lo, hi } => {
                        if !proto {
                            return Err(invalid(format!(
                                "{}: a port match needs a protocol match before it",
                                at()
                            )));
                        }
                        if lo > hi {
                            return Err(invalid(format!("{}: empty port range {lo}-{hi}", at())));
                        }
                    }
                }
            }
            if let Verdict::Jump(to) = &r.verdict {
                match chains.get(to.as_str()) {
                    Some(t) => jumps[ci].push(*t),
                    None => return Err(invalid(format!("{}: jump to no chain {to:?}", at()))),
                }
            }
        }
    }
    // Loops (ELOOP) and nesting (EMLINK): the height of each chain's jump tree.
    let mut height: Vec<Option<usize>> = vec![None; prog.chains.len()];
    let mut on_path = vec![false; prog.chains.len()];
    fn visit(
        c: usize,
        jumps: &[Vec<usize>],
        height: &mut [Option<usize>],
        on_path: &mut [bool],
        prog: &Program,
    ) -> Result<usize, SysError> {
        if let Some(h) = height[c] {
            return Ok(h);
        }
        if on_path[c] {
            return Err(invalid(format!(
                "chain {:?} jumps back to itself",
                prog.chains[c].name
            )));
        }
        on_path[c] = true;
        let mut h = 0;
        for &t in &jumps[c] {
            h = h.max(1 + visit(t, jumps, height, on_path, prog)?);
        }
        on_path[c] = false;
        height[c] = Some(h);
        Ok(h)
    }
    for c in 0..prog.chains.len() {
        visit(c, &jumps, &mut height, &mut on_path, prog)?;
    }
    for (map, entries) in [("egress", &prog.egress), ("ingress", &prog.ingress)] {
        let mut seen = std::collections::HashSet::new();
        for (ip, chain) in entries {
            if !seen.insert(*ip) {
                return Err(invalid(format!("{map}: address {ip} twice")));
            }
            let Some(&c) = chains.get(chain.as_str()) else {
                return Err(invalid(format!("{map}: {ip} jumps to no chain {chain:?}")));
            };
            // The map's chain is one jump from the base chain.
            if 1 + height[c].unwrap_or(0) >= JUMP_STACK {
                return Err(invalid(format!(
                    "{map}: chain {chain:?} nests jumps deeper than the kernel's {JUMP_STACK}"
                )));
            }
        }
    }
    Ok(Index { sets, gen: 0 })
}

/// Elements of set `name`/`id` (of generation `gen`), in as many messages as needed.
fn push_elements<T>(
    b: &mut Batch,
    (name, gen): (&str, u64),
    id: u32,
    elems: &[T],
    mut write: impl FnMut(&mut Msg, &T),
    what: &str,
) {
    let mut i = 0;
    while i < elems.len() {
        let first = i;
        let mut m = b.msg(NFT_MSG_NEWSETELEM, true);
        m.str(NFTA_SET_ELEM_LIST_SET, &versioned(name, gen))
            .u32(NFTA_SET_ELEM_LIST_SET_ID, id)
            .begin(NFTA_SET_ELEM_LIST_ELEMENTS);
        let start = m.len();
        while i < elems.len() && m.len() - start < ELEMS_BYTES {
            m.begin(NFTA_LIST_ELEM);
            write(&mut m, &elems[i]);
            m.end();
            i += 1;
        }
        m.end();
        b.push(m, format!("{what} {name} (elements {first}..{i})"));
    }
}

fn new_set(b: &mut Batch, (name, gen): (&str, u64), id: u32, f: Family, map: bool) {
    let (_, ktype, klen) = family_of(f);
    let mut m = b.msg(NFT_MSG_NEWSET, true);
    m.str(NFTA_SET_NAME, &versioned(name, gen))
        .u32(
            NFTA_SET_FLAGS,
            if map { NFT_SET_MAP } else { NFT_SET_INTERVAL },
        )
        .u32(NFTA_SET_KEY_TYPE, ktype)
        .u32(NFTA_SET_KEY_LEN, klen);
    if map {
        m.u32(NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT);
    }
    m.u32(NFTA_SET_ID, id);
    b.push(m, format!("{} {name}", if map { "map" } else { "set" }));
}

/// A regular chain `name` of generation `gen`, or (`hook`: priority) a base chain.
fn new_chain(b: &mut Batch, name: &str, gen: u64, hook: Option<i32>) {
    let mut m = b.msg(NFT_MSG_NEWCHAIN, true);
    match hook {
        Some(_) => m.str(NFTA_CHAIN_NAME, name),
        None => m.str(NFTA_CHAIN_NAME, &versioned(name, gen)),
    };
    if let Some(prio) = hook {
        m.begin(NFTA_CHAIN_HOOK)
            .u32(NFTA_HOOK_HOOKNUM, NF_INET_FORWARD)
            .u32(NFTA_HOOK_PRIORITY, prio as u32)
            .end()
            .u32(NFTA_CHAIN_POLICY, NF_ACCEPT)
            .str(NFTA_CHAIN_TYPE, "filter");
    }
    b.push(
        m,
        format!("{}chain {name}", if hook.is_some() { "base " } else { "" }),
    );
}

/// A rule message for `chain` (its name in the kernel), its expressions written by `body`.
/// Refuses a rule too big for the 16-bit length of its expression list.
fn push_rule(
    b: &mut Batch,
    chain: &str,
    what: String,
    body: impl FnOnce(&mut Msg),
) -> Result<(), SysError> {
    let mut m = b.msg(NFT_MSG_NEWRULE, true);
    m.str(NFTA_RULE_CHAIN, chain).begin(NFTA_RULE_EXPRESSIONS);
    let start = m.len();
    body(&mut m);
    if m.len() - start > 65_000 {
        return Err(invalid(format!("{what}: too many matches for one rule")));
    }
    m.end();
    b.push(m, what);
    Ok(())
}

fn rule_body(m: &mut Msg, r: &Rule, idx: &Index<'_>) {
    for x in &r.matches {
        match x {
            Match::Saddr(s) | Match::Daddr(s) => {
                // validate() saw every set a rule names.
                let (id, f) = idx.sets.get(s.as_str()).copied().unwrap_or((0, Family::V4));
                let set = versioned(s, idx.gen);
                addr_lookup(m, f, matches!(x, Match::Daddr(_)), &set, id, false);
            }
            Match::Proto(p) => meta_eq(m, NFT_META_L4PROTO, p.number()),
            Match::Dport { lo, hi } => {
                payload(m, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
                if lo == hi {
                    cmp(m, NFT_CMP_EQ, &lo.to_be_bytes());
                } else {
                    expr_start(m, "range");
                    m.begin(NFTA_EXPR_DATA)
                        .u32(NFTA_RANGE_SREG, NFT_REG_1)
                        .u32(NFTA_RANGE_OP, NFT_RANGE_EQ)
                        .data(NFTA_RANGE_FROM_DATA, &lo.to_be_bytes())
                        .data(NFTA_RANGE_TO_DATA, &hi.to_be_bytes())
                        .end()
                        .end();
                }
            }
        }
    }
    if let Some(c) = &r.counter {
        counter(m, c);
    }
    verdict(m, &r.verdict, idx.gen);
}

fn ct_established(m: &mut Msg) {
    expr_start(m, "ct");
    m.begin(NFTA_EXPR_DATA)
        .u32(NFTA_CT_DREG, NFT_REG_1)
        .u32(NFTA_CT_KEY, NFT_CT_STATE)
        .end()
        .end();
    mask(m, &CT_STATE_ESTABLISHED_RELATED.to_ne_bytes());
    cmp(m, NFT_CMP_NEQ, &0u32.to_ne_bytes());
    verdict(m, &Verdict::Accept, 0);
}

/// Flushes the rules of chain `name` (its name in the kernel).
fn flush_chain(b: &mut Batch, name: &str) {
    let mut m = b.msg(NFT_MSG_DELRULE, false);
    m.str(NFTA_RULE_CHAIN, name);
    b.push(m, format!("the rules of chain {name} (flush)"));
}

fn build(prog: &Program, inst: &Installed) -> Result<Batch, SysError> {
    let mut idx = validate(prog)?;
    let gen = inst.next();
    idx.gen = gen;
    let mut b = Batch::new(inst.genid);
    // The table (created if absent; a dormant one is woken), the base chains (hooked once,
    // kept: only their rules change).
    let mut m = b.msg(NFT_MSG_NEWTABLE, true);
    m.u32(NFTA_TABLE_FLAGS, 0);
    b.push(m, format!("table inet {TABLE}"));
    for (i, (name, prio)) in [(EGRESS_CHAIN, -2), (INGRESS_CHAIN, -1)]
        .into_iter()
        .enumerate()
    {
        if inst.base[i] {
            flush_chain(&mut b, name);
        } else {
            new_chain(&mut b, name, gen, Some(prio));
        }
    }
    // Everything older than the generation in force: rules first (they hold references to
    // sets and chains), then sets and maps (their elements jump to chains), then chains.
    let (stale_chains, stale_sets) = inst.stale();
    for c in &stale_chains {
        flush_chain(&mut b, c);
    }
    for set in &stale_sets {
        let mut m = b.msg(NFT_MSG_DELSET, false);
        m.str(NFTA_SET_NAME, set);
        b.push(m, format!("set {set} of an older generation (delete)"));
    }
    for c in &stale_chains {
        let mut m = b.msg(NFT_MSG_DELCHAIN, false);
        m.str(NFTA_CHAIN_NAME, c);
        b.push(m, format!("chain {c} of an older generation (delete)"));
    }

    // Sets (the guards even when the program has none) and their elements.
    let mut next_id = prog.sets.len() as u32 + 1;
    let mut sets: Vec<&AddrSet> = prog.sets.iter().collect();
    let empty4 = AddrSet {
        name: GUARD4.into(),
        family: Family::V4,
        ranges: Vec::new(),
    };
    let empty6 = AddrSet {
        name: GUARD6.into(),
        family: Family::V6,
        ranges: Vec::new(),
    };
    for g in [&empty4, &empty6] {
        if !idx.sets.contains_key(g.name.as_str()) {
            idx.sets.insert(
                if g.family == Family::V4 {
                    GUARD4
                } else {
                    GUARD6
                },
                (next_id, g.family),
            );
            next_id += 1;
            sets.push(g);
        }
    }
    for s in &sets {
        let (id, _) = idx
            .sets
            .get(s.name.as_str())
            .copied()
            .unwrap_or((0, s.family));
        new_set(&mut b, (&s.name, gen), id, s.family, false);
        let elems = interval_elements(s)?;
        push_elements(
            &mut b,
            (&s.name, gen),
            id,
            &elems,
            |m, (key, end)| {
                m.data(NFTA_SET_ELEM_KEY, key);
                if *end {
                    m.u32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
                }
            },
            "set",
        );
    }
    // The maps, empty for now.
    let map_ids: Vec<u32> = (0..4).map(|i| next_id + i).collect();
    let map_fam = [Family::V4, Family::V6, Family::V4, Family::V6];
    for i in 0..4 {
        new_set(&mut b, (MAPS[i], gen), map_ids[i], map_fam[i], true);
    }
    // Every chain before any rule or element jumps to it.
    for c in &prog.chains {
        new_chain(&mut b, &c.name, gen, None);
    }
    for c in &prog.chains {
        let wire = versioned(&c.name, gen);
        for (ri, r) in c.rules.iter().enumerate() {
            push_rule(
                &mut b,
                &wire,
                format!("rule {ri} of chain {}", c.name),
                |m| rule_body(m, r, &idx),
            )?;
        }
    }
    for (i, map) in MAPS.iter().enumerate() {
        let entries: Vec<&(IpAddr, String)> = if i < 2 { &prog.egress } else { &prog.ingress }
            .iter()
            .filter(|(ip, _)| Family::of(ip) == map_fam[i])
            .collect();
        push_elements(
            &mut b,
            (map, gen),
            map_ids[i],
            &entries,
            |m, (ip, chain)| {
                m.data(NFTA_SET_ELEM_KEY, &addr_bytes(ip));
                m.begin(NFTA_SET_ELEM_DATA);
                verdict_data(m, NFT_JUMP, Some(&versioned(chain, gen)));
                m.end();
            },
            "map",
        );
    }
    // The base chains, as in program.rs.
    let mut counts = [0usize; 2];
    let mut base_rule = |b: &mut Batch, chain: &str, body: &dyn Fn(&mut Msg)| {
        let n = &mut counts[usize::from(chain == INGRESS_CHAIN)];
        let what = format!("rule {n} of base chain {chain}");
        *n += 1;
        push_rule(b, chain, what, body)
    };
    base_rule(&mut b, EGRESS_CHAIN, &ct_established)?;
    let guard_ids = [
        idx.sets.get(GUARD4).map(|s| s.0).unwrap_or(0),
        idx.sets.get(GUARD6).map(|s| s.0).unwrap_or(0),
    ];
    let mut start = Some(prog.guard_counter);
    for (fi, (f, g)) in [(Family::V4, GUARD4), (Family::V6, GUARD6)]
        .into_iter()
        .enumerate()
    {
        for dst in [false, true] {
            // The start value goes on the first guard rule; read_counters sums them all.
            let c = start.take().unwrap_or_default();
            let set = versioned(g, gen);
            base_rule(&mut b, EGRESS_CHAIN, &|m| {
                addr_lookup(m, f, dst, &set, guard_ids[fi], false);
                counter(m, &c);
                verdict(m, &Verdict::Drop, gen);
            })?;
        }
    }
    for (i, map) in MAPS.iter().enumerate() {
        let chain = if i < 2 { EGRESS_CHAIN } else { INGRESS_CHAIN };
        if i == 2 {
            base_rule(&mut b, INGRESS_CHAIN, &ct_established)?;
        }
        let map = versioned(map, gen);
        base_rule(&mut b, chain, &|m| {
            addr_lookup(m, map_fam[i], i >= 2, &map, map_ids[i], true)
        })?;
    }
    Ok(b.finish())
}

/// The nf_tables batch that atomically replaces the program in force in table `inet
/// weft-policy`, as `inst` lists it, with `prog` (see the module doc). Pure; refuses what
/// the kernel would refuse.
pub fn policy_batch_for(prog: &Program, inst: &Installed) -> Result<Vec<u8>, SysError> {
    Ok(build(prog, inst)?.buf)
}

/// [`policy_batch_for`] a namespace without the table (the first write).
pub fn policy_batch(prog: &Program) -> Result<Vec<u8>, SysError> {
    policy_batch_for(prog, &Installed::default())
}

/// How long [`apply_policy`] keeps listing the table again when another writer (of any table:
/// the ruleset has one generation id) committed between its listing and its batch.
const APPLY_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// What [`apply_policy`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The generation now in force (the suffix of its objects' names).
    pub generation: u64,
    /// Batches sent: more than 1 when another writer's commit made a listing stale.
    pub attempts: u32,
}

/// Writes `prog` into the calling thread's network namespace in one transaction: on any
/// error nothing changes, and the error names the refused message ("set x", "rule 3 of
/// chain y"). Lists the table first (what is stale, the generation in force); if the
/// ruleset changes in between, the kernel refuses the batch and it is built again. Needs
/// CAP_NET_ADMIN.
pub fn apply_policy(prog: &Program) -> Result<Applied, SysError> {
    apply_policy_with(prog, |_| {})
}

/// [`apply_policy`], calling `between(attempt)` after each listing and before its batch is
/// sent (tests make another writer commit there, to see the stale batch refused and built
/// again).
#[doc(hidden)]
pub fn apply_policy_with(
    prog: &Program,
    mut between: impl FnMut(u32),
) -> Result<Applied, SysError> {
    let ctx = format!("writing nftables table inet {TABLE}");
    let mut sock = Socket::open().map_err(|e| SysError::io(format!("{ctx}: socket"), e))?;
    // Query sequence numbers stay clear of the batch's (1..).
    let mut seq = 1u32 << 30;
    let start = std::time::Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let inst = installed::installed(&mut sock, &mut seq)
            .map_err(|e| SysError::io(format!("{ctx}: listing it"), e))?;
        let b = build(prog, &inst)?;
        between(attempts);
        match send_batch_on(&mut sock, &b.buf, b.next_seq() + 1)
            .map_err(|e| SysError::io(ctx.clone(), e))?
        {
            Ok(()) => {
                return Ok(Applied {
                    generation: inst.next(),
                    attempts,
                })
            }
            Err(r) if r.errno == libc::ERESTART && r.seq == 1 => {
                if start.elapsed() > APPLY_PATIENCE {
                    return Err(refused(
                        format!(
                            "{ctx}: other writers changed the ruleset under each of {attempts} \
                             attempts in {:?}",
                            start.elapsed()
                        ),
                        &r,
                    ));
                }
            }
            Err(r) => {
                return Err(refused(
                    format!("{ctx}: the kernel refused {}", b.describe(r.seq)),
                    &r,
                ))
            }
        }
    }
}

/// What table `inet weft-policy` holds in the calling thread's network namespace: its chains
/// and sets by kernel name, and so the generation in force ([`Installed::current`]).
pub fn policy_listing() -> Result<Installed, SysError> {
    let ctx = format!("listing nftables table inet {TABLE}");
    let mut sock = Socket::open().map_err(|e| SysError::io(format!("{ctx}: socket"), e))?;
    installed::installed(&mut sock, &mut 0).map_err(|e| SysError::io(ctx, e))
}

/// Deletes table `inet weft-policy` if it exists (no error if it does not).
pub fn remove_policy() -> Result<(), SysError> {
    let mut b = Batch::new(0);
    let m = b.msg(NFT_MSG_NEWTABLE, true);
    b.push(m, format!("table inet {TABLE} (create)"));
    let m = b.msg(NFT_MSG_DELTABLE, false);
    b.push(m, format!("table inet {TABLE} (delete)"));
    let b = b.finish();
    let ctx = format!("deleting nftables table inet {TABLE}");
    let mut sock = Socket::open().map_err(|e| SysError::io(format!("{ctx}: socket"), e))?;
    match send_batch_on(&mut sock, &b.buf, b.next_seq() + 1)
        .map_err(|e| SysError::io(ctx.clone(), e))?
    {
        Ok(()) => Ok(()),
        Err(r) => Err(refused(format!("{ctx}: {}", b.describe(r.seq)), &r)),
    }
}

/// Whether table `inet weft-policy` exists in the calling thread's network namespace (it
/// only ever exists whole, guard included, since it is written in one transaction).
pub fn policy_installed() -> Result<bool, SysError> {
    let ctx = format!("looking up nftables table inet {TABLE}");
    let mut sock = Socket::open().map_err(|e| SysError::io(format!("{ctx}: socket"), e))?;
    table_exists(&mut sock, 1).map_err(|e| SysError::io(ctx, e))
}

/// Whether table `inet weft-policy` exists (`NFT_MSG_GETTABLE`, sequence `seq`).
fn table_exists(sock: &mut Socket, seq: u32) -> io::Result<bool> {
    let mut m = Msg::new(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
        seq,
        NFPROTO_INET,
        0,
    );
    m.str(NFTA_TABLE_NAME, TABLE);
    match sock.ask(&m.finish(), seq) {
        Ok(replies) => Ok(replies.iter().any(|r| {
            r.kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE
                && attr(r.nfattrs(), NFTA_TABLE_NAME).map(nla_str).as_deref() == Some(TABLE)
        })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The counter of a rule's expression list, if it has one.
fn rule_counter(exprs: &[u8]) -> Result<Option<Counter>, SysError> {
    for (_, e) in attrs(exprs) {
        if attr(e, NFTA_EXPR_NAME).map(nla_str).as_deref() != Some("counter") {
            continue;
        }
        let d = attr(e, NFTA_EXPR_DATA).unwrap_or(&[]);
        let get = |k| attr(d, k).and_then(be_u64);
        return match (get(NFTA_COUNTER_PACKETS), get(NFTA_COUNTER_BYTES)) {
            (Some(packets), Some(bytes)) => Ok(Some(Counter { packets, bytes })),
            _ => Err(SysError::Unexpected("a counter without values".into())),
        };
    }
    Ok(None)
}

/// The sets a rule's expression list looks up.
fn rule_lookups(exprs: &[u8]) -> impl Iterator<Item = String> + '_ {
    attrs(exprs).filter_map(|(_, e)| {
        if attr(e, NFTA_EXPR_NAME).map(nla_str).as_deref() != Some("lookup") {
            return None;
        }
        attr(attr(e, NFTA_EXPR_DATA)?, NFTA_LOOKUP_SET).map(nla_str)
    })
}

/// The counters of table `inet weft-policy` (empty when there is no table): per regular
/// chain of the program in force (the generation the base chains look up), by its program
/// name, the counters of its rules that have one; and the guard's drop total.
pub fn read_counters() -> Result<PolicyCounters, SysError> {
    let ctx = format!("reading the rules of nftables table inet {TABLE}");
    let mut sock = Socket::open().map_err(|e| SysError::io(format!("{ctx}: socket"), e))?;
    sock.size_buffers(0, 4 << 20);
    for attempt in 1u32..=10 {
        let mut m = Msg::new(
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE,
            (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            attempt,
            NFPROTO_INET,
            0,
        );
        m.str(NFTA_RULE_TABLE, TABLE);
        let replies = match sock.dump(&m.finish(), attempt) {
            Ok(Some(r)) => r,
            Ok(None) => continue, // changed while dumping: again
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(PolicyCounters::default()),
            Err(e) => return Err(SysError::io(ctx, e)),
        };
        let mut out = PolicyCounters::default();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut regular: Vec<(String, usize, Counter)> = Vec::new();
        let mut current = None;
        for r in replies {
            if r.kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE {
                continue;
            }
            let a = r.nfattrs();
            if attr(a, NFTA_RULE_TABLE).map(nla_str).as_deref() != Some(TABLE) {
                continue;
            }
            let Some(chain) = attr(a, NFTA_RULE_CHAIN).map(nla_str) else {
                return Err(SysError::Unexpected(format!("{ctx}: a rule without chain")));
            };
            let i = index.entry(chain.clone()).or_insert(0);
            let pos = *i;
            *i += 1;
            let exprs = attr(a, NFTA_RULE_EXPRESSIONS).unwrap_or(&[]);
            let base = chain == EGRESS_CHAIN || chain == INGRESS_CHAIN;
            if base && current.is_none() {
                current = rule_lookups(exprs).find_map(|s| generation(&s));
            }
            let Some(c) = rule_counter(exprs)? else {
                continue;
            };
            if chain == EGRESS_CHAIN {
                out.guard.packets += c.packets;
                out.guard.bytes += c.bytes;
            } else if !base {
                regular.push((chain, pos, c));
            }
        }
        for (chain, pos, c) in regular {
            if current.is_some() && generation(&chain) == current {
                let name = unversioned(&chain).to_string();
                out.chains.entry(name).or_default().push((pos, c));
            }
        }
        return Ok(out);
    }
    Err(SysError::Unexpected(format!(
        "{ctx}: the ruleset kept changing during the dump"
    )))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
