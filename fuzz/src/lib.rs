//! Checks shared by the offload fuzz targets: an independent (byte-pair) checksum, validity of
//! emitted packets, and "repair" helpers that turn arbitrary bytes into mostly-valid frames and
//! TCP packets so the fuzzer reaches the segmentation and merge logic, not just the parsers.

use weft_core::offload::*;

/// Byte-pair one's-complement sum, folded, not complemented (independent of `offload::checksum`).
pub fn sum16(data: &[u8], initial: u32) -> u16 {
    let mut s = u64::from(initial);
    for pair in data.chunks(2) {
        s += u64::from(pair[0]) << 8 | pair.get(1).map_or(0, |&b| u64::from(b));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

pub fn is_v6(p: &[u8]) -> bool {
    p[0] >> 4 == 6
}

pub fn ip_hl(p: &[u8]) -> usize {
    if is_v6(p) {
        40
    } else {
        usize::from(p[0] & 0x0f) * 4
    }
}

pub fn proto(p: &[u8]) -> u8 {
    if is_v6(p) {
        p[6]
    } else {
        p[9]
    }
}

pub fn pseudo(p: &[u8], l4_len: usize) -> u32 {
    let addrs = if is_v6(p) { &p[8..40] } else { &p[12..20] };
    u32::from(sum16(addrs, 0)) + u32::from(proto(p)) + l4_len as u32
}

/// Transport header length (TCP data offset or 8 for UDP).
pub fn l4_hl(p: &[u8]) -> usize {
    if proto(p) == 6 {
        usize::from(p[ip_hl(p) + 12] >> 4) * 4
    } else {
        8
    }
}

/// Panics unless `p` is an IPv4/IPv6 TCP/UDP packet with matching length fields and correct
/// IPv4 header and transport checksums.
pub fn assert_valid(p: &[u8]) {
    assert!(p.len() >= 20);
    let hl = ip_hl(p);
    if is_v6(p) {
        assert_eq!(usize::from(u16::from_be_bytes([p[4], p[5]])) + 40, p.len());
    } else {
        assert_eq!(p[0] >> 4, 4);
        assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len());
        assert_eq!(sum16(&p[..hl], 0), 0xffff, "IPv4 header checksum");
    }
    let l4 = &p[hl..];
    assert!(matches!(proto(p), 6 | 17));
    assert_eq!(sum16(l4, pseudo(p, l4.len())), 0xffff, "transport checksum");
    if proto(p) == 17 {
        assert_eq!(usize::from(u16::from_be_bytes([l4[4], l4[5]])), l4.len());
        assert_ne!(&l4[6..8], &[0, 0]);
    }
}

/// Runs `segment` on `frame` and checks every property of the result; also `complete_checksum`.
pub fn check_segment(frame: &[u8], max_len: usize) {
    let mut out = PacketBuf::new();
    let result = segment(frame, max_len, &mut out);
    if let Ok((hdr, packet)) = VirtioNetHdr::split(frame) {
        // complete_checksum in place: generic validity, unchanged on error.
        let mut copy = packet.to_vec();
        match complete_checksum(&hdr, &mut copy) {
            Ok(()) if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 => {
                // The field held the pseudo-header sum: the receiver adds it back.
                let start = usize::from(hdr.csum_start);
                let at = start + usize::from(hdr.csum_offset);
                let partial = u16::from_be_bytes([packet[at], packet[at + 1]]);
                assert_eq!(sum16(&copy[start..], partial.into()), 0xffff);
                assert_eq!(copy[..at], packet[..at]);
                assert_eq!(copy[at + 2..], packet[at + 2..]);
            }
            _ => assert_eq!(copy, packet),
        }
    }
    let Ok(()) = result else {
        assert!(out.is_empty(), "output on error");
        return;
    };
    let (hdr, packet) = VirtioNetHdr::split(frame).expect("segment accepted the header");
    assert!(!out.is_empty());
    for seg in out.iter() {
        assert!(seg.len() <= max_len, "segment over the bound");
    }
    if hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE {
        assert_eq!(out.len(), 1);
        let mut expect = packet.to_vec();
        complete_checksum(&hdr, &mut expect).expect("segment completed it");
        assert_eq!(out.get(0), Some(&expect[..]));
        return;
    }
    let tcp = hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN != VIRTIO_NET_HDR_GSO_UDP_L4;
    let hdrs = ip_hl(packet) + l4_hl(packet);
    let mss = usize::from(hdr.gso_size);
    let mut joined = Vec::new();
    let n = out.len();
    for (i, seg) in out.iter().enumerate() {
        assert_valid(seg);
        assert_eq!(ip_hl(seg) + l4_hl(seg), hdrs);
        let pl = &seg[hdrs..];
        if i + 1 < n {
            assert_eq!(pl.len(), mss);
        } else {
            assert!(pl.len() <= mss);
        }
        joined.extend_from_slice(pl);
        if tcp {
            let hl = ip_hl(seg);
            let seq = |p: &[u8]| u32::from_be_bytes([p[hl + 4], p[hl + 5], p[hl + 6], p[hl + 7]]);
            assert_eq!(seq(seg), seq(packet).wrapping_add((i * mss) as u32));
        }
    }
    assert_eq!(&joined[..], &packet[hdrs..]);
}

/// Rewrites arbitrary bytes into a frame `segment` will mostly accept: a consistent virtio
/// header (type chosen by `mode`), IP version, lengths, no fragment bits, the right protocol,
/// a TCP data offset that fits.
pub fn repair_frame(raw: &[u8], mode: u8) -> Vec<u8> {
    let mut f = raw.to_vec();
    let v6 = mode & 2 != 0;
    let tcp = mode & 4 != 0;
    let gso = mode & 8 != 0;
    let min = VIRTIO_NET_HDR_LEN + if v6 { 40 } else { 20 } + if tcp { 20 } else { 8 };
    if f.len() < min {
        f.resize(min, 0);
    }
    let max_total = VIRTIO_NET_HDR_LEN + if v6 { 65535 + 40 } else { 65535 };
    f.truncate(max_total);
    let p = &mut f[VIRTIO_NET_HDR_LEN..];
    let len = p.len();
    let hl = if v6 {
        p[0] = 0x60 | (p[0] & 0x0f);
        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        p[6] = if tcp { 6 } else { 17 };
        40
    } else {
        let l4_min = if tcp { 20 } else { 8 };
        let mut ihl = usize::from(p[0] & 0x0f).max(5);
        while ihl * 4 + l4_min > len {
            ihl -= 1;
        }
        p[0] = 0x40 | ihl as u8;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[6] &= 0x40; // keep DF, clear MF and the offset
        p[7] = 0;
        p[9] = if tcp { 6 } else { 17 };
        ihl * 4
    };
    let l4h = if tcp {
        let mut doff = usize::from(p[hl + 12] >> 4).max(5);
        while hl + doff * 4 > len {
            doff -= 1;
        }
        p[hl + 12] = (doff as u8) << 4 | (p[hl + 12] & 0x0f);
        if gso {
            p[hl + 13] &= !0x06; // no SYN/RST in TSO
        }
        doff * 4
    } else {
        p[hl + 4..hl + 6].copy_from_slice(&((len - hl) as u16).to_be_bytes());
        8
    };
    let gso_type = match (gso, tcp, v6) {
        (false, ..) => VIRTIO_NET_HDR_GSO_NONE,
        (true, true, false) => VIRTIO_NET_HDR_GSO_TCPV4 | (mode & VIRTIO_NET_HDR_GSO_ECN),
        (true, true, true) => VIRTIO_NET_HDR_GSO_TCPV6 | (mode & VIRTIO_NET_HDR_GSO_ECN),
        (true, false, _) => VIRTIO_NET_HDR_GSO_UDP_L4,
    };
    let hdr = VirtioNetHdr {
        flags: if mode & 16 != 0 {
            0
        } else {
            VIRTIO_NET_HDR_F_NEEDS_CSUM
        },
        gso_type,
        hdr_len: (hl + l4h) as u16,
        gso_size: u16::from_le_bytes([
            raw.first().copied().unwrap_or(1),
            raw.get(1).copied().unwrap_or(0) & 0x07,
        ])
        .max(1),
        csum_start: hl as u16,
        csum_offset: if tcp { 16 } else { 6 },
    };
    f[..VIRTIO_NET_HDR_LEN].copy_from_slice(&hdr.encode());
    f
}

/// A TCP/IPv4 or TCP/IPv6 packet with correct checksums, from a compact description.
#[allow(clippy::too_many_arguments)]
pub fn tcp_packet(
    v6: bool,
    sport: u16,
    seq: u32,
    flags: u8,
    id: u16,
    df: bool,
    ttl: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let hl = if v6 { 40 } else { 20 };
    let thl = 20 + options.len() / 4 * 4;
    let len = hl + thl + payload.len();
    let mut p = vec![0u8; len];
    if v6 {
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        p[6] = 6;
        p[7] = ttl;
        p[8] = 0xfd;
        p[23] = 1;
        p[24] = 0xfd;
        p[39] = 2;
    } else {
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[6] = if df { 0x40 } else { 0 };
        p[8] = ttl;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let c = !sum16(&p[..20], 0);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
    let t = &mut p[hl..];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&80u16.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&7u32.to_be_bytes());
    t[12] = ((thl / 4) as u8) << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&1000u16.to_be_bytes());
    t[20..thl].copy_from_slice(&options[..thl - 20]);
    t[thl..].copy_from_slice(payload);
    let c = !sum16(&p[hl..], pseudo(&p, len - hl));
    p[hl + 16..hl + 18].copy_from_slice(&c.to_be_bytes());
    p
}

