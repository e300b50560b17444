//! Conntrack entries over ctnetlink (`NETLINK_NETFILTER`, subsystem `NFNL_SUBSYS_CTNETLINK`),
//! without the `conntrack` binary.
//!
//! In: nothing ([`conntrack_flows`]: a dump of the calling thread's network namespace, IPv4
//! and IPv6), or flows to forget ([`conntrack_delete`]). Out: the original-direction tuple of
//! every entry as a [`CtFlow`] (ports 0 for protocols without ports, such as ICMP), or how many
//! entries were deleted (an entry already gone is no error). Used after a NetworkPolicy change:
//! `ct state established` accepts packets of flows the new policy denies until their entries go.

use super::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;

/// A conntrack entry's original-direction tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtFlow {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// 0 for protocols without ports.
    pub sport: u16,
    pub dport: u16,
}

/// Protocols whose conntrack tuple is (source port, destination port).
fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 33 | 132 | 136) // TCP, UDP, DCCP, SCTP, UDP-Lite
}

fn ip(d: &[u8]) -> Option<IpAddr> {
    match d.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(d).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(d).ok()?))),
        _ => None,
    }
}

/// The flow of a `CTA_TUPLE_ORIG` attribute's payload.
fn parse_tuple(t: &[u8]) -> Option<CtFlow> {
    let ipa = attr(t, CTA_TUPLE_IP)?;
    let (src, dst) = match (attr(ipa, CTA_IP_V4_SRC), attr(ipa, CTA_IP_V4_DST)) {
        (Some(s), Some(d)) => (ip(s)?, ip(d)?),
        _ => (
            ip(attr(ipa, CTA_IP_V6_SRC)?)?,
            ip(attr(ipa, CTA_IP_V6_DST)?)?,
        ),
    };
    let p = attr(t, CTA_TUPLE_PROTO)?;
    let proto = *attr(p, CTA_PROTO_NUM)?.first()?;
    let (sport, dport) = if has_ports(proto) {
        (
            attr(p, CTA_PROTO_SRC_PORT).and_then(be_u16).unwrap_or(0),
            attr(p, CTA_PROTO_DST_PORT).and_then(be_u16).unwrap_or(0),
        )
    } else {
        (0, 0)
    };
    Some(CtFlow {
        src,
        dst,
        proto,
        sport,
        dport,
    })
}

/// Every entry: its flow and the raw `CTA_TUPLE_ORIG` payload (to delete it exactly, e.g.
/// ICMP entries, whose tuple holds the id, type and code a [`CtFlow`] does not).
fn dump(sock: &mut Socket) -> Result<Vec<(CtFlow, u8, Vec<u8>)>, SysError> {
    let ctx = "dumping conntrack entries";
    for attempt in 1u32..=10 {
        let m = Msg::new(
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
            (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            attempt,
            libc::AF_UNSPEC as u8,
            0,
        );
        let replies = match sock.dump(&m.finish(), attempt) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => return Err(SysError::io(ctx, e)),
        };
        let mut out = Vec::with_capacity(replies.len());
        for r in replies {
            if r.kind != (NFNL_SUBSYS_CTNETLINK << 8) {
                // IPCTNL_MSG_CT_NEW: the entries of a dump
                continue;
            }
            let Some(t) = attr(r.nfattrs(), CTA_TUPLE_ORIG) else {
                continue;
            };
            if let Some(f) = parse_tuple(t) {
                out.push((f, r.family(), t.to_vec()));
            }
        }
        return Ok(out);
    }
    Err(SysError::Unexpected(format!(
        "{ctx}: the table kept changing during the dump"
    )))
}

fn open(ctx: &str) -> Result<Socket, SysError> {
    let sock = Socket::open().map_err(|e| SysError::io(format!("{ctx}: socket"), e))?;
    sock.size_buffers(1 << 16, 8 << 20);
    Ok(sock)
}

/// The original-direction tuples of the conntrack entries of the calling thread's network
/// namespace (IPv4 and IPv6).
pub fn conntrack_flows() -> Result<Vec<CtFlow>, SysError> {
    let mut sock = open("dumping conntrack entries")?;
    Ok(dump(&mut sock)?.into_iter().map(|(f, _, _)| f).collect())
}

