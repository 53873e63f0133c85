//! The scorer's promises, checked through ONNX Runtime on a real (untrained) model: carried state
//! equals one run over the same history, batching changes nothing, new series score on their
//! first cycle (and one seen from its first point scales itself on a warm-up, not on that
//! point), gaps are bridged or restart the stream, stale series disappear, a jump the model
//! follows is still seen.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{STEP, WINDOW};
use mad::expose::Exposition;
use mad::score::{CycleStats, Detection, DetectorScorer, Score, Scoring};
use mad::source::{Labels, Series};
use mad_training::contract::{input_row, Feature, Scaler, SeriesCalibration, ValueRange};
use mad_training::weekly::WeeklyProfile;

const T0: i64 = 1_700_000_040; // a multiple of STEP
const POINTS: usize = 120;

fn labels(instance: &str) -> Labels {
    [("instance".to_string(), instance.to_string())].into()
}

fn value(series: usize, i: usize) -> f64 {
    let t = i as f64;
    50.0 + 10.0 * (t / 7.0 + series as f64).sin() + 3.0 * ((t * 1.7).cos() * (series + 1) as f64)
}

fn series(instance: &str, index: usize, points: std::ops::Range<usize>) -> Series {
    Series {
        labels: labels(instance),
        points: points
            .map(|i| (T0 + i as i64 * STEP, value(index, i)))
            .collect(),
    }
}

/// A scorer whose scores are the band deviations themselves: the stream mechanics below are
/// easiest to check on those (the likelihood is checked on its own at the end).
fn band_scorer(model: Arc<mad::model::Forecaster>, staleness: i64) -> DetectorScorer {
    DetectorScorer::new(model, staleness).with_detection(Detection {
        scoring: Scoring::Band,
        ..Detection::default()
    })
}

/// A series' calibration with the given scaler and band, no range and no fitted span.
fn calibration(center: f64, scale: f64, band: f64) -> SeriesCalibration {
    SeriesCalibration {
        scaler: Scaler { center, scale },
        band,
        range: None,
        fitted_until: None,
        weekly: None,
    }
}

/// An untrained model with a calibration for series "a".
fn calibrated_for_a(calibration: SeriesCalibration) -> Arc<mad::model::Forecaster> {
    version_for_a("v1", calibration, false)
}

/// The same as `version`, marked as continuing the one before when `continued`.
fn version_for_a(
    version: &str,
    calibration: SeriesCalibration,
    continued: bool,
) -> Arc<mad::model::Forecaster> {
    let mut meta = common::meta("d", 1.0);
    meta.series.insert(
        mad_training::contract::series_key(&labels("a")),
        calibration,
    );
    if continued {
        meta.training
            .insert(mad_training::CONTINUED_META_KEY.into(), true.into());
    }
    let bytes = common::model_bytes(&meta);
    Arc::new(mad::model::Forecaster::load(&bytes, version, "d", None).expect("test model loads"))
}

fn now_after(i: usize) -> i64 {
    T0 + i as i64 * STEP + 1
}

/// Runs one cycle and adds its scores, by (instance, ts).
fn cycle(
    scorer: &mut DetectorScorer,
    fetched: &[Series],
    now: i64,
    into: &mut BTreeMap<(String, i64), Score>,
) -> CycleStats {
    let (stats, scored) = scorer.score_cycle(fetched, now).expect("cycle");
    for (index, scores) in scored {
        for s in scores {
            into.insert((fetched[index].labels["instance"].clone(), s.ts), s);
        }
    }
    stats
}

/// Feeds the warm-up window in one cycle, then one new point per cycle, each fetch overlapping
/// the previous one as a real lookback does.
fn score_incrementally(
    scorer: &mut DetectorScorer,
    instances: &[&str],
) -> BTreeMap<(String, i64), Score> {
    let mut scores = BTreeMap::new();
    let fetch = |range: std::ops::Range<usize>| -> Vec<Series> {
        instances
            .iter()
            .enumerate()
            .map(|(k, name)| series(name, k, range.clone()))
            .collect()
    };
    cycle(
        scorer,
        &fetch(0..WINDOW + 1),
        now_after(WINDOW),
        &mut scores,
    );
    for i in WINDOW + 1..POINTS {
        let stats = cycle(scorer, &fetch(i - 2..i + 1), now_after(i), &mut scores);
        assert_eq!(
            stats.points_fed,
            instances.len(),
            "only the new point is fed"
        );
    }
    scores
}

