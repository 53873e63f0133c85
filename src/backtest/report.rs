//! What `mad backtest` prints: a table per corpus (a line per file or machine, then the
//! corpus' figures), a progress bar while it runs, and the `--plot` picture. The runs
//! themselves are the other modules'; this one only reports them.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::replay::{Retrain, Training};
use crate::config::Config;
use crate::score::Detection;

/// `mad backtest --detector NAME --from --to`: a range of the datasource, trained on its first
/// part, each series' scores summed up in a line.
pub async fn range(
    config: &Path,
    name: &str,
    (from, to, train_until): (i64, i64, i64),
    plot: Option<&Path>,
) -> anyhow::Result<()> {
    let config = Config::load(config)?;
    let detector = config
        .detectors
        .iter()
        .find(|d| d.name.0 == name)
        .with_context(|| format!("no detector {name:?} in the config"))?;
    let report =
        super::range::run_range(&config, detector, from, to, train_until, plot.is_some()).await?;
    if let Some(path) = plot {
        write_plot(path, &report.charts)?;
    }
    println!(
        "{:<60} {:>7} {:>9} {:>8} {:>9}  highest at",
        "series", "scored", "above 1", "episodes", "max score"
    );
    for s in &report.series {
        println!(
            "{:<60} {:>7} {:>9} {:>8} {:>9.2}  {}",
            s.series,
            s.scored,
            s.anomalous,
            s.episodes,
            s.max_score,
            crate::timestamp::rfc3339(s.max_at)
        );
    }
    println!(
        "\n{} series; model trained in {:.1} s on the range before --train-until",
        report.series.len(),
        report.train_seconds
    );
    Ok(())
}

fn write_plot(path: &Path, charts: &[crate::chart::ChartData]) -> anyhow::Result<()> {
    let png = crate::chart::render_stack_png(charts, PLOT_WIDTH, PLOT_PANEL_HEIGHT)
        .map_err(anyhow::Error::msg)?;
    std::fs::write(path, png)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    println!("plot: {} ({} panels)", path.display(), charts.len());
    Ok(())
}

/// `mad backtest --plot`: pixels wide, and tall per file.
const PLOT_WIDTH: u32 = 1600;
const PLOT_PANEL_HEIGHT: u32 = 320;

/// What a corpus backtest takes from the command line besides its data.
#[derive(Clone, Copy)]
pub struct Settings<'a> {
    /// `--config`: training settings and the ONNX Runtime library.
    pub config: Option<&'a Path>,
    /// `--seed`, over the config's.
    pub seed: Option<u64>,
    /// `--retrain` (NAB and machines).
    pub retrain: Retrain,
}

/// How models are trained (the config's `training:`, its search included, and `--seed`) and
/// the ONNX Runtime library, from an optional config.
fn training(settings: Settings<'_>) -> anyhow::Result<(Training, Option<PathBuf>)> {
    let config = settings.config.map(Config::load).transpose()?;
    let mut training = config
        .as_ref()
        .map_or_else(Training::default, |c| Training {
            options: c.training.apply(mad_training::TrainOptions::default()),
            search: c.training.search_budget(),
        });
    if let Some(seed) = settings.seed {
        training.options.seed = seed;
    }
    Ok((training, config.and_then(|c| c.onnxruntime.library)))
}

/// Where a backtest writes what it did besides its table.
pub struct Output<'a> {
    /// `--out`: per-point scores, a CSV per file or machine.
    pub out: Option<&'a Path>,
    /// `--plot`: one PNG, a panel per series.
    pub plot: Option<&'a Path>,
}

