//! weft-cni: the CNI plugin that puts pods on the weft mesh (CNI SPEC 1.1).
//!
//! In: the `CNI_*` environment and the network configuration on stdin, as a container runtime
//! gives them; meshd's `STATE_DIR/node.json` (the node's pod CIDRs and MTU). Out: a CNI result
//! (ADD) or error as JSON on stdout, exit 0 or 1; a veth pair, addresses, routes and an
//! allocation file per attachment (ADD), and their exact removal (DEL, GC). A current-thread
//! runtime at most: the plugin is a short-lived process run once per pod operation.
//!
//! # Design (the overview is in ARCHITECTURE.md)
//!
//! **weft-cni** (`cni/`) is the CNI plugin (SPEC 1.1; ADD, DEL, CHECK, STATUS, GC, VERSION). It is
//! a short-lived binary on a current-thread runtime that talks rtnetlink through weft-sys. `conf`
//! checks the `CNI_*` variables and the config with the spec's error codes. `ipam` keeps one file
//! per allocated address under a flock in the state dir. `attach` works in order: it creates the
//! veth pair in the host namespace and moves one end into the pod's namespace (opening a second
//! netlink socket there), adds the pod's /32 and its default route via 169.254.1.1, then the
//! host's /32 route and proxy ARP, and finally the nftables masquerade table (`weft_sys::nft`:
//! one nf_tables batch over `NETLINK_NETFILTER`, no `nft` binary; meshd `--masquerade` writes the
//! same rule once per node instead). If any step fails,
//! it undoes what was done and releases the address. Failpoints behind the `failpoints` feature
//! let tests break every step.

mod attach;
mod conf;
mod error;
mod ipam;
mod policy;

use conf::Command;
use error::CniError;
use std::io::{Read, Write};
use std::process::ExitCode;

const USAGE: &str = "\
weft-cni: the weft CNI plugin (CNI spec 1.1; cniVersion 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0).

Run by the container runtime, not by hand: it reads CNI_COMMAND (ADD, DEL, CHECK, STATUS, GC,
VERSION) and the other CNI_* variables from the environment and the network configuration from
stdin, and writes JSON to stdout. ADD gives the pod a veth pair and an address from this node's
pod CIDR (read from STATE_DIR/node.json, written by meshd); DEL and GC remove them.

Config fields: stateDir (/var/lib/weft), meshdSocket (/run/weft/meshd.sock), ipMasq (true),
ipam (optional: delegate to a standard IPAM plugin such as host-local).

Example:
  CNI_COMMAND=VERSION weft-cni
";

fn version_json() -> String {
    serde_json::json!({
        "cniVersion": conf::DEFAULT_VERSION,
        "supportedVersions": conf::SUPPORTED_VERSIONS,
    })
    .to_string()
}

/// Runs one CNI command; returns what to print and whether it succeeded.
fn run(stdin: &[u8]) -> (String, bool) {
    let env = match conf::read_env(|k| std::env::var(k).ok()) {
        Ok(e) => e,
        Err(e) => return (e.to_json(&conf::sniff_version(stdin)), false),
    };
    if env.command == Command::Version {
        return (version_json(), true);
    }
    let conf = match conf::parse(stdin) {
        Ok(c) => c,
        Err(e) => return (e.to_json(&conf::sniff_version(stdin)), false),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let e = CniError::new(error::IO_FAILURE, "cannot start the runtime", e.to_string());
            return (e.to_json(&conf.cni_version), false);
        }
    };
    let r: Result<Option<String>, CniError> = rt.block_on(async {
        match env.command {
            Command::Add => attach::add(&env, &conf).await.map(|v| Some(v.to_string())),
            Command::Del => attach::del(&env, &conf).await.map(|_| None),
            Command::Check => attach::check(&env, &conf).await.map(|_| None),
            Command::Status => attach::status(&conf).await.map(|_| None),
            Command::Gc => attach::gc(&conf).await.map(|_| None),
            Command::Version => Ok(Some(version_json())),
        }
    });
    match r {
        Ok(out) => (out.unwrap_or_default(), true),
        Err(e) => (e.to_json(&conf.cni_version), false),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() == 1 && matches!(args[0].as_str(), "--help" | "-h") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let mut stdin = Vec::new();
    let needs_stdin = !matches!(
        std::env::var("CNI_COMMAND").as_deref(),
        Ok("VERSION") | Err(_)
    );
    if needs_stdin {
        if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
            let e = CniError::new(error::IO_FAILURE, "cannot read stdin", e.to_string());
            println!("{}", e.to_json(conf::DEFAULT_VERSION));
            return ExitCode::FAILURE;
        }
    }
    let (out, ok) = run(&stdin);
    let mut so = std::io::stdout().lock();
    if !out.is_empty() {
        let _ = writeln!(so, "{out}");
    }
    let _ = so.flush();
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
