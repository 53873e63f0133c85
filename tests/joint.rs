//! A joint model (`training.joint`) through the exporter's scoring path and ONNX Runtime: the
//! rows it is fed are the rows it was trained on, each input is forecast from all inputs of its
//! group, a group missing an input or new to the model still scores, and a model whose
//! declared inputs do not match its graph is refused.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use mad::model::Forecaster;
use mad::score::{Detection, DetectorScorer, Score, Scoring};
use mad::source::{Labels, Series};
use mad_training::contract::{columns, joint_input_row, series_key, INPUT_LABEL};
use mad_training::{SeriesHistory, TrainOptions, TrainedModel};

const STEP: i64 = 60;
const T0: i64 = 1_700_000_040;
const TRAINED: usize = 1_500;
const POINTS: usize = 1_800;

/// Input `a` is noise; input `b` repeats it two steps late, so only a model that reads `a`
/// can forecast `b`.
fn echo(seed: u64) -> (Vec<f64>, Vec<f64>) {
    // xorshift64: reproducible noise without another dependency.
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let a: Vec<f64> = (0..POINTS)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            100.0 + 20.0 * ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5)
        })
        .collect();
    let b = (0..POINTS)
        .map(|t| if t < 2 { 100.0 } else { a[t - 2] })
        .collect();
    (a, b)
}

fn labels(host: &str, input: &str) -> Labels {
    [
        ("host".to_string(), host.to_string()),
        (INPUT_LABEL.to_string(), input.to_string()),
    ]
    .into()
}

fn ts(i: usize) -> i64 {
    T0 + i as i64 * STEP
}

fn train_joint() -> TrainedModel {
    let (a, b) = echo(1);
    let history = |input: &str, values: &[f64]| SeriesHistory {
        labels: labels("h1", input),
        timestamps: (0..TRAINED).map(ts).collect(),
        values: values[..TRAINED].to_vec(),
    };
    let opts = TrainOptions {
        hidden: 16,
        window: 16,
        max_epochs: 30,
        learning_rate: 5e-3,
        joint: true,
        ..TrainOptions::default()
    };
    mad_training::train(
        "echo",
        STEP as u64,
        &[history("a", &a), history("b", &b)],
        &opts,
        &mut |_| {},
    )
    .expect("trains")
}

fn band_scorer(model: &TrainedModel) -> DetectorScorer {
    let forecaster = Forecaster::load(&model.onnx, "v1", "echo", None).expect("loads");
    DetectorScorer::new(Arc::new(forecaster), 3600).with_detection(Detection {
        scoring: Scoring::Band,
        ..Detection::default()
    })
}

/// Scores `host`'s inputs from `from` on, a few points per cycle; per input, its scores by row.
fn replay(
    scorer: &mut DetectorScorer,
    host: &str,
    values: &[(&str, &[f64])],
    from: usize,
    skip: impl Fn(&str, usize) -> bool,
) -> BTreeMap<String, BTreeMap<usize, Score>> {
    let warmup = scorer.warmup_points();
    let mut scores: BTreeMap<String, BTreeMap<usize, Score>> = BTreeMap::new();
    let mut end = from + warmup + 1;
    let mut start = from;
    while end <= POINTS {
        let fetched: Vec<Series> = values
            .iter()
            .map(|(input, v)| Series {
                labels: labels(host, input),
                points: (start..end)
                    .filter(|i| !skip(input, *i))
                    .map(|i| (ts(i), v[i]))
                    .collect(),
            })
            .collect();
        let (_, scored) = scorer
            .score_cycle(&fetched, ts(end - 1) + 1)
            .expect("cycle");
        for (index, points) in scored {
            let input = fetched[index].labels[INPUT_LABEL].clone();
            for s in points {
                let row = ((s.ts - T0) / STEP) as usize;
                scores.entry(input.clone()).or_default().insert(row, s);
            }
        }
        start = end.saturating_sub(2);
        end += 3;
    }
    scores
}

fn mean_error(scores: &BTreeMap<usize, Score>) -> f64 {
    scores.values().map(|s| (s.y - s.yhat).abs()).sum::<f64>() / scores.len() as f64
}

