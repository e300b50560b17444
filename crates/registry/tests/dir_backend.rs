//! The `dir:` backend end to end: CRUD, watches (inotify and rescan fallback), invalid objects,
//! atomic writes, several writers on one directory, and the directory vanishing.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::timeout;
use weft_core::keys::PrivateKey;
use weft_core::record::SCHEMA_VERSION;
use weft_core::NodeRecord;
use weft_registry::{
    delete_node, get_node, list_nodes, put_node, watch_nodes, Connectivity, DirOptions,
    DirRegistry, Event, Kind, RawEvent, Registry, RegistryError, TypedWatch,
};

const WITHIN: Duration = Duration::from_secs(1);

fn record(name: &str, n: u8) -> NodeRecord {
    NodeRecord {
        schema: SCHEMA_VERSION,
        name: name.into(),
        public_key: PrivateKey::generate().public_key(),
        endpoints: vec![format!("192.0.2.{n}:51820").parse().expect("endpoint")],
        private_endpoints: Vec::new(),
        location: None,
        relay: false,
        pod_cidrs: vec![format!("10.42.{n}.0/24").parse().expect("cidr")],
        key_generation: 1,
        next_public_key: None,
        key_created_at: 0,
        psk_generation: None,
    }
}

fn json_with(rec: &NodeRecord, key: &str, value: serde_json::Value) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&rec.to_json()).expect("json");
    v[key] = value;
    v.to_string().into_bytes()
}

fn open(root: &Path) -> Arc<dyn Registry> {
    Arc::new(DirRegistry::open(root).expect("open"))
}

/// A registry whose watches cannot rely on inotify: only the periodic rescan finds changes.
fn open_rescan_only(root: &Path) -> Arc<dyn Registry> {
    let opts = DirOptions {
        rescan_interval: Duration::from_millis(200),
        inotify: false,
        ..DirOptions::default()
    };
    Arc::new(DirRegistry::open_with(root, opts).expect("open"))
}

async fn next<T: weft_registry::Object>(w: &mut TypedWatch<T>) -> Event<T> {
    timeout(WITHIN, w.next())
        .await
        .expect("no event within 1 s")
        .expect("watch ended")
}

fn names(items: &[NodeRecord]) -> Vec<&str> {
    items.iter().map(|r| r.name.as_str()).collect()
}

#[tokio::test]
async fn put_get_delete_list() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let reg = open(tmp.path());
    let a = record("node-a", 1);
    let b = record("node-b", 2);
    let r1 = put_node(&*reg, &a).await.expect("put a");
    let r2 = put_node(&*reg, &b).await.expect("put b");
    assert!(r2 > r1);
    assert!(tmp.path().join("nodes/node-a.json").is_file());
    assert_eq!(
        get_node(&*reg, "node-a").await.expect("get"),
        Some(a.clone())
    );
    assert_eq!(get_node(&*reg, "node-z").await.expect("get"), None);

    let (all, _) = list_nodes(&*reg).await.expect("list");
    assert_eq!(all, vec![a.clone(), b.clone()]);
    let (raw, _) = reg.list(Kind::Nodes).await.expect("raw list");
    assert_eq!(raw.len(), 2);
    assert_eq!(raw[0].0, "node-a");

    let mut a2 = a.clone();
    a2.key_generation = 2;
    put_node(&*reg, &a2).await.expect("replace");
    assert_eq!(get_node(&*reg, "node-a").await.expect("get"), Some(a2));

    assert!(delete_node(&*reg, "node-a").await.expect("delete"));
    assert!(!delete_node(&*reg, "node-a").await.expect("delete again"));
    assert_eq!(get_node(&*reg, "node-a").await.expect("get"), None);
    let (all, _) = list_nodes(&*reg).await.expect("list");
    assert_eq!(names(&all), ["node-b"]);
    // No temp files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path().join("nodes"))
        .expect("readdir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
}

