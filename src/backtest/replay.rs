//! Replays a recording through the exporter's own scoring path: a model trained on the first
//! rows only, then [`DetectorScorer`] fed one point per cycle, as `mad serve` would see the series
//! arrive. Nothing ahead of a point is used to score it.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use mad_training::search::Budget;
use mad_training::{Continuation, SeriesHistory, TrainError, TrainOptions, TrainedModel};

use crate::chart::ChartPoint;
use crate::model::Forecaster;
use crate::score::{Detection, DetectorScorer, Score, ANOMALOUS_ABOVE};
use crate::source::{Labels, Series};

/// The detector name models trained here carry.
const DETECTOR: &str = "backtest";
/// The shortest window a short recording's model is given.
const MIN_WINDOW: usize = 8;
/// Points handed to the scorer per cycle: enough to bridge the gaps it would interpolate.
const POINTS_PER_CYCLE: usize = mad_training::contract::MAX_INTERPOLATED_GAP + 2;

/// How a replay's model is trained: the trainer's options, and a hyperparameter search's budget
/// when the config's `training.search` asks for one, so a backtest trains as `mad train` would.
#[derive(Debug, Clone, Default)]
pub struct Training {
    pub options: TrainOptions,
    pub search: Option<Budget>,
}

impl From<TrainOptions> for Training {
    fn from(options: TrainOptions) -> Self {
        Training {
            options,
            search: None,
        }
    }
}

impl Training {
    /// One model for `series`, with `options` in place of [`Self::options`] (a short past's
    /// window is shortened), and the search trials it took: continued from `from` where it
    /// fits, as `mad train` continues the active model; otherwise searched when a budget is set
    /// (its first trial is `options`).
    fn train(
        &self,
        step: i64,
        series: &[SeriesHistory],
        options: &TrainOptions,
        from: Option<&Continuation>,
    ) -> Result<(TrainedModel, usize), TrainError> {
        if let (Some(from), None) = (from, self.search) {
            match mad_training::train_continuing(
                DETECTOR,
                step as u64,
                series,
                options,
                from,
                &mut |_| {},
            ) {
                Err(TrainError::CannotContinue(why)) => {
                    tracing::debug!(why, "trained afresh");
                }
                result => return result.map(|model| (model, 0)),
            }
        }
        match self.search {
            Some(budget) => mad_training::search::search(
                DETECTOR,
                step as u64,
                series,
                options,
                budget,
                &mut |_| {},
            )
            .map(|searched| {
                tracing::debug!(
                    best = searched.best,
                    trials = ?searched.trials,
                    "hyperparameter search"
                );
                (searched.model, searched.trials.len())
            }),
            None => mad_training::train(DETECTOR, step as u64, series, options, &mut |_| {})
                .map(|model| (model, 0)),
        }
    }
}

/// One recorded series: Unix seconds and values (NaN for missing).
#[derive(Debug, Clone)]
pub struct Recording {
    pub name: String,
    /// The series' labels; none: `series="<name>"`. A joint model groups by them (all but
    /// `input`).
    pub labels: Labels,
    pub timestamps: Vec<i64>,
    pub values: Vec<f64>,
}

impl Recording {
    /// The sampling step: the most common spacing of consecutive points.
    pub fn step(&self) -> Result<i64, String> {
        let mut counts = std::collections::HashMap::new();
        for w in self.timestamps.windows(2) {
            *counts.entry(w[1] - w[0]).or_insert(0usize) += 1;
        }
        counts
            .into_iter()
            .max_by_key(|(step, n)| (*n, -*step))
            .map(|(step, _)| step)
            .filter(|step| *step > 0)
            .ok_or_else(|| format!("{}: timestamps must increase", self.name))
    }
}

/// The replay of one recording.
#[derive(Debug, Clone)]
pub struct Replayed {
    /// Per row of the recording; `None` before the model's warm-up or where the value is missing.
    pub scores: Vec<Option<Score>>,
    pub train_seconds: f64,
    pub epochs: usize,
    /// Hyperparameter search trials run (0 without a search).
    pub trials: usize,
}

/// A recording on the step grid (multiples of the step, as the exporter expects, like a range
/// query returns it): the last point in a slot wins.
struct Gridded {
    labels: Labels,
    points: Vec<(i64, f64)>,
    slot_of_row: Vec<usize>,
}

fn on_grid(recording: &Recording, step: i64) -> Gridded {
    let mut points: Vec<(i64, f64)> = Vec::with_capacity(recording.timestamps.len());
    let mut slot_of_row = Vec::with_capacity(recording.timestamps.len());
    for (ts, value) in recording.timestamps.iter().zip(&recording.values) {
        let slot = (*ts as f64 / step as f64).round() as i64 * step;
        match points.last_mut() {
            Some(last) if last.0 >= slot => last.1 = *value,
            _ => points.push((slot, *value)),
        }
        slot_of_row.push(points.len() - 1);
    }
    let labels = if recording.labels.is_empty() {
        [("series".to_string(), recording.name.clone())].into()
    } else {
        recording.labels.clone()
    };
    Gridded {
        labels,
        points,
        slot_of_row,
    }
}

