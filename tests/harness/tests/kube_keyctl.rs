//! keyctl's operator features, the watch's relist after 410 Gone and concurrent pod CIDR claims
//! on the `kube` registry against a real kube-apiserver v1.37.2 (`Cluster::start_kube`, in the
//! switch namespace at https://198.18.0.1:6443; no controller manager: nothing here needs the
//! garbage collector). Every meshd (and every claimer) authenticates with its own ServiceAccount
//! token bound to a Pod on its Node and has only the RBAC and admission policy of `deploy/`;
//! keyctl runs as ServiceAccount weft-system/keyctl bound to ClusterRole weft-admin.
//!
//! 1. `kube_revoke_readmit_psk_and_external_peer`: `keyctl revoke` / `readmit`, `keyctl psk
//!    rotate --wait` under pings, and an external wireguard-go peer added with `keyctl peer add`
//!    (the counterparts of revoke.rs, rotation.rs and external.rs on the dir/etcd registries).
//! 2. `kube_watch_410_gone_relists_exactly`: a watch resumed from a compacted resourceVersion
//!    ends in 410 Gone and meshd relists to exactly the API server's MeshNodes (the counterpart
//!    of etcd_history.rs).
//! 3. `kube_twenty_meshd_at_once_claim_distinct_blocks`: 20 meshd with their own node tokens
//!    start at the same moment and claim 20 distinct blocks; a tiny pool reports exhaustion.
//!
//! Need root and the binaries; run serially:
//!   cargo build --workspace --bins && cargo test -p weft-tests --test kube_keyctl -- --test-threads=1

use ipnet::Ipv4Net;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_core::alloc::AllocError;
use weft_registry::claims::{claim_pod_cidr, ClaimFailure, ClaimRequest};
use weft_registry::kube::claims::block_object_name;
use weft_registry::{KubeOptions, KubeRegistry, Registry};
use weft_tests::kube::{KubeControlPlane, KubeOpts};
use weft_tests::kube_mesh::KubeMesh;
use weft_tests::util::run_in_netns;
use weft_tests::{peer_of, wg_genkey, Node, PingOpts, Pod, WgImpl};

const READY: Duration = Duration::from_secs(30);
/// A cluster secret for tests (32 bytes, base64), as in rotation.rs.
const SECRET: &str = "q0E9bGmSIcHGYkHnUczk3P/U6N1ZRCpB5cFa4ZDl4Xo=";
const LAPTOP_IP: &str = "10.99.0.1";
const PLACEHOLDER: &str = "<paste the private key of this peer here>";

fn setup() {
    weft_tests::set_nettool(env!("CARGO_BIN_EXE_weft-nettool"));
}

/// `n` netns nodes with deploy/ applied and a Node object (with `spec.podCIDRs`) for each of
/// the first `with_node_objects` (see [`KubeMesh::new`]).
fn kube_cluster(n: usize, with_node_objects: usize, opts: KubeOpts) -> KubeMesh {
    setup();
    KubeMesh::new(n, with_node_objects, true, opts).expect("cluster with deploy/ applied")
}

/// [`KubeMesh::start_meshd`] with owned flags.
fn start_meshd(m: &KubeMesh, node: &Node, extra: &[String], env: &[(String, String)]) {
    let refs: Vec<&str> = extra.iter().map(String::as_str).collect();
    m.start_meshd(node, &refs, env).expect("meshd on kube");
}

fn keyctl(m: &KubeMesh, args: &[&str]) -> (Option<i32>, String, String) {
    m.keyctl(args).expect("running keyctl")
}

fn keyctl_ok(m: &KubeMesh, args: &[&str]) -> String {
    m.keyctl_ok(args).expect("keyctl")
}

fn keyctl_status(m: &KubeMesh) -> Value {
    let so = keyctl_ok(m, &["status", "--json"]);
    serde_json::from_str(&so).unwrap_or_else(|e| panic!("keyctl status --json: {e}: {so}"))
}

fn peer_names(n: &Node) -> Vec<String> {
    n.status_peer_names().unwrap_or_default()
}

fn public_key(n: &Node) -> String {
    n.status_json().expect("status")["node"]["publicKey"]
        .as_str()
        .expect("publicKey")
        .to_string()
}

/// The reason node `n`'s meshd gives for refusing `name`, if it does.
fn refused_reason(n: &Node, name: &str) -> Option<String> {
    n.status_json().ok()?["refusedRecords"][name]
        .as_str()
        .map(String::from)
}

fn keyctl_node<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == name))
        .unwrap_or_else(|| panic!("{name} missing from keyctl status: {status}"))
}

/// Writes [`SECRET`] to node `n`'s cluster secret file (0600) and returns the meshd flags for it.
fn secret_flags(n: &Node) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = n.dir.join("cluster-secret");
    std::fs::write(&path, format!("{SECRET}\n")).expect("secret file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    vec![
        "--cluster-secret-file".into(),
        path.to_string_lossy().into_owned(),
    ]
}

