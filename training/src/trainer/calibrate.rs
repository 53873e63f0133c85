//! Bands from the best model's residuals on the calibration part, so that
//! `anomaly_score > 1` is rare on normal data for every series alike.

use std::collections::BTreeMap;

use super::fit::{run_streams, Workspace};
use super::prepare::PreparedSeries;
use super::{internal, TrainError, TrainOptions};
use crate::contract::{quantile_sorted, SeriesCalibration};
use crate::lstm::LstmParams;

/// Smallest band (scaled units): a near-perfect forecast must not make every wiggle anomalous.
pub const MIN_BAND: f64 = 0.05;
/// Smallest band in robust standard deviations of the calibration residuals: for Gaussian
/// noise, 5σ is exceeded about once in two million points.
pub const MIN_BAND_SIGMAS: f64 = 5.0;

/// Per-series bands from calibration residuals, and their median for unseen series.
pub(super) fn calibrate(
    params: &LstmParams<f32>,
    series: &[PreparedSeries],
    opts: &TrainOptions,
    ws: &mut Workspace,
) -> Result<(BTreeMap<String, SeriesCalibration>, f64), TrainError> {
    let mut streams = Vec::new();
    for (i, s) in series.iter().enumerate() {
        s.streams_for(i, &(s.validation_end..s.len()), &mut streams);
    }
    let mut residuals: Vec<Vec<Vec<f64>>> =
        series.iter().map(|s| vec![Vec::new(); s.width()]).collect();
    run_streams(
        params,
        series,
        &streams,
        ws,
        |s, target_index, input, yhat, target| {
            if target_index >= series[s].validation_end {
                residuals[s][input].push((yhat as f64 - target as f64).abs());
            }
        },
    )
    .map_err(internal)?;
    let mut calibrations = BTreeMap::new();
    let mut bands = Vec::with_capacity(series.len());
    // A joint group's input absent from the calibration part gets the typical band below.
    let mut unmeasured = Vec::new();
    for (s, per_input) in series.iter().zip(residuals) {
        for (i, mut r) in per_input.into_iter().enumerate() {
            if s.keys[i].is_empty() {
                continue;
            }
            let band = if r.is_empty() {
                unmeasured.push(s.keys[i].clone());
                f64::NAN
            } else {
                r.sort_by(f64::total_cmp);
                // A high quantile of a few thousand residuals is itself noisy; a floor in robust
                // standard deviations (1.4826 × median |r| estimates σ) keeps the band from being
                // narrower than normal noise warrants when the calibration sample happens to be
                // calm.
                let robust_sigma = 1.4826 * quantile_sorted(&r, 0.5);
                let band = (quantile_sorted(&r, opts.band_quantile) * opts.band_margin)
                    .max(MIN_BAND_SIGMAS * robust_sigma)
                    .max(MIN_BAND);
                bands.push(band);
                band
            };
            calibrations.insert(
                s.keys[i].clone(),
                SeriesCalibration {
                    scaler: s.scalers[i],
                    band,
                    range: s.ranges[i],
                    fitted_until: s.fitted_until,
                    weekly: s.weekly[i].clone(),
                },
            );
        }
    }
    bands.sort_by(f64::total_cmp);
    let typical = quantile_sorted(&bands, 0.5);
    for key in unmeasured {
        if let Some(calibration) = calibrations.get_mut(&key) {
            calibration.band = typical;
        }
    }
    Ok((calibrations, typical))
}
