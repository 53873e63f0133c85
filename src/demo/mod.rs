//! `mad demo`: the whole loop on one machine, on data the project makes itself.
//!
//! Starts a real VictoriaMetrics, imports days of synthetic history (daily and weekly rhythm,
//! growth, noise, a few past incidents), trains, serves, lets VictoriaMetrics scrape the
//! exporter while new points arrive in real time with incidents injected, then reads the scores
//! back from VictoriaMetrics and says which incidents scored above 1.

mod victoria;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use crate::source::unix_now;
use crate::synth::{demo_profiles, Incident, IncidentKind, Synth};
pub use victoria::{free_port, scrape_config, VictoriaMetrics};

/// The return to normal after an incident is itself a surprise to a forecaster that has just
/// seen the incident: scores this many steps after its end count as its recovery.
const RECOVERY_STEPS: i64 = 4;
/// A score reaches VictoriaMetrics up to one scoring interval plus one scrape after its point.
const SCRAPE_SLACK_SECS: i64 = 10;
/// Points per import request: keeps each request a few MB.
const IMPORT_BATCH_POINTS: usize = 50_000;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Working directory for VictoriaMetrics' data, the config and the models.
    pub dir: PathBuf,
    pub step_secs: i64,
    pub history_days: i64,
    pub live_secs: i64,
    /// Keep everything running after the report, until Ctrl-C.
    pub keep: bool,
}

fn demo_config(vm_url: &str, dir: &Path, listen_port: u16, step: i64, history_days: i64) -> String {
    format!(
        r#"# Written by `mad demo`.
datasource: {{ url: "{vm_url}" }}
store: {{ path: "{models}" }}
server: {{ listen: "127.0.0.1:{listen_port}", reload_interval: 2s }}
training: {{ max_epochs: 30 }}
detectors:
  - name: http_requests
    query: http_requests_per_second
    step: {step}s
    window: 64
    train_range: {history_days}d
  - name: cpu
    query: node_cpu_utilisation
    step: {step}s
    window: 64
    train_range: {history_days}d
"#,
        models = dir.join("models").display()
    )
}

/// The incidents: two in the history (so training sees dirty data, as in real life) and three
/// during the live phase, which the report checks.
fn incidents(history_start: i64, live_start: i64, step: i64) -> (Vec<Incident>, usize) {
    let day = 86_400;
    let at = |offset_steps: i64| live_start + offset_steps * step;
    let incident = |series, start, end, kind, description: &str| Incident {
        series,
        start,
        end,
        kind,
        description: description.into(),
    };
    let past = vec![
        incident(
            0,
            history_start + 2 * day,
            history_start + 2 * day + 600,
            IncidentKind::Drop { factor: 0.7 },
            "past checkout outage",
        ),
        incident(
            3,
            history_start + 4 * day,
            history_start + 4 * day + 900,
            IncidentKind::Spike { factor: 0.8 },
            "past CPU storm",
        ),
    ];
    let live = vec![
        incident(
            0,
            at(6),
            at(7),
            IncidentKind::Spike { factor: 1.5 },
            "checkout traffic spike (2.5x)",
        ),
        incident(
            1,
            at(11),
            at(14),
            IncidentKind::Drop { factor: 0.6 },
            "search traffic drop (-60%)",
        ),
        incident(
            4,
            at(15),
            at(16),
            IncidentKind::Spike { factor: 1.2 },
            "node-2 CPU storm (2.2x)",
        ),
    ];
    let n_past = past.len();
    (past.into_iter().chain(live).collect(), n_past)
}

pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let step = options.step_secs;
    std::fs::create_dir_all(&options.dir)
        .with_context(|| format!("cannot create {}", options.dir.display()))?;
    let dir = options.dir.canonicalize()?;
    let data_dir = dir.join("victoria-metrics-data");
    let _ = std::fs::remove_dir_all(&data_dir);
    let _ = std::fs::remove_dir_all(dir.join("models"));

    let exporter_port = free_port()?;
    let scrape_file = dir.join("scrape.yaml");
    std::fs::write(
        &scrape_file,
        scrape_config(
            &format!("127.0.0.1:{exporter_port}"),
            Duration::from_secs(5),
        ),
    )?;
    println!("starting VictoriaMetrics…");
    let vm = VictoriaMetrics::start(&data_dir, Some(&scrape_file)).await?;

    let now = unix_now();
    let history_start = now - options.history_days * 86_400;
    let live_start = (now / step + 1) * step;
    let (incidents, n_past) = incidents(history_start, live_start, step);
    let synth = Synth {
        profiles: demo_profiles(),
        incidents,
        seed: 2026,
        origin: history_start,
    };
    println!(
        "importing {} days of history for {} series at {step}s resolution…",
        options.history_days,
        synth.profiles.len()
    );
    let mut body = String::new();
    let mut in_body = 0;
    let mut ts = history_start / step * step;
    while ts <= now {
        synth.exposition_at(ts, &mut body);
        in_body += synth.profiles.len();
        if in_body >= IMPORT_BATCH_POINTS {
            vm.import(std::mem::take(&mut body)).await?;
            in_body = 0;
        }
        ts += step;
    }
    vm.import(body).await?;

    let config_file = dir.join("mad.yaml");
    std::fs::write(
        &config_file,
        demo_config(&vm.url, &dir, exporter_port, step, options.history_days),
    )?;
    let config = Config::load(&config_file)?;
    println!("training ({})…", config_file.display());
    crate::train::run(&config, &[], Some(now)).await?;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serve_config = config.clone();
    let server = tokio::spawn(async move {
        crate::serve::run(serve_config, async {
            let _ = stop_rx.await;
        })
        .await
    });
    println!(
        "serving on http://127.0.0.1:{exporter_port}/metrics; feeding live points for {}s with {} incidents…",
        options.live_secs,
        synth.incidents.len() - n_past
    );
    let live_end = live_start + options.live_secs;
    let mut ts = live_start;
    while ts <= live_end {
        let wait = ts - unix_now();
        if wait > 0 {
            tokio::time::sleep(Duration::from_secs(wait as u64)).await;
        }
        let mut line = String::new();
        synth.exposition_at(ts, &mut line);
        vm.import(line).await?;
        ts += step;
    }
    // Let the exporter score the last point and VictoriaMetrics scrape it.
    tokio::time::sleep(Duration::from_secs((step + 6) as u64)).await;
    vm.flush().await?;

    report(
        &vm,
        &synth,
        n_past,
        live_start,
        live_end,
        step,
        exporter_port,
    )
    .await?;
    if options.keep {
        println!("\nrunning until Ctrl-C…");
        crate::serve::shutdown_signal().await;
    }
    let _ = stop_tx.send(());
    server.await.context("exporter task failed")??;
    vm.stop().await;
    Ok(())
}

async fn report(
    vm: &VictoriaMetrics,
    synth: &Synth,
    n_past: usize,
    live_start: i64,
    live_end: i64,
    step: i64,
    exporter_port: u16,
) -> anyhow::Result<()> {
    let scores = vm
        .query_range("anomaly_score", live_start, live_end + step, 5)
        .await?;
    println!("\nWhere to look:");
    println!(
        "  VictoriaMetrics UI: {}/vmui  (try: anomaly_score > 1, or yhat_lower / y / yhat_upper)",
        vm.url
    );
    println!("  Exporter:           http://127.0.0.1:{exporter_port}/metrics");
    println!(
        "\n{:<34} {:<42} {:>10}  result",
        "incident", "series", "max score"
    );
    let mut quiet_max: f64 = 0.0;
    let mut quiet_points = 0;
    let mut false_alarms = Vec::new();
    for (index, profile) in synth.profiles.iter().enumerate() {
        let series = scores
            .iter()
            .find(|(labels, _)| profile.labels.iter().all(|(k, v)| labels.get(k) == Some(v)));
        let points: &[(i64, f64)] = series.map_or(&[], |(_, p)| p.as_slice());
        let shown: Vec<String> = profile
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let shown = shown.join(",");
        for incident in synth.incidents[n_past..]
            .iter()
            .filter(|i| i.series == index)
        {
            // Scores are scraped a few seconds after the point they score.
            let max = points
                .iter()
                .filter(|(ts, _)| *ts >= incident.start && *ts <= incident.end + 2 * step)
                .map(|p| p.1)
                .fold(f64::NAN, f64::max);
            let verdict = if max > 1.0 {
                "DETECTED (score > 1)"
            } else {
                "missed"
            };
            println!(
                "{:<34} {:<42} {:>10.2}  {verdict}",
                incident.description, shown, max
            );
        }
        for &(ts, score) in points {
            let near_incident = synth.incidents[n_past..].iter().any(|i| {
                i.series == index
                    && ts >= i.start
                    && ts <= i.end + RECOVERY_STEPS * step + SCRAPE_SLACK_SECS
            });
            if !near_incident {
                quiet_max = quiet_max.max(score);
                quiet_points += 1;
                if score > 1.0 {
                    false_alarms.push(format!("{}{{{shown}}} at {ts}: {score:.2}", profile.metric));
                }
            }
        }
    }
    println!(
        "\nquiet stretches (excluding {RECOVERY_STEPS} steps of recovery after each incident): \
         {quiet_points} scraped scores, highest {quiet_max:.2} (below 1 means no false alarm)"
    );
    for alarm in &false_alarms {
        println!("  false alarm: {alarm}");
    }
    Ok(())
}
