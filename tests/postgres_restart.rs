//! The machine's PostgreSQL server stopped and started again under MAD, against the real server,
//! VictoriaMetrics and ONNX Runtime:
//!
//! - while the exporter records anomaly episodes: those recorded while it is down wait in the
//!   recorder's buffer and are all in the table once it is back;
//! - in the middle of `mad train` with the PostgreSQL model store: training fails with an error
//!   naming the store (never the password) or stores a whole version, never half of one; the
//!   next run after the restart stores a version that becomes active;
//! - while `mad serve` scores from models in PostgreSQL (`MAD_PG_OUTAGE_SECS`, default 10 s):
//!   /metrics keeps answering with fresh scores from the model in memory, the failure shows in
//!   `mad_errors_total{kind="store"}`, and once it is back a newly trained version is served.
//!
//! Every test here stops the shared server, so they take turns ([`SERIAL`]) and nothing else
//! that stops it lives in another test binary.

mod common;

use common::exporter::{eventually, has_scores, last_success, metrics, sample, served_version};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::feeder::{requests, requests_detector, with_history, Feeder};
use common::pg::TestDb;
use mad::config::Config;
use mad::demo::{free_port, VictoriaMetrics};
use mad::history::{EpisodeTracker, Recorder};
use mad::score::Score;
use mad::source::unix_now as now;
use mad::source::Labels;
use mad::store::ModelStore;

/// Held by each test for its whole run: they stop the one server the others use.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const DETECTOR: &str = "pgrestart";
const HISTORY_SECS: i64 = 3600;
/// In the DSN to show it never reaches a message (tests/secrets.txt; the server trusts
/// loopback, so any password connects).
const PASSWORD: &str = "s3cretpassw0rd";

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
    let _serial = SERIAL.lock().await;
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

