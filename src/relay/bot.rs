//! Acting from the chat: the buttons under a firing message (silence this series for 1 h or
//! 24 h, acknowledge) and the `/silences` and `/unsilence ID` commands. Only configured chats,
//! and configured admins when there are any, may act.

use std::sync::Arc;
use std::time::Duration;

use teloxide::prelude::*;
use teloxide::types::{
    CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Message, ParseMode, Update,
    UpdateKind, User,
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
/// How much longer than the long poll a getUpdates request may take.
const POLL_SLACK: Duration = Duration::from_secs(10);
/// The update kinds the bot acts on: the only ones asked for, and the only ones parsed.
const WANTED_UPDATES: [&str; 2] = ["message", "callback_query"];
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

/// What a button under a firing message asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ButtonAction {
    Silence { secs: i64 },
    Ack,
}

/// The action of a button's callback data; `None` for data the relay did not send.
pub fn button_action(data: Option<&str>) -> Option<ButtonAction> {
    match data {
        Some(d @ (SILENCE_1H | SILENCE_24H)) => Some(ButtonAction::Silence {
            secs: d.trim_start_matches("silence:").parse().unwrap_or(3600),
        }),
        Some(ACK) => Some(ButtonAction::Ack),
        _ => None,
    }
}

/// A chat command the relay answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Silences,
    /// `/unsilence ID`; `None` when the ID is missing or not a number.
    Unsilence(Option<u64>),
}

/// The command a message's text gives, if it is one of ours (`/cmd@bot` included).
pub fn command(text: &str) -> Option<Command> {
    let word = text.split_whitespace().next().unwrap_or_default();
    match word.split('@').next().unwrap_or_default() {
        "/silences" => Some(Command::Silences),
        "/unsilence" => {
            Some(Command::Unsilence(text.split_whitespace().nth(1).and_then(
                |id| id.trim_start_matches('#').parse::<u64>().ok(),
            )))
        }
        _ => None,
    }
}

/// How a user is named in notes: `@username`, else the full name.
pub fn who(user: &User) -> String {
    user.username
        .as_ref()
        .map_or_else(|| user.full_name(), |u| format!("@{u}"))
}

/// One `getUpdates` answer, read.
#[derive(Debug, Default)]
pub struct Updates {
    /// The updates the bot acts on, in order.
    pub updates: Vec<Update>,
    /// The offset past every update of the answer, those skipped included.
    pub next_offset: Option<u64>,
    /// Updates left out: kinds the bot does not act on, or that teloxide cannot parse.
    pub skipped: usize,
}

/// Reads a `getUpdates` answer (`{"ok": true, "result": [...]}`). Each update is parsed on its
/// own, and only if it is a message or a button press, so that one update teloxide cannot read is
/// skipped instead of failing the batch forever: teloxide-core 0.13 even panics on a
/// `message_reaction` update without `user` or `actor_chat` (found by the `telegram_update` fuzz
/// target).
pub fn parse_updates(body: &[u8]) -> Result<Updates, String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        ok: bool,
        #[serde(default)]
        result: Vec<serde_json::Value>,
        #[serde(default)]
        description: Option<String>,
    }
    let answer: Answer =
        serde_json::from_slice(body).map_err(|e| format!("unexpected getUpdates answer: {e}"))?;
    if !answer.ok {
        return Err(format!(
            "getUpdates refused: {}",
            answer.description.as_deref().unwrap_or("(no description)")
        ));
    }
    let mut read = Updates::default();
    for raw in answer.result {
        let id = raw.get("update_id").and_then(serde_json::Value::as_u64);
        if let Some(id) = id {
            read.next_offset = read.next_offset.max(Some(id.saturating_add(1)));
        }
        let wanted = raw.as_object().is_some_and(|fields| {
            let mut kinds = fields.keys().filter(|k| *k != "update_id");
            kinds
                .next()
                .is_some_and(|k| WANTED_UPDATES.contains(&k.as_str()))
                && kinds.next().is_none()
        });
        if !wanted {
            read.skipped += 1;
            continue;
        }
        // From text, not from the `Value`: teloxide's `UpdateKind` reads its key as a borrowed
        // string and finds no kind in an owned one.
        match serde_json::from_str::<Update>(&raw.to_string()) {
            Ok(update) => read.updates.push(update),
            Err(_) => read.skipped += 1,
        }
    }
    Ok(read)
}

