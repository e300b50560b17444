//! The device: this node's key, its peers, the allowed-IPs table, and the packet state machine.
//!
//! Inputs: [`Node::handle_tun`] (a packet read from the TUN), [`Node::handle_udp`] (a datagram
//! read from the UDP socket, with its source), [`Node::handle_timeout`] (call every ~250 ms) and
//! [`Node::apply`] (peer commands from reconcile). Outputs: [`Node::poll_output`] yields datagrams
//! to send and packets to write to the TUN. The caller owns every socket and file.
//!
//! A device may be split into shards ([`Node::new_shard`]), one `Node` per data-path worker,
//! each owning the sessions of a subset of the peers ([`shard_of`]); `handle_tun` and
//! `handle_udp` answer [`Dispatch::Shard`] for input that belongs to another shard.

use crate::allowed_ips::AllowedIps;
use crate::keys::{PrivateKey, PublicKey};
use crate::packet;
use crate::peer::{
    DropReason, Drops, EndpointSource, KeySlot, Peer, PeerConfig, PeerKind, PeerPsk, QUEUE_LIMIT,
};
use crate::psk::ClusterSecret;
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
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

/// Device-wide handshake budget per second before cookies are demanded (as boringtun's device).
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// The largest datagram that can be a WireGuard message: a 64 KiB IP packet plus overhead.
pub const MAX_DATAGRAM: usize = 65_536 + 32;
const MIN_BUF: usize = 148;
/// Most buffers [`Node::recycle`] keeps, and the largest capacity it keeps (an MTU-sized
/// packet with WireGuard's overhead; larger buffers are rare and go back to the allocator).
const FREE_BUFFERS: usize = 1024;
const FREE_BUFFER_CAPACITY: usize = 2048;

/// A buffer of `len` bytes, from `free` when it has one. A recycled buffer keeps the bytes of
/// its last packet (only growth is zeroed): every caller overwrites what it keeps and truncates
/// the rest.
fn take_buf(free: &mut Vec<Vec<u8>>, len: usize) -> Vec<u8> {
    match free.pop() {
        Some(mut b) => {
            b.truncate(len);
            b.resize(len, 0);
            b
        }
        None => vec![0u8; len],
    }
}
/// A packet waits at most this long for a handshake (three handshake attempts).
pub const QUEUE_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(15);

const MSG_HANDSHAKE_INIT: u8 = 1;
const MSG_COOKIE_REPLY: u8 = 3;
const MSG_DATA: u8 = 4;

/// Where a packet has to be handled when the device is split into shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// Handled here (sent, delivered, queued or dropped and counted).
    Done,
    /// Belongs to a peer owned by this shard index: nothing was done or counted here; hand the
    /// same input to that shard's Node.
    Shard(u16),
}

/// The shard that owns the peer named `name` among `shards` shards: FNV-1a 64 of the name's
/// bytes modulo `shards` (0 when shards <= 1). Stable across restarts and identical in every shard.
pub fn shard_of(name: &str, shards: u16) -> u16 {
    if shards <= 1 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // The remainder is below `shards`, so it fits.
    (h % u64::from(shards)) as u16
}

/// The shard a WireGuard datagram belongs to, from its receiver index (handshake response,
/// cookie reply, data: `((receiver_idx >> 8) % shards)`), or None for a handshake initiation,
/// a malformed datagram (what `Tunn::parse_incoming_packet` refuses, or longer than
/// [`MAX_DATAGRAM`]: the shard that read it drops and counts it), or shards <= 1. Reads the
/// header only; never panics.
pub fn shard_of_datagram(datagram: &[u8], shards: u16) -> Option<u16> {
    if datagram.len() > MAX_DATAGRAM {
        return None;
    }
    receiver_shard(&Tunn::parse_incoming_packet(datagram).ok()?, shards)
}

/// The shard named by a parsed message's receiver index (None for an initiation, which has
/// none, or with shards <= 1).
fn receiver_shard(p: &Packet<'_>, shards: u16) -> Option<u16> {
    if shards <= 1 {
        return None;
    }
    let receiver = match p {
        Packet::HandshakeInit(_) => return None,
        Packet::HandshakeResponse(r) => r.receiver_idx,
        Packet::PacketCookieReply(c) => c.receiver_idx,
        Packet::PacketData(d) => d.receiver_idx,
    };
    // The remainder is below `shards`, so it fits.
    Some(((receiver >> 8) % u32::from(shards)) as u16)
}

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
    #[error("shard {index} of {count} does not exist")]
    InvalidShard { index: u16, count: u16 },
}

pub type PeerId = u64;

/// One of this node's static keys, with the rate limiter whose MAC1 key derives from it.
struct OwnKey {
    private: PrivateKey,
    public: x25519::PublicKey,
    key: PublicKey,
    limiter: Arc<RateLimiter>,
}

/// The rate limiters of the own keys of sharded nodes in this process, by key: the shards of
/// one device share one limiter per own key, so that the handshake budget is device-wide and a
/// cookie one shard handed out verifies in every shard (a handshake initiation may be checked
/// by the shard that read it and then by the peer's owner).
static SHARED_LIMITERS: Mutex<Vec<(PublicKey, Weak<RateLimiter>)>> = Mutex::new(Vec::new());

impl OwnKey {
    /// `shared`: the node is one of several shards, which share the key's rate limiter.
    fn new(private: PrivateKey, shared: bool) -> Self {
        let public = x25519::PublicKey::from(private.secret());
        let key = private.public_key();
        // Each message is checked twice against this limiter (by the device before any
        // Diffie-Hellman, then inside `Tunn::decapsulate`), so it counts double.
        let make = || Arc::new(RateLimiter::new(&public, 2 * HANDSHAKE_RATE_LIMIT));
        let limiter = if shared {
            let mut all = SHARED_LIMITERS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            all.retain(|(_, l)| l.strong_count() > 0);
            match all
                .iter()
                .find(|(k, _)| *k == key)
                .and_then(|(_, l)| l.upgrade())
            {
                Some(l) => l,
                None => {
                    let l = make();
                    all.push((key, Arc::downgrade(&l)));
                    l
                }
            }
        } else {
            make()
        };
        OwnKey {
            key,
            limiter,
            private,
            public,
        }
    }
}

/// Keepalives sent on a new pair's session during a rotation before an idle peer counts as
/// moved: one confirms the peer's (responder's) session; three survive a lossy path.
pub const CONFIRMATIONS: u32 = 3;
/// Spacing of those keepalives.
const CONFIRMATION_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// How far a peer has come in this node's own key rotation (see [`Node::rotation_progress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PeerRotation {
    /// No session on the next key yet.
    Handshaking,
    /// A session on the next key, but nothing received on it yet.
    Established,
    /// The peer sends on the next key: it has moved, the old key can go.
    Moved,
}

