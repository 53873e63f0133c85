//! The relay's durable state in an embedded database (redb): what each alert last said, and the
//! messages still to send.
//!
//! An intake request is answered only after its transaction has committed (redb syncs on commit),
//! so an accepted alert survives a crash; a message leaves the outbox only after Telegram has
//! taken it, so after a restart delivery resumes where it stopped. Deduplication happens in the
//! same transaction: a repeat of an alert in the state already notified queues nothing.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::intake::Alert;

const ALERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("alerts");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// Active and expired silences, by id.
pub(super) const SILENCES: TableDefinition<u64, &[u8]> = TableDefinition::new("silences");
/// Alerts of each firing message Telegram took, by "chat:message_id": buttons act on them.
pub(super) const SENT: TableDefinition<&str, &[u8]> = TableDefinition::new("sent");
/// Small counters: the next Telegram update to read.
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

#[derive(Debug, thiserror::Error)]
#[error("relay state {path}: {message}")]
pub struct OutboxError {
    path: String,
    message: String,
}

/// What the relay remembers about one alert.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct AlertRecord {
    firing: bool,
    /// When the last message about it was queued (Unix seconds).
    notified_at: i64,
    /// The Telegram message that announced the current firing: resolutions reply to it.
    message: Option<(i64, i32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Firing,
    Reminder,
    Resolved,
}

/// An alert as a message shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertView {
    pub key: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub starts_at: i64,
    pub generator_url: String,
}

/// One message to send: alerts of one kind for one chat that arrived together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outgoing {
    pub id: u64,
    pub chat: i64,
    pub kind: Kind,
    pub alerts: Vec<AlertView>,
    pub queued_at: i64,
}

/// What one intake request did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Accepted {
    pub received: usize,
    pub duplicates: usize,
    /// Changes of silenced alerts: recorded, not sent.
    pub silenced: usize,
    pub queued_messages: usize,
}

pub struct Outbox {
    db: Database,
    path: String,
}

impl Outbox {
    pub fn open(path: &Path) -> Result<Outbox, OutboxError> {
        let shown = path.display().to_string();
        let fail = |message: String| OutboxError {
            path: shown.clone(),
            message,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        }
        let db = Database::create(path).map_err(|e| fail(e.to_string()))?;
        let outbox = Outbox { db, path: shown };
        // Create the tables so readers never meet a missing one.
        let tx = outbox.db.begin_write().map_err(|e| outbox.fail(e))?;
        {
            tx.open_table(ALERTS).map_err(|e| outbox.fail(e))?;
            tx.open_table(OUTBOX).map_err(|e| outbox.fail(e))?;
            tx.open_table(DEAD).map_err(|e| outbox.fail(e))?;
            tx.open_table(SILENCES).map_err(|e| outbox.fail(e))?;
            tx.open_table(SENT).map_err(|e| outbox.fail(e))?;
            tx.open_table(META).map_err(|e| outbox.fail(e))?;
        }
        tx.commit().map_err(|e| outbox.fail(e))?;
        Ok(outbox)
    }

    pub(super) fn db(&self) -> &Database {
        &self.db
    }

