//! A multivariate detector end to end against a real VictoriaMetrics: two queries (CPU and
//! memory) joined on `instance`, trained as one detector, served while VictoriaMetrics scrapes
//! the exporter, with a memory spike on one instance. What a user checks: one `anomaly_score`
//! per instance (not per input), above 1 at the spike on that instance only, the per-input
//! `anomaly_contribution` naming memory as the driver, and `y`/`yhat` per input — with the
//! shared model that reads each input on its own, and with a joint model (`training.joint`)
//! that reads both inputs of an instance together.

mod common;

use std::path::Path;
use std::time::Duration;

use common::feeder::{import_history, import_live, rhythmic, spike};
use mad::config::Config;
use mad::demo::free_port;
use mad::source::unix_now as now;
use mad::synth::{Profile, Synth};

const HISTORY_SECS: i64 = 2 * 3600;
const LIVE_SECS: i64 = 30;
const SPIKE_AT: i64 = 18;
/// Seconds after the spike whose scores count as its aftermath rather than quiet data.
const AFTERMATH_SECS: i64 = 12;

fn profile(metric: &str, instance: &str, base: f64, period: f64) -> Profile {
    rhythmic(
        metric,
        &[("instance", instance), ("job", "node")],
        base,
        period,
    )
}

/// The two end-to-end runs start their own VictoriaMetrics and feed it in real time: one at a
/// time, so neither starves the other of the two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config(vm_url: &str, dir: &Path, port: u16, joint: bool) -> Config {
    let text = format!(
        r#"
datasource: {{ url: "{vm_url}", timeout: 2s, retries: 1 }}
store: {{ path: "{}" }}
server: {{ listen: "127.0.0.1:{port}", reload_interval: 1s }}
training: {{ max_epochs: 25, seed: 3, joint: {joint} }}
detectors:
  - name: node
    inputs:
      cpu: node_cpu_busy
      memory: 'sum by (instance) (node_memory_used)'
    join_on: [instance]
    step: 1s
    window: 32
    train_range: 2h
    interval: 1s
    staleness: 10s
"#,
        dir.join("models").display()
    );
    Config::parse(&text, Path::new("multivariate.yaml")).expect("test config is valid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_scores_once_and_names_the_input_that_drove_it() {
    group_scores_once_and_names_its_driver(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joint_model_scores_the_group_and_names_the_input_that_drove_it() {
    group_scores_once_and_names_its_driver(true).await;
}

async fn group_scores_once_and_names_its_driver(joint: bool) {
    let _serial = ONE_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_port().expect("port");
    let vm = common::victoria::scraping(tmp.path(), port).await;

    let start = now();
    let live_start = start + 1;
    let synth = Synth {
        profiles: vec![
            profile("node_cpu_busy", "a", 0.6, 600.0),
            profile("node_memory_used", "a", 4e9, 420.0),
            profile("node_cpu_busy", "b", 0.3, 500.0),
            profile("node_memory_used", "b", 2e9, 900.0),
        ],
        // A memory spike on instance a.
        incidents: vec![spike(1, live_start + SPIKE_AT, 2, 1.0)],
        seed: 5,
        origin: start - HISTORY_SECS,
    };
    import_history(&vm, &synth, start - HISTORY_SECS, start).await;

    let config = config(&vm.url, tmp.path(), port, joint);
    let trained = mad::train::run(&config, &[], Some(start))
        .await
        .expect("training succeeds");
    assert_eq!(trained[0].series, 4, "two inputs on two instances");
    let summary = trained[0].to_string();
    assert_eq!(
        summary.contains("(joint model: cpu, memory read together per group)"),
        joint,
        "{summary}"
    );
    let store = mad::store::open(&config.store).await.expect("store");
    let stored = store
        .load_active("node")
        .await
        .expect("load")
        .expect("a model");
    let model = mad::model::Forecaster::load(&stored.onnx, "v", "node", None).expect("valid");
    assert_eq!(model.is_joint(), joint, "inputs: {:?}", model.meta.inputs);

    let serving = common::serve::start(config.clone());
    import_live(&vm, &synth, live_start, live_start + LIVE_SECS).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    vm.flush().await.expect("flush");
    let end = live_start + LIVE_SECS + 4;

    let scores = vm
        .query_range("anomaly_score{for=\"node\"}", live_start, end, 1)
        .await
        .expect("query scores");
    let instances: Vec<Option<&str>> = scores
        .iter()
        .map(|(labels, _)| labels.get("instance").map(String::as_str))
        .collect();
    assert_eq!(
        instances,
        vec![Some("a"), Some("b")],
        "one score per group: {scores:?}"
    );
    for (labels, _) in &scores {
        assert!(
            !labels.contains_key("input"),
            "a group's score is not an input's: {labels:?}"
        );
    }
    let spike = &synth.incidents[0];
    let near_spike = |ts: i64| ts >= spike.start && ts <= spike.end + AFTERMATH_SECS;
    let peak = |points: &[(i64, f64)], near: bool| {
        points
            .iter()
            .filter(|(ts, _)| near_spike(*ts) == near)
            .map(|p| p.1)
            .fold(0.0, f64::max)
    };
    let (a, b) = (&scores[0].1, &scores[1].1);
    assert!(peak(a, true) > 1.0, "the memory spike did not score: {a:?}");
    assert!(
        peak(b, true) < 2.0 && peak(b, false) < 2.0,
        "instance b is quiet: {b:?}"
    );
    // As in the univariate e2e test: quiet points stay below 1, one stray point (scraped at
    // most twice) allowed.
    let stray = |points: &[(i64, f64)]| {
        points
            .iter()
            .filter(|(ts, s)| !near_spike(*ts) && *s > 1.0)
            .count()
    };
    assert!(stray(a) + stray(b) <= 2, "quiet data above 1: {scores:?}");

    // At the group's peak, the memory input is the one that scored it.
    let (peak_ts, peak_score) = a
        .iter()
        .filter(|(ts, _)| near_spike(*ts))
        .copied()
        .fold((0, 0.0), |best, p| if p.1 > best.1 { p } else { best });
    let contributions = vm
        .query_range(
            "anomaly_contribution{for=\"node\",instance=\"a\"}",
            peak_ts,
            peak_ts,
            1,
        )
        .await
        .expect("query contributions");
    let at_peak: Vec<(String, f64)> = contributions
        .iter()
        .filter_map(|(labels, points)| {
            let input = labels.get("input")?.clone();
            points.first().map(|p| (input, p.1))
        })
        .collect();
    let driver = at_peak
        .iter()
        .max_by(|x, y| x.1.total_cmp(&y.1))
        .map(|d| d.0.as_str());
    assert_eq!(
        driver,
        Some("memory"),
        "contributions at the peak: {at_peak:?}"
    );
    let mut ranked: Vec<f64> = at_peak.iter().map(|d| d.1).collect();
    ranked.sort_by(|x, y| y.total_cmp(x));
    let top_mean = mad::score::group::group_score(ranked);
    assert!(
        (top_mean - peak_score).abs() < 1e-9,
        "the group's score {peak_score} is its top three inputs' mean: {at_peak:?}"
    );

    // Values and bands per input, so a dashboard can draw each.
    for family in [
        "y",
        "yhat",
        "yhat_lower",
        "yhat_upper",
        "anomaly_contribution",
    ] {
        let series = vm
            .query(&format!("count({family}{{for=\"node\"}})"))
            .await
            .expect("query family");
        assert_eq!(
            series.first().map(|r| r.1),
            Some(4.0),
            "{family}: one series per input and instance"
        );
    }
    serving.stop().await;
}
