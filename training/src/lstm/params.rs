//! The LSTM's parameters: stacked layers and a linear head in one flat buffer, in ONNX's
//! layout, with their initialisation and the side-by-side merge that makes an ensemble one
//! model.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::real::Real;
use super::{check_len, ShapeError, GATES};

/// Stacked LSTM layers and a linear head in one flat buffer (so the optimiser sees a single
/// slice). Layer `l` holds W `[4H, F_l]` (`F_0` = features, `H` above), R `[4H, H]`, Wb `[4H]`,
/// Rb `[4H]`; the head weight `[outputs, H]` and bias `[outputs]` follow the last layer.
/// Gradients use the same type and layout. One layer is the layout of a single ONNX `LSTM` node
/// plus the head.
#[derive(Debug, Clone, PartialEq)]
pub struct LstmParams<T> {
    pub(super) features: usize,
    pub(super) hidden: usize,
    pub(super) layers: usize,
    pub(super) outputs: usize,
    pub(super) data: Vec<T>,
}

/// Where one layer's tensors sit in [`LstmParams`]' buffer.
#[derive(Debug, Clone, Copy)]
pub(super) struct LayerOffsets {
    pub(super) w: usize,
    pub(super) r: usize,
    pub(super) wb: usize,
    pub(super) rb: usize,
    pub(super) end: usize,
}

impl<T: Real> LstmParams<T> {
    /// All-zero single-layer parameters (also the shape of a gradient buffer).
    pub fn zeros(features: usize, hidden: usize) -> Self {
        Self::zeros_stacked(features, hidden, 1)
    }

    /// All-zero parameters for `layers` stacked layers (at least one).
    pub fn zeros_stacked(features: usize, hidden: usize, layers: usize) -> Self {
        Self::zeros_multi(features, hidden, layers, 1)
    }

    /// All-zero parameters with `outputs` forecasts per step (at least one).
    pub fn zeros_multi(features: usize, hidden: usize, layers: usize, outputs: usize) -> Self {
        let (layers, outputs) = (layers.max(1), outputs.max(1));
        let len = Self::len_for(features, hidden, layers, outputs);
        LstmParams {
            features,
            hidden,
            layers,
            outputs,
            data: vec![T::ZERO; len],
        }
    }

    /// Single-layer [`LstmParams::init_stacked`].
    pub fn init(features: usize, hidden: usize, seed: u64) -> Self {
        Self::init_stacked(features, hidden, 1, seed)
    }

    /// Small uniform initialisation (±1/√H) with the forget-gate bias at 1, which keeps memory
    /// open early in training so gradients reach back through the window. The first layer and
    /// the head are drawn first, so a one-layer model is the same for the same seed whatever
    /// the code's stacking support.
    pub fn init_stacked(features: usize, hidden: usize, layers: usize, seed: u64) -> Self {
        Self::init_multi(features, hidden, layers, 1, seed)
    }

    /// [`LstmParams::init_stacked`] with `outputs` forecasts per step.
    pub fn init_multi(
        features: usize,
        hidden: usize,
        layers: usize,
        outputs: usize,
        seed: u64,
    ) -> Self {
        let mut params = Self::zeros_multi(features, hidden, layers, outputs);
        let mut rng = SmallRng::seed_from_u64(seed);
        let bound = 1.0 / (hidden.max(1) as f64).sqrt();
        let mut uniform = |values: &mut [T]| {
            for v in values {
                *v = T::from_f64(rng.gen_range(-bound..bound));
            }
        };
        let first = params.layer_offsets(0);
        uniform(&mut params.data[first.w..first.wb]);
        let head = params.head_offset();
        uniform(&mut params.data[head..head + params.outputs * hidden]);
        for layer in 1..params.layers {
            let o = params.layer_offsets(layer);
            uniform(&mut params.data[o.w..o.wb]);
        }
        for layer in 0..params.layers {
            let o = params.layer_offsets(layer);
            for v in &mut params.data[o.wb + 2 * hidden..o.wb + 3 * hidden] {
                *v = T::ONE;
            }
        }
        params
    }

    fn layer_len(inputs: usize, hidden: usize) -> usize {
        GATES * hidden * (inputs + hidden) + 2 * GATES * hidden
    }

    fn len_for(features: usize, hidden: usize, layers: usize, outputs: usize) -> usize {
        Self::layer_len(features, hidden)
            + (layers - 1) * Self::layer_len(hidden, hidden)
            + outputs * (hidden + 1)
    }