#[test]
fn each_input_is_forecast_from_every_input_of_its_group_as_in_training() {
    let model = train_joint();
    assert_eq!(model.meta.inputs, ["a", "b"]);
    let mut scorer = band_scorer(&model);
    let (a, b) = echo(1);
    let from = TRAINED;
    let scores = replay(&mut scorer, "h1", &[("a", &a), ("b", &b)], from, |_, _| {
        false
    });
    let (ea, eb) = (mean_error(&scores["a"]), mean_error(&scores["b"]));
    println!("mean |y - yhat|: a {ea:.3}, b {eb:.3}");
    assert!(eb < 0.5 * ea, "b follows a: errors a {ea}, b {eb}");
    assert_eq!(scores["a"].len(), scores["b"].len());

    // The same rows through the trainer's own forward pass, from the stream's start.
    let width = model.meta.inputs.len();
    let f = columns(&model.meta.features, width);
    let scalers: Vec<_> = ["a", "b"]
        .iter()
        .map(|input| model.meta.series[&series_key(&labels("h1", input))].scaler)
        .collect();
    let rows = POINTS - from;
    let mut x = vec![0f32; rows * f];
    for r in 0..rows {
        let i = from + r;
        let scaled = [scalers[0].scale(a[i]) as f32, scalers[1].scale(b[i]) as f32];
        joint_input_row(
            &model.meta.features,
            ts(i),
            &scaled,
            &mut x[r * f..(r + 1) * f],
        );
    }
    let zeros = vec![0f32; model.meta.hidden];
    let out = model
        .params
        .forward_f32(&x, rows, 1, &zeros, &zeros)
        .expect("runs");
    for (column, (input, scaler)) in ["a", "b"].iter().zip(&scalers).enumerate() {
        for (row, score) in &scores[*input] {
            let r = row - from;
            assert!(
                r >= model.meta.window,
                "row {row} scored inside the warm-up"
            );
            let expected = scaler.unscale(f64::from(out.yhat[(r - 1) * width + column]));
            assert!(
                (score.yhat - expected).abs() <= 1e-3 * expected.abs().max(1.0),
                "{input} row {row}: exporter {} vs trainer {expected}",
                score.yhat
            );
        }
    }
}

#[test]
fn a_group_missing_an_input_or_new_to_the_model_still_scores() {
    let model = train_joint();
    let mut scorer = band_scorer(&model);
    let (a, b) = echo(7);
    // A host the model never saw, with only input `a`.
    let lone = replay(&mut scorer, "h9", &[("a", &a)], 100, |_, _| false);
    assert!(lone["a"].len() > 100, "{}", lone["a"].len());
    assert!(lone["a"]
        .values()
        .all(|s| s.score.is_finite() && s.yhat.is_finite()));
    assert!(!lone.contains_key("b"));

    // Input `b` misses every tenth point: those rows are not scored for `b`, but are for `a`.
    let mut scorer = band_scorer(&model);
    let scores = replay(
        &mut scorer,
        "h1",
        &[("a", &a), ("b", &b)],
        100,
        |input, i| input == "b" && i % 10 == 0,
    );
    let missing: Vec<usize> = scores["a"]
        .keys()
        .filter(|row| !scores["b"].contains_key(row))
        .copied()
        .collect();
    assert!(!missing.is_empty());
    assert!(missing.iter().all(|row| row % 10 == 0), "{missing:?}");
    assert!(scores["b"].keys().all(|row| row % 10 != 0));
}

#[test]
fn a_joint_model_whose_graph_does_not_match_its_inputs_is_refused() {
    let mut model = train_joint();
    // Three declared inputs, a graph built for two.
    model.meta.inputs.push("c".to_string());
    let bytes = mad_training::onnx::export(&model.params, &model.meta);
    let err = Forecaster::load(&bytes, "v2", "echo", None).expect_err("refused");
    assert!(err.to_string().contains("dimension"), "{err}");
    model.meta.inputs = vec!["a".to_string(), "a".to_string()];
    let bytes = mad_training::onnx::export(&model.params, &model.meta);
    let err = Forecaster::load(&bytes, "v2", "echo", None).expect_err("refused");
    assert!(err.to_string().contains("distinct"), "{err}");
}
