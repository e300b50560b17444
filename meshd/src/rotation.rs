//! This node's key rotation, driven from the event loop (see `weft_core::node::Node` for the
//! device side).
//!
//! 1. Announce: a new key is made on the node and stored in `STATE_DIR/next.key` (0600), added to
//!    the device (handshakes addressed to it are answered from now on) and published as the
//!    record's `nextPublicKey`. Peers add a key pair for it and accept handshakes from it.
//! 2. Handshake: once the registry shows the announcement (peers have it too), the node
//!    handshakes with every peer on the new key; each side moves its outbound traffic to the new
//!    pair as soon as that pair has a session.
//! 3. Retire: when every peer sends on the new key (or after [`GRACE`]), `next.key` replaces
//!    `private.key` (a rename), the old key leaves the device, and the record names the new key
//!    with the key generation + 1. Peers drop the old pair when they see it.
//!
//! A restart with `next.key` present resumes at step 1 with that key; a restart after the
//! rename finishes step 3 (the record then shows the previous key with ours as next, and the key
//! generation is bumped).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use weft_core::node::PeerRotation;
use weft_core::PublicKey;

/// Longest wait for every peer to move to the new key before the old one is retired anyway
/// (peers that are down cannot move; they handshake on the new key when they come back).
pub const GRACE: Duration = Duration::from_secs(20);
/// Longest wait for the announcement to show up in the registry watch before handshaking anyway.
pub const ANNOUNCE_WAIT: Duration = Duration::from_secs(3);
/// Pause after the announcement shows up, so the peers' watches have it too.
pub const SETTLE: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Idle,
    /// The next key is published; waiting until the registry shows it.
    Announced {
        since: Instant,
        seen: Option<Instant>,
    },
    /// Handshaking on the next key; waiting until every peer has moved.
    Handshaking {
        since: Instant,
    },
}

/// The rotation state of this node.
#[derive(Debug)]
pub struct Rotation {
    pub phase: Phase,
    pub next: Option<PublicKey>,
    pub reason: String,
    pub started: Option<Instant>,
    /// Highest key generation asked for by `keyctl rotate` (`rotations/NAME`).
    pub requested: u64,
    /// Finished rotations since start (for status).
    pub done: u64,
    /// Tests only (`WEFT_TEST_ROTATION_DWELL_MS`): the least time spent announced and
    /// handshaking, so a test can kill meshd in each phase. Zero otherwise.
    pub dwell: Duration,
    /// Set while the rotation is held back (a readmitted node's next key awaiting approval),
    /// so the reason is logged once.
    pub held: bool,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            phase: Phase::Idle,
            next: None,
            reason: String::new(),
            started: None,
            requested: 0,
            done: 0,
            dwell: Duration::ZERO,
            held: false,
        }
    }
}

/// What the event loop should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// Handshake with every peer on the next key.
    Initiate,
    /// Retire the old key; `not_moved` lists peers that had not moved when the grace ran out.
    Retire {
        not_moved: Vec<String>,
    },
}

impl Rotation {
    pub fn is_idle(&self) -> bool {
        self.phase == Phase::Idle
    }

    /// Enters the announce phase for `next`.
    pub fn announce(&mut self, next: PublicKey, reason: &str, now: Instant) {
        self.phase = Phase::Announced {
            since: now,
            seen: None,
        };
        self.next = Some(next);
        self.held = false;
        self.reason = reason.to_string();
        self.started.get_or_insert(now);
    }

