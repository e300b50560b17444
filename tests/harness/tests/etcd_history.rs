//! End-to-end tests of meshd's etcd watch against etcd's history and against bad data under the
//! prefix: a real etcd runs in the switch namespace (198.18.0.1:2379, see `Cluster::start_etcd`),
//! two nodes run meshd on it, and the tests write records of nodes nobody runs (fresh keys, pod
//! ranges 10.42.100.0/24 and up, endpoints on the underlay router where nobody listens).
//! Need root, etcd (scripts/install-test-deps.sh) and the workspace binaries; run serially:
//!   cargo build --workspace --bins && cargo test -p weft-tests --test etcd_history -- --test-threads=1

use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use weft_core::record::SCHEMA_VERSION;
use weft_core::{NodeRecord, PrivateKey};
use weft_registry::Kind;
use weft_tests::cluster::UNDERLAY_ROUTER;
use weft_tests::{Cluster, Etcd, Node, PingOpts, Pod};

const READY: Duration = Duration::from_secs(20);
const PREFIX: &str = "/weft/nodes/";
/// The line the etcd backend logs when its watch ends and it lists again.
const RELIST: &str = "etcd watch ended; listing again";
const COMPACTED: &str = "history compacted up to revision ";

fn setup() {
    weft_tests::set_nettool(env!("CARGO_BIN_EXE_weft-nettool"));
}

/// Two nodes with one pod each, meshd on etcd on both, mesh ready.
fn etcd_mesh() -> (Cluster, Etcd, Vec<Pod>) {
    setup();
    let c = Cluster::with_nodes(2).expect("cluster");
    let etcd = c.start_etcd().expect("etcd");
    let pods: Vec<Pod> = (0..2).map(|i| c.node(i).add_pod(0).expect("pod")).collect();
    for i in 0..2 {
        c.node(i)
            .start_meshd(&["--registry", &etcd.spec()])
            .expect("start meshd");
    }
    c.wait_mesh_ready(READY).expect("mesh ready");
    (c, etcd, pods)
}

fn pods_ping(c: &Cluster, pods: &[Pod]) {
    for (a, b) in [(0, 1), (1, 0)] {
        let r = pods[a]
            .ping(pods[b].ip, &PingOpts::count(3).interval(0.05))
            .expect("ping");
        assert!(
            r.all_received(),
            "{} -> {}: {}/{}\n{}",
            pods[a].ip,
            pods[b].ip,
            r.received,
            r.transmitted,
            c.debug_report()
        );
    }
}

/// A valid record of a node nobody runs: a fresh key, pod range 10.42.RANGE.0/24, endpoint
/// 198.18.0.1:(30000 + RANGE), where nobody listens.
fn record(name: &str, range: u8) -> NodeRecord {
    let r = NodeRecord {
        schema: SCHEMA_VERSION,
        name: name.into(),
        public_key: PrivateKey::generate().public_key(),
        endpoints: vec![SocketAddr::new(
            UNDERLAY_ROUTER.into(),
            30_000 + u16::from(range),
        )],
        private_endpoints: Vec::new(),
        location: None,
        relay: false,
        pod_cidrs: vec![format!("10.42.{range}.0/24").parse().expect("cidr")],
        key_generation: 1,
        next_public_key: None,
        key_created_at: 0,
        psk_generation: None,
    };
    r.check().expect("valid record");
    r
}

fn key_of(name: &str) -> String {
    format!("{PREFIX}{name}")
}

/// How a peer looks in `meshd status`: public key, key generation, allowed IPs, endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PeerView {
    public_key: String,
    key_generation: u64,
    allowed_ips: Vec<String>,
    endpoint: Option<String>,
}

/// The peers a node should have given etcd's records right now: every record but its own.
/// Panics on a key or value under the prefix that is not a valid record.
fn etcd_peers(etcd: &Etcd, own: &str) -> BTreeMap<String, PeerView> {
    let mut out = BTreeMap::new();
    for (key, value) in etcd.get_prefix(PREFIX).expect("etcd get") {
        let name = key.strip_prefix(PREFIX).expect("prefix");
        let r = NodeRecord::from_json(&value)
            .unwrap_or_else(|e| panic!("etcd holds a bad record at {key}: {e}"));
        assert_eq!(r.name, name, "record name at {key}");
        if r.name == own {
            continue;
        }
        let mut allowed_ips: Vec<String> = r.pod_cidrs.iter().map(|c| c.to_string()).collect();
        allowed_ips.sort();
        out.insert(
            r.name,
            PeerView {
                public_key: r.public_key.to_base64(),
                key_generation: r.key_generation,
                allowed_ips,
                // One endpoint per record here, and it is where the peer is.
                endpoint: r.endpoints.first().map(|e| e.to_string()),
            },
        );
    }
    out
}

