//! The runner of `tests/netpol/cases.json`: upstream's netpol cases as data.
//!
//! Format: `{"model": {...}, "cases": [{"name", "protocols", "steps": [{"actions": [...],
//! "expect": [{"protocol": "TCP", "port": 80, "grid": [9 rows of 9 '.'/'X']}]}]}]}`; rows are
//! the source pods in model order (x/a, x/b, .., z/c), columns the destinations. Actions:
//! `createPolicy` / `updatePolicy` (a NetworkPolicy), `deletePolicy` ("NS/NAME"),
//! `setPodLabels` ({"pod": "x/a", "labels": {..}}), `setNamespaceLabels` ({"namespace": "y",
//! "labels": {..}}). Policies may hold `{{ip NS/POD}}` (the pod's address) and
//! `{{cidr NS/POD LEN}}` (the network of that address at prefix LEN).

use super::{Convergence, Grid, NetpolModel, Proto};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long one expectation may take to hold.
pub const CONVERGE_WITHIN: Duration = Duration::from_secs(10);

/// `tests/netpol/cases.json` in the source tree (`WEFT_NETPOL_CASES_FILE` overrides).
pub fn cases_path() -> PathBuf {
    std::env::var_os("WEFT_NETPOL_CASES_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../netpol/cases.json"))
}

/// The parsed file.
#[derive(Debug, Clone)]
pub struct CasesFile {
    pub model: Value,
    pub cases: Vec<Value>,
}

/// Reads and parses [`cases_path`].
pub fn load_cases() -> Result<CasesFile> {
    let p = cases_path();
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
    let cases = v["cases"]
        .as_array()
        .cloned()
        .ok_or_else(|| anyhow!("{}: no \"cases\" array", p.display()))?;
    Ok(CasesFile {
        model: v["model"].clone(),
        cases,
    })
}

/// One checked expectation.
#[derive(Debug, Clone)]
pub struct ExpectReport {
    pub step: usize,
    pub convergence: Convergence,
    pub expected: Grid,
}

/// What [`run_case`] found.
#[derive(Debug, Clone)]
pub struct CaseReport {
    pub name: String,
    pub cells_checked: usize,
    pub cells_mismatched: usize,
    pub expectations: Vec<ExpectReport>,
    /// The slowest expectation's time to hold.
    pub max_converge: Duration,
    pub elapsed: Duration,
}

impl CaseReport {
    pub fn passed(&self) -> bool {
        self.cells_mismatched == 0
    }

    /// Every failed expectation with its observed grid (mismatches marked).
    pub fn failures(&self) -> String {
        let mut s = String::new();
        for e in &self.expectations {
            let c = &e.convergence;
            if !c.converged() {
                s.push_str(&format!(
                    "  step {} {}/{}: {} of {} cells wrong after {:?} ({} rounds):\n{}",
                    e.step,
                    c.protocol,
                    c.port,
                    c.mismatches.len(),
                    c.cells,
                    c.elapsed,
                    c.rounds,
                    c.last.pretty_against(Some(&e.expected))
                ));
            }
        }
        s
    }
}