/// The sans-IO WireGuard device of one node.
///
/// Key rotation: [`Node::set_next_key`] adds this node's next key (handshakes addressed to it are
/// answered from then on), [`Node::initiate_next`] starts handshakes on it, outbound traffic
/// moves to a pair as soon as its session exists, [`Node::rotation_progress`] tells when every
/// peer has moved, and [`Node::promote_next_key`] retires the old key
/// ([`Node::drop_next_key`] rolls back). A peer's rotation arrives as a [`PeerConfig`] with
/// `next_public_key` set, then with the new `public_key` and no next key.
///
/// Sharding: a device may run as `count` nodes ([`Node::new_shard`]), one per data-path worker.
/// The driver applies every peer command, own-key change and PSK call to every shard, so each
/// shard knows every peer (names, keys, allowed IPs: duplicate checks and the device-wide
/// crypto-routing check are as strong as with one node), but only the peer's owner
/// ([`shard_of`] its name) holds its key slots: it alone handshakes, runs the peer's timers,
/// queues, encrypts, decrypts, follows its endpoint and reports it in
/// [`Node::rotation_progress`] and [`Node::peer_status`]. Local indices carry the shard
/// (`index % count == shard`), so [`shard_of_datagram`] finds the owner of any datagram but a
/// handshake initiation. [`Node::handle_tun`] and [`Node::handle_udp`] answer
/// [`Dispatch::Shard`] for input that belongs to another shard, having done nothing with it.
/// The shards of one device share one rate limiter per own key (device-wide handshake budget,
/// cookies valid in every shard). With one shard ([`Node::new`]) none of this shows.
pub struct Node {
    own: OwnKey,
    own_next: Option<OwnKey>,
    /// The cluster secret and this node's PSK generation, when the node holds the secret.
    psk: Option<(ClusterSecret, u64)>,
    persistent_keepalive: Option<u16>,
    /// Persistent keepalive (seconds) on the pairs of peers reached through NAT
    /// ([`PeerConfig::through_nat`]), so the mapping stays open for the peer to send in.
    nat_keepalive: Option<u16>,
    peers: HashMap<PeerId, Peer>,
    names: HashMap<String, PeerId>,
    /// Every live key of every peer (current and next).
    keys: HashMap<PublicKey, PeerId>,
    /// The same keys by key id (their first 8 bytes), for path messages.
    key_ids: HashMap<crate::pathmsg::KeyId, PublicKey>,
    /// Paths through NAT and relays (`node/paths.rs`).
    paths: paths::Paths,
    /// Slot index → peer.
    indices: HashMap<u32, PeerId>,
    allowed: AllowedIps<PeerId>,
    next_id: PeerId,
    outputs: VecDeque<Output>,
    drops: Drops,
    scratch: Vec<u8>,
    /// Packet buffers the driver handed back ([`Node::recycle`]), used again for the next
    /// outputs so that steady traffic allocates nothing per packet.
    free: Vec<Vec<u8>>,
    /// Endpoints learnt from external peers (which may have none configured) that were removed,
    /// by key: used again if the same peer is added back (a revocation lifted, a conflict
    /// resolved), so this node can handshake with it at once instead of waiting for it.
    learnt_endpoints: HashMap<PublicKey, SocketAddr>,
    /// This node's shard index and the number of shards of the device.
    shard_index: u16,
    shard_count: u16,
}

/// Most learnt endpoints of removed external peers kept.
const LEARNT_ENDPOINTS_MAX: usize = 1024;

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("public_key", &self.public_key())
            .field("next_key", &self.next_key())
            .field("peers", &self.peers.len())
            .field("shard", &self.shard())
            .finish_non_exhaustive()
    }
}

/// Status of one peer, for `meshd status`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    pub name: String,
    /// `node`, or `external` for an external standard WireGuard peer.
    pub kind: PeerKind,
    pub public_key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<String>,
    pub key_generation: u64,
    /// The peer key of the pair that carries traffic to the peer now (the newest pair with a
    /// session); absent while no pair has one. During a rotation it moves from the old key to
    /// the next one once the new pair works.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic_public_key: Option<String>,
    pub endpoint: Option<String>,
    /// Where `endpoint` came from: `private` (same location), `public`, `learned` (from the
    /// peer's packets: it is behind NAT or roamed) or `none`.
    pub endpoint_source: EndpointSource,
    /// Why that endpoint, in words.
    pub endpoint_reason: String,
    /// `direct` or `relayed`.
    pub path: &'static str,
    /// The relay the peer's datagrams go through, when relayed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// Why the path is what it is (empty: direct from the start).
    #[serde(skip_serializing_if = "str::is_empty")]
    pub path_reason: &'static str,
    /// Times the path moved from relayed to direct, and from direct to relayed.
    pub path_upgrades: u64,
    pub path_fallbacks: u64,
    /// The peer's location, when it names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Persistent keepalive of the link (seconds): on when this node reaches the peer through NAT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive_secs: Option<u16>,
    pub allowed_ips: Vec<String>,
    pub latest_handshake_secs_ago: Option<f64>,
    /// The cluster PSK generation of the pair traffic uses now (absent: no PSK).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psk_generation: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Handshake initiations sent to the peer.
    #[serde(default)]
    pub handshake_attempts: u64,
    /// Initiations that got no response within the rekey timeout (5 s) and were retried.
    #[serde(default)]
    pub handshake_failures: u64,
    pub queued: usize,
    /// Live (own key, peer key) pairs: 1, or up to 4 while keys rotate.
    pub key_pairs: usize,
    pub drops: BTreeMap<&'static str, u64>,
}

impl Node {
    /// The whole device as one node (shard 0 of 1).
    pub fn new(private: PrivateKey, persistent_keepalive: Option<u16>) -> Self {
        Self::with_shard(private, persistent_keepalive, 0, 1)
    }

    /// Shard `index` of a device split into `count` shards (see [`Node`]).
    /// [`NodeError::InvalidShard`] unless `index < count`.
    pub fn new_shard(
        private: PrivateKey,
        persistent_keepalive: Option<u16>,
        index: u16,
        count: u16,
    ) -> Result<Self, NodeError> {
        if index >= count {
            return Err(NodeError::InvalidShard { index, count });
        }
        Ok(Self::with_shard(
            private,
            persistent_keepalive,
            index,
            count,
        ))
    }

