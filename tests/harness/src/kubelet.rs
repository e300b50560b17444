//! Real Kubernetes nodes on one machine: a control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, from `scripts/kube-bins.sh`) in the cluster's switch
//! namespace and, per node, a containerd and a kubelet inside that node's network namespace.
//! weft is then deployed the way a user deploys it: `kubectl apply -k` of `deploy/` (an overlay
//! changes the image tag and pull policy only), its image built here and imported into every
//! node's containerd.
//!
//! In: the netns [`Cluster`] (node namespaces on the underlay bridge), the binaries of the pinned
//! release (kubelet and kube-scheduler too), Debian's containerd, runc, ctr, umoci, busybox
//! (static) and buildah. Out: [`RealCluster`], whose nodes register, go Ready once a CNI config
//! is in their conf dir, and run Pods.
//!
//! Per node (`<node dir>/k8s`):
//! - a mount namespace (`/run/weft-harness-mnt/<netns>`, slave of the host's) in which per-node
//!   directories are bind-mounted over the paths a real node has: `/etc/cni/net.d`,
//!   `/opt/cni/bin`, `/var/lib/weft`, `/run/weft` (the DaemonSet's hostPaths, so weft's init
//!   container writes where this node's containerd reads), `/var/lib/kubelet`,
//!   `/var/lib/containerd`, `/run/containerd`, `/var/log/pods`, `/var/log/containers` and
//!   `/run/netns` (containerd's pod namespaces). Every mount containerd and the kubelet make stays
//!   in there and goes with it.
//! - containerd (Debian 1.6) with `restrict_oom_score_adj` (root here lacks CAP_SYS_RESOURCE),
//!   sandbox image `localhost/weft-pause:test` (imported, never pulled), runc with cgroupfs.
//! - kubelet with its own client certificate (`CN=system:node:NAME`, `O=system:nodes`; the API
//!   server runs the Node authorizer and NodeRestriction), `cgroupDriver: cgroupfs`,
//!   `failCgroupV1: false` (this host has cgroup v1), its own `cgroupRoot`, `resolvConf: ""`.
//!   Started with `nsenter --net --mount` (under `ip netns exec` it fails: /sys is remounted).
//! - the `kubernetes` Service (10.96.0.1:443) reaches the API server through one nftables DNAT
//!   rule in the node's namespace: a stand-in for kube-proxy, which is not run here. It is what
//!   makes meshd's in-cluster config work unchanged.
//!
//! Nothing leaves the machine: the API server prefers InternalIP for kubelets, the kubelet reads
//! no resolv.conf, images are imported. The guard tears everything down on drop: processes in
//! each node's cgroups and namespace, the mount namespace, the cgroups.

use crate::cluster::{Cluster, ClusterOpts, UNDERLAY_ROUTER};
use crate::kube::{sign_cert, write_kubeconfig, KubeControlPlane, KubeOpts, KubeconfigUser};
use crate::util::{kill_pid, run, run_args, tail, wait_until, workspace_bin, Proc};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where the per-node mount namespaces are pinned.
pub const MNT_DIR: &str = "/run/weft-harness-mnt";
/// The sandbox (pause) image every node's containerd uses.
pub const PAUSE_IMAGE: &str = "localhost/weft-pause:test";
/// The workload image (busybox: sh, sleep, ping, nc).
pub const BUSYBOX_IMAGE: &str = "localhost/weft-busybox:test";
/// The weft image the tier deploys.
pub const WEFT_IMAGE: &str = "localhost/weft:test";
/// Cluster CIDR the controller manager allocates `Node.spec.podCIDRs` from (as k3s does).
pub const REAL_CLUSTER_CIDR: &str = "10.42.0.0/16";
/// cgroup v1 controllers the kubelet uses.
const CGROUP_CONTROLLERS: &[&str] = &[
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "systemd",
];
/// Paths bind-mounted per node (host path, per-node dir name).
const NODE_BINDS: &[(&str, &str)] = &[
    ("/etc/cni/net.d", "etc-cni-net.d"),
    ("/opt/cni/bin", "opt-cni-bin"),
    ("/var/lib/weft", "var-lib-weft"),
    ("/run/weft", "run-weft"),
    // meshd's WireGuard UAPI socket (the DaemonSet mounts the host's /var/run/wireguard).
    ("/run/wireguard", "run-wireguard"),
    ("/var/lib/kubelet", "var-lib-kubelet"),
    ("/var/lib/containerd", "var-lib-containerd"),
    ("/run/containerd", "run-containerd"),
    ("/var/log/pods", "var-log-pods"),
    ("/var/log/containers", "var-log-containers"),
    ("/run/netns", "run-netns"),
];

