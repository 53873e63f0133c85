//! Delivery from the outbox to Telegram, in order, within Telegram's rate limits.
//!
//! Retry is decided here and only here: a 429 waits exactly `retry_after`, network trouble backs
//! off exponentially and never gives up (the outbox keeps everything meanwhile), and a message
//! Telegram refuses outright (400, 403) is tried a few times, then set aside as a dead letter so
//! it cannot block the queue.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use teloxide::prelude::*;
use teloxide::types::{MessageId, ParseMode, ReplyParameters};
use teloxide::RequestError;
use tokio::sync::{watch, Notify};

use super::message::{Reading, Templates};
use super::outbox::{AlertView, Kind, Outbox, Outgoing};
use super::RelayMetrics;
use crate::chart::ChartData;
use crate::config::Secret;

/// Telegram allows about one message per second per chat…
pub const PER_CHAT_INTERVAL: Duration = Duration::from_millis(1_050);
/// …and about 30 per second per bot.
pub const GLOBAL_INTERVAL: Duration = Duration::from_millis(35);
/// Attempts for a message Telegram refuses (not rate limits, not network trouble).
pub const MAX_REFUSALS: u32 = 5;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Per request; teloxide's default is much longer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How often an idle worker looks at the outbox even without a wake-up.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Pause before asking a failing outbox again: a database restart takes seconds.
const STATE_RETRY: Duration = Duration::from_secs(1);

/// Removes the bot token from text: Telegram puts it in every URL, so errors may carry it.
pub fn redact(text: &str, token: &Secret) -> String {
    let token = token.expose();
    if token.is_empty() {
        text.to_string()
    } else {
        text.replace(token, "<token>")
    }
}

pub fn bot(token: &Secret, api_url: Option<&url::Url>) -> Result<Bot, String> {
    let client = teloxide::net::default_reqwest_settings()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| redact(&e.to_string(), token))?;
    let mut bot = Bot::with_client(token.expose(), client);
    if let Some(url) = api_url {
        bot = bot.set_api_url(url.clone());
    }
    Ok(bot)
}

/// Where charts come from, when the relay draws them.
pub struct Charts {
    pub http: reqwest::Client,
    pub datasource: String,
    /// Seconds of history before the alert started.
    pub window: i64,
    /// Label names that are on alerts but not on MAD's series.
    pub extra_labels: Vec<String>,
}

/// Chart size in pixels: readable on a phone.
const CHART_WIDTH: u32 = 800;
const CHART_HEIGHT: u32 = 480;
/// Points per chart; the step follows from the time range.
const CHART_POINTS: i64 = 240;

/// Alerts of one message whose values are looked up for the text: the rest only name theirs.
const MAX_READINGS: usize = 5;
/// The text must not wait long for a datasource that is slow or down.
const READING_TIMEOUT: Duration = Duration::from_secs(3);
/// vmalert's start of an alert is when its rule first matched; the points that made it match can
/// be a little older.
const READING_LOOKBACK: i64 = 60;

impl Charts {
    /// The alert's series from `before` seconds ahead of its start until now, with the anomaly
    /// window set to the alert's.
    async fn around(&self, alert: &AlertView, before: i64) -> Result<ChartData, String> {
        let mut labels = alert.labels.clone();
        labels.retain(|k, _| !self.extra_labels.contains(k));
        let now = crate::source::unix_now();
        let started = if alert.starts_at > 0 {
            alert.starts_at
        } else {
            now
        };
        let from = started - before;
        let step = ((now - from) / CHART_POINTS).max(1);
        let mut data =
            crate::chart::fetch(&self.http, &self.datasource, &labels, from, now, step).await?;
        data.anomaly_from = started;
        data.anomaly_to = now;
        Ok(data)
    }
}

