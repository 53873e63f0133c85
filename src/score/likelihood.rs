//! Anomaly likelihood: how unusual a series' recent forecast errors are against its own error
//! history (the idea behind the strongest NAB entries). A forecaster's raw error means different
//! things on different series; a tail probability means the same everywhere, so one threshold
//! fits all of them.

use super::detection::Scoring;
use super::dynamic::DynamicThreshold;

/// Points averaged into the short-term error: a lone wobble is not an anomaly, a run is.
pub const SHORT_WINDOW: usize = 6;
/// Span (in points) of the slow scale's exponential average of errors: a run of moderate
/// errors that no six points show (a drift, a level that stays off) still adds up. Measured on
/// NAB, SMD and ASD alike (docs/quality.md). The slow scale is judged on the lower of its
/// average and the short one: a run counts while it lasts, and one burst of large errors, which
/// holds the average up for dozens of points after it, stops counting six points after the
/// errors do (SMD's and ASD's false alarms trailed their incidents by up to two hours).
pub const SLOW_SPAN: f64 = 60.0;
/// Span of a third, drift scale: a day of one-minute points. SMD's and ASD's incidents include
/// stretches of hours where a metric misbehaves now and then, each miss too small for the hour
/// scale (spans of 360, 720, 1,440 and 2,880 measured: SMD best F1 0.377, 0.382, 0.385, 0.379
/// against 0.356 without; ASD 0.483, 0.463, 0.455, 0.456 against 0.458; NAB unchanged; the KPI
/// file `cpu4` loses 0.075 and 0.028 at 360 and 720, nothing from 1,440; docs/quality.md). It
/// joins the score once it has a history of its own: a day and [`MIN_HISTORY`] points after
/// the start.
pub const DRIFT_SPAN: f64 = 1_440.0;
/// Points of error history the distribution is estimated from: a running mean and variance
/// up to this many points, exponentially weighted with this memory after (a few numbers per
/// series instead of a window of them: 100,000 series must fit). A week of one-minute points:
/// a shorter memory lets a long anomaly or a bad week pass for normal (2,016: NAB 56.8, SMD
/// best F1 0.282; 10,080: 58.8 and 0.333; docs/quality.md).
pub const LONG_WINDOW: usize = 10_080;
/// Below this much history the likelihood abstains (scores 0); the exporter primes a new
/// series with this many past points before its first score.
pub const MIN_HISTORY: usize = 100;
/// Tail probability at which the likelihood score reaches 1. The normal tail is far too
/// optimistic for real error distributions: at 1e-4 the best thresholds measured on NAB, SMD,
/// ASD and the KPIs lay around 2.2 (a median over 12 series sets, 0.07 to 6.8), i.e. ~1e-9, so
/// that is where 1 is.
pub const EDGE_TAIL: f64 = 1e-9;
/// The spread assumed at least, so that a perfectly predictable series does not turn its first
/// tiny error into certainty (in units of the raw score, where 1 is the calibrated band).
const MIN_SPREAD: f64 = 0.02;

/// Running mean and variance of one scale's averaged errors over the series' history.
#[derive(Debug, Clone, Copy, Default)]
struct Moments {
    mean: f64,
    variance: f64,
}

impl Moments {
    /// The likelihood score of `recent` against the history so far: 1 at a tail probability
    /// of [`EDGE_TAIL`], 2 at its square.
    fn score(&self, recent: f64) -> f64 {
        let spread = self.variance.sqrt().max(MIN_SPREAD);
        let z = (recent - self.mean) / spread;
        let tail = 0.5 * libm::erfc(z / std::f64::consts::SQRT_2);
        (tail.max(f64::MIN_POSITIVE).log10() / EDGE_TAIL.log10()).max(0.0)
    }

    fn add(&mut self, recent: f64, weight: f64) {
        let delta = recent - self.mean;
        self.mean += weight * delta;
        self.variance = (1.0 - weight) * (self.variance + weight * delta * delta);
    }
}

/// An exponential average of errors and the history of its values.
#[derive(Debug, Clone, Copy, Default)]
struct Smoothed {
    average: f64,
    history: Moments,
}

impl Smoothed {
    /// Takes the `seen`-th error (from 0) into an average spanning `span` points: a plain mean
    /// until the span is reached, so the start does not hang on one point.
    fn push(&mut self, raw: f64, span: f64, seen: usize) {
        let weight = (2.0 / (span + 1.0)).max(1.0 / (seen + 1) as f64);
        self.average += weight * (raw - self.average);
    }