/// Host programs the tier needs (Debian packages named in scripts/install-test-deps.sh).
pub fn require_tools() -> Result<()> {
    let missing: Vec<&str> = [
        "containerd",
        "containerd-shim-runc-v2",
        "runc",
        "ctr",
        "umoci",
        "busybox",
        "buildah",
        "nsenter",
        "unshare",
        "nft",
        "openssl",
    ]
    .into_iter()
    .filter(|p| crate::util::find_program(p).is_none())
    .collect();
    if !missing.is_empty() {
        bail!("the real-node tier needs {missing:?} on PATH: run scripts/install-test-deps.sh");
    }
    Ok(())
}

/// One kubelet node.
#[derive(Debug)]
pub struct RealNode {
    pub name: String,
    /// The node's network namespace (a harness node).
    pub ns: String,
    pub ip: Ipv4Addr,
    /// `<node dir>/k8s`.
    pub dir: PathBuf,
    /// The pinned mount namespace.
    pub mnt: PathBuf,
    /// `/weft-<short>-<name>`: the kubelet's cgroupRoot in every controller.
    pub cgroup_root: String,
    pub containerd_log: PathBuf,
    pub kubelet_log: PathBuf,
    containerd: Mutex<Option<Proc>>,
    kubelet: Mutex<Option<Proc>>,
}