#[tokio::test]
async fn names_are_checked_and_invalid_records_not_stored() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let reg = open(&tmp.path().join("reg"));
    for bad in ["../escape", "a/b", "", ".hidden", "Upper", "x..y"] {
        assert!(
            matches!(
                reg.put(Kind::Nodes, bad, b"{}").await,
                Err(RegistryError::InvalidName { .. })
            ),
            "{bad:?} accepted"
        );
        assert!(reg.get(Kind::Nodes, bad).await.is_err());
        assert!(reg.delete(Kind::Nodes, bad).await.is_err());
    }
    assert!(!tmp.path().join("escape.json").exists());

    let mut r = record("node-a", 1);
    r.endpoints = vec!["0.0.0.0:51820".parse().expect("ep")];
    let e = put_node(&*reg, &r)
        .await
        .expect_err("invalid record stored");
    assert!(e.to_string().contains("endpoints"), "{e}");
    let mut r = record("node-a", 1);
    r.location = Some("not a label".into());
    let e = put_node(&*reg, &r)
        .await
        .expect_err("invalid record stored");
    assert!(e.to_string().contains("location"), "{e}");

    // A stored record that does not decode is an error for get (a watch would skip it).
    reg.put(Kind::Nodes, "node-b", b"{garbage")
        .await
        .expect("raw put");
    let e = get_node(&*reg, "node-b")
        .await
        .expect_err("garbage decoded");
    assert!(e.to_string().contains("node-b.json"), "{e}");
    let other = record("node-c", 3);
    reg.put(Kind::Nodes, "node-b", &other.to_json())
        .await
        .expect("raw put");
    assert!(matches!(
        get_node(&*reg, "node-b").await,
        Err(RegistryError::NameMismatch { .. })
    ));
}

#[tokio::test]
async fn watch_sees_upsert_and_delete_within_one_second() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let watcher_side = open(tmp.path());
    // Written through another instance, as another meshd process on the machine would.
    let writer = open(tmp.path());
    let a = record("node-a", 1);
    put_node(&*writer, &a).await.expect("put");

    let mut w = watch_nodes(&watcher_side, None).await.expect("watch");
    match next(&mut w).await {
        Event::Reset { items, .. } => assert_eq!(items, vec![a.clone()]),
        other => panic!("expected the initial reset, got {other:?}"),
    }

    let b = record("node-b", 2);
    put_node(&*writer, &b).await.expect("put");
    match next(&mut w).await {
        Event::Upsert { item, .. } => assert_eq!(item, b),
        other => panic!("expected upsert of node-b, got {other:?}"),
    }

    // Rewriting the same content produces nothing; a change produces one upsert.
    put_node(&*writer, &b).await.expect("put same");
    let mut b2 = b.clone();
    b2.key_generation = 7;
    put_node(&*writer, &b2).await.expect("put changed");
    match next(&mut w).await {
        Event::Upsert { item, .. } => assert_eq!(item, b2),
        other => panic!("expected upsert of node-b gen 7, got {other:?}"),
    }

    delete_node(&*writer, "node-a").await.expect("delete");
    match next(&mut w).await {
        Event::Delete { name, .. } => assert_eq!(name, "node-a"),
        other => panic!("expected delete of node-a, got {other:?}"),
    }
    // Nothing else is pending (no duplicates from the periodic rescan either).
    assert!(timeout(Duration::from_millis(2500), w.next())
        .await
        .is_err());
}

#[tokio::test]
async fn rescan_fallback_finds_changes_without_inotify() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let reg = open_rescan_only(tmp.path());
    let mut w = watch_nodes(&reg, None).await.expect("watch");
    assert!(matches!(next(&mut w).await, Event::Reset { items, .. } if items.is_empty()));

    // Written behind the registry's back, as if the inotify event were lost.
    let a = record("node-a", 1);
    std::fs::write(tmp.path().join("nodes/node-a.json"), a.to_json()).expect("write");
    match next(&mut w).await {
        Event::Upsert { item, .. } => assert_eq!(item, a),
        other => panic!("expected upsert, got {other:?}"),
    }
    std::fs::remove_file(tmp.path().join("nodes/node-a.json")).expect("rm");
    assert!(matches!(next(&mut w).await, Event::Delete { name, .. } if name == "node-a"));
    assert!(timeout(Duration::from_millis(700), w.next()).await.is_err());
}

