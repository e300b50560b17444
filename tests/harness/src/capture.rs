//! Packet capture with tcpdump and a small pcap reader/classifier.
//!
//! [`Capture::start`] runs `tcpdump -U -s 0 -w - -i IF [filter]` inside a namespace with its output
//! going to a file we opened (no tcpdump privilege-drop/AppArmor issues with the file), and returns
//! only after tcpdump printed "listening on" (the capture is live). [`Capture::stop`] waits a
//! moment for in-flight packets, sends SIGINT, waits for tcpdump to exit and parses the file.

use crate::util::{describe, spawn_owned, wait_child, Proc};
use anyhow::{anyhow, bail, Context, Result};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running capture.
#[derive(Debug)]
pub struct Capture {
    pub ns: String,
    pub iface: String,
    pub file: PathBuf,
    proc: Proc,
    stderr_rx: mpsc::Receiver<String>,
}

impl Capture {
    /// Starts `tcpdump` on `iface` in namespace `ns` writing to `file`; `filter` is a pcap filter
    /// expression ("" for everything). Returns once tcpdump reports it is listening.
    pub fn start_to(ns: &str, iface: &str, filter: &str, file: &Path) -> Result<Capture> {
        let out = File::create(file).with_context(|| format!("creating {}", file.display()))?;
        let mut cmd = crate::util::ns_cmd(ns, "tcpdump");
        cmd.args([
            "-U",
            "--immediate-mode",
            "-B",
            "32768",
            "-n",
            "-s",
            "0",
            "-w",
            "-",
            "-i",
            iface,
        ]);
        if !filter.trim().is_empty() {
            cmd.args(filter.split_whitespace());
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::piped());
        let mut child =
            spawn_owned(&mut cmd).with_context(|| format!("starting `{}`", describe(&cmd)))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("no stderr pipe"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            // receiver gone: keep draining so tcpdump never blocks
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        let mut proc = Proc::from_child(&format!("tcpdump {ns}/{iface}"), child);
        let mut early = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => {
                    let listening = l.contains("listening on");
                    early.push(l);
                    if listening {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!(
                        "tcpdump on {ns}/{iface} exited before listening: {}",
                        early.join(" | ")
                    )
                }
            }
            if !proc.running() {
                // Collect what it said.
                while let Ok(l) = rx.try_recv() {
                    early.push(l);
                }
                bail!(
                    "tcpdump on {ns}/{iface} exited before listening: {}",
                    early.join(" | ")
                );
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "tcpdump on {ns}/{iface} did not report listening within 10 s: {}",
                    early.join(" | ")
                );
            }
        }
        Ok(Capture {
            ns: ns.to_string(),
            iface: iface.to_string(),
            file: file.to_path_buf(),
            proc,
            stderr_rx: rx,
        })
    }

    /// Stops the capture (after a 300 ms grace for packets still in flight), flushes and parses.
    pub fn stop(mut self) -> Result<Packets> {
        std::thread::sleep(Duration::from_millis(300));
        self.proc.signal(libc::SIGINT);
        if wait_child(&mut self.proc.child, Duration::from_secs(5)).is_none() {
            self.proc.terminate();
        }
        let mut stats = Vec::new();
        while let Ok(l) = self.stderr_rx.recv_timeout(Duration::from_millis(200)) {
            stats.push(l);
        }
        let dropped_by_kernel = stats
            .iter()
            .find(|l| l.contains("dropped by kernel"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let bytes = std::fs::read(&self.file)
            .with_context(|| format!("reading {}", self.file.display()))?;
        let mut p =
            parse_pcap(&bytes).with_context(|| format!("parsing {}", self.file.display()))?;
        p.tcpdump_report = stats.join("\n");
        p.dropped_by_kernel = dropped_by_kernel;
        p.source = format!("{}/{}", self.ns, self.iface);
        Ok(p)
    }
}

/// Link types we understand.
pub const LINKTYPE_ETHERNET: u32 = 1;
pub const LINKTYPE_RAW: u32 = 101;
pub const DLT_RAW: u32 = 12;
pub const LINKTYPE_IPV4: u32 = 228;
pub const LINKTYPE_IPV6: u32 = 229;
pub const LINKTYPE_LINUX_SLL: u32 = 113;
pub const LINKTYPE_LINUX_SLL2: u32 = 276;

/// One captured packet.
#[derive(Debug, Clone)]
pub struct Packet {
    pub ts_secs: f64,
    pub orig_len: u32,
    pub data: Vec<u8>,
    /// Offset of the network-layer header in `data` and its ethertype (0x0800 IPv4, 0x86dd IPv6,
    /// 0x0806 ARP); `None` when not understood.
    pub l3: Option<(usize, u16)>,
}

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86dd;
pub const ETH_ARP: u16 = 0x0806;

/// Parsed IPv4 header plus, for UDP/TCP first fragments, the ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4Info {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    /// Non-first fragment (no L4 header in it).
    pub later_fragment: bool,
    pub more_fragments: bool,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    /// Offset of the L4 payload (after the UDP/TCP header) in the packet data.
    pub payload_off: Option<usize>,
    /// ICMP type for proto 1.
    pub icmp_type: Option<u8>,
}

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

