//! The Grafana dashboards against real data: a real VictoriaMetrics scrapes two `mad serve`
//! (one healthy, one whose datasource is down, so errors exist) and a `mad relay` that delivered
//! an alert, all with a real PostgreSQL store that recorded an episode. Every panel's queries, with
//! the template variables substituted as Grafana would, must return data, as a user opening the
//! dashboard would expect. The shipped JSON must equal what `mad dashboards` generates.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::pg::TestDb;
use common::telegram::FakeTelegram;
use mad::config::Config;
use mad::dashboards::{dashboards, panel_queries, render, Query};
use mad::demo::{free_port, VictoriaMetrics};
use mad::source::unix_now as now;
use mad::synth::{Incident, IncidentKind, Profile, Synth};

const HISTORY_SECS: i64 = 3600;
const AHEAD_SECS: i64 = 300;
const SPIKE_IN: i64 = 8;
const CHAT: i64 = -100_777;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_shipped_dashboards_match_the_generator() {
    for d in dashboards() {
        let shipped = std::fs::read_to_string(root().join("grafana").join(d.file))
            .unwrap_or_else(|e| panic!("grafana/{}: {e}", d.file));
        assert!(
            shipped == render(&d.model).expect("render"),
            "grafana/{} is stale: regenerate with `cargo run -- dashboards`",
            d.file
        );
    }
}

/// The shared steady series with a slower, smaller rhythm (±20 % over 400 s).
fn profile(metric: &str, instance: &str, base: f64) -> Profile {
    Profile {
        fast: 0.2,
        fast_period_secs: 400.0,
        ..common::feeder::steady(metric, instance, base)
    }
}

fn config(vm_url: &str, db: &str, port: u16, relay_port: u16, telegram: &str) -> String {
    format!(
        r#"
datasource: {{ url: "{vm_url}", timeout: 1s, retries: 0 }}
store: {{ postgres: "{db}" }}
server: {{ listen: "127.0.0.1:{port}", reload_interval: 1s }}
training: {{ max_epochs: 10, seed: 2 }}
detectors:
  - name: dash
    query: dash_requests
    step: 1s
    window: 16
    train_range: 1h
    interval: 1s
    episode: {{ for: 0s, quiet: 3s }}
  - name: dash_node
    inputs: {{ cpu: dash_cpu, memory: dash_memory }}
    join_on: [instance]
    step: 1s
    window: 16
    train_range: 1h
    interval: 1s
relay:
  listen: "127.0.0.1:{relay_port}"
  intake_token: dash-intake-secret
  telegram: {{ token: "1:dashboards", api_url: "{telegram}", default_chat: {CHAT} }}
"#
    )
}

