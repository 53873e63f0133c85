//! Horizontal sharding with real processes (fixed shards, then members meeting in PostgreSQL): N `mad serve` replicas (told their place by
//! `MAD_SHARDS`/`MAD_SHARD`, as a StatefulSet's pods are) against one real VictoriaMetrics. Together
//! they score every series exactly once; after N grows from 2 to 3, again exactly once, and the
//! series that moved all moved to the new replica (nothing reshuffled between the old ones).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::pg::TestDb;
use mad::config::Config;
use mad::demo::{free_port, VictoriaMetrics};
use mad::source::unix_now as now;
use mad::synth::{Profile, Synth};

const SERIES: usize = 12;
const HISTORY_SECS: i64 = 3600;
/// Points imported ahead of now, so the replicas keep finding fresh data without a feeder.
const AHEAD_SECS: i64 = 300;

fn config_text(vm_url: &str, models: &Path, port: u16) -> String {
    config_with_store(
        vm_url,
        &format!("{{ path: \"{}\" }}", models.display()),
        port,
    )
}

fn config_with_store(vm_url: &str, store: &str, port: u16) -> String {
    format!(
        r#"
datasource: {{ url: "{vm_url}", timeout: 2s, retries: 1 }}
store: {store}
server: {{ listen: "127.0.0.1:{port}", reload_interval: 1s }}
training: {{ max_epochs: 5, seed: 1 }}
detectors:
  - name: shards
    query: shard_test_requests
    step: 1s
    window: 16
    train_range: 1h
    interval: 1s
"#
    )
}

struct Replica {
    child: Child,
    port: u16,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, vm_url: &str, index: usize, shards: usize) -> Replica {
    let port = free_port().expect("port");
    let config = config_text(vm_url, &dir.join("models"), port);
    spawn(dir, &config, port, &shards.to_string(), index)
}

fn spawn(dir: &Path, config: &str, port: u16, shards: &str, index: usize) -> Replica {
    let file = dir.join(format!("replica-{shards}-{index}.yaml"));
    std::fs::write(&file, config).expect("config");
    let child = Command::new(env!("CARGO_BIN_EXE_mad"))
        .args(["serve", "--config"])
        .arg(&file)
        .env("MAD_SHARDS", shards)
        .env("MAD_POD_NAME", format!("mad-exporter-{index}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mad serve");
    Replica { child, port }
}

async fn metrics(port: u16) -> Option<String> {
    let r = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?;
    r.text().await.ok()
}

/// The instances a replica exposes scores for.
fn scored_instances(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| l.starts_with("anomaly_score{"))
        .filter_map(|l| {
            let rest = &l[l.find("instance=\"")? + "instance=\"".len()..];
            Some(rest[..rest.find('"')?].to_string())
        })
        .collect()
}

