//! Training's forward and backward passes: a tape of one pass's activations, kept for
//! backpropagation, with the scratch buffers reused from call to call. Each layer's loops are
//! built three times (baseline x86-64, AVX2, AVX-512) and chosen at run time; all three compute
//! the same bits.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::params::LstmParams;
use super::products::{
    add_column_sums, dot, gemm, step_product, transpose, transposed_product, MatRef,
};
#[cfg(target_arch = "x86_64")]
use super::products::{vectors, Vectors};
use super::real::{Real, UnitStep};
use super::{check_len, ShapeError, GATES, NO_KERNEL};
#[cfg(target_arch = "x86_64")]
use super::{AVX2_KERNEL, AVX512_KERNEL};

/// One stream's gradients at its gates (`i, o, f, g` activated, `H` each) at one step, from
/// its previous cell, `tanh` of its cell, the gradient arriving from the layer above and the one
/// carried back from the next step (`dh`); `dc` carries the cell's gradient back one step. Every
/// slice is an argument of its own (not in a tuple or struct) so the compiler knows they do not
/// overlap, and vectorises the loop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gate_gradients<T: Real>(
    gates: &[T],
    cell_prev: &[T],
    tanh_c: &[T],
    above: &[T],
    dh: &[T],
    dc: &mut [T],
    di: &mut [T],
    d_o: &mut [T],
    df: &mut [T],
    dg: &mut [T],
) {
    let h = dc.len();
    let (i_gate, rest) = gates.split_at(h);
    let (o_gate, rest) = rest.split_at(h);
    let (f_gate, g_gate) = rest.split_at(h);
    let (cell_prev, tanh_c, above, dh) = (&cell_prev[..h], &tanh_c[..h], &above[..h], &dh[..h]);
    let (g_gate, di, d_o, df, dg) = (
        &g_gate[..h],
        &mut di[..h],
        &mut d_o[..h],
        &mut df[..h],
        &mut dg[..h],
    );
    for k in 0..h {
        let (i, o, fg, gg, tc) = (i_gate[k], o_gate[k], f_gate[k], g_gate[k], tanh_c[k]);
        let dh_k = dh[k] + above[k];
        let dc_k = dc[k] + dh_k * o * (T::ONE - tc * tc);
        di[k] = dc_k * gg * i * (T::ONE - i);
        d_o[k] = dh_k * tc * o * (T::ONE - o);
        df[k] = dc_k * cell_prev[k] * fg * (T::ONE - fg);
        dg[k] = dc_k * i * (T::ONE - gg * gg);
        dc[k] = dc_k * fg;
    }
}

/// Dropout while training: each unit of a layer's input from the layer below, and of the
/// head's input, is zeroed with probability `rate` (the rest scaled by `1 / (1 - rate)`), so at
/// inference (no dropout) the expected activations match. The recurrent path is left alone, as
/// in PyTorch's `nn.LSTM`, so the carried state is the one serving sees. `seed` fixes the masks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub rate: f64,
    pub seed: u64,
}

impl<T: Real> LstmParams<T> {
    /// Runs `seq` steps for `batch` streams from state `h0`, `c0` (`[layers, batch, H]`); `x`
    /// is `[seq, batch, F]`. Allocates; loops should keep an [`LstmTape`] instead.
    pub fn forward(
        &self,
        x: &[T],
        seq: usize,
        batch: usize,
        h0: &[T],
        c0: &[T],
    ) -> Result<LstmOutput<T>, ShapeError> {
        let mut tape = LstmTape::new();
        tape.forward(self, x, seq, batch, h0, c0)?;
        let state = self.layers * batch * self.hidden;
        let (mut h, mut c) = (vec![T::ZERO; state], vec![T::ZERO; state]);
        tape.copy_final_state(&mut h, &mut c)?;
        Ok(LstmOutput {
            yhat: tape.yhat().to_vec(),
            h,
            c,
        })
    }
}

impl LstmParams<f32> {
    /// The f32 forward pass that ONNX Runtime's `LSTM` must reproduce.
    pub fn forward_f32(
        &self,
        x: &[f32],
        seq: usize,
        batch: usize,
        h0: &[f32],
        c0: &[f32],
    ) -> Result<LstmOutput<f32>, ShapeError> {
        self.forward(x, seq, batch, h0, c0)
    }
}

