//! The Numenta Anomaly Benchmark scorer, ported from NAB's spec (`datasets/nab/SCORING.md`):
//! probationary period, scaled-sigmoid row weights, windows scored by their earliest detection,
//! the corpus-wide threshold sweep, and normalisation between the null and the perfect detector.
//! Tested against NAB's own per-file scores of its HTM detector.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// NAB's application profiles: how a true positive, a false positive and a missed window weigh.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    pub name: &'static str,
    pub tp: f64,
    pub fp: f64,
    pub fn_: f64,
}

pub const STANDARD: Profile = Profile {
    name: "standard",
    tp: 1.0,
    fp: 0.11,
    fn_: 1.0,
};
pub const LOW_FP: Profile = Profile {
    name: "reward_low_FP_rate",
    tp: 1.0,
    fp: 0.22,
    fn_: 1.0,
};
pub const LOW_FN: Profile = Profile {
    name: "reward_low_FN_rate",
    tp: 1.0,
    fp: 0.11,
    fn_: 2.0,
};
pub const PROFILES: [Profile; 3] = [STANDARD, LOW_FP, LOW_FN];

/// Share of each file, from its start, that is the detector's to learn from and is not scored.
pub const PROBATION_PERCENT: f64 = 0.15;
/// NAB caps the probationary period at 15% of 5,000 rows.
const PROBATION_CAP: f64 = 0.15 * 5000.0;
/// The threshold of "nothing detected" that opens the sweep.
const NO_DETECTION: f64 = 1.1;

/// Rows of a file that are probationary: never scored.
pub fn probation(rows: usize) -> usize {
    ((PROBATION_PERCENT * rows as f64).floor()).min(PROBATION_CAP) as usize
}

/// NAB timestamps (`YYYY-MM-DD HH:MM:SS[.ffffff]`, UTC) as microseconds since the epoch, so that
/// windows match rows exactly.
pub fn parse_timestamp(text: &str) -> Result<i64, String> {
    let t: SystemTime = humantime::parse_rfc3339_weak(text.trim())
        .map_err(|e| format!("timestamp {text:?}: {e}"))?;
    let micros = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    };
    Ok(micros)
}

/// Anomaly windows by file (`category/file.csv`), as row timestamps in microseconds.
pub type Windows = BTreeMap<String, Vec<(i64, i64)>>;

/// Reads `labels/combined_windows.json`.
pub fn read_windows(path: &Path) -> Result<Windows, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let raw: BTreeMap<String, Vec<[String; 2]>> =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    raw.into_iter()
        .map(|(file, windows)| {
            let parsed = windows
                .iter()
                .map(|[a, b]| Ok((parse_timestamp(a)?, parse_timestamp(b)?)))
                .collect::<Result<Vec<_>, String>>()
                .map_err(|e| format!("{}: {file}: {e}", path.display()))?;
            Ok((file, parsed))
        })
        .collect()
}

fn scaled_sigmoid(y: f64) -> f64 {
    if y > 3.0 {
        -1.0
    } else {
        2.0 / (1.0 + (5.0 * y).exp()) - 1.0
    }
}

/// Where a row stands for scoring.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Place {
    Probationary,
    Outside,
    /// Index into the file's windows.
    Window(usize),
}

/// One file ready to score: its detector scores, and per row the place and weight under a profile.
#[derive(Debug, Clone)]
pub struct ScoredFile {
    pub name: String,
    scores: Vec<f64>,
    places: Vec<Place>,
    windows: usize,
}

/// TP/FP/FN/TN rows at a threshold (non-probationary rows only), as NAB reports them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub tp: usize,
    pub fp: usize,
    pub fn_: usize,
    pub tn: usize,
}

impl ScoredFile {
    /// `timestamps` (microseconds, increasing) and `scores` (in [0, 1]) row by row; `windows` the
    /// file's labelled windows, each of whose ends must be a row's timestamp.
    pub fn new(
        name: &str,
        timestamps: &[i64],
        scores: Vec<f64>,
        windows: &[(i64, i64)],
    ) -> Result<ScoredFile, String> {
        if timestamps.len() != scores.len() {
            return Err(format!(
                "{name}: {} timestamps but {} scores",
                timestamps.len(),
                scores.len()
            ));
        }
        if let Some(bad) = scores.iter().find(|s| !(0.0..=1.0).contains(*s)) {
            return Err(format!("{name}: score {bad} is outside [0, 1]"));
        }
        let row_of = |ts: i64| {
            timestamps
                .binary_search(&ts)
                .map_err(|_| format!("{name}: window edge {ts} µs is not a row's timestamp"))
        };
        let probationary = probation(timestamps.len());
        let mut places = vec![Place::Outside; timestamps.len()];
        for (w, (start, end)) in windows.iter().enumerate() {
            let (l, r) = (row_of(*start)?, row_of(*end)?);
            // NAB's own files are not always in order (`machine_temperature` steps back once),
            // so a window's edges, found by binary search as NAB's scorer finds them, can cross.
            if l > r {
                return Err(format!(
                    "{name}: window {start}..{end} µs ends before it starts"
                ));
            }
            for place in &mut places[l..=r] {
                *place = Place::Window(w);
            }
        }
        for place in &mut places[..probationary] {
            *place = Place::Probationary;
        }
        Ok(ScoredFile {
            name: name.to_string(),
            scores,
            places,
            windows: windows.len(),
        })
    }

