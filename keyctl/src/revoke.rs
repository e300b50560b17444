//! `keyctl revoke NAME` and `keyctl readmit NAME --public-key KEY`: the `revocations/NAME`
//! object, built by pure functions ([`revoke`], [`readmit`]) and written with a compare-and-swap
//! over the revocations collection, so two operators never lose each other's change.

use anyhow::{bail, Context, Result};
use weft_core::control::Revocation;
use weft_core::external::ExternalPeer;
use weft_core::{NodeRecord, PublicKey};
use weft_registry::{Kind, Registry};

/// The keys a revocation of NAME must refuse: the node's current key and its next key if it is
/// rotating, or the external peer's key.
pub fn current_keys(
    record: Option<&NodeRecord>,
    external: Option<&ExternalPeer>,
) -> Vec<PublicKey> {
    record
        .map(|r| r.public_key)
        .into_iter()
        .chain(record.and_then(|r| r.next_public_key))
        .chain(external.map(|p| p.public_key))
        .collect()
}

/// The revocation after `keyctl revoke`: the current keys of the node or external peer (see
/// [`current_keys`]) join the keys revoked before, and so does a key approved earlier; nothing
/// is approved. Works for a name without a record too (then only the name is banned: no key is
/// accepted until `keyctl readmit`).
pub fn revoke(
    node: &str,
    current: &[PublicKey],
    existing: Option<&Revocation>,
    now: u64,
) -> Revocation {
    let mut keys: Vec<PublicKey> = existing.map(|e| e.revoked_keys.clone()).unwrap_or_default();
    let more = current
        .iter()
        .copied()
        .chain(existing.and_then(|e| e.approved_key))
        .chain(existing.and_then(|e| e.approved_next_key));
    for k in more {
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    Revocation {
        node: node.to_string(),
        revoked_keys: keys,
        approved_key: None,
        approved_next_key: None,
        revoked_at: now,
    }
}

/// The revocation after `keyctl readmit`: `key` becomes the one key node may use. Refused when
/// the node is not revoked or `key` is one of its revoked keys.
pub fn readmit(node: &str, existing: Option<&Revocation>, key: PublicKey) -> Result<Revocation> {
    let Some(existing) = existing else {
        bail!("{node} is not revoked (no revocations/{node}); nothing to readmit");
    };
    if existing.revoked_keys.contains(&key) {
        bail!(
            "refusing to readmit {node} with {key}: that key was revoked; get the node's new public \
             key (delete its private.key, restart meshd, read `meshd status`) and approve that one"
        );
    }
    Ok(Revocation {
        approved_key: Some(key),
        approved_next_key: None,
        ..existing.clone()
    })
}

/// The revocation after a readmitted node's rotation step, as `keyctl rotate` sees its record:
/// while the node publishes an admitted key and announces a next key, that next key becomes the
/// approved successor (the current key stays approved until the rotation ends); once the record
/// names the successor as its key with no next key, the successor becomes the approved key.
/// `None` when nothing is to change (no revocation, a record that is not admitted, a revoked
/// next key, or approval already given).
pub fn approve_successor(existing: Option<&Revocation>, record: &NodeRecord) -> Option<Revocation> {
    let rev = existing?;
    if !rev.admits(&record.public_key) {
        return None;
    }
    match record.next_public_key {
        Some(next) if !rev.admits(&next) && !rev.revoked_keys.contains(&next) => Some(Revocation {
            approved_key: Some(record.public_key),
            approved_next_key: Some(next),
            ..rev.clone()
        }),
        None if rev.approved_next_key == Some(record.public_key) => Some(Revocation {
            approved_key: Some(record.public_key),
            approved_next_key: None,
            ..rev.clone()
        }),
        _ => None,
    }
}

/// What to do with a stored revocation that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnCorrupt {
    /// Treat it as absent (revoke: the new object replaces it).
    Replace,
    /// Stop with an error (readmit must not approve on top of something unknown).
    Fail,
}