/// For the first alerts of a firing or reminder message: the most anomalous point of its series
/// since it started, with the band it was expected in. Best effort: what cannot be read is left
/// out of the text.
async fn readings(charts: &Charts, message: &Outgoing) -> HashMap<String, Reading> {
    if message.kind == Kind::Resolved {
        return HashMap::new();
    }
    let lookups = message.alerts.iter().take(MAX_READINGS).map(|alert| async {
        let data = charts
            .around(alert, READING_LOOKBACK)
            .await
            .map_err(|e| tracing::debug!(error = %e, "no reading for the message text"))
            .ok()?;
        let worst = data
            .points
            .iter()
            .filter(|p| p.y.is_some() && p.lower.is_some() && p.upper.is_some())
            .max_by(|a, b| a.score.unwrap_or(0.0).total_cmp(&b.score.unwrap_or(0.0)))
            // A quiet point would tell the reader the wrong story: say nothing instead.
            .filter(|p| p.score.is_some_and(|s| s > 1.0))?;
        Some((
            alert.key.clone(),
            Reading {
                value: worst.y?,
                lower: worst.lower?,
                upper: worst.upper?,
            },
        ))
    });
    tokio::time::timeout(READING_TIMEOUT, futures_util::future::join_all(lookups))
        .await
        .map(|found| found.into_iter().flatten().collect())
        .unwrap_or_default()
}

/// Sends a chart of the first alert of a firing message as a photo replying to it. Best effort:
/// the text has already gone out, a chart that cannot be made is only logged.
async fn send_chart(bot: &Bot, charts: &Charts, message: &Outgoing, reply_to: i32, token: &Secret) {
    let Some(alert) = message.alerts.first() else {
        return;
    };
    // Drawn off the async workers: CPU work on one holds up the tasks queued behind it (the
    // intake, and in a process that also serves, the exporter's /metrics).
    let png = match charts.around(alert, charts.window).await {
        Ok(data) => tokio::task::spawn_blocking(move || {
            crate::chart::render_png(&data, CHART_WIDTH, CHART_HEIGHT)
        })
        .await
        .unwrap_or_else(|e| Err(format!("drawing the chart failed: {e}"))),
        Err(e) => Err(e),
    };
    match png {
        Ok(png) => {
            let photo = teloxide::types::InputFile::memory(png).file_name("anomaly.png");
            let mut reply = ReplyParameters::new(MessageId(reply_to));
            reply.allow_sending_without_reply = Some(true);
            if let Err(e) = bot
                .send_photo(ChatId(message.chat), photo)
                .reply_parameters(reply)
                .await
            {
                tracing::warn!(error = %redact(&e.to_string(), token), "cannot send the chart");
            }
        }
        Err(e) => tracing::warn!(error = %e, "no chart for this alert"),
    }
}

/// What the delivery worker works with.
pub struct Delivery {
    pub outbox: Arc<dyn Outbox>,
    pub templates: Arc<Templates>,
    pub bot: Bot,
    pub token: Secret,
    pub metrics: RelayMetrics,
    pub charts: Option<Charts>,
}

