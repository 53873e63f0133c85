//! Acting from the chat: the buttons under a firing message (silence this series for 1 h or
//! 24 h, acknowledge) and the `/silences` and `/unsilence ID` commands. Only configured chats,
//! and configured admins when there are any, may act.

use std::sync::Arc;
use std::time::Duration;

use teloxide::prelude::*;
use teloxide::types::{
    CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Message, ParseMode, UpdateKind, User,
};
use tokio::sync::watch;

use super::message::{escape, Templates};
use super::outbox::{Kind, Outbox, Outgoing};
use super::silences::series_matchers;
use super::telegram::redact;
use crate::config::{Secret, Telegram};
use crate::source::unix_now;

/// Long-poll wait per getUpdates call.
const LONG_POLL_SECS: u32 = 20;
const ERROR_PAUSE: Duration = Duration::from_secs(5);
const SILENCE_1H: &str = "silence:3600";
const SILENCE_24H: &str = "silence:86400";
const ACK: &str = "ack";

/// The buttons under a firing message.
pub fn firing_buttons() -> InlineKeyboardMarkup {
    InlineKeyboardMarkup::new(vec![vec![
        InlineKeyboardButton::callback("🔕 Silence 1 h", SILENCE_1H),
        InlineKeyboardButton::callback("🔕 24 h", SILENCE_24H),
        InlineKeyboardButton::callback("👍 Ack", ACK),
    ]])
}

fn who(user: &User) -> String {
    user.username
        .as_ref()
        .map_or_else(|| user.full_name(), |u| format!("@{u}"))
}

/// Reads updates until `stop`; the offset is kept in the outbox's database.
pub async fn handle_updates(
    bot: Bot,
    outbox: Arc<dyn Outbox>,
    templates: Arc<Templates>,
    settings: Telegram,
    token: Secret,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let offset = outbox.update_offset().await.unwrap_or_default();
        let request = bot
            .get_updates()
            .offset(offset as i32)
            .timeout(LONG_POLL_SECS);
        let updates = tokio::select! {
            r = request.send() => r,
            _ = stop.changed() => return,
        };
        let updates = match updates {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %redact(&e.to_string(), &token), "cannot read Telegram updates");
                tokio::select! {
                    () = tokio::time::sleep(ERROR_PAUSE) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        for update in updates {
            match update.kind {
                UpdateKind::CallbackQuery(q) => {
                    on_button(&bot, outbox.as_ref(), &templates, &settings, q).await
                }
                UpdateKind::Message(m) => on_message(&bot, outbox.as_ref(), &settings, m).await,
                _ => {}
            }
            if let Err(e) = outbox.set_update_offset(u64::from(update.id.0) + 1).await {
                tracing::error!(error = %e, "cannot record the Telegram update offset");
            }
        }
    }
}

fn allowed(settings: &Telegram, chat: i64, user: Option<&User>) -> bool {
    settings.chats().contains(&chat)
        && (settings.admins.is_empty() || user.is_some_and(|u| settings.admins.contains(&u.id.0)))
}

async fn on_button(
    bot: &Bot,
    outbox: &dyn Outbox,
    templates: &Templates,
    settings: &Telegram,
    q: CallbackQuery,
) {
    let Some(message) = q.message.as_ref() else {
        return;
    };
    let (chat, message_id) = (message.chat().id.0, message.id());
    let answer = |text: String| bot.answer_callback_query(q.id.clone()).text(text);
    if !allowed(settings, chat, Some(&q.from)) {
        let _ = answer("You may not act on these alerts.".into()).await;
        return;
    }
    let alerts = outbox
        .alerts_of_message(chat, message_id.0)
        .await
        .unwrap_or_default();
    let by = who(&q.from);
    let note = match q.data.as_deref() {
        Some(d @ (SILENCE_1H | SILENCE_24H)) => {
            let secs: i64 = d.trim_start_matches("silence:").parse().unwrap_or(3600);
            let until = unix_now() + secs;
            for alert in &alerts {
                if let Err(e) = outbox
                    .add_silence(series_matchers(&alert.labels), until, &by, unix_now())
                    .await
                {
                    tracing::error!(error = %e, "cannot store a silence");
                }
            }
            format!("🔕 Silenced for {} h by {}", secs / 3600, escape(&by))
        }
        Some(ACK) => format!("👍 Acknowledged by {}", escape(&by)),
        _ => return,
    };
    tracing::info!(chat, by = %by, action = %note, "alert action");
    let _ = answer(note.clone()).await;
    if !alerts.is_empty() {
        let original = Outgoing {
            id: 0,
            chat,
            kind: Kind::Firing,
            alerts,
            queued_at: 0,
        };
        let text = format!(
            "{}\n{note}",
            templates.render(&original, &Default::default())
        );
        let _ = bot
            .edit_message_text(ChatId(chat), message_id, text)
            .parse_mode(ParseMode::Html)
            .reply_markup(firing_buttons())
            .await;
    }
}

async fn on_message(bot: &Bot, outbox: &dyn Outbox, settings: &Telegram, m: Message) {
    let Some(text) = m.text() else {
        return;
    };
    let chat = m.chat.id.0;
    let command = text.split_whitespace().next().unwrap_or_default();
    let command = command.split('@').next().unwrap_or_default();
    if !matches!(command, "/silences" | "/unsilence") {
        return;
    }
    let reply = if !allowed(settings, chat, m.from.as_ref()) {
        "You may not manage silences here.".to_string()
    } else if command == "/silences" {
        match outbox.silences(unix_now()).await {
            Ok(list) if list.is_empty() => "No active silences.".to_string(),
            Ok(list) => list
                .iter()
                .map(|s| {
                    let labels: Vec<String> =
                        s.matchers.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    let left = (s.until - unix_now()).max(0) / 60;
                    format!(
                        "#{} <code>{}</code> by {} ({left} min left)",
                        s.id,
                        escape(&labels.join(", ")),
                        escape(&s.by)
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
            Err(e) => format!("Cannot read silences: {}", escape(&e.to_string())),
        }
    } else {
        match text
            .split_whitespace()
            .nth(1)
            .and_then(|id| id.trim_start_matches('#').parse::<u64>().ok())
        {
            None => "Usage: /unsilence ID (see /silences)".to_string(),
            Some(id) => match outbox.remove_silence(id).await {
                Ok(true) => format!("Silence #{id} removed."),
                Ok(false) => format!("No silence #{id}."),
                Err(e) => format!("Cannot remove it: {}", escape(&e.to_string())),
            },
        }
    };
    let _ = bot
        .send_message(m.chat.id, reply)
        .parse_mode(ParseMode::Html)
        .await;
}