fn status_peers(st: &Value) -> BTreeMap<String, PeerView> {
    st["peers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let mut allowed_ips: Vec<String> = p["allowedIps"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect();
            allowed_ips.sort();
            (
                p["name"].as_str().unwrap_or_default().to_string(),
                PeerView {
                    public_key: p["publicKey"].as_str().unwrap_or_default().to_string(),
                    key_generation: p["keyGeneration"].as_u64().unwrap_or_default(),
                    allowed_ips,
                    endpoint: p["endpoint"].as_str().map(String::from),
                },
            )
        })
        .collect()
}

/// Waits until `n`'s peers are exactly etcd's records (names, keys, generations, allowed IPs,
/// endpoints) and it refuses none; panics with the difference otherwise.
fn assert_peers_are_etcd(c: &Cluster, n: &Node, etcd: &Etcd, timeout: Duration) {
    let mut last = (BTreeMap::new(), BTreeMap::new(), Value::Null);
    let ok = weft_tests::wait_until(timeout, || {
        let want = etcd_peers(etcd, &n.name);
        let Ok(st) = n.status_json() else {
            return false;
        };
        let have = status_peers(&st);
        let refused = st["refusedRecords"].clone();
        let ok = have == want && refused.as_object().is_some_and(|o| o.is_empty());
        last = (want, have, refused);
        ok
    });
    if !ok {
        let (want, have, refused) = last;
        let missing: Vec<_> = want.keys().filter(|k| !have.contains_key(*k)).collect();
        let extra: Vec<_> = have.keys().filter(|k| !want.contains_key(*k)).collect();
        let differ: Vec<_> = want
            .iter()
            .filter_map(|(k, w)| have.get(k).filter(|h| *h != w).map(|h| (k, w, h)))
            .collect();
        panic!(
            "{}'s peers are not etcd's records after {timeout:?}: missing {missing:?}, extra \
             {extra:?}, different (etcd, meshd) {differ:#?}, refused {refused}\n{}",
            n.name,
            c.debug_report()
        );
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on the pid of a child the harness started and still holds.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// The compaction revisions of the relists meshd logged because of a compaction.
fn compaction_relists(log: &str) -> Vec<i64> {
    log.lines()
        .filter(|l| l.contains(RELIST))
        .filter_map(|l| {
            let rest = &l[l.find(COMPACTED)? + COMPACTED.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// etcd compacts its history past the revision node-0's meshd watches from, while records are
/// put, updated (new keys, new ranges), deleted, re-created and put-then-deleted: meshd is
/// SIGSTOPped meanwhile, and more than the etcd server and the connection can buffer for it is
/// written (400 updates padded with an unknown 64 KiB field, which readers ignore), so its watch
/// falls behind, is cancelled by the compaction on SIGCONT, and meshd lists again. Then both
/// meshds' peers are exactly the records etcd holds (nothing missing, nothing extra, every key,
/// generation, range and endpoint current) and the pods still ping.
#[test]
fn compaction_past_the_watch_revision_resyncs_to_exactly_etcd() {
    let started = Instant::now();
    let (c, etcd, pods) = etcd_mesh();
    let n0 = c.node(0);
    let first: Vec<NodeRecord> = (0..10)
        .map(|i| record(&format!("hist-{i:02}"), 100 + i))
        .collect();
    let initial = first.clone();
    etcd.with_client(|reg| async move {
        for r in &initial {
            weft_registry::put_node(&*reg, r).await?;
        }
        Ok(())
    })
    .expect("initial records");
    for i in 0..2 {
        assert_peers_are_etcd(&c, c.node(i), &etcd, Duration::from_secs(10));
    }
    assert!(
        compaction_relists(&n0.meshd_log()).is_empty(),
        "a compaction relist before any compaction"
    );

    let pid = n0.meshd_pid().expect("meshd pid");
    signal(pid, libc::SIGSTOP);
    let stopped = Instant::now();
    let padded = first[9].clone();
    let changes = etcd.with_client(|reg| async move {
        let mut n = 0;
        // New keys for 0..5, and new ranges for 2..5.
        for i in 0..5u8 {
            let range = if i < 2 { 100 + i } else { 150 + i };
            let mut r = record(&format!("hist-{i:02}"), range);
            r.key_generation = 2;
            weft_registry::put_node(&*reg, &r).await?;
            n += 1;
        }
        // 5..8 deleted; 6 comes back with another key and range.
        for i in 5..8 {
            reg.delete(Kind::Nodes, &format!("hist-{i:02}")).await?;
            n += 1;
        }
        weft_registry::put_node(&*reg, &record("hist-06", 156)).await?;
        // Ten new ones, and one that comes and goes.
        for i in 10..20u8 {
            weft_registry::put_node(&*reg, &record(&format!("hist-{i:02}"), 100 + i)).await?;
            n += 1;
        }
        weft_registry::put_node(&*reg, &record("hist-20", 120)).await?;
        reg.delete(Kind::Nodes, "hist-20").await?;
        // Volume: hist-09 rewritten 400 times with an unknown 64 KiB field. The server keeps
        // at most 128 responses queued per watch stream plus the HTTP/2 window (2 MiB) in
        // flight for a client that does not read; past that the watcher falls behind. (Here 130
        // updates were too few to trigger it and 170 enough; 400 leaves a margin.)
        let mut v: Value = serde_json::from_slice(&padded.to_json())?;
        for k in 0..400 {
            v["padding"] = Value::String(format!("{k:04}{}", "x".repeat(64 * 1024)));
            reg.put(Kind::Nodes, &padded.name, v.to_string().as_bytes())
                .await?;
            n += 1;
        }
        Ok(n + 3)
    });
    let changes = match changes {
        Ok(n) => n,
        Err(e) => {
            signal(pid, libc::SIGCONT);
            panic!("changing records: {e:#}");
        }
    };
    let revision = etcd.revision().expect("revision");
    let compacted = etcd.compact(revision);
    signal(pid, libc::SIGCONT);
    compacted.expect("compact");
    eprintln!(
        "{changes} changes and a compaction to revision {revision} while meshd was stopped for \
         {:?}",
        stopped.elapsed()
    );

    // The compaction cancelled meshd's watch (etcd reports the compaction revision) and meshd
    // listed again.
    let relisted = weft_tests::wait_until(Duration::from_secs(15), || {
        compaction_relists(&n0.meshd_log()).contains(&revision)
    });
    assert!(
        relisted,
        "meshd did not log a relist after the compaction to {revision}; its log:\n{}",
        weft_tests::util::tail(&n0.meshd_log_path(), 40)
    );
    assert!(n0.meshd_running(), "meshd died");
    let want = etcd_peers(&etcd, &n0.name);
    for gone in ["hist-05", "hist-07", "hist-20"] {
        assert!(!want.contains_key(gone), "etcd still holds {gone}");
    }
    assert_eq!(want.len(), 1 + 18, "etcd holds {:?}", want.keys());
    for i in 0..2 {
        assert_peers_are_etcd(&c, c.node(i), &etcd, Duration::from_secs(10));
    }
    pods_ping(&c, &pods);
    eprintln!("test took {:?}", started.elapsed());
}

/// Which log line meshd must write for a bad key, and the key.
struct Bad {
    key: String,
    value: Vec<u8>,
    /// The message of the line naming the key.
    message: &'static str,
}

/// While meshd runs, etcd gets bad data under the prefix: a value that is not JSON, one that is
/// not UTF-8, a record whose name is not its key's, one with a bad field, keys that are not
/// `/weft/nodes/<name>` (`/weft/nodes/a/b`, an upper-case name), a value over 1 MiB, and a good
/// record overwritten with garbage. meshd keeps running, skips each with a log line naming the
/// key, keeps its good peers (the overwritten one at its last good version), refuses a valid
/// record that claims a peer's pod range, never reads `/weft/other/x`, still takes in a record
/// written afterwards, and the pods still ping.
#[test]
fn malformed_values_and_foreign_keys_are_skipped() {
    let started = Instant::now();
    let (c, etcd, pods) = etcd_mesh();
    let n0 = c.node(0);
    let good: Vec<NodeRecord> = (0..3)
        .map(|i| record(&format!("good-{i}"), 100 + i))
        .collect();
    for r in &good {
        etcd.put(&key_of(&r.name), &r.to_json()).expect("put");
    }
    assert_peers_are_etcd(&c, n0, &etcd, Duration::from_secs(10));
    let before = status_peers(&n0.status_json().expect("status"));

    let json = |r: &NodeRecord| -> Value { serde_json::from_slice(&r.to_json()).expect("json") };
    // Stored at bad-name, but names someone-else.
    let mismatch = json(&record("someone-else", 110));
    let mut bad_field = json(&record("bad-field", 111));
    bad_field["podCidrs"] = serde_json::json!(["10.42.111.7/24"]);
    let mut oversized = json(&record("bad-big", 112));
    oversized["padding"] = Value::String("x".repeat(weft_registry::MAX_OBJECT_BYTES));
    let bads = [
        Bad {
            key: key_of("bad-json"),
            value: b"{\"schema\": 1, \"name\": \"bad-json\", this is not json".to_vec(),
            message: "skipping invalid registry object",
        },
        Bad {
            key: key_of("bad-bytes"),
            value: vec![0xff, 0xfe, 0x00, 0x7b],
            message: "skipping invalid registry object",
        },
        Bad {
            key: key_of("bad-name"),
            value: mismatch.to_string().into_bytes(),
            message: "skipping invalid registry object",
        },
        Bad {
            key: key_of("bad-field"),
            value: bad_field.to_string().into_bytes(),
            message: "skipping invalid registry object",
        },
        Bad {
            key: key_of("a/b"),
            value: json(&record("b", 113)).to_string().into_bytes(),
            message: "ignoring etcd key",
        },
        Bad {
            key: key_of("Upper-Case"),
            value: json(&record("upper-case", 114)).to_string().into_bytes(),
            message: "ignoring etcd key",
        },
        Bad {
            key: key_of("bad-big"),
            value: oversized.to_string().into_bytes(),
            message: "ignoring etcd key",
        },
        // A good record overwritten with garbage: skipped, the last good version stays.
        Bad {
            key: key_of("good-2"),
            value: b"garbage".to_vec(),
            message: "skipping invalid registry object",
        },
    ];
    assert!(bads[6].value.len() > weft_registry::MAX_OBJECT_BYTES);
    for b in &bads {
        etcd.put(&b.key, &b.value)
            .unwrap_or_else(|e| panic!("put {}: {e:#}", b.key));
    }
    // Valid, but claims node-1's pod range: refused (node-1 comes first by name), never routed.
    let mut thief = record("thief", 115);
    thief.pod_cidrs = vec![c.node(1).pod_cidr.parse().expect("cidr")];
    etcd.put(&key_of("thief"), &thief.to_json()).expect("put");
    // Outside the collection: never read.
    etcd.put("/weft/other/x", &record("x", 116).to_json())
        .expect("put");
    // Written after all of that, so once it is a peer, meshd has seen everything before it.
    let late = record("good-late", 117);
    etcd.put(&key_of(&late.name), &late.to_json()).expect("put");

    let st = n0
        .wait_status(Duration::from_secs(10), |st| {
            status_peers(st).contains_key("good-late")
        })
        .expect("a record written after the bad ones is taken in");
    assert!(n0.meshd_running(), "meshd died");
    let log = n0.meshd_log();
    for b in &bads {
        let line = log
            .lines()
            .find(|l| l.contains(&b.key) && l.contains(b.message));
        assert!(
            line.is_some(),
            "no `{}` line naming {} in meshd's log:\n{}",
            b.message,
            b.key,
            weft_tests::util::tail(&n0.meshd_log_path(), 40)
        );
    }
    assert!(
        !log.contains("/weft/other/"),
        "meshd read a key outside /weft/nodes/"
    );
    assert!(
        st["refusedRecords"]["thief"]
            .as_str()
            .is_some_and(|r| r.contains("overlaps")),
        "thief not refused: {}",
        st["refusedRecords"]
    );

    // Exactly the good peers, the overwritten one at its last good version.
    let have = status_peers(&st);
    let mut want = before.clone();
    want.insert(
        late.name.clone(),
        PeerView {
            public_key: late.public_key.to_base64(),
            key_generation: 1,
            allowed_ips: vec!["10.42.117.0/24".into()],
            endpoint: Some(late.endpoints[0].to_string()),
        },
    );
    assert_eq!(have, want, "meshd's peers after the bad data");
    assert_eq!(
        have["good-2"], before["good-2"],
        "good-2 not kept at its last good version"
    );
    // The routes of the peers are in place, nothing for the skipped or refused ones.
    let routes = n0
        .ip(&["-4", "route", "show", "dev", "weft0"])
        .expect("routes");
    for r in ["10.42.100.0/24", "10.42.102.0/24", "10.42.117.0/24"] {
        assert!(routes.contains(r), "no route to {r}:\n{routes}");
    }
    for r in [
        "10.42.111.",
        "10.42.112.",
        "10.42.113.",
        "10.42.114.",
        "10.42.116.",
    ] {
        assert!(
            !routes.contains(r),
            "a route for a bad record {r}:\n{routes}"
        );
    }
    pods_ping(&c, &pods);
    assert!(n0.meshd_running(), "meshd died");
    eprintln!("test took {:?}", started.elapsed());
}
