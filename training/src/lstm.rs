//! Stacked LSTM layers with a linear head, forward and backward, written by hand.
//!
//! Parameters live in the ONNX `LSTM` layout (gate order i, o, f, c) so that export is a copy and
//! the Rust forward pass can be compared with ONNX Runtime number for number. The code is generic
//! over [`Real`] so the same backward pass trains in `f32` and is gradient-checked in `f64`.
//!
//! Equations (ONNX defaults: sigmoid, tanh, tanh; no peepholes):
//! `i,o,f = σ(x W_g' + h R_g' + Wb_g + Rb_g)`, `g = tanh(…)`, `c' = f c + i g`, `h' = o tanh(c')`,
//! `yhat = h' · head_w + head_b` with `h'` the top layer's output (one forecast per output: a
//! joint model forecasts every input of a group); a layer above the first reads the outputs of
//! the one below as its `x`.

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[cfg(target_arch = "x86_64")]
#[macro_use]
mod tiles;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

/// Number of gates per hidden unit.
const GATES: usize = 4;
/// The block of a per-step product that the generic code keeps in registers: 4 rows × 16
/// columns of f32 is eight AVX2 accumulators, leaving registers for a row of `B` and the
/// broadcast elements of `A`.
const BLOCK_ROWS: usize = 4;
const BLOCK_COLS: usize = 16;
/// Which hand-written kernels a build of the loops calls, as a const parameter (the f32 lanes
/// of their registers) so that each build has its own inlined: none, AVX2's or AVX-512's.
const NO_KERNEL: usize = 0;
const AVX2_KERNEL: usize = 8;
const AVX512_KERNEL: usize = 16;
/// Columns of the AVX-512 kernel's widest tile (four registers of 16 f32 per row).
const WIDE_TILE_COLS: usize = 64;
/// Rows of an AVX-512 block for products narrower than [`WIDE_TILE_COLS`]: 8 rows by 32
/// columns are 16 accumulators, as 4 by 64 are.
const NARROW_BLOCK_ROWS: usize = 2 * BLOCK_ROWS;
/// Rows of `b` [`transposed_product`] runs through every block of rows before the next:
/// 64 rows of 128 gates are 32 KB, which stay in L1 while they are read again.
const TRANSPOSED_K_CHUNK: usize = 64;
/// Columns [`add_column_sums`] keeps in registers: four AVX-512 registers, eight AVX2 ones.
const COLUMN_SUM_BLOCK: usize = 64;

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
        let strides = tiles::Strides { row, k };
        // SAFETY: forwarded; the caller guarantees the CPU.
        unsafe {
            match KERNEL {
                AVX512_KERNEL => avx512::product_rows::<ROWS>(a, strides, b, c_rows, kn),
                AVX2_KERNEL => avx2::product_rows::<ROWS>(a, strides, b, c_rows, kn),
                _ => 0,
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn units_avx512(gates: &mut [Self], step: &mut UnitStep<'_, Self>) -> bool {
        // SAFETY: forwarded; the caller guarantees the CPU.
        unsafe { avx512::step_units(gates, step) }
    }
}

/// `exp` for f32 from branch-free arithmetic and bit operations, so loops over it vectorise
/// (libm's `expf` is a call per element and halves training speed). Relative error ~1e-7.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
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
const EXP_LOWEST: f32 = -87.0;
const EXP_HIGHEST: f32 = 88.0;
/// `ln 2` split in two for [`fast_exp`]'s range reduction: `x − n·ln 2` without the rounding
/// of `n·ln 2` in one float.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Adding 1.5·2^23 rounds to an integer held in the low mantissa bits.
const EXP_ROUNDER: f32 = 12_582_912.0;
/// [`fast_exp`]'s polynomial, highest degree first: degree 5, fitted for least maximum relative
/// error on [-ln2/2, ln2/2] (1.7e-7 evaluated in f32): as accurate as the degree-7 Taylor
/// series it replaced, within f32's own rounding, for four fewer operations per call.
const EXP_POLY: [f32; 6] = [
    0.008_290_315,
    0.041_897_93,
    0.166_676_36,
    0.499_991_5,
    0.999_999_7,
    1.0,
];

/// A strided matrix view that has been checked to stay within its slice.
#[derive(Clone, Copy)]
struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// `data` holds a row-major `rows × cols` matrix.
    fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::checked(data, rows, cols, cols, 1)
    }
    fn checked(
        data: &'a [T],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * row_stride + (cols - 1) * col_stride;
            assert!(last < data.len(), "matrix view out of bounds");
        }
        MatRef {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }
}

/// `c = alpha·a·b + beta·c` with `c` row-major `a.rows × b.cols`.
fn gemm<T: Real>(alpha: T, a: MatRef<'_, T>, b: MatRef<'_, T>, beta: T, c: &mut [T]) {
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    assert!(c.len() >= a.rows * b.cols, "output too small");
    if a.rows == 0 || b.cols == 0 {
        return;
    }
    // SAFETY: both views were bounds-checked at construction and `c` holds a.rows × b.cols.
    unsafe {
        T::gemm_raw(
            a.rows,
            a.cols,
            b.cols,
            alpha,
            a.data.as_ptr(),
            a.row_stride as isize,
            a.col_stride as isize,
            b.data.as_ptr(),
            b.row_stride as isize,
            b.col_stride as isize,
            beta,
            c.as_mut_ptr(),
            b.cols as isize,
            1,
        )
    }
}

/// `c = a·b`, or `c += a·b` when `accumulate`, for row-major contiguous `a` (m×k), `b` (k×n) and
/// `c` (m×n): the per-step products (at batch 64, five inputs and 32 units, 64×37 by 37×128),
/// too small for a general gemm to win back its packing of both operands on every call. Here
/// they are read in place and blocks of `c` stay in registers. Each element adds its `k`
/// products in order, each a fused multiply-add (one rounding, so the same on every CPU), so the
/// result does not depend on the vector width the loops are compiled for.
///
/// With a `KERNEL` (only where the caller is compiled for it), whole blocks of rows go to the
/// type's hand-written kernel ([`Real::product_rows_kernel`]), the same sums in the same order;
/// the generic code does the rest.
#[inline(always)]
fn step_product<T: Real, const KERNEL: usize>(
    a: &[T],
    b: &[T],
    c: &mut [T],
    (m, k, n): (usize, usize, usize),
    accumulate: bool,
) {
    let (a, b, c) = (&a[..m * k], &b[..k * n], &mut c[..m * n]);
    if !accumulate {
        c.fill(T::ZERO);
    }
    if n == 0 || k == 0 {
        return;
    }
    // Without a kernel, `kernel_block` does nothing and the generic code takes every row.
    let block_rows = match KERNEL {
        // Narrow products (the backward `dgates · R`, 32 columns) take 8 rows per block in the
        // AVX-512 kernel: 16 accumulators hide the multiply-adds' latency where 4 rows had 8.
        AVX512_KERNEL if n < WIDE_TILE_COLS => NARROW_BLOCK_ROWS,
        _ => BLOCK_ROWS,
    };
    let (kernel_rows, mut kernel_cols) = (m - m % block_rows, 0);
    let (a_kernel, a_rest) = a.split_at(kernel_rows * k);
    let (c_kernel, c_rest) = c.split_at_mut(kernel_rows * n);
    for (c_rows, a_rows) in c_kernel
        .chunks_mut(block_rows * n)
        .zip(a_kernel.chunks(block_rows * k))
    {
        kernel_cols = kernel_block::<T, KERNEL>(block_rows, a_rows, (k, 1), b, c_rows, (k, n));
    }
    generic_product(a_kernel, b, c_kernel, (k, n), kernel_cols);
    // Rows short of a block, one at a time through the kernel's one-row tiles.
    for (c_row, a_row) in c_rest.chunks_exact_mut(n).zip(a_rest.chunks_exact(k)) {
        let first_col = kernel_block::<T, KERNEL>(1, a_row, (k, 1), b, c_row, (k, n));
        generic_product(a_row, b, c_row, (k, n), first_col);
    }
}

/// The columns from `first_col` of [`step_product`]'s rows `a_rows`: in blocks of
/// [`BLOCK_ROWS`] × [`BLOCK_COLS`], then row by row (rows short of a block, and columns short
/// of one), each element still in order of `k`.
#[inline(always)]
fn generic_product<T: Real>(
    a_rows: &[T],
    b: &[T],
    c_rows: &mut [T],
    (k, n): (usize, usize),
    first_col: usize,
) {
    for (c_rows, a_rows) in c_rows
        .chunks_mut(BLOCK_ROWS * n)
        .zip(a_rows.chunks(BLOCK_ROWS * k))
    {
        let mut col = first_col;
        if c_rows.len() == BLOCK_ROWS * n {
            while col + BLOCK_COLS <= n {
                product_block(a_rows, b, c_rows, (k, n), col);
                col += BLOCK_COLS;
            }
        }
        if col == n {
            continue;
        }
        for (c_row, a_row) in c_rows.chunks_exact_mut(n).zip(a_rows.chunks_exact(k)) {
            let c_row = &mut c_row[col..];
            for (&av, b_row) in a_row.iter().zip(b.chunks_exact(n)) {
                for (v, &bv) in c_row.iter_mut().zip(&b_row[col..]) {
                    *v = av.mul_add(bv, *v);
                }
            }
        }
    }
}

