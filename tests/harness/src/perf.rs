//! Measuring helpers shared by the benchmarks: iperf3 runs and process CPU time.

use crate::util::{ns_cmd, run_timeout};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::time::Duration;

/// Runs iperf3 as a client in `ns` and returns its parsed JSON (failing on an `error` field).
pub fn iperf(ns: &str, target: &str, secs: u32, extra: &[&str]) -> Result<Value> {
    let mut c = ns_cmd(ns, "iperf3");
    c.args([
        "-c",
        target,
        "-t",
        &secs.to_string(),
        "-J",
        "--connect-timeout",
        "5000",
    ]);
    c.args(extra);
    let out = run_timeout(&mut c, Duration::from_secs(u64::from(secs) + 30))?;
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 output not JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    Ok(v)
}

/// A number at `path` in iperf3's JSON.
pub fn json_f64(v: &Value, path: &[&str]) -> Result<f64> {
    let mut x = v;
    for k in path {
        x = &x[*k];
    }
    x.as_f64()
        .ok_or_else(|| anyhow!("iperf3 JSON without {}", path.join(".")))
}

/// utime + stime of the process (all threads), in seconds.
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the `(comm)`: state is the first, utime the 12th, stime the 13th.
    let rest = s
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("odd /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("odd /proc/{pid}/stat"))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((num(11)? + num(12)?) / hz)
}
