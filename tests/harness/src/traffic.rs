//! Traffic helpers: ping (one-shot and background), TCP transfers and UDP datagrams with a
//! marker, all run inside a namespace with `ip netns exec`.

use crate::capture::Marker;
use crate::util::{
    describe, kill_pid, nettool, ns_cmd, percentile, run_timeout, spawn_owned, wait_child, Proc,
};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Options for `ping`.
#[derive(Debug, Clone)]
pub struct PingOpts {
    pub count: u32,
    /// Seconds between packets (below 0.2 needs root, which the harness is).
    pub interval: f64,
    /// ICMP payload size (`-s`); `None` = ping's default 56.
    pub size: Option<u32>,
    /// Set DF and forbid local fragmentation (`-M do`).
    pub dont_fragment: bool,
    /// `-p HEX` fill pattern (a [`Marker::hex`] fits).
    pub pattern: Option<String>,
    /// `-I ADDR|IF` source.
    pub source: Option<String>,
    /// `-W` seconds to wait for each reply (and the last one).
    pub wait: u32,
}

impl Default for PingOpts {
    fn default() -> Self {
        PingOpts {
            count: 3,
            interval: 0.2,
            size: None,
            dont_fragment: false,
            pattern: None,
            source: None,
            wait: 2,
        }
    }
}

impl PingOpts {
    pub fn count(n: u32) -> Self {
        PingOpts {
            count: n,
            ..Default::default()
        }
    }
    pub fn interval(mut self, secs: f64) -> Self {
        self.interval = secs;
        self
    }
    pub fn size(mut self, s: u32) -> Self {
        self.size = Some(s);
        self
    }
    pub fn df(mut self) -> Self {
        self.dont_fragment = true;
        self
    }
    pub fn pattern(mut self, m: &Marker) -> Self {
        self.pattern = Some(m.hex().to_string());
        self
    }
    pub fn source(mut self, s: impl Into<String>) -> Self {
        self.source = Some(s.into());
        self
    }
    pub fn wait(mut self, secs: u32) -> Self {
        self.wait = secs;
        self
    }

    fn args(&self, dst: &str) -> Vec<String> {
        let mut a = vec![
            "-n".to_string(),
            "-c".into(),
            self.count.to_string(),
            "-i".into(),
            format!("{}", self.interval),
            "-W".into(),
            self.wait.to_string(),
        ];
        if let Some(s) = self.size {
            a.extend(["-s".into(), s.to_string()]);
        }
        if self.dont_fragment {
            a.extend(["-M".into(), "do".into()]);
        }
        if let Some(p) = &self.pattern {
            a.extend(["-p".into(), p.clone()]);
        }
        if let Some(s) = &self.source {
            a.extend(["-I".into(), s.clone()]);
        }
        a.push(dst.to_string());
        a
    }
}

/// What a ping run reported.
#[derive(Debug, Clone, Default)]
pub struct PingResult {
    pub transmitted: u32,
    pub received: u32,
    pub duplicates: u32,
    pub errors: u32,
    pub rtts_ms: Vec<f64>,
    /// icmp_seq values that got a reply.
    pub replied_seqs: BTreeSet<u32>,
    pub exit_code: Option<i32>,
    pub output: String,
}

impl PingResult {
    pub fn parse(output: &str, exit_code: Option<i32>) -> PingResult {
        let mut r = PingResult {
            exit_code,
            output: output.to_string(),
            ..Default::default()
        };
        for line in output.lines() {
            if line.contains(" bytes from ") && line.contains("icmp_seq=") {
                if let Some(seq) = field(line, "icmp_seq=") {
                    if let Ok(s) = seq.parse::<u32>() {
                        r.replied_seqs.insert(s);
                    }
                }
                if !line.contains("DUP!") {
                    if let Some(t) = field(line, "time=") {
                        if let Ok(t) = t.parse::<f64>() {
                            r.rtts_ms.push(t);
                        }
                    }
                }
            }
            if line.contains("packets transmitted") {
                for part in line.split(',') {
                    let part = part.trim();
                    let n = part
                        .split_whitespace()
                        .next()
                        .map(|s| s.trim_start_matches('+'))
                        .and_then(|s| s.parse::<u32>().ok())
                        .unwrap_or(0);
                    if part.ends_with("packets transmitted") {
                        r.transmitted = n;
                    } else if part.ends_with("received") {
                        r.received = n;
                    } else if part.ends_with("duplicates") {
                        r.duplicates = n;
                    } else if part.ends_with("errors") {
                        r.errors = n;
                    }
                }
            }
        }
        r
    }

