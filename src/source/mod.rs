//! Reading metrics: a client for the Prometheus HTTP API as VictoriaMetrics (and Prometheus)
//! serve it, and the series it returns put on a regular time grid.

mod client;
mod joined;

use std::collections::BTreeMap;

#[doc(hidden)]
pub use client::parse_query_range;
pub use client::{Client, SourceError};
pub use joined::group_of;

/// Labels of one series, sorted by name.
pub type Labels = BTreeMap<String, String>;

/// Labels from name/value pairs, for tests.
#[cfg(test)]
pub(crate) fn labels_of(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One series of a range query: samples at step-aligned Unix seconds. Samples whose value was
/// `NaN` or `±Inf` are kept as NaN so the caller sees the gap.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub labels: Labels,
    pub points: Vec<(i64, f64)>,
}

impl Series {
    /// The series on the grid `start, start+step, ..., end` (inclusive): NaN where no sample is.
    pub fn on_grid(&self, start: i64, end: i64, step: i64) -> Vec<f64> {
        if end < start || step <= 0 {
            return Vec::new();
        }
        let len = ((end - start) / step + 1) as usize;
        let mut grid = vec![f64::NAN; len];
        for &(ts, v) in &self.points {
            if ts >= start && ts <= end && (ts - start) % step == 0 {
                grid[((ts - start) / step) as usize] = v;
            }
        }
        grid
    }

    /// Newest timestamp with a finite value.
    pub fn last_finite(&self) -> Option<i64> {
        self.points
            .iter()
            .rev()
            .find(|(_, v)| v.is_finite())
            .map(|&(ts, _)| ts)
    }
}

/// Most labels a series may carry to be modelled and exposed. Every label is copied onto five
/// exposed series per scored one, so a runaway label set (a request body or a stack trace in a
/// label) would blow up /metrics and model metadata; VictoriaMetrics itself stops at 30.
pub const MAX_LABELS: usize = 64;
/// Most bytes of label names and values together, per series.
pub const MAX_LABEL_SET_BYTES: usize = 8 * 1024;

/// Whether a label set is within [`MAX_LABELS`] and [`MAX_LABEL_SET_BYTES`], and free of NUL
/// characters, which PostgreSQL refuses in text and JSON: an anomaly of such a series could
/// never be recorded, and would hold up every one after it.
pub fn label_set_fits(labels: &Labels) -> bool {
    labels.len() <= MAX_LABELS
        && labels.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() <= MAX_LABEL_SET_BYTES
        && !labels
            .iter()
            .any(|(k, v)| k.contains('\0') || v.contains('\0'))
}

/// Removes the series whose label set does not fit and says how many there were.
pub fn drop_oversized(series: &mut Vec<Series>) -> usize {
    let before = series.len();
    series.retain(|s| label_set_fits(&s.labels));
    before - series.len()
}

/// Rounds `ts` down to a multiple of `step` so every query and every model sees the same grid.
pub fn align_down(ts: i64, step: i64) -> i64 {
    ts.div_euclid(step) * step
}

/// The current Unix time in seconds (0 if the clock is before 1970).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(labels: Labels) -> Series {
        Series {
            labels,
            points: Vec::new(),
        }
    }

    #[test]
    fn label_sets_beyond_the_limits_are_dropped() {
        let many: Labels = (0..=MAX_LABELS)
            .map(|i| (format!("l{i}"), "v".to_string()))
            .collect();
        let long: Labels = [("blob".to_string(), "x".repeat(MAX_LABEL_SET_BYTES))].into();
        let edge: Labels = [("b".to_string(), "x".repeat(MAX_LABEL_SET_BYTES - 1))].into();
        let normal: Labels = [("instance".to_string(), "a".to_string())].into();
        let nul: Labels = [("instance".to_string(), "a\0b".to_string())].into();
        let mut fetched = vec![
            series(many),
            series(normal.clone()),
            series(long),
            series(edge.clone()),
            series(nul),
        ];
        assert_eq!(drop_oversized(&mut fetched), 3);
        let kept: Vec<&Labels> = fetched.iter().map(|s| &s.labels).collect();
        assert_eq!(kept, [&normal, &edge]);
    }
}