    /// Adds the average to its history once it spans its points (`seen` counted after the
    /// point); before, it mostly shows how few it had.
    fn remember(&mut self, span: f64, seen: usize) {
        if seen > span as usize {
            let spanned = seen - span as usize;
            self.history
                .add(self.average, 1.0 / spanned.min(LONG_WINDOW) as f64);
        }
    }

    fn score(&self) -> f64 {
        self.history.score(self.average)
    }

    /// The score of the average while `recent` errors (a faster average) are as high: what the
    /// average still holds of errors that have stopped does not count.
    fn score_while(&self, recent: f64) -> f64 {
        self.history.score(self.average.min(recent))
    }
}

/// Streaming per-series state: errors averaged at three scales (the last [`SHORT_WINDOW`]
/// points, and exponential averages spanning [`SLOW_SPAN`] and [`DRIFT_SPAN`]), each judged
/// against its own history; the most surprising one is the score.
#[derive(Debug, Clone, Default)]
pub struct Likelihood {
    short: [f64; SHORT_WINDOW],
    short_len: usize,
    short_next: usize,
    seen: usize,
    fast: Moments,
    slow: Smoothed,
    drift: Smoothed,
}

impl Likelihood {
    /// Takes the next raw score (`|y - yhat| / band`) and returns the likelihood score: 1 at a
    /// tail probability of [`EDGE_TAIL`], 2 at its square, 0 while history is short.
    pub fn update(&mut self, raw: f64) -> f64 {
        self.update_scales(raw, true)
    }

    /// The same, judging only the hour and day scales: for deviations that matter when they
    /// last ([`super::season`]).
    pub fn update_sustained(&mut self, raw: f64) -> f64 {
        self.update_scales(raw, false)
    }

    fn update_scales(&mut self, raw: f64, with_short: bool) -> f64 {
        if !raw.is_finite() {
            return 0.0;
        }
        self.short[self.short_next] = raw;
        self.short_next = (self.short_next + 1) % SHORT_WINDOW;
        self.short_len = (self.short_len + 1).min(SHORT_WINDOW);
        let recent = self.short[..self.short_len].iter().sum::<f64>() / self.short_len as f64;
        self.slow.push(raw, SLOW_SPAN, self.seen);
        self.drift.push(raw, DRIFT_SPAN, self.seen);
        let score = if self.seen >= MIN_HISTORY {
            let short = if with_short {
                self.fast.score(recent)
            } else {
                0.0
            };
            let score = short.max(self.slow.score_while(recent));
            if self.seen >= DRIFT_SPAN as usize + MIN_HISTORY {
                score.max(self.drift.score())
            } else {
                score
            }
        } else {
            0.0
        };
        self.seen += 1;
        let weight = 1.0 / self.seen.min(LONG_WINDOW) as f64;
        self.fast.add(recent, weight);
        self.slow.remember(SLOW_SPAN, self.seen);
        self.drift.remember(DRIFT_SPAN, self.seen);
        score
    }
}

/// A series' scoring state as its detector's [`Scoring`] asks.
#[derive(Debug, Clone)]
pub enum Normalizer {
    Band,
    Likelihood(Likelihood),
    Standardized(Standardized),
    Dynamic(Box<DynamicThreshold>),
}

impl Normalizer {
    pub fn new(scoring: Scoring) -> Normalizer {
        match scoring {
            Scoring::Band => Normalizer::Band,
            Scoring::Likelihood => Normalizer::Likelihood(Likelihood::default()),
            Scoring::Standardized => Normalizer::Standardized(Standardized::default()),
            Scoring::Dynamic => Normalizer::Dynamic(Box::default()),
        }
    }

    /// The scoring of a series' naive-forecast deviations next to the model's: a likelihood of
    /// its own. Not under band scoring (a score there is the model's calibrated band, and the
    /// naive forecast has none), nor standardized (point by point, the naive deviations are
    /// mostly noise: NAB 51.3 → 42.5 with them).
    pub fn for_persistence(scoring: Scoring) -> Option<Normalizer> {
        (scoring == Scoring::Likelihood).then(|| Normalizer::new(scoring))
    }

    /// Deviations a series' scoring needs to have seen before its scores mean anything.
    pub fn history_needed(scoring: Scoring) -> usize {
        match scoring {
            Scoring::Band => 0,
            Scoring::Likelihood | Scoring::Standardized | Scoring::Dynamic => MIN_HISTORY,
        }
    }

