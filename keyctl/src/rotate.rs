//! `keyctl rotate`: writes `rotations/NAME` requests (`RotationRequest { node, generation:
//! keyGeneration + 1, requestedAt }`) for the chosen nodes, never more than `--max-parallel` of
//! them unfinished at once, and follows the records until each node reached its generation with
//! no `nextPublicKey` left.
//!
//! [`Rollout`] is the pure part (records in, requests to write and progress out); [`run`] polls
//! the registry and feeds it. meshd's rotation driver is what acts on the requests.

use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use weft_core::control::{Revocation, RotationRequest};
use weft_core::{NodeRecord, PublicKey};
use weft_registry::{Registry, Typed};

/// Where one node is in the rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Target {
    /// Waiting for a free slot (`--max-parallel`).
    NotStarted,
    /// A request for `generation` is in the registry; the node has not reached it yet.
    #[serde(rename_all = "camelCase")]
    Requested {
        generation: u64,
        /// The next key the node announced, once it did.
        next_public_key: Option<PublicKey>,
    },
    /// The record reached `generation` with no next key.
    #[serde(rename_all = "camelCase")]
    Done {
        generation: u64,
        public_key: PublicKey,
    },
    /// The node had no record when its turn came.
    NoRecord,
}

/// Something worth telling the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Requested {
        node: String,
        generation: u64,
        /// An earlier request for this generation was still pending and is reused.
        reused: bool,
    },
    Rotating {
        node: String,
        next: PublicKey,
    },
    Done {
        node: String,
        generation: u64,
        key: PublicKey,
    },
    NoRecord {
        node: String,
    },
    /// A readmitted node announced `next`: keyctl approved it as the successor of the approved
    /// key (`revocations/NAME` `approvedNextKey`), since only the operator may approve its keys.
    Approved {
        node: String,
        next: PublicKey,
    },
}

#[derive(Debug, Clone)]
pub struct Rollout {
    /// The nodes in the order they are started.
    order: Vec<String>,
    targets: BTreeMap<String, Target>,
    max_parallel: usize,
    /// Requests in the registry, by node (to reuse a pending one instead of bumping again).
    pending: BTreeMap<String, RotationRequest>,
}

/// Whether `r` finished a rotation to `generation`.
fn reached(r: &NodeRecord, generation: u64) -> bool {
    r.key_generation >= generation && r.next_public_key.is_none()
}

impl Rollout {
    /// `nodes` in order (duplicates ignored); `existing` are the requests already stored.
    pub fn new(
        nodes: &[String],
        max_parallel: usize,
        existing: impl IntoIterator<Item = RotationRequest>,
    ) -> Rollout {
        let mut order: Vec<String> = Vec::new();
        for n in nodes {
            if !order.contains(n) {
                order.push(n.clone());
            }
        }
        Rollout {
            targets: order
                .iter()
                .map(|n| (n.clone(), Target::NotStarted))
                .collect(),
            order,
            max_parallel: max_parallel.max(1),
            pending: existing.into_iter().map(|r| (r.node.clone(), r)).collect(),
        }
    }

    /// Looks at the current records: marks finished nodes done, then starts nodes while fewer
    /// than `max_parallel` are unfinished. Returns the requests to write (call
    /// [`Rollout::write_failed`] for any that could not be written) and the progress.
    pub fn step(
        &mut self,
        records: &BTreeMap<String, NodeRecord>,
        now: u64,
    ) -> (Vec<RotationRequest>, Vec<Progress>) {
        let mut progress = Vec::new();
        for name in &self.order {
            let Some(t) = self.targets.get_mut(name) else {
                continue;
            };
            let Target::Requested {
                generation,
                next_public_key,
            } = t
            else {
                continue;
            };
            let Some(r) = records.get(name) else { continue };
            if reached(r, *generation) {
                progress.push(Progress::Done {
                    node: name.clone(),
                    generation: r.key_generation,
                    key: r.public_key,
                });
                *t = Target::Done {
                    generation: r.key_generation,
                    public_key: r.public_key,
                };
            } else if let Some(next) = r.next_public_key {
                if *next_public_key != Some(next) {
                    *next_public_key = Some(next);
                    progress.push(Progress::Rotating {
                        node: name.clone(),
                        next,
                    });
                }
            }
        }
        let mut writes = Vec::new();
        for name in &self.order {
            if self.in_flight() >= self.max_parallel {
                break;
            }
            if self.targets.get(name) != Some(&Target::NotStarted) {
                continue;
            }
            let Some(r) = records.get(name) else {
                self.targets.insert(name.clone(), Target::NoRecord);
                progress.push(Progress::NoRecord { node: name.clone() });
                continue;
            };
            let (generation, reused) = match self.pending.get(name) {
                Some(p) if p.generation > r.key_generation => (p.generation, true),
                _ => (r.key_generation + 1, false),
            };
            if !reused {
                let req = RotationRequest {
                    node: name.clone(),
                    generation,
                    requested_at: now,
                };
                self.pending.insert(name.clone(), req.clone());
                writes.push(req);
            }
            self.targets.insert(
                name.clone(),
                Target::Requested {
                    generation,
                    next_public_key: None,
                },
            );
            progress.push(Progress::Requested {
                node: name.clone(),
                generation,
                reused,
            });
        }
        (writes, progress)
    }