#[test]
fn carried_state_matches_one_run_over_the_same_history() {
    carried_state_matches_one_run(1);
}

#[test]
fn carried_state_of_stacked_layers_matches_one_run() {
    carried_state_matches_one_run(2);
}

fn carried_state_matches_one_run(layers: usize) {
    let model = Arc::new(common::stacked_forecaster("d", 1e9, layers));
    let mut scorer = band_scorer(model.clone(), 3600);
    let scores = score_incrementally(&mut scorer, &["a"]);
    assert_eq!(
        scores.len(),
        POINTS - WINDOW,
        "every point after the warm-up is scored once"
    );

    // The reference: one run from zero state over the whole history, scaler fitted as the scorer
    // fits it for a series the model has not seen (on its first cycle's points).
    let first: Vec<f64> = (0..=WINDOW).map(|i| value(0, i)).collect();
    let scaler = Scaler::fit(&first);
    let features = Feature::DEFAULT;
    let mut x = vec![0f32; POINTS * features.len()];
    for i in 0..POINTS {
        let row = &mut x[i * features.len()..(i + 1) * features.len()];
        input_row(
            &features,
            T0 + i as i64 * STEP,
            scaler.scale(value(0, i)) as f32,
            row,
        );
    }
    let zeros = vec![0f32; layers * common::HIDDEN];
    let out = model
        .run(&x, POINTS, 1, &zeros, &zeros)
        .expect("reference run");
    for i in WINDOW..POINTS {
        let expected = scaler.unscale(f64::from(out.yhat[i - 1]));
        let got = scores[&("a".to_string(), T0 + i as i64 * STEP)];
        assert!(
            (got.yhat - expected).abs() <= 1e-4 * expected.abs().max(1.0),
            "point {i}: carried state forecast {} vs re-run {expected}",
            got.yhat
        );
    }
}

#[test]
fn many_points_in_one_cycle_equal_one_point_per_cycle() {
    let model = Arc::new(common::forecaster("d", 0.05));
    let mut stepwise = band_scorer(model.clone(), 3600);
    let one_by_one = score_incrementally(&mut stepwise, &["a", "b"]);
    let mut bulk = band_scorer(model, 3600);
    let mut all = BTreeMap::new();
    let fetch =
        |range: std::ops::Range<usize>| vec![series("a", 0, range.clone()), series("b", 1, range)];
    cycle(
        &mut bulk,
        &fetch(0..WINDOW + 1),
        now_after(WINDOW),
        &mut all,
    );
    cycle(&mut bulk, &fetch(0..POINTS), now_after(POINTS), &mut all);
    assert_eq!(one_by_one.len(), all.len());
    // A tight band makes some points anomalous: scores far from 0 are compared too.
    assert!(all.values().any(|s| s.score > 1.0));
    for (key, a) in &one_by_one {
        let b = all[key];
        assert!(
            (a.score - b.score).abs() < 1e-5 * a.score.max(1.0),
            "{key:?}: {a:?} vs {b:?}"
        );
    }
}

#[test]
fn batching_series_together_changes_no_score() {
    batching_changes_no_score(1);
}

/// Several layers' states are interleaved per series in a batch: a mix-up would show here.
#[test]
fn batching_series_of_a_stacked_model_changes_no_score() {
    batching_changes_no_score(2);
}