/// `mad backtest --csv FILE...`: labelled CSVs, each trained on its first `train_share`.
pub fn csv(
    files: &[PathBuf],
    train_share: f64,
    settings: Settings<'_>,
    detection: Detection,
    output: Output<'_>,
) -> anyhow::Result<()> {
    use super::labelled::{chart, read_labelled_csv, run_labelled};
    anyhow::ensure!(
        train_share > 0.0 && train_share < 1.0,
        "--train-share must lie between 0 and 1"
    );
    let (training, library) = training(settings)?;
    println!(
        "{:<40} {:>6} {:>8} {:>10} {:>11} {:>12} {:>15} {:>7}",
        "file", "rows", "best F1", "F1 at 1", "P / R", "events found", "detections right", "train"
    );
    let mut charts = Vec::new();
    for path in files {
        let labelled = read_labelled_csv(path).map_err(anyhow::Error::msg)?;
        let r = run_labelled(
            &labelled,
            train_share,
            &training,
            detection,
            library.as_deref(),
        )
        .map_err(anyhow::Error::msg)?;
        let (f1, precision, recall) = r.default;
        println!(
            "{:<40} {:>6} {:>8.3} {:>10.3} {:>5.2}/{:<5.2} {:>6}/{:<5} {:>8}/{:<6} {:>6.1}s",
            r.name,
            r.rows,
            r.best_f1,
            f1,
            precision,
            recall,
            r.events.found,
            r.events.events,
            r.events.right,
            r.events.detections,
            r.train_seconds
        );
        println!(
            "    per event at 1: precision {:.2}, recall {:.2}, F1 {:.3}; best point-wise threshold {:.2}",
            r.events.precision(),
            r.events.recall(),
            r.events.f1(),
            r.best_threshold
        );
        if let Some(dir) = output.out {
            let file = dir.join(format!("{}.csv", r.name));
            super::replay::write_scores(
                &file,
                &labelled.recording,
                &r.replayed,
                Some(&labelled.labels),
            )
            .map_err(anyhow::Error::msg)?;
        }
        if output.plot.is_some() {
            charts.push(chart(&labelled, &r));
        }
    }
    if let Some(path) = output.plot {
        write_plot(path, &charts)?;
    }
    Ok(())
}

/// `mad backtest --machines DIR`: SMD/ASD-style machines, one detector each.
pub fn machines(
    dir: &Path,
    only: &[String],
    step: std::time::Duration,
    settings: Settings<'_>,
    detection: Detection,
    joint: bool,
    output: Output<'_>,
) -> anyhow::Result<()> {
    use super::machines::{run_machine, MachineRun, NAMED};
    let plot = output.plot;
    let retrain = settings.retrain;
    let (mut training, library) = training(settings)?;
    training.options.joint |= joint;
    let names: Vec<String> = super::machines::machines(dir)
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .filter(|n| only.is_empty() || only.iter().any(|o| n.contains(o.as_str())))
        .collect();
    anyhow::ensure!(!names.is_empty(), "{}: no machines in test/", dir.display());
    let bar = indicatif::ProgressBar::new(names.len() as u64);
    println!(
        "{:<14} {:>6} {:>7} {:>16} {:>10} {:>8} {:>10} {:>16} {:>12} {:>7}",
        "machine",
        "rows",
        "metrics",
        "best F1 (at)",
        "F1 at 1",
        "P / R",
        "segments",
        "detections right",
        "attribution",
        "train"
    );
    let mut reports = Vec::new();
    for name in &names {
        bar.set_message(name.clone());
        let r = run_machine(
            dir,
            name,
            step.as_secs() as i64,
            &training,
            detection,
            library.as_deref(),
            MachineRun {
                retrain,
                charts: plot.is_some(),
                scores: output.out,
            },
        )
        .map_err(anyhow::Error::msg)?;
        bar.inc(1);
        bar.suspend(|| {
            println!(
                "{:<14} {:>6} {:>7} {:>8.3} ({:>5.2}) {:>10.3} {:>4.2}/{:<4.2} {:>5}/{:<4} {:>9}/{:<6} {:>6}/{:<5} {:>6.1}s",
                r.name,
                r.rows,
                r.metrics,
                r.best_f1,
                r.best_threshold,
                r.default_f1,
                r.default_precision,
                r.default_recall,
                r.events.found,
                r.events.events,
                r.events.right,
                r.events.detections,
                r.attribution_hits,
                r.attribution_segments,
                r.train_seconds
            )
        });
        reports.push(r);
    }
    bar.finish_and_clear();
    if let Some(path) = plot {
        let charts: Vec<crate::chart::ChartData> =
            reports.iter().flat_map(|r| r.charts.clone()).collect();
        write_plot(path, &charts)?;
    }
    let mean = |f: fn(&super::machines::MachineReport) -> f64| {
        reports.iter().map(f).sum::<f64>() / reports.len() as f64
    };
    let hits: usize = reports.iter().map(|r| r.attribution_hits).sum();
    let total = |f: fn(&super::metrics::EventScores) -> usize| {
        reports.iter().map(|r| f(&r.events)).sum::<usize>()
    };
    let segments: usize = reports.iter().map(|r| r.attribution_segments).sum();
    println!(
        "\nmean best F1 {:.3}, mean F1 at the default threshold {:.3} ({:.0}% of best); labelled \
         metric among the top {NAMED} named in {hits} of {segments} segments; training {:.1} s per \
         model{}; per segment at the default threshold: {} of {} found, {} of {} detections right",
        mean(|r| r.best_f1),
        mean(|r| r.default_f1),
        100.0 * mean(|r| r.default_f1) / mean(|r| r.best_f1).max(f64::MIN_POSITIVE),
        mean(|r| r.train_seconds),
        searched(reports.iter().map(|r| r.trials)),
        total(|e| e.found),
        total(|e| e.events),
        total(|e| e.right),
        total(|e| e.detections),
    );
    Ok(())
}

