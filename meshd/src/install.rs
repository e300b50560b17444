//! `meshd install-cni`: puts the weft-cni binary and its conflist where the container runtime
//! looks for them. Both are written to a temporary name in the target directory and renamed, so
//! a runtime never sees a half-written plugin or config.

use anyhow::{Context, Result};
use clap::Args;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Args)]
pub struct InstallArgs {
    /// Where the runtime looks for CNI plugin binaries.
    #[arg(long, env = "WEFT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// Where the runtime looks for CNI network configurations.
    #[arg(long, env = "WEFT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// meshd's state dir (the plugin reads node.json and keeps allocations there).
    #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft")]
    pub state_dir: PathBuf,
    /// meshd's API socket (the plugin's STATUS asks it).
    #[arg(long, env = "WEFT_API_SOCKET", default_value = "/run/weft/meshd.sock")]
    pub api_socket: PathBuf,
    /// The weft-cni binary to install. Default: weft-cni next to this meshd.
    #[arg(long, env = "WEFT_CNI_PLUGIN")]
    pub plugin: Option<PathBuf>,
    /// Whether the plugin masquerades pod traffic leaving the cluster ranges (`ipMasq`).
    /// `false` when meshd runs with `--masquerade` (it installs the rule once per node).
    #[arg(long, env = "WEFT_CNI_IP_MASQ", default_value_t = true, action = clap::ArgAction::Set)]
    pub ip_masq: bool,
}

pub const CONFLIST: &str = "10-weft.conflist";

fn atomic_write(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let dst = dir.join(name);
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, &dst).with_context(|| format!("renaming to {}", dst.display()))?;
    Ok(dst)
}

/// The network configuration list. `cniVersions` (CNI 1.1) lets a runtime whose libcni knows it
/// (>= 1.2: containerd 1.7, 2.x, k3s) pick 1.1.0; older ones (containerd 1.6's libcni 1.1) read
/// only `cniVersion` and cannot parse a 1.1.0 result ("unsupported CNI result version"), so
/// that stays 1.0.0. Found by the real-node tier (tests/harness/tests/kubelet.rs).
pub fn conflist(args: &InstallArgs) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "cniVersions": ["1.0.0", "1.1.0"],
        "name": "weft",
        "plugins": [{
            "type": "weft-cni",
            "stateDir": args.state_dir,
            "meshdSocket": args.api_socket,
            "ipMasq": args.ip_masq,
        }],
    })
}

pub fn run(args: &InstallArgs) -> Result<String> {
    for (flag, p) in [
        ("cni-bin-dir", &args.cni_bin_dir),
        ("cni-conf-dir", &args.cni_conf_dir),
        ("state-dir", &args.state_dir),
        ("api-socket", &args.api_socket),
    ] {
        anyhow::ensure!(
            p.is_absolute(),
            "--{flag} must be an absolute path, not {}",
            p.display()
        );
    }
    let plugin = match &args.plugin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("finding meshd's own path")?
            .with_file_name("weft-cni"),
    };
    let bytes = fs::read(&plugin).with_context(|| {
        format!(
            "reading the plugin {} (pass --plugin PATH)",
            plugin.display()
        )
    })?;
    let bin = atomic_write(&args.cni_bin_dir, "weft-cni", &bytes, 0o755)?;
    let conf = serde_json::to_vec_pretty(&conflist(args)).context("encoding the conflist")?;
    let cfg = atomic_write(&args.cni_conf_dir, CONFLIST, &conf, 0o644)?;
    Ok(format!("installed {} and {}", bin.display(), cfg.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_binary_and_conflist() {
        let tmp = tempfile::tempdir().expect("tmp");
        let plugin = tmp.path().join("src-plugin");
        fs::write(&plugin, b"#!/bin/sh\n").expect("write");
        let args = InstallArgs {
            cni_bin_dir: tmp.path().join("bin"),
            cni_conf_dir: tmp.path().join("net.d"),
            state_dir: "/var/lib/weft".into(),
            api_socket: "/run/weft/meshd.sock".into(),
            plugin: Some(plugin),
            ip_masq: false,
        };
        run(&args).expect("install");
        let mode = fs::metadata(tmp.path().join("bin/weft-cni"))
            .expect("bin")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        let v: serde_json::Value = serde_json::from_slice(
            &fs::read(tmp.path().join("net.d").join(CONFLIST)).expect("conf"),
        )
        .expect("json");
        assert_eq!(v["plugins"][0]["type"], "weft-cni");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["cniVersions"], serde_json::json!(["1.0.0", "1.1.0"]));
        assert_eq!(v["plugins"][0]["ipMasq"], false);
        let leftovers: Vec<_> = fs::read_dir(tmp.path().join("net.d"))
            .expect("dir")
            .collect();
        assert_eq!(leftovers.len(), 1, "no temp files left");
        let bad = InstallArgs {
            cni_bin_dir: "rel".into(),
            ..args
        };
        assert!(run(&bad).is_err());
    }
}
