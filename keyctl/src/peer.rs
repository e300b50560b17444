//! `keyctl peer add|config|rm|list`: external standard WireGuard peers (`peers/NAME`).
//!
//! Pure parts: which nodes a config names ([`config_nodes`]), the wg-quick config itself
//! ([`render_config`], deterministic, with the private key left as a placeholder for the user),
//! and whether the config last printed still reaches every node ([`staleness`]). The commands
//! write the record with a compare-and-swap over the peers collection, so two operators adding
//! overlapping peers at once cannot both succeed. keyctl never sees the peer's private key.

use crate::registry_args::{bad, UsageError};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use weft_core::control::{filter_revoked, Revocation};
use weft_core::external::{check_against, ExternalError, ExternalPeer};
use weft_core::record::select_consistent;
use weft_core::{NodeRecord, PublicKey};
use weft_registry::{Kind, Registry};

/// The `PrivateKey` line of a printed config: the user replaces it with the peer's own key.
pub const PRIVATE_KEY_PLACEHOLDER: &str = "<paste the private key of this peer here>";
/// `PersistentKeepalive` toward every node: keeps NAT mappings open and lets nodes learn an
/// endpoint-less peer's address soon after it comes up.
pub const KEEPALIVE_SECS: u32 = 25;

/// The nodes a config names: those meshd takes as peers as far as keyctl can tell (admitted by
/// their revocations, no conflicts with a node before them in name order), sorted by name.
pub fn config_nodes(records: Vec<NodeRecord>, revocations: &[Revocation]) -> Vec<NodeRecord> {
    let revs: BTreeMap<String, Revocation> = revocations
        .iter()
        .map(|r| (r.node.clone(), r.clone()))
        .collect();
    let (admitted, _) = filter_revoked(records, &revs);
    select_consistent(admitted).0
}

/// The node keys a config for `nodes` holds (what `configKeys` records).
pub fn config_keys(nodes: &[NodeRecord]) -> BTreeMap<String, PublicKey> {
    nodes
        .iter()
        .map(|n| (n.name.clone(), n.public_key))
        .collect()
}

/// The wg-quick config of `peer` for `nodes`: `[Interface]` with the placeholder private key and
/// `Address` = the peer's allowed IPs (and `ListenPort` when nodes are told its endpoint), then
/// one `[Peer]` per node with the node's current key, first endpoint, pod ranges and a
/// keepalive. A pure function of its inputs (no time, nodes in name order).
pub fn render_config(peer: &ExternalPeer, nodes: &[NodeRecord]) -> String {
    let name = &peer.name;
    let join = |v: &[ipnet::IpNet]| {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::new();
    out.push_str(&format!(
        "# wg-quick config of the weft external peer {name} (keyctl peer config {name}).\n\
         # Replace the PrivateKey placeholder below with this peer's own private key, the one\n\
         # whose public key is {key}\n\
         # (made on the peer, e.g. `wg genkey | tee {name}.key | wg pubkey`); weft never sees it.\n\
         # When a node's key changes, `keyctl status` shows this peer STALE: print this config\n\
         # again with `keyctl peer config {name}` and apply it.\n\n",
        key = peer.public_key,
    ));
    out.push_str("[Interface]\n");
    out.push_str(&format!("PrivateKey = {PRIVATE_KEY_PLACEHOLDER}\n"));
    out.push_str(&format!("Address = {}\n", join(&peer.allowed_ips)));
    if let Some(ep) = peer.endpoint {
        out.push_str(&format!(
            "# Nodes send to {ep}, so the peer listens on its port.\nListenPort = {}\n",
            ep.port()
        ));
    }
    if nodes.is_empty() {
        out.push_str("\n# No node records yet: print the config again once nodes have joined.\n");
    }
    for n in nodes {
        out.push_str(&format!("\n[Peer]\n# node {}\n", n.name));
        if n.next_public_key.is_some() {
            out.push_str(&format!(
                "# {} is rotating its key: this key stops working when it is retired; print the\n\
                 # config again then.\n",
                n.name
            ));
        }
        out.push_str(&format!("PublicKey = {}\n", n.public_key));
        if let Some(ep) = n.endpoints.first() {
            out.push_str(&format!("Endpoint = {ep}\n"));
        }
        out.push_str(&format!("AllowedIPs = {}\n", join(&n.pod_cidrs)));
        out.push_str(&format!("PersistentKeepalive = {KEEPALIVE_SECS}\n"));
    }
    out
}

/// A node whose key differs from the one the last printed config names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangedKey {
    pub node: String,
    pub config_key: PublicKey,
    pub current_key: PublicKey,
}