fn batching_changes_no_score(layers: usize) {
    let model = Arc::new(common::stacked_forecaster("d", 0.5, layers));
    let mut together = band_scorer(model.clone(), 3600);
    let joint = score_incrementally(&mut together, &["a", "b", "c"]);
    for (k, name) in ["a", "b", "c"].iter().enumerate() {
        let mut alone = band_scorer(model.clone(), 3600);
        // Same data as in the joint run: series index k under its own name.
        let mut scores = BTreeMap::new();
        cycle(
            &mut alone,
            &[series(name, k, 0..WINDOW + 1)],
            now_after(WINDOW),
            &mut scores,
        );
        for i in WINDOW + 1..POINTS {
            cycle(
                &mut alone,
                &[series(name, k, i - 2..i + 1)],
                now_after(i),
                &mut scores,
            );
        }
        for (key, s) in scores {
            let j = joint[&key];
            assert!(
                (s.yhat - j.yhat).abs() < 1e-4,
                "{key:?}: alone {s:?} vs batched {j:?}"
            );
        }
    }
}

#[test]
fn new_series_score_on_their_first_cycle() {
    let model = Arc::new(common::forecaster("d", 1.0));
    let mut scorer = band_scorer(model, 3600);
    let (stats, scored) = scorer
        .score_cycle(&[series("a", 0, 0..50)], now_after(49))
        .expect("cycle");
    assert_eq!(stats.new_series, 1);
    assert_eq!(
        stats.points_fed,
        WINDOW + 1,
        "a new series is warmed on one window, not all history"
    );
    assert_eq!(scored.len(), 1);
    assert_eq!(scored[0].1.len(), 1);
    assert_eq!(scored[0].1[0].ts, T0 + 49 * STEP);
}

#[test]
fn a_series_born_after_training_fits_its_scaler_on_a_warm_up_not_on_its_first_point() {
    let model = Arc::new(common::forecaster("d", 1e9));
    // Seen from its first point on, one point a cycle: a pod that has just started.
    let mut born = band_scorer(model.clone(), 3600);
    let mut from_birth = BTreeMap::new();
    for i in 0..POINTS {
        let fetched = [series("a", 0, i.saturating_sub(2)..i + 1)];
        let stats = cycle(&mut born, &fetched, now_after(i), &mut from_birth);
        if i + 1 < WINDOW {
            assert_eq!(
                stats.points_fed, 0,
                "point {i}: held until a warm-up is there"
            );
        }
    }
    // Seen first with its warm-up already in the datasource.
    let mut late = band_scorer(model, 3600);
    let mut reference = BTreeMap::new();
    cycle(
        &mut late,
        &[series("a", 0, 0..WINDOW)],
        now_after(WINDOW - 1),
        &mut reference,
    );
    for i in WINDOW..POINTS {
        cycle(
            &mut late,
            &[series("a", 0, i - 2..i + 1)],
            now_after(i),
            &mut reference,
        );
    }
    assert_eq!(
        from_birth.len(),
        POINTS - WINDOW,
        "scores start after the warm-up"
    );
    for (key, expected) in &reference {
        let got = from_birth.get(key).expect("the same points are scored");
        assert!(
            (got.yhat - expected.yhat).abs() <= 1e-9 * expected.yhat.abs().max(1.0),
            "{key:?}: forecast {} from birth vs {} with the warm-up at once",
            got.yhat,
            expected.yhat
        );
    }
}

#[test]
fn a_series_born_after_training_borrows_the_spread_of_the_calibrated_ones() {
    // Calibrated series vary by 30 % of their level.
    let mut meta = common::meta("d", 1.0);
    for (name, center) in [("x", 100.0), ("y", 200.0), ("z", 40.0)] {
        meta.series.insert(
            mad_training::contract::series_key(&labels(name)),
            calibration(center, 0.3 * center, 1.0),
        );
    }
    let params = mad_training::LstmParams::init(Feature::DEFAULT.len(), common::HIDDEN, 5);
    let model =
        mad::model::Forecaster::load(&mad_training::onnx::export(&params, &meta), "v1", "d", None)
            .expect("test model loads");
    let mut scorer = band_scorer(Arc::new(model), 3600);
    // A new series whose warm-up is almost flat: fitted alone, its scale would be tiny.
    let flat = |i: usize| 50.0 + 0.01 * (i % 3) as f64;
    let mut scores = BTreeMap::new();
    for i in 0..WINDOW + 3 {
        let fetched = [Series {
            labels: labels("new"),
            points: (i.saturating_sub(2)..=i)
                .map(|k| (T0 + k as i64 * STEP, flat(k)))
                .collect(),
        }];
        cycle(&mut scorer, &fetched, now_after(i), &mut scores);
    }
    let (_, state, _) = scorer
        .latest()
        .find(|(l, _, _)| l["instance"] == "new")
        .expect("the new series is scored");
    assert!(
        (state.scaler.scale - 0.3 * state.scaler.center).abs() < 1e-9,
        "scale {} for a level of {}",
        state.scaler.scale,
        state.scaler.center
    );
}

