//! The PostgreSQL model registry: versions as `bytea` with their metadata, one active version per
//! detector (a partial unique index enforces it), and `NOTIFY` on every activation so exporters
//! swap models within a second instead of at their next poll.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::StreamExt;
use mad_training::contract::ModelMeta;
use tokio::sync::broadcast;
use tokio_postgres::config::Host;
use tokio_postgres::{AsyncMessage, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{version_name, ModelStore, StoreError, StoredModel, VersionInfo};
use crate::config::Secret;

/// Advisory lock key held while migrating (any constant unlikely to clash; "MADMIGR" in ASCII).
const MIGRATION_LOCK: i64 = 0x004d_4144_4d49_4752;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Channel `NOTIFY`ed with the detector's name whenever its active version changes.
pub const CHANNEL: &str = "mad_model_activated";
const POOL_SIZE: usize = 8;
/// Pause before re-opening a lost LISTEN connection; polling covers the gap meanwhile.
const LISTEN_RETRY: Duration = Duration::from_secs(2);
/// Buffered change notices per subscriber before the oldest are dropped (a subscriber that
/// lags reloads everything, so nothing is missed).
const CHANGES_BUFFER: usize = 256;

pub struct PgStore {
    pool: Pool,
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    /// `user@host:port/db`, for messages: never the password.
    target: String,
    changes: broadcast::Sender<String>,
    listening: Arc<AtomicBool>,
}

impl PgStore {
    /// Connects to the database the store config names (`store.postgres`, with TLS per
    /// `sslmode` and `store.postgres_ca_file`).
    pub async fn from_config(store: &crate::config::Store) -> Result<PgStore, StoreError> {
        let url = store
            .postgres
            .as_ref()
            .ok_or_else(|| StoreError::NotFound("store.postgres is not set".into()))?;
        PgStore::connect_with(url, store.postgres_ca_file.as_deref()).await
    }

    /// Connects (and checks the connection) to the database at `url`, TLS per its `sslmode`.
    pub async fn connect(url: &Secret) -> Result<PgStore, StoreError> {
        PgStore::connect_with(url, None).await
    }

    /// As [`PgStore::connect`], verifying the server's certificate against `ca_file` if given.
    pub async fn connect_with(
        url: &Secret,
        ca_file: Option<&std::path::Path>,
    ) -> Result<PgStore, StoreError> {
        let config: tokio_postgres::Config =
            url.expose().parse().map_err(|e| StoreError::Database {
                target: "(store.postgres)".into(),
                message: format!("invalid PostgreSQL URL: {e}"),
            })?;
        // The URL parser ends the credentials at the first `@`: the rest of a password with an
        // unescaped `@` would become the host and be printed in every error.
        if config
            .get_hosts()
            .iter()
            .any(|h| matches!(h, Host::Tcp(h) if h.contains('@')))
        {
            return Err(StoreError::Database {
                target: "(store.postgres)".into(),
                message: "invalid PostgreSQL URL: an `@` in the user or password must be \
                          written %40"
                    .into(),
            });
        }
        let target = describe(&config);
        let tls = super::tls::connector(ca_file).map_err(|message| StoreError::Database {
            target: target.clone(),
            message,
        })?;
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .build()
            .map_err(|e| StoreError::Database {
                target: target.clone(),
                message: e.to_string(),
            })?;
        let store = PgStore {
            pool,
            config,
            tls,
            target,
            changes: broadcast::channel(CHANGES_BUFFER).0,
            listening: Arc::new(AtomicBool::new(false)),
        };
        // Fail now, with the reason, rather than on the first query.
        drop(store.client().await?);
        Ok(store)
    }

    fn error(&self, e: impl std::error::Error) -> StoreError {
        self.message(with_causes(&e))
    }

    fn message(&self, message: String) -> StoreError {
        StoreError::Database {
            target: self.target.clone(),
            message,
        }
    }

    /// `user@host:port/db`, for messages: never the password.
    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| self.error(e))
    }

    /// Applies pending migrations; returns how many. A database migrated by a newer `mad`
    /// (a migration this binary does not know) is refused.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        // Replicas starting together (sharded exporters, trainers, the relay) migrate one at a
        // time: the others wait here, then find nothing left to apply.
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(|e| self.error(e))?;
        let outcome = self.run_migrations(&mut client).await;
        let unlocked = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await;
        let applied = outcome?;
        unlocked.map_err(|e| self.error(e))?;
        Ok(applied)
    }

    async fn run_migrations(
        &self,
        client: &mut deadpool_postgres::Object,
    ) -> Result<usize, StoreError> {
        let report = embedded::migrations::runner()
            .set_abort_missing(true)
            .set_abort_divergent(true)
            .run_async(&mut ***client)
            .await
            .map_err(|e| {
                let message = match e.kind() {
                    refinery::error::Kind::MissingVersion(m) => format!(
                        "the database schema is newer than this mad (it has migration {m} that \
                         this build does not know): upgrade mad"
                    ),
                    _ => format!("migration failed: {e}"),
                };
                self.message(message)
            })?;
        let applied = report.applied_migrations().len();
        if applied > 0 {
            tracing::info!(target = %self.target, applied, "database migrated");
        }
        Ok(applied)
    }

    /// Starts (once) the task that LISTENs for activations and forwards them to subscribers,
    /// reconnecting when the connection drops.
    fn ensure_listening(&self) {
        if self.listening.swap(true, Ordering::SeqCst) {
            return;
        }
        let config = self.config.clone();
        let tls = self.tls.clone();
        let target = self.target.clone();
        let changes = self.changes.clone();
        tokio::spawn(async move {
            loop {
                match listen(&config, tls.clone(), &changes).await {
                    Ok(()) => tracing::warn!(%target, "LISTEN connection closed; reconnecting"),
                    Err(e) => {
                        tracing::warn!(%target, error = %e, "LISTEN connection failed; retrying")
                    }
                }
                if changes.receiver_count() == 0 {
                    break;
                }
                tokio::time::sleep(LISTEN_RETRY).await;
            }
        });
    }
}

