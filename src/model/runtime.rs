//! The ONNX Runtime shared library, loaded once per process.
//!
//! `ort` loads the library at run time (`load-dynamic`), so a missing or mismatched library is an
//! error we can explain instead of a link failure or a panic deep inside the first session.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::{Environment, GlobalThreadPoolOptions};

/// The library file name `scripts/fetch-onnxruntime.sh` installs.
const LIBRARY_NAME: &str = "libonnxruntime.so";
const FIX_HINT: &str =
    "run scripts/fetch-onnxruntime.sh, or point ORT_DYLIB_PATH or `onnxruntime.library` in the config at libonnxruntime.so 1.31";

#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("ONNX Runtime library not found (looked at {looked}); {FIX_HINT}")]
    NotFound { looked: String },
    #[error("cannot load ONNX Runtime: {0}; {FIX_HINT}")]
    Load(String),
}

static ENVIRONMENT: OnceLock<Result<Environment, RuntimeError>> = OnceLock::new();

/// The process-wide ONNX Runtime environment, loading the library on first use.
///
/// Search order: `configured` (the config key), `ORT_DYLIB_PATH`, next to the executable, the
/// project's `.ort/` folder (relative to the executable, the working directory and the source
/// tree). The first call decides; later calls return the same environment or error.
pub fn environment(configured: Option<&Path>) -> Result<&'static Environment, RuntimeError> {
    ENVIRONMENT
        .get_or_init(|| {
            let path = locate(configured)?;
            tracing::debug!(path = %path.display(), "loading ONNX Runtime");
            let builder = ort::init_from(&path).map_err(|e| RuntimeError::Load(e.to_string()))?;
            // One shared single-threaded pool: sessions per detector must not each start threads,
            // and parallelism comes from scoring detectors concurrently.
            let pool = GlobalThreadPoolOptions::default()
                .with_intra_threads(1)
                .and_then(|p| p.with_inter_threads(1))
                .and_then(|p| p.with_spin_control(false))
                .map_err(|e| RuntimeError::Load(e.to_string()))?;
            builder
                .with_name("mad")
                .with_global_thread_pool(pool)
                .build()
                .map_err(|e| RuntimeError::Load(e.to_string()))
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn locate(configured: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = configured {
        // An explicit setting must not silently fall back to another library.
        return if path.is_file() {
            Ok(path.to_owned())
        } else {
            Err(RuntimeError::NotFound {
                looked: path.display().to_string(),
            })
        };
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(RuntimeError::NotFound {
                looked: format!("ORT_DYLIB_PATH={}", path.display()),
            })
        };
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
    {
        candidates.push(dir.join(LIBRARY_NAME));
        // target/{debug,release}/mad and target/{debug,release}/deps/test-binary
        for up in [2, 3] {
            if let Some(root) = dir.ancestors().nth(up) {
                candidates.push(root.join(".ort").join(LIBRARY_NAME));
            }
        }
    }
    if let Ok(cwd) = std::env::current_dir() {
        candidates.push(cwd.join(".ort").join(LIBRARY_NAME));
    }
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(".ort")
            .join(LIBRARY_NAME),
    );
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| RuntimeError::NotFound {
            looked: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}
