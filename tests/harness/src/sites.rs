//! Multi-site topologies: locations, NAT routers and blocked paths between sites, for the tests of
//! locations, NAT traversal, hole punching and relays.
//!
//! [`ClusterOpts::sites`](crate::ClusterOpts::sites) lists the sites (empty: the flat topology of
//! the crate docs, unchanged). Every node is in at most one site; a node in no site is a *public*
//! node on the switch bridge as before. Site `s` (its index in the list):
//! - **public site** (`nat: None`): its nodes stay on the bridge (198.18.0.(10+i)); only the
//!   location name differs;
//! - **NAT site**: a router namespace `<prefix>-r<s>` with `wan` = 198.18.0.(200+s)/24 on the
//!   switch bridge (default route via 198.18.0.1) and a LAN bridge `lan` = 192.168.(s+1).1/24.
//!   Node `i` of the site has `eth0` = 192.168.(s+1).(10+i)/24 on that bridge, default route via
//!   192.168.(s+1).1, so [`Node::underlay_ip`](crate::Node) is the private address (and meshd's
//!   default `--endpoint` with it). Nodes of one site reach each other directly on the LAN.
//!
//! The router (nftables table `ip weftnat`):
//! - masquerades LAN → WAN: [`NatKind::PortPreserving`] is plain `masquerade` (Linux keeps the
//!   source port while the tuple is free, so a node's socket on 51820 is WAN:51820 for every
//!   destination: endpoint-independent mapping); [`NatKind::Symmetric`] is `masquerade
//!   fully-random` (every new destination gets another random public port). Linux keeps a port
//!   only while it is free *for that destination*: two nodes of one site that use the same source
//!   port towards the same destination clash, and the second gets another port;
//! - forwards LAN → WAN and, from the WAN side, only `ct state established,related` (replies to
//!   mappings); the input chain drops new UDP/TCP arriving on `wan`. That drop also keeps the
//!   conntrack entry of an unsolicited datagram from being confirmed: otherwise, during hole
//!   punching, the peer's first (dropped) datagram would occupy the reply tuple and the router
//!   would pick another port for the node's own mapping to that peer;
//! - `net.netfilter.nf_conntrack_udp_timeout` and `..._udp_timeout_stream` are set to
//!   [`SiteSpec::udp_timeout_secs`] (both are per network namespace on this kernel; the self-test
//!   checks the switch keeps the defaults), so a mapping idle that long is gone.
//!
//! [`Cluster::block_udp_between_sites`] drops UDP between two sites' public addresses (a NAT
//! site's WAN address, a public site's node addresses) in the switch's `bridge weftsites` table
//! (forward chain; the sites talk across the bridge, not through the switch's IP routing); ICMP
//! still passes. [`Cluster::nat_mappings`] lists a router's UDP conntrack entries, and
//! [`Cluster::capture`] works on a router's `wan`/`lan` as on any interface.

use crate::cluster::{Cluster, Node, UNDERLAY_PREFIX_LEN, UNDERLAY_ROUTER};
use crate::traffic::{ping, PingOpts};
use crate::util::{run, run_args, run_in, run_in_netns, wait_until};
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::Mutex;
use std::time::Duration;

/// Most sites a cluster can have (WAN addresses 198.18.0.200..=198.18.0.249).
pub const MAX_SITES: usize = 50;
/// Name of the LAN bridge in every router namespace.
pub const LAN_BRIDGE: &str = "lan";
/// Name of the router's uplink on the switch bridge.
pub const WAN_IF: &str = "wan";

/// How a NAT site's router maps a LAN node's UDP source to its WAN address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// Endpoint-independent mapping: the source port is kept (plain `masquerade`).
    PortPreserving,
    /// A new random public port for every destination (`masquerade fully-random`).
    Symmetric,
}

impl NatKind {
    /// The nftables masquerade statement of this kind.
    pub fn masquerade(self) -> &'static str {
        match self {
            NatKind::PortPreserving => "masquerade",
            NatKind::Symmetric => "masquerade fully-random",
        }
    }
}

