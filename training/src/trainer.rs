//! Trains one LSTM forecaster for all series of a detector, calibrates a band per series and
//! exports the result as ONNX.
//!
//! # Stream semantics (the contract the exporter relies on)
//! The model is a **stream** model. For a series on its regular grid, the input at step `t` is
//! [`input_row`](crate::contract::input_row)`(features, ts_t, scaled x_t)` and the output at
//! step `t` is the forecast of scaled `x_{t+1}`. LSTM state is carried across the whole stream;
//! a stream starts from zero state. Runs of up to [`MAX_INTERPOLATED_GAP`] missing points are
//! filled by linear interpolation; a longer gap is stepped over, the point after it fed but not
//! a target. Scaling is per series ([`Scaler::fit`] on the training part). A joint model
//! ([`TrainOptions::joint`]) reads the inputs of a group as one stream, a row per timestamp
//! ([`joint_input_row`]), and forecasts each input.
//!
//! # Training
//! Each series is split in time into train / validation / calibration parts, in that order.
//! Training is stateful truncated BPTT: train streams are cut into pieces of at least
//! `8 × window` points (random offsets each epoch so chunk boundaries move), pieces are batched,
//! and each batch is walked in chunks of `window` steps carrying state between chunks, with one
//! Adam step per chunk on the Huber loss. Validation runs every series as one stream from its
//! start, exactly as serving does, and scores only forecasts of validation points; the best
//! epoch's parameters are kept (early stopping).
//!
//! # Calibration
//! With the best parameters, forecasts of the calibration part (again from a stream run from the
//! series start) give residuals; a series' band is a high quantile of them times a margin, so that
//! `anomaly_score > 1` is rare on normal data for every series alike.
//!
//! # Parts
//! `prepare` puts each series (or group) on its grid, scaled and split, as the exporter will
//! see it; `fit` trains on it, epoch by epoch, with early stopping and ensembles; `calibrate`
//! turns the best model's held-out residuals into bands. This module checks the options and
//! runs the three in order ([`train_with`]).
//!
//! [`MAX_INTERPOLATED_GAP`]: crate::contract::MAX_INTERPOLATED_GAP
//! [`Scaler::fit`]: crate::contract::Scaler::fit
//! [`joint_input_row`]: crate::contract::joint_input_row

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::contract::{columns, Feature, ModelMeta, Scaler, CONTRACT_VERSION};
use crate::lstm::LstmParams;
use crate::onnx;

mod calibrate;
mod fit;
mod prepare;

pub use calibrate::{MIN_BAND, MIN_BAND_SIGMAS};
pub use fit::{ensemble_size, ENSEMBLE_TARGET_BUDGET, MAX_ENSEMBLE};

use calibrate::calibrate;
use fit::{fit_ensemble, last_value_baseline, Fit, Workspace};
use prepare::{prepare_stream, streams_of};

/// Fewest forecasts a validation or calibration part must have for a series to be used.
const MIN_HELD_OUT_TARGETS: usize = 16;
/// Deepest stack trained: beyond this, a per-series forecaster only gets slower.
pub const MAX_LAYERS: usize = 4;
/// Dropout rates from here on leave too little signal to learn from.
pub const MAX_DROPOUT: f64 = 0.9;

/// Raw history of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesHistory {
    pub labels: BTreeMap<String, String>,
    /// Unix seconds, increasing, on a regular grid of `step_secs` (absent points are allowed).
    pub timestamps: Vec<i64>,
    /// NaN marks a missing point.
    pub values: Vec<f64>,
}

/// Hyperparameters of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainOptions {
    pub hidden: usize,
    /// Stacked LSTM layers.
    pub layers: usize,
    /// Dropout rate on each layer's output while training (0: none); see
    /// [`Dropout`](crate::lstm::Dropout).
    pub dropout: f64,
    pub window: usize,
    pub max_epochs: usize,
    /// Epochs without a better validation loss before stopping.
    pub patience: usize,
    pub learning_rate: f64,
    /// Pieces trained side by side in one batch.
    pub batch_streams: usize,
    pub seed: u64,
    pub validation_fraction: f64,
    pub calibration_fraction: f64,
    pub band_quantile: f64,
    pub band_margin: f64,
    pub features: Vec<Feature>,
    /// For a multivariate detector: one model reads all inputs of a group (the series that
    /// differ only in [`INPUT_LABEL`]) and forecasts each of them. Off, every series is a
    /// stream of its own through one shared model.
    ///
    /// [`INPUT_LABEL`]: crate::contract::INPUT_LABEL
    pub joint: bool,
    /// Models trained from consecutive seeds and averaged ([`LstmParams::side_by_side`]);
    /// `None` chooses by the data ([`ensemble_size`]).
    pub ensemble: Option<usize>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            hidden: 32,
            layers: 1,
            dropout: 0.0,
            window: 64,
            max_epochs: 80,
            patience: 8,
            learning_rate: 3e-3,
            batch_streams: 32,
            seed: 42,
            validation_fraction: 0.15,
            calibration_fraction: 0.15,
            band_quantile: 0.999,
            band_margin: 1.25,
            features: Feature::DEFAULT.to_vec(),
            joint: false,
            ensemble: None,
        }
    }
}

