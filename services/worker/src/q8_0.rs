//! A Q8_0 matmul for many rows at once (AVX-512 VNNI, or AVX2).
//!
//! candle runs a Q8_0 weight whose rows are not a multiple of 256 wide (all
//! of Gemma 3 270M's 640-wide projections, and its 262,144-row output) one
//! activation row at a time: eight decoding sequences cost eight times one,
//! so batching gained nothing. Here the weights are repacked into tiles of
//! 16 output columns by 4 inputs, so one `vpdpbusd` advances 16 columns,
//! and each tile is read from memory once per call whatever the number of
//! rows (it stays in L1 while every row uses it).
//!
//! Activations are quantized per 32 values exactly as llama.cpp's
//! `quantize_row_q8_0` does. Each block's 32 products are then summed
//! exactly as integers and scaled once by `d_w * d_x`, where llama.cpp
//! scales 8 partial sums of 4 and adds the 8 lanes at the end: the same
//! value to float rounding (~1e-7 relative) for 10 vector operations per
//! block instead of 24. Measured against llama.cpp's greedy and
//! teacher-forced outputs, its lane order bought nothing (116/120
//! teacher-forced agreement with it, 117/120 without), and it cost ~4 ms
//! of a 30 ms step at 8 streams. Every row is computed the same way
//! whatever else is in the batch.
//!
//! CPUs without AVX-512 (AMD before Zen 4, many cloud VMs) run the same
//! tiles with AVX2, as llama.cpp does there: `vpmaddubsw` of the weights'
//! magnitudes by the inputs carrying the weights' signs, then `vpmaddwd`
//! to add four products. The block sums are the same integers, scaled
//! and accumulated with the same float operations, so both kernels give
//! the same bits.
//!
//! Weights widened from Q5_0 (Gemma's attn_q/attn_k/ffn_gate/ffn_up) lie
//! in [-16, 15]. They are stored + 16 instead, which AVX2 multiplies
//! directly (no sign juggling), and a whole block's `vpmaddubsw` results
//! add up in i16 before one `vpmaddwd`: 2 vector operations per row and
//! 4 inputs instead of 4. The VNNI kernel only changes its offset.

// SIMD intrinsics and disjoint writes from the thread pool need `unsafe`;
// it is confined to this module (the rest of the workspace denies it).
#![allow(unsafe_code)]

use candle_core::utils::barrier_pool;
use half::f16;

const TILE_COLS: usize = 16;
const BLOCK: usize = 32;
const Q8_0_BYTES: usize = 34;
const CACHE_LINE: usize = 64;

#[derive(Clone)]
pub struct PackedQ8_0 {
    rows: usize,
    cols: usize,
    /// `[rows/16][cols/32][8][16][4]`: for each group of 16 weight rows and
    /// each block, 8 chunks of 4 inputs for all 16 rows, stored + `range`'s
    /// offset as u8 (vpdpbusd multiplies unsigned by signed bytes).
    tiles: Vec<u8>,
    range: WeightRange,
    /// `[rows/16][cols/32][16]` block scales, f16 as in the file (they
    /// widen to f32 exactly, in one instruction per 16).
    scales: Vec<f16>,
}

struct SharedOut(*mut f32);
// SAFETY: every task writes a disjoint set of output columns.
unsafe impl Sync for SharedOut {}

impl PackedQ8_0 {
    /// Whether this CPU runs the kernel.
    pub fn supported() -> bool {
        Kernel::detect().is_some()
    }

    /// Packs raw Q8_0 blocks of a `[rows, cols]` weight; `None` when the
    /// shape does not tile (the caller keeps candle's kernel).
    pub fn pack(raw: &[u8], rows: usize, cols: usize) -> Option<PackedQ8_0> {
        if raw.len() != rows * cols / BLOCK * Q8_0_BYTES {
            return None;
        }
        let group_bytes = TILE_COLS * cols / BLOCK * Q8_0_BYTES;
        let mut groups = raw.chunks(group_bytes);
        Self::pack_groups(rows, cols, |buffer| {
            buffer.copy_from_slice(groups.next().unwrap_or_default());
            Ok(())
        })
        .ok()
        .flatten()
    }