/// Waits until every node of `nodes` and every pair among them is on PSK generation `g` with
/// one key pair per link.
fn wait_psk(m: &KubeMesh, nodes: &[&Node], g: u64, within: Duration) {
    for n in nodes {
        n.wait_status(within, |st| {
            st["node"]["pskGeneration"].as_u64() == Some(g)
                && nodes.iter().filter(|o| o.name != n.name).all(|o| {
                    peer_of(st, &o.name).is_some_and(|p| {
                        p["pskGeneration"].as_u64() == Some(g) && p["keyPairs"].as_u64() == Some(1)
                    })
                })
        })
        .unwrap_or_else(|e| {
            panic!(
                "{} not on PSK generation {g}: {e:#}\n{}",
                n.name,
                m.c.debug_report()
            )
        });
    }
}

/// 3 pings at 50 ms must all fail.
fn assert_no_traffic(m: &KubeMesh, from: &Pod, to: &Pod, when: &str) {
    let r = from
        .ping(to.ip, &PingOpts::count(3).interval(0.05).wait(1))
        .expect("ping");
    assert_eq!(
        r.received,
        0,
        "{when}: {} -> {} got {} replies\n{}",
        from.ip,
        to.ip,
        r.received,
        m.c.debug_report()
    );
}

/// Waits (up to `limit`) until `from` gets a reply from `to`; how long it took.
fn time_to_reply(from: &Pod, to: &Pod, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let ok = weft_tests::wait_until(limit, || {
        from.ping(to.ip, &PingOpts::count(1).wait(1))
            .is_ok_and(|r| r.received == 1)
    });
    ok.then(|| t0.elapsed())
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

/// Three meshd on kube, each with the cluster secret; node-3 is a "laptop" without meshd.
/// `keyctl revoke node-2` as weft-admin: node-0 and node-1 drop node-2 within a few seconds
/// (refused as "revoked ...", no traffic); node-2 restarted with a fresh key is still refused;
/// `keyctl readmit node-2 --public-key NEWKEY` brings it back. `keyctl psk rotate --wait` under
/// 100 Hz pings between every pair of pods: nothing lost, every pair on generation 1. `keyctl
/// peer add laptop --endpoint ...` prints a config that a wireguard-go laptop uses to reach the
/// pod on every node (and every pod reaches it); `kubectl get meshpeers` shows its allowed IPs,
/// endpoint and whether its config is stale: `up to date`, `STALE: node-0 key changed` after
/// `keyctl rotate --node node-0 --wait`, `up to date` again after `keyctl peer config laptop`; a node
/// token may not write that status.
#[test]
fn kube_revoke_readmit_psk_and_external_peer() {
    let m = kube_cluster(4, 3, KubeOpts::default());
    let nodes: Vec<&Node> = (0..3).map(|i| m.c.node(i)).collect();
    for n in &nodes {
        start_meshd(&m, n, &secret_flags(n), &[]);
        assert_eq!(n.current_pod_cidr(), n.pod_cidr, "range from spec.podCIDRs");
    }
    let pods: Vec<Pod> = (0..3)
        .map(|i| m.c.node(i).add_pod(0).expect("pod"))
        .collect();
    m.c.wait_mesh_ready(READY).expect("mesh ready");
    m.c.assert_pods_ping(&pods.iter().collect::<Vec<_>>());
    let keys: Vec<String> = nodes.iter().map(|n| public_key(n)).collect();
    eprintln!("mesh ready {:?} after the start", m.t0.elapsed());

    // 1. Revoke node-2.
    let t0 = Instant::now();
    let out = keyctl_ok(&m, &["revoke", "node-2"]);
    let keyctl_took = t0.elapsed();
    assert!(out.contains("revoked node-2"), "{out}");
    for i in 0..2 {
        let n = m.c.node(i);
        let dropped = weft_tests::wait_until(Duration::from_secs(5), || {
            !peer_names(n).contains(&"node-2".to_string())
                && refused_reason(n, "node-2").is_some_and(|w| w.starts_with("revoked"))
        });
        assert!(
            dropped,
            "node-{i} did not drop the revoked node-2 within 5 s of keyctl revoke: peers {:?}, \
             refused {:?}\n{}",
            peer_names(n),
            refused_reason(n, "node-2"),
            m.c.debug_report()
        );
        let why = refused_reason(n, "node-2").expect("refused");
        assert!(why.contains(&keys[2][..8]), "node-{i}: {why}");
    }
    let dropped_after = t0.elapsed();
    eprintln!(
        "kube: node-0 and node-1 dropped node-2 {dropped_after:?} after `keyctl revoke` started \
         (keyctl ran {keyctl_took:?})"
    );
    assert_no_traffic(&m, &pods[0], &pods[2], "after revoke");
    assert_no_traffic(&m, &pods[2], &pods[1], "after revoke");
    let r = pods[0]
        .ping(pods[1].ip, &PingOpts::count(5).interval(0.05).wait(1))
        .expect("ping");
    assert!(r.all_received(), "node-0 <-> node-1 broke: {}", r.output);
    let st = keyctl_status(&m);
    let n2 = keyctl_node(&st, "node-2");
    assert_eq!(n2["revocation"]["state"], "revoked", "{n2}");
    assert_eq!(n2["admitted"], false, "{n2}");
    assert!(
        m.kube
            .exists(&["meshrevocation", "node-2"])
            .expect("kubectl get meshrevocation"),
        "no MeshRevocation node-2 on the API server"
    );
    assert!(
        weft_tests::wait_until(Duration::from_secs(5), || m
            .c
            .node(2)
            .meshd_log()
            .contains("THIS NODE IS REVOKED")),
        "node-2 did not log that it is revoked"
    );

    // 2. node-2 with a fresh key (state wiped of its private key): still refused until readmit.
    let n2node = m.c.node(2);
    n2node.stop_meshd(libc::SIGTERM).expect("stop node-2");
    std::fs::remove_file(n2node.state_dir().join("private.key")).expect("delete private.key");
    start_meshd(&m, n2node, &secret_flags(n2node), &[]);
    let new_key = public_key(n2node);
    assert_ne!(new_key, keys[2]);
    let published = weft_tests::wait_until(Duration::from_secs(10), || {
        m.kube
            .get_json(&["meshnode", "node-2"])
            .is_ok_and(|mn| mn["spec"]["publicKey"] == new_key.as_str())
    });
    assert!(published, "node-2's new key never reached its MeshNode");
    let refused_fresh = weft_tests::wait_until(Duration::from_secs(5), || {
        (0..2).all(|i| {
            refused_reason(m.c.node(i), "node-2")
                .is_some_and(|w| w.contains("not the key approved"))
        })
    });
    assert!(
        refused_fresh,
        "fresh unapproved key not refused\n{}",
        m.c.debug_report()
    );
    assert_no_traffic(&m, &pods[0], &pods[2], "fresh unapproved key");
    let (code, _, err) = keyctl(&m, &["readmit", "node-2", "--public-key", &keys[2]]);
    assert_eq!(code, Some(1), "readmitting the revoked key: {err}");

    // 3. Readmit with the new key: back within a few seconds.
    let t1 = Instant::now();
    keyctl_ok(&m, &["readmit", "node-2", "--public-key", &new_key]);
    let back = time_to_reply(&pods[0], &pods[2], Duration::from_secs(10));
    assert!(
        back.is_some(),
        "kube: no traffic to node-2 within 10 s of readmit\n{}",
        m.c.debug_report()
    );
    eprintln!(
        "kube: traffic to node-2 restored {:?} after `keyctl readmit` started",
        t1.elapsed()
    );
    m.c.wait_mesh_ready(READY)
        .expect("mesh ready after readmit");
    m.c.assert_pods_ping(&pods.iter().collect::<Vec<_>>());
    for i in 0..2 {
        let n = m.c.node(i);
        assert_eq!(refused_reason(n, "node-2"), None, "node-{i}");
        let p = n.status_peer("node-2").expect("status").expect("node-2");
        assert_eq!(p["publicKey"], new_key.as_str(), "node-{i}: {p}");
    }
    let st = keyctl_status(&m);
    let n2 = keyctl_node(&st, "node-2");
    assert_eq!(n2["revocation"]["state"], "readmitted", "{n2}");
    assert_eq!(n2["admitted"], true, "{n2}");
    assert_eq!(
        n2["revocation"]["approvedKey"].as_str(),
        Some(new_key.as_str()),
        "{n2}"
    );

    // 4. keyctl psk rotate --wait under 100 Hz pings between every pair of pods.
    wait_psk(&m, &nodes, 0, Duration::from_secs(10));
    let opts = PingOpts::count(1000).interval(0.01).wait(1);
    let pings: Vec<_> = [(0, 1), (1, 2), (2, 0)]
        .iter()
        .map(|&(a, b)| (a, b, pods[a].bg_ping(pods[b].ip, &opts).expect("ping")))
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let t2 = Instant::now();
    let out = keyctl_ok(&m, &["psk", "rotate", "--wait", "--timeout", "20"]);
    eprintln!(
        "kube: keyctl psk rotate --wait took {:?}:\n{out}",
        t2.elapsed()
    );
    assert!(out.contains("generation 1"), "{out}");
    wait_psk(&m, &nodes, 1, Duration::from_secs(10));
    for (a, b, p) in pings {
        let r = p.finish().expect("ping");
        assert!(r.transmitted >= 950, "ping ran short: {}", r.output);
        assert_eq!(
            r.lost(),
            0,
            "pod {a} -> pod {b} lost {:?} during keyctl psk rotate\n{}",
            r.lost_seqs(),
            m.c.debug_report()
        );
    }
    let psk = m
        .kube
        .get_json(&["meshpskgeneration", "cluster"])
        .expect("MeshPSKGeneration cluster");
    assert_eq!(psk["spec"]["generation"], 1, "{psk}");
    for n in &nodes {
        let mn = m.kube.get_json(&["meshnode", &n.name]).expect("MeshNode");
        assert_eq!(mn["spec"]["pskGeneration"], 1, "{mn}");
    }

    // 5. An external standard WireGuard peer (wireguard-go on node-3).
    let laptop = m.c.node(3);
    let lkeys = wg_genkey().expect("wg genkey");
    let endpoint = format!("{}:51820", laptop.underlay_ip);
    let conf = keyctl_ok(
        &m,
        &[
            "peer",
            "add",
            "laptop",
            "--public-key",
            &lkeys.public_key,
            "--allowed-ips",
            &format!("{LAPTOP_IP}/32"),
            "--endpoint",
            &endpoint,
        ],
    );
    assert!(!conf.contains(&lkeys.private_key));
    assert_eq!(conf.matches("[Peer]").count(), 3, "{conf}");
    for n in &nodes {
        assert!(
            conf.contains(&format!("PublicKey = {}", public_key(n))),
            "{conf}"
        );
    }
    assert!(conf.contains("ListenPort = 51820"), "{conf}");
    laptop
        .start_wg_quick(WgImpl::WireguardGo, &fill_in(&conf, &lkeys.private_key))
        .expect("wireguard-go laptop");
    for n in &nodes {
        let st = n
            .wait_status(READY, |st| {
                peer_of(st, "laptop")
                    .is_some_and(|p| p["latestHandshakeSecsAgo"].as_f64().is_some())
            })
            .unwrap_or_else(|e| {
                panic!(
                    "{} has no handshake with the laptop: {e:#}\n{}",
                    n.name,
                    m.c.debug_report()
                )
            });
        let p = peer_of(&st, "laptop").expect("laptop");
        assert_eq!(p["kind"], "external", "{p}");
        assert_eq!(p["allowedIps"][0], format!("{LAPTOP_IP}/32"), "{p}");
        assert_eq!(p["endpoint"], endpoint.as_str(), "{p}");
    }
    for p in &pods {
        let ok = weft_tests::wait_until(Duration::from_secs(10), || {
            laptop
                .ping(p.ip, &PingOpts::count(3).interval(0.05).wait(1))
                .is_ok_and(|r| r.received == 3)
        });
        assert!(
            ok,
            "laptop -> pod {} on node-{} fails\n{}",
            p.ip,
            p.node_index,
            m.c.debug_report()
        );
        let r = p
            .ping(LAPTOP_IP, &PingOpts::count(3).interval(0.05).wait(1))
            .expect("ping");
        assert!(
            r.all_received(),
            "pod {} -> laptop: {}/3\n{}",
            p.ip,
            r.received,
            m.c.debug_report()
        );
    }
    let table = m
        .kube
        .kubectl(&["get", "meshpeers"])
        .expect("get meshpeers");
    eprintln!("kubectl get meshpeers:\n{table}");
    let header = table.lines().next().unwrap_or_default();
    for col in ["NAME", "ALLOWED IPS", "ENDPOINT", "CONFIG", "AGE"] {
        assert!(header.contains(col), "no {col} column:\n{table}");
    }
    let row = table
        .lines()
        .find(|l| l.starts_with("laptop"))
        .unwrap_or_else(|| panic!("no laptop row:\n{table}"));
    assert!(row.contains(&format!("{LAPTOP_IP}/32")), "{table}");
    assert!(row.contains(&endpoint), "{table}");
    assert!(row.contains("up to date"), "{table}");
    // A node token may not write a peer's status.
    let kc1 = m.c.node(1).dir.join("kubeconfig");
    let out = m
        .kubectl_as(
            &kc1,
            &[
                "patch",
                "meshpeer",
                "laptop",
                "--subresource=status",
                "--type=merge",
                "-p",
                r#"{"status":{"config":"up to date","configStale":false}}"#,
            ],
            b"",
        )
        .expect("kubectl");
    assert!(
        out.forbidden(),
        "node-1 wrote the laptop's status: {} {}",
        out.stdout,
        out.stderr
    );
    // node-0's key rotated: the printed config no longer reaches node-0, and the Config column
    // says so (keyctl rotate --wait refreshes it); printing the config again makes it current.
    keyctl_ok(
        &m,
        &["rotate", "--node", "node-0", "--wait", "--timeout", "30"],
    );
    let config_column = || {
        let t = m
            .kube
            .kubectl(&["get", "meshpeers"])
            .expect("get meshpeers");
        t.lines()
            .find(|l| l.starts_with("laptop"))
            .map(str::to_string)
            .unwrap_or_default()
    };
    let row = config_column();
    assert!(
        row.contains("STALE: node-0 key changed"),
        "after node-0's rotation: {row}"
    );
    let peer = m.kube.get_json(&["meshpeer", "laptop"]).expect("MeshPeer");
    assert_eq!(peer["status"]["configStale"], true, "{peer}");
    eprintln!("after keyctl rotate node-0: {row}");
    keyctl_ok(&m, &["peer", "config", "laptop"]);
    let row = config_column();
    assert!(row.contains("up to date"), "after peer config: {row}");
    let peer = m.kube.get_json(&["meshpeer", "laptop"]).expect("MeshPeer");
    assert_eq!(
        peer["spec"]["publicKey"],
        lkeys.public_key.as_str(),
        "{peer}"
    );
    assert_eq!(peer["status"]["configStale"], false, "{peer}");
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(
            peer["spec"]["configKeys"][&n.name],
            public_key(n).as_str(),
            "node-{i}: {peer}"
        );
    }
    eprintln!("test took {:?}", m.t0.elapsed());
}