/// Trains on rows `..learn` of `recording`, then scores every row in order.
pub fn replay(
    recording: &Recording,
    learn: usize,
    training: &Training,
    retrain: Retrain,
    detection: Detection,
    onnxruntime: Option<&Path>,
) -> Result<Replayed, String> {
    replay_many(
        std::slice::from_ref(recording),
        learn,
        training,
        retrain,
        detection,
        onnxruntime,
    )?
    .pop()
    .ok_or_else(|| format!("{}: nothing replayed", recording.name))
}

/// When a replay trains its model again, on everything seen so far except the points it scored
/// as anomalous (as `mad train` leaves out what the exporter flagged).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Retrain {
    #[default]
    Never,
    /// Each time the points seen have doubled since the last training.
    WhenDoubled,
}

/// Several series of one detector (one model for all, as `mad serve` runs a detector): trains on
/// rows `..learn` of each, then feeds all of them point by point, one cycle per step, retraining
/// on the points already seen as `retrain` says, scoring by the detector's `detection`.
pub fn replay_many(
    recordings: &[Recording],
    learn: usize,
    training: &Training,
    retrain: Retrain,
    detection: Detection,
    onnxruntime: Option<&Path>,
) -> Result<Vec<Replayed>, String> {
    let first = recordings.first().ok_or("no recordings to replay")?;
    let name = &first.name;
    let step = first.step()?;
    let grids: Vec<Gridded> = recordings.iter().map(|r| on_grid(r, step)).collect();
    let learned = grids
        .iter()
        .map(|g| {
            g.slot_of_row
                .get(learn.min(g.slot_of_row.len()).saturating_sub(1))
                .map_or(0, |slot| slot + 1)
        })
        .max()
        .unwrap_or(0);
    let mut options = training.options.clone();
    let mut train_seconds = 0.0;
    let mut epochs = 0;
    let mut trials = 0;
    // Per series and slot: scored above the edge. A retrain leaves these points out, as
    // `mad train` leaves out what the exporter flagged.
    let mut flagged: Vec<Vec<bool>> = grids.iter().map(|g| vec![false; g.points.len()]).collect();
    // The last model's ONNX: a retrain continues it.
    let mut last_model: Option<Vec<u8>> = None;
    let previous = &mut last_model;
    let mut fit = |upto: usize,
                   options: &mut TrainOptions,
                   flagged: &[Vec<bool>]|
     -> Result<DetectorScorer, String> {
        let histories: Vec<SeriesHistory> = grids
            .iter()
            .zip(flagged)
            .map(|(g, flagged)| {
                let end = upto.min(g.points.len());
                SeriesHistory {
                    labels: g.labels.clone(),
                    timestamps: g.points[..end].iter().map(|p| p.0).collect(),
                    values: g.points[..end]
                        .iter()
                        .zip(flagged)
                        .map(|(p, flagged)| if *flagged { f64::NAN } else { p.1 })
                        .collect(),
                }
            })
            .collect();
        let started = Instant::now();
        let from = previous
            .as_deref()
            .map(Continuation::of_model)
            .transpose()
            .map_err(|e| format!("{name}: the model before: {e}"))?;
        // A short past gets a shorter window rather than no model, as a new metric would.
        let (model, searched) = loop {
            match training.train(step, &histories, options, from.as_ref()) {
                Err(TrainError::TooLittleData { .. }) if options.window / 2 >= MIN_WINDOW => {
                    options.window /= 2;
                }
                result => {
                    break result.map_err(|e| format!("{name}: training on {upto} points: {e}"))?
                }
            }
        };
        train_seconds += started.elapsed().as_secs_f64();
        epochs += model
            .meta
            .training
            .get("epochs_run")
            .and_then(|v| v.as_u64())
            .unwrap_or_default() as usize;
        trials += searched;
        *previous = Some(model.onnx.clone());
        let forecaster = Forecaster::load(&model.onnx, "replay", DETECTOR, onnxruntime)
            .map_err(|e| format!("{name}: {e}"))?;
        // Never stale: the recording's clock, not the wall clock, drives the cycles.
        Ok(DetectorScorer::new(Arc::new(forecaster), i64::MAX / 4).with_detection(detection))
    };
    let mut scorer = fit(learned, &mut options, &flagged)?;
    let mut next_retrain = match retrain {
        Retrain::Never => usize::MAX,
        Retrain::WhenDoubled => learned.saturating_mul(2).max(1),
    };
    let mut by_slot: Vec<Vec<Option<Score>>> =
        grids.iter().map(|g| vec![None; g.points.len()]).collect();
    let longest = grids.iter().map(|g| g.points.len()).max().unwrap_or(0);
    for i in 0..longest {
        // Only what has been seen: the points before this one.
        let mut from = (i + 1).saturating_sub(POINTS_PER_CYCLE);
        if i == next_retrain {
            let old = std::mem::replace(&mut scorer, fit(i, &mut options, &flagged)?);
            scorer.go_on_from(old);
            next_retrain = next_retrain.saturating_mul(2);
            // A series that starts afresh warms up on the recent past, as the exporter's
            // lookback does; one that goes on skips what it has seen.
            from = (i + 1).saturating_sub(scorer.warmup_points() + 1);
        }
        let live: Vec<usize> = (0..grids.len())
            .filter(|k| i < grids[*k].points.len())
            .collect();
        let fetched: Vec<Series> = live
            .iter()
            .map(|k| {
                let g = &grids[*k];
                Series {
                    labels: g.labels.clone(),
                    points: g.points[from..=i].to_vec(),
                }
            })
            .collect();
        let now = fetched.iter().map(|s| s.points[s.points.len() - 1].0).max();
        let (_, scored) = scorer
            .score_cycle(&fetched, now.unwrap_or_default())
            .map_err(|e| format!("{name}: scoring point {i}: {e}"))?;
        for (index, scores) in scored {
            let k = live[index];
            for score in scores {
                if let Ok(slot) = grids[k].points.binary_search_by_key(&score.ts, |p| p.0) {
                    // A retrained scorer re-scores its warm-up: the earlier verdict stands.
                    if by_slot[k][slot].is_none() || score.ts == grids[k].points[i].0 {
                        flagged[k][slot] = score.score > ANOMALOUS_ABOVE;
                        by_slot[k][slot] = Some(score);
                    }
                }
            }
        }
    }
    Ok(grids
        .iter()
        .zip(by_slot)
        .map(|(g, slots)| Replayed {
            scores: g.slot_of_row.iter().map(|slot| slots[*slot]).collect(),
            train_seconds,
            epochs,
            trials,
        })
        .collect())
}

