//! Unit tests of the device (`Node`): an in-memory network of nodes.

use super::*;
use std::time::Duration;

const MSG_HANDSHAKE_RESPONSE: u8 = 2;
/// Sizes of the WireGuard messages (a data message: at least this).
const HANDSHAKE_RESPONSE_LEN: usize = 92;
const COOKIE_REPLY_LEN: usize = 64;
const DATA_MIN_LEN: usize = 32;
use crate::peer::PeerConfig;

fn ipv4_packet(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    crate::packet::ipv4_packet(src, dst, 17, payload)
}

struct Net {
    nodes: Vec<(SocketAddr, Node)>,
    /// Datagrams between these (from, to) addresses are lost (a blocked path).
    blocked: Vec<(SocketAddr, SocketAddr)>,
    delivered: Vec<Vec<Vec<u8>>>,
    /// Each node's first private key.
    keys: Vec<PrivateKey>,
}

impl Net {
    fn new(n: u8) -> (Net, Vec<PeerConfig>) {
        let mut nodes = Vec::new();
        let mut cfgs = Vec::new();
        let mut keys = Vec::new();
        for i in 1..=n {
            let k = PrivateKey::generate();
            let addr: SocketAddr = format!("198.18.0.{}:51820", 10 + i).parse().expect("addr");
            cfgs.push(PeerConfig {
                name: format!("n{i}"),
                kind: PeerKind::Node,
                public_key: k.public_key(),
                next_public_key: None,
                endpoints: vec![addr],
                private_endpoints: Vec::new(),
                location: None,
                through_nat: false,
                relay: false,
                allowed_ips: vec![format!("10.42.{i}.0/24").parse().expect("net")],
                key_generation: 1,
                psk: PeerPsk::Cluster(None),
            });
            keys.push(k.clone());
            nodes.push((addr, Node::new(k, None)));
        }
        let delivered = vec![Vec::new(); nodes.len()];
        (
            Net {
                nodes,
                blocked: Vec::new(),
                delivered,
                keys,
            },
            cfgs,
        )
    }

    fn drops_total(&self) -> u64 {
        self.nodes.iter().map(|(_, n)| n.drops().total()).sum()
    }

    fn all_drops(&self) -> Vec<BTreeMap<&'static str, u64>> {
        self.nodes
            .iter()
            .map(|(_, n)| n.drops().by_name())
            .collect()
    }

    /// Moves datagrams between nodes until nothing is left in flight.
    fn run(&mut self, now: Instant) {
        for _ in 0..100 {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                while let Some(o) = self.nodes[i].1.poll_output() {
                    moved = true;
                    match o {
                        Output::Deliver(p) => self.delivered[i].push(p),
                        Output::Transmit { dst, payload } => {
                            let from = self.nodes[i].0;
                            if self.blocked.contains(&(from, dst)) {
                                continue;
                            }
                            if let Some(j) = self.nodes.iter().position(|(a, _)| *a == dst) {
                                self.nodes[j].1.handle_udp(from, &payload, now);
                            }
                        }
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }
}

/// A node behind NAT (its record names no endpoint the other node can use) joins: it
/// handshakes to the public node, which learns its address from that authenticated packet
/// and reaches it from then on; a registry resync (the same record, or one with other
/// changes and a stale published endpoint) never replaces the learnt endpoint; the NAT'd
/// side's pairs carry the NAT keepalive.
#[test]
fn node_behind_nat_is_learnt_and_kept_across_resyncs() {
    let now = Instant::now();
    let (mut net, cfgs) = Net::new(2);
    let mut n2_seen_by_n1 = cfgs[1].clone();
    n2_seen_by_n1.endpoints.clear();
    let mut n1_seen_by_n2 = cfgs[0].clone();
    n1_seen_by_n2.through_nat = true;
    net.nodes[1].1.set_nat_keepalive(Some(5));
    net.nodes[0].1.add_peer(n2_seen_by_n1.clone()).expect("add");
    let p = ipv4_packet([10, 42, 1, 5], [10, 42, 2, 7], b"to-nat");
    net.nodes[0].1.handle_tun(&p, now);
    net.run(now);
    assert!(net.delivered[1].is_empty());
    let st = net.nodes[0].1.peer_status();
    assert_eq!(st[0].endpoint_source, EndpointSource::None);
    assert_eq!(st[0].handshake_attempts, 0, "nowhere to send a handshake");
    assert_eq!(st[0].queued, 1);
    // n2 comes up and reaches n1; the waiting packet goes.
    net.nodes[1].1.add_peer(n1_seen_by_n2).expect("add");
    net.run(now);
    assert_eq!(net.delivered[1], vec![p.clone()]);
    let st = net.nodes[0].1.peer_status();
    assert_eq!(st[0].endpoint_source, EndpointSource::Learned);
    assert_eq!(st[0].endpoint.as_deref(), Some("198.18.0.12:51820"));
    assert!(
        st[0].endpoint_reason.contains("behind NAT"),
        "{}",
        st[0].endpoint_reason
    );
    assert_eq!(st[0].keepalive_secs, None);
    assert_eq!(net.nodes[1].1.peer_status()[0].keepalive_secs, Some(5));
    // Resyncs: the same record, then one with another range and a stale endpoint.
    net.nodes[0]
        .1
        .update_peer(n2_seen_by_n1.clone())
        .expect("same");
    let mut changed = n2_seen_by_n1;
    changed
        .allowed_ips
        .push("10.43.2.0/24".parse().expect("net"));
    changed.endpoints = vec!["198.18.0.99:51820".parse().expect("ep")];
    net.nodes[0].1.update_peer(changed).expect("update");
    assert_eq!(
        net.nodes[0].1.peer("n2").and_then(|p| p.endpoint),
        Some("198.18.0.12:51820".parse().expect("ep")),
        "the learnt endpoint stays"
    );
    let again = ipv4_packet([10, 42, 1, 5], [10, 42, 2, 8], b"again");
    net.nodes[0].1.handle_tun(&again, now);
    net.run(now);
    assert_eq!(net.delivered[1].last(), Some(&again));
}

/// A private endpoint is reported as such; the NAT keepalive follows `through_nat` when a
/// record change flips it (the pairs are made anew, and traffic goes on).
#[test]
fn private_endpoint_source_and_nat_flip() {
    let now = Instant::now();
    let (mut net, cfgs) = Net::new(2);
    let mut c1 = cfgs[1].clone();
    c1.private_endpoints = c1.endpoints.clone();
    c1.location = Some("site-a".into());
    net.nodes[0].1.set_nat_keepalive(Some(7));
    net.nodes[0].1.add_peer(c1.clone()).expect("add");
    net.nodes[1].1.add_peer(cfgs[0].clone()).expect("add");
    net.run(now);
    let st = net.nodes[0].1.peer_status();
    assert_eq!(st[0].endpoint_source, EndpointSource::Private);
    assert!(st[0].endpoint_reason.contains("site-a"));
    assert_eq!(st[0].keepalive_secs, None);
    let mut nat = c1;
    nat.through_nat = true;
    net.nodes[0].1.update_peer(nat).expect("flip");
    net.run(now);
    let st = net.nodes[0].1.peer_status();
    assert_eq!(st[0].keepalive_secs, Some(7));
    assert!(
        st[0].latest_handshake_secs_ago.is_some(),
        "handshaked again"
    );
    let p = ipv4_packet([10, 42, 1, 5], [10, 42, 2, 7], b"after-flip");
    net.nodes[0].1.handle_tun(&p, now);
    net.run(now);
    assert_eq!(net.delivered[1].last(), Some(&p));
}

#[test]
fn two_nodes_handshake_and_exchange_both_ways() {
    let now = Instant::now();
    let (mut net, cfgs) = Net::new(2);
    net.nodes[0].1.add_peer(cfgs[1].clone()).expect("add");
    net.nodes[1].1.add_peer(cfgs[0].clone()).expect("add");
    // Packet sent before any handshake waits in the queue and is delivered after it.
    let p = ipv4_packet([10, 42, 1, 5], [10, 42, 2, 7], b"hello-weft");
    net.nodes[0].1.handle_tun(&p, now);
    net.run(now);
    assert_eq!(net.delivered[1], vec![p.clone()]);
    let back = ipv4_packet([10, 42, 2, 7], [10, 42, 1, 5], b"reply");
    net.nodes[1].1.handle_tun(&back, now);
    net.run(now);
    assert_eq!(net.delivered[0], vec![back]);
    let st = net.nodes[0].1.peer_status();
    assert!(st[0].latest_handshake_secs_ago.is_some());
    assert_eq!(st[0].tx_bytes, p.len() as u64);
    assert_eq!(net.nodes[0].1.drops().total(), 0);
}

#[test]
fn inner_source_of_another_peer_is_dropped_and_counted() {
    // A owns 10.42.1/24, B 10.42.2/24, C 10.42.3/24. C sends a packet with a source in B's
    // range: A must drop it (sourceNotAllowed), device-wide.
    let now = Instant::now();
    let (mut net, cfgs) = Net::new(3);
    for i in 0..3 {
        for (j, cfg) in cfgs.iter().enumerate() {
            if i != j {
                net.nodes[i].1.add_peer(cfg.clone()).expect("add");
            }
        }
    }
    net.run(now);
    let spoofed = ipv4_packet([10, 42, 2, 99], [10, 42, 1, 5], b"spoof");
    net.nodes[2].1.handle_tun(&spoofed, now);
    net.run(now);
    assert!(net.delivered[0].is_empty());
    assert_eq!(net.nodes[0].1.drops().get(DropReason::SourceNotAllowed), 1);
    let st = net.nodes[0].1.peer_status();
    let c = st.iter().find(|p| p.name == "n3").expect("n3");
    assert_eq!(c.drops.get("sourceNotAllowed"), Some(&1));
    // The legitimate source still passes.
    let ok = ipv4_packet([10, 42, 3, 9], [10, 42, 1, 5], b"fine");
    net.nodes[2].1.handle_tun(&ok, now);
    net.run(now);
    assert_eq!(net.delivered[0], vec![ok]);
}

#[test]
fn garbage_datagrams_are_counted_not_fatal() {
    let now = Instant::now();
    let (mut net, cfgs) = Net::new(2);
    net.nodes[0].1.add_peer(cfgs[1].clone()).expect("add");
    let from: SocketAddr = "198.18.0.99:1234".parse().expect("addr");
    let node = &mut net.nodes[0].1;
    node.handle_udp(from, &[], now);
    node.handle_udp(from, &[1, 2, 3], now);
    node.handle_udp(from, &vec![0xAB; 65_507], now);
    node.handle_udp(from, &vec![0u8; MAX_DATAGRAM + 1], now);
    // Well-formed headers with random bodies: a bad-MAC initiation, unknown indices.
    let mut init = vec![0u8; 148];
    init[0] = 1;
    node.handle_udp(from, &init, now);
    let mut data = vec![0x5a; 1500];
    data[..4].copy_from_slice(&4u32.to_le_bytes());
    node.handle_udp(from, &data, now);
    let mut x: u64 = 7;
    for _ in 0..1000 {
        let len = (x % 300) as usize;
        let d: Vec<u8> = (0..len)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                (x >> 56) as u8
            })
            .collect();
        node.handle_udp(from, &d, now);
    }
    let d = node.drops();
    assert!(d.get(DropReason::InvalidPacket) >= 3);
    assert_eq!(d.get(DropReason::Oversize), 1);
    assert_eq!(d.get(DropReason::InvalidMac), 1);
    assert!(d.get(DropReason::UnknownIndex) >= 1);
    // Nothing was sent back to the stranger.
    let mut to_stranger = 0;
    while let Some(o) = node.poll_output() {
        if matches!(o, Output::Transmit { dst, .. } if dst == from) {
            to_stranger += 1;
        }
    }
    assert_eq!(to_stranger, 0);
}