/// How a peer looks in `meshd status` (or should, from a MeshNode): key, key generation,
/// allowed IPs, endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PeerView {
    public_key: String,
    key_generation: u64,
    allowed_ips: Vec<String>,
    endpoint: Option<String>,
}

/// The peers node `own` should have given the API server's MeshNodes right now: every MeshNode
/// but its own.
fn api_peers(kube: &KubeControlPlane, own: &str) -> BTreeMap<String, PeerView> {
    let list = kube
        .get_json(&["meshnodes"])
        .expect("kubectl get meshnodes");
    let mut out = BTreeMap::new();
    for it in list["items"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let name = it["metadata"]["name"].as_str().expect("name").to_string();
        if name == own {
            continue;
        }
        let spec = &it["spec"];
        let mut allowed_ips: Vec<String> = spec["podCidrs"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|s| s.as_str().map(String::from))
            .collect();
        allowed_ips.sort();
        out.insert(
            name,
            PeerView {
                public_key: spec["publicKey"].as_str().unwrap_or_default().to_string(),
                key_generation: spec["keyGeneration"].as_u64().unwrap_or_default(),
                allowed_ips,
                endpoint: spec["endpoints"][0].as_str().map(String::from),
            },
        );
    }
    out
}

fn status_peers(st: &Value) -> BTreeMap<String, PeerView> {
    st["peers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let mut allowed_ips: Vec<String> = p["allowedIps"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect();
            allowed_ips.sort();
            (
                p["name"].as_str().unwrap_or_default().to_string(),
                PeerView {
                    public_key: p["publicKey"].as_str().unwrap_or_default().to_string(),
                    key_generation: p["keyGeneration"].as_u64().unwrap_or_default(),
                    allowed_ips,
                    endpoint: p["endpoint"].as_str().map(String::from),
                },
            )
        })
        .collect()
}

