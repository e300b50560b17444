//! Unit tests of the pure batch builder: message order, interval encoding, validation.

use super::*;
use weft_core::netpol::program::{Chain, Proto};

/// A parsed message of a batch: nf_tables message type (without subsystem), seq, attributes.
#[derive(Debug)]
struct M {
    kind: u16,
    seq: u32,
    attrs: Vec<u8>,
}

impl M {
    fn name(&self, k: u16) -> Option<String> {
        attr(&self.attrs, k).map(nla_str)
    }
}

fn parse(b: &[u8]) -> Vec<M> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < b.len() {
        let len = u32::from_ne_bytes(b[at..at + 4].try_into().expect("test data")) as usize;
        assert!(len >= HDR && len.is_multiple_of(4) && at + len <= b.len());
        let kind = u16::from_ne_bytes(b[at + 4..at + 6].try_into().expect("test data"));
        let seq = u32::from_ne_bytes(b[at + 8..at + 12].try_into().expect("test data"));
        out.push(M {
            kind: if kind >> 8 == NFNL_SUBSYS_NFTABLES {
                kind & 0xff
            } else {
                kind
            },
            seq,
            attrs: b[at + HDR..at + len].to_vec(),
        });
        at += len;
    }
    out
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test data")
}

fn set(name: &str, family: Family, ranges: &[(&str, &str)]) -> AddrSet {
    AddrSet {
        name: name.into(),
        family,
        ranges: ranges.iter().map(|(l, h)| (ip(l), ip(h))).collect(),
    }
}

fn rule(matches: Vec<Match>, verdict: Verdict) -> Rule {
    Rule {
        matches,
        counter: None,
        verdict,
    }
}

fn sample() -> Program {
    Program {
        sets: vec![
            set(GUARD4, Family::V4, &[("10.42.1.200", "10.42.1.255")]),
            set(GUARD6, Family::V6, &[]),
            set("peers", Family::V4, &[("10.42.0.0", "10.42.255.255")]),
        ],
        egress: vec![(ip("10.42.1.10"), "eg/x/a".into())],
        ingress: vec![
            (ip("10.42.1.10"), "in/x/a".into()),
            (ip("fd00::a"), "in/x/a".into()),
        ],
        chains: vec![
            Chain {
                name: "in/x/a".into(),
                rules: vec![
                    rule(
                        vec![Match::Saddr("peers".into())],
                        Verdict::Jump("ports".into()),
                    ),
                    Rule {
                        matches: Vec::new(),
                        counter: Some(Counter {
                            packets: 0x0102030405060708,
                            bytes: 9,
                        }),
                        verdict: Verdict::Drop,
                    },
                ],
            },
            Chain {
                name: "ports".into(),
                rules: vec![
                    rule(
                        vec![Match::Proto(Proto::Tcp), Match::Dport { lo: 80, hi: 80 }],
                        Verdict::Accept,
                    ),
                    rule(
                        vec![
                            Match::Proto(Proto::Udp),
                            Match::Dport { lo: 5000, hi: 6000 },
                        ],
                        Verdict::Accept,
                    ),
                ],
            },
            Chain {
                name: "eg/x/a".into(),
                rules: vec![rule(Vec::new(), Verdict::Accept)],
            },
        ],
        guard_counter: Counter {
            packets: 5,
            bytes: 500,
        },
    }
}

