//! The YAML configuration shared by `mad train` and `mad serve`.
//!
//! Values are checked while they are parsed (durations, URLs, names, ranges), so an error always
//! carries the file, line and field it came from; only the few checks that span several fields run
//! afterwards and name the field path instead.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use mad_training::trainer::{MAX_DROPOUT, MAX_ENSEMBLE_MEMBERS, MAX_LAYERS};
use mad_training::TrainOptions;
use serde::{Deserialize, Deserializer};

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

/// The alert relay: intake, durable outbox, Telegram delivery.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Relay {
    #[serde(default = "default_relay_listen")]
    pub listen: SocketAddr,
    /// Bearer token intake requests must carry (vmalert `-notifier.bearerToken`,
    /// Alertmanager `http_config.authorization`); or [`RELAY_INTAKE_TOKEN_ENV`]. The relay
    /// refuses to start with neither this nor `intake_basic_auth`.
    #[serde(default)]
    pub intake_token: Option<Secret>,
    /// Basic auth intake requests must carry instead (vmalert `-notifier.basicAuth.*`).
    #[serde(default)]
    pub intake_basic_auth: Option<BasicAuth>,
    /// The embedded outbox and alert state (redb file).
    #[serde(default = "default_relay_state")]
    pub state_path: PathBuf,
    /// Send a reminder for an alert still firing after this long; none: never.
    #[serde(default)]
    pub renotify: Option<Duration>,
    /// Where the relay reads MAD's series to draw a chart under each firing message (the TSDB
    /// that scrapes `mad serve`); none: text only.
    #[serde(default)]
    pub chart_datasource: Option<HttpUrl>,
    /// Message templates (minijinja / Jinja2 syntax; values are HTML-escaped); defaults when unset.
    #[serde(default)]
    pub templates: RelayTemplates,
    /// How much history the chart shows before the alert started.
    #[serde(default = "default_chart_window")]
    pub chart_window: Duration,
    pub telegram: Telegram,
}

/// The intake's bearer token when `relay.intake_token` is not in the file (a Kubernetes
/// Secret by reference).
pub const RELAY_INTAKE_TOKEN_ENV: &str = "MAD_RELAY_INTAKE_TOKEN";

impl Relay {
    /// Takes the intake token from `var(RELAY_INTAKE_TOKEN_ENV)` when the file has none, and
    /// refuses a relay whose intake would take alerts from anyone: whoever can post there can
    /// write into the team's chat.
    pub fn require_intake_auth(
        &mut self,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<(), String> {
        if self.intake_token.is_none() {
            self.intake_token = var(RELAY_INTAKE_TOKEN_ENV)
                .filter(|t| !t.trim().is_empty())
                .map(|t| Secret::new(t.trim()));
        }
        if self.intake_token.is_none() && self.intake_basic_auth.is_none() {
            return Err(format!(
                "the relay's intake has no credentials: set relay.intake_token (or \
                 {RELAY_INTAKE_TOKEN_ENV} in the environment) or relay.intake_basic_auth, and \
                 send it from vmalert (-notifier.bearerToken) or Alertmanager \
                 (http_config.authorization)"
            ));
        }
        Ok(())
    }
}

/// See `relay::message` for the variables: header gets `kind` and `count`; alert gets
/// `alertname`, `detector`, `severity`, `since`, `series`, `summary`, `description`, `link`,
/// `labels` and `annotations`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayTemplates {
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub alert: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Telegram {
    /// The bot token; or `token_file`; or the `MAD_TELEGRAM_TOKEN` environment variable.
    #[serde(default)]
    pub token: Option<Secret>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Bot API base URL (tests and proxies); default Telegram's.
    #[serde(default)]
    pub api_url: Option<HttpUrl>,
    /// Chat for alerts no route matches.
    pub default_chat: i64,
    /// First matching route wins: every label in `match` must equal the alert's.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Telegram user ids allowed to silence and acknowledge; empty: anyone in a configured chat.
    #[serde(default)]
    pub admins: Vec<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(rename = "match")]
    pub matchers: BTreeMap<String, String>,
    pub chat: i64,
}

