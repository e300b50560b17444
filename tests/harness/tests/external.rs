//! External standard WireGuard peers end to end: three meshd nodes with a pod each, and a
//! "laptop" running Debian's wireguard-go in a fourth namespace on the underlay (node-3 of the
//! cluster, no meshd), configured only from what `keyctl peer` prints.
//!
//! 1. `keyctl peer add laptop --public-key K --allowed-ips 10.99.0.1/32` (no endpoint: nodes
//!    learn it from the laptop's handshakes) prints a wg-quick config; with the private key
//!    filled in it is applied with `wg-quick strip` + `wg setconf` + `ip addr/route`. The laptop
//!    pings the pod on every node and every pod pings the laptop.
//! 2. Packets from the laptop with a source outside its allowed IPs (10.99.0.2) never reach the
//!    pod (ping fails, a capture at the pod sees none) and meshd counts `sourceNotAllowed`.
//! 3. node-1 rotates its key: while it rotates, `keyctl status` does not call the config stale
//!    and the laptop still reaches it; once the old key is retired, status flags the laptop
//!    STALE naming node-1 and the old config no longer reaches node-1 (node-0 still works).
//!    `keyctl peer config laptop` re-applied: everything works again, status no longer stale.
//! 4. `keyctl revoke laptop`: every meshd drops it (`refusedExternalPeers`: "revoked..."); with
//!    the revocation deleted it is back.
//! 5. `keyctl peer rm laptop`: every meshd drops the peer, the laptop's traffic and handshakes
//!    are refused (`unknownPeer`).
//! 6. No private key appears in keyctl's output or in the registry.
//!
//! A second test covers bad input: `keyctl peer add` refuses (exit 64, naming the flag and the
//! conflicting node or peer) overlapping ranges, bad keys, CIDRs and names and writes nothing;
//! a garbage record and a conflicting record written straight into `peers/` are refused by meshd
//! (the conflicting one with its reason in `meshd status`) while the mesh keeps working.
//!
//! Needs root, wireguard-go, wireguard-tools and the workspace binaries; run serially:
//!   cargo build --workspace --bins && cargo test -p weft-tests --test external -- --test-threads=1

use serde_json::Value;
use std::time::{Duration, Instant};
use weft_tests::{drops_of, peer_of, wg_genkey, Cluster, Node, PingOpts, Pod, WgImpl};

const READY: Duration = Duration::from_secs(20);
const LAPTOP_IP: &str = "10.99.0.1";
const SPOOF_IP: &str = "10.99.0.2";
const PLACEHOLDER: &str = "<paste the private key of this peer here>";
/// How long the test's rotation lingers in each phase, so the test can look at it mid-way.
const DWELL_MS: u64 = 3000;

fn setup() {
    weft_tests::set_nettool(env!("CARGO_BIN_EXE_weft-nettool"));
}

/// The real keyctl binary on the cluster's dir registry: (exit code, stdout, stderr).
fn keyctl(c: &Cluster, log: &mut String, args: &[&str]) -> (Option<i32>, String, String) {
    let (code, so, se) = c.keyctl(args).expect("keyctl");
    log.push_str(&so);
    log.push_str(&se);
    (code, so, se)
}

fn keyctl_ok(c: &Cluster, log: &mut String, args: &[&str]) -> String {
    let (code, so, se) = keyctl(c, log, args);
    assert_eq!(
        code,
        Some(0),
        "keyctl {args:?} failed: {se}\n{so}\n{}",
        c.debug_report()
    );
    so
}

fn keyctl_status(c: &Cluster, log: &mut String) -> Value {
    let so = keyctl_ok(c, log, &["status", "--json"]);
    serde_json::from_str(&so).unwrap_or_else(|e| panic!("keyctl status --json: {e}: {so}"))
}

/// `keyctl status`'s entry of external peer `name`.
fn status_external(st: &Value, name: &str) -> Value {
    st["externalPeers"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("{name} missing from keyctl status: {st}"))
}

/// The printed config with the private key filled in, as a user would.
fn fill_in(conf: &str, private_key: &str) -> String {
    let line = format!("PrivateKey = {PLACEHOLDER}");
    assert_eq!(
        conf.matches(&line).count(),
        1,
        "one placeholder line:\n{conf}"
    );
    conf.replace(&line, &format!("PrivateKey = {private_key}"))
}

fn public_key(n: &Node) -> String {
    n.status_json().expect("status")["node"]["publicKey"]
        .as_str()
        .expect("publicKey")
        .to_string()
}

