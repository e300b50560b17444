//! `--metrics-listen ADDR:PORT`: Prometheus metrics at `GET /metrics` (OpenMetrics text,
//! `prometheus-client`).
//!
//! In: at each scrape, the node's shards (peers, drops), the data-path workers' counters, the
//! control loop's [`ControlState`] (written every tick) and the CNI allocation files in the
//! state dir. Out: the text. Values are read at scrape time, so a removed peer's series are
//! gone from the next scrape; nothing here ever holds a shard's lock longer than `meshd
//! status` does. Peers are labelled `peer` (node or external peer name), `public_key` (base64,
//! the record's key) and `kind` (`node` or `external`). No private key or PSK is ever exported.
//! The full list is in docs/metrics.md.

use crate::shards::Shards;
use crate::worker::WorkerStatus;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The OpenMetrics content type Prometheus negotiates for.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Key rotation phases (a stateset: the current one is 1, the others 0).
const ROTATION_PHASES: &[&str] = &["idle", "announced", "handshaking"];
/// Pod CIDR claim states (only with a claimed range).
const CLAIM_STATES: &[&str] = &["held", "unconfirmed", "lost"];

/// What the control loop knows and the shards do not; written every tick.
#[derive(Debug, Clone, Default)]
pub struct ControlState {
    pub registry_connected: bool,
    /// Unix seconds of the last complete listing or change read from the registry (0: none).
    pub registry_last_sync: f64,
    pub key_generation: u64,
    pub rotation_phase: String,
    pub claim: Option<String>,
    pub refused_records: usize,
    pub refused_external_peers: usize,
}

/// The collector behind `/metrics`.
pub struct Metrics {
    pub shards: Arc<Shards>,
    pub workers: Vec<Arc<Mutex<WorkerStatus>>>,
    pub control: Arc<Mutex<ControlState>>,
    /// `--state-dir`: weft-cni keeps its allocations in `cni/networks/NAME/` under it.
    pub state_dir: PathBuf,
    /// NetworkPolicy enforcement, when on.
    pub policy: Option<Arc<Mutex<crate::netpol::Snapshot>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("state_dir", &self.state_dir)
            .finish()
    }
}

type Labels = Vec<(&'static str, String)>;

/// One metric family: its samples are added with [`Family::counter`] / [`Family::gauge`].
struct Family<'b> {
    enc: prometheus_client::encoding::MetricEncoder<'b>,
}

fn family<'b>(
    enc: &'b mut DescriptorEncoder,
    name: &'b str,
    help: &str,
    unit: Option<&'b Unit>,
    ty: MetricType,
) -> Result<Family<'b>, std::fmt::Error> {
    Ok(Family {
        enc: enc.encode_descriptor(name, help, unit, ty)?,
    })
}

impl Family<'_> {
    fn counter(&mut self, labels: &Labels, v: u64) -> Result<(), std::fmt::Error> {
        ConstCounter::new(v).encode(self.enc.encode_family(labels)?)
    }
    fn gauge(&mut self, labels: &Labels, v: i64) -> Result<(), std::fmt::Error> {
        ConstGauge::new(v).encode(self.enc.encode_family(labels)?)
    }
    fn gauge_f(&mut self, labels: &Labels, v: f64) -> Result<(), std::fmt::Error> {
        ConstGauge::new(v).encode(self.enc.encode_family(labels)?)
    }
}

/// CNI allocations in use per network: files in `STATE_DIR/cni/networks/NAME/` other than
/// the lock, hidden files and the last-reserved markers (as weft-cni's ipam keeps them).
pub fn cni_allocations(state_dir: &std::path::Path) -> Vec<(String, u64)> {
    let root = state_dir.join("cni").join("networks");
    let Ok(nets) = std::fs::read_dir(&root) else {
        return Vec::new();
    };
    let mut out: Vec<(String, u64)> = nets
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = std::fs::read_dir(e.path())
                .ok()?
                .filter_map(|f| f.ok())
                .filter(|f| f.file_type().is_ok_and(|t| t.is_file()))
                .filter(|f| {
                    f.file_name().to_str().is_some_and(|n| {
                        n != "lock" && !n.starts_with('.') && !n.starts_with("last")
                    })
                })
                .count() as u64;
            Some((name, n))
        })
        .collect();
    out.sort();
    out
}