/// Result of [`LstmParams::forward`]: `yhat` `[seq, batch, outputs]`, final `h` and `c`
/// `[layers, batch, H]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LstmOutput<T> {
    pub yhat: Vec<T>,
    pub h: Vec<T>,
    pub c: Vec<T>,
}

/// One batch row's forward step through [`Real::units_avx512`] when the `KERNEL` is AVX-512's;
/// false if it was left to the generic code.
#[inline(always)]
fn kernel_units<T: Real, const KERNEL: usize>(gates: &mut [T], step: &mut UnitStep<'_, T>) -> bool {
    #[cfg(target_arch = "x86_64")]
    if KERNEL == AVX512_KERNEL {
        // SAFETY: `KERNEL` is set only by callers compiled for (and run on) its instructions.
        return unsafe { T::units_avx512(gates, step) };
    }
    let _ = (gates, step);
    false
}

/// One layer's activations of the last forward pass, plus its scratch buffers.
#[derive(Debug, Default)]
pub(super) struct LayerTape<T> {
    /// The layer's input `[seq, batch, inputs]` (after dropout, for layers above the first).
    input: Vec<T>,
    inputs: usize,
    /// Activated gates `[seq, batch, 4H]`.
    gates: Vec<T>,
    /// Hidden and cell states `[seq + 1, batch, H]`; index 0 is the initial state.
    h: Vec<T>,
    c: Vec<T>,
    /// `tanh(c_t)` `[seq, batch, H]`.
    tanh_c: Vec<T>,
    /// Each step's input and previous output side by side, `[seq, batch, inputs + H]`.
    xh: Vec<T>,
    /// `[W; R]` transposed, `[inputs + H, 4H]`.
    weights_transposed: Vec<T>,
    /// Dropout mask applied to `input` (empty: none).
    mask: Vec<T>,
    dgates: Vec<T>,
    /// `[dW, dR]` side by side and transposed, `[inputs + H, 4H]`.
    dweights: Vec<T>,
    dh: Vec<T>,
    dc: Vec<T>,
}

/// Activations of the last forward pass, kept for backpropagation, plus scratch buffers.
/// Reusing one tape across calls avoids allocating inside the training loop.
#[derive(Debug, Default)]
pub struct LstmTape<T> {
    seq: usize,
    batch: usize,
    features: usize,
    hidden: usize,
    layers: Vec<LayerTape<T>>,
    /// Dropout mask on the head's input `[seq, batch, H]` (empty: none).
    head_mask: Vec<T>,
    /// The top layer's output at one step under the head's dropout mask.
    masked_hidden: Vec<T>,
    yhat: Vec<T>,
    /// Gradient arriving at the current layer's outputs `[seq, batch, H]` from above.
    from_above: Vec<T>,
}

fn resize<T: Real>(buffer: &mut Vec<T>, len: usize) {
    buffer.clear();
    buffer.resize(len, T::ZERO);
}

/// Sizes a buffer that the caller overwrites whole, without zeroing what it held: the tape's
/// largest buffers are rewritten on every call, and clearing them cost a twentieth of an epoch.
fn reuse<T: Real>(buffer: &mut Vec<T>, len: usize) {
    buffer.resize(len, T::ZERO);
}

/// Fills `mask` with inverted-dropout factors: 0 with probability `rate`, else `1 / (1 - rate)`.
pub(super) fn fill_mask<T: Real>(mask: &mut Vec<T>, len: usize, rate: f64, rng: &mut SmallRng) {
    let keep = T::from_f64(1.0 / (1.0 - rate));
    mask.clear();
    mask.extend((0..len).map(|_| {
        if rng.gen::<f64>() < rate {
            T::ZERO
        } else {
            keep
        }
    }));
}

impl<T: Real> LayerTape<T> {
    /// Forward pass of one layer over `self.input`, from state `h0`, `c0` (`[batch, H]`).
    fn forward(
        &mut self,
        params: &LstmParams<T>,
        layer: usize,
        seq: usize,
        batch: usize,
        h0: &[T],
        c0: &[T],
    ) {
        #[cfg(target_arch = "x86_64")]
        match vectors() {
            // SAFETY: the CPU has the features each variant is compiled for.
            Vectors::Avx512 => unsafe { self.forward_avx512(params, layer, seq, batch, h0, c0) },
            Vectors::Avx2 => unsafe { self.forward_wide(params, layer, seq, batch, h0, c0) },
            Vectors::Baseline => self.forward_steps::<NO_KERNEL>(params, layer, seq, batch, h0, c0),
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.forward_steps::<NO_KERNEL>(params, layer, seq, batch, h0, c0)
    }

    /// [`Self::forward_steps`] compiled for AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA ([`vectors`]).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn forward_wide(
        &mut self,
        params: &LstmParams<T>,
        layer: usize,
        seq: usize,
        batch: usize,
        h0: &[T],
        c0: &[T],
    ) {
        self.forward_steps::<AVX2_KERNEL>(params, layer, seq, batch, h0, c0)
    }

