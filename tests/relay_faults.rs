//! `mad relay` under faults: a burst of 1,000 distinct alerts while Telegram rate-limits 30% of
//! the calls and the relay process is SIGKILLed in the middle of delivering them. Every alert must
//! reach Telegram exactly once, the relay's counters must add up, and the bot token must not
//! appear in its log.
//!
//! The kill is placed deterministically: the fake Telegram holds one sendMessage unanswered (as if
//! Telegram had not processed it yet) and the test kills the relay while that request is in
//! flight. (A kill in the few microseconds between Telegram accepting a message and the relay
//! recording it would make that one message go out twice after the restart: Telegram has no
//! idempotency key, so that window is at-least-once by nature and is not what this test is about.)

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::relay::{DEFAULT_CHAT, INTAKE};
use common::telegram::{alerts_in, hidden_in, FakeTelegram, Outcome};
use mad::demo::free_port;

const TOKEN: &str = "777001:AAF-burst-test-secret-token";
const ALERTS: usize = 1_000;
const REQUESTS: usize = 10;
const PER_REQUEST: usize = ALERTS / REQUESTS;
/// `team=t0` goes to the default chat, t1..t4 through routes: five chats.
const TEAMS: usize = 5;
/// Requests posted before delivery is held; one more while it is held, the rest once the relay
/// has been killed (refused until it is back).
const BEFORE_KILL: usize = 6;
/// The sendMessage call held unanswered while the relay is killed.
const HELD_CALL: u64 = 5;

fn chat_of(team: usize) -> i64 {
    DEFAULT_CHAT + team as i64
}

/// `postgres`: the outbox's database URL; `None` keeps it in the embedded redb file.
fn config_text(dir: &Path, port: u16, telegram_url: &str, postgres: Option<&str>) -> String {
    let routes: Vec<(String, i64)> = (1..TEAMS).map(|t| (format!("t{t}"), chat_of(t))).collect();
    let store = postgres.map_or(String::new(), |url| {
        format!("store: {{ postgres: \"{url}\" }}\n")
    });
    let relay = common::relay::config_text(dir, port, telegram_url, TOKEN, "burst", &routes);
    format!("{store}{relay}")
}

fn instance(i: usize) -> String {
    format!("burst-{i:04}")
}

/// vmalert's body for request `r`: alerts `r*100 .. r*100+100`, spread over the teams.
fn request_body(r: usize) -> String {
    let items: Vec<String> = (r * PER_REQUEST..(r + 1) * PER_REQUEST)
        .map(|i| {
            format!(
                r#"{{"labels":{{"alertname":"MadAnomaly","for":"burst","severity":"warning","instance":"{}","team":"t{}"}},
                 "annotations":{{"summary":"burst alert {i}"}},"startsAt":"2020-01-01T00:00:00Z",
                 "endsAt":"2999-01-01T00:00:00Z","generatorURL":"http://vmalert/rule"}}"#,
                instance(i),
                i % TEAMS
            )
        })
        .collect();
    format!("[{}]", items.join(","))
}

/// What happened to the test's intake requests.
#[derive(Default, Debug, Clone)]
struct Posts {
    /// (request index, accepted at).
    accepted: Vec<(usize, Instant)>,
    /// Attempts refused at connect (relay down).
    refused: usize,
    /// Attempts that failed after connecting (the relay died with the request in flight).
    broken: usize,
}

