//! `mad backtest --machines DIR`: SMD/ASD-layout corpora (`train/`, `test/`, `test_label/`,
//! `interpretation_label/`, headerless CSV with one column per metric). Each machine is one
//! detector over its metrics: trained on the end of `train/`, then `test/` replayed point by
//! point. A row's score is its metrics' combined as the exporter combines a group's inputs
//! ([`group_score`]); the most anomalous metrics are what the detector names as the cause,
//! checked against the interpretation labels.

use std::path::Path;

use mad_training::contract::INPUT_LABEL;

use crate::score::group::{group_score, MAX_DRIVERS};
use crate::score::Detection;

use super::metrics::{best_f1, f1, runs, EventScores};
use super::replay::{chart_points, replay_many, write_csv, Recording, Replayed, Retrain, Training};
use crate::chart::ChartData;

/// Rows of `train/` a model learns from: the most recent ones, as a retrain would read them.
pub const TRAIN_ROWS: usize = 5_000;
/// Metrics named per anomalous row, as the attribution check counts them: as many as an alert
/// names.
pub const NAMED: usize = MAX_DRIVERS;
/// Panels per machine in a plot: the metrics the interpretation labels name most often.
pub const PLOTTED_METRICS: usize = 3;

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
    /// Per labelled segment at the default threshold: found when one of its rows is above 1;
    /// a detection (a run of rows above 1) is right when it overlaps one.
    pub events: EventScores,
    /// Interpretation segments whose labelled metrics include one of the [`NAMED`] top metrics
    /// at the segment's most anomalous row.
    pub attribution_hits: usize,
    pub attribution_segments: usize,
    pub train_seconds: f64,
    /// Hyperparameter search trials the machine's model took (0 without `training.search`).
    pub trials: usize,
    /// With `charts`: the test rows of the [`PLOTTED_METRICS`] most often labelled metrics.
    pub charts: Vec<ChartData>,
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

/// How a machine's run retrains, and what it keeps besides its figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineRun<'a> {
    /// Train again as the rows seen grow (`--retrain`), as `mad train --if-due` would.
    pub retrain: Retrain,
    /// Keep charts of the most often labelled metrics in the report.
    pub charts: bool,
    /// Write the test rows' scores to `<dir>/<machine>.csv`
    /// (`row,label,anomaly_score,driver,metric_1,...`).
    pub scores: Option<&'a Path>,
}

