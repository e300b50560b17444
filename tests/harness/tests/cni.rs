//! End-to-end tests of the weft-cni plugin in a netns cluster: pods attached the way a container
//! runtime attaches them (cnitool/libcni, or the plugin run directly with CNI_* variables), with
//! meshd running in the node. Need root, the workspace binaries, the reference plugins
//! (containernetworking-plugins), cnitool and the failpoint build of weft-cni:
//!   sudo scripts/install-test-deps.sh
//!   cargo build --workspace --bins
//!   cargo build -p weft-cni --features failpoints --target-dir target/failpoints
//!   cargo test -p weft-tests --test cni -- --test-threads=1

use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;
use weft_tests::cni::link_mtu;
use weft_tests::{
    expected_host_veth, netns_path, ns_snapshot, tcp_transfer, weft_cni_failpoints_bin, Cluster,
    CniCall, CniOutput, CniPod, Marker, NetSnapshot, Node, PingOpts, TcpOpts, CNI_NET,
    CNI_VERSIONS, FAILPOINTS,
};

const READY: Duration = Duration::from_secs(20);

fn setup() {
    weft_tests::set_nettool(env!("CARGO_BIN_EXE_weft-nettool"));
}

/// `n` nodes with meshd running (node.json written), the CNI bin/conf dirs installed and a
/// conflist `weft` (cniVersion 1.1.0, just weft-cni) on every node; mesh ready.
fn cni_cluster(n: usize) -> Cluster {
    setup();
    let c = Cluster::with_nodes(n).expect("cluster");
    for node in &c.nodes {
        node.cni_install().expect("cni install");
        node.start_meshd(&[]).expect("start meshd");
        node.wait_node_json(Duration::from_secs(10))
            .expect("meshd wrote node.json");
        node.cni_write_conflist(CNI_NET, "1.1.0", None)
            .expect("conflist");
    }
    c.wait_mesh_ready(READY).expect("mesh ready");
    c
}

fn pod_cidr_base(n: &Node) -> Ipv4Addr {
    Ipv4Addr::new(10, 42, n.index as u8 + 1, 0)
}

/// The address lies inside the node's /24 and is not the network, mesh or broadcast address.
fn assert_pod_addr(n: &Node, ip: Ipv4Addr) {
    let o = ip.octets();
    let b = pod_cidr_base(n).octets();
    assert_eq!(
        &o[..3],
        &b[..3],
        "{ip} is outside {}'s pod CIDR {}",
        n.name,
        n.pod_cidr
    );
    assert_ne!(ip, n.mesh_ip, "pod got the mesh address");
    assert!(
        o[3] != 0 && o[3] != 255,
        "pod got the network/broadcast address {ip}"
    );
}

fn assert_ok(out: &CniOutput, what: &str) {
    assert!(out.success(), "{what} failed: {}", out.describe());
}

/// A failed call: non-zero exit, a JSON error on stdout with `code`, `msg` and `cniVersion`.
fn assert_error(out: &CniOutput, code: u64, what: &str) -> Result<(), String> {
    if out.success() {
        return Err(format!(
            "{what}: expected error {code}, got success: {}",
            out.describe()
        ));
    }
    let Some(j) = &out.json else {
        return Err(format!("{what}: no JSON on stdout: {}", out.describe()));
    };
    if j["code"].as_u64() != Some(code) {
        return Err(format!("{what}: expected code {code}: {}", out.describe()));
    }
    if j["msg"].as_str().unwrap_or("").is_empty() {
        return Err(format!("{what}: error without msg: {}", out.describe()));
    }
    if j["cniVersion"].as_str().is_none() {
        return Err(format!(
            "{what}: error without cniVersion: {}",
            out.describe()
        ));
    }
    Ok(())
}

fn assert_same(before: &NetSnapshot, after: &NetSnapshot, what: &str) {
    let d = before.diff(after);
    assert!(d.is_empty(), "{what}: state changed:\n{d}");
}

/// Nothing of the plugin left in the node: no wft* link, no route via one, no allocation.
fn assert_node_clean(n: &Node, net: &str, what: &str) {
    let links = n.wft_links().expect("links");
    let routes = n.wft_routes().expect("routes");
    let allocs = n.cni_allocations(net);
    assert!(
        links.is_empty() && routes.is_empty() && allocs.is_empty(),
        "{what}: leftovers on {}: links {links:?}, routes {routes:?}, allocations {allocs:?}",
        n.name
    );
}

/// Links in a pod namespace (only `lo` once detached).
fn pod_links(ns: &str) -> BTreeSet<String> {
    ns_snapshot(ns).expect("pod snapshot").links
}

fn with_key(mut v: Value, k: &str, val: Value) -> Value {
    v[k] = val;
    v
}

// ---------------------------------------------------------------------------------------------
// a. connectivity of plugin-attached pods