#[test]
fn short_gaps_are_bridged_and_long_gaps_carry_the_state() {
    let model = Arc::new(common::forecaster("d", 1.0));
    let mut scorer = band_scorer(model, 3600);
    scorer
        .score_cycle(&[series("a", 0, 0..WINDOW + 1)], now_after(WINDOW))
        .expect("warm-up");
    // Three missing points (NaN and absent), then data again: bridged, only observed points scored.
    let mut s = series("a", 0, WINDOW + 1..WINDOW + 8);
    s.points[0].1 = f64::NAN;
    s.points.remove(1);
    s.points[1].1 = f64::INFINITY;
    let (stats, scored) = scorer
        .score_cycle(&[s], now_after(WINDOW + 7))
        .expect("gap cycle");
    assert_eq!(
        stats.points_fed, 7,
        "missing points are interpolated and fed"
    );
    let ts: Vec<i64> = scored[0].1.iter().map(|s| (s.ts - T0) / STEP).collect();
    assert_eq!(ts, vec![12, 13, 14, 15], "missing points are not scored");

    // A gap longer than MAX_INTERPOLATED_GAP: nothing is made up for it, the state goes on;
    // the first point after the gap is fed unscored, the next ones are scored (no new warm-up).
    let resume = WINDOW + 8 + 20;
    let (stats, scored) = scorer
        .score_cycle(&[series("a", 0, resume..resume + 3)], now_after(resume + 2))
        .expect("after long gap");
    assert_eq!((stats.points_fed, stats.new_series), (3, 0));
    let ts: Vec<i64> = scored[0].1.iter().map(|s| (s.ts - T0) / STEP).collect();
    assert_eq!(ts, vec![resume as i64 + 1, resume as i64 + 2]);
}

#[test]
fn stale_series_disappear_from_the_exposition() {
    let model = Arc::new(common::forecaster("d", 1.0));
    let staleness = 5 * STEP;
    let mut scorer = band_scorer(model, staleness);
    scorer
        .score_cycle(
            &[series("a", 0, 0..WINDOW + 1), series("b", 1, 0..WINDOW + 1)],
            now_after(WINDOW),
        )
        .expect("cycle");
    let mut exposition = Exposition::default();
    exposition.update("d", &scorer, false);
    assert_eq!(exposition.series_count(), 2);
    // "b" stops reporting; after the staleness period it is gone, "a" stays.
    for i in WINDOW + 1..WINDOW + 8 {
        scorer
            .score_cycle(&[series("a", 0, i - 1..i + 1)], now_after(i))
            .expect("cycle");
    }
    exposition.update("d", &scorer, false);
    let mut out = String::new();
    exposition.write_to(&mut out);
    assert_eq!(exposition.series_count(), 1, "{out}");
    assert!(
        out.contains("instance=\"a\"") && !out.contains("instance=\"b\""),
        "{out}"
    );
    assert_eq!(scorer.len(), 1);
}

#[test]
fn failed_datasource_cycle_drops_scores_but_keeps_state() {
    let model = Arc::new(common::forecaster("d", 1.0));
    let mut scorer = band_scorer(model, 3600);
    scorer
        .score_cycle(&[series("a", 0, 0..WINDOW + 1)], now_after(WINDOW))
        .expect("cycle");
    scorer.clear_latest();
    let mut exposition = Exposition::default();
    exposition.update("d", &scorer, false);
    assert_eq!(exposition.series_count(), 0);
    let (stats, scored) = scorer
        .score_cycle(&[series("a", 0, WINDOW..WINDOW + 2)], now_after(WINDOW + 1))
        .expect("recovery");
    assert_eq!(
        (stats.new_series, scored.len()),
        (0, 1),
        "recovers within one cycle, no new warm-up"
    );
}

