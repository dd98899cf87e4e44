//! Op tests of the elementwise family (`src/kernels/elementwise.rs`) against a CPU reference
//! in f64: every unary op (copy, SiLU, GELU, quick-GELU, affine, clamp, exp), add and mul (same-size and
//! with a broadcast row), casts f16<->f32 and copy2d, at sizes 1, 7, 8, 9, 1023 and
//! 4096·320+5, for f16 and f32 inputs and outputs, on fresh seeded random inputs. Outputs are
//! poisoned with NaN first, so an unwritten element fails. Also: the padding past numel is
//! owned by the kernel but never read into a result, and bad shapes are errors, not panics.
//!
//! Bounds: inputs are exactly what the GPU stores (f16 inputs are rounded before the
//! reference) and arithmetic is f32, so the error is the output rounding plus a few f32
//! roundings. Checked as ||out-ref|| / ||scale|| < bound, where scale is |ref| (plain relative
//! L2) except where an error is relative to something else: for a sum (add, affine) the terms'
//! magnitudes, since a rounding of a term is relative to the term and a sum may cancel; for
//! GELU |ref| + 0.5·|x|, since its erf is the Abramowitz-Stegun 7.1.26 approximation with
//! |error| < 1.5e-7 absolute (and a few 2^-24 more from 1 - poly·exp(-z²) in f32; measured
//! < 4.3e-7 in all), which costs at most 0.5·|x|·5e-7 per element.
//! - f16 output: rounding to f16 has a relative step of 2^-11 (≈ 4.9e-4 at most), bound 1e-3;
//!   scale is floored at 2^-14, f16's smallest normal, below which the step is 2^-24 absolute.
//! - f32 output: a few f32 roundings (2^-24 ≈ 6e-8 each) and the GPU's exp, bound 1e-6.

mod common;

use atelier::gpu::{DType, Tensor};
use atelier::kernels::elementwise::{self, Binary, Unary};
use common::*;

const SIZES: [usize; 6] = [1, 7, 8, 9, 1023, 4096 * 320 + 5];
const DTYPES: [DType; 2] = [DType::F16, DType::F32];
const UNARY: [Unary; 7] = [
    Unary::Copy,
    Unary::Silu,
    Unary::Gelu,
    Unary::QuickGelu,
    Unary::Affine { alpha: -0.37, beta: 0.625 },
    Unary::Clamp { lo: -1.5, hi: 2.0 },
    Unary::Exp { scale: 0.5 },
];

/// The relative-L2 bound for an output dtype (reasons at the top of the file).
fn bound(out: DType) -> f64 {
    match out {
        DType::F16 => 1e-3,
        DType::F32 => 1e-6,
    }
}

/// Fresh values in [-4, 4) (the activations' interesting range), exactly as `dtype` stores them.
fn values(n: usize, dtype: DType, seed: u64) -> Vec<f32> {
    let v: Vec<f32> = random(n, seed).iter().map(|x| 4.0 * x).collect();
    if dtype == DType::F16 { round_f16(&v) } else { v }
}

fn upload(v: &[f32], dtype: DType, what: &str) -> Tensor {
    Tensor::from_f32(gpu(), &[v.len()], dtype, v, what).unwrap()
}

/// An output tensor with every storage word (padding included) set to NaN.
fn poisoned(shape: &[usize], dtype: DType) -> Tensor {
    let t = Tensor::empty(gpu(), shape, dtype, "y").unwrap();
    t.fill_words(gpu(), POISON);
    t
}

/// Downloads `y`, asserts ||y - reference|| / ||scale|| is under the bound (see the top).
fn check(what: &str, y: &Tensor, reference: &[f64], scale: &[f64]) -> Vec<f32> {
    let out = y.to_f32(gpu()).unwrap();
    let floor = if y.dtype == DType::F16 { 2f64.powi(-14) } else { 0.0 };
    let ratio = norm(reference.iter().copied()) / norm(scale.iter().map(|s| s.max(floor)));
    let e = rel_l2(&out, reference) * ratio;
    assert!(e < bound(y.dtype), "{what}: scaled L2 error {e:.3e} over {:.0e}", bound(y.dtype));
    out
}

fn norm(v: impl Iterator<Item = f64>) -> f64 {
    v.map(|x| x * x).sum::<f64>().sqrt()
}

/// |r|, the scale of a plain relative error.
fn mag(r: &[f64]) -> Vec<f64> {
    r.iter().map(|r| r.abs()).collect()
}

