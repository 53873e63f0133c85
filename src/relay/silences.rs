//! Silences: set from a firing message's buttons, listed and removed with bot commands, and
//! respected by intake (a silenced alert's changes are recorded but not sent).

use std::collections::BTreeMap;

use redb::{ReadableTable, Table};
use serde::{Deserialize, Serialize};

use super::outbox::{AlertView, Outbox, OutboxError, META, SENT, SILENCES};

/// Labels that name the rule rather than the series: a silence covers every severity.
const NOT_SERIES_LABELS: [&str; 2] = ["alertname", "severity"];
const UPDATE_OFFSET: &str = "telegram_update_offset";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Silence {
    pub id: u64,
    /// Every one must equal the alert's label.
    pub matchers: BTreeMap<String, String>,
    pub until: i64,
    pub by: String,
    pub created_at: i64,
}

impl Silence {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.matchers.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// The labels a "silence this series" button silences.
pub fn series_matchers(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter(|(k, _)| !NOT_SERIES_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

pub(super) fn sent_key(chat: i64, telegram_id: i32) -> String {
    format!("{chat}:{telegram_id}")
}

/// Silences still in force at `now`.
pub(super) fn active(
    table: &Table<'_, u64, &[u8]>,
    now: i64,
) -> Result<Vec<Silence>, redb::StorageError> {
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (_, value) = entry?;
        if let Ok(s) = serde_json::from_slice::<Silence>(value.value()) {
            if s.until > now {
                out.push(s);
            }
        }
    }
    Ok(out)
}

impl Outbox {
    pub fn add_silence(
        &self,
        matchers: BTreeMap<String, String>,
        until: i64,
        by: &str,
        now: i64,
    ) -> Result<Silence, OutboxError> {
        let tx = self.db().begin_write().map_err(|e| self.fail(e))?;
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
                by: by.to_string(),
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

    pub fn silences(&self, now: i64) -> Result<Vec<Silence>, OutboxError> {
        let tx = self.db().begin_write().map_err(|e| self.fail(e))?;
        let found = active(&tx.open_table(SILENCES).map_err(|e| self.fail(e))?, now)
            .map_err(|e| self.fail(e))?;
        tx.abort().map_err(|e| self.fail(e))?;
        Ok(found)
    }

    pub fn remove_silence(&self, id: u64) -> Result<bool, OutboxError> {
        let tx = self.db().begin_write().map_err(|e| self.fail(e))?;
        let removed = {
            let mut table = tx.open_table(SILENCES).map_err(|e| self.fail(e))?;
            let removed = table.remove(id).map_err(|e| self.fail(e))?.is_some();
            removed
        };
        tx.commit().map_err(|e| self.fail(e))?;
        Ok(removed)
    }

    /// The alerts a firing message announced.
    pub fn alerts_of_message(
        &self,
        chat: i64,
        telegram_id: i32,
    ) -> Result<Vec<AlertView>, OutboxError> {
        let tx = self.db().begin_read().map_err(|e| self.fail(e))?;
        let table = tx.open_table(SENT).map_err(|e| self.fail(e))?;
        let found = table
            .get(sent_key(chat, telegram_id).as_str())
            .map_err(|e| self.fail(e))?
            .and_then(|v| serde_json::from_slice(v.value()).ok())
            .unwrap_or_default();
        Ok(found)
    }

    /// The next Telegram update to ask for, so a restart does not act on a button twice.
    pub fn update_offset(&self) -> Result<u64, OutboxError> {
        let tx = self.db().begin_read().map_err(|e| self.fail(e))?;
        let table = tx.open_table(META).map_err(|e| self.fail(e))?;
        let value = table
            .get(UPDATE_OFFSET)
            .map_err(|e| self.fail(e))?
            .map_or(0, |v| v.value());
        Ok(value)
    }

    pub fn set_update_offset(&self, offset: u64) -> Result<(), OutboxError> {
        let tx = self.db().begin_write().map_err(|e| self.fail(e))?;
        {
            let mut table = tx.open_table(META).map_err(|e| self.fail(e))?;
            table
                .insert(UPDATE_OFFSET, offset)
                .map_err(|e| self.fail(e))?;
        }
        tx.commit().map_err(|e| self.fail(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::intake::Alert;

    fn alert(instance: &str, severity: &str, firing: bool) -> Alert {
        Alert {
            labels: [
                ("alertname".to_string(), "MadAnomaly".to_string()),
                ("instance".to_string(), instance.to_string()),
                ("severity".to_string(), severity.to_string()),
            ]
            .into(),
            annotations: BTreeMap::new(),
            starts_at: 0,
            firing,
            generator_url: String::new(),
        }
    }

    #[test]
    fn silenced_series_send_nothing_until_the_silence_ends_or_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(&dir.path().join("s.redb")).expect("open");
        let matchers = series_matchers(&alert("a", "warning", true).labels);
        assert!(!matchers.contains_key("severity"));
        let silence = outbox
            .add_silence(matchers, 3_600, "@oncall", 0)
            .expect("silence");
        let chat = |_: &BTreeMap<String, String>| 1;
        let a = outbox
            .accept(
                &[alert("a", "critical", true), alert("b", "warning", true)],
                10,
                None,
                chat,
            )
            .expect("accept");
        assert_eq!((a.silenced, a.queued_messages), (1, 1), "b still notifies");
        assert_eq!(outbox.silences(10).expect("list"), vec![silence.clone()]);
        assert!(outbox.silences(3_600).expect("list").is_empty(), "expired");
        assert!(outbox.remove_silence(silence.id).expect("remove"));
        assert!(!outbox.remove_silence(silence.id).expect("remove again"));
        outbox.set_update_offset(42).expect("offset");
        assert_eq!(outbox.update_offset().expect("offset"), 42);
    }
}
