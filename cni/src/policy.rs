//! NetworkPolicy at ADD and DEL: the pod is placed under its policies before ADD returns.
//!
//! In: the pod's `NAMESPACE/NAME` (from `K8S_POD_NAMESPACE` / `K8S_POD_NAME` in `CNI_ARGS`),
//! the addresses ADD gave it, meshd's API socket. Out: ADD goes on only once meshd answers that
//! the pod's policies are in force (`placed`) or that it is isolated until meshd sees it in the
//! API server (`isolated`). When meshd cannot be asked, ADD goes on only if meshd's table
//! `inet weft-policy` is in the kernel: its guard drops everything forwarded to or from an
//! address meshd has not placed, so the pod is reachable from its own node only until meshd is
//! back; without the table ADD fails (try again later).

use crate::conf::{Env, NetConf};
use crate::error::{CniError, Result, TRY_AGAIN_LATER};
use serde_json::{json, Value};
use std::net::IpAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// meshd answers `pod-add` within 8 s (it waits that long for the Pod in the API server).
const ADD_TIMEOUT: Duration = Duration::from_secs(15);
const DEL_TIMEOUT: Duration = Duration::from_secs(2);

/// One request line to meshd's API socket and its whole reply (STATUS asks `status` this way).
pub async fn ask_raw(conf: &NetConf, line: &str, limit: Duration) -> std::io::Result<Vec<u8>> {
    let talk = async {
        let mut s = tokio::net::UnixStream::connect(&conf.meshd_socket).await?;
        s.write_all(line.as_bytes()).await?;
        s.write_all(b"\n").await?;
        s.shutdown().await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok(buf)
    };
    match tokio::time::timeout(limit, talk).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer in {} s", limit.as_secs()),
        )),
    }
}

async fn ask(conf: &NetConf, line: String, limit: Duration) -> std::io::Result<Value> {
    let buf = ask_raw(conf, &line, limit).await?;
    serde_json::from_slice::<Value>(&buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn split(pod: &str) -> (&str, &str) {
    pod.split_once('/').unwrap_or(("", pod))
}

/// ADD: see the module doc.
pub async fn place(env: &Env, conf: &NetConf, ips: &[IpAddr]) -> Result<()> {
    let Some(pod) = env.pod.as_deref() else {
        return Err(CniError::new(
            crate::error::INVALID_ENV,
            "NetworkPolicy is on, and CNI_ARGS names no pod",
            "K8S_POD_NAMESPACE and K8S_POD_NAME are needed to know which policies apply",
        ));
    };
    let (namespace, name) = split(pod);
    let req = json!({"namespace": namespace, "name": name, "ips": ips});
    match ask(conf, format!("pod-add {req}"), ADD_TIMEOUT).await {
        Ok(v) => match v["state"].as_str() {
            Some("placed") | Some("disabled") => Ok(()),
            Some("isolated") => {
                eprintln!(
                    "weft-cni: {pod} is not in the API server yet; meshd keeps it isolated until it is"
                );
                Ok(())
            }
            _ => Err(CniError::new(
                TRY_AGAIN_LATER,
                "meshd could not place the pod under its NetworkPolicies",
                v["error"].as_str().unwrap_or("no reason given").to_string(),
            )),
        },
        Err(e) => {
            let socket = conf.meshd_socket.display().to_string();
            match weft_sys::nft::policy::policy_installed() {
                Ok(true) => {
                    eprintln!(
                        "weft-cni: meshd cannot be asked ({socket}: {e}); {pod} stays isolated by \
                         the policy guard until meshd is back"
                    );
                    Ok(())
                }
                _ => Err(CniError::new(
                    TRY_AGAIN_LATER,
                    "meshd cannot be asked and no NetworkPolicy table is in force",
                    format!("{socket}: {e}"),
                )),
            }
        }
    }
}

/// DEL: tells meshd (best effort: the address is freed either way, and meshd also drops pods
/// the API server no longer lists).
pub async fn forget(env: &Env, conf: &NetConf) {
    let Some(pod) = env.pod.as_deref() else {
        return;
    };
    let (namespace, name) = split(pod);
    let req = json!({"namespace": namespace, "name": name});
    let _ = ask(conf, format!("pod-del {req}"), DEL_TIMEOUT).await;
}
