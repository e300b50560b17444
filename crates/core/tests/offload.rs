//! TSO/USO segmentation, checksum completion and GRO coalescing (`weft_core::offload`), checked
//! against an independent byte-at-a-time checksum routine.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;
use weft_core::offload::*;

// ---------------------------------------------------------------------------------------------
// Independent reference routines
// ---------------------------------------------------------------------------------------------

/// Byte-pair one's-complement sum, folded, not complemented.
fn sum16(data: &[u8], initial: u32) -> u16 {
    let mut s = u64::from(initial);
    let mut i = 0;
    while i < data.len() {
        let hi = u64::from(data[i]) << 8;
        let lo = if i + 1 < data.len() {
            u64::from(data[i + 1])
        } else {
            0
        };
        s += hi | lo;
        i += 2;
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn is_v6(p: &[u8]) -> bool {
    p[0] >> 4 == 6
}

fn ip_hl(p: &[u8]) -> usize {
    if is_v6(p) {
        40
    } else {
        usize::from(p[0] & 0x0f) * 4
    }
}

fn proto(p: &[u8]) -> u8 {
    if is_v6(p) {
        p[6]
    } else {
        p[9]
    }
}

fn pseudo(p: &[u8], l4_len: usize) -> u32 {
    let addrs = if is_v6(p) { &p[8..40] } else { &p[12..20] };
    u32::from(sum16(addrs, 0)) + u32::from(proto(p)) + l4_len as u32
}

/// Asserts `p` is a well-formed IPv4/IPv6 TCP/UDP packet with correct length fields and checksums.
fn assert_valid(p: &[u8]) {
    let hl = ip_hl(p);
    if is_v6(p) {
        assert_eq!(usize::from(u16::from_be_bytes([p[4], p[5]])) + 40, p.len());
    } else {
        assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len());
        assert_eq!(sum16(&p[..hl], 0), 0xffff, "IPv4 header checksum");
    }
    let l4 = &p[hl..];
    assert_eq!(sum16(l4, pseudo(p, l4.len())), 0xffff, "transport checksum");
    if proto(p) == 17 {
        assert_eq!(usize::from(u16::from_be_bytes([l4[4], l4[5]])), l4.len());
        assert_ne!(&l4[6..8], &[0, 0], "UDP checksum 0");
    }
}

fn l4_hl(p: &[u8]) -> usize {
    let hl = ip_hl(p);
    if proto(p) == 6 {
        usize::from(p[hl + 12] >> 4) * 4
    } else {
        8
    }
}

fn payload(p: &[u8]) -> &[u8] {
    &p[ip_hl(p) + l4_hl(p)..]
}

fn seq(p: &[u8]) -> u32 {
    let hl = ip_hl(p);
    u32::from_be_bytes([p[hl + 4], p[hl + 5], p[hl + 6], p[hl + 7]])
}

fn tcp_flags(p: &[u8]) -> u8 {
    p[ip_hl(p) + 13]
}

// ---------------------------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------------------------

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
const URG: u8 = 0x20;
const ECE: u8 = 0x40;
const CWR: u8 = 0x80;

#[derive(Clone)]
struct Spec {
    v6: bool,
    tcp: bool,
    /// IPv4 option bytes (a multiple of 4, at most 40).
    ip_options: usize,
    /// TCP option bytes (a multiple of 4, at most 40).
    tcp_options: usize,
    payload: Vec<u8>,
    flags: u8,
    seq: u32,
    id: u16,
    df: bool,
    ttl: u8,
    sport: u16,
}

impl std::fmt::Debug for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}{} payload {} ip_options {} tcp_options {} flags {:#x} df {}",
            if self.tcp { "tcp" } else { "udp" },
            if self.v6 { 6 } else { 4 },
            self.payload.len(),
            self.ip_options,
            self.tcp_options,
            self.flags,
            self.df
        )
    }
}

impl Spec {
    fn tcp4(payload_len: usize) -> Self {
        Spec {
            v6: false,
            tcp: true,
            ip_options: 0,
            tcp_options: 0,
            payload: (0..payload_len).map(|i| (i * 31 + 7) as u8).collect(),
            flags: ACK,
            seq: 0xffff_f000,
            id: 0xfffe,
            df: true,
            ttl: 64,
            sport: 40000,
        }
    }
    fn tcp6(n: usize) -> Self {
        Spec {
            v6: true,
            ..Self::tcp4(n)
        }
    }
    fn udp4(n: usize) -> Self {
        Spec {
            tcp: false,
            flags: 0,
            ..Self::tcp4(n)
        }
    }
    fn udp6(n: usize) -> Self {
        Spec {
            v6: true,
            ..Self::udp4(n)
        }
    }

    fn headers_len(&self) -> usize {
        let ip = if self.v6 { 40 } else { 20 + self.ip_options };
        ip + if self.tcp { 20 + self.tcp_options } else { 8 }
    }

