//! Scoring benchmarks: what the exporter costs per series.
//!
//! 1. Exporter CPU time per series per scoring cycle, 10,000 series, window 64, hidden 32, in
//!    three modes, each as a ratio to mode A:
//!    - A: every cycle each series re-runs its last 64 points from zero state (seq 64, batch 1);
//!    - B: state carried, one series per run (seq 1, batch 1);
//!    - C: state carried and batched: `DetectorScorer::score_cycle`, one run with batch 10,000;
//!    - D: as C with a joint model (`training.joint`) over groups of [`JOINT_INPUTS`] inputs:
//!      the same 10,000 series as 2,500 groups, one run with batch 2,500.
//!
//!    The modes are interleaved round by round so machine noise hits them alike.
//! 2. `/metrics` render time with 100,000 series: `Exposition::update` (once per cycle) and
//!    `Exposition::write_to` (per scrape), timed separately.
//! 3. Resident memory per scored series (VmRSS before and after building the 100,000-series
//!    scorer state).
//!
//! The model is built without training (random initial parameters exported to ONNX): inference
//! cost does not depend on the weights. Figures are printed, never asserted.
//!
//! Run: `cargo bench --bench scoring` (needs `.ort/libonnxruntime.so`, see
//! scripts/fetch-onnxruntime.sh).

use std::collections::BTreeMap;
use std::sync::Arc;

mod common;

use std::time::Instant;

use common::{measure, process_cpu, summarise, thread_cpu, Summary};
use mad::expose::Exposition;
use mad::model::Forecaster;
use mad::score::DetectorScorer;
use mad::source::{Labels, Series};
use mad::synth::{Profile, Synth};
use mad_training::contract::{
    columns, input_row, Feature, ModelMeta, Scaler, CONTRACT_VERSION, INPUT_LABEL,
};
use mad_training::{onnx, LstmParams};

const DETECTOR: &str = "bench";
const HIDDEN: usize = 32;
const WINDOW: usize = 64;
const STEP: i64 = 60;
/// A step-aligned start time (2023-11-14).
const T0: i64 = 1_699_999_980;
const SCORING_SERIES: usize = 10_000;
/// Inputs per group of mode D's joint model.
const JOINT_INPUTS: usize = 4;
const RENDER_SERIES: usize = 100_000;
/// Series per warm-up `score_cycle` when filling the 100,000-series scorer, to keep the
/// transient input buffers small next to the state being measured.
const FILL_CHUNK: usize = 10_000;
/// Untimed rounds before the timed ones, and timed rounds (the median is reported).
const WARMUP_ROUNDS: usize = 1;
const TIMED_ROUNDS: usize = 7;
/// Timed steady cycles of the 100,000-series scorer.
const STEADY_100K_CYCLES: usize = 3;
/// Staleness far beyond the bench's time span: no series expires.
const STALENESS_SECS: i64 = 365 * 86_400;

/// VmRSS of this process in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/self/status");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS value");
    kb * 1024
}

