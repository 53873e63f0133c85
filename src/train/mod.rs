//! `mad train`: fetch each detector's history, train its model, store it.

mod due;
mod flagged;

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use mad_training::{Continuation, ModelMeta, Progress, SeriesHistory, TrainError};

use crate::config::{Config, Detector};
use crate::registry::{exclude_windows, merged_detectors, MaintenanceWindow, Registry};
use crate::shard::Sharding;
use crate::source::{
    align_down, drop_oversized, unix_now, Client, Series, MAX_LABELS, MAX_LABEL_SET_BYTES,
};
use crate::store::{ModelStore, PgStore, VersionInfo};

/// What one detector's training produced, for the summary line.
#[derive(Debug)]
pub struct Trained {
    pub detector: String,
    pub version: VersionInfo,
    pub series: usize,
    pub points: usize,
    pub epochs: usize,
    /// Models averaged into the one stored (an ensemble for a short history).
    pub members: usize,
    /// Points left out because the exporter had scored them above 1.
    pub flagged_excluded: usize,
    pub seconds: f64,
    /// A joint model's inputs, in column order; empty for a model that reads each series alone.
    pub joint_inputs: Vec<String>,
    /// The version this model went on from (`--if-due` continues the active model).
    pub continued: Option<String>,
}

impl std::fmt::Display for Trained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: trained on {} series ({} points) in {:.1}s, {} epochs",
            self.detector, self.series, self.points, self.seconds, self.epochs,
        )?;
        if self.members > 1 {
            write!(f, ", {} models averaged", self.members)?;
        }
        if self.flagged_excluded > 0 {
            write!(
                f,
                ", {} points scored anomalous left out",
                self.flagged_excluded
            )?;
        }
        if let Some(from) = &self.continued {
            write!(f, ", continued from version {from}")?;
        }
        write!(f, "; stored version {}", self.version.version)?;
        if !self.joint_inputs.is_empty() {
            write!(
                f,
                " (joint model: {} read together per group)",
                self.joint_inputs.join(", ")
            )?;
        }
        Ok(())
    }
}

/// When a run retrains a detector that already has a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Every time: `mad train` run by hand, a retraining request.
    Always,
    /// Only when its model is due (`mad train --if-due`, what a scheduled run does): its
    /// history has doubled, a series is new, the window or step changed, or it is old.
    IfDue,
}

/// What a run did with one detector.
#[derive(Debug)]
pub enum Outcome {
    Trained(Trained),
    /// `--if-due` and the active model is not due.
    UpToDate {
        detector: String,
        version: String,
        /// What the model learnt, and when it will be due.
        why: String,
    },
}

impl Outcome {
    /// The detector's active version after the run.
    pub fn version(&self) -> &str {
        match self {
            Outcome::Trained(t) => &t.version.version,
            Outcome::UpToDate { version, .. } => version,
        }
    }

    pub fn trained(self) -> Option<Trained> {
        match self {
            Outcome::Trained(t) => Some(t),
            Outcome::UpToDate { .. } => None,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Trained(t) => t.fmt(f),
            Outcome::UpToDate {
                detector,
                version,
                why,
            } => write!(f, "{detector}: up to date, version {version} kept ({why})"),
        }
    }
}

/// The model `--if-due` may replace, and continue when it is due.
struct Active {
    version: String,
    meta: ModelMeta,
    onnx: Vec<u8>,
}

/// What `mad train` works with: the datasource, the model store and, with PostgreSQL, the
/// registry (database detectors, maintenance windows, the retraining queue).
struct Trainer<'a> {
    config: &'a Config,
    client: Client,
    store: Arc<dyn ModelStore>,
    registry: Option<Registry>,
}

