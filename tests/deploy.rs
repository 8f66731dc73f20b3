//! What `deploy/` ships, checked: the Prometheus rules and the Grafana
//! dashboard parse and use only metrics a running `omnibox publish
//! --metrics-addr` exports; the systemd units and Kubernetes manifests parse,
//! and the commands they run exist with those flags (the ones that can run
//! here are run against a scratch SQLite database).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Value {
    yaml_serde::from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

fn omnibox(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_omnibox"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run omnibox")
}

/// `omnibox_*` metric names in a PromQL expression.
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("omnibox_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.insert(name);
    }
    out
}

/// The families a running relay exports (from its `# TYPE` lines).
fn exported() -> BTreeSet<String> {
    let dir = tempfile::tempdir().unwrap();
    assert!(omnibox(dir.path(), &["migrate", "-q"]).status.success());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut relay = Command::new(env!("CARGO_BIN_EXE_omnibox"))
        .args(["publish", "--metrics-addr", &addr, "--broker", "null"])
        .current_dir(dir.path())
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let body = loop {
        if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
            s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
                .unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).unwrap();
            break body;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the relay never served metrics"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = relay.kill();
    let _ = relay.wait();
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// A used name is exported when it is a family or one of its samples.
fn is_exported(name: &str, families: &BTreeSet<String>) -> bool {
    families.contains(name)
        || ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .any(|s| name.strip_suffix(s).is_some_and(|f| families.contains(f)))
}

#[test]
fn alerts_and_dashboard_use_only_exported_metrics() {
    let families = exported();
    assert!(
        families.contains("omnibox_events_completed"),
        "{families:?}"
    );
    let mut used = BTreeSet::new();

    let rules = yaml("prometheus/alerts.yml");
    let groups = rules["groups"].as_array().expect("groups");
    let mut alerts = Vec::new();
    for g in groups {
        for r in g["rules"].as_array().expect("rules") {
            let name = r["alert"].as_str().expect("every rule is an alert");
            let expr = r["expr"].as_str().expect("expr");
            assert!(r["annotations"]["summary"].is_string(), "{name}: summary");
            assert!(r["labels"]["severity"].is_string(), "{name}: severity");
            alerts.push(name.to_string());
            used.extend(metrics_in(expr));
        }
    }
    for wanted in [
        "OmniboxRelayDown",
        "OmniboxLagHigh",
        "OmniboxFailuresRising",
        "OmniboxStaleLocks",
    ] {
        assert!(alerts.iter().any(|a| a == wanted), "{wanted} in {alerts:?}");
    }

    let dashboard: Value = serde_json::from_str(&read("grafana/omnibox.json")).expect("JSON");
    assert_eq!(dashboard["uid"], "omnibox");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut titles = Vec::new();
    for p in panels {
        titles.push(p["title"].as_str().unwrap().to_lowercase());
        for t in p["targets"].as_array().expect("targets") {
            used.extend(metrics_in(t["expr"].as_str().expect("expr")));
        }
    }
    for wanted in [
        "throughput",
        "failures by kind",
        "lag",
        "batch latency",
        "leases lost",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "{wanted} in {titles:?}"
        );
    }

    let missing: Vec<&String> = used.iter().filter(|u| !is_exported(u, &families)).collect();
    assert!(
        missing.is_empty(),
        "used but not exported: {missing:?}\nexported: {families:?}"
    );
}

/// The flags a command line passes must exist in that command's --help.
fn assert_flags_exist(argv: &[String]) {
    let dir = tempfile::tempdir().unwrap();
    let subcommand: Vec<&str> = argv
        .iter()
        .map(String::as_str)
        .take_while(|a| !a.starts_with('-'))
        .collect();
    let mut help_args = subcommand.clone();
    help_args.push("--help");
    let out = omnibox(dir.path(), &help_args);
    assert!(out.status.success(), "{help_args:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in argv.iter().filter(|a| a.starts_with("--")) {
        let flag = flag.split('=').next().unwrap();
        assert!(
            help.contains(flag),
            "{flag} is not a flag of {subcommand:?}"
        );
    }
}

#[test]
fn systemd_units_run_real_commands() {
    for unit in [
        "systemd/omnibox-relay.service",
        "systemd/omnibox-inbox.service",
    ] {
        let text = read(unit);
        for section in ["[Unit]", "[Service]", "[Install]"] {
            assert!(text.contains(section), "{unit}: {section}");
        }
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap_or_else(|| panic!("{unit}: ExecStart"));
        let mut words = exec.split_whitespace();
        assert_eq!(words.next(), Some("/usr/local/bin/omnibox"), "{unit}");
        let argv: Vec<String> = words.map(str::to_string).collect();
        assert_flags_exist(&argv);
        assert!(text.contains("KillSignal=SIGTERM"), "{unit}: graceful stop");
        assert!(text.contains("Restart=always"), "{unit}");
    }
}

fn containers(doc: &Value) -> Vec<Value> {
    let spec = if doc["kind"] == "CronJob" {
        &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    } else {
        &doc["spec"]["template"]["spec"]
    };
    spec["containers"].as_array().expect("containers").clone()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn kubernetes_manifests_run_real_commands() {
    let relay = yaml("kubernetes/relay-deployment.yaml");
    assert_eq!(relay["kind"], "Deployment");
    let cleanup = yaml("kubernetes/cleanup-cronjob.yaml");
    assert_eq!(cleanup["kind"], "CronJob");
    let migrate = yaml("kubernetes/migrate-job.yaml");
    assert_eq!(migrate["kind"], "Job");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The migrate Job first, as in a rollout; then each command runs here.
    for (doc, runnable) in [(&migrate, true), (&cleanup, true), (&relay, false)] {
        for c in containers(doc) {
            let args = strings(&c["args"]);
            assert_flags_exist(&args);
            let env: Vec<&str> = c["env"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["name"].as_str().unwrap())
                .collect();
            assert!(env.contains(&"OMNIBOX_DATABASE_URL"), "{env:?}");
            if runnable {
                let argv: Vec<&str> = args.iter().map(String::as_str).collect();
                let out = omnibox(d, &argv);
                assert!(
                    out.status.success(),
                    "{argv:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            for probe in ["readinessProbe", "livenessProbe"] {
                let command = strings(&c[probe]["exec"]["command"]);
                if command.is_empty() {
                    continue;
                }
                assert_eq!(command[0], "omnibox");
                let argv: Vec<&str> = command[1..].iter().map(String::as_str).collect();
                let out = omnibox(d, &argv);
                assert!(
                    out.status.success(),
                    "{probe} {argv:?} on a healthy database: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    let relay_args = strings(&containers(&relay)[0]["args"]);
    assert_eq!(relay_args[0], "publish");
}