#[tokio::test]
async fn invalid_objects_are_skipped_and_the_rest_delivered() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let reg = open(tmp.path());
    let good = record("good", 1);
    put_node(&*reg, &good).await.expect("put");
    let base = record("short-key", 2);
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"{\"schema\": 1, \"name\": ".to_vec()),
        ("short-key", json_with(&base, "publicKey", "AAAA".into())),
        (
            "low-order",
            json_with(
                &record("low-order", 3),
                "publicKey",
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
            ),
        ),
        ("mismatch", record("someone-else", 4).to_json()),
    ];
    for (name, bytes) in &bad {
        reg.put(Kind::Nodes, name, bytes).await.expect("raw put");
    }

    let (listed, _) = list_nodes(&*reg).await.expect("list");
    assert_eq!(names(&listed), ["good"]);

    let mut w = watch_nodes(&reg, None).await.expect("watch");
    match next(&mut w).await {
        Event::Reset { items, .. } => assert_eq!(items, vec![good.clone()]),
        other => panic!("expected reset, got {other:?}"),
    }

    // The same kinds of bad objects arriving as changes are skipped too; the watch continues.
    for (name, bytes) in &bad {
        let name = format!("{name}-2");
        reg.put(Kind::Nodes, &name, bytes).await.expect("raw put");
    }
    let later = record("later", 5);
    put_node(&*reg, &later).await.expect("put");
    match next(&mut w).await {
        Event::Upsert { item, .. } => assert_eq!(item, later),
        other => panic!("expected upsert of `later`, got {other:?}"),
    }

    // A valid record overwritten with garbage keeps its last valid version: no delete, no event.
    reg.put(Kind::Nodes, "good", b"not json at all")
        .await
        .expect("raw put");
    let last = record("last", 6);
    put_node(&*reg, &last).await.expect("put");
    match next(&mut w).await {
        Event::Upsert { item, .. } => assert_eq!(item, last),
        other => panic!("expected upsert of `last`, got {other:?}"),
    }
    // Deleting a never-valid object tells the consumer nothing; deleting `good` is a delete.
    reg.delete(Kind::Nodes, "garbage").await.expect("delete");
    reg.delete(Kind::Nodes, "good").await.expect("delete");
    match next(&mut w).await {
        Event::Delete { name, .. } => assert_eq!(name, "good"),
        other => panic!("expected delete of `good`, got {other:?}"),
    }
}

/// A `tracing` writer that appends to a shared buffer.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

// current_thread: the typed layer decodes (and logs) on the test's own thread.
#[tokio::test(flavor = "current_thread")]
async fn skipped_object_is_logged_once_with_file_and_field() {
    let capture = Capture::default();
    let sink = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let tmp = tempfile::tempdir().expect("tempdir");
    let reg = open_rescan_only(tmp.path());
    let mut w = watch_nodes(&reg, None).await.expect("watch");
    assert!(matches!(next(&mut w).await, Event::Reset { .. }));
    let bad = json_with(&record("bad-key", 1), "publicKey", "AAAA".into());
    reg.put(Kind::Nodes, "bad-key", &bad)
        .await
        .expect("raw put");
    // Let several rescans pass, then deliver something valid to drive the watch.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let ok = record("ok", 2);
    put_node(&*reg, &ok).await.expect("put");
    assert!(matches!(next(&mut w).await, Event::Upsert { item, .. } if item == ok));

    let logs = capture.text();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("skipping invalid registry object"))
        .collect();
    assert_eq!(lines.len(), 1, "logged once per content change:\n{logs}");
    assert!(lines[0].contains("nodes/bad-key.json"), "{}", lines[0]);
    assert!(lines[0].contains("publicKey"), "{}", lines[0]);
}

#[tokio::test]
async fn atomic_writes_never_show_a_half_written_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let reg = open(tmp.path());
    let mut w = reg.watch(Kind::Nodes, None).await.expect("watch");
    assert!(matches!(
        timeout(WITHIN, w.next()).await,
        Ok(Some(RawEvent::Reset { .. }))
    ));

    // Large values so a non-atomic write would very likely be observed half done.
    const VERSIONS: usize = 60;
    let writer = reg.clone();
    let writes = tokio::spawn(async move {
        for i in 0..VERSIONS {
            let value = serde_json::json!({ "version": i, "pad": "x".repeat(200_000 + i) });
            writer
                .put(Kind::Nodes, "big", value.to_string().as_bytes())
                .await
                .expect("put");
        }
    });
    let mut seen = 0;
    loop {
        let ev = timeout(Duration::from_secs(5), w.next())
            .await
            .expect("watch stalled")
            .expect("watch ended");
        let RawEvent::Upsert { value, .. } = ev else {
            panic!("unexpected event {ev:?}");
        };
        let v: serde_json::Value = serde_json::from_slice(&value).expect("half-written file seen");
        let version = v["version"].as_u64().expect("version") as usize;
        assert_eq!(v["pad"].as_str().map(str::len), Some(200_000 + version));
        seen += 1;
        if version == VERSIONS - 1 {
            break;
        }
    }
    writes.await.expect("writer");
    assert!(seen >= 1);
}

