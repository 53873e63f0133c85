//! See `mad::fuzzing::onnx_model` for what this target feeds and where.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mad::fuzzing::onnx_model(data));