/// Reported after every epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub epoch: usize,
    pub max_epochs: usize,
    pub train_loss: f64,
    pub val_loss: f64,
    pub best_epoch: usize,
}

/// A trained, calibrated and exported model.
#[derive(Debug, Clone)]
pub struct TrainedModel {
    pub onnx: Vec<u8>,
    pub meta: ModelMeta,
    pub params: LstmParams<f32>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("no series to train on")]
    NoSeries,
    #[error("invalid training options: {0}")]
    InvalidOptions(String),
    #[error("series {key}: {reason}")]
    InvalidSeries { key: String, reason: String },
    #[error(
        "too little data: the longest series has {points} usable points, at least {needed} are \
         needed (window {window}, validation and calibration fractions {validation_fraction} \
         and {calibration_fraction})"
    )]
    TooLittleData {
        points: usize,
        needed: usize,
        window: usize,
        validation_fraction: f64,
        calibration_fraction: f64,
    },
    #[error("training loss became non-finite in epoch {epoch}; try a lower learning rate")]
    NonFiniteLoss { epoch: usize },
    #[error("training abandoned after epoch {epoch}")]
    Abandoned { epoch: usize },
    #[error("cannot continue the stored model: {0}")]
    CannotContinue(String),
}

/// `from`'s weights, if they fit the model these options and this data make: the same
/// columns, forecasts per step and layers (the hidden size is the stored model's own).
fn continued_params<'a>(
    from: &'a Continuation,
    opts: &TrainOptions,
    features: usize,
    width: usize,
) -> Result<&'a LstmParams<f32>, TrainError> {
    let p = &from.params;
    let (have, want) = (
        (p.features(), p.outputs(), p.layers()),
        (features, width, opts.layers),
    );
    if have != want {
        return Err(TrainError::CannotContinue(format!(
            "it reads {} columns, forecasts {} and has {} layers; this training needs {}, {} \
             and {}",
            have.0, have.1, have.2, want.0, want.1, want.2
        )));
    }
    Ok(p)
}

fn validate_options(opts: &TrainOptions, step_secs: u64) -> Result<(), TrainError> {
    let fail = |msg: &str| Err(TrainError::InvalidOptions(msg.to_owned()));
    if step_secs == 0 {
        return fail("step_secs must be positive");
    }
    if opts.hidden == 0 || opts.window == 0 || opts.max_epochs == 0 || opts.batch_streams == 0 {
        return fail("hidden, window, max_epochs and batch_streams must be positive");
    }
    if !(1..=MAX_LAYERS).contains(&opts.layers) {
        return fail(&format!("layers must be between 1 and {MAX_LAYERS}"));
    }
    if opts
        .ensemble
        .is_some_and(|n| !(1..=MAX_ENSEMBLE_MEMBERS).contains(&n))
    {
        return fail(&format!(
            "ensemble must be between 1 and {MAX_ENSEMBLE_MEMBERS}"
        ));
    }
    if !(0.0..MAX_DROPOUT).contains(&opts.dropout) {
        return fail(&format!(
            "dropout must be at least 0 and below {MAX_DROPOUT}"
        ));
    }
    if !(opts.learning_rate.is_finite() && opts.learning_rate > 0.0) {
        return fail("learning_rate must be positive");
    }
    let (v, c) = (opts.validation_fraction, opts.calibration_fraction);
    if !(v > 0.0 && c > 0.0 && v + c < 0.9) {
        return fail("validation and calibration fractions must be positive and sum below 0.9");
    }
    if !(opts.band_quantile > 0.0 && opts.band_quantile <= 1.0) {
        return fail("band_quantile must be in (0, 1]");
    }
    if !(opts.band_margin.is_finite() && opts.band_margin > 0.0) {
        return fail("band_margin must be positive");
    }
    if !opts.features.contains(&Feature::Value) {
        return fail("features must include `value`");
    }
    Ok(())
}

fn internal(err: crate::lstm::ShapeError) -> TrainError {
    // Shapes are built by this module from validated options; a mismatch is a bug here.
    TrainError::InvalidOptions(format!("internal shape mismatch: {err}"))
}

