//! The per-step products' register blocks written with AVX-512 intrinsics, for CPUs that have
//! it. Left to the compiler, the generic blocks came out with their `B` rows loaded in pieces
//! and shuffled together; here each `k` is one load per 16 columns of `B`, one broadcast per
//! row of `A` and one fused multiply-add per accumulator. Every element still adds its `k`
//! products in order, each rounded once, so results equal the generic code's bit for bit.

use std::arch::x86_64::{
    _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
};

/// Rows of `A` (and of `C`) one block covers: the batch is split in groups of 8 streams, two
/// blocks each.
pub const ROWS: usize = 4;
/// f32 lanes in one register.
const LANES: usize = 16;

/// Where a block's [`ROWS`] rows of `A` lie in a slice: element `(row, kk)` at
/// `row · row + kk · k` (`(k, 1)` for rows of `A` stored in place, `(1, m)` for the columns of
/// an `Aᵀ` stored `k × m`).
#[derive(Debug, Clone, Copy)]
pub struct Strides {
    pub row: usize,
    pub k: usize,
}

/// Adds `A · b` into `c_rows` for the [`ROWS`] rows of `A` that `a` holds as `strides` say
/// (`b` is `k × n`, `c_rows` is `ROWS × n`, both row-major), over as many columns as fill whole
/// registers, widest tiles first; returns the first column left undone (`n` rounded down to 16).
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
#[inline]
pub unsafe fn product_rows(
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
    let mut col = 0;
    // SAFETY (each call): the asserts above hold every element the tile reads and writes, and
    // the loop conditions keep `col + VECS · 16 ≤ n`.
    while col + 4 * LANES <= n {
        unsafe { tile::<4>(a, strides, b, c_rows, (k, n), col) };
        col += 4 * LANES;
    }
    if col + 2 * LANES <= n {
        unsafe { tile::<2>(a, strides, b, c_rows, (k, n), col) };
        col += 2 * LANES;
    }
    if col + LANES <= n {
        unsafe { tile::<1>(a, strides, b, c_rows, (k, n), col) };
        col += LANES;
    }
    col
}

/// One [`ROWS`] × `VECS · 16` tile at column `col`, its accumulators in registers throughout.
///
/// # Safety
/// AVX-512F; `col + VECS · 16 ≤ n` and the slices as [`product_rows`] asserts.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<const VECS: usize>(
    a: &[f32],
    strides: Strides,
    b: &[f32],
    c_rows: &mut [f32],
    (k, n): (usize, usize),
    col: usize,
) {
    let (a, b, c) = (a.as_ptr(), b.as_ptr(), c_rows.as_mut_ptr());
    let mut acc = [[_mm512_setzero_ps(); VECS]; ROWS];
    // SAFETY: every offset below is `row · n + col + v · 16 + lane < ROWS · n` for `c`,
    // `kk · n + col + v · 16 + lane < k · n` for `b`, and for `a` at most the last element
    // `product_rows` checked.
    unsafe {
        for (row, acc_row) in acc.iter_mut().enumerate() {
            for (v, acc) in acc_row.iter_mut().enumerate() {
                *acc = _mm512_loadu_ps(c.add(row * n + col + v * LANES));
            }
        }
        for kk in 0..k {
            let b_row = b.add(kk * n + col);
            let mut b_vecs = [_mm512_setzero_ps(); VECS];
            for (v, b_vec) in b_vecs.iter_mut().enumerate() {
                *b_vec = _mm512_loadu_ps(b_row.add(v * LANES));
            }
            for (row, acc_row) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add(row * strides.row + kk * strides.k));
                for (acc, &b_vec) in acc_row.iter_mut().zip(&b_vecs) {
                    *acc = _mm512_fmadd_ps(x, b_vec, *acc);
                }
            }
        }
        for (row, acc_row) in acc.iter().enumerate() {
            for (v, &acc) in acc_row.iter().enumerate() {
                _mm512_storeu_ps(c.add(row * n + col + v * LANES), acc);
            }
        }
    }
}
