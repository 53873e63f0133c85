//! The outbox in an embedded redb file: the default, no server needed. redb syncs on commit;
//! every call runs on the blocking pool so a sync never stalls the async workers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableTable, ReadableTableMetadata, Table, TableDefinition};

use super::{plan, Accepted, AlertRecord, AlertView, Kind, Outbox, OutboxError, Outgoing, Routed};
use crate::relay::silences::Silence;

const ALERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("alerts");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// Active and expired silences, by id.
const SILENCES: TableDefinition<u64, &[u8]> = TableDefinition::new("silences");
/// Alerts of each firing message Telegram took, by "chat:message_id": buttons act on them.
const SENT: TableDefinition<&str, &[u8]> = TableDefinition::new("sent");
/// Small counters: the next Telegram update to read.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const UPDATE_OFFSET: &str = "telegram_update_offset";

#[derive(Clone)]
pub struct EmbeddedOutbox {
    inner: Arc<Redb>,
}

struct Redb {
    db: Database,
    path: String,
}

fn sent_key(chat: i64, telegram_id: i32) -> String {
    format!("{chat}:{telegram_id}")
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    serde_json::from_slice(bytes).ok()
}

impl EmbeddedOutbox {
    pub fn open(path: &Path) -> Result<EmbeddedOutbox, OutboxError> {
        let shown = path.display().to_string();
        let fail = |e: &dyn std::fmt::Display| OutboxError::new(&shown, e);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
        }
        let db = Database::create(path).map_err(|e| fail(&e))?;
        // Create the tables so readers never meet a missing one.
        let tx = db.begin_write().map_err(|e| fail(&e))?;
        {
            tx.open_table(ALERTS).map_err(|e| fail(&e))?;
            tx.open_table(OUTBOX).map_err(|e| fail(&e))?;
            tx.open_table(DEAD).map_err(|e| fail(&e))?;
            tx.open_table(SILENCES).map_err(|e| fail(&e))?;
            tx.open_table(SENT).map_err(|e| fail(&e))?;
            tx.open_table(META).map_err(|e| fail(&e))?;
        }
        tx.commit().map_err(|e| fail(&e))?;
        Ok(EmbeddedOutbox {
            inner: Arc::new(Redb { db, path: shown }),
        })
    }

    /// Runs `work` on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Redb) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        let inner = self.inner.clone();
        let path = inner.path.clone();
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|e| OutboxError::new(&path, e))?
    }
}

impl Redb {
    fn fail(&self, e: impl std::fmt::Display) -> OutboxError {
        OutboxError::new(&self.path, e)
    }

    fn accept(
        &self,
        alerts: &[Routed],
        now: i64,
        renotify: Option<i64>,
    ) -> Result<Accepted, OutboxError> {
        let tx = self.db.begin_write().map_err(|e| self.fail(e))?;
        let accepted = {
            let mut records = tx.open_table(ALERTS).map_err(|e| self.fail(e))?;
            let mut outbox = tx.open_table(OUTBOX).map_err(|e| self.fail(e))?;
            let silences = active(&tx.open_table(SILENCES).map_err(|e| self.fail(e))?, now)
                .map_err(|e| self.fail(e))?;
            let mut previous = HashMap::new();
            for Routed { alert, .. } in alerts {
                let key = alert.key();
                let record: Option<AlertRecord> = records
                    .get(key.as_str())
                    .map_err(|e| self.fail(e))?
                    .and_then(|v| decode(v.value()));
                if let Some(record) = record {
                    previous.insert(key, record);
                }
            }
            let plan = plan(alerts, previous, &silences, now, renotify);
            for (key, record) in &plan.records {
                let bytes = serde_json::to_vec(record).map_err(|e| self.fail(e))?;
                records
                    .insert(key.as_str(), bytes.as_slice())
                    .map_err(|e| self.fail(e))?;
            }
            let first_id = outbox
                .last()
                .map_err(|e| self.fail(e))?
                .map_or(1, |(k, _)| k.value() + 1);
            for (id, (chat, kind, alerts)) in (first_id..).zip(plan.messages) {
                let message = Outgoing {
                    id,
                    chat,
                    kind,
                    alerts,
                    queued_at: now,
                };
                let bytes = serde_json::to_vec(&message).map_err(|e| self.fail(e))?;
                outbox
                    .insert(id, bytes.as_slice())
                    .map_err(|e| self.fail(e))?;
            }
            plan.accepted
        };
        tx.commit().map_err(|e| self.fail(e))?;
        Ok(accepted)
    }

