//! The WireGuard userspace API socket, read by Debian's `wg` on a real mesh.
//!
//! Three meshd nodes with a pod each, and an external peer ("laptop": Debian's wireguard-go in
//! a fourth namespace, registered with `keyctl peer add`). Every meshd serves
//! `DIR/weft0.sock` (`--wg-uapi-dir`, a per-node directory the harness bind-mounts on
//! /var/run/wireguard for `wg`).
//!
//! 1. `wg show weft0 dump` on every node gives exactly the peers, public keys, endpoints,
//!    allowed IPs, handshake times and byte counts `meshd status` gives (taken between two
//!    status calls: counters must lie between them), node peers and the external peer alike;
//!    `wg show weft0`, `wg show all latest-handshakes` and `wg showconf weft0` parse and agree.
//!    The private key shown is the all-zero key, never the node's; no PSK is shown.
//! 2. `wg set weft0 peer K remove` fails with "Operation not permitted", meshd logs it, the
//!    peer stays.
//! 3. Garbage: unknown keys, a 1 MiB line, 40 half requests left open, 200 clients at once:
//!    every complete `get=1` is answered, meshd still answers `status` and pods still ping.
//! 4. During node-1's key rotation, node-0's dump shows every peer exactly once, node-1 with
//!    the old key and then the new one.
//! 5. The socket is 0600; it is gone once meshd stops; a live socket at the path makes a new
//!    meshd refuse to start, a stale one is replaced.
//!
//! Needs root, wireguard-go, wireguard-tools, util-linux (unshare) and the workspace binaries:
//!   cargo build --workspace --bins && cargo test -p weft-tests --test uapi -- --test-threads=1

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};
use weft_tests::{peer_of, Cluster, Node, PingOpts};

const LAPTOP_IP: &str = "10.99.0.1";
/// `wg`'s base64 of the all-zero key meshd answers with instead of its private key.
const ZERO_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const DWELL_MS: u64 = 2500;

fn wg_ok(n: &Node, args: &[&str]) -> String {
    let (ok, out, err) = n.wg(args).expect("wg");
    assert!(ok, "wg {args:?} on {} failed: {err}\n{out}", n.name);
    out
}

/// One peer line of `wg show IF dump`.
#[derive(Debug, Clone, PartialEq)]
struct DumpPeer {
    public_key: String,
    psk: String,
    endpoint: String,
    allowed_ips: Vec<String>,
    handshake: u64,
    rx: u64,
    tx: u64,
    keepalive: String,
}

/// Parses `wg show IF dump`: (interface fields, peers by public key).
fn parse_dump(dump: &str) -> (Vec<String>, Vec<DumpPeer>) {
    let mut lines = dump.lines();
    let head: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split('\t')
        .map(String::from)
        .collect();
    let peers = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 8, "a dump peer line has 8 fields: {l:?}");
            let num = |s: &str| s.parse::<u64>().unwrap_or_else(|_| panic!("number {s:?}"));
            let mut allowed: Vec<String> = f[3].split(',').map(String::from).collect();
            allowed.sort();
            DumpPeer {
                public_key: f[0].into(),
                psk: f[1].into(),
                endpoint: f[2].into(),
                allowed_ips: allowed,
                handshake: num(f[4]),
                rx: num(f[5]),
                tx: num(f[6]),
                keepalive: f[7].into(),
            }
        })
        .collect();
    (head, peers)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `wg show weft0 dump` against `meshd status` taken before and after it, field by field.
fn check_dump_matches_status(n: &Node) -> Vec<DumpPeer> {
    let before = n.status_json().expect("status");
    let t = unix_now();
    let dump = wg_ok(n, &["show", "weft0", "dump"]);
    let after = n.status_json().expect("status");
    let (head, peers) = parse_dump(&dump);
    assert_eq!(head.len(), 4, "interface line: {head:?}");
    assert_eq!(head[0], ZERO_KEY, "the private key shown is the zero key");
    assert_eq!(head[2], "51820", "listen port");
    assert_eq!(head[3], "off", "fwmark");
    let status_peers = after["peers"].as_array().expect("peers");
    assert_eq!(
        peers.len(),
        status_peers.len(),
        "{}: dump\n{dump}\nstatus {after:#}",
        n.name
    );
    for sp in status_peers {
        let name = sp["name"].as_str().expect("name");
        let key = sp["trafficPublicKey"]
            .as_str()
            .or(sp["publicKey"].as_str())
            .expect("key");
        let dp = peers
            .iter()
            .find(|p| p.public_key == key)
            .unwrap_or_else(|| panic!("{}: peer {name} ({key}) missing from\n{dump}", n.name));
        assert_eq!(dp.psk, "(none)", "no PSK is ever shown");
        assert_eq!(
            dp.endpoint,
            sp["endpoint"].as_str().unwrap_or("(none)"),
            "{name}"
        );
        let mut allowed: Vec<String> = sp["allowedIps"]
            .as_array()
            .expect("allowedIps")
            .iter()
            .filter_map(|a| a.as_str().map(String::from))
            .collect();
        allowed.sort();
        assert_eq!(dp.allowed_ips, allowed, "{name}");
        let sp0 = peer_of(&before, name).expect("peer in the first status");
        for (field, got) in [("rxBytes", dp.rx), ("txBytes", dp.tx)] {
            let lo = sp0[field].as_u64().expect("bytes");
            let hi = sp[field].as_u64().expect("bytes");
            assert!(
                lo <= got && got <= hi,
                "{}: {name} {field}: wg says {got}, meshd status {lo}..{hi}",
                n.name
            );
        }
        match sp["latestHandshakeSecsAgo"].as_f64() {
            None => assert_eq!(dp.handshake, 0, "{name}: no handshake"),
            Some(ago) => {
                let want = t - ago;
                assert!(
                    (dp.handshake as f64 - want).abs() <= 3.0,
                    "{name}: handshake at {} by wg, {want:.1} by status",
                    dp.handshake
                );
            }
        }
        assert_eq!(dp.keepalive, "off", "{name}");
    }
    peers
}