impl Collector for Metrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let peers = self.shards.peer_status();
        let control = self.control.lock().map(|c| c.clone()).unwrap_or_default();
        let (workers, offload) = crate::worker::merged(&self.workers);
        let none: Labels = Vec::new();
        let peer_labels = |p: &weft_core::node::PeerStatus| -> Labels {
            vec![
                ("peer", p.name.clone()),
                ("public_key", p.public_key.clone()),
                ("kind", format!("{:?}", p.kind).to_lowercase()),
            ]
        };

        let mut f = family(
            &mut enc,
            "weft_build_info",
            "meshd's version",
            None,
            MetricType::Gauge,
        )?;
        f.gauge(
            &vec![
                ("version", env!("CARGO_PKG_VERSION").to_string()),
                ("component", "meshd".to_string()),
            ],
            1,
        )?;

        let mut f = family(
            &mut enc,
            "weft_peers",
            "Peers on this node's device",
            None,
            MetricType::Gauge,
        )?;
        f.gauge(&none, peers.len() as i64)?;

        let bytes = Unit::Bytes;
        for (name, help, get) in [
            (
                "weft_peer_receive",
                "Bytes of decrypted packets received from the peer",
                (|p: &weft_core::node::PeerStatus| p.rx_bytes) as fn(&_) -> u64,
            ),
            (
                "weft_peer_transmit",
                "Bytes of packets sent to the peer before encryption",
                |p| p.tx_bytes,
            ),
        ] {
            let mut f = family(&mut enc, name, help, Some(&bytes), MetricType::Counter)?;
            for p in &peers {
                f.counter(&peer_labels(p), get(p))?;
            }
        }
        for (name, help, get) in [
            (
                "weft_peer_handshake_attempts",
                "Handshake initiations sent to the peer",
                (|p: &weft_core::node::PeerStatus| p.handshake_attempts) as fn(&_) -> u64,
            ),
            (
                "weft_peer_handshake_failures",
                "Handshake initiations that got no response within 5 s and were retried",
                |p| p.handshake_failures,
            ),
        ] {
            let mut f = family(&mut enc, name, help, None, MetricType::Counter)?;
            for p in &peers {
                f.counter(&peer_labels(p), get(p))?;
            }
        }
        let now = unix_now();
        let mut f = family(
            &mut enc,
            "weft_peer_last_handshake_timestamp_seconds",
            "Unix time of the newest handshake with the peer (absent: none yet)",
            None,
            MetricType::Gauge,
        )?;
        for p in &peers {
            if let Some(ago) = p.latest_handshake_secs_ago {
                f.gauge_f(&peer_labels(p), (now - ago).max(0.0))?;
            }
        }
        let mut f = family(
            &mut enc,
            "weft_peer_key_pairs",
            "Live (own key, peer key) pairs: 1, up to 4 while keys rotate",
            None,
            MetricType::Gauge,
        )?;
        for p in &peers {
            f.gauge(&peer_labels(p), p.key_pairs as i64)?;
        }
        let mut f = family(
            &mut enc,
            "weft_peer_queued_packets",
            "Packets waiting for a handshake with the peer",
            None,
            MetricType::Gauge,
        )?;
        for p in &peers {
            f.gauge(&peer_labels(p), p.queued as i64)?;
        }

        let mut f = family(
            &mut enc,
            "weft_peer_relayed",
            "1 while the peer's datagrams go through a relay (label relay), 0 when direct",
            None,
            MetricType::Gauge,
        )?;
        for p in &peers {
            let mut l = peer_labels(p);
            l.push(("relay", p.relay.clone().unwrap_or_default()));
            f.gauge(&l, i64::from(p.relay.is_some()))?;
        }
        let mut f = family(
            &mut enc,
            "weft_peer_path_changes",
            "Path moves of the peer: direction upgrade (relayed to direct) or fallback",
            None,
            MetricType::Counter,
        )?;
        for p in &peers {
            for (dir, n) in [("upgrade", p.path_upgrades), ("fallback", p.path_fallbacks)] {
                let mut l = peer_labels(p);
                l.push(("direction", dir.to_string()));
                f.counter(&l, n)?;
            }
        }
        let paths = self.shards.paths(false, false);
        for (name, help, v) in [
            (
                "weft_relay_forwarded_packets",
                "Datagrams this node forwarded as a relay",
                paths.stats.relayed_packets,
            ),
            (
                "weft_relay_forwarded_bytes",
                "Bytes of datagrams this node forwarded as a relay",
                paths.stats.relayed_bytes,
            ),
            (
                "weft_relay_refused",
                "Relay requests refused (not a relay, not a member, unknown destination)",
                paths.stats.relay_refused,
            ),
            (
                "weft_sent_via_relay",
                "Datagrams this node sent through a relay",
                paths.stats.sent_via_relay,
            ),
        ] {
            let mut f = family(&mut enc, name, help, None, MetricType::Counter)?;
            f.counter(&vec![], v)?;
        }
        let mut f = family(
            &mut enc,
            "weft_relay_up",
            "1 while the relay answers this node's pings",
            None,
            MetricType::Gauge,
        )?;
        for r in &paths.relays {
            f.gauge(&vec![("relay", r.name.clone())], i64::from(r.alive))?;
        }

        // Drops by reason: the device's and every peer's together.
        let mut drops = self.shards.drops().by_name();
        for p in &peers {
            for (reason, n) in &p.drops {
                *drops.entry(reason).or_default() += n;
            }
        }
        let mut f = family(
            &mut enc,
            "weft_drops",
            "Packets and datagrams dropped, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in &drops {
            f.counter(&vec![("reason", reason.to_string())], *n)?;
        }

        let mut f = family(
            &mut enc,
            "weft_key_generation",
            "This node's key generation (goes up with every rotation)",
            None,
            MetricType::Gauge,
        )?;
        f.gauge(&none, control.key_generation as i64)?;
        let mut f = family(
            &mut enc,
            "weft_key_rotation_state",
            "This node's key rotation phase (1 for the current one)",
            None,
            MetricType::Gauge,
        )?;
        for phase in ROTATION_PHASES {
            let on = control.rotation_phase == *phase
                || (*phase == "idle" && control.rotation_phase.is_empty());
            f.gauge(&vec![("phase", phase.to_string())], i64::from(on))?;
        }
        if let Some(g) = self.shards.psk_generation() {
            let mut f = family(
                &mut enc,
                "weft_psk_generation",
                "The cluster PSK generation this node uses (absent: no cluster PSK)",
                None,
                MetricType::Gauge,
            )?;
            f.gauge(&none, g as i64)?;
        }

        let mut f = family(
            &mut enc,
            "weft_registry_connected",
            "1 while the registry answers, 0 while it is unreachable",
            None,
            MetricType::Gauge,
        )?;
        f.gauge(&none, i64::from(control.registry_connected))?;
        let mut f = family(
            &mut enc,
            "weft_registry_last_sync_timestamp_seconds",
            "Unix time of the last listing or change read from the registry (0: none yet)",
            None,
            MetricType::Gauge,
        )?;
        f.gauge_f(&none, control.registry_last_sync)?;
        let mut f = family(
            &mut enc,
            "weft_refused_records",
            "Registry records refused, by kind (node, external)",
            None,
            MetricType::Gauge,
        )?;
        f.gauge(
            &vec![("kind", "node".to_string())],
            control.refused_records as i64,
        )?;
        f.gauge(
            &vec![("kind", "external".to_string())],
            control.refused_external_peers as i64,
        )?;
        if let Some(claim) = &control.claim {
            let mut f = family(
                &mut enc,
                "weft_pod_cidr_claim_state",
                "This node's claimed pod range (1 for the current state)",
                None,
                MetricType::Gauge,
            )?;
            for s in CLAIM_STATES {
                f.gauge(
                    &vec![("state", s.to_string())],
                    i64::from(claim.starts_with(s)),
                )?;
            }
        }
        let mut f = family(
            &mut enc,
            "weft_cni_allocations",
            "Pod addresses weft-cni has handed out on this node, by CNI network",
            None,
            MetricType::Gauge,
        )?;
        for (net, n) in cni_allocations(&self.state_dir) {
            f.gauge(&vec![("network", net)], n as i64)?;
        }

        // The data path.
        for (name, help, get) in [
            (
                "weft_worker_tun_packets",
                "Packets a data-path worker read from its TUN queue",
                (|w: &WorkerStatus| w.tun_packets) as fn(&_) -> u64,
            ),
            (
                "weft_worker_udp_datagrams",
                "Datagrams a data-path worker read from its UDP socket",
                |w| w.udp_datagrams,
            ),
            (
                "weft_worker_shard_switches",
                "Packets a worker read that belonged to another worker's shard",
                |w| w.shard_switches,
            ),
        ] {
            let mut f = family(&mut enc, name, help, None, MetricType::Counter)?;
            for (i, w) in workers.iter().enumerate() {
                f.counter(&vec![("worker", i.to_string())], get(w))?;
            }
        }
        let mut f = family(
            &mut enc,
            "weft_offload_enabled",
            "Data-path offloads in use (1) or not (0)",
            None,
            MetricType::Gauge,
        )?;
        for (what, on) in [
            (
                "tun_vnet_hdr",
                offload.tun != "off" && !offload.tun.is_empty(),
            ),
            ("udp_gso", offload.udp_gso),
            ("udp_gro", offload.udp_gro),
        ] {
            f.gauge(&vec![("offload", what.to_string())], i64::from(on))?;
        }
        for (name, help, pairs) in [
            (
                "weft_offload_calls",
                "System calls or super-packets that moved several packets at once, by kind",
                [
                    ("tun_super_packets", offload.tun_super_packets),
                    ("tun_coalesced_writes", offload.tun_coalesced_writes),
                    ("udp_gso_sends", offload.udp_gso_sends),
                    ("udp_gro_reads", offload.udp_gro_reads),
                    ("udp_mmsg_sends", offload.udp_mmsg_sends),
                    ("udp_mmsg_reads", offload.udp_mmsg_reads),
                ],
            ),
            (
                "weft_offload_packets",
                "Packets or datagrams those calls moved, by kind",
                [
                    ("tun_super_packets", offload.tun_super_segments),
                    ("tun_coalesced_writes", offload.tun_coalesced_packets),
                    ("udp_gso_sends", offload.udp_gso_datagrams),
                    ("udp_gro_reads", offload.udp_gro_datagrams),
                    ("udp_mmsg_sends", offload.udp_mmsg_messages),
                    ("udp_mmsg_reads", offload.udp_mmsg_read_messages),
                ],
            ),
        ] {
            let mut f = family(&mut enc, name, help, None, MetricType::Counter)?;
            for (kind, n) in pairs {
                f.counter(&vec![("kind", kind.to_string())], n)?;
            }
        }
        if let Some(p) = &self.policy {
            let snap = p.lock().map(|s| s.clone()).unwrap_or_default();
            policy_metrics(&mut enc, &snap)?;
        }
        Ok(())
    }
}