/// One block of `rows` rows through the `KERNEL` ([`Real::product_rows_kernel`]), with the
/// block heights the kernels are instantiated for; returns the first column left undone (0
/// where there is no kernel).
#[inline(always)]
fn kernel_block<T: Real, const KERNEL: usize>(
    rows: usize,
    a: &[T],
    strides: (usize, usize),
    b: &[T],
    c_rows: &mut [T],
    kn: (usize, usize),
) -> usize {
    #[cfg(target_arch = "x86_64")]
    if KERNEL != NO_KERNEL {
        // SAFETY: `KERNEL` is set only by callers compiled for (and run on) its instructions.
        unsafe {
            return match rows {
                1 => T::product_rows_kernel::<KERNEL, 1>(a, strides, b, c_rows, kn),
                BLOCK_ROWS => {
                    T::product_rows_kernel::<KERNEL, BLOCK_ROWS>(a, strides, b, c_rows, kn)
                }
                NARROW_BLOCK_ROWS => {
                    T::product_rows_kernel::<KERNEL, NARROW_BLOCK_ROWS>(a, strides, b, c_rows, kn)
                }
                _ => 0,
            };
        }
    }
    let _ = (rows, a, strides, b, c_rows, kn);
    0
}

/// One batch row's forward step through [`Real::units_avx512`] when the `KERNEL` is AVX-512's;
/// false if it was left to the generic code.
#[inline(always)]
fn kernel_units<T: Real, const KERNEL: usize>(gates: &mut [T], step: &mut UnitStep<'_, T>) -> bool {
    #[cfg(target_arch = "x86_64")]
    if KERNEL == AVX512_KERNEL {
        // SAFETY: `KERNEL` is set only by callers compiled for (and run on) its instructions.
        return unsafe { T::units_avx512(gates, step) };
    }
    let _ = (gates, step);
    false
}

/// `c = aᵀ·b` for row-major contiguous `a` (k×m), `b` (k×n) and `c` (m×n): the weight
/// gradients, summed over every row of every step (`k` in the thousands), read in place: a
/// transposed copy of `a`, even written in tiles, cost 7% of an epoch. Each element adds its
/// `k` products in order, each fused, as in [`step_product`], so every CPU computes the same
/// gradients.
#[inline(always)]
fn transposed_product<T: Real, const KERNEL: usize>(
    a: &[T],
    b: &[T],
    c: &mut [T],
    (m, k, n): (usize, usize, usize),
) {
    let (a, b, c) = (&a[..k * m], &b[..k * n], &mut c[..m * n]);
    c.fill(T::ZERO);
    if n == 0 || k == 0 {
        return;
    }
    let kernel_rows = m - m % BLOCK_ROWS;
    let (mut kernel_cols, mut rest_cols) = (0, 0);
    // The kernel's columns, in chunks of `k` whose rows of `b` stay in L1 across all blocks of
    // rows (and the rows short of a block, one at a time); each element still adds its
    // products in order of `k`. Without a kernel, `kernel_block` does nothing and the generic
    // code takes every row.
    for first_k in (0..k).step_by(TRANSPOSED_K_CHUNK) {
        let chunk = TRANSPOSED_K_CHUNK.min(k - first_k);
        let (a, b) = (&a[first_k * m..], &b[first_k * n..]);
        let kn = (chunk, n);
        for (block, c_rows) in c[..kernel_rows * n].chunks_mut(BLOCK_ROWS * n).enumerate() {
            let a = &a[block * BLOCK_ROWS..];
            kernel_cols = kernel_block::<T, KERNEL>(BLOCK_ROWS, a, (1, m), b, c_rows, kn);
        }
        for (row, c_row) in c[kernel_rows * n..].chunks_exact_mut(n).enumerate() {
            let a = &a[kernel_rows + row..];
            rest_cols = kernel_block::<T, KERNEL>(1, a, (1, m), b, c_row, kn);
        }
    }
    let (c_kernel, c_rest) = c.split_at_mut(kernel_rows * n);
    generic_transposed(a, b, c_kernel, (m, n), (0, kernel_cols));
    generic_transposed(a, b, c_rest, (m, n), (kernel_rows, rest_cols));
}

/// [`transposed_product`]'s rows from `first_row` that `c_rows` holds, from column
/// `first_col`: in blocks of [`BLOCK_ROWS`] × [`BLOCK_COLS`], then row by row (rows short of a
/// block, and columns short of one), each element still in order of `k`.
#[inline(always)]
fn generic_transposed<T: Real>(
    a: &[T],
    b: &[T],
    c_rows: &mut [T],
    (m, n): (usize, usize),
    (first_row, first_col): (usize, usize),
) {
    for (block, c_rows) in c_rows.chunks_mut(BLOCK_ROWS * n).enumerate() {
        let first_row = first_row + block * BLOCK_ROWS;
        let mut col = first_col;
        if c_rows.len() == BLOCK_ROWS * n {
            while col + BLOCK_COLS <= n {
                let mut acc = [[T::ZERO; BLOCK_COLS]; BLOCK_ROWS];
                for (a_row, b_row) in a.chunks_exact(m).zip(b.chunks_exact(n)) {
                    let xs = &a_row[first_row..first_row + BLOCK_ROWS];
                    let b_block = &b_row[col..col + BLOCK_COLS];
                    for (acc_row, &x) in acc.iter_mut().zip(xs) {
                        for (v, &bv) in acc_row.iter_mut().zip(b_block) {
                            *v = x.mul_add(bv, *v);
                        }
                    }
                }
                for (r, acc_row) in acc.iter().enumerate() {
                    c_rows[r * n + col..r * n + col + BLOCK_COLS].copy_from_slice(acc_row);
                }
                col += BLOCK_COLS;
            }
        }
        for (r, c_row) in c_rows.chunks_exact_mut(n).enumerate() {
            let c_row = &mut c_row[col..];
            for (a_row, b_row) in a.chunks_exact(m).zip(b.chunks_exact(n)) {
                let x = a_row[first_row + r];
                for (v, &bv) in c_row.iter_mut().zip(&b_row[col..]) {
                    *v = x.mul_add(bv, *v);
                }
            }
        }
    }
}

/// One [`BLOCK_ROWS`] × [`BLOCK_COLS`] block of [`step_product`], at column `col`. The rows of
/// `a` are walked by zipped iterators: indexing them, bounds-checked and strided, made an epoch
/// 35% slower.
#[inline(always)]
fn product_block<T: Real>(
    a_rows: &[T],
    b: &[T],
    c_rows: &mut [T],
    (k, n): (usize, usize),
    col: usize,
) {
    let mut acc = [[T::ZERO; BLOCK_COLS]; BLOCK_ROWS];
    for (r, acc_row) in acc.iter_mut().enumerate() {
        acc_row.copy_from_slice(&c_rows[r * n + col..r * n + col + BLOCK_COLS]);
    }
    let [a0, a1, a2, a3]: [&[T]; BLOCK_ROWS] = std::array::from_fn(|r| &a_rows[r * k..(r + 1) * k]);
    let a_columns = a0.iter().zip(a1).zip(a2).zip(a3);
    for ((((&x0, &x1), &x2), &x3), b_row) in a_columns.zip(b.chunks_exact(n)) {
        let b_block = &b_row[col..col + BLOCK_COLS];
        for (acc_row, x) in acc.iter_mut().zip([x0, x1, x2, x3]) {
            for (v, &bv) in acc_row.iter_mut().zip(b_block) {
                *v = x.mul_add(bv, *v);
            }
        }
    }
    for (r, acc_row) in acc.iter().enumerate() {
        c_rows[r * n + col..r * n + col + BLOCK_COLS].copy_from_slice(acc_row);
    }
}

/// `a · b` in eight interleaved partial sums: a single running sum is a chain of dependent
/// additions the compiler may not reorder (float addition is not associative), eight vectorise.
/// The order is fixed by the code, not by the CPU.
#[inline(always)]
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    const LANES: usize = 8;
    let (a_blocks, b_blocks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let mut rest = T::ZERO;
    for (&x, &y) in a_blocks.remainder().iter().zip(b_blocks.remainder()) {
        rest += x * y;
    }
    let mut lanes = [T::ZERO; LANES];
    for (x, y) in a_blocks.zip(b_blocks) {
        for ((lane, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *lane += x * y;
        }
    }
    lanes.iter().fold(rest, |sum, &lane| sum + lane)
}

/// Adds to `sums` the column sums of the row-major `rows` (each `sums.len()` wide), every
/// column in order of the rows, [`COLUMN_SUM_BLOCK`] columns at a time held in registers.
/// Summed straight into `sums`, each row's additions had waited on the previous row's stores.
#[inline(always)]
fn add_column_sums<T: Real>(rows: &[T], sums: &mut [T]) {
    let n = sums.len();
    if n == 0 {
        return;
    }
    let mut first = 0;
    let mut blocks = sums.chunks_exact_mut(COLUMN_SUM_BLOCK);
    for block in &mut blocks {
        let mut acc = [T::ZERO; COLUMN_SUM_BLOCK];
        acc.copy_from_slice(block);
        for row in rows.chunks_exact(n) {
            let row = &row[first..first + COLUMN_SUM_BLOCK];
            for (v, &d) in acc.iter_mut().zip(row) {
                *v += d;
            }
        }
        block.copy_from_slice(&acc);
        first += COLUMN_SUM_BLOCK;
    }
    let rest = blocks.into_remainder();
    for row in rows.chunks_exact(n) {
        for (v, &d) in rest.iter_mut().zip(&row[first..]) {
            *v += d;
        }
    }
}

/// Writes the transpose of the row-major `rows × cols` matrix `m` into `out`.
fn transpose<T: Real>(m: &[T], rows: usize, cols: usize, out: &mut [T]) {
    for (i, row) in m[..rows * cols].chunks_exact(cols).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            out[j * rows + i] = v;
        }
    }
}