/// How the config last printed for a peer compares with the nodes now.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Staleness {
    /// No config was ever recorded, a node's key changed, or a node joined since: the config
    /// no longer reaches every node.
    pub stale: bool,
    /// Nodes whose current key is not the one in the config (a node mid-rotation keeps its
    /// current key until it retires it, so it is not listed before that).
    pub changed_keys: Vec<ChangedKey>,
    /// Nodes the config does not name at all.
    pub new_nodes: Vec<String>,
}

pub fn staleness(peer: &ExternalPeer, nodes: &[NodeRecord]) -> Staleness {
    let mut s = Staleness::default();
    for n in nodes {
        match peer.config_keys.get(&n.name) {
            Some(k) if *k == n.public_key => {}
            Some(k) => s.changed_keys.push(ChangedKey {
                node: n.name.clone(),
                config_key: *k,
                current_key: n.public_key,
            }),
            None => s.new_nodes.push(n.name.clone()),
        }
    }
    s.stale = peer.config_printed_at == 0 || !s.changed_keys.is_empty() || !s.new_nodes.is_empty();
    s
}

impl Staleness {
    /// For the status table: `-`, or `STALE: node-1 key changed, node-3 joined`.
    pub fn describe(&self, printed: bool) -> String {
        if !self.stale {
            return "up to date".into();
        }
        let mut why: Vec<String> = self
            .changed_keys
            .iter()
            .map(|c| format!("{} key changed", c.node))
            .collect();
        why.extend(self.new_nodes.iter().map(|n| format!("{n} joined")));
        if !printed {
            why.insert(0, "no config printed".into());
        }
        format!("STALE: {}", why.join(", "))
    }
}

