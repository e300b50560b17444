//! meshd, weft's node daemon.
//!
//! In: flags (or `WEFT_*` env vars), node records, external peer records and revocations from
//! the registry, packets from the TUN and datagrams from the UDP socket. Out: an encrypted
//! WireGuard mesh to every other node and every external standard WireGuard peer that no
//! revocation or conflict refuses, routes for their ranges, this node's record in the registry,
//! and status on a local socket; for operators also the WireGuard userspace API socket (`wg
//! show`), Prometheus metrics and text or JSON logs.
//! Exit codes: 0 ok, 64 bad flags or config, 1 runtime failure.
//!
//! # Design (the overview is in ARCHITECTURE.md)
//!
//! **meshd** (`meshd/`) is the daemon. It validates its config before anything binds (exit 64
//! naming the flag), loads or creates `private.key` (0600), installs the fail-closed `unreachable`
//! routes first, then creates the TUN (one queue per worker), binds UDP (one socket per worker),
//! publishes its record and watches the others. With `--registry kube`, `kube.rs` first takes the
//! endpoint and pod ranges from this node's Node object (bounded wait; remembered ranges when the
//! API server is down) and watches that one Node; `probes.rs` serves `/healthz` and `/readyz` on
//! `--health-listen` for the kubelet (bound before the TUN exists), and `metrics.rs` Prometheus
//! metrics on `--metrics-listen` through the same small HTTP server (docs/metrics.md).
//! `uapi.rs` answers `wg show` on `--wg-uapi-dir/IFNAME.sock` from the shards' peer status,
//! read-only (docs/wg-uapi.md). `logging.rs` writes JSON lines with `node`, `event` and `peer`
//! and rate-limits warnings that repeat (docs/logging.md). The health report marks a link
//! `unanswered` when it sent and heard nothing back for 15 s (`weft_core::health::LinkWatch`).
//! `--workers N` (default `auto`: one per CPU) data-path
//! workers (`worker`) each run on their own thread and current-thread runtime with their own TUN
//! queue and UDP socket; the node state is split into one `Node` per worker (`shards`, each behind a
//! mutex), a peer's `Tunn`s living only in its owner shard. A worker reads TUN packets and
//! datagrams (drained in bursts of up to 64 reads or 1024 packets before the outputs are flushed),
//! locks the shard it used last, and moves to the owner shard when the node answers
//! `Dispatch::Shard(k)`; it takes the outputs under the lock and carries them out after
//! releasing it. One control `select!` loop on the main thread feeds every shard 250 ms ticks,
//! peer changes and key changes from registry events, serves API requests (`status`, `leave` over
//! a unix socket; status merges the shards and lists each worker's counters) and sends what its
//! calls produce (handshakes, keepalives) through a handle on worker 0's socket. If a worker
//! thread ends, meshd stops with an error. Workers carry out their outputs through `datapath`: TUN super-packets are cut into MTU-sized packets
//! before `Node::handle_tun`, each UDP GRO batch into datagrams before `Node::handle_udp`;
//! the datagrams of a pass to one peer go out as GSO messages (joining that peer's last one while
//! it fits), up to eight messages per `sendmmsg`, and the decrypted packets of a pass
//! are coalesced (TCP GRO, and UDP into USO super-packets where the TUN took USO) before they
//! are written to the TUN. `--offload off`
//! (or a kernel without an offload) falls back to one packet per system call; `meshd status`
//! counts what each offload did. Watch tasks feed the revocations and the cluster PSK generation (`psk/cluster`; with
//! `--cluster-secret-file`, read and checked before anything binds) into the same loop
//! (`revocations`; listed at start-up before the first reconcile and cached in
//! `STATE_DIR/revocations.json`). A third watch feeds the external peers (`peers/`, batched like
//! the node records, cached in `STATE_DIR/external-peers.json`). Every 2 s the loop looks at its links and, when one changed state
//! (or 30 s passed), writes its link health report `health/NAME` in the background (lease-bound
//! with etcd). On a registry event it takes in
//! every event already queued, then
//! reconciles peers (records a revocation refuses are left out, so a revoked peer is removed from
//! the device) and syncs routes once (a burst of N records costs one pass, not N), and logs `peer
//! routed` for each peer whose routes are now in place. It writes the records it knows to
//! `STATE_DIR/peers.json` at most once a second and at shutdown; at start-up it installs the peers
//! from that cache before the registry answers (the first `Reset` replaces them). Its own record is written
//! by a background task (`put_owned`, retried with jittered backoff) so a slow or unreachable
//! registry never stalls the event loop.
//!
//! Key rotation (`rotation`): when `keyctl rotate` writes `rotations/NAME` with a key generation
//! above the node's (or `--key-max-age` passes), meshd makes a new key in `STATE_DIR/next.key`
//! (0600), adds it to the device and publishes it as the record's `nextPublicKey`; once the registry
//! shows it, it handshakes with every peer on it; when every peer sends on the new pair (or after a
//! 20 s grace, and only if the announcement is in the registry) it renames `next.key` over
//! `private.key`, retires the old key and publishes the new key with the generation + 1. A restart
//! with `next.key` present resumes the rotation; a restart after the rename finishes it. A node under a revocation
//! (readmitted) holds its rotation in the announced phase until its own revocation admits the next
//! key (`keyctl rotate` approves it as `approvedNextKey`), and never rotates on `--key-max-age`.
//!
//! Without `--pod-cidr`, meshd first claims a block (`podcidr`): it prefers the block remembered in
//! `STATE_DIR/pod-cidr`, falls back to that block at once when the registry cannot be reached, fails
//! on a full pool, and renews the claim in a background task while it runs.
//!
//! meshd also writes `STATE_DIR/node.json` (pod CIDRs, cluster CIDRs, mesh address, MTU) for the CNI
//! plugin, and `meshd install-cni` installs that plugin.
//!
//! # More than one core
//!
//! ## More than one core
//!
//! The data path runs on `--workers` threads (default: one per CPU). Each worker owns one queue of
//! the TUN (`IFF_MULTI_QUEUE`) and one socket of an `SO_REUSEPORT` group on the WireGuard port, and
//! runs its own current-thread runtime, so a packet is read, encrypted and sent on one thread. The
//! kernel picks a TUN queue by flow hash (and then keeps a flow on the queue its packets were last
//! written to) and a socket by a hash of the 4-tuple, so each flow, and everything from one peer
//! endpoint, is read by one worker in order.
//!
//! `Tunn` takes `&mut self` (nonce counter, replay window, timers), so a peer's sessions must be
//! used by one thread at a time. The node state is therefore split into shards, one `Node` per
//! worker behind a mutex, and each peer's `Tunn`s live only in its owner shard (a hash of its
//! name). Every shard still holds every peer's keys and allowed IPs, so the device-wide
//! crypto-routing check and the duplicate checks are the same as with one `Node`. A worker locks
//! the shard it used last; when the node answers that a packet belongs to another shard (the
//! destination's peer for a TUN packet; the receiver index, or the initiator's key, for a
//! datagram), it locks that shard instead and goes on. It never holds a lock across a system call
//! or an `await`: outputs are taken under the lock and sent after. So two peers are encrypted on
//! two cores at once, and one peer's packets are serialized by its shard's lock in the order each
//! worker read them. This is simpler than handing packets between workers through rings (what
//! this section described before it was built): no queue to size, no extra copy, no wake-up of
//! another thread, and a flow's packets cannot overtake each other while one worker reads them.
//! The kernel does move a flow between TUN queues in one case: it remembers the queue through
//! which packets of a flow were last written (its replies, decrypted by the worker whose socket
//! the peer's datagrams reach) and sends the flow's outbound packets to that queue, until no reply
//! was written for about 3 s. At such a move, packets still waiting in the old queue can be
//! encrypted after newer ones from the new queue: a transient reorder of a few packets, which the
//! receiving WireGuard replay window and TCP accept. (In the 64-byte UDP benchmark both of the
//! sending node's workers read part of the one iperf3 flow, which fits this: iperf3's start-up
//! exchange writes a reply of the flow, and its entry expires 3 s later; a one-way flow without
//! replies stays on one worker, tests/harness/tests/workers.rs.) A TUN steering eBPF program
//! (`TUNSETSTEERINGEBPF`) that always picks the hash queue would rule it out; it is not built.
//!
//! The cost of the shards: two workers that read traffic of the same peer contend for its shard's lock. On the
//! 2-core development machine the workers change nothing for one peer and, with two peers, spread
//! the encryption over both threads without raising the combined rate, since three nodes already
//! share the two cores (BENCHMARKS.md, run H).
//!
//! The control loop (registry, reconcile, rotation, timers, API) stays on the main thread: it
//! applies every peer and key change to every shard, merges status from the owners, and sends
//! the handshakes and keepalives its calls produce through a handle on worker 0's socket (it never
//! reads from it). A worker that ends (an error or a panic) stops meshd with an error.
//!
//! Spreading one peer's crypto over several cores would need what boringtun does not expose: the
//! owner hands out nonces in order, any core seals with the session key, and a per-peer reorder
//! buffer sends the results in nonce order; on receive, any core opens, and the owner checks the
//! replay window and delivers in order. It is not built, since it needs sealing and opening with
//! an explicit nonce outside `Tunn`; it is what one flow (one peer) would need to use more than one
//! core for its crypto.

