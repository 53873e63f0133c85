//! What vmalert and Alertmanager send, turned into one alert type.
//!
//! vmalert posts a bare JSON array to `/api/v2/alerts` (Alertmanager API v2) and repeats every
//! alert on each evaluation; Alertmanager's webhook posts an object with an `alerts` array.
//! Label maps may repeat a key (vmalert does for `alertname`): the last value wins.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Largest request body accepted: 1,000 alerts with long label sets fit comfortably.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// One alert as the relay keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Unix seconds; 0 when not given.
    pub starts_at: i64,
    /// Firing when `ends_at` is in the future or not given, resolved otherwise.
    pub firing: bool,
    pub generator_url: String,
}

impl Alert {
    /// Identity across repeats: the label set.
    pub fn key(&self) -> String {
        serde_json::to_string(&self.labels).unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        self.labels.get("alertname").map_or("alert", String::as_str)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawAlert {
    #[serde(default)]
    status: Option<String>,
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    starts_at: Option<String>,
    #[serde(default)]
    ends_at: Option<String>,
    #[serde(default, rename = "generatorURL")]
    generator_url: Option<String>,
}

#[derive(Deserialize)]
struct Webhook {
    version: String,
    alerts: Vec<RawAlert>,
}

/// Parses either payload. `now` (Unix seconds) decides firing vs resolved from `endsAt`.
pub fn parse(body: &[u8], now: i64) -> Result<Vec<Alert>, String> {
    let raw: Vec<RawAlert> = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => serde_json::from_slice(body).map_err(|e| format!("alerts array: {e}"))?,
        Some(b'{') => {
            let hook: Webhook =
                serde_json::from_slice(body).map_err(|e| format!("Alertmanager webhook: {e}"))?;
            if hook.version != "4" {
                return Err(format!(
                    "Alertmanager webhook version {:?}, expected \"4\"",
                    hook.version
                ));
            }
            hook.alerts
        }
        _ => {
            return Err("expected a JSON array of alerts or an Alertmanager webhook object".into())
        }
    };
    raw.into_iter()
        .enumerate()
        .map(|(i, a)| convert(a, now).map_err(|e| format!("alert {i}: {e}")))
        .collect()
}

fn convert(raw: RawAlert, now: i64) -> Result<Alert, String> {
    if raw.labels.is_empty() {
        return Err("no labels".into());
    }
    let time = |field: &str, text: &Option<String>| -> Result<Option<i64>, String> {
        match text.as_deref() {
            None | Some("") => Ok(None),
            // Go's zero time: "not set".
            Some(t) if t.starts_with("0001-01-01") => Ok(None),
            Some(t) => humantime::parse_rfc3339_weak(t.trim_end_matches('Z'))
                .or_else(|_| humantime::parse_rfc3339(t))
                .map(|st| {
                    Some(
                        st.duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs() as i64),
                    )
                })
                .map_err(|e| format!("{field} {t:?}: {e}")),
        }
    };
    let starts_at = time("startsAt", &raw.starts_at)?.unwrap_or(0);
    let ends_at = time("endsAt", &raw.ends_at)?;
    let firing = match raw.status.as_deref() {
        Some("resolved") => false,
        Some("firing") => true,
        _ => ends_at.is_none_or(|end| end > now),
    };
    Ok(Alert {
        labels: map_without_nul(raw.labels),
        annotations: map_without_nul(raw.annotations),
        starts_at,
        firing,
        generator_url: without_nul(&raw.generator_url.unwrap_or_default()),
    })
}

/// PostgreSQL refuses NUL in text and JSON, so an alert carrying one could never be queued:
/// it is replaced, the same way every time, so firing and resolved still match.
fn without_nul(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

fn map_without_nul(map: BTreeMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter()
        .map(|(k, v)| (without_nul(&k), without_nul(&v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000; // 2023-11-14T22:13:20Z

    #[test]
    fn parses_vmalert_with_duplicate_label_keys() {
        let body = br#"[{"labels":{"alertname":"MadAnomaly","alertname":"MadAnomaly","for":"cpu","instance":"a"},
            "annotations":{"summary":"cpu is odd"},"startsAt":"2023-11-14T22:00:00Z",
            "endsAt":"2023-11-14T22:20:00Z","generatorURL":"http://vmalert/1"}]"#;
        let alerts = parse(body, NOW).expect("parses");
        assert_eq!(alerts.len(), 1);
        assert!(alerts[0].firing);
        assert_eq!(alerts[0].name(), "MadAnomaly");
        assert_eq!(alerts[0].starts_at, NOW - 800);
        assert_eq!(alerts[0].labels.len(), 3);
    }

    #[test]
    fn nul_characters_are_replaced_so_the_alert_can_be_stored() {
        let body = br#"[{"labels":{"alertname":"A","instance":"a\u0000b"},
            "annotations":{"summary":"x\u0000"},"startsAt":"2023-11-14T22:00:00Z"}]"#;
        let alerts = parse(body, 1_700_000_000).expect("parses");
        assert_eq!(alerts[0].labels["instance"], "a\u{FFFD}b");
        assert_eq!(alerts[0].annotations["summary"], "x\u{FFFD}");
    }

    #[test]
    fn ends_at_in_the_past_means_resolved() {
        let body = br#"[{"labels":{"alertname":"A"},"startsAt":"2023-11-14T22:00:00Z","endsAt":"2023-11-14T22:10:00Z"}]"#;
        assert!(!parse(body, NOW).expect("parses")[0].firing);
    }

    #[test]
    fn parses_alertmanager_webhook_v4() {
        let body = br#"{"version":"4","status":"firing","receiver":"mad","groupKey":"{}","alerts":[
            {"status":"resolved","labels":{"alertname":"A"},"annotations":{},"startsAt":"2023-11-14T22:00:00Z",
             "endsAt":"2023-11-14T22:05:00Z","generatorURL":"","fingerprint":"abc"},
            {"status":"firing","labels":{"alertname":"B"},"annotations":{},"startsAt":"2023-11-14T22:00:00Z",
             "endsAt":"0001-01-01T00:00:00Z","generatorURL":"","fingerprint":"def"}],
            "groupLabels":{},"commonLabels":{},"commonAnnotations":{},"externalURL":"http://am","truncatedAlerts":0}"#;
        let alerts = parse(body, NOW).expect("parses");
        assert_eq!(
            alerts.iter().map(|a| a.firing).collect::<Vec<_>>(),
            vec![false, true]
        );
    }

    #[test]
    fn malformed_bodies_are_errors_with_a_reason() {
        for (body, expect) in [
            (&b""[..], "expected a JSON array"),
            (b"nonsense", "expected a JSON array"),
            (b"[{}]", "labels"),
            (br#"[{"labels":{}}]"#, "no labels"),
            (
                br#"[{"labels":{"a":"b"},"startsAt":"yesterday"}]"#,
                "startsAt",
            ),
            (br#"{"version":"3","alerts":[]}"#, "version"),
            (br#"[{"labels":{"a":1}}]"#, "alerts array"),
        ] {
            let e = parse(body, NOW).expect_err("must fail");
            assert!(
                e.contains(expect),
                "{:?}: {e}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