/// Returns free heap memory to the system, so RSS shows live memory only.
fn trim_heap() {
    // SAFETY: glibc's malloc_trim takes no pointers and only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

// ---------------------------------------------------------------------------------------------
// Model and data

/// An untrained model with the production shape, exported to ONNX and loaded like a real one.
fn bench_model() -> Arc<Forecaster> {
    model_over(Vec::new())
}

/// An untrained joint model over `inputs` (none: a per-series model).
fn model_over(inputs: Vec<String>) -> Arc<Forecaster> {
    let features = Feature::DEFAULT.to_vec();
    let width = inputs.len().max(1);
    let params = LstmParams::<f32>::init_multi(columns(&features, width), HIDDEN, 1, width, 7);
    let meta = ModelMeta {
        contract_version: CONTRACT_VERSION,
        detector: DETECTOR.to_string(),
        features,
        inputs,
        hidden: HIDDEN,
        layers: 1,
        step_secs: STEP as u64,
        window: WINDOW,
        series: BTreeMap::new(),
        default_band: 1.0,
        train_start: 0,
        train_end: 0,
        trained_at: 0,
        training: BTreeMap::new(),
    };
    let bytes = onnx::export(&params, &meta);
    let model = Forecaster::load(&bytes, "bench-1", DETECTOR, None)
        .unwrap_or_else(|e| panic!("cannot load the bench model: {e}"));
    Arc::new(model)
}

fn host_labels(i: usize) -> Labels {
    let mut labels = Labels::new();
    labels.insert("instance".to_string(), format!("host-{i}"));
    labels
}

/// `n` plausible series: CPU-like or request-rate-like levels with a daily rhythm, a weekend dip
/// and noise, each with its own level.
fn synth(n: usize) -> Synth {
    let profiles = (0..n)
        .map(|i| Profile {
            metric: "bench_metric".to_string(),
            labels: host_labels(i),
            base: 5.0 + (i % 997) as f64 * 1.7,
            daily: 0.2 + (i % 7) as f64 * 0.05,
            weekend_dip: 0.1,
            fast: 0.0,
            fast_period_secs: 1.0,
            trend_per_week: 0.01,
            noise: 0.03,
        })
        .collect();
    Synth {
        profiles,
        incidents: Vec::new(),
        seed: 2024,
        origin: T0,
    }
}

/// Grid time of point `k`.
fn ts_of(k: usize) -> i64 {
    T0 + k as i64 * STEP
}

/// Series `first..first + count`, each with points `from..=to` (grid indices), as a range query
/// returns them.
fn fetch(synth: &Synth, first: usize, count: usize, from: usize, to: usize) -> Vec<Series> {
    fetch_labelled(synth, first..first + count, from, to, host_labels)
}

/// As [`fetch`], the series labelled by `labels`.
fn fetch_labelled(
    synth: &Synth,
    series: std::ops::Range<usize>,
    from: usize,
    to: usize,
    labels: fn(usize) -> Labels,
) -> Vec<Series> {
    series
        .map(|i| Series {
            labels: labels(i),
            points: (from..=to)
                .map(|k| (ts_of(k), synth.value(i, ts_of(k))))
                .collect(),
        })
        .collect()
}

/// Series `i` as input `i % JOINT_INPUTS` of group `i / JOINT_INPUTS`.
fn joint_labels(i: usize) -> Labels {
    let mut labels = host_labels(i / JOINT_INPUTS);
    labels.insert(INPUT_LABEL.to_string(), format!("in{}", i % JOINT_INPUTS));
    labels
}

/// The part of a score the bench-side scorers keep, mirroring `mad::score::Score`.
#[derive(Debug, Clone, Copy, Default)]
struct Latest {
    yhat: f64,
    score: f64,
}

fn score_of(y: f64, yhat_scaled: f32, scaler: &Scaler, band: f64) -> Latest {
    let yhat = scaler.unscale(f64::from(yhat_scaled));
    Latest {
        yhat,
        score: (y - yhat).abs() / (band * scaler.scale),
    }
}

// ---------------------------------------------------------------------------------------------
// Mode A: whole window per series, from zero state every cycle.

struct WindowSeries {
    scaler: Scaler,
    /// Input rows of the last `WINDOW` points, oldest first: `[WINDOW, features]`.
    rows: Vec<f32>,
    latest: Latest,
}

struct WindowScorer {
    model: Arc<Forecaster>,
    series: Vec<WindowSeries>,
    zeros: Vec<f32>,
}

impl WindowScorer {
    /// Points `0..WINDOW` of every series fill the windows.
    fn new(model: Arc<Forecaster>, synth: &Synth, n: usize) -> WindowScorer {
        let f = model.features();
        let features = model.meta.features.clone();
        let series = (0..n)
            .map(|i| {
                let raw: Vec<f64> = (0..WINDOW).map(|k| synth.value(i, ts_of(k))).collect();
                let scaler = Scaler::fit(&raw);
                let mut rows = vec![0f32; WINDOW * f];
                for (k, (&v, row)) in raw.iter().zip(rows.chunks_exact_mut(f)).enumerate() {
                    input_row(&features, ts_of(k), scaler.scale(v) as f32, row);
                }
                WindowSeries {
                    scaler,
                    rows,
                    latest: Latest::default(),
                }
            })
            .collect();
        WindowScorer {
            zeros: vec![0f32; model.hidden()],
            model,
            series,
        }
    }

    /// Scores point `k` (value `values[i]` for series `i`): forecast from the window of the 64
    /// points before it, then slide the window.
    fn cycle(&mut self, k: usize, values: &[f64]) {
        let f = self.model.features();
        let features = &self.model.meta.features;
        for (s, &y) in self.series.iter_mut().zip(values) {
            let out = self
                .model
                .run(&s.rows, WINDOW, 1, &self.zeros, &self.zeros)
                .expect("mode A run");
            s.latest = score_of(y, out.yhat[WINDOW - 1], &s.scaler, 1.0);
            s.rows.copy_within(f.., 0);
            let at = (WINDOW - 1) * f;
            input_row(
                features,
                ts_of(k),
                s.scaler.scale(y) as f32,
                &mut s.rows[at..],
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mode B: state carried, one series per run.

struct StreamSeries {
    scaler: Scaler,
    h: Vec<f32>,
    c: Vec<f32>,
    pending: f32,
    latest: Latest,
}

struct StreamScorer {
    model: Arc<Forecaster>,
    series: Vec<StreamSeries>,
    row: Vec<f32>,
}

impl StreamScorer {
    /// Points `0..WINDOW` of every series are fed (in one batched run, untimed) to reach the
    /// steady state.
    fn new(model: Arc<Forecaster>, synth: &Synth, n: usize) -> StreamScorer {
        let (f, hd) = (model.features(), model.hidden());
        let features = model.meta.features.clone();
        let raws: Vec<Vec<f64>> = (0..n)
            .map(|i| (0..WINDOW).map(|k| synth.value(i, ts_of(k))).collect())
            .collect();
        let scalers: Vec<Scaler> = raws.iter().map(|r| Scaler::fit(r)).collect();
        let mut x = vec![0f32; WINDOW * n * f];
        for (b, (raw, scaler)) in raws.iter().zip(&scalers).enumerate() {
            for (k, &v) in raw.iter().enumerate() {
                let at = (k * n + b) * f;
                input_row(
                    &features,
                    ts_of(k),
                    scaler.scale(v) as f32,
                    &mut x[at..at + f],
                );
            }
        }
        let zeros = vec![0f32; n * hd];
        let out = model
            .run(&x, WINDOW, n, &zeros, &zeros)
            .expect("mode B warm-up");
        let series = scalers
            .into_iter()
            .enumerate()
            .map(|(b, scaler)| StreamSeries {
                scaler,
                h: out.h[b * hd..(b + 1) * hd].to_vec(),
                c: out.c[b * hd..(b + 1) * hd].to_vec(),
                pending: out.yhat[(WINDOW - 1) * n + b],
                latest: Latest::default(),
            })
            .collect();
        StreamScorer {
            row: vec![0f32; f],
            model,
            series,
        }
    }

    /// Scores point `k` against the pending forecast, then feeds it with the carried state.
    fn cycle(&mut self, k: usize, values: &[f64]) {
        let features = &self.model.meta.features;
        for (s, &y) in self.series.iter_mut().zip(values) {
            s.latest = score_of(y, s.pending, &s.scaler, 1.0);
            input_row(features, ts_of(k), s.scaler.scale(y) as f32, &mut self.row);
            let out = self
                .model
                .run(&self.row, 1, 1, &s.h, &s.c)
                .expect("mode B run");
            s.h.copy_from_slice(&out.h);
            s.c.copy_from_slice(&out.c);
            s.pending = out.yhat[0];
        }
    }
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let started = Instant::now();
    println!("MAD scoring benchmark (window {WINDOW}, hidden {HIDDEN}, step {STEP} s)");
    let model = bench_model();
    println!(
        "model: untrained, {} features, loaded with Forecaster::load",
        model.features()
    );

    scoring_modes(&model);
    render_and_memory(&model);

    println!(
        "\ntotal bench time {:.1} s (wall)",
        started.elapsed().as_secs_f64()
    );
}

fn scoring_modes(model: &Arc<Forecaster>) {
    let n = SCORING_SERIES;
    println!("\n== Exporter CPU time per series per cycle: {n} series ==");
    let synth = synth(n);

    let mut a = WindowScorer::new(model.clone(), &synth, n);
    let mut b = StreamScorer::new(model.clone(), &synth, n);
    let mut c = DetectorScorer::new(model.clone(), STALENESS_SECS);
    let joint = model_over((0..JOINT_INPUTS).map(|k| format!("in{k}")).collect());
    let mut d = DetectorScorer::new(joint, STALENESS_SECS);
    // Warm-up cycle for C: what a new series needs before its first score (the window, then
    // the likelihood's history), so the next cycles are steady state and score every series.
    // A and B were set up with points 0..64.
    let warm_end = c.warmup_points();
    let warm = fetch(&synth, 0, n, 0, warm_end);
    let ((stats, _), warm_time) = measure(process_cpu, || {
        c.score_cycle(&warm, ts_of(warm_end))
            .expect("mode C warm-up")
    });
    drop(warm);
    println!(
        "C warm-up cycle ({} points per series): {:.2} s CPU, {stats:?}",
        warm_end + 1,
        warm_time.cpu
    );
    assert_eq!(stats.series_scored, n, "the warm-up must reach scoring");
    let warm = fetch_labelled(&synth, 0..n, 0, warm_end, joint_labels);
    let (stats, _) = d
        .score_cycle(&warm, ts_of(warm_end))
        .expect("mode D warm-up");
    drop(warm);
    assert_eq!(
        stats.series_scored, n,
        "the joint warm-up must reach scoring"
    );
    // A and B catch up on the warm-up's last point, which C already scored.
    let values: Vec<f64> = (0..n).map(|i| synth.value(i, ts_of(warm_end))).collect();
    a.cycle(warm_end, &values);
    b.cycle(warm_end, &values);

    let (mut sa, mut sb, mut sc, mut sd, mut srun) = (vec![], vec![], vec![], vec![], vec![]);
    let mut c_stats = None;
    let (f, hd) = (model.features(), model.hidden());
    for round in 0..WARMUP_ROUNDS + TIMED_ROUNDS {
        let k = warm_end + 1 + round;
        let now = ts_of(k);
        // What the datasource returns this cycle, prepared outside the timed region.
        let values: Vec<f64> = (0..n).map(|i| synth.value(i, now)).collect();
        let lookback = c.lookback_points(now);
        let fetched: Vec<Series> = (0..n)
            .map(|i| Series {
                labels: host_labels(i),
                points: (k + 1 - lookback..=k)
                    .map(|j| (ts_of(j), synth.value(i, ts_of(j))))
                    .collect(),
            })
            .collect();
        let fetched_joint = fetch_labelled(&synth, 0..n, k + 1 - lookback, k, joint_labels);
        // Reference for C: the ONNX Runtime call alone, one step for all series in one run.
        let x = vec![0.1f32; n * f];
        let state = vec![0.0f32; n * hd];

        let ((), ta) = measure(process_cpu, || a.cycle(k, &values));
        let ((), tb) = measure(process_cpu, || b.cycle(k, &values));
        let ((stats, _), tc) = measure(process_cpu, || {
            c.score_cycle(&fetched, now).expect("mode C cycle")
        });
        let ((joint_stats, _), td) = measure(process_cpu, || {
            d.score_cycle(&fetched_joint, now).expect("mode D cycle")
        });
        assert_eq!(joint_stats.series_scored, n, "mode D scores every series");
        let (_, trun) = measure(process_cpu, || {
            model.run(&x, 1, n, &state, &state).expect("batched run")
        });
        if round >= WARMUP_ROUNDS {
            sa.push(ta);
            sb.push(tb);
            sc.push(tc);
            sd.push(td);
            srun.push(trun);
        }
        c_stats = Some((lookback, stats));
    }
    if let Some((lookback, stats)) = c_stats {
        println!("C steady cycle: fetch of {lookback} points per series, {stats:?}");
    }
    // Keep the bench-side results observable so nothing is optimised away.
    let checksum: f64 = a.series.iter().map(|s| s.latest.score).sum::<f64>()
        + b.series.iter().map(|s| s.latest.yhat).sum::<f64>();
    println!("(checksum {checksum:.3})");

    let (a, b, c, d, run) = (
        summarise(&sa),
        summarise(&sb),
        summarise(&sc),
        summarise(&sd),
        summarise(&srun),
    );
    let per = |s: f64| s / n as f64 * 1e6;
    println!(
        "median of {TIMED_ROUNDS} cycles after {WARMUP_ROUNDS} warm-up, process CPU time \
         (min..max), wall:"
    );
    let line = |name: &str, s: &Summary| {
        println!(
            "  {name:<52} {:>8.3} us/series ({:.3}..{:.3})  cycle {:>8.2} ms CPU, {:>8.2} ms wall  \
             ratio to A {:.4} (A/x = {:.1}x)",
            per(s.cpu),
            per(s.cpu_min),
            per(s.cpu_max),
            s.cpu * 1e3,
            s.wall * 1e3,
            s.cpu / a.cpu,
            a.cpu / s.cpu,
        )
    };
    line("A whole window per series (seq 64, batch 1)", &a);
    line("B state carried, one run per series (seq 1, batch 1)", &b);
    line("C state carried, batched (score_cycle, batch 10000)", &c);
    line("   of which ONNX Runtime run alone (seq 1, b 10000)", &run);
    line("D joint model, groups of 4 inputs (score_cycle)", &d);
}

fn render_and_memory(model: &Arc<Forecaster>) {
    let n = RENDER_SERIES;
    println!("\n== {n} series: scorer memory and /metrics render ==");
    let synth = synth(n);
    trim_heap();
    let rss_before = rss_bytes();
    let mut scorer = DetectorScorer::new(model.clone(), STALENESS_SECS);
    let warm_end = scorer.warmup_points();
    let ((), fill) = measure(process_cpu, || {
        for first in (0..n).step_by(FILL_CHUNK) {
            let count = FILL_CHUNK.min(n - first);
            let chunk = fetch(&synth, first, count, 0, warm_end);
            scorer
                .score_cycle(&chunk, ts_of(warm_end))
                .expect("filling the scorer");
        }
    });
    let rss_after = rss_bytes();
    trim_heap();
    let rss_trimmed = rss_bytes();
    let scored = scorer.latest().count();
    println!(
        "filled {} series ({scored} with a score) in {:.2} s CPU ({} points each, batches of \
         {FILL_CHUNK})",
        scorer.len(),
        fill.cpu,
        warm_end + 1
    );
    assert_eq!(scored, n, "every series must have a score to measure");
    let per_series = |after: u64| (after as f64 - rss_before as f64) / n as f64;
    println!(
        "resident memory per scored series: {:.0} bytes (VmRSS {:.1} -> {:.1} MiB); {:.0} bytes \
         after malloc_trim ({:.1} MiB)",
        per_series(rss_after),
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0,
        per_series(rss_trimmed),
        rss_trimmed as f64 / 1048576.0,
    );

    // Steady cycles of 1 new point for all 100,000 series: the per-cycle scoring cost the
    // render cost is compared with. The first one also grows ONNX Runtime's buffers to the
    // new batch size, so it is not timed.
    let mut cycles = Vec::new();
    let mut last_stats = None;
    for round in 0..WARMUP_ROUNDS + STEADY_100K_CYCLES {
        let k = warm_end + 1 + round;
        let fetched = fetch(&synth, 0, n, k - 1, k);
        let ((stats, _), t) = measure(process_cpu, || {
            scorer
                .score_cycle(&fetched, ts_of(k))
                .expect("steady cycle")
        });
        if round >= WARMUP_ROUNDS {
            cycles.push(t);
        }
        last_stats = Some(stats);
    }
    let cycle = summarise(&cycles);
    if let Some(stats) = last_stats {
        println!(
            "steady score_cycle, {} series scored in {} run(s), median of {STEADY_100K_CYCLES} \
             after {WARMUP_ROUNDS} warm-up: {:.1} ms CPU ({:.1}..{:.1}), {:.3} us/series",
            stats.series_scored,
            stats.runs,
            cycle.cpu * 1e3,
            cycle.cpu_min * 1e3,
            cycle.cpu_max * 1e3,
            cycle.cpu / n as f64 * 1e6
        );
    }

    let mut exposition = Exposition::default();
    trim_heap();
    let rss_before_expo = rss_bytes();
    let ((), cold) = measure(thread_cpu, || exposition.update(DETECTOR, &scorer, false));
    trim_heap();
    let rss_after_expo = rss_bytes();
    let mut updates = Vec::new();
    for round in 0..WARMUP_ROUNDS + TIMED_ROUNDS {
        let ((), t) = measure(thread_cpu, || exposition.update(DETECTOR, &scorer, false));
        if round >= WARMUP_ROUNDS {
            updates.push(t);
        }
    }
    let mut scrapes = Vec::new();
    let mut bytes = 0;
    for round in 0..WARMUP_ROUNDS + TIMED_ROUNDS {
        let (out, t) = measure(thread_cpu, || {
            // As the server does per scrape.
            let mut out = String::with_capacity(64 * 1024);
            exposition.write_to(&mut out);
            out
        });
        bytes = out.len();
        if round >= WARMUP_ROUNDS {
            scrapes.push(t);
        }
    }
    let (update, scrape) = (summarise(&updates), summarise(&scrapes));
    println!(
        "exposition: {} series, {} lines, label cache + rendered blocks {:.0} bytes/series",
        exposition.series_count(),
        exposition.series_count() * mad::expose::FAMILIES.len(),
        (rss_after_expo as f64 - rss_before_expo as f64) / n as f64,
    );
    println!(
        "median of {TIMED_ROUNDS} after {WARMUP_ROUNDS} warm-up, thread CPU time (min..max), wall:"
    );
    println!(
        "  Exposition::update, first (label sets rendered)    {:>8.1} ms CPU, {:>8.1} ms wall",
        cold.cpu * 1e3,
        cold.wall * 1e3
    );
    println!(
        "  Exposition::update, per cycle (labels cached)      {:>8.1} ms CPU ({:.1}..{:.1}), {:>8.1} ms wall; \
         {:.3} us/series = {:.2}x the steady score_cycle",
        update.cpu * 1e3,
        update.cpu_min * 1e3,
        update.cpu_max * 1e3,
        update.wall * 1e3,
        update.cpu / n as f64 * 1e6,
        update.cpu / cycle.cpu,
    );
    println!(
        "  Exposition::write_to, per scrape                   {:>8.1} ms CPU ({:.1}..{:.1}), {:>8.1} ms wall; \
         {bytes} bytes ({:.1} MiB, {:.0} bytes/series), {:.0} MB/s",
        scrape.cpu * 1e3,
        scrape.cpu_min * 1e3,
        scrape.cpu_max * 1e3,
        scrape.wall * 1e3,
        bytes as f64 / 1048576.0,
        bytes as f64 / n as f64,
        bytes as f64 / scrape.cpu / 1e6,
    );
}
