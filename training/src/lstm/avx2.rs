//! The per-step products' register blocks, written with AVX2 and FMA intrinsics for CPUs
//! without AVX-512: the [`super::tiles`] AVX-512 runs, in eight lanes, each `k` one load per 8
//! columns of `B`, one broadcast per row of `A` and one fused multiply-add per accumulator. The
//! same 4 × 16 blocks left to the compiler took an epoch 1.1× as long. (Blocks of 6 × 16, 12
//! accumulators, were no faster; 4 × 24 spilled one to the stack.) Every element still adds
//! its `k` products in order, each rounded once, so results equal the generic code's bit for
//! bit.

use std::arch::x86_64::{
    _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps,
};

/// A tile's accumulators: 8 of the 16 registers (enough to keep two multiply-add ports busy
/// through their 4 cycles of latency), leaving the rest for a row of `B` and the broadcast
/// elements of `A`.
const ACCUMULATORS: usize = 8;

product_tiles! {
    feature: "avx2,fma",
    lanes: 8,
    accumulators: ACCUMULATORS,
    tile_widths: [4, 2, 1],
    zero: _mm256_setzero_ps,
    load: _mm256_loadu_ps,
    store: _mm256_storeu_ps,
    splat: _mm256_set1_ps,
    fmadd: _mm256_fmadd_ps,
}