/// The NetworkPolicy families: drops per local pod, direction and policy selecting it (a drop
/// counts for each policy isolating the pod that way: none of them allowed it), guard drops,
/// applies, the last apply's duration, flows cut.
fn policy_metrics(
    enc: &mut DescriptorEncoder,
    s: &crate::netpol::Snapshot,
) -> Result<(), std::fmt::Error> {
    let none: Labels = Vec::new();
    {
        let mut f = family(
            enc,
            "weft_policy_drops",
            "Packets NetworkPolicy dropped, per local pod, direction and policy isolating it",
            None,
            MetricType::Counter,
        )?;
        for p in &s.pods {
            for (dir, chain, policies) in [
                ("ingress", &p.ingress_chain, &p.ingress),
                ("egress", &p.egress_chain, &p.egress),
            ] {
                let n = chain
                    .as_ref()
                    .and_then(|c| s.drops.get(c))
                    .map(|c| c.packets)
                    .unwrap_or(0);
                for pol in policies {
                    f.counter(
                        &vec![
                            ("namespace", p.namespace.clone()),
                            ("pod", p.name.clone()),
                            ("direction", dir.to_string()),
                            ("policy", pol.clone()),
                        ],
                        n,
                    )?;
                }
            }
        }
    }
    for (name, help, v) in [
        (
            "weft_policy_guard_drops",
            "Packets dropped to or from an address of this node's pod ranges that is no pod placed under its policies",
            s.guard_drops.packets,
        ),
        (
            "weft_policy_applies",
            "NetworkPolicy programs written to the kernel",
            s.generation,
        ),
        (
            "weft_policy_flows_cut",
            "Established flows whose conntrack entries were removed because a change denies them",
            s.flows_cut,
        ),
    ] {
        family(enc, name, help, None, MetricType::Counter)?.counter(&none, v)?;
    }
    family(
        enc,
        "weft_policy_last_apply_seconds",
        "How long the last NetworkPolicy change took to compile and write",
        None,
        MetricType::Gauge,
    )?
    .gauge_f(&none, s.last_apply_ms / 1000.0)?;
    family(
        enc,
        "weft_policy_synced",
        "1 once Pods, Namespaces and NetworkPolicies have been listed and a program written",
        None,
        MetricType::Gauge,
    )?
    .gauge(&none, i64::from(s.synced))?;
    family(
        enc,
        "weft_policy_rules",
        "Rules in the NetworkPolicy program in force",
        None,
        MetricType::Gauge,
    )?
    .gauge(&none, s.rules as i64)?;
    Ok(())
}

