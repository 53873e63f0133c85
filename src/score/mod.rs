//! Turning fresh samples into scores, one detector at a time.
//!
//! The model is a stream model (docs/model-contract.md): each series carries its LSTM state from
//! one cycle to the next, so a cycle feeds only the points that arrived since the last one, and
//! all series that need the same number of steps go through ONNX Runtime in one batched `run`.
//! A point is scored against the forecast made one step earlier: its deviation
//! `|y - yhat| / band` (`band` the series' calibrated half-width) becomes its `anomaly_score` as
//! the detector's `detection.scoring` says ([`Scoring`]); above 1 is anomalous. Under the
//! likelihood, the deviations from the previous value and from the series' weekly profile
//! ([`season`]) have likelihoods of their own, and the highest of them is the score (the naive
//! one's at most [`NAIVE_CAP`] times the model's). A value beyond the range the series has
//! shown scores at least its [`novelty::novelty`], whatever the scoring.

pub mod detection;
pub mod dynamic;
pub mod group;
mod joint;
pub mod likelihood;
pub mod novelty;
pub mod season;
mod state;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use mad_training::contract::{
    input_row, series_key, Feature, Scaler, SeriesCalibration, MAX_INTERPOLATED_GAP,
};

use crate::model::{Forecaster, ModelError};
use crate::source::{Labels, Series};
pub use detection::{Detection, Direction, Scoring};
use likelihood::Normalizer;
use novelty::novelty;
use season::Season;
pub use state::SeriesState;
use state::Step;

/// Series per ONNX Runtime run: bounds the tensors of a cold start with many new series.
pub const MAX_BATCH: usize = 4096;

/// A score above this is anomalous: what the alerts fire on, and what a retrain leaves out.
pub const ANOMALOUS_ABOVE: f64 = 1.0;

/// How far past the model's own score the naive forecast's may go: a jump from the last value
/// counts only as far as the model, too, was surprised by it. A swing the model foresaw (the
/// usual jumps of a noisy series) is no news, while a change it did not (a level the frozen
/// model never saw) still scores up to this many times the model's score. At 4, NAB's false
/// positives fall from 50 to 42 and no window is lost; caps of 3 to 8 score alike, 2 loses
/// windows, and a tighter cap costs ASD (docs/quality.md).
pub const NAIVE_CAP: f64 = 4.0;

/// A point's `anomaly_score` from its scorers' verdicts: the most surprised one counts, the
/// naive forecast's capped at [`NAIVE_CAP`] times the model's.
fn combined(model: f64, naive: Option<f64>, seasonal: Option<f64>, novel: f64) -> f64 {
    let naive = naive.map_or(0.0, |naive| naive.min(NAIVE_CAP * model));
    model.max(naive).max(seasonal.unwrap_or(0.0)).max(novel)
}

/// One scored point, in the series' own units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub ts: i64,
    pub y: f64,
    pub yhat: f64,
    pub lower: f64,
    pub upper: f64,
    pub score: f64,
}

impl Score {
    fn new(
        ts: i64,
        y: f64,
        yhat_scaled: f32,
        scaler: &Scaler,
        band: f64,
        detection: &Detection,
    ) -> Score {
        let yhat = scaler.unscale(f64::from(yhat_scaled));
        let half = detection.half_width(yhat, band * scaler.scale);
        Score {
            ts,
            y,
            yhat,
            lower: yhat - half,
            upper: yhat + half,
            score: detection.score(y, yhat, half),
        }
    }
}

/// The points one series got scored in a cycle, with the series' index in the fetched slice.
pub type SeriesScores = (usize, Vec<Score>);

/// What one cycle did, for self-monitoring.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CycleStats {
    pub series_scored: usize,
    pub points_scored: usize,
    pub points_fed: usize,
    /// ONNX Runtime calls.
    pub runs: usize,
    pub new_series: usize,
    pub expired_series: usize,
}

impl CycleStats {
    /// Counts the series a run scored points of, and keeps their scores.
    fn collect(&mut self, results: Vec<SeriesScores>, scored: &mut Vec<SeriesScores>) {
        for (index, scores) in results {
            if !scores.is_empty() {
                self.series_scored += 1;
                self.points_scored += scores.len();
                scored.push((index, scores));
            }
        }
    }
}

