//! The device: this node's key, its peers, the allowed-IPs table, and the packet state machine.
//!
//! Inputs: [`Node::handle_tun`] (a packet read from the TUN), [`Node::handle_udp`] (a datagram
//! read from the UDP socket, with its source), [`Node::handle_timeout`] (call every ~250 ms) and
//! [`Node::apply`] (peer commands from reconcile). Outputs: [`Node::poll_output`] yields datagrams
//! to send and packets to write to the TUN. The caller owns every socket and file.

use crate::allowed_ips::AllowedIps;
use crate::keys::{PrivateKey, PublicKey};
use crate::packet;
use crate::peer::{DropReason, Drops, KeySlot, Peer, PeerConfig, Slot, QUEUE_LIMIT};
use crate::reconcile::Command;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use rand_core::{OsRng, RngCore};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// Device-wide handshake budget per second before cookies are demanded (as boringtun's device).
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// The largest datagram that can be a WireGuard message: a 64 KiB IP packet plus overhead.
pub const MAX_DATAGRAM: usize = 65_536 + 32;
const MIN_BUF: usize = 148;
/// A packet waits at most this long for a handshake (three handshake attempts).
pub const QUEUE_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(15);

const MSG_HANDSHAKE_INIT: u8 = 1;
const MSG_COOKIE_REPLY: u8 = 3;

/// Something the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send this datagram on the UDP socket.
    Transmit { dst: SocketAddr, payload: Vec<u8> },
    /// Write this decrypted IP packet to the TUN.
    Deliver(Vec<u8>),
}

/// Why a peer command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("peer {0} already exists")]
    DuplicateName(String),
    #[error("public key {0} is already used by peer {1}")]
    DuplicateKey(PublicKey, String),
    #[error("public key {0} is this node's own key")]
    OwnKey(PublicKey),
    #[error("no peer named {0}")]
    UnknownPeer(String),
}

pub type PeerId = u64;

/// The sans-IO WireGuard device of one node.
pub struct Node {
    private: PrivateKey,
    public: x25519::PublicKey,
    persistent_keepalive: Option<u16>,
    rate_limiter: Arc<RateLimiter>,
    peers: HashMap<PeerId, Peer>,
    names: HashMap<String, PeerId>,
    keys: HashMap<PublicKey, (PeerId, Slot)>,
    indices: HashMap<u32, (PeerId, Slot)>,
    allowed: AllowedIps<PeerId>,
    next_id: PeerId,
    outputs: VecDeque<Output>,
    drops: Drops,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("public_key", &self.public_key())
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

/// Status of one peer, for `meshd status`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    pub name: String,
    pub public_key: String,
    pub key_generation: u64,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    pub latest_handshake_secs_ago: Option<f64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub queued: usize,
    pub drops: BTreeMap<&'static str, u64>,
}

impl Node {
    pub fn new(private: PrivateKey, persistent_keepalive: Option<u16>) -> Self {
        let public = x25519::PublicKey::from(private.secret());
        Node {
            // Each message is checked twice against this limiter (by the device before any
            // Diffie-Hellman, then inside `Tunn::decapsulate`), so it counts double.
            rate_limiter: Arc::new(RateLimiter::new(&public, 2 * HANDSHAKE_RATE_LIMIT)),
            private,
            public,
            persistent_keepalive,
            peers: HashMap::new(),
            names: HashMap::new(),
            keys: HashMap::new(),
            indices: HashMap::new(),
            allowed: AllowedIps::new(),
            next_id: 1,
            outputs: VecDeque::new(),
            drops: Drops::default(),
            scratch: vec![0u8; MAX_DATAGRAM + MIN_BUF],
        }
    }

    pub fn public_key(&self) -> PublicKey {
        self.private.public_key()
    }

    /// Device-wide drop counters (every drop, including those also counted on a peer).
    pub fn drops(&self) -> &Drops {
        &self.drops
    }

    pub fn peer(&self, name: &str) -> Option<&Peer> {
        self.names.get(name).and_then(|id| self.peers.get(id))
    }

