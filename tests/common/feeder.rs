//! Synthetic data for the tests that run an exporter: history in a real VictoriaMetrics, then
//! live points.

use std::path::Path;
use std::time::Duration;

use mad::demo::VictoriaMetrics;
use mad::source::unix_now as now;
use mad::synth::{Profile, Synth};

/// Writes one point a second of every series of `synth` into VictoriaMetrics' import API
/// (from `from` on), until dropped.
pub struct Feeder(tokio::task::JoinHandle<()>);

impl Feeder {
    pub fn start(url: String, synth: Synth, from: i64) -> Feeder {
        Feeder(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut ts = from;
            loop {
                let mut body = String::new();
                while ts <= now() {
                    synth.exposition_at(ts, &mut body);
                    ts += 1;
                }
                if !body.is_empty() {
                    let _ = http
                        .post(format!("{url}/api/v1/import/prometheus"))
                        .body(body)
                        .send()
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }))
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A series with a five-minute rhythm (±30 %) and 2 % noise, the shape most tests feed.
pub fn steady(metric: &str, instance: &str, base: f64) -> Profile {
    Profile {
        metric: metric.into(),
        labels: [("instance".to_string(), instance.to_string())].into(),
        base,
        daily: 0.0,
        weekend_dip: 0.0,
        fast: 0.3,
        fast_period_secs: 300.0,
        trend_per_week: 0.0,
        noise: 0.02,
    }
}

/// `app_requests_rate` of these instances, all at 100.
pub fn requests(instances: &[&str], seed: u64, origin: i64) -> Synth {
    Synth {
        profiles: instances
            .iter()
            .map(|instance| steady("app_requests_rate", instance, 100.0))
            .collect(),
        incidents: Vec::new(),
        seed,
        origin,
    }
}

/// A VictoriaMetrics in `dir/vm` holding the last `secs` (up to now) of the synth `make`
/// builds for that origin; with the synth and that now.
pub async fn with_history(
    dir: &Path,
    secs: i64,
    make: impl FnOnce(i64) -> Synth,
) -> (VictoriaMetrics, Synth, i64) {
    let vm = VictoriaMetrics::start(&dir.join("vm"), None)
        .await
        .expect("start victoria-metrics");
    let start = now();
    let synth = make(start - secs);
    let mut history = String::new();
    for ts in start - secs..=start {
        synth.exposition_at(ts, &mut history);
    }
    vm.import(history).await.expect("import history");
    (vm, synth, start)
}
