//! Paths through NAT and relays: which way each peer's datagrams go, and the path messages
//! ([`crate::pathmsg`]) that find and keep those ways.
//!
//! Rules (all per peer, in the peer's shard):
//! - A peer with an endpoint is reached directly. A peer with none (behind NAT, not heard from
//!   yet) is reached through the best live relay, if there is one.
//! - A third handshake initiation sent directly with no authenticated packet from the peer
//!   since the first (two went unanswered for WireGuard's rekey timeout, 5 s each: the peer may
//!   just not know this node yet the first time) moves the peer to a relay. A session whose
//!   path breaks gets there too: WireGuard handshakes again after 15 s without an answer.
//! - The path follows the last authenticated packet, as WireGuard's endpoint does: one received
//!   directly makes the path direct (to where it came from); one received through a relay makes
//!   the path go through that relay, unless a packet came directly within the last
//!   [`DIRECT_FRESH`] (the other end is just moving back to direct).
//! - While relayed, every [`CALL_INTERVAL`] this node sends the peer a `CALL` (through the
//!   relay) with its candidate addresses (its endpoints and its address as relays see it) and
//!   pings the peer's candidates for [`PUNCH_WINDOW`]; the peer does the same on receiving the
//!   call. A pong from a candidate makes the path direct to it: the holes are punched.
//! - Relays (node peers whose records offer relaying, with a public endpoint) are pinged every
//!   [`RELAY_PING_INTERVAL`] while this node needs them (a peer relayed, or one with no address
//!   and no session), else every [`RELAY_IDLE_PING_INTERVAL`] (a relay answers 1000 idle nodes
//!   with 100 pongs a second, not 1000). A relay that leaves a ping unanswered for
//!   [`RELAY_ALIVE`] is dead, and the peers it carried move to the live relay with the shortest
//!   round trip. The pongs also tell this node its own address as seen from outside (its
//!   reflexive address).
//! - A relay forwards a `RELAY` only when both ends are node peers of its own and it knows
//!   where the destination is; it never answers anyone else.

use super::{Dispatch, Node, Output, PeerId};
use crate::keys::PublicKey;
use crate::pathmsg::{self, KeyId, PairKey, MSG_CALL, MSG_PING, MSG_PONG, MSG_RELAY, MSG_RELAYED};
use crate::peer::{DropReason, PeerKind};
use rand_core::{OsRng, RngCore};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How often relays are pinged while this node needs one, and while it does not.
pub const RELAY_PING_INTERVAL: Duration = Duration::from_secs(1);
pub const RELAY_IDLE_PING_INTERVAL: Duration = Duration::from_secs(10);
/// A relay that answered a ping once is alive until a ping stays unanswered this long.
pub const RELAY_ALIVE: Duration = Duration::from_secs(2);
/// Direct initiations without an answer in between that move a peer to a relay.
pub const DIRECT_MISSES: u32 = 3;
/// A packet received directly this recently keeps the path direct against relayed ones.
pub const DIRECT_FRESH: Duration = Duration::from_secs(3);
/// While relayed: how often the peer is called to punch holes, once it called back (its
/// candidates are known); until then every [`CALL_RETRY`] (a call the relay could not forward
/// yet, say because it has not heard from the peer, is not waited for long).
pub const CALL_INTERVAL: Duration = Duration::from_secs(10);
pub const CALL_RETRY: Duration = Duration::from_secs(2);
/// After a call (sent or received): how long the other end's candidates are pinged, and how
/// often.
pub const PUNCH_WINDOW: Duration = Duration::from_secs(5);
pub const PUNCH_INTERVAL: Duration = Duration::from_millis(500);
/// Pings in flight are forgotten after this long, and at most this many are kept.
const PING_TTL: Duration = Duration::from_secs(5);
const MAX_PINGS: usize = 4096;

/// Where a datagram came from, for the WireGuard processing of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Via {
    /// Straight from the peer's address.
    Direct,
    /// Forwarded by this relay peer.
    Relay(PeerId),
}