    /// The windows with at least one scorable row.
    fn scorable_windows(&self) -> Vec<usize> {
        let mut seen: Vec<usize> = self
            .places
            .iter()
            .filter_map(|p| match p {
                Place::Window(w) => Some(*w),
                _ => None,
            })
            .collect();
        seen.dedup();
        seen
    }

    /// Each row's weight if detected (NAB's "sweepScore") under `profile`.
    fn sigmas(&self, profile: &Profile) -> Vec<f64> {
        let max_tp = scaled_sigmoid(-1.0);
        // Window bounds in rows, from the places (probationary rows never start a window).
        let mut bounds: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
        for (i, place) in self.places.iter().enumerate() {
            if let Place::Window(w) = place {
                bounds.entry(*w).or_insert((i, i)).1 = i;
            }
        }
        let mut last_window: Option<(usize, usize)> = None;
        let mut out = Vec::with_capacity(self.places.len());
        for (i, place) in self.places.iter().enumerate() {
            let sigma = match place {
                Place::Window(w) => {
                    let (l, r) = bounds[w];
                    let width = (r - l + 1) as f64;
                    let pos = -((r - i + 1) as f64) / width;
                    if i == r {
                        last_window = Some((l, r));
                    }
                    profile.tp * scaled_sigmoid(pos) / max_tp
                }
                _ => match last_window {
                    None => -profile.fp,
                    Some((l, r)) => {
                        let width = (r - l + 1) as f64;
                        let pos = (i as f64 - r as f64).abs() / (width - 1.0);
                        profile.fp * scaled_sigmoid(pos)
                    }
                },
            };
            out.push(sigma);
        }
        out
    }

    /// Windows with at least one detection at `threshold`.
    pub fn windows_detected(&self, threshold: f64) -> usize {
        let mut found: Vec<usize> = self
            .places
            .iter()
            .zip(&self.scores)
            .filter_map(|(place, score)| match place {
                Place::Window(w) if *score >= threshold => Some(*w),
                _ => None,
            })
            .collect();
        found.dedup();
        found.len()
    }

    /// NAB's raw score of this file when rows scoring at least `threshold` are detections.
    pub fn raw_score(&self, profile: &Profile, threshold: f64) -> (f64, Counts) {
        let sigmas = self.sigmas(profile);
        let mut best: BTreeMap<usize, f64> = self
            .scorable_windows()
            .into_iter()
            .map(|w| (w, -profile.fn_))
            .collect();
        let mut fp_sum = 0.0;
        let mut counts = Counts::default();
        for ((place, score), sigma) in self.places.iter().zip(&self.scores).zip(&sigmas) {
            let detected = *score >= threshold;
            match (place, detected) {
                (Place::Probationary, _) => {}
                (Place::Window(w), true) => {
                    counts.tp += 1;
                    if let Some(b) = best.get_mut(w) {
                        *b = b.max(*sigma);
                    }
                }
                (Place::Window(_), false) => counts.fn_ += 1,
                (Place::Outside, true) => {
                    counts.fp += 1;
                    fp_sum += sigma;
                }
                (Place::Outside, false) => counts.tn += 1,
            }
        }
        (best.values().sum::<f64>() + fp_sum, counts)
    }
}

/// A corpus scored under one profile: the sweep's best threshold and the normalised score.
#[derive(Debug, Clone, PartialEq)]
pub struct CorpusScore {
    pub profile: &'static str,
    pub threshold: f64,
    pub raw: f64,
    /// 100 = every window found at its first row and no false positive; 0 = the null detector.
    pub normalized: f64,
}