/// One long poll: `getUpdates` from `offset`, for the wanted kinds only.
async fn get_updates(bot: &Bot, offset: u64) -> Result<Updates, String> {
    let mut url = bot.api_url();
    url.path_segments_mut()
        .map_err(|()| "the Telegram API URL cannot take a path".to_string())?
        .push(&format!("bot{}", bot.token()))
        .push("getUpdates");
    let response = bot
        .client()
        .post(url)
        .json(&serde_json::json!({
            "offset": offset,
            "timeout": LONG_POLL_SECS,
            "allowed_updates": WANTED_UPDATES,
        }))
        .timeout(Duration::from_secs(u64::from(LONG_POLL_SECS)) + POLL_SLACK)
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    let body = response
        .bytes()
        .await
        .map_err(|e| e.without_url().to_string())?;
    parse_updates(&body)
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
        let answer = tokio::select! {
            r = get_updates(&bot, offset) => r,
            _ = stop.changed() => return,
        };
        let batch = match answer {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %redact(&e, &token), "cannot read Telegram updates");
                tokio::select! {
                    () = tokio::time::sleep(ERROR_PAUSE) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        if batch.skipped > 0 {
            tracing::warn!(
                skipped = batch.skipped,
                "skipped Telegram updates that are not messages or button presses, or unreadable"
            );
        }
        let mut recorded = offset;
        for update in batch.updates {
            recorded = u64::from(update.id.0) + 1;
            match update.kind {
                UpdateKind::CallbackQuery(q) => {
                    on_button(&bot, outbox.as_ref(), &templates, &settings, q).await
                }
                UpdateKind::Message(m) => on_message(&bot, outbox.as_ref(), &settings, m).await,
                _ => {}
            }
            if let Err(e) = outbox.set_update_offset(recorded).await {
                tracing::error!(error = %e, "cannot record the Telegram update offset");
            }
        }
        // Past the skipped updates too, or they would come back on every poll.
        if let Some(next) = batch.next_offset.filter(|&n| n > recorded) {
            if let Err(e) = outbox.set_update_offset(next).await {
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
    let note = match button_action(q.data.as_deref()) {
        Some(ButtonAction::Silence { secs }) => {
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
        Some(ButtonAction::Ack) => format!("👍 Acknowledged by {}", escape(&by)),
        None => return,
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
    let Some(command) = command(text) else {
        return;
    };
    let reply = if !allowed(settings, chat, m.from.as_ref()) {
        "You may not manage silences here.".to_string()
    } else if let Command::Unsilence(id) = command {
        match id {
            None => "Usage: /unsilence ID (see /silences)".to_string(),
            Some(id) => match outbox.remove_silence(id).await {
                Ok(true) => format!("Silence #{id} removed."),
                Ok(false) => format!("No silence #{id}."),
                Err(e) => format!("Cannot remove it: {}", escape(&e.to_string())),
            },
        }
    } else {
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
    };
    let _ = bot
        .send_message(m.chat.id, reply)
        .parse_mode(ParseMode::Html)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_messages_and_buttons_and_skips_the_rest() {
        let body = br#"{"ok":true,"result":[
            {"update_id":7,"callback_query":{"id":"q","chat_instance":"ci","data":"ack",
             "from":{"id":7,"is_bot":false,"first_name":"Ann"},
             "message":{"message_id":5,"date":1700000000,
             "chat":{"id":100,"type":"private"},"text":"alert"}}},
            {"update_id":8,"message_reaction":{"chat":{"id":1,"type":"private"},"message_id":1,
             "date":1,"old_reaction":[],"new_reaction":[]}},
            {"update_id":9,"message":{"message_id":6,"date":1700000000,
             "chat":{"id":100,"type":"private"},"text":"/unsilence@mad_bot #3"}}]}"#;
        let read = parse_updates(body).expect("parses");
        assert_eq!(
            (read.updates.len(), read.skipped, read.next_offset),
            (2, 1, Some(10))
        );
        match &read.updates[0].kind {
            UpdateKind::CallbackQuery(q) => {
                assert_eq!(button_action(q.data.as_deref()), Some(ButtonAction::Ack));
            }
            other => panic!("not a button press: {other:?}"),
        }
        match &read.updates[1].kind {
            UpdateKind::Message(m) => {
                assert_eq!(
                    m.text().and_then(command),
                    Some(Command::Unsilence(Some(3)))
                );
            }
            other => panic!("not a message: {other:?}"),
        }
        let refused = br#"{"ok":false,"error_code":401,"description":"Unauthorized"}"#;
        assert!(parse_updates(refused).unwrap_err().contains("Unauthorized"));
        assert_eq!(
            button_action(Some("silence:86400")),
            Some(ButtonAction::Silence { secs: 86_400 })
        );
        assert_eq!(command("/silences@mad_bot"), Some(Command::Silences));
        assert_eq!(command("/unsilence x"), Some(Command::Unsilence(None)));
        assert_eq!(command("hello"), None);
    }
}