/// Reference and error scale of a unary op on `x`.
fn unary_reference(op: Unary, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let r: Vec<f64> = x.iter().map(|&v| op.reference(v as f64)).collect();
    let scale = x
        .iter()
        .zip(&r)
        .map(|(&v, &r)| match op {
            Unary::Affine { alpha, beta } => (alpha as f64 * v as f64).abs() + (beta as f64).abs(),
            Unary::Gelu => r.abs() + 0.5 * (v as f64).abs(),
            _ => r.abs(),
        })
        .collect();
    (r, scale)
}

#[test]
fn unary_every_op_size_and_dtype() {
    let g = gpu();
    for op in UNARY {
        for &n in &SIZES {
            for xt in DTYPES {
                for yt in DTYPES {
                    let what = format!("{op:?} n={n} {xt}->{yt}");
                    let xv = values(n, xt, seed(&what));
                    let x = upload(&xv, xt, "x");
                    let y = poisoned(&[n], yt);
                    g.run_now(&elementwise::unary(g, op, &x, &y).unwrap()).unwrap();
                    let (r, scale) = unary_reference(op, &xv);
                    check(&what, &y, &r, &scale);
                }
            }
        }
    }
}

#[test]
fn casts_are_exact_or_one_rounding() {
    let g = gpu();
    for &n in &SIZES {
        for (xt, yt) in [(DType::F16, DType::F32), (DType::F32, DType::F16), (DType::F16, DType::F16), (DType::F32, DType::F32)] {
            let what = format!("cast n={n} {xt}->{yt}");
            let xv = values(n, xt, seed(&what));
            let x = upload(&xv, xt, "x");
            let y = poisoned(&[n], yt);
            g.run_now(&elementwise::cast(g, &x, &y).unwrap()).unwrap();
            let r: Vec<f64> = xv.iter().map(|&v| v as f64).collect();
            let out = check(&what, &y, &r, &mag(&r));
            for (i, (&o, &v)) in out.iter().zip(&xv).enumerate() {
                if (xt, yt) == (DType::F32, DType::F16) {
                    // One f16 rounding: within a step of 2^-10·|v| (or of the smallest normal,
                    // 2^-14, should the GPU flush a subnormal).
                    let step = (v.abs() * 2f32.powi(-10)).max(2f32.powi(-14));
                    assert!((o - v).abs() <= step, "{what}: [{i}] {v} -> {o}");
                } else {
                    // Every value is representable in the output: the copy is exact.
                    assert_eq!(o.to_bits(), v.to_bits(), "{what}: [{i}] {v} -> {o}");
                }
            }
        }
    }
}

#[test]
fn binary_add_mul_same_size_and_broadcast_row() {
    let g = gpu();
    // (rows, b_len): b_len == rows·cols is the same-size case; otherwise b is one row of
    // b_len values repeating over a.
    let mut shapes: Vec<(usize, usize)> = SIZES.iter().map(|&n| (1, n)).collect();
    shapes.extend([(7, 1), (3, 7), (5, 9), (9, 8), (33, 31), (4096, 320), (77, 768)]);
    for op in [Binary::Add { alpha: 1.0 }, Binary::Add { alpha: -0.75 }, Binary::Mul { alpha: 1.0 }, Binary::Mul { alpha: 1.5 }] {
        for &(rows, cols) in &shapes {
            for xt in DTYPES {
                for yt in DTYPES {
                    let what = format!("{op:?} {rows}x{cols} {xt}->{yt}");
                    let s = seed(&what);
                    let n = rows * cols;
                    let (av, bv) = (values(n, xt, s), values(cols, xt, s ^ 1));
                    let (a, b) = (upload(&av, xt, "a"), upload(&bv, xt, "b"));
                    let y = poisoned(&[rows, cols], yt);
                    g.run_now(&elementwise::binary(g, op, &a, &b, &y).unwrap()).unwrap();
                    let (r, scale): (Vec<f64>, Vec<f64>) = (0..n)
                        .map(|i| {
                            let (x, w) = (av[i] as f64, bv[i % cols] as f64);
                            match op {
                                Binary::Add { alpha } => (x + alpha as f64 * w, x.abs() + (alpha as f64 * w).abs()),
                                Binary::Mul { alpha } => (alpha as f64 * x * w, (alpha as f64 * x * w).abs()),
                            }
                        })
                        .unzip();
                    check(&what, &y, &r, &scale);
                }
            }
        }
    }
}