/// A packet with the fields a round trip through GRO and re-segmentation may legitimately
/// change zeroed: checksums (validated separately) and, under DF, the IPv4 ID.
pub fn normalized(p: &[u8]) -> Vec<u8> {
    let mut q = p.to_vec();
    if let Some((v6, hl)) = tcp_layout(p) {
        if !v6 {
            q[10] = 0;
            q[11] = 0;
            if p[6] & 0x40 != 0 {
                q[4] = 0;
                q[5] = 0;
            }
        }
        q[hl + 16] = 0;
        q[hl + 17] = 0;
    }
    q
}

/// (IPv6?, IP header length) of a TCP packet with consistent lengths.
pub fn tcp_layout(p: &[u8]) -> Option<(bool, usize)> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let hl = usize::from(p[0] & 0x0f) * 4;
            let ok = hl >= 20
                && usize::from(u16::from_be_bytes([p[2], p[3]])) == p.len()
                && p[9] == 6
                && u16::from_be_bytes([p[6], p[7]]) & 0x3fff == 0
                && p.len() >= hl + 20
                && p[hl + 12] >> 4 >= 5
                && p.len() >= hl + usize::from(p[hl + 12] >> 4) * 4;
            ok.then_some((false, hl))
        }
        6 if p.len() >= 40 => {
            let ok = usize::from(u16::from_be_bytes([p[4], p[5]])) + 40 == p.len()
                && p[6] == 6
                && p.len() >= 60
                && p[52] >> 4 >= 5
                && p.len() >= 40 + usize::from(p[52] >> 4) * 4;
            ok.then_some((true, 40))
        }
        _ => None,
    }
}