/// One stream's gradients at its gates (`i, o, f, g` activated, `H` each) at one step, from
/// its previous cell, `tanh` of its cell, the gradient arriving from the layer above and the one
/// carried back from the next step (`dh`); `dc` carries the cell's gradient back one step. Every
/// slice is an argument of its own (not in a tuple or struct) so the compiler knows they do not
/// overlap, and vectorises the loop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gate_gradients<T: Real>(
    gates: &[T],
    cell_prev: &[T],
    tanh_c: &[T],
    above: &[T],
    dh: &[T],
    dc: &mut [T],
    di: &mut [T],
    d_o: &mut [T],
    df: &mut [T],
    dg: &mut [T],
) {
    let h = dc.len();
    let (i_gate, rest) = gates.split_at(h);
    let (o_gate, rest) = rest.split_at(h);
    let (f_gate, g_gate) = rest.split_at(h);
    let (cell_prev, tanh_c, above, dh) = (&cell_prev[..h], &tanh_c[..h], &above[..h], &dh[..h]);
    let (g_gate, di, d_o, df, dg) = (
        &g_gate[..h],
        &mut di[..h],
        &mut d_o[..h],
        &mut df[..h],
        &mut dg[..h],
    );
    for k in 0..h {
        let (i, o, fg, gg, tc) = (i_gate[k], o_gate[k], f_gate[k], g_gate[k], tanh_c[k]);
        let dh_k = dh[k] + above[k];
        let dc_k = dc[k] + dh_k * o * (T::ONE - tc * tc);
        di[k] = dc_k * gg * i * (T::ONE - i);
        d_o[k] = dh_k * tc * o * (T::ONE - o);
        df[k] = dc_k * cell_prev[k] * fg * (T::ONE - fg);
        dg[k] = dc_k * i * (T::ONE - gg * gg);
        dc[k] = dc_k * fg;
    }
}

/// Shapes passed to the LSTM do not match its parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: expected {expected} values, got {actual}")]
pub struct ShapeError {
    pub what: &'static str,
    pub expected: usize,
    pub actual: usize,
}

fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<(), ShapeError> {
    if expected == actual {
        Ok(())
    } else {
        Err(ShapeError {
            what,
            expected,
            actual,
        })
    }
}

/// Dropout while training: each unit of a layer's input from the layer below, and of the
/// head's input, is zeroed with probability `rate` (the rest scaled by `1 / (1 - rate)`), so at
/// inference (no dropout) the expected activations match. The recurrent path is left alone, as
/// in PyTorch's `nn.LSTM`, so the carried state is the one serving sees. `seed` fixes the masks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub rate: f64,
    pub seed: u64,
}

/// Stacked LSTM layers and a linear head in one flat buffer (so the optimiser sees a single
/// slice). Layer `l` holds W `[4H, F_l]` (`F_0` = features, `H` above), R `[4H, H]`, Wb `[4H]`,
/// Rb `[4H]`; the head weight `[outputs, H]` and bias `[outputs]` follow the last layer.
/// Gradients use the same type and layout. One layer is the layout of a single ONNX `LSTM` node
/// plus the head.
#[derive(Debug, Clone, PartialEq)]
pub struct LstmParams<T> {
    features: usize,
    hidden: usize,
    layers: usize,
    outputs: usize,
    data: Vec<T>,
}

/// Where one layer's tensors sit in [`LstmParams`]' buffer.
#[derive(Debug, Clone, Copy)]
struct LayerOffsets {
    w: usize,
    r: usize,
    wb: usize,
    rb: usize,
    end: usize,
}

impl<T: Real> LstmParams<T> {
    /// All-zero single-layer parameters (also the shape of a gradient buffer).
    pub fn zeros(features: usize, hidden: usize) -> Self {
        Self::zeros_stacked(features, hidden, 1)
    }

    /// All-zero parameters for `layers` stacked layers (at least one).
    pub fn zeros_stacked(features: usize, hidden: usize, layers: usize) -> Self {
        Self::zeros_multi(features, hidden, layers, 1)
    }

    /// All-zero parameters with `outputs` forecasts per step (at least one).
    pub fn zeros_multi(features: usize, hidden: usize, layers: usize, outputs: usize) -> Self {
        let (layers, outputs) = (layers.max(1), outputs.max(1));
        let len = Self::len_for(features, hidden, layers, outputs);
        LstmParams {
            features,
            hidden,
            layers,
            outputs,
            data: vec![T::ZERO; len],
        }
    }

    /// Single-layer [`LstmParams::init_stacked`].
    pub fn init(features: usize, hidden: usize, seed: u64) -> Self {
        Self::init_stacked(features, hidden, 1, seed)
    }

    /// Small uniform initialisation (±1/√H) with the forget-gate bias at 1, which keeps memory
    /// open early in training so gradients reach back through the window. The first layer and
    /// the head are drawn first, so a one-layer model is the same for the same seed whatever
    /// the code's stacking support.
    pub fn init_stacked(features: usize, hidden: usize, layers: usize, seed: u64) -> Self {
        Self::init_multi(features, hidden, layers, 1, seed)
    }

    /// [`LstmParams::init_stacked`] with `outputs` forecasts per step.
    pub fn init_multi(
        features: usize,
        hidden: usize,
        layers: usize,
        outputs: usize,
        seed: u64,
    ) -> Self {
        let mut params = Self::zeros_multi(features, hidden, layers, outputs);
        let mut rng = SmallRng::seed_from_u64(seed);
        let bound = 1.0 / (hidden.max(1) as f64).sqrt();
        let mut uniform = |values: &mut [T]| {
            for v in values {
                *v = T::from_f64(rng.gen_range(-bound..bound));
            }
        };
        let first = params.layer_offsets(0);
        uniform(&mut params.data[first.w..first.wb]);
        let head = params.head_offset();
        uniform(&mut params.data[head..head + params.outputs * hidden]);
        for layer in 1..params.layers {
            let o = params.layer_offsets(layer);
            uniform(&mut params.data[o.w..o.wb]);
        }
        for layer in 0..params.layers {
            let o = params.layer_offsets(layer);
            for v in &mut params.data[o.wb + 2 * hidden..o.wb + 3 * hidden] {
                *v = T::ONE;
            }
        }
        params
    }

    fn layer_len(inputs: usize, hidden: usize) -> usize {
        GATES * hidden * (inputs + hidden) + 2 * GATES * hidden
    }

    fn len_for(features: usize, hidden: usize, layers: usize, outputs: usize) -> usize {
        Self::layer_len(features, hidden)
            + (layers - 1) * Self::layer_len(hidden, hidden)
            + outputs * (hidden + 1)
    }

