//! Throw-away databases on the PostgreSQL server at 127.0.0.1:5432.

use std::time::{SystemTime, UNIX_EPOCH};

use mad::config::Secret;
use mad::store::PgStore;

const ADMIN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=postgres";

/// A throw-away database, dropped at the end of the test.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!("mad_test_{}_{nanos}", std::process::id());
        let admin = admin().await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        TestDb {
            url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
            name,
        }
    }

    pub async fn store(&self) -> PgStore {
        PgStore::connect(&Secret::new(self.url.clone()))
            .await
            .expect("connect")
    }

    pub async fn drop(self) {
        let _ = admin()
            .await
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

pub async fn admin() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(ADMIN, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL must run on 127.0.0.1:5432 (.ci/run starts it)");
    tokio::spawn(connection);
    client
}
