//! TUN offload (`IFF_VNET_HDR` + `TUNSETOFFLOAD`): splitting the kernel's super-packets into
//! MTU-sized IP packets (TSO/USO) and merging received TCP segments back into super-packets (GRO).
//!
//! In, on the send path: one frame read from the TUN, a 10-byte [`VirtioNetHdr`] followed by an
//! IP packet of up to 64 KiB. Out: [`segment`] appends MTU-sized IPv4/IPv6 packets, each with a
//! correct IPv4 header checksum, TCP/UDP checksum, IPv4 ID (incremented per segment), TCP sequence
//! number and flags (FIN/PSH only on the last segment, CWR only on the first), to a caller-owned
//! [`PacketBuf`]. A frame without GSO but with [`VIRTIO_NET_HDR_F_NEEDS_CSUM`] gets its checksum
//! completed ([`complete_checksum`] does that in place).
//!
//! In, on the receive path: a batch of decrypted IP packets in arrival order. Out: the
//! [`Coalescer`] appends TUN frames to a [`PacketBuf`], each a [`VirtioNetHdr`] followed by an IP
//! packet: consecutive TCP segments of one flow that Linux GRO would merge become one
//! super-packet (`GSO_TCPV4`/`GSO_TCPV6`, `NEEDS_CSUM`, the pseudo-header sum in the TCP checksum
//! field); every other packet passes through unchanged behind an all-zero header. Order within a
//! flow is preserved.
//!
//! The header's integers are little-endian: meshd sets `TUNSETVNETLE` (a no-op on little-endian
//! hosts). Malformed input is an [`OffloadError`], never a panic. Checksums are RFC 1071
//! one's-complement sums ([`checksum`]), computed in software over 64-bit words.

use std::collections::HashMap;

/// Length of `struct virtio_net_hdr` (without `num_buffers`).
pub const VIRTIO_NET_HDR_LEN: usize = 10;
/// `flags`: the checksum from `csum_start` to the end must be completed and stored at
/// `csum_start + csum_offset`; the field holds the pseudo-header sum.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum has been validated.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// `gso_type`: not a GSO packet.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv4 (TSO4).
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// `gso_type`: UDP fragmentation offload (UFO): refused by [`segment`].
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
/// `gso_type`: TCP over IPv6 (TSO6).
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// `gso_type`: UDP segmentation over IPv4 or IPv6 (USO).
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
/// `gso_type` bit: the TCP super-packet carries CWR (only the first segment keeps it).
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// Largest IP packet a [`Coalescer`] builds (the IPv4 total length limit).
pub const MAX_SUPER_PACKET: usize = 65535;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_URG: u8 = 0x20;
const TCP_CWR: u8 = 0x80;
/// TCP checksum offset within the TCP header.
const TCP_CSUM_OFFSET: usize = 16;
/// UDP checksum offset within the UDP header.
const UDP_CSUM_OFFSET: usize = 6;

/// Why a virtio header or packet was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("virtio_net_hdr needs {VIRTIO_NET_HDR_LEN} bytes, got {0}")]
    ShortHeader(usize),
    #[error("unknown virtio_net_hdr flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("unknown virtio_net_hdr gso_type {0:#04x}")]
    UnknownGsoType(u8),
    #[error("unsupported gso_type {0:#04x} (UFO, or ECN without TCP)")]
    UnsupportedGsoType(u8),
    #[error("gso_size is 0 in a GSO packet")]
    ZeroGsoSize,
    #[error("hdr_len {hdr_len} exceeds the packet length {len}")]
    HdrLen { hdr_len: u16, len: usize },
    #[error("checksum at csum_start {start} + csum_offset {offset} lies outside the {len}-byte packet or is misaligned")]
    ChecksumOutOfBounds { start: u16, offset: u16, len: usize },
    #[error("csum_start/csum_offset {start}/{offset} do not point at the transport checksum ({expected_start}/{expected_offset})")]
    ChecksumMismatch {
        start: u16,
        offset: u16,
        expected_start: usize,
        expected_offset: usize,
    },
    #[error("complete_checksum was given a GSO packet; use segment")]
    GsoPacket,
    #[error("not an IPv4 or IPv6 packet (version nibble {0})")]
    IpVersion(u8),
    #[error("gso_type {gso_type:#04x} does not match IP version {version}")]
    GsoIpMismatch { gso_type: u8, version: u8 },
    #[error("truncated {0} header")]
    Truncated(&'static str),
    #[error("IPv4 header length {0} bytes is invalid")]
    Ipv4HeaderLength(usize),
    #[error("IP length field says {field} bytes, the packet has {len}")]
    IpLength { field: usize, len: usize },
    #[error("IPv4 fragments cannot be segmented")]
    Fragment,
    #[error("IPv6 next header {0} is an extension header (not supported)")]
    Ipv6ExtensionHeader(u8),
    #[error("IP protocol {proto} does not match gso_type (expected {expected})")]
    Protocol { proto: u8, expected: u8 },
    #[error("TCP data offset {0} (32-bit words) is invalid")]
    TcpDataOffset(u8),
    #[error("TCP SYN or RST in a GSO packet")]
    TcpFlags,
    #[error("UDP length field says {field} bytes, the datagram has {len}")]
    UdpLength { field: usize, len: usize },
    #[error("a {size}-byte segment exceeds the bound of {max} bytes")]
    SegmentTooLarge { size: usize, max: usize },
}

