//! Key rotation end to end: 3 nodes with pods, 100 Hz pings on every ordered pod pair and a
//! rate-capped iperf3 TCP stream, while nodes rotate their keys with the real `keyctl rotate`
//! (one at a time, and all at once; with the dir registry and with a real etcd). Also meshd
//! SIGKILLed in each phase of a rotation, and rotation under 1% underlay loss against controls.
//! Zero pings lost, the TCP stream never stalls for more than 1 s, every node ends on a new key
//! with the key generation + 1, and the old key files are gone.
//! Need root and the workspace binaries; run serially:
//!   cargo build --workspace --bins && cargo test -p weft-tests --test rotation -- --test-threads=1

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use weft_tests::util::ns_cmd;
use weft_tests::{workspace_bin, BgPing, Cluster, Node, PingOpts, Pod};

const READY: Duration = Duration::from_secs(20);

fn setup() {
    weft_tests::set_nettool(env!("CARGO_BIN_EXE_weft-nettool"));
}

fn public_key(n: &Node) -> String {
    n.status_json().expect("status")["node"]["publicKey"]
        .as_str()
        .expect("publicKey")
        .to_string()
}

fn generation(n: &Node) -> u64 {
    n.status_json().expect("status")["node"]["keyGeneration"]
        .as_u64()
        .expect("keyGeneration")
}

/// Runs the real `keyctl ARGS` on the cluster's registry and returns its stdout; fails the test
/// on a non-zero exit. With etcd (`WEFT_TEST_ETCD` set by [`rotate_under_traffic`]) it runs in
/// the switch namespace, where etcd listens.
fn keyctl(c: &Cluster, args: &[&str]) -> String {
    let bin = workspace_bin("keyctl").expect("keyctl binary");
    let etcd = ETCD_SPEC.with(|e| e.borrow().clone());
    let mut cmd = match (&etcd, &c.switch_ns) {
        (Some(_), Some(sw)) => ns_cmd(sw, &bin),
        _ => Command::new(&bin),
    };
    cmd.args(args)
        .args([
            "--registry",
            &etcd.clone().unwrap_or_else(|| c.registry.spec()),
        ])
        .env_remove("WEFT_REGISTRY");
    let out = cmd.output().expect("running keyctl");
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "keyctl {args:?} failed ({}): {se}\n{so}\n{}",
        out.status,
        c.debug_report()
    );
    so
}

