//! Kubernetes NetworkPolicy end-to-end model, after upstream's `test/e2e/network/netpol`: a
//! [`KubeMesh`] of 3 nodes (meshd `--registry kube` on a real kube-apiserver, `deploy/` applied),
//! namespaces `x`, `y`, `z` (label `ns: NAME`) with pods `a`, `b`, `c` each (label `pod: NAME`),
//! pod number `i` (x/a = 0, x/b = 1, .., z/c = 8) on node `i % 3`, so most cells of a matrix cross
//! the mesh.
//!
//! A pod is made the way kubelet makes one (there is no kubelet in this tier):
//! 1. the Pod object (admin), `spec.nodeName` = its node, one container per port and protocol
//!    (`cont-80-tcp` with port `serve-80-tcp`, as upstream names them), tolerations for
//!    `node.kubernetes.io/not-ready` and `.../unreachable` (NoExecute, no tolerationSeconds);
//! 2. an empty netns and the weft CNI ADD through cnitool with
//!    `CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=NS;K8S_POD_NAME=NAME;K8S_POD_INFRA_CONTAINER_ID=CID;K8S_POD_UID=UID`
//!    (what containerd passes; CID is cnitool's container id of the netns path);
//! 3. `status` patched: `podIP`, `podIPs`, `hostIP`, phase Running, Ready;
//! 4. `weft-netpol-agent serve` in the pod netns (TCP, UDP and raw-socket SCTP on every port;
//!    UDP payloads logged to `<tmp>/netpol/NS-NAME.udp.log`).
//!
//! [`NetpolModel::probe_matrix`] runs one `weft-netpol-agent probe` per source pod, all at once,
//! each probing every other pod concurrently (1 s timeout) and gives a [`Grid`];
//! [`NetpolModel::expect_eventually`] re-probes until the grid is the expected one. The
//! cases.json runner is in [`cases`]. meshd gets `NetpolOpts::meshd_args` plus the words of
//! `WEFT_NETPOL_MESHD_ARGS` from the environment.

pub mod cases;
pub mod grid;

pub use grid::Grid;

use crate::cluster::destroy_namespace;
use crate::cni::{cnitool_container_id, netns_path, result_ipv4, run_with_stdin, CNI_NET};
use crate::kube::KubeOpts;
use crate::kube_mesh::KubeMesh;
use crate::util::{ns_cmd, workspace_bin, Proc};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static AGENT_OVERRIDE: OnceLock<PathBuf> = OnceLock::new();

/// Sets the path of `weft-netpol-agent` (tests pass `env!("CARGO_BIN_EXE_weft-netpol-agent")`).
pub fn set_agent(path: impl Into<PathBuf>) {
    let _ = AGENT_OVERRIDE.set(path.into());
}

/// `WEFT_NETPOL_AGENT`, else [`set_agent`], else next to meshd.
pub fn agent_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("WEFT_NETPOL_AGENT") {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = AGENT_OVERRIDE.get() {
        return Ok(p.clone());
    }
    workspace_bin("weft-netpol-agent").context("weft-netpol-agent (part of package weft-tests)")
}

/// A protocol of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub const ALL: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Sctp];

    /// `tcp`, `udp`, `sctp`.
    pub fn lower(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }

    /// `TCP`, `UDP`, `SCTP` (Kubernetes spelling).
    pub fn upper(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
        }
    }

    pub fn parse(s: &str) -> Result<Proto> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            "sctp" => Ok(Proto::Sctp),
            _ => bail!("unknown protocol {s:?}"),
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.upper())
    }
}

/// What [`NetpolModel::new`] builds.
#[derive(Debug, Clone)]
pub struct NetpolOpts {
    pub nodes: usize,
    pub namespaces: Vec<String>,
    pub pods: Vec<String>,
    pub ports: Vec<u16>,
    pub protocols: Vec<Proto>,
    /// More meshd flags (after `--registry kube ...`).
    pub meshd_args: Vec<String>,
    pub probe_timeout: Duration,
}

impl Default for NetpolOpts {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        NetpolOpts {
            nodes: 3,
            namespaces: s(&["x", "y", "z"]),
            pods: s(&["a", "b", "c"]),
            ports: vec![80, 81],
            protocols: Proto::ALL.to_vec(),
            // KubeMesh turns enforcement off unless asked (its other tests' pods are no Pods).
            meshd_args: vec!["--network-policy".into(), "on".into()],
            probe_timeout: Duration::from_secs(1),
        }
    }
}