impl Packet {
    pub fn ethertype(&self) -> Option<u16> {
        self.l3.map(|(_, t)| t)
    }

    pub fn is_arp(&self) -> bool {
        self.ethertype() == Some(ETH_ARP)
    }

    pub fn is_ipv6(&self) -> bool {
        self.ethertype() == Some(ETH_IPV6)
    }

    /// Contains `needle` anywhere in the captured bytes.
    pub fn contains(&self, needle: &[u8]) -> bool {
        find(&self.data, needle)
    }

    pub fn ipv4(&self) -> Option<Ipv4Info> {
        let (off, t) = self.l3?;
        if t != ETH_IPV4 {
            return None;
        }
        let d = self.data.get(off..)?;
        if d.len() < 20 || d[0] >> 4 != 4 {
            return None;
        }
        let ihl = usize::from(d[0] & 0x0f) * 4;
        let frag = u16::from_be_bytes([d[6], d[7]]);
        let later_fragment = frag & 0x1fff != 0;
        let more_fragments = frag & 0x2000 != 0;
        let proto = d[9];
        let src = Ipv4Addr::new(d[12], d[13], d[14], d[15]);
        let dst = Ipv4Addr::new(d[16], d[17], d[18], d[19]);
        let mut info = Ipv4Info {
            src,
            dst,
            proto,
            later_fragment,
            more_fragments,
            src_port: None,
            dst_port: None,
            payload_off: None,
            icmp_type: None,
        };
        if !later_fragment {
            let l4 = d.get(ihl..).unwrap_or(&[]);
            match proto {
                PROTO_UDP if l4.len() >= 8 => {
                    info.src_port = Some(u16::from_be_bytes([l4[0], l4[1]]));
                    info.dst_port = Some(u16::from_be_bytes([l4[2], l4[3]]));
                    info.payload_off = Some(off + ihl + 8);
                }
                PROTO_TCP if l4.len() >= 20 => {
                    info.src_port = Some(u16::from_be_bytes([l4[0], l4[1]]));
                    info.dst_port = Some(u16::from_be_bytes([l4[2], l4[3]]));
                    let doff = usize::from(l4[12] >> 4) * 4;
                    info.payload_off = Some(off + ihl + doff);
                }
                PROTO_ICMP if !l4.is_empty() => {
                    info.icmp_type = Some(l4[0]);
                    info.payload_off = Some(off + ihl + 8.min(l4.len()));
                }
                _ => {}
            }
        }
        Some(info)
    }