/// Where the per-point scores of a replay go: `timestamp,value,anomaly_score,yhat,yhat_lower,
/// yhat_upper[,label]`, empty cells where nothing was scored.
pub fn write_scores(
    path: &Path,
    recording: &Recording,
    replayed: &Replayed,
    labels: Option<&[bool]>,
) -> Result<(), String> {
    let mut header = vec![
        "timestamp",
        "value",
        "anomaly_score",
        "yhat",
        "yhat_lower",
        "yhat_upper",
    ];
    if labels.is_some() {
        header.push("label");
    }
    let cell = |v: Option<f64>| v.map_or(String::new(), |v| v.to_string());
    let rows = recording
        .timestamps
        .iter()
        .zip(&recording.values)
        .enumerate()
        .map(|(i, (ts, value))| {
            let s = replayed.scores[i];
            let mut row = vec![
                ts.to_string(),
                value.to_string(),
                cell(s.map(|s| s.score)),
                cell(s.map(|s| s.yhat)),
                cell(s.map(|s| s.lower)),
                cell(s.map(|s| s.upper)),
            ];
            if let Some(labels) = labels {
                row.push(u8::from(labels[i]).to_string());
            }
            row
        });
    write_csv(path, &header, rows)
}

/// Writes a CSV file of `header` and `rows`, creating its folder; errors name the file.
pub fn write_csv<H: AsRef<[u8]>>(
    path: &Path,
    header: &[H],
    rows: impl IntoIterator<Item = Vec<String>>,
) -> Result<(), String> {
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
    }
    let mut out = csv::Writer::from_path(path).map_err(|e| fail(&e))?;
    out.write_record(header).map_err(|e| fail(&e))?;
    for row in rows {
        out.write_record(&row).map_err(|e| fail(&e))?;
    }
    out.flush().map_err(|e| fail(&e))
}

/// Chart points of a replay: each row's value, forecast band and score.
pub fn chart_points(recording: &Recording, replayed: &Replayed) -> Vec<ChartPoint> {
    recording
        .timestamps
        .iter()
        .zip(&recording.values)
        .zip(&replayed.scores)
        .map(|((ts, y), scored)| ChartPoint {
            ts: *ts,
            y: Some(*y),
            yhat: scored.map(|s| s.yhat),
            lower: scored.map(|s| s.lower),
            upper: scored.map(|s| s.upper),
            score: scored.map(|s| s.score),
        })
        .collect()
}
