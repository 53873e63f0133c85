//! The embedded store: `<root>/<detector>/<version>.onnx` plus `<version>.json`.
//!
//! The metadata file is written last, after the ONNX file is fully on disk, and both appear by
//! rename, so a reader that only trusts versions with metadata never sees a half-written model.
//! `<detector>/ACTIVE` names the active version (written by rename too); without it, or when it
//! names a version that is gone, the newest complete version is active.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use async_trait::async_trait;
use mad_training::contract::ModelMeta;
use serde::{Deserialize, Serialize};

use super::{version_name, ModelStore, StoreError, StoredModel, VersionInfo};

const MODEL_EXT: &str = "onnx";
const META_EXT: &str = "json";
const ACTIVE_FILE: &str = "ACTIVE";

pub struct DirStore {
    root: PathBuf,
}

/// The sidecar file: enough to list versions without opening the models.
#[derive(Serialize, Deserialize)]
struct Sidecar {
    detector: String,
    version: String,
    trained_at: i64,
    size_bytes: u64,
    meta: ModelMeta,
}

impl DirStore {
    pub fn new(root: impl Into<PathBuf>) -> DirStore {
        DirStore { root: root.into() }
    }

    fn io(&self, path: &Path, e: std::io::Error) -> StoreError {
        StoreError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }

    fn detector_dir(&self, detector: &str) -> Result<PathBuf, StoreError> {
        // Names are validated by the config, but the store is a trust boundary of its own.
        if detector.is_empty() || detector.starts_with('.') || detector.contains(['/', '\\', '\0'])
        {
            return Err(StoreError::Corrupt(format!(
                "invalid detector name {detector:?}"
            )));
        }
        Ok(self.root.join(detector))
    }

    fn put_blocking(&self, onnx: &[u8], meta: &ModelMeta) -> Result<VersionInfo, StoreError> {
        let dir = self.detector_dir(&meta.detector)?;
        std::fs::create_dir_all(&dir).map_err(|e| self.io(&dir, e))?;
        self.remove_leftovers(&dir);
        let mut version = version_name(SystemTime::now());
        let existing = self.list_blocking(&meta.detector)?;
        if let Some(last) = existing.last() {
            // Clock steps or two trainings within a millisecond must still sort after the last.
            if version <= last.version {
                version = format!("{}~{}", last.version, existing.len());
            }
        }
        let info = VersionInfo {
            detector: meta.detector.clone(),
            version: version.clone(),
            trained_at: meta.trained_at,
            size_bytes: onnx.len() as u64,
            active: false,
        };
        let sidecar = Sidecar {
            detector: info.detector.clone(),
            version: version.clone(),
            trained_at: info.trained_at,
            size_bytes: info.size_bytes,
            meta: meta.clone(),
        };
        let sidecar = serde_json::to_vec_pretty(&sidecar)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode metadata: {e}")))?;
        let model_file = dir.join(format!("{version}.{MODEL_EXT}"));
        self.write_atomic(&model_file, onnx)?;
        // Without its sidecar the model is not a version; on a full disk it only takes room.
        if let Err(e) = self.write_atomic(&dir.join(format!("{version}.{META_EXT}")), &sidecar) {
            let _ = std::fs::remove_file(&model_file);
            return Err(e);
        }
        self.write_atomic(&dir.join(ACTIVE_FILE), version.as_bytes())?;
        Ok(VersionInfo {
            active: true,
            ..info
        })
    }