#[test]
fn message_order() {
    let b = policy_batch(&sample()).expect("test data");
    let ms = parse(&b);
    assert_eq!(ms.first().expect("test data").kind, (NFNL_MSG_BATCH_BEGIN));
    assert_eq!(ms.last().expect("test data").kind, (NFNL_MSG_BATCH_END));
    let kinds: Vec<u16> = ms.iter().map(|m| m.kind).collect();
    // A first write: the table, then the base chains (hooked once, for good).
    assert_eq!(
        &kinds[1..4],
        &[NFT_MSG_NEWTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWCHAIN]
    );
    assert!(!kinds.contains(&NFT_MSG_DELTABLE));
    // Sequence numbers are 1.. in order.
    for (i, m) in ms.iter().enumerate() {
        assert_eq!(m.seq, i as u32 + 1);
    }
    let pos = |f: &dyn Fn(&M) -> bool| -> Vec<usize> {
        ms.iter()
            .enumerate()
            .filter(|(_, m)| f(m))
            .map(|(i, _)| i)
            .collect()
    };
    let is_map = |m: &M, k: u16| {
        MAPS.iter()
            .any(|n| m.name(k).as_deref() == Some(&versioned(n, 1)))
    };
    let sets = pos(&|m| m.kind == NFT_MSG_NEWSET && !is_map(m, NFTA_SET_NAME));
    let maps = pos(&|m| m.kind == NFT_MSG_NEWSET && is_map(m, NFTA_SET_NAME));
    let set_elems = pos(&|m| m.kind == NFT_MSG_NEWSETELEM && !is_map(m, NFTA_SET_ELEM_LIST_SET));
    let map_elems = pos(&|m| m.kind == NFT_MSG_NEWSETELEM && is_map(m, NFTA_SET_ELEM_LIST_SET));
    let chains = pos(&|m| m.kind == NFT_MSG_NEWCHAIN);
    let rules = pos(&|m| m.kind == NFT_MSG_NEWRULE);
    assert_eq!(sets.len(), 3);
    assert_eq!(maps.len(), 4);
    assert_eq!(chains.len(), 5, "three regular chains and two base chains");
    assert_eq!(map_elems.len(), 3, "egress4, ingress4, ingress6");
    assert_eq!(rules.len(), 5 + 7 + 3);
    let max = |v: &[usize]| *v.iter().max().expect("test data");
    let min = |v: &[usize]| *v.iter().min().expect("test data");
    assert!(max(&sets) < min(&rules), "sets before rules");
    assert!(max(&set_elems) < min(&rules));
    assert!(max(&maps) < min(&rules));
    assert!(max(&chains) < min(&map_elems), "chains before map elements");
    assert!(max(&chains) < min(&rules), "chains before rules");
    // The base chains' rules last.
    let base_rules = pos(&|m| {
        m.kind == NFT_MSG_NEWRULE
            && [EGRESS_CHAIN, INGRESS_CHAIN]
                .contains(&m.name(NFTA_RULE_CHAIN).as_deref().unwrap_or(""))
    });
    assert_eq!(base_rules.len(), 7 + 3);
    assert!(min(&base_rules) > max(&map_elems));
    assert_eq!(max(&base_rules), ms.len() - 2);
    // Each set's elements come after the set.
    for &e in &set_elems {
        let name = ms[e].name(NFTA_SET_ELEM_LIST_SET).expect("test data");
        let s = sets
            .iter()
            .find(|&&s| ms[s].name(NFTA_SET_NAME).as_deref() == Some(&name))
            .expect("test data");
        assert!(*s < e);
    }
    // Base chains first among chains, hooked on forward at -2 / -1; the others of
    // generation 1.
    let names: Vec<String> = chains
        .iter()
        .map(|&c| ms[c].name(NFTA_CHAIN_NAME).expect("test data"))
        .collect();
    assert_eq!(
        names,
        ["egress", "ingress", "in/x/a.g1", "ports.g1", "eg/x/a.g1"]
    );
    for (&c, prio) in chains[..2].iter().zip([-2i32, -1]) {
        let hook = attr(&ms[c].attrs, NFTA_CHAIN_HOOK).expect("test data");
        let p = attr(hook, NFTA_HOOK_PRIORITY).expect("test data");
        assert_eq!(i32::from_be_bytes(p.try_into().expect("test data")), prio);
        let h = attr(hook, NFTA_HOOK_HOOKNUM).expect("test data");
        assert_eq!(
            u32::from_be_bytes(h.try_into().expect("test data")),
            NF_INET_FORWARD
        );
    }
    // Every message is for table inet weft-policy.
    for m in &ms[1..ms.len() - 1] {
        assert_eq!(m.name(1).as_deref(), Some(TABLE));
    }
}

