//! `mad backtest`: recorded data scored as the exporter would score it live, and NAB's verdict.

use std::process::Command;

use mad::backtest::corpus::{read_nab_csv, run_nab, Scoring};
use mad::backtest::datasets_dir;
use mad::backtest::replay::{replay, Recording};
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
    let a = replay(&full, 600, &options, None).expect("replay");
    let b = replay(&cut, 600, &options, None).expect("replay");
    let scored = b.scores.iter().flatten().count();
    assert!(scored > 900, "only {scored} of 1,100 rows scored");
    assert_eq!(
        a.scores[..1_100],
        b.scores[..],
        "the future leaked into the past"
    );
}

#[test]
fn the_jump_is_found_and_every_row_is_written() {
    let nab = datasets_dir().expect("datasets").join("nab");
    let out = tempfile::tempdir().expect("tempdir");
    let report = run_nab(
        &nab,
        &["art_daily_jumpsup".to_string()],
        &TrainOptions::default(),
        Scoring::Likelihood,
        None,
        Some(out.path()),
        &mut |_| {},
    )
    .expect("backtest");
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
