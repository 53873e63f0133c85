//! Hyperparameter search, Optuna-style: TPE sampling (the `tpe` crate, by one of Optuna's
//! authors) over window, hidden size, layers, learning rate, dropout and epochs, with a median
//! pruner that gives up on a trial whose validation loss is worse than the median of earlier
//! trials at the same epoch. The objective is the validation loss the trainer already computes;
//! the first trial is the given options, so a search never ends worse than no search. Seeded:
//! the same data and seed give the same trials.

use std::time::{Duration, Instant};

use rand_pcg::rand_core::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::trainer::{train_with, Control, SeriesHistory, TrainError, TrainOptions, TrainedModel};

/// Windows a trial may use (points the LSTM is unrolled over).
pub const WINDOWS: [usize; 4] = [16, 32, 64, 128];
/// Hidden sizes a trial may use.
pub const HIDDEN: [usize; 4] = [8, 16, 32, 64];
/// Stacked LSTM layers a trial may use.
pub const LAYERS: [usize; 2] = [1, 2];
/// Dropout rate while training.
pub const DROPOUT: (f64, f64) = (0.0, 0.5);
/// log10 of the learning rate.
pub const LOG_LEARNING_RATE: (f64, f64) = (-3.5, -1.8);
/// Maximum epochs a trial may run (early stopping still applies).
pub const EPOCHS: (f64, f64) = (10.0, 120.0);
/// Epochs every trial runs before the pruner may stop it. A trial with a lower learning rate is
/// behind the others early by construction: at 4 epochs against 2 finished trials, every trial
/// after the second was pruned on SMD, and the search lowered NAB's validation losses by a
/// median 3%; at 10 against 5, by 15% (docs/quality.md).
pub const PRUNE_AFTER_EPOCHS: usize = 10;
/// Trials that complete before pruning starts: the median needs something to stand on
/// (Optuna's `MedianPruner` waits for 5 too).
pub const PRUNE_AFTER_TRIALS: usize = 5;

/// How much searching a detector gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub trials: usize,
    /// No new trial starts after this long.
    pub wall_time: Duration,
}

/// One trial: its settings and how it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    pub number: usize,
    pub window: usize,
    pub hidden: usize,
    pub layers: usize,
    pub learning_rate: f64,
    pub dropout: f64,
    pub max_epochs: usize,
    /// Best validation loss; `None` when pruned or failed.
    pub val_loss: Option<f64>,
    pub pruned_at_epoch: Option<usize>,
    pub seconds: f64,
}

/// The best model and every trial that led to it.
#[derive(Debug, Clone)]
pub struct Searched {
    pub model: TrainedModel,
    pub trials: Vec<Trial>,
    pub best: usize,
}

/// One TPE sampler per parameter (independent TPE, Optuna's default).
struct Samplers {
    window: tpe::TpeOptimizer,
    hidden: tpe::TpeOptimizer,
    layers: tpe::TpeOptimizer,
    learning_rate: tpe::TpeOptimizer,
    dropout: tpe::TpeOptimizer,
    epochs: tpe::TpeOptimizer,
}

/// The raw samples of one trial, in the order [`Samplers`] draws them.
type Raw = [f64; 6];

fn invalid(e: impl std::fmt::Display) -> TrainError {
    TrainError::InvalidOptions(format!("hyperparameter search: {e}"))
}

impl Samplers {
    fn new() -> Result<Samplers, TrainError> {
        let categorical = |n: usize| {
            tpe::categorical_range(n)
                .map(|r| tpe::TpeOptimizer::new(tpe::histogram_estimator(), r))
                .map_err(invalid)
        };
        let numeric = |(a, b): (f64, f64)| {
            tpe::range(a, b)
                .map(|r| tpe::TpeOptimizer::new(tpe::parzen_estimator(), r))
                .map_err(invalid)
        };
        Ok(Samplers {
            window: categorical(WINDOWS.len())?,
            hidden: categorical(HIDDEN.len())?,
            layers: categorical(LAYERS.len())?,
            learning_rate: numeric(LOG_LEARNING_RATE)?,
            dropout: numeric(DROPOUT)?,
            epochs: numeric(EPOCHS)?,
        })
    }

