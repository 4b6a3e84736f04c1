//! Row-wise ops rounded as ggml's CPU backend rounds them, which keeps
//! greedy output on llama.cpp's path where the top two logits are close:
//!
//! - RMS norm: squares summed in f64, the row scaled by the reciprocal
//!   root, then by the weight (with GELU's table, this halved the logit
//!   error against llama.cpp at the first position);
//! - Gemma 3's gated GELU, `gelu(gate) * up`: the gate rounded to f16 and
//!   looked up in a table of f16 results, identity above 10 and zero
//!   below -10.
//!
//! Vectorized because they run on the scheduler thread alone while the
//! pool waits: element by element through tensors, GELU alone took ~4 ms
//! of a 30 ms step at 8 streams.

// SIMD intrinsics need `unsafe`; it is confined to the `*_avx512` and `*_avx2` functions.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use half::f16;

fn table() -> &'static [f32] {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| {
                let v = f16::from_bits(bits).to_f32();
                let gelu = 0.5 * v * (1.0 + (0.797_884_6_f32 * v * (1.0 + 0.044_715 * v * v)).tanh());
                f16::from_f32(gelu).to_f32()
            })
            .collect()
    })
}

fn gelu(v: f32, table: &[f32]) -> f32 {
    if v <= -10.0 {
        0.0
    } else if v >= 10.0 {
        v
    } else {
        table[f16::from_f32(v).to_bits() as usize]
    }
}

/// `gelu(gate[i]) * up[i]`, in place in `gate`.
pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gate and up widths");
    let table = table();
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("f16c") {
        done = gate.len() / 16 * 16;
        // SAFETY: the CPU has the features; `done` is within both slices.
        unsafe { gelu_mul_avx512(&mut gate[..done], &up[..done], table) };
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
        done = gate.len() / 8 * 8;
        // SAFETY: as above, 8 at a time.
        unsafe { gelu_mul_avx2(&mut gate[..done], &up[..done], table) };
    }
    for (g, u) in gate[done..].iter_mut().zip(&up[done..]) {
        *g = gelu(*g, table) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c")]
unsafe fn gelu_mul_avx512(gate: &mut [f32], up: &[f32], table: &[f32]) {
    use std::arch::x86_64::*;
    // SAFETY: 16 values at a time within the slices (multiples of 16 long);
    // gather indices are u16, inside the 65,536-entry table.
    unsafe {
        let (low, high) = (_mm512_set1_ps(-10.0), _mm512_set1_ps(10.0));
        for i in (0..gate.len()).step_by(16) {
            let v = _mm512_loadu_ps(gate.as_ptr().add(i));
            let bits = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            let looked_up = _mm512_i32gather_ps::<4>(_mm512_cvtepu16_epi32(bits), table.as_ptr());
            let above = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, high);
            let below = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(v, low);
            let g = _mm512_maskz_mov_ps(!below, _mm512_mask_mov_ps(looked_up, above, v));
            _mm512_storeu_ps(gate.as_mut_ptr().add(i), _mm512_mul_ps(g, _mm512_loadu_ps(up.as_ptr().add(i))));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn gelu_mul_avx2(gate: &mut [f32], up: &[f32], table: &[f32]) {
    use std::arch::x86_64::*;
    // SAFETY: as in `gelu_mul_avx512`, 8 values at a time.
    unsafe {
        let (low, high) = (_mm256_set1_ps(-10.0), _mm256_set1_ps(10.0));
        for i in (0..gate.len()).step_by(8) {
            let v = _mm256_loadu_ps(gate.as_ptr().add(i));
            let bits = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            let looked_up = _mm256_i32gather_ps::<4>(table.as_ptr(), _mm256_cvtepu16_epi32(bits));
            let above = _mm256_cmp_ps::<_CMP_GE_OQ>(v, high);
            let below = _mm256_cmp_ps::<_CMP_LE_OQ>(v, low);
            let g = _mm256_andnot_ps(below, _mm256_blendv_ps(looked_up, v, above));
            _mm256_storeu_ps(gate.as_mut_ptr().add(i), _mm256_mul_ps(g, _mm256_loadu_ps(up.as_ptr().add(i))));
        }
    }
}

/// `silu(gate[i]) * up[i]` (Llama, Qwen), in place in `gate`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gate and up widths");
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// RMS-normalizes each `weight.len()`-wide row of `values` in place.
pub fn rms_norm(values: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    for row in values.chunks_exact_mut(dim) {
        let mean = (sum_of_squares(row) / dim as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = (*v * scale) * w;
        }
    }
}

/// Each square rounded in f32 and summed in f64, as ggml does. The f64
/// lanes add in another order than ggml's loop, which moves the sum by
/// ~1e-16 relative: below what the f32 mean can show.
fn sum_of_squares(row: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && row.len().is_multiple_of(32) {
        // SAFETY: the CPU has AVX-512F; the row is a multiple of 32 long.
        return unsafe { sum_of_squares_avx512(row) };
    }
    row.iter().map(|v| f64::from(v * v)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_of_squares_avx512(row: &[f32]) -> f64 {
    use std::arch::x86_64::*;
    // SAFETY: loads of 8 at offsets below `row.len()`, a multiple of 32.
    unsafe {
        let mut acc = [_mm512_setzero_pd(); 4];
        for i in (0..row.len()).step_by(32) {
            for (j, acc) in acc.iter_mut().enumerate() {
                let v = _mm256_loadu_ps(row.as_ptr().add(i + j * 8));
                *acc = _mm512_add_pd(*acc, _mm512_cvtps_pd(_mm256_mul_ps(v, v)));
            }
        }
        _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(acc[0], acc[1]), _mm512_add_pd(acc[2], acc[3])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_equals_the_sequential_f64_definition() {
        let dim = 640;
        let values: Vec<f32> = (0..3 * dim).map(|i| ((i as f32) * 0.377).sin() * (1.0 + i as f32 / 100.0)).collect();
        let weight: Vec<f32> = (0..dim).map(|i| 1.0 + (i as f32 * 0.01).cos()).collect();
        let mut ours = values.clone();
        rms_norm(&mut ours, &weight, 1e-6);
        for (row, out) in values.chunks(dim).zip(ours.chunks(dim)) {
            let sum: f64 = row.iter().map(|v| f64::from(v * v)).sum();
            let scale = 1.0 / ((sum / dim as f64) as f32 + 1e-6).sqrt();
            let expected: Vec<f32> = row.iter().zip(&weight).map(|(v, w)| (v * scale) * w).collect();
            assert_eq!(out, &expected[..]);
        }
    }

    #[test]
    fn the_vector_path_equals_the_scalar_definition() {
        let gate: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.031 + (i as f32 * 0.7).sin()).collect();
        let up: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.13).cos()).collect();
        let mut ours = gate.clone();
        gelu_mul(&mut ours, &up);
        let table = table();
        for (i, (g, u)) in gate.iter().zip(&up).enumerate() {
            assert_eq!(ours[i].to_bits(), (gelu(*g, table) * u).to_bits(), "gate {g}");
        }
        let mut edges =
            vec![-10.0, 10.0, -10.5, 12.0, 0.0, -0.0, 9.99, -9.99, 1e6, -1e6, 3.0, -3.0, 0.5, 2.0, 7.0, -7.0];
        gelu_mul(&mut edges, &[1.0; 16]);
        assert_eq!(edges[..4], [0.0, 10.0, 0.0, 12.0]);
        assert_eq!(edges[8..10], [1e6, 0.0]);
        assert!((edges[10] - 2.996).abs() < 0.01);
    }
}
