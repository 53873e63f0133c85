//! A running `mad serve` backed by PostgreSQL records anomaly episodes from live data in a real
//! VictoriaMetrics, and records none inside a maintenance window.

mod common;

use common::feeder::steady;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::TestDb;
use mad::config::Config;
use mad::demo::{free_port, VictoriaMetrics};
use mad::registry::{AnomalyQuery, NewWindow, Registry};
use mad::source::unix_now as now;
use mad::synth::{Incident, IncidentKind, Synth};

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
    let spike = |series| Incident {
        series,
        start: live_start + SPIKE_AT,
        end: live_start + SPIKE_AT + 3,
        kind: IncidentKind::Spike { factor: 2.0 },
        description: "spike".into(),
    };
    // The same spike on both series; "b" is under maintenance at the time.
    let synth = Synth {
        profiles: vec![
            steady("queue_depth", "a", 50.0),
            steady("queue_depth", "b", 80.0),
        ],
        incidents: vec![spike(0), spike(1)],
        seed: 3,
        origin: start - HISTORY_SECS,
    };
    let mut history = String::new();
    for ts in start - HISTORY_SECS..=start {
        synth.exposition_at(ts, &mut history);
    }
    vm.import(history).await.expect("import history");

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

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        mad::serve::run(config, async {
            let _ = stop_rx.await;
        })
        .await
    });
    for ts in live_start..=live_start + LIVE_SECS {
        let wait = ts - now();
        if wait > 0 {
            tokio::time::sleep(Duration::from_secs(wait as u64)).await;
        }
        let mut line = String::new();
        synth.exposition_at(ts, &mut line);
        vm.import(line).await.expect("import live point");
    }

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

    let _ = stop_tx.send(());
    server.await.expect("task").expect("exporter stops cleanly");
    vm.stop().await;
    db.drop().await;
}