/// A control plane with a scheduler and kubelet nodes. Dropping it stops the nodes first, then
/// the control plane, then deletes the namespaces.
#[derive(Debug)]
pub struct RealCluster {
    /// Started nodes, in start order.
    pub nodes: Vec<RealNode>,
    scheduler: Mutex<Option<Proc>>,
    pub scheduler_log: PathBuf,
    pub cp: KubeControlPlane,
    pub cluster: Cluster,
    /// Image archives (OCI) imported into every node: pause, busybox, weft.
    pub image_tars: Vec<PathBuf>,
    /// `<cluster tmp>/real`.
    pub dir: PathBuf,
    /// Pod network namespaces made visible in /run/netns ([`RealCluster::pod_netns`]).
    pod_netns: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

impl RealCluster {
    /// The control plane plus `netns_nodes` node namespaces; kubelets are started on none of
    /// them yet ([`RealCluster::start_node`]). Builds the images first.
    pub fn new(netns_nodes: usize) -> Result<RealCluster> {
        require_tools()?;
        let bin = crate::kube::kube_bin_dir()?;
        for b in ["kubelet", "kube-scheduler"] {
            if !bin.join(b).is_file() {
                bail!(
                    "{b} not found in {}: run scripts/kube-bins.sh (it builds kubelet and \
                     kube-scheduler too)",
                    bin.display()
                );
            }
        }
        let cluster = Cluster::new(netns_nodes, ClusterOpts::default())?;
        let dir = cluster.tmp.join("real");
        std::fs::create_dir_all(&dir)?;
        let t = Instant::now();
        let image_tars = build_images(&dir.join("images")).context("building the images")?;
        eprintln!(
            "real-nodes: images built in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        // The controller manager gets every permission (its per-controller roles are not
        // bootstrapped the way this harness starts it).
        let kcm_binding = user_binding(
            "weft-harness:kube-controller-manager-all",
            "cluster-admin",
            "system:kube-controller-manager",
        );
        let pki_dir = cluster.tmp.join("kube").join("pki");
        let opts = KubeOpts {
            controller_manager: true,
            service_account_admission: true,
            kcm_controllers: [
                "garbagecollector",
                "daemonset",
                "deployment",
                "replicaset",
                "serviceaccount",
                "root-ca-cert-publisher",
                "nodeipam",
                "nodelifecycle",
                "namespace",
                "podgc",
            ]
            .map(String::from)
            .to_vec(),
            kcm_args: vec![
                "--allocate-node-cidrs=true".into(),
                format!("--cluster-cidr={REAL_CLUSTER_CIDR}"),
                "--node-cidr-mask-size=24".into(),
                format!(
                    "--service-cluster-ip-range={}",
                    crate::kube::SERVICE_CLUSTER_IP_RANGE
                ),
                format!("--root-ca-file={}", p(&pki_dir.join("ca.pem"))),
                "--node-monitor-grace-period=20s".into(),
            ],
            apiserver_args: vec![
                // The API server's client certificate towards kubelets (logs, exec).
                format!(
                    "--kubelet-client-certificate={}",
                    p(&pki_dir.join("admin.pem"))
                ),
                format!("--kubelet-client-key={}", p(&pki_dir.join("admin.key"))),
            ],
            manifests: vec![
                kcm_binding,
                user_binding("weft-admin-weft-operator", "weft-admin", KEYCTL_USER),
            ],
            ..KubeOpts::default()
        };
        let cp = cluster.start_kube(opts)?;
        let scheduler_log = cp.dir.join("kube-scheduler.log");
        let rc = RealCluster {
            nodes: Vec::new(),
            scheduler: Mutex::new(None),
            scheduler_log,
            cp,
            cluster,
            image_tars,
            dir,
            pod_netns: Mutex::new(Vec::new()),
        };
        rc.start_scheduler()?;
        Ok(rc)
    }

    fn start_scheduler(&self) -> Result<()> {
        let pki = &self.cp.pki.dir;
        sign_cert(
            pki,
            "kube-scheduler",
            "/CN=system:kube-scheduler",
            "extendedKeyUsage=clientAuth\n",
        )?;
        let kc = self.cp.dir.join("kube-scheduler.kubeconfig");
        write_kubeconfig(
            &kc,
            &self.cp.server_url(),
            &self.cp.pki.ca,
            KubeconfigUser::Cert(
                &pki.join("kube-scheduler.pem"),
                &pki.join("kube-scheduler.key"),
            ),
            "system:kube-scheduler",
        )?;
        let mut cmd = crate::util::ns_cmd(&self.cp.ns, self.cp.bin("kube-scheduler"));
        cmd.args([
            format!("--kubeconfig={}", p(&kc)),
            format!("--authentication-kubeconfig={}", p(&kc)),
            format!("--authorization-kubeconfig={}", p(&kc)),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--secure-port=10259".into(),
            format!("--cert-dir={}", p(&pki.join("scheduler-serving"))),
            "--profiling=false".into(),
        ]);
        let proc = Proc::spawn_logged("kube-scheduler", &mut cmd, Some(&self.scheduler_log))?;
        *lock(&self.scheduler) = Some(proc);
        Ok(())
    }

    /// Starts containerd and the kubelet on harness node `i` (`node-<i>`), imports the images,
    /// and waits until the Node object exists. Returns the index into [`RealCluster::nodes`].
    pub fn start_node(&mut self, i: usize) -> Result<usize> {
        let hn = self.cluster.node(i);
        let (name, ns, ip) = (hn.name.clone(), hn.ns.clone(), hn.underlay_ip);
        let dir = hn.dir.join("k8s");
        let node = RealNode {
            mnt: PathBuf::from(MNT_DIR).join(&ns),
            cgroup_root: format!("/weft-{}-{}", self.cluster.short, name),
            containerd_log: dir.join("containerd.log"),
            kubelet_log: dir.join("kubelet.log"),
            name,
            ns,
            ip,
            dir,
            containerd: Mutex::new(None),
            kubelet: Mutex::new(None),
        };
        // Pushed first so a failure below still tears it down.
        self.nodes.push(node);
        let idx = self.nodes.len() - 1;
        let node = &self.nodes[idx];
        let t = Instant::now();
        node.setup_mounts()?;
        node.setup_cgroups()?;
        node.setup_service_dnat()?;
        node.start_containerd()?;
        for tar in &self.image_tars {
            node.import_image(tar)?;
        }
        node.start_kubelet(&self.cp)?;
        let registered = wait_until(Duration::from_secs(60), || {
            !node.kubelet_running()
                || self
                    .cp
                    .kubectl_output(&self.cp.admin_kubeconfig, &["get", "node", &node.name])
                    .is_ok_and(|o| o.success())
        });
        if !node.kubelet_running() {
            bail!(
                "kubelet on {} exited; log:\n{}",
                node.name,
                tail(&node.kubelet_log, 40)
            );
        }
        if !registered {
            bail!(
                "Node {} not registered within 60 s; kubelet log:\n{}",
                node.name,
                tail(&node.kubelet_log, 40)
            );
        }
        eprintln!(
            "real-nodes: {} ({}) registered {:.1} s after setup began",
            node.name,
            node.ip,
            t.elapsed().as_secs_f64()
        );
        Ok(idx)
    }

    /// The started node named `name`.
    pub fn node(&self, name: &str) -> Result<&RealNode> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow!("no started node {name}"))
    }

    /// Stops node `name`'s kubelet and containerd and everything they ran (the Node object
    /// stays: delete it through the API).
    pub fn stop_node(&mut self, name: &str) -> Result<()> {
        let pos = self
            .nodes
            .iter()
            .position(|n| n.name == name)
            .ok_or_else(|| anyhow!("no started node {name}"))?;
        let n = self.nodes.remove(pos);
        drop(n);
        Ok(())
    }

