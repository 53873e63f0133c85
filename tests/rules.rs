//! The generated alerting rules (`mad rules`): the shipped file matches what the example config
//! generates, and the real tools accept it: `promtool check rules`, `promtool test rules` on the
//! shipped unit tests, and `vmalert -dryRun`. Hostile label values (quotes, braces, `{{`) survive
//! YAML and the Go templates as literal text, checked by promtool evaluating them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mad::config::{Config, DetectorName};
use serde_json::json;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn example_config() -> Config {
    Config::load(&root().join("docs/mad.example.yaml")).unwrap_or_else(|e| panic!("{e}"))
}

fn shipped_rules() -> PathBuf {
    root().join("vmalert-rules").join(mad::rules::FILE_NAME)
}

/// Runs an external tool; a missing one fails with how to install it.
fn tool(program: &str, args: &[&str], dir: &Path) -> Output {
    match Command::new(program).args(args).current_dir(dir).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{program} is not installed: run scripts/setup.sh (Debian packages `prometheus` for \
             promtool, `victoria-metrics` for vmalert)"
        ),
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn promtool_check(file: &Path) {
    let out = tool(
        "promtool",
        &["check", "rules", &file.display().to_string()],
        &root(),
    );
    assert_success(&out, &format!("promtool check rules {}", file.display()));
}

fn vmalert_dry_run(file: &Path) {
    let out = tool(
        "vmalert",
        &[&format!("-rule={}", file.display()), "-dryRun"],
        &root(),
    );
    assert_success(&out, &format!("vmalert -rule={} -dryRun", file.display()));
}

#[test]
fn the_shipped_rules_match_the_example_config() {
    let expected = mad::rules::render(&example_config()).expect("render");
    let shipped = std::fs::read_to_string(shipped_rules()).expect("read the shipped rules");
    assert!(
        shipped == expected,
        "vmalert-rules/{} is stale: regenerate it with \
         `cargo run -- rules --config docs/mad.example.yaml` (and update \
         vmalert-rules/mad.rules.test.yml if the alerts changed)",
        mad::rules::FILE_NAME
    );
}

#[test]
fn mad_rules_writes_the_same_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_mad"))
        .args(["rules", "--config", "docs/mad.example.yaml", "--out"])
        .arg(tmp.path().join("out"))
        .current_dir(root())
        .output()
        .expect("run mad rules");
    assert_success(&out, "mad rules");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("4 groups"), "{stdout}");
    let written = std::fs::read_to_string(tmp.path().join("out").join(mad::rules::FILE_NAME))
        .expect("mad rules wrote the file");
    let shipped = std::fs::read_to_string(shipped_rules()).expect("read the shipped rules");
    assert_eq!(written, shipped);
}

#[test]
fn promtool_accepts_the_shipped_rules_and_their_unit_tests_pass() {
    promtool_check(&shipped_rules());
    let out = tool(
        "promtool",
        &["test", "rules", "vmalert-rules/mad.rules.test.yml"],
        &root(),
    );
    assert_success(&out, "promtool test rules vmalert-rules/mad.rules.test.yml");
}

#[test]
fn vmalert_accepts_the_shipped_rules() {
    vmalert_dry_run(&shipped_rules());
}

#[test]
fn the_rules_cover_every_detector_and_mad_itself() {
    let rules = mad::rules::generate(&example_config());
    let names: Vec<&str> = rules.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "mad-cpu",
            "mad-http_errors",
            "mad-node",
            "mad-self-monitoring"
        ]
    );
    let alerts: Vec<&str> = rules.groups[3]
        .rules
        .iter()
        .map(|r| r.alert.as_str())
        .collect();
    for alert in [
        "MadExporterDown",
        "MadExporterAbsent",
        "MadScoringErrors",
        "MadScoringLate",
        "MadModelStale",
        "MadRelayDeliveryFailing",
        "MadRelayQueueStuck",
    ] {
        assert!(alerts.contains(&alert), "{alert} missing: {alerts:?}");
    }
    // Without alerting.grafana_url there is no dashboard link.
    assert!(rules.groups[0]
        .rules
        .iter()
        .all(|r| r.annotations.get("dashboard").is_none()));
}

