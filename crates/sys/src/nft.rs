//! nftables over netlink (`NETLINK_NETFILTER`), without the `nft` binary: k3s/k3d nodes have
//! none, and nothing on a node may be assumed but the kernel.
//!
//! In: a table name, this node's pod ranges and the cluster ranges. Out: one atomic nf_tables
//! batch that (re)creates table `ip NAME` / `ip6 NAME` with a `postrouting` chain (type nat,
//! hook postrouting, priority srcnat = 100, policy accept) holding one rule per family:
//! `saddr POD-RANGE daddr != CLUSTER-RANGE... masquerade`. What `nft -f` does for
//! `table ip NAME {}; delete table ip NAME; table ip NAME { chain postrouting { ... } }`:
//! the batch either applies whole or not at all, so no half-written table is ever visible.
//! [`masquerade_rules`] builds the batch (pure, unit-tested byte by byte where it matters);
//! [`install_masquerade`] sends it and reads the kernel's acknowledgements.

use crate::SysError;
use ipnet::IpNet;
use std::io;

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_DATA_VALUE: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;

const NFT_REG_1: u32 = 1;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NF_INET_POST_ROUTING: u32 = 4;
const NF_IP_PRI_NAT_SRC: u32 = 100;
const NF_ACCEPT: u32 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// The name of the chain [`install_masquerade`] writes.
pub const CHAIN: &str = "postrouting";

