//! Link health reports (`health/NAME`): what a node sees of each of its links, published for
//! `keyctl status --peers`.
//!
//! In: the device's [`PeerStatus`] list and the time. Out: a compact [`HealthReport`] (no
//! counters that change with every packet), and whether it differs enough from the last one
//! published to be worth a registry write ([`HealthReport::differs`]). Only public facts: peer
//! names, states, handshake ages and PSK generations, never a key.

use crate::node::PeerStatus;
use crate::peer::EndpointSource;
use crate::record::check_name;
use serde::{Deserialize, Serialize};

/// After this long without a handshake, a WireGuard session is gone (REJECT_AFTER_TIME).
pub const SESSION_LIFETIME_SECS: f64 = 180.0;

/// How one link looks from one end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkState {
    /// A handshake within the session lifetime: traffic flows.
    Up,
    /// The last handshake is older than a session lives: nothing was sent lately; the next
    /// packet handshakes again.
    Idle,
    /// No handshake ever completed with this peer since meshd started.
    NoHandshake,
    /// This node sends to the peer but has heard nothing back for [`UNANSWERED_AFTER_SECS`]
    /// (a WireGuard peer answers data with a keepalive within 10 s): the link is down, however
    /// recent its last handshake.
    Unanswered,
}

/// A link that sent and heard nothing back for this long is [`LinkState::Unanswered`]:
/// WireGuard's keepalive timeout (10 s) plus its rekey timeout (5 s), after which the kernel
/// implementation also gives up on the session and handshakes again.
pub const UNANSWERED_AFTER_SECS: u64 = 15;

/// Tells from the byte counters of successive looks which links send without hearing back.
/// In: every peer's status and the time of each look. Out: the peers whose links are
/// unanswered now. Sans-IO: the caller owns the clock.
#[derive(Debug, Default, Clone)]
pub struct LinkWatch {
    /// Per peer: the counters last seen, when rx last grew, and since when tx has grown
    /// without rx growing (None: rx kept up).
    seen: std::collections::BTreeMap<String, Seen>,
}

#[derive(Debug, Clone)]
struct Seen {
    rx: u64,
    tx: u64,
    /// The first look at which tx had grown while rx had not, since rx last grew.
    unanswered_since: Option<std::time::Instant>,
}

impl LinkWatch {
    /// Takes one look at the peers at `now`; returns the peers unanswered for at least
    /// [`UNANSWERED_AFTER_SECS`]. Peers that are gone are forgotten.
    pub fn observe(
        &mut self,
        now: std::time::Instant,
        peers: &[PeerStatus],
    ) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        let mut next = std::collections::BTreeMap::new();
        for p in peers {
            let seen = match self.seen.remove(&p.name) {
                None => Seen {
                    rx: p.rx_bytes,
                    tx: p.tx_bytes,
                    unanswered_since: None,
                },
                Some(mut s) => {
                    if p.rx_bytes != s.rx {
                        // Heard something (or the counters restarted): answered.
                        s.unanswered_since = None;
                    } else if p.tx_bytes > s.tx && s.unanswered_since.is_none() {
                        s.unanswered_since = Some(now);
                    }
                    s.rx = p.rx_bytes;
                    s.tx = p.tx_bytes;
                    s
                }
            };
            if seen.unanswered_since.is_some_and(|t| {
                now.saturating_duration_since(t).as_secs() >= UNANSWERED_AFTER_SECS
            }) {
                out.insert(p.name.clone());
            }
            next.insert(p.name.clone(), seen);
        }
        self.seen = next;
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkHealth {
    pub peer: String,
    pub state: LinkState,
    /// Seconds since the last handshake, rounded down; absent: none yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_age_secs: Option<u64>,
    /// The cluster PSK generation the link uses; absent: no PSK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_generation: Option<u64>,
    /// Live key pairs: 1, more while keys rotate.
    pub key_pairs: u32,
    /// Packets to the peer waiting for a handshake right now.
    #[serde(default)]
    pub queued: u32,
    /// The endpoint the link uses (absent: none yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Where it came from: `private` (same location), `public`, `learned` (from the peer's
    /// packets: behind NAT or roamed) or `none`.
    #[serde(default = "no_source")]
    pub endpoint_source: EndpointSource,
    /// The relay the link goes through (absent: direct).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
}

fn no_source() -> EndpointSource {
    EndpointSource::None
}

/// `health/NAME`: node NAME's links, as it last reported them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthReport {
    pub node: String,
    /// Unix seconds when the node made the report.
    pub reported_at: u64,
    /// How often the node reports at least (seconds), so a reader can tell a stale report.
    pub interval_secs: u64,
    pub links: Vec<LinkHealth>,
}