/// Posts request `r` like vmalert would: again and again until a 2xx.
async fn post_until_accepted(port: u16, r: usize, posts: &Mutex<Posts>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "request {r} never accepted");
        let result = client
            .post(format!("http://127.0.0.1:{port}/api/v2/alerts"))
            .bearer_auth(INTAKE)
            .body(request_body(r))
            .send()
            .await;
        match result {
            Ok(response) if response.status().is_success() => {
                if let Ok(mut p) = posts.lock() {
                    p.accepted.push((r, Instant::now()));
                }
                return;
            }
            Ok(response) => panic!("request {r}: HTTP {}", response.status()),
            Err(e) => {
                if let Ok(mut p) = posts.lock() {
                    if e.is_connect() {
                        p.refused += 1;
                    } else {
                        p.broken += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The relay's `/metrics` as name{labels} → value.
async fn metrics(port: u16) -> BTreeMap<String, f64> {
    let text = common::exporter::metrics(port).await;
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn metric(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    m.get(name).copied().unwrap_or(0.0)
}

/// Sum of a family over its labels (`name{...}`), 0 when absent.
fn family_sum(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.as_str() == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

/// How many sendMessage calls ended how, between two instants.
fn count(outcomes: &[(Outcome, Instant)], kind: Outcome, from: Instant, to: Instant) -> usize {
    outcomes
        .iter()
        .filter(|(o, at)| *o == kind && *at >= from && *at < to)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_survives_rate_limits_and_a_sigkill_exactly_once() {
    burst_with_a_sigkill(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_outbox_in_postgres_too() {
    let db = common::pg::TestDb::new().await;
    burst_with_a_sigkill(Some(&db.url)).await;
    db.drop().await;
}

async fn burst_with_a_sigkill(postgres: Option<&str>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let telegram = FakeTelegram::start().await;
    telegram.fail_percent(30);
    telegram.hold_call(HELD_CALL);
    let port = free_port().expect("port");
    let config = dir.path().join("relay.yaml");
    std::fs::write(
        &config,
        config_text(dir.path(), port, &telegram.url, postgres),
    )
    .expect("config");
    let (first_log, second_log) = (dir.path().join("first.log"), dir.path().join("second.log"));

    let mut first = common::relay::start(&config, port, first_log.clone()).await;
    let posts = Arc::new(Mutex::new(Posts::default()));
    let started = Instant::now();
    for r in 0..BEFORE_KILL {
        post_until_accepted(port, r, &posts).await;
    }

    // Mid-stream: Telegram has taken some messages and holds the next request. Intake goes on
    // meanwhile: one more request is accepted while delivery is stuck.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !telegram.held() {
        assert!(Instant::now() < deadline, "the held call never came");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    post_until_accepted(port, BEFORE_KILL, &posts).await;
    let before_kill = metrics(port).await;
    let killed_at = Instant::now();
    first.kill();
    telegram.release_dropping();
    let delivered_by_first = telegram.sent().len();
    let outcomes = telegram.outcomes();
    assert_eq!(
        family_sum(&before_kill, "mad_relay_sent_total") as usize,
        delivered_by_first,
        "sent_total of the first relay = messages Telegram took: {before_kill:?}"
    );
    assert_eq!(
        family_sum(&before_kill, "mad_relay_retries_total") as usize,
        count(&outcomes, Outcome::RetryAfter, started, killed_at),
        "retries_total of the first relay = 429s answered: {before_kill:?}"
    );

    // The rest of the burst keeps coming, like vmalert retrying: refused while the relay is
    // down, accepted once it is back on the same state.
    let late = {
        let posts = posts.clone();
        tokio::spawn(async move {
            for r in BEFORE_KILL + 1..REQUESTS {
                post_until_accepted(port, r, &posts).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let restarted_at = Instant::now();
    let second = common::relay::start(&config, port, second_log.clone()).await;
    late.await.expect("late posts");

    let deadline = Instant::now() + Duration::from_secs(150);
    let named = |sent: &[common::telegram::Sent]| -> usize {
        sent.iter().map(|m| alerts_in(&m.text).len()).sum()
    };
    while named(&telegram.sent()) < ALERTS {
        assert!(
            Instant::now() < deadline,
            "only {} of {ALERTS} alerts delivered",
            named(&telegram.sent())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let burst_took = started.elapsed();

    // vmalert keeps repeating firing alerts: the restarted relay remembers them all.
    let replay_from = second_metrics_received(port).await;
    for r in 0..REQUESTS {
        assert!(common::relay::post(port, request_body(r))
            .await
            .is_success());
    }
    // Anything doubled would show up now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent = telegram.sent();
    let outcomes = telegram.outcomes();
    let after = metrics(port).await;

    // Exactly once, complete, nothing hidden behind "… and N more", each in its team's chat.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for m in &sent {
        assert!(m.text.contains("FIRING"), "{}", m.text);
        assert_eq!(hidden_in(&m.text), 0, "a message hid alerts: {}", m.text);
        for name in alerts_in(&m.text) {
            let i: usize = name["burst-".len()..].parse().expect("instance number");
            assert_eq!(m.chat_id, chat_of(i % TEAMS), "{name} in the wrong chat");
            *seen.entry(name).or_default() += 1;
        }
    }
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "delivered more than once: {doubled:?}");
    let expected: BTreeSet<String> = (0..ALERTS).map(instance).collect();
    let missing: Vec<_> = expected.iter().filter(|i| !seen.contains_key(*i)).collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    assert_eq!(seen.len(), ALERTS);
    // In order per chat: the requests' alerts never overtake each other.
    for team in 0..TEAMS {
        let order: Vec<usize> = sent
            .iter()
            .filter(|m| m.chat_id == chat_of(team))
            .flat_map(|m| alerts_in(&m.text))
            .map(|n| n["burst-".len()..].parse().expect("number"))
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "chat {} out of order: {order:?}",
            chat_of(team)
        );
    }

    // The restarted relay's counters agree with what Telegram saw and what it was sent.
    let end = Instant::now();
    let by_second: Vec<_> = sent.iter().filter(|m| m.at >= restarted_at).collect();
    assert_eq!(
        family_sum(&after, "mad_relay_sent_total") as usize,
        by_second.len(),
        "{after:?}"
    );
    for team in 0..TEAMS {
        let chat = chat_of(team);
        assert_eq!(
            metric(&after, &format!("mad_relay_sent_total{{chat=\"{chat}\"}}")) as usize,
            by_second.iter().filter(|m| m.chat_id == chat).count(),
            "chat {chat}: {after:?}"
        );
    }
    assert_eq!(
        family_sum(&after, "mad_relay_retries_total") as usize,
        count(&outcomes, Outcome::RetryAfter, restarted_at, end),
        "retries = 429s answered to the second relay: {after:?}"
    );
    assert_eq!(
        family_sum(&after, "mad_relay_failed_total"),
        0.0,
        "{after:?}"
    );
    assert_eq!(metric(&after, "mad_relay_queued"), 0.0, "{after:?}");
    assert_eq!(
        metric(&after, "mad_relay_queue_oldest_age_seconds"),
        0.0,
        "{after:?}"
    );
    assert_eq!(metric(&after, "mad_relay_rejected_total"), 0.0);
    let p = posts.lock().expect("posts").clone();
    let accepted_by_second: Vec<usize> = p
        .accepted
        .iter()
        .filter(|(_, at)| *at >= restarted_at)
        .map(|(r, _)| *r)
        .collect();
    let received = metric(&after, "mad_relay_received_total") as usize;
    assert_eq!(
        received,
        (accepted_by_second.len() + REQUESTS) * PER_REQUEST,
        "received = alerts in the requests the second relay answered 2xx: {after:?}"
    );
    assert_eq!(replay_from + ALERTS, received);
    assert_eq!(
        accepted_by_second,
        (BEFORE_KILL + 1..REQUESTS).collect::<Vec<_>>(),
        "the requests posted after the kill were taken by the second relay: {p:?}"
    );
    assert!(p.refused > 0, "intake was refused while the relay was down");
    assert_eq!(p.broken, 0, "{p:?}");
    // Alerts new to the second relay are exactly those of the requests only it accepted; the
    // replay of all 1,000 is deduplicated against the state the first relay left.
    let deduplicated = metric(&after, "mad_relay_deduplicated_total") as usize;
    assert_eq!(
        received - deduplicated,
        accepted_by_second.len() * PER_REQUEST,
        "{after:?}"
    );

    // The 429s were real and logged; the token never was.
    let all_429 = outcomes
        .iter()
        .filter(|(o, _)| *o == Outcome::RetryAfter)
        .count();
    let calls = outcomes.len();
    assert!(
        (all_429 as f64 / calls as f64 - 0.3).abs() < 0.05,
        "{all_429} of {calls}"
    );
    for log in [&first_log, &second_log] {
        let text = std::fs::read_to_string(log).expect("log");
        assert!(text.contains("Telegram rate limit"), "{text}");
        assert!(
            !text.contains(TOKEN) && !text.contains("burst-test-secret"),
            "the bot token leaked into {}",
            log.display()
        );
    }
    assert!(telegram
        .paths()
        .iter()
        .all(|path| path.starts_with(&format!("/bot{TOKEN}/"))));
    drop(second);

    println!(
        "outbox in {}: burst of {ALERTS} alerts in {REQUESTS} requests to {TEAMS} chats: delivered in {:.1} s \
         ({} messages, {calls} sendMessage calls, {all_429} answered 429, relay killed after \
         {delivered_by_first} messages and down {:.1} s; {} intake attempts refused, {} broken)",
        if postgres.is_some() { "PostgreSQL" } else { "redb" },
        burst_took.as_secs_f64(),
        sent.len(),
        (restarted_at - killed_at).as_secs_f64(),
        p.refused,
        p.broken
    );
}

async fn second_metrics_received(port: u16) -> usize {
    metric(&metrics(port).await, "mad_relay_received_total") as usize
}