    /// [`Self::forward_steps`] compiled for AVX-512, its products in the AVX-512 kernel.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and AVX-512F ([`vectors`]).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,avx512f")]
    unsafe fn forward_avx512(
        &mut self,
        params: &LstmParams<T>,
        layer: usize,
        seq: usize,
        batch: usize,
        h0: &[T],
        c0: &[T],
    ) {
        self.forward_steps::<AVX512_KERNEL>(params, layer, seq, batch, h0, c0)
    }

    #[inline(always)]
    fn forward_steps<const KERNEL: usize>(
        &mut self,
        params: &LstmParams<T>,
        layer: usize,
        seq: usize,
        batch: usize,
        h0: &[T],
        c0: &[T],
    ) {
        let (f, h) = (self.inputs, params.hidden);
        let g = GATES * h;
        let bh = batch * h;
        reuse(&mut self.gates, seq * batch * g);
        reuse(&mut self.h, (seq + 1) * bh);
        reuse(&mut self.c, (seq + 1) * bh);
        reuse(&mut self.tanh_c, seq * bh);
        self.h[..bh].copy_from_slice(h0);
        self.c[..bh].copy_from_slice(c0);

        // One product per step: [x_t, h_{t-1}] · [W; R]^T onto the biases, so a step's gates
        // stay in cache from the bias to the activations. `[W; R]` is transposed once per call.
        let fh = f + h;
        reuse(&mut self.xh, seq * batch * fh);
        reuse(&mut self.weights_transposed, fh * g);
        let (w_t, r_t) = self.weights_transposed.split_at_mut(f * g);
        transpose(params.w(layer), g, f, w_t);
        transpose(params.r(layer), g, h, r_t);
        let (wb, rb) = (params.wb(layer), params.rb(layer));

        for t in 0..seq {
            let gates_t = &mut self.gates[t * batch * g..(t + 1) * batch * g];
            for row in gates_t.chunks_exact_mut(g) {
                for ((v, &a), &b) in row.iter_mut().zip(wb).zip(rb) {
                    *v = a + b;
                }
            }
            let xh_t = &mut self.xh[t * batch * fh..(t + 1) * batch * fh];
            let x_t = self.input[t * batch * f..(t + 1) * batch * f].chunks_exact(f);
            let h_prev = self.h[t * bh..(t + 1) * bh].chunks_exact(h);
            for ((row, x_row), h_row) in xh_t.chunks_exact_mut(fh).zip(x_t).zip(h_prev) {
                row[..f].copy_from_slice(x_row);
                row[f..].copy_from_slice(h_row);
            }
            step_product::<T, KERNEL>(
                xh_t,
                &self.weights_transposed,
                gates_t,
                (batch, fh, g),
                true,
            );
            let h_next = &mut self.h[(t + 1) * bh..(t + 2) * bh];
            let (c_past, c_future) = self.c.split_at_mut((t + 1) * bh);
            let c_prev = &c_past[t * bh..];
            let c_next = &mut c_future[..bh];
            let tanh_c = &mut self.tanh_c[t * bh..(t + 1) * bh];
            for b in 0..batch {
                let row = &mut gates_t[b * g..(b + 1) * g];
                let units = b * h..(b + 1) * h;
                let mut step = UnitStep {
                    cell_prev: &c_prev[units.clone()],
                    cell: &mut c_next[units.clone()],
                    tanh_c: &mut tanh_c[units.clone()],
                    hidden: &mut h_next[units],
                };
                if kernel_units::<T, KERNEL>(row, &mut step) {
                    continue;
                }
                let (sigmoid_gates, candidate) = row.split_at_mut(3 * h);
                sigmoid_gates.iter_mut().for_each(|v| *v = v.sigmoid());
                candidate.iter_mut().for_each(|v| *v = v.tanh());
                let (i_gate, rest) = row.split_at(h);
                let (o_gate, rest) = rest.split_at(h);
                let (f_gate, g_gate) = rest.split_at(h);
                let UnitStep {
                    cell_prev,
                    cell,
                    tanh_c: tc,
                    hidden: hidden_out,
                } = step;
                for k in 0..h {
                    cell[k] = f_gate[k] * cell_prev[k] + i_gate[k] * g_gate[k];
                }
                for (t, &c) in tc.iter_mut().zip(cell.iter()) {
                    *t = c.tanh();
                }
                for k in 0..h {
                    hidden_out[k] = o_gate[k] * tc[k];
                }
            }
        }
    }

