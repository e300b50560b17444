//! Root-only tests. Each test creates its own network namespace `wsys-test-<random>`,
//! works only inside it (interface names and ports can therefore repeat across tests,
//! which run in parallel), and deletes it on drop, even when the test panics.
//! Without root (or without `ip`/`/dev/net/tun`) the tests print a note and pass.

#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use weft_sys::netlink::ROUTE_PROTO;
use weft_sys::{netns, udp, Netlink, Route, RouteKind, Tun};

struct TestNs {
    name: String,
}

impl TestNs {
    /// Creates a fresh namespace with `lo` up, or `None` when we cannot (not root).
    fn new() -> Option<TestNs> {
        if !nix::unistd::geteuid().is_root()
            || !std::path::Path::new("/dev/net/tun").exists()
            || Command::new("ip").arg("-V").output().is_err()
        {
            eprintln!("skipping: needs root, /dev/net/tun and iproute2");
            return None;
        }
        let name = format!("wsys-test-{:08x}", rand::random::<u32>());
        run("ip", &["netns", "add", &name]);
        let ns = TestNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        Some(ns)
    }

    /// `ip -n NS args...`, asserting success; returns stdout.
    fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// `ip netns exec NS cmd args...`, returning (success, stdout+stderr).
    fn exec(&self, cmd: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .unwrap();
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// Runs an async test body on a current-thread runtime inside the namespace.
    fn block_on<F, Fut>(&self, f: F) -> Fut::Output
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future,
        Fut::Output: Send,
    {
        netns::run_in(&self.name, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(30), f())
                    .await
                    .expect("test body timed out")
            })
        })
        .unwrap()
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 ICMP echo request `src -> dst`.
fn icmp_echo_request(src: [u8; 4], dst: [u8; 4], id: u16, seq: u16) -> Vec<u8> {
    let payload = b"weft-sys-test";
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut pkt = ipv4_header(src, dst, 1, icmp.len());
    pkt.extend_from_slice(&icmp);
    pkt
}

/// An IPv4 header (ID 1, DF, TTL 64, checksum set) for `payload_len` bytes of `proto`.
fn ipv4_header(src: [u8; 4], dst: [u8; 4], proto: u8, payload_len: usize) -> Vec<u8> {
    let total = (20 + payload_len) as u16;
    let mut pkt = vec![0x45, 0];
    pkt.extend_from_slice(&total.to_be_bytes());
    pkt.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    pkt.extend_from_slice(&src);
    pkt.extend_from_slice(&dst);
    let c = checksum(&pkt);
    pkt[10..12].copy_from_slice(&c.to_be_bytes());
    pkt
}

/// Reads packets off the TUN until `pred` matches one (other traffic, e.g. IPv6
/// router solicitations, is skipped).
async fn read_until(tun: &Tun, pred: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    loop {
        let n = tun.recv(&mut buf).await.unwrap();
        if pred(&buf[..n]) {
            return buf[..n].to_vec();
        }
    }
}

#[test]
fn run_in_enters_the_namespace() {
    let Some(ns) = TestNs::new() else { return };
    assert!(netns::exists(&ns.name));
    assert!(netns::exists(&format!("/run/netns/{}", ns.name)));
    let host_ino = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
    let target_ino = std::fs::metadata(format!("/run/netns/{}", ns.name))
        .unwrap()
        .ino();
    let inside = netns::run_in(&ns.name, || {
        std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
    })
    .unwrap();
    assert_eq!(inside, target_ino);
    assert_ne!(inside, host_ino);
    // The caller's thread did not move.
    assert_eq!(
        std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino(),
        host_ino
    );
    // Panics propagate.
    let r = std::panic::catch_unwind(|| netns::run_in(&ns.name, || panic!("boom")));
    assert!(r.is_err());
}

#[test]
fn tun_create_up_address_mtu() {
    let Some(ns) = TestNs::new() else { return };
    let tun = ns.block_on(|| async {
        let nl = Netlink::new().unwrap();
        assert_eq!(nl.link_index("weft0").await.unwrap(), None);
        let tun = Tun::create("weft0").unwrap();
        assert_eq!(tun.name(), "weft0");
        assert!(nl.link_index("weft0").await.unwrap().is_some());

        nl.set_mtu("weft0", 1380).await.unwrap();
        assert_eq!(nl.link_mtu("weft0").await.unwrap(), 1380);
        nl.link_up("weft0").await.unwrap();
        for _ in 0..2 {
            nl.add_address("weft0", ip("10.99.0.1"), 24).await.unwrap();
            nl.add_address("weft0", ip("fd99::1"), 64).await.unwrap();
        }
        let addrs = nl.addresses("weft0").await.unwrap();
        assert!(addrs.contains(&(ip("10.99.0.1"), 24)), "{addrs:?}");
        assert!(addrs.contains(&(ip("fd99::1"), 64)), "{addrs:?}");

        // Kernel-chosen name from a template.
        let t2 = Tun::create("wt%d").unwrap();
        assert!(t2.name().starts_with("wt"), "{}", t2.name());
        assert!(Tun::create("this-name-is-way-too-long").is_err());

        // Errors and absent links.
        assert!(matches!(
            nl.link_up("nope0").await,
            Err(weft_sys::SysError::NoSuchLink(_))
        ));
        assert!(nl.add_address("weft0", ip("10.0.0.1"), 33).await.is_err());
        nl.delete_link("nope0").await.unwrap();

        drop(t2);
        tun
    });
    let link = ns.ip(&["link", "show", "weft0"]);
    assert!(link.contains("mtu 1380"), "{link}");
    assert!(link.contains(",UP"), "{link}");
    let addr = ns.ip(&["addr", "show", "weft0"]);
    assert!(addr.contains("inet 10.99.0.1/24"), "{addr}");
    assert!(addr.contains("inet6 fd99::1/64"), "{addr}");
    drop(tun);
    // See tun_drop_deletes_interface_and_delete_link_works: a child forked by another test
    // thread may hold the last reference for a moment.
    let mut gone = ns.exec(&["ip", "link", "show", "weft0"]);
    for _ in 0..100 {
        if !gone.0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        gone = ns.exec(&["ip", "link", "show", "weft0"]);
    }
    assert!(!gone.0, "{}", gone.1);
}