/// An external peer without an endpoint: packets for it wait (no handshake is sent: it has
/// nowhere to go) until its own handshake arrives, which sets the endpoint; then the queue is
/// flushed. A rotation neither handshakes with it on the next key nor waits for it.
#[test]
fn external_peer_without_endpoint_is_reached_after_it_handshakes_in() {
    let now = Instant::now();
    let (mut net, cfgs) = Net::new(3);
    let mut ext = cfgs[1].clone();
    ext.kind = PeerKind::External;
    ext.endpoints.clear();
    net.nodes[0].1.add_peer(ext).expect("add external");
    net.nodes[0].1.add_peer(cfgs[2].clone()).expect("add n3");
    net.nodes[2].1.add_peer(cfgs[0].clone()).expect("add n1");
    net.run(now);
    assert_eq!(net.nodes[0].1.peer("n2").and_then(|p| p.endpoint), None);
    assert_eq!(
        net.nodes[0].1.peer_status()[0].handshake_attempts,
        0,
        "no handshake is sent nowhere"
    );
    let p = ipv4_packet([10, 42, 1, 5], [10, 42, 2, 7], b"to-the-laptop");
    net.nodes[0].1.handle_tun(&p, now);
    net.run(now);
    assert!(net.delivered[1].is_empty());
    assert_eq!(net.nodes[0].1.peer("n2").map(|p| p.queue.len()), Some(1));
    let st = net.nodes[0].1.peer_status();
    assert_eq!(st[0].kind, PeerKind::External);
    assert_eq!(st[0].endpoint, None);

    // The external peer knows node 0's endpoint and handshakes in.
    net.nodes[1].1.add_peer(cfgs[0].clone()).expect("add n1");
    net.run(now);
    assert_eq!(
        net.nodes[0].1.peer("n2").and_then(|p| p.endpoint),
        Some(net.nodes[1].0),
        "endpoint learnt from the handshake"
    );
    assert_eq!(net.delivered[1], vec![p]);
    let back = ipv4_packet([10, 42, 2, 7], [10, 42, 1, 5], b"reply");
    net.nodes[1].1.handle_tun(&back, now);
    net.run(now);
    assert_eq!(net.delivered[0], vec![back]);

    // Node 0 rotates: only the node peer gets a handshake on the next key, and only the
    // node peer counts for the rotation.
    let next = PrivateKey::generate();
    net.nodes[0].1.set_next_key(next).expect("next");
    net.nodes[0].1.initiate_next();
    let mut to: Vec<SocketAddr> = Vec::new();
    while let Some(o) = net.nodes[0].1.poll_output() {
        if let Output::Transmit { dst, .. } = o {
            to.push(dst);
        }
    }
    assert_eq!(to, vec![net.nodes[2].0]);
    let progress = net.nodes[0].1.rotation_progress();
    assert_eq!(progress.keys().collect::<Vec<_>>(), ["n3"]);
    net.nodes[0].1.drop_next_key();

    // Removed and added back (say a revocation was lifted): the learnt endpoint is used
    // again, so node 0 handshakes with it at once.
    net.nodes[0].1.remove_peer("n2").expect("remove");
    net.run(now);
    let mut again = cfgs[1].clone();
    again.kind = PeerKind::External;
    again.endpoints.clear();
    net.nodes[0].1.add_peer(again).expect("add again");
    assert_eq!(
        net.nodes[0].1.peer("n2").and_then(|p| p.endpoint),
        Some(net.nodes[1].0)
    );
    assert!(matches!(
        net.nodes[0].1.poll_output(),
        Some(Output::Transmit { dst, .. }) if dst == net.nodes[1].0
    ));
}

#[test]
fn handshake_from_unknown_key_is_refused() {
    let now = Instant::now();
    let (mut net, cfgs) = Net::new(2);
    // Only node 0 knows node 1; node 1's initiation reaches node 0? No: node 0 initiates to
    // node 1, which does not know node 0's key and must refuse it.
    net.nodes[0].1.add_peer(cfgs[1].clone()).expect("add");
    net.run(now);
    assert_eq!(net.nodes[1].1.drops().get(DropReason::UnknownPeer), 1);
}

#[test]
fn removed_peer_gets_nothing_and_table_empties() {
    let now = Instant::now();
    let (mut net, cfgs) = Net::new(2);
    net.nodes[0].1.add_peer(cfgs[1].clone()).expect("add");
    net.nodes[1].1.add_peer(cfgs[0].clone()).expect("add");
    net.run(now);
    net.nodes[0].1.remove_peer("n2").expect("remove");
    assert!(net.nodes[0].1.allowed.is_empty());
    assert!(net.nodes[0].1.indices.is_empty() && net.nodes[0].1.keys.is_empty());
    let p = ipv4_packet([10, 42, 1, 5], [10, 42, 2, 7], b"x");
    net.nodes[0].1.handle_tun(&p, now);
    assert_eq!(net.nodes[0].1.drops().get(DropReason::NoPeer), 1);
    assert!(net.nodes[0].1.poll_output().is_none());
}

