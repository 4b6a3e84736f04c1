//! A Q8_0 matmul for many rows at once (AVX-512 VNNI).
//!
//! candle runs a Q8_0 weight whose rows are not a multiple of 256 wide (all
//! of Gemma 3 270M's 640-wide projections, and its 262,144-row output) one
//! activation row at a time: eight decoding sequences cost eight times one,
//! so batching gained nothing. Here the weights are repacked into tiles of
//! 16 output columns by 4 inputs, so one `vpdpbusd` advances 16 columns,
//! and each tile is read from memory once per call whatever the number of
//! rows (it stays in L1 while every row uses it).
//!
//! The arithmetic is llama.cpp's `ggml_vec_dot_q8_0_q8_0` on x86, rounding
//! included: activations quantized per 32 values with its formula, exact
//! integer sums per 4-input lane, lane sums scaled by `d_w * d_x` and
//! accumulated across blocks with FMA, the 8 lanes added in its order.
//! Every row is computed the same way whatever else is in the batch.

// SIMD intrinsics and disjoint writes from the thread pool need `unsafe`;
// it is confined to this module (the rest of the workspace denies it).
#![allow(unsafe_code)]

use candle_core::utils::barrier_pool;
use half::f16;

const TILE_COLS: usize = 16;
const BLOCK: usize = 32;
const Q8_0_BYTES: usize = 34;

pub struct PackedQ8_0 {
    rows: usize,
    cols: usize,
    /// `[rows/16][cols/32][8][16][4]`: for each group of 16 weight rows and
    /// each block, 8 chunks of 4 inputs for all 16 rows, stored + 128 as u8
    /// (vpdpbusd multiplies unsigned by signed bytes).
    tiles: Vec<u8>,
    /// `[rows/16][cols/32][16]` block scales.
    scales: Vec<f32>,
}

struct SharedOut(*mut f32);
// SAFETY: every task writes a disjoint set of output columns.
unsafe impl Sync for SharedOut {}

