//! The CNI environment and the network configuration, checked as SPEC 1.1 asks: every bad
//! variable named (code 4), bad JSON (6), unsupported version (1), unknown field (2), bad
//! value (7).

use crate::error::*;
use ipnet::IpNet;
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::path::PathBuf;

pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

#[derive(Debug, Clone)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub cni_path: Vec<PathBuf>,
    /// `NAMESPACE/NAME` of the Kubernetes pod, from `K8S_POD_NAMESPACE` and `K8S_POD_NAME` in
    /// `CNI_ARGS` (what kubelet's runtime passes); recorded with the pod's address.
    pub pod: Option<String>,
}

/// `NAMESPACE/NAME` from `CNI_ARGS` (`K=V;K=V`), when both are there and look like Kubernetes
/// names (lowercase letters, digits, '-', '.'; at most 253 bytes). Anything else is ignored:
/// the pod's identity is a label on the allocation, never a reason to refuse an ADD.
pub fn pod_from_cni_args(args: &str) -> Option<String> {
    let get = |key: &str| {
        args.split(';')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim())
    };
    let ok = |v: &str| {
        !v.is_empty()
            && v.len() <= 253
            && v.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    let (ns, name) = (get("K8S_POD_NAMESPACE")?, get("K8S_POD_NAME")?);
    (ok(ns) && ok(name)).then(|| format!("{ns}/{name}"))
}

/// Interface names the kernel accepts and the spec allows.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
}

fn valid_container_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// Reads the `CNI_*` variables; every missing or bad one is named in a single code 4 error.
pub fn read_env(get: impl Fn(&str) -> Option<String>) -> Result<Env> {
    let command = match get("CNI_COMMAND").as_deref() {
        Some("ADD") => Command::Add,
        Some("DEL") => Command::Del,
        Some("CHECK") => Command::Check,
        Some("STATUS") => Command::Status,
        Some("GC") => Command::Gc,
        Some("VERSION") => Command::Version,
        Some(other) => {
            return Err(CniError::new(
                INVALID_ENV,
                "invalid CNI_COMMAND",
                format!("CNI_COMMAND={other:?}: use ADD, DEL, CHECK, STATUS, GC or VERSION"),
            ))
        }
        None => {
            return Err(CniError::new(
                INVALID_ENV,
                "missing CNI_COMMAND",
                "CNI_COMMAND is not set",
            ))
        }
    };
    let attach = matches!(command, Command::Add | Command::Del | Command::Check);
    let mut bad: Vec<String> = Vec::new();
    let container_id = get("CNI_CONTAINERID").unwrap_or_default();
    if attach && !valid_container_id(&container_id) {
        bad.push(if container_id.is_empty() {
            "CNI_CONTAINERID (missing)".into()
        } else {
            "CNI_CONTAINERID (letters, digits, '_', '.', '-' only)".into()
        });
    }
    let netns = get("CNI_NETNS")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);
    if matches!(command, Command::Add | Command::Check) && netns.is_none() {
        bad.push("CNI_NETNS (missing)".into());
    }
    if let Some(ns) = &netns {
        if !ns.is_absolute() {
            bad.push("CNI_NETNS (must be an absolute path)".into());
        }
    }
    let ifname = get("CNI_IFNAME").unwrap_or_default();
    if attach && !valid_ifname(&ifname) {
        bad.push(if ifname.is_empty() {
            "CNI_IFNAME (missing)".into()
        } else {
            format!("CNI_IFNAME ({ifname:?}: 1-15 bytes, no '/', ':', whitespace, not '.' or '..')")
        });
    }
    let cni_path: Vec<PathBuf> = get("CNI_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect();
    if attach && cni_path.is_empty() {
        bad.push("CNI_PATH (missing)".into());
    }
    if !bad.is_empty() {
        let names: Vec<&str> = bad
            .iter()
            .map(|b| b.split(' ').next().unwrap_or(""))
            .collect();
        return Err(CniError::new(
            INVALID_ENV,
            format!("invalid CNI environment variables: {}", names.join(", ")),
            bad.join("; "),
        ));
    }
    let pod = get("CNI_ARGS").as_deref().and_then(pod_from_cni_args);
    Ok(Env {
        command,
        container_id,
        netns,
        ifname,
        cni_path,
        pod,
    })
}

#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub state_dir: PathBuf,
    pub meshd_socket: PathBuf,
    pub ip_masq: bool,
    /// The delegated IPAM section, if any.
    pub ipam: Option<Value>,
    pub prev_result: Option<Value>,
    /// GC: the attachments to keep (container id, ifname); absent or null means none.
    pub valid_attachments: Option<BTreeSet<(String, String)>>,
    /// The configuration as received, for delegation to an IPAM plugin.
    pub raw: Value,
}

