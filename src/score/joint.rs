//! A joint model's cycle: the inputs of one group are one stream.
//!
//! A joint model ([`ModelMeta::inputs`](mad_training::contract::ModelMeta::inputs)) reads every
//! input of a group at each timestamp and forecasts each of them, so the LSTM state belongs to
//! the group; scaling, band, likelihoods and range stay each input's own ([`SeriesState`]) and
//! score exactly as a series of a per-series model does. The group's timeline is the union of
//! its inputs' new timestamps, on the grid as training laid it out: an input missing at one of
//! them is interpolated across a short gap or carries its last value, unscored; a stretch where
//! no input has a point and that is longer than [`MAX_INTERPOLATED_GAP`] is stepped over, and
//! the row after it is fed but not scored.

use std::collections::{BTreeMap, HashMap};

use mad_training::contract::{joint_input_row, Scaler, MAX_INTERPOLATED_GAP};

use super::state::Step;
use super::{own_scaler, CycleStats, DetectorScorer, SeriesScores, SeriesState, MAX_BATCH};
use crate::model::ModelError;
use crate::source::{group_of, Labels, Series};

/// What the scorer remembers about one group of a joint model between cycles.
#[derive(Debug, Clone)]
pub struct GroupState {
    /// LSTM state after the last fed row, `[layers × hidden]` each (layer by layer).
    h: Vec<f32>,
    c: Vec<f32>,
    /// Timestamp of the last fed row.
    last_ts: i64,
    /// Each input's last fed scaled value: an input absent from a fetch carries it.
    last_scaled: Vec<f32>,
    pub(super) last_seen: i64,
}

/// One group's rows for this cycle: per input (model column), the index of its series in the
/// fetched slice and its steps on the group's timeline.
struct GroupRows {
    group: Labels,
    timestamps: Vec<i64>,
    members: Vec<Option<(usize, Vec<Step>)>>,
}

impl DetectorScorer {
    /// [`DetectorScorer::score_cycle`] for a joint model.
    pub(super) fn score_joint_cycle(
        &mut self,
        fetched: &[Series],
        now: i64,
    ) -> Result<(CycleStats, Vec<SeriesScores>), ModelError> {
        let mut stats = CycleStats::default();
        let inputs = &self.model.meta.inputs;
        let mut groups: BTreeMap<Labels, Vec<Option<usize>>> = BTreeMap::new();
        for (index, series) in fetched.iter().enumerate() {
            let (group, input) = group_of(&series.labels);
            // A series the model has no column for cannot be fed: it stays unscored.
            let Some(column) = input.and_then(|name| inputs.iter().position(|i| i == name)) else {
                continue;
            };
            groups
                .entry(group)
                .or_insert_with(|| vec![None; inputs.len()])[column] = Some(index);
        }
        let mut by_len: HashMap<usize, Vec<GroupRows>> = HashMap::new();
        for (group, members) in groups {
            let Some(rows) = self.group_rows(group, &members, fetched) else {
                continue;
            };
            // A group whose stream starts now starts its inputs afresh too (their forecasts
            // and warm-up belong to the group's stream).
            let new_group = !self.groups.contains_key(&rows.group);
            for (index, steps) in rows.members.iter().flatten() {
                let labels = &fetched[*index].labels;
                match self.series.get_mut(labels) {
                    Some(state) if !new_group => state.last_seen = now,
                    _ => {
                        let mut state = self.fresh_input_state(labels, steps);
                        state.last_seen = now;
                        self.series.insert(labels.clone(), state);
                        stats.new_series += 1;
                    }
                }
            }
            by_len.entry(rows.timestamps.len()).or_default().push(rows);
        }
        let mut scored = Vec::new();
        let mut lens: Vec<usize> = by_len.keys().copied().collect();
        lens.sort_unstable();
        for len in lens {
            let all = by_len.remove(&len).unwrap_or_default();
            let mut all = all.into_iter().peekable();
            while all.peek().is_some() {
                let chunk: Vec<GroupRows> = all.by_ref().take(MAX_BATCH).collect();
                stats.runs += 1;
                stats.points_fed += len * chunk.len();
                stats.collect(self.run_groups(len, &chunk, fetched, now)?, &mut scored);
            }
        }
        self.expire(now, &mut stats);
        Ok((stats, scored))
    }

