//! The soak: the whole local stack on loopback — VictoriaMetrics scraping `mad serve`, vmalert
//! evaluating the generated rules, `mad relay` delivering to a fake Telegram Bot API — kept
//! running with series coming and going and incidents injected. What a user checks: every
//! incident gives exactly one FIRING and one RESOLVED message, and the memory and file
//! descriptors of the long-running processes stay flat.
//!
//! Rounds of [`ROUND_SECS`]: in each, the oldest series leaves, a new one arrives (with no
//! history, so the exporter must warm it up from live data), and a spike is injected into a
//! series that has been live for four rounds. It lasts `MAD_SOAK_SECS` (default 150 s, so CI
//! can afford it); `scripts/soak.sh` runs the hour the README's figures come from.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::feeder::{rhythmic, spike};
use common::process::Process;
use common::stack::Stack;
use common::telegram::{alerts_in, Sent};
use mad::config::Config;
use mad::source::unix_now as now;
use mad::synth::{Incident, Profile, Synth};

const HISTORY_SECS: i64 = 2 * 3600;
/// Series live at any moment.
const LIVE_SERIES: usize = 6;
const ROUND_SECS: i64 = 60;
/// Where in its round the spike starts, and how long it lasts.
const INCIDENT_AT: i64 = 10;
const INCIDENT_SECS: i64 = 8;
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// After the last round: time for its resolution to arrive, then for anything sent twice.
const DRAIN: Duration = Duration::from_secs(60);
const QUIET: Duration = Duration::from_secs(6);

fn soak_secs() -> i64 {
    std::env::var("MAD_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150)
}

fn instance(index: usize) -> String {
    format!("svc-{index:03}")
}

/// Similar services with their own level and rhythm.
fn profile(index: usize) -> Profile {
    rhythmic(
        "app_requests_rate",
        &[("instance", &instance(index))],
        40.0 + (index * 37 % 80) as f64,
        300.0 + (index * 53 % 300) as f64,
    )
}

/// Series `index` is live in round `round` (negative rounds are the imported history): the
/// first [`LIVE_SERIES`] are there from the start, and in round `r` series `r - 1` leaves as
/// series `r + LIVE_SERIES - 1` arrives.
fn live(index: usize, round: i64) -> bool {
    let index = index as i64;
    let arrives = if index < LIVE_SERIES as i64 {
        i64::MIN
    } else {
        index - LIVE_SERIES as i64 + 1
    };
    round >= arrives && round <= index
}

/// The spike of round `round`: on series `round + 1`, live since four rounds (longer than the
/// exporter's warm-up) and leaving a round after it.
fn incident(live_start: i64, round: i64) -> Incident {
    let start = live_start + round * ROUND_SECS + INCIDENT_AT;
    spike(round as usize + 1, start, INCIDENT_SECS, 1.0)
}

/// Resident memory (KiB) and open file descriptors of a process, from /proc.
fn usage(pid: u32) -> Option<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

#[derive(Clone, Copy)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: usize,
}

/// Samples of one process over the run.
struct Trace {
    name: &'static str,
    pid: u32,
    samples: Vec<Sample>,
}

impl Trace {
    fn within(&self, from: Duration, to: Duration) -> impl Iterator<Item = &Sample> {
        self.samples
            .iter()
            .filter(move |s| s.at >= from && s.at <= to)
    }

    fn median_rss(&self, from: Duration, to: Duration) -> u64 {
        let mut rss: Vec<u64> = self.within(from, to).map(|s| s.rss_kib).collect();
        rss.sort_unstable();
        rss.get(rss.len() / 2).copied().unwrap_or(0)
    }

    fn max_fds(&self, from: Duration, to: Duration) -> usize {
        self.within(from, to).map(|s| s.fds).max().unwrap_or(0)
    }
}

/// Per instance: the FIRING and RESOLVED messages that name it.
#[derive(Default)]
struct Mentions {
    firing: Vec<Sent>,
    resolved: Vec<Sent>,
}

