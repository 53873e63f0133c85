//! Synthetic data for the tests that run an exporter: history in a real VictoriaMetrics, then
//! live points.

use std::path::Path;
use std::time::Duration;

use mad::demo::VictoriaMetrics;
use mad::source::unix_now as now;
use mad::synth::{Incident, IncidentKind, Profile, Synth};

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
    rhythmic(metric, &[("instance", instance)], base, 300.0)
}

/// A series of `metric` at `base`, a `period_secs` rhythm (±30 %) and 2 % noise: what tests feed.
pub fn rhythmic(metric: &str, labels: &[(&str, &str)], base: f64, period_secs: f64) -> Profile {
    Profile {
        metric: metric.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        base,
        daily: 0.0,
        weekend_dip: 0.0,
        fast: 0.3,
        fast_period_secs: period_secs,
        trend_per_week: 0.0,
        noise: 0.02,
    }
}

/// Series `series` times `1 + factor` for `secs` s from `start`: the incident e2e tests score.
pub fn spike(series: usize, start: i64, secs: i64, factor: f64) -> Incident {
    Incident {
        series,
        start,
        end: start + secs - 1,
        kind: IncidentKind::Spike { factor },
        description: "spike".into(),
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
    import_history(&vm, &synth, start - secs, start).await;
    (vm, synth, start)
}

/// Imports every second of `synth` from `from` to `until` at once: the history a test trains on.
pub async fn import_history(vm: &VictoriaMetrics, synth: &Synth, from: i64, until: i64) {
    let mut history = String::new();
    for ts in from..=until {
        synth.exposition_at(ts, &mut history);
    }
    vm.import(history).await.expect("import history");
}

/// Waits for second `ts`, then imports `synth`'s points of it: live data, arriving in real time.
pub async fn import_at(vm: &VictoriaMetrics, synth: &Synth, ts: i64) {
    let wait = ts - now();
    if wait > 0 {
        tokio::time::sleep(Duration::from_secs(wait as u64)).await;
    }
    let mut line = String::new();
    synth.exposition_at(ts, &mut line);
    vm.import(line).await.expect("import live point");
}

/// [`import_at`] for every second from `from` to `until`, one after the other.
pub async fn import_live(vm: &VictoriaMetrics, synth: &Synth, from: i64, until: i64) {
    for ts in from..=until {
        import_at(vm, synth, ts).await;
    }
}

/// The `detectors:` block scoring the fed `app_requests_rate` (a point a second) as `name`.
pub fn requests_detector(name: &str, window: usize, train_range: &str, staleness: &str) -> String {
    format!(
        "detectors:
  - name: {name}
    query: app_requests_rate
    step: 1s
    window: {window}
    train_range: {train_range}
    interval: 1s
    staleness: {staleness}
"
    )
}