/// Environment variable holding the bot token when neither `token` nor `token_file` is set.
pub const TELEGRAM_TOKEN_ENV: &str = "MAD_TELEGRAM_TOKEN";

impl Telegram {
    /// The bot token from the config, its file, or the environment, in that order.
    pub fn token(&self) -> Result<Secret, String> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        if let Some(path) = &self.token_file {
            return std::fs::read_to_string(path)
                .map(|t| Secret::new(t.trim()))
                .map_err(|e| {
                    format!(
                        "cannot read relay.telegram.token_file {}: {e}",
                        path.display()
                    )
                });
        }
        std::env::var(TELEGRAM_TOKEN_ENV)
            .map(Secret::new)
            .map_err(|_| {
                format!(
                    "no bot token: set relay.telegram.token, token_file or {TELEGRAM_TOKEN_ENV}"
                )
            })
    }

    /// Chats the relay posts to; only they may act on alerts.
    pub fn chats(&self) -> Vec<i64> {
        let mut chats: Vec<i64> = self.routes.iter().map(|r| r.chat).collect();
        chats.push(self.default_chat);
        chats.sort_unstable();
        chats.dedup();
        chats
    }

    /// The chat an alert with these labels goes to.
    pub fn chat_for(&self, labels: &BTreeMap<String, String>) -> i64 {
        self.routes
            .iter()
            .find(|r| r.matchers.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .map_or(self.default_chat, |r| r.chat)
    }
}

fn default_relay_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9465))
}

fn default_chart_window() -> Duration {
    Duration(std::time::Duration::from_secs(3600))
}

fn default_relay_state() -> PathBuf {
    PathBuf::from("relay-state.redb")
}

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    pub username: String,
    pub password: Secret,
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

/// Training hyperparameters a config may set; unset ones keep the trainer's defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingOverrides {
    pub hidden: Option<usize>,
    pub layers: Option<Layers>,
    pub dropout: Option<DropoutRate>,
    pub max_epochs: Option<usize>,
    pub patience: Option<usize>,
    pub learning_rate: Option<f64>,
    pub seed: Option<u64>,
    pub band_quantile: Option<Fraction>,
    pub band_margin: Option<f64>,
    /// Multivariate detectors: one joint model reads all inputs of a group together and
    /// forecasts each (off: one shared model reads each input on its own).
    pub joint: Option<bool>,
    /// Models trained from consecutive seeds and averaged into one; unset, as many as a
    /// history's length affords (three for a short one, one from about two weeks at 1m).
    pub ensemble: Option<Ensemble>,
    /// Hyperparameter search (off unless set): TPE over window, hidden size, layers, learning
    /// rate, dropout and epochs, the best trial's model kept.
    pub search: Option<Search>,
}

/// `training.search`: how much searching a detector's training gets.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Search {
    /// Trials at most (0 turns the search off, e.g. for one detector when it is on globally).
    pub trials: usize,
    /// No new trial starts after this long.
    #[serde(default = "default_search_time")]
    pub time: Duration,
}

fn default_search_time() -> Duration {
    Duration(std::time::Duration::from_secs(600))
}

impl TrainingOverrides {
    /// `base` with these overrides applied.
    pub fn apply(&self, base: TrainOptions) -> TrainOptions {
        TrainOptions {
            hidden: self.hidden.unwrap_or(base.hidden),
            layers: self.layers.map_or(base.layers, |l| l.0),
            dropout: self.dropout.map_or(base.dropout, |f| f.0),
            max_epochs: self.max_epochs.unwrap_or(base.max_epochs),
            patience: self.patience.unwrap_or(base.patience),
            learning_rate: self.learning_rate.unwrap_or(base.learning_rate),
            seed: self.seed.unwrap_or(base.seed),
            band_quantile: self.band_quantile.map_or(base.band_quantile, |f| f.0),
            band_margin: self.band_margin.unwrap_or(base.band_margin),
            joint: self.joint.unwrap_or(base.joint),
            ensemble: self.ensemble.map_or(base.ensemble, |e| Some(e.0)),
            ..base
        }
    }