#[test]
fn key_change_of_one_peer_leaves_other_sessions_alone() {
    let now = Instant::now();
    let (mut net, mut cfgs) = Net::new(3);
    for i in 0..3 {
        for (j, cfg) in cfgs.iter().enumerate() {
            if i != j {
                net.nodes[i].1.add_peer(cfg.clone()).expect("add");
            }
        }
    }
    net.run(now);
    let idx_c_before = net.nodes[0].1.peer("n3").expect("n3").slots[0].index;
    // Node 2 restarts with a new key.
    let k = PrivateKey::generate();
    cfgs[1].public_key = k.public_key();
    net.nodes[1].1 = Node::new(k, None);
    for j in [0usize, 2] {
        net.nodes[1].1.add_peer(cfgs[j].clone()).expect("add");
    }
    for i in [0usize, 2] {
        net.nodes[i].1.update_peer(cfgs[1].clone()).expect("update");
    }
    net.run(now);
    assert_eq!(
        net.nodes[0].1.peer("n3").expect("n3").slots[0].index,
        idx_c_before
    );
    let p = ipv4_packet([10, 42, 1, 5], [10, 42, 2, 7], b"after");
    net.nodes[0].1.handle_tun(&p, now);
    net.run(now);
    assert_eq!(net.delivered[1].last(), Some(&p));
}

#[test]
fn own_or_taken_keys_are_refused() {
    let (mut net, cfgs) = Net::new(3);
    let node = &mut net.nodes[0].1;
    let mut own = cfgs[1].clone();
    own.public_key = cfgs[0].public_key;
    assert_eq!(
        node.add_peer(own),
        Err(NodeError::OwnKey(cfgs[0].public_key))
    );
    node.add_peer(cfgs[1].clone()).expect("add n2");
    let mut thief = cfgs[2].clone();
    thief.public_key = cfgs[1].public_key;
    assert_eq!(
        node.add_peer(thief.clone()),
        Err(NodeError::DuplicateKey(cfgs[1].public_key, "n2".into()))
    );
    node.add_peer(cfgs[2].clone()).expect("add n3");
    assert_eq!(
        node.update_peer(thief),
        Err(NodeError::DuplicateKey(cfgs[1].public_key, "n2".into()))
    );
    // Keeping its own key in an update is fine.
    let mut moved = cfgs[1].clone();
    moved.endpoints = vec!["198.18.0.99:51820".parse().expect("ep")];
    node.update_peer(moved).expect("same key");
    assert_eq!(
        node.add_peer(cfgs[1].clone()),
        Err(NodeError::DuplicateName("n2".into()))
    );
}

#[test]
fn endpoints_tried_in_order() {
    let (mut net, mut cfgs) = Net::new(2);
    let dead: SocketAddr = "198.18.0.200:51820".parse().expect("addr");
    cfgs[1].endpoints.insert(0, dead);
    net.nodes[0].1.add_peer(cfgs[1].clone()).expect("add");
    match net.nodes[0].1.poll_output() {
        Some(Output::Transmit { dst, .. }) => assert_eq!(dst, dead),
        other => panic!("expected an initiation to the first endpoint, got {other:?}"),
    }
    let st = net.nodes[0].1.peer_status();
    assert_eq!(st[0].handshake_attempts, 1, "the initiation is counted");
    assert_eq!(st[0].handshake_failures, 0, "not yet timed out");
    let second = net.nodes[1].0;
    let peer = net.nodes[0].1.peers.values_mut().next().expect("peer");
    peer.try_next_endpoint();
    assert_eq!(peer.endpoint, Some(second));
}

/// What the helpers shared by [`Net`] and [`ShardedNet`] need of a test network.
trait TestNet {
    fn node_count(&self) -> usize;
    /// Node `i` reads `pkt` from its TUN.
    fn send(&mut self, i: usize, pkt: &[u8], now: Instant);
    /// Moves datagrams between nodes until nothing is left in flight.
    fn settle(&mut self, now: Instant);
    fn last_delivered(&self, j: usize) -> Option<&Vec<u8>>;
    /// Node `j` learns a peer's new config.
    fn update(&mut self, j: usize, cfg: &PeerConfig);
}

impl TestNet for Net {
    fn node_count(&self) -> usize {
        self.nodes.len()
    }
    fn send(&mut self, i: usize, pkt: &[u8], now: Instant) {
        self.nodes[i].1.handle_tun(pkt, now);
    }
    fn settle(&mut self, now: Instant) {
        self.run(now);
    }
    fn last_delivered(&self, j: usize) -> Option<&Vec<u8>> {
        self.delivered[j].last()
    }
    fn update(&mut self, j: usize, cfg: &PeerConfig) {
        self.nodes[j].1.update_peer(cfg.clone()).expect("update");
    }
}

/// Sends one packet from every node to every other and checks each arrived.
fn all_pairs_deliver(net: &mut impl TestNet, now: Instant, tag: &str) {
    let n = net.node_count();
    for i in 0..n {
        for j in 0..n {
            if i == j {
                continue;
            }
            let p = ipv4_packet(
                [10, 42, i as u8 + 1, 5],
                [10, 42, j as u8 + 1, 7],
                format!("{tag} {i}->{j}").as_bytes(),
            );
            net.send(i, &p, now);
            net.settle(now);
            assert_eq!(
                net.last_delivered(j),
                Some(&p),
                "{tag}: {i} -> {j} not delivered"
            );
        }
    }
}

fn full_mesh(n: u8) -> (Net, Vec<PeerConfig>) {
    let (mut net, cfgs) = Net::new(n);
    for i in 0..n as usize {
        for (j, cfg) in cfgs.iter().enumerate() {
            if i != j {
                net.nodes[i].1.add_peer(cfg.clone()).expect("add");
            }
        }
    }
    (net, cfgs)
}

/// Tells every other node about node `i`'s config.
fn announce(net: &mut impl TestNet, cfgs: &[PeerConfig], i: usize) {
    for j in 0..net.node_count() {
        if j != i {
            net.update(j, &cfgs[i]);
        }
    }
}

/// Which key pair a node's outbound traffic to a peer uses right now.
fn outbound_pair(node: &Node, peer: &str) -> Option<(PublicKey, PublicKey)> {
    let p = node.peer(peer)?;
    let i = node.best_session(p)?;
    Some((p.slots[i].own, p.slots[i].public_key))
}

/// One node rotates: next key added, announced, handshaken, every peer moves, old key
/// retired everywhere. Every packet at every step arrives, and afterwards the old key can
/// no longer handshake with anyone.
#[test]
fn rotation_of_one_node_loses_nothing_and_retires_the_old_key() {
    let now = Instant::now();
    let (mut net, mut cfgs) = full_mesh(3);
    net.run(now);
    all_pairs_deliver(&mut net, now, "before");

    let old = cfgs[0].public_key;
    let next = PrivateKey::generate();
    let next_pub = next.public_key();
    net.nodes[0].1.set_next_key(next).expect("next key");
    all_pairs_deliver(&mut net, now, "next key added");
    cfgs[0].next_public_key = Some(next_pub);
    announce(&mut net, &cfgs, 0);
    assert_eq!(
        net.nodes[1].1.peer("n1").expect("n1").slots.len(),
        2,
        "a peer holds one slot per live key pair"
    );
    all_pairs_deliver(&mut net, now, "announced");
    // Until the new pair has a session, traffic stays on the old one.
    assert_eq!(
        outbound_pair(&net.nodes[1].1, "n1"),
        Some((cfgs[1].public_key, old))
    );
    net.nodes[0].1.initiate_next();
    net.run(now);
    let progress = net.nodes[0].1.rotation_progress();
    assert!(
        progress.values().all(|p| *p != PeerRotation::Handshaking),
        "{progress:?}"
    );
    all_pairs_deliver(&mut net, now, "handshaken");
    let progress = net.nodes[0].1.rotation_progress();
    assert!(
        progress.values().all(|p| *p == PeerRotation::Moved),
        "{progress:?}"
    );
    // Outbound on both ends already uses the new pair.
    #[allow(clippy::needless_range_loop)]
    for j in 1..3 {
        let name = format!("n{}", j + 1);
        assert_eq!(
            outbound_pair(&net.nodes[0].1, &name),
            Some((next_pub, cfgs[j].public_key))
        );
        assert_eq!(
            outbound_pair(&net.nodes[j].1, "n1"),
            Some((cfgs[j].public_key, next_pub))
        );
    }
    assert!(net.nodes[0].1.promote_next_key());
    all_pairs_deliver(&mut net, now, "retired here, not yet announced");
    cfgs[0].public_key = next_pub;
    cfgs[0].next_public_key = None;
    cfgs[0].key_generation += 1;
    announce(&mut net, &cfgs, 0);
    all_pairs_deliver(&mut net, now, "after");
    assert_eq!(net.nodes[0].1.public_key(), next_pub);
    for j in 1..3 {
        assert_eq!(net.nodes[j].1.peer("n1").expect("n1").slots.len(), 1);
    }
    assert_eq!(net.drops_total(), 0, "{:?}", net.all_drops());

    // A handshake from the old key is refused: nobody holds a slot for it.
    let mut stale = Tunn::new(
        net.keys[0].secret().clone(),
        cfgs[1].public_key.to_dalek(),
        None,
        None,
        7,
        None,
    );
    assert_ne!(old, net.nodes[0].1.public_key());
    let mut buf = vec![0u8; 256];
    let TunnResult::WriteToNetwork(init) = stale.format_handshake_initiation(&mut buf, false)
    else {
        panic!("no initiation");
    };
    let init = init.to_vec();
    let from = net.nodes[0].0;
    net.nodes[1].1.handle_udp(from, &init, now);
    assert_eq!(net.nodes[1].1.drops().get(DropReason::UnknownPeer), 1);
    // Nor does anyone answer a handshake addressed to node 0's old key.
    let mut to_old = Tunn::new(
        net.keys[1].secret().clone(),
        old.to_dalek(),
        None,
        None,
        8,
        None,
    );
    let TunnResult::WriteToNetwork(init) = to_old.format_handshake_initiation(&mut buf, false)
    else {
        panic!("no initiation");
    };
    let init = init.to_vec();
    let from = net.nodes[1].0;
    net.nodes[0].1.handle_udp(from, &init, now);
    assert_eq!(net.nodes[0].1.drops().get(DropReason::InvalidMac), 1);
    assert!(
        net.nodes[0].1.poll_output().is_none(),
        "answered the old key"
    );
}