/// Waits until every node in `nodes` has a handshake with the external peer `name`.
fn wait_handshakes(c: &Cluster, nodes: &[&Node], name: &str) {
    for n in nodes {
        n.wait_status(READY, |st| {
            peer_of(st, name).is_some_and(|p| p["latestHandshakeSecsAgo"].as_f64().is_some())
        })
        .unwrap_or_else(|e| {
            panic!(
                "{} has no handshake with {name}: {e:#}\n{}",
                n.name,
                c.debug_report()
            )
        });
    }
}

/// Pings from the laptop's namespace (3 at 50 ms, optional source).
fn laptop_ping(laptop: &Node, dst: impl std::fmt::Display, source: Option<&str>) -> u32 {
    let mut o = PingOpts::count(3).interval(0.05).wait(1);
    if let Some(s) = source {
        o = o.source(s);
    }
    laptop.ping(dst, &o).expect("ping").received
}

fn assert_laptop_reaches(c: &Cluster, laptop: &Node, pods: &[Pod]) {
    for p in pods {
        // The first packets may wait for a handshake.
        let ok = weft_tests::wait_until(Duration::from_secs(10), || {
            laptop_ping(laptop, p.ip, None) == 3
        });
        assert!(
            ok,
            "laptop -> pod {} on node-{} fails\n{}",
            p.ip,
            p.node_index,
            c.debug_report()
        );
        let back = p
            .ping(LAPTOP_IP, &PingOpts::count(3).interval(0.05).wait(1))
            .expect("ping");
        assert!(
            back.all_received(),
            "pod {} -> laptop: {}/3\n{}",
            p.ip,
            back.received,
            c.debug_report()
        );
    }
}

fn dump_dir(dir: &std::path::Path, out: &mut String) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            dump_dir(&p, out);
        } else if let Ok(t) = std::fs::read_to_string(&p) {
            out.push_str(&t);
        }
    }
}

