//! The weekly profile: what a series usually does at this hour of the week, and did at this
//! hour yesterday. The exporter scores deviations from it (`mad::score::season`); the trainer
//! learns it over the training history and ships it with the model ([`WeeklySeed`]), so a
//! series scores against it from the exporter's first cycle rather than a week after every
//! restart.
//!
//! The profile is listened to only on series it describes, where it explains at least half
//! the variance ([`MIN_STRENGTH`]): on a series without a weekly rhythm, "unlike this hour last
//! week" says nothing the forecast does not.

use serde::{Deserialize, Serialize};

/// The profile's period.
pub const WEEK_SECS: i64 = 7 * 86_400;
/// Its resolution: an hour, so a week is 168 numbers per series whatever the step.
pub const HOUR_SECS: i64 = 3_600;
pub const HOURS_PER_WEEK: usize = (WEEK_SECS / HOUR_SECS) as usize;
pub const HOURS_PER_DAY: usize = 24;
/// Weeks an hour's average spans: one odd week does not become the norm, a trend is followed.
pub const MEMORY_WEEKS: f64 = 3.0;
/// Share of the series' variance the profile must explain to be listened to (the seasonal
/// strength of STL decompositions: 1 − var(residual) / var(series)). NAB scored 73.2 at every
/// floor from 0.3 to 0.7; without one, SMD's F1 at the default threshold fell 0.312 → 0.284, its
/// aseasonal metrics' week-to-week differences counted as news (docs/quality.md).
pub const MIN_STRENGTH: f64 = 0.5;
/// Points compared with the profile before its strength is trusted.
pub const MIN_COMPARED: f64 = 100.0;
/// Points of residual history the strength is judged on, in running averages (a week of
/// one-minute points, as the likelihood's memory).
const STRENGTH_MEMORY: f64 = 10_080.0;

/// The hour of the week of Unix time `ts` (0 = Thursday 00:00 UTC, the epoch's weekday).
pub fn hour_of_week(ts: i64) -> usize {
    (ts.rem_euclid(WEEK_SECS) / HOUR_SECS) as usize
}

/// Hourly averages of one series' values: per hour of the week over [`MEMORY_WEEKS`], and per
/// hour of the day over the last day; and how well the week's averages have matched.
#[derive(Debug, Clone, PartialEq)]
pub struct WeeklyProfile {
    week: [f32; HOURS_PER_WEEK],
    week_points: [u16; HOURS_PER_WEEK],
    day: [f32; HOURS_PER_DAY],
    day_points: [u16; HOURS_PER_DAY],
    /// Points of the series per hour: an hour's average is ready once it has seen these many.
    points_per_hour: u16,
    strength: Strength,
    /// Points up to this time are in the averages already (a seeded profile's history).
    learnt_until: i64,
}

/// Running figures of how well the week's averages predict the series: points compared, the
/// mean square of their residuals, and the series' own mean and variance over them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Strength {
    pub compared: f64,
    pub residual_square: f64,
    pub level: f64,
    pub variance: f64,
}

/// A profile as the model carries it: its hourly averages and how many points each has
/// taken in, the strength figures, and the last point learnt (Unix seconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeeklySeed {
    pub week: Vec<f32>,
    pub week_points: Vec<u16>,
    pub day: Vec<f32>,
    pub day_points: Vec<u16>,
    pub strength: Strength,
    pub learnt_until: i64,
}

impl WeeklySeed {
    /// Whether a profile can be restored from it: every hour there, every number finite. The
    /// error says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let s = self.strength;
        let finite = [s.compared, s.residual_square, s.level, s.variance]
            .iter()
            .all(|v| v.is_finite())
            && self.week.iter().chain(&self.day).all(|v| v.is_finite());
        let whole = self.week.len() == HOURS_PER_WEEK
            && self.week_points.len() == HOURS_PER_WEEK
            && self.day.len() == HOURS_PER_DAY
            && self.day_points.len() == HOURS_PER_DAY;
        if finite && whole {
            Ok(())
        } else {
            Err(format!(
                "{} and {} hours, not {HOURS_PER_WEEK} and {HOURS_PER_DAY}, or a non-finite number",
                self.week.len(),
                self.day.len()
            ))
        }
    }
}

impl WeeklyProfile {
    pub fn new(step_secs: i64) -> WeeklyProfile {
        let points_per_hour = (HOUR_SECS / step_secs.max(1)).clamp(1, i64::from(u16::MAX));
        WeeklyProfile {
            week: [0.0; HOURS_PER_WEEK],
            week_points: [0; HOURS_PER_WEEK],
            day: [0.0; HOURS_PER_DAY],
            day_points: [0; HOURS_PER_DAY],
            points_per_hour: points_per_hour as u16,
            strength: Strength::default(),
            learnt_until: i64::MIN,
        }
    }

    /// The profile a seed holds, as it was when the seed was taken. `None` when the seed is
    /// malformed ([`WeeklySeed::check`]).
    pub fn from_seed(step_secs: i64, seed: &WeeklySeed) -> Option<WeeklyProfile> {
        seed.check().ok()?;
        let mut profile = WeeklyProfile::new(step_secs);
        profile.week.copy_from_slice(&seed.week);
        profile.week_points.copy_from_slice(&seed.week_points);
        profile.day.copy_from_slice(&seed.day);
        profile.day_points.copy_from_slice(&seed.day_points);
        profile.strength = seed.strength;
        profile.learnt_until = seed.learnt_until;
        Some(profile)
    }

