//! A real Kubernetes control plane for the kube registry tests, modelled on envtest
//! (controller-runtime's `pkg/internal/testing/controlplane`): its own etcd, kube-apiserver and
//! optionally kube-controller-manager (garbage collector only), all inside the cluster's switch
//! namespace, so every node reaches the API server over the underlay at
//! `https://198.18.0.1:6443` ([`KubeControlPlane::server_url`]).
//!
//! - Binaries: kube-apiserver, kube-controller-manager and kubectl v1.37.2 from
//!   `scripts/kube-bins.sh` (a cache outside the repository, `/var/cache/weft/kubernetes/
//!   v1.37.2/bin`, or env `WEFT_KUBE_BIN`); Debian's `etcd`; `openssl` and `curl`. Any
//!   `kubectl` on PATH is ignored: the harness always runs the one from the bin dir.
//! - PKI ([`KubePki`], made with `openssl` in `<cluster tmp>/kube/pki`): a CA, the API server's
//!   serving certificate (IP 198.18.0.1, 127.0.0.1, 10.96.0.1; DNS kubernetes,
//!   kubernetes.default, kubernetes.default.svc(.cluster.local), localhost), an admin client
//!   certificate (`O=system:masters`), the controller manager's client certificate
//!   (`CN=system:kube-controller-manager`) and a separate RSA key pair that signs service-account
//!   tokens.
//! - etcd: a second etcd, on 127.0.0.1:[`KUBE_ETCD_CLIENT_PORT`] of the switch namespace (the
//!   registry etcd of [`crate::etcd`] keeps 198.18.0.1:2379/2380), `--unsafe-no-fsync`, data in
//!   the cluster's temp dir. It lives as long as the guard, so the API server's data survives
//!   [`KubeControlPlane::stop_apiserver`] / [`KubeControlPlane::start_apiserver`].
//! - Authentication: the admin uses its client certificate; meshd/keyctl get a kubeconfig with a
//!   bearer token ([`KubeControlPlane::kubeconfig_with_token`]), typically a service-account token
//!   bound to a Pod object on a node ([`KubeControlPlane::pod_bound_token`]), which carries the
//!   `authentication.kubernetes.io/node-name` extra a DaemonSet pod's projected token has.
//!   There is no kubelet, scheduler or service-account controller: Pods and Nodes are bare
//!   objects.
//!
//! Every process logs to `<cluster tmp>/kube/*.log`; errors carry the tails. The guard kills
//! everything on drop.

use crate::cluster::{Cluster, UNDERLAY_ROUTER};
use crate::cni::run_with_stdin;
use crate::util::{ns_cmd, run, run_timeout, tail, wait_until, Proc};
use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The Kubernetes release `scripts/kube-bins.sh` builds and the harness expects.
pub const KUBE_VERSION: &str = "v1.37.2";
/// Default bin dir of `scripts/kube-bins.sh` (override with env `WEFT_KUBE_BIN`).
pub const KUBE_BIN_DEFAULT: &str = "/var/cache/weft/kubernetes/v1.37.2/bin";
/// The API server's secure port on 198.18.0.1.
pub const APISERVER_PORT: u16 = 6443;
/// Client port of the API server's own etcd (127.0.0.1 in the switch namespace).
pub const KUBE_ETCD_CLIENT_PORT: u16 = 2399;
/// Peer port of the API server's own etcd (127.0.0.1 in the switch namespace).
pub const KUBE_ETCD_PEER_PORT: u16 = 2400;
/// kube-controller-manager's secure (health) port on 127.0.0.1 in the switch namespace.
pub const KCM_PORT: u16 = 10357;
/// `--service-account-issuer` (the `iss` of every token).
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// `--api-audiences`: the audience of tokens requested without one.
pub const API_AUDIENCE: &str = "default";
/// `--service-cluster-ip-range`.
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/16";
/// The user extra a Pod-bound service-account token carries: the Pod's node.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The ClusterRoleBinding that lets the controller manager's own user (it runs with
/// `--use-service-account-credentials=false`) delete what its garbage collector collects.
pub const KCM_GC_BINDING: &str = "weft-harness:kube-controller-manager-gc";
/// keyctl (this build's) with `--registry kube --kubeconfig KUBECONFIG ARGS`, run in namespace
/// `ns`: an operator outside the cluster.
pub fn keyctl_on_kube(
    ns: &str,
    kubeconfig: &Path,
    args: &[&str],
    timeout: Duration,
) -> Result<std::process::Output> {
    let kc = kubeconfig.to_string_lossy();
    let mut all = args.to_vec();
    all.extend(["--registry", "kube", "--kubeconfig", &kc]);
    crate::util::keyctl_in(ns, &all, timeout)
}

/// The line kube-controller-manager logs once its garbage collector watches every resource.
pub const GC_SYNCED_LINE: &str = "all resource monitors have synced";