/// Sweeps every distinct score of the corpus as a threshold and keeps the best (the highest
/// threshold on a tie), as NAB's optimizer does; one threshold for all files.
pub fn sweep(files: &[ScoredFile], profile: &Profile) -> CorpusScore {
    struct Row {
        score: f64,
        sigma: f64,
        window: Option<usize>,
    }
    let mut rows = Vec::new();
    let mut window_value = Vec::new();
    for file in files {
        let sigmas = file.sigmas(profile);
        let base = window_value.len();
        let scorable = file.scorable_windows();
        window_value.resize(base + file.windows, None);
        for w in scorable {
            window_value[base + w] = Some(-profile.fn_);
        }
        for ((place, score), sigma) in file.places.iter().zip(&file.scores).zip(sigmas) {
            match place {
                Place::Probationary => {}
                Place::Outside => rows.push(Row {
                    score: *score,
                    sigma,
                    window: None,
                }),
                Place::Window(w) => rows.push(Row {
                    score: *score,
                    sigma,
                    window: Some(base + w),
                }),
            }
        }
    }
    // Stable: equal scores keep their order, as Python's sorted does.
    rows.sort_by(|a, b| b.score.total_cmp(&a.score));
    let windows = window_value.iter().flatten().count();
    let mut raw: f64 = window_value.iter().flatten().sum();
    let mut best = (NO_DETECTION, raw);
    let mut previous = NO_DETECTION;
    let mut consider = |threshold: f64, raw: f64| {
        if raw > best.1 {
            best = (threshold, raw);
        }
    };
    for row in &rows {
        if row.score != previous {
            consider(previous, raw);
            previous = row.score;
        }
        match row.window {
            None => raw += row.sigma,
            Some(w) => {
                if let Some(value) = window_value[w].as_mut() {
                    if row.sigma > *value {
                        raw += row.sigma - *value;
                        *value = row.sigma;
                    }
                }
            }
        }
    }
    consider(previous, raw);
    let (threshold, raw) = best;
    CorpusScore {
        profile: profile.name,
        threshold,
        raw,
        normalized: normalize(raw, windows, profile),
    }
}

/// NAB = 100 · (raw − null) / (perfect − null), with null = −windows · A_FN (the detector that
/// never fires) and perfect = windows · A_TP.
pub fn normalize(raw: f64, windows: usize, profile: &Profile) -> f64 {
    let null = -(windows as f64) * profile.fn_;
    let perfect = windows as f64 * profile.tp;
    if perfect == null {
        return 0.0;
    }
    100.0 * (raw - null) / (perfect - null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(scores: Vec<f64>, windows: &[(i64, i64)]) -> ScoredFile {
        let ts: Vec<i64> = (0..scores.len() as i64).collect();
        ScoredFile::new("f.csv", &ts, scores, windows).expect("valid file")
    }

    #[test]
    fn a_window_that_ends_before_it_starts_is_an_error() {
        let e = ScoredFile::new("f.csv", &[0, 1, 2], vec![0.0; 3], &[(2, 1)]).err();
        assert!(e.is_some_and(|e| e.contains("ends before it starts")));
    }

    #[test]
    fn the_scaled_sigmoid_matches_nab() {
        assert!((scaled_sigmoid(-1.0) - 0.986_614_298_151_430_3).abs() < 1e-15);
        assert_eq!(scaled_sigmoid(3.5), -1.0);
        assert_eq!(scaled_sigmoid(0.0), 0.0);
    }

    #[test]
    fn probation_is_fifteen_percent_capped_at_750_rows() {
        assert_eq!(probation(100), 15);
        assert_eq!(probation(4032), 604);
        assert_eq!(probation(22_695), 750);
    }

    #[test]
    fn a_detection_at_a_window_start_earns_the_full_weight() {
        // 100 rows, 15 probationary, a window at rows 50..=59.
        let mut scores = vec![0.0; 100];
        scores[50] = 1.0;
        let f = file(scores, &[(50, 59)]);
        let (raw, counts) = f.raw_score(&STANDARD, 0.5);
        assert!((raw - 1.0).abs() < 1e-12, "{raw}");
        assert_eq!(
            counts,
            Counts {
                tp: 1,
                fp: 0,
                fn_: 9,
                tn: 75
            }
        );
        let missed = file(vec![0.0; 100], &[(50, 59)]);
        assert_eq!(missed.raw_score(&LOW_FN, 0.5).0, -2.0);
        assert_eq!(normalize(1.0, 1, &STANDARD), 100.0);
        assert_eq!(normalize(-1.0, 1, &STANDARD), 0.0);
    }

    #[test]
    fn false_positives_cost_less_right_after_a_window() {
        let mut before = vec![0.0; 100];
        before[20] = 1.0;
        let mut after = vec![0.0; 100];
        after[61] = 1.0;
        let (b, _) = file(before, &[(50, 59)]).raw_score(&STANDARD, 0.5);
        let (a, _) = file(after, &[(50, 59)]).raw_score(&STANDARD, 0.5);
        assert!((b - (-1.0 - 0.11)).abs() < 1e-12, "{b}");
        assert!(a > b && a < -1.0, "{a}");
    }

    #[test]
    fn the_sweep_finds_the_threshold_that_separates() {
        let mut scores = vec![0.1; 100];
        scores[50] = 0.9;
        scores[30] = 0.5;
        let best = sweep(&[file(scores, &[(50, 59)])], &STANDARD);
        assert_eq!(best.threshold, 0.9);
        assert!((best.normalized - 100.0).abs() < 1e-9);
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(ScoredFile::new("f", &[0, 1], vec![0.5], &[]).is_err());
        assert!(ScoredFile::new("f", &[0], vec![1.5], &[]).is_err());
        assert!(ScoredFile::new("f", &[0, 1], vec![0.5, 0.5], &[(0, 7)]).is_err());
        assert_eq!(
            parse_timestamp("2014-04-10 07:15:00.000000"),
            parse_timestamp("2014-04-10 07:15:00")
        );
    }
}