#[test]
fn tun_drop_deletes_interface_and_delete_link_works() {
    let Some(ns) = TestNs::new() else { return };
    ns.block_on(|| async {
        let nl = Netlink::new().unwrap();
        let tun = Tun::create("weft0").unwrap();
        assert!(nl.link_index("weft0").await.unwrap().is_some());
        drop(tun);
        // Other test threads fork children (`ip ...`); between fork and exec a child holds a
        // copy of every descriptor (O_CLOEXEC acts only at exec), so the last reference may be
        // dropped a moment later than ours. The interface must be gone within a second.
        let mut gone = false;
        for _ in 0..100 {
            if nl.link_index("weft0").await.unwrap().is_none() {
                gone = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(gone, "weft0 still exists 1 s after its TUN was dropped");

        let _tun = Tun::create("weft1").unwrap();
        nl.delete_link("weft1").await.unwrap();
        assert_eq!(nl.link_index("weft1").await.unwrap(), None);
        nl.delete_link("weft1").await.unwrap();
    });
}

#[test]
fn tun_packets_both_directions() {
    let Some(ns) = TestNs::new() else { return };
    ns.block_on(|| async {
        let nl = Netlink::new().unwrap();
        let tun = Arc::new(Tun::create("weft0").unwrap());
        nl.add_address("weft0", ip("10.99.0.1"), 24).await.unwrap();
        nl.add_address("weft0", ip("fd99::1"), 64).await.unwrap();
        nl.link_up("weft0").await.unwrap();

        // Kernel -> TUN: a datagram to the TUN's peer address comes out of the TUN.
        let sock = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
        sock.send_to(b"hello-v4", "10.99.0.2:9").await.unwrap();
        let pkt = read_until(&tun, |p| p.len() > 20 && p[0] >> 4 == 4 && p[9] == 17).await;
        assert_eq!(&pkt[16..20], &[10, 99, 0, 2]);
        assert!(pkt.ends_with(b"hello-v4"));

        let sock6 = tokio::net::UdpSocket::bind("[::]:0").await.unwrap();
        sock6.send_to(b"hello-v6", "[fd99::2]:9").await.unwrap();
        let pkt = read_until(&tun, |p| p.len() > 40 && p[0] >> 4 == 6 && p[6] == 17).await;
        assert_eq!(
            pkt[24..40],
            "fd99::2".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
        assert!(pkt.ends_with(b"hello-v6"));

        // A ping from the command line (ICMP echo request appears on the TUN).
        let mut ping = std::process::Command::new("ping")
            .args(["-c", "3", "-i", "0.2", "-W", "1", "10.99.0.7"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pkt = read_until(&tun, |p| {
            p.len() > 28 && p[0] >> 4 == 4 && p[9] == 1 && p[20] == 8
        })
        .await;
        assert_eq!(&pkt[16..20], &[10, 99, 0, 7]);
        let _ = ping.kill();
        let _ = ping.wait();

        // TUN -> kernel: an echo request written to the TUN is answered; the reply is
        // read by a second task while this one writes (shared via Arc).
        let reader = {
            let tun = Arc::clone(&tun);
            tokio::spawn(async move {
                read_until(&tun, |p| {
                    p.len() > 28 && p[0] >> 4 == 4 && p[9] == 1 && p[20] == 0
                })
                .await
            })
        };
        let req = icmp_echo_request([10, 99, 0, 2], [10, 99, 0, 1], 0x4242, 7);
        assert_eq!(tun.send(&req).await.unwrap(), req.len());
        let reply = reader.await.unwrap();
        assert_eq!(&reply[12..16], &[10, 99, 0, 1]);
        assert_eq!(&reply[16..20], &[10, 99, 0, 2]);
        assert_eq!(&reply[24..26], &0x4242u16.to_be_bytes());
        assert_eq!(&reply[26..28], &7u16.to_be_bytes());
    });
}

fn route_get(ns: &TestNs, v6: bool, dst: &str) -> (bool, String) {
    let fam = if v6 { "-6" } else { "-4" };
    ns.exec(&["ip", fam, "route", "get", dst])
}

#[test]
fn routes_dev_and_unreachable_v4_v6() {
    let Some(ns) = TestNs::new() else { return };
    let _tuns = ns.block_on(|| async {
        let nl = Netlink::new().unwrap();
        let t0 = Tun::create("weft0").unwrap();
        let t1 = Tun::create("weft1").unwrap();
        for (name, v4, v6) in [
            ("weft0", "10.99.0.1", "fd99::1"),
            ("weft1", "10.98.0.1", "fd98::1"),
        ] {
            nl.link_up(name).await.unwrap();
            nl.add_address(name, ip(v4), 24).await.unwrap();
            nl.add_address(name, ip(v6), 64).await.unwrap();
        }
        for _ in 0..2 {
            nl.replace_route(&Route::dev(net("10.100.1.0/24"), "weft0"))
                .await
                .unwrap();
            nl.replace_route(&Route::unreachable(net("10.100.0.0/16")))
                .await
                .unwrap();
            nl.replace_route(&Route::dev(net("fd00:100:1::/64"), "weft0"))
                .await
                .unwrap();
            nl.replace_route(&Route::unreachable(net("fd00:100::/48")))
                .await
                .unwrap();
        }
        // Host bits are ignored.
        nl.replace_route(&Route::dev(net("10.100.2.7/24"), "weft0"))
            .await
            .unwrap();
        (t0, t1, nl)
    });
    let (_t0, _t1, _) = &_tuns;

    let v4 = ns.ip(&["-4", "route", "show"]);
    assert_eq!(v4.matches("10.100.1.0/24 dev weft0").count(), 1, "{v4}");
    assert!(
        v4.contains(&format!(
            "10.100.1.0/24 dev weft0 proto {ROUTE_PROTO} scope link metric 100"
        )),
        "{v4}"
    );
    assert!(v4.contains("10.100.2.0/24 dev weft0"), "{v4}");
    assert_eq!(v4.matches("unreachable 10.100.0.0/16").count(), 1, "{v4}");
    assert!(v4.contains("metric 4000"), "{v4}");
    let v6 = ns.ip(&["-6", "route", "show"]);
    assert_eq!(v6.matches("fd00:100:1::/64 dev weft0").count(), 1, "{v6}");
    assert!(v6.contains("metric 100"), "{v6}");
    assert_eq!(v6.matches("unreachable fd00:100::/48").count(), 1, "{v6}");
    assert!(v6.contains("metric 4000"), "{v6}");

    // The dev route wins inside its prefix, the unreachable route catches the rest.
    let (ok, out) = route_get(&ns, false, "10.100.1.5");
    assert!(ok && out.contains("dev weft0"), "{out}");
    let (ok, out) = route_get(&ns, false, "10.100.3.5");
    assert!(!ok, "{out}");
    let (ok, out) = route_get(&ns, true, "fd00:100:1::5");
    assert!(ok && out.contains("dev weft0"), "{out}");
    let (ok, out) = route_get(&ns, true, "fd00:100:2::5");
    assert!(!ok || out.contains("unreachable"), "{out}");

    ns.block_on(|| async {
        let nl = Netlink::new().unwrap();
        let via = nl.routes_via("weft0").await.unwrap();
        for n in ["10.100.1.0/24", "10.100.2.0/24", "fd00:100:1::/64"] {
            assert!(via.contains(&net(n)), "{n} not in {via:?}");
        }
        assert!(
            !via.contains(&net("10.99.0.0/24")),
            "kernel route listed: {via:?}"
        );
        assert!(
            !via.contains(&net("fd99::/64")),
            "kernel route listed: {via:?}"
        );
        assert!(nl.routes_via("nope0").await.unwrap().is_empty());

        let owned = nl.owned_routes().await.unwrap();
        assert!(
            owned.contains(&Route::dev(net("10.100.1.0/24"), "weft0")),
            "{owned:?}"
        );
        assert!(
            owned.contains(&Route::unreachable(net("10.100.0.0/16"))),
            "{owned:?}"
        );
        assert!(
            owned.contains(&Route::unreachable(net("fd00:100::/48"))),
            "{owned:?}"
        );
        assert_eq!(owned.len(), 5, "{owned:?}");

        // REPLACE moves the route (same prefix + metric) to another device / adds src.
        nl.replace_route(&Route::dev(net("10.100.1.0/24"), "weft1"))
            .await
            .unwrap();
        nl.replace_route(&Route {
            dst: net("fd00:100:1::/64"),
            kind: RouteKind::Dev {
                ifname: "weft1".into(),
                src: Some(ip("fd98::1")),
            },
            metric: 100,
        })
        .await
        .unwrap();
    });
    let v4 = ns.ip(&["-4", "route", "show"]);
    assert!(!v4.contains("10.100.1.0/24 dev weft0"), "{v4}");
    assert_eq!(v4.matches("10.100.1.0/24 dev weft1").count(), 1, "{v4}");
    let v6 = ns.ip(&["-6", "route", "show"]);
    assert!(!v6.contains("fd00:100:1::/64 dev weft0"), "{v6}");
    assert!(v6.contains("fd00:100:1::/64 dev weft1"), "{v6}");
    assert!(v6.contains("src fd98::1"), "{v6}");

    ns.block_on(|| async {
        let nl = Netlink::new().unwrap();
        // Deleting with the wrong device does nothing (and is not an error).
        nl.delete_route(&Route::dev(net("10.100.1.0/24"), "weft0"))
            .await
            .unwrap();
        let owned = nl.owned_routes().await.unwrap();
        assert!(
            owned.iter().any(|r| r.dst == net("10.100.1.0/24")),
            "{owned:?}"
        );

        for _ in 0..2 {
            nl.delete_route(&Route::dev(net("10.100.1.0/24"), "weft1"))
                .await
                .unwrap();
            nl.delete_route(&Route::dev(net("fd00:100:1::/64"), "weft1"))
                .await
                .unwrap();
        }
        nl.delete_route(&Route::dev(net("10.100.1.0/24"), "nope0"))
            .await
            .unwrap();
    });
    // Fail-closed: with the dev route gone, the unreachable route catches the packet.
    let (ok, out) = route_get(&ns, false, "10.100.1.5");
    assert!(!ok, "{out}");
    let (ok, out) = route_get(&ns, true, "fd00:100:1::5");
    assert!(!ok || out.contains("unreachable"), "{out}");

    ns.block_on(|| async {
        let nl = Netlink::new().unwrap();
        for _ in 0..2 {
            nl.delete_route(&Route::unreachable(net("10.100.0.0/16")))
                .await
                .unwrap();
            nl.delete_route(&Route::unreachable(net("fd00:100::/48")))
                .await
                .unwrap();
        }
        nl.delete_route(&Route::dev(net("10.100.2.0/24"), "weft0"))
            .await
            .unwrap();
        let owned = nl.owned_routes().await.unwrap();
        assert!(owned.is_empty(), "{owned:?}");
    });
    let v4 = ns.ip(&["-4", "route", "show"]);
    assert!(!v4.contains("10.100."), "{v4}");
    let v6 = ns.ip(&["-6", "route", "show"]);
    assert!(!v6.contains("fd00:100"), "{v6}");
    drop(_tuns);
}

#[test]
fn default_route_source_v4_then_v6() {
    let Some(ns) = TestNs::new() else { return };
    ns.block_on(|| async {
        let nl = Netlink::new().unwrap();
        assert_eq!(nl.default_route_source().await.unwrap(), None);
    });
    ns.ip(&[
        "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b",
    ]);
    ns.ip(&["link", "set", "veth-a", "mtu", "1450", "up"]);
    ns.ip(&["link", "set", "veth-b", "up"]);
    ns.ip(&["addr", "add", "192.168.77.2/24", "dev", "veth-a"]);
    ns.ip(&["addr", "add", "192.168.77.3/24", "dev", "veth-a"]);
    ns.ip(&["addr", "add", "2001:db8:77::2/64", "dev", "veth-a", "nodad"]);
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "192.168.77.1",
        "dev",
        "veth-a",
    ]);
    ns.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        "2001:db8:77::1",
        "dev",
        "veth-a",
    ]);
    ns.block_on(|| async {
        let nl = Netlink::new().unwrap();
        assert_eq!(
            nl.default_route_source().await.unwrap(),
            Some(("veth-a".to_string(), ip("192.168.77.2"), 1450))
        );
    });
    // A preferred source on the default route wins over the first address.
    ns.ip(&[
        "route",
        "replace",
        "default",
        "via",
        "192.168.77.1",
        "dev",
        "veth-a",
        "src",
        "192.168.77.3",
    ]);
    ns.block_on(|| async {
        let nl = Netlink::new().unwrap();
        assert_eq!(
            nl.default_route_source().await.unwrap(),
            Some(("veth-a".to_string(), ip("192.168.77.3"), 1450))
        );
    });
    // IPv6 fallback when there is no IPv4 default route.
    ns.ip(&["route", "del", "default"]);
    ns.block_on(|| async {
        let nl = Netlink::new().unwrap();
        assert_eq!(
            nl.default_route_source().await.unwrap(),
            Some(("veth-a".to_string(), ip("2001:db8:77::2"), 1450))
        );
    });
}

#[test]
fn udp_dual_stack_receives_ipv4_and_ipv6() {
    let Some(ns) = TestNs::new() else { return };
    ns.block_on(|| async {
        let sock = weft_sys::bind_udp(51820).unwrap();
        let local = sock.local_addr().unwrap();
        assert_eq!(local, "[::]:51820".parse::<SocketAddr>().unwrap());
        assert!(udp::socket_is_v6(&sock).unwrap());
        let sref = socket2::SockRef::from(&sock);
        assert!(sref.recv_buffer_size().unwrap() >= udp::UDP_BUFFER_BYTES);
        assert!(sref.send_buffer_size().unwrap() >= udp::UDP_BUFFER_BYTES);

        let mut buf = [0u8; 64];
        let c4 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        c4.send_to(b"four", "127.0.0.1:51820").unwrap();
        let (n, from) = sock.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"four");
        assert!(
            from.is_ipv6(),
            "dual-stack socket reports mapped addresses: {from}"
        );
        let from = weft_sys::canonical(from);
        assert_eq!(from, c4.local_addr().unwrap());
        assert!(from.is_ipv4());
        sock.send_to(b"back4", weft_sys::to_socket_family(from, true))
            .await
            .unwrap();
        c4.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (n, _) = c4.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"back4");

        let c6 = std::net::UdpSocket::bind("[::1]:0").unwrap();
        c6.send_to(b"six", "[::1]:51820").unwrap();
        let (n, from) = sock.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"six");
        assert_eq!(weft_sys::canonical(from), c6.local_addr().unwrap());

        // The port is taken for both families now.
        assert!(weft_sys::bind_udp(51820).is_err());
    });
}

