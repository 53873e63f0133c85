//! `mad backtest --config FILE --detector NAME --from T --to T`: a detector replayed over a time
//! range read from the datasource, as it would have scored it live: trained on the range up to
//! `--train-until`, then every later point scored one cycle at a time. There are no labels in a
//! datasource, so the report says where and how long the detector fired.

use crate::chart::ChartData;
use crate::config::{Config, Detector};
use crate::source::{align_down, Client};

use super::replay::{chart_points, replay_many, Recording, Replayed, Retrain, Training};

/// Points per series a replay holds in memory at most (19 years at one minute).
pub const MAX_RANGE_POINTS: i64 = 10_000_000;

/// What the detector did on one series after `train_until`.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesReport {
    /// `name="value", …`
    pub series: String,
    pub scored: usize,
    /// Points scoring above 1.
    pub anomalous: usize,
    /// Runs of consecutive points above 1.
    pub episodes: usize,
    pub max_score: f64,
    /// When the highest score was (Unix seconds).
    pub max_at: i64,
}

/// A detector over a range: per series, and the charts when asked for.
#[derive(Debug, Clone)]
pub struct RangeReport {
    pub series: Vec<SeriesReport>,
    pub train_seconds: f64,
    pub charts: Vec<ChartData>,
}

fn describe(labels: &crate::source::Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads `detector`'s series over `[from, to]`, trains on what is before `train_until` and
/// scores the rest. `charts` keeps a chart per series.
pub async fn run_range(
    config: &Config,
    detector: &Detector,
    from: i64,
    to: i64,
    train_until: i64,
    charts: bool,
) -> anyhow::Result<RangeReport> {
    let step = detector.step.0.as_secs().max(1) as i64;
    let (from, to) = (align_down(from, step), align_down(to, step));
    anyhow::ensure!(
        from < train_until && train_until < to,
        "--train-until must lie inside the range (after --from, before --to)"
    );
    anyhow::ensure!(
        (to - from) / step < MAX_RANGE_POINTS,
        "the range holds more than {MAX_RANGE_POINTS} points at step {step}s: shorten it"
    );
    let client = Client::new(&config.datasource)?;
    let fetched = client
        .query_detector(detector.queries(), from, to, step)
        .await?;
    anyhow::ensure!(
        !fetched.is_empty(),
        "the query {:?} returned no series between --from and --to",
        detector.describe_queries()
    );
    let timestamps: Vec<i64> = (from..=to).step_by(step as usize).collect();
    let learn = timestamps.iter().filter(|t| **t < train_until).count();
    let recordings: Vec<Recording> = fetched
        .iter()
        .map(|s| Recording {
            name: describe(&s.labels),
            labels: s.labels.clone(),
            timestamps: timestamps.clone(),
            values: s.on_grid(from, to, step),
        })
        .collect();
    let training = Training {
        options: detector.train_options(&config.training),
        search: detector.search_budget(&config.training),
    };
    let detection = detector.detection;
    let library = config.onnxruntime.library.clone();
    let (recordings, replayed) = tokio::task::spawn_blocking(move || {
        replay_many(
            &recordings,
            learn,
            &training,
            Retrain::Never,
            detection,
            library.as_deref(),
        )
        .map(|replayed| (recordings, replayed))
    })
    .await?
    .map_err(anyhow::Error::msg)?;
    let train_seconds = replayed.first().map_or(0.0, |r| r.train_seconds);
    let series = recordings
        .iter()
        .zip(&replayed)
        .map(|(rec, rep)| summarize(rec, rep, learn))
        .collect();
    let charts = if charts {
        recordings
            .iter()
            .zip(&replayed)
            .map(|(rec, rep)| chart(rec, rep, train_until))
            .collect()
    } else {
        Vec::new()
    };
    Ok(RangeReport {
        series,
        train_seconds,
        charts,
    })
}

/// Where the detector fired on one series, from row `learn` on.
fn summarize(recording: &Recording, replayed: &Replayed, learn: usize) -> SeriesReport {
    let mut report = SeriesReport {
        series: recording.name.clone(),
        scored: 0,
        anomalous: 0,
        episodes: 0,
        max_score: 0.0,
        max_at: 0,
    };
    let mut inside = false;
    for score in replayed.scores[learn.min(replayed.scores.len())..].iter() {
        let Some(score) = score else {
            inside = false;
            continue;
        };
        report.scored += 1;
        let above = score.score > 1.0;
        if above {
            report.anomalous += 1;
            if !inside {
                report.episodes += 1;
            }
        }
        inside = above;
        if score.score > report.max_score {
            report.max_score = score.score;
            report.max_at = score.ts;
        }
    }
    report
}

/// One series' chart; its title says until when the model learned.
fn chart(recording: &Recording, replayed: &Replayed, train_until: i64) -> ChartData {
    let points = chart_points(recording, replayed);
    ChartData {
        title: format!(
            "{} (trained until {})",
            recording.name,
            crate::timestamp::rfc3339(train_until)
        ),
        points,
        anomaly_from: i64::MIN,
        anomaly_to: i64::MIN,
        labelled: Vec::new(),
    }
}
