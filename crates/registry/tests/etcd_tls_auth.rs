//! The `etcd://` backend against a real etcd (Debian's `etcd`) with TLS and authentication:
//! server-only TLS with a CA file, a wrong CA, mutual TLS with client-certificate (CN) users laid
//! out by deploy/etcd/weft-etcd-rbac.sh (refusals surface as `RegistryError::PermissionDenied`),
//! and a password login that outlives its auth token (`--auth-token-ttl`). Certificates are made
//! with openssl in a temp dir; etcd listens on 127.0.0.1 with free ports.

mod common;

use common::{make_ca, make_cert};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::time::timeout;
use weft_core::keys::PrivateKey;
use weft_core::record::SCHEMA_VERSION;
use weft_core::NodeRecord;
use weft_registry::{
    get_node, put_node, put_own_node, watch_nodes, EtcdOptions, Event, Kind, OpenOptions, Registry,
    RegistryError,
};

const SEC: Duration = Duration::from_secs(1);
const RBAC_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../deploy/etcd/weft-etcd-rbac.sh"
);

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A CA, a server certificate for 127.0.0.1, a client certificate per CN (`client-CN.pem`), and
/// an unrelated CA (`other-ca.pem`).
fn make_pki(dir: &Path, client_cns: &[&str]) {
    make_ca(dir, "ca");
    make_ca(dir, "other-ca");
    make_cert(
        dir,
        "ca",
        "server",
        "weft-etcd",
        "serverAuth",
        "subjectAltName=IP:127.0.0.1\n",
    );
    for cn in client_cns {
        make_cert(dir, "ca", &format!("client-{cn}"), cn, "clientAuth", "");
    }
}

/// A single-member etcd on 127.0.0.1; killed on drop.
struct Etcd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    tls: bool,
}

impl Etcd {
    /// Starts etcd with `extra` flags (TLS when `tls`: the server certificate of [`make_pki`],
    /// which must have run in `dir`) and waits until its port accepts connections.
    fn start(dir: tempfile::TempDir, tls: bool, extra: &[String]) -> Etcd {
        let (port, peer_port) = (free_port(), free_port());
        let scheme = if tls { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let d = dir.path();
        let log = std::fs::File::create(d.join("etcd.log")).expect("log");
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "t", "--data-dir"])
            .arg(d.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")]);
        if tls {
            cmd.arg(format!("--cert-file={}", d.join("server.pem").display()))
                .arg(format!("--key-file={}", d.join("server.key").display()));
        }
        cmd.args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = cmd
            .spawn()
            .expect("starting etcd (scripts/install-test-deps.sh)");
        let e = Etcd {
            child,
            port,
            dir,
            tls,
        };
        e.wait_healthy();
        e
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + 15 * SEC;
        loop {
            let (ok, out) = self.ctl(Some("root"), None, &["endpoint", "health"]);
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd not healthy: {out}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("etcd.log")).unwrap_or_default()
    }