/// `struct virtio_net_hdr`: what precedes every packet on a TUN opened with `IFF_VNET_HDR`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    /// Length of the headers (IP + transport). The kernel may report more (its linear length),
    /// so [`segment`] treats it as advisory: it must not exceed the packet, the real header
    /// length is parsed from the packet.
    pub hdr_len: u16,
    /// Payload bytes per segment (TCP MSS, or UDP datagram payload for USO).
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// Decodes the first [`VIRTIO_NET_HDR_LEN`] bytes of `bytes`; refuses unknown flags and GSO
    /// types.
    pub fn decode(bytes: &[u8]) -> Result<Self, OffloadError> {
        let b = bytes
            .get(..VIRTIO_NET_HDR_LEN)
            .ok_or(OffloadError::ShortHeader(bytes.len()))?;
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let hdr = VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        };
        if hdr.flags & !(VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) != 0 {
            return Err(OffloadError::UnknownFlags(hdr.flags));
        }
        match hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE
            | VIRTIO_NET_HDR_GSO_TCPV4
            | VIRTIO_NET_HDR_GSO_UDP
            | VIRTIO_NET_HDR_GSO_TCPV6
            | VIRTIO_NET_HDR_GSO_UDP_L4 => Ok(hdr),
            _ => Err(OffloadError::UnknownGsoType(hdr.gso_type)),
        }
    }

    /// Splits a TUN frame into its header and the IP packet behind it.
    pub fn split(frame: &[u8]) -> Result<(Self, &[u8]), OffloadError> {
        let hdr = Self::decode(frame)?;
        Ok((hdr, frame.get(VIRTIO_NET_HDR_LEN..).unwrap_or_default()))
    }

    /// The header's wire form.
    pub fn encode(&self) -> [u8; VIRTIO_NET_HDR_LEN] {
        let mut b = [0u8; VIRTIO_NET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    fn needs_csum(&self) -> bool {
        self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
    }
}

/// Packets in one contiguous, reusable buffer: appending never allocates once the buffer has
/// grown to the working size.
#[derive(Debug, Clone, Default)]
pub struct PacketBuf {
    data: Vec<u8>,
    bounds: Vec<(usize, usize)>,
}

impl PacketBuf {
    pub fn new() -> Self {
        Self::default()
    }

    /// A buffer that holds `packets` packets of `bytes` bytes in total without growing.
    pub fn with_capacity(bytes: usize, packets: usize) -> Self {
        PacketBuf {
            data: Vec::with_capacity(bytes),
            bounds: Vec::with_capacity(packets),
        }
    }

    /// Forgets the packets, keeps the memory.
    pub fn clear(&mut self) {
        self.data.clear();
        self.bounds.clear();
    }

    pub fn len(&self) -> usize {
        self.bounds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bounds.is_empty()
    }

    /// Total bytes of all packets.
    pub fn total_bytes(&self) -> usize {
        self.data.len()
    }

    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let &(start, end) = self.bounds.get(i)?;
        self.data.get(start..end)
    }

    pub fn get_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        let &(start, end) = self.bounds.get(i)?;
        self.data.get_mut(start..end)
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        self.bounds.iter().map(|&(s, e)| &self.data[s..e])
    }

    /// Appends a copy of `packet`.
    pub fn push(&mut self, packet: &[u8]) {
        let start = self.start();
        self.extend(packet);
        self.finish(start);
    }

    fn start(&mut self) -> usize {
        self.data.len()
    }

    fn extend(&mut self, bytes: &[u8]) {
        self.data.extend_from_slice(bytes);
    }

    fn finish(&mut self, start: usize) -> &mut [u8] {
        let end = self.data.len();
        self.bounds.push((start, end));
        &mut self.data[start..end]
    }
}

// ---------------------------------------------------------------------------------------------
// Checksums
// ---------------------------------------------------------------------------------------------

/// RFC 1071 one's-complement sum of `data` read as big-endian 16-bit words (an odd last byte is
/// padded with a zero byte), plus `initial`, folded to 16 bits and *not* complemented. The
/// Internet checksum of `data` is `!checksum(data, 0)`; a packet with a correct checksum sums to
/// `0xffff`.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    fold(u64::from(initial) + u64::from(u16::from_be(sum_native(data))))
}