/// `pg_ctlcluster` off the async threads (it waits for the server), then waits until it takes
/// connections again after a start.
async fn pg(action: &'static str) {
    tokio::task::spawn_blocking(move || pg_cluster(action))
        .await
        .expect("pg_ctlcluster task");
    if action == "start" {
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio_postgres::connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=postgres",
            tokio_postgres::NoTls,
        )
        .await
        .is_err()
        {
            assert!(Instant::now() < deadline, "PostgreSQL did not come back");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A VictoriaMetrics with an hour of history up to the returned time, and the store's DSN
/// with a password in it.
async fn history(dir: &Path, db: &TestDb) -> (VictoriaMetrics, i64, String) {
    let (vm, _, start) =
        with_history(dir, HISTORY_SECS, |origin| requests(&["a", "b"], 7, origin)).await;
    let dsn = db
        .url
        .replacen("postgres@", &format!("postgres:{PASSWORD}@"), 1);
    (vm, start, dsn)
}

/// `epochs` without early stopping: 300 take about 2 s here.
fn config(vm_url: &str, dsn: &str, port: u16, epochs: usize) -> Config {
    let text = format!(
        r#"
datasource: {{ url: "{vm_url}", timeout: 2s, retries: 0 }}
store: {{ postgres: "{dsn}" }}
server: {{ listen: "127.0.0.1:{port}", reload_interval: 1s }}
training: {{ max_epochs: {epochs}, patience: {epochs}, hidden: 8 }}
{detectors}"#,
        detectors = requests_detector(DETECTOR, 16, "1h", "10m")
    );
    Config::parse(&text, Path::new("pg-restart.yaml")).expect("test config is valid")
}

/// The range queries VictoriaMetrics has answered: training has its data once this grows.
async fn range_queries(vm: &VictoriaMetrics) -> f64 {
    let body = reqwest::get(format!("{}/metrics", vm.url))
        .await
        .expect("VictoriaMetrics' own metrics")
        .text()
        .await
        .expect("metrics body");
    sample(
        &body,
        "vm_http_requests_total{path=\"/api/v1/query_range\"}",
    )
}

/// What a user checks in the registry: every listed version's bytes load as a model of the
/// detector, and exactly one is active. Returns the versions, oldest first, and the active one.
async fn check_versions(db: &TestDb, store: &dyn ModelStore) -> (Vec<String>, String) {
    let listed = store.list(DETECTOR).await.expect("list versions");
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    for v in &listed {
        let row = client
            .query_one(
                "SELECT onnx FROM models WHERE detector = $1 AND version = $2",
                &[&DETECTOR, &v.version],
            )
            .await
            .expect("the listed version's bytes");
        let onnx: Vec<u8> = row.get(0);
        common::assert_loads(&onnx, v, DETECTOR);
    }
    let active: Vec<&str> = listed
        .iter()
        .filter(|v| v.active)
        .map(|v| v.version.as_str())
        .collect();
    assert_eq!(active.len(), 1, "one active version: {active:?}");
    let loaded = store
        .load_active(DETECTOR)
        .await
        .expect("load the active version")
        .expect("an active version");
    assert_eq!(loaded.info.version, active[0]);
    (
        listed.iter().map(|v| v.version.clone()).collect(),
        active[0].to_string(),
    )
}

/// Starts `mad train` in the background, returns once it has fetched its history (all it still
/// needs PostgreSQL for is the write), with the moment it finishes.
async fn train_in_background(
    config: &Config,
    vm: &VictoriaMetrics,
) -> tokio::task::JoinHandle<(anyhow::Result<Vec<mad::train::Trained>>, Instant)> {
    let queries = range_queries(vm).await;
    let config = config.clone();
    let training = tokio::spawn(async move {
        let result = mad::train::run(&config, &[], None).await;
        (result, Instant::now())
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while range_queries(vm).await <= queries {
        assert!(Instant::now() < deadline, "training never queried its data");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    training
}

/// A failed write must say which store failed, and must not give away the password.
fn assert_names_the_store(e: &anyhow::Error, db: &TestDb) {
    let message = format!("{e:#}");
    assert!(
        message.contains(&format!(
            "model registry postgres@127.0.0.1:5432/{}",
            db.name
        )),
        "the error does not name the store: {message}"
    );
    assert!(!message.contains("panicked"), "{message}");
    assert!(
        !format!("{message} {e:?}").contains(PASSWORD),
        "password shown: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_through_a_restart_stores_a_whole_version_or_fails_naming_the_store() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (vm, start, dsn) = history(tmp.path(), &db).await;
    let port = free_port().expect("port");
    let config_with = |epochs| config(&vm.url, &dsn, port, epochs);
    let config = config_with(300);
    let first = mad::train::run(&config, &[], Some(start))
        .await
        .expect("training succeeds")
        .remove(0);
    let store = db.store().await;
    let (versions, active) = check_versions(&db, &store).await;
    assert_eq!(active, first.version.version);
    let _guard = RestartOnDrop;

    // Down from mid-training until it has given up: it cannot write.
    let training = train_in_background(&config, &vm).await;
    pg("stop").await;
    let down = Instant::now();
    let (result, finished) = training.await.expect("training does not panic");
    pg("start").await;
    let (after, now_active) = check_versions(&db, &store).await;
    assert!(
        result.is_err() || finished < down,
        "training succeeded {:?} after PostgreSQL was down",
        finished - down
    );
    match result {
        Err(e) => {
            assert_names_the_store(&e, &db);
            if after == versions {
                assert_eq!(now_active, active, "the previous version stays active");
            } else {
                // Stopped between the write and the pruning after it: stored whole, active.
                assert_eq!(Some(&now_active), after.last(), "{after:?}");
            }
            println!("PostgreSQL down at the write: {e:#}");
        }
        Ok(trained) => {
            // Finished before the server went down: stored whole.
            assert_eq!(now_active, trained[0].version.version);
            println!("training finished before PostgreSQL stopped");
        }
    }

    // Stopped and started again while it trains (a longer run: a start takes 2 s or more):
    // the write reaches the restarted server through a pool whose connections all died.
    let longer = config_with(1200);
    let training = train_in_background(&longer, &vm).await;
    let restart = Instant::now();
    pg("stop").await;
    pg("start").await;
    let back = Instant::now();
    println!(
        "PostgreSQL restarted mid-training in {:.1} s",
        (back - restart).as_secs_f64()
    );
    let (result, finished) = training.await.expect("training does not panic");
    let (_, now_active) = check_versions(&db, &store).await;
    match result {
        Ok(trained) => {
            assert_eq!(now_active, trained[0].version.version);
            if finished > back {
                println!(
                    "PostgreSQL restarted mid-training, back {:.1} s before the write: stored",
                    (finished - back).as_secs_f64()
                );
            }
        }
        Err(e) => {
            assert!(
                finished < back,
                "the write failed {:?} after PostgreSQL was back: {e:#}",
                finished - back
            );
            assert_names_the_store(&e, &db);
        }
    }

    // And a run once it is back is stored and becomes the active version.
    let last = mad::train::run(&config, &[], None)
        .await
        .expect("training succeeds after the restart")
        .remove(0);
    let (_, now_active) = check_versions(&db, &store).await;
    assert_eq!(now_active, last.version.version);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoring_goes_on_through_a_restart_and_the_next_version_is_served_after_it() {
    let outage = Duration::from_secs(
        std::env::var("MAD_PG_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10),
    );
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (vm, start, dsn) = history(tmp.path(), &db).await;
    let port = free_port().expect("port");
    let config = config(&vm.url, &dsn, port, 300);
    let first = mad::train::run(&config, &[], Some(start))
        .await
        .expect("training succeeds")
        .remove(0);
    let _feeder = Feeder::start(
        vm.url.clone(),
        requests(&["a", "b"], 7, start - HISTORY_SECS),
        start + 1,
    );
    let serving = common::serve::start(config.clone());
    eventually(Duration::from_secs(60), "first scores", || async {
        match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
            Ok(r) => has_scores(&r.text().await.unwrap_or_default(), DETECTOR),
            Err(_) => false,
        }
    })
    .await;
    let store_errors = format!("mad_errors_total{{detector=\"{DETECTOR}\",kind=\"store\"}}");
    let body = metrics(port).await;
    assert_eq!(
        served_version(&body, DETECTOR).as_deref(),
        Some(first.version.version.as_str())
    );
    let errors_before = sample(&body, &store_errors);

    let _guard = RestartOnDrop;
    pg("stop").await;
    let stopped = Instant::now();
    let mut checks = 0;
    while stopped.elapsed() < outage {
        let body = metrics(port).await;
        assert!(
            has_scores(&body, DETECTOR),
            "no score {:?} into the outage",
            stopped.elapsed()
        );
        let age = now() as f64 - last_success(&body, DETECTOR);
        assert!(
            age <= 3.0,
            "the newest score is {age} s old {:?} into the outage",
            stopped.elapsed()
        );
        assert_eq!(
            served_version(&body, DETECTOR).as_deref(),
            Some(first.version.version.as_str()),
            "the model in memory keeps serving"
        );
        let ready = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .expect("/readyz answers");
        assert!(ready.status().is_success(), "not ready during the outage");
        checks += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let errors_during = sample(&metrics(port).await, &store_errors) - errors_before;
    assert!(
        errors_during >= 1.0,
        "the outage never showed in {store_errors}"
    );
    pg("start").await;

    // Back: a version trained now is picked up without a restart.
    let next = mad::train::run(&config, &[], None)
        .await
        .expect("training succeeds after the restart")
        .remove(0);
    let trained = Instant::now();
    let version = next.version.version.clone();
    eventually(
        Duration::from_secs(15),
        "the version trained after the restart is served",
        || async {
            let body = metrics(port).await;
            served_version(&body, DETECTOR).as_deref() == Some(version.as_str())
                && has_scores(&body, DETECTOR)
        },
    )
    .await;
    let served = trained.elapsed();
    // Recovered: the store errors stop rising (MadScoringErrors resolves).
    let errors_after = sample(&metrics(port).await, &store_errors);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sample(&metrics(port).await, &store_errors), errors_after);
    println!(
        "outage {outage:?}: fresh scores in all {checks} checks, {errors_during} store errors \
         counted; the next version served {:.1} s after it was stored",
        served.as_secs_f64()
    );
    serving.stop().await;
    db.drop().await;
}