    pub fn peer_configs(&self) -> impl Iterator<Item = &PeerConfig> {
        self.peers.values().map(|p| &p.config)
    }

    /// The next thing the caller must do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    fn drop_packet(&mut self, peer: Option<PeerId>, reason: DropReason, n: u64) {
        self.drops.add(reason, n);
        if let Some(p) = peer.and_then(|id| self.peers.get_mut(&id)) {
            p.drops.add(reason, n);
        }
        tracing::trace!(reason = reason.name(), n, "drop");
    }

    fn fresh_index(&self) -> u32 {
        loop {
            // `Tunn` keeps 24 bits of the index (the low 8 bits count sessions).
            let idx = OsRng.next_u32() & 0x00ff_ffff;
            if !self.indices.contains_key(&idx) {
                return idx;
            }
        }
    }

    fn new_slot(&self, key: PublicKey) -> KeySlot {
        let index = self.fresh_index();
        let tunn = Tunn::new(
            self.private.secret().clone(),
            key.to_dalek(),
            None,
            self.persistent_keepalive,
            index,
            Some(self.rate_limiter.clone()),
        );
        KeySlot {
            public_key: key,
            tunn,
            index,
        }
    }

    /// Applies one reconcile command.
    pub fn apply(&mut self, cmd: Command) -> Result<(), NodeError> {
        match cmd {
            Command::Add(cfg) => self.add_peer(cfg),
            Command::Update(cfg) => self.update_peer(cfg),
            Command::Remove(name) => self.remove_peer(&name),
        }
    }

    /// A peer key must not be this node's own key nor belong to another peer (`owner` may
    /// already hold it).
    fn check_key_free(&self, key: PublicKey, owner: Option<PeerId>) -> Result<(), NodeError> {
        if key == self.public_key() {
            return Err(NodeError::OwnKey(key));
        }
        match self.keys.get(&key) {
            Some((other, _)) if Some(*other) != owner => {
                let name = self
                    .peers
                    .get(other)
                    .map(|p| p.config.name.clone())
                    .unwrap_or_default();
                Err(NodeError::DuplicateKey(key, name))
            }
            _ => Ok(()),
        }
    }

    pub fn add_peer(&mut self, cfg: PeerConfig) -> Result<(), NodeError> {
        let _span = tracing::info_span!("peer", peer = %cfg.name).entered();
        if self.names.contains_key(&cfg.name) {
            return Err(NodeError::DuplicateName(cfg.name));
        }
        self.check_key_free(cfg.public_key, None)?;
        let id = self.next_id;
        self.next_id += 1;
        let slot = self.new_slot(cfg.public_key);
        self.indices.insert(slot.index, (id, Slot::Current));
        self.keys.insert(cfg.public_key, (id, Slot::Current));
        for net in &cfg.allowed_ips {
            self.allowed.insert(*net, id);
        }
        self.names.insert(cfg.name.clone(), id);
        let peer = Peer {
            endpoint: cfg.endpoints.first().copied(),
            config: cfg,
            current: slot,
            next: None,
            endpoint_index: 0,
            endpoint_confirmed: false,
            queue: VecDeque::new(),
            drops: Drops::default(),
            rx_bytes: 0,
            tx_bytes: 0,
        };
        tracing::info!(key = %peer.config.public_key.fingerprint(), "peer added");
        self.peers.insert(id, peer);
        // Handshake at once rather than waiting for traffic, so a restarted node is reachable
        // from both sides right away.
        self.initiate(id, Slot::Current);
        Ok(())
    }

    pub fn update_peer(&mut self, cfg: PeerConfig) -> Result<(), NodeError> {
        let _span = tracing::info_span!("peer", peer = %cfg.name).entered();
        let id = *self
            .names
            .get(&cfg.name)
            .ok_or_else(|| NodeError::UnknownPeer(cfg.name.clone()))?;
        self.check_key_free(cfg.public_key, Some(id))?;
        let old = match self.peers.get(&id) {
            Some(p) => p.config.clone(),
            None => return Err(NodeError::UnknownPeer(cfg.name)),
        };
        let key_changed = old.public_key != cfg.public_key;
        if key_changed {
            let slot = self.new_slot(cfg.public_key);
            self.keys.remove(&old.public_key);
            self.keys.insert(cfg.public_key, (id, Slot::Current));
            self.indices.insert(slot.index, (id, Slot::Current));
            if let Some(p) = self.peers.get_mut(&id) {
                let old_slot = std::mem::replace(&mut p.current, slot);
                self.indices.remove(&old_slot.index);
            }
            tracing::info!(key = %cfg.public_key.fingerprint(), "peer key changed");
        }
        if old.allowed_ips != cfg.allowed_ips {
            self.allowed.retain(|v| *v != id);
            for net in &cfg.allowed_ips {
                self.allowed.insert(*net, id);
            }
        }
        if let Some(p) = self.peers.get_mut(&id) {
            if old.endpoints != cfg.endpoints {
                let keep = p
                    .endpoint
                    .is_some_and(|e| cfg.endpoints.contains(&e) || p.endpoint_confirmed);
                if !keep {
                    p.endpoint_index = 0;
                    p.endpoint = cfg.endpoints.first().copied();
                    p.endpoint_confirmed = false;
                } else if let Some(pos) = p
                    .endpoint
                    .and_then(|e| cfg.endpoints.iter().position(|x| *x == e))
                {
                    p.endpoint_index = pos;
                }
            }
            if key_changed {
                // The new key's session has to be made; a restarted peer may also have roamed.
                p.endpoint_confirmed = false;
            }
            p.config = cfg;
        }
        if key_changed {
            self.initiate(id, Slot::Current);
        }
        Ok(())
    }

    pub fn remove_peer(&mut self, name: &str) -> Result<(), NodeError> {
        let _span = tracing::info_span!("peer", peer = %name).entered();
        let id = self
            .names
            .remove(name)
            .ok_or_else(|| NodeError::UnknownPeer(name.to_string()))?;
        if let Some(p) = self.peers.remove(&id) {
            self.keys.remove(&p.current.public_key);
            self.indices.remove(&p.current.index);
            if let Some(n) = &p.next {
                self.keys.remove(&n.public_key);
                self.indices.remove(&n.index);
            }
            let queued = p.queue.len() as u64;
            self.drops.add(DropReason::NoPeer, queued);
        }
        self.allowed.retain(|v| *v != id);
        tracing::info!("peer removed");
        Ok(())
    }

    fn transmit_to_peer(&mut self, id: PeerId, payload: Vec<u8>) {
        match self.peers.get(&id).and_then(|p| p.endpoint) {
            Some(dst) => self.outputs.push_back(Output::Transmit { dst, payload }),
            None => self.drop_packet(Some(id), DropReason::NoPeer, 1),
        }
    }

    /// Starts a handshake on a slot unless one is already under way.
    fn initiate(&mut self, id: PeerId, slot: Slot) {
        let mut buf = std::mem::take(&mut self.scratch);
        let out = match self.peers.get_mut(&id).and_then(|p| p.slot_mut(slot)) {
            Some(s) => match s.tunn.format_handshake_initiation(&mut buf, false) {
                TunnResult::WriteToNetwork(p) => Some(p.to_vec()),
                _ => None,
            },
            None => None,
        };
        self.scratch = buf;
        if let Some(p) = out {
            self.transmit_to_peer(id, p);
        }
    }

    /// A packet read from the TUN: encrypt it for the peer that owns its destination.
    pub fn handle_tun(&mut self, pkt: &[u8], now: Instant) {
        let Some((_src, dst)) = packet::addresses(pkt) else {
            self.drop_packet(None, DropReason::InvalidPacket, 1);
            return;
        };
        let Some(&id) = self.allowed.lookup(dst) else {
            self.drop_packet(None, DropReason::NoPeer, 1);
            return;
        };
        let Some(peer) = self.peers.get_mut(&id) else {
            self.drop_packet(None, DropReason::NoPeer, 1);
            return;
        };
        if peer.current.has_session() {
            let mut out = vec![0u8; (pkt.len() + 32).max(MIN_BUF)];
            let n = match peer.current.tunn.encapsulate(pkt, &mut out) {
                TunnResult::WriteToNetwork(p) => Some(p.len()),
                _ => None,
            };
            if let Some(n) = n {
                peer.tx_bytes += pkt.len() as u64;
                out.truncate(n);
                self.transmit_to_peer(id, out);
            }
            return;
        }
        // No session yet: hold the packet ourselves (Tunn's own queue drops silently) and make
        // sure a handshake is under way.
        if peer.queue.len() >= QUEUE_LIMIT {
            self.drop_packet(Some(id), DropReason::QueueFull, 1);
        } else {
            peer.queue.push_back((now, pkt.to_vec()));
        }
        self.initiate(id, Slot::Current);
    }

    /// A datagram read from the UDP socket.
    ///
    /// `now` is part of the input contract; today every time-dependent decision on a datagram
    /// is `Tunn`'s (it reads its own clock), so the node does not look at it yet.
    pub fn handle_udp(&mut self, from: SocketAddr, datagram: &[u8], _now: Instant) {
        if datagram.len() > MAX_DATAGRAM {
            self.drop_packet(None, DropReason::Oversize, 1);
            return;
        }
        let mut buf = std::mem::take(&mut self.scratch);
        if buf.len() < datagram.len() + MIN_BUF {
            buf.resize(datagram.len() + MIN_BUF, 0);
        }
        self.route_datagram(from, datagram, &mut buf);
        self.scratch = buf;
    }

    fn route_datagram(&mut self, from: SocketAddr, datagram: &[u8], buf: &mut [u8]) {
        let parsed = match Tunn::parse_incoming_packet(datagram) {
            Ok(p) => p,
            Err(_) => return self.drop_packet(None, DropReason::InvalidPacket, 1),
        };
        let target = match parsed {
            Packet::HandshakeInit(_) | Packet::HandshakeResponse(_) => {
                // MAC1 and the rate limiter come before any Diffie-Hellman.
                let verified = match self
                    .rate_limiter
                    .verify_packet(Some(from.ip()), datagram, buf)
                {
                    Ok(p) => p,
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        let payload = cookie.to_vec();
                        self.drops.add(DropReason::UnderLoad, 1);
                        self.outputs
                            .push_back(Output::Transmit { dst: from, payload });
                        return;
                    }
                    Err(TunnResult::Err(e)) => return self.drop_packet(None, reason_for(&e), 1),
                    Err(_) => return self.drop_packet(None, DropReason::InvalidPacket, 1),
                };
                match verified {
                    Packet::HandshakeInit(init) => {
                        let half = match parse_handshake_anon(
                            self.private.secret(),
                            &self.public,
                            &init,
                        ) {
                            Ok(h) => h,
                            Err(_) => {
                                return self.drop_packet(None, DropReason::HandshakeFailed, 1)
                            }
                        };
                        let key = match PublicKey::from_bytes(half.peer_static_public) {
                            Ok(k) => k,
                            Err(_) => return self.drop_packet(None, DropReason::UnknownPeer, 1),
                        };
                        match self.keys.get(&key) {
                            Some(t) => *t,
                            None => {
                                tracing::debug!(key = %key.fingerprint(), %from, "handshake from unknown key");
                                return self.drop_packet(None, DropReason::UnknownPeer, 1);
                            }
                        }
                    }
                    Packet::HandshakeResponse(resp) => {
                        match self.indices.get(&(resp.receiver_idx >> 8)) {
                            Some(t) => *t,
                            None => return self.drop_packet(None, DropReason::UnknownIndex, 1),
                        }
                    }
                    _ => return self.drop_packet(None, DropReason::InvalidPacket, 1),
                }
            }
            Packet::PacketCookieReply(c) => match self.indices.get(&(c.receiver_idx >> 8)) {
                Some(t) => *t,
                None => return self.drop_packet(None, DropReason::UnknownIndex, 1),
            },
            Packet::PacketData(d) => match self.indices.get(&(d.receiver_idx >> 8)) {
                Some(t) => *t,
                None => return self.drop_packet(None, DropReason::UnknownIndex, 1),
            },
        };
        self.decapsulate(target, from, datagram, buf);
    }

    fn decapsulate(
        &mut self,
        (id, slot): (PeerId, Slot),
        from: SocketAddr,
        datagram: &[u8],
        buf: &mut [u8],
    ) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let Some(ks) = peer.slot_mut(slot) else {
            return;
        };
        let mut authenticated = false;
        let mut drop: Option<DropReason> = None;
        let mut decrypted: Option<(&mut [u8], std::net::IpAddr)> = None;
        match ks.tunn.decapsulate(Some(from.ip()), datagram, buf) {
            TunnResult::Done => {
                // A keepalive or a cookie reply that verified.
                authenticated = datagram.first() != Some(&MSG_COOKIE_REPLY);
            }
            TunnResult::Err(e) => drop = Some(reason_for(&e)),
            TunnResult::WriteToNetwork(p) => {
                // A handshake response (authenticated initiation), or a cookie reply under load.
                authenticated = p.first() != Some(&MSG_COOKIE_REPLY);
                self.outputs.push_back(Output::Transmit {
                    dst: from,
                    payload: p.to_vec(),
                });
            }
            TunnResult::WriteToTunnelV4(p, src) => decrypted = Some((p, src.into())),
            TunnResult::WriteToTunnelV6(p, src) => decrypted = Some((p, src.into())),
        }
        if let Some((p, src)) = decrypted {
            authenticated = true;
            // Device-wide crypto-routing: the most specific owner of the source must be the
            // peer that sent it.
            if self.allowed.source_allowed(src, &id) {
                peer.rx_bytes += p.len() as u64;
                self.outputs.push_back(Output::Deliver(p.to_vec()));
            } else {
                drop = Some(DropReason::SourceNotAllowed);
            }
        }
        if let Some(reason) = drop {
            self.drop_packet(Some(id), reason, 1);
        }
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        if authenticated {
            // Roaming: the endpoint follows the last authenticated packet.
            if peer.endpoint != Some(from) {
                tracing::debug!(peer = %peer.config.name, %from, "endpoint now");
            }
            peer.endpoint = Some(from);
            peer.endpoint_confirmed = true;
        }
        let Some(ks) = peer.slot_mut(slot) else {
            return;
        };
        // Flush anything Tunn queued itself (we never hand it packets without a session, but
        // the contract is to call until Done).
        let mut extra = Vec::new();
        while let TunnResult::WriteToNetwork(p) = ks.tunn.decapsulate(None, &[], buf) {
            extra.push(p.to_vec());
        }
        let has_session = ks.has_session();
        for p in extra {
            self.transmit_to_peer(id, p);
        }
        if has_session && slot == Slot::Current {
            self.flush_queue(id);
        }
    }

    fn flush_queue(&mut self, id: PeerId) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let mut sent = Vec::new();
        while let Some((_, pkt)) = peer.queue.pop_front() {
            let mut out = vec![0u8; (pkt.len() + 32).max(MIN_BUF)];
            if let TunnResult::WriteToNetwork(p) = peer.current.tunn.encapsulate(&pkt, &mut out) {
                let n = p.len();
                out.truncate(n);
                peer.tx_bytes += pkt.len() as u64;
                sent.push(out);
            }
        }
        for p in sent {
            self.transmit_to_peer(id, p);
        }
    }

    /// Timers: retransmit handshakes, keepalives, rekeys, expiry. Call every ~250 ms.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.rate_limiter.reset_count();
        let mut buf = std::mem::take(&mut self.scratch);
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            for slot in [Slot::Current, Slot::Next] {
                let Some(peer) = self.peers.get_mut(&id) else {
                    continue;
                };
                let Some(ks) = peer.slot_mut(slot) else {
                    continue;
                };
                match ks.tunn.update_timers(&mut buf) {
                    TunnResult::WriteToNetwork(p) => {
                        let payload = p.to_vec();
                        if payload.first() == Some(&MSG_HANDSHAKE_INIT) && !ks.has_session() {
                            // No answer on this endpoint: try the next one in the record.
                            peer.try_next_endpoint();
                        }
                        self.transmit_to_peer(id, payload);
                    }
                    TunnResult::Err(WireGuardError::ConnectionExpired)
                        if slot == Slot::Current && !peer.queue.is_empty() =>
                    {
                        let n = peer.queue.len() as u64;
                        peer.queue.clear();
                        self.drop_packet(Some(id), DropReason::HandshakeTimeout, n);
                    }
                    _ => {}
                }
            }
            if let Some(peer) = self.peers.get_mut(&id) {
                let before = peer.queue.len();
                peer.queue
                    .retain(|(t, _)| now.saturating_duration_since(*t) < QUEUE_MAX_AGE);
                let expired = (before - peer.queue.len()) as u64;
                if expired > 0 {
                    self.drop_packet(Some(id), DropReason::HandshakeTimeout, expired);
                }
            }
            let has = self
                .peers
                .get(&id)
                .is_some_and(|p| p.current.has_session() && !p.queue.is_empty());
            if has {
                self.flush_queue(id);
            }
        }
        self.scratch = buf;
    }

    /// Status of every peer, sorted by name.
    pub fn peer_status(&self) -> Vec<PeerStatus> {
        let mut v: Vec<PeerStatus> = self
            .peers
            .values()
            .map(|p| PeerStatus {
                name: p.config.name.clone(),
                public_key: p.config.public_key.to_base64(),
                key_generation: p.config.key_generation,
                endpoint: p.endpoint.map(|e| e.to_string()),
                allowed_ips: p.config.allowed_ips.iter().map(|n| n.to_string()).collect(),
                latest_handshake_secs_ago: p
                    .current
                    .tunn
                    .time_since_last_handshake()
                    .map(|d| d.as_secs_f64()),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                queued: p.queue.len(),
                drops: p.drops.by_name(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

fn reason_for(e: &WireGuardError) -> DropReason {
    match e {
        WireGuardError::InvalidMac => DropReason::InvalidMac,
        WireGuardError::UnderLoad => DropReason::UnderLoad,
        WireGuardError::InvalidAeadTag => DropReason::DecryptFailed,
        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => DropReason::Replay,
        WireGuardError::NoCurrentSession | WireGuardError::ConnectionExpired => {
            DropReason::NoSession
        }
        WireGuardError::WrongIndex
        | WireGuardError::WrongKey
        | WireGuardError::InvalidTai64nTimestamp
        | WireGuardError::WrongTai64nTimestamp
        | WireGuardError::UnexpectedPacket => DropReason::HandshakeFailed,
        _ => DropReason::InvalidPacket,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::PeerConfig;

    fn ipv4_packet(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        crate::packet::ipv4_packet(src, dst, 17, payload)
    }

    struct Net {
        nodes: Vec<(SocketAddr, Node)>,
        delivered: Vec<Vec<Vec<u8>>>,
    }

    impl Net {
        fn new(n: u8) -> (Net, Vec<PeerConfig>) {
            let mut nodes = Vec::new();
            let mut cfgs = Vec::new();
            for i in 1..=n {
                let k = PrivateKey::generate();
                let addr: SocketAddr = format!("198.18.0.{}:51820", 10 + i).parse().expect("addr");
                cfgs.push(PeerConfig {
                    name: format!("n{i}"),
                    public_key: k.public_key(),
                    endpoints: vec![addr],
                    allowed_ips: vec![format!("10.42.{i}.0/24").parse().expect("net")],
                    key_generation: 1,
                });
                nodes.push((addr, Node::new(k, None)));
            }
            let delivered = vec![Vec::new(); nodes.len()];
            (Net { nodes, delivered }, cfgs)
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
        let idx_c_before = net.nodes[0].1.peer("n3").expect("n3").current.index;
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
            net.nodes[0].1.peer("n3").expect("n3").current.index,
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
        let second = net.nodes[1].0;
        let peer = net.nodes[0].1.peers.values_mut().next().expect("peer");
        peer.try_next_endpoint();
        assert_eq!(peer.endpoint, Some(second));
    }
}