/// A netlink message being built: header, `nfgenmsg`, attributes.
struct Msg {
    buf: Vec<u8>,
    /// Offsets of the length fields of open nested attributes.
    open: Vec<usize>,
}

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        buf.push(family);
        buf.push(0); // NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg {
            buf,
            open: Vec::new(),
        }
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    fn str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.attr(kind, &b)
    }

    /// A 32-bit attribute; nf_tables takes them in network byte order.
    fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.attr(kind, &v.to_be_bytes())
    }

    fn begin(&mut self, kind: u16) -> &mut Self {
        self.open.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    fn end(&mut self) -> &mut Self {
        if let Some(at) = self.open.pop() {
            let len = (self.buf.len() - at) as u16;
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    /// `NFTA_DATA_VALUE` nested under `kind`.
    fn data(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        self.begin(kind).attr(NFTA_DATA_VALUE, value).end()
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn expr_start(m: &mut Msg, name: &str) {
    m.begin(NFTA_LIST_ELEM).str(NFTA_EXPR_NAME, name);
}

/// `REG1 = network header[offset..offset+len] & mask; REG1 <op> value`: a prefix match.
fn prefix_match(m: &mut Msg, offset: u32, net: &IpNet, op: u32) {
    let (addr, mask): (Vec<u8>, Vec<u8>) = match net {
        IpNet::V4(n) => (n.network().octets().to_vec(), n.netmask().octets().to_vec()),
        IpNet::V6(n) => (n.network().octets().to_vec(), n.netmask().octets().to_vec()),
    };
    let len = addr.len() as u32;
    expr_start(m, "payload");
    m.begin(NFTA_EXPR_DATA)
        .u32(NFTA_PAYLOAD_DREG, NFT_REG_1)
        .u32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER)
        .u32(NFTA_PAYLOAD_OFFSET, offset)
        .u32(NFTA_PAYLOAD_LEN, len)
        .end()
        .end();
    expr_start(m, "bitwise");
    m.begin(NFTA_EXPR_DATA)
        .u32(NFTA_BITWISE_SREG, NFT_REG_1)
        .u32(NFTA_BITWISE_DREG, NFT_REG_1)
        .u32(NFTA_BITWISE_LEN, len)
        .data(NFTA_BITWISE_MASK, &mask)
        .data(NFTA_BITWISE_XOR, &vec![0u8; addr.len()])
        .end()
        .end();
    expr_start(m, "cmp");
    m.begin(NFTA_EXPR_DATA)
        .u32(NFTA_CMP_SREG, NFT_REG_1)
        .u32(NFTA_CMP_OP, op)
        .data(NFTA_CMP_DATA, &addr)
        .end()
        .end();
}

/// The batch that (re)creates table `name` in each family that has a pod range, with the
/// masquerade rule for traffic from `pods` to anything outside `cluster`. Empty when `pods` is.
pub fn masquerade_rules(
    name: &str,
    pods: &[IpNet],
    cluster: &[IpNet],
) -> Result<Vec<u8>, SysError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(SysError::InvalidArgument(format!(
            "bad nftables table name {name:?}"
        )));
    }
    let mut out = Vec::new();
    let mut seq = 1u32;
    let mut next = || {
        seq += 1;
        seq
    };
    out.extend(
        Msg::new(
            NFNL_MSG_BATCH_BEGIN,
            libc::NLM_F_REQUEST as u16,
            next(),
            0,
            NFNL_SUBSYS_NFTABLES,
        )
        .finish(),
    );
    let mut any = false;
    for (family, v4) in [(NFPROTO_IPV4, true), (NFPROTO_IPV6, false)] {
        let pods: Vec<&IpNet> = pods
            .iter()
            .filter(|n| matches!(n, IpNet::V4(_)) == v4)
            .collect();
        if pods.is_empty() {
            continue;
        }
        any = true;
        let (src_off, dst_off) = if v4 { (12, 16) } else { (8, 24) };
        let kind = |k: u16| (NFNL_SUBSYS_NFTABLES << 8) | k;
        let req = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        let create = req | libc::NLM_F_CREATE as u16;
        // Create if absent, then delete and create again: the old contents go whatever they were.
        let mut m = Msg::new(kind(NFT_MSG_NEWTABLE), create, next(), family, 0);
        m.str(NFTA_TABLE_NAME, name);
        out.extend(m.finish());
        let mut m = Msg::new(kind(NFT_MSG_DELTABLE), req, next(), family, 0);
        m.str(NFTA_TABLE_NAME, name);
        out.extend(m.finish());
        let mut m = Msg::new(kind(NFT_MSG_NEWTABLE), create, next(), family, 0);
        m.str(NFTA_TABLE_NAME, name);
        out.extend(m.finish());
        let mut m = Msg::new(kind(NFT_MSG_NEWCHAIN), create, next(), family, 0);
        m.str(NFTA_CHAIN_TABLE, name)
            .str(NFTA_CHAIN_NAME, CHAIN)
            .begin(NFTA_CHAIN_HOOK)
            .u32(NFTA_HOOK_HOOKNUM, NF_INET_POST_ROUTING)
            .u32(NFTA_HOOK_PRIORITY, NF_IP_PRI_NAT_SRC)
            .end()
            .u32(NFTA_CHAIN_POLICY, NF_ACCEPT)
            .str(NFTA_CHAIN_TYPE, "nat");
        out.extend(m.finish());
        let excluded: Vec<&IpNet> = cluster
            .iter()
            .filter(|n| matches!(n, IpNet::V4(_)) == v4)
            .collect();
        for pod in pods {
            let mut m = Msg::new(
                kind(NFT_MSG_NEWRULE),
                create | libc::NLM_F_APPEND as u16,
                next(),
                family,
                0,
            );
            m.str(NFTA_RULE_TABLE, name)
                .str(NFTA_RULE_CHAIN, CHAIN)
                .begin(NFTA_RULE_EXPRESSIONS);
            prefix_match(&mut m, src_off, pod, NFT_CMP_EQ);
            for c in &excluded {
                prefix_match(&mut m, dst_off, c, NFT_CMP_NEQ);
            }
            expr_start(&mut m, "masq");
            m.end().end();
            out.extend(m.finish());
        }
    }
    out.extend(
        Msg::new(
            NFNL_MSG_BATCH_END,
            libc::NLM_F_REQUEST as u16,
            next(),
            0,
            NFNL_SUBSYS_NFTABLES,
        )
        .finish(),
    );
    Ok(if any { out } else { Vec::new() })
}

/// Installs the masquerade table `name` (see the module doc) in the calling thread's network
/// namespace, atomically. Needs CAP_NET_ADMIN; no binary.
pub fn install_masquerade(name: &str, pods: &[IpNet], cluster: &[IpNet]) -> Result<(), SysError> {
    let batch = masquerade_rules(name, pods, cluster)?;
    if batch.is_empty() {
        return Ok(());
    }
    send_batch(&batch).map_err(|e| {
        SysError::io(
            format!("installing nftables table {name} (pod masquerade) over netlink"),
            e,
        )
    })
}

/// The sequence numbers of messages in `batch` that ask for an acknowledgement.
fn acked_seqs(batch: &[u8]) -> Vec<u32> {
    let mut seqs = Vec::new();
    let mut at = 0;
    while at + 16 <= batch.len() {
        let len =
            u32::from_ne_bytes([batch[at], batch[at + 1], batch[at + 2], batch[at + 3]]) as usize;
        let flags = u16::from_ne_bytes([batch[at + 6], batch[at + 7]]);
        let seq =
            u32::from_ne_bytes([batch[at + 8], batch[at + 9], batch[at + 10], batch[at + 11]]);
        if flags & libc::NLM_F_ACK as u16 != 0 {
            seqs.push(seq);
        }
        if len < 16 {
            break;
        }
        at += len;
    }
    seqs
}

fn send_batch(batch: &[u8]) -> io::Result<()> {
    // SAFETY: a plain socket(2) call; the descriptor is owned by `fd` below.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid descriptor nobody else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a valid timeval of the size given.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    // SAFETY: zeroed sockaddr_nl is valid; family set below.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: sendto with a buffer and address valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            batch.as_ptr().cast(),
            batch.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut waiting = acked_seqs(batch);
    let mut buf = vec![0u8; 65536];
    while !waiting.is_empty() {
        // SAFETY: recv into a buffer valid for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("waiting for the kernel's answer: {e}"),
            ));
        }
        let mut at = 0;
        let n = n as usize;
        while at + 16 <= n {
            let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            let seq = u32::from_ne_bytes([buf[at + 8], buf[at + 9], buf[at + 10], buf[at + 11]]);
            if len < 16 || at + len > n {
                break;
            }
            if kind == libc::NLMSG_ERROR as u16 && len >= 20 {
                let errno =
                    i32::from_ne_bytes([buf[at + 16], buf[at + 17], buf[at + 18], buf[at + 19]]);
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                waiting.retain(|s| *s != seq);
            }
            at += (len + 3) & !3;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().expect("net")).collect()
    }

    #[test]
    fn batch_shape() {
        let b = masquerade_rules("weft", &nets(&["10.42.1.0/24"]), &nets(&["10.42.0.0/16"]))
            .expect("rules");
        // begin, newtable, deltable, newtable, newchain, newrule, end
        let mut kinds = Vec::new();
        let mut at = 0;
        while at < b.len() {
            let len = u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
            kinds.push(u16::from_ne_bytes([b[at + 4], b[at + 5]]));
            assert_eq!(len % 4, 0);
            at += len;
        }
        let t = |k: u16| (NFNL_SUBSYS_NFTABLES << 8) | k;
        assert_eq!(
            kinds,
            vec![
                16,
                t(NFT_MSG_NEWTABLE),
                t(NFT_MSG_DELTABLE),
                t(NFT_MSG_NEWTABLE),
                t(NFT_MSG_NEWCHAIN),
                t(NFT_MSG_NEWRULE),
                17
            ]
        );
        assert_eq!(
            acked_seqs(&b).len(),
            5,
            "every message but begin/end is acknowledged"
        );
        // The pod network and the /24 mask are in the rule.
        let rule = &b[..];
        assert!(rule.windows(4).any(|w| w == [10, 42, 1, 0]));
        assert!(rule.windows(4).any(|w| w == [255, 255, 255, 0]));
        assert!(rule.windows(4).any(|w| w == [255, 255, 0, 0]));
        // IPv6 too when there is an IPv6 pod range; nothing at all without pod ranges.
        let both = masquerade_rules(
            "weft",
            &nets(&["10.42.1.0/24", "fd00:42:1::/64"]),
            &nets(&["10.42.0.0/16", "fd00:42::/48"]),
        )
        .expect("rules");
        assert!(both.len() > b.len());
        assert!(masquerade_rules("weft", &[], &[]).expect("none").is_empty());
        assert!(masquerade_rules("bad name", &[], &[]).is_err());
    }
}