/// A pod of the model.
#[derive(Debug)]
pub struct ModelPod {
    pub namespace: String,
    pub name: String,
    /// Node index.
    pub node: usize,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub container_id: String,
    /// `SOURCE_IP PAYLOAD` per UDP datagram the server got.
    pub udp_log: PathBuf,
    pub server: Option<Proc>,
}

impl ModelPod {
    /// `NS/NAME`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The UDP server's log (empty when absent).
    pub fn udp_log_text(&self) -> String {
        std::fs::read_to_string(&self.udp_log).unwrap_or_default()
    }
}

/// One probe's outcome (a line of `weft-netpol-agent probe`).
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub ok: bool,
    pub ms: f64,
    pub error: Option<String>,
}

/// How [`NetpolModel::expect_eventually`] went.
#[derive(Debug, Clone)]
pub struct Convergence {
    pub protocol: Proto,
    pub port: u16,
    pub first: Grid,
    pub first_mismatches: Vec<(usize, usize)>,
    pub last: Grid,
    pub mismatches: Vec<(usize, usize)>,
    /// Matrices probed.
    pub rounds: usize,
    /// Until the grid matched (or the deadline).
    pub elapsed: Duration,
    /// Cells compared per matrix.
    pub cells: usize,
}

impl Convergence {
    pub fn converged(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// The model on a live mesh. Dropping it kills the agents and deletes the pod namespaces
/// (the [`KubeMesh`] then tears down the rest).
#[derive(Debug)]
pub struct NetpolModel {
    pub pods: Vec<ModelPod>,
    pub opts: NetpolOpts,
    pub m: KubeMesh,
    /// `<cluster tmp>/netpol`: agent and UDP logs.
    pub dir: PathBuf,
    agent: PathBuf,
    next_k: AtomicUsize,
    extra_netns: std::sync::Mutex<Vec<String>>,
}

impl Drop for NetpolModel {
    fn drop(&mut self) {
        for p in &mut self.pods {
            if let Some(mut s) = p.server.take() {
                s.terminate();
            }
            destroy_namespace(&p.netns);
        }
        if let Ok(v) = self.extra_netns.lock() {
            for ns in v.iter() {
                destroy_namespace(ns);
            }
        }
    }
}

impl NetpolModel {
    /// The control plane, 3 meshd on kube with the CNI installed, the namespaces and the 9 pods
    /// with their servers.
    pub fn new(opts: NetpolOpts) -> Result<NetpolModel> {
        let t0 = Instant::now();
        let agent = agent_bin()?;
        let m = KubeMesh::new(opts.nodes, opts.nodes, true, KubeOpts::default())?;
        let mut extra: Vec<String> = opts.meshd_args.clone();
        if let Ok(e) = std::env::var("WEFT_NETPOL_MESHD_ARGS") {
            extra.extend(e.split_whitespace().map(String::from));
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        eprintln!("netpol: meshd extra flags {extra:?}");
        for node in &m.c.nodes {
            node.cni_install()?;
            m.start_meshd(node, &extra, &[])
                .with_context(|| format!("meshd on {}", node.name))?;
            node.wait_node_json(Duration::from_secs(20))?;
            node.cni_write_conflist(CNI_NET, "1.1.0", None)?;
        }
        m.c.wait_mesh_ready(Duration::from_secs(30))?;
        let dir = m.c.tmp.join("netpol");
        std::fs::create_dir_all(&dir)?;
        let mut model = NetpolModel {
            pods: Vec::new(),
            opts,
            m,
            dir,
            agent,
            next_k: AtomicUsize::new(0),
            extra_netns: std::sync::Mutex::new(Vec::new()),
        };
        eprintln!(
            "netpol: mesh of {} nodes up in {:?}",
            model.opts.nodes,
            t0.elapsed()
        );
        for ns in model.opts.namespaces.clone() {
            model.m.kube.create_object(&json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": {"ns": ns}},
            }))?;
        }
        let mut i = 0;
        for ns in model.opts.namespaces.clone() {
            for name in model.opts.pods.clone() {
                let node = i % model.opts.nodes;
                model.add_pod(&ns, &name, node, &json!({ "pod": name }))?;
                i += 1;
            }
        }
        eprintln!("netpol: placement (pod -> node, address):");
        for p in &model.pods {
            eprintln!("  {:<6} node-{}  {}", p.key(), p.node, p.ip);
        }
        eprintln!("netpol: model ready in {:?}", t0.elapsed());
        Ok(model)
    }

    /// Pod keys in row order.
    pub fn keys(&self) -> Vec<String> {
        self.pods.iter().map(ModelPod::key).collect()
    }

    /// Pod `NS/NAME`.
    pub fn pod(&self, key: &str) -> Result<&ModelPod> {
        self.pods
            .iter()
            .find(|p| p.key() == key)
            .ok_or_else(|| anyhow!("no pod {key} in the model ({:?})", self.keys()))
    }

    pub fn pod_ip(&self, key: &str) -> Result<Ipv4Addr> {
        Ok(self.pod(key)?.ip)
    }

    fn node_name(&self, node: usize) -> String {
        self.m.c.node(node).name.clone()
    }

    // ---------------- making a pod, step by step ----------------

    /// Step 1: the Pod object (see the module doc); returns its uid.
    pub fn create_pod_object(
        &self,
        ns: &str,
        name: &str,
        node: usize,
        labels: &Value,
    ) -> Result<String> {
        let mut containers = Vec::new();
        for port in &self.opts.ports {
            for p in &self.opts.protocols {
                containers.push(json!({
                    "name": format!("cont-{port}-{}", p.lower()),
                    "image": "registry.k8s.io/e2e-test-images/agnhost:2.53",
                    "command": ["/agnhost", "serve-hostname"],
                    "ports": [{
                        "name": format!("serve-{port}-{}", p.lower()),
                        "containerPort": port,
                        "protocol": p.upper(),
                    }],
                }));
            }
        }
        let tol = |key: &str| json!({"key": key, "operator": "Exists", "effect": "NoExecute"});
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {
                "nodeName": self.node_name(node),
                "containers": containers,
                "tolerations": [tol("node.kubernetes.io/not-ready"), tol("node.kubernetes.io/unreachable")],
            },
        });
        let created = self
            .m
            .kube
            .create_object(&pod)
            .with_context(|| format!("creating Pod {ns}/{name}"))?;
        created["metadata"]["uid"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| anyhow!("Pod {ns}/{name} without a uid: {created}"))
    }

    /// An empty pod netns on `node` (lo up), deleted with the model.
    pub fn create_pod_netns(&self, node: usize) -> Result<String> {
        let k = self.next_k.fetch_add(1, Ordering::SeqCst);
        let ns = self.m.c.node(node).cni_netns(k)?;
        if let Ok(mut v) = self.extra_netns.lock() {
            v.push(ns.clone());
        }
        Ok(ns)
    }

    /// The `CNI_ARGS` a runtime passes for pod NS/NAME.
    pub fn cni_args(ns: &str, name: &str, container_id: &str, uid: &str) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};\
             K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={uid}"
        )
    }

    /// Step 2: the CNI ADD through cnitool; (address, container id, how long ADD took).
    pub fn cni_add(
        &self,
        node: usize,
        netns: &str,
        ns: &str,
        name: &str,
        uid: &str,
    ) -> Result<(Ipv4Addr, String, Duration)> {
        let cid = cnitool_container_id(&netns_path(netns))?;
        let args = Self::cni_args(ns, name, &cid, uid);
        let out =
            self.m
                .c
                .node(node)
                .cnitool_with_args("add", CNI_NET, netns, None, Some(&args))?;
        let result = out
            .result()
            .with_context(|| format!("CNI ADD of {ns}/{name}: {}", out.describe()))?;
        let ip = result_ipv4(&result)
            .ok_or_else(|| anyhow!("ADD result of {ns}/{name} without IPv4: {result}"))?;
        Ok((ip, cid, out.elapsed))
    }

    /// Step 3: `status` with the address, phase Running and Ready.
    pub fn patch_pod_status(&self, ns: &str, name: &str, node: usize, ip: Ipv4Addr) -> Result<()> {
        let host_ip = self.m.c.node(node).underlay_ip.to_string();
        let now = "2026-01-01T00:00:00Z";
        let conds: Vec<Value> = ["PodScheduled", "Initialized", "ContainersReady", "Ready"]
            .iter()
            .map(|t| json!({"type": t, "status": "True", "lastTransitionTime": now}))
            .collect();
        let status = json!({"status": {
            "phase": "Running",
            "podIP": ip.to_string(),
            "podIPs": [{"ip": ip.to_string()}],
            "hostIP": host_ip,
            "hostIPs": [{"ip": host_ip}],
            "conditions": conds,
        }});
        self.m
            .kube
            .kubectl_in(
                ns,
                &[
                    "patch",
                    "pod",
                    name,
                    "--subresource=status",
                    "--type=merge",
                    "-p",
                    &status.to_string(),
                ],
            )
            .with_context(|| format!("status of Pod {ns}/{name}"))?;
        Ok(())
    }

    /// Step 4: the agent server in `netns` (ready once it printed `ready`); (process, UDP log).
    /// It also logs every accepted TCP connection to `<dir>/NS-NAME.tcp.log`.
    pub fn start_server(&self, ns: &str, name: &str, netns: &str) -> Result<(Proc, PathBuf)> {
        let log = self.dir.join(format!("{ns}-{name}.agent.log"));
        let udp_log = self.dir.join(format!("{ns}-{name}.udp.log"));
        let tcp_log = self.dir.join(format!("{ns}-{name}.tcp.log"));
        let ports: Vec<String> = self.opts.ports.iter().map(u16::to_string).collect();
        let protos: Vec<&str> = self.opts.protocols.iter().map(|p| p.lower()).collect();
        let mut cmd = ns_cmd(netns, &self.agent);
        cmd.args(["serve", "--name", &format!("{ns}/{name}")])
            .args(["--ports", &ports.join(",")])
            .args(["--protocols", &protos.join(",")])
            .arg("--log")
            .arg(&udp_log)
            .arg("--tcp-log")
            .arg(&tcp_log);
        let mut proc = Proc::spawn_logged(&format!("agent {ns}/{name}"), &mut cmd, Some(&log))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.lines().any(|l| l.starts_with("ready ")) {
                break;
            }
            if !proc.running() || Instant::now() > deadline {
                bail!("agent server of {ns}/{name} did not start:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok((proc, udp_log))
    }

    /// Steps 1-4 for a new pod NS/NAME on `node` with `labels`.
    pub fn add_pod(&mut self, ns: &str, name: &str, node: usize, labels: &Value) -> Result<()> {
        let t = Instant::now();
        let uid = self.create_pod_object(ns, name, node, labels)?;
        let netns = self.create_pod_netns(node)?;
        let (ip, container_id, add) = self.cni_add(node, &netns, ns, name, &uid)?;
        self.patch_pod_status(ns, name, node, ip)?;
        let (server, udp_log) = self.start_server(ns, name, &netns)?;
        eprintln!(
            "netpol: pod {ns}/{name} on node-{node} at {ip} (ADD {add:?}, all {:?})",
            t.elapsed()
        );
        self.pods.push(ModelPod {
            namespace: ns.into(),
            name: name.into(),
            node,
            netns,
            ip,
            container_id,
            udp_log,
            server: Some(server),
        });
        Ok(())
    }

    // ---------------- policies and labels ----------------

    fn policy_ns(np: &Value) -> Result<&str> {
        np["metadata"]["namespace"]
            .as_str()
            .ok_or_else(|| anyhow!("NetworkPolicy without metadata.namespace: {np}"))
    }

    /// Creates a NetworkPolicy (its `metadata.namespace` is required).
    pub fn apply_policy(&self, np: &Value) -> Result<()> {
        self.write_policy("create", np)
    }

    /// Replaces an existing NetworkPolicy.
    pub fn update_policy(&self, np: &Value) -> Result<()> {
        self.write_policy("replace", np)
    }

    /// `kubectl create|replace` of `np` as a networking.k8s.io/v1 NetworkPolicy.
    fn write_policy(&self, verb: &str, np: &Value) -> Result<()> {
        let mut np = np.clone();
        np["apiVersion"] = json!("networking.k8s.io/v1");
        np["kind"] = json!("NetworkPolicy");
        let ns = Self::policy_ns(&np)?.to_string();
        self.m
            .kube
            .kubectl_stdin(&["-n", &ns, verb, "-f", "-"], np.to_string().as_bytes())
            .with_context(|| format!("{verb} NetworkPolicy {np}"))?;
        Ok(())
    }

    /// Deletes NetworkPolicy `NS/NAME`.
    pub fn delete_policy(&self, key: &str) -> Result<()> {
        let (ns, name) = key
            .split_once('/')
            .ok_or_else(|| anyhow!("policy {key:?} is not NS/NAME"))?;
        self.m
            .kube
            .kubectl_in(ns, &["delete", "networkpolicy", name, "--wait=true"])?;
        Ok(())
    }

    /// Deletes every NetworkPolicy of the model's namespaces.
    pub fn delete_all_policies(&self) -> Result<()> {
        for ns in &self.opts.namespaces {
            self.m
                .kube
                .kubectl_in(ns, &["delete", "networkpolicy", "--all", "--wait=true"])?;
        }
        Ok(())
    }

    /// Sets the labels of pod `NS/NAME` to exactly `labels` (an object).
    pub fn set_pod_labels(&self, key: &str, labels: &Value) -> Result<()> {
        let p = self.pod(key)?;
        let patch = json!([{"op": "add", "path": "/metadata/labels", "value": labels}]);
        self.m.kube.kubectl_in(
            &p.namespace,
            &[
                "patch",
                "pod",
                &p.name,
                "--type=json",
                "-p",
                &patch.to_string(),
            ],
        )?;
        Ok(())
    }

    /// Sets the labels of namespace `ns` to exactly `labels` (plus the
    /// `kubernetes.io/metadata.name` label the API server keeps on every namespace).
    pub fn set_namespace_labels(&self, ns: &str, labels: &Value) -> Result<()> {
        let mut l = labels.clone();
        l["kubernetes.io/metadata.name"] = json!(ns);
        let patch = json!([{"op": "add", "path": "/metadata/labels", "value": l}]);
        self.m.kube.kubectl(&[
            "patch",
            "namespace",
            ns,
            "--type=json",
            "-p",
            &patch.to_string(),
        ])?;
        Ok(())
    }

    /// Every policy gone, every label back to `ns: NAME` / `pod: NAME`.
    pub fn reset(&self) -> Result<()> {
        self.delete_all_policies()?;
        for ns in &self.opts.namespaces {
            self.set_namespace_labels(ns, &json!({ "ns": ns }))?;
        }
        for p in &self.pods {
            self.set_pod_labels(&p.key(), &json!({ "pod": p.name }))?;
        }
        Ok(())
    }

    // ---------------- probing ----------------

    /// Runs `weft-netpol-agent probe` in pod `from` on `targets` (proto, ip, port); results in
    /// the same order.
    pub fn probe_from(
        &self,
        from: &str,
        targets: &[(Proto, Ipv4Addr, u16)],
    ) -> Result<Vec<ProbeResult>> {
        let netns = &self.pod(from)?.netns;
        self.probe_in(netns, targets)
    }

    /// [`NetpolModel::probe_from`] in any network namespace.
    pub fn probe_in(
        &self,
        netns: &str,
        targets: &[(Proto, Ipv4Addr, u16)],
    ) -> Result<Vec<ProbeResult>> {
        let stdin: String = targets
            .iter()
            .map(|(p, ip, port)| format!("{} {ip} {port}\n", p.lower()))
            .collect();
        let mut cmd = ns_cmd(netns, &self.agent);
        cmd.args([
            "probe",
            "--timeout-ms",
            &self.opts.probe_timeout.as_millis().to_string(),
        ]);
        let out = run_with_stdin(
            &mut cmd,
            stdin.as_bytes(),
            self.opts.probe_timeout + Duration::from_secs(20),
        )?;
        if !out.success() {
            bail!("prober in {netns} failed: {}", out.describe());
        }
        let lines: Vec<&str> = out
            .stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        if lines.len() != targets.len() {
            bail!(
                "prober in {netns}: {} results for {} probes: {}",
                lines.len(),
                targets.len(),
                out.describe()
            );
        }
        lines
            .iter()
            .map(|l| {
                let v: Value = serde_json::from_str(l)
                    .with_context(|| format!("prober in {netns} printed {l:?}"))?;
                Ok(ProbeResult {
                    ok: v["ok"].as_bool().unwrap_or(false),
                    ms: v["ms"].as_f64().unwrap_or(0.0),
                    error: v["error"].as_str().map(String::from),
                })
            })
            .collect()
    }

    /// The whole matrix for `proto`/`port`: every pod probes every other pod, one prober
    /// process per source pod, all in parallel.
    pub fn probe_matrix(&self, proto: Proto, port: u16) -> Result<Grid> {
        let t = Instant::now();
        let grid = self.probe_matrix_quiet(proto, port)?;
        eprintln!(
            "netpol: {proto}/{port}: {} probes, {} reachable, in {:?}",
            grid.compared(&grid),
            grid.reachable(),
            t.elapsed()
        );
        Ok(grid)
    }

    fn probe_matrix_quiet(&self, proto: Proto, port: u16) -> Result<Grid> {
        let keys = self.keys();
        let mut grid = Grid::empty(&keys);
        let results: Vec<Result<Vec<ProbeResult>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..self.pods.len())
                .map(|i| {
                    let targets: Vec<(Proto, Ipv4Addr, u16)> = self
                        .pods
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, p)| (proto, p.ip, port))
                        .collect();
                    let netns = self.pods[i].netns.clone();
                    s.spawn(move || self.probe_in(&netns, &targets))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow!("prober thread panicked")))
                })
                .collect()
        });
        for (i, r) in results.into_iter().enumerate() {
            let r = r?;
            let cols = (0..self.pods.len()).filter(|j| *j != i);
            for (j, pr) in cols.zip(r) {
                grid.cells[i][j] = Some(pr.ok);
            }
        }
        Ok(grid)
    }

    /// Probes `proto`/`port` until the grid equals `expected` or `within` has passed; prints the
    /// first mismatches and how long it took.
    pub fn expect_eventually(
        &self,
        proto: Proto,
        port: u16,
        expected: &Grid,
        within: Duration,
    ) -> Result<Convergence> {
        let t = Instant::now();
        let first = self.probe_matrix_quiet(proto, port)?;
        let first_mismatches = first.mismatches(expected);
        let cells = first.compared(expected);
        if !first_mismatches.is_empty() {
            eprintln!(
                "netpol: {proto}/{port}: first probe has {} of {cells} cells wrong:\n{}",
                first_mismatches.len(),
                first.pretty_against(Some(expected))
            );
        }
        let mut last = first.clone();
        let mut mismatches = first_mismatches.clone();
        let mut rounds = 1;
        while !mismatches.is_empty() && t.elapsed() < within {
            std::thread::sleep(Duration::from_millis(200));
            last = self.probe_matrix_quiet(proto, port)?;
            mismatches = last.mismatches(expected);
            rounds += 1;
        }
        let elapsed = t.elapsed();
        if mismatches.is_empty() {
            eprintln!("netpol: {proto}/{port}: {cells} cells as expected after {rounds} round(s), {elapsed:?}");
        } else {
            eprintln!(
                "netpol: {proto}/{port}: still {} of {cells} cells wrong after {rounds} rounds, {elapsed:?}:\n{}",
                mismatches.len(),
                last.pretty_against(Some(expected))
            );
        }
        Ok(Convergence {
            protocol: proto,
            port,
            first,
            first_mismatches,
            last,
            mismatches,
            rounds,
            elapsed,
            cells,
        })
    }

    /// meshd's flags of this model: `NetpolOpts::meshd_args` and `WEFT_NETPOL_MESHD_ARGS`.
    pub fn meshd_args(&self) -> Vec<String> {
        let mut v = self.opts.meshd_args.clone();
        if let Ok(e) = std::env::var("WEFT_NETPOL_MESHD_ARGS") {
            v.extend(e.split_whitespace().map(String::from));
        }
        v
    }

    /// Restarts meshd on every node with the model's flags plus `extra` (SIGTERM, then
    /// [`KubeMesh::start_meshd`]) and waits for the mesh.
    pub fn restart_meshd(&self, extra: &[&str]) -> Result<()> {
        let mut args = self.meshd_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        for n in &self.m.c.nodes {
            let _ = n.stop_meshd(libc::SIGTERM);
            self.m
                .start_meshd(n, &args, &[])
                .with_context(|| format!("meshd {args:?} on {}", n.name))?;
        }
        self.m.c.wait_mesh_ready(Duration::from_secs(30))
    }

    /// meshd's status on the node of pod `key`.
    pub fn node_status_of(&self, key: &str) -> Result<Value> {
        let p = self.pod(key)?;
        self.m.c.node(p.node).status_json()
    }
}
