//! Multivariate detectors: the per-input scores of one group combined into the group's score.
//!
//! The group's `anomaly_score` is the mean of its [`MAX_DRIVERS`] highest input scores at a
//! timestamp: the inputs an alert names are the ones that make its score. One input far out is
//! still enough (three times the edge alone), but a group of many inputs no longer fires
//! whenever any one of them wobbles past its edge: on SMD and ASD, the real incidents move
//! several metrics at once, the false alarms mostly one (the highest input alone: SMD best F1
//! 0.333, 0.234 at the default threshold; the top three's mean: 0.357 and 0.292; ASD 0.450 /
//! 0.363 and 0.452 / 0.405; docs/quality.md). A group of one input scores that input, unchanged.

use std::collections::BTreeMap;

use super::Score;
use crate::source::{group_of, Labels};

/// How many inputs an episode names as its drivers, and how many of the highest input scores
/// the group's score is the mean of.
pub const MAX_DRIVERS: usize = 3;

/// The group's score from its inputs' scores, highest first: the mean of the first
/// [`MAX_DRIVERS`] (of all of them when there are fewer); 0 for no inputs.
pub fn group_score(ranked: impl IntoIterator<Item = f64>) -> f64 {
    let (sum, count) = ranked
        .into_iter()
        .take(MAX_DRIVERS)
        .fold((0.0, 0), |(sum, count), s| (sum + s, count + 1));
    if count == 0 {
        0.0
    } else {
        sum / f64::from(count)
    }
}

/// One group's combined score at one timestamp.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupScore {
    /// The join labels (the input's labels without `input`).
    pub labels: Labels,
    pub ts: i64,
    pub score: f64,
    /// Every input's score at `ts`, highest first (ties by name).
    pub inputs: Vec<(String, f64)>,
}

impl GroupScore {
    /// The group's score from its inputs' scores: they are ranked, the top ones make the score.
    fn ranked(labels: Labels, ts: i64, mut inputs: Vec<(String, f64)>) -> GroupScore {
        inputs.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let score = group_score(inputs.iter().map(|(_, s)| *s));
        GroupScore {
            labels,
            ts,
            score,
            inputs,
        }
    }

    /// The input that drove the score.
    pub fn driver(&self) -> Option<&str> {
        self.inputs.first().map(|(name, _)| name.as_str())
    }

    /// The group score as a [`Score`] for the episode tracker (only `ts` and `score` matter).
    pub fn as_score(&self) -> Score {
        Score {
            ts: self.ts,
            y: f64::NAN,
            yhat: f64::NAN,
            lower: f64::NAN,
            upper: f64::NAN,
            score: self.score,
        }
    }
}

/// Combines per-input scores into group scores, one per (group, timestamp), in group then time
/// order. Scores of series without an input label are their own group of one.
pub fn combine<'a>(scores: impl IntoIterator<Item = (&'a Labels, &'a Score)>) -> Vec<GroupScore> {
    let mut groups: BTreeMap<(Labels, i64), Vec<(String, f64)>> = BTreeMap::new();
    for (labels, score) in scores {
        let (group, input) = group_of(labels);
        groups
            .entry((group, score.ts))
            .or_default()
            .push((input.unwrap_or_default().to_string(), score.score));
    }
    groups
        .into_iter()
        .map(|((labels, ts), inputs)| GroupScore::ranked(labels, ts, inputs))
        .collect()
}

/// The latest group score of each group: per input its newest score, combined at the group's
/// newest timestamp. An input that missed the newest cycle still counts with its last score
/// until it goes stale.
pub fn latest<'a>(scores: impl IntoIterator<Item = (&'a Labels, &'a Score)>) -> Vec<GroupScore> {
    let mut groups: BTreeMap<Labels, (i64, Vec<(String, f64)>)> = BTreeMap::new();
    for (labels, score) in scores {
        let (group, input) = group_of(labels);
        let (ts, inputs) = groups.entry(group).or_insert((score.ts, Vec::new()));
        *ts = (*ts).max(score.ts);
        inputs.push((input.unwrap_or_default().to_string(), score.score));
    }
    groups
        .into_iter()
        .map(|(labels, (ts, inputs))| GroupScore::ranked(labels, ts, inputs))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(instance: &str, input: &str) -> Labels {
        [
            ("instance".to_string(), instance.to_string()),
            ("input".to_string(), input.to_string()),
        ]
        .into()
    }

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

    #[test]
    fn the_group_scores_its_top_inputs_and_names_the_highest() {
        let (a_cpu, a_mem, b_cpu) = (labels("a", "cpu"), labels("a", "mem"), labels("b", "cpu"));
        let points = [
            (&a_cpu, at(60, 0.4)),
            (&a_mem, at(60, 2.5)),
            (&a_cpu, at(120, 0.3)),
            (&a_mem, at(120, 0.2)),
            (&b_cpu, at(60, 0.9)),
        ];
        let groups = combine(points.iter().map(|(l, s)| (*l, s)));
        assert_eq!(groups.len(), 3);
        assert_eq!(
            groups[0].labels.get("instance").map(String::as_str),
            Some("a")
        );
        assert!(!groups[0].labels.contains_key("input"));
        assert_eq!((groups[0].ts, groups[0].score), (60, (2.5 + 0.4) / 2.0));
        assert_eq!(groups[0].driver(), Some("mem"));
        assert_eq!(
            groups[0].inputs,
            vec![("mem".to_string(), 2.5), ("cpu".to_string(), 0.4)]
        );
        assert_eq!((groups[1].ts, groups[1].score), (120, (0.3 + 0.2) / 2.0));
        assert_eq!(groups[1].driver(), Some("cpu"));
        assert_eq!((groups[2].score, groups[2].driver()), (0.9, Some("cpu")));
    }

    #[test]
    fn latest_aligns_an_input_that_missed_a_cycle() {
        let (cpu, mem) = (labels("a", "cpu"), labels("a", "mem"));
        let (late, fresh) = (at(60, 3.0), at(120, 0.5));
        let groups = latest([(&cpu, &late), (&mem, &fresh)]);
        assert_eq!(groups.len(), 1);
        assert_eq!((groups[0].ts, groups[0].score), (120, (3.0 + 0.5) / 2.0));
        assert_eq!(groups[0].driver(), Some("cpu"));
    }

    #[test]
    fn several_inputs_out_or_one_far_out_make_a_group_anomalous() {
        let at_edge = |inputs: &[f64]| group_score(inputs.iter().copied()) > 1.0;
        // One input just past its edge among quiet ones: a wobble, not an incident.
        assert!(!at_edge(&[1.5, 0.3, 0.2, 0.1]));
        // Three inputs past their edges together, or one far out, are.
        assert!(at_edge(&[1.2, 1.1, 1.05, 0.1]));
        assert!(at_edge(&[3.5, 0.0, 0.0]));
        // Only the top three count: a fourth high input does not dilute them.
        assert_eq!(group_score([3.0, 2.0, 1.0, 0.0]), 2.0);
        assert_eq!(group_score([0.7]), 0.7);
        assert_eq!(group_score([]), 0.0);
    }
}