    pub fn features(&self) -> usize {
        self.features
    }
    pub fn hidden(&self) -> usize {
        self.hidden
    }
    pub fn layers(&self) -> usize {
        self.layers
    }
    /// Forecasts per step.
    pub fn outputs(&self) -> usize {
        self.outputs
    }
    /// Inputs of layer `layer`: the features for the first, the hidden size above.
    pub fn layer_inputs(&self, layer: usize) -> usize {
        if layer == 0 {
            self.features
        } else {
            self.hidden
        }
    }
    pub fn as_slice(&self) -> &[T] {
        &self.data
    }
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.data
    }

    pub(super) fn layer_offsets(&self, layer: usize) -> LayerOffsets {
        let (f, h) = (self.features, self.hidden);
        let w = if layer == 0 {
            0
        } else {
            Self::layer_len(f, h) + (layer - 1) * Self::layer_len(h, h)
        };
        let r = w + GATES * h * self.layer_inputs(layer);
        let wb = r + GATES * h * h;
        let rb = wb + GATES * h;
        LayerOffsets {
            w,
            r,
            wb,
            rb,
            end: rb + GATES * h,
        }
    }

    pub(super) fn head_offset(&self) -> usize {
        self.layer_offsets(self.layers - 1).end
    }

    /// Input weights of `layer`, `[4H, F_layer]`.
    pub fn w(&self, layer: usize) -> &[T] {
        let o = self.layer_offsets(layer);
        &self.data[o.w..o.r]
    }
    /// Recurrent weights of `layer`, `[4H, H]`.
    pub fn r(&self, layer: usize) -> &[T] {
        let o = self.layer_offsets(layer);
        &self.data[o.r..o.wb]
    }
    /// Input bias of `layer`, `[4H]`.
    pub fn wb(&self, layer: usize) -> &[T] {
        let o = self.layer_offsets(layer);
        &self.data[o.wb..o.rb]
    }
    /// Recurrent bias of `layer`, `[4H]`.
    pub fn rb(&self, layer: usize) -> &[T] {
        let o = self.layer_offsets(layer);
        &self.data[o.rb..o.end]
    }
    /// Head weight `[outputs, H]`.
    pub fn head_w(&self) -> &[T] {
        let head = self.head_offset();
        &self.data[head..head + self.outputs * self.hidden]
    }
    /// Head bias `[outputs]`.
    pub fn head_b(&self) -> &[T] {
        let bias = self.head_offset() + self.outputs * self.hidden;
        &self.data[bias..bias + self.outputs]
    }

    /// One model that computes the mean of `members`' forecasts: their units side by side in
    /// one wider LSTM (hidden size the members' sum), each reading only its own units on the
    /// recurrent path and between layers (block-diagonal weights), and a head that averages. An
    /// ensemble is then still one LSTM and one head, so the ONNX contract and the exporter's
    /// state are unchanged. The members must share one shape.
    pub fn side_by_side(members: &[LstmParams<T>]) -> Result<LstmParams<T>, ShapeError> {
        let first = members.first().ok_or(ShapeError {
            what: "ensemble members",
            expected: 1,
            actual: 0,
        })?;
        let (f, h, layers, outputs) = (first.features, first.hidden, first.layers, first.outputs);
        for m in members {
            check_len("ensemble member features", f, m.features)?;
            check_len("ensemble member hidden size", h, m.hidden)?;
            check_len("ensemble member layers", layers, m.layers)?;
            check_len("ensemble member outputs", outputs, m.outputs)?;
        }
        let k = members.len();
        let wide = k * h;
        let mut merged = Self::zeros_multi(f, wide, layers, outputs);
        // Row `gate·H + j` of member `m` is row `gate·wide + m·H + j` of the merged model.
        let row = |m: usize, member_row: usize| (member_row / h) * wide + m * h + member_row % h;
        for layer in 0..layers {
            let into = merged.layer_offsets(layer);
            let inputs = merged.layer_inputs(layer);
            for (m, member) in members.iter().enumerate() {
                let from = member.layer_offsets(layer);
                let member_inputs = member.layer_inputs(layer);
                // Layer 0 reads the shared features; above it, a member reads its own units.
                let column_offset = if layer == 0 { 0 } else { m * h };
                for r in 0..GATES * h {
                    let to = row(m, r);
                    let w = into.w + to * inputs + column_offset;
                    merged.data[w..w + member_inputs].copy_from_slice(
                        &member.data[from.w + r * member_inputs..][..member_inputs],
                    );
                    let r_to = into.r + to * wide + m * h;
                    merged.data[r_to..r_to + h]
                        .copy_from_slice(&member.data[from.r + r * h..][..h]);
                    merged.data[into.wb + to] = member.data[from.wb + r];
                    merged.data[into.rb + to] = member.data[from.rb + r];
                }
            }
        }
        let share = T::from_f64(1.0 / k as f64);
        let head = merged.head_offset();
        for (m, member) in members.iter().enumerate() {
            for o in 0..outputs {
                for j in 0..h {
                    merged.data[head + o * wide + m * h + j] = member.head_w()[o * h + j] * share;
                }
                merged.data[head + outputs * wide + o] += member.head_b()[o] * share;
            }
        }
        Ok(merged)
    }

    /// The same parameters in another precision.
    pub fn convert<U: Real>(&self) -> LstmParams<U> {
        LstmParams {
            features: self.features,
            hidden: self.hidden,
            layers: self.layers,
            outputs: self.outputs,
            data: self.data.iter().map(|v| U::from_f64(v.to_f64())).collect(),
        }
    }
}