    /// Backpropagation through this layer's steps, given the gradient at its outputs
    /// (`from_above`, `[seq, batch, H]`). Writes the layer's parameter gradients into `grads`;
    /// when `to_below` is given, writes there the gradient at the layer's input (before its
    /// dropout mask, i.e. at the outputs of the layer below).
    fn backward(
        &mut self,
        params: &LstmParams<T>,
        layer: usize,
        shape: (usize, usize),
        from_above: &[T],
        grads: &mut LstmParams<T>,
        to_below: Option<&mut Vec<T>>,
    ) {
        #[cfg(target_arch = "x86_64")]
        match vectors() {
            // SAFETY: the CPU has the features each variant is compiled for.
            Vectors::Avx512 => unsafe {
                self.backward_avx512(params, layer, shape, from_above, grads, to_below)
            },
            Vectors::Avx2 => unsafe {
                self.backward_wide(params, layer, shape, from_above, grads, to_below)
            },
            Vectors::Baseline => {
                self.backward_steps::<NO_KERNEL>(params, layer, shape, from_above, grads, to_below)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.backward_steps::<NO_KERNEL>(params, layer, shape, from_above, grads, to_below)
    }

    /// [`Self::backward_steps`] compiled for AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA ([`vectors`]).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn backward_wide(
        &mut self,
        params: &LstmParams<T>,
        layer: usize,
        shape: (usize, usize),
        from_above: &[T],
        grads: &mut LstmParams<T>,
        to_below: Option<&mut Vec<T>>,
    ) {
        self.backward_steps::<AVX2_KERNEL>(params, layer, shape, from_above, grads, to_below)
    }

    /// [`Self::backward_steps`] compiled for AVX-512, its products in the AVX-512 kernel.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and AVX-512F ([`vectors`]).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,avx512f")]
    unsafe fn backward_avx512(
        &mut self,
        params: &LstmParams<T>,
        layer: usize,
        shape: (usize, usize),
        from_above: &[T],
        grads: &mut LstmParams<T>,
        to_below: Option<&mut Vec<T>>,
    ) {
        self.backward_steps::<AVX512_KERNEL>(params, layer, shape, from_above, grads, to_below)
    }

    #[inline(always)]
    fn backward_steps<const KERNEL: usize>(
        &mut self,
        params: &LstmParams<T>,
        layer: usize,
        (seq, batch): (usize, usize),
        from_above: &[T],
        grads: &mut LstmParams<T>,
        to_below: Option<&mut Vec<T>>,
    ) {
        let (f, h) = (self.inputs, params.hidden);
        let g = GATES * h;
        let bh = batch * h;
        reuse(&mut self.dgates, seq * batch * g);
        resize(&mut self.dh, bh);
        resize(&mut self.dc, bh);
        let r = params.r(layer);
        for t in (0..seq).rev() {
            let gates_t = &self.gates[t * batch * g..(t + 1) * batch * g];
            let c_prev = &self.c[t * bh..(t + 1) * bh];
            let tanh_c = &self.tanh_c[t * bh..(t + 1) * bh];
            let above_t = &from_above[t * bh..(t + 1) * bh];
            let dgates_t = &mut self.dgates[t * batch * g..(t + 1) * batch * g];
            for b in 0..batch {
                let row = &gates_t[b * g..(b + 1) * g];
                let drow = &mut dgates_t[b * g..(b + 1) * g];
                let dh = &self.dh[b * h..(b + 1) * h];
                let dc = &mut self.dc[b * h..(b + 1) * h];
                let cp = &c_prev[b * h..(b + 1) * h];
                let tc = &tanh_c[b * h..(b + 1) * h];
                let above = &above_t[b * h..(b + 1) * h];
                let (di, rest) = drow.split_at_mut(h);
                let (d_o, rest) = rest.split_at_mut(h);
                let (df, dg) = rest.split_at_mut(h);
                gate_gradients(row, cp, tc, above, dh, dc, di, d_o, df, dg);
            }
            // dh_{t-1} = dgates_t · R; none into the initial state, where training truncates.
            if t > 0 {
                step_product::<T, KERNEL>(dgates_t, r, &mut self.dh, (batch, g, h), false);
            }
        }

        let o = grads.layer_offsets(layer);
        let rows = seq * batch;
        // [dW, dR]^T = [x, h_{t-1}]^T · dgates over all steps, in one product with the gates
        // along its rows, as wide as the kernels' tiles.
        let fh = f + h;
        reuse(&mut self.dweights, fh * g);
        transposed_product::<T, KERNEL>(&self.xh, &self.dgates, &mut self.dweights, (fh, rows, g));
        let (dw, dr) = grads.data[o.w..o.wb].split_at_mut(g * f);
        transpose(&self.dweights[..f * g], f, g, dw);
        transpose(&self.dweights[f * g..], h, g, dr);
        let (before_rb, from_rb) = grads.data.split_at_mut(o.rb);
        let wb_grad = &mut before_rb[o.wb..o.wb + g];
        add_column_sums(&self.dgates, wb_grad);
        from_rb[..g].copy_from_slice(wb_grad);

        if let Some(below) = to_below {
            reuse(below, rows * f);
            gemm(
                T::ONE,
                MatRef::row_major(&self.dgates, rows, g),
                MatRef::row_major(params.w(layer), g, f),
                T::ZERO,
                below,
            );
            if !self.mask.is_empty() {
                for (v, &m) in below.iter_mut().zip(&self.mask) {
                    *v *= m;
                }
            }
        }
    }
}

impl<T: Real> LstmTape<T> {
    pub fn new() -> Self {
        LstmTape {
            seq: 0,
            batch: 0,
            features: 0,
            hidden: 0,
            layers: Vec::new(),
            head_mask: Vec::new(),
            masked_hidden: Vec::new(),
            yhat: Vec::new(),
            from_above: Vec::new(),
        }
    }

