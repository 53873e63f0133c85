//! Telegram unreachable for a while (`MAD_TELEGRAM_OUTAGE_SECS`, default 20 s for CI; the
//! README's figure is a 10-minute run), with alerts arriving all along and the relay SIGKILLed
//! halfway: intake keeps accepting, the outbox holds everything, the failure shows in the relay's
//! metrics, and once Telegram answers again every alert is delivered exactly once, in the order
//! it arrived, per chat.
//!
//! And the relay SIGKILLed at random moments while it delivers, again and again: every accepted
//! alert arrives, and one arrives twice only when the kill fell between Telegram's answer and
//! the relay recording it (Telegram has no idempotency key: re-sending is the price of losing
//! nothing).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::process::Process;
use common::relay::DEFAULT_CHAT;
use common::telegram::{alerts_in, hidden_in, FakeTelegram};
use mad::demo::free_port;

const TOKEN: &str = "777001:AAF-burst-test-secret-token";
/// Intake requests spread over the outage, a few alerts each.
const BATCHES: usize = 8;
const PER_BATCH: usize = 3;
const ROUTED_CHAT: i64 = 200;
/// The relay's longest retry backoff, plus room to send what piled up.
const DRAIN: Duration = Duration::from_secs(60 + 40);

/// A fake Telegram and the relay delivering to it; with the relay's port and config file, to
/// start it again after a kill.
async fn relay_to_telegram(dir: &Path) -> (FakeTelegram, u16, PathBuf, Process) {
    let telegram = FakeTelegram::start().await;
    let port = free_port().expect("port");
    let config = dir.join("mad.yaml");
    let text = common::relay::config_text(
        dir,
        port,
        &telegram.url,
        TOKEN,
        "outage",
        &[("db".into(), ROUTED_CHAT)],
    );
    std::fs::write(&config, text).expect("config");
    let relay = start_relay(&config, port).await;
    (telegram, port, config, relay)
}

/// The relay on `config`, up on `port`; every start logs to the same file.
async fn start_relay(config: &Path, port: u16) -> Process {
    let log = config.with_file_name("relay.log");
    common::relay::start(config, port, log).await
}

fn instance(i: usize) -> String {
    format!("outage-{i:03}")
}

/// Odd alerts go to the routed chat, even ones to the default chat.
fn chat_of(i: usize) -> i64 {
    if i % 2 == 1 {
        ROUTED_CHAT
    } else {
        DEFAULT_CHAT
    }
}

fn batch_body(batch: usize) -> String {
    let items: Vec<String> = (batch * PER_BATCH..(batch + 1) * PER_BATCH)
        .map(|i| {
            let team = if chat_of(i) == ROUTED_CHAT { "db" } else { "web" };
            format!(
                r#"{{"labels":{{"alertname":"MadAnomaly","for":"outage","severity":"warning","instance":"{}","team":"{team}"}},
                 "annotations":{{"summary":"alert {i}"}},"startsAt":"2020-01-01T00:00:00Z",
                 "endsAt":"2999-01-01T00:00:00Z","generatorURL":"http://vmalert/rule"}}"#,
                instance(i)
            )
        })
        .collect();
    format!("[{}]", items.join(","))
}

async fn post(port: u16, batch: usize) {
    let status = common::relay::post(port, batch_body(batch)).await;
    assert!(status.is_success(), "batch {batch}: HTTP {status}");
}

