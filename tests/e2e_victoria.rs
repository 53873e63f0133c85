//! End to end against a real VictoriaMetrics: import history, train, serve, let VictoriaMetrics
//! scrape the exporter while live points with an injected spike arrive, then check what a user
//! would: the scores are in the TSDB, the spike scores above 1, quiet data below 1, the
//! exposition passes promtool, a new model version is picked up without a restart, and scores
//! disappear when the datasource does.

mod common;

use std::path::Path;
use std::time::Duration;

use common::exporter::eventually;
use common::feeder::{import_history, import_live, requests_detector, rhythmic, spike};
use mad::config::Config;
use mad::demo::free_port;
use mad::source::unix_now as now;
use mad::source::Labels;
use mad::synth::{Profile, Synth};

const HISTORY_SECS: i64 = 2 * 3600;
const LIVE_SECS: i64 = 40;
const SPIKE_AT: i64 = 22;
/// Seconds after the spike whose scores count as its aftermath rather than quiet data.
const AFTERMATH_SECS: i64 = 15;

fn profile(labels: &[(&str, &str)], base: f64, period: f64) -> Profile {
    rhythmic("app_requests_rate", labels, base, period)
}

fn test_config(vm_url: &str, dir: &Path, port: u16, seed: u64) -> Config {
    let text = format!(
        r#"
datasource: {{ url: "{vm_url}", timeout: 2s, retries: 1 }}
store: {{ path: "{}" }}
server: {{ listen: "127.0.0.1:{port}", reload_interval: 1s }}
training: {{ max_epochs: 25, seed: {seed} }}
{}"#,
        dir.join("models").display(),
        requests_detector("e2e", 32, "2h", "10s")
    );
    Config::parse(&text, Path::new("e2e.yaml")).expect("test config is valid")
}

async fn get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(e) => panic!("GET {url}: {e}"),
    }
}