    /// The hyperparameter search's budget, if `search` asks for one (`trials: 0` is off).
    pub fn search_budget(&self) -> Option<mad_training::search::Budget> {
        self.search
            .filter(|s| s.trials > 0)
            .map(|s| mad_training::search::Budget {
                trials: s.trials,
                wall_time: s.time.0,
            })
    }

    fn or(&self, fallback: &TrainingOverrides) -> TrainingOverrides {
        TrainingOverrides {
            hidden: self.hidden.or(fallback.hidden),
            layers: self.layers.or(fallback.layers),
            dropout: self.dropout.or(fallback.dropout),
            max_epochs: self.max_epochs.or(fallback.max_epochs),
            patience: self.patience.or(fallback.patience),
            learning_rate: self.learning_rate.or(fallback.learning_rate),
            seed: self.seed.or(fallback.seed),
            band_quantile: self.band_quantile.or(fallback.band_quantile),
            band_margin: self.band_margin.or(fallback.band_margin),
            joint: self.joint.or(fallback.joint),
            ensemble: self.ensemble.or(fallback.ensemble),
            search: self.search.or(fallback.search),
        }
    }
}

/// One PromQL query whose series are modelled together (univariate), or several queries joined
/// on labels whose series are scored as one group (multivariate). Exactly one of `query` and
/// `inputs` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Detector {
    pub name: DetectorName,
    #[serde(default)]
    pub query: Option<NonEmpty>,
    /// A multivariate detector's queries by input name: `{cpu: '…', memory: '…'}`.
    #[serde(default)]
    pub inputs: BTreeMap<InputName, NonEmpty>,
    /// The labels the inputs' series are joined on (`[instance]`): one group per value set.
    #[serde(default)]
    pub join_on: Vec<LabelName>,
    /// Resolution of the data the model reads and forecasts.
    pub step: Duration,
    /// Points the model reads before its forecasts count (warm-up) and its training window.
    #[serde(default = "default_window")]
    pub window: Window,
    #[serde(default = "default_train_range")]
    pub train_range: Duration,
    /// How often `mad serve` scores; defaults to `step`.
    #[serde(default)]
    pub interval: Option<Duration>,
    /// A series absent this long disappears from /metrics; defaults to 5 × interval.
    #[serde(default)]
    pub staleness: Option<Duration>,
    #[serde(default)]
    pub training: TrainingOverrides,
    /// When scores above 1 become a recorded anomaly episode (PostgreSQL store only).
    #[serde(default)]
    pub episode: EpisodeRules,
    /// The generated `MadAnomaly` alerts for this detector (`mad rules`).
    #[serde(default)]
    pub alert: AlertRules,
    /// Which deviations can be anomalous: `direction` (both, above, below) and the smallest
    /// deviation that can be (`min_deviation` in the series' units, `min_relative_deviation`
    /// as a share of the forecast).
    #[serde(default)]
    pub detection: crate::score::Detection,
}

/// Config-wide settings of the generated alerting rules (`mad rules`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alerting {
    /// Grafana base URL; with it, every anomaly alert links to the drill-down dashboard.
    #[serde(default)]
    pub grafana_url: Option<HttpUrl>,
    #[serde(default = "default_dashboard_uid")]
    pub dashboard_uid: NonEmpty,
    /// The scrape job of `mad serve` (for the exporter-down alerts).
    #[serde(default = "default_exporter_job")]
    pub exporter_job: NonEmpty,
    /// `MadManySeriesAnomalous` fires when more than this share of a detector's series…
    #[serde(default = "default_group_threshold")]
    pub group_threshold: Fraction,
    /// …and at least this many of them are anomalous at once.
    #[serde(default = "default_group_min_series")]
    pub group_min_series: u32,
    /// A model trained longer ago than this raises `MadModelStale`.
    #[serde(default = "default_model_max_age")]
    pub model_max_age: Duration,
}

impl Default for Alerting {
    fn default() -> Self {
        Alerting {
            grafana_url: None,
            dashboard_uid: default_dashboard_uid(),
            exporter_job: default_exporter_job(),
            group_threshold: default_group_threshold(),
            group_min_series: default_group_min_series(),
            model_max_age: default_model_max_age(),
        }
    }
}

