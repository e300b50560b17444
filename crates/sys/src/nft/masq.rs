//! The pod masquerade table.
//!
//! In: a table name, this node's pod ranges and the cluster ranges. Out: one atomic nf_tables
//! batch that (re)creates table `ip NAME` / `ip6 NAME` with a `postrouting` chain (type nat,
//! hook postrouting, priority srcnat = 100, policy accept) holding one rule per family:
//! `saddr POD-RANGE daddr != CLUSTER-RANGE... masquerade`. What `nft -f` does for
//! `table ip NAME {}; delete table ip NAME; table ip NAME { chain postrouting { ... } }`:
//! the batch either applies whole or not at all, so no half-written table is ever visible.
//! [`masquerade_rules`] builds the batch (pure, unit-tested byte by byte where it matters);
//! [`install_masquerade`] sends it and reads the kernel's acknowledgements.

use super::*;
use crate::SysError;
use ipnet::IpNet;

const NF_INET_POST_ROUTING: u32 = 4;
const NF_IP_PRI_NAT_SRC: u32 = 100;

/// The name of the chain [`install_masquerade`] writes.
pub const CHAIN: &str = "postrouting";

/// `REG1 = network header[offset..offset+len] & mask; REG1 <op> value`: a prefix match.
fn prefix_match(m: &mut Msg, offset: u32, net: &IpNet, op: u32) {
    let (addr, mask): (Vec<u8>, Vec<u8>) = match net {
        IpNet::V4(n) => (n.network().octets().to_vec(), n.netmask().octets().to_vec()),
        IpNet::V6(n) => (n.network().octets().to_vec(), n.netmask().octets().to_vec()),
    };
    payload(m, NFT_PAYLOAD_NETWORK_HEADER, offset, addr.len() as u32);
    super::mask(m, &mask);
    cmp(m, op, &addr);
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
#[cfg(test)]
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
