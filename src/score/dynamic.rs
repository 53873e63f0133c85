//! Nonparametric dynamic threshold (Hundman et al., "Detecting Spacecraft Anomalies Using LSTMs
//! and Nonparametric Dynamic Thresholding", KDD 2018), streaming: a series' smoothed deviations
//! are judged against a threshold chosen from its own recent ones, without assuming how they
//! are distributed. The threshold is the `mean + z·sd` whose removal of everything above it
//! shrinks the mean and spread most, per point and per run it would flag: it sits where a few
//! outlying runs separate from the bulk.

use std::collections::VecDeque;

/// Smoothed deviations the threshold is chosen from (the paper's window of 30 batches of 70).
pub const WINDOW: usize = 2_100;
/// Points between two choices of the threshold (the paper's batch).
pub const RECHOOSE_EVERY: usize = 70;
/// Span of the exponential average that smooths deviations before they are judged: measured
/// on NAB among 1, 3, 6 and 30 (37.3, 42.9, 39.1, 23.0), SMD and ASD alike.
pub const SMOOTHING_SPAN: f64 = 3.0;
/// Candidate `z` values: from `Z_FROM` to below `Z_LIMIT` in steps of `Z_STEP`; `Z_LIMIT` is
/// the threshold when no candidate separates anything.
const Z_FROM: f64 = 2.5;
const Z_STEP: f64 = 0.5;
const Z_LIMIT: f64 = 12.0;
/// A threshold is only chosen if it flags at most this many runs and less than half the points.
const MAX_RUNS: usize = 5;

/// Below this many smoothed deviations the threshold abstains (scores 0).
pub const MIN_HISTORY: usize = super::likelihood::MIN_HISTORY;

/// The threshold chosen from a window: its mean and the threshold itself.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Threshold {
    mean: f64,
    epsilon: f64,
}

/// Streaming per-series state: the window of smoothed deviations and the current threshold.
#[derive(Debug, Clone, Default)]
pub struct DynamicThreshold {
    smoothed: f64,
    seen: usize,
    window: VecDeque<f32>,
    threshold: Option<Threshold>,
    since_chosen: usize,
}

impl DynamicThreshold {
    /// Takes the next raw score (`|y - yhat| / band`) and returns `(e − mean) / (ε − mean)`
    /// over the window before it: 1 at the threshold, 0 at or below the window's mean; 0 while
    /// fewer than [`MIN_HISTORY`] came before.
    pub fn update(&mut self, raw: f64) -> f64 {
        if !raw.is_finite() {
            return 0.0;
        }
        let weight = (2.0 / (SMOOTHING_SPAN + 1.0)).max(1.0 / (self.seen + 1) as f64);
        self.smoothed += weight * (raw - self.smoothed);
        self.seen += 1;
        if self.window.len() >= MIN_HISTORY
            && (self.threshold.is_none() || self.since_chosen >= RECHOOSE_EVERY)
        {
            self.threshold = choose(self.window.make_contiguous());
            self.since_chosen = 0;
        }
        let score = match self.threshold {
            Some(Threshold { mean, epsilon }) if epsilon > mean => {
                ((self.smoothed - mean) / (epsilon - mean)).max(0.0)
            }
            _ => 0.0,
        };
        self.since_chosen += 1;
        self.window.push_back(self.smoothed as f32);
        if self.window.len() > WINDOW {
            self.window.pop_front();
        }
        score
    }

    /// Whether enough deviations came before for a verdict.
    pub fn primed(&self) -> bool {
        self.window.len() >= MIN_HISTORY
    }
}

fn mean_sd(values: impl Iterator<Item = f64>) -> (f64, f64, usize) {
    let (mut n, mut sum, mut sum_sq) = (0usize, 0.0, 0.0);
    for v in values {
        n += 1;
        sum += v;
        sum_sq += v * v;
    }
    if n == 0 {
        return (0.0, 0.0, 0);
    }
    let mean = sum / n as f64;
    (mean, (sum_sq / n as f64 - mean * mean).max(0.0).sqrt(), n)
}

/// The paper's choice: among `mean + z·sd`, the one maximising
/// `(Δmean/mean + Δsd/sd) / (points above + runs above²)`, where Δ is what removing the points
/// at or above it takes off; `mean + Z_LIMIT·sd` when none qualifies.
fn choose(window: &[f32]) -> Option<Threshold> {
    let (mean, sd, n) = mean_sd(window.iter().map(|v| f64::from(*v)));
    if n == 0 {
        return None;
    }
    let mut best = (f64::NEG_INFINITY, mean + Z_LIMIT * sd);
    let mut z = Z_FROM;
    while z < Z_LIMIT && sd > 0.0 {
        let epsilon = mean + z * sd;
        let (below_mean, below_sd, below) = mean_sd(
            window
                .iter()
                .map(|v| f64::from(*v))
                .filter(|v| *v < epsilon),
        );
        let above = n - below;
        let runs = window
            .iter()
            .zip(std::iter::once(&f32::MIN).chain(window.iter()))
            .filter(|(v, before)| f64::from(**v) >= epsilon && f64::from(**before) < epsilon)
            .count();
        if above > 0 && runs <= MAX_RUNS && above * 2 < n && mean > 0.0 {
            let gain = (mean - below_mean) / mean + (sd - below_sd) / sd;
            let score = gain / (above + runs * runs) as f64;
            if score >= best.0 {
                best = (score, epsilon);
            }
        }
        z += Z_STEP;
    }
    Some(Threshold {
        mean,
        epsilon: best.1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(bits: &mut u32) -> f64 {
        *bits ^= *bits << 13;
        *bits ^= *bits >> 17;
        *bits ^= *bits << 5;
        f64::from(*bits % 1000) / 1000.0
    }

    #[test]
    fn the_threshold_sits_between_the_bulk_and_a_few_outlying_runs() {
        // Deviations between 0.4 and 0.6 with two short runs at 5: the threshold separates them.
        let mut window: Vec<f32> = (0..1000)
            .map(|i| 0.4 + 0.2 * ((i * 7 % 11) as f32 / 11.0))
            .collect();
        window[300..305].fill(5.0);
        window[700..703].fill(5.0);
        let t = choose(&window).expect("a threshold");
        assert!(t.epsilon > 0.6 && t.epsilon < 5.0, "{t:?}");
        // Of two runs at different heights, flagging only the higher one is the better split
        // (fewer points and runs flagged for nearly the same shrinkage).
        window[700..703].fill(4.0);
        let t = choose(&window).expect("a threshold");
        assert!(t.epsilon > 4.0 && t.epsilon < 5.0, "{t:?}");
    }

    #[test]
    fn quiet_noise_stays_below_one_and_a_burst_rises_above() {
        let mut d = DynamicThreshold::default();
        let mut bits: u32 = 0x1234_5678;
        let mut quiet_max: f64 = 0.0;
        for _ in 0..3 * WINDOW {
            quiet_max = quiet_max.max(d.update(0.3 + 0.2 * noise(&mut bits)));
        }
        assert!(quiet_max < 1.0, "noise alone: {quiet_max}");
        let burst: Vec<f64> = (0..6).map(|_| d.update(3.0)).collect();
        assert!(burst[burst.len() - 1] > 1.0, "{burst:?}");
    }

    #[test]
    fn no_history_no_verdict_and_nan_is_ignored() {
        let mut d = DynamicThreshold::default();
        assert_eq!(d.update(50.0), 0.0);
        assert_eq!(d.update(f64::NAN), 0.0);
        assert!(!d.primed());
    }
}
