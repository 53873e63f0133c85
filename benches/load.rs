//! Load benchmark: one `mad serve` scoring `MAD_LOAD_SERIES` series (default 100,000) from a
//! real VictoriaMetrics every second, its `/metrics` under 64 concurrent scrapers and its
//! management API under 64 concurrent readers (wrk, from Debian), each next to `/healthz` under
//! the same load as the baseline; then `mad relay` taking 1,000 alerts a second for 30 s with a
//! fake Telegram on loopback. Prints latency percentiles, throughput and errors; asserts nothing.
//!
//! Run: `cargo bench --bench load` (needs `scripts/setup.sh`: VictoriaMetrics, ONNX Runtime, wrk).

#[path = "../tests/common/pg.rs"]
#[allow(dead_code)]
mod pg;
#[path = "../tests/common/telegram.rs"]
#[allow(dead_code)]
mod telegram;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mad::config::Config;
use mad::demo::{free_port, VictoriaMetrics};
use mad::source::unix_now as now;
use mad::synth::{Profile, Synth};

const HISTORY_SECS: i64 = 150;
const AHEAD_SECS: i64 = 900;
const CONNECTIONS: usize = 64;
const WRK_SECONDS: u64 = 30;
const API_TOKEN: &str = "load-bench-token";
const INTAKE_TOKEN: &str = "load-bench-intake";
const ALERTS_PER_SECOND: usize = 1_000;
const INTAKE_SECONDS: usize = 30;
/// Alerts per intake request: vmalert sends each evaluation's alerts in one request.
const ALERTS_PER_REQUEST: usize = 100;

fn series() -> usize {
    std::env::var("MAD_LOAD_SERIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000)
}

/// The detector; `query` lets the model be trained on a slice and serve every series. The
/// management API needs the PostgreSQL store.
fn config_text(vm_url: &str, dir: &Path, port: u16, query: &str, database: &str) -> String {
    format!(
        r#"
datasource: {{ url: "{vm_url}", timeout: 30s, retries: 1 }}
store: {{ postgres: "{database}", migrate: true }}
server: {{ listen: "127.0.0.1:{port}", reload_interval: 10s, api_token: {API_TOKEN} }}
training: {{ max_epochs: 3, seed: 1 }}
detectors:
  - name: load
    query: '{query}'
    step: 1s
    window: 16
    train_range: 2m
    interval: 1s
relay:
  listen: 127.0.0.1:{{relay_port}}
  intake_token: {INTAKE_TOKEN}
  state_path: "{}"
  telegram: {{ token: "1:load-bench", api_url: "{{telegram}}", default_chat: 1 }}
"#,
        dir.join("relay.redb").display()
    )
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str], config: &Path) -> Process {
    let child = Command::new(env!("CARGO_BIN_EXE_mad"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("MAD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mad");
    Process(child)
}

/// Resident memory of a process in MiB, from /proc.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn series_scored(port: u16) -> f64 {
    let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else {
        return 0.0;
    };
    r.text()
        .await
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("mad_series_scored{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What wrk measured.
#[derive(Debug, Default)]
struct Wrk {
    p50_ms: f64,
    p99_ms: f64,
    requests_per_sec: f64,
    requests: f64,
    errors: f64,
}

fn millis(text: &str) -> f64 {
    let text = text.trim();
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1_000.0)
    } else {
        (text, 1.0)
    };
    number.parse::<f64>().map_or(f64::NAN, |v| v * factor)
}

fn wrk(url: &str) -> Wrk {
    let output = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{CONNECTIONS}"),
            &format!("-d{WRK_SECONDS}s"),
            "--timeout",
            "60s",
            "--latency",
            "-H",
            &format!("Authorization: Bearer {API_TOKEN}"),
            url,
        ])
        .output()
        .expect("wrk is installed (scripts/setup.sh installs it)");
    let text = String::from_utf8_lossy(&output.stdout);
    let mut w = Wrk::default();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => w.p50_ms = millis(v),
            ["99%", v] => w.p99_ms = millis(v),
            ["Requests/sec:", v] => w.requests_per_sec = v.parse().unwrap_or(f64::NAN),
            [n, "requests", "in", ..] => w.requests = n.parse().unwrap_or(f64::NAN),
            ["Socket", "errors:", rest @ ..] => {
                w.errors += rest
                    .iter()
                    .filter_map(|v| v.trim_end_matches(',').parse::<f64>().ok())
                    .sum::<f64>()
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => w.errors += n.parse().unwrap_or(0.0),
            _ => {}
        }
    }
    w
}

fn report(what: &str, w: &Wrk, baseline: &Wrk) {
    println!(
        "{what:<34} p50 {:>9.2} ms ({:>7.1}× /healthz)  p99 {:>9.2} ms ({:>7.1}×)  {:>8.1} req/s  {:>6} requests  {} errors",
        w.p50_ms,
        w.p50_ms / baseline.p50_ms,
        w.p99_ms,
        w.p99_ms / baseline.p99_ms,
        w.requests_per_sec,
        w.requests,
        w.errors
    );
}