impl PackedQ8_0 {
    /// Whether this CPU runs the kernel.
    pub fn supported() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
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
        let mut scales = vec![0f32; rows * blocks];
        let mut raw = vec![0u8; TILE_COLS * blocks * Q8_0_BYTES];
        for group in 0..rows / TILE_COLS {
            next_group(&mut raw)?;
            for (lane, row) in raw.chunks_exact(blocks * Q8_0_BYTES).enumerate() {
                for (b, block) in row.chunks_exact(Q8_0_BYTES).enumerate() {
                    let tile = group * blocks + b;
                    scales[tile * TILE_COLS + lane] = f16::from_le_bytes([block[0], block[1]]).to_f32();
                    for (i, q) in block[2..].iter().enumerate() {
                        let (chunk, within) = (i / 4, i % 4);
                        tiles[((tile * 8 + chunk) * TILE_COLS + lane) * 4 + within] = q.wrapping_add(128);
                    }
                }
            }
        }
        Ok(Some(PackedQ8_0 { rows, cols, tiles, scales }))
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
            let scale = self.scales[tile * TILE_COLS + lane];
            for i in 0..BLOCK {
                let (chunk, within) = (i / 4, i % 4);
                let q = self.tiles[((tile * 8 + chunk) * TILE_COLS + lane) * 4 + within].wrapping_sub(128) as i8;
                out.push(f32::from(q) * scale);
            }
        }
    }

    /// `out[m, rows] = x[m, cols] · weightᵀ`.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.cols, "activation shape");
        assert_eq!(out.len(), m * self.rows, "output shape");
        let blocks = self.cols / BLOCK;
        let mut quants = vec![0i8; m * self.cols];
        let mut scales = vec![0f32; m * blocks];
        // -128 × the sum of each 4-input chunk, undoing the +128 stored in
        // the weights.
        let mut offsets = vec![0i32; m * blocks * 8];
        for (i, values) in x.chunks_exact(BLOCK).enumerate() {
            // As llama.cpp's quantize_row_q8_0 on x86: 127/amax, ties to even.
            let amax = values.iter().fold(0f32, |a, v| a.max(v.abs()));
            let inverse = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            scales[i] = f16::from_f32(amax / 127.0).to_f32();
            for (j, (q, v)) in quants[i * BLOCK..(i + 1) * BLOCK].iter_mut().zip(values).enumerate() {
                *q = (v * inverse).round_ties_even() as i8;
                offsets[i * 8 + j / 4] -= 128 * i32::from(*q);
            }
        }
        let out_ptr = SharedOut(out.as_mut_ptr());
        let groups = self.rows / TILE_COLS;
        let activations = Activations { quants: &quants, scales: &scales, offsets: &offsets, m };
        barrier_pool().execute_chunked(groups, |range| {
            let out = &out_ptr;
            for group in range {
                // SAFETY: `supported()` gated construction; each group
                // writes only its own 16 columns of every output row.
                unsafe { self.group(group, &activations, out.0) }
            }
        });
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn group(&self, group: usize, x: &Activations<'_>, out: *mut f32) {
        use std::arch::x86_64::*;
        let blocks = self.cols / BLOCK;
        // SAFETY (all pointer arithmetic below): offsets stay inside the
        // tiles/scales of `group` and inside row `r` of `x` and `out`.
        unsafe {
            let tiles = self.tiles.as_ptr().add(group * blocks * BLOCK * TILE_COLS);
            let weight_scales = self.scales.as_ptr().add(group * blocks * TILE_COLS);
            for r in 0..x.m {
                let quants = x.quants.as_ptr().add(r * self.cols);
                // One accumulator per 4-input lane, combined at the end in
                // the order of ggml's hsum_float_8: llama.cpp's own rounding.
                let mut lanes = [_mm512_setzero_ps(); 8];
                for b in 0..blocks {
                    let scale = _mm512_mul_ps(
                        _mm512_loadu_ps(weight_scales.add(b * TILE_COLS)),
                        _mm512_set1_ps(x.scales[r * blocks + b]),
                    );
                    for (chunk, lane) in lanes.iter_mut().enumerate() {
                        let four = std::ptr::read_unaligned(quants.add(b * BLOCK + chunk * 4) as *const i32);
                        let weights = _mm512_loadu_si512(tiles.add((b * 8 + chunk) * 64) as *const _);
                        // Starting from -offset removes the +128 in the same instruction.
                        let start = _mm512_set1_epi32(x.offsets[(r * blocks + b) * 8 + chunk]);
                        let sum = _mm512_dpbusd_epi32(start, weights, _mm512_set1_epi32(four));
                        *lane = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sum), *lane);
                    }
                }
                let low = _mm512_add_ps(_mm512_add_ps(lanes[0], lanes[4]), _mm512_add_ps(lanes[2], lanes[6]));
                let high = _mm512_add_ps(_mm512_add_ps(lanes[1], lanes[5]), _mm512_add_ps(lanes[3], lanes[7]));
                let acc = _mm512_add_ps(low, high);
                _mm512_storeu_ps(out.add(r * self.rows + group * TILE_COLS), acc);
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn group(&self, _group: usize, _x: &Activations<'_>, _out: *mut f32) {
        unreachable!("PackedQ8_0::supported() is false off x86_64")
    }
}

struct Activations<'a> {
    quants: &'a [i8],
    scales: &'a [f32],
    offsets: &'a [i32],
    m: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    #[test]
    fn matches_candle_on_q8_0_for_any_row_count() {
        if !PackedQ8_0::supported() {
            return;
        }
        let (rows, cols) = (48, 96);
        let weights: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 300.0).collect();
        let weight =
            QTensor::quantize(&Tensor::from_vec(weights, (rows, cols), &Device::Cpu).unwrap(), GgmlDType::Q8_0)
                .unwrap();
        let packed = PackedQ8_0::pack(&weight.data().unwrap(), rows, cols).unwrap();
        let streamed =
            PackedQ8_0::read(&mut std::io::Cursor::new(weight.data().unwrap()), rows, cols).unwrap().unwrap();
        assert_eq!((streamed.tiles.clone(), streamed.scales.clone()), (packed.tiles.clone(), packed.scales.clone()));
        let reference = QMatMul::from_qtensor(weight).unwrap();
        for m in [1usize, 3, 8] {
            let x: Vec<f32> = (0..m * cols).map(|i| ((i * 104_729 % 997) as f32 - 498.0) / 111.0).collect();
            let expected = reference
                .forward(&Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let mut out = vec![0f32; m * rows];
            packed.matmul(&x, m, &mut out);
            for (a, b) in out.iter().zip(&expected) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "m={m}: {a} vs {b}");
            }
            // Row 0 is the same alone as in a batch.
            let mut alone = vec![0f32; rows];
            packed.matmul(&x[..cols], 1, &mut alone);
            assert_eq!(alone[..], out[..rows]);
        }
        let mut row = Vec::new();
        packed.dequantize_row(5, &mut row);
        assert_eq!(row.len(), cols);
    }
}