/// One site (location) of a cluster, see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteSpec {
    /// Location name.
    pub name: String,
    /// `None`: a public site (nodes on the bridge); `Some`: behind a NAT router.
    pub nat: Option<NatKind>,
    /// Node indices.
    pub nodes: Vec<usize>,
    /// UDP conntrack timeouts of the router (NAT sites only); `None` keeps the kernel's (30 s
    /// unreplied, 120 s stream).
    pub udp_timeout_secs: Option<u32>,
}

impl SiteSpec {
    /// A public site.
    pub fn public(name: &str, nodes: &[usize]) -> SiteSpec {
        SiteSpec {
            name: name.into(),
            nat: None,
            nodes: nodes.to_vec(),
            udp_timeout_secs: None,
        }
    }

    /// A site behind a NAT router of `kind`.
    pub fn nat(name: &str, kind: NatKind, nodes: &[usize]) -> SiteSpec {
        SiteSpec {
            nat: Some(kind),
            ..SiteSpec::public(name, nodes)
        }
    }

    /// Sets the router's UDP conntrack timeouts.
    pub fn udp_timeout(mut self, secs: u32) -> SiteSpec {
        self.udp_timeout_secs = Some(secs);
        self
    }
}

/// What the cluster keeps about its sites at run time.
#[derive(Debug, Default)]
pub(crate) struct SiteState {
    /// Router namespace per site (`None` for public sites).
    routers: Vec<Option<String>>,
    /// Site pairs (lower index first) whose UDP the switch drops.
    blocked: Mutex<BTreeSet<(usize, usize)>>,
}

/// Checks a site list against the cluster size (before anything is created).
pub(crate) fn validate(sites: &[SiteSpec], n_nodes: usize, direct_link: bool) -> Result<()> {
    if sites.is_empty() {
        return Ok(());
    }
    if direct_link {
        bail!("sites need the switch namespace; they do not go with direct_link");
    }
    if sites.len() > MAX_SITES {
        bail!("at most {MAX_SITES} sites, got {}", sites.len());
    }
    let mut seen = vec![None::<usize>; n_nodes];
    let mut names = BTreeSet::new();
    for (s, site) in sites.iter().enumerate() {
        if site.name.is_empty() || !names.insert(site.name.as_str()) {
            bail!("site {s}: empty or duplicate name {:?}", site.name);
        }
        if site.nat.is_none() && site.udp_timeout_secs.is_some() {
            bail!(
                "site {s} ({}): udp_timeout_secs needs a NAT site (a public site has no router)",
                site.name
            );
        }
        if site.udp_timeout_secs == Some(0) {
            bail!("site {s} ({}): udp_timeout_secs must be > 0", site.name);
        }
        for &i in &site.nodes {
            let slot = seen
                .get_mut(i)
                .with_context(|| format!("site {s} ({}): no node {i}", site.name))?;
            if let Some(other) = slot.replace(s) {
                bail!("node {i} is in sites {other} and {s}; a node belongs to at most one site");
            }
        }
    }
    // Bridge addresses of public nodes must not be a router's WAN address.
    for i in 0..n_nodes {
        if site_index(sites, i).is_some_and(|s| sites[s].nat.is_some()) {
            continue;
        }
        let ip = public_node_ip(i);
        if let Some(s) = (0..sites.len()).find(|&s| sites[s].nat.is_some() && wan_ip(s) == ip) {
            bail!("node {i}'s address {ip} is the WAN address of site {s}; use fewer nodes");
        }
    }
    Ok(())
}

/// The site node `i` is in.
pub(crate) fn site_index(sites: &[SiteSpec], i: usize) -> Option<usize> {
    sites.iter().position(|s| s.nodes.contains(&i))
}

/// The NAT site node `i` is in (`None` for nodes on the bridge).
fn nat_site(sites: &[SiteSpec], i: usize) -> Option<usize> {
    site_index(sites, i).filter(|&s| sites[s].nat.is_some())
}

fn public_node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 10 + i as u8)
}

fn wan_ip(s: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 200 + s as u8)
}

fn lan_gateway(s: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, s as u8 + 1, 1)
}