    /// Forecasts `[seq, batch, outputs]` of the last forward pass.
    pub fn yhat(&self) -> &[T] {
        &self.yhat
    }

    /// Writes the state after the last step, `[layers, batch, H]`, into `h` and `c`.
    pub fn copy_final_state(&self, h: &mut [T], c: &mut [T]) -> Result<(), ShapeError> {
        let bh = self.batch * self.hidden;
        check_len("h [layers, batch, hidden]", self.layers.len() * bh, h.len())?;
        check_len("c [layers, batch, hidden]", self.layers.len() * bh, c.len())?;
        let last = self.seq * bh..(self.seq + 1) * bh;
        for (l, layer) in self.layers.iter().enumerate() {
            h[l * bh..(l + 1) * bh].copy_from_slice(&layer.h[last.clone()]);
            c[l * bh..(l + 1) * bh].copy_from_slice(&layer.c[last.clone()]);
        }
        Ok(())
    }

    /// Forward pass (no dropout) that records what [`LstmTape::backward`] needs.
    pub fn forward(
        &mut self,
        params: &LstmParams<T>,
        x: &[T],
        seq: usize,
        batch: usize,
        h0: &[T],
        c0: &[T],
    ) -> Result<(), ShapeError> {
        self.forward_train(params, x, (seq, batch), h0, c0, None)
    }

