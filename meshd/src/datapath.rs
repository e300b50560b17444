//! The packet I/O between the node state machine and the kernel: TUN reads (TSO/USO
//! super-packets cut into MTU-sized packets), TUN writes (TCP segments coalesced back into
//! super-packets, GRO), UDP sends (datagrams to one peer batched into one `UDP_SEGMENT` send,
//! GSO) and UDP reads (`UDP_GRO` batches cut back into datagrams). With `--offload off`, or where
//! the kernel lacks an offload, each falls back to one packet per system call.

use std::net::SocketAddr;
use std::time::Instant;

use crate::shards::Shards;
use serde::Serialize;
use tokio::net::UdpSocket;
use weft_core::node::{Dispatch, Node, Output};
use weft_core::offload;
use weft_sys::udp_gso;
use weft_sys::Tun;

/// What the offload path did since meshd started (in `meshd status`, `offload`).
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OffloadStatus {
    /// TUN offloads in force (`csum`, `tso4`, `tso6`, `uso4`, `uso6`); `off` without
    /// `IFF_VNET_HDR`; `none` when the kernel took the header but no offload.
    pub tun: String,
    /// `UDP_SEGMENT` in use on the WireGuard socket.
    pub udp_gso: bool,
    /// `UDP_GRO` in use on the WireGuard socket.
    pub udp_gro: bool,
    /// TUN reads that were super-packets (longer than the MTU), and the packets they became.
    pub tun_super_packets: u64,
    pub tun_super_segments: u64,
    /// TUN reads the segmentation refused (malformed or unsupported GSO).
    pub tun_refused: u64,
    /// TUN writes that carried more than one packet, and the packets in them.
    pub tun_coalesced_writes: u64,
    pub tun_coalesced_packets: u64,
    /// UDP sends that carried more than one datagram, and the datagrams in them.
    pub udp_gso_sends: u64,
    pub udp_gso_datagrams: u64,
    /// UDP reads that returned more than one datagram, and the datagrams in them.
    pub udp_gro_reads: u64,
    pub udp_gro_datagrams: u64,
    /// `sendmmsg` calls that sent more than one message, and the messages in them.
    pub udp_mmsg_sends: u64,
    pub udp_mmsg_messages: u64,
    /// `recvmmsg` calls that returned more than one message, and the messages in them.
    pub udp_mmsg_reads: u64,
    pub udp_mmsg_read_messages: u64,
}

/// Applies `$m!(field)` to every counter of [`OffloadStatus`].
macro_rules! offload_counters {
    ($m:ident) => {
        $m!(tun_super_packets);
        $m!(tun_super_segments);
        $m!(tun_refused);
        $m!(tun_coalesced_writes);
        $m!(tun_coalesced_packets);
        $m!(udp_gso_sends);
        $m!(udp_gso_datagrams);
        $m!(udp_gro_reads);
        $m!(udp_gro_datagrams);
        $m!(udp_mmsg_sends);
        $m!(udp_mmsg_messages);
        $m!(udp_mmsg_reads);
        $m!(udp_mmsg_read_messages);
    };
}

impl OffloadStatus {
    /// Takes `o`'s counters and GSO state (not the TUN flags, which never change).
    pub fn copy_counters(&mut self, o: &OffloadStatus) {
        macro_rules! copy {
            ($f:ident) => {
                self.$f = o.$f;
            };
        }
        offload_counters!(copy);
        self.udp_gso = o.udp_gso;
    }

    /// Adds `o`'s counters to these (GSO counts as on only while both have it).
    pub fn add_counters(&mut self, o: &OffloadStatus) {
        macro_rules! add {
            ($f:ident) => {
                self.$f += o.$f;
            };
        }
        offload_counters!(add);
        self.udp_gso &= o.udp_gso;
    }
}

fn tun_flags(flags: Option<u32>) -> String {
    use weft_sys::tun::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_USO4, TUN_F_USO6};
    let Some(flags) = flags else {
        return "off".into();
    };
    let names: Vec<&str> = [
        (TUN_F_CSUM, "csum"),
        (TUN_F_TSO4, "tso4"),
        (TUN_F_TSO6, "tso6"),
        (TUN_F_USO4, "uso4"),
        (TUN_F_USO6, "uso6"),
    ]
    .iter()
    .filter(|(f, _)| flags & f != 0)
    .map(|(_, n)| *n)
    .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(",")
    }
}

