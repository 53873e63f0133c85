//! Telegram messages in HTML parse mode: escaped, and within Telegram's length limit.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

use super::outbox::{AlertView, Kind, Outgoing};
use crate::text::ellipsize;

/// Telegram's limit is 4096 characters after entity parsing; the tags we add do not count, so
/// staying under it in raw text is safe.
pub const MAX_MESSAGE_CHARS: usize = 4096;
/// A single label value or annotation is cut at this many characters.
const MAX_VALUE_CHARS: usize = 300;
/// Labels shown as the series' identity are not repeated as extra labels.
const NOT_SERIES_LABELS: [&str; 4] = ["alertname", "alertgroup", "severity", "detector"];

/// Escapes text for Telegram's HTML parse mode.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

fn since(starts_at: i64) -> String {
    if starts_at <= 0 {
        return String::new();
    }
    crate::timestamp::rfc3339(starts_at)
}

/// The default first line: what happened, and how many alerts the message carries.
pub const DEFAULT_HEADER: &str = "{% if kind == 'firing' %}🔴 <b>FIRING</b>\
{% elif kind == 'reminder' %}🟠 <b>STILL FIRING</b>{% else %}✅ <b>RESOLVED</b>{% endif %}\
{% if count > 1 %} ({{ count }} alerts){% endif %}";

/// The default block per alert: name, detector, severity, since when, series, the rule's summary
/// and description (which carry the score), the value against the expected band when the relay
/// could read it, and a link.
pub const DEFAULT_ALERT: &str = "<b>{{ alertname }}</b>\
{% if detector %} · detector <code>{{ detector }}</code>{% endif %}\
{% if severity %} · {{ severity }}{% endif %}{% if since %} since {{ since }}{% endif %}
{% if series %}<code>{{ series }}</code>
{% endif %}{% if summary %}{{ summary }}
{% endif %}{% if description %}{{ description }}
{% endif %}{% if value %}value {{ value }}, expected {{ expected_lower }} … {{ expected_upper }}
{% endif %}{% if link %}<a href=\"{{ link }}\">open</a>
{% endif %}";

/// The most anomalous recent point of an alert's series, read from the datasource.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub value: f64,
    pub lower: f64,
    pub upper: f64,
}

/// Four significant digits, no exponent for everyday magnitudes.
fn number(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let magnitude = v.abs().log10().floor() as i32;
    if (-3..6).contains(&magnitude) {
        let decimals = (3 - magnitude).max(0) as usize;
        format!("{v:.decimals$}")
    } else {
        format!("{v:.3e}")
    }
}

/// Message templates (minijinja: Jinja2 syntax). Every value is HTML-escaped for Telegram's
/// HTML parse mode; the template text itself is trusted HTML from the config.
pub struct Templates {
    env: minijinja::Environment<'static>,
}

impl Templates {
    /// Compiles the templates (defaults where `None`) and renders a sample, so a broken
    /// template is refused at start with the reason.
    pub fn new(header: Option<&str>, alert: Option<&str>) -> Result<Templates, String> {
        let mut env = minijinja::Environment::new();
        env.set_formatter(|out, _state, value| {
            let text = if value.is_undefined() || value.is_none() {
                String::new()
            } else if value.is_safe() {
                value.to_string()
            } else {
                escape(&value.to_string())
            };
            out.write_str(&text).map_err(|_| {
                minijinja::Error::new(minijinja::ErrorKind::WriteFailure, "cannot write")
            })
        });
        env.add_template_owned("header", header.unwrap_or(DEFAULT_HEADER).to_string())
            .map_err(|e| format!("relay.templates.header: {e}"))?;
        env.add_template_owned("alert", alert.unwrap_or(DEFAULT_ALERT).to_string())
            .map_err(|e| format!("relay.templates.alert: {e}"))?;
        let templates = Templates { env };
        let sample = Outgoing {
            id: 0,
            chat: 0,
            kind: Kind::Firing,
            alerts: vec![AlertView {
                key: String::new(),
                labels: [("alertname".to_string(), "Sample".to_string())].into(),
                annotations: BTreeMap::new(),
                starts_at: 0,
                generator_url: String::new(),
            }],
            queued_at: 0,
        };
        templates
            .header(&sample)
            .map_err(|e| format!("relay.templates.header: {e}"))?;
        templates
            .alert(
                &sample.alerts[0],
                Some(&Reading {
                    value: 2.0,
                    lower: 0.0,
                    upper: 1.0,
                }),
            )
            .map_err(|e| format!("relay.templates.alert: {e}"))?;
        Ok(templates)
    }

