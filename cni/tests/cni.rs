//! weft-cni as a container runtime runs it: environment in, JSON out.

use std::process::{Command, Output, Stdio};

const PLUGIN: &str = env!("CARGO_BIN_EXE_weft-cni");

fn run(command: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(PLUGIN);
    cmd.args(args)
        .env_remove("CNI_COMMAND")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(c) = command {
        cmd.env("CNI_COMMAND", c);
    }
    cmd.output().expect("run weft-cni")
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn version() {
    let out = run(Some("VERSION"), &[]);
    assert!(out.status.success());
    assert_eq!(
        json(&out),
        serde_json::json!({
            "cniVersion": "1.1.0",
            "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        })
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}"#
    );
}

fn assert_cni_error(out: &Output, detail_has: &str) {
    assert_eq!(out.status.code(), Some(1));
    let v = json(out);
    assert_eq!(v["cniVersion"], "1.1.0");
    assert_eq!(v["code"], 4);
    assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    let details = v["details"].as_str().expect("details");
    assert!(details.contains(detail_has), "{details}");
    assert!(details.contains("not implemented"), "{details}");
}

#[test]
fn unimplemented_commands_are_cni_errors() {
    for cmd in ["ADD", "DEL", "CHECK"] {
        assert_cni_error(&run(Some(cmd), &[]), cmd);
    }
    assert_cni_error(&run(Some("BOGUS"), &[]), "BOGUS");
    assert_cni_error(&run(None, &[]), "CNI_COMMAND");
    assert_cni_error(&run(Some(""), &[]), "CNI_COMMAND");
}

#[test]
fn help() {
    for flag in ["--help", "-h"] {
        let out = run(None, &[flag]);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("VERSION"), "{text}");
        assert!(text.contains("not implemented"), "{text}");
    }
}
