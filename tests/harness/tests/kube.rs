//! meshd and keyctl with `--registry kube` against a real kube-apiserver v1.37.2 (built by
//! scripts/kube-bins.sh; run by `Cluster::start_kube` in the switch namespace at
//! https://198.18.0.1:6443, with kube-controller-manager's garbage collector). Every meshd
//! authenticates with its own ServiceAccount token bound to a Pod on its Node (TokenRequest, as
//! the kubelet makes for a DaemonSet pod) and has only the RBAC and admission policy of
//! `deploy/`. Need root and the binaries; run serially:
//!   cargo build --workspace --bins && cargo test -p weft-tests --test kube -- --test-threads=1

use std::time::{Duration, Instant};
use weft_tests::kube::KubeOpts;
use weft_tests::kube_mesh::KubeMesh;
use weft_tests::{Marker, Node, PingOpts, Pod};

const READY: Duration = Duration::from_secs(30);

fn setup() {
    weft_tests::set_nettool(env!("CARGO_BIN_EXE_weft-nettool"));
}

/// `n` nodes with Node objects (with `spec.podCIDRs` when `pod_cidrs`), the controller
/// manager's garbage collector on.
fn kube_cluster(n: usize, pod_cidrs: bool) -> KubeMesh {
    setup();
    KubeMesh::new(
        n,
        n,
        pod_cidrs,
        KubeOpts {
            controller_manager: true,
            ..KubeOpts::default()
        },
    )
    .expect("cluster with deploy/ applied")
}