impl<'a> Trainer<'a> {
    async fn new(config: &'a Config) -> anyhow::Result<Trainer<'a>> {
        let registry = match &config.store.postgres {
            Some(_) => Some(Registry::new(Arc::new(
                PgStore::from_config(&config.store).await?,
            ))),
            None => None,
        };
        Ok(Trainer {
            config,
            client: Client::new(&config.datasource)?,
            store: crate::store::open(&config.store).await?,
            registry,
        })
    }

    async fn detectors(&self) -> anyhow::Result<Vec<Detector>> {
        let merged = merged_detectors(&self.config.detectors, self.registry.as_ref()).await?;
        Ok(merged.into_iter().map(|(d, _)| d).collect())
    }

    async fn train(
        &self,
        detector: &Detector,
        end: i64,
        schedule: Schedule,
    ) -> anyhow::Result<Outcome> {
        let step = detector.step.0.as_secs().max(1) as i64;
        let current = match schedule {
            Schedule::Always => None,
            Schedule::IfDue => self.active_model(&detector.name.0).await?,
        };
        let start = end - detector.train_range.0.as_secs() as i64;
        let windows = match &self.registry {
            Some(r) => r.windows(start, end).await?,
            None => Vec::new(),
        };
        train_detector(
            self.config,
            &self.client,
            self.store.as_ref(),
            detector,
            end,
            &windows,
            current.as_ref(),
        )
        .await
        .with_context(|| format!("detector {} (step {step}s)", detector.name))
    }

    /// The active model; none when there is no model or its metadata cannot be read (then it
    /// is retrained afresh).
    async fn active_model(&self, detector: &str) -> anyhow::Result<Option<Active>> {
        let Some(stored) = self.store.load_active(detector).await? else {
            return Ok(None);
        };
        match mad_training::onnx::embedded_meta(&stored.onnx) {
            Ok(meta) => Ok(Some(Active {
                version: stored.info.version,
                meta,
                onnx: stored.onnx,
            })),
            Err(e) => {
                tracing::warn!(detector, version = %stored.info.version, error = %e, "the active model's metadata cannot be read: retraining");
                Ok(None)
            }
        }
    }
}

/// Trains the named detectors (all when `only` is empty: the config file's and, with PostgreSQL,
/// the database's) on history up to `end` (Unix seconds, default now) and stores each model as
/// the new active version.
pub async fn run(
    config: &Config,
    only: &[String],
    end: Option<i64>,
) -> anyhow::Result<Vec<Trained>> {
    let outcomes = run_scheduled(config, only, end, Schedule::Always).await?;
    Ok(outcomes.into_iter().filter_map(Outcome::trained).collect())
}

/// [`run`], retraining a detector that has a model only when `schedule` says so.
pub async fn run_scheduled(
    config: &Config,
    only: &[String],
    end: Option<i64>,
    schedule: Schedule,
) -> anyhow::Result<Vec<Outcome>> {
    let trainer = Trainer::new(config).await?;
    let detectors = trainer.detectors().await?;
    for name in only {
        if !detectors.iter().any(|d| &d.name.0 == name) {
            bail!("no detector named {name:?} in the config or the database");
        }
    }
    let end = end.unwrap_or_else(unix_now);
    let mut trained = Vec::new();
    for detector in &detectors {
        if !only.is_empty() && !only.contains(&detector.name.0) {
            continue;
        }
        // A sharded trainer (an Indexed Job) trains its share of the detectors, each whole:
        // a detector's model covers all of its series, whichever exporter scores them.
        if let Some(Sharding::Fixed(shard)) = config.sharding.filter(|_| only.is_empty()) {
            if !shard.owns(&detector.name.0) {
                continue;
            }
        }
        let result = trainer.train(detector, end, schedule).await?;
        println!("{result}");
        trained.push(result);
    }
    Ok(trained)
}

/// How often an idle `mad train --watch` looks at the queue.
pub const WATCH_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// `mad train --watch`: takes retraining requests from the PostgreSQL queue one at a time until
/// `shutdown` completes. Several watchers can share one queue: each request is taken once.
pub async fn watch(
    config: &Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let trainer = Trainer::new(config).await?;
    let Some(registry) = &trainer.registry else {
        bail!("--watch needs store.postgres: the retraining queue lives in PostgreSQL");
    };
    let me = format!(
        "{}:{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "mad".into()),
        std::process::id()
    );
    tracing::info!(trainer = %me, "watching the retraining queue");
    tokio::pin!(shutdown);
    loop {
        let request = tokio::select! {
            () = &mut shutdown => return Ok(()),
            taken = registry.take_training_request(&me) => taken,
        };
        let request = match request {
            Ok(Some(r)) => r,
            Ok(None) => {
                tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep(WATCH_POLL) => continue,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the retraining queue");
                tokio::time::sleep(WATCH_POLL).await;
                continue;
            }
        };
        tracing::info!(id = request.id, detector = %request.detector, "retraining");
        let detector = trainer
            .detectors()
            .await?
            .into_iter()
            .find(|d| d.name.0 == request.detector);
        let outcome = match detector {
            Some(d) => trainer
                .train(&d, unix_now(), Schedule::Always)
                .await
                .map_err(|e| format!("{e:#}")),
            None => Err(format!("no detector named {:?}", request.detector)),
        };
        match &outcome {
            Ok(t) => println!("{t}"),
            Err(e) => tracing::error!(id = request.id, error = %e, "retraining failed"),
        }
        let result = outcome
            .as_ref()
            .map(Outcome::version)
            .map_err(String::as_str);
        registry.finish_training_request(request.id, result).await?;
    }
}

async fn train_detector(
    config: &Config,
    client: &Client,
    store: &dyn ModelStore,
    detector: &Detector,
    end: i64,
    windows: &[MaintenanceWindow],
    current: Option<&Active>,
) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let step = detector.step.0.as_secs().max(1) as i64;
    let end = align_down(end, step);
    let start = end - detector.train_range.0.as_secs() as i64;
    let mut fetched = client
        .query_detector(detector.queries(), start, end, step)
        .await?;
    let oversized = drop_oversized(&mut fetched);
    if oversized > 0 {
        tracing::warn!(detector = %detector.name, series = oversized, max_labels = MAX_LABELS, max_bytes = MAX_LABEL_SET_BYTES, "series whose label set is too large or holds a NUL character are left out");
    }
    let min_points = detector.window.0 * 4;
    let mut excluded = 0;
    // The exporter's own scores, as the datasource scraped them (none before the first model).
    let flagged = client
        .query_range(&flagged::flagged_query(detector), start, end, step)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(detector = %detector.name, error = %e, "could not read the exporter's scores: no point left out for them");
            Vec::new()
        });
    let flagged = flagged::Flagged::new(&detector.name.0, &flagged);
    let mut flagged_excluded = 0;
    let history: Vec<SeriesHistory> = fetched
        .iter()
        .filter_map(|s| to_history(s, step))
        .map(|mut h| {
            excluded += exclude_windows(windows, &detector.name.0, &h.labels, &h.timestamps, &mut h.values);
            flagged_excluded += flagged.exclude(&mut h, step);
            h
        })
        .filter(|h| {
            let finite = h.values.iter().filter(|v| v.is_finite()).count();
            if finite < min_points {
                tracing::warn!(labels = ?h.labels, finite, min_points, "series skipped: too little history");
            }
            finite >= min_points
        })
        .collect();
    if excluded > 0 {
        tracing::info!(detector = %detector.name, excluded, "points inside maintenance windows left out");
    }
    if flagged_excluded > 0 {
        tracing::info!(detector = %detector.name, flagged_excluded, "points the exporter scored anomalous left out");
    }

    if history.is_empty() {
        bail!(
            "the query returned {} series but none has {min_points} points (4 windows) between {} and {}",
            fetched.len(),
            crate::timestamp::rfc3339(start),
            crate::timestamp::rfc3339(end),
        );
    }
    let options = detector.train_options(&config.training);
    if let Some(Active { version, meta, .. }) = current {
        let wanted = due::Wanted {
            window: options.window,
            step_secs: step as u64,
            max_age_secs: config.alerting.model_max_age.0.as_secs() as i64 / 2,
        };
        match due::reason(meta, &history, wanted, unix_now()) {
            Some(reason) => tracing::info!(detector = %detector.name, reason, "retraining"),
            None => {
                return Ok(Outcome::UpToDate {
                    detector: detector.name.0.clone(),
                    version: version.clone(),
                    why: format!(
                        "learnt {} of history, {} old; due when the history doubles, a series \
                         is new, the window or step changes, or at {}",
                        due::duration(meta.train_end - meta.train_start),
                        due::duration(unix_now() - meta.trained_at),
                        due::duration(wanted.max_age_secs),
                    ),
                });
            }
        }
    }
    let bar = ProgressBar::new(options.max_epochs as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] epoch {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(detector.name.0.clone());
    let name = detector.name.0.clone();
    let points = history.iter().map(|h| h.values.len()).sum();
    let series = history.len();
    let progress_bar = bar.clone();
    let budget = detector.search_budget(&config.training);
    // A due model goes on from the active one, so the exporter keeps its series' states instead
    // of warming up again (SMD's retrains: best F1 0.342 → 0.415; docs/quality.md). Not when a
    // search is to choose the shape, nor across a change of step.
    let continued_from = current.filter(|a| budget.is_none() && a.meta.step_secs == step as u64);
    let from = continued_from.and_then(|active| match Continuation::of_model(&active.onnx) {
        Ok(from) => Some(from),
        Err(e) => {
            tracing::warn!(detector = %detector.name, version = %active.version, error = %e, "the active model's weights cannot be read: training afresh");
            None
        }
    });
    if let Some(budget) = budget {
        bar.set_length(budget.trials as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] trial {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
    }
    let (model, went_on) = tokio::task::spawn_blocking(move || match budget {
        Some(budget) => {
            let mut on_trial = |t: &mad_training::search::Trial| {
                progress_bar.inc(1);
                progress_bar.set_message(match (t.val_loss, t.pruned_at_epoch) {
                    (Some(loss), _) => format!(
                        "window {} hidden {}×{} lr {:.1e} dropout {:.2}: val {loss:.4}",
                        t.window, t.hidden, t.layers, t.learning_rate, t.dropout
                    ),
                    (None, Some(epoch)) => format!("pruned after epoch {epoch}"),
                    (None, None) => "failed".to_string(),
                });
            };
            mad_training::search::search(
                &name,
                step as u64,
                &history,
                &options,
                budget,
                &mut on_trial,
            )
            .map(|searched| (searched.model, false))
        }
        None => {
            let mut on_epoch = |p: &Progress| {
                progress_bar.set_position(p.epoch as u64);
                progress_bar.set_message(format!(
                    "train {:.4} val {:.4} (best epoch {})",
                    p.train_loss, p.val_loss, p.best_epoch
                ));
            };
            if let Some(from) = &from {
                match mad_training::train_continuing(
                    &name,
                    step as u64,
                    &history,
                    &options,
                    from,
                    &mut on_epoch,
                ) {
                    Err(TrainError::CannotContinue(why)) => {
                        tracing::info!(detector = %name, why, "training afresh");
                    }
                    result => return result.map(|model| (model, true)),
                }
            }
            mad_training::train(&name, step as u64, &history, &options, &mut on_epoch)
                .map(|model| (model, false))
        }
    })
    .await
    .context("training task failed")??;
    let continued = continued_from
        .filter(|_| went_on)
        .map(|active| active.version.clone());
    bar.finish_and_clear();
    let version = store.put(&model.onnx, &model.meta).await?;
    store
        .prune(&detector.name.0, config.store.keep_versions)
        .await?;
    let fact = |key: &str| {
        model
            .meta
            .training
            .get(key)
            .and_then(|v| v.as_u64())
            .unwrap_or_default() as usize
    };
    let (epochs, members) = (fact("epochs_run"), fact("ensemble").max(1));
    Ok(Outcome::Trained(Trained {
        detector: detector.name.0.clone(),
        version,
        series,
        points,
        epochs,
        members,
        flagged_excluded,
        seconds: started.elapsed().as_secs_f64(),
        joint_inputs: model.meta.inputs.clone(),
        continued,
    }))
}

/// The series on its step grid from its first to its last finite sample.
fn to_history(series: &Series, step: i64) -> Option<SeriesHistory> {
    let first = series.points.iter().find(|(_, v)| v.is_finite())?.0;
    let last = series.last_finite()?;
    let values = series.on_grid(first, last, step);
    let timestamps = (0..values.len() as i64).map(|i| first + i * step).collect();
    Some(SeriesHistory {
        labels: series.labels.clone(),
        timestamps,
        values,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_line_says_when_models_were_averaged_and_points_left_out() {
        let trained = |members, flagged_excluded| Trained {
            detector: "cpu".into(),
            version: VersionInfo {
                detector: "cpu".into(),
                version: "v7".into(),
                trained_at: 0,
                size_bytes: 0,
                active: true,
            },
            series: 2,
            points: 900,
            epochs: 12,
            members,
            flagged_excluded,
            seconds: 0.5,
            joint_inputs: Vec::new(),
            continued: None,
        };
        assert_eq!(
            trained(3, 0).to_string(),
            "cpu: trained on 2 series (900 points) in 0.5s, 12 epochs, 3 models averaged; \
             stored version v7"
        );
        assert_eq!(
            trained(1, 14).to_string(),
            "cpu: trained on 2 series (900 points) in 0.5s, 12 epochs, 14 points scored \
             anomalous left out; stored version v7"
        );
        assert_eq!(
            trained(1, 0).to_string(),
            "cpu: trained on 2 series (900 points) in 0.5s, 12 epochs; stored version v7"
        );
        let continued = Trained {
            continued: Some("v6".into()),
            ..trained(1, 0)
        };
        assert_eq!(
            continued.to_string(),
            "cpu: trained on 2 series (900 points) in 0.5s, 12 epochs, continued from version \
             v6; stored version v7"
        );
    }
}
