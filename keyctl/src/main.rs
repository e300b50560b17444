//! keyctl: weft's key management CLI.
//!
//! In: a subcommand and its flags (the registry flags, before or after the subcommand, are
//! meshd's: `--registry`, `--etcd-prefix`, `--etcd-ca`/`--etcd-cert`/`--etcd-key`, the same `WEFT_*` variables, and the etcd user from
//! `WEFT_ETCD_USERNAME`/`WEFT_ETCD_PASSWORD`); for `pubkey` a base64 private key on stdin; for
//! the other commands the registry's node records, rotation requests, revocations and external
//! peers.
//!
//! Out: on stdout, a new private key (`genkey`) or the matching public key (`pubkey`), base64 with
//! a trailing newline, byte-for-byte the format of `wg genkey` / `wg pubkey`; a table, or JSON
//! with `--json`, for `status`, `rotate`, `revoke`, `readmit` and `peer list`; Graphviz DOT or
//! SVG (through `dot -Tsvg`) of the nodes, their links' health and the external peers for
//! `graph`; a wg-quick config
//! for an external peer (`peer add`, `peer config`) with its private key left as a placeholder;
//! in the registry, `rotations/NAME` (`rotate`), `revocations/NAME` (`revoke`, `readmit`) and
//! `peers/NAME` (`peer add`, `peer config`, `peer rm`) objects. Apart from `genkey`, nothing
//! keyctl prints or writes ever holds a private key (it never reads one except `pubkey`'s
//! stdin).
//!
//! Exit codes: 0 ok; 1 failure (registry unreachable, unknown node, refused readmit, ...); 2 a
//! rotation did not finish (before `--timeout`, or a node has no record), naming the nodes;
//! 64 bad flags, naming the flag.
//!
//! # Design (the overview is in ARCHITECTURE.md)
//!
//! **keyctl** (`keyctl/`) is the operator's CLI. `genkey` and `pubkey` are byte-compatible with
//! `wg`. `status`, `rotate`, `revoke`, `readmit`, `peer` and `psk rotate` open the registry with meshd's flags
//! (`registry_args`) on a current-thread runtime. `status` is a pure view of the records, rotation
//! requests and revocations. `rotate` runs a pure `Rollout` (records in, requests to write and
//! progress out; never more than `--max-parallel` nodes unfinished) fed by polling the records
//! every 250 ms. `revoke` and `readmit` build the new `revocations/NAME` with pure functions and
//! write it with `list_for_update` + `put_if_unchanged`, so two operators never lose each other's
//! change. `peer add|config|rm|list` manage external peers: `peer` renders the wg-quick config (a
//! pure function; the private key stays a placeholder) and tells a stale config (a node key changed
//! since it was printed) from a current one. keyctl reads no private key except `pubkey`'s stdin
//! and prints none except `genkey`'s.

mod graph;
mod peer;
mod psk;
mod registry_args;
mod revoke;
mod rotate;
mod status;

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args, Parser, Subcommand};
use registry_args::{bad, RegistryArgs, UsageError};
use serde_json::json;
use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_core::control::{PskGeneration, Revocation, RotationRequest, PSK_OBJECT};
use weft_core::external::{parse_allowed_ips, ExternalPeer};
use weft_core::health::HealthReport;
use weft_core::keys::PrivateKey;
use weft_core::record::check_name;
use weft_core::PublicKey;
use weft_registry::{Registry, Typed};