    fn with_shard(
        private: PrivateKey,
        persistent_keepalive: Option<u16>,
        shard_index: u16,
        shard_count: u16,
    ) -> Self {
        Node {
            own: OwnKey::new(private, shard_count > 1),
            own_next: None,
            psk: None,
            persistent_keepalive,
            nat_keepalive: None,
            peers: HashMap::new(),
            names: HashMap::new(),
            keys: HashMap::new(),
            key_ids: HashMap::new(),
            paths: Default::default(),
            indices: HashMap::new(),
            allowed: AllowedIps::new(),
            next_id: 1,
            outputs: VecDeque::new(),
            drops: Drops::default(),
            scratch: vec![0u8; MAX_DATAGRAM + MIN_BUF],
            free: Vec::new(),
            learnt_endpoints: HashMap::new(),
            shard_index,
            shard_count,
        }
    }

    /// Sets the persistent keepalive (seconds, `None`: off) of links this node reaches through
    /// NAT. Pairs made from now on use it; call it before adding peers.
    pub fn set_nat_keepalive(&mut self, secs: Option<u16>) {
        self.nat_keepalive = secs.filter(|s| *s > 0);
    }

    /// The keepalive of a peer's pairs.
    fn keepalive_for(&self, cfg: &PeerConfig) -> Option<u16> {
        if cfg.through_nat {
            self.nat_keepalive.or(self.persistent_keepalive)
        } else {
            self.persistent_keepalive
        }
    }

    /// This node's shard: (index, count).
    pub fn shard(&self) -> (u16, u16) {
        (self.shard_index, self.shard_count)
    }

    /// The shard that owns a peer.
    fn owner(&self, peer: &Peer) -> u16 {
        shard_of(&peer.config.name, self.shard_count)
    }

    /// Whether this shard owns the peer (holds its slots).
    fn owns(&self, id: PeerId) -> bool {
        self.peers
            .get(&id)
            .is_some_and(|p| self.owner(p) == self.shard_index)
    }

    pub fn public_key(&self) -> PublicKey {
        self.own.key
    }

    /// This node's next key while it rotates.
    pub fn next_key(&self) -> Option<PublicKey> {
        self.own_next.as_ref().map(|k| k.key)
    }

    /// Device-wide drop counters (every drop, including those also counted on a peer). Of this
    /// shard only: a sharded device's counters are the [`Drops::merge`] of all shards'.
    pub fn drops(&self) -> &Drops {
        &self.drops
    }

    /// A peer by name. Every shard knows every peer, but only its owner holds its slots,
    /// endpoint, queue and counters.
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

