//! The whole alerting path with the real components on loopback: VictoriaMetrics scraping
//! `mad serve` every second, a real vmalert evaluating the rules `mad rules` generates, optionally
//! a real Alertmanager 0.25 in between, and `mad relay` delivering to a fake Telegram Bot API.
//! A spike on one series must give exactly one FIRING message, and its end exactly one RESOLVED
//! message replying to it.
//!
//! Needs `victoria-metrics`, `vmalert` and `prometheus-alertmanager` (scripts/setup.sh installs
//! them) and the ONNX Runtime library.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::feeder::{import_at, import_history, rhythmic, spike};
use common::process::Process;
use common::stack::{Stack, BOT};
use common::telegram::{alerts_in, Sent};
use mad::config::Config;
use mad::demo::free_port;
use mad::source::unix_now as now;
use mad::synth::{Profile, Synth};

const HISTORY_SECS: i64 = 2 * 3600;
/// Live seconds before the spike, and how long it lasts: short of where the model follows
/// it. At 8 s the score fell below 1 around the 6th point, and with ~5 s from a point to a
/// message, RESOLVED came 2 s after the spike's end, once before it; at 4 s, 4.6–5.6 s after.
const SPIKE_AT: i64 = 8;
const SPIKE_SECS: i64 = 4;
/// Live points keep coming at most this long.
const LIVE_MAX_SECS: i64 = 120;

/// The two tests share two cores with everything else: one stack at a time keeps the measured
/// latencies meaningful.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn profile(instance: &str, base: f64, period: f64) -> Profile {
    rhythmic("app_requests_rate", &[("instance", instance)], base, period)
}

fn config(stack: &Stack) -> Config {
    let alerting = "alerting: { grafana_url: \"http://127.0.0.1:3000/grafana\" }\n";
    let text = stack.config_text("e2e", "1s", alerting);
    Config::parse(&text, Path::new("alerting-e2e.yaml")).expect("test config is valid")
}

fn alertmanager_config(relay_port: u16) -> String {
    format!(
        r#"route:
  receiver: mad
  group_by: [alertname, detector]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: mad
    webhook_configs:
      - url: http://127.0.0.1:{relay_port}/api/v2/alerts
        send_resolved: true
        http_config:
          authorization: {{ credentials: "{intake}" }}
"#,
        intake = BOT.intake
    )
}

/// What one run measured.
struct Run {
    messages: Vec<Sent>,
    photos: Vec<common::telegram::Photo>,
    spike_to_firing: Duration,
    end_to_resolved: Duration,
    /// From feeding the spike's first point to feeding the first point after it.
    spike_fed_for: Duration,
}

