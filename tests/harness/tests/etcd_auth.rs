//! End-to-end tests of meshd with a secured etcd: TLS with client certificates
//! (`--client-cert-auth`), authentication on, and weft's per-node RBAC layout made by the real
//! deploy/etcd/weft-etcd-rbac.sh (see `Cluster::start_etcd_secure` and deploy/etcd/README.md).
//! Each node's meshd logs in as its own restricted user, with a client certificate (CN) or with
//! a password (WEFT_ETCD_USERNAME / WEFT_ETCD_PASSWORD).
//! Need root, etcd, openssl (scripts/install-test-deps.sh) and the workspace binaries; run
//! serially:
//!   cargo build --workspace --bins && cargo test -p weft-tests --test etcd_auth -- --test-threads=1

use std::time::{Duration, Instant};
use weft_tests::{Cluster, Etcd, EtcdAuthOpts, EtcdLogin, MeshdEtcdArgs, Node, Pod, ADMIN_USER};

const READY: Duration = Duration::from_secs(20);
/// Lease TTL the tests give meshd.
const TTL: &str = "5";

fn setup() {
    weft_tests::set_nettool(env!("CARGO_BIN_EXE_weft-nettool"));
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Starts meshd on `n` logged in as `login`, with `extra` flags.
fn start_as(n: &Node, etcd: &Etcd, login: &EtcdLogin, extra: &[&str]) {
    let MeshdEtcdArgs { mut args, env } = etcd.meshd_args(Some(login)).expect("meshd args");
    args.extend(["--etcd-lease-ttl".to_string(), TTL.to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    n.start_meshd_env(&refs, &env).expect("start meshd");
}

/// Starts meshd on `n` as its own node user.
fn start_own(n: &Node, etcd: &Etcd) {
    let login = etcd.node_login(&n.name).expect("login");
    start_as(n, etcd, &login, &[]);
}

fn peer_names(n: &Node) -> Vec<String> {
    n.status_peer_names().unwrap_or_default()
}

fn status_str(n: &Node, field: &str) -> String {
    n.status_json().expect("status")[field]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Expects `etcdctl ARGS` as `login` to be refused by etcd for lack of permission.
fn assert_refused(etcd: &Etcd, login: &EtcdLogin, args: &[&str]) {
    match etcd.etcdctl_as(login, args) {
        Ok(out) => panic!("{login:?} may {args:?}: {out}"),
        Err(e) => {
            let e = format!("{e:#}");
            assert!(e.contains("permission denied"), "{login:?} {args:?}: {e}");
        }
    }
}

/// 3 nodes run meshd over TLS with client certificates, each as its own restricted etcd user:
/// node-0 and node-1 through their certificate's CN, node-2 with a password (its certificate's
/// CN names no user). The mesh forms, pods ping, the records are lease-bound. etcd refuses
/// node-0's user (and node-2's) writes to other nodes' records and claims and to revocations,
/// while the admin user may write them. A meshd that claims to be node-1 with node-0's
/// credentials is refused too: node-1's record is untouched, and the impostor logs a
/// permission error and shows it in `meshd status`.
#[test]
fn etcd_tls_node_users_mesh_and_refusals() {
    setup();
    let t0 = Instant::now();
    let c = Cluster::with_nodes(4).expect("cluster");
    let etcd = c
        .start_etcd_secure(&EtcdAuthOpts {
            cert_nodes: names(&["node-0", "node-1"]),
            password_nodes: names(&["node-2"]),
            auth_token_ttl: None,
        })
        .expect("secured etcd");
    eprintln!("cluster + secured etcd + RBAC in {:?}", t0.elapsed());
    assert!(matches!(
        etcd.node_login("node-2").expect("login"),
        EtcdLogin::Password { .. }
    ));
    // Each node claims its pod range as its restricted user: the claim's transaction compares
    // the whole claims range (read permission) and writes only the node's own claim.
    for i in 0..3 {
        c.node(i).set_claiming(true);
        start_own(c.node(i), &etcd);
        c.node(i).refresh_claimed().expect("claimed range");
    }
    let pods: Vec<Pod> = (0..3).map(|i| c.node(i).add_pod(0).expect("pod")).collect();
    c.wait_mesh_ready(READY).expect("mesh ready");
    c.assert_pods_ping(&pods.iter().collect::<Vec<_>>());
    // Each node also writes its link health report (within a 2 s check of starting).
    let want = [
        "/weft/claims/node-0",
        "/weft/claims/node-1",
        "/weft/claims/node-2",
        "/weft/health/node-0",
        "/weft/health/node-1",
        "/weft/health/node-2",
        "/weft/nodes/node-0",
        "/weft/nodes/node-1",
        "/weft/nodes/node-2",
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    let keys = loop {
        let keys = etcd.keys("/weft/").expect("keys");
        if keys == want || Instant::now() > deadline {
            break keys;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(keys, want);
    for k in keys.iter().filter(|k| !k.starts_with("/weft/claims/")) {
        assert!(
            etcd.lease_of(k).expect("lease").is_some(),
            "{k} is not bound to a lease"
        );
    }
    for i in 0..3 {
        let n = c.node(i);
        assert_eq!(status_str(n, "registry"), "connected");
        assert_eq!(status_str(n, "ownRecord"), "published");
        assert_eq!(status_str(n, "podCidrClaim"), "held");
    }
    eprintln!("mesh of 3 restricted users up at {:?}", t0.elapsed());

    // etcd's refusals, with etcdctl.
    let node0 = etcd.node_login("node-0").expect("login");
    let node2 = etcd.node_login("node-2").expect("login");
    let admin = EtcdLogin::Cert(ADMIN_USER.into());
    for login in [&node0, &node2] {
        for args in [
            ["put", "/weft/nodes/node-1", "x"].as_slice(),
            &["del", "/weft/nodes/node-1"],
            &["put", "/weft/claims/node-1", "x"],
            &["del", "/weft/claims/node-1"],
            &["put", "/weft/health/node-1", "x"],
            &["put", "/weft/psk/cluster", "x"],
            &["put", "/weft/revocations/x", "x"],
            &["del", "/weft/revocations/x"],
            &["del", "--prefix", "/weft/"],
            &["put", "/elsewhere", "x"],
        ] {
            assert_refused(&etcd, login, args);
        }
    }
    // Nor through node-1's lease: no revoking it, no attaching a key to it.
    let lease1 = etcd
        .lease_of("/weft/nodes/node-1")
        .expect("lease")
        .expect("node-1's record is lease-bound");
    let lease1_hex = format!("{:x}", lease1.parse::<i64>().expect("lease id"));
    assert_refused(&etcd, &node0, &["lease", "revoke", &lease1_hex]);
    assert_refused(
        &etcd,
        &node0,
        &["put", "--lease", &lease1_hex, "/weft/nodes/node-0", "x"],
    );
    // What node-0's user may do: its own claim key, and read everything.
    let claim0 = etcd
        .get("/weft/claims/node-0")
        .expect("get")
        .expect("node-0's claim");
    etcd.etcdctl_as(&node0, &["put", "/weft/claims/node-0", &claim0])
        .expect("node-0 writes its claim");
    let seen = etcd
        .etcdctl_as(&node2, &["get", "--prefix", "--keys-only", "/weft/"])
        .expect("node-2 reads the prefix");
    assert_eq!(seen.lines().filter(|l| !l.is_empty()).count(), 9, "{seen}");
    // The admin may write revocations, claims and records of any node.
    for args in [
        ["put", "/weft/revocations/x", "x"].as_slice(),
        &["del", "/weft/revocations/x"],
        &["put", "/weft/claims/node-9", "x"],
        &["del", "/weft/claims/node-9"],
        &["put", "/weft/nodes/node-9", "not a record"],
        &["del", "/weft/nodes/node-9"],
    ] {
        etcd.etcdctl_as(&admin, args)
            .unwrap_or_else(|e| panic!("admin {args:?}: {e:#}"));
    }

    // Through meshd (weft-registry's etcd backend): node-3's namespace runs a meshd that calls
    // itself node-1 but has node-0's credentials.
    let record1 = etcd
        .get("/weft/nodes/node-1")
        .expect("get")
        .expect("node-1");
    let impostor = c.node(3);
    start_as(impostor, &etcd, &node0, &["--node-name", "node-1"]);
    let st = impostor
        .wait_status(Duration::from_secs(10), |st| {
            st["ownRecord"]
                .as_str()
                .is_some_and(|s| s.starts_with("not published"))
        })
        .expect("the impostor reports its record as not published");
    let why = st["ownRecord"].as_str().unwrap_or_default();
    eprintln!("impostor status: ownRecord = {why}");
    assert!(
        why.contains("permission denied") && why.contains("/weft/nodes/node-1"),
        "{why}"
    );
    let log = impostor.meshd_log();
    assert!(
        log.lines()
            .any(|l| l.contains("could not publish") && l.contains("permission denied")),
        "no permission error in the impostor's log:\n{log}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        etcd.get("/weft/nodes/node-1").expect("get").as_ref(),
        Some(&record1),
        "node-1's record was overwritten"
    );
    assert_eq!(
        etcd.lease_of("/weft/nodes/node-1").expect("lease"),
        Some(lease1),
        "node-1's record was rebound"
    );
    let key1 = c.node(1).public_key().expect("key");
    for i in [0, 2] {
        let p = c
            .node(i)
            .status_peer("node-1")
            .expect("status")
            .expect("node-1 is a peer");
        assert_eq!(p["publicKey"].as_str(), Some(key1.as_str()));
    }
    impostor
        .stop_meshd(libc::SIGTERM)
        .expect("stop the impostor");

    // A CA that did not sign etcd's certificate: meshd says so at once, it does not hang.
    let MeshdEtcdArgs { mut args, env } = etcd.meshd_args(Some(&node0)).expect("args");
    let ca = args
        .iter()
        .position(|a| a == "--etcd-ca")
        .expect("--etcd-ca")
        + 1;
    args[ca] = etcd
        .pki_file("other-ca.pem")
        .expect("other CA")
        .display()
        .to_string();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    impostor.start_meshd_env(&refs, &env).expect("start meshd");
    let st = impostor
        .wait_status(Duration::from_secs(5), |st| {
            st["registry"]
                .as_str()
                .is_some_and(|r| r.starts_with("unreachable"))
        })
        .expect("a wrong CA shows up as an unreachable registry");
    let why = st["registry"].as_str().unwrap_or_default();
    eprintln!("wrong CA after {:?}: {why}", started.elapsed());
    assert!(why.contains("UnknownIssuer"), "{why}");
    impostor.stop_meshd(libc::SIGTERM).expect("stop");
    c.assert_pods_ping(&pods.iter().collect::<Vec<_>>());
    eprintln!("done in {:?}", t0.elapsed());
}

/// etcd forgets a password login's token `--auth-token-ttl` (3 s here) after its last use;
/// etcd-client does not renew it. A meshd logged in with a password (node-0) keeps working well
/// past that: its lease stays alive (same lease), its watch sees a node that starts after more
/// than 2 token lifetimes (node-2, also with a password), and its next request (the delete of
/// `meshd leave`) succeeds at once, after etcd refused the stale token.
#[test]
fn etcd_password_login_outlives_its_token() {
    setup();
    let t0 = Instant::now();
    let c = Cluster::with_nodes(3).expect("cluster");
    let etcd = c
        .start_etcd_secure(&EtcdAuthOpts {
            cert_nodes: names(&["node-1"]),
            password_nodes: names(&["node-0", "node-2"]),
            auth_token_ttl: Some(3),
        })
        .expect("secured etcd");
    let pods: Vec<Pod> = (0..3).map(|i| c.node(i).add_pod(0).expect("pod")).collect();
    let (n0, n2) = (c.node(0), c.node(2));
    start_own(n0, &etcd);
    start_own(c.node(1), &etcd);
    c.wait_mesh_ready(READY).expect("mesh ready");
    let lease0 = etcd
        .lease_of("/weft/nodes/node-0")
        .expect("lease")
        .expect("node-0's record is lease-bound");
    let idle_from = Instant::now();
    let etcd_log_mark = std::fs::metadata(&etcd.log).map(|m| m.len()).unwrap_or(0);

    // node-0 sends no unary request now (only keep-alives and its open watch).
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(
        etcd.lease_of("/weft/nodes/node-0")
            .expect("lease")
            .as_deref(),
        Some(lease0.as_str()),
        "node-0's lease changed while its token expired\n{}",
        n0.meshd_log()
    );
    start_own(n2, &etcd);
    let seen = weft_tests::wait_until(Duration::from_secs(5), || {
        peer_names(n0).contains(&"node-2".to_string())
    });
    assert!(
        seen,
        "node-0 did not see node-2 {:?} after its token expired\n{}",
        idle_from.elapsed(),
        c.debug_report()
    );
    eprintln!(
        "node-0 saw node-2 {:?} after its last request",
        idle_from.elapsed()
    );
    c.wait_mesh_ready(READY).expect("mesh ready with node-2");
    c.assert_pods_ping(&[&pods[0], &pods[2]]);
    assert_eq!(status_str(n0, "registry"), "connected");
    assert_eq!(status_str(n0, "ownRecord"), "published");

    // A request with the stale token: etcd refuses it, meshd logs in again and it succeeds.
    let sock = n0.api_socket().display().to_string();
    let (ok, out, err) = n0
        .meshd_cli(&["leave", "--api-socket", &sock])
        .expect("leave");
    assert!(ok && out.contains("\"left\":true"), "leave: {out} {err}");
    assert!(
        !etcd
            .keys("/weft/")
            .expect("keys")
            .contains(&"/weft/nodes/node-0".to_string()),
        "node-0's record is still there after leave"
    );
    let etcd_log = std::fs::read_to_string(&etcd.log).unwrap_or_default();
    let since = etcd_log.get(etcd_log_mark as usize..).unwrap_or_default();
    assert!(
        since.contains("invalid auth token"),
        "etcd never refused node-0's stale token; did it expire?"
    );
    let log = n0.meshd_log();
    assert!(
        !log.contains("unreachable"),
        "node-0 found etcd unreachable:\n{log}"
    );
    eprintln!("done in {:?}", t0.elapsed());
}