const HOSTILE_CONFIG: &str = r#"
datasource: { url: http://127.0.0.1:8428 }
alerting:
  grafana_url: https://grafana.example.com/sub/
  dashboard_uid: "we{{ird uid"
  exporter_job: 'mad"job{{ $value }}'
  group_threshold: 0.3
  group_min_series: 1
detectors:
  - name: cpu
    query: up
    step: 1m
    alert:
      for: 1m
      severity: { warning: 1.5, critical: 4 }
      labels:
        team: 'a "quoted" {team}{'
        chat: "{{ .Value }} }}{{ {{"
"#;

/// A config with hostile extra labels, dashboard uid and job; and a detector name the config file
/// would refuse (the generator must not rely on that check).
fn hostile_config() -> Config {
    let mut config =
        Config::parse(HOSTILE_CONFIG, Path::new("hostile.yaml")).unwrap_or_else(|e| panic!("{e}"));
    config.detectors[0].name = DetectorName(r#"c"p}{{u"#.into());
    config
}

#[test]
fn hostile_values_stay_literal_text() {
    let config = hostile_config();
    let detector = r#"c"p}{{u"#;
    let team = r#"a "quoted" {team}{"#;
    let chat = "{{ .Value }} }}{{ {{";
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = mad::rules::write(&config, tmp.path()).expect("write rules");

    // The YAML reads back; the expression holds the name as a PromQL string.
    let text = std::fs::read_to_string(&file).expect("read");
    let parsed: serde_yaml::Value = serde_yaml::from_str(&text).expect("valid YAML");
    let first = &parsed["groups"][0]["rules"][0];
    assert_eq!(
        first["expr"].as_str(),
        Some(r#"anomaly_score{for="c\"p}{{u"} > 1.5"#)
    );
    assert_eq!(parsed["groups"][0]["name"].as_str(), Some("mad-c\"p}{{u"));

    // Both tools accept it (they parse every label and annotation template).
    promtool_check(&file);
    vmalert_dry_run(&file);

    // promtool evaluates the templates: what comes out is the literal text.
    let series = format!(
        "anomaly_score{{for={}, instance=\"i\"}}",
        mad::rules::promql_string(detector)
    );
    let labels = |severity: &str| {
        json!({
            "for": detector, "instance": "i", "detector": detector,
            "severity": severity, "team": team, "chat": chat,
        })
    };
    let detector_url: String = url::form_urlencoded::byte_serialize(detector.as_bytes()).collect();
    let dashboard = format!(
        "https://grafana.example.com/sub/d/we%7B%7Bird%20uid?var-detector={detector_url}\
         &var-series=instance%3D%22i%22"
    );
    let tests = json!({
        "rule_files": [mad::rules::FILE_NAME],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    { "series": series, "values": "0 2 2 2 2 0 0" },
                    { "series": format!("up{{job={}}}", mad::rules::promql_string(r#"mad"job{{ $value }}"#)),
                      "values": "0x20" },
                ],
                "alert_rule_test": [
                    { "eval_time": "1m", "alertname": "MadAnomaly", "exp_alerts": [] },
                    {
                        "eval_time": "3m",
                        "alertname": "MadAnomaly",
                        "exp_alerts": [{
                            "exp_labels": labels("warning"),
                            "exp_annotations": {
                                "summary": format!("MAD {detector}: anomaly score 2.00 on instance=\"i\""),
                                "description": format!(
                                    "Detector {detector} scores the series instance=\"i\" at 2.00 (above 1 is \
                                     anomalous); it has stayed above the warning \
                                     threshold 1.5 for 1m."
                                ),
                                "dashboard": dashboard,
                            },
                        }],
                    },
                    { "eval_time": "6m", "alertname": "MadAnomaly", "exp_alerts": [] },
                    {
                        "eval_time": "3m",
                        "alertname": "MadManySeriesAnomalous",
                        "exp_alerts": [{
                            "exp_labels": {
                                "detector": detector, "severity": "critical",
                                "team": team, "chat": chat,
                            },
                            "exp_annotations": {
                                "summary": format!("MAD {detector}: 1 series anomalous at once"),
                                "description": format!(
                                    "1 series of detector {detector} score above 1.5 at the same \
                                     time: at least 1 and more than 30% of its series, for 1m. \
                                     Something bigger than one series is wrong."
                                ),
                                "dashboard": format!(
                                    "https://grafana.example.com/sub/d/we%7B%7Bird%20uid?var-detector={detector_url}"
                                ),
                            },
                        }],
                    },
                    {
                        "eval_time": "6m",
                        "alertname": "MadExporterDown",
                        "exp_alerts": [{
                            "exp_labels": { "job": r#"mad"job{{ $value }}"#, "severity": "critical" },
                            "exp_annotations": {
                                "summary": "MAD exporter  is down",
                                "description": "Scraping mad serve at  (job mad\"job{{ $value }}) has \
                                                failed for 5 minutes: no anomaly scores reach the alerts.",
                            },
                        }],
                    },
                ],
            },
        ],
    });
    let test_file = tmp.path().join("hostile.test.yml");
    std::fs::write(
        &test_file,
        serde_yaml::to_string(&tests).expect("serialise the unit tests"),
    )
    .expect("write the unit tests");
    let out = tool(
        "promtool",
        &["test", "rules", &test_file.display().to_string()],
        tmp.path(),
    );
    assert_success(&out, &format!("promtool test rules (rules:\n{text})"));
}

#[test]
fn mad_train_refreshes_the_rules_even_when_training_fails() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("mad.yaml");
    std::fs::write(
        &config,
        format!(
            "datasource: {{ url: \"http://127.0.0.1:1\", timeout: 1s, retries: 0 }}\n\
             store: {{ path: \"{}\" }}\n\
             detectors:\n  - {{ name: t, query: up, step: 1m, train_range: 14d }}\n",
            tmp.path().join("models").display()
        ),
    )
    .expect("write config");
    let rules_dir = tmp.path().join("rules");
    let out = Command::new(env!("CARGO_BIN_EXE_mad"))
        .args(["train", "--config"])
        .arg(&config)
        .arg("--rules-dir")
        .arg(&rules_dir)
        .env_remove("MAD_LOG")
        .env_remove("MAD_LOG_FORMAT")
        .output()
        .expect("run mad train");
    assert!(
        !out.status.success(),
        "training against a closed port should fail"
    );
    let written =
        std::fs::read_to_string(rules_dir.join(mad::rules::FILE_NAME)).unwrap_or_else(|e| {
            panic!(
                "mad train --rules-dir wrote no rules ({e}); stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let expected =
        mad::rules::render(&Config::load(&config).expect("config")).expect("render rules");
    assert_eq!(written, expected);
}
