//! What the exporter flagged, left out of a retrain.
//!
//! A model retrained on an incident learns it as normal and forecasts the next one. `mad train`
//! reads back the scores the datasource scraped from `mad serve` over the training range and
//! leaves out every point that scored above the edge, as it leaves out maintenance windows
//! (NAB, retraining as the history grows: standard 74.5 → 75.2; docs/quality.md).

use std::collections::HashMap;

use mad_training::SeriesHistory;

use crate::config::Detector;
use crate::expose::{exposed_labels, CONTRIBUTION, DETECTOR_LABEL, FAMILIES, SCORE};
use crate::rules::promql_string;
use crate::score::ANOMALOUS_ABOVE;
use crate::source::{Labels, Series};

/// Labels a scrape adds to the exporter's series where the input series had none of its own
/// (`honor_labels` keeps the input's).
const SCRAPE_LABELS: [&str; 2] = ["job", "instance"];

/// The query for the scores of `detector`'s series that were above the edge: per input for a
/// multivariate detector (its `anomaly_score` is its groups').
pub fn flagged_query(detector: &Detector) -> String {
    let family = if detector.is_multivariate() {
        FAMILIES[CONTRIBUTION].name
    } else {
        FAMILIES[SCORE].name
    };
    format!(
        "{family}{{{DETECTOR_LABEL}={}}} > {ANOMALOUS_ABOVE}",
        promql_string(&detector.name.0)
    )
}

/// The scores of one detector's series that were above the edge (the result of
/// [`flagged_query`] on the training's step grid), by the labels the exporter exposed.
pub struct Flagged<'a> {
    detector: &'a str,
    /// One index per subset of [`SCRAPE_LABELS`] a series may have had added.
    subsets: Vec<(Vec<&'static str>, HashMap<Labels, &'a Series>)>,
}

impl<'a> Flagged<'a> {
    pub fn new(detector: &'a str, flagged: &'a [Series]) -> Flagged<'a> {
        let subsets = (0..1usize << SCRAPE_LABELS.len())
            .map(|mask| {
                let added: Vec<&'static str> = (0..SCRAPE_LABELS.len())
                    .filter(|i| mask & (1 << i) != 0)
                    .map(|i| SCRAPE_LABELS[i])
                    .collect();
                let index = flagged
                    .iter()
                    .map(|s| {
                        let mut key = s.labels.clone();
                        key.remove("__name__");
                        key.retain(|name, _| !added.contains(&name.as_str()));
                        (key, s)
                    })
                    .collect();
                (added, index)
            })
            .collect();
        Flagged { detector, subsets }
    }

    /// Sets to NaN the points of `history` (on a grid of `step` seconds) that scored above the
    /// edge, and returns how many. A scrape reads a point's score up to a step after the point,
    /// so the grid point before a flagged one goes too.
    pub fn exclude(&self, history: &mut SeriesHistory, step: i64) -> usize {
        let exposed: Labels = exposed_labels(&history.labels, self.detector)
            .into_iter()
            .collect();
        let index = self.subsets.iter().find(|(added, _)| {
            SCRAPE_LABELS
                .iter()
                .all(|l| added.contains(l) != exposed.contains_key(*l))
        });
        let (Some(scores), Some(first)) = (
            index.and_then(|(_, index)| index.get(&exposed)),
            history.timestamps.first(),
        ) else {
            return 0;
        };
        let mut excluded = 0;
        for (ts, _) in scores.points.iter().filter(|(_, s)| *s > ANOMALOUS_ABOVE) {
            let at = (ts - first).div_euclid(step.max(1));
            for slot in [at - 1, at] {
                let value = usize::try_from(slot)
                    .ok()
                    .and_then(|i| history.values.get_mut(i));
                if let Some(value) = value.filter(|v| v.is_finite()) {
                    *value = f64::NAN;
                    excluded += 1;
                }
            }
        }
        excluded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::source::labels_of as labels;

    fn history(pairs: &[(&str, &str)], points: usize) -> SeriesHistory {
        SeriesHistory {
            labels: labels(pairs),
            timestamps: (0..points as i64).map(|i| 1_000 + 60 * i).collect(),
            values: vec![1.0; points],
        }
    }

    #[test]
    fn the_flagged_point_and_the_one_before_are_left_out_of_their_own_series_only() {
        let mut histories = [
            history(&[("instance", "a"), ("path", r#"/"x"\{y}"#)], 10),
            history(&[("instance", "b")], 10),
        ];
        // As scraped with honor_labels: the input's labels kept, `job` added by the scrape, the
        // detector label, and the metric name a comparison would have dropped.
        let flagged = vec![Series {
            labels: labels(&[
                ("__name__", "anomaly_score"),
                ("for", "cpu"),
                ("instance", "a"),
                ("job", "mad"),
                ("path", r#"/"x"\{y}"#),
            ]),
            points: vec![(1_000 + 60 * 5, 3.5), (1_000 + 60 * 8, 0.5)],
        }];
        let flagged = Flagged::new("cpu", &flagged);
        let excluded: usize = histories.iter_mut().map(|h| flagged.exclude(h, 60)).sum();
        assert_eq!(excluded, 2);
        let gone: Vec<usize> = (0..10)
            .filter(|i| histories[0].values[*i].is_nan())
            .collect();
        assert_eq!(gone, vec![4, 5]);
        assert!(histories[1].values.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn scores_of_another_detector_or_outside_the_history_change_nothing() {
        let mut history = history(&[("instance", "a")], 10);
        let flagged = vec![
            Series {
                labels: labels(&[("for", "memory"), ("instance", "a")]),
                points: vec![(1_000 + 60 * 5, 3.5)],
            },
            Series {
                labels: labels(&[("for", "cpu"), ("instance", "a")]),
                points: vec![
                    (1_000 - 60 * 5, 3.5),
                    (1_000 + 60 * 50, 3.5),
                    (1_000, f64::NAN),
                ],
            },
        ];
        let flagged = Flagged::new("cpu", &flagged);
        assert_eq!(flagged.exclude(&mut history, 60), 0);
        assert!(history.values.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn a_multivariate_detector_reads_its_inputs_scores() {
        let config = crate::config::Config::parse(
            include_str!("../../docs/mad.example.yaml"),
            std::path::Path::new("docs/mad.example.yaml"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let (single, joined) = (&config.detectors[0], &config.detectors[2]);
        assert!(joined.is_multivariate() && !single.is_multivariate());
        assert_eq!(
            flagged_query(single),
            format!("anomaly_score{{for=\"{}\"}} > 1", single.name.0)
        );
        assert_eq!(
            flagged_query(joined),
            format!("anomaly_contribution{{for=\"{}\"}} > 1", joined.name.0)
        );
    }
}