/// Unix time in seconds with a fraction (0 if the clock is before 1970).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The registry `/metrics` renders.
pub fn registry(metrics: Metrics) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(metrics));
    r
}

/// The classic Prometheus text format (0.0.4).
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The HTTP handler: `/metrics` renders `registry` as OpenMetrics when the client accepts it
/// (Prometheus does), else in the classic text format. Anything else is 404.
pub fn handler(registry: Arc<Registry>) -> crate::probes::Handler {
    Arc::new(move |path: &str, head: &str| {
        let openmetrics = head
            .to_ascii_lowercase()
            .contains("application/openmetrics-text");
        handler_for(&registry, path, openmetrics)
    })
}

/// `/metrics` as OpenMetrics (`openmetrics`) or in the classic text format.
pub fn handler_for(
    registry: &Registry,
    path: &str,
    openmetrics: bool,
) -> (u16, &'static str, String) {
    if path != "/metrics" {
        return (404, "text/plain", "not found; try /metrics\n".into());
    }
    let mut out = String::with_capacity(16 * 1024);
    match prometheus_client::encoding::text::encode(&mut out, registry) {
        Ok(()) if openmetrics => (200, CONTENT_TYPE, out),
        Ok(()) => (200, CONTENT_TYPE_TEXT, classic_text(&out)),
        Err(_) => (500, "text/plain", "encoding the metrics failed\n".into()),
    }
}