/// Why a health report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthError {
    #[error("not valid JSON for a health report: {0}")]
    Json(String),
    #[error("field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
}

impl HealthReport {
    /// The report of a node from its device's peer status at unix time `now`.
    pub fn from_status(node: &str, peers: &[PeerStatus], now: u64, interval_secs: u64) -> Self {
        Self::from_status_watched(node, peers, &Default::default(), now, interval_secs)
    }

    /// [`HealthReport::from_status`], with the links a [`LinkWatch`] found unanswered.
    pub fn from_status_watched(
        node: &str,
        peers: &[PeerStatus],
        unanswered: &std::collections::BTreeSet<String>,
        now: u64,
        interval_secs: u64,
    ) -> Self {
        let mut links: Vec<LinkHealth> = peers
            .iter()
            .map(|p| LinkHealth {
                peer: p.name.clone(),
                state: match p.latest_handshake_secs_ago {
                    _ if unanswered.contains(&p.name) => LinkState::Unanswered,
                    None => LinkState::NoHandshake,
                    Some(a) if a <= SESSION_LIFETIME_SECS => LinkState::Up,
                    Some(_) => LinkState::Idle,
                },
                handshake_age_secs: p.latest_handshake_secs_ago.map(|a| a.max(0.0) as u64),
                psk_generation: p.psk_generation,
                key_pairs: u32::try_from(p.key_pairs).unwrap_or(u32::MAX),
                queued: u32::try_from(p.queued).unwrap_or(u32::MAX),
                endpoint: p.endpoint.clone(),
                endpoint_source: p.endpoint_source,
                relay: p.relay.clone(),
            })
            .collect();
        links.sort_by(|a, b| a.peer.cmp(&b.peer));
        HealthReport {
            node: node.to_string(),
            reported_at: now,
            interval_secs,
            links,
        }
    }

    /// True when a reader would see something new: a link added, gone, or with another state,
    /// PSK generation, key pair count or endpoint source (handshake ages, queue lengths and a
    /// learnt endpoint's port alone do not count).
    pub fn differs(&self, other: &HealthReport) -> bool {
        type Key = (
            String,
            LinkState,
            Option<u64>,
            u32,
            EndpointSource,
            Option<String>,
        );
        let key = |r: &HealthReport| -> Vec<Key> {
            r.links
                .iter()
                .map(|l| {
                    (
                        l.peer.clone(),
                        l.state,
                        l.psk_generation,
                        l.key_pairs,
                        l.endpoint_source,
                        l.relay.clone(),
                    )
                })
                .collect()
        };
        self.node != other.node || key(self) != key(other)
    }

