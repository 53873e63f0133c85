//! A real VictoriaMetrics on loopback, started as a child process for the demo and the tests.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Deserialize;
use tokio::process::{Child, Command};

use crate::source::Labels;

const BINARY: &str = "victoria-metrics";
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Ports [`VictoriaMetrics::start`] tries before it gives up.
const PORT_ATTEMPTS: usize = 3;

/// VictoriaMetrics exited before it answered (a port taken meanwhile, a locked data directory).
#[derive(Debug)]
struct Exited(std::process::ExitStatus);

impl std::fmt::Display for Exited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exited before it was healthy ({})", self.0)
    }
}

impl std::error::Error for Exited {}

pub struct VictoriaMetrics {
    child: Child,
    pub url: String,
    http: reqwest::Client,
}

/// A port nobody listens on right now (the OS picks it).
/// Never the same port twice in one process: the OS may offer a port again as soon as the
/// probe closes it, and two parts of one test that both ask before either binds would share it.
pub fn free_port() -> anyhow::Result<u16> {
    for _ in 0..PORT_PROBES {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("no free port")?;
        let port = listener.local_addr()?.port();
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    bail!("no free port that this process has not handed out already")
}

/// Ports [`free_port`] has returned.
static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());
/// Ports [`free_port`] asks the OS for before it gives up.
const PORT_PROBES: usize = 64;

/// A scrape config for VictoriaMetrics' built-in scraper: the exporter every `interval`.
/// `honor_labels` keeps the input series' own `instance`/`job` labels on the scores.
pub fn scrape_config(target: &str, interval: Duration) -> String {
    format!(
        "scrape_configs:\n  - job_name: mad\n    honor_labels: true\n    scrape_interval: {}s\n    static_configs:\n      - targets: [\"{target}\"]\n",
        interval.as_secs().max(1)
    )
}

#[derive(Deserialize)]
struct Response {
    data: ResponseData,
}

#[derive(Deserialize)]
struct ResponseData {
    result: Vec<ResultSeries>,
}

#[derive(Deserialize)]
struct ResultSeries {
    metric: Labels,
    #[serde(default)]
    value: Option<(f64, String)>,
    #[serde(default)]
    values: Vec<(f64, String)>,
}

impl VictoriaMetrics {
    /// Starts `victoria-metrics` with its data in `data_dir`, optionally scraping per
    /// `scrape_config_file`, and waits until it answers.
    pub async fn start(data_dir: &Path, scrape_config_file: Option<&Path>) -> anyhow::Result<Self> {
        // The free port can be taken by another process before VictoriaMetrics binds it: then
        // it exits at once, and another port is tried.
        let mut attempt = 1;
        loop {
            match Self::start_on(free_port()?, data_dir, scrape_config_file).await {
                Err(e) if attempt < PORT_ATTEMPTS && e.is::<Exited>() => attempt += 1,
                result => return result,
            }
        }
    }

    /// As [`VictoriaMetrics::start`], on a given port: a restart keeps the address clients
    /// already know.
    pub async fn start_on(
        port: u16,
        data_dir: &Path,
        scrape_config_file: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let binary = find_binary().context(
            "victoria-metrics is not installed: `apt-get install victoria-metrics` (scripts/setup.sh does it)",
        )?;
        let mut command = Command::new(binary);
        command
            .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg(format!("-storageDataPath={}", data_dir.display()))
            .arg("-retentionPeriod=100y")
            .arg("-search.latencyOffset=0s")
            .arg("-loggerLevel=ERROR")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if let Some(file) = scrape_config_file {
            command.arg(format!("-promscrape.config={}", file.display()));
        }
        let child = command.spawn().context("cannot start victoria-metrics")?;
        let mut vm = VictoriaMetrics {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let healthy = vm
                .http
                .get(format!("{}/health", vm.url))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if healthy {
                return Ok(vm);
            }
            if let Ok(Some(status)) = vm.child.try_wait() {
                return Err(anyhow::Error::new(Exited(status)))
                    .with_context(|| format!("victoria-metrics on port {port}"));
            }
            if Instant::now() > deadline {
                bail!("victoria-metrics did not become healthy on port {port}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Imports Prometheus text lines (millisecond timestamps) and makes them queryable now.
    pub async fn import(&self, body: String) -> anyhow::Result<()> {
        let response = self
            .http
            .post(format!("{}/api/v1/import/prometheus", self.url))
            .body(body)
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("import failed: HTTP {}", response.status());
        }
        self.flush().await
    }

    pub async fn flush(&self) -> anyhow::Result<()> {
        self.http
            .get(format!("{}/internal/force_flush", self.url))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// An instant query: each series' labels and value.
    pub async fn query(&self, promql: &str) -> anyhow::Result<Vec<(Labels, f64)>> {
        let r: Response = self
            .http
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", promql)])
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(r.data
            .result
            .into_iter()
            .filter_map(|s| {
                let v = s.value?.1.parse().ok()?;
                Some((s.metric, v))
            })
            .collect())
    }

    /// A range query: each series' labels and (Unix seconds, value) points.
    pub async fn query_range(
        &self,
        promql: &str,
        start: i64,
        end: i64,
        step: i64,
    ) -> anyhow::Result<Vec<(Labels, Vec<(i64, f64)>)>> {
        let r: Response = self
            .http
            .get(format!("{}/api/v1/query_range", self.url))
            .query(&[
                ("query", promql.to_string()),
                ("start", start.to_string()),
                ("end", end.to_string()),
                ("step", step.to_string()),
            ])
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(r.data
            .result
            .into_iter()
            .map(|s| {
                let points = s
                    .values
                    .iter()
                    .filter_map(|(ts, v)| Some((*ts as i64, v.parse().ok()?)))
                    .collect();
                (s.metric, points)
            })
            .collect())
    }

    /// Stops the server and waits for it to exit.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn find_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join(BINARY))
        .find(|p| p.is_file())
}
