//! End-to-end tests of `keyctl revoke` / `keyctl readmit` with the real keyctl binary and three
//! meshd nodes, on the dir registry and on a real etcd (Cluster::start_etcd, plain, no auth):
//!
//! 1. pods on all nodes ping each other; `keyctl status --json` lists the three keys;
//! 2. `keyctl revoke node-2` while pods ping at 20 Hz: node-2's traffic to and from the others
//!    stops within 1 s (measured, printed), node-0 <-> node-1 loses nothing, the others' `meshd
//!    status` no longer lists node-2 and refuses its record with reason "revoked...";
//! 3. node-2 restarted with the same key (it publishes the revoked key again): still refused;
//! 4. node-2 with a fresh key (private.key deleted, restarted): still refused (not approved);
//! 5. `keyctl readmit node-2 --public-key NEWKEY`: traffic restored within a few seconds;
//! 6. the readmitted node-2 rotates (`keyctl rotate --node node-2 --wait`): keyctl approves the
//!    next key it announces (a node cannot approve its own keys), no ping between node-0 and
//!    node-2 is lost at 50 Hz, and the revocation ends approving node-2's new key alone;
//! 7. no private key (the private.key files' base64) appears in keyctl's output, the registry or
//!    meshd's logs.
//!
//! Needs root, etcd and the workspace binaries (meshd, keyctl); run serially:
//!   cargo build --workspace --bins && cargo test -p weft-tests --test revoke -- --test-threads=1

use serde_json::Value;
use std::time::{Duration, Instant};
use weft_tests::util::{ns_cmd, run_timeout, workspace_bin};
use weft_tests::{BgPing, Cluster, Etcd, Node, PingOpts, Pod};

const READY: Duration = Duration::from_secs(20);
/// How long after `keyctl revoke` starts node-2's traffic must have stopped.
const CUTOFF_LIMIT: Duration = Duration::from_secs(1);
/// How long after `keyctl readmit` traffic must flow again.
const RESTORE_LIMIT: Duration = Duration::from_secs(5);

fn setup() {
    weft_tests::set_nettool(env!("CARGO_BIN_EXE_weft-nettool"));
}

/// The cluster, its etcd (if any), and keyctl's / meshd's registry flags.
struct Mesh {
    c: Cluster,
    etcd: Option<Etcd>,
    meshd_args: Vec<String>,
    keyctl_args: Vec<String>,
    pods: Vec<Pod>,
    /// Everything keyctl printed (checked for private keys at the end).
    keyctl_output: String,
}

impl Mesh {
    fn start(with_etcd: bool) -> Mesh {
        setup();
        let c = Cluster::with_nodes(3).expect("cluster");
        let etcd = with_etcd.then(|| c.start_etcd().expect("etcd"));
        let (meshd_args, keyctl_args) = match &etcd {
            Some(e) => (
                vec![
                    "--registry".to_string(),
                    e.spec(),
                    "--etcd-lease-ttl".into(),
                    "10".into(),
                ],
                vec!["--registry".to_string(), e.spec()],
            ),
            None => (vec![], vec!["--registry".to_string(), c.registry.spec()]),
        };
        let pods: Vec<Pod> = (0..3).map(|i| c.node(i).add_pod(0).expect("pod")).collect();
        let refs: Vec<&str> = meshd_args.iter().map(String::as_str).collect();
        for i in 0..3 {
            c.node(i).start_meshd(&refs).expect("start meshd");
        }
        c.wait_mesh_ready(READY).expect("mesh ready");
        Mesh {
            c,
            etcd,
            meshd_args,
            keyctl_args,
            pods,
            keyctl_output: String::new(),
        }
    }

    fn node(&self, i: usize) -> &Node {
        self.c.node(i)
    }

