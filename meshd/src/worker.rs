//! A data-path worker: one thread with its own current-thread tokio runtime, TUN queue and UDP
//! socket. It reads packets from both, has them encrypted or decrypted in the shard that owns
//! their peer (see [`crate::shards`]), and writes what comes out through its own queue and
//! socket. Workers share nothing else; the control plane reaches them only through the shards.
//!
//! The kernel keeps everything from one remote endpoint on one socket of the `SO_REUSEPORT`
//! group, and a flow on one TUN queue (moving it only when its replies are written through
//! another queue, see ARCHITECTURE.md), and each worker handles what it reads in order, so
//! the packets of a flow keep their order; each peer's `Tunn`s are used under its shard's lock,
//! so different peers are encrypted on different cores at once.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;
use weft_sys::tun::TunQueue;
use weft_sys::Tun;

use crate::datapath::{DataPath, OffloadStatus};
use crate::shards::Shards;

/// Reads per wake-up before outputs are flushed.
const BURST: usize = 64;
/// Packets (segments of TUN super-packets, datagrams of UDP GRO batches) per wake-up before
/// outputs are flushed: bounds the outputs queued at once (and so memory and latency) when
/// every read brings many.
const BURST_PACKETS: usize = 1024;

/// What one worker did (in `meshd status`, `workers`).
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    /// Packets read from its TUN queue (after segmentation) and datagrams from its socket.
    pub tun_packets: u64,
    pub udp_datagrams: u64,
    /// Times a packet it read belonged to a peer of another shard than the one it had locked.
    pub shard_switches: u64,
    #[serde(skip)]
    pub offload: OffloadStatus,
}

/// Everything a worker needs; moved into its thread.
pub struct Worker {
    pub index: u16,
    pub tun: TunQueue,
    pub udp: std::net::UdpSocket,
    pub shards: Arc<Shards>,
    pub offload: bool,
    pub mtu: usize,
    pub status: Arc<Mutex<WorkerStatus>>,
    pub stop: watch::Receiver<bool>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// Starts the worker's thread. When it ends, for whatever reason (asked to stop, an error, a
/// panic), `done` gets its index and why.
pub fn spawn(
    w: Worker,
    done: mpsc::UnboundedSender<(u16, String)>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let index = w.index;
    std::thread::Builder::new()
        .name(format!("meshd-worker-{index}"))
        .spawn(move || {
            // Reports even if the worker panics (the guard is dropped while unwinding).
            struct Report(u16, mpsc::UnboundedSender<(u16, String)>, String);
            impl Drop for Report {
                fn drop(&mut self) {
                    let why = if std::thread::panicking() {
                        "panicked".to_string()
                    } else {
                        std::mem::take(&mut self.2)
                    };
                    let _ = self.1.send((self.0, why));
                }
            }
            let mut report = Report(index, done, "panicked".into());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            report.2 = match rt {
                Ok(rt) => {
                    match rt.block_on(run(w).instrument(tracing::info_span!("worker", index))) {
                        Ok(()) => "stopped".into(),
                        Err(e) => format!("{e:#}"),
                    }
                }
                Err(e) => format!("cannot start its runtime: {e}"),
            };
        })
}

async fn run(w: Worker) -> anyhow::Result<()> {
    use anyhow::Context;
    let Worker {
        index,
        tun,
        udp,
        shards,
        offload,
        mtu,
        status,
        mut stop,
    } = w;
    let tun = Tun::from_queue(tun).context("registering the TUN queue")?;
    let udp = weft_sys::udp::register_udp(udp).context("registering the UDP socket")?;
    let mut dp = DataPath::new(&tun, &udp, offload);
    dp.start_at(index);
    if index == 0 {
        tracing::info!(offload = ?dp.status, workers = shards.count(), "data path offloads");
    }
    // A TSO super-packet (64 KiB) plus its virtio_net_hdr.
    let mut tun_buf = vec![0u8; 65_536 + weft_sys::tun::VNET_HDR_LEN];
    // With offloads, up to MMSG_MAX messages per recvmmsg, each maybe a UDP_GRO batch of up
    // to 64 KiB; without, one datagram per recvfrom.
    let mut udp_rx = weft_sys::udp_gso::RecvBatch::new(
        if dp.gro() {
            weft_sys::udp_gso::MMSG_MAX
        } else {
            1
        },
        65_600,
    );
    if let Ok(mut s) = status.lock() {
        s.offload = dp.status.clone();
    }
    loop {
        tokio::select! {
            r = tun.recv(&mut tun_buf) => match r {
                Ok(n) => {
                    let now = Instant::now();
                    let mut packets = dp.handle_tun_read(&shards, &tun_buf[..n], mtu, now);
                    // Drain the burst that is already waiting before going back to select.
                    for _ in 1..BURST {
                        if packets >= BURST_PACKETS {
                            break;
                        }
                        match tun.try_recv(&mut tun_buf) {
                            Ok(n) => packets += dp.handle_tun_read(&shards, &tun_buf[..n], mtu, now),
                            Err(_) => break,
                        }
                    }
                    dp.flush(&tun, &udp).await;
                    publish(&status, &dp);
                }
                Err(e) => tracing::warn!(error = %e, "reading the TUN"),
            },
            r = weft_sys::udp_gso::recv_batch(&udp, &mut udp_rx) => match r {
                Ok(_) => {
                    let now = Instant::now();
                    let mut packets = dp.handle_udp_batch(&shards, &udp_rx, now);
                    for _ in 1..BURST {
                        if packets >= BURST_PACKETS {
                            break;
                        }
                        match weft_sys::udp_gso::try_recv_batch(&udp, &mut udp_rx) {
                            Ok(_) => packets += dp.handle_udp_batch(&shards, &udp_rx, now),
                            Err(_) => break,
                        }
                    }
                    dp.flush(&tun, &udp).await;
                    publish(&status, &dp);
                }
                Err(e) => tracing::debug!(error = %e, "reading the UDP socket"),
            },
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    return Ok(());
                }
            },
        }
    }
}

/// Copies the worker's counters out for `meshd status` (no allocation: an uncontended lock
/// and some integers per wake-up).
fn publish(status: &Mutex<WorkerStatus>, dp: &DataPath) {
    if let Ok(mut s) = status.lock() {
        s.tun_packets = dp.tun_packets;
        s.udp_datagrams = dp.udp_datagrams;
        s.shard_switches = dp.shard_switches();
        s.offload.copy_counters(&dp.status);
    }
}

/// The status of all workers: the counters of each, and their offload counters added up (the
/// offloads in force are those of worker 0; UDP GSO counts as on only while every worker has it).
pub fn merged(workers: &[Arc<Mutex<WorkerStatus>>]) -> (Vec<WorkerStatus>, OffloadStatus) {
    let list: Vec<WorkerStatus> = workers
        .iter()
        .map(|w| w.lock().map(|s| s.clone()).unwrap_or_default())
        .collect();
    let mut all = list.first().map(|w| w.offload.clone()).unwrap_or_default();
    for w in list.iter().skip(1) {
        all.add_counters(&w.offload);
    }
    (list, all)
}
