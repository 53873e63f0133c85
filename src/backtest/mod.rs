//! Detection quality, measured: labelled recordings replayed through the same scoring code as
//! `mad serve`, and the benchmarks' own scorers (NAB's windows and profiles; F1 with and without
//! point-adjust).

pub mod corpus;
pub mod labelled;
pub mod machines;
pub mod metrics;
pub mod nab;
pub mod range;
pub mod replay;
pub mod report;

use std::path::{Path, PathBuf};

/// Where the labelled datasets are: `MAD_DATASETS`, else `../shared/datasets` next to the
/// checkout (or the working directory), else the machine-wide `/work/shared/datasets`.
pub fn datasets_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("MAD_DATASETS") {
        return Ok(PathBuf::from(dir));
    }
    let candidates = [
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets"),
        PathBuf::from("../shared/datasets"),
        PathBuf::from("/work/shared/datasets"),
    ];
    candidates
        .iter()
        .find(|d| d.join("nab").is_dir())
        .cloned()
        .ok_or_else(|| {
            "the labelled datasets are not found: set MAD_DATASETS to the folder holding nab/, \
             smd/ and asd/"
                .to_string()
        })
}
