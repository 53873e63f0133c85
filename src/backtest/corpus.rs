//! `mad backtest --nab DIR`: every file of a NAB-layout corpus replayed (learning from its
//! probationary first 15% only), scored with NAB's own rules under all three profiles.

use std::collections::BTreeMap;

use crate::chart::ChartData;
use crate::score::Detection;
use std::path::{Path, PathBuf};

use super::nab::{self, CorpusScore, ScoredFile, PROFILES};
use super::replay::{chart_points, replay, write_scores, Recording, Replayed, Retrain, Training};

/// What a NAB run found, file by file and for the corpus.
#[derive(Debug, Clone)]
pub struct NabReport {
    pub files: Vec<FileReport>,
    /// One per profile, in [`PROFILES`] order.
    pub corpus: Vec<CorpusScore>,
    /// One per file when asked for ([`NabRun::charts`]).
    pub charts: Vec<ChartData>,
    /// NAB's own HTM detector on the same files (from `reference/numenta/`, when present), one
    /// normalised score per profile: the baseline to read ours against.
    pub htm: Option<Vec<f64>>,
}

#[derive(Debug, Clone)]
pub struct FileReport {
    pub name: String,
    pub rows: usize,
    pub windows: usize,
    pub train_seconds: f64,
    /// Hyperparameter search trials its model took (0 without `training.search`).
    pub trials: usize,
    /// Under the standard profile at the corpus threshold: windows detected.
    pub windows_found: usize,
    /// Detections outside every window, at the corpus threshold (standard profile).
    pub false_positives: usize,
    /// The file's raw standard-profile score at the corpus threshold (NAB's per-file `Score`):
    /// where the corpus score is won and lost.
    pub score: f64,
    /// Why the file was not scored (no model could be trained from its first rows).
    pub note: Option<String>,
}

/// A NAB file: `timestamp,value` rows.
pub fn read_nab_csv(path: &Path, name: &str) -> Result<Recording, String> {
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let mut reader = csv::Reader::from_path(path).map_err(|e| fail(&e))?;
    let (mut timestamps, mut values) = (Vec::new(), Vec::new());
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| fail(&e))?;
        let (Some(ts), Some(value)) = (record.get(0), record.get(1)) else {
            return Err(fail(&format!("row {}: expected timestamp,value", i + 2)));
        };
        timestamps.push(nab::parse_timestamp(ts).map_err(|e| fail(&e))? / 1_000_000);
        // A value that is not a number is a gap, as NaN is in the exporter.
        values.push(value.trim().parse().unwrap_or(f64::NAN));
    }
    Ok(Recording {
        name: name.to_string(),
        labels: crate::source::Labels::new(),
        timestamps,
        values,
    })
}

/// How a NAB run is made.
#[derive(Debug, Clone, Copy)]
pub struct NabRun<'a> {
    /// Only files whose name contains one of these (all when empty).
    pub only: &'a [String],
    pub training: &'a Training,
    /// How the files are scored (`detection.scoring` and the rest), as a detector would be.
    pub detection: Detection,
    pub retrain: Retrain,
    pub onnxruntime: Option<&'a Path>,
    /// Where per-file scores go, if anywhere.
    pub out: Option<&'a Path>,
    /// Keep a chart of each file (value, band, score, labelled windows) in the report.
    pub charts: bool,
}

/// MAD's score (1 = edge of the band) mapped into NAB's [0, 1], monotonically, so the sweep
/// sees the same order: 1 maps to 0.5; unscored rows are 0.
pub fn nab_score(score: Option<f64>) -> f64 {
    match score {
        Some(s) if s.is_finite() && s > 0.0 => s / (1.0 + s),
        Some(s) if s == f64::INFINITY => 1.0,
        _ => 0.0,
    }
}

/// NAB is shown a row as a detection only where its score is higher than in each of the
/// [`ONSET_ROWS`] rows before it, and none of those was already past the edge (others count
/// 0). NAB charges every row at or above its threshold outside a window as one more false
/// positive, but an alert fires once per episode: a run of high scores (one bad point stays in
/// the short average for six rows) is one alert, raised where the run starts or grows towards
/// the edge; a climb while the alert already fires raises nothing new (NAB standard 65.1 →
/// 68.4, low FP 56.5 → 62.5: `machine_temperature`'s last climb alone was five false
/// positives). The exported scores are unchanged (`--out`).
pub fn alert_onsets(scores: &[f64]) -> Vec<f64> {
    (0..scores.len())
        .map(|i| {
            let before = scores[i.saturating_sub(ONSET_ROWS)..i]
                .iter()
                .copied()
                .fold(0.0, f64::max);
            if scores[i] > before && before < FIRING {
                scores[i]
            } else {
                0.0
            }
        })
        .collect()
}

/// Rows a score run is looked back over for [`alert_onsets`]: the likelihood's short window.
pub const ONSET_ROWS: usize = crate::score::likelihood::SHORT_WINDOW;

/// An `anomaly_score` of 1, the edge where an alert fires, as NAB is shown it.
const FIRING: f64 = 0.5;