/// Sum of a metric family over its labels in the relay's `/metrics`.
async fn family_sum(port: u16, name: &str) -> f64 {
    let text = common::exporter::metrics(port).await;
    text.lines()
        .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_down_for_a_while_loses_nothing_and_keeps_order() {
    let outage = Duration::from_secs(
        std::env::var("MAD_TELEGRAM_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let (telegram, port, config, mut relay) = relay_to_telegram(tmp.path()).await;

    telegram.go_down();
    let down_at = Instant::now();
    let pause = outage / BATCHES as u32;
    for batch in 0..BATCHES {
        post(port, batch).await;
        if batch == BATCHES / 2 {
            // Killed with everything so far only in its outbox.
            drop(relay);
            relay = start_relay(&config, port).await;
        }
        tokio::time::sleep(pause).await;
    }
    while down_at.elapsed() < outage {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(telegram.sent().is_empty(), "nothing can arrive while down");
    assert!(
        family_sum(port, "mad_relay_queued").await > 0.0,
        "the outbox holds the alerts"
    );
    assert!(
        family_sum(port, "mad_relay_retries_total").await
            + family_sum(port, "mad_relay_failed_total").await
            > 0.0,
        "failed deliveries show in the metrics"
    );

    telegram.come_back().await;
    let back_at = Instant::now();
    let alerts = BATCHES * PER_BATCH;
    let deadline = Instant::now() + DRAIN;
    let delivered = loop {
        let sent = telegram.sent();
        let named: usize = sent.iter().map(|m| alerts_in(&m.text).len()).sum();
        if named >= alerts {
            println!(
                "{alerts} alerts held through a {outage:?} outage, delivered {:.1} s after \
                 Telegram came back",
                back_at.elapsed().as_secs_f64()
            );
            break sent;
        }
        assert!(
            Instant::now() < deadline,
            "only {named} of {alerts} alerts delivered {DRAIN:?} after Telegram came back"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // Let anything sent twice show up before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let delivered = {
        let later = telegram.sent();
        assert!(later.len() >= delivered.len());
        later
    };

    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut order: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for message in &delivered {
        assert_eq!(hidden_in(&message.text), 0, "{}", message.text);
        for name in alerts_in(&message.text) {
            *seen.entry(name.clone()).or_default() += 1;
            let i: usize = name
                .trim_start_matches("outage-")
                .parse()
                .expect("an instance the test sent");
            assert_eq!(message.chat_id, chat_of(i), "{name} went to the wrong chat");
            order.entry(message.chat_id).or_default().push(i);
        }
    }
    for i in 0..alerts {
        assert_eq!(
            seen.get(&instance(i)).copied().unwrap_or(0),
            1,
            "{} delivered other than once: {seen:?}",
            instance(i)
        );
    }
    for (chat, indices) in &order {
        let mut sorted = indices.clone();
        sorted.sort_unstable();
        assert_eq!(indices, &sorted, "chat {chat}: out of order");
    }
    assert_eq!(family_sum(port, "mad_relay_queued").await, 0.0);
    drop(relay);
}

/// Kill moments, reproducible: a seeded xorshift64*.
struct Moments(u64);

impl Moments {
    fn next_millis(&mut self, from: u64, to: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        from + self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % (to - from)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_again_and_again_while_delivering_loses_nothing() {
    let kills: usize = std::env::var("MAD_RELAY_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let tmp = tempfile::tempdir().expect("tempdir");
    let (telegram, port, config, mut relay) = relay_to_telegram(tmp.path()).await;

    let mut moments = Moments(0x5EED_0FC0_FFEE);
    let mut killed_at = Vec::new();
    let mut batches = 0;
    for _ in 0..kills {
        // Accepted alerts, then a kill while they are being delivered.
        for _ in 0..2 {
            post(port, batches).await;
            batches += 1;
        }
        tokio::time::sleep(Duration::from_millis(moments.next_millis(50, 1500))).await;
        drop(relay);
        killed_at.push(Instant::now());
        relay = start_relay(&config, port).await;
    }

    let alerts = batches * PER_BATCH;
    let deadline = Instant::now() + DRAIN;
    loop {
        let sent = telegram.sent();
        let named: BTreeMap<String, ()> = sent
            .iter()
            .flat_map(|m| alerts_in(&m.text))
            .map(|name| (name, ()))
            .collect();
        if named.len() >= alerts {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {alerts} alerts delivered {DRAIN:?} after the last of {kills} kills",
            named.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Let anything sent twice show up before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let delivered = telegram.sent();

    let mut first: BTreeMap<String, Instant> = BTreeMap::new();
    let mut again = 0;
    for message in &delivered {
        for name in alerts_in(&message.text) {
            match first.get(&name) {
                None => {
                    first.insert(name, message.at);
                }
                Some(&sent_at) => {
                    again += 1;
                    // Sending and recording take milliseconds; a second is room for a busy CI.
                    assert!(
                        killed_at
                            .iter()
                            .any(|k| *k >= sent_at && *k <= sent_at + Duration::from_secs(1)),
                        "{name} was sent twice though no kill fell right after its first send"
                    );
                }
            }
        }
    }
    for i in 0..alerts {
        assert!(first.contains_key(&instance(i)), "{} was lost", instance(i));
    }
    println!(
        "{kills} kills while delivering: all {alerts} accepted alerts delivered, {again} sent \
         again after a kill between Telegram's answer and its record"
    );
    assert_eq!(family_sum(port, "mad_relay_queued").await, 0.0);
    drop(relay);
}