    /// What the model carries: `None` unless the profile describes the series.
    pub fn seed(&self) -> Option<WeeklySeed> {
        self.describes_series().then(|| WeeklySeed {
            week: self.week.to_vec(),
            week_points: self.week_points.to_vec(),
            day: self.day.to_vec(),
            day_points: self.day_points.to_vec(),
            strength: self.strength,
            learnt_until: self.learnt_until,
        })
    }

    /// The average of `ts`'s hour of the week, once that hour has been seen for a whole hour.
    pub fn this_hour_of_week(&self, ts: i64) -> Option<f64> {
        let hour = hour_of_week(ts);
        (self.week_points[hour] >= self.points_per_hour).then(|| f64::from(self.week[hour]))
    }

    /// The average of `ts`'s hour of the day, mostly yesterday's, once seen for a whole hour.
    pub fn this_hour_yesterday(&self, ts: i64) -> Option<f64> {
        let hour = hour_of_week(ts) % HOURS_PER_DAY;
        (self.day_points[hour] >= self.points_per_hour).then(|| f64::from(self.day[hour]))
    }

    /// Whether the point at `ts` is in the averages already: a seeded profile's own history,
    /// which it cannot be surprised by.
    pub fn has_learnt(&self, ts: i64) -> bool {
        ts <= self.learnt_until
    }

    /// Whether the week's averages explain at least [`MIN_STRENGTH`] of the series' variance,
    /// judged on at least [`MIN_COMPARED`] points.
    pub fn describes_series(&self) -> bool {
        let s = &self.strength;
        s.compared >= MIN_COMPARED
            && s.variance > 0.0
            && 1.0 - s.residual_square / s.variance >= MIN_STRENGTH
    }

    /// Takes in a value of the series: each is compared with its hour's average before it is
    /// averaged in. Non-finite values, and points a seed had learnt already, are ignored.
    pub fn learn(&mut self, ts: i64, value: f64) {
        if !value.is_finite() || ts <= self.learnt_until {
            return;
        }
        self.learnt_until = ts;
        if let Some(expected) = self.this_hour_of_week(ts) {
            let s = &mut self.strength;
            s.compared += 1.0;
            let weight = 1.0 / s.compared.min(STRENGTH_MEMORY);
            s.residual_square += weight * ((value - expected).powi(2) - s.residual_square);
            let delta = value - s.level;
            s.level += weight * delta;
            s.variance = (1.0 - weight) * (s.variance + weight * delta * delta);
        }
        let per_hour = f64::from(self.points_per_hour);
        let hour = hour_of_week(ts);
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

#[cfg(test)]
mod tests {
    use super::*;

    const STEP: i64 = 600;

    /// Three weeks of a daily rhythm with a small wobble.
    fn rhythm() -> WeeklyProfile {
        let mut profile = WeeklyProfile::new(STEP);
        for ts in (0..21 * 86_400).step_by(STEP as usize) {
            let phase = std::f64::consts::TAU * (ts % 86_400) as f64 / 86_400.0;
            profile.learn(ts, 50.0 + 20.0 * phase.sin() + ((ts / STEP) % 3) as f64);
        }
        profile
    }

    #[test]
    fn a_seed_restores_the_profile_and_points_it_had_are_not_learnt_twice() {
        let profile = rhythm();
        let seed = profile.seed().expect("a daily rhythm is a weekly one");
        let json = serde_json::to_string(&seed).expect("serialises");
        let back: WeeklySeed = serde_json::from_str(&json).expect("parses");
        let mut restored = WeeklyProfile::from_seed(STEP, &back).expect("usable");
        assert_eq!(restored, profile);
        // A replay of the history it learnt from leaves it as it was.
        restored.learn(20 * 86_400, 1e6);
        assert_eq!(restored, profile);
        restored.learn(21 * 86_400, 1e6);
        assert_ne!(restored, profile, "a new point is learnt");
    }

    #[test]
    fn a_malformed_seed_is_refused() {
        let seed = rhythm().seed().expect("seed");
        let short = WeeklySeed {
            week: seed.week[1..].to_vec(),
            ..seed.clone()
        };
        assert!(WeeklyProfile::from_seed(STEP, &short).is_none());
        let mut infinite = seed.clone();
        infinite.strength.variance = f64::INFINITY;
        assert!(WeeklyProfile::from_seed(STEP, &infinite).is_none());
        let mut nan = seed;
        nan.day[3] = f32::NAN;
        assert!(WeeklyProfile::from_seed(STEP, &nan).is_none());
    }

    #[test]
    fn hours_of_the_week_start_at_the_epochs_thursday() {
        assert_eq!(hour_of_week(0), 0);
        assert_eq!(hour_of_week(HOUR_SECS - 1), 0);
        assert_eq!(hour_of_week(WEEK_SECS - 1), HOURS_PER_WEEK - 1);
        assert_eq!(hour_of_week(-1), HOURS_PER_WEEK - 1, "before 1970 too");
    }
}