    pub fn features(&self) -> usize {
        self.features
    }
    pub fn hidden(&self) -> usize {
        self.hidden
    }
    pub fn layers(&self) -> usize {
        self.layers
    }
    /// Forecasts per step.
    pub fn outputs(&self) -> usize {
        self.outputs
    }
    /// Inputs of layer `layer`: the features for the first, the hidden size above.
    pub fn layer_inputs(&self, layer: usize) -> usize {
        if layer == 0 {
            self.features
        } else {
            self.hidden
        }
    }
    pub fn as_slice(&self) -> &[T] {
        &self.data
    }
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.data
    }

    fn layer_offsets(&self, layer: usize) -> LayerOffsets {
        let (f, h) = (self.features, self.hidden);
        let w = if layer == 0 {
            0
        } else {
            Self::layer_len(f, h) + (layer - 1) * Self::layer_len(h, h)
        };
        let r = w + GATES * h * self.layer_inputs(layer);
        let wb = r + GATES * h * h;
        let rb = wb + GATES * h;
        LayerOffsets {
            w,
            r,
            wb,
            rb,
            end: rb + GATES * h,
        }
    }

    fn head_offset(&self) -> usize {
        self.layer_offsets(self.layers - 1).end
    }

    /// Input weights of `layer`, `[4H, F_layer]`.
    pub fn w(&self, layer: usize) -> &[T] {
        let o = self.layer_offsets(layer);
        &self.data[o.w..o.r]
    }
    /// Recurrent weights of `layer`, `[4H, H]`.
    pub fn r(&self, layer: usize) -> &[T] {
        let o = self.layer_offsets(layer);
        &self.data[o.r..o.wb]
    }
    /// Input bias of `layer`, `[4H]`.
    pub fn wb(&self, layer: usize) -> &[T] {
        let o = self.layer_offsets(layer);
        &self.data[o.wb..o.rb]
    }
    /// Recurrent bias of `layer`, `[4H]`.
    pub fn rb(&self, layer: usize) -> &[T] {
        let o = self.layer_offsets(layer);
        &self.data[o.rb..o.end]
    }
    /// Head weight `[outputs, H]`.
    pub fn head_w(&self) -> &[T] {
        let head = self.head_offset();
        &self.data[head..head + self.outputs * self.hidden]
    }
    /// Head bias `[outputs]`.
    pub fn head_b(&self) -> &[T] {
        let bias = self.head_offset() + self.outputs * self.hidden;
        &self.data[bias..bias + self.outputs]
    }

    /// One model that computes the mean of `members`' forecasts: their units side by side in
    /// one wider LSTM (hidden size the members' sum), each reading only its own units on the
    /// recurrent path and between layers (block-diagonal weights), and a head that averages. An
    /// ensemble is then still one LSTM and one head, so the ONNX contract and the exporter's
    /// state are unchanged. The members must share one shape.
    pub fn side_by_side(members: &[LstmParams<T>]) -> Result<LstmParams<T>, ShapeError> {
        let first = members.first().ok_or(ShapeError {
            what: "ensemble members",
            expected: 1,
            actual: 0,
        })?;
        let (f, h, layers, outputs) = (first.features, first.hidden, first.layers, first.outputs);
        for m in members {
            check_len("ensemble member features", f, m.features)?;
            check_len("ensemble member hidden size", h, m.hidden)?;
            check_len("ensemble member layers", layers, m.layers)?;
            check_len("ensemble member outputs", outputs, m.outputs)?;
        }
        let k = members.len();
        let wide = k * h;
        let mut merged = Self::zeros_multi(f, wide, layers, outputs);
        // Row `gate·H + j` of member `m` is row `gate·wide + m·H + j` of the merged model.
        let row = |m: usize, member_row: usize| (member_row / h) * wide + m * h + member_row % h;
        for layer in 0..layers {
            let into = merged.layer_offsets(layer);
            let inputs = merged.layer_inputs(layer);
            for (m, member) in members.iter().enumerate() {
                let from = member.layer_offsets(layer);
                let member_inputs = member.layer_inputs(layer);
                // Layer 0 reads the shared features; above it, a member reads its own units.
                let column_offset = if layer == 0 { 0 } else { m * h };
                for r in 0..GATES * h {
                    let to = row(m, r);
                    let w = into.w + to * inputs + column_offset;
                    merged.data[w..w + member_inputs].copy_from_slice(
                        &member.data[from.w + r * member_inputs..][..member_inputs],
                    );
                    let r_to = into.r + to * wide + m * h;
                    merged.data[r_to..r_to + h]
                        .copy_from_slice(&member.data[from.r + r * h..][..h]);
                    merged.data[into.wb + to] = member.data[from.wb + r];
                    merged.data[into.rb + to] = member.data[from.rb + r];
                }
            }
        }
        let share = T::from_f64(1.0 / k as f64);
        let head = merged.head_offset();
        for (m, member) in members.iter().enumerate() {
            for o in 0..outputs {
                for j in 0..h {
                    merged.data[head + o * wide + m * h + j] = member.head_w()[o * h + j] * share;
                }
                merged.data[head + outputs * wide + o] += member.head_b()[o] * share;
            }
        }
        Ok(merged)
    }

    /// The same parameters in another precision.
    pub fn convert<U: Real>(&self) -> LstmParams<U> {
        LstmParams {
            features: self.features,
            hidden: self.hidden,
            layers: self.layers,
            outputs: self.outputs,
            data: self.data.iter().map(|v| U::from_f64(v.to_f64())).collect(),
        }
    }

    /// Runs `seq` steps for `batch` streams from state `h0`, `c0` (`[layers, batch, H]`); `x`
    /// is `[seq, batch, F]`. Allocates; loops should keep an [`LstmTape`] instead.
    pub fn forward(
        &self,
        x: &[T],
        seq: usize,
        batch: usize,
        h0: &[T],
        c0: &[T],
    ) -> Result<LstmOutput<T>, ShapeError> {
        let mut tape = LstmTape::new();
        tape.forward(self, x, seq, batch, h0, c0)?;
        let state = self.layers * batch * self.hidden;
        let (mut h, mut c) = (vec![T::ZERO; state], vec![T::ZERO; state]);
        tape.copy_final_state(&mut h, &mut c)?;
        Ok(LstmOutput {
            yhat: tape.yhat().to_vec(),
            h,
            c,
        })
    }
}

impl LstmParams<f32> {
    /// The f32 forward pass that ONNX Runtime's `LSTM` must reproduce.
    pub fn forward_f32(
        &self,
        x: &[f32],
        seq: usize,
        batch: usize,
        h0: &[f32],
        c0: &[f32],
    ) -> Result<LstmOutput<f32>, ShapeError> {
        self.forward(x, seq, batch, h0, c0)
    }
}

/// Result of [`LstmParams::forward`]: `yhat` `[seq, batch, outputs]`, final `h` and `c`
/// `[layers, batch, H]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LstmOutput<T> {
    pub yhat: Vec<T>,
    pub h: Vec<T>,
    pub c: Vec<T>,
}

/// One layer's activations of the last forward pass, plus its scratch buffers.
#[derive(Debug, Default)]
struct LayerTape<T> {
    /// The layer's input `[seq, batch, inputs]` (after dropout, for layers above the first).
    input: Vec<T>,
    inputs: usize,
    /// Activated gates `[seq, batch, 4H]`.
    gates: Vec<T>,
    /// Hidden and cell states `[seq + 1, batch, H]`; index 0 is the initial state.
    h: Vec<T>,
    c: Vec<T>,
    /// `tanh(c_t)` `[seq, batch, H]`.
    tanh_c: Vec<T>,
    /// Each step's input and previous output side by side, `[seq, batch, inputs + H]`.
    xh: Vec<T>,
    /// `[W; R]` transposed, `[inputs + H, 4H]`.
    weights_transposed: Vec<T>,
    /// Dropout mask applied to `input` (empty: none).
    mask: Vec<T>,
    dgates: Vec<T>,
    /// `[dW, dR]` side by side and transposed, `[inputs + H, 4H]`.
    dweights: Vec<T>,
    dh: Vec<T>,
    dc: Vec<T>,
}

/// Activations of the last forward pass, kept for backpropagation, plus scratch buffers.
/// Reusing one tape across calls avoids allocating inside the training loop.
#[derive(Debug, Default)]
pub struct LstmTape<T> {
    seq: usize,
    batch: usize,
    features: usize,
    hidden: usize,
    layers: Vec<LayerTape<T>>,
    /// Dropout mask on the head's input `[seq, batch, H]` (empty: none).
    head_mask: Vec<T>,
    /// The top layer's output at one step under the head's dropout mask.
    masked_hidden: Vec<T>,
    yhat: Vec<T>,
    /// Gradient arriving at the current layer's outputs `[seq, batch, H]` from above.
    from_above: Vec<T>,
}

fn resize<T: Real>(buffer: &mut Vec<T>, len: usize) {
    buffer.clear();
    buffer.resize(len, T::ZERO);
}

/// How wide the loops may run: 16 lanes (AVX-512), 8 (AVX2) or the baseline x86-64's 4. The
/// binary is built for any x86-64, so the wider code is chosen at run time, as
/// `matrixmultiply` chooses its kernels. The arithmetic is the same either way: multiply-adds
/// are fused, which rounds once whether the CPU has the instruction or libm computes it (slowly:
/// x86-64 CPUs without FMA predate 2013). Only the product left to `matrixmultiply` (the
/// gradient to the layer below) chooses its arithmetic by CPU.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vectors {
    Baseline,
    Avx2,
    Avx512,
}

#[cfg(target_arch = "x86_64")]
fn vectors() -> Vectors {
    use std::arch::is_x86_feature_detected as has;
    match (has!("avx2") && has!("fma"), has!("avx512f")) {
        (true, true) => Vectors::Avx512,
        (true, false) => Vectors::Avx2,
        (false, _) => Vectors::Baseline,
    }
}

/// Sizes a buffer that the caller overwrites whole, without zeroing what it held: the tape's
/// largest buffers are rewritten on every call, and clearing them cost a twentieth of an epoch.
fn reuse<T: Real>(buffer: &mut Vec<T>, len: usize) {
    buffer.resize(len, T::ZERO);
}

/// Fills `mask` with inverted-dropout factors: 0 with probability `rate`, else `1 / (1 - rate)`.
fn fill_mask<T: Real>(mask: &mut Vec<T>, len: usize, rate: f64, rng: &mut SmallRng) {
    let keep = T::from_f64(1.0 / (1.0 - rate));
    mask.clear();
    mask.extend((0..len).map(|_| {
        if rng.gen::<f64>() < rate {
            T::ZERO
        } else {
            keep
        }
    }));
}