    /// Removes what a writer killed mid-put or mid-prune left: temporary files and models
    /// without metadata (invisible, but each kill would add one for good). Puts to one detector
    /// do not overlap (`ACTIVE.tmp` is shared already), so none of these is being written now.
    fn remove_leftovers(&self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for path in entries.flatten().map(|e| e.path()) {
            let stale = match path.extension().and_then(|e| e.to_str()) {
                Some("tmp") => true,
                Some(MODEL_EXT) => !path.with_extension(META_EXT).exists(),
                _ => false,
            };
            if stale {
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), "removed a leftover of an interrupted write")
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot remove a leftover of an interrupted write")
                    }
                }
            }
        }
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        use std::io::Write;
        let tmp = path.with_extension("tmp");
        let result = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)?;
            if let Some(parent) = path.parent() {
                std::fs::File::open(parent)?.sync_all()?;
            }
            Ok(())
        })();
        result.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            self.io(path, e)
        })
    }

    fn list_blocking(&self, detector: &str) -> Result<Vec<VersionInfo>, StoreError> {
        let dir = self.detector_dir(detector)?;
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(&dir, e)),
        };
        let mut versions = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| self.io(&dir, e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some(META_EXT) {
                continue;
            }
            // The version names its files: one that is not this file's own name could point
            // loading and pruning outside the store (`../x`, `/etc/x`).
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            match self.read_sidecar(&path) {
                Ok(sidecar) if sidecar.version != stem => tracing::warn!(
                    path = %path.display(),
                    "model metadata names another version than its file; ignored"
                ),
                Ok(sidecar)
                    if dir
                        .join(format!("{}.{MODEL_EXT}", sidecar.version))
                        .is_file() =>
                {
                    versions.push(VersionInfo {
                        detector: sidecar.detector,
                        version: sidecar.version,
                        trained_at: sidecar.trained_at,
                        size_bytes: sidecar.size_bytes,
                        active: false,
                    })
                }
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "metadata without model file; ignored")
                }
                Err(e) => tracing::warn!(error = %e, "unreadable model metadata; ignored"),
            }
        }
        versions.sort_by(|a, b| a.version.cmp(&b.version));
        let named = std::fs::read_to_string(dir.join(ACTIVE_FILE)).unwrap_or_default();
        let active = versions
            .iter()
            .position(|v| v.version == named.trim())
            .or(versions.len().checked_sub(1));
        if let Some(i) = active {
            versions[i].active = true;
        }
        Ok(versions)
    }

    fn active_blocking(&self, detector: &str) -> Result<Option<VersionInfo>, StoreError> {
        Ok(self.list_blocking(detector)?.into_iter().find(|v| v.active))
    }

    fn activate_blocking(&self, detector: &str, version: &str) -> Result<VersionInfo, StoreError> {
        let found = self
            .list_blocking(detector)?
            .into_iter()
            .find(|v| v.version == version)
            .ok_or_else(|| {
                StoreError::NotFound(format!("{detector:?} has no version {version:?}"))
            })?;
        let dir = self.detector_dir(detector)?;
        self.write_atomic(&dir.join(ACTIVE_FILE), found.version.as_bytes())?;
        Ok(VersionInfo {
            active: true,
            ..found
        })
    }

    fn read_sidecar(&self, path: &Path) -> Result<Sidecar, StoreError> {
        let bytes = std::fs::read(path).map_err(|e| self.io(path, e))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))
    }

    fn load_blocking(&self, detector: &str) -> Result<Option<StoredModel>, StoreError> {
        let Some(info) = self.active_blocking(detector)? else {
            return Ok(None);
        };
        let path = self
            .detector_dir(detector)?
            .join(format!("{}.{MODEL_EXT}", info.version));
        let onnx = std::fs::read(&path).map_err(|e| self.io(&path, e))?;
        if onnx.len() as u64 != info.size_bytes {
            return Err(StoreError::Corrupt(format!(
                "{}: {} bytes on disk, metadata says {}",
                path.display(),
                onnx.len(),
                info.size_bytes
            )));
        }
        Ok(Some(StoredModel { info, onnx }))
    }

    fn prune_blocking(&self, detector: &str, keep: usize) -> Result<usize, StoreError> {
        let versions = self.list_blocking(detector)?;
        let dir = self.detector_dir(detector)?;
        let excess = versions.len().saturating_sub(keep.max(1));
        for old in versions[..excess].iter().filter(|v| !v.active) {
            // Metadata first: without it the version is invisible even if the model stays.
            for ext in [META_EXT, MODEL_EXT] {
                let path = dir.join(format!("{}.{ext}", old.version));
                std::fs::remove_file(&path).map_err(|e| self.io(&path, e))?;
            }
        }
        Ok(versions[..excess].iter().filter(|v| !v.active).count())
    }
}

