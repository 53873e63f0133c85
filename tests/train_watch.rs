//! Two `mad train --watch` processes share one PostgreSQL retraining queue against a real
//! VictoriaMetrics: every request is trained exactly once, and both stop cleanly on SIGTERM.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::pg::TestDb;
use mad::demo::VictoriaMetrics;
use mad::registry::Registry;

const REQUESTS: usize = 4;

fn watcher(config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_mad"))
        .args(["train", "--watch", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mad train --watch")
}

fn terminate(mut child: Child) -> std::process::ExitStatus {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mad train --watch did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_watchers_train_every_queued_request_once() {
    let db = TestDb::new().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let vm = VictoriaMetrics::start(&tmp.path().join("vm"), None)
        .await
        .expect("start victoria-metrics");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut history = String::new();
    for ts in (now - 1800)..=now {
        let v = 20.0 + 5.0 * ((ts % 300) as f64 / 300.0 * std::f64::consts::TAU).sin();
        history.push_str(&format!("jobs_waiting{{queue=\"q\"}} {v} {}\n", ts * 1000));
    }
    vm.import(history).await.expect("import");
    let config = tmp.path().join("mad.yaml");
    std::fs::write(
        &config,
        format!(
            "datasource: {{ url: \"{}\" }}\nstore: {{ postgres: \"{}\" }}\ntraining: {{ max_epochs: 3 }}\n\
             detectors:\n  - {{ name: jobs, query: jobs_waiting, step: 1s, window: 16, train_range: 30m }}\n",
            vm.url, db.url
        ),
    )
    .expect("write config");
    let store = db.store().await;
    store.migrate().await.expect("migrate");
    let registry = Registry::new(Arc::new(store));
    for _ in 0..REQUESTS {
        registry.request_training("jobs").await.expect("enqueue");
    }
    registry
        .request_training("no_such_detector")
        .await
        .expect("enqueue");

    let (a, b) = (watcher(&config), watcher(&config));
    let deadline = Instant::now() + Duration::from_secs(180);
    let requests = loop {
        let all = registry.training_requests(100).await.expect("list");
        if all
            .iter()
            .all(|r| r.status == "done" || r.status == "failed")
        {
            break all;
        }
        assert!(Instant::now() < deadline, "queue not drained: {all:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(terminate(a).success(), "watcher a exits 0 on SIGTERM");
    assert!(terminate(b).success(), "watcher b exits 0 on SIGTERM");

    let done: Vec<_> = requests.iter().filter(|r| r.detector == "jobs").collect();
    assert_eq!(done.len(), REQUESTS);
    assert!(
        done.iter()
            .all(|r| r.status == "done" && r.version.is_some()),
        "{done:?}"
    );
    let mut versions: Vec<_> = done.iter().filter_map(|r| r.version.clone()).collect();
    versions.sort();
    versions.dedup();
    assert_eq!(
        versions.len(),
        REQUESTS,
        "each request produced its own model version"
    );
    let stored = mad::store::ModelStore::list(&db.store().await, "jobs")
        .await
        .expect("models");
    assert_eq!(
        stored.len(),
        REQUESTS,
        "one stored version per request, none twice"
    );
    let unknown = requests
        .iter()
        .find(|r| r.detector == "no_such_detector")
        .expect("request");
    assert_eq!(unknown.status, "failed");
    assert!(
        unknown
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("no detector"),
        "{unknown:?}"
    );
    vm.stop().await;
    db.drop().await;
}
