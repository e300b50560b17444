//! The real-node tier: weft deployed by its own DaemonSet (`kubectl apply -k` of an overlay of
//! `deploy/` that sets only the image tag and pull policy) on kubelet nodes, each a network
//! namespace with its own containerd and kubelet v1.37.2 (see `weft_tests::kubelet`). Pods get
//! their addresses from weft-cni, called by containerd. The assertions are those of
//! tests/e2e/k3d.sh: both call tests/e2e/lib.sh.
//!
//! 1. `daemonset_rolls_out_and_pods_mesh_across_kubelet_nodes`: rollout, own MeshNodes, write
//!    isolation with the real pod tokens, 6 pods over 3 nodes reach each other, no plaintext,
//!    CNI_ARGS reached weft-cni; pods deleted and 100 create/delete cycles leave nothing behind.
//! 2. `rotation_and_rolling_update_under_ping`: `keyctl rotate --all --wait` from outside the
//!    cluster under 100 Hz pod-to-pod ping loses nothing; a rolling update of the DaemonSet under
//!    20 Hz ping: loss and dark time per node, no plaintext.
//! 3. `node_drained_deleted_and_a_new_node_joins`: a drained and deleted node vanishes from every
//!    meshd; a new node's pods are reachable within 10 s of its kubelet going Ready.
//!
//! Needs root, the binaries of scripts/kube-bins.sh and the packages of
//! scripts/install-test-deps.sh; run serially:
//!   cargo build --workspace --bins && cargo test -p weft-tests --test kubelet -- --test-threads=1

use serde_json::Value;
use std::time::{Duration, Instant};
use weft_tests::kubelet::{repo_root, RealCluster, BUSYBOX_IMAGE, WEFT_IMAGE};
use weft_tests::{wait_until, BgPing, Marker, PingOpts, PingResult};

const NS: &str = "default";

fn setup() {
    weft_tests::set_nettool(env!("CARGO_BIN_EXE_weft-nettool"));
}

/// Applies the test overlay of deploy/ with weft's image at `tag` (tests/e2e/lib.sh
/// `e2e_write_overlay` and `e2e_apply_overlay`, as tests/e2e/k3d.sh does): the image built
/// here and `imagePullPolicy: Never`, nothing else.
fn apply_overlay(rc: &RealCluster, tag: &str) {
    let overlay = rc.dir.join(format!("overlay-{tag}")).display().to_string();
    let deploy = repo_root().join("deploy").display().to_string();
    let (name, _) = WEFT_IMAGE.split_once(':').expect("image has a tag");
    let image = format!("{name}:{tag}");
    rc.e2e(&["e2e_write_overlay", &overlay, &deploy, &image])
        .expect("writing the overlay");
    rc.e2e(&["e2e_apply_overlay", &overlay, &image])
        .unwrap_or_else(|e| panic!("applying the overlay: {e:#}\n{}", rc.debug_report()));
}

/// A control plane, `kubelets` of `netns_nodes` nodes started, weft applied and rolled out.
fn cluster_with_weft(netns_nodes: usize, kubelets: usize) -> RealCluster {
    setup();
    let mut rc = RealCluster::new(netns_nodes).expect("control plane and images");
    for i in 0..kubelets {
        rc.start_node(i).expect("kubelet node");
    }
    let t = Instant::now();
    apply_overlay(&rc, "test");
    if let Err(e) = rc.e2e(&["e2e_wait_daemonset", "weft-system", "weft", "240"]) {
        panic!("{e:#}\n{}", rc.debug_report());
    }
    eprintln!(
        "kubelet-tier: DaemonSet ready on {kubelets} nodes {:.1} s after apply",
        t.elapsed().as_secs_f64()
    );
    rc.e2e(&["e2e_wait_meshnodes", &kubelets.to_string(), "120"])
        .expect("MeshNodes Ready");
    rc.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "node",
        "--all",
        "--timeout=120s",
    ])
    .unwrap_or_else(|e| panic!("nodes Ready: {e:#}\n{}", rc.debug_report()));
    eprintln!(
        "kubelet-tier: every node Ready {:.1} s after apply",
        t.elapsed().as_secs_f64()
    );
    rc
}