#[tokio::test]
async fn two_writers_share_one_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let watcher_side = open(tmp.path());
    let mut w = watch_nodes(&watcher_side, None).await.expect("watch");
    assert!(matches!(next(&mut w).await, Event::Reset { items, .. } if items.is_empty()));

    let mut tasks = Vec::new();
    for writer_id in 0..2u8 {
        let reg = open(tmp.path());
        tasks.push(tokio::spawn(async move {
            let mut shared_versions = Vec::new();
            for i in 0..20u8 {
                let own = record(&format!("w{writer_id}-n{i}"), writer_id * 50 + i + 1);
                put_node(&*reg, &own).await.expect("put own");
                let mut shared = record("shared", 200 + writer_id);
                shared.key_generation = u64::from(i);
                put_node(&*reg, &shared).await.expect("put shared");
                shared_versions.push(shared);
            }
            shared_versions
        }));
    }
    let mut written = Vec::new();
    for t in tasks {
        written.extend(t.await.expect("writer"));
    }

    let mut known = std::collections::BTreeMap::new();
    while known.len() < 41 {
        match timeout(Duration::from_secs(3), w.next())
            .await
            .expect("watch stalled")
            .expect("watch ended")
        {
            Event::Upsert { item, .. } => {
                known.insert(item.name.clone(), item);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let (listed, _) = list_nodes(&*watcher_side).await.expect("list");
    assert_eq!(listed.len(), 41);
    let shared = get_node(&*watcher_side, "shared")
        .await
        .expect("get")
        .expect("shared exists");
    assert!(written.contains(&shared), "shared is one complete version");
    // Once quiet, the watcher has converged on what is on disk.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(Some(ev)) = timeout(Duration::from_millis(100), w.next()).await {
        if let Event::Upsert { item, .. } = ev {
            known.insert(item.name.clone(), item);
        }
    }
    assert_eq!(known.into_values().collect::<Vec<_>>(), listed);
}

#[tokio::test]
async fn vanished_directory_is_unreachable_not_deleted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("reg");
    let reg = open(&root);
    put_node(&*reg, &record("node-a", 1)).await.expect("put");
    let mut w = watch_nodes(&reg, None).await.expect("watch");
    assert!(matches!(next(&mut w).await, Event::Reset { items, .. } if items.len() == 1));

    std::fs::remove_dir_all(&root).expect("rm -r");
    // inotify notices at once; allow for the 2 s rescan if it does not.
    let ev = timeout(Duration::from_secs(3), w.next())
        .await
        .expect("no status")
        .expect("watch ended");
    assert!(
        matches!(ev, Event::Status(Connectivity::Unreachable(ref why)) if why.contains("does not exist")),
        "{ev:?}"
    );

    // A writer recreates the directory; the watch resyncs with a reset.
    let b = record("node-b", 2);
    put_node(&*reg, &b)
        .await
        .expect("put recreates the directory");
    let ev = timeout(Duration::from_secs(3), w.next())
        .await
        .expect("no status")
        .expect("watch ended");
    assert_eq!(ev, Event::Status(Connectivity::Connected));
    match next(&mut w).await {
        Event::Reset { items, .. } => assert_eq!(items, vec![b.clone()]),
        other => panic!("expected reset, got {other:?}"),
    }
    // inotify was re-armed on the new directory when the rescan found it: changes are prompt.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c = record("node-c", 3);
    put_node(&*reg, &c).await.expect("put");
    assert!(matches!(next(&mut w).await, Event::Upsert { item, .. } if item == c));
}
