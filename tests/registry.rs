//! The PostgreSQL registry's data layer against the real server: the retraining queue with two
//! concurrent trainers, maintenance windows, and database detectors merged with the config file.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use common::pg::TestDb;
use mad::config::Config;
use mad::registry::{merged_detectors, DetectorSource, NewWindow, Registry};

async fn registry(db: &TestDb) -> Registry {
    let store = db.store().await;
    store.migrate().await.expect("migrate");
    Registry::new(Arc::new(store))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_trainers_never_take_the_same_request() {
    let db = TestDb::new().await;
    let queue = registry(&db).await;
    let mut queued = BTreeSet::new();
    for i in 0..40 {
        queued.insert(
            queue
                .request_training(&format!("d{}", i % 4))
                .await
                .expect("enqueue")
                .id,
        );
    }
    let take_all = |name: &'static str, registry: Registry| async move {
        let mut taken = Vec::new();
        while let Some(r) = registry.take_training_request(name).await.expect("take") {
            assert_eq!(r.status, "running");
            assert_eq!(r.trainer.as_deref(), Some(name));
            registry
                .finish_training_request(r.id, Ok("v1"))
                .await
                .expect("finish");
            taken.push(r.id);
        }
        taken
    };
    let (a, b) = tokio::join!(
        tokio::spawn(take_all("trainer-a", registry(&db).await)),
        tokio::spawn(take_all("trainer-b", registry(&db).await)),
    );
    let (a, b) = (a.expect("trainer a"), b.expect("trainer b"));
    let a_set: BTreeSet<i64> = a.iter().copied().collect();
    let b_set: BTreeSet<i64> = b.iter().copied().collect();
    assert!(a_set.is_disjoint(&b_set), "a request was trained twice");
    assert_eq!(a.len() + b.len(), 40);
    assert_eq!(
        a_set.union(&b_set).copied().collect::<BTreeSet<_>>(),
        queued
    );
    let listed = queue.training_requests(100).await.expect("list");
    assert!(listed
        .iter()
        .all(|r| r.status == "done" && r.version.as_deref() == Some("v1")));
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_windows_are_stored_and_found_by_overlap() {
    let db = TestDb::new().await;
    let registry = registry(&db).await;
    let window = |start, end, detector: Option<&str>| NewWindow {
        starts_at: start,
        ends_at: end,
        detector: detector.map(str::to_string),
        matchers: [(
            "instance".to_string(),
            "a\"'; DROP TABLE models; --".to_string(),
        )]
        .into(),
        reason: "kernel upgrade".into(),
    };
    let w1 = registry
        .create_window(&window(1_000, 2_000, Some("cpu")))
        .await
        .expect("create");
    registry
        .create_window(&window(5_000, 6_000, None))
        .await
        .expect("create");
    assert!(
        registry
            .create_window(&window(3_000, 2_000, None))
            .await
            .is_err(),
        "end before start"
    );
    let found = registry.windows(1_500, 1_600).await.expect("list");
    assert_eq!(
        found,
        vec![w1.clone()],
        "hostile label values round-trip as data"
    );
    assert_eq!(registry.windows(0, 10_000).await.expect("list").len(), 2);
    assert!(registry.delete_window(w1.id).await.expect("delete"));
    assert!(!registry.delete_window(w1.id).await.expect("delete again"));
    assert_eq!(registry.windows(0, 10_000).await.expect("list").len(), 1);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_detectors_join_the_config_file_which_wins_on_a_clash() {
    let db = TestDb::new().await;
    let registry = registry(&db).await;
    let config = Config::parse(
        "datasource: { url: http://127.0.0.1:8428 }\ndetectors:\n  - { name: cpu, query: up, step: 1m }\n",
        Path::new("c.yaml"),
    )
    .expect("config");
    let spec = |query: &str| serde_json::json!({ "query": query, "step": "30s", "window": 16, "train_range": "1d" });
    assert!(registry
        .put_detector("cpu", &spec("shadowed"), true)
        .await
        .expect("put"));
    assert!(registry
        .put_detector("memory", &spec("node_memory_Active_bytes"), true)
        .await
        .expect("put"));
    assert!(!registry
        .put_detector("memory", &spec("x"), true)
        .await
        .expect("create twice"));
    assert!(registry
        .put_detector("memory", &spec("node_memory_MemFree_bytes"), false)
        .await
        .expect("update"));
    assert!(registry
        .put_detector(
            "broken",
            &serde_json::json!({ "query": "up", "step": "soon" }),
            true
        )
        .await
        .expect("put"));

    let merged = merged_detectors(&config.detectors, Some(&registry))
        .await
        .expect("merge");
    let shown: Vec<(String, DetectorSource, String)> = merged
        .iter()
        .map(|(d, s)| (d.name.0.clone(), *s, d.describe_queries()))
        .collect();
    assert_eq!(
        shown,
        vec![
            ("cpu".into(), DetectorSource::Config, "up".into()),
            (
                "memory".into(),
                DetectorSource::Database,
                "node_memory_MemFree_bytes".into()
            ),
        ],
        "the config file wins, unparsable specs are skipped"
    );
    assert_eq!(merged[1].0.step.0.as_secs(), 30);
    assert!(registry.delete_detector("memory").await.expect("delete"));
    db.drop().await;
}