    /// The `anomaly_score` of the next deviation (in band half-widths); `None` while the
    /// history is too short for a verdict.
    pub fn update(&mut self, raw: f64) -> Option<f64> {
        match self {
            Normalizer::Band => Some(raw),
            Normalizer::Likelihood(l) => {
                let primed = l.seen >= MIN_HISTORY;
                let score = l.update(raw);
                primed.then_some(score)
            }
            Normalizer::Standardized(s) => {
                let primed = s.count >= MIN_HISTORY as f64;
                let score = s.update(raw);
                primed.then_some(score)
            }
            Normalizer::Dynamic(d) => {
                let primed = d.primed();
                let score = d.update(raw);
                primed.then_some(score)
            }
        }
    }
}

/// How many standard deviations above its own mean error a series must be to score 1.
pub const STANDARD_EDGE: f64 = 3.0;

/// The simpler sibling of [`Likelihood`]: each raw score standardised against every earlier raw
/// score of the series (running mean and variance, Welford), counting only errors above the
/// mean. Measured on NAB it separates better than the windowed likelihood (docs/quality.md).
#[derive(Debug, Clone, Default)]
pub struct Standardized {
    count: f64,
    mean: f64,
    m2: f64,
}

impl Standardized {
    /// Takes the next raw score and returns `max(raw − mean, 0) / (STANDARD_EDGE · σ)` over the
    /// scores before it; 0 while fewer than [`MIN_HISTORY`] came before.
    pub fn update(&mut self, raw: f64) -> f64 {
        if !raw.is_finite() {
            return 0.0;
        }
        let score = if self.count >= MIN_HISTORY as f64 {
            let sigma = (self.m2 / self.count).sqrt();
            if sigma > 0.0 {
                (raw - self.mean).max(0.0) / (STANDARD_EDGE * sigma)
            } else {
                0.0
            }
        } else {
            0.0
        };
        self.count += 1.0;
        let delta = raw - self.mean;
        self.mean += delta / self.count;
        self.m2 += delta * (raw - self.mean);
        score
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standardized_scores_count_standard_deviations_above_the_mean() {
        let mut s = Standardized::default();
        for i in 0..1_000 {
            // Mean 1, standard deviation 1.
            let quiet = s.update(if i % 2 == 0 { 0.0 } else { 2.0 });
            // One standard deviation above the mean: a third of the way to anomalous.
            assert!(quiet < 0.34, "{quiet}");
        }
        let jump = s.update(1.0 + 4.0 * STANDARD_EDGE);
        assert!((jump - 4.0).abs() < 0.05, "{jump}");
        assert_eq!(s.update(-5.0), 0.0, "below the mean is not anomalous");
        assert_eq!(
            Standardized::default().update(9.0),
            0.0,
            "no history, no verdict"
        );
    }

    #[test]
    fn quiet_history_then_a_run_of_errors_scores_above_one() {
        let mut l = Likelihood::default();
        let mut quiet_max: f64 = 0.0;
        for i in 0..500 {
            let raw = 0.2 + 0.1 * ((i * 37 % 11) as f64 / 11.0);
            quiet_max = quiet_max.max(l.update(raw));
        }
        assert!(quiet_max < 1.0, "{quiet_max}");
        let burst: Vec<f64> = (0..5).map(|_| l.update(3.0)).collect();
        assert!(burst[burst.len() - 1] > 1.0, "{burst:?}");
    }

    #[test]
    fn a_lasting_shift_keeps_raising_the_score_after_the_short_window_is_full() {
        let mut l = Likelihood::default();
        // Errors of 0 or 1 at random: six points' mean wanders a lot, sixty points' hardly.
        let mut bits: u32 = 0x9e37_79b9;
        let mut quiet_max: f64 = 0.0;
        for _ in 0..LONG_WINDOW {
            bits ^= bits << 13;
            bits ^= bits >> 17;
            bits ^= bits << 5;
            quiet_max = quiet_max.max(l.update(f64::from(bits & 1)));
        }
        assert!(quiet_max < 1.0, "noise alone: {quiet_max}");
        // Then every error is 1: never more than the noise's six-point highs. Six points in,
        // the short mean has seen all it will; the slow average goes on rising, and so does
        // the score.
        let run: Vec<f64> = (0..3 * SLOW_SPAN as usize).map(|_| l.update(1.0)).collect();
        let (peak_at, peak) = run
            .iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or_default();
        let short_full = run[SHORT_WINDOW - 1];
        assert!(
            peak_at >= 2 * SHORT_WINDOW && peak > 1.4 * short_full,
            "peak {peak} at {peak_at}, {short_full} when the short window filled: {run:?}"
        );
    }

    #[test]
    fn a_burst_stops_counting_once_the_errors_do_but_a_run_counts_while_it_lasts() {
        // Less history than the day scale waits for: the hour scale's verdict alone.
        let quiet = |l: &mut Likelihood| {
            (0..DRIFT_SPAN as usize)
                .map(|i| l.update(0.2 + 0.1 * ((i * 37 % 11) as f64 / 11.0)))
                .fold(0.0, f64::max)
        };
        let mut l = Likelihood::default();
        let quiet_max = quiet(&mut l);
        assert!(quiet_max < 1.0, "{quiet_max}");
        for _ in 0..SHORT_WINDOW {
            l.update(20.0);
        }
        assert!(
            l.slow.score() > 1.0,
            "the slow average holds the burst: {}",
            l.slow.score()
        );
        let after: Vec<f64> = (0..SLOW_SPAN as usize).map(|_| l.update(0.25)).collect();
        assert!(
            after[SHORT_WINDOW..].iter().all(|s| *s < 1.0),
            "quiet again once the burst left the short window: {after:?}"
        );
        // Errors of twice the usual for an hour: the gate does not cut a run that goes on; at
        // its end the hour scale still counts it, and higher than the six-point scale does.
        let mut l = Likelihood::default();
        quiet(&mut l);
        let run: Vec<f64> = (0..SLOW_SPAN as usize)
            .map(|i| l.update(0.5 + 0.1 * ((i * 37 % 11) as f64 / 11.0)))
            .collect();
        let last = run[run.len() - 1];
        assert!(
            last > 1.0 && l.slow.score_while(0.55) > l.fast.score(0.55),
            "{run:?}"
        );
    }

    #[test]
    fn errors_a_little_more_often_for_hours_surprise_the_drift_scale_most() {
        let mut l = Likelihood::default();
        let mut bits: u32 = 0x2545_f491;
        let mut next = || {
            bits ^= bits << 13;
            bits ^= bits >> 17;
            bits ^= bits << 5;
            bits & 7
        };
        // Errors of 1 half the time, then six times in eight for a day.
        let quiet_max = (0..LONG_WINDOW)
            .map(|_| l.update(f64::from(next() < 4)))
            .fold(0.0, f64::max);
        let run: Vec<f64> = (0..DRIFT_SPAN as usize)
            .map(|_| l.update(f64::from(next() < 6)))
            .collect();
        // A day in, the hour scale has long taken the new rate for a wobble; the day scale,
        // whose history never moved this far, is the more surprised, and the score shows it.
        let (drift, slow) = (l.drift.score(), l.slow.score());
        assert!(
            drift > 1.5 * slow && drift > quiet_max,
            "day scale {drift}, hour scale {slow}, noise alone up to {quiet_max}"
        );
        assert!(run[run.len() - 1] >= drift, "{run:?}");
    }

    #[test]
    fn no_history_no_verdict_and_nan_is_ignored() {
        let mut l = Likelihood::default();
        assert_eq!(l.update(50.0), 0.0);
        assert_eq!(l.update(f64::NAN), 0.0);
    }

    #[test]
    fn the_history_is_a_running_mean_then_exponentially_weighted() {
        let mut l = Likelihood::default();
        for i in 0..LONG_WINDOW {
            l.update(if i % 2 == 0 { 1.0 } else { 3.0 });
        }
        // Short averages of 6 alternating points: mean 2, small spread.
        assert!((l.fast.mean - 2.0).abs() < 0.01, "{}", l.fast.mean);
        assert!(
            (l.slow.history.mean - 2.0).abs() < 0.05,
            "{}",
            l.slow.history.mean
        );
        for _ in 0..10 * LONG_WINDOW {
            l.update(5.0);
        }
        assert!(
            (l.fast.mean - 5.0).abs() < 0.01,
            "old history fades: {}",
            l.fast.mean
        );
        assert!(
            (l.slow.history.mean - 5.0).abs() < 0.01,
            "old history fades: {}",
            l.slow.history.mean
        );
        assert_eq!(std::mem::size_of::<Likelihood>(), 8 * (SHORT_WINDOW + 11));
    }
}
