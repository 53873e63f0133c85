//! Timing helpers shared by the benchmarks: CPU and wall time, medians over repeated runs.

#![allow(dead_code)]

use std::time::Instant;

/// CPU time of the whole process (ONNX Runtime threads included, if it started any).
pub fn process_cpu() -> f64 {
    cpu_time::ProcessTime::now().as_duration().as_secs_f64()
}

/// CPU time of the calling thread.
pub fn thread_cpu() -> f64 {
    cpu_time::ThreadTime::now().as_duration().as_secs_f64()
}

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub cpu: f64,
    pub wall: f64,
}

/// Runs `f` once and returns what it returned with its CPU time (from `cpu`) and wall time.
pub fn measure<R>(cpu: fn() -> f64, f: impl FnOnce() -> R) -> (R, Sample) {
    let (c0, w0) = (cpu(), Instant::now());
    let out = f();
    let sample = Sample {
        cpu: cpu() - c0,
        wall: w0.elapsed().as_secs_f64(),
    };
    (out, sample)
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub cpu: f64,
    pub wall: f64,
    pub cpu_min: f64,
    pub cpu_max: f64,
}

pub fn summarise(samples: &[Sample]) -> Summary {
    let mut cpu: Vec<f64> = samples.iter().map(|s| s.cpu).collect();
    let mut wall: Vec<f64> = samples.iter().map(|s| s.wall).collect();
    let cpu_min = cpu.iter().copied().fold(f64::INFINITY, f64::min);
    let cpu_max = cpu.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Summary {
        cpu: median(&mut cpu),
        wall: median(&mut wall),
        cpu_min,
        cpu_max,
    }
}
pub fn spread(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}