/// The directory holding kube-apiserver, kube-controller-manager and kubectl: env
/// `WEFT_KUBE_BIN`, else [`KUBE_BIN_DEFAULT`]. Fails (saying how to build them) when one is
/// missing.
pub fn kube_bin_dir() -> Result<PathBuf> {
    let dir = std::env::var_os("WEFT_KUBE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(KUBE_BIN_DEFAULT));
    let missing: Vec<&str> = ["kube-apiserver", "kube-controller-manager", "kubectl"]
        .into_iter()
        .filter(|b| !dir.join(b).is_file())
        .collect();
    if !missing.is_empty() {
        bail!(
            "Kubernetes binaries {missing:?} not found in {}: run scripts/kube-bins.sh (builds \
             kube-apiserver, kube-controller-manager and kubectl {KUBE_VERSION} into \
             {KUBE_BIN_DEFAULT}, ~25 min the first time) or set WEFT_KUBE_BIN to a directory \
             holding them",
            dir.display()
        );
    }
    Ok(dir)
}

/// What [`Cluster::start_kube`] starts and how.
#[derive(Debug, Clone)]
pub struct KubeOpts {
    /// Also run kube-controller-manager with only its garbage collector (objects whose owners
    /// are gone, e.g. a deleted Node, are deleted). Costs ~5-10 s of start-up (waits until the
    /// collector watches every resource).
    pub controller_manager: bool,
    /// `--watch-cache` (default true). `false` serves every watch from etcd, so a watch from a
    /// revision etcd compacted ([`KubeControlPlane::compact_etcd`]) gets 410 Gone. This is the
    /// only switch that reaches custom resources: `--watch-cache-sizes` is ignored for them.
    pub watch_cache: bool,
    /// `--watch-cache-sizes`, entries `resource[.group]#size` (`configmaps#0`, `nodes#0`,
    /// `leases.coordination.k8s.io#0`). Since the watch cache sizes itself, only `#0` does
    /// anything (turns the cache off for that resource); other sizes are ignored with a warning.
    /// Not applied to CRDs (apiextensions clears it), so `meshnodes.weft.dev#0` is a no-op.
    pub watch_cache_sizes: Vec<String>,
    /// `--etcd-compaction-interval` (API server default 5 min; `Some(ZERO)` turns its
    /// compaction off). The API server compacts to the revision it saw one interval earlier.
    pub etcd_compaction_interval: Option<Duration>,
    /// More kube-apiserver flags (`--flag=value`), after the harness's own.
    pub apiserver_args: Vec<String>,
    /// YAML documents applied (server-side, as admin) once the API server is ready and before
    /// the controller manager starts; CRDs among them are waited for until Established. Put
    /// CRDs here when the garbage collector must handle their objects at once: it finds a
    /// resource created later only at its next discovery resync (every 30 s).
    pub manifests: Vec<String>,
    /// How long to wait for `/readyz` (default 90 s; ~8 s on an idle machine).
    pub ready_timeout: Duration,
    /// `--controllers` of kube-controller-manager (default: `garbagecollector`). Anything more
    /// needs RBAC for the controller manager's own user beyond the garbage collector's role
    /// (the real-node tier binds it to cluster-admin through `manifests`).
    pub kcm_controllers: Vec<String>,
    /// More kube-controller-manager flags, after the harness's own.
    pub kcm_args: Vec<String>,
    /// The ServiceAccount admission plugin (default off: bare Pod objects need no `default`
    /// ServiceAccount). The real-node tier turns it on, with the serviceaccount controller, so
    /// pods get their projected token volume as on any cluster.
    pub service_account_admission: bool,
}

impl Default for KubeOpts {
    fn default() -> Self {
        KubeOpts {
            controller_manager: false,
            watch_cache: true,
            watch_cache_sizes: Vec::new(),
            etcd_compaction_interval: None,
            apiserver_args: Vec::new(),
            manifests: Vec::new(),
            ready_timeout: Duration::from_secs(90),
            kcm_controllers: vec!["garbagecollector".into()],
            kcm_args: Vec::new(),
            service_account_admission: false,
        }
    }
}

/// The control plane's certificates and keys (PEM files).
#[derive(Debug, Clone)]
pub struct KubePki {
    pub dir: PathBuf,
    /// The CA that signs the serving and client certificates (`--client-ca-file`).
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    /// Client certificate `CN=kubernetes-admin, O=system:masters`.
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    /// Client certificate `CN=system:kube-controller-manager`.
    pub kcm_cert: PathBuf,
    pub kcm_key: PathBuf,
    /// RSA private key that signs service-account tokens, and its public key.
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
}

/// What one kubectl run produced (see [`KubeControlPlane::kubectl_output`]).
#[derive(Debug, Clone)]
pub struct KubectlOutput {
    /// Exit code (None: killed by a signal).
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// The command line, for messages.
    pub command: String,
}

impl KubectlOutput {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// Whether the API server refused the request as Forbidden (403).
    pub fn forbidden(&self) -> bool {
        !self.success()
            && (self.stderr.contains("(Forbidden)") || self.stderr.contains("is forbidden"))
    }

    /// stdout, or an error with the exit code and stderr.
    pub fn into_result(self) -> Result<String> {
        if self.success() {
            return Ok(self.stdout);
        }
        bail!(
            "`{}` failed (exit {:?}): {}",
            self.command,
            self.exit_code,
            self.stderr.trim()
        )
    }
}

/// What [`KubeControlPlane::watch_once`] got.
#[derive(Debug, Clone)]
pub struct WatchResult {
    /// HTTP status.
    pub code: u16,
    pub body: String,
    /// The watch events (one JSON object a line) when the status was 200.
    pub events: Vec<Value>,
}

impl WatchResult {
    /// 410 Gone / reason `Expired`, as the HTTP status or as an `ERROR` event.
    pub fn expired(&self) -> bool {
        self.code == 410
            || self
                .events
                .iter()
                .any(|e| e["type"] == "ERROR" && e["object"]["code"] == 410)
    }

    /// 429: the resource's watch cache is still (re)initializing.
    pub fn initializing(&self) -> bool {
        self.code == 429
    }

    /// Names of the objects of the non-ERROR events.
    pub fn names(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["type"] != "ERROR")
            .filter_map(|e| e["object"]["metadata"]["name"].as_str().map(String::from))
            .collect()
    }
}

/// A service-account token bound to a Pod object (see [`KubeControlPlane::pod_bound_token_with`]).
/// Deleting the Pod invalidates the token.
#[derive(Debug, Clone)]
pub struct BoundToken {
    pub token: String,
    pub namespace: String,
    pub service_account: String,
    pub pod: String,
    pub pod_uid: String,
    pub node_name: String,
}

