//! weft-cni-bench: how long a pod attach/detach takes with weft-cni versus the reference
//! `ptp` + `host-local` plugins, on one node namespace with meshd running (so node.json exists).
//!
//! Every operation is run the way a runtime runs a plugin: `ip netns exec NODE PLUGIN` with the
//! CNI_* environment and the config on stdin (cniVersion 1.0.0 for both; ptp with `ipMasq` and
//! host-local on 10.99.0.0/16 with its data dir in the test's temp dir). Rounds alternate between
//! the plugins; each round is ADD then DEL of one container in a pod namespace. A third row,
//! `exec only`, times `ip netns exec NODE true` (the fixed cost included in every number).
//! weft-cni: `WEFT_CNI_BIN`, else target/release/weft-cni if built
//! (`cargo build --release -p weft-cni`), else target/debug/weft-cni; the table says which.
//!
//! Usage (root): weft-cni-bench [--rounds N (40)] [--warmup N (3)] [--json FILE]

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use weft_tests::cni::{netns_path, run_with_stdin};
use weft_tests::util::{ns_cmd, percentile, require_root};
use weft_tests::{weft_cni_best_bin, Cluster, CniCall, CniOutput, Node};

#[derive(Debug)]
struct Args {
    rounds: usize,
    warmup: usize,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        rounds: 40,
        warmup: 3,
        json: None,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let val = || {
            v.get(i + 1)
                .cloned()
                .ok_or_else(|| anyhow!("{} needs a value", v[i]))
        };
        match v[i].as_str() {
            "--rounds" => a.rounds = val()?.parse().context("--rounds")?,
            "--warmup" => a.warmup = val()?.parse().context("--warmup")?,
            "--json" => a.json = Some(PathBuf::from(val()?)),
            "-h" | "--help" => {
                println!("weft-cni-bench [--rounds N] [--warmup N] [--json FILE]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
        i += 2;
    }
    if a.rounds == 0 {
        bail!("--rounds must be positive");
    }
    Ok(a)
}

/// One plugin under test.
#[derive(Debug)]
struct Subject {
    name: String,
    detail: String,
    plugin: PathBuf,
    config: Value,
    netns: String,
    add_ms: Vec<f64>,
    del_ms: Vec<f64>,
}

impl Subject {
    fn call(&self, command: &str, round: usize) -> CniCall {
        let cid = format!("bench-{}-{round}", self.name.replace(['+', ' '], "-"));
        CniCall::new(command, &cid, &netns_path(&self.netns), &self.config).plugin(&self.plugin)
    }

    fn round(&mut self, node: &Node, round: usize, record: bool) -> Result<()> {
        let add = node.cni_exec(&self.call("ADD", round))?;
        check(&add, &self.name, "ADD")?;
        let del = node.cni_exec(&self.call("DEL", round))?;
        check(&del, &self.name, "DEL")?;
        if record {
            self.add_ms.push(ms(add.elapsed));
            self.del_ms.push(ms(del.elapsed));
        }
        Ok(())
    }

    fn sums(&self) -> Vec<f64> {
        self.add_ms
            .iter()
            .zip(&self.del_ms)
            .map(|(a, d)| a + d)
            .collect()
    }
}

fn check(out: &CniOutput, name: &str, what: &str) -> Result<()> {
    if !out.success() {
        bail!("{name} {what} failed: {}", out.describe());
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn p(v: &[f64], q: f64) -> f64 {
    percentile(v, q).unwrap_or(f64::NAN)
}

fn stats(v: &[f64]) -> Value {
    json!({"p50": p(v, 50.0), "p99": p(v, 99.0), "min": p(v, 0.0), "max": p(v, 100.0),
           "samplesMs": v})
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("weft-cni-bench: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = require_root().and_then(|_| run(&args)) {
        eprintln!("weft-cni-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    let (weft_bin, build) = weft_cni_best_bin()?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "weft-cni-bench: {} rounds (+{} warm-up) of ADD+DEL per plugin; weft-cni {build} build \
         ({}); loadavg at start: {}",
        args.rounds,
        args.warmup,
        weft_bin.display(),
        load.trim()
    );
    let c = Cluster::with_nodes(1)?;
    let node = c.node(0);
    node.cni_install()?;
    node.start_meshd(&[])?;
    node.wait_node_json(Duration::from_secs(10))?;

    let mut weft_cfg = node.cni_config("1.0.0");
    weft_cfg["name"] = json!("weftbench");
    let ipam_dir = node.dir.join("host-local");
    std::fs::create_dir_all(&ipam_dir)?;
    let mtu = node.mesh_mtu()?;
    let ptp_cfg = json!({
        "cniVersion": "1.0.0",
        "name": "ptpbench",
        "type": "ptp",
        "ipMasq": true,
        "mtu": mtu,
        "ipam": {
            "type": "host-local",
            "subnet": "10.99.0.0/16",
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": ipam_dir.display().to_string(),
        },
    });
    let mut subjects = [
        Subject {
            name: "weft-cni".into(),
            detail: format!("{build} build"),
            plugin: weft_bin.clone(),
            config: weft_cfg,
            netns: node.cni_netns(0)?,
            add_ms: Vec::new(),
            del_ms: Vec::new(),
        },
        Subject {
            name: "ptp+host-local".into(),
            detail: "containernetworking-plugins (Debian)".into(),
            plugin: node.cni_bin_dir().join("ptp"),
            config: ptp_cfg,
            netns: node.cni_netns(1)?,
            add_ms: Vec::new(),
            del_ms: Vec::new(),
        },
    ];
    let mut exec_ms = Vec::new();
    for r in 0..args.warmup + args.rounds {
        let record = r >= args.warmup;
        // Alternate which plugin goes first so drift hits both alike.
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            subjects[i].round(node, r, record)?;
        }
        let t = Instant::now();
        let out = run_with_stdin(&mut ns_cmd(&node.ns, "true"), b"", Duration::from_secs(10))?;
        if !out.success() {
            bail!("ip netns exec true failed: {}", out.describe());
        }
        if record {
            exec_ms.push(ms(t.elapsed()));
        }
    }

    let (w, r) = (&subjects[0], &subjects[1]);
    let mut table = String::new();
    table.push_str(&format!(
        "weft-cni-bench: {} rounds of ADD then DEL, `ip netns exec NODE PLUGIN`, cniVersion \
         1.0.0, milliseconds\n\n",
        args.rounds
    ));
    table.push_str(
        "| plugin | ADD p50 | ADD p99 | DEL p50 | DEL p99 | ADD+DEL p50 | ADD+DEL p99 |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for s in [w, r] {
        let sums = s.sums();
        table.push_str(&format!(
            "| {} ({}) | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            s.name,
            s.detail,
            p(&s.add_ms, 50.0),
            p(&s.add_ms, 99.0),
            p(&s.del_ms, 50.0),
            p(&s.del_ms, 99.0),
            p(&sums, 50.0),
            p(&sums, 99.0)
        ));
    }
    let ratio = |a: &[f64], b: &[f64], q: f64| p(a, q) / p(b, q);
    let (ws, rs) = (w.sums(), r.sums());
    table.push_str(&format!(
        "| ratio weft-cni / ptp+host-local | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
        ratio(&w.add_ms, &r.add_ms, 50.0),
        ratio(&w.add_ms, &r.add_ms, 99.0),
        ratio(&w.del_ms, &r.del_ms, 50.0),
        ratio(&w.del_ms, &r.del_ms, 99.0),
        ratio(&ws, &rs, 50.0),
        ratio(&ws, &rs, 99.0)
    ));
    table.push_str(&format!(
        "| exec only (`ip netns exec NODE true`) | {:.1} | {:.1} | | | | |\n",
        p(&exec_ms, 50.0),
        p(&exec_ms, 99.0)
    ));
    print!("{table}");

    if let Some(f) = &args.json {
        let subj = |s: &Subject| {
            json!({
                "name": s.name, "detail": s.detail, "plugin": s.plugin.display().to_string(),
                "config": s.config, "addMs": stats(&s.add_ms), "delMs": stats(&s.del_ms),
                "addDelMs": stats(&s.sums()),
            })
        };
        let v = json!({
            "rounds": args.rounds,
            "warmup": args.warmup,
            "weftBuild": build,
            "loadavgStart": load.trim(),
            "plugins": [subj(w), subj(r)],
            "execOnlyMs": stats(&exec_ms),
            "ratioP50": {"add": ratio(&w.add_ms, &r.add_ms, 50.0),
                         "del": ratio(&w.del_ms, &r.del_ms, 50.0),
                         "addDel": ratio(&ws, &rs, 50.0)},
            "ratioP99": {"add": ratio(&w.add_ms, &r.add_ms, 99.0),
                         "del": ratio(&w.del_ms, &r.del_ms, 99.0),
                         "addDel": ratio(&ws, &rs, 99.0)},
            "table": table,
        });
        std::fs::write(f, serde_json::to_vec_pretty(&v)?)
            .with_context(|| format!("writing {}", f.display()))?;
        eprintln!("weft-cni-bench: wrote {}", f.display());
    }
    Ok(())
}