/// A detector's anomaly alerts: `warning` above one score, `critical` above another, after `for`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRules {
    /// How long a score must stay above the threshold; default 2 × interval.
    #[serde(default, rename = "for")]
    pub hold_for: Option<ZeroOrDuration>,
    #[serde(default)]
    pub severity: SeverityThresholds,
    /// Extra labels on every alert of this detector (routing: team, chat, …).
    #[serde(default)]
    pub labels: BTreeMap<LabelName, String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeverityThresholds {
    #[serde(default = "default_warning")]
    pub warning: Threshold,
    #[serde(default = "default_critical")]
    pub critical: Threshold,
}

impl Default for SeverityThresholds {
    fn default() -> Self {
        SeverityThresholds {
            warning: default_warning(),
            critical: default_critical(),
        }
    }
}

fn default_dashboard_uid() -> NonEmpty {
    NonEmpty("mad".into())
}
fn default_exporter_job() -> NonEmpty {
    NonEmpty("mad".into())
}
fn default_group_threshold() -> Fraction {
    Fraction(0.5)
}
fn default_group_min_series() -> u32 {
    3
}
fn default_model_max_age() -> Duration {
    Duration(std::time::Duration::from_secs(30 * 86_400))
}
fn default_warning() -> Threshold {
    Threshold(1.0)
}
fn default_critical() -> Threshold {
    Threshold(3.0)
}

/// An anomaly score threshold: a finite number above zero.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold(pub f64);

impl<'de> Deserialize<'de> for Threshold {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let x = f64::deserialize(d)?;
        if !(x.is_finite() && x > 0.0) {
            return Err(serde::de::Error::custom(format!(
                "must be a number above 0, got {x}"
            )));
        }
        Ok(Threshold(x))
    }
}

/// An extra alert label's name: a Prometheus label name that the generated rules do not set
/// themselves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelName(pub String);

impl LabelName {
    /// Labels the generated rules or the scored series already carry.
    pub const RESERVED: [&'static str; 4] = ["alertname", "detector", "severity", "for"];

    pub fn parse(text: &str) -> Result<LabelName, String> {
        let mut chars = text.chars();
        let valid = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid || text.starts_with("__") {
            return Err(format!(
                "invalid label name {text:?}: use [A-Za-z_][A-Za-z0-9_]*, not starting with __"
            ));
        }
        if LabelName::RESERVED.contains(&text) {
            return Err(format!(
                "label {text:?} is set by the generated rules; choose another name"
            ));
        }
        Ok(LabelName(text.to_string()))
    }
}

impl<'de> Deserialize<'de> for LabelName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        LabelName::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for LabelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An episode opens when a series stays above 1 for `for` (default: one interval, so two points
/// in a row) and closes after `quiet` without a point above 1 (default: five intervals).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpisodeRules {
    #[serde(default, rename = "for")]
    pub hold_for: Option<ZeroOrDuration>,
    #[serde(default)]
    pub quiet: Option<Duration>,
}

/// What a detector reads, resolved from `query` / `inputs` / `join_on`.
#[derive(Debug, Clone, Copy)]
pub enum Queries<'a> {
    Single(&'a str),
    Joined {
        inputs: &'a BTreeMap<InputName, NonEmpty>,
        join_on: &'a [LabelName],
    },
}

impl Detector {
    /// The detector's queries; [`Detector::check_queries`] has made sure exactly one form is set.
    pub fn queries(&self) -> Queries<'_> {
        match &self.query {
            Some(q) if self.inputs.is_empty() => Queries::Single(&q.0),
            _ => Queries::Joined {
                inputs: &self.inputs,
                join_on: &self.join_on,
            },
        }
    }

    pub fn is_multivariate(&self) -> bool {
        matches!(self.queries(), Queries::Joined { .. })
    }

    /// The queries for listings: the query, or `name=query` per input and the join labels.
    pub fn describe_queries(&self) -> String {
        match self.queries() {
            Queries::Single(q) => q.to_string(),
            Queries::Joined { inputs, join_on } => {
                let joined: Vec<&str> = join_on.iter().map(|l| l.0.as_str()).collect();
                let each: Vec<String> = inputs
                    .iter()
                    .map(|(name, q)| format!("{}={}", name.0, q.0))
                    .collect();
                format!("on ({}) {}", joined.join(", "), each.join("; "))
            }
        }
    }