/// Reads `revocations/NAME`, lets `change` build the new object, and writes it only if the
/// collection did not change in between (retried a few times). Returns the object written.
pub async fn update(
    registry: &dyn Registry,
    node: &str,
    on_corrupt: OnCorrupt,
    mut change: impl FnMut(Option<&Revocation>) -> Result<Revocation>,
) -> Result<Revocation> {
    for _ in 0..8 {
        let (items, snapshot) = registry
            .list_for_update(Kind::Revocations)
            .await
            .context("reading the revocations")?;
        let existing = match items.iter().find(|(n, _)| n == node) {
            None => None,
            Some((_, bytes)) => match Revocation::from_json(bytes) {
                Ok(r) if r.node == node => Some(r),
                Ok(r) => {
                    let e = format!("it names node {:?}", r.node);
                    corrupt(registry, node, on_corrupt, &e)?;
                    None
                }
                Err(e) => {
                    corrupt(registry, node, on_corrupt, &e.to_string())?;
                    None
                }
            },
        };
        let new = change(existing.as_ref())?;
        new.check()
            .with_context(|| format!("refusing to write an invalid revocation for {node}"))?;
        if registry
            .put_if_unchanged(Kind::Revocations, node, &new.to_json(), snapshot)
            .await
            .with_context(|| format!("writing {}", registry.location(Kind::Revocations, node)))?
        {
            return Ok(new);
        }
    }
    bail!("the revocations kept changing while keyctl tried to write {node}'s; try again")
}