    /// Hands back the buffer of an output the caller is done with (a `Transmit` payload or a
    /// `Deliver` packet), to be used for a later output instead of a new allocation.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.free.len() < FREE_BUFFERS && buf.capacity() <= FREE_BUFFER_CAPACITY {
            self.free.push(buf);
        }
    }

    fn drop_packet(&mut self, peer: Option<PeerId>, reason: DropReason, n: u64) {
        self.drops.add(reason, n);
        if let Some(p) = peer.and_then(|id| self.peers.get_mut(&id)) {
            p.drops.add(reason, n);
        }
        tracing::trace!(reason = reason.name(), n, "drop");
    }

    /// A random local index, unused in this node, that names this shard: `idx % count ==
    /// index`, so indices of different shards never collide.
    fn fresh_index(&self) -> u32 {
        let count = u32::from(self.shard_count.max(1));
        let shard = u32::from(self.shard_index);
        loop {
            // `Tunn` keeps 24 bits of the index (the low 8 bits count sessions).
            let r = OsRng.next_u32() & 0x00ff_ffff;
            let idx = r - r % count + shard;
            if idx <= 0x00ff_ffff && !self.indices.contains_key(&idx) {
                return idx;
            }
        }
    }

    fn own_keys(&self) -> impl Iterator<Item = &OwnKey> {
        std::iter::once(&self.own).chain(self.own_next.as_ref())
    }

    /// The cluster PSK generation pairs with this peer use (`None`: no PSK): the lower of this
    /// node's and the peer's generations.
    fn pair_psk(&self, cfg: &PeerConfig) -> Option<u64> {
        let (_, own) = self.psk.as_ref()?;
        if cfg.kind == PeerKind::External {
            return None;
        }
        match cfg.psk {
            PeerPsk::Never => None,
            PeerPsk::Cluster(theirs) => Some(theirs.map_or(*own, |t| t.min(*own))),
        }
    }

    fn new_slot(
        &self,
        own: &OwnKey,
        key: PublicKey,
        psk_generation: Option<u64>,
        keepalive: Option<u16>,
    ) -> KeySlot {
        let index = self.fresh_index();
        let psk = match (&self.psk, psk_generation) {
            (Some((secret, _)), Some(g)) => Some(secret.derive(g, &own.key, &key).bytes()),
            _ => None,
        };
        let tunn = Tunn::new(
            own.private.secret().clone(),
            key.to_dalek(),
            psk,
            keepalive,
            index,
            Some(own.limiter.clone()),
        );
        KeySlot {
            own: own.key,
            public_key: key,
            psk_generation,
            tunn,
            index,
            rx_data: 0,
            confirmations: 0,
            last_confirmation: None,
        }
    }

    /// Makes the peer's slots match (own keys × the peer's live keys, at the pair's PSK
    /// generation): missing pairs are created, pairs with a key that is gone are dropped, and a
    /// slot of an older PSK generation goes once its pair has moved to the new generation's slot
    /// (until then both answer, so a PSK rotation loses nothing). Returns the new slots' pairs.
    /// A shard that does not own the peer holds no slots for it.
    fn sync_slots(&mut self, id: PeerId) -> Vec<(PublicKey, PublicKey)> {
        if !self.owns(id) {
            if let Some(p) = self.peers.get_mut(&id) {
                for s in p.slots.drain(..) {
                    self.indices.remove(&s.index);
                }
            }
            return Vec::new();
        }
        let Some(peer) = self.peers.get(&id) else {
            return Vec::new();
        };
        let psk = self.pair_psk(&peer.config);
        let keepalive = self.keepalive_for(&peer.config);
        let own: Vec<PublicKey> = self.own_keys().map(|k| k.key).collect();
        let theirs = peer.live_keys();
        let missing: Vec<(PublicKey, PublicKey)> = own
            .iter()
            .flat_map(|o| theirs.iter().map(move |t| (*o, *t)))
            .filter(|(o, t)| {
                !peer
                    .slots
                    .iter()
                    .any(|s| s.own == *o && s.public_key == *t && s.psk_generation == psk)
            })
            .collect();
        let mut created = Vec::new();
        for (o, t) in &missing {
            let ok = if *o == self.own.key {
                Some(&self.own)
            } else {
                self.own_next.as_ref().filter(|k| k.key == *o)
            };
            if let Some(ok) = ok {
                let slot = self.new_slot(ok, *t, psk, keepalive);
                self.indices.insert(slot.index, id);
                created.push((slot.own, slot.public_key));
                if let Some(p) = self.peers.get_mut(&id) {
                    p.slots.push(slot);
                }
            }
        }
        if let Some(p) = self.peers.get_mut(&id) {
            let stale: Vec<u32> = p
                .slots
                .iter()
                .filter(|s| {
                    let superseded = s.psk_generation != psk
                        && p.slots.iter().any(|n| {
                            n.own == s.own
                                && n.public_key == s.public_key
                                && n.psk_generation == psk
                                && n.moved()
                        });
                    !own.contains(&s.own) || !theirs.contains(&s.public_key) || superseded
                })
                .map(|s| s.index)
                .collect();
            p.slots.retain(|s| !stale.contains(&s.index));
            for i in stale {
                self.indices.remove(&i);
            }
        }
        created
    }

    fn index_key(&mut self, key: PublicKey, id: PeerId) {
        self.keys.insert(key, id);
        self.key_ids.insert(crate::pathmsg::key_id(&key), key);
    }

    fn unindex_key(&mut self, key: &PublicKey) {
        self.keys.remove(key);
        let kid = crate::pathmsg::key_id(key);
        if self.key_ids.get(&kid) == Some(key) {
            self.key_ids.remove(&kid);
        }
        self.paths.forget_key(key);
    }

    /// Applies one reconcile command.
    pub fn apply(&mut self, cmd: Command) -> Result<(), NodeError> {
        match cmd {
            Command::Add(cfg) => self.add_peer(cfg),
            Command::Update(cfg) => self.update_peer(cfg),
            Command::Remove(name) => self.remove_peer(&name),
        }
    }

    /// A peer's keys must not be this node's own keys nor belong to another peer (`owner` may
    /// already hold them).
    fn check_keys_free(&self, cfg: &PeerConfig, owner: Option<PeerId>) -> Result<(), NodeError> {
        for key in std::iter::once(cfg.public_key).chain(cfg.next_public_key) {
            if self.own_keys().any(|k| k.key == key) {
                return Err(NodeError::OwnKey(key));
            }
            match self.keys.get(&key) {
                Some(other) if Some(*other) != owner => {
                    let name = self
                        .peers
                        .get(other)
                        .map(|p| p.config.name.clone())
                        .unwrap_or_default();
                    return Err(NodeError::DuplicateKey(key, name));
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub fn add_peer(&mut self, cfg: PeerConfig) -> Result<(), NodeError> {
        let _span = tracing::info_span!("peer", peer = %cfg.name).entered();
        if self.names.contains_key(&cfg.name) {
            return Err(NodeError::DuplicateName(cfg.name));
        }
        self.check_keys_free(&cfg, None)?;
        let id = self.next_id;
        self.next_id += 1;
        for key in std::iter::once(cfg.public_key).chain(cfg.next_public_key) {
            self.index_key(key, id);
        }
        for net in &cfg.allowed_ips {
            self.allowed.insert(*net, id);
        }
        self.names.insert(cfg.name.clone(), id);
        let learnt = match cfg.kind {
            PeerKind::External if cfg.endpoints.is_empty() => {
                self.learnt_endpoints.remove(&cfg.public_key)
            }
            _ => None,
        };
        let peer = Peer {
            endpoint: cfg.endpoints.first().copied().or(learnt),
            config: cfg,
            slots: Vec::new(),
            endpoint_index: 0,
            endpoint_confirmed: false,
            queue: VecDeque::new(),
            drops: Drops::default(),
            rx_bytes: 0,
            tx_bytes: 0,
            handshake_attempts: 0,
            handshake_timeouts: 0,
            path: Default::default(),
        };
        if self.owner(&peer) == self.shard_index {
            tracing::info!(key = %peer.config.public_key.fingerprint(), "peer added");
        }
        self.peers.insert(id, peer);
        self.sync_slots(id);
        // Handshake at once rather than waiting for traffic, so a restarted node is reachable
        // from both sides right away.
        self.initiate_best(id);
        Ok(())
    }

    pub fn update_peer(&mut self, cfg: PeerConfig) -> Result<(), NodeError> {
        let _span = tracing::info_span!("peer", peer = %cfg.name).entered();
        let id = *self
            .names
            .get(&cfg.name)
            .ok_or_else(|| NodeError::UnknownPeer(cfg.name.clone()))?;
        self.check_keys_free(&cfg, Some(id))?;
        let old = match self.peers.get(&id) {
            Some(p) => p.config.clone(),
            None => return Err(NodeError::UnknownPeer(cfg.name)),
        };
        let old_keys: Vec<PublicKey> = std::iter::once(old.public_key)
            .chain(old.next_public_key)
            .collect();
        let new_keys: Vec<PublicKey> = std::iter::once(cfg.public_key)
            .chain(cfg.next_public_key)
            .collect();
        // A current key we never saw as the next one: the peer restarted with a new key (or we
        // missed its rotation). Its sessions have to be made anew.
        let key_replaced = !old_keys.contains(&cfg.public_key);
        let psk_before = self.pair_psk(&old);
        let psk_changed = psk_before != self.pair_psk(&cfg);
        if old_keys != new_keys {
            for k in &old_keys {
                self.unindex_key(k);
            }
            for k in &new_keys {
                self.index_key(*k, id);
            }
            if self.owns(id) {
                tracing::info!(
                    key = %cfg.public_key.fingerprint(),
                    next = ?cfg.next_public_key.map(|k| k.fingerprint()),
                    "peer keys changed"
                );
            }
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
            if key_replaced {
                // A restarted peer may also have roamed.
                p.endpoint_confirmed = false;
            }
            p.config = cfg;
        }
        // Whether the link crosses this node's NAT changed (a location or endpoint change):
        // pairs take their keepalive when made, so they are made anew.
        let nat_changed =
            old.through_nat != self.peers.get(&id).is_some_and(|p| p.config.through_nat);
        if nat_changed {
            if let Some(p) = self.peers.get_mut(&id) {
                for s in p.slots.drain(..) {
                    self.indices.remove(&s.index);
                }
            }
        }
        self.sync_slots(id);
        if key_replaced || psk_changed || nat_changed {
            // A PSK generation change seen in the peer's record: the peer already uses the new
            // generation, so a handshake on it answers at once (old sessions carry traffic
            // until it does).
            self.initiate_best(id);
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
            for k in p.live_keys() {
                self.unindex_key(&k);
            }
            for s in &p.slots {
                self.indices.remove(&s.index);
            }
            let queued = p.queue.len() as u64;
            self.drops.add(DropReason::NoPeer, queued);
            if let (PeerKind::External, Some(ep), true) =
                (p.config.kind, p.endpoint, p.endpoint_confirmed)
            {
                if self.learnt_endpoints.len() >= LEARNT_ENDPOINTS_MAX {
                    self.learnt_endpoints.clear();
                }
                self.learnt_endpoints.insert(p.config.public_key, ep);
            }
        }
        self.allowed.retain(|v| *v != id);
        if shard_of(name, self.shard_count) == self.shard_index {
            tracing::info!("peer removed");
        }
        Ok(())
    }

    // ---------------- cluster PSK ----------------

    /// Holds the cluster secret: from now on every pair with a cluster node uses a PSK at the
    /// lower of the two nodes' generations. Replaces a previous secret; pairs get new slots
    /// (sessions already up keep carrying traffic until the new ones are).
    pub fn set_cluster_secret(&mut self, secret: ClusterSecret, generation: u64) {
        self.psk = Some((secret, generation));
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            self.sync_slots(id);
        }
    }

    /// Moves this node to another PSK generation (`keyctl psk rotate`). Pairs whose generation
    /// changes get a slot at the new one, and the peer (which sees the change in this node's
    /// record) starts the handshake; the old slot carries traffic until the new one does.
    /// Without a cluster secret this does nothing.
    pub fn set_psk_generation(&mut self, generation: u64) {
        let Some((_, g)) = self.psk.as_mut() else {
            return;
        };
        if *g == generation {
            return;
        }
        if self.shard_index == 0 {
            tracing::info!(from = *g, to = generation, "PSK generation changed");
        }
        *g = generation;
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            self.sync_slots(id);
        }
    }

    /// This node's PSK generation (`None`: it holds no cluster secret).
    pub fn psk_generation(&self) -> Option<u64> {
        self.psk.as_ref().map(|(_, g)| *g)
    }

    // ---------------- own key rotation ----------------

    /// Adds this node's next key: from now on handshakes addressed to it are answered and every
    /// peer gets slots for it. Nothing is sent yet (see [`Node::initiate_next`]): peers must
    /// first learn the key from the registry. Replaces a previous next key.
    pub fn set_next_key(&mut self, private: PrivateKey) -> Result<(), NodeError> {
        let key = private.public_key();
        if key == self.own.key {
            return Err(NodeError::OwnKey(key));
        }
        if let Some(owner) = self.keys.get(&key) {
            let name = self
                .peers
                .get(owner)
                .map(|p| p.config.name.clone())
                .unwrap_or_default();
            return Err(NodeError::DuplicateKey(key, name));
        }
        self.own_next = Some(OwnKey::new(private, self.shard_count > 1));
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            self.sync_slots(id);
        }
        if self.shard_index == 0 {
            tracing::info!(next = %key.fingerprint(), "next key added");
        }
        Ok(())
    }

    /// Starts a handshake with every node peer on the next key (the pair with the peer's newest
    /// key). External peers are left alone: a standard WireGuard peer knows one key per node and
    /// would drop a handshake from the next one; they keep the current key until it is retired.
    pub fn initiate_next(&mut self) {
        let Some(next) = self.next_key() else {
            return;
        };
        let ids: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.config.kind == PeerKind::Node)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let theirs = self
                .peers
                .get(&id)
                .map(|p| p.config.next_public_key.unwrap_or(p.config.public_key));
            if let Some(t) = theirs {
                self.initiate(id, next, t);
            }
        }
    }

    /// During a key or PSK rotation: sends keepalives on every new session (this node's next
    /// key, or a pair's new PSK generation) the peer has not answered on yet, so the peer's side
    /// of it becomes current (a responder's session is used only once a packet arrived on it)
    /// and the peer moves even when it has nothing to send.
    fn confirm_next_sessions(&mut self, now: Instant) {
        let next = self.next_key();
        let psk: HashMap<PeerId, Option<u64>> = self
            .peers
            .iter()
            .filter(|(_, p)| p.slots.len() > 1)
            .map(|(id, p)| (*id, self.pair_psk(&p.config)))
            .collect();
        if next.is_none() && psk.is_empty() {
            return;
        }
        let mut sends = Vec::new();
        for (id, p) in self.peers.iter_mut() {
            let Some(&want) = psk.get(id) else {
                continue;
            };
            // Pairs that also have a slot at another PSK generation: theirs is moving.
            let moving: Vec<(PublicKey, PublicKey)> = p
                .slots
                .iter()
                .filter(|s| s.psk_generation != want)
                .map(|s| (s.own, s.public_key))
                .collect();
            let new = |s: &KeySlot| {
                Some(s.own) == next
                    || (s.psk_generation == want && moving.contains(&(s.own, s.public_key)))
            };
            for s in p.slots.iter_mut().filter(|s| new(s)) {
                let due = s
                    .last_confirmation
                    .is_none_or(|t| now.saturating_duration_since(t) >= CONFIRMATION_INTERVAL);
                if s.rx_data > 0 || s.confirmations >= CONFIRMATIONS || !due || !s.has_session() {
                    continue;
                }
                let mut out = vec![0u8; MIN_BUF];
                if let TunnResult::WriteToNetwork(pkt) = s.tunn.encapsulate(&[], &mut out) {
                    sends.push((*id, pkt.to_vec()));
                    s.confirmations += 1;
                    s.last_confirmation = Some(now);
                }
            }
        }
        for (id, pkt) in sends {
            self.transmit_to_peer(id, pkt);
        }
    }

    /// Per node peer (by name), how far it has come in moving to this node's next key. Empty
    /// when this node is not rotating. External peers are not listed: they cannot move to a key
    /// their config does not name, so waiting for them would only delay the rotation. A shard
    /// lists the peers it owns: a sharded device's progress is the union of all shards'.
    pub fn rotation_progress(&self) -> BTreeMap<String, PeerRotation> {
        let Some(next) = self.next_key() else {
            return BTreeMap::new();
        };
        self.peers
            .values()
            .filter(|p| p.config.kind == PeerKind::Node && self.owner(p) == self.shard_index)
            .map(|p| {
                let mine = p.slots.iter().filter(|s| s.own == next);
                let mut state = PeerRotation::Handshaking;
                for s in mine {
                    if s.moved() {
                        state = PeerRotation::Moved;
                        break;
                    }
                    if s.has_session() {
                        state = PeerRotation::Established;
                    }
                }
                (p.config.name.clone(), state)
            })
            .collect()
    }

    /// Retires the current key: the next key becomes the only one, every slot of the old key is
    /// dropped (handshakes addressed to it fail MAC1 from now on). False if not rotating.
    pub fn promote_next_key(&mut self) -> bool {
        let Some(next) = self.own_next.take() else {
            return false;
        };
        let old = std::mem::replace(&mut self.own, next);
        if self.shard_index == 0 {
            tracing::info!(
                old = %old.key.fingerprint(), new = %self.own.key.fingerprint(),
                "old key retired"
            );
        }
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            self.sync_slots(id);
            let has = self
                .peers
                .get(&id)
                .is_some_and(|p| p.slots.iter().any(KeySlot::has_session));
            if !has {
                self.initiate_best(id);
            }
        }
        true
    }

    /// Rolls a rotation back: the next key and its slots go, the current key stays.
    pub fn drop_next_key(&mut self) {
        if self.own_next.take().is_some() {
            let ids: Vec<PeerId> = self.peers.keys().copied().collect();
            for id in ids {
                self.sync_slots(id);
            }
            if self.shard_index == 0 {
                tracing::info!("next key dropped");
            }
        }
    }

    // ---------------- packets ----------------

    fn transmit_to_peer(&mut self, id: PeerId, payload: Vec<u8>) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return self.drop_packet(None, DropReason::NoPeer, 1);
        };
        if payload.first() == Some(&MSG_HANDSHAKE_INIT) {
            peer.handshake_attempts += 1;
            if peer.path.relay.is_none() && peer.endpoint.is_some() {
                // One more direct initiation since the peer last answered directly.
                peer.path.direct_misses += 1;
                if peer.path.direct_misses >= paths::DIRECT_MISSES {
                    self.direct_failed(id);
                }
            }
        }
        self.send_to_peer(id, payload);
    }

    /// Rank of a slot for outbound traffic: pairs with the newer keys first, then the pair's
    /// current PSK generation.
    fn rank(&self, peer: &Peer, s: &KeySlot) -> u8 {
        let own_new = u8::from(self.next_key() == Some(s.own));
        let peer_new = u8::from(peer.config.next_public_key == Some(s.public_key));
        let psk_now = u8::from(self.pair_psk(&peer.config) == s.psk_generation);
        4 * own_new + 2 * peer_new + psk_now
    }

    /// The slot outbound traffic uses: the best-ranked one with a session.
    fn best_session(&self, peer: &Peer) -> Option<usize> {
        peer.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.has_session())
            .max_by_key(|(_, s)| self.rank(peer, s))
            .map(|(i, _)| i)
    }

    /// Starts a handshake on the pair of the current keys (both ends accept it during any
    /// rotation until the key is retired).
    fn initiate_best(&mut self, id: PeerId) {
        let own = self.own.key;
        if let Some(t) = self.peers.get(&id).map(|p| p.config.public_key) {
            self.initiate(id, own, t);
        }
    }

    /// Starts a handshake on one pair unless one is already under way (only the peer's owner
    /// does: the others hold no slots).
    fn initiate(&mut self, id: PeerId, own: PublicKey, theirs: PublicKey) {
        if !self.owns(id) {
            return;
        }
        // Nowhere to send it (a peer behind NAT that has not reached this node yet): its own
        // handshake will set the endpoint.
        if self
            .peers
            .get(&id)
            .is_some_and(|p| p.endpoint.is_none() && p.path.relay.is_none())
            && !self.can_relay_to(id)
        {
            return;
        }
        let mut buf = std::mem::take(&mut self.scratch);
        let psk = self.peers.get(&id).and_then(|p| self.pair_psk(&p.config));
        let out = match self
            .peers
            .get_mut(&id)
            .and_then(|p| p.slot_for(&own, &theirs, psk))
        {
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
    /// [`Dispatch::Shard`] when another shard owns that peer (nothing was done here).
    pub fn handle_tun(&mut self, pkt: &[u8], now: Instant) -> Dispatch {
        self.paths.set_now(now);
        let Some((_src, dst)) = packet::addresses(pkt) else {
            return self.dropped(None, DropReason::InvalidPacket);
        };
        let Some(&id) = self.allowed.lookup(dst) else {
            return self.dropped(None, DropReason::NoPeer);
        };
        let Some(peer) = self.peers.get(&id) else {
            return self.dropped(None, DropReason::NoPeer);
        };
        let owner = self.owner(peer);
        if owner != self.shard_index {
            return Dispatch::Shard(owner);
        }
        if let Some(i) = self.best_session(peer) {
            let mut out = take_buf(&mut self.free, (pkt.len() + 32).max(MIN_BUF));
            let Some(peer) = self.peers.get_mut(&id) else {
                return Dispatch::Done;
            };
            let n = match peer.slots[i].tunn.encapsulate(pkt, &mut out) {
                TunnResult::WriteToNetwork(p) => Some(p.len()),
                _ => None,
            };
            if let Some(n) = n {
                peer.tx_bytes += pkt.len() as u64;
                out.truncate(n);
                self.transmit_to_peer(id, out);
            }
            return Dispatch::Done;
        }
        // No session yet: hold the packet ourselves (Tunn's own queue drops silently) and make
        // sure a handshake is under way.
        let Some(peer) = self.peers.get_mut(&id) else {
            return Dispatch::Done;
        };
        if peer.queue.len() >= QUEUE_LIMIT {
            self.drop_packet(Some(id), DropReason::QueueFull, 1);
        } else {
            peer.queue.push_back((now, pkt.to_vec()));
        }
        self.initiate_best(id);
        Dispatch::Done
    }

    /// Drops and counts one packet: the input was handled.
    fn dropped(&mut self, peer: Option<PeerId>, reason: DropReason) -> Dispatch {
        self.drop_packet(peer, reason, 1);
        Dispatch::Done
    }

    /// A datagram read from the UDP socket.
    ///
    /// [`Dispatch::Shard`] when it belongs to another shard, having done nothing with it: a
    /// response, cookie reply or data message whose receiver index names another shard (known
    /// from the header alone), or a handshake initiation (verified here: MAC1, rate limiter and
    /// the initiator's static key) from a peer another shard owns.
    ///
    /// `now` is part of the input contract; today every time-dependent decision on a datagram
    /// is `Tunn`'s (it reads its own clock), so the node does not look at it yet.
    pub fn handle_udp(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) -> Dispatch {
        self.paths.set_now(now);
        if datagram.len() > MAX_DATAGRAM {
            return self.dropped(None, DropReason::Oversize);
        }
        if crate::pathmsg::is_path_message(datagram) {
            return self.handle_path_message(from, datagram);
        }
        let mut buf = std::mem::take(&mut self.scratch);
        if buf.len() < datagram.len() + MIN_BUF {
            buf.resize(datagram.len() + MIN_BUF, 0);
        }
        let d = self.route_datagram(from, paths::Via::Direct, None, datagram, &mut buf);
        self.scratch = buf;
        d
    }

    /// The peer and slot index a receiver index belongs to.
    fn by_index(&self, receiver_idx: u32) -> Option<(PeerId, u32)> {
        let idx = receiver_idx >> 8;
        self.indices.get(&idx).map(|id| (*id, idx))
    }

    /// MAC1 and the rate limiter of the own key `own`, before any Diffie-Hellman. `None` when
    /// the datagram was dealt with (dropped, or answered with a cookie).
    fn verify<'a>(
        &mut self,
        own: &PublicKey,
        from: SocketAddr,
        datagram: &'a [u8],
        buf: &mut [u8],
    ) -> Result<Packet<'a>, Option<DropReason>> {
        let limiter = match self.own_keys().find(|k| k.key == *own) {
            Some(k) => k.limiter.clone(),
            None => return Err(Some(DropReason::UnknownIndex)),
        };
        match limiter.verify_packet(Some(from.ip()), datagram, buf) {
            Ok(p) => Ok(p),
            Err(TunnResult::WriteToNetwork(cookie)) => {
                let payload = cookie.to_vec();
                self.drops.add(DropReason::UnderLoad, 1);
                self.outputs
                    .push_back(Output::Transmit { dst: from, payload });
                Err(None)
            }
            Err(TunnResult::Err(e)) => Err(Some(reason_for(&e))),
            Err(_) => Err(Some(DropReason::InvalidPacket)),
        }
    }

    /// `via`: straight from `from`, or forwarded by a relay (at `from`) for node peer `expect`,
    /// the only peer the datagram may belong to.
    fn route_datagram(
        &mut self,
        from: SocketAddr,
        via: paths::Via,
        expect: Option<PeerId>,
        datagram: &[u8],
        buf: &mut [u8],
    ) -> Dispatch {
        let parsed = match Tunn::parse_incoming_packet(datagram) {
            Ok(p) => p,
            Err(_) => return self.dropped(None, DropReason::InvalidPacket),
        };
        // A response, cookie reply or data message names its shard in the receiver index.
        if let Some(k) = receiver_shard(&parsed, self.shard_count) {
            if k != self.shard_index {
                return Dispatch::Shard(k);
            }
        }
        let target = match parsed {
            Packet::HandshakeInit(_) => {
                // Addressed to one of our keys: the one whose MAC1 verifies.
                let mut verified = None;
                let mut reason = Some(DropReason::InvalidMac);
                let own: Vec<PublicKey> = self.own_keys().map(|k| k.key).collect();
                for key in own {
                    match self.verify(&key, from, datagram, buf) {
                        Ok(Packet::HandshakeInit(init)) => {
                            verified = Some((key, init));
                            break;
                        }
                        Ok(_) => {
                            reason = Some(DropReason::InvalidPacket);
                            break;
                        }
                        Err(Some(DropReason::InvalidMac)) => continue,
                        Err(r) => {
                            reason = r;
                            break;
                        }
                    }
                }
                let Some((own, init)) = verified else {
                    if let Some(r) = reason {
                        self.drop_packet(None, r, 1);
                    }
                    return Dispatch::Done;
                };
                let Some(ok) = self.own_keys().find(|k| k.key == own) else {
                    return Dispatch::Done;
                };
                let half = match parse_handshake_anon(ok.private.secret(), &ok.public, &init) {
                    Ok(h) => h,
                    Err(_) => return self.dropped(None, DropReason::HandshakeFailed),
                };
                let key = match PublicKey::from_bytes(half.peer_static_public) {
                    Ok(k) => k,
                    Err(_) => return self.dropped(None, DropReason::UnknownPeer),
                };
                let Some(&id) = self.keys.get(&key) else {
                    tracing::debug!(key = %key.fingerprint(), %from, "handshake from unknown key");
                    return self.dropped(None, DropReason::UnknownPeer);
                };
                // The owner verifies it again and answers; nothing is counted here.
                if let Some(p) = self.peers.get(&id) {
                    let owner = self.owner(p);
                    if owner != self.shard_index {
                        return Dispatch::Shard(owner);
                    }
                }
                let psk = self.peers.get(&id).and_then(|p| self.pair_psk(&p.config));
                match self
                    .peers
                    .get_mut(&id)
                    .and_then(|p| p.slot_for(&own, &key, psk))
                {
                    Some(s) => (id, s.index),
                    None => return self.dropped(Some(id), DropReason::UnknownPeer),
                }
            }
            Packet::HandshakeResponse(resp) => {
                let Some((id, idx)) = self.by_index(resp.receiver_idx) else {
                    return self.dropped(None, DropReason::UnknownIndex);
                };
                let own = self
                    .peers
                    .get_mut(&id)
                    .and_then(|p| p.slot_by_index(idx))
                    .map(|s| s.own);
                let Some(own) = own else {
                    return self.dropped(None, DropReason::UnknownIndex);
                };
                match self.verify(&own, from, datagram, buf) {
                    Ok(Packet::HandshakeResponse(_)) => (id, idx),
                    Ok(_) => return self.dropped(None, DropReason::InvalidPacket),
                    Err(Some(r)) => return self.dropped(None, r),
                    Err(None) => return Dispatch::Done,
                }
            }
            Packet::PacketCookieReply(c) => match self.by_index(c.receiver_idx) {
                Some(t) => t,
                None => return self.dropped(None, DropReason::UnknownIndex),
            },
            Packet::PacketData(d) => match self.by_index(d.receiver_idx) {
                Some(t) => t,
                None => return self.dropped(None, DropReason::UnknownIndex),
            },
        };
        if expect.is_some_and(|e| e != target.0) {
            // A relay forwarded a datagram of another peer than it named.
            return self.dropped(None, DropReason::InvalidPacket);
        }
        self.decapsulate(target, from, via, datagram, buf);
        Dispatch::Done
    }

    fn decapsulate(
        &mut self,
        (id, idx): (PeerId, u32),
        from: SocketAddr,
        via: paths::Via,
        datagram: &[u8],
        buf: &mut [u8],
    ) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let Some(ks) = peer.slot_by_index(idx) else {
            return;
        };
        let mut authenticated = false;
        let mut drop: Option<DropReason> = None;
        let mut decrypted: Option<(&mut [u8], std::net::IpAddr)> = None;
        let mut answer: Option<Vec<u8>> = None;
        let is_data = datagram.first() == Some(&MSG_DATA);
        match ks.tunn.decapsulate(Some(from.ip()), datagram, buf) {
            TunnResult::Done => {
                // A keepalive or a cookie reply that verified.
                authenticated = datagram.first() != Some(&MSG_COOKIE_REPLY);
            }
            TunnResult::Err(e) => drop = Some(reason_for(&e)),
            TunnResult::WriteToNetwork(p) => {
                // A handshake response (authenticated initiation), or a cookie reply under load.
                authenticated = p.first() != Some(&MSG_COOKIE_REPLY);
                answer = Some(p.to_vec());
            }
            TunnResult::WriteToTunnelV4(p, src) => decrypted = Some((p, src.into())),
            TunnResult::WriteToTunnelV6(p, src) => decrypted = Some((p, src.into())),
        }
        if authenticated && is_data {
            ks.rx_data += 1;
        }
        if let Some((p, src)) = decrypted {
            authenticated = true;
            ks.rx_data += 1;
            // Device-wide crypto-routing: the most specific owner of the source must be the
            // peer that sent it.
            if self.allowed.source_allowed(src, &id) {
                peer.rx_bytes += p.len() as u64;
                let mut out = take_buf(&mut self.free, 0);
                out.extend_from_slice(p);
                self.outputs.push_back(Output::Deliver(out));
            } else {
                drop = Some(DropReason::SourceNotAllowed);
            }
        }
        if let Some(reason) = drop {
            self.drop_packet(Some(id), reason, 1);
        }
        if authenticated {
            // Roaming: the endpoint (or the relay) follows the last authenticated packet.
            self.path_follows(id, from, via);
        }
        if let Some(a) = answer {
            self.reply(id, from, via, a);
        }
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let Some(ks) = peer.slot_by_index(idx) else {
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
        if has_session {
            self.flush_queue(id);
        }
    }

    fn flush_queue(&mut self, id: PeerId) {
        let Some(peer) = self.peers.get(&id) else {
            return;
        };
        if peer.queue.is_empty() {
            return;
        }
        let Some(i) = self.best_session(peer) else {
            return;
        };
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let mut sent = Vec::new();
        while let Some((_, pkt)) = peer.queue.pop_front() {
            let mut out = take_buf(&mut self.free, (pkt.len() + 32).max(MIN_BUF));
            if let TunnResult::WriteToNetwork(p) = peer.slots[i].tunn.encapsulate(&pkt, &mut out) {
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
        self.paths.set_now(now);
        for k in self.own_keys() {
            k.limiter.reset_count();
        }
        self.confirm_next_sessions(now);
        // Retire slots of an older PSK generation whose pair has moved on.
        let moving: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                let want = self.pair_psk(&p.config);
                p.slots.iter().any(|s| s.psk_generation != want)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in moving {
            self.sync_slots(id);
        }
        let mut buf = std::mem::take(&mut self.scratch);
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        let own_current = self.own.key;
        for id in ids {
            let Some(peer) = self.peers.get_mut(&id) else {
                continue;
            };
            let current_pair = (own_current, peer.config.public_key);
            let mut sends = Vec::new();
            let mut next_endpoint = false;
            let mut expired_current = false;
            let mut timeouts = 0;
            for ks in peer.slots.iter_mut() {
                match ks.tunn.update_timers(&mut buf) {
                    TunnResult::WriteToNetwork(p) => {
                        let payload = p.to_vec();
                        if payload.first() == Some(&MSG_HANDSHAKE_INIT) && !ks.has_session() {
                            // No answer on this endpoint: try the next one in the record.
                            next_endpoint = true;
                            timeouts += 1;
                        }
                        sends.push(payload);
                    }
                    TunnResult::Err(WireGuardError::ConnectionExpired)
                        if (ks.own, ks.public_key) == current_pair =>
                    {
                        expired_current = true;
                    }
                    _ => {}
                }
            }
            peer.handshake_timeouts += timeouts;
            if next_endpoint {
                peer.try_next_endpoint();
            }
            let Some(peer) = self.peers.get_mut(&id) else {
                continue;
            };
            let no_session = !peer.slots.iter().any(KeySlot::has_session);
            if expired_current && no_session && !peer.queue.is_empty() {
                let n = peer.queue.len() as u64;
                peer.queue.clear();
                self.drop_packet(Some(id), DropReason::HandshakeTimeout, n);
            }
            for p in sends {
                self.transmit_to_peer(id, p);
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
            self.flush_queue(id);
        }
        self.scratch = buf;
        self.paths_timeout(now);
    }

    /// Status of every peer, sorted by name. A shard lists the peers it owns: a sharded
    /// device's status is all shards' lists together.
    pub fn peer_status(&self) -> Vec<PeerStatus> {
        let mut v: Vec<PeerStatus> = self
            .peers
            .values()
            .filter(|p| self.owner(p) == self.shard_index)
            .map(|p| PeerStatus {
                name: p.config.name.clone(),
                kind: p.config.kind,
                public_key: p.config.public_key.to_base64(),
                next_public_key: p.config.next_public_key.map(|k| k.to_base64()),
                key_generation: p.config.key_generation,
                traffic_public_key: self
                    .best_session(p)
                    .and_then(|i| p.slots.get(i))
                    .map(|s| s.public_key.to_base64()),
                endpoint: p.endpoint.map(|e| e.to_string()),
                endpoint_source: p.endpoint_source(),
                endpoint_reason: p.endpoint_reason(),
                path: match p.path.relay {
                    Some(_) => "relayed",
                    None => "direct",
                },
                relay: self.relay_name(p.path.relay),
                path_reason: p.path.reason,
                path_upgrades: p.path.upgrades,
                path_fallbacks: p.path.fallbacks,
                location: p.config.location.clone(),
                keepalive_secs: self.keepalive_for(&p.config),
                allowed_ips: p.config.allowed_ips.iter().map(|n| n.to_string()).collect(),
                latest_handshake_secs_ago: p
                    .slots
                    .iter()
                    .filter_map(|s| s.tunn.time_since_last_handshake())
                    .min()
                    .map(|d| d.as_secs_f64()),
                psk_generation: self
                    .best_session(p)
                    .and_then(|i| p.slots.get(i))
                    .map_or(self.pair_psk(&p.config), |s| s.psk_generation),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                handshake_attempts: p.handshake_attempts,
                handshake_failures: p.handshake_timeouts,
                queued: p.queue.len(),
                key_pairs: p.slots.len(),
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

mod paths;
pub use paths::{PathStats, RelayStatus};

#[cfg(test)]
mod tests;