    pub fn lost(&self) -> u32 {
        self.transmitted.saturating_sub(self.received)
    }

    pub fn loss_ratio(&self) -> f64 {
        if self.transmitted == 0 {
            return 1.0;
        }
        f64::from(self.lost()) / f64::from(self.transmitted)
    }

    /// Every transmitted packet got a reply (and at least one was sent).
    pub fn all_received(&self) -> bool {
        self.transmitted > 0 && self.received >= self.transmitted
    }

    /// At least one reply.
    pub fn any_received(&self) -> bool {
        self.received > 0
    }

    /// icmp_seq values (1-based) that got no reply.
    pub fn lost_seqs(&self) -> Vec<u32> {
        (1..=self.transmitted)
            .filter(|s| !self.replied_seqs.contains(s))
            .collect()
    }

    /// ping reported that the packet is too big for the path: a local "message too long" or an
    /// ICMP "Frag needed" from a router.
    pub fn too_big(&self) -> bool {
        let o = self.output.to_ascii_lowercase();
        o.contains("message too long") || o.contains("frag needed")
    }

    pub fn avg_ms(&self) -> Option<f64> {
        if self.rtts_ms.is_empty() {
            None
        } else {
            Some(self.rtts_ms.iter().sum::<f64>() / self.rtts_ms.len() as f64)
        }
    }

    pub fn p50_ms(&self) -> Option<f64> {
        percentile(&self.rtts_ms, 50.0)
    }

    pub fn p99_ms(&self) -> Option<f64> {
        percentile(&self.rtts_ms, 99.0)
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let i = line.find(key)? + key.len();
    let rest = &line[i..];
    Some(
        rest.split(|c: char| c.is_whitespace())
            .next()
            .unwrap_or(rest),
    )
}

/// Pings `dst` from namespace `ns` and waits for the result (never fails because of loss).
pub fn ping(ns: &str, dst: &str, opts: &PingOpts) -> Result<PingResult> {
    let mut cmd = ns_cmd(ns, "ping");
    cmd.args(opts.args(dst));
    let budget = f64::from(opts.count) * opts.interval.max(0.001) + f64::from(opts.wait) + 15.0;
    let out = run_timeout(&mut cmd, Duration::from_secs_f64(budget))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(PingResult::parse(&text, out.status.code()))
}

/// A `ping` running in the background; output is collected as it comes.
#[derive(Debug)]
pub struct BgPing {
    pub ns: String,
    pub dst: String,
    proc: Proc,
    out: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    budget: Duration,
}

impl BgPing {
    /// Starts `ping` with `opts` (set `count` to duration / interval for a fixed-length run whose
    /// last reply is still waited for, which avoids counting the in-flight packet as lost).
    pub fn start(ns: &str, dst: &str, opts: &PingOpts) -> Result<BgPing> {
        let mut cmd = ns_cmd(ns, "ping");
        cmd.args(opts.args(dst))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child =
            spawn_owned(&mut cmd).with_context(|| format!("starting `{}`", describe(&cmd)))?;
        let out = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        let so = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let se = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        for r in [Box::new(so) as Box<dyn Read + Send>, Box::new(se)] {
            let out = out.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    if let Ok(mut o) = out.lock() {
                        o.push_str(&line);
                        o.push('\n');
                    }
                }
            }));
        }
        let budget = Duration::from_secs_f64(
            f64::from(opts.count) * opts.interval.max(0.001) + f64::from(opts.wait) + 30.0,
        );
        Ok(BgPing {
            ns: ns.to_string(),
            dst: dst.to_string(),
            proc: Proc::from_child(&format!("ping {dst}"), child),
            out,
            readers,
            budget,
        })
    }

    /// Replies seen so far.
    pub fn replies_so_far(&self) -> usize {
        self.out
            .lock()
            .map(|o| o.lines().filter(|l| l.contains(" bytes from ")).count())
            .unwrap_or(0)
    }

    /// Output so far.
    pub fn output_so_far(&self) -> String {
        self.out.lock().map(|o| o.clone()).unwrap_or_default()
    }

    fn collect(mut self) -> PingResult {
        let code = self.proc.exit_status().and_then(|s| s.code());
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let text = self.out.lock().map(|o| o.clone()).unwrap_or_default();
        PingResult::parse(&text, code)
    }

    /// Waits for ping to finish its `count` (killing it after count*interval + wait + 30 s).
    pub fn finish(mut self) -> Result<PingResult> {
        if wait_child(&mut self.proc.child, self.budget).is_none() {
            kill_pid(self.proc.pid(), libc::SIGINT);
            if wait_child(&mut self.proc.child, Duration::from_secs(5)).is_none() {
                self.proc.terminate();
            }
            let r = self.collect();
            bail!(
                "background ping did not finish in time; output so far:\n{}",
                r.output
            );
        }
        Ok(self.collect())
    }

    /// Interrupts ping now (SIGINT, it prints its summary); a packet still in flight counts as
    /// lost, so allow for one.
    pub fn stop(mut self) -> PingResult {
        kill_pid(self.proc.pid(), libc::SIGINT);
        if wait_child(&mut self.proc.child, Duration::from_secs(5)).is_none() {
            self.proc.terminate();
        }
        self.collect()
    }
}

