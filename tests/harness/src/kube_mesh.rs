//! A weft mesh on the real control plane of [`crate::kube`]: `deploy/` applied server-side (as
//! a user would; the CRDs also before the controller manager starts, so its garbage collector
//! handles MeshNodes at once), a Node object per node, keyctl as a ServiceAccount bound to
//! ClusterRole `weft-admin`, and meshd started with `--registry kube` and its own token bound to
//! a Pod on its Node (what the kubelet mounts into a DaemonSet pod), neither `--endpoint` nor
//! `--pod-cidr` (both from the Node object or a claim), and `--network-policy off` unless the
//! test asks for it (the harness's pods have no Pod objects). Shared by the kube test files.

use crate::kube::{KubeControlPlane, KubeOpts, KubectlOutput};
use crate::{Cluster, Node};
use anyhow::{anyhow, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The namespace of weft's ServiceAccounts.
pub const NS: &str = "weft-system";

/// `deploy/` in the source tree.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// The generated CRDs of `deploy/crds/`.
pub fn deploy_crds() -> Result<Vec<String>> {
    let dir = deploy_dir().join("crds");
    let mut crds = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "yaml") && !p.ends_with("kustomization.yaml") {
            crds.push(std::fs::read_to_string(&p).with_context(|| format!("{}", p.display()))?);
        }
    }
    Ok(crds)
}

/// A netns cluster with a control plane running weft's `deploy/`.
#[derive(Debug)]
pub struct KubeMesh {
    pub c: Cluster,
    pub kube: KubeControlPlane,
    /// keyctl's kubeconfig: ServiceAccount weft-system/keyctl bound to ClusterRole weft-admin.
    pub admin: PathBuf,
    /// When the netns cluster was up (after the harness lock): durations count from here.
    pub t0: Instant,
}

impl KubeMesh {
    /// `n` netns nodes; a Node object for each of the first `node_objects` (InternalIP = its
    /// underlay address; `spec.podCIDRs` = its range when `pod_cidrs`); `opts` for the control
    /// plane (the CRDs are added to its manifests).
    pub fn new(
        n: usize,
        node_objects: usize,
        pod_cidrs: bool,
        mut opts: KubeOpts,
    ) -> Result<KubeMesh> {
        let c = Cluster::with_nodes(n)?;
        let t0 = Instant::now();
        opts.manifests.extend(deploy_crds()?);
        let kube = c.start_kube(opts)?;
        kube.kubectl(&[
            "apply",
            "--server-side",
            "--field-manager=weft-test",
            "-k",
            &deploy_dir().display().to_string(),
        ])
        .context("kubectl apply --server-side -k deploy/")?;
        kube.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=60s",
        ])?;
        for node in c.nodes.iter().take(node_objects) {
            let cidrs: Vec<&str> = if pod_cidrs {
                vec![node.pod_cidr.as_str()]
            } else {
                Vec::new()
            };
            kube.create_node(&node.name, node.underlay_ip, &cidrs)?;
        }
        kube.create_service_account(NS, "keyctl")?;
        kube.kubectl(&[
            "create",
            "clusterrolebinding",
            "weft-admin-keyctl",
            "--clusterrole=weft-admin",
            "--serviceaccount=weft-system:keyctl",
        ])?;
        let token = kube.service_account_token(NS, "keyctl")?;
        let admin = kube.kubeconfig_with_token(&token, c.tmp.join("keyctl.kubeconfig"))?;
        eprintln!("control plane with deploy/ applied in {:?}", t0.elapsed());
        Ok(KubeMesh { c, kube, admin, t0 })
    }

    /// A kubeconfig (at `NODE_DIR/kubeconfig`) with a token of ServiceAccount
    /// weft-system/meshd bound to a Pod on `node`.
    pub fn node_kubeconfig(&self, node: &Node) -> Result<PathBuf> {
        let token = self.kube.pod_bound_token(NS, "meshd", &node.name)?;
        self.kube
            .kubeconfig_with_token(&token, node.dir.join("kubeconfig"))
    }

    /// Starts meshd on `node` with `--registry kube`, its own token, without `--endpoint` and
    /// `--pod-cidr`, plus `extra` flags and environment `env`; reads the range it runs with.
    pub fn start_meshd(&self, node: &Node, extra: &[&str], env: &[(String, String)]) -> Result<()> {
        let kc = self.node_kubeconfig(node)?.display().to_string();
        node.omit_default_args(&["--endpoint", "--pod-cidr"]);
        let mut args = vec!["--registry", "kube", "--kubeconfig", &kc];
        // The harness's pods are no Kubernetes pods (no Pod objects): NetworkPolicy
        // enforcement would keep them guarded. Tests of policy turn it on.
        if !extra.iter().any(|a| a.starts_with("--network-policy")) {
            args.extend_from_slice(&["--network-policy", "off"]);
        }
        args.extend_from_slice(extra);
        node.start_meshd_env(&args, env)?;
        node.refresh_claimed()?;
        Ok(())
    }

    /// Runs the real keyctl with the weft-admin kubeconfig in the switch namespace: (exit
    /// code, stdout, stderr).
    pub fn keyctl(&self, args: &[&str]) -> Result<(Option<i32>, String, String)> {
        let sw = self
            .c
            .switch_ns
            .clone()
            .ok_or_else(|| anyhow!("no switch namespace"))?;
        let out = crate::kube::keyctl_on_kube(&sw, &self.admin, args, Duration::from_secs(60))?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// [`KubeMesh::keyctl`] that must exit 0; its stdout.
    pub fn keyctl_ok(&self, args: &[&str]) -> Result<String> {
        let (code, so, se) = self.keyctl(args)?;
        if code != Some(0) {
            anyhow::bail!(
                "keyctl {args:?} --registry kube failed ({code:?}): {se}\n{so}\n{}",
                self.c.debug_report()
            );
        }
        Ok(so)
    }

    /// kubectl with another kubeconfig (a node's token) from the switch namespace, with `stdin`.
    pub fn kubectl_as(
        &self,
        kubeconfig: &Path,
        args: &[&str],
        stdin: &[u8],
    ) -> Result<KubectlOutput> {
        self.kube
            .kubectl_output_in_netns(&self.kube.ns, kubeconfig, args, stdin)
    }

    /// MeshNode `name` as JSON, if it exists.
    pub fn meshnode(&self, name: &str) -> Option<Value> {
        self.kube.get_json(&["meshnode", name]).ok()
    }
}
