//! `mad relay`: alerts from vmalert (or Alertmanager) to Telegram, nothing lost, nothing doubled.
//!
//! ```text
//! POST /api/v2/alerts ──> intake (parse, authenticate) ──> outbox (PostgreSQL or redb: dedupe +
//!                                                            queue, committed before the 2xx)
//!                         chat <── telegram (send in order, rate limits, retry) <──┘
//! ```
//! The same endpoint takes vmalert's bare array and Alertmanager's webhook object, so the relay
//! works behind either.

mod bot;
mod intake;
mod message;
mod outbox;
mod silences;
mod telegram;

use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use tokio::sync::{watch, Notify};

pub use bot::{
    button_action, command as chat_command, parse_updates, who as user_name, ButtonAction, Command,
    Updates,
};
pub use intake::{parse as parse_alerts, Alert, MAX_BODY_BYTES};
pub use message::{escape as escape_html, Templates, MAX_MESSAGE_CHARS};
pub use outbox::{
    open as open_outbox, Accepted, AlertView, EmbeddedOutbox, Kind, Outbox, OutboxError, Outgoing,
    PgOutbox, Routed,
};
pub use silences::{series_matchers, Silence};
pub use telegram::redact;

use crate::config::{constant_time_eq, Config, Relay, Secret};
use crate::expose::{serve_http, ApiHandler, Probes};
use crate::source::unix_now;

/// The relay's own metrics (`/metrics` on the relay's listen address).
#[derive(Clone)]
pub struct RelayMetrics {
    registry: Registry,
    pub received: IntCounter,
    pub deduplicated: IntCounter,
    pub rejected: IntCounter,
    pub queued: IntGauge,
    pub queue_age: IntGauge,
    pub sent: IntCounterVec,
    pub failed: IntCounterVec,
    pub retries: IntCounterVec,
    pub latency: Histogram,
}

impl RelayMetrics {
    fn new() -> Result<RelayMetrics, prometheus::Error> {
        let by_chat = |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["chat"]);
        let m = RelayMetrics {
            registry: Registry::new(),
            received: IntCounter::new(
                "mad_relay_received_total",
                "Alerts received (repeats included).",
            )?,
            deduplicated: IntCounter::new(
                "mad_relay_deduplicated_total",
                "Alerts received that changed nothing and sent nothing.",
            )?,
            rejected: IntCounter::new(
                "mad_relay_rejected_total",
                "Intake requests refused (bad body or auth).",
            )?,
            queued: IntGauge::new("mad_relay_queued", "Messages in the outbox.")?,
            queue_age: IntGauge::new(
                "mad_relay_queue_oldest_age_seconds",
                "Age of the oldest message in the outbox (0 when empty).",
            )?,
            sent: by_chat(
                "mad_relay_sent_total",
                "Messages Telegram accepted, by chat.",
            )?,
            failed: by_chat(
                "mad_relay_failed_total",
                "Failed send attempts and dead letters, by chat.",
            )?,
            retries: by_chat(
                "mad_relay_retries_total",
                "Send attempts repeated (rate limits, errors), by chat.",
            )?,
            latency: Histogram::with_opts(HistogramOpts::new(
                "mad_relay_send_duration_seconds",
                "Time of one successful Telegram request.",
            ))?,
        };
        for c in [&m.received, &m.deduplicated, &m.rejected] {
            m.registry.register(Box::new(c.clone()))?;
        }
        for g in [&m.queued, &m.queue_age] {
            m.registry.register(Box::new(g.clone()))?;
        }
        for v in [&m.sent, &m.failed, &m.retries] {
            m.registry.register(Box::new(v.clone()))?;
        }
        m.registry.register(Box::new(m.latency.clone()))?;
        Ok(m)
    }
}

/// Intake, metrics and probes, behind the exporter's HTTP server.
struct RelayHttp {
    settings: Relay,
    outbox: Arc<dyn Outbox>,
    metrics: RelayMetrics,
    wake: Arc<Notify>,
    /// Why the outbox cannot be read, as of the last [`watch_backlog`] pass.
    state_ok: watch::Receiver<Result<(), String>>,
}

/// How often the queue gauges and readiness are refreshed from the outbox.
const BACKLOG_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Keeps the queue gauges and readiness current: scrapes and probes must not wait on a database.
async fn watch_backlog(
    outbox: Arc<dyn Outbox>,
    metrics: RelayMetrics,
    state: watch::Sender<Result<(), String>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let result = outbox.backlog().await;
        match &result {
            Ok((len, oldest)) => {
                metrics.queued.set(*len as i64);
                metrics
                    .queue_age
                    .set(oldest.map_or(0, |t| (unix_now() - t).max(0)));
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the relay outbox"),
        }
        let _previous = state.send_replace(result.map(|_| ()).map_err(|e| e.to_string()));
        tokio::select! {
            () = tokio::time::sleep(BACKLOG_POLL) => {}
            _ = stop.changed() => return,
        }
    }
}

