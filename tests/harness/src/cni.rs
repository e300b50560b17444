//! CNI support: run `weft-cni` (and the reference plugins) inside a node namespace the way a
//! container runtime does, and look at what it left behind.
//!
//! Per node ([`Node::cni_install`]): `<node dir>/cni/bin` holds a copy of `weft-cni` and symlinks to
//! the reference plugins of Debian's `containernetworking-plugins` (`/usr/lib/cni`, override with
//! `WEFT_CNI_REF_DIR`); `<node dir>/cni/net.d` holds conflists ([`Node::cni_write_conflist`]).
//! The plugin config points `stateDir` at the node's meshd state dir and `meshdSocket` at its API
//! socket, so meshd must run with the harness defaults (it does: [`Node::start_meshd`]).
//!
//! Two ways to run the plugin:
//! - [`Node::cnitool`]: `ip netns exec NODE env CNI_PATH=.. NETCONFPATH=.. cnitool CMD NET
//!   /run/netns/POD` (libcni: conflists, chaining, capability args, result cache);
//! - [`Node::cni_exec`] with a [`CniCall`]: `ip netns exec NODE PLUGIN` with exactly the given
//!   `CNI_*` variables and stdin, capturing stdout JSON and the exit code.
//!
//! Pods attached by the plugin live in empty namespaces `wt-<pid>-<seq>-n<i>cp<k>`
//! ([`Node::cni_netns`]); the plugin creates their interface. They are [`Pod`]s too
//! ([`CniPod::pod`]), so ping/TCP helpers work on them. Binaries: `WEFT_CNI_BIN` (else `weft-cni`
//! next to meshd), `WEFT_CNI_FAILPOINTS_BIN` (else `<target>/failpoints/debug/weft-cni`, built by
//! `cargo build -p weft-cni --features failpoints --target-dir target/failpoints`), `cnitool` on
//! PATH (or /usr/local/bin, ~/go/bin).

use crate::cluster::{destroy_namespace, Cluster, Node, Pod};
use crate::util::{
    bin_dirs, describe, find_program, kill_group, ns_cmd, run_args, run_in, spawn_owned,
    wait_child, workspace_bin,
};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{Read, Write as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Network name of the weft network in the harness's configs.
pub const CNI_NET: &str = "weft";
/// Reference plugins linked into every node's CNI bin dir.
pub const REF_PLUGINS: &[&str] = &["portmap", "bandwidth", "host-local", "ptp", "loopback"];
/// Every spec version weft-cni supports.
pub const CNI_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// Where Debian's containernetworking-plugins puts the reference plugins.
pub const DEFAULT_REF_DIR: &str = "/usr/lib/cni";
/// The failpoints weft-cni understands (`WEFT_CNI_FAILPOINT`).
pub const FAILPOINTS: &[&str] = &[
    "after-ipam",
    "after-veth",
    "after-move",
    "after-container-addr",
    "after-host-route",
    "before-result",
];

/// Directory of the reference plugins.
pub fn reference_plugin_dir() -> PathBuf {
    std::env::var_os("WEFT_CNI_REF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_REF_DIR))
}

/// The `weft-cni` to test: `WEFT_CNI_BIN`, else next to meshd (target/debug).
pub fn weft_cni_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("WEFT_CNI_BIN") {
        return Ok(PathBuf::from(p));
    }
    workspace_bin("weft-cni").context("weft-cni (cargo build -p weft-cni)")
}

/// Target directories to look in (the one holding the current exe's profile dir, and the
/// workspace's `target/`).
fn target_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for d in bin_dirs() {
        // target/debug -> target
        if let Some(p) = d.parent() {
            if !v.contains(&p.to_path_buf()) {
                v.push(p.to_path_buf());
            }
        }
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
    if !v.contains(&ws) {
        v.push(ws);
    }
    v
}

/// The failpoint-enabled `weft-cni`: `WEFT_CNI_FAILPOINTS_BIN`, else
/// `<target>/failpoints/debug/weft-cni`.
pub fn weft_cni_failpoints_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("WEFT_CNI_FAILPOINTS_BIN") {
        return Ok(PathBuf::from(p));
    }
    let dirs = target_dirs();
    for t in &dirs {
        let p = t.join("failpoints/debug/weft-cni");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "failpoint build of weft-cni not found under {dirs:?}; run \
         `cargo build -p weft-cni --features failpoints --target-dir target/failpoints` \
         (or set WEFT_CNI_FAILPOINTS_BIN)"
    )
}

