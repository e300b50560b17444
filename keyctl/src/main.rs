//! keyctl: weft's key management CLI.
//!
//! In: a subcommand, and for `pubkey` a base64 private key on stdin. Out: on stdout, a new
//! private key (`genkey`) or the matching public key (`pubkey`), base64 with a trailing newline,
//! byte-for-byte the format of `wg genkey` / `wg pubkey`. Errors go to stderr with exit code 1.
//!
//! Only key generation exists in this build; rotation and revocation commands come in a later
//! release and are deliberately absent rather than stubbed.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::io::{Read, Write};
use std::process::ExitCode;
use weft_core::keys::PrivateKey;

/// Largest stdin `pubkey` reads: a key is 44 base64 characters plus whitespace.
const MAX_INPUT: u64 = 4096;

#[derive(Debug, Parser)]
#[command(
    name = "keyctl",
    version,
    about = "weft key management: generate WireGuard-compatible X25519 keys",
    long_about = "weft key management.\n\n\
        This build has two commands, interchangeable with wg(8): `genkey` and `pubkey`. \
        Key rotation and revocation commands come in a later release; they are not in this \
        build.",
    after_help = "Examples:\n  keyctl genkey > node.key\n  keyctl pubkey < node.key\n\n\
        Rotation and revocation commands come in a later release."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a new random private key (base64, like `wg genkey`).
    Genkey,
    /// Read a private key on stdin and print its public key (like `wg pubkey`).
    Pubkey,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Genkey => genkey(),
        Command::Pubkey => pubkey(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the context chain on one line, without a backtrace.
            eprintln!("keyctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_line(s: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{s}")
        .and_then(|()| out.flush())
        .context("writing to stdout")
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
