//! See `mad::fuzzing::api_request` for what this target feeds and where.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mad::fuzzing::api_request(data));