/// The median of scale over |centre| among calibrated series; `None` without any.
fn typical_relative_spread(series: &BTreeMap<String, SeriesCalibration>) -> Option<f64> {
    let mut ratios: Vec<f64> = series
        .values()
        .filter(|cal| cal.scaler.center.abs() > 0.0)
        .map(|cal| cal.scaler.scale / cal.scaler.center.abs())
        .filter(|r| r.is_finite())
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios.get(ratios.len() / 2).copied()
}

/// The scaler of a series the model was not calibrated on, fitted on its warm-up's `observed`
/// values. A warm-up may cover a fraction of the series' cycle, and a scale fitted on it alone
/// can be a small part of the real one: the inputs then leave the range the model was trained
/// on and its forecasts are lost. Series of one query vary alike for their level (pods of one
/// deployment), so the calibrated ones lend their spread (`relative_spread`).
fn own_scaler(observed: &[f64], relative_spread: Option<f64>) -> Scaler {
    let mut scaler = Scaler::fit(observed);
    if let Some(relative) = relative_spread {
        scaler.scale = scaler.scale.max(relative * scaler.center.abs());
    }
    scaler
}

/// Scores one detector's series with one model, keeping per-series state between cycles.
pub struct DetectorScorer {
    model: Arc<Forecaster>,
    step: i64,
    staleness: i64,
    detection: Detection,
    series: HashMap<Labels, SeriesState>,
    /// A joint model's per-group stream state, by group labels (empty for any other model).
    groups: HashMap<Labels, joint::GroupState>,
    /// Scale over level of the series the model was calibrated on (median): see
    /// [`Self::hold_until_fitted`].
    relative_spread: Option<f64>,
}

impl DetectorScorer {
    pub fn new(model: Arc<Forecaster>, staleness_secs: i64) -> DetectorScorer {
        DetectorScorer {
            step: model.meta.step_secs as i64,
            relative_spread: typical_relative_spread(&model.meta.series),
            model,
            staleness: staleness_secs,
            detection: Detection::default(),
            series: HashMap::new(),
            groups: HashMap::new(),
        }
    }

    /// Scores by the detector's `detection:` settings (direction, minimum deviation) instead of
    /// the defaults (both directions, the calibrated band alone).
    pub fn with_detection(mut self, detection: Detection) -> DetectorScorer {
        self.detection = detection;
        self
    }

    pub fn model(&self) -> &Arc<Forecaster> {
        &self.model
    }

    /// Points of history a brand-new series needs before its first score: the model's window
    /// (its LSTM state settles), then what the scoring needs to have seen (a likelihood needs
    /// an error history). The exporter fetches that much for a new series, so a restart scores
    /// at once.
    pub fn warmup_points(&self) -> usize {
        self.model.meta.window + Normalizer::history_needed(self.detection.scoring)
    }

    /// How far back the next fetch must reach so every known series can continue its stream.
    pub fn lookback_points(&self, end: i64) -> usize {
        let furthest = self
            .series
            .values()
            .map(|s| (end.saturating_sub(s.last_ts) / self.step).max(1) as usize)
            .max()
            .unwrap_or(self.warmup_points() + 1);
        furthest.clamp(2, self.warmup_points() + 1)
    }

    /// Whether any of `fetched` is unknown and so needs a full warm-up window of history.
    pub fn has_unknown(&self, fetched: &[Series]) -> bool {
        fetched.iter().any(|s| !self.series.contains_key(&s.labels))
    }

    /// Whether the scorer keeps state for this series.
    pub fn tracks(&self, labels: &Labels) -> bool {
        self.series.contains_key(labels)
    }

    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// The latest score of every series that has one.
    pub fn latest(&self) -> impl Iterator<Item = (&Labels, &SeriesState, &Score)> {
        self.series
            .iter()
            .filter_map(|(labels, s)| s.latest.as_ref().map(|score| (labels, s, score)))
    }

