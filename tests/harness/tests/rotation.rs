//! Key and PSK rotation end to end: 3 nodes with pods, 100 Hz pings on every ordered pod pair
//! and a rate-capped iperf3 TCP stream, while nodes rotate their keys with the real `keyctl
//! rotate` (one at a time, and all at once; with the dir registry and with a real etcd) or the
//! cluster PSKs with `keyctl psk rotate`. Also meshd SIGKILLed in each phase of a rotation,
//! rotation under 1% underlay loss against controls, and a node with the wrong cluster secret.
//! Zero pings lost, the TCP stream never stalls for more than 1 s, every node ends on a new key
//! with the key generation + 1 (or on the new PSK generation), and the old key files are gone.
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

/// A cluster secret for tests (32 bytes, base64).
const SECRET: &str = "q0E9bGmSIcHGYkHnUczk3P/U6N1ZRCpB5cFa4ZDl4Xo=";
const WRONG_SECRET: &str = "Lt0Y3xw3NQhHxu9sJ9m0m1qLw8m0q7Wq5Q2nQy0b4V8=";

/// Writes `secret` to node `n`'s cluster secret file (0600) and returns the meshd flags for it.
fn secret_flags(n: &Node, secret: &str) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = n.dir.join("cluster-secret");
    std::fs::write(&path, format!("{secret}\n")).expect("secret file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    vec![
        "--cluster-secret-file".into(),
        path.to_string_lossy().into_owned(),
    ]
}

/// A cluster under traffic, after the traffic checks passed.
struct Run {
    c: Cluster,
    /// Every node's public key before the action.
    before: Vec<String>,
    _etcd: Option<weft_tests::Etcd>,
}

