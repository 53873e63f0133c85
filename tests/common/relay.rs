//! `mad relay` as a child process and the config it runs on: the relay tests SIGKILL it and
//! start it again on the same state.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::process::Process;

/// The intake token of [`config_text`]: what vmalert (or the test in its place) sends.
pub const INTAKE: &str = "intake-secret";
/// The chat of alerts that no route of [`config_text`] matches.
pub const DEFAULT_CHAT: i64 = 100;

/// A test's bot: token and intake secret (tests/secrets.txt lists them) and its default chat.
pub struct Bot<'a> {
    pub token: &'a str,
    pub intake: &'a str,
    pub chat: i64,
}

/// The `relay:` section every relay config has (charts from the `charts` datasource if given);
/// it ends inside `telegram:`, where `routes:` may follow.
pub fn section(
    dir: &Path,
    port: u16,
    bot: &Bot,
    telegram_url: &str,
    charts: Option<&str>,
) -> String {
    let charts = charts.map_or(String::new(), |url| {
        format!("  chart_datasource: \"{url}\"\n  chart_window: 2m\n")
    });
    format!(
        r#"relay:
  listen: "127.0.0.1:{port}"
  intake_token: "{intake}"
  state_path: "{state}"
{charts}  telegram:
    token: "{token}"
    api_url: "{telegram_url}"
    default_chat: {chat}
"#,
        intake = bot.intake,
        state = dir.join("relay.redb").display(),
        token = bot.token,
        chat = bot.chat,
    )
}

/// A relay-only config (a placeholder detector): [`section`] and `routes` of `team` to a chat.
pub fn config_text(
    dir: &Path,
    port: u16,
    telegram_url: &str,
    token: &str,
    detector: &str,
    routes: &[(String, i64)],
) -> String {
    let bot = Bot {
        token,
        intake: INTAKE,
        chat: DEFAULT_CHAT,
    };
    let routes: String = routes
        .iter()
        .map(|(team, chat)| format!("      - {{ match: {{ team: {team} }}, chat: {chat} }}\n"))
        .collect();
    format!(
        r#"
datasource: {{ url: http://127.0.0.1:1 }}
detectors:
  - {{ name: {detector}, query: up, step: 1m }}
{}    routes:
{routes}"#,
        section(dir, port, &bot, telegram_url, None)
    )
}

/// Posts `body` to the relay's intake with [`INTAKE`], as vmalert does; the status it answers.
pub async fn post(port: u16, body: String) -> reqwest::StatusCode {
    reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/api/v2/alerts"))
        .bearer_auth(INTAKE)
        .body(body)
        .send()
        .await
        .expect("the relay takes alerts")
        .status()
}

/// `mad relay` on `config`, logging to `log`, once it answers on `port`; killed when dropped.
pub async fn start(config: &Path, port: u16, log: PathBuf) -> Process {
    let mut relay = Process::spawn(
        "mad relay",
        Command::new(env!("CARGO_BIN_EXE_mad"))
            .args(["relay", "--config"])
            .arg(config)
            .stdin(Stdio::null()),
        log,
    );
    relay
        .wait_ok(&format!("http://127.0.0.1:{port}/healthz"))
        .await;
    relay
}
