//! meshd, weft's node daemon.
//!
//! In: flags (or `WEFT_*` env vars), node records, external peer records and revocations from
//! the registry, packets from the TUN and datagrams from the UDP socket. Out: an encrypted
//! WireGuard mesh to every other node and every external standard WireGuard peer that no
//! revocation or conflict refuses, routes for their ranges, this node's record in the registry,
//! and status on a local socket.
//! Exit codes: 0 ok, 64 bad flags or config, 1 runtime failure.

mod api;
mod config;
mod daemon;
mod datapath;
mod install;
mod keyfile;
mod kube;
mod logging;
mod metrics;
mod podcidr;
mod probes;
mod revocations;
mod rotation;
mod shards;
mod uapi;
mod worker;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "meshd",
    version,
    about = "weft node daemon: an encrypted WireGuard mesh between Kubernetes nodes"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the node daemon in the foreground.
    Run(Box<config::RunArgs>),
    /// Show this node and its peers (over the API socket).
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, env = "WEFT_API_SOCKET", default_value = "/run/weft/meshd.sock")]
        api_socket: PathBuf,
    },
    /// Install the CNI plugin: copy weft-cni (from next to meshd) into the CNI bin dir and write
    /// 10-weft.conflist into the CNI conf dir, both atomically.
    InstallCni(install::InstallArgs),
    /// Leave the mesh for good: the running meshd deletes this node's record, removes its
    /// routes (also the fail-closed ones) and exits.
    Leave {
        #[arg(long, env = "WEFT_API_SOCKET", default_value = "/run/weft/meshd.sock")]
        api_socket: PathBuf,
    },
}

const EXIT_USAGE: u8 = 64;

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
    // The control loop runs on this current-thread runtime; each data-path worker has its own
    // thread and current-thread runtime, so a packet is read, encrypted and sent on one thread
    // (no hand-off between threads on the way).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.cmd {
        Cmd::Run(args) => {
            let cfg = match args.validate() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("meshd: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            logging::init(cfg.json_logs, &cfg.node_name);
            weft_registry::set_repeat_interval(cfg.log_repeat_interval);
            match rt.block_on(daemon::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("meshd: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Status { json, api_socket } => {
            match rt.block_on(api::request(&api_socket, "status")) {
                Ok(reply) => {
                    if json {
                        print!("{reply}");
                    } else {
                        match serde_json::from_str::<serde_json::Value>(&reply) {
                            Ok(v) => print!("{}", api::render(&v)),
                            Err(_) => print!("{reply}"),
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("meshd status: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::InstallCni(args) => match install::run(&args) {
            Ok(msg) => {
                println!("{msg}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meshd install-cni: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Leave { api_socket } => match rt.block_on(api::request(&api_socket, "leave")) {
            Ok(reply) => {
                print!("{reply}");
                let ok = serde_json::from_str::<serde_json::Value>(&reply)
                    .ok()
                    .and_then(|v| v["left"].as_bool())
                    .unwrap_or(false);
                if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("meshd leave: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