impl<T: Real> LayerTape<T> {
    /// Forward pass of one layer over `self.input`, from state `h0`, `c0` (`[batch, H]`).
    fn forward(
        &mut self,
        params: &LstmParams<T>,
        layer: usize,
        seq: usize,
        batch: usize,
        h0: &[T],
        c0: &[T],
    ) {
        #[cfg(target_arch = "x86_64")]
        match vectors() {
            // SAFETY: the CPU has the features each variant is compiled for.
            Vectors::Avx512 => unsafe { self.forward_avx512(params, layer, seq, batch, h0, c0) },
            Vectors::Avx2 => unsafe { self.forward_wide(params, layer, seq, batch, h0, c0) },
            Vectors::Baseline => self.forward_steps::<NO_KERNEL>(params, layer, seq, batch, h0, c0),
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.forward_steps::<NO_KERNEL>(params, layer, seq, batch, h0, c0)
    }

    /// [`Self::forward_steps`] compiled for AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA ([`vectors`]).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn forward_wide(
        &mut self,
        params: &LstmParams<T>,
        layer: usize,
        seq: usize,
        batch: usize,
        h0: &[T],
        c0: &[T],
    ) {
        self.forward_steps::<AVX2_KERNEL>(params, layer, seq, batch, h0, c0)
    }

    /// [`Self::forward_steps`] compiled for AVX-512, its products in the AVX-512 kernel.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and AVX-512F ([`vectors`]).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,avx512f")]
    unsafe fn forward_avx512(
        &mut self,
        params: &LstmParams<T>,
        layer: usize,
        seq: usize,
        batch: usize,
        h0: &[T],
        c0: &[T],
    ) {
        self.forward_steps::<AVX512_KERNEL>(params, layer, seq, batch, h0, c0)
    }

    #[inline(always)]
    fn forward_steps<const KERNEL: usize>(
        &mut self,
        params: &LstmParams<T>,
        layer: usize,
        seq: usize,
        batch: usize,
        h0: &[T],
        c0: &[T],
    ) {
        let (f, h) = (self.inputs, params.hidden);
        let g = GATES * h;
        let bh = batch * h;
        reuse(&mut self.gates, seq * batch * g);
        reuse(&mut self.h, (seq + 1) * bh);
        reuse(&mut self.c, (seq + 1) * bh);
        reuse(&mut self.tanh_c, seq * bh);
        self.h[..bh].copy_from_slice(h0);
        self.c[..bh].copy_from_slice(c0);

        // One product per step: [x_t, h_{t-1}] · [W; R]^T onto the biases, so a step's gates
        // stay in cache from the bias to the activations. `[W; R]` is transposed once per call.
        let fh = f + h;
        reuse(&mut self.xh, seq * batch * fh);
        reuse(&mut self.weights_transposed, fh * g);
        let (w_t, r_t) = self.weights_transposed.split_at_mut(f * g);
        transpose(params.w(layer), g, f, w_t);
        transpose(params.r(layer), g, h, r_t);
        let (wb, rb) = (params.wb(layer), params.rb(layer));

        for t in 0..seq {
            let gates_t = &mut self.gates[t * batch * g..(t + 1) * batch * g];
            for row in gates_t.chunks_exact_mut(g) {
                for ((v, &a), &b) in row.iter_mut().zip(wb).zip(rb) {
                    *v = a + b;
                }
            }
            let xh_t = &mut self.xh[t * batch * fh..(t + 1) * batch * fh];
            let x_t = self.input[t * batch * f..(t + 1) * batch * f].chunks_exact(f);
            let h_prev = self.h[t * bh..(t + 1) * bh].chunks_exact(h);
            for ((row, x_row), h_row) in xh_t.chunks_exact_mut(fh).zip(x_t).zip(h_prev) {
                row[..f].copy_from_slice(x_row);
                row[f..].copy_from_slice(h_row);
            }
            step_product::<T, KERNEL>(
                xh_t,
                &self.weights_transposed,
                gates_t,
                (batch, fh, g),
                true,
            );
            let h_next = &mut self.h[(t + 1) * bh..(t + 2) * bh];
            let (c_past, c_future) = self.c.split_at_mut((t + 1) * bh);
            let c_prev = &c_past[t * bh..];
            let c_next = &mut c_future[..bh];
            let tanh_c = &mut self.tanh_c[t * bh..(t + 1) * bh];
            for b in 0..batch {
                let row = &mut gates_t[b * g..(b + 1) * g];
                let units = b * h..(b + 1) * h;
                let mut step = UnitStep {
                    cell_prev: &c_prev[units.clone()],
                    cell: &mut c_next[units.clone()],
                    tanh_c: &mut tanh_c[units.clone()],
                    hidden: &mut h_next[units],
                };
                if kernel_units::<T, KERNEL>(row, &mut step) {
                    continue;
                }
                let (sigmoid_gates, candidate) = row.split_at_mut(3 * h);
                sigmoid_gates.iter_mut().for_each(|v| *v = v.sigmoid());
                candidate.iter_mut().for_each(|v| *v = v.tanh());
                let (i_gate, rest) = row.split_at(h);
                let (o_gate, rest) = rest.split_at(h);
                let (f_gate, g_gate) = rest.split_at(h);
                let UnitStep {
                    cell_prev,
                    cell,
                    tanh_c: tc,
                    hidden: hidden_out,
                } = step;
                for k in 0..h {
                    cell[k] = f_gate[k] * cell_prev[k] + i_gate[k] * g_gate[k];
                }
                for (t, &c) in tc.iter_mut().zip(cell.iter()) {
                    *t = c.tanh();
                }
                for k in 0..h {
                    hidden_out[k] = o_gate[k] * tc[k];
                }
            }
        }
    }

    /// Backpropagation through this layer's steps, given the gradient at its outputs
    /// (`from_above`, `[seq, batch, H]`). Writes the layer's parameter gradients into `grads`;
    /// when `to_below` is given, writes there the gradient at the layer's input (before its
    /// dropout mask, i.e. at the outputs of the layer below).
    fn backward(
        &mut self,
        params: &LstmParams<T>,
        layer: usize,
        shape: (usize, usize),
        from_above: &[T],
        grads: &mut LstmParams<T>,
        to_below: Option<&mut Vec<T>>,
    ) {
        #[cfg(target_arch = "x86_64")]
        match vectors() {
            // SAFETY: the CPU has the features each variant is compiled for.
            Vectors::Avx512 => unsafe {
                self.backward_avx512(params, layer, shape, from_above, grads, to_below)
            },
            Vectors::Avx2 => unsafe {
                self.backward_wide(params, layer, shape, from_above, grads, to_below)
            },
            Vectors::Baseline => {
                self.backward_steps::<NO_KERNEL>(params, layer, shape, from_above, grads, to_below)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.backward_steps::<NO_KERNEL>(params, layer, shape, from_above, grads, to_below)
    }

    /// [`Self::backward_steps`] compiled for AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA ([`vectors`]).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn backward_wide(
        &mut self,
        params: &LstmParams<T>,
        layer: usize,
        shape: (usize, usize),
        from_above: &[T],
        grads: &mut LstmParams<T>,
        to_below: Option<&mut Vec<T>>,
    ) {
        self.backward_steps::<AVX2_KERNEL>(params, layer, shape, from_above, grads, to_below)
    }

    /// [`Self::backward_steps`] compiled for AVX-512, its products in the AVX-512 kernel.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and AVX-512F ([`vectors`]).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,avx512f")]
    unsafe fn backward_avx512(
        &mut self,
        params: &LstmParams<T>,
        layer: usize,
        shape: (usize, usize),
        from_above: &[T],
        grads: &mut LstmParams<T>,
        to_below: Option<&mut Vec<T>>,
    ) {
        self.backward_steps::<AVX512_KERNEL>(params, layer, shape, from_above, grads, to_below)
    }

    #[inline(always)]
    fn backward_steps<const KERNEL: usize>(
        &mut self,
        params: &LstmParams<T>,
        layer: usize,
        (seq, batch): (usize, usize),
        from_above: &[T],
        grads: &mut LstmParams<T>,
        to_below: Option<&mut Vec<T>>,
    ) {
        let (f, h) = (self.inputs, params.hidden);
        let g = GATES * h;
        let bh = batch * h;
        reuse(&mut self.dgates, seq * batch * g);
        resize(&mut self.dh, bh);
        resize(&mut self.dc, bh);
        let r = params.r(layer);
        for t in (0..seq).rev() {
            let gates_t = &self.gates[t * batch * g..(t + 1) * batch * g];
            let c_prev = &self.c[t * bh..(t + 1) * bh];
            let tanh_c = &self.tanh_c[t * bh..(t + 1) * bh];
            let above_t = &from_above[t * bh..(t + 1) * bh];
            let dgates_t = &mut self.dgates[t * batch * g..(t + 1) * batch * g];
            for b in 0..batch {
                let row = &gates_t[b * g..(b + 1) * g];
                let drow = &mut dgates_t[b * g..(b + 1) * g];
                let dh = &self.dh[b * h..(b + 1) * h];
                let dc = &mut self.dc[b * h..(b + 1) * h];
                let cp = &c_prev[b * h..(b + 1) * h];
                let tc = &tanh_c[b * h..(b + 1) * h];
                let above = &above_t[b * h..(b + 1) * h];
                let (di, rest) = drow.split_at_mut(h);
                let (d_o, rest) = rest.split_at_mut(h);
                let (df, dg) = rest.split_at_mut(h);
                gate_gradients(row, cp, tc, above, dh, dc, di, d_o, df, dg);
            }
            // dh_{t-1} = dgates_t · R; none into the initial state, where training truncates.
            if t > 0 {
                step_product::<T, KERNEL>(dgates_t, r, &mut self.dh, (batch, g, h), false);
            }
        }

        let o = grads.layer_offsets(layer);
        let rows = seq * batch;
        // [dW, dR]^T = [x, h_{t-1}]^T · dgates over all steps, in one product with the gates
        // along its rows, as wide as the kernels' tiles.
        let fh = f + h;
        reuse(&mut self.dweights, fh * g);
        transposed_product::<T, KERNEL>(&self.xh, &self.dgates, &mut self.dweights, (fh, rows, g));
        let (dw, dr) = grads.data[o.w..o.wb].split_at_mut(g * f);
        transpose(&self.dweights[..f * g], f, g, dw);
        transpose(&self.dweights[f * g..], h, g, dr);
        let (before_rb, from_rb) = grads.data.split_at_mut(o.rb);
        let wb_grad = &mut before_rb[o.wb..o.wb + g];
        add_column_sums(&self.dgates, wb_grad);
        from_rb[..g].copy_from_slice(wb_grad);

        if let Some(below) = to_below {
            reuse(below, rows * f);
            gemm(
                T::ONE,
                MatRef::row_major(&self.dgates, rows, g),
                MatRef::row_major(params.w(layer), g, f),
                T::ZERO,
                below,
            );
            if !self.mask.is_empty() {
                for (v, &m) in below.iter_mut().zip(&self.mask) {
                    *v *= m;
                }
            }
        }
    }
}

impl<T: Real> LstmTape<T> {
    pub fn new() -> Self {
        LstmTape {
            seq: 0,
            batch: 0,
            features: 0,
            hidden: 0,
            layers: Vec::new(),
            head_mask: Vec::new(),
            masked_hidden: Vec::new(),
            yhat: Vec::new(),
            from_above: Vec::new(),
        }
    }