/// One LISTEN session: returns when the connection ends.
async fn listen(
    config: &tokio_postgres::Config,
    tls: MakeRustlsConnect,
    changes: &broadcast::Sender<String>,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(tls).await?;
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let driver = async {
        while let Some(message) = messages.next().await {
            match message? {
                AsyncMessage::Notification(n) if n.channel() == CHANNEL => {
                    let _ = changes.send(n.payload().to_string());
                }
                _ => {}
            }
        }
        Ok::<(), tokio_postgres::Error>(())
    };
    tokio::pin!(driver);
    let listen = format!("LISTEN {CHANNEL}");
    // The connection must be driven while LISTEN is sent, so both run together.
    tokio::select! {
        result = &mut driver => return result,
        result = client.batch_execute(&listen) => result?,
    }
    // A reconnect may have missed notices: tell subscribers to re-check everything.
    let _ = changes.send(String::new());
    driver.await
}

/// Serialises changes to one detector's versions: two trainers finishing at once must not both
/// insert an active version (the unique index would refuse the second).
async fn lock_detector(
    tx: &deadpool_postgres::Transaction<'_>,
    detector: &str,
) -> Result<(), tokio_postgres::Error> {
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&detector])
        .await
        .map(|_| ())
}

/// An error with its causes: "error performing TLS handshake" alone does not say why.
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let shown = c.to_string();
        if !text.contains(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        cause = c.source();
    }
    text
}

fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}@{host}:{port}/{}",
        config.get_user().unwrap_or("(default user)"),
        config.get_dbname().unwrap_or("(default db)")
    )
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn from_unix(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

const INFO_COLUMNS: &str = "detector, version, trained_at, size_bytes, active";

fn info(row: &Row) -> Result<VersionInfo, tokio_postgres::Error> {
    Ok(VersionInfo {
        detector: row.try_get(0)?,
        version: row.try_get(1)?,
        trained_at: unix(row.try_get(2)?),
        size_bytes: row.try_get::<_, i64>(3)?.max(0) as u64,
        active: row.try_get(4)?,
    })
}

#[async_trait]
impl ModelStore for PgStore {
    async fn put(&self, onnx: &[u8], meta: &ModelMeta) -> Result<VersionInfo, StoreError> {
        let meta_json = serde_json::to_value(meta)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode metadata: {e}")))?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.error(e))?;
        lock_detector(&tx, &meta.detector)
            .await
            .map_err(|e| self.error(e))?;
        let last: Option<String> = tx
            .query_opt(
                "SELECT max(version) FROM models WHERE detector = $1",
                &[&meta.detector],
            )
            .await
            .map_err(|e| self.error(e))?
            .and_then(|row| row.get(0));
        let mut version = version_name(SystemTime::now());
        if let Some(last) = last.filter(|l| *l >= version) {
            version = format!("{last}~1");
        }
        tx.execute(
            "UPDATE models SET active = FALSE WHERE detector = $1 AND active",
            &[&meta.detector],
        )
        .await
        .map_err(|e| self.error(e))?;
        let row = tx
            .query_one(
                &format!(
                    "INSERT INTO models (detector, version, onnx, meta, size_bytes, trained_at, \
                     train_start, train_end, active) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, TRUE) RETURNING {INFO_COLUMNS}"
                ),
                &[
                    &meta.detector,
                    &version,
                    &onnx,
                    &meta_json,
                    &(onnx.len() as i64),
                    &from_unix(meta.trained_at),
                    &from_unix(meta.train_start),
                    &from_unix(meta.train_end),
                ],
            )
            .await
            .map_err(|e| self.error(e))?;
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &meta.detector])
            .await
            .map_err(|e| self.error(e))?;
        tx.commit().await.map_err(|e| self.error(e))?;
        info(&row).map_err(|e| self.error(e))
    }

    async fn active_version(&self, detector: &str) -> Result<Option<VersionInfo>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {INFO_COLUMNS} FROM models WHERE detector = $1 AND active"),
                &[&detector],
            )
            .await
            .map_err(|e| self.error(e))?;
        row.map(|r| info(&r)).transpose().map_err(|e| self.error(e))
    }

    async fn load_active(&self, detector: &str) -> Result<Option<StoredModel>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {INFO_COLUMNS}, onnx FROM models WHERE detector = $1 AND active"),
                &[&detector],
            )
            .await
            .map_err(|e| self.error(e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let info = info(&row).map_err(|e| self.error(e))?;
        let onnx: Vec<u8> = row.try_get(5).map_err(|e| self.error(e))?;
        Ok(Some(StoredModel { info, onnx }))
    }

    async fn list(&self, detector: &str) -> Result<Vec<VersionInfo>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {INFO_COLUMNS} FROM models WHERE detector = $1 ORDER BY version"),
                &[&detector],
            )
            .await
            .map_err(|e| self.error(e))?;
        rows.iter()
            .map(info)
            .collect::<Result<_, _>>()
            .map_err(|e| self.error(e))
    }

    async fn activate(&self, detector: &str, version: &str) -> Result<VersionInfo, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.error(e))?;
        lock_detector(&tx, detector)
            .await
            .map_err(|e| self.error(e))?;
        tx.execute(
            "UPDATE models SET active = FALSE WHERE detector = $1 AND active AND version <> $2",
            &[&detector, &version],
        )
        .await
        .map_err(|e| self.error(e))?;
        let row = tx
            .query_opt(
                &format!(
                    "UPDATE models SET active = TRUE WHERE detector = $1 AND version = $2 \
                     RETURNING {INFO_COLUMNS}"
                ),
                &[&detector, &version],
            )
            .await
            .map_err(|e| self.error(e))?;
        let Some(row) = row else {
            // Dropping the transaction rolls the deactivation back.
            return Err(StoreError::NotFound(format!(
                "{detector:?} has no version {version:?}"
            )));
        };
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &detector])
            .await
            .map_err(|e| self.error(e))?;
        tx.commit().await.map_err(|e| self.error(e))?;
        info(&row).map_err(|e| self.error(e))
    }

    async fn prune(&self, detector: &str, keep: usize) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let deleted = client
            .execute(
                "DELETE FROM models WHERE detector = $1 AND NOT active AND version NOT IN \
                 (SELECT version FROM models WHERE detector = $1 ORDER BY version DESC LIMIT $2)",
                &[&detector, &(keep.max(1) as i64)],
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok(deleted as usize)
    }

    fn changes(&self) -> Option<broadcast::Receiver<String>> {
        let receiver = self.changes.subscribe();
        self.ensure_listening();
        Some(receiver)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unescaped_at_in_the_password_is_refused_without_showing_it() {
        let url = Secret::new("postgres://mad:p4ss@w0rd@127.0.0.1:5432/mad");
        let Err(e) = PgStore::connect(&url).await else {
            panic!("the URL should be refused")
        };
        let e = e.to_string();
        assert!(
            e.contains("%40") && !e.contains("w0rd") && !e.contains("p4ss"),
            "{e}"
        );
    }
}