/// Sends outbox messages until `stop` flips; `wake` is notified when intake queued something.
pub async fn deliver(delivery: Delivery, wake: Arc<Notify>, mut stop: watch::Receiver<bool>) {
    let Delivery {
        outbox,
        templates,
        bot,
        token,
        metrics,
        charts,
    } = delivery;
    // A chat waits out its own rate limit or retry_after; the other chats keep going.
    let mut not_before: HashMap<i64, Instant> = HashMap::new();
    let mut last_sent = Instant::now() - GLOBAL_INTERVAL;
    let mut backoff = BACKOFF_MIN;
    let mut refusals: HashMap<u64, u32> = HashMap::new();
    loop {
        if *stop.borrow() {
            return;
        }
        let now = Instant::now();
        let waiting: HashSet<i64> = not_before
            .iter()
            .filter(|(_, t)| **t > now)
            .map(|(chat, _)| *chat)
            .collect();
        let message = match outbox.next_for(&waiting).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                // Everything waiting belongs to chats that must wait: sleep until the first may go.
                let first_ready = not_before.values().filter(|t| **t > now).min().copied();
                let pause = first_ready.map_or(IDLE_POLL, |t| (t - now).min(IDLE_POLL));
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => return,
                }
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the relay outbox");
                tokio::select! {
                    () = tokio::time::sleep(STATE_RETRY) => {}
                    _ = stop.changed() => return,
                }
                continue;
            }
        };
        tokio::time::sleep_until((last_sent + GLOBAL_INTERVAL).into()).await;
        let chat = message.chat.to_string();
        let readings = match &charts {
            Some(charts) => readings(charts, &message).await,
            None => HashMap::new(),
        };
        let started = Instant::now();
        let result = send(&bot, outbox.as_ref(), &templates, &message, &readings).await;
        last_sent = Instant::now();
        not_before.insert(message.chat, last_sent + PER_CHAT_INTERVAL);
        match result {
            Ok(telegram_id) => {
                // Sent: until that is recorded, nothing else is sent, or this message would go
                // out again as the oldest one.
                while let Err(e) = outbox.delivered(&message, telegram_id).await {
                    tracing::error!(error = %e, id = message.id, "sent but cannot record delivery; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(STATE_RETRY) => {}
                        _ = stop.changed() => return,
                    }
                }
                metrics.sent.with_label_values(&[&chat]).inc();
                metrics.latency.observe(started.elapsed().as_secs_f64());
                if let (Some(charts), Kind::Firing) = (&charts, message.kind) {
                    send_chart(&bot, charts, &message, telegram_id, &token).await;
                    not_before.insert(message.chat, Instant::now() + PER_CHAT_INTERVAL);
                }
                refusals.remove(&message.id);
                backoff = BACKOFF_MIN;
            }
            Err(RequestError::RetryAfter(wait)) => {
                metrics.retries.with_label_values(&[&chat]).inc();
                tracing::warn!(chat = %chat, retry_after = wait.seconds(), "Telegram rate limit");
                not_before.insert(message.chat, Instant::now() + wait.duration());
            }
            Err(e @ (RequestError::Api(_) | RequestError::MigrateToChatId(_))) => {
                let tries = refusals.entry(message.id).or_default();
                *tries += 1;
                metrics.retries.with_label_values(&[&chat]).inc();
                let shown = redact(&e.to_string(), &token);
                if *tries >= MAX_REFUSALS {
                    tracing::error!(chat = %chat, id = message.id, error = %shown, "Telegram refuses the message; moved to dead letters");
                    metrics.failed.with_label_values(&[&chat]).inc();
                    refusals.remove(&message.id);
                    if let Err(e) = outbox.give_up(&message).await {
                        tracing::error!(error = %e, "cannot move the message to dead letters");
                    }
                } else {
                    tracing::warn!(chat = %chat, error = %shown, "Telegram refused the message; will retry");
                    not_before.insert(message.chat, Instant::now() + backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
            Err(e) => {
                metrics.retries.with_label_values(&[&chat]).inc();
                metrics.failed.with_label_values(&[&chat]).inc();
                tracing::warn!(chat = %chat, error = %redact(&e.to_string(), &token), ?backoff, "cannot reach Telegram; will retry");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

async fn send(
    bot: &Bot,
    outbox: &dyn Outbox,
    templates: &Templates,
    message: &Outgoing,
    readings: &HashMap<String, Reading>,
) -> Result<i32, RequestError> {
    let mut request = bot
        .send_message(ChatId(message.chat), templates.render(message, readings))
        .parse_mode(ParseMode::Html);
    if message.kind == Kind::Firing {
        request = request.reply_markup(super::bot::firing_buttons());
    } else {
        if let Ok(Some(target)) = outbox.reply_target(message).await {
            let mut reply = ReplyParameters::new(MessageId(target));
            // Still send if the original message was deleted in the chat.
            reply.allow_sending_without_reply = Some(true);
            request = request.reply_parameters(reply);
        }
    }
    request.await.map(|sent| sent.id.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_redacted() {
        let token = Secret::new("123:ABC");
        assert_eq!(
            redact(
                "error sending request for url (https://api.telegram.org/bot123:ABC/SendMessage)",
                &token
            ),
            "error sending request for url (https://api.telegram.org/bot<token>/SendMessage)"
        );
        assert_eq!(redact("x", &Secret::new("")), "x");
    }
}