    /// Whether the report is older than three reporting intervals at unix time `now`.
    pub fn is_stale(&self, now: u64) -> bool {
        now.saturating_sub(self.reported_at) > 3 * self.interval_secs.max(1)
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, HealthError> {
        let r: HealthReport =
            serde_json::from_slice(bytes).map_err(|e| HealthError::Json(e.to_string()))?;
        r.check()?;
        Ok(r)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn check(&self) -> Result<(), HealthError> {
        check_name(&self.node).map_err(|e| HealthError::Field {
            field: "node",
            reason: e.to_string(),
        })?;
        for l in &self.links {
            check_name(&l.peer).map_err(|e| HealthError::Field {
                field: "links.peer",
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn peer(name: &str, hs: Option<f64>, psk: Option<u64>, pairs: usize) -> PeerStatus {
        PeerStatus {
            name: name.into(),
            kind: crate::peer::PeerKind::Node,
            public_key: String::new(),
            next_public_key: None,
            key_generation: 1,
            traffic_public_key: None,
            endpoint: None,
            endpoint_source: crate::peer::EndpointSource::None,
            endpoint_reason: String::new(),
            location: None,
            keepalive_secs: None,
            path: "direct",
            relay: None,
            path_reason: "",
            path_upgrades: 0,
            path_fallbacks: 0,
            allowed_ips: vec![],
            latest_handshake_secs_ago: hs,
            psk_generation: psk,
            rx_bytes: 5,
            tx_bytes: 7,
            handshake_attempts: 0,
            handshake_failures: 0,
            queued: 0,
            key_pairs: pairs,
            drops: BTreeMap::new(),
        }
    }

    #[test]
    fn a_link_that_sends_without_hearing_back_is_unanswered() {
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + std::time::Duration::from_secs(s);
        let mut w = LinkWatch::default();
        let mut p = peer("n2", Some(1.0), None, 1);
        assert!(w.observe(at(0), std::slice::from_ref(&p)).is_empty());
        // Both directions move: answered.
        p.tx_bytes += 100;
        p.rx_bytes += 100;
        assert!(w.observe(at(2), std::slice::from_ref(&p)).is_empty());
        // Sending, hearing nothing: unanswered once 15 s have passed since it started.
        for s in [4, 6, 10, 18] {
            p.tx_bytes += 100;
            assert!(w.observe(at(s), std::slice::from_ref(&p)).is_empty(), "{s}");
        }
        p.tx_bytes += 100;
        let down = w.observe(at(19), std::slice::from_ref(&p));
        assert!(down.contains("n2"));
        let r = HealthReport::from_status_watched("n1", std::slice::from_ref(&p), &down, 1, 30);
        assert_eq!(r.links[0].state, LinkState::Unanswered);
        // Silence both ways is idle, not unanswered: nothing was sent.
        let mut quiet = LinkWatch::default();
        let q = peer("n3", Some(1.0), None, 1);
        for s in [0, 20, 40] {
            assert!(quiet.observe(at(s), std::slice::from_ref(&q)).is_empty());
        }
        // A reply clears it at once.
        p.rx_bytes += 32;
        assert!(w.observe(at(21), std::slice::from_ref(&p)).is_empty());
        // A peer that is gone is forgotten.
        assert!(w.observe(at(22), &[]).is_empty());
        assert!(w.seen.is_empty());
    }

    #[test]
    fn states_sorting_and_what_counts_as_a_change() {
        let peers = vec![
            peer("n3", None, Some(1), 1),
            peer("n2", Some(3.7), Some(1), 1),
            peer("n4", Some(400.0), None, 1),
        ];
        let r = HealthReport::from_status("n1", &peers, 1000, 30);
        let states: Vec<(&str, LinkState)> =
            r.links.iter().map(|l| (l.peer.as_str(), l.state)).collect();
        assert_eq!(
            states,
            [
                ("n2", LinkState::Up),
                ("n3", LinkState::NoHandshake),
                ("n4", LinkState::Idle)
            ]
        );
        assert_eq!(r.links[0].handshake_age_secs, Some(3));
        // Ages alone are no change; a state, PSK generation or key pair count is.
        let mut later = peers.clone();
        later[1].latest_handshake_secs_ago = Some(50.0);
        assert!(!r.differs(&HealthReport::from_status("n1", &later, 1010, 30)));
        later[0].latest_handshake_secs_ago = Some(0.5);
        assert!(r.differs(&HealthReport::from_status("n1", &later, 1010, 30)));
        let mut rot = peers.clone();
        rot[1].key_pairs = 2;
        assert!(r.differs(&HealthReport::from_status("n1", &rot, 1010, 30)));
        assert!(!r.is_stale(1090));
        assert!(r.is_stale(1091));
        let back = HealthReport::from_json(&r.to_json()).expect("round trip");
        assert_eq!(back, r);
        let mut bad = r.clone();
        bad.links[0].peer = "../x".into();
        assert!(matches!(
            HealthReport::from_json(&bad.to_json()),
            Err(HealthError::Field {
                field: "links.peer",
                ..
            })
        ));
    }
}
