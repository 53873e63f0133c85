//! The relay's durable state: what each alert last said, the messages still to send, the
//! silences, and which Telegram message announced which alerts.
//!
//! Two backends behind one [`Outbox`] trait, chosen like the model store: PostgreSQL when
//! `store.postgres` is configured (several relays can share it, and it is backed up with the rest),
//! otherwise an embedded redb file. Both keep the same promises:
//! - an intake call returns only after its transaction has committed, so an accepted alert
//!   survives a crash;
//! - a message leaves the outbox only after Telegram has taken it, so after a restart delivery
//!   resumes where it stopped;
//! - deduplication happens in the same transaction as the queueing, decided by [`plan`], so the
//!   backends cannot disagree about what is a repeat.

mod embedded;
mod postgres;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use embedded::EmbeddedOutbox;
pub use postgres::PgOutbox;

use super::intake::Alert;
use super::silences::Silence;

#[derive(Debug, thiserror::Error)]
#[error("relay state {place}: {message}")]
pub struct OutboxError {
    /// The file or `user@host:port/db`: never a password.
    place: String,
    message: String,
}

impl OutboxError {
    pub(crate) fn new(place: &str, message: impl std::fmt::Display) -> OutboxError {
        OutboxError {
            place: place.to_string(),
            message: message.to_string(),
        }
    }
}