    /// Packs a weight read 16 rows at a time from `reader` (positioned at
    /// its data), so the raw tensor is never in memory whole: loading the
    /// 178 MB output table costs its packed size, not twice that.
    pub fn read<R: std::io::Read>(reader: &mut R, rows: usize, cols: usize) -> std::io::Result<Option<PackedQ8_0>> {
        Self::pack_groups(rows, cols, |buffer| reader.read_exact(buffer))
    }

    fn pack_groups(
        rows: usize,
        cols: usize,
        mut next_group: impl FnMut(&mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<Option<PackedQ8_0>> {
        if !rows.is_multiple_of(TILE_COLS) || !cols.is_multiple_of(BLOCK) {
            return Ok(None);
        }
        let blocks = cols / BLOCK;
        let mut tiles = vec![0u8; rows * cols];
        let mut scales = vec![f16::ZERO; rows * blocks];
        let mut raw = vec![0u8; TILE_COLS * blocks * Q8_0_BYTES];
        let mut narrow = true;
        for group in 0..rows / TILE_COLS {
            next_group(&mut raw)?;
            for (lane, row) in raw.chunks_exact(blocks * Q8_0_BYTES).enumerate() {
                for (b, block) in row.chunks_exact(Q8_0_BYTES).enumerate() {
                    let tile = group * blocks + b;
                    scales[tile * TILE_COLS + lane] = f16::from_le_bytes([block[0], block[1]]);
                    for (i, q) in block[2..].iter().enumerate() {
                        let (chunk, within) = (i / 4, i % 4);
                        narrow &= WeightRange::NARROW_VALUES.contains(&(*q as i8));
                        tiles[((tile * 8 + chunk) * TILE_COLS + lane) * 4 + within] =
                            q.wrapping_add(WeightRange::Full.offset());
                    }
                }
            }
        }
        let mut packed = PackedQ8_0 { rows, cols, tiles, scales, range: WeightRange::Full };
        if narrow {
            packed.restore(WeightRange::Narrow);
        }
        Ok(Some(packed))
    }

    /// The weights of `parts` stacked into one (their outputs side by side),
    /// so projections of the same input run as one matmul: one pass over
    /// the activations, one dispatch to the pool. `None` unless every part
    /// has the same input width.
    pub fn stack(parts: Vec<PackedQ8_0>) -> Option<PackedQ8_0> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        let range = match parts.iter().all(|p| p.range == WeightRange::Narrow) {
            true => WeightRange::Narrow,
            false => WeightRange::Full,
        };
        let mut stacked = PackedQ8_0 {
            rows: 0,
            cols,
            tiles: Vec::with_capacity(parts.iter().map(|p| p.tiles.len()).sum()),
            scales: Vec::with_capacity(parts.iter().map(|p| p.scales.len()).sum()),
            range,
        };
        for mut part in parts {
            part.restore(range);
            stacked.rows += part.rows;
            stacked.tiles.extend_from_slice(&part.tiles);
            stacked.scales.extend_from_slice(&part.scales);
        }
        Some(stacked)
    }

    /// Re-stores the weights with `range`'s offset.
    fn restore(&mut self, range: WeightRange) {
        let shift = range.offset().wrapping_sub(self.range.offset());
        self.tiles.iter_mut().for_each(|t| *t = t.wrapping_add(shift));
        self.range = range;
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Weight row `row`, dequantized (an embedding lookup on a tied table).
    pub fn dequantize_row(&self, row: usize, out: &mut Vec<f32>) {
        let blocks = self.cols / BLOCK;
        let (group, lane) = (row / TILE_COLS, row % TILE_COLS);
        for b in 0..blocks {
            let tile = group * blocks + b;
            let scale = self.scales[tile * TILE_COLS + lane].to_f32();
            for i in 0..BLOCK {
                let (chunk, within) = (i / 4, i % 4);
                let stored = self.tiles[((tile * 8 + chunk) * TILE_COLS + lane) * 4 + within];
                let q = stored.wrapping_sub(self.range.offset()) as i8;
                out.push(f32::from(q) * scale);
            }
        }
    }

    /// `x[m, cols] · weightᵀ`, `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let Some(kernel) = Kernel::detect() else { unreachable!("PackedQ8_0::supported() gated construction") };
        self.matmul_with(kernel, x, m)
    }

    fn matmul_with(&self, kernel: Kernel, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation shape");
        // Not zeroed first: every value is written below, and zeroing the
        // 8 MiB of logits for 8 rows cost as much as sampling them.
        let mut out = Vec::with_capacity(m * self.rows);
        let blocks = self.cols / BLOCK;
        let mut quants = vec![0i8; m * self.cols];
        let mut scales = vec![0f32; m * blocks];
        // SAFETY: `kernel` runs on this CPU; the slices are sized for
        // `m * cols` inputs above.
        unsafe { kernel.quantize_rows(x, &mut quants, &mut scales) };
        // -offset × the sum of each block's inputs, undoing the offset
        // stored in the weights where a kernel multiplies them unsigned.
        let offsets: Vec<i32> = match (kernel, self.range) {
            (Kernel::Avx2, WeightRange::Full) => Vec::new(),
            (Kernel::Avx2, WeightRange::Narrow) => quants.chunks_exact(BLOCK).map(narrow_avx2_start).collect(),
            _ => {
                let offset = i32::from(self.range.offset());
                quants
                    .chunks_exact(BLOCK)
                    .map(|block| -offset * block.iter().map(|q| i32::from(*q)).sum::<i32>())
                    .collect()
            }
        };
        let out_ptr = SharedOut(out.spare_capacity_mut().as_mut_ptr().cast::<f32>());
        let groups = self.rows / TILE_COLS;
        let activations = Activations { quants: &quants, scales: &scales, offsets: &offsets, m };
        barrier_pool().execute_chunked(groups, |range| {
            let out = &out_ptr;
            for group in range {
                // SAFETY: `kernel` runs on this CPU; each group writes only
                // its own 16 columns of every output row.
                unsafe {
                    match kernel {
                        Kernel::Avx512Vnni => self.group(group, &activations, out.0),
                        Kernel::Avx2 => self.group_avx2(group, &activations, out.0),
                    }
                }
            }
        });
        // SAFETY: the groups cover every one of the `rows` columns of each
        // of the `m` rows, and each wrote all 16 of its columns.
        unsafe { out.set_len(m * self.rows) };
        out
    }

    /// Where group `group`'s tiles and block scales start.
    fn group_weights(&self, group: usize) -> (*const u8, *const f16) {
        let blocks = self.cols / BLOCK;
        (
            self.tiles.as_ptr().wrapping_add(group * blocks * BLOCK * TILE_COLS),
            self.scales.as_ptr().wrapping_add(group * blocks * TILE_COLS),
        )
    }

    /// Bytes of one group's tiles and of its block scales.
    fn group_bytes(&self) -> (usize, usize) {
        (self.cols * TILE_COLS, self.cols / BLOCK * TILE_COLS * size_of::<f16>())
    }

    /// Cache lines of the next group to prefetch per block: all of them
    /// while the group's first rows run (`first` 0), none after.
    fn prefetch_per_block(&self, first: usize) -> usize {
        let (tile_bytes, scale_bytes) = self.group_bytes();
        match first {
            0 => (tile_bytes + scale_bytes).div_ceil(CACHE_LINE * (self.cols / BLOCK)),
            _ => 0,
        }
    }

    /// Pulls the next group's tiles and scales into cache while the first
    /// rows of this group compute, `per_block` cache lines per block.
    /// Without it the weights stream in while the first rows run and the
    /// other rows run with memory idle, so time was the sum of the two.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn prefetch_next_group(&self, group: usize, block: usize, per_block: usize) {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let next = group + 1;
        if next * TILE_COLS >= self.rows {
            return;
        }
        let (tile_bytes, scale_bytes) = self.group_bytes();
        let lines = (tile_bytes + scale_bytes).div_ceil(CACHE_LINE);
        for line in block * per_block..((block + 1) * per_block).min(lines) {
            let byte = line * CACHE_LINE;
            let address = if byte < tile_bytes {
                self.tiles.as_ptr().wrapping_add(next * tile_bytes + byte)
            } else {
                self.scales.as_ptr().cast::<u8>().wrapping_add(next * scale_bytes + byte - tile_bytes)
            };
            // SAFETY: a prefetch of an address inside our own buffers.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(address as *const i8) };
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn group(&self, group: usize, x: &Activations<'_>, out: *mut f32) {
        // SAFETY: offsets stay inside the tiles/scales of `group` and
        // inside the rows of `x` and `out` (checked by `matmul`).
        unsafe {
            let (tiles, weight_scales) = self.group_weights(group);
            for (r, step) in row_runs(x.m) {
                match step {
                    8 => self.rows_of_group::<8>(group, r, tiles, weight_scales, x, out),
                    4 => self.rows_of_group::<4>(group, r, tiles, weight_scales, x, out),
                    3 => self.rows_of_group::<3>(group, r, tiles, weight_scales, x, out),
                    2 => self.rows_of_group::<2>(group, r, tiles, weight_scales, x, out),
                    _ => self.rows_of_group::<1>(group, r, tiles, weight_scales, x, out),
                }
            }
        }
    }

    /// Rows `first..first + R` of one group.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn rows_of_group<const R: usize>(
        &self,
        group: usize,
        first: usize,
        tiles: *const u8,
        weight_scales: *const f16,
        x: &Activations<'_>,
        out: *mut f32,
    ) {
        use std::arch::x86_64::*;
        let blocks = self.cols / BLOCK;
        // SAFETY: as in `group`; rows `first..first + R` exist in `x`.
        // Fewer than four rows give the core too few independent chains, so
        // each row then sums even and odd chunks apart.
        let split = R < 4;
        let prefetch_per_block = self.prefetch_per_block(first);
        unsafe {
            let mut acc = [_mm512_setzero_ps(); R];
            for b in 0..blocks {
                self.prefetch_next_group(group, b, prefetch_per_block);
                let weight_scale = _mm512_cvtph_ps(_mm256_loadu_si256(weight_scales.add(b * TILE_COLS).cast()));
                let mut even: [__m512i; R] =
                    std::array::from_fn(|i| _mm512_set1_epi32(*x.offsets.get_unchecked((first + i) * blocks + b)));
                let mut odd = [_mm512_setzero_si512(); R];
                for chunk in (0..8).step_by(2) {
                    let weights = |c: usize| _mm512_loadu_si512(tiles.add((b * 8 + c) * 64) as *const _);
                    let input = |row: usize, c: usize| {
                        let at = x.quants.as_ptr().add((first + row) * self.cols + b * BLOCK + c * 4);
                        _mm512_set1_epi32(std::ptr::read_unaligned(at as *const i32))
                    };
                    let (w_even, w_odd) = (weights(chunk), weights(chunk + 1));
                    for row in 0..R {
                        even[row] = _mm512_dpbusd_epi32(even[row], w_even, input(row, chunk));
                        if split {
                            odd[row] = _mm512_dpbusd_epi32(odd[row], w_odd, input(row, chunk + 1));
                        } else {
                            even[row] = _mm512_dpbusd_epi32(even[row], w_odd, input(row, chunk + 1));
                        }
                    }
                }
                for row in 0..R {
                    let scale = _mm512_mul_ps(
                        weight_scale,
                        _mm512_set1_ps(*x.scales.get_unchecked((first + row) * blocks + b)),
                    );
                    let sum = if split { _mm512_add_epi32(even[row], odd[row]) } else { even[row] };
                    let sum = _mm512_cvtepi32_ps(sum);
                    acc[row] = _mm512_fmadd_ps(scale, sum, acc[row]);
                }
            }
            for (row, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add((first + row) * self.rows + group * TILE_COLS), *acc);
            }
        }
    }