/// `detection:` shapes the score: with `direction: above` nothing below the forecast scores,
/// and a minimum deviation widens the band the score and the exported bounds use.
#[test]
fn direction_and_minimum_deviation_shape_scores_and_bands() {
    use mad::score::Direction;
    // A tiny band: every deviation of the untrained model is "anomalous" by default.
    let model = Arc::new(common::forecaster("d", 1e-6));
    let above = Detection {
        direction: Direction::Above,
        scoring: Scoring::Band,
        ..Detection::default()
    };
    let one_sided = score_incrementally(
        &mut DetectorScorer::new(model.clone(), 3600).with_detection(above),
        &["a"],
    );
    let (mut up, mut down) = (0, 0);
    for s in one_sided.values() {
        if s.y > s.yhat {
            up += 1;
            assert!(
                s.score > 1.0,
                "above the forecast, outside a tiny band: {s:?}"
            );
        } else {
            down += 1;
            assert_eq!(s.score, 0.0, "below the forecast: {s:?}");
        }
    }
    assert!(
        up > 0 && down > 0,
        "the data goes both ways: {up} up, {down} down"
    );

    let wide: Detection =
        serde_yaml::from_str("{min_deviation: 1000, scoring: band}").expect("detection settings");
    let floored = score_incrementally(
        &mut DetectorScorer::new(model, 3600).with_detection(wide),
        &["a"],
    );
    for s in floored.values() {
        assert!(s.score < 1.0, "within ±1000 of the forecast: {s:?}");
        assert!((s.upper - s.yhat - 1000.0).abs() < 1e-6, "{s:?}");
    }
}

/// The default scoring (the anomaly likelihood) needs a history of deviations: a new series is
/// primed from its fetched past and scores on its first cycle, and a long gap keeps that
/// history (it is the same series).
#[test]
fn the_likelihood_is_primed_from_history_and_survives_a_long_gap() {
    let model = Arc::new(common::forecaster("d", 1.0));
    let mut scorer = DetectorScorer::new(model, 3600);
    let warmup = scorer.warmup_points();
    assert_eq!(warmup, WINDOW + mad::score::likelihood::MIN_HISTORY);
    let end = warmup + 20;
    let (stats, scored) = scorer
        .score_cycle(&[series("a", 0, 0..end + 1)], now_after(end))
        .expect("cycle");
    assert_eq!(
        stats.points_fed,
        warmup + 1,
        "primed on its warm-up, not all history"
    );
    assert_eq!(scored[0].1.len(), 1, "the newest point is scored at once");
    // A gap longer than the interpolation limit: the state and the likelihood's history go on,
    // so every point after the first one past the gap is scored.
    let restart = end + 20;
    let fetched = series("a", 0, restart..restart + WINDOW + 2);
    let (stats, scored) = scorer
        .score_cycle(&[fetched], now_after(restart + WINDOW + 1))
        .expect("cycle after the gap");
    assert_eq!(stats.new_series, 0);
    assert_eq!(
        scored.first().map(|s| s.1.len()),
        Some(WINDOW + 1),
        "scores resume right after the gap: {scored:?}"
    );
}