/// What the relay remembers about one alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    pub firing: bool,
    /// When the last message about it was queued (Unix seconds).
    pub notified_at: i64,
    /// The Telegram message (chat, id) that announced the current firing: resolutions reply to it.
    pub message: Option<(i64, i32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Firing,
    Reminder,
    Resolved,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Firing => "firing",
            Kind::Reminder => "reminder",
            Kind::Resolved => "resolved",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Kind> {
        [Kind::Firing, Kind::Reminder, Kind::Resolved]
            .into_iter()
            .find(|k| k.as_str() == text)
    }
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

/// An alert with the chat its route chose.
#[derive(Debug, Clone)]
pub struct Routed {
    pub alert: Alert,
    pub chat: i64,
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

/// What an intake request changes: the records to write and the messages to queue (without ids:
/// the backend numbers them).
#[derive(Debug, Default)]
pub struct Plan {
    pub records: Vec<(String, AlertRecord)>,
    pub messages: Vec<(i64, Kind, Vec<AlertView>)>,
    pub accepted: Accepted,
}

/// Decides, for alerts arriving together, which change state and which messages that calls for.
/// `previous` holds the stored records of (at least) these alerts; `renotify` (seconds)
/// re-announces alerts still firing after that long. A key repeated within one request sees its
/// own earlier change, as it would across requests.
pub fn plan(
    alerts: &[Routed],
    mut previous: HashMap<String, AlertRecord>,
    silences: &[Silence],
    now: i64,
    renotify: Option<i64>,
) -> Plan {
    let mut accepted = Accepted {
        received: alerts.len(),
        ..Accepted::default()
    };
    let mut changed: Vec<String> = Vec::new();
    // Alerts arriving together for one chat and of one kind become one message.
    let mut grouped: BTreeMap<(i64, Kind), Vec<AlertView>> = BTreeMap::new();
    for Routed { alert, chat } in alerts {
        let key = alert.key();
        let before = previous.get(&key);
        let kind = match (before, alert.firing) {
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
                _ => before.and_then(|p| p.message),
            },
        };
        if !changed.contains(&key) {
            changed.push(key.clone());
        }
        previous.insert(key.clone(), record);
        if silences.iter().any(|s| s.matches(&alert.labels)) {
            accepted.silenced += 1;
            continue;
        }
        grouped.entry((*chat, kind)).or_default().push(AlertView {
            key,
            labels: alert.labels.clone(),
            annotations: alert.annotations.clone(),
            starts_at: alert.starts_at,
            generator_url: alert.generator_url.clone(),
        });
    }
    accepted.queued_messages = grouped.len();
    Plan {
        records: changed
            .into_iter()
            .filter_map(|key| previous.remove(&key).map(|r| (key, r)))
            .collect(),
        messages: grouped
            .into_iter()
            .map(|((chat, kind), views)| (chat, kind, views))
            .collect(),
        accepted,
    }
}

/// The relay's durable state, whichever database holds it.
#[async_trait]
pub trait Outbox: Send + Sync {
    /// Records `alerts` and queues the messages their changes call for, durably, in one
    /// transaction.
    async fn accept(
        &self,
        alerts: Vec<Routed>,
        now: i64,
        renotify: Option<i64>,
    ) -> Result<Accepted, OutboxError>;

    /// The oldest message of a chat not in `waiting`. Each chat's order is kept: a waiting
    /// chat's messages all wait.
    async fn next_for(&self, waiting: &HashSet<i64>) -> Result<Option<Outgoing>, OutboxError>;

    /// The message a resolution should reply to: the one that announced the firing.
    async fn reply_target(&self, message: &Outgoing) -> Result<Option<i32>, OutboxError>;

    /// Telegram took `message` as `telegram_id`: it leaves the outbox, and a firing message is
    /// remembered for the resolution to reply to and for its buttons.
    async fn delivered(&self, message: &Outgoing, telegram_id: i32) -> Result<(), OutboxError>;

    /// Gives up on a message Telegram keeps refusing: it moves to the dead letters, kept for
    /// inspection, so the messages behind it are not held up forever.
    async fn give_up(&self, message: &Outgoing) -> Result<(), OutboxError>;

    /// Messages waiting, and when the oldest was queued.
    async fn backlog(&self) -> Result<(u64, Option<i64>), OutboxError>;

    async fn add_silence(
        &self,
        matchers: BTreeMap<String, String>,
        until: i64,
        by: &str,
        now: i64,
    ) -> Result<Silence, OutboxError>;

    /// Silences still in force at `now`.
    async fn silences(&self, now: i64) -> Result<Vec<Silence>, OutboxError>;

    /// Whether a silence with that id existed.
    async fn remove_silence(&self, id: u64) -> Result<bool, OutboxError>;

    /// The alerts a firing message announced.
    async fn alerts_of_message(
        &self,
        chat: i64,
        telegram_id: i32,
    ) -> Result<Vec<AlertView>, OutboxError>;

    /// The next Telegram update to ask for, so a restart does not act on a button twice.
    async fn update_offset(&self) -> Result<u64, OutboxError>;

    async fn set_update_offset(&self, offset: u64) -> Result<(), OutboxError>;
}

/// Opens the outbox the config names: PostgreSQL when `store.postgres` is set (migrating it unless
/// `store.migrate` is off), else the redb file at `relay.state_path`.
pub async fn open(
    store: &crate::config::Store,
    state_path: &std::path::Path,
) -> anyhow::Result<Arc<dyn Outbox>> {
    Ok(match &store.postgres {
        Some(_) => {
            let pg = crate::store::PgStore::from_config(store).await?;
            if store.migrate {
                pg.migrate().await?;
            }
            Arc::new(PgOutbox::new(Arc::new(pg)))
        }
        None => Arc::new(EmbeddedOutbox::open(state_path)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(instance: &str, firing: bool, chat: i64) -> Routed {
        Routed {
            alert: Alert {
                labels: [
                    ("alertname".to_string(), "MadAnomaly".to_string()),
                    ("instance".to_string(), instance.to_string()),
                ]
                .into(),
                annotations: BTreeMap::new(),
                starts_at: 100,
                firing,
                generator_url: String::new(),
            },
            chat,
        }
    }

    #[test]
    fn alerts_firing_together_are_one_message_per_chat() {
        let alerts = [
            routed("a", true, 1),
            routed("b", true, 1),
            routed("c", true, 2),
        ];
        let p = plan(&alerts, HashMap::new(), &[], 0, None);
        assert_eq!(p.accepted.queued_messages, 2);
        assert_eq!(p.records.len(), 3);
        let sizes: Vec<(i64, usize)> = p.messages.iter().map(|m| (m.0, m.2.len())).collect();
        assert_eq!(sizes, vec![(1, 2), (2, 1)]);
    }

    #[test]
    fn a_key_repeated_in_one_request_sees_its_own_change() {
        let alerts = [routed("a", true, 1), routed("a", true, 1)];
        let p = plan(&alerts, HashMap::new(), &[], 0, None);
        assert_eq!((p.accepted.duplicates, p.records.len()), (1, 1));
        let flap = [routed("a", true, 1), routed("a", false, 1)];
        let p = plan(&flap, HashMap::new(), &[], 0, None);
        let kinds: Vec<Kind> = p.messages.iter().map(|m| m.1).collect();
        assert_eq!(kinds, vec![Kind::Firing, Kind::Resolved]);
        assert!(!p.records[0].1.firing, "the last word is kept");
    }

    #[test]
    fn a_resolution_keeps_the_firing_message_to_reply_to() {
        let key = routed("a", false, 1).alert.key();
        let before = AlertRecord {
            firing: true,
            notified_at: 0,
            message: Some((1, 55)),
        };
        let p = plan(
            &[routed("a", false, 1)],
            [(key, before)].into(),
            &[],
            10,
            None,
        );
        assert_eq!(p.records[0].1.message, Some((1, 55)));
        assert_eq!(p.messages[0].1, Kind::Resolved);
    }

    #[test]
    fn kinds_round_trip_as_text() {
        for k in [Kind::Firing, Kind::Reminder, Kind::Resolved] {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Kind::parse("other"), None);
    }
}
