//! Helpers shared by the integration tests: small untrained models that honour the contract.

#![allow(dead_code)]

pub mod exporter;
pub mod feeder;
pub mod pg;
pub mod process;
pub mod relay;
pub mod serve;
pub mod stack;
pub mod telegram;
pub mod victoria;

use std::collections::BTreeMap;

use mad::model::Forecaster;
use mad::store::{ModelStore, VersionInfo};
use mad_training::contract::{Feature, ModelMeta, CONTRACT_VERSION};
use mad_training::{onnx, LstmParams};

pub const STEP: i64 = 60;
pub const WINDOW: usize = 8;
pub const HIDDEN: usize = 8;

/// Metadata for an untrained model of detector `detector`.
pub fn meta(detector: &str, default_band: f64) -> ModelMeta {
    ModelMeta {
        contract_version: CONTRACT_VERSION,
        detector: detector.into(),
        features: Feature::DEFAULT.to_vec(),
        inputs: Vec::new(),
        hidden: HIDDEN,
        layers: 1,
        step_secs: STEP as u64,
        window: WINDOW,
        series: BTreeMap::new(),
        default_band,
        train_start: 0,
        train_end: 0,
        trained_at: 0,
        training: BTreeMap::new(),
    }
}

pub fn params() -> LstmParams<f32> {
    LstmParams::init(Feature::DEFAULT.len(), HIDDEN, 5)
}

pub fn model_bytes(meta: &ModelMeta) -> Vec<u8> {
    onnx::export(&params(), meta)
}

/// Asserts that `bytes`, listed as `version`, are whole and load: what a store owes after a crash.
pub fn assert_loads(bytes: &[u8], version: &VersionInfo, detector: &str) {
    assert_eq!(
        bytes.len() as u64,
        version.size_bytes,
        "listed version {} is cut short",
        version.version
    );
    Forecaster::load(bytes, &version.version, detector, None)
        .unwrap_or_else(|e| panic!("listed version {} does not load: {e}", version.version));
}

/// Stores an untrained model of `detector` as its active version, for registry tests to follow.
pub async fn put_untrained(
    store: &dyn ModelStore,
    detector: &str,
    default_band: f64,
) -> VersionInfo {
    let meta = meta(detector, default_band);
    store
        .put(&model_bytes(&meta), &meta)
        .await
        .unwrap_or_else(|e| panic!("put a model of {detector}: {e}"))
}

pub fn forecaster(detector: &str, default_band: f64) -> Forecaster {
    stacked_forecaster(detector, default_band, 1)
}

/// An untrained model of `layers` stacked LSTM layers.
pub fn stacked_forecaster(detector: &str, default_band: f64, layers: usize) -> Forecaster {
    let meta = ModelMeta {
        layers,
        ..meta(detector, default_band)
    };
    let params = LstmParams::init_stacked(Feature::DEFAULT.len(), HIDDEN, layers, 5);
    Forecaster::load(&onnx::export(&params, &meta), "v1", detector, None)
        .unwrap_or_else(|e| panic!("test model must load: {e}"))
}