/// Replaces `{{ip NS/POD}}` and `{{cidr NS/POD LEN}}` in `text`.
pub fn substitute(text: &str, ip_of: impl Fn(&str) -> Result<Ipv4Addr>) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let j = after
            .find("}}")
            .ok_or_else(|| anyhow!("unterminated template in {text:?}"))?;
        let words: Vec<&str> = after[..j].split_whitespace().collect();
        match words.as_slice() {
            ["ip", pod] => out.push_str(&ip_of(pod)?.to_string()),
            ["cidr", pod, len] => {
                let len: u8 = len
                    .parse()
                    .with_context(|| format!("prefix length {len:?}"))?;
                let net = ipnet::Ipv4Net::new(ip_of(pod)?, len)
                    .with_context(|| format!("prefix length {len}"))?
                    .trunc();
                out.push_str(&net.to_string());
            }
            _ => bail!("unknown template {{{{{}}}}}", &after[..j]),
        }
        rest = &after[j + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// (namespace or `NS/POD`, labels) pairs.
type Labels = Vec<(String, Value)>;

impl NetpolModel {
    /// A policy from cases.json with its templates filled in.
    pub fn render_policy(&self, np: &Value) -> Result<Value> {
        let text = substitute(&np.to_string(), |k| self.pod_ip(k))?;
        serde_json::from_str(&text).context("policy after template substitution")
    }

    /// Default labels of the model: from cases.json's `model` when given, else `ns: NAME` and
    /// `pod: NAME`.
    fn default_labels(&self, model: &Value) -> (Labels, Labels) {
        let nss = self
            .opts
            .namespaces
            .iter()
            .map(|ns| {
                let l = model["namespaceLabels"][ns.as_str()].clone();
                (
                    ns.clone(),
                    if l.is_object() {
                        l
                    } else {
                        json!({ "ns": ns })
                    },
                )
            })
            .collect();
        let pods = self
            .pods
            .iter()
            .map(|p| {
                let l = model["podLabels"][p.name.as_str()].clone();
                (
                    p.key(),
                    if l.is_object() {
                        l
                    } else {
                        json!({ "pod": p.name })
                    },
                )
            })
            .collect();
        (nss, pods)
    }

    /// No policy anywhere, default labels on every namespace and pod (only what differs is
    /// patched).
    pub fn reset_for_cases(&self, model: &Value) -> Result<()> {
        self.m.kube.kubectl(&[
            "delete",
            "networkpolicy",
            "--all",
            "--all-namespaces",
            "--wait=true",
        ])?;
        let (nss, pods) = self.default_labels(model);
        let cur_ns = self.m.kube.get_json(&["namespaces"])?;
        let cur_pods = self.m.kube.get_json(&["pods", "--all-namespaces"])?;
        let labels_of = |list: &Value, key: &str| -> Value {
            list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|o| {
                    let m = &o["metadata"];
                    let k = match m["namespace"].as_str() {
                        Some(ns) => format!("{ns}/{}", m["name"].as_str().unwrap_or("")),
                        None => m["name"].as_str().unwrap_or("").to_string(),
                    };
                    k == key
                })
                .map(|o| o["metadata"]["labels"].clone())
                .unwrap_or(Value::Null)
        };
        for (ns, want) in nss {
            let mut w = want.clone();
            w["kubernetes.io/metadata.name"] = json!(ns);
            if labels_of(&cur_ns, &ns) != w {
                self.set_namespace_labels(&ns, &want)?;
            }
        }
        for (key, want) in pods {
            if labels_of(&cur_pods, &key) != want {
                self.set_pod_labels(&key, &want)?;
            }
        }
        Ok(())
    }

    fn do_action(&self, a: &Value) -> Result<()> {
        let obj = a
            .as_object()
            .filter(|o| o.len() == 1)
            .ok_or_else(|| anyhow!("an action is an object with one key: {a}"))?;
        let Some((kind, v)) = obj.iter().next() else {
            bail!("empty action");
        };
        match kind.as_str() {
            "createPolicy" => self.apply_policy(&self.render_policy(v)?),
            "updatePolicy" => self.update_policy(&self.render_policy(v)?),
            "deletePolicy" => self.delete_policy(
                v.as_str()
                    .ok_or_else(|| anyhow!("deletePolicy wants \"NS/NAME\": {v}"))?,
            ),
            "setPodLabels" => self.set_pod_labels(
                v["pod"]
                    .as_str()
                    .ok_or_else(|| anyhow!("setPodLabels without pod: {v}"))?,
                &v["labels"],
            ),
            "setNamespaceLabels" => self.set_namespace_labels(
                v["namespace"]
                    .as_str()
                    .ok_or_else(|| anyhow!("setNamespaceLabels without namespace: {v}"))?,
                &v["labels"],
            ),
            _ => bail!("unknown action {kind}"),
        }
        .with_context(|| format!("action {kind}"))
    }

    /// Resets the model, then per step does the actions and checks every expectation (each
    /// may take [`CONVERGE_WITHIN`]). Errors only when something could not be done; wrong
    /// cells are counted in the report.
    pub fn run_case(&self, case: &Value) -> Result<CaseReport> {
        self.run_case_with(case, &Value::Null)
    }

    /// [`NetpolModel::run_case`] with the file's `model` (its default labels).
    pub fn run_case_with(&self, case: &Value, model: &Value) -> Result<CaseReport> {
        let t = Instant::now();
        let name = case["name"].as_str().unwrap_or("(unnamed)").to_string();
        self.reset_for_cases(model)
            .with_context(|| format!("resetting before {name:?}"))?;
        let keys = self.keys();
        let mut report = CaseReport {
            name: name.clone(),
            cells_checked: 0,
            cells_mismatched: 0,
            expectations: Vec::new(),
            max_converge: Duration::ZERO,
            elapsed: Duration::ZERO,
        };
        let steps = case["steps"]
            .as_array()
            .ok_or_else(|| anyhow!("case {name:?} has no steps"))?;
        for (si, step) in steps.iter().enumerate() {
            for a in step["actions"].as_array().into_iter().flatten() {
                self.do_action(a)
                    .with_context(|| format!("case {name:?} step {si}"))?;
            }
            for e in step["expect"].as_array().into_iter().flatten() {
                let proto = Proto::parse(e["protocol"].as_str().unwrap_or("TCP"))?;
                let port = e["port"]
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| anyhow!("case {name:?}: expectation without port: {e}"))?;
                let rows: Vec<String> = e["grid"]
                    .as_array()
                    .ok_or_else(|| anyhow!("case {name:?}: expectation without grid"))?
                    .iter()
                    .map(|r| r.as_str().unwrap_or("").to_string())
                    .collect();
                let expected = Grid::from_rows(&keys, &rows)
                    .with_context(|| format!("case {name:?} step {si} {proto}/{port}"))?;
                let c = self.expect_eventually(proto, port, &expected, CONVERGE_WITHIN)?;
                report.cells_checked += c.cells;
                report.cells_mismatched += c.mismatches.len();
                report.max_converge = report.max_converge.max(c.elapsed);
                report.expectations.push(ExpectReport {
                    step: si,
                    convergence: c,
                    expected,
                });
            }
        }
        report.elapsed = t.elapsed();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        let ip = |k: &str| -> Result<Ipv4Addr> {
            match k {
                "x/b" => Ok(Ipv4Addr::new(10, 42, 2, 17)),
                _ => bail!("no pod {k}"),
            }
        };
        assert_eq!(
            substitute(r#"{"cidr":"{{cidr x/b 24}}","ip":"{{ip x/b}}/32"}"#, ip).expect("ok"),
            r#"{"cidr":"10.42.2.0/24","ip":"10.42.2.17/32"}"#
        );
        assert_eq!(substitute("{{cidr x/b 4}}", ip).expect("ok"), "0.0.0.0/4");
        assert!(substitute("{{ip y/z}}", ip).is_err());
        assert!(substitute("{{nope}}", ip).is_err());
        assert!(substitute("{{ip x/b", ip).is_err());
    }

    #[test]
    fn cases_file_parses_if_present() {
        let Ok(f) = load_cases() else { return };
        let keys: Vec<String> = ["x", "y", "z"]
            .iter()
            .flat_map(|n| ["a", "b", "c"].iter().map(move |p| format!("{n}/{p}")))
            .collect();
        for c in &f.cases {
            for s in c["steps"].as_array().into_iter().flatten() {
                for e in s["expect"].as_array().into_iter().flatten() {
                    let rows: Vec<String> = e["grid"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|r| r.as_str().unwrap_or("").to_string())
                        .collect();
                    Grid::from_rows(&keys, &rows).expect("grid");
                    Proto::parse(e["protocol"].as_str().unwrap_or("")).expect("protocol");
                }
            }
        }
    }
}
