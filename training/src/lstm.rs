//! Stacked LSTM layers with a linear head, forward and backward, written by hand.
//!
//! Parameters live in the ONNX `LSTM` layout (gate order i, o, f, c) so that export is a copy and
//! the Rust forward pass can be compared with ONNX Runtime number for number. The code is generic
//! over [`Real`] so the same backward pass trains in `f32` and is gradient-checked in `f64`.
//!
//! Equations (ONNX defaults: sigmoid, tanh, tanh; no peepholes):
//! `i,o,f = σ(x W_g' + h R_g' + Wb_g + Rb_g)`, `g = tanh(…)`, `c' = f c + i g`, `h' = o tanh(c')`,
//! `yhat = h' · head_w + head_b` with `h'` the top layer's output (one forecast per output: a
//! joint model forecasts every input of a group); a layer above the first reads the outputs of
//! the one below as its `x`.
//!
//! The parts, each depending only on those before it: `real` (the element types and their
//! activations), `products` (the matrix products and their kernels), `params` (the parameters'
//! layout) and `tape` (training's forward and backward passes, and [`LstmParams::forward`]).

#[cfg(target_arch = "x86_64")]
#[macro_use]
mod tiles;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod params;
mod products;
mod real;
mod tape;

pub use params::LstmParams;
pub use real::{Real, UnitStep};
pub use tape::{Dropout, LstmOutput, LstmTape};

/// Number of gates per hidden unit.
const GATES: usize = 4;
/// Which hand-written kernels a build of the loops calls, as a const parameter (the f32 lanes
/// of their registers) so that each build has its own inlined: none, AVX2's or AVX-512's.
const NO_KERNEL: usize = 0;
const AVX2_KERNEL: usize = 8;
const AVX512_KERNEL: usize = 16;

/// Shapes passed to the LSTM do not match its parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: expected {expected} values, got {actual}")]
pub struct ShapeError {
    pub what: &'static str,
    pub expected: usize,
    pub actual: usize,
}

fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<(), ShapeError> {
    if expected == actual {
        Ok(())
    } else {
        Err(ShapeError {
            what,
            expected,
            actual,
        })
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::products::BLOCK_ROWS;
    use super::*;

    pub(super) fn random(len: usize, rng: &mut SmallRng, scale: f64) -> Vec<f64> {
        (0..len).map(|_| rng.gen_range(-scale..scale)).collect()
    }

    struct GradCase {
        seq: usize,
        batch: usize,
        x: Vec<f64>,
        h0: Vec<f64>,
        c0: Vec<f64>,
        weights: Vec<f64>,
        dropout: Option<Dropout>,
    }

    /// `Σ weight · yhat`, with the case's dropout masks (same seed, same masks).
    fn weighted_loss(params: &LstmParams<f64>, case: &GradCase) -> f64 {
        let mut tape = LstmTape::new();
        tape.forward_train(
            params,
            &case.x,
            (case.seq, case.batch),
            &case.h0,
            &case.c0,
            case.dropout,
        )
        .expect("shapes match");
        tape.yhat()
            .iter()
            .zip(&case.weights)
            .map(|(y, w)| y * w)
            .sum()
    }

    fn gradient_check(batch: usize, layers: usize, dropout: Option<Dropout>) {
        gradient_check_outputs(batch, layers, 1, dropout);
    }

    fn gradient_check_outputs(
        batch: usize,
        layers: usize,
        outputs: usize,
        dropout: Option<Dropout>,
    ) {
        let (features, hidden, seq) = (3, 5, 7);
        let mut rng = SmallRng::seed_from_u64(7);
        let mut params = LstmParams::<f64>::init_multi(features, hidden, layers, outputs, 3);
        // Perturb everything so no gradient is trivially zero (head bias, Rb).
        for v in params.as_mut_slice() {
            *v += rng.gen_range(-0.3..0.3);
        }
        let state = layers * batch * hidden;
        let case = GradCase {
            seq,
            batch,
            x: random(seq * batch * features, &mut rng, 1.0),
            h0: random(state, &mut rng, 0.5),
            c0: random(state, &mut rng, 0.5),
            weights: random(seq * batch * outputs, &mut rng, 1.0),
            dropout,
        };
        let mut tape = LstmTape::new();
        tape.forward_train(
            &params,
            &case.x,
            (seq, batch),
            &case.h0,
            &case.c0,
            case.dropout,
        )
        .expect("shapes match");
        let mut grads = LstmParams::zeros_multi(features, hidden, layers, outputs);
        tape.backward(&params, &case.weights, &mut grads)
            .expect("shapes match");

        let eps = 1e-6;
        let mut numeric = vec![0.0; params.as_slice().len()];
        for (idx, slot) in numeric.iter_mut().enumerate() {
            let original = params.as_slice()[idx];
            params.as_mut_slice()[idx] = original + eps;
            let up = weighted_loss(&params, &case);
            params.as_mut_slice()[idx] = original - eps;
            let down = weighted_loss(&params, &case);
            params.as_mut_slice()[idx] = original;
            *slot = (up - down) / (2.0 * eps);
        }
        let diff: f64 = numeric
            .iter()
            .zip(grads.as_slice())
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = numeric.iter().map(|a| a * a).sum::<f64>().sqrt();
        let relative = diff / norm;
        println!("batch {batch}, {layers} layers: norm-relative gradient error {relative:e}");
        assert!(relative < 1e-6, "relative gradient error {relative:e}");
        // Every layer learns: no layer's gradient is all zero.
        for layer in 0..layers {
            let o = grads.layer_offsets(layer);
            assert!(grads.as_slice()[o.w..o.end].iter().any(|g| g.abs() > 1e-9));
        }
    }

    #[test]
    fn backward_matches_finite_differences_small_batch() {
        gradient_check(2, 1, None);
    }

    #[test]
    fn backward_matches_finite_differences_blocked_batch() {
        gradient_check(BLOCK_ROWS + 3, 1, None);
    }

    #[test]
    fn backward_matches_finite_differences_stacked_with_dropout() {
        let dropout = Some(Dropout { rate: 0.3, seed: 9 });
        gradient_check(2, 3, dropout);
        gradient_check(BLOCK_ROWS + 3, 2, dropout);
    }

    #[test]
    fn backward_matches_finite_differences_with_several_outputs() {
        gradient_check_outputs(2, 1, 3, None);
        gradient_check_outputs(BLOCK_ROWS + 3, 2, 4, Some(Dropout { rate: 0.3, seed: 9 }));
    }

    #[test]
    fn one_layer_is_the_same_model_as_before_stacking() {
        // Stacking must not change what a one-layer model is: same draw for the same seed, and
        // the first layer and head of a deeper model are drawn identically.
        let one = LstmParams::<f64>::init(3, 4, 5);
        let two = LstmParams::<f64>::init_stacked(3, 4, 2, 5);
        assert_eq!(one.w(0), two.w(0));
        assert_eq!(one.r(0), two.r(0));
        assert_eq!(one.head_w(), two.head_w());
        assert_eq!(two.wb(1)[8..12], [1.0; 4]);
    }

    #[test]
    fn models_side_by_side_forecast_the_mean_of_their_forecasts() {
        let (features, hidden, outputs, seq, batch) = (3, 4, 2, 7, 5);
        let mut rng = SmallRng::seed_from_u64(11);
        for layers in [1, 2] {
            let members: Vec<LstmParams<f64>> = (0..3)
                .map(|seed| {
                    let mut m = LstmParams::init_multi(features, hidden, layers, outputs, seed);
                    // Every tensor non-zero, biases included.
                    let noise = random(m.as_slice().len(), &mut rng, 0.5);
                    m.as_mut_slice()
                        .iter_mut()
                        .zip(noise)
                        .for_each(|(v, n)| *v += n);
                    m
                })
                .collect();
            let merged = LstmParams::side_by_side(&members).expect("one shape");
            assert_eq!(merged.hidden(), 3 * hidden);
            let x = random(seq * batch * features, &mut rng, 1.0);
            let state = |h: usize| vec![0.0; layers * batch * h];
            let wide = merged
                .forward(&x, seq, batch, &state(3 * hidden), &state(3 * hidden))
                .expect("shapes match");
            let mut mean = vec![0.0; seq * batch * outputs];
            for member in &members {
                let out = member
                    .forward(&x, seq, batch, &state(hidden), &state(hidden))
                    .expect("shapes match");
                mean.iter_mut()
                    .zip(&out.yhat)
                    .for_each(|(m, y)| *m += y / 3.0);
            }
            for (a, b) in wide.yhat.iter().zip(&mean) {
                assert!((a - b).abs() < 1e-12, "{layers} layers: {a} against {b}");
            }
        }
        let other = LstmParams::<f64>::init(features, hidden + 1, 0);
        let err = LstmParams::side_by_side(&[LstmParams::init(features, hidden, 0), other]);
        assert!(err.is_err());
        assert!(LstmParams::<f64>::side_by_side(&[]).is_err());
    }

    #[test]
    fn f32_matches_f64_and_state_carries() {
        let (features, hidden, seq, batch) = (5, 8, 20, 3);
        let p64 = LstmParams::<f64>::init_stacked(features, hidden, 2, 11);
        let p32: LstmParams<f32> = p64.convert();
        let mut rng = SmallRng::seed_from_u64(1);
        let x64 = random(seq * batch * features, &mut rng, 2.0);
        let x32: Vec<f32> = x64.iter().map(|&v| v as f32).collect();
        let zeros64 = vec![0.0; 2 * batch * hidden];
        let zeros32 = vec![0.0f32; 2 * batch * hidden];
        let a = p64.forward(&x64, seq, batch, &zeros64, &zeros64).unwrap();
        let b = p32
            .forward_f32(&x32, seq, batch, &zeros32, &zeros32)
            .unwrap();
        for (u, v) in a.yhat.iter().zip(&b.yhat) {
            assert!((u - *v as f64).abs() < 1e-5);
        }
        // Running 12 then 8 steps with carried state (both layers') equals 20 at once.
        let split = 12 * batch * features;
        let first = p64
            .forward(&x64[..split], 12, batch, &zeros64, &zeros64)
            .unwrap();
        let second = p64
            .forward(&x64[split..], 8, batch, &first.h, &first.c)
            .unwrap();
        assert_eq!(&a.yhat[12 * batch..], &second.yhat[..]);
        assert_eq!(a.h, second.h);
        assert_eq!(a.c, second.c);
    }

    #[test]
    fn shape_errors_are_reported() {
        let p = LstmParams::<f32>::init(2, 3, 0);
        let err = p
            .forward(&[0.0; 5], 2, 1, &[0.0; 3], &[0.0; 3])
            .unwrap_err();
        assert_eq!(err.expected, 4);
    }
}
