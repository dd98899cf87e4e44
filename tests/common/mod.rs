//! Shared helpers for the op tests: one GPU per test binary, fresh seeded random inputs
//! (the seed is printed, and ATELIER_TEST_SEED replays it), relative L2 error, and the
//! poison word written over outputs before a kernel runs.
#![allow(dead_code)]

pub mod fixtures;

use std::sync::OnceLock;

use atelier::gpu::{Gpu, KernelPath};

/// All-ones words: NaN as f32 and as both f16 halves, so an unwritten element fails.
pub const POISON: u32 = 0xFFFF_FFFF;

pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        let g = Gpu::from_env().expect("opening the GPU for tests");
        eprintln!("testing on {} ({})", g.describe(), g.caps.path_reason);
        g
    })
}

/// The paths this device can run: scalar always, cooperative matrices where offered.
pub fn paths() -> Vec<KernelPath> {
    if gpu().caps.coop_16x16_f16_f32 {
        vec![KernelPath::Scalar, KernelPath::Coop]
    } else {
        vec![KernelPath::Scalar]
    }
}

/// A fresh seed per call (or ATELIER_TEST_SEED), printed so a failure can be replayed.
pub fn seed(what: &str) -> u64 {
    let s =
        std::env::var("ATELIER_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
                as u64
        });
    eprintln!("{what}: seed {s}");
    s
}

/// Uniform values in [-1, 1) from a splitmix64 stream.
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E3779B97F4A7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// Rounds through f16, as the GPU stores it.
pub fn round_f16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

/// ||out - ref|| / ||ref||; NaN anywhere gives infinity.
pub fn rel_l2(out: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len());
    let mut num = 0.0;
    let mut den = 0.0;
    for (&o, &r) in out.iter().zip(reference) {
        if !o.is_finite() {
            return f64::INFINITY;
        }
        num += (o as f64 - r).powi(2);
        den += r * r;
    }
    (num / den.max(1e-300)).sqrt()
}

/// conv over x [b, h, w, cin] (f32, or f64 for finite differences) with PyTorch-layout weight
/// [cout, cin, ks, ks], plus an optional bias, in f64.
pub fn conv_reference<X: Copy + Into<f64>>(c: &atelier::kernels::conv::Conv2d, x: &[X], w: &[f32], bias: Option<&[f32]>) -> Vec<f64> {
    let (oh, ow) = c.out_hw();
    let mut y = vec![0.0; c.batch * oh * ow * c.cout];
    for b in 0..c.batch {
        for oy in 0..oh {
            for ox in 0..ow {
                for o in 0..c.cout {
                    let mut acc = bias.map_or(0.0, |v| v[o] as f64);
                    for ky in 0..c.ks {
                        for kx in 0..c.ks {
                            let iy = (oy * c.stride + ky) as isize - c.pad as isize;
                            let ix = (ox * c.stride + kx) as isize - c.pad as isize;
                            if iy < 0 || ix < 0 || iy >= c.h as isize || ix >= c.w as isize {
                                continue;
                            }
                            let xb = ((b * c.h + iy as usize) * c.w + ix as usize) * c.cin;
                            for i in 0..c.cin {
                                acc += x[xb + i].into() * w[((o * c.cin + i) * c.ks + ky) * c.ks + kx] as f64;
                            }
                        }
                    }
                    y[((b * oh + oy) * ow + ox) * c.cout + o] = acc;
                }
            }
        }
    }
    y
}
