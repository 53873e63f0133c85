//! Reading a chart's data: the five series of the scored series an alert is about, by
//! `query_range` from VictoriaMetrics or Prometheus, merged by timestamp.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{ChartData, ChartPoint};
use crate::rules::promql_string;
use crate::text::ellipsize;

/// Alert labels that are not labels of MAD's series: vmalert's and the alert rule's own.
/// Extra labels a detector's `alert.labels` adds are not known here: remove them from the
/// labels given to [`fetch`] (or [`selector`]), or the series will not be found.
pub const NON_SERIES_LABELS: [&str; 5] = [
    "alertname",
    "alertgroup",
    "severity",
    "detector",
    "__name__",
];

/// The label carrying the detector's name on MAD's series.
const DETECTOR_LABEL: &str = "for";

const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The alert's labels that MAD's series carry: `for` and the input series' labels.
fn series_labels(labels: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    labels
        .iter()
        .filter(|(k, _)| !NON_SERIES_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The PromQL selector of `metric` for the series an alert is about: `metric{for="…",…}` with
/// the alert's labels less [`NON_SERIES_LABELS`], values escaped as PromQL strings. An error
/// when the alert is not about one of MAD's series (no `for` label) or a name is not a label
/// name.
pub fn selector(metric: &str, labels: &BTreeMap<String, String>) -> Result<String, String> {
    let labels = series_labels(labels);
    if !labels.contains_key(DETECTOR_LABEL) {
        return Err(format!(
            "the alert has no `{DETECTOR_LABEL}` label: not about one of MAD's series"
        ));
    }
    let mut out = String::from(metric);
    out.push('{');
    for (i, (name, value)) in labels.iter().enumerate() {
        if !valid_label_name(name) {
            return Err(format!("{name:?} is not a label name"));
        }
        if i > 0 {
            out.push(',');
        }
        out.push_str(name);
        out.push('=');
        out.push_str(&promql_string(value));
    }
    out.push('}');
    Ok(out)
}

/// `<detector> · name="value", …` for the chart's title.
fn title(labels: &BTreeMap<String, String>) -> String {
    let labels = series_labels(labels);
    let detector = labels.get(DETECTOR_LABEL).copied().unwrap_or("?");
    let series: Vec<String> = labels
        .iter()
        .filter(|(k, _)| **k != DETECTOR_LABEL)
        .map(|(k, v)| format!("{k}=\"{v}\""))
        .collect();
    if series.is_empty() {
        detector.to_string()
    } else {
        format!("{detector} · {}", series.join(", "))
    }
}

#[derive(Deserialize)]
struct RangeResponse {
    status: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    data: Option<RangeData>,
}

#[derive(Deserialize)]
struct RangeData {
    result: Vec<RangeSeries>,
}

#[derive(Deserialize)]
struct RangeSeries {
    #[serde(default)]
    values: Vec<(f64, String)>,
}

/// The points of a `query_range` answer that names at most one series. Public for the fuzz
/// targets only.
#[doc(hidden)]
pub fn parse_range(body: &[u8], query: &str) -> Result<Vec<(i64, f64)>, String> {
    let r: RangeResponse =
        serde_json::from_slice(body).map_err(|e| format!("{query}: unexpected answer: {e}"))?;
    if r.status != "success" {
        return Err(format!(
            "{query}: {}",
            r.error.unwrap_or_else(|| format!("status {}", r.status))
        ));
    }
    let result = r.data.map(|d| d.result).unwrap_or_default();
    match result.len() {
        0 => Ok(Vec::new()),
        1 => Ok(result
            .into_iter()
            .flat_map(|s| s.values)
            .filter_map(|(ts, v)| {
                let v: f64 = v.parse().ok()?;
                (v.is_finite() && ts.is_finite()).then_some((ts as i64, v))
            })
            .collect()),
        n => Err(format!("{query}: {n} series match, expected one")),
    }
}

async fn query_range(
    http: &reqwest::Client,
    vm_url: &str,
    query: &str,
    from: i64,
    to: i64,
    step: i64,
) -> Result<Vec<(i64, f64)>, String> {
    let url = format!("{}/api/v1/query_range", vm_url.trim_end_matches('/'));
    let response = http
        .get(&url)
        .query(&[
            ("query", query.to_string()),
            ("start", from.to_string()),
            ("end", to.to_string()),
            ("step", format!("{step}s")),
        ])
        .timeout(QUERY_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("{query}: {}", e.without_url()))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("{query}: {}", e.without_url()))?;
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body);
        return Err(format!(
            "{query}: HTTP {status}: {}",
            ellipsize(text.trim(), 300)
        ));
    }
    parse_range(&body, query)
}

