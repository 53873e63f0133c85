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

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::adam::Adam;
use crate::contract::{
    columns, joint_input_row, quantile_sorted, series_key, Feature, ModelMeta, Scaler,
    SeriesCalibration, ValueRange, CONTRACT_VERSION, INPUT_LABEL, MAX_INTERPOLATED_GAP,
};
use crate::lstm::{Dropout, LstmParams, LstmTape};
use crate::onnx;
use crate::weekly::{WeeklyProfile, WeeklySeed};

/// Smallest band (scaled units): a near-perfect forecast must not make every wiggle anomalous.
pub const MIN_BAND: f64 = 0.05;
/// Smallest band in robust standard deviations of the calibration residuals: for Gaussian
/// noise, 5σ is exceeded about once in two million points.
pub const MIN_BAND_SIGMAS: f64 = 5.0;
/// Training pieces span at least this many windows.
const PIECE_WINDOWS: usize = 8;
/// Fewest forecasts a validation or calibration part must have for a series to be used.
const MIN_HELD_OUT_TARGETS: usize = 16;
const HUBER_DELTA: f64 = 1.0;
/// Streams of a training batch run through the LSTM together, their gradients summed before the
/// batch's one Adam step (the same update, up to rounding): at 32 the tape (gates, their
/// gradients, states: ~3 MB) spills from a core's 1 MB L2; in groups of 8 it stays (a default
/// model on 20,160 points: 0.51 → 0.46 s in interleaved benchmark runs).
const SUB_BATCH_STREAMS: usize = 8;
/// Evaluation walks streams in chunks of this many steps and this many streams at a time,
/// which bounds the tape's memory on long histories and many series.
const EVAL_CHUNK_STEPS: usize = 256;
const EVAL_BATCH_STREAMS: usize = 256;
/// Deepest stack trained: beyond this, a per-series forecaster only gets slower.
pub const MAX_LAYERS: usize = 4;
/// Dropout rates from here on leave too little signal to learn from.
pub const MAX_DROPOUT: f64 = 0.9;
/// A series whose timestamps would span more grid points than this is rejected.
const MAX_GRID_POINTS: usize = 50_000_000;

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
    /// Dropout rate on each layer's output while training (0: none); see [`Dropout`].
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
}

/// One stream (long gaps stepped over), scaled, with its split points: a series on its own, or
/// the inputs of one group side by side for a joint model (`width` of them).
struct PreparedSeries {
    /// Each input's series key, scaler and span of values (for the exporter's range novelty).
    keys: Vec<String>,
    scalers: Vec<Scaler>,
    ranges: Vec<Option<ValueRange>>,
    /// Scaled values `[len, width]`; an input absent at a joint row carries its last value.
    scaled: Vec<f32>,
    /// `[len, width]`: whether the input was there (an absent one is no forecast target).
    present: Vec<bool>,
    /// Model input rows `[len, columns]`.
    inputs: Vec<f32>,
    /// Points that follow a long gap (dropped from the arrays): fed, but not a forecast target,
    /// as the exporter scores them.
    after_gap: Vec<bool>,
    /// Forecast targets with index in `..train_end` are training targets, in
    /// `train_end..validation_end` validation targets, the rest calibration targets.
    train_end: usize,
    validation_end: usize,
    /// Timestamp of the last training target (`None` without any).
    fitted_until: Option<i64>,
    /// Each input's weekly profile over the training part, where it describes the input.
    weekly: Vec<Option<WeeklySeed>>,
}

impl PreparedSeries {
    fn len(&self) -> usize {
        self.after_gap.len()
    }

    fn width(&self) -> usize {
        self.keys.len()
    }

    /// Number of points in `range` that are a forecast target of some input (they have a
    /// predecessor and do not follow a long gap).
    fn targets_in(&self, range: Range<usize>) -> usize {
        (range.start.max(1)..range.end.min(self.len()))
            .filter(|t| self.is_target(*t))
            .count()
    }

