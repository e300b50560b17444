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

fn run_with(env: &[(&str, &str)], stdin: &str) -> Output {
    let mut cmd = Command::new(PLUGIN);
    for k in [
        "CNI_COMMAND",
        "CNI_CONTAINERID",
        "CNI_NETNS",
        "CNI_IFNAME",
        "CNI_PATH",
    ] {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run weft-cni");
    use std::io::Write;
    // The plugin may answer (e.g. a missing CNI_COMMAND) and exit before reading stdin: a
    // broken pipe here is not a failure, its answer is what the test checks.
    if let Some(mut pipe) = child.stdin.take() {
        let _ = pipe.write_all(stdin.as_bytes());
    }
    child.wait_with_output().expect("wait")
}

fn assert_code(out: &Output, code: u64) -> serde_json::Value {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v = json(out);
    assert_eq!(v["code"], code, "{v}");
    assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    v
}

const CONF: &str = r#"{"cniVersion":"1.0.0","name":"weft","type":"weft-cni"}"#;

#[test]
fn bad_environment_is_code_4_naming_every_variable() {
    let v = assert_code(&run_with(&[("CNI_COMMAND", "ADD")], CONF), 4);
    let msg = v["msg"].as_str().unwrap_or_default();
    for name in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"] {
        assert!(msg.contains(name), "{msg}");
    }
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_code(&run_with(&[], CONF), 4);
    assert_code(&run_with(&[("CNI_COMMAND", "BOGUS")], CONF), 4);
    for bad in ["0123456789abcdef", "a/b", "a:b", "a b", ".", ".."] {
        let v = assert_code(
            &run_with(
                &[
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "c1"),
                    ("CNI_NETNS", "/run/netns/none"),
                    ("CNI_IFNAME", bad),
                    ("CNI_PATH", "/opt/cni/bin"),
                ],
                CONF,
            ),
            4,
        );
        assert!(
            v["msg"]
                .as_str()
                .unwrap_or_default()
                .ends_with("CNI_IFNAME"),
            "{bad}: {v}"
        );
    }
}

#[test]
fn bad_config_has_spec_codes() {
    let env = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];
    assert_code(&run_with(&env, "{not json"), 6);
    assert_code(
        &run_with(
            &env,
            r#"{"cniVersion":"2.0.0","name":"weft","type":"weft-cni"}"#,
        ),
        1,
    );
    let v = assert_code(
        &run_with(
            &env,
            r#"{"cniVersion":"1.1.0","name":"weft","type":"weft-cni","mystery":true}"#,
        ),
        2,
    );
    assert!(v["msg"].as_str().unwrap_or_default().contains("mystery"));
    assert_code(
        &run_with(
            &env,
            r#"{"cniVersion":"1.1.0","name":"weft","type":"weft-cni","ipMasq":"yes"}"#,
        ),
        7,
    );
}

#[test]
fn help() {
    for flag in ["--help", "-h"] {
        let out = run(None, &[flag]);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        for cmd in ["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"] {
            assert!(text.contains(cmd), "{text}");
        }
    }
}
