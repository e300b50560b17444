//! The registry flags keyctl shares with `meshd run` (`--registry`, `--etcd-*`, the same
//! `WEFT_*` environment variables), their validation, and opening the registry.

use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use weft_registry::{EtcdOptions, OpenOptions, Registry};

/// A flag with a bad value: keyctl exits 64 and names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError {
    pub flag: &'static str,
    pub reason: String,
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.flag.chars().all(|c| c.is_ascii_uppercase()) {
            write!(f, "invalid value for {}: {}", self.flag, self.reason)
        } else {
            write!(f, "invalid value for --{}: {}", self.flag, self.reason)
        }
    }
}

impl std::error::Error for UsageError {}

pub fn bad(flag: &'static str, reason: impl Into<String>) -> UsageError {
    UsageError {
        flag,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// The registry meshd uses: dir:PATH, etcd://HOST:PORT[,HOST:PORT...] (etcds:// or
    /// --etcd-ca for TLS; user and password from WEFT_ETCD_USERNAME / WEFT_ETCD_PASSWORD) or
    /// kube (the Kubernetes API server of --kubeconfig / KUBECONFIG; needs the weft-admin
    /// ClusterRole, see deploy/README.md).
    #[arg(
        long,
        global = true,
        env = "WEFT_REGISTRY",
        default_value = "dir:/var/lib/weft/registry"
    )]
    pub registry: String,
    /// etcd registry: key prefix (objects live at PREFIX/KIND/NAME).
    #[arg(long, global = true, env = "WEFT_ETCD_PREFIX", default_value = "/weft")]
    pub etcd_prefix: String,
    /// etcd registry: CA bundle (PEM) to verify etcd with; turns on TLS.
    #[arg(long, global = true, env = "WEFT_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// etcd registry: client certificate (PEM) for mutual TLS; needs --etcd-key and --etcd-ca.
    #[arg(long, global = true, env = "WEFT_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// etcd registry: client key (PEM) for mutual TLS; needs --etcd-cert.
    #[arg(long, global = true, env = "WEFT_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// kube registry: a kubeconfig file. Absent: KUBECONFIG, else ~/.kube/config, else the
    /// in-cluster ServiceAccount.
    #[arg(long, global = true, env = "WEFT_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// kube registry: the API server's address (https://HOST:PORT), replacing the kubeconfig's.
    #[arg(long, global = true, env = "WEFT_KUBE_API_SERVER")]
    pub kube_api_server: Option<String>,
}

impl RegistryArgs {
    /// Checks the flags the way `meshd run` does: the spec, and the etcd flags whatever the
    /// registry. A `dir:` registry must exist already (keyctl never creates one). Errors never
    /// quote an etcd spec (it may hold credentials).
    pub fn validate(&self) -> Result<(String, OpenOptions), UsageError> {
        weft_registry::etcd::check_flags(
            &self.etcd_prefix,
            self.etcd_ca.as_deref(),
            self.etcd_cert.as_deref(),
            self.etcd_key.as_deref(),
        )
        .map_err(|(flag, reason)| bad(flag, reason))?;
        let spec = self.registry.trim().to_string();
        let kube = weft_registry::KubeOptions {
            kubeconfig: self.kubeconfig.clone(),
            api_server: self.kube_api_server.clone(),
            field_manager: "keyctl".into(),
            node: None,
            ..weft_registry::KubeOptions::default()
        };
        kube.check().map_err(|(flag, reason)| bad(flag, reason))?;
        match spec.split_once(':') {
            _ if weft_registry::is_kube_spec(&spec) => {}
            Some(("dir", path)) if !path.is_empty() => {
                if !std::path::Path::new(path).is_dir() {
                    return Err(bad(
                        "registry",
                        format!("{path} is not a directory (keyctl does not create registries; is this the path meshd uses?)"),
                    ));
                }
            }
            Some(("etcd" | "etcds", _)) => {
                weft_registry::parse_etcd_spec(&spec)
                    .map_err(|e| bad("registry", e.to_string()))?;
                if spec.starts_with("etcds:") && self.etcd_ca.is_none() {
                    return Err(bad("etcd-ca", "etcds:// needs a CA file"));
                }
                let env = EtcdOptions::from_env();
                if env.username.is_some() != env.password.is_some() {
                    return Err(bad(
                        "registry",
                        "WEFT_ETCD_USERNAME and WEFT_ETCD_PASSWORD must be set together",
                    ));
                }
            }
            _ => {
                return Err(bad(
                    "registry",
                    "expected dir:PATH, etcd://HOST:PORT[,HOST:PORT...] or kube",
                ))
            }
        }
        let etcd = EtcdOptions {
            prefix: self.etcd_prefix.clone(),
            ca_file: self.etcd_ca.clone(),
            cert_file: self.etcd_cert.clone(),
            key_file: self.etcd_key.clone(),
            ..EtcdOptions::from_env()
        };
        Ok((spec, OpenOptions { etcd, kube }))
    }

    /// Opens the registry after [`RegistryArgs::validate`] (needs a tokio runtime for etcd).
    pub fn open(spec: &str, options: &OpenOptions) -> anyhow::Result<Arc<dyn Registry>> {
        use anyhow::Context;
        weft_registry::open_with(spec, options).context("opening the registry")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: RegistryArgs,
    }

    fn check(args: &[&str]) -> Result<(String, OpenOptions), UsageError> {
        let mut v = vec!["keyctl"];
        v.extend_from_slice(args);
        T::try_parse_from(v).expect("clap").a.validate()
    }

    #[test]
    fn flags_like_meshd() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = format!("dir:{}", tmp.path().display());
        let (spec, _) = check(&["--registry", &dir]).expect("dir");
        assert_eq!(spec, dir);
        let (_, o) = check(&[
            "--registry",
            "etcd://127.0.0.1:2379,[::1]:2379",
            "--etcd-prefix",
            "/k/weft",
        ])
        .expect("etcd");
        assert_eq!(o.etcd.prefix, "/k/weft");
        let cases: &[(&[&str], &str)] = &[
            (&["--registry", "dir:/nonexistent/weft"], "registry"),
            (&["--registry", "etcd://127.0.0.1"], "registry"),
            (&["--registry", "etcds://127.0.0.1:2379"], "etcd-ca"),
            (&["--registry", "kube:x"], "registry"),
            (&["--kubeconfig", "/nonexistent/kc"], "kubeconfig"),
            (&["--registry", "/tmp"], "registry"),
            (&["--etcd-prefix", "weft"], "etcd-prefix"),
            (&["--etcd-ca", "/nonexistent/ca.pem"], "etcd-ca"),
            (&["--etcd-cert", "/nonexistent/c.pem"], "etcd-cert"),
        ];
        for (args, flag) in cases {
            let mut a: Vec<&str> = args.to_vec();
            if !a.contains(&"--registry") {
                a.extend(["--registry", &dir]);
            }
            let e = check(&a).expect_err("should fail");
            assert_eq!(e.flag, *flag, "{args:?}: {e}");
        }
        let e = check(&["--registry", "etcd://u:secret@127.0.0.1:2379"]).expect_err("creds");
        assert!(!e.to_string().contains("secret"), "{e}");
        assert_eq!(bad("NAME", "x").to_string(), "invalid value for NAME: x");
        assert_eq!(bad("node", "x").to_string(), "invalid value for --node: x");
    }
}
