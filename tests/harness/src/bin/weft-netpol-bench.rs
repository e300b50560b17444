//! weft-netpol-bench: how fast a NetworkPolicy is enforced on every node, and what 100 policies
//! cost the data path, in one run.
//!
//! Topology: a [`KubeMesh`] of 3 netns nodes running meshd `--registry kube --network-policy on`
//! on a real kube-apiserver, plus 2 Node objects without meshd (ranges 10.42.200.0/24 and
//! 10.42.201.0/24, remote peers for the policies). 10 namespaces `bench-0..bench-9` and
//! `--pods` (1000) Pod objects made as the kubelet would leave them (spec.nodeName, named
//! container ports, the not-ready/unreachable tolerations, status Running with podIP/podIPs):
//! 24 % on each meshd node (10.42.N.10 and up, above what weft-cni hands out), the rest on the
//! two API-only nodes. Labels `app: app-(i % 20)`, `tier: web|api|db`; namespace `bench-(i % 10)`,
//! node by `i % 50`, so every app of a namespace has pods on every meshd node. Objects are
//! written through `kubectl proxy --unix-socket` with 16 concurrent requests.
//!
//! 1. Policy latency: `--policies` (100) NetworkPolicies created one after another, mixed kinds
//!    (namespaceSelector, matchExpressions, egress ipBlock/except, named ports, endPort), each
//!    selecting pods of all 3 meshd nodes. t0 just before the create request; every node's API
//!    socket is asked for `status` every 10 ms until `policy.appliedPolicies` holds the key.
//!    The next policy is created only when the previous one is everywhere. Then a burst of 20
//!    created at once, timed until all 20 are everywhere.
//! 2. Throughput: two pods attached through weft-cni (Pod object, cnitool ADD with the
//!    K8S_POD_* CNI_ARGS, status patch) on node-0 (iperf3 server) and node-1 (client). iperf3
//!    TCP one stream (`--runs` × `--seconds`, median) and `--pings` pings at 10 ms, in
//!    `--rounds` (3) rounds of: no policy at all, then `--policies` policies in the server's
//!    namespace that all select the server (the last one allows the client); and no policy
//!    once more at the end. The cost of a round is its loaded median against the mean of the
//!    unloaded medians just before and after it (so the machine's drift over minutes cancels);
//!    the headline is the median over the rounds, with the pooled figure next to it.
//!
//! Needs root, iperf3 and the workspace binaries (release build recommended):
//!   cargo build --release --workspace --bins && sudo target/release/weft-netpol-bench

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use weft_tests::cluster::destroy_namespace;
use weft_tests::kube::KubeOpts;
use weft_tests::kube_mesh::KubeMesh;
use weft_tests::perf::{iperf, json_f64};
use weft_tests::util::{ns_cmd, Proc};
use weft_tests::{cnitool_container_id, netns_path, ping, result_ipv4, PingOpts, CNI_NET};

const NAMESPACES: usize = 10;
const APPS: usize = 20;
const TIERS: [&str; 3] = ["web", "api", "db"];
const MESHD_NODES: usize = 3;
/// API-only Node objects: (name, InternalIP, range's third octet).
const EXTRA_NODES: [(&str, Ipv4Addr, u8); 2] = [
    ("node-api-0", Ipv4Addr::new(198, 18, 0, 60), 200),
    ("node-api-1", Ipv4Addr::new(198, 18, 0, 61), 201),
];
const BURST: usize = 20;
const CONCURRENCY: usize = 16;
const POLL: Duration = Duration::from_millis(10);
const POLICY_TIMEOUT: Duration = Duration::from_secs(30);
const SERVER_NS: &str = "bench-0";
const CLIENT_NS: &str = "bench-1";