/// A Deployment of `replicas` busybox pods spread over the nodes (at most one more on any node).
fn deploy_workload(rc: &RealCluster, name: &str, replicas: usize) {
    let yaml = format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: {NS}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}, app.kubernetes.io/name: weft-e2e}}
    spec:
      terminationGracePeriodSeconds: 1
      automountServiceAccountToken: false
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: DoNotSchedule
          labelSelector:
            matchLabels: {{app: {name}}}
      containers:
        - name: main
          image: {BUSYBOX_IMAGE}
          imagePullPolicy: Never
          command: ["sleep", "86400"]
"#
    );
    rc.cp.apply_yaml(&yaml).expect("applying the Deployment");
    if let Err(e) = rc.kubectl(&[
        "-n",
        NS,
        "rollout",
        "status",
        &format!("deployment/{name}"),
        "--timeout=180s",
    ]) {
        panic!(
            "Deployment {name} not rolled out: {e:#}\n{}",
            rc.debug_report()
        );
    }
}

/// (pod name, node name, pod IP) of the pods with label app=`app`.
fn pods_of(rc: &RealCluster, app: &str) -> Vec<PodInfo> {
    let list = rc
        .get_json(&["pods", "-n", NS, "-l", &format!("app={app}")])
        .expect("pods");
    let mut out: Vec<PodInfo> = list["items"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (
                s(&p["metadata"]["name"]),
                s(&p["spec"]["nodeName"]),
                s(&p["status"]["podIP"]),
            )
        })
        .collect();
    out.sort();
    out
}