/// The fastest `weft-cni` build available (release, else debug) and which one it is.
pub fn weft_cni_best_bin() -> Result<(PathBuf, &'static str)> {
    if let Some(p) = std::env::var_os("WEFT_CNI_BIN") {
        return Ok((PathBuf::from(p), "WEFT_CNI_BIN"));
    }
    for t in target_dirs() {
        let p = t.join("release/weft-cni");
        if p.is_file() {
            return Ok((p, "release"));
        }
    }
    for t in target_dirs() {
        let p = t.join("debug/weft-cni");
        if p.is_file() {
            return Ok((p, "debug"));
        }
    }
    Ok((weft_cni_bin()?, "debug"))
}

/// `cnitool` (CNI 1.1: add/check/del/gc/status).
pub fn cnitool_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("WEFT_CNITOOL") {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = find_program("cnitool") {
        return Ok(p);
    }
    for p in ["/usr/local/bin/cnitool", "/root/go/bin/cnitool"] {
        if Path::new(p).is_file() {
            return Ok(PathBuf::from(p));
        }
    }
    bail!("cnitool not found (scripts/install-test-deps.sh installs it into /usr/local/bin)")
}

/// Hex SHA-256 / SHA-512 of a string (coreutils, so the harness needs no hash crate).
pub fn sha_hex(algo: &str, s: &str) -> Result<String> {
    let prog = match algo {
        "sha256" => "sha256sum",
        "sha512" => "sha512sum",
        _ => bail!("unknown hash {algo}"),
    };
    let mut child = Command::new(prog)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {prog}"))?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow!("stdin"))?
        .write_all(s.as_bytes())?;
    let out = child.wait_with_output()?;
    let hex = String::from_utf8_lossy(&out.stdout);
    Ok(hex
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// The host veth name weft-cni uses: `wft` + 11 hex chars of SHA-256(containerID/ifname).
pub fn expected_host_veth(container_id: &str, ifname: &str) -> Result<String> {
    let h = sha_hex("sha256", &format!("{container_id}/{ifname}"))?;
    Ok(format!("wft{}", &h[..11]))
}

/// The container id cnitool derives from a netns path: `cnitool-` + 20 hex chars of SHA-512.
pub fn cnitool_container_id(netns_path: &str) -> Result<String> {
    let h = sha_hex("sha512", netns_path)?;
    Ok(format!("cnitool-{}", &h[..20]))
}

// ------------------------------------------------------------------------------------------
// Running the plugin

/// What one run of a plugin (or cnitool) produced.
#[derive(Debug, Clone)]
pub struct CniOutput {
    /// Exit code (None: killed by a signal).
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// stdout parsed as JSON, when it is.
    pub json: Option<Value>,
    pub elapsed: Duration,
    /// The command line (for messages).
    pub command: String,
}

impl CniOutput {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// The CNI error code (`code` of the JSON on stdout).
    pub fn code(&self) -> Option<u64> {
        self.json.as_ref().and_then(|j| j["code"].as_u64())
    }

    /// `msg` + " " + `details` of an error result.
    pub fn error_text(&self) -> String {
        match &self.json {
            Some(j) => format!(
                "{} {}",
                j["msg"].as_str().unwrap_or_default(),
                j["details"].as_str().unwrap_or_default()
            ),
            None => String::new(),
        }
    }

    /// One-paragraph description for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "`{}` exit {:?} in {:?}\nstdout: {}\nstderr: {}",
            self.command,
            self.exit_code,
            self.elapsed,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }

    /// The JSON result of a successful run, else an error with the whole output.
    pub fn result(&self) -> Result<Value> {
        if !self.success() {
            bail!("CNI call failed: {}", self.describe());
        }
        self.json
            .clone()
            .ok_or_else(|| anyhow!("CNI call printed no JSON: {}", self.describe()))
    }

    /// Succeeds when the run succeeded.
    pub fn ok(&self) -> Result<()> {
        if !self.success() {
            bail!("CNI call failed: {}", self.describe());
        }
        Ok(())
    }
}

/// One direct plugin invocation: `CNI_*` variables (None = unset) and stdin.
#[derive(Debug, Clone)]
pub struct CniCall {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    /// `CNI_PATH`; None = the node's CNI bin dir.
    pub path: Option<String>,
    /// Leave `CNI_PATH` unset.
    pub no_path: bool,
    pub stdin: Vec<u8>,
    /// Extra environment (e.g. `WEFT_CNI_FAILPOINT`).
    pub env: Vec<(String, String)>,
    /// Plugin binary; None = `<node cni bin>/weft-cni`.
    pub plugin: Option<PathBuf>,
    pub timeout: Duration,
}

impl CniCall {
    /// `command` for `container_id` in `netns` (a path), ifname eth0, config on stdin.
    pub fn new(command: &str, container_id: &str, netns: &str, config: &Value) -> CniCall {
        CniCall {
            command: Some(command.into()),
            container_id: Some(container_id.into()),
            netns: Some(netns.into()),
            ifname: Some("eth0".into()),
            args: None,
            path: None,
            no_path: false,
            stdin: serde_json::to_vec(config).unwrap_or_default(),
            env: Vec::new(),
            plugin: None,
            timeout: Duration::from_secs(30),
        }
    }

    /// A call with only `CNI_COMMAND` and the config (STATUS, GC, VERSION).
    pub fn bare(command: &str, config: &Value) -> CniCall {
        CniCall {
            container_id: None,
            netns: None,
            ifname: None,
            ..CniCall::new(command, "", "", config)
        }
    }

    pub fn ifname(mut self, s: &str) -> Self {
        self.ifname = Some(s.into());
        self
    }
    pub fn no_ifname(mut self) -> Self {
        self.ifname = None;
        self
    }
    pub fn no_netns(mut self) -> Self {
        self.netns = None;
        self
    }
    pub fn no_container_id(mut self) -> Self {
        self.container_id = None;
        self
    }
    pub fn no_command(mut self) -> Self {
        self.command = None;
        self
    }
    pub fn stdin_raw(mut self, b: &[u8]) -> Self {
        self.stdin = b.to_vec();
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    pub fn failpoint(self, fp: &str) -> Self {
        self.env("WEFT_CNI_FAILPOINT", fp)
    }
    pub fn plugin(mut self, p: impl Into<PathBuf>) -> Self {
        self.plugin = Some(p.into());
        self
    }
    pub fn cni_args(mut self, a: &str) -> Self {
        self.args = Some(a.into());
        self
    }
}

/// Runs `cmd` (environment already set) with `stdin`, capturing everything; kills it after
/// `timeout`.
pub fn run_with_stdin(cmd: &mut Command, stdin: &[u8], timeout: Duration) -> Result<CniOutput> {
    let command = describe(cmd);
    let start = Instant::now();
    let mut child = spawn_owned(
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .with_context(|| format!("starting `{command}`"))?;
    let mut si = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    let input = stdin.to_vec();
    let t_in = std::thread::spawn(move || {
        let _ = si.write_all(&input);
    });
    let mut so = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut se = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let status = match wait_child(&mut child, timeout) {
        Some(st) => st,
        None => {
            kill_group(child.id(), libc::SIGKILL);
            let _ = child.wait();
            bail!("`{command}` timed out after {timeout:?}");
        }
    };
    let elapsed = start.elapsed();
    let _ = t_in.join();
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
    let json = serde_json::from_str(stdout.trim()).ok();
    Ok(CniOutput {
        exit_code: status.code(),
        stdout,
        stderr,
        json,
        elapsed,
        command,
    })
}

// ------------------------------------------------------------------------------------------
// Pods attached by the plugin

/// A pod whose interface a CNI plugin created.
#[derive(Debug, Clone)]
pub struct CniPod {
    /// Namespace, address, host veth, MTU (usable with the ping/TCP helpers).
    pub pod: Pod,
    pub container_id: String,
    pub ifname: String,
    /// `/run/netns/<ns>`
    pub netns_path: String,
    /// Network name used for ADD.
    pub net: String,
    /// The ADD result.
    pub result: Value,
}

impl CniPod {
    pub fn ns(&self) -> &str {
        &self.pod.ns
    }
    pub fn ip(&self) -> Ipv4Addr {
        self.pod.ip
    }
    pub fn host_if(&self) -> &str {
        &self.pod.host_if
    }
    /// `{"containerID": .., "ifname": ..}` as in `cni.dev/valid-attachments`.
    pub fn attachment(&self) -> Value {
        json!({"containerID": self.container_id, "ifname": self.ifname})
    }
}

/// The first IPv4 address of a CNI result (without prefix length).
pub fn result_ipv4(result: &Value) -> Option<Ipv4Addr> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        ip["address"]
            .as_str()?
            .split('/')
            .next()?
            .parse::<Ipv4Addr>()
            .ok()
    })
}

