//! MAD — Metrics Anomaly Detection.
//!
//! The crate follows the data:
//!
//! ```text
//! source (PromQL query_range) ──> train (mad-training crate: LSTM, calibration, ONNX) ──> store
//!                                                                                          │
//! source (newest points) ──> score (ONNX Runtime via model, state carried) <── model <──────┘
//!                                   │
//!                                   └──> expose (/metrics: anomaly_score, yhat, bands, mad_*)
//! ```
//!
//! - [`config`]: the YAML file, validated while parsed so errors name file, line and field.
//! - [`source`]: the Prometheus HTTP API client (chunking, retries, error bodies surfaced).
//! - [`model`]: ONNX Runtime loading and the model contract checks (docs/model-contract.md).
//! - [`score`]: per-series state (a joint model's: per group), batched inference, scores
//!   against calibrated bands.
//! - [`expose`]: the text exposition and the HTTP server.
//! - [`store`]: model versions behind one trait; a directory by default.
//! - [`api`]: the management API under `/api/v1/` (docs/openapi.yaml): detectors, models,
//!   anomalies, maintenance windows and retraining, on the PostgreSQL registry.
//! - [`rules`]: the vmalert/Prometheus alerting rules `mad rules` generates from the config.
//! - [`train`] and [`serve`]: the two subcommands that wire the pieces together.
//! - [`backtest`]: detection quality on recorded, labelled data, through the same scorer as
//!   `mad serve` (NAB's scorer, F1 without point-adjust, attribution).
//! - [`chart`]: PNG charts of scored series (relay photos, backtest plots).
//! - [`timestamp`] and [`text`]: times as RFC 3339 text, safe for any timestamp read from
//!   outside, and outside text cut to fit a message or a caption.
//! - [`synth`] and [`demo`]: synthetic metrics with known incidents, and the end-to-end demo
//!   against a real VictoriaMetrics that the tests reuse.

pub mod api;
pub mod backtest;
pub mod chart;
pub mod config;
pub mod dashboards;
pub mod demo;
pub mod expose;
#[doc(hidden)]
pub mod fuzzing;
pub mod history;
pub mod model;
pub mod registry;
pub mod relay;
pub mod rules;
pub mod score;
pub mod serve;
pub mod shard;
pub mod source;
pub mod store;
pub mod synth;
pub mod text;
pub mod timestamp;
pub mod train;
