//! Where trained models live. `mad train` puts versions in, `mad serve` loads the active one.
//!
//! The exporter only sees [`ModelStore`]: the embedded directory store is the default, the
//! PostgreSQL registry implements the same trait for team-wide deployments.

mod dir;
mod postgres;
mod tls;

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use mad_training::contract::ModelMeta;
use tokio::sync::broadcast;

use crate::config;
pub use dir::DirStore;
pub(crate) use postgres::with_causes;
pub use postgres::PgStore;

/// One stored model version, without its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionInfo {
    pub detector: String,
    /// Sortable: a later version compares greater.
    pub version: String,
    pub trained_at: i64,
    pub size_bytes: u64,
    pub active: bool,
}

/// A model version with its ONNX bytes.
#[derive(Debug, Clone)]
pub struct StoredModel {
    pub info: VersionInfo,
    pub onnx: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("model store {path}: {message}")]
    Io { path: String, message: String },
    #[error("model store: {0}")]
    Corrupt(String),
    #[error("model store: {0}")]
    NotFound(String),
    #[error("model registry {target}: {message}")]
    Database { target: String, message: String },
}

#[async_trait]
pub trait ModelStore: Send + Sync {
    /// Stores a new version atomically and makes it the active one.
    async fn put(&self, onnx: &[u8], meta: &ModelMeta) -> Result<VersionInfo, StoreError>;
    /// The active version's info, cheap enough to poll.
    async fn active_version(&self, detector: &str) -> Result<Option<VersionInfo>, StoreError>;
    /// The active version with its bytes.
    async fn load_active(&self, detector: &str) -> Result<Option<StoredModel>, StoreError>;
    /// All complete versions of a detector, oldest first.
    async fn list(&self, detector: &str) -> Result<Vec<VersionInfo>, StoreError>;
    /// Makes an existing version the active one.
    async fn activate(&self, detector: &str, version: &str) -> Result<VersionInfo, StoreError>;
    /// Deletes all but the newest `keep` versions; the active version is always kept.
    async fn prune(&self, detector: &str, keep: usize) -> Result<usize, StoreError>;
    /// Detectors whose active version changed, pushed as it happens, for stores that can tell
    /// (PostgreSQL's LISTEN/NOTIFY). `None`: the exporter relies on polling alone.
    fn changes(&self) -> Option<broadcast::Receiver<String>> {
        None
    }

    /// Re-activates the newest version older than the active one.
    async fn rollback(&self, detector: &str) -> Result<VersionInfo, StoreError> {
        let versions = self.list(detector).await?;
        let active = versions
            .iter()
            .position(|v| v.active)
            .ok_or_else(|| StoreError::NotFound(format!("{detector:?} has no active version")))?;
        let previous = active.checked_sub(1).map(|i| &versions[i]).ok_or_else(|| {
            StoreError::NotFound(format!(
                "{detector:?}: no version older than the active {}",
                versions[active].version
            ))
        })?;
        self.activate(detector, &previous.version).await
    }
}

/// `20261126T115501.123Z`: UTC, sortable as text (RFC 3339's basic format).
pub(crate) fn version_name(now: SystemTime) -> String {
    crate::timestamp::rfc3339_millis(now).replace(['-', ':'], "")
}

/// Opens the store the config names: PostgreSQL when `store.postgres` is set (migrating it unless
/// `store.migrate` is off), else the directory.
pub async fn open(config: &config::Store) -> Result<Arc<dyn ModelStore>, StoreError> {
    match &config.postgres {
        Some(_) => {
            let store = PgStore::from_config(config).await?;
            if config.migrate {
                store.migrate().await?;
            }
            Ok(Arc::new(store))
        }
        None => Ok(Arc::new(DirStore::new(&config.path))),
    }
}