    /// Runs the real keyctl binary (in the switch namespace, which reaches etcd and sees the
    /// dir registry) with the registry flags; (exit code, stdout, stderr).
    fn keyctl(&mut self, args: &[&str]) -> (Option<i32>, String, String) {
        let bin = workspace_bin("keyctl").expect("keyctl binary");
        let sw = self.c.switch_ns.clone().expect("switch namespace");
        let mut cmd = ns_cmd(&sw, bin);
        cmd.args(args)
            .args(&self.keyctl_args)
            .env_remove("WEFT_REGISTRY");
        let out = run_timeout(&mut cmd, Duration::from_secs(30)).expect("keyctl");
        let (so, se) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        self.keyctl_output.push_str(&so);
        self.keyctl_output.push_str(&se);
        (out.status.code(), so, se)
    }

    fn keyctl_ok(&mut self, args: &[&str]) -> String {
        let (code, so, se) = self.keyctl(args);
        assert_eq!(code, Some(0), "keyctl {args:?} failed: {se}\n{so}");
        so
    }

    fn keyctl_status(&mut self) -> Value {
        let so = self.keyctl_ok(&["status", "--json"]);
        serde_json::from_str(&so).unwrap_or_else(|e| panic!("keyctl status --json: {e}: {so}"))
    }

    /// Every pod pings every other pod on another node.
    fn all_pods_ping(&self) {
        self.c
            .assert_pods_ping(&self.pods.iter().collect::<Vec<_>>());
    }

    /// The registry's whole contents as text (for the private key check).
    fn registry_dump(&self) -> String {
        match &self.etcd {
            Some(e) => e
                .etcdctl(&["get", "--prefix", "/weft/"])
                .expect("etcdctl get"),
            None => {
                let mut s = String::new();
                dump_dir(&self.c.registry.dir, &mut s);
                s
            }
        }
    }
}

fn dump_dir(dir: &std::path::Path, out: &mut String) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            dump_dir(&p, out);
        } else if let Ok(t) = std::fs::read_to_string(&p) {
            out.push_str(&t);
        }
    }
}

fn private_key(n: &Node) -> String {
    std::fs::read_to_string(n.state_dir().join("private.key"))
        .expect("private.key")
        .trim()
        .to_string()
}

fn public_key(n: &Node) -> String {
    n.status_json().expect("status")["node"]["publicKey"]
        .as_str()
        .expect("publicKey")
        .to_string()
}

fn keyctl_node<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == name))
        .unwrap_or_else(|| panic!("{name} missing from keyctl status: {status}"))
}

/// The reason node `n`'s meshd gives for refusing `name`, if it does.
fn refused_reason(n: &Node, name: &str) -> Option<String> {
    n.status_json().ok()?["refusedRecords"][name]
        .as_str()
        .map(String::from)
}

/// A 20 Hz ping whose replies the test timestamps itself while it polls.
struct Probe {
    what: String,
    bg: BgPing,
    seen: usize,
    last_reply: Option<Instant>,
}

impl Probe {
    fn start(what: &str, from: &Pod, to: &Pod, secs: f64) -> Probe {
        let bg = from
            .bg_ping(
                to.ip,
                &PingOpts::count((secs / 0.05) as u32).interval(0.05).wait(1),
            )
            .expect("bg ping");
        Probe {
            what: what.into(),
            bg,
            seen: 0,
            last_reply: None,
        }
    }

    fn poll(&mut self) {
        let n = self.bg.replies_so_far();
        if n != self.seen {
            self.seen = n;
            self.last_reply = Some(Instant::now());
        }
    }
}

