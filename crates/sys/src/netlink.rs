//! Links, addresses and routes over rtnetlink, in the calling thread's network namespace.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressFlag, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, IpVersion};

use crate::error::netlink_errno;
use crate::tun::ifname_to_c;
use crate::SysError;

/// Metric for per-node device routes; lower than [`UNREACHABLE_ROUTE_METRIC`] so they win.
pub const DEV_ROUTE_METRIC: u32 = 100;
/// Metric for fail-closed unreachable routes: they only match when no device route does.
pub const UNREACHABLE_ROUTE_METRIC: u32 = 4000;
/// The `rtm_protocol` weft stamps on routes it installs (`ip route` shows `proto 87`);
/// [`Netlink::owned_routes`] uses it to find them again after a restart.
pub const ROUTE_PROTO: u8 = 87;

/// A route in the main table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    /// Destination prefix (host bits are ignored).
    pub dst: IpNet,
    /// Where packets to `dst` go.
    pub kind: RouteKind,
    /// Route metric (`RTA_PRIORITY`); lower wins.
    pub metric: u32,
}

/// The target of a [`Route`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// Directly out of interface `ifname` (scope link, no gateway), optionally with a
    /// preferred source address (which must be of the same family as `dst`).
    Dev {
        /// Output interface.
        ifname: String,
        /// Preferred source address (`src` in `ip route`).
        src: Option<IpAddr>,
    },
    /// `RTN_UNREACHABLE`: the kernel rejects matching packets (ICMP unreachable).
    Unreachable,
    /// Through `gateway` on interface `ifname` (scope universe): a pod's default route via its
    /// link-local gateway.
    Via {
        /// Output interface.
        ifname: String,
        /// Next hop (same family as the destination).
        gateway: IpAddr,
    },
}

impl Route {
    /// A device route with [`DEV_ROUTE_METRIC`] and no preferred source.
    pub fn dev(dst: IpNet, ifname: impl Into<String>) -> Route {
        Route {
            dst,
            kind: RouteKind::Dev {
                ifname: ifname.into(),
                src: None,
            },
            metric: DEV_ROUTE_METRIC,
        }
    }

    /// An unreachable route with [`UNREACHABLE_ROUTE_METRIC`].
    pub fn unreachable(dst: IpNet) -> Route {
        Route {
            dst,
            kind: RouteKind::Unreachable,
            metric: UNREACHABLE_ROUTE_METRIC,
        }
    }
}

/// A handle to the kernel's routing netlink socket of the namespace it was created in.
/// Cheap to clone; clones share one connection.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
}

fn is_errno(e: &rtnetlink::Error, codes: &[i32]) -> bool {
    netlink_errno(e).is_some_and(|c| codes.contains(&c))
}

fn check_prefix(addr: IpAddr, prefix_len: u8) -> Result<(), SysError> {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix_len > max {
        return Err(SysError::InvalidArgument(format!(
            "prefix length {prefix_len} too long for {addr}"
        )));
    }
    Ok(())
}