/// Runs the corpus at `dir` (`data/<category>/<file>.csv`, `labels/combined_windows.json`) as
/// `run` says; `progress` hears of each file as it is done.
pub fn run_nab(
    dir: &Path,
    run: &NabRun<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<NabReport, String> {
    let NabRun {
        only,
        training,
        detection,
        retrain,
        onnxruntime,
        out,
        charts: with_charts,
    } = *run;
    let mut charts = Vec::new();
    let windows = nab::read_windows(&dir.join("labels/combined_windows.json"))?;
    let mut scored = Vec::new();
    let mut files = Vec::new();
    for (name, file_windows) in &windows {
        if !only.is_empty() && !only.iter().any(|o| name.contains(o.as_str())) {
            continue;
        }
        let path: PathBuf = dir.join("data").join(name);
        if !path.is_file() {
            // The labels cover the full corpus; a subset holds fewer data files.
            continue;
        }
        let recording = read_nab_csv(&path, name)?;
        let rows = recording.timestamps.len();
        let learn = nab::probation(rows);
        // A file whose past is too short or too gappy to learn from scores nothing, like a
        // metric the exporter has no model for yet; the report says so.
        let (replayed, note) =
            match replay(&recording, learn, training, retrain, detection, onnxruntime) {
                Ok(r) => (r, None),
                Err(e) => (
                    Replayed {
                        scores: vec![None; rows],
                        train_seconds: 0.0,
                        epochs: 0,
                        trials: 0,
                    },
                    Some(e),
                ),
            };
        let micros: Vec<i64> = recording.timestamps.iter().map(|t| t * 1_000_000).collect();
        if with_charts {
            charts.push(chart(&recording, &replayed, file_windows));
        }
        let scores = replayed
            .scores
            .iter()
            .map(|s| nab_score(s.map(|s| s.score)))
            .collect::<Vec<f64>>();
        let scores = alert_onsets(&scores);
        if let Some(out) = out {
            let in_window: Vec<bool> = micros
                .iter()
                .map(|t| file_windows.iter().any(|(a, b)| a <= t && t <= b))
                .collect();
            write_scores(&out.join(name), &recording, &replayed, Some(&in_window))?;
        }
        scored.push(ScoredFile::new(name, &micros, scores, file_windows)?);
        files.push(FileReport {
            name: name.clone(),
            rows,
            windows: file_windows.len(),
            train_seconds: replayed.train_seconds,
            trials: replayed.trials,
            windows_found: 0,
            false_positives: 0,
            score: 0.0,
            note,
        });
        progress(name);
    }
    if scored.is_empty() {
        return Err(format!(
            "{}: no NAB data files matched (looked for data/<category>/<file>.csv)",
            dir.display()
        ));
    }
    let corpus: Vec<CorpusScore> = PROFILES.iter().map(|p| nab::sweep(&scored, p)).collect();
    let threshold = corpus[0].threshold;
    for (report, file) in files.iter_mut().zip(&scored) {
        let found = file.windows_detected(threshold);
        report.windows_found = found;
        let (score, counts) = file.raw_score(&nab::STANDARD, threshold);
        (report.score, report.false_positives) = (score, counts.fp);
    }
    let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
    let htm = reference_scores(dir, &names, &windows);
    Ok(NabReport {
        files,
        corpus,
        charts,
        htm,
    })
}

/// A file's chart: values against the forecast band, the score that is thresholded, and the
/// labelled windows (timestamps in microseconds, as NAB's windows are read).
fn chart(recording: &Recording, replayed: &Replayed, windows: &[(i64, i64)]) -> ChartData {
    let points = chart_points(recording, replayed);
    ChartData {
        title: recording.name.clone(),
        points,
        anomaly_from: i64::MIN,
        anomaly_to: i64::MIN,
        labelled: windows
            .iter()
            .map(|(a, b)| (a / 1_000_000, b / 1_000_000))
            .collect(),
    }
}

/// NAB's stored per-file scores of its HTM detector, summed over `files` and normalised per
/// profile; `None` when the corpus has no reference tables or lacks one of the files.
fn reference_scores(dir: &Path, files: &[&str], windows: &nab::Windows) -> Option<Vec<f64>> {
    let windows_total: usize = files
        .iter()
        .map(|f| windows.get(*f).map_or(0, Vec::len))
        .sum();
    PROFILES
        .iter()
        .map(|profile| {
            let table = dir
                .join("reference/numenta")
                .join(format!("numenta_{}_scores.csv", profile.name));
            let mut reader = csv::Reader::from_path(table).ok()?;
            let mut raw = BTreeMap::new();
            for row in reader.deserialize::<BTreeMap<String, String>>() {
                let row = row.ok()?;
                if let (Some(file), Some(score)) = (row.get("File"), row.get("Score")) {
                    raw.insert(file.clone(), score.parse::<f64>().ok()?);
                }
            }
            let total = files
                .iter()
                .map(|f| raw.get(*f).copied())
                .sum::<Option<f64>>()?;
            Some(nab::normalize(total, windows_total, profile))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_edge_is_shown_to_nab_as_one_half() {
        assert_eq!(nab_score(Some(1.0)), FIRING);
    }

    #[test]
    fn a_climb_while_the_alert_fires_is_not_a_new_detection() {
        let shown = alert_onsets(&[0.1, 0.3, 0.55, 0.7, 0.9, 0.2]);
        assert_eq!(shown, vec![0.1, 0.3, 0.55, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn a_run_of_high_scores_is_shown_to_nab_where_it_starts_or_grows() {
        let mut scores = vec![0.1, 0.3, 0.3, 0.4, 0.2, 0.2];
        scores.extend(vec![0.1; ONSET_ROWS]);
        scores.push(0.2);
        let shown = alert_onsets(&scores);
        assert_eq!(&shown[..6], &[0.1, 0.3, 0.0, 0.4, 0.0, 0.0]);
        assert!(shown[6..6 + ONSET_ROWS].iter().all(|s| *s == 0.0));
        assert_eq!(
            shown.last(),
            Some(&0.2),
            "a new run after a quiet spell is a new alert"
        );
    }
}