/// Both ends rotate at once: four key pairs per link while it lasts, and traffic flows at
/// every step.
#[test]
fn both_ends_rotating_at_once_use_four_pairs_and_lose_nothing() {
    let now = Instant::now();
    let (mut net, mut cfgs) = full_mesh(2);
    net.run(now);
    let nexts: Vec<PrivateKey> = (0..2).map(|_| PrivateKey::generate()).collect();
    for (i, k) in nexts.iter().enumerate() {
        net.nodes[i].1.set_next_key(k.clone()).expect("next");
        cfgs[i].next_public_key = Some(k.public_key());
    }
    for i in 0..2 {
        announce(&mut net, &cfgs, i);
    }
    assert_eq!(net.nodes[0].1.peer("n2").expect("n2").slots.len(), 4);
    all_pairs_deliver(&mut net, now, "both announced");
    for i in 0..2 {
        net.nodes[i].1.initiate_next();
    }
    net.run(now);
    all_pairs_deliver(&mut net, now, "both handshaken");
    assert_eq!(
        outbound_pair(&net.nodes[0].1, "n2"),
        Some((nexts[0].public_key(), nexts[1].public_key()))
    );
    for i in 0..2 {
        assert!(net.nodes[i].1.promote_next_key());
        all_pairs_deliver(&mut net, now, "one promoted");
    }
    for i in 0..2 {
        cfgs[i].public_key = nexts[i].public_key();
        cfgs[i].next_public_key = None;
        announce(&mut net, &cfgs, i);
        all_pairs_deliver(&mut net, now, "one announced");
    }
    assert_eq!(net.nodes[0].1.peer("n2").expect("n2").slots.len(), 1);
    assert_eq!(net.drops_total(), 0, "{:?}", net.all_drops());
}

/// A rotation rolled back (meshd killed before it published the new key): the next key's
/// slots go, traffic stays on the current key.
#[test]
fn dropping_the_next_key_rolls_back() {
    let now = Instant::now();
    let (mut net, mut cfgs) = full_mesh(2);
    net.run(now);
    let k = PrivateKey::generate();
    net.nodes[0].1.set_next_key(k.clone()).expect("next");
    cfgs[0].next_public_key = Some(k.public_key());
    announce(&mut net, &cfgs, 0);
    net.nodes[0].1.initiate_next();
    net.run(now);
    net.nodes[0].1.drop_next_key();
    cfgs[0].next_public_key = None;
    announce(&mut net, &cfgs, 0);
    all_pairs_deliver(&mut net, now, "rolled back");
    assert_eq!(net.nodes[0].1.next_key(), None);
    assert_eq!(net.nodes[1].1.peer("n1").expect("n1").slots.len(), 1);
    assert_eq!(net.drops_total(), 0, "{:?}", net.all_drops());
}

/// An idle peer (nothing to send) still moves: the rotating node confirms the new session
/// with keepalives, after which the peer's outbound uses the new pair too.
#[test]
fn idle_peer_is_confirmed_by_keepalives() {
    let now = Instant::now();
    let (mut net, mut cfgs) = full_mesh(2);
    net.run(now);
    let k = PrivateKey::generate();
    net.nodes[0].1.set_next_key(k.clone()).expect("next");
    cfgs[0].next_public_key = Some(k.public_key());
    announce(&mut net, &cfgs, 0);
    net.nodes[0].1.initiate_next();
    net.run(now);
    assert_eq!(
        net.nodes[0].1.rotation_progress().get("n2"),
        Some(&PeerRotation::Established)
    );
    for i in 1..=3u32 {
        net.nodes[0]
            .1
            .handle_timeout(now + CONFIRMATION_INTERVAL * i);
        net.run(now);
    }
    assert_eq!(
        net.nodes[0].1.rotation_progress().get("n2"),
        Some(&PeerRotation::Moved)
    );
    assert_eq!(
        outbound_pair(&net.nodes[1].1, "n1"),
        Some((cfgs[1].public_key, k.public_key()))
    );
    assert!(net.nodes[0].1.promote_next_key());
    all_pairs_deliver(&mut net, now, "after an idle rotation");
    assert_eq!(net.drops_total(), 0, "{:?}", net.all_drops());
}

fn secret(byte: u8) -> ClusterSecret {
    use base64::Engine as _;
    ClusterSecret::from_base64(&base64::engine::general_purpose::STANDARD.encode([byte; 32]))
        .expect("secret")
}

/// Every node holds `secrets[i]` at generation 0 and publishes generation 0.
fn psk_mesh(secrets: &[u8]) -> (Net, Vec<PeerConfig>) {
    let (mut net, mut cfgs) = Net::new(secrets.len() as u8);
    for (i, b) in secrets.iter().enumerate() {
        net.nodes[i].1.set_cluster_secret(secret(*b), 0);
        cfgs[i].psk = PeerPsk::Cluster(Some(0));
    }
    for i in 0..secrets.len() {
        for (j, cfg) in cfgs.iter().enumerate() {
            if i != j {
                net.nodes[i].1.add_peer(cfg.clone()).expect("add");
            }
        }
    }
    (net, cfgs)
}

fn pair_gen(node: &Node, peer: &str) -> Option<u64> {
    let p = node.peer(peer)?;
    let i = node.best_session(p)?;
    p.slots[i].psk_generation
}

#[test]
fn same_cluster_secret_connects_a_wrong_one_reaches_no_one() {
    let now = Instant::now();
    // n1 and n2 share the secret; n3 holds another one.
    let (mut net, _) = psk_mesh(&[1, 1, 2]);
    net.run(now);
    let p = ipv4_packet([10, 42, 1, 5], [10, 42, 2, 7], b"psk ok");
    net.nodes[0].1.handle_tun(&p, now);
    net.run(now);
    assert_eq!(net.delivered[1], vec![p]);
    assert_eq!(pair_gen(&net.nodes[0].1, "n2"), Some(0));
    for (i, peer) in [(0, "n3"), (1, "n3"), (2, "n1"), (2, "n2")] {
        assert!(
            net.nodes[i]
                .1
                .peer(peer)
                .expect("peer")
                .slots
                .iter()
                .all(|s| !s.has_session()),
            "node {i} has a session with {peer} despite different secrets"
        );
    }
    let p = ipv4_packet([10, 42, 3, 5], [10, 42, 1, 7], b"wrong secret");
    net.nodes[2].1.handle_tun(&p, now);
    net.run(now);
    assert!(net.delivered[0].is_empty());
    // A node without the secret does not reach a node with it either.
    let (mut net, cfgs) = Net::new(2);
    net.nodes[0].1.set_cluster_secret(secret(1), 0);
    net.nodes[0].1.add_peer(cfgs[1].clone()).expect("add");
    net.nodes[1].1.add_peer(cfgs[0].clone()).expect("add");
    net.run(now);
    let p = ipv4_packet([10, 42, 2, 5], [10, 42, 1, 7], b"no secret");
    net.nodes[1].1.handle_tun(&p, now);
    net.run(now);
    assert!(net.delivered[0].is_empty());
}