fn route_addr(addr: IpAddr) -> RouteAddress {
    match addr {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

fn from_route_addr(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// Builds the RTM_NEWROUTE / RTM_DELROUTE message for `route`. `oif` is the resolved
/// index of the device for [`RouteKind::Dev`].
fn route_message(
    route: &Route,
    oif: Option<u32>,
    for_delete: bool,
) -> Result<RouteMessage, SysError> {
    let dst = route.dst.trunc();
    let mut m = RouteMessage::default();
    m.header.address_family = match dst {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    };
    m.header.destination_prefix_length = dst.prefix_len();
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = if for_delete {
        RouteProtocol::Unspec
    } else {
        RouteProtocol::Other(ROUTE_PROTO)
    };
    m.attributes
        .push(RouteAttribute::Destination(route_addr(dst.addr())));
    m.attributes.push(RouteAttribute::Priority(route.metric));
    match &route.kind {
        RouteKind::Dev { ifname, src } => {
            let oif = oif.ok_or_else(|| SysError::NoSuchLink(ifname.clone()))?;
            m.header.kind = RouteType::Unicast;
            m.header.scope = RouteScope::Link;
            m.attributes.push(RouteAttribute::Oif(oif));
            if let Some(src) = src {
                if src.is_ipv4() != dst.addr().is_ipv4() {
                    return Err(SysError::InvalidArgument(format!(
                        "route {dst}: source {src} is of a different address family"
                    )));
                }
                if !for_delete {
                    m.attributes
                        .push(RouteAttribute::PrefSource(route_addr(*src)));
                }
            }
        }
        RouteKind::Unreachable => {
            m.header.kind = RouteType::Unreachable;
            m.header.scope = RouteScope::Universe;
        }
        RouteKind::Via { ifname, gateway } => {
            let oif = oif.ok_or_else(|| SysError::NoSuchLink(ifname.clone()))?;
            if gateway.is_ipv4() != dst.addr().is_ipv4() {
                return Err(SysError::InvalidArgument(format!(
                    "route {dst}: gateway {gateway} is of a different address family"
                )));
            }
            m.header.kind = RouteType::Unicast;
            m.header.scope = RouteScope::Universe;
            m.attributes.push(RouteAttribute::Oif(oif));
            m.attributes
                .push(RouteAttribute::Gateway(route_addr(*gateway)));
        }
    }
    if for_delete {
        // Like `ip route del`: match any scope.
        m.header.scope = RouteScope::NoWhere;
    }
    Ok(m)
}

fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

fn route_dst(m: &RouteMessage) -> Option<IpNet> {
    let addr = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(d) => from_route_addr(d),
            _ => None,
        })
        .or(match m.header.address_family {
            AddressFamily::Inet => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            AddressFamily::Inet6 => Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
            _ => None,
        })?;
    IpNet::new(addr, m.header.destination_prefix_length).ok()
}

fn route_oif(m: &RouteMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        RouteAttribute::MultiPath(hops) => hops.first().map(|h| h.interface_index),
        _ => None,
    })
}

fn route_metric(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0)
}

fn route_gateway(m: &RouteMessage) -> Option<IpAddr> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(g) => from_route_addr(g),
        _ => None,
    })
}

fn route_prefsrc(m: &RouteMessage) -> Option<IpAddr> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::PrefSource(s) => from_route_addr(s),
        _ => None,
    })
}

fn link_name(m: &LinkMessage) -> Option<String> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn address_of(m: &AddressMessage) -> Option<IpAddr> {
    // For IPv4, IFA_LOCAL is the local address (IFA_ADDRESS is the peer on
    // point-to-point links); IPv6 normally only carries IFA_ADDRESS.
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(a) => Some(*a),
        _ => None,
    });
    local.or_else(|| {
        m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(a) => Some(*a),
            _ => None,
        })
    })
}

fn address_usable(m: &AddressMessage) -> bool {
    let bad = |f: &AddressFlag| matches!(f, AddressFlag::Tentative | AddressFlag::Dadfailed);
    !m.attributes.iter().any(|a| match a {
        AddressAttribute::Flags(flags) => flags.iter().any(bad),
        _ => false,
    })
}

impl Netlink {
    /// Opens a rtnetlink socket in the calling thread's network namespace and spawns
    /// its connection task on the current tokio runtime.
    pub fn new() -> Result<Netlink, SysError> {
        SysError::require_runtime("Netlink::new")?;
        let (conn, handle, _unsolicited) =
            rtnetlink::new_connection().map_err(|e| SysError::io("open rtnetlink socket", e))?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>, SysError> {
        ifname_to_c(name)?;
        if name.is_empty() {
            return Err(SysError::InvalidName(name.to_string()));
        }
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(e) if is_errno(&e, &[libc::ENODEV]) => Ok(None),
            Err(e) => Err(SysError::netlink(format!("get link {name}"), e)),
        }
    }

    async fn existing_link(&self, name: &str) -> Result<LinkMessage, SysError> {
        self.link_by_name(name)
            .await?
            .ok_or_else(|| SysError::NoSuchLink(name.to_string()))
    }

