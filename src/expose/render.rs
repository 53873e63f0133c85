//! The score series in Prometheus text format (DESIGN.md, Contract 1).
//!
//! Scores change once per cycle but may be scraped many times in between, so each detector's
//! lines are rendered once after its cycle into shared buffers, and a scrape sends those buffers
//! as they are: concurrent scrapes of 100,000 series would otherwise each hold their own copy of
//! a 50 MB body. Label sets are rendered once per series and cached.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

use crate::score::{group, DetectorScorer, Score};
use crate::source::Labels;

/// The label MAD adds: the detector that produced the score.
pub const DETECTOR_LABEL: &str = "for";
/// Prefix given to an input label whose name MAD needs or Prometheus reserves.
const EXPORTED_PREFIX: &str = "exported_";

/// One exposed metric family: its name, help text and how to read it from a score.
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub value: fn(&Score) -> f64,
}

/// Index in [`FAMILIES`] of the score that alerts: per series, or per group of a multivariate
/// detector.
pub const SCORE: usize = 0;
/// Index of a multivariate detector's per-input scores.
pub const CONTRIBUTION: usize = 1;

/// The families in exposition order (DESIGN.md, Contract 1).
pub const FAMILIES: [Family; 6] = [
    Family {
        name: "anomaly_score",
        help: "Above 1 = anomalous: how unusual the value's deviation from the forecast is (detection.scoring).",
        value: |s| s.score,
    },
    Family {
        name: "anomaly_contribution",
        help: "A multivariate detector's per-input score; the group's anomaly_score is the mean of its three highest.",
        value: |s| s.score,
    },
    Family {
        name: "yhat",
        help: "Forecast of the scored value.",
        value: |s| s.yhat,
    },
    Family {
        name: "yhat_lower",
        help: "Lower edge of the expected band.",
        value: |s| s.lower,
    },
    Family {
        name: "yhat_upper",
        help: "Upper edge of the expected band.",
        value: |s| s.upper,
    },
    Family {
        name: "y",
        help: "The value that was scored.",
        value: |s| s.y,
    },
];

/// Rendered lines of every detector, ready to be served.
#[derive(Default)]
pub struct Exposition {
    /// detector → one block of sample lines per family.
    blocks: BTreeMap<String, [Bytes; FAMILIES.len()]>,
    /// detector → input labels → rendered `{...}` label set.
    label_cache: HashMap<String, HashMap<Labels, String>>,
    /// The same for the groups of multivariate detectors.
    group_cache: HashMap<String, HashMap<Labels, String>>,
}

impl Exposition {
    /// Re-renders one detector's series from its scorer. A multivariate detector's series are
    /// its inputs: they get `anomaly_contribution` instead of `anomaly_score`, which goes to
    /// their group.
    pub fn update(&mut self, detector: &str, scorer: &DetectorScorer, multivariate: bool) {
        let cache = self.label_cache.entry(detector.to_string()).or_default();
        // Series the scorer dropped (stale) leave the cache too.
        cache.retain(|labels, _| scorer.tracks(labels));
        let skipped = if multivariate { SCORE } else { CONTRIBUTION };
        let mut block: [String; FAMILIES.len()] = Default::default();
        for (labels, _, score) in scorer.latest() {
            if !cache.contains_key(labels) {
                let rendered = render_label_set(&exposed_labels(labels, detector));
                cache.insert(labels.clone(), rendered);
            }
            let rendered = &cache[labels];
            for (i, (out, family)) in block.iter_mut().zip(&FAMILIES).enumerate() {
                if i != skipped {
                    write_sample(out, family.name, rendered, (family.value)(score));
                }
            }
        }
        if multivariate {
            let old = self.group_cache.remove(detector).unwrap_or_default();
            let mut cache = HashMap::with_capacity(old.len());
            let groups = group::latest(scorer.latest().map(|(labels, _, score)| (labels, score)));
            for g in groups {
                let rendered = old
                    .get(&g.labels)
                    .cloned()
                    .unwrap_or_else(|| render_label_set(&exposed_labels(&g.labels, detector)));
                write_sample(&mut block[SCORE], FAMILIES[SCORE].name, &rendered, g.score);
                cache.insert(g.labels, rendered);
            }
            self.group_cache.insert(detector.to_string(), cache);
        }
        self.blocks
            .insert(detector.to_string(), block.map(Bytes::from));
    }

    /// Removes a detector's series (datasource down, model unloaded).
    pub fn clear(&mut self, detector: &str) {
        self.blocks.remove(detector);
    }

