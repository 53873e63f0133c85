//! Anomaly history: turning per-point scores into episodes, and recording them.
//!
//! An episode opens when a series stays above 1 for `for` and closes after `quiet` without a
//! point above 1. Each change is an idempotent upsert keyed by (detector, series, start), so a
//! write repeated after an outage is harmless.

mod recorder;

use std::collections::HashMap;

use mad_training::contract::series_key;

use crate::score::group::{GroupScore, MAX_DRIVERS};
use crate::score::Score;
use crate::source::Labels;
pub use recorder::{Recorder, RECORDER_BUFFER};

/// An episode as it is now: written when it opens and again when it closes.
#[derive(Debug, Clone, PartialEq)]
pub struct Episode {
    pub detector: String,
    pub labels: Labels,
    /// Canonical series identity (`series_key` of the labels).
    pub series: String,
    pub started_at: i64,
    pub ended_at: Option<i64>,
    pub peak_score: f64,
    /// A multivariate detector's inputs that drove the peak, strongest first; empty otherwise.
    pub drivers: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Above 1 since `since`, not yet for long enough.
    Pending { since: i64, peak: f64 },
    /// An open episode; `last_above` is the newest point above 1.
    Open {
        since: i64,
        peak: f64,
        last_above: i64,
    },
}

/// Per-detector episode state machine.
pub struct EpisodeTracker {
    detector: String,
    hold_for: i64,
    quiet: i64,
    series: HashMap<Labels, Phase>,
    /// The drivers at each tracked group's peak so far.
    peak_drivers: HashMap<Labels, Vec<String>>,
}

impl EpisodeTracker {
    pub fn new(detector: &str, hold_for_secs: i64, quiet_secs: i64) -> EpisodeTracker {
        EpisodeTracker {
            detector: detector.to_string(),
            hold_for: hold_for_secs,
            quiet: quiet_secs,
            series: HashMap::new(),
            peak_drivers: HashMap::new(),
        }
    }

    /// Feeds a multivariate detector's group scores (as [`crate::score::group::combine`] orders
    /// them: by group, then time); the episodes name the inputs that drove their peak.
    pub fn observe_groups(&mut self, groups: &[GroupScore]) -> Vec<Episode> {
        let mut changed = Vec::new();
        for run in groups.chunk_by(|a, b| a.labels == b.labels) {
            let labels = &run[0].labels;
            for g in run {
                let peak = match self.series.get(labels) {
                    Some(Phase::Pending { peak, .. } | Phase::Open { peak, .. }) => *peak,
                    None => 0.0,
                };
                if g.score > 1.0 && g.score > peak {
                    self.peak_drivers.insert(labels.clone(), drivers(g));
                }
                changed.extend(self.observe(labels, &[g.as_score()]));
            }
        }
        changed
    }

    /// Feeds one series' newly scored points (in time order); returns episodes that opened or
    /// closed.
    pub fn observe(&mut self, labels: &Labels, scores: &[Score]) -> Vec<Episode> {
        let mut changed = Vec::new();
        let mut phase = self.series.remove(labels);
        for s in scores {
            let above = s.score > 1.0;
            phase = match (phase, above) {
                (None, false) => None,
                (None, true) => self.promote(labels, s.ts, s.score, s.ts, &mut changed),
                (Some(Phase::Pending { .. }), false) => None,
                (Some(Phase::Pending { since, peak }), true) => {
                    self.promote(labels, since, peak.max(s.score), s.ts, &mut changed)
                }
                (Some(Phase::Open { since, peak, .. }), true) => Some(Phase::Open {
                    since,
                    peak: peak.max(s.score),
                    last_above: s.ts,
                }),
                (
                    Some(Phase::Open {
                        since,
                        peak,
                        last_above,
                    }),
                    false,
                ) => {
                    if s.ts - last_above >= self.quiet {
                        changed.push(self.episode(labels, since, Some(last_above), peak));
                        None
                    } else {
                        Some(Phase::Open {
                            since,
                            peak,
                            last_above,
                        })
                    }
                }
            };
        }
        match phase {
            Some(p) => {
                self.series.insert(labels.clone(), p);
            }
            None => {
                self.peak_drivers.remove(labels);
            }
        }
        changed
    }

