//! A running `mad serve` backed by PostgreSQL records anomaly episodes from live data in a real
//! VictoriaMetrics, and records none inside a maintenance window.

mod common;

use common::feeder::{import_history, import_live, spike, steady};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::TestDb;
use mad::config::Config;
use mad::demo::{free_port, VictoriaMetrics};
use mad::registry::{AnomalyQuery, NewWindow, Registry};
use mad::source::unix_now as now;
use mad::synth::Synth;

const HISTORY_SECS: i64 = 3600;
const LIVE_SECS: i64 = 30;
const SPIKE_AT: i64 = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn episodes_are_recorded_outside_maintenance_windows_only() {
    let db = TestDb::new().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let vm = VictoriaMetrics::start(&tmp.path().join("vm"), None)
        .await
        .expect("start victoria-metrics");
    let start = now();
    let live_start = start + 1;
    let spike_on = |series| spike(series, live_start + SPIKE_AT, 4, 2.0);
    // The same spike on both series; "b" is under maintenance at the time.
    let synth = Synth {
        profiles: vec![
            steady("queue_depth", "a", 50.0),
            steady("queue_depth", "b", 80.0),
        ],
        incidents: vec![spike_on(0), spike_on(1)],
        seed: 3,
        origin: start - HISTORY_SECS,
    };
    import_history(&vm, &synth, start - HISTORY_SECS, start).await;

    let port = free_port().expect("port");
    let text = format!(
        r#"
datasource: {{ url: "{}", timeout: 2s, retries: 1 }}
store: {{ postgres: "{}" }}
server: {{ listen: "127.0.0.1:{port}", reload_interval: 1s }}
training: {{ max_epochs: 15 }}
detectors:
  - name: queues
    query: queue_depth
    step: 1s
    window: 16
    train_range: 1h
    interval: 1s
    episode: {{ for: 0s, quiet: 3s }}
"#,
        vm.url, db.url
    );
    let config = Config::parse(&text, Path::new("episodes.yaml")).expect("config");
    mad::train::run(&config, &[], Some(start))
        .await
        .expect("train");
    let registry = Registry::new(Arc::new(db.store().await));
    registry
        .create_window(&NewWindow {
            // The whole live period: with `for: 0s` any stray point above 1 would open an
            // episode, so the window must cover every point of "b" that could be scored.
            starts_at: start - 60,
            ends_at: live_start + LIVE_SECS + 60,
            detector: Some("queues".into()),
            matchers: [("instance".to_string(), "b".to_string())].into(),
            reason: "planned failover of b".into(),
        })
        .await
        .expect("maintenance window");

    let serving = common::serve::start(config);
    import_live(&vm, &synth, live_start, live_start + LIVE_SECS).await;

    // The episode of "a" closes 3 s after its spike; give the writer a moment.
    let query = AnomalyQuery {
        detector: Some("queues".into()),
        limit: 100,
        ..AnomalyQuery::default()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let episodes = loop {
        let found = registry.anomalies(&query).await.expect("query anomalies");
        if found.iter().any(|e| e.ended_at.is_some()) || Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let spiked: Vec<_> = episodes
        .iter()
        .filter(|e| e.labels["instance"] == "a")
        .filter(|e| {
            e.started_at >= live_start + SPIKE_AT && e.started_at <= live_start + SPIKE_AT + 3
        })
        .collect();
    assert_eq!(
        spiked.len(),
        1,
        "one episode for the spike on a: {episodes:?}"
    );
    assert!(
        spiked[0].peak_score > 1.0 && spiked[0].ended_at.is_some(),
        "{episodes:?}"
    );
    assert!(
        !episodes.iter().any(|e| e.labels["instance"] == "b"),
        "nothing recorded inside the maintenance window: {episodes:?}"
    );

    serving.stop().await;
    vm.stop().await;
    db.drop().await;
}