struct Args {
    policies: usize,
    pods: usize,
    runs: usize,
    rounds: usize,
    seconds: u32,
    pings: u32,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        policies: 100,
        pods: 1000,
        runs: 3,
        rounds: 3,
        seconds: 10,
        pings: 200,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = |name: &str| -> Result<u64> {
            it.next()
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{name} needs a number"))
        };
        match flag.as_str() {
            "--policies" => a.policies = val("--policies")?.clamp(1, 1000) as usize,
            "--pods" => a.pods = val("--pods")?.clamp(50, 1000) as usize,
            "--runs" => a.runs = val("--runs")?.max(1) as usize,
            "--rounds" => a.rounds = val("--rounds")?.clamp(1, 100) as usize,
            "--seconds" => a.seconds = val("--seconds")?.clamp(1, 600) as u32,
            "--pings" => a.pings = val("--pings")?.clamp(10, 100_000) as u32,
            "-h" | "--help" => {
                println!(
                    "weft-netpol-bench [--policies N] [--pods N] [--runs N] [--rounds N] [--seconds S] \
                     [--pings N]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

// ---------------- statistics ----------------

fn percentile(v: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    // Nearest rank.
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

fn median(v: &[f64]) -> Option<f64> {
    percentile(v, 50.0)
}

fn fmt(x: Option<f64>, prec: usize) -> String {
    x.map_or("-".to_string(), |v| format!("{v:.prec$}"))
}

// ---------------- the API server through kubectl proxy ----------------

/// `kubectl proxy --unix-socket` in the switch namespace: plain HTTP/1.1 from this process,
/// one connection per request (unix sockets do not care about network namespaces).
struct Api {
    sock: PathBuf,
    _proxy: Proc,
}

impl Api {
    fn start(m: &KubeMesh) -> Result<Api> {
        let sock = m.c.tmp.join("kube-proxy.sock");
        let log = m.c.tmp.join("kube-proxy.log");
        let mut cmd = ns_cmd(&m.kube.ns, m.kube.bin("kubectl"));
        cmd.env_remove("KUBECONFIG")
            .arg("--kubeconfig")
            .arg(&m.kube.admin_kubeconfig)
            .arg("proxy")
            .arg(format!("--unix-socket={}", sock.display()));
        let proxy = Proc::spawn_logged("kubectl proxy", &mut cmd, Some(&log))?;
        let api = Api {
            sock,
            _proxy: proxy,
        };
        let up = weft_tests::wait_until(Duration::from_secs(20), || {
            api.request("GET", "/version", "").is_ok()
        });
        if !up {
            bail!(
                "kubectl proxy did not answer on {}: {}",
                api.sock.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(api)
    }

    /// (HTTP status, body as received).
    fn request(&self, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
        let mut s = UnixStream::connect(&self.sock)
            .with_context(|| format!("connecting to {}", self.sock.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let ct = if method == "PATCH" {
            "application/merge-patch+json"
        } else {
            "application/json"
        };
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: {ct}\r\nAccept: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .with_context(|| format!("{method} {path}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .with_context(|| format!("reading the answer to {method} {path}"))?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| anyhow!("{method} {path}: odd answer {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((code, body))
    }

    /// [`Api::request`] that must answer 2xx.
    fn ok(&self, method: &str, path: &str, body: &str) -> Result<String> {
        let (code, text) = self.request(method, path, body)?;
        if !(200..300).contains(&code) {
            bail!("{method} {path}: HTTP {code}: {}", text.trim());
        }
        Ok(text)
    }

    fn create_policy(&self, np: &Value) -> Result<()> {
        let ns = np["metadata"]["namespace"]
            .as_str()
            .ok_or_else(|| anyhow!("policy without a namespace: {np}"))?;
        self.ok(
            "POST",
            &format!("/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies"),
            &np.to_string(),
        )
        .map(|_| ())
    }

    fn delete_all_policies(&self) -> Result<()> {
        for n in 0..NAMESPACES {
            self.ok(
                "DELETE",
                &format!("/apis/networking.k8s.io/v1/namespaces/bench-{n}/networkpolicies"),
                "",
            )?;
        }
        Ok(())
    }
}

/// Runs `f` over `0..n` on [`CONCURRENCY`] threads; the first error.
fn parallel(n: usize, f: impl Fn(usize) -> Result<()> + Sync) -> Result<()> {
    let next = AtomicUsize::new(0);
    let first_err: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..CONCURRENCY.min(n.max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    break;
                }
                if let Err(e) = f(i) {
                    if let Ok(mut g) = first_err.lock() {
                        g.get_or_insert(e);
                    }
                    next.store(n, Ordering::SeqCst);
                    break;
                }
            });
        }
    });
    match first_err.into_inner() {
        Ok(Some(e)) => Err(e),
        Ok(None) => Ok(()),
        Err(_) => Err(anyhow!("a worker panicked")),
    }
}

// ---------------- meshd status ----------------

/// `status` on meshd's API socket (one request line, one JSON document).
fn meshd_status(sock: &Path) -> Result<Value> {
    let mut s =
        UnixStream::connect(sock).with_context(|| format!("connecting to {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"status\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    serde_json::from_slice(&buf).with_context(|| format!("status from {}", sock.display()))
}

fn applied(st: &Value) -> Vec<String> {
    st["policy"]["appliedPolicies"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// What the polls saw of each node's applies.
#[derive(Default)]
struct ApplyLog {
    /// Last generation seen per node.
    generation: Vec<u64>,
    /// lastApplyMs of every new generation seen, per node.
    apply_ms: Vec<Vec<f64>>,
}

impl ApplyLog {
    fn new(nodes: usize) -> ApplyLog {
        ApplyLog {
            generation: vec![0; nodes],
            apply_ms: vec![Vec::new(); nodes],
        }
    }

    fn note(&mut self, node: usize, st: &Value) {
        let g = st["policy"]["generation"].as_u64().unwrap_or(0);
        if g != self.generation[node] {
            self.generation[node] = g;
            if let Some(ms) = st["policy"]["lastApplyMs"].as_f64() {
                self.apply_ms[node].push(ms);
            }
        }
    }
}

/// Polls every node until `pred(applied)` holds on each; per node, the time since `t0` when it
/// was first seen (None: not within `timeout`).
fn wait_everywhere(
    socks: &[PathBuf],
    t0: Instant,
    timeout: Duration,
    log: &mut ApplyLog,
    pred: impl Fn(&[String]) -> bool,
) -> Vec<Option<Duration>> {
    let mut done: Vec<Option<Duration>> = vec![None; socks.len()];
    loop {
        for (i, sock) in socks.iter().enumerate() {
            if done[i].is_some() {
                continue;
            }
            if let Ok(st) = meshd_status(sock) {
                log.note(i, &st);
                if pred(&applied(&st)) {
                    done[i] = Some(t0.elapsed());
                }
            }
        }
        if done.iter().all(Option::is_some) || t0.elapsed() > timeout {
            return done;
        }
        std::thread::sleep(POLL);
    }
}

// ---------------- the objects ----------------

/// Node index (0..3 meshd, 3..5 API-only) of API pod `i`: 12 of every 50 on each meshd node,
/// 7 on each API-only node.
fn node_of(i: usize) -> usize {
    match i % 50 {
        r if r < 36 => r / 12,
        r if r < 43 => 3,
        _ => 4,
    }
}

fn tolerations() -> Value {
    let tol = |key: &str| json!({"key": key, "operator": "Exists", "effect": "NoExecute"});
    json!([
        tol("node.kubernetes.io/not-ready"),
        tol("node.kubernetes.io/unreachable")
    ])
}

fn pod_object(ns: &str, name: &str, node: &str, labels: &Value, http_port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "nodeName": node,
            "containers": [{
                "name": "main",
                "image": "registry.k8s.io/e2e-test-images/agnhost:2.53",
                "command": ["/agnhost", "netexec"],
                "ports": [
                    {"name": "http", "containerPort": http_port, "protocol": "TCP"},
                    {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                ],
            }],
            "tolerations": tolerations(),
        },
    })
}

fn pod_status(ip: Ipv4Addr, host_ip: Ipv4Addr) -> Value {
    let now = "2026-01-01T00:00:00Z";
    let conds: Vec<Value> = ["PodScheduled", "Initialized", "ContainersReady", "Ready"]
        .iter()
        .map(|t| json!({"type": t, "status": "True", "lastTransitionTime": now}))
        .collect();
    json!({"status": {
        "phase": "Running",
        "podIP": ip.to_string(),
        "podIPs": [{"ip": ip.to_string()}],
        "hostIP": host_ip.to_string(),
        "hostIPs": [{"ip": host_ip.to_string()}],
        "conditions": conds,
    }})
}

struct ApiPod {
    ns: String,
    name: String,
    node: String,
    host_ip: Ipv4Addr,
    ip: Ipv4Addr,
    labels: Value,
    http_port: u16,
}

fn plan_pods(m: &KubeMesh, n: usize) -> Result<Vec<ApiPod>> {
    let mut next = [10u32; MESHD_NODES + EXTRA_NODES.len()];
    let mut pods = Vec::with_capacity(n);
    for i in 0..n {
        let node = node_of(i);
        let k = next[node];
        next[node] += 1;
        if k > 249 {
            bail!("too many pods for node {node}'s /24 (pod {i})");
        }
        let (name, host_ip, octet) = if node < MESHD_NODES {
            let nd = m.c.node(node);
            (nd.name.clone(), nd.underlay_ip, (node + 1) as u8)
        } else {
            let (name, ip, octet) = EXTRA_NODES[node - MESHD_NODES];
            (name.to_string(), ip, octet)
        };
        pods.push(ApiPod {
            ns: format!("bench-{}", i % NAMESPACES),
            name: format!("p-{i:04}"),
            node: name,
            host_ip,
            ip: Ipv4Addr::new(10, 42, octet, k as u8),
            labels: json!({"app": format!("app-{}", i % APPS), "tier": TIERS[i % 3]}),
            http_port: 8080 + (i % 3) as u16,
        });
    }
    Ok(pods)
}

/// Latency policy `i`, in namespace `bench-(i % 10)`; it selects pods of the namespace's apps
/// (app-n and app-(n+10)), which have pods on every meshd node.
fn latency_policy(i: usize, name: &str) -> Value {
    let n = i % NAMESPACES;
    let ns = format!("bench-{n}");
    let a = format!("app-{n}");
    let b = format!("app-{}", n + 10);
    let spec = match i % 5 {
        0 => json!({
            "podSelector": {"matchLabels": {"app": a}},
            "ingress": [{
                "from": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", i % 3)}}}],
                "ports": [{"protocol": "TCP", "port": 8080}],
            }],
        }),
        1 => json!({
            "podSelector": {"matchExpressions": [
                {"key": "app", "operator": "In", "values": [a, b]},
                {"key": "tier", "operator": "NotIn", "values": ["db"]},
            ]},
            "ingress": [{
                "from": [{"podSelector": {"matchExpressions": [{"key": "tier", "operator": "Exists"}]}}],
                "ports": [{"protocol": "TCP", "port": "http"}],
            }],
        }),
        2 => json!({
            "podSelector": {"matchLabels": {"app": b}},
            "policyTypes": ["Egress"],
            "egress": [{
                "to": [{"ipBlock": {"cidr": "10.42.0.0/16", "except": ["10.42.200.0/24", "10.42.201.128/25"]}}],
                "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 8080, "endPort": 8090}],
            }],
        }),
        3 => json!({
            "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": [a]}]},
            "ingress": [
                {
                    "from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"tier": "web"}}}],
                    "ports": [{"protocol": "TCP", "port": 9000, "endPort": 9100}],
                },
                {"from": [{"ipBlock": {"cidr": "10.42.200.0/24", "except": ["10.42.200.0/28"]}}]},
            ],
        }),
        _ => json!({
            "podSelector": {"matchLabels": {"app": b}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{
                "from": [{"namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]}}],
                "ports": [{"protocol": "TCP", "port": "metrics"}, {"protocol": "UDP", "port": "dns"}],
            }],
            "egress": [{
                "to": [{"podSelector": {}}, {"namespaceSelector": {"matchLabels": {"bench": "yes"}}}],
                "ports": [{"protocol": "TCP", "port": 8080, "endPort": 8082}],
            }],
        }),
    };
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

/// Throughput policy `i` of `n`: all in the server's namespace, all select the server pod
/// (`role: bench-server`); only the last allows the client.
fn throughput_policy(i: usize, n: usize) -> Value {
    let name = format!("tp-{i:03}");
    let server = json!({"matchLabels": {"role": "bench-server"}});
    let spec = if i + 1 == n {
        json!({
            "podSelector": server,
            "ingress": [{"from": [{
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": CLIENT_NS}},
                "podSelector": {"matchLabels": {"app": "iperf-client"}},
            }]}],
        })
    } else {
        match i % 4 {
            0 => json!({
                "podSelector": server,
                "ingress": [{
                    "from": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", i % 3)}},
                              "podSelector": {"matchLabels": {"app": format!("app-{}", i % APPS)}}}],
                    "ports": [{"protocol": "TCP", "port": 8080 + (i % 50) as u16}],
                }],
            }),
            1 => json!({
                "podSelector": {"matchExpressions": [
                    {"key": "role", "operator": "In", "values": ["bench-server"]},
                    {"key": "app", "operator": "Exists"},
                ]},
                "ingress": [{
                    "from": [{"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": [TIERS[i % 3]]}]}}],
                    "ports": [{"protocol": "TCP", "port": "http"}],
                }],
            }),
            2 => json!({
                "podSelector": server,
                "ingress": [{
                    "from": [{"ipBlock": {"cidr": "10.42.200.0/24", "except": [format!("10.42.200.{}/32", i % 250)]}}],
                    "ports": [{"protocol": "TCP", "port": 9000, "endPort": 9000 + i as u16}],
                }],
            }),
            _ => json!({
                "podSelector": server,
                "policyTypes": ["Ingress"],
                "ingress": [{
                    "from": [{"namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "In", "values": ["dev"]}]},
                              "podSelector": {"matchLabels": {"tier": TIERS[i % 3]}}}],
                    "ports": [{"protocol": "TCP", "port": "metrics"}, {"protocol": "UDP", "port": 53}],
                }],
            }),
        }
    };
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": SERVER_NS},
        "spec": spec,
    })
}

// ---------------- real pods ----------------

/// A pod attached through weft-cni; its netns is deleted on drop.
struct CniPod {
    netns: String,
    ip: Ipv4Addr,
}

impl Drop for CniPod {
    fn drop(&mut self) {
        destroy_namespace(&self.netns);
    }
}

fn cni_pod(
    m: &KubeMesh,
    api: &Api,
    node: usize,
    ns: &str,
    name: &str,
    labels: &Value,
) -> Result<CniPod> {
    let nd = m.c.node(node);
    let obj = pod_object(ns, name, &nd.name, labels, 5201);
    let created: Value = serde_json::from_str(&api.ok(
        "POST",
        &format!("/api/v1/namespaces/{ns}/pods"),
        &obj.to_string(),
    )?)
    .context("created Pod")?;
    let uid = created["metadata"]["uid"]
        .as_str()
        .ok_or_else(|| anyhow!("Pod {ns}/{name} without a uid"))?
        .to_string();
    let netns = nd.cni_netns(0)?;
    let mut pod = CniPod {
        netns,
        ip: Ipv4Addr::UNSPECIFIED,
    };
    let cid = cnitool_container_id(&netns_path(&pod.netns))?;
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};\
         K8S_POD_INFRA_CONTAINER_ID={cid};K8S_POD_UID={uid}"
    );
    let out = nd.cnitool_with_args("add", CNI_NET, &pod.netns, None, Some(&args))?;
    let result = out
        .result()
        .with_context(|| format!("CNI ADD of {ns}/{name}: {}", out.describe()))?;
    let ip = result_ipv4(&result)
        .ok_or_else(|| anyhow!("ADD result of {ns}/{name} without IPv4: {result}"))?;
    api.ok(
        "PATCH",
        &format!("/api/v1/namespaces/{ns}/pods/{name}/status"),
        &pod_status(ip, nd.underlay_ip).to_string(),
    )?;
    eprintln!("pod {ns}/{name} attached on {} at {ip}", nd.name);
    pod.ip = ip;
    Ok(pod)
}

