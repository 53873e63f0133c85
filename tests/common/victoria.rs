//! A real VictoriaMetrics scraping the exporter under test, as Prometheus does in production.

use std::path::Path;
use std::time::Duration;

use mad::demo::{scrape_config, VictoriaMetrics};

/// VictoriaMetrics in `dir/vm` scraping the exporter on `port` each second, for e2e tests to read.
pub async fn scraping(dir: &Path, port: u16) -> VictoriaMetrics {
    let scrape = dir.join("scrape.yaml");
    std::fs::write(
        &scrape,
        scrape_config(&format!("127.0.0.1:{port}"), Duration::from_secs(1)),
    )
    .expect("write scrape config");
    VictoriaMetrics::start(&dir.join("vm"), Some(&scrape))
        .await
        .expect("start victoria-metrics")
}