    /// The packet with complete (`full_csum`) or pseudo-header-only transport checksum.
    fn packet(&self, full_csum: bool) -> Vec<u8> {
        let hl = if self.v6 { 40 } else { 20 + self.ip_options };
        let l4h = if self.tcp { 20 + self.tcp_options } else { 8 };
        let len = hl + l4h + self.payload.len();
        let mut p = vec![0u8; len];
        let proto = if self.tcp { 6 } else { 17 };
        if self.v6 {
            p[0] = 0x60;
            p[1] = 0x0a; // traffic class / flow label bits
            p[2] = 0xbc;
            p[3] = 0xde;
            p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
            p[6] = proto;
            p[7] = self.ttl;
            p[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            p[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            p[0] = 0x40 | (hl / 4) as u8;
            p[1] = 0x10;
            p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            p[4..6].copy_from_slice(&self.id.to_be_bytes());
            p[6] = if self.df { 0x40 } else { 0 };
            p[8] = self.ttl;
            p[9] = proto;
            p[12..16].copy_from_slice(&[10, 42, 1, 2]);
            p[16..20].copy_from_slice(&[10, 42, 2, 3]);
            for (i, b) in p[20..hl].iter_mut().enumerate() {
                // NOPs then an option-ish byte pattern; the content is opaque to us.
                *b = if i % 4 == 3 { 0 } else { 1 };
            }
            let c = !sum16(&p[..hl], 0);
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let l4 = &mut p[hl..];
        l4[0..2].copy_from_slice(&self.sport.to_be_bytes());
        l4[2..4].copy_from_slice(&443u16.to_be_bytes());
        if self.tcp {
            l4[4..8].copy_from_slice(&self.seq.to_be_bytes());
            l4[8..12].copy_from_slice(&0x1234_5678u32.to_be_bytes());
            l4[12] = ((l4h / 4) as u8) << 4;
            l4[13] = self.flags;
            l4[14..16].copy_from_slice(&502u16.to_be_bytes());
            if self.tcp_options >= 12 {
                // NOP NOP timestamps, then NOPs.
                l4[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0x12, 0x34, 0, 0, 0x56, 0x78]);
                for b in &mut l4[32..l4h] {
                    *b = 1;
                }
            } else {
                for b in &mut l4[20..l4h] {
                    *b = 1;
                }
            }
        } else {
            l4[4..6].copy_from_slice(&((l4h + self.payload.len()) as u16).to_be_bytes());
        }
        l4[l4h..].copy_from_slice(&self.payload);
        let csum_at = hl + if self.tcp { 16 } else { 6 };
        let ps = pseudo(&p, len - hl);
        let c = if full_csum {
            let c = !sum16(&p[hl..], ps);
            if c == 0 && !self.tcp {
                0xffff
            } else {
                c
            }
        } else {
            sum16(&[], ps)
        };
        p[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// The TUN frame the kernel would hand over: a GSO super-packet with NEEDS_CSUM.
    fn frame(&self, gso_size: u16) -> (VirtioNetHdr, Vec<u8>) {
        let hl = if self.v6 { 40 } else { 20 + self.ip_options };
        let gso_type = match (self.tcp, self.v6) {
            (true, false) => VIRTIO_NET_HDR_GSO_TCPV4,
            (true, true) => VIRTIO_NET_HDR_GSO_TCPV6,
            _ => VIRTIO_NET_HDR_GSO_UDP_L4,
        };
        let ecn = if self.tcp && self.flags & CWR != 0 {
            VIRTIO_NET_HDR_GSO_ECN
        } else {
            0
        };
        let hdr = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: gso_type | ecn,
            hdr_len: self.headers_len() as u16,
            gso_size,
            csum_start: hl as u16,
            csum_offset: if self.tcp { 16 } else { 6 },
        };
        (hdr, self.packet(false))
    }
}

/// Recomputes the IPv4 header checksum and the TCP checksum of a 20-byte-IPv4-header packet.
fn fix_checksums(p: &mut [u8]) {
    p[10] = 0;
    p[11] = 0;
    let c = !sum16(&p[..20], 0);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[36] = 0;
    p[37] = 0;
    let c = !sum16(&p[20..], pseudo(p, p.len() - 20));
    p[36..38].copy_from_slice(&c.to_be_bytes());
}

fn framed(hdr: &VirtioNetHdr, packet: &[u8]) -> Vec<u8> {
    let mut f = hdr.encode().to_vec();
    f.extend_from_slice(packet);
    f
}

/// Segments `spec` at `gso_size`, checks every segment, and (TCP) coalesces the segments back
/// into the original frame.
fn round_trip(spec: &Spec, gso_size: u16) {
    let (hdr, packet) = spec.frame(gso_size);
    let mut segs = PacketBuf::new();
    let max = spec.headers_len() + usize::from(gso_size);
    segment(&framed(&hdr, &packet), max, &mut segs).expect("segment");
    let mss = usize::from(gso_size);
    let expected = spec.payload.len().div_ceil(mss).max(1);
    assert_eq!(segs.len(), expected, "{spec:?} gso {gso_size}");
    let mut joined = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        assert!(s.len() <= max);
        assert_valid(s);
        assert_eq!(ip_hl(s) + l4_hl(s), spec.headers_len());
        let pl = payload(s);
        assert!(!pl.is_empty() || spec.payload.is_empty());
        if i + 1 < expected {
            assert_eq!(pl.len(), mss);
        }
        joined.extend_from_slice(pl);
        if !spec.v6 {
            assert_eq!(
                u16::from_be_bytes([s[4], s[5]]),
                spec.id.wrapping_add(i as u16)
            );
        }
        if spec.tcp {
            assert_eq!(seq(s), spec.seq.wrapping_add((i * mss) as u32));
            let f = tcp_flags(s);
            let last = i + 1 == expected;
            assert_eq!(
                f & (FIN | PSH),
                if last { spec.flags & (FIN | PSH) } else { 0 }
            );
            assert_eq!(f & CWR, if i == 0 { spec.flags & CWR } else { 0 });
            assert_eq!(f & !(FIN | PSH | CWR), spec.flags & !(FIN | PSH | CWR));
        }
    }
    assert_eq!(joined, spec.payload);

    let mut gro = PacketBuf::new();
    let mut c = Coalescer::new();
    let segs_vec: Vec<&[u8]> = segs.iter().collect();
    let n = c.coalesce(&segs_vec, &mut gro);
    if !spec.tcp || spec.ip_options > 0 {
        // No UDP GRO, and no GRO of IPv4 with options: every packet passes through behind a
        // zero header.
        assert_eq!(n, segs.len());
        for (f, s) in gro.iter().zip(segs.iter()) {
            assert_eq!(&f[..10], &[0u8; 10]);
            assert_eq!(&f[10..], s);
        }
        return;
    }
    if expected == 1 || spec.payload.is_empty() {
        assert_eq!(n, 1);
        let f = gro.get(0).expect("frame");
        assert_eq!(&f[..10], &[0u8; 10]);
        assert_eq!(&f[10..], segs.get(0).expect("segment"));
        return;
    }
    assert_eq!(n, 1, "{spec:?} gso {gso_size}: one super-packet");
    let f = gro.get(0).expect("frame");
    assert_eq!(
        VirtioNetHdr::decode(f).expect("header"),
        hdr,
        "virtio header"
    );
    assert_eq!(
        &f[10..],
        &packet[..],
        "super-packet identical to the original"
    );
}

// ---------------------------------------------------------------------------------------------
// Segmentation
// ---------------------------------------------------------------------------------------------

#[test]
fn tso4_round_trips_at_odd_sizes() {
    let mss = 1380usize;
    for n in [
        1,
        mss - 1,
        mss,
        mss + 1,
        2 * mss,
        2 * mss + 1,
        3 * mss - 1,
        44 * mss,
        44 * mss + 1,
    ] {
        round_trip(&Spec::tcp4(n), mss as u16);
    }
}

#[test]
fn tso6_round_trips_at_odd_sizes() {
    let mss = 1360usize;
    for n in [1, mss, mss + 1, 5 * mss, 5 * mss + 1, 47 * mss + 7] {
        round_trip(&Spec::tcp6(n), mss as u16);
    }
}

#[test]
fn uso4_and_uso6_segment_into_datagrams() {
    for n in [1, 1000, 1400, 1401, 2800, 2801, 40000] {
        round_trip(&Spec::udp4(n), 1400);
        round_trip(&Spec::udp6(n), 1400);
    }
}

#[test]
fn flags_fin_psh_last_cwr_first() {
    let mut s = Spec::tcp4(5000);
    s.flags = ACK | PSH | FIN | CWR | ECE;
    round_trip(&s, 1000);
    let mut s6 = Spec::tcp6(4001);
    s6.flags = ACK | PSH | CWR;
    round_trip(&s6, 1000);
}

#[test]
fn ipv4_options_and_tcp_options_are_copied_to_every_segment() {
    for ip_options in [4, 12, 40] {
        for tcp_options in [4, 12, 40] {
            let mut s = Spec::tcp4(10_000);
            s.ip_options = ip_options;
            s.tcp_options = tcp_options;
            round_trip(&s, 1200);
            let (hdr, p) = s.frame(1200);
            let mut out = PacketBuf::new();
            segment_packet(&hdr, &p, 1500, &mut out).expect("segment");
            let hdrs = s.headers_len();
            for seg in out.iter() {
                // Everything but lengths, IDs, checksums, sequence number and flags is copied.
                assert_eq!(&seg[20..ip_hl(seg)], &p[20..20 + ip_options]);
                assert_eq!(&seg[ip_hl(seg) + 20..hdrs], &p[ip_hl(&p) + 20..hdrs]);
            }
        }
    }
    let mut s = Spec::tcp6(3000);
    s.tcp_options = 12;
    round_trip(&s, 1000);
}

#[test]
fn super_packets_of_exactly_65535_bytes() {
    let s = Spec::tcp4(65535 - 40);
    assert_eq!(s.packet(false).len(), 65535);
    round_trip(&s, 1448);
    let mut s = Spec::tcp4(65535 - 60 - 60);
    s.ip_options = 40;
    s.tcp_options = 40;
    round_trip(&s, 1300);
    // IPv6: payload length 65535, 65575 bytes in all.
    let s6 = Spec::tcp6(65535 - 20);
    assert_eq!(s6.packet(false).len(), 65575);
    let (hdr, p) = s6.frame(1428);
    let mut out = PacketBuf::new();
    segment_packet(&hdr, &p, 1488, &mut out).expect("segment");
    assert_eq!(out.len(), 65515usize.div_ceil(1428));
    out.iter().for_each(assert_valid);
    round_trip(&Spec::udp4(65535 - 28), 1472);
}

#[test]
fn gso_size_larger_than_payload_gives_one_segment() {
    for s in [
        Spec::tcp4(100),
        Spec::tcp6(100),
        Spec::udp4(100),
        Spec::udp6(100),
    ] {
        let (hdr, p) = s.frame(1400);
        let mut out = PacketBuf::new();
        segment_packet(&hdr, &p, 1500, &mut out).expect("segment");
        assert_eq!(out.len(), 1);
        let seg = out.get(0).expect("one");
        assert_valid(seg);
        assert_eq!(payload(seg), &s.payload[..]);
    }
    // No payload at all (a bare FIN, say): one packet, checksummed.
    let mut s = Spec::tcp4(0);
    s.flags = ACK | FIN;
    round_trip(&s, 1400);
}

#[test]
fn gso_size_zero_is_refused() {
    let (mut hdr, p) = Spec::tcp4(3000).frame(1000);
    hdr.gso_size = 0;
    let mut out = PacketBuf::new();
    assert_eq!(
        segment_packet(&hdr, &p, 1500, &mut out),
        Err(OffloadError::ZeroGsoSize)
    );
    assert!(out.is_empty());
}

#[test]
fn segments_over_the_mtu_are_refused() {
    let s = Spec::tcp4(5000);
    let (hdr, p) = s.frame(1400);
    let mut out = PacketBuf::new();
    segment_packet(&hdr, &p, 1440, &mut out).expect("exactly the MTU");
    out.clear();
    assert_eq!(
        segment_packet(&hdr, &p, 1439, &mut out),
        Err(OffloadError::SegmentTooLarge {
            size: 1440,
            max: 1439
        })
    );
    assert!(out.is_empty());
    // A plain packet one byte over the MTU.
    let plain = Spec::tcp4(1401).packet(true);
    let none = VirtioNetHdr::default();
    assert!(matches!(
        segment_packet(&none, &plain, 1440, &mut out),
        Err(OffloadError::SegmentTooLarge { size: 1441, .. })
    ));
    segment_packet(&none, &plain, 1441, &mut out).expect("at the MTU");
    assert_eq!(out.get(0), Some(&plain[..]));
}

#[test]
fn hdr_len_is_advisory_but_bounded() {
    let s = Spec::tcp4(4000);
    let (hdr, p) = s.frame(1000);
    let mut reference = PacketBuf::new();
    segment_packet(&hdr, &p, 1500, &mut reference).expect("segment");
    // The kernel may report its linear length (the whole first segment, or more), or 0.
    for hdr_len in [0, 20, 39, 41, 1040, p.len() as u16] {
        let mut out = PacketBuf::new();
        let h = VirtioNetHdr { hdr_len, ..hdr };
        segment_packet(&h, &p, 1500, &mut out).expect("advisory hdr_len");
        assert!(out.iter().eq(reference.iter()));
    }
    let mut out = PacketBuf::new();
    let h = VirtioNetHdr {
        hdr_len: p.len() as u16 + 1,
        ..hdr
    };
    assert!(matches!(
        segment_packet(&h, &p, 1500, &mut out),
        Err(OffloadError::HdrLen { .. })
    ));
}

#[test]
fn truncated_frames_are_refused_without_panicking() {
    for s in [
        Spec::tcp4(3000),
        Spec::tcp6(3000),
        Spec::udp4(3000),
        Spec::udp6(3000),
    ] {
        let (hdr, p) = s.frame(1000);
        let frame = framed(&hdr, &p);
        for cut in 0..frame.len() {
            let mut out = PacketBuf::new();
            assert!(
                segment(&frame[..cut], 1500, &mut out).is_err(),
                "{cut}-byte prefix accepted"
            );
            assert!(out.is_empty());
        }
    }
}

#[test]
fn malformed_super_packets_are_refused() {
    let mut out = PacketBuf::new();
    let mut check = |hdr: &VirtioNetHdr, p: &[u8], want: OffloadError| {
        assert_eq!(segment_packet(hdr, p, 1500, &mut out), Err(want));
        assert!(out.is_empty());
    };
    let (hdr4, p4) = Spec::tcp4(3000).frame(1000);
    let (hdr6, p6) = Spec::tcp6(3000).frame(1000);
    let (hdru, pu) = Spec::udp4(3000).frame(1000);

    // IP version vs gso_type.
    let h = VirtioNetHdr {
        gso_type: VIRTIO_NET_HDR_GSO_TCPV6,
        ..hdr4
    };
    check(
        &h,
        &p4,
        OffloadError::GsoIpMismatch {
            gso_type: 4,
            version: 4,
        },
    );
    let h = VirtioNetHdr {
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
        ..hdr6
    };
    check(
        &h,
        &p6,
        OffloadError::GsoIpMismatch {
            gso_type: 1,
            version: 6,
        },
    );
    let mut bad = p4.clone();
    bad[0] = 0x55;
    check(&hdr4, &bad, OffloadError::IpVersion(5));
    // IHL below 5, and total length disagreeing with the buffer.
    let mut bad = p4.clone();
    bad[0] = 0x44;
    check(&hdr4, &bad, OffloadError::Ipv4HeaderLength(16));
    let mut bad = p4.clone();
    bad[2..4].copy_from_slice(&(p4.len() as u16 - 1).to_be_bytes());
    check(
        &hdr4,
        &bad,
        OffloadError::IpLength {
            field: p4.len() - 1,
            len: p4.len(),
        },
    );
    let mut bad = p6.clone();
    bad[4..6].copy_from_slice(&0u16.to_be_bytes());
    check(
        &hdr6,
        &bad,
        OffloadError::IpLength {
            field: 40,
            len: p6.len(),
        },
    );
    // Trailing bytes after the IP packet.
    let mut bad = p4.clone();
    bad.push(0);
    check(
        &hdr4,
        &bad,
        OffloadError::IpLength {
            field: p4.len(),
            len: p4.len() + 1,
        },
    );
    // Fragments, extension headers, wrong protocols.
    let mut bad = p4.clone();
    bad[6] = 0x20; // MF
    check(&hdr4, &bad, OffloadError::Fragment);
    let mut bad = p6.clone();
    bad[6] = 0; // hop-by-hop
    check(&hdr6, &bad, OffloadError::Ipv6ExtensionHeader(0));
    let mut bad = p4.clone();
    bad[9] = 17;
    check(
        &hdr4,
        &bad,
        OffloadError::Protocol {
            proto: 17,
            expected: 6,
        },
    );
    // TCP data offset below 5 and beyond the packet.
    let mut bad = p4.clone();
    bad[32] = 0x40;
    check(&hdr4, &bad, OffloadError::TcpDataOffset(4));
    let short = Spec::tcp4(0).packet(false);
    let mut bad = short.clone();
    bad[32] = 0xf0;
    check(&hdr4, &bad, OffloadError::Truncated("TCP options"));
    // SYN/RST in TSO.
    let mut bad = p4.clone();
    bad[33] |= SYN;
    check(&hdr4, &bad, OffloadError::TcpFlags);
    let mut bad = p4.clone();
    bad[33] |= RST;
    check(&hdr4, &bad, OffloadError::TcpFlags);
    // UDP length field.
    let mut bad = pu.clone();
    bad[24..26].copy_from_slice(&9u16.to_be_bytes());
    check(
        &hdru,
        &bad,
        OffloadError::UdpLength {
            field: 9,
            len: pu.len() - 20,
        },
    );
    // csum_start / csum_offset not at the transport checksum.
    for (start, offset) in [(24, 16), (20, 6), (20, 18)] {
        let h = VirtioNetHdr {
            csum_start: start,
            csum_offset: offset,
            ..hdr4
        };
        check(
            &h,
            &p4,
            OffloadError::ChecksumMismatch {
                start,
                offset,
                expected_start: 20,
                expected_offset: 16,
            },
        );
    }
    // UFO, ECN on UDP.
    let h = VirtioNetHdr {
        gso_type: VIRTIO_NET_HDR_GSO_UDP,
        ..hdru
    };
    check(&h, &pu, OffloadError::UnsupportedGsoType(3));
    let h = VirtioNetHdr {
        gso_type: VIRTIO_NET_HDR_GSO_UDP_L4 | VIRTIO_NET_HDR_GSO_ECN,
        ..hdru
    };
    check(&h, &pu, OffloadError::UnsupportedGsoType(0x85));
    // Empty and tiny packets.
    let h4 = VirtioNetHdr { hdr_len: 0, ..hdr4 };
    let h6 = VirtioNetHdr { hdr_len: 0, ..hdr6 };
    check(&h4, &[], OffloadError::Truncated("IP"));
    check(&h4, &[0x45; 19], OffloadError::Truncated("IPv4"));
    check(&h6, &[0x60; 39], OffloadError::Truncated("IPv6"));
    check(
        &hdr4,
        &[0x45; 19],
        OffloadError::HdrLen {
            hdr_len: 40,
            len: 19,
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Checksum completion
// ---------------------------------------------------------------------------------------------

#[test]
fn needs_csum_single_packets_are_completed() {
    for s in [
        Spec::tcp4(0),
        Spec::tcp4(1),
        Spec::tcp4(1399),
        Spec::tcp6(700),
        Spec::udp4(1),
        Spec::udp6(1232),
    ] {
        let (gso_hdr, p) = s.frame(1400);
        let hdr = VirtioNetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_NONE,
            gso_size: 0,
            hdr_len: 0,
            ..gso_hdr
        };
        let mut q = p.clone();
        complete_checksum(&hdr, &mut q).expect("complete");
        assert_valid(&q);
        assert_eq!(q, s.packet(true));
        // The same through segment(), which copies.
        let mut out = PacketBuf::new();
        segment(&framed(&hdr, &p), 1500, &mut out).expect("segment");
        assert_eq!(out.get(0), Some(&q[..]));
    }
}

#[test]
fn complete_checksum_refusals() {
    let p = Spec::udp4(10).packet(false);
    let base = VirtioNetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        csum_start: 20,
        csum_offset: 6,
        ..VirtioNetHdr::default()
    };
    // No NEEDS_CSUM: untouched.
    let mut q = p.clone();
    complete_checksum(&VirtioNetHdr::default(), &mut q).expect("no-op");
    assert_eq!(q, p);
    for (start, offset) in [(37, 0), (36, 1), (20, 17), (u16::MAX, u16::MAX)] {
        let mut q = p.clone();
        let h = VirtioNetHdr {
            csum_start: start,
            csum_offset: offset,
            ..base
        };
        assert!(matches!(
            complete_checksum(&h, &mut q),
            Err(OffloadError::ChecksumOutOfBounds { .. })
        ));
        assert_eq!(q, p, "unchanged on error");
    }
    let mut q = p.clone();
    let h = VirtioNetHdr {
        gso_type: VIRTIO_NET_HDR_GSO_UDP_L4,
        gso_size: 4,
        ..base
    };
    assert_eq!(complete_checksum(&h, &mut q), Err(OffloadError::GsoPacket));
}

// ---------------------------------------------------------------------------------------------
// Coalescing
// ---------------------------------------------------------------------------------------------

/// `n` full-checksum TCP segments of one flow, `mss` payload bytes each, contiguous.
fn segments(base: &Spec, n: usize, mss: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut s = base.clone();
            s.seq = base.seq.wrapping_add((i * mss) as u32);
            s.id = base.id.wrapping_add(i as u16);
            s.payload = (0..mss).map(|j| ((i * mss + j) % 253) as u8).collect();
            s.packet(true)
        })
        .collect()
}

fn coalesce(packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut out = PacketBuf::new();
    Coalescer::new().coalesce(packets, &mut out);
    out.iter().map(<[u8]>::to_vec).collect()
}

/// The packets a coalesced frame stands for (re-segmented at its gso_size).
fn expand(frame: &[u8]) -> Vec<Vec<u8>> {
    let hdr = VirtioNetHdr::decode(frame).expect("header");
    if hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE {
        assert_eq!(hdr, VirtioNetHdr::default());
        return vec![frame[10..].to_vec()];
    }
    let mut out = PacketBuf::new();
    segment(frame, 65535, &mut out).expect("re-segment");
    out.iter().map(<[u8]>::to_vec).collect()
}

fn merged_counts(frames: &[Vec<u8>]) -> Vec<usize> {
    frames.iter().map(|f| expand(f).len()).collect()
}

#[test]
fn coalesces_44_segments_into_one_and_back() {
    for v6 in [false, true] {
        let base = if v6 { Spec::tcp6(0) } else { Spec::tcp4(0) };
        let segs = segments(&base, 44, 1448);
        let frames = coalesce(&segs);
        assert_eq!(frames.len(), 1);
        let hdr = VirtioNetHdr::decode(&frames[0]).expect("header");
        assert_eq!(hdr.gso_size, 1448);
        assert_eq!(hdr.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(usize::from(hdr.csum_start), if v6 { 40 } else { 20 });
        assert_eq!(expand(&frames[0]), segs);
    }
}

#[test]
fn coalescer_refuses_gaps_reordering_and_other_flows() {
    let segs = segments(&Spec::tcp4(0), 6, 1000);
    // A gap: 0 1 _ 3 4 5.
    let gap = vec![
        segs[0].clone(),
        segs[1].clone(),
        segs[3].clone(),
        segs[4].clone(),
        segs[5].clone(),
    ];
    assert_eq!(merged_counts(&coalesce(&gap)), vec![2, 3]);
    // Out of order: 1 0 2 3 (0 then 2 is a gap again).
    let ooo = vec![
        segs[1].clone(),
        segs[0].clone(),
        segs[2].clone(),
        segs[3].clone(),
    ];
    let frames = coalesce(&ooo);
    assert_eq!(merged_counts(&frames), vec![1, 1, 2]);
    assert_eq!(expand(&frames[0]), vec![segs[1].clone()]);
    // A duplicate.
    let dup = vec![segs[0].clone(), segs[0].clone(), segs[1].clone()];
    assert_eq!(merged_counts(&coalesce(&dup)), vec![1, 2]);
    // Two flows interleaved: each merges, in order of first appearance.
    let mut other = Spec::tcp4(0);
    other.sport = 40001;
    let b = segments(&other, 3, 1000);
    let mixed = vec![
        segs[0].clone(),
        b[0].clone(),
        segs[1].clone(),
        b[1].clone(),
        b[2].clone(),
        segs[2].clone(),
    ];
    let frames = coalesce(&mixed);
    assert_eq!(merged_counts(&frames), vec![3, 3]);
    assert_eq!(expand(&frames[0]), segs[..3].to_vec());
    assert_eq!(expand(&frames[1]), b);
    // Same ports, other address family: different flows.
    let v6 = segments(&Spec::tcp6(0), 2, 1000);
    let frames = coalesce(&[
        segs[0].clone(),
        v6[0].clone(),
        segs[1].clone(),
        v6[1].clone(),
    ]);
    assert_eq!(merged_counts(&frames), vec![2, 2]);
}

#[test]
fn coalescer_refuses_flag_changes() {
    let base = Spec::tcp4(0);
    for (flag, counts) in [
        (SYN, vec![2, 1, 1]),
        (RST, vec![2, 1, 1]),
        (URG, vec![2, 1, 1]),
        (ECE, vec![2, 1, 1]),
        (CWR, vec![2, 2]),
        (FIN, vec![3, 1]),
        (PSH, vec![3, 1]),
    ] {
        let mut segs = segments(&base, 4, 1000);
        let mut s = base.clone();
        s.seq = base.seq.wrapping_add(2000);
        s.id = base.id.wrapping_add(2);
        s.flags |= flag;
        s.payload = (0..1000).map(|j| ((2000 + j) % 253) as u8).collect();
        segs[2] = s.packet(true);
        let frames = coalesce(&segs);
        assert_eq!(merged_counts(&frames), counts, "flag {flag:#x}");
        let back: Vec<Vec<u8>> = frames.iter().flat_map(|f| expand(f)).collect();
        assert_eq!(back, segs, "flag {flag:#x}: every packet back in order");
    }
}

#[test]
fn coalescer_refuses_header_differences() {
    let base = Spec::tcp4(0);
    type Tweak = fn(&mut Vec<u8>);
    let tweaks: [(&str, Tweak); 9] = [
        ("ttl", |p| p[8] = 63),
        ("tos", |p| p[1] = 0x11),
        ("df", |p| p[6] = 0),
        ("ack", |p| p[28] ^= 1),
        ("window", |p| p[35] ^= 1),
        ("options", |p| p[41] ^= 1),
        ("ip id", |p| p[5] ^= 0x10),
        ("reserved ip flag", |p| p[6] |= 0x80),
        ("urgent pointer", |p| p[39] = 1),
    ];
    for (what, tweak) in tweaks {
        let mut b = base.clone();
        b.tcp_options = 12;
        b.df = what != "ip id"; // IDs are free with DF
        let mut segs = segments(&b, 3, 1000);
        let mut p = segs[1].clone();
        tweak(&mut p);
        // Re-checksum the tweaked packet so only the tweak differs.
        fix_checksums(&mut p);
        assert_valid(&p);
        segs[1] = p;
        let frames = coalesce(&segs);
        assert!(frames.len() >= 2, "{what}: merged anyway");
        let back: Vec<Vec<u8>> = frames.iter().flat_map(|f| expand(f)).collect();
        assert_eq!(back, segs, "{what}");
    }
    // IPv4 IDs are free when DF is set.
    let mut segs = segments(&base, 3, 1000);
    segs[1][4] ^= 0x40;
    fix_checksums(&mut segs[1]);
    assert_valid(&segs[1]);
    assert_eq!(merged_counts(&coalesce(&segs)), vec![3]);
    // IPv6: traffic class, flow label, hop limit.
    for (i, v) in [(1, 0x1b), (3, 0xdf), (7, 63)] {
        let mut segs = segments(&Spec::tcp6(0), 3, 1000);
        segs[1][i] = v;
        assert_valid(&segs[1]);
        assert_eq!(merged_counts(&coalesce(&segs)), vec![1, 1, 1], "byte {i}");
    }
}

#[test]
fn coalescer_passes_through_what_it_cannot_merge() {
    let segs = segments(&Spec::tcp4(0), 4, 1000);
    // Bad TCP checksum: passed through, and it ends the flow's super-packet.
    let mut bad = segs.clone();
    bad[2][40] ^= 0xff;
    let frames = coalesce(&bad);
    assert_eq!(merged_counts(&frames), vec![2, 1, 1]);
    assert_eq!(&frames[1][10..], &bad[2][..]);
    // Bad IPv4 header checksum.
    let mut bad = segs.clone();
    bad[1][10] ^= 1;
    assert_eq!(merged_counts(&coalesce(&bad)), vec![1, 1, 2]);
    // A pure ACK of the same flow in between.
    let mut ack = Spec::tcp4(0);
    ack.seq = ack.seq.wrapping_add(2000);
    let with_ack = vec![
        segs[0].clone(),
        segs[1].clone(),
        ack.packet(true),
        segs[2].clone(),
        segs[3].clone(),
    ];
    let frames = coalesce(&with_ack);
    assert_eq!(merged_counts(&frames), vec![2, 1, 2]);
    // IPv4 options never merge; neither do non-TCP packets or junk.
    let mut o = Spec::tcp4(0);
    o.ip_options = 4;
    let opt = segments(&o, 3, 1000);
    assert_eq!(merged_counts(&coalesce(&opt)), vec![1, 1, 1]);
    let junk = vec![
        vec![],
        vec![0x45; 3],
        Spec::udp4(100).packet(true),
        vec![0x60; 40],
    ];
    let frames = coalesce(&junk);
    assert_eq!(frames.len(), 4);
    for (f, p) in frames.iter().zip(&junk) {
        assert_eq!(&f[..10], &[0u8; 10]);
        assert_eq!(&f[10..], &p[..]);
    }
    // A short segment ends the super-packet; the next one starts a new one.
    let mut short = segments(&Spec::tcp4(0), 2, 1000);
    let mut s = Spec::tcp4(500);
    s.seq = s.seq.wrapping_add(2000);
    s.id = s.id.wrapping_add(2);
    short.push(s.packet(true));
    let mut t = Spec::tcp4(1000);
    t.seq = t.seq.wrapping_add(2500);
    t.id = t.id.wrapping_add(3);
    short.push(t.packet(true));
    assert_eq!(merged_counts(&coalesce(&short)), vec![3, 1]);
    // A larger segment after the first is not merged (gso_size is the first's payload).
    let mut grow = segments(&Spec::tcp4(0), 1, 1000);
    let mut g = Spec::tcp4(1001);
    g.seq = g.seq.wrapping_add(1000);
    g.id = g.id.wrapping_add(1);
    grow.push(g.packet(true));
    assert_eq!(merged_counts(&coalesce(&grow)), vec![1, 1]);
}

#[test]
fn coalescer_stays_within_64k() {
    let segs = segments(&Spec::tcp4(0), 60, 1448);
    let frames = coalesce(&segs);
    // (65535 - 40) / 1448 = 45 segments fit.
    assert_eq!(merged_counts(&frames), vec![45, 15]);
    for f in &frames {
        assert!(f.len() - 10 <= 65535);
    }
    let back: Vec<Vec<u8>> = frames.iter().flat_map(|f| expand(f)).collect();
    assert_eq!(back, segs);
    let mut out = PacketBuf::new();
    Coalescer::with_max_len(10_000).coalesce(&segs[..20], &mut out);
    // 40 + 6 * 1448 <= 10000 < 40 + 7 * 1448: 6 + 6 + 6 + 2.
    assert_eq!(out.len(), 4);
}

// ---------------------------------------------------------------------------------------------
// Random sizes
// ---------------------------------------------------------------------------------------------

#[test]
fn random_super_packets_round_trip() {
    let mut rng = StdRng::seed_from_u64(0x0ff1_0ad5);
    for _ in 0..400 {
        let v6 = rng.gen_bool(0.5);
        let tcp = rng.gen_bool(0.7);
        let ip_options = if v6 { 0 } else { 4 * rng.gen_range(0..=10) };
        let tcp_options = if tcp { 4 * rng.gen_range(0..=10) } else { 0 };
        let mut s = if tcp { Spec::tcp4(0) } else { Spec::udp4(0) };
        s.v6 = v6;
        s.ip_options = ip_options;
        s.tcp_options = tcp_options;
        let hdrs = s.headers_len();
        // At most 65535 IP bytes, so the segments coalesce back into one super-packet.
        let n = rng.gen_range(0..=65535 - hdrs);
        s.payload = (0..n).map(|_| rng.gen()).collect();
        s.seq = rng.gen();
        s.id = rng.gen();
        s.df = rng.gen_bool(0.5);
        if tcp {
            s.flags = ACK | [0, PSH, FIN, CWR, PSH | FIN | CWR][rng.gen_range(0..5)];
        }
        let mss = rng.gen_range(1..=1500u16);
        // USO would need up to 65535 one-byte datagrams: keep it realistic.
        let mss = if !tcp || n / usize::from(mss) > 2000 {
            mss.max(536)
        } else {
            mss
        };
        if ip_options > 0 && tcp && s.payload.len().div_ceil(usize::from(mss)) > 1 {
            // IPv4 options: segmentation works, GRO passes such packets through.
            let (hdr, p) = s.frame(mss);
            let mut out = PacketBuf::new();
            segment_packet(&hdr, &p, hdrs + usize::from(mss), &mut out).expect("segment");
            out.iter().for_each(assert_valid);
            let joined: Vec<u8> = out.iter().flat_map(|q| payload(q).to_vec()).collect();
            assert_eq!(joined, s.payload);
            continue;
        }
        round_trip(&s, mss);
    }
}

// ---------------------------------------------------------------------------------------------
// Microbenchmark: cargo test --release -p weft-core --test offload -- --ignored --nocapture
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "timing; run with --release --ignored --nocapture"]
fn bench_segment_and_coalesce() {
    let mss = 1448u16;
    let s = Spec::tcp4(44 * usize::from(mss));
    let (hdr, p) = s.frame(mss);
    let frame = framed(&hdr, &p);
    let mut out = PacketBuf::with_capacity(70_000, 64);
    let rounds = 20_000;
    for _ in 0..100 {
        out.clear();
        segment(&frame, 1500, &mut out).expect("segment");
    }
    let t = Instant::now();
    for _ in 0..rounds {
        out.clear();
        segment(std::hint::black_box(&frame), 1500, &mut out).expect("segment");
    }
    let seg_ns = t.elapsed().as_nanos() as f64 / f64::from(rounds);
    assert_eq!(out.len(), 44);
    let segs: Vec<Vec<u8>> = out.iter().map(<[u8]>::to_vec).collect();
    let mut c = Coalescer::new();
    let mut gro = PacketBuf::with_capacity(70_000, 64);
    let t = Instant::now();
    for _ in 0..rounds {
        gro.clear();
        c.coalesce(std::hint::black_box(&segs), &mut gro);
    }
    let gro_ns = t.elapsed().as_nanos() as f64 / f64::from(rounds);
    assert_eq!(gro.len(), 1);
    let data: Vec<u8> = (0..65536u32).map(|i| i as u8).collect();
    let t = Instant::now();
    let mut x = 0u16;
    for _ in 0..rounds {
        x ^= checksum(std::hint::black_box(&data), 0);
    }
    let csum_ns = t.elapsed().as_nanos() as f64 / f64::from(rounds);
    std::hint::black_box(x);
    println!(
        "segment 64 KiB TSO (44 x {mss}): {seg_ns:.0} ns/super-packet, {:.0} ns/segment, {:.2} GB/s",
        seg_ns / 44.0,
        p.len() as f64 / seg_ns
    );
    println!(
        "coalesce 44 segments: {gro_ns:.0} ns/batch, {:.0} ns/segment, {:.2} GB/s",
        gro_ns / 44.0,
        p.len() as f64 / gro_ns
    );
    println!(
        "checksum 64 KiB: {csum_ns:.0} ns, {:.2} GB/s",
        65536.0 / csum_ns
    );
}

// ---------------------------------------------------------------------------------------------
// UDP coalescing (USO on TUN writes)
// ---------------------------------------------------------------------------------------------

/// `sizes.len()` full-checksum UDP datagrams of one flow with consecutive IP IDs.
fn datagrams(base: &Spec, sizes: &[usize]) -> Vec<Vec<u8>> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let mut s = base.clone();
            s.id = base.id.wrapping_add(i as u16);
            s.payload = (0..n).map(|j| ((i * 7 + j) % 251) as u8).collect();
            s.packet(true)
        })
        .collect()
}