    fn spec(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.port)
    }

    /// The ETCDCTL_* variables for this etcd: the client certificate of `cn` (TLS only) and/or
    /// the `user:password` login.
    fn ctl_env(&self, cn: Option<&str>, login: Option<&str>) -> Vec<(String, String)> {
        let mut v = vec![
            ("ETCDCTL_API".to_string(), "3".to_string()),
            (
                "ETCDCTL_ENDPOINTS".into(),
                format!("127.0.0.1:{}", self.port),
            ),
            ("ETCDCTL_COMMAND_TIMEOUT".into(), "3s".into()),
        ];
        let p = |f: String| self.path(&f).display().to_string();
        if self.tls {
            v.push(("ETCDCTL_CACERT".into(), p("ca.pem".into())));
            if let Some(cn) = cn {
                v.push(("ETCDCTL_CERT".into(), p(format!("client-{cn}.pem"))));
                v.push(("ETCDCTL_KEY".into(), p(format!("client-{cn}.key"))));
            }
        }
        if let Some(l) = login {
            v.push(("ETCDCTL_USER".into(), l.into()));
        }
        v
    }

    /// `prog` with only PATH and the ETCDCTL_* variables of [`Etcd::ctl_env`].
    fn command(&self, prog: &str, cn: Option<&str>, login: Option<&str>) -> Command {
        let mut c = Command::new(prog);
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.ctl_env(cn, login));
        c
    }

    fn etcdctl(&self, cn: Option<&str>, login: Option<&str>) -> Command {
        self.command("etcdctl", cn, login)
    }

    /// Runs etcdctl; (success, stdout + stderr).
    fn ctl(&self, cn: Option<&str>, login: Option<&str>, args: &[&str]) -> (bool, String) {
        let out = self
            .etcdctl(cn, login)
            .args(args)
            .output()
            .expect("etcdctl");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Runs weft-etcd-rbac.sh as root (client certificate CN=root with TLS, else `root_login`);
    /// its stdout (generated passwords).
    fn rbac(&self, args: &[&str], env: &[(&str, &str)], root_login: Option<&str>) -> String {
        let out = self
            .command("bash", Some("root"), root_login)
            .arg(RBAC_SCRIPT)
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("running weft-etcd-rbac.sh");
        assert!(
            out.status.success(),
            "weft-etcd-rbac.sh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
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

    /// Registry options with the CA and the client certificate of `cn`.
    fn tls_opts(&self, cn: &str) -> EtcdOptions {
        EtcdOptions {
            ca_file: Some(self.path("ca.pem")),
            cert_file: Some(self.path(&format!("client-{cn}.pem"))),
            key_file: Some(self.path(&format!("client-{cn}.key"))),
            request_timeout: 2 * SEC,
            ..EtcdOptions::default()
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// Lists within `within`, returning the result and how long it took.
async fn timed_list(
    reg: &Arc<dyn Registry>,
    within: Duration,
) -> (Result<usize, RegistryError>, Duration) {
    let t = Instant::now();
    let r = timeout(within, reg.list(Kind::Nodes))
        .await
        .expect("list did not return in time (hangs)")
        .map(|(items, _)| items.len());
    (r, t.elapsed())
}

/// Server-only TLS (no client certificates): the CA file alone is enough, with `etcd://` plus a
/// CA or with `etcds://`. A wrong CA, or plain HTTP against the TLS port, fails within the
/// request timeout with an error that says what is wrong.
#[tokio::test]
async fn server_tls_with_ca_only_and_wrong_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_pki(dir.path(), &["root"]);
    let etcd = Etcd::start(dir, true, &[]);
    let with_ca = |ca: &str| EtcdOptions {
        ca_file: Some(etcd.path(ca)),
        request_timeout: 2 * SEC,
        ..EtcdOptions::default()
    };
    let good = etcd.open(with_ca("ca.pem"));
    let a = record("node-a", 1);
    put_own_node(&*good, &a).await.expect("put over TLS");
    assert_eq!(get_node(&*good, "node-a").await.expect("get"), Some(a));
    let etcds = weft_registry::open_with(
        &format!("etcds://127.0.0.1:{}", etcd.port),
        &OpenOptions {
            etcd: with_ca("ca.pem"),
            ..Default::default()
        },
    )
    .expect("open etcds://");
    assert_eq!(timed_list(&etcds, 5 * SEC).await.0.expect("etcds list"), 1);

    let (r, took) = timed_list(&etcd.open(with_ca("other-ca.pem")), 10 * SEC).await;
    let e = r.expect_err("a server certificate from another CA was accepted");
    let msg = e.to_string();
    eprintln!("wrong CA ({took:?}): {msg}");
    assert!(took < 4 * SEC, "wrong CA took {took:?}");
    assert!(
        msg.contains("certificate") || msg.contains("UnknownIssuer"),
        "the wrong-CA error does not say so: {msg}"
    );

    let (r, took) = timed_list(
        &etcd.open(EtcdOptions {
            request_timeout: 2 * SEC,
            ..EtcdOptions::default()
        }),
        10 * SEC,
    )
    .await;
    let e = r.expect_err("plain HTTP to a TLS port answered");
    eprintln!("plain HTTP to TLS ({took:?}): {e}");
    assert!(took < 4 * SEC, "plain HTTP took {took:?}");
}

/// Mutual TLS with client-certificate users made by the real weft-etcd-rbac.sh: the node user
/// (CN weft-node-node-a) writes its own record and claim key and reads everything; etcd refuses
/// its writes of another node's record and of revocations, and the registry reports that as
/// `PermissionDenied` ("permission denied"), not as an unreachable registry. The admin user
/// (CN weft-admin) may write them. A client without a certificate, or with another CA, fails.
#[tokio::test]
async fn mutual_tls_node_user_is_refused_other_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cns = ["root", "weft-admin", "weft-node-node-a", "weft-node-node-b"];
    make_pki(dir.path(), &cns);
    let ca = dir.path().join("ca.pem").display().to_string();
    let etcd = Etcd::start(
        dir,
        true,
        &[
            "--client-cert-auth".into(),
            format!("--trusted-ca-file={ca}"),
        ],
    );
    etcd.rbac(
        &["--enable-auth", "--no-password", "node-a", "node-b"],
        &[],
        None,
    );

    let node_a = etcd.open(etcd.tls_opts("weft-node-node-a"));
    let node_b = etcd.open(etcd.tls_opts("weft-node-node-b"));
    let admin = etcd.open(etcd.tls_opts("weft-admin"));
    let (a, b) = (record("node-a", 1), record("node-b", 2));
    put_own_node(&*node_a, &a)
        .await
        .expect("node-a writes its own record");
    put_own_node(&*node_b, &b)
        .await
        .expect("node-b writes its own record");
    let (ok, out) = etcd.ctl(
        Some("weft-node-node-a"),
        None,
        &["put", "/weft/claims/node-a", "x"],
    );
    assert!(ok, "node-a cannot write its claim: {out}");
    let (items, _) = node_a.list(Kind::Nodes).await.expect("node-a lists");
    assert_eq!(items.len(), 2);
    let mut w = watch_nodes(&node_a, None).await.expect("watch");
    match timeout(5 * SEC, w.next())
        .await
        .expect("event")
        .expect("open")
    {
        Event::Reset { items, .. } => assert_eq!(items.len(), 2),
        other => panic!("expected reset, got {other:?}"),
    }

    // Through the registry API: refused by etcd, reported as permission denied.
    let forged = record("node-b", 9);
    for r in [
        put_node(&*node_a, &forged).await.map(|_| ()),
        put_own_node(&*node_a, &forged).await.map(|_| ()),
        node_a.delete(Kind::Nodes, "node-b").await.map(|_| ()),
    ] {
        let e = r.expect_err("node-a changed node-b's record");
        let msg = e.to_string();
        assert!(
            matches!(e, RegistryError::PermissionDenied { .. }),
            "not PermissionDenied: {e:?}"
        );
        assert!(
            msg.contains("/weft/nodes/node-b") && msg.contains("permission denied"),
            "{msg}"
        );
        eprintln!("refused: {msg}");
    }
    assert_eq!(
        get_node(&*node_a, "node-b").await.expect("get"),
        Some(b.clone()),
        "node-b's record changed"
    );
    // With etcdctl: other nodes' keys and revocations.
    for args in [
        ["put", "/weft/nodes/node-b", "x"].as_slice(),
        &["del", "/weft/nodes/node-b"],
        &["put", "/weft/claims/node-b", "x"],
        &["put", "/weft/revocations/x", "x"],
        &["put", "/weft", "x"],
        &["put", "/other", "x"],
    ] {
        let (ok, out) = etcd.ctl(Some("weft-node-node-a"), None, args);
        assert!(!ok, "node-a may {args:?}");
        assert!(out.contains("permission denied"), "{args:?}: {out}");
    }
    // The admin may.
    put_node(&*admin, &forged)
        .await
        .expect("admin writes node-b");
    let (ok, out) = etcd.ctl(
        Some("weft-admin"),
        None,
        &["put", "/weft/revocations/x", "x"],
    );
    assert!(ok, "admin cannot write a revocation: {out}");
    assert!(admin
        .delete(Kind::Nodes, "node-b")
        .await
        .expect("admin deletes"));

    // A certificate from another CA, or none, gets nowhere (and says why, quickly).
    let mut other = etcd.tls_opts("weft-node-node-a");
    other.ca_file = Some(etcd.path("other-ca.pem"));
    let (r, took) = timed_list(&etcd.open(other), 10 * SEC).await;
    let e = r.expect_err("wrong CA accepted");
    eprintln!("mTLS, wrong CA ({took:?}): {e}");
    assert!(took < 4 * SEC);
    let mut no_cert = etcd.tls_opts("weft-node-node-a");
    no_cert.cert_file = None;
    no_cert.key_file = None;
    let (r, took) = timed_list(&etcd.open(no_cert), 10 * SEC).await;
    let e = r.expect_err("no client certificate, yet etcd answered");
    eprintln!("mTLS, no client certificate ({took:?}): {e}");
    assert!(took < 4 * SEC);
}

/// A password login outlives its auth token: etcd runs with `--auth-token-ttl=2` and the
/// registry logs in as a node user made by weft-etcd-rbac.sh. Well past the token's life the
/// lease is still kept alive (same lease, record present), the watch still delivers another
/// node's new record, and the next requests succeed at the first try (etcd-client 0.14 does
/// not renew tokens; the backend logs in again when etcd rejects one).
#[tokio::test]
async fn password_login_outlives_its_auth_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(dir, false, &["--auth-token-ttl=2".into()]);
    let out = etcd.rbac(
        &["--enable-auth", "node-a", "node-b"],
        &[
            ("WEFT_ETCD_ROOT_PASSWORD", "root-pw"),
            ("WEFT_ETCD_NODE_PASSWORD_NODE_A", "node-a-pw"),
        ],
        None,
    );
    // Generated once, on stdout: the admin's and node-b's.
    let generated: Vec<(&str, &str)> = out.lines().filter_map(|l| l.split_once(' ')).collect();
    let users: Vec<&str> = generated.iter().map(|(u, _)| *u).collect();
    assert_eq!(users, ["weft-admin", "weft-node-node-b"], "{out}");
    assert!(generated.iter().all(|(_, p)| p.len() >= 32), "{out}");
    // Run again: nothing generated, nothing changed.
    let again = etcd.rbac(&["node-a", "node-b"], &[], Some("root:root-pw"));
    assert_eq!(again, "", "a second run printed passwords");

    let login = |user: &str, pw: &str| EtcdOptions {
        username: Some(user.into()),
        password: Some(pw.into()),
        lease_ttl: 3 * SEC,
        request_timeout: 2 * SEC,
        ..EtcdOptions::default()
    };
    let node_a = etcd.open(login("weft-node-node-a", "node-a-pw"));
    let a = record("node-a", 1);
    put_own_node(&*node_a, &a).await.expect("put own");
    let lease_of = |key: &str| {
        let (ok, out) = etcd.ctl(None, Some("root:root-pw"), &["get", key, "-w", "fields"]);
        assert!(ok, "{out}");
        out.lines()
            .find_map(|l| l.strip_prefix("\"Lease\" : ").map(|v| v.trim().to_string()))
    };
    let lease = lease_of("/weft/nodes/node-a").expect("record bound to a lease");
    let mut w = watch_nodes(&node_a, None).await.expect("watch");
    assert!(matches!(
        timeout(5 * SEC, w.next())
            .await
            .expect("event")
            .expect("open"),
        Event::Reset { .. }
    ));

    // Idle for 3 token lifetimes (and 2 lease TTLs).
    tokio::time::sleep(6 * SEC).await;
    assert_eq!(
        lease_of("/weft/nodes/node-a").as_deref(),
        Some(lease.as_str()),
        "the lease was lost while the token expired"
    );
    let (ok, out) = etcd.ctl(
        None,
        Some("root:root-pw"),
        &[
            "put",
            "/weft/nodes/node-b",
            &String::from_utf8_lossy(&record("node-b", 2).to_json()),
        ],
    );
    assert!(ok, "{out}");
    match timeout(3 * SEC, w.next())
        .await
        .expect("event")
        .expect("open")
    {
        Event::Upsert { item, .. } => assert_eq!(item.name, "node-b"),
        other => panic!("expected node-b, got {other:?}"),
    }
    // Unary requests with the expired token: retried after a new login, no error.
    assert!(get_node(&*node_a, "node-b")
        .await
        .expect("get after expiry")
        .is_some());
    tokio::time::sleep(5 * SEC).await;
    let mut a2 = a.clone();
    a2.key_generation = 2;
    put_own_node(&*node_a, &a2).await.expect("put after expiry");
    let refused = put_node(&*node_a, &record("node-b", 3))
        .await
        .expect_err("node-a wrote node-b");
    assert!(
        matches!(refused, RegistryError::PermissionDenied { .. }),
        "{refused:?}"
    );
    let msg = refused.to_string();
    assert!(
        msg.contains("weft-node-node-a") && !msg.contains("node-a-pw"),
        "{msg}"
    );
    assert!(node_a
        .delete(Kind::Nodes, "node-a")
        .await
        .expect("delete after expiry"));
}
