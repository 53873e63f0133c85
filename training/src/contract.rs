//! The model contract shared by the trainer and the exporter (docs/model-contract.md).
//!
//! Everything the exporter needs to turn raw samples into model inputs and model outputs into
//! scores travels inside the ONNX file as one JSON document under [`META_KEY`], so a model file is
//! self-contained: the exporter never needs the training run that produced it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// ONNX `metadata_props` key holding the JSON-encoded [`ModelMeta`].
pub const META_KEY: &str = "mad.meta";
/// Version of this contract; bumped on any incompatible change.
pub const CONTRACT_VERSION: u32 = 1;

/// Names of the graph's inputs and outputs.
pub const INPUT_X: &str = "x";
pub const INPUT_H: &str = "h0";
pub const INPUT_C: &str = "c0";
pub const OUTPUT_YHAT: &str = "yhat";
pub const OUTPUT_H: &str = "h";
pub const OUTPUT_C: &str = "c";

/// Longest run of missing points that is filled by linear interpolation. A longer gap is stepped
/// over: the stream goes on, and the point after it is fed but neither a target nor scored
/// (training and scoring alike; docs/model-contract.md).
pub const MAX_INTERPOLATED_GAP: usize = 5;

const DAY_SECS: f64 = 86_400.0;
const WEEK_SECS: f64 = 7.0 * DAY_SECS;

/// One input feature per model input column, in column order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    /// The scaled value itself.
    Value,
    /// sin/cos of the time of day: lets a short-memory LSTM follow daily rhythm.
    DaySin,
    DayCos,
    /// sin/cos of the time of week (Unix epoch weeks start on Thursday; only the phase matters).
    WeekSin,
    WeekCos,
}

impl Feature {
    /// The default feature set the trainer uses.
    pub const DEFAULT: [Feature; 5] = [
        Feature::Value,
        Feature::DaySin,
        Feature::DayCos,
        Feature::WeekSin,
        Feature::WeekCos,
    ];

    /// The feature's value for a sample at Unix time `ts` (seconds) whose scaled value is `scaled`.
    pub fn compute(self, ts: i64, scaled: f32) -> f32 {
        let day = std::f64::consts::TAU * (ts as f64).rem_euclid(DAY_SECS) / DAY_SECS;
        let week = std::f64::consts::TAU * (ts as f64).rem_euclid(WEEK_SECS) / WEEK_SECS;
        match self {
            Feature::Value => scaled,
            Feature::DaySin => day.sin() as f32,
            Feature::DayCos => day.cos() as f32,
            Feature::WeekSin => week.sin() as f32,
            Feature::WeekCos => week.cos() as f32,
        }
    }
}

/// Writes the model input row for one sample into `out` (length = `features.len()`).
pub fn input_row(features: &[Feature], ts: i64, scaled: f32, out: &mut [f32]) {
    joint_input_row(features, ts, std::slice::from_ref(&scaled), out);
}

/// Columns of `x` for `features` over `inputs` value streams: [`Feature::Value`] takes one
/// column per input, every other feature one.
pub fn columns(features: &[Feature], inputs: usize) -> usize {
    features
        .iter()
        .map(|f| if *f == Feature::Value { inputs } else { 1 })
        .sum()
}

/// Writes a joint model's input row for one timestamp into `out` (length
/// [`columns`]`(features, scaled.len())`): each [`Feature::Value`] expands to the scaled values
/// of all inputs, in order.
pub fn joint_input_row(features: &[Feature], ts: i64, scaled: &[f32], out: &mut [f32]) {
    let mut slots = out.iter_mut();
    for feature in features {
        if *feature == Feature::Value {
            // `scaled` first: zip must not take a slot it has no value for.
            for (value, slot) in scaled.iter().zip(slots.by_ref()) {
                *slot = *value;
            }
        } else if let Some(slot) = slots.next() {
            *slot = feature.compute(ts, 0.0);
        }
    }
}

/// Affine per-series scaling: `scaled = (raw - center) / scale`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scaler {
    pub center: f64,
    pub scale: f64,
}

impl Scaler {
    /// Smallest scale allowed, relative to the centre's magnitude: a flat series must not blow
    /// tiny jitter up into huge scaled values.
    const MIN_RELATIVE_SCALE: f64 = 1e-3;
    const MIN_ABSOLUTE_SCALE: f64 = 1e-9;

    /// Robust fit: median and IQR/1.349 (which equals the standard deviation for normal data),
    /// so a few incidents in the history do not distort the scale. Non-finite samples are ignored.
    pub fn fit(values: &[f64]) -> Scaler {
        let mut finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if finite.is_empty() {
            return Scaler {
                center: 0.0,
                scale: 1.0,
            };
        }
        finite.sort_by(f64::total_cmp);
        let center = quantile_sorted(&finite, 0.5);
        let iqr = quantile_sorted(&finite, 0.75) - quantile_sorted(&finite, 0.25);
        let mut scale = iqr / 1.349;
        if scale <= 0.0 || !scale.is_finite() {
            let mean = finite.iter().sum::<f64>() / finite.len() as f64;
            let var = finite.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / finite.len() as f64;
            scale = var.sqrt();
        }
        let floor = (center.abs() * Self::MIN_RELATIVE_SCALE).max(Self::MIN_ABSOLUTE_SCALE);
        Scaler {
            center,
            scale: scale.max(floor),
        }
    }

    pub fn scale(&self, raw: f64) -> f64 {
        (raw - self.center) / self.scale
    }

    pub fn unscale(&self, scaled: f64) -> f64 {
        scaled * self.scale + self.center
    }
}

/// Linear-interpolated quantile of an ascending slice (`q` in [0, 1]); NaN when empty.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