    /// Forward pass, with `dropout` when training. `x` is `[seq, batch, F]`, `h0`/`c0`
    /// `[layers, batch, H]`.
    pub fn forward_train(
        &mut self,
        params: &LstmParams<T>,
        x: &[T],
        (seq, batch): (usize, usize),
        h0: &[T],
        c0: &[T],
        dropout: Option<Dropout>,
    ) -> Result<(), ShapeError> {
        let (f, h, layers) = (params.features, params.hidden, params.layers);
        check_len("x [seq, batch, features]", seq * batch * f, x.len())?;
        check_len("h0 [layers, batch, hidden]", layers * batch * h, h0.len())?;
        check_len("c0 [layers, batch, hidden]", layers * batch * h, c0.len())?;
        self.seq = seq;
        self.batch = batch;
        self.features = f;
        self.hidden = h;
        let bh = batch * h;
        let mut rng = dropout.map(|d| (d.rate, SmallRng::seed_from_u64(d.seed)));
        self.layers.resize_with(layers, LayerTape::default);
        for l in 0..layers {
            let (below, rest) = self.layers.split_at_mut(l);
            let layer = &mut rest[0];
            layer.inputs = params.layer_inputs(l);
            layer.input.clear();
            layer.mask.clear();
            match below.last() {
                None => layer.input.extend_from_slice(x),
                Some(prev) => {
                    layer.input.extend_from_slice(&prev.h[bh..]);
                    if let Some((rate, rng)) = rng.as_mut() {
                        fill_mask(&mut layer.mask, layer.input.len(), *rate, rng);
                        for (v, &m) in layer.input.iter_mut().zip(&layer.mask) {
                            *v *= m;
                        }
                    }
                }
            }
            let state = l * bh..(l + 1) * bh;
            layer.forward(params, l, seq, batch, &h0[state.clone()], &c0[state]);
        }

        self.head_mask.clear();
        if let Some((rate, rng)) = rng.as_mut() {
            fill_mask(&mut self.head_mask, seq * bh, *rate, rng);
        }
        let top = &self.layers[layers - 1];
        let (head_w, head_b, outputs) = (params.head_w(), params.head_b(), params.outputs);
        reuse(&mut self.yhat, seq * batch * outputs);
        for (slot, y_out) in self.yhat.chunks_exact_mut(outputs).enumerate() {
            let hidden_out = &top.h[bh + slot * h..bh + (slot + 1) * h];
            let mask =
                (!self.head_mask.is_empty()).then(|| &self.head_mask[slot * h..(slot + 1) * h]);
            let hidden_out = match mask {
                None => hidden_out,
                Some(mask) => {
                    self.masked_hidden.clear();
                    let masked = hidden_out.iter().zip(mask).map(|(&v, &m)| v * m);
                    self.masked_hidden.extend(masked);
                    &self.masked_hidden
                }
            };
            for (o, y_o) in y_out.iter_mut().enumerate() {
                *y_o = head_b[o] + dot(hidden_out, &head_w[o * h..(o + 1) * h]);
            }
        }
        Ok(())
    }