    fn all(&mut self) -> [&mut tpe::TpeOptimizer; 6] {
        [
            &mut self.window,
            &mut self.hidden,
            &mut self.layers,
            &mut self.learning_rate,
            &mut self.dropout,
            &mut self.epochs,
        ]
    }

    /// The raw samples of the next trial: (window index, hidden index, layers index, log10 lr,
    /// dropout, epochs).
    fn ask(&mut self, rng: &mut rand_pcg::Pcg64) -> Result<Raw, TrainError> {
        let mut raw = [0.0; 6];
        for (slot, sampler) in raw.iter_mut().zip(self.all()) {
            *slot = sampler.ask(rng).map_err(invalid)?;
        }
        Ok(raw)
    }

    fn tell(&mut self, raw: Raw, value: f64) -> Result<(), TrainError> {
        for (x, sampler) in raw.into_iter().zip(self.all()) {
            sampler.tell(x, value).map_err(invalid)?;
        }
        Ok(())
    }
}

/// Where `value` lies among `choices`, as the categorical sampler's raw value.
fn index_of(choices: &[usize], value: usize) -> f64 {
    choices
        .iter()
        .position(|c| *c == value)
        .map_or(0.0, |i| i as f64 + 0.5)
}

/// The median of the finite values, if any.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

/// Whether a trial whose best validation loss after `epoch` epochs is `best_so_far` is pruned:
/// past the warm-up, and once enough trials finished, when it is worse than their median at the
/// same epoch (a finished trial that stopped earlier counts with its final loss).
fn behind_the_median(epoch: usize, best_so_far: f64, finished: &[Vec<f64>]) -> bool {
    if epoch < PRUNE_AFTER_EPOCHS || finished.len() < PRUNE_AFTER_TRIALS {
        return false;
    }
    let at_epoch: Vec<f64> = finished
        .iter()
        .filter_map(|c| c.get(epoch - 1).or(c.last()).copied())
        .collect();
    median(at_epoch).is_some_and(|m| best_so_far > m)
}

/// The key of the search's record (trials, best trial, seconds) in a model's `training`
/// metadata.
pub const SEARCH_META_KEY: &str = "search";