/// The host-side interface (no `sandbox`) of a CNI result.
pub fn result_host_if(result: &Value) -> Option<String> {
    result["interfaces"].as_array()?.iter().find_map(|i| {
        let sb = i["sandbox"].as_str().unwrap_or("");
        if sb.is_empty() {
            i["name"].as_str().map(String::from)
        } else {
            None
        }
    })
}

/// What exists in a namespace (and a node's allocation dir): compare before/after to find leaks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetSnapshot {
    pub links: BTreeSet<String>,
    pub addrs: BTreeSet<String>,
    pub routes: BTreeSet<String>,
    pub allocations: BTreeSet<String>,
}

impl NetSnapshot {
    /// Human-readable difference (empty when equal).
    pub fn diff(&self, after: &NetSnapshot) -> String {
        let mut s = String::new();
        for (what, a, b) in [
            ("link", &self.links, &after.links),
            ("addr", &self.addrs, &after.addrs),
            ("route", &self.routes, &after.routes),
            ("allocation", &self.allocations, &after.allocations),
        ] {
            for x in b.difference(a) {
                s.push_str(&format!("  + {what} {x}\n"));
            }
            for x in a.difference(b) {
                s.push_str(&format!("  - {what} {x}\n"));
            }
        }
        s
    }
}

/// Links (names), addresses and routes (all tables, v4+v6; IPv6 link-local and multicast left
/// out) of namespace `ns`.
pub fn ns_snapshot(ns: &str) -> Result<NetSnapshot> {
    let mut s = NetSnapshot::default();
    for l in run_args("ip", &["-n", ns, "-o", "link", "show"])?.lines() {
        if let Some(name) = l.split(':').nth(1) {
            s.links
                .insert(name.trim().split('@').next().unwrap_or("").to_string());
        }
    }
    for l in run_args("ip", &["-n", ns, "-o", "addr", "show"])?.lines() {
        // "3: eth0    inet 10.42.1.2/32 scope global eth0\       valid_lft ..."
        let w: Vec<&str> = l.split_whitespace().collect();
        // IPv6 link-local addresses come and go with DAD timing; a leaked link shows anyway.
        if w.len() >= 4 && !w[3].starts_with("fe80:") {
            s.addrs.insert(format!("{} {} {}", w[1], w[2], w[3]));
        }
    }
    for fam in ["-4", "-6"] {
        for l in run_args("ip", &["-n", ns, fam, "route", "show", "table", "all"])?.lines() {
            if l.contains("fe80:") || l.starts_with("multicast ff00::/8") {
                continue; // link-local/multicast routes follow links and DAD timing
            }
            s.routes.insert(l.trim().to_string());
        }
    }
    Ok(s)
}