/// Waits until `n`'s peers are exactly the API server's MeshNodes (names, keys, generations,
/// allowed IPs, endpoints) and it refuses none; panics with the difference otherwise. Returns
/// how long it took.
fn assert_peers_are_api(m: &KubeMesh, n: &Node, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    let mut last = (BTreeMap::new(), BTreeMap::new(), Value::Null);
    let ok = weft_tests::wait_until(timeout, || {
        let want = api_peers(&m.kube, &n.name);
        let Ok(st) = n.status_json() else {
            return false;
        };
        let have = status_peers(&st);
        let refused = st["refusedRecords"].clone();
        let ok = have == want && refused.as_object().is_none_or(|o| o.is_empty());
        last = (want, have, refused);
        ok
    });
    if !ok {
        let (want, have, refused) = last;
        let missing: Vec<_> = want.keys().filter(|k| !have.contains_key(*k)).collect();
        let extra: Vec<_> = have.keys().filter(|k| !want.contains_key(*k)).collect();
        let differ: Vec<_> = want
            .iter()
            .filter_map(|(k, w)| have.get(k).filter(|h| *h != w).map(|h| (k, w, h)))
            .collect();
        panic!(
            "{}'s peers are not the API server's MeshNodes after {timeout:?}: missing \
             {missing:?}, extra {extra:?}, different (API server, meshd) {differ:#?}, refused \
             {refused}\n{}",
            n.name,
            m.c.debug_report()
        );
    }
    t0.elapsed()
}