/// 3 nodes, one pod each attached with cnitool (conflist 1.1.0, weft-cni only): addresses in the
/// node's pod CIDR (never .0/.1/.255), interface MTU = mesh MTU on both veth ends, host veth
/// named after the container, the promised routes; every pod reaches every other pod (ping and
/// TCP with a marker, no SNAT) and the underlay bridge shows no marker and only UDP to/from 51820.
#[test]
fn a_cnitool_pods_reach_each_other_encrypted() {
    let c = cni_cluster(3);
    let pods: Vec<CniPod> = c
        .nodes
        .iter()
        .map(|n| n.cni_add_pod(0, CNI_NET).expect("cnitool add"))
        .collect();
    // Contract checks are collected so the connectivity part still runs when one is off.
    let mut contract: Vec<String> = Vec::new();
    let mut check = |ok: bool, msg: String| {
        if !ok {
            contract.push(msg);
        }
    };
    for p in &pods {
        let n = c.node(p.pod.node_index);
        let mtu = n.mesh_mtu().expect("mesh mtu");
        assert_pod_addr(n, p.ip());
        check(
            p.pod.mtu == mtu,
            format!("{}: pod eth0 MTU {} != mesh MTU {mtu}", n.name, p.pod.mtu),
        );
        let host_mtu = link_mtu(&n.ns, p.host_if()).expect("host mtu");
        check(
            host_mtu == mtu,
            format!(
                "{}: host veth {} MTU {host_mtu} != mesh MTU {mtu}",
                n.name,
                p.host_if()
            ),
        );
        let want_if = expected_host_veth(&p.container_id, "eth0").expect("hash");
        check(
            p.host_if() == want_if,
            format!("host veth {} != {want_if}", p.host_if()),
        );
        // Result: the container interface carries the sandbox path.
        let ifaces = p.result["interfaces"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        check(
            ifaces
                .iter()
                .any(|i| i["name"] == "eth0" && i["sandbox"] == p.netns_path.as_str()),
            format!(
                "result interfaces without eth0 in {}: {}",
                p.netns_path, p.result
            ),
        );
        check(
            p.result["cniVersion"] == "1.1.0",
            format!("result cniVersion: {}", p.result),
        );
        // Pod side: ADDR/32, link-scope gateway, default route.
        let addrs =
            weft_tests::util::run_in(p.ns(), "ip", &["-4", "-o", "addr", "show", "dev", "eth0"])
                .expect("pod addr");
        check(
            addrs.contains(&format!("{}/32", p.ip())),
            format!("pod addrs: {addrs}"),
        );
        let routes =
            weft_tests::util::run_in(p.ns(), "ip", &["-4", "route", "show"]).expect("routes");
        let has = |prefix: &str, extra: &str| {
            routes
                .lines()
                .any(|l| l.starts_with(prefix) && l.contains(extra))
        };
        check(
            has("default via 169.254.1.1 dev eth0", "")
                && has("169.254.1.1 dev eth0", "scope link"),
            format!("pod routes: {routes}"),
        );
        // Node side: /32 route to the host veth.
        let host_routes = n.wft_routes().expect("node routes");
        check(
            host_routes
                .iter()
                .any(|r| r.starts_with(&format!("{} dev {}", p.ip(), p.host_if()))),
            format!("node routes via wft*: {host_routes:?}"),
        );
        // Allocation file.
        let alloc = n.cni_alloc_dir(CNI_NET).join(p.ip().to_string());
        let content = std::fs::read_to_string(&alloc).unwrap_or_default();
        check(
            content == format!("{}\neth0\n", p.container_id),
            format!("allocation file {}: {content:?}", alloc.display()),
        );
    }

    let marker = Marker::random();
    let bridge = c.capture_underlay("").expect("bridge capture");
    for a in &pods {
        for b in &pods {
            if a.pod.node_index == b.pod.node_index {
                continue;
            }
            let r = a
                .pod
                .ping(b.ip(), &PingOpts::count(3).interval(0.05).pattern(&marker))
                .expect("ping");
            assert!(
                r.all_received(),
                "{} -> {}: {}\n{}",
                a.ip(),
                b.ip(),
                r.output,
                c.debug_report()
            );
            let t = tcp_transfer(
                a.ns(),
                b.ns(),
                &b.ip().to_string(),
                &TcpOpts::new(100_000, marker.hex()),
            )
            .unwrap_or_else(|e| {
                panic!("tcp {} -> {}: {e:#}\n{}", a.ip(), b.ip(), c.debug_report())
            });
            assert!(t.complete(), "{t:?}");
            assert!(
                t.peer.starts_with(&format!("{}:", a.ip())),
                "pod-to-pod traffic must not be masqueraded: {t:?}"
            );
        }
    }
    let b = bridge.stop().expect("stop capture");
    c.assert_underlay_encrypted(&b, &marker);
    assert!(
        b.wireguard_data_count() > 0,
        "no WireGuard data on the bridge at all"
    );

    for p in &pods {
        assert_ok(
            &c.node(p.pod.node_index).cni_del_pod(p).expect("del"),
            "cnitool del",
        );
    }
    for n in &c.nodes {
        assert_node_clean(n, CNI_NET, "after DEL of every pod");
    }
    assert!(
        contract.is_empty(),
        "connectivity fine, but the attachment differs from the contract:\n{}",
        contract.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// b. masquerade

/// A pod reaches a host outside the cluster CIDR (behind the router, no route back to pods); the
/// outside host sees the node's underlay address, not the pod's.
#[test]
fn b_masquerade_to_outside_host() {
    let c = cni_cluster(1);
    let out = c.add_outside_host().expect("outside host");
    let n = c.node(0);
    let p = n.cni_add_pod(0, CNI_NET).expect("cnitool add");
    let tables = n.exec("nft", &["list", "tables"]).expect("nft");
    assert!(tables.contains("ip weft-cni"), "nft tables: {tables}");
    let r = p
        .pod
        .ping(out.ip, &PingOpts::count(3).interval(0.05))
        .expect("ping");
    assert!(r.all_received(), "pod -> outside ping: {}", r.output);
    let t = tcp_transfer(
        p.ns(),
        &out.ns,
        &out.ip.to_string(),
        &TcpOpts::new(50_000, "masq").timeout(Duration::from_secs(10)),
    )
    .expect("tcp to outside");
    assert!(t.complete(), "{t:?}");
    assert!(
        t.peer.starts_with(&format!("{}:", n.underlay_ip)),
        "outside host must see the node's underlay address {}, saw {}",
        n.underlay_ip,
        t.peer
    );
    assert_ok(&n.cni_del_pod(&p).expect("del"), "cnitool del");
    assert_node_clean(n, CNI_NET, "after DEL");
}

/// Nothing on the node but the kernel: with no `nft` on any PATH, meshd `--masquerade` writes
/// its masquerade table over netlink at start (a pod reaches the outside host as the node's
/// address before any CNI ADD), and weft-cni, run by cnitool with the same empty PATH, writes
/// its own the same way.
#[test]
fn b_masquerade_without_an_nft_binary() {
    setup();
    let c = Cluster::with_nodes(1).expect("cluster");
    let n = c.node(0);
    n.cni_install().expect("cni install");
    // The harness starts meshd through `ip netns exec`, which must find `ip`; nothing else is
    // on this PATH (no nft).
    let bin = c.tmp.join("only-ip");
    std::fs::create_dir_all(&bin).expect("mkdir");
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("ip binary");
    std::os::unix::fs::symlink(ip, bin.join("ip")).expect("symlink ip");
    let no_tools = vec![("PATH".to_string(), bin.display().to_string())];
    n.start_meshd_env(&["--masquerade"], &no_tools)
        .expect("meshd without nft on PATH");
    n.wait_node_json(Duration::from_secs(10))
        .expect("node.json");
    let out = c.add_outside_host().expect("outside host");
    let tables = n
        .exec("nft", &["list", "tables"])
        .expect("nft (the test's own)");
    assert!(tables.contains("ip weft"), "meshd's table: {tables}");
    let pod = n.add_pod(0).expect("pod");
    let t = tcp_transfer(
        &pod.ns,
        &out.ns,
        &out.ip.to_string(),
        &TcpOpts::new(20_000, "masq-meshd").timeout(Duration::from_secs(10)),
    )
    .expect("tcp to outside");
    assert!(t.complete(), "{t:?}");
    assert!(
        t.peer.starts_with(&format!("{}:", n.underlay_ip)),
        "meshd --masquerade: the outside host saw {}",
        t.peer
    );

    n.cni_write_conflist(CNI_NET, "1.1.0", None)
        .expect("conflist");
    std::env::set_var("WEFT_TEST_CNITOOL_PATH", "/nonexistent");
    let added = n.cni_add_pod(1, CNI_NET);
    std::env::remove_var("WEFT_TEST_CNITOOL_PATH");
    let p = added.expect("cnitool add with no nft on PATH");
    let tables = n.exec("nft", &["list", "tables"]).expect("nft");
    assert!(tables.contains("ip weft-cni"), "weft-cni's table: {tables}");
    let t = tcp_transfer(
        p.ns(),
        &out.ns,
        &out.ip.to_string(),
        &TcpOpts::new(20_000, "masq-cni").timeout(Duration::from_secs(10)),
    )
    .expect("tcp to outside");
    assert!(t.complete(), "{t:?}");
    assert!(
        t.peer.starts_with(&format!("{}:", n.underlay_ip)),
        "{}",
        t.peer
    );
    assert_ok(&n.cni_del_pod(&p).expect("del"), "cnitool del");
}

// ---------------------------------------------------------------------------------------------
// c. DEL

/// DEL through cnitool and directly removes the host veth, the /32 route and the allocation;
/// DEL twice succeeds; DEL after the netns is gone (and with CNI_NETNS unset) succeeds and
/// releases the address; DEL of a never-added container succeeds.
#[test]
fn c_del_removes_everything_and_is_idempotent() {
    let c = cni_cluster(1);
    let n = c.node(0);
    let cfg = n.cni_config("1.1.0");
    let before = n.cni_snapshot(CNI_NET).expect("snapshot");

    let p0 = n.cni_add_pod(0, CNI_NET).expect("cnitool add");
    let p1 = n.cni_add_direct(1, &cfg).expect("direct add");
    assert_ne!(p0.ip(), p1.ip());
    assert_eq!(n.wft_links().expect("links").len(), 2);
    assert_eq!(
        n.wft_routes().expect("routes").len(),
        2,
        "{:?}",
        n.wft_routes()
    );
    assert_eq!(n.cni_allocations(CNI_NET).len(), 2);

    assert_ok(&n.cni_del_pod(&p0).expect("del"), "cnitool del");
    assert_ok(&n.cni_del_direct(&p1, &cfg).expect("del"), "direct del");
    let after = n.cni_snapshot(CNI_NET).expect("snapshot");
    assert_same(&before, &after, "ADD+DEL of two pods");
    for p in [&p0, &p1] {
        assert_eq!(
            pod_links(p.ns()),
            BTreeSet::from(["lo".to_string()]),
            "pod {} keeps an interface after DEL",
            p.ns()
        );
    }

    // DEL twice.
    assert_ok(&n.cni_del_pod(&p0).expect("del"), "second cnitool del");
    assert_ok(
        &n.cni_del_direct(&p1, &cfg).expect("del"),
        "second direct del",
    );
    assert_same(&before, &n.cni_snapshot(CNI_NET).expect("s"), "second DEL");

    // DEL after the netns was deleted.
    let p2 = n.cni_add_direct(2, &cfg).expect("add");
    n.cni_netns_del(p2.ns());
    let out = n.cni_del_direct(&p2, &cfg).expect("del");
    assert_ok(&out, "DEL with the netns gone");
    assert_same(
        &before,
        &n.cni_snapshot(CNI_NET).expect("s"),
        "DEL with netns gone",
    );

    // DEL with CNI_NETNS unset (the spec allows it for DEL).
    let p3 = n.cni_add_direct(3, &cfg).expect("add");
    let out = n
        .cni_exec(&CniCall::new("DEL", &p3.container_id, "", &cfg).no_netns())
        .expect("del");
    assert_ok(&out, "DEL without CNI_NETNS");
    assert!(
        n.cni_allocations(CNI_NET).is_empty(),
        "DEL without CNI_NETNS kept the allocation: {:?}",
        n.cni_allocations(CNI_NET)
    );
    // The veth is still in the (living) pod namespace: a second DEL with the netns cleans it.
    assert_ok(
        &n.cni_del_direct(&p3, &cfg).expect("del"),
        "DEL with netns after one without",
    );
    assert_same(
        &before,
        &n.cni_snapshot(CNI_NET).expect("s"),
        "DEL without CNI_NETNS",
    );

    // DEL of a container that was never added.
    let out = n
        .cni_exec(&CniCall::new(
            "DEL",
            "never-added-0123",
            &netns_path(&format!("{}-nosuchns", c.prefix)),
            &cfg,
        ))
        .expect("del");
    assert_ok(&out, "DEL of a never-added container");
    assert_same(
        &before,
        &n.cni_snapshot(CNI_NET).expect("s"),
        "DEL never-added",
    );
}

// ---------------------------------------------------------------------------------------------
// d. GC, STATUS, CHECK

/// GC with `cni.dev/valid-attachments` listing two of three attachments releases the third (its
/// allocation and host veth) and keeps the others; the same with the keys exactly as libcni
/// injects them (`cni.dev/valid-attachments` + `cni.dev/attachments`); `cnitool gc` (DEL of every
/// cached attachment, then GC) releases pods added by cnitool.
#[test]
fn d_gc_releases_attachments_not_listed() {
    let c = cni_cluster(1);
    let n = c.node(0);
    let cfg = n.cni_config("1.1.0");
    let pods: Vec<CniPod> = (0..4)
        .map(|k| n.cni_add_direct(k, &cfg).expect("add"))
        .collect();
    assert_eq!(n.cni_allocations(CNI_NET).len(), 4);

    let gc = with_key(
        cfg.clone(),
        "cni.dev/valid-attachments",
        json!([
            pods[0].attachment(),
            pods[1].attachment(),
            pods[2].attachment()
        ]),
    );
    let out = n.cni_exec(&CniCall::bare("GC", &gc)).expect("gc");
    assert_ok(&out, "GC");
    let allocs = n.cni_allocations(CNI_NET);
    let want: Vec<String> = {
        let mut v: Vec<String> = pods[..3].iter().map(|p| p.ip().to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(allocs, want, "allocations after GC keeping pods 0-2");
    let links = n.wft_links().expect("links");
    assert!(
        !links.contains(&pods[3].host_if().to_string()) && links.len() == 3,
        "links after GC: {links:?} (pod 3 had {})",
        pods[3].host_if()
    );
    assert_eq!(n.wft_routes().expect("routes").len(), 3);

    // As libcni sends it (cni.dev/attachments too, #1101), env CNI_* present but empty.
    let gc = with_key(
        with_key(
            cfg.clone(),
            "cni.dev/valid-attachments",
            json!([pods[0].attachment()]),
        ),
        "cni.dev/attachments",
        json!([pods[0].attachment()]),
    );
    let out = n
        .cni_exec(&CniCall::new("GC", "", "", &gc).ifname("").cni_args(""))
        .expect("gc");
    assert_ok(&out, "GC as libcni sends it");
    assert_eq!(
        n.cni_allocations(CNI_NET),
        vec![pods[0].ip().to_string()],
        "allocations after GC keeping pod 0"
    );
    assert_eq!(
        n.wft_links().expect("links"),
        vec![pods[0].host_if().to_string()]
    );

    // GC with an empty list releases everything; `null` is what a Go runtime sends for an
    // empty (nil) list, e.g. containerd on a node without pods.
    let gc = with_key(cfg.clone(), "cni.dev/valid-attachments", json!([]));
    assert_ok(&n.cni_exec(&CniCall::bare("GC", &gc)).expect("gc"), "GC []");
    assert_node_clean(n, CNI_NET, "GC with no valid attachment");
    let extra = n.cni_add_direct(4, &cfg).expect("add");
    let gc = with_key(cfg.clone(), "cni.dev/valid-attachments", Value::Null);
    assert_ok(
        &n.cni_exec(&CniCall::bare("GC", &gc)).expect("gc"),
        "GC with valid-attachments null",
    );
    assert_node_clean(n, CNI_NET, "GC with valid-attachments null");
    assert_ok(
        &n.cni_del_direct(&extra, &cfg).expect("del"),
        "DEL after GC",
    );
    // Every DEL after GC still succeeds.
    for p in &pods {
        assert_ok(&n.cni_del_direct(p, &cfg).expect("del"), "DEL after GC");
    }

    // cnitool gc: DELs every cached attachment of the network, then GC.
    let a = n.cni_add_pod(10, CNI_NET).expect("cnitool add");
    let b = n.cni_add_pod(11, CNI_NET).expect("cnitool add");
    assert_eq!(n.cni_allocations(CNI_NET).len(), 2);
    // cnitool passes no `cni.dev/valid-attachments` at all; weft-cni refuses a GC without the
    // list (it cannot tell "nothing is valid" from "runtime forgot"), so only the DEL phase counts.
    let out = n.cnitool("gc", CNI_NET, a.ns(), None).expect("cnitool gc");
    eprintln!("cnitool gc: {}", out.describe());
    assert!(
        out.success() || out.stderr.contains("valid-attachments"),
        "cnitool gc: {}",
        out.describe()
    );
    assert_node_clean(n, CNI_NET, "cnitool gc");
    for p in [&a, &b] {
        assert_eq!(pod_links(p.ns()), BTreeSet::from(["lo".to_string()]));
    }
}

/// STATUS: 0 while meshd runs (direct and cnitool), code 50 once meshd is stopped.
#[test]
fn e_status_follows_meshd() {
    let c = cni_cluster(1);
    let n = c.node(0);
    let cfg = n.cni_config("1.1.0");
    let out = n.cni_exec(&CniCall::bare("STATUS", &cfg)).expect("status");
    assert_ok(&out, "STATUS with meshd running");
    let ns = n.cni_netns(0).expect("netns");
    assert_ok(
        &n.cnitool("status", CNI_NET, &ns, None).expect("cnitool"),
        "cnitool status",
    );

    n.stop_meshd(libc::SIGTERM).expect("stop meshd");
    let out = n.cni_exec(&CniCall::bare("STATUS", &cfg)).expect("status");
    assert_error(&out, 50, "STATUS with meshd stopped").unwrap_or_else(|e| panic!("{e}"));
    let out = n.cnitool("status", CNI_NET, &ns, None).expect("cnitool");
    assert!(
        !out.success(),
        "cnitool status with meshd stopped: {}",
        out.describe()
    );

    n.start_meshd(&[]).expect("restart");
    assert_ok(
        &n.cni_exec(&CniCall::bare("STATUS", &cfg)).expect("status"),
        "STATUS after meshd restart",
    );
}

/// CHECK passes after ADD (cnitool: cached prevResult; direct: prevResult = the ADD result) and
/// fails once the pod's address is removed by hand.
#[test]
fn f_check_detects_a_removed_address() {
    let c = cni_cluster(1);
    let n = c.node(0);
    let p = n.cni_add_pod(0, CNI_NET).expect("cnitool add");
    assert_ok(
        &n.cnitool("check", CNI_NET, p.ns(), None).expect("check"),
        "cnitool check",
    );
    let cfg = with_key(n.cni_config("1.1.0"), "prevResult", p.result.clone());
    let call = CniCall::new("CHECK", &p.container_id, &p.netns_path, &cfg);
    assert_ok(&n.cni_exec(&call).expect("check"), "direct CHECK");

    weft_tests::util::run_in(
        p.ns(),
        "ip",
        &["addr", "del", &format!("{}/32", p.ip()), "dev", "eth0"],
    )
    .expect("remove address");
    let out = n.cni_exec(&call).expect("check");
    assert!(
        !out.success() && out.code().is_some(),
        "CHECK after removing the address must fail with a JSON error: {}",
        out.describe()
    );
    let out = n.cnitool("check", CNI_NET, p.ns(), None).expect("check");
    assert!(
        !out.success(),
        "cnitool check after removing the address: {}",
        out.describe()
    );
    assert_ok(&n.cni_del_pod(&p).expect("del"), "DEL");
    assert_node_clean(n, CNI_NET, "after DEL");
}

// ---------------------------------------------------------------------------------------------
// g. meshd restart

/// ADD, restart meshd: the allocation stays (a new ADD gets another address), the pod still
/// reaches the node's mesh address; with meshd stopped DEL works and releases the address.
#[test]
fn g_allocations_survive_meshd_restart() {
    let c = cni_cluster(1);
    let n = c.node(0);
    let cfg = n.cni_config("1.1.0");
    let a = n.cni_add_direct(0, &cfg).expect("add");
    n.restart_meshd().expect("restart meshd");
    n.wait_node_json(Duration::from_secs(10))
        .expect("node.json");
    assert_eq!(
        n.cni_allocations(CNI_NET),
        vec![a.ip().to_string()],
        "allocation after restart"
    );
    let b = n.cni_add_direct(1, &cfg).expect("add after restart");
    assert_ne!(a.ip(), b.ip(), "second pod got the first pod's address");
    let r = a
        .pod
        .ping(n.mesh_ip, &PingOpts::count(2).interval(0.1))
        .expect("ping");
    assert!(
        r.all_received(),
        "pod -> mesh address after restart: {}",
        r.output
    );

    n.stop_meshd(libc::SIGTERM).expect("stop meshd");
    assert_ok(
        &n.cni_del_direct(&a, &cfg).expect("del"),
        "DEL with meshd down",
    );
    assert_eq!(n.cni_allocations(CNI_NET), vec![b.ip().to_string()]);
    assert_ok(
        &n.cni_del_direct(&b, &cfg).expect("del"),
        "DEL with meshd down",
    );
    assert_node_clean(n, CNI_NET, "DEL with meshd down");
}

// ---------------------------------------------------------------------------------------------
// h. bad input

/// Every kind of bad input gets the exact spec error code, a non-zero exit status and a JSON
/// error on stdout; none of them leaves a veth, route, address or allocation behind.
#[test]
fn h_bad_input_gets_exact_codes_and_leaks_nothing() {
    let c = cni_cluster(1);
    let n = c.node(0);
    let cfg = n.cni_config("1.1.0");
    let ns = n.cni_netns(0).expect("netns");
    let nsp = netns_path(&ns);
    let cid = "bad-input-0123";
    let add = |config: &Value| CniCall::new("ADD", cid, &nsp, config);
    let node_before = n.cni_snapshot(CNI_NET).expect("snapshot");
    let pod_before = ns_snapshot(&ns).expect("snapshot");

    let mut cases: Vec<(String, u64, CniCall, Option<Vec<String>>)> = Vec::new();
    for v in ["0.2.0", "0.1.0", "2.0.0", "1.1.1", "banana"] {
        cases.push((
            format!("cniVersion {v}"),
            1,
            add(&with_key(cfg.clone(), "cniVersion", json!(v))),
            None,
        ));
    }
    cases.push((
        "unknown key".into(),
        2,
        add(&with_key(cfg.clone(), "bogusKnob", json!(true))),
        Some(vec!["bogusKnob".into()]),
    ));
    // CHECK of a container the plugin never saw (prevResult of a plausible pod).
    let prev = json!({
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "eth0", "sandbox": nsp}],
        "ips": [{"address": "10.42.1.77/32", "interface": 0, "gateway": "169.254.1.1"}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    });
    cases.push((
        "CHECK unknown container".into(),
        3,
        CniCall::new(
            "CHECK",
            "never-added-0123",
            &nsp,
            &with_key(cfg.clone(), "prevResult", prev),
        ),
        None,
    ));
    // Missing variables: every one named.
    cases.push((
        "ADD without CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME".into(),
        4,
        add(&cfg).no_container_id().no_netns().no_ifname(),
        Some(vec![
            "CNI_CONTAINERID".into(),
            "CNI_NETNS".into(),
            "CNI_IFNAME".into(),
        ]),
    ));
    cases.push((
        "ADD without CNI_NETNS".into(),
        4,
        add(&cfg).no_netns(),
        Some(vec!["CNI_NETNS".into()]),
    ));
    cases.push((
        "no CNI_COMMAND".into(),
        4,
        add(&cfg).no_command(),
        Some(vec!["CNI_COMMAND".into()]),
    ));
    let mut unknown_cmd = add(&cfg);
    unknown_cmd.command = Some("FROB".into());
    cases.push((
        "CNI_COMMAND=FROB".into(),
        4,
        unknown_cmd,
        Some(vec!["CNI_COMMAND".into()]),
    ));
    for ifname in [
        "abcdefghijklmnop",
        "eth/0",
        "eth:0",
        "eth 0",
        "eth\t0",
        ".",
        "..",
        "",
    ] {
        cases.push((
            format!("CNI_IFNAME {ifname:?}"),
            4,
            add(&cfg).ifname(ifname),
            Some(vec!["CNI_IFNAME".into()]),
        ));
    }
    cases.push((
        "CNI_CONTAINERID with a slash".into(),
        4,
        CniCall::new("ADD", "bad/../id", &nsp, &cfg),
        Some(vec!["CNI_CONTAINERID".into()]),
    ));
    cases.push((
        "invalid JSON".into(),
        6,
        add(&cfg).stdin_raw(b"{\"cniVersion\": \"1.1.0\", \"name\": "),
        None,
    ));
    cases.push(("empty stdin".into(), 6, add(&cfg).stdin_raw(b""), None));
    cases.push((
        "stateDir relative".into(),
        7,
        add(&with_key(cfg.clone(), "stateDir", json!("var/lib/weft"))),
        Some(vec!["stateDir".into()]),
    ));
    cases.push((
        "ipMasq not a bool".into(),
        7,
        add(&with_key(cfg.clone(), "ipMasq", json!("yes"))),
        Some(vec!["ipMasq".into()]),
    ));
    cases.push((
        "meshdSocket not a string".into(),
        7,
        add(&with_key(cfg.clone(), "meshdSocket", json!(42))),
        Some(vec!["meshdSocket".into()]),
    ));
    let empty_state = n.dir.join("empty-state");
    std::fs::create_dir_all(&empty_state).expect("dir");
    cases.push((
        "ADD without node.json".into(),
        11,
        add(&with_key(
            cfg.clone(),
            "stateDir",
            json!(empty_state.display().to_string()),
        )),
        None,
    ));

    let mut failures = Vec::new();
    for (what, code, call, names) in &cases {
        let out = n.cni_exec(call).expect("run plugin");
        if let Err(e) = assert_error(&out, *code, what) {
            failures.push(e);
            continue;
        }
        for name in names.iter().flatten() {
            if !out.error_text().contains(name.as_str()) {
                failures.push(format!(
                    "{what}: error does not name {name}: {}",
                    out.describe()
                ));
            }
        }
        eprintln!("ok: {what}: {}", out.stdout.trim());
    }
    assert_same(
        &node_before,
        &n.cni_snapshot(CNI_NET).expect("s"),
        "bad input (node)",
    );
    assert_same(
        &pod_before,
        &ns_snapshot(&ns).expect("s"),
        "bad input (pod)",
    );
    let empty_alloc: Vec<_> = std::fs::read_dir(&empty_state)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    let alloc_dir = empty_state.join("cni/networks").join(CNI_NET);
    let leaked: Vec<String> = std::fs::read_dir(&alloc_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|f| f != "lock")
                .collect()
        })
        .unwrap_or_default();
    assert!(
        leaked.is_empty(),
        "allocations without node.json: {leaked:?} ({empty_alloc:?})"
    );
    assert!(
        failures.is_empty(),
        "{} of {} bad-input cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

// ---------------------------------------------------------------------------------------------
// i. failpoints and natural faults

/// With the failpoint build, ADD failing at each step leaves links (node and pod namespace),
/// addresses, routes and allocations exactly as before. Natural faults too: a netns path that
/// does not exist, and an interface name that already exists in the pod (which must not damage
/// the pod that owns it).
#[test]
fn i_failed_add_leaves_nothing_behind() {
    let c = cni_cluster(1);
    let n = c.node(0);
    let fp_bin = weft_cni_failpoints_bin().expect("failpoint build");
    let cfg = n.cni_config("1.1.0");
    // Warm-up (nftables table, sysctls): ADD+DEL once with the failpoint build, no failpoint set.
    let warm = n.cni_netns(100).expect("netns");
    let call = CniCall::new("ADD", "warm-up-0", &netns_path(&warm), &cfg).plugin(&fp_bin);
    assert_ok(
        &n.cni_exec(&call).expect("add"),
        "failpoint build ADD without failpoint",
    );
    let mut del = call.clone();
    del.command = Some("DEL".into());
    assert_ok(&n.cni_exec(&del).expect("del"), "failpoint build DEL");

    let mut failures = Vec::new();
    for (k, fp) in FAILPOINTS.iter().enumerate() {
        let ns = n.cni_netns(k).expect("netns");
        let node_before = n.cni_snapshot(CNI_NET).expect("snapshot");
        let pod_before = ns_snapshot(&ns).expect("snapshot");
        let out = n
            .cni_exec(
                &CniCall::new("ADD", &format!("fp-{fp}"), &netns_path(&ns), &cfg)
                    .plugin(&fp_bin)
                    .failpoint(fp),
            )
            .expect("add");
        if out.success() || out.code().is_none() {
            failures.push(format!(
                "failpoint {fp}: ADD must fail with a JSON error: {}",
                out.describe()
            ));
        }
        let d1 = node_before.diff(&n.cni_snapshot(CNI_NET).expect("s"));
        let d2 = pod_before.diff(&ns_snapshot(&ns).expect("s"));
        if !d1.is_empty() || !d2.is_empty() {
            failures.push(format!(
                "failpoint {fp}: leftovers\nnode:\n{d1}pod:\n{d2}(plugin said: {})",
                out.stdout.trim()
            ));
        } else {
            eprintln!("ok: failpoint {fp}: {}", out.stdout.trim());
        }
        // And the same container can be added afterwards (no stale state blocks it).
        let retry = n
            .cni_exec(
                &CniCall::new("ADD", &format!("fp-{fp}"), &netns_path(&ns), &cfg).plugin(&fp_bin),
            )
            .expect("add");
        if !retry.success() {
            failures.push(format!(
                "failpoint {fp}: ADD after the failure: {}",
                retry.describe()
            ));
        }
        let _ = n.cni_exec(
            &CniCall::new("DEL", &format!("fp-{fp}"), &netns_path(&ns), &cfg).plugin(&fp_bin),
        );
    }

    // Natural fault: netns path does not exist.
    let before = n.cni_snapshot(CNI_NET).expect("snapshot");
    let out = n
        .cni_exec(&CniCall::new(
            "ADD",
            "no-netns-0",
            &netns_path(&format!("{}-nosuchns", c.prefix)),
            &cfg,
        ))
        .expect("add");
    if out.success() || out.code().is_none() {
        failures.push(format!("ADD into a missing netns: {}", out.describe()));
    }
    let d = before.diff(&n.cni_snapshot(CNI_NET).expect("s"));
    if !d.is_empty() {
        failures.push(format!("ADD into a missing netns leaked:\n{d}"));
    }

    // Natural fault: the interface name is taken in the pod (another container's ADD).
    let owner = n.cni_add_direct(50, &cfg).expect("add owner");
    let before = n.cni_snapshot(CNI_NET).expect("snapshot");
    let pod_before = ns_snapshot(owner.ns()).expect("snapshot");
    let out = n
        .cni_exec(&CniCall::new("ADD", "intruder-0", &owner.netns_path, &cfg))
        .expect("add");
    if out.success() || out.code().is_none() {
        failures.push(format!(
            "ADD with an existing CNI_IFNAME must fail: {}",
            out.describe()
        ));
    }
    let d1 = before.diff(&n.cni_snapshot(CNI_NET).expect("s"));
    let d2 = pod_before.diff(&ns_snapshot(owner.ns()).expect("s"));
    if !d1.is_empty() || !d2.is_empty() {
        failures.push(format!(
            "ADD with an existing CNI_IFNAME changed state (the owner pod must stay intact):\nnode:\n{d1}pod:\n{d2}"
        ));
    }
    // A runtime retrying ADD for the same container and ifname: either an error that leaves the
    // first attachment intact, or success; never two allocations or a pod without its address.
    let out = n
        .cni_exec(&CniCall::new(
            "ADD",
            &owner.container_id,
            &owner.netns_path,
            &cfg,
        ))
        .expect("add");
    let allocs = n.cni_allocations(CNI_NET);
    let pod_addrs = ns_snapshot(owner.ns()).expect("s").addrs;
    let has_addr = allocs
        .iter()
        .any(|a| pod_addrs.iter().any(|x| x.contains(&format!(" {a}/32"))));
    if allocs.len() != 1 || !has_addr || n.wft_links().expect("links").len() != 1 {
        failures.push(format!(
            "repeated ADD of the same attachment: allocations {allocs:?}, pod addrs {pod_addrs:?}, \
             wft links {:?}; plugin said: {}",
            n.wft_links().unwrap_or_default(),
            out.describe()
        ));
    } else {
        eprintln!("ok: repeated ADD: {}", out.stdout.trim());
    }
    assert_ok(&n.cni_del_direct(&owner, &cfg).expect("del"), "DEL owner");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert_node_clean(n, CNI_NET, "end");
}

// ---------------------------------------------------------------------------------------------
// j. concurrency

/// 50 parallel ADDs (50 containers, 50 netns) on one node get 50 distinct addresses; 50
/// parallel DELs free them all.
#[test]
fn j_fifty_parallel_adds_and_dels() {
    const N: usize = 50;
    let c = cni_cluster(1);
    let n = c.node(0);
    let cfg = n.cni_config("1.1.0");
    let nss: Vec<String> = (0..N).map(|k| n.cni_netns(k).expect("netns")).collect();
    let outs: Vec<CniOutput> = std::thread::scope(|s| {
        let hs: Vec<_> = nss
            .iter()
            .enumerate()
            .map(|(k, ns)| {
                let cfg = &cfg;
                s.spawn(move || {
                    n.cni_exec(&CniCall::new(
                        "ADD",
                        &format!("par-{k}"),
                        &netns_path(ns),
                        cfg,
                    ))
                    .expect("run")
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("join")).collect()
    });
    let bad: Vec<String> = outs
        .iter()
        .filter(|o| !o.success())
        .map(CniOutput::describe)
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {N} parallel ADDs failed:\n{}",
        bad.len(),
        bad.join("\n")
    );
    let ips: BTreeSet<Ipv4Addr> = outs
        .iter()
        .map(|o| weft_tests::result_ipv4(o.json.as_ref().expect("json")).expect("ip"))
        .collect();
    assert_eq!(ips.len(), N, "distinct addresses: {ips:?}");
    for ip in &ips {
        assert_pod_addr(n, *ip);
    }
    assert_eq!(n.cni_allocations(CNI_NET).len(), N);
    assert_eq!(n.wft_links().expect("links").len(), N);
    let times: Vec<f64> = outs.iter().map(|o| o.elapsed.as_secs_f64() * 1e3).collect();
    eprintln!(
        "parallel ADD: p50 {:.1} ms, max {:.1} ms",
        weft_tests::util::percentile(&times, 50.0).unwrap_or(0.0),
        weft_tests::util::percentile(&times, 100.0).unwrap_or(0.0)
    );

    let dels: Vec<CniOutput> = std::thread::scope(|s| {
        let hs: Vec<_> = nss
            .iter()
            .enumerate()
            .map(|(k, ns)| {
                let cfg = &cfg;
                s.spawn(move || {
                    n.cni_exec(&CniCall::new(
                        "DEL",
                        &format!("par-{k}"),
                        &netns_path(ns),
                        cfg,
                    ))
                    .expect("run")
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("join")).collect()
    });
    let bad: Vec<String> = dels
        .iter()
        .filter(|o| !o.success())
        .map(CniOutput::describe)
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {N} parallel DELs failed:\n{}",
        bad.len(),
        bad.join("\n")
    );
    assert_node_clean(n, CNI_NET, "after 50 parallel DELs");
}

// ---------------------------------------------------------------------------------------------
// k. chaining

/// Conflist 1.0.0: weft-cni, then portmap (portMappings via CAP_ARGS) and bandwidth. ADD and DEL
/// through cnitool succeed; the bandwidth qdisc sits on weft-cni's host veth; the port mapping
/// forwards a TCP connection to the node's underlay address into the pod.
#[test]
fn k_chained_with_portmap_and_bandwidth() {
    let c = cni_cluster(1);
    let n = c.node(0);
    let net = "weftchain";
    n.cni_write_conflist(
        net,
        "1.0.0",
        Some(vec![
            n.cni_plugin_entry(),
            json!({"type": "portmap", "capabilities": {"portMappings": true}}),
            json!({"type": "bandwidth", "capabilities": {"bandwidth": true}}),
        ]),
    )
    .expect("conflist");
    let cap = json!({
        "portMappings": [{"hostPort": 8080, "containerPort": 8080, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 100_000_000u64, "ingressBurst": 2_000_000u64,
                      "egressRate": 100_000_000u64, "egressBurst": 2_000_000u64}
    });
    let p = n.cni_add_pod_cap(0, net, Some(&cap)).expect("chained add");
    assert_eq!(p.result["cniVersion"], "1.0.0", "{}", p.result);
    let qd = n
        .exec("tc", &["qdisc", "show", "dev", p.host_if()])
        .expect("tc");
    assert!(qd.contains("tbf"), "no tbf qdisc on {}: {qd}", p.host_if());
    // Port mapping: a client on the router connects to NODE:8080 and lands in the pod.
    let sw = c.switch_ns.clone().expect("switch");
    let t = tcp_transfer(
        &sw,
        p.ns(),
        &n.underlay_ip.to_string(),
        &TcpOpts::new(20_000, "portmap")
            .port(8080)
            .timeout(Duration::from_secs(10)),
    );
    match t {
        Ok(t) => assert!(t.complete(), "portmap transfer {t:?}"),
        Err(e) => panic!(
            "portmap DNAT to the pod did not work: {e:#}\n{}",
            n.exec("iptables-save", &["-t", "nat"]).unwrap_or_default()
        ),
    }
    let out = n.cni_del_pod_cap(&p, Some(&cap)).expect("del");
    assert_ok(&out, "chained DEL");
    let nat = n.exec("iptables-save", &["-t", "nat"]).unwrap_or_default();
    assert!(!nat.contains("dport 8080"), "portmap rule left: {nat}");
    assert_node_clean(n, net, "chained DEL");
    let links = n.exec("ip", &["-o", "link"]).expect("links");
    assert!(!links.contains("bwp"), "bandwidth ifb left: {links}");
}

// ---------------------------------------------------------------------------------------------
// l. versions

/// ADD/DEL for every supported cniVersion through the direct path: the result echoes the version
/// and has that version's shape (`ips[].version` before 1.0.0, none from 1.0.0 on); CHECK works
/// from 0.4.0 on; VERSION lists them all.
#[test]
fn l_every_cni_version() {
    let c = cni_cluster(1);
    let n = c.node(0);
    let v = n
        .cni_exec(&CniCall::bare("VERSION", &json!({"cniVersion": "1.1.0"})))
        .expect("version");
    let vj = v.result().expect("VERSION");
    for ver in CNI_VERSIONS {
        assert!(
            vj["supportedVersions"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == ver)),
            "VERSION: {vj}"
        );
    }
    let mut failures = Vec::new();
    for (k, ver) in CNI_VERSIONS.iter().enumerate() {
        let cfg = n.cni_config(ver);
        let p = match n.cni_add_direct(k, &cfg) {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{ver}: ADD: {e:#}"));
                continue;
            }
        };
        let r = &p.result;
        if r["cniVersion"] != *ver {
            failures.push(format!("{ver}: result cniVersion: {r}"));
        }
        let ips = r["ips"].as_array().cloned().unwrap_or_default();
        if ips.is_empty() {
            failures.push(format!("{ver}: no ips: {r}"));
        }
        let pre1 = ver.starts_with("0.");
        for ip in &ips {
            if pre1 && ip["version"] != "4" && ip["version"] != "6" {
                failures.push(format!("{ver}: ips[].version missing: {r}"));
            }
            if !pre1 && ip.get("version").is_some() {
                failures.push(format!("{ver}: ips[].version must be absent: {r}"));
            }
            if ip["interface"].as_u64().is_none() {
                failures.push(format!("{ver}: ips[].interface missing: {r}"));
            }
        }
        if r["interfaces"].as_array().map_or(0, Vec::len) < 2 {
            failures.push(format!("{ver}: interfaces: {r}"));
        }
        if *ver != "0.3.0" && *ver != "0.3.1" {
            let chk = with_key(cfg.clone(), "prevResult", r.clone());
            let out = n
                .cni_exec(&CniCall::new("CHECK", &p.container_id, &p.netns_path, &chk))
                .expect("check");
            if !out.success() {
                failures.push(format!("{ver}: CHECK: {}", out.describe()));
            }
        }
        let out = n.cni_del_direct(&p, &cfg).expect("del");
        if !out.success() {
            failures.push(format!("{ver}: DEL: {}", out.describe()));
        }
        eprintln!("{ver}: {r}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_node_clean(n, CNI_NET, "after all versions");
}

// ---------------------------------------------------------------------------------------------
// m. install

/// `meshd install-cni` puts an executable weft-cni (the one next to meshd) into the bin dir and a
/// valid 10-weft.conflist into the conf dir; running it twice is fine.
#[test]
fn m_meshd_install_cni() {
    setup();
    let c = Cluster::with_nodes(1).expect("cluster");
    let n = c.node(0);
    let bin = n.dir.join("inst/bin");
    let conf = n.dir.join("inst/net.d");
    for round in 0..2 {
        let (ok, out, err) = n
            .meshd_cli(&[
                "install-cni",
                "--cni-bin-dir",
                &bin.display().to_string(),
                "--cni-conf-dir",
                &conf.display().to_string(),
            ])
            .expect("meshd install-cni");
        assert!(ok, "install-cni round {round} failed: {out}\n{err}");
    }
    use std::os::unix::fs::PermissionsExt;
    let plugin = bin.join("weft-cni");
    let meta = std::fs::metadata(&plugin).expect("installed weft-cni");
    assert!(
        meta.permissions().mode() & 0o111 != 0,
        "weft-cni not executable"
    );
    let src = weft_tests::weft_cni_bin().expect("weft-cni");
    assert_eq!(
        std::fs::read(&plugin).expect("read"),
        std::fs::read(&src).expect("read"),
        "installed weft-cni differs from {}",
        src.display()
    );
    let listing: Vec<String> = std::fs::read_dir(&conf)
        .expect("conf dir")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    assert_eq!(
        listing,
        vec!["10-weft.conflist".to_string()],
        "conf dir: {listing:?}"
    );
    let cl: Value =
        serde_json::from_slice(&std::fs::read(conf.join("10-weft.conflist")).expect("conflist"))
            .expect("conflist is JSON");
    assert!(
        CNI_VERSIONS.contains(&cl["cniVersion"].as_str().unwrap_or("")),
        "{cl}"
    );
    assert!(cl["name"].as_str().is_some_and(|s| !s.is_empty()), "{cl}");
    let plugins = cl["plugins"].as_array().expect("plugins");
    assert_eq!(plugins[0]["type"], "weft-cni", "{cl}");
    // The installed plugin answers VERSION.
    let out = n
        .cni_exec(&CniCall::bare("VERSION", &json!({"cniVersion": "1.1.0"})).plugin(&plugin))
        .expect("version");
    assert_ok(&out, "installed weft-cni VERSION");
    // Its config is one the plugin accepts (no unknown key, valid values). The state dir and
    // socket are pointed into the test's own dir (never the machine's /var/lib/weft).
    let mut entry = plugins[0].clone();
    entry["cniVersion"] = cl["cniVersion"].clone();
    entry["name"] = cl["name"].clone();
    let empty_state = n.dir.join("inst/state");
    std::fs::create_dir_all(&empty_state).expect("dir");
    if entry.get("stateDir").is_some() {
        entry["stateDir"] = json!(empty_state.display().to_string());
    } else {
        panic!("installed conflist has no stateDir (the plugin would use the machine's /var/lib/weft): {cl}");
    }
    if entry.get("meshdSocket").is_some() {
        entry["meshdSocket"] = json!(n.dir.join("inst/none.sock").display().to_string());
    }
    let ns = n.cni_netns(0).expect("netns");
    let out = n
        .cni_exec(&CniCall::new("ADD", "install-0", &netns_path(&ns), &entry).plugin(&plugin))
        .expect("add");
    // No node.json in that state dir: 11 is the expected outcome; a config error is a bug.
    assert_eq!(
        out.code(),
        Some(11),
        "installed conflist: {}",
        out.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// n. exhaustion

/// A /29 pod range has 5 usable pod addresses (.2-.6: not the network, mesh or broadcast
/// address): the 6th ADD fails with code 11 and leaks nothing; after one DEL an ADD works again.
#[test]
fn n_exhausted_range_gets_code_11() {
    setup();
    let c = Cluster::with_nodes(1).expect("cluster");
    let n = c.node(0);
    n.cni_install().expect("cni install");
    n.start_meshd(&["--pod-cidr", "10.42.1.0/29"])
        .expect("meshd");
    let nj = n
        .wait_node_json(Duration::from_secs(10))
        .expect("node.json");
    assert_eq!(nj["podCidrs"], json!(["10.42.1.0/29"]), "{nj}");
    let cfg = n.cni_config("1.1.0");
    let pods: Vec<CniPod> = (0..5)
        .map(|k| n.cni_add_direct(k, &cfg).expect("add"))
        .collect();
    let ips: BTreeSet<Ipv4Addr> = pods.iter().map(CniPod::ip).collect();
    let want: BTreeSet<Ipv4Addr> = (2..=6).map(|h| Ipv4Addr::new(10, 42, 1, h)).collect();
    assert_eq!(ips, want, "addresses of a /29");
    let ns = n.cni_netns(5).expect("netns");
    let before = n.cni_snapshot(CNI_NET).expect("snapshot");
    let pod_before = ns_snapshot(&ns).expect("snapshot");
    let out = n
        .cni_exec(&CniCall::new("ADD", "sixth-0", &netns_path(&ns), &cfg))
        .expect("add");
    assert_error(&out, 11, "ADD with the range exhausted").unwrap_or_else(|e| panic!("{e}"));
    assert_same(
        &before,
        &n.cni_snapshot(CNI_NET).expect("s"),
        "exhausted ADD (node)",
    );
    assert_same(
        &pod_before,
        &ns_snapshot(&ns).expect("s"),
        "exhausted ADD (pod)",
    );
    assert_ok(&n.cni_del_direct(&pods[2], &cfg).expect("del"), "DEL");
    let out = n
        .cni_exec(&CniCall::new("ADD", "sixth-0", &netns_path(&ns), &cfg))
        .expect("add");
    let r = out.result().expect("ADD after a DEL");
    assert_eq!(weft_tests::result_ipv4(&r), Some(pods[2].ip()), "{r}");
}

// ---------------------------------------------------------------------------------------------
// o. two interfaces of one container

/// One container with two attachments (eth0, net1): DEL and GC act on the (container, ifname)
/// pair, never on the other interface of the same container.
#[test]
fn o_two_interfaces_of_one_container() {
    let c = cni_cluster(1);
    let n = c.node(0);
    let cfg = n.cni_config("1.1.0");
    let ns = n.cni_netns(0).expect("netns");
    let nsp = netns_path(&ns);
    let cid = "multi-if-0";
    let mut ips = Vec::new();
    for ifname in ["eth0", "net1"] {
        let out = n
            .cni_exec(&CniCall::new("ADD", cid, &nsp, &cfg).ifname(ifname))
            .expect("add");
        let r = out.result().expect("ADD");
        ips.push(weft_tests::result_ipv4(&r).expect("ip"));
    }
    assert_ne!(ips[0], ips[1]);
    assert_eq!(n.wft_links().expect("links").len(), 2);
    let out = n
        .cni_exec(&CniCall::new("DEL", cid, &nsp, &cfg).ifname("net1"))
        .expect("del");
    assert_ok(&out, "DEL net1");
    assert_eq!(n.cni_allocations(CNI_NET), vec![ips[0].to_string()]);
    assert_eq!(
        pod_links(&ns),
        BTreeSet::from(["lo".to_string(), "eth0".to_string()])
    );
    let out = n
        .cni_exec(&CniCall::new("ADD", cid, &nsp, &cfg).ifname("net1"))
        .expect("add");
    out.result().expect("ADD net1 again");
    let gc = with_key(
        cfg.clone(),
        "cni.dev/valid-attachments",
        json!([{"containerID": cid, "ifname": "eth0"}]),
    );
    assert_ok(&n.cni_exec(&CniCall::bare("GC", &gc)).expect("gc"), "GC");
    assert_eq!(n.cni_allocations(CNI_NET), vec![ips[0].to_string()]);
    assert_eq!(n.wft_links().expect("links").len(), 1);
    let out = n
        .cni_exec(&CniCall::new("DEL", cid, &nsp, &cfg))
        .expect("del");
    assert_ok(&out, "DEL eth0");
    assert_node_clean(n, CNI_NET, "after both DELs");
}