    /// Forecasts `[seq, batch, outputs]` of the last forward pass.
    pub fn yhat(&self) -> &[T] {
        &self.yhat
    }

    /// Writes the state after the last step, `[layers, batch, H]`, into `h` and `c`.
    pub fn copy_final_state(&self, h: &mut [T], c: &mut [T]) -> Result<(), ShapeError> {
        let bh = self.batch * self.hidden;
        check_len("h [layers, batch, hidden]", self.layers.len() * bh, h.len())?;
        check_len("c [layers, batch, hidden]", self.layers.len() * bh, c.len())?;
        let last = self.seq * bh..(self.seq + 1) * bh;
        for (l, layer) in self.layers.iter().enumerate() {
            h[l * bh..(l + 1) * bh].copy_from_slice(&layer.h[last.clone()]);
            c[l * bh..(l + 1) * bh].copy_from_slice(&layer.c[last.clone()]);
        }
        Ok(())
    }

    /// Forward pass (no dropout) that records what [`LstmTape::backward`] needs.
    pub fn forward(
        &mut self,
        params: &LstmParams<T>,
        x: &[T],
        seq: usize,
        batch: usize,
        h0: &[T],
        c0: &[T],
    ) -> Result<(), ShapeError> {
        self.forward_train(params, x, (seq, batch), h0, c0, None)
    }

    /// Forward pass, with `dropout` when training. `x` is `[seq, batch, F]`, `h0`/`c0`
    /// `[layers, batch, H]`.
    pub fn forward_train(
        &mut self,
        params: &LstmParams<T>,
        x: &[T],
        (seq, batch): (usize, usize),
        h0: &[T],
        c0: &[T],
        dropout: Option<Dropout>,
    ) -> Result<(), ShapeError> {
        let (f, h, layers) = (params.features, params.hidden, params.layers);
        check_len("x [seq, batch, features]", seq * batch * f, x.len())?;
        check_len("h0 [layers, batch, hidden]", layers * batch * h, h0.len())?;
        check_len("c0 [layers, batch, hidden]", layers * batch * h, c0.len())?;
        self.seq = seq;
        self.batch = batch;
        self.features = f;
        self.hidden = h;
        let bh = batch * h;
        let mut rng = dropout.map(|d| (d.rate, SmallRng::seed_from_u64(d.seed)));
        self.layers.resize_with(layers, LayerTape::default);
        for l in 0..layers {
            let (below, rest) = self.layers.split_at_mut(l);
            let layer = &mut rest[0];
            layer.inputs = params.layer_inputs(l);
            layer.input.clear();
            layer.mask.clear();
            match below.last() {
                None => layer.input.extend_from_slice(x),
                Some(prev) => {
                    layer.input.extend_from_slice(&prev.h[bh..]);
                    if let Some((rate, rng)) = rng.as_mut() {
                        fill_mask(&mut layer.mask, layer.input.len(), *rate, rng);
                        for (v, &m) in layer.input.iter_mut().zip(&layer.mask) {
                            *v *= m;
                        }
                    }
                }
            }
            let state = l * bh..(l + 1) * bh;
            layer.forward(params, l, seq, batch, &h0[state.clone()], &c0[state]);
        }

        self.head_mask.clear();
        if let Some((rate, rng)) = rng.as_mut() {
            fill_mask(&mut self.head_mask, seq * bh, *rate, rng);
        }
        let top = &self.layers[layers - 1];
        let (head_w, head_b, outputs) = (params.head_w(), params.head_b(), params.outputs);
        reuse(&mut self.yhat, seq * batch * outputs);
        for (slot, y_out) in self.yhat.chunks_exact_mut(outputs).enumerate() {
            let hidden_out = &top.h[bh + slot * h..bh + (slot + 1) * h];
            let mask =
                (!self.head_mask.is_empty()).then(|| &self.head_mask[slot * h..(slot + 1) * h]);
            let hidden_out = match mask {
                None => hidden_out,
                Some(mask) => {
                    self.masked_hidden.clear();
                    let masked = hidden_out.iter().zip(mask).map(|(&v, &m)| v * m);
                    self.masked_hidden.extend(masked);
                    &self.masked_hidden
                }
            };
            for (o, y_o) in y_out.iter_mut().enumerate() {
                *y_o = head_b[o] + dot(hidden_out, &head_w[o * h..(o + 1) * h]);
            }
        }
        Ok(())
    }

    /// Backpropagation through the steps of the last forward pass, given `dL/dyhat`
    /// (`[seq, batch, outputs]`). Writes (not accumulates) all parameter gradients into `grads`.
    /// Gradients into the initial state are dropped: training truncates there.
    pub fn backward(
        &mut self,
        params: &LstmParams<T>,
        dyhat: &[T],
        grads: &mut LstmParams<T>,
    ) -> Result<(), ShapeError> {
        let (seq, batch, h) = (self.seq, self.batch, self.hidden);
        check_len("params features", self.features, params.features)?;
        check_len("params hidden", h, params.hidden)?;
        check_len("params layers", self.layers.len(), params.layers)?;
        check_len("grads", params.data.len(), grads.data.len())?;
        let outputs = params.outputs;
        check_len(
            "dyhat [seq, batch, outputs]",
            seq * batch * outputs,
            dyhat.len(),
        )?;
        let bh = batch * h;
        let head_w = params.head_w();

        // The head: its gradients, and the gradient at the top layer's outputs.
        let top = self.layers.len() - 1;
        let head = grads.head_offset();
        grads.data.iter_mut().for_each(|v| *v = T::ZERO);
        resize(&mut self.from_above, seq * bh);
        let (head_w_grad, head_b_grad) =
            grads.data[head..head + outputs * (h + 1)].split_at_mut(outputs * h);
        for t in (0..seq).rev() {
            for b in 0..batch {
                let slot = t * batch + b;
                let hidden_out = &self.layers[top].h[bh + slot * h..bh + (slot + 1) * h];
                let above = &mut self.from_above[slot * h..(slot + 1) * h];
                let mask =
                    (!self.head_mask.is_empty()).then(|| &self.head_mask[slot * h..(slot + 1) * h]);
                // `from_above` starts zeroed: every output's share adds up.
                for (o, &dy) in dyhat[slot * outputs..(slot + 1) * outputs]
                    .iter()
                    .enumerate()
                {
                    // A step without a target (the point after a gap, every step of a sliding
                    // window but its last) adds nothing: skipping it changes no bit.
                    if dy == T::ZERO {
                        continue;
                    }
                    head_b_grad[o] += dy;
                    let w = &head_w[o * h..(o + 1) * h];
                    let w_grad = &mut head_w_grad[o * h..(o + 1) * h];
                    for k in 0..h {
                        let m = mask.map_or(T::ONE, |mask| mask[k]);
                        w_grad[k] += dy * hidden_out[k] * m;
                        above[k] += dy * w[k] * m;
                    }
                }
            }
        }

        let mut from_above = std::mem::take(&mut self.from_above);
        let mut to_below = Vec::new();
        for l in (0..self.layers.len()).rev() {
            let below = (l > 0).then_some(&mut to_below);
            self.layers[l].backward(params, l, (seq, batch), &from_above, grads, below);
            if l > 0 {
                std::mem::swap(&mut from_above, &mut to_below);
            }
        }
        self.from_above = from_above;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, rng: &mut SmallRng, scale: f64) -> Vec<f64> {
        (0..len).map(|_| rng.gen_range(-scale..scale)).collect()
    }