thread_local! {
    /// The etcd registry spec of the running test, if it uses etcd.
    static ETCD_SPEC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Asks node `n` to rotate (to key generation `generation`) with `keyctl rotate --node`.
fn request_rotation(c: &Cluster, n: &Node, generation: u64) {
    assert_eq!(generation, self::generation(n) + 1);
    keyctl(c, &["rotate", "--node", &n.name]);
}

/// Waits until node `n` has finished a rotation to `generation` (its status shows the new
/// generation and the rotation idle) and every other node knows its new key.
fn wait_rotated(c: &Cluster, n: &Node, generation: u64, within: Duration) {
    let t = Instant::now();
    let st = n
        .wait_status(within, |st| {
            st["node"]["keyGeneration"].as_u64() == Some(generation)
                && st["rotation"]["phase"].as_str() == Some("idle")
        })
        .unwrap_or_else(|e| panic!("{} did not rotate: {e:#}\n{}", n.name, c.debug_report()));
    let key = st["node"]["publicKey"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    for other in c.nodes.iter().filter(|o| o.index != n.index) {
        let left = within.saturating_sub(t.elapsed());
        other
            .wait_status(left.max(Duration::from_secs(3)), |st| {
                st["peers"].as_array().is_some_and(|ps| {
                    ps.iter().any(|p| {
                        p["name"].as_str() == Some(n.name.as_str())
                            && p["publicKey"].as_str() == Some(key.as_str())
                            && p["keyPairs"].as_u64() == Some(1)
                    })
                })
            })
            .unwrap_or_else(|e| {
                panic!(
                    "{} does not have {}'s new key alone: {e:#}\n{}",
                    other.name,
                    n.name,
                    c.debug_report()
                )
            });
    }
}

/// An iperf3 TCP stream from `from` to `to` capped at `mbit`, reporting every 0.2 s.
struct Iperf {
    server: Child,
    client: Child,
}

impl Iperf {
    fn start(from: &Pod, to: &Pod, mbit: u32, secs: u32) -> Iperf {
        let server = Command::new("ip")
            .args(["netns", "exec", &to.ns, "iperf3", "-s", "-1", "-p", "5299"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 server");
        std::thread::sleep(Duration::from_millis(300));
        let client = Command::new("ip")
            .args(["netns", "exec", &from.ns, "iperf3", "-c"])
            .arg(to.ip.to_string())
            .args(["-p", "5299", "-J", "-i", "0.2", "-b"])
            .arg(format!("{mbit}M"))
            .args(["-t", &secs.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 client");
        Iperf { server, client }
    }

    /// Bytes per 0.2 s interval as the receiver saw them.
    fn finish(mut self) -> Vec<(f64, u64)> {
        let out = self.client.wait_with_output().expect("iperf3 output");
        let _ = self.server.kill();
        let _ = self.server.wait();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("iperf3 JSON: {e}: {}", String::from_utf8_lossy(&out.stdout))
        });
        v["intervals"]
            .as_array()
            .expect("intervals")
            .iter()
            .map(|i| {
                (
                    i["sum"]["start"].as_f64().unwrap_or(0.0),
                    i["sum"]["bytes"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }
}

/// The longest run of intervals (0.2 s each) without a byte.
fn longest_stall(intervals: &[(f64, u64)]) -> Duration {
    let (mut run, mut best) = (0u32, 0u32);
    for (_, b) in intervals {
        if *b == 0 {
            run += 1;
            best = best.max(run);
        } else {
            run = 0;
        }
    }
    Duration::from_millis(200 * u64::from(best))
}

/// Runs the traffic, calls `rotate` meanwhile, and checks what the traffic saw. With `etcd`,
/// the registry is a real etcd in the switch namespace (meshd and keyctl both use it).
fn rotate_under_traffic(name: &str, etcd: bool, rotate: impl FnOnce(&Cluster)) {
    setup();
    let c = Cluster::with_nodes(3).expect("cluster");
    let etcd = etcd.then(|| c.start_etcd().expect("etcd"));
    let spec = etcd.as_ref().map(|e| e.spec());
    ETCD_SPEC.with(|e| *e.borrow_mut() = spec.clone());
    let pods: Vec<Pod> = (0..3).map(|i| c.node(i).add_pod(0).expect("pod")).collect();
    for n in &c.nodes {
        match &spec {
            Some(s) => n.start_meshd(&["--registry", s]).expect("meshd"),
            None => n.start_meshd(&[]).expect("meshd"),
        }
    }
    c.wait_mesh_ready(READY).expect("mesh ready");
    let before: Vec<String> = c.nodes.iter().map(public_key).collect();
    const SECS: u32 = 30;
    let opts = PingOpts::count(100 * SECS).interval(0.01).wait(1);
    let pings: Vec<(usize, usize, BgPing)> = (0..3)
        .flat_map(|a| (0..3).filter(move |b| *b != a).map(move |b| (a, b)))
        .map(|(a, b)| (a, b, pods[a].bg_ping(pods[b].ip, &opts).expect("ping")))
        .collect();
    let iperf = Iperf::start(&pods[0], &pods[1], 100, SECS - 2);
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    rotate(&c);
    eprintln!("{name}: rotations done in {:?}", t0.elapsed());
    let intervals = iperf.finish();
    for (a, b, p) in pings {
        let r = p.finish().expect("ping result");
        assert!(
            r.transmitted >= 100 * SECS - 50,
            "ping ran short: {}",
            r.output
        );
        assert_eq!(
            r.lost(),
            0,
            "{name}: pod {a} -> pod {b} lost {:?} of {}\n{}",
            r.lost_seqs(),
            r.transmitted,
            c.debug_report()
        );
    }
    let stall = longest_stall(&intervals);
    let total: u64 = intervals.iter().map(|(_, b)| b).sum();
    eprintln!(
        "{name}: TCP {} intervals, {:.1} MB, longest stall {stall:?}",
        intervals.len(),
        total as f64 / 1e6
    );
    assert!(intervals.len() >= 100, "iperf3 ran short: {intervals:?}");
    assert!(
        stall <= Duration::from_secs(1),
        "TCP stalled for {stall:?}: {intervals:?}"
    );
    for (i, n) in c.nodes.iter().enumerate() {
        assert_ne!(public_key(n), before[i], "{} kept its key", n.name);
        assert!(!n.state_dir().join("next.key").exists());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(n.state_dir().join("private.key"))
                .expect("key file")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
}

/// `keyctl rotate --all --wait` (one node at a time): zero pings lost at 100 Hz on every pod
/// pair, TCP never stalls over 1 s, and every node's peers end with its new key alone.
#[test]
fn rotate_all_one_at_a_time_loses_nothing() {
    rotate_under_traffic("one at a time", false, |c| rotate_all_with_keyctl(c, "1"));
}

/// `keyctl rotate --all --max-parallel N --wait`, then every node is checked done.
fn rotate_all_with_keyctl(c: &Cluster, max_parallel: &str) {
    let gens: Vec<u64> = c.nodes.iter().map(generation).collect();
    let args = [
        "rotate",
        "--all",
        "--max-parallel",
        max_parallel,
        "--wait",
        "--timeout",
        "60",
    ];
    keyctl(c, &args);
    for (n, g) in c.nodes.iter().zip(&gens) {
        wait_rotated(c, n, g + 1, Duration::from_secs(10));
    }
}

/// All three nodes rotate at once (`keyctl rotate --all --max-parallel 3 --wait`): up to four
/// key pairs per link while it lasts.
#[test]
fn rotate_all_at_once_loses_nothing() {
    rotate_under_traffic("all at once", false, |c| rotate_all_with_keyctl(c, "3"));
}

/// The same as [`rotate_all_at_once_loses_nothing`] with etcd as the registry: records,
/// announcements and rotation requests go through etcd (keyctl writes as a client of it).
#[test]
fn rotate_all_at_once_with_etcd_loses_nothing() {
    rotate_under_traffic("all at once, etcd", true, |c| {
        rotate_all_with_keyctl(c, "3")
    });
}

/// The record of `name` in the dir registry.
fn record(c: &Cluster, name: &str) -> serde_json::Value {
    let bytes = std::fs::read(c.registry.record_path(name)).expect("record");
    serde_json::from_slice(&bytes).expect("record JSON")
}

/// meshd SIGKILLed in each phase of a rotation (next key announced; handshaking on it; old key
/// just retired) and restarted: the rotation resumes or finishes, and the mesh ends consistent
/// (the registry, the node and every peer agree on one key, the generation went up by exactly
/// one, no next key left anywhere) and connected (every pod pings every other).
#[test]
fn sigkill_in_each_rotation_phase_ends_consistent_and_connected() {
    setup();
    let c = Cluster::with_nodes(3).expect("cluster");
    let pods: Vec<Pod> = (0..3).map(|i| c.node(i).add_pod(0).expect("pod")).collect();
    // Each phase lasts at least 3 s, so the test can kill meshd inside it. Trace-level logs, so
    // the secrecy check below covers everything meshd (and boringtun) can log.
    let env = vec![
        (
            "WEFT_TEST_ROTATION_DWELL_MS".to_string(),
            "3000".to_string(),
        ),
        ("RUST_LOG".to_string(), "trace".to_string()),
    ];
    for n in &c.nodes {
        n.start_meshd_env(&[], &env).expect("meshd");
    }
    c.wait_mesh_ready(READY).expect("mesh ready");
    let n0 = c.node(0);
    let read_key = |f: &str| std::fs::read_to_string(n0.state_dir().join(f)).ok();
    let mut secrets: Vec<String> = Vec::new();
    for phase in ["announced", "handshaking", "retired"] {
        let g = generation(n0);
        let old = public_key(n0);
        secrets.extend(read_key("private.key"));
        request_rotation(&c, n0, g + 1);
        n0.wait_status(Duration::from_secs(15), |st| match phase {
            "retired" => st["node"]["keyGeneration"].as_u64() == Some(g + 1),
            p => st["rotation"]["phase"].as_str() == Some(p),
        })
        .unwrap_or_else(|e| panic!("phase {phase} not reached: {e:#}"));
        secrets.extend(read_key("next.key"));
        n0.stop_meshd(libc::SIGKILL).expect("SIGKILL");
        let killed = Instant::now();
        n0.start_meshd(&[]).expect("restart");
        wait_rotated(&c, n0, g + 1, Duration::from_secs(30));
        let key = public_key(n0);
        assert_ne!(key, old, "{phase}: still the old key");
        let rec = record(&c, &n0.name);
        assert_eq!(
            rec["publicKey"].as_str(),
            Some(key.as_str()),
            "{phase}: {rec}"
        );
        assert_eq!(rec["keyGeneration"].as_u64(), Some(g + 1), "{phase}: {rec}");
        assert!(rec.get("nextPublicKey").is_none(), "{phase}: {rec}");
        assert!(!n0.state_dir().join("next.key").exists(), "{phase}");
        for a in &pods {
            for b in &pods {
                if a.node_index != b.node_index {
                    let r = a
                        .ping(b.ip, &PingOpts::count(3).interval(0.05).wait(2))
                        .expect("ping");
                    assert!(
                        r.all_received(),
                        "{phase}: {} -> {}: {}\n{}",
                        a.ip,
                        b.ip,
                        r.output,
                        c.debug_report()
                    );
                }
            }
        }
        eprintln!(
            "killed while {phase}: consistent and connected {:?} after the SIGKILL",
            killed.elapsed()
        );
    }
    // No private key (old, next or current; base64 or hex) in any log, in the registry or in
    // keyctl's output.
    secrets.extend(read_key("private.key"));
    secrets.sort();
    secrets.dedup();
    assert!(secrets.len() >= 4, "keys seen: {}", secrets.len());
    let hex: Vec<String> = secrets
        .iter()
        .map(|b64| {
            use base64::Engine as _;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .expect("key base64");
            raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
        })
        .collect();
    let keyctl_out = keyctl(&c, &["status", "--json"]) + &keyctl(&c, &["status"]);
    let trace_lines = n0
        .meshd_log()
        .lines()
        .filter(|l| l.contains("TRACE"))
        .count();
    assert!(trace_lines > 0, "meshd did not log at trace level");
    for h in &hex {
        for n in &c.nodes {
            let log = n.meshd_log().to_lowercase();
            assert!(
                !log.contains(h),
                "a private key (hex) is in {}'s log",
                n.name
            );
        }
        assert!(!keyctl_out.to_lowercase().contains(h));
    }
    let mut registry_text = String::new();
    for kind in ["nodes", "rotations"] {
        if let Ok(rd) = std::fs::read_dir(c.registry.dir.join(kind)) {
            for e in rd.flatten() {
                registry_text.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
    }
    for secret in &secrets {
        let secret = secret.trim();
        for n in &c.nodes {
            assert!(
                !n.meshd_log().contains(secret),
                "a private key of node-0 is in {}'s log",
                n.name
            );
        }
        assert!(
            !registry_text.contains(secret),
            "a private key is in the registry"
        );
    }
}

/// Pings at 100 Hz on every ordered pod pair for `secs`; runs `during` after 2 s. Returns the
/// pings lost (all pairs) and sent.
fn lost_over(pods: &[Pod], secs: u32, during: impl FnOnce()) -> (u32, u32) {
    let opts = PingOpts::count(100 * secs).interval(0.01).wait(1);
    let pings: Vec<BgPing> = (0..pods.len())
        .flat_map(|a| {
            (0..pods.len())
                .filter(move |b| *b != a)
                .map(move |b| (a, b))
        })
        .map(|(a, b)| pods[a].bg_ping(pods[b].ip, &opts).expect("ping"))
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    during();
    let (mut lost, mut sent) = (0, 0);
    for p in pings {
        let r = p.finish().expect("ping result");
        lost += r.lost();
        sent += r.transmitted;
    }
    (lost, sent)
}

/// With 1% loss on every node's underlay (nftables; this kernel has no sch_netem), all three
/// nodes rotate at once during a 20 s window of 100 Hz pings on every pod pair. The pings lost
/// must stay within the spread of control windows of the same length without rotation: at most
/// the worst control plus three standard deviations of a Poisson count at that level.
#[test]
fn rotation_under_one_percent_loss_adds_no_loss_beyond_the_control() {
    setup();
    let c = Cluster::with_nodes(3).expect("cluster");
    let pods: Vec<Pod> = (0..3).map(|i| c.node(i).add_pod(0).expect("pod")).collect();
    for n in &c.nodes {
        n.start_meshd(&[]).expect("meshd");
    }
    c.wait_mesh_ready(READY).expect("mesh ready");
    for n in &c.nodes {
        n.netem("loss 1%").expect("1% loss");
    }
    const SECS: u32 = 20;
    let mut controls = Vec::new();
    for _ in 0..2 {
        controls.push(lost_over(&pods, SECS, || {}));
    }
    let gens: Vec<u64> = c.nodes.iter().map(generation).collect();
    let rotated = lost_over(&pods, SECS, || {
        keyctl(
            &c,
            &[
                "rotate",
                "--all",
                "--max-parallel",
                "3",
                "--wait",
                "--timeout",
                "16",
            ],
        );
        for (n, g) in c.nodes.iter().zip(&gens) {
            wait_rotated(&c, n, g + 1, Duration::from_secs(5));
        }
    });
    controls.push(lost_over(&pods, SECS, || {}));
    let worst = controls.iter().map(|(l, _)| *l).max().unwrap_or(0);
    let bound = worst + (3.0 * f64::from(worst.max(1)).sqrt()).ceil() as u32;
    eprintln!(
        "1% loss: controls lost {:?}, with rotation {:?}; bound {bound}",
        controls, rotated
    );
    for (l, s) in &controls {
        assert!(*s >= 6 * (100 * SECS - 50), "control ran short: {s}");
        assert!(*l > 0, "1% loss was not applied ({l} of {s} lost)");
    }
    assert!(
        rotated.0 <= bound,
        "rotation lost {} pings, controls {:?} (bound {bound})",
        rotated.0,
        controls
    );
}
