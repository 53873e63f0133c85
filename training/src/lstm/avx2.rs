//! The per-step products' register blocks, written with AVX2 and FMA intrinsics for CPUs
//! without AVX-512: [`super::avx512`]'s kernel in eight lanes, each `k` one load per 8 columns
//! of `B`, one broadcast per row of `A` and one fused multiply-add per accumulator. The same
//! 4 × 16 blocks left to the compiler took an epoch 1.1× as long. (Blocks of 6 × 16, 12
//! accumulators, were no faster; 4 × 24 spilled one to the stack.) Every element still adds
//! its `k` products in order, each rounded once, so results equal the generic code's bit for
//! bit.

use std::arch::x86_64::{
    _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps,
};

use super::avx512::Strides;

/// f32 lanes in one register.
const LANES: usize = 8;
/// A tile's accumulators: 8 of the 16 registers (enough to keep two multiply-add ports busy
/// through their 4 cycles of latency), leaving the rest for a row of `B` and the broadcast
/// elements of `A`.
const ACCUMULATORS: usize = 8;

/// Adds `A · b` into `c_rows` for the `ROWS` rows of `A` that `a` holds as `strides` say
/// (`b` is `k × n`, `c_rows` is `ROWS × n`, both row-major), over as many columns as fill whole
/// registers, two registers per row where the accumulators allow; returns the first column
/// left undone (`n` rounded down to 8).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub unsafe fn product_rows<const ROWS: usize>(
    a: &[f32],
    strides: Strides,
    b: &[f32],
    c_rows: &mut [f32],
    (k, n): (usize, usize),
) -> usize {
    if k > 0 {
        assert!(a.len() > (ROWS - 1) * strides.row + (k - 1) * strides.k);
    }
    assert!(b.len() >= k * n && c_rows.len() >= ROWS * n);
    const { assert!(ROWS > 0 && ROWS <= ACCUMULATORS) };
    let mut col = 0;
    // SAFETY (each call): the asserts above hold every element the tile reads and writes, and
    // the loop conditions keep `col + VECS · 8 ≤ n`.
    while ROWS * 2 <= ACCUMULATORS && col + 2 * LANES <= n {
        unsafe { tile::<ROWS, 2>(a, strides, b, c_rows, (k, n), col) };
        col += 2 * LANES;
    }
    while col + LANES <= n {
        unsafe { tile::<ROWS, 1>(a, strides, b, c_rows, (k, n), col) };
        col += LANES;
    }
    col
}

/// One `ROWS` × `VECS · 8` tile at column `col`, its accumulators in registers throughout.
///
/// # Safety
/// AVX2 and FMA; `col + VECS · 8 ≤ n` and the slices as [`product_rows`] asserts.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const ROWS: usize, const VECS: usize>(
    a: &[f32],
    strides: Strides,
    b: &[f32],
    c_rows: &mut [f32],
    (k, n): (usize, usize),
    col: usize,
) {
    let (a, b, c) = (a.as_ptr(), b.as_ptr(), c_rows.as_mut_ptr());
    let mut acc = [[_mm256_setzero_ps(); VECS]; ROWS];
    // SAFETY: every offset below is `row · n + col + v · 8 + lane < ROWS · n` for `c`,
    // `kk · n + col + v · 8 + lane < k · n` for `b`, and for `a` at most the last element
    // `product_rows` checked.
    unsafe {
        for (row, acc_row) in acc.iter_mut().enumerate() {
            for (v, acc) in acc_row.iter_mut().enumerate() {
                *acc = _mm256_loadu_ps(c.add(row * n + col + v * LANES));
            }
        }
        for kk in 0..k {
            let b_row = b.add(kk * n + col);
            let mut b_vecs = [_mm256_setzero_ps(); VECS];
            for (v, b_vec) in b_vecs.iter_mut().enumerate() {
                *b_vec = _mm256_loadu_ps(b_row.add(v * LANES));
            }
            for (row, acc_row) in acc.iter_mut().enumerate() {
                let x = _mm256_set1_ps(*a.add(row * strides.row + kk * strides.k));
                for (acc, &b_vec) in acc_row.iter_mut().zip(&b_vecs) {
                    *acc = _mm256_fmadd_ps(x, b_vec, *acc);
                }
            }
        }
        for (row, acc_row) in acc.iter().enumerate() {
            for (v, &acc) in acc_row.iter().enumerate() {
                _mm256_storeu_ps(c.add(row * n + col + v * LANES), acc);
            }
        }
    }
}