/// One's-complement sum of `data` read as native-endian words: byte order commutes with
/// one's-complement addition, so the big-endian sum is this one byte-swapped on little-endian
/// hosts. Eight bytes per step, split into 32-bit halves so the adds need no carry handling and
/// vectorise.
fn sum_native(data: &[u8]) -> u16 {
    let mut total: u64 = 0;
    // 1 MiB blocks: 2^17 steps of at most 2^33 cannot overflow the accumulator.
    for block in data.chunks(1 << 20) {
        let mut acc: u64 = 0;
        let mut words = block.chunks_exact(8);
        for w in &mut words {
            let v = u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
            acc += (v & 0xffff_ffff) + (v >> 32);
        }
        let rest = words.remainder();
        let mut tail = [0u8; 8];
        tail[..rest.len()].copy_from_slice(rest);
        let v = u64::from_ne_bytes(tail);
        acc += (v & 0xffff_ffff) + (v >> 32);
        total += u64::from(fold(acc));
    }
    fold(total)
}

fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The pseudo-header sum (addresses, protocol, upper-layer length) of an IPv4 (`v6 == false`)
/// or IPv6 packet whose fixed header starts `ip`.
fn pseudo_header_sum(ip: &[u8], v6: bool, proto: u8, l4_len: usize) -> u32 {
    let addrs = if v6 { &ip[8..40] } else { &ip[12..20] };
    let len = l4_len as u32;
    u32::from(checksum(addrs, 0)) + u32::from(proto) + (len >> 16) + (len & 0xffff)
}

fn be16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

