//! A real etcd (Debian's `etcd-server`) for the etcd registry tests, run inside the cluster's
//! switch namespace on the switch address ([`ETCD_CLIENT_PORT`] on 198.18.0.1), so every node
//! reaches it over the underlay. Its data lives in the cluster's temp dir. The [`Etcd`] guard
//! kills it on drop; [`Etcd::stop`] / [`Etcd::start`] make outages.

use crate::cluster::{Cluster, UNDERLAY_ROUTER};
use crate::util::{ns_cmd, run_in_netns, run_timeout, tail, wait_until, Proc};
use anyhow::{anyhow, bail, Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Client port of the harness etcd.
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// Peer port of the harness etcd.
pub const ETCD_PEER_PORT: u16 = 2380;

/// A running (or stopped) single-member etcd in a switch namespace.
#[derive(Debug)]
pub struct Etcd {
    pub ns: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    proc: Option<Proc>,
}

impl Cluster {
    /// Starts etcd in the switch namespace on 198.18.0.1:2379 (data in the cluster's temp dir)
    /// and waits until it is healthy. The guard kills it on drop.
    pub fn start_etcd(&self) -> Result<Etcd> {
        let ns = self
            .switch_ns
            .clone()
            .ok_or_else(|| anyhow!("start_etcd needs the switch namespace (no direct_link)"))?;
        let mut e = Etcd {
            ns,
            data_dir: self.tmp.join("etcd-data"),
            log: self.tmp.join("etcd.log"),
            proc: None,
        };
        e.start()?;
        Ok(e)
    }
}

impl Etcd {
    /// `http://198.18.0.1:2379`
    pub fn client_url(&self) -> String {
        format!("http://{UNDERLAY_ROUTER}:{ETCD_CLIENT_PORT}")
    }

    /// meshd's `--registry` value.
    pub fn spec(&self) -> String {
        format!("etcd://{UNDERLAY_ROUTER}:{ETCD_CLIENT_PORT}")
    }

    /// Starts etcd (again, on the same data dir) and waits up to 15 s until it is healthy.
    pub fn start(&mut self) -> Result<()> {
        if self.running() {
            return Ok(());
        }
        let client = self.client_url();
        let peer = format!("http://{UNDERLAY_ROUTER}:{ETCD_PEER_PORT}");
        let mut cmd = ns_cmd(&self.ns, "etcd");
        cmd.args(["--name", "weft-test", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("weft-test={peer}")]);
        self.proc = Some(Proc::spawn_logged("etcd", &mut cmd, Some(&self.log))?);
        let healthy = wait_until(Duration::from_secs(15), || {
            !self.running() || self.etcdctl(&["endpoint", "health"]).is_ok()
        });
        if !healthy || !self.running() {
            bail!("etcd did not become healthy; log:\n{}", tail(&self.log, 30));
        }
        Ok(())
    }

    /// Whether etcd runs.
    pub fn running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::running)
    }

    /// Kills etcd (SIGKILL); the data dir stays for [`Etcd::start`].
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = p.stop(libc::SIGKILL, Duration::from_secs(5));
        }
    }

    /// Runs `etcdctl --endpoints URL ARGS` in the switch namespace (10 s limit); stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.etcdctl_cmd(args);
        let out = run_timeout(&mut cmd, Duration::from_secs(10))?;
        if !out.status.success() {
            bail!(
                "etcdctl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn etcdctl_cmd(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = ns_cmd(&self.ns, "etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.client_url(), "--command-timeout=3s"])
            .args(args);
        cmd
    }

    /// Keys under `prefix`.
    pub fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        let out = self.etcdctl(&["get", "--prefix", "--keys-only", prefix])?;
        Ok(out
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// Writes `value` at `key`. etcdctl reads the value from stdin, so it may be large (up to
    /// etcd's request limit, 1.5 MiB by default) or not UTF-8.
    pub fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        let mut cmd = self.etcdctl_cmd(&["put", key]);
        let out = crate::cni::run_with_stdin(&mut cmd, value, Duration::from_secs(10))?;
        if !out.success() {
            bail!("etcdctl put {key} failed: {}", out.stderr.trim());
        }
        Ok(())
    }

    /// Deletes `key`; returns how many keys were deleted.
    pub fn delete(&self, key: &str) -> Result<u64> {
        let out = self.etcdctl(&["del", key])?;
        out.trim()
            .parse()
            .map_err(|_| anyhow!("etcdctl del {key}: unexpected output {out:?}"))
    }

    /// The store's current revision.
    pub fn revision(&self) -> Result<i64> {
        let out = self.etcdctl(&["get", "/", "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v["header"]["revision"]
            .as_i64()
            .ok_or_else(|| anyhow!("no revision in {out}"))
    }

    /// Compacts the history up to `revision` (physically: waits until it is applied), so a
    /// watch from an older revision is cancelled.
    pub fn compact(&self, revision: i64) -> Result<()> {
        self.etcdctl(&["compact", &revision.to_string(), "--physical"])?;
        Ok(())
    }

    /// Every key under `prefix` with its value, sorted by key.
    pub fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        use base64::Engine as _;
        let out = self.etcdctl(&["get", "--prefix", prefix, "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let b64 = |s: &serde_json::Value| -> Result<Vec<u8>> {
            // An empty value is left out of the JSON.
            let s = s.as_str().unwrap_or_default();
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| anyhow!("etcdctl printed bad base64 {s:?}: {e}"))
        };
        let mut kvs = Vec::new();
        for kv in v["kvs"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let key = String::from_utf8(b64(&kv["key"])?)?;
            kvs.push((key, b64(&kv["value"])?));
        }
        kvs.sort();
        Ok(kvs)
    }

    /// Runs `f` with a client of this etcd: meshd's own (`weft_registry`, prefix `/weft`), on a
    /// current-thread runtime in a thread inside the switch namespace. For writing many objects
    /// fast; etcdctl costs a process per write.
    pub fn with_client<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(Arc<dyn weft_registry::Registry>) -> Fut + Send,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let spec = self.spec();
        run_in_netns(&self.ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building a tokio runtime")?;
            let registry = weft_registry::open_with(&spec, &weft_registry::OpenOptions::default())
                .context("opening the etcd registry")?;
            rt.block_on(f(registry))
        })
    }

    /// The lease ID (hex) a key is bound to, if any.
    pub fn lease_of(&self, key: &str) -> Result<Option<String>> {
        let out = self.etcdctl(&["get", key, "-w", "fields"])?;
        Ok(out.lines().find_map(|l| {
            let v = l.strip_prefix("\"Lease\" : ")?.trim();
            (v != "0").then(|| v.to_string())
        }))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
