//! The YAML configuration every `mad` command reads (`train`, `serve`, `relay`, `rules`, ...).
//!
//! Values are checked while they are parsed (durations, URLs, names, ranges), so an error always
//! carries the file, line and field it came from; only the few checks that span several fields run
//! afterwards and name the field path instead.
//!
//! This module holds the file as a whole, the datasource, store and server sections, and the
//! loading and cross-field checks; `detector` the detectors, their training and alerting;
//! `relay` the relay's; `values` the checked value types every section is made of.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod detector;
mod relay;
mod values;

pub use detector::*;
pub use relay::*;
pub use values::*;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub datasource: Datasource,
    #[serde(default)]
    pub store: Store,
    #[serde(default)]
    pub server: Server,
    #[serde(default)]
    pub onnxruntime: OnnxRuntime,
    /// `mad rules`: what the generated vmalert rules link to and how they escalate.
    #[serde(default)]
    pub alerting: Alerting,
    /// Training defaults for every detector; a detector's own `training:` keys override them.
    #[serde(default)]
    pub training: TrainingOverrides,
    pub detectors: Vec<Detector>,
    /// `mad relay`: alerts from vmalert or Alertmanager to Telegram.
    #[serde(default)]
    pub relay: Option<Relay>,
    /// This replica's share of the series: `{index, shards}`, or `members` (live exporters
    /// registered in PostgreSQL share them out); `MAD_SHARDS` and friends in the environment
    /// override it ([`crate::shard`]). None: everything.
    #[serde(default)]
    pub sharding: Option<crate::shard::Sharding>,
}

/// The PostgreSQL DSN when `store.postgres` is not in the file (a Kubernetes Secret by
/// reference, so the password stays out of the config).
pub const POSTGRES_DSN_ENV: &str = "MAD_POSTGRES_DSN";

/// Where metrics are read from: any server speaking the Prometheus HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Datasource {
    pub url: HttpUrl,
    #[serde(default)]
    pub bearer_token: Option<Secret>,
    #[serde(default)]
    pub basic_auth: Option<BasicAuth>,
    /// Extra headers sent with every request (tenant IDs, proxies' auth).
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    #[serde(default = "default_timeout")]
    pub timeout: Duration,
    /// Attempts after the first for transient failures (connection errors, timeouts, 429, 5xx).
    #[serde(default = "default_retries")]
    pub retries: u32,
}

/// The model store: a directory (embedded default) or, with `postgres` set, the PostgreSQL
/// registry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Store {
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
    /// `postgres://user:password@host:port/db`; the password never reaches a log line.
    #[serde(default)]
    pub postgres: Option<Secret>,
    /// CA certificate (PEM) the PostgreSQL server's certificate must verify against; without it,
    /// `sslmode=require` encrypts without checking the certificate, as libpq does.
    #[serde(default)]
    pub postgres_ca_file: Option<PathBuf>,
    /// Apply pending schema migrations on start (PostgreSQL only).
    #[serde(default = "default_true")]
    pub migrate: bool,
    /// Model versions kept per detector; older ones are pruned after training.
    #[serde(default = "default_keep_versions")]
    pub keep_versions: usize,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            path: default_store_path(),
            postgres: None,
            postgres_ca_file: None,
            migrate: true,
            keep_versions: default_keep_versions(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// How often the store is checked for new model versions.
    #[serde(default = "default_reload_interval")]
    pub reload_interval: Duration,
    /// Bearer token the management API (`/api/v1/`) requires; without it, writes are refused.
    #[serde(default)]
    pub api_token: Option<Secret>,
    /// Let the management API's GET endpoints answer without the token.
    #[serde(default)]
    pub api_public_reads: bool,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: default_listen(),
            reload_interval: default_reload_interval(),
            api_token: None,
            api_public_reads: false,
        }
    }
}

/// Where the ONNX Runtime shared library is; see `model::runtime` for the search order.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnnxRuntime {
    #[serde(default)]
    pub library: Option<PathBuf>,
}