#[test]
fn forwarding_is_per_namespace() {
    let Some(ns) = TestNs::new() else { return };
    let host_before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let (_, v) = ns.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(v.trim(), "0");
    let fwd = netns::run_in(&ns.name, || weft_sys::enable_forwarding(true))
        .unwrap()
        .unwrap();
    assert_eq!(
        fwd,
        weft_sys::Forwarding {
            ipv4: true,
            ipv6: true
        }
    );
    let (_, v) = ns.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(v.trim(), "1");
    let (_, v) = ns.exec(&["cat", "/proc/sys/net/ipv6/conf/all/forwarding"]);
    assert_eq!(v.trim(), "1");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        host_before
    );
    netns::run_in(&ns.name, || {
        weft_sys::write_sysctl("net.ipv4.conf.all.rp_filter", "2").unwrap();
        assert_eq!(
            weft_sys::sysctl::read_sysctl("net/ipv4/conf/all/rp_filter").unwrap(),
            "2"
        );
    })
    .unwrap();
}

/// The device's `IFF_*` flags as the kernel reports them (`/sys/class/net/NAME/tun_flags`;
/// `ip netns exec` mounts the namespace's own /sys).
fn tun_flags(ns: &TestNs, name: &str) -> u32 {
    let path = format!("/sys/class/net/{name}/tun_flags");
    let (ok, out) = ns.exec(&["cat", &path]);
    assert!(ok, "{out}");
    u32::from_str_radix(out.trim().trim_start_matches("0x"), 16).unwrap()
}