/// Trains, calibrates and exports one model for `detector` from the histories of its series.
/// See the module documentation for the stream semantics the model follows.
pub fn train(
    detector: &str,
    step_secs: u64,
    series: &[SeriesHistory],
    opts: &TrainOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<TrainedModel, TrainError> {
    train_with(detector, step_secs, series, opts, &mut |p| {
        progress(p);
        Control::Continue
    })
}

/// A stored model a retrain goes on from ([`train_continuing`]) instead of starting afresh.
#[derive(Debug, Clone, PartialEq)]
pub struct Continuation {
    /// Its weights ([`onnx::read_params`]).
    pub params: LstmParams<f32>,
    /// The scalers its series were trained with, by series key. They are kept: the weights
    /// learnt to read the values scaled this way, and the exporter's series states, which hold
    /// the scaler, go on unchanged.
    pub scalers: BTreeMap<String, Scaler>,
}

impl Continuation {
    /// The weights and scalers of a model [`onnx::export`] wrote.
    pub fn of_model(onnx: &[u8]) -> Result<Continuation, String> {
        let params = onnx::read_params(onnx)?;
        let meta = onnx::embedded_meta(onnx)?;
        let scalers = meta
            .series
            .into_iter()
            .map(|(key, calibration)| (key, calibration.scaler))
            .collect();
        Ok(Continuation { params, scalers })
    }
}

/// The `training` metadata entry that says a model went on from another ([`train_continuing`]):
/// what lets the exporter keep its series' states.
pub const CONTINUED_META_KEY: &str = "continued";

/// Adam's learning rate when a model is continued: it starts near a minimum, and the default
/// rate's steps would throw much of it away. 3e-3, 1e-3 and 3e-4 were measured on SMD's
/// retrains run to their early stop (best F1 0.408, 0.403, 0.400) and NAB's (73.7, 74.0, 74.2;
/// docs/quality.md).
pub const CONTINUE_LEARNING_RATE: f64 = 1e-3;

/// Epochs a continued model trains at most: it starts near a minimum, and running to its early
/// stop over the whole history took SMD's retrains 35 s per model for best F1 0.403 / 0.331,
/// while 5, 10 and 12 epochs gave 0.413 / 0.334, 0.415 / 0.333 and 0.413 / 0.333 in 9–14 s
/// (NAB 73.6, 73.7, 73.9 against 74.0; docs/quality.md).
pub const CONTINUE_MAX_EPOCHS: usize = 10;

/// As [`train`], going on from `from`'s weights and scalers over the whole history: one model
/// (a continued ensemble stays the one wide model it was merged into), at most
/// [`CONTINUE_MAX_EPOCHS`], no hyperparameter search. Its errors stay distributed like the old model's, so the exporter may keep its
/// series' states (error histories, LSTM state) instead of restarting them.
pub fn train_continuing(
    detector: &str,
    step_secs: u64,
    series: &[SeriesHistory],
    opts: &TrainOptions,
    from: &Continuation,
    progress: &mut dyn FnMut(&Progress),
) -> Result<TrainedModel, TrainError> {
    train_from(detector, step_secs, series, opts, Some(from), &mut |p| {
        progress(p);
        Control::Continue
    })
}

/// What a training run's observer wants after an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Give the run up (a hyperparameter search pruning a poor trial).
    Abandon,
}

/// As [`train`], with an observer that may abandon the run after any epoch.
pub fn train_with(
    detector: &str,
    step_secs: u64,
    series: &[SeriesHistory],
    opts: &TrainOptions,
    progress: &mut dyn FnMut(&Progress) -> Control,
) -> Result<TrainedModel, TrainError> {
    train_from(detector, step_secs, series, opts, None, progress)
}

fn train_from(
    detector: &str,
    step_secs: u64,
    series: &[SeriesHistory],
    opts: &TrainOptions,
    from: Option<&Continuation>,
    progress: &mut dyn FnMut(&Progress) -> Control,
) -> Result<TrainedModel, TrainError> {
    let started = Instant::now();
    validate_options(opts, step_secs)?;
    if series.is_empty() {
        return Err(TrainError::NoSeries);
    }
    let train_fraction = 1.0 - opts.validation_fraction - opts.calibration_fraction;
    let needed = ((2 * opts.window + 1) as f64 / train_fraction)
        .max(MIN_HELD_OUT_TARGETS as f64 / opts.validation_fraction)
        .max(MIN_HELD_OUT_TARGETS as f64 / opts.calibration_fraction)
        .ceil() as usize;

    let (inputs, streams) = streams_of(series, opts.joint)?;
    let mut prepared = Vec::new();
    let mut skipped = Vec::new();
    let mut most_points = 0;
    let (mut train_start, mut train_end) = (i64::MAX, i64::MIN);
    for members in &streams {
        let (p, _) = prepare_stream(members, step_secs, opts, from.map(|c| &c.scalers))?;
        let points = p.len();
        most_points = most_points.max(points);
        let usable = points >= needed
            && p.targets_in(0..p.train_end) > 2 * opts.window
            && p.targets_in(p.train_end..p.validation_end) >= MIN_HELD_OUT_TARGETS
            && p.targets_in(p.validation_end..p.len()) >= MIN_HELD_OUT_TARGETS;
        if usable {
            for history in members.iter().flatten() {
                if let (Some(&first), Some(&last)) =
                    (history.timestamps.first(), history.timestamps.last())
                {
                    train_start = train_start.min(first);
                    train_end = train_end.max(last);
                }
            }
            prepared.push(p);
        } else {
            skipped.extend(p.keys.into_iter().filter(|k| !k.is_empty()));
        }
    }
    if prepared.is_empty() {
        return Err(TrainError::TooLittleData {
            points: most_points,
            needed,
            window: opts.window,
            validation_fraction: opts.validation_fraction,
            calibration_fraction: opts.calibration_fraction,
        });
    }

    let width = inputs.len().max(1);
    let features = columns(&opts.features, width);
    let mut validation_streams = Vec::new();
    for (i, s) in prepared.iter().enumerate() {
        s.streams_for(i, &(s.train_end..s.validation_end), &mut validation_streams);
    }
    // A joint model's row holds a target per input: data, as far as the seed is concerned.
    let targets: usize = prepared
        .iter()
        .map(|p| p.targets_in(0..p.train_end) * p.width())
        .sum();
    let start = from
        .map(|c| continued_params(c, opts, features, width))
        .transpose()?;
    let members = if start.is_some() {
        1
    } else {
        ensemble_size(opts, targets)
    };
    let ensemble = fit_ensemble(
        (features, width),
        (&prepared, &validation_streams),
        (opts, start),
        members,
        progress,
    )?;
    let Fit {
        best,
        best_val,
        best_epoch,
        epochs_run,
        last_train_loss,
    } = ensemble.model;
    let mut ws = Workspace::new(features, best.hidden(), opts.layers, width);
    let (calibrations, default_band) = calibrate(&best, &prepared, opts, &mut ws)?;
    let mut training = BTreeMap::new();
    let mut put = |k: &str, v: serde_json::Value| {
        training.insert(k.to_owned(), v);
    };
    put("options", serde_json::to_value(opts).unwrap_or_default());
    put("epochs_run", epochs_run.into());
    put("ensemble", members.into());
    put(CONTINUED_META_KEY, from.is_some().into());
    put("member_val_losses", ensemble.member_val_losses.into());
    put("best_epoch", best_epoch.into());
    put("best_val_loss", best_val.into());
    put("final_train_loss", last_train_loss.into());
    put("baseline_val_loss", last_value_baseline(&prepared).into());
    put("series_trained", prepared.len().into());
    put("skipped_series", skipped.into());
    put("train_seconds", started.elapsed().as_secs_f64().into());
    let trained_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let meta = ModelMeta {
        contract_version: CONTRACT_VERSION,
        detector: detector.to_owned(),
        features: opts.features.clone(),
        inputs,
        hidden: best.hidden(),
        layers: opts.layers,
        step_secs,
        window: opts.window,
        series: calibrations,
        default_band,
        train_start,
        train_end,
        trained_at,
        training,
    };
    let onnx = onnx::export(&best, &meta);
    Ok(TrainedModel {
        onnx,
        meta,
        params: best,
    })
}