    /// For an ICMP error (destination unreachable, time exceeded, ...) quoting a UDP packet: the
    /// quoted packet's (source port, destination port).
    pub fn icmp_quoted_udp_ports(&self) -> Option<(u16, u16)> {
        let i = self.ipv4()?;
        if i.proto != PROTO_ICMP || !matches!(i.icmp_type, Some(3 | 4 | 5 | 11 | 12)) {
            return None;
        }
        let q = self.data.get(i.payload_off?..)?;
        if q.len() < 28 || q[0] >> 4 != 4 || q[9] != PROTO_UDP {
            return None;
        }
        let ihl = usize::from(q[0] & 0x0f) * 4;
        let u = q.get(ihl..ihl + 4)?;
        Some((
            u16::from_be_bytes([u[0], u[1]]),
            u16::from_be_bytes([u[2], u[3]]),
        ))
    }

    /// UDP payload (first fragment only).
    pub fn udp_payload(&self) -> Option<&[u8]> {
        let i = self.ipv4()?;
        if i.proto != PROTO_UDP {
            return None;
        }
        self.data.get(i.payload_off?..)
    }

    /// WireGuard message type (1 initiation, 2 response, 3 cookie, 4 data) when the UDP payload
    /// starts with `[type, 0, 0, 0]` and has a plausible length.
    pub fn wireguard_type(&self) -> Option<u8> {
        let p = self.udp_payload()?;
        if p.len() < 4 || p[1] != 0 || p[2] != 0 || p[3] != 0 {
            return None;
        }
        match (p[0], p.len()) {
            (1, 148) | (2, 92) | (3, 64) => Some(p[0]),
            (4, n) if n >= 32 => Some(4),
            _ => None,
        }
    }

    /// A short human description (for assertion messages).
    pub fn summary(&self) -> String {
        if let Some(i) = self.ipv4() {
            let ports = match (i.src_port, i.dst_port) {
                (Some(s), Some(d)) => format!(":{s} -> :{d}"),
                _ => String::new(),
            };
            return format!(
                "IPv4 {} -> {} proto {}{} len {}{}",
                i.src,
                i.dst,
                i.proto,
                ports,
                self.orig_len,
                if i.later_fragment { " (fragment)" } else { "" }
            );
        }
        match self.ethertype() {
            Some(ETH_ARP) => "ARP".into(),
            Some(ETH_IPV6) => format!("IPv6 len {}", self.orig_len),
            Some(t) => format!("ethertype {t:#06x} len {}", self.orig_len),
            None => format!("unparsed len {}", self.orig_len),
        }
    }
}

/// All packets of one capture.
#[derive(Debug, Clone, Default)]
pub struct Packets {
    pub linktype: u32,
    pub packets: Vec<Packet>,
    /// "ns/iface".
    pub source: String,
    /// tcpdump's closing report ("N packets captured ...").
    pub tcpdump_report: String,
    pub dropped_by_kernel: u64,
}