/// OpenMetrics text (as prometheus-client writes it) in the classic Prometheus text format,
/// for clients that do not ask for OpenMetrics (curl, `promtool check metrics`): a counter
/// family `X` is declared as `X_total` (its samples' name), `# UNIT` and `# EOF` go, and empty
/// label sets `{}` are left out.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{prefix}{name}_total {tail}\n"));
                } else {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            None => {
                out.push_str(&line.replacen("{} ", " ", 1));
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cni_allocations_like_weft_cni_keeps_them() {
        let d = tempfile::tempdir().expect("tempdir");
        let net = d.path().join("cni/networks/weft");
        std::fs::create_dir_all(&net).expect("mkdir");
        for f in [
            "10.42.1.2",
            "10.42.1.3",
            "lock",
            "last_reserved_ip.0",
            ".tmp1",
        ] {
            std::fs::write(net.join(f), "x").expect("write");
        }
        assert_eq!(cni_allocations(d.path()), vec![("weft".to_string(), 2)]);
        assert!(cni_allocations(&d.path().join("nope")).is_empty());
    }

    #[test]
    fn renders_openmetrics_with_no_peers() {
        let key = weft_core::PrivateKey::generate();
        let shards = Shards::new(key, None, 2).expect("shards");
        let reg = registry(Metrics {
            shards,
            workers: vec![Arc::new(Mutex::new(WorkerStatus::default()))],
            control: Arc::new(Mutex::new(ControlState {
                key_generation: 3,
                rotation_phase: "idle".into(),
                registry_connected: true,
                ..Default::default()
            })),
            state_dir: PathBuf::from("/nonexistent"),
            policy: None,
        });
        let accept =
            "GET /metrics HTTP/1.1\r\naccept: application/openmetrics-text;version=1.0.0\r\n";
        let (code, ct, body) = handler(Arc::new(reg))("/metrics", accept);
        assert_eq!(code, 200);
        assert!(ct.starts_with("application/openmetrics-text"));
        for want in [
            "weft_key_generation{} 3",
            "weft_key_rotation_state{phase=\"idle\"} 1",
            "weft_key_rotation_state{phase=\"announced\"} 0",
            "weft_registry_connected{} 1",
            "weft_peers{} 0",
            "# TYPE weft_peer_receive_bytes counter",
            "weft_worker_tun_packets_total{worker=\"0\"} 0",
            "# EOF",
        ] {
            assert!(body.contains(want), "{want} missing from\n{body}");
        }
        assert!(!body.contains("weft_psk_generation"), "no PSK, no series");
        let text = classic_text(&body);
        for want in [
            "weft_key_generation 3\n",
            "# TYPE weft_worker_tun_packets_total counter\n",
            "# HELP weft_worker_tun_packets_total Packets",
            "weft_worker_tun_packets_total{worker=\"0\"} 0\n",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        assert!(!text.contains("weft_policy"), "policy off, no series");
    }

    #[test]
    fn policy_drops_per_pod_direction_and_policy() {
        use weft_core::netpol::compile::PodPolicies;
        use weft_core::netpol::program::Counter;
        let key = weft_core::PrivateKey::generate();
        let shards = Shards::new(key, None, 1).expect("shards");
        let mut snap = crate::netpol::Snapshot {
            synced: true,
            generation: 4,
            flows_cut: 2,
            guard_drops: Counter {
                packets: 7,
                bytes: 420,
            },
            ..Default::default()
        };
        snap.pods.push(PodPolicies {
            namespace: "x".into(),
            name: "a".into(),
            ips: vec!["10.42.1.10".parse().expect("ip")],
            placed: true,
            ingress: vec!["x/deny".into(), "x/web".into()],
            egress: Vec::new(),
            ingress_chain: Some("in/x/a".into()),
            egress_chain: None,
        });
        snap.drops.insert(
            "in/x/a".into(),
            Counter {
                packets: 5,
                bytes: 300,
            },
        );
        let reg = registry(Metrics {
            shards,
            workers: Vec::new(),
            control: Arc::new(Mutex::new(ControlState::default())),
            state_dir: PathBuf::from("/nonexistent"),
            policy: Some(Arc::new(Mutex::new(snap))),
        });
        let (_, _, body) = handler(Arc::new(reg))("/metrics", "GET /metrics HTTP/1.1\r\n");
        for want in [
            "weft_policy_drops_total{namespace=\"x\",pod=\"a\",direction=\"ingress\",policy=\"x/deny\"} 5\n",
            "weft_policy_drops_total{namespace=\"x\",pod=\"a\",direction=\"ingress\",policy=\"x/web\"} 5\n",
            "weft_policy_guard_drops_total 7\n",
            "weft_policy_applies_total 4\n",
            "weft_policy_flows_cut_total 2\n",
            "weft_policy_synced 1\n",
        ] {
            assert!(body.contains(want), "{want} missing from\n{body}");
        }
        assert!(
            !body.contains("direction=\"egress\""),
            "not isolated for egress: no series"
        );
        let (code, _, _) = handler(Arc::new(Registry::default()))("/other", "");
        assert_eq!(code, 404);
    }
}
