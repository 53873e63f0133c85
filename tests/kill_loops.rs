//! SIGKILL loops against the real binaries: `mad serve` and `mad train` run as child processes
//! (with a real VictoriaMetrics holding an hour of history and new points arriving every second)
//! and are killed at seeded pseudo-random moments, then started again. What a user checks: the
//! exporter comes back and serves scores after every kill; the directory model store is never
//! left with a broken or partial version (every listed version loads), a killed trainer leaves
//! nothing that trips up the next run, and the last run's model is the active one and is served.
//!
//! `MAD_KILL_ROUNDS` (default 8) exporter kills, `MAD_TRAIN_KILL_ROUNDS` (default 6) trainer
//! kills, `MAD_KILL_SEED` the seed of the kill moments (printed, so a failure can be replayed).

mod common;

use common::exporter::{last_success, score_count, served_version, try_metrics};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::feeder::{requests, requests_detector, with_history, Feeder};
use mad::demo::{free_port, VictoriaMetrics};
use mad::source::unix_now as now;
use mad::store::{DirStore, ModelStore, VersionInfo};

const DETECTOR: &str = "killed";
const HISTORY_SECS: i64 = 3600;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// splitmix64: reproducible kill moments without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn between(&mut self, low: Duration, high: Duration) -> Duration {
        let unit = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        low + high.saturating_sub(low).mul_f64(unit)
    }
}

fn rng() -> Rng {
    let seed = env_or("MAD_KILL_SEED", 20_261_126u64);
    println!("kill moments seeded with MAD_KILL_SEED={seed}");
    Rng(seed)
}

/// VictoriaMetrics with an hour of history and the feeder, and a config file for the children.
struct Stack {
    _vm: VictoriaMetrics,
    _feeder: Feeder,
    dir: PathBuf,
    config: PathBuf,
    store: PathBuf,
    port: u16,
    /// When the imported history ends.
    start: i64,
}

async fn stack(dir: &Path) -> Stack {
    let (vm, synth, start) =
        with_history(dir, HISTORY_SECS, |origin| requests(&["a", "b"], 5, origin)).await;
    let feeder = Feeder::start(vm.url.clone(), synth, start + 1);
    let port = free_port().expect("port");
    let store = dir.join("models");
    // Small training settings: a run takes a few seconds, so kills land inside it.
    let text = format!(
        r#"
datasource: {{ url: "{}", timeout: 2s, retries: 0 }}
store: {{ path: "{}", keep_versions: 4 }}
server: {{ listen: "127.0.0.1:{port}", reload_interval: 1s }}
training: {{ max_epochs: 300, patience: 300, hidden: 8 }}
{}"#,
        vm.url,
        store.display(),
        requests_detector(DETECTOR, 16, "1h", "10m")
    );
    let config = dir.join("mad.yaml");
    std::fs::write(&config, text).expect("write the config");
    Stack {
        _vm: vm,
        _feeder: feeder,
        dir: dir.to_owned(),
        config,
        store,
        port,
        start,
    }
}

/// A `mad` child process, SIGKILLed on drop so a failing assertion leaves nothing behind.
struct Mad {
    child: Child,
    log: PathBuf,
    started: Instant,
}

