//! What counts as anomalous for a detector, beyond the calibrated band: which direction matters
//! (a latency that drops is good news) and how small a deviation never matters (a queue of 3
//! instead of 1 is "10 sigma" and nobody cares). Both shape the score itself, so the exported
//! band, the alert and the backtest all agree.

use serde::{Deserialize, Deserializer};

/// Which deviations from the forecast can be anomalous.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    #[default]
    Both,
    /// Only values above the forecast (latency, errors).
    Above,
    /// Only values below the forecast (throughput, free space).
    Below,
}

/// How a point's deviation (in band half-widths) becomes its `anomaly_score`. Whichever is
/// chosen, above 1 means anomalous.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scoring {
    /// The deviation itself: 1 at the edge of the calibrated band.
    Band,
    /// The anomaly likelihood of recent deviations against the series' own history
    /// ([`super::likelihood::Likelihood`]).
    #[default]
    Likelihood,
    /// Standard deviations above the series' mean deviation ([`super::likelihood::Standardized`]).
    Standardized,
    /// Smoothed deviations against a threshold chosen from the series' recent ones (Hundman et
    /// al., [`super::dynamic::DynamicThreshold`]).
    Dynamic,
}

/// A finite number ≥ 0.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NonNegative(pub f64);

impl<'de> Deserialize<'de> for NonNegative {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let x = f64::deserialize(d)?;
        if !(x.is_finite() && x >= 0.0) {
            return Err(serde::de::Error::custom(format!(
                "must be a number of at least 0, got {x}"
            )));
        }
        Ok(NonNegative(x))
    }
}

/// A detector's `detection:` settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Detection {
    pub direction: Direction,
    /// Deviations from the forecast smaller than this, in the series' units, are never
    /// anomalous: the band is at least this wide on each side.
    pub min_deviation: NonNegative,
    /// The same as a share of the forecast's magnitude (0.1 = 10%).
    pub min_relative_deviation: NonNegative,
    pub scoring: Scoring,
}

impl Detection {
    /// The band's half-width at forecast `yhat`: the calibrated one (`calibrated`), widened to
    /// the minimum deviation.
    pub fn half_width(&self, yhat: f64, calibrated: f64) -> f64 {
        calibrated
            .max(self.min_deviation.0)
            .max(self.min_relative_deviation.0 * yhat.abs())
    }

    /// The score of value `y` against forecast `yhat` with band half-width `half`: the deviation
    /// in half-widths, 0 when it goes the way that does not matter.
    pub fn score(&self, y: f64, yhat: f64, half: f64) -> f64 {
        let deviation = y - yhat;
        let counted = match self.direction {
            Direction::Both => deviation.abs(),
            Direction::Above => deviation.max(0.0),
            Direction::Below => (-deviation).max(0.0),
        };
        counted / half
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direction_decides_which_side_scores() {
        let above = Detection {
            direction: Direction::Above,
            ..Detection::default()
        };
        assert_eq!(above.score(15.0, 10.0, 2.0), 2.5);
        assert_eq!(above.score(5.0, 10.0, 2.0), 0.0);
        let below = Detection {
            direction: Direction::Below,
            ..Detection::default()
        };
        assert_eq!(below.score(5.0, 10.0, 2.0), 2.5);
        assert_eq!(below.score(15.0, 10.0, 2.0), 0.0);
        assert_eq!(Detection::default().score(5.0, 10.0, 2.0), 2.5);
    }

    #[test]
    fn small_deviations_stay_inside_a_widened_band() {
        let d = Detection {
            min_deviation: NonNegative(3.0),
            min_relative_deviation: NonNegative(0.5),
            ..Detection::default()
        };
        assert_eq!(d.half_width(2.0, 1.0), 3.0, "absolute floor");
        assert_eq!(d.half_width(100.0, 1.0), 50.0, "relative floor");
        assert_eq!(d.half_width(2.0, 7.0), 7.0, "calibrated band already wider");
        assert!(d.score(104.0, 100.0, d.half_width(100.0, 1.0)) < 1.0);
    }

    #[test]
    fn config_values_are_checked() {
        let parsed: Detection =
            serde_yaml::from_str("direction: above\nmin_deviation: 5\n").expect("valid");
        assert_eq!(parsed.direction, Direction::Above);
        assert!(serde_yaml::from_str::<Detection>("min_deviation: -1\n").is_err());
        assert!(serde_yaml::from_str::<Detection>("direction: up\n").is_err());
        let band: Detection = serde_yaml::from_str("scoring: band\n").expect("valid");
        assert_eq!(band.scoring, Scoring::Band);
        let dynamic: Detection = serde_yaml::from_str("scoring: dynamic\n").expect("valid");
        assert_eq!(dynamic.scoring, Scoring::Dynamic);
        assert!(serde_yaml::from_str::<Detection>("scoring: magic\n").is_err());
    }
}
