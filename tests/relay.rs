//! `mad relay` against a fake Telegram Bot API on loopback: deduplication, replies on
//! resolution, 429 handling, intake errors, and delivery that survives a SIGKILL.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::telegram::{Answer, FakeTelegram};
use mad::config::Config;
use mad::demo::free_port;

const TOKEN: &str = "424242:AAH-very-secret-bot-token";

fn config_text(dir: &Path, port: u16, telegram_url: &str) -> String {
    let relay =
        common::relay::config_text(dir, port, telegram_url, TOKEN, "cpu", &[("db".into(), 200)]);
    // Besides the bearer token, the basic auth vmalert may send instead (a key of `relay:`).
    format!("{relay}  intake_basic_auth: {{ username: vmalert, password: \"basic-secret\" }}\n")
}

fn alerts(instances: &[&str], firing: bool, team: &str) -> String {
    let ends = if firing {
        "2999-01-01T00:00:00Z"
    } else {
        "2020-01-01T00:05:00Z"
    };
    let items: Vec<String> = instances
        .iter()
        .map(|i| {
            format!(
                r#"{{"labels":{{"alertname":"MadAnomaly","alertname":"MadAnomaly","for":"cpu","instance":"{i}","team":"{team}"}},
                 "annotations":{{"summary":"score <3> & rising"}},"startsAt":"2020-01-01T00:00:00Z","endsAt":"{ends}",
                 "generatorURL":"http://vmalert/rule"}}"#
            )
        })
        .collect();
    format!("[{}]", items.join(","))
}