    /// Feeds every point newer than each series' last one and scores the observed points.
    /// `now` (Unix seconds) decides which absent series have gone stale.
    pub fn score_cycle(
        &mut self,
        fetched: &[Series],
        now: i64,
    ) -> Result<(CycleStats, Vec<SeriesScores>), ModelError> {
        if self.model.is_joint() {
            return self.score_joint_cycle(fetched, now);
        }
        let mut stats = CycleStats::default();
        // Series (as indices into `fetched`) grouped by how many steps they need, so each
        // group is fed in batched runs.
        let mut by_len: HashMap<usize, Vec<(usize, Vec<Step>)>> = HashMap::new();
        let (warmup, relative_spread) = (self.warmup_points(), self.relative_spread);
        for (index, series) in fetched.iter().enumerate() {
            let known = self.series.get(&series.labels);
            let Some((steps, restart)) = self.new_steps(series, known) else {
                continue;
            };
            let state = if restart {
                let fresh = self.fresh_state(&series.labels);
                stats.new_series += 1;
                self.series.entry(series.labels.clone()).or_insert(fresh)
            } else {
                match self.series.get_mut(&series.labels) {
                    Some(state) => state,
                    None => continue,
                }
            };
            state.last_seen = now;
            let Some(steps) = Self::hold_until_fitted(state, steps, warmup, relative_spread) else {
                continue;
            };
            by_len.entry(steps.len()).or_default().push((index, steps));
        }
        let mut scored = Vec::new();
        let mut lens: Vec<usize> = by_len.keys().copied().collect();
        lens.sort_unstable();
        for len in lens {
            let group = by_len.remove(&len).unwrap_or_default();
            stats.runs += group.len().div_ceil(MAX_BATCH);
            stats.points_fed += len * group.len();
            stats.collect(self.run_group(len, group, fetched)?, &mut scored);
        }
        self.expire(now, &mut stats);
        Ok((stats, scored))
    }

    /// Drops the state of series (and of a joint model's groups) not returned for longer than
    /// the staleness.
    fn expire(&mut self, now: i64, stats: &mut CycleStats) {
        let before = self.series.len();
        let staleness = self.staleness;
        self.series
            .retain(|_, s| now.saturating_sub(s.last_seen) <= staleness);
        self.groups
            .retain(|_, g| now.saturating_sub(g.last_seen) <= staleness);
        stats.expired_series = before - self.series.len();
    }

    /// Forgets these series (state and score): series that moved to another replica leave this
    /// one's /metrics at once rather than going stale.
    pub fn forget(&mut self, series: &[Labels]) {
        for labels in series {
            self.series.remove(labels);
            self.groups.remove(&crate::source::group_of(labels).0);
        }
    }

    /// Takes over `old`'s series states where this scorer's model continues `old`'s
    /// (`mad_training::train_continuing`): the same shape, and for each series the same
    /// scaler. Such a series goes on as if the model had not changed — its LSTM state, error
    /// histories (and the band they are measured in), range and weekly profile — instead of
    /// warming up again, whose fresh likelihoods fire on ordinary swings. Any other series, and
    /// a joint model's groups, start afresh. Returns how many series went on.
    pub fn go_on_from(&mut self, old: DetectorScorer) -> usize {
        let (new, previous) = (&self.model.meta, &old.model.meta);
        let continued = new.training.get(mad_training::CONTINUED_META_KEY)
            == Some(&serde_json::Value::Bool(true));
        let same_shape = (new.hidden, new.layers, &new.features)
            == (previous.hidden, previous.layers, &previous.features);
        let per_series = new.inputs.is_empty() && previous.inputs.is_empty();
        if !(continued && same_shape && per_series) {
            return 0;
        }
        let mut went_on = 0;
        for (labels, state) in old.series {
            let same_scaler = new
                .series
                .get(&series_key(&labels))
                .is_some_and(|cal| cal.scaler == state.scaler);
            if same_scaler && state.unfitted.is_none() {
                self.series.insert(labels, state);
                went_on += 1;
            }
        }
        went_on
    }

    /// Forgets every series' scores (not its state): used when the datasource fails, so stale
    /// values are not served as fresh.
    pub fn clear_latest(&mut self) {
        for state in self.series.values_mut() {
            state.latest = None;
        }
    }

