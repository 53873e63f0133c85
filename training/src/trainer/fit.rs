//! Fitting one model: epochs of stateful truncated BPTT over the training pieces, each scored
//! on the validation part as serving would run it, the best epoch kept (early stopping); and an
//! ensemble of such fits merged into one model.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::prepare::{training_pieces, Piece, PreparedSeries};
use super::{
    internal, Control, Progress, TrainError, TrainOptions, CONTINUE_LEARNING_RATE,
    CONTINUE_MAX_EPOCHS,
};
use crate::adam::Adam;
use crate::lstm::{Dropout, LstmParams, LstmTape};

/// Training pieces span at least this many windows.
const PIECE_WINDOWS: usize = 8;
const HUBER_DELTA: f64 = 1.0;
/// Streams of a training batch run through the LSTM together, their gradients summed before the
/// batch's one Adam step (the same update, up to rounding): at 32 the tape (gates, their
/// gradients, states: ~3 MB) spills from a core's 1 MB L2; in groups of 8 it stays (a default
/// model on 20,160 points: 0.51 → 0.46 s in interleaved benchmark runs).
const SUB_BATCH_STREAMS: usize = 8;
/// Evaluation walks streams in chunks of this many steps and this many streams at a time,
/// which bounds the tape's memory on long histories and many series.
const EVAL_CHUNK_STEPS: usize = 256;
const EVAL_BATCH_STREAMS: usize = 256;

fn huber(residual: f64) -> f64 {
    let a = residual.abs();
    if a <= HUBER_DELTA {
        0.5 * a * a
    } else {
        HUBER_DELTA * (a - 0.5 * HUBER_DELTA)
    }
}

/// Buffers reused across chunks and epochs.
pub(super) struct Workspace {
    /// Columns of a model input row, and forecasts per step.
    features: usize,
    outputs: usize,
    tape: LstmTape<f32>,
    grads: LstmParams<f32>,
    x: Vec<f32>,
    targets: Vec<f32>,
    valid: Vec<bool>,
    dyhat: Vec<f32>,
    /// A batch's parameter gradients, summed over its groups of [`SUB_BATCH_STREAMS`].
    summed: Vec<f32>,
    h: Vec<f32>,
    c: Vec<f32>,
}

impl Workspace {
    pub(super) fn new(features: usize, hidden: usize, layers: usize, outputs: usize) -> Self {
        let grads = LstmParams::zeros_multi(features, hidden, layers, outputs);
        Workspace {
            features,
            outputs,
            tape: LstmTape::new(),
            summed: vec![0.0; grads.as_slice().len()],
            grads,
            x: Vec::new(),
            targets: Vec::new(),
            valid: Vec::new(),
            dyhat: Vec::new(),
            h: Vec::new(),
            c: Vec::new(),
        }
    }

    fn reset_state(&mut self, len: usize) {
        self.h.clear();
        self.h.resize(len, 0.0);
        self.c.clear();
        self.c.resize(len, 0.0);
    }

    /// Fills inputs and targets for steps `first_step..first_step + seq` of `pieces`
    /// (`[seq, batch]` order); steps past a piece's end are padding.
    fn fill_chunk(
        &mut self,
        series: &[PreparedSeries],
        pieces: &[Piece],
        first_step: usize,
        seq: usize,
    ) {
        let batch = pieces.len();
        let (features, outputs) = (self.features, self.outputs);
        self.x.clear();
        self.x.resize(seq * batch * features, 0.0);
        self.targets.clear();
        self.targets.resize(seq * batch * outputs, 0.0);
        self.valid.clear();
        self.valid.resize(seq * batch * outputs, false);
        for t in 0..seq {
            let step = first_step + t;
            for (j, piece) in pieces.iter().enumerate() {
                if step >= piece.steps() {
                    continue;
                }
                let s = &series[piece.series];
                let point = piece.start + step;
                let slot = t * batch + j;
                self.x[slot * features..(slot + 1) * features]
                    .copy_from_slice(&s.inputs[point * features..(point + 1) * features]);
                let next = point + 1;
                self.targets[slot * outputs..(slot + 1) * outputs]
                    .copy_from_slice(&s.scaled[next * outputs..(next + 1) * outputs]);
                for (i, valid) in self.valid[slot * outputs..(slot + 1) * outputs]
                    .iter_mut()
                    .enumerate()
                {
                    *valid = s.is_input_target(next, i);
                }
            }
        }
    }
}

