//! Arbitrary bytes as a path message into a weft-core `Node` that relays (`node/paths.rs`):
//! once raw, once sealed with a real pair key so the body parsers run (ping, pong, call, relay,
//! relayed: the kind from the first byte, the body from the rest). Never a panic, and nothing
//! the node sends in answer is larger than what it got (no amplification).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::Instant;
use weft_core::keys::PrivateKey;
use weft_core::node::{Node, Output};
use weft_core::pathmsg::{key_id, PairKey};
use weft_core::peer::{PeerConfig, PeerKind, PeerPsk};

fn key(b: u8) -> PrivateKey {
    PrivateKey::from_bytes([b; 32])
}

fn cfg(name: &str, k: &PrivateKey, i: u8, relay: bool, endpoint: bool) -> PeerConfig {
    PeerConfig {
        name: name.into(),
        kind: PeerKind::Node,
        public_key: k.public_key(),
        next_public_key: None,
        endpoints: if endpoint {
            vec![format!("198.18.0.{i}:51820").parse().expect("ep")]
        } else {
            vec![]
        },
        private_endpoints: vec![],
        location: None,
        through_nat: false,
        relay,
        allowed_ips: vec![format!("10.42.{i}.0/24").parse().expect("net")],
        key_generation: 1,
        psk: PeerPsk::Cluster(None),
    }
}

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let (me, a, b) = (key(1), key(2), key(3));
    let mut node = Node::new(me.clone(), None);
    node.set_paths(true, true, vec!["198.18.0.1:51820".parse().expect("ep")], vec![]);
    let _ = node.add_peer(cfg("a", &a, 2, true, true));
    let _ = node.add_peer(cfg("b", &b, 3, false, false));
    node.handle_timeout(now);
    while node.poll_output().is_some() {}
    let from = "203.0.113.9:4000".parse().expect("from");
    let check = |node: &mut Node, d: &[u8]| {
        node.handle_udp(from, d, now);
        while let Some(o) = node.poll_output() {
            if let Output::Transmit { payload, .. } = o {
                // A handshake the node starts itself can be larger than a tiny input.
                assert!(payload.len() <= d.len().max(148) + 64, "amplified");
            }
        }
    };
    check(&mut node, data);
    if let Some((&kind, body)) = data.split_first() {
        let k = PairKey::derive(&a, &me.public_key());
        let sealed = k.seal(
            0x10 + kind % 5,
            key_id(&a.public_key()),
            key_id(&me.public_key()),
            &[body],
        );
        check(&mut node, &sealed);
    }
});