    /// Decides the next step. `announced_in_registry`: the registry (as the watch sees it) holds
    /// this node's record with the next key.
    pub fn poll(
        &mut self,
        now: Instant,
        announced_in_registry: bool,
        progress: &BTreeMap<String, PeerRotation>,
    ) -> Step {
        match self.phase.clone() {
            Phase::Idle => Step::Nothing,
            Phase::Announced { since, seen } => {
                let seen = match seen {
                    Some(t) => Some(t),
                    None if announced_in_registry => {
                        self.phase = Phase::Announced {
                            since,
                            seen: Some(now),
                        };
                        Some(now)
                    }
                    None => None,
                };
                let ready = (seen.is_some_and(|t| now.saturating_duration_since(t) >= SETTLE)
                    || now.saturating_duration_since(since) >= ANNOUNCE_WAIT)
                    && now.saturating_duration_since(since) >= self.dwell;
                if ready {
                    self.phase = Phase::Handshaking { since: now };
                    Step::Initiate
                } else {
                    Step::Nothing
                }
            }
            Phase::Handshaking { since } => {
                let not_moved: Vec<String> = progress
                    .iter()
                    .filter(|(_, p)| **p != PeerRotation::Moved)
                    .map(|(n, _)| n.clone())
                    .collect();
                if now.saturating_duration_since(since) < self.dwell {
                    Step::Nothing
                } else if not_moved.is_empty() {
                    Step::Retire {
                        not_moved: Vec::new(),
                    }
                } else if now.saturating_duration_since(since) >= GRACE {
                    Step::Retire { not_moved }
                } else {
                    Step::Nothing
                }
            }
        }
    }

    /// Back to idle after the old key was retired.
    pub fn finished(&mut self) {
        self.phase = Phase::Idle;
        self.next = None;
        self.started = None;
        self.held = false;
        self.done += 1;
    }

    /// The phase's name, as `meshd status` and the metrics show it.
    pub fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Idle => "idle",
            Phase::Announced { .. } => "announced",
            Phase::Handshaking { .. } => "handshaking",
        }
    }

    /// For `meshd status`.
    pub fn status(&self, progress: &BTreeMap<String, PeerRotation>) -> serde_json::Value {
        let phase = self.phase_name();
        serde_json::json!({
            "phase": phase,
            "reason": self.reason,
            "nextPublicKey": self.next.map(|k| k.to_base64()),
            "secondsInRotation": self.started.map(|t| t.elapsed().as_secs_f64()),
            "peers": progress,
            "requestedGeneration": self.requested,
            "rotationsDone": self.done,
            "waitingForApproval": self.held && self.next.is_some(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_core::PrivateKey;

    #[test]
    fn phases_follow_the_registry_and_the_peers() {
        let t0 = Instant::now();
        let mut r = Rotation::default();
        let mut progress = BTreeMap::new();
        progress.insert("a".to_string(), PeerRotation::Handshaking);
        assert_eq!(r.poll(t0, false, &progress), Step::Nothing);
        r.announce(PrivateKey::generate().public_key(), "test", t0);
        assert_eq!(r.poll(t0, false, &progress), Step::Nothing);
        assert_eq!(r.poll(t0 + SETTLE, true, &progress), Step::Nothing);
        assert_eq!(r.poll(t0 + 2 * SETTLE, true, &progress), Step::Initiate);
        let t1 = t0 + 2 * SETTLE;
        assert_eq!(r.poll(t1, true, &progress), Step::Nothing);
        progress.insert("a".into(), PeerRotation::Moved);
        assert_eq!(
            r.poll(t1, true, &progress),
            Step::Retire {
                not_moved: Vec::new()
            }
        );
        progress.insert("b".into(), PeerRotation::Established);
        assert_eq!(r.poll(t1 + GRACE / 2, true, &progress), Step::Nothing);
        assert_eq!(
            r.poll(t1 + GRACE, true, &progress),
            Step::Retire {
                not_moved: vec!["b".into()]
            }
        );
        r.finished();
        assert!(r.is_idle());
        // Without the registry showing the announcement, handshakes start after ANNOUNCE_WAIT.
        let t2 = t1 + GRACE;
        r.announce(PrivateKey::generate().public_key(), "test", t2);
        assert_eq!(
            r.poll(t2 + ANNOUNCE_WAIT / 2, false, &progress),
            Step::Nothing
        );
        assert_eq!(r.poll(t2 + ANNOUNCE_WAIT, false, &progress), Step::Initiate);
    }
}
