//! The relay's outbox behaves the same in both of its homes: the embedded redb file and
//! PostgreSQL. Each scenario runs against both.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use common::pg::TestDb;
use mad::relay::{Alert, EmbeddedOutbox, Kind, Outbox, PgOutbox, Routed};

fn alert(instance: &str, severity: &str, firing: bool) -> Alert {
    Alert {
        labels: [
            ("alertname", "MadAnomaly"),
            ("instance", instance),
            ("severity", severity),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        annotations: BTreeMap::new(),
        starts_at: 100,
        firing,
        generator_url: String::new(),
    }
}

fn to(chat: i64, alerts: &[Alert]) -> Vec<Routed> {
    alerts
        .iter()
        .map(|a| Routed {
            alert: a.clone(),
            chat,
        })
        .collect()
}

/// The two backends, each on fresh state. Dropping the guard removes it.
enum Home {
    Embedded(tempfile::TempDir),
    Postgres(TestDb),
}

impl Home {
    async fn open(&self) -> Arc<dyn Outbox> {
        match self {
            Home::Embedded(dir) => {
                Arc::new(EmbeddedOutbox::open(&dir.path().join("relay.redb")).expect("open redb"))
            }
            Home::Postgres(db) => {
                let store = db.store().await;
                store.migrate().await.expect("migrate");
                Arc::new(PgOutbox::new(Arc::new(store)))
            }
        }
    }

    async fn close(self) {
        if let Home::Postgres(db) = self {
            db.drop().await;
        }
    }
}

async fn homes() -> Vec<(&'static str, Home)> {
    vec![
        (
            "redb",
            Home::Embedded(tempfile::tempdir().expect("tempdir")),
        ),
        ("postgres", Home::Postgres(TestDb::new().await)),
    ]
}

#[tokio::test]
async fn one_message_on_firing_none_for_repeats_one_reply_on_resolution() {
    for (name, home) in homes().await {
        let outbox = home.open().await;
        let a = outbox
            .accept(
                to(
                    7,
                    &[alert("a", "warning", true), alert("b", "warning", true)],
                ),
                1_000,
                None,
            )
            .await
            .expect("accept");
        assert_eq!(
            (a.received, a.duplicates, a.queued_messages),
            (2, 0, 1),
            "{name}: fired together, one message"
        );
        let none = HashSet::new();
        let first = outbox.next_for(&none).await.expect("next").expect("queued");
        assert_eq!(
            (first.kind, first.alerts.len(), first.chat),
            (Kind::Firing, 2, 7),
            "{name}"
        );
        outbox.delivered(&first, 55).await.expect("delivered");
        assert!(
            outbox.next_for(&none).await.expect("next").is_none(),
            "{name}"
        );
        assert_eq!(
            outbox.alerts_of_message(7, 55).await.expect("sent").len(),
            2,
            "{name}: the buttons know the message's alerts"
        );

        // vmalert repeats every evaluation: nothing new.
        let again = outbox
            .accept(to(7, &[alert("a", "warning", true)]), 1_030, None)
            .await
            .expect("accept");
        assert_eq!((again.duplicates, again.queued_messages), (1, 0), "{name}");

        let resolved = outbox
            .accept(to(7, &[alert("a", "warning", false)]), 1_060, None)
            .await
            .expect("accept");
        assert_eq!(resolved.queued_messages, 1, "{name}");
        let waiting: HashSet<i64> = [7].into();
        assert!(
            outbox.next_for(&waiting).await.expect("next").is_none(),
            "{name}: chat 7 is waiting"
        );
        let message = outbox.next_for(&none).await.expect("next").expect("queued");
        assert_eq!(message.kind, Kind::Resolved, "{name}");
        assert_eq!(
            outbox.reply_target(&message).await.expect("target"),
            Some(55),
            "{name}: the resolution replies to the firing message"
        );
        let repeat = outbox
            .accept(to(7, &[alert("a", "warning", false)]), 1_090, None)
            .await
            .expect("accept");
        assert_eq!(
            repeat.queued_messages, 0,
            "{name}: resolved repeats send nothing"
        );
        home.close().await;
    }
}

#[tokio::test]
async fn each_chat_keeps_its_order_while_another_waits() {
    for (name, home) in homes().await {
        let outbox = home.open().await;
        for (i, chat) in [(0, 1), (1, 2), (2, 1), (3, 2)] {
            outbox
                .accept(
                    to(chat, &[alert(&format!("i{i}"), "warning", true)]),
                    i,
                    None,
                )
                .await
                .expect("accept");
        }
        let none = HashSet::new();
        let mut order = Vec::new();
        while let Some(m) = outbox.next_for(&[1].into()).await.expect("next") {
            order.push(m.alerts[0].labels["instance"].clone());
            outbox.delivered(&m, m.id as i32).await.expect("delivered");
        }
        assert_eq!(
            order,
            ["i1", "i3"],
            "{name}: chat 2 goes on while chat 1 waits"
        );
        let first = outbox.next_for(&none).await.expect("next").expect("queued");
        assert_eq!(first.alerts[0].labels["instance"], "i0", "{name}");
        assert_eq!(
            outbox.backlog().await.expect("backlog"),
            (2, Some(0)),
            "{name}"
        );
        home.close().await;
    }
}

#[tokio::test]
async fn reminders_follow_the_renotify_interval() {
    for (name, home) in homes().await {
        let outbox = home.open().await;
        let firing = || to(1, &[alert("a", "warning", true)]);
        let queued = |a: mad::relay::Accepted| a.queued_messages;
        assert_eq!(
            queued(outbox.accept(firing(), 0, Some(600)).await.expect("accept")),
            1
        );
        assert_eq!(
            queued(
                outbox
                    .accept(firing(), 300, Some(600))
                    .await
                    .expect("accept")
            ),
            0,
            "{name}"
        );
        assert_eq!(
            queued(
                outbox
                    .accept(firing(), 600, Some(600))
                    .await
                    .expect("accept")
            ),
            1,
            "{name}"
        );
        let none = HashSet::new();
        outbox.next_for(&none).await.expect("next").expect("firing");
        let (len, oldest) = outbox.backlog().await.expect("backlog");
        assert_eq!((len, oldest), (2, Some(0)), "{name}");
        home.close().await;
    }
}

#[tokio::test]
async fn state_survives_reopening_and_dead_letters_leave_the_queue() {
    for (name, home) in homes().await {
        {
            let outbox = home.open().await;
            outbox
                .accept(to(1, &[alert("a", "warning", true)]), 0, None)
                .await
                .expect("accept");
            outbox.set_update_offset(42).await.expect("offset");
        }
        let outbox = home.open().await;
        let none = HashSet::new();
        let pending = outbox
            .next_for(&none)
            .await
            .expect("next")
            .expect("still queued after reopening");
        assert_eq!(pending.alerts[0].labels["instance"], "a", "{name}");
        assert_eq!(outbox.update_offset().await.expect("offset"), 42, "{name}");
        outbox.give_up(&pending).await.expect("dead letter");
        assert_eq!(
            outbox.backlog().await.expect("backlog"),
            (0, None),
            "{name}"
        );
        let repeat = outbox
            .accept(to(1, &[alert("a", "warning", true)]), 10, None)
            .await
            .expect("accept");
        assert_eq!(
            repeat.queued_messages, 0,
            "{name}: the alert is still known after reopening"
        );
        home.close().await;
    }
}

#[tokio::test]
async fn silenced_series_send_nothing_until_the_silence_ends_or_is_removed() {
    for (name, home) in homes().await {
        let outbox = home.open().await;
        let matchers = mad::relay::series_matchers(&alert("a", "warning", true).labels);
        let silence = outbox
            .add_silence(matchers, 3_600, "@oncall", 0)
            .await
            .expect("silence");
        let a = outbox
            .accept(
                to(
                    1,
                    &[alert("a", "critical", true), alert("b", "warning", true)],
                ),
                10,
                None,
            )
            .await
            .expect("accept");
        assert_eq!(
            (a.silenced, a.queued_messages),
            (1, 1),
            "{name}: b still notifies"
        );
        assert_eq!(
            outbox.silences(10).await.expect("list"),
            vec![silence.clone()],
            "{name}"
        );
        assert!(
            outbox.silences(3_600).await.expect("list").is_empty(),
            "{name}: expired"
        );
        assert!(outbox.remove_silence(silence.id).await.expect("remove"));
        assert!(
            !outbox
                .remove_silence(silence.id)
                .await
                .expect("remove again"),
            "{name}"
        );
        // The silenced firing was recorded: its resolution is news, though nobody saw it fire.
        let resolved = outbox
            .accept(to(1, &[alert("a", "critical", false)]), 20, None)
            .await
            .expect("accept");
        assert_eq!(resolved.queued_messages, 1, "{name}");
        home.close().await;
    }
}

/// Two relays (or two intake requests) about the same alert at once: one message, not two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_intake_of_one_alert_in_postgres_queues_it_once() {
    let db = TestDb::new().await;
    let home = Home::Postgres(db);
    let (one, two) = (home.open().await, home.open().await);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let outbox = if i % 2 == 0 { one.clone() } else { two.clone() };
        tasks.push(tokio::spawn(async move {
            outbox
                .accept(to(1, &[alert("same", "warning", true)]), i, None)
                .await
                .expect("accept")
                .queued_messages
        }));
    }
    let mut queued = 0;
    for t in tasks {
        queued += t.await.expect("task");
    }
    assert_eq!(queued, 1);
    assert_eq!(one.backlog().await.expect("backlog").0, 1);
    home.close().await;
}

#[tokio::test]
async fn a_database_that_is_gone_is_a_clear_error_naming_it() {
    let db = TestDb::new().await;
    let store = db.store().await;
    store.migrate().await.expect("migrate");
    let outbox = PgOutbox::new(Arc::new(store));
    db.drop().await;
    let err = outbox
        .accept(to(1, &[alert("a", "warning", true)]), 0, None)
        .await
        .expect_err("the database is gone")
        .to_string();
    assert!(
        err.starts_with("relay state postgres@127.0.0.1:5432/"),
        "{err}"
    );
}
