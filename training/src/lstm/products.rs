//! The LSTM's matrix products: the per-step products and the weight gradients' product in
//! register blocks that read their operands in place, each element's sum in order of `k` with
//! one rounding per term (so every CPU and every build computes the same bits); whole blocks
//! go to the hand-written kernels where the caller's build has them. Also the small
//! reductions the backward pass needs, and the run-time choice of build.

use super::real::Real;
use super::{AVX512_KERNEL, NO_KERNEL};

/// The block of a per-step product that the generic code keeps in registers: 4 rows × 16
/// columns of f32 is eight AVX2 accumulators, leaving registers for a row of `B` and the
/// broadcast elements of `A`.
pub(super) const BLOCK_ROWS: usize = 4;
const BLOCK_COLS: usize = 16;
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

/// A strided matrix view that has been checked to stay within its slice.
#[derive(Clone, Copy)]
pub(super) struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// `data` holds a row-major `rows × cols` matrix.
    pub(super) fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
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
pub(super) fn gemm<T: Real>(alpha: T, a: MatRef<'_, T>, b: MatRef<'_, T>, beta: T, c: &mut [T]) {
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
pub(super) fn step_product<T: Real, const KERNEL: usize>(
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

/// `c = aᵀ·b` for row-major contiguous `a` (k×m), `b` (k×n) and `c` (m×n): the weight
/// gradients, summed over every row of every step (`k` in the thousands), read in place: a
/// transposed copy of `a`, even written in tiles, cost 7% of an epoch. Each element adds its
/// `k` products in order, each fused, as in [`step_product`], so every CPU computes the same
/// gradients.
#[inline(always)]
pub(super) fn transposed_product<T: Real, const KERNEL: usize>(
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
pub(super) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
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
pub(super) fn add_column_sums<T: Real>(rows: &[T], sums: &mut [T]) {
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
pub(super) fn transpose<T: Real>(m: &[T], rows: usize, cols: usize, out: &mut [T]) {
    for (i, row) in m[..rows * cols].chunks_exact(cols).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            out[j * rows + i] = v;
        }
    }
}

/// How wide the loops may run: 16 lanes (AVX-512), 8 (AVX2) or the baseline x86-64's 4. The
/// binary is built for any x86-64, so the wider code is chosen at run time, as
/// `matrixmultiply` chooses its kernels. The arithmetic is the same either way: multiply-adds
/// are fused, which rounds once whether the CPU has the instruction or libm computes it (slowly:
/// x86-64 CPUs without FMA predate 2013). Only the product left to `matrixmultiply` (the
/// gradient to the layer below) chooses its arithmetic by CPU.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Vectors {
    Baseline,
    Avx2,
    Avx512,
}

#[cfg(target_arch = "x86_64")]
pub(super) fn vectors() -> Vectors {
    use std::arch::is_x86_feature_detected as has;
    match (has!("avx2") && has!("fma"), has!("avx512f")) {
        (true, true) => Vectors::Avx512,
        (true, false) => Vectors::Avx2,
        (false, _) => Vectors::Baseline,
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    use super::*;
    use crate::lstm::tests::random;
    #[cfg(target_arch = "x86_64")]
    use crate::lstm::AVX2_KERNEL;

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
}
