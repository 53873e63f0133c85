//! The weekly profile: what a series usually does at this hour of the week. A one-step forecast
//! follows whatever the last points did, so a holiday Thursday shaped like a Sunday surprises it
//! only where one point differs from the next; compared with the same hour of earlier weeks,
//! the whole day stands out (NAB's `nyc_taxi` holidays; README).
//!
//! An hour counts as unusual only when it is unlike both its hour of the week and the same
//! hour yesterday: after a lasting change of level, yesterday already looks like today, so a
//! series that doubled its traffic for good is news for a day, not for weeks. And the profile
//! is listened to only on series it describes, where it explains at least half the variance
//! ([`MIN_STRENGTH`]): on a series without a weekly rhythm, "unlike this hour last week" says
//! nothing the forecast does not.

use super::detection::Scoring;
use super::likelihood::{Likelihood, MIN_HISTORY};

/// The profile's period.
pub const WEEK_SECS: i64 = 7 * 86_400;
/// Its resolution: an hour, so a week is 168 numbers per series whatever the step.
pub const BUCKET_SECS: i64 = 3_600;
const HOURS_PER_WEEK: usize = (WEEK_SECS / BUCKET_SECS) as usize;
const HOURS_PER_DAY: usize = 24;
/// Weeks an hour's average spans: one odd week does not become the norm, a trend is followed.
pub const MEMORY_WEEKS: f64 = 3.0;
/// Share of the series' variance the profile must explain to be listened to (the seasonal
/// strength of STL decompositions: 1 − var(residual) / var(series)). NAB scored 73.2 at every
/// floor from 0.3 to 0.7; without one, SMD's F1 at the default threshold fell 0.312 → 0.284, its
/// aseasonal metrics' week-to-week differences counted as news (README).
pub const MIN_STRENGTH: f64 = 0.5;
/// Points of residual history the strength is judged on, in running averages (the
/// likelihood's long memory, a week of one-minute points).
const STRENGTH_MEMORY: f64 = 10_080.0;

/// Hourly averages of one series' values: per hour of the week over [`MEMORY_WEEKS`], and per
/// hour of the day over the last day.
#[derive(Debug, Clone)]
pub struct WeeklyProfile {
    week: [f32; HOURS_PER_WEEK],
    week_points: [u16; HOURS_PER_WEEK],
    day: [f32; HOURS_PER_DAY],
    day_points: [u16; HOURS_PER_DAY],
    /// Points of the series per hour: an hour's average is ready once it has seen these many.
    points_per_hour: u16,
    /// How well the week's profile has matched the points since it was first ready: their
    /// count, the running mean square of their residuals and the series' own mean and
    /// variance over them.
    compared: f64,
    residual_square: f64,
    level: f64,
    variance: f64,
}

impl WeeklyProfile {
    pub fn new(step_secs: i64) -> WeeklyProfile {
        let points_per_hour = (BUCKET_SECS / step_secs.max(1)).clamp(1, i64::from(u16::MAX));
        WeeklyProfile {
            week: [0.0; HOURS_PER_WEEK],
            week_points: [0; HOURS_PER_WEEK],
            day: [0.0; HOURS_PER_DAY],
            day_points: [0; HOURS_PER_DAY],
            points_per_hour: points_per_hour as u16,
            compared: 0.0,
            residual_square: 0.0,
            level: 0.0,
            variance: 0.0,
        }
    }

    fn hour_of_week(ts: i64) -> usize {
        (ts.rem_euclid(WEEK_SECS) / BUCKET_SECS) as usize
    }

    /// The average of `ts`'s hour of the week, once that hour has been seen for a whole hour.
    pub fn this_hour_of_week(&self, ts: i64) -> Option<f64> {
        let hour = Self::hour_of_week(ts);
        (self.week_points[hour] >= self.points_per_hour).then(|| f64::from(self.week[hour]))
    }

    /// The average of `ts`'s hour of the day, mostly yesterday's, once seen for a whole hour.
    pub fn this_hour_yesterday(&self, ts: i64) -> Option<f64> {
        let hour = Self::hour_of_week(ts) % HOURS_PER_DAY;
        (self.day_points[hour] >= self.points_per_hour).then(|| f64::from(self.day[hour]))
    }

    /// Whether the week's profile explains at least [`MIN_STRENGTH`] of the series' variance,
    /// judged on at least [`MIN_HISTORY`] points.
    pub fn describes_series(&self) -> bool {
        self.compared >= MIN_HISTORY as f64
            && self.variance > 0.0
            && 1.0 - self.residual_square / self.variance >= MIN_STRENGTH
    }

    /// Takes in a value of the series (non-finite ones are ignored).
    pub fn learn(&mut self, ts: i64, value: f64) {
        if !value.is_finite() {
            return;
        }
        if let Some(expected) = self.this_hour_of_week(ts) {
            self.compared += 1.0;
            let weight = 1.0 / self.compared.min(STRENGTH_MEMORY);
            self.residual_square += weight * ((value - expected).powi(2) - self.residual_square);
            let delta = value - self.level;
            self.level += weight * delta;
            self.variance = (1.0 - weight) * (self.variance + weight * delta * delta);
        }
        let per_hour = f64::from(self.points_per_hour);
        let hour = Self::hour_of_week(ts);
        average_in(
            &mut self.week[hour],
            &mut self.week_points[hour],
            value,
            MEMORY_WEEKS * per_hour,
        );
        let hour = hour % HOURS_PER_DAY;
        average_in(
            &mut self.day[hour],
            &mut self.day_points[hour],
            value,
            per_hour,
        );
    }
}