/// Starts meshd on kube for `node` (see [`KubeMesh::start_meshd`]).
fn start(m: &KubeMesh, node: &Node) {
    m.start_meshd(node, &[], &[]).expect("meshd on kube");
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

/// The whole mesh on the API server: deploy/ applied server-side; 3 meshd with pod-bound tokens
/// and only the deploy RBAC publish MeshNodes (endpoint and pod range from their Node objects,
/// owned by them, status Ready) and form a mesh whose underlay carries only WireGuard; node-1's
/// token may not touch node-0's MeshNode, its status, revocations or rotation requests;
/// keyctl as weft-admin rotates every key under 100 Hz pings with zero loss; a Node deleted is
/// garbage-collected and leaves every peer list.
#[test]
fn kube_mesh_isolation_rotation_and_node_deletion() {
    let m = kube_cluster(3, true);
    for n in &m.c.nodes {
        start(&m, n);
        assert_eq!(n.current_pod_cidr(), n.pod_cidr, "range from spec.podCIDRs");
    }
    let pods: Vec<Pod> = (0..3)
        .map(|i| m.c.node(i).add_pod(0).expect("pod"))
        .collect();
    m.c.wait_mesh_ready(READY).expect("mesh ready");
    let marker = Marker::random();
    let cap = m.c.capture_underlay("").expect("capture");
    m.c.assert_pods_ping(&pods.iter().collect::<Vec<_>>());
    for (a, b) in [(0, 1), (1, 2), (2, 0)] {
        let r = pods[a]
            .ping(pods[b].ip, &PingOpts::count(3).pattern(&marker))
            .expect("marker ping");
        assert_eq!(r.lost(), 0, "{}", r.output);
    }
    let packets = cap.stop().expect("capture");
    m.c.assert_underlay_encrypted(&packets, &marker);

    // MeshNodes: owned by their Node, written by meshd, status Ready, columns for people.
    for n in &m.c.nodes {
        let mn = m.meshnode(&n.name).expect("MeshNode");
        let owner = &mn["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "Node", "{mn}");
        assert_eq!(
            owner["uid"],
            m.kube.node_uid(&n.name).expect("uid").as_str(),
            "{mn}"
        );
        assert_eq!(
            mn["spec"]["endpoints"][0],
            format!("{}:51820", n.underlay_ip),
            "endpoint from the Node's InternalIP"
        );
        let ready = mn["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(ready["status"], "True", "{mn}");
        let managers: Vec<&str> = mn["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f["manager"].as_str())
            .collect();
        assert!(managers.iter().all(|m| *m == "meshd"), "{managers:?}");
    }
    let table = m
        .kube
        .kubectl(&["get", "meshnodes"])
        .expect("get meshnodes");
    eprintln!("kubectl get meshnodes:\n{table}");
    for col in ["NAME", "ENDPOINT", "POD CIDR", "KEY", "READY", "AGE"] {
        assert!(table.contains(col), "no {col} column:\n{table}");
    }
    assert_eq!(table.matches("True").count(), 3, "{table}");

    // Per-node write isolation: node-1's own token against node-0's objects.
    let kc1 = m.c.node(1).dir.join("kubeconfig");
    let refusals: &[(&str, &[&str])] = &[
        (
            "patch node-0's MeshNode",
            &[
                "patch",
                "meshnode",
                "node-0",
                "--type=merge",
                "-p",
                r#"{"spec":{"endpoints":["203.0.113.1:51820"]}}"#,
            ],
        ),
        (
            "patch node-0's MeshNode status",
            &[
                "patch",
                "meshnode",
                "node-0",
                "--subresource=status",
                "--type=merge",
                "-p",
                r#"{"status":{"keyFingerprint":"evil"}}"#,
            ],
        ),
        (
            "delete node-0's MeshNode",
            &["delete", "meshnode", "node-0"],
        ),
        // NetworkPolicy enforcement reads pods, namespaces and policies; it writes none.
        (
            "label a Namespace",
            &["label", "namespace", "default", "weft-test=evil"],
        ),
        ("get a Pod's logs", &["logs", "-n", "kube-system", "nope"]),
        ("read Secrets", &["get", "secrets", "-A"]),
    ];
    for (what, args) in refusals {
        let out = m.kubectl_as(&kc1, args, b"").expect("kubectl");
        assert!(
            out.forbidden(),
            "node-1 could {what}: {} {}",
            out.stdout,
            out.stderr
        );
        eprintln!("refused as expected: {what}: {}", out.stderr.trim());
    }
    for (kind, spec) in [
        ("MeshRevocation", r#"{"revokedKeys":["AAAA"]}"#),
        ("MeshKeyRotation", r#"{"generation":99}"#),
        ("MeshPSKGeneration", r#"{"generation":99}"#),
        (
            "MeshPeer",
            r#"{"schema":1,"publicKey":"AAAA","allowedIps":["10.99.0.1/32"]}"#,
        ),
    ] {
        let name = if kind == "MeshPSKGeneration" {
            "cluster"
        } else {
            "node-0"
        };
        let obj = format!(
            r#"{{"apiVersion":"weft.dev/v1alpha1","kind":"{kind}","metadata":{{"name":"{name}"}},"spec":{spec}}}"#
        );
        let out = m
            .kubectl_as(&kc1, &["create", "-f", "-"], obj.as_bytes())
            .expect("kubectl");
        assert!(
            out.forbidden(),
            "node-1 could create a {kind}: {} {}",
            out.stdout,
            out.stderr
        );
    }
    let np = r#"{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"evil","namespace":"default"},"spec":{"podSelector":{}}}"#;
    let out = m
        .kubectl_as(&kc1, &["create", "-f", "-"], np.as_bytes())
        .expect("kubectl");
    assert!(
        out.forbidden(),
        "node-1 could create a NetworkPolicy: {} {}",
        out.stdout,
        out.stderr
    );
    // What it may do: list (and watch) them.
    for what in ["pods", "namespaces", "networkpolicies"] {
        let out = m
            .kubectl_as(&kc1, &["get", what, "-A", "-o", "name"], b"")
            .expect("kubectl");
        assert!(out.success(), "node-1 cannot list {what}: {}", out.stderr);
    }
    // ... while its own MeshNode stays writable by itself (meshd republished it above).
    assert!(m.meshnode("node-1").is_some());
    let unchanged = m.meshnode("node-0").expect("node-0");
    assert_ne!(unchanged["spec"]["endpoints"][0], "203.0.113.1:51820");

    // keyctl as weft-admin: every key rotated under 100 Hz pings, nothing lost.
    let before: Vec<String> = m.c.nodes.iter().map(public_key).collect();
    let opts = PingOpts::count(1500).interval(0.01).wait(1);
    let pings: Vec<_> = [(0, 1), (1, 2), (2, 0)]
        .iter()
        .map(|&(a, b)| (a, b, pods[a].bg_ping(pods[b].ip, &opts).expect("ping")))
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    let out = m
        .keyctl_ok(&["rotate", "--all", "--wait"])
        .expect("keyctl rotate --all --wait --registry kube");
    eprintln!(
        "keyctl rotate --all --wait on kube: {:?}\n{out}",
        t0.elapsed()
    );
    for (a, b, p) in pings {
        let r = p.finish().expect("ping");
        assert_eq!(
            r.lost(),
            0,
            "pod {a} -> {b} lost {:?} during the rotation",
            r.lost_seqs()
        );
    }
    for (i, n) in m.c.nodes.iter().enumerate() {
        assert_ne!(public_key(n), before[i], "{} kept its key", n.name);
    }
    m.keyctl_ok(&["status"]).expect("keyctl status");

    // A Node deleted: the garbage collector deletes its MeshNode, and every peer drops it.
    let t0 = Instant::now();
    m.kube.delete_node("node-2").expect("delete Node");
    let gone = weft_tests::wait_until(Duration::from_secs(60), || m.meshnode("node-2").is_none());
    let gc = t0.elapsed();
    assert!(gone, "MeshNode node-2 outlived its Node by {gc:?}");
    for i in 0..2 {
        let left = weft_tests::wait_until(Duration::from_secs(20), || {
            !peer_names(m.c.node(i)).contains(&"node-2".to_string())
        });
        assert!(
            left,
            "node-{i} still has node-2 as a peer\n{}",
            m.c.debug_report()
        );
    }
    eprintln!(
        "Node deleted -> MeshNode garbage-collected in {gc:?}, -> gone from every peer in {:?}",
        t0.elapsed()
    );
}

/// Without `spec.podCIDRs`, nodes claim blocks from --cluster-cidr through MeshPodCIDRClaims
/// named after the blocks (the API server refuses a second one with 409): 3 meshd get 3
/// distinct blocks, each held by its node; another node's token may not take them over.
#[test]
fn kube_claims_without_node_pod_cidrs() {
    let m = kube_cluster(3, false);
    for n in &m.c.nodes {
        start(&m, n);
    }
    let mut ranges: Vec<String> = m.c.nodes.iter().map(|n| n.current_pod_cidr()).collect();
    let claims = m.kube.get_json(&["meshpodcidrclaims"]).expect("claims");
    let items = claims["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 3, "{claims}");
    for it in &items {
        let block = it["spec"]["podCidr"].as_str().expect("podCidr");
        let name = it["metadata"]["name"].as_str().expect("name");
        assert_eq!(name, block.replace(['.', '/'], "-"));
    }
    ranges.sort();
    ranges.dedup();
    assert_eq!(ranges.len(), 3, "a block was claimed twice: {ranges:?}");
    let pods: Vec<Pod> = (0..3)
        .map(|i| m.c.node(i).add_pod(0).expect("pod"))
        .collect();
    m.c.wait_mesh_ready(READY).expect("mesh ready");
    m.c.assert_pods_ping(&pods.iter().collect::<Vec<_>>());
    // node-1 may neither release the block node-0 holds nor claim a block in node-0's name.
    let kc1 = m.c.node(1).dir.join("kubeconfig");
    let block0 = m.c.node(0).current_pod_cidr().replace(['.', '/'], "-");
    let out = m
        .kubectl_as(&kc1, &["delete", "meshpodcidrclaim", &block0], b"")
        .expect("kubectl");
    assert!(
        out.forbidden(),
        "node-1 released node-0's block: {} {}",
        out.stdout,
        out.stderr
    );
    let obj = r#"{"apiVersion":"weft.dev/v1alpha1","kind":"MeshPodCIDRClaim","metadata":{"name":"10-42-200-0-24"},"spec":{"node":"node-0","podCidr":"10.42.200.0/24","generation":1,"renewedAt":1}}"#;
    let out = m
        .kube
        .kubectl_output_in_netns(&m.kube.ns, &kc1, &["create", "-f", "-"], obj.as_bytes())
        .expect("kubectl");
    assert!(
        out.forbidden(),
        "node-1 claimed a block for node-0: {} {}",
        out.stdout,
        out.stderr
    );

    // node-0's Node deleted and created again under the same name (a re-registered node): the
    // garbage collector deletes its MeshNode, then meshd writes it again owned by the new Node,
    // and the peers take it back.
    let old_uid = m.kube.node_uid("node-0").expect("uid");
    m.kube.delete_node("node-0").expect("delete Node");
    let gone = weft_tests::wait_until(Duration::from_secs(30), || m.meshnode("node-0").is_none());
    assert!(gone, "MeshNode node-0 outlived its Node");
    let t0 = Instant::now();
    let new_uid = m
        .kube
        .create_node("node-0", m.c.node(0).underlay_ip, &[])
        .expect("Node again");
    assert_ne!(old_uid, new_uid);
    let back = weft_tests::wait_until(Duration::from_secs(30), || {
        m.meshnode("node-0")
            .is_some_and(|mn| mn["metadata"]["ownerReferences"][0]["uid"] == new_uid.as_str())
    });
    assert!(
        back,
        "MeshNode node-0 not written again under the new Node\n{}",
        m.c.debug_report()
    );
    let peered = weft_tests::wait_until(Duration::from_secs(20), || {
        peer_names(m.c.node(1)).contains(&"node-0".to_string())
    });
    assert!(
        peered,
        "node-1 did not take node-0 back\n{}",
        m.c.debug_report()
    );
    eprintln!(
        "Node re-created -> MeshNode back under the new owner and peered in {:?}",
        t0.elapsed()
    );
    m.c.assert_pods_ping(&pods.iter().collect::<Vec<_>>());
}

/// The API server stopped for 30 s under 20 Hz pod pings: nothing lost, every peer kept, status
/// says unreachable; a meshd restarted during the outage comes up from its cache and routes;
/// after the API server returns every node is connected again. Then node-1's state dir is
/// wiped and meshd restarted: it comes back with a new key, which every peer takes, and no
/// peer keeps the old one.
#[test]
fn kube_outage_cache_and_key_change() {
    let m = kube_cluster(3, true);
    for n in &m.c.nodes {
        start(&m, n);
    }
    let pods: Vec<Pod> = (0..3)
        .map(|i| m.c.node(i).add_pod(0).expect("pod"))
        .collect();
    m.c.wait_mesh_ready(READY).expect("mesh ready");
    // Every node has written its peer cache.
    weft_tests::wait_until(Duration::from_secs(10), || {
        m.c.nodes
            .iter()
            .all(|n| n.state_dir().join("peers.json").exists())
    });
    let opts = PingOpts::count(20 * 45).interval(0.05).wait(1);
    let pings: Vec<_> = [(0, 1), (1, 2), (2, 0), (1, 0)]
        .iter()
        .map(|&(a, b)| (a, b, pods[a].bg_ping(pods[b].ip, &opts).expect("ping")))
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    m.kube.stop_apiserver().expect("stop API server");
    let down = Instant::now();
    std::thread::sleep(Duration::from_secs(8));
    let st = m.c.node(0).status_json().expect("status");
    assert!(
        st["registry"]
            .as_str()
            .unwrap_or("")
            .starts_with("unreachable"),
        "status during the outage: {}",
        st["registry"]
    );
    assert_eq!(
        peer_names(m.c.node(0)).len(),
        2,
        "a peer was dropped during the outage"
    );
    // node-2 restarts while the API server is down: it must route from its cache.
    m.c.node(2).stop_meshd(libc::SIGTERM).expect("stop meshd");
    m.c.node(2)
        .restart_meshd()
        .expect("restart meshd during the outage");
    let r = pods[2]
        .ping(pods[0].ip, &PingOpts::count(5).interval(0.2).wait(2))
        .expect("ping");
    assert!(
        r.received >= 3,
        "node-2 restarted during the outage cannot route: {}",
        r.output
    );
    let rest = Duration::from_secs(30).saturating_sub(down.elapsed());
    std::thread::sleep(rest);
    m.kube.start_apiserver().expect("start API server");
    eprintln!("API server down for {:?}", down.elapsed());
    for n in &m.c.nodes {
        let back = weft_tests::wait_until(Duration::from_secs(30), || {
            n.status_json()
                .ok()
                .and_then(|s| s["registry"].as_str().map(|r| r == "connected"))
                .unwrap_or(false)
        });
        assert!(back, "{} did not reconnect: {}", n.name, m.c.debug_report());
    }
    for (a, b, p) in pings {
        let r = p.finish().expect("ping");
        if a == 2 || b == 2 {
            // node-2's meshd restarted: its pings may lose what was in flight then.
            eprintln!("pod {a} -> {b} across node-2's restart: lost {}", r.lost());
            continue;
        }
        assert_eq!(
            r.lost(),
            0,
            "pod {a} -> {b} lost {:?} during the outage",
            r.lost_seqs()
        );
    }

    // A new key after a wiped state dir: re-peered everywhere, no stale peer.
    let n1 = m.c.node(1);
    let old = public_key(n1);
    n1.stop_meshd(libc::SIGTERM).expect("stop");
    std::fs::remove_dir_all(n1.state_dir()).expect("wipe state dir");
    std::fs::create_dir_all(n1.state_dir()).expect("state dir");
    start(&m, n1);
    let new = public_key(n1);
    assert_ne!(old, new);
    for i in [0, 2] {
        let n = m.c.node(i);
        let ok = weft_tests::wait_until(Duration::from_secs(20), || {
            n.status_peer("node-1")
                .ok()
                .flatten()
                .and_then(|p| p["publicKey"].as_str().map(|k| k == new))
                .unwrap_or(false)
        });
        assert!(
            ok,
            "node-{i} did not take node-1's new key\n{}",
            m.c.debug_report()
        );
        let st = n.status_json().expect("status").to_string();
        assert!(!st.contains(&old), "node-{i} still holds node-1's old key");
    }
    m.c.wait_mesh_ready(READY).expect("mesh ready again");
    m.c.assert_pods_ping(&pods.iter().collect::<Vec<_>>());
}

/// Link health as a Kubernetes resource: with pods pinging node-2 at 1 Hz, the other nodes'
/// MeshNodeHealth objects show their link to node-2 down within 30 s of node-2's meshd being
/// SIGSTOPped (it sends and hears nothing back, whatever its last handshake), and up again
/// within 10 s of SIGCONT. `kubectl get meshnodehealths` names the down peers.
#[test]
fn kube_link_health_follows_a_stopped_node() {
    let m = kube_cluster(3, true);
    for n in &m.c.nodes {
        start(&m, n);
    }
    let pods: Vec<Pod> = (0..3)
        .map(|i| m.c.node(i).add_pod(0).expect("pod"))
        .collect();
    m.c.wait_mesh_ready(READY).expect("mesh ready");
    let down_peers = |node: &str| -> Option<String> {
        m.kube
            .get_json(&["meshnodehealth", node])
            .ok()
            .and_then(|h| h["spec"]["summary"]["downPeers"].as_str().map(String::from))
    };
    let all_up = weft_tests::wait_until(Duration::from_secs(20), || {
        (0..3).all(|i| down_peers(&format!("node-{i}")).is_some_and(|d| d.is_empty()))
    });
    assert!(
        all_up,
        "health reports not all up:\n{}",
        m.kube.kubectl(&["get", "mnh"]).unwrap_or_default()
    );
    let opts = PingOpts::count(80).interval(1.0).wait(1);
    let pings: Vec<_> = [0, 1]
        .iter()
        .map(|&a| pods[a].bg_ping(pods[2].ip, &opts).expect("ping"))
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let pid = m.c.node(2).meshd_pid().expect("node-2 meshd pid");
    // SAFETY: kill(2) on a child's pid with a valid signal number.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    let stopped = Instant::now();
    let down = weft_tests::wait_until(Duration::from_secs(30), || {
        [0, 1].iter().all(|i| {
            down_peers(&format!("node-{i}")).is_some_and(|d| d.split(',').any(|p| p == "node-2"))
        })
    });
    let took = stopped.elapsed();
    let table = m
        .kube
        .kubectl(&["get", "meshnodehealths"])
        .unwrap_or_default();
    eprintln!("kubectl get meshnodehealths after SIGSTOP of node-2 ({took:?}):\n{table}");
    // node-2 stays stopped for the whole 30 s window; a report is written at most every 10 s,
    // so "up" can follow "down" no sooner than 10 s after it.
    std::thread::sleep(Duration::from_secs(30).saturating_sub(stopped.elapsed()));
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    assert!(
        down,
        "the link to node-2 not reported down within 30 s:\n{table}"
    );
    assert!(
        table.contains("DOWN PEERS") && table.contains("node-2"),
        "{table}"
    );
    let resumed = Instant::now();
    let up = weft_tests::wait_until(Duration::from_secs(10), || {
        [0, 1]
            .iter()
            .all(|i| down_peers(&format!("node-{i}")).is_some_and(|d| d.is_empty()))
    });
    eprintln!(
        "link to node-2: down {took:?} after SIGSTOP, up {:?} after SIGCONT",
        resumed.elapsed()
    );
    assert!(
        up,
        "the link to node-2 not back up within 10 s of SIGCONT:\n{}",
        m.kube.kubectl(&["get", "mnh"]).unwrap_or_default()
    );
    for p in pings {
        let _ = p.finish();
    }
}