/// A value that jumps to exactly what the model forecast is a surprise to "as the last point"
/// but not to the model: the naive forecast counts only as far as the model was surprised too
/// (`NAIVE_CAP`), so a jump the model foresaw is no news.
#[test]
fn a_jump_onto_the_models_forecast_is_no_news() {
    // A narrow band: deviations are large in band units, far from the likelihood's floor.
    let model = Arc::new(common::forecaster("d", 0.01));
    let mut scorer = DetectorScorer::new(model, 3600);
    let end = scorer.warmup_points() + 50;
    let steady = |i: usize| 50.0 + 1e-4 * (i as f64 * 1.3).sin();
    let mut points: Vec<(i64, f64)> = (0..end)
        .map(|i| (T0 + i as i64 * STEP, steady(i)))
        .collect();
    let fetched = Series {
        labels: labels("a"),
        points: points.clone(),
    };
    let (_, scored) = scorer
        .score_cycle(&[fetched], now_after(end - 1))
        .expect("warm-up cycle");
    let last = *scored[0].1.last().expect("the warm-up ends scored");
    let half = last.upper - last.yhat;
    assert!(
        (last.y - last.yhat).abs() > 5.0 * half,
        "the untrained model misses the steady level by many bands: {last:?}"
    );
    assert!(last.score < 1.0, "a steady miss is normal: {last:?}");
    points.push((T0 + end as i64 * STEP, last.yhat));
    let fetched = Series {
        labels: labels("a"),
        points,
    };
    let (_, scored) = scorer
        .score_cycle(&[fetched], now_after(end))
        .expect("cycle with the jump");
    let jump = scored[0].1[0];
    assert!(
        (jump.y - jump.yhat).abs() < half,
        "the jump lands on the forecast: {jump:?}"
    );
    assert!(
        jump.score < 1.0,
        "the model foresaw the jump, many bands from the last value: {jump:?}"
    );
}

/// Every history-based scoring is primed from the fetched past, so a new series scores at
/// once, and a burst far outside the band scores above 1.
#[test]
fn every_scoring_is_primed_at_once_and_flags_a_burst() {
    for scoring in [Scoring::Likelihood, Scoring::Standardized, Scoring::Dynamic] {
        let model = Arc::new(common::forecaster("d", 1.0));
        let mut scorer = DetectorScorer::new(model, 3600).with_detection(Detection {
            scoring,
            ..Detection::default()
        });
        let end = scorer.warmup_points() + 30;
        let (_, scored) = scorer
            .score_cycle(&[series("a", 0, 0..end)], now_after(end - 1))
            .expect("first cycle");
        assert!(!scored.is_empty(), "{scoring:?}: scores on its first cycle");
        let mut points = series("a", 0, 0..end).points;
        for i in end..end + 6 {
            points.push((T0 + i as i64 * STEP, value(0, i) + 1_000.0));
        }
        let last = points.len();
        let fetched = Series {
            labels: labels("a"),
            points,
        };
        let (_, scored) = scorer
            .score_cycle(&[fetched], now_after(last))
            .expect("cycle with the burst");
        let peak = scored[0].1.iter().map(|s| s.score).fold(0.0, f64::max);
        assert!(peak > 1.0, "{scoring:?}: a burst of +1000 scores {peak}");
    }
}

/// A value past everything the series showed in training scores above 1 even where its
/// deviation from the forecast is nothing special; once seen, the same value is not new.
#[test]
fn a_value_beyond_the_trained_range_is_news_once() {
    let mut meta = common::meta("d", 1.0);
    meta.series.insert(
        mad_training::contract::series_key(&labels("a")),
        SeriesCalibration {
            range: Some(ValueRange {
                min: 40.0,
                max: 60.0,
            }),
            // So wide that no deviation from the untrained model's forecast counts.
            ..calibration(50.0, 10.0, 1e6)
        },
    );
    let params = mad_training::LstmParams::init(Feature::DEFAULT.len(), common::HIDDEN, 5);
    let model =
        mad::model::Forecaster::load(&mad_training::onnx::export(&params, &meta), "v1", "d", None)
            .expect("test model loads");
    let mut scorer = band_scorer(Arc::new(model), 3600);
    let end = scorer.warmup_points() + 10;
    let mut points: Vec<(i64, f64)> = (0..end)
        .map(|i| (T0 + i as i64 * STEP, 50.0 + 8.0 * (i as f64 / 7.0).sin()))
        .collect();
    let mut score_next = |value: f64| {
        points.push((T0 + points.len() as i64 * STEP, value));
        let fetched = Series {
            labels: labels("a"),
            points: points.clone(),
        };
        let (_, scored) = scorer
            .score_cycle(&[fetched], now_after(points.len() - 1))
            .expect("cycle");
        scored[0].1.last().map(|s| s.score).expect("scored")
    };
    let inside = score_next(59.0);
    assert!(inside < 0.01, "inside the trained range: {inside}");
    // 1.2 past a range 20 wide: 6% of its width, twice the edge.
    let record = score_next(61.2);
    assert!(record > 1.5, "a new record is anomalous: {record}");
    let again = score_next(61.2);
    assert!(again < 0.01, "the same record again is not news: {again}");
}