#[test]
fn external_peers_never_use_the_psk() {
    let now = Instant::now();
    let (mut net, mut cfgs) = Net::new(2);
    net.nodes[0].1.set_cluster_secret(secret(1), 4);
    cfgs[1].psk = PeerPsk::Never;
    net.nodes[0].1.add_peer(cfgs[1].clone()).expect("add");
    net.nodes[1].1.add_peer(cfgs[0].clone()).expect("add");
    net.run(now);
    all_pairs_deliver(&mut net, now, "external");
    assert_eq!(pair_gen(&net.nodes[0].1, "n2"), None);
}

/// `keyctl psk rotate`: every node moves to the next generation, in any order, while
/// traffic flows; nothing is lost and the old generation's slots go.
#[test]
fn psk_rotation_loses_nothing_and_retires_the_old_generation() {
    let now = Instant::now();
    let (mut net, mut cfgs) = psk_mesh(&[7, 7, 7]);
    net.run(now);
    all_pairs_deliver(&mut net, now, "gen 0");
    for i in 0..3 {
        // Node i moves and publishes; the others see its record.
        net.nodes[i].1.set_psk_generation(1);
        all_pairs_deliver(&mut net, now, &format!("node {i} moved, unpublished"));
        cfgs[i].psk = PeerPsk::Cluster(Some(1));
        announce(&mut net, &cfgs, i);
        net.run(now);
        all_pairs_deliver(&mut net, now, &format!("node {i} published"));
        for t in 1..=4u32 {
            for j in 0..3 {
                net.nodes[j]
                    .1
                    .handle_timeout(now + CONFIRMATION_INTERVAL * t);
            }
            net.run(now);
        }
        all_pairs_deliver(&mut net, now, &format!("node {i} settled"));
    }
    for i in 0..3 {
        for p in net.nodes[i].1.peer_status() {
            assert_eq!(p.psk_generation, Some(1), "node {i} peer {}", p.name);
            assert_eq!(p.key_pairs, 1, "node {i} peer {}: old slot kept", p.name);
        }
    }
    assert_eq!(net.drops_total(), 0, "{:?}", net.all_drops());
}

/// A node that moved first keeps the old generation with peers that have not moved: the
/// pair uses the lower of the two.
#[test]
fn pairs_use_the_lower_generation() {
    let now = Instant::now();
    let (mut net, mut cfgs) = psk_mesh(&[3, 3]);
    net.run(now);
    net.nodes[0].1.set_psk_generation(2);
    cfgs[0].psk = PeerPsk::Cluster(Some(2));
    announce(&mut net, &cfgs, 0);
    net.run(now);
    all_pairs_deliver(&mut net, now, "one moved");
    assert_eq!(pair_gen(&net.nodes[0].1, "n2"), Some(0));
    assert_eq!(pair_gen(&net.nodes[1].1, "n1"), Some(0));
    assert_eq!(net.drops_total(), 0, "{:?}", net.all_drops());
}

// ---------------- sharding ----------------

/// A device split into shards as meshd runs it: every command goes to every shard, a
/// datagram first reaches the shard its source hashes to (as `SO_REUSEPORT` would), a TUN
/// packet an arbitrary one (as a multi-queue TUN would), and `Dispatch::Shard` is followed.
struct ShardedNet {
    nodes: Vec<(SocketAddr, Vec<Node>)>,
    delivered: Vec<Vec<Vec<u8>>>,
    keys: Vec<PrivateKey>,
    /// Inputs handed on to another shard, from the UDP socket (and of those, handshake
    /// initiations) and from the TUN.
    udp_hops: usize,
    init_hops: usize,
    tun_hops: usize,
    /// Picks the first shard of a TUN packet.
    tun_turn: usize,
}

impl TestNet for ShardedNet {
    fn node_count(&self) -> usize {
        self.nodes.len()
    }
    fn send(&mut self, i: usize, pkt: &[u8], now: Instant) {
        self.tun(i, pkt, now);
    }
    fn settle(&mut self, now: Instant) {
        self.run(now);
    }
    fn last_delivered(&self, j: usize) -> Option<&Vec<u8>> {
        self.delivered[j].last()
    }
    fn update(&mut self, j: usize, cfg: &PeerConfig) {
        self.each(j, |n| n.update_peer(cfg.clone()).expect("update"));
    }
}

/// `n` names such that the first `count` are owned by shards 0, 1, .. `count - 1`.
fn spread_names(n: usize, count: u16) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let candidates = (0..).map(|k| format!("node-{k}"));
    for s in 0..count {
        let name = candidates
            .clone()
            .find(|c| shard_of(c, count) == s && !names.contains(c))
            .expect("a name");
        names.push(name);
    }
    for c in candidates {
        if names.len() >= n {
            break;
        }
        if !names.contains(&c) {
            names.push(c);
        }
    }
    names.truncate(n);
    names
}

