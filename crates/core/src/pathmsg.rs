//! weft's path messages: what weft nodes send each other next to WireGuard, on the same UDP
//! port, to find direct paths through NAT and to relay when there is none.
//!
//! In: datagrams and the keys of the two nodes of a pair. Out: parsed, authenticated messages,
//! or sealed ones to send. Sans-IO; the device ([`crate::node::Node`]) decides when to send what.
//!
//! Every message is `[type, 'w', 'f', 't'][sender key id: 8][receiver key id: 8][body][tag: 16]`.
//! A key id is the first 8 bytes of a node's public key. The types are 0x10 to 0x14, never
//! WireGuard's 1 to 4, so a standard WireGuard peer drops one as an invalid message (and weft
//! sends them to weft nodes only). The tag is a keyed BLAKE2s-128, keyed with
//! `BLAKE2s-256("weft path v1" || X25519(own static, peer static))`: only the two nodes of the
//! pair can make or check it. So only mesh members get an answer, a relay forwards only between
//! members, and a node removed from the mesh (a revoked one) gets nothing. The tag covers the
//! whole message, except in `RELAY` and `RELAYED`, where it covers the header, the other end's
//! key id, the datagram's length and its first [`RELAY_TAGGED_PREFIX`] bytes (WireGuard's type,
//! receiver index and counter): the rest is the two end nodes' own WireGuard ciphertext, which
//! their AEAD authenticates end to end, so the relay does not hash every byte it forwards.
//!
//! - `PING` (body: transaction id, padded) asks a peer directly whether a path works; `PONG`
//!   answers from the same socket with the transaction id and the address the ping came from
//!   (how the asker looks from outside its NAT). A pong is no larger than its ping.
//! - `CALL` (body: the sender's candidate addresses), sent through a relay, asks a peer to ping
//!   those addresses: both ends then ping each other at once, which opens both NATs when their
//!   mappings do not depend on the destination (hole punching).
//! - `RELAY` (body: the destination's key id, then a datagram) asks a relay to forward the
//!   datagram; the relay sends it on as `RELAYED` (body: the source's key id, then the same
//!   datagram), sealed for the destination. The datagram is a WireGuard message of the two end
//!   nodes' own session (or their `CALL`): the relay forwards ciphertext it cannot read, and
//!   what it sends is exactly as large as what it got.

use crate::keys::{PrivateKey, PublicKey};
use blake2::digest::{FixedOutput, KeyInit, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

pub const MSG_RELAY: u8 = 0x10;
pub const MSG_RELAYED: u8 = 0x11;
pub const MSG_PING: u8 = 0x12;
pub const MSG_PONG: u8 = 0x13;
pub const MSG_CALL: u8 = 0x14;
const MAGIC: &[u8; 3] = b"wft";

/// Type, magic and the two key ids.
pub const HEADER_LEN: usize = 4 + 8 + 8;
pub const TAG_LEN: usize = 16;
const ADDR_LEN: usize = 18;
/// What relaying adds to a datagram: header, the other end's key id, tag (44 bytes). The mesh
/// MTU leaves room for it when relays are in use.
pub const RELAY_OVERHEAD: usize = HEADER_LEN + 8 + TAG_LEN;
/// Bytes of a relayed datagram the hop's tag covers (see the module docs).
pub const RELAY_TAGGED_PREFIX: usize = 32;
/// Most candidate addresses one `CALL` carries.
pub const MAX_CANDIDATES: usize = 8;
/// Ping and pong body: transaction id and an address (zero in a ping).
const PING_BODY: usize = 8 + ADDR_LEN;

/// The first 8 bytes of a public key: names a node in path messages.
pub type KeyId = [u8; 8];

pub fn key_id(k: &PublicKey) -> KeyId {
    let mut id = [0u8; 8];
    id.copy_from_slice(&k.as_bytes()[..8]);
    id
}

/// Whether a datagram is a path message (by its first four bytes; not yet authenticated).
pub fn is_path_message(d: &[u8]) -> bool {
    d.len() >= HEADER_LEN + TAG_LEN && (MSG_RELAY..=MSG_CALL).contains(&d[0]) && &d[1..4] == MAGIC
}

/// The clear header of a path message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub sender: KeyId,
    pub receiver: KeyId,
}

/// The header of a path message, or None if it is not one.
pub fn header(d: &[u8]) -> Option<Header> {
    if !is_path_message(d) {
        return None;
    }
    let mut sender = [0u8; 8];
    let mut receiver = [0u8; 8];
    sender.copy_from_slice(&d[4..12]);
    receiver.copy_from_slice(&d[12..20]);
    Some(Header {
        kind: d[0],
        sender,
        receiver,
    })
}

