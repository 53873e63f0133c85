//! The PostgreSQL model registry against the real server on 127.0.0.1:5432, each test in a
//! database of its own: migrations, byte-for-byte round trips, activation and rollback, and a
//! running `mad serve` that follows activations through LISTEN/NOTIFY.

mod common;

use common::exporter::wait_served;
use common::pg::TestDb;

use std::path::Path;
use std::time::{Duration, Instant};

use mad::config::Secret;
use mad::store::{ModelStore, PgStore};

/// Replicas starting together on a fresh database (sharded exporters, trainers, the relay):
/// one migrates, the others wait for it and find nothing left to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_migrating_at_once_apply_each_migration_once() {
    let db = TestDb::new().await;
    let stores = [db.store().await, db.store().await, db.store().await];
    let (a, b, c) = tokio::join!(
        stores[0].migrate(),
        stores[1].migrate(),
        stores[2].migrate()
    );
    let applied: Vec<usize> = [a, b, c]
        .into_iter()
        .map(|r| r.expect("every replica's migration succeeds"))
        .collect();
    let shipped = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .expect("migrations folder")
        .flatten()
        .filter(|f| f.file_name().to_string_lossy().ends_with(".sql"))
        .count();
    assert_eq!(applied.iter().sum::<usize>(), shipped, "{applied:?}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_once_and_a_newer_schema_is_refused() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let shipped = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .expect("migrations folder")
        .flatten()
        .filter(|f| f.file_name().to_string_lossy().ends_with(".sql"))
        .count();
    assert_eq!(store.migrate().await.expect("first migration"), shipped);
    assert_eq!(
        store.migrate().await.expect("re-run"),
        0,
        "re-running is a no-op"
    );

    // A newer mad migrated this database further.
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
        .batch_execute(
            "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) \
             VALUES (999, 'from_the_future', '2030-01-01T00:00:00Z', '0')",
        )
        .await
        .expect("fake a newer migration");
    let e = store.migrate().await.expect_err("must refuse");
    assert!(e.to_string().contains("newer than this mad"), "{e}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_round_trip_byte_for_byte_with_activation_and_rollback() {
    let db = TestDb::new().await;
    let store = db.store().await;
    store.migrate().await.expect("migrate");
    let meta = common::meta("cpu", 1.0);
    let first_bytes = common::model_bytes(&meta);
    let v1 = store.put(&first_bytes, &meta).await.expect("put v1");
    let mut second_meta = meta.clone();
    second_meta.default_band = 2.0;
    let second_bytes = common::model_bytes(&second_meta);
    let v2 = store
        .put(&second_bytes, &second_meta)
        .await
        .expect("put v2");
    assert!(v2.version > v1.version && v2.active);

    let active = store.load_active("cpu").await.expect("load").expect("some");
    assert_eq!(active.onnx, second_bytes, "bytes come back unchanged");
    assert_eq!(active.info.version, v2.version);
    let listed = store.list("cpu").await.expect("list");
    assert_eq!(
        listed
            .iter()
            .map(|v| (v.version.clone(), v.active))
            .collect::<Vec<_>>(),
        vec![(v1.version.clone(), false), (v2.version.clone(), true)]
    );

    let back = store.rollback("cpu").await.expect("rollback");
    assert_eq!(back.version, v1.version);
    assert_eq!(
        store
            .load_active("cpu")
            .await
            .expect("load")
            .expect("some")
            .onnx,
        first_bytes
    );
    assert!(
        store.rollback("cpu").await.is_err(),
        "nothing older than v1"
    );
    assert!(store.activate("cpu", "no-such-version").await.is_err());
    assert_eq!(
        store
            .active_version("cpu")
            .await
            .expect("active")
            .map(|v| v.version),
        Some(v1.version.clone()),
        "a failed activation changes nothing"
    );

    // Pruning keeps the newest versions and, always, the active one.
    store.put(&first_bytes, &meta).await.expect("put v3");
    store
        .activate("cpu", &v1.version)
        .await
        .expect("activate v1");
    assert_eq!(store.prune("cpu", 1).await.expect("prune"), 1);
    let left: Vec<String> = store
        .list("cpu")
        .await
        .expect("list")
        .into_iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(left.len(), 2);
    assert!(
        left.contains(&v1.version) && !left.contains(&v2.version),
        "{left:?}"
    );
    assert!(store.load_active("other").await.expect("load").is_none());
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_exporter_follows_activations_through_notify() {
    let db = TestDb::new().await;
    let store = db.store().await;
    store.migrate().await.expect("migrate");
    let v1 = common::put_untrained(&store, "cpu", 1.0).await;

    // Polling once an hour: only a notification can make the exporter switch in time.
    let (serving, port) = common::serve::from_db(&db, "1h");
    let serves = |version: String| async move {
        wait_served(port, "cpu", &version, Duration::from_secs(5)).await
    };
    serves(v1.version.clone()).await;

    let v2 = common::put_untrained(&store, "cpu", 3.0).await;
    let trained = Instant::now();
    let seen = serves(v2.version.clone()).await;
    println!(
        "new version served {:?} after it was stored",
        seen - trained
    );

    // A rollback from another process (here: another connection) reaches it the same way.
    let other = db.store().await;
    other.rollback("cpu").await.expect("rollback");
    serves(v1.version.clone()).await;

    serving.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_never_show_the_password() {
    let closed = mad::demo::free_port().expect("port");
    let url = format!("postgres://mad:s3cretpassw0rd@127.0.0.1:{closed}/registry");
    let e = match PgStore::connect(&Secret::new(url)).await {
        Ok(_) => panic!("nothing listens there"),
        Err(e) => e,
    };
    let shown = format!("{e} {e:?}");
    assert!(!shown.contains("s3cretpassw0rd"), "{shown}");
    assert!(
        shown.contains(&format!("mad@127.0.0.1:{closed}/registry")),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detectors_added_to_the_database_are_served_and_removed_ones_stop() {
    let db = TestDb::new().await;
    let store = db.store().await;
    store.migrate().await.expect("migrate");
    let registry = mad::registry::Registry::new(std::sync::Arc::new(db.store().await));
    let version = common::put_untrained(&store, "from_db", 1.0).await;

    let (serving, port) = common::serve::from_db(&db, "1s");
    let info = format!(
        "mad_model_info{{detector=\"from_db\",version=\"{}\"}} 1",
        version.version
    );
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let served = || async {
        reqwest::get(&metrics)
            .await
            .ok()?
            .text()
            .await
            .ok()
            .map(|b| b.contains(&info))
    };
    let until = |want: bool| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        while served().await != Some(want) {
            assert!(
                Instant::now() < deadline,
                "from_db served should become {want}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    until(false).await;
    let spec = serde_json::json!({ "query": "up", "step": "1m", "window": 8, "train_range": "1d" });
    assert!(registry
        .put_detector("from_db", &spec, true)
        .await
        .expect("create"));
    until(true).await;
    assert!(registry.delete_detector("from_db").await.expect("delete"));
    until(false).await;

    serving.stop().await;
    db.drop().await;
}

/// Connections of this database that use TLS, as the server sees them.
async fn tls_connections(db: &TestDb) -> i64 {
    common::pg::admin()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE ssl AND datname = $1",
            &[&db.name],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_follows_sslmode_and_checks_the_server_against_a_given_ca() {
    let db = TestDb::new().await;
    let plain = PgStore::connect(&Secret::new(format!("{}?sslmode=disable", db.url)))
        .await
        .expect("plain connection");
    assert_eq!(tls_connections(&db).await, 0);
    let encrypted = PgStore::connect(&Secret::new(format!("{}?sslmode=require", db.url)))
        .await
        .expect("TLS connection (the server's certificate is self-signed: not checked)");
    assert!(
        tls_connections(&db).await >= 1,
        "sslmode=require must encrypt"
    );
    encrypted.migrate().await.expect("works over TLS");

    // With a CA file the certificate must verify: Debian's self-signed certificate names the
    // host, not 127.0.0.1, so the handshake is refused.
    let snakeoil = Path::new("/etc/ssl/certs/ssl-cert-snakeoil.pem");
    if snakeoil.exists() {
        let refused = PgStore::connect_with(
            &Secret::new(format!("{}?sslmode=require", db.url)),
            Some(snakeoil),
        )
        .await;
        let e = refused
            .err()
            .expect("certificate name mismatch must be refused");
        assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    }
    let e = PgStore::connect_with(
        &Secret::new(db.url.clone()),
        Some(Path::new("/nonexistent/ca.pem")),
    )
    .await
    .err()
    .expect("a missing CA file is an error");
    assert!(e.to_string().contains("postgres_ca_file"), "{e}");
    drop((plain, encrypted));
    db.drop().await;
}