/// Polls until `name` is gone from the namespace (see tun_drop_deletes_interface_and_...:
/// a child forked by another test thread may hold the last reference for a moment).
fn assert_link_gone(ns: &TestNs, name: &str) {
    let mut gone = ns.exec(&["ip", "link", "show", name]);
    for _ in 0..100 {
        if !gone.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        gone = ns.exec(&["ip", "link", "show", name]);
    }
    assert!(!gone.0, "{name} still exists: {}", gone.1);
}

const IFF_TUN: u32 = 0x0001;
const IFF_MULTI_QUEUE: u32 = 0x0100;
const IFF_NO_PI: u32 = 0x1000;
const IFF_VNET_HDR: u32 = 0x4000;

#[test]
fn tun_open_queues_one_multi_queue_device() {
    let Some(ns) = TestNs::new() else { return };
    let queues = netns::run_in(&ns.name, || Tun::open_queues("weft0", 3, true).unwrap()).unwrap();
    assert_eq!(queues.len(), 3);
    let offloads = queues[0].offloads();
    assert!(offloads.is_some());
    for q in &queues {
        assert_eq!(q.name(), "weft0");
        assert_eq!(q.offloads(), offloads);
    }
    assert_eq!(
        tun_flags(&ns, "weft0"),
        IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | IFF_VNET_HDR
    );
    let details = ns.ip(&["-d", "link", "show", "weft0"]);
    assert!(details.contains("multi_queue"), "{details}");

    netns::run_in(&ns.name, || {
        // More queues attach to the existing multi-queue device.
        let more = Tun::open_queues("weft0", 2, true).unwrap();
        assert_eq!(more.len(), 2);
        assert!(more.iter().all(|q| q.name() == "weft0"));
        assert!(more.iter().all(|q| q.offloads() == offloads));
        // A single-queue open of a multi-queue device is refused (plain error).
        let e = Tun::open_queues("weft0", 1, true).unwrap_err();
        assert!(!e.is_multi_queue_unsupported(), "{e}");
        assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");

        // A multi-queue open of an existing single-queue device: MultiQueueUnsupported.
        let single = Tun::open_queues("weft1", 1, false).unwrap();
        let e = Tun::open_queues("weft1", 3, false).unwrap_err();
        assert!(e.is_multi_queue_unsupported(), "{e}");
        assert!(e.to_string().contains("IFF_MULTI_QUEUE"), "{e}");
        drop(single);

        // A name the kernel rejects (EINVAL from register_netdevice) is not mistaken for
        // a multi-queue refusal.
        let e = Tun::open_queues("a b", 2, false).unwrap_err();
        assert!(!e.is_multi_queue_unsupported(), "{e}");

        // Template names are resolved by the first queue and shared by the rest.
        let t = Tun::open_queues("wq%d", 3, false).unwrap();
        assert!(t[0].name().starts_with("wq"), "{}", t[0].name());
        assert!(t
            .iter()
            .all(|q| q.name() == t[0].name() && q.offloads().is_none()));
        let t = Tun::open_queues("", 2, false).unwrap();
        assert!(t[0].name().starts_with("tun"), "{}", t[0].name());
        assert!(t.iter().all(|q| q.name() == t[0].name()));
    })
    .unwrap();
    assert_link_gone(&ns, "weft1");
    assert_link_gone(&ns, "wq0");
    // The two extra queues detach once their files are released, which a concurrent fork in
    // another test thread can delay (as for the links above): wait up to 1 s.
    let mut details = ns.ip(&["-d", "link", "show", "weft0"]);
    for _ in 0..100 {
        if details.contains("numqueues 3") {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        details = ns.ip(&["-d", "link", "show", "weft0"]);
    }
    assert!(details.contains("numqueues 3"), "{details}");

    // Dropping some queues keeps the device; dropping the last deletes it.
    let mut queues = queues;
    queues.truncate(1);
    assert!(ns.exec(&["ip", "link", "show", "weft0"]).0);
    drop(queues);
    assert_link_gone(&ns, "weft0");
}

#[test]
fn tun_open_one_queue_is_create() {
    let Some(ns) = TestNs::new() else { return };
    let _keep = ns.block_on(|| async {
        let q = Tun::open_queues("weft0", 1, true).unwrap();
        assert_eq!(q.len(), 1);
        let q0 = Tun::from_queue(q.into_iter().next().unwrap()).unwrap();
        let c0 = Tun::create_offload("weft1").unwrap();
        assert_eq!(q0.name(), "weft0");
        assert!(q0.offloads().is_some());
        assert_eq!(q0.offloads(), c0.offloads());

        let q = Tun::open_queues("weft2", 1, false).unwrap();
        let q2 = Tun::from_queue(q.into_iter().next().unwrap()).unwrap();
        let c2 = Tun::create("weft3").unwrap();
        assert_eq!(q2.offloads(), None);
        assert_eq!(c2.offloads(), None);
        (q0, c0, q2, c2)
    });
    assert_eq!(tun_flags(&ns, "weft0"), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR);
    assert_eq!(tun_flags(&ns, "weft0"), tun_flags(&ns, "weft1"));
    assert_eq!(tun_flags(&ns, "weft2"), IFF_TUN | IFF_NO_PI);
    assert_eq!(tun_flags(&ns, "weft2"), tun_flags(&ns, "weft3"));
}

/// A UDP datagram `src:sport -> dst:dport` with no checksum (0 is allowed over IPv4).
fn udp4_packet(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut pkt = ipv4_header(src, dst, 17, 8 + payload.len());
    pkt.extend_from_slice(&sport.to_be_bytes());
    pkt.extend_from_slice(&dport.to_be_bytes());
    pkt.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    pkt.extend_from_slice(&[0, 0]);
    pkt.extend_from_slice(payload);
    pkt
}

/// Drains every queue with `try_recv` until `want` datagrams `* -> 10.99.0.2:9` were seen,
/// then once more after a pause; returns (payload, queue) in arrival order.
async fn drain_queues(tuns: &[Tun], want: usize) -> Vec<(String, usize)> {
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 2048];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut extra_round = false;
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        for (qi, t) in tuns.iter().enumerate() {
            loop {
                match t.try_recv(&mut buf) {
                    Ok(n) => {
                        let p = &buf[..n];
                        if n > 28 && p[0] == 0x45 && p[9] == 17 && p[16..20] == [10, 99, 0, 2] {
                            let payload = String::from_utf8_lossy(&p[28..]).into_owned();
                            seen.push((payload, qi));
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("queue {qi}: {e}"),
                }
            }
        }
        if extra_round {
            return seen;
        }
        if seen.len() >= want {
            // Anything delivered twice would show up now.
            tokio::time::sleep(Duration::from_millis(200)).await;
            extra_round = true;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {want} datagrams arrived: {seen:?}",
            seen.len()
        );
    }
}

#[test]
fn tun_queues_spread_kernel_packets_by_flow() {
    let Some(ns) = TestNs::new() else { return };
    ns.block_on(|| async {
        const QUEUES: usize = 4;
        const FLOWS: usize = 16;
        const PER_FLOW: usize = 5;
        let nl = Netlink::new().unwrap();
        let tuns: Vec<Tun> = Tun::open_queues("weft0", QUEUES, false)
            .unwrap()
            .into_iter()
            .map(|q| Tun::from_queue(q).unwrap())
            .collect();
        nl.add_address("weft0", ip("10.99.0.1"), 24).await.unwrap();
        nl.link_up("weft0").await.unwrap();

        let socks: Vec<std::net::UdpSocket> = (0..FLOWS)
            .map(|_| std::net::UdpSocket::bind("10.99.0.1:0").unwrap())
            .collect();
        for j in 0..PER_FLOW {
            for (i, s) in socks.iter().enumerate() {
                s.send_to(format!("flow{i:02}-{j}").as_bytes(), "10.99.0.2:9")
                    .unwrap();
            }
        }
        let seen = drain_queues(&tuns, FLOWS * PER_FLOW).await;
        assert_eq!(seen.len(), FLOWS * PER_FLOW, "{seen:?}");
        let mut queue_of = std::collections::HashMap::new();
        let mut per_flow_seq = vec![Vec::new(); FLOWS];
        for (payload, q) in &seen {
            let (flow, seq) = payload
                .strip_prefix("flow")
                .unwrap()
                .split_once('-')
                .unwrap();
            let flow: usize = flow.parse().unwrap();
            let seq: usize = seq.parse().unwrap();
            assert_eq!(
                *queue_of.entry(flow).or_insert(*q),
                *q,
                "flow {flow} on two queues: {seen:?}"
            );
            per_flow_seq[flow].push(seq);
        }
        for (flow, seqs) in per_flow_seq.iter().enumerate() {
            assert_eq!(
                seqs,
                &(0..PER_FLOW).collect::<Vec<_>>(),
                "flow {flow}: each datagram exactly once, in order"
            );
        }
        let mut used: Vec<usize> = queue_of.values().copied().collect();
        used.sort_unstable();
        used.dedup();
        eprintln!("TUN flow -> queue: {queue_of:?}");
        assert!(
            used.len() > 1,
            "all {FLOWS} flows on one queue: {queue_of:?}"
        );

        // The kernel's flow table: once userspace writes a packet of a flow (either direction:
        // the hash is symmetric) on some queue, the kernel sends that flow's packets to it.
        let flow = 0;
        let from = queue_of[&flow];
        let to = (from + 1) % QUEUES;
        let sport = socks[flow].local_addr().unwrap().port();
        let reply = udp4_packet([10, 99, 0, 2], 9, [10, 99, 0, 1], sport, b"reply");
        tuns[to].send(&reply).await.unwrap();
        let mut buf = [0u8; 64];
        socks[flow]
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let (n, _) = socks[flow].recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"reply");
        socks[flow].send_to(b"after-write", "10.99.0.2:9").unwrap();
        let seen = drain_queues(&tuns, 1).await;
        eprintln!("flow {flow}: queue {from} before writing on queue {to}, then {seen:?}");
        assert_eq!(seen, vec![("after-write".to_string(), to)]);
    });
}

