//! Faults of what the exporter depends on, staged against the real components: VictoriaMetrics
//! stopped and started again, a corrupt model version in the store, the store's disk full and
//! then read-only. What a user checks: the exporter keeps answering, the failure shows in its
//! `mad_` metrics, no stale score is served, the model in service stays in service, and all is
//! as before once the fault is gone.
//!
//! The outage lasts `MAD_FAULT_OUTAGE_SECS` (default 20 s, so CI can afford it; the README's
//! figures come from a 3-minute run).

mod common;

use common::exporter::{
    eventually, has_scores, last_success, metrics, sample, served_version, try_metrics,
};
use common::feeder::{requests, requests_detector, with_history};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mad::config::Config;
use mad::demo::{free_port, VictoriaMetrics};
use mad::source::unix_now as now;
use mad::store::{DirStore, ModelStore};
use mad::synth::Synth;

const DETECTOR: &str = "faults";
const HISTORY_SECS: i64 = 3600;

fn config(vm_url: &str, store: &Path, port: u16) -> Config {
    let text = format!(
        r#"
datasource: {{ url: "{vm_url}", timeout: 1s, retries: 0 }}
store: {{ path: "{}" }}
server: {{ listen: "127.0.0.1:{port}", reload_interval: 1s }}
training: {{ max_epochs: 8, hidden: 8 }}
{}"#,
        store.display(),
        requests_detector(DETECTOR, 16, "1h", "10m")
    );
    Config::parse(&text, Path::new("faults.yaml")).expect("test config is valid")
}

/// Writes one point a second into VictoriaMetrics' import API. While it is down the points wait
/// in a backlog and go in once it answers again, as vmagent's buffer does in production.
struct Feeder {
    backlog: Arc<Mutex<Vec<String>>>,
    /// The newest point VictoriaMetrics has accepted.
    delivered_until: Arc<AtomicI64>,
    task: tokio::task::JoinHandle<()>,
}