/// Everything up, a spike fed live, until its resolution has arrived (and a little longer, to
/// catch anything sent twice).
async fn run(via_alertmanager: bool) -> Run {
    let _one = ONE_AT_A_TIME.lock().await;
    let test_started = Instant::now();
    let stack = Stack::start().await;
    let (dir, vm, telegram) = (stack.dir(), &stack.vm, &stack.telegram);

    let start = now();
    let live_start = start + 1;
    let spike = spike(0, live_start + SPIKE_AT, SPIKE_SECS, 1.0);
    let synth = Arc::new(Synth {
        profiles: vec![profile("spiky", 100.0, 600.0), profile("calm", 40.0, 420.0)],
        incidents: vec![spike.clone()],
        seed: 11,
        origin: start - HISTORY_SECS,
    });
    import_history(vm, &synth, start - HISTORY_SECS, start).await;

    let config = config(&stack);
    let trained_at = Instant::now();
    let trained = mad::train::run(&config, &[], Some(start))
        .await
        .expect("training succeeds");
    assert_eq!(trained[0].series, 2);
    let training = trained_at.elapsed();
    let rules = mad::rules::write(&config, &dir.join("rules")).expect("write rules");

    let (serve_stop, serve_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn(mad::serve::run(config.clone(), async {
        let _ = serve_rx.await;
    }));
    let (relay_stop, relay_rx) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(mad::relay::run(config.clone(), async {
        let _ = relay_rx.await;
    }));

    let mut alertmanager = None;
    let notifier = if via_alertmanager {
        let port = free_port().expect("port");
        let file = dir.join("alertmanager.yml");
        std::fs::write(&file, alertmanager_config(stack.relay_port)).expect("alertmanager config");
        let mut am = Process::spawn(
            "alertmanager",
            Command::new("prometheus-alertmanager")
                .arg(format!("--config.file={}", file.display()))
                .arg(format!("--storage.path={}", dir.join("am").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--cluster.listen-address=")
                .arg("--log.level=debug"),
            dir.join("alertmanager.log"),
        );
        am.wait_ok(&format!("http://127.0.0.1:{port}/-/ready"))
            .await;
        alertmanager = Some(am);
        format!("http://127.0.0.1:{port}")
    } else {
        format!("http://127.0.0.1:{}", stack.relay_port)
    };
    // Straight to the relay, vmalert sends the intake token; Alertmanager adds it itself.
    let vmalert = stack.vmalert(&rules, &notifier, !via_alertmanager).await;

    // Live points, one a second, with the spike; when each phase's first point went in.
    let stop_feeding = Arc::new(AtomicBool::new(false));
    let marks: Arc<Mutex<(Option<Instant>, Option<Instant>)>> = Arc::default();
    let feeder = {
        let (vm, synth, stop, marks) = (
            vm.clone(),
            synth.clone(),
            stop_feeding.clone(),
            marks.clone(),
        );
        let spike = spike.clone();
        tokio::spawn(async move {
            for ts in live_start..=live_start + LIVE_MAX_SECS {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                import_at(&vm, &synth, ts).await;
                if let Ok(mut m) = marks.lock() {
                    if ts == spike.start {
                        m.0 = Some(Instant::now());
                    }
                    if ts == spike.end + 1 {
                        m.1 = Some(Instant::now());
                    }
                }
            }
        })
    };

    let logs = |vmalert: &Process, am: &Option<Process>| {
        format!(
            "{}\n{}",
            vmalert.log_tail(),
            am.as_ref().map(Process::log_tail).unwrap_or_default()
        )
    };
    let deadline = Instant::now() + Duration::from_secs((SPIKE_AT + SPIKE_SECS + 60) as u64);
    let resolved = |m: &Sent| m.text.contains("RESOLVED");
    while !telegram.sent().iter().any(resolved) {
        assert!(
            Instant::now() < deadline,
            "no RESOLVED message; sent: {:#?}\n{}",
            telegram.sent(),
            logs(&vmalert, &alertmanager)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // vmalert keeps re-sending both states (and Alertmanager its groups): nothing more may come.
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop_feeding.store(true, Ordering::Relaxed);
    let messages = telegram.sent();
    let photos = telegram.photos();
    let (spike_in, end_in) = *marks.lock().expect("marks");
    let spike_in = spike_in.expect("the spike was fed");
    let end_in = end_in.expect("the spike's end was fed");
    let firing_at = messages
        .iter()
        .find(|m| m.text.contains("FIRING"))
        .map_or(spike_in, |m| m.at);
    let resolved_at = messages
        .iter()
        .find(|m| resolved(m))
        .map_or(end_in, |m| m.at);

    let _ = relay_stop.send(());
    relay
        .await
        .expect("relay task")
        .expect("relay stops cleanly");
    let _ = serve_stop.send(());
    serve
        .await
        .expect("exporter task")
        .expect("exporter stops cleanly");
    let _ = feeder.await;
    let path = if via_alertmanager {
        "vmalert -> Alertmanager -> relay"
    } else {
        "vmalert -> relay"
    };
    println!(
        "{path}: training {:.1} s; spike fed -> FIRING message {:.1} s; spike over -> RESOLVED \
         message {:.1} s; whole test {:.1} s",
        training.as_secs_f64(),
        firing_at.saturating_duration_since(spike_in).as_secs_f64(),
        resolved_at.saturating_duration_since(end_in).as_secs_f64(),
        test_started.elapsed().as_secs_f64()
    );
    let run = Run {
        messages,
        photos,
        spike_to_firing: firing_at.saturating_duration_since(spike_in),
        end_to_resolved: resolved_at.saturating_duration_since(end_in),
        spike_fed_for: end_in.saturating_duration_since(spike_in),
    };
    check(&run, &logs(&vmalert, &alertmanager));
    drop(vmalert);
    drop(alertmanager);
    run
}

/// `value V, expected L … U` from a message, as numbers.
fn reading_in(text: &str) -> Option<(f64, f64, f64)> {
    let line = text.lines().find(|l| l.starts_with("value "))?;
    let (value, band) = line["value ".len()..].split_once(", expected ")?;
    let (lower, upper) = band.split_once(" … ")?;
    Some((
        value.parse().ok()?,
        lower.parse().ok()?,
        upper.trim().parse().ok()?,
    ))
}

/// Exactly one FIRING message for the spiky series, then exactly one RESOLVED replying to it.
fn check(run: &Run, logs: &str) {
    let messages = &run.messages;
    let texts: Vec<&str> = messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(
        messages.len(),
        2,
        "expected one FIRING and one RESOLVED message: {texts:#?}\n{logs}"
    );
    let (firing, resolved) = (&messages[0], &messages[1]);
    for m in messages {
        assert_eq!(m.chat_id, BOT.chat);
        assert_eq!(m.parse_mode.as_deref(), Some("HTML"));
        assert_eq!(alerts_in(&m.text), vec!["spiky"], "{}", m.text);
        assert!(m.text.contains("MadAnomaly"), "{}", m.text);
        assert!(m.text.contains("detector <code>e2e</code>"), "{}", m.text);
        assert!(m.text.contains("warning"), "{}", m.text);
    }
    assert!(firing.text.contains("FIRING"), "{}", firing.text);
    // The annotations vmalert rendered from the generated templates.
    assert!(
        firing.text.contains("MAD e2e: anomaly score"),
        "summary: {}",
        firing.text
    );
    assert!(
        firing
            .text
            .contains("http://127.0.0.1:3000/grafana/d/mad?var-detector=e2e&amp;var-series="),
        "drill-down link: {}",
        firing.text
    );
    // The value against its band, read by the relay from VictoriaMetrics: outside it.
    let (value, lower, upper) = reading_in(&firing.text)
        .unwrap_or_else(|| panic!("no value against the band: {}\n{logs}", firing.text));
    assert!(
        lower <= upper && !(lower..=upper).contains(&value),
        "{}",
        firing.text
    );
    assert!(resolved.text.contains("RESOLVED"), "{}", resolved.text);
    assert_eq!(
        resolved.reply_to,
        Some(firing.message_id),
        "the resolution replies to the firing message"
    );
    assert!(run.spike_to_firing > Duration::ZERO);
    assert!(
        run.end_to_resolved > Duration::ZERO,
        "RESOLVED before the spike's end was fed (the spike took {:.1} s to feed, {SPIKE_SECS} s \
         nominal): {texts:#?}\n{logs}",
        run.spike_fed_for.as_secs_f64()
    );
    // The chart of the series under the firing message, drawn from what VictoriaMetrics scraped.
    assert_eq!(
        run.photos.len(),
        1,
        "one chart, for the firing message only\n{logs}"
    );
    let photo = &run.photos[0];
    assert_eq!(photo.chat_id, BOT.chat);
    assert_eq!(
        photo.reply_to,
        Some(firing.message_id),
        "under the firing message"
    );
    assert!(
        photo.bytes.starts_with(b"\x89PNG\r\n\x1a\n") && photo.bytes.len() > 1_000,
        "the chart is a PNG ({} bytes: {:?})",
        photo.bytes.len(),
        String::from_utf8_lossy(&photo.bytes[..photo.bytes.len().min(64)])
    );
    assert!(photo.at >= firing.at && photo.at < resolved.at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmalert_to_relay_one_firing_and_one_resolved_message() {
    run(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmalert_through_alertmanager_to_relay_one_firing_and_one_resolved_message() {
    run(true).await;
}
