//! The NAB scorer reproduces NAB's own per-file scores of its HTM detector
//! (`datasets/nab/reference/numenta/`), for every file and all three profiles, to 1e-6.

use std::collections::BTreeMap;
use std::path::Path;

use mad::backtest::datasets_dir;
use mad::backtest::nab::{parse_timestamp, read_windows, ScoredFile, PROFILES};

/// Timestamps and `anomaly_score` of NAB's detector output for one data file.
fn detector_output(path: &Path) -> (Vec<i64>, Vec<f64>) {
    let mut reader = csv::Reader::from_path(path).expect("reference output");
    let headers = reader.headers().expect("header").clone();
    let column = headers
        .iter()
        .position(|h| h == "anomaly_score")
        .expect("anomaly_score column");
    let (mut ts, mut scores) = (Vec::new(), Vec::new());
    for record in reader.records() {
        let record = record.expect("row");
        ts.push(parse_timestamp(&record[0]).expect("timestamp"));
        scores.push(record[column].parse().expect("score"));
    }
    (ts, scores)
}

#[test]
fn per_file_scores_match_nab_for_every_profile() {
    let data = datasets_dir().expect("datasets");
    let nab = data.join("nab");
    let windows = read_windows(&nab.join("labels/combined_windows.json")).expect("windows");
    let reference = nab.join("reference/numenta");
    let mut checked = 0;
    for profile in PROFILES {
        let table = reference.join(format!("numenta_{}_scores.csv", profile.name));
        let mut reader = csv::Reader::from_path(&table).expect("scores table");
        let mut files: BTreeMap<String, ScoredFile> = BTreeMap::new();
        for record in reader.deserialize::<BTreeMap<String, String>>() {
            let row = record.expect("row");
            let file = &row["File"];
            if file == "Totals" || file.is_empty() {
                continue;
            }
            let (category, name) = file.split_once('/').expect("category/file");
            let scored = files.entry(file.clone()).or_insert_with(|| {
                let (ts, scores) =
                    detector_output(&reference.join(category).join(format!("numenta_{name}")));
                ScoredFile::new(file, &ts, scores, &windows[file.as_str()]).expect("scorable")
            });
            let threshold: f64 = row["Threshold"].parse().expect("threshold");
            let expected: f64 = row["Score"].parse().expect("score");
            let (raw, counts) = scored.raw_score(&profile, threshold);
            assert!(
                (raw - expected).abs() < 1e-6,
                "{} {file}: {raw} != {expected}",
                profile.name
            );
            let count = |k: &str| row[k].parse::<usize>().expect("count");
            assert_eq!(
                (counts.tp, counts.fp, counts.fn_, counts.tn),
                (count("TP"), count("FP"), count("FN"), count("TN")),
                "{} {file}",
                profile.name
            );
            checked += 1;
        }
    }
    assert!(checked >= 3 * 31, "only {checked} rows checked");
}
