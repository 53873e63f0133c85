//! A detector's series as the model sees them: each series (or a joint group's inputs side by
//! side) on its regular grid from its first sample, short gaps interpolated and long ones
//! stepped over, scaled by its own robust scaler and split in time into training, validation
//! and calibration parts; and the training part cut into pieces for each epoch.

use std::collections::BTreeMap;
use std::ops::Range;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::Rng;

use super::{SeriesHistory, TrainError, TrainOptions};
use crate::contract::{
    columns, joint_input_row, series_key, Scaler, ValueRange, INPUT_LABEL, MAX_INTERPOLATED_GAP,
};
use crate::weekly::{WeeklyProfile, WeeklySeed};

/// A series whose timestamps would span more grid points than this is rejected.
const MAX_GRID_POINTS: usize = 50_000_000;

/// One stream (long gaps stepped over), scaled, with its split points: a series on its own, or
/// the inputs of one group side by side for a joint model (`width` of them).
pub(super) struct PreparedSeries {
    /// Each input's series key, scaler and span of values (for the exporter's range novelty).
    pub(super) keys: Vec<String>,
    pub(super) scalers: Vec<Scaler>,
    pub(super) ranges: Vec<Option<ValueRange>>,
    /// Scaled values `[len, width]`; an input absent at a joint row carries its last value.
    pub(super) scaled: Vec<f32>,
    /// `[len, width]`: whether the input was there (an absent one is no forecast target).
    pub(super) present: Vec<bool>,
    /// Model input rows `[len, columns]`.
    pub(super) inputs: Vec<f32>,
    /// Points that follow a long gap (dropped from the arrays): fed, but not a forecast target,
    /// as the exporter scores them.
    pub(super) after_gap: Vec<bool>,
    /// Forecast targets with index in `..train_end` are training targets, in
    /// `train_end..validation_end` validation targets, the rest calibration targets.
    pub(super) train_end: usize,
    pub(super) validation_end: usize,
    /// Timestamp of the last training target (`None` without any).
    pub(super) fitted_until: Option<i64>,
    /// Each input's weekly profile over the training part, where it describes the input.
    pub(super) weekly: Vec<Option<WeeklySeed>>,
}

impl PreparedSeries {
    pub(super) fn len(&self) -> usize {
        self.after_gap.len()
    }

    pub(super) fn width(&self) -> usize {
        self.keys.len()
    }

    /// Number of points in `range` that are a forecast target of some input (they have a
    /// predecessor and do not follow a long gap).
    pub(super) fn targets_in(&self, range: Range<usize>) -> usize {
        (range.start.max(1)..range.end.min(self.len()))
            .filter(|t| self.is_target(*t))
            .count()
    }

    pub(super) fn is_target(&self, t: usize) -> bool {
        !self.after_gap.get(t).copied().unwrap_or(false)
    }

    /// Whether input `i`'s value at point `t` is a forecast target.
    pub(super) fn is_input_target(&self, t: usize, i: usize) -> bool {
        self.is_target(t) && self.present[t * self.width() + i]
    }

    /// The stream from its start up to the last target in `targets`, if it has one there.
    pub(super) fn streams_for(&self, series: usize, targets: &Range<usize>, out: &mut Vec<Piece>) {
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
pub(super) struct Piece {
    pub(super) series: usize,
    pub(super) start: usize,
    pub(super) end: usize,
}

impl Piece {
    /// Forecast steps: every point but the last is an input whose successor is the target.
    pub(super) fn steps(&self) -> usize {
        self.end - self.start - 1
    }
}

/// Places the samples on the regular grid starting at `origin`, at or before the first sample.
pub(super) fn regularise_from(
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
pub(super) fn interpolate_short_gaps(values: &mut [f64]) {
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
pub(super) fn prepare_stream(
    members: &[Option<&SeriesHistory>],
    step_secs: u64,
    opts: &TrainOptions,
    kept_scalers: Option<&BTreeMap<String, Scaler>>,
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
    // A continued model keeps the scalers it learnt with; a series new to it gets its own.
    let scalers: Vec<Scaler> = (0..width)
        .map(|i| {
            kept_scalers
                .and_then(|kept| kept.get(&keys[i]))
                .copied()
                .unwrap_or_else(|| Scaler::fit(&column(i, 0..train_end)))
        })
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

/// Cuts every training stream into pieces of `piece_len..2*piece_len` points with a random
/// first boundary, so chunk boundaries land elsewhere each epoch.
pub(super) fn training_pieces(
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

/// The series of one stream, in input order (`None`: the group lacks that input).
type Members<'a> = Vec<Option<&'a SeriesHistory>>;

/// The streams to train on, each the members of one stream in input order, and a joint model's
/// inputs (sorted; empty when every series is a stream of its own). Only a detector whose
/// series all name an input is joint.
pub(super) fn streams_of(
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
