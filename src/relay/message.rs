//! Telegram messages in HTML parse mode: escaped, and within Telegram's length limit.

use std::fmt::Write;

use super::outbox::{Kind, Outgoing};

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

fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

fn since(starts_at: i64) -> String {
    if starts_at <= 0 {
        return String::new();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(starts_at as u64);
    format!(" since {}", humantime::format_rfc3339_seconds(t))
}

/// The message text for `message`.
pub fn render(message: &Outgoing) -> String {
    let (icon, word) = match message.kind {
        Kind::Firing => ("🔴", "FIRING"),
        Kind::Reminder => ("🟠", "STILL FIRING"),
        Kind::Resolved => ("✅", "RESOLVED"),
    };
    let mut out = format!("{icon} <b>{word}</b>");
    if message.alerts.len() > 1 {
        let _ = write!(out, " ({} alerts)", message.alerts.len());
    }
    out.push('\n');
    for (shown, alert) in message.alerts.iter().enumerate() {
        let mut block = String::from("\n");
        let name = alert
            .labels
            .get("alertname")
            .map_or("alert", String::as_str);
        let _ = write!(block, "<b>{}</b>", escape(&cut(name, MAX_VALUE_CHARS)));
        let detector = alert
            .labels
            .get("for")
            .or_else(|| alert.labels.get("detector"));
        if let Some(d) = detector {
            let _ = write!(
                block,
                " · detector <code>{}</code>",
                escape(&cut(d, MAX_VALUE_CHARS))
            );
        }
        if let Some(severity) = alert.labels.get("severity") {
            let _ = write!(block, " · {}", escape(&cut(severity, MAX_VALUE_CHARS)));
        }
        block.push_str(&escape(&since(alert.starts_at)));
        block.push('\n');
        let series: Vec<String> = alert
            .labels
            .iter()
            .filter(|(k, _)| !NOT_SERIES_LABELS.contains(&k.as_str()) && k.as_str() != "for")
            .map(|(k, v)| format!("{k}={}", cut(v, MAX_VALUE_CHARS)))
            .collect();
        if !series.is_empty() {
            let _ = writeln!(block, "<code>{}</code>", escape(&series.join(", ")));
        }
        for key in ["summary", "description"] {
            if let Some(text) = alert.annotations.get(key) {
                let _ = writeln!(block, "{}", escape(&cut(text, MAX_VALUE_CHARS)));
            }
        }
        let link = alert
            .annotations
            .get("dashboard")
            .filter(|l| l.starts_with("http"))
            .or(Some(&alert.generator_url).filter(|l| l.starts_with("http")));
        if let Some(link) = link {
            let _ = writeln!(block, "<a href=\"{}\">open</a>", escape(link));
        }
        let rest = message.alerts.len() - shown;
        // Keep room for the "and N more" line.
        if out.chars().count() + block.chars().count() > MAX_MESSAGE_CHARS - 64 {
            let _ = write!(out, "\n… and {rest} more");
            break;
        }
        out.push_str(&block);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::outbox::AlertView;

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