/// `mad backtest --nab DIR`: a NAB-layout corpus, scored by NAB's rules.
pub fn nab(
    nab: &Path,
    only: &[String],
    settings: Settings<'_>,
    detection: Detection,
    output: Output<'_>,
) -> anyhow::Result<()> {
    let Output { out, plot } = output;
    let retrain = settings.retrain;
    let (training, library) = training(settings)?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos} files {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix("backtest");
    let run = super::corpus::NabRun {
        only,
        training: &training,
        detection,
        retrain,
        onnxruntime: library.as_deref(),
        out,
        charts: plot.is_some(),
    };
    let report = super::corpus::run_nab(nab, &run, &mut |name| {
        bar.inc(1);
        bar.set_message(name.to_string());
    })
    .map_err(anyhow::Error::msg)?;
    bar.finish_and_clear();
    if let Some(path) = plot {
        write_plot(path, &report.charts)?;
    }
    println!(
        "{:<58} {:>6} {:>8} {:>4} {:>6} {:>7}",
        "file", "rows", "windows", "FP", "score", "train"
    );
    for f in &report.files {
        println!(
            "{:<58} {:>6} {:>4}/{:<3} {:>4} {:>6.2} {:>6.1}s",
            f.name, f.rows, f.windows_found, f.windows, f.false_positives, f.score, f.train_seconds
        );
        if let Some(note) = &f.note {
            println!("    not scored: {note}");
        }
    }
    println!();
    for (i, c) in report.corpus.iter().enumerate() {
        let htm = report.htm.as_ref().map_or(String::new(), |h| {
            format!("   NAB's HTM on these files: {:.1}", h[i])
        });
        println!(
            "NAB {:<20} {:>6.1}   (threshold {:.4}, raw {:.2}){htm}",
            c.profile, c.normalized, c.threshold, c.raw
        );
    }
    let mut train: Vec<f64> = report.files.iter().map(|f| f.train_seconds).collect();
    train.sort_by(f64::total_cmp);
    println!(
        "training: {} models, median {:.2} s, longest {:.2} s{}",
        train.len(),
        train[train.len() / 2],
        train.last().copied().unwrap_or_default(),
        searched(report.files.iter().map(|f| f.trials))
    );
    Ok(())
}

/// How much a backtest's models were searched (`training.search`), for its summary line.
fn searched(trials: impl Iterator<Item = usize>) -> String {
    let (models, total) = trials.fold((0, 0), |(n, sum), t| (n + 1, sum + t));
    if total == 0 {
        String::new()
    } else {
        format!(
            ", hyperparameters searched ({:.1} trials per model)",
            total as f64 / models as f64
        )
    }
}