/// One epoch of stateful truncated BPTT; returns the mean training loss.
fn train_epoch(
    params: &mut LstmParams<f32>,
    adam: &mut Adam,
    series: &[PreparedSeries],
    pieces: &[Piece],
    opts: &TrainOptions,
    ws: &mut Workspace,
    rng: &mut SmallRng,
) -> Result<f64, crate::lstm::ShapeError> {
    let state = params.hidden() * params.layers();
    let mut loss_sum = 0.0;
    let mut count_sum = 0usize;
    for batch_pieces in pieces.chunks(opts.batch_streams) {
        let max_steps = batch_pieces.iter().map(Piece::steps).max().unwrap_or(0);
        let groups: Vec<&[Piece]> = batch_pieces.chunks(SUB_BATCH_STREAMS).collect();
        let mut states: Vec<(Vec<f32>, Vec<f32>)> = groups
            .iter()
            .map(|group| {
                (
                    vec![0.0; group.len() * state],
                    vec![0.0; group.len() * state],
                )
            })
            .collect();
        let mut first_step = 0;
        while first_step < max_steps {
            let seq = opts.window.min(max_steps - first_step);
            // Each group's gradient of its summed loss; the batch's mean is taken once all
            // are in (the gradient is linear in the loss), as one pass over the batch would.
            ws.summed.fill(0.0);
            let mut count = 0;
            for (group, (h, c)) in groups.iter().zip(&mut states) {
                ws.fill_chunk(series, group, first_step, seq);
                let dropout = (opts.dropout > 0.0).then(|| Dropout {
                    rate: opts.dropout,
                    seed: rng.gen(),
                });
                ws.tape
                    .forward_train(params, &ws.x, (seq, group.len()), h, c, dropout)?;
                ws.dyhat.clear();
                ws.dyhat.resize(ws.targets.len(), 0.0);
                for (((dy, &y), &target), &valid) in ws
                    .dyhat
                    .iter_mut()
                    .zip(ws.tape.yhat())
                    .zip(&ws.targets)
                    .zip(&ws.valid)
                {
                    if valid {
                        let r = y as f64 - target as f64;
                        loss_sum += huber(r);
                        *dy = r.clamp(-HUBER_DELTA, HUBER_DELTA) as f32;
                        count += 1;
                    }
                }
                ws.tape.backward(params, &ws.dyhat, &mut ws.grads)?;
                for (sum, &g) in ws.summed.iter_mut().zip(ws.grads.as_slice()) {
                    *sum += g;
                }
                ws.tape.copy_final_state(h, c)?;
            }
            let scale = 1.0 / count.max(1) as f32;
            for (g, &sum) in ws.grads.as_mut_slice().iter_mut().zip(&ws.summed) {
                *g = sum * scale;
            }
            count_sum += count;
            adam.step(params.as_mut_slice(), ws.grads.as_slice());
            first_step += seq;
        }
    }
    Ok(loss_sum / count_sum.max(1) as f64)
}

/// Runs `streams` from zero state, calling `on_forecast(series, target_index, input, yhat,
/// target)` for every forecast of an input's value.
pub(super) fn run_streams(
    params: &LstmParams<f32>,
    series: &[PreparedSeries],
    streams: &[Piece],
    ws: &mut Workspace,
    mut on_forecast: impl FnMut(usize, usize, usize, f32, f32),
) -> Result<(), crate::lstm::ShapeError> {
    let outputs = ws.outputs;
    let state = params.hidden() * params.layers();
    for group in streams.chunks(EVAL_BATCH_STREAMS) {
        let batch = group.len();
        let max_steps = group.iter().map(Piece::steps).max().unwrap_or(0);
        ws.reset_state(batch * state);
        let mut first_step = 0;
        while first_step < max_steps {
            let seq = EVAL_CHUNK_STEPS.min(max_steps - first_step);
            ws.fill_chunk(series, group, first_step, seq);
            ws.tape.forward(params, &ws.x, seq, batch, &ws.h, &ws.c)?;
            for t in 0..seq {
                for (j, piece) in group.iter().enumerate() {
                    let target_index = piece.start + first_step + t + 1;
                    for i in 0..outputs {
                        let slot = (t * batch + j) * outputs + i;
                        if ws.valid[slot] {
                            on_forecast(
                                piece.series,
                                target_index,
                                i,
                                ws.tape.yhat()[slot],
                                ws.targets[slot],
                            );
                        }
                    }
                }
            }
            ws.tape.copy_final_state(&mut ws.h, &mut ws.c)?;
            first_step += seq;
        }
    }
    Ok(())
}