/// weft deployed by its DaemonSet on 3 kubelet nodes: the DaemonSet rolls out (readiness probe),
/// each meshd publishes its own MeshNode (endpoint = the node's InternalIP, pod CIDR = the
/// Node's spec.podCIDRs) and its pod-bound token may write nothing of another node's; a
/// Deployment of 6 pods spread over the nodes gets addresses from weft-cni through containerd,
/// every pod reaches every pod, and a TCP marker between pods on different nodes never crosses
/// the underlay in plaintext.
#[test]
fn daemonset_rolls_out_and_pods_mesh_across_kubelet_nodes() {
    let rc = cluster_with_weft(3, 3);

    // Each MeshNode: the node's own endpoint and pod range.
    for n in &rc.nodes {
        let mn = rc.get_json(&["meshnode", &n.name]).expect("MeshNode");
        let node = rc.get_json(&["node", &n.name]).expect("Node");
        let endpoint = mn["spec"]["endpoints"][0].as_str().unwrap_or_default();
        assert!(
            endpoint.starts_with(&format!("{}:", n.ip)),
            "MeshNode {} endpoint {endpoint}, want the node's InternalIP {}",
            n.name,
            n.ip
        );
        assert_eq!(
            mn["spec"]["podCidrs"], node["spec"]["podCIDRs"],
            "MeshNode {} pod CIDRs vs Node.spec.podCIDRs",
            n.name
        );
    }

    // The DaemonSet's observability: metrics on the node IP, `wg show` on the node.
    for n in &rc.nodes {
        let m = n
            .metrics()
            .unwrap_or_else(|e| panic!("{e:#}\n{}", rc.debug_report()));
        let others = rc.nodes.len() - 1;
        assert!(
            m.contains(&format!("\nweft_peers {others}\n"))
                && m.contains("\nweft_registry_connected 1\n"),
            "{}: metrics\n{m}",
            n.name
        );
        let dump = n.wg(&["show", "weft0", "dump"]).expect("wg show");
        let peers: Vec<&str> = dump.lines().skip(1).collect();
        assert_eq!(
            peers.len(),
            others,
            "{}: wg show weft0 dump\n{dump}",
            n.name
        );
        for o in rc.nodes.iter().filter(|o| o.name != n.name) {
            assert!(
                dump.contains(&format!("\t{}:51820\t", o.ip)),
                "{}: no peer at {}:51820 in\n{dump}",
                n.name,
                o.ip
            );
        }
    }

    // Write isolation with the real pod-bound tokens of the running meshd pods.
    let meshd_pod = |node: &str| -> String {
        rc.kubectl(&[
            "-n",
            "weft-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=weft",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])
        .expect("meshd pod")
    };
    let (a, b) = (&rc.nodes[0].name, &rc.nodes[1].name);
    let pod_a = meshd_pod(a);
    let tokdir = rc.dir.join("tokens");
    std::fs::create_dir_all(&tokdir).expect("dir");
    rc.e2e(&[
        "e2e_check_admission",
        &pod_a,
        a,
        b,
        &tokdir.display().to_string(),
    ])
    .expect("a meshd pod's token may write only its own node's objects");

    // Six pods over three nodes.
    let t = Instant::now();
    deploy_workload(&rc, "mesh-ping", 6);
    eprintln!(
        "kubelet-tier: 6 pods Ready {:.1} s after the Deployment was applied",
        t.elapsed().as_secs_f64()
    );
    let pods = pods_of(&rc, "mesh-ping");
    assert_eq!(pods.len(), 6, "{pods:?}");
    for n in &rc.nodes {
        let here = pods.iter().filter(|p| p.1 == n.name).count();
        assert_eq!(here, 2, "pods per node: {pods:?}");
    }
    for (name, node, ip) in &pods {
        let cidr = rc.get_json(&["node", node]).expect("node")["spec"]["podCIDR"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let net: ipnet::Ipv4Net = cidr.parse().expect("podCIDR");
        let addr: std::net::Ipv4Addr = ip.parse().expect("pod IP");
        assert!(net.contains(&addr), "{name} on {node}: {ip} not in {cidr}");
    }

    // Every pod reaches every pod.
    let t = Instant::now();
    for (from, _, _) in &pods {
        for (to, _, ip) in &pods {
            if from != to {
                rc.e2e(&["e2e_assert_ping", from, ip, "1"])
                    .unwrap_or_else(|e| panic!("{from} -> {to}: {e:#}"));
            }
        }
    }
    eprintln!(
        "kubelet-tier: 30 pod-to-pod pings (6 pods, 3 nodes) all answered in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // A marker over TCP between pods on different nodes: never in plaintext on the underlay.
    let from = &pods[0];
    let to = pods
        .iter()
        .find(|p| p.1 != from.1)
        .expect("a pod on another node");
    let marker = Marker::random();
    let marker_s = String::from_utf8_lossy(marker.ascii()).into_owned();
    let cap = rc.cluster.capture_underlay("").expect("underlay capture");
    rc.e2e(&["e2e_send_marker", &from.0, &to.0, &to.2, &marker_s])
        .expect("marker over TCP");
    let packets = cap.stop().expect("capture");
    assert_no_plaintext(&packets, &marker, "a TCP marker between pods");
    assert!(
        packets.wireguard_data_count() > 0,
        "no WireGuard data on the underlay: the capture saw nothing"
    );
    eprintln!(
        "kubelet-tier: {} packets on the underlay, {} WireGuard data, marker absent",
        packets.len(),
        packets.wireguard_data_count()
    );

    // The runtime passed K8S_POD_NAMESPACE / K8S_POD_NAME: weft-cni recorded them.
    for n in &rc.nodes {
        let allocs = n.cni_allocations().expect("allocations");
        for (name, node, ip) in pods.iter().filter(|p| p.1 == n.name) {
            let rec = allocs
                .iter()
                .find(|(a, _)| a == ip)
                .unwrap_or_else(|| panic!("{name} on {node}: no allocation for {ip}: {allocs:?}"));
            assert_eq!(
                rec.1.get(2).map(String::as_str),
                Some(format!("{NS}/{name}").as_str()),
                "allocation file of {ip}: {:?}",
                rec.1
            );
        }
    }

    // Pods deleted: DEL ran, the addresses went back, no veth is left.
    rc.kubectl(&["-n", NS, "delete", "deployment", "mesh-ping", "--wait=true"])
        .expect("delete Deployment");
    wait_pods_gone(&rc, "mesh-ping");
    assert_nothing_left(&rc, "after the Deployment was deleted");

    // 100 pod create/delete cycles: 5 rounds of 20 pods over the 3 nodes.
    let t = Instant::now();
    let mut addresses = std::collections::BTreeSet::new();
    for round in 0..5 {
        deploy_workload(&rc, "churn", 20);
        let pods = pods_of(&rc, "churn");
        assert_eq!(pods.len(), 20, "round {round}: {pods:?}");
        addresses.extend(pods.iter().map(|p| p.2.clone()));
        rc.kubectl(&["-n", NS, "delete", "deployment", "churn", "--wait=true"])
            .expect("delete Deployment");
        wait_pods_gone(&rc, "churn");
        assert_nothing_left(&rc, &format!("after churn round {round}"));
    }
    eprintln!(
        "kubelet-tier: 100 pod create/delete cycles in {:.1} s ({} distinct addresses), \
         nothing left behind",
        t.elapsed().as_secs_f64(),
        addresses.len()
    );
}

/// Nothing of the pods' traffic on the underlay but WireGuard: not the marker, no pod address.
fn assert_no_plaintext(packets: &weft_tests::Packets, marker: &Marker, what: &str) {
    assert!(
        !packets.contains_marker(marker),
        "{what}: the marker crossed the underlay in plaintext"
    );
    let pod_addrs = packets.ipv4_touching(std::net::Ipv4Addr::new(10, 42, 0, 0), 16);
    assert!(
        pod_addrs.is_empty(),
        "{what}: pod addresses on the underlay: {:?}",
        &pod_addrs[..pod_addrs.len().min(10)]
    );
    assert!(
        packets.wireguard_data_count() > 0,
        "{what}: no WireGuard data on the underlay: the capture saw nothing"
    );
}

fn wait_pods_gone(rc: &RealCluster, app: &str) {
    let gone = wait_until(Duration::from_secs(120), || {
        rc.get_json(&["pods", "-n", NS, "-l", &format!("app={app}")])
            .is_ok_and(|l| l["items"].as_array().is_some_and(Vec::is_empty))
    });
    assert!(gone, "pods of {app} still there\n{}", rc.debug_report());
}

/// No weft-cni veth (`wft…`) and no address held on any node. The kubelet removes a sandbox
/// (and so runs DEL) shortly after its pod object is gone, so this waits up to 30 s.
fn assert_nothing_left(rc: &RealCluster, when: &str) {
    let mut last = String::new();
    let clean = wait_until(Duration::from_secs(30), || {
        last.clear();
        for n in &rc.nodes {
            let veths = n.links_with_prefix("wft").unwrap_or_default();
            let allocs = n.cni_allocations().unwrap_or_default();
            if !veths.is_empty() || !allocs.is_empty() {
                last.push_str(&format!(
                    "{}: veths {veths:?}, allocations {allocs:?}\n",
                    n.name
                ));
            }
        }
        last.is_empty()
    });
    assert!(clean, "{when}: left behind:\n{last}");
}

/// Pods named `PREFIX-<node>` pinned to each node (tests/e2e/lib.sh `e2e_run_pod`), Ready:
/// (pod, node, IP).
fn pinned_pods(rc: &RealCluster, prefix: &str, nodes: &[String]) -> Vec<PodInfo> {
    for n in nodes {
        rc.e2e(&[
            "e2e_run_pod",
            &format!("{prefix}-{n}"),
            n,
            BUSYBOX_IMAGE,
            "Never",
        ])
        .expect("pod");
    }
    nodes
        .iter()
        .map(|n| {
            let pod = format!("{prefix}-{n}");
            rc.e2e(&["e2e_wait_pod", &pod, "120"])
                .unwrap_or_else(|e| panic!("{e:#}\n{}", rc.debug_report()));
            let ip = rc
                .e2e(&["e2e_pod_ip", &pod])
                .expect("pod IP")
                .trim()
                .to_string();
            (pod, n.clone(), ip)
        })
        .collect()
}

type PodInfo = (String, String, String);

/// A ping from one pod's network namespace to another pod's IP: which nodes, when it began.
struct FlowMeta {
    from: String,
    to: String,
    started: Instant,
    interval: f64,
}

/// A [`FlowMeta`] with its ping running in the background.
struct Flow {
    meta: FlowMeta,
    ping: BgPing,
}

impl Flow {
    fn start(rc: &RealCluster, from: &PodInfo, to: &PodInfo, opts: &PingOpts) -> Flow {
        let ns = rc.pod_netns(NS, &from.0).expect("pod netns");
        let started = Instant::now();
        let ping = BgPing::start(&ns, &to.2, opts).expect("ping");
        let meta = FlowMeta {
            from: from.1.clone(),
            to: to.1.clone(),
            started,
            interval: opts.interval,
        };
        Flow { meta, ping }
    }

    fn stop(self) -> (FlowMeta, PingResult) {
        (self.meta, self.ping.stop())
    }
}

/// Runs of unanswered echo requests up to the last answered one: (first seq, count). The
/// request in flight when ping is stopped is not counted.
fn gaps(r: &PingResult) -> Vec<(u32, u32)> {
    let Some(&last) = r.replied_seqs.iter().next_back() else {
        return vec![(1, r.transmitted.max(1))];
    };
    let mut out: Vec<(u32, u32)> = Vec::new();
    for seq in 1..last {
        if !r.replied_seqs.contains(&seq) {
            match out.last_mut() {
                Some((first, n)) if *first + *n == seq => *n += 1,
                _ => out.push((seq, 1)),
            }
        }
    }
    out
}

/// The figure the zero-loss upgrade work will drive to zero: per node, the echo requests lost
/// on the flows touching it while its meshd pod was being replaced, and the longest run of
/// them in seconds (how long the node was dark).
struct DarkReport {
    node: String,
    lost: u32,
    dark_secs: f64,
}

fn dark_per_node(
    flows: &[(FlowMeta, PingResult)],
    windows: &[(String, Instant, Instant)],
) -> (Vec<DarkReport>, Vec<String>) {
    let mut reports: Vec<DarkReport> = windows
        .iter()
        .map(|(n, _, _)| DarkReport {
            node: n.clone(),
            lost: 0,
            dark_secs: 0.0,
        })
        .collect();
    let mut unattributed = Vec::new();
    for (f, r) in flows {
        for (first, n) in gaps(r) {
            let at = f.started + Duration::from_secs_f64(f64::from(first - 1) * f.interval);
            let secs = f64::from(n) * f.interval;
            // The update of one of the flow's two nodes nearest to the gap (the observed
            // window is widened by 2 s before and 5 s after: the pod list is polled).
            let distance = |from: Instant, to: Instant| {
                if at < from {
                    from - at
                } else {
                    at.saturating_duration_since(to)
                }
            };
            let hit = windows
                .iter()
                .enumerate()
                .filter(|(_, (node, from, to))| {
                    (node == &f.from || node == &f.to)
                        && at + Duration::from_secs(2) >= *from
                        && at <= *to + Duration::from_secs(5)
                })
                .min_by_key(|(_, (_, from, to))| distance(*from, *to))
                .map(|(i, _)| i);
            match hit {
                Some(i) => {
                    reports[i].lost += n;
                    reports[i].dark_secs = reports[i].dark_secs.max(secs);
                }
                None => unattributed.push(format!(
                    "{} -> {}: {n} lost from seq {first} ({:.1} s after the ping began)",
                    f.from,
                    f.to,
                    at.duration_since(f.started).as_secs_f64()
                )),
            }
        }
    }
    (reports, unattributed)
}

/// The weft pods per node: (node, pod name, ready, being deleted).
fn weft_pods(rc: &RealCluster) -> Vec<(String, String, bool, bool)> {
    let Ok(list) = rc.get_json(&[
        "pods",
        "-n",
        "weft-system",
        "-l",
        "app.kubernetes.io/name=weft",
    ]) else {
        return Vec::new();
    };
    list["items"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let ready = p["status"]["conditions"]
                .as_array()
                .map(|a| a.as_slice())
                .unwrap_or_default()
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            (
                p["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                ready,
                !p["metadata"]["deletionTimestamp"].is_null(),
            )
        })
        .collect()
}

/// keyctl rotate --all --wait from outside the cluster under 100 Hz pod-to-pod ping: nothing
/// lost. Then a rolling update of the DaemonSet (new image tag, same binaries) under 20 Hz ping
/// with a payload marker: per node, what was lost and how long it was dark; the marker never
/// crosses the underlay in plaintext.
#[test]
fn rotation_and_rolling_update_under_ping() {
    let rc = cluster_with_weft(3, 3);
    let names: Vec<String> = rc.nodes.iter().map(|n| n.name.clone()).collect();
    let pods = pinned_pods(&rc, "ring", &names);
    // A ring: the pod on node i pings the pod on node i+1.
    let pairs: Vec<(&PodInfo, &PodInfo)> = (0..pods.len())
        .map(|i| (&pods[i], &pods[(i + 1) % pods.len()]))
        .collect();
    let ring = |opts: &PingOpts| -> Vec<Flow> {
        pairs
            .iter()
            .map(|(from, to)| Flow::start(&rc, from, to, opts))
            .collect()
    };
    let assert_ring = |when: &str| {
        for (from, to) in &pairs {
            rc.e2e(&["e2e_assert_ping", &from.0, &to.2, "3"])
                .unwrap_or_else(|e| panic!("{when}: {e:#}"));
        }
    };
    assert_ring("before the rotation");

    // Rotation at 100 Hz, both ways round the ring, asserted as tests/e2e/k3d.sh does: keyctl
    // as a user bound to weft-admin, from outside the cluster.
    let gens_before = rc.e2e(&["e2e_meshnode_generations"]).expect("generations");
    for (from, to) in &pairs {
        rc.e2e(&["e2e_ping_start", &from.0, &to.2, "0.01"])
            .expect("ping start");
    }
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    let out = rc
        .keyctl(
            &["rotate", "--all", "--wait", "--timeout", "120"],
            Duration::from_secs(150),
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", rc.debug_report()));
    let rotate_secs = t.elapsed().as_secs_f64();
    eprintln!("{out}");
    std::thread::sleep(Duration::from_secs(2));
    for (from, to) in &pairs {
        let log = rc.dir.join(format!("rotation-ping-{}.log", from.0));
        let log_s = log.display().to_string();
        rc.e2e(&["e2e_ping_stop", &from.0, &log_s])
            .expect("ping stop");
        let what = format!(
            "rotation ({rotate_secs:.1} s): {} -> {} at 100 Hz",
            from.1, to.1
        );
        rc.e2e(&["e2e_assert_no_ping_loss", &log_s, "300", &what])
            .unwrap_or_else(|e| panic!("{e:#}\n{}", rc.debug_report()));
    }
    let gens_after = rc.e2e(&["e2e_meshnode_generations"]).expect("generations");
    let (bf, af) = (rc.dir.join("gens-before"), rc.dir.join("gens-after"));
    std::fs::write(&bf, gens_before).expect("write");
    std::fs::write(&af, gens_after).expect("write");
    rc.e2e(&[
        "e2e_assert_generations_increased",
        &bf.display().to_string(),
        &af.display().to_string(),
    ])
    .expect("every node rotated");

    // Rolling update to a new tag of the same image.
    for n in &rc.nodes {
        n.ctr(&[
            "images",
            "tag",
            WEFT_IMAGE,
            &WEFT_IMAGE.replace(":test", ":test2"),
        ])
        .expect("ctr images tag");
    }
    let before: Vec<(String, String, bool, bool)> = weft_pods(&rc);
    let marker = Marker::random();
    let cap = rc.cluster.capture_underlay("").expect("underlay capture");
    let flows = ring(
        &PingOpts::count(100_000)
            .interval(0.05)
            .wait(1)
            .pattern(&marker),
    );
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    apply_overlay(&rc, "test2");
    // Per node: when its old meshd pod began to go, and when its new one was Ready.
    let mut windows: Vec<(String, Option<Instant>, Option<Instant>)> =
        names.iter().map(|n| (n.clone(), None, None)).collect();
    let old: Vec<&String> = before.iter().map(|p| &p.1).collect();
    let done = wait_until(Duration::from_secs(300), || {
        let now = Instant::now();
        let cur = weft_pods(&rc);
        for w in windows.iter_mut() {
            let mine: Vec<&(String, String, bool, bool)> =
                cur.iter().filter(|p| p.0 == w.0).collect();
            let old_going = mine.iter().any(|p| old.contains(&&p.1) && p.3)
                || !mine.iter().any(|p| old.contains(&&p.1));
            if w.1.is_none() && old_going {
                w.1 = Some(now);
            }
            if w.2.is_none() && mine.iter().any(|p| !old.contains(&&p.1) && p.2) {
                w.2 = Some(now);
            }
        }
        windows.iter().all(|w| w.1.is_some() && w.2.is_some())
    });
    assert!(
        done,
        "rolling update not finished in 300 s: {windows:?}\n{}",
        rc.debug_report()
    );
    let update_secs = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(5));
    let results: Vec<(FlowMeta, PingResult)> = flows.into_iter().map(Flow::stop).collect();
    let packets = cap.stop().expect("capture");
    let windows: Vec<(String, Instant, Instant)> = windows
        .into_iter()
        .map(|(n, a, b)| (n, a.unwrap_or(t), b.unwrap_or(t)))
        .collect();
    let (reports, unattributed) = dark_per_node(&results, &windows);
    eprintln!("kubelet-tier: rolling update of 3 nodes in {update_secs:.1} s under 20 Hz ping:");
    for (f, r) in &results {
        eprintln!(
            "kubelet-tier:   {} -> {}: {} sent, {} answered",
            f.from, f.to, r.transmitted, r.received
        );
    }
    for (d, (_, from, to)) in reports.iter().zip(&windows) {
        eprintln!(
            "kubelet-tier:   {}: {} echo requests lost on its flows, dark {:.2} s (old meshd pod \
             going to new one Ready: {:.1} s)",
            d.node,
            d.lost,
            d.dark_secs,
            to.saturating_duration_since(*from).as_secs_f64()
        );
    }
    assert!(
        unattributed.is_empty(),
        "losses outside any node's update: {unattributed:?}"
    );
    assert_no_plaintext(&packets, &marker, "20 Hz pings during the rolling update");
    for (f, r) in &results {
        assert!(
            r.received > 0,
            "{} -> {}: nothing answered after the update",
            f.from,
            f.to
        );
    }
    // Everything answers again.
    assert_ring("after the rolling update");
}

/// A node drained and deleted: its MeshNode is garbage-collected and its peer leaves every
/// meshd. A new node joins: the DaemonSet's meshd runs there, and a pod on it answers pods on
/// the other nodes within 10 s of its kubelet going Ready.
#[test]
fn node_drained_deleted_and_a_new_node_joins() {
    let mut rc = cluster_with_weft(4, 3);
    let names: Vec<String> = rc.nodes.iter().map(|n| n.name.clone()).collect();
    let pods = pinned_pods(&rc, "drain", &names);
    let gone = names[2].clone();
    for n in &rc.nodes[..2] {
        let peers = n.meshd_peers().expect("peers");
        assert!(peers.contains(&gone), "{} peers {peers:?}", n.name);
    }

    let t = Instant::now();
    rc.kubectl(&[
        "drain",
        &gone,
        "--ignore-daemonsets",
        "--force",
        "--delete-emptydir-data",
        "--timeout=90s",
    ])
    .unwrap_or_else(|e| panic!("drain: {e:#}\n{}", rc.debug_report()));
    let drained = t.elapsed().as_secs_f64();
    rc.stop_node(&gone).expect("stop the node");
    let t = Instant::now();
    rc.kubectl(&["delete", "node", &gone]).expect("delete node");
    let mn_gone = wait_until(Duration::from_secs(60), || {
        rc.kubectl(&["get", "meshnode", &gone]).is_err()
    });
    assert!(
        mn_gone,
        "MeshNode {gone} not garbage-collected\n{}",
        rc.debug_report()
    );
    let mn_secs = t.elapsed().as_secs_f64();
    let peers_gone = wait_until(Duration::from_secs(60), || {
        rc.nodes
            .iter()
            .all(|n| n.meshd_peers().is_ok_and(|p| !p.contains(&gone)))
    });
    assert!(
        peers_gone,
        "{gone} still a peer somewhere\n{}",
        rc.debug_report()
    );
    let peer_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "kubelet-tier: {gone} drained in {drained:.1} s; after `kubectl delete node`: MeshNode gone \
         {mn_secs:.1} s, peer gone from every meshd {peer_secs:.1} s"
    );
    rc.e2e(&["e2e_assert_ping", &pods[0].0, &pods[1].2, "3"])
        .expect("the others still mesh");

    // A new node joins: a pod is waiting for it before its kubelet starts.
    let newcomer = rc.cluster.node(3).name.clone();
    rc.e2e(&[
        "e2e_run_pod",
        &format!("join-{newcomer}"),
        &newcomer,
        BUSYBOX_IMAGE,
        "Never",
    ])
    .expect("pod for the new node");
    rc.start_node(3).expect("new kubelet node");
    let ready_at = {
        let ok = wait_until(Duration::from_secs(180), || {
            rc.kubectl(&[
                "get",
                "node",
                &newcomer,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])
            .is_ok_and(|s| s.trim() == "True")
        });
        assert!(ok, "{newcomer} not Ready\n{}", rc.debug_report());
        Instant::now()
    };
    let pod = format!("join-{newcomer}");
    let from_ns = rc.pod_netns(NS, &pods[0].0).expect("pod netns");
    let mut ip = String::new();
    let reachable = wait_until(Duration::from_secs(30), || {
        if ip.is_empty() {
            ip = rc
                .kubectl(&[
                    "-n",
                    NS,
                    "get",
                    "pod",
                    &pod,
                    "-o",
                    "jsonpath={.status.podIP}",
                ])
                .unwrap_or_default()
                .trim()
                .to_string();
            if ip.is_empty() {
                return false;
            }
        }
        weft_tests::ping(&from_ns, &ip, &PingOpts::count(1).wait(1)).is_ok_and(|r| r.received == 1)
    });
    let secs = ready_at.elapsed().as_secs_f64();
    assert!(
        reachable,
        "pod on {newcomer} ({ip}) never answered\n{}",
        rc.debug_report()
    );
    eprintln!(
        "kubelet-tier: {newcomer} Ready -> its pod {ip} answers a pod on {}: {secs:.1} s",
        pods[0].1
    );
    assert!(
        secs <= 10.0,
        "the new node's pod answered {secs:.1} s after Ready (want <= 10 s)"
    );
    rc.e2e(&["e2e_wait_meshnodes", "3", "60"])
        .expect("3 MeshNodes Ready");
}