    /// [`PackedQ8_0::group`] with AVX2: each half of a tile (8 columns)
    /// in turn.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group_avx2(&self, group: usize, x: &Activations<'_>, out: *mut f32) {
        // SAFETY: as in `group`.
        unsafe {
            match self.range {
                WeightRange::Full => self.group_avx2_in::<false>(group, x, out),
                WeightRange::Narrow => self.group_avx2_in::<true>(group, x, out),
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group_avx2_in<const NARROW: bool>(&self, group: usize, x: &Activations<'_>, out: *mut f32) {
        // SAFETY: as in `group`.
        unsafe {
            let (tiles, weight_scales) = self.group_weights(group);
            for (r, step) in row_runs(x.m) {
                match step {
                    8 => self.rows_of_group_avx2::<8, NARROW>(group, r, tiles, weight_scales, x, out),
                    4 => self.rows_of_group_avx2::<4, NARROW>(group, r, tiles, weight_scales, x, out),
                    3 => self.rows_of_group_avx2::<3, NARROW>(group, r, tiles, weight_scales, x, out),
                    2 => self.rows_of_group_avx2::<2, NARROW>(group, r, tiles, weight_scales, x, out),
                    _ => self.rows_of_group_avx2::<1, NARROW>(group, r, tiles, weight_scales, x, out),
                }
            }
        }
    }

    /// `NARROW`: the weights are stored + 16 ([`WeightRange::Narrow`]).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_of_group_avx2<const R: usize, const NARROW: bool>(
        &self,
        group: usize,
        first: usize,
        tiles: *const u8,
        weight_scales: *const f16,
        x: &Activations<'_>,
        out: *mut f32,
    ) {
        use std::arch::x86_64::*;
        let blocks = self.cols / BLOCK;
        let prefetch_per_block = self.prefetch_per_block(first);
        // SAFETY: as in `rows_of_group`.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let offset = _mm256_set1_epi8(-128);
            let input = |row: usize, b: usize, chunk: usize| {
                let at = x.quants.as_ptr().add((first + row) * self.cols + b * BLOCK + chunk * 4);
                _mm256_set1_epi32(std::ptr::read_unaligned(at as *const i32))
            };
            for half in 0..2 {
                let mut acc = [_mm256_setzero_ps(); R];
                for b in 0..blocks {
                    if half == 0 {
                        self.prefetch_next_group(group, b, prefetch_per_block);
                    }
                    let weight_scale =
                        _mm256_cvtph_ps(_mm_loadu_si128(weight_scales.add(b * TILE_COLS + half * 8).cast()));
                    let stored = |chunk: usize| _mm256_loadu_si256(tiles.add((b * 8 + chunk) * 64 + half * 32).cast());
                    let mut sums = [_mm256_setzero_si256(); R];
                    if NARROW {
                        // Each i16 lane starts at -16 × the inputs it will see, so
                        // after k chunks it holds Σ w·x over them plus -16·x over
                        // the rest: at most 16 × 127 per input, 32,512 in all.
                        let mut pairs: [__m256i; R] = std::array::from_fn(|row| {
                            _mm256_set1_epi32(*x.offsets.get_unchecked((first + row) * blocks + b))
                        });
                        for chunk in 0..8 {
                            let weights = stored(chunk);
                            for (row, pairs) in pairs.iter_mut().enumerate() {
                                *pairs = _mm256_add_epi16(*pairs, _mm256_maddubs_epi16(weights, input(row, b, chunk)));
                            }
                        }
                        for (sum, pairs) in sums.iter_mut().zip(pairs) {
                            *sum = _mm256_madd_epi16(pairs, ones);
                        }
                    } else {
                        for chunk in 0..8 {
                            // Stored + 128: flipping the top bit gives the signed weight.
                            let weights = _mm256_xor_si256(stored(chunk), offset);
                            let magnitudes = _mm256_sign_epi8(weights, weights);
                            for (row, sum) in sums.iter_mut().enumerate() {
                                // |w| · (x · sign w): pairs stay within i16 (2 × 128 × 127).
                                let pairs =
                                    _mm256_maddubs_epi16(magnitudes, _mm256_sign_epi8(input(row, b, chunk), weights));
                                *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, ones));
                            }
                        }
                    }
                    for (row, (acc, sum)) in acc.iter_mut().zip(sums).enumerate() {
                        let scale = _mm256_mul_ps(
                            weight_scale,
                            _mm256_set1_ps(*x.scales.get_unchecked((first + row) * blocks + b)),
                        );
                        *acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sum), *acc);
                    }
                }
                for (row, acc) in acc.iter().enumerate() {
                    _mm256_storeu_ps(out.add((first + row) * self.rows + group * TILE_COLS + half * 8), *acc);
                }
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn group(&self, _group: usize, _x: &Activations<'_>, _out: *mut f32) {
        unreachable!("PackedQ8_0::supported() is false off x86_64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn group_avx2(&self, _group: usize, _x: &Activations<'_>, _out: *mut f32) {
        unreachable!("PackedQ8_0::supported() is false off x86_64")
    }
}