/// Datagrams to one destination waiting to go out in one GSO send: all `segment` bytes long
/// except perhaps the last, which closes the batch.
#[derive(Default)]
struct GsoBatch {
    dst: Option<SocketAddr>,
    buf: Vec<u8>,
    segment: usize,
    count: usize,
    closed: bool,
}

impl GsoBatch {
    fn fits(&self, dst: SocketAddr, len: usize) -> bool {
        self.dst == Some(dst)
            && !self.closed
            && len <= self.segment
            && self.count < udp_gso::GSO_MAX_SEGMENTS
            && self.buf.len() + len <= udp_gso::GSO_MAX_BYTES
    }

    fn push(&mut self, dst: SocketAddr, payload: &[u8]) {
        if self.dst.is_none() {
            self.dst = Some(dst);
            self.segment = payload.len();
        }
        self.buf.extend_from_slice(payload);
        self.count += 1;
        if payload.len() < self.segment {
            self.closed = true;
        }
    }

    fn clear(&mut self) {
        self.dst = None;
        self.buf.clear();
        self.segment = 0;
        self.count = 0;
        self.closed = false;
    }
}

/// The offload state of the data path and its reusable buffers (no allocation per packet once
/// they have grown).
pub struct DataPath {
    /// Packets carry a `virtio_net_hdr` on the TUN.
    vnet_hdr: bool,
    gso: bool,
    gro: bool,
    /// The packets one TUN read was cut into.
    segments: offload::PacketBuf,
    /// Decrypted packets of one flush, before coalescing (only with `vnet_hdr`).
    delivers: Vec<Vec<u8>>,
    /// Coalesced frames to write.
    frames: offload::PacketBuf,
    coalescer: offload::Coalescer,
    /// GSO batches waiting to go out together in one `sendmmsg` (the first `used`; later
    /// ones keep their buffers for reuse).
    batches: Vec<GsoBatch>,
    used: usize,
    /// Which shard handles the next packet, and what the shards asked for.
    cursor: ShardCursor,
    /// The UDP socket is IPv6 (dual-stack): destinations are given as IPv4-mapped addresses.
    udp_v6: bool,
    /// Packets read from the TUN (after segmentation) and datagrams from the socket.
    pub tun_packets: u64,
    pub udp_datagrams: u64,
    pub status: OffloadStatus,
}

/// Hands packets to the shard that owns their peer, starting with the shard used last, and
/// collects what the shards ask for.
#[derive(Default)]
struct ShardCursor {
    /// What the shards asked for, taken under their locks, carried out at [`DataPath::flush`].
    outs: Vec<Output>,
    /// Packet buffers done with, handed back to the next shard locked.
    spare: Vec<Vec<u8>>,
    /// The shard locked last (tried first for the next packet).
    shard: u16,
    /// Times a packet had to go to another shard than the one locked.
    switches: u64,
}

impl ShardCursor {
    /// Hands items `0..n` in order to `f` with a locked shard: the shard used last first (a
    /// worker mostly serves the same peers), and whenever the node says an item belongs to
    /// another shard, that shard from then on. Everything the shards ask for is taken into
    /// `outs` under their locks; buffers done with go back to them.
    fn run(&mut self, shards: &Shards, n: usize, mut f: impl FnMut(&mut Node, usize) -> Dispatch) {
        let mut i = 0;
        while i < n {
            let mut node = shards.lock(self.shard);
            for b in self.spare.drain(..) {
                node.recycle(b);
            }
            let mut next = None;
            while i < n {
                match f(&mut node, i) {
                    Dispatch::Shard(k) if k != self.shard && k < shards.count() => {
                        next = Some(k);
                        break;
                    }
                    Dispatch::Shard(k) => {
                        // The owner disowning its own peer would be a bug in the node; skip
                        // the item rather than hand it around for ever.
                        tracing::warn!(shard = k, "packet sent back to its own shard; dropped");
                        i += 1;
                    }
                    Dispatch::Done => i += 1,
                }
            }
            while let Some(o) = node.poll_output() {
                self.outs.push(o);
            }
            drop(node);
            match next {
                Some(k) => {
                    self.shard = k;
                    self.switches += 1;
                }
                None => break,
            }
        }
    }
}