/// A MeshNode of a node nobody runs: a fresh `wg genkey` key, pod range 10.42.RANGE.0/24,
/// endpoint 198.51.100.(RANGE % 250 + 1):51820 (TEST-NET-2, nobody there).
fn synthetic_meshnode(name: &str, range: u8, key_generation: u64) -> Value {
    let key = wg_genkey().expect("wg genkey").public_key;
    json!({
        "apiVersion": "weft.dev/v1alpha1",
        "kind": "MeshNode",
        "metadata": {"name": name},
        "spec": {
            "schema": 1,
            "publicKey": key,
            "endpoints": [format!("198.51.100.{}:51820", u32::from(range) % 250 + 1)],
            "podCidrs": [format!("10.42.{range}.0/24")],
            "keyGeneration": key_generation,
            "keyCreatedAt": 0,
        },
    })
}

/// Server-side apply of `objects` as admin, in one kubectl run.
fn apply_all(kube: &KubeControlPlane, objects: &[Value]) {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
    kube.apply_yaml(&list.to_string())
        .expect("applying MeshNodes as admin");
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on the pid of a child the harness started and still holds.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// meshd's watches are kube-runtime watchers served from etcd (`--watch-cache=false`); the API
/// server compacts nothing by itself. Ten synthetic MeshNodes are applied and node-1 takes them
/// in. Then node-1's meshd is SIGSTOPped, its TCP connections to the API server are destroyed
/// (`ss -K`: RST to the server, ECONNABORTED for meshd once it runs), and, as admin, five
/// MeshNodes get new keys (three also new ranges), three are deleted (one re-created with
/// another key and range), ten are created and one is created and deleted; etcd is compacted to
/// its current revision. On SIGCONT each watcher resumes from the resourceVersion it last saw,
/// which is compacted: the API server answers 410 Gone (an ERROR event with code 410, reason
/// `Expired`) and kube-runtime relists. Proof: node-1 runs with `weft_registry=debug,
/// kube_runtime::watcher=debug`; the log shows the 410 Status, weft's watch of collection
/// `nodes` failing with "too old", then its complete list of the 20 MeshNodes. Then node-1's
/// (and node-0's) peers are exactly the MeshNodes on the API server: nothing missing, nothing
/// extra, every key, generation, range and endpoint current.
///
/// Without the `ss -K` no 410 happens: the watch of the stopped meshd stays open, the API
/// server keeps sending it the changes (they wait in node-1's socket receive queue, ~15 KB
/// here), the compaction does not cancel it, and on SIGCONT meshd reads them in order (tried by
/// hand: peers right, no 410 in the log).
#[test]
fn kube_watch_410_gone_relists_exactly() {
    let m = kube_cluster(
        2,
        2,
        KubeOpts {
            watch_cache: false,
            etcd_compaction_interval: Some(Duration::ZERO),
            ..KubeOpts::default()
        },
    );
    let debug_env = [(
        "RUST_LOG".to_string(),
        "info,weft_registry=debug,kube_runtime::watcher=debug,netlink_packet_route=error,\
         boringtun=error"
            .to_string(),
    )];
    start_meshd(&m, m.c.node(0), &[], &[]);
    start_meshd(&m, m.c.node(1), &[], &debug_env);
    let pods: Vec<Pod> = (0..2)
        .map(|i| m.c.node(i).add_pod(0).expect("pod"))
        .collect();
    m.c.wait_mesh_ready(READY).expect("mesh ready");
    let n1 = m.c.node(1);

    let first: Vec<Value> = (0..10u8)
        .map(|i| synthetic_meshnode(&format!("hist-{i:02}"), 100 + i, 1))
        .collect();
    apply_all(&m.kube, &first);
    for i in 0..2 {
        assert_peers_are_api(&m, m.c.node(i), Duration::from_secs(15));
    }
    assert_eq!(api_peers(&m.kube, &n1.name).len(), 11);

    let pid = n1.meshd_pid().expect("meshd pid");
    let log_before = n1.meshd_log().len();
    signal(pid, libc::SIGSTOP);
    let stopped = Instant::now();
    let changed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // Every TCP connection of node-1 to the API server (the stopped meshd is its only
        // client there) is destroyed before anything changes: the kernel sends the server an
        // RST (the server ends those watches) and meshd reads ECONNABORTED on SIGCONT, having
        // received none of the changes below.
        let killed = n1
            .exec(
                "ss",
                &["-K", "-t", "-n", "dst", "198.18.0.1", "dport", "=", ":6443"],
            )
            .expect("ss -K");
        let left = n1
            .exec(
                "ss",
                &["-t", "-n", "-H", "dst", "198.18.0.1", "dport", "=", ":6443"],
            )
            .expect("ss");
        // New keys for 0..5, new ranges for 2..5.
        let mut batch: Vec<Value> = (0..5u8)
            .map(|i| {
                let range = if i < 2 { 100 + i } else { 150 + i };
                synthetic_meshnode(&format!("hist-{i:02}"), range, 2)
            })
            .collect();
        // Ten new ones.
        batch.extend((10..20u8).map(|i| synthetic_meshnode(&format!("hist-{i:02}"), 100 + i, 1)));
        apply_all(&m.kube, &batch);
        // 5..8 deleted; 6 comes back with another key and range; 20 comes and goes.
        m.kube
            .kubectl(&["delete", "meshnode", "hist-05", "hist-06", "hist-07"])
            .expect("delete");
        apply_all(
            &m.kube,
            &[
                synthetic_meshnode("hist-06", 156, 1),
                synthetic_meshnode("hist-20", 120, 1),
            ],
        );
        m.kube
            .kubectl(&["delete", "meshnode", "hist-20"])
            .expect("delete");
        let revision = m.kube.compact_etcd().expect("compact etcd");
        (15 + 3 + 2 + 1, killed, left, revision)
    }));
    signal(pid, libc::SIGCONT);
    let (changes, killed, left, revision) =
        changed.unwrap_or_else(|p| std::panic::resume_unwind(p));
    let conns = killed
        .lines()
        .filter(|l| l.contains("198.18.0.1:6443"))
        .count();
    eprintln!(
        "{conns} connection(s) to the API server destroyed, {changes} MeshNode changes and etcd \
         compacted to revision {revision} while node-1's meshd was stopped for {:?}:\n{killed}",
        stopped.elapsed()
    );
    assert!(conns >= 1, "ss -K destroyed no connection:\n{killed}");
    assert!(
        left.trim().is_empty(),
        "connections left after ss -K:\n{left}"
    );

    let took = assert_peers_are_api(&m, n1, Duration::from_secs(20));
    assert!(n1.meshd_running(), "meshd died");
    let want = api_peers(&m.kube, &n1.name);
    for gone in ["hist-05", "hist-07", "hist-20"] {
        assert!(
            !want.contains_key(gone),
            "the API server still holds {gone}"
        );
    }
    assert_eq!(want.len(), 1 + 18, "the API server holds {:?}", want.keys());
    assert_peers_are_api(&m, m.c.node(0), Duration::from_secs(10));
    eprintln!("node-1's peers are exactly the API server's MeshNodes {took:?} after SIGCONT");

    // The proof of the 410: the MeshNodes watcher resumed from a compacted resourceVersion got
    // the ERROR event with code 410 (kube-runtime logs the Status, weft's watch names the
    // collection), and weft's watch then sent a complete list of the 20 MeshNodes.
    let log = n1.meshd_log();
    let after = &log[log_before.min(log.len())..];
    let tail = || after.lines().take(80).collect::<Vec<_>>().join("\n");
    let is_gone = |l: &str| l.contains("410") && l.contains("Expired");
    let gone_lines: Vec<&str> = after.lines().filter(|l| is_gone(l)).collect();
    assert!(
        !gone_lines.is_empty(),
        "no 410 Gone in node-1's meshd log after SIGCONT:\n{}",
        tail()
    );
    let nodes_gone = after
        .lines()
        .position(|l| l.contains("collection=nodes") && l.contains("too old"));
    let Some(at) = nodes_gone else {
        panic!(
            "the MeshNodes watch of node-1 did not end in 410 Gone:\n{}",
            tail()
        );
    };
    let relist = after
        .lines()
        .skip(at)
        .find(|l| l.contains("complete list") && l.contains("collection=nodes"));
    assert!(
        relist.is_some_and(|l| l.contains("objects=20")),
        "no complete list of the 20 MeshNodes after the 410 in node-1's log ({relist:?}):\n{}",
        tail()
    );
    eprintln!(
        "410 Gone in node-1's log ({} line(s)):\n{}\n{}\nthen: {}",
        gone_lines.len(),
        gone_lines.join("\n"),
        after.lines().nth(at).unwrap_or_default(),
        relist.unwrap_or_default()
    );
    let r = pods[0]
        .ping(pods[1].ip, &PingOpts::count(3).interval(0.05).wait(1))
        .expect("ping");
    assert!(r.all_received(), "pods: {}", r.output);
    eprintln!("test took {:?}", m.t0.elapsed());
}