/// The MAC key of one pair of static keys (the same at both ends).
#[derive(Clone)]
pub struct PairKey([u8; 32]);

impl std::fmt::Debug for PairKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PairKey(..)")
    }
}

impl PairKey {
    pub fn derive(own: &PrivateKey, peer: &PublicKey) -> PairKey {
        let shared = own.secret().diffie_hellman(&peer.to_dalek());
        let mut h = Blake2s256::new();
        Digest::update(&mut h, b"weft path v1");
        Digest::update(&mut h, shared.as_bytes());
        PairKey(h.finalize().into())
    }

    /// The tag of `msg` (a message without its tag).
    fn tag(&self, msg: &[u8]) -> [u8; TAG_LEN] {
        // A 32-byte key is always a valid BLAKE2s key.
        let mut mac =
            match <Blake2sMac<blake2::digest::consts::U16> as KeyInit>::new_from_slice(&self.0) {
                Ok(m) => m,
                Err(_) => return [0u8; TAG_LEN],
            };
        let relayed = matches!(msg.first(), Some(&MSG_RELAY) | Some(&MSG_RELAYED));
        if relayed && msg.len() > HEADER_LEN + 8 + RELAY_TAGGED_PREFIX {
            mac.update(&msg[..HEADER_LEN + 8 + RELAY_TAGGED_PREFIX]);
            // The length, so a cut or padded datagram does not verify.
            mac.update(&(msg.len() as u64).to_be_bytes());
        } else {
            mac.update(msg);
        }
        mac.finalize_fixed().into()
    }

    /// Whether the message's tag is right (constant time).
    pub fn verify(&self, d: &[u8]) -> bool {
        if d.len() < HEADER_LEN + TAG_LEN {
            return false;
        }
        let (msg, tag) = d.split_at(d.len() - TAG_LEN);
        let want = self.tag(msg);
        want.iter().zip(tag).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    /// A sealed message of `kind` from `sender` to `receiver` with `body`.
    pub fn seal(&self, kind: u8, sender: KeyId, receiver: KeyId, body: &[&[u8]]) -> Vec<u8> {
        self.seal_into(Vec::new(), kind, sender, receiver, body)
    }

    /// [`PairKey::seal`] into `out` (cleared first): a relay reuses packet buffers.
    pub fn seal_into(
        &self,
        mut out: Vec<u8>,
        kind: u8,
        sender: KeyId,
        receiver: KeyId,
        body: &[&[u8]],
    ) -> Vec<u8> {
        let len = HEADER_LEN + body.iter().map(|b| b.len()).sum::<usize>() + TAG_LEN;
        out.clear();
        out.reserve(len);
        out.push(kind);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&sender);
        out.extend_from_slice(&receiver);
        for b in body {
            out.extend_from_slice(b);
        }
        let tag = self.tag(&out);
        out.extend_from_slice(&tag);
        out
    }
}

/// The body of a message (between header and tag).
pub fn body(d: &[u8]) -> &[u8] {
    if d.len() < HEADER_LEN + TAG_LEN {
        return &[];
    }
    &d[HEADER_LEN..d.len() - TAG_LEN]
}

fn encode_addr(a: SocketAddr) -> [u8; ADDR_LEN] {
    let mut out = [0u8; ADDR_LEN];
    let ip = match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out[..16].copy_from_slice(&ip.octets());
    out[16..].copy_from_slice(&a.port().to_be_bytes());
    out
}

fn decode_addr(b: &[u8]) -> Option<SocketAddr> {
    let ip: [u8; 16] = b.get(..16)?.try_into().ok()?;
    let port = u16::from_be_bytes(b.get(16..18)?.try_into().ok()?);
    let v6 = Ipv6Addr::from(ip);
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    if port == 0 || ip.is_unspecified() || ip.is_multicast() {
        return None;
    }
    Some(SocketAddr::new(ip, port))
}

/// A ping's or pong's body: (transaction id, the observed address in a pong).
pub fn ping_body(txid: u64, observed: Option<SocketAddr>) -> [u8; PING_BODY] {
    let mut b = [0u8; PING_BODY];
    b[..8].copy_from_slice(&txid.to_be_bytes());
    if let Some(a) = observed {
        b[8..].copy_from_slice(&encode_addr(a));
    }
    b
}

/// Reads a ping's or pong's body: transaction id and (in a pong) the address observed.
pub fn parse_ping(body: &[u8]) -> Option<(u64, Option<SocketAddr>)> {
    if body.len() != PING_BODY {
        return None;
    }
    let txid = u64::from_be_bytes(body[..8].try_into().ok()?);
    Some((txid, decode_addr(&body[8..])))
}