#[test]
fn external_peer_end_to_end() {
    setup();
    let t0 = Instant::now();
    let c = Cluster::with_nodes(4).expect("cluster");
    let mut log = String::new();
    let dwell = [(
        "WEFT_TEST_ROTATION_DWELL_MS".to_string(),
        DWELL_MS.to_string(),
    )];
    let pods = c.start_mesh_env(3, &dwell).expect("mesh of three meshd");
    let nodes: Vec<&Node> = (0..3).map(|i| c.node(i)).collect();
    let laptop = c.node(3);
    let keys = wg_genkey().expect("wg genkey");

    // 1. Register, apply the printed config, traffic both ways.
    let conf = keyctl_ok(
        &c,
        &mut log,
        &[
            "peer",
            "add",
            "laptop",
            "--public-key",
            &keys.public_key,
            "--allowed-ips",
            &format!("{LAPTOP_IP}/32"),
        ],
    );
    assert!(!conf.contains(&keys.private_key));
    assert_eq!(conf.matches("[Peer]").count(), 3, "{conf}");
    for n in &nodes {
        assert!(
            conf.contains(&format!("PublicKey = {}", public_key(n))),
            "{conf}"
        );
    }
    assert!(
        conf.contains(&format!("Address = {LAPTOP_IP}/32")),
        "{conf}"
    );
    let record = c.registry.dir.join("peers/laptop.json");
    let stored: Value =
        serde_json::from_slice(&std::fs::read(&record).expect("peers/laptop.json")).expect("json");
    assert_eq!(stored["publicKey"], keys.public_key.as_str());
    assert_eq!(
        stored["configKeys"]["node-1"],
        public_key(nodes[1]).as_str()
    );
    let t_add = Instant::now();
    let ifname = laptop
        .start_wg_quick(WgImpl::WireguardGo, &fill_in(&conf, &keys.private_key))
        .expect("wireguard-go laptop");
    wait_handshakes(&c, &nodes, "laptop");
    eprintln!(
        "every node has a handshake with the laptop {:?} after its config was applied",
        t_add.elapsed()
    );
    for n in &nodes {
        let st = n.status_json().expect("status");
        let p = peer_of(&st, "laptop").expect("laptop peer");
        assert_eq!(p["kind"], "external");
        assert_eq!(p["allowedIps"][0], format!("{LAPTOP_IP}/32"));
        // Learnt from its handshake: the laptop's underlay address.
        assert!(
            p["endpoint"]
                .as_str()
                .is_some_and(|e| e.starts_with(&format!("{}:", laptop.underlay_ip))),
            "{p}"
        );
    }
    assert_laptop_reaches(&c, laptop, &pods);

    // 2. A source outside the allowed IPs is dropped by meshd.
    laptop
        .ip(&["addr", "add", &format!("{SPOOF_IP}/32"), "dev", &ifname])
        .expect("second address");
    let before = drops_of(&nodes[0].status_json().expect("status"), "sourceNotAllowed");
    let cap = pods[0]
        .capture_host_side(&c, &format!("host {SPOOF_IP}"))
        .expect("capture");
    let spoofed = laptop_ping(laptop, pods[0].ip, Some(SPOOF_IP));
    let seen = cap.stop().expect("capture stop");
    assert_eq!(spoofed, 0, "a ping from {SPOOF_IP} was answered");
    assert!(seen.is_empty(), "the pod saw {SPOOF_IP}: {}", seen.dump(5));
    let st = nodes[0].status_json().expect("status");
    let after = drops_of(&st, "sourceNotAllowed");
    assert!(after >= before + 3, "sourceNotAllowed {before} -> {after}");
    assert!(
        peer_of(&st, "laptop").is_some_and(|p| p["drops"]["sourceNotAllowed"].as_u64() >= Some(3)),
        "{st}"
    );
    laptop
        .ip(&["addr", "del", &format!("{SPOOF_IP}/32"), "dev", &ifname])
        .expect("remove second address");
    let ext = status_external(&keyctl_status(&c, &mut log), "laptop");
    assert_eq!(ext["stale"], false, "{ext}");
    assert_eq!(ext["refused"], Value::Null, "{ext}");

    // 3. node-1 rotates. While it rotates the old key still works and the config is not stale.
    let old_key = public_key(nodes[1]);
    keyctl_ok(&c, &mut log, &["rotate", "--node", "node-1"]);
    let mut saw_rotating = false;
    let rotating_ok = weft_tests::wait_until(Duration::from_secs(15), || {
        let st = keyctl_status(&c, &mut String::new());
        let rotating = st["nodes"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["name"] == "node-1"))
            .is_some_and(|n| n["rotation"]["state"] == "rotating");
        if rotating {
            saw_rotating = true;
            assert_eq!(status_external(&st, "laptop")["stale"], false, "{st}");
        }
        rotating
    });
    assert!(rotating_ok && saw_rotating, "node-1 never showed rotating");
    assert_eq!(
        laptop_ping(laptop, pods[1].ip, None),
        3,
        "mid-rotation the old key must still work\n{}",
        c.debug_report()
    );
    nodes[1]
        .wait_status(Duration::from_secs(60), |st| {
            st["node"]["publicKey"].as_str() != Some(old_key.as_str())
                && st["rotation"]["phase"] == "idle"
        })
        .expect("node-1 finished rotating");
    let new_key = public_key(nodes[1]);
    let ext = status_external(&keyctl_status(&c, &mut log), "laptop");
    assert_eq!(ext["stale"], true, "{ext}");
    assert_eq!(ext["changedKeys"][0]["node"], "node-1", "{ext}");
    assert_eq!(ext["changedKeys"][0]["configKey"], old_key.as_str());
    assert_eq!(ext["changedKeys"][0]["currentKey"], new_key.as_str());
    let table = keyctl_ok(&c, &mut log, &["status"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("laptop") && l.contains("STALE: node-1 key changed")),
        "{table}"
    );
    assert_eq!(
        laptop_ping(laptop, pods[1].ip, None),
        0,
        "the old config still reaches node-1 after its old key was retired"
    );
    assert_eq!(
        laptop_ping(laptop, pods[0].ip, None),
        3,
        "node-0 unaffected"
    );
    let conf2 = keyctl_ok(&c, &mut log, &["peer", "config", "laptop"]);
    assert!(conf2.contains(&format!("PublicKey = {new_key}")), "{conf2}");
    assert!(!conf2.contains(&old_key), "{conf2}");
    laptop
        .wg_quick_apply(&fill_in(&conf2, &keys.private_key))
        .expect("re-apply");
    assert_laptop_reaches(&c, laptop, &pods);
    let ext = status_external(&keyctl_status(&c, &mut log), "laptop");
    assert_eq!(ext["stale"], false, "{ext}");

    // 4. Revocation by name works as for nodes: every node drops it and says why; lifting the
    // revocation (deleting revocations/laptop) brings it back.
    keyctl_ok(&c, &mut log, &["revoke", "laptop"]);
    for n in &nodes {
        let st = n
            .wait_status(Duration::from_secs(5), |st| {
                peer_of(st, "laptop").is_none()
                    && st["refusedExternalPeers"]["laptop"]
                        .as_str()
                        .is_some_and(|r| r.starts_with("revoked"))
            })
            .unwrap_or_else(|e| panic!("{} did not drop the revoked laptop: {e:#}", n.name));
        assert!(peer_of(&st, "node-0").is_some() || n.index == 0);
    }
    assert_eq!(
        laptop_ping(laptop, pods[0].ip, None),
        0,
        "revoked laptop reaches a pod"
    );
    std::fs::remove_file(c.registry.dir.join("revocations/laptop.json")).expect("lift");
    assert_laptop_reaches(&c, laptop, &pods);

    // 5. Removal: every node drops the peer and refuses its handshakes.
    keyctl_ok(&c, &mut log, &["peer", "rm", "laptop"]);
    for n in &nodes {
        n.wait_status(Duration::from_secs(5), |st| peer_of(st, "laptop").is_none())
            .unwrap_or_else(|e| panic!("{} still has the laptop: {e:#}", n.name));
    }
    let unknown: Vec<u64> = nodes
        .iter()
        .map(|n| drops_of(&n.status_json().expect("status"), "unknownPeer"))
        .collect();
    // Re-applying the config makes the laptop handshake with every node at once.
    laptop
        .wg_quick_apply(&fill_in(&conf2, &keys.private_key))
        .expect("re-apply");
    for (n, before) in nodes.iter().zip(unknown) {
        n.wait_status(Duration::from_secs(10), |st| {
            drops_of(st, "unknownPeer") > before
        })
        .unwrap_or_else(|e| panic!("{} saw no refused handshake: {e:#}", n.name));
    }
    for p in &pods {
        assert_eq!(
            laptop_ping(laptop, p.ip, None),
            0,
            "removed peer reaches {}",
            p.ip
        );
    }
    let (code, _, se) = keyctl(&c, &mut log, &["peer", "config", "laptop"]);
    assert_eq!(code, Some(1), "{se}");
    // The mesh itself is untouched.
    c.assert_pods_ping(&pods.iter().collect::<Vec<_>>());

    // 6. No private key anywhere keyctl writes or prints.
    let mut registry = String::new();
    dump_dir(&c.registry.dir, &mut registry);
    assert!(
        !log.contains(&keys.private_key),
        "keyctl printed the laptop's private key"
    );
    assert!(!registry.contains(&keys.private_key));
    eprintln!("external_peer_end_to_end: {:?}", t0.elapsed());
}

