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