    fn header(&self, message: &Outgoing) -> Result<String, minijinja::Error> {
        let kind = match message.kind {
            Kind::Firing => "firing",
            Kind::Reminder => "reminder",
            Kind::Resolved => "resolved",
        };
        self.env
            .get_template("header")?
            .render(minijinja::context! {
                kind => kind,
                count => message.alerts.len(),
            })
    }

    fn alert(
        &self,
        alert: &AlertView,
        reading: Option<&Reading>,
    ) -> Result<String, minijinja::Error> {
        let get = |map: &BTreeMap<String, String>, key: &str| {
            map.get(key)
                .map(|v| ellipsize(v, MAX_VALUE_CHARS))
                .unwrap_or_default()
        };
        let series: Vec<String> = alert
            .labels
            .iter()
            .filter(|(k, _)| !NOT_SERIES_LABELS.contains(&k.as_str()) && k.as_str() != "for")
            .map(|(k, v)| format!("{k}={}", ellipsize(v, MAX_VALUE_CHARS)))
            .collect();
        let link = alert
            .annotations
            .get("dashboard")
            .filter(|l| l.starts_with("http"))
            .or(Some(&alert.generator_url).filter(|l| l.starts_with("http")))
            .cloned()
            .unwrap_or_default();
        let labels: BTreeMap<&String, String> = alert
            .labels
            .iter()
            .map(|(k, v)| (k, ellipsize(v, MAX_VALUE_CHARS)))
            .collect();
        let annotations: BTreeMap<&String, String> = alert
            .annotations
            .iter()
            .map(|(k, v)| (k, ellipsize(v, MAX_VALUE_CHARS)))
            .collect();
        self.env.get_template("alert")?.render(minijinja::context! {
            alertname => alert.labels.get("alertname").map_or("alert", String::as_str),
            detector => alert.labels.get("for").or_else(|| alert.labels.get("detector")).cloned().unwrap_or_default(),
            severity => get(&alert.labels, "severity"),
            since => since(alert.starts_at),
            series => series.join(", "),
            summary => get(&alert.annotations, "summary"),
            description => get(&alert.annotations, "description"),
            link => link,
            value => reading.map(|r| number(r.value)),
            expected_lower => reading.map(|r| number(r.lower)),
            expected_upper => reading.map(|r| number(r.upper)),
            labels => labels,
            annotations => annotations,
        })
    }

