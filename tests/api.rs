//! The management API (`/api/v1/`) of a running `mad serve`, against the real PostgreSQL on
//! 127.0.0.1:5432 (a database per test) and, for query validation, a real VictoriaMetrics.

mod common;

use common::exporter::wait_served;
use common::pg::TestDb;

use std::path::Path;
use std::time::{Duration, Instant};

use mad::config::Config;
use mad::demo::VictoriaMetrics;
use mad::store::PgStore;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const TOKEN: &str = "t0ken-for-tests";

/// A running exporter with the API.
struct Harness {
    port: u16,
    base: String,
    http: reqwest::Client,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Harness {
    /// Starts `mad serve` with `store` (YAML flow mapping body) and extra `server:` keys.
    async fn start(datasource: &str, store: &str, server_extra: &str) -> Harness {
        let port = mad::demo::free_port().expect("port");
        let text = format!(
            r#"
datasource: {{ url: "{datasource}", retries: 0, timeout: 5s }}
store: {{ {store} }}
server: {{ listen: "127.0.0.1:{port}", reload_interval: 1h {server_extra} }}
detectors:
  - {{ name: cpu, query: up, step: 1m, window: 8, train_range: 1d }}
"#
        );
        let config = Config::parse(&text, Path::new("api.yaml")).expect("config");
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            mad::serve::run(config, async {
                let _ = stop_rx.await;
            })
            .await
        });
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http.get(format!("{base}/healthz")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            assert!(!server.is_finished(), "mad serve exited early");
            assert!(Instant::now() < deadline, "mad serve did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Harness {
            port,
            base,
            http,
            stop,
            server,
        }
    }

    async fn with_db(db: &TestDb, datasource: &str, server_extra: &str) -> Harness {
        Harness::start(
            datasource,
            &format!("postgres: \"{}\"", db.url),
            &format!(", api_token: {TOKEN} {server_extra}"),
        )
        .await
    }

    /// Sends a request with `token` (if any) and a JSON body (if any): status, headers, JSON.
    async fn call_raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        if let Some(b) = body {
            request = request.header("content-type", "application/json").body(b);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text:?}"))
        };
        if status.is_client_error() || status.is_server_error() {
            assert!(
                value["error"].as_str().is_some_and(|m| !m.is_empty()),
                "{path}: error without a message: {value}"
            );
        }
        (status, headers, value)
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let body = body.map(|b| serde_json::to_vec(&b).expect("json"));
        let (status, _, value) = self.call_raw(method, path, Some(TOKEN), body).await;
        (status, value)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.server
            .await
            .expect("task")
            .expect("exporter stops cleanly");
    }
}

fn closed_datasource() -> String {
    format!("http://127.0.0.1:{}", mad::demo::free_port().expect("port"))
}

