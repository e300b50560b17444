//! The nftables program one node enforces, as values: what `weft-sys` writes into the kernel
//! (table `inet weft-policy`) in one atomic batch, and what [`Program::evaluate`] runs here in
//! userspace (the same decisions, for unit tests and for finding the live flows a change denies).
//!
//! The fixed frame around the program (`weft-sys` builds it, [`Program::evaluate`] models it;
//! in the kernel every set, map and chain below but the two base chains carries a generation
//! suffix, `.gN`, see `weft_sys::nft::policy`):
//!
//! ```text
//! table inet weft-policy {
//!   set guard4 / guard6          addresses of this node's pod ranges that are no placed pod
//!   map egress4 / egress6        local pod address : jump CHAIN   (pods isolated for egress)
//!   map ingress4 / ingress6      local pod address : jump CHAIN   (pods isolated for ingress)
//!   chain egress  { type filter hook forward priority -2; policy accept;
//!                   ct state established,related accept
//!                   ip saddr @guard4 counter drop; ip daddr @guard4 counter drop   (and ip6)
//!                   ip saddr vmap @egress4; ip6 saddr vmap @egress6 }
//!   chain ingress { type filter hook forward priority -1; policy accept;
//!                   ct state established,related accept
//!                   ip daddr vmap @ingress4; ip6 daddr vmap @ingress6 }
//!   the chains of `Program::chains`
//! }
//! ```
//!
//! An `accept` in a chain jumped to from `egress` ends `egress` only: the packet still goes
//! through `ingress` (a later base chain on the same hook); a `drop` ends everything. A chain
//! that ends without a verdict returns to where it was jumped from.

use std::net::IpAddr;

/// The address family of a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// A transport protocol a policy port names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// The IP protocol number (`meta l4proto`).
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Sctp => 132,
        }
    }

    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            132 => Some(Proto::Sctp),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
        }
    }
}

/// A named interval set of addresses of one family: `ranges` are inclusive, sorted and
/// disjoint (not even adjacent: touching ranges are merged). May be empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrSet {
    pub name: String,
    pub family: Family,
    pub ranges: Vec<(IpAddr, IpAddr)>,
}

impl AddrSet {
    pub fn contains(&self, ip: &IpAddr) -> bool {
        if Family::of(ip) != self.family {
            return false;
        }
        // Sorted and disjoint: the last range starting at or before `ip`.
        let i = self.ranges.partition_point(|(lo, _)| lo <= ip);
        i > 0 && *ip <= self.ranges[i - 1].1
    }
}

/// One condition of a rule; all of a rule's matches must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// The source address is in the named set (the packet's family must be the set's).
    Saddr(String),
    /// The destination address is in the named set.
    Daddr(String),
    /// `meta l4proto`.
    Proto(Proto),
    /// The transport destination port is in `lo..=hi` (TCP, UDP and SCTP all keep it at
    /// offset 2 of their header; comes after a [`Match::Proto`]).
    Dport { lo: u16, hi: u16 },
}

/// What a rule does when it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Jump(String),
}

/// A packet and byte counter on a rule; a new program starts it at these values (so counts
/// survive replacing the table).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    /// Counted when it matches (before the verdict).
    pub counter: Option<Counter>,
    pub verdict: Verdict,
}

/// A regular chain (no hook): reached only by `jump` from a map or another chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub rules: Vec<Rule>,
}

/// The whole program of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Program {
    /// Every set a rule names, plus [`GUARD4`] and [`GUARD6`] (always present, maybe empty).
    pub sets: Vec<AddrSet>,
    /// Local pods isolated for egress: their address and the chain that decides.
    pub egress: Vec<(IpAddr, String)>,
    /// Local pods isolated for ingress: their address and the chain that decides.
    pub ingress: Vec<(IpAddr, String)>,
    pub chains: Vec<Chain>,
    /// Starting values of the guard's drop counters (v4 and v6 together).
    pub guard_counter: Counter,
}

pub const GUARD4: &str = "guard4";
pub const GUARD6: &str = "guard6";
/// The name of the table (family inet) that holds the program.
pub const TABLE: &str = "weft-policy";

/// A packet as [`Program::evaluate`] sees it: the first packet of a connection (or any packet
/// of a flow whose conntrack entry is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// `None`: a protocol other than TCP, UDP and SCTP (ICMP, ...).
    pub proto: Option<Proto>,
    pub dport: u16,
}

/// What the program does with a forwarded packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Accept,
    /// Dropped by the guard: an address of this node's pod ranges that is no placed pod.
    Guard,
    /// Dropped in `chain` (the chain whose rule said drop, or that ended without accepting
    /// when it was the chain a map jumped to).
    Drop {
        chain: String,
    },
}

/// How deep `jump`s may nest (the kernel's limit is 16).
const MAX_DEPTH: usize = 16;

enum Flow {
    Accept,
    Drop(String),
    Return,
}

impl Program {
    pub fn set(&self, name: &str) -> Option<&AddrSet> {
        self.sets.iter().find(|s| s.name == name)
    }

    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.name == name)
    }

    /// What the kernel does with `p` on its forward hook (a new connection).
    pub fn evaluate(&self, p: &Packet) -> Decision {
        let guard = match Family::of(&p.src) {
            Family::V4 => GUARD4,
            Family::V6 => GUARD6,
        };
        if let Some(g) = self.set(guard) {
            if g.contains(&p.src) || g.contains(&p.dst) {
                return Decision::Guard;
            }
        }
        for (map, addr) in [(&self.egress, p.src), (&self.ingress, p.dst)] {
            let Some((_, chain)) = map.iter().find(|(ip, _)| *ip == addr) else {
                continue;
            };
            match self.run(chain, p, 0) {
                Flow::Accept => {}
                Flow::Drop(c) => return Decision::Drop { chain: c },
                // A map's chain that ends without a verdict lets the base chain go on; the
                // base chains' policy is accept.
                Flow::Return => {}
            }
        }
        Decision::Accept
    }

    fn run(&self, name: &str, p: &Packet, depth: usize) -> Flow {
        let Some(chain) = self.chain(name) else {
            // The kernel refuses a jump to a missing chain; weft-sys would have failed.
            return Flow::Drop(name.to_string());
        };
        if depth >= MAX_DEPTH {
            return Flow::Drop(name.to_string());
        }
        for rule in &chain.rules {
            if !self.matches(rule, p) {
                continue;
            }
            match &rule.verdict {
                Verdict::Accept => return Flow::Accept,
                Verdict::Drop => return Flow::Drop(name.to_string()),
                Verdict::Jump(to) => match self.run(to, p, depth + 1) {
                    Flow::Return => {}
                    other => return other,
                },
            }
        }
        Flow::Return
    }

    fn matches(&self, rule: &Rule, p: &Packet) -> bool {
        rule.matches.iter().all(|m| match m {
            Match::Saddr(s) => self.set(s).is_some_and(|s| s.contains(&p.src)),
            Match::Daddr(s) => self.set(s).is_some_and(|s| s.contains(&p.dst)),
            Match::Proto(pr) => p.proto == Some(*pr),
            Match::Dport { lo, hi } => p.proto.is_some() && *lo <= p.dport && p.dport <= *hi,
        })
    }
}