/// Runs the machine `name` of the corpus at `dir`, one row every `step_secs`.
pub fn run_machine(
    dir: &Path,
    name: &str,
    step_secs: i64,
    training: &Training,
    detection: Detection,
    onnxruntime: Option<&Path>,
    run: MachineRun<'_>,
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
    if let Some(width) = train.first().map(Vec::len).filter(|&w| w != metrics) {
        return Err(format!(
            "{name}: train/ has {width} columns but test/ has {metrics}"
        ));
    }
    let past = &train[train.len().saturating_sub(TRAIN_ROWS)..];
    let rows: Vec<&Vec<f64>> = past.iter().chain(&test).collect();
    let recordings: Vec<Recording> = (0..metrics)
        .map(|m| Recording {
            name: format!("{name}/{}", m + 1),
            // One group, one input per metric: what a joint model reads together.
            labels: [
                ("machine".to_string(), name.to_string()),
                (INPUT_LABEL.to_string(), format!("{:02}", m + 1)),
            ]
            .into(),
            timestamps: (0..rows.len() as i64).map(|i| i * step_secs).collect(),
            values: rows.iter().map(|r| r[m]).collect(),
        })
        .collect();
    let replayed = replay_many(
        &recordings,
        past.len(),
        training,
        run.retrain,
        detection,
        onnxruntime,
    )?;
    let train_seconds = replayed.first().map_or(0.0, |r| r.train_seconds);
    let trials = replayed.first().map_or(0, |r| r.trials);
    // Per metric, the test rows' scores (0 where nothing was scored).
    let per_metric: Vec<Vec<f64>> = replayed
        .iter()
        .map(|r| {
            r.scores[past.len()..]
                .iter()
                .map(|s| s.map_or(0.0, |s| s.score))
                .collect()
        })
        .collect();
    let combined: Vec<f64> = (0..test.len())
        .map(|i| {
            let mut ranked: Vec<f64> = per_metric.iter().map(|m| m[i]).collect();
            ranked.sort_by(|a, b| b.total_cmp(a));
            group_score(ranked)
        })
        .collect();
    if let Some(out) = run.scores {
        write_scores(
            &out.join(format!("{name}.csv")),
            &combined,
            &labels,
            &per_metric,
        )?;
    }
    let (best_f1, best_threshold) = best_f1(&combined, &labels);
    let (default_f1, default_precision, default_recall) =
        f1(combined.iter().map(|s| *s > 1.0), &labels);
    let events = EventScores::of(&combined, &labels, 1.0);
    let segments = runs(&labels);
    let mut attribution_hits = 0;
    for (start, end, labelled) in &interpretation {
        let end = (*end).min(test.len().saturating_sub(1));
        let Some(peak) = (*start..=end).max_by(|a, b| combined[*a].total_cmp(&combined[*b])) else {
            continue;
        };
        if ranked_metrics(&per_metric, peak)
            .iter()
            .take(NAMED)
            .any(|m| labelled.contains(&(m + 1)))
        {
            attribution_hits += 1;
        }
    }
    let charts = if run.charts {
        let test_rows = past.len()..rows.len();
        let labelled: Vec<(i64, i64)> = segments
            .iter()
            .map(|(a, b)| {
                let ts = |row: usize| (past.len() + row) as i64 * step_secs;
                (ts(*a), ts(*b - 1))
            })
            .collect();
        most_labelled(&interpretation, metrics)
            .into_iter()
            .map(|m| {
                let test_part = |r: &Recording| Recording {
                    name: r.name.clone(),
                    labels: r.labels.clone(),
                    timestamps: r.timestamps[test_rows.clone()].to_vec(),
                    values: r.values[test_rows.clone()].to_vec(),
                };
                let scored = Replayed {
                    scores: replayed[m].scores[test_rows.clone()].to_vec(),
                    ..replayed[m].clone()
                };
                ChartData {
                    title: format!("{name}, metric {}", m + 1),
                    points: chart_points(&test_part(&recordings[m]), &scored),
                    anomaly_from: i64::MIN,
                    anomaly_to: i64::MIN,
                    labelled: labelled.clone(),
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(MachineReport {
        name: name.to_string(),
        rows: test.len(),
        metrics,
        best_f1,
        best_threshold,
        default_f1,
        default_precision,
        default_recall,
        events,
        attribution_hits,
        attribution_segments: interpretation.len(),
        train_seconds,
        trials,
        charts,
    })
}

/// The (0-based) metrics at test row `row`, highest score first, ties in metric order: the
/// order in which an alert names them.
fn ranked_metrics(per_metric: &[Vec<f64>], row: usize) -> Vec<usize> {
    let mut ranked: Vec<usize> = (0..per_metric.len()).collect();
    ranked.sort_by(|a, b| per_metric[*b][row].total_cmp(&per_metric[*a][row]));
    ranked
}

/// Writes one machine's test rows: `row` (0-based, as the interpretation labels count),
/// `label`, the combined `anomaly_score`, the `driver` (the 1-based metric scoring highest,
/// empty while none scores) and each metric's score (`metric_1`, ...).
fn write_scores(
    path: &Path,
    combined: &[f64],
    labels: &[bool],
    per_metric: &[Vec<f64>],
) -> Result<(), String> {
    let mut header = vec![
        "row".to_string(),
        "label".to_string(),
        "anomaly_score".to_string(),
        "driver".to_string(),
    ];
    header.extend((1..=per_metric.len()).map(|m| format!("metric_{m}")));
    let rows = combined
        .iter()
        .zip(labels)
        .enumerate()
        .map(|(row, (score, label))| {
            let driver = ranked_metrics(per_metric, row)
                .first()
                .filter(|m| per_metric[**m][row] > 0.0)
                .map_or(String::new(), |m| (m + 1).to_string());
            let mut record = vec![
                row.to_string(),
                u8::from(*label).to_string(),
                score.to_string(),
                driver,
            ];
            record.extend(per_metric.iter().map(|m| m[row].to_string()));
            record
        });
    write_csv(path, &header, rows)
}

/// The (0-based) metrics the interpretation labels name most often, at most
/// [`PLOTTED_METRICS`]; the first metrics when there are no labels.
fn most_labelled(interpretation: &[(usize, usize, Vec<usize>)], metrics: usize) -> Vec<usize> {
    let mut counts = vec![0usize; metrics];
    for m in interpretation.iter().flat_map(|(_, _, named)| named) {
        if let Some(count) = m.checked_sub(1).and_then(|i| counts.get_mut(i)) {
            *count += 1;
        }
    }
    let mut order: Vec<usize> = (0..metrics).collect();
    order.sort_by(|a, b| counts[*b].cmp(&counts[*a]).then(a.cmp(b)));
    order.truncate(PLOTTED_METRICS);
    order
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