/// Largest stdin `pubkey` reads: a key is 44 base64 characters plus whitespace.
const MAX_INPUT: u64 = 4096;
const EXIT_NOT_FINISHED: u8 = 2;
const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "keyctl",
    version,
    about = "weft key management: keys, rotation, revocation and preshared keys of mesh nodes",
    long_about = "weft key management.\n\n\
        `genkey` and `pubkey` are interchangeable with wg(8). `status`, `rotate`, `revoke`, \
        `readmit`, `peer` and `psk` work on the registry meshd uses (same --registry and \
        --etcd-* flags and WEFT_* variables). Apart from `genkey`, keyctl never prints or stores \
        a private key or a preshared key: `psk rotate` writes only a generation number.",
    after_help = "Examples:\n  keyctl genkey > node.key\n  keyctl pubkey < node.key\n  \
        keyctl status --registry etcd://10.0.0.5:2379\n  \
        keyctl rotate --all --max-parallel 2 --wait\n  keyctl revoke node-2\n  \
        keyctl readmit node-2 --public-key KEY\n  keyctl psk rotate --wait\n  \
        keyctl peer add laptop --public-key KEY --allowed-ips 10.99.0.1/32 > laptop.conf\n  \
        keyctl graph --format svg -o mesh.svg\n\n\
        Registry flags go before or after the subcommand.\n\n\
        Exit codes: 0 ok, 1 failure, 2 rotation not finished, 64 bad flags."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The registry flags, accepted before or after the subcommand (`global`).
    #[command(flatten)]
    registry: RegistryArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a new random private key (base64, like `wg genkey`).
    Genkey,
    /// Read a private key on stdin and print its public key (like `wg pubkey`).
    Pubkey,
    /// Show every node's key fingerprint, age and generation, its rotation and revocation.
    Status(StatusArgs),
    /// Ask nodes to rotate their keys (writes rotations/NAME), at most --max-parallel at once.
    Rotate(RotateArgs),
    /// Revoke a node: every node drops it and refuses its keys (writes revocations/NAME).
    Revoke(RevokeArgs),
    /// Let a revoked node back, only with the exact new public key given.
    Readmit(ReadmitArgs),
    /// Cluster preshared keys (derived on each node from the cluster secret file).
    #[command(subcommand)]
    Psk(PskCommand),
    /// External standard WireGuard peers (a laptop, a VM): add, print config, remove, list.
    #[command(subcommand)]
    Peer(PeerCommand),
    /// Print the mesh as Graphviz DOT (or SVG via `dot`): nodes, links coloured by health,
    /// external peers.
    Graph(GraphArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum GraphFormat {
    /// Graphviz DOT text.
    Dot,
    /// SVG rendered by Graphviz `dot -Tsvg` (must be installed).
    Svg,
}

#[derive(Debug, Args)]
struct GraphArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "dot")]
    format: GraphFormat,
    /// Write to this file instead of stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    output: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
enum PeerCommand {
    /// Register an external peer (it makes its own key) and print its wg-quick config.
    Add(PeerAddArgs),
    /// Print the current wg-quick config of an external peer again (after nodes rotated).
    Config(PeerNameArgs),
    /// Remove an external peer: every node drops it.
    Rm(PeerNameArgs),
    /// List the external peers (also in `keyctl status`).
    List(PeerListArgs),
}

#[derive(Debug, Args)]
struct PeerAddArgs {
    /// The peer's name (a lowercase DNS name, not a node's).
    #[arg(value_name = "NAME")]
    name: String,
    /// The peer's own public key (`wg pubkey` on the peer).
    #[arg(long, value_name = "KEY")]
    public_key: String,
    /// The addresses the peer uses, comma-separated; they may not overlap any node's pod range
    /// or another external peer's.
    #[arg(long, value_name = "CIDR[,CIDR]")]
    allowed_ips: String,
    /// Where nodes reach the peer; without it they learn it from the peer's first handshake.
    #[arg(long, value_name = "HOST:PORT")]
    endpoint: Option<String>,
    /// Print JSON (the record and the config) instead of the config.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct PeerNameArgs {
    /// The external peer.
    #[arg(value_name = "NAME")]
    name: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct PeerListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum PskCommand {
    /// Move every node to the next PSK generation (writes psk/cluster; only the number).
    Rotate(PskRotateArgs),
}

#[derive(Debug, Args)]
struct PskRotateArgs {
    /// Return only when every node holding the cluster secret publishes the new generation.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds (exit 2, naming the nodes that are behind).
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    timeout: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also show every link's health as each node reports it (`health/NAME`): state, last
    /// handshake, PSK generation, key pairs, and how old the report is.
    #[arg(long)]
    peers: bool,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["nodes", "all"])))]