/// Polls the probes until `until`.
fn watch(probes: &mut [Probe], until: Instant) {
    while Instant::now() < until {
        for p in probes.iter_mut() {
            p.poll();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until a 20 Hz ping from `from` to `to` gets a reply; how long it took.
fn time_to_first_reply(from: &Pod, to: &Pod, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let bg = from
        .bg_ping(
            to.ip,
            &PingOpts::count((limit.as_secs_f64() / 0.05) as u32 + 1)
                .interval(0.05)
                .wait(1),
        )
        .expect("bg ping");
    let got = weft_tests::wait_until(limit, || bg.replies_so_far() > 0);
    let took = start.elapsed();
    let _ = bg.stop();
    got.then_some(took)
}

/// Pings from `from` to `to` must all fail.
fn assert_no_traffic(m: &Mesh, from: &Pod, to: &Pod, when: &str) {
    let r = from
        .ping(to.ip, &PingOpts::count(20).interval(0.05).wait(1))
        .expect("ping");
    assert_eq!(
        r.received,
        0,
        "{when}: {} -> {} got {} replies\n{}",
        from.ip,
        to.ip,
        r.received,
        m.c.debug_report()
    );
}

fn revoke_scenario(with_etcd: bool) {
    let label = if with_etcd { "etcd" } else { "dir" };
    let mut m = Mesh::start(with_etcd);
    m.all_pods_ping();
    let mut private_keys: Vec<String> = (0..3).map(|i| private_key(m.node(i))).collect();
    let keys: Vec<String> = (0..3).map(|i| public_key(m.node(i))).collect();

    // keyctl status --json: every node with its published key, generation 1, nothing pending.
    let st = m.keyctl_status();
    assert_eq!(st["nodes"].as_array().map(Vec::len), Some(3), "{st}");
    for (i, k) in keys.iter().enumerate() {
        let n = keyctl_node(&st, &format!("node-{i}"));
        assert_eq!(n["publicKey"].as_str(), Some(k.as_str()), "{n}");
        assert_eq!(n["fingerprint"].as_str(), Some(&k[..8]), "{n}");
        assert_eq!(n["keyGeneration"], 1, "{n}");
        assert!(n["keyAgeSecs"].as_u64().is_some_and(|a| a < 600), "{n}");
        assert_eq!(n["rotation"]["state"], "idle", "{n}");
        assert_eq!(n["revocation"], Value::Null, "{n}");
        assert_eq!(n["admitted"], true, "{n}");
    }

    // Revoke node-2 while pods ping at 20 Hz: into node-2, out of node-2, and (the control)
    // between node-0 and node-1.
    let (p0, p1, p2) = (m.pods[0].clone(), m.pods[1].clone(), m.pods[2].clone());
    let mut probes = vec![
        Probe::start("pod0 -> pod2", &p0, &p2, 6.0),
        Probe::start("pod2 -> pod1", &p2, &p1, 6.0),
        Probe::start("pod0 -> pod1", &p0, &p1, 6.0),
    ];
    watch(&mut probes, Instant::now() + Duration::from_millis(1000));
    for p in &probes {
        assert!(
            p.seen >= 10,
            "{}: only {} replies before the revoke",
            p.what,
            p.seen
        );
    }
    let t0 = Instant::now();
    let out = m.keyctl_ok(&["revoke", "node-2"]);
    let keyctl_took = t0.elapsed();
    assert!(out.contains("revoked node-2"), "{out}");
    watch(&mut probes, t0 + Duration::from_millis(3500));
    let results: Vec<(String, Option<Instant>, weft_tests::PingResult)> = probes
        .into_iter()
        .map(|mut p| {
            p.poll();
            (p.what, p.last_reply, p.bg.stop())
        })
        .collect();
    // Milliseconds from `keyctl revoke` starting to `t` (negative: before).
    let ms_after = |t: Instant| -> f64 {
        if t >= t0 {
            t.duration_since(t0).as_secs_f64() * 1000.0
        } else {
            -(t0.duration_since(t).as_secs_f64() * 1000.0)
        }
    };
    let mut cutoffs = Vec::new();
    for (what, last, r) in &results[..2] {
        let cutoff = last.map_or(Duration::ZERO, |l| l.saturating_duration_since(t0));
        let last_seq = r.replied_seqs.iter().max().copied().unwrap_or(0);
        eprintln!(
            "[{label}] {what}: last reply seen {:+.0} ms from `keyctl revoke` starting (keyctl \
             ran {:.0} ms); {}/{} replies, none after seq {last_seq}",
            last.map_or(f64::NAN, ms_after),
            keyctl_took.as_secs_f64() * 1000.0,
            r.received,
            r.transmitted,
        );
        assert!(
            cutoff <= CUTOFF_LIMIT,
            "[{label}] {what}: traffic still flowed {cutoff:?} after keyctl revoke started\n{}",
            m.c.debug_report()
        );
        // It stopped for good: at least 2 s of 20 Hz packets after the last reply got none.
        assert!(
            r.transmitted >= last_seq + 40,
            "{what}: only {} packets after the last reply: {r:?}",
            r.transmitted - last_seq
        );
        cutoffs.push(cutoff);
    }
    let control = &results[2].2;
    assert!(
        control.lost() <= 1,
        "[{label}] node-0 <-> node-1 lost {} of {} while node-2 was revoked",
        control.lost(),
        control.transmitted
    );
    eprintln!(
        "[{label}] revocation cut-off: {:.0} ms (into node-2), {:.0} ms (out of node-2); control lost {}/{}",
        cutoffs[0].as_secs_f64() * 1000.0,
        cutoffs[1].as_secs_f64() * 1000.0,
        control.lost(),
        control.transmitted
    );

    // The others dropped node-2 and say why; node-2 itself logs that it is revoked.
    for i in 0..2 {
        let n = m.node(i);
        let names = n.status_peer_names().expect("status");
        assert!(
            !names.contains(&"node-2".to_string()),
            "node-{i}: {names:?}"
        );
        let why = refused_reason(n, "node-2").expect("node-2 refused");
        assert!(why.starts_with("revoked"), "node-{i}: {why}");
        assert!(why.contains(&keys[2][..8]), "node-{i}: {why}");
    }
    assert!(
        weft_tests::wait_until(Duration::from_secs(3), || m
            .node(2)
            .meshd_log()
            .contains("THIS NODE IS REVOKED")),
        "node-2 did not log that it is revoked"
    );
    let st = m.keyctl_status();
    let n2 = keyctl_node(&st, "node-2");
    assert_eq!(n2["revocation"]["state"], "revoked", "{n2}");
    assert_eq!(n2["admitted"], false, "{n2}");
    assert_eq!(
        n2["revocation"]["revokedKeys"][0].as_str(),
        Some(keys[2].as_str())
    );
    let table = m.keyctl_ok(&["status"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("node-2") && l.contains("REVOKED")),
        "{table}"
    );

    // node-2 restarted with the same key publishes it again: still refused.
    m.node(2).restart_meshd().expect("restart node-2");
    assert_eq!(public_key(m.node(2)), keys[2]);
    std::thread::sleep(Duration::from_secs(2));
    assert_no_traffic(&m, &p0, &p2, "same key republished");
    assert_no_traffic(&m, &p2, &p1, "same key republished");
    for i in 0..2 {
        let why = refused_reason(m.node(i), "node-2").expect("refused");
        assert!(why.contains("was revoked"), "node-{i}: {why}");
    }

    // A fresh key the node merely publishes: still refused (not approved).
    let n2node = m.node(2);
    n2node.stop_meshd(libc::SIGTERM).expect("stop node-2");
    std::fs::remove_file(n2node.state_dir().join("private.key")).expect("delete private.key");
    let refs: Vec<&str> = m.meshd_args.iter().map(String::as_str).collect();
    n2node.start_meshd(&refs).expect("start node-2");
    let new_key = public_key(m.node(2));
    assert_ne!(new_key, keys[2]);
    private_keys.push(private_key(m.node(2)));
    let published = weft_tests::wait_until(Duration::from_secs(10), || {
        let st = m.keyctl_status();
        keyctl_node(&st, "node-2")["publicKey"].as_str() == Some(new_key.as_str())
    });
    assert!(published, "node-2's new key never reached the registry");
    let refused_fresh = weft_tests::wait_until(Duration::from_secs(3), || {
        (0..2).all(|i| {
            refused_reason(m.node(i), "node-2").is_some_and(|w| w.contains("not the key approved"))
        })
    });
    assert!(
        refused_fresh,
        "fresh key not refused\n{}",
        m.c.debug_report()
    );
    assert_no_traffic(&m, &p0, &p2, "fresh unapproved key");
    assert_no_traffic(&m, &p2, &p1, "fresh unapproved key");
    // The old key cannot be approved.
    let (code, _, err) = m.keyctl(&["readmit", "node-2", "--public-key", &keys[2]]);
    assert_eq!(code, Some(1), "{err}");

    // Readmit with the new key: traffic flows again within a few seconds, both ways.
    let t1 = Instant::now();
    m.keyctl_ok(&["readmit", "node-2", "--public-key", &new_key]);
    let back = time_to_first_reply(&p0, &p2, RESTORE_LIMIT);
    let restored = t1.elapsed();
    assert!(
        back.is_some(),
        "[{label}] no traffic to node-2 within {RESTORE_LIMIT:?} of readmit\n{}",
        m.c.debug_report()
    );
    eprintln!(
        "[{label}] traffic restored {:.0} ms after `keyctl readmit` started",
        restored.as_secs_f64() * 1000.0
    );
    m.c.wait_mesh_ready(READY)
        .expect("mesh ready after readmit");
    m.all_pods_ping();
    for i in 0..2 {
        assert_eq!(refused_reason(m.node(i), "node-2"), None, "node-{i}");
        assert!(m
            .node(i)
            .status_peer_names()
            .expect("status")
            .contains(&"node-2".to_string()));
    }
    let st = m.keyctl_status();
    let n2 = keyctl_node(&st, "node-2");
    assert_eq!(n2["revocation"]["state"], "readmitted", "{n2}");
    assert_eq!(n2["admitted"], true, "{n2}");
    assert_eq!(n2["keyGeneration"], 2, "{n2}");
    assert_eq!(
        n2["revocation"]["approvedKey"].as_str(),
        Some(new_key.as_str())
    );

    // The readmitted node rotates: keyctl approves the next key node-2 announces, node-2 stays
    // connected (50 Hz pings both ways lose nothing), and its new key ends the approved one.
    let opts = PingOpts::count(600).interval(0.02).wait(1);
    let pings = [
        p0.bg_ping(p2.ip, &opts).expect("ping"),
        p2.bg_ping(p0.ip, &opts).expect("ping"),
    ];
    std::thread::sleep(Duration::from_secs(1));
    let t2 = Instant::now();
    let out = m.keyctl_ok(&["rotate", "--node", "node-2", "--wait", "--timeout", "60"]);
    eprintln!("[{label}] readmitted node-2 rotated in {:?}", t2.elapsed());
    assert!(out.contains("approved its next key"), "{out}");
    let rotated_key = public_key(m.node(2));
    assert_ne!(rotated_key, new_key);
    private_keys.push(private_key(m.node(2)));
    for (i, p) in pings.into_iter().enumerate() {
        let r = p.finish().expect("ping result");
        assert_eq!(
            r.lost(),
            0,
            "[{label}] ping {i} lost {:?} while the readmitted node rotated\n{}",
            r.lost_seqs(),
            m.c.debug_report()
        );
    }
    let st = m.keyctl_status();
    let n2 = keyctl_node(&st, "node-2");
    assert_eq!(n2["revocation"]["state"], "readmitted", "{n2}");
    assert_eq!(n2["admitted"], true, "{n2}");
    assert_eq!(n2["keyGeneration"], 3, "{n2}");
    assert_eq!(
        n2["revocation"]["approvedKey"].as_str(),
        Some(rotated_key.as_str()),
        "{n2}"
    );
    assert!(n2["revocation"]["approvedNextKey"].is_null(), "{n2}");
    m.all_pods_ping();

    // No private key anywhere keyctl or meshd wrote or printed.
    let registry = m.registry_dump();
    assert!(registry.contains(&keys[2]), "the dump holds the registry");
    let logs: String = (0..3).map(|i| m.node(i).meshd_log()).collect();
    for k in &private_keys {
        assert_eq!(k.len(), 44, "private.key holds one base64 key");
        assert!(
            !m.keyctl_output.contains(k.as_str()),
            "keyctl printed a private key"
        );
        assert!(
            !registry.contains(k.as_str()),
            "the registry holds a private key"
        );
        assert!(
            !logs.contains(k.as_str()),
            "a meshd log holds a private key"
        );
    }
}

#[test]
fn dir_revoke_cuts_off_within_1s_and_readmit_needs_the_approved_key() {
    revoke_scenario(false);
}

#[test]
fn etcd_revoke_cuts_off_within_1s_and_readmit_needs_the_approved_key() {
    revoke_scenario(true);
}
