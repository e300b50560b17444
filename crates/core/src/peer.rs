//! One remote node as the device sees it: its key slots (each a `Tunn`), its endpoints, its
//! allowed IPs, the packets waiting for a session, and its counters.

use crate::keys::PublicKey;
use boringtun::noise::Tunn;
use ipnet::IpNet;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

/// What kind of party a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PeerKind {
    /// A mesh node running meshd (a `nodes/NAME` record).
    Node,
    /// An external standard WireGuard peer (a `peers/NAME` record, see
    /// [`crate::external`]): one key at a time, so it never moves to a node's next key by
    /// itself; it needs a new config once the node retires the key its config names.
    External,
}

/// What the device needs to know about a peer; it comes from the peer's registry record (a node
/// record, or an external peer record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub name: String,
    pub kind: PeerKind,
    pub public_key: PublicKey,
    /// The key the peer is rotating to, while it rotates: handshakes from it are accepted too.
    pub next_public_key: Option<PublicKey>,
    /// Where to reach the peer, tried in order (for a node: its private endpoints first when
    /// it is in this node's location, then its public ones). Empty: the peer's address is
    /// learnt from its authenticated packets.
    pub endpoints: Vec<SocketAddr>,
    /// Those of `endpoints` that are private (same location).
    pub private_endpoints: Vec<SocketAddr>,
    /// The peer's location, when it names one.
    pub location: Option<String>,
    /// This node reaches the peer through NAT (it publishes no public endpoint of its own):
    /// pairs with the peer send persistent keepalives to keep the mapping open.
    pub through_nat: bool,
    /// The peer relays for mesh members (a node with a public endpoint that allows it).
    pub relay: bool,
    pub allowed_ips: Vec<IpNet>,
    pub key_generation: u64,
    /// Whether pairs with this peer use the cluster PSK, and its published generation.
    pub psk: PeerPsk,
}

/// How a peer takes part in the cluster PSK (see [`crate::psk`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerPsk {
    /// A cluster node. When this node holds the cluster secret, every pair with the peer uses a
    /// PSK, at the lower of the two nodes' generations (`Some`: the generation the peer's record
    /// names; `None`: it names none, so this node's own generation is used, which fails unless
    /// the peer holds the secret too: a node without the secret reaches no one).
    Cluster(Option<u64>),
    /// Not a cluster node (an external standard WireGuard peer): never a PSK, since the secret
    /// must not leave the cluster.
    Never,
}

/// Why a packet was dropped. Counted per peer where a peer is known, and device-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum DropReason {
    /// Outbound packet whose destination no peer owns.
    NoPeer,
    /// Inbound decrypted packet whose source's most specific owner is not the sending peer.
    SourceNotAllowed,
    /// Packet waiting for a handshake dropped because the queue was full.
    QueueFull,
    /// Queued packets dropped because the handshake never completed.
    HandshakeTimeout,
    /// Not a well-formed WireGuard message or IP packet.
    InvalidPacket,
    /// Datagram larger than any valid WireGuard message.
    Oversize,
    /// Data or response for a receiver index that belongs to no peer.
    UnknownIndex,
    /// Handshake initiation from a key that is not a peer.
    UnknownPeer,
    /// MAC1 did not verify.
    InvalidMac,
    /// Handshake refused by the rate limiter (a cookie reply was sent when possible).
    UnderLoad,
    /// Handshake that failed to decrypt or was replayed.
    HandshakeFailed,
    /// Data packet that failed authentication.
    DecryptFailed,
    /// Data packet counter replayed or outside the window.
    Replay,
    /// Data packet for a session that no longer exists.
    NoSession,
}

impl DropReason {
    pub fn name(self) -> &'static str {
        match self {
            DropReason::NoPeer => "noPeer",
            DropReason::SourceNotAllowed => "sourceNotAllowed",
            DropReason::QueueFull => "queueFull",
            DropReason::HandshakeTimeout => "handshakeTimeout",
            DropReason::InvalidPacket => "invalidPacket",
            DropReason::Oversize => "oversize",
            DropReason::UnknownIndex => "unknownIndex",
            DropReason::UnknownPeer => "unknownPeer",
            DropReason::InvalidMac => "invalidMac",
            DropReason::UnderLoad => "underLoad",
            DropReason::HandshakeFailed => "handshakeFailed",
            DropReason::DecryptFailed => "decryptFailed",
            DropReason::Replay => "replay",
            DropReason::NoSession => "noSession",
        }
    }
}

