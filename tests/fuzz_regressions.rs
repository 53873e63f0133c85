//! Every committed fuzz input, run through the entry point of its `cargo fuzz` target on the
//! stable toolchain: the seeds of `fuzz/corpus/<target>/` (so the entry points stay panic-free
//! on realistic input) and each crasher the fuzzers found, kept in
//! `tests/fuzz_regressions/<target>/` once fixed. The entry points are the functions of
//! `mad::fuzzing`, the very ones the targets call; a panic fails the test naming the file.

use std::path::{Path, PathBuf};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn committed_fuzz_inputs_do_not_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut failures = Vec::new();
    for (target, entry) in mad::fuzzing::TARGETS {
        let seeds = inputs(&root.join("fuzz/corpus").join(target));
        assert!(!seeds.is_empty(), "fuzz/corpus/{target} has no seeds");
        let crashers = inputs(&root.join("tests/fuzz_regressions").join(target));
        for file in seeds.iter().chain(&crashers) {
            let data = std::fs::read(file).expect("readable input");
            if std::panic::catch_unwind(|| entry(&data)).is_err() {
                failures.push(format!("{target}: {}", file.display()));
            }
        }
    }
    assert!(failures.is_empty(), "panicked on: {failures:#?}");
}

#[test]
fn every_target_has_a_fuzz_target_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (target, _) in mad::fuzzing::TARGETS {
        let file = root.join("fuzz/fuzz_targets").join(format!("{target}.rs"));
        assert!(file.is_file(), "{} is missing", file.display());
    }
}
