//! Reconcile: desired peers (from registry records) against applied peers, as commands.
//!
//! Changing one peer's key, endpoints or CIDRs yields one `Update` for that peer alone, so no
//! other peer is disturbed.

use crate::peer::PeerConfig;
use crate::record::{validate_against, NodeRecord, RecordError};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Add(PeerConfig),
    Update(PeerConfig),
    Remove(String),
}

/// The peer a record describes.
pub fn peer_config(r: &NodeRecord) -> PeerConfig {
    PeerConfig {
        name: r.name.clone(),
        public_key: r.public_key,
        next_public_key: r.next_public_key,
        endpoints: r.endpoints.clone(),
        allowed_ips: r.pod_cidrs.clone(),
        key_generation: r.key_generation,
    }
}

/// Picks the records this node will peer with: never its own name, never a record that
/// conflicts with this node's own record or with one accepted before it (records taken in
/// name order, so every node reaches the same verdict about two foreign records).
/// Returns the peers and the refused records with their reason.
pub fn desired_peers(
    own: &NodeRecord,
    records: impl IntoIterator<Item = NodeRecord>,
) -> (Vec<PeerConfig>, Vec<(String, RecordError)>) {
    let mut records: Vec<NodeRecord> = records.into_iter().filter(|r| r.name != own.name).collect();
    records.sort_by(|a, b| a.name.cmp(&b.name));
    let mut accepted: Vec<NodeRecord> = vec![own.clone()];
    let mut refused = Vec::new();
    for r in records {
        if r.public_key == own.public_key {
            refused.push((
                r.name.clone(),
                RecordError::Field {
                    field: "publicKey",
                    reason: format!("same key as this node ({})", own.name),
                },
            ));
            continue;
        }
        if let Some(dup) = accepted.iter().find(|a| a.public_key == r.public_key) {
            refused.push((
                r.name.clone(),
                RecordError::Field {
                    field: "publicKey",
                    reason: format!("same key as node {}", dup.name),
                },
            ));
            continue;
        }
        match validate_against(&r, &accepted) {
            Ok(()) => accepted.push(r),
            Err(e) => refused.push((r.name.clone(), e)),
        }
    }
    let peers = accepted.iter().skip(1).map(peer_config).collect();
    (peers, refused)
}

/// Commands that turn `applied` into `desired`. Removes come first, so a key or range that
/// moves from one peer to another is free before it is claimed.
pub fn plan<'a>(
    desired: &[PeerConfig],
    applied: impl IntoIterator<Item = &'a PeerConfig>,
) -> Vec<Command> {
    let applied: BTreeMap<&str, &PeerConfig> =
        applied.into_iter().map(|p| (p.name.as_str(), p)).collect();
    let want: BTreeMap<&str, &PeerConfig> = desired.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut cmds = Vec::new();
    for name in applied.keys() {
        if !want.contains_key(name) {
            cmds.push(Command::Remove((*name).to_string()));
        }
    }
    // A peer whose key now belongs to a different applied peer must go first too.
    for (name, cfg) in &want {
        match applied.get(name) {
            None => cmds.push(Command::Add((*cfg).clone())),
            Some(cur) if *cur != *cfg => cmds.push(Command::Update((*cfg).clone())),
            Some(_) => {}
        }
    }
    cmds
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;
    use crate::record::SCHEMA_VERSION;

    fn rec(name: &str, i: u8) -> NodeRecord {
        NodeRecord {
            schema: SCHEMA_VERSION,
            name: name.into(),
            public_key: PrivateKey::generate().public_key(),
            endpoints: vec![format!("198.18.0.{}:51820", 10 + i).parse().expect("ep")],
            pod_cidrs: vec![format!("10.42.{i}.0/24").parse().expect("cidr")],
            key_generation: 1,
            next_public_key: None,
            key_created_at: 0,
        }
    }

    #[test]
    fn add_update_remove_touch_only_changed_peers() {
        let own = rec("a", 1);
        let b = rec("b", 2);
        let c = rec("c", 3);
        let (peers, refused) = desired_peers(&own, vec![own.clone(), b.clone(), c.clone()]);
        assert!(refused.is_empty());
        let cmds = plan(&peers, []);
        assert_eq!(cmds.len(), 2);
        assert!(cmds.iter().all(|c| matches!(c, Command::Add(_))));

        // Change only b's key: one Update for b, nothing for c.
        let mut b2 = b.clone();
        b2.public_key = PrivateKey::generate().public_key();
        let (peers2, _) = desired_peers(&own, vec![b2.clone(), c.clone()]);
        let cmds = plan(&peers2, &peers);
        assert_eq!(cmds, vec![Command::Update(peer_config(&b2))]);

        // c disappears: one Remove.
        let (peers3, _) = desired_peers(&own, vec![b2.clone()]);
        assert_eq!(plan(&peers3, &peers2), vec![Command::Remove("c".into())]);
        assert!(plan(&peers3, &peers3).is_empty());
    }

    #[test]
    fn conflicting_records_refused() {
        let own = rec("a", 1);
        let mut thief = rec("b", 2);
        thief.pod_cidrs = own.pod_cidrs.clone();
        let mut dup_key = rec("c", 3);
        dup_key.public_key = own.public_key;
        let good = rec("d", 4);
        let (peers, refused) = desired_peers(&own, vec![thief, dup_key, good.clone()]);
        assert_eq!(peers, vec![peer_config(&good)]);
        let names: Vec<&str> = refused.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["b", "c"]);
    }
}