/// Rows as `(first, count)` runs that share each weight load: eights
/// while they last (each row an independent chain for the core), then at
/// most four.
fn row_runs(m: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut first = 0;
    std::iter::from_fn(move || {
        let left = m.checked_sub(first).filter(|left| *left > 0)?;
        let count = if left >= 8 { 8 } else { left.min(4) };
        first += count;
        Some((first - count, count))
    })
}

/// The instruction set a matmul runs with, the widest this CPU has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Avx512Vnni,
    Avx2,
}

impl Kernel {
    fn detect() -> Option<Kernel> {
        static DETECTED: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| Kernel::available().first().copied())
    }

    /// Every kernel this CPU runs, widest first.
    fn available() -> Vec<Kernel> {
        let mut kernels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
            {
                kernels.push(Kernel::Avx512Vnni);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                kernels.push(Kernel::Avx2);
            }
        }
        kernels
    }

    /// # Safety
    /// The CPU runs `self`; `quants` holds `x.len()` values and `scales`
    /// one per 32.
    unsafe fn quantize_rows(self, x: &[f32], quants: &mut [i8], scales: &mut [f32]) {
        // SAFETY: the caller's.
        unsafe {
            match self {
                Kernel::Avx512Vnni => quantize_rows(x, quants, scales),
                Kernel::Avx2 => quantize_rows_avx2(x, quants, scales),
            }
        }
    }
}

