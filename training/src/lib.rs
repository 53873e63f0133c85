//! Training for MAD's LSTM forecasters, entirely in Rust.
//!
//! History comes in as raw series; each series is scaled by its own robust scaler so one shared
//! model can serve many series (or, for a joint model, the inputs of a group are read side by
//! side and each forecast: `TrainOptions::joint`). The model is trained as a *stream* model
//! (state carried across the whole series) because the exporter carries LSTM state between
//! scrape cycles instead of re-running windows; training, calibration and serving must all see
//! the series the same way. Residuals on held-out data become a per-series band, so
//! `anomaly_score > 1` means the same thing for every series. The result is exported as a
//! self-contained ONNX file (standard `LSTM` operator, metadata inside) so serving needs only
//! ONNX Runtime.
//!
//! Pipeline, in [`trainer::train`]'s stages: prepare (each series on its grid, scaled, split in
//! time) → fit ([`lstm`] forward/backward + [`adam`], early stopping, ensembles; [`search`]
//! runs many fits) → calibrate (bands, and the [`weekly`] profiles the exporter goes on from)
//! → [`onnx::export`].

pub mod adam;
pub mod contract;
pub mod lstm;
pub mod onnx;
pub mod search;
pub mod trainer;
pub mod weekly;

pub use contract::*;
pub use lstm::{Dropout, LstmOutput, LstmParams, LstmTape, Real, ShapeError};
pub use trainer::{
    train, train_continuing, train_with, Continuation, Control, Progress, SeriesHistory,
    TrainError, TrainOptions, TrainedModel, CONTINUED_META_KEY, CONTINUE_LEARNING_RATE,
    CONTINUE_MAX_EPOCHS,
};
