//! The per-step products' register blocks, and a forward step's activations, written with
//! AVX-512 intrinsics, for CPUs that have it. Left to the compiler, the generic blocks came out
//! with their `B` rows loaded in pieces and shuffled together; here each `k` is one load per 16
//! columns of `B`, one broadcast per row of `A` and one fused multiply-add per accumulator.
//! Every element still adds its `k` products in order, each rounded once, and the activations
//! repeat the generic code's operations, so results equal the generic code's bit for bit.

use std::arch::x86_64::{
    __m512, _mm512_add_ps, _mm512_castps_si512, _mm512_castsi512_ps, _mm512_div_ps,
    _mm512_fmadd_ps, _mm512_fnmadd_ps, _mm512_loadu_ps, _mm512_max_ps, _mm512_min_ps,
    _mm512_mul_ps, _mm512_set1_epi32, _mm512_set1_ps, _mm512_setzero_ps, _mm512_slli_epi32,
    _mm512_storeu_ps, _mm512_sub_epi32, _mm512_sub_ps, _mm512_xor_si512,
};

use super::real::UnitStep;

/// A tile's accumulators: half of the 32 registers, leaving the rest for a row of `B` and the
/// broadcast elements of `A`.
const ACCUMULATORS: usize = 16;

// 4 rows by 64 columns and 8 by 32 are both 16 accumulators; a row short of a block takes 128
// columns in 8.
product_tiles! {
    feature: "avx512f",
    lanes: 16,
    accumulators: ACCUMULATORS,
    tile_widths: [8, 4, 2, 1],
    zero: _mm512_setzero_ps,
    load: _mm512_loadu_ps,
    store: _mm512_storeu_ps,
    splat: _mm512_set1_ps,
    fmadd: _mm512_fmadd_ps,
}

/// The forward step of one batch row after its gate products (`gates` `[i, o, f, g]`, each
/// `[H]`), sixteen units at a time: the gates activated in place, then `c = f·c' + i·g`,
/// `tanh(c)` and `h = o·tanh(c)`. One pass with everything in registers, where the generic
/// loops made five over short slices. The operations are the generic code's, in its order
/// (`fast_exp`, then `1 / (1 + e)` or `2 / (1 + e) − 1`; the cell's products added unfused), so
/// the results are its bits. Returns false, doing nothing, when `H` is not a multiple of 16.
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
#[inline]
pub unsafe fn step_units(gates: &mut [f32], step: &mut UnitStep<'_, f32>) -> bool {
    let h = step.cell.len();
    if !h.is_multiple_of(LANES) {
        return false;
    }
    assert!(gates.len() == 4 * h && step.cell_prev.len() == h);
    assert!(step.tanh_c.len() == h && step.hidden.len() == h);
    let gates = gates.as_mut_ptr();
    // SAFETY: every offset is `gate · h + unit + lane < 4h` into `gates` and `unit + lane < h`
    // into the per-unit slices, which the asserts above hold.
    unsafe {
        for unit in (0..h).step_by(LANES) {
            let i = sigmoid(_mm512_loadu_ps(gates.add(unit)));
            let o = sigmoid(_mm512_loadu_ps(gates.add(h + unit)));
            let f = sigmoid(_mm512_loadu_ps(gates.add(2 * h + unit)));
            let g = tanh(_mm512_loadu_ps(gates.add(3 * h + unit)));
            _mm512_storeu_ps(gates.add(unit), i);
            _mm512_storeu_ps(gates.add(h + unit), o);
            _mm512_storeu_ps(gates.add(2 * h + unit), f);
            _mm512_storeu_ps(gates.add(3 * h + unit), g);
            let cell_prev = _mm512_loadu_ps(step.cell_prev.as_ptr().add(unit));
            let cell = _mm512_add_ps(_mm512_mul_ps(f, cell_prev), _mm512_mul_ps(i, g));
            let tanh_c = tanh(cell);
            _mm512_storeu_ps(step.cell.as_mut_ptr().add(unit), cell);
            _mm512_storeu_ps(step.tanh_c.as_mut_ptr().add(unit), tanh_c);
            _mm512_storeu_ps(step.hidden.as_mut_ptr().add(unit), _mm512_mul_ps(o, tanh_c));
        }
    }
    true
}

/// `1 / (1 + exp(−x))`, as `Real::sigmoid` for f32.
#[target_feature(enable = "avx512f")]
#[inline]
fn sigmoid(x: __m512) -> __m512 {
    let sign = _mm512_set1_epi32(i32::MIN);
    let e = exp(_mm512_castsi512_ps(_mm512_xor_si512(
        _mm512_castps_si512(x),
        sign,
    )));
    _mm512_div_ps(_mm512_set1_ps(1.0), _mm512_add_ps(_mm512_set1_ps(1.0), e))
}

/// `2 / (1 + exp(−2x)) − 1`, as `Real::tanh` for f32.
#[target_feature(enable = "avx512f")]
#[inline]
fn tanh(x: __m512) -> __m512 {
    let e = exp(_mm512_mul_ps(_mm512_set1_ps(-2.0), x));
    let ratio = _mm512_div_ps(_mm512_set1_ps(2.0), _mm512_add_ps(_mm512_set1_ps(1.0), e));
    _mm512_sub_ps(ratio, _mm512_set1_ps(1.0))
}

/// `fast_exp` in sixteen lanes: the same clamp, range reduction and polynomial.
#[target_feature(enable = "avx512f")]
#[inline]
fn exp(x: __m512) -> __m512 {
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(super::real::EXP_LOWEST)),
        _mm512_set1_ps(super::real::EXP_HIGHEST),
    );
    let rounder = _mm512_set1_ps(super::real::EXP_ROUNDER);
    let shifted = _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), rounder);
    let n = _mm512_sub_ps(shifted, rounder);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::real::LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::real::LN2_LO), r);
    let mut p = _mm512_set1_ps(super::real::EXP_POLY[0]);
    for &c in &super::real::EXP_POLY[1..] {
        p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(c));
    }
    let bias = _mm512_set1_epi32(super::real::EXP_ROUNDER.to_bits() as i32 - 127);
    let exponent = _mm512_slli_epi32::<23>(_mm512_sub_epi32(_mm512_castps_si512(shifted), bias));
    _mm512_mul_ps(p, _mm512_castsi512_ps(exponent))
}