/// Activations quantized per 32 values as llama.cpp's `quantize_row_q8_0`
/// on x86: scale `amax / 127` (kept at f16 precision), values times
/// `127 / amax` rounded half to even. Vectorized because the scheduler
/// thread runs it alone before every matmul while the pool waits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn quantize_rows(x: &[f32], quants: &mut [i8], scales: &mut [f32]) {
    use std::arch::x86_64::*;
    for ((values, out), scale) in x.chunks_exact(BLOCK).zip(quants.chunks_exact_mut(BLOCK)).zip(scales.iter_mut()) {
        // SAFETY: each chunk holds exactly 32 values / 32 bytes.
        unsafe {
            let low = _mm512_loadu_ps(values.as_ptr());
            let high = _mm512_loadu_ps(values.as_ptr().add(16));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(low), _mm512_abs_ps(high)));
            let inverse = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            *scale = f16::from_f32(amax / 127.0).to_f32();
            let inverse = _mm512_set1_ps(inverse);
            // The default MXCSR rounding is to nearest, ties to even.
            let low = _mm512_cvtps_epi32(_mm512_mul_ps(low, inverse));
            let high = _mm512_cvtps_epi32(_mm512_mul_ps(high, inverse));
            _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, _mm512_cvtsepi32_epi8(low));
            _mm_storeu_si128(out.as_mut_ptr().add(16) as *mut __m128i, _mm512_cvtsepi32_epi8(high));
        }
    }
}

