//! One remote node as the device sees it: its key slots (each a `Tunn`), its endpoints, its
//! allowed IPs, the packets waiting for a session, and its counters.

use crate::keys::PublicKey;
use boringtun::noise::Tunn;
use ipnet::IpNet;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

/// What the device needs to know about a peer; it comes from the peer's registry record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub name: String,
    pub public_key: PublicKey,
    pub endpoints: Vec<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub key_generation: u64,
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
    /// As a name → count map for status output.
    pub fn by_name(&self) -> BTreeMap<&'static str, u64> {
        self.0.iter().map(|(r, n)| (r.name(), *n)).collect()
    }
}

/// One (own key, peer key) pair with its own `Tunn`. `index` is the 24-bit local index the
/// `Tunn` was created with: incoming messages carry `index << 8 | session` as receiver index.
pub struct KeySlot {
    pub public_key: PublicKey,
    pub tunn: Tunn,
    pub index: u32,
}

impl std::fmt::Debug for KeySlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySlot")
            .field("public_key", &self.public_key)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl KeySlot {
    /// True when the slot has a session that `encapsulate` will use right away.
    pub fn has_session(&self) -> bool {
        self.tunn.time_since_last_handshake().is_some()
    }
}

/// Which slot of a peer: the peer's current key, or the next key it announced during rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    Current,
    Next,
}

/// Maximum packets held per peer while a handshake is under way.
pub const QUEUE_LIMIT: usize = 128;

#[derive(Debug)]
pub struct Peer {
    pub config: PeerConfig,
    pub current: KeySlot,
    /// The next key during a rotation (used by the key-rotation work; unused until then).
    pub next: Option<KeySlot>,
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
}

impl Peer {
    pub fn slot_mut(&mut self, which: Slot) -> Option<&mut KeySlot> {
        match which {
            Slot::Current => Some(&mut self.current),
            Slot::Next => self.next.as_mut(),
        }
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
