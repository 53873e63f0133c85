//! Where trained models live. `mad train` puts versions in, `mad serve` loads the active one.
//!
//! The exporter only sees [`ModelStore`]; the embedded directory store is the default and the
//! PostgreSQL registry implements the same trait.

mod dir;

use async_trait::async_trait;
use mad_training::contract::ModelMeta;

pub use dir::DirStore;

/// One stored model version, without its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionInfo {
    pub detector: String,
    /// Sortable: a later version compares greater.
    pub version: String,
    pub trained_at: i64,
    pub size_bytes: u64,
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
}

#[async_trait]
pub trait ModelStore: Send + Sync {
    /// Stores a new version atomically and makes it the active one; returns its version.
    async fn put(&self, onnx: &[u8], meta: &ModelMeta) -> Result<VersionInfo, StoreError>;
    /// The active version's info, cheap enough to poll.
    async fn active_version(&self, detector: &str) -> Result<Option<VersionInfo>, StoreError>;
    /// The active version with its bytes.
    async fn load_active(&self, detector: &str) -> Result<Option<StoredModel>, StoreError>;
    /// All complete versions of a detector, oldest first.
    async fn list(&self, detector: &str) -> Result<Vec<VersionInfo>, StoreError>;
    /// Deletes all but the newest `keep` versions.
    async fn prune(&self, detector: &str, keep: usize) -> Result<usize, StoreError>;
}