    /// The group's rows after its last fed one. `None` when there is nothing new.
    fn group_rows(
        &self,
        group: Labels,
        members: &[Option<usize>],
        fetched: &[Series],
    ) -> Option<GroupRows> {
        let last_ts = self.groups.get(&group).map_or(i64::MIN, |g| g.last_ts);
        let step = self.step;
        fn fresh(
            series: &Series,
            last_ts: i64,
            step: i64,
        ) -> impl Iterator<Item = (i64, f64)> + '_ {
            series
                .points
                .iter()
                .filter(move |(ts, raw)| *ts > last_ts && raw.is_finite() && ts % step == 0)
                .copied()
        }
        let mut observed: Vec<i64> = members
            .iter()
            .flatten()
            .flat_map(|index| fresh(&fetched[*index], last_ts, step).map(|(ts, _)| ts))
            .collect();
        observed.sort_unstable();
        observed.dedup();
        // Every grid step from the first new point on, except stretches no input has a point
        // in that are too long to interpolate (training drops those too).
        let mut timestamps = Vec::new();
        let mut after_gap = Vec::new();
        let mut previous = (last_ts != i64::MIN).then_some(last_ts);
        for &ts in &observed {
            let missing = previous.map_or(0, |p| ((ts - p) / step - 1) as usize);
            if missing > MAX_INTERPOLATED_GAP {
                after_gap.push(ts);
            } else if let Some(p) = previous {
                timestamps.extend((1..=missing as i64).map(|k| p + k * step));
            }
            timestamps.push(ts);
            previous = Some(ts);
        }
        if timestamps.is_empty() {
            return None;
        }
        if last_ts == i64::MIN {
            // A fresh stream only needs its warm-up window, not everything the fetch returned.
            let keep = self.warmup_points() + 1;
            timestamps.drain(..timestamps.len().saturating_sub(keep));
        }
        let members = members
            .iter()
            .map(|member| {
                let index = (*member)?;
                let mut points: Vec<(i64, f64)> = fresh(&fetched[index], last_ts, step).collect();
                // A range query returns them in order; anything else is put in order.
                points.sort_by_key(|p| p.0);
                points.dedup_by_key(|p| p.0);
                // A stream that starts now starts its inputs afresh.
                let previous = self
                    .series
                    .get(&fetched[index].labels)
                    .filter(|s| last_ts != i64::MIN && s.last_raw.is_finite())
                    .map(|s| (s.last_ts, s.last_raw));
                // An input with no value yet to carry is not part of the group yet.
                if points.is_empty() && previous.is_none() {
                    return None;
                }
                let steps = timestamps
                    .iter()
                    .map(|&ts| {
                        let mut point = input_step(&points, previous, ts, step);
                        point.observed &= after_gap.binary_search(&ts).is_err();
                        point
                    })
                    .collect();
                Some((index, steps))
            })
            .collect();
        Some(GroupRows {
            group,
            timestamps,
            members,
        })
    }

    /// A state for an input series first seen now. One the model was calibrated on starts with
    /// its scaler; any other one fits its own on the points of this fetch (a group new to the
    /// model is fetched with a full warm-up of history), as wide as the calibrated series'
    /// typical spread at least.
    fn fresh_input_state(&self, labels: &Labels, steps: &[Step]) -> SeriesState {
        let mut state = self.fresh_state(labels);
        // The LSTM state is the group's.
        (state.h, state.c) = (Vec::new(), Vec::new());
        if state.unfitted.take().is_some() {
            let observed: Vec<f64> = steps.iter().filter(|s| s.observed).map(|s| s.raw).collect();
            state.scaler = own_scaler(&observed, self.relative_spread);
        }
        state
    }

    /// Feeds groups that all need `len` rows in one run, then scores each present input.
    fn run_groups(
        &mut self,
        len: usize,
        chunk: &[GroupRows],
        fetched: &[Series],
        now: i64,
    ) -> Result<Vec<SeriesScores>, ModelError> {
        let (f, hd, batch) = (self.model.features(), self.model.hidden(), chunk.len());
        let (layers, width) = (self.model.layers(), self.model.outputs());
        let state_len = layers * hd;
        let slot = |layer: usize, b: usize| (layer * batch + b) * hd..(layer * batch + b + 1) * hd;
        let mut h = vec![0f32; layers * batch * hd];
        let mut c = vec![0f32; layers * batch * hd];
        let mut x = vec![0f32; len * batch * f];
        let mut carried: Vec<Vec<f32>> = Vec::with_capacity(batch);
        for (b, rows) in chunk.iter().enumerate() {
            let scalers: Vec<Option<Scaler>> = rows
                .members
                .iter()
                .map(|member| {
                    let (index, _) = member.as_ref()?;
                    self.series.get(&fetched[*index].labels).map(|s| s.scaler)
                })
                .collect();
            let known = self.groups.get(&rows.group);
            if let Some(g) = known {
                for layer in 0..layers {
                    let own = layer * hd..(layer + 1) * hd;
                    h[slot(layer, b)].copy_from_slice(&g.h[own.clone()]);
                    c[slot(layer, b)].copy_from_slice(&g.c[own]);
                }
            }
            let mut scaled = known.map_or_else(|| vec![0.0; width], |g| g.last_scaled.clone());
            for (t, &ts) in rows.timestamps.iter().enumerate() {
                for (column, (member, scaler)) in rows.members.iter().zip(&scalers).enumerate() {
                    if let (Some((_, steps)), Some(scaler)) = (member, scaler) {
                        if steps[t].raw.is_finite() {
                            scaled[column] = scaler.scale(steps[t].raw) as f32;
                        }
                    }
                }
                let row = (t * batch + b) * f..(t * batch + b + 1) * f;
                joint_input_row(&self.model.meta.features, ts, &scaled, &mut x[row]);
            }
            carried.push(scaled);
        }
        let out = self.model.run(&x, len, batch, &h, &c)?;
        // Nothing below can fail: the states change only once the run has succeeded.
        let mut results = Vec::new();
        for (b, (rows, last_scaled)) in chunk.iter().zip(carried).enumerate() {
            if !self.groups.contains_key(&rows.group) {
                let fresh = GroupState {
                    h: vec![0.0; state_len],
                    c: vec![0.0; state_len],
                    last_ts: i64::MIN,
                    last_scaled: Vec::new(),
                    last_seen: now,
                };
                self.groups.insert(rows.group.clone(), fresh);
            }
            let Some(group) = self.groups.get_mut(&rows.group) else {
                continue;
            };
            for layer in 0..layers {
                let own = layer * hd..(layer + 1) * hd;
                group.h[own.clone()].copy_from_slice(&out.h[slot(layer, b)]);
                group.c[own].copy_from_slice(&out.c[slot(layer, b)]);
            }
            group.last_ts = rows.timestamps.last().copied().unwrap_or(group.last_ts);
            group.last_scaled = last_scaled;
            group.last_seen = now;
            for (column, member) in rows.members.iter().enumerate() {
                let Some((index, steps)) = member else {
                    continue;
                };
                // Taken out of the map (key and all) while scored, so nothing is cloned.
                let Some((labels, mut state)) = self.series.remove_entry(&fetched[*index].labels)
                else {
                    continue;
                };
                let scores = self.score_steps(&mut state, steps, |t| {
                    out.yhat[(t * batch + b) * width + column]
                });
                self.series.insert(labels, state);
                results.push((*index, scores));
            }
        }
        Ok(results)
    }
}

