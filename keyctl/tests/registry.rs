//! keyctl's registry commands, run as the real binary against a `dir:` registry and against a
//! real etcd (Debian's `etcd`, started per test on 127.0.0.1 with free ports, as in
//! crates/registry/tests/etcd.rs). No meshd runs here (the netns tests run keyctl with real
//! meshd nodes), so the test plays the nodes: it watches `rotations/` and updates the records the
//! way a rotating node would (next key first, then the new key at the new generation).
//!
//! Needs `etcd` on PATH for the etcd variants (scripts/install-test-deps.sh); without it they
//! fail, never pass silently.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_core::control::{Revocation, RotationRequest};
use weft_core::record::SCHEMA_VERSION;
use weft_core::{NodeRecord, PrivateKey, PublicKey};
use weft_registry::{EtcdOptions, OpenOptions, Registry, Typed};

const KEYCTL: &str = env!("CARGO_BIN_EXE_keyctl");

/// A throwaway single-member etcd, killed on drop.
struct Etcd {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the test's registry lives.
enum Backend {
    Dir(tempfile::TempDir),
    Etcd(Etcd),
}

impl Backend {
    fn dir() -> Backend {
        Backend::Dir(tempfile::tempdir().expect("tempdir"))
    }

    async fn etcd() -> Backend {
        let dir = tempfile::tempdir().expect("tempdir");
        let (port, peer) = (free_port(), free_port());
        let client = format!("http://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("log");
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(dir.path().join("data"))
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
        let b = Backend::Etcd(Etcd {
            child,
            port,
            _dir: dir,
        });
        let reg = b.registry();
        let deadline = Instant::now() + Duration::from_secs(15);
        while reg.list(weft_registry::Kind::Nodes).await.is_err() {
            assert!(Instant::now() < deadline, "etcd did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        b
    }

    fn spec(&self) -> String {
        match self {
            Backend::Dir(d) => format!("dir:{}", d.path().display()),
            Backend::Etcd(e) => format!("etcd://127.0.0.1:{}", e.port),
        }
    }

    fn registry(&self) -> Arc<dyn Registry> {
        let opts = OpenOptions {
            etcd: EtcdOptions {
                prefix: "/t".into(),
                ..EtcdOptions::default()
            },
            ..Default::default()
        };
        weft_registry::open_with(&self.spec(), &opts).expect("open registry")
    }

    /// keyctl's registry flags for this backend.
    fn args(&self) -> Vec<String> {
        vec![
            "--registry".into(),
            self.spec(),
            "--etcd-prefix".into(),
            "/t".into(),
        ]
    }
}

fn key() -> PublicKey {
    PrivateKey::generate().public_key()
}

fn rec(name: &str, i: u8, generation: u64) -> NodeRecord {
    NodeRecord {
        schema: SCHEMA_VERSION,
        name: name.into(),
        public_key: key(),
        endpoints: vec![format!("198.18.0.{}:51820", 10 + i).parse().expect("ep")],
        private_endpoints: Vec::new(),
        location: None,
        relay: false,
        pod_cidrs: vec![format!("10.42.{i}.0/24").parse().expect("cidr")],
        key_generation: generation,
        next_public_key: None,
        key_created_at: 1_700_000_000,
        psk_generation: None,
    }
}

fn keyctl_cmd(b: &Backend, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(KEYCTL);
    c.args(args)
        .args(b.args())
        .env_remove("WEFT_REGISTRY")
        .env_remove("WEFT_ETCD_USERNAME")
        .env_remove("WEFT_ETCD_PASSWORD")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

async fn keyctl(b: &Backend, args: &[&str]) -> Output {
    tokio::time::timeout(Duration::from_secs(60), keyctl_cmd(b, args).output())
        .await
        .expect("keyctl did not exit within 60 s")
        .expect("running keyctl")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn json_of(o: &Output) -> serde_json::Value {
    let (out, err) = text(o);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}\nstderr: {err}"))
}

/// Plays the nodes: a node with a pending request publishes a next key, and `step` later
/// finishes (new key, the requested generation, no next key). Nodes in `stuck` only publish a
/// next key. Returns the most requests ever pending at once.
async fn play_nodes(
    reg: Arc<dyn Registry>,
    stuck: Vec<String>,
    step: Duration,
    stop: Arc<AtomicBool>,
) -> usize {
    let requests: Typed<RotationRequest> = Typed::new(reg.clone());
    let mut since: BTreeMap<String, Instant> = BTreeMap::new();
    let mut most = 0;
    while !stop.load(Ordering::SeqCst) {
        let (reqs, _) = requests.list().await.expect("list rotations");
        let (recs, _) = weft_registry::list_nodes(&*reg).await.expect("list nodes");
        let recs: BTreeMap<String, NodeRecord> =
            recs.into_iter().map(|r| (r.name.clone(), r)).collect();
        let pending: Vec<(&RotationRequest, &NodeRecord)> = reqs
            .iter()
            .filter_map(|q| recs.get(&q.node).map(|r| (q, r)))
            .filter(|(q, r)| r.key_generation < q.generation || r.next_public_key.is_some())
            .collect();
        most = most.max(pending.len());
        for (q, r) in pending {
            let mut r = r.clone();
            match r.next_public_key {
                None => {
                    r.next_public_key = Some(key());
                    since.insert(r.name.clone(), Instant::now());
                }
                Some(next)
                    if !stuck.contains(&r.name)
                        && since.get(&r.name).is_some_and(|t| t.elapsed() >= step) =>
                {
                    r.public_key = next;
                    r.next_public_key = None;
                    r.key_generation = q.generation;
                    r.key_created_at += 1;
                }
                Some(_) => continue,
            }
            weft_registry::put_node(&*reg, &r).await.expect("put");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    most
}

async fn rotate_all_with_max_parallel(b: Backend) {
    let reg = b.registry();
    let before = [
        rec("node-a", 1, 1),
        rec("node-b", 2, 4),
        rec("node-c", 3, 1),
    ];
    for r in &before {
        weft_registry::put_node(&*reg, r).await.expect("put");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let player = tokio::spawn(play_nodes(
        reg.clone(),
        vec![],
        Duration::from_millis(400),
        stop.clone(),
    ));
    let start = Instant::now();
    let out = keyctl(
        &b,
        &[
            "rotate",
            "--all",
            "--max-parallel",
            "2",
            "--wait",
            "--timeout",
            "30",
            "--json",
        ],
    )
    .await;
    let took = start.elapsed();
    stop.store(true, Ordering::SeqCst);
    let most = player.await.expect("player");
    let (_, err) = text(&out);
    assert!(out.status.success(), "keyctl rotate failed: {err}");
    let v = json_of(&out);
    assert_eq!(v["finished"], true, "{v}");
    for (i, want) in [(0, 2), (1, 5), (2, 2)] {
        assert_eq!(v["nodes"][i]["state"], "done", "{v}");
        assert_eq!(v["nodes"][i]["generation"], want, "{v}");
    }
    // Progress went to stderr (JSON mode), one line per request and per finished node.
    for n in ["node-a", "node-b", "node-c"] {
        assert!(
            err.contains(&format!("{n}: requested key generation")),
            "{err}"
        );
        assert!(err.contains(&format!("{n}: done: generation")), "{err}");
    }
    assert_eq!(
        most, 2,
        "at most --max-parallel 2 at once, and 2 did run together"
    );
    // Each node took at least one 400 ms step, two ran together: the third waited.
    assert!(took >= Duration::from_millis(800), "{took:?}");
    let (reqs, _) = Typed::<RotationRequest>::new(reg.clone())
        .list()
        .await
        .expect("list");
    let gens: Vec<(String, u64)> = reqs.into_iter().map(|r| (r.node, r.generation)).collect();
    assert_eq!(
        gens,
        [
            ("node-a".into(), 2),
            ("node-b".into(), 5),
            ("node-c".into(), 2)
        ]
    );
    for r in &before {
        let now = weft_registry::get_node(&*reg, &r.name)
            .await
            .expect("get")
            .expect("record");
        assert_ne!(now.public_key, r.public_key, "{} kept its key", r.name);
    }
    // Run again for one node: it asks for the next generation.
    let stop = Arc::new(AtomicBool::new(false));
    let player = tokio::spawn(play_nodes(
        reg.clone(),
        vec![],
        Duration::from_millis(100),
        stop.clone(),
    ));
    let out = keyctl(&b, &["rotate", "--node", "node-b", "--wait"]).await;
    stop.store(true, Ordering::SeqCst);
    player.await.expect("player");
    let (out_text, err) = text(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        out_text.contains("node-b: requested key generation 6"),
        "{out_text}"
    );
    assert!(out_text.contains("rotated 1 node"), "{out_text}");
}

async fn rotate_wait_fails_naming_unfinished_nodes(b: Backend) {
    let reg = b.registry();
    for r in [
        rec("node-a", 1, 1),
        rec("node-b", 2, 1),
        rec("node-c", 3, 7),
    ] {
        weft_registry::put_node(&*reg, &r).await.expect("put");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let player = tokio::spawn(play_nodes(
        reg.clone(),
        vec!["node-a".into()],
        Duration::from_millis(100),
        stop.clone(),
    ));
    let out = keyctl(
        &b,
        &[
            "rotate",
            "--node",
            "node-a",
            "--node",
            "node-b",
            "--max-parallel",
            "2",
            "--wait",
            "--timeout",
            "3",
        ],
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    player.await.expect("player");
    let (stdout, err) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "stdout: {stdout}\nstderr: {err}"
    );
    assert!(
        err.contains("did not finish within 3s")
            && err.contains("node-a (requested generation 2, at generation 1, rotating to"),
        "{err}"
    );
    assert!(!err.contains("node-b ("), "node-b finished: {err}");
    assert!(stdout.contains("node-b: done: generation 2"), "{stdout}");

    // A request still pending is reused, not bumped again.
    let out = keyctl(&b, &["rotate", "--node", "node-a"]).await;
    let (stdout, err) = text(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        stdout
            .contains("node-a: requested key generation 2 (a request for it was already pending)"),
        "{stdout}"
    );
    // Without --wait keyctl returns once the request is written; nobody acts on it here.
    let start = Instant::now();
    let out = keyctl(&b, &["rotate", "--node", "node-c"]).await;
    assert!(out.status.success(), "{}", text(&out).1);
    assert!(start.elapsed() < Duration::from_secs(10));
    let req = Typed::<RotationRequest>::new(reg.clone())
        .get("node-c")
        .await
        .expect("get")
        .expect("request");
    assert_eq!(req.generation, 8);
    assert!(req.requested_at > 1_700_000_000);
    // An unknown node: nothing is written, exit 1.
    let out = keyctl(&b, &["rotate", "--node", "node-x", "--node", "node-a"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("no node record for node-x"));
    assert!(Typed::<RotationRequest>::new(reg.clone())
        .get("node-x")
        .await
        .expect("get")
        .is_none());
}

async fn revoke_readmit_and_status(b: Backend) {
    let reg = b.registry();
    let mut n2 = rec("node-2", 2, 3);
    n2.next_public_key = Some(key());
    for r in [rec("node-1", 1, 1), n2.clone()] {
        weft_registry::put_node(&*reg, &r).await.expect("put");
    }
    let out = keyctl(&b, &["revoke", "node-2", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out).1);
    let v = json_of(&out);
    assert_eq!(v["hasRecord"], true);
    let stored = Typed::<Revocation>::new(reg.clone())
        .get("node-2")
        .await
        .expect("get")
        .expect("revocation");
    assert_eq!(
        stored.revoked_keys,
        vec![n2.public_key, n2.next_public_key.expect("next")]
    );
    assert_eq!(stored.approved_key, None);
    assert_eq!(v["revocation"]["revokedKeys"][0], n2.public_key.to_base64());

    let status = json_of(&keyctl(&b, &["status", "--json"]).await);
    let nodes = status["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2, "{status}");
    assert_eq!(nodes[0]["admitted"], true);
    assert_eq!(nodes[1]["name"], "node-2");
    assert_eq!(nodes[1]["admitted"], false);
    assert_eq!(nodes[1]["revocation"]["state"], "revoked");
    assert_eq!(nodes[1]["rotation"]["state"], "rotating");
    assert_eq!(nodes[1]["keyGeneration"], 3);
    assert_eq!(nodes[1]["fingerprint"], n2.public_key.fingerprint());

    // Readmit: a revoked key and garbage are refused; a bad key is a usage error.
    let revoked = n2.public_key.to_base64();
    let out = keyctl(&b, &["readmit", "node-2", "--public-key", &revoked]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("was revoked"), "{}", text(&out).1);
    let out = keyctl(&b, &["readmit", "node-2", "--public-key", "AAAA"]).await;
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out).1.contains("--public-key"));
    let out = keyctl(
        &b,
        &["readmit", "node-1", "--public-key", &key().to_base64()],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("not revoked"));

    let fresh = key();
    let out = keyctl(
        &b,
        &["readmit", "node-2", "--public-key", &fresh.to_base64()],
    )
    .await;
    let (stdout, err) = text(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        stdout.contains("stays refused until it publishes the approved key"),
        "{stdout}"
    );
    let table = text(&keyctl(&b, &["status"]).await).0;
    assert!(
        table.contains(&format!("waiting for approved key {}", fresh.fingerprint())),
        "{table}"
    );
    // The node publishes the approved key: readmitted.
    let mut n2b = rec("node-2", 2, 4);
    n2b.public_key = fresh;
    weft_registry::put_node(&*reg, &n2b).await.expect("put");
    let status = json_of(&keyctl(&b, &["status", "--json"]).await);
    assert_eq!(status["nodes"][1]["revocation"]["state"], "readmitted");
    assert_eq!(status["nodes"][1]["admitted"], true);

    // Revoking again adds the approved key; a name without a record can be revoked too.
    let out = keyctl(&b, &["revoke", "node-2"]).await;
    assert!(out.status.success());
    let stored = Typed::<Revocation>::new(reg.clone())
        .get("node-2")
        .await
        .expect("get")
        .expect("revocation");
    assert_eq!(stored.revoked_keys.len(), 3);
    assert!(stored.revoked_keys.contains(&fresh) && stored.approved_key.is_none());
    let out = keyctl(&b, &["revoke", "node-9"]).await;
    let (stdout, err) = text(&out);
    assert!(out.status.success(), "{err}");
    assert!(stdout.contains("has no record"), "{stdout}");
    let status = json_of(&keyctl(&b, &["status", "--json"]).await);
    assert_eq!(status["nodes"][2]["name"], "node-9");
    assert_eq!(status["nodes"][2]["hasRecord"], false);
}

#[tokio::test]
async fn dir_rotate_all_with_max_parallel() {
    rotate_all_with_max_parallel(Backend::dir()).await;
}

#[tokio::test]
async fn etcd_rotate_all_with_max_parallel() {
    rotate_all_with_max_parallel(Backend::etcd().await).await;
}

#[tokio::test]
async fn dir_rotate_wait_fails_naming_unfinished_nodes() {
    rotate_wait_fails_naming_unfinished_nodes(Backend::dir()).await;
}

#[tokio::test]
async fn etcd_rotate_wait_fails_naming_unfinished_nodes() {
    rotate_wait_fails_naming_unfinished_nodes(Backend::etcd().await).await;
}

#[tokio::test]
async fn dir_revoke_readmit_and_status() {
    revoke_readmit_and_status(Backend::dir()).await;
}

#[tokio::test]
async fn etcd_revoke_readmit_and_status() {
    revoke_readmit_and_status(Backend::etcd().await).await;
}

/// `keyctl psk rotate`: bumps `psk/cluster` by one each time; `--wait` exits 2 naming the nodes
/// still on an older generation, and 0 once every node holding the secret is on it (a node
/// without the secret is named in a warning, not waited for). Only a number is written.
async fn psk_rotate_and_wait(b: Backend) {
    use weft_core::control::{PskGeneration, PSK_OBJECT};
    let reg = b.registry();
    let mut recs: Vec<NodeRecord> = (1..=3).map(|i| rec(&format!("n{i}"), i, 1)).collect();
    recs[0].psk_generation = Some(0);
    recs[1].psk_generation = Some(0);
    for r in &recs {
        weft_registry::put_node(&*reg, r).await.expect("put");
    }
    let out = keyctl(&b, &["psk", "rotate", "--json"]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(json_of(&out)["generation"], 1);
    let psk = Typed::<PskGeneration>::new(reg.clone());
    let stored = psk
        .get(PSK_OBJECT)
        .await
        .expect("get")
        .expect("psk/cluster");
    assert_eq!(stored.generation, 1);
    let raw = reg
        .get(weft_registry::Kind::Psk, PSK_OBJECT)
        .await
        .expect("get")
        .expect("raw");
    let fields: serde_json::Value = serde_json::from_slice(&raw).expect("json");
    assert_eq!(
        fields
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["generation".to_string(), "requestedAt".to_string()])
    );

    let out = keyctl(&b, &["psk", "rotate", "--wait", "--timeout", "1"]).await;
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{so}{se}");
    assert!(se.contains("generation 2") && se.contains("n1, n2"), "{se}");
    assert!(!se.contains("n3"), "{se}");

    for r in recs.iter_mut().take(2) {
        r.psk_generation = Some(3);
        weft_registry::put_node(&*reg, r).await.expect("put");
    }
    let out = keyctl(&b, &["psk", "rotate", "--wait"]).await;
    let (so, se) = text(&out);
    assert!(out.status.success(), "{so}{se}");
    assert!(so.contains("2 node(s) on PSK generation 3"), "{so}");
    assert!(so.contains("no cluster secret on n3"), "{so}");
    let st = json_of(&keyctl(&b, &["status", "--json"]).await);
    assert_eq!(st["pskGeneration"], 3);
    assert_eq!(st["nodes"][0]["pskGeneration"], 3);
    assert!(st["nodes"][2]["pskGeneration"].is_null());
}

#[tokio::test]
async fn dir_psk_rotate_and_wait() {
    psk_rotate_and_wait(Backend::dir()).await;
}

#[tokio::test]
async fn etcd_psk_rotate_and_wait() {
    psk_rotate_and_wait(Backend::etcd().await).await;
}

#[tokio::test]
async fn bad_flags_exit_64_naming_the_flag() {
    let b = Backend::dir();
    let cases: &[(&[&str], &str)] = &[
        (&["rotate"], "--node"),
        (&["rotate", "--node", "a", "--all"], "--all"),
        (
            &["rotate", "--node", "a", "--max-parallel", "0"],
            "--max-parallel",
        ),
        (&["rotate", "--node", "a", "--timeout", "0"], "--timeout"),
        (&["rotate", "--node", "Bad_Name"], "--node"),
        (&["revoke", "../x"], "NAME"),
        (&["readmit", "a"], "--public-key"),
        (&["psk", "rotate", "--timeout", "0"], "--timeout"),
        (&["psk", "rotate", "--all"], "--all"),
    ];
    for (args, flag) in cases {
        let out = keyctl(&b, args).await;
        let err = text(&out).1;
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?} does not name {flag}: {err}");
    }
    let out = tokio::process::Command::new(KEYCTL)
        .args(["status", "--registry", "dir:/nonexistent/weft-registry"])
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--registry"));
    assert!(!std::path::Path::new("/nonexistent/weft-registry").exists());
    // An etcd nobody listens on: a plain failure (exit 1), not a hang.
    let start = Instant::now();
    let out = tokio::process::Command::new(KEYCTL)
        .args([
            "status",
            "--registry",
            &format!("etcd://127.0.0.1:{}", free_port()),
        ])
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(start.elapsed() < Duration::from_secs(30));
}
