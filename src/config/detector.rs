//! `detectors:`, `training:` and `alerting:`: what each detector queries and how its model
//! is trained, and what the alerting rules generated for them link to and how they escalate.

use std::collections::BTreeMap;

use mad_training::TrainOptions;
use serde::Deserialize;

use super::values::{
    DetectorName, DropoutRate, Duration, Ensemble, Fraction, HttpUrl, InputName, LabelName, Layers,
    NonEmpty, Threshold, Window, ZeroOrDuration, INPUT_LABEL,
};

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

fn default_window() -> Window {
    Window(64)
}
fn default_train_range() -> Duration {
    Duration(std::time::Duration::from_secs(14 * 86_400))
}
