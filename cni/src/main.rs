//! weft-cni: the CNI plugin that will put pods on the weft mesh.
//!
//! In: the CNI environment (`CNI_COMMAND`, ...) and, for ADD/DEL/CHECK, the network
//! configuration on stdin, as the container runtime provides them (CNI spec 1.1). Out: a CNI
//! result or error as JSON on stdout, exit code 0 on success and 1 on error.
//!
//! This build implements only `VERSION`. Any other `CNI_COMMAND` (ADD, DEL, CHECK, ...) or none
//! at all gets a CNI error with code 4 ("invalid necessary environment variables": this build
//! cannot act on the `CNI_COMMAND` it was given) saying ADD/DEL/CHECK are not implemented yet.
//! No tokio on purpose: a CNI plugin is a short-lived process run per pod operation.

use serde::Serialize;
use std::io::Write;
use std::process::ExitCode;

/// The CNI spec version this plugin speaks.
const CNI_VERSION: &str = "1.1.0";
/// Every spec version this plugin can answer `VERSION` for.
const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// CNI well-known error code 4: "invalid necessary environment variables".
const ERR_INVALID_ENV: u32 = 4;

const USAGE: &str = "\
weft-cni: the weft CNI plugin (CNI spec 1.1).

Run by the container runtime, not by hand. It reads CNI_COMMAND and the other CNI_* variables
from the environment and the network configuration from stdin, and writes JSON to stdout.

This build implements only CNI_COMMAND=VERSION. ADD, DEL, CHECK and GC are not implemented
yet: they return a CNI error (code 4) and exit 1.

Example:
  CNI_COMMAND=VERSION weft-cni
";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VersionResult<'a> {
    cni_version: &'a str,
    supported_versions: &'a [&'a str],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CniError<'a> {
    cni_version: &'a str,
    code: u32,
    msg: &'a str,
    details: String,
}

/// What to print on stdout and the exit status, for a given command line and `CNI_COMMAND`.
fn respond(args: &[String], command: Option<&str>) -> (String, ExitCode) {
    if args.len() == 1 && matches!(args[0].as_str(), "--help" | "-h") {
        return (USAGE.to_string(), ExitCode::SUCCESS);
    }
    match command {
        Some("VERSION") => {
            let v = VersionResult {
                cni_version: CNI_VERSION,
                supported_versions: SUPPORTED_VERSIONS,
            };
            (to_json(&v), ExitCode::SUCCESS)
        }
        Some(cmd @ ("ADD" | "DEL" | "CHECK" | "GC" | "STATUS")) => error(
            "command not implemented in this build",
            format!(
                "CNI_COMMAND={cmd} is not implemented in this build of weft-cni; \
                 only VERSION is (ADD, DEL and CHECK come in a later release)"
            ),
        ),
        Some(other) => error(
            "unknown CNI_COMMAND",
            format!(
                "CNI_COMMAND={other:?} is not a CNI command; this build of weft-cni implements \
                 only VERSION (ADD, DEL and CHECK are not implemented yet)"
            ),
        ),
        None => error(
            "CNI_COMMAND is not set",
            "weft-cni is a CNI plugin run by the container runtime with CNI_COMMAND set; \
             this build implements only CNI_COMMAND=VERSION (ADD, DEL and CHECK are not \
             implemented yet). Run with --help for usage."
                .to_string(),
        ),
    }
}

fn error(msg: &str, details: String) -> (String, ExitCode) {
    let e = CniError {
        cni_version: CNI_VERSION,
        code: ERR_INVALID_ENV,
        msg,
        details,
    };
    (to_json(&e), ExitCode::FAILURE)
}

fn to_json<T: Serialize>(v: &T) -> String {
    // Plain strings and numbers always serialise; the fallback is unreachable in practice.
    serde_json::to_string(v).unwrap_or_else(|_| {
        format!(r#"{{"cniVersion":"{CNI_VERSION}","code":999,"msg":"internal error"}}"#)
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = std::env::var("CNI_COMMAND").ok();
    let (out, code) = respond(&args, command.as_deref().filter(|c| !c.is_empty()));
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "{}", out.trim_end())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    code
}