/// Path counters of a device (of one shard: a sharded device adds them up).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathStats {
    /// Datagrams (and bytes) this node forwarded as a relay.
    pub relayed_packets: u64,
    pub relayed_bytes: u64,
    /// `RELAY` messages refused: not a relay, unknown or unauthenticated sender, unknown
    /// destination or one with no known address.
    pub relay_refused: u64,
    /// Datagrams this node sent through relays.
    pub sent_via_relay: u64,
    pub pings_sent: u64,
    pub pongs_received: u64,
    pub calls_sent: u64,
    pub calls_received: u64,
    /// Path messages that failed authentication or parsing.
    pub refused: u64,
}

impl PathStats {
    pub fn merge(&mut self, o: &PathStats) {
        self.relayed_packets += o.relayed_packets;
        self.relayed_bytes += o.relayed_bytes;
        self.relay_refused += o.relay_refused;
        self.sent_via_relay += o.sent_via_relay;
        self.pings_sent += o.pings_sent;
        self.pongs_received += o.pongs_received;
        self.calls_sent += o.calls_sent;
        self.calls_received += o.calls_received;
        self.refused += o.refused;
    }
}

/// A relay as this node measures it (`meshd status`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayStatus {
    pub name: String,
    pub alive: bool,
    /// Round trip of the last answered ping (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Seconds since its last pong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_pong_secs_ago: Option<f64>,
}

#[derive(Debug, Default, Clone, Copy)]
struct RelayHealth {
    last_ping: Option<Instant>,
    last_pong: Option<Instant>,
    /// The first ping sent since the last pong (None: every ping answered).
    unanswered_since: Option<Instant>,
    rtt: Option<Duration>,
}

#[derive(Debug, Clone, Copy)]
struct PingSent {
    peer: PeerId,
    to: SocketAddr,
    at: Instant,
}

/// The device's path state (one per shard).
#[derive(Debug, Default)]
pub(crate) struct Paths {
    /// Find paths through NAT and use relays (`--use-relays`).
    enabled: bool,
    /// Relay for others (`--relay`).
    relay: bool,
    /// This node's own endpoints (public and private), offered as candidates in calls.
    own_endpoints: Vec<SocketAddr>,
    /// Some of them are public.
    has_public: bool,
    keys: HashMap<(PublicKey, PublicKey), PairKey>,
    relays: BTreeMap<PeerId, RelayHealth>,
    pings: HashMap<u64, PingSent>,
    /// This node's address as each relay saw it in its last pong (the same for all relays
    /// behind an endpoint-independent NAT, different behind a symmetric one).
    reflexive: BTreeMap<PeerId, SocketAddr>,
    stats: PathStats,
    now: Option<Instant>,
}

impl Paths {
    pub(super) fn forget_key(&mut self, key: &PublicKey) {
        self.keys.retain(|(o, p), _| o != key && p != key);
    }

    pub(super) fn set_now(&mut self, now: Instant) {
        self.now = Some(now);
    }
}

impl Node {
    /// Turns path finding and relays on (`use_relays`), and relaying for others (`relay`).
    /// `public` and `private`: this node's endpoints, offered to peers as candidates (with its
    /// address as relays see it).
    pub fn set_paths(
        &mut self,
        use_relays: bool,
        relay: bool,
        public: Vec<SocketAddr>,
        private: Vec<SocketAddr>,
    ) {
        self.paths.enabled = use_relays || relay;
        self.paths.relay = relay;
        self.paths.has_public = !public.is_empty();
        self.paths.own_endpoints = public;
        self.paths.own_endpoints.extend(private);
    }

    /// Path counters of this shard.
    pub fn path_stats(&self) -> PathStats {
        self.paths.stats
    }

    /// This node's address as relays see it (from their pongs), if known: the one most relays
    /// agree on.
    pub fn reflexive_address(&self) -> Option<SocketAddr> {
        let mut count: BTreeMap<SocketAddr, usize> = BTreeMap::new();
        for a in self.paths.reflexive.values() {
            *count.entry(*a).or_default() += 1;
        }
        count.into_iter().max_by_key(|(_, n)| *n).map(|(a, _)| a)
    }