fn coalesce_udp(packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut out = PacketBuf::new();
    Coalescer::new().with_udp(true).coalesce(packets, &mut out);
    out.iter().map(<[u8]>::to_vec).collect()
}

#[test]
fn udp_datagrams_coalesce_into_uso_and_back() {
    for v6 in [false, true] {
        for df in [true, false] {
            let mut base = if v6 { Spec::udp6(0) } else { Spec::udp4(0) };
            base.df = df;
            // 40 equal datagrams and a shorter last one: one USO super-packet.
            let mut sizes = vec![1200; 40];
            sizes.push(17);
            let d = datagrams(&base, &sizes);
            let frames = coalesce_udp(&d);
            assert_eq!(frames.len(), 1, "v6 {v6} df {df}");
            let hdr = VirtioNetHdr::decode(&frames[0]).expect("header");
            assert_eq!(hdr.gso_type, VIRTIO_NET_HDR_GSO_UDP_L4);
            assert_eq!(hdr.gso_size, 1200);
            assert_eq!(hdr.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM);
            assert_eq!(hdr.csum_offset, 6);
            let back = expand(&frames[0]);
            assert_eq!(back, d, "v6 {v6} df {df}: re-segmented datagrams differ");
            for p in &back {
                assert_valid(p);
            }
        }
    }
}