/// A running control plane in the cluster's switch namespace. Dropping it kills every process.
#[derive(Debug)]
pub struct KubeControlPlane {
    /// The switch namespace everything runs in.
    pub ns: String,
    /// `<cluster tmp>/kube`: PKI, data, logs, kubeconfigs.
    pub dir: PathBuf,
    pub bin_dir: PathBuf,
    pub pki: KubePki,
    /// Admin kubeconfig (client certificate in `system:masters`).
    pub admin_kubeconfig: PathBuf,
    /// The controller manager's kubeconfig (its client certificate).
    pub kcm_kubeconfig: PathBuf,
    pub etcd_log: PathBuf,
    pub apiserver_log: PathBuf,
    pub kcm_log: PathBuf,
    pub etcd_data: PathBuf,
    pub opts: KubeOpts,
    /// How long the first start of the API server took to answer `/readyz`.
    pub apiserver_ready_after: Duration,
    apiserver_args: Vec<String>,
    etcd: Mutex<Option<Proc>>,
    apiserver: Mutex<Option<Proc>>,
    kcm: Mutex<Option<Proc>>,
    seq: AtomicU32,
}

impl Cluster {
    /// Makes the PKI, starts the API server's etcd and kube-apiserver in the switch namespace
    /// (serving `https://198.18.0.1:6443`), waits for `/readyz`, and with
    /// `opts.controller_manager` starts kube-controller-manager (garbage collector) and waits
    /// until it watches every resource. The guard kills everything on drop.
    pub fn start_kube(&self, opts: KubeOpts) -> Result<KubeControlPlane> {
        let ns = self.switch_ns.clone().ok_or_else(|| {
            anyhow!("the control plane needs the switch namespace (no direct_link)")
        })?;
        let bin_dir = kube_bin_dir()?;
        let dir = self.tmp.join("kube");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki =
            make_kube_pki(&dir.join("pki")).context("making the Kubernetes PKI with openssl")?;
        let server = server_url();
        let admin_kubeconfig = dir.join("admin.kubeconfig");
        write_kubeconfig(
            &admin_kubeconfig,
            &server,
            &pki.ca,
            KubeconfigUser::Cert(&pki.admin_cert, &pki.admin_key),
            "kubernetes-admin",
        )?;
        let kcm_kubeconfig = dir.join("kube-controller-manager.kubeconfig");
        write_kubeconfig(
            &kcm_kubeconfig,
            &server,
            &pki.ca,
            KubeconfigUser::Cert(&pki.kcm_cert, &pki.kcm_key),
            "system:kube-controller-manager",
        )?;
        let apiserver_args = apiserver_args(&pki, &opts);
        let mut cp = KubeControlPlane {
            ns,
            bin_dir,
            pki,
            admin_kubeconfig,
            kcm_kubeconfig,
            etcd_log: dir.join("etcd.log"),
            apiserver_log: dir.join("kube-apiserver.log"),
            kcm_log: dir.join("kube-controller-manager.log"),
            etcd_data: dir.join("etcd-data"),
            dir,
            opts,
            apiserver_ready_after: Duration::ZERO,
            apiserver_args,
            etcd: Mutex::new(None),
            apiserver: Mutex::new(None),
            kcm: Mutex::new(None),
            seq: AtomicU32::new(0),
        };
        cp.start_etcd()?;
        cp.apiserver_ready_after = cp.start_apiserver()?;
        for m in cp.opts.manifests.clone() {
            cp.apply_yaml(&m).context("applying KubeOpts::manifests")?;
            cp.wait_crds_established()?;
        }
        if cp.opts.controller_manager {
            cp.start_controller_manager()?;
        }
        Ok(cp)
    }
}

/// `https://198.18.0.1:6443`
pub fn server_url() -> String {
    format!("https://{UNDERLAY_ROUTER}:{APISERVER_PORT}")
}

fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

fn apiserver_args(pki: &KubePki, opts: &KubeOpts) -> Vec<String> {
    let p = |f: &Path| f.display().to_string();
    let mut a = vec![
        format!("--etcd-servers=http://127.0.0.1:{KUBE_ETCD_CLIENT_PORT}"),
        format!("--bind-address={UNDERLAY_ROUTER}"),
        format!("--advertise-address={UNDERLAY_ROUTER}"),
        format!("--secure-port={APISERVER_PORT}"),
        format!("--tls-cert-file={}", p(&pki.serving_cert)),
        format!("--tls-private-key-file={}", p(&pki.serving_key)),
        format!("--client-ca-file={}", p(&pki.ca)),
        format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
        format!("--service-account-key-file={}", p(&pki.sa_pub)),
        format!("--service-account-signing-key-file={}", p(&pki.sa_key)),
        format!("--api-audiences={API_AUDIENCE}"),
        "--authorization-mode=Node,RBAC".into(),
        format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
        "--enable-admission-plugins=NodeRestriction".into(),
        "--allow-privileged=true".into(),
        "--kubelet-preferred-address-types=InternalIP".into(),
        // Not the cert dir default (/var/run/kubernetes): nothing outside the temp dir.
        format!("--cert-dir={}", p(&pki.dir)),
        "--profiling=false".into(),
        // On SIGTERM end open watches within 2 s: otherwise the HTTP server waits up to the
        // request timeout (60 s) for the controller manager's watch connections.
        "--shutdown-watch-termination-grace-period=2s".into(),
    ];
    if !opts.service_account_admission {
        a.push("--disable-admission-plugins=ServiceAccount".into());
    }
    if !opts.watch_cache {
        a.push("--watch-cache=false".into());
    }
    if !opts.watch_cache_sizes.is_empty() {
        a.push(format!(
            "--watch-cache-sizes={}",
            opts.watch_cache_sizes.join(",")
        ));
    }
    if let Some(d) = opts.etcd_compaction_interval {
        a.push(format!("--etcd-compaction-interval={}", go_duration(d)));
    }
    a.extend(opts.apiserver_args.iter().cloned());
    a
}