    /// The points after the series' last fed one, up to its newest observed point, with short
    /// interior gaps interpolated. After a gap longer than [`MAX_INTERPOLATED_GAP`] the stream
    /// goes on from the state before it: the first point after the gap is fed but not scored
    /// (the state has not seen the time in between), the next ones are. Restarting from zero
    /// instead left a series unscored for a whole window after every outage. Also says whether
    /// the stream starts (an unknown series). `None` when there is nothing new.
    fn new_steps(&self, series: &Series, known: Option<&SeriesState>) -> Option<(Vec<Step>, bool)> {
        let last_observed = series.last_finite()?;
        let (mut prev_ts, mut prev_raw) = match known {
            Some(s) => (s.last_ts, s.last_raw),
            None => (i64::MIN, f64::NAN),
        };
        if last_observed <= prev_ts {
            return None;
        }
        let mut steps: Vec<Step> = Vec::new();
        for &(ts, raw) in &series.points {
            if ts <= prev_ts || ts > last_observed || !raw.is_finite() || ts % self.step != 0 {
                continue;
            }
            let missing = if prev_ts == i64::MIN {
                0
            } else {
                ((ts - prev_ts) / self.step - 1) as usize
            };
            let after_long_gap = missing > MAX_INTERPOLATED_GAP;
            if !after_long_gap {
                for k in 1..=missing as i64 {
                    let frac = k as f64 / (missing + 1) as f64;
                    steps.push(Step {
                        ts: prev_ts + k * self.step,
                        raw: prev_raw + (raw - prev_raw) * frac,
                        observed: false,
                    });
                }
            }
            steps.push(Step {
                ts,
                raw,
                observed: !after_long_gap,
            });
            (prev_ts, prev_raw) = (ts, raw);
        }
        steps.first()?;
        let restart = known.is_none();
        // A fresh stream only needs its warm-up window, not everything the fetch returned.
        if restart && steps.len() > self.warmup_points() + 1 {
            steps.drain(..steps.len() - (self.warmup_points() + 1));
        }
        Some((steps, restart))
    }

    /// A series the model was calibrated on starts with its scaler; any other one gets its own
    /// in [`Self::hold_until_fitted`].
    fn fresh_state(&self, labels: &Labels) -> SeriesState {
        let meta = &self.model.meta;
        let calibration = meta.series.get(&series_key(labels));
        let mut state = SeriesState::new(
            calibration.map_or(Scaler::fit(&[]), |cal| cal.scaler),
            calibration.map_or(meta.default_band, |cal| cal.band),
            meta.layers * meta.hidden,
            Normalizer::new(self.detection.scoring),
            Normalizer::for_persistence(self.detection.scoring),
        );
        state.range = calibration.and_then(|cal| cal.range);
        state.fitted_until = calibration.and_then(|cal| cal.fitted_until);
        if Season::applies(self.detection.scoring) {
            let seed = calibration.and_then(|cal| cal.weekly.as_ref());
            state.season = Some(Box::new(Season::new(self.step, seed)));
        }
        if calibration.is_none() {
            state.unfitted = Some(Vec::new());
        }
        state
    }

    /// The steps to feed now. A series without a scaler holds its points back until it has a
    /// warm-up's worth, fits its scaler on them and then feeds them all: a series that has just
    /// appeared shows one or two points, and a scaler fitted on those made all its later scores
    /// meaningless. Scores start no later for it: they need a warm-up of fed points anyway.
    fn hold_until_fitted(
        state: &mut SeriesState,
        steps: Vec<Step>,
        needed: usize,
        relative_spread: Option<f64>,
    ) -> Option<Vec<Step>> {
        let Some(held) = state.unfitted.as_mut() else {
            return Some(steps);
        };
        held.extend(steps);
        if let Some(last) = held.last() {
            (state.last_ts, state.last_raw) = (last.ts, last.raw);
        }
        let observed: Vec<f64> = held.iter().filter(|p| p.observed).map(|p| p.raw).collect();
        if observed.len() < needed {
            return None;
        }
        state.scaler = own_scaler(&observed, relative_spread);
        state.unfitted.take()
    }