impl DataPath {
    /// The data path for `tun` and `udp`; with `offload`, turns on `UDP_GRO` and uses
    /// `UDP_SEGMENT` where the kernel has them.
    pub fn new(tun: &Tun, udp: &UdpSocket, offload: bool) -> Self {
        let gso = offload && udp_gso::gso_supported(udp);
        let gro = offload && udp_gso::enable_gro(udp);
        DataPath {
            vnet_hdr: tun.offloads().is_some(),
            gso,
            gro,
            segments: offload::PacketBuf::new(),
            delivers: Vec::new(),
            frames: offload::PacketBuf::new(),
            // UDP datagrams are coalesced only into a TUN that accepts USO.
            // Decrypted packets passed the AEAD check: their checksums need no second look.
            coalescer: offload::Coalescer::new().trust_checksums(true).with_udp(
                tun.offloads()
                    .is_some_and(|f| f & weft_sys::tun::TUN_F_USO4 != 0),
            ),
            batches: Vec::new(),
            used: 0,
            cursor: ShardCursor::default(),
            udp_v6: weft_sys::udp::socket_is_v6(udp).unwrap_or(false),
            tun_packets: 0,
            udp_datagrams: 0,
            status: OffloadStatus {
                tun: tun_flags(tun.offloads()),
                udp_gso: gso,
                udp_gro: gro,
                ..OffloadStatus::default()
            },
        }
    }

    /// Starts with shard `i` (a worker's own).
    pub fn start_at(&mut self, i: u16) {
        self.cursor.shard = i;
    }

    /// Times a packet belonged to another shard than the one locked.
    pub fn shard_switches(&self) -> u64 {
        self.cursor.switches
    }

    /// Whether UDP reads go through `recvmmsg` with `UDP_GRO` (else one `recvfrom` each).
    pub fn gro(&self) -> bool {
        self.gro
    }

    /// One read from the TUN: a plain packet, or (with offloads) a `virtio_net_hdr` and a packet
    /// that may be a TSO/USO super-packet, cut into packets of at most `mtu` bytes first. Each
    /// packet is encrypted in the shard that owns its peer. Returns the number of packets.
    pub fn handle_tun_read(
        &mut self,
        shards: &Shards,
        frame: &[u8],
        mtu: usize,
        now: Instant,
    ) -> usize {
        if !self.vnet_hdr {
            self.cursor
                .run(shards, 1, |node, _| node.handle_tun(frame, now));
            self.tun_packets += 1;
            return 1;
        }
        self.segments.clear();
        if let Err(e) = offload::segment(frame, mtu, &mut self.segments) {
            self.status.tun_refused += 1;
            self.tun_packets += 1;
            tracing::debug!(error = %e, "TUN packet refused by segmentation");
            return 1;
        }
        let n = self.segments.len();
        if n > 1 {
            self.status.tun_super_packets += 1;
            self.status.tun_super_segments += n as u64;
        }
        let segments = &self.segments;
        self.cursor.run(shards, n, |node, i| match segments.get(i) {
            Some(p) => node.handle_tun(p, now),
            None => Dispatch::Done,
        });
        self.tun_packets += n as u64;
        n
    }

    /// The messages of one UDP read (see [`DataPath::handle_udp_read`] for each). Returns the
    /// number of datagrams.
    pub fn handle_udp_batch(
        &mut self,
        shards: &Shards,
        batch: &udp_gso::RecvBatch,
        now: Instant,
    ) -> usize {
        let mut datagrams = 0;
        if batch.len() > 1 {
            self.status.udp_mmsg_reads += 1;
            self.status.udp_mmsg_read_messages += batch.len() as u64;
        }
        for i in 0..batch.len() {
            if let Some((buf, from, segment)) = batch.get(i) {
                datagrams += self.handle_udp_read(shards, buf, from, segment, now);
            }
        }
        datagrams
    }