fn be32(p: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

fn put16(p: &mut [u8], at: usize, v: u16) {
    p[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Recomputes the IPv4 header checksum of the `ihl`-byte header at the start of `p`.
fn set_ipv4_checksum(p: &mut [u8], ihl: usize) {
    put16(p, 10, 0);
    let c = !checksum(&p[..ihl], 0);
    put16(p, 10, c);
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// The IP layer of a packet whose length fields match its buffer exactly.
#[derive(Debug, Clone, Copy)]
struct Ip {
    v6: bool,
    /// Header length: IHL * 4, or 40.
    hl: usize,
    proto: u8,
}

fn is_ipv6_extension(nh: u8) -> bool {
    matches!(nh, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

fn parse_ip(p: &[u8]) -> Result<Ip, OffloadError> {
    let first = *p.first().ok_or(OffloadError::Truncated("IP"))?;
    match first >> 4 {
        4 => {
            if p.len() < 20 {
                return Err(OffloadError::Truncated("IPv4"));
            }
            let hl = usize::from(first & 0x0f) * 4;
            if hl < 20 {
                return Err(OffloadError::Ipv4HeaderLength(hl));
            }
            if hl > p.len() {
                return Err(OffloadError::Truncated("IPv4 options"));
            }
            let total = usize::from(be16(p, 2));
            if total != p.len() {
                return Err(OffloadError::IpLength {
                    field: total,
                    len: p.len(),
                });
            }
            if be16(p, 6) & 0x3fff != 0 {
                return Err(OffloadError::Fragment);
            }
            Ok(Ip {
                v6: false,
                hl,
                proto: p[9],
            })
        }
        6 => {
            if p.len() < 40 {
                return Err(OffloadError::Truncated("IPv6"));
            }
            let total = 40 + usize::from(be16(p, 4));
            if total != p.len() {
                return Err(OffloadError::IpLength {
                    field: total,
                    len: p.len(),
                });
            }
            Ok(Ip {
                v6: true,
                hl: 40,
                proto: p[6],
            })
        }
        v => Err(OffloadError::IpVersion(v)),
    }
}

/// The transport header length of the TCP header at `p[ip.hl..]`.
fn parse_tcp_len(p: &[u8], ip: &Ip) -> Result<usize, OffloadError> {
    if p.len() < ip.hl + 20 {
        return Err(OffloadError::Truncated("TCP"));
    }
    let doff = p[ip.hl + 12] >> 4;
    if doff < 5 {
        return Err(OffloadError::TcpDataOffset(doff));
    }
    let thl = usize::from(doff) * 4;
    if p.len() < ip.hl + thl {
        return Err(OffloadError::Truncated("TCP options"));
    }
    Ok(thl)
}

// ---------------------------------------------------------------------------------------------
// Send path: segmentation and checksum completion
// ---------------------------------------------------------------------------------------------

fn check_hdr_len(hdr: &VirtioNetHdr, len: usize) -> Result<(), OffloadError> {
    if usize::from(hdr.hdr_len) > len {
        return Err(OffloadError::HdrLen {
            hdr_len: hdr.hdr_len,
            len,
        });
    }
    Ok(())
}

/// Where the checksum of a NEEDS_CSUM packet goes, if `csum_start`/`csum_offset` are in bounds
/// and the field is 16-bit aligned relative to `csum_start`.
fn csum_field(hdr: &VirtioNetHdr, len: usize) -> Result<(usize, usize), OffloadError> {
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > len || hdr.csum_offset & 1 != 0 {
        return Err(OffloadError::ChecksumOutOfBounds {
            start: hdr.csum_start,
            offset: hdr.csum_offset,
            len,
        });
    }
    Ok((start, at))
}

/// Completes the checksum of a packet that is not GSO but has `NEEDS_CSUM`, in place, as the
/// kernel's `skb_checksum_help` does: the one's-complement sum from `csum_start` to the end (the
/// field holds the pseudo-header sum) is complemented and stored at `csum_start + csum_offset`
/// (0 becomes 0xffff). Without `NEEDS_CSUM` nothing changes. On error `packet` is unchanged.
pub fn complete_checksum(hdr: &VirtioNetHdr, packet: &mut [u8]) -> Result<(), OffloadError> {
    if hdr.gso_type != VIRTIO_NET_HDR_GSO_NONE {
        return Err(OffloadError::GsoPacket);
    }
    check_hdr_len(hdr, packet.len())?;
    if !hdr.needs_csum() {
        return Ok(());
    }
    let (start, at) = csum_field(hdr, packet.len())?;
    let sum = !checksum(&packet[start..], 0);
    put16(packet, at, if sum == 0 { 0xffff } else { sum });
    Ok(())
}

/// [`segment_packet`] on a frame read from the TUN: [`VirtioNetHdr`] then the IP packet.
pub fn segment(frame: &[u8], max_len: usize, out: &mut PacketBuf) -> Result<(), OffloadError> {
    let (hdr, packet) = VirtioNetHdr::split(frame)?;
    segment_packet(&hdr, packet, max_len, out)
}

/// Appends to `out` the IP packets that `packet` (described by `hdr`) stands for, none longer
/// than `max_len` bytes (the MTU):
///
/// - no GSO: `packet` itself, its checksum completed if `NEEDS_CSUM` (see
///   [`complete_checksum`]); the packet is not otherwise inspected.
/// - `GSO_TCPV4`/`GSO_TCPV6`: TCP segments of `gso_size` payload bytes (the last may be
///   shorter) with the headers (IPv4 options and TCP options included) copied, IPv4 total
///   length, ID (+1 per segment) and header checksum, IPv6 payload length, TCP sequence number,
///   flags (FIN/PSH on the last, CWR on the first segment only) and checksum set.
/// - `GSO_UDP_L4`: UDP datagrams of `gso_size` payload bytes with length and checksum set.
///
/// A GSO packet whose payload fits one segment becomes one packet. Refused: UFO, IPv6 extension
/// headers, IPv4 fragments, length fields that disagree with the buffer, `csum_start`/
/// `csum_offset` that do not point at the transport checksum, SYN or RST with TSO, and a segment
/// longer than `max_len` (segments are never re-sized: UDP datagram boundaries are the
/// sender's). On error `out` is unchanged.
pub fn segment_packet(
    hdr: &VirtioNetHdr,
    packet: &[u8],
    max_len: usize,
    out: &mut PacketBuf,
) -> Result<(), OffloadError> {
    check_hdr_len(hdr, packet.len())?;
    let gso = hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN;
    if gso == VIRTIO_NET_HDR_GSO_NONE {
        if hdr.gso_type != VIRTIO_NET_HDR_GSO_NONE {
            return Err(OffloadError::UnsupportedGsoType(hdr.gso_type));
        }
        if packet.len() > max_len {
            return Err(OffloadError::SegmentTooLarge {
                size: packet.len(),
                max: max_len,
            });
        }
        if hdr.needs_csum() {
            csum_field(hdr, packet.len())?;
        }
        let start = out.start();
        out.extend(packet);
        let copy = out.finish(start);
        return complete_checksum(hdr, copy);
    }
    let (tcp, expected_proto) = match gso {
        VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_TCPV6 => (true, PROTO_TCP),
        VIRTIO_NET_HDR_GSO_UDP_L4 if hdr.gso_type & VIRTIO_NET_HDR_GSO_ECN == 0 => {
            (false, PROTO_UDP)
        }
        _ => return Err(OffloadError::UnsupportedGsoType(hdr.gso_type)),
    };
    if hdr.gso_size == 0 {
        return Err(OffloadError::ZeroGsoSize);
    }
    let ip = parse_ip(packet)?;
    let version_ok = match gso {
        VIRTIO_NET_HDR_GSO_TCPV4 => !ip.v6,
        VIRTIO_NET_HDR_GSO_TCPV6 => ip.v6,
        _ => true,
    };
    if !version_ok {
        return Err(OffloadError::GsoIpMismatch {
            gso_type: hdr.gso_type,
            version: if ip.v6 { 6 } else { 4 },
        });
    }
    if ip.proto != expected_proto {
        if ip.v6 && is_ipv6_extension(ip.proto) {
            return Err(OffloadError::Ipv6ExtensionHeader(ip.proto));
        }
        return Err(OffloadError::Protocol {
            proto: ip.proto,
            expected: expected_proto,
        });
    }
    let (l4_len, csum_offset) = if tcp {
        let thl = parse_tcp_len(packet, &ip)?;
        if packet[ip.hl + 13] & (TCP_SYN | TCP_RST) != 0 {
            return Err(OffloadError::TcpFlags);
        }
        (thl, TCP_CSUM_OFFSET)
    } else {
        if packet.len() < ip.hl + 8 {
            return Err(OffloadError::Truncated("UDP"));
        }
        let field = usize::from(be16(packet, ip.hl + 4));
        if field != packet.len() - ip.hl {
            return Err(OffloadError::UdpLength {
                field,
                len: packet.len() - ip.hl,
            });
        }
        (8, UDP_CSUM_OFFSET)
    };
    if hdr.needs_csum()
        && (usize::from(hdr.csum_start) != ip.hl || usize::from(hdr.csum_offset) != csum_offset)
    {
        return Err(OffloadError::ChecksumMismatch {
            start: hdr.csum_start,
            offset: hdr.csum_offset,
            expected_start: ip.hl,
            expected_offset: csum_offset,
        });
    }
    let hdrs = ip.hl + l4_len;
    let (headers, payload) = packet.split_at(hdrs);
    let mss = usize::from(hdr.gso_size);
    let largest = hdrs + payload.len().min(mss);
    if largest > max_len {
        return Err(OffloadError::SegmentTooLarge {
            size: largest,
            max: max_len,
        });
    }

    let count = payload.len().div_ceil(mss).max(1);
    out.data.reserve(count * hdrs + payload.len());
    out.bounds.reserve(count);
    let ip_id = if ip.v6 { 0 } else { be16(headers, 4) };
    let seq = if tcp { be32(headers, ip.hl + 4) } else { 0 };
    let flags = if tcp { headers[ip.hl + 13] } else { 0 };
    // The address part of the pseudo-header is the same for every segment.
    let addr_sum = pseudo_header_sum(headers, ip.v6, expected_proto, 0);
    for i in 0..count {
        let chunk = payload
            .get(i * mss..((i + 1) * mss).min(payload.len()))
            .unwrap_or_default();
        let start = out.start();
        out.extend(headers);
        out.extend(chunk);
        let seg = out.finish(start);
        let seg_len = seg.len();
        let l4_total = seg_len - ip.hl;
        if ip.v6 {
            put16(seg, 4, l4_total as u16);
        } else {
            put16(seg, 2, seg_len as u16);
            put16(seg, 4, ip_id.wrapping_add(i as u16));
            set_ipv4_checksum(seg, ip.hl);
        }
        let l4 = &mut seg[ip.hl..];
        if tcp {
            l4[4..8].copy_from_slice(&seq.wrapping_add((i * mss) as u32).to_be_bytes());
            let mut f = flags;
            if i + 1 != count {
                f &= !(TCP_FIN | TCP_PSH);
            }
            if i != 0 {
                f &= !TCP_CWR;
            }
            l4[13] = f;
        } else {
            put16(l4, 4, l4_total as u16);
        }
        put16(l4, csum_offset, 0);
        let pseudo = addr_sum + (l4_total as u32 >> 16) + (l4_total as u32 & 0xffff);
        let mut c = !checksum(l4, pseudo);
        if !tcp && c == 0 {
            c = 0xffff;
        }
        put16(l4, csum_offset, c);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Receive path: GRO
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    v6: bool,
    /// `PROTO_TCP` or `PROTO_UDP`.
    proto: u8,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
}

/// A TCP packet (or, with `thl` 8 and no sequence number or flags, a UDP datagram) as the
/// coalescer sees it.
#[derive(Debug, Clone, Copy)]
struct TcpSeg {
    key: FlowKey,
    ip: Ip,
    thl: usize,
    payload: usize,
    seq: u32,
    flags: u8,
    /// Checksums verified, no IPv4 options: may take part in a merge.
    eligible: bool,
}

/// The flow of a TCP or UDP packet (addresses, ports, protocol) whose IP layer is `ip` and
/// whose first 4 transport bytes (the ports) are present.
fn flow_key(p: &[u8], ip: &Ip) -> FlowKey {
    let mut key = FlowKey {
        v6: ip.v6,
        proto: ip.proto,
        src: [0; 16],
        dst: [0; 16],
        sport: be16(p, ip.hl),
        dport: be16(p, ip.hl + 2),
    };
    if ip.v6 {
        key.src.copy_from_slice(&p[8..24]);
        key.dst.copy_from_slice(&p[24..40]);
    } else {
        key.src[..4].copy_from_slice(&p[12..16]);
        key.dst[..4].copy_from_slice(&p[16..20]);
    }
    key
}

/// Parses a TCP packet with exact length fields; `None` for anything else (and for IPv4
/// fragments and IPv6 extension headers).
fn parse_tcp_seg(p: &[u8], verify: bool) -> Option<TcpSeg> {
    let ip = parse_ip(p).ok()?;
    if ip.proto != PROTO_TCP {
        return None;
    }
    let thl = parse_tcp_len(p, &ip).ok()?;
    let key = flow_key(p, &ip);
    let l4_len = p.len() - ip.hl;
    let eligible = (ip.v6 || (ip.hl == 20 && checksum(&p[..20], 0) == 0xffff))
        && (!verify
            || checksum(&p[ip.hl..], pseudo_header_sum(p, ip.v6, PROTO_TCP, l4_len)) == 0xffff);
    Some(TcpSeg {
        key,
        ip,
        thl,
        payload: l4_len - thl,
        seq: be32(p, ip.hl + 4),
        flags: p[ip.hl + 13],
        eligible,
    })
}

/// Parses a UDP datagram with exact length fields and a checksum that is present and valid;
/// `None` for anything else. Such datagrams may be coalesced into a USO super-packet.
fn parse_udp_seg(p: &[u8], verify: bool) -> Option<TcpSeg> {
    let ip = parse_ip(p).ok()?;
    if ip.proto != PROTO_UDP || p.len() < ip.hl + 8 {
        return None;
    }
    let l4_len = p.len() - ip.hl;
    if usize::from(be16(p, ip.hl + 4)) != l4_len {
        return None;
    }
    let key = flow_key(p, &ip);
    let eligible = be16(p, ip.hl + UDP_CSUM_OFFSET) != 0
        && (ip.v6 || (ip.hl == 20 && checksum(&p[..20], 0) == 0xffff))
        && (!verify
            || checksum(&p[ip.hl..], pseudo_header_sum(p, ip.v6, PROTO_UDP, l4_len)) == 0xffff);
    Some(TcpSeg {
        key,
        ip,
        thl: 8,
        payload: l4_len - 8,
        seq: 0,
        flags: 0,
        eligible,
    })
}

/// Most datagrams one USO super-packet carries (Linux's `UDP_GRO_CNT_MAX`).
const UDP_GRO_MAX_SEGMENTS: u32 = 64;

const NONE: u32 = u32::MAX;

/// One output packet under construction: a run of input packets (linked through
/// `Coalescer::next`), or a single passed-through packet.
#[derive(Debug, Clone, Copy)]
struct Item {
    head: u32,
    tail: u32,
    count: u32,
    /// More segments may join.
    open: bool,
    /// Payload bytes per segment (the head's payload).
    mss: usize,
    /// IP length of the merged packet so far.
    len: usize,
    /// UDP datagrams (a USO super-packet), not TCP segments.
    udp: bool,
    next_seq: u32,
    hl: usize,
    thl: usize,
    v6: bool,
}

/// GRO for TCP over IPv4/IPv6, following Linux `tcp_gro_receive`/`inet_gro_receive`/
/// `ipv6_gro_receive`. A segment joins the flow's open super-packet when: both have verified
/// checksums and (IPv4) no IP options; the same TOS/traffic class, TTL/hop limit, IPv4 flags
/// (DF), IPv6 flow label; an IPv4 ID one past the previous segment's (unless DF is set); the
/// same TCP header length, byte-identical options, ACK number, window and urgent pointer; the
/// same flags apart from FIN/PSH and no CWR on the joining segment; its sequence number
/// continues the super-packet; its payload is 1..=gso_size bytes; and the result stays within
/// 65535 bytes. A segment shorter than gso_size or with PSH/FIN ends the super-packet; one with
/// SYN/RST/URG, no payload, IPv4 options or a bad checksum never starts one. A packet of a flow
/// that cannot join ends that flow's open super-packet, so the order within a flow is kept.
/// Reuse one `Coalescer`: its tables keep their memory between batches.
#[derive(Debug)]
pub struct Coalescer {
    max_len: usize,
    /// Coalesce UDP datagrams too (into `GSO_UDP_L4` super-packets; the TUN must have USO).
    udp: bool,
    /// Take the transport checksums as verified (see [`Coalescer::trust_checksums`]).
    trust_checksums: bool,
    flows: HashMap<FlowKey, usize>,
    /// The flow of the previous TCP packet and its item.
    last: Option<(FlowKey, usize)>,
    items: Vec<Item>,
    next: Vec<u32>,
}

impl Default for Coalescer {
    fn default() -> Self {
        Self::new()
    }
}

impl Coalescer {
    pub fn new() -> Self {
        Self::with_max_len(MAX_SUPER_PACKET)
    }

    /// A coalescer whose super-packets stay within `max_len` IP bytes (at most 65535).
    pub fn with_max_len(max_len: usize) -> Self {
        Coalescer {
            max_len: max_len.min(MAX_SUPER_PACKET),
            udp: false,
            trust_checksums: false,
            flows: HashMap::new(),
            last: None,
            items: Vec::new(),
            next: Vec::new(),
        }
    }

    /// Also coalesces UDP datagrams of one flow (Linux `udp_gro_receive` with `UDP_L4` GSO): a
    /// datagram with a present and valid checksum joins its flow's open super-packet when the IP
    /// fields match as for TCP, its payload is 1..=the first one's, and the super-packet has
    /// fewer than 64 datagrams and stays within the bound; a shorter one ends it. Only for a TUN
    /// that accepted `TUN_F_USO4`/`TUN_F_USO6`.
    pub fn with_udp(mut self, udp: bool) -> Self {
        self.udp = udp;
        self
    }

    /// Takes every packet's TCP/UDP checksum as verified instead of summing it (the IPv4 header
    /// checksum is still checked). For packets that just passed an AEAD check, as WireGuard's
    /// decrypted packets have: the tag proves they are the bytes the peer sent, which is why
    /// Linux's WireGuard marks them `CHECKSUM_UNNECESSARY` at every layer. A packet whose
    /// checksum was wrong when the peer encrypted it is then merged (and its checksum replaced)
    /// like any other, as the kernel would accept it.
    pub fn trust_checksums(mut self, trust: bool) -> Self {
        self.trust_checksums = trust;
        self
    }

    /// Coalesces one batch of IP packets (in arrival order) and appends the resulting TUN
    /// frames (each a [`VirtioNetHdr`] and an IP packet) to `out`, in the order of each frame's
    /// first packet. Returns the number of frames appended.
    pub fn coalesce<P: AsRef<[u8]>>(&mut self, packets: &[P], out: &mut PacketBuf) -> usize {
        self.flows.clear();
        self.last = None;
        self.items.clear();
        self.next.clear();
        self.next.resize(packets.len(), NONE);
        for (k, p) in packets.iter().enumerate() {
            self.add(packets, k as u32, p.as_ref());
        }
        for item in &self.items {
            emit(item, packets, &self.next, out);
        }
        self.flows.clear();
        self.items.len()
    }

    fn add<P: AsRef<[u8]>>(&mut self, packets: &[P], k: u32, p: &[u8]) {
        let single = Item {
            head: k,
            tail: k,
            count: 1,
            open: false,
            mss: 0,
            len: p.len(),
            next_seq: 0,
            hl: 0,
            thl: 0,
            v6: false,
            udp: false,
        };
        let verify = !self.trust_checksums;
        let seg = match parse_tcp_seg(p, verify) {
            Some(seg) => Some(seg),
            None if self.udp => parse_udp_seg(p, verify),
            None => None,
        };
        let Some(seg) = seg else {
            self.items.push(single);
            return;
        };
        // Bulk traffic arrives in runs of one flow: try the last flow before hashing.
        let found = match self.last {
            Some((key, i)) if key == seg.key => Some(i),
            _ => self.flows.get(&seg.key).copied(),
        };
        if let Some(i) = found {
            self.last = Some((seg.key, i));
            let item = &mut self.items[i];
            if item.open
                && can_join(
                    item,
                    packets[item.head as usize].as_ref(),
                    p,
                    &seg,
                    self.max_len,
                )
            {
                self.next[item.tail as usize] = k;
                item.tail = k;
                item.count += 1;
                item.len += seg.payload;
                item.next_seq = item.next_seq.wrapping_add(seg.payload as u32);
                if seg.payload < item.mss
                    || seg.flags & (TCP_PSH | TCP_FIN) != 0
                    || (item.udp && item.count >= UDP_GRO_MAX_SEGMENTS)
                {
                    item.open = false;
                }
                return;
            }
            item.open = false;
        }
        let udp = seg.key.proto == PROTO_UDP;
        let starts = seg.eligible
            && seg.payload > 0
            && (udp || seg.flags & (TCP_SYN | TCP_RST | TCP_URG | TCP_PSH | TCP_FIN) == 0);
        self.flows.insert(seg.key, self.items.len());
        self.last = Some((seg.key, self.items.len()));
        self.items.push(Item {
            open: starts,
            mss: seg.payload,
            next_seq: seg.seq.wrapping_add(seg.payload as u32),
            hl: seg.ip.hl,
            thl: seg.thl,
            v6: seg.ip.v6,
            udp,
            ..single
        });
    }
}

/// Whether `p` (parsed as `seg`) may join `item`, whose first packet is `head`.
fn can_join(item: &Item, head: &[u8], p: &[u8], seg: &TcpSeg, max_len: usize) -> bool {
    if !seg.eligible
        || seg.ip.hl != item.hl
        || seg.thl != item.thl
        || seg.ip.v6 != item.v6
        || seg.payload == 0
        || seg.payload > item.mss
        || (!item.udp && seg.seq != item.next_seq)
        || item.len + seg.payload > max_len
    {
        return false;
    }
    if item.v6 {
        // Version, traffic class and flow label; hop limit.
        if head[..4] != p[..4] || head[7] != p[7] {
            return false;
        }
    } else {
        let df = be16(p, 6) & 0x4000 != 0;
        // TOS, flags (DF, reserved; MF and the offset are zero), TTL.
        if head[1] != p[1] || head[6] != p[6] || head[8] != p[8] {
            return false;
        }
        if !df && be16(p, 4) != be16(head, 4).wrapping_add(item.count as u16) {
            return false;
        }
    }
    if item.udp {
        // Same flow (the key), same IP fields (above), payload no longer than the first.
        return true;
    }
    let (h, t) = (&head[item.hl..], &p[item.hl..]);
    let flag_diff = h[13] ^ t[13];
    h[8..13] == t[8..13] // ACK number, data offset
        && flag_diff & !(TCP_CWR | TCP_FIN | TCP_PSH) == 0
        && t[13] & TCP_CWR == 0
        && h[14..16] == t[14..16] // window
        && h[18..20] == t[18..20] // urgent pointer (URG itself never merges)
        && h[20..item.thl] == t[20..item.thl]
}

fn emit<P: AsRef<[u8]>>(item: &Item, packets: &[P], next: &[u32], out: &mut PacketBuf) {
    let head = packets[item.head as usize].as_ref();
    let start = out.start();
    if item.count == 1 {
        out.extend(&VirtioNetHdr::default().encode());
        out.extend(head);
        out.finish(start);
        return;
    }
    let hdrs = item.hl + item.thl;
    let vnet = if item.udp {
        VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_UDP_L4,
            hdr_len: hdrs as u16,
            gso_size: item.mss as u16,
            csum_start: item.hl as u16,
            csum_offset: UDP_CSUM_OFFSET as u16,
        }
    } else {
        let cwr = head[item.hl + 13] & TCP_CWR != 0;
        let gso = if item.v6 {
            VIRTIO_NET_HDR_GSO_TCPV6
        } else {
            VIRTIO_NET_HDR_GSO_TCPV4
        };
        VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: if cwr {
                gso | VIRTIO_NET_HDR_GSO_ECN
            } else {
                gso
            },
            hdr_len: hdrs as u16,
            gso_size: item.mss as u16,
            csum_start: item.hl as u16,
            csum_offset: TCP_CSUM_OFFSET as u16,
        }
    };
    out.data.reserve(VIRTIO_NET_HDR_LEN + item.len);
    out.extend(&vnet.encode());
    out.extend(&head[..hdrs]);
    let mut k = item.head;
    while k != NONE {
        out.extend(&packets[k as usize].as_ref()[hdrs..]);
        k = next[k as usize];
    }
    let frame = out.finish(start);
    let pkt = &mut frame[VIRTIO_NET_HDR_LEN..];
    let len = pkt.len();
    if item.v6 {
        put16(pkt, 4, (len - 40) as u16);
    } else {
        put16(pkt, 2, len as u16);
        set_ipv4_checksum(pkt, item.hl);
    }
    let l4_len = len - item.hl;
    if item.udp {
        let pseudo = checksum(&[], pseudo_header_sum(pkt, item.v6, PROTO_UDP, l4_len));
        let l4 = &mut pkt[item.hl..];
        put16(l4, 4, l4_len as u16);
        put16(l4, UDP_CSUM_OFFSET, pseudo);
        return;
    }
    let tail_flags = packets[item.tail as usize].as_ref()[item.hl + 13];
    let pseudo = checksum(&[], pseudo_header_sum(pkt, item.v6, PROTO_TCP, l4_len));
    let l4 = &mut pkt[item.hl..];
    l4[13] |= tail_flags & (TCP_FIN | TCP_PSH);
    put16(l4, TCP_CSUM_OFFSET, pseudo);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(data: &[u8], initial: u32) -> u16 {
        let mut s = u64::from(initial);
        for pair in data.chunks(2) {
            let hi = u64::from(pair[0]) << 8;
            let lo = pair.get(1).map(|&b| u64::from(b)).unwrap_or(0);
            s += hi | lo;
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    #[test]
    fn checksum_matches_naive_sum() {
        let data: Vec<u8> = (0..3010u32).map(|i| (i * 7919 % 251) as u8).collect();
        for len in (0..70).chain([1499, 1500, 2999, 3000]) {
            for start in [0, 1, 3] {
                let d = &data[start..start + len];
                assert_eq!(checksum(d, 0), naive(d, 0), "len {len} start {start}");
                assert_eq!(checksum(d, 0x1_fffe), naive(d, 0x1_fffe));
            }
        }
        assert_eq!(checksum(&[0xff; 64], 0), 0xffff);
        // RFC 1071 example.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0),
            0xddf2
        );
    }

    #[test]
    fn header_round_trip_and_refusals() {
        let h = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV6 | VIRTIO_NET_HDR_GSO_ECN,
            hdr_len: 60,
            gso_size: 1380,
            csum_start: 40,
            csum_offset: 16,
        };
        assert_eq!(VirtioNetHdr::decode(&h.encode()), Ok(h));
        assert_eq!(
            VirtioNetHdr::decode(&[0; 9]),
            Err(OffloadError::ShortHeader(9))
        );
        let mut b = h.encode();
        b[0] = 4;
        assert_eq!(VirtioNetHdr::decode(&b), Err(OffloadError::UnknownFlags(4)));
        b[0] = 0;
        b[1] = 2;
        assert_eq!(
            VirtioNetHdr::decode(&b),
            Err(OffloadError::UnknownGsoType(2))
        );
        let (hdr, rest) = VirtioNetHdr::split(&[0u8; 10]).expect("split");
        assert_eq!(hdr, VirtioNetHdr::default());
        assert!(rest.is_empty());
    }
}