    /// Feeds a group of series that all need `len` steps, at most [`MAX_BATCH`] series per run,
    /// all `len` steps in one run: every point enters the state as it was observed. (Points
    /// scoring above 1 entered it clipped to their band once, so a spike would not derail the
    /// forecasts after it; but a level that had moved for good was then never followed: NAB
    /// 56.8 without clipping against 54.3 with it, SMD and ASD alike.)
    fn run_group(
        &mut self,
        len: usize,
        group: Vec<(usize, Vec<Step>)>,
        fetched: &[Series],
    ) -> Result<Vec<SeriesScores>, ModelError> {
        let mut results = Vec::with_capacity(group.len());
        let mut group = group.into_iter().peekable();
        while group.peek().is_some() {
            let chunk: Vec<(usize, Vec<Step>)> = group.by_ref().take(MAX_BATCH).collect();
            // Taken out of the map (key and all) for the run, so nothing is cloned.
            let mut keys = Vec::with_capacity(chunk.len());
            let mut states = Vec::with_capacity(chunk.len());
            for (index, _) in &chunk {
                let (key, state) = self
                    .series
                    .remove_entry(&fetched[*index].labels)
                    .ok_or_else(|| {
                        ModelError::Inference("series state vanished mid-cycle".into())
                    })?;
                keys.push(key);
                states.push(state);
            }
            let outcome = self.run_chunk(len, &chunk, &mut states);
            // States go back whatever happened: a failed run must not forget series.
            self.series.extend(keys.into_iter().zip(states));
            for ((index, _), scores) in chunk.into_iter().zip(outcome?) {
                results.push((index, scores));
            }
        }
        Ok(results)
    }

    /// The deviation of `y` from a forecast other than the model's, in the series' band
    /// half-widths: the naive one "as the previous point", or the [`Season`]'s. Each is scored
    /// through its own likelihood next to the model's: a forecaster that learnt from a short,
    /// frozen history can follow a change into a pattern it never saw, while a jump from the
    /// last value shows it at once (NAB, ASD: docs/quality.md; as far as [`NAIVE_CAP`] lets it),
    /// and a day unlike its weekday shows against the same hours of earlier weeks.
    fn deviation_from(&self, calibrated_half_width: f64, y: f64, expected: f64) -> f64 {
        let half = self.detection.half_width(expected, calibrated_half_width);
        self.detection.score(y, expected, half)
    }

    fn run_chunk(
        &self,
        len: usize,
        chunk: &[(usize, Vec<Step>)],
        states: &mut [SeriesState],
    ) -> Result<Vec<Vec<Score>>, ModelError> {
        let (f, hd, batch) = (self.model.features(), self.model.hidden(), chunk.len());
        let layers = self.model.layers();
        let features = &self.model.meta.features;
        // A series keeps its layers' states back to back; the model takes `[layers, batch, H]`.
        let slot = |layer: usize, b: usize| (layer * batch + b) * hd..(layer * batch + b + 1) * hd;
        let mut h = vec![0f32; layers * batch * hd];
        let mut c = vec![0f32; layers * batch * hd];
        for (b, state) in states.iter().enumerate() {
            for layer in 0..layers {
                let own = layer * hd..(layer + 1) * hd;
                h[slot(layer, b)].copy_from_slice(&state.h[own.clone()]);
                c[slot(layer, b)].copy_from_slice(&state.c[own]);
            }
        }
        let mut x = vec![0f32; len * batch * f];
        let value_columns: Vec<usize> = (0..f).filter(|&i| features[i] == Feature::Value).collect();
        let mut time_row: Option<(i64, Vec<f32>)> = None;
        for t in 0..len {
            for (b, ((_, steps), state)) in chunk.iter().zip(states.iter()).enumerate() {
                let p = steps[t];
                let row = &mut x[(t * batch + b) * f..(t * batch + b + 1) * f];
                // Series of a detector share their timestamps: time features once per timestamp.
                match &time_row {
                    Some((ts, cached)) if *ts == p.ts => row.copy_from_slice(cached),
                    _ => {
                        input_row(features, p.ts, 0.0, row);
                        time_row = Some((p.ts, row.to_vec()));
                    }
                }
                let scaled = state.scaler.scale(p.raw) as f32;
                for &col in &value_columns {
                    row[col] = scaled;
                }
            }
        }
        let out = self.model.run(&x, len, batch, &h, &c)?;
        // Nothing below can fail: the states change only once the run has succeeded.
        let mut scores = Vec::with_capacity(batch);
        for (b, ((_, steps), state)) in chunk.iter().zip(states.iter_mut()).enumerate() {
            for layer in 0..layers {
                let own = layer * hd..(layer + 1) * hd;
                state.h[own.clone()].copy_from_slice(&out.h[slot(layer, b)]);
                state.c[own].copy_from_slice(&out.c[slot(layer, b)]);
            }
            scores.push(self.score_steps(state, steps, |t| out.yhat[t * batch + b]));
        }
        Ok(scores)
    }