    fn is_target(&self, t: usize) -> bool {
        !self.after_gap.get(t).copied().unwrap_or(false)
    }

    /// Whether input `i`'s value at point `t` is a forecast target.
    fn is_input_target(&self, t: usize, i: usize) -> bool {
        self.is_target(t) && self.present[t * self.width() + i]
    }

    /// The stream from its start up to the last target in `targets`, if it has one there.
    fn streams_for(&self, series: usize, targets: &Range<usize>, out: &mut Vec<Piece>) {
        let end = self.len().min(targets.end);
        if end > targets.start && end > 1 {
            out.push(Piece {
                series,
                start: 0,
                end,
            });
        }
    }
}

/// Points `start..end` of one series, fed as one stream from zero state.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Piece {
    series: usize,
    start: usize,
    end: usize,
}

impl Piece {
    /// Forecast steps: every point but the last is an input whose successor is the target.
    fn steps(&self) -> usize {
        self.end - self.start - 1
    }
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

/// Places the samples on the regular grid starting at `origin`, at or before the first sample.
fn regularise_from(
    series: &SeriesHistory,
    origin: i64,
    step_secs: u64,
) -> Result<Vec<f64>, String> {
    if series.timestamps.len() != series.values.len() {
        return Err(format!(
            "{} timestamps but {} values",
            series.timestamps.len(),
            series.values.len()
        ));
    }
    let start = origin;
    let step = step_secs as i64;
    let mut grid: Vec<f64> = Vec::with_capacity(series.values.len());
    let mut previous: Option<usize> = None;
    for (&ts, &value) in series.timestamps.iter().zip(&series.values) {
        let offset = ts.checked_sub(start).ok_or("timestamp overflow")?;
        let index = (offset as f64 / step as f64).round();
        if !(0.0..MAX_GRID_POINTS as f64).contains(&index) {
            return Err(format!("timestamps span more than {MAX_GRID_POINTS} steps"));
        }
        let index = index as usize;
        if previous.is_some_and(|p| index <= p) {
            return Err(format!(
                "timestamps must increase by at least step_secs ({step_secs} s); see {ts}"
            ));
        }
        previous = Some(index);
        grid.resize(index, f64::NAN);
        grid.push(if value.is_finite() { value } else { f64::NAN });
    }
    Ok(grid)
}

/// Linearly fills runs of at most [`MAX_INTERPOLATED_GAP`] NaNs that have values on both sides.
fn interpolate_short_gaps(values: &mut [f64]) {
    let mut i = 0;
    while i < values.len() {
        if !values[i].is_nan() {
            i += 1;
            continue;
        }
        let gap_start = i;
        while i < values.len() && values[i].is_nan() {
            i += 1;
        }
        let gap_len = i - gap_start;
        if gap_start == 0 || i == values.len() || gap_len > MAX_INTERPOLATED_GAP {
            continue;
        }
        let (left, right) = (values[gap_start - 1], values[i]);
        for k in 0..gap_len {
            let frac = (k + 1) as f64 / (gap_len + 1) as f64;
            values[gap_start + k] = left + (right - left) * frac;
        }
    }
}

/// The inputs of one group as one stream (`None`: the group lacks that input), on a common grid
/// from the earliest sample: a point is a row where any input has a value.
fn prepare_stream(
    members: &[Option<&SeriesHistory>],
    step_secs: u64,
    opts: &TrainOptions,
) -> Result<(PreparedSeries, i64), TrainError> {
    let width = members.len();
    let keys: Vec<String> = members
        .iter()
        .map(|m| m.map(|s| series_key(&s.labels)).unwrap_or_default())
        .collect();
    let origin = members
        .iter()
        .filter_map(|m| m.and_then(|s| s.timestamps.first().copied()))
        .min()
        .unwrap_or(0);
    let mut grids = Vec::with_capacity(width);
    for (member, key) in members.iter().zip(&keys) {
        let mut grid = match member {
            Some(series) => regularise_from(series, origin, step_secs).map_err(|reason| {
                TrainError::InvalidSeries {
                    key: key.clone(),
                    reason,
                }
            })?,
            None => Vec::new(),
        };
        interpolate_short_gaps(&mut grid);
        grids.push(grid);
    }
    let grid_len = grids.iter().map(Vec::len).max().unwrap_or(0);
    // What is still missing everywhere is a long gap: it is dropped and the stream goes on
    // across it, as the exporter's scoring does; the point after it is fed but is not a target.
    let mut timestamps = Vec::with_capacity(grid_len);
    let mut after_gap = Vec::with_capacity(grid_len);
    let mut raw = Vec::with_capacity(grid_len * width);
    let mut gap = false;
    for t in 0..grid_len {
        let row = grids.iter().map(|g| g.get(t).copied().unwrap_or(f64::NAN));
        if grids.iter().all(|g| g.get(t).is_none_or(|v| v.is_nan())) {
            gap = !timestamps.is_empty();
            continue;
        }
        raw.extend(row);
        timestamps.push(origin + t as i64 * step_secs as i64);
        after_gap.push(gap);
        gap = false;
    }
    let len = timestamps.len();
    let calibration = (len as f64 * opts.calibration_fraction).round() as usize;
    let validation = (len as f64 * opts.validation_fraction).round() as usize;
    let train_end = len.saturating_sub(calibration + validation);
    let validation_end = len.saturating_sub(calibration);
    let column = |i: usize, rows: Range<usize>| -> Vec<f64> {
        rows.map(|t| raw[t * width + i])
            .filter(|v| !v.is_nan())
            .collect()
    };
    let scalers: Vec<Scaler> = (0..width)
        .map(|i| Scaler::fit(&column(i, 0..train_end)))
        .collect();
    let ranges = (0..width)
        .map(|i| ValueRange::of(&column(i, 0..len)))
        .collect();
    let present: Vec<bool> = raw.iter().map(|v| !v.is_nan()).collect();
    // An absent input carries its last value (its centre before it has one).
    let mut scaled = vec![0.0f32; len * width];
    for t in 0..len {
        for i in 0..width {
            let v = raw[t * width + i];
            scaled[t * width + i] = if v.is_nan() {
                if t == 0 {
                    0.0
                } else {
                    scaled[(t - 1) * width + i]
                }
            } else {
                scalers[i].scale(v) as f32
            };
        }
    }
    let features = &opts.features;
    let columns = columns(features, width);
    let mut inputs = vec![0.0f32; len * columns];
    for (t, row) in inputs.chunks_exact_mut(columns).enumerate() {
        joint_input_row(
            features,
            timestamps[t],
            &scaled[t * width..(t + 1) * width],
            row,
        );
    }
    let fitted_until = train_end
        .checked_sub(1)
        .and_then(|last| timestamps.get(last).copied());
    let weekly = members
        .iter()
        .map(|member| weekly_profile((*member)?, fitted_until?, step_secs))
        .collect();
    Ok((
        PreparedSeries {
            keys,
            scalers,
            ranges,
            scaled,
            present,
            inputs,
            after_gap,
            train_end,
            validation_end,
            fitted_until,
            weekly,
        },
        origin,
    ))
}

/// The weekly profile of a series' training part (up to `fitted_until`), where it describes
/// the series. The exporter goes on learning from the points after it, scoring each against
/// the profile of the points before, as it would have live; a profile that had taken in the
/// validation and calibration parts would meet them again unsurprised (KPI `cpu4`'s F1 at the
/// default threshold 0.341 → 0.283 that way, as the seasonal likelihood then started with no
/// history). Learnt from the samples as observed, as the exporter learns: not the interpolated
/// grid.
fn weekly_profile(series: &SeriesHistory, fitted_until: i64, step_secs: u64) -> Option<WeeklySeed> {
    let mut profile = WeeklyProfile::new(step_secs as i64);
    for (ts, value) in series.timestamps.iter().zip(&series.values) {
        if *ts <= fitted_until {
            profile.learn(*ts, *value);
        }
    }
    profile.seed()
}

fn huber(residual: f64) -> f64 {
    let a = residual.abs();
    if a <= HUBER_DELTA {
        0.5 * a * a
    } else {
        HUBER_DELTA * (a - 0.5 * HUBER_DELTA)
    }
}

/// Cuts every training stream into pieces of `piece_len..2*piece_len` points with a random
/// first boundary, so chunk boundaries land elsewhere each epoch.
fn training_pieces(
    series: &[PreparedSeries],
    piece_len: usize,
    rng: &mut SmallRng,
    out: &mut Vec<Piece>,
) {
    out.clear();
    for (index, s) in series.iter().enumerate() {
        let end = s.len().min(s.train_end);
        if end < 2 {
            continue;
        }
        let mut start = 0;
        let mut boundary = start + piece_len + rng.gen_range(0..piece_len);
        while boundary + piece_len <= end {
            // Pieces overlap by one point so the boundary point is still a target.
            out.push(Piece {
                series: index,
                start,
                end: boundary + 1,
            });
            start = boundary;
            boundary += piece_len;
        }
        out.push(Piece {
            series: index,
            start,
            end,
        });
    }
    out.shuffle(rng);
}

/// Buffers reused across chunks and epochs.
struct Workspace {
    /// Columns of a model input row, and forecasts per step.
    features: usize,
    outputs: usize,
    tape: LstmTape<f32>,
    grads: LstmParams<f32>,
    x: Vec<f32>,
    targets: Vec<f32>,
    valid: Vec<bool>,
    dyhat: Vec<f32>,
    /// A batch's parameter gradients, summed over its groups of [`SUB_BATCH_STREAMS`].
    summed: Vec<f32>,
    h: Vec<f32>,
    c: Vec<f32>,
}

impl Workspace {
    fn new(features: usize, hidden: usize, layers: usize, outputs: usize) -> Self {
        let grads = LstmParams::zeros_multi(features, hidden, layers, outputs);
        Workspace {
            features,
            outputs,
            tape: LstmTape::new(),
            summed: vec![0.0; grads.as_slice().len()],
            grads,
            x: Vec::new(),
            targets: Vec::new(),
            valid: Vec::new(),
            dyhat: Vec::new(),
            h: Vec::new(),
            c: Vec::new(),
        }
    }