    struct GradCase {
        seq: usize,
        batch: usize,
        x: Vec<f64>,
        h0: Vec<f64>,
        c0: Vec<f64>,
        weights: Vec<f64>,
        dropout: Option<Dropout>,
    }

    /// `Σ weight · yhat`, with the case's dropout masks (same seed, same masks).
    fn weighted_loss(params: &LstmParams<f64>, case: &GradCase) -> f64 {
        let mut tape = LstmTape::new();
        tape.forward_train(
            params,
            &case.x,
            (case.seq, case.batch),
            &case.h0,
            &case.c0,
            case.dropout,
        )
        .expect("shapes match");
        tape.yhat()
            .iter()
            .zip(&case.weights)
            .map(|(y, w)| y * w)
            .sum()
    }

    fn gradient_check(batch: usize, layers: usize, dropout: Option<Dropout>) {
        gradient_check_outputs(batch, layers, 1, dropout);
    }

    fn gradient_check_outputs(
        batch: usize,
        layers: usize,
        outputs: usize,
        dropout: Option<Dropout>,
    ) {
        let (features, hidden, seq) = (3, 5, 7);
        let mut rng = SmallRng::seed_from_u64(7);
        let mut params = LstmParams::<f64>::init_multi(features, hidden, layers, outputs, 3);
        // Perturb everything so no gradient is trivially zero (head bias, Rb).
        for v in params.as_mut_slice() {
            *v += rng.gen_range(-0.3..0.3);
        }
        let state = layers * batch * hidden;
        let case = GradCase {
            seq,
            batch,
            x: random(seq * batch * features, &mut rng, 1.0),
            h0: random(state, &mut rng, 0.5),
            c0: random(state, &mut rng, 0.5),
            weights: random(seq * batch * outputs, &mut rng, 1.0),
            dropout,
        };
        let mut tape = LstmTape::new();
        tape.forward_train(
            &params,
            &case.x,
            (seq, batch),
            &case.h0,
            &case.c0,
            case.dropout,
        )
        .expect("shapes match");
        let mut grads = LstmParams::zeros_multi(features, hidden, layers, outputs);
        tape.backward(&params, &case.weights, &mut grads)
            .expect("shapes match");

        let eps = 1e-6;
        let mut numeric = vec![0.0; params.as_slice().len()];
        for (idx, slot) in numeric.iter_mut().enumerate() {
            let original = params.as_slice()[idx];
            params.as_mut_slice()[idx] = original + eps;
            let up = weighted_loss(&params, &case);
            params.as_mut_slice()[idx] = original - eps;
            let down = weighted_loss(&params, &case);
            params.as_mut_slice()[idx] = original;
            *slot = (up - down) / (2.0 * eps);
        }
        let diff: f64 = numeric
            .iter()
            .zip(grads.as_slice())
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = numeric.iter().map(|a| a * a).sum::<f64>().sqrt();
        let relative = diff / norm;
        println!("batch {batch}, {layers} layers: norm-relative gradient error {relative:e}");
        assert!(relative < 1e-6, "relative gradient error {relative:e}");
        // Every layer learns: no layer's gradient is all zero.
        for layer in 0..layers {
            let o = grads.layer_offsets(layer);
            assert!(grads.as_slice()[o.w..o.end].iter().any(|g| g.abs() > 1e-9));
        }
    }

    #[test]
    fn backward_matches_finite_differences_small_batch() {
        gradient_check(2, 1, None);
    }

    #[test]
    fn backward_matches_finite_differences_blocked_batch() {
        gradient_check(BLOCK_ROWS + 3, 1, None);
    }

    #[test]
    fn backward_matches_finite_differences_stacked_with_dropout() {
        let dropout = Some(Dropout { rate: 0.3, seed: 9 });
        gradient_check(2, 3, dropout);
        gradient_check(BLOCK_ROWS + 3, 2, dropout);
    }

    #[test]
    fn backward_matches_finite_differences_with_several_outputs() {
        gradient_check_outputs(2, 1, 3, None);
        gradient_check_outputs(BLOCK_ROWS + 3, 2, 4, Some(Dropout { rate: 0.3, seed: 9 }));
    }

    #[test]
    fn dropout_zeroes_units_and_keeps_the_mean() {
        let mut mask = Vec::new();
        let mut rng = SmallRng::seed_from_u64(1);
        fill_mask::<f64>(&mut mask, 100_000, 0.25, &mut rng);
        let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / 1e5;
        let mean = mask.iter().sum::<f64>() / 1e5;
        assert!((dropped - 0.25).abs() < 0.01, "{dropped}");
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
    }

    #[test]
    fn one_layer_is_the_same_model_as_before_stacking() {
        // Stacking must not change what a one-layer model is: same draw for the same seed, and
        // the first layer and head of a deeper model are drawn identically.
        let one = LstmParams::<f64>::init(3, 4, 5);
        let two = LstmParams::<f64>::init_stacked(3, 4, 2, 5);
        assert_eq!(one.w(0), two.w(0));
        assert_eq!(one.r(0), two.r(0));
        assert_eq!(one.head_w(), two.head_w());
        assert_eq!(two.wb(1)[8..12], [1.0; 4]);
    }

    #[test]
    fn models_side_by_side_forecast_the_mean_of_their_forecasts() {
        let (features, hidden, outputs, seq, batch) = (3, 4, 2, 7, 5);
        let mut rng = SmallRng::seed_from_u64(11);
        for layers in [1, 2] {
            let members: Vec<LstmParams<f64>> = (0..3)
                .map(|seed| {
                    let mut m = LstmParams::init_multi(features, hidden, layers, outputs, seed);
                    // Every tensor non-zero, biases included.
                    let noise = random(m.as_slice().len(), &mut rng, 0.5);
                    m.as_mut_slice()
                        .iter_mut()
                        .zip(noise)
                        .for_each(|(v, n)| *v += n);
                    m
                })
                .collect();
            let merged = LstmParams::side_by_side(&members).expect("one shape");
            assert_eq!(merged.hidden(), 3 * hidden);
            let x = random(seq * batch * features, &mut rng, 1.0);
            let state = |h: usize| vec![0.0; layers * batch * h];
            let wide = merged
                .forward(&x, seq, batch, &state(3 * hidden), &state(3 * hidden))
                .expect("shapes match");
            let mut mean = vec![0.0; seq * batch * outputs];
            for member in &members {
                let out = member
                    .forward(&x, seq, batch, &state(hidden), &state(hidden))
                    .expect("shapes match");
                mean.iter_mut()
                    .zip(&out.yhat)
                    .for_each(|(m, y)| *m += y / 3.0);
            }
            for (a, b) in wide.yhat.iter().zip(&mean) {
                assert!((a - b).abs() < 1e-12, "{layers} layers: {a} against {b}");
            }
        }
        let other = LstmParams::<f64>::init(features, hidden + 1, 0);
        let err = LstmParams::side_by_side(&[LstmParams::init(features, hidden, 0), other]);
        assert!(err.is_err());
        assert!(LstmParams::<f64>::side_by_side(&[]).is_err());
    }

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

    #[test]
    fn step_product_adds_in_the_order_of_a_plain_triple_loop_with_one_rounding_each() {
        let mut rng = SmallRng::seed_from_u64(3);
        // Whole blocks, loose rows and loose columns, and shapes smaller than one block.
        for (m, k, n) in [(8, 32, 128), (9, 5, 37), (3, 7, 20), (1, 4, 3), (6, 3, 0)] {
            let a = random(m * k, &mut rng, 1.0);
            let b = random(k * n, &mut rng, 1.0);
            let c0 = random(m * n, &mut rng, 1.0);
            for accumulate in [true, false] {
                let mut expected = if accumulate {
                    c0.clone()
                } else {
                    vec![0.0; m * n]
                };
                for i in 0..m {
                    for j in 0..n {
                        for p in 0..k {
                            let sum = expected[i * n + j];
                            expected[i * n + j] = a[i * k + p].mul_add(b[p * n + j], sum);
                        }
                    }
                }
                let mut c = c0.clone();
                step_product::<f64, NO_KERNEL>(&a, &b, &mut c, (m, k, n), accumulate);
                assert_eq!(c, expected, "{m}x{k}x{n}, accumulate {accumulate}");
            }
        }
    }

