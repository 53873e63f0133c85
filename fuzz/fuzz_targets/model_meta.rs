//! See `mad::fuzzing::model_meta` for what this target feeds and where.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mad::fuzzing::model_meta(data));