#[test]
fn external_peer_bad_input_refused() {
    setup();
    let c = Cluster::with_nodes(2).expect("cluster");
    let mut log = String::new();
    let pods: Vec<Pod> = (0..2).map(|i| c.node(i).add_pod(0).expect("pod")).collect();
    for i in 0..2 {
        c.node(i).start_meshd(&[]).expect("meshd");
    }
    c.wait_mesh_ready(READY).expect("mesh ready");
    let key = wg_genkey().expect("key").public_key;
    let peers_dir = c.registry.dir.join("peers");
    let stored = || {
        std::fs::read_dir(&peers_dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.ends_with(".json") && !n.starts_with('.')
                    })
                    .count()
            })
            .unwrap_or(0)
    };

    // Refused with exit 64 naming the flag, nothing written.
    let cases: &[(&[&str], &str, &str)] = &[
        (
            &[
                "peer",
                "add",
                "laptop",
                "--public-key",
                &key,
                "--allowed-ips",
                "10.42.2.0/28",
            ],
            "--allowed-ips",
            "node-1",
        ),
        (
            &[
                "peer",
                "add",
                "laptop",
                "--public-key",
                &key,
                "--allowed-ips",
                "10.42.0.0/16",
            ],
            "--allowed-ips",
            "node-0",
        ),
        (
            &[
                "peer",
                "add",
                "laptop",
                "--public-key",
                &key,
                "--allowed-ips",
                "198.18.0.0/24",
            ],
            "--allowed-ips",
            "underlay endpoint",
        ),
        (
            &[
                "peer",
                "add",
                "laptop",
                "--public-key",
                "AAAA",
                "--allowed-ips",
                "10.99.0.1/32",
            ],
            "--public-key",
            "",
        ),
        (
            &[
                "peer",
                "add",
                "laptop",
                "--public-key",
                &key,
                "--allowed-ips",
                "10.99.0.1/33",
            ],
            "--allowed-ips",
            "",
        ),
        (
            &[
                "peer",
                "add",
                "laptop",
                "--public-key",
                &key,
                "--allowed-ips",
                "0.0.0.0/0",
            ],
            "--allowed-ips",
            "default route",
        ),
        (
            &[
                "peer",
                "add",
                "Laptop",
                "--public-key",
                &key,
                "--allowed-ips",
                "10.99.0.1/32",
            ],
            "NAME",
            "",
        ),
        (
            &[
                "peer",
                "add",
                "node-0",
                "--public-key",
                &key,
                "--allowed-ips",
                "10.99.0.1/32",
            ],
            "NAME",
            "node node-0",
        ),
        (
            &[
                "peer",
                "add",
                "laptop",
                "--public-key",
                &key,
                "--allowed-ips",
                "10.99.0.1/32",
                "--endpoint",
                "nowhere",
            ],
            "--endpoint",
            "",
        ),
    ];
    for (args, flag, names) in cases {
        let (code, so, se) = keyctl(&c, &mut log, args);
        assert_eq!(code, Some(64), "{args:?}: {se}{so}");
        assert!(se.contains(flag), "{args:?} should name {flag}: {se}");
        assert!(se.contains(names), "{args:?} should name {names:?}: {se}");
        assert!(so.is_empty(), "{args:?} printed a config: {so}");
        assert_eq!(stored(), 0, "{args:?} wrote something");
    }
    // Another external peer's range, and the same key twice.
    let vm_key = wg_genkey().expect("key").public_key;
    keyctl_ok(
        &c,
        &mut log,
        &[
            "peer",
            "add",
            "vm",
            "--public-key",
            &vm_key,
            "--allowed-ips",
            "10.99.0.0/24",
            "--endpoint",
            "198.18.0.50:51820",
        ],
    );
    for (args, flag) in [
        (
            [
                "peer",
                "add",
                "laptop",
                "--public-key",
                &key,
                "--allowed-ips",
                "10.99.0.1/32",
            ],
            "external peer vm",
        ),
        (
            [
                "peer",
                "add",
                "laptop",
                "--public-key",
                &vm_key,
                "--allowed-ips",
                "10.98.0.1/32",
            ],
            "--public-key",
        ),
    ] {
        let (code, _, se) = keyctl(&c, &mut log, &args);
        assert_eq!(code, Some(64), "{se}");
        assert!(se.contains(flag), "{se}");
    }
    assert_eq!(stored(), 1);
    // The peer with an endpoint: every node sends to it at once.
    for i in 0..2 {
        c.node(i)
            .wait_status(Duration::from_secs(5), |st| {
                peer_of(st, "vm").is_some_and(|p| p["endpoint"] == "198.18.0.50:51820")
            })
            .expect("vm added with its endpoint");
    }

    // Straight into the registry: garbage, and a record that takes node-1's range.
    std::fs::write(peers_dir.join("evil.json"), b"{\"schema\":1, garbage").expect("write");
    let thief = serde_json::json!({
        "schema": 1,
        "name": "thief",
        "publicKey": wg_genkey().expect("key").public_key,
        "allowedIps": ["10.42.2.0/24"],
    });
    std::fs::write(peers_dir.join("thief.json"), thief.to_string()).expect("write");
    for i in 0..2 {
        let st = c
            .node(i)
            .wait_status(Duration::from_secs(5), |st| {
                st["refusedExternalPeers"]["thief"].is_string()
            })
            .unwrap_or_else(|e| panic!("node-{i} did not refuse thief: {e:#}"));
        let why = st["refusedExternalPeers"]["thief"]
            .as_str()
            .unwrap_or_default();
        assert!(why.contains("node node-1"), "{why}");
        assert!(peer_of(&st, "thief").is_none() && peer_of(&st, "evil").is_none());
        assert!(peer_of(&st, "node-1").is_some() || i == 1);
        assert!(c.node(i).meshd_running());
        assert!(
            c.node(i)
                .meshd_log()
                .contains("refusing external peer record"),
            "node-{i} did not log the refusal"
        );
    }
    // node-1's range still goes to node-1: the mesh is undisturbed.
    c.assert_pods_ping(&pods.iter().collect::<Vec<_>>());
    let st = keyctl_status(&c, &mut log);
    let thief = status_external(&st, "thief");
    assert!(
        thief["refused"]
            .as_str()
            .is_some_and(|r| r.contains("node-1")),
        "{thief}"
    );
}
