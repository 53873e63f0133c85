//! One loaded forecaster: an ONNX Runtime session plus the metadata the exporter needs.
//!
//! Everything the contract promises is checked here, at load time, including a smoke run, so a
//! broken model is refused before it replaces a working one instead of failing every cycle.

use std::sync::Mutex;

use mad_training::contract::{
    columns, Feature, ModelMeta, CONTRACT_VERSION, INPUT_C, INPUT_H, INPUT_X, META_KEY, OUTPUT_C,
    OUTPUT_H, OUTPUT_YHAT,
};
use ort::session::Session;
use ort::value::{TensorElementType, TensorRef, ValueType};

use super::runtime;
use crate::config::MAX_DURATION;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model {version} of {detector:?} rejected: {reason}")]
    Invalid {
        detector: String,
        version: String,
        reason: String,
    },
    #[error("inference failed: {0}")]
    Inference(String),
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
}

/// The outputs of one run, laid out as the contract says.
#[derive(Debug, Default, Clone)]
pub struct StepOutput {
    /// `[seq, batch, outputs]`, scaled forecasts of the next point (of every input, for a
    /// joint model).
    pub yhat: Vec<f32>,
    /// `[batch, hidden]` each: the state after the last step.
    pub h: Vec<f32>,
    pub c: Vec<f32>,
}

pub struct Forecaster {
    pub meta: ModelMeta,
    pub version: String,
    // `Session::run` needs `&mut`; one detector's cycle runs at a time anyway.
    session: Mutex<Session>,
}

impl std::fmt::Debug for Forecaster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forecaster")
            .field("detector", &self.meta.detector)
            .field("version", &self.version)
            .finish()
    }
}

impl Forecaster {
    /// Loads and checks a model. `expected_detector` guards against a model filed under the
    /// wrong name.
    pub fn load(
        onnx: &[u8],
        version: &str,
        expected_detector: &str,
        library: Option<&std::path::Path>,
    ) -> Result<Forecaster, ModelError> {
        let invalid = |reason: String| ModelError::Invalid {
            detector: expected_detector.to_string(),
            version: version.to_string(),
            reason,
        };
        let env = runtime::environment(library)?;
        let session = Session::builder(env)
            .and_then(|mut b| b.commit_from_memory(onnx))
            .map_err(|e| invalid(format!("ONNX Runtime cannot load it: {e}")))?;
        let meta_json = session
            .metadata()
            .ok()
            .and_then(|m| m.custom(META_KEY))
            .ok_or_else(|| invalid(format!("metadata key {META_KEY:?} is missing")))?;
        let meta: ModelMeta = serde_json::from_str(&meta_json)
            .map_err(|e| invalid(format!("metadata {META_KEY:?} is not valid: {e}")))?;
        check_meta(&meta, expected_detector).map_err(invalid)?;
        check_signature(&session, &meta).map_err(invalid)?;
        let forecaster = Forecaster {
            meta,
            version: version.to_string(),
            session: Mutex::new(session),
        };
        forecaster.smoke_test().map_err(invalid)?;
        Ok(forecaster)
    }

    /// Columns of a model input row.
    pub fn features(&self) -> usize {
        columns(&self.meta.features, self.outputs())
    }

    /// Forecasts per step and stream: a joint model's inputs, else one.
    pub fn outputs(&self) -> usize {
        self.meta.inputs.len().max(1)
    }

    /// Whether the model reads a group's inputs together ([`ModelMeta::inputs`]).
    pub fn is_joint(&self) -> bool {
        !self.meta.inputs.is_empty()
    }

    pub fn hidden(&self) -> usize {
        self.meta.hidden
    }

    pub fn layers(&self) -> usize {
        self.meta.layers
    }

