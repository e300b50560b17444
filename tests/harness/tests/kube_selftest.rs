//! Self-test of the harness's Kubernetes control plane (`Cluster::start_kube`, module `kube`):
//! etcd, kube-apiserver v1.37.2 and kube-controller-manager (garbage collector) in the switch
//! namespace, reached at https://198.18.0.1:6443.
//! Needs root, etcd, openssl, curl and the binaries of scripts/kube-bins.sh; run serially:
//!   cargo test -p weft-tests --test kube_selftest -- --test-threads=1

use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use weft_tests::kube::{user_extra, KubeOpts, KUBE_VERSION, NODE_NAME_EXTRA};
use weft_tests::{wait_until, Cluster};

const NS: &str = "weft-system";
const SA: &str = "meshd";
/// A cluster-scoped custom resource, installed before the controller manager starts.
const THING_CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: things.test.weft.dev
spec:
  group: test.weft.dev
  scope: Cluster
  names: {plural: things, singular: thing, kind: Thing}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;

/// Processes whose command line mentions `needle` (the cluster's temp dir).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            v.push(format!("{name}: {cmdline}"));
        }
    }
    v
}

fn config_map_owned_by(name: &str, node: &str, uid: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": NS,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid}],
        },
        "data": {"node": node},
    })
}