    fn next_for(&self, waiting: &HashSet<i64>) -> Result<Option<Outgoing>, OutboxError> {
        let tx = self.db.begin_read().map_err(|e| self.fail(e))?;
        let table = tx.open_table(OUTBOX).map_err(|e| self.fail(e))?;
        for entry in table.iter().map_err(|e| self.fail(e))? {
            let (_, value) = entry.map_err(|e| self.fail(e))?;
            let message: Outgoing =
                serde_json::from_slice(value.value()).map_err(|e| self.fail(e))?;
            if !waiting.contains(&message.chat) {
                return Ok(Some(message));
            }
        }
        Ok(None)
    }

    fn reply_target(&self, message: &Outgoing) -> Result<Option<i32>, OutboxError> {
        let tx = self.db.begin_read().map_err(|e| self.fail(e))?;
        let records = tx.open_table(ALERTS).map_err(|e| self.fail(e))?;
        for view in &message.alerts {
            let record: Option<AlertRecord> = records
                .get(view.key.as_str())
                .map_err(|e| self.fail(e))?
                .and_then(|v| decode(v.value()));
            if let Some((chat, id)) = record.and_then(|r| r.message) {
                if chat == message.chat {
                    return Ok(Some(id));
                }
            }
        }
        Ok(None)
    }