#[test]
fn udp_is_not_coalesced_unless_asked() {
    let d = datagrams(&Spec::udp4(0), &[64; 10]);
    let frames = coalesce(&d);
    assert_eq!(merged_counts(&frames), vec![1; 10]);
    for (f, p) in frames.iter().zip(&d) {
        assert_eq!(&f[10..], &p[..]);
    }
}

#[test]
fn udp_coalescing_follows_linux_rules() {
    let base = Spec::udp4(0);
    // A shorter datagram ends the super-packet; a longer one starts a new one.
    let d = datagrams(&base, &[100, 100, 60, 100, 100]);
    assert_eq!(merged_counts(&coalesce_udp(&d)), vec![3, 2]);
    // Without DF the IP IDs must run on.
    let mut nodf = base.clone();
    nodf.df = false;
    let mut d = datagrams(&nodf, &[100; 4]);
    d[2][4..6].copy_from_slice(&7u16.to_be_bytes());
    fix_ip_checksum(&mut d[2]);
    assert_eq!(merged_counts(&coalesce_udp(&d)), vec![2, 1, 1]);
    assert_eq!(
        merged_counts(&coalesce_udp(&datagrams(&base, &[100, 120]))),
        vec![1, 1]
    );

    // At most 64 datagrams per super-packet.
    let d = datagrams(&base, &[64; 70]);
    assert_eq!(merged_counts(&coalesce_udp(&d)), vec![64, 6]);

    // Within 64 KiB.
    let d = datagrams(&base, &[1400; 60]);
    let counts = merged_counts(&coalesce_udp(&d));
    assert_eq!(counts.iter().sum::<usize>(), 60);
    assert!(counts.len() >= 2, "{counts:?}");
    for f in coalesce_udp(&d) {
        assert!(f.len() - 10 <= 65535);
    }

    // A zero (absent) or wrong checksum never merges.
    let mut d = datagrams(&base, &[64; 4]);
    d[1][26] = 0;
    d[1][27] = 0;
    d[2][40] ^= 0xff;
    assert_eq!(merged_counts(&coalesce_udp(&d)), vec![1, 1, 1, 1]);

    // Another flow (source port), TTL or TOS splits; TCP and UDP of the same ports never mix.
    let mut other = base.clone();
    other.sport = 40001;
    let a = datagrams(&base, &[64; 3]);
    let b = datagrams(&other, &[64; 3]);
    let mixed = vec![a[0].clone(), b[0].clone(), a[1].clone(), b[1].clone()];
    let frames = coalesce_udp(&mixed);
    assert_eq!(merged_counts(&frames), vec![2, 2]);
    let mut ttl = base.clone();
    ttl.ttl = 63;
    let mut d = datagrams(&base, &[64; 2]);
    d.push(datagrams(&ttl, &[64; 3]).remove(2));
    assert_eq!(merged_counts(&coalesce_udp(&d)), vec![2, 1]);
    let tcp = segments(&Spec::tcp4(0), 2, 64);
    let udp = datagrams(&base, &[64; 2]);
    let frames = coalesce_udp(&[
        udp[0].clone(),
        tcp[0].clone(),
        udp[1].clone(),
        tcp[1].clone(),
    ]);
    assert_eq!(merged_counts(&frames), vec![2, 2]);
}

