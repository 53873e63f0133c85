//! `mad backtest --machines DIR`: SMD/ASD-layout corpora (`train/`, `test/`, `test_label/`,
//! `interpretation_label/`, headerless CSV with one column per metric). Each machine is one
//! detector over its metrics: trained on the end of `train/`, then `test/` replayed point by
//! point. A row's score is its most anomalous metric's; that metric (and the next two) are what
//! the detector names as the cause, checked against the interpretation labels.

use std::path::Path;

use mad_training::TrainOptions;

use super::corpus::{rescore, Scoring};
use super::replay::{replay_many, Recording, Retrain};

/// Rows of `train/` a model learns from: the most recent ones, as a retrain would read them.
pub const TRAIN_ROWS: usize = 5_000;
/// Metrics named per anomalous row, as the attribution check counts them.
pub const NAMED: usize = 3;

/// One machine's result.
#[derive(Debug, Clone)]
pub struct MachineReport {
    pub name: String,
    pub rows: usize,
    pub metrics: usize,
    /// Point-wise, no point-adjust: the best F1 over all thresholds, and that threshold.
    pub best_f1: f64,
    pub best_threshold: f64,
    /// Point-wise at the default threshold (score > 1).
    pub default_f1: f64,
    pub default_precision: f64,
    pub default_recall: f64,
    /// Labelled segments with at least one row above 1.
    pub segments_found: usize,
    pub segments: usize,
    /// Interpretation segments whose labelled metrics include one of the [`NAMED`] top metrics
    /// at the segment's most anomalous row.
    pub attribution_hits: usize,
    pub attribution_segments: usize,
    pub train_seconds: f64,
}

fn read_matrix(path: &Path) -> Result<Vec<Vec<f64>>, String> {
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_path(path)
        .map_err(|e| fail(&e))?;
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| fail(&e))?;
        let row = record
            .iter()
            .map(|v| v.trim().parse::<f64>().unwrap_or(f64::NAN))
            .collect::<Vec<_>>();
        if rows
            .first()
            .is_some_and(|r: &Vec<f64>| r.len() != row.len())
        {
            return Err(fail(&format!("row {}: {} columns", i + 1, row.len())));
        }
        rows.push(row);
    }
    Ok(rows)
}

/// `start-end:m1,m2,...` lines: 0-based start, end (treated as inclusive), 1-based metrics.
fn read_interpretation(path: &Path) -> Result<Vec<(usize, usize, Vec<usize>)>, String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    let bad = |line: &str| format!("{}: cannot read {line:?}", path.display());
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let (range, metrics) = line.split_once(':').ok_or_else(|| bad(line))?;
            let (start, end) = range.split_once('-').ok_or_else(|| bad(line))?;
            let metrics = metrics
                .split(',')
                .map(|m| m.trim().parse::<usize>().map_err(|_| bad(line)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((
                start.trim().parse().map_err(|_| bad(line))?,
                end.trim().parse().map_err(|_| bad(line))?,
                metrics,
            ))
        })
        .collect()
}

/// Point-wise F1 of `detected` against `labels`, with precision and recall.
fn f1(detected: impl Iterator<Item = bool>, labels: &[bool]) -> (f64, f64, f64) {
    let (mut tp, mut fp, mut fn_) = (0.0, 0.0, 0.0);
    for (d, l) in detected.zip(labels) {
        match (d, *l) {
            (true, true) => tp += 1.0,
            (true, false) => fp += 1.0,
            (false, true) => fn_ += 1.0,
            _ => {}
        }
    }
    let precision = if tp + fp > 0.0 { tp / (tp + fp) } else { 0.0 };
    let recall = if tp + fn_ > 0.0 { tp / (tp + fn_) } else { 0.0 };
    let f1 = if tp > 0.0 {
        2.0 * tp / (2.0 * tp + fp + fn_)
    } else {
        0.0
    };
    (f1, precision, recall)
}

/// The best point-wise F1 over every threshold (each distinct score), and that threshold.
pub fn best_f1(scores: &[f64], labels: &[bool]) -> (f64, f64) {
    let positives = labels.iter().filter(|l| **l).count() as f64;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]));
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut best = (0.0, f64::INFINITY);
    for (rank, &i) in order.iter().enumerate() {
        if labels[i] {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        // Only at the end of a run of equal scores is this a threshold one could set.
        let last_of_tie = order
            .get(rank + 1)
            .is_none_or(|next| scores[*next] != scores[i]);
        if last_of_tie && tp > 0.0 {
            let f = 2.0 * tp / (tp + fp + positives);
            if f > best.0 {
                best = (f, scores[i]);
            }
        }
    }
    best
}