/// Moves an hour's average towards `value`: a plain mean of its first points, then an
/// exponential one spanning `span` points.
fn average_in(average: &mut f32, points: &mut u16, value: f64, span: f64) {
    let weight = (1.0 / (f64::from(*points) + 1.0)).max(1.0 / span);
    let old = f64::from(*average);
    *average = (old + weight * (value - old)) as f32;
    *points = points.saturating_add(1);
}

/// A series' weekly profile and the likelihood of its deviations from it.
#[derive(Debug, Clone)]
pub struct Season {
    profile: WeeklyProfile,
    likelihood: Likelihood,
}

impl Season {
    /// Whether series scored this way keep a season: under the likelihood, like the naive
    /// forecast's deviations (a score of another scoring is not a tail probability that the
    /// seasonal one could be the maximum of).
    pub fn applies(scoring: Scoring) -> bool {
        scoring == Scoring::Likelihood
    }

    pub fn new(step_secs: i64) -> Season {
        Season {
            profile: WeeklyProfile::new(step_secs),
            likelihood: Likelihood::default(),
        }
    }

    /// The seasonal score of the value at `ts`, before it is learnt: its deviation (`deviation`
    /// from an expected value, in band half-widths) from the nearer of this hour of the week
    /// and this hour yesterday, through a likelihood of its own on the hour and day scales
    /// only (a few odd points are the forecast's business; a day unlike its weekday shows
    /// over hours). `None` until the hour of the week has been seen; 0 while the profile does
    /// not describe the series.
    pub fn score(&mut self, ts: i64, deviation: impl Fn(f64) -> f64) -> Option<f64> {
        let week = deviation(self.profile.this_hour_of_week(ts)?);
        let nearest = self
            .profile
            .this_hour_yesterday(ts)
            .map_or(week, |yesterday| week.min(deviation(yesterday)));
        let score = self.likelihood.update_sustained(nearest);
        Some(if self.profile.describes_series() {
            score
        } else {
            0.0
        })
    }

    pub fn learn(&mut self, ts: i64, value: f64) {
        self.profile.learn(ts, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEP: i64 = 600;
    const DAY: i64 = 86_400;

    /// A weekday shape: busy from 8 to 20, quiet at night; weekends half as busy.
    fn traffic(ts: i64) -> f64 {
        let hour = ts.rem_euclid(DAY) / 3_600;
        let weekend = matches!(ts.rem_euclid(WEEK_SECS) / DAY, 2 | 3);
        let busy = if (8..20).contains(&hour) { 100.0 } else { 20.0 };
        let wobble = ((ts / STEP) % 7) as f64;
        if weekend {
            busy / 2.0 + wobble
        } else {
            busy + wobble
        }
    }

    /// Feeds `days` of `value` from `start`, scoring each point as the exporter does (the
    /// deviation in units of 10); returns the scores.
    fn run(
        season: &mut Season,
        start: i64,
        days: i64,
        mut value: impl FnMut(i64) -> f64,
    ) -> Vec<f64> {
        let mut scores = Vec::new();
        for ts in (start..start + days * DAY).step_by(STEP as usize) {
            let y = value(ts);
            if let Some(score) = season.score(ts, |expected| (y - expected).abs() / 10.0) {
                scores.push(score);
            }
            season.learn(ts, y);
        }
        scores
    }

    #[test]
    fn a_weekday_shaped_like_a_weekend_day_stands_out() {
        let mut season = Season::new(STEP);
        let usual = run(&mut season, 0, 21, traffic);
        assert!(season.profile.describes_series());
        let quiet = usual[usual.len() - 7 * 144..]
            .iter()
            .copied()
            .fold(0.0, f64::max);
        assert!(quiet < 1.0, "ordinary weeks: {quiet}");
        // Day 21 is a weekday (the epoch's Thursday, like day 0) that looks like a weekend day.
        let holiday = run(&mut season, 21 * DAY, 1, |ts| traffic(ts + 2 * DAY));
        let peak = holiday.iter().copied().fold(0.0, f64::max);
        assert!(peak > 1.0, "holiday peak {peak}");
    }

    #[test]
    fn a_lasting_change_of_level_is_news_for_a_day_not_for_weeks() {
        let mut season = Season::new(STEP);
        run(&mut season, 0, 21, traffic);
        let doubled = |ts| 2.0 * traffic(ts);
        let first_day = run(&mut season, 21 * DAY, 1, doubled);
        let later = run(&mut season, 22 * DAY, 6, doubled);
        assert!(first_day.iter().any(|s| *s > 1.0), "{first_day:?}");
        // From the second day on, yesterday looked the same.
        let after = later[later.len() - 4 * 144..]
            .iter()
            .copied()
            .fold(0.0, f64::max);
        assert!(after < 1.0, "days later: {after}");
    }

    #[test]
    fn a_series_without_a_weekly_rhythm_gets_no_seasonal_score() {
        let mut season = Season::new(STEP);
        let mut bits: u32 = 0x1234_5678;
        let scores = run(&mut season, 0, 28, |_| {
            bits = bits.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            f64::from(bits >> 24)
        });
        assert!(!season.profile.describes_series());
        assert!(scores.iter().all(|s| *s == 0.0));
    }

    #[test]
    fn nothing_before_the_hour_has_been_seen_a_week_earlier() {
        let mut season = Season::new(STEP);
        let first_week = run(&mut season, 0, 7, traffic);
        assert!(first_week.is_empty(), "{} scores", first_week.len());
        assert!(season.score(7 * DAY, |_| 0.0).is_some());
    }
}