/// Points the model was fitted to are fed (the LSTM state needs them) but not scored: their
/// errors are in-sample, smaller than any live one, and the likelihood must not learn "normal"
/// from them. The first point after them is scored at once.
#[test]
fn points_the_model_was_fitted_to_are_fed_but_not_scored() {
    let fitted = WINDOW + 20;
    let scored_from = |fitted_until: Option<i64>| {
        let model = calibrated_for_a(SeriesCalibration {
            fitted_until,
            ..calibration(0.0, 1.0, 1.0)
        });
        let mut scorer = band_scorer(model, 3600);
        let scores = score_incrementally(&mut scorer, &["a"]);
        let first = scores.keys().map(|(_, ts)| *ts).min().expect("scores");
        (first, scores.len())
    };
    let ts = |i: usize| T0 + i as i64 * STEP;
    assert_eq!(
        scored_from(None),
        (ts(WINDOW), POINTS - WINDOW),
        "without a fitted span every point after the warm-up is scored"
    );
    assert_eq!(
        scored_from(Some(ts(fitted))),
        (ts(fitted + 1), POINTS - fitted - 1)
    );
}

const DAY: i64 = 86_400;
const WEEK: i64 = 7 * DAY;

/// Quiet at night, busy around noon; weekends (days 2 and 3 of the Unix week) half as busy.
/// Every day starts from the same night level, so nothing jumps from one day to the next.
fn traffic(ts: i64) -> f64 {
    let weekend = matches!(ts.rem_euclid(WEEK) / DAY, 2 | 3);
    let amplitude = if weekend { 40.0 } else { 80.0 };
    let phase = std::f64::consts::TAU * ts.rem_euclid(DAY) as f64 / DAY as f64;
    let wobble = 3.0 * ((ts / STEP) as f64 * 0.7).sin();
    20.0 + amplitude * (1.0 - phase.cos()) / 2.0 + wobble
}

/// The first Thursday 00:00 UTC (hour 0 of the Unix week) after T0, and the Thursday three
/// weeks later that is shaped like a Saturday (a holiday).
fn holiday_weeks() -> (i64, i64) {
    let start = T0 - T0.rem_euclid(WEEK) + WEEK;
    (start, start + 3 * WEEK)
}

fn with_holiday(ts: i64) -> f64 {
    let (_, holiday) = holiday_weeks();
    if (holiday..holiday + DAY).contains(&ts) {
        traffic(ts + 2 * DAY)
    } else {
        traffic(ts)
    }
}

/// Scores series "a" from `from` to `to`: a first cycle of two hours, then an hour per cycle.
fn score_hourly(scorer: &mut DetectorScorer, from: i64, to: i64) -> BTreeMap<(String, i64), Score> {
    let points = |from: i64, to: i64| Series {
        labels: labels("a"),
        points: (from..to)
            .step_by(STEP as usize)
            .map(|ts| (ts, with_holiday(ts)))
            .collect(),
    };
    let mut scores = BTreeMap::new();
    let hour = 3_600;
    let mut end = from + 2 * hour;
    cycle(scorer, &[points(from, end)], end, &mut scores);
    while end < to {
        cycle(
            scorer,
            &[points(end - 2 * STEP, end + hour)],
            end + hour,
            &mut scores,
        );
        end += hour;
    }
    scores
}

/// The highest score of the day from `from`.
fn peak_of_day(scores: &BTreeMap<(String, i64), Score>, from: i64) -> f64 {
    scores
        .range(("a".to_string(), from)..("a".to_string(), from + DAY))
        .map(|(_, s)| s.score)
        .fold(0.0, f64::max)
}