fn matches(labels: &Labels, profile: &Profile) -> bool {
    profile.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_reach_victoriametrics_and_spikes_score_above_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_port().expect("port");
    let vm = common::victoria::scraping(tmp.path(), port).await;

    let start = now();
    let live_start = start + 1;
    let profiles = vec![
        profile(&[("instance", "a")], 100.0, 600.0),
        profile(&[("instance", "b")], 40.0, 420.0),
        // Hostile label value: quotes, backslash, braces; it must come back byte for byte.
        profile(
            &[("instance", "c"), ("path", r#"/api/"x"\{y}"#)],
            7.0,
            900.0,
        ),
    ];
    let synth = Synth {
        profiles,
        incidents: vec![spike(0, live_start + SPIKE_AT, 2, 1.0)],
        seed: 11,
        origin: start - HISTORY_SECS,
    };
    import_history(&vm, &synth, start - HISTORY_SECS, start).await;

    let config = test_config(&vm.url, tmp.path(), port, 1);
    let trained = mad::train::run(&config, &[], Some(start))
        .await
        .expect("training succeeds");
    assert_eq!(trained.len(), 1);
    assert_eq!(trained[0].series, 3);
    let first_version = trained[0].version.version.clone();

    let serving = common::serve::start(config.clone());
    let base = format!("http://127.0.0.1:{port}");

    // Live points, one per second, with the spike in the middle.
    import_live(&vm, &synth, live_start, live_start + LIVE_SECS).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    vm.flush().await.expect("flush");

    let (status, body) = get(&format!("{base}/readyz")).await;
    assert_eq!(status, 200, "{body}");
    let (status, metrics) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    for family in [
        "anomaly_score",
        "yhat",
        "yhat_lower",
        "yhat_upper",
        "y",
        "mad_build_info",
        "mad_last_successful_cycle_timestamp_seconds",
        "mad_inference_duration_seconds_bucket",
    ] {
        assert!(
            metrics.contains(&format!("\n{family}{{")),
            "{family} missing from /metrics:\n{metrics}"
        );
    }
    promtool_check(&metrics, tmp.path());

    // What VictoriaMetrics scraped.
    let scores = vm
        .query_range(
            "anomaly_score{for=\"e2e\"}",
            live_start,
            live_start + LIVE_SECS + 4,
            1,
        )
        .await
        .expect("query scores");
    assert_eq!(
        scores.len(),
        3,
        "one anomaly_score series per input series: {scores:?}"
    );
    let spike = &synth.incidents[0];
    for (index, profile) in synth.profiles.iter().enumerate() {
        let (labels, points) = scores
            .iter()
            .find(|(labels, _)| matches(labels, profile))
            .unwrap_or_else(|| panic!("no scores for {:?} in {scores:?}", profile.labels));
        assert_eq!(labels.get("for").map(String::as_str), Some("e2e"));
        assert!(
            points.len() >= 20,
            "{:?}: only {} scraped points",
            profile.labels,
            points.len()
        );
        // The spike and its aftermath: the model's state takes a few steps to settle after two
        // wild inputs, and scores reach VictoriaMetrics a scrape or two after their point.
        let near_spike =
            |ts: i64| index == 0 && ts >= spike.start && ts <= spike.end + AFTERMATH_SECS;
        // The band is calibrated so normal data stays inside it (about one point in a
        // thousand or fewer may touch it): quiet data must stay below 1, allowing one stray
        // scored point (scraped at most twice) that never comes near the spike's scores.
        let quiet: Vec<f64> = points
            .iter()
            .filter(|(ts, _)| !near_spike(*ts))
            .map(|p| p.1)
            .collect();
        let quiet_max = quiet.iter().copied().fold(0.0, f64::max);
        let above = quiet.iter().filter(|s| **s > 1.0).count();
        assert!(
            above <= 2 && quiet_max < 2.0,
            "{:?}: quiet data scored above 1 {above} times (max {quiet_max}): {points:?}",
            profile.labels
        );
        if index == 0 {
            let spike_max = points
                .iter()
                .filter(|(ts, _)| near_spike(*ts))
                .map(|p| p.1)
                .fold(0.0, f64::max);
            assert!(
                spike_max > 1.0,
                "the spike scored only {spike_max}: {points:?}"
            );
        }
    }
    let bands_hold = vm
        .query("count(yhat_lower{for=\"e2e\"} <= yhat{for=\"e2e\"} <= yhat_upper{for=\"e2e\"})")
        .await
        .expect("query bands");
    assert_eq!(
        bands_hold.first().map(|r| r.1),
        Some(3.0),
        "bands: {bands_hold:?}"
    );

    // A new model version is served without a restart.
    let retrained = mad::train::run(&test_config(&vm.url, tmp.path(), port, 2), &[], Some(start))
        .await
        .expect("retraining succeeds");
    let new_version = retrained[0].version.version.clone();
    assert_ne!(new_version, first_version);
    eventually(
        Duration::from_secs(10),
        "the new model version is served",
        || async {
            get(&format!("{base}/metrics"))
                .await
                .1
                .contains(&format!("version=\"{new_version}\""))
        },
    )
    .await;

    // A retrain over the live points leaves out what the exporter flagged (the spike), and
    // nothing like the whole history.
    let above: usize = scores
        .iter()
        .map(|(_, points)| points.iter().filter(|(_, s)| *s > 1.0).count())
        .sum();
    let live_end = live_start + LIVE_SECS + 4;
    let over_spike = mad::train::run(
        &test_config(&vm.url, tmp.path(), port, 3),
        &[],
        Some(live_end),
    )
    .await
    .expect("retraining over the live points succeeds");
    let left_out = over_spike[0].flagged_excluded;
    assert!(
        (1..=2 * above + 2).contains(&left_out),
        "{left_out} points left out; {above} scraped scores above 1: {over_spike:?}"
    );

    // A scheduled run (`--if-due`) leaves that model alone: the same history, the same series,
    // trained a moment ago.
    let scheduled = mad::train::run_scheduled(
        &test_config(&vm.url, tmp.path(), port, 4),
        &[],
        Some(live_end),
        mad::train::Schedule::IfDue,
    )
    .await
    .expect("scheduled run");
    match &scheduled[..] {
        [mad::train::Outcome::UpToDate { version, .. }] => {
            assert_eq!(version, &over_spike[0].version.version)
        }
        other => panic!("a model that was not due was retrained: {other:?}"),
    }

    // Once it is due (here: older than half a tiny `model_max_age`), the scheduled run goes on
    // from the active model instead of starting afresh, so the exporter keeps its series'
    // states.
    let mut aged = test_config(&vm.url, tmp.path(), port, 5);
    aged.alerting.model_max_age.0 = Duration::from_secs(2);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let continued =
        mad::train::run_scheduled(&aged, &[], Some(live_end), mad::train::Schedule::IfDue)
            .await
            .expect("scheduled run of a due model");
    match &continued[..] {
        [mad::train::Outcome::Trained(t)] => assert_eq!(
            t.continued.as_deref(),
            Some(over_spike[0].version.version.as_str()),
            "{t}"
        ),
        other => panic!("a due model was not retrained: {other:?}"),
    }

    // The datasource goes away: scores vanish instead of going stale, errors are counted.
    vm.stop().await;
    eventually(
        Duration::from_secs(15),
        "scores dropped after the datasource failed",
        || async {
            let body = get(&format!("{base}/metrics")).await.1;
            !body.contains("\nanomaly_score{")
                && body
                    .contains("mad_errors_total{detector=\"e2e\",kind=\"datasource_unreachable\"}")
        },
    )
    .await;
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);

    serving.stop().await;
}

fn promtool_check(exposition: &str, dir: &Path) {
    let file = dir.join("metrics.txt");
    std::fs::write(&file, exposition).expect("write exposition");
    let output = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).expect("open exposition"))
        .output()
        .expect("promtool is installed (scripts/setup.sh installs it)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{stdout}\n{stderr}"
    );
}