/// Drop counters by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drops(pub BTreeMap<DropReason, u64>);

impl Drops {
    pub fn add(&mut self, reason: DropReason, n: u64) {
        if n > 0 {
            *self.0.entry(reason).or_default() += n;
        }
    }
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0.get(&reason).copied().unwrap_or(0)
    }
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
    /// Adds another set of counters to these (a sharded device's counters are the sum of its
    /// shards').
    pub fn merge(&mut self, other: &Drops) {
        for (reason, n) in &other.0 {
            self.add(*reason, *n);
        }
    }
    /// As a name → count map for status output.
    pub fn by_name(&self) -> BTreeMap<&'static str, u64> {
        self.0.iter().map(|(r, n)| (r.name(), *n)).collect()
    }
}

/// One (own key, peer key) pair with its own `Tunn` (a `Tunn` is bound to one own key and one
/// peer key). A peer has one slot per live pair: one normally, two while either end rotates,
/// four while both do. `index` is the 24-bit local index the `Tunn` was created with: incoming
/// messages carry `index << 8 | session` as receiver index.
pub struct KeySlot {
    /// This node's public key on this slot.
    pub own: PublicKey,
    /// The peer's public key on this slot.
    pub public_key: PublicKey,
    /// The cluster PSK generation this slot's `Tunn` was made with (`None`: no PSK).
    pub psk_generation: Option<u64>,
    pub tunn: Tunn,
    pub index: u32,
    /// Authenticated transport messages (data or keepalive) received on this slot: the peer
    /// sends on this pair, so it has a confirmed session here.
    pub rx_data: u64,
    /// Keepalives sent on this pair's new session during this node's key rotation, so the peer
    /// (the responder) confirms it and moves its traffic here even when it has nothing to send.
    pub confirmations: u32,
    pub last_confirmation: Option<Instant>,
}

impl std::fmt::Debug for KeySlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySlot")
            .field("own", &self.own)
            .field("public_key", &self.public_key)
            .field("psk_generation", &self.psk_generation)
            .field("index", &self.index)
            .field("rx_data", &self.rx_data)
            .finish_non_exhaustive()
    }
}

impl KeySlot {
    /// True when the slot has a session that `encapsulate` will use right away.
    pub fn has_session(&self) -> bool {
        self.tunn.time_since_last_handshake().is_some()
    }

    /// True once the peer sends on this pair (or, if it has nothing to send, once it had
    /// [`crate::node::CONFIRMATIONS`] keepalives on it): traffic has moved here.
    pub fn moved(&self) -> bool {
        self.rx_data > 0 || (self.has_session() && self.confirmations >= crate::node::CONFIRMATIONS)
    }
}

/// Maximum packets held per peer while a handshake is under way.
pub const QUEUE_LIMIT: usize = 128;

#[derive(Debug)]
pub struct Peer {
    pub config: PeerConfig,
    /// One per live (own key, peer key) pair; never empty in the shard that owns the peer,
    /// always empty in the others (see [`crate::node::Node`] on sharding).
    pub slots: Vec<KeySlot>,
    /// Where datagrams for this peer go now.
    pub endpoint: Option<SocketAddr>,
    /// Position in `config.endpoints` while no endpoint has answered yet.
    pub endpoint_index: usize,
    /// Set once an authenticated packet came from `endpoint`: roaming follows the peer from then.
    pub endpoint_confirmed: bool,
    pub queue: VecDeque<(Instant, Vec<u8>)>,
    pub drops: Drops,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Handshake initiations sent to the peer.
    pub handshake_attempts: u64,
    /// Initiations that got no response within WireGuard's rekey timeout (5 s) and were sent
    /// again.
    pub handshake_timeouts: u64,
    /// Direct or relayed, and what is known of the paths (see `node/paths.rs`).
    pub path: PeerPath,
}

/// How a peer's datagrams travel, and what this node knows of the possible paths. Owned by the
/// peer's shard.
#[derive(Debug, Default, Clone)]
pub struct PeerPath {
    /// `Some(relay peer)`: datagrams go through that relay; `None`: directly to `endpoint`.
    pub relay: Option<u64>,
    /// Why the path is what it is, for status.
    pub reason: &'static str,
    /// The last authenticated packet received directly / through a relay.
    pub direct_rx: Option<Instant>,
    pub relayed_rx: Option<Instant>,
    /// Addresses the peer asked this node to ping (its `CALL`).
    pub candidates: Vec<SocketAddr>,
    /// The last `CALL` sent to the peer, and until when its candidates are pinged.
    pub last_call: Option<Instant>,
    pub punch_until: Option<Instant>,
    pub last_punch: Option<Instant>,
    /// Direct handshake initiations sent since the peer last answered directly.
    pub direct_misses: u32,
    /// Times the path went from relayed to direct and back.
    pub upgrades: u64,
    pub fallbacks: u64,
}