#[test]
fn udp_group_shares_one_port_by_flow() {
    let Some(ns) = TestNs::new() else { return };
    ns.block_on(|| async {
        const SOCKETS: usize = 3;
        const FLOWS: usize = 16;
        const PER_FLOW: usize = 5;
        let group = udp::bind_udp_group(0, SOCKETS).unwrap();
        assert_eq!(group.len(), SOCKETS);
        let port = group[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        for s in &group {
            assert_eq!(
                s.local_addr().unwrap(),
                SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))
            );
            let sref = socket2::SockRef::from(s);
            assert!(sref.reuse_port().unwrap());
            assert!(!sref.only_v6().unwrap());
            assert!(sref.recv_buffer_size().unwrap() >= udp::UDP_BUFFER_BYTES);
            assert!(sref.send_buffer_size().unwrap() >= udp::UDP_BUFFER_BYTES);
        }
        let group: Vec<tokio::net::UdpSocket> = group
            .into_iter()
            .map(|s| udp::register_udp(s).unwrap())
            .collect();

        // Half the flows over IPv4, half over IPv6: the dual-stack group takes both.
        let clients: Vec<std::net::UdpSocket> = (0..FLOWS)
            .map(|i| {
                let bind = if i % 2 == 0 { "127.0.0.1:0" } else { "[::1]:0" };
                std::net::UdpSocket::bind(bind).unwrap()
            })
            .collect();
        for j in 0..PER_FLOW {
            for (i, c) in clients.iter().enumerate() {
                let to = if i % 2 == 0 { "127.0.0.1" } else { "::1" };
                c.send_to(format!("flow{i:02}-{j}").as_bytes(), (to, port))
                    .unwrap();
            }
        }
        let mut seen: Vec<(usize, usize, usize)> = Vec::new(); // (flow, seq, socket)
        let mut buf = [0u8; 64];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while seen.len() < FLOWS * PER_FLOW {
            assert!(tokio::time::Instant::now() < deadline, "{seen:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
            for (si, s) in group.iter().enumerate() {
                while let Ok((n, from)) = s.try_recv_from(&mut buf) {
                    let text = std::str::from_utf8(&buf[..n]).unwrap();
                    let (flow, seq) = text.strip_prefix("flow").unwrap().split_once('-').unwrap();
                    let flow: usize = flow.parse().unwrap();
                    assert_eq!(
                        weft_sys::canonical(from),
                        clients[flow].local_addr().unwrap()
                    );
                    seen.push((flow, seq.parse().unwrap(), si));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for s in &group {
            assert!(s.try_recv_from(&mut buf).is_err(), "a datagram twice");
        }
        let mut socket_of = std::collections::HashMap::new();
        for flow in 0..FLOWS {
            let of_flow: Vec<_> = seen.iter().filter(|(f, _, _)| *f == flow).collect();
            let seqs: Vec<usize> = of_flow.iter().map(|(_, s, _)| *s).collect();
            assert_eq!(seqs, (0..PER_FLOW).collect::<Vec<_>>(), "flow {flow}");
            let sock = of_flow[0].2;
            assert!(
                of_flow.iter().all(|(_, _, s)| *s == sock),
                "flow {flow} on several sockets: {of_flow:?}"
            );
            socket_of.insert(flow, sock);
        }
        eprintln!("UDP flow -> socket: {socket_of:?}");
        let mut used: Vec<usize> = socket_of.values().copied().collect();
        used.sort_unstable();
        used.dedup();
        assert!(used.len() > 1, "all flows on one socket: {socket_of:?}");

        // Replies go out of any member with the group's port.
        let to = weft_sys::to_socket_family(clients[0].local_addr().unwrap(), true);
        group[SOCKETS - 1].send_to(b"back", to).await.unwrap();
        clients[0]
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let (n, from) = clients[0].recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"back");
        assert_eq!(from.port(), port);

        // A second group (or a single socket) cannot join or take the port.
        assert!(udp::bind_udp_group(port, 2).is_err());
        assert!(udp::bind_udp_group(port, 1).is_err());

        // A port bound by a plain socket (dual-stack or IPv4 only) is an error, for one
        // socket and for a group alike.
        let plain6 = std::net::UdpSocket::bind("[::]:0").unwrap();
        let p6 = plain6.local_addr().unwrap().port();
        let plain4 = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let p4 = plain4.local_addr().unwrap().port();
        for p in [p6, p4] {
            assert!(udp::bind_udp_group(p, 1).is_err(), "port {p}");
            assert!(udp::bind_udp_group(p, 2).is_err(), "port {p}");
            assert!(weft_sys::bind_udp(p).is_err(), "port {p}");
        }

        // A fixed port works for a group; it is free again once the group is dropped.
        drop(group);
        let fixed = udp::bind_udp_group(port, 2).unwrap();
        assert!(fixed.iter().all(|s| s.local_addr().unwrap().port() == port));
        drop(fixed);
        drop(weft_sys::bind_udp(port).unwrap());
    });
}

/// The masquerade table written over netlink (no nft binary involved) reads back with `nft`
/// as the rule the old `nft -f` script wrote; writing it again replaces it (one rule, not two);
/// a malformed request changes nothing.
#[test]
fn nft_masquerade_over_netlink() {
    let Some(ns) = TestNs::new() else { return };
    let pods: Vec<IpNet> = vec![
        "10.42.1.0/24".parse().unwrap(),
        "fd00:42:1::/64".parse().unwrap(),
    ];
    let cluster: Vec<IpNet> = vec![
        "10.42.0.0/16".parse().unwrap(),
        "10.43.0.0/16".parse().unwrap(),
        "fd00:42::/48".parse().unwrap(),
    ];
    for _ in 0..2 {
        netns::run_in(&ns.name, || {
            weft_sys::nft::install_masquerade("weft-test", &pods, &cluster)
        })
        .unwrap()
        .unwrap();
    }
    let (ok, v4) = ns.exec(&["nft", "list", "table", "ip", "weft-test"]);
    assert!(ok, "{v4}");
    assert!(
        v4.contains("type nat hook postrouting priority srcnat; policy accept;"),
        "{v4}"
    );
    assert!(
        v4.contains(
            "ip saddr 10.42.1.0/24 ip daddr != 10.42.0.0/16 ip daddr != 10.43.0.0/16 masquerade"
        ),
        "{v4}"
    );
    assert_eq!(v4.matches("masquerade").count(), 1, "written twice:\n{v4}");
    let (ok, v6) = ns.exec(&["nft", "list", "table", "ip6", "weft-test"]);
    assert!(ok, "{v6}");
    assert!(
        v6.contains("ip6 saddr fd00:42:1::/64 ip6 daddr != fd00:42::/48 masquerade"),
        "{v6}"
    );
    // A bad name is refused before anything is sent, and the table stays as it was.
    assert!(
        netns::run_in(&ns.name, || weft_sys::nft::install_masquerade(
            "bad name", &pods, &cluster
        ))
        .unwrap()
        .is_err()
    );
    let (_, again) = ns.exec(&["nft", "list", "table", "ip", "weft-test"]);
    assert_eq!(again, v4);
}