const KNOWN_KEYS: &[&str] = &[
    "cniVersion",
    "cniVersions",
    "name",
    "type",
    "stateDir",
    "meshdSocket",
    "ipMasq",
    "ipam",
    "dns",
    "prevResult",
    "runtimeConfig",
    "capabilities",
    "args",
    "disableCheck",
    "disableGC",
    "cni.dev/valid-attachments",
    "cni.dev/attachments",
];

fn invalid(msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError::new(INVALID_CONFIG, msg, details)
}

/// The version to answer in when the config cannot be read (the newest).
pub const DEFAULT_VERSION: &str = "1.1.0";

/// Best-effort `cniVersion` of a config that may be invalid, for the error reply.
pub fn sniff_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| DEFAULT_VERSION.to_string())
}

pub fn parse(stdin: &[u8]) -> Result<NetConf> {
    let raw: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            DECODE_FAILURE,
            "failed to decode the network configuration",
            e.to_string(),
        )
    })?;
    let obj: &Map<String, Value> = raw.as_object().ok_or_else(|| {
        CniError::new(
            DECODE_FAILURE,
            "failed to decode the network configuration",
            "it must be a JSON object",
        )
    })?;
    let cni_version = match obj.get("cniVersion") {
        Some(Value::String(v)) => v.clone(),
        Some(_) => return Err(invalid("invalid cniVersion", "cniVersion must be a string")),
        None => {
            return Err(invalid(
                "missing cniVersion",
                "the config has no cniVersion",
            ))
        }
    };
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::new(
            INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            format!(
                "cniVersion {cni_version:?} is not one of {}",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    for key in obj.keys() {
        if !KNOWN_KEYS.contains(&key.as_str()) {
            return Err(CniError::new(
                UNSUPPORTED_FIELD,
                format!("unsupported field {key:?}"),
                format!(
                    "{key}={}",
                    obj.get(key).map(|v| v.to_string()).unwrap_or_default()
                ),
            ));
        }
    }
    let name = match obj.get("name") {
        Some(Value::String(n)) if valid_network_name(n) => n.clone(),
        Some(Value::String(n)) => {
            return Err(invalid(
                "invalid network name",
                format!("name {n:?}: letters, digits, '_', '.', '-'"),
            ))
        }
        _ => return Err(invalid("missing network name", "the config has no name")),
    };
    let path_field = |key: &str, default: &str| -> Result<PathBuf> {
        match obj.get(key) {
            None => Ok(PathBuf::from(default)),
            Some(Value::String(s)) if s.starts_with('/') => Ok(PathBuf::from(s)),
            Some(v) => Err(invalid(
                format!("invalid {key}"),
                format!("{key}={v}: must be an absolute path"),
            )),
        }
    };
    let state_dir = path_field("stateDir", "/var/lib/weft")?;
    let meshd_socket = path_field("meshdSocket", "/run/weft/meshd.sock")?;
    let ip_masq = match obj.get("ipMasq") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(invalid(
                "invalid ipMasq",
                format!("ipMasq={v}: must be true or false"),
            ))
        }
    };
    let ipam = match obj.get("ipam") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(m)) => {
            if m.is_empty() {
                None
            } else {
                match m.get("type") {
                    Some(Value::String(t)) if !t.is_empty() && !t.contains('/') => Some(v.clone()),
                    _ => return Err(invalid("invalid ipam", "ipam.type must name a plugin")),
                }
            }
        }
        Some(v) => {
            return Err(invalid(
                "invalid ipam",
                format!("ipam={v}: must be an object"),
            ))
        }
    };
    // A Go runtime encodes an empty list as null; the reference plugins read a missing list
    // as empty too.
    let valid_attachments = match obj.get("cni.dev/valid-attachments") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            let mut set = BTreeSet::new();
            for it in items {
                let cid = it.get("containerID").and_then(Value::as_str);
                let ifname = it.get("ifname").and_then(Value::as_str);
                match (cid, ifname) {
                    (Some(c), Some(i)) => {
                        set.insert((c.to_string(), i.to_string()));
                    }
                    _ => {
                        return Err(invalid(
                            "invalid cni.dev/valid-attachments",
                            format!("{it}: needs containerID and ifname"),
                        ))
                    }
                }
            }
            Some(set)
        }
        Some(v) => {
            return Err(invalid(
                "invalid cni.dev/valid-attachments",
                format!("{v}: must be a list"),
            ))
        }
    };
    Ok(NetConf {
        cni_version,
        name,
        state_dir,
        meshd_socket,
        ip_masq,
        ipam,
        prev_result: obj.get("prevResult").cloned(),
        valid_attachments,
        raw,
    })
}

