//! Whether a scheduled run retrains a detector that already has a model (`mad train --if-due`).
//!
//! A model trained afresh restarts the exporter's scorer: its likelihoods start again from a
//! warm-up's worth of history, and on one-minute data a daily retrain keeps the day-long scale
//! from ever joining (replayed on SMD, retraining every day cost best F1 0.395 → 0.219). A due
//! model is continued instead (`mad_training::train_continuing`), so the exporter keeps its
//! series' states, but a model learns nothing from a history that has hardly grown. So a
//! scheduled run retrains a model only when it has something to learn (docs/quality.md).

use mad_training::search::SEARCH_META_KEY;
use mad_training::{series_key, ModelMeta, SeriesHistory};

/// What a detector asks of its model now.
#[derive(Debug, Clone, Copy)]
pub struct Wanted {
    pub window: usize,
    pub step_secs: u64,
    /// A model older than this is retrained (half of `alerting.model_max_age`, so the
    /// `MadModelStale` alert never fires while the schedule runs).
    pub max_age_secs: i64,
}

/// Why `meta`'s model should be retrained on `history` at `now` (Unix seconds), or `None` when
/// it is up to date: the config asks for another window or step, a series is new to it, the
/// history is twice as long as the one it learnt from, or it is too old.
pub fn reason(
    meta: &ModelMeta,
    history: &[SeriesHistory],
    wanted: Wanted,
    now: i64,
) -> Option<String> {
    // A searched model picked its own window: only the step must match the config's.
    let searched = meta.training.contains_key(SEARCH_META_KEY);
    if meta.step_secs != wanted.step_secs || (!searched && meta.window != wanted.window) {
        return Some(format!(
            "the config asks for window {} at step {}s, the model has {} at {}s",
            wanted.window, wanted.step_secs, meta.window, meta.step_secs
        ));
    }
    let new = history
        .iter()
        .filter(|h| !meta.series.contains_key(&series_key(&h.labels)))
        .count();
    if new > 0 {
        return Some(format!("{new} series the model has not learnt"));
    }
    let first = history.iter().filter_map(|h| h.timestamps.first()).min();
    let last = history.iter().filter_map(|h| h.timestamps.last()).max();
    let span = match (first, last) {
        (Some(first), Some(last)) => last.saturating_sub(*first),
        _ => 0,
    };
    // Saturating: the metadata comes from a file.
    let learnt = meta.train_end.saturating_sub(meta.train_start);
    if span >= learnt.max(1).saturating_mul(2) {
        return Some(format!(
            "the history has doubled: {} now, the model learnt {}",
            duration(span),
            duration(learnt)
        ));
    }
    let age = now.saturating_sub(meta.trained_at);
    if age >= wanted.max_age_secs {
        return Some(format!("the model is {} old", duration(age)));
    }
    None
}

/// A span of seconds, rounded to the minute, as humantime writes it.
pub fn duration(secs: i64) -> String {
    let minutes = secs.max(0) as u64 / 60;
    humantime::format_duration(std::time::Duration::from_secs(minutes * 60)).to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mad_training::{Scaler, SeriesCalibration};

    use super::*;

    const DAY: i64 = 86_400;
    const WANTED: Wanted = Wanted {
        window: 64,
        step_secs: 60,
        max_age_secs: 15 * DAY,
    };

    fn history(instance: &str, from: i64, to: i64) -> SeriesHistory {
        let timestamps: Vec<i64> = (from..=to).step_by(3_600).collect();
        SeriesHistory {
            labels: [("instance".to_string(), instance.to_string())].into(),
            values: vec![1.0; timestamps.len()],
            timestamps,
        }
    }

    /// A model trained at `trained_at` on `[start, end]` of the series `a`.
    fn model(start: i64, end: i64, trained_at: i64) -> ModelMeta {
        let labels: BTreeMap<String, String> = [("instance".to_string(), "a".to_string())].into();
        let calibration = SeriesCalibration {
            scaler: Scaler {
                center: 0.0,
                scale: 1.0,
            },
            band: 1.0,
            range: None,
            fitted_until: None,
            weekly: None,
        };
        ModelMeta {
            contract_version: 1,
            detector: "cpu".into(),
            features: vec![mad_training::contract::Feature::Value],
            inputs: Vec::new(),
            hidden: 32,
            layers: 1,
            step_secs: 60,
            window: 64,
            series: [(series_key(&labels), calibration)].into(),
            default_band: 1.0,
            train_start: start,
            train_end: end,
            trained_at,
            training: BTreeMap::new(),
        }
    }

    #[test]
    fn a_model_that_learnt_its_whole_history_is_left_alone_until_it_ages() {
        let meta = model(0, 14 * DAY, 14 * DAY);
        let now = [history("a", DAY, 15 * DAY)];
        assert_eq!(reason(&meta, &now, WANTED, 15 * DAY), None);
        let old = reason(&meta, &now, WANTED, 30 * DAY).expect("due when old");
        assert_eq!(old, "the model is 16days old");
    }

    #[test]
    fn a_short_history_is_learnt_again_once_it_has_doubled() {
        let meta = model(0, 2 * DAY, 2 * DAY);
        assert_eq!(
            reason(&meta, &[history("a", 0, 3 * DAY)], WANTED, 3 * DAY),
            None
        );
        assert_eq!(
            reason(&meta, &[history("a", 0, 4 * DAY)], WANTED, 4 * DAY).as_deref(),
            Some("the history has doubled: 4days now, the model learnt 2days")
        );
    }

    #[test]
    fn a_new_series_or_another_window_makes_a_model_due() {
        let meta = model(0, 14 * DAY, 14 * DAY);
        let both = [history("a", 0, 14 * DAY), history("b", 0, 14 * DAY)];
        assert_eq!(
            reason(&meta, &both, WANTED, 14 * DAY).as_deref(),
            Some("1 series the model has not learnt")
        );
        let wider = Wanted {
            window: 128,
            ..WANTED
        };
        assert!(
            reason(&meta, &both[..1], wider, 14 * DAY).is_some_and(|r| r.contains("window 128"))
        );
        // A search chose the model's window: the config's is only where it started.
        let mut searched = meta.clone();
        searched
            .training
            .insert(SEARCH_META_KEY.into(), serde_json::json!({"trials": 12}));
        assert_eq!(reason(&searched, &both[..1], wider, 14 * DAY), None);
    }
}
