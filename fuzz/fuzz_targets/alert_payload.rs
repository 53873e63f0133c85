//! See `mad::fuzzing::alert_payload` for what this target feeds and where.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mad::fuzzing::alert_payload(data));