#[test]
fn binary_grouped_adds_a_row_per_image() {
    let g = gpu();
    // (groups, rows per group, C): [groups, rows, C] (op) [groups, C], as the UNet adds each
    // image's time embedding to its channels; odd sizes make groups straddle 8-element units.
    let shapes = [(1, 1, 8), (2, 3, 5), (3, 7, 9), (2, 64, 320), (4, 5, 16), (2, 4096, 320)];
    for op in [Binary::Add { alpha: 1.0 }, Binary::Mul { alpha: 0.5 }] {
        for &(groups, rows, c) in &shapes {
            for xt in DTYPES {
                let what = format!("grouped {op:?} {groups}x{rows}x{c} {xt}");
                let s = seed(&what);
                let n = groups * rows * c;
                let (av, bv) = (values(n, xt, s), values(groups * c, xt, s ^ 1));
                let (a, b) = (upload(&av, xt, "a"), upload(&bv, xt, "b"));
                let y = poisoned(&[groups, rows, c], xt);
                g.run_now(&elementwise::binary_grouped(g, op, &a, &b, &y, groups).unwrap()).unwrap();
                let (r, scale): (Vec<f64>, Vec<f64>) = (0..n)
                    .map(|i| {
                        let (x, w) = (av[i] as f64, bv[(i / (rows * c)) * c + i % c] as f64);
                        match op {
                            Binary::Add { alpha } => (x + alpha as f64 * w, x.abs() + (alpha as f64 * w).abs()),
                            Binary::Mul { alpha } => (alpha as f64 * x * w, (alpha as f64 * x * w).abs()),
                        }
                    })
                    .unzip();
                check(&what, &y, &r, &scale);
            }
        }
    }
    // b's rows must divide into the groups, and each group into b's rows.
    let a = poisoned(&[2, 3, 5], DType::F16);
    let b = poisoned(&[3, 5], DType::F16);
    assert!(elementwise::binary_grouped(g, Binary::Add { alpha: 1.0 }, &a, &b, &a, 2).is_err());
    assert!(elementwise::binary_grouped(g, Binary::Add { alpha: 1.0 }, &a, &b, &a, 0).is_err());
}

#[test]
fn copy2d_strided_rows_zero_the_gap() {
    let g = gpu();
    // (rows, cols, ld_src, ld_dst); the source holds exactly (rows-1)·ld_src + cols values.
    let cases = [(1, 1, 1, 1), (1, 7, 9, 8), (3, 5, 7, 6), (7, 9, 9, 10), (5, 8, 8, 9), (9, 1, 3, 2), (33, 31, 32, 31), (4096, 319, 320, 321)];
    for (rows, cols, ld_src, ld_dst) in cases {
        for xt in DTYPES {
            for yt in DTYPES {
                let what = format!("copy2d {rows}x{cols} ld {ld_src}->{ld_dst} {xt}->{yt}");
                let sv = values((rows - 1) * ld_src + cols, xt, seed(&what));
                let src = upload(&sv, xt, "src");
                let dst = poisoned(&[rows, ld_dst], yt);
                g.run_now(&elementwise::copy2d(g, &src, &dst, rows, cols, ld_src, ld_dst).unwrap()).unwrap();
                let r: Vec<f64> = (0..rows * ld_dst)
                    .map(|i| {
                        let (row, col) = (i / ld_dst, i % ld_dst);
                        if col < cols { sv[row * ld_src + col] as f64 } else { 0.0 }
                    })
                    .collect();
                let out = check(&what, &dst, &r, &mag(&r));
                assert!(out.iter().zip(&r).all(|(&o, &r)| r != 0.0 || o == 0.0), "{what}: gap not zeroed");
            }
        }
    }
}

/// A tensor of `v` whose storage past the last element is filled with `pad` words.
fn upload_padded(v: &[f32], dtype: DType, pad: u32) -> Tensor {
    let t = Tensor::empty(gpu(), &[v.len()], dtype, "padded").unwrap();
    let mut bytes: Vec<u8> = match dtype {
        DType::F32 => bytemuck::cast_slice(v).to_vec(),
        DType::F16 => v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
    };
    let words = (t.bytes() / 4) as usize;
    let pad_bytes: Vec<u8> = std::iter::repeat_n(pad.to_le_bytes(), words).flatten().collect();
    bytes.extend_from_slice(&pad_bytes[bytes.len()..]);
    gpu().queue.write_buffer(&t.buffer, t.offset, &bytes);
    t
}