    pub(super) fn fail(&self, e: impl std::fmt::Display) -> OutboxError {
        OutboxError {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Records `alerts` and queues the messages their changes call for, durably, in one
    /// transaction. `chat_for` routes an alert; `renotify` (seconds) re-announces alerts still
    /// firing after that long.
    pub fn accept(
        &self,
        alerts: &[Alert],
        now: i64,
        renotify: Option<i64>,
        chat_for: impl Fn(&BTreeMap<String, String>) -> i64,
    ) -> Result<Accepted, OutboxError> {
        let mut accepted = Accepted {
            received: alerts.len(),
            ..Accepted::default()
        };
        let tx = self.db.begin_write().map_err(|e| self.fail(e))?;
        {
            let mut records = tx.open_table(ALERTS).map_err(|e| self.fail(e))?;
            let mut outbox = tx.open_table(OUTBOX).map_err(|e| self.fail(e))?;
            let silences =
                super::silences::active(&tx.open_table(SILENCES).map_err(|e| self.fail(e))?, now)
                    .map_err(|e| self.fail(e))?;
            // Alerts arriving together for one chat and of one kind become one message.
            let mut grouped: BTreeMap<(i64, u8), (Kind, Vec<AlertView>)> = BTreeMap::new();
            for alert in alerts {
                let key = alert.key();
                let previous: Option<AlertRecord> = records
                    .get(key.as_str())
                    .map_err(|e| self.fail(e))?
                    .and_then(|v| serde_json::from_slice(v.value()).ok());
                let kind = match (&previous, alert.firing) {
                    (None, true) => Some(Kind::Firing),
                    (Some(p), true) if !p.firing => Some(Kind::Firing),
                    (Some(p), true) => renotify
                        .filter(|every| now - p.notified_at >= *every)
                        .map(|_| Kind::Reminder),
                    (Some(p), false) if p.firing => Some(Kind::Resolved),
                    _ => None,
                };
                let Some(kind) = kind else {
                    accepted.duplicates += 1;
                    continue;
                };
                let record = AlertRecord {
                    firing: alert.firing,
                    notified_at: now,
                    message: match kind {
                        Kind::Firing => None,
                        _ => previous.and_then(|p| p.message),
                    },
                };
                let bytes = serde_json::to_vec(&record).map_err(|e| self.fail(e))?;
                records
                    .insert(key.as_str(), bytes.as_slice())
                    .map_err(|e| self.fail(e))?;
                if silences.iter().any(|s| s.matches(&alert.labels)) {
                    accepted.silenced += 1;
                    continue;
                }
                let chat = chat_for(&alert.labels);
                grouped
                    .entry((chat, kind as u8))
                    .or_insert_with(|| (kind, Vec::new()))
                    .1
                    .push(AlertView {
                        key,
                        labels: alert.labels.clone(),
                        annotations: alert.annotations.clone(),
                        starts_at: alert.starts_at,
                        generator_url: alert.generator_url.clone(),
                    });
            }
            let first_id = outbox
                .last()
                .map_err(|e| self.fail(e))?
                .map_or(1, |(k, _)| k.value() + 1);
            for (id, ((chat, _), (kind, views))) in (first_id..).zip(grouped) {
                let message = Outgoing {
                    id,
                    chat,
                    kind,
                    alerts: views,
                    queued_at: now,
                };
                let bytes = serde_json::to_vec(&message).map_err(|e| self.fail(e))?;
                outbox
                    .insert(id, bytes.as_slice())
                    .map_err(|e| self.fail(e))?;
                accepted.queued_messages += 1;
            }
        }
        tx.commit().map_err(|e| self.fail(e))?;
        Ok(accepted)
    }

    /// The oldest message still to send.
    pub fn next(&self) -> Result<Option<Outgoing>, OutboxError> {
        let tx = self.db.begin_read().map_err(|e| self.fail(e))?;
        let table = tx.open_table(OUTBOX).map_err(|e| self.fail(e))?;
        let first = table.first().map_err(|e| self.fail(e))?;
        first
            .map(|(_, v)| serde_json::from_slice(v.value()).map_err(|e| self.fail(e)))
            .transpose()
    }

    /// The oldest message of a chat that `ready` accepts, keeping each chat's order: once a
    /// chat's oldest message is skipped, its later ones are too.
    pub fn next_for(&self, ready: impl Fn(i64) -> bool) -> Result<Option<Outgoing>, OutboxError> {
        let tx = self.db.begin_read().map_err(|e| self.fail(e))?;
        let table = tx.open_table(OUTBOX).map_err(|e| self.fail(e))?;
        let mut skipped = std::collections::HashSet::new();
        for entry in table.iter().map_err(|e| self.fail(e))? {
            let (_, value) = entry.map_err(|e| self.fail(e))?;
            let message: Outgoing =
                serde_json::from_slice(value.value()).map_err(|e| self.fail(e))?;
            if skipped.contains(&message.chat) {
                continue;
            }
            if ready(message.chat) {
                return Ok(Some(message));
            }
            skipped.insert(message.chat);
        }
        Ok(None)
    }

    /// The message a resolution should reply to: the one that announced the firing.
    pub fn reply_target(&self, message: &Outgoing) -> Result<Option<i32>, OutboxError> {
        let tx = self.db.begin_read().map_err(|e| self.fail(e))?;
        let records = tx.open_table(ALERTS).map_err(|e| self.fail(e))?;
        for view in &message.alerts {
            let record: Option<AlertRecord> = records
                .get(view.key.as_str())
                .map_err(|e| self.fail(e))?
                .and_then(|v| serde_json::from_slice(v.value()).ok());
            if let Some((chat, id)) = record.and_then(|r| r.message) {
                if chat == message.chat {
                    return Ok(Some(id));
                }
            }
        }
        Ok(None)
    }

    /// Telegram took `message` as `telegram_id`: it leaves the outbox, and a firing message is
    /// remembered for the resolution to reply to.
    pub fn delivered(&self, message: &Outgoing, telegram_id: i32) -> Result<(), OutboxError> {
        let tx = self.db.begin_write().map_err(|e| self.fail(e))?;
        {
            let mut outbox = tx.open_table(OUTBOX).map_err(|e| self.fail(e))?;
            outbox.remove(message.id).map_err(|e| self.fail(e))?;
            if message.kind == Kind::Firing {
                let mut sent = tx.open_table(SENT).map_err(|e| self.fail(e))?;
                let alerts = serde_json::to_vec(&message.alerts).map_err(|e| self.fail(e))?;
                sent.insert(
                    super::silences::sent_key(message.chat, telegram_id).as_str(),
                    alerts.as_slice(),
                )
                .map_err(|e| self.fail(e))?;
                let mut records = tx.open_table(ALERTS).map_err(|e| self.fail(e))?;
                for view in &message.alerts {
                    let current: Option<AlertRecord> = records
                        .get(view.key.as_str())
                        .map_err(|e| self.fail(e))?
                        .and_then(|v| serde_json::from_slice(v.value()).ok());
                    if let Some(mut record) = current {
                        record.message = Some((message.chat, telegram_id));
                        let bytes = serde_json::to_vec(&record).map_err(|e| self.fail(e))?;
                        records
                            .insert(view.key.as_str(), bytes.as_slice())
                            .map_err(|e| self.fail(e))?;
                    }
                }
            }
        }
        tx.commit().map_err(|e| self.fail(e))
    }

    /// Gives up on a message Telegram keeps refusing: it moves to the dead letters, kept for
    /// inspection, so the messages behind it are not held up forever.
    pub fn give_up(&self, message: &Outgoing) -> Result<(), OutboxError> {
        let tx = self.db.begin_write().map_err(|e| self.fail(e))?;
        {
            let mut outbox = tx.open_table(OUTBOX).map_err(|e| self.fail(e))?;
            let mut dead = tx.open_table(DEAD).map_err(|e| self.fail(e))?;
            outbox.remove(message.id).map_err(|e| self.fail(e))?;
            let bytes = serde_json::to_vec(message).map_err(|e| self.fail(e))?;
            dead.insert(message.id, bytes.as_slice())
                .map_err(|e| self.fail(e))?;
        }
        tx.commit().map_err(|e| self.fail(e))
    }

    /// Messages waiting, and when the oldest was queued.
    pub fn backlog(&self) -> Result<(u64, Option<i64>), OutboxError> {
        let tx = self.db.begin_read().map_err(|e| self.fail(e))?;
        let table = tx.open_table(OUTBOX).map_err(|e| self.fail(e))?;
        let len = table.len().map_err(|e| self.fail(e))?;
        let oldest = table
            .first()
            .map_err(|e| self.fail(e))?
            .and_then(|(_, v)| serde_json::from_slice::<Outgoing>(v.value()).ok())
            .map(|m| m.queued_at);
        Ok((len, oldest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(instance: &str, firing: bool) -> Alert {
        Alert {
            labels: [
                ("alertname".to_string(), "MadAnomaly".to_string()),
                ("instance".to_string(), instance.to_string()),
            ]
            .into(),
            annotations: BTreeMap::new(),
            starts_at: 100,
            firing,
            generator_url: String::new(),
        }
    }

    fn open() -> (tempfile::TempDir, Outbox) {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(&dir.path().join("state.redb")).expect("open");
        (dir, outbox)
    }

    #[test]
    fn one_message_when_firing_none_for_repeats_one_when_resolved() {
        let (_dir, outbox) = open();
        let chat = |_: &BTreeMap<String, String>| 7;
        let a = outbox
            .accept(&[alert("a", true), alert("b", true)], 1_000, None, chat)
            .expect("accept");
        assert_eq!(
            (a.received, a.duplicates, a.queued_messages),
            (2, 0, 1),
            "fired together: one message"
        );
        let first = outbox.next().expect("next").expect("queued");
        assert_eq!(
            (first.kind, first.alerts.len(), first.chat),
            (Kind::Firing, 2, 7)
        );
        outbox.delivered(&first, 55).expect("delivered");
        assert!(outbox.next().expect("next").is_none());

        // vmalert repeats every evaluation: nothing new.
        let again = outbox
            .accept(&[alert("a", true)], 1_030, None, chat)
            .expect("accept");
        assert_eq!((again.duplicates, again.queued_messages), (1, 0));

        let resolved = outbox
            .accept(&[alert("a", false)], 1_060, None, chat)
            .expect("accept");
        assert_eq!(resolved.queued_messages, 1);
        assert!(
            outbox.next_for(|c| c != 7).expect("next").is_none(),
            "chat 7 is waiting"
        );
        let message = outbox.next().expect("next").expect("queued");
        assert_eq!(message.kind, Kind::Resolved);
        assert_eq!(outbox.reply_target(&message).expect("target"), Some(55));
        let repeat = outbox
            .accept(&[alert("a", false)], 1_090, None, chat)
            .expect("accept");
        assert_eq!(repeat.queued_messages, 0, "resolved repeats send nothing");
    }

    #[test]
    fn reminders_follow_the_renotify_interval() {
        let (_dir, outbox) = open();
        let chat = |_: &BTreeMap<String, String>| 1;
        outbox
            .accept(&[alert("a", true)], 0, Some(600), chat)
            .expect("accept");
        assert_eq!(
            outbox
                .accept(&[alert("a", true)], 300, Some(600), chat)
                .expect("accept")
                .queued_messages,
            0
        );
        assert_eq!(
            outbox
                .accept(&[alert("a", true)], 600, Some(600), chat)
                .expect("accept")
                .queued_messages,
            1
        );
        assert_eq!(outbox.backlog().expect("backlog").0, 2);
    }

    #[test]
    fn the_outbox_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.redb");
        {
            let outbox = Outbox::open(&path).expect("open");
            outbox
                .accept(&[alert("a", true)], 0, None, |_| 1)
                .expect("accept");
        }
        let outbox = Outbox::open(&path).expect("reopen");
        let pending = outbox.next().expect("next").expect("still queued");
        assert_eq!(pending.alerts[0].labels["instance"], "a");
        outbox.give_up(&pending).expect("dead letter");
        assert_eq!(outbox.backlog().expect("backlog"), (0, None));
    }
}