/// What one claimer got.
#[derive(Debug)]
enum Claimed {
    Block(Ipv4Net),
    Exhausted(String),
    Failed(String),
}

/// Runs one `claim_pod_cidr` per (node name, kubeconfig) on its own `KubeRegistry` (as the node,
/// field manager meshd), all released at the same instant by a barrier once every client has
/// connected; in a thread inside the switch namespace. Returns per claimer what it got and how
/// long it took from the release, and the time until the last one finished.
fn claim_concurrently(
    ns: &str,
    claimers: &[(String, PathBuf)],
    pool: Ipv4Net,
) -> (Vec<(String, Claimed, Duration)>, Duration) {
    let claimers = claimers.to_vec();
    run_in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let barrier = Arc::new(tokio::sync::Barrier::new(claimers.len()));
            let mut tasks = Vec::new();
            for (name, kubeconfig) in claimers {
                let barrier = barrier.clone();
                tasks.push(tokio::spawn(async move {
                    let reg = KubeRegistry::open(KubeOptions {
                        kubeconfig: Some(kubeconfig),
                        node: Some(name.clone()),
                        ..KubeOptions::default()
                    })
                    .expect("open the kube registry");
                    // Connect (TLS, token) before the start, so the claims race and not the
                    // handshakes.
                    reg.list(weft_registry::Kind::Claims)
                        .await
                        .expect("listing claims as the node");
                    barrier.wait().await;
                    let t0 = Instant::now();
                    let req = ClaimRequest {
                        node: name.clone(),
                        pool,
                        block_len: 24,
                        remembered: None,
                        reclaim_after: Duration::from_secs(3600),
                        renew_only: false,
                    };
                    let got = match claim_pod_cidr(&reg as &dyn Registry, &req).await {
                        Ok(a) => Claimed::Block(a.claim.pod_cidr),
                        Err(ClaimFailure::Alloc(e @ AllocError::Exhausted { .. })) => {
                            Claimed::Exhausted(e.to_string())
                        }
                        Err(e) => Claimed::Failed(e.to_string()),
                    };
                    (name, got, t0.elapsed())
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.expect("claimer task"));
            }
            let slowest = out.iter().map(|(_, _, d)| *d).max().unwrap_or_default();
            Ok((out, slowest))
        })
    })
    .expect("claimers")
}

