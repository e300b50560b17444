//! The offloaded data path against the kernel: with `--offload on` the pods' TCP reaches meshd
//! as TSO super-packets through the real TUN, leaves as UDP GSO batches, arrives as UDP GRO
//! batches and is written back to the TUN as coalesced super-packets, and every byte arrives
//! intact with no checksum error in the receiving pod's kernel. With `--offload off` the same
//! traffic takes the plain path (no counter moves), and an offloading node and a plain one
//! interoperate. Needs root; run serially:
//!   cargo build --workspace --bins && cargo test -p weft-tests --test offload -- --test-threads=1

use std::time::Duration;
use weft_tests::{
    assert_tcp_intact, counter_of, udp_send, Cluster, Marker, Pod, TcpOpts, UdpReceiver, UdpSend,
};

const READY: Duration = Duration::from_secs(20);
const BYTES: u64 = 40_000_000;

fn setup() {
    weft_tests::set_nettool(env!("CARGO_BIN_EXE_weft-nettool"));
}

/// Two nodes with one pod each, meshd on node i started with `--offload modes[i]`.
fn start(modes: [&str; 2]) -> (Cluster, Vec<Pod>) {
    setup();
    let c = Cluster::with_nodes(2).expect("cluster");
    let pods: Vec<Pod> = (0..2).map(|i| c.node(i).add_pod(0).expect("pod")).collect();
    for (i, m) in modes.iter().enumerate() {
        c.node(i)
            .start_meshd(&["--offload", m])
            .expect("start meshd");
    }
    c.wait_mesh_ready(READY).expect("mesh ready");
    (c, pods)
}

fn offload_status(c: &Cluster, i: usize) -> serde_json::Value {
    c.node(i).status_part("offload")
}