/// An input's step at `ts` on its group's timeline: its own point (observed), else linear
/// between its neighbours across a short gap, else its last value carried (its first one,
/// before it has one); none of those is scored. `previous` is the input's last fed point
/// before this cycle; `points` (in time order) or `previous` has a value.
fn input_step(points: &[(i64, f64)], previous: Option<(i64, f64)>, ts: i64, step: i64) -> Step {
    let at = points.partition_point(|p| p.0 < ts);
    if let Some(&(_, raw)) = points.get(at).filter(|p| p.0 == ts) {
        return Step {
            ts,
            raw,
            observed: true,
        };
    }
    let before = at
        .checked_sub(1)
        .map(|i| points[i])
        .or(previous.filter(|(t, _)| *t < ts));
    let after = points.get(at).copied();
    let raw = match (before, after) {
        (Some((t0, v0)), Some((t1, v1))) if (t1 - t0) / step - 1 <= MAX_INTERPOLATED_GAP as i64 => {
            v0 + (v1 - v0) * (ts - t0) as f64 / (t1 - t0) as f64
        }
        (Some((_, v0)), _) => v0,
        (None, Some((_, v1))) => v1,
        (None, None) => f64::NAN,
    };
    Step {
        ts,
        raw,
        observed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEP: i64 = 60;

    fn points(pairs: &[(i64, f64)]) -> Vec<(i64, f64)> {
        pairs.to_vec()
    }

    #[test]
    fn an_input_between_its_points_is_interpolated_across_a_short_gap_only() {
        let near = points(&[(0, 10.0), (3 * STEP, 40.0)]);
        let filled = input_step(&near, None, STEP, STEP);
        assert_eq!((filled.raw, filled.observed), (20.0, false));
        let own = input_step(&near, None, 3 * STEP, STEP);
        assert_eq!((own.raw, own.observed), (40.0, true));
        // Too far apart to interpolate: the last value is carried.
        let far = points(&[(0, 10.0), (20 * STEP, 40.0)]);
        assert_eq!(input_step(&far, None, STEP, STEP).raw, 10.0);
    }

    #[test]
    fn an_input_carries_its_last_fed_value_or_waits_for_its_first() {
        let later = points(&[(5 * STEP, 7.0)]);
        // Its last fed point, from an earlier cycle, bridges a short gap.
        let bridged = input_step(&later, Some((2 * STEP, 1.0)), 3 * STEP, STEP);
        assert_eq!((bridged.raw, bridged.observed), (3.0, false));
        // Before it has ever had a point: its first one, unscored.
        let first = input_step(&later, None, 3 * STEP, STEP);
        assert_eq!((first.raw, first.observed), (7.0, false));
        let nothing = input_step(&[], None, 3 * STEP, STEP);
        assert!(nothing.raw.is_nan() && !nothing.observed);
    }
}