impl KubeControlPlane {
    /// `https://198.18.0.1:6443`
    pub fn server_url(&self) -> String {
        server_url()
    }

    /// The CA certificate clients verify the API server with.
    pub fn ca_path(&self) -> &Path {
        &self.pki.ca
    }

    /// The admin client certificate (`O=system:masters`).
    pub fn admin_cert(&self) -> &Path {
        &self.pki.admin_cert
    }

    /// The admin client key.
    pub fn admin_key(&self) -> &Path {
        &self.pki.admin_key
    }

    /// A path of a binary of the bin dir (`kubectl`, `kube-apiserver`, ...).
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// Tails of every log, for failure reports.
    pub fn logs_tail(&self, n: usize) -> String {
        let mut s = String::new();
        for log in [&self.etcd_log, &self.apiserver_log, &self.kcm_log] {
            if log.exists() {
                s.push_str(&format!(
                    "----- {} (last {n} lines):\n{}\n",
                    log.display(),
                    tail(log, n)
                ));
            }
        }
        s
    }

    // ---------------- processes ----------------

    fn start_etcd(&self) -> Result<()> {
        let client = format!("http://127.0.0.1:{KUBE_ETCD_CLIENT_PORT}");
        let peer = format!("http://127.0.0.1:{KUBE_ETCD_PEER_PORT}");
        let mut cmd = ns_cmd(&self.ns, "etcd");
        cmd.args(["--name", "weft-kube", "--data-dir"])
            .arg(&self.etcd_data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("weft-kube={peer}")])
            .args(["--unsafe-no-fsync", "--logger=zap"]);
        let proc = Proc::spawn_logged("kube etcd", &mut cmd, Some(&self.etcd_log))?;
        *lock(&self.etcd) = Some(proc);
        let healthy = wait_until(Duration::from_secs(20), || {
            !running(&self.etcd) || self.etcdctl(&["endpoint", "health"]).is_ok()
        });
        if !healthy || !running(&self.etcd) {
            bail!(
                "the API server's etcd did not become healthy; log:\n{}",
                tail(&self.etcd_log, 30)
            );
        }
        Ok(())
    }

    /// Runs `etcdctl ARGS` against the API server's etcd (in the switch namespace); stdout.
    /// Keys live under `/registry/` (e.g. `/registry/minions/NAME` for Nodes,
    /// `/registry/weft.dev/meshnodes/NAME` for a CRD), values are protobuf or JSON.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let mut cmd = ns_cmd(&self.ns, "etcdctl");
        cmd.args(args)
            .env("ETCDCTL_API", "3")
            .env(
                "ETCDCTL_ENDPOINTS",
                format!("127.0.0.1:{KUBE_ETCD_CLIENT_PORT}"),
            )
            .env("ETCDCTL_COMMAND_TIMEOUT", "5s")
            .env("ETCDCTL_DIAL_TIMEOUT", "2s");
        let out = run_timeout(&mut cmd, Duration::from_secs(15))?;
        if !out.status.success() {
            bail!(
                "etcdctl {args:?} (API server etcd) failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The API server etcd's current revision (what a list's `resourceVersion` is built from).
    pub fn etcd_revision(&self) -> Result<i64> {
        let out = self.etcdctl(&["get", "/", "-w", "json"])?;
        let v: Value = serde_json::from_str(&out)?;
        v["header"]["revision"]
            .as_i64()
            .ok_or_else(|| anyhow!("no revision in {out}"))
    }

    /// Compacts the API server's etcd up to its current revision (physically) and returns that
    /// revision: a watch from an older `resourceVersion` that is served by etcd (watch cache off
    /// for that resource) then ends with 410 Gone / `Expired`.
    pub fn compact_etcd(&self) -> Result<i64> {
        let rev = self.etcd_revision()?;
        self.etcdctl(&["compact", &rev.to_string(), "--physical"])?;
        Ok(rev)
    }

    /// Starts kube-apiserver (again: same flags, same etcd, so the data survives) and waits
    /// until `/readyz` answers ok; returns how long that took. No-op when it runs.
    pub fn start_apiserver(&self) -> Result<Duration> {
        if running(&self.apiserver) {
            return Ok(Duration::ZERO);
        }
        let mut cmd = ns_cmd(&self.ns, self.bin("kube-apiserver"));
        cmd.args(&self.apiserver_args);
        let t0 = Instant::now();
        let proc = Proc::spawn_logged("kube-apiserver", &mut cmd, Some(&self.apiserver_log))?;
        *lock(&self.apiserver) = Some(proc);
        let mut last = String::new();
        let ready = wait_until(self.opts.ready_timeout, || {
            if !running(&self.apiserver) {
                return true;
            }
            match self.readyz() {
                Ok(()) => true,
                Err(e) => {
                    last = format!("{e:#}");
                    std::thread::sleep(Duration::from_millis(200));
                    false
                }
            }
        });
        let elapsed = t0.elapsed();
        if !running(&self.apiserver) {
            bail!(
                "kube-apiserver exited during start-up; log:\n{}",
                tail(&self.apiserver_log, 40)
            );
        }
        if !ready {
            bail!(
                "kube-apiserver not ready after {:?} (last /readyz: {last}); log:\n{}",
                self.opts.ready_timeout,
                tail(&self.apiserver_log, 40)
            );
        }
        Ok(elapsed)
    }

    /// Stops kube-apiserver: SIGTERM (it deregisters its lease and endpoints, stops listening
    /// and ends its watches), then SIGKILL if it still runs after 10 s; returns how long it took.
    /// etcd and the controller manager keep running. Clients see connection refused until
    /// [`Self::start_apiserver`].
    pub fn stop_apiserver(&self) -> Result<Duration> {
        let t0 = Instant::now();
        if let Some(mut p) = lock(&self.apiserver).take() {
            // Err only means it had to be killed: it is gone either way.
            if let Err(e) = p.stop(libc::SIGTERM, Duration::from_secs(10)) {
                eprintln!("weft-tests: {e:#}");
            }
        }
        Ok(t0.elapsed())
    }

    /// Kills kube-apiserver with SIGKILL (a crash: no graceful end of watches).
    pub fn kill_apiserver(&self) -> Result<()> {
        if let Some(mut p) = lock(&self.apiserver).take() {
            p.stop(libc::SIGKILL, Duration::from_secs(10))
                .context("killing kube-apiserver")?;
        }
        Ok(())
    }

    /// Whether kube-apiserver is running.
    pub fn apiserver_running(&self) -> bool {
        running(&self.apiserver)
    }

    /// `GET /readyz` with the admin certificate, from the switch namespace.
    pub fn readyz(&self) -> Result<()> {
        let (code, body) = self.curl_admin("/readyz", Duration::from_secs(5))?;
        if code != 200 || body.trim() != "ok" {
            bail!("/readyz: HTTP {code}: {}", body.trim());
        }
        Ok(())
    }

    /// The `resourceVersion` of a real list of `list_path` (e.g. `/api/v1/nodes`,
    /// `/apis/weft.dev/v1alpha1/meshnodes`), as admin. (`kubectl get -o json` prints a List of
    /// its own making without one.)
    pub fn list_resource_version(&self, list_path: &str) -> Result<String> {
        let (code, body) = self.curl_admin(list_path, Duration::from_secs(10))?;
        if code != 200 {
            bail!("GET {list_path}: HTTP {code}: {}", body.trim());
        }
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("GET {list_path} returned {body:?}"))?;
        v["metadata"]["resourceVersion"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| anyhow!("GET {list_path}: no resourceVersion in {body}"))
    }

    /// A watch of `list_path` from `resource_version` as admin, ended by the server after
    /// `seconds`: what it answered. 410 Gone comes either as HTTP 410 or, from etcd, as an
    /// `ERROR` event with code 410 in a 200 stream ([`WatchResult::expired`]). Right after a
    /// start the watch cache of a resource may still answer 429 "storage is (re)initializing"
    /// although `/readyz` is ok.
    pub fn watch_once(
        &self,
        list_path: &str,
        resource_version: &str,
        seconds: u32,
    ) -> Result<WatchResult> {
        let sep = if list_path.contains('?') { '&' } else { '?' };
        let path = format!(
            "{list_path}{sep}watch=1&resourceVersion={resource_version}&timeoutSeconds={seconds}"
        );
        let (code, body) = self.curl_admin(&path, Duration::from_secs(u64::from(seconds) + 3))?;
        let events = body
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        Ok(WatchResult { code, body, events })
    }

    /// `curl` of `PATH` (e.g. `/readyz`, or a watch URL with `timeoutSeconds`) on the API server
    /// with the admin certificate, from the switch namespace, for at most `max_time`; the HTTP
    /// status (0 when nothing answered) and the body received until then.
    pub fn curl_admin(&self, path: &str, max_time: Duration) -> Result<(u16, String)> {
        let mut cmd = ns_cmd(&self.ns, "curl");
        cmd.args([
            "-sS",
            "--max-time",
            &format!("{:.1}", max_time.as_secs_f64()),
        ])
        .arg("--cacert")
        .arg(&self.pki.ca)
        .arg("--cert")
        .arg(&self.pki.admin_cert)
        .arg("--key")
        .arg(&self.pki.admin_key)
        .args(["-w", "\n%{http_code}"])
        .arg(format!("{}{path}", self.server_url()));
        let out = run_timeout(&mut cmd, max_time + Duration::from_secs(5))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_ref()));
        let code: u16 = code.trim().parse().unwrap_or(0);
        if code == 0 && !matches!(out.status.code(), Some(0) | Some(28)) {
            bail!(
                "curl {path}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok((code, body.to_string()))
    }

    fn start_controller_manager(&self) -> Result<()> {
        // The controller manager runs its controllers as its own user
        // (--use-service-account-credentials=false), whose bootstrap ClusterRole
        // system:kube-controller-manager may list and watch everything but delete nothing; the
        // garbage collector's role (system:controller:generic-garbage-collector) may.
        self.apply_yaml(&format!(
            r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {KCM_GC_BINDING}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:controller:generic-garbage-collector
subjects:
- apiGroup: rbac.authorization.k8s.io
  kind: User
  name: system:kube-controller-manager
"#
        ))
        .context("binding the garbage collector's role to the controller manager")?;
        let p = |f: &Path| f.display().to_string();
        let mut cmd = ns_cmd(&self.ns, self.bin("kube-controller-manager"));
        cmd.args([
            format!("--kubeconfig={}", p(&self.kcm_kubeconfig)),
            format!("--controllers={}", self.opts.kcm_controllers.join(",")),
            "--use-service-account-credentials=false".into(),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={KCM_PORT}"),
            format!("--cert-dir={}", p(&self.pki.dir.join("kcm-serving"))),
            "--profiling=false".into(),
        ]);
        cmd.args(&self.opts.kcm_args);
        let proc = Proc::spawn_logged("kube-controller-manager", &mut cmd, Some(&self.kcm_log))?;
        *lock(&self.kcm) = Some(proc);
        let synced = wait_until(Duration::from_secs(60), || {
            !running(&self.kcm)
                || std::fs::read_to_string(&self.kcm_log).is_ok_and(|s| s.contains(GC_SYNCED_LINE))
        });
        if !running(&self.kcm) {
            bail!(
                "kube-controller-manager exited; log:\n{}",
                tail(&self.kcm_log, 40)
            );
        }
        if !synced {
            bail!(
                "kube-controller-manager's garbage collector did not sync within 60 s; log:\n{}",
                tail(&self.kcm_log, 40)
            );
        }
        Ok(())
    }

    /// Kills everything now (also done on drop): controller manager, API server, etcd.
    pub fn stop(&self) {
        for m in [&self.kcm, &self.apiserver, &self.etcd] {
            if let Some(mut p) = lock(m).take() {
                p.terminate();
            }
        }
    }

    // ---------------- kubectl ----------------

    fn kubectl_cmd(&self, netns: &str, kubeconfig: &Path, args: &[&str]) -> Command {
        let mut cmd = ns_cmd(netns, self.bin("kubectl"));
        cmd.env_remove("KUBECONFIG")
            .env("KUBECACHEDIR", self.dir.join("kubectl-cache"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args);
        cmd
    }

    /// Runs kubectl (from the bin dir) with `kubeconfig` inside network namespace `netns`, with
    /// `stdin`; never fails because of the exit status (30 s limit).
    pub fn kubectl_output_in_netns(
        &self,
        netns: &str,
        kubeconfig: &Path,
        args: &[&str],
        stdin: &[u8],
    ) -> Result<KubectlOutput> {
        let mut cmd = self.kubectl_cmd(netns, kubeconfig, args);
        // A command that waits (`--timeout=Ns`, `rollout status`, `wait`, `drain`) gets its own
        // timeout and 15 s more; everything else 30 s.
        let timeout = args
            .iter()
            .filter_map(|a| a.strip_prefix("--timeout="))
            .filter_map(|t| t.strip_suffix('s'))
            .find_map(|t| t.parse::<u64>().ok())
            .map_or(Duration::from_secs(30), |t| Duration::from_secs(t + 15));
        let out = run_with_stdin(&mut cmd, stdin, timeout)?;
        Ok(KubectlOutput {
            exit_code: out.exit_code,
            stdout: out.stdout,
            stderr: out.stderr,
            command: format!("kubectl {}", args.join(" ")),
        })
    }

    /// kubectl with `kubeconfig` from the switch namespace; never fails because of the exit
    /// status (look at [`KubectlOutput::success`] / [`KubectlOutput::forbidden`]).
    pub fn kubectl_output(&self, kubeconfig: &Path, args: &[&str]) -> Result<KubectlOutput> {
        self.kubectl_output_in_netns(&self.ns, kubeconfig, args, b"")
    }

    /// kubectl as admin; stdout, or an error with stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_output(&self.admin_kubeconfig, args)?
            .into_result()
    }

    /// kubectl as admin in Kubernetes namespace `namespace` (`-n NAMESPACE ARGS`).
    pub fn kubectl_in(&self, namespace: &str, args: &[&str]) -> Result<String> {
        let mut a = vec!["-n", namespace];
        a.extend_from_slice(args);
        self.kubectl(&a)
    }

    /// kubectl as admin with `stdin`; stdout, or an error with stderr.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &[u8]) -> Result<String> {
        self.kubectl_output_in_netns(&self.ns, &self.admin_kubeconfig, args, stdin)?
            .into_result()
    }

    /// kubectl with another kubeconfig (a token kubeconfig) from the switch namespace; stdout,
    /// or an error with stderr.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> Result<String> {
        self.kubectl_output(kubeconfig, args)?.into_result()
    }

    /// `kubectl apply --server-side --force-conflicts -f -` as admin (field manager
    /// `weft-harness`).
    pub fn apply_yaml(&self, yaml: &str) -> Result<String> {
        self.kubectl_stdin(
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=weft-harness",
                "-f",
                "-",
            ],
            yaml.as_bytes(),
        )
    }

    /// Waits (up to 30 s) until every CRD is Established (served).
    pub fn wait_crds_established(&self) -> Result<()> {
        let crds = self.kubectl(&["get", "crd", "-o", "name"])?;
        if crds.trim().is_empty() {
            return Ok(());
        }
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=30s",
        ])
        .map(|_| ())
    }

    /// `kubectl create -f - -o json` as admin; the created object.
    pub fn create_object(&self, obj: &Value) -> Result<Value> {
        let out = self.kubectl_stdin(
            &["create", "-f", "-", "-o", "json"],
            obj.to_string().as_bytes(),
        )?;
        serde_json::from_str(&out).with_context(|| format!("kubectl create printed {out:?}"))
    }

    /// `kubectl get ARGS -o json` as admin, parsed.
    pub fn get_json(&self, args: &[&str]) -> Result<Value> {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend(["-o", "json"]);
        let out = self.kubectl(&a)?;
        serde_json::from_str(&out).with_context(|| format!("kubectl get printed {out:?}"))
    }

    /// Whether `kubectl get ARGS` finds the object (false on NotFound, error otherwise).
    pub fn exists(&self, args: &[&str]) -> Result<bool> {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend(["-o", "name"]);
        let out = self.kubectl_output(&self.admin_kubeconfig, &a)?;
        if out.success() {
            return Ok(true);
        }
        if out.stderr.contains("(NotFound)") {
            return Ok(false);
        }
        out.into_result().map(|_| true)
    }

    // ---------------- objects ----------------

    /// Creates a core/v1 Node object (no kubelet: the object alone) with `spec.podCIDR(s)` and
    /// `status.addresses` InternalIP + Hostname; returns its uid. (The API server keeps the
    /// status of a Node on create; if it ever did not, it is written through `nodes/status`.)
    pub fn create_node(
        &self,
        name: &str,
        internal_ip: Ipv4Addr,
        pod_cidrs: &[&str],
    ) -> Result<String> {
        let addresses = json!([
            {"type": "InternalIP", "address": internal_ip.to_string()},
            {"type": "Hostname", "address": name},
        ]);
        let mut node = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {},
            "status": {"addresses": addresses},
        });
        if let Some(first) = pod_cidrs.first() {
            node["spec"] = json!({"podCIDR": first, "podCIDRs": pod_cidrs});
        }
        let created = self
            .create_object(&node)
            .with_context(|| format!("creating Node {name}"))?;
        if created["status"]["addresses"] != addresses {
            self.kubectl(&[
                "patch",
                "node",
                name,
                "--subresource=status",
                "--type=merge",
                "-p",
                &json!({"status": {"addresses": addresses}}).to_string(),
            ])
            .with_context(|| format!("setting the addresses of Node {name}"))?;
        }
        created["metadata"]["uid"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| anyhow!("Node {name} created without a uid: {created}"))
    }

    /// Deletes Node `name` (and waits until it is gone; dependents are left to the garbage
    /// collector).
    pub fn delete_node(&self, name: &str) -> Result<()> {
        self.kubectl(&["delete", "node", name, "--wait=true"])
            .map(|_| ())
    }

    /// Sets annotation `key` = `value` on Node `name` (overwriting).
    pub fn set_node_annotation(&self, name: &str, key: &str, value: &str) -> Result<()> {
        self.kubectl(&[
            "annotate",
            "node",
            name,
            &format!("{key}={value}"),
            "--overwrite",
        ])
        .map(|_| ())
    }

    /// Removes annotation `key` from Node `name`.
    pub fn remove_node_annotation(&self, name: &str, key: &str) -> Result<()> {
        self.kubectl(&["annotate", "node", name, &format!("{key}-")])
            .map(|_| ())
    }

    /// The uid of Node `name`.
    pub fn node_uid(&self, name: &str) -> Result<String> {
        let n = self.get_json(&["node", name])?;
        n["metadata"]["uid"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| anyhow!("Node {name} has no uid: {n}"))
    }

    /// Creates Kubernetes namespace `name`.
    pub fn create_namespace(&self, name: &str) -> Result<()> {
        self.kubectl(&["create", "namespace", name]).map(|_| ())
    }

    /// Creates ServiceAccount `name` in `namespace` (nothing creates any by itself: the
    /// ServiceAccount admission plugin is off and no controller runs for them).
    pub fn create_service_account(&self, namespace: &str, name: &str) -> Result<()> {
        self.kubectl_in(namespace, &["create", "serviceaccount", name])
            .map(|_| ())
    }

    /// A token of ServiceAccount `sa` (in `namespace`) bound to a new Pod object on node
    /// `node_name` (see [`Self::pod_bound_token_with`]).
    pub fn pod_bound_token(&self, namespace: &str, sa: &str, node_name: &str) -> Result<String> {
        Ok(self
            .pod_bound_token_with(namespace, sa, node_name, None)?
            .token)
    }

    /// Creates a Pod object in `namespace` with `spec.nodeName = node_name` and
    /// `serviceAccountName = sa` (it never runs: no scheduler, no kubelet), then a TokenRequest
    /// bound to it (`kubectl create token --bound-object-kind Pod ...`, expiry `duration`, the
    /// server's default of 1 h when `None`, at least 10 min). The token's user is
    /// `system:serviceaccount:NAMESPACE:SA` with extra [`NODE_NAME_EXTRA`] = `node_name` (and
    /// node-uid if the Node exists, pod-name, pod-uid): what the kubelet projects into a
    /// DaemonSet pod. Deleting the Pod invalidates it.
    pub fn pod_bound_token_with(
        &self,
        namespace: &str,
        sa: &str,
        node_name: &str,
        duration: Option<Duration>,
    ) -> Result<BoundToken> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let mut pod = format!("{sa}-{node_name}-{seq}");
        pod.truncate(200);
        let pod_obj = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/managed-by": "weft-harness"},
            },
            "spec": {
                "nodeName": node_name,
                "serviceAccountName": sa,
                "automountServiceAccountToken": false,
                "containers": [{"name": "meshd", "image": "weft.invalid/meshd:harness"}],
            },
        });
        let created = self
            .create_object(&pod_obj)
            .with_context(|| format!("creating Pod {namespace}/{pod} on {node_name}"))?;
        let pod_uid = created["metadata"]["uid"]
            .as_str()
            .ok_or_else(|| anyhow!("Pod {pod} created without a uid: {created}"))?
            .to_string();
        let mut args = vec![
            "create".to_string(),
            "token".into(),
            sa.into(),
            "-n".into(),
            namespace.into(),
            "--bound-object-kind=Pod".into(),
            format!("--bound-object-name={pod}"),
            format!("--bound-object-uid={pod_uid}"),
        ];
        if let Some(d) = duration {
            args.push(format!("--duration={}s", d.as_secs()));
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let token = self
            .kubectl(&refs)
            .with_context(|| format!("requesting a token of {namespace}/{sa} bound to Pod {pod}"))?
            .trim()
            .to_string();
        if token.is_empty() {
            bail!("kubectl create token printed nothing for {namespace}/{sa}");
        }
        Ok(BoundToken {
            token,
            namespace: namespace.into(),
            service_account: sa.into(),
            pod,
            pod_uid,
            node_name: node_name.into(),
        })
    }

    /// A plain (not object-bound) token of ServiceAccount `sa` in `namespace`.
    pub fn service_account_token(&self, namespace: &str, sa: &str) -> Result<String> {
        let t = self.kubectl(&["create", "token", sa, "-n", namespace])?;
        Ok(t.trim().to_string())
    }

    /// Writes a kubeconfig for the API server (server URL, CA embedded, bearer `token`) at
    /// `path` (0600) and returns the path: for meshd and keyctl in node namespaces.
    pub fn kubeconfig_with_token(&self, token: &str, path: impl AsRef<Path>) -> Result<PathBuf> {
        let path = path.as_ref().to_path_buf();
        write_kubeconfig(
            &path,
            &self.server_url(),
            &self.pki.ca,
            KubeconfigUser::Token(token),
            "weft-token",
        )?;
        Ok(path)
    }

    /// `kubectl auth whoami -o json` with `kubeconfig` from the switch namespace: the
    /// `status.userInfo` (username, uid, groups, extra).
    pub fn whoami(&self, kubeconfig: &Path) -> Result<Value> {
        whoami_of(&self.kubectl_as(kubeconfig, &["auth", "whoami", "-o", "json"])?)
    }

    /// `kubectl auth whoami -o json` with `kubeconfig` from network namespace `netns` (a node's:
    /// proves the API server is reachable over the underlay).
    pub fn whoami_in_netns(&self, netns: &str, kubeconfig: &Path) -> Result<Value> {
        let out = self
            .kubectl_output_in_netns(netns, kubeconfig, &["auth", "whoami", "-o", "json"], b"")?
            .into_result()?;
        whoami_of(&out)
    }
}