/// The most recent run of points with a score above 1, as (first, last) timestamp.
fn latest_anomaly(points: &[ChartPoint]) -> Option<(i64, i64)> {
    let last = points
        .iter()
        .rposition(|p| p.score.is_some_and(|s| s > 1.0))?;
    let first = points[..=last]
        .iter()
        .rposition(|p| !p.score.is_some_and(|s| s > 1.0))
        .map_or(0, |i| i + 1);
    Some((points[first].ts, points[last].ts))
}

/// Reads the five series of the alert's scored series between `from` and `to` (Unix seconds,
/// every `step` seconds) from `vm_url` (VictoriaMetrics or Prometheus) and merges them by
/// timestamp. The anomaly window is the latest run of scores above 1 (empty, at `to`, when
/// there is none): set it from the alert (`starts_at` to now) when that is known.
pub async fn fetch(
    http: &reqwest::Client,
    vm_url: &str,
    labels: &BTreeMap<String, String>,
    from: i64,
    to: i64,
    step: i64,
) -> Result<ChartData, String> {
    if step <= 0 || from >= to {
        return Err(format!(
            "bad chart range: from {from} to {to} every {step}s"
        ));
    }
    let queries: Vec<String> = ["y", "yhat", "yhat_lower", "yhat_upper", "anomaly_score"]
        .iter()
        .map(|metric| selector(metric, labels))
        .collect::<Result<_, _>>()?;
    let q = |i: usize| query_range(http, vm_url, &queries[i], from, to, step);
    let (y, yhat, lower, upper, score) = tokio::try_join!(q(0), q(1), q(2), q(3), q(4))?;
    let mut merged: BTreeMap<i64, ChartPoint> = BTreeMap::new();
    type Field = fn(&mut ChartPoint) -> &mut Option<f64>;
    let columns: [(Vec<(i64, f64)>, Field); 5] = [
        (y, |p| &mut p.y),
        (yhat, |p| &mut p.yhat),
        (lower, |p| &mut p.lower),
        (upper, |p| &mut p.upper),
        (score, |p| &mut p.score),
    ];
    for (samples, field) in columns {
        for (ts, v) in samples {
            let point = merged.entry(ts).or_insert(ChartPoint {
                ts,
                ..ChartPoint::default()
            });
            *field(point) = Some(v);
        }
    }
    if merged.is_empty() {
        return Err(format!("no data for {} in the chart's range", queries[0]));
    }
    let points: Vec<ChartPoint> = merged.into_values().collect();
    let (anomaly_from, anomaly_to) = latest_anomaly(&points).unwrap_or((to, to));
    Ok(ChartData {
        title: title(labels),
        points,
        anomaly_from,
        anomaly_to,
        labelled: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_keep_series_labels_and_escape_values() {
        let alert = labels(&[
            ("alertname", "MadAnomaly"),
            ("alertgroup", "mad-cpu"),
            ("severity", "warning"),
            ("detector", "cpu"),
            ("for", "cpu"),
            ("instance", "a\"} or vector(1) or up{x=\"\\"),
            ("job", "line\nbreak\\"),
        ]);
        assert_eq!(
            selector("yhat", &alert).unwrap(),
            r#"yhat{for="cpu",instance="a\"} or vector(1) or up{x=\"\\",job="line\nbreak\\"}"#
        );
        assert_eq!(
            title(&alert),
            "cpu · instance=\"a\"} or vector(1) or up{x=\"\\\", job=\"line\nbreak\\\""
        );
        // Not one of MAD's series, or not a label name: no query.
        assert!(selector("y", &labels(&[("alertname", "MadExporterDown")])).is_err());
        assert!(selector("y", &labels(&[("for", "cpu"), ("a b", "x")])).is_err());
        assert!(selector("y", &labels(&[("for", "cpu"), ("x}", "x")])).is_err());
        assert_eq!(
            selector("y", &labels(&[("for", "cpu")])).unwrap(),
            r#"y{for="cpu"}"#
        );
    }

    #[test]
    fn query_range_answers_are_read() {
        let body = br#"{"status":"success","data":{"resultType":"matrix","result":[
            {"metric":{"for":"cpu"},"values":[[1700000000,"1.5"],[1700000060.0,"NaN"],
            [1700000120,"+Inf"],[1700000180,"2"]]}]}}"#;
        assert_eq!(
            parse_range(body, "q").unwrap(),
            vec![(1_700_000_000, 1.5), (1_700_000_180, 2.0)]
        );
        let empty = br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(parse_range(empty, "q").unwrap().is_empty());
        let two = br#"{"status":"success","data":{"result":[{"values":[]},{"values":[]}]}}"#;
        assert!(parse_range(two, "q").unwrap_err().contains("2 series"));
        let failed = br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        assert!(parse_range(failed, "q")
            .unwrap_err()
            .contains("parse error"));
        assert!(parse_range(b"<html>", "q").is_err());
    }

    #[test]
    fn the_latest_anomaly_run_is_found() {
        let points: Vec<ChartPoint> = [0.5, 2.0, 0.2, 1.5, 3.0, 0.1, 0.3]
            .iter()
            .enumerate()
            .map(|(i, s)| ChartPoint {
                ts: i as i64 * 60,
                score: Some(*s),
                ..ChartPoint::default()
            })
            .collect();
        assert_eq!(latest_anomaly(&points), Some((180, 240)));
        assert_eq!(latest_anomaly(&points[..1]), None);
        assert_eq!(latest_anomaly(&points[1..2]), Some((60, 60)));
    }

    /// A one-shot HTTP server answering every `query_range` with one series named by the query.
    #[tokio::test]
    async fn fetch_queries_each_series_and_merges_them() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..5 {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = socket.read(&mut buf).await.unwrap();
                    assert!(n > 0);
                    request.extend_from_slice(&buf[..n]);
                }
                let line = String::from_utf8_lossy(&request)
                    .lines()
                    .next()
                    .unwrap()
                    .to_string();
                let target = line.split(' ').nth(1).unwrap().to_string();
                let query = url::Url::parse(&format!("http://x{target}")).unwrap();
                let params: BTreeMap<String, String> = query.query_pairs().into_owned().collect();
                let metric = params["query"].split('{').next().unwrap().to_string();
                let value = match metric.as_str() {
                    "y" => 10.0,
                    "yhat" => 9.0,
                    "yhat_lower" => 8.0,
                    "yhat_upper" => 11.0,
                    _ => 2.0,
                };
                // `y` lacks the last point: merged by timestamp all the same.
                let values = if metric == "y" {
                    format!(r#"[[1000,"{value}"],[1060,"{value}"]]"#)
                } else {
                    format!(r#"[[1000,"{value}"],[1060,"{value}"],[1120,"{value}"]]"#)
                };
                let body = format!(
                    r#"{{"status":"success","data":{{"resultType":"matrix","result":[{{"metric":{{}},"values":{values}}}]}}}}"#
                );
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(response.as_bytes()).await.unwrap();
                seen.push(params);
            }
            seen
        });
        let alert = labels(&[
            ("alertname", "MadAnomaly"),
            ("for", "cpu"),
            ("instance", "a\"b"),
        ]);
        let http = reqwest::Client::new();
        let data = fetch(&http, &url, &alert, 1000, 1120, 60).await.unwrap();
        let seen = server.await.unwrap();
        let mut queries: Vec<&str> = seen.iter().map(|p| p["query"].as_str()).collect();
        queries.sort_unstable();
        let mut expected = [
            r#"anomaly_score{for="cpu",instance="a\"b"}"#,
            r#"y{for="cpu",instance="a\"b"}"#,
            r#"yhat{for="cpu",instance="a\"b"}"#,
            r#"yhat_lower{for="cpu",instance="a\"b"}"#,
            r#"yhat_upper{for="cpu",instance="a\"b"}"#,
        ];
        expected.sort_unstable();
        assert_eq!(queries, expected);
        assert!(seen
            .iter()
            .all(|p| p["start"] == "1000" && p["end"] == "1120" && p["step"] == "60s"));
        assert_eq!(data.title, r#"cpu · instance="a"b""#);
        assert_eq!(data.points.len(), 3);
        assert_eq!(
            data.points[2],
            ChartPoint {
                ts: 1120,
                y: None,
                yhat: Some(9.0),
                lower: Some(8.0),
                upper: Some(11.0),
                score: Some(2.0),
            }
        );
        assert_eq!((data.anomaly_from, data.anomaly_to), (1000, 1120));
        assert!(fetch(&http, &url, &alert, 1000, 1000, 60).await.is_err());
    }
}