#[test]
fn padding_past_numel_is_never_read_and_every_element_is_written() {
    let g = gpu();
    // Odd lengths leave a partial last word (f16) and a partial last 16-byte block (both).
    for n in [1, 7, 9, 1023, 4096 * 320 + 5] {
        for xt in DTYPES {
            for yt in DTYPES {
                let what = format!("padding n={n} {xt}->{yt}");
                let s = seed(&what);
                let (av, bv) = (values(n, xt, s), values(n, xt, s ^ 1));
                let mut results = Vec::new();
                // NaN, then a huge finite value, then zeros past numel: the results must agree
                // bit for bit and be right, and the poisoned output must be fully written.
                for pad in [POISON, 0x7BFF_7BFF, 0] {
                    let (a, b) = (upload_padded(&av, xt, pad), upload_padded(&bv, xt, pad));
                    let y1 = poisoned(&[n], yt);
                    let y2 = poisoned(&[n], yt);
                    g.run_now(&elementwise::unary(g, Unary::Gelu, &a, &y1).unwrap()).unwrap();
                    g.run_now(&elementwise::binary(g, Binary::Mul { alpha: 1.0 }, &a, &b, &y2).unwrap()).unwrap();
                    let (r1, s1) = unary_reference(Unary::Gelu, &av);
                    let r2: Vec<f64> = av.iter().zip(&bv).map(|(&x, &w)| x as f64 * w as f64).collect();
                    let o1 = check(&format!("{what} gelu pad {pad:#x}"), &y1, &r1, &s1);
                    let o2 = check(&format!("{what} mul pad {pad:#x}"), &y2, &r2, &mag(&r2));
                    results.push((o1, o2));
                }
                let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                for (o1, o2) in &results[1..] {
                    assert_eq!(bits(o1), bits(&results[0].0), "{what}: unary output depends on the padding");
                    assert_eq!(bits(o2), bits(&results[0].1), "{what}: binary output depends on the padding");
                }
            }
        }
    }
}

#[test]
fn mismatched_shapes_are_errors_not_panics() {
    let g = gpu();
    let t = |shape: &[usize], dt| Tensor::empty(g, shape, dt, "t").unwrap();
    let shape_err = |r: atelier::Result<atelier::gpu::Dispatch>, what: &str| match r {
        Ok(_) => panic!("{what}: accepted"),
        Err(e) => assert!(e.to_string().contains("shape mismatch"), "{what}: {e}"),
    };
    let (x9, y8, y10) = (t(&[9], DType::F16), t(&[8], DType::F16), t(&[2, 5], DType::F32));
    shape_err(elementwise::unary(g, Unary::Silu, &x9, &y8), "unary 9 -> 8");
    shape_err(elementwise::unary(g, Unary::Copy, &x9, &y10), "unary 9 -> 2x5");
    shape_err(elementwise::cast(g, &y10, &x9), "cast 2x5 -> 9");
    let (a, b4, b0) = (t(&[3, 6], DType::F16), t(&[4], DType::F16), t(&[0], DType::F16));
    let y = t(&[3, 6], DType::F16);
    shape_err(elementwise::binary(g, Binary::Add { alpha: 1.0 }, &a, &b4, &y), "b of 4 over 18");
    shape_err(elementwise::binary(g, Binary::Mul { alpha: 1.0 }, &a, &b0, &y), "empty b");
    shape_err(elementwise::binary(g, Binary::Add { alpha: 1.0 }, &a, &a, &y8), "y of 8 for a of 18");
    let src = t(&[4, 6], DType::F16);
    shape_err(elementwise::copy2d(g, &src, &y, 4, 6, 6, 6), "copy2d dst too small");
    shape_err(elementwise::copy2d(g, &src, &t(&[4, 8], DType::F16), 4, 7, 6, 8), "copy2d cols > ld_src");
    shape_err(elementwise::copy2d(g, &src, &t(&[4, 8], DType::F16), 5, 6, 6, 6), "copy2d src too small");
    // Operands of different dtypes are a dtype error, also a value.
    match elementwise::binary(g, Binary::Add { alpha: 1.0 }, &a, &t(&[3, 6], DType::F32), &y) {
        Ok(_) => panic!("binary f16 + f32: accepted"),
        Err(e) => assert!(e.to_string().contains("dtype mismatch"), "{e}"),
    }
}
