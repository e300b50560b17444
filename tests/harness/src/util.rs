//! Small process helpers: running commands (inside namespaces), waiting, child processes that die
//! with the test, the harness-wide lock and locating binaries.

use anyhow::{anyhow, bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Polls `cond` every 50 ms until it returns true or `timeout` passes. Returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Like [`wait_until`] but returns the first `Some` value.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ip netns exec NS PROG` as a [`Command`] (arguments still to add).
pub fn ns_cmd(ns: &str, prog: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.arg("netns").arg("exec").arg(ns).arg(prog);
    c
}

/// Describes a command for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion (60 s limit), failing with its stderr when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = run_timeout(cmd, Duration::from_secs(60))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a program with arguments, see [`run`].
pub fn run_args(prog: &str, args: &[&str]) -> Result<String> {
    run(Command::new(prog).args(args))
}

/// Runs `PROG ARGS` inside namespace `ns`, see [`run`].
pub fn run_in(ns: &str, prog: &str, args: &[&str]) -> Result<String> {
    run(ns_cmd(ns, prog).args(args))
}

/// This build's keyctl run in namespace `ns` with exactly `args` (the caller places the registry
/// flags, before or after the subcommand); `WEFT_REGISTRY` from the test's environment is
/// removed so only the flags count.
pub fn keyctl_in(ns: &str, args: &[&str], timeout: Duration) -> Result<Output> {
    let mut cmd = ns_cmd(ns, workspace_bin("keyctl")?);
    cmd.args(args).env_remove("WEFT_REGISTRY");
    run_timeout(&mut cmd, timeout)
}

/// Runs a command, capturing stdout/stderr, killing it after `timeout`. Never fails because of the
/// exit status (the caller looks at it); fails when it cannot start or times out.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = spawn_owned(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .with_context(|| format!("starting `{}`", describe(cmd)))?;
    // Read both pipes on threads so a chatty child never blocks.
    let mut so = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut se = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut so, &mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut se, &mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            kill_group(child.id(), libc::SIGKILL);
            let _ = child.wait();
            bail!("`{}` timed out after {:?}", describe(cmd), timeout);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Spawns a child in its own process group that gets SIGKILL when the spawning thread dies
/// (PR_SET_PDEATHSIG), so nothing outlives a test process that is killed. Spawn from the thread
/// that owns the test (the pdeath signal follows the spawning *thread*).
pub fn spawn_owned(cmd: &mut Command) -> std::io::Result<Child> {
    cmd.process_group(0);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec here.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Sends `sig` to the process group led by `pid` (all our children lead their own group).
pub fn kill_group(pid: u32, sig: i32) {
    // SAFETY: plain syscall.
    unsafe {
        libc::kill(-(pid as i32), sig);
    }
}

/// Sends `sig` to one process.
pub fn kill_pid(pid: u32, sig: i32) {
    // SAFETY: plain syscall.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Waits up to `timeout` for a child to exit.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A background child process (own process group) that is killed when dropped.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: Option<PathBuf>,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with stdout+stderr appended to `log` (or discarded when `None`).
    pub fn spawn_logged(name: &str, cmd: &mut Command, log: Option<&Path>) -> Result<Proc> {
        let (out, err) = match log {
            Some(p) => {
                let mut f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("opening log {}", p.display()))?;
                let _ = writeln!(
                    f,
                    "===== harness: starting `{}` at {:?}",
                    describe(cmd),
                    std::time::SystemTime::now()
                );
                (Stdio::from(f.try_clone()?), Stdio::from(f))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child =
            spawn_owned(cmd).with_context(|| format!("starting {name}: `{}`", describe(cmd)))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log: log.map(Path::to_path_buf),
            exited: None,
        })
    }

    /// Wraps an already spawned child.
    pub fn from_child(name: &str, child: Child) -> Proc {
        Proc {
            name: name.to_string(),
            child,
            log: None,
            exited: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(st)) => {
                self.exited = Some(st);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Exit status if it has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.running();
        self.exited
    }

    /// Sends `sig` to the process (not the group).
    pub fn signal(&self, sig: i32) {
        if self.exited.is_none() {
            kill_pid(self.pid(), sig);
        }
    }

    /// Sends `sig`, waits up to `timeout`; on timeout kills the whole group with SIGKILL and
    /// returns an error (the process is gone either way).
    pub fn stop(&mut self, sig: i32, timeout: Duration) -> Result<ExitStatus> {
        if let Some(st) = self.exit_status() {
            return Ok(st);
        }
        kill_pid(self.pid(), sig);
        if let Some(st) = wait_child(&mut self.child, timeout) {
            self.exited = Some(st);
            kill_group(self.pid(), libc::SIGKILL); // stragglers in its group
            return Ok(st);
        }
        kill_group(self.pid(), libc::SIGKILL);
        let st = self.child.wait()?;
        self.exited = Some(st);
        bail!(
            "{} (pid {}) did not exit within {:?} of signal {}; killed it",
            self.name,
            self.pid(),
            timeout,
            sig
        )
    }

    /// Kills the process group: SIGTERM, 2 s grace, then SIGKILL.
    pub fn terminate(&mut self) {
        if self.exit_status().is_some() {
            kill_group(self.pid(), libc::SIGKILL);
            return;
        }
        kill_group(self.pid(), libc::SIGTERM);
        if let Some(st) = wait_child(&mut self.child, Duration::from_secs(2)) {
            self.exited = Some(st);
        }
        kill_group(self.pid(), libc::SIGKILL);
        if self.exited.is_none() {
            if let Ok(st) = self.child.wait() {
                self.exited = Some(st);
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Harness-wide exclusive lock (flock on /run/lock/weft-tests.lock): two clusters never overlap,
/// neither between threads of one test binary nor between processes (flock locks belong to the
/// open file description, so a second open in the same process blocks too).
#[derive(Debug)]
pub struct HarnessLock {
    _file: File,
}

pub const LOCK_PATH: &str = "/run/lock/weft-tests.lock";

impl HarnessLock {
    pub fn acquire() -> Result<HarnessLock> {
        let path = Path::new(LOCK_PATH);
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).ok();
        }
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {LOCK_PATH}"))?;
        // SAFETY: flock on an fd we own.
        let nb = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if nb != 0 {
            let holder = std::fs::read_to_string(path).unwrap_or_default();
            eprintln!(
                "weft-tests: waiting for the harness lock {LOCK_PATH} (held by {}); \
                 clusters run one at a time",
                holder.trim()
            );
            // SAFETY: as above.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if r != 0 {
                bail!("flock {LOCK_PATH}: {}", std::io::Error::last_os_error());
            }
        }
        let _ = file.set_len(0);
        let _ = write!(
            file,
            "pid {} ({})",
            std::process::id(),
            std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
        Ok(HarnessLock { _file: file })
    }
}

/// Runs `f` on a new thread that has entered the network namespace `ns` (`/run/netns/NS`) and
/// returns its result. Only that thread moves, so the sockets `f` opens (for example through a
/// current-thread tokio runtime it builds) live in `ns`; the caller stays where it is.
pub fn run_in_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = Path::new("/run/netns").join(ns);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            // SAFETY: setns(2) on a namespace fd we hold open; it changes only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!(
                    "setns {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
            }
            f()
        })
        .join()
        .map_err(|_| anyhow!("the thread in namespace {ns} panicked"))?
    })
}

/// Fails unless running as root (the harness needs netns, veth, tc and /dev/net/tun).
pub fn require_root() -> Result<()> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the weft netns harness needs root (network namespaces, veth, TUN); run the tests as root");
    }
    Ok(())
}

static BIN_DIR_OVERRIDE: OnceLock<PathBuf> = OnceLock::new();
static NETTOOL_OVERRIDE: OnceLock<PathBuf> = OnceLock::new();

/// Sets the directory meshd is taken from (instead of `WEFT_BIN_DIR` / next to the test binary).
pub fn set_bin_dir(dir: impl Into<PathBuf>) {
    let _ = BIN_DIR_OVERRIDE.set(dir.into());
}

/// Sets the path of the `weft-nettool` helper (integration tests pass
/// `env!("CARGO_BIN_EXE_weft-nettool")`).
pub fn set_nettool(path: impl Into<PathBuf>) {
    let _ = NETTOOL_OVERRIDE.set(path.into());
}

/// Directories to look in for workspace binaries, best first: `WEFT_BIN_DIR`, an override, the
/// directory two levels above the current exe (target/debug/deps/<test> -> target/debug), the
/// exe's own directory (target/release/weft-bench -> target/release).
pub fn bin_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(d) = std::env::var_os("WEFT_BIN_DIR") {
        v.push(PathBuf::from(d));
    }
    if let Some(d) = BIN_DIR_OVERRIDE.get() {
        v.push(d.clone());
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(p) = exe.parent() {
            if p.file_name().is_some_and(|n| n == "deps") {
                if let Some(pp) = p.parent() {
                    v.push(pp.to_path_buf());
                }
            } else {
                v.push(p.to_path_buf());
            }
        }
    }
    v
}

/// Path of a workspace binary such as `meshd`, or an error telling how to build it.
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let dirs = bin_dirs();
    for d in &dirs {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "binary `{name}` not found in {:?}; run `cargo build --workspace --bins` first \
         (or set WEFT_BIN_DIR to the directory holding it)",
        dirs
    )
}

/// Path of the `weft-nettool` helper binary.
pub fn nettool() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("WEFT_NETTOOL") {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = NETTOOL_OVERRIDE.get() {
        return Ok(p.clone());
    }
    workspace_bin("weft-nettool").context("weft-nettool (part of package weft-tests)")
}

/// Finds a program on PATH or in ~/.cargo/bin.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(h) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(h).join("bin"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(h).join(".cargo/bin"));
    }
    dirs.push(PathBuf::from("/root/.cargo/bin"));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Last `n` lines of a text file (for failure reports).
pub fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// Percentile by nearest rank (p in 0..=100) of unsorted values; `None` when empty.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// Median of unsorted values.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