/// What Grafana would send for the template variables (detector `detector`, all series).
fn substitute(text: &str, detector: &str, from: i64, to: i64) -> String {
    text.replace("${detector:regex}", detector)
        .replace("$detector", detector)
        .replace("${series:csv}", "for!=\"\"")
        .replace("$__range", "1h")
        .replace("$__rate_interval", "10s")
        .replace(
            "$__timeFilter(started_at)",
            &format!("started_at BETWEEN to_timestamp({from}) AND to_timestamp({to})"),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_returns_data_from_real_mad_output() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = TestDb::new().await;
    let telegram = FakeTelegram::start().await;
    let (port, dead_port, relay_port) = (
        free_port().expect("port"),
        free_port().expect("port"),
        free_port().expect("port"),
    );
    let scrape = tmp.path().join("scrape.yaml");
    std::fs::write(
        &scrape,
        format!(
            "scrape_configs:\n  - job_name: mad\n    honor_labels: true\n    scrape_interval: 1s\n    \
             static_configs:\n      - targets: [\"127.0.0.1:{port}\", \"127.0.0.1:{dead_port}\", \
             \"127.0.0.1:{relay_port}\"]\n"
        ),
    )
    .expect("scrape config");
    let vm = VictoriaMetrics::start(&tmp.path().join("vm"), Some(&scrape))
        .await
        .expect("start victoria-metrics");
    let start = now();
    let synth = Synth {
        profiles: vec![
            profile("dash_requests", "a", 100.0),
            profile("dash_requests", "b", 30.0),
            profile("dash_cpu", "a", 0.5),
            profile("dash_memory", "a", 2e9),
        ],
        incidents: vec![Incident {
            series: 0,
            start: start + SPIKE_IN,
            end: start + SPIKE_IN + 2,
            kind: IncidentKind::Spike { factor: 2.0 },
            description: "spike".into(),
        }],
        seed: 4,
        origin: start - HISTORY_SECS,
    };
    let mut data = String::new();
    for ts in start - HISTORY_SECS..=start + AHEAD_SECS {
        synth.exposition_at(ts, &mut data);
    }
    vm.import(data).await.expect("import");
    vm.flush().await.expect("flush");

    let text = config(&vm.url, &db.url, port, relay_port, &telegram.url);
    let config = Config::parse(&text, Path::new("dashboards.yaml")).expect("config");
    mad::train::run(&config, &[], Some(start))
        .await
        .expect("training succeeds");
    // The second exporter reads from a closed port: its errors feed the errors panel.
    let mut dead = config.clone();
    dead.server.listen = format!("127.0.0.1:{dead_port}").parse().expect("address");
    dead.datasource = Config::parse(
        &text.replace(
            &vm.url,
            &format!("http://127.0.0.1:{}", free_port().expect("port")),
        ),
        Path::new("dead.yaml"),
    )
    .expect("config")
    .datasource;
    dead.relay = None;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let serving = tokio::spawn(mad::serve::run(
        config.clone(),
        until_stopped(stopped.clone()),
    ));
    let failing = tokio::spawn(mad::serve::run(dead, until_stopped(stopped.clone())));
    let relay = tokio::spawn(mad::relay::run(
        config.clone(),
        until_stopped(stopped.clone()),
    ));

    // One alert through the relay, so its delivery counters exist.
    let alert = r#"[{"labels":{"alertname":"MadAnomaly","for":"dash","instance":"a"},"annotations":{"summary":"test"},"startsAt":"2026-01-01T00:00:00Z"}]"#;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let posted = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{relay_port}/api/v2/alerts"))
            .bearer_auth("dash-intake-secret")
            .body(alert)
            .send()
            .await;
        if posted.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(Instant::now() < deadline, "the relay never took the alert");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Past the spike and its episode, with a few scrapes after it.
    let wait = start + SPIKE_IN + 12 - now();
    if wait > 0 {
        tokio::time::sleep(Duration::from_secs(wait as u64)).await;
    }
    vm.flush().await.expect("flush");
    let end = now();

    let (pg, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let mut empty = Vec::new();
    for d in dashboards() {
        // The drill-down shows one detector: it is checked for each, and a panel counts when
        // it has data for one of them (contributions exist only for multivariate detectors).
        let choices: &[&str] = if d.file == "mad-drilldown.json" {
            &["dash", "dash_node"]
        } else {
            &[".+"]
        };
        for (title, queries) in panel_queries(&d.model) {
            let mut rows = 0;
            for detector in choices {
                for q in &queries {
                    rows += match q {
                        Query::PromQl { expr, instant } => {
                            let expr = substitute(expr, detector, start, end);
                            let result = if *instant {
                                vm.query(&expr).await.map(|r| r.len())
                            } else {
                                vm.query_range(&expr, start, end, 1).await.map(|r| r.len())
                            };
                            result.unwrap_or_else(|e| panic!("{title}: {expr}: {e}"))
                        }
                        Query::Sql(sql) => {
                            let sql = substitute(sql, detector, start - 60, end);
                            pg.query(&sql, &[])
                                .await
                                .unwrap_or_else(|e| panic!("{title}: {sql}: {e}"))
                                .len()
                        }
                    };
                }
            }
            if rows == 0 {
                empty.push(format!("{}: {title}", d.file));
            }
        }
    }
    let _ = stop.send(true);
    for task in [serving, failing, relay] {
        let _ = task.await;
    }
    db.drop().await;
    assert!(empty.is_empty(), "panels without data: {empty:#?}");
}
