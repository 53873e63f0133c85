//! The register-tile product that [`super::avx2`] and [`super::avx512`] each instantiate with
//! their own intrinsics: written once as a macro, so that each expansion is plain code under
//! its module's `target_feature`, inlined as hand-written intrinsics are (a generic function
//! over a vector trait would leave that to the optimiser's inlining order).

/// Where a block's `ROWS` rows of `A` lie in a slice: element `(row, kk)` at
/// `row · row + kk · k` (`(k, 1)` for rows of `A` stored in place, `(1, m)` for the columns of
/// an `Aᵀ` stored `k × m`).
#[derive(Debug, Clone, Copy)]
pub struct Strides {
    pub row: usize,
    pub k: usize,
}

/// Defines `product_rows::<ROWS>` and its `tile::<ROWS, VECS>` for one instruction set:
/// `feature` its `target_feature`, `lanes` the f32 lanes of a register, `accumulators` how
/// many a tile may hold, `tile_widths` the registers per row of the tiles to try, widest
/// first, and the intrinsics for a zero register, an unaligned load and store, a broadcast and
/// a fused multiply-add.
macro_rules! product_tiles {
    (
        feature: $feature:literal,
        lanes: $lanes:expr,
        accumulators: $accumulators:expr,
        tile_widths: [$($vecs:literal),+],
        zero: $zero:ident,
        load: $load:ident,
        store: $store:ident,
        splat: $splat:ident,
        fmadd: $fmadd:ident $(,)?
    ) => {
        /// f32 lanes in one register.
        const LANES: usize = $lanes;

        /// Adds `A · b` into `c_rows` for the `ROWS` rows of `A` that `a` holds as `strides`
        /// say (`b` is `k × n`, `c_rows` is `ROWS × n`, both row-major), over as many columns
        /// as fill whole registers, the widest tiles the accumulators allow first; returns the
        /// first column left undone (`n` rounded down to a register).
        ///
        /// # Safety
        /// The CPU must support this module's instructions.
        #[target_feature(enable = $feature)]
        #[inline]
        pub unsafe fn product_rows<const ROWS: usize>(
            a: &[f32],
            strides: super::tiles::Strides,
            b: &[f32],
            c_rows: &mut [f32],
            (k, n): (usize, usize),
        ) -> usize {
            if k > 0 {
                assert!(a.len() > (ROWS - 1) * strides.row + (k - 1) * strides.k);
            }
            assert!(b.len() >= k * n && c_rows.len() >= ROWS * n);
            const { assert!(ROWS > 0 && ROWS <= $accumulators) };
            let mut col = 0;
            // SAFETY (each call): the asserts above hold every element the tile reads and
            // writes, and the loop conditions keep `col + VECS · LANES ≤ n`.
            $(
                while ROWS * $vecs <= $accumulators && col + $vecs * LANES <= n {
                    unsafe { tile::<ROWS, $vecs>(a, strides, b, c_rows, (k, n), col) };
                    col += $vecs * LANES;
                }
            )+
            col
        }

        /// One `ROWS` × `VECS · LANES` tile at column `col`, its accumulators in registers
        /// throughout.
        ///
        /// # Safety
        /// As [`product_rows`]; `col + VECS · LANES ≤ n` and the slices as it asserts.
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn tile<const ROWS: usize, const VECS: usize>(
            a: &[f32],
            strides: super::tiles::Strides,
            b: &[f32],
            c_rows: &mut [f32],
            (k, n): (usize, usize),
            col: usize,
        ) {
            let (a, b, c) = (a.as_ptr(), b.as_ptr(), c_rows.as_mut_ptr());
            let mut acc = [[$zero(); VECS]; ROWS];
            // SAFETY: every offset below is `row · n + col + v · LANES + lane < ROWS · n` for
            // `c`, `kk · n + col + v · LANES + lane < k · n` for `b`, and for `a` at most the
            // last element `product_rows` checked.
            unsafe {
                for (row, acc_row) in acc.iter_mut().enumerate() {
                    for (v, acc) in acc_row.iter_mut().enumerate() {
                        *acc = $load(c.add(row * n + col + v * LANES));
                    }
                }
                for kk in 0..k {
                    let b_row = b.add(kk * n + col);
                    let mut b_vecs = [$zero(); VECS];
                    for (v, b_vec) in b_vecs.iter_mut().enumerate() {
                        *b_vec = $load(b_row.add(v * LANES));
                    }
                    for (row, acc_row) in acc.iter_mut().enumerate() {
                        let x = $splat(*a.add(row * strides.row + kk * strides.k));
                        for (acc, &b_vec) in acc_row.iter_mut().zip(&b_vecs) {
                            *acc = $fmadd(x, b_vec, *acc);
                        }
                    }
                }
                for (row, acc_row) in acc.iter().enumerate() {
                    for (v, &acc) in acc_row.iter().enumerate() {
                        $store(c.add(row * n + col + v * LANES), acc);
                    }
                }
            }
        }
    };
}