fn alert_body(request: usize) -> String {
    let items: Vec<String> = (0..ALERTS_PER_REQUEST)
        .map(|i| {
            format!(
                r#"{{"labels":{{"alertname":"MadAnomaly","for":"load","severity":"warning","instance":"host-{}"}},"annotations":{{"summary":"load"}},"startsAt":"2020-01-01T00:00:00Z","endsAt":"2999-01-01T00:00:00Z"}}"#,
                (request * ALERTS_PER_REQUEST + i) % 5_000
            )
        })
        .collect();
    format!("[{}]", items.join(","))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let series = series();
    let tmp = tempfile::tempdir().expect("tempdir");
    let vm = VictoriaMetrics::start(&tmp.path().join("vm"), None)
        .await
        .expect("start victoria-metrics (scripts/setup.sh installs it)");
    let start = now();
    let synth = Synth {
        profiles: (0..series)
            .map(|i| Profile {
                metric: "load_requests".into(),
                labels: [
                    ("instance".to_string(), format!("host-{i}")),
                    ("slice".to_string(), (i % 1000).to_string()),
                ]
                .into(),
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
    let imported = Instant::now();
    let mut chunk = String::new();
    for ts in start - HISTORY_SECS..=start + AHEAD_SECS {
        synth.exposition_at(ts, &mut chunk);
        if chunk.len() > 32 << 20 {
            vm.import(std::mem::take(&mut chunk)).await.expect("import");
        }
    }
    vm.import(chunk).await.expect("import");
    vm.flush().await.expect("flush");
    println!(
        "imported {series} series × {} points in {:.0} s",
        HISTORY_SECS + AHEAD_SECS + 1,
        imported.elapsed().as_secs_f64()
    );

    let database = pg::TestDb::new().await;
    let telegram = telegram::FakeTelegram::start().await;
    let (port, relay_port) = (free_port().expect("port"), free_port().expect("port"));
    let write_config = |query: &str| {
        let text = config_text(&vm.url, tmp.path(), port, query, &database.url)
            .replace("{relay_port}", &relay_port.to_string())
            .replace("{telegram}", &telegram.url);
        let file = tmp.path().join("load.yaml");
        std::fs::write(&file, &text).expect("config");
        (file, text)
    };
    // The model learns from one slice of the series and serves them all.
    let (_, training_text) = write_config("load_requests{slice=\"0\"}");
    let config = Config::parse(&training_text, Path::new("load.yaml")).expect("config");
    mad::train::run(&config, &[], Some(start))
        .await
        .expect("training succeeds");
    let (config_file, _) = write_config("load_requests");

    let exporter = spawn(&["serve"], &config_file);
    let warming = Instant::now();
    while series_scored(port).await < series as f64 * 0.99 {
        assert!(
            warming.elapsed() < Duration::from_secs(600),
            "the exporter never scored the series"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("metrics")
        .bytes()
        .await
        .expect("metrics body");
    println!(
        "exporter: {series} series scored every second after {:.0} s; /metrics is {:.1} MB; RSS {:.0} MiB",
        warming.elapsed().as_secs_f64(),
        body.len() as f64 / 1e6,
        rss_mib(exporter.0.id())
    );
    println!(
        "wrk, {CONNECTIONS} connections, {WRK_SECONDS} s each, while the exporter keeps scoring:"
    );
    let healthz = wrk(&format!("http://127.0.0.1:{port}/healthz"));
    report("/healthz (baseline)", &healthz, &healthz);
    let metrics = wrk(&format!("http://127.0.0.1:{port}/metrics"));
    report("/metrics", &metrics, &healthz);
    println!(
        "exporter RSS after the scrapes: {:.0} MiB",
        rss_mib(exporter.0.id())
    );
    let api = wrk(&format!("http://127.0.0.1:{port}/api/v1/detectors"));
    report("/api/v1/detectors", &api, &healthz);
    let anomalies = wrk(&format!(
        "http://127.0.0.1:{port}/api/v1/anomalies?detector=load"
    ));
    report("/api/v1/anomalies?detector=load", &anomalies, &healthz);
    drop(exporter);

    // The relay: 1,000 alerts a second in requests of 100, for 30 s.
    let relay = spawn(&["relay"], &config_file);
    let up = Instant::now();
    while reqwest::get(format!("http://127.0.0.1:{relay_port}/healthz"))
        .await
        .is_err()
    {
        assert!(
            up.elapsed() < Duration::from_secs(20),
            "relay did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = reqwest::Client::new();
    let requests_per_second = ALERTS_PER_SECOND / ALERTS_PER_REQUEST;
    let total = requests_per_second * INTAKE_SECONDS;
    let interval = Duration::from_secs(1) / requests_per_second as u32;
    let began = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for request in 0..total {
        let due = began + interval * request as u32;
        tokio::time::sleep_until(due.into()).await;
        let (client, body) = (client.clone(), alert_body(request));
        let url = format!("http://127.0.0.1:{relay_port}/api/v2/alerts");
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let ok = client
                .post(url)
                .bearer_auth(INTAKE_TOKEN)
                .body(body)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            (ok, sent.elapsed().as_secs_f64() * 1e3)
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    let mut errors = 0;
    for task in tasks {
        match task.await {
            Ok((true, ms)) => latencies.push(ms),
            _ => errors += 1,
        }
    }
    let elapsed = began.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    println!(
        "relay intake: {} alerts in {:.1} s ({:.0} alerts/s offered {ALERTS_PER_SECOND}), requests of {ALERTS_PER_REQUEST}: p50 {:.2} ms, p99 {:.2} ms, {errors} errors; RSS {:.0} MiB; {} Telegram messages so far",
        latencies.len() * ALERTS_PER_REQUEST,
        elapsed,
        (latencies.len() * ALERTS_PER_REQUEST) as f64 / elapsed,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        rss_mib(relay.0.id()),
        telegram.sent().len()
    );
    drop(relay);
    vm.stop().await;
    database.drop().await;
}
