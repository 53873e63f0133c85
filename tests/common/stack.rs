//! The whole alerting path on loopback, as the end-to-end alerting test and the soak run it:
//! VictoriaMetrics scraping `mad serve`, vmalert evaluating the generated rules, `mad relay`
//! delivering to a fake Telegram.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use mad::demo::{free_port, VictoriaMetrics};
use tempfile::TempDir;

use super::feeder::requests_detector;
use super::process::Process;
use super::relay::{section, Bot};
use super::telegram::FakeTelegram;

/// The bot the alerting path delivers with (tests/secrets.txt lists its secrets).
pub const BOT: Bot = Bot {
    token: "515151:AAE-e2e-alerting-secret",
    intake: "e2e-intake-secret",
    chat: -1_001_234,
};

/// What the alerting path runs against: VictoriaMetrics scraping the exporter, a fake Telegram.
pub struct Stack {
    pub vm: Arc<VictoriaMetrics>,
    pub telegram: FakeTelegram,
    pub serve_port: u16,
    pub relay_port: u16,
    pub vmalert_port: u16,
    /// Last, so it is removed after VictoriaMetrics is stopped.
    pub tmp: TempDir,
}

impl Stack {
    /// All of it in a temporary directory, with ports for the exporter, relay and vmalert.
    pub async fn start() -> Stack {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (serve_port, relay_port, vmalert_port) = (
            free_port().expect("port"),
            free_port().expect("port"),
            free_port().expect("port"),
        );
        let vm = Arc::new(super::victoria::scraping(tmp.path(), serve_port).await);
        let telegram = FakeTelegram::start().await;
        Stack {
            vm,
            telegram,
            serve_port,
            relay_port,
            vmalert_port,
            tmp,
        }
    }

    /// Where the stack's processes keep their data, configs and logs.
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// Config of `mad serve` scoring the fed requests as `detector`, alerting, and `mad relay`.
    pub fn config_text(&self, detector: &str, reload_interval: &str, extra: &str) -> String {
        let vm_url = &self.vm.url;
        format!(
            r#"
datasource: {{ url: "{vm_url}", timeout: 2s, retries: 1 }}
store: {{ path: "{models}" }}
server: {{ listen: "127.0.0.1:{serve_port}", reload_interval: {reload_interval} }}
training: {{ max_epochs: 25, seed: 1 }}
{extra}{detectors}    alert: {{ for: 4s, severity: {{ warning: 1, critical: 1000 }} }}
{relay}"#,
            models = self.dir().join("models").display(),
            serve_port = self.serve_port,
            detectors = requests_detector(detector, 32, "2h", "10s"),
            relay = section(
                self.dir(),
                self.relay_port,
                &BOT,
                &self.telegram.url,
                Some(vm_url)
            ),
        )
    }

    /// vmalert evaluating `rules` each second, notifying `notifier` (with the intake token if
    /// `bearer`); once it answers.
    pub async fn vmalert(&self, rules: &Path, notifier: &str, bearer: bool) -> Process {
        let vm_url = &self.vm.url;
        let mut command = Command::new("vmalert");
        command
            .arg(format!("-rule={}", rules.display()))
            .arg(format!("-datasource.url={vm_url}"))
            .arg(format!("-remoteWrite.url={vm_url}"))
            .arg(format!("-remoteRead.url={vm_url}"))
            .arg(format!("-notifier.url={notifier}"))
            .arg("-evaluationInterval=1s")
            .arg("-rule.resendDelay=2s")
            .arg("-remoteWrite.flushInterval=1s")
            .arg(format!("-httpListenAddr=127.0.0.1:{}", self.vmalert_port))
            .stdin(Stdio::null());
        if bearer {
            command.arg(format!("-notifier.bearerToken={}", BOT.intake));
        }
        let mut vmalert = Process::spawn("vmalert", &mut command, self.dir().join("vmalert.log"));
        vmalert
            .wait_ok(&format!("http://127.0.0.1:{}/health", self.vmalert_port))
            .await;
        vmalert
    }
}
