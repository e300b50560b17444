//! weft-sys: the Linux I/O layer of the weft mesh daemon (`meshd`).
//!
//! Everything here talks to the kernel of the *calling thread's* network namespace:
//!
//! * [`Tun`]: in: an interface name (`"weft0"`, or `""`/`"tun%d"` for a kernel-chosen
//!   name); out: a non-blocking `IFF_TUN | IFF_NO_PI` device registered with tokio, with
//!   `recv`/`send` on `&self` (raw IP packets, no packet-info header) and the actual name;
//!   [`Tun::create_offload`] adds `IFF_VNET_HDR` and the TSO/USO/checksum offloads the kernel
//!   accepts (packets then carry a `virtio_net_hdr` and may be 64 KiB super-packets).
//!   [`Tun::open_queues`]: in: a name, a queue count, whether to offload; out: that many
//!   [`TunQueue`]s of one (`IFF_MULTI_QUEUE` when more than one) device, not yet tied to a
//!   runtime, each turned into a `Tun` on its own thread's runtime by [`Tun::from_queue`].
//! * [`Netlink`]: in: interface names, addresses, [`Route`]s; out: links brought up,
//!   MTUs set/read, addresses added (idempotent), routes replaced/deleted (idempotent,
//!   IPv4 and IPv6, device routes and `RTN_UNREACHABLE` fail-closed routes), the list of
//!   prefixes routed via an interface, and the underlay's default-route interface with
//!   its first global address and MTU ([`Netlink::default_route_source`]).
//! * [`udp`]: in: a port; out: a dual-stack tokio `UdpSocket` (`[::]:port`, falling back
//!   to `0.0.0.0:port`) with 4 MiB buffers, plus address canonicalisation helpers
//!   (`::ffff:a.b.c.d` <-> `a.b.c.d`). [`udp::bind_udp_group`]: in: a port and a count; out:
//!   that many such std sockets on one port (an `SO_REUSEPORT` group when more than one),
//!   each registered with its thread's runtime by [`udp::register_udp`].
//! * [`udp_gso`]: in: that socket, buffers, segment sizes and destinations; out: `sendmsg` /
//!   `sendmmsg` with `UDP_SEGMENT` (GSO: many datagrams per message, many messages per call),
//!   and `recvmsg` / `recvmmsg` with `UDP_GRO` that return many datagrams of one flow per
//!   message, with their sender and segment size.
//! * [`sysctl`]: in: a sysctl path and value; out: the value written to `/proc/sys`
//!   (and [`sysctl::enable_forwarding`]).
//! * [`nft`]: nftables and conntrack over netlink, no `nft`/`conntrack` binary.
//!   [`nft::masq`]: in: a table name, pod ranges and cluster ranges; out: an nftables
//!   masquerade table written in one atomic batch. [`nft::policy`]: in: a NetworkPolicy
//!   `weft_core::netpol::program::Program`; out: table `inet weft-policy` replaced in one
//!   atomic batch (refused messages named), removed, probed ([`nft::policy::policy_installed`])
//!   and its rule counters and guard drops read back. [`nft::conntrack`]: out: the conntrack
//!   entries' original tuples; in: flows whose entries to delete.
//! * [`netns`]: in: a netns name (`/run/netns/NAME`) or path and a closure; out: the
//!   closure's result, run on a fresh thread that entered that namespace.
//!
//! All fallible operations return [`SysError`]; per-packet I/O returns `std::io::Result`.
//! The TUN, netlink and UDP constructors must be called inside a tokio runtime, except
//! [`Tun::open_queues`] and [`udp::bind_udp_group`], which need none (their results are
//! registered later by [`Tun::from_queue`] and [`udp::register_udp`]).
//!
//! # Design (the overview is in ARCHITECTURE.md)
//!
//! **weft-sys** (`crates/sys`) does the Linux I/O: the TUN device (async read/write plus
//! non-blocking drain), routes and addresses over rtnetlink (device routes and `unreachable`
//! routes, tagged proto 87), a dual-stack UDP socket with 4 MiB buffers, forwarding sysctls and
//! netns helpers. `Tun::create_offload` opens the TUN with `IFF_VNET_HDR` and asks for
//! TSO4/6, USO4/6 and checksum offload, dropping USO, then TSO, then everything when the kernel
//! refuses; `udp_gso` sends many equal-sized datagrams to one destination as one message carrying
//! `UDP_SEGMENT`, up to eight messages per `sendmmsg`, and reads with `UDP_GRO` and `recvmmsg` (up
//! to eight messages per call, each many datagrams of one flow, their size in a control message).
//! For several workers, `Tun::open_queues` opens N queues of one `IFF_MULTI_QUEUE` device (all or
//! none: a failure closes what was opened; `MultiQueueUnsupported` when the kernel lacks it) and
//! `udp::bind_udp_group` binds N `SO_REUSEPORT` sockets on one port (the first without
//! `SO_REUSEPORT`, so a port already in use is an error); neither needs a runtime, and each worker
//! registers its own with `Tun::from_queue` / `udp::register_udp`.

mod error;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod sysctl;
pub mod tun;
pub mod udp;
pub mod udp_gso;

pub use error::SysError;
pub use netlink::{Netlink, Route, RouteKind, DEV_ROUTE_METRIC, UNREACHABLE_ROUTE_METRIC};
pub use sysctl::{enable_forwarding, enable_forwarding_in, write_sysctl, Forwarding};
pub use tun::{Tun, TunQueue};
pub use udp::{bind_udp, bind_udp_group, canonical, register_udp, to_socket_family};
