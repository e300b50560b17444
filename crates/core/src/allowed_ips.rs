//! Longest-prefix-match table for IPv4 and IPv6: the device-wide crypto-routing table.
//!
//! Outbound, the destination's most specific prefix picks the peer. Inbound, a decrypted packet
//! is accepted only if the most specific prefix for its *source* belongs to the peer that sent it.

use ipnet::IpNet;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

/// Prefixes mapped to values (peer ids). One map per prefix length, searched longest first.
#[derive(Debug, Clone)]
pub struct AllowedIps<T> {
    v4: BTreeMap<u8, HashMap<u32, T>>,
    v6: BTreeMap<u8, HashMap<u128, T>>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        AllowedIps {
            v4: BTreeMap::new(),
            v6: BTreeMap::new(),
        }
    }
}

fn mask4(addr: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        addr & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask6(addr: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        addr & (u128::MAX << (128 - u32::from(len)))
    }
}

impl<T> AllowedIps<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts `net` (host bits ignored), returning the value it replaced.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        match net {
            IpNet::V4(n) => {
                let len = n.prefix_len();
                self.v4
                    .entry(len)
                    .or_default()
                    .insert(mask4(u32::from(n.addr()), len), value)
            }
            IpNet::V6(n) => {
                let len = n.prefix_len();
                self.v6
                    .entry(len)
                    .or_default()
                    .insert(mask6(u128::from(n.addr()), len), value)
            }
        }
    }

    /// Removes exactly `net`, returning its value.
    pub fn remove(&mut self, net: &IpNet) -> Option<T> {
        match net {
            IpNet::V4(n) => {
                let len = n.prefix_len();
                let map = self.v4.get_mut(&len)?;
                let v = map.remove(&mask4(u32::from(n.addr()), len));
                if map.is_empty() {
                    self.v4.remove(&len);
                }
                v
            }
            IpNet::V6(n) => {
                let len = n.prefix_len();
                let map = self.v6.get_mut(&len)?;
                let v = map.remove(&mask6(u128::from(n.addr()), len));
                if map.is_empty() {
                    self.v6.remove(&len);
                }
                v
            }
        }
    }

    /// The value of the most specific prefix containing `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        match addr {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4
                    .iter()
                    .rev()
                    .find_map(|(len, map)| map.get(&mask4(a, *len)))
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6
                    .iter()
                    .rev()
                    .find_map(|(len, map)| map.get(&mask6(a, *len)))
            }
        }
    }

    /// Removes every prefix whose value matches `pred`.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        for map in self.v4.values_mut() {
            map.retain(|_, v| keep(v));
        }
        self.v4.retain(|_, m| !m.is_empty());
        for map in self.v6.values_mut() {
            map.retain(|_, v| keep(v));
        }
        self.v6.retain(|_, m| !m.is_empty());
    }

    pub fn len(&self) -> usize {
        self.v4.values().map(HashMap::len).sum::<usize>()
            + self.v6.values().map(HashMap::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: PartialEq> AllowedIps<T> {
    /// Crypto-routing check for an inbound packet: is `src`'s most specific owner `peer`?
    pub fn source_allowed(&self, src: IpAddr, peer: &T) -> bool {
        self.lookup(src) == Some(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn longest_prefix_wins_v4_and_v6() {
        let mut t = AllowedIps::new();
        t.insert(net("10.42.0.0/16"), "b");
        t.insert(net("10.42.3.7/32"), "c");
        t.insert(net("10.42.3.0/24"), "d");
        t.insert(net("fd00::/64"), "v6b");
        t.insert(net("fd00::1/128"), "v6c");
        assert_eq!(t.lookup(ip("10.42.3.7")), Some(&"c"));
        assert_eq!(t.lookup(ip("10.42.3.8")), Some(&"d"));
        assert_eq!(t.lookup(ip("10.42.9.9")), Some(&"b"));
        assert_eq!(t.lookup(ip("10.43.0.1")), None);
        assert_eq!(t.lookup(ip("fd00::1")), Some(&"v6c"));
        assert_eq!(t.lookup(ip("fd00::2")), Some(&"v6b"));
        assert_eq!(t.lookup(ip("fd01::2")), None);
        assert_eq!(t.len(), 5);
    }

    #[test]
    fn host_bits_ignored_and_default_route() {
        let mut t = AllowedIps::new();
        t.insert(net("10.42.1.77/24"), 1);
        t.insert(net("0.0.0.0/0"), 0);
        t.insert(net("::/0"), 6);
        assert_eq!(t.lookup(ip("10.42.1.1")), Some(&1));
        assert_eq!(t.lookup(ip("8.8.8.8")), Some(&0));
        assert_eq!(t.lookup(ip("2001:db8::1")), Some(&6));
        assert_eq!(t.remove(&net("10.42.1.0/24")), Some(1));
        assert_eq!(t.lookup(ip("10.42.1.1")), Some(&0));
    }

    #[test]
    fn crypto_routing_drops_source_owned_by_more_specific_peer() {
        // Peer B owns a /24, peer C a /32 inside it. A packet from the /32 arriving through B
        // must be refused: the most specific owner of the source is C, device-wide.
        let mut t = AllowedIps::new();
        t.insert(net("192.168.241.0/24"), 'B');
        t.insert(net("192.168.241.2/32"), 'C');
        assert!(!t.source_allowed(ip("192.168.241.2"), &'B'));
        assert!(t.source_allowed(ip("192.168.241.2"), &'C'));
        assert!(t.source_allowed(ip("192.168.241.3"), &'B'));
        assert!(!t.source_allowed(ip("192.168.242.1"), &'B'));
    }

    #[test]
    fn retain_removes_a_peer_entirely() {
        let mut t = AllowedIps::new();
        for i in 0..40u32 {
            for j in 0..52u32 {
                let n: IpNet = format!("10.{i}.{j}.0/24").parse().expect("net");
                t.insert(n, i);
            }
        }
        assert_eq!(t.len(), 40 * 52);
        t.retain(|v| *v != 7);
        assert_eq!(t.len(), 39 * 52);
        assert_eq!(t.lookup(ip("10.7.3.1")), None);
        t.retain(|_| false);
        assert!(t.is_empty());
    }

    #[test]
    fn agrees_with_naive_lookup() {
        // Pseudo-random prefixes and probes (fixed LCG, deterministic) against a linear scan.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        let mut t = AllowedIps::new();
        let mut naive: Vec<(IpNet, u32)> = Vec::new();
        for v in 0..300 {
            let len = (next() % 33) as u8;
            let addr = std::net::Ipv4Addr::from(next() & 0x0aff_ffff);
            let n = IpNet::V4(ipnet::Ipv4Net::new(addr, len).expect("len").trunc());
            t.insert(n, v);
            naive.retain(|(m, _)| *m != n);
            naive.push((n, v));
        }
        for _ in 0..2000 {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(next() & 0x0aff_ffff));
            let want = naive
                .iter()
                .filter(|(n, _)| n.contains(&a))
                .max_by_key(|(n, _)| n.prefix_len())
                .map(|(_, v)| v);
            assert_eq!(t.lookup(a), want, "{a}");
        }
    }
}