    /// One UDP read of `buf` from `from`: `segment`-byte datagrams (the last may be shorter)
    /// when `UDP_GRO` coalesced them. Each is decrypted in the shard that owns its peer.
    /// Returns the number of datagrams.
    pub fn handle_udp_read(
        &mut self,
        shards: &Shards,
        buf: &[u8],
        from: SocketAddr,
        segment: usize,
        now: Instant,
    ) -> usize {
        let from = weft_sys::canonical(from);
        if segment == 0 || segment >= buf.len() {
            self.cursor
                .run(shards, 1, |node, _| node.handle_udp(from, buf, now));
            self.udp_datagrams += 1;
            return 1;
        }
        let n = buf.len().div_ceil(segment);
        self.udp_datagrams += n as u64;
        self.cursor.run(shards, n, |node, i| {
            let start = i * segment;
            let end = (start + segment).min(buf.len());
            node.handle_udp(from, &buf[start..end], now)
        });
        self.status.udp_gro_reads += 1;
        self.status.udp_gro_datagrams += n as u64;
        n
    }

    /// Carries out what the shards asked for since the last flush: datagrams to one peer go
    /// out in GSO batches, decrypted packets are coalesced before they are written to the TUN.
    pub async fn flush(&mut self, tun: &Tun, udp: &UdpSocket) {
        let mut outs = std::mem::take(&mut self.cursor.outs);
        for o in outs.drain(..) {
            match o {
                Output::Transmit { dst, payload } => {
                    let to = weft_sys::to_socket_family(dst, self.udp_v6);
                    self.transmit(udp, to, &payload).await;
                    self.cursor.spare.push(payload);
                }
                Output::Deliver(p) => {
                    if let Some(p) = self.deliver(tun, p).await {
                        self.cursor.spare.push(p);
                    }
                }
            }
        }
        self.cursor.outs = outs;
        self.finish(tun, udp).await;
    }

    /// A datagram the node wants sent: joins the last batch for `dst` if it fits, else starts
    /// a new one (all go out at [`DataPath::finish`], or when [`udp_gso::MMSG_MAX`] batches
    /// are waiting, in one `sendmmsg`); without GSO it goes out at once. A destination's
    /// datagrams stay in order: they only ever join its last batch.
    async fn transmit(&mut self, udp: &UdpSocket, dst: SocketAddr, payload: &[u8]) {
        if !self.gso {
            send_one(udp, dst, payload).await;
            return;
        }
        let last = (0..self.used)
            .rev()
            .find(|&i| self.batches[i].dst == Some(dst));
        if let Some(i) = last.filter(|&i| self.batches[i].fits(dst, payload.len())) {
            self.batches[i].push(dst, payload);
            return;
        }
        if self.used == udp_gso::MMSG_MAX {
            self.send_batches(udp).await;
        }
        if self.batches.len() == self.used {
            self.batches.push(GsoBatch::default());
        }
        self.batches[self.used].push(dst, payload);
        self.used += 1;
    }

    /// A decrypted packet for the TUN: written at once, or (with offloads) kept for
    /// coalescing at [`DataPath::finish`].
    async fn deliver(&mut self, tun: &Tun, packet: Vec<u8>) -> Option<Vec<u8>> {
        if self.vnet_hdr {
            self.delivers.push(packet);
            return None;
        }
        write_tun(tun, &packet).await;
        Some(packet)
    }

    /// Sends what is batched and writes what is waiting for the TUN; every packet buffer goes
    /// back to the spares once its bytes are written.
    async fn finish(&mut self, tun: &Tun, udp: &UdpSocket) {
        self.send_batches(udp).await;
        if self.delivers.is_empty() {
            return;
        }
        self.frames.clear();
        self.coalescer.coalesce(&self.delivers, &mut self.frames);
        let hdr = offload::VIRTIO_NET_HDR_LEN;
        for f in self.frames.iter() {
            write_tun(tun, f).await;
            if let Ok((h, _)) = offload::VirtioNetHdr::split(f) {
                if h.gso_size > 0 && f.len() > hdr {
                    self.status.tun_coalesced_writes += 1;
                    let payload = (f.len() - hdr).saturating_sub(h.hdr_len as usize);
                    self.status.tun_coalesced_packets +=
                        payload.div_ceil(usize::from(h.gso_size).max(1)) as u64;
                }
            }
        }
        self.cursor.spare.append(&mut self.delivers);
    }

