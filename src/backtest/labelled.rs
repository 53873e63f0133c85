//! `mad backtest --csv FILE`: one recorded series with point labels (`timestamp,value,label`,
//! the KPI layout; Unix seconds or `YYYY-MM-DD HH:MM:SS`), trained on its first part, the rest
//! replayed point by point. Prints point-wise and per-event precision, recall and F1.

use std::path::Path;

use super::metrics::{best_f1, f1, EventScores};
use super::nab::parse_timestamp;
use super::replay::{chart_points, replay, Recording, Replayed, Retrain, Training};
use crate::chart::ChartData;
use crate::score::Detection;
use crate::source::Labels;

/// A labelled recording.
#[derive(Debug, Clone)]
pub struct Labelled {
    pub recording: Recording,
    pub labels: Vec<bool>,
}

/// Reads `timestamp,value[,label]` with a header; a missing label column means "no anomalies
/// labelled" (the scores are still written and plotted).
pub fn read_labelled_csv(path: &Path) -> Result<Labelled, String> {
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let mut reader = csv::Reader::from_path(path).map_err(|e| fail(&e))?;
    let (mut timestamps, mut values, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| fail(&e))?;
        let (Some(ts), Some(value)) = (record.get(0), record.get(1)) else {
            return Err(fail(&format!("row {}: expected timestamp,value", i + 2)));
        };
        let ts = match ts.trim().parse::<i64>() {
            Ok(seconds) if crate::timestamp::in_range(seconds) => seconds,
            Ok(seconds) => {
                return Err(fail(&format!(
                    "row {}: {seconds} is not Unix seconds between 1970 and 9999",
                    i + 2
                )))
            }
            Err(_) => parse_timestamp(ts).map_err(|e| fail(&e))? / 1_000_000,
        };
        timestamps.push(ts);
        values.push(value.trim().parse().unwrap_or(f64::NAN));
        labels.push(record.get(2).is_some_and(|l| l.trim() == "1"));
    }
    if timestamps.windows(2).any(|w| w[1] <= w[0]) {
        return Err(fail(&"timestamps must increase"));
    }
    let name = path.file_stem().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    Ok(Labelled {
        recording: Recording {
            name,
            labels: Labels::new(),
            timestamps,
            values,
        },
        labels,
    })
}

/// What the detector did on the scored part of one labelled recording.
#[derive(Debug, Clone)]
pub struct LabelledReport {
    pub name: String,
    pub rows: usize,
    pub learned: usize,
    /// Point-wise without point-adjust: the best F1 over thresholds and that threshold.
    pub best_f1: f64,
    pub best_threshold: f64,
    /// Point-wise at the default threshold (score > 1): F1, precision, recall.
    pub default: (f64, f64, f64),
    /// Per event at the default threshold.
    pub events: EventScores,
    pub train_seconds: f64,
    pub replayed: Replayed,
}

/// Trains on the first `learn_share` of the rows, scores the rest as the exporter would.
pub fn run_labelled(
    labelled: &Labelled,
    learn_share: f64,
    training: &Training,
    detection: Detection,
    onnxruntime: Option<&Path>,
) -> Result<LabelledReport, String> {
    let rows = labelled.labels.len();
    let learned = ((rows as f64 * learn_share.clamp(0.0, 1.0)) as usize).min(rows);
    let replayed = replay(
        &labelled.recording,
        learned,
        training,
        Retrain::Never,
        detection,
        onnxruntime,
    )?;
    let scores: Vec<f64> = replayed.scores[learned..]
        .iter()
        .map(|s| s.map_or(0.0, |s| s.score))
        .collect();
    let labels = &labelled.labels[learned..];
    let (best_f1, best_threshold) = best_f1(&scores, labels);
    Ok(LabelledReport {
        name: labelled.recording.name.clone(),
        rows,
        learned,
        best_f1,
        best_threshold,
        default: f1(scores.iter().map(|s| *s > 1.0), labels),
        events: EventScores::of(&scores, labels, 1.0),
        train_seconds: replayed.train_seconds,
        replayed,
    })
}

/// The scored part of the recording, with its labelled runs as windows.
pub fn chart(labelled: &Labelled, report: &LabelledReport) -> ChartData {
    let ts = &labelled.recording.timestamps;
    let from = report.learned;
    let scored_part = Recording {
        name: report.name.clone(),
        labels: labelled.recording.labels.clone(),
        timestamps: ts[from..].to_vec(),
        values: labelled.recording.values[from..].to_vec(),
    };
    let replayed = Replayed {
        scores: report.replayed.scores[from..].to_vec(),
        ..report.replayed.clone()
    };
    ChartData {
        title: format!(
            "{} (after the {} rows learned from)",
            report.name, report.learned
        ),
        points: chart_points(&scored_part, &replayed),
        anomaly_from: i64::MIN,
        anomaly_to: i64::MIN,
        labelled: super::metrics::runs(&labelled.labels[from..])
            .into_iter()
            .map(|(a, b)| (ts[from + a], ts[from + b - 1]))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unordered_or_impossible_timestamps_are_errors_that_name_the_row() {
        let dir = tempfile::tempdir().expect("tempdir");
        let read = |text: &str| {
            let path = dir.path().join("kpi.csv");
            std::fs::write(&path, text).expect("write");
            read_labelled_csv(&path).err().unwrap_or_default()
        };
        let e = read("timestamp,value,label\n60,1,0\n-9223372036854775808,2,0\n");
        assert!(e.contains("row 3") && e.contains("1970 and 9999"), "{e}");
        let e = read("timestamp,value,label\n120,1,0\n60,2,0\n");
        assert!(e.contains("timestamps must increase"), "{e}");
        assert!(read("timestamp,value,label\n60,1,0\n120,2,1\n").is_empty());
    }
}