/// Node `i`'s `eth0` address and default gateway.
pub(crate) fn node_addr(sites: &[SiteSpec], i: usize) -> (Ipv4Addr, Ipv4Addr) {
    match nat_site(sites, i) {
        Some(s) => (
            Ipv4Addr::new(192, 168, s as u8 + 1, 10 + i as u8),
            lan_gateway(s),
        ),
        None => (public_node_ip(i), UNDERLAY_ROUTER),
    }
}

/// The router's nftables ruleset (replaces table `ip weftnat`).
fn router_ruleset(s: usize, kind: NatKind) -> String {
    let lan = format!("192.168.{}.0/24", s + 1);
    format!(
        "table ip weftnat\n\
         delete table ip weftnat\n\
         table ip weftnat {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"{WAN_IF}\" ip saddr {lan} {masq}\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy drop;\n\
         \t\tct state established,related accept\n\
         \t\tiifname \"{LAN_BRIDGE}\" accept\n\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"{WAN_IF}\" ct state new meta l4proto {{ tcp, udp }} drop\n\
         \t}}\n\
         }}\n",
        masq = kind.masquerade()
    )
}

/// Runs `nft -f -` with `script` in namespace `ns`.
fn nft_apply(ns: &str, script: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = crate::util::ns_cmd(ns, "nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting nft in {ns}"))?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())
        .with_context(|| format!("writing the ruleset to nft in {ns}"))?;
    let out = child
        .wait_with_output()
        .with_context(|| format!("nft in {ns}"))?;
    if !out.status.success() {
        bail!(
            "nft -f in {ns} failed ({}): {}\nruleset:\n{script}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A UDP socket bound to `bind` inside network namespace `ns` (created on a thread that entered
/// it; the socket stays in that namespace whichever thread uses it).
pub fn udp_socket_in(ns: &str, bind: SocketAddrV4) -> Result<UdpSocket> {
    run_in_netns(ns, || {
        UdpSocket::bind(bind).with_context(|| format!("binding UDP {bind} in {ns}"))
    })
}

impl Node {
    /// A UDP socket on 0.0.0.0:`port` in this node's namespace (plain UDP, no meshd), for NAT
    /// and reachability probes. See [`udp_socket_in`].
    pub fn udp_socket(&self, port: u16) -> Result<UdpSocket> {
        udp_socket_in(&self.ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
    }
}

impl Cluster {
    /// Creates the router namespace of every NAT site (after the switch, before the nodes).
    pub(crate) fn build_site_routers(&mut self) -> Result<()> {
        let sites = self.opts.sites.clone();
        if sites.is_empty() {
            return Ok(());
        }
        let sw = self
            .switch_ns
            .clone()
            .context("sites need the switch namespace")?;
        let mtu = self.opts.underlay_mtu.to_string();
        for (s, site) in sites.iter().enumerate() {
            let Some(kind) = site.nat else {
                self.site_state.routers.push(None);
                continue;
            };
            let r = format!("{}-r{s}", self.prefix);
            run_args("ip", &["netns", "add", &r])?;
            self.site_state.routers.push(Some(r.clone()));
            let ctx = || format!("building the router of site {s} ({})", site.name);
            run_args("ip", &["-n", &r, "link", "set", "lo", "up"]).with_context(ctx)?;
            run_in(
                &r,
                "sysctl",
                &[
                    "-qw",
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ],
            )
            .with_context(ctx)?;
            let port = format!("{}r{s}", self.short);
            let wan = format!("{}/{UNDERLAY_PREFIX_LEN}", wan_ip(s));
            let lan = format!("{}/24", lan_gateway(s));
            let gw = UNDERLAY_ROUTER.to_string();
            for args in [
                vec![
                    "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", WAN_IF,
                    "netns", &r,
                ],
                vec![
                    "-n",
                    &sw,
                    "link",
                    "set",
                    &port,
                    "master",
                    &self.bridge,
                    "mtu",
                    &mtu,
                    "up",
                ],
                vec!["-n", &r, "link", "set", WAN_IF, "mtu", &mtu, "up"],
                vec!["-n", &r, "addr", "add", &wan, "dev", WAN_IF],
                vec!["-n", &r, "route", "add", "default", "via", &gw],
                vec!["-n", &r, "link", "add", LAN_BRIDGE, "type", "bridge"],
                vec!["-n", &r, "link", "set", LAN_BRIDGE, "mtu", &mtu, "up"],
                vec!["-n", &r, "addr", "add", &lan, "dev", LAN_BRIDGE],
            ] {
                run_args("ip", &args).with_context(ctx)?;
            }
            // The ruleset first: it turns conntrack on in the namespace.
            nft_apply(&r, &router_ruleset(s, kind)).with_context(ctx)?;
            if let Some(t) = site.udp_timeout_secs {
                let a = format!("net.netfilter.nf_conntrack_udp_timeout={t}");
                let b = format!("net.netfilter.nf_conntrack_udp_timeout_stream={t}");
                run_in(&r, "sysctl", &["-qw", &a, &b])
                    .with_context(|| format!("{}: setting the UDP conntrack timeouts", ctx()))?;
            }
            let up = wait_until(Duration::from_secs(5), || {
                ping(&r, &gw, &PingOpts::count(1).wait(1))
                    .map(|p| p.any_received())
                    .unwrap_or(false)
            });
            if !up {
                bail!("{}: the router cannot ping the switch {gw}", ctx());
            }
        }
        Ok(())
    }

    /// Where node `i`'s underlay veth plugs in: (namespace, bridge); `None` with `direct_link`.
    pub(crate) fn node_port(&self, i: usize) -> Option<(String, String)> {
        let sw = self.switch_ns.as_ref()?;
        match nat_site(&self.opts.sites, i).and_then(|s| self.site_router_ns(s)) {
            Some(r) => Some((r.to_string(), LAN_BRIDGE.to_string())),
            None => Some((sw.clone(), self.bridge.clone())),
        }
    }

    /// Whether node `i` sits behind a NAT router.
    pub fn is_natted(&self, i: usize) -> bool {
        nat_site(&self.opts.sites, i).is_some()
    }

    /// Number of sites.
    pub fn site_count(&self) -> usize {
        self.opts.sites.len()
    }

    /// The site node `node` is in (`None`: a public node in no site).
    pub fn site_of(&self, node: usize) -> Option<usize> {
        site_index(&self.opts.sites, node)
    }

    /// The router namespace of site `s` (`None` for a public site or no such site).
    pub fn site_router_ns(&self, s: usize) -> Option<&str> {
        self.site_state.routers.get(s)?.as_deref()
    }

    /// The WAN address of NAT site `s`: 198.18.0.(200+s) (`None` for a public site).
    pub fn site_public_ip(&self, s: usize) -> Option<Ipv4Addr> {
        self.opts.sites.get(s)?.nat.map(|_| wan_ip(s))
    }

    /// The location name of site `s`.
    pub fn site_name(&self, s: usize) -> Option<&str> {
        self.opts.sites.get(s).map(|x| x.name.as_str())
    }

    /// The addresses site `s` shows on the switch bridge: its WAN address (NAT site) or its
    /// nodes' addresses (public site).
    pub fn site_bridge_ips(&self, s: usize) -> Result<Vec<Ipv4Addr>> {
        let site = self
            .opts
            .sites
            .get(s)
            .with_context(|| format!("no site {s} (the cluster has {})", self.site_count()))?;
        Ok(match site.nat {
            Some(_) => vec![wan_ip(s)],
            None => site
                .nodes
                .iter()
                .map(|&i| self.nodes[i].underlay_ip)
                .collect(),
        })
    }

    /// Drops UDP between sites `a` and `b` (both directions) on the switch bridge; ICMP and TCP
    /// still pass. Undo with [`Cluster::unblock_udp_between_sites`].
    pub fn block_udp_between_sites(&self, a: usize, b: usize) -> Result<()> {
        self.set_udp_block(a, b, true)
    }

    /// Lets UDP between sites `a` and `b` pass again.
    pub fn unblock_udp_between_sites(&self, a: usize, b: usize) -> Result<()> {
        self.set_udp_block(a, b, false)
    }

    fn set_udp_block(&self, a: usize, b: usize, on: bool) -> Result<()> {
        if a == b {
            bail!("blocking UDP needs two different sites (got {a} twice)");
        }
        self.site_bridge_ips(a)?;
        self.site_bridge_ips(b)?;
        let sw = self
            .switch_ns
            .as_deref()
            .context("sites need the switch namespace")?;
        let mut blocked = self
            .site_state
            .blocked
            .lock()
            .map_err(|_| anyhow::anyhow!("site block list lock poisoned"))?;
        let pair = (a.min(b), a.max(b));
        let mut next = blocked.clone();
        if on {
            next.insert(pair);
        } else {
            next.remove(&pair);
        }
        nft_apply(sw, &self.block_ruleset(&next)?)
            .with_context(|| format!("setting the UDP block between sites {a} and {b} to {on}"))?;
        *blocked = next;
        Ok(())
    }

    /// The switch's `bridge weftsites` table for a set of blocked pairs.
    fn block_ruleset(&self, pairs: &BTreeSet<(usize, usize)>) -> Result<String> {
        let set = |v: &[Ipv4Addr]| {
            v.iter()
                .map(Ipv4Addr::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut rules = String::new();
        for &(a, b) in pairs {
            let (ia, ib) = (self.site_bridge_ips(a)?, self.site_bridge_ips(b)?);
            if ia.is_empty() || ib.is_empty() {
                continue;
            }
            for (x, y) in [(&ia, &ib), (&ib, &ia)] {
                rules.push_str(&format!(
                    "\t\tip saddr {{ {} }} ip daddr {{ {} }} meta l4proto udp drop\n",
                    set(x),
                    set(y)
                ));
            }
        }
        Ok(format!(
            "table bridge weftsites\n\
             delete table bridge weftsites\n\
             table bridge weftsites {{\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             {rules}\
             \t}}\n\
             }}\n"
        ))
    }

    /// The UDP conntrack entries (NAT mappings) of NAT site `s`'s router: `conntrack -L -p udp`
    /// lines, for diagnostics.
    pub fn nat_mappings(&self, s: usize) -> Result<Vec<String>> {
        let r = self
            .site_router_ns(s)
            .with_context(|| format!("site {s} has no NAT router"))?;
        let out = run(crate::util::ns_cmd(r, "conntrack").args(["-L", "-p", "udp"]))
            .with_context(|| format!("listing the NAT mappings of site {s}"))?;
        Ok(out
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(String::from)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let pp = NatKind::PortPreserving;
        assert!(validate(&[], 3, true).is_ok());
        assert!(validate(&[SiteSpec::nat("a", pp, &[0])], 2, true).is_err());
        assert!(validate(&[SiteSpec::nat("a", pp, &[0, 1])], 2, false).is_ok());
        assert!(validate(&[SiteSpec::nat("a", pp, &[2])], 2, false).is_err());
        let twice = [SiteSpec::nat("a", pp, &[0]), SiteSpec::public("b", &[0])];
        assert!(validate(&twice, 2, false).is_err());
        let dup = [SiteSpec::public("a", &[0]), SiteSpec::public("a", &[1])];
        assert!(validate(&dup, 2, false).is_err());
        assert!(validate(&[SiteSpec::public("a", &[0]).udp_timeout(3)], 1, false).is_err());
        // Node 190 on the bridge would be 198.18.0.200, site 0's WAN address.
        assert!(validate(&[SiteSpec::nat("a", pp, &[0])], 191, false).is_err());
        assert!(validate(&[SiteSpec::nat("a", pp, &[190])], 191, false).is_ok());
    }

    #[test]
    fn addresses() {
        let sites = [
            SiteSpec::public("dc", &[0]),
            SiteSpec::nat("home", NatKind::Symmetric, &[2]),
        ];
        assert_eq!(
            node_addr(&sites, 0),
            (Ipv4Addr::new(198, 18, 0, 10), UNDERLAY_ROUTER)
        );
        assert_eq!(
            node_addr(&sites, 1),
            (Ipv4Addr::new(198, 18, 0, 11), UNDERLAY_ROUTER)
        );
        assert_eq!(
            node_addr(&sites, 2),
            (
                Ipv4Addr::new(192, 168, 2, 12),
                Ipv4Addr::new(192, 168, 2, 1)
            )
        );
        assert!(router_ruleset(1, NatKind::Symmetric).contains("masquerade fully-random"));
    }
}