    /// Sends the waiting batches with `sendmmsg` (as many calls as the kernel needs), each
    /// batch one `UDP_SEGMENT` message. If the path refuses GSO, turns it off and sends the
    /// datagrams of the refused batch and all later ones one by one.
    async fn send_batches(&mut self, udp: &UdpSocket) {
        let used = std::mem::take(&mut self.used);
        let mut start = 0;
        while start < used {
            if !self.gso {
                let b = &self.batches[start];
                if let Some(dst) = b.dst {
                    for d in b.buf.chunks(b.segment.max(1)) {
                        send_one(udp, dst, d).await;
                    }
                }
                start += 1;
                continue;
            }
            let msgs: [udp_gso::SendMsg<'_>; udp_gso::MMSG_MAX] = std::array::from_fn(|i| {
                let b = self.batches.get(start + i).filter(|_| start + i < used);
                udp_gso::SendMsg {
                    dst: b
                        .and_then(|b| b.dst)
                        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
                    buf: b.map(|b| b.buf.as_slice()).unwrap_or(&[]),
                    segment: b.map(|b| b.segment).unwrap_or(0),
                }
            });
            let msgs = &msgs[..(used - start).min(udp_gso::MMSG_MAX)];
            let r = match udp_gso::try_send_batch(udp, msgs) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    udp_gso::send_batch(udp, msgs).await
                }
                r => r,
            };
            match r {
                Ok(sent) => {
                    let sent = sent.clamp(1, msgs.len());
                    if sent > 1 {
                        self.status.udp_mmsg_sends += 1;
                        self.status.udp_mmsg_messages += sent as u64;
                    }
                    for b in &self.batches[start..start + sent] {
                        if b.count > 1 {
                            self.status.udp_gso_sends += 1;
                            self.status.udp_gso_datagrams += b.count as u64;
                        }
                    }
                    start += sent;
                }
                Err(e) if udp_gso::is_gso_unsupported(&e) && self.batches[start].count > 1 => {
                    let dst = msgs[0].dst;
                    tracing::info!(error = %e, %dst, "UDP GSO refused on this path; sending datagrams one by one from now on");
                    self.gso = false;
                    self.status.udp_gso = false;
                }
                Err(e) => {
                    tracing::debug!(error = %e, dst = %msgs[0].dst, "UDP send");
                    start += 1;
                }
            }
        }
        for b in &mut self.batches[..used] {
            b.clear();
        }
    }
}

async fn send_one(udp: &UdpSocket, dst: SocketAddr, payload: &[u8]) {
    let r = match udp.try_send_to(payload, dst) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => udp.send_to(payload, dst).await,
        r => r,
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, %dst, "UDP send");
    }
}

async fn write_tun(tun: &Tun, frame: &[u8]) {
    let r = match tun.try_send(frame) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => tun.send(frame).await,
        r => r,
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, "TUN write");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn dst(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    #[test]
    fn batch_takes_equal_datagrams_and_one_shorter_tail() {
        let mut b = GsoBatch::default();
        b.push(dst(1), &[1; 100]);
        assert!(b.fits(dst(1), 100));
        assert!(!b.fits(dst(2), 100), "another destination");
        assert!(!b.fits(dst(1), 101), "longer than the segment");
        b.push(dst(1), &[2; 100]);
        assert!(b.fits(dst(1), 40));
        b.push(dst(1), &[3; 40]);
        assert!(!b.fits(dst(1), 40), "a short datagram closes the batch");
        assert_eq!(b.count, 3);
        assert_eq!(b.buf.len(), 240);
        b.clear();
        assert!(!b.fits(dst(1), 100));
        b.push(dst(1), &[1; 100]);
        assert_eq!(b.segment, 100);
    }

    #[test]
    fn batch_stays_within_the_kernel_limits() {
        let mut b = GsoBatch::default();
        for _ in 0..udp_gso::GSO_MAX_SEGMENTS {
            assert!(b.dst.is_none() || b.fits(dst(1), 100));
            b.push(dst(1), &[0; 100]);
        }
        assert!(!b.fits(dst(1), 100), "segment count limit");
        let mut b = GsoBatch::default();
        while b.buf.len() + 1500 <= udp_gso::GSO_MAX_BYTES {
            b.push(dst(1), &[0; 1500]);
        }
        assert!(!b.fits(dst(1), 1500), "byte limit");
        assert!(b.buf.len() <= udp_gso::GSO_MAX_BYTES);
    }

    #[test]
    fn tun_flag_names() {
        use weft_sys::tun::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
        assert_eq!(tun_flags(None), "off");
        assert_eq!(tun_flags(Some(0)), "none");
        assert_eq!(
            tun_flags(Some(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)),
            "csum,tso4,tso6"
        );
    }
}
