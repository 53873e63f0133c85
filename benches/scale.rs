//! Scale benchmark: 1, 2 and 4 sharded `mad serve` replicas (real processes, `MAD_SHARDS`) over
//! the same series in one real VictoriaMetrics. For each, after a warm-up, it measures the
//! replicas' CPU time (from /proc) and resident memory, and the points they scored (from their
//! own `mad_points_scored_total`), and prints series scored per CPU-second and memory per
//! series, with ratios to the single replica measured in the same run. Printed, never asserted.
//!
//! Run: `cargo bench --bench scale` (needs `scripts/setup.sh`: VictoriaMetrics, ONNX Runtime).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mad::config::Config;
use mad::demo::{free_port, VictoriaMetrics};
use mad::source::unix_now as now;
use mad::synth::{Profile, Synth};

const SERIES: usize = 10_000;
const HISTORY_SECS: i64 = 600;
const AHEAD_SECS: i64 = 300;
const WARMUP: Duration = Duration::from_secs(6);
const MEASURED: Duration = Duration::from_secs(20);
const REPLICAS: [usize; 3] = [1, 2, 4];

fn config_text(vm_url: &str, models: &Path, port: u16) -> String {
    config_for(vm_url, models, port, "scale_requests")
}

/// The same detector (and model) reading `query`.
fn config_for(vm_url: &str, models: &Path, port: u16, query: &str) -> String {
    format!(
        r#"
datasource: {{ url: "{vm_url}", timeout: 10s, retries: 1 }}
store: {{ path: "{}" }}
server: {{ listen: "127.0.0.1:{port}", reload_interval: 10s }}
training: {{ max_epochs: 3, seed: 1 }}
detectors:
  - name: scale
    query: '{query}'
    step: 1s
    window: 16
    train_range: 10m
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

/// CPU seconds (user + system) and resident bytes of a process, from /proc.
fn usage(pid: u32) -> (f64, f64) {
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let cpu = (tick(11) + tick(12)) / ticks_per_sec;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, rss_kb * 1024.0)
}

async fn points_scored(port: u16) -> f64 {
    let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else {
        return 0.0;
    };
    r.text()
        .await
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("mad_points_scored_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct Figures {
    points_per_cpu_second: f64,
    /// Resident memory of all replicas, less what as many idle exporters hold, per series.
    bytes_per_series: f64,
    rss_per_replica: f64,
    cpu_share: f64,
}

async fn run(dir: &Path, vm_url: &str, replicas: usize, query: &str, idle_rss: f64) -> Figures {
    let mut running = Vec::new();
    for index in 0..replicas {
        let port = free_port().expect("port");
        let file = dir.join(format!("scale-{replicas}-{index}.yaml"));
        std::fs::write(&file, config_for(vm_url, &dir.join("models"), port, query))
            .expect("config");
        let child = Command::new(env!("CARGO_BIN_EXE_mad"))
            .args(["serve", "--config"])
            .arg(&file)
            .env("MAD_SHARDS", replicas.to_string())
            .env("MAD_SHARD", index.to_string())
            .env("MAD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mad serve");
        running.push(Replica { child, port });
    }
    tokio::time::sleep(WARMUP).await;
    let mut before = (0.0, 0.0);
    for r in &running {
        before.0 += usage(r.child.id()).0;
        before.1 += points_scored(r.port).await;
    }
    let started = Instant::now();
    tokio::time::sleep(MEASURED).await;
    let (mut cpu, mut rss, mut points) = (0.0, 0.0, 0.0);
    for r in &running {
        let (c, m) = usage(r.child.id());
        cpu += c;
        rss += m;
        points += points_scored(r.port).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let (cpu, points) = (cpu - before.0, points - before.1);
    Figures {
        points_per_cpu_second: points / cpu.max(1e-9),
        bytes_per_series: (rss - idle_rss * replicas as f64).max(0.0) / SERIES as f64,
        rss_per_replica: rss / replicas as f64,
        cpu_share: cpu / wall,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vm = VictoriaMetrics::start(&tmp.path().join("vm"), None)
        .await
        .expect("start victoria-metrics (scripts/setup.sh installs it)");
    let start = now();
    let synth = Synth {
        profiles: (0..SERIES)
            .map(|i| Profile {
                metric: "scale_requests".into(),
                labels: [("instance".to_string(), format!("host-{i}"))].into(),
                base: 20.0 + (i % 50) as f64,
                daily: 0.0,
                weekend_dip: 0.0,
                fast: 0.2,
                fast_period_secs: 120.0 + (i % 17) as f64 * 10.0,
                trend_per_week: 0.0,
                noise: 0.02,
            })
            .collect(),
        incidents: Vec::new(),
        seed: 3,
        origin: start - HISTORY_SECS,
    };
    let mut chunk = String::new();
    for ts in start - HISTORY_SECS..=start + AHEAD_SECS {
        synth.exposition_at(ts, &mut chunk);
        if chunk.len() > 16 << 20 {
            vm.import(std::mem::take(&mut chunk)).await.expect("import");
        }
    }
    vm.import(chunk).await.expect("import");
    vm.flush().await.expect("flush");
    let config = Config::parse(
        &config_text(&vm.url, &tmp.path().join("models"), 0),
        Path::new("scale.yaml"),
    )
    .expect("config");
    mad::train::run(&config, &[], Some(start))
        .await
        .expect("training succeeds");

    println!(
        "MAD scale benchmark: {SERIES} series scored every second by 1, 2 and 4 sharded \
         `mad serve` processes (one real VictoriaMetrics, {}-core machine), measured over {} s",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        MEASURED.as_secs()
    );
    // The fixed cost of a process (runtime, ONNX Runtime, the model): one exporter with the
    // same model and no series.
    let idle = run(
        tmp.path(),
        &vm.url,
        1,
        "scale_requests{instance=\"none\"}",
        0.0,
    )
    .await;
    println!(
        "idle exporter (same model, no series): {:.1} MiB resident",
        idle.rss_per_replica / 1_048_576.0
    );
    println!(
        "{:>9} {:>22} {:>7} {:>26} {:>7} {:>14} {:>12}",
        "replicas",
        "points per CPU-second",
        "ratio",
        "memory per series (net)",
        "ratio",
        "RSS / replica",
        "CPU (% core)"
    );
    let mut baseline: Option<(f64, f64)> = None;
    for replicas in REPLICAS {
        let f = run(
            tmp.path(),
            &vm.url,
            replicas,
            "scale_requests",
            idle.rss_per_replica,
        )
        .await;
        let base = *baseline.get_or_insert((f.points_per_cpu_second, f.bytes_per_series));
        println!(
            "{replicas:>9} {:>22.0} {:>7.2} {:>24.0} B {:>7.2} {:>10.1} MiB {:>12.1}",
            f.points_per_cpu_second,
            f.points_per_cpu_second / base.0,
            f.bytes_per_series,
            f.bytes_per_series / base.1.max(f64::MIN_POSITIVE),
            f.rss_per_replica / 1_048_576.0,
            100.0 * f.cpu_share
        );
    }
    vm.stop().await;
}