fn corrupt(registry: &dyn Registry, node: &str, on: OnCorrupt, why: &str) -> Result<()> {
    let at = registry.location(Kind::Revocations, node);
    match on {
        OnCorrupt::Replace => {
            eprintln!("keyctl: warning: replacing unreadable revocation {at}: {why}");
            Ok(())
        }
        OnCorrupt::Fail => bail!(
            "revocation {at} cannot be read ({why}); run `keyctl revoke {node}` to rewrite it"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_core::record::SCHEMA_VERSION;
    use weft_core::PrivateKey;

    fn key() -> PublicKey {
        PrivateKey::generate().public_key()
    }

    fn rec(key: PublicKey, next: Option<PublicKey>) -> NodeRecord {
        NodeRecord {
            schema: SCHEMA_VERSION,
            name: "n2".into(),
            public_key: key,
            endpoints: vec!["198.18.0.12:51820".parse().expect("ep")],
            private_endpoints: Vec::new(),
            location: None,
            relay: false,
            pod_cidrs: vec!["10.42.3.0/24".parse().expect("cidr")],
            key_generation: 1,
            next_public_key: next,
            key_created_at: 0,
            psk_generation: None,
        }
    }

    #[test]
    fn revoke_collects_every_key_and_readmit_approves_one() {
        let (k1, k2, k3, k4) = (key(), key(), key(), key());
        // First revocation: current and next key.
        let r = revoke(
            "n2",
            &current_keys(Some(&rec(k1, Some(k2))), None),
            None,
            10,
        );
        assert_eq!(r.revoked_keys, vec![k1, k2]);
        assert_eq!(r.approved_key, None);
        assert!(r.check().is_ok());
        // Readmit: a revoked key is refused, a new one approved.
        assert!(readmit("n2", Some(&r), k1).is_err());
        assert!(readmit("n2", Some(&r), k2).is_err());
        assert!(readmit("n2", None, k3).is_err());
        let r2 = readmit("n2", Some(&r), k3).expect("readmit");
        assert_eq!(r2.approved_key, Some(k3));
        assert_eq!(r2.revoked_keys, r.revoked_keys);
        assert!(r2.admits(&k3) && !r2.admits(&k1));
        // Revoked again while publishing k4 (never approved): k3 and k4 join, nothing approved.
        let r3 = revoke("n2", &[k4], Some(&r2), 20);
        assert_eq!(r3.revoked_keys, vec![k1, k2, k4, k3]);
        assert_eq!(r3.approved_key, None);
        assert_eq!(r3.revoked_at, 20);
        // Revoking again changes nothing but the time; no record: only earlier keys.
        let r4 = revoke("n2", &[k4], Some(&r3), 30);
        assert_eq!(r4.revoked_keys, r3.revoked_keys);
        let ghost = revoke("ghost", &current_keys(None, None), None, 5);
        assert!(ghost.revoked_keys.is_empty() && ghost.check().is_ok());
        assert!(!ghost.admits(&k1));
        // An external peer's key is revoked like a node's.
        let laptop = ExternalPeer {
            schema: 1,
            name: "laptop".into(),
            public_key: k1,
            allowed_ips: vec!["10.99.0.1/32".parse().expect("cidr")],
            endpoint: None,
            created_at: 0,
            config_keys: Default::default(),
            config_printed_at: 0,
        };
        assert_eq!(current_keys(None, Some(&laptop)), vec![k1]);
    }

    #[test]
    fn successor_of_a_readmitted_key_is_approved_from_the_announcement() {
        let (k1, k2, k3, k4) = (key(), key(), key(), key());
        let r = readmit("n2", Some(&revoke("n2", &[k1], None, 1)), k2).expect("readmit");
        // Announced k3 while on the approved k2: k3 becomes the approved successor.
        let a = approve_successor(Some(&r), &rec(k2, Some(k3))).expect("approve");
        assert_eq!((a.approved_key, a.approved_next_key), (Some(k2), Some(k3)));
        assert!(a.admits(&k2) && a.admits(&k3) && a.check().is_ok());
        assert_eq!(
            approve_successor(Some(&a), &rec(k2, Some(k3))),
            None,
            "already"
        );
        // Rotation done: k3 is the approved key.
        let b = approve_successor(Some(&a), &rec(k3, None)).expect("settle");
        assert_eq!((b.approved_key, b.approved_next_key), (Some(k3), None));
        assert!(!b.admits(&k2) && b.admits(&k3));
        // Never for a record that is not admitted, a revoked next key, or no revocation.
        assert_eq!(approve_successor(Some(&r), &rec(k4, Some(k3))), None);
        assert_eq!(approve_successor(Some(&r), &rec(k2, Some(k1))), None);
        assert_eq!(approve_successor(None, &rec(k2, Some(k3))), None);
        // Revoking again revokes the successor too.
        let c = revoke("n2", &[k2, k3], Some(&a), 9);
        assert!(c.revoked_keys.contains(&k3) && c.approved_next_key.is_none());
    }

    #[tokio::test]
    async fn update_is_a_compare_and_swap() {
        let tmp = tempfile::tempdir().expect("tmp");
        let reg = weft_registry::open(&format!("dir:{}", tmp.path().display())).expect("open");
        let k1 = key();
        let written = update(&*reg, "n2", OnCorrupt::Fail, |e| {
            assert!(e.is_none());
            Ok(revoke("n2", &[k1], e, 1))
        })
        .await
        .expect("first");
        assert_eq!(written.revoked_keys, vec![k1]);
        // A concurrent writer between the read and the write makes the first attempt fail; the
        // retry sees its change.
        let mut attempts = 0;
        let k2 = key();
        let other = reg.clone();
        let r = update(&*reg, "n2", OnCorrupt::Fail, |e| {
            attempts += 1;
            if attempts == 1 {
                let o = other.clone();
                let n = Revocation {
                    revoked_keys: vec![k1, k2],
                    ..written.clone()
                };
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .expect("rt");
                    rt.block_on(o.put(Kind::Revocations, "n2", &n.to_json()))
                        .expect("put");
                })
                .join()
                .expect("join");
            }
            readmit("n2", e, key())
        })
        .await
        .expect("second");
        assert_eq!(attempts, 2);
        assert_eq!(r.revoked_keys, vec![k1, k2]);
        // Garbage: readmit stops, revoke replaces it.
        reg.put(Kind::Revocations, "n2", b"{garbage")
            .await
            .expect("put");
        let e = update(&*reg, "n2", OnCorrupt::Fail, |e| readmit("n2", e, key()))
            .await
            .expect_err("corrupt");
        assert!(format!("{e:#}").contains("cannot be read"), "{e:#}");
        let r = update(&*reg, "n2", OnCorrupt::Replace, |e| {
            Ok(revoke("n2", &[], e, 3))
        })
        .await
        .expect("replace");
        assert!(r.revoked_keys.is_empty());
    }
}