/// The flow a packet belongs to for the order check: TCP 5-tuple, or one bucket for the rest.
pub fn flow_of(p: &[u8]) -> Vec<u8> {
    match tcp_layout(p) {
        Some((v6, hl)) => {
            let mut k = if v6 {
                p[8..40].to_vec()
            } else {
                p[12..20].to_vec()
            };
            k.extend_from_slice(&p[hl..hl + 4]);
            k
        }
        None => Vec::new(),
    }
}

/// Coalesces `packets` and checks: every frame is a zero-header pass-through or a valid
/// TCP super-packet of at least two segments within 64 KiB whose re-segmentation gives valid
/// packets; the re-expanded packets are the input packets, in order within each flow.
pub fn check_coalesce(packets: &[Vec<u8>]) {
    let mut out = PacketBuf::new();
    let n = Coalescer::new().coalesce(packets, &mut out);
    assert_eq!(n, out.len());
    let mut expanded: Vec<Vec<u8>> = Vec::new();
    for frame in out.iter() {
        let hdr = VirtioNetHdr::decode(frame).expect("own header");
        let body = &frame[VIRTIO_NET_HDR_LEN..];
        if hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE {
            assert_eq!(hdr, VirtioNetHdr::default());
            expanded.push(body.to_vec());
            continue;
        }
        assert!(body.len() <= 65535);
        assert_eq!(hdr.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(usize::from(hdr.csum_start), ip_hl(body));
        assert_eq!(hdr.csum_offset, 16);
        assert_eq!(usize::from(hdr.hdr_len), ip_hl(body) + l4_hl(body));
        // What the kernel does with NEEDS_CSUM: complete the sum; it must then be valid.
        let mut whole = body.to_vec();
        let plain = VirtioNetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_NONE,
            gso_size: 0,
            ..hdr
        };
        complete_checksum(&plain, &mut whole).expect("complete");
        if !is_v6(body) {
            assert_eq!(sum16(&body[..20], 0), 0xffff);
        }
        let hl = ip_hl(body);
        assert_eq!(sum16(&whole[hl..], pseudo(body, body.len() - hl)), 0xffff);
        let mut segs = PacketBuf::new();
        segment(frame, 65535, &mut segs).expect("re-segment a coalesced frame");
        assert!(segs.len() >= 2);
        for s in segs.iter() {
            assert_valid(s);
            expanded.push(s.to_vec());
        }
    }
    if std::env::var_os("WEFT_FUZZ_VERBOSE").is_some() {
        let merged = out
            .iter()
            .filter(|f| f[1] != VIRTIO_NET_HDR_GSO_NONE)
            .count();
        eprintln!(
            "{} packets -> {} frames, {merged} super-packets",
            packets.len(),
            n
        );
    }
    assert_eq!(expanded.len(), packets.len(), "packets lost or invented");
    // Within each flow, the same packets in the same order.
    let mut flows: Vec<Vec<u8>> = packets.iter().map(|p| flow_of(p)).collect();
    flows.sort();
    flows.dedup();
    for flow in flows {
        let a: Vec<Vec<u8>> = packets
            .iter()
            .filter(|p| flow_of(p) == flow)
            .map(|p| normalized(p))
            .collect();
        let b: Vec<Vec<u8>> = expanded
            .iter()
            .filter(|p| flow_of(p) == flow)
            .map(|p| normalized(p))
            .collect();
        assert_eq!(a, b, "flow order or content changed");
    }
}
