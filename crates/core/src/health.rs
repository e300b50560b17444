//! Link health reports (`health/NAME`): what a node sees of each of its links, published for
//! `keyctl status --peers`.
//!
//! In: the device's [`PeerStatus`] list and the time. Out: a compact [`HealthReport`] (no
//! counters that change with every packet), and whether it differs enough from the last one
//! published to be worth a registry write ([`HealthReport::differs`]). Only public facts: peer
//! names, states, handshake ages and PSK generations, never a key.

use crate::node::PeerStatus;
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
        let mut links: Vec<LinkHealth> = peers
            .iter()
            .map(|p| LinkHealth {
                peer: p.name.clone(),
                state: match p.latest_handshake_secs_ago {
                    None => LinkState::NoHandshake,
                    Some(a) if a <= SESSION_LIFETIME_SECS => LinkState::Up,
                    Some(_) => LinkState::Idle,
                },
                handshake_age_secs: p.latest_handshake_secs_ago.map(|a| a.max(0.0) as u64),
                psk_generation: p.psk_generation,
                key_pairs: u32::try_from(p.key_pairs).unwrap_or(u32::MAX),
                queued: u32::try_from(p.queued).unwrap_or(u32::MAX),
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
    /// PSK generation or key pair count (handshake ages and queue lengths alone do not count).
    pub fn differs(&self, other: &HealthReport) -> bool {
        let key = |r: &HealthReport| -> Vec<(String, LinkState, Option<u64>, u32)> {
            r.links
                .iter()
                .map(|l| (l.peer.clone(), l.state, l.psk_generation, l.key_pairs))
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
            endpoint: None,
            allowed_ips: vec![],
            latest_handshake_secs_ago: hs,
            psk_generation: psk,
            rx_bytes: 5,
            tx_bytes: 7,
            queued: 0,
            key_pairs: pairs,
            drops: BTreeMap::new(),
        }
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