/// The user info of a `kubectl auth whoami -o json`.
fn whoami_of(out: &str) -> Result<Value> {
    let v: Value =
        serde_json::from_str(out).with_context(|| format!("auth whoami printed {out:?}"))?;
    let ui = v["status"]["userInfo"].clone();
    if ui.is_null() {
        bail!("auth whoami printed no userInfo: {out}");
    }
    Ok(ui)
}

/// The first value of extra `key` of a user info (from [`KubeControlPlane::whoami`]).
pub fn user_extra<'a>(user_info: &'a Value, key: &str) -> Option<&'a str> {
    user_info["extra"][key][0].as_str()
}

impl Drop for KubeControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "weft-tests: Kubernetes control plane logs:\n{}",
                self.logs_tail(25)
            );
        }
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn running(m: &Mutex<Option<Proc>>) -> bool {
    lock(m).as_mut().is_some_and(Proc::running)
}

pub(crate) enum KubeconfigUser<'a> {
    Cert(&'a Path, &'a Path),
    Token(&'a str),
}

fn b64_file(p: &Path) -> Result<String> {
    let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Writes a kubeconfig (JSON, which kubeconfig loaders read as YAML) with everything embedded.
pub(crate) fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca: &Path,
    user: KubeconfigUser<'_>,
    user_name: &str,
) -> Result<()> {
    let user_v = match user {
        KubeconfigUser::Cert(cert, key) => json!({
            "client-certificate-data": b64_file(cert)?,
            "client-key-data": b64_file(key)?,
        }),
        KubeconfigUser::Token(t) => json!({"token": t}),
    };
    let cfg = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "weft-test", "cluster": {
            "server": server,
            "certificate-authority-data": b64_file(ca)?,
        }}],
        "users": [{"name": user_name, "user": user_v}],
        "contexts": [{"name": "weft-test", "context": {"cluster": "weft-test", "user": user_name}}],
        "current-context": "weft-test",
    });
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let body = serde_json::to_string_pretty(&cfg)?;
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("writing {}", path.display()))?;
        f.write_all(body.as_bytes())?;
    }
    Ok(())
}