/// Where the endpoint a peer's datagrams go to came from (`meshd status`, health reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EndpointSource {
    /// A private endpoint of a node in this node's location.
    Private,
    /// A public endpoint from the peer's record (or an external peer's configured one).
    Public,
    /// Learnt from the peer's authenticated packets: it publishes no endpoint this node can
    /// use (it is behind NAT), or it roamed away from the one it publishes.
    Learned,
    /// None yet: the peer publishes no endpoint this node can use and has not reached this
    /// node; packets for it wait for its handshake.
    None,
}

impl EndpointSource {
    pub fn name(self) -> &'static str {
        match self {
            EndpointSource::Private => "private",
            EndpointSource::Public => "public",
            EndpointSource::Learned => "learned",
            EndpointSource::None => "none",
        }
    }
}

impl Peer {
    /// Where the current endpoint came from.
    pub fn endpoint_source(&self) -> EndpointSource {
        match self.endpoint {
            None => EndpointSource::None,
            Some(e) if self.config.private_endpoints.contains(&e) => EndpointSource::Private,
            Some(e) if self.config.endpoints.contains(&e) => EndpointSource::Public,
            Some(_) => EndpointSource::Learned,
        }
    }

    /// Why the current endpoint is used, in words for operators.
    pub fn endpoint_reason(&self) -> String {
        let loc = self.config.location.as_deref();
        match self.endpoint_source() {
            EndpointSource::Private => format!(
                "same location {}: the peer's private endpoint",
                loc.unwrap_or("?")
            ),
            EndpointSource::Public => match (self.config.kind, loc) {
                (PeerKind::External, _) => "the endpoint its record configures".into(),
                (_, Some(l)) if self.config.private_endpoints.is_empty() => {
                    format!("the peer's public endpoint (its location {l} is not this node's, or it names no private endpoint)")
                }
                (_, Some(l)) => format!("the peer's public endpoint (its private endpoints in {l} did not answer)"),
                (_, None) => "the peer's public endpoint (it names no location)".into(),
            },
            EndpointSource::Learned if self.config.endpoints.is_empty() => {
                "learnt from its authenticated packets: it publishes no endpoint this node can use (behind NAT)".into()
            }
            EndpointSource::Learned => {
                "learnt from its authenticated packets: it roamed away from its published endpoint".into()
            }
            EndpointSource::None => {
                "none yet: it publishes no endpoint this node can use; waiting for its handshake".into()
            }
        }
    }

    /// The slot a receiver index (already shifted: `receiver_idx >> 8`) belongs to.
    pub fn slot_by_index(&mut self, index: u32) -> Option<&mut KeySlot> {
        self.slots.iter_mut().find(|s| s.index == index)
    }

    /// The slot of one (own key, peer key) pair: the one at PSK generation `psk` if there is
    /// one, else any (while the PSK generation changes a pair has a slot per generation).
    pub fn slot_for(
        &mut self,
        own: &PublicKey,
        peer: &PublicKey,
        psk: Option<u64>,
    ) -> Option<&mut KeySlot> {
        let pos = self
            .slots
            .iter()
            .position(|s| s.own == *own && s.public_key == *peer && s.psk_generation == psk)
            .or_else(|| {
                self.slots
                    .iter()
                    .position(|s| s.own == *own && s.public_key == *peer)
            })?;
        self.slots.get_mut(pos)
    }

    /// The peer keys slots must exist for: the current key and, while it rotates, the next.
    pub fn live_keys(&self) -> Vec<PublicKey> {
        let mut v = vec![self.config.public_key];
        v.extend(self.config.next_public_key);
        v
    }

    /// Moves to the next configured endpoint, for a handshake that got no answer.
    pub fn try_next_endpoint(&mut self) {
        if self.endpoint_confirmed || self.config.endpoints.is_empty() {
            return;
        }
        self.endpoint_index = (self.endpoint_index + 1) % self.config.endpoints.len();
        self.endpoint = self.config.endpoints.get(self.endpoint_index).copied();
    }
}