impl Probes for RelayHttp {
    fn metrics(&self) -> Vec<Bytes> {
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.metrics.registry.gather(), &mut buf);
        vec![Bytes::from(buf)]
    }

    fn ready(&self) -> Result<(), String> {
        match *self.state_ok.borrow() {
            Ok(()) => Ok(()),
            Err(ref e) => Err(e.clone()),
        }
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

impl RelayHttp {
    /// Bearer token, basic auth or both, as configured; any configured one suffices. The relay
    /// does not start with neither (`require_intake_auth`).
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let header = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let token = self.settings.intake_token.as_ref();
        let basic = self.settings.intake_basic_auth.as_ref();
        let bearer_ok = token.is_some_and(|t| {
            header
                .strip_prefix("Bearer ")
                .is_some_and(|given| t.matches(given.as_bytes()))
        });
        let basic_ok = basic.is_some_and(|b| {
            let expected = format!("{}:{}", b.username, b.password.expose());
            header
                .strip_prefix("Basic ")
                .and_then(|encoded| BASE64.decode(encoded.trim()).ok())
                .is_some_and(|given| constant_time_eq(&given, expected.as_bytes()))
        });
        bearer_ok || basic_ok
    }

    fn refuse(&self, status: StatusCode, error: String) -> Response<Full<Bytes>> {
        self.metrics.rejected.inc();
        tracing::warn!(%status, %error, "alert intake refused");
        reply(status, serde_json::json!({ "error": error }))
    }
}

#[async_trait]
impl ApiHandler for RelayHttp {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() != "/api/v2/alerts" {
            return reply(
                StatusCode::NOT_FOUND,
                serde_json::json!({ "error": "not found; alerts go to POST /api/v2/alerts" }),
            );
        }
        if req.method() != Method::POST {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({ "error": "use POST" }),
            );
        }
        if !self.authorized(&req) {
            return self.refuse(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token".into(),
            );
        }
        let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return self.refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("body not read: {e} (limit {MAX_BODY_BYTES} bytes)"),
                );
            }
        };
        let now = unix_now();
        let alerts = match parse_alerts(&body, now) {
            Ok(a) => a,
            Err(e) => return self.refuse(StatusCode::BAD_REQUEST, e),
        };
        let telegram = &self.settings.telegram;
        let routed = alerts
            .into_iter()
            .map(|alert| Routed {
                chat: telegram.chat_for(&alert.labels),
                alert,
            })
            .collect();
        let renotify = self.settings.renotify.map(|d| d.0.as_secs() as i64);
        match self.outbox.accept(routed, now, renotify).await {
            Ok(a) => {
                self.metrics.received.inc_by(a.received as u64);
                self.metrics.deduplicated.inc_by(a.duplicates as u64);
                if a.queued_messages > 0 {
                    self.wake.notify_one();
                }
                reply(
                    StatusCode::OK,
                    serde_json::json!({ "received": a.received, "queued_messages": a.queued_messages }),
                )
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot store alerts");
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({ "error": "cannot store alerts; retry" }),
                )
            }
        }
    }
}

/// Runs the relay until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut settings = config
        .relay
        .clone()
        .context("the config has no relay: section")?;
    settings
        .require_intake_auth(|name| std::env::var(name).ok())
        .map_err(|e| anyhow::anyhow!(e))?;
    let token: Secret = settings.telegram.token().map_err(|e| anyhow::anyhow!(e))?;
    let api_url = settings.telegram.api_url.as_ref().map(|u| &u.0);
    let bot = telegram::bot(&token, api_url).map_err(|e| anyhow::anyhow!(e))?;
    let templates = Arc::new(
        Templates::new(
            settings.templates.header.as_deref(),
            settings.templates.alert.as_deref(),
        )
        .map_err(|e| anyhow::anyhow!(e))?,
    );
    let outbox = outbox::open(&config.store, &settings.state_path).await?;
    let metrics = RelayMetrics::new().context("cannot set up relay metrics")?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let wake = Arc::new(Notify::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let updates = tokio::spawn(bot::handle_updates(
        bot.clone(),
        outbox.clone(),
        templates.clone(),
        settings.telegram.clone(),
        token.clone(),
        stop_rx.clone(),
    ));
    let charts = settings
        .chart_datasource
        .as_ref()
        .map(|url| telegram::Charts {
            http: reqwest::Client::new(),
            datasource: url.0.as_str().trim_end_matches('/').to_string(),
            window: settings.chart_window.0.as_secs() as i64,
            // A detector's extra alert labels are on the alert, not on the scored series.
            extra_labels: config
                .detectors
                .iter()
                .flat_map(|d| d.alert.labels.keys().map(|k| k.0.clone()))
                .collect(),
        });
    let worker = tokio::spawn(telegram::deliver(
        telegram::Delivery {
            outbox: outbox.clone(),
            templates,
            bot,
            token,
            metrics: metrics.clone(),
            charts,
        },
        wake.clone(),
        stop_rx.clone(),
    ));
    let (state_tx, state_ok) = watch::channel(Ok(()));
    let backlog = tokio::spawn(watch_backlog(
        outbox.clone(),
        metrics.clone(),
        state_tx,
        stop_rx.clone(),
    ));
    let http = Arc::new(RelayHttp {
        settings: settings.clone(),
        outbox,
        metrics,
        wake,
        state_ok,
    });
    tracing::info!(listen = %settings.listen, "relay accepting alerts on /api/v2/alerts");
    serve_http(
        listener,
        http.clone(),
        Some(http as Arc<dyn ApiHandler>),
        shutdown,
    )
    .await;
    let _ = stop_tx.send(true);
    let _ = worker.await;
    let _ = updates.await;
    let _ = backlog.await;
    Ok(())
}