    /// Runs `seq` steps for `batch` streams (series, or a joint model's groups). `x` is
    /// `[seq, batch, features]`, `h`/`c` are `[layers, batch, hidden]`.
    pub fn run(
        &self,
        x: &[f32],
        seq: usize,
        batch: usize,
        h: &[f32],
        c: &[f32],
    ) -> Result<StepOutput, ModelError> {
        let (f, hd, layers) = (self.features(), self.hidden(), self.layers());
        let state = layers * batch * hd;
        if x.len() != seq * batch * f || h.len() != state || c.len() != state {
            return Err(ModelError::Inference(format!(
                "input sizes x={} h={} c={} do not match seq={seq} batch={batch} features={f} \
                 layers={layers} hidden={hd}",
                x.len(),
                h.len(),
                c.len()
            )));
        }
        let fail = |e: ort::Error| ModelError::Inference(e.to_string());
        let x = TensorRef::from_array_view(([seq, batch, f], x)).map_err(fail)?;
        let h0 = TensorRef::from_array_view(([layers, batch, hd], h)).map_err(fail)?;
        let c0 = TensorRef::from_array_view(([layers, batch, hd], c)).map_err(fail)?;
        let mut session = self
            .session
            .lock()
            .map_err(|_| ModelError::Inference("session lock poisoned".into()))?;
        let outputs = session
            .run(ort::inputs![INPUT_X => x, INPUT_H => h0, INPUT_C => c0])
            .map_err(fail)?;
        let extract = |name: &str, expected: usize| -> Result<Vec<f32>, ModelError> {
            let (_, data) = outputs[name].try_extract_tensor::<f32>().map_err(fail)?;
            if data.len() != expected {
                return Err(ModelError::Inference(format!(
                    "output {name:?} has {} values, expected {expected}",
                    data.len()
                )));
            }
            Ok(data.to_vec())
        };
        Ok(StepOutput {
            yhat: extract(OUTPUT_YHAT, seq * batch * self.outputs())?,
            h: extract(OUTPUT_H, state)?,
            c: extract(OUTPUT_C, state)?,
        })
    }

    fn smoke_test(&self) -> Result<(), String> {
        let (seq, batch) = (2, 2);
        let x = vec![0.1f32; seq * batch * self.features()];
        let state = vec![0.0f32; self.layers() * batch * self.hidden()];
        let out = self
            .run(&x, seq, batch, &state, &state)
            .map_err(|e| format!("a test run failed: {e}"))?;
        if out
            .yhat
            .iter()
            .chain(&out.h)
            .chain(&out.c)
            .any(|v| !v.is_finite())
        {
            return Err("a test run produced non-finite outputs".into());
        }
        Ok(())
    }
}

/// Far beyond what `mad train` writes; low enough that a crafted model file cannot make the
/// smoke test allocate without bound or the scorer's sizes overflow.
const MAX_HIDDEN: usize = 1 << 16;
const MAX_LAYERS: usize = 64;
const MAX_WINDOW: usize = 1 << 20;

