//! The `etcd://` backend against a real etcd (Debian's `etcd`, installed by
//! scripts/install-test-deps.sh), started per test on 127.0.0.1 with free ports and a temp data
//! dir: CRUD, watches, foreign keys and malformed values, lease expiry and loss, compaction past
//! the watch revision, and etcd going away and coming back.

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::time::timeout;
use weft_core::keys::PrivateKey;
use weft_core::record::SCHEMA_VERSION;
use weft_core::NodeRecord;
use weft_registry::{
    get_node, list_nodes, put_node, put_own_node, watch_nodes, Connectivity, EtcdOptions, Event,
    Kind, OpenOptions, RawEvent, Registry, RegistryError, TypedWatch,
};

/// A throwaway single-member etcd. Killed on drop.
struct Etcd {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl Etcd {
    async fn start() -> Etcd {
        let mut e = Etcd {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        e.spawn().await;
        e
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    async fn spawn(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("log");
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting etcd (install etcd-server: scripts/install-test-deps.sh)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(mut c) = etcd_client::Client::connect([client.as_str()], None).await {
                if timeout(Duration::from_secs(1), c.status())
                    .await
                    .is_ok_and(|r| r.is_ok())
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not start:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn spec(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    async fn raw(&self) -> etcd_client::Client {
        etcd_client::Client::connect([format!("http://127.0.0.1:{}", self.client_port)], None)
            .await
            .expect("raw client")
    }

    fn open(&self, opts: EtcdOptions) -> Arc<dyn Registry> {
        weft_registry::open_with(
            &self.spec(),
            &OpenOptions {
                etcd: opts,
                ..Default::default()
            },
        )
        .expect("open etcd")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

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

fn short_ttl() -> EtcdOptions {
    EtcdOptions {
        lease_ttl: Duration::from_secs(3),
        ..EtcdOptions::default()
    }
}

async fn next<T: weft_registry::Object>(w: &mut TypedWatch<T>, within: Duration) -> Event<T> {
    timeout(within, w.next())
        .await
        .expect("no event in time")
        .expect("watch ended")
}

fn names(items: &[NodeRecord]) -> Vec<&str> {
    items.iter().map(|r| r.name.as_str()).collect()
}

const SEC: Duration = Duration::from_secs(1);

#[tokio::test]
async fn put_get_delete_list_and_watch() {
    let etcd = Etcd::start().await;
    let reg = etcd.open(EtcdOptions::default());
    assert!(reg.describe().starts_with("etcd://127.0.0.1:"));
    assert_eq!(reg.location(Kind::Nodes, "a"), "/weft/nodes/a");
    let a = record("node-a", 1);
    let b = record("node-b", 2);
    let r1 = put_node(&*reg, &a).await.expect("put a");
    let r2 = put_node(&*reg, &b).await.expect("put b");
    assert!(r2 > r1);
    assert_eq!(
        get_node(&*reg, "node-a").await.expect("get"),
        Some(a.clone())
    );
    assert_eq!(get_node(&*reg, "node-z").await.expect("get"), None);
    let (all, _) = list_nodes(&*reg).await.expect("list");
    assert_eq!(all, vec![a.clone(), b.clone()]);
    let mut raw = etcd.raw().await;
    let got = raw.get("/weft/nodes/node-a", None).await.expect("raw get");
    assert_eq!(got.kvs()[0].value(), a.to_json().as_slice());

    let mut w = watch_nodes(&reg, None).await.expect("watch");
    match next(&mut w, 5 * SEC).await {
        Event::Reset { items, .. } => assert_eq!(names(&items), ["node-a", "node-b"]),
        other => panic!("expected reset, got {other:?}"),
    }
    let c = record("node-c", 3);
    put_node(&*reg, &c).await.expect("put c");
    match next(&mut w, SEC).await {
        Event::Upsert { item, .. } => assert_eq!(item, c),
        other => panic!("expected upsert, got {other:?}"),
    }
    assert!(reg.delete(Kind::Nodes, "node-a").await.expect("delete"));
    assert!(!reg
        .delete(Kind::Nodes, "node-a")
        .await
        .expect("delete again"));
    match next(&mut w, SEC).await {
        Event::Delete { name, .. } => assert_eq!(name, "node-a"),
        other => panic!("expected delete, got {other:?}"),
    }
    // Bad names are refused before reaching etcd.
    assert!(matches!(
        reg.put(Kind::Nodes, "a/b", b"x").await,
        Err(RegistryError::InvalidName { .. })
    ));
}

#[tokio::test]
async fn foreign_keys_and_malformed_values_are_skipped() {
    let etcd = Etcd::start().await;
    let reg = etcd.open(EtcdOptions::default());
    let mut raw = etcd.raw().await;
    for (k, v) in [
        ("/weft/other/x", "x"),
        ("/weft/nodes/a/b", "nested"),
        ("/weft/nodes/Upper", "caps"),
        ("/weft/nodesx", "no slash"),
        ("/weft/nodes/", "empty name"),
        ("/weftnodes/y", "outside"),
    ] {
        raw.put(k, v, None).await.expect("raw put");
    }
    raw.put("/weft/nodes/junk", "{not json", None)
        .await
        .expect("raw put");
    let a = record("node-a", 1);
    put_node(&*reg, &a).await.expect("put a");
    let (items, _) = reg.list(Kind::Nodes).await.expect("list");
    let listed: Vec<&str> = items.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(listed, ["junk", "node-a"], "foreign keys never listed");
    let (valid, _) = list_nodes(&*reg).await.expect("typed list");
    assert_eq!(valid, vec![a.clone()]);

    let mut w = watch_nodes(&reg, None).await.expect("watch");
    match next(&mut w, 5 * SEC).await {
        Event::Reset { items, .. } => assert_eq!(items, vec![a.clone()]),
        other => panic!("expected reset, got {other:?}"),
    }
    // Foreign keys and garbage written during the watch are skipped too; the next good change
    // is the next event.
    raw.put("/weft/nodes/x/y", "nested", None)
        .await
        .expect("put");
    raw.put("/weft/nodes/junk2", "\u{0}\u{1}", None)
        .await
        .expect("put");
    raw.delete("/weft/nodes/a/b", None).await.expect("delete");
    let b = record("node-b", 2);
    put_node(&*reg, &b).await.expect("put b");
    match next(&mut w, SEC).await {
        Event::Upsert { item, .. } => assert_eq!(item, b),
        other => panic!("expected upsert of node-b, got {other:?}"),
    }
}

#[tokio::test]
async fn owned_record_lives_with_its_keepalive() {
    let etcd = Etcd::start().await;
    let watcher = etcd.open(EtcdOptions::default());
    let owner = etcd.open(short_ttl());
    let a = record("node-a", 1);
    put_own_node(&*owner, &a).await.expect("put own");
    let mut raw = etcd.raw().await;
    let got = raw.get("/weft/nodes/node-a", None).await.expect("get");
    let lease = got.kvs()[0].lease();
    assert_ne!(lease, 0, "an owned record is bound to a lease");

    let mut w = watch_nodes(&watcher, None).await.expect("watch");
    match next(&mut w, 5 * SEC).await {
        Event::Reset { items, .. } => assert_eq!(items, vec![a.clone()]),
        other => panic!("expected reset, got {other:?}"),
    }
    // Kept alive well past the 3 s TTL.
    assert!(
        timeout(5 * SEC, w.next()).await.is_err(),
        "no event while the owner keeps its lease alive"
    );

    // The lease is revoked behind the owner's back (as if it expired during an outage): the
    // owner notices, takes a new lease and writes its record again.
    raw.lease_revoke(lease).await.expect("revoke");
    match next(&mut w, SEC).await {
        Event::Delete { name, .. } => assert_eq!(name, "node-a"),
        other => panic!("expected delete, got {other:?}"),
    }
    match next(&mut w, 5 * SEC).await {
        Event::Upsert { item, .. } => assert_eq!(item, a),
        other => panic!("expected re-publish, got {other:?}"),
    }
    let got = raw.get("/weft/nodes/node-a", None).await.expect("get");
    assert_ne!(got.kvs()[0].lease(), lease, "bound to a new lease");

    // The owner goes away without deleting: the record expires after the TTL.
    let gone = Instant::now();
    drop(owner);
    match next(&mut w, 8 * SEC).await {
        Event::Delete { name, .. } => assert_eq!(name, "node-a"),
        other => panic!("expected expiry, got {other:?}"),
    }
    assert!(
        gone.elapsed() >= Duration::from_millis(1000),
        "expired too early"
    );

    // delete() of an owned record is immediate and stays deleted.
    let owner = etcd.open(short_ttl());
    put_own_node(&*owner, &a).await.expect("put own");
    assert!(matches!(next(&mut w, SEC).await, Event::Upsert { .. }));
    assert!(owner.delete(Kind::Nodes, "node-a").await.expect("delete"));
    assert!(matches!(next(&mut w, SEC).await, Event::Delete { .. }));
    assert!(
        timeout(3 * SEC, w.next()).await.is_err(),
        "a deleted owned record is not written back"
    );
}

/// The watch is created after history it needs was compacted away (a test pause between the
/// list and the watch, while records change): it lists again, and ends with exactly etcd's
/// records.
#[tokio::test]
async fn compaction_past_the_watch_revision_resyncs() {
    let etcd = Etcd::start().await;
    let writer = etcd.open(EtcdOptions::default());
    let watcher = etcd.open(EtcdOptions {
        test_watch_delay: Duration::from_secs(3),
        ..EtcdOptions::default()
    });
    for i in 1..=3u8 {
        put_node(&*writer, &record(&format!("node-{i}"), i))
            .await
            .expect("put");
    }
    let mut w = watch_nodes(&watcher, None).await.expect("watch");
    let mut known: std::collections::BTreeMap<String, NodeRecord> =
        match next(&mut w, 5 * SEC).await {
            Event::Reset { items, .. } => {
                assert_eq!(names(&items), ["node-1", "node-2", "node-3"]);
                items.into_iter().map(|r| (r.name.clone(), r)).collect()
            }
            other => panic!("expected reset, got {other:?}"),
        };
    // While the watch is not yet created: change records, then compact everything.
    writer.delete(Kind::Nodes, "node-1").await.expect("delete");
    let n2 = record("node-2", 2);
    put_node(&*writer, &n2).await.expect("update 2");
    put_node(&*writer, &record("node-4", 4))
        .await
        .expect("put 4");
    let mut raw = etcd.raw().await;
    let rev = raw
        .get("/", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();
    raw.compact(rev, None).await.expect("compact");

    let mut resets = 1;
    let deadline = Instant::now() + 10 * SEC;
    loop {
        let ev = next(&mut w, 5 * SEC).await;
        match ev {
            Event::Reset { items, .. } => {
                resets += 1;
                known = items.into_iter().map(|r| (r.name.clone(), r)).collect();
            }
            Event::Upsert { item, .. } => {
                known.insert(item.name.clone(), item);
            }
            Event::Delete { name, .. } => {
                known.remove(&name);
            }
            Event::Status(s) => panic!("unexpected status {s:?}"),
        }
        let (etcd_now, _) = list_nodes(&*writer).await.expect("list");
        let ours: Vec<NodeRecord> = known.values().cloned().collect();
        if resets >= 2 && ours == etcd_now {
            break;
        }
        assert!(Instant::now() < deadline, "never converged: {ours:?}");
    }
    assert_eq!(known.get("node-2"), Some(&n2));
    assert!(!known.contains_key("node-1"));
}

#[tokio::test]
async fn etcd_outage_is_unreachable_never_delete() {
    let mut etcd = Etcd::start().await;
    let reg = etcd.open(EtcdOptions {
        request_timeout: Duration::from_secs(1),
        ..EtcdOptions::default()
    });
    put_node(&*reg, &record("node-a", 1)).await.expect("put");
    put_node(&*reg, &record("node-b", 2)).await.expect("put");
    let mut w = reg.watch(Kind::Nodes, None).await.expect("watch");
    match timeout(5 * SEC, w.next())
        .await
        .expect("event")
        .expect("open")
    {
        RawEvent::Reset { items, .. } => assert_eq!(items.len(), 2),
        other => panic!("expected reset, got {other:?}"),
    }

    etcd.kill();
    match timeout(10 * SEC, w.next())
        .await
        .expect("event")
        .expect("open")
    {
        RawEvent::Status(Connectivity::Unreachable(why)) => assert!(!why.is_empty()),
        other => panic!("expected unreachable, got {other:?}"),
    }
    // While etcd is down: nothing at all, and in particular no delete.
    if let Ok(ev) = timeout(4 * SEC, w.next()).await {
        panic!("unexpected event while etcd is down: {ev:?}");
    }
    assert!(reg.list(Kind::Nodes).await.is_err());

    etcd.spawn().await;
    let mut saw_connected = false;
    loop {
        match timeout(10 * SEC, w.next())
            .await
            .expect("event")
            .expect("open")
        {
            RawEvent::Status(Connectivity::Connected) => saw_connected = true,
            RawEvent::Reset { items, .. } => {
                assert!(saw_connected, "Connected comes before the Reset");
                let n: Vec<&str> = items.iter().map(|(n, _)| n.as_str()).collect();
                assert_eq!(n, ["node-a", "node-b"]);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // And the watch is live again.
    put_node(&*reg, &record("node-c", 3)).await.expect("put");
    match timeout(5 * SEC, w.next())
        .await
        .expect("event")
        .expect("open")
    {
        RawEvent::Upsert { name, .. } => assert_eq!(name, "node-c"),
        other => panic!("expected upsert, got {other:?}"),
    }
}

#[tokio::test]
async fn watch_started_while_etcd_is_down_reports_unreachable() {
    let mut etcd = Etcd::start().await;
    etcd.kill();
    let reg = etcd.open(EtcdOptions {
        request_timeout: Duration::from_secs(1),
        ..EtcdOptions::default()
    });
    let mut w = reg.watch(Kind::Nodes, None).await.expect("watch");
    match timeout(10 * SEC, w.next())
        .await
        .expect("event")
        .expect("open")
    {
        RawEvent::Status(Connectivity::Unreachable(_)) => {}
        other => panic!("expected unreachable, got {other:?}"),
    }
    etcd.spawn().await;
    assert_eq!(
        timeout(10 * SEC, w.next())
            .await
            .expect("event")
            .expect("open"),
        RawEvent::Status(Connectivity::Connected)
    );
    assert!(matches!(
        timeout(5 * SEC, w.next())
            .await
            .expect("event")
            .expect("open"),
        RawEvent::Reset { .. }
    ));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
fn make_pki(dir: &std::path::Path) {
    common::make_ca(dir, "ca");
    common::make_cert(
        dir,
        "ca",
        "server",
        "weft-server",
        "serverAuth,clientAuth",
        "subjectAltName=IP:127.0.0.1\n",
    );
    common::make_cert(dir, "ca", "client", "weft-client", "clientAuth", "");
}

/// etcd with client-certificate authentication: a registry with the CA and a client certificate
/// works; one without the client certificate, or without TLS, cannot read it.
#[tokio::test]
async fn tls_with_client_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    make_pki(d);
    let (cp, pp) = (free_port(), free_port());
    let client = format!("https://127.0.0.1:{cp}");
    let peer = format!("http://127.0.0.1:{pp}");
    let log = std::fs::File::create(d.join("etcd.log")).expect("log");
    let child = Command::new("etcd")
        .args(["--name", "t", "--data-dir"])
        .arg(d.join("data"))
        .args(["--listen-client-urls", &client])
        .args(["--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("t={peer}")])
        .arg("--client-cert-auth")
        .arg(format!("--trusted-ca-file={}", d.join("ca.pem").display()))
        .arg(format!("--cert-file={}", d.join("server.pem").display()))
        .arg(format!("--key-file={}", d.join("server.key").display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("starting etcd");
    let mut etcd = Etcd {
        child: Some(child),
        client_port: cp,
        peer_port: pp,
        dir,
    };
    let spec = format!("etcd://127.0.0.1:{cp}");
    let open = |ca: bool, cert: bool| {
        let d = etcd.dir.path();
        weft_registry::open_with(
            &spec,
            &OpenOptions {
                etcd: EtcdOptions {
                    ca_file: ca.then(|| d.join("ca.pem")),
                    cert_file: cert.then(|| d.join("client.pem")),
                    key_file: cert.then(|| d.join("client.key")),
                    request_timeout: Duration::from_secs(1),
                    ..EtcdOptions::default()
                },
                ..Default::default()
            },
        )
        .expect("open")
    };
    let good = open(true, true);
    let deadline = Instant::now() + Duration::from_secs(15);
    while good.list(Kind::Nodes).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "TLS etcd not reachable:\n{}",
            etcd.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let a = record("node-a", 1);
    put_own_node(&*good, &a).await.expect("put over TLS");
    assert_eq!(get_node(&*good, "node-a").await.expect("get"), Some(a));
    assert!(
        open(true, false).list(Kind::Nodes).await.is_err(),
        "no client certificate, yet etcd answered"
    );
    assert!(
        open(false, false).list(Kind::Nodes).await.is_err(),
        "plain HTTP to a TLS etcd answered"
    );
    etcd.kill();
}

/// etcd with authentication on: a user limited to `/weft/` works with the backend, also across an
/// etcd restart (which invalidates its token); a wrong password fails without showing up in the
/// error; the user cannot write outside the prefix.
#[tokio::test]
async fn user_and_password_survive_an_etcd_restart() {
    let mut etcd = Etcd::start().await;
    let mut raw = etcd.raw().await;
    raw.user_add("root", "rootpw", None).await.expect("root");
    raw.user_grant_role("root", "root")
        .await
        .expect("root role");
    raw.role_add("weft-node").await.expect("role");
    raw.role_grant_permission(
        "weft-node",
        etcd_client::Permission::read_write("/weft/").with_prefix(),
    )
    .await
    .expect("grant");
    raw.user_add("node", "s3cret-pw", None).await.expect("user");
    raw.user_grant_role("node", "weft-node")
        .await
        .expect("user role");
    raw.auth_enable().await.expect("auth enable");

    let with = |user: &str, pw: &str| {
        etcd.open(EtcdOptions {
            username: Some(user.into()),
            password: Some(pw.into()),
            request_timeout: Duration::from_secs(2),
            ..EtcdOptions::default()
        })
    };
    let bad = with("node", "wrong-pw").list(Kind::Nodes).await;
    let e = bad.expect_err("wrong password accepted");
    assert!(!e.to_string().contains("wrong-pw"), "{e}");
    assert!(
        etcd.open(EtcdOptions::default())
            .list(Kind::Nodes)
            .await
            .is_err(),
        "anonymous access with auth on"
    );

    let reg = with("node", "s3cret-pw");
    let a = record("node-a", 1);
    put_own_node(&*reg, &a).await.expect("put own as node");
    assert_eq!(get_node(&*reg, "node-a").await.expect("get"), Some(a));
    let mut w = reg.watch(Kind::Nodes, None).await.expect("watch");
    assert!(matches!(
        timeout(5 * SEC, w.next())
            .await
            .expect("event")
            .expect("open"),
        RawEvent::Reset { .. }
    ));
    let mut node_client = etcd_client::Client::connect(
        [format!("http://127.0.0.1:{}", etcd.client_port)],
        Some(etcd_client::ConnectOptions::new().with_user("node", "s3cret-pw")),
    )
    .await
    .expect("node client");
    assert!(
        node_client.put("/other/x", "y", None).await.is_err(),
        "the node user wrote outside /weft/"
    );

    // Restart etcd: the old token is gone; the backend logs in again.
    etcd.kill();
    etcd.spawn().await;
    let mut saw_reset = false;
    let deadline = Instant::now() + 20 * SEC;
    while !saw_reset {
        assert!(Instant::now() < deadline, "no resync after the restart");
        match timeout(20 * SEC, w.next())
            .await
            .expect("event")
            .expect("open")
        {
            RawEvent::Reset { items, .. } => {
                saw_reset = items.iter().any(|(n, _)| n == "node-a");
            }
            RawEvent::Delete { name, .. } => panic!("delete of {name} across an etcd restart"),
            _ => {}
        }
    }
    put_node(&*reg, &record("node-b", 2))
        .await
        .expect("put after restart");
    let (items, _) = reg.list(Kind::Nodes).await.expect("list after restart");
    assert_eq!(items.len(), 2);
}

/// Pod CIDR claims on a real etcd: 20 nodes (each with its own client, as 20 meshds would have)
/// claim at the same moment from a pool of 20 blocks: 20 distinct blocks; the 21st is told the
/// pool is full. A CAS from a stale snapshot is refused by etcd's transaction, also when the
/// change since the snapshot is to another key. A record of a node without a claim holds its
/// range too. Foreign and invalid claims are skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pod_cidr_claims_are_exclusive() {
    use weft_registry::claims::{claim_pod_cidr, ClaimFailure, ClaimRequest};
    let etcd = Etcd::start().await;
    let req = |node: &str| ClaimRequest {
        node: node.into(),
        pool: "10.42.0.0/19".parse().expect("pool"),
        block_len: 24,
        remembered: None,
        reclaim_after: Duration::from_secs(86_400),
        renew_only: false,
    };
    // A static node (no claim) holds 10.42.31.0/24 through its record; junk under claims/.
    let reg = etcd.open(EtcdOptions::default());
    let mut r = record("static", 31);
    r.endpoints = vec!["192.0.2.31:51820".parse().expect("ep")];
    put_node(&*reg, &r).await.expect("static record");
    let mut raw = etcd.raw().await;
    raw.put("/weft/claims/junk", "{not json", None)
        .await
        .expect("junk");
    raw.put(
        "/weft/claims/liar",
        r#"{"node":"other","podCidr":"10.42.0.0/24","generation":9,"renewedAt":0}"#,
        None,
    )
    .await
    .expect("liar");

    let mut tasks = Vec::new();
    for i in 0..31 {
        let reg = etcd.open(EtcdOptions::default());
        let req = req(&format!("node-{i}"));
        tasks.push(tokio::spawn(
            async move { claim_pod_cidr(&*reg, &req).await },
        ));
    }
    let mut blocks = Vec::new();
    for t in tasks {
        let a = t.await.expect("join").expect("claim");
        blocks.push(a.claim.pod_cidr);
    }
    blocks.sort();
    blocks.dedup();
    assert_eq!(blocks.len(), 31, "a block was claimed twice: {blocks:?}");
    assert!(!blocks.contains(&"10.42.31.0/24".parse().expect("net")));
    let e = claim_pod_cidr(&*reg, &req("node-31"))
        .await
        .expect_err("the pool is full");
    assert!(
        matches!(e, ClaimFailure::Alloc(_)) && e.to_string().contains("no free /24"),
        "{e}"
    );

    // The raw CAS: a snapshot taken before any change in the collection fails.
    let (_, snap) = reg.list_for_update(Kind::Claims).await.expect("list");
    raw.put("/weft/claims/node-0", "{}", None)
        .await
        .expect("touch");
    assert!(!reg
        .put_if_unchanged(Kind::Claims, "node-40", b"{}", snap)
        .await
        .expect("cas"));
    let (_, snap) = reg.list_for_update(Kind::Claims).await.expect("list");
    assert!(reg
        .put_if_unchanged(Kind::Claims, "node-40", b"{}", snap)
        .await
        .expect("cas"));
}