fn rule_exprs(m: &M) -> Vec<String> {
    attrs(attr(&m.attrs, NFTA_RULE_EXPRESSIONS).expect("test data"))
        .map(|(_, e)| attr(e, NFTA_EXPR_NAME).map(nla_str).expect("test data"))
        .collect()
}

#[test]
fn rule_contents() {
    let b = build(&sample(), &Installed::default()).expect("test data");
    let ms = parse(&b.buf);
    let rules: Vec<&M> = ms.iter().filter(|m| m.kind == NFT_MSG_NEWRULE).collect();
    // in/x/a rule 0: meta nfproto, cmp, payload, lookup, immediate (jump).
    assert_eq!(
        rule_exprs(rules[0]),
        ["meta", "cmp", "payload", "lookup", "immediate"]
    );
    // rule 1: counter with its start values (big endian), then drop.
    assert_eq!(rule_exprs(rules[1]), ["counter", "immediate"]);
    assert_eq!(
        rule_counter(attr(&rules[1].attrs, NFTA_RULE_EXPRESSIONS).expect("test data"))
            .expect("test data"),
        Some(Counter {
            packets: 0x0102030405060708,
            bytes: 9
        })
    );
    assert!(rules[1]
        .attrs
        .windows(8)
        .any(|w| w == [1, 2, 3, 4, 5, 6, 7, 8]));
    // ports: a single port is a cmp, a range a range expression; ports big endian.
    assert_eq!(
        rule_exprs(rules[2]),
        ["meta", "cmp", "payload", "cmp", "immediate"]
    );
    assert_eq!(
        rule_exprs(rules[3]),
        ["meta", "cmp", "payload", "range", "immediate"]
    );
    assert!(rules[3]
        .attrs
        .windows(2)
        .any(|w| w == 5000u16.to_be_bytes()));
    assert!(rules[3]
        .attrs
        .windows(2)
        .any(|w| w == 6000u16.to_be_bytes()));
    // The base chains: ct state first, guard rules with counters (the start value on the
    // first), the vmaps.
    let egress: Vec<&&M> = rules
        .iter()
        .filter(|m| m.name(NFTA_RULE_CHAIN).as_deref() == Some(EGRESS_CHAIN))
        .collect();
    assert_eq!(egress.len(), 7);
    assert_eq!(rule_exprs(egress[0]), ["ct", "bitwise", "cmp", "immediate"]);
    let guard: Vec<Option<Counter>> = egress[1..5]
        .iter()
        .map(|m| {
            rule_counter(attr(&m.attrs, NFTA_RULE_EXPRESSIONS).expect("test data"))
                .expect("test data")
        })
        .collect();
    assert_eq!(
        guard[0],
        Some(Counter {
            packets: 5,
            bytes: 500
        })
    );
    assert!(guard[1..].iter().all(|c| *c == Some(Counter::default())));
    assert_eq!(rule_exprs(egress[5]), ["meta", "cmp", "payload", "lookup"]);
    // Error reports name the message.
    let seq = rules[1].seq;
    assert_eq!(b.describe(seq), "rule 1 of chain in/x/a");
    assert_eq!(b.describe(1), "the batch as a whole (commit)");
    let set_seq = ms
        .iter()
        .find(|m| m.kind == NFT_MSG_NEWSET && m.name(NFTA_SET_NAME).as_deref() == Some("peers.g1"))
        .expect("test data")
        .seq;
    assert_eq!(b.describe(set_seq), "set peers");
}

fn keys(s: &AddrSet) -> Vec<(String, bool)> {
    interval_elements(s)
        .expect("test data")
        .into_iter()
        .map(|(k, end)| {
            let a = match k.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(k.as_slice()).expect("test data")),
                _ => IpAddr::from(<[u8; 16]>::try_from(k.as_slice()).expect("test data")),
            };
            (a.to_string(), end)
        })
        .collect()
}

