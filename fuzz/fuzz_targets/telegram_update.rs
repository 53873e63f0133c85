//! See `mad::fuzzing::telegram_update` for what this target feeds and where.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mad::fuzzing::telegram_update(data));
