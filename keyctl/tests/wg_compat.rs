//! keyctl against wg(8): keys must be byte-compatible in both directions.
//!
//! Needs `wg` from wireguard-tools (Debian: `apt-get install wireguard-tools`); set `WEFT_WG` to
//! use another binary. Without it these tests fail: they must never pass silently.

use std::io::Write;
use std::process::{Command, Output, Stdio};

const KEYCTL: &str = env!("CARGO_BIN_EXE_keyctl");
const ROUNDS: usize = 16;

fn wg() -> String {
    let wg = std::env::var("WEFT_WG").unwrap_or_else(|_| "wg".to_string());
    match Command::new(&wg).arg("--version").output() {
        Ok(o) if o.status.success() => wg,
        Ok(o) => panic!("`{wg} --version` failed: {o:?}"),
        Err(e) => panic!(
            "cannot run `{wg}` ({e}): these tests check byte-compatibility with wireguard-tools \
             and need it installed (Debian: apt-get install wireguard-tools) or WEFT_WG set"
        ),
    }
}

fn run(program: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {program}: {e}"));
    // A program may exit before reading stdin (bad input, --help): a broken pipe is not the
    // failure under test, its exit status and output are.
    if let Some(mut pipe) = child.stdin.take() {
        let _ = pipe.write_all(stdin);
    }
    child.wait_with_output().expect("wait")
}

fn ok_stdout(program: &str, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let out = run(program, args, stdin);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn assert_key_line(bytes: &[u8]) {
    assert_eq!(
        bytes.len(),
        45,
        "44 base64 characters and a newline: {bytes:?}"
    );
    assert_eq!(bytes[44], b'\n');
    assert_eq!(bytes[43], b'=');
}

#[test]
fn wg_genkey_then_keyctl_pubkey_matches_wg_pubkey() {
    let wg = wg();
    for _ in 0..ROUNDS {
        let private = ok_stdout(&wg, &["genkey"], b"");
        let ours = ok_stdout(KEYCTL, &["pubkey"], &private);
        let theirs = ok_stdout(&wg, &["pubkey"], &private);
        assert_key_line(&ours);
        assert_eq!(ours, theirs, "public keys differ for {private:?}");
    }
}

#[test]
fn keyctl_genkey_then_wg_pubkey_matches_keyctl_pubkey() {
    let wg = wg();
    for _ in 0..ROUNDS {
        let private = ok_stdout(KEYCTL, &["genkey"], b"");
        assert_key_line(&private);
        let theirs = ok_stdout(&wg, &["pubkey"], &private);
        let ours = ok_stdout(KEYCTL, &["pubkey"], &private);
        assert_eq!(ours, theirs, "public keys differ for {private:?}");
        // wg accepts our private key as its own format: `wg pubkey` refuses anything else.
        assert_key_line(&theirs);
    }
}

#[test]
fn pubkey_refuses_bad_input_with_exit_1() {
    for input in [&b""[..], b"\n", b"garbage\n", b"AAAA\n", b"\xff\xfe\n"] {
        let out = run(KEYCTL, &["pubkey"], input);
        assert_eq!(out.status.code(), Some(1), "input {input:?}");
        assert!(out.stdout.is_empty(), "printed something for {input:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("private key"),
            "unclear error for {input:?}: {err}"
        );
    }
}

#[test]
fn help_is_truthful() {
    let out = ok_stdout(KEYCTL, &["--help"], b"");
    let help = String::from_utf8_lossy(&out);
    for cmd in ["genkey", "pubkey", "status", "rotate", "revoke", "readmit"] {
        assert!(help.contains(cmd), "{cmd} missing from help: {help}");
    }
    assert!(!help.contains("later release"), "{help}");
    // Commands that do not exist are refused as usage errors (exit 64, like meshd).
    for absent in ["psk", "rekey"] {
        let out = run(KEYCTL, &[absent], b"");
        assert_eq!(
            out.status.code(),
            Some(64),
            "`keyctl {absent}` pretends to work"
        );
    }
}