    /// A request from [`Rollout::step`] could not be written: the node goes back to waiting.
    pub fn write_failed(&mut self, node: &str) {
        self.pending.remove(node);
        if let Some(t) = self.targets.get_mut(node) {
            *t = Target::NotStarted;
        }
    }

    /// Nodes with a request written that have not finished.
    pub fn in_flight(&self) -> usize {
        self.targets
            .values()
            .filter(|t| matches!(t, Target::Requested { .. }))
            .count()
    }

    /// Every node has a request (or none can get one).
    pub fn all_requested(&self) -> bool {
        !self.targets.values().any(|t| *t == Target::NotStarted)
    }

    /// Nothing is left to do: every node is done or has no record.
    pub fn settled(&self) -> bool {
        self.targets
            .values()
            .all(|t| matches!(t, Target::Done { .. } | Target::NoRecord))
    }

    /// Every node is done.
    pub fn all_done(&self) -> bool {
        self.targets
            .values()
            .all(|t| matches!(t, Target::Done { .. }))
    }

    /// The targets in order.
    pub fn targets(&self) -> Vec<(String, Target)> {
        self.order
            .iter()
            .filter_map(|n| self.targets.get(n).map(|t| (n.clone(), t.clone())))
            .collect()
    }

    /// The nodes that did not finish, each with where it stands, for the error message.
    pub fn unfinished(&self, records: &BTreeMap<String, NodeRecord>) -> Vec<String> {
        self.targets()
            .into_iter()
            .filter_map(|(n, t)| {
                let at = records.get(&n).map_or_else(
                    || "no record".to_string(),
                    |r| format!("at generation {}", r.key_generation),
                );
                match t {
                    Target::Done { .. } => None,
                    Target::NotStarted => Some(format!("{n} (not started, {at})")),
                    Target::NoRecord => Some(format!("{n} (no record)")),
                    Target::Requested {
                        generation,
                        next_public_key,
                    } => Some(format!(
                        "{n} (requested generation {generation}, {at}{})",
                        next_public_key
                            .map(|k| format!(", rotating to {}", k.fingerprint()))
                            .unwrap_or_default()
                    )),
                }
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub max_parallel: usize,
    /// Wait until every node finished (else return once every request is written).
    pub wait: bool,
    /// Limit on the whole run.
    pub timeout: Duration,
    /// How often the records are read.
    pub poll: Duration,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub targets: Vec<(String, Target)>,
    /// Every node is done (with `--wait`), or every request is written (without).
    pub finished: bool,
    /// Why not, naming each node that did not finish.
    pub unfinished: Vec<String>,
    pub generations: BTreeMap<String, u64>,
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Drives a rollout against the registry, reporting progress through `report`.
pub async fn run(
    registry: &std::sync::Arc<dyn Registry>,
    nodes: &[String],
    opts: &Options,
    report: &mut dyn FnMut(&Progress),
) -> Result<Outcome> {
    let deadline = Instant::now() + opts.timeout;
    let requests: Typed<RotationRequest> = Typed::new(registry.clone());
    let (existing, _) = requests
        .list()
        .await
        .context("reading the rotation requests")?;
    let mut rollout = Rollout::new(nodes, opts.max_parallel, existing);
    let mut last_error = String::new();
    let mut records: BTreeMap<String, NodeRecord> = BTreeMap::new();
    let revocations: Typed<Revocation> = Typed::new(registry.clone());
    let mut revoked: BTreeMap<String, Revocation> = BTreeMap::new();
    loop {
        match weft_registry::list_nodes(&**registry).await {
            Ok((items, _)) => {
                records = items.into_iter().map(|r| (r.name.clone(), r)).collect();
                let (writes, progress) = rollout.step(&records, unix_now());
                progress.iter().for_each(&mut *report);
                match revocations.list().await {
                    Ok((items, _)) => {
                        revoked = items.into_iter().map(|r| (r.node.clone(), r)).collect();
                        approve_successors(registry, nodes, &records, &mut revoked, report).await;
                    }
                    Err(e) => eprintln!("keyctl: warning: reading the revocations: {e}"),
                }
                for req in writes {
                    if let Err(e) = requests.put(&req).await {
                        let e = format!("writing the rotation request for {}: {e}", req.node);
                        if e != last_error {
                            eprintln!("keyctl: warning: {e}; will retry");
                        }
                        last_error = e;
                        rollout.write_failed(&req.node);
                    }
                }
            }
            Err(e) => {
                let e = format!("reading the node records: {e}");
                if e != last_error {
                    eprintln!("keyctl: warning: {e}; will retry");
                }
                last_error = e;
            }
        }
        let no_record = rollout
            .targets()
            .iter()
            .any(|(_, t)| *t == Target::NoRecord);
        // A readmitted node's next key needs keyctl's approval: keyctl stays for it.
        let approving = awaiting_approval(&rollout, &records, &revoked);
        let finished = if opts.wait {
            rollout.all_done()
        } else {
            rollout.all_requested() && !no_record && approving.is_empty()
        };
        let nothing_left =
            rollout.settled() || (!opts.wait && rollout.all_requested() && approving.is_empty());
        if finished || nothing_left || Instant::now() >= deadline {
            return Ok(Outcome {
                targets: rollout.targets(),
                finished,
                unfinished: if finished {
                    Vec::new()
                } else {
                    rollout.unfinished(&records)
                },
                generations: records
                    .iter()
                    .map(|(n, r)| (n.clone(), r.key_generation))
                    .collect(),
            });
        }
        tokio::time::sleep(
            opts.poll
                .min(deadline.saturating_duration_since(Instant::now())),
        )
        .await;
    }
}

/// Approves the next key of every readmitted node among `nodes` that announced one (and makes
/// the successor the approved key once the node finished), each with a compare-and-swap.
async fn approve_successors(
    registry: &std::sync::Arc<dyn Registry>,
    nodes: &[String],
    records: &BTreeMap<String, NodeRecord>,
    revoked: &mut BTreeMap<String, Revocation>,
    report: &mut dyn FnMut(&Progress),
) {
    for name in nodes {
        let Some(rec) = records.get(name) else {
            continue;
        };
        if crate::revoke::approve_successor(revoked.get(name), rec).is_none() {
            continue;
        }
        let written =
            crate::revoke::update(&**registry, name, crate::revoke::OnCorrupt::Fail, |e| {
                crate::revoke::approve_successor(e, rec)
                    .or_else(|| e.cloned())
                    .ok_or_else(|| anyhow::anyhow!("{name} is no longer revoked"))
            })
            .await;
        match written {
            Ok(r) => {
                if let (Some(next), true) = (r.approved_next_key, rec.next_public_key.is_some()) {
                    report(&Progress::Approved {
                        node: name.clone(),
                        next,
                    });
                }
                revoked.insert(name.clone(), r);
            }
            Err(e) => eprintln!("keyctl: warning: approving {name}'s next key: {e:#}"),
        }
    }
}

/// The rotating nodes under a revocation whose next key keyctl has not approved yet (not
/// announced, or announced and not admitted).
fn awaiting_approval(
    rollout: &Rollout,
    records: &BTreeMap<String, NodeRecord>,
    revoked: &BTreeMap<String, Revocation>,
) -> Vec<String> {
    rollout
        .targets()
        .into_iter()
        .filter(|(name, t)| {
            let Some(rev) = revoked.get(name) else {
                return false;
            };
            matches!(t, Target::Requested { .. })
                && !records
                    .get(name)
                    .and_then(|r| r.next_public_key)
                    .is_some_and(|k| rev.admits(&k))
        })
        .map(|(name, _)| name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_core::record::SCHEMA_VERSION;
    use weft_core::PrivateKey;

    fn rec(name: &str, i: u8, generation: u64) -> NodeRecord {
        NodeRecord {
            schema: SCHEMA_VERSION,
            name: name.into(),
            public_key: PrivateKey::generate().public_key(),
            endpoints: vec![format!("198.18.0.{}:51820", 10 + i).parse().expect("ep")],
            private_endpoints: Vec::new(),
            location: None,
            relay: false,
            pod_cidrs: vec![format!("10.42.{i}.0/24").parse().expect("cidr")],
            key_generation: generation,
            next_public_key: None,
            key_created_at: 0,
            psk_generation: None,
        }
    }

    fn map(rs: &[&NodeRecord]) -> BTreeMap<String, NodeRecord> {
        rs.iter().map(|r| (r.name.clone(), (*r).clone())).collect()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// The node finishes a rotation: a new key at the next generation, no next key.
    fn rotated(r: &NodeRecord) -> NodeRecord {
        NodeRecord {
            key_generation: r.key_generation + 1,
            public_key: PrivateKey::generate().public_key(),
            next_public_key: None,
            ..r.clone()
        }
    }

    #[test]
    fn at_most_max_parallel_in_flight() {
        let (a, b, c) = (rec("a", 1, 1), rec("b", 2, 4), rec("c", 3, 1));
        let mut ro = Rollout::new(&names(&["a", "b", "c", "a"]), 2, []);
        let (w, p) = ro.step(&map(&[&a, &b, &c]), 100);
        assert_eq!(
            w,
            vec![
                RotationRequest {
                    node: "a".into(),
                    generation: 2,
                    requested_at: 100
                },
                RotationRequest {
                    node: "b".into(),
                    generation: 5,
                    requested_at: 100
                },
            ]
        );
        assert_eq!(p.len(), 2);
        assert_eq!(ro.in_flight(), 2);
        assert!(!ro.all_requested());
        // Nothing changed: nothing new.
        let (w, p) = ro.step(&map(&[&a, &b, &c]), 101);
        assert!(w.is_empty() && p.is_empty());
        // b announces its next key, then finishes: c may start.
        let mut b1 = b.clone();
        b1.next_public_key = Some(PrivateKey::generate().public_key());
        let (w, p) = ro.step(&map(&[&a, &b1, &c]), 102);
        assert!(w.is_empty());
        assert!(matches!(p.as_slice(), [Progress::Rotating { node, .. }] if node == "b"));
        // Still rotating at the new generation (next key not yet gone) is not done.
        let mut b2 = b1.clone();
        b2.key_generation = 5;
        let (w, _) = ro.step(&map(&[&a, &b2, &c]), 103);
        assert!(w.is_empty());
        let b3 = rotated(&b);
        let (w, p) = ro.step(&map(&[&a, &b3, &c]), 104);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].node, "c");
        assert_eq!(w[0].generation, 2);
        assert!(matches!(&p[0], Progress::Done { node, generation: 5, .. } if node == "b"));
        assert!(ro.all_requested() && !ro.all_done());
        let unfinished = ro.unfinished(&map(&[&a, &b3, &c]));
        assert_eq!(unfinished.len(), 2, "{unfinished:?}");
        assert!(unfinished[0].starts_with("a (requested generation 2, at generation 1"));
        let (w, _) = ro.step(&map(&[&rotated(&a), &b3, &rotated(&c)]), 105);
        assert!(w.is_empty());
        assert!(ro.all_done() && ro.settled());
    }

    #[test]
    fn pending_requests_reused_and_missing_records_reported() {
        let a = rec("a", 1, 3);
        let pending = [
            RotationRequest {
                node: "a".into(),
                generation: 4,
                requested_at: 5,
            },
            // Already reached: a new request is written.
            RotationRequest {
                node: "b".into(),
                generation: 1,
                requested_at: 5,
            },
        ];
        let b = rec("b", 2, 1);
        let mut ro = Rollout::new(&names(&["a", "b", "gone"]), 5, pending);
        let (w, p) = ro.step(&map(&[&a, &b]), 10);
        assert_eq!(w.len(), 1);
        assert_eq!((w[0].node.as_str(), w[0].generation), ("b", 2));
        assert!(p.contains(&Progress::Requested {
            node: "a".into(),
            generation: 4,
            reused: true
        }));
        assert!(p.contains(&Progress::NoRecord {
            node: "gone".into()
        }));
        // A failed write puts the node back in line; the next step writes it again.
        ro.write_failed("b");
        let (w, _) = ro.step(&map(&[&a, &b]), 11);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].requested_at, 11);
        let mut a4 = a.clone();
        a4.key_generation = 4;
        let (_, _) = ro.step(&map(&[&a4, &rotated(&b)]), 12);
        assert!(!ro.all_done() && ro.settled());
        assert_eq!(ro.unfinished(&BTreeMap::new()), vec!["gone (no record)"]);
    }
}
