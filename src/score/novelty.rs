//! Range novelty: a value beyond everything the series has shown — in its training history and
//! since — is news, even where the forecast followed it there (a climb to a record the LSTM
//! tracks step by step) or the error history is used to large misses (a noisy series whose
//! spike of a lifetime looks like its usual ones). Points inside the range score 0 here; the
//! forecast's likelihood judges them. The range only widens: a record is news once.

use mad_training::contract::ValueRange;

use super::detection::{Detection, Direction};

/// How far beyond the range seen, as a share of the range's width, a value scores 1. Measured
/// on NAB (standard profile, 58.8 without novelty): 0.01 → 64.2, 0.02 → 64.9, 0.03 → 65.0,
/// 0.05 → 63.0, 0.1 → 60.4, 0.2 → 60.6; SMD, ASD and the KPI files within ±0.006 of without
/// (docs/quality.md).
pub const NOVELTY_EDGE: f64 = 0.03;

/// The novelty score of `y` (forecast `yhat`) against `range`: its distance beyond the range in
/// range widths, over [`NOVELTY_EDGE`]. 0 inside the range, on a side the detection's direction
/// ignores, within its minimum deviation of the forecast (nothing there is anomalous, new or
/// not), and for a range without width (a constant series has no scale to judge "how far" by).
pub fn novelty(range: ValueRange, y: f64, yhat: f64, detection: &Detection) -> f64 {
    let width = range.max - range.min;
    if !(width > 0.0 && width.is_finite() && y.is_finite()) {
        return 0.0;
    }
    if (y - yhat).abs() <= detection.half_width(yhat, 0.0) {
        return 0.0;
    }
    let beyond = match detection.direction {
        Direction::Both => (y - range.max).max(range.min - y),
        Direction::Above => y - range.max,
        Direction::Below => range.min - y,
    };
    beyond.max(0.0) / width / NOVELTY_EDGE
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANGE: ValueRange = ValueRange {
        min: 40.0,
        max: 60.0,
    };

    /// Novelty of `y` forecast at the range's middle, under `direction`.
    fn novelty(range: ValueRange, y: f64, direction: Direction) -> f64 {
        let detection = Detection {
            direction,
            ..Detection::default()
        };
        super::novelty(range, y, 50.0, &detection)
    }

    #[test]
    fn a_value_beyond_the_range_scores_by_how_far() {
        assert_eq!(novelty(RANGE, 50.0, Direction::Both), 0.0);
        assert_eq!(novelty(RANGE, 60.0, Direction::Both), 0.0);
        // The edge: NOVELTY_EDGE of the width beyond either end.
        let edge = 20.0 * NOVELTY_EDGE;
        assert!((novelty(RANGE, 60.0 + edge, Direction::Both) - 1.0).abs() < 1e-9);
        assert!((novelty(RANGE, 40.0 - 2.0 * edge, Direction::Both) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn direction_decides_which_end_counts() {
        assert!(novelty(RANGE, 70.0, Direction::Above) > 1.0);
        assert_eq!(novelty(RANGE, 30.0, Direction::Above), 0.0);
        assert!(novelty(RANGE, 30.0, Direction::Below) > 1.0);
        assert_eq!(novelty(RANGE, 70.0, Direction::Below), 0.0);
    }

    #[test]
    fn within_the_minimum_deviation_of_the_forecast_nothing_is_new() {
        let detection = Detection {
            min_deviation: crate::score::detection::NonNegative(5.0),
            ..Detection::default()
        };
        // 61 is a record, but only 3 from a forecast of 58.
        assert_eq!(super::novelty(RANGE, 61.0, 58.0, &detection), 0.0);
        assert!(super::novelty(RANGE, 61.0, 50.0, &detection) > 1.0);
    }

    #[test]
    fn no_width_or_no_number_is_no_verdict() {
        let flat = ValueRange { min: 5.0, max: 5.0 };
        assert_eq!(novelty(flat, 500.0, Direction::Both), 0.0);
        assert_eq!(novelty(RANGE, f64::NAN, Direction::Both), 0.0);
        assert_eq!(novelty(RANGE, f64::INFINITY, Direction::Both), 0.0);
    }

    #[test]
    fn the_range_takes_in_what_it_sees() {
        assert_eq!(
            ValueRange::of(&[f64::NAN, 3.0, -1.0, 2.0]),
            Some(ValueRange {
                min: -1.0,
                max: 3.0
            })
        );
        assert_eq!(ValueRange::of(&[f64::NAN]), None);
        assert_eq!(RANGE.including(70.0).max, 70.0);
        assert_eq!(RANGE.including(50.0), RANGE);
    }
}