    /// Exactly one of `query` and `inputs`; a multivariate detector joins on at least one label
    /// and not on the label that names the input. Returns the field and what is wrong.
    pub fn check_queries(&self) -> Result<(), (&'static str, String)> {
        match (&self.query, self.inputs.is_empty()) {
            (Some(_), false) => Err((
                "inputs",
                "set either query (one series set) or inputs (several joined), not both".into(),
            )),
            (None, true) => Err(("query", "a query (or inputs) is required".into())),
            (Some(_), true) if !self.join_on.is_empty() => Err((
                "join_on",
                "join_on needs inputs: a single query has nothing to join".into(),
            )),
            (None, false) if self.join_on.is_empty() => Err((
                "join_on",
                "name the labels the inputs are joined on, e.g. [instance]".into(),
            )),
            (None, false) if self.join_on.iter().any(|l| l.0 == INPUT_LABEL) => Err((
                "join_on",
                format!("{INPUT_LABEL:?} names the input in the output; join on other labels"),
            )),
            _ => Ok(()),
        }
    }

    pub fn episode_for(&self) -> std::time::Duration {
        self.episode.hold_for.map_or(self.interval(), |d| d.0)
    }

    pub fn episode_quiet(&self) -> std::time::Duration {
        self.episode.quiet.map_or(self.interval() * 5, |d| d.0)
    }

    pub fn interval(&self) -> std::time::Duration {
        self.interval.map_or(self.step.0, |d| d.0)
    }

    pub fn staleness(&self) -> std::time::Duration {
        self.staleness.map_or(self.interval() * 5, |d| d.0)
    }

    /// How long an anomaly alert waits (`alert.for`); default two intervals.
    pub fn alert_for(&self) -> std::time::Duration {
        self.alert.hold_for.map_or(self.interval() * 2, |d| d.0)
    }

    /// The hyperparameter search budget, if the detector (or the config) asks for one.
    pub fn search_budget(
        &self,
        defaults: &TrainingOverrides,
    ) -> Option<mad_training::search::Budget> {
        self.training.or(defaults).search_budget()
    }

    /// Trainer options: the detector's overrides, then the config-wide ones, then defaults.
    pub fn train_options(&self, defaults: &TrainingOverrides) -> TrainOptions {
        TrainOptions {
            window: self.window.0,
            ..self.training.or(defaults).apply(TrainOptions::default())
        }
    }
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
fn default_window() -> Window {
    Window(64)
}
fn default_train_range() -> Duration {
    Duration(std::time::Duration::from_secs(14 * 86_400))
}

/// Longest duration accepted anywhere (100 years): longer ones are typos, and the step,
/// interval and window arithmetic (`step × window × 4`, `5 × interval`) must not overflow.
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(100 * 31_557_600);

/// `humantime::parse_duration`, refusing more than [`MAX_DURATION`].
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let parsed = humantime::parse_duration(text.trim())
        .map_err(|e| format!("invalid duration {text:?}: {e} (use e.g. 30s, 1m, 14d)"))?;
    if parsed > MAX_DURATION {
        return Err(format!(
            "duration {text:?} is longer than {}",
            humantime::format_duration(MAX_DURATION)
        ));
    }
    Ok(parsed)
}

/// A humantime duration (`30s`, `1m`, `14d`); zero is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duration(pub std::time::Duration);

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let parsed = parse_duration(&text).map_err(serde::de::Error::custom)?;
        if parsed.is_zero() {
            return Err(serde::de::Error::custom(
                "duration must be greater than zero",
            ));
        }
        Ok(Duration(parsed))
    }
}

/// A humantime duration where zero makes sense (`for: 0s`: open on the first point).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroOrDuration(pub std::time::Duration);

impl<'de> Deserialize<'de> for ZeroOrDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text)
            .map(ZeroOrDuration)
            .map_err(serde::de::Error::custom)
    }
}

/// An absolute http(s) URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl(pub url::Url);