    async fn link_name_by_index(&self, index: u32) -> Result<Option<String>, SysError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(link) => Ok(link.as_ref().and_then(link_name)),
            Err(e) if is_errno(&e, &[libc::ENODEV]) => Ok(None),
            Err(e) => Err(SysError::netlink(format!("get link #{index}"), e)),
        }
    }

    /// The interface index of `name`, or `None` if there is no such interface.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, SysError> {
        Ok(self.link_by_name(name).await?.map(|l| l.header.index))
    }

    /// Sets `name` administratively up.
    pub async fn link_up(&self, name: &str) -> Result<(), SysError> {
        let index = self.existing_link(name).await?.header.index;
        self.handle
            .link()
            .set(index)
            .up()
            .execute()
            .await
            .map_err(|e| SysError::netlink(format!("set {name} up"), e))
    }

    /// Sets the MTU of `name`.
    pub async fn set_mtu(&self, name: &str, mtu: u32) -> Result<(), SysError> {
        let index = self.existing_link(name).await?.header.index;
        self.handle
            .link()
            .set(index)
            .mtu(mtu)
            .execute()
            .await
            .map_err(|e| SysError::netlink(format!("set {name} mtu {mtu}"), e))
    }

    /// The MTU of `name`.
    pub async fn link_mtu(&self, name: &str) -> Result<u32, SysError> {
        let link = self.existing_link(name).await?;
        link.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
            .ok_or_else(|| SysError::Unexpected(format!("link {name} has no MTU attribute")))
    }

    /// Deletes interface `name`; Ok if it does not exist.
    pub async fn delete_link(&self, name: &str) -> Result<(), SysError> {
        let Some(link) = self.link_by_name(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(link.header.index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, &[libc::ENODEV]) => Ok(()),
            Err(e) => Err(SysError::netlink(format!("delete link {name}"), e)),
        }
    }

    /// Adds `addr/prefix_len` to `ifname`. Idempotent: an existing identical address
    /// is not an error. IPv6 addresses are added with `nodad` so they are usable at once.
    pub async fn add_address(
        &self,
        ifname: &str,
        addr: IpAddr,
        prefix_len: u8,
    ) -> Result<(), SysError> {
        check_prefix(addr, prefix_len)?;
        let index = self.existing_link(ifname).await?.header.index;
        let mut req = self.handle.address().add(index, addr, prefix_len);
        if addr.is_ipv6() {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(vec![AddressFlag::Nodad]));
        }
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, &[libc::EEXIST]) => Ok(()),
            Err(e) => Err(SysError::netlink(
                format!("add address {addr}/{prefix_len} to {ifname}"),
                e,
            )),
        }
    }

    /// The addresses on `ifname` with their prefix lengths, in kernel order.
    pub async fn addresses(&self, ifname: &str) -> Result<Vec<(IpAddr, u8)>, SysError> {
        let index = self.existing_link(ifname).await?.header.index;
        Ok(self
            .address_messages(index)
            .await?
            .iter()
            .filter_map(|m| address_of(m).map(|a| (a, m.header.prefix_len)))
            .collect())
    }

    async fn address_messages(&self, index: u32) -> Result<Vec<AddressMessage>, SysError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| SysError::netlink(format!("list addresses of link #{index}"), e))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.index == index)
            .collect())
    }

    /// Creates a veth pair whose `peer` end is born in the network namespace open at
    /// `peer_netns_fd` (no move afterwards: moving a link costs an RCU grace period), both ends
    /// with `mtu`. `name` stays in this namespace, up.
    pub async fn add_veth_into(
        &self,
        name: &str,
        peer: &str,
        peer_netns_fd: std::os::fd::RawFd,
        mtu: u32,
    ) -> Result<(), SysError> {
        use netlink_packet_route::link::{InfoData, InfoVeth, LinkInfo};
        ifname_to_c(name)?;
        ifname_to_c(peer)?;
        // rtnetlink's `veth(a, b)` names the main link `b` and the peer `a`.
        let mut req = self
            .handle
            .link()
            .add()
            .veth(peer.to_string(), name.to_string());
        let msg = req.message_mut();
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        for attr in msg.attributes.iter_mut() {
            if let LinkAttribute::LinkInfo(infos) = attr {
                for info in infos.iter_mut() {
                    if let LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))) = info {
                        p.attributes.push(LinkAttribute::Mtu(mtu));
                        p.attributes.push(LinkAttribute::NetNsFd(peer_netns_fd));
                    }
                }
            }
        }
        req.execute().await.map_err(|e| {
            SysError::netlink(format!("add veth {name} <-> {peer} (in another netns)"), e)
        })
    }

    /// The link's hardware address as `aa:bb:cc:dd:ee:ff`, if it has one.
    pub async fn link_mac(&self, name: &str) -> Result<Option<String>, SysError> {
        let link = self.existing_link(name).await?;
        Ok(link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(mac) if !mac.is_empty() => Some(
                mac.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            ),
            _ => None,
        }))
    }

    /// Names of every link in this namespace.
    pub async fn link_names(&self) -> Result<Vec<String>, SysError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| SysError::netlink("dump links", e))?;
        Ok(links.iter().filter_map(link_name).collect())
    }

    async fn route_oif_index(&self, route: &Route) -> Result<Option<u32>, SysError> {
        match &route.kind {
            RouteKind::Dev { ifname, .. } | RouteKind::Via { ifname, .. } => {
                self.link_index(ifname).await
            }
            RouteKind::Unreachable => Ok(None),
        }
    }

    /// Installs `route` in the main table with `NLM_F_CREATE | NLM_F_REPLACE`: an
    /// existing route with the same destination and metric is replaced, so re-running
    /// is idempotent.
    pub async fn replace_route(&self, route: &Route) -> Result<(), SysError> {
        let oif = self.route_oif_index(route).await?;
        let msg = route_message(route, oif, false)?;
        let mut req = self.handle.route().add();
        *req.message_mut() = msg;
        req.replace()
            .execute()
            .await
            .map_err(|e| SysError::netlink(format!("replace route {route:?}"), e))
    }

    /// Deletes `route` (matched by destination, metric, type and, for device routes,
    /// interface). Ok if it is absent (or its interface is gone).
    pub async fn delete_route(&self, route: &Route) -> Result<(), SysError> {
        let oif = self.route_oif_index(route).await?;
        if matches!(route.kind, RouteKind::Dev { .. } | RouteKind::Via { .. }) && oif.is_none() {
            // Routes disappear with their interface.
            return Ok(());
        }
        let msg = route_message(route, oif, true)?;
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, &[libc::ESRCH, libc::ENOENT]) => Ok(()),
            Err(e) => Err(SysError::netlink(format!("delete route {route:?}"), e)),
        }
    }

    async fn main_routes(&self) -> Result<Vec<RouteMessage>, SysError> {
        let mut all = Vec::new();
        for version in [IpVersion::V4, IpVersion::V6] {
            let msgs: Vec<RouteMessage> = self
                .handle
                .route()
                .get(version.clone())
                .execute()
                .try_collect()
                .await
                .map_err(|e| SysError::netlink(format!("dump {version:?} routes"), e))?;
            all.extend(
                msgs.into_iter()
                    .filter(|m| route_table(m) == u32::from(RouteHeader::RT_TABLE_MAIN)),
            );
        }
        Ok(all)
    }

    /// Destinations of main-table routes that go out of `ifname`, excluding routes the
    /// kernel made itself (`proto kernel`, e.g. the connected subnet or `fe80::/64`).
    /// Empty if the interface does not exist.
    pub async fn routes_via(&self, ifname: &str) -> Result<Vec<IpNet>, SysError> {
        let Some(index) = self.link_index(ifname).await? else {
            return Ok(Vec::new());
        };
        Ok(self
            .main_routes()
            .await?
            .iter()
            .filter(|m| route_oif(m) == Some(index))
            .filter(|m| m.header.protocol != RouteProtocol::Kernel)
            .filter(|m| m.header.kind == RouteType::Unicast)
            .filter_map(route_dst)
            .collect())
    }

    /// All main-table routes installed with weft's protocol tag ([`ROUTE_PROTO`]), both
    /// families: what a restarted daemon should reconcile or remove.
    pub async fn owned_routes(&self) -> Result<Vec<Route>, SysError> {
        let mut out = Vec::new();
        for m in self.main_routes().await? {
            if m.header.protocol != RouteProtocol::Other(ROUTE_PROTO) {
                continue;
            }
            let Some(dst) = route_dst(&m) else { continue };
            let kind = match m.header.kind {
                RouteType::Unreachable => RouteKind::Unreachable,
                RouteType::Unicast => {
                    let Some(oif) = route_oif(&m) else { continue };
                    let Some(ifname) = self.link_name_by_index(oif).await? else {
                        continue;
                    };
                    match route_gateway(&m) {
                        Some(gateway) => RouteKind::Via { ifname, gateway },
                        None => RouteKind::Dev {
                            ifname,
                            src: route_prefsrc(&m),
                        },
                    }
                }
                _ => continue,
            };
            out.push(Route {
                dst,
                kind,
                metric: route_metric(&m),
            });
        }
        Ok(out)
    }

    /// The underlay: the interface holding the main-table IPv4 default route (lowest
    /// metric; IPv6 default route if there is no usable IPv4 one), its preferred source
    /// or first global address of that family, and its MTU.
    pub async fn default_route_source(&self) -> Result<Option<(String, IpAddr, u32)>, SysError> {
        let routes = self.main_routes().await?;
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut defaults: Vec<&RouteMessage> = routes
                .iter()
                .filter(|m| m.header.address_family == family)
                .filter(|m| m.header.destination_prefix_length == 0)
                .filter(|m| m.header.kind == RouteType::Unicast)
                .filter(|m| route_oif(m).is_some())
                .collect();
            defaults.sort_by_key(|m| route_metric(m));
            for m in defaults {
                let Some(oif) = route_oif(m) else { continue };
                let Some(ifname) = self.link_name_by_index(oif).await? else {
                    continue;
                };
                let addr = match route_prefsrc(m) {
                    Some(src) => Some(src),
                    None => self
                        .address_messages(oif)
                        .await?
                        .iter()
                        .filter(|a| a.header.family == family)
                        .filter(|a| a.header.scope == AddressScope::Universe)
                        .filter(|a| address_usable(a))
                        .find_map(address_of),
                };
                let Some(addr) = addr else { continue };
                let mtu = self.link_mtu(&ifname).await?;
                return Ok(Some((ifname, addr, mtu)));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn route_message_dev_v4() {
        let r = Route {
            dst: "10.1.2.3/24".parse().unwrap(),
            kind: RouteKind::Dev {
                ifname: "weft0".into(),
                src: Some("10.1.0.1".parse().unwrap()),
            },
            metric: 100,
        };
        let m = route_message(&r, Some(7), false).unwrap();
        assert_eq!(m.header.address_family, AddressFamily::Inet);
        assert_eq!(m.header.destination_prefix_length, 24);
        assert_eq!(m.header.kind, RouteType::Unicast);
        assert_eq!(m.header.scope, RouteScope::Link);
        assert_eq!(m.header.protocol, RouteProtocol::Other(ROUTE_PROTO));
        assert_eq!(route_dst(&m), Some("10.1.2.0/24".parse().unwrap()));
        assert_eq!(route_oif(&m), Some(7));
        assert_eq!(route_metric(&m), 100);
        assert_eq!(route_prefsrc(&m), Some("10.1.0.1".parse().unwrap()));

        let d = route_message(&r, Some(7), true).unwrap();
        assert_eq!(d.header.scope, RouteScope::NoWhere);
        assert_eq!(d.header.protocol, RouteProtocol::Unspec);
        assert_eq!(route_prefsrc(&d), None);
    }

    #[test]
    fn route_message_unreachable_v6() {
        let r = Route::unreachable("fd00:1::/48".parse().unwrap());
        let m = route_message(&r, None, false).unwrap();
        assert_eq!(m.header.address_family, AddressFamily::Inet6);
        assert_eq!(m.header.kind, RouteType::Unreachable);
        assert_eq!(route_oif(&m), None);
        assert_eq!(route_metric(&m), UNREACHABLE_ROUTE_METRIC);
        assert_eq!(route_dst(&m), Some("fd00:1::/48".parse().unwrap()));
    }

    #[test]
    fn route_message_rejects_bad_input() {
        let r = Route::dev("10.0.0.0/8".parse().unwrap(), "weft0");
        assert!(matches!(
            route_message(&r, None, false),
            Err(SysError::NoSuchLink(_))
        ));
        let r = Route {
            dst: "10.0.0.0/8".parse().unwrap(),
            kind: RouteKind::Dev {
                ifname: "weft0".into(),
                src: Some("fd00::1".parse().unwrap()),
            },
            metric: 1,
        };
        assert!(matches!(
            route_message(&r, Some(1), false),
            Err(SysError::InvalidArgument(_))
        ));
        assert!(check_prefix("10.0.0.1".parse().unwrap(), 33).is_err());
        assert!(check_prefix("fd00::1".parse().unwrap(), 128).is_ok());
    }

    #[test]
    fn default_dst_without_attribute() {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        assert_eq!(route_dst(&m), Some("0.0.0.0/0".parse().unwrap()));
        m.header.address_family = AddressFamily::Inet6;
        assert_eq!(route_dst(&m), Some("::/0".parse().unwrap()));
    }
}