/// Searches hyperparameters for `detector` and returns the best trial's model, with the search
/// recorded in its metadata (`training.search`). `on_trial` hears of each trial as it ends.
pub fn search(
    detector: &str,
    step_secs: u64,
    series: &[SeriesHistory],
    base: &TrainOptions,
    budget: Budget,
    on_trial: &mut dyn FnMut(&Trial),
) -> Result<Searched, TrainError> {
    if budget.trials == 0 {
        return Err(invalid("the budget allows no trial"));
    }
    let started = Instant::now();
    let mut rng = rand_pcg::Pcg64::seed_from_u64(base.seed ^ 0x7e5e_a5c4);
    let mut samplers = Samplers::new()?;
    // Best validation loss so far at each epoch, per finished trial: the pruner's reference.
    let mut curves: Vec<Vec<f64>> = Vec::new();
    let mut trials: Vec<Trial> = Vec::new();
    let mut best: Option<(usize, TrainedModel, f64)> = None;
    let mut last_error = None;
    for number in 0..budget.trials {
        if number > 0 && started.elapsed() >= budget.wall_time {
            break;
        }
        let (raw, options) = if number == 0 {
            let raw = [
                index_of(&WINDOWS, base.window),
                index_of(&HIDDEN, base.hidden),
                index_of(&LAYERS, base.layers),
                base.learning_rate
                    .log10()
                    .clamp(LOG_LEARNING_RATE.0, LOG_LEARNING_RATE.1),
                base.dropout.clamp(DROPOUT.0, DROPOUT.1 - 1e-9),
                (base.max_epochs as f64).clamp(EPOCHS.0, EPOCHS.1 - 1e-9),
            ];
            (raw, base.clone())
        } else {
            let raw = samplers.ask(&mut rng)?;
            let pick = |choices: &[usize], x: f64| {
                choices[(x.floor().max(0.0) as usize).min(choices.len() - 1)]
            };
            let options = TrainOptions {
                window: pick(&WINDOWS, raw[0]),
                hidden: pick(&HIDDEN, raw[1]),
                layers: pick(&LAYERS, raw[2]),
                learning_rate: 10f64.powf(raw[3]),
                dropout: raw[4],
                max_epochs: raw[5].round() as usize,
                ..base.clone()
            };
            (raw, options)
        };
        let trial_started = Instant::now();
        let mut curve: Vec<f64> = Vec::new();
        let prune_against = curves.clone();
        let result = train_with(detector, step_secs, series, &options, &mut |p| {
            let best_so_far = curve.last().map_or(p.val_loss, |b: &f64| b.min(p.val_loss));
            curve.push(best_so_far);
            if behind_the_median(p.epoch, best_so_far, &prune_against) {
                Control::Abandon
            } else {
                Control::Continue
            }
        });
        let mut trial = Trial {
            number,
            window: options.window,
            hidden: options.hidden,
            layers: options.layers,
            learning_rate: options.learning_rate,
            dropout: options.dropout,
            max_epochs: options.max_epochs,
            val_loss: None,
            pruned_at_epoch: None,
            seconds: trial_started.elapsed().as_secs_f64(),
        };
        match result {
            Ok(model) => {
                let loss = model
                    .meta
                    .training
                    .get("best_val_loss")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(f64::INFINITY);
                trial.val_loss = Some(loss);
                samplers.tell(raw, loss)?;
                curves.push(curve);
                if best.as_ref().is_none_or(|(_, _, b)| loss < *b) {
                    best = Some((number, model, loss));
                }
            }
            Err(TrainError::Abandoned { epoch }) => {
                trial.pruned_at_epoch = Some(epoch);
                // A pruned trial is worse than the median: tell TPE so, at its last loss.
                samplers.tell(raw, curve.last().copied().unwrap_or(f64::INFINITY))?;
            }
            // Data problems are the same for every trial: no point in trying more.
            Err(e @ (TrainError::NoSeries | TrainError::InvalidSeries { .. })) => return Err(e),
            Err(e) => {
                samplers.tell(raw, f64::INFINITY)?;
                last_error = Some(e);
            }
        }
        on_trial(&trial);
        trials.push(trial);
    }
    let Some((best_number, mut model, _)) = best else {
        return Err(last_error.unwrap_or_else(|| invalid("no trial finished")));
    };
    model.meta.training.insert(
        SEARCH_META_KEY.to_string(),
        serde_json::json!({
            "trials": trials,
            "best_trial": best_number,
            "seconds": started.elapsed().as_secs_f64(),
        }),
    );
    // The metadata travels inside the ONNX file: export again so it carries the search.
    model.onnx = crate::onnx::export(&model.params, &model.meta);
    Ok(Searched {
        model,
        trials,
        best: best_number,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Two weeks at 15 minutes of a daily wave with deterministic pseudo-noise.
    fn history() -> SeriesHistory {
        let timestamps: Vec<i64> = (0..14 * 96).map(|i| 1_700_006_400 + i * 900).collect();
        let values = timestamps
            .iter()
            .map(|&ts| {
                let phase = std::f64::consts::TAU * (ts % 86_400) as f64 / 86_400.0;
                let noise = ((ts / 900).wrapping_mul(2_654_435_761) % 1_000) as f64 / 500.0 - 1.0;
                50.0 + 10.0 * phase.sin() + 2.0 * noise
            })
            .collect();
        SeriesHistory {
            labels: BTreeMap::from([("instance".to_owned(), "a".to_owned())]),
            timestamps,
            values,
        }
    }

    fn run() -> Searched {
        let base = TrainOptions {
            hidden: 16,
            window: 16,
            max_epochs: 30,
            patience: 5,
            learning_rate: 5e-3,
            ..TrainOptions::default()
        };
        let budget = Budget {
            trials: 5,
            wall_time: Duration::from_secs(600),
        };
        let mut heard = 0;
        let searched =
            search("d", 900, &[history()], &base, budget, &mut |_| heard += 1).expect("search");
        assert_eq!(heard, searched.trials.len());
        searched
    }

    #[test]
    fn the_search_starts_from_the_given_options_and_keeps_the_best() {
        let searched = run();
        assert_eq!(searched.trials.len(), 5);
        let first = &searched.trials[0];
        assert_eq!(
            (first.window, first.hidden, first.learning_rate),
            (16, 16, 5e-3)
        );
        let best = &searched.trials[searched.best];
        let first_loss = first.val_loss.expect("the first trial is never pruned");
        assert!(best.val_loss.expect("best finished") <= first_loss);
        for t in &searched.trials {
            assert!(
                WINDOWS.contains(&t.window)
                    && HIDDEN.contains(&t.hidden)
                    && LAYERS.contains(&t.layers)
                    && (DROPOUT.0..DROPOUT.1).contains(&t.dropout),
                "{t:?}"
            );
            if t.pruned_at_epoch.is_some() {
                assert!(t.val_loss.is_none(), "{t:?}");
            }
        }
        assert_eq!(searched.model.meta.window, best.window);
        // A short history's model averages an ensemble: its members' units side by side.
        let members = searched.model.meta.training["ensemble"].as_u64();
        assert_eq!(
            searched.model.meta.hidden as u64,
            best.hidden as u64 * members.unwrap_or(0)
        );
        assert_eq!(searched.model.meta.layers, best.layers);
        // The record travels inside the ONNX file too.
        let needle = b"best_trial";
        assert!(searched
            .model
            .onnx
            .windows(needle.len())
            .any(|w| w == needle));
    }

    #[test]
    fn the_same_seed_gives_the_same_trials() {
        let strip = |s: Searched| -> Vec<Trial> {
            s.trials
                .into_iter()
                .map(|t| Trial { seconds: 0.0, ..t })
                .collect()
        };
        assert_eq!(strip(run()), strip(run()));
    }

    #[test]
    fn a_trial_is_pruned_only_when_behind_the_median_after_the_warm_up() {
        // Finished trials' best-so-far curves; the third stopped early at 0.5.
        let mut finished = vec![
            vec![1.0; PRUNE_AFTER_EPOCHS + 5],
            vec![0.4; PRUNE_AFTER_EPOCHS + 5],
            vec![0.5; 3],
        ];
        finished.extend(vec![
            vec![0.6; PRUNE_AFTER_EPOCHS + 5];
            PRUNE_AFTER_TRIALS - 3
        ]);
        let epoch = PRUNE_AFTER_EPOCHS;
        let median = median(finished.iter().map(|c| c[c.len().min(epoch) - 1]).collect());
        let median = median.expect("finished trials");
        assert!(behind_the_median(epoch, median + 0.01, &finished));
        assert!(!behind_the_median(epoch, median, &finished));
        assert!(!behind_the_median(epoch - 1, 10.0, &finished), "warm-up");
        assert!(
            !behind_the_median(epoch, 10.0, &finished[..PRUNE_AFTER_TRIALS - 1]),
            "too few finished trials to judge by"
        );
    }

    #[test]
    fn raw_samples_map_back_to_the_choices() {
        assert_eq!(index_of(&WINDOWS, 64), 2.5);
        assert_eq!(index_of(&WINDOWS, 7), 0.0);
        assert_eq!(median(vec![3.0, f64::NAN, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![]), None);
    }
}
