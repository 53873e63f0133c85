//! What the exporter remembers about one series between cycles.

use mad_training::contract::{Scaler, ValueRange};

use super::likelihood::Normalizer;
use super::season::Season;
use super::Score;

/// A point ready to be fed: its time, raw value (interpolated if it was missing) and whether it
/// was observed (only observed points are scored).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step {
    pub(crate) ts: i64,
    pub(crate) raw: f64,
    pub(crate) observed: bool,
}

#[derive(Debug, Clone)]
pub struct SeriesState {
    pub scaler: Scaler,
    /// Calibrated half-width of the band, scaled units.
    pub band: f64,
    /// LSTM state after the last fed point, `[layers × hidden]` each (layer by layer).
    pub h: Vec<f32>,
    pub c: Vec<f32>,
    /// Scaled forecast for the point after `last_ts`.
    pub pending: Option<f32>,
    /// Timestamp and raw value of the last fed point.
    pub last_ts: i64,
    pub last_raw: f64,
    /// Points fed since the stream started; scores count only after the warm-up window.
    pub fed: usize,
    /// When the datasource last returned this series (Unix seconds).
    pub last_seen: i64,
    pub latest: Option<Score>,
    /// Turns the series' deviations into its scores (the detector's `detection.scoring`).
    pub normalizer: Normalizer,
    /// The same for the naive forecast "as the last point", where the scoring has one
    /// ([`Normalizer::for_persistence`]); the higher of the two scores is the point's.
    pub persistence: Option<Normalizer>,
    /// Points held back, not fed, while the series has no scaler of its own yet (`None` once
    /// it has): see `DetectorScorer::hold_until_fitted`.
    pub(crate) unfitted: Option<Vec<Step>>,
    /// The values seen, from the training history on ([`mod@super::novelty`]); `None` for a series
    /// the model was not trained on.
    pub range: Option<ValueRange>,
    /// The last timestamp the model was fitted to, from its calibration: points up to it are
    /// fed but neither scored nor learnt from (see `DetectorScorer::score_steps`).
    pub fitted_until: Option<i64>,
    /// The weekly profile and its likelihood, where the scoring has them
    /// ([`Season::applies`]).
    pub season: Option<Box<Season>>,
}

impl SeriesState {
    pub fn new(
        scaler: Scaler,
        band: f64,
        state_len: usize,
        normalizer: Normalizer,
        persistence: Option<Normalizer>,
    ) -> SeriesState {
        SeriesState {
            scaler,
            band,
            h: vec![0.0; state_len],
            c: vec![0.0; state_len],
            pending: None,
            last_ts: i64::MIN,
            last_raw: f64::NAN,
            fed: 0,
            last_seen: 0,
            latest: None,
            normalizer,
            persistence,
            unfitted: None,
            range: None,
            fitted_until: None,
            season: None,
        }
    }
}