mod api;
mod config;
mod daemon;
mod datapath;
mod install;
mod keyfile;
mod kube;
mod logging;
mod metrics;
mod netpol;
mod podcidr;
mod probes;
mod revocations;
mod rotation;
mod shards;
mod uapi;
mod worker;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "meshd",
    version,
    about = "weft node daemon: an encrypted WireGuard mesh between Kubernetes nodes"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the node daemon in the foreground.
    Run(Box<config::RunArgs>),
    /// Show this node and its peers (over the API socket).
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, env = "WEFT_API_SOCKET", default_value = "/run/weft/meshd.sock")]
        api_socket: PathBuf,
    },
    /// Install the CNI plugin: copy weft-cni (from next to meshd) into the CNI bin dir and write
    /// 10-weft.conflist into the CNI conf dir, both atomically.
    InstallCni(install::InstallArgs),
    /// Leave the mesh for good: the running meshd deletes this node's record, removes its
    /// routes (also the fail-closed ones) and exits.
    Leave {
        #[arg(long, env = "WEFT_API_SOCKET", default_value = "/run/weft/meshd.sock")]
        api_socket: PathBuf,
    },
}

const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return if usage {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // The control loop runs on this current-thread runtime; each data-path worker has its own
    // thread and current-thread runtime, so a packet is read, encrypted and sent on one thread
    // (no hand-off between threads on the way).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.cmd {
        Cmd::Run(args) => {
            let cfg = match args.validate() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("meshd: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            logging::init(cfg.json_logs, &cfg.node_name);
            weft_registry::set_repeat_interval(cfg.log_repeat_interval);
            match rt.block_on(daemon::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("meshd: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Status { json, api_socket } => {
            match rt.block_on(api::request(&api_socket, "status")) {
                Ok(reply) => {
                    if json {
                        print!("{reply}");
                    } else {
                        match serde_json::from_str::<serde_json::Value>(&reply) {
                            Ok(v) => print!("{}", api::render(&v)),
                            Err(_) => print!("{reply}"),
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("meshd status: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::InstallCni(args) => match install::run(&args) {
            Ok(msg) => {
                println!("{msg}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meshd install-cni: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Leave { api_socket } => match rt.block_on(api::request(&api_socket, "leave")) {
            Ok(reply) => {
                print!("{reply}");
                let ok = serde_json::from_str::<serde_json::Value>(&reply)
                    .ok()
                    .and_then(|v| v["left"].as_bool())
                    .unwrap_or(false);
                if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("meshd leave: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