    fn delivered(&self, message: &Outgoing, telegram_id: i32) -> Result<(), OutboxError> {
        let tx = self.db.begin_write().map_err(|e| self.fail(e))?;
        {
            let mut outbox = tx.open_table(OUTBOX).map_err(|e| self.fail(e))?;
            outbox.remove(message.id).map_err(|e| self.fail(e))?;
            if message.kind == Kind::Firing {
                let mut sent = tx.open_table(SENT).map_err(|e| self.fail(e))?;
                let alerts = serde_json::to_vec(&message.alerts).map_err(|e| self.fail(e))?;
                sent.insert(
                    sent_key(message.chat, telegram_id).as_str(),
                    alerts.as_slice(),
                )
                .map_err(|e| self.fail(e))?;
                let mut records = tx.open_table(ALERTS).map_err(|e| self.fail(e))?;
                for view in &message.alerts {
                    let current: Option<AlertRecord> = records
                        .get(view.key.as_str())
                        .map_err(|e| self.fail(e))?
                        .and_then(|v| decode(v.value()));
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

    fn give_up(&self, message: &Outgoing) -> Result<(), OutboxError> {
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

    fn backlog(&self) -> Result<(u64, Option<i64>), OutboxError> {
        let tx = self.db.begin_read().map_err(|e| self.fail(e))?;
        let table = tx.open_table(OUTBOX).map_err(|e| self.fail(e))?;
        let len = table.len().map_err(|e| self.fail(e))?;
        let oldest = table
            .first()
            .map_err(|e| self.fail(e))?
            .and_then(|(_, v)| decode::<Outgoing>(v.value()))
            .map(|m| m.queued_at);
        Ok((len, oldest))
    }

    fn add_silence(
        &self,
        matchers: BTreeMap<String, String>,
        until: i64,
        by: String,
        now: i64,
    ) -> Result<Silence, OutboxError> {
        let tx = self.db.begin_write().map_err(|e| self.fail(e))?;
        let silence = {
            let mut table = tx.open_table(SILENCES).map_err(|e| self.fail(e))?;
            let id = table
                .last()
                .map_err(|e| self.fail(e))?
                .map_or(1, |(k, _)| k.value() + 1);
            let silence = Silence {
                id,
                matchers,
                until,
                by,
                created_at: now,
            };
            let bytes = serde_json::to_vec(&silence).map_err(|e| self.fail(e))?;
            table
                .insert(id, bytes.as_slice())
                .map_err(|e| self.fail(e))?;
            silence
        };
        tx.commit().map_err(|e| self.fail(e))?;
        Ok(silence)
    }

    fn silences(&self, now: i64) -> Result<Vec<Silence>, OutboxError> {
        let tx = self.db.begin_write().map_err(|e| self.fail(e))?;
        let found = active(&tx.open_table(SILENCES).map_err(|e| self.fail(e))?, now)
            .map_err(|e| self.fail(e))?;
        tx.abort().map_err(|e| self.fail(e))?;
        Ok(found)
    }

    fn remove_silence(&self, id: u64) -> Result<bool, OutboxError> {
        let tx = self.db.begin_write().map_err(|e| self.fail(e))?;
        let removed = {
            let mut table = tx.open_table(SILENCES).map_err(|e| self.fail(e))?;
            let removed = table.remove(id).map_err(|e| self.fail(e))?.is_some();
            removed
        };
        tx.commit().map_err(|e| self.fail(e))?;
        Ok(removed)
    }

    fn alerts_of_message(
        &self,
        chat: i64,
        telegram_id: i32,
    ) -> Result<Vec<AlertView>, OutboxError> {
        let tx = self.db.begin_read().map_err(|e| self.fail(e))?;
        let table = tx.open_table(SENT).map_err(|e| self.fail(e))?;
        let found = table
            .get(sent_key(chat, telegram_id).as_str())
            .map_err(|e| self.fail(e))?
            .and_then(|v| decode(v.value()))
            .unwrap_or_default();
        Ok(found)
    }

    fn update_offset(&self) -> Result<u64, OutboxError> {
        let tx = self.db.begin_read().map_err(|e| self.fail(e))?;
        let table = tx.open_table(META).map_err(|e| self.fail(e))?;
        let value = table
            .get(UPDATE_OFFSET)
            .map_err(|e| self.fail(e))?
            .map_or(0, |v| v.value());
        Ok(value)
    }

    fn set_update_offset(&self, offset: u64) -> Result<(), OutboxError> {
        let tx = self.db.begin_write().map_err(|e| self.fail(e))?;
        {
            let mut table = tx.open_table(META).map_err(|e| self.fail(e))?;
            table
                .insert(UPDATE_OFFSET, offset)
                .map_err(|e| self.fail(e))?;
        }
        tx.commit().map_err(|e| self.fail(e))
    }
}

/// Silences still in force at `now`.
fn active(table: &Table<'_, u64, &[u8]>, now: i64) -> Result<Vec<Silence>, redb::StorageError> {
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (_, value) = entry?;
        if let Some(s) = decode::<Silence>(value.value()) {
            if s.until > now {
                out.push(s);
            }
        }
    }
    Ok(out)
}

#[async_trait]
impl Outbox for EmbeddedOutbox {
    async fn accept(
        &self,
        alerts: Vec<Routed>,
        now: i64,
        renotify: Option<i64>,
    ) -> Result<Accepted, OutboxError> {
        self.run(move |db| db.accept(&alerts, now, renotify)).await
    }

    async fn next_for(&self, waiting: &HashSet<i64>) -> Result<Option<Outgoing>, OutboxError> {
        let waiting = waiting.clone();
        self.run(move |db| db.next_for(&waiting)).await
    }

    async fn reply_target(&self, message: &Outgoing) -> Result<Option<i32>, OutboxError> {
        let message = message.clone();
        self.run(move |db| db.reply_target(&message)).await
    }

    async fn delivered(&self, message: &Outgoing, telegram_id: i32) -> Result<(), OutboxError> {
        let message = message.clone();
        self.run(move |db| db.delivered(&message, telegram_id))
            .await
    }

    async fn give_up(&self, message: &Outgoing) -> Result<(), OutboxError> {
        let message = message.clone();
        self.run(move |db| db.give_up(&message)).await
    }

    async fn backlog(&self) -> Result<(u64, Option<i64>), OutboxError> {
        self.run(|db| db.backlog()).await
    }

    async fn add_silence(
        &self,
        matchers: BTreeMap<String, String>,
        until: i64,
        by: &str,
        now: i64,
    ) -> Result<Silence, OutboxError> {
        let by = by.to_string();
        self.run(move |db| db.add_silence(matchers, until, by, now))
            .await
    }

    async fn silences(&self, now: i64) -> Result<Vec<Silence>, OutboxError> {
        self.run(move |db| db.silences(now)).await
    }

    async fn remove_silence(&self, id: u64) -> Result<bool, OutboxError> {
        self.run(move |db| db.remove_silence(id)).await
    }

    async fn alerts_of_message(
        &self,
        chat: i64,
        telegram_id: i32,
    ) -> Result<Vec<AlertView>, OutboxError> {
        self.run(move |db| db.alerts_of_message(chat, telegram_id))
            .await
    }

    async fn update_offset(&self) -> Result<u64, OutboxError> {
        self.run(|db| db.update_offset()).await
    }

    async fn set_update_offset(&self, offset: u64) -> Result<(), OutboxError> {
        self.run(move |db| db.set_update_offset(offset)).await
    }
}