fn check_meta(meta: &ModelMeta, expected_detector: &str) -> Result<(), String> {
    if meta.contract_version != CONTRACT_VERSION {
        return Err(format!(
            "contract version {} is not supported (this build reads {CONTRACT_VERSION})",
            meta.contract_version
        ));
    }
    if meta.detector != expected_detector {
        return Err(format!("it was trained for detector {:?}", meta.detector));
    }
    if meta.features.is_empty()
        || meta.hidden == 0
        || meta.layers == 0
        || meta.step_secs == 0
        || meta.window == 0
    {
        return Err("features, hidden, layers, step_secs and window must all be non-zero".into());
    }
    if meta.hidden > MAX_HIDDEN || meta.layers > MAX_LAYERS || meta.window > MAX_WINDOW {
        return Err(format!(
            "hidden {}, layers {} or window {} is beyond what this exporter loads \
             ({MAX_HIDDEN}, {MAX_LAYERS}, {MAX_WINDOW})",
            meta.hidden, meta.layers, meta.window
        ));
    }
    if meta.step_secs > MAX_DURATION.as_secs() {
        return Err(format!("step_secs {} is beyond 100 years", meta.step_secs));
    }
    if ![meta.train_start, meta.train_end, meta.trained_at]
        .into_iter()
        .all(crate::timestamp::in_range)
        || meta.train_start > meta.train_end
    {
        return Err(format!(
            "train_start {}, train_end {} and trained_at {} must be Unix seconds up to year \
             9999, the start not after the end",
            meta.train_start, meta.train_end, meta.trained_at
        ));
    }
    if !meta.features.contains(&Feature::Value) {
        return Err("features must include \"value\"".into());
    }
    let mut inputs = meta.inputs.clone();
    inputs.sort();
    inputs.dedup();
    if inputs.len() != meta.inputs.len() || inputs.iter().any(String::is_empty) {
        return Err(format!(
            "inputs {:?} must be distinct and named",
            meta.inputs
        ));
    }
    let band_ok = |b: f64| b.is_finite() && b > 0.0;
    if !band_ok(meta.default_band) {
        return Err(format!(
            "default_band {} is not positive",
            meta.default_band
        ));
    }
    for (key, s) in &meta.series {
        if !band_ok(s.band) || !band_ok(s.scaler.scale) || !s.scaler.center.is_finite() {
            return Err(format!(
                "calibration of series {key} is not usable: band {}, scaler {:?}",
                s.band, s.scaler
            ));
        }
        if let Some(seed) = &s.weekly {
            seed.check()
                .map_err(|why| format!("weekly profile of series {key} is not usable: {why}"))?;
        }
    }
    Ok(())
}

/// Checks names, element types and the static dimensions the model declares.
fn check_signature(session: &Session, meta: &ModelMeta) -> Result<(), String> {
    let width = meta.inputs.len().max(1);
    let (f, hd, layers) = (
        columns(&meta.features, width) as i64,
        meta.hidden as i64,
        meta.layers as i64,
    );
    let expect = |outlets: &[ort::value::Outlet], name: &str, dims: &[Option<i64>], kind: &str| {
        let outlet = outlets
            .iter()
            .find(|o| o.name() == name)
            .ok_or_else(|| format!("{kind} {name:?} is missing"))?;
        match outlet.dtype() {
            ValueType::Tensor { ty, shape, .. } => {
                if *ty != TensorElementType::Float32 {
                    return Err(format!("{kind} {name:?} is {ty:?}, expected float32"));
                }
                if shape.len() != dims.len() {
                    return Err(format!(
                        "{kind} {name:?} has rank {}, expected {}",
                        shape.len(),
                        dims.len()
                    ));
                }
                for (i, (actual, wanted)) in shape.iter().zip(dims).enumerate() {
                    if let Some(w) = wanted {
                        if *actual >= 0 && actual != w {
                            return Err(format!(
                                "{kind} {name:?} dimension {i} is {actual}, expected {w}"
                            ));
                        }
                    }
                }
                Ok(())
            }
            other => Err(format!("{kind} {name:?} is {other:?}, expected a tensor")),
        }
    };
    let inputs = session.inputs();
    expect(inputs, INPUT_X, &[None, None, Some(f)], "input")?;
    expect(inputs, INPUT_H, &[Some(layers), None, Some(hd)], "input")?;
    expect(inputs, INPUT_C, &[Some(layers), None, Some(hd)], "input")?;
    if inputs.len() != 3 {
        return Err(format!("expected exactly 3 inputs, found {}", inputs.len()));
    }
    let outputs = session.outputs();
    let yhat: &[Option<i64>] = if meta.inputs.is_empty() {
        &[None, None]
    } else {
        &[None, None, Some(meta.inputs.len() as i64)]
    };
    expect(outputs, OUTPUT_YHAT, yhat, "output")?;
    expect(outputs, OUTPUT_H, &[Some(layers), None, Some(hd)], "output")?;
    expect(outputs, OUTPUT_C, &[Some(layers), None, Some(hd)], "output")?;
    Ok(())
}