/// The most members a config may ask for: the exporter runs a model that many times as wide.
pub const MAX_ENSEMBLE_MEMBERS: usize = 8;

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::prepare::{
        interpolate_short_gaps, regularise_from, training_pieces, PreparedSeries,
    };
    use super::*;
    use crate::contract::{input_row, series_key, INPUT_LABEL};

    /// Places the samples on the regular grid starting at the first timestamp (NaN where absent).
    fn regularise(series: &SeriesHistory, step_secs: u64) -> Result<(i64, Vec<f64>), String> {
        let origin = series.timestamps.first().copied().unwrap_or(0);
        Ok((origin, regularise_from(series, origin, step_secs)?))
    }

    /// One series as one stream.
    fn prepare(
        series: &SeriesHistory,
        step_secs: u64,
        opts: &TrainOptions,
    ) -> Result<(PreparedSeries, i64), TrainError> {
        prepare_stream(&[Some(series)], step_secs, opts, None)
    }

    const DAY: i64 = 86_400;

    fn noisy_sine(start: i64, step: i64, points: usize, noise: f64, seed: u64) -> SeriesHistory {
        let mut rng = SmallRng::seed_from_u64(seed);
        let timestamps: Vec<i64> = (0..points as i64).map(|i| start + i * step).collect();
        let values = timestamps
            .iter()
            .map(|&ts| {
                let phase = std::f64::consts::TAU * (ts % DAY) as f64 / DAY as f64;
                // Sum of uniforms: roughly normal noise without extra dependencies.
                let n: f64 = (0..4).map(|_| rng.gen_range(-1.0..1.0)).sum::<f64>() * 0.866;
                50.0 + 10.0 * phase.sin() + noise * n
            })
            .collect();
        SeriesHistory {
            labels: BTreeMap::from([("instance".to_owned(), "a".to_owned())]),
            timestamps,
            values,
        }
    }

    fn small_options() -> TrainOptions {
        TrainOptions {
            hidden: 16,
            window: 16,
            max_epochs: 40,
            patience: 6,
            learning_rate: 5e-3,
            ..TrainOptions::default()
        }
    }

    const STEP: i64 = 900;
    const START: i64 = 1_700_006_400; // a midnight UTC

    #[test]
    fn the_weekly_profile_ships_only_where_it_describes_the_series() {
        let opts = small_options();
        let rhythm = noisy_sine(START, STEP, 14 * 96, 2.0, 1);
        let mut noise = noisy_sine(START, STEP, 14 * 96, 2.0, 1);
        for (ts, v) in noise.timestamps.iter().zip(noise.values.iter_mut()) {
            *v -= 10.0 * (std::f64::consts::TAU * (ts % DAY) as f64 / DAY as f64).sin();
        }
        let weekly = |history: &SeriesHistory| {
            let (prepared, _) =
                prepare_stream(&[Some(history)], STEP as u64, &opts, None).expect("prepares");
            prepared.weekly[0].clone()
        };
        let seed = weekly(&rhythm).expect("a daily sine has a weekly profile");
        let strength = 1.0 - seed.strength.residual_square / seed.strength.variance;
        assert!(strength > 0.8, "{strength}");
        // The hour of a sine's peak averages near its top (50 + 10).
        let peak_hour = crate::weekly::hour_of_week(START + DAY / 4);
        assert!((seed.week[peak_hour] - 60.0).abs() < 1.5, "{:?}", seed.week);
        assert_eq!(weekly(&noise), None, "noise has no weekly profile");
    }

    #[test]
    fn learns_daily_sine_and_calibrates_band() {
        let history = noisy_sine(START, STEP, 14 * 96, 2.0, 1);
        let opts = small_options();
        let mut epochs = 0;
        let model = train(
            "sine",
            STEP as u64,
            std::slice::from_ref(&history),
            &opts,
            &mut |p| {
                epochs = p.epoch;
            },
        )
        .expect("trains");
        let meta = &model.meta;
        let val = meta.training["best_val_loss"].as_f64().unwrap();
        let baseline = meta.training["baseline_val_loss"].as_f64().unwrap();
        println!("epochs {epochs}, best val loss {val:.5}, last-value baseline {baseline:.5}");
        assert!(
            val < 0.75 * baseline,
            "val {val} vs last-value baseline {baseline}"
        );
        assert!(epochs >= 1 && meta.series.len() == 1);
        assert_eq!(meta.train_start, START);
        assert!(meta.default_band >= MIN_BAND);
        // Fitted to the points before the validation and calibration parts, not to those.
        let len = history.timestamps.len();
        let held_out = [opts.validation_fraction, opts.calibration_fraction]
            .map(|fraction| (len as f64 * fraction).round() as usize)
            .iter()
            .sum::<usize>();
        assert_eq!(
            meta.series[&series_key(&history.labels)].fitted_until,
            Some(history.timestamps[len - held_out - 1])
        );

        // A daily rhythm is a weekly one too: the profile of the training part ships.
        let calibration = &meta.series[&series_key(&history.labels)];
        assert_eq!(
            calibration.weekly.as_ref().map(|seed| seed.learnt_until),
            calibration.fitted_until
        );

        // Fresh data from the same process, run as a stream after a warm-up of `window` points.
        let fresh = noisy_sine(
            history.timestamps[history.timestamps.len() - 1] + STEP,
            STEP,
            2000,
            2.0,
            99,
        );
        let calibration = &meta.series[&series_key(&history.labels)];
        let f = opts.features.len();
        let mut x = vec![0.0f32; fresh.values.len() * f];
        for (i, row) in x.chunks_exact_mut(f).enumerate() {
            let scaled = calibration.scaler.scale(fresh.values[i]) as f32;
            input_row(&opts.features, fresh.timestamps[i], scaled, row);
        }
        let zeros = vec![0.0f32; model.params.hidden()];
        let out = model
            .params
            .forward_f32(&x, fresh.values.len(), 1, &zeros, &zeros)
            .unwrap();
        let mut exceed = 0;
        let mut total = 0;
        for t in opts.window..fresh.values.len() - 1 {
            let target = calibration.scaler.scale(fresh.values[t + 1]);
            total += 1;
            if (out.yhat[t] as f64 - target).abs() > calibration.band {
                exceed += 1;
            }
        }
        let fraction = exceed as f64 / total as f64;
        println!(
            "band {:.3}: {exceed} of {total} fresh residuals outside",
            calibration.band
        );
        assert!(
            fraction < 0.01,
            "{exceed} of {total} residuals outside the band"
        );
    }

    #[test]
    fn a_short_history_trains_an_ensemble_and_a_long_one_a_single_model() {
        let auto = TrainOptions::default();
        assert_eq!(ensemble_size(&auto, 500), MAX_ENSEMBLE);
        assert_eq!(ensemble_size(&auto, ENSEMBLE_TARGET_BUDGET / 2), 2);
        // Issue 5's reference series: 20,160 points, 70% of them trained on.
        assert_eq!(ensemble_size(&auto, 14_112), 1);
        let two = TrainOptions {
            ensemble: Some(2),
            ..TrainOptions::default()
        };
        assert_eq!(ensemble_size(&two, 1_000_000), 2);

        let history = noisy_sine(START, STEP, 7 * 96, 2.0, 3);
        let opts = small_options();
        let mut reported = Vec::new();
        let model = train("sine", STEP as u64, &[history], &opts, &mut |p| {
            reported.push(p.epoch)
        })
        .expect("trains");
        let training = &model.meta.training;
        assert_eq!(training["ensemble"], MAX_ENSEMBLE);
        assert_eq!(model.meta.hidden, MAX_ENSEMBLE * opts.hidden);
        assert_eq!(model.params.hidden(), model.meta.hidden);
        // The observer hears the first member's epochs only, once each.
        assert_eq!(reported, (1..=reported.len()).collect::<Vec<_>>());
        // The mean of the members' forecasts misses by no more than they do on average (the
        // loss is convex), and differs from each (other seeds learnt other things).
        let members: Vec<f64> = training["member_val_losses"]
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|v| v.as_f64())
            .collect();
        assert_eq!(members.len(), MAX_ENSEMBLE);
        let mean = members.iter().sum::<f64>() / members.len() as f64;
        let merged = training["best_val_loss"].as_f64().expect("a number");
        assert!(merged <= mean, "{merged} against the members' mean {mean}");
        assert!(members.iter().all(|&m| m != merged), "{members:?} {merged}");

        let single = TrainOptions {
            ensemble: Some(1),
            ..small_options()
        };
        let history = noisy_sine(START, STEP, 7 * 96, 2.0, 3);
        let one = train("sine", STEP as u64, &[history], &single, &mut |_| {}).expect("trains");
        assert_eq!(one.meta.hidden, opts.hidden);
        assert_eq!(
            one.meta.training["best_val_loss"].as_f64(),
            Some(members[0])
        );
    }

    /// Two inputs of one group: `b` repeats `a` two steps late, and `a` is noise. Only a model
    /// that reads both can forecast `b`.
    fn echoing_group(points: usize) -> Vec<SeriesHistory> {
        let mut rng = SmallRng::seed_from_u64(8);
        let a: Vec<f64> = (0..points).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let b: Vec<f64> = (0..points)
            .map(|t| if t < 2 { 0.0 } else { a[t - 2] })
            .collect();
        let timestamps: Vec<i64> = (0..points as i64).map(|i| START + i * 60).collect();
        [("a", a), ("b", b)]
            .into_iter()
            .map(|(input, values)| SeriesHistory {
                labels: BTreeMap::from([
                    ("host".to_owned(), "h1".to_owned()),
                    (INPUT_LABEL.to_owned(), input.to_owned()),
                ]),
                timestamps: timestamps.clone(),
                values,
            })
            .collect()
    }

    #[test]
    fn a_joint_model_reads_every_input_of_its_group() {
        let group = echoing_group(1_500);
        let separate = train("g", 60, &group, &small_options(), &mut |_| {}).expect("trains");
        let opts = TrainOptions {
            joint: true,
            ..small_options()
        };
        let joint = train("g", 60, &group, &opts, &mut |_| {}).expect("trains");
        assert_eq!(joint.meta.inputs, ["a", "b"]);
        assert_eq!(joint.params.outputs(), 2);
        assert_eq!(joint.params.features(), Feature::DEFAULT.len() + 1);
        assert!(separate.meta.inputs.is_empty());
        let keys: Vec<&String> = joint.meta.series.keys().collect();
        let expected: Vec<String> = group.iter().map(|s| series_key(&s.labels)).collect();
        assert_eq!(keys, expected.iter().collect::<Vec<_>>());
        let loss = |m: &TrainedModel| m.meta.training["best_val_loss"].as_f64().unwrap();
        println!(
            "val loss: joint {}, separate {}",
            loss(&joint),
            loss(&separate)
        );
        assert!(
            loss(&joint) < 0.75 * loss(&separate),
            "joint {} vs separate {}",
            loss(&joint),
            loss(&separate)
        );
    }

    #[test]
    fn a_joint_group_missing_an_input_still_trains_the_others() {
        let mut group = echoing_group(1_500);
        // A second host has only `a`, with a hole `b`'s host does not have.
        let mut lone = group[0].clone();
        lone.labels.insert("host".to_owned(), "h2".to_owned());
        lone.timestamps.drain(300..320);
        lone.values.drain(300..320);
        group.push(lone.clone());
        // A third host's `b` stops before the calibration part: no residuals to size its band.
        let mut early = group[1].clone();
        early.labels.insert("host".to_owned(), "h3".to_owned());
        early.timestamps.truncate(700);
        early.values.truncate(700);
        let mut partner = group[0].clone();
        partner.labels.insert("host".to_owned(), "h3".to_owned());
        group.extend([early.clone(), partner]);
        let opts = TrainOptions {
            joint: true,
            ..small_options()
        };
        let model = train("g", 60, &group, &opts, &mut |_| {}).expect("trains");
        assert_eq!(model.meta.series.len(), 5, "{:?}", model.meta.series.keys());
        assert!(model.meta.series.contains_key(&series_key(&lone.labels)));
        let early_band = model.meta.series[&series_key(&early.labels)].band;
        assert_eq!(
            early_band, model.meta.default_band,
            "the typical band, not the minimum"
        );
        let (p, _) = prepare_stream(&[Some(&lone), None], 60, &opts, None).expect("prepares");
        assert_eq!(p.len(), 1_480, "the long gap is dropped");
        assert!(!p.is_input_target(5, 1), "an absent input is no target");
        assert!(p.is_input_target(5, 0));
    }

    #[test]
    fn training_is_deterministic() {
        let history = noisy_sine(START, STEP, 600, 1.0, 3);
        // Dropout masks are drawn from the run's seed too.
        for (layers, dropout) in [(1, 0.0), (2, 0.2)] {
            let opts = TrainOptions {
                max_epochs: 3,
                layers,
                dropout,
                ..small_options()
            };
            let a = train(
                "d",
                STEP as u64,
                std::slice::from_ref(&history),
                &opts,
                &mut |_| {},
            )
            .unwrap();
            let b = train(
                "d",
                STEP as u64,
                std::slice::from_ref(&history),
                &opts,
                &mut |_| {},
            )
            .unwrap();
            assert_eq!(a.params, b.params);
            assert_eq!(a.meta.series, b.meta.series);
        }
    }

    #[test]
    fn stacked_layers_with_dropout_learn_the_sine() {
        let history = noisy_sine(START, STEP, 14 * 96, 2.0, 1);
        let opts = TrainOptions {
            layers: 2,
            dropout: 0.1,
            ..small_options()
        };
        let model = train("sine", STEP as u64, &[history], &opts, &mut |_| {}).expect("trains");
        let meta = &model.meta;
        let val = meta.training["best_val_loss"].as_f64().unwrap();
        let baseline = meta.training["baseline_val_loss"].as_f64().unwrap();
        println!("2 layers, dropout 0.1: best val loss {val:.5}, baseline {baseline:.5}");
        assert!(
            val < 0.75 * baseline,
            "val {val} vs last-value baseline {baseline}"
        );
        assert_eq!((meta.layers, model.params.layers()), (2, 2));
    }

    #[test]
    fn layers_and_dropout_out_of_range_are_refused() {
        let history = noisy_sine(START, STEP, 600, 1.0, 3);
        for opts in [
            TrainOptions {
                layers: 0,
                ..small_options()
            },
            TrainOptions {
                layers: MAX_LAYERS + 1,
                ..small_options()
            },
            TrainOptions {
                dropout: MAX_DROPOUT,
                ..small_options()
            },
            TrainOptions {
                dropout: -0.1,
                ..small_options()
            },
        ] {
            let err = train(
                "d",
                STEP as u64,
                std::slice::from_ref(&history),
                &opts,
                &mut |_| {},
            );
            assert!(
                matches!(err, Err(TrainError::InvalidOptions(_))),
                "{opts:?}"
            );
        }
    }

    #[test]
    fn too_little_data_is_an_error() {
        let history = noisy_sine(START, STEP, 50, 1.0, 3);
        let err = train("d", STEP as u64, &[history], &small_options(), &mut |_| {}).unwrap_err();
        match err {
            TrainError::TooLittleData { points, needed, .. } => {
                assert_eq!(points, 50);
                assert!(needed > 50);
            }
            other => panic!("unexpected {other}"),
        }
        assert!(matches!(
            train("d", 60, &[], &small_options(), &mut |_| {}),
            Err(TrainError::NoSeries)
        ));
    }

    #[test]
    fn bad_series_are_rejected() {
        let mut history = noisy_sine(START, STEP, 600, 1.0, 3);
        history.timestamps.swap(10, 11);
        let err = train("d", STEP as u64, &[history], &small_options(), &mut |_| {}).unwrap_err();
        assert!(matches!(err, TrainError::InvalidSeries { .. }), "{err}");
    }

    #[test]
    fn long_gaps_are_stepped_over_and_the_point_after_is_not_a_target() {
        // 100 points, then 10 missing (more than MAX_INTERPOLATED_GAP), then 100 more.
        let mut history = noisy_sine(START, 60, 210, 0.1, 5);
        history.timestamps.drain(100..110);
        history.values.drain(100..110);
        let (p, _) = prepare(&history, 60, &TrainOptions::default()).expect("prepares");
        assert_eq!(p.len(), 200, "the gap is dropped, not filled");
        let mut streams = Vec::new();
        p.streams_for(0, &(0..200), &mut streams);
        assert_eq!(streams.len(), 1, "one stream across the gap");
        assert_eq!((streams[0].start, streams[0].end), (0, 200));
        let flagged: Vec<usize> = (0..p.len()).filter(|t| !p.is_target(*t)).collect();
        assert_eq!(flagged, vec![100], "only the point right after the gap");
        assert_eq!(p.targets_in(0..200), 198);
        // Its time features are those of its real time, not of the next grid slot.
        let features = TrainOptions::default().features.len();
        let mut row = vec![0.0f32; features];
        input_row(
            &TrainOptions::default().features,
            START + 110 * 60,
            0.0,
            &mut row,
        );
        assert_eq!(p.inputs[100 * features + 1..101 * features], row[1..]);
    }

    #[test]
    fn short_gaps_are_filled_and_absent_timestamps_are_gaps() {
        let mut values = vec![1.0, f64::NAN, f64::NAN, 4.0, 5.0];
        values.extend([f64::NAN; 6]);
        values.extend([7.0, 8.0, f64::NAN]);
        interpolate_short_gaps(&mut values);
        assert_eq!(&values[..5], &[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!(values[5..11].iter().all(|v| v.is_nan()), "too long to fill");

        // Absent timestamps become NaN on the grid.
        let series = SeriesHistory {
            labels: BTreeMap::new(),
            timestamps: vec![0, 60, 180],
            values: vec![1.0, 2.0, 4.0],
        };
        let (start, grid) = regularise(&series, 60).unwrap();
        assert_eq!(start, 0);
        assert_eq!(grid.len(), 4);
        assert!(grid[2].is_nan());
    }

    #[test]
    fn pieces_cover_training_stream_with_moving_boundaries() {
        let history = noisy_sine(START, 60, 5000, 1.0, 3);
        let (prepared, _) = prepare(&history, 60, &TrainOptions::default()).unwrap();
        let series = [prepared];
        let mut rng = SmallRng::seed_from_u64(1);
        let mut pieces = Vec::new();
        training_pieces(&series, 512, &mut rng, &mut pieces);
        let mut sorted = pieces.clone();
        sorted.sort_by_key(|p| p.start);
        assert_eq!(sorted[0].start, 0);
        assert_eq!(sorted.last().unwrap().end, series[0].train_end);
        for pair in sorted.windows(2) {
            assert_eq!(pair[0].end, pair[1].start + 1);
            assert!(pair[0].end - pair[0].start > 512);
        }
        let first_boundary = sorted[0].end;
        training_pieces(&series, 512, &mut rng, &mut pieces);
        let moved = pieces.iter().all(|p| p.start != first_boundary - 1);
        assert!(moved || pieces.len() == 1);
    }

    /// `cargo test --release -p mad-training -- --ignored --nocapture`
    #[test]
    #[ignore = "timing; run in release mode"]
    fn two_weeks_at_one_minute_trains_quickly() {
        let history = noisy_sine(START, 60, 20_160, 1.0, 5);
        let opts = TrainOptions::default();
        let started = Instant::now();
        let mut last = None;
        let model = train("perf", 60, &[history], &opts, &mut |p| {
            last = Some(p.clone())
        })
        .unwrap();
        let elapsed = started.elapsed().as_secs_f64();
        let last = last.unwrap();
        println!(
            "trained 20160 points in {elapsed:.2} s: {} epochs ({:.3} s/epoch), best epoch {}, \
             val loss {:.5}, baseline {:.5}",
            last.epoch,
            elapsed / last.epoch as f64,
            last.best_epoch,
            last.val_loss,
            model.meta.training["baseline_val_loss"]
        );
    }

    /// The first epoch's validation loss of a training on `history`, fresh or continued.
    fn first_val_loss(
        history: &SeriesHistory,
        opts: &TrainOptions,
        from: Option<&Continuation>,
    ) -> (TrainedModel, f64) {
        let mut first = None;
        let mut note = |p: &Progress| {
            first.get_or_insert(p.val_loss);
        };
        let series = std::slice::from_ref(history);
        let model = match from {
            Some(from) => train_continuing("sine", STEP as u64, series, opts, from, &mut note),
            None => train("sine", STEP as u64, series, opts, &mut note),
        }
        .expect("trains");
        (model, first.expect("an epoch ran"))
    }

    #[test]
    fn a_continued_model_goes_on_from_its_weights_and_scalers() {
        let opts = small_options();
        let key = |h: &SeriesHistory| series_key(&h.labels);
        let first = noisy_sine(START, STEP, 10 * 96, 2.0, 1);
        let (old, _) = first_val_loss(&first, &opts, None);
        let from = Continuation::of_model(&old.onnx).expect("reads its own model");
        assert_eq!(from.params, old.params);
        // As stored: the exporter's series states hold the scalers read from the file too.
        let stored = onnx::embedded_meta(&old.onnx).expect("its metadata");
        let old_scaler = stored.series[&key(&first)].scaler;
        assert_eq!(from.scalers[&key(&first)], old_scaler);

        // Twice the history, its level moved up: a fresh scaler would centre elsewhere.
        let mut longer = noisy_sine(START, STEP, 20 * 96, 2.0, 2);
        for v in &mut longer.values[10 * 96..] {
            *v += 5.0;
        }
        let (continued, continued_first) = first_val_loss(&longer, &opts, Some(&from));
        let (fresh, fresh_first) = first_val_loss(&longer, &opts, None);
        assert_eq!(continued.meta.series[&key(&longer)].scaler, old_scaler);
        assert_ne!(fresh.meta.series[&key(&longer)].scaler, old_scaler);
        assert_eq!(continued.meta.training[CONTINUED_META_KEY], true);
        assert_eq!(fresh.meta.training[CONTINUED_META_KEY], false);
        // The old model already forecasts the rhythm: its first epoch is well ahead of a
        // freshly drawn model's.
        assert!(
            continued_first < 0.8 * fresh_first,
            "continued {continued_first} vs fresh {fresh_first}"
        );
    }

    #[test]
    fn a_model_of_another_shape_is_not_continued() {
        let opts = small_options();
        let history = noisy_sine(START, STEP, 10 * 96, 2.0, 1);
        let from = Continuation {
            params: LstmParams::init(opts.features.len() + 1, opts.hidden, 1),
            scalers: BTreeMap::new(),
        };
        let error = train_continuing(
            "sine",
            STEP as u64,
            std::slice::from_ref(&history),
            &opts,
            &from,
            &mut |_| {},
        )
        .expect_err("one column too many");
        assert!(matches!(error, TrainError::CannotContinue(_)), "{error}");
    }
}