/// Result of a TCP transfer.
#[derive(Debug, Clone)]
pub struct TcpResult {
    pub sent: u64,
    pub received: u64,
    /// Marker occurrences the receiver counted.
    pub marker_count: u64,
    /// The receiver saw the connection from this address.
    pub peer: String,
    pub secs: f64,
}

impl TcpResult {
    pub fn complete(&self) -> bool {
        self.sent == self.received && self.received > 0
    }
}

/// Options for [`tcp_transfer`].
#[derive(Debug, Clone)]
pub struct TcpOpts {
    pub port: u16,
    pub bytes: u64,
    /// Text repeated as the payload (the receiver counts its occurrences).
    pub marker: String,
    /// Sender's source address.
    pub bind: Option<String>,
    pub timeout: Duration,
}

impl TcpOpts {
    pub fn new(bytes: u64, marker: &str) -> TcpOpts {
        TcpOpts {
            port: 5555,
            bytes,
            marker: marker.to_string(),
            bind: None,
            timeout: Duration::from_secs(30),
        }
    }
    pub fn port(mut self, p: u16) -> Self {
        self.port = p;
        self
    }
    pub fn bind(mut self, b: impl Into<String>) -> Self {
        self.bind = Some(b.into());
        self
    }
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
}

/// Sends `o.bytes` bytes of the repeated marker over TCP from `from_ns` to `dst_ip:o.port` where
/// a one-shot receiver runs in `to_ns`.
pub fn tcp_transfer(from_ns: &str, to_ns: &str, dst_ip: &str, o: &TcpOpts) -> Result<TcpResult> {
    let (port, bytes, marker, bind, timeout) = (
        o.port,
        o.bytes,
        o.marker.as_str(),
        o.bind.as_deref(),
        o.timeout,
    );
    let tool = nettool()?;
    let ms = timeout.as_millis().to_string();
    let mut srv = ns_cmd(to_ns, &tool);
    srv.args([
        "tcp-serve",
        "--listen",
        &format!("0.0.0.0:{port}"),
        "--marker",
        marker,
        "--timeout-ms",
        &ms,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child =
        spawn_owned(&mut srv).with_context(|| format!("starting `{}`", describe(&srv)))?;
    let so = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut se = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let mut proc = Proc::from_child("tcp-serve", child);
    let mut lines = BufReader::new(so).lines();
    match lines.next() {
        Some(Ok(l)) if l.trim() == "LISTENING" => {}
        other => {
            proc.terminate();
            bail!(
                "tcp-serve in {to_ns} did not start: {:?} {}",
                other,
                err_t.join().unwrap_or_default()
            );
        }
    }
    let mut cli = ns_cmd(from_ns, &tool);
    cli.args([
        "tcp-send",
        "--connect",
        &format!("{dst_ip}:{port}"),
        "--bytes",
        &bytes.to_string(),
        "--marker",
        marker,
        "--timeout-ms",
        &ms,
    ]);
    if let Some(b) = bind {
        cli.args(["--bind", b]);
    }
    let out = run_timeout(&mut cli, timeout + Duration::from_secs(5))?;
    let client_json = String::from_utf8_lossy(&out.stdout).into_owned();
    let client_err = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        proc.terminate();
        bail!(
            "tcp-send {from_ns} -> {dst_ip}:{port} failed: {} (server: {})",
            client_err.trim(),
            err_t.join().unwrap_or_default().trim()
        );
    }
    let server_line = lines.next().and_then(Result::ok).unwrap_or_default();
    let _ = wait_child(&mut proc.child, Duration::from_secs(5));
    let server_err = err_t.join().unwrap_or_default();
    let sv: Value = serde_json::from_str(&server_line)
        .map_err(|e| anyhow!("tcp-serve output {server_line:?} ({e}); stderr {server_err}"))?;
    let cv: Value = serde_json::from_str(client_json.trim())
        .map_err(|e| anyhow!("tcp-send output {client_json:?} ({e})"))?;
    Ok(TcpResult {
        sent: cv["bytes"].as_u64().unwrap_or(0),
        received: sv["bytes"].as_u64().unwrap_or(0),
        marker_count: sv["markerCount"].as_u64().unwrap_or(0),
        peer: sv["peer"].as_str().unwrap_or_default().to_string(),
        secs: sv["secs"].as_f64().unwrap_or(0.0),
    })
}

/// What to send with [`udp_send`].
#[derive(Debug, Clone)]
pub struct UdpSend {
    pub size: usize,
    pub count: u32,
    /// Random bytes instead of the repeated marker.
    pub random: bool,
    pub marker: Option<String>,
    /// Source address (ip or ip:port).
    pub bind: Option<String>,
    pub interval_ms: u64,
    /// Leading bytes of every datagram (e.g. `[4, 0, 0, 0]`, a WireGuard data header).
    pub prefix: Vec<u8>,
}

impl Default for UdpSend {
    fn default() -> Self {
        UdpSend {
            size: 64,
            count: 1,
            random: false,
            marker: None,
            bind: None,
            interval_ms: 0,
            prefix: Vec::new(),
        }
    }
}

/// Sends UDP datagrams from namespace `ns` to `dst` ("ip:port"); returns how many were sent.
pub fn udp_send(ns: &str, dst: &str, s: &UdpSend) -> Result<u64> {
    let tool = nettool()?;
    let mut cmd = ns_cmd(ns, &tool);
    cmd.args([
        "udp-send",
        "--to",
        dst,
        "--size",
        &s.size.to_string(),
        "--count",
        &s.count.to_string(),
    ]);
    cmd.args(["--interval-ms", &s.interval_ms.to_string()]);
    if s.random {
        cmd.arg("--random");
    }
    if let Some(m) = &s.marker {
        cmd.args(["--marker", m]);
    }
    if let Some(b) = &s.bind {
        cmd.args(["--bind", b]);
    }
    if !s.prefix.is_empty() {
        let hex: String = s.prefix.iter().map(|b| format!("{b:02x}")).collect();
        cmd.args(["--prefix", &hex]);
    }
    let out = run_timeout(&mut cmd, Duration::from_secs(120))?;
    if !out.status.success() {
        bail!("udp-send failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("udp-send output")?;
    Ok(v["sent"].as_u64().unwrap_or(0))
}

/// A UDP sink running in a namespace for a fixed duration.
#[derive(Debug)]
pub struct UdpReceiver {
    proc: Proc,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

/// What a [`UdpReceiver`] got.
#[derive(Debug, Clone)]
pub struct UdpReceived {
    pub received: u64,
    pub bytes: u64,
    pub marker_datagrams: u64,
    pub sources: Vec<String>,
}

impl UdpReceiver {
    /// Listens on `listen` ("ip:port") in `ns` for `duration`, counting datagrams (and those
    /// containing `marker`).
    pub fn start(
        ns: &str,
        listen: &str,
        duration: Duration,
        marker: Option<&str>,
    ) -> Result<UdpReceiver> {
        let tool = nettool()?;
        let mut cmd = ns_cmd(ns, &tool);
        cmd.args([
            "udp-recv",
            "--listen",
            listen,
            "--duration-ms",
            &duration.as_millis().to_string(),
        ]);
        if let Some(m) = marker {
            cmd.args(["--marker", m]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = spawn_owned(&mut cmd)?;
        let so = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(so).lines();
        match lines.next() {
            Some(Ok(l)) if l.trim() == "LISTENING" => {}
            other => bail!("udp-recv did not start: {other:?}"),
        }
        Ok(UdpReceiver {
            proc: Proc::from_child("udp-recv", child),
            lines,
        })
    }

    /// Waits for the end of the listening period.
    pub fn finish(mut self) -> Result<UdpReceived> {
        let line = self.lines.next().and_then(Result::ok).unwrap_or_default();
        let _ = wait_child(&mut self.proc.child, Duration::from_secs(5));
        let v: Value =
            serde_json::from_str(&line).map_err(|e| anyhow!("udp-recv output {line:?}: {e}"))?;
        Ok(UdpReceived {
            received: v["received"].as_u64().unwrap_or(0),
            bytes: v["bytes"].as_u64().unwrap_or(0),
            marker_datagrams: v["markerDatagrams"].as_u64().unwrap_or(0),
            sources: v["sources"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}

/// Runs a shell snippet inside a namespace (`ip netns exec NS sh -c ...`), returns stdout.
pub fn sh_in(ns: &str, script: &str) -> Result<String> {
    crate::util::run(ns_cmd(ns, "sh").args(["-c", script]))
}

/// Whether a TCP port is accepting connections (used to wait for servers like iperf3).
pub fn tcp_port_open(ns: &str, ip: &str, port: u16) -> bool {
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        ns,
        "bash",
        "-c",
        &format!("exec 3<>/dev/tcp/{ip}/{port}"),
    ]);
    run_timeout(&mut c, Duration::from_secs(3))
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// `o.bytes` of `o.marker` over TCP from pod `from` to pod `to`: asserts that every byte arrived
/// and every marker intact, and prints the rate.
pub fn assert_tcp_intact(
    c: &crate::Cluster,
    from: &crate::Pod,
    to: &crate::Pod,
    o: &TcpOpts,
) -> TcpResult {
    let t = tcp_transfer(&from.ns, &to.ns, &to.ip_str(), o)
        .unwrap_or_else(|e| panic!("tcp {} -> {}: {e:#}\n{}", from.ip, to.ip, c.debug_report()));
    assert!(t.complete(), "tcp {} -> {}: {t:?}", from.ip, to.ip);
    let want = o.bytes / o.marker.len() as u64;
    assert!(
        t.marker_count >= want,
        "{} markers of {want} arrived intact: {t:?}",
        t.marker_count
    );
    eprintln!(
        "{} -> {}: {} bytes in {:.2} s ({:.2} Gbit/s)",
        from.ip,
        to.ip,
        t.received,
        t.secs,
        t.received as f64 * 8.0 / t.secs / 1e9
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_output() {
        let out = "PING 10.42.2.10 (10.42.2.10) 56(84) bytes of data.
64 bytes from 10.42.2.10: icmp_seq=1 ttl=62 time=0.123 ms
64 bytes from 10.42.2.10: icmp_seq=3 ttl=62 time=0.456 ms
64 bytes from 10.42.2.10: icmp_seq=3 ttl=62 time=0.457 ms (DUP!)

--- 10.42.2.10 ping statistics ---
3 packets transmitted, 2 received, +1 duplicates, 33.3333% packet loss, time 2003ms
rtt min/avg/max/mdev = 0.123/0.289/0.456/0.166 ms
";
        let r = PingResult::parse(out, Some(1));
        assert_eq!(r.transmitted, 3);
        assert_eq!(r.received, 2);
        assert_eq!(r.duplicates, 1);
        assert_eq!(r.rtts_ms, vec![0.123, 0.456]);
        assert_eq!(r.lost_seqs(), vec![2]);
        assert!(!r.all_received());
        let e = "PING 10.42.2.10 (10.42.2.10) 1393(1421) bytes of data.
ping: local error: message too long, mtu=1420

--- 10.42.2.10 ping statistics ---
1 packets transmitted, 0 received, +1 errors, 100% packet loss, time 0ms
";
        let r = PingResult::parse(e, Some(1));
        assert!(r.too_big());
        assert_eq!(r.errors, 1);
        assert_eq!(r.received, 0);
    }
}