    /// Whether relays see this node at different addresses (a NAT that maps per destination:
    /// symmetric, where hole punching fails). None until two relays answered.
    pub fn nat_is_symmetric(&self) -> Option<bool> {
        let mut seen = self.paths.reflexive.values();
        let first = seen.next()?;
        let mut others = seen.peekable();
        others.peek()?;
        Some(others.any(|a| a != first))
    }

    /// The relays this shard measures.
    pub fn relay_status(&self) -> Vec<RelayStatus> {
        let now = self.paths.now;
        let mut v: Vec<RelayStatus> = self
            .paths
            .relays
            .iter()
            .filter_map(|(id, h)| {
                let p = self.peers.get(id)?;
                Some(RelayStatus {
                    name: p.config.name.clone(),
                    alive: self.relay_alive(*id),
                    rtt_ms: h.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    last_pong_secs_ago: h
                        .last_pong
                        .zip(now)
                        .map(|(t, n)| n.saturating_duration_since(t).as_secs_f64()),
                })
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The name of the relay a peer's datagrams go through, if any.
    pub(super) fn relay_name(&self, relay: Option<PeerId>) -> Option<String> {
        relay
            .and_then(|r| self.peers.get(&r))
            .map(|p| p.config.name.clone())
    }

    fn pair_key(&mut self, own: PublicKey, peer: PublicKey) -> Option<PairKey> {
        if let Some(k) = self.paths.keys.get(&(own, peer)) {
            return Some(k.clone());
        }
        let ok = self.own_keys().find(|k| k.key == own)?;
        let k = PairKey::derive(&ok.private, &peer);
        if self.paths.keys.len() > 4 * self.peers.len() + 16 {
            self.paths.keys.clear();
        }
        self.paths.keys.insert((own, peer), k.clone());
        Some(k)
    }

    /// The node peer a key id names, with that key.
    fn node_by_id(&self, id: &KeyId) -> Option<(PeerId, PublicKey)> {
        let key = *self.key_ids.get(id)?;
        let pid = *self.keys.get(&key)?;
        let p = self.peers.get(&pid)?;
        (p.config.kind == PeerKind::Node).then_some((pid, key))
    }

    /// The own key a key id names.
    fn own_by_id(&self, id: &KeyId) -> Option<PublicKey> {
        self.own_keys()
            .map(|k| k.key)
            .find(|k| pathmsg::key_id(k) == *id)
    }

    /// Seals a path message to node peer `to` (its current key, from this node's current key).
    fn seal_to(&mut self, to: PeerId, kind: u8, body: &[&[u8]]) -> Option<Vec<u8>> {
        let theirs = self.peers.get(&to)?.config.public_key;
        let own = self.own.key;
        let k = self.pair_key(own, theirs)?;
        let buf = super::take_buf(&mut self.free, 0);
        Some(k.seal_into(
            buf,
            kind,
            pathmsg::key_id(&own),
            pathmsg::key_id(&theirs),
            body,
        ))
    }

    /// Checks a path message's tag: (sender peer, sender key, own key) when it verifies.
    fn open(&mut self, d: &[u8]) -> Option<(PeerId, PublicKey, PublicKey)> {
        let h = pathmsg::header(d)?;
        let own = self.own_by_id(&h.receiver)?;
        let (pid, key) = self.node_by_id(&h.sender)?;
        let k = self.pair_key(own, key)?;
        k.verify(d).then_some((pid, key, own))
    }

    fn path_refused(&mut self) -> Dispatch {
        self.paths.stats.refused += 1;
        self.drop_packet(None, DropReason::InvalidPacket, 1);
        Dispatch::Done
    }

    /// A path message read from the socket.
    pub(super) fn handle_path_message(&mut self, from: SocketAddr, d: &[u8]) -> Dispatch {
        let Some(h) = pathmsg::header(d) else {
            return self.path_refused();
        };
        let Some((sender, _, _)) = self.open(d) else {
            if h.kind == MSG_RELAY {
                self.paths.stats.relay_refused += 1;
            }
            return self.path_refused();
        };
        let body = pathmsg::body(d);
        match h.kind {
            MSG_PING => {
                // The sender's shard answers: the pong goes back where the ping came from, and
                // a peer with no address yet (behind NAT, its handshake not through yet) is
                // reachable there from now on (so a relay can forward to it at once).
                let Some((txid, _)) = pathmsg::parse_ping(body) else {
                    return self.path_refused();
                };
                if let Some(p) = self.peers.get(&sender) {
                    let owner = self.owner(p);
                    if owner != self.shard_index {
                        return Dispatch::Shard(owner);
                    }
                }
                if let Some(p) = self.peers.get_mut(&sender) {
                    if p.endpoint.is_none() {
                        tracing::debug!(peer = %p.config.name, %from, "endpoint from its ping");
                        p.endpoint = Some(from);
                    }
                }
                let pong = pathmsg::ping_body(txid, Some(from));
                if let Some(m) = self.seal_to(sender, MSG_PONG, &[&pong]) {
                    self.outputs.push_back(Output::Transmit {
                        dst: from,
                        payload: m,
                    });
                }
                Dispatch::Done
            }
            MSG_PONG => {
                let Some((txid, observed)) = pathmsg::parse_ping(body) else {
                    return self.path_refused();
                };
                let count = u64::from(self.shard_count.max(1));
                let shard = (txid % count) as u16;
                if shard != self.shard_index {
                    return Dispatch::Shard(shard);
                }
                self.on_pong(sender, from, txid, observed);
                Dispatch::Done
            }
            MSG_RELAY => self.forward_relay(sender, d),
            MSG_RELAYED => {
                let Some((src_id, inner)) = pathmsg::parse_relay(body) else {
                    return self.path_refused();
                };
                let Some((src, _)) = self.node_by_id(&src_id) else {
                    return self.path_refused();
                };
                if pathmsg::is_path_message(inner) {
                    // A call, end to end from `src`.
                    return self.handle_relayed_path_message(src, sender, inner);
                }
                let mut buf = std::mem::take(&mut self.scratch);
                if buf.len() < inner.len() + super::MIN_BUF {
                    buf.resize(inner.len() + super::MIN_BUF, 0);
                }
                let r = self.route_datagram(from, Via::Relay(sender), Some(src), inner, &mut buf);
                self.scratch = buf;
                r
            }
            // A call comes only inside a relayed message.
            _ => self.path_refused(),
        }
    }

    fn handle_relayed_path_message(
        &mut self,
        src: PeerId,
        relay: PeerId,
        inner: &[u8],
    ) -> Dispatch {
        let Some(h) = pathmsg::header(inner) else {
            return self.path_refused();
        };
        if h.kind != MSG_CALL || self.open(inner).map(|(p, _, _)| p) != Some(src) {
            return self.path_refused();
        }
        if let Some(p) = self.peers.get(&src) {
            let owner = self.owner(p);
            if owner != self.shard_index {
                return Dispatch::Shard(owner);
            }
        }
        let Some(candidates) = pathmsg::parse_call(pathmsg::body(inner)) else {
            return self.path_refused();
        };
        self.paths.stats.calls_received += 1;
        let Some(now) = self.paths.now else {
            return Dispatch::Done;
        };
        let answer = match self.peers.get_mut(&src) {
            Some(p) => {
                p.path.candidates = candidates;
                p.path.punch_until = Some(now + PUNCH_WINDOW);
                p.path.last_punch = None;
                // Call back (so the caller pings this node's candidates too), unless just done.
                p.path
                    .last_call
                    .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
            }
            None => false,
        };
        tracing::debug!(peer = %self.peers.get(&src).map(|p| p.config.name.as_str()).unwrap_or("?"), "called: punching");
        if answer {
            self.send_call(src, relay, now);
        }
        self.punch(src, now);
        Dispatch::Done
    }

    /// A `RELAY` from node peer `sender`: forward its datagram to the destination it names.
    fn forward_relay(&mut self, sender: PeerId, d: &[u8]) -> Dispatch {
        let refuse = |n: &mut Node| {
            n.paths.stats.relay_refused += 1;
            n.drop_packet(Some(sender), DropReason::InvalidPacket, 1);
            Dispatch::Done
        };
        if !self.paths.relay {
            return refuse(self);
        }
        let Some((dst_id, inner)) = pathmsg::parse_relay(pathmsg::body(d)) else {
            return refuse(self);
        };
        let Some((dst, dst_key)) = self.node_by_id(&dst_id) else {
            return refuse(self);
        };
        if dst == sender {
            return refuse(self);
        }
        let owner = match self.peers.get(&dst) {
            Some(p) => self.owner(p),
            None => return refuse(self),
        };
        if owner != self.shard_index {
            return Dispatch::Shard(owner);
        }
        let Some(to) = self.peers.get(&dst).and_then(|p| p.endpoint) else {
            return refuse(self);
        };
        let src_key = match self.peers.get(&sender) {
            Some(p) => p.config.public_key,
            None => return refuse(self),
        };
        let own = self.own.key;
        let Some(k) = self.pair_key(own, dst_key) else {
            return refuse(self);
        };
        let m = k.seal_into(
            super::take_buf(&mut self.free, 0),
            MSG_RELAYED,
            pathmsg::key_id(&own),
            pathmsg::key_id(&dst_key),
            &[&pathmsg::key_id(&src_key), inner],
        );
        self.paths.stats.relayed_packets += 1;
        self.paths.stats.relayed_bytes += inner.len() as u64;
        self.outputs.push_back(Output::Transmit {
            dst: to,
            payload: m,
        });
        Dispatch::Done
    }

    /// Sends a peer's datagram the way its path says: directly, or through its relay (or, for a
    /// peer with no endpoint, through the best live relay).
    pub(super) fn send_to_peer(&mut self, id: PeerId, payload: Vec<u8>) {
        let Some(peer) = self.peers.get(&id) else {
            return self.drop_packet(None, DropReason::NoPeer, 1);
        };
        let mut relay = peer.path.relay;
        let endpoint = peer.endpoint;
        if self.paths.enabled && peer.config.kind == PeerKind::Node {
            if relay.is_none() && endpoint.is_none() {
                relay = self.best_relay(id);
                if let (Some(r), Some(p)) = (relay, self.peers.get_mut(&id)) {
                    p.path.relay = Some(r);
                    p.path.reason = "relayed: the peer publishes no endpoint this node can use";
                    p.path.fallbacks += 1;
                }
            } else if let Some(r) = relay.filter(|r| !self.relay_alive(*r)) {
                // The relay died: move to a live one if there is one.
                if let Some(better) = self.best_relay(id).filter(|b| *b != r) {
                    relay = Some(better);
                    if let Some(p) = self.peers.get_mut(&id) {
                        p.path.relay = Some(better);
                        p.path.reason = "relayed: the previous relay stopped answering";
                    }
                }
            }
        }
        match (relay, endpoint) {
            (Some(r), _) if self.paths.enabled => {
                self.send_via_relay(id, r, &payload);
                // The sealed copy went out in a recycled buffer; this one goes back for the next.
                self.recycle(payload);
            }
            (_, Some(dst)) => self.outputs.push_back(Output::Transmit { dst, payload }),
            _ => self.drop_packet(Some(id), DropReason::NoPeer, 1),
        }
    }

    /// Wraps a datagram for peer `to` in a `RELAY` to relay peer `relay`.
    pub(super) fn send_via_relay(&mut self, to: PeerId, relay: PeerId, payload: &[u8]) {
        let Some(dst_key) = self.peers.get(&to).map(|p| p.config.public_key) else {
            return;
        };
        let Some(relay_ep) = self
            .peers
            .get(&relay)
            .and_then(|p| p.config.endpoints.first().copied())
        else {
            return self.drop_packet(Some(to), DropReason::NoPeer, 1);
        };
        let Some(m) = self.seal_to(relay, MSG_RELAY, &[&pathmsg::key_id(&dst_key), payload]) else {
            return self.drop_packet(Some(to), DropReason::NoPeer, 1);
        };
        self.paths.stats.sent_via_relay += 1;
        self.outputs.push_back(Output::Transmit {
            dst: relay_ep,
            payload: m,
        });
    }

    /// An answer (handshake response, cookie) to a datagram that came `via`.
    pub(super) fn reply(&mut self, id: PeerId, from: SocketAddr, via: Via, payload: Vec<u8>) {
        match via {
            Via::Direct => self
                .outputs
                .push_back(Output::Transmit { dst: from, payload }),
            Via::Relay(r) => self.send_via_relay(id, r, &payload),
        }
    }

    /// An authenticated packet from peer `id` came `via` from `from`: the path follows it.
    pub(super) fn path_follows(&mut self, id: PeerId, from: SocketAddr, via: Via) {
        let now = self.paths.now;
        let enabled = self.paths.enabled;
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        match via {
            Via::Direct => {
                if peer.endpoint != Some(from) {
                    tracing::debug!(peer = %peer.config.name, %from, "endpoint now");
                }
                peer.endpoint = Some(from);
                peer.endpoint_confirmed = true;
                peer.path.direct_rx = now;
                peer.path.direct_misses = 0;
                if peer.path.relay.take().is_some() {
                    peer.path.upgrades += 1;
                    peer.path.reason = "direct: an authenticated packet came straight from it";
                    tracing::info!(peer = %peer.config.name, %from, "path direct");
                }
            }
            Via::Relay(r) if enabled => {
                peer.path.relayed_rx = now;
                let fresh = match (peer.path.direct_rx, now) {
                    (Some(d), Some(n)) => n.saturating_duration_since(d) < DIRECT_FRESH,
                    _ => false,
                };
                if !fresh && peer.path.relay != Some(r) {
                    if peer.path.relay.is_none() {
                        peer.path.fallbacks += 1;
                    }
                    peer.path.relay = Some(r);
                    peer.path.reason = "relayed: its packets come through the relay";
                    tracing::info!(peer = %peer.config.name, "path relayed (follows the peer)");
                }
            }
            Via::Relay(_) => {}
        }
    }

    /// A direct handshake initiation to peer `id` went unanswered: move it to a relay.
    pub(super) fn direct_failed(&mut self, id: PeerId) {
        if !self.paths.enabled {
            return;
        }
        let relayed = self.peers.get(&id).map(|p| p.path.relay.is_some());
        if relayed != Some(false) {
            return;
        }
        if self.peers.get(&id).map(|p| p.config.kind) != Some(PeerKind::Node) {
            return;
        }
        if self
            .peers
            .get(&id)
            .is_none_or(|p| p.path.direct_misses < DIRECT_MISSES)
        {
            return;
        }
        if let Some(r) = self.best_relay(id) {
            if let Some(p) = self.peers.get_mut(&id) {
                p.path.relay = Some(r);
                p.path.fallbacks += 1;
                p.path.direct_misses = 0;
                p.path.reason = "relayed: direct handshakes got no answer";
                tracing::info!(peer = %p.config.name, "no direct answer: path relayed");
            }
        }
    }

    fn relay_alive(&self, r: PeerId) -> bool {
        let (Some(h), Some(now)) = (self.paths.relays.get(&r), self.paths.now) else {
            return false;
        };
        h.last_pong.is_some()
            && h.unanswered_since
                .is_none_or(|t| now.saturating_duration_since(t) < RELAY_ALIVE)
    }

    /// The live relay with the shortest round trip, other than `not`.
    fn best_relay(&self, not: PeerId) -> Option<PeerId> {
        self.paths
            .relays
            .iter()
            .filter(|(id, _)| **id != not && self.relay_alive(**id))
            .min_by_key(|(id, h)| (h.rtt.unwrap_or(Duration::MAX), **id))
            .map(|(id, _)| *id)
    }

    fn fresh_txid(&self) -> u64 {
        let count = u64::from(self.shard_count.max(1));
        let r = OsRng.next_u64() >> 8;
        r - r % count + u64::from(self.shard_index)
    }

    fn send_ping(&mut self, peer: PeerId, to: SocketAddr, now: Instant) {
        let txid = self.fresh_txid();
        let body = pathmsg::ping_body(txid, None);
        let Some(m) = self.seal_to(peer, MSG_PING, &[&body]) else {
            return;
        };
        if self.paths.pings.len() >= MAX_PINGS {
            self.paths
                .pings
                .retain(|_, p| now.saturating_duration_since(p.at) < PING_TTL);
            if self.paths.pings.len() >= MAX_PINGS {
                return;
            }
        }
        self.paths
            .pings
            .insert(txid, PingSent { peer, to, at: now });
        self.paths.stats.pings_sent += 1;
        self.outputs.push_back(Output::Transmit {
            dst: to,
            payload: m,
        });
    }

    fn on_pong(
        &mut self,
        sender: PeerId,
        from: SocketAddr,
        txid: u64,
        observed: Option<SocketAddr>,
    ) {
        let Some(ping) = self.paths.pings.remove(&txid) else {
            return;
        };
        if ping.peer != sender || ping.to != from {
            return;
        }
        self.paths.stats.pongs_received += 1;
        let Some(now) = self.paths.now else {
            return;
        };
        if let Some(h) = self.paths.relays.get_mut(&sender) {
            h.last_pong = Some(now);
            h.unanswered_since = None;
            h.rtt = Some(now.saturating_duration_since(ping.at));
            if let Some(o) = observed {
                if self.paths.reflexive.insert(sender, o) != Some(o) {
                    tracing::debug!(address = %o, "this node's address as a relay sees it");
                }
            }
        }
        // A pong from a peer this node reaches through a relay: a direct path works.
        if self.owns(sender) {
            if let Some(p) = self.peers.get_mut(&sender) {
                p.path.direct_misses = 0;
                if p.path.relay.is_some() {
                    p.path.relay = None;
                    p.path.upgrades += 1;
                    p.path.reason = "direct: a ping through the NAT was answered (hole punched)";
                    p.endpoint = Some(from);
                    p.endpoint_confirmed = true;
                    p.path.direct_rx = Some(now);
                    tracing::info!(peer = %p.config.name, %from, "path direct (punched)");
                }
            }
        }
    }

    /// This node's candidate addresses for a peer: its address as relays see it and its own
    /// endpoints.
    fn candidates(&self) -> Vec<SocketAddr> {
        let mut c: Vec<SocketAddr> = self.reflexive_address().into_iter().collect();
        for a in self.paths.reflexive.values() {
            if !c.contains(a) {
                c.push(*a);
            }
        }
        for e in &self.paths.own_endpoints {
            if !c.contains(e) {
                c.push(*e);
            }
        }
        c.truncate(pathmsg::MAX_CANDIDATES);
        c
    }

    fn send_call(&mut self, to: PeerId, relay: PeerId, now: Instant) {
        let body = pathmsg::call_body(&self.candidates());
        let Some(call) = self.seal_to(to, MSG_CALL, &[&body]) else {
            return;
        };
        self.send_via_relay(to, relay, &call);
        self.paths.stats.calls_sent += 1;
        if let Some(p) = self.peers.get_mut(&to) {
            p.path.last_call = Some(now);
            p.path.punch_until = Some(now + PUNCH_WINDOW);
        }
    }

    /// Pings the peer's candidates (from its call, its record and its last endpoint).
    fn punch(&mut self, id: PeerId, now: Instant) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        p.path.last_punch = Some(now);
        let mut to: Vec<SocketAddr> = p.path.candidates.clone();
        for e in p.config.endpoints.iter().chain(p.endpoint.iter()) {
            if !to.contains(e) {
                to.push(*e);
            }
        }
        to.truncate(2 * pathmsg::MAX_CANDIDATES);
        for a in to {
            self.send_ping(id, a, now);
        }
    }

    /// Path timers: relay pings, calls and punching. Called from `handle_timeout`.
    pub(super) fn paths_timeout(&mut self, now: Instant) {
        if !self.paths.enabled {
            return;
        }
        // Relays: the node peers that offer relaying, with a public endpoint.
        let relays: Vec<(PeerId, SocketAddr)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.config.kind == PeerKind::Node && p.config.relay)
            .filter_map(|(id, p)| p.config.endpoints.first().map(|e| (*id, *e)))
            .collect();
        self.paths
            .relays
            .retain(|id, _| relays.iter().any(|(r, _)| r == id));
        self.paths
            .reflexive
            .retain(|id, _| relays.iter().any(|(r, _)| r == id));
        // Needed now: a peer relayed, or one with no address and no session yet.
        let busy = self.peers.values().any(|p| {
            p.config.kind == PeerKind::Node
                && self.owner(p) == self.shard_index
                && (p.path.relay.is_some()
                    || (p.endpoint.is_none() && !p.slots.iter().any(|s| s.has_session())))
        });
        let interval = if busy {
            RELAY_PING_INTERVAL
        } else {
            RELAY_IDLE_PING_INTERVAL
        };
        for (id, ep) in relays {
            let h = self.paths.relays.entry(id).or_default();
            let due = h
                .last_ping
                .is_none_or(|t| now.saturating_duration_since(t) >= interval);
            if due {
                h.last_ping = Some(now);
                if h.unanswered_since.is_none() {
                    h.unanswered_since = Some(now);
                }
                self.send_ping(id, ep, now);
            }
        }
        self.paths
            .pings
            .retain(|_, p| now.saturating_duration_since(p.at) < PING_TTL);
        // Relayed peers: call now and then, punch within the window.
        let owned: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.config.kind == PeerKind::Node)
            .map(|(id, _)| *id)
            .filter(|id| self.owns(*id))
            .collect();
        for id in owned {
            // A peer with no endpoint and no session (both behind NAT): a relay can carry the
            // handshake now (and calls then punch a direct path), as a peer with an endpoint is
            // handshaked with as soon as it is added.
            let stuck = self.peers.get(&id).is_some_and(|p| {
                p.endpoint.is_none()
                    && p.path.relay.is_none()
                    && !p.slots.iter().any(|s| s.has_session())
            });
            if stuck && self.can_relay_to(id) {
                self.initiate_best(id);
            }
            let Some(p) = self.peers.get(&id) else {
                continue;
            };
            let relay = p.path.relay;
            // A call is worth sending once this node knows an address of its own to offer.
            let addressable = !self.paths.reflexive.is_empty() || self.paths.has_public;
            let every = if p.path.candidates.is_empty() {
                CALL_RETRY
            } else {
                CALL_INTERVAL
            };
            let call_due = relay.is_some()
                && addressable
                && p.path
                    .last_call
                    .is_none_or(|t| now.saturating_duration_since(t) >= every);
            let punching = p.path.punch_until.is_some_and(|u| now < u)
                && p.path
                    .last_punch
                    .is_none_or(|t| now.saturating_duration_since(t) >= PUNCH_INTERVAL);
            if let (true, Some(r)) = (call_due, relay) {
                if self.relay_alive(r) {
                    self.send_call(id, r, now);
                    self.punch(id, now);
                    continue;
                }
            }
            if punching {
                self.punch(id, now);
            }
        }
    }
}

impl Node {
    /// Whether a datagram for peer `id` could go through a relay now.
    pub(super) fn can_relay_to(&self, id: PeerId) -> bool {
        self.paths.enabled
            && self.peers.get(&id).map(|p| p.config.kind) == Some(PeerKind::Node)
            && self.best_relay(id).is_some()
    }
}
