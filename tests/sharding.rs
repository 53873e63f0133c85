//! Horizontal sharding with real processes: N `mad serve` replicas (told their place by
//! `MAD_SHARDS`/`MAD_SHARD`, as a StatefulSet's pods are) against one real VictoriaMetrics. Together
//! they score every series exactly once; after N grows from 2 to 3, again exactly once, and the
//! series that moved all moved to the new replica (nothing reshuffled between the old ones).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mad::config::Config;
use mad::demo::{free_port, VictoriaMetrics};
use mad::synth::{Profile, Synth};

const SERIES: usize = 12;
const HISTORY_SECS: i64 = 3600;
/// Points imported ahead of now, so the replicas keep finding fresh data without a feeder.
const AHEAD_SECS: i64 = 300;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn config_text(vm_url: &str, models: &Path, port: u16) -> String {
    format!(
        r#"
datasource: {{ url: "{vm_url}", timeout: 2s, retries: 1 }}
store: {{ path: "{}" }}
server: {{ listen: "127.0.0.1:{port}", reload_interval: 1s }}
training: {{ max_epochs: 5, seed: 1 }}
detectors:
  - name: shards
    query: shard_test_requests
    step: 1s
    window: 16
    train_range: 1h
    interval: 1s
"#,
        models.display()
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
    let file = dir.join(format!("replica-{shards}-{index}.yaml"));
    std::fs::write(&file, config_text(vm_url, &dir.join("models"), port)).expect("config");
    let child = Command::new(env!("CARGO_BIN_EXE_mad"))
        .args(["serve", "--config"])
        .arg(&file)
        .env("MAD_SHARDS", shards.to_string())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_cover_every_series_once_before_and_after_resharding() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vm = VictoriaMetrics::start(&tmp.path().join("vm"), None)
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
