//! weft-core: the sans-IO heart of weft.
//!
//! In: node records, external peer records and pod CIDR claims from the registry, packets read
//! from the TUN, datagrams read from the UDP socket, and the current time (`now`). Out: datagrams to send, packets to
//! deliver to the TUN, peer add/update/remove commands, the claim to write, and counters. No
//! tokio, no sockets, no files: the daemon (`meshd`) owns all I/O and drives this crate with
//! `handle_*` calls and `poll_*` drains.

pub mod alloc;
pub mod allowed_ips;
pub mod control;
pub mod external;
pub mod health;
pub mod keys;
pub mod node;
pub mod offload;
pub mod packet;
pub mod peer;
pub mod psk;
pub mod reconcile;
pub mod record;
pub mod repeats;
pub mod uapi;

pub use keys::{KeyError, PrivateKey, PublicKey};
pub use record::{NodeRecord, RecordError};