/// An empty pod namespace made for the plugin (deleted with the cluster).
pub fn netns_path(ns: &str) -> String {
    format!("/run/netns/{ns}")
}

/// The allocation files (one per address) in a weft-cni allocation dir, sorted; not the lock,
/// `last_reserved_ip.*` or temp files. Empty when the dir does not exist.
pub fn allocation_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n != "lock" && !n.starts_with('.') && !n.starts_with("last"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

impl Node {
    // ---------------- CNI dirs and configs ----------------

    pub fn cni_dir(&self) -> PathBuf {
        self.dir.join("cni")
    }
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.cni_dir().join("bin")
    }
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.cni_dir().join("net.d")
    }
    /// `STATE_DIR/cni/networks/NET` (weft-cni's allocations).
    pub fn cni_alloc_dir(&self, net: &str) -> PathBuf {
        self.state_dir().join("cni/networks").join(net)
    }

    /// Creates the node's CNI bin dir (a copy of `weft-cni` plus links to the reference plugins)
    /// and conf dir. Idempotent (re-copies weft-cni).
    pub fn cni_install(&self) -> Result<()> {
        let bin = self.cni_bin_dir();
        std::fs::create_dir_all(&bin)?;
        std::fs::create_dir_all(self.cni_conf_dir())?;
        let src = weft_cni_bin()?;
        let dst = bin.join("weft-cni");
        let tmp = bin.join(".weft-cni.tmp");
        std::fs::copy(&src, &tmp)
            .with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
        std::fs::rename(&tmp, &dst)?;
        let refdir = reference_plugin_dir();
        for p in REF_PLUGINS {
            let target = refdir.join(p);
            let link = bin.join(p);
            if link.symlink_metadata().is_ok() {
                continue;
            }
            if !target.is_file() {
                bail!(
                    "reference plugin {} missing (apt-get install containernetworking-plugins; \
                     scripts/install-test-deps.sh)",
                    target.display()
                );
            }
            std::os::unix::fs::symlink(&target, &link)?;
        }
        Ok(())
    }

    /// The weft-cni network config for direct calls (`name` = [`CNI_NET`]).
    pub fn cni_config(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": CNI_NET,
            "type": "weft-cni",
            "stateDir": self.state_dir().display().to_string(),
            "meshdSocket": self.api_socket().display().to_string(),
            "ipMasq": true,
        })
    }

    /// The weft-cni plugin entry of a conflist (no name/cniVersion).
    pub fn cni_plugin_entry(&self) -> Value {
        json!({
            "type": "weft-cni",
            "stateDir": self.state_dir().display().to_string(),
            "meshdSocket": self.api_socket().display().to_string(),
            "ipMasq": true,
        })
    }

    /// Writes `<conf dir>/<name>.conflist` with `plugins` (default: just weft-cni).
    pub fn cni_write_conflist(
        &self,
        name: &str,
        version: &str,
        plugins: Option<Vec<Value>>,
    ) -> Result<PathBuf> {
        std::fs::create_dir_all(self.cni_conf_dir())?;
        let plugins = plugins.unwrap_or_else(|| vec![self.cni_plugin_entry()]);
        let v = json!({"cniVersion": version, "name": name, "plugins": plugins});
        let p = self.cni_conf_dir().join(format!("{name}.conflist"));
        std::fs::write(&p, serde_json::to_vec_pretty(&v)?)?;
        Ok(p)
    }

    /// Creates the empty pod namespace `<node ns>cp<k>` (lo up) and returns its name.
    pub fn cni_netns(&self, k: usize) -> Result<String> {
        let ns = format!("{}cp{k}", self.ns);
        if Path::new("/run/netns").join(&ns).exists() {
            bail!("namespace {ns} already exists");
        }
        run_args("ip", &["netns", "add", &ns])?;
        run_args("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Deletes a pod namespace made by [`Node::cni_netns`].
    pub fn cni_netns_del(&self, ns: &str) {
        destroy_namespace(ns);
    }

    // ---------------- running plugins ----------------

    /// Runs a plugin directly in the node namespace (see [`CniCall`]).
    pub fn cni_exec(&self, call: &CniCall) -> Result<CniOutput> {
        let plugin = call
            .plugin
            .clone()
            .unwrap_or_else(|| self.cni_bin_dir().join("weft-cni"));
        let mut cmd = ns_cmd(&self.ns, &plugin);
        cmd.env_clear();
        cmd.env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        );
        let vars = [
            ("CNI_COMMAND", &call.command),
            ("CNI_CONTAINERID", &call.container_id),
            ("CNI_NETNS", &call.netns),
            ("CNI_IFNAME", &call.ifname),
            ("CNI_ARGS", &call.args),
        ];
        for (k, v) in vars {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        if !call.no_path {
            let p = call
                .path
                .clone()
                .unwrap_or_else(|| self.cni_bin_dir().display().to_string());
            cmd.env("CNI_PATH", p);
        }
        for (k, v) in &call.env {
            cmd.env(k, v);
        }
        run_with_stdin(&mut cmd, &call.stdin, call.timeout)
    }

    /// `cnitool CMD NET /run/netns/POD_NS` in the node namespace with the node's CNI dirs;
    /// `cap_args` goes into `CAP_ARGS`.
    pub fn cnitool(
        &self,
        command: &str,
        net: &str,
        pod_ns: &str,
        cap_args: Option<&Value>,
    ) -> Result<CniOutput> {
        self.cnitool_with_args(command, net, pod_ns, cap_args, None)
    }

    /// [`Node::cnitool`] with `CNI_ARGS` (`K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;..`), which
    /// cnitool passes on to the plugins as a container runtime does.
    pub fn cnitool_with_args(
        &self,
        command: &str,
        net: &str,
        pod_ns: &str,
        cap_args: Option<&Value>,
        cni_args: Option<&str>,
    ) -> Result<CniOutput> {
        let tool = cnitool_bin()?;
        let mut cmd = ns_cmd(&self.ns, "env");
        cmd.arg(format!("CNI_PATH={}", self.cni_bin_dir().display()))
            .arg(format!("NETCONFPATH={}", self.cni_conf_dir().display()));
        if let Some(a) = cni_args {
            cmd.arg(format!("CNI_ARGS={a}"));
        }
        if let Some(c) = cap_args {
            cmd.arg(format!("CAP_ARGS={c}"));
        }
        // A test may take the host's tools away from the runtime and the plugin (a k3s node
        // has no `nft`): cnitool passes its environment on to the plugin.
        if let Ok(p) = std::env::var("WEFT_TEST_CNITOOL_PATH") {
            cmd.arg(format!("PATH={p}"));
        }
        cmd.arg(&tool).arg(command).arg(net).arg(netns_path(pod_ns));
        cmd.env_remove("WEFT_CNI_FAILPOINT");
        run_with_stdin(&mut cmd, b"", Duration::from_secs(60))
    }

    /// Creates pod namespace `k` and attaches it with `cnitool add NET` (conflist written
    /// beforehand, e.g. [`Node::cni_write_conflist`]).
    pub fn cni_add_pod(&self, k: usize, net: &str) -> Result<CniPod> {
        self.cni_add_pod_cap(k, net, None)
    }

    /// [`Node::cni_add_pod`] with capability args.
    pub fn cni_add_pod_cap(&self, k: usize, net: &str, cap: Option<&Value>) -> Result<CniPod> {
        let ns = self.cni_netns(k)?;
        let out = self.cnitool("add", net, &ns, cap)?;
        let result = out.result()?;
        let cid = cnitool_container_id(&netns_path(&ns))?;
        self.cni_pod_from_result(k, &ns, &cid, "eth0", net, result)
    }

    /// Creates pod namespace `k` and runs ADD directly with `config`.
    pub fn cni_add_direct(&self, k: usize, config: &Value) -> Result<CniPod> {
        let ns = self.cni_netns(k)?;
        let cid = format!("{}-c{k}", self.ns);
        let out = self.cni_exec(&CniCall::new("ADD", &cid, &netns_path(&ns), config))?;
        let result = out.result()?;
        let net = config["name"].as_str().unwrap_or(CNI_NET).to_string();
        self.cni_pod_from_result(k, &ns, &cid, "eth0", &net, result)
    }

    /// Builds a [`CniPod`] from an ADD result (address, host veth, MTU read from the pod).
    pub fn cni_pod_from_result(
        &self,
        k: usize,
        ns: &str,
        container_id: &str,
        ifname: &str,
        net: &str,
        result: Value,
    ) -> Result<CniPod> {
        let ip = result_ipv4(&result)
            .ok_or_else(|| anyhow!("ADD result without an IPv4 address: {result}"))?;
        let host_if = result_host_if(&result)
            .ok_or_else(|| anyhow!("ADD result without a host interface: {result}"))?;
        let mtu = link_mtu(ns, ifname)?;
        Ok(CniPod {
            pod: Pod {
                node_index: self.index,
                index: k,
                ns: ns.to_string(),
                node_ns: self.ns.clone(),
                ip,
                host_if,
                mtu,
            },
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
            netns_path: netns_path(ns),
            net: net.to_string(),
            result,
        })
    }

    /// DEL of a pod through cnitool.
    pub fn cni_del_pod(&self, p: &CniPod) -> Result<CniOutput> {
        self.cnitool("del", &p.net, &p.pod.ns, None)
    }

    /// DEL through cnitool with the capability args of the ADD (as a runtime passes them again).
    pub fn cni_del_pod_cap(&self, p: &CniPod, cap: Option<&Value>) -> Result<CniOutput> {
        self.cnitool("del", &p.net, &p.pod.ns, cap)
    }

    /// DEL of a pod directly with `config` (CNI_NETNS = its path even when it is gone).
    pub fn cni_del_direct(&self, p: &CniPod, config: &Value) -> Result<CniOutput> {
        self.cni_exec(
            &CniCall::new("DEL", &p.container_id, &p.netns_path, config).ifname(&p.ifname),
        )
    }

    // ---------------- what the plugin left ----------------

    /// Host veths of weft-cni (`wft*`) in the node namespace.
    pub fn wft_links(&self) -> Result<Vec<String>> {
        let mut v: Vec<String> = ns_snapshot_links(&self.ns)?
            .into_iter()
            .filter(|n| n.starts_with("wft"))
            .collect();
        v.sort();
        Ok(v)
    }

    /// Routes in the node's main table via a `wft*` device, except the kernel's own (the
    /// per-link `fe80::/64`).
    pub fn wft_routes(&self) -> Result<Vec<String>> {
        let mut v = Vec::new();
        for fam in ["-4", "-6"] {
            for l in self.ip(&[fam, "route", "show"])?.lines() {
                if l.contains("proto kernel") {
                    continue;
                }
                if l.split_whitespace()
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|w| w[0] == "dev" && w[1].starts_with("wft"))
                {
                    v.push(l.trim().to_string());
                }
            }
        }
        Ok(v)
    }

    /// Allocation files (addresses) of weft-cni for network `net` (the lock file excluded).
    pub fn cni_allocations(&self, net: &str) -> Vec<String> {
        allocation_files(&self.cni_alloc_dir(net))
    }

    /// Node namespace snapshot plus the allocations of `net`.
    pub fn cni_snapshot(&self, net: &str) -> Result<NetSnapshot> {
        let mut s = ns_snapshot(&self.ns)?;
        s.allocations = self.cni_allocations(net).into_iter().collect();
        Ok(s)
    }

    /// The mesh MTU meshd reports.
    pub fn mesh_mtu(&self) -> Result<u32> {
        let st = self.status_json()?;
        st["node"]["mtu"]
            .as_u64()
            .map(|m| m as u32)
            .ok_or_else(|| anyhow!("no node.mtu in meshd status: {st}"))
    }

    /// `STATE_DIR/node.json` as meshd wrote it.
    pub fn node_json(&self) -> Result<Value> {
        let p = self.state_dir().join("node.json");
        let b = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display()))
    }

    /// Waits until meshd has written node.json.
    pub fn wait_node_json(&self, timeout: Duration) -> Result<Value> {
        crate::util::wait_for(timeout, || self.node_json().ok()).ok_or_else(|| {
            anyhow!(
                "{} has no node.json after {timeout:?}",
                self.state_dir().display()
            )
        })
    }
}