fn default_timeout() -> Duration {
    Duration(std::time::Duration::from_secs(30))
}
fn default_retries() -> u32 {
    3
}
fn default_true() -> bool {
    true
}
fn default_store_path() -> PathBuf {
    PathBuf::from("models")
}
fn default_keep_versions() -> usize {
    5
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
fn default_reload_interval() -> Duration {
    Duration(std::time::Duration::from_secs(10))
}

/// A configuration that could not be loaded; the message names file, line and field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The reason is in the message and deliberately not a `source`: error chains would print it
    // twice.
    #[error("cannot read config file {}: {reason}", path.display())]
    Read {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("{}{location}: {field}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        /// ":LINE:COLUMN" when known.
        location: String,
        field: String,
        message: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|reason| ConfigError::Read {
            path: path.to_owned(),
            reason,
        })?;
        let mut config = Config::parse(&text, path)?;
        config
            .apply_env(|name| std::env::var(name).ok())
            .map_err(|(field, message)| ConfigError::Invalid {
                path: path.to_owned(),
                location: String::new(),
                field,
                message,
            })?;
        Ok(config)
    }

    /// What the environment adds to the file: the replica's shard and the PostgreSQL DSN.
    pub fn apply_env(
        &mut self,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<(), (String, String)> {
        let shard = crate::shard::Shard::from_env(&var).map_err(|e| ("sharding".into(), e))?;
        if shard.is_some() {
            self.sharding = shard;
        }
        if self.store.postgres.is_none() {
            self.store.postgres = var(POSTGRES_DSN_ENV)
                .filter(|dsn| !dsn.trim().is_empty())
                .map(Secret::new);
        }
        Ok(())
    }

    /// Parses and validates `text`; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let deserializer = serde_yaml::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let field = match e.path().to_string() {
                p if p == "." => "(top level)".to_string(),
                p => p,
            };
            let inner = e.into_inner();
            let location = inner
                .location()
                .map(|l| {
                    let line = key_line(text, l.line(), &field).unwrap_or(l.line());
                    format!(":{line}:{}", l.column())
                })
                .unwrap_or_default();
            ConfigError::Invalid {
                path: path.to_owned(),
                location,
                message: strip_location(&inner.to_string(), &field),
                field,
            }
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: String, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            location: String::new(),
            field,
            message,
        };
        if self.detectors.is_empty() {
            return Err(invalid(
                "detectors".into(),
                "at least one detector is required".into(),
            ));
        }
        if self.alerting.group_min_series == 0 {
            return Err(invalid(
                "alerting.group_min_series".into(),
                "must be at least 1".into(),
            ));
        }
        if let Some(crate::shard::Sharding::Fixed(shard)) = self.sharding {
            crate::shard::Shard::new(shard.index, shard.shards)
                .map_err(|e| invalid("sharding".into(), e))?;
        }
        let mut seen = HashSet::new();
        for (i, d) in self.detectors.iter().enumerate() {
            let severity = d.alert.severity;
            if severity.critical.0 <= severity.warning.0 {
                return Err(invalid(
                    format!("detectors[{i}].alert.severity.critical"),
                    format!(
                        "critical threshold {} must be above the warning threshold {}",
                        severity.critical.0, severity.warning.0
                    ),
                ));
            }
            if let Err((field, message)) = d.check_queries() {
                return Err(invalid(format!("detectors[{i}].{field}"), message));
            }
            if !seen.insert(&d.name) {
                return Err(invalid(
                    format!("detectors[{i}].name"),
                    format!("duplicate detector name {:?}", d.name.0),
                ));
            }
            let needed = d.step.0.checked_mul(d.window.0 as u32 * 4);
            if needed.is_none_or(|n| d.train_range.0 < n) {
                return Err(invalid(
                    format!("detectors[{i}].train_range"),
                    format!(
                        "train_range {} holds fewer than 4 windows of {} points at step {}",
                        humantime::format_duration(d.train_range.0),
                        d.window.0,
                        humantime::format_duration(d.step.0)
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn detector(&self, name: &str) -> Option<&Detector> {
        self.detectors.iter().find(|d| d.name.0 == name)
    }
}

/// serde_yaml puts the path in front and " at line L column C" behind; both are reported
/// separately.
fn strip_location(message: &str, field: &str) -> String {
    let message = match message.find(" at line ") {
        Some(i) => &message[..i],
        None => message,
    };
    match message.split_once(": ") {
        Some((prefix, rest)) if field.starts_with(prefix) => rest.to_string(),
        _ => message.to_string(),
    }
}

/// serde_yaml places errors raised while converting a value at the start of the enclosing
/// mapping; the line of the offending key itself is the first one at or after it that names it.
fn key_line(text: &str, from_line: usize, field: &str) -> Option<usize> {
    let key = field.rsplit('.').next()?;
    let key = key.split('[').next()?;
    if key.is_empty() {
        return None;
    }
    text.lines()
        .enumerate()
        .skip(from_line.saturating_sub(1))
        .find(|(_, line)| {
            line.match_indices(key).any(|(i, _)| {
                let before = line[..i].chars().next_back();
                let after = line[i + key.len()..].trim_start();
                matches!(before, None | Some(' ' | '{' | ',' | '-')) && after.starts_with(':')
            })
        })
        .map(|(i, _)| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
datasource: { url: http://127.0.0.1:8428 }
store: { path: models }
server: { listen: 127.0.0.1:9464 }
detectors:
  - name: cpu
    query: 'sum by (instance) (rate(node_cpu_seconds_total{mode!="idle"}[5m]))'
    step: 1m
    window: 64
    train_range: 14d
    interval: 1m
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("mad.yaml"))
    }

    fn error(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("config should have been rejected"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let c = Config::parse(
            include_str!("../docs/mad.example.yaml"),
            Path::new("docs/mad.example.yaml"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.detectors.len(), 3);
        assert_eq!(c.detectors[1].train_options(&c.training).hidden, 16);
        assert!(c.detectors[2].is_multivariate());
    }

    #[test]
    fn a_detector_reads_one_query_or_joined_inputs() {
        let detector = |keys: &str| {
            GOOD.split("detectors:")
                .next()
                .unwrap_or_default()
                .to_string()
                + &format!("detectors:\n  - {{ name: d, step: 1m, {keys} }}\n")
        };
        let joined = parse(&detector(
            "inputs: { cpu: 'rate(cpu[5m])', mem: mem_used }, join_on: [instance]",
        ))
        .expect("valid multivariate detector");
        let d = &joined.detectors[0];
        assert!(d.is_multivariate());
        assert_eq!(
            d.describe_queries(),
            "on (instance) cpu=rate(cpu[5m]); mem=mem_used"
        );
        for (keys, field, says) in [
            ("", "query", "query (or inputs) is required"),
            (
                "query: up, inputs: { a: up }, join_on: [instance]",
                "inputs",
                "not both",
            ),
            ("inputs: { a: up }", "join_on", "name the labels"),
            ("query: up, join_on: [instance]", "join_on", "needs inputs"),
            (
                "inputs: { a: up }, join_on: [input]",
                "join_on",
                "names the input",
            ),
            (
                "inputs: { 'a b': up }, join_on: [instance]",
                "inputs",
                "invalid input name",
            ),
        ] {
            let err = error(&detector(keys));
            assert!(err.contains(field) && err.contains(says), "{keys}: {err}");
        }
    }

    #[test]
    fn parses_the_documented_example() {
        let c = parse(GOOD).expect("valid config");
        let d = &c.detectors[0];
        assert_eq!(d.name.0, "cpu");
        assert_eq!(d.step.0, std::time::Duration::from_secs(60));
        assert_eq!(d.train_range.0, std::time::Duration::from_secs(14 * 86_400));
        assert_eq!(d.interval(), std::time::Duration::from_secs(60));
        assert_eq!(d.staleness(), std::time::Duration::from_secs(300));
        assert_eq!(c.server.listen.port(), 9464);
        assert_eq!(c.datasource.url.0.as_str(), "http://127.0.0.1:8428/");
    }

    #[test]
    fn hyperparameter_search_is_off_unless_asked_and_per_detector_wins() {
        let c = parse(GOOD).expect("valid config");
        assert!(c.detectors[0].search_budget(&c.training).is_none());
        let on = format!("training: {{ search: {{ trials: 12, time: 2m }} }}\n{GOOD}");
        let c = parse(&on).expect("valid config");
        let budget = c.detectors[0]
            .search_budget(&c.training)
            .expect("on for every detector");
        assert_eq!(budget.trials, 12);
        assert_eq!(budget.wall_time, std::time::Duration::from_secs(120));
        let off_here = on.replace(
            "    window: 64",
            "    window: 64\n    training: { search: { trials: 0 } }",
        );
        let c = parse(&off_here).expect("valid config");
        assert!(c.detectors[0].search_budget(&c.training).is_none());
    }

    #[test]
    fn unknown_key_names_line_and_field() {
        let text = GOOD.replace("    window: 64", "    windw: 64");
        let e = error(&text);
        assert!(e.starts_with("mad.yaml:9:"), "{e}");
        assert!(e.contains("detectors[0].windw"), "{e}");
        assert!(e.contains("windw"), "{e}");
    }

    #[test]
    fn bad_duration_names_line_and_field() {
        let e = error(&GOOD.replace("step: 1m", "step: 1 fortnight"));
        assert!(e.starts_with("mad.yaml:8:"), "{e}");
        assert!(e.contains("detectors[0].step"), "{e}");
        assert!(e.contains("invalid duration"), "{e}");
    }

    #[test]
    fn bad_url_names_line_and_field() {
        let e = error(&GOOD.replace("http://127.0.0.1:8428", "ftp://x"));
        assert!(e.starts_with("mad.yaml:2:"), "{e}");
        assert!(e.contains("datasource.url"), "{e}");
    }

    #[test]
    fn cross_field_checks_name_the_field() {
        let dup = GOOD.to_string() + "  - { name: cpu, query: up, step: 1m }\n";
        let e = error(&dup);
        assert!(
            e.contains("detectors[1].name") && e.contains("duplicate"),
            "{e}"
        );
        let e = error(&GOOD.replace("train_range: 14d", "train_range: 1h"));
        assert!(e.contains("detectors[0].train_range"), "{e}");
    }

    #[test]
    fn hostile_detector_names_are_refused() {
        for bad in ["../etc", "a b", "", "x\"y"] {
            let e = error(&GOOD.replace("name: cpu", &format!("name: {bad:?}")));
            assert!(e.contains("detectors[0].name"), "{bad}: {e}");
        }
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let text = GOOD.replace(
            "{ url: http://127.0.0.1:8428 }",
            "{ url: http://127.0.0.1:8428, bearer_token: s3cr3t, basic_auth: { username: u, password: hunter2 } }",
        );
        let c = parse(&text).expect("valid");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn api_settings_default_to_closed_and_the_token_stays_secret() {
        let c = parse(GOOD).expect("valid");
        assert!(c.server.api_token.is_none());
        assert!(!c.server.api_public_reads);
        let text = GOOD.replace(
            "server: { listen: 127.0.0.1:9464 }",
            "server: { listen: 127.0.0.1:9464, api_token: t0k3n-s3cr3t, api_public_reads: true }",
        );
        let c = parse(&text).expect("valid");
        assert_eq!(
            c.server.api_token.as_ref().map(Secret::expose),
            Some("t0k3n-s3cr3t")
        );
        assert!(c.server.api_public_reads);
        assert!(!format!("{c:?}").contains("t0k3n-s3cr3t"));
        let e = error(&GOOD.replace(
            "server: { listen: 127.0.0.1:9464 }",
            "server: { listen: 127.0.0.1:9464, api_public_reads: sometimes }",
        ));
        assert!(e.contains("server.api_public_reads"), "{e}");
    }

    #[test]
    fn episode_rules_default_to_the_interval() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.detectors[0].episode_for().as_secs(), 60);
        assert_eq!(c.detectors[0].episode_quiet().as_secs(), 300);
        let text = GOOD.to_string() + "    episode: { for: 0s, quiet: 10m }\n";
        let c = parse(&text).expect("valid");
        assert_eq!(c.detectors[0].episode_for().as_secs(), 0);
        assert_eq!(c.detectors[0].episode_quiet().as_secs(), 600);
    }

    #[test]
    fn training_overrides_layer() {
        let text = GOOD.replace(
            "detectors:",
            "training: { hidden: 16, seed: 7, joint: true }\ndetectors:",
        ) + "    training: { hidden: 8 }\n";
        let c = parse(&text).expect("valid");
        let o = c.detectors[0].train_options(&c.training);
        assert_eq!(o.hidden, 8);
        assert_eq!(o.seed, 7);
        assert_eq!(o.window, 64);
        assert!(o.joint, "a global joint model applies to every detector");
        assert!(!c.detectors[0].train_options(&Default::default()).joint);
    }

    #[test]
    fn layers_dropout_and_ensemble_are_set_and_bounded() {
        let text = GOOD.replace(
            "detectors:",
            "training: { layers: 2, dropout: 0, ensemble: 1 }\ndetectors:",
        ) + "    training: { dropout: 0.25 }\n";
        let c = parse(&text).expect("valid");
        let o = c.detectors[0].train_options(&c.training);
        assert_eq!((o.layers, o.dropout, o.ensemble), (2, 0.25, Some(1)));
        let unset = parse(GOOD).expect("valid").detectors[0].train_options(&Default::default());
        assert_eq!(
            unset.ensemble, None,
            "unset: the trainer chooses by the data"
        );
        for (bad, says) in [
            ("ensemble: 0", "ensemble must be between 1 and 8"),
            ("ensemble: 9", "ensemble must be between 1 and 8"),
            ("layers: 0", "layers must be between 1 and 4"),
            ("layers: 5", "layers must be between 1 and 4"),
            ("dropout: 0.9", "dropout must be at least 0 and below 0.9"),
            ("dropout: -0.1", "dropout must be at least 0 and below 0.9"),
        ] {
            let e = error(&(GOOD.to_string() + &format!("    training: {{ {bad} }}\n")));
            assert!(
                e.contains("detectors[0].training") && e.contains(says),
                "{e}"
            );
        }
    }

    #[test]
    fn alerting_defaults() {
        let c = parse(GOOD).expect("valid");
        let a = &c.alerting;
        assert!(a.grafana_url.is_none());
        assert_eq!(a.dashboard_uid.0, "mad");
        assert_eq!(a.exporter_job.0, "mad");
        assert_eq!(a.group_threshold.0, 0.5);
        assert_eq!(a.group_min_series, 3);
        assert_eq!(a.model_max_age.0.as_secs(), 30 * 86_400);
        let d = &c.detectors[0];
        assert_eq!(d.alert_for().as_secs(), 120);
        assert_eq!(d.alert.severity.warning.0, 1.0);
        assert_eq!(d.alert.severity.critical.0, 3.0);
        assert!(d.alert.labels.is_empty());
    }

    #[test]
    fn alerting_keys_parse() {
        let text = GOOD.replace(
            "detectors:",
            "alerting:\n  grafana_url: https://grafana.example.com/g/\n  dashboard_uid: mad-drill\n  \
             exporter_job: mad-exporter\n  group_threshold: 0.25\n  group_min_series: 5\n  \
             model_max_age: 7d\ndetectors:",
        ) + "    alert:\n      for: 5m\n      severity: { warning: 1.5, critical: 4 }\n      \
              labels: { team: infra, chat: \"{{ oops }}\" }\n";
        let c = parse(&text).unwrap_or_else(|e| panic!("{e}"));
        let a = &c.alerting;
        assert_eq!(
            a.grafana_url.as_ref().map(|u| u.0.as_str()),
            Some("https://grafana.example.com/g/")
        );
        assert_eq!(a.dashboard_uid.0, "mad-drill");
        assert_eq!(a.exporter_job.0, "mad-exporter");
        assert_eq!(a.group_threshold.0, 0.25);
        assert_eq!(a.group_min_series, 5);
        assert_eq!(a.model_max_age.0.as_secs(), 7 * 86_400);
        let d = &c.detectors[0];
        assert_eq!(d.alert_for().as_secs(), 300);
        assert_eq!(d.alert.severity.warning.0, 1.5);
        assert_eq!(d.alert.severity.critical.0, 4.0);
        let labels: Vec<(&str, &str)> = d
            .alert
            .labels
            .iter()
            .map(|(k, v)| (k.0.as_str(), v.as_str()))
            .collect();
        assert_eq!(labels, [("chat", "{{ oops }}"), ("team", "infra")]);
        let c = parse(&(GOOD.to_string() + "    alert: { for: 0s }\n")).expect("valid");
        assert_eq!(c.detectors[0].alert_for().as_secs(), 0);
    }

    #[test]
    fn bad_alerting_keys_name_the_field() {
        let with_alert = |alert: &str| GOOD.to_string() + &format!("    alert: {alert}\n");
        let e = error(&with_alert("{ labels: { severity: page } }"));
        assert!(e.contains("detectors[0].alert.labels"), "{e}");
        assert!(e.contains("set by the generated rules"), "{e}");
        let e = error(&with_alert("{ labels: { \"bad-name\": x } }"));
        assert!(e.contains("invalid label name"), "{e}");
        let e = error(&with_alert("{ severity: { warning: 0 } }"));
        assert!(e.contains("detectors[0].alert.severity.warning"), "{e}");
        let e = error(&with_alert("{ severity: { warning: 5 } }"));
        assert!(
            e.contains("detectors[0].alert.severity.critical") && e.contains("above the warning"),
            "{e}"
        );
        let e = error(&with_alert("{ for: soon }"));
        assert!(e.contains("detectors[0].alert.for"), "{e}");
        let e = error(&with_alert("{ sevrity: {} }"));
        assert!(e.contains("detectors[0].alert.sevrity"), "{e}");
        let at_top = |alerting: &str| {
            GOOD.replace("detectors:", &format!("alerting: {alerting}\ndetectors:"))
        };
        let e = error(&at_top("{ group_threshold: 1.5 }"));
        assert!(
            e.starts_with("mad.yaml:5:") && e.contains("alerting.group_threshold"),
            "{e}"
        );
        let e = error(&at_top("{ group_min_series: 0 }"));
        assert!(e.contains("alerting.group_min_series"), "{e}");
        let e = error(&at_top("{ grafana_url: \"grafana:3000\" }"));
        assert!(e.contains("alerting.grafana_url"), "{e}");
        let e = error(&at_top("{ model_max_age: 0s }"));
        assert!(e.contains("alerting.model_max_age"), "{e}");
    }

    #[test]
    fn a_relay_without_intake_credentials_is_refused_unless_the_environment_has_a_token() {
        let with_relay = |extra: &str| {
            let text = format!("{GOOD}relay: {{ telegram: {{ default_chat: 1 }}{extra} }}\n");
            parse(&text)
                .unwrap_or_else(|e| panic!("{e}"))
                .relay
                .expect("relay")
        };
        let mut open = with_relay("");
        let refused = open.require_intake_auth(|_| None).expect_err("refused");
        assert!(refused.contains("relay.intake_token"), "{refused}");
        assert!(refused.contains(RELAY_INTAKE_TOKEN_ENV), "{refused}");
        // A blank variable is no credential.
        assert!(open.require_intake_auth(|_| Some("  ".into())).is_err());

        let mut from_env = with_relay("");
        from_env
            .require_intake_auth(|name| {
                (name == RELAY_INTAKE_TOKEN_ENV).then(|| "env-t0k3n".into())
            })
            .expect("the environment's token");
        assert_eq!(
            from_env.intake_token.as_ref().map(Secret::expose),
            Some("env-t0k3n")
        );

        // The file's token wins over the environment's; basic auth alone suffices.
        let mut in_file = with_relay(", intake_token: file-t0k3n");
        in_file
            .require_intake_auth(|_| Some("env-t0k3n".into()))
            .expect("the file's token");
        assert_eq!(
            in_file.intake_token.as_ref().map(Secret::expose),
            Some("file-t0k3n")
        );
        with_relay(", intake_basic_auth: { username: vm, password: pw }")
            .require_intake_auth(|_| None)
            .expect("basic auth");

        // An empty token in the file neither lets anybody in nor hides the environment's.
        let mut blank = with_relay(", intake_token: \"\"");
        assert!(blank.require_intake_auth(|_| None).is_err());
        blank
            .require_intake_auth(|_| Some("env-t0k3n".into()))
            .expect("the environment's token");
        assert_eq!(
            blank.intake_token.as_ref().map(Secret::expose),
            Some("env-t0k3n")
        );
    }

    #[test]
    fn a_password_in_the_datasource_url_is_never_printed() {
        let with_url = |url: &str| GOOD.replace("http://127.0.0.1:8428", url);
        let c = parse(&with_url("http://mad:s3cret@vm:8428")).unwrap_or_else(|e| panic!("{e}"));
        let shown = c.datasource.url.without_credentials().to_string();
        assert!(
            !shown.contains("s3cret") && shown.contains("vm:8428"),
            "{shown}"
        );
        // A `#` in the password breaks the parse; the error names the URL without it.
        let e = error(&with_url("\"http://mad:s3c#ret@vm:8428\""));
        assert!(e.contains("datasource.url") && !e.contains("s3c"), "{e}");
    }

    #[test]
    fn the_bot_token_is_trimmed_so_a_trailing_newline_does_not_break_every_call() {
        let text = format!(
            "{GOOD}relay: {{ intake_token: t, telegram: {{ default_chat: 1, token: \"123:abc\\n\" }} }}\n"
        );
        let relay = parse(&text).unwrap_or_else(|e| panic!("{e}")).relay;
        let token = relay.expect("relay").telegram.token().expect("token");
        assert_eq!(token.expose(), "123:abc");
    }
}
