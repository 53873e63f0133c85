//! Delivery from the outbox to Telegram, in order, within Telegram's rate limits.
//!
//! Retry is decided here and only here: a 429 waits exactly `retry_after`, network trouble backs
//! off exponentially and never gives up (the outbox keeps everything meanwhile), and a message
//! Telegram refuses outright (400, 403) is tried a few times, then set aside as a dead letter so
//! it cannot block the queue.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use teloxide::prelude::*;
use teloxide::types::{MessageId, ParseMode, ReplyParameters};
use teloxide::RequestError;
use tokio::sync::{watch, Notify};

use super::message::Templates;
use super::outbox::{Kind, Outbox, Outgoing};
use super::RelayMetrics;
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

/// Sends a chart of the first alert of a firing message as a photo replying to it. Best effort:
/// the text has already gone out, a chart that cannot be made is only logged.
async fn send_chart(bot: &Bot, charts: &Charts, message: &Outgoing, reply_to: i32, token: &Secret) {
    let Some(alert) = message.alerts.first() else {
        return;
    };
    let mut labels = alert.labels.clone();
    labels.retain(|k, _| !charts.extra_labels.contains(k));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let started = if alert.starts_at > 0 {
        alert.starts_at
    } else {
        now
    };
    let from = started - charts.window;
    let step = ((now - from) / CHART_POINTS).max(1);
    let data =
        super::chart::fetch(&charts.http, &charts.datasource, &labels, from, now, step).await;
    let png = data.and_then(|mut d| {
        d.anomaly_from = started;
        d.anomaly_to = now;
        super::chart::render_png(&d, CHART_WIDTH, CHART_HEIGHT)
    });
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
    pub outbox: Arc<Outbox>,
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
        let message = match outbox.next_for(|chat| not_before.get(&chat).is_none_or(|t| *t <= now))
        {
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
                tokio::time::sleep(BACKOFF_MAX).await;
                continue;
            }
        };
        tokio::time::sleep_until((last_sent + GLOBAL_INTERVAL).into()).await;
        let chat = message.chat.to_string();
        let started = Instant::now();
        let result = send(&bot, &outbox, &templates, &message).await;
        last_sent = Instant::now();
        not_before.insert(message.chat, last_sent + PER_CHAT_INTERVAL);
        match result {
            Ok(telegram_id) => {
                if let Err(e) = outbox.delivered(&message, telegram_id) {
                    // Sent but not recorded: it would be sent again after a restart. Say so.
                    tracing::error!(error = %e, id = message.id, "sent but cannot record delivery");
                    tokio::time::sleep(BACKOFF_MIN).await;
                    continue;
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
                    if let Err(e) = outbox.give_up(&message) {
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
    outbox: &Outbox,
    templates: &Templates,
    message: &Outgoing,
) -> Result<i32, RequestError> {
    let mut request = bot
        .send_message(ChatId(message.chat), templates.render(message))
        .parse_mode(ParseMode::Html);
    if message.kind == Kind::Firing {
        request = request.reply_markup(super::bot::firing_buttons());
    } else {
        if let Ok(Some(target)) = outbox.reply_target(message) {
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
