//! Deviations from the weekly profile ([`mad_training::weekly`]): what a series usually does at
//! this hour of the week. A one-step forecast follows whatever the last points did, so a
//! holiday Thursday shaped like a Sunday surprises it only where one point differs from the
//! next; compared with the same hour of earlier weeks, the whole day stands out (NAB's
//! `nyc_taxi` holidays; docs/quality.md).
//!
//! An hour counts as unusual only when it is unlike both its hour of the week and the same
//! hour yesterday: after a lasting change of level, yesterday already looks like today, so a
//! series that doubled its traffic for good is news for a day, not for weeks.

use mad_training::weekly::{WeeklyProfile, WeeklySeed};

use super::detection::Scoring;
use super::likelihood::Likelihood;

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

    /// A season starting from the profile the model learnt over the series' training history
    /// (`seed`, where it has a usable one), else from nothing: a new series' profile scores a
    /// week after it is first seen.
    pub fn new(step_secs: i64, seed: Option<&WeeklySeed>) -> Season {
        Season {
            profile: seed
                .and_then(|seed| WeeklyProfile::from_seed(step_secs, seed))
                .unwrap_or_else(|| WeeklyProfile::new(step_secs)),
            likelihood: Likelihood::default(),
        }
    }

    /// The seasonal score of the value at `ts`, before it is learnt: its deviation (`deviation`
    /// from an expected value, in band half-widths) from the nearer of this hour of the week
    /// and this hour yesterday, through a likelihood of its own on the hour and day scales
    /// only (a few odd points are the forecast's business; a day unlike its weekday shows
    /// over hours). `None` for a point the profile holds already (a seeded profile's training
    /// history) and until the hour of the week has been seen; 0 while the profile does not
    /// describe the series.
    pub fn score(&mut self, ts: i64, deviation: impl Fn(f64) -> f64) -> Option<f64> {
        if self.profile.has_learnt(ts) {
            return None;
        }
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
    use mad_training::weekly::WEEK_SECS;

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
        let mut season = Season::new(STEP, None);
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
        let mut season = Season::new(STEP, None);
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
        let mut season = Season::new(STEP, None);
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
        let mut season = Season::new(STEP, None);
        let first_week = run(&mut season, 0, 7, traffic);
        assert!(first_week.is_empty(), "{} scores", first_week.len());
        assert!(season.score(7 * DAY, |_| 0.0).is_some());
    }

    #[test]
    fn a_season_seeded_by_training_needs_no_week_of_its_own() {
        let mut trained = WeeklyProfile::new(STEP);
        for ts in (0..19 * DAY).step_by(STEP as usize) {
            trained.learn(ts, traffic(ts));
        }
        let seed = trained.seed().expect("the profile describes the series");
        // The exporter restarts on day 19: two ordinary days prime the likelihood.
        let mut season = Season::new(STEP, Some(&seed));
        assert_eq!(
            season.score(19 * DAY - STEP, |_| 9.0),
            None,
            "a point the profile learnt is no surprise to it"
        );
        run(&mut season, 19 * DAY, 2, traffic);
        let holiday = run(&mut season, 21 * DAY, 1, |ts| traffic(ts + 2 * DAY));
        let peak = holiday.iter().copied().fold(0.0, f64::max);
        assert!(peak > 1.0, "holiday peak {peak}");
        let mut unseeded = Season::new(STEP, None);
        run(&mut unseeded, 19 * DAY, 2, traffic);
        let holiday = run(&mut unseeded, 21 * DAY, 1, |ts| traffic(ts + 2 * DAY));
        assert!(holiday.is_empty(), "two days in, nothing to compare with");
    }
}