/// A call's body: the candidate addresses.
pub fn call_body(candidates: &[SocketAddr]) -> Vec<u8> {
    let n = candidates.len().min(MAX_CANDIDATES);
    let mut b = Vec::with_capacity(1 + n * ADDR_LEN);
    b.push(n as u8);
    for c in &candidates[..n] {
        b.extend_from_slice(&encode_addr(*c));
    }
    b
}

pub fn parse_call(body: &[u8]) -> Option<Vec<SocketAddr>> {
    let (&n, rest) = body.split_first()?;
    let n = usize::from(n);
    if n > MAX_CANDIDATES || rest.len() != n * ADDR_LEN {
        return None;
    }
    Some(rest.chunks(ADDR_LEN).filter_map(decode_addr).collect())
}

/// A relay or relayed body: (the other end's key id, the datagram).
pub fn parse_relay(body: &[u8]) -> Option<(KeyId, &[u8])> {
    if body.len() < 8 {
        return None;
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&body[..8]);
    Some((id, &body[8..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_messages_verify_only_with_the_pair_key() {
        let (a, b, c) = (
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        );
        let ab = PairKey::derive(&a, &b.public_key());
        let ba = PairKey::derive(&b, &a.public_key());
        let ac = PairKey::derive(&a, &c.public_key());
        let body = ping_body(7, None);
        let m = ab.seal(
            MSG_PING,
            key_id(&a.public_key()),
            key_id(&b.public_key()),
            &[&body],
        );
        assert!(is_path_message(&m));
        assert!(ba.verify(&m), "both ends derive the same key");
        assert!(!ac.verify(&m));
        let h = header(&m).expect("header");
        assert_eq!(h.kind, MSG_PING);
        assert_eq!(h.sender, key_id(&a.public_key()));
        assert_eq!(parse_ping(super::body(&m)), Some((7, None)));
        // Any flipped bit fails.
        for i in 0..m.len() {
            let mut x = m.clone();
            x[i] ^= 1;
            assert!(!ba.verify(&x), "bit flip at {i} verified");
        }
        // A pong is exactly as large as its ping.
        let pong = ba.seal(
            MSG_PONG,
            key_id(&b.public_key()),
            key_id(&a.public_key()),
            &[&ping_body(7, Some("203.0.113.9:40000".parse().expect("a")))],
        );
        assert_eq!(pong.len(), m.len());
        assert_eq!(
            parse_ping(super::body(&pong)),
            Some((7, Some("203.0.113.9:40000".parse().expect("a"))))
        );
    }

    #[test]
    fn bodies_round_trip_and_refuse_garbage() {
        let c: Vec<SocketAddr> = vec![
            "192.168.1.10:51820".parse().expect("a"),
            "[2001:db8::1]:4000".parse().expect("a"),
        ];
        assert_eq!(parse_call(&call_body(&c)), Some(c));
        assert_eq!(parse_call(&[9]), None);
        assert_eq!(parse_call(&[1, 0]), None);
        assert_eq!(parse_call(&[]), None);
        assert_eq!(parse_ping(&[0; 5]), None);
        assert_eq!(parse_relay(&[1, 2, 3]), None);
        let mut r = vec![5u8; 8];
        r.extend_from_slice(b"datagram");
        assert_eq!(parse_relay(&r), Some(([5u8; 8], &b"datagram"[..])));
        // WireGuard's own messages are never path messages.
        for t in 1..=4u8 {
            let mut d = vec![0u8; 148];
            d[0] = t;
            assert!(!is_path_message(&d));
        }
        assert!(!is_path_message(b"\x10wft"));
        assert_eq!(RELAY_OVERHEAD, 44);
    }

    /// A relayed datagram's tag covers the routing, the length and the WireGuard header: a
    /// changed destination, a cut or a longer datagram, or another WireGuard header fails; the
    /// ciphertext beyond is left to the end nodes' AEAD.
    #[test]
    fn relay_tags_cover_routing_length_and_wireguard_header() {
        let (a, r) = (PrivateKey::generate(), PrivateKey::generate());
        let k = PairKey::derive(&a, &r.public_key());
        let datagram = vec![4u8; 1400];
        let m = k.seal(
            MSG_RELAY,
            key_id(&a.public_key()),
            key_id(&r.public_key()),
            &[&[9u8; 8], &datagram],
        );
        let kr = PairKey::derive(&r, &a.public_key());
        assert!(kr.verify(&m));
        for i in 0..HEADER_LEN + 8 + RELAY_TAGGED_PREFIX {
            let mut x = m.clone();
            x[i] ^= 1;
            assert!(!kr.verify(&x), "byte {i} is covered");
        }
        let mut cut = m.clone();
        cut.remove(100);
        assert!(!kr.verify(&cut));
        let mut longer = m.clone();
        longer.insert(100, 0);
        assert!(!kr.verify(&longer));
    }
}