/// Waits until the replicas together expose every series, then returns who scores what.
async fn owners(replicas: &[Replica]) -> BTreeMap<String, Vec<usize>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut owners: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (index, r) in replicas.iter().enumerate() {
            for instance in scored_instances(&metrics(r.port).await.unwrap_or_default()) {
                owners.entry(instance).or_default().push(index);
            }
        }
        if owners.len() == SERIES || Instant::now() > deadline {
            return owners;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Imports the series (history and a few minutes ahead) into a fresh VictoriaMetrics.
async fn victoria(dir: &Path) -> (VictoriaMetrics, i64) {
    let vm = VictoriaMetrics::start(&dir.join("vm"), None)
        .await
        .expect("start victoria-metrics");
    let start_ts = now();
    let synth = Synth {
        profiles: (0..SERIES)
            .map(|i| Profile {
                metric: "shard_test_requests".into(),
                labels: [("instance".to_string(), format!("n{i}"))].into(),
                base: 50.0 + i as f64,
                daily: 0.0,
                weekend_dip: 0.0,
                fast: 0.2,
                fast_period_secs: 300.0 + 20.0 * i as f64,
                trend_per_week: 0.0,
                noise: 0.02,
            })
            .collect(),
        incidents: Vec::new(),
        seed: 9,
        origin: start_ts - HISTORY_SECS,
    };
    let mut data = String::new();
    for ts in start_ts - HISTORY_SECS..=start_ts + AHEAD_SECS {
        synth.exposition_at(ts, &mut data);
    }
    vm.import(data).await.expect("import");
    vm.flush().await.expect("flush");
    (vm, start_ts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_cover_every_series_once_before_and_after_resharding() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (vm, start_ts) = victoria(tmp.path()).await;
    let config = Config::parse(
        &config_text(&vm.url, &tmp.path().join("models"), 0),
        Path::new("shards.yaml"),
    )
    .expect("config");
    mad::train::run(&config, &[], Some(start_ts))
        .await
        .expect("training succeeds");

    let two: Vec<Replica> = (0..2).map(|i| start(tmp.path(), &vm.url, i, 2)).collect();
    let before = owners(&two).await;
    drop(two);
    assert_eq!(
        before.len(),
        SERIES,
        "two replicas left series unscored: {before:?}"
    );
    assert!(
        before.values().all(|o| o.len() == 1),
        "a series scored twice: {before:?}"
    );
    let per_replica: Vec<usize> = (0..2)
        .map(|i| before.values().filter(|o| o[0] == i).count())
        .collect();
    assert!(
        per_replica.iter().all(|n| *n > 0),
        "one replica idle: {per_replica:?}"
    );

    let three: Vec<Replica> = (0..3).map(|i| start(tmp.path(), &vm.url, i, 3)).collect();
    let after = owners(&three).await;
    drop(three);
    assert_eq!(
        after.len(),
        SERIES,
        "three replicas left series unscored: {after:?}"
    );
    assert!(
        after.values().all(|o| o.len() == 1),
        "a series scored twice: {after:?}"
    );
    let moved: Vec<(&String, usize, usize)> = after
        .iter()
        .filter_map(|(s, o)| {
            let old = before[s][0];
            (old != o[0]).then_some((s, old, o[0]))
        })
        .collect();
    assert!(!moved.is_empty(), "the new replica got nothing");
    assert!(
        moved.iter().all(|(_, _, new)| *new == 2),
        "series moved between the old replicas: {moved:?}"
    );
}

/// The instances each replica scores, sampled every 200 ms until every series has exactly one
/// owner and every replica has some; returns the owners then and for how long some series had
/// two.
async fn settle(
    replicas: &[&Replica],
    timeout: Duration,
) -> (BTreeMap<String, Vec<usize>>, Duration) {
    let started = Instant::now();
    let mut doubled = Duration::ZERO;
    let mut last = Instant::now();
    loop {
        let mut owners: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (index, r) in replicas.iter().enumerate() {
            for instance in scored_instances(&metrics(r.port).await.unwrap_or_default()) {
                owners.entry(instance).or_default().push(index);
            }
        }
        let now = Instant::now();
        if owners.values().any(|o| o.len() > 1) {
            doubled += now - last;
        }
        last = now;
        // Settled: every series has one owner, and every replica owns some (so a newcomer
        // has joined).
        let settled = owners.len() == SERIES
            && owners.values().all(|o| o.len() == 1)
            && (0..replicas.len()).all(|i| owners.values().any(|o| o[0] == i));
        if settled || started.elapsed() > timeout {
            return (owners, doubled);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Members (`MAD_SHARDS=members`) meeting in PostgreSQL: a third exporter joins without any
/// restart and takes only the series it wins; one leaves and the others take its series; a
/// series is never on two replicas' /metrics for longer than a couple of cycles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_share_the_series_and_rebalance_without_restarts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = TestDb::new().await;
    let (vm, start_ts) = victoria(tmp.path()).await;
    let store = format!("{{ postgres: \"{}\" }}", db.url);
    let config = Config::parse(
        &config_with_store(&vm.url, &store, 0),
        Path::new("members.yaml"),
    )
    .expect("config");
    mad::train::run(&config, &[], Some(start_ts))
        .await
        .expect("training succeeds");
    let member = |index: usize| {
        let port = free_port().expect("port");
        spawn(
            tmp.path(),
            &config_with_store(&vm.url, &store, port),
            port,
            "members",
            index,
        )
    };
    let (a, b) = (member(0), member(1));
    let (two, _) = settle(&[&a, &b], Duration::from_secs(60)).await;
    assert_eq!(
        two.len(),
        SERIES,
        "two members left series unscored: {two:?}"
    );
    assert!(
        two.values().all(|o| o.len() == 1),
        "a series scored twice: {two:?}"
    );

    let c = member(2);
    let (three, doubled) = settle(&[&a, &b, &c], Duration::from_secs(30)).await;
    assert!(
        three.values().all(|o| o.len() == 1),
        "never settled: {three:?}"
    );
    assert_eq!(three.len(), SERIES);
    let moved: Vec<(&String, usize)> = three
        .iter()
        .filter(|(s, o)| two[*s] != **o)
        .map(|(s, o)| (s, o[0]))
        .collect();
    assert!(!moved.is_empty(), "the newcomer got nothing");
    assert!(
        moved.iter().all(|(_, to)| *to == 2),
        "series moved between old members: {moved:?}"
    );
    assert!(
        doubled <= Duration::from_secs(3),
        "series on two replicas for {doubled:?}"
    );

    // One leaves (SIGTERM: it deletes its row); the other two take its series.
    let killed = Command::new("kill")
        .args(["-TERM", &a.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let (left, _) = settle(&[&b, &c], Duration::from_secs(30)).await;
    assert_eq!(
        left.len(),
        SERIES,
        "series lost when a member left: {left:?}"
    );
    assert!(left.values().all(|o| o.len() == 1));
    drop((a, b, c));
    db.drop().await;
}
