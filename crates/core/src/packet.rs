//! Minimal IP header inspection: the source and destination of a packet read from the TUN or
//! decrypted from a peer. Anything that is not a well-formed IPv4/IPv6 header yields `None`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Source and destination addresses of an IP packet, if its header is complete and the length
/// fields fit the buffer.
pub fn addresses(packet: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match packet.first()? >> 4 {
        4 => {
            if packet.len() < 20 {
                return None;
            }
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            if ihl < 20 || total < ihl || total > packet.len() {
                return None;
            }
            let src: [u8; 4] = packet[12..16].try_into().ok()?;
            let dst: [u8; 4] = packet[16..20].try_into().ok()?;
            Some((Ipv4Addr::from(src).into(), Ipv4Addr::from(dst).into()))
        }
        6 => {
            if packet.len() < 40 {
                return None;
            }
            let payload = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
            if 40 + payload > packet.len() {
                return None;
            }
            let src: [u8; 16] = packet[8..24].try_into().ok()?;
            let dst: [u8; 16] = packet[24..40].try_into().ok()?;
            Some((Ipv6Addr::from(src).into(), Ipv6Addr::from(dst).into()))
        }
        _ => None,
    }
}

/// A minimal IPv4 packet (20-byte header, TTL 64, header checksum left zero) carrying `payload`
/// as protocol `proto`: for tests and simulations that drive a node without a kernel.
pub fn ipv4_packet(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&u16::try_from(total).unwrap_or(u16::MAX).to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..].copy_from_slice(payload);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v4_and_v6_and_refuses_junk() {
        let mut v4 = [0u8; 28];
        v4[0] = 0x45;
        v4[2..4].copy_from_slice(&28u16.to_be_bytes());
        v4[12..16].copy_from_slice(&[10, 42, 1, 2]);
        v4[16..20].copy_from_slice(&[10, 42, 2, 3]);
        assert_eq!(
            addresses(&v4),
            Some((
                "10.42.1.2".parse().expect("ip"),
                "10.42.2.3".parse().expect("ip")
            ))
        );
        assert_eq!(addresses(&v4[..19]), None);
        let mut long = v4;
        long[2..4].copy_from_slice(&29u16.to_be_bytes());
        assert_eq!(addresses(&long), None);
        let mut v6 = [0u8; 48];
        v6[0] = 0x60;
        v6[4..6].copy_from_slice(&8u16.to_be_bytes());
        v6[23] = 1;
        v6[39] = 2;
        assert_eq!(
            addresses(&v6),
            Some(("::1".parse().expect("ip"), "::2".parse().expect("ip")))
        );
        assert_eq!(addresses(&[]), None);
        assert_eq!(addresses(&[0x50; 60]), None);
    }
}