impl Packets {
    pub fn len(&self) -> usize {
        self.packets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// Any packet contains `needle`.
    pub fn contains_bytes(&self, needle: &[u8]) -> bool {
        self.packets.iter().any(|p| p.contains(needle))
    }

    /// Number of packets containing `needle`.
    pub fn count_containing(&self, needle: &[u8]) -> usize {
        self.packets.iter().filter(|p| p.contains(needle)).count()
    }

    /// Any packet contains any form of the marker (ASCII or raw bytes).
    pub fn contains_marker(&self, m: &Marker) -> bool {
        self.packets.iter().any(|p| m.in_packet(p))
    }

    /// Packets containing any form of the marker.
    pub fn marker_packets(&self, m: &Marker) -> Vec<&Packet> {
        self.packets.iter().filter(|p| m.in_packet(p)).collect()
    }

    pub fn ipv4(&self) -> impl Iterator<Item = (&Packet, Ipv4Info)> {
        self.packets.iter().filter_map(|p| p.ipv4().map(|i| (p, i)))
    }

    /// WireGuard data packets (type 4).
    pub fn wireguard_data_count(&self) -> usize {
        self.packets
            .iter()
            .filter(|p| p.wireguard_type() == Some(4))
            .count()
    }

    /// WireGuard handshake messages (types 1, 2 and 3).
    pub fn wireguard_handshake_count(&self) -> usize {
        self.packets
            .iter()
            .filter(|p| matches!(p.wireguard_type(), Some(1..=3)))
            .count()
    }

    /// IPv4 packets between two addresses of `among` (all IPv4 packets when `among` is empty)
    /// that are not UDP with source or destination port in `ports`. Allowed besides: ICMP errors
    /// quoting such a UDP packet (e.g. "port unreachable" from a node whose daemon is down; they
    /// carry only the first bytes of the encrypted datagram). Non-first fragments count as
    /// violations; ARP and IPv6 are not IPv4 and are ignored.
    pub fn ipv4_violations(&self, among: &[Ipv4Addr], ports: &[u16]) -> Vec<String> {
        self.ipv4_violations_where(
            |i| among.is_empty() || (among.contains(&i.src) && among.contains(&i.dst)),
            ports,
        )
    }

    /// Like [`Packets::ipv4_violations`], for every IPv4 packet sent by or to one of `hosts`
    /// (the nodes): the underlay router's own housekeeping (IGMP reports of its bridge, say)
    /// is not node traffic and is left out.
    pub fn ipv4_violations_of_hosts(&self, hosts: &[Ipv4Addr], ports: &[u16]) -> Vec<String> {
        self.ipv4_violations_where(|i| hosts.contains(&i.src) || hosts.contains(&i.dst), ports)
    }

    fn ipv4_violations_where(
        &self,
        keep: impl Fn(&Ipv4Info) -> bool,
        ports: &[u16],
    ) -> Vec<String> {
        self.ipv4()
            .filter(|(_, i)| keep(i))
            .filter(|(p, i)| {
                let wg_udp = i.proto == PROTO_UDP
                    && !i.later_fragment
                    && (i.dst_port.is_some_and(|p| ports.contains(&p))
                        || i.src_port.is_some_and(|p| ports.contains(&p)));
                let icmp_about_wg = p
                    .icmp_quoted_udp_ports()
                    .is_some_and(|(s, d)| ports.contains(&s) || ports.contains(&d));
                !(wg_udp || icmp_about_wg)
            })
            .map(|(p, _)| p.summary())
            .collect()
    }

    /// IPv4 packets whose source or destination is inside `net/prefix` (e.g. a pod range seen on
    /// the underlay = plaintext leak).
    pub fn ipv4_touching(&self, net: Ipv4Addr, prefix: u8) -> Vec<String> {
        self.ipv4()
            .filter(|(_, i)| in_net(i.src, net, prefix) || in_net(i.dst, net, prefix))
            .map(|(p, _)| p.summary())
            .collect()
    }

    /// One line per packet, for debugging (first `max`).
    pub fn dump(&self, max: usize) -> String {
        self.packets
            .iter()
            .take(max)
            .map(Packet::summary)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Whether `a` lies in `net/prefix`.
pub fn in_net(a: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let mask = u32::MAX << (32 - u32::from(prefix.min(32)));
    (u32::from(a) & mask) == (u32::from(net) & mask)
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// A random marker: 16 lowercase hex characters. Its ASCII form goes into TCP/UDP payloads; its
/// 8 raw bytes are what `ping -p HEX` repeats in ICMP payloads. A capture is searched for both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker(String);

impl Marker {
    pub fn random() -> Marker {
        let v: u64 = rand::random();
        Marker(format!("{v:016x}"))
    }

    pub fn from_hex(s: &str) -> Result<Marker> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("marker must be 16 hex chars");
        }
        Ok(Marker(s.to_ascii_lowercase()))
    }

    /// The 16 hex characters (use as `ping -p` pattern and as payload text).
    pub fn hex(&self) -> &str {
        &self.0
    }

    pub fn ascii(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The 8 bytes the hex string denotes.
    pub fn raw(&self) -> Vec<u8> {
        (0..8)
            .map(|i| u8::from_str_radix(&self.0[2 * i..2 * i + 2], 16).unwrap_or(0))
            .collect()
    }

    pub fn in_packet(&self, p: &Packet) -> bool {
        p.contains(self.ascii()) || p.contains(&self.raw())
    }
}

impl std::fmt::Display for Marker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses a classic libpcap file (either byte order, micro- or nanosecond timestamps).
pub fn parse_pcap(b: &[u8]) -> Result<Packets> {
    if b.is_empty() {
        // tcpdump killed before writing the header: no packets.
        return Ok(Packets::default());
    }
    if b.len() < 24 {
        bail!("pcap file too short ({} bytes)", b.len());
    }
    let magic_le = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let (le, nanos) = match magic_le {
        0xa1b2c3d4 => (true, false),
        0xa1b23c4d => (true, true),
        0xd4c3b2a1 => (false, false),
        0x4d3cb2a1 => (false, true),
        m => bail!("not a pcap file (magic {m:#x}); pcapng is not supported"),
    };
    let u32at = |o: usize| -> u32 {
        let a = [b[o], b[o + 1], b[o + 2], b[o + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let linktype = u32at(20) & 0x0fff_ffff;
    let mut packets = Vec::new();
    let mut off = 24;
    while off + 16 <= b.len() {
        let sec = u32at(off);
        let frac = u32at(off + 4);
        let incl = u32at(off + 8) as usize;
        let orig = u32at(off + 12);
        off += 16;
        if off + incl > b.len() {
            break; // truncated last record (capture killed mid-write)
        }
        let data = b[off..off + incl].to_vec();
        off += incl;
        let ts = f64::from(sec) + f64::from(frac) / if nanos { 1e9 } else { 1e6 };
        let l3 = l3_of(linktype, &data);
        packets.push(Packet {
            ts_secs: ts,
            orig_len: orig,
            data,
            l3,
        });
    }
    Ok(Packets {
        linktype,
        packets,
        ..Default::default()
    })
}

fn l3_of(linktype: u32, d: &[u8]) -> Option<(usize, u16)> {
    match linktype {
        LINKTYPE_ETHERNET => {
            let mut off = 12;
            let mut t = u16::from_be_bytes([*d.get(off)?, *d.get(off + 1)?]);
            // Skip 802.1Q / 802.1ad tags.
            while t == 0x8100 || t == 0x88a8 {
                off += 4;
                t = u16::from_be_bytes([*d.get(off)?, *d.get(off + 1)?]);
            }
            Some((off + 2, t))
        }
        LINKTYPE_RAW | DLT_RAW => match d.first()? >> 4 {
            4 => Some((0, ETH_IPV4)),
            6 => Some((0, ETH_IPV6)),
            _ => None,
        },
        LINKTYPE_IPV4 => Some((0, ETH_IPV4)),
        LINKTYPE_IPV6 => Some((0, ETH_IPV6)),
        LINKTYPE_LINUX_SLL => Some((16, u16::from_be_bytes([*d.get(14)?, *d.get(15)?]))),
        LINKTYPE_LINUX_SLL2 => Some((20, u16::from_be_bytes([*d.first()?, *d.get(1)?]))),
        _ => None,
    }
}

/// Runs `tcpdump -r FILE -nn` for a human-readable dump (debugging aid).
pub fn tcpdump_text(file: &Path) -> Result<String> {
    crate::util::run(Command::new("tcpdump").args(["-nn", "-r"]).arg(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pcap(linktype: u32, pkts: &[Vec<u8>]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&0xa1b2c3d4u32.to_le_bytes());
        v.extend_from_slice(&2u16.to_le_bytes());
        v.extend_from_slice(&4u16.to_le_bytes());
        v.extend_from_slice(&[0; 8]);
        v.extend_from_slice(&65535u32.to_le_bytes());
        v.extend_from_slice(&linktype.to_le_bytes());
        for p in pkts {
            v.extend_from_slice(&1u32.to_le_bytes());
            v.extend_from_slice(&500_000u32.to_le_bytes());
            v.extend_from_slice(&(p.len() as u32).to_le_bytes());
            v.extend_from_slice(&(p.len() as u32).to_le_bytes());
            v.extend_from_slice(p);
        }
        v
    }

    fn udp4(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16, payload: &[u8]) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        ip.extend_from_slice(&sp.to_be_bytes());
        ip.extend_from_slice(&dp.to_be_bytes());
        ip.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(payload);
        ip
    }

    fn eth(t: u16, l3: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 12];
        v.extend_from_slice(&t.to_be_bytes());
        v.extend_from_slice(l3);
        v
    }

    #[test]
    fn parses_and_classifies() {
        let mut wg = vec![4, 0, 0, 0];
        wg.extend_from_slice(&[0x55; 60]);
        let marker = Marker::from_hex("0123456789abcdef").expect("hex");
        let mut plain = b"xx".to_vec();
        plain.extend_from_slice(marker.ascii());
        let pk = vec![
            eth(
                ETH_IPV4,
                &udp4([198, 18, 0, 10], [198, 18, 0, 11], 51820, 51820, &wg),
            ),
            eth(
                ETH_IPV4,
                &udp4([10, 42, 1, 10], [10, 42, 2, 10], 1234, 80, &plain),
            ),
            eth(ETH_ARP, &[0; 28]),
        ];
        let p = parse_pcap(&pcap(1, &pk)).expect("parse");
        assert_eq!(p.len(), 3);
        assert_eq!(p.wireguard_data_count(), 1);
        assert!(p.contains_marker(&marker));
        assert_eq!(p.marker_packets(&marker).len(), 1);
        let among = [Ipv4Addr::new(198, 18, 0, 10), Ipv4Addr::new(198, 18, 0, 11)];
        assert!(p.ipv4_violations(&among, &[51820]).is_empty());
        assert_eq!(p.ipv4_violations(&[], &[51820]).len(), 1);
        assert_eq!(p.ipv4_touching(Ipv4Addr::new(10, 42, 0, 0), 16).len(), 1);
        assert!(p.packets[2].is_arp());

        // ICMP port unreachable quoting a WireGuard datagram is allowed, other ICMP is not.
        let quoted = udp4([198, 18, 0, 10], [198, 18, 0, 11], 51820, 51820, &wg[..8]);
        let mut icmp = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 198, 18, 0, 11, 198, 18, 0, 10,
        ];
        icmp.extend_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
        icmp.extend_from_slice(&quoted);
        let mut echo = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 198, 18, 0, 11, 198, 18, 0, 10,
        ];
        echo.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0]);
        let p2 = parse_pcap(&pcap(1, &[eth(ETH_IPV4, &icmp), eth(ETH_IPV4, &echo)])).expect("icmp");
        assert_eq!(p2.packets[0].icmp_quoted_udp_ports(), Some((51820, 51820)));
        assert_eq!(p2.ipv4_violations(&among, &[51820]).len(), 1);

        let raw = parse_pcap(&pcap(
            101,
            &[udp4([1, 1, 1, 1], [2, 2, 2, 2], 1, 2, &marker.raw())],
        ))
        .expect("raw");
        assert_eq!(raw.packets[0].ipv4().expect("v4").dst_port, Some(2));
        assert!(raw.contains_marker(&marker));
        assert_eq!(
            marker.raw(),
            vec![0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]
        );
    }

    #[test]
    fn in_net_works() {
        assert!(in_net(
            Ipv4Addr::new(10, 42, 3, 4),
            Ipv4Addr::new(10, 42, 0, 0),
            16
        ));
        assert!(!in_net(
            Ipv4Addr::new(10, 43, 3, 4),
            Ipv4Addr::new(10, 42, 0, 0),
            16
        ));
        assert!(in_net(
            Ipv4Addr::new(1, 2, 3, 4),
            Ipv4Addr::new(0, 0, 0, 0),
            0
        ));
    }
}
