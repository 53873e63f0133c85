//! Reading a running exporter's `/metrics` as a user (or a scraper) does.

use std::future::Future;
use std::time::{Duration, Instant};

/// `/metrics`, or nothing while the exporter is not (yet) answering 200.
pub async fn try_metrics(port: u16) -> Option<String> {
    let response = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.text().await.ok()
}

/// `/metrics`; panics if the exporter does not answer 200.
pub async fn metrics(port: u16) -> String {
    let response = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap_or_else(|e| panic!("the exporter must keep answering: {e}"));
    assert_eq!(response.status().as_u16(), 200);
    response.text().await.expect("metrics body")
}

/// The sum of the samples whose name and labels start with `series` (0 when absent).
pub fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How many series of `detector` have an `anomaly_score`.
pub fn score_count(body: &str, detector: &str) -> usize {
    let detector = format!("for=\"{detector}\"");
    body.lines()
        .filter(|l| l.starts_with("anomaly_score{") && l.contains(&detector))
        .count()
}

pub fn has_scores(body: &str, detector: &str) -> bool {
    score_count(body, detector) > 0
}

pub fn last_success(body: &str, detector: &str) -> f64 {
    sample(
        body,
        &format!("mad_last_successful_cycle_timestamp_seconds{{detector=\"{detector}\"}}"),
    )
}

/// The model version `mad_model_info` says is in service.
pub fn served_version(body: &str, detector: &str) -> Option<String> {
    let line = body
        .lines()
        .find(|l| l.starts_with(&format!("mad_model_info{{detector=\"{detector}\"")))?;
    let start = line.find("version=\"")? + "version=\"".len();
    let end = start + line[start..].find('"')?;
    Some(line[start..end].to_string())
}

/// When the exporter on `port` first serves `version` of `detector` (polled every 50 ms).
pub async fn wait_served(port: u16, detector: &str, version: &str, timeout: Duration) -> Instant {
    let wanted = format!("mad_model_info{{detector=\"{detector}\",version=\"{version}\"}} 1");
    let deadline = Instant::now() + timeout;
    loop {
        if try_metrics(port)
            .await
            .is_some_and(|body| body.contains(&wanted))
        {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "exporter never served {version}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `check` until it holds; panics naming `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
