//! Live points for the tests that need an exporter scoring fresh data.

use std::time::Duration;

use mad::source::unix_now as now;
use mad::synth::Synth;

/// Writes one point a second of every series of `synth` into VictoriaMetrics' import API
/// (from `from` on), until dropped.
pub struct Feeder(tokio::task::JoinHandle<()>);

impl Feeder {
    pub fn start(url: String, synth: Synth, from: i64) -> Feeder {
        Feeder(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut ts = from;
            loop {
                let mut body = String::new();
                while ts <= now() {
                    synth.exposition_at(ts, &mut body);
                    ts += 1;
                }
                if !body.is_empty() {
                    let _ = http
                        .post(format!("{url}/api/v1/import/prometheus"))
                        .body(body)
                        .send()
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }))
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.0.abort();
    }
}