fn mentions(messages: &[Sent]) -> BTreeMap<String, Mentions> {
    let mut by_instance: BTreeMap<String, Mentions> = BTreeMap::new();
    for m in messages {
        for name in alerts_in(&m.text) {
            let entry = by_instance.entry(name).or_default();
            if m.text.contains("RESOLVED") {
                entry.resolved.push(m.clone());
            } else {
                entry.firing.push(m.clone());
            }
        }
    }
    by_instance
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_stays_flat_and_alerts_every_incident_once() {
    let duration = soak_secs();
    let rounds = (duration / ROUND_SECS).max(1);
    let stack = Stack::start().await;
    let (dir, vm, telegram) = (stack.dir(), &stack.vm, &stack.telegram);
    let (serve_port, relay_port) = (stack.serve_port, stack.relay_port);

    let start = now();
    let live_start = start + 1;
    let synth = Arc::new(Synth {
        profiles: (0..rounds as usize + LIVE_SERIES).map(profile).collect(),
        incidents: (0..rounds).map(|r| incident(live_start, r)).collect(),
        seed: 17,
        origin: start - HISTORY_SECS,
    });
    let mut history = String::new();
    for ts in start - HISTORY_SECS..=start {
        for index in 0..LIVE_SERIES {
            synth.sample_of(index, ts, &mut history);
        }
    }
    vm.import(history).await.expect("import history");

    let config_file = dir.join("soak.yaml");
    let text = stack.config_text("soak", "5s", "");
    std::fs::write(&config_file, &text).expect("write config");
    let config = Config::parse(&text, &config_file).expect("soak config is valid");
    let trained = mad::train::run(&config, &[], Some(start))
        .await
        .expect("training succeeds");
    assert_eq!(trained[0].series, LIVE_SERIES);
    let rules = mad::rules::write(&config, &dir.join("rules")).expect("write rules");

    let mad = |what: &str| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_mad"));
        command
            .args([what, "--config"])
            .arg(&config_file)
            .stdin(Stdio::null());
        command
    };
    let mut serve = Process::spawn("mad serve", &mut mad("serve"), dir.join("serve.log"));
    serve
        .wait_ok(&format!("http://127.0.0.1:{serve_port}/healthz"))
        .await;
    let mut relay = common::relay::start(&config_file, relay_port, dir.join("relay.log")).await;
    let relay_url = format!("http://127.0.0.1:{relay_port}");
    let mut vmalert = stack.vmalert(&rules, &relay_url, true).await;

    let began = Instant::now();
    let began_unix = now();
    let traces: Arc<Mutex<Vec<Trace>>> = Arc::new(Mutex::new(
        [
            ("mad serve", serve.pid()),
            ("mad relay", relay.pid()),
            ("vmalert", vmalert.pid()),
        ]
        .into_iter()
        .map(|(name, pid)| Trace {
            name,
            pid,
            samples: Vec::new(),
        })
        .collect(),
    ));
    let tracked_max = Arc::new(Mutex::new(0.0f64));
    let sampler = {
        let (traces, tracked_max) = (traces.clone(), tracked_max.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                for trace in traces.lock().expect("traces").iter_mut() {
                    if let Some((rss_kib, fds)) = usage(trace.pid) {
                        trace.samples.push(Sample {
                            at: began.elapsed(),
                            rss_kib,
                            fds,
                        });
                    }
                }
                if let Ok(r) = http
                    .get(format!("http://127.0.0.1:{serve_port}/metrics"))
                    .send()
                    .await
                {
                    let text = r.text().await.unwrap_or_default();
                    let tracked = text
                        .lines()
                        .find_map(|l| l.strip_prefix("mad_series_tracked{detector=\"soak\"} "))
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        .unwrap_or(0.0);
                    let mut max = tracked_max.lock().expect("tracked");
                    *max = max.max(tracked);
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        })
    };

    // One point a second for the live series, a round at a time.
    let end = live_start + rounds * ROUND_SECS;
    for ts in live_start..end {
        let wait = ts - now();
        if wait > 0 {
            tokio::time::sleep(Duration::from_secs(wait as u64)).await;
        }
        let round = (ts - live_start) / ROUND_SECS;
        let mut lines = String::new();
        for index in (0..synth.profiles.len()).filter(|&i| live(i, round)) {
            synth.sample_of(index, ts, &mut lines);
        }
        vm.import(lines).await.expect("import live points");
        for process in [&mut serve, &mut relay, &mut vmalert] {
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!("exited with {status} mid-soak\n{}", process.log_tail());
            }
        }
        if (ts - live_start + 1) % ROUND_SECS == 0 {
            let sent = telegram.sent().len();
            let traces = traces.lock().expect("traces");
            let rss: Vec<String> = traces
                .iter()
                .filter_map(|t| {
                    let s = t.samples.last()?;
                    Some(format!(
                        "{} {:.0} MiB {} fds",
                        t.name,
                        mib(s.rss_kib),
                        s.fds
                    ))
                })
                .collect();
            println!(
                "round {}/{rounds}: {sent} messages; {}",
                round + 1,
                rss.join(", ")
            );
        }
    }

    let last = instance(rounds as usize);
    let deadline = Instant::now() + DRAIN;
    while mentions(&telegram.sent())
        .get(&last)
        .is_none_or(|m| m.resolved.is_empty())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(QUIET).await;
    let ran = began.elapsed();
    sampler.abort();
    let messages = telegram.sent();
    let logs = format!(
        "{}\n{}\n{}",
        serve.log_tail(),
        relay.log_tail(),
        vmalert.log_tail()
    );
    let unix_of = |m: &Sent| began_unix as f64 + m.at.duration_since(began).as_secs_f64();

    // Every incident: one FIRING after it began, one RESOLVED replying to it.
    let by_instance = mentions(&messages);
    let mut delays = Vec::new();
    for round in 0..rounds {
        let incident = incident(live_start, round);
        let name = instance(incident.series);
        let none = Mentions::default();
        let seen = by_instance.get(&name).unwrap_or(&none);
        let texts = |list: &[Sent]| list.iter().map(|m| m.text.clone()).collect::<Vec<_>>();
        assert_eq!(
            (seen.firing.len(), seen.resolved.len()),
            (1, 1),
            "round {round}, {name}: expected one FIRING and one RESOLVED message, got {:#?} \
             and {:#?}\n{logs}",
            texts(&seen.firing),
            texts(&seen.resolved)
        );
        let (firing, resolved) = (&seen.firing[0], &seen.resolved[0]);
        assert!(
            unix_of(firing) >= incident.start as f64,
            "round {round}, {name}: FIRING before the spike"
        );
        assert_eq!(
            resolved.reply_to,
            Some(firing.message_id),
            "round {round}, {name}: the resolution replies to its alert"
        );
        delays.push((
            unix_of(firing) - incident.start as f64,
            unix_of(resolved) - (incident.end + 1) as f64,
        ));
    }
    let incident_series: Vec<String> = (0..rounds).map(|r| instance(r as usize + 1)).collect();
    let other_alerts: usize = by_instance
        .iter()
        .filter(|(name, _)| !incident_series.contains(name))
        .map(|(_, m)| m.firing.len())
        .sum();

    // Flat: the last fifth of the run against the round after warm-up (the first incident
    // delivered, every code path taken once).
    let warm = (
        Duration::from_secs(ROUND_SECS as u64),
        Duration::from_secs(2 * ROUND_SECS as u64),
    );
    let tail = (ran.mul_f64(0.8), ran);
    let traces = traces.lock().expect("traces");
    println!(
        "soak {:.0} min: {rounds} incidents, each one FIRING and one RESOLVED; {} series left \
         and as many arrived; {other_alerts} other alerts; exporter tracked at most {} series",
        ran.as_secs_f64() / 60.0,
        rounds - 1,
        *tracked_max.lock().expect("tracked")
    );
    let mean = |f: fn(&(f64, f64)) -> f64| delays.iter().map(f).sum::<f64>() / delays.len() as f64;
    println!(
        "spike -> FIRING mean {:.1} s; spike over -> RESOLVED mean {:.1} s",
        mean(|d| d.0),
        mean(|d| d.1)
    );
    for trace in traces.iter() {
        let max_rss = trace.samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
        let (warm_rss, tail_rss) = (
            trace.median_rss(warm.0, warm.1),
            trace.median_rss(tail.0, tail.1),
        );
        let (warm_fds, tail_fds) = (trace.max_fds(warm.0, warm.1), trace.max_fds(tail.0, tail.1));
        println!(
            "{}: RSS {:.1} MiB after warm-up, {:.1} MiB at the end ({:.2}x), max {:.1} MiB; \
             fds {warm_fds} after warm-up, {tail_fds} at the end ({} samples)",
            trace.name,
            mib(warm_rss),
            mib(tail_rss),
            tail_rss as f64 / warm_rss.max(1) as f64,
            mib(max_rss),
            trace.samples.len()
        );
    }
    // The series that left are forgotten (staleness 10 s, far less than a round): the state
    // kept does not grow with the churn.
    let tracked = *tracked_max.lock().expect("tracked");
    assert!(
        tracked <= (2 * LIVE_SERIES) as f64,
        "the exporter tracked {tracked} series, {LIVE_SERIES} are live"
    );
    for trace in traces.iter().filter(|t| t.name.starts_with("mad")) {
        let (warm_rss, tail_rss) = (
            trace.median_rss(warm.0, warm.1),
            trace.median_rss(tail.0, tail.1),
        );
        let (warm_fds, tail_fds) = (trace.max_fds(warm.0, warm.1), trace.max_fds(tail.0, tail.1));
        assert!(
            warm_rss > 0,
            "{}: no memory sample after warm-up",
            trace.name
        );
        // Loose bounds: they catch a leak, not the allocator's breathing.
        assert!(
            tail_rss <= warm_rss + warm_rss / 2 + 16 * 1024,
            "{}: memory grew from {:.1} to {:.1} MiB",
            trace.name,
            mib(warm_rss),
            mib(tail_rss)
        );
        assert!(
            tail_fds <= warm_fds + 8,
            "{}: file descriptors grew from {warm_fds} to {tail_fds}",
            trace.name
        );
    }
}