fn valid_network_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && n != "."
        && n != ".."
}

/// What meshd tells the plugin about this node (`STATE_DIR/node.json`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// meshd enforces NetworkPolicy: ADD must place the pod under its policies.
    #[serde(default)]
    pub network_policy: bool,
    pub pod_cidrs: Vec<IpNet>,
    pub cluster_cidrs: Vec<IpNet>,
    pub mesh_addresses: Vec<std::net::IpAddr>,
    pub mtu: u32,
}

pub fn read_node_info(state_dir: &std::path::Path) -> Result<NodeInfo> {
    let path = state_dir.join("node.json");
    let bytes = std::fs::read(&path).map_err(|e| {
        CniError::new(
            TRY_AGAIN_LATER,
            "meshd has not set up this node yet",
            format!("{}: {e}", path.display()),
        )
    })?;
    let info: NodeInfo = serde_json::from_slice(&bytes).map_err(|e| {
        CniError::new(
            TRY_AGAIN_LATER,
            "meshd's node file is not readable yet",
            format!("{}: {e}", path.display()),
        )
    })?;
    if info.pod_cidrs.is_empty() || !(576..=65_535).contains(&info.mtu) {
        return Err(CniError::new(
            TRY_AGAIN_LATER,
            "meshd's node file is incomplete",
            path.display().to_string(),
        ));
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Env> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        read_env(|k| m.get(k).cloned())
    }

    #[test]
    fn pod_identity_comes_from_cni_args() {
        let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-7d.x-1;\
                    K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=1-2";
        assert_eq!(
            pod_from_cni_args(args).as_deref(),
            Some("kube-system/coredns-7d.x-1")
        );
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            ("CNI_ARGS", args),
        ])
        .expect("env");
        assert_eq!(e.pod.as_deref(), Some("kube-system/coredns-7d.x-1"));
        // Only one of the two, or names no Kubernetes object can have: no identity, no error.
        for bad in [
            "K8S_POD_NAME=a",
            "K8S_POD_NAMESPACE=a",
            "K8S_POD_NAMESPACE=a/b;K8S_POD_NAME=c",
            "K8S_POD_NAMESPACE=a;K8S_POD_NAME=C\nx",
            "K8S_POD_NAMESPACE=;K8S_POD_NAME=c",
            "garbage;;=;",
        ] {
            assert_eq!(pod_from_cni_args(bad), None, "{bad:?}");
        }
        let long = format!("K8S_POD_NAMESPACE=a;K8S_POD_NAME={}", "x".repeat(254));
        assert_eq!(pod_from_cni_args(&long), None);
    }

    #[test]
    fn every_bad_variable_is_named() {
        let e = env(&[("CNI_COMMAND", "ADD")]).expect_err("bad");
        assert_eq!(e.code, INVALID_ENV);
        for n in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"] {
            assert!(e.msg.contains(n), "{}", e.msg);
        }
        for bad in ["a-very-long-ifname0", "et/h0", "eth:0", "eth 0", ".", ".."] {
            let e = env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_NETNS", "/run/netns/x"),
                ("CNI_IFNAME", bad),
                ("CNI_PATH", "/opt/cni/bin"),
            ])
            .expect_err("bad ifname");
            assert_eq!(
                e.msg, "invalid CNI environment variables: CNI_IFNAME",
                "{bad}"
            );
        }
        // DEL needs no netns.
        env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ])
        .expect("del without netns");
    }

    #[test]
    fn config_errors_have_spec_codes() {
        let code = |s: &str| parse(s.as_bytes()).expect_err("bad").code;
        assert_eq!(code("{nope"), DECODE_FAILURE);
        assert_eq!(
            code(r#"{"cniVersion":"9.9.9","name":"n","type":"weft-cni"}"#),
            INCOMPATIBLE_VERSION
        );
        let e = parse(br#"{"cniVersion":"1.1.0","name":"n","type":"weft-cni","bogus":1}"#)
            .expect_err("bad");
        assert_eq!(e.code, UNSUPPORTED_FIELD);
        assert!(e.msg.contains("bogus"));
        assert_eq!(
            code(r#"{"cniVersion":"1.1.0","name":"n","type":"weft-cni","stateDir":"rel"}"#),
            INVALID_CONFIG
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.1.0","name":"n","type":"weft-cni","ipMasq":"yes"}"#),
            INVALID_CONFIG
        );
        let c = parse(br#"{"cniVersion":"0.4.0","name":"n","type":"weft-cni"}"#).expect("ok");
        assert!(c.ip_masq);
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/weft"));
    }
}