/// Runs the machine `name` of the corpus at `dir`, one row every `step_secs`.
pub fn run_machine(
    dir: &Path,
    name: &str,
    step_secs: i64,
    options: &TrainOptions,
    scoring: Scoring,
    onnxruntime: Option<&Path>,
) -> Result<MachineReport, String> {
    let file = format!("{name}.txt");
    let train = read_matrix(&dir.join("train").join(&file))?;
    let test = read_matrix(&dir.join("test").join(&file))?;
    let labels: Vec<bool> = std::fs::read_to_string(dir.join("test_label").join(&file))
        .map_err(|e| format!("{}: {e}", dir.join("test_label").join(&file).display()))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim() == "1")
        .collect();
    if labels.len() != test.len() {
        return Err(format!(
            "{name}: {} test rows but {} labels",
            test.len(),
            labels.len()
        ));
    }
    let interpretation = read_interpretation(&dir.join("interpretation_label").join(&file))?;
    let metrics = test.first().map_or(0, Vec::len);
    let past = &train[train.len().saturating_sub(TRAIN_ROWS)..];
    let rows: Vec<&Vec<f64>> = past.iter().chain(&test).collect();
    let recordings: Vec<Recording> = (0..metrics)
        .map(|m| Recording {
            name: format!("{name}/{}", m + 1),
            timestamps: (0..rows.len() as i64).map(|i| i * step_secs).collect(),
            values: rows.iter().map(|r| r[m]).collect(),
        })
        .collect();
    let replayed = replay_many(
        &recordings,
        past.len(),
        options,
        Retrain::Never,
        crate::score::Detection::default(),
        onnxruntime,
    )?;
    let train_seconds = replayed.first().map_or(0.0, |r| r.train_seconds);
    // Per metric, the test rows' scores (0 where nothing was scored).
    let per_metric: Vec<Vec<f64>> = replayed
        .iter()
        .map(|r| {
            rescore(r, scoring)[past.len()..]
                .iter()
                .map(|s| s.unwrap_or(0.0))
                .collect()
        })
        .collect();
    let combined: Vec<f64> = (0..test.len())
        .map(|i| per_metric.iter().map(|m| m[i]).fold(0.0, f64::max))
        .collect();
    let (best_f1, best_threshold) = best_f1(&combined, &labels);
    let (default_f1, default_precision, default_recall) =
        f1(combined.iter().map(|s| *s > 1.0), &labels);
    let mut segments = Vec::new();
    let mut i = 0;
    while i < labels.len() {
        if labels[i] {
            let start = i;
            while i < labels.len() && labels[i] {
                i += 1;
            }
            segments.push((start, i));
        } else {
            i += 1;
        }
    }
    let segments_found = segments
        .iter()
        .filter(|(a, b)| combined[*a..*b].iter().any(|s| *s > 1.0))
        .count();
    let mut attribution_hits = 0;
    for (start, end, labelled) in &interpretation {
        let end = (*end).min(test.len().saturating_sub(1));
        let Some(peak) = (*start..=end).max_by(|a, b| combined[*a].total_cmp(&combined[*b])) else {
            continue;
        };
        let mut ranked: Vec<usize> = (0..metrics).collect();
        ranked.sort_by(|a, b| per_metric[*b][peak].total_cmp(&per_metric[*a][peak]));
        if ranked
            .iter()
            .take(NAMED)
            .any(|m| labelled.contains(&(m + 1)))
        {
            attribution_hits += 1;
        }
    }
    Ok(MachineReport {
        name: name.to_string(),
        rows: test.len(),
        metrics,
        best_f1,
        best_threshold,
        default_f1,
        default_precision,
        default_recall,
        segments_found,
        segments: segments.len(),
        attribution_hits,
        attribution_segments: interpretation.len(),
        train_seconds,
    })
}

/// The machines of a corpus: the files of its `test/` folder, sorted.
pub fn machines(dir: &Path) -> Result<Vec<String>, String> {
    let test = dir.join("test");
    let mut names: Vec<String> = std::fs::read_dir(&test)
        .map_err(|e| format!("{}: {e}", test.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".txt"))
                .map(String::from)
        })
        .collect();
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_f1_picks_the_separating_threshold_and_respects_ties() {
        let scores = [0.9, 0.8, 0.8, 0.1];
        let labels = [true, true, false, false];
        let (f, t) = best_f1(&scores, &labels);
        // At 0.9: tp 1, fp 0, fn 1 -> 2/3. At 0.8 (both tied rows): tp 2, fp 1 -> 0.8.
        assert!((f - 0.8).abs() < 1e-12, "{f}");
        assert_eq!(t, 0.8);
        assert_eq!(best_f1(&[0.5], &[false]), (0.0, f64::INFINITY));
    }

    #[test]
    fn f1_at_a_threshold() {
        let (f, p, r) = f1([true, false, true].into_iter(), &[true, true, false]);
        assert_eq!((p, r), (0.5, 0.5));
        assert!((f - 0.5).abs() < 1e-12);
    }
}