/// Everything the kube tests rely on, in one control plane: readiness, version, Node objects
/// with pod CIDRs, pod-bound tokens carrying the node name (checked from the switch and from
/// inside a node namespace), RBAC refusing a token without rights, the garbage collector
/// deleting a Node's dependents, 410 Gone from a compacted etcd for a resource without watch
/// cache, and an API server outage with the data surviving it.
#[test]
fn kube_control_plane() {
    let c = Cluster::with_nodes(1).expect("cluster");
    let tmp = c.tmp.display().to_string();
    let t0 = Instant::now();
    let kube = c
        .start_kube(KubeOpts {
            controller_manager: true,
            // ConfigMaps are served from etcd, so compaction shows up as 410 Gone below.
            watch_cache_sizes: vec!["configmaps#0".into()],
            manifests: vec![THING_CRD.into()],
            ..KubeOpts::default()
        })
        .expect("start the control plane");
    eprintln!(
        "kube: API server ready {:?} after start; control plane with GC synced after {:?}",
        kube.apiserver_ready_after,
        t0.elapsed()
    );

    // Ready, and the version scripts/kube-bins.sh built.
    kube.readyz().expect("/readyz");
    let version: Value = serde_json::from_str(
        &kube
            .kubectl(&["version", "-o", "json"])
            .expect("kubectl version"),
    )
    .expect("version JSON");
    assert_eq!(
        version["serverVersion"]["gitVersion"], KUBE_VERSION,
        "{version}"
    );
    assert_eq!(
        version["clientVersion"]["gitVersion"], KUBE_VERSION,
        "{version}"
    );

    // A Node object with pod CIDRs and an InternalIP.
    let ip0 = c.node(0).underlay_ip;
    let uid0 = kube
        .create_node("node-0", ip0, &["10.42.1.0/24", "fd00:42:1::/64"])
        .expect("create node-0");
    let uid1 = kube
        .create_node(
            "node-1",
            "198.18.0.11".parse().expect("ip"),
            &["10.42.2.0/24"],
        )
        .expect("create node-1");
    let n0 = kube.get_json(&["node", "node-0"]).expect("get node-0");
    assert_eq!(n0["metadata"]["uid"], uid0.as_str());
    assert_eq!(
        n0["spec"]["podCIDRs"],
        json!(["10.42.1.0/24", "fd00:42:1::/64"])
    );
    assert_eq!(n0["spec"]["podCIDR"], "10.42.1.0/24");
    let internal: Vec<&Value> = n0["status"]["addresses"]
        .as_array()
        .expect("addresses")
        .iter()
        .filter(|a| a["type"] == "InternalIP")
        .collect();
    assert_eq!(internal.len(), 1, "{n0}");
    assert_eq!(internal[0]["address"], ip0.to_string());
    kube.set_node_annotation("node-0", "weft.dev/test", "x=1")
        .expect("annotate");
    let n0 = kube.get_json(&["node", "node-0"]).expect("get node-0");
    assert_eq!(n0["metadata"]["annotations"]["weft.dev/test"], "x=1");

    // A token bound to a Pod on node-0 says so; from the switch and from node 0's namespace.
    kube.create_namespace(NS).expect("namespace");
    kube.create_service_account(NS, SA)
        .expect("service account");
    let token = kube
        .pod_bound_token(NS, SA, "node-0")
        .expect("pod-bound token");
    let kc = kube
        .kubeconfig_with_token(&token, c.tmp.join("node-0.kubeconfig"))
        .expect("token kubeconfig");
    let who = kube.whoami(&kc).expect("whoami");
    assert_eq!(
        who["username"],
        format!("system:serviceaccount:{NS}:{SA}"),
        "{who}"
    );
    assert_eq!(user_extra(&who, NODE_NAME_EXTRA), Some("node-0"), "{who}");
    let t = Instant::now();
    let who_in_node = kube
        .whoami_in_netns(&c.node(0).ns, &kc)
        .expect("whoami from node 0's namespace");
    eprintln!(
        "kube: auth whoami from node 0's netns took {:?}",
        t.elapsed()
    );
    assert_eq!(user_extra(&who_in_node, NODE_NAME_EXTRA), Some("node-0"));

    // No RBAC for the service account: a refusal, not some other error.
    let denied = kube
        .kubectl_output(&kc, &["get", "nodes"])
        .expect("kubectl get nodes as the service account");
    assert!(denied.forbidden(), "expected 403, got {denied:?}");
    let plain = kube.service_account_token(NS, SA).expect("plain token");
    let who_plain = kube
        .whoami(
            &kube
                .kubeconfig_with_token(&plain, c.tmp.join("plain.kubeconfig"))
                .expect("kubeconfig"),
        )
        .expect("whoami plain");
    assert_eq!(user_extra(&who_plain, NODE_NAME_EXTRA), None, "{who_plain}");

    // The garbage collector deletes what a deleted Node owned, and only that.
    kube.create_object(&config_map_owned_by("owned-by-node-0", "node-0", &uid0))
        .expect("configmap of node-0");
    kube.create_object(&config_map_owned_by("owned-by-node-1", "node-1", &uid1))
        .expect("configmap of node-1");
    kube.create_object(&json!({
        "apiVersion": "test.weft.dev/v1",
        "kind": "Thing",
        "metadata": {
            "name": "node-0",
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": "node-0", "uid": uid0}],
        },
    }))
    .expect("thing of node-0");
    kube.delete_node("node-0").expect("delete node-0");
    let t = Instant::now();
    let collected = wait_until(Duration::from_secs(60), || {
        !kube
            .exists(&["configmap", "-n", NS, "owned-by-node-0"])
            .expect("get configmap")
            && !kube.exists(&["thing", "node-0"]).expect("get thing")
    });
    let gc_delay = t.elapsed();
    assert!(
        collected,
        "not garbage-collected in 60 s\n{}",
        kube.logs_tail(30)
    );
    eprintln!("kube: dependent of the deleted Node garbage-collected after {gc_delay:?}");
    assert!(kube
        .exists(&["configmap", "-n", NS, "owned-by-node-1"])
        .expect("get configmap"));

    // A watch from before a compaction, on a resource without watch cache: 410 Gone.
    let cms = format!("/api/v1/namespaces/{NS}/configmaps");
    let rv = kube.list_resource_version(&cms).expect("list configmaps");
    kube.kubectl_in(NS, &["create", "configmap", "after-list"])
        .expect("configmap");
    let w = kube.watch_once(&cms, &rv, 1).expect("watch");
    assert_eq!(w.names(), ["after-list"], "watch before compaction: {w:?}");
    // etcd keeps the revision compacted to: compact past the first event after `rv`.
    kube.kubectl_in(NS, &["create", "configmap", "after-watch"])
        .expect("configmap");
    let compacted = kube.compact_etcd().expect("compact");
    let w = kube.watch_once(&cms, &rv, 1).expect("watch");
    eprintln!(
        "kube: watch from rv {rv} after compaction to {compacted}: HTTP {} {}",
        w.code,
        w.body.trim()
    );
    assert!(w.expired(), "expected 410 Gone, got {w:?}");

    // Outage: stopped, it refuses; started again (same etcd), it has the data and the token,
    // and a watch from before the restart is too old for the new watch cache (410 Gone).
    let nodes_rv = kube
        .list_resource_version("/api/v1/nodes")
        .expect("list nodes");
    kube.set_node_annotation("node-1", "weft.dev/test", "before-restart")
        .expect("annotate");
    let stopped = kube.stop_apiserver().expect("stop");
    eprintln!("kube: API server stopped after {stopped:?}");
    assert!(kube.readyz().is_err(), "answers while stopped");
    assert!(kube.kubectl(&["get", "nodes"]).is_err());
    let back = kube.start_apiserver().expect("start again");
    eprintln!("kube: restarted API server ready after {back:?}");
    assert!(kube.exists(&["node", "node-1"]).expect("get node-1"));
    let who = kube.whoami(&kc).expect("whoami after restart");
    assert_eq!(user_extra(&who, NODE_NAME_EXTRA), Some("node-0"));
    let t = Instant::now();
    let w = weft_tests::wait_for(Duration::from_secs(20), || {
        let w = kube
            .watch_once("/api/v1/nodes", &nodes_rv, 1)
            .expect("watch");
        (!w.initializing()).then_some(w)
    })
    .expect("the nodes watch cache stays initializing");
    eprintln!(
        "kube: watch from before the restart ({:?} after ready): HTTP {} {}",
        t.elapsed(),
        w.code,
        w.body.trim()
    );
    assert!(w.expired(), "expected 410 Gone, got {w:?}");

    drop(kube);
    assert!(
        processes_mentioning(&tmp).is_empty(),
        "left behind: {:?}",
        processes_mentioning(&tmp)
    );
    drop(c);
    assert!(
        !Path::new(&tmp).exists() || std::env::var_os("WEFT_KEEP_TMP").is_some(),
        "temp dir left"
    );
    eprintln!("kube: self-test took {:?}", t0.elapsed());
}