impl ShardedNet {
    /// Nodes named `names`, node `i` owning 10.42.(i+1).0/24, each split into `count`.
    fn new(names: &[String], count: u16) -> (ShardedNet, Vec<PeerConfig>) {
        let mut nodes = Vec::new();
        let mut cfgs = Vec::new();
        let mut keys = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let k = PrivateKey::generate();
            let addr: SocketAddr = format!("198.18.0.{}:51820", 11 + i).parse().expect("addr");
            cfgs.push(PeerConfig {
                name: name.clone(),
                kind: PeerKind::Node,
                public_key: k.public_key(),
                next_public_key: None,
                endpoints: vec![addr],
                private_endpoints: Vec::new(),
                location: None,
                through_nat: false,
                relay: false,
                allowed_ips: vec![format!("10.42.{}.0/24", i + 1).parse().expect("net")],
                key_generation: 1,
                psk: PeerPsk::Cluster(None),
            });
            let shards = (0..count)
                .map(|s| Node::new_shard(k.clone(), None, s, count).expect("shard"))
                .collect();
            keys.push(k);
            nodes.push((addr, shards));
        }
        let delivered = vec![Vec::new(); nodes.len()];
        let net = ShardedNet {
            nodes,
            delivered,
            keys,
            udp_hops: 0,
            init_hops: 0,
            tun_hops: 0,
            tun_turn: 0,
        };
        (net, cfgs)
    }

    /// Every node knows every other.
    fn full_mesh(names: &[String], count: u16) -> (ShardedNet, Vec<PeerConfig>) {
        let (mut net, cfgs) = ShardedNet::new(names, count);
        for i in 0..cfgs.len() {
            for (j, cfg) in cfgs.iter().enumerate() {
                if i != j {
                    net.each(i, |n| n.add_peer(cfg.clone()).expect("add"));
                }
            }
        }
        (net, cfgs)
    }

    /// What the driver does with a command: the same call on every shard of node `i`.
    fn each(&mut self, i: usize, mut f: impl FnMut(&mut Node)) {
        for n in &mut self.nodes[i].1 {
            f(n);
        }
    }

    fn count(&self) -> usize {
        self.nodes[0].1.len()
    }

    fn udp(&mut self, j: usize, from: SocketAddr, payload: &[u8], now: Instant) {
        let first = (usize::from(from.port())
            + match from.ip() {
                std::net::IpAddr::V4(a) => usize::from(a.octets()[3]),
                std::net::IpAddr::V6(a) => usize::from(a.octets()[15]),
            })
            % self.count();
        match self.nodes[j].1[first].handle_udp(from, payload, now) {
            Dispatch::Done => {}
            Dispatch::Shard(k) => {
                let k = usize::from(k);
                assert_ne!(k, first, "dispatched to itself");
                self.udp_hops += 1;
                if payload.first() == Some(&MSG_HANDSHAKE_INIT) {
                    self.init_hops += 1;
                }
                assert_eq!(
                    self.nodes[j].1[k].handle_udp(from, payload, now),
                    Dispatch::Done,
                    "the owner handles it"
                );
            }
        }
    }

    fn tun(&mut self, i: usize, pkt: &[u8], now: Instant) {
        self.tun_turn += 1;
        let first = self.tun_turn % self.count();
        match self.nodes[i].1[first].handle_tun(pkt, now) {
            Dispatch::Done => {}
            Dispatch::Shard(k) => {
                let k = usize::from(k);
                assert_ne!(k, first, "dispatched to itself");
                self.tun_hops += 1;
                assert_eq!(
                    self.nodes[i].1[k].handle_tun(pkt, now),
                    Dispatch::Done,
                    "the owner handles it"
                );
            }
        }
    }

    /// Moves datagrams between nodes until nothing is left in flight.
    fn run(&mut self, now: Instant) {
        for _ in 0..100 {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                for s in 0..self.count() {
                    while let Some(o) = self.nodes[i].1[s].poll_output() {
                        moved = true;
                        match o {
                            Output::Deliver(p) => self.delivered[i].push(p),
                            Output::Transmit { dst, payload } => {
                                let from = self.nodes[i].0;
                                if let Some(j) = self.nodes.iter().position(|(a, _)| *a == dst) {
                                    self.udp(j, from, &payload, now);
                                }
                            }
                        }
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn drops(&self, i: usize) -> Drops {
        let mut d = Drops::default();
        for n in &self.nodes[i].1 {
            d.merge(n.drops());
        }
        d
    }

    fn drops_total(&self) -> u64 {
        (0..self.nodes.len()).map(|i| self.drops(i).total()).sum()
    }

    fn all_drops(&self) -> Vec<BTreeMap<&'static str, u64>> {
        (0..self.nodes.len())
            .map(|i| self.drops(i).by_name())
            .collect()
    }

    fn peer_status(&self, i: usize) -> Vec<PeerStatus> {
        let mut v: Vec<PeerStatus> = self.nodes[i]
            .1
            .iter()
            .flat_map(|n| n.peer_status())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn rotation_progress(&self, i: usize) -> BTreeMap<String, PeerRotation> {
        let mut m = BTreeMap::new();
        for n in &self.nodes[i].1 {
            m.extend(n.rotation_progress());
        }
        m
    }

    /// Node `i`'s peer `name` as its owner shard holds it.
    fn owned_peer(&self, i: usize, name: &str) -> &Peer {
        let s = usize::from(shard_of(name, self.count() as u16));
        self.nodes[i].1[s].peer(name).expect("peer")
    }

    /// Every peer has slots (with a session) in its owner shard only, and every shard's
    /// indices name it.
    fn check_ownership(&self) {
        let count = self.count() as u16;
        for (i, (_, shards)) in self.nodes.iter().enumerate() {
            for (s, node) in shards.iter().enumerate() {
                assert_eq!(node.shard(), (s as u16, count));
                assert_eq!(
                    node.peers.len(),
                    self.nodes.len() - 1,
                    "every shard knows all"
                );
                for p in node.peers.values() {
                    let owner = usize::from(shard_of(&p.config.name, count));
                    if owner == s {
                        assert!(
                            p.slots.iter().any(KeySlot::has_session),
                            "node {i} shard {s}: no session with {}",
                            p.config.name
                        );
                    } else {
                        assert!(
                            p.slots.is_empty() && p.queue.is_empty() && !p.endpoint_confirmed,
                            "node {i} shard {s} holds state of {} (owner {owner})",
                            p.config.name
                        );
                    }
                    for sl in &p.slots {
                        assert_eq!(sl.index % u32::from(count), s as u32);
                    }
                }
                assert!(node
                    .indices
                    .keys()
                    .all(|x| x % u32::from(count) == s as u32));
            }
            let st = self.peer_status(i);
            assert_eq!(
                st.len(),
                self.nodes.len() - 1,
                "node {i}: each peer listed once"
            );
            assert!(st.windows(2).all(|w| w[0].name < w[1].name));
        }
    }
}

/// Full mesh of 4 nodes split into 2 and into 3 shards: every pair handshakes and
/// exchanges both ways, each peer lives in its owner shard only, indices name the shard.
#[test]
fn sharded_full_mesh_handshakes_and_delivers_between_all_pairs() {
    for count in [2u16, 3] {
        let now = Instant::now();
        let names = spread_names(5, count);
        let (mut net, _) = ShardedNet::full_mesh(&names, count);
        net.run(now);
        all_pairs_deliver(&mut net, now, "sharded");
        // And again, now that every session is up.
        all_pairs_deliver(&mut net, now, "again");
        net.check_ownership();
        assert_eq!(net.drops_total(), 0, "{count}: {:?}", net.all_drops());
        for i in 0..net.nodes.len() {
            for st in net.peer_status(i) {
                assert!(
                    st.latest_handshake_secs_ago.is_some(),
                    "{count} {i} {}",
                    st.name
                );
                assert!(st.tx_bytes > 0 && st.rx_bytes > 0);
            }
        }
    }
}

/// Peers really spread over the shards, and inputs really cross between shards.
#[test]
fn sharded_peers_spread_across_shards() {
    let now = Instant::now();
    let names = spread_names(4, 2);
    let (mut net, _) = ShardedNet::full_mesh(&names, 2);
    net.run(now);
    all_pairs_deliver(&mut net, now, "spread");
    for i in 0..net.nodes.len() {
        for s in 0..2 {
            let owned = net.nodes[i].1[s].peer_status().len();
            assert!(owned >= 1, "node {i}: shard {s} owns no peer");
            assert!(
                net.nodes[i].1[s].peers.values().any(|p| p.rx_bytes > 0),
                "node {i}: shard {s} decrypted nothing"
            );
        }
    }
    assert!(
        net.udp_hops > 0,
        "no datagram reached a shard that does not own its peer"
    );
    assert!(
        net.tun_hops > 0,
        "no TUN packet reached a shard that does not own its peer"
    );
    assert!(
        net.init_hops > 0,
        "no initiation reached a shard that does not own its peer"
    );
    assert_eq!(net.drops_total(), 0, "{:?}", net.all_drops());
}

/// Crypto-routing is device-wide across shards: C's packet with a source in B's range is
/// dropped by A's shard that owns C even though another shard owns B.
#[test]
fn sharded_inner_source_of_a_peer_of_another_shard_is_dropped_and_counted() {
    let now = Instant::now();
    let mut names = spread_names(3, 2);
    // names[0] (shard 0) and names[1] (shard 1) become B and C; A is names[2].
    names.rotate_right(1);
    let (a, b, c) = (0usize, 1usize, 2usize);
    assert_ne!(shard_of(&names[b], 2), shard_of(&names[c], 2));
    let (mut net, _) = ShardedNet::full_mesh(&names, 2);
    net.run(now);
    let spoofed = ipv4_packet([10, 42, 2, 99], [10, 42, 1, 5], b"spoof");
    net.tun(c, &spoofed, now);
    net.run(now);
    assert!(net.delivered[a].is_empty());
    assert_eq!(net.drops(a).get(DropReason::SourceNotAllowed), 1);
    let owner_c = usize::from(shard_of(&names[c], 2));
    assert_eq!(
        net.nodes[a].1[owner_c]
            .drops()
            .get(DropReason::SourceNotAllowed),
        1,
        "counted by the shard that decrypted it"
    );
    let st = net.peer_status(a);
    let sc = st.iter().find(|p| p.name == names[c]).expect("C");
    assert_eq!(sc.drops.get("sourceNotAllowed"), Some(&1));
    // The legitimate source still passes, and B's own source too.
    let ok = ipv4_packet([10, 42, 3, 9], [10, 42, 1, 5], b"fine");
    net.tun(c, &ok, now);
    net.run(now);
    assert_eq!(net.delivered[a], vec![ok]);
    let ok = ipv4_packet([10, 42, 2, 99], [10, 42, 1, 5], b"b is fine");
    net.tun(b, &ok, now);
    net.run(now);
    assert_eq!(net.delivered[a].last(), Some(&ok));
    assert_eq!(net.drops_total(), 1, "{:?}", net.all_drops());
}

/// One node of a sharded mesh rotates its key: every shard gets every call, the merged
/// progress ends with every peer moved, nothing is lost, the old key is refused afterwards.
#[test]
fn sharded_rotation_loses_nothing_and_retires_the_old_key() {
    let now = Instant::now();
    let names = spread_names(4, 2);
    let (mut net, mut cfgs) = ShardedNet::full_mesh(&names, 2);
    net.run(now);
    all_pairs_deliver(&mut net, now, "before");

    let old = cfgs[0].public_key;
    let next = PrivateKey::generate();
    let next_pub = next.public_key();
    net.each(0, |n| n.set_next_key(next.clone()).expect("next key"));
    cfgs[0].next_public_key = Some(next_pub);
    announce(&mut net, &cfgs, 0);
    all_pairs_deliver(&mut net, now, "announced");
    net.each(0, Node::initiate_next);
    net.run(now);
    let progress = net.rotation_progress(0);
    assert_eq!(progress.len(), names.len() - 1, "{progress:?}");
    assert!(
        progress.values().all(|p| *p != PeerRotation::Handshaking),
        "{progress:?}"
    );
    all_pairs_deliver(&mut net, now, "handshaken");
    let progress = net.rotation_progress(0);
    assert!(
        progress.values().all(|p| *p == PeerRotation::Moved),
        "{progress:?}"
    );
    net.each(0, |n| assert!(n.promote_next_key()));
    all_pairs_deliver(&mut net, now, "retired here, not yet announced");
    cfgs[0].public_key = next_pub;
    cfgs[0].next_public_key = None;
    cfgs[0].key_generation += 1;
    announce(&mut net, &cfgs, 0);
    all_pairs_deliver(&mut net, now, "after");
    for j in 1..names.len() {
        assert_eq!(net.owned_peer(j, &names[0]).slots.len(), 1);
    }
    net.check_ownership();
    assert_eq!(net.drops_total(), 0, "{:?}", net.all_drops());

    // A handshake from the old key is refused by node 1 (in whichever shard reads it).
    let mut stale = Tunn::new(
        net.keys[0].secret().clone(),
        cfgs[1].public_key.to_dalek(),
        None,
        None,
        7,
        None,
    );
    assert_ne!(old, net.nodes[0].1[0].public_key());
    let mut buf = vec![0u8; 256];
    let TunnResult::WriteToNetwork(init) = stale.format_handshake_initiation(&mut buf, false)
    else {
        panic!("no initiation");
    };
    let init = init.to_vec();
    let from = net.nodes[0].0;
    net.udp(1, from, &init, now);
    assert_eq!(net.drops(1).get(DropReason::UnknownPeer), 1);
}

#[test]
fn shard_of_datagram_reads_the_receiver_index_of_each_message_type() {
    let idx: u32 = 0x0012_3457;
    let receiver = (idx << 8) | 5;
    let mut resp = vec![0u8; HANDSHAKE_RESPONSE_LEN];
    resp[0] = MSG_HANDSHAKE_RESPONSE;
    resp[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
    resp[8..12].copy_from_slice(&receiver.to_le_bytes());
    let mut cookie = vec![0u8; COOKIE_REPLY_LEN];
    cookie[0] = MSG_COOKIE_REPLY;
    cookie[4..8].copy_from_slice(&receiver.to_le_bytes());
    let mut data = vec![0u8; 1400];
    data[0] = MSG_DATA;
    data[4..8].copy_from_slice(&receiver.to_le_bytes());
    let keepalive = data[..DATA_MIN_LEN].to_vec();
    for m in [&resp, &cookie, &data, &keepalive] {
        assert!(Tunn::parse_incoming_packet(m).is_ok());
        assert_eq!(shard_of_datagram(m, 2), Some((idx % 2) as u16));
        assert_eq!(shard_of_datagram(m, 3), Some((idx % 3) as u16));
        assert_eq!(shard_of_datagram(m, 7), Some((idx % 7) as u16));
        assert_eq!(shard_of_datagram(m, u16::MAX), Some((idx % 65535) as u16));
        assert_eq!(shard_of_datagram(m, 1), None);
        assert_eq!(shard_of_datagram(m, 0), None);
    }
    let mut init = vec![0u8; 148];
    init[0] = MSG_HANDSHAKE_INIT;
    assert_eq!(
        shard_of_datagram(&init, 2),
        None,
        "an initiation names no index"
    );
    // Malformed: wrong lengths, reserved bytes set, unknown types, short, oversize.
    let mut bad: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![4],
        vec![4, 0, 0, 0],
        vec![4, 0, 0, 0, 1, 2, 3],
        data[..DATA_MIN_LEN - 1].to_vec(),
        resp[..HANDSHAKE_RESPONSE_LEN - 1].to_vec(),
        [resp.clone(), vec![0]].concat(),
        cookie[..COOKIE_REPLY_LEN - 1].to_vec(),
        [cookie.clone(), vec![0]].concat(),
        vec![0u8; 92],
        vec![5u8; 64],
        vec![0xff; 2000],
    ];
    let mut reserved = data.clone();
    reserved[1] = 1;
    bad.push(reserved);
    let mut huge = vec![0u8; MAX_DATAGRAM + 1];
    huge[0] = MSG_DATA;
    bad.push(huge);
    for b in &bad {
        assert_eq!(shard_of_datagram(b, 2), None, "{:?}", &b[..b.len().min(8)]);
    }
    // Never panics on anything.
    let mut x: u64 = 11;
    for _ in 0..5000 {
        let len = (x % 200) as usize;
        let mut d: Vec<u8> = (0..len)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                (x >> 56) as u8
            })
            .collect();
        if let Some(first) = d.first_mut() {
            *first %= 6;
        }
        for shards in [0, 1, 2, 3, 255, u16::MAX] {
            if let Some(k) = shard_of_datagram(&d, shards) {
                assert!(k < shards);
            }
        }
    }
}

#[test]
fn shard_of_is_fnv1a_stable_and_in_range() {
    // FNV-1a 64 test vectors: "" → offset basis, "a" → 0xaf63dc4c8601ec8c.
    assert_eq!(shard_of("", 1000), (0xcbf2_9ce4_8422_2325u64 % 1000) as u16);
    assert_eq!(
        shard_of("a", 1000),
        (0xaf63_dc4c_8601_ec8cu64 % 1000) as u16
    );
    assert_eq!(shard_of("a", 0), 0);
    assert_eq!(shard_of("a", 1), 0);
    for count in [2u16, 3, 4, 16, u16::MAX] {
        let mut seen = std::collections::HashSet::new();
        for k in 0..2000 {
            let name = format!("node-{k}");
            let s = shard_of(&name, count);
            assert!(s < count);
            assert_eq!(s, shard_of(&name, count));
            seen.insert(s);
        }
        assert!(
            seen.len() >= usize::from(count.min(16)),
            "{count}: {seen:?}"
        );
    }
}

#[test]
fn new_shard_refuses_bad_shards_and_indices_name_the_shard() {
    let k = PrivateKey::generate();
    for (index, count) in [(0u16, 0u16), (1, 1), (2, 2), (5, 3), (u16::MAX, u16::MAX)] {
        assert_eq!(
            Node::new_shard(k.clone(), None, index, count).map(|n| n.shard()),
            Err(NodeError::InvalidShard { index, count })
        );
    }
    assert_eq!(Node::new(k.clone(), None).shard(), (0, 1));
    for (index, count) in [(0u16, 1u16), (2, 3), (u16::MAX - 1, u16::MAX)] {
        let n = Node::new_shard(k.clone(), None, index, count).expect("shard");
        assert_eq!(n.shard(), (index, count));
        for _ in 0..200 {
            let idx = n.fresh_index();
            assert!(idx <= 0x00ff_ffff);
            assert_eq!(idx % u32::from(count), u32::from(index));
        }
    }
    // Shards of one device share their keys' rate limiters; separate devices do not.
    let a = Node::new_shard(k.clone(), None, 0, 2).expect("shard");
    let b = Node::new_shard(k.clone(), None, 1, 2).expect("shard");
    assert!(Arc::ptr_eq(&a.own.limiter, &b.own.limiter));
    assert!(!Arc::ptr_eq(
        &a.own.limiter,
        &Node::new(k, None).own.limiter
    ));
}

// ---------------- paths: relays and hole punching ----------------

/// Three nodes: n1 a relay with a public endpoint; n2 and n3 know no endpoint of each other
/// (both behind NAT) and every direct datagram between them is lost. All traffic between n2
/// and n3 flows through n1, which forwards ciphertext only.
fn relay_net() -> (Net, Vec<PeerConfig>) {
    let (mut net, mut cfgs) = Net::new(3);
    cfgs[0].relay = true;
    let (a2, a3) = (net.nodes[1].0, net.nodes[2].0);
    net.blocked = vec![(a2, a3), (a3, a2)];
    for i in 0..3 {
        let eps: Vec<SocketAddr> = vec![net.nodes[i].0];
        net.nodes[i].1.set_paths(true, i == 0, eps, vec![]);
    }
    for i in 0..3 {
        for (j, c) in cfgs.iter().enumerate() {
            if i == j {
                continue;
            }
            let mut c = c.clone();
            if i > 0 && j > 0 {
                c.endpoints.clear();
            }
            net.nodes[i].1.add_peer(c).expect("add");
        }
    }
    (net, cfgs)
}

fn tick(net: &mut Net, now: Instant) {
    for i in 0..net.nodes.len() {
        net.nodes[i].1.handle_timeout(now);
    }
    net.run(now);
}

#[test]
fn nodes_without_a_direct_path_talk_through_a_relay_that_reads_nothing() {
    let t0 = Instant::now();
    let (mut net, _) = relay_net();
    net.run(t0);
    // Relay pings: n1 is alive for both.
    tick(&mut net, t0);
    assert!(net.nodes[1].1.relay_status()[0].alive);
    let p = ipv4_packet([10, 42, 2, 5], [10, 42, 3, 7], b"via-the-relay-secret");
    net.nodes[1].1.handle_tun(&p, t0);
    net.run(t0);
    assert_eq!(net.delivered[2], vec![p.clone()], "n3 got it through n1");
    assert!(
        net.delivered[0].is_empty(),
        "the relay delivers nothing to itself"
    );
    let st = net.nodes[1].1.peer_status();
    let to3 = st.iter().find(|s| s.name == "n3").expect("n3");
    assert_eq!(to3.path, "relayed");
    assert_eq!(to3.relay.as_deref(), Some("n1"));
    assert!(net.nodes[0].1.path_stats().relayed_packets >= 2);
    // Back the other way, answered through the relay too.
    let back = ipv4_packet([10, 42, 3, 7], [10, 42, 2, 5], b"reply");
    net.nodes[2].1.handle_tun(&back, t0);
    net.run(t0);
    assert_eq!(net.delivered[1], vec![back]);
    let st = net.nodes[2].1.peer_status();
    assert_eq!(
        st.iter().find(|s| s.name == "n2").map(|s| s.path),
        Some("relayed")
    );
}

#[test]
fn a_relay_forwards_only_for_members_and_only_when_it_relays() {
    let t0 = Instant::now();
    let (mut net, _) = relay_net();
    tick(&mut net, t0);
    // A stranger's RELAY (a key the relay does not know) is refused and answered with nothing.
    let stranger = PrivateKey::generate();
    let relay_key = net.nodes[0].1.public_key();
    let k = crate::pathmsg::PairKey::derive(&stranger, &relay_key);
    let dst = crate::pathmsg::key_id(&net.nodes[2].1.public_key());
    let m = k.seal(
        crate::pathmsg::MSG_RELAY,
        crate::pathmsg::key_id(&stranger.public_key()),
        crate::pathmsg::key_id(&relay_key),
        &[&dst, &[4u8; 64]],
    );
    let before = net.nodes[0].1.path_stats();
    let from: SocketAddr = "203.0.113.66:4444".parse().expect("a");
    net.nodes[0].1.handle_udp(from, &m, t0);
    assert_eq!(
        net.nodes[0].1.poll_output(),
        None,
        "nothing sent for a stranger"
    );
    assert_eq!(
        net.nodes[0].1.path_stats().relay_refused,
        before.relay_refused + 1
    );
    // A member's RELAY with a bad tag, and a ping from a stranger: nothing either.
    let mut bad = m.clone();
    bad[30] ^= 1;
    net.nodes[0].1.handle_udp(from, &bad, t0);
    let ping = k.seal(
        crate::pathmsg::MSG_PING,
        crate::pathmsg::key_id(&stranger.public_key()),
        crate::pathmsg::key_id(&relay_key),
        &[&crate::pathmsg::ping_body(1, None)],
    );
    net.nodes[0].1.handle_udp(from, &ping, t0);
    assert_eq!(net.nodes[0].1.poll_output(), None);
    // A node that does not relay refuses members too.
    net.nodes[0].1.set_paths(true, false, vec![], vec![]);
    let p = ipv4_packet([10, 42, 2, 5], [10, 42, 3, 7], b"x");
    net.nodes[1].1.handle_tun(&p, t0);
    net.run(t0);
    assert!(net.delivered[2].is_empty());
    assert!(net.nodes[0].1.path_stats().relay_refused >= 2);
}

#[test]
fn calls_punch_a_direct_path_and_traffic_moves_to_it() {
    let t0 = Instant::now();
    let (mut net, _) = relay_net();
    tick(&mut net, t0);
    let p = ipv4_packet([10, 42, 2, 5], [10, 42, 3, 7], b"first");
    net.nodes[1].1.handle_tun(&p, t0);
    net.run(t0);
    assert_eq!(net.delivered[2].len(), 1);
    // The reflexive address came from the relay's pong.
    assert_eq!(net.nodes[1].1.reflexive_address(), Some(net.nodes[1].0));
    // The path between n2 and n3 opens (no NAT in this network, only the block).
    net.blocked.clear();
    let mut t = t0;
    for _ in 0..8 {
        t += Duration::from_millis(500);
        tick(&mut net, t);
    }
    let st = net.nodes[1].1.peer_status();
    let to3 = st.iter().find(|s| s.name == "n3").expect("n3");
    assert_eq!(to3.path, "direct", "{to3:?}");
    assert!(to3.path_upgrades >= 1);
    assert_eq!(to3.endpoint.as_deref(), Some("198.18.0.13:51820"));
    let relayed_before = net.nodes[0].1.path_stats().relayed_packets;
    let q = ipv4_packet([10, 42, 2, 5], [10, 42, 3, 7], b"direct-now");
    net.nodes[1].1.handle_tun(&q, t);
    net.run(t);
    assert_eq!(net.delivered[2].last(), Some(&q));
    assert_eq!(
        net.nodes[0].1.path_stats().relayed_packets,
        relayed_before,
        "not through the relay any more"
    );
    let st = net.nodes[2].1.peer_status();
    assert_eq!(
        st.iter().find(|s| s.name == "n2").map(|s| s.path),
        Some("direct")
    );
}

#[test]
fn a_dead_relay_is_replaced_by_a_live_one() {
    let t0 = Instant::now();
    // n1 and n4 relay; n2 and n3 cannot reach each other directly.
    let (mut net, mut cfgs) = Net::new(4);
    cfgs[0].relay = true;
    cfgs[3].relay = true;
    let (a2, a3) = (net.nodes[1].0, net.nodes[2].0);
    net.blocked = vec![(a2, a3), (a3, a2)];
    for i in 0..4 {
        let eps = vec![net.nodes[i].0];
        net.nodes[i]
            .1
            .set_paths(true, i == 0 || i == 3, eps, vec![]);
        for (j, c) in cfgs.iter().enumerate() {
            if i == j {
                continue;
            }
            let mut c = c.clone();
            if (i == 1 || i == 2) && (j == 1 || j == 2) {
                c.endpoints.clear();
            }
            net.nodes[i].1.add_peer(c).expect("add");
        }
    }
    tick(&mut net, t0);
    let p = ipv4_packet([10, 42, 2, 5], [10, 42, 3, 7], b"one");
    net.nodes[1].1.handle_tun(&p, t0);
    net.run(t0);
    assert_eq!(net.delivered[2].len(), 1);
    let used = net.nodes[1]
        .1
        .peer_status()
        .into_iter()
        .find(|s| s.name == "n3")
        .and_then(|s| s.relay);
    let dead = match used.as_deref() {
        Some("n1") => 0,
        Some("n4") => 3,
        other => panic!("relayed through {other:?}"),
    };
    let dead_addr = net.nodes[dead].0;
    // The relay stops answering (every datagram to it is lost).
    for i in 0..4 {
        let a = net.nodes[i].0;
        net.blocked.push((a, dead_addr));
    }
    let mut t = t0;
    for _ in 0..16 {
        t += Duration::from_millis(250);
        tick(&mut net, t);
    }
    let q = ipv4_packet([10, 42, 2, 5], [10, 42, 3, 7], b"two");
    net.nodes[1].1.handle_tun(&q, t);
    net.run(t);
    assert_eq!(net.delivered[2].last(), Some(&q), "through the other relay");
    let now_used = net.nodes[1]
        .1
        .peer_status()
        .into_iter()
        .find(|s| s.name == "n3")
        .and_then(|s| s.relay);
    assert_ne!(now_used, used);
    assert!(!net.nodes[1]
        .1
        .relay_status()
        .iter()
        .find(|r| Some(&r.name) == used.as_ref())
        .map(|r| r.alive)
        .unwrap_or(true));
}