/// `CTA_TUPLE_ORIG` for a flow with ports.
fn tuple_msg(m: &mut Msg, f: &CtFlow) {
    m.begin(CTA_TUPLE_ORIG).begin(CTA_TUPLE_IP);
    match (f.src, f.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            m.attr(CTA_IP_V4_SRC, &s.octets())
                .attr(CTA_IP_V4_DST, &d.octets());
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                IpAddr::V6(a) => a.octets(),
            };
            m.attr(CTA_IP_V6_SRC, &v6(s)).attr(CTA_IP_V6_DST, &v6(d));
        }
    }
    m.end()
        .begin(CTA_TUPLE_PROTO)
        .attr(CTA_PROTO_NUM, &[f.proto])
        .attr(CTA_PROTO_SRC_PORT, &f.sport.to_be_bytes())
        .attr(CTA_PROTO_DST_PORT, &f.dport.to_be_bytes())
        .end()
        .end();
}

/// Deletes the conntrack entries of `flows` (original-direction tuples, as
/// [`conntrack_flows`] returns them); entries already gone are skipped. Returns how many were
/// deleted. Flows without ports (ICMP...) are looked up in a dump, as their tuple has more.
pub fn conntrack_delete(flows: &[CtFlow]) -> Result<usize, SysError> {
    let ctx = "deleting conntrack entries";
    if flows.is_empty() {
        return Ok(0);
    }
    let mut sock = open(ctx)?;
    // Requests: (family, either a flow or a raw tuple).
    let mut reqs: Vec<Vec<u8>> = Vec::new();
    let mut seq = 0u32;
    let mut mk = |family: u8, body: &dyn Fn(&mut Msg)| {
        seq += 1;
        let mut m = Msg::new(
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            seq,
            family,
            0,
        );
        body(&mut m);
        m.finish()
    };
    let portless: Vec<&CtFlow> = flows.iter().filter(|f| !has_ports(f.proto)).collect();
    for f in flows.iter().filter(|f| has_ports(f.proto)) {
        let family = if f.src.is_ipv4() && f.dst.is_ipv4() {
            AF_INET
        } else {
            AF_INET6
        };
        reqs.push(mk(family, &|m| tuple_msg(m, f)));
    }
    if !portless.is_empty() {
        for (f, family, raw) in dump(&mut sock)? {
            if portless.contains(&&f) {
                reqs.push(mk(family, &|m| {
                    m.begin(CTA_TUPLE_ORIG);
                    // The dumped attributes, verbatim.
                    m.raw(&raw);
                    m.end();
                }));
            }
        }
    }
    let mut deleted = 0;
    // A few hundred requests per send keep the answers well inside the receive buffer.
    for chunk in reqs.chunks(256) {
        let bytes: Vec<u8> = chunk.concat();
        let seqs: Vec<u32> = chunk
            .iter()
            .map(|r| u32::from_ne_bytes([r[8], r[9], r[10], r[11]]))
            .collect();
        sock.send(&bytes).map_err(|e| SysError::io(ctx, e))?;
        let mut waiting: std::collections::HashSet<u32> = seqs.into_iter().collect();
        while !waiting.is_empty() {
            let r = sock.recv().map_err(|e| SysError::io(ctx, e))?;
            let Some((errno, msg)) = r.error() else {
                continue;
            };
            if !waiting.remove(&r.seq) {
                continue;
            }
            match errno {
                0 => deleted += 1,
                libc::ENOENT => {}
                _ => {
                    return Err(refused(
                        format!("{ctx}: the kernel refused request {}", r.seq),
                        &Refused {
                            seq: r.seq,
                            errno,
                            msg,
                        },
                    ))
                }
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuple_round_trip() {
        let f = CtFlow {
            src: "10.0.0.1".parse().expect("ip"),
            dst: "10.0.0.2".parse().expect("ip"),
            proto: 6,
            sport: 40000,
            dport: 80,
        };
        let mut m = Msg::new(0, 0, 1, AF_INET, 0);
        tuple_msg(&mut m, &f);
        let b = m.finish();
        let t = attr(&b[HDR..], CTA_TUPLE_ORIG).expect("tuple");
        assert_eq!(parse_tuple(t), Some(f));
        let g = CtFlow {
            src: "fd00::1".parse().expect("ip"),
            dst: "fd00::2".parse().expect("ip"),
            proto: 17,
            sport: 1,
            dport: 53,
        };
        let mut m = Msg::new(0, 0, 1, AF_INET6, 0);
        tuple_msg(&mut m, &g);
        let b = m.finish();
        assert_eq!(
            parse_tuple(attr(&b[HDR..], CTA_TUPLE_ORIG).expect("tuple")),
            Some(g)
        );
    }
}