fn ns_snapshot_links(ns: &str) -> Result<Vec<String>> {
    Ok(ns_snapshot(ns)?.links.into_iter().collect())
}

/// MTU of `ifname` in namespace `ns`.
pub fn link_mtu(ns: &str, ifname: &str) -> Result<u32> {
    let out = run_args("ip", &["-n", ns, "-o", "link", "show", "dev", ifname])?;
    let w: Vec<&str> = out.split_whitespace().collect();
    w.windows(2)
        .find(|x| x[0] == "mtu")
        .and_then(|x| x[1].parse().ok())
        .ok_or_else(|| anyhow!("no mtu in {out:?}"))
}

/// A host outside the cluster CIDR, behind the switch/router (for masquerade tests).
#[derive(Debug, Clone)]
pub struct OutsideHost {
    pub ns: String,
    pub ip: Ipv4Addr,
    /// The router's address on the outside link.
    pub gateway: Ipv4Addr,
}

impl Cluster {
    /// Adds namespace `<prefix>-out` with `eth0` 198.18.1.2/24 on a veth to the switch/router
    /// (198.18.1.1/24 there), default route via the router. It has no route to the pod ranges: a
    /// pod reaches it only when masqueraded to its node's underlay address.
    pub fn add_outside_host(&self) -> Result<OutsideHost> {
        let sw = self
            .switch_ns
            .clone()
            .ok_or_else(|| anyhow!("add_outside_host needs the switch namespace"))?;
        let ns = format!("{}-out", self.prefix);
        let port = format!("{}o", self.short);
        let gateway = Ipv4Addr::new(198, 18, 1, 1);
        let ip = Ipv4Addr::new(198, 18, 1, 2);
        run_args("ip", &["netns", "add", &ns])?;
        run_args("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        run_args(
            "ip",
            &[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ],
        )?;
        run_args(
            "ip",
            &[
                "-n",
                &sw,
                "addr",
                "add",
                &format!("{gateway}/24"),
                "dev",
                &port,
            ],
        )?;
        run_args("ip", &["-n", &sw, "link", "set", &port, "up"])?;
        run_args(
            "ip",
            &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        )?;
        run_args("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        run_args(
            "ip",
            &[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &gateway.to_string(),
            ],
        )?;
        run_in(&ns, "sysctl", &["-qw", "net.ipv4.conf.all.rp_filter=0"])?;
        Ok(OutsideHost { ns, ip, gateway })
    }
}