/// [`quantize_rows`] with AVX2, as llama.cpp's AVX2 `quantize_row_q8_0`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_rows_avx2(x: &[f32], quants: &mut [i8], scales: &mut [f32]) {
    use std::arch::x86_64::*;
    for ((values, out), scale) in x.chunks_exact(BLOCK).zip(quants.chunks_exact_mut(BLOCK)).zip(scales.iter_mut()) {
        // SAFETY: each chunk holds exactly 32 values / 32 bytes.
        unsafe {
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(values.as_ptr().add(i * 8)));
            let sign = _mm256_set1_ps(-0.0);
            let abs = |v: __m256| _mm256_andnot_ps(sign, v);
            let max = _mm256_max_ps(_mm256_max_ps(abs(v[0]), abs(v[1])), _mm256_max_ps(abs(v[2]), abs(v[3])));
            let max = _mm_max_ps(_mm256_extractf128_ps::<1>(max), _mm256_castps256_ps128(max));
            let max = _mm_max_ps(max, _mm_movehl_ps(max, max));
            let amax = _mm_cvtss_f32(_mm_max_ss(max, _mm_movehdup_ps(max)));
            let inverse = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            *scale = f16::from_f32(amax / 127.0).to_f32();
            let inverse = _mm256_set1_ps(inverse);
            // The default MXCSR rounding is to nearest, ties to even.
            let ints: [__m256i; 4] = std::array::from_fn(|i| _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse)));
            // The packs work per 128-bit lane; the permute puts the bytes back in order.
            let bytes = _mm256_packs_epi16(_mm256_packs_epi32(ints[0], ints[1]), _mm256_packs_epi32(ints[2], ints[3]));
            let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, bytes);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn quantize_rows(_x: &[f32], _quants: &mut [i8], _scales: &mut [f32]) {
    unreachable!("PackedQ8_0::supported() is false off x86_64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn quantize_rows_avx2(_x: &[f32], _quants: &mut [i8], _scales: &mut [f32]) {
    unreachable!("PackedQ8_0::supported() is false off x86_64")
}

/// Where the AVX2 narrow kernel's i16 lanes start for one block: the
/// even lanes (inputs 4c and 4c + 1 of every chunk c) at -16 × their
/// sum, the odd lanes (4c + 2, 4c + 3) likewise, as one i32 to broadcast.
fn narrow_avx2_start(block: &[i8]) -> i32 {
    let offset = i32::from(WeightRange::Narrow.offset());
    let lane = |parity: usize| {
        let sum: i32 = block.chunks_exact(2).skip(parity).step_by(2).flatten().map(|q| i32::from(*q)).sum();
        (-offset * sum) as u16
    };
    i32::from(lane(0)) | (i32::from(lane(1)) << 16)
}

/// What the stored weight bytes add to each weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WeightRange {
    /// Any i8, stored + 128.
    Full,
    /// Every weight in [-16, 15] (Q5_0's integers), stored + 16.
    Narrow,
}