// ---------------- PKI ----------------

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    run(Command::new("openssl").args(args).current_dir(dir)).map(|_| ())
}

/// A P-256 key and certificate `FILE.pem`/`FILE.key` signed by `ca.pem`, subject `subj`.
pub(crate) fn sign_cert(dir: &Path, file: &str, subj: &str, ext: &str) -> Result<()> {
    std::fs::write(
        dir.join(format!("{file}.ext")),
        format!("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n{ext}"),
    )?;
    let (key, csr, pem, extf) = (
        format!("{file}.key"),
        format!("{file}.csr"),
        format!("{file}.pem"),
        format!("{file}.ext"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            subj,
        ],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &pem,
            "-extfile",
            &extf,
        ],
    )
}

/// The control plane's PKI in `dir` (see [`KubePki`]).
pub fn make_kube_pki(dir: &Path) -> Result<KubePki> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=weft-test-kube-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        ],
    )?;
    sign_cert(
        dir,
        "apiserver",
        "/CN=kube-apiserver",
        &format!(
            "extendedKeyUsage=serverAuth\nsubjectAltName=IP:{UNDERLAY_ROUTER},IP:127.0.0.1,\
             IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,\
             DNS:kubernetes.default.svc.cluster.local,DNS:localhost\n"
        ),
    )?;
    sign_cert(
        dir,
        "admin",
        "/O=system:masters/CN=kubernetes-admin",
        "extendedKeyUsage=clientAuth\n",
    )?;
    sign_cert(
        dir,
        "kube-controller-manager",
        "/CN=system:kube-controller-manager",
        "extendedKeyUsage=clientAuth\n",
    )?;
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "sa.key",
        ],
    )?;
    openssl(dir, &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    for f in [
        "ca.key",
        "apiserver.key",
        "admin.key",
        "kube-controller-manager.key",
        "sa.key",
    ] {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o600))?;
    }
    let f = |n: &str| dir.join(n);
    Ok(KubePki {
        dir: dir.to_path_buf(),
        ca: f("ca.pem"),
        ca_key: f("ca.key"),
        serving_cert: f("apiserver.pem"),
        serving_key: f("apiserver.key"),
        admin_cert: f("admin.pem"),
        admin_key: f("admin.key"),
        kcm_cert: f("kube-controller-manager.pem"),
        kcm_key: f("kube-controller-manager.key"),
        sa_key: f("sa.key"),
        sa_pub: f("sa.pub"),
    })
}