#[derive(Default)]
struct DataPath {
    gbits: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
}

fn measure(client: &CniPod, server: &CniPod, a: &Args, what: &str) -> Result<DataPath> {
    eprintln!("throughput, {what}:");
    let mut d = DataPath::default();
    for run in 0..a.runs {
        let v = iperf(&client.netns, &server.ip.to_string(), a.seconds, &[])
            .with_context(|| format!("iperf3 {what}"))?;
        let gbit = json_f64(&v, &["end", "sum_received", "bits_per_second"])? / 1e9;
        let r = ping(
            &client.netns,
            &server.ip.to_string(),
            &PingOpts::count(a.pings).interval(0.01).wait(1),
        )?;
        eprintln!(
            "  run {}: TCP {gbit:.2} Gbit/s, ping p50 {} p99 {} ms, {}/{} replies",
            run + 1,
            fmt(r.p50_ms(), 3),
            fmt(r.p99_ms(), 3),
            r.received,
            r.transmitted
        );
        d.gbits.push(gbit);
        d.p50.extend(r.p50_ms());
        d.p99.extend(r.p99_ms());
    }
    Ok(d)
}

// ---------------- main ----------------

struct NodeFigures {
    name: String,
    program: Value,
    last_apply_ms: f64,
    local_pods: usize,
    seen_pods: u64,
}