fn socket_mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777
}

fn ask(path: &std::path::Path, req: &[u8]) -> String {
    let mut s = UnixStream::connect(path).expect("connect to the UAPI socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let _ = s.write_all(req);
    let mut out = Vec::new();
    let mut b = [0u8; 8192];
    while let Ok(k) = s.read(&mut b) {
        if k == 0 {
            break;
        }
        out.extend_from_slice(&b[..k]);
        if out.ends_with(b"\n\n") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn wg_reads_weft_nodes_through_the_uapi_socket() {
    weft_tests::set_nettool(env!("CARGO_BIN_EXE_weft-nettool"));
    let t0 = Instant::now();
    let c = Cluster::with_nodes(4).expect("cluster");
    let dwell = [(
        "WEFT_TEST_ROTATION_DWELL_MS".to_string(),
        DWELL_MS.to_string(),
    )];
    let pods = c.start_mesh_env(3, &dwell).expect("mesh of three meshd");
    let nodes: Vec<&Node> = (0..3).map(|i| c.node(i)).collect();

    // The external peer, configured from what keyctl prints.
    let laptop = c.node(3);
    let keys = c
        .add_wireguard_go_peer(3, "laptop", LAPTOP_IP, &pods)
        .expect("wireguard-go laptop");
    c.assert_pods_ping(&pods.iter().collect::<Vec<_>>());

    // 1. Field by field, and the other views.
    let mut own_secrets = Vec::new();
    for n in &nodes {
        let peers = check_dump_matches_status(n);
        assert_eq!(peers.len(), 3, "two nodes and the laptop");
        assert!(
            peers.iter().any(|p| p.public_key == keys.public_key
                && p.allowed_ips == vec![format!("{LAPTOP_IP}/32")]
                && p.endpoint.starts_with(&format!("{}:", laptop.underlay_ip))
                && p.handshake > 0),
            "the external peer, with its learnt endpoint and a handshake: {peers:?}"
        );
        let show = wg_ok(n, &["show", "weft0"]);
        assert!(show.contains("interface: weft0"), "{show}");
        assert!(show.contains("listening port: 51820"), "{show}");
        for p in &peers {
            assert!(show.contains(&format!("peer: {}", p.public_key)), "{show}");
            assert!(
                show.contains(&format!("endpoint: {}", p.endpoint)),
                "{show}"
            );
        }
        assert_eq!(show.matches("latest handshake:").count(), 3, "{show}");
        assert_eq!(show.matches("transfer:").count(), 3, "{show}");
        assert!(!show.contains("preshared key"), "{show}");
        let hs = wg_ok(n, &["show", "all", "latest-handshakes"]);
        assert_eq!(hs.lines().count(), 3, "{hs}");
        for l in hs.lines() {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f[0], "weft0", "{l}");
            assert!(peers.iter().any(|p| p.public_key == f[1]), "{l}");
            assert!(f[2].parse::<u64>().is_ok_and(|t| t > 1_700_000_000), "{l}");
        }
        let showconf = wg_ok(n, &["showconf", "weft0"]);
        assert!(
            showconf.contains(&format!("PrivateKey = {ZERO_KEY}")),
            "{showconf}"
        );
        assert_eq!(showconf.matches("[Peer]").count(), 3, "{showconf}");
        assert!(!showconf.contains("PresharedKey"), "{showconf}");
        let secret = std::fs::read_to_string(n.state_dir().join("private.key")).expect("key");
        for text in [&show, &showconf, &hs] {
            assert!(
                !text.contains(secret.trim()),
                "the node's private key leaked"
            );
        }
        own_secrets.push(secret.trim().to_string());
        if n.index == 0 {
            println!("wg show weft0 on {}:\n{show}", n.name);
            println!(
                "wg show weft0 dump on {}:\n{}",
                n.name,
                wg_ok(n, &["show", "weft0", "dump"])
            );
        }
    }

    // 2. Writes are refused.
    let n0 = nodes[0];
    let victim = check_dump_matches_status(n0)[0].public_key.clone();
    let (ok, out, err) = n0
        .wg(&["set", "weft0", "peer", &victim, "remove"])
        .expect("wg set");
    assert!(!ok, "wg set must fail: {out}");
    assert!(err.contains("Operation not permitted"), "wg set: {err}");
    assert!(
        n0.meshd_log().contains("refused a WireGuard UAPI set"),
        "meshd logs the refused set"
    );
    assert_eq!(check_dump_matches_status(n0).len(), 3, "nothing removed");

    // 3. Garbage on the socket.
    let sock = n0.wg_uapi_dir().join("weft0.sock");
    assert_eq!(ask(&sock, b"get=1\nfoo=bar\n\n"), "errno=-22\n\n");
    assert_eq!(ask(&sock, b"set=1\nfoo=bar\n\n"), "errno=-1\n\n");
    assert_eq!(ask(&sock, b"bogus\n\n"), "errno=-22\n\n");
    assert_eq!(ask(&sock, &vec![b'k'; 1 << 20]), "errno=-22\n\n");
    let half: Vec<UnixStream> = (0..40)
        .map(|_| {
            let mut s = UnixStream::connect(&sock).expect("connect");
            let _ = s.write_all(b"get=1\n");
            s
        })
        .collect();
    let t_many = Instant::now();
    let clients: Vec<_> = (0..200)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || ask(&sock, b"get=1\n\n"))
        })
        .collect();
    for h in clients {
        let r = h.join().expect("client thread");
        assert!(r.ends_with("errno=0\n\n"), "a client got: {r:?}");
        assert_eq!(r.matches("public_key=").count(), 3, "{r}");
    }
    println!(
        "200 clients answered in {:?} with 40 half requests open",
        t_many.elapsed()
    );
    drop(half);
    n0.status_json().expect("meshd still answers status");
    c.assert_pods_ping(&pods.iter().collect::<Vec<_>>());

    // 4. A rotation: each peer shown once, node-1 with the key that carries its traffic.
    let old1 = nodes[1].status_json().expect("status")["node"]["publicKey"]
        .as_str()
        .expect("key")
        .to_string();
    let (code, _, err) = c
        .keyctl(&["rotate", "--node", &nodes[1].name])
        .expect("keyctl");
    assert_eq!(code, Some(0), "keyctl rotate: {err}");
    let ping = pods[0]
        .bg_ping(pods[1].ip, &PingOpts::count(400).interval(0.05).wait(1))
        .expect("ping during the rotation");
    let mut keys_seen: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    let new1 = loop {
        let (_, peers) = parse_dump(&wg_ok(n0, &["show", "weft0", "dump"]));
        assert_eq!(
            peers.len(),
            3,
            "each peer once during the rotation: {peers:?}"
        );
        let st1 = nodes[1].status_json().expect("status");
        let now1 = st1["node"]["publicKey"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        for p in &peers {
            if p.allowed_ips.contains(&nodes[1].current_pod_cidr()) {
                *keys_seen.entry(p.public_key.clone()).or_default() += 1;
            }
        }
        let rotating = st1["rotation"]["phase"].as_str().unwrap_or("idle") != "idle";
        if now1 != old1 && !rotating {
            break now1;
        }
        assert!(Instant::now() < deadline, "rotation did not finish: {st1}");
        std::thread::sleep(Duration::from_millis(200));
    };
    // Once it is done, the new key carries the traffic.
    let ok = weft_tests::wait_until(Duration::from_secs(10), || {
        let (_, peers) = parse_dump(&wg_ok(n0, &["show", "weft0", "dump"]));
        peers.iter().any(|p| p.public_key == new1)
    });
    assert!(
        ok,
        "node-0's wg never showed node-1's new key; saw {keys_seen:?}"
    );
    let r = ping.stop();
    assert!(
        r.received + 1 >= r.transmitted,
        "pings lost during the rotation: {}",
        r.output
    );
    assert!(keys_seen.contains_key(&old1), "{keys_seen:?}");
    assert!(
        keys_seen.keys().all(|k| *k == old1 || *k == new1),
        "{keys_seen:?}"
    );
    check_dump_matches_status(n0);

    // 5. The socket file.
    assert_eq!(socket_mode(&sock), 0o600, "socket mode");
    n0.stop_meshd(libc::SIGTERM).expect("stop meshd");
    assert!(!sock.exists(), "the socket is removed when meshd stops");
    let squatter = UnixListener::bind(&sock).expect("a live socket at the path");
    let err = n0
        .start_meshd(&[])
        .expect_err("meshd must not start over a live UAPI socket");
    assert!(
        format!("{err:#}").contains("another process is answering"),
        "{err:#}"
    );
    assert!(sock.exists(), "the live socket was left alone");
    drop(squatter); // the file stays: now stale
    n0.start_meshd(&[]).expect("meshd replaces a stale socket");
    assert_eq!(ask(&sock, b"get=1\n\n").matches("public_key=").count(), 3);
    assert_eq!(socket_mode(&sock), 0o600, "socket mode");
    for s in &own_secrets {
        for n in &nodes {
            assert!(
                !n.meshd_log().contains(s.as_str()),
                "a private key in a log"
            );
        }
    }
    println!("uapi test took {:?}", t0.elapsed());
}