impl<'de> Deserialize<'de> for HttpUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let url = url::Url::parse(text.trim())
            .map_err(|e| serde::de::Error::custom(format!("invalid URL {text:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(serde::de::Error::custom(format!(
                "invalid URL {text:?}: expected http://host[:port][/path]"
            )));
        }
        Ok(HttpUrl(url))
    }
}

/// A detector name: it becomes the `for` label and a directory name, so keep it tame.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DetectorName(pub String);

impl DetectorName {
    pub fn parse(text: &str) -> Result<DetectorName, String> {
        let valid = !text.is_empty()
            && text.len() <= 64
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            && !text.starts_with('.');
        if valid {
            Ok(DetectorName(text.to_string()))
        } else {
            Err(format!(
                "invalid detector name {text:?}: use 1-64 characters from [A-Za-z0-9_.-], not starting with '.'"
            ))
        }
    }
}

impl<'de> Deserialize<'de> for DetectorName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        DetectorName::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for DetectorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The label that names a multivariate detector's input on its per-input series (the model
/// contract's: a joint model groups series by it).
pub use mad_training::contract::INPUT_LABEL;

/// A multivariate detector's input name, used as the value of its `input` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InputName(pub String);

impl<'de> Deserialize<'de> for InputName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let valid = !text.is_empty()
            && text.len() <= 64
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if valid {
            Ok(InputName(text))
        } else {
            Err(serde::de::Error::custom(format!(
                "invalid input name {text:?}: use 1-64 characters from [A-Za-z0-9_.-]"
            )))
        }
    }
}

/// A string that must not be blank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonEmpty(pub String);

impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim().is_empty() {
            return Err(serde::de::Error::custom("must not be empty"));
        }
        Ok(NonEmpty(text))
    }
}

/// The model window: enough points to warm an LSTM up, few enough to stay cheap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window(pub usize);

impl Window {
    pub const MIN: usize = 4;
    pub const MAX: usize = 4096;
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = usize::deserialize(d)?;
        if !(Window::MIN..=Window::MAX).contains(&n) {
            return Err(serde::de::Error::custom(format!(
                "window must be between {} and {} points, got {n}",
                Window::MIN,
                Window::MAX
            )));
        }
        Ok(Window(n))
    }
}

/// Stacked LSTM layers: at least one, at most what the trainer trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layers(pub usize);

impl<'de> Deserialize<'de> for Layers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        one_to(d, "layers", MAX_LAYERS).map(Layers)
    }
}

/// A count from 1 to `max`, else an error that names `what`.
fn one_to<'de, D: Deserializer<'de>>(d: D, what: &str, max: usize) -> Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    if !(1..=max).contains(&n) {
        return Err(serde::de::Error::custom(format!(
            "{what} must be between 1 and {max}, got {n}"
        )));
    }
    Ok(n)
}

/// Ensemble members: at least one, at most [`MAX_ENSEMBLE_MEMBERS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ensemble(pub usize);

impl<'de> Deserialize<'de> for Ensemble {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        one_to(d, "ensemble", MAX_ENSEMBLE_MEMBERS).map(Ensemble)
    }
}

/// A dropout rate: 0 (none) up to below [`MAX_DROPOUT`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropoutRate(pub f64);

impl<'de> Deserialize<'de> for DropoutRate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let x = f64::deserialize(d)?;
        if !(0.0..MAX_DROPOUT).contains(&x) {
            return Err(serde::de::Error::custom(format!(
                "dropout must be at least 0 and below {MAX_DROPOUT}, got {x}"
            )));
        }
        Ok(DropoutRate(x))
    }
}

/// A number in (0, 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fraction(pub f64);

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let x = f64::deserialize(d)?;
        if !(x > 0.0 && x < 1.0) {
            return Err(serde::de::Error::custom(format!(
                "must be strictly between 0 and 1, got {x}"
            )));
        }
        Ok(Fraction(x))
    }
}

/// A credential: never printed, not even by `{:?}`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` equals the secret, compared in constant time.
    pub fn matches(&self, given: &[u8]) -> bool {
        constant_time_eq(given, self.0.as_bytes())
    }
}

/// Compares without stopping at the first difference, so timing does not reveal the token.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
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
    }
}