impl DirStore {
    /// Runs filesystem work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&DirStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = DirStore::new(self.root.clone());
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(|e| StoreError::Corrupt(format!("store task failed: {e}")))?
    }
}

#[async_trait]
impl ModelStore for DirStore {
    async fn put(&self, onnx: &[u8], meta: &ModelMeta) -> Result<VersionInfo, StoreError> {
        let (onnx, meta) = (onnx.to_vec(), meta.clone());
        self.blocking(move |s| s.put_blocking(&onnx, &meta)).await
    }

    async fn active_version(&self, detector: &str) -> Result<Option<VersionInfo>, StoreError> {
        let detector = detector.to_string();
        self.blocking(move |s| s.active_blocking(&detector)).await
    }

    async fn load_active(&self, detector: &str) -> Result<Option<StoredModel>, StoreError> {
        let detector = detector.to_string();
        self.blocking(move |s| s.load_blocking(&detector)).await
    }

    async fn list(&self, detector: &str) -> Result<Vec<VersionInfo>, StoreError> {
        let detector = detector.to_string();
        self.blocking(move |s| s.list_blocking(&detector)).await
    }

    async fn activate(&self, detector: &str, version: &str) -> Result<VersionInfo, StoreError> {
        let (detector, version) = (detector.to_string(), version.to_string());
        self.blocking(move |s| s.activate_blocking(&detector, &version))
            .await
    }

    async fn prune(&self, detector: &str, keep: usize) -> Result<usize, StoreError> {
        let detector = detector.to_string();
        self.blocking(move |s| s.prune_blocking(&detector, keep))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::UNIX_EPOCH;

    /// The bytes of the model `cpu` serves.
    async fn active_onnx(store: &DirStore) -> Vec<u8> {
        store
            .load_active("cpu")
            .await
            .expect("load")
            .expect("some")
            .onnx
    }

    fn meta(detector: &str) -> ModelMeta {
        ModelMeta {
            contract_version: 1,
            detector: detector.into(),
            features: vec![mad_training::contract::Feature::Value],
            inputs: Vec::new(),
            hidden: 4,
            layers: 1,
            step_secs: 60,
            window: 8,
            series: BTreeMap::new(),
            default_band: 1.0,
            train_start: 0,
            train_end: 1,
            trained_at: 2,
            training: BTreeMap::new(),
        }
    }

    #[test]
    fn version_names_sort_by_time() {
        let t = |s| UNIX_EPOCH + std::time::Duration::from_millis(s);
        assert_eq!(version_name(t(0)), "19700101T000000.000Z");
        assert_eq!(version_name(t(1_795_700_101_123)), "20261126T133501.123Z");
        assert!(version_name(t(1_000)) < version_name(t(1_001)));
        // Beyond what RFC 3339 can write: the last name it can, not a panic.
        assert_eq!(version_name(t(300_000_000_000_000)), "99991231T235959.000Z");
    }

    #[tokio::test]
    async fn newest_complete_version_is_active_and_partial_ones_are_ignored() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = DirStore::new(tmp.path());
        assert!(store.load_active("cpu").await.expect("empty ok").is_none());
        let v1 = store.put(b"one", &meta("cpu")).await.expect("put");
        let v2 = store.put(b"two", &meta("cpu")).await.expect("put");
        assert!(v2.version > v1.version);
        // A crash between the two renames leaves a model without metadata: never loaded.
        std::fs::write(tmp.path().join("cpu/29990101T000000.000Z.onnx"), b"half").expect("write");
        std::fs::write(tmp.path().join("cpu/29990101T000000.000Z.tmp"), b"half").expect("write");
        let active = store.load_active("cpu").await.expect("load").expect("some");
        assert_eq!(active.onnx, b"two");
        assert_eq!(active.info.version, v2.version);
        assert_eq!(store.prune("cpu", 1).await.expect("prune"), 1);
        assert_eq!(store.list("cpu").await.expect("list").len(), 1);
        // The next put clears what the crash left.
        let v3 = store.put(b"three", &meta("cpu")).await.expect("put");
        let mut files: Vec<String> = std::fs::read_dir(tmp.path().join("cpu"))
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let mut expected = vec!["ACTIVE".to_string()];
        for v in [&v2.version, &v3.version] {
            expected.push(format!("{v}.json"));
            expected.push(format!("{v}.onnx"));
        }
        expected.sort();
        assert_eq!(files, expected);
    }