impl Feeder {
    fn start(url: String, synth: Synth, from: i64) -> Feeder {
        let backlog: Arc<Mutex<Vec<String>>> = Arc::default();
        let pending = backlog.clone();
        let delivered_until = Arc::new(AtomicI64::new(from - 1));
        let accepted = delivered_until.clone();
        let task = tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut ts = from;
            loop {
                while ts <= now() {
                    let mut line = String::new();
                    synth.exposition_at(ts, &mut line);
                    pending.lock().expect("backlog lock").push(line);
                    ts += 1;
                }
                let body = pending.lock().expect("backlog lock").concat();
                if !body.is_empty() {
                    let sent = http
                        .post(format!("{url}/api/v1/import/prometheus"))
                        .body(body)
                        .timeout(Duration::from_secs(1))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if sent {
                        pending.lock().expect("backlog lock").clear();
                        accepted.store(ts - 1, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Feeder {
            backlog,
            delivered_until,
            task,
        }
    }

    fn backlog(&self) -> usize {
        self.backlog.lock().expect("backlog lock").len()
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A VictoriaMetrics with an hour of history, a trained model in `store`, and the feeder.
async fn stack(dir: &Path, store: &Path) -> (VictoriaMetrics, Config, u16, Feeder) {
    let (vm, synth, start) =
        with_history(dir, HISTORY_SECS, |origin| requests(&["a"], 3, origin)).await;
    let port = free_port().expect("port");
    let config = config(&vm.url, store, port);
    mad::train::run(&config, &[], Some(start))
        .await
        .expect("training succeeds");
    let feeder = Feeder::start(vm.url.clone(), synth, start + 1);
    (vm, config, port, feeder)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_victoriametrics_outage_is_reported_and_recovered_from_in_one_cycle() {
    let outage = Duration::from_secs(
        std::env::var("MAD_FAULT_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let (vm, config, port, feeder) = stack(tmp.path(), &tmp.path().join("models")).await;
    let vm_port: u16 = vm
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("VictoriaMetrics URL has a port");
    let serving = common::serve::start(config);
    eventually(Duration::from_secs(60), "first scores", || async {
        try_metrics(port)
            .await
            .is_some_and(|body| has_scores(&body, DETECTOR))
    })
    .await;
    let unreachable =
        format!("mad_errors_total{{detector=\"{DETECTOR}\",kind=\"datasource_unreachable\"}}");
    let errors_before = sample(&metrics(port).await, &unreachable);

    vm.stop().await;
    let stopped = Instant::now();
    let mut failure_seen: Option<Instant> = None;
    let mut samples_during = 0;
    while stopped.elapsed() < outage {
        let body = metrics(port).await;
        if failure_seen.is_none() && sample(&body, &unreachable) > errors_before {
            failure_seen = Some(Instant::now());
        }
        // A cycle after the failure is counted, no score may be left over from before it.
        if failure_seen.is_some_and(|at| at.elapsed() > Duration::from_millis(1500)) {
            samples_during += 1;
            assert!(
                !has_scores(&body, DETECTOR),
                "a stale score is served {:?} into the outage",
                stopped.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        failure_seen.is_some(),
        "the outage never showed in {unreachable}"
    );
    assert!(samples_during > 0, "the outage was too short to check");
    assert!(feeder.backlog() > 0, "points piled up while it was down");

    let vm = VictoriaMetrics::start_on(vm_port, &tmp.path().join("vm"), None)
        .await
        .expect("restart victoria-metrics on its old port and data");
    eventually(
        Duration::from_secs(10),
        "the backlog is delivered",
        || async { feeder.backlog() <= 2 },
    )
    .await;
    // Accepted points take a moment to become searchable; the exporter cannot score what
    // VictoriaMetrics does not yet return.
    let sent = feeder.delivered_until.load(Ordering::SeqCst) as f64;
    eventually(
        Duration::from_secs(10),
        "the delivered points are searchable",
        || async {
            vm.query("tlast_over_time(app_requests_rate[5m])")
                .await
                .is_ok_and(|rows| rows.iter().any(|(_, ts)| *ts >= sent))
        },
    )
    .await;
    let delivered = now() as f64;
    // The first cycle that succeeds after the data is back must serve scores again. A cycle
    // takes milliseconds; one ending within half a second may have fetched before.
    let mut body = metrics(port).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while last_success(&body, DETECTOR) <= delivered + 0.5 {
        assert!(
            Instant::now() < deadline,
            "no successful cycle after the return"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        body = metrics(port).await;
    }
    assert!(
        has_scores(&body, DETECTOR),
        "the first successful cycle after the return served no score:\n{body}"
    );
    println!(
        "outage {outage:?}: scores withdrawn {:.1} s after the stop, served again by the \
         first successful cycle, {:.1} s after the data was back",
        failure_seen
            .map(|at| at.duration_since(stopped).as_secs_f64())
            .unwrap_or(f64::NAN),
        now() as f64 - delivered
    );
    serving.stop().await;
}

/// A tmpfs mounted for the test's lifetime: its size makes the disk fill up, and it can be
/// remounted read-only.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(path).expect("mount point");
        mount(
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            path,
        );
        SmallDisk {
            path: path.to_owned(),
        }
    }

    fn remount(&self, mode: &str) {
        mount(&["-o", &format!("remount,{mode}")], &self.path);
    }

    /// Writes zeros into a file until the disk refuses more.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).expect("create filler");
        let block = vec![0u8; 4096];
        while file.write_all(&block).and_then(|_| file.flush()).is_ok() {}
        filler
    }
}

fn mount(args: &[&str], path: &Path) {
    let status = std::process::Command::new("mount")
        .args(args)
        .arg(path)
        .status()
        .expect("mount runs");
    assert!(
        status.success(),
        "mount {args:?} {} failed: these tests need root",
        path.display()
    );
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_version_and_a_full_or_read_only_store_leave_the_served_model_serving() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let disk = SmallDisk::mount(&tmp.path().join("models"), "1m");
    let (_vm, config, port, _feeder) = stack(tmp.path(), &disk.path).await;
    let serving = common::serve::start(config.clone());
    eventually(Duration::from_secs(60), "first scores", || async {
        try_metrics(port)
            .await
            .is_some_and(|body| has_scores(&body, DETECTOR))
    })
    .await;
    let first = served_version(&metrics(port).await, DETECTOR).expect("a version is served");

    // A corrupt version becomes the store's active one: rejected, the first keeps serving.
    let store = DirStore::new(&disk.path);
    let corrupt = store
        .put(b"this is not an ONNX model", &common::meta(DETECTOR, 0.5))
        .await
        .expect("store the corrupt version");
    let rejected = format!("mad_errors_total{{detector=\"{DETECTOR}\",kind=\"model_rejected\"}}");
    eventually(
        Duration::from_secs(15),
        "the corrupt version is rejected",
        || async { sample(&metrics(port).await, &rejected) >= 1.0 },
    )
    .await;
    let body = metrics(port).await;
    assert!(
        sample(
            &body,
            &format!("mad_model_reloads_total{{detector=\"{DETECTOR}\",result=\"rejected\"}}")
        ) >= 1.0
    );
    assert_eq!(
        served_version(&body, DETECTOR).as_deref(),
        Some(first.as_str())
    );
    let cycle = last_success(&body, DETECTOR);
    eventually(Duration::from_secs(10), "cycles go on", || async {
        let body = metrics(port).await;
        last_success(&body, DETECTOR) > cycle && has_scores(&body, DETECTOR)
    })
    .await;

    // The disk fills up: training fails saying so, nothing half-written is listed or served.
    let versions = store.list(DETECTOR).await.expect("list").len();
    let filler = disk.fill();
    let err = mad::train::run(&config, &[], None)
        .await
        .expect_err("training into a full disk fails");
    let message = format!("{err:#}");
    assert!(
        message.contains("No space left on device") && message.contains("model store"),
        "{message}"
    );
    assert_eq!(store.list(DETECTOR).await.expect("list").len(), versions);
    let model_files = std::fs::read_dir(disk.path.join(DETECTOR))
        .expect("detector dir")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "onnx"))
        .count();
    assert_eq!(
        model_files, versions,
        "a half-written version left its model file"
    );
    assert_eq!(
        store
            .active_version(DETECTOR)
            .await
            .expect("active")
            .map(|v| v.version),
        Some(corrupt.version.clone())
    );

    // Read-only: the same, with its own reason.
    std::fs::remove_file(&filler).expect("free the disk");
    disk.remount("ro");
    let err = mad::train::run(&config, &[], None)
        .await
        .expect_err("training into a read-only store fails");
    let message = format!("{err:#}");
    assert!(message.contains("Read-only file system"), "{message}");
    let body = metrics(port).await;
    assert_eq!(
        served_version(&body, DETECTOR).as_deref(),
        Some(first.as_str())
    );
    assert!(has_scores(&body, DETECTOR), "{body}");

    // Writable again: the next training is stored and served without a restart.
    disk.remount("rw");
    let trained = mad::train::run(&config, &[], None)
        .await
        .expect("training succeeds once the disk is back");
    let newest = trained[0].version.version.clone();
    eventually(
        Duration::from_secs(15),
        "the new version is served",
        || async {
            served_version(&metrics(port).await, DETECTOR).as_deref() == Some(newest.as_str())
        },
    )
    .await;
    serving.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_series_with_a_runaway_label_set_is_left_out_and_counted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vm = VictoriaMetrics::start(&tmp.path().join("vm"), None)
        .await
        .expect("start victoria-metrics");
    let start = now();
    let mut synth = requests(&["a"], 3, start - HISTORY_SECS);
    // Three values of 3,000 bytes: each within VictoriaMetrics' own limit, 9 KB together.
    let mut runaway = synth.profiles[0].clone();
    runaway.labels = [
        ("instance", "b"),
        ("trace", "x"),
        ("body", "y"),
        ("dump", "z"),
    ]
    .into_iter()
    .map(|(k, v)| {
        let value = if k == "instance" {
            v.to_string()
        } else {
            v.repeat(3000)
        };
        (k.to_string(), value)
    })
    .collect();
    synth.profiles.push(runaway);
    let mut history = String::new();
    for ts in start - HISTORY_SECS..=start {
        synth.exposition_at(ts, &mut history);
    }
    vm.import(history).await.expect("import history");
    let port = free_port().expect("port");
    let config = config(&vm.url, &tmp.path().join("models"), port);
    let trained = mad::train::run(&config, &[], Some(start))
        .await
        .expect("training succeeds on the series that fit");
    assert_eq!(trained[0].series, 1, "the runaway series is not modelled");
    let _feeder = Feeder::start(vm.url.clone(), synth, start + 1);
    let serving = common::serve::start(config);
    let limited = format!("mad_errors_total{{detector=\"{DETECTOR}\",kind=\"label_limit\"}}");
    eventually(Duration::from_secs(60), "scores and the count", || async {
        try_metrics(port)
            .await
            .is_some_and(|body| has_scores(&body, DETECTOR) && sample(&body, &limited) >= 1.0)
    })
    .await;
    let body = metrics(port).await;
    assert!(
        !body.contains("instance=\"b\""),
        "the runaway series is exposed"
    );
    assert!(body.len() < 64 * 1024, "{} bytes of /metrics", body.len());
    serving.stop().await;
}