impl WeightRange {
    const NARROW_VALUES: std::ops::RangeInclusive<i8> = -16..=15;

    fn offset(self) -> u8 {
        match self {
            WeightRange::Full => 128,
            WeightRange::Narrow => 16,
        }
    }
}

struct Activations<'a> {
    quants: &'a [i8],
    scales: &'a [f32],
    /// Per block, -offset × the sum of its quantized inputs (empty where
    /// the kernel takes the weights signed).
    offsets: &'a [i32],
    m: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_quantize_as_llama_cpp_ties_to_even() {
        // amax 127 makes the multiplier exactly 1, so the halves are ties.
        let mut x: Vec<f32> = (0..96).map(|i| (i as f32 - 31.5) * 0.77).collect();
        x[..8].copy_from_slice(&[127.0, 2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -2.5]);
        x[40..64].iter_mut().for_each(|v| *v = 0.0);
        for kernel in Kernel::available() {
            let (mut quants, mut scales) = (vec![0i8; 96], vec![0f32; 3]);
            // SAFETY: the CPU runs every available kernel.
            unsafe { kernel.quantize_rows(&x, &mut quants, &mut scales) };
            for (b, values) in x.chunks_exact(BLOCK).enumerate() {
                let amax = values.iter().fold(0f32, |a, v| a.max(v.abs()));
                let inverse = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                assert_eq!(scales[b], f16::from_f32(amax / 127.0).to_f32(), "{kernel:?}");
                let expected: Vec<i8> = values.iter().map(|v| (v * inverse).round_ties_even() as i8).collect();
                assert_eq!(quants[b * BLOCK..(b + 1) * BLOCK], expected[..], "{kernel:?} block {b}");
            }
            assert_eq!(quants[..8], [127, 2, -4, 0, 0, 2, 126, -2], "{kernel:?}");
        }
    }
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    #[test]
    fn matches_candle_on_q8_0_for_any_row_count() {
        let (rows, cols) = (48, 96);
        let mut weights: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 300.0).collect();
        // Zeros and the extremes of a block (±127 after quantization).
        weights[..4].copy_from_slice(&[0.0, 1.7, -1.7, 0.0]);
        let weight =
            QTensor::quantize(&Tensor::from_vec(weights, (rows, cols), &Device::Cpu).unwrap(), GgmlDType::Q8_0)
                .unwrap();
        check_against_candle(weight, WeightRange::Full);
    }

    #[test]
    fn matches_candle_on_weights_in_q5_0_range() {
        let (rows, cols) = (48, 96);
        let mut raw = Vec::new();
        for row in 0..rows {
            for block in 0..cols / BLOCK {
                raw.extend_from_slice(&f16::from_f32(0.01 + (row * 3 + block) as f32 * 1e-3).to_le_bytes());
                // Row 0 at the top of the range and row 1 at the bottom make the
                // largest i16 sums against inputs that all quantize to 127.
                raw.extend((0..BLOCK).map(|i| match row {
                    0 => 15,
                    1 => -16i8 as u8,
                    _ => (((row * 31 + block * 7 + i * 13) % 32) as i8 - 16) as u8,
                }));
            }
        }
        let weight =
            candle_core::quantized::ggml_file::qtensor_from_ggml(GgmlDType::Q8_0, &raw, vec![rows, cols], &Device::Cpu)
                .unwrap();
        check_against_candle(weight, WeightRange::Narrow);
    }

    /// Every kernel against candle's Q8_0 matmul, and bit-equal with each
    /// other, alone or in a batch, stored either way.
    fn check_against_candle(weight: QTensor, range: WeightRange) {
        if !PackedQ8_0::supported() {
            return;
        }
        let (rows, cols) = weight.shape().dims2().unwrap();
        let packed = PackedQ8_0::pack(&weight.data().unwrap(), rows, cols).unwrap();
        assert_eq!(packed.range, range);
        let streamed =
            PackedQ8_0::read(&mut std::io::Cursor::new(weight.data().unwrap()), rows, cols).unwrap().unwrap();
        assert_eq!((streamed.tiles.clone(), streamed.scales.clone()), (packed.tiles.clone(), packed.scales.clone()));
        // Stacked with a part of the other range, both are stored + 128.
        let mut restored = packed.clone();
        restored.restore(WeightRange::Full);
        let mixed = PackedQ8_0::stack(vec![restored.clone(), packed.clone()]).unwrap();
        assert_eq!(mixed.range, WeightRange::Full);
        let dense = weight.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        for row in [0, 1, 5, rows - 1] {
            let (mut unpacked, mut from_mixed) = (Vec::new(), Vec::new());
            packed.dequantize_row(row, &mut unpacked);
            mixed.dequantize_row(rows + row, &mut from_mixed);
            assert_eq!((&unpacked, &from_mixed), (&dense[row], &dense[row]), "row {row}");
        }
        let reference = QMatMul::from_qtensor(weight).unwrap();
        for m in [1usize, 3, 5, 8, 13] {
            let mut x: Vec<f32> = (0..m * cols).map(|i| ((i * 104_729 % 997) as f32 - 498.0) / 111.0).collect();
            x[..BLOCK].fill(1.0);
            let expected = reference
                .forward(&Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let mut by_kernel = Vec::new();
            for kernel in Kernel::available() {
                for weights in [&packed, &restored] {
                    let out = weights.matmul_with(kernel, &x, m);
                    for (a, b) in out.iter().zip(&expected) {
                        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{kernel:?} m={m}: {a} vs {b}");
                    }
                    // Row 0 is the same alone as in a batch.
                    let alone = weights.matmul_with(kernel, &x[..cols], 1);
                    assert_eq!(alone[..], out[..rows], "{kernel:?}");
                    by_kernel.push(out);
                }
            }
            assert!(by_kernel.windows(2).all(|pair| pair[0] == pair[1]), "every kernel gives the same bits");
        }
    }
}