/// 20 netns nodes whose Node objects have no podCIDRs start meshd at the same moment
/// (`--registry kube`, each with its own token bound to a Pod on its Node and only deploy/'s
/// RBAC and admission policy, `--cluster-cidr 10.42.0.0/16`): 20 distinct /24 blocks, exactly
/// 20 MeshPodCIDRClaims, each named after its block and held (spec.node) by the node that runs
/// with it, and a full mesh of 20. Then, with every meshd stopped and the claims and MeshNodes
/// deleted, 5 claimers (`claim_pod_cidr` as 5 of those nodes) on 10.42.0.0/22 (4 blocks): 4
/// get a block, 1 is told the pool is exhausted.
#[test]
fn kube_twenty_meshd_at_once_claim_distinct_blocks() {
    const N: usize = 20;
    setup();
    let m = KubeMesh::new(N, N, false, KubeOpts::default()).expect("cluster with deploy/ applied");
    let setup_start = Instant::now();
    // Pod-bound tokens, four kubectl streams at once.
    let kubeconfigs: Vec<PathBuf> = std::thread::scope(|s| {
        let handles: Vec<_> =
            m.c.nodes
                .chunks(N / 4)
                .map(|chunk| {
                    let m = &m;
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|n| m.node_kubeconfig(n).expect("pod-bound token"))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("token thread"))
            .collect()
    });
    eprintln!("{N} pod-bound tokens made in {:?}", setup_start.elapsed());

    let t0 = Instant::now();
    for (n, kc) in m.c.nodes.iter().zip(&kubeconfigs) {
        n.omit_default_args(&["--endpoint", "--pod-cidr"]);
        let kc = kc.display().to_string();
        n.spawn_meshd_claiming(&[
            "--registry",
            "kube",
            "--kubeconfig",
            &kc,
            "--network-policy",
            "off",
        ])
        .expect("spawn meshd");
    }
    let mut held: BTreeMap<String, Ipv4Net> = BTreeMap::new();
    for n in &m.c.nodes {
        n.wait_meshd_api(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("meshd on {}: {e:#}\n{}", n.name, m.c.debug_report()));
        let r = n.refresh_claimed().expect("claimed range");
        held.insert(n.name.clone(), r.parse().expect("range"));
    }
    let claimed_in = t0.elapsed();
    let pool: Ipv4Net = "10.42.0.0/16".parse().expect("pool");
    for (name, b) in &held {
        assert!(pool.contains(b) && b.prefix_len() == 24, "{name}: {b}");
    }
    let mut blocks: Vec<Ipv4Net> = held.values().copied().collect();
    blocks.sort();
    blocks.dedup();
    assert_eq!(blocks.len(), N, "a block was handed out twice: {held:#?}");
    eprintln!("{N} meshd started at once: all running with distinct blocks after {claimed_in:?}");

    let claims = m
        .kube
        .get_json(&["meshpodcidrclaims"])
        .expect("get meshpodcidrclaims");
    let items = claims["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), N, "{claims}");
    for it in &items {
        let name = it["metadata"]["name"].as_str().expect("name");
        let node = it["spec"]["node"].as_str().expect("spec.node");
        let block = it["spec"]["podCidr"].as_str().expect("spec.podCidr");
        assert_eq!(name, block_object_name(block), "{it}");
        assert_eq!(
            held.get(node).map(ToString::to_string).as_deref(),
            Some(block),
            "claim {name} is held by {node}, which runs with {:?}",
            held.get(node)
        );
    }
    m.c.wait_mesh_ready(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("full mesh of {N}: {e:#}\n{}", m.c.debug_report()));
    for n in &m.c.nodes {
        assert_eq!(
            n.status_peer_names().expect("status").len(),
            N - 1,
            "{} peers",
            n.name
        );
    }
    eprintln!("full mesh of {N} after {:?}", t0.elapsed());
    for n in &m.c.nodes {
        n.stop_meshd(libc::SIGTERM).expect("stop meshd");
    }
    let claimers: Vec<(String, PathBuf)> =
        m.c.nodes
            .iter()
            .map(|n| n.name.clone())
            .zip(kubeconfigs)
            .collect();

    // A tiny pool: 4 blocks, 5 claimers. The stopped nodes' MeshNodes go too: a live node
    // record's range counts as held, claim or not.
    m.kube
        .kubectl(&["delete", "meshpodcidrclaims,meshnodes", "--all"])
        .expect("delete the claims and MeshNodes");
    let tiny: Ipv4Net = "10.42.0.0/22".parse().expect("pool");
    let (results, slowest) = claim_concurrently(&m.kube.ns, &claimers[..5], tiny);
    for (name, got, _) in &results {
        if let Claimed::Failed(msg) = got {
            panic!("{name}: the claim failed (not exhausted): {msg}");
        }
    }
    let ok: Vec<Ipv4Net> = results
        .iter()
        .filter_map(|(_, g, _)| match g {
            Claimed::Block(b) => Some(*b),
            _ => None,
        })
        .collect();
    let exhausted: Vec<&String> = results
        .iter()
        .filter_map(|(_, g, _)| match g {
            Claimed::Exhausted(msg) => Some(msg),
            _ => None,
        })
        .collect();
    assert_eq!(ok.len(), 4, "{results:#?}");
    assert_eq!(exhausted.len(), 1, "{results:#?}");
    let mut distinct = ok.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "{results:#?}");
    assert!(ok.iter().all(|b| tiny.contains(b)), "{ok:?}");
    let msg = exhausted[0];
    assert!(
        msg.contains("no free /24 left in 10.42.0.0/22") && msg.contains("all 4 blocks"),
        "unclear exhaustion message: {msg}"
    );
    eprintln!("5 claimers on 10.42.0.0/22 ({slowest:?}): 4 blocks, and: {msg}");
    let claims = m
        .kube
        .get_json(&["meshpodcidrclaims"])
        .expect("get meshpodcidrclaims");
    assert_eq!(
        claims["items"].as_array().map(Vec::len),
        Some(4),
        "{claims}"
    );
    eprintln!("test took {:?}", m.t0.elapsed());
}