impl Mad {
    fn spawn(stack: &Stack, command: &str, name: &str) -> Mad {
        let log = stack.dir.join(format!("{name}.log"));
        let out = stack.dir.join(format!("{name}.out"));
        let child = Command::new(env!("CARGO_BIN_EXE_mad"))
            .args([command, "--config"])
            .arg(&stack.config)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(out).expect("stdout file"))
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("start mad {command}: {e}"));
        Mad {
            child,
            log,
            started: Instant::now(),
        }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("child status")
    }

    /// SIGKILL; whether it was still running.
    fn kill(&mut self) -> bool {
        let running = self.exited().is_none();
        let _ = self.child.kill();
        let _ = self.child.wait();
        running
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid; it has not been reaped yet.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({signal})");
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Mad {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the exporter child serves a score for every series from a cycle of its own.
async fn wait_for_scores(mad: &mut Mad, port: u16, since: i64) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = mad.exited() {
            panic!("mad serve exited ({status}):\n{}", mad.log_tail());
        }
        if let Some(body) = try_metrics(port).await {
            if score_count(&body, DETECTOR) == 2 && last_success(&body, DETECTOR) >= since as f64 {
                return body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "mad serve serves no scores 30 s after it started:\n{}",
            mad.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The names of the files in the detector's directory.
fn names(store: &Path) -> Vec<String> {
    std::fs::read_dir(store.join(DETECTOR))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Every file in the detector's directory with its bytes (with no writer running).
fn snapshot(store: &Path) -> BTreeMap<String, Vec<u8>> {
    names(store)
        .into_iter()
        .map(|name| {
            let bytes = std::fs::read(store.join(DETECTOR).join(&name)).expect("read a store file");
            (name, bytes)
        })
        .collect()
}

/// What a user checks after a crash: every listed version's model loads, and the active one
/// loads through the store API. Returns the versions and the files no version accounts for.
async fn check_store(store: &Path) -> (Vec<VersionInfo>, Vec<String>) {
    let dir = store.join(DETECTOR);
    let api = DirStore::new(store);
    let versions = api.list(DETECTOR).await.expect("list versions");
    for v in &versions {
        // docs/model-contract.md: `<detector>/<version>.onnx` next to its metadata.
        let bytes = std::fs::read(dir.join(format!("{}.onnx", v.version)))
            .unwrap_or_else(|e| panic!("listed version {} has no model: {e}", v.version));
        common::assert_loads(&bytes, v, DETECTOR);
    }
    let active = api
        .load_active(DETECTOR)
        .await
        .expect("the active version loads")
        .expect("there is an active version");
    assert!(
        versions
            .iter()
            .any(|v| v.active && v.version == active.info.version),
        "the active version {} is not listed as active",
        active.info.version
    );
    let known: Vec<String> = versions
        .iter()
        .flat_map(|v| [format!("{}.onnx", v.version), format!("{}.json", v.version)])
        .chain(["ACTIVE".to_string()])
        .collect();
    let leftovers = snapshot(store)
        .into_keys()
        .filter(|name| !known.contains(name))
        .collect();
    (versions, leftovers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exporter_comes_back_and_serves_after_every_sigkill() {
    let rounds = env_or("MAD_KILL_ROUNDS", 8usize);
    let mut rng = rng();
    let tmp = tempfile::tempdir().expect("tempdir");
    let stack = stack(tmp.path()).await;
    let config = mad::config::Config::load(&stack.config).expect("config");
    let trained = mad::train::run(&config, &[], Some(stack.start))
        .await
        .expect("training succeeds");
    let version = trained[0].version.version.clone();
    let before = snapshot(&stack.store);
    let mut startups = Vec::new();

    for round in 0..rounds {
        let since = now();
        let mut serve = Mad::spawn(&stack, "serve", &format!("serve-{round}"));
        let body = wait_for_scores(&mut serve, stack.port, since).await;
        startups.push(serve.started.elapsed());
        assert_eq!(
            served_version(&body, DETECTOR).as_deref(),
            Some(version.as_str())
        );
        // Killed at a random moment of its scoring cycles.
        let delay = rng.between(Duration::from_millis(200), Duration::from_secs(2));
        tokio::time::sleep(delay).await;
        assert!(
            serve.kill(),
            "round {round}: mad serve exited by itself:\n{}",
            serve.log_tail()
        );
        // The exporter only reads the store: a crash must leave it byte for byte as it was.
        assert!(
            snapshot(&stack.store) == before,
            "round {round}: the store changed"
        );
        let (versions, leftovers) = check_store(&stack.store).await;
        assert_eq!(versions.len(), 1);
        assert!(leftovers.is_empty(), "{leftovers:?}");
        println!(
            "round {round}: scores {:.2} s after the start, killed {:.2} s later",
            startups[round].as_secs_f64(),
            delay.as_secs_f64()
        );
    }

    // Once more, to the end: fresh scores cycle after cycle, and a clean stop on SIGTERM.
    let since = now();
    let mut serve = Mad::spawn(&stack, "serve", "serve-last");
    let body = wait_for_scores(&mut serve, stack.port, since).await;
    let first = last_success(&body, DETECTOR);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let body = try_metrics(stack.port).await.expect("the exporter answers");
    assert!(
        last_success(&body, DETECTOR) > first && score_count(&body, DETECTOR) == 2,
        "{body}"
    );
    assert_eq!(
        served_version(&body, DETECTOR).as_deref(),
        Some(version.as_str())
    );
    serve.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = serve.exited() {
            break status;
        }
        assert!(Instant::now() < deadline, "no stop 10 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}:\n{}", serve.log_tail());
    let slowest = startups.iter().max().copied().unwrap_or_default();
    println!(
        "{rounds} SIGKILLs: scores back within {:.2} s of every restart",
        slowest.as_secs_f64()
    );
}

/// The version `mad train` reports on stdout ("…; stored version X").
fn stored_version(stack: &Stack, name: &str) -> Option<String> {
    let out = std::fs::read_to_string(stack.dir.join(format!("{name}.out"))).ok()?;
    let line = out.lines().find(|l| l.starts_with(DETECTOR))?;
    Some(line.rsplit("stored version ").next()?.trim().to_string())
}

/// Runs `mad train` to the end; returns the version it stored and how long it took.
async fn train_to_completion(stack: &Stack, name: &str) -> (String, Duration) {
    let mut train = Mad::spawn(stack, "train", name);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = train.exited() {
            break status;
        }
        assert!(Instant::now() < deadline, "mad train still runs after 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}:\n{}", train.log_tail());
    let version = stored_version(stack, name).expect("mad train names the stored version");
    (version, train.started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_killed_anywhere_leaves_no_partial_version() {
    let rounds = env_or("MAD_TRAIN_KILL_ROUNDS", 6usize);
    let mut rng = rng();
    let tmp = tempfile::tempdir().expect("tempdir");
    let stack = stack(tmp.path()).await;

    // A first run to the end: a model to fall back on, and how long a run takes.
    let (mut active, took) = train_to_completion(&stack, "train-first").await;
    check_store(&stack.store).await;
    println!("a training run takes {:.2} s", took.as_secs_f64());

    for round in 0..rounds {
        let name = format!("train-{round}");
        let known = names(&stack.store);
        let mut train = Mad::spawn(&stack, "train", &name);
        let how = if round % 2 == 1 {
            // The moment the store is written to: the first new file in the detector's folder.
            let deadline = Instant::now() + took * 3;
            while names(&stack.store).iter().all(|name| known.contains(name)) {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: mad train never wrote:\n{}",
                    train.log_tail()
                );
                if train.exited().is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            "as it writes".to_string()
        } else {
            let delay = rng.between(Duration::from_millis(200), took);
            tokio::time::sleep(delay).await;
            format!("{:.2} s in", delay.as_secs_f64())
        };
        let status = train.exited();
        if let Some(status) = status {
            assert!(status.success(), "{status}:\n{}", train.log_tail());
        }
        train.kill();
        let (versions, leftovers) = check_store(&stack.store).await;
        let now_active = versions
            .iter()
            .find(|v| v.active)
            .map(|v| v.version.clone())
            .expect("an active version");
        // Either the kill came first and the previous version stays, or the new one is whole.
        let finished = stored_version(&stack, &name);
        assert!(
            now_active >= active,
            "round {round}: active went back from {active} to {now_active}"
        );
        if let Some(version) = &finished {
            assert_eq!(&now_active, version, "a finished run's version is active");
        }
        println!(
            "round {round}: killed {how} ({}), {} versions, active {now_active}, leftovers {leftovers:?}",
            if status.is_some() { "had finished" } else { "mid-run" },
            versions.len()
        );
        active = now_active;
    }

    // A run to the end after all that: its version is active and the exporter serves it.
    let (last, _) = train_to_completion(&stack, "train-last").await;
    let (versions, leftovers) = check_store(&stack.store).await;
    assert_eq!(
        versions.iter().find(|v| v.active).map(|v| &v.version),
        Some(&last),
        "the last run's version is active"
    );
    assert!(
        leftovers.is_empty(),
        "killed runs left files behind: {leftovers:?}"
    );
    let since = now();
    let mut serve = Mad::spawn(&stack, "serve", "serve");
    let body = wait_for_scores(&mut serve, stack.port, since).await;
    assert_eq!(
        served_version(&body, DETECTOR).as_deref(),
        Some(last.as_str())
    );
}
