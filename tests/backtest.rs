//! `mad backtest`: recorded data scored as the exporter would score it live, and NAB's verdict.

use std::process::Command;

use mad::backtest::corpus::{read_nab_csv, run_nab, NabRun};
use mad::backtest::datasets_dir;
use mad::backtest::replay::{replay, Recording, Retrain, Training};
use mad::score::likelihood::MIN_HISTORY;
use mad::score::Detection;
use mad_training::TrainOptions;

const JUMPS_UP: &str = "artificialWithAnomaly/art_daily_jumpsup.csv";

fn jumps_up() -> Recording {
    let nab = datasets_dir().expect("datasets").join("nab");
    read_nab_csv(&nab.join("data").join(JUMPS_UP), JUMPS_UP).expect("NAB file")
}

fn truncated(recording: &Recording, rows: usize) -> Recording {
    Recording {
        name: recording.name.clone(),
        labels: recording.labels.clone(),
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
    let training = Training::default();
    // Retraining on what was seen (at 600 rows here) must not peek either.
    for retrain in [Retrain::Never, Retrain::WhenDoubled] {
        let a = replay(&full, 300, &training, retrain, Detection::default(), None).expect("replay");
        let b = replay(&cut, 300, &training, retrain, Detection::default(), None).expect("replay");
        let scored = b.scores.iter().flatten().count();
        // Every row after the 300 learnt from and the likelihood's history of its errors.
        assert!(
            scored >= 1_100 - 300 - MIN_HISTORY,
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
    let training = Training::default();
    let only = ["art_daily_jumpsup".to_string()];
    let run = NabRun {
        only: &only,
        training: &training,
        detection: Detection::default(),
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

#[test]
fn a_machine_whose_train_and_test_widths_differ_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    asd_slice(dir.path());
    // One column fewer in every training row.
    let train = dir.path().join("train/omi-1.txt");
    let narrower: Vec<String> = std::fs::read_to_string(&train)
        .expect("train")
        .lines()
        .map(|l| l.rsplit_once(',').map_or(l, |(head, _)| head).to_string())
        .collect();
    std::fs::write(&train, narrower.join("\n")).expect("write");
    let e = mad::backtest::machines::run_machine(
        dir.path(),
        "omi-1",
        300,
        &Training::default(),
        Detection::default(),
        None,
        Default::default(),
    )
    .expect_err("refused");
    assert!(e.contains("18 columns") && e.contains("19"), "{e}");
}

/// `training.search` in the config a backtest reads searches each model's hyperparameters, as
/// `mad train` would: the backtest measures what the search is worth.
#[test]
fn a_backtest_searches_hyperparameters_when_the_config_asks() {
    let nab = datasets_dir().expect("datasets").join("nab");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("search.yaml");
    std::fs::write(
        &config,
        "datasource: { url: \"http://127.0.0.1:9\" }\n\
         detectors: [{ name: nab, query: up, step: 5m }]\n\
         training: { search: { trials: 3, time: 10m } }\n",
    )
    .expect("write config");
    let run = |config: Option<&std::path::Path>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_mad"));
        command
            .args(["backtest", "--only", "art_daily_jumpsup", "--nab"])
            .arg(&nab);
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        let output = command.output().expect("run mad backtest");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    };
    let searched = run(Some(&config));
    let summary = searched
        .lines()
        .find(|l| l.starts_with("training:"))
        .unwrap_or_else(|| panic!("no training line: {searched}"));
    assert!(
        summary.contains("hyperparameters searched (3.0 trials per model)"),
        "{summary}"
    );
    let file = searched
        .lines()
        .find(|l| l.contains("art_daily_jumpsup"))
        .unwrap_or_else(|| panic!("no row for the file: {searched}"));
    assert!(file.contains("1/1"), "the jump is still found: {file}");
    let plain = run(None);
    assert!(!plain.contains("searched"), "{plain}");
}

#[test]
fn the_same_seed_repeats_a_backtest_and_another_seed_trains_another_model() {
    let nab = datasets_dir().expect("datasets").join("nab");
    let dir = tempfile::tempdir().expect("tempdir");
    let runs = std::cell::Cell::new(0);
    let scores = |seed: &str| -> String {
        runs.set(runs.get() + 1);
        let out = dir.path().join(format!("run-{}", runs.get()));
        let output = Command::new(env!("CARGO_BIN_EXE_mad"))
            .args([
                "backtest",
                "--only",
                "art_daily_jumpsup",
                "--seed",
                seed,
                "--nab",
            ])
            .arg(&nab)
            .arg("--out")
            .arg(&out)
            .output()
            .expect("run mad backtest");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let file = out.join("artificialWithAnomaly/art_daily_jumpsup.csv");
        std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
    };
    let first = scores("7");
    assert_eq!(first, scores("7"), "one seed, one model, the same scores");
    assert_ne!(first, scores("8"), "another seed trains another model");
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
        &Training::default(),
        Detection::default(),
        None,
        mad::backtest::machines::MachineRun {
            retrain: Retrain::Never,
            charts: true,
            scores: Some(&dir.path().join("scores")),
        },
    )
    .expect("backtest");
    println!("{r:?}");
    assert_eq!((r.rows, r.metrics, r.events.events), (1_400, 19, 2));
    assert!(r.events.found >= 1 && r.events.right >= 1, "{r:?}");
    assert!(r.best_f1 > 0.2 && r.default_f1 <= r.best_f1, "{r:?}");
    assert_eq!(r.attribution_segments, 2);
    assert_eq!(
        r.charts.len(),
        3,
        "the most often labelled metrics are plotted"
    );
    assert!(r
        .charts
        .iter()
        .all(|c| c.points.len() == r.rows && c.labelled.len() == 2));
    assert!(r.attribution_hits >= 1, "{r:?}");
    // Every test row is written, with what the report counted: the labels, and the rows
    // above 1 within labelled segments.
    let mut written = csv::Reader::from_path(dir.path().join("scores/omi-1.csv")).expect("csv");
    let header = written.headers().expect("header").clone();
    assert_eq!(header.len(), 4 + 19);
    assert_eq!(
        header.iter().take(4).collect::<Vec<_>>(),
        ["row", "label", "anomaly_score", "driver"]
    );
    let rows: Vec<csv::StringRecord> = written.records().map(|r| r.expect("row")).collect();
    assert_eq!(rows.len(), r.rows);
    let labelled = rows.iter().filter(|row| &row[1] == "1").count();
    let labels = std::fs::read_to_string(dir.path().join("test_label/omi-1.txt")).expect("labels");
    assert_eq!(labelled, labels.lines().filter(|l| l.trim() == "1").count());
    let score =
        |row: &csv::StringRecord, column: usize| -> f64 { row[column].parse().expect("a number") };
    for row in rows.iter().filter(|row| !row[3].is_empty()) {
        let driver: usize = row[3].parse().expect("a metric number");
        let highest = (4..row.len()).map(|c| score(row, c)).fold(0.0, f64::max);
        assert_eq!(score(row, 3 + driver), highest, "{row:?}");
    }
    assert!(rows.iter().any(|row| &row[1] == "1" && score(row, 2) > 1.0));
    // Each run of rows above 1 in the file is one detection the report judged.
    let above: Vec<bool> = rows.iter().map(|row| score(row, 2) > 1.0).collect();
    let runs = above
        .iter()
        .enumerate()
        .filter(|(i, a)| **a && (*i == 0 || !above[i - 1]))
        .count();
    assert_eq!(runs, r.events.detections, "{r:?}");
}

#[test]
fn a_joint_model_reads_all_metrics_of_a_machine_and_finds_the_incident() {
    let dir = tempfile::tempdir().expect("tempdir");
    asd_slice(dir.path());
    let training = Training::from(TrainOptions {
        joint: true,
        ..TrainOptions::default()
    });
    let r = mad::backtest::machines::run_machine(
        dir.path(),
        "omi-1",
        300,
        &training,
        Detection::default(),
        None,
        Default::default(),
    )
    .expect("backtest");
    println!("{r:?}");
    assert_eq!((r.rows, r.metrics, r.events.events), (1_400, 19, 2));
    assert!(r.events.found >= 1 && r.events.right >= 1, "{r:?}");
    assert!(r.best_f1 > 0.2 && r.default_f1 <= r.best_f1, "{r:?}");
    assert!(r.attribution_hits >= 1, "{r:?}");
}

/// A detector replayed over a time range of a real VictoriaMetrics: trained on the first two
/// days, it fires on the third day's incident and keeps quiet on the other series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_from_victoriametrics_is_replayed_and_the_incident_found() {
    use mad::demo::VictoriaMetrics;
    use mad::synth::{Incident, IncidentKind, Profile, Synth};

    const STEP: i64 = 300;
    let dir = tempfile::tempdir().expect("tempdir");
    let vm = VictoriaMetrics::start(&dir.path().join("vm"), None)
        .await
        .expect("start victoria-metrics");
    let end = mad::source::align_down(mad::source::unix_now() - 3_600, STEP);
    let start = end - 3 * 86_400;
    let profile = |instance: &str| Profile {
        metric: "backtest_rate".into(),
        labels: [("instance".to_string(), instance.to_string())].into(),
        base: 100.0,
        daily: 0.4,
        weekend_dip: 0.0,
        fast: 0.0,
        fast_period_secs: 1.0,
        trend_per_week: 0.0,
        noise: 0.03,
    };
    let incident = (end - 6 * 3_600, end - 5 * 3_600);
    let synth = Synth {
        profiles: vec![profile("a"), profile("b")],
        incidents: vec![Incident {
            series: 0,
            start: incident.0,
            end: incident.1,
            kind: IncidentKind::Spike { factor: 1.5 },
            description: "spike".into(),
        }],
        seed: 5,
        origin: start,
    };
    let mut body = String::new();
    for ts in (start..=end).step_by(STEP as usize) {
        synth.exposition_at(ts, &mut body);
    }
    vm.import(body).await.expect("import");
    let text = format!(
        "datasource: {{ url: \"{}\" }}\ntraining: {{ max_epochs: 30 }}\ndetectors:\n  \
         - {{ name: rate, query: backtest_rate, step: 5m, window: 32 }}\n",
        vm.url
    );
    let config =
        mad::config::Config::parse(&text, std::path::Path::new("range.yaml")).expect("config");
    let report = mad::backtest::range::run_range(
        &config,
        &config.detectors[0],
        start,
        end,
        end - 86_400,
        true,
    )
    .await
    .expect("range backtest");
    vm.stop().await;
    println!("{:?}", report.series);
    assert_eq!(report.series.len(), 2);
    assert_eq!(report.charts.len(), 2);
    let of = |instance: &str| {
        report
            .series
            .iter()
            .find(|s| s.series.contains(&format!("\"{instance}\"")))
            .unwrap_or_else(|| panic!("series {instance}: {:?}", report.series))
    };
    let (a, b) = (of("a"), of("b"));
    assert!(a.scored > 250, "a day at 5 minutes is scored: {a:?}");
    assert!(
        a.max_score > 1.0 && (incident.0..=incident.1).contains(&a.max_at),
        "the highest score is in the incident: {a:?}"
    );
    assert!(b.anomalous < a.anomalous, "{a:?} vs {b:?}");
}

/// `mad backtest --csv` on a KPI file (`timestamp,value,label`): the second half is scored, the
/// labelled events there are counted per event, and every row is written with its label.
#[test]
fn a_labelled_csv_is_scored_per_point_and_per_event() {
    let file = datasets_dir().expect("datasets").join("kpi/cpu4.csv");
    let text = std::fs::read_to_string(&file).expect("read the KPI file");
    let labels: Vec<bool> = text.lines().skip(1).map(|l| l.ends_with(",1")).collect();
    let half = labels.len() / 2;
    let events_in_scored_half = labels[half..]
        .iter()
        .zip(std::iter::once(&false).chain(&labels[half..]))
        .filter(|(now, before)| **now && !**before)
        .count();
    let out = tempfile::tempdir().expect("tempdir");
    let plot = out.path().join("kpi.png");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_mad"))
        .args(["backtest", "--csv"])
        .arg(&file)
        .arg("--out")
        .arg(out.path())
        .arg("--plot")
        .arg(&plot)
        .output()
        .expect("run mad backtest");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("cpu4 "))
        .unwrap_or_else(|| panic!("no row for cpu4: {stdout}"));
    let (found, events) = row
        .split_whitespace()
        .filter_map(|cell| cell.split_once('/'))
        .nth(1)
        .unwrap_or_else(|| panic!("no events column: {row}"));
    assert_eq!(events, events_in_scored_half.to_string(), "{row}");
    let found: usize = found.parse().expect("events found");
    assert!(found >= 1, "no labelled event found: {stdout}");
    assert!(stdout.contains("per event at 1: precision"), "{stdout}");
    let written = std::fs::read_to_string(out.path().join("cpu4.csv")).expect("scores written");
    let rows: Vec<&str> = written.lines().skip(1).collect();
    assert_eq!(rows.len(), labels.len());
    assert!(rows
        .iter()
        .zip(&labels)
        .all(|(r, l)| r.ends_with(if *l { ",1" } else { ",0" })));
    assert!(std::fs::metadata(&plot).expect("plot written").len() > 10_000);
}