async fn post(port: u16, body: String, token: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/api/v2/alerts"))
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("relay reachable");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

async fn wait_for(what: &str, timeout: Duration, check: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start_in_process(
    dir: &Path,
    telegram: &FakeTelegram,
) -> (
    u16,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let port = free_port().expect("port");
    let config = Config::parse(
        &config_text(dir, port, &telegram.url),
        Path::new("relay.yaml"),
    )
    .expect("config");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(mad::relay::run(config, async {
        let _ = rx.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(10);
    while reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "relay did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (port, tx, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_per_firing_and_one_reply_per_resolution() {
    let dir = tempfile::tempdir().expect("tempdir");
    let telegram = FakeTelegram::start().await;
    let (port, stop, task) = start_in_process(dir.path(), &telegram).await;

    let (status, _) = post(
        port,
        alerts(&["a", "b"], true, "web"),
        Some("intake-secret"),
    )
    .await;
    assert_eq!(status, 200);
    wait_for("the firing message", Duration::from_secs(10), || {
        telegram.sent().len() == 1
    })
    .await;
    // vmalert repeats on every evaluation: nothing more is sent.
    for _ in 0..3 {
        assert_eq!(
            post(
                port,
                alerts(&["a", "b"], true, "web"),
                Some("intake-secret")
            )
            .await
            .0,
            200
        );
    }
    post(port, alerts(&["c"], true, "db"), Some("intake-secret")).await;
    wait_for("the routed message", Duration::from_secs(10), || {
        telegram.sent().len() == 2
    })
    .await;
    post(port, alerts(&["a"], false, "web"), Some("intake-secret")).await;
    wait_for("the resolution", Duration::from_secs(10), || {
        telegram.sent().len() == 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let sent = telegram.sent();
    assert_eq!(sent.len(), 3, "{sent:?}");
    let firing = &sent[0];
    assert_eq!(firing.chat_id, 100);
    assert_eq!(firing.parse_mode.as_deref(), Some("HTML"));
    assert!(
        firing.text.contains("FIRING") && firing.text.contains("(2 alerts)"),
        "{}",
        firing.text
    );
    assert!(
        firing.text.contains("score &lt;3&gt; &amp; rising"),
        "escaped: {}",
        firing.text
    );
    assert_eq!(sent[1].chat_id, 200, "routed by label");
    let resolved = &sent[2];
    assert!(
        resolved.text.contains("RESOLVED") && resolved.text.contains("instance=a"),
        "{}",
        resolved.text
    );
    assert_eq!(
        resolved.reply_to,
        Some(firing.message_id),
        "the resolution replies to the firing message"
    );
    assert!(telegram
        .paths()
        .iter()
        .all(|p| p.starts_with(&format!("/bot{TOKEN}/"))));

    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap_or_default();
    assert!(
        metrics.contains("mad_relay_sent_total{chat=\"100\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mad_relay_deduplicated_total 6"),
        "{metrics}"
    );
    let _ = stop.send(());
    task.await.expect("task").expect("relay stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_honoured_and_refused_messages_do_not_block_the_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let telegram = FakeTelegram::start().await;
    telegram.plan(&[Answer::RetryAfter(1)]);
    let (port, stop, task) = start_in_process(dir.path(), &telegram).await;
    let started = Instant::now();
    post(port, alerts(&["a"], true, "web"), Some("intake-secret")).await;
    wait_for("delivery after the 429", Duration::from_secs(10), || {
        telegram.sent().len() == 1
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited retry_after before retrying"
    );
    assert_eq!(telegram.calls(), 2);

    // A message Telegram keeps refusing is set aside after a few tries; the next one goes out.
    telegram.plan(&[Answer::Refuse; 5]);
    post(port, alerts(&["x"], true, "web"), Some("intake-secret")).await;
    post(port, alerts(&["y"], true, "web"), Some("intake-secret")).await;
    wait_for(
        "the message behind the refused one",
        Duration::from_secs(60),
        || telegram.sent().len() == 2,
    )
    .await;
    assert!(telegram.sent()[1].text.contains("instance=y"));
    let _ = stop.send(());
    task.await.expect("task").expect("relay stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_intake_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let telegram = FakeTelegram::start().await;
    let (port, stop, task) = start_in_process(dir.path(), &telegram).await;
    assert_eq!(post(port, alerts(&["a"], true, "web"), None).await.0, 401);
    assert_eq!(
        post(port, alerts(&["a"], true, "web"), Some("wrong"))
            .await
            .0,
        401
    );
    for body in [
        "",
        "{",
        "[{\"labels\":{}}]",
        "[{\"labels\":{\"a\":\"b\"},\"endsAt\":\"someday\"}]",
    ] {
        let (status, text) = post(port, body.to_string(), Some("intake-secret")).await;
        assert_eq!(status, 400, "{body:?}: {text}");
        assert!(text.contains("\"error\""), "{text}");
    }
    let huge = format!(
        "[{}]",
        vec!["{\"labels\":{\"a\":\"b\"}}"; 200_000].join(",")
    );
    assert_eq!(post(port, huge, Some("intake-secret")).await.0, 413);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(telegram.sent().is_empty(), "nothing was accepted");
    let _ = stop.send(());
    task.await.expect("task").expect("relay stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_alerts_survive_a_sigkill_and_telegram_being_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port().expect("port");
    let down = format!("http://127.0.0.1:{}", free_port().expect("port"));
    let config: PathBuf = dir.path().join("relay.yaml");
    std::fs::write(&config, config_text(dir.path(), port, &down)).expect("config");
    let first_log = dir.path().join("first.log");
    let mut relay = common::relay::start(&config, port, first_log.clone()).await;
    for i in 0..20 {
        let (status, _) = post(
            port,
            alerts(&[&format!("host-{i}")], true, "web"),
            Some("intake-secret"),
        )
        .await;
        assert_eq!(status, 200, "accepted while Telegram is unreachable");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.kill();

    // Back up, with Telegram reachable: everything accepted is delivered, once.
    let telegram = FakeTelegram::start().await;
    std::fs::write(&config, config_text(dir.path(), port, &telegram.url)).expect("config");
    let second_log = dir.path().join("second.log");
    let mut relay = common::relay::start(&config, port, second_log.clone()).await;
    wait_for("all 20 alerts", Duration::from_secs(60), || {
        telegram.sent().len() == 20
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = Command::new("kill")
        .args(["-TERM", &relay.pid().to_string()])
        .status();
    let _ = relay.child.wait();
    let sent = telegram.sent();
    assert_eq!(sent.len(), 20, "nothing doubled");
    for i in 0..20 {
        let needle = format!("instance=host-{i},");
        assert_eq!(
            sent.iter().filter(|m| m.text.contains(&needle)).count(),
            1,
            "host-{i}"
        );
    }

    // The first run failed to reach Telegram for seconds: its log says so, without the token.
    let log = std::fs::read_to_string(&first_log).expect("log");
    assert!(log.contains("cannot reach Telegram"), "{log}");
    assert!(
        !log.contains(TOKEN) && !log.contains("very-secret"),
        "the bot token leaked into the log"
    );
    let log = std::fs::read_to_string(&second_log).expect("log");
    assert!(!log.contains(TOKEN));
}

fn callback(data: &str, chat: i64, message_id: i64) -> serde_json::Value {
    serde_json::json!({"callback_query": {
        "id": format!("cb-{chat}-{message_id}-{data}"),
        "from": {"id": 7, "is_bot": false, "first_name": "Ann", "username": "ann"},
        "chat_instance": "ci",
        "data": data,
        "message": {"message_id": message_id, "date": 1_700_000_000,
                    "chat": {"id": chat, "type": "private"}, "text": "alert"}}})
}

fn command(text: &str, chat: i64) -> serde_json::Value {
    serde_json::json!({"message": {
        "message_id": 9_000, "date": 1_700_000_000,
        "chat": {"id": chat, "type": "private"},
        "from": {"id": 7, "is_bot": false, "first_name": "Ann", "username": "ann"},
        "text": text}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buttons_silence_a_series_and_commands_manage_silences() {
    let dir = tempfile::tempdir().expect("tempdir");
    let telegram = FakeTelegram::start().await;
    let (port, stop, task) = start_in_process(dir.path(), &telegram).await;
    let token = Some("intake-secret");
    post(port, alerts(&["a"], true, "web"), token).await;
    wait_for("the firing message", Duration::from_secs(10), || {
        telegram.sent().len() == 1
    })
    .await;
    let firing = telegram.sent()[0].clone();
    let buttons = firing.reply_markup.to_string();
    for data in ["silence:3600", "silence:86400", "ack"] {
        assert!(buttons.contains(data), "button {data} missing: {buttons}");
    }

    // A chat the relay does not post to may not act.
    telegram.push_update(callback("silence:3600", 999, firing.message_id));
    wait_for("the refusal", Duration::from_secs(10), || {
        !telegram.answers().is_empty()
    })
    .await;
    assert!(
        telegram.answers()[0].contains("may not"),
        "{:?}",
        telegram.answers()
    );

    telegram.push_update(callback("silence:3600", 100, firing.message_id));
    wait_for("the silence", Duration::from_secs(10), || {
        telegram.answers().len() == 2
    })
    .await;
    assert_eq!(telegram.answers()[1], "🔕 Silenced for 1 h by @ann");
    wait_for("the message edit", Duration::from_secs(10), || {
        !telegram.edits().is_empty()
    })
    .await;
    let (chat, id, text) = telegram.edits()[0].clone();
    assert_eq!((chat, id), (100, firing.message_id));
    assert!(
        text.contains("Silenced for 1 h by @ann") && text.contains("instance=a"),
        "{text}"
    );

    // Silenced: neither the resolution nor a new firing of this series is sent; others are.
    post(port, alerts(&["a"], false, "web"), token).await;
    post(port, alerts(&["a"], true, "web"), token).await;
    post(port, alerts(&["b"], true, "web"), token).await;
    wait_for("b's message", Duration::from_secs(10), || {
        telegram.sent().len() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        telegram.sent().len(),
        2,
        "a stays quiet: {:?}",
        telegram.sent()
    );

    telegram.push_update(command("/silences", 100));
    wait_for("the listing", Duration::from_secs(10), || {
        telegram.sent().len() == 3
    })
    .await;
    let listing = telegram.sent()[2].text.clone();
    assert!(
        listing.contains("#1") && listing.contains("instance=a") && listing.contains("@ann"),
        "{listing}"
    );
    telegram.push_update(command("/unsilence 1", 100));
    wait_for("the removal", Duration::from_secs(10), || {
        telegram.sent().len() == 4
    })
    .await;
    assert_eq!(telegram.sent()[3].text, "Silence #1 removed.");

    // Unsilenced: a's resolution goes out again.
    post(port, alerts(&["a"], false, "web"), token).await;
    wait_for("a's resolution", Duration::from_secs(10), || {
        telegram.sent().len() == 5
    })
    .await;
    assert!(telegram.sent()[4].text.contains("RESOLVED"));
    let _ = stop.send(());
    task.await.expect("task").expect("relay stops cleanly");
}