fn error_of(v: &Value) -> &str {
    v["error"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_need_the_token_and_reads_too_unless_public() {
    let db = TestDb::new().await;
    let api = Harness::with_db(&db, &closed_datasource(), "").await;
    let window = serde_json::to_vec(&json!({"starts_at": 100, "ends_at": 200, "reason": "x"}))
        .expect("json");
    for token in [None, Some("wrong-token"), Some("t0ken-for-test")] {
        for (method, body) in [(Method::GET, None), (Method::POST, Some(window.clone()))] {
            let with_body = body.is_some();
            let (status, headers, v) = api
                .call_raw(method.clone(), "/api/v1/maintenance-windows", token, body)
                .await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {token:?}: {v}");
            // The body was never read: the client must not reuse this connection.
            assert_eq!(
                headers.get("connection").is_some_and(|h| h == "close"),
                with_body,
                "{method}: {headers:?}"
            );
            assert!(
                headers
                    .get("www-authenticate")
                    .and_then(|h| h.to_str().ok())
                    .is_some_and(|h| h.starts_with("Bearer")),
                "{headers:?}"
            );
            assert!(!error_of(&v).contains(TOKEN), "never echo the token");
        }
    }
    let (status, v) = api.get("/api/v1/maintenance-windows").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = api
        .post(
            "/api/v1/maintenance-windows",
            json!({"starts_at": 100, "ends_at": 200, "reason": "x"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    api.stop().await;

    // Public reads: GETs need no token, writes still do.
    let api = Harness::with_db(&db, &closed_datasource(), ", api_public_reads: true").await;
    let (status, _, v) = api
        .call_raw(Method::GET, "/api/v1/maintenance-windows", None, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["windows"].as_array().map(Vec::len), Some(1), "{v}");
    let (status, _, _) = api
        .call_raw(
            Method::POST,
            "/api/v1/maintenance-windows",
            None,
            Some(window.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    api.stop().await;

    // No token configured: writes are refused with the fix; reads only if public.
    let store = format!("postgres: \"{}\"", db.url);
    let api = Harness::start(&closed_datasource(), &store, ", api_public_reads: true").await;
    let (status, _, v) = api
        .call_raw(
            Method::POST,
            "/api/v1/maintenance-windows",
            Some(TOKEN),
            Some(window.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert!(error_of(&v).contains("server.api_token"), "{v}");
    let (status, _, _) = api
        .call_raw(Method::GET, "/api/v1/detectors", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    api.stop().await;
    let api = Harness::start(&closed_datasource(), &store, "").await;
    let (status, _, v) = api
        .call_raw(Method::GET, "/api/v1/detectors", Some(TOKEN), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert!(error_of(&v).contains("server.api_token"), "{v}");
    api.stop().await;
    db.drop().await;

    // Without PostgreSQL the API says what it needs; /metrics still works.
    let dir = tempfile::tempdir().expect("tmp");
    let store = format!("path: \"{}\"", dir.path().display());
    let api = Harness::start(
        &closed_datasource(),
        &store,
        &format!(", api_token: {TOKEN}"),
    )
    .await;
    let (status, v) = api.get("/api/v1/detectors").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(error_of(&v).contains("store.postgres"), "{v}");
    let metrics = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .expect("metrics");
    assert_eq!(metrics.status(), StatusCode::OK);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detectors_are_validated_by_field_and_by_the_datasource() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("tmp");
    let vm = VictoriaMetrics::start(dir.path(), None)
        .await
        .expect("victoria-metrics");
    let api = Harness::with_db(&db, &vm.url, "").await;
    let mem = json!({
        "name": "mem", "query": "sum(rate(node_memory_bytes[5m]))",
        "step": "1m", "window": 8, "train_range": "1d"
    });

    let (status, v) = api.get("/api/v1/detectors").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["detectors"][0]["name"], "cpu");
    assert_eq!(v["detectors"][0]["source"], "config");
    assert_eq!(v["detectors"][0]["spec"]["step"], "1m");

    let (status, v) = api.post("/api/v1/detectors", mem.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["source"], "database");
    assert_eq!(v["spec"]["query"], mem["query"]);
    let (status, v) = api.post("/api/v1/detectors", mem.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let mut cpu = mem.clone();
    cpu["name"] = "cpu".into();
    let (status, v) = api.post("/api/v1/detectors", cpu.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(error_of(&v).contains("config file"), "{v}");

    // Each invalid spec names its field.
    let invalid = [
        ("step", json!("1 fortnight"), "step"),
        ("window", json!(2), "window"),
        ("window", json!("eight"), "window"),
        ("train_range", json!("10m"), "train_range"),
        ("stepp", json!("1m"), "stepp"),
        ("name", json!("../etc"), "name"),
        (
            "training",
            json!({"band_quantile": 2.0}),
            "training.band_quantile",
        ),
    ];
    for (key, value, field) in invalid {
        let mut body = mem.clone();
        body["name"] = "other".into();
        body[key] = value.clone();
        let (status, v) = api.post("/api/v1/detectors", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{key}={value}: {v}");
        assert!(error_of(&v).contains(field), "{key}={value}: {v}");
    }
    let mut body = mem.clone();
    body["name"] = "other".into();
    body.as_object_mut().expect("object").remove("query");
    let (status, v) = api.post("/api/v1/detectors", body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&v).contains("query"), "{v}");

    // The datasource judges the PromQL and its message comes back.
    let mut body = mem.clone();
    body["name"] = "broken".into();
    body["query"] = "sum(rate(x[5m]".into();
    let (status, v) = api.post("/api/v1/detectors", body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        error_of(&v).starts_with("query: the datasource rejected it"),
        "{v}"
    );
    assert!(
        error_of(&v).len() > "query: the datasource rejected it: ".len() + 5,
        "{v}"
    );

    let (status, v) = api.get("/api/v1/detectors").await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<(&str, &str)> = v["detectors"]
        .as_array()
        .expect("list")
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap_or(""),
                d["source"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(names, vec![("cpu", "config"), ("mem", "database")]);

    let mut changed = mem.clone();
    changed["query"] = "sum(rate(node_memory_bytes[10m]))".into();
    let (status, v) = api
        .call(Method::PUT, "/api/v1/detectors/mem", Some(changed.clone()))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["spec"]["query"], changed["query"]);
    let mut unnamed = changed.clone();
    unnamed.as_object_mut().expect("object").remove("name");
    let (status, _) = api
        .call(Method::PUT, "/api/v1/detectors/nope", Some(unnamed.clone()))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api
        .call(Method::PUT, "/api/v1/detectors/cpu", Some(unnamed.clone()))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, v) = api
        .call(
            Method::PUT,
            "/api/v1/detectors/other",
            Some(changed.clone()),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "name differs from the path"
    );
    assert!(error_of(&v).contains("name"), "{v}");

    // Retraining: queued for known detectors only.
    let (status, v) = api.post("/api/v1/detectors/mem/retrain", json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["status"], "queued");
    assert_eq!(v["detector"], "mem");
    let (status, _) = api.post("/api/v1/detectors/cpu/retrain", json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, _) = api.post("/api/v1/detectors/nope/retrain", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, v) = api.get("/api/v1/training-requests?limit=10").await;
    assert_eq!(status, StatusCode::OK);
    let queued: Vec<&str> = v["requests"]
        .as_array()
        .expect("list")
        .iter()
        .map(|r| r["detector"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(queued, vec!["cpu", "mem"], "newest first");
    let (status, _) = api.get("/api/v1/training-requests?limit=1").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api.get("/api/v1/training-requests?limit=0").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, _) = api
        .call(Method::DELETE, "/api/v1/detectors/mem", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = api
        .call(Method::DELETE, "/api/v1/detectors/mem", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api
        .call(Method::DELETE, "/api/v1/detectors/cpu", None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    api.stop().await;
    vm.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_listed_activated_and_rolled_back() {
    let db = TestDb::new().await;
    let store: PgStore = db.store().await;
    store.migrate().await.expect("migrate");
    let v1 = common::put_untrained(&store, "cpu", 1.0).await;
    let v2 = common::put_untrained(&store, "cpu", 2.0).await;
    let api = Harness::with_db(&db, &closed_datasource(), "").await;
    let port = api.port;
    let serves = |version: String| async move {
        wait_served(port, "cpu", &version, Duration::from_secs(10)).await;
    };
    serves(v2.version.clone()).await;

    let (status, v) = api.get("/api/v1/models?detector=cpu").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let listed: Vec<(String, bool)> = v["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|x| {
            (
                x["version"].as_str().unwrap_or("").to_string(),
                x["active"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![(v1.version.clone(), false), (v2.version.clone(), true)]
    );
    let (status, _) = api.get("/api/v1/models").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "detector is required");

    let (status, v) = api
        .post(
            "/api/v1/models/cpu/activate",
            json!({ "version": v1.version }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["version"], v1.version.as_str());
    assert_eq!(v["active"], true);
    serves(v1.version.clone()).await;

    let (status, _) = api
        .post("/api/v1/models/cpu/activate", json!({ "version": "nope" }))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, v) = api
        .post("/api/v1/models/cpu/activate", json!({ "versio": "x" }))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&v).contains("versio"), "{v}");
    let (status, v) = api.post("/api/v1/models/cpu/rollback", json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "nothing older than v1: {v}");

    api.post(
        "/api/v1/models/cpu/activate",
        json!({ "version": v2.version }),
    )
    .await;
    let (status, v) = api.post("/api/v1/models/cpu/rollback", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["version"], v1.version.as_str());
    serves(v1.version.clone()).await;

    api.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multivariate_episode_lists_the_inputs_that_drove_it() {
    let db = TestDb::new().await;
    let store = std::sync::Arc::new(db.store().await);
    store.migrate().await.expect("migrate");
    let recorder = mad::history::Recorder::start(store);
    let mut tracker = mad::history::EpisodeTracker::new("node", 0, 60);
    let group: mad::source::Labels = [("instance".to_string(), "a".to_string())].into();
    let point = |ts: i64, inputs: &[(&str, f64)]| mad::score::group::GroupScore {
        labels: group.clone(),
        ts,
        score: inputs.iter().map(|i| i.1).fold(0.0, f64::max),
        inputs: inputs.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
    };
    let episodes = tracker.observe_groups(&[
        point(1_000, &[("memory", 3.0), ("cpu", 1.5), ("latency", 0.2)]),
        point(1_060, &[("cpu", 0.3)]),
    ]);
    assert_eq!(episodes.len(), 2, "opened and closed: {episodes:?}");
    for e in episodes {
        assert!(recorder.record(e));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while recorder.written() < 2 {
        assert!(Instant::now() < deadline, "episodes not written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let api = Harness::with_db(&db, &closed_datasource(), "").await;
    let (status, v) = api.get("/api/v1/anomalies?detector=node").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        v["anomalies"][0]["drivers"],
        json!(["memory", "cpu"]),
        "{v}"
    );
    assert_eq!(v["anomalies"][0]["ended_at"], 1_000, "{v}");
    api.stop().await;
    db.drop().await;
}

/// An episode PostgreSQL refuses (a NUL in a label, which text and JSONB cannot hold) is
/// dropped alone; the episodes around it are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_episode_the_database_refuses_does_not_hold_up_the_others() {
    let db = TestDb::new().await;
    let store = std::sync::Arc::new(db.store().await);
    store.migrate().await.expect("migrate");
    let recorder = mad::history::Recorder::start(store);
    let episode = |instance: &str, started_at: i64| {
        let labels: mad::source::Labels = [("instance".to_string(), instance.to_string())].into();
        mad::history::Episode {
            detector: "cpu".into(),
            series: mad_training::contract::series_key(&labels),
            labels,
            started_at,
            ended_at: Some(started_at + 60),
            peak_score: 2.0,
            drivers: Vec::new(),
        }
    };
    for e in [
        episode("a", 1_000),
        episode("b\0", 1_060),
        episode("c", 1_120),
    ] {
        assert!(recorder.record(e));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while recorder.written() + recorder.dropped() < 3 {
        assert!(
            Instant::now() < deadline,
            "episodes neither written nor dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!((recorder.written(), recorder.dropped()), (2, 1));
    let api = Harness::with_db(&db, &closed_datasource(), "").await;
    let (status, v) = api.get("/api/v1/anomalies?detector=cpu").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let instances: Vec<&str> = v["anomalies"]
        .as_array()
        .expect("anomalies")
        .iter()
        .filter_map(|a| a["labels"]["instance"].as_str())
        .collect();
    assert_eq!(instances, ["c", "a"], "{v}");
    api.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomalies_are_filtered_and_paginated_newest_first() {
    let db = TestDb::new().await;
    db.store().await.migrate().await.expect("migrate");
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    // (detector, instance, start, end)
    let rows = [
        ("cpu", "a", 1_000, Some(1_100)),
        ("cpu", "b", 2_000, Some(2_100)),
        ("mem", "a", 3_000, None),
        ("cpu", "a", 4_000, Some(4_100)),
        ("cpu", "a", 5_000, None),
    ];
    for (detector, instance, start, end) in rows {
        client
            .execute(
                "INSERT INTO anomaly_episodes (detector, series, labels, started_at, ended_at, peak_score) \
                 VALUES ($1, $2, $3, to_timestamp($4), to_timestamp($5), 2.5)",
                &[
                    &detector,
                    &format!("{{instance=\"{instance}\"}}"),
                    &json!({ "instance": instance, "job": "node" }),
                    &(start as f64),
                    &end.map(|e: i64| e as f64),
                ],
            )
            .await
            .expect("insert episode");
    }
    let api = Harness::with_db(&db, &closed_datasource(), "").await;
    let starts = |v: &Value| -> Vec<i64> {
        v["anomalies"]
            .as_array()
            .expect("list")
            .iter()
            .map(|a| a["started_at"].as_i64().unwrap_or(-1))
            .collect()
    };

    let (status, v) = api.get("/api/v1/anomalies").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(starts(&v), vec![5_000, 4_000, 3_000, 2_000, 1_000]);
    assert_eq!(v["next_before_id"], Value::Null);
    assert_eq!(v["anomalies"][0]["labels"]["instance"], "a");
    assert_eq!(v["anomalies"][0]["ended_at"], Value::Null);

    let (_, v) = api
        .get("/api/v1/anomalies?detector=cpu&match[instance]=a")
        .await;
    assert_eq!(starts(&v), vec![5_000, 4_000, 1_000]);
    let (_, v) = api
        .get("/api/v1/anomalies?match[instance]=a&match[job]=node&detector=mem")
        .await;
    assert_eq!(starts(&v), vec![3_000]);
    let (_, v) = api.get("/api/v1/anomalies?match[job]=other").await;
    assert_eq!(starts(&v), Vec::<i64>::new());
    let (_, v) = api.get("/api/v1/anomalies?from=2050&to=4000").await;
    assert_eq!(
        starts(&v),
        vec![4_000, 3_000, 2_000],
        "overlapping [2050, 4000]"
    );

    // Pages of two, newest first, until next_before_id is null.
    let mut seen = Vec::new();
    let mut path = "/api/v1/anomalies?detector=cpu&limit=2".to_string();
    for _ in 0..5 {
        let (status, v) = api.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        seen.extend(starts(&v));
        match v["next_before_id"].as_i64() {
            Some(id) => path = format!("/api/v1/anomalies?detector=cpu&limit=2&before_id={id}"),
            None => break,
        }
    }
    assert_eq!(seen, vec![5_000, 4_000, 2_000, 1_000]);

    for bad in [
        "limit=abc",
        "limit=0",
        "limit=100000",
        "from=-1",
        "from=5&to=4",
        "to=1e3",
        "detector=a%20b",
        "before_id=x",
        "colour=red",
        "limit=1&limit=2",
        "match[]=x",
        "match[a][b]=x",
        "match[instance]=%00",
    ] {
        let (status, v) = api.get(&format!("/api/v1/anomalies?{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }
    api.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_windows_are_created_listed_and_deleted() {
    let db = TestDb::new().await;
    let api = Harness::with_db(&db, &closed_datasource(), "").await;
    let (status, v) = api
        .post(
            "/api/v1/maintenance-windows",
            json!({
                "starts_at": 1_000, "ends_at": 2_000, "detector": "cpu",
                "matchers": {"instance": "a"}, "reason": "kernel upgrade"
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let id = v["id"].as_i64().expect("id");
    assert_eq!(v["matchers"]["instance"], "a");
    let (status, v) = api
        .post(
            "/api/v1/maintenance-windows",
            json!({"starts_at": 5_000, "ends_at": 6_000, "reason": "network"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["detector"], Value::Null);

    let (_, v) = api.get("/api/v1/maintenance-windows").await;
    assert_eq!(v["windows"].as_array().map(Vec::len), Some(2));
    let (_, v) = api
        .get("/api/v1/maintenance-windows?from=1500&to=3000")
        .await;
    assert_eq!(v["windows"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["windows"][0]["reason"], "kernel upgrade");

    let invalid = [
        (
            json!({"starts_at": 2_000, "ends_at": 2_000, "reason": "x"}),
            "ends_at",
        ),
        (
            json!({"starts_at": 1, "ends_at": 2, "reason": "  "}),
            "reason",
        ),
        (json!({"starts_at": 1, "ends_at": 2}), "reason"),
        (
            json!({"starts_at": "soon", "ends_at": 2, "reason": "x"}),
            "starts_at",
        ),
        (
            json!({"starts_at": 1, "ends_at": 2, "reason": "x", "why": 1}),
            "why",
        ),
        (
            json!({"starts_at": -5, "ends_at": 2, "reason": "x"}),
            "starts_at",
        ),
        (
            json!({"starts_at": 1, "ends_at": 9_000_000_000_000i64, "reason": "x"}),
            "ends_at",
        ),
        (
            json!({"starts_at": 1, "ends_at": 2, "reason": "x", "detector": "a b"}),
            "detector",
        ),
        (
            json!({"starts_at": 1, "ends_at": 2, "reason": "x\u{0}y"}),
            "reason",
        ),
        (
            json!({"starts_at": 1, "ends_at": 2, "reason": "x", "matchers": {"a": 1}}),
            "matchers",
        ),
        (
            json!({"starts_at": 1, "ends_at": 2, "reason": "x", "matchers": {"a b": "1"}}),
            "matchers",
        ),
    ];
    for (body, field) in invalid {
        let (status, v) = api.post("/api/v1/maintenance-windows", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(error_of(&v).contains(field), "{body}: {v}");
    }
    let (status, _) = api
        .get("/api/v1/maintenance-windows?from=3000&to=1000")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let path = format!("/api/v1/maintenance-windows/{id}");
    let (status, _) = api.call(Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = api.call(Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api
        .call(Method::DELETE, "/api/v1/maintenance-windows/abc", None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, v) = api.get("/api/v1/maintenance-windows").await;
    assert_eq!(v["windows"].as_array().map(Vec::len), Some(1));
    api.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_json_errors_and_the_server_survives() {
    let db = TestDb::new().await;
    let api = Harness::with_db(&db, &closed_datasource(), "").await;
    let bodies: [(&[u8], &str); 6] = [
        (b"not json", "invalid JSON"),
        (b"", "invalid JSON"),
        (b"[1, 2]", "invalid JSON"),
        (
            b"{\"starts_at\": 1, \"ends_at\": 2, \"reason\": \"x\"} trailing",
            "invalid JSON",
        ),
        (&[0xff, 0xfe, 0x00], "invalid JSON"),
        (
            b"{\"starts_at\": true, \"ends_at\": 2, \"reason\": \"x\"}",
            "starts_at",
        ),
    ];
    for (body, message) in bodies {
        let (status, _, v) = api
            .call_raw(
                Method::POST,
                "/api/v1/maintenance-windows",
                Some(TOKEN),
                Some(body.to_vec()),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}: {v}");
        assert!(error_of(&v).contains(message), "{body:?}: {v}");
    }
    for path in ["/api/v1/detectors", "/api/v1/models/cpu/activate"] {
        let (status, _, v) = api
            .call_raw(
                Method::POST,
                path,
                Some(TOKEN),
                Some(b"{\"name\": 5}".to_vec()),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {v}");
    }
    let (status, _, v) = api
        .call_raw(
            Method::POST,
            "/api/v1/detectors",
            Some(TOKEN),
            Some(b"42".to_vec()),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");

    let huge = format!(
        "{{\"starts_at\": 1, \"ends_at\": 2, \"reason\": \"{}\"}}",
        "x".repeat(100 * 1024)
    );
    let (status, headers, v) = api
        .call_raw(
            Method::POST,
            "/api/v1/maintenance-windows",
            Some(TOKEN),
            Some(huge.into_bytes()),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(
        headers.get("connection").and_then(|h| h.to_str().ok()),
        Some("close")
    );
    assert!(
        error_of(&v).contains(&mad::api::MAX_BODY_BYTES.to_string()),
        "{v}"
    );

    let (status, _, v) = api
        .call_raw(Method::GET, "/api/v1/nothing", Some(TOKEN), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    let (status, headers, v) = api
        .call_raw(Method::DELETE, "/api/v1/detectors", Some(TOKEN), None)
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{v}");
    assert_eq!(
        headers.get("allow").and_then(|h| h.to_str().ok()),
        Some("GET, POST")
    );
    let (status, _, _) = api
        .call_raw(Method::GET, "/api/v1/detectors?x=1", Some(TOKEN), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Still alive, and the non-API routes are unchanged.
    let health = api
        .http
        .get(format!("{}/healthz", api.base))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), StatusCode::OK);
    let wrong = api
        .http
        .post(format!("{}/metrics", api.base))
        .send()
        .await
        .expect("post /metrics");
    assert_eq!(wrong.status(), StatusCode::METHOD_NOT_ALLOWED);
    api.stop().await;
    db.drop().await;
}
