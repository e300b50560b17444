//! weft-core: the sans-IO heart of weft.
//!
//! In: node records, external peer records and pod CIDR claims from the registry, packets read
//! from the TUN, datagrams read from the UDP socket, and the current time (`now`). Out: datagrams to send, packets to
//! deliver to the TUN, peer add/update/remove commands, the claim to write, and counters. No
//! tokio, no sockets, no files: the daemon (`meshd`) owns all I/O and drives this crate with
//! `handle_*` calls and `poll_*` drains.
//!
//! # Design (the overview is in ARCHITECTURE.md)
//!
//! **weft-core** (`crates/core`) holds everything that decides and nothing that does I/O. No tokio,
//! sockets or files; CI fails if `cargo tree` shows one. `keys` parses X25519 keys in `wg`'s base64
//! format, refuses low-order public keys and never prints a private key. `record` is the node
//! record (name, key, endpoints, pod CIDRs, key generation, schema). It is JSON that ignores unknown
//! fields; a bad record is refused with an error naming the field, and a record is checked against
//! the others (no overlapping ranges, no default route, no range containing an endpoint).
//! `external` is the record of an external standard WireGuard peer (`peers/NAME`: its own public
//! key, allowed IPs, optional endpoint, and the node keys of the config last printed for it), with
//! `check_against`, which refuses overlaps with node ranges or other external peers.
//! `health` turns the device's peer status into the compact link report nodes publish for `keyctl
//! status --peers` (state per link, handshake age, PSK generation, key pairs) and tells whether a
//! new one differs enough to be written; `LinkWatch` finds links that send without hearing back
//! from successive byte counters (time comes in as `now`). `psk` derives a pair's WireGuard preshared key from the cluster secret (HKDF-SHA256 over the
//! generation and both public keys); neither the secret nor a PSK can be printed, and both are wiped
//! on drop. `control` holds the operator's objects, rotation requests, revocations and the cluster
//! PSK generation, and
//! `filter_revoked`, which refuses a record unless its node's revocation admits its key (exactly the
//! approved key, never a revoked one) and drops a next key that is not admitted.
//! `uapi` parses requests on the WireGuard cross-platform userspace API and writes the `get=1`
//! reply in wireguard-go's format (never a private key or PSK); `repeats` decides which log
//! lines of a repeating warning get through (one per interval per thing, with a count).
//! `allowed_ips` is the longest-prefix table used for device-wide crypto-routing. `netpol` is
//! Kubernetes NetworkPolicy for one node: policies, pods and namespaces read from the API's
//! JSON (`model`, every bad field named), compiled (`compile`) into the nftables program of
//! that node (`program`: interval address sets, maps from a local pod to its chain, a chain per
//! policy and direction, a guard set for addresses of the node's ranges that no known pod
//! holds), which `Program::evaluate` also runs in userspace; the 48 upstream e2e specs' truth
//! tables (tests/netpol/cases.json) are checked through it. `node` is the
//! device: one `Peer` per remote node, each with one key slot per live (own key, peer key) pair (a
//! `Tunn` is bound to one own key and one peer key, so a link has one slot normally, two while
//! either end rotates and four while both do), endpoints tried in order, a bounded queue while no
//! session exists, and drop counters by reason. A handshake initiation is matched to the own key
//! whose MAC1 verifies (one rate limiter per own key) and to the slot of the sender's key; outbound
//! traffic uses the slot with the newest keys that has a session, so it moves to a new pair only
//! once that pair works. `set_next_key` / `initiate_next` / `rotation_progress` /
//! `promote_next_key` / `drop_next_key` are the device half of a key rotation. With a cluster secret
//! (`set_cluster_secret`) a slot also carries the PSK generation its `Tunn` was made with: the pair
//! uses the lower of the two nodes' generations, a change adds a slot at the new generation beside
//! the old one, outbound moves to it once it has a session, and the old slot goes once the peer
//! sends on the new one. External peers (kind `External`) never use a PSK. The node takes `handle_tun`, `handle_udp`, `handle_timeout` and `apply(Command)` in, and
//! gives datagrams to send and packets to deliver out through `poll_output`. Before any
//! Diffie-Hellman it checks MAC1 and the rate limiter. `reconcile` turns registry records into
//! Add/Update/Remove commands that touch only the peer that changed. It picks the peers in
//! O(n log n): an index of the accepted ranges, endpoints and keys finds conflicts, and a record is
//! compared with every accepted one (for the exact reason) only when the index shows one.
//! `desired_peer_set` then adds the external peers the same way, after all nodes (node records take
//! precedence); they become ordinary device peers of kind `External` (one key, no PSK, endpoint
//! learnt by roaming when none is given) that a key rotation neither handshakes with nor waits for. `alloc`
//! decides which block of the cluster pool a node holds from everyone's claims: the owner of a block
//! is its claim with the highest generation; a node keeps its own block, else takes its remembered
//! one or the first free one, else the block of an owner gone past the reclaim period, else reports
//! the pool exhausted. `offload` is the pure half of TUN offload (`IFF_VNET_HDR`): it parses and validates the `virtio_net_hdr`, splits TSO/USO super-packets into
//! MTU-sized packets with their checksums, IDs, sequence numbers and flags set, completes
//! `NEEDS_CSUM` checksums, and coalesces received TCP segments into super-packets under Linux's GRO
//! rules, all into reusable buffers. The `Node` keeps the packet buffers its driver hands back
//! (`Node::recycle`) and fills its next outputs from them, so steady traffic allocates nothing per
//! packet. A device can be split into shards (`Node::new_shard(key, keepalive, index, count)`):
//! every shard gets every peer change, so each holds all peers' keys and prefixes (duplicate checks
//! and the device-wide source check stay whole), but only the owner shard of a peer
//! (`shard_of(name, count)`, FNV-1a of the name) creates its slots, handshakes, runs its timers,
//! queues for it and reports it. Receiver indices carry the shard (`index % count`), so
//! `shard_of_datagram` finds the owner of any response, cookie reply or data message from its
//! header; `handle_tun` / `handle_udp` answer `Dispatch::Shard(k)` (having done and counted
//! nothing) for a packet of another shard's peer, including a handshake initiation once its MAC1
//! and sender are known. The shards of one key share its rate limiter, so a cookie from one
//! shard is valid in the others.

pub mod alloc;
pub mod allowed_ips;
pub mod control;
pub mod external;
pub mod health;
pub mod keys;
pub mod netpol;
pub mod node;
pub mod offload;
pub mod packet;
pub mod pathmsg;
pub mod peer;
pub mod psk;
pub mod reconcile;
pub mod record;
pub mod repeats;
pub mod uapi;

pub use keys::{KeyError, PrivateKey, PublicKey};
pub use record::{NodeRecord, RecordError};