    /// All families, each with one HELP and TYPE header, as the shared buffers they are kept
    /// in: appending them costs a reference count each, not a copy.
    pub fn chunks(&self, out: &mut Vec<Bytes>) {
        for (i, family) in FAMILIES.iter().enumerate() {
            if self.blocks.values().all(|b| b[i].is_empty()) {
                continue;
            }
            out.push(Bytes::from(format!(
                "# HELP {} {}\n# TYPE {} gauge\n",
                family.name, family.help, family.name
            )));
            out.extend(
                self.blocks
                    .values()
                    .filter(|b| !b[i].is_empty())
                    .map(|b| b[i].clone()),
            );
        }
    }

    /// [`Exposition::chunks`] appended to one string.
    pub fn write_to(&self, out: &mut String) {
        let mut chunks = Vec::new();
        self.chunks(&mut chunks);
        for chunk in chunks {
            out.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Number of scored series (or groups) exposed, for readiness and tests.
    pub fn series_count(&self) -> usize {
        self.blocks
            .values()
            .map(|b| b[SCORE].iter().filter(|&&c| c == b'\n').count())
            .sum()
    }
}

/// The labels a score carries: every input label plus `for="<detector>"`. An input label that
/// would collide with `for`, or that Prometheus reserves (`__name__` and other `__` names), is
/// kept under an `exported_` name; names that are not valid Prometheus label names are
/// sanitised. Nothing is dropped silently.
pub fn exposed_labels(input: &Labels, detector: &str) -> Vec<(String, String)> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    out.insert(DETECTOR_LABEL.to_string(), detector.to_string());
    for (name, value) in input {
        let mut name = sanitize_label_name(name);
        if name.starts_with("__") {
            name = format!("{EXPORTED_PREFIX}{}", name.trim_matches('_'));
        }
        while out.contains_key(&name) {
            name = format!("{EXPORTED_PREFIX}{name}");
        }
        out.insert(name, value.clone());
    }
    out.into_iter().collect()
}

fn sanitize_label_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn render_label_set(labels: &[(String, String)]) -> String {
    let mut out = String::from("{");
    for (i, (name, value)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(name);
        out.push_str("=\"");
        escape_label_value(value, &mut out);
        out.push('"');
    }
    out.push('}');
    out
}

/// Escapes a label value for the text format: backslash, double quote and newline.
pub fn escape_label_value(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn write_sample(out: &mut String, family: &str, labels: &str, value: f64) {
    out.push_str(family);
    out.push_str(labels);
    out.push(' ');
    write_value(value, out);
    out.push('\n');
}

fn write_value(v: f64, out: &mut String) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        // ryu: the shortest text that parses back to the same f64, several times faster than
        // `Display`, and this runs five times per series per cycle.
        out.push_str(ryu::Buffer::new().format_finite(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::source::labels_of as labels;

    #[test]
    fn detector_label_is_added_and_collisions_are_kept() {
        let got = exposed_labels(
            &labels(&[
                ("__name__", "cpu"),
                ("for", "5m"),
                ("exported_for", "x"),
                ("instance", "a"),
            ]),
            "det",
        );
        let got: BTreeMap<_, _> = got.into_iter().collect();
        assert_eq!(got["for"], "det");
        assert_eq!(got["exported_name"], "cpu");
        assert_eq!(got["exported_exported_for"], "5m");
        assert_eq!(got["exported_for"], "x");
        assert_eq!(got["instance"], "a");
        assert_eq!(got.len(), 5, "no label dropped: {got:?}");
    }

    #[test]
    fn hostile_values_are_escaped_and_names_sanitised() {
        let set = render_label_set(&exposed_labels(
            &labels(&[("job", "a\"b\\c\nd}"), ("bad-name", "x"), ("9lives", "y")]),
            "d",
        ));
        assert_eq!(
            set,
            r#"{_9lives="y",bad_name="x",for="d",job="a\"b\\c\nd}"}"#
        );
    }

    #[test]
    fn values_use_prometheus_spelling() {
        let shown = |v: f64| {
            let mut out = String::new();
            write_value(v, &mut out);
            out
        };
        assert_eq!(shown(f64::NAN), "NaN");
        assert_eq!(shown(f64::INFINITY), "+Inf");
        assert_eq!(shown(f64::NEG_INFINITY), "-Inf");
        assert_eq!(shown(1.5), "1.5");
    }
}