/// `TcpInCsumErrors` (and `InCsumErrors` of UDP) of a namespace's kernel, from /proc/net/snmp.
fn csum_errors(ns: &str) -> u64 {
    let snmp = weft_tests::sh_in(ns, "cat /proc/net/snmp").expect("snmp");
    let mut total = 0;
    let lines: Vec<&str> = snmp.lines().collect();
    for pair in lines.chunks(2) {
        let [head, vals] = pair else { continue };
        let names: Vec<&str> = head.split_whitespace().collect();
        let values: Vec<&str> = vals.split_whitespace().collect();
        for (n, v) in names.iter().zip(values.iter()) {
            if *n == "InCsumErrors" {
                total += v.parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

/// `BYTES` of the marker from `from` to `to`; every byte arrives (sent = received and the
/// receiver counts every marker).
fn transfer(c: &Cluster, from: &Pod, to: &Pod, marker: &Marker) {
    assert_tcp_intact(
        c,
        from,
        to,
        &TcpOpts::new(BYTES, marker.hex()).timeout(Duration::from_secs(60)),
    );
}

/// With offloads on both nodes, bulk TCP both ways goes through every offload: TSO
/// super-packets are read from the TUN and segmented, datagrams go out in GSO batches, arrive
/// in GRO batches and are written to the TUN coalesced; the bytes arrive intact and neither
/// pod's kernel counts a checksum error.
#[test]
fn offloads_on_carry_bulk_tcp_through_every_offload() {
    let (c, pods) = start(["on", "on"]);
    let marker = Marker::random();
    for i in 0..2 {
        let st = offload_status(&c, i);
        let tun = st["tun"].as_str().unwrap_or_default();
        assert!(tun.contains("tso4"), "node {i} TUN offloads: {st}");
        assert_eq!(st["udpGso"], true, "node {i}: {st}");
        assert_eq!(st["udpGro"], true, "node {i}: {st}");
    }
    let before = [csum_errors(&pods[0].ns), csum_errors(&pods[1].ns)];
    transfer(&c, &pods[0], &pods[1], &marker);
    transfer(&c, &pods[1], &pods[0], &marker);
    for i in 0..2 {
        let st = offload_status(&c, i);
        eprintln!("node {i} offload: {st}");
        for name in [
            "tunSuperPackets",
            "udpGsoSends",
            "udpGroReads",
            "tunCoalescedWrites",
        ] {
            assert!(counter_of(&st, name) > 0, "node {i}: {name} is 0: {st}");
        }
        assert!(
            counter_of(&st, "tunSuperSegments") > counter_of(&st, "tunSuperPackets"),
            "node {i}: {st}"
        );
        assert!(
            counter_of(&st, "udpGsoDatagrams") > counter_of(&st, "udpGsoSends"),
            "node {i}: {st}"
        );
        assert_eq!(counter_of(&st, "tunRefused"), 0, "node {i}: {st}");
    }
    // A burst of UDP datagrams: the receiving node coalesces them into USO super-packets (its
    // TUN accepted USO) and the kernel cuts them back into the very same datagrams. A burst
    // this size overflows the receiving socket's default buffer, so only what arrives is
    // checked: every datagram intact, and coalesced writes that carried them.
    let st1 = offload_status(&c, 1);
    if st1["tun"].as_str().unwrap_or_default().contains("uso4") {
        let writes = counter_of(&st1, "tunCoalescedWrites");
        let packets = counter_of(&st1, "tunCoalescedPackets");
        let rx = UdpReceiver::start(
            &pods[1].ns,
            &format!("{}:7000", pods[1].ip),
            Duration::from_secs(4),
            Some(marker.hex()),
        )
        .expect("udp receiver");
        let sent = udp_send(
            &pods[0].ns,
            &format!("{}:7000", pods[1].ip),
            &UdpSend {
                size: 1000,
                count: 2000,
                marker: Some(marker.hex().to_string()),
                ..UdpSend::default()
            },
        )
        .expect("udp send");
        let got = rx.finish().expect("udp received");
        let st1 = offload_status(&c, 1);
        eprintln!("UDP: sent {sent}, received {got:?}; node 1 offload: {st1}");
        assert!(got.received > 0, "sent {sent}, got {got:?}");
        assert_eq!(
            got.marker_datagrams, got.received,
            "datagrams changed: {got:?}"
        );
        assert_eq!(
            got.bytes,
            got.received * 1000,
            "datagram sizes changed: {got:?}"
        );
        assert!(
            counter_of(&st1, "tunCoalescedWrites") > writes,
            "no UDP coalescing on node 1: {st1}"
        );
        assert!(
            counter_of(&st1, "tunCoalescedPackets") - packets >= got.received,
            "fewer datagrams coalesced than received: {st1}"
        );
    }
    let after = [csum_errors(&pods[0].ns), csum_errors(&pods[1].ns)];
    assert_eq!(before, after, "checksum errors in the pods' kernels");
}

/// `--offload off` is the plain path: the TUN carries no virtio_net_hdr, no offload counter
/// moves, and the node still exchanges bulk TCP, both ways, with a node that offloads.
#[test]
fn offload_off_is_the_plain_path_and_interoperates() {
    let (c, pods) = start(["off", "on"]);
    let marker = Marker::random();
    let before = [csum_errors(&pods[0].ns), csum_errors(&pods[1].ns)];
    transfer(&c, &pods[0], &pods[1], &marker);
    transfer(&c, &pods[1], &pods[0], &marker);
    let off = offload_status(&c, 0);
    eprintln!("node 0 (off) offload: {off}");
    assert_eq!(off["tun"], "off", "{off}");
    assert_eq!(off["udpGso"], false, "{off}");
    assert_eq!(off["udpGro"], false, "{off}");
    for name in [
        "tunSuperPackets",
        "udpGsoSends",
        "udpGroReads",
        "tunCoalescedWrites",
        "tunRefused",
    ] {
        assert_eq!(counter_of(&off, name), 0, "node 0 (off): {name}: {off}");
    }
    let on = offload_status(&c, 1);
    eprintln!("node 1 (on) offload: {on}");
    assert!(counter_of(&on, "tunSuperPackets") > 0, "node 1 (on): {on}");
    let after = [csum_errors(&pods[0].ns), csum_errors(&pods[1].ns)];
    assert_eq!(before, after, "checksum errors in the pods' kernels");
}