    /// kubectl as admin (in the switch namespace).
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.cp.kubectl(args)
    }

    /// Runs a function of `tests/e2e/lib.sh` (the assertions tests/e2e/k3d.sh uses) with bash,
    /// as admin, in the switch namespace: `args[0]` is the function, the rest its arguments.
    /// Its log lines (stderr) go to the test's stderr; returns stdout; fails when it fails.
    pub fn e2e(&self, args: &[&str]) -> Result<String> {
        let lib = repo_root().join("tests/e2e/lib.sh");
        let mut cmd = crate::util::ns_cmd(&self.cp.ns, "bash");
        cmd.arg("-c")
            .arg(r#"set -euo pipefail; . "$E2E_LIB"; "$@""#)
            .arg("e2e")
            .args(args)
            .env("E2E_LIB", &lib)
            .env("KUBECTL", self.cp.bin("kubectl"))
            .env("KUBECONFIG", &self.cp.admin_kubeconfig)
            .env("KUBECACHEDIR", self.cp.dir.join("kubectl-cache"))
            .stderr(std::process::Stdio::inherit());
        let out = cmd
            .output()
            .with_context(|| format!("running lib.sh {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "lib.sh {} failed ({}); stdout: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl get -o json` of one object or list.
    pub fn get_json(&self, args: &[&str]) -> Result<Value> {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        let s = self.kubectl(&a)?;
        serde_json::from_str(&s).context("parsing kubectl get -o json")
    }

    /// The network namespace of pod `pod` (namespace `ns`) made visible as a named namespace in
    /// /run/netns (`ip netns attach` of its container's process), so harness traffic tools
    /// (ping with timestamps, captures) run in the pod exactly as its own processes do.
    /// Detached when the cluster is dropped.
    pub fn pod_netns(&self, ns: &str, pod: &str) -> Result<String> {
        let p = self.get_json(&["pod", "-n", ns, pod])?;
        let node = p["spec"]["nodeName"]
            .as_str()
            .ok_or_else(|| anyhow!("pod {ns}/{pod} is not scheduled"))?;
        let cid = p["status"]["containerStatuses"][0]["containerID"]
            .as_str()
            .and_then(|c| c.strip_prefix("containerd://"))
            .ok_or_else(|| anyhow!("pod {ns}/{pod} has no running container yet"))?
            .to_string();
        let tasks = self.node(node)?.ctr(&["task", "ls"])?;
        let pid = tasks
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((f.next()?, f.next()?))
            })
            .find(|(id, _)| *id == cid)
            .map(|(_, pid)| pid.to_string())
            .ok_or_else(|| anyhow!("container {cid} of {ns}/{pod} not in `ctr task ls`"))?;
        let mut list = lock(&self.pod_netns);
        let name = format!("{}-pod{}", self.cluster.prefix, list.len());
        run_args("ip", &["netns", "attach", &name, &pid])
            .with_context(|| format!("ip netns attach {name} {pid} ({ns}/{pod})"))?;
        list.push(name.clone());
        Ok(name)
    }

    /// keyctl (this build's) with `--registry kube` as user `weft-operator` (bound to the
    /// `weft-admin` ClusterRole only), from the switch namespace: an operator outside the
    /// cluster. Returns stdout; fails with its stderr.
    pub fn keyctl(&self, args: &[&str], timeout: Duration) -> Result<String> {
        let pki = &self.cp.pki.dir;
        let kc = self.cp.dir.join("keyctl.kubeconfig");
        if !kc.exists() {
            sign_cert(
                pki,
                KEYCTL_USER,
                &format!("/CN={KEYCTL_USER}"),
                "extendedKeyUsage=clientAuth\n",
            )?;
            write_kubeconfig(
                &kc,
                &self.cp.server_url(),
                &self.cp.pki.ca,
                KubeconfigUser::Cert(
                    &pki.join(format!("{KEYCTL_USER}.pem")),
                    &pki.join(format!("{KEYCTL_USER}.key")),
                ),
                KEYCTL_USER,
            )?;
        }
        let out = crate::kube::keyctl_on_kube(&self.cp.ns, &kc, args, timeout)?;
        if !out.status.success() {
            bail!(
                "keyctl {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Diagnostics for a failed test: nodes, pods, weft's objects, the last log lines.
    pub fn debug_report(&self) -> String {
        let mut s = String::new();
        for args in [
            vec!["get", "nodes", "-o", "wide"],
            vec!["get", "pods", "-A", "-o", "wide"],
            vec!["get", "meshnodes", "-o", "wide"],
            vec!["get", "events", "-A", "--sort-by=.lastTimestamp"],
        ] {
            s.push_str(&format!("$ kubectl {}\n", args.join(" ")));
            match self.cp.kubectl_output(&self.cp.admin_kubeconfig, &args) {
                Ok(o) => {
                    let text = format!("{}{}", o.stdout, o.stderr);
                    let lines: Vec<&str> = text.lines().collect();
                    let from = lines.len().saturating_sub(40);
                    s.push_str(&lines[from..].join("\n"));
                    s.push('\n');
                }
                Err(e) => s.push_str(&format!("{e:#}\n")),
            }
        }
        for n in &self.nodes {
            s.push_str(&format!(
                "--- {} kubelet log ---\n{}\n--- {} containerd log ---\n{}\n",
                n.name,
                tail(&n.kubelet_log, 15),
                n.name,
                tail(&n.containerd_log, 10)
            ));
        }
        s
    }
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        for ns in lock(&self.pod_netns).drain(..) {
            let _ = Command::new("ip").args(["netns", "delete", &ns]).output();
        }
        // Nodes first (their pods), while the API server still answers.
        self.nodes.clear();
        if let Some(mut s) = lock(&self.scheduler).take() {
            s.terminate();
        }
    }
}

/// The operator who runs keyctl: user `weft-operator` (a client certificate) bound to the
/// `weft-admin` ClusterRole of deploy/, as README tells an operator to do.
const KEYCTL_USER: &str = "weft-operator";

/// A ClusterRoleBinding of `role` to user `user`.
fn user_binding(name: &str, role: &str, user: &str) -> String {
    format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  \
         name: {name}\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  \
         name: {role}\nsubjects:\n- apiGroup: rbac.authorization.k8s.io\n  kind: User\n  \
         name: {user}\n"
    )
}

/// The repository root (two levels above this crate's manifest).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

impl RealNode {
    fn bind_src(&self, name: &str) -> PathBuf {
        self.dir.join("root").join(name)
    }

    /// Host path of this node's `path` (one of the bind-mounted ones, e.g. `/var/lib/weft`).
    pub fn host_path(&self, path: &str) -> Result<PathBuf> {
        for (target, name) in NODE_BINDS {
            if let Some(rest) = path.strip_prefix(target) {
                let rest = rest.trim_start_matches('/');
                let base = self.bind_src(name);
                return Ok(if rest.is_empty() {
                    base
                } else {
                    base.join(rest)
                });
            }
        }
        bail!("{path} is not a per-node path")
    }

    fn setup_mounts(&self) -> Result<()> {
        for (target, name) in NODE_BINDS {
            std::fs::create_dir_all(self.bind_src(name))?;
            std::fs::create_dir_all(target)
                .with_context(|| format!("creating mount point {target}"))?;
        }
        // What a node image has in its CNI bin dir: the loopback plugin (containerd's CRI sets up
        // each pod's lo with it).
        std::fs::copy(
            "/usr/lib/cni/loopback",
            self.bind_src("opt-cni-bin").join("loopback"),
        )
        .context("copying /usr/lib/cni/loopback (containernetworking-plugins)")?;
        // A private mount point to pin mount namespaces on (as `ip netns` does for /run/netns).
        std::fs::create_dir_all(MNT_DIR)?;
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(MNT_DIR)))
            .unwrap_or(false);
        if !mounted {
            run_args("mount", &["--bind", MNT_DIR, MNT_DIR])?;
            run_args("mount", &["--make-private", MNT_DIR])?;
        }
        std::fs::write(&self.mnt, b"")?;
        let mut script = String::from("set -e\n");
        for (target, name) in NODE_BINDS {
            script.push_str(&format!(
                "mount --bind '{}' '{target}'\n",
                p(&self.bind_src(name))
            ));
        }
        run(Command::new("unshare")
            .arg(format!("--mount={}", p(&self.mnt)))
            .args(["--propagation", "slave", "sh", "-c", &script]))
        .context("making the node's mount namespace")?;
        Ok(())
    }

    fn setup_cgroups(&self) -> Result<()> {
        for c in CGROUP_CONTROLLERS {
            let base = Path::new("/sys/fs/cgroup").join(c);
            if !base.is_dir() {
                continue;
            }
            let d = base.join(self.cgroup_root.trim_start_matches('/'));
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            if *c == "cpuset" {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = std::fs::read_to_string(base.join(f))?;
                    std::fs::write(d.join(f), v.trim())
                        .with_context(|| format!("writing {}", d.join(f).display()))?;
                }
            }
        }
        Ok(())
    }

    /// The `kubernetes` Service (10.96.0.1:443) → the API server (198.18.0.1:6443), for
    /// processes of this node (hostNetwork pods: meshd): what kube-proxy would program.
    fn setup_service_dnat(&self) -> Result<()> {
        let rules = format!(
            "table ip weft-harness-svc {{\n  chain out {{\n    type nat hook output priority -100;\n    \
             ip daddr 10.96.0.1 tcp dport 443 dnat to {UNDERLAY_ROUTER}:{}\n  }}\n}}\n",
            crate::kube::APISERVER_PORT
        );
        let f = self.dir.join("svc.nft");
        std::fs::create_dir_all(&self.dir)?;
        std::fs::write(&f, rules)?;
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "-f"])
            .arg(&f))
        .context("the kubernetes Service DNAT")?;
        Ok(())
    }

    /// `nsenter` into this node's network and mount namespaces.
    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns))
            .arg(format!("--mount={}", p(&self.mnt)))
            .arg("--")
            .arg(prog);
        c
    }

    fn start_containerd(&self) -> Result<()> {
        let conf = self.dir.join("containerd.toml");
        std::fs::write(
            &conf,
            format!(
                r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.opt",
  "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp",
]
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
"#
            ),
        )?;
        let mut cmd = self.cmd("containerd");
        cmd.arg("--config").arg(&conf);
        let proc = Proc::spawn_logged(
            &format!("containerd@{}", self.name),
            &mut cmd,
            Some(&self.containerd_log),
        )?;
        *lock(&self.containerd) = Some(proc);
        let sock = self.host_path("/run/containerd/containerd.sock")?;
        let up = wait_until(Duration::from_secs(30), || {
            !running(&self.containerd) || (sock.exists() && self.ctr(&["version"]).is_ok())
        });
        if !running(&self.containerd) || !up {
            bail!(
                "containerd on {} did not come up; log:\n{}",
                self.name,
                tail(&self.containerd_log, 30)
            );
        }
        Ok(())
    }

    /// `ctr -n k8s.io ARGS` against this node's containerd.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.cmd("ctr");
        cmd.args(["-n", "k8s.io"]).args(args);
        run(&mut cmd)
    }

    /// Imports an OCI archive into this node's containerd (namespace k8s.io).
    pub fn import_image(&self, tar: &Path) -> Result<()> {
        let mut cmd = self.cmd("ctr");
        cmd.args(["-n", "k8s.io", "images", "import", "--all-platforms"])
            .arg(tar);
        run(&mut cmd).with_context(|| format!("importing {} on {}", tar.display(), self.name))?;
        Ok(())
    }

    fn start_kubelet(&self, cp: &KubeControlPlane) -> Result<()> {
        let pki = self.dir.join("pki");
        std::fs::create_dir_all(&pki)?;
        std::fs::copy(&cp.pki.ca, pki.join("ca.pem"))?;
        std::fs::copy(&cp.pki.ca_key, pki.join("ca.key"))?;
        sign_cert(
            &pki,
            "kubelet-client",
            &format!("/O=system:nodes/CN=system:node:{}", self.name),
            "extendedKeyUsage=clientAuth\n",
        )?;
        sign_cert(
            &pki,
            "kubelet-serving",
            &format!("/CN={}", self.name),
            &format!(
                "extendedKeyUsage=serverAuth\nsubjectAltName=IP:{},DNS:{}\n",
                self.ip, self.name
            ),
        )?;
        std::fs::remove_file(pki.join("ca.key"))?;
        let kc = self.dir.join("kubelet.kubeconfig");
        write_kubeconfig(
            &kc,
            &cp.server_url(),
            &cp.pki.ca,
            KubeconfigUser::Cert(
                &pki.join("kubelet-client.pem"),
                &pki.join("kubelet-client.key"),
            ),
            &format!("system:node:{}", self.name),
        )?;
        let cfg = self.dir.join("kubelet.yaml");
        std::fs::write(
            &cfg,
            format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: {cert}
tlsPrivateKeyFile: {key}
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: false
  x509:
    clientCAFile: {ca}
authorization:
  mode: AlwaysAllow
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: {cgroot}
failCgroupV1: false
failSwapOn: false
resolvConf: ""
clusterDomain: cluster.local
makeIPTablesUtilChains: false
localStorageCapacityIsolation: false
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "0%"
  nodefs.inodesFree: "0%"
  imagefs.available: "0%"
  imagefs.inodesFree: "0%"
rotateCertificates: false
serverTLSBootstrap: false
nodeStatusReportFrequency: 1m
"#,
                ip = self.ip,
                cert = p(&pki.join("kubelet-serving.pem")),
                key = p(&pki.join("kubelet-serving.key")),
                ca = p(&cp.pki.ca),
                cgroot = self.cgroup_root,
            ),
        )?;
        let mut cmd = self.cmd(&p(&cp.bin("kubelet")));
        cmd.args([
            format!("--config={}", p(&cfg)),
            format!("--kubeconfig={}", p(&kc)),
            format!("--hostname-override={}", self.name),
            format!("--node-ip={}", self.ip),
            "--v=1".into(),
        ]);
        let proc = Proc::spawn_logged(
            &format!("kubelet@{}", self.name),
            &mut cmd,
            Some(&self.kubelet_log),
        )?;
        *lock(&self.kubelet) = Some(proc);
        Ok(())
    }

    pub fn kubelet_running(&self) -> bool {
        running(&self.kubelet)
    }

    /// Stops the kubelet only (containers keep running, as on a node whose kubelet died).
    pub fn stop_kubelet(&self) {
        if let Some(mut k) = lock(&self.kubelet).take() {
            k.terminate();
        }
    }

    /// meshd's status (`meshd status --json`) through this node's API socket, the DaemonSet's
    /// `/run/weft` hostPath.
    pub fn meshd_status(&self) -> Result<Value> {
        crate::cluster::meshd_status_at(&self.ns, &self.host_path("/run/weft/meshd.sock")?)
            .with_context(|| format!("meshd status on {}", self.name))
    }

    /// `wg ARGS` (Debian's) on this node, in its mount namespace: it reads meshd's UAPI socket
    /// through the DaemonSet's /var/run/wireguard hostPath.
    pub fn wg(&self, args: &[&str]) -> Result<String> {
        let mut a = vec![format!("--mount={}", self.mnt.display()), "wg".to_string()];
        a.extend(args.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        run_args("nsenter", &a).with_context(|| format!("wg {args:?} on {}", self.name))
    }

    /// `GET http://NODE_IP:9473/metrics` (the DaemonSet's metrics port) from the node's
    /// namespace, in the classic text format.
    pub fn metrics(&self) -> Result<String> {
        let url = format!("http://{}:9473/metrics", self.ip);
        crate::util::run_in(&self.ns, "curl", &["-sS", "--max-time", "5", &url])
            .with_context(|| format!("scraping meshd on {}", self.name))
    }

    /// Names of the peers in this node's meshd status, sorted.
    pub fn meshd_peers(&self) -> Result<Vec<String>> {
        let mut v = crate::cluster::status_peer_names_of(&self.meshd_status()?);
        v.sort();
        Ok(v)
    }

    /// weft-cni's allocations on this node (`/var/lib/weft/cni/networks/*/ADDR`): (address,
    /// the file's lines: container id, interface, pod).
    pub fn cni_allocations(&self) -> Result<Vec<(String, Vec<String>)>> {
        let base = self.host_path("/var/lib/weft/cni/networks")?;
        let mut out = Vec::new();
        let Ok(nets) = std::fs::read_dir(&base) else {
            return Ok(out);
        };
        for net in nets.flatten() {
            for name in crate::cni::allocation_files(&net.path()) {
                let text = std::fs::read_to_string(net.path().join(&name)).unwrap_or_default();
                out.push((name, text.lines().map(String::from).collect()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Interfaces in the node's namespace whose name starts with `prefix`.
    pub fn links_with_prefix(&self, prefix: &str) -> Result<Vec<String>> {
        let out = run_args("ip", &["-n", &self.ns, "-o", "link", "show"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with(prefix))
            .collect())
    }

    fn cgroup_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        let base = Path::new("/sys/fs/cgroup/pids").join(self.cgroup_root.trim_start_matches('/'));
        collect_procs(&base, &mut pids);
        pids
    }

    fn teardown(&mut self) {
        self.stop_kubelet();
        if let Some(mut c) = lock(&self.containerd).take() {
            c.terminate();
        }
        // Containers (in the node's cgroups) and shims and hostNetwork containers (in its
        // network namespace), until none is left.
        for _ in 0..20 {
            let mut pids = self.cgroup_pids();
            pids.extend(netns_pids(&self.ns));
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                kill_pid(pid, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
        let _ = std::fs::remove_file(&self.mnt);
        for c in CGROUP_CONTROLLERS {
            let d = Path::new("/sys/fs/cgroup")
                .join(c)
                .join(self.cgroup_root.trim_start_matches('/'));
            remove_cgroup_tree(&d);
        }
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn running(m: &Mutex<Option<Proc>>) -> bool {
    lock(m).as_mut().is_some_and(Proc::running)
}

fn netns_pids(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn collect_procs(dir: &Path, out: &mut Vec<u32>) {
    if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_procs(&e.path(), out);
            }
        }
    }
}

/// rmdir a cgroup directory tree, children first.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Removes what a crashed run of this tier left: pinned mount namespaces and the cgroups of
/// harness nodes (`/weft-wt*`). Call with the harness lock held.
pub fn remove_leftovers() {
    if let Ok(rd) = std::fs::read_dir(MNT_DIR) {
        for e in rd.flatten() {
            let _ = Command::new("umount").arg("-l").arg(e.path()).output();
            let _ = std::fs::remove_file(e.path());
        }
    }
    for c in CGROUP_CONTROLLERS {
        let base = Path::new("/sys/fs/cgroup").join(c);
        if let Ok(rd) = std::fs::read_dir(&base) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("weft-wt") {
                    let mut pids = Vec::new();
                    collect_procs(&e.path(), &mut pids);
                    for pid in pids {
                        kill_pid(pid, libc::SIGKILL);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    remove_cgroup_tree(&e.path());
                }
            }
        }
    }
}

// ---------------- images ----------------

/// Builds the OCI archives the nodes import: the pause image, the busybox workload image and
/// weft's image (deploy/image/build-image.sh from this build's meshd, weft-cni and keyctl).
pub fn build_images(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let pause = busybox_image(
        dir,
        "weft-pause",
        PAUSE_IMAGE,
        &[
            "/bin/sh",
            "-c",
            "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done",
        ],
    )?;
    let busybox = busybox_image(dir, "weft-busybox", BUSYBOX_IMAGE, &["/bin/sh"])?;
    let weft = dir.join("weft.tar");
    let bin_dir = workspace_bin("meshd")?
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("meshd has no parent dir"))?;
    let script = repo_root().join("deploy/image/build-image.sh");
    run(Command::new(&script)
        .arg(&bin_dir)
        .arg(WEFT_IMAGE)
        .arg(&weft)
        .env("STORAGE_DRIVER", "vfs"))
    .context("deploy/image/build-image.sh")?;
    Ok(vec![pause, busybox, weft])
}

/// An image of static busybox (every applet linked in /bin) with `entrypoint`, as an OCI
/// archive named `image` (annotation `io.containerd.image.name`).
fn busybox_image(dir: &Path, name: &str, image: &str, entrypoint: &[&str]) -> Result<PathBuf> {
    let layout = dir.join(format!("{name}-layout"));
    let bundle = dir.join(format!("{name}-bundle"));
    let _ = std::fs::remove_dir_all(&layout);
    let _ = std::fs::remove_dir_all(&bundle);
    let tag = "test";
    let lt = format!("{}:{tag}", p(&layout));
    run_args("umoci", &["init", "--layout", &p(&layout)])?;
    run_args("umoci", &["new", "--image", &lt])?;
    run_args("umoci", &["unpack", "--image", &lt, &p(&bundle)])?;
    let rootfs = bundle.join("rootfs");
    for d in ["bin", "tmp", "etc", "proc", "sys", "dev"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    let busybox = crate::util::find_program("busybox")
        .ok_or_else(|| anyhow!("busybox not found (Debian: busybox-static)"))?;
    std::fs::copy(&busybox, rootfs.join("bin/busybox"))?;
    let applets = run_args(&p(&busybox), &["--list"])?;
    for a in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if a == "busybox" {
            continue;
        }
        let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a));
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    run_args("umoci", &["repack", "--image", &lt, &p(&bundle)])?;
    let mut cfg = Command::new("umoci");
    cfg.args(["config", "--image", &lt]);
    for e in entrypoint {
        cfg.arg(format!("--config.entrypoint={e}"));
    }
    cfg.args(["--config.env", "PATH=/bin"]);
    run(&mut cfg)?;
    // containerd's importer names the image after this annotation.
    let index_path = layout.join("index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path)?)?;
    let manifests = index
        .get_mut("manifests")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| anyhow!("{}: no manifests", index_path.display()))?;
    for m in manifests.iter_mut() {
        if let Some(obj) = m.as_object_mut() {
            let ann = obj
                .entry("annotations")
                .or_insert_with(|| Value::Object(Default::default()));
            if let Some(a) = ann.as_object_mut() {
                a.insert(
                    "io.containerd.image.name".into(),
                    Value::String(image.into()),
                );
            }
        }
    }
    std::fs::write(&index_path, serde_json::to_vec(&index)?)?;
    let tar = dir.join(format!("{name}.tar"));
    run(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tar)
        .arg("."))?;
    let _ = std::fs::remove_dir_all(&bundle);
    Ok(tar)
}
