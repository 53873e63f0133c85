//! Anomaly history survives a PostgreSQL restart: episodes recorded while the real server is
//! down wait in the recorder's buffer and are all in the table once it is back. Alone in its
//! test binary because it stops the machine's PostgreSQL server.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::TestDb;
use mad::history::{EpisodeTracker, Recorder};
use mad::score::Score;
use mad::source::Labels;

/// Starts the server again however the test ends.
struct RestartOnDrop;

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        pg_cluster("start");
    }
}

fn pg_cluster(action: &str) {
    let versions = std::fs::read_dir("/etc/postgresql").expect("a Debian PostgreSQL cluster");
    for version in versions.flatten() {
        let status = std::process::Command::new("pg_ctlcluster")
            .args([
                "--skip-systemctl-redirect",
                &version.file_name().to_string_lossy(),
                "main",
                action,
            ])
            .args(if action == "stop" {
                &["-m", "fast"][..]
            } else {
                &[][..]
            })
            .status()
            .expect("pg_ctlcluster runs");
        assert!(
            status.success() || action == "start",
            "pg_ctlcluster {action} failed"
        );
    }
}

fn labels(instance: &str) -> Labels {
    [("instance".to_string(), instance.to_string())].into()
}

fn scores(points: &[(i64, f64)]) -> Vec<Score> {
    points
        .iter()
        .map(|&(ts, score)| Score {
            ts,
            y: 1.0,
            yhat: 1.0,
            lower: 0.0,
            upper: 2.0,
            score,
        })
        .collect()
}

async fn wait_for(what: &str, timeout: Duration, check: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn episodes_recorded_while_the_database_is_down_are_written_when_it_returns() {
    let db = TestDb::new().await;
    let store = db.store().await;
    store.migrate().await.expect("migrate");
    let recorder = Recorder::start(Arc::new(db.store().await));
    let mut tracker = EpisodeTracker::new("cpu", 0, 60);
    let record = |tracker: &mut EpisodeTracker, instance: &str, points: &[(i64, f64)]| {
        for episode in tracker.observe(&labels(instance), &scores(points)) {
            assert!(
                recorder.record(episode),
                "the recorder never refuses within its buffer"
            );
        }
    };

    // Before the outage: one episode, opened and closed.
    record(
        &mut tracker,
        "a",
        &[(1_000, 2.0), (1_060, 4.0), (1_120, 0.5), (1_180, 0.1)],
    );
    wait_for(
        "the first episode to be written",
        Duration::from_secs(10),
        || recorder.written() == 2,
    )
    .await;

    let _guard = RestartOnDrop;
    pg_cluster("stop");
    // During the outage: one closed episode and one still open.
    record(
        &mut tracker,
        "b",
        &[(2_000, 1.5), (2_060, 7.0), (2_120, 0.2), (2_180, 0.2)],
    );
    record(&mut tracker, "c", &[(2_100, 3.0), (2_160, 2.5)]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        recorder.pending(),
        3,
        "writes wait while the database is down"
    );
    assert_eq!(recorder.written(), 2);

    pg_cluster("start");
    wait_for(
        "the buffered episodes to be written",
        Duration::from_secs(60),
        || recorder.pending() == 0,
    )
    .await;
    assert_eq!(recorder.written(), 5);
    assert_eq!(recorder.dropped(), 0);

    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect after restart");
    tokio::spawn(connection);
    let rows = client
        .query(
            "SELECT labels->>'instance', peak_score, extract(epoch from started_at)::bigint, \
             extract(epoch from ended_at)::bigint FROM anomaly_episodes ORDER BY started_at",
            &[],
        )
        .await
        .expect("query episodes");
    let episodes: Vec<(String, f64, i64, Option<i64>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        episodes,
        vec![
            ("a".to_string(), 4.0, 1_000, Some(1_060)),
            ("b".to_string(), 7.0, 2_000, Some(2_060)),
            ("c".to_string(), 3.0, 2_100, None),
        ]
    );
    db.drop().await;
}
