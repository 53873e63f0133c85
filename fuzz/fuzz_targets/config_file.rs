//! See `mad::fuzzing::config_file` for what this target feeds and where.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mad::fuzzing::config_file(data));
