//! Silences: set from a firing message's buttons, listed and removed with bot commands, and
//! respected by intake (a silenced alert's changes are recorded but not sent).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Labels that name the rule rather than the series: a silence covers every severity.
const NOT_SERIES_LABELS: [&str; 2] = ["alertname", "severity"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Silence {
    pub id: u64,
    /// Every one must equal the alert's label.
    pub matchers: BTreeMap<String, String>,
    pub until: i64,
    pub by: String,
    pub created_at: i64,
}

impl Silence {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.matchers.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// The labels a "silence this series" button silences.
pub fn series_matchers(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter(|(k, _)| !NOT_SERIES_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_silence_covers_every_severity_of_that_series_only() {
        let labels = |instance: &str, severity: &str| -> BTreeMap<String, String> {
            [
                ("alertname", "MadAnomaly"),
                ("instance", instance),
                ("severity", severity),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
        };
        let silence = Silence {
            id: 1,
            matchers: series_matchers(&labels("a", "warning")),
            until: 10,
            by: "@oncall".into(),
            created_at: 0,
        };
        assert!(!silence.matchers.contains_key("severity"));
        assert!(silence.matches(&labels("a", "critical")));
        assert!(!silence.matches(&labels("b", "warning")));
    }
}