    /// A series above 1 since `since`: opens the episode once it has lasted `for`.
    fn promote(
        &self,
        labels: &Labels,
        since: i64,
        peak: f64,
        now: i64,
        changed: &mut Vec<Episode>,
    ) -> Option<Phase> {
        if now - since >= self.hold_for {
            changed.push(self.episode(labels, since, None, peak));
            Some(Phase::Open {
                since,
                peak,
                last_above: now,
            })
        } else {
            Some(Phase::Pending { since, peak })
        }
    }

    fn episode(&self, labels: &Labels, start: i64, end: Option<i64>, peak: f64) -> Episode {
        Episode {
            detector: self.detector.clone(),
            labels: labels.clone(),
            series: series_key(labels),
            started_at: start,
            ended_at: end,
            peak_score: peak,
            drivers: self.peak_drivers.get(labels).cloned().unwrap_or_default(),
        }
    }
}

/// The inputs above 1 at a group's point, strongest first (at most [`MAX_DRIVERS`]).
fn drivers(g: &GroupScore) -> Vec<String> {
    g.inputs
        .iter()
        .filter(|(_, score)| *score > 1.0)
        .take(MAX_DRIVERS)
        .map(|(name, _)| name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ts: i64, score: f64) -> Score {
        Score {
            ts,
            y: 0.0,
            yhat: 0.0,
            lower: 0.0,
            upper: 0.0,
            score,
        }
    }

    fn run(tracker: &mut EpisodeTracker, points: &[(i64, f64)]) -> Vec<Episode> {
        let labels: Labels = [("instance".to_string(), "a".to_string())].into();
        points
            .iter()
            .flat_map(|&(ts, s)| tracker.observe(&labels, &[at(ts, s)]))
            .collect()
    }

    #[test]
    fn an_episode_opens_after_for_and_closes_after_quiet() {
        let mut t = EpisodeTracker::new("d", 120, 180);
        let events = run(
            &mut t,
            &[
                (0, 0.5),
                (60, 1.5),
                (120, 3.0),
                (180, 2.0),
                (240, 0.2),
                (300, 1.2),
                (360, 0.1),
                (420, 0.1),
                (480, 0.3),
            ],
        );
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!((events[0].started_at, events[0].ended_at), (60, None));
        assert_eq!(events[0].peak_score, 3.0);
        // The blip at 300 keeps it open; quiet from 300 to 480.
        assert_eq!((events[1].started_at, events[1].ended_at), (60, Some(300)));
        assert_eq!(events[1].peak_score, 3.0);
    }

    #[test]
    fn a_group_episode_names_the_inputs_that_drove_its_peak() {
        let mut t = EpisodeTracker::new("d", 60, 60);
        let group: Labels = [("instance".to_string(), "a".to_string())].into();
        let point = |ts: i64, inputs: &[(&str, f64)]| GroupScore {
            labels: group.clone(),
            ts,
            score: inputs.iter().map(|i| i.1).fold(0.0, f64::max),
            inputs: inputs.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
        };
        let events = t.observe_groups(&[
            point(0, &[("cpu", 1.5), ("mem", 0.2)]),
            point(60, &[("mem", 4.0), ("cpu", 2.0), ("disk", 0.5)]),
            point(120, &[("cpu", 1.2), ("mem", 0.1)]),
            point(180, &[("cpu", 0.1)]),
        ]);
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].drivers, vec!["mem", "cpu"]);
        assert_eq!(events[1].ended_at, Some(120));
        assert_eq!(
            events[1].drivers,
            vec!["mem", "cpu"],
            "the peak's, not the last point's"
        );
        assert_eq!(events[1].peak_score, 4.0);
    }

    #[test]
    fn short_blips_are_not_episodes() {
        let mut t = EpisodeTracker::new("d", 120, 180);
        let events = run(
            &mut t,
            &[(0, 1.5), (60, 2.5), (120, 0.5), (180, 5.0), (240, 0.1)],
        );
        assert!(events.is_empty(), "{events:?}");
    }

    #[test]
    fn zero_for_opens_on_the_first_point_above_one() {
        let mut t = EpisodeTracker::new("d", 0, 60);
        let events = run(&mut t, &[(0, 1.01), (60, 0.2)]);
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].ended_at, Some(0));
    }
}