    fn reset_state(&mut self, len: usize) {
        self.h.clear();
        self.h.resize(len, 0.0);
        self.c.clear();
        self.c.resize(len, 0.0);
    }

    /// Fills inputs and targets for steps `first_step..first_step + seq` of `pieces`
    /// (`[seq, batch]` order); steps past a piece's end are padding.
    fn fill_chunk(
        &mut self,
        series: &[PreparedSeries],
        pieces: &[Piece],
        first_step: usize,
        seq: usize,
    ) {
        let batch = pieces.len();
        let (features, outputs) = (self.features, self.outputs);
        self.x.clear();
        self.x.resize(seq * batch * features, 0.0);
        self.targets.clear();
        self.targets.resize(seq * batch * outputs, 0.0);
        self.valid.clear();
        self.valid.resize(seq * batch * outputs, false);
        for t in 0..seq {
            let step = first_step + t;
            for (j, piece) in pieces.iter().enumerate() {
                if step >= piece.steps() {
                    continue;
                }
                let s = &series[piece.series];
                let point = piece.start + step;
                let slot = t * batch + j;
                self.x[slot * features..(slot + 1) * features]
                    .copy_from_slice(&s.inputs[point * features..(point + 1) * features]);
                let next = point + 1;
                self.targets[slot * outputs..(slot + 1) * outputs]
                    .copy_from_slice(&s.scaled[next * outputs..(next + 1) * outputs]);
                for (i, valid) in self.valid[slot * outputs..(slot + 1) * outputs]
                    .iter_mut()
                    .enumerate()
                {
                    *valid = s.is_input_target(next, i);
                }
            }
        }
    }
}

/// One epoch of stateful truncated BPTT; returns the mean training loss.
fn train_epoch(
    params: &mut LstmParams<f32>,
    adam: &mut Adam,
    series: &[PreparedSeries],
    pieces: &[Piece],
    opts: &TrainOptions,
    ws: &mut Workspace,
    rng: &mut SmallRng,
) -> Result<f64, crate::lstm::ShapeError> {
    let state = params.hidden() * params.layers();
    let mut loss_sum = 0.0;
    let mut count_sum = 0usize;
    for batch_pieces in pieces.chunks(opts.batch_streams) {
        let max_steps = batch_pieces.iter().map(Piece::steps).max().unwrap_or(0);
        let groups: Vec<&[Piece]> = batch_pieces.chunks(SUB_BATCH_STREAMS).collect();
        let mut states: Vec<(Vec<f32>, Vec<f32>)> = groups
            .iter()
            .map(|group| {
                (
                    vec![0.0; group.len() * state],
                    vec![0.0; group.len() * state],
                )
            })
            .collect();
        let mut first_step = 0;
        while first_step < max_steps {
            let seq = opts.window.min(max_steps - first_step);
            // Each group's gradient of its summed loss; the batch's mean is taken once all
            // are in (the gradient is linear in the loss), as one pass over the batch would.
            ws.summed.fill(0.0);
            let mut count = 0;
            for (group, (h, c)) in groups.iter().zip(&mut states) {
                ws.fill_chunk(series, group, first_step, seq);
                let dropout = (opts.dropout > 0.0).then(|| Dropout {
                    rate: opts.dropout,
                    seed: rng.gen(),
                });
                ws.tape
                    .forward_train(params, &ws.x, (seq, group.len()), h, c, dropout)?;
                ws.dyhat.clear();
                ws.dyhat.resize(ws.targets.len(), 0.0);
                for (((dy, &y), &target), &valid) in ws
                    .dyhat
                    .iter_mut()
                    .zip(ws.tape.yhat())
                    .zip(&ws.targets)
                    .zip(&ws.valid)
                {
                    if valid {
                        let r = y as f64 - target as f64;
                        loss_sum += huber(r);
                        *dy = r.clamp(-HUBER_DELTA, HUBER_DELTA) as f32;
                        count += 1;
                    }
                }
                ws.tape.backward(params, &ws.dyhat, &mut ws.grads)?;
                for (sum, &g) in ws.summed.iter_mut().zip(ws.grads.as_slice()) {
                    *sum += g;
                }
                ws.tape.copy_final_state(h, c)?;
            }
            let scale = 1.0 / count.max(1) as f32;
            for (g, &sum) in ws.grads.as_mut_slice().iter_mut().zip(&ws.summed) {
                *g = sum * scale;
            }
            count_sum += count;
            adam.step(params.as_mut_slice(), ws.grads.as_slice());
            first_step += seq;
        }
    }
    Ok(loss_sum / count_sum.max(1) as f64)
}

/// Runs `streams` from zero state, calling `on_forecast(series, target_index, input, yhat,
/// target)` for every forecast of an input's value.
fn run_streams(
    params: &LstmParams<f32>,
    series: &[PreparedSeries],
    streams: &[Piece],
    ws: &mut Workspace,
    mut on_forecast: impl FnMut(usize, usize, usize, f32, f32),
) -> Result<(), crate::lstm::ShapeError> {
    let outputs = ws.outputs;
    let state = params.hidden() * params.layers();
    for group in streams.chunks(EVAL_BATCH_STREAMS) {
        let batch = group.len();
        let max_steps = group.iter().map(Piece::steps).max().unwrap_or(0);
        ws.reset_state(batch * state);
        let mut first_step = 0;
        while first_step < max_steps {
            let seq = EVAL_CHUNK_STEPS.min(max_steps - first_step);
            ws.fill_chunk(series, group, first_step, seq);
            ws.tape.forward(params, &ws.x, seq, batch, &ws.h, &ws.c)?;
            for t in 0..seq {
                for (j, piece) in group.iter().enumerate() {
                    let target_index = piece.start + first_step + t + 1;
                    for i in 0..outputs {
                        let slot = (t * batch + j) * outputs + i;
                        if ws.valid[slot] {
                            on_forecast(
                                piece.series,
                                target_index,
                                i,
                                ws.tape.yhat()[slot],
                                ws.targets[slot],
                            );
                        }
                    }
                }
            }
            ws.tape.copy_final_state(&mut ws.h, &mut ws.c)?;
            first_step += seq;
        }
    }
    Ok(())
}

fn validation_loss(
    params: &LstmParams<f32>,
    series: &[PreparedSeries],
    streams: &[Piece],
    ws: &mut Workspace,
) -> Result<f64, crate::lstm::ShapeError> {
    let mut sum = 0.0;
    let mut count = 0usize;
    run_streams(
        params,
        series,
        streams,
        ws,
        |s, target_index, _, yhat, target| {
            let part = &series[s];
            if (part.train_end..part.validation_end).contains(&target_index) {
                sum += huber(yhat as f64 - target as f64);
                count += 1;
            }
        },
    )?;
    Ok(sum / count.max(1) as f64)
}

/// Loss of forecasting each validation point by its predecessor, for comparison.
fn last_value_baseline(series: &[PreparedSeries]) -> f64 {
    let mut sum = 0.0;
    let mut count = 0usize;
    for s in series {
        let (lo, hi, w) = (s.train_end.max(1), s.validation_end.min(s.len()), s.width());
        for t in lo..hi {
            for i in (0..w).filter(|i| s.is_input_target(t, *i)) {
                sum += huber(s.scaled[t * w + i] as f64 - s.scaled[(t - 1) * w + i] as f64);
                count += 1;
            }
        }
    }
    sum / count.max(1) as f64
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
        let (p, _) = prepare_stream(members, step_secs, opts)?;
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
    let members = ensemble_size(opts, targets);
    let ensemble = fit_ensemble(
        (features, width),
        (&prepared, &validation_streams),
        opts,
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

/// One model's training run: the parameters of its best validation epoch.
struct Fit {
    best: LstmParams<f32>,
    best_val: f64,
    best_epoch: usize,
    epochs_run: usize,
    last_train_loss: f64,
}

/// Training targets an automatic ensemble may cost in all: about the training part of issue
/// 5's reference series (20,160 points, 70% of them trained on), so an ensemble costs no more
/// than one model on two weeks at one minute.
pub const ENSEMBLE_TARGET_BUDGET: usize = 14_000;

/// The most members an automatic ensemble trains (NAB: 3 and 5 alike, docs/quality.md).
pub const MAX_ENSEMBLE: usize = 3;

/// The most members a config may ask for: the exporter runs a model that many times as wide.
pub const MAX_ENSEMBLE_MEMBERS: usize = 8;

/// How many models a detector's model averages: as `opts.ensemble` says, else as many as the
/// [`ENSEMBLE_TARGET_BUDGET`] affords for `targets` training targets (values to forecast), up
/// to [`MAX_ENSEMBLE`].
///
/// A model that learns from little data depends on its seed: NAB's standard score ranged from
/// 69.5 to 73.4 over eight seeds, and from 72.9 to 73.5 with three members (docs/quality.md).
/// With much data the seed hardly matters (SMD, ASD), and one model is cheaper.
pub fn ensemble_size(opts: &TrainOptions, targets: usize) -> usize {
    opts.ensemble
        .unwrap_or_else(|| (ENSEMBLE_TARGET_BUDGET / targets.max(1)).clamp(1, MAX_ENSEMBLE))
}

/// The model an ensemble ships, and each member's best validation loss.
struct Ensemble {
    /// The members side by side; its validation loss is the average forecast's, its epochs
    /// the first member's.
    model: Fit,
    member_val_losses: Vec<f64>,
}

/// Trains `members` models from consecutive seeds and merges them into one. The observer
/// follows the first member only: a search prunes a trial by it alone.
fn fit_ensemble(
    model: (usize, usize),
    (prepared, validation_streams): (&[PreparedSeries], &[Piece]),
    opts: &TrainOptions,
    members: usize,
    progress: &mut dyn FnMut(&Progress) -> Control,
) -> Result<Ensemble, TrainError> {
    let first = fit(
        model,
        prepared,
        validation_streams,
        opts,
        opts.seed,
        progress,
    )?;
    let mut member_val_losses = vec![first.best_val];
    if members <= 1 {
        return Ok(Ensemble {
            model: first,
            member_val_losses,
        });
    }
    let mut models = Vec::with_capacity(members);
    models.push(first.best);
    for member in 1..members {
        let seed = opts.seed.wrapping_add(member as u64);
        let mut quiet = |_: &Progress| Control::Continue;
        let fitted = fit(model, prepared, validation_streams, opts, seed, &mut quiet)?;
        member_val_losses.push(fitted.best_val);
        models.push(fitted.best);
    }
    let merged = LstmParams::side_by_side(&models).map_err(internal)?;
    let mut ws = Workspace::new(model.0, merged.hidden(), opts.layers, model.1);
    let best_val =
        validation_loss(&merged, prepared, validation_streams, &mut ws).map_err(internal)?;
    Ok(Ensemble {
        model: Fit {
            best: merged,
            best_val,
            ..first
        },
        member_val_losses,
    })
}

/// Trains one model from `seed` until its validation loss stops improving.
fn fit(
    (features, width): (usize, usize),
    prepared: &[PreparedSeries],
    validation_streams: &[Piece],
    opts: &TrainOptions,
    seed: u64,
    progress: &mut dyn FnMut(&Progress) -> Control,
) -> Result<Fit, TrainError> {
    let mut params = LstmParams::<f32>::init_multi(features, opts.hidden, opts.layers, width, seed);
    let mut adam = Adam::new(opts.learning_rate, params.as_slice().len());
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed_7a1e);
    let mut ws = Workspace::new(features, opts.hidden, opts.layers, width);
    let mut pieces = Vec::new();

    let mut best = params.clone();
    let mut best_val = f64::INFINITY;
    let mut best_epoch = 0;
    let mut epochs_run = 0;
    let mut last_train_loss = f64::NAN;
    for epoch in 1..=opts.max_epochs {
        training_pieces(prepared, PIECE_WINDOWS * opts.window, &mut rng, &mut pieces);
        let train_loss = train_epoch(
            &mut params,
            &mut adam,
            prepared,
            &pieces,
            opts,
            &mut ws,
            &mut rng,
        )
        .map_err(internal)?;
        let val_loss =
            validation_loss(&params, prepared, validation_streams, &mut ws).map_err(internal)?;
        if !train_loss.is_finite() || !val_loss.is_finite() {
            return Err(TrainError::NonFiniteLoss { epoch });
        }
        epochs_run = epoch;
        last_train_loss = train_loss;
        if val_loss < best_val {
            best_val = val_loss;
            best_epoch = epoch;
            best.clone_from(&params);
        }
        let control = progress(&Progress {
            epoch,
            max_epochs: opts.max_epochs,
            train_loss,
            val_loss,
            best_epoch,
        });
        if control == Control::Abandon {
            return Err(TrainError::Abandoned { epoch });
        }
        if epoch - best_epoch >= opts.patience {
            break;
        }
    }

    Ok(Fit {
        best,
        best_val,
        best_epoch,
        epochs_run,
        last_train_loss,
    })
}

/// The series of one stream, in input order (`None`: the group lacks that input).
type Members<'a> = Vec<Option<&'a SeriesHistory>>;

/// The streams to train on, each the members of one stream in input order, and a joint model's
/// inputs (sorted; empty when every series is a stream of its own). Only a detector whose
/// series all name an input is joint.
fn streams_of(
    series: &[SeriesHistory],
    joint: bool,
) -> Result<(Vec<String>, Vec<Members<'_>>), TrainError> {
    if !joint || !series.iter().all(|s| s.labels.contains_key(INPUT_LABEL)) {
        return Ok((Vec::new(), series.iter().map(|s| vec![Some(s)]).collect()));
    }
    let inputs: Vec<String> = series
        .iter()
        .filter_map(|s| s.labels.get(INPUT_LABEL).cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut groups: BTreeMap<BTreeMap<String, String>, Members<'_>> = BTreeMap::new();
    for s in series {
        let mut group = s.labels.clone();
        let input = group.remove(INPUT_LABEL).unwrap_or_default();
        let column = inputs.binary_search(&input).unwrap_or_default();
        let members = groups
            .entry(group)
            .or_insert_with(|| vec![None; inputs.len()]);
        if members[column].replace(s).is_some() {
            return Err(TrainError::InvalidSeries {
                key: series_key(&s.labels),
                reason: "two series for one input of one group".into(),
            });
        }
    }
    Ok((inputs, groups.into_values().collect()))
}

/// Per-series bands from calibration residuals, and their median for unseen series.
fn calibrate(
    params: &LstmParams<f32>,
    series: &[PreparedSeries],
    opts: &TrainOptions,
    ws: &mut Workspace,
) -> Result<(BTreeMap<String, SeriesCalibration>, f64), TrainError> {
    let mut streams = Vec::new();
    for (i, s) in series.iter().enumerate() {
        s.streams_for(i, &(s.validation_end..s.len()), &mut streams);
    }
    let mut residuals: Vec<Vec<Vec<f64>>> =
        series.iter().map(|s| vec![Vec::new(); s.width()]).collect();
    run_streams(
        params,
        series,
        &streams,
        ws,
        |s, target_index, input, yhat, target| {
            if target_index >= series[s].validation_end {
                residuals[s][input].push((yhat as f64 - target as f64).abs());
            }
        },
    )
    .map_err(internal)?;
    let mut calibrations = BTreeMap::new();
    let mut bands = Vec::with_capacity(series.len());
    // A joint group's input absent from the calibration part gets the typical band below.
    let mut unmeasured = Vec::new();
    for (s, per_input) in series.iter().zip(residuals) {
        for (i, mut r) in per_input.into_iter().enumerate() {
            if s.keys[i].is_empty() {
                continue;
            }
            let band = if r.is_empty() {
                unmeasured.push(s.keys[i].clone());
                f64::NAN
            } else {
                r.sort_by(f64::total_cmp);
                // A high quantile of a few thousand residuals is itself noisy; a floor in robust
                // standard deviations (1.4826 × median |r| estimates σ) keeps the band from being
                // narrower than normal noise warrants when the calibration sample happens to be
                // calm.
                let robust_sigma = 1.4826 * quantile_sorted(&r, 0.5);
                let band = (quantile_sorted(&r, opts.band_quantile) * opts.band_margin)
                    .max(MIN_BAND_SIGMAS * robust_sigma)
                    .max(MIN_BAND);
                bands.push(band);
                band
            };
            calibrations.insert(
                s.keys[i].clone(),
                SeriesCalibration {
                    scaler: s.scalers[i],
                    band,
                    range: s.ranges[i],
                    fitted_until: s.fitted_until,
                    weekly: s.weekly[i].clone(),
                },
            );
        }
    }
    bands.sort_by(f64::total_cmp);
    let typical = quantile_sorted(&bands, 0.5);
    for key in unmeasured {
        if let Some(calibration) = calibrations.get_mut(&key) {
            calibration.band = typical;
        }
    }
    Ok((calibrations, typical))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::input_row;
    use rand::Rng;

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
        prepare_stream(&[Some(series)], step_secs, opts)
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
                prepare_stream(&[Some(history)], STEP as u64, &opts).expect("prepares");
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
        let (p, _) = prepare_stream(&[Some(&lone), None], 60, &opts).expect("prepares");
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
}
