//! The outbox in PostgreSQL (migration V4), for deployments that already run the registry there.
//! Intake requests are serialised by a transaction-scoped advisory lock: two requests about the
//! same alert must not both decide it is new.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use tokio_postgres::types::Json;
use tokio_postgres::{GenericClient, Row};

use super::{plan, Accepted, AlertRecord, AlertView, Kind, Outbox, OutboxError, Outgoing, Routed};
use crate::relay::silences::Silence;
use crate::store::{with_causes, PgStore};

/// Advisory lock key of relay intake ("madrelay" in ASCII).
const INTAKE_LOCK: i64 = 0x6d61_6472_656c_6179;
const UPDATE_OFFSET: &str = "telegram_update_offset";
const OUTGOING_COLUMNS: &str = "id, chat, kind, alerts, queued_at";

pub struct PgOutbox {
    store: Arc<PgStore>,
}

impl PgOutbox {
    /// Uses the registry's connection pool; the schema comes from its migrations.
    pub fn new(store: Arc<PgStore>) -> PgOutbox {
        PgOutbox { store }
    }

    fn fail(&self, e: impl std::error::Error) -> OutboxError {
        OutboxError::new(self.store.target(), with_causes(&e))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, OutboxError> {
        self.store
            .client()
            .await
            .map_err(|e| OutboxError::new(self.store.target(), e))
    }
}

fn outgoing(row: &Row) -> Result<Outgoing, OutboxError> {
    let bad = |e: &dyn std::fmt::Display| OutboxError::new("relay_outbox", e);
    let kind: String = row.try_get(2).map_err(|e| bad(&e))?;
    let Json(alerts): Json<Vec<AlertView>> = row.try_get(3).map_err(|e| bad(&e))?;
    Ok(Outgoing {
        id: row.try_get::<_, i64>(0).map_err(|e| bad(&e))? as u64,
        chat: row.try_get(1).map_err(|e| bad(&e))?,
        kind: Kind::parse(&kind).ok_or_else(|| bad(&format!("unknown kind {kind:?}")))?,
        alerts,
        queued_at: row.try_get(4).map_err(|e| bad(&e))?,
    })
}

fn silence(row: &Row) -> Result<Silence, tokio_postgres::Error> {
    let Json(matchers): Json<BTreeMap<String, String>> = row.try_get(1)?;
    Ok(Silence {
        id: row.try_get::<_, i64>(0)? as u64,
        matchers,
        until: row.try_get(2)?,
        by: row.try_get(3)?,
        created_at: row.try_get(4)?,
    })
}

const SILENCE_COLUMNS: &str = "id, matchers, ends_at, created_by, created_at";

/// Silences still in force at `now`, oldest first: intake checks them inside its transaction,
/// `/silences` lists them.
async fn active_silences(
    client: &impl GenericClient,
    now: i64,
) -> Result<Vec<Silence>, tokio_postgres::Error> {
    client
        .query(
            &format!("SELECT {SILENCE_COLUMNS} FROM relay_silences WHERE ends_at > $1 ORDER BY id"),
            &[&now],
        )
        .await?
        .iter()
        .map(silence)
        .collect()
}

#[async_trait]
impl Outbox for PgOutbox {
    async fn accept(
        &self,
        alerts: Vec<Routed>,
        now: i64,
        renotify: Option<i64>,
    ) -> Result<Accepted, OutboxError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.fail(e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&INTAKE_LOCK])
            .await
            .map_err(|e| self.fail(e))?;
        let keys: Vec<String> = alerts.iter().map(|r| r.alert.key()).collect();
        let rows = tx
            .query(
                "SELECT key, firing, notified_at, message_chat, message_id \
                 FROM relay_alerts WHERE key = ANY($1)",
                &[&keys],
            )
            .await
            .map_err(|e| self.fail(e))?;
        let mut previous = HashMap::new();
        for row in rows {
            let chat: Option<i64> = row.try_get(3).map_err(|e| self.fail(e))?;
            let id: Option<i32> = row.try_get(4).map_err(|e| self.fail(e))?;
            previous.insert(
                row.try_get(0).map_err(|e| self.fail(e))?,
                AlertRecord {
                    firing: row.try_get(1).map_err(|e| self.fail(e))?,
                    notified_at: row.try_get(2).map_err(|e| self.fail(e))?,
                    message: chat.zip(id),
                },
            );
        }
        let silences = active_silences(&*tx, now).await.map_err(|e| self.fail(e))?;
        let plan = plan(&alerts, previous, &silences, now, renotify);
        if !plan.records.is_empty() {
            let (mut keys, mut firing, mut notified, mut chats, mut ids) =
                (vec![], vec![], vec![], vec![], vec![]);
            for (key, record) in &plan.records {
                keys.push(key.as_str());
                firing.push(record.firing);
                notified.push(record.notified_at);
                chats.push(record.message.map(|m| m.0));
                ids.push(record.message.map(|m| m.1));
            }
            tx.execute(
                "INSERT INTO relay_alerts (key, firing, notified_at, message_chat, message_id) \
                 SELECT * FROM UNNEST($1::text[], $2::bool[], $3::int8[], $4::int8[], $5::int4[]) \
                 ON CONFLICT (key) DO UPDATE SET firing = EXCLUDED.firing, \
                 notified_at = EXCLUDED.notified_at, message_chat = EXCLUDED.message_chat, \
                 message_id = EXCLUDED.message_id",
                &[&keys, &firing, &notified, &chats, &ids],
            )
            .await
            .map_err(|e| self.fail(e))?;
        }
        for (chat, kind, views) in &plan.messages {
            tx.execute(
                "INSERT INTO relay_outbox (chat, kind, alerts, queued_at) VALUES ($1, $2, $3, $4)",
                &[chat, &kind.as_str(), &Json(views), &now],
            )
            .await
            .map_err(|e| self.fail(e))?;
        }
        tx.commit().await.map_err(|e| self.fail(e))?;
        Ok(plan.accepted)
    }

    async fn next_for(&self, waiting: &HashSet<i64>) -> Result<Option<Outgoing>, OutboxError> {
        let waiting: Vec<i64> = waiting.iter().copied().collect();
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "SELECT {OUTGOING_COLUMNS} FROM relay_outbox WHERE chat <> ALL($1) \
                     ORDER BY id LIMIT 1"
                ),
                &[&waiting],
            )
            .await
            .map_err(|e| self.fail(e))?;
        row.as_ref().map(outgoing).transpose()
    }

    async fn reply_target(&self, message: &Outgoing) -> Result<Option<i32>, OutboxError> {
        let keys: Vec<&str> = message.alerts.iter().map(|a| a.key.as_str()).collect();
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT message_id FROM relay_alerts \
                 WHERE key = ANY($1) AND message_chat = $2 AND message_id IS NOT NULL LIMIT 1",
                &[&keys, &message.chat],
            )
            .await
            .map_err(|e| self.fail(e))?;
        row.map(|r| r.try_get(0))
            .transpose()
            .map_err(|e| self.fail(e))
    }

    async fn delivered(&self, message: &Outgoing, telegram_id: i32) -> Result<(), OutboxError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.fail(e))?;
        tx.execute(
            "DELETE FROM relay_outbox WHERE id = $1",
            &[&(message.id as i64)],
        )
        .await
        .map_err(|e| self.fail(e))?;
        if message.kind == Kind::Firing {
            tx.execute(
                "INSERT INTO relay_sent (chat, message_id, alerts) VALUES ($1, $2, $3) \
                 ON CONFLICT (chat, message_id) DO UPDATE SET alerts = EXCLUDED.alerts",
                &[&message.chat, &telegram_id, &Json(&message.alerts)],
            )
            .await
            .map_err(|e| self.fail(e))?;
            let keys: Vec<&str> = message.alerts.iter().map(|a| a.key.as_str()).collect();
            tx.execute(
                "UPDATE relay_alerts SET message_chat = $2, message_id = $3 WHERE key = ANY($1)",
                &[&keys, &message.chat, &telegram_id],
            )
            .await
            .map_err(|e| self.fail(e))?;
        }
        tx.commit().await.map_err(|e| self.fail(e))
    }

    async fn give_up(&self, message: &Outgoing) -> Result<(), OutboxError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.fail(e))?;
        tx.execute(
            "WITH dead AS (DELETE FROM relay_outbox WHERE id = $1 RETURNING *) \
             INSERT INTO relay_dead_letters (id, chat, kind, alerts, queued_at) \
             SELECT id, chat, kind, alerts, queued_at FROM dead ON CONFLICT (id) DO NOTHING",
            &[&(message.id as i64)],
        )
        .await
        .map_err(|e| self.fail(e))?;
        tx.commit().await.map_err(|e| self.fail(e))
    }

    async fn backlog(&self) -> Result<(u64, Option<i64>), OutboxError> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT count(*), (SELECT queued_at FROM relay_outbox ORDER BY id LIMIT 1) \
                 FROM relay_outbox",
                &[],
            )
            .await
            .map_err(|e| self.fail(e))?;
        let len: i64 = row.try_get(0).map_err(|e| self.fail(e))?;
        Ok((len.max(0) as u64, row.try_get(1).map_err(|e| self.fail(e))?))
    }

    async fn add_silence(
        &self,
        matchers: BTreeMap<String, String>,
        until: i64,
        by: &str,
        now: i64,
    ) -> Result<Silence, OutboxError> {
        let row = self
            .client()
            .await?
            .query_one(
                &format!(
                    "INSERT INTO relay_silences (matchers, ends_at, created_by, created_at) \
                     VALUES ($1, $2, $3, $4) RETURNING {SILENCE_COLUMNS}"
                ),
                &[&Json(&matchers), &until, &by, &now],
            )
            .await
            .map_err(|e| self.fail(e))?;
        silence(&row).map_err(|e| self.fail(e))
    }

    async fn silences(&self, now: i64) -> Result<Vec<Silence>, OutboxError> {
        let client = self.client().await?;
        active_silences(&**client, now)
            .await
            .map_err(|e| self.fail(e))
    }

    async fn remove_silence(&self, id: u64) -> Result<bool, OutboxError> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(false);
        };
        let removed = self
            .client()
            .await?
            .execute("DELETE FROM relay_silences WHERE id = $1", &[&id])
            .await
            .map_err(|e| self.fail(e))?;
        Ok(removed > 0)
    }

    async fn alerts_of_message(
        &self,
        chat: i64,
        telegram_id: i32,
    ) -> Result<Vec<AlertView>, OutboxError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT alerts FROM relay_sent WHERE chat = $1 AND message_id = $2",
                &[&chat, &telegram_id],
            )
            .await
            .map_err(|e| self.fail(e))?;
        match row {
            None => Ok(Vec::new()),
            Some(row) => {
                let Json(alerts): Json<Vec<AlertView>> =
                    row.try_get(0).map_err(|e| self.fail(e))?;
                Ok(alerts)
            }
        }
    }

    async fn update_offset(&self) -> Result<u64, OutboxError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT value FROM relay_meta WHERE key = $1",
                &[&UPDATE_OFFSET],
            )
            .await
            .map_err(|e| self.fail(e))?;
        let value: i64 = match row {
            Some(r) => r.try_get(0).map_err(|e| self.fail(e))?,
            None => 0,
        };
        Ok(value.max(0) as u64)
    }

    async fn set_update_offset(&self, offset: u64) -> Result<(), OutboxError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO relay_meta (key, value) VALUES ($1, $2) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[&UPDATE_OFFSET, &(offset as i64)],
            )
            .await
            .map_err(|e| self.fail(e))?;
        Ok(())
    }
}
