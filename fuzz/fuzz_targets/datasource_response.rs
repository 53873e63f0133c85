//! See `mad::fuzzing::datasource_response` for what this target feeds and where.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mad::fuzzing::datasource_response(data));
