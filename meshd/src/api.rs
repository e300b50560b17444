//! The local API socket: one request line in, one JSON document out.
//! Requests: `status` (the node and its peers) and `leave` (delete this node's record and its
//! routes, then exit).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use weft_core::node::PeerStatus;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub name: String,
    pub public_key: String,
    pub key_generation: u64,
    /// The cluster PSK generation (absent: no cluster secret, no PSK).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psk_generation: Option<u64>,
    pub listen_port: u16,
    pub interface: String,
    pub mtu: u32,
    pub endpoints: Vec<String>,
    /// Endpoints for the nodes of this node's location.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub private_endpoints: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Publishes no public endpoint (`--behind-nat`, or none known).
    pub behind_nat: bool,
    pub mesh_addresses: Vec<String>,
    pub pod_cidrs: Vec<String>,
    pub cluster_cidrs: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub node: NodeInfo,
    pub registry: String,
    /// This node's key rotation: phase, next key, per-peer progress.
    pub rotation: serde_json::Value,
    /// This node's record in the registry: "published", "publishing" or "not published: ERROR".
    pub own_record: String,
    /// With a claimed (not configured) pod range: `held`, `unconfirmed: ...` or `lost: ...`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_cidr_claim: Option<String>,
    pub peers: Vec<PeerStatus>,
    pub refused_records: BTreeMap<String, String>,
    /// External peer records (`peers/NAME`) refused, with the reason.
    pub refused_external_peers: BTreeMap<String, String>,
    pub drops: BTreeMap<&'static str, u64>,
    /// NAT traversal and relays: this node's address as relays see it, the relays it
    /// measures, what it relayed.
    pub paths: crate::shards::PathsStatus,
    /// The data path's offloads and what they did (all workers together).
    pub offload: crate::datapath::OffloadStatus,
    /// What each data-path worker did.
    pub workers: Vec<crate::worker::WorkerStatus>,
    /// NetworkPolicy enforcement (absent when off): policies per local pod, drops.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<serde_json::Value>,
}

/// Sends one request and returns the reply text.
pub async fn request(socket: &Path, req: &str) -> Result<String> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "connecting to meshd at {} (is it running?)",
            socket.display()
        )
    })?;
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{req}\n").as_bytes()).await?;
    w.shutdown().await?;
    let mut reply = String::new();
    let mut lines = BufReader::new(r);
    loop {
        let mut line = String::new();
        if lines.read_line(&mut line).await? == 0 {
            break;
        }
        reply.push_str(&line);
    }
    if reply.is_empty() {
        bail!("meshd closed the API socket without answering");
    }
    Ok(reply)
}