/// A weekday shaped like a weekend day (a holiday) changes as smoothly as any other day, so the
/// previous value sees nothing; the weekly profile does. The same weekday a week before, shaped
/// as usual, stays quiet.
#[test]
fn a_holiday_is_seen_against_the_same_hours_of_earlier_weeks() {
    let model = Arc::new(common::forecaster("d", 0.5));
    let mut scorer = DetectorScorer::new(model, WEEK);
    let (start, holiday) = holiday_weeks();
    let scores = score_hourly(&mut scorer, start, holiday + DAY);
    let (usual, unusual) = (
        peak_of_day(&scores, holiday - WEEK),
        peak_of_day(&scores, holiday),
    );
    assert!(usual < 1.0, "the same weekday a week before: {usual}");
    assert!(unusual > 1.0, "the holiday: {unusual}");
}

/// The trainer ships the weekly profile it learnt with the model: an exporter started hours
/// before the holiday sees it, where one without the profile has no week to compare with.
#[test]
fn a_profile_shipped_with_the_model_is_compared_with_from_a_restart_on() {
    let (start, holiday) = holiday_weeks();
    let mut learnt = WeeklyProfile::new(STEP);
    for ts in (start..holiday - DAY).step_by(STEP as usize) {
        learnt.learn(ts, with_holiday(ts));
    }
    let restarted = |weekly| {
        let model = calibrated_for_a(SeriesCalibration {
            weekly,
            ..calibration(50.0, 30.0, 0.05)
        });
        let mut scorer = DetectorScorer::new(model, WEEK);
        let scores = score_hourly(&mut scorer, holiday - 8 * 3_600, holiday + DAY);
        peak_of_day(&scores, holiday)
    };
    let seeded = restarted(Some(
        learnt.seed().expect("the profile describes the series"),
    ));
    let unseeded = restarted(None);
    assert!(seeded > 1.0, "with the shipped profile: {seeded}");
    assert!(unseeded < 1.0, "without it: {unseeded}");
}

/// Series "a" calibrated with `scaler` and a band of 1.
fn scaled_by(scaler: Scaler) -> SeriesCalibration {
    calibration(scaler.center, scaler.scale, 1.0)
}

#[test]
fn a_continued_model_goes_on_with_its_series_states() {
    let scaler = Scaler {
        center: 50.0,
        scale: 5.0,
    };
    let fed = |scorer: &mut DetectorScorer| {
        for i in WINDOW..60 {
            let from = if i == WINDOW { 0 } else { i - 2 };
            cycle(
                scorer,
                &[series("a", 0, from..i + 1)],
                now_after(i),
                &mut BTreeMap::new(),
            );
        }
    };
    let next = |scorer: &mut DetectorScorer| {
        let mut scores = BTreeMap::new();
        cycle(
            scorer,
            &[series("a", 0, 58..61)],
            now_after(60),
            &mut scores,
        );
        scores
            .get(&("a".to_string(), T0 + 60 * STEP))
            .map(|s| s.score)
    };
    let mut unchanged = band_scorer(version_for_a("v1", scaled_by(scaler), false), i64::MAX / 4);
    fed(&mut unchanged);
    let expected = next(&mut unchanged).expect("the old model scores the next point");

    // The new version continues v1 (same weights here) with the same scaler: the series goes
    // on where it was, scoring the next point from a three-point fetch as v1 would have.
    let mut old = band_scorer(version_for_a("v1", scaled_by(scaler), false), i64::MAX / 4);
    fed(&mut old);
    let mut continued = band_scorer(version_for_a("v2", scaled_by(scaler), true), i64::MAX / 4);
    assert_eq!(continued.go_on_from(old), 1);
    assert_eq!(next(&mut continued), Some(expected));

    // A model trained afresh, or one whose scaler moved, starts the series over: three points
    // are no warm-up, so nothing is scored yet.
    for (model, what) in [
        (
            version_for_a("v3", scaled_by(scaler), false),
            "trained afresh",
        ),
        (
            version_for_a(
                "v4",
                scaled_by(Scaler {
                    center: 51.0,
                    ..scaler
                }),
                true,
            ),
            "another scaler",
        ),
    ] {
        let mut old = band_scorer(version_for_a("v1", scaled_by(scaler), false), i64::MAX / 4);
        fed(&mut old);
        let mut new = band_scorer(model, i64::MAX / 4);
        assert_eq!(new.go_on_from(old), 0, "{what}");
        assert_eq!(next(&mut new), None, "{what}");
    }
}