    #[test]
    fn transposed_product_adds_in_the_order_of_a_plain_triple_loop_with_one_rounding_each() {
        let mut rng = SmallRng::seed_from_u64(7);
        // Whole blocks, loose rows and loose columns, and shapes smaller than one block.
        for (m, k, n) in [(33, 40, 128), (9, 5, 37), (3, 7, 20), (1, 4, 3), (6, 3, 0)] {
            let a = random(k * m, &mut rng, 1.0);
            let b = random(k * n, &mut rng, 1.0);
            let mut expected = vec![0.0; m * n];
            for i in 0..m {
                for j in 0..n {
                    for p in 0..k {
                        let sum = expected[i * n + j];
                        expected[i * n + j] = a[p * m + i].mul_add(b[p * n + j], sum);
                    }
                }
            }
            let mut c = random(m * n, &mut rng, 1.0);
            transposed_product::<f64, NO_KERNEL>(&a, &b, &mut c, (m, k, n));
            assert_eq!(c, expected, "{m}x{k}x{n}");
        }
    }

    /// The kernels' tiles (AVX-512's 128 (one row), 64, 32 and 16 columns wide, AVX2's 32 (one
    /// row), 16 and 8), the generic blocks after them and the loose rows and columns add up what
    /// the generic code does, bit for bit.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_kernel_products_add_what_the_generic_ones_do() {
        type Product = fn(&[f32], &[f32], &mut [f32], (usize, usize, usize), bool);
        type Transposed = fn(&[f32], &[f32], &mut [f32], (usize, usize, usize));
        let avx2: (Product, Transposed) = (
            step_product::<f32, AVX2_KERNEL>,
            transposed_product::<f32, AVX2_KERNEL>,
        );
        let avx512: (Product, Transposed) = (
            step_product::<f32, AVX512_KERNEL>,
            transposed_product::<f32, AVX512_KERNEL>,
        );
        let kernels = match vectors() {
            Vectors::Baseline => {
                eprintln!("no AVX2 on this CPU: no kernel runs here");
                return;
            }
            Vectors::Avx2 => vec![("AVX2", avx2)],
            Vectors::Avx512 => vec![("AVX2", avx2), ("AVX-512", avx512)],
        };
        let mut rng = SmallRng::seed_from_u64(6);
        for (m, k, n) in [
            (8, 33, 128),
            (8, 128, 32),
            (9, 5, 121),
            (4, 7, 16),
            (3, 2, 40),
            (13, 37, 128),
            (7, 128, 24),
        ] {
            let as_f32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
            let a = as_f32(random(m * k, &mut rng, 1.0));
            let b = as_f32(random(k * n, &mut rng, 1.0));
            let c0 = as_f32(random(m * n, &mut rng, 1.0));
            for &(name, (product, transposed)) in &kernels {
                for accumulate in [true, false] {
                    let (mut generic, mut kernel) = (c0.clone(), c0.clone());
                    step_product::<f32, NO_KERNEL>(&a, &b, &mut generic, (m, k, n), accumulate);
                    product(&a, &b, &mut kernel, (m, k, n), accumulate);
                    assert_eq!(
                        kernel, generic,
                        "{name} {m}x{k}x{n}, accumulate {accumulate}"
                    );
                }
                // The same shapes as the weight gradients' product, `a` read as `k × m`.
                let (mut generic, mut kernel) = (c0.clone(), c0.clone());
                transposed_product::<f32, NO_KERNEL>(&a, &b, &mut generic, (m, k, n));
                transposed(&a, &b, &mut kernel, (m, k, n));
                assert_eq!(kernel, generic, "{name} {m}x{k}x{n} transposed");
            }
        }
    }

    #[test]
    fn column_sums_add_each_column_in_the_order_of_the_rows() {
        let mut rng = SmallRng::seed_from_u64(8);
        // Whole blocks of columns, a block and a remainder, and a remainder alone.
        for (rows, cols) in [(40, 128), (7, 70), (5, 3), (0, 64)] {
            let matrix = random(rows * cols, &mut rng, 1.0);
            let start = random(cols, &mut rng, 1.0);
            let mut expected = start.clone();
            for row in matrix.chunks_exact(cols) {
                for (v, &x) in expected.iter_mut().zip(row) {
                    *v += x;
                }
            }
            let mut sums = start;
            add_column_sums(&matrix, &mut sums);
            assert_eq!(sums, expected, "{rows}x{cols}");
        }
    }

    #[test]
    fn dot_adds_up_every_term_at_any_length() {
        let mut rng = SmallRng::seed_from_u64(4);
        for len in [0, 1, 7, 8, 13, 32, 45] {
            let (a, b) = (random(len, &mut rng, 1.0), random(len, &mut rng, 1.0));
            let plain: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - plain).abs() < 1e-12, "length {len}");
        }
    }

    #[test]
    fn f32_matches_f64_and_state_carries() {
        let (features, hidden, seq, batch) = (5, 8, 20, 3);
        let p64 = LstmParams::<f64>::init_stacked(features, hidden, 2, 11);
        let p32: LstmParams<f32> = p64.convert();
        let mut rng = SmallRng::seed_from_u64(1);
        let x64 = random(seq * batch * features, &mut rng, 2.0);
        let x32: Vec<f32> = x64.iter().map(|&v| v as f32).collect();
        let zeros64 = vec![0.0; 2 * batch * hidden];
        let zeros32 = vec![0.0f32; 2 * batch * hidden];
        let a = p64.forward(&x64, seq, batch, &zeros64, &zeros64).unwrap();
        let b = p32
            .forward_f32(&x32, seq, batch, &zeros32, &zeros32)
            .unwrap();
        for (u, v) in a.yhat.iter().zip(&b.yhat) {
            assert!((u - *v as f64).abs() < 1e-5);
        }
        // Running 12 then 8 steps with carried state (both layers') equals 20 at once.
        let split = 12 * batch * features;
        let first = p64
            .forward(&x64[..split], 12, batch, &zeros64, &zeros64)
            .unwrap();
        let second = p64
            .forward(&x64[split..], 8, batch, &first.h, &first.c)
            .unwrap();
        assert_eq!(&a.yhat[12 * batch..], &second.yhat[..]);
        assert_eq!(a.h, second.h);
        assert_eq!(a.c, second.c);
    }

    #[test]
    fn shape_errors_are_reported() {
        let p = LstmParams::<f32>::init(2, 3, 0);
        let err = p
            .forward(&[0.0; 5], 2, 1, &[0.0; 3], &[0.0; 3])
            .unwrap_err();
        assert_eq!(err.expected, 4);
    }

    /// The AVX2 and AVX-512 builds of the loops and the baseline one compute the same numbers,
    /// bit for bit, forward and backward: a model trains the same on every x86-64.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_wide_loops_compute_what_the_baseline_loops_do() {
        let widths = match vectors() {
            Vectors::Baseline => {
                eprintln!("no AVX2 on this CPU: only the baseline loops run here");
                return;
            }
            Vectors::Avx2 => vec![Vectors::Avx2],
            Vectors::Avx512 => vec![Vectors::Avx2, Vectors::Avx512],
        };
        let mut rng = SmallRng::seed_from_u64(5);
        let features = 5;
        // 8 streams are two blocks of rows for the per-step products (one for the narrow
        // backward one), 12 both kinds of block, 2 are rows outside one;
        // 32 and 48 units go through the AVX-512 step kernel, 20 stay with the generic loops;
        // inputs of ±60 drive the gates into `exp`'s clamp.
        let cases = [
            (32, 12, 8, 2.0),
            (32, 7, 2, 2.0),
            (32, 5, 12, 2.0),
            (48, 5, 4, 2.0),
            (20, 5, 4, 2.0),
            (32, 3, 4, 60.0),
        ];
        for (hidden, seq, batch, scale) in cases {
            let params = LstmParams::<f32>::init(features, hidden, 9);
            let as_f32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
            let x = as_f32(random(seq * batch * features, &mut rng, scale));
            let state = as_f32(random(batch * hidden, &mut rng, 0.5));
            let above = as_f32(random(seq * batch * hidden, &mut rng, 1.0));
            let run = |width: Vectors| {
                let mut layer = LayerTape::<f32> {
                    inputs: features,
                    input: x.clone(),
                    ..LayerTape::default()
                };
                let mut grads = LstmParams::<f32>::zeros(features, hidden);
                let mut below = Vec::new();
                let shape = (seq, batch);
                let to_below = Some(&mut below);
                match width {
                    // SAFETY: `widths` holds only what the CPU has.
                    Vectors::Avx512 => unsafe {
                        layer.forward_avx512(&params, 0, seq, batch, &state, &state);
                        layer.backward_avx512(&params, 0, shape, &above, &mut grads, to_below);
                    },
                    Vectors::Avx2 => unsafe {
                        layer.forward_wide(&params, 0, seq, batch, &state, &state);
                        layer.backward_wide(&params, 0, shape, &above, &mut grads, to_below);
                    },
                    Vectors::Baseline => {
                        layer.forward_steps::<NO_KERNEL>(&params, 0, seq, batch, &state, &state);
                        layer.backward_steps::<NO_KERNEL>(
                            &params, 0, shape, &above, &mut grads, to_below,
                        );
                    }
                }
                (layer.h, layer.c, grads.as_slice().to_vec(), below)
            };
            let baseline = run(Vectors::Baseline);
            assert!(
                baseline.2.iter().any(|g| *g != 0.0),
                "the gradients are not all zero"
            );
            for &width in &widths {
                let case = format!("{width:?}, hidden {hidden}, seq {seq}, batch {batch}");
                assert_eq!(run(width), baseline, "{case}");
            }
        }
    }
}