fn k(v: &[(&str, bool)]) -> Vec<(String, bool)> {
    v.iter().map(|(a, e)| (a.to_string(), *e)).collect()
}

#[test]
fn interval_encoding() {
    // [lo, hi] is lo and an interval end at hi+1, after a leading end at 0.
    let s = set("s", Family::V4, &[("10.0.0.0", "10.0.0.255")]);
    assert_eq!(
        keys(&s),
        k(&[("0.0.0.0", true), ("10.0.0.0", false), ("10.0.1.0", true)])
    );
    // An ipBlock with an except: two ranges around the hole; a single address.
    let s = set(
        "s",
        Family::V4,
        &[
            ("10.0.0.0", "10.0.0.9"),
            ("10.0.0.11", "10.0.0.255"),
            ("192.168.1.1", "192.168.1.1"),
        ],
    );
    assert_eq!(
        keys(&s),
        k(&[
            ("0.0.0.0", true),
            ("10.0.0.0", false),
            ("10.0.0.10", true),
            ("10.0.0.11", false),
            ("10.0.1.0", true),
            ("192.168.1.1", false),
            ("192.168.1.2", true),
        ])
    );
    // Starting at 0: no leading end; ending at the last address: no trailing end.
    let s = set(
        "s",
        Family::V4,
        &[
            ("0.0.0.0", "9.255.255.255"),
            ("11.0.0.0", "255.255.255.255"),
        ],
    );
    assert_eq!(
        keys(&s),
        k(&[("0.0.0.0", false), ("10.0.0.0", true), ("11.0.0.0", false)])
    );
    let s = set("s", Family::V4, &[("0.0.0.0", "255.255.255.255")]);
    assert_eq!(keys(&s), k(&[("0.0.0.0", false)]));
    // Adjacent ranges merge.
    let s = set(
        "s",
        Family::V4,
        &[("10.0.0.0", "10.0.0.9"), ("10.0.0.10", "10.0.0.20")],
    );
    assert_eq!(
        keys(&s),
        k(&[("0.0.0.0", true), ("10.0.0.0", false), ("10.0.0.21", true)])
    );
    // IPv6, up to the last address.
    let s = set(
        "s",
        Family::V6,
        &[
            ("fd00::", "fd00::ffff"),
            ("fe00::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
        ],
    );
    assert_eq!(
        keys(&s),
        k(&[
            ("::", true),
            ("fd00::", false),
            ("fd00::1:0", true),
            ("fe00::", false)
        ])
    );
    assert!(keys(&set("s", Family::V6, &[])).is_empty());
    // Unsorted, overlapping, reversed and wrong-family ranges are refused.
    for bad in [
        set(
            "s",
            Family::V4,
            &[("10.0.0.5", "10.0.0.9"), ("10.0.0.0", "10.0.0.1")],
        ),
        set(
            "s",
            Family::V4,
            &[("10.0.0.0", "10.0.0.9"), ("10.0.0.9", "10.0.0.10")],
        ),
        set("s", Family::V4, &[("10.0.0.9", "10.0.0.0")]),
        set("s", Family::V4, &[("fd00::", "fd00::1")]),
    ] {
        assert!(matches!(
            interval_elements(&bad),
            Err(SysError::InvalidArgument(_))
        ));
    }
}

#[test]
fn elements_split_across_messages() {
    let mut p = sample();
    p.sets.push(AddrSet {
        name: "many".into(),
        family: Family::V6,
        ranges: (0..5000u128)
            .map(|i| {
                let a = IpAddr::from(((0xfd00u128 << 112) | (i << 8)).to_be_bytes());
                (a, a)
            })
            .collect(),
    });
    let ms = parse(&policy_batch(&p).expect("test data"));
    let elems: Vec<&M> = ms
        .iter()
        .filter(|m| {
            m.kind == NFT_MSG_NEWSETELEM
                && m.name(NFTA_SET_ELEM_LIST_SET).as_deref() == Some("many.g1")
        })
        .collect();
    assert!(elems.len() > 1);
    let total: usize = elems
        .iter()
        .map(|m| attrs(attr(&m.attrs, NFTA_SET_ELEM_LIST_ELEMENTS).expect("test data")).count())
        .sum();
    assert_eq!(total, 1 + 2 * 5000);
}

fn refused_with(p: &Program, what: &str) {
    match policy_batch(p) {
        Err(SysError::InvalidArgument(m)) => assert!(m.contains(what), "{m:?} lacks {what:?}"),
        other => panic!("expected InvalidArgument({what}), got {other:?}"),
    }
}

#[test]
fn validation() {
    // Names: any bytes but NUL, 1 to 233 of them (255 with the generation suffix).
    let mut p = sample();
    p.chains[2].name = "x".repeat(233);
    p.egress[0].1 = "x".repeat(233);
    assert!(policy_batch(&p).is_ok());
    p.chains[2].name = "x".repeat(234);
    p.egress[0].1 = "x".repeat(234);
    refused_with(&p, "name");
    let mut p = sample();
    p.chains[2].name = String::new();
    refused_with(&p, "name");
    let mut p = sample();
    p.sets[2].name = "a\0b".into();
    refused_with(&p, "name");
    // Reserved and duplicate names.
    let mut p = sample();
    p.chains[2].name = "egress".into();
    refused_with(&p, "reserved");
    let mut p = sample();
    p.sets[2].name = "ingress6".into();
    refused_with(&p, "reserved");
    let mut p = sample();
    p.chains[2].name = "ports".into();
    refused_with(&p, "two chains");
    let mut p = sample();
    p.sets[2].name = GUARD4.into();
    refused_with(&p, "");
    // Unknown sets and chains, loops, a port without a protocol, wrong-family guards.
    let mut p = sample();
    p.chains[0].rules[0].matches = vec![Match::Daddr("nope".into())];
    refused_with(&p, "no set");
    let mut p = sample();
    p.chains[0].rules[0].verdict = Verdict::Jump("nope".into());
    refused_with(&p, "no chain");
    let mut p = sample();
    p.ingress.push((ip("10.42.1.11"), "nope".into()));
    refused_with(&p, "no chain");
    let mut p = sample();
    p.ingress.push((ip("10.42.1.10"), "ports".into()));
    refused_with(&p, "twice");
    let mut p = sample();
    p.chains[1]
        .rules
        .push(rule(Vec::new(), Verdict::Jump("in/x/a".into())));
    refused_with(&p, "itself");
    let mut p = sample();
    p.chains[1].rules[0].matches = vec![Match::Dport { lo: 1, hi: 2 }];
    refused_with(&p, "protocol");
    let mut p = sample();
    p.chains[1].rules[1].matches[1] = Match::Dport { lo: 2, hi: 1 };
    refused_with(&p, "port range");
    let mut p = sample();
    p.sets[0].family = Family::V6;
    p.sets[0].ranges.clear();
    refused_with(&p, "family");
    // Missing guards are created empty.
    let mut p = sample();
    p.sets.retain(|s| s.name != GUARD4 && s.name != GUARD6);
    let ms = parse(&policy_batch(&p).expect("test data"));
    let names: Vec<String> = ms
        .iter()
        .filter(|m| m.kind == NFT_MSG_NEWSET)
        .map(|m| unversioned(&m.name(NFTA_SET_NAME).expect("test data")).to_string())
        .collect();
    assert_eq!(
        names,
        ["peers", GUARD4, GUARD6, "egress4", "egress6", "ingress4", "ingress6"]
    );
}

#[test]
fn jump_depth_limit() {
    // The map's chain is level 1; the kernel refuses level 16.
    let deep = |n: usize| {
        let mut p = sample();
        for i in 0..n {
            p.chains.push(Chain {
                name: format!("d{i}"),
                rules: vec![rule(Vec::new(), Verdict::Jump(format!("d{}", i + 1)))],
            });
        }
        p.chains.push(Chain {
            name: format!("d{n}"),
            rules: Vec::new(),
        });
        p
    };
    let mut p = deep(14);
    p.egress.push((ip("10.42.1.12"), "d0".into()));
    assert!(policy_batch(&p).is_ok());
    let mut p = deep(15);
    // Unreachable from a map: the kernel does not mind.
    assert!(policy_batch(&p).is_ok());
    p.egress.push((ip("10.42.1.12"), "d0".into()));
    refused_with(&p, "deeper");
}

#[test]
fn generation_names() {
    assert_eq!(versioned("in/ns/pod", 12), "in/ns/pod.g12");
    assert_eq!(generation("in/ns/pod.g12"), Some(12));
    assert_eq!(generation("a.g1.g2"), Some(2));
    assert_eq!(unversioned("a.g1.g2"), "a.g1");
    for plain in [
        "ingress4", "a.g", "a.gx", "a.g1x", ".g", "a.g-1", "a.1", "a.G1", "a~1",
    ] {
        assert_eq!(generation(plain), None, "{plain}");
        assert_eq!(unversioned(plain), plain);
    }
    assert_eq!(
        generation(&versioned("x", u64::MAX)).map(|g| g == u64::MAX),
        Some(true)
    );
    assert_eq!(versioned("", u64::MAX).len(), installed::GEN_SUFFIX_MAX);
}

fn held() -> Installed {
    Installed {
        genid: 77,
        base: [true, true],
        chains: ["in/x/a.g3", "ports.g3", "old.g2", "in/x/a.g2", "legacy"]
            .map(String::from)
            .to_vec(),
        sets: [
            "peers.g3",
            "guard4.g3",
            "guard6.g3",
            "egress4.g3",
            "egress6.g3",
            "ingress4.g3",
            "ingress6.g3",
            "s0.g2",
            "ingress4",
        ]
        .map(String::from)
        .to_vec(),
    }
}

#[test]
fn installed_generations() {
    let i = held();
    assert_eq!(i.current(), Some(3));
    assert_eq!(i.next(), 4);
    let (chains, sets) = i.stale();
    assert_eq!(chains, ["old.g2", "in/x/a.g2", "legacy"]);
    assert_eq!(sets, ["s0.g2", "ingress4"]);
    // A table of an older weft (no generations): all of it is stale, and the next is 1.
    let old = Installed {
        chains: vec!["in/x/a".into()],
        sets: vec!["ingress4".into()],
        base: [true, true],
        ..Default::default()
    };
    assert_eq!(old.current(), None);
    assert_eq!(old.next(), 1);
    assert_eq!(old.stale(), (vec!["in/x/a"], vec!["ingress4"]));
    assert_eq!(Installed::default().next(), 1);
}

#[test]
fn replace_leaves_the_generation_in_force_alone() {
    let b = build(&sample(), &held()).expect("test data");
    let ms = parse(&b.buf);
    // The batch is for the listed ruleset generation.
    let begin = &ms[0];
    assert_eq!(begin.kind, NFNL_MSG_BATCH_BEGIN);
    assert_eq!(
        attr(&begin.attrs, NFNL_BATCH_GENID),
        Some(&77u32.to_be_bytes()[..])
    );
    let name_of = |m: &M| -> String {
        let k = match m.kind {
            NFT_MSG_NEWCHAIN | NFT_MSG_DELCHAIN => NFTA_CHAIN_NAME,
            NFT_MSG_NEWSET | NFT_MSG_DELSET => NFTA_SET_NAME,
            NFT_MSG_NEWSETELEM => NFTA_SET_ELEM_LIST_SET,
            NFT_MSG_NEWRULE | NFT_MSG_DELRULE => NFTA_RULE_CHAIN,
            _ => 1,
        };
        m.name(k).unwrap_or_default()
    };
    // Nothing of generation 3 (in force) is named; everything created is generation 4.
    for m in &ms[1..ms.len() - 1] {
        let n = name_of(m);
        assert!(!n.ends_with(".g3"), "{} touches {n}", b.describe(m.seq));
        if matches!(m.kind, NFT_MSG_NEWSET | NFT_MSG_NEWSETELEM)
            || (m.kind == NFT_MSG_NEWCHAIN && n != EGRESS_CHAIN && n != INGRESS_CHAIN)
        {
            assert!(n.ends_with(".g4"), "{} creates {n}", b.describe(m.seq));
        }
    }
    // The base chains are not created again (their hooks stay) but flushed.
    assert!(!ms.iter().any(|m| m.kind == NFT_MSG_NEWCHAIN
        && [EGRESS_CHAIN, INGRESS_CHAIN].contains(&name_of(m).as_str())));
    let at = |kind: u16, name: &str| -> usize {
        ms.iter()
            .position(|m| m.kind == kind && name_of(m) == name)
            .unwrap_or_else(|| panic!("no message {kind} for {name}"))
    };
    let flush_eg = at(NFT_MSG_DELRULE, EGRESS_CHAIN);
    let flush_in = at(NFT_MSG_DELRULE, INGRESS_CHAIN);
    // The stale: rules flushed, then sets deleted, then chains deleted.
    let stale_chains = ["old.g2", "in/x/a.g2", "legacy"];
    let flushes: Vec<usize> = stale_chains
        .iter()
        .map(|c| at(NFT_MSG_DELRULE, c))
        .collect();
    let del_sets = [at(NFT_MSG_DELSET, "s0.g2"), at(NFT_MSG_DELSET, "ingress4")];
    let del_chains: Vec<usize> = stale_chains
        .iter()
        .map(|c| at(NFT_MSG_DELCHAIN, c))
        .collect();
    let max = |v: &[usize]| *v.iter().max().expect("test data");
    let min = |v: &[usize]| *v.iter().min().expect("test data");
    assert!(flush_eg.max(flush_in) < min(&flushes));
    assert!(max(&flushes) < min(&del_sets));
    assert!(max(&del_sets) < min(&del_chains));
    let first_new = ms
        .iter()
        .position(|m| m.kind == NFT_MSG_NEWSET)
        .expect("test data");
    assert!(max(&del_chains) < first_new);
    assert_eq!(
        ms.iter().filter(|m| m.kind == NFT_MSG_DELSET).count(),
        2,
        "only the stale sets go"
    );
    // The new base rules look up generation 4's guards and maps.
    let base_lookups: Vec<String> = ms
        .iter()
        .filter(|m| {
            m.kind == NFT_MSG_NEWRULE
                && [EGRESS_CHAIN, INGRESS_CHAIN].contains(&name_of(m).as_str())
        })
        .flat_map(|m| {
            rule_lookups(attr(&m.attrs, NFTA_RULE_EXPRESSIONS).expect("test data"))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        base_lookups,
        [
            "guard4.g4",
            "guard4.g4",
            "guard6.g4",
            "guard6.g4",
            "egress4.g4",
            "egress6.g4",
            "ingress4.g4",
            "ingress6.g4"
        ]
    );
    // Jumps and map elements go to generation 4's chains.
    let has = |n: &[u8]| b.buf.windows(n.len()).any(|w| w == n);
    assert!(has(b"ports.g4\0") && has(b"in/x/a.g4\0"));
    assert!(!has(b"ports.g3") && !has(b"in/x/a.g3"));
    // Errors still name the program's objects.
    let seq = ms
        .iter()
        .find(|m| m.kind == NFT_MSG_NEWSET && name_of(m) == "peers.g4")
        .expect("test data")
        .seq;
    assert_eq!(b.describe(seq), "set peers");
}