fn fix_ip_checksum(p: &mut [u8]) {
    p[10] = 0;
    p[11] = 0;
    let c = !sum16(&p[..20], 0);
    p[10..12].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn trusted_checksums_are_not_summed_but_still_merge_correctly() {
    // Wrong transport checksums: refused by default, merged when trusted, and the super-packet
    // then carries a fresh checksum (as Linux does for CHECKSUM_UNNECESSARY packets).
    let mut segs = segments(&Spec::tcp4(0), 4, 1000);
    for s in &mut segs {
        s[36] ^= 0x55;
    }
    assert_eq!(merged_counts(&coalesce(&segs)), vec![1, 1, 1, 1]);
    let mut out = PacketBuf::new();
    Coalescer::new()
        .trust_checksums(true)
        .coalesce(&segs, &mut out);
    assert_eq!(out.len(), 1);
    let back = expand(out.get(0).expect("frame"));
    assert_eq!(back.len(), 4);
    for (b, s) in back.iter().zip(&segs) {
        assert_valid(b);
        assert_eq!(payload(b), payload(s));
    }
    // A bad IPv4 header checksum still never merges.
    let mut segs = segments(&Spec::tcp4(0), 3, 1000);
    segs[1][10] ^= 0x01;
    let mut out = PacketBuf::new();
    Coalescer::new()
        .trust_checksums(true)
        .coalesce(&segs, &mut out);
    assert_eq!(out.len(), 3);
}