    /// Scores a series' fed steps, each against the forecast made one step before it
    /// (`forecast_after(t)` is the one made at step `t`), and moves its state past them. Steps
    /// the model was fitted to (up to `fitted_until`) are fed and widen the range, unscored.
    fn score_steps(
        &self,
        state: &mut SeriesState,
        steps: &[Step],
        forecast_after: impl Fn(usize) -> f32,
    ) -> Vec<Score> {
        let window = self.model.meta.window;
        let mut scores = Vec::new();
        let mut previous = state.last_raw;
        for (t, p) in steps.iter().enumerate() {
            // The model's errors on points it was fitted to are smaller than any it makes
            // live: learnt from, they set the likelihood's idea of normal too tight
            // (docs/quality.md: NAB 68.4 → 69.2, SMD 0.385 → 0.400, ASD 0.455 → 0.463).
            let in_sample = state.fitted_until.is_some_and(|until| p.ts <= until);
            let scorable = p.observed && state.fed >= window && !in_sample;
            if let (true, Some(yhat)) = (scorable, state.pending) {
                let mut score = Score::new(
                    p.ts,
                    p.raw,
                    yhat,
                    &state.scaler,
                    state.band,
                    &self.detection,
                );
                // Only scorings with a naive likelihood pay for its deviation.
                let calibrated = state.band * state.scaler.scale;
                let naive = state.persistence.as_mut().and_then(|normalizer| {
                    normalizer.update(self.deviation_from(calibrated, p.raw, previous))
                });
                let seasonal = state.season.as_mut().and_then(|season| {
                    season.score(p.ts, |expected| {
                        self.deviation_from(calibrated, p.raw, expected)
                    })
                });
                if let Some(normalized) = state.normalizer.update(score.score) {
                    let novel = state.range.map_or(0.0, |range| {
                        novelty(range, p.raw, score.yhat, &self.detection)
                    });
                    score.score = combined(normalized, naive, seasonal, novel);
                    scores.push(score);
                }
            }
            if p.observed && p.raw.is_finite() {
                state.range = state.range.map(|range| range.including(p.raw));
                // Values, not errors: the fitted points are as good a past as any.
                if let Some(season) = state.season.as_mut() {
                    season.learn(p.ts, p.raw);
                }
            }
            state.pending = Some(forecast_after(t));
            state.fed += 1;
            previous = p.raw;
        }
        if let Some(last) = steps.last() {
            (state.last_ts, state.last_raw) = (last.ts, last.raw);
        }
        if let Some(latest) = scores.last() {
            state.latest = Some(*latest);
        }
        scores
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_surprised_scorer_counts() {
        assert_eq!(combined(0.5, Some(0.2), Some(1.5), 0.0), 1.5);
        assert_eq!(combined(0.5, None, None, 3.0), 3.0);
        assert_eq!(combined(1.2, Some(0.1), None, 0.4), 1.2);
    }

    #[test]
    fn the_naive_forecast_counts_only_as_far_as_the_model_was_surprised() {
        // The model was somewhat surprised: the jump from the last value raises the score.
        assert_eq!(combined(0.3, Some(1.1), None, 0.0), 1.1);
        assert_eq!(combined(0.3, Some(9.0), None, 0.0), NAIVE_CAP * 0.3);
        // The model foresaw it: a jump it expected is no news.
        assert_eq!(combined(0.0, Some(9.0), None, 0.0), 0.0);
        // The cap is the naive forecast's alone: the weekly profile and novelty are not held.
        assert_eq!(combined(0.0, Some(9.0), Some(2.0), 5.0), 5.0);
    }
}