/// Human-readable `meshd status`.
pub fn render(v: &serde_json::Value) -> String {
    let mut out = String::new();
    let s = |v: &serde_json::Value| -> String {
        match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => "-".into(),
            other => other.to_string(),
        }
    };
    let node = &v["node"];
    out.push_str(&format!(
        "node {}  key {}  port {}  if {} mtu {}\n  mesh {}  pods {}\n  registry {}\n  own record {}\n",
        s(&node["name"]),
        s(&node["publicKey"]),
        s(&node["listenPort"]),
        s(&node["interface"]),
        s(&node["mtu"]),
        node["meshAddresses"]
            .as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
            .unwrap_or_default(),
        node["podCidrs"]
            .as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
            .unwrap_or_default(),
        s(&v["registry"]),
        s(&v["ownRecord"]),
    ));
    let list = |k: &str| -> String {
        node[k]
            .as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
            .unwrap_or_default()
    };
    out.push_str(&format!(
        "  location {}  endpoints {}  private {}{}\n",
        s(&node["location"]),
        if list("endpoints").is_empty() {
            "-".to_string()
        } else {
            list("endpoints")
        },
        if list("privateEndpoints").is_empty() {
            "-".to_string()
        } else {
            list("privateEndpoints")
        },
        if node["behindNat"].as_bool() == Some(true) {
            "  (behind NAT: peers learn this node's address from its packets)"
        } else {
            ""
        }
    ));
    let paths = &v["paths"];
    if paths["useRelays"].as_bool() == Some(true) {
        let relays: Vec<String> = paths["relays"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                format!(
                    "{} {}{}",
                    s(&r["name"]),
                    if r["alive"].as_bool() == Some(true) {
                        "alive"
                    } else {
                        "dead"
                    },
                    r["rttMs"]
                        .as_f64()
                        .map(|x| format!(" {x:.1}ms"))
                        .unwrap_or_default()
                )
            })
            .collect();
        let st = &paths["stats"];
        out.push_str(&format!(
            "  paths: relays [{}]{}  seen from outside as {}  relayed for others {} packets\n",
            relays.join(", "),
            if paths["relay"].as_bool() == Some(true) {
                " (this node relays)"
            } else {
                ""
            },
            s(&paths["reflexiveAddress"]),
            st["relayedPackets"].as_u64().unwrap_or(0),
        ));
    }
    if let Some(c) = v["podCidrClaim"].as_str() {
        out.push_str(&format!("  pod CIDR claim {c}\n"));
    }
    let off = &v["offload"];
    if off.is_object() {
        let n = |k: &str| off[k].as_u64().unwrap_or(0);
        out.push_str(&format!(
            "  offload tun {}  udp gso {} gro {}  (tun super-packets {} -> {} packets, \
             coalesced writes {} <- {} packets, gso sends {} <- {} datagrams, gro reads {} -> {} \
             datagrams, sendmmsg {} <- {} messages, recvmmsg {} -> {} messages)\n",
            s(&off["tun"]),
            if off["udpGso"].as_bool() == Some(true) {
                "on"
            } else {
                "off"
            },
            if off["udpGro"].as_bool() == Some(true) {
                "on"
            } else {
                "off"
            },
            n("tunSuperPackets"),
            n("tunSuperSegments"),
            n("tunCoalescedWrites"),
            n("tunCoalescedPackets"),
            n("udpGsoSends"),
            n("udpGsoDatagrams"),
            n("udpGroReads"),
            n("udpGroDatagrams"),
            n("udpMmsgSends"),
            n("udpMmsgMessages"),
            n("udpMmsgReads"),
            n("udpMmsgReadMessages"),
        ));
    }
    if let Some(ws) = v["workers"].as_array() {
        let each: Vec<String> = ws
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let n = |k: &str| w[k].as_u64().unwrap_or(0);
                format!(
                    "{i}: tun {} udp {} switches {}",
                    n("tunPackets"),
                    n("udpDatagrams"),
                    n("shardSwitches")
                )
            })
            .collect();
        out.push_str(&format!("  workers {}  ({})\n", ws.len(), each.join(", ")));
    }
    let rot = &v["rotation"];
    if let Some(phase) = rot["phase"].as_str().filter(|p| *p != "idle") {
        let peers = rot["peers"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", s(v)))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "  key rotation {phase} ({}) next key {}  {peers}\n",
            s(&rot["reason"]),
            s(&rot["nextPublicKey"])
        ));
    }
    out.push_str(&format!(
        "\n{:<16} {:<46} {:<22} {:<8} {:<18} {:>10} {:>12} {:>12}  drops\n",
        "PEER", "PUBLIC KEY", "ENDPOINT", "PATH", "ALLOWED IPS", "HANDSHAKE", "RX", "TX"
    ));
    for p in v["peers"].as_array().into_iter().flatten() {
        let hs = p["latestHandshakeSecsAgo"]
            .as_f64()
            .map(|x| format!("{x:.0}s ago"))
            .unwrap_or_else(|| "never".into());
        let drops = p["drops"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let name = match p["kind"].as_str() {
            Some("external") => format!("{} (ext)", s(&p["name"])),
            _ => s(&p["name"]),
        };
        let path = match p["relay"].as_str() {
            Some(r) => format!("relay:{r}"),
            None => s(&p["endpointSource"]),
        };
        out.push_str(&format!(
            "{:<16} {:<46} {:<22} {:<8} {:<18} {:>10} {:>12} {:>12}  {}\n",
            name,
            s(&p["publicKey"]),
            s(&p["endpoint"]),
            path,
            p["allowedIps"]
                .as_array()
                .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
                .unwrap_or_default(),
            hs,
            s(&p["rxBytes"]),
            s(&p["txBytes"]),
            drops
        ));
    }
    if let Some(m) = v["refusedRecords"].as_object() {
        for (name, why) in m {
            out.push_str(&format!("refused record {name}: {}\n", s(why)));
        }
    }
    if let Some(m) = v["refusedExternalPeers"].as_object() {
        for (name, why) in m {
            out.push_str(&format!("refused external peer {name}: {}\n", s(why)));
        }
    }
    if let Some(m) = v["drops"].as_object() {
        if !m.is_empty() {
            let d: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("device drops: {}\n", d.join(" ")));
        }
    }
    if v["policy"].is_object() {
        out.push_str(&render_policy(&v["policy"]));
    }
    out
}