/// Runs the traffic, calls `rotate` meanwhile, and checks what the traffic saw. With `etcd`,
/// the registry is a real etcd in the switch namespace (meshd and keyctl both use it); with
/// `secret`, every node holds the cluster secret (pairs use PSKs).
fn under_traffic(name: &str, etcd: bool, secret: bool, rotate: impl FnOnce(&Cluster)) -> Run {
    setup();
    let c = Cluster::with_nodes(3).expect("cluster");
    let (etcd, spec) = registry_for(&c, etcd);
    let pods: Vec<Pod> = (0..3).map(|i| c.node(i).add_pod(0).expect("pod")).collect();
    for n in &c.nodes {
        let mut args: Vec<String> = Vec::new();
        if let Some(s) = &spec {
            args.extend(["--registry".to_string(), s.clone()]);
        }
        if secret {
            args.extend(secret_flags(n, SECRET));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        n.start_meshd(&args).expect("meshd");
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
    Run {
        c,
        before,
        _etcd: etcd,
    }
}

/// [`under_traffic`] with a key rotation: then every node is on a new key, with one 0600 key
/// file and no next key left.
fn rotate_under_traffic(name: &str, etcd: bool, rotate: impl FnOnce(&Cluster)) {
    let Run { c, before, .. } = under_traffic(name, etcd, false, rotate);
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

/// The record of `name` in the dir registry, or in etcd.
fn record(c: &Cluster, etcd: Option<&weft_tests::Etcd>, name: &str) -> serde_json::Value {
    let bytes = match etcd {
        Some(e) => e
            .get(&format!("/weft/nodes/{name}"))
            .expect("etcd get")
            .expect("record in etcd")
            .into_bytes(),
        None => std::fs::read(c.registry.record_path(name)).expect("record"),
    };
    serde_json::from_slice(&bytes).expect("record JSON")
}

/// meshd SIGKILLed in each phase of a rotation (next key announced; handshaking on it; old key
/// just retired) and restarted: the rotation resumes or finishes, and the mesh ends consistent
/// (the registry, the node and every peer agree on one key, the generation went up by exactly
/// one, no next key left anywhere) and connected (every pod pings every other).
#[test]
fn sigkill_in_each_rotation_phase_ends_consistent_and_connected() {
    sigkill_in_each_phase(false);
}

/// [`sigkill_in_each_rotation_phase_ends_consistent_and_connected`] with etcd as the registry
/// (the killed meshd's record stays bound to its old lease until the restarted one rewrites it
/// on a new lease).
#[test]
fn sigkill_in_each_rotation_phase_with_etcd_ends_consistent_and_connected() {
    sigkill_in_each_phase(true);
}

/// With `with_etcd`, starts etcd in the cluster and makes it keyctl's registry; returns it and
/// the spec meshd takes as `--registry` (`None`: the cluster's dir registry).
fn registry_for(c: &Cluster, with_etcd: bool) -> (Option<weft_tests::Etcd>, Option<String>) {
    let etcd = with_etcd.then(|| c.start_etcd().expect("etcd"));
    let spec = etcd.as_ref().map(|e| e.spec());
    ETCD_SPEC.with(|e| *e.borrow_mut() = spec.clone());
    (etcd, spec)
}

fn sigkill_in_each_phase(with_etcd: bool) {
    setup();
    let c = Cluster::with_nodes(3).expect("cluster");
    let (etcd, spec) = registry_for(&c, with_etcd);
    let args: Vec<&str> = spec
        .iter()
        .flat_map(|s| ["--registry", s.as_str()])
        .collect();
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
        n.start_meshd_env(&args, &env).expect("meshd");
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
        n0.start_meshd(&args).expect("restart");
        wait_rotated(&c, n0, g + 1, Duration::from_secs(30));
        let key = public_key(n0);
        assert_ne!(key, old, "{phase}: still the old key");
        let rec = record(&c, etcd.as_ref(), &n0.name);
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
    // No private key (old, next or current; base64, hex or raw bytes) in any log, in the
    // registry or in keyctl's output.
    secrets.extend(read_key("private.key"));
    secrets.sort();
    secrets.dedup();
    assert!(secrets.len() >= 4, "keys seen: {}", secrets.len());
    let keyctl_out = keyctl(&c, &["status", "--json"]) + &keyctl(&c, &["status", "--peers"]);
    let trace_lines = n0
        .meshd_log()
        .lines()
        .filter(|l| l.contains("TRACE"))
        .count();
    assert!(trace_lines > 0, "meshd did not log at trace level");
    let mut texts: Vec<(String, Vec<u8>)> = c
        .nodes
        .iter()
        .map(|n| (format!("{} log", n.name), n.meshd_log().into_bytes()))
        .collect();
    texts.push(("keyctl".into(), keyctl_out.into_bytes()));
    let mut registry_text = Vec::new();
    match &etcd {
        Some(e) => {
            for (_, v) in e.get_prefix("/weft/").expect("etcd get") {
                registry_text.extend(v);
            }
        }
        None => {
            for kind in ["nodes", "rotations", "health"] {
                if let Ok(rd) = std::fs::read_dir(c.registry.dir.join(kind)) {
                    for e in rd.flatten() {
                        registry_text.extend(std::fs::read(e.path()).unwrap_or_default());
                    }
                }
            }
        }
    }
    assert!(
        String::from_utf8_lossy(&registry_text).contains("publicKey"),
        "registry dump is empty"
    );
    texts.push(("the registry".into(), registry_text));
    let raw: Vec<Vec<u8>> = secrets.iter().map(|s| b64(s)).collect();
    assert_secrets_absent(&raw, &texts);
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
    rotation_under_loss(false);
}

/// The same with etcd as the registry (its TCP traffic crosses the same lossy underlay).
#[test]
fn rotation_under_one_percent_loss_with_etcd_adds_no_loss_beyond_the_control() {
    rotation_under_loss(true);
}

fn rotation_under_loss(with_etcd: bool) {
    setup();
    let c = Cluster::with_nodes(3).expect("cluster");
    let (_etcd, spec) = registry_for(&c, with_etcd);
    let args: Vec<&str> = spec
        .iter()
        .flat_map(|s| ["--registry", s.as_str()])
        .collect();
    let pods: Vec<Pod> = (0..3).map(|i| c.node(i).add_pod(0).expect("pod")).collect();
    for n in &c.nodes {
        n.start_meshd(&args).expect("meshd");
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
        "1% loss{}: controls lost {:?}, with rotation {:?}; bound {bound}",
        if with_etcd { " (etcd)" } else { "" },
        controls,
        rotated
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

/// The PSK generation of node `n` and, per peer, of the pair and its key pair count.
fn psk_generations(n: &Node) -> serde_json::Value {
    let st = n.status_json().unwrap_or_default();
    let peers: Vec<serde_json::Value> = st["peers"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| serde_json::json!([p["name"], p["pskGeneration"], p["keyPairs"]]))
                .collect()
        })
        .unwrap_or_default();
    serde_json::json!({"own": st["node"]["pskGeneration"], "peers": peers})
}

/// Waits until every node and every pair is on PSK generation `g` with one slot per link.
fn wait_psk(c: &Cluster, g: u64, within: Duration) {
    for n in &c.nodes {
        n.wait_status(within, |st| {
            st["node"]["pskGeneration"].as_u64() == Some(g)
                && st["peers"].as_array().is_some_and(|ps| {
                    ps.len() == c.nodes.len() - 1
                        && ps.iter().all(|p| {
                            p["pskGeneration"].as_u64() == Some(g)
                                && p["keyPairs"].as_u64() == Some(1)
                        })
                })
        })
        .unwrap_or_else(|e| {
            panic!(
                "{} not on PSK generation {g}: {e:#} {}\n{}",
                n.name,
                psk_generations(n),
                c.debug_report()
            )
        });
    }
}

/// `keyctl psk rotate --wait`, then all three nodes rotate their keys at once (PSKs follow the
/// keys), then `keyctl psk rotate` again, all under 100 Hz pings and TCP: nothing lost, every
/// pair ends on PSK generation 2 with the new keys. Then no private key, cluster secret or
/// derived PSK (base64 or hex) is in any log (trace level), the registry or keyctl's output.
#[test]
fn psk_rotation_under_traffic_loses_nothing_and_never_shows_a_psk() {
    let mut keys_seen: Vec<Vec<String>> = Vec::new();
    let Run { c, before, .. } = under_traffic("psk", false, true, |c| {
        wait_psk(c, 0, Duration::from_secs(5));
        keyctl(c, &["psk", "rotate", "--wait", "--timeout", "20"]);
        wait_psk(c, 1, Duration::from_secs(10));
        keys_seen.push(c.nodes.iter().map(public_key).collect());
        rotate_all_with_keyctl(c, "3");
        keys_seen.push(c.nodes.iter().map(public_key).collect());
        let out = keyctl(c, &["psk", "rotate", "--wait", "--timeout", "20"]);
        assert!(out.contains("generation 2"), "{out}");
        wait_psk(c, 2, Duration::from_secs(10));
    });
    for (i, n) in c.nodes.iter().enumerate() {
        assert_ne!(public_key(n), before[i], "{} kept its key", n.name);
    }
    let status = keyctl(&c, &["status"]);
    assert!(
        status.contains("cluster PSK generation 2: 3 nodes on it, 0 behind"),
        "{status}"
    );
    let mut sets = vec![before.clone()];
    sets.extend(keys_seen);
    check_no_secrets(&c, &sets, 2, status);
}

/// No private key, cluster secret ([`SECRET`], [`WRONG_SECRET`]) or PSK derived for any pair
/// of `key_sets` at generations `0..=gens` appears in any meshd log, the registry or keyctl's
/// output (`keyctl_out` plus a fresh `status --json`).
fn check_no_secrets(c: &Cluster, key_sets: &[Vec<String>], gens: u64, keyctl_out: String) {
    let secret = weft_core::psk::ClusterSecret::from_base64(SECRET).expect("secret");
    let mut forbidden: Vec<Vec<u8>> = vec![b64(SECRET), b64(WRONG_SECRET)];
    for keys in key_sets {
        let keys: Vec<weft_core::PublicKey> =
            keys.iter().map(|k| k.parse().expect("key")).collect();
        for g in 0..=gens {
            for a in 0..keys.len() {
                for b in a + 1..keys.len() {
                    forbidden.push(secret.derive(g, &keys[a], &keys[b]).bytes().to_vec());
                }
            }
        }
    }
    for n in &c.nodes {
        forbidden.push(b64(&std::fs::read_to_string(
            n.state_dir().join("private.key"),
        )
        .expect("key")));
    }
    let mut texts: Vec<(String, Vec<u8>)> = c
        .nodes
        .iter()
        .map(|n| (format!("{} log", n.name), n.meshd_log().into_bytes()))
        .collect();
    texts.push((
        "keyctl".into(),
        (keyctl(c, &["status", "--json"]) + &keyctl_out).into_bytes(),
    ));
    for kind in ["nodes", "rotations", "psk"] {
        if let Ok(rd) = std::fs::read_dir(c.registry.dir.join(kind)) {
            for e in rd.flatten() {
                texts.push((
                    e.path().display().to_string(),
                    std::fs::read(e.path()).unwrap_or_default(),
                ));
            }
        }
    }
    assert_secrets_absent(&forbidden, &texts);
}

fn b64(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .expect("base64")
}

/// No secret of `forbidden` appears in any text: as base64, as hex (either case) or raw.
fn assert_secrets_absent(forbidden: &[Vec<u8>], texts: &[(String, Vec<u8>)]) {
    use base64::Engine as _;
    for raw in forbidden {
        let b = base64::engine::general_purpose::STANDARD.encode(raw);
        let hex: String = raw.iter().map(|x| format!("{x:02x}")).collect();
        for (name, text) in texts {
            let lower = String::from_utf8_lossy(text).to_lowercase();
            assert!(
                !String::from_utf8_lossy(text).contains(&b),
                "a secret (base64) is in {name}"
            );
            assert!(!lower.contains(&hex), "a secret (hex) is in {name}");
            assert!(
                !text.windows(raw.len()).any(|w| w == raw.as_slice()),
                "a secret (raw bytes) is in {name}"
            );
        }
    }
}

/// `keyctl psk rotate` with etcd as the registry, under the same traffic.
#[test]
fn psk_rotation_with_etcd_loses_nothing() {
    under_traffic("psk, etcd", true, true, |c| {
        wait_psk(c, 0, Duration::from_secs(5));
        keyctl(c, &["psk", "rotate", "--wait", "--timeout", "20"]);
        wait_psk(c, 1, Duration::from_secs(10));
    });
}

/// A node whose cluster secret differs reaches no one and no one reaches it, while the others
/// stay connected; with the right secret (restarted) it is back.
#[test]
fn wrong_cluster_secret_reaches_no_one() {
    setup();
    let c = Cluster::with_nodes(3).expect("cluster");
    let pods: Vec<Pod> = (0..3).map(|i| c.node(i).add_pod(0).expect("pod")).collect();
    let trace = vec![("RUST_LOG".to_string(), "trace".to_string())];
    for (i, n) in c.nodes.iter().enumerate() {
        let flags = secret_flags(n, if i == 2 { WRONG_SECRET } else { SECRET });
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        n.start_meshd_env(&flags, &trace).expect("meshd");
    }
    // node-0 and node-1 connect.
    c.node(0)
        .wait_status(READY, |st| {
            st["peers"].as_array().is_some_and(|ps| {
                ps.iter().any(|p| {
                    p["name"].as_str() == Some("node-1") && !p["latestHandshakeSecsAgo"].is_null()
                })
            })
        })
        .expect("node-0 and node-1 connect");
    let quick = PingOpts::count(5).interval(0.2).wait(1);
    let r = pods[0].ping(pods[1].ip, &quick).expect("ping");
    assert!(r.all_received(), "{}", r.output);
    // Give node-2 the time of a few handshake attempts.
    std::thread::sleep(Duration::from_secs(6));
    for (a, b) in [(0, 2), (2, 0), (1, 2), (2, 1)] {
        let r = pods[a].ping(pods[b].ip, &quick).expect("ping");
        assert_eq!(
            r.received, 0,
            "pod {a} -> pod {b} got through with a wrong secret: {}",
            r.output
        );
    }
    for n in &c.nodes {
        let st = n.status_json().expect("status");
        for p in st["peers"].as_array().expect("peers") {
            let wrong = n.index == 2 || p["name"].as_str() == Some("node-2");
            assert_eq!(
                p["latestHandshakeSecsAgo"].is_null(),
                wrong,
                "{} with {}: {p}",
                n.name,
                p["name"]
            );
        }
    }
    // `keyctl status --peers` shows the same from the nodes' health reports: every link of
    // node-2 without a handshake, node-0 <-> node-1 up on PSK generation 0.
    let expected = |v: &serde_json::Value| {
        let links = v["links"].as_array().cloned().unwrap_or_default();
        links.len() == 6
            && links.iter().all(|l| {
                let wrong = l["node"] == "node-2" || l["peer"] == "node-2";
                let want = if wrong { "no-handshake" } else { "up" };
                l["state"] == want && (wrong || l["pskGeneration"] == 0)
            })
    };
    let mut seen = serde_json::Value::Null;
    let ok = weft_tests::wait_until(Duration::from_secs(8), || {
        seen =
            serde_json::from_str(&keyctl(&c, &["status", "--peers", "--json"])).unwrap_or_default();
        expected(&seen)
    });
    assert!(ok, "keyctl status --peers: {seen:#}");
    let table = keyctl(&c, &["status", "--peers"]);
    assert!(
        table.contains("2 links up, 0 idle, 4 without a handshake"),
        "{table}"
    );
    // The right secret: node-2 is back.
    let n2 = c.node(2);
    n2.stop_meshd(libc::SIGTERM).expect("stop");
    let flags = secret_flags(n2, SECRET);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    n2.start_meshd(&flags).expect("restart");
    c.wait_mesh_ready(READY).expect("mesh ready");
    c.assert_pods_ping(&pods.iter().collect::<Vec<_>>());
    // A PSK rotation, then the secrecy check over trace-level logs.
    let out = keyctl(&c, &["psk", "rotate", "--wait", "--timeout", "20"]);
    wait_psk(&c, 1, Duration::from_secs(10));
    c.assert_pods_ping(&pods.iter().collect::<Vec<_>>());
    let trace_lines = c
        .node(0)
        .meshd_log()
        .lines()
        .filter(|l| l.contains("TRACE"))
        .count();
    assert!(trace_lines > 0, "meshd did not log at trace level");
    let keys: Vec<String> = c.nodes.iter().map(public_key).collect();
    check_no_secrets(&c, &[keys], 1, out);
}
