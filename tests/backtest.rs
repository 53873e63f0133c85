//! `mad backtest`: recorded data scored as the exporter would score it live, and NAB's verdict.

use std::process::Command;

use mad::backtest::corpus::{read_nab_csv, run_nab, NabRun, Scoring};
use mad::backtest::datasets_dir;
use mad::backtest::replay::{replay, Recording, Retrain};
use mad_training::TrainOptions;

const JUMPS_UP: &str = "artificialWithAnomaly/art_daily_jumpsup.csv";

fn jumps_up() -> Recording {
    let nab = datasets_dir().expect("datasets").join("nab");
    read_nab_csv(&nab.join("data").join(JUMPS_UP), JUMPS_UP).expect("NAB file")
}

fn truncated(recording: &Recording, rows: usize) -> Recording {
    Recording {
        name: recording.name.clone(),
        timestamps: recording.timestamps[..rows].to_vec(),
        values: recording.values[..rows].to_vec(),
    }
}

/// Scores must not depend on anything after the point: the replay of a recording cut short
/// gives the very same scores on the rows both have.
#[test]
fn a_point_is_scored_from_the_past_only() {
    let full = truncated(&jumps_up(), 1_500);
    let cut = truncated(&full, 1_100);
    let options = TrainOptions::default();
    // Retraining on what was seen (at 600 rows here) must not peek either.
    for retrain in [Retrain::Never, Retrain::WhenDoubled] {
        let a = replay(&full, 300, &options, retrain, None).expect("replay");
        let b = replay(&cut, 300, &options, retrain, None).expect("replay");
        let scored = b.scores.iter().flatten().count();
        assert!(
            scored > 900,
            "{retrain:?}: only {scored} of 1,100 rows scored"
        );
        assert_eq!(
            a.scores[..1_100],
            b.scores[..],
            "{retrain:?}: the future leaked into the past"
        );
    }
}

#[test]
fn the_jump_is_found_and_every_row_is_written() {
    let nab = datasets_dir().expect("datasets").join("nab");
    let out = tempfile::tempdir().expect("tempdir");
    let options = TrainOptions::default();
    let only = ["art_daily_jumpsup".to_string()];
    let run = NabRun {
        only: &only,
        options: &options,
        scoring: Scoring::Likelihood,
        retrain: Retrain::Never,
        onnxruntime: None,
        out: Some(out.path()),
        charts: true,
    };
    let report = run_nab(&nab, &run, &mut |_| {}).expect("backtest");
    assert_eq!(report.files.len(), 1);
    let file = &report.files[0];
    assert_eq!((file.windows_found, file.windows), (1, 1), "{file:?}");
    let standard = &report.corpus[0];
    assert_eq!(standard.profile, "standard");
    assert!(
        standard.normalized > 50.0,
        "NAB standard {:.1} on the jump",
        standard.normalized
    );

    let mut reader = csv::Reader::from_path(out.path().join(JUMPS_UP)).expect("scores CSV");
    let header: Vec<String> = reader
        .headers()
        .expect("header")
        .iter()
        .map(String::from)
        .collect();
    assert_eq!(
        header,
        [
            "timestamp",
            "value",
            "anomaly_score",
            "yhat",
            "yhat_lower",
            "yhat_upper",
            "label"
        ]
    );
    let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.expect("row")).collect();
    assert_eq!(rows.len(), file.rows);
    let labelled = rows.iter().filter(|r| &r[6] == "1").count();
    assert!(labelled > 100, "{labelled} rows inside the window");

    // The plot: one chart per file, its labelled window in place, rendered as a PNG.
    assert_eq!(report.charts.len(), 1);
    let chart = &report.charts[0];
    assert_eq!(chart.points.len(), file.rows);
    assert_eq!(chart.labelled.len(), 1);
    let png = mad::chart::render_stack_png(&report.charts, 800, 300).expect("plot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
}

#[test]
fn a_missing_corpus_is_a_clear_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_mad"))
        .args(["backtest", "--nab", "/nonexistent/nab"])
        .output()
        .expect("run mad");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/nonexistent/nab/labels/combined_windows.json"),
        "{stderr}"
    );
}

/// A slice of ASD's omi-1 (the end of its training data, the first 1,400 test rows with two
/// labelled segments), laid out as the corpus is.
fn asd_slice(dir: &std::path::Path) {
    let asd = datasets_dir().expect("datasets").join("asd");
    let lines = |path: std::path::PathBuf| -> Vec<String> {
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .lines()
            .map(String::from)
            .collect()
    };
    let train = lines(asd.join("train/omi-1.txt"));
    let test = lines(asd.join("test/omi-1.txt"));
    let labels = lines(asd.join("test_label/omi-1.txt"));
    let interpretation: Vec<String> = lines(asd.join("interpretation_label/omi-1.txt"))
        .into_iter()
        .filter(|l| {
            l.split('-')
                .next()
                .and_then(|s| s.parse::<usize>().ok())
                .is_some_and(|start| start < 1_300)
        })
        .collect();
    for (folder, rows) in [
        ("train", &train[train.len() - 2_000..]),
        ("test", &test[..1_400]),
        ("test_label", &labels[..1_400]),
        ("interpretation_label", &interpretation[..]),
    ] {
        std::fs::create_dir_all(dir.join(folder)).expect("folder");
        std::fs::write(dir.join(folder).join("omi-1.txt"), rows.join("\n")).expect("slice");
    }
}

#[test]
fn a_machine_is_scored_point_wise_and_the_cause_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    asd_slice(dir.path());
    let r = mad::backtest::machines::run_machine(
        dir.path(),
        "omi-1",
        300,
        &TrainOptions::default(),
        Scoring::Likelihood,
        None,
    )
    .expect("backtest");
    println!("{r:?}");
    assert_eq!((r.rows, r.metrics, r.segments), (1_400, 19, 2));
    assert!(r.segments_found >= 1, "{r:?}");
    assert!(r.best_f1 > 0.2 && r.default_f1 <= r.best_f1, "{r:?}");
    assert_eq!(r.attribution_segments, 2);
    assert!(r.attribution_hits >= 1, "{r:?}");
}