    /// The message text for `message`, under Telegram's length limit; `readings` by alert key.
    pub fn render(&self, message: &Outgoing, readings: &HashMap<String, Reading>) -> String {
        let mut out = self.header(message).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "message header template failed");
            "<b>ALERT</b>".into()
        });
        out.push('\n');
        for (shown, alert) in message.alerts.iter().enumerate() {
            let block = self
                .alert(alert, readings.get(&alert.key))
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "alert template failed");
                    format!(
                        "<b>{}</b>\n",
                        escape(
                            alert
                                .labels
                                .get("alertname")
                                .map_or("alert", String::as_str)
                        )
                    )
                });
            let rest = message.alerts.len() - shown;
            // Keep room for the "and N more" line.
            if out.chars().count() + block.chars().count() + 1 > MAX_MESSAGE_CHARS - 64 {
                let _ = write!(out, "\n… and {rest} more");
                break;
            }
            out.push('\n');
            out.push_str(&block);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(message: &Outgoing) -> String {
        Templates::new(None, None)
            .expect("default templates")
            .render(message, &HashMap::new())
    }

    fn view(i: usize, value: &str) -> AlertView {
        AlertView {
            key: i.to_string(),
            labels: [
                ("alertname".to_string(), "MadAnomaly".to_string()),
                ("for".to_string(), "cpu".to_string()),
                ("instance".to_string(), format!("host-{i}")),
                ("path".to_string(), value.to_string()),
            ]
            .into(),
            annotations: [("summary".to_string(), "score 3.2 > 1".to_string())].into(),
            starts_at: 1_700_000_000,
            generator_url: "http://vmalert/x?a=1&b=2".into(),
        }
    }

    fn message(alerts: Vec<AlertView>) -> Outgoing {
        Outgoing {
            id: 1,
            chat: 1,
            kind: Kind::Firing,
            alerts,
            queued_at: 0,
        }
    }

    #[test]
    fn html_is_escaped() {
        let text = render(&message(vec![view(1, "<script>&\"x\"</script>")]));
        assert!(
            text.contains("&lt;script&gt;&amp;&quot;x&quot;&lt;/script&gt;"),
            "{text}"
        );
        assert!(
            text.contains("href=\"http://vmalert/x?a=1&amp;b=2\""),
            "{text}"
        );
        assert!(text.contains("detector <code>cpu</code>"), "{text}");
        assert!(text.contains("since 2023-11-14T22:13:20Z"), "{text}");
        assert!(!text.contains("<script>"));
    }

    #[test]
    fn the_value_is_shown_against_the_expected_band_when_read() {
        let alert = view(1, "/");
        let readings = [(
            alert.key.clone(),
            Reading {
                value: 97.25,
                lower: 48.1,
                upper: 52.5,
            },
        )]
        .into();
        let templates = Templates::new(None, None).expect("default templates");
        let text = templates.render(&message(vec![alert.clone()]), &readings);
        assert!(
            text.contains("value 97.25, expected 48.10 … 52.50"),
            "{text}"
        );
        let without = templates.render(&message(vec![alert]), &HashMap::new());
        assert!(!without.contains("expected"), "{without}");
        assert_eq!(number(1.5e9), "1.500e9");
        assert_eq!(number(0.000_25), "2.500e-4");
        assert_eq!(number(-3.0), "-3.000");
    }

    #[test]
    fn long_messages_stay_under_the_limit() {
        let huge = "x".repeat(10_000);
        let alerts: Vec<AlertView> = (0..200).map(|i| view(i, &huge)).collect();
        let text = render(&message(alerts));
        assert!(
            text.chars().count() <= MAX_MESSAGE_CHARS,
            "{}",
            text.chars().count()
        );
        assert!(text.contains("more"), "the cut is said");
        assert!(text.contains("(200 alerts)"));
    }
}

#[cfg(test)]
mod template_tests {
    use super::*;

    #[test]
    fn custom_templates_render_escaped_values_and_broken_ones_are_refused() {
        let t = Templates::new(
            Some("{{ kind | upper }}"),
            Some("{{ labels.instance }} on {{ annotations.summary }}"),
        )
        .expect("valid templates");
        let message = Outgoing {
            id: 1,
            chat: 1,
            kind: Kind::Resolved,
            alerts: vec![AlertView {
                key: String::new(),
                labels: [("instance".to_string(), "<b>x</b>".to_string())].into(),
                annotations: [("summary".to_string(), "a & b".to_string())].into(),
                starts_at: 0,
                generator_url: String::new(),
            }],
            queued_at: 0,
        };
        assert_eq!(
            t.render(&message, &HashMap::new()),
            "RESOLVED\n\n&lt;b&gt;x&lt;/b&gt; on a &amp; b"
        );
        let e = Templates::new(None, Some("{% if %}"))
            .err()
            .expect("refused");
        assert!(e.starts_with("relay.templates.alert:"), "{e}");
    }
}