    /// Backpropagation through the steps of the last forward pass, given `dL/dyhat`
    /// (`[seq, batch, outputs]`). Writes (not accumulates) all parameter gradients into `grads`.
    /// Gradients into the initial state are dropped: training truncates there.
    pub fn backward(
        &mut self,
        params: &LstmParams<T>,
        dyhat: &[T],
        grads: &mut LstmParams<T>,
    ) -> Result<(), ShapeError> {
        let (seq, batch, h) = (self.seq, self.batch, self.hidden);
        check_len("params features", self.features, params.features)?;
        check_len("params hidden", h, params.hidden)?;
        check_len("params layers", self.layers.len(), params.layers)?;
        check_len("grads", params.data.len(), grads.data.len())?;
        let outputs = params.outputs;
        check_len(
            "dyhat [seq, batch, outputs]",
            seq * batch * outputs,
            dyhat.len(),
        )?;
        let bh = batch * h;
        let head_w = params.head_w();

        // The head: its gradients, and the gradient at the top layer's outputs.
        let top = self.layers.len() - 1;
        let head = grads.head_offset();
        grads.data.iter_mut().for_each(|v| *v = T::ZERO);
        resize(&mut self.from_above, seq * bh);
        let (head_w_grad, head_b_grad) =
            grads.data[head..head + outputs * (h + 1)].split_at_mut(outputs * h);
        for t in (0..seq).rev() {
            for b in 0..batch {
                let slot = t * batch + b;
                let hidden_out = &self.layers[top].h[bh + slot * h..bh + (slot + 1) * h];
                let above = &mut self.from_above[slot * h..(slot + 1) * h];
                let mask =
                    (!self.head_mask.is_empty()).then(|| &self.head_mask[slot * h..(slot + 1) * h]);
                // `from_above` starts zeroed: every output's share adds up.
                for (o, &dy) in dyhat[slot * outputs..(slot + 1) * outputs]
                    .iter()
                    .enumerate()
                {
                    // A step without a target (the point after a gap, every step of a sliding
                    // window but its last) adds nothing: skipping it changes no bit.
                    if dy == T::ZERO {
                        continue;
                    }
                    head_b_grad[o] += dy;
                    let w = &head_w[o * h..(o + 1) * h];
                    let w_grad = &mut head_w_grad[o * h..(o + 1) * h];
                    for k in 0..h {
                        let m = mask.map_or(T::ONE, |mask| mask[k]);
                        w_grad[k] += dy * hidden_out[k] * m;
                        above[k] += dy * w[k] * m;
                    }
                }
            }
        }

        let mut from_above = std::mem::take(&mut self.from_above);
        let mut to_below = Vec::new();
        for l in (0..self.layers.len()).rev() {
            let below = (l > 0).then_some(&mut to_below);
            self.layers[l].backward(params, l, (seq, batch), &from_above, grads, below);
            if l > 0 {
                std::mem::swap(&mut from_above, &mut to_below);
            }
        }
        self.from_above = from_above;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lstm::tests::random;

    #[test]
    fn dropout_zeroes_units_and_keeps_the_mean() {
        let mut mask = Vec::new();
        let mut rng = SmallRng::seed_from_u64(1);
        fill_mask::<f64>(&mut mask, 100_000, 0.25, &mut rng);
        let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / 1e5;
        let mean = mask.iter().sum::<f64>() / 1e5;
        assert!((dropped - 0.25).abs() < 0.01, "{dropped}");
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
    }

    /// The AVX2 and AVX-512 builds of the loops and the baseline one compute the same numbers,
    /// bit for bit, forward and backward: a model trains the same on every x86-64.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_wide_loops_compute_what_the_baseline_loops_do() {
        let widths = match vectors() {
            Vectors::Baseline => {
                eprintln!("no AVX2 on this CPU: only the baseline loops run here");
                return;
            }
            Vectors::Avx2 => vec![Vectors::Avx2],
            Vectors::Avx512 => vec![Vectors::Avx2, Vectors::Avx512],
        };
        let mut rng = SmallRng::seed_from_u64(5);
        let features = 5;
        // 8 streams are two blocks of rows for the per-step products (one for the narrow
        // backward one), 12 both kinds of block, 2 are rows outside one;
        // 32 and 48 units go through the AVX-512 step kernel, 20 stay with the generic loops;
        // inputs of ±60 drive the gates into `exp`'s clamp.
        let cases = [
            (32, 12, 8, 2.0),
            (32, 7, 2, 2.0),
            (32, 5, 12, 2.0),
            (48, 5, 4, 2.0),
            (20, 5, 4, 2.0),
            (32, 3, 4, 60.0),
        ];
        for (hidden, seq, batch, scale) in cases {
            let params = LstmParams::<f32>::init(features, hidden, 9);
            let as_f32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
            let x = as_f32(random(seq * batch * features, &mut rng, scale));
            let state = as_f32(random(batch * hidden, &mut rng, 0.5));
            let above = as_f32(random(seq * batch * hidden, &mut rng, 1.0));
            let run = |width: Vectors| {
                let mut layer = LayerTape::<f32> {
                    inputs: features,
                    input: x.clone(),
                    ..LayerTape::default()
                };
                let mut grads = LstmParams::<f32>::zeros(features, hidden);
                let mut below = Vec::new();
                let shape = (seq, batch);
                let to_below = Some(&mut below);
                match width {
                    // SAFETY: `widths` holds only what the CPU has.
                    Vectors::Avx512 => unsafe {
                        layer.forward_avx512(&params, 0, seq, batch, &state, &state);
                        layer.backward_avx512(&params, 0, shape, &above, &mut grads, to_below);
                    },
                    Vectors::Avx2 => unsafe {
                        layer.forward_wide(&params, 0, seq, batch, &state, &state);
                        layer.backward_wide(&params, 0, shape, &above, &mut grads, to_below);
                    },
                    Vectors::Baseline => {
                        layer.forward_steps::<NO_KERNEL>(&params, 0, seq, batch, &state, &state);
                        layer.backward_steps::<NO_KERNEL>(
                            &params, 0, shape, &above, &mut grads, to_below,
                        );
                    }
                }
                (layer.h, layer.c, grads.as_slice().to_vec(), below)
            };
            let baseline = run(Vectors::Baseline);
            assert!(
                baseline.2.iter().any(|g| *g != 0.0),
                "the gradients are not all zero"
            );
            for &width in &widths {
                let case = format!("{width:?}, hidden {hidden}, seq {seq}, batch {batch}");
                assert_eq!(run(width), baseline, "{case}");
            }
        }
    }
}