fn validation_loss(
    params: &LstmParams<f32>,
    series: &[PreparedSeries],
    streams: &[Piece],
    ws: &mut Workspace,
) -> Result<f64, crate::lstm::ShapeError> {
    let mut sum = 0.0;
    let mut count = 0usize;
    run_streams(
        params,
        series,
        streams,
        ws,
        |s, target_index, _, yhat, target| {
            let part = &series[s];
            if (part.train_end..part.validation_end).contains(&target_index) {
                sum += huber(yhat as f64 - target as f64);
                count += 1;
            }
        },
    )?;
    Ok(sum / count.max(1) as f64)
}

/// Loss of forecasting each validation point by its predecessor, for comparison.
pub(super) fn last_value_baseline(series: &[PreparedSeries]) -> f64 {
    let mut sum = 0.0;
    let mut count = 0usize;
    for s in series {
        let (lo, hi, w) = (s.train_end.max(1), s.validation_end.min(s.len()), s.width());
        for t in lo..hi {
            for i in (0..w).filter(|i| s.is_input_target(t, *i)) {
                sum += huber(s.scaled[t * w + i] as f64 - s.scaled[(t - 1) * w + i] as f64);
                count += 1;
            }
        }
    }
    sum / count.max(1) as f64
}

/// One model's training run: the parameters of its best validation epoch.
pub(super) struct Fit {
    pub(super) best: LstmParams<f32>,
    pub(super) best_val: f64,
    pub(super) best_epoch: usize,
    pub(super) epochs_run: usize,
    pub(super) last_train_loss: f64,
}

/// Training targets an automatic ensemble may cost in all: about the training part of issue
/// 5's reference series (20,160 points, 70% of them trained on), so an ensemble costs no more
/// than one model on two weeks at one minute.
pub const ENSEMBLE_TARGET_BUDGET: usize = 14_000;
/// The most members an automatic ensemble trains (NAB: 3 and 5 alike, docs/quality.md).
pub const MAX_ENSEMBLE: usize = 3;

/// How many models a detector's model averages: as `opts.ensemble` says, else as many as the
/// [`ENSEMBLE_TARGET_BUDGET`] affords for `targets` training targets (values to forecast), up
/// to [`MAX_ENSEMBLE`].
///
/// A model that learns from little data depends on its seed: NAB's standard score ranged from
/// 69.5 to 73.4 over eight seeds, and from 72.9 to 73.5 with three members (docs/quality.md).
/// With much data the seed hardly matters (SMD, ASD), and one model is cheaper.
pub fn ensemble_size(opts: &TrainOptions, targets: usize) -> usize {
    opts.ensemble
        .unwrap_or_else(|| (ENSEMBLE_TARGET_BUDGET / targets.max(1)).clamp(1, MAX_ENSEMBLE))
}

/// The model an ensemble ships, and each member's best validation loss.
pub(super) struct Ensemble {
    /// The members side by side; its validation loss is the average forecast's, its epochs
    /// the first member's.
    pub(super) model: Fit,
    pub(super) member_val_losses: Vec<f64>,
}