/// What one series learned at training time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesCalibration {
    pub scaler: Scaler,
    /// Half-width of the expected band in scaled units: `|y - yhat| = band * scaler.scale` is
    /// exactly `anomaly_score = 1`.
    pub band: f64,
    /// The lowest and highest value of the training history (raw units): the exporter scores
    /// a value beyond everything the series has done. Absent in models from before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<ValueRange>,
    /// Timestamp of the last point the model was fitted to: its errors up to here are
    /// in-sample, smaller than any it will make live, so the exporter does not learn what
    /// "normal error" is from them. Absent in models from before it (every error counts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fitted_until: Option<i64>,
    /// The weekly profile learnt over the training history, where it describes the series
    /// ([`crate::weekly`]): the exporter goes on from it, so after a restart the series is
    /// compared with its usual week at once rather than a week later. Absent otherwise and in
    /// models from before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weekly: Option<crate::weekly::WeeklySeed>,
}

/// The span of values a series has shown, raw units.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ValueRange {
    pub min: f64,
    pub max: f64,
}

impl ValueRange {
    /// The range of the finite `values`; `None` when there are none.
    pub fn of(values: &[f64]) -> Option<ValueRange> {
        values
            .iter()
            .filter(|v| v.is_finite())
            .fold(None, |range, &v| {
                Some(match range {
                    None => ValueRange { min: v, max: v },
                    Some(r) => r.including(v),
                })
            })
    }

    /// The range widened to take in `value`.
    pub fn including(self, value: f64) -> ValueRange {
        ValueRange {
            min: self.min.min(value),
            max: self.max.max(value),
        }
    }
}

/// The label that names a multivariate detector's input; a series' group is its labels without
/// it.
pub const INPUT_LABEL: &str = "input";

/// Metadata stored in the ONNX file under [`META_KEY`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMeta {
    pub contract_version: u32,
    /// Detector this model belongs to.
    pub detector: String,
    /// Input columns of `x`, in order (see [`columns`] for a joint model).
    pub features: Vec<Feature>,
    /// A joint model's inputs (values of [`INPUT_LABEL`]), in the order of its value columns
    /// and of its forecasts: it reads a group's inputs together and forecasts each. Empty for a
    /// model that reads every series on its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    /// LSTM hidden size: `h0`/`c0` are `[layers, batch, hidden]`.
    pub hidden: usize,
    /// Stacked LSTM layers (absent in models from before stacking: one).
    #[serde(default = "one_layer")]
    pub layers: usize,
    /// Sampling step in seconds the model was trained on.
    pub step_secs: u64,
    /// Points the model is warmed up on before its forecasts are scored, and the BPTT length.
    pub window: usize,
    /// Per-series scaling and band, keyed by [`series_key`] of the series' labels.
    pub series: BTreeMap<String, SeriesCalibration>,
    /// Band (scaled units) for series first seen after training; they fit their own scaler.
    pub default_band: f64,
    /// Training range (Unix seconds) and when training finished.
    pub train_start: i64,
    pub train_end: i64,
    pub trained_at: i64,
    /// Free-form facts about the run: hyperparameters, losses, epochs.
    #[serde(default)]
    pub training: BTreeMap<String, serde_json::Value>,
}

fn one_layer() -> usize {
    1
}

/// Canonical identity of a series: its labels sorted by name, Prometheus-style.
pub fn series_key(labels: &BTreeMap<String, String>) -> String {
    serde_json::to_string(labels).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaler_is_robust_to_outliers() {
        let mut values: Vec<f64> = (0..1000).map(|i| 10.0 + (i % 10) as f64).collect();
        values.extend([1e9, f64::NAN, f64::INFINITY]);
        let s = Scaler::fit(&values);
        assert!((s.center - 14.5).abs() < 0.6, "{s:?}");
        assert!(s.scale > 2.0 && s.scale < 6.0, "{s:?}");
        assert!((s.unscale(s.scale(42.0)) - 42.0).abs() < 1e-9);
    }

    #[test]
    fn flat_series_gets_a_floor_scale() {
        let s = Scaler::fit(&[5.0; 100]);
        assert!(s.scale >= 5e-3, "{s:?}");
        assert_eq!(Scaler::fit(&[]).scale, 1.0);
    }

    #[test]
    fn quantile_interpolates() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile_sorted(&v, 0.0), 1.0);
        assert_eq!(quantile_sorted(&v, 1.0), 4.0);
        assert!((quantile_sorted(&v, 0.5) - 2.5).abs() < 1e-12);
    }

    #[test]
    fn time_features_have_daily_and_weekly_period() {
        let a = Feature::DaySin.compute(1_000, 0.0);
        let b = Feature::DaySin.compute(1_000 + 86_400, 0.0);
        assert!((a - b).abs() < 1e-6);
        let c = Feature::WeekCos.compute(1_000, 0.0);
        let d = Feature::WeekCos.compute(1_000 + 7 * 86_400, 0.0);
        assert!((c - d).abs() < 1e-6);
        assert_eq!(Feature::Value.compute(5, 1.5), 1.5);
    }

    #[test]
    fn joint_rows_expand_the_value_column_per_input() {
        let features = Feature::DEFAULT;
        assert_eq!(columns(&features, 1), features.len());
        assert_eq!(columns(&features, 3), features.len() + 2);
        let mut joint = vec![f32::NAN; columns(&features, 3)];
        joint_input_row(&features, 1_000, &[1.0, 2.0, 3.0], &mut joint);
        let mut single = vec![f32::NAN; features.len()];
        input_row(&features, 1_000, 1.0, &mut single);
        assert_eq!(joint[..3], [1.0, 2.0, 3.0]);
        assert_eq!(joint[3..], single[1..]);
    }
}
