//! `relay:`: where `mad relay` takes alerts in and which Telegram chats they go to. Its
//! secrets come from environment variables, never from the file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::values::{BasicAuth, Duration, HttpUrl, Secret};

/// The alert relay: intake, durable outbox, Telegram delivery.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Relay {
    #[serde(default = "default_relay_listen")]
    pub listen: SocketAddr,
    /// Bearer token intake requests must carry (vmalert `-notifier.bearerToken`,
    /// Alertmanager `http_config.authorization`); or [`RELAY_INTAKE_TOKEN_ENV`]. The relay
    /// refuses to start with neither this nor `intake_basic_auth`.
    #[serde(default)]
    pub intake_token: Option<Secret>,
    /// Basic auth intake requests must carry instead (vmalert `-notifier.basicAuth.*`).
    #[serde(default)]
    pub intake_basic_auth: Option<BasicAuth>,
    /// The embedded outbox and alert state (redb file).
    #[serde(default = "default_relay_state")]
    pub state_path: PathBuf,
    /// Send a reminder for an alert still firing after this long; none: never.
    #[serde(default)]
    pub renotify: Option<Duration>,
    /// Where the relay reads MAD's series to draw a chart under each firing message (the TSDB
    /// that scrapes `mad serve`); none: text only.
    #[serde(default)]
    pub chart_datasource: Option<HttpUrl>,
    /// Message templates (minijinja / Jinja2 syntax; values are HTML-escaped); defaults when unset.
    #[serde(default)]
    pub templates: RelayTemplates,
    /// How much history the chart shows before the alert started.
    #[serde(default = "default_chart_window")]
    pub chart_window: Duration,
    pub telegram: Telegram,
}

/// The intake's bearer token when `relay.intake_token` is not in the file (a Kubernetes
/// Secret by reference).
pub const RELAY_INTAKE_TOKEN_ENV: &str = "MAD_RELAY_INTAKE_TOKEN";

impl Relay {
    /// Takes the intake token from `var(RELAY_INTAKE_TOKEN_ENV)` when the file has none, and
    /// refuses a relay whose intake would take alerts from anyone: whoever can post there can
    /// write into the team's chat.
    pub fn require_intake_auth(
        &mut self,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<(), String> {
        // A blank token in the file is no credential, and must not hide the environment's.
        self.intake_token = self
            .intake_token
            .take()
            .filter(|t| !t.expose().trim().is_empty())
            .map(|t| Secret::new(t.expose().trim()));
        if self.intake_token.is_none() {
            self.intake_token = var(RELAY_INTAKE_TOKEN_ENV)
                .filter(|t| !t.trim().is_empty())
                .map(|t| Secret::new(t.trim()));
        }
        if self.intake_token.is_none() && self.intake_basic_auth.is_none() {
            return Err(format!(
                "the relay's intake has no credentials: set relay.intake_token (or \
                 {RELAY_INTAKE_TOKEN_ENV} in the environment) or relay.intake_basic_auth, and \
                 send it from vmalert (-notifier.bearerToken) or Alertmanager \
                 (http_config.authorization)"
            ));
        }
        Ok(())
    }
}

/// See `relay::message` for the variables: header gets `kind` and `count`; alert gets
/// `alertname`, `detector`, `severity`, `since`, `series`, `summary`, `description`, `link`,
/// `labels` and `annotations`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayTemplates {
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub alert: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Telegram {
    /// The bot token; or `token_file`; or the `MAD_TELEGRAM_TOKEN` environment variable.
    #[serde(default)]
    pub token: Option<Secret>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Bot API base URL (tests and proxies); default Telegram's.
    #[serde(default)]
    pub api_url: Option<HttpUrl>,
    /// Chat for alerts no route matches.
    pub default_chat: i64,
    /// First matching route wins: every label in `match` must equal the alert's.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Telegram user ids allowed to silence and acknowledge; empty: anyone in a configured chat.
    #[serde(default)]
    pub admins: Vec<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(rename = "match")]
    pub matchers: BTreeMap<String, String>,
    pub chat: i64,
}

/// Environment variable holding the bot token when neither `token` nor `token_file` is set.
pub const TELEGRAM_TOKEN_ENV: &str = "MAD_TELEGRAM_TOKEN";

impl Telegram {
    /// The bot token from the config, its file, or the environment, in that order.
    pub fn token(&self) -> Result<Secret, String> {
        // Trimmed wherever it comes from: a trailing newline from `echo` or a file would be
        // sent percent-encoded in the URL path and fail every call.
        if let Some(t) = &self.token {
            return Ok(Secret::new(t.expose().trim()));
        }
        if let Some(path) = &self.token_file {
            return std::fs::read_to_string(path)
                .map(|t| Secret::new(t.trim()))
                .map_err(|e| {
                    format!(
                        "cannot read relay.telegram.token_file {}: {e}",
                        path.display()
                    )
                });
        }
        std::env::var(TELEGRAM_TOKEN_ENV)
            .map(|t| Secret::new(t.trim()))
            .map_err(|_| {
                format!(
                    "no bot token: set relay.telegram.token, token_file or {TELEGRAM_TOKEN_ENV}"
                )
            })
    }

    /// Chats the relay posts to; only they may act on alerts.
    pub fn chats(&self) -> Vec<i64> {
        let mut chats: Vec<i64> = self.routes.iter().map(|r| r.chat).collect();
        chats.push(self.default_chat);
        chats.sort_unstable();
        chats.dedup();
        chats
    }

    /// The chat an alert with these labels goes to.
    pub fn chat_for(&self, labels: &BTreeMap<String, String>) -> i64 {
        self.routes
            .iter()
            .find(|r| r.matchers.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .map_or(self.default_chat, |r| r.chat)
    }
}

fn default_relay_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9465))
}

fn default_chart_window() -> Duration {
    Duration(std::time::Duration::from_secs(3600))
}

fn default_relay_state() -> PathBuf {
    PathBuf::from("relay-state.redb")
}