/// The NetworkPolicy part of `meshd status`: the program in force and each local pod.
fn render_policy(p: &serde_json::Value) -> String {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let mut out = format!(
        "\nnetwork policy: {} generation {}  last apply {:.1} ms  seen {} pods {} namespaces {} policies  \
         program {} sets {} elements {} chains {} rules  guard drops {}  flows cut {}\n",
        if p["synced"].as_bool() == Some(true) {
            "in force,"
        } else {
            "waiting for the first listing,"
        },
        n(&p["generation"]),
        p["lastApplyMs"].as_f64().unwrap_or(0.0),
        n(&p["seen"]["pods"]),
        n(&p["seen"]["namespaces"]),
        n(&p["seen"]["policies"]),
        n(&p["program"]["sets"]),
        n(&p["program"]["elements"]),
        n(&p["program"]["chains"]),
        n(&p["program"]["rules"]),
        n(&p["guardDrops"]),
        n(&p["flowsCut"]),
    );
    if let Some(e) = p["lastError"].as_str() {
        out.push_str(&format!("  last error: {e}\n"));
    }
    for (k, e) in p["watchErrors"].as_object().into_iter().flatten() {
        out.push_str(&format!("  watch {k} failing: {e}\n"));
    }
    for (k, e) in p["refusedPolicies"].as_object().into_iter().flatten() {
        out.push_str(&format!(
            "  refused policy {k} (isolates its namespace for ingress): {e}\n"
        ));
    }
    let list = |v: &serde_json::Value| -> String {
        let l: Vec<&str> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str())
            .collect();
        if l.is_empty() {
            "-".into()
        } else {
            l.join(",")
        }
    };
    out.push_str(&format!(
        "{:<32} {:<16} {:<28} {:<28} {:>8} {:>8}\n",
        "POD", "IPS", "INGRESS POLICIES", "EGRESS POLICIES", "IN DROP", "EG DROP"
    ));
    for pod in p["pods"].as_array().into_iter().flatten() {
        let name = format!(
            "{}/{}{}",
            pod["namespace"].as_str().unwrap_or("?"),
            pod["name"].as_str().unwrap_or("?"),
            if pod["placed"].as_bool() == Some(true) {
                ""
            } else {
                " (isolated)"
            }
        );
        out.push_str(&format!(
            "{:<32} {:<16} {:<28} {:<28} {:>8} {:>8}\n",
            name,
            list(&pod["ips"]),
            list(&pod["ingressPolicies"]),
            list(&pod["egressPolicies"]),
            n(&pod["drops"]["ingress"]),
            n(&pod["drops"]["egress"]),
        ));
    }
    out
}
