//! The node state split over the data-path workers: one `weft_core::node::Node` per worker
//! (a shard), each behind its own lock. Every shard holds every peer's configuration, keys and
//! allowed IPs (so duplicate checks and the device-wide crypto-routing check are whole in each),
//! but a peer's `Tunn`s live only in its owner shard (`weft_core::node::shard_of`). Control
//! calls go to every shard; status is merged from the owners.
//!
//! A worker locks one shard at a time and never across an `await`, so there is no lock order
//! to get wrong; the control plane does the same.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use weft_core::keys::{PrivateKey, PublicKey};
use weft_core::node::{Node, NodeError, Output, PeerRotation, PeerStatus};
use weft_core::peer::{Drops, PeerConfig};
use weft_core::psk::ClusterSecret;
use weft_core::reconcile::Command;

/// `meshd status`'s `paths`: NAT traversal and relays.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathsStatus {
    pub use_relays: bool,
    /// This node relays for others.
    pub relay: bool,
    /// This node's address as relays see it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reflexive_address: Option<String>,
    /// How this node's NAT maps, from what two or more relays see.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat_mapping: Option<&'static str>,
    pub relays: Vec<weft_core::node::RelayStatus>,
    pub stats: weft_core::node::PathStats,
}

/// The shards of one node.
pub struct Shards {
    nodes: Vec<Mutex<Node>>,
}

impl Shards {
    /// `count` shards (at least one) for the node with key `private`.
    pub fn new(
        private: PrivateKey,
        persistent_keepalive: Option<u16>,
        count: u16,
    ) -> Result<Arc<Self>, NodeError> {
        let count = count.max(1);
        let nodes = (0..count)
            .map(|i| {
                Node::new_shard(private.clone(), persistent_keepalive, i, count).map(Mutex::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(Shards { nodes }))
    }

    pub fn count(&self) -> u16 {
        self.nodes.len() as u16
    }

    /// Locks shard `i` (taken modulo the count). A worker that panicked while holding it
    /// stops meshd anyway (its thread's end is noticed), so a poisoned lock is used as is.
    pub fn lock(&self, i: u16) -> MutexGuard<'_, Node> {
        let m = &self.nodes[usize::from(i) % self.nodes.len()];
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on every shard in turn, collecting the results.
    fn each<R>(&self, mut f: impl FnMut(&mut Node) -> R) -> Vec<R> {
        (0..self.count()).map(|i| f(&mut self.lock(i))).collect()
    }

    /// A peer change, applied to every shard. The shards hold the same peers, so they accept
    /// or refuse it alike; the first refusal is returned.
    pub fn apply(&self, cmd: Command) -> Result<(), NodeError> {
        // Every shard gets it (`each` runs them all) before the first refusal is returned.
        self.each(|n| n.apply(cmd.clone())).into_iter().collect()
    }

    /// The configured peers (every shard has them all).
    pub fn peer_configs(&self) -> Vec<PeerConfig> {
        self.lock(0).peer_configs().cloned().collect()
    }

    pub fn handle_timeout(&self, now: Instant) {
        self.each(|n| n.handle_timeout(now));
    }

    pub fn set_cluster_secret(&self, secret: &ClusterSecret, generation: u64) {
        self.each(|n| n.set_cluster_secret(secret.clone(), generation));
    }

    pub fn set_psk_generation(&self, generation: u64) {
        self.each(|n| n.set_psk_generation(generation));
    }

    pub fn psk_generation(&self) -> Option<u64> {
        self.lock(0).psk_generation()
    }

    pub fn set_next_key(&self, private: &PrivateKey) -> Result<(), NodeError> {
        self.each(|n| n.set_next_key(private.clone()))
            .into_iter()
            .collect()
    }

    pub fn next_key(&self) -> Option<PublicKey> {
        self.lock(0).next_key()
    }

    pub fn initiate_next(&self) {
        self.each(Node::initiate_next);
    }

    pub fn promote_next_key(&self) -> bool {
        self.each(Node::promote_next_key).into_iter().any(|p| p)
    }

    /// Rotation progress of every node peer (each listed by its owner shard).
    pub fn rotation_progress(&self) -> BTreeMap<String, PeerRotation> {
        let mut all = BTreeMap::new();
        for m in self.each(|n| n.rotation_progress()) {
            all.extend(m);
        }
        all
    }

    /// Status of every peer (each from its owner shard), sorted by name.
    pub fn peer_status(&self) -> Vec<PeerStatus> {
        let mut all: Vec<PeerStatus> = self
            .each(|n| n.peer_status())
            .into_iter()
            .flatten()
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Path finding and relays (see `Node::set_paths`), on every shard.
    pub fn set_paths(
        &self,
        use_relays: bool,
        relay: bool,
        public: &[std::net::SocketAddr],
        private: &[std::net::SocketAddr],
    ) {
        self.each(|n| n.set_paths(use_relays, relay, public.to_vec(), private.to_vec()));
    }

    /// Path state of the device: counters of all shards, the relays as the shard that sees
    /// them best measures them, and the reflexive address.
    pub fn paths(&self, use_relays: bool, relay: bool) -> PathsStatus {
        let mut stats = weft_core::node::PathStats::default();
        let mut relays: BTreeMap<String, weft_core::node::RelayStatus> = BTreeMap::new();
        let mut reflexive = None;
        let mut symmetric = None;
        for (s, r, x, sym) in self.each(|n| {
            (
                n.path_stats(),
                n.relay_status(),
                n.reflexive_address(),
                n.nat_is_symmetric(),
            )
        }) {
            stats.merge(&s);
            reflexive = reflexive.or(x);
            symmetric = symmetric.or(sym);
            for st in r {
                let better = relays.get(&st.name).is_none_or(|o| !o.alive && st.alive);
                if better {
                    relays.insert(st.name.clone(), st);
                }
            }
        }
        PathsStatus {
            use_relays,
            relay,
            reflexive_address: reflexive.map(|a| a.to_string()),
            nat_mapping: symmetric.map(|s| {
                if s {
                    "endpoint-dependent (symmetric: relays see different ports)"
                } else {
                    "endpoint-independent (relays see one address)"
                }
            }),
            relays: relays.into_values().collect(),
            stats,
        }
    }

    /// Drops of all shards together.
    pub fn drops(&self) -> Drops {
        let mut all = Drops::default();
        for d in self.each(|n| n.drops().clone()) {
            all.merge(&d);
        }
        all
    }

    /// Takes every output waiting in any shard (what control calls produced: handshakes,
    /// keepalives, queued packets).
    pub fn drain_outputs(&self, out: &mut Vec<Output>) {
        self.each(|n| {
            while let Some(o) = n.poll_output() {
                out.push(o);
            }
        });
    }
}