fn node_figures(m: &KubeMesh, socks: &[PathBuf]) -> Result<Vec<NodeFigures>> {
    socks
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let st = meshd_status(s)?;
            let p = &st["policy"];
            Ok(NodeFigures {
                name: m.c.node(i).name.clone(),
                program: p["program"].clone(),
                last_apply_ms: p["lastApplyMs"].as_f64().unwrap_or(f64::NAN),
                local_pods: p["pods"].as_array().map_or(0, Vec::len),
                seen_pods: p["seen"]["pods"].as_u64().unwrap_or(0),
            })
        })
        .collect()
}

fn wait_no_policy(socks: &[PathBuf], log: &mut ApplyLog) -> Result<()> {
    let done = wait_everywhere(
        socks,
        Instant::now(),
        Duration::from_secs(60),
        log,
        |a: &[String]| a.is_empty(),
    );
    if done.iter().any(Option::is_none) {
        bail!("policies still applied after 60 s: {done:?}");
    }
    Ok(())
}

fn main() -> Result<()> {
    let a = parse_args()?;
    weft_tests::util::require_root()?;
    let t_setup = Instant::now();
    let m = KubeMesh::new(MESHD_NODES, MESHD_NODES, true, KubeOpts::default())?;
    for node in &m.c.nodes {
        node.cni_install()?;
        m.start_meshd(node, &["--network-policy", "on"], &[])
            .with_context(|| format!("meshd on {}", node.name))?;
        node.wait_node_json(Duration::from_secs(20))?;
        node.cni_write_conflist(CNI_NET, "1.1.0", None)?;
    }
    m.c.wait_mesh_ready(Duration::from_secs(30))?;
    for (name, ip, octet) in EXTRA_NODES {
        m.kube
            .create_node(name, ip, &[&format!("10.42.{octet}.0/24")])?;
    }
    let api = Api::start(&m)?;
    let t_mesh = t_setup.elapsed();
    for n in 0..NAMESPACES {
        let ns = json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("bench-{n}"), "labels": {
                "bench": "yes", "team": format!("team-{}", n % 3),
                "env": if n % 2 == 0 { "prod" } else { "dev" },
            }},
        });
        api.ok("POST", "/api/v1/namespaces", &ns.to_string())?;
    }
    let pods = plan_pods(&m, a.pods)?;
    let t_pods = Instant::now();
    parallel(pods.len(), |i| {
        let p = &pods[i];
        let obj = pod_object(&p.ns, &p.name, &p.node, &p.labels, p.http_port);
        api.ok(
            "POST",
            &format!("/api/v1/namespaces/{}/pods", p.ns),
            &obj.to_string(),
        )
        .with_context(|| format!("creating Pod {}/{}", p.ns, p.name))?;
        api.ok(
            "PATCH",
            &format!("/api/v1/namespaces/{}/pods/{}/status", p.ns, p.name),
            &pod_status(p.ip, p.host_ip).to_string(),
        )
        .with_context(|| format!("status of Pod {}/{}", p.ns, p.name))?;
        Ok(())
    })?;
    let pods_took = t_pods.elapsed();
    let socks: Vec<PathBuf> = m.c.nodes.iter().map(|n| n.api_socket()).collect();
    // Every meshd has seen every pod (and placed its local ones).
    let expect_local: Vec<usize> = (0..MESHD_NODES)
        .map(|n| pods.iter().filter(|p| p.node == m.c.node(n).name).count())
        .collect();
    let seen = weft_tests::wait_until(Duration::from_secs(60), || {
        node_figures(&m, &socks).is_ok_and(|f| {
            f.iter()
                .zip(&expect_local)
                .all(|(x, want)| x.seen_pods as usize >= pods.len() && x.local_pods >= *want)
        })
    });
    let figs = node_figures(&m, &socks)?;
    if !seen {
        let got: Vec<(u64, usize)> = figs.iter().map(|f| (f.seen_pods, f.local_pods)).collect();
        bail!("meshd did not see all pods within 60 s (seen, local): {got:?}, want local {expect_local:?}");
    }
    eprintln!(
        "setup: mesh up in {t_mesh:?}; {} Pod objects created and status-patched in {pods_took:?} \
         ({CONCURRENCY} concurrent requests); all seen by every meshd after {:?}",
        pods.len(),
        t_pods.elapsed()
    );
    let setup_took = t_setup.elapsed();

    // ---- 1. policy latency, one at a time ----
    let mut log = ApplyLog::new(MESHD_NODES);
    let mut all_ms: Vec<f64> = Vec::new();
    let mut per_node_ms: Vec<Vec<f64>> = vec![Vec::new(); MESHD_NODES];
    let mut timeouts = 0usize;
    eprintln!("policy latency: {} policies, one at a time", a.policies);
    for i in 0..a.policies {
        let np = latency_policy(i, &format!("lat-{i:03}"));
        let key = format!(
            "{}/{}",
            np["metadata"]["namespace"].as_str().unwrap_or_default(),
            np["metadata"]["name"].as_str().unwrap_or_default()
        );
        let t0 = Instant::now();
        api.create_policy(&np)
            .with_context(|| format!("creating {key}"))?;
        let done = wait_everywhere(&socks, t0, POLICY_TIMEOUT, &mut log, |ap: &[String]| {
            ap.contains(&key)
        });
        let ms: Vec<f64> = done
            .iter()
            .map(|d| d.unwrap_or(POLICY_TIMEOUT).as_secs_f64() * 1e3)
            .collect();
        if done.iter().any(Option::is_none) {
            timeouts += 1;
            eprintln!("  {key}: not everywhere within {POLICY_TIMEOUT:?}: {done:?}");
        }
        for (n, x) in ms.iter().enumerate() {
            per_node_ms[n].push(*x);
        }
        let max = ms.iter().copied().fold(0.0, f64::max);
        all_ms.push(max);
        if i % 10 == 9 {
            eprintln!(
                "  {} policies: last {key} everywhere after {max:.1} ms",
                i + 1
            );
        }
    }
    let after_serial = node_figures(&m, &socks)?;

    // ---- burst ----
    let burst: Vec<Value> = (0..BURST)
        .map(|i| latency_policy(i, &format!("burst-{i:02}")))
        .collect();
    let keys: Vec<String> = burst
        .iter()
        .map(|np| {
            format!(
                "{}/{}",
                np["metadata"]["namespace"].as_str().unwrap_or_default(),
                np["metadata"]["name"].as_str().unwrap_or_default()
            )
        })
        .collect();
    let t0 = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = burst
            .iter()
            .map(|np| s.spawn(|| api.create_policy(np)))
            .collect();
        for h in hs {
            h.join().map_err(|_| anyhow!("creator panicked"))??;
        }
        Ok(())
    })?;
    let created_burst = t0.elapsed();
    let burst_done = wait_everywhere(&socks, t0, POLICY_TIMEOUT, &mut log, |ap: &[String]| {
        keys.iter().all(|k| ap.contains(k))
    });
    let burst_ms: Vec<Option<f64>> = burst_done
        .iter()
        .map(|d| d.map(|d| d.as_secs_f64() * 1e3))
        .collect();
    let burst_all = burst_ms
        .iter()
        .try_fold(0.0f64, |acc, x| x.map(|x| acc.max(x)));
    eprintln!(
        "burst: {BURST} created in {created_burst:?}; everywhere after {} ms (per node {burst_ms:?})",
        fmt(burst_all, 1)
    );

    // ---- 2. throughput ----
    api.delete_all_policies()?;
    wait_no_policy(&socks, &mut log)?;
    let server = cni_pod(
        &m,
        &api,
        0,
        SERVER_NS,
        "iperf-server",
        &json!({"app": "iperf-server", "role": "bench-server", "tier": "web"}),
    )?;
    let client = cni_pod(
        &m,
        &api,
        1,
        CLIENT_NS,
        "iperf-client",
        &json!({"app": "iperf-client"}),
    )?;
    let srv_log = m.c.tmp.join("iperf3-server.log");
    let mut srv = ns_cmd(&server.netns, "iperf3");
    srv.args(["-s", "-B", &server.ip.to_string()]);
    let _srv = Proc::spawn_logged("iperf3 -s", &mut srv, Some(&srv_log))?;
    std::thread::sleep(Duration::from_millis(500));

    // Rounds of (no policy, policies loaded), ending with no policy: every loaded state sits
    // between two unloaded ones, so each round's cost is paired with its own neighbours and
    // the drift of the machine over minutes cancels out.
    let mut none = vec![measure(&client, &server, &a, "no policy, round 1")?];
    let mut with = Vec::new();
    let mut tp_fig = None;
    let tp_keys: Vec<String> = (0..a.policies)
        .map(|i| format!("{SERVER_NS}/tp-{i:03}"))
        .collect();
    for round in 1..=a.rounds {
        let t0 = Instant::now();
        for i in 0..a.policies {
            api.create_policy(&throughput_policy(i, a.policies))?;
        }
        let loaded = wait_everywhere(&socks, t0, Duration::from_secs(60), &mut log, |ap| {
            tp_keys.iter().all(|k| ap.contains(k))
        });
        if loaded.iter().any(Option::is_none) {
            bail!("the throughput policies were not applied everywhere: {loaded:?}");
        }
        let st0 = meshd_status(&socks[0])?;
        let server_policies = st0["policy"]["pods"]
            .as_array()
            .and_then(|ps| {
                ps.iter()
                    .find(|p| p["name"] == "iperf-server" && p["namespace"] == SERVER_NS)
            })
            .map(|p| p["ingressPolicies"].as_array().map_or(0, Vec::len))
            .unwrap_or(0);
        eprintln!(
            "round {round}: {} policies selecting the server applied everywhere after {:?}; the \
             server's ingress policies on node-0: {server_policies}",
            a.policies,
            t0.elapsed()
        );
        with.push(measure(
            &client,
            &server,
            &a,
            &format!("policies loaded, round {round}"),
        )?);
        if tp_fig.is_none() {
            tp_fig = Some(node_figures(&m, &socks)?);
        }
        api.delete_all_policies()?;
        wait_no_policy(&socks, &mut log)?;
        none.push(measure(
            &client,
            &server,
            &a,
            &format!("no policy, round {}", round + 1),
        )?);
    }
    let tp_fig = tp_fig.ok_or_else(|| anyhow!("no throughput round ran"))?;

    // ---- report ----
    let pooled = |states: &[DataPath], f: fn(&DataPath) -> &Vec<f64>| -> Vec<f64> {
        states.iter().flat_map(|d| f(d).iter().copied()).collect()
    };
    let none_g = pooled(&none, |d| &d.gbits);
    let with_g = pooled(&with, |d| &d.gbits);
    let cost_of = |n: f64, w: f64| 100.0 * (n - w) / n.max(1e-9);
    let pooled_cost = match (median(&none_g), median(&with_g)) {
        (Some(n), Some(w)) => Some(cost_of(n, w)),
        _ => None,
    };
    // Round r: its loaded median against the mean of the unloaded medians before and after.
    let paired: Vec<f64> = with
        .iter()
        .enumerate()
        .filter_map(|(r, w)| {
            let before = median(&none[r].gbits)?;
            let after = median(&none[r + 1].gbits)?;
            Some(cost_of((before + after) / 2.0, median(&w.gbits)?))
        })
        .collect();
    let cost = median(&paired);
    let none_medians: Vec<f64> = none.iter().filter_map(|d| median(&d.gbits)).collect();
    let drift = match (
        percentile(&none_medians, 0.0),
        percentile(&none_medians, 100.0),
    ) {
        (Some(lo), Some(hi)) => Some(100.0 * (hi - lo) / hi.max(1e-9)),
        _ => None,
    };
    let p99 = percentile(&all_ms, 99.0);
    let met = |b: bool| if b { "met" } else { "NOT met" };

    println!();
    println!(
        "weft-netpol-bench: {} meshd nodes + {} API-only nodes, {} pods in {NAMESPACES} namespaces, \
         {} policies; setup {:.1} s (pods created + status-patched in {:.1} s)",
        MESHD_NODES,
        EXTRA_NODES.len(),
        pods.len(),
        a.policies,
        setup_took.as_secs_f64(),
        pods_took.as_secs_f64()
    );
    println!();
    println!(
        "policy create -> in the kernel of every node ({} policies one at a time, ms, polled every {} ms):",
        a.policies,
        POLL.as_millis()
    );
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>9}",
        "", "p50", "p90", "p99", "max"
    );
    let row = |name: &str, v: &[f64]| {
        println!(
            "{:<28} {:>9} {:>9} {:>9} {:>9}",
            name,
            fmt(percentile(v, 50.0), 1),
            fmt(percentile(v, 90.0), 1),
            fmt(percentile(v, 99.0), 1),
            fmt(percentile(v, 100.0), 1)
        );
    };
    row("all 3 nodes", &all_ms);
    for (n, v) in per_node_ms.iter().enumerate() {
        row(&format!("  {}", m.c.node(n).name), v);
    }
    if timeouts > 0 {
        println!(
            "  {timeouts} policies not everywhere within {POLICY_TIMEOUT:?} (counted as that)"
        );
    }
    println!(
        "burst of {BURST} created at once: all everywhere after {} ms (creates took {:.1} ms)",
        fmt(burst_all, 1),
        created_burst.as_secs_f64() * 1e3
    );
    println!();
    println!(
        "per node: program in the kernel after the {} policies, meshd's apply time (lastApplyMs of every \
         generation seen), and the program with the throughput policies:",
        a.policies
    );
    println!(
        "{:<10} {:>6} {:>6} {:>8} {:>8} {:>7} {:>10} {:>10} {:>10} {:>12}",
        "node",
        "local",
        "sets",
        "elements",
        "chains",
        "rules",
        "apply p50",
        "apply max",
        "last ms",
        "tp-* ch/rules"
    );
    for (n, f) in after_serial.iter().enumerate() {
        let p = &f.program;
        let tp = &tp_fig[n].program;
        println!(
            "{:<10} {:>6} {:>6} {:>8} {:>8} {:>7} {:>10} {:>10} {:>10.1} {:>12}",
            f.name,
            f.local_pods,
            p["sets"].to_string(),
            p["elements"].to_string(),
            p["chains"].to_string(),
            p["rules"].to_string(),
            fmt(median(&log.apply_ms[n]), 1),
            fmt(percentile(&log.apply_ms[n], 100.0), 1),
            f.last_apply_ms,
            format!("{}/{}", tp["chains"], tp["rules"])
        );
    }
    println!();
    println!(
        "pod-to-pod node-0 <- node-1, iperf3 TCP 1 stream {} s, {} run(s) per state, {} pings at \
         10 ms, {} rounds of (no policy, {} policies) then no policy:",
        a.seconds, a.runs, a.pings, a.rounds, a.policies
    );
    println!(
        "{:<44} {:>12} {:>12} {:>12}",
        "state", "TCP Gbit/s", "ping p50", "ping p99"
    );
    let state_row = |name: &str, d: &DataPath| {
        println!(
            "{:<44} {:>12} {:>12} {:>12}",
            name,
            fmt(median(&d.gbits), 2),
            fmt(median(&d.p50), 3) + " ms",
            fmt(median(&d.p99), 3) + " ms"
        );
    };
    for (r, n) in none.iter().enumerate() {
        state_row(&format!("no policy ({})", r + 1), n);
        if let Some(w) = with.get(r) {
            state_row(
                &format!("{} policies selecting the server ({})", a.policies, r + 1),
                w,
            );
        }
    }
    let all = |states: &[DataPath]| DataPath {
        gbits: pooled(states, |d| &d.gbits),
        p50: pooled(states, |d| &d.p50),
        p99: pooled(states, |d| &d.p99),
    };
    state_row("no policy, every run", &all(&none));
    state_row(&format!("{} policies, every run", a.policies), &all(&with));
    println!(
        "throughput cost of {} policies per round (against the mean of the no-policy states \
         before and after): {} %",
        a.policies,
        paired
            .iter()
            .map(|c| format!("{c:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "throughput cost: median of the rounds {} %; pooled (median of every loaded run against \
         every unloaded run) {} %",
        fmt(cost, 1),
        fmt(pooled_cost, 1)
    );
    println!(
        "the no-policy states differ by up to {} % (run-to-run noise on 2 shared cores)",
        fmt(drift, 1)
    );
    println!("anchors (docs/testing.md, shared anchors; this machine):");
    println!(
        "{:<44} {:>12} {:>12}",
        "  meshd, single veth (weft-bench 2026-12-02)", "2.09", "0.43 ms"
    );
    println!(
        "{:<44} {:>12} {:>12}",
        "  wireguard-go with offloads, veth", "1.27", "0.72 ms"
    );
    println!(
        "{:<44} {:>12} {:>12}",
        "  plain veth, no encryption", "30.7", "0.05 ms"
    );
    println!("targets:");
    println!(
        "  create -> enforced on every node p99 <= 1000 ms: {} ms, {}",
        fmt(p99, 1),
        met(p99.is_some_and(|x| x <= 1000.0) && timeouts == 0)
    );
    println!(
        "  throughput cost of {} policies <= 5 %: {} %, {}",
        a.policies,
        fmt(cost, 1),
        met(cost.is_some_and(|c| c <= 5.0))
    );
    Ok(())
}
