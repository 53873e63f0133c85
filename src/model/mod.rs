//! Running models: finding ONNX Runtime, and loading ONNX forecasters that honour the model
//! contract (docs/model-contract.md).

mod forecaster;
mod runtime;

pub use forecaster::{Forecaster, ModelError, StepOutput};
pub use runtime::{environment, RuntimeError};
