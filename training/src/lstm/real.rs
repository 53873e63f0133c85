//! The element types the LSTM runs in: f32 to train and serve, f64 to check gradients. Each
//! brings its activations, its fused multiply-add and, for f32, the hooks into the
//! hand-written kernels.

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

#[cfg(target_arch = "x86_64")]
use super::{AVX2_KERNEL, AVX512_KERNEL};

/// Floating-point element type the LSTM runs in.
pub trait Real:
    Copy
    + Default
    + PartialOrd
    + Debug
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(value: f64) -> Self;
    fn to_f64(self) -> f64;
    fn sqrt(self) -> Self;
    fn sigmoid(self) -> Self;
    fn tanh(self) -> Self;
    /// `self · a + b` rounded once.
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// `C = alpha·A·B + beta·C` for strided matrices (`A` is m×k, `B` k×n, `C` m×n).
    ///
    /// # Safety
    /// Every element addressed through the pointers and strides must be in bounds.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
    /// Adds one block of `ROWS` rows of the LSTM's per-step or weight-gradient products with
    /// the `KERNEL`'s intrinsics ([`AVX2_KERNEL`], [`AVX512_KERNEL`]), where this type has
    /// them, over as many columns as fill whole registers; returns the first column left
    /// undone (0: this type has no such kernel). The block's element `(row, kk)` of `A` is
    /// `a[row · strides.0 + kk · strides.1]`. Internal to the LSTM; not for callers of the
    /// crate.
    ///
    /// # Safety
    /// The CPU must support the `KERNEL`'s instructions.
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    #[inline(always)]
    unsafe fn product_rows_kernel<const KERNEL: usize, const ROWS: usize>(
        _a: &[Self],
        _strides: (usize, usize),
        _b: &[Self],
        _c_rows: &mut [Self],
        _kn: (usize, usize),
    ) -> usize {
        0
    }
    /// One batch row's step after its gate products, with AVX-512 intrinsics where this type
    /// has them: the gates activated in place, then the cell, its `tanh` and the hidden state,
    /// as the generic code computes them, bit for bit. Returns false, doing nothing, where
    /// this type or the row's width has no such kernel. Internal to the LSTM.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    #[inline(always)]
    unsafe fn units_avx512(_gates: &mut [Self], _step: &mut UnitStep<'_, Self>) -> bool {
        false
    }
}

/// One batch row's per-unit slices of a forward step (each `[H]`): the cell before it, and
/// what the step writes — the cell, its `tanh` and the hidden state.
#[doc(hidden)]
pub struct UnitStep<'a, T> {
    pub cell_prev: &'a [T],
    pub cell: &'a mut [T],
    pub tanh_c: &'a mut [T],
    pub hidden: &'a mut [T],
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn from_f64(value: f64) -> Self {
        value
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    // f64 is the gradient-checking precision: exact libm activations keep the analytic
    // derivatives consistent with the function to ~1e-12.
    fn sigmoid(self) -> Self {
        1.0 / (1.0 + (-self).exp())
    }
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f64::mul_add(self, a, b)
    }
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded; the caller guarantees the bounds.
        unsafe {
            matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn from_f64(value: f64) -> Self {
        value as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn sigmoid(self) -> Self {
        1.0 / (1.0 + fast_exp(-self))
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        2.0 / (1.0 + fast_exp(-2.0 * self)) - 1.0
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f32::mul_add(self, a, b)
    }
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded; the caller guarantees the bounds.
        unsafe {
            matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn product_rows_kernel<const KERNEL: usize, const ROWS: usize>(
        a: &[Self],
        (row, k): (usize, usize),
        b: &[Self],
        c_rows: &mut [Self],
        kn: (usize, usize),
    ) -> usize {
        let strides = super::tiles::Strides { row, k };
        // SAFETY: forwarded; the caller guarantees the CPU.
        unsafe {
            match KERNEL {
                AVX512_KERNEL => super::avx512::product_rows::<ROWS>(a, strides, b, c_rows, kn),
                AVX2_KERNEL => super::avx2::product_rows::<ROWS>(a, strides, b, c_rows, kn),
                _ => 0,
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn units_avx512(gates: &mut [Self], step: &mut UnitStep<'_, Self>) -> bool {
        // SAFETY: forwarded; the caller guarantees the CPU.
        unsafe { super::avx512::step_units(gates, step) }
    }
}

/// `exp` for f32 from branch-free arithmetic and bit operations, so loops over it vectorise
/// (libm's `expf` is a call per element and halves training speed). Relative error ~1e-7.
#[inline(always)]
pub(super) fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(EXP_LOWEST, EXP_HIGHEST);
    let shifted = x.mul_add(std::f32::consts::LOG2_E, EXP_ROUNDER);
    let n = shifted - EXP_ROUNDER;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let p = EXP_POLY[1..]
        .iter()
        .fold(EXP_POLY[0], |p, &c| r.mul_add(p, c));
    let exponent = shifted
        .to_bits()
        .wrapping_sub(EXP_ROUNDER.to_bits())
        .wrapping_add(127)
        .wrapping_shl(23);
    p * f32::from_bits(exponent)
}

/// [`fast_exp`]'s argument is clamped to these: beyond, `exp` leaves f32's normal range.
pub(super) const EXP_LOWEST: f32 = -87.0;
pub(super) const EXP_HIGHEST: f32 = 88.0;
/// `ln 2` split in two for [`fast_exp`]'s range reduction: `x − n·ln 2` without the rounding
/// of `n·ln 2` in one float.
pub(super) const LN2_HI: f32 = 0.693_145_75;
pub(super) const LN2_LO: f32 = 1.428_606_8e-6;
/// Adding 1.5·2^23 rounds to an integer held in the low mantissa bits.
pub(super) const EXP_ROUNDER: f32 = 12_582_912.0;
/// [`fast_exp`]'s polynomial, highest degree first: degree 5, fitted for least maximum relative
/// error on [-ln2/2, ln2/2] (1.7e-7 evaluated in f32): as accurate as the degree-7 Taylor
/// series it replaced, within f32's own rounding, for four fewer operations per call.
pub(super) const EXP_POLY: [f32; 6] = [
    0.008_290_315,
    0.041_897_93,
    0.166_676_36,
    0.499_991_5,
    0.999_999_7,
    1.0,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut x = -80.0f32;
        while x < 80.0 {
            let exact = (x as f64).exp();
            let approx = fast_exp(x) as f64;
            assert!(((approx - exact) / exact).abs() < 5e-7, "x={x}");
            x += 0.0371;
        }
    }
}