    #[tokio::test]
    async fn metadata_naming_a_version_outside_the_store_is_ignored() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = DirStore::new(tmp.path().join("models"));
        let v1 = store.put(b"one", &meta("cpu")).await.expect("put");
        // A sidecar whose version walks out of the store, next to a file it would delete.
        std::fs::write(tmp.path().join("victim.onnx"), b"keep").expect("write");
        std::fs::write(tmp.path().join("victim.json"), b"keep").expect("write");
        let sidecar =
            std::fs::read_to_string(tmp.path().join(format!("models/cpu/{}.json", v1.version)))
                .expect("read")
                .replace(&v1.version, "../../victim");
        std::fs::write(
            tmp.path().join("models/cpu/29990101T000000.000Z.json"),
            sidecar,
        )
        .expect("write");
        let listed = store.list("cpu").await.expect("list");
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(active_onnx(&store).await, b"one");
        store.put(b"two", &meta("cpu")).await.expect("put");
        store.prune("cpu", 1).await.expect("prune");
        assert!(
            tmp.path().join("victim.onnx").is_file() && tmp.path().join("victim.json").is_file()
        );
    }

    #[tokio::test]
    async fn activation_and_rollback_pick_the_served_version() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = DirStore::new(tmp.path());
        let v1 = store.put(b"one", &meta("cpu")).await.expect("put");
        let v2 = store.put(b"two", &meta("cpu")).await.expect("put");
        let back = store.rollback("cpu").await.expect("rollback");
        assert_eq!(back.version, v1.version);
        assert_eq!(active_onnx(&store).await, b"one");
        assert!(
            store.rollback("cpu").await.is_err(),
            "nothing older than v1"
        );
        store.activate("cpu", &v2.version).await.expect("activate");
        assert_eq!(active_onnx(&store).await, b"two");
        assert!(store.activate("cpu", "nope").await.is_err());
        // Pruning never removes the active version, even when it is the oldest.
        store.activate("cpu", &v1.version).await.expect("activate");
        store.put(b"three", &meta("cpu")).await.expect("put");
        store.activate("cpu", &v1.version).await.expect("activate");
        assert_eq!(store.prune("cpu", 1).await.expect("prune"), 1);
        let left: Vec<bool> = store
            .list("cpu")
            .await
            .expect("list")
            .iter()
            .map(|v| v.active)
            .collect();
        assert_eq!(left, vec![true, false]);
    }

    #[tokio::test]
    async fn truncated_model_file_is_reported() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = DirStore::new(tmp.path());
        let v = store.put(b"complete", &meta("cpu")).await.expect("put");
        std::fs::write(tmp.path().join(format!("cpu/{}.onnx", v.version)), b"cut").expect("write");
        let e = store.load_active("cpu").await.expect_err("must fail");
        assert!(e.to_string().contains("metadata says"), "{e}");
    }

    #[tokio::test]
    async fn hostile_detector_names_are_refused() {
        let store = DirStore::new("/nonexistent");
        for bad in ["../x", "", ".hidden", "a/b"] {
            assert!(store.list(bad).await.is_err(), "{bad}");
        }
    }
}