/// The keyctl flag a record field comes from.
pub fn flag_of(field: Option<&'static str>) -> &'static str {
    match field {
        Some("name") => "NAME",
        Some("publicKey") => "public-key",
        Some("endpoint") => "endpoint",
        _ => "allowed-ips",
    }
}

/// An [`ExternalError`] as the exit-64 error naming the flag at fault.
pub fn usage_error(e: &ExternalError) -> UsageError {
    bad(flag_of(e.field()), e.to_string())
}

/// Parses `--endpoint HOST:PORT`: an address, or a host name resolved now (its first address is
/// stored; nodes do not resolve it again).
pub fn parse_endpoint(s: &str) -> Result<std::net::SocketAddr, UsageError> {
    let s = s.trim();
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    use std::net::ToSocketAddrs;
    match s.to_socket_addrs() {
        Ok(mut it) => it
            .next()
            .ok_or_else(|| bad("endpoint", format!("{s:?} resolves to no address"))),
        Err(e) => Err(bad(
            "endpoint",
            format!("{s:?} is not HOST:PORT or cannot be resolved: {e}"),
        )),
    }
}

/// The external peers stored now, with a snapshot for [`Registry::put_if_unchanged`]. Records
/// that do not parse are left out with a warning (meshd skips them too).
async fn list_for_update(
    registry: &dyn Registry,
) -> Result<(Vec<ExternalPeer>, weft_registry::Snapshot, Vec<String>)> {
    let (items, snapshot) = registry
        .list_for_update(Kind::Peers)
        .await
        .context("reading the external peers")?;
    let mut peers = Vec::new();
    let mut names = Vec::new();
    for (name, bytes) in items {
        names.push(name.clone());
        match ExternalPeer::from_json(&bytes) {
            Ok(p) if p.name == name => peers.push(p),
            Ok(p) => eprintln!(
                "keyctl: warning: skipping {}: it names peer {:?}",
                registry.location(Kind::Peers, &name),
                p.name
            ),
            Err(e) => eprintln!(
                "keyctl: warning: skipping invalid {}: {e}",
                registry.location(Kind::Peers, &name)
            ),
        }
    }
    Ok((peers, snapshot, names))
}

/// Writes a new external peer after checking it against every node record and every other
/// external peer (a conflict is a usage error naming the flag). Fails if NAME exists.
pub async fn add(
    registry: &dyn Registry,
    new: &ExternalPeer,
    nodes: &[NodeRecord],
) -> Result<ExternalPeer> {
    for _ in 0..8 {
        let (peers, snapshot, names) = list_for_update(registry).await?;
        if names.contains(&new.name) {
            bail!(
                "external peer {n} already exists ({}); `keyctl peer config {n}` prints its \
                 config, `keyctl peer rm {n}` removes it",
                registry.location(Kind::Peers, &new.name),
                n = new.name
            );
        }
        check_against(new, nodes, &peers).map_err(|e| usage_error(&e))?;
        if registry
            .put_if_unchanged(Kind::Peers, &new.name, &new.to_json(), snapshot)
            .await
            .with_context(|| format!("writing {}", registry.location(Kind::Peers, &new.name)))?
        {
            return Ok(new.clone());
        }
    }
    bail!(
        "the external peers kept changing while keyctl tried to add {}; try again",
        new.name
    )
}

/// Records in `peers/NAME` which node keys the config just printed holds, and when.
pub async fn record_config(
    registry: &dyn Registry,
    name: &str,
    keys: &BTreeMap<String, PublicKey>,
    now: u64,
) -> Result<ExternalPeer> {
    for _ in 0..8 {
        let (peers, snapshot, names) = list_for_update(registry).await?;
        let Some(mut p) = peers.into_iter().find(|p| p.name == name) else {
            if names.iter().any(|n| n == name) {
                bail!(
                    "{} cannot be read (see the warning above); `keyctl peer rm {name}` and add it again",
                    registry.location(Kind::Peers, name)
                );
            }
            bail!("no external peer named {name} (keyctl peer list)");
        };
        p.config_keys = keys.clone();
        p.config_printed_at = now;
        if registry
            .put_if_unchanged(Kind::Peers, name, &p.to_json(), snapshot)
            .await
            .with_context(|| format!("writing {}", registry.location(Kind::Peers, name)))?
        {
            return Ok(p);
        }
    }
    bail!("the external peers kept changing while keyctl tried to update {name}; try again")
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_core::record::SCHEMA_VERSION;
    use weft_core::PrivateKey;

    fn key() -> PublicKey {
        PrivateKey::generate().public_key()
    }

    fn node(name: &str, i: u8) -> NodeRecord {
        NodeRecord {
            schema: SCHEMA_VERSION,
            name: name.into(),
            public_key: key(),
            endpoints: vec![
                format!("198.18.0.{}:51820", 10 + i).parse().expect("ep"),
                "[2001:db8::1]:51820".parse().expect("ep6"),
            ],
            private_endpoints: Vec::new(),
            location: None,
            relay: false,
            pod_cidrs: vec![
                format!("10.42.{i}.0/24").parse().expect("cidr"),
                format!("fd42:{i}::/64").parse().expect("cidr6"),
            ],
            key_generation: 1,
            next_public_key: None,
            key_created_at: 0,
            psk_generation: None,
        }
    }

    fn laptop() -> ExternalPeer {
        ExternalPeer {
            schema: 1,
            name: "laptop".into(),
            public_key: key(),
            allowed_ips: vec![
                "10.99.0.1/32".parse().expect("cidr"),
                "fd99::1/128".parse().expect("cidr"),
            ],
            endpoint: None,
            created_at: 1,
            config_keys: BTreeMap::new(),
            config_printed_at: 0,
        }
    }

    /// Every `KEY = VALUE` line of a section, in order.
    fn sections(conf: &str) -> Vec<(String, Vec<(String, String)>)> {
        let mut v: Vec<(String, Vec<(String, String)>)> = Vec::new();
        for line in conf.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with('[') {
                v.push((line.to_string(), Vec::new()));
            } else if let (Some((k, val)), Some(last)) = (line.split_once(" = "), v.last_mut()) {
                last.1.push((k.to_string(), val.to_string()));
            } else {
                panic!("unexpected line {line:?}");
            }
        }
        v
    }

    #[test]
    fn config_names_every_node_in_order_without_a_private_key() {
        let (b, a) = (node("node-b", 2), node("node-a", 1));
        let mut p = laptop();
        let nodes = config_nodes(vec![b.clone(), a.clone()], &[]);
        let conf = render_config(&p, &nodes);
        let s = sections(&conf);
        assert_eq!(
            s.iter().map(|(h, _)| h.as_str()).collect::<Vec<_>>(),
            ["[Interface]", "[Peer]", "[Peer]"]
        );
        assert_eq!(
            s[0].1,
            vec![
                (
                    "PrivateKey".to_string(),
                    PRIVATE_KEY_PLACEHOLDER.to_string()
                ),
                (
                    "Address".to_string(),
                    "10.99.0.1/32, fd99::1/128".to_string()
                ),
            ]
        );
        let want = |n: &NodeRecord| {
            vec![
                ("PublicKey".to_string(), n.public_key.to_base64()),
                ("Endpoint".to_string(), n.endpoints[0].to_string()),
                (
                    "AllowedIPs".to_string(),
                    format!("{}, {}", n.pod_cidrs[0], n.pod_cidrs[1]),
                ),
                ("PersistentKeepalive".to_string(), "25".to_string()),
            ]
        };
        assert_eq!(s[1].1, want(&a));
        assert_eq!(s[2].1, want(&b));
        assert!(conf.contains("# node node-a\n"), "{conf}");
        // Deterministic: the same inputs in another order give the same bytes.
        assert_eq!(conf, render_config(&p, &config_nodes(vec![a, b], &[])));
        // The only keys in it are public keys: the peer's (in a comment) and the nodes'.
        let keys: Vec<&str> = conf
            .split(|c: char| c.is_whitespace())
            .filter(|w| w.len() == 44 && w.ends_with('='))
            .collect();
        assert_eq!(keys.len(), 3, "{conf}");
        for k in keys {
            assert!(
                k == p.public_key.to_base64()
                    || nodes.iter().any(|n| n.public_key.to_base64() == k),
                "{k} is not a public key of the peer or a node"
            );
        }
        // With an endpoint, the peer listens on its port.
        p.endpoint = Some("203.0.113.5:51999".parse().expect("ep"));
        let s = sections(&render_config(&p, &nodes));
        assert!(s[0]
            .1
            .contains(&("ListenPort".to_string(), "51999".to_string())));
        // No nodes: only the interface, and a note.
        let empty = render_config(&p, &[]);
        assert_eq!(sections(&empty).len(), 1);
        assert!(empty.contains("No node records yet"), "{empty}");
    }

    #[test]
    fn config_leaves_out_revoked_and_conflicting_nodes_and_notes_rotation() {
        let a = node("node-a", 1);
        let mut thief = node("node-b", 1);
        thief.endpoints = vec!["198.18.0.99:51820".parse().expect("ep")];
        thief.pod_cidrs = vec!["10.42.1.0/25".parse().expect("cidr")];
        let mut c = node("node-c", 3);
        let revoked = node("node-d", 4);
        c.next_public_key = Some(key());
        let rev = Revocation {
            node: "node-d".into(),
            revoked_keys: vec![revoked.public_key],
            approved_key: None,
            approved_next_key: None,
            revoked_at: 1,
        };
        let nodes = config_nodes(vec![revoked, c.clone(), thief, a.clone()], &[rev]);
        assert_eq!(
            nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            ["node-a", "node-c"]
        );
        let conf = render_config(&laptop(), &nodes);
        // The rotating node is named with its current key, with a note.
        assert!(
            conf.contains(&format!("PublicKey = {}", c.public_key)),
            "{conf}"
        );
        assert!(conf.contains("node-c is rotating its key"), "{conf}");
        assert_eq!(
            config_keys(&nodes),
            BTreeMap::from([
                ("node-a".to_string(), a.public_key),
                ("node-c".to_string(), c.public_key)
            ])
        );
    }

    #[test]
    fn stale_when_a_key_is_retired_not_while_rotating() {
        let (a, b) = (node("node-a", 1), node("node-b", 2));
        let mut p = laptop();
        assert!(
            staleness(&p, std::slice::from_ref(&a)).stale,
            "never printed"
        );
        p.config_keys = config_keys(&[a.clone(), b.clone()]);
        p.config_printed_at = 100;
        let s = staleness(&p, &[a.clone(), b.clone()]);
        assert_eq!(s, Staleness::default());
        assert_eq!(s.describe(true), "up to date");
        // b announces a next key: its current key is still the config's.
        let mut b_rot = b.clone();
        b_rot.next_public_key = Some(key());
        assert!(!staleness(&p, &[a.clone(), b_rot.clone()]).stale);
        // b retires the old key: stale, naming b with both keys.
        let mut b_new = b.clone();
        b_new.public_key = b_rot.next_public_key.expect("next");
        b_new.next_public_key = None;
        let s = staleness(&p, &[a.clone(), b_new.clone()]);
        assert!(s.stale);
        assert_eq!(
            s.changed_keys,
            vec![ChangedKey {
                node: "node-b".into(),
                config_key: b.public_key,
                current_key: b_new.public_key
            }]
        );
        // A node that joined since is missing from the config; one that left is harmless.
        let c = node("node-c", 3);
        let s = staleness(&p, &[a.clone(), b_new, c]);
        assert_eq!(s.new_nodes, vec!["node-c".to_string()]);
        assert_eq!(s.describe(true), "STALE: node-b key changed, node-c joined");
        assert!(!staleness(&p, &[a]).stale);
    }

    #[test]
    fn conflicts_name_the_flag() {
        let a = node("node-a", 1);
        let mut p = laptop();
        p.allowed_ips = vec!["10.42.1.0/28".parse().expect("cidr")];
        let e = check_against(&p, [&a], []).expect_err("overlap");
        let u = usage_error(&e);
        assert_eq!(u.flag, "allowed-ips");
        assert!(u.to_string().contains("node-a"), "{u}");
        p.allowed_ips = vec!["10.99.0.1/32".parse().expect("cidr")];
        p.name = "node-a".into();
        let e = check_against(&p, [&a], []).expect_err("name");
        assert_eq!(usage_error(&e).flag, "NAME");
        p.name = "laptop".into();
        p.public_key = a.public_key;
        let e = check_against(&p, [&a], []).expect_err("key");
        assert_eq!(usage_error(&e).flag, "public-key");
        assert_eq!(flag_of(Some("endpoint")), "endpoint");
        assert_eq!(
            parse_endpoint("203.0.113.5:51820").expect("ep"),
            "203.0.113.5:51820".parse().expect("ep")
        );
        assert_eq!(
            parse_endpoint("localhost:4000").expect("resolved").port(),
            4000
        );
        assert_eq!(parse_endpoint("nope").expect_err("bad").flag, "endpoint");
    }

    #[tokio::test]
    async fn add_refuses_conflicts_and_duplicates_and_record_config_updates() {
        let tmp = tempfile::tempdir().expect("tmp");
        let reg = weft_registry::open(&format!("dir:{}", tmp.path().display())).expect("open");
        let a = node("node-a", 1);
        let p = laptop();
        add(&*reg, &p, std::slice::from_ref(&a)).await.expect("add");
        let e = add(&*reg, &p, std::slice::from_ref(&a))
            .await
            .expect_err("duplicate");
        assert!(e.to_string().contains("already exists"), "{e}");
        let mut other = laptop();
        other.name = "vm".into();
        other.allowed_ips = vec!["10.99.0.0/24".parse().expect("cidr")];
        let e = add(&*reg, &other, std::slice::from_ref(&a))
            .await
            .expect_err("overlap");
        let u = e.downcast_ref::<UsageError>().expect("usage error");
        assert_eq!(u.flag, "allowed-ips");
        assert!(u.reason.contains("external peer laptop"), "{u}");
        assert!(reg.get(Kind::Peers, "vm").await.expect("get").is_none());
        let keys = config_keys(std::slice::from_ref(&a));
        let r = record_config(&*reg, "laptop", &keys, 77)
            .await
            .expect("record");
        assert_eq!((r.config_keys.clone(), r.config_printed_at), (keys, 77));
        let stored = reg
            .get(Kind::Peers, "laptop")
            .await
            .expect("get")
            .expect("some");
        assert_eq!(ExternalPeer::from_json(&stored).expect("parse"), r);
        assert!(record_config(&*reg, "ghost", &BTreeMap::new(), 1)
            .await
            .is_err());
    }
}