/// Trains `members` models from consecutive seeds and merges them into one. The observer
/// follows the first member only: a search prunes a trial by it alone.
pub(super) fn fit_ensemble(
    model: (usize, usize),
    (prepared, validation_streams): (&[PreparedSeries], &[Piece]),
    (opts, start): (&TrainOptions, Option<&LstmParams<f32>>),
    members: usize,
    progress: &mut dyn FnMut(&Progress) -> Control,
) -> Result<Ensemble, TrainError> {
    let first = fit(
        model,
        (prepared, validation_streams),
        opts,
        Start {
            continued: start,
            seed: opts.seed,
        },
        progress,
    )?;
    let mut member_val_losses = vec![first.best_val];
    if members <= 1 {
        return Ok(Ensemble {
            model: first,
            member_val_losses,
        });
    }
    let mut models = Vec::with_capacity(members);
    models.push(first.best);
    for member in 1..members {
        let seed = opts.seed.wrapping_add(member as u64);
        let mut quiet = |_: &Progress| Control::Continue;
        let fitted = fit(
            model,
            (prepared, validation_streams),
            opts,
            Start {
                continued: None,
                seed,
            },
            &mut quiet,
        )?;
        member_val_losses.push(fitted.best_val);
        models.push(fitted.best);
    }
    let merged = LstmParams::side_by_side(&models).map_err(internal)?;
    let mut ws = Workspace::new(model.0, merged.hidden(), opts.layers, model.1);
    let best_val =
        validation_loss(&merged, prepared, validation_streams, &mut ws).map_err(internal)?;
    Ok(Ensemble {
        model: Fit {
            best: merged,
            best_val,
            ..first
        },
        member_val_losses,
    })
}

/// Where a model's fit starts: weights drawn from a seed, or a stored model's.
#[derive(Clone, Copy)]
struct Start<'a> {
    continued: Option<&'a LstmParams<f32>>,
    /// Draws the initial weights, and the order of the pieces in each epoch.
    seed: u64,
}

/// Trains one model from `start` until its validation loss stops improving.
fn fit(
    (features, width): (usize, usize),
    (prepared, validation_streams): (&[PreparedSeries], &[Piece]),
    opts: &TrainOptions,
    start: Start<'_>,
    progress: &mut dyn FnMut(&Progress) -> Control,
) -> Result<Fit, TrainError> {
    let seed = start.seed;
    let (mut params, learning_rate) = match start.continued {
        Some(params) => (params.clone(), CONTINUE_LEARNING_RATE),
        None => (
            LstmParams::<f32>::init_multi(features, opts.hidden, opts.layers, width, seed),
            opts.learning_rate,
        ),
    };
    let mut adam = Adam::new(learning_rate, params.as_slice().len());
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed_7a1e);
    let mut ws = Workspace::new(features, params.hidden(), opts.layers, width);
    let mut pieces = Vec::new();

    let mut best = params.clone();
    let mut best_val = f64::INFINITY;
    let mut best_epoch = 0;
    let mut epochs_run = 0;
    let mut last_train_loss = f64::NAN;
    let max_epochs = match start.continued {
        Some(_) => opts.max_epochs.min(CONTINUE_MAX_EPOCHS),
        None => opts.max_epochs,
    };
    for epoch in 1..=max_epochs {
        training_pieces(prepared, PIECE_WINDOWS * opts.window, &mut rng, &mut pieces);
        let train_loss = train_epoch(
            &mut params,
            &mut adam,
            prepared,
            &pieces,
            opts,
            &mut ws,
            &mut rng,
        )
        .map_err(internal)?;
        let val_loss =
            validation_loss(&params, prepared, validation_streams, &mut ws).map_err(internal)?;
        if !train_loss.is_finite() || !val_loss.is_finite() {
            return Err(TrainError::NonFiniteLoss { epoch });
        }
        epochs_run = epoch;
        last_train_loss = train_loss;
        if val_loss < best_val {
            best_val = val_loss;
            best_epoch = epoch;
            best.clone_from(&params);
        }
        let control = progress(&Progress {
            epoch,
            max_epochs: opts.max_epochs,
            train_loss,
            val_loss,
            best_epoch,
        });
        if control == Control::Abandon {
            return Err(TrainError::Abandoned { epoch });
        }
        if epoch - best_epoch >= opts.patience {
            break;
        }
    }

    Ok(Fit {
        best,
        best_val,
        best_epoch,
        epochs_run,
        last_train_loss,
    })
}