struct RotateArgs {
    /// A node to rotate; repeat for several (rotated in this order).
    #[arg(long = "node", value_name = "NAME")]
    nodes: Vec<String>,
    /// Every node with a record, in name order.
    #[arg(long)]
    all: bool,
    /// How many nodes may be rotating at once.
    #[arg(long, value_name = "N", default_value_t = 1)]
    max_parallel: usize,
    /// Return only when every node finished (its record reached the requested generation with
    /// no next key); without it keyctl returns once every request is written.
    #[arg(long)]
    wait: bool,
    /// Give up after this many seconds (exit 2, naming the nodes that did not finish).
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    timeout: u64,
    /// Print JSON instead of progress lines (progress then goes to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RevokeArgs {
    /// The node to revoke (it need not have a record: then the name is banned).
    #[arg(value_name = "NAME")]
    node: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ReadmitArgs {
    /// The revoked node.
    #[arg(value_name = "NAME")]
    node: String,
    /// The node's new public key, obtained from the node out of band (`meshd status` there).
    #[arg(long, value_name = "KEY")]
    public_key: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// A rotation that did not finish; the message names the nodes.
#[derive(Debug)]
struct NotFinished(String);

impl std::fmt::Display for NotFinished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotFinished {}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return if usage {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let reg = cli.registry;
    let result = match cli.command {
        Command::Genkey => genkey(),
        Command::Pubkey => pubkey(),
        Command::Status(a) => with_runtime(|| status(a, &reg)),
        Command::Rotate(a) => with_runtime(|| rotate(a, &reg)),
        Command::Revoke(a) => with_runtime(|| revoke(a, &reg)),
        Command::Readmit(a) => with_runtime(|| readmit(a, &reg)),
        Command::Psk(PskCommand::Rotate(a)) => with_runtime(|| psk_rotate(a, &reg)),
        Command::Peer(PeerCommand::Add(a)) => with_runtime(|| peer_add(a, &reg)),
        Command::Peer(PeerCommand::Config(a)) => with_runtime(|| peer_config(a, &reg)),
        Command::Peer(PeerCommand::Rm(a)) => with_runtime(|| peer_rm(a, &reg)),
        Command::Peer(PeerCommand::List(a)) => with_runtime(|| peer_list(a, &reg)),
        Command::Graph(a) => with_runtime(|| graph(a, &reg)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            eprintln!("keyctl: {e}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) if e.downcast_ref::<NotFinished>().is_some() => {
            eprintln!("keyctl: error: {e}");
            ExitCode::from(EXIT_NOT_FINISHED)
        }
        Err(e) => {
            // `{:#}` prints the context chain on one line, without a backtrace.
            eprintln!("keyctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Registry commands run on a current-thread runtime, with the registry's warnings (such as an
/// invalid object it skipped) on stderr.
fn with_runtime<F>(f: impl FnOnce() -> F) -> Result<()>
where
    F: std::future::Future<Output = Result<()>>,
{
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYCTL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false)
        .without_time()
        .with_writer(std::io::stderr)
        .try_init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(f())
}

/// `println!` that reports a closed stdout as an error instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {
        print_line(&format!($($arg)*))?
    };
}

fn print_text(s: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

fn print_line(s: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{s}")
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    print_line(&serde_json::to_string_pretty(v).context("encoding JSON")?)
}

fn genkey() -> Result<()> {
    let key = PrivateKey::generate();
    print_line(&key.to_base64_secret())
}

fn pubkey() -> Result<()> {
    let mut input = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_INPUT + 1)
        .read_to_end(&mut input)
        .context("reading the private key from stdin")?;
    if input.len() as u64 > MAX_INPUT {
        bail!("input is longer than {MAX_INPUT} bytes; expected one base64 private key");
    }
    let text = std::str::from_utf8(&input)
        .ok()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .context(
            "expected a base64 private key on stdin (as printed by `keyctl genkey` or `wg genkey`)",
        )?;
    let key = PrivateKey::from_base64(text)
        .context("stdin is not a private key (expected 32 bytes in base64, as printed by `keyctl genkey` or `wg genkey`)")?;
    print_line(&key.public_key().to_base64())
}

fn open(args: &RegistryArgs) -> Result<Arc<dyn Registry>> {
    let (spec, options) = args.validate()?;
    RegistryArgs::open(&spec, &options)
}

fn check_node(flag: &'static str, name: &str) -> Result<(), UsageError> {
    check_name(name).map_err(|e| bad(flag, format!("{name:?}: {e}")))
}

/// Everything `status` and `graph` show, read from the registry (health reports only when
/// `health` is set).
async fn read_contents(registry: &Arc<dyn Registry>, health: bool) -> Result<status::Contents> {
    let (records, _) = weft_registry::list_nodes(&**registry)
        .await
        .context("reading the node records")?;
    let (rotations, _) = Typed::<RotationRequest>::new(registry.clone())
        .list()
        .await
        .context("reading the rotation requests")?;
    let (revocations, _) = Typed::<Revocation>::new(registry.clone())
        .list()
        .await
        .context("reading the revocations")?;
    let psk = Typed::<PskGeneration>::new(registry.clone())
        .get(PSK_OBJECT)
        .await
        .context("reading the cluster PSK generation")?;
    let health = if health {
        Some(
            Typed::<HealthReport>::new(registry.clone())
                .list()
                .await
                .context("reading the link health reports")?
                .0,
        )
    } else {
        None
    };
    let (externals, _) = Typed::<ExternalPeer>::new(registry.clone())
        .list()
        .await
        .context("reading the external peers")?;
    Ok(status::Contents {
        records,
        rotations,
        revocations,
        psk,
        health,
        externals,
    })
}

async fn status(a: StatusArgs, reg: &RegistryArgs) -> Result<()> {
    let registry = open(reg)?;
    let contents = read_contents(&registry, a.peers).await?;
    let s = status::view(registry.describe(), &contents, rotate::unix_now());
    show_peer_staleness(&*registry, &s.external_peers).await;
    if a.json {
        print_json(&s)
    } else {
        print_text(&status::render(&s))
    }
}

async fn graph(a: GraphArgs, reg: &RegistryArgs) -> Result<()> {
    let registry = open(reg)?;
    let contents = read_contents(&registry, true).await?;
    let s = status::view(registry.describe(), &contents, rotate::unix_now());
    let dot = graph::dot(&contents, &s);
    let bytes = match a.format {
        GraphFormat::Dot => dot.into_bytes(),
        GraphFormat::Svg => render_svg(&dot)?,
    };
    match &a.output {
        Some(path) => {
            std::fs::write(path, &bytes).with_context(|| format!("writing {}", path.display()))
        }
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(&bytes)
                .and_then(|()| out.flush())
                .context("writing to stdout")
        }
    }
}

/// Pipes DOT through Graphviz `dot -Tsvg` and returns the SVG.
fn render_svg(dot: &str) -> Result<Vec<u8>> {
    use std::process::{Command, Stdio};
    let mut child = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow::anyhow!(
                "--format svg needs Graphviz `dot` on PATH (apt-get install graphviz), or use --format dot"
            ),
            _ => anyhow::Error::new(e).context("starting Graphviz `dot`"),
        })?;
    let mut stdin = child.stdin.take().context("dot's stdin")?;
    let input = dot.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().context("running Graphviz `dot`")?;
    let _ = writer.join();
    if !out.status.success() {
        bail!(
            "Graphviz `dot -Tsvg` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

async fn psk_rotate(a: PskRotateArgs, reg: &RegistryArgs) -> Result<()> {
    if a.timeout == 0 {
        return Err(bad("timeout", "must be at least 1 second").into());
    }
    let registry = open(reg)?;
    let generation = psk::bump(&registry, rotate::unix_now()).await?;
    if !a.json {
        say!("cluster PSK generation {generation} requested");
    }
    let progress = if a.wait {
        Some(
            psk::wait(
                &registry,
                generation,
                Duration::from_secs(a.timeout),
                Duration::from_millis(250),
            )
            .await?,
        )
    } else {
        None
    };
    if a.json {
        print_json(&json!({
            "generation": generation,
            "wait": a.wait,
            "progress": progress,
        }))?;
    } else if let Some(p) = &progress {
        say!("{} node(s) on PSK generation {generation}", p.done.len());
        if !p.without_secret.is_empty() {
            say!(
                "warning: no cluster secret on {} (no node holding it can reach them)",
                p.without_secret.join(", ")
            );
        }
    }
    if let Some(p) = progress.filter(|p| !p.behind.is_empty()) {
        return Err(NotFinished(format!(
            "PSK generation {generation} not reached within {}s by: {}",
            a.timeout,
            p.behind.join(", ")
        ))
        .into());
    }
    Ok(())
}

async fn rotate(a: RotateArgs, reg: &RegistryArgs) -> Result<()> {
    if a.max_parallel == 0 {
        return Err(bad("max-parallel", "must be at least 1").into());
    }
    if a.timeout == 0 {
        return Err(bad("timeout", "must be at least 1 second").into());
    }
    for n in &a.nodes {
        check_node("node", n)?;
    }
    let registry = open(reg)?;
    let (records, _) = weft_registry::list_nodes(&*registry)
        .await
        .context("reading the node records")?;
    let nodes: Vec<String> = if a.all {
        if records.is_empty() {
            bail!("no node records in {}", registry.describe());
        }
        records.iter().map(|r| r.name.clone()).collect()
    } else {
        let missing: Vec<&str> = a
            .nodes
            .iter()
            .filter(|n| !records.iter().any(|r| &r.name == *n))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            bail!(
                "no node record for {} in {} (nodes: {})",
                missing.join(", "),
                registry.describe(),
                records
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        a.nodes.clone()
    };
    let opts = rotate::Options {
        max_parallel: a.max_parallel,
        wait: a.wait,
        timeout: Duration::from_secs(a.timeout),
        poll: Duration::from_millis(250),
    };
    let start = Instant::now();
    let json = a.json;
    let mut report = |p: &rotate::Progress| {
        let line = progress_line(p, start.elapsed());
        if json {
            eprintln!("{line}");
        } else {
            // Progress is best effort: a closed stdout must not stop the rollout.
            let _ = print_line(&line);
        }
    };
    let outcome = rotate::run(&registry, &nodes, &opts, &mut report).await?;
    if outcome.finished && a.wait {
        // Retired keys make the configs printed for external peers stale.
        refresh_peer_staleness(&registry).await;
    }
    if json {
        let nodes: Vec<serde_json::Value> = outcome
            .targets
            .iter()
            .map(|(name, t)| {
                let mut v = serde_json::to_value(t).unwrap_or_default();
                v["name"] = json!(name);
                v["keyGeneration"] = json!(outcome.generations.get(name));
                v
            })
            .collect();
        print_json(&json!({
            "finished": outcome.finished,
            "wait": a.wait,
            "nodes": nodes,
            "unfinished": outcome.unfinished,
        }))?;
    }
    if !outcome.finished {
        let within = if start.elapsed() >= opts.timeout {
            format!(" within {}s", a.timeout)
        } else {
            String::new()
        };
        return Err(NotFinished(format!(
            "rotation did not finish{within}: {}",
            outcome.unfinished.join("; ")
        ))
        .into());
    }
    if !json {
        if a.wait {
            say!("rotated {} node(s)", nodes.len());
        } else {
            say!(
                "rotation requested for {} node(s); not waiting for the last ones (use --wait, and `keyctl status` to follow them)",
                nodes.len()
            );
        }
    }
    Ok(())
}

fn progress_line(p: &rotate::Progress, elapsed: Duration) -> String {
    let t = format!("[{:6.1}s]", elapsed.as_secs_f64());
    match p {
        rotate::Progress::Requested {
            node,
            generation,
            reused,
        } => format!(
            "{t} {node}: requested key generation {generation}{}",
            if *reused {
                " (a request for it was already pending)"
            } else {
                ""
            }
        ),
        rotate::Progress::Rotating { node, next } => {
            format!("{t} {node}: rotating to {}", next.fingerprint())
        }
        rotate::Progress::Done {
            node,
            generation,
            key,
        } => format!(
            "{t} {node}: done: generation {generation}, key {}",
            key.fingerprint()
        ),
        rotate::Progress::NoRecord { node } => format!("{t} {node}: no record; skipped"),
        rotate::Progress::Approved { node, next } => format!(
            "{t} {node}: readmitted node; approved its next key {} as the successor of its approved key",
            next.fingerprint()
        ),
    }
}

fn fingerprints(keys: &[PublicKey]) -> String {
    keys.iter()
        .map(PublicKey::fingerprint)
        .collect::<Vec<_>>()
        .join(", ")
}

async fn revoke(a: RevokeArgs, reg: &RegistryArgs) -> Result<()> {
    check_node("NAME", &a.node)?;
    let registry = open(reg)?;
    let record = match weft_registry::get_node(&*registry, &a.node).await {
        Ok(r) => r,
        Err(
            e @ (weft_registry::RegistryError::Decode { .. }
            | weft_registry::RegistryError::NameMismatch { .. }),
        ) => {
            // meshd refuses such a record anyway; the name is revoked with the keys known.
            eprintln!("keyctl: warning: {e}; revoking the name with the keys revoked before");
            None
        }
        Err(e) => return Err(e).context(format!("reading {}'s record", a.node)),
    };
    // An external peer of that name is revoked the same way (names are unique across both).
    let external = match Typed::<ExternalPeer>::new(registry.clone())
        .get(&a.node)
        .await
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("keyctl: warning: {e}; revoking the name with the keys revoked before");
            None
        }
    };
    let current = revoke::current_keys(record.as_ref(), external.as_ref());
    let now = rotate::unix_now();
    let rev = revoke::update(&*registry, &a.node, revoke::OnCorrupt::Replace, |e| {
        Ok(revoke::revoke(&a.node, &current, e, now))
    })
    .await?;
    refresh_peer_staleness(&registry).await;
    let record = record.map(|_| ()).or(external.as_ref().map(|_| ()));
    if a.json {
        return print_json(&json!({
            "revocation": rev,
            "hasRecord": record.is_some(),
            "externalPeer": external.is_some(),
        }));
    }
    let n = &a.node;
    match &record {
        Some(_) => say!(
            "revoked {n}: {} key(s) refused ({})",
            rev.revoked_keys.len(),
            fingerprints(&rev.revoked_keys)
        ),
        None => say!(
            "revoked the name {n} (it has no record): it is refused with any key{}",
            if rev.revoked_keys.is_empty() {
                String::new()
            } else {
                format!("; keys {} stay refused", fingerprints(&rev.revoked_keys))
            }
        ),
    }
    if record.is_some() {
        say!(
            "every node drops {n} within a second and refuses these keys, even if {n} publishes them again."
        );
    }
    say!(
        "to let it back: make a new key on the node, read its public key there (out of band), then\n  keyctl readmit {n} --public-key KEY"
    );
    Ok(())
}

async fn readmit(a: ReadmitArgs, reg: &RegistryArgs) -> Result<()> {
    check_node("NAME", &a.node)?;
    let key: PublicKey = a
        .public_key
        .trim()
        .parse()
        .map_err(|e| bad("public-key", format!("not a WireGuard public key: {e}")))?;
    let registry = open(reg)?;
    let rev = revoke::update(&*registry, &a.node, revoke::OnCorrupt::Fail, |e| {
        revoke::readmit(&a.node, e, key)
    })
    .await?;
    refresh_peer_staleness(&registry).await;
    let published = match weft_registry::get_node(&*registry, &a.node).await {
        Ok(Some(r)) => Some(r.public_key),
        Ok(None) => match Typed::<ExternalPeer>::new(registry.clone())
            .get(&a.node)
            .await
        {
            Ok(p) => p.map(|p| p.public_key),
            Err(e) => {
                eprintln!("keyctl: warning: cannot read external peer {}: {e}", a.node);
                None
            }
        },
        Err(e) => {
            eprintln!("keyctl: warning: cannot read {}'s record: {e}", a.node);
            None
        }
    };
    if a.json {
        return print_json(&json!({
            "revocation": rev,
            "publishedKey": published,
            "admitted": published.is_some_and(|p| rev.admits(&p)),
        }));
    }
    let n = &a.node;
    say!("readmitted {n} with key {key}");
    match published {
        Some(p) if p == key => {
            say!("{n} publishes this key: every node takes it back within a second")
        }
        Some(p) => say!(
            "{n} publishes {} instead: it stays refused until it publishes the approved key",
            p.fingerprint()
        ),
        None => say!("{n} has no record yet: it is admitted once it publishes this key"),
    }
    Ok(())
}

/// What `peer add` and `peer config` read: every node record and every revocation.
async fn nodes_and_revocations(
    registry: &Arc<dyn Registry>,
) -> Result<(Vec<weft_core::NodeRecord>, Vec<Revocation>)> {
    let (records, _) = weft_registry::list_nodes(&**registry)
        .await
        .context("reading the node records")?;
    let (revocations, _) = Typed::<Revocation>::new(registry.clone())
        .list()
        .await
        .context("reading the revocations")?;
    Ok((records, revocations))
}

/// Shows each external peer's config staleness where the registry has a place for it (kube:
/// MeshPeer `.status`, the `kubectl get meshpeers` Config column; written only when the verdict
/// changed). Never fails the command: a user who may only read is skipped without a word, any
/// other error is a warning.
async fn show_peer_staleness(registry: &dyn Registry, peers: &[status::ExternalStatus]) {
    for p in peers {
        let summary = p.config.describe(p.config_printed_at > 0);
        match registry
            .put_peer_config_status(&p.name, p.config.stale, &summary)
            .await
        {
            Ok(_) | Err(weft_registry::RegistryError::PermissionDenied { .. }) => {}
            Err(e) => eprintln!(
                "keyctl: warning: could not show {}'s config status: {e}",
                p.name
            ),
        }
    }
}

/// [`show_peer_staleness`] after reading the nodes, revocations and external peers (once keys
/// have changed: `keyctl rotate --wait`, `revoke`, `readmit`).
async fn refresh_peer_staleness(registry: &Arc<dyn Registry>) {
    let read = async {
        let (records, revocations) = nodes_and_revocations(registry).await?;
        let (externals, _) = Typed::<ExternalPeer>::new(registry.clone())
            .list()
            .await
            .context("reading the external peers")?;
        anyhow::Ok(status::external_view(&status::Contents {
            records,
            revocations,
            externals,
            ..Default::default()
        }))
    };
    match read.await {
        Ok(peers) => show_peer_staleness(&**registry, &peers).await,
        Err(e) => {
            eprintln!("keyctl: warning: could not refresh the external peers' config status: {e:#}")
        }
    }
}

/// Prints a peer's config (or JSON with the record and the config).
fn print_config(p: &ExternalPeer, nodes: &[weft_core::NodeRecord], json: bool) -> Result<()> {
    let config = peer::render_config(p, nodes);
    if json {
        return print_json(&json!({
            "peer": p,
            "nodes": nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            "config": config,
        }));
    }
    print_text(&config)
}

async fn peer_add(a: PeerAddArgs, reg: &RegistryArgs) -> Result<()> {
    check_node("NAME", &a.name)?;
    let public_key: PublicKey = a
        .public_key
        .trim()
        .parse()
        .map_err(|e| bad("public-key", format!("not a WireGuard public key: {e}")))?;
    let allowed_ips =
        parse_allowed_ips(&a.allowed_ips).map_err(|e| bad("allowed-ips", e.to_string()))?;
    let endpoint = a
        .endpoint
        .as_deref()
        .map(peer::parse_endpoint)
        .transpose()?;
    let now = rotate::unix_now();
    let mut new = ExternalPeer {
        schema: weft_core::external::SCHEMA_VERSION,
        name: a.name.clone(),
        public_key,
        allowed_ips,
        endpoint,
        created_at: now,
        config_keys: Default::default(),
        config_printed_at: now,
    };
    new.check().map_err(|e| peer::usage_error(&e))?;
    let registry = open(reg)?;
    let (records, revocations) = nodes_and_revocations(&registry).await?;
    if let Some(rev) = revocations.iter().find(|r| r.node == a.name) {
        if !rev.admits(&public_key) {
            bail!(
                "{n} is revoked (revocations/{n}) and this key is not its approved key; meshd would \
                 refuse it. Approve it first: keyctl readmit {n} --public-key {public_key}",
                n = a.name
            );
        }
    }
    let nodes = peer::config_nodes(records.clone(), &revocations);
    new.config_keys = peer::config_keys(&nodes);
    // Checked against every node record (even refused ones) and every other external peer.
    let written = peer::add(&*registry, &new, &records).await?;
    refresh_peer_staleness(&registry).await;
    eprintln!(
        "keyctl: added external peer {} (key {}, allowed IPs {}{}); every node adds it within a \
         second. Fill in its PrivateKey in the config below.",
        written.name,
        written.public_key.fingerprint(),
        a.allowed_ips,
        written
            .endpoint
            .map(|e| format!(", endpoint {e}"))
            .unwrap_or_else(|| ", endpoint learnt from its first handshake".into()),
    );
    print_config(&written, &nodes, a.json)
}

async fn peer_config(a: PeerNameArgs, reg: &RegistryArgs) -> Result<()> {
    check_node("NAME", &a.name)?;
    let registry = open(reg)?;
    let (records, revocations) = nodes_and_revocations(&registry).await?;
    let nodes = peer::config_nodes(records, &revocations);
    let p = peer::record_config(
        &*registry,
        &a.name,
        &peer::config_keys(&nodes),
        rotate::unix_now(),
    )
    .await?;
    refresh_peer_staleness(&registry).await;
    if nodes.iter().any(|n| n.next_public_key.is_some()) {
        eprintln!(
            "keyctl: note: a node is rotating its key; print the config again once it finished"
        );
    }
    print_config(&p, &nodes, a.json)
}

async fn peer_rm(a: PeerNameArgs, reg: &RegistryArgs) -> Result<()> {
    check_node("NAME", &a.name)?;
    let registry = open(reg)?;
    let removed = registry
        .delete(weft_registry::Kind::Peers, &a.name)
        .await
        .with_context(|| {
            format!(
                "removing {}",
                registry.location(weft_registry::Kind::Peers, &a.name)
            )
        })?;
    if !removed {
        bail!("no external peer named {} (keyctl peer list)", a.name);
    }
    if a.json {
        return print_json(&json!({ "removed": a.name }));
    }
    say!(
        "removed external peer {}: every node drops it within a second",
        a.name
    );
    Ok(())
}

async fn peer_list(a: PeerListArgs, reg: &RegistryArgs) -> Result<()> {
    let registry = open(reg)?;
    let (records, revocations) = nodes_and_revocations(&registry).await?;
    let (externals, _) = Typed::<ExternalPeer>::new(registry.clone())
        .list()
        .await
        .context("reading the external peers")?;
    let peers = status::external_view(&status::Contents {
        records,
        revocations,
        externals,
        ..Default::default()
    });
    show_peer_staleness(&*registry, &peers).await;
    if a.json {
        return print_json(&json!({ "externalPeers": peers }));
    }
    if peers.is_empty() {
        say!("no external peers in {}", registry.describe());
        return Ok(());
    }
    print_text(&status::render_external(&peers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let mut v = vec!["keyctl"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).expect("parses")
    }

    /// Registry flags work before and after the subcommand, for nested subcommands too, and a
    /// bad value is still a usage error naming the flag.
    #[test]
    fn registry_flags_before_or_after_the_subcommand() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = format!("dir:{}", tmp.path().display());
        let forms: &[&[&str]] = &[
            &["--registry", &dir, "rotate", "--all"],
            &["rotate", "--all", "--registry", &dir],
            &["--registry", &dir, "peer", "list"],
            &["peer", "list", "--registry", &dir],
            &["peer", "--registry", &dir, "list"],
            &["graph", "--format", "svg", "--registry", &dir],
            &["--registry", &dir, "status", "--peers"],
        ];
        for f in forms {
            let cli = parse(f);
            assert_eq!(cli.registry.registry, dir, "{f:?}");
            let (spec, _) = cli.registry.validate().expect("valid");
            assert_eq!(spec, dir);
        }
        let before = parse(&[
            "--etcd-prefix",
            "/k",
            "status",
            "--registry",
            "etcd://h:2379",
        ]);
        assert_eq!(before.registry.etcd_prefix, "/k");
        assert_eq!(before.registry.registry, "etcd://h:2379");
        for f in [
            &["--registry", "dir:/nonexistent/weft", "status"][..],
            &["status", "--registry", "dir:/nonexistent/weft"][..],
        ] {
            let e = parse(f).registry.validate().expect_err("bad dir");
            assert_eq!(e.flag, "registry", "{f:?}");
        }
        assert!(matches!(
            parse(&["graph"]).command,
            Command::Graph(GraphArgs {
                format: GraphFormat::Dot,
                output: None
            })
        ));
    }
}
