//! What table `inet weft-policy` holds now, read from the kernel before a write, and the
//! generation names of its objects.
//!
//! Every set, map and regular chain is written under a versioned name, `NAME.gGEN`; the two
//! base chains keep theirs and are never deleted. A write creates generation `GEN + 1` next to
//! the one in force, swaps the base chains' rules to it and deletes what is older than the one
//! it replaces (see the module doc of `policy`). In: nf_tables dumps of the table's chains and
//! sets and the ruleset generation id. Out: [`Installed`].

use super::*;

/// Separates a program name from its generation: `in/ns/pod.g12`. Characters `nft` takes in
/// a name unquoted (so `nft list chain inet weft-policy in/ns/pod.g12` works); the last one is
/// the separator whatever the name holds.
pub(super) const GEN_SEP: &str = ".g";
/// The longest generation suffix: the separator and the 20 digits of a `u64`.
pub(super) const GEN_SUFFIX_MAX: usize = 22;

const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_GEN_ID: u16 = 1;
const NFT_SET_ANONYMOUS: u32 = 0x1;

/// `NAME.gGEN`.
pub(super) fn versioned(name: &str, gen: u64) -> String {
    format!("{name}{GEN_SEP}{gen}")
}

/// A versioned name split into (program name, generation), if it is one.
fn split(name: &str) -> Option<(&str, u64)> {
    let (n, g) = name.rsplit_once(GEN_SEP)?;
    if g.is_empty() || !g.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((n, g.parse().ok()?))
}

/// The generation of a versioned name, if it is one.
pub(super) fn generation(name: &str) -> Option<u64> {
    split(name).map(|(_, g)| g)
}

/// The program name of a versioned name.
pub(super) fn unversioned(name: &str) -> &str {
    split(name).map_or(name, |(n, _)| n)
}

/// Table `inet weft-policy` as the kernel holds it (all empty when there is no table).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// The ruleset generation id the listing is valid at; a batch carrying it is refused
    /// (`ERESTART`) if anything changed since. 0 checks nothing.
    pub genid: u32,
    /// Whether base chains `egress` and `ingress` exist.
    pub base: [bool; 2],
    /// Every other chain, by name.
    pub chains: Vec<String>,
    /// Every named set and map.
    pub sets: Vec<String>,
}

impl Installed {
    /// The generation in force: the newest one present (a write creates a generation and
    /// points the base chains at it in the same transaction).
    pub fn current(&self) -> Option<u64> {
        self.chains
            .iter()
            .chain(&self.sets)
            .filter_map(|n| generation(n))
            .max()
    }

    /// The generation the next write creates.
    pub fn next(&self) -> u64 {
        self.current().map_or(1, |g| g.saturating_add(1))
    }

    /// Chains and sets a write deletes: everything but the base chains and the generation in
    /// force (older generations, and names of no generation, such as a table written by an
    /// older weft).
    pub fn stale(&self) -> (Vec<&str>, Vec<&str>) {
        let cur = self.current();
        let keep = |n: &&String| cur.is_some() && generation(n) == cur;
        (
            self.chains
                .iter()
                .filter(|n| !keep(n))
                .map(String::as_str)
                .collect(),
            self.sets
                .iter()
                .filter(|n| !keep(n))
                .map(String::as_str)
                .collect(),
        )
    }
}

/// The ruleset generation id (`NFT_MSG_GETGEN`).
fn genid(sock: &mut Socket, seq: u32) -> io::Result<u32> {
    let m = Msg::new(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
        seq,
        libc::AF_UNSPEC as u8,
        0,
    );
    let id = sock
        .ask(&m.finish(), seq)?
        .iter()
        .filter(|r| r.kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN)
        .find_map(|r| {
            attr(r.nfattrs(), NFTA_GEN_ID)
                .and_then(|d| d.get(..4))
                .and_then(|d| d.try_into().ok())
                .map(u32::from_be_bytes)
        });
    id.ok_or_else(|| io::Error::other("the kernel's generation answer has no id"))
}

/// Dumps the table's chains or sets (`get` GETCHAIN or GETSET, answered by `new`): (name, is
/// a base chain, set flags); `None` when the dump was interrupted by a change.
fn dump_names(
    sock: &mut Socket,
    seq: u32,
    get: u16,
    new: u16,
) -> io::Result<Option<Vec<(String, bool, u32)>>> {
    let mut m = Msg::new(
        (NFNL_SUBSYS_NFTABLES << 8) | get,
        (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
        seq,
        NFPROTO_INET,
        0,
    );
    m.str(NFTA_CHAIN_TABLE, TABLE); // NFTA_SET_TABLE too: attribute 1
    let replies = match sock.dump(&m.finish(), seq) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Some(Vec::new())),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for r in replies {
        if r.kind != (NFNL_SUBSYS_NFTABLES << 8) | new || r.family() != NFPROTO_INET {
            continue;
        }
        let a = r.nfattrs();
        if attr(a, NFTA_SET_TABLE).map(nla_str).as_deref() != Some(TABLE) {
            continue;
        }
        let chain = new == NFT_MSG_NEWCHAIN;
        let name_attr = if chain {
            NFTA_CHAIN_NAME
        } else {
            NFTA_SET_NAME
        };
        let Some(name) = attr(a, name_attr).map(nla_str) else {
            continue;
        };
        let hook = chain && attr(a, NFTA_CHAIN_HOOK).is_some();
        let flags = if chain {
            0
        } else {
            attr(a, NFTA_SET_FLAGS)
                .and_then(|d| d.get(..4))
                .and_then(|d| d.try_into().ok())
                .map_or(0, u32::from_be_bytes)
        };
        out.push((name, hook, flags));
    }
    Ok(Some(out))
}

/// What table `inet weft-policy` holds in the calling thread's network namespace, with the
/// generation id the listing is valid at.
pub(super) fn installed(sock: &mut Socket, seq: &mut u32) -> io::Result<Installed> {
    for _ in 0..10 {
        let mut next = || {
            *seq = seq.wrapping_add(1);
            *seq
        };
        let before = genid(sock, next())?;
        let Some(chains) = dump_names(sock, next(), NFT_MSG_GETCHAIN, NFT_MSG_NEWCHAIN)? else {
            continue;
        };
        let Some(sets) = dump_names(sock, next(), NFT_MSG_GETSET, NFT_MSG_NEWSET)? else {
            continue;
        };
        if genid(sock, next())? != before {
            continue;
        }
        let mut out = Installed {
            genid: before,
            ..Default::default()
        };
        for (name, hook, _) in chains {
            match name.as_str() {
                EGRESS_CHAIN if hook => out.base[0] = true,
                INGRESS_CHAIN if hook => out.base[1] = true,
                _ => out.chains.push(name),
            }
        }
        out.sets = sets
            .into_iter()
            .filter(|(_, _, flags)| flags & NFT_SET_ANONYMOUS == 0)
            .map(|(n, _, _)| n)
            .collect();
        return Ok(out);
    }
    Err(io::Error::other(
        "the ruleset kept changing while table inet weft-policy was listed",
    ))
}
