//! Op tests for shaders/attention.wgsl, shaders/attention_coop.wgsl and
//! shaders/attention_warp.wgsl:
//! softmax(q·kᵀ·scale)·v per (batch, head) against an f64 CPU reference, on fresh seeded
//! random inputs with NaN-poisoned outputs, on both kernel paths where the device has them
//! (`common::paths()`: the cooperative-matrix kernels only where the device offers them): tiny
//! and odd shapes, CLIP's causal 77x77, cross-attention over 77 keys, every SD-1.5 head dim
//! (40, 64, 80, 160, 512; 512 runs on the scalar kernel on both paths), one real UNet
//! self-attention (4096 tokens), q/k/v read out of one fused tensor, every cooperative tile
//! (and, where the device has subgroup barriers, every tile of both cooperative shaders
//! forced, forward and saving lse, with a long case where the lazy rescale fires), large
//! logits (online softmax stability), the saved lse, the path choice and refused shapes;
//! and `layers::attention_materialised` (the VAE's 512-wide head on the matmul kernels with
//! scores in f32 and a row softmax) against the same reference.

mod common;

use atelier::gpu::{DType, KernelPath, Tensor};
use atelier::kernels::attention::{coop_dp, Attention, CoopTile, Operand, COOP_MAX_DP, COOP_SHARED_LIMIT};
use atelier::gpu::PlanBuilder;
use atelier::model::layers::{attention_materialised_chunked, score_chunk};
use common::{gpu, paths, random, rel_l2, round_f16, seed, POISON};

/// Outputs are O(0.1..1) weighted means stored as f16 (relative rounding 2^-11, ~3e-4 RMS);
/// probabilities and accumulators are f32 (the cooperative kernel rounds the probabilities
/// to f16 for the tensor cores, relative 2^-11 per term, and normalises by the sum of the
/// rounded values, which averages out over the keys). 2e-3 covers that with room for f32
/// sums over 4096 keys, and nothing more: a missing scale, a wrong mask, a dropped rescale
/// or a wrong column slice is off by 1e-1 or more.
const BOUND: f64 = 2e-3;

fn upload(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_f32(gpu(), shape, DType::F16, v, "input").unwrap()
}

fn poisoned(shape: &[usize]) -> Tensor {
    let t = Tensor::empty(gpu(), shape, DType::F16, "o").unwrap();
    t.fill_words(gpu(), POISON);
    t
}

fn input(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    round_f16(&random(n, seed).iter().map(|x| scale * x).collect::<Vec<_>>())
}

/// Reference attention in f64. x (b, i, c) at off + (b·l + i)·ld + c; output dense
/// [batch, lq, heads·d].
fn attention_ref(
    a: &Attention,
    q: (&[f32], usize, usize),
    k: (&[f32], usize, usize),
    v: (&[f32], usize, usize),
) -> Vec<f64> {
    let (hd, d) = (a.heads * a.d, a.d);
    let mut out = vec![0.0; a.batch * a.lq * hd];
    let mut s = vec![0.0f64; a.lk];
    for b in 0..a.batch {
        for h in 0..a.heads {
            for i in 0..a.lq {
                let qa = q.1 + (b * a.lq + i) * q.2 + h * d;
                let nk = if a.causal { (i + 1).min(a.lk) } else { a.lk };
                let mut mx = f64::NEG_INFINITY;
                for j in 0..nk {
                    let ka = k.1 + (b * a.lk + j) * k.2 + h * d;
                    let dot: f64 = (0..d).map(|c| q.0[qa + c] as f64 * k.0[ka + c] as f64).sum();
                    s[j] = dot * a.scale as f64;
                    mx = mx.max(s[j]);
                }
                let mut sum = 0.0;
                for sj in s.iter_mut().take(nk) {
                    *sj = (*sj - mx).exp();
                    sum += *sj;
                }
                let oa = (b * a.lq + i) * hd + h * d;
                for j in 0..nk {
                    let va = v.1 + (b * a.lk + j) * v.2 + h * d;
                    for c in 0..d {
                        out[oa + c] += s[j] / sum * v.0[va + c] as f64;
                    }
                }
            }
        }
    }
    out
}

/// Runs `a` on `path` on dense random q, k, v with inputs in ±amp; returns the error and the
/// seconds the GPU run took. Asking for cooperative matrices on a device that offers them
/// must give the cooperative kernel whenever the padded head dim allows it.
fn run_on(mut a: Attention, amp: f32, path: KernelPath) -> (f64, f64) {
    let g = gpu();
    a.path = Some(path);
    let (used, tile) = a.plan(g);
    if path == KernelPath::Coop && coop_dp(a.d) <= COOP_MAX_DP {
        assert_eq!(used, KernelPath::Coop, "{a:?}: the cooperative kernel was not chosen");
    }
    let what = format!("attention {a:?} amp {amp} on {used} {tile:?}");
    let s = seed(&what);
    let hd = a.heads * a.d;
    let q = input(a.batch * a.lq * hd, amp, s);
    let k = input(a.batch * a.lk * hd, amp, s ^ 1);
    let v = input(a.batch * a.lk * hd, 1.0, s ^ 2);
    let (tq, tk, tv) = (upload(&q, &[a.batch, a.lq, hd]), upload(&k, &[a.batch, a.lk, hd]), upload(&v, &[a.batch, a.lk, hd]));
    let to = poisoned(&[a.batch, a.lq, hd]);
    let d = a
        .prepare(g, Operand::dense(&tq, hd), Operand::dense(&tk, hd), Operand::dense(&tv, hd), Operand::dense(&to, hd))
        .unwrap();
    let t0 = std::time::Instant::now();
    g.run_now(&d).unwrap();
    let out = to.to_f32(g).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let r = attention_ref(&a, (&q, 0, hd), (&k, 0, hd), (&v, 0, hd));
    let e = rel_l2(&out, &r);
    eprintln!("{what}: {}: rel L2 {e:.3e}, {secs:.2} s on the GPU", d.label);
    assert!(e < BOUND, "{what}: rel L2 {e:.3e} over {BOUND:.0e}");
    (e, secs)
}

/// Runs `a` on every path the device has; returns the worst error and the longest time.
fn run(a: Attention, amp: f32) -> (f64, f64) {
    paths().into_iter().map(|p| run_on(a, amp, p)).fold((0.0, 0.0), |x, y| (x.0.max(y.0), x.1.max(y.1)))
}

#[test]
fn tiny_and_odd_shapes() {
    run(Attention::new(1, 2, 5, 7, 8, false), 1.0);
    run(Attention::new(2, 2, 5, 7, 16, false), 1.0); // batch 2: per-item offsets
    run(Attention::new(1, 3, 33, 70, 24, false), 1.0); // odd head dim 24, partial blocks
    run(Attention::new(2, 1, 9, 9, 8, true), 1.0);
}

#[test]
fn clip_causal() {
    // CLIP: 77 tokens, d 64 (4 of its 12 heads), query i sees keys 0..=i.
    run(Attention::new(1, 4, 77, 77, 64, true), 2.0);
    // More keys than queries, causal (top-left aligned): keys past lq are never seen.
    run(Attention::new(1, 2, 20, 50, 40, true), 1.0);
}

#[test]
fn cross_attention() {
    // UNet cross-attention: image tokens over 77 text tokens.
    run(Attention::new(1, 2, 256, 77, 40, false), 2.0);
    run(Attention::new(2, 1, 64, 77, 80, false), 2.0);
}

#[test]
fn head_dims() {
    run(Attention::new(1, 1, 64, 64, 160, false), 2.0);
    run(Attention::new(1, 2, 40, 70, 80, false), 2.0);
    // VAE mid-block: one head of 512.
    run(Attention::new(1, 1, 256, 256, 512, false), 1.0);
}

#[test]
fn unet_self_attention_4096() {
    // UNet down block 0 at 512x512: 64x64 latent tokens, d 40 (one of 8 heads).
    let (_, secs) = run(Attention::new(1, 1, 4096, 4096, 40, false), 2.0);
    assert!(secs < 60.0, "4096x4096 d 40 took {secs:.1} s");
}

#[test]
fn large_logits_are_stable() {
    // |q|, |k| up to 8 at d 64: logits q·k/8 reach about ±30 (a naive exp would overflow
    // f16 and lose f32 precision); the running max keeps every exponent <= 0. Causal so the
    // first rows see few keys.
    let (e, _) = run(Attention::new(1, 2, 100, 100, 64, true), 8.0);
    assert!(e.is_finite());
    run(Attention::new(1, 1, 130, 300, 16, false), 12.0);
}

#[test]
fn fused_qkv_slices() {
    // q, k and v are column slices of one [batch, l, 3·heads·d] tensor (a fused projection);
    // the output goes to columns of a wider tensor whose other columns must stay poisoned.
    // d 40 pads to 48 on the cooperative path: its zero columns must not leak into the
    // neighbouring head's or the poisoned columns.
    let g = gpu();
    for d in [16, 40] {
        for path in paths() {
            let mut a = Attention::new(2, 3, 45, 45, d, false);
            a.path = Some(path);
            let hd = a.heads * a.d;
            let ld = 3 * hd;
            let s = seed(&format!("attention fused qkv d {d} {path}"));
            let qkv = input(a.batch * a.lq * ld, 2.0, s);
            let t = upload(&qkv, &[a.batch, a.lq, ld]);
            let ldo = hd + 16;
            let to = poisoned(&[a.batch, a.lq, ldo]);
            let disp = a
                .prepare(g, Operand::slice(&t, 0, ld), Operand::slice(&t, hd, ld), Operand::slice(&t, 2 * hd, ld), Operand::slice(&to, 8, ldo))
                .unwrap();
            g.run_now(&disp).unwrap();
            let out = to.to_f32(g).unwrap();
            let r = attention_ref(&a, (&qkv, 0, ld), (&qkv, hd, ld), (&qkv, 2 * hd, ld));
            let mut got = Vec::new();
            for row in out.chunks(ldo) {
                assert!(row[..8].iter().chain(&row[8 + hd..]).all(|x| x.is_nan()), "{}: wrote outside its columns", disp.label);
                got.extend_from_slice(&row[8..8 + hd]);
            }
            let e = rel_l2(&got, &r);
            eprintln!("fused qkv d {d} {}: rel L2 {e:.3e}", disp.label);
            assert!(e < BOUND, "fused qkv d {d} {}: rel L2 {e:.3e} over {BOUND:.0e}", disp.label);
        }
    }
}

#[test]
fn materialised_wide_head() {
    // Single-head self-attention from a fused [batch·l, 3c] q/k/v tensor, scores materialised
    // in chunks of query rows (S f32, P f16 rows padded to 8, f32 accumulation): the same
    // rounding points as the flash kernels, so the same bound. Batch 2 (the second entry's
    // k and v start mid-tensor), token counts that are not multiples of 8, chunks that do not
    // divide them, the VAE's 512 and a narrow head, on both paths.
    let g = gpu();
    assert_eq!(score_chunk(4096), 4096);
    assert_eq!(score_chunk(16384), 1024);
    assert_eq!(score_chunk(100), 100);
    for (batch, l, c, chunk, amp) in [(2, 150, 512, 64, 0.5), (1, 77, 40, 32, 2.0), (2, 33, 24, 33, 2.0)] {
        let a = Attention::new(batch, 1, l, l, c, false);
        let s = seed(&format!("attention materialised {batch}x{l} c {c} chunk {chunk}"));
        let qkv = input(batch * l * 3 * c, amp, s);
        let t = upload(&qkv, &[batch * l, 3 * c]);
        let o = poisoned(&[batch * l, c]);
        let mut pb = PlanBuilder::new(g);
        attention_materialised_chunked(&mut pb, &t, &o, batch, l, c, chunk).unwrap();
        pb.finish().run(g).unwrap();
        let r = attention_ref(&a, (&qkv, 0, 3 * c), (&qkv, c, 3 * c), (&qkv, 2 * c, 3 * c));
        let e = rel_l2(&o.to_f32(g).unwrap(), &r);
        eprintln!("materialised {batch}x{l} c {c} chunk {chunk}: rel L2 {e:.3e}");
        assert!(e < BOUND, "materialised {batch}x{l} c {c} chunk {chunk}: rel L2 {e:.3e} over {BOUND:.0e}");
    }
    // An odd width, and a q/k/v tensor of the wrong size, are refused.
    let t = upload(&vec![0.0; 2 * 8 * 3 * 5], &[16, 15]);
    let o = poisoned(&[16, 5]);
    assert!(attention_materialised_chunked(&mut PlanBuilder::new(g), &t, &o, 2, 8, 5, 8).is_err());
    let o = poisoned(&[16, 6]);
    assert!(attention_materialised_chunked(&mut PlanBuilder::new(g), &t, &o, 2, 8, 6, 8).is_err());
}

#[test]
fn every_coop_tile() {
    // Each cooperative tile (forced) on partial query and key blocks, causal and not, at
    // padded head dims 16, 48, 64, 80 and 160 where the device can run the tile (warp-owned
    // ones need subgroup barriers); the scalar path runs the same shapes.
    for path in paths() {
        for tile in CoopTile::ALL {
            for (a, amp) in [
                (Attention::new(2, 2, 70, 77, 40, false), 2.0),
                (Attention::new(1, 2, 77, 77, 64, true), 2.0),
                (Attention::new(1, 1, 33, 100, 8, false), 1.0),
                (Attention::new(1, 1, 50, 45, 80, true), 2.0),
                (Attention::new(1, 1, 40, 70, 160, false), 2.0),
            ] {
                let mut a = a;
                if path == KernelPath::Coop {
                    let caps = &gpu().caps;
                    if !tile.usable(coop_dp(a.d) as u32, caps.limits.max_compute_workgroup_storage_size, caps.subgroup_barrier) {
                        continue;
                    }
                    a.tile = Some(tile);
                } else if tile != CoopTile::ALL[0] {
                    continue; // the scalar kernel has no such tiles: run each shape once
                }
                run_on(a, amp, path);
            }
        }
    }
}

#[test]
fn path_choice() {
    // Sizes of the cooperative kernel's workgroup memory as in attention_coop.wgsl's header.
    let t = |bq, bk, warps| CoopTile { bq, bk, warps, warp: false };
    assert_eq!(t(64, 64, 4).shared_bytes(48), 47104);
    assert_eq!(t(64, 32, 4).shared_bytes(80), 47104);
    assert_eq!(t(32, 32, 4).shared_bytes(160), 38912);
    assert!(!t(64, 64, 4).valid(64, COOP_SHARED_LIMIT) && !t(64, 32, 4).valid(96, COOP_SHARED_LIMIT));
    assert!(t(32, 32, 4).valid(160, COOP_SHARED_LIMIT) && !t(32, 32, 4).valid(176, COOP_SHARED_LIMIT));
    assert!(!t(32, 32, 8).valid(48, COOP_SHARED_LIMIT), "8 subgroups on 32 rows: half a score fragment each");
    // attention_warp.wgsl's, as in its header: 16 query rows per subgroup, padded d <= 80.
    let w = |bk, warps| CoopTile { bq: 16 * warps, bk, warps, warp: true };
    assert_eq!(w(32, 4).shared_bytes(48), 21504);
    assert_eq!(w(64, 4).shared_bytes(80), 49152);
    assert_eq!(w(32, 8).shared_bytes(80), 39936);
    assert!(w(64, 4).valid(80, COOP_SHARED_LIMIT) && !w(32, 4).valid(96, COOP_SHARED_LIMIT), "warp-owned: padded d <= 80");
    assert!((16..=160).step_by(16).all(|dp| !w(64, 8).valid(dp, COOP_SHARED_LIMIT)), "128 x 64 never fits 48 KiB");
    assert!(!CoopTile { bq: 64, ..w(32, 8) }.valid(48, COOP_SHARED_LIMIT), "warp-owned: bq = 16·warps");
    assert!(CoopTile::ALL.iter().filter(|t| t.warp).all(|t| !t.usable(48, COOP_SHARED_LIMIT, false)), "warp-owned tiles need subgroup barriers");
    assert_eq!(CoopTile::auto(48, COOP_SHARED_LIMIT, false), Some(t(64, 64, 8)));
    assert_eq!(CoopTile::auto(48, COOP_SHARED_LIMIT, true), Some(w(32, 8)));
    assert_eq!(CoopTile::auto(80, COOP_SHARED_LIMIT, true), Some(w(32, 8)));
    // Below 40 KiB of workgroup memory 128 x 32 at padded 80 (39936 bytes) does not fit: 64 x 32.
    assert_eq!(CoopTile::auto(80, 32768, true), Some(w(32, 4)));
    assert_eq!(CoopTile::auto(160, COOP_SHARED_LIMIT, true), Some(t(32, 32, 4)));
    assert_eq!(coop_dp(40), 48);
    let g = gpu();
    let limit = g.caps.limits.max_compute_workgroup_storage_size;
    for d in [40, 64, 80, 160, 512] {
        let mut a = Attention::new(2, 8, 4096, 77, d, false);
        a.path = Some(KernelPath::Scalar);
        assert_eq!(a.plan(g), (KernelPath::Scalar, None), "d {d} forced scalar");
        a.path = Some(KernelPath::Coop);
        let tile = CoopTile::auto(coop_dp(d) as u32, limit, g.caps.subgroup_barrier);
        let coop = g.caps.coop_16x16_f16_f32 && d <= COOP_MAX_DP && tile.is_some();
        let want = if coop { (KernelPath::Coop, tile) } else { (KernelPath::Scalar, None) };
        assert_eq!(a.plan(g), want, "d {d} coop asked for (device offers coop: {})", g.caps.coop_16x16_f16_f32);
        a.path = None;
        let (p, _) = a.plan(g);
        assert_eq!(p == KernelPath::Coop, g.caps.path == KernelPath::Coop && coop, "d {d} default path");
    }
    if g.caps.coop_16x16_f16_f32 && limit >= COOP_SHARED_LIMIT {
        // The H100 (48 KiB): every SD-1.5 head dim but the VAE's 512 runs on tensor cores,
        // up to d 80 warp-owned where the device has subgroup barriers.
        let sb = g.caps.subgroup_barrier;
        for (d, v1, warp) in [
            (40, t(64, 64, 8), w(32, 8)),
            (64, t(32, 32, 4), w(32, 8)),
            (80, t(32, 32, 4), w(32, 8)),
            (160, t(32, 32, 4), t(32, 32, 4)),
        ] {
            let mut a = Attention::new(1, 1, 64, 64, d, false);
            a.path = Some(KernelPath::Coop);
            assert_eq!(a.plan(g), (KernelPath::Coop, Some(if sb { warp } else { v1 })), "d {d}");
        }
    }
}

#[test]
fn refuses_bad_shapes() {
    let g = gpu();
    let t = upload(&vec![0.0; 2 * 16 * 64], &[2, 16, 64]);
    let o = poisoned(&[2, 16, 64]);
    let dense = |x| Operand::dense(x, 64);
    let ok = Attention::new(2, 4, 16, 16, 16, false);
    assert!(ok.prepare(g, dense(&t), dense(&t), dense(&t), dense(&o)).is_ok());
    for (a, why) in [
        (Attention::new(2, 2, 16, 16, 12, false), "d not a multiple of 8"),
        (Attention::new(1, 1, 16, 16, 520, false), "d over 512"),
        (Attention::new(2, 4, 17, 16, 16, false), "q too short"),
        (Attention::new(2, 4, 16, 17, 16, false), "k too short"),
        (Attention::new(2, 8, 16, 16, 16, false), "heads·d wider than the row"),
        (Attention::new(0, 4, 16, 16, 16, false), "empty batch"),
        (Attention::new(2, 4, 16, 0, 16, false), "no keys"),
    ] {
        assert!(a.prepare(g, dense(&t), dense(&t), dense(&t), dense(&o)).is_err(), "{why}");
    }
    let bad = |x, off, ld| Operand::slice(x, off, ld);
    assert!(ok.prepare(g, bad(&t, 4, 64), dense(&t), dense(&t), dense(&o)).is_err(), "offset not a multiple of 8");
    assert!(ok.prepare(g, dense(&t), bad(&t, 8, 64), dense(&t), dense(&o)).is_err(), "offset runs past the end");
    assert!(ok.prepare(g, dense(&t), dense(&t), bad(&t, 0, 60), dense(&o)).is_err(), "stride not a multiple of 8");
    assert!(ok.prepare(g, dense(&t), dense(&t), dense(&t), dense(&t)).is_err(), "o shares q's buffer");
    let t32 = Tensor::from_f32(g, &[2, 16, 64], DType::F32, &vec![0.0; 2 * 16 * 64], "f32").unwrap();
    assert!(ok.prepare(g, dense(&t32), dense(&t), dense(&t), dense(&o)).is_err(), "f32 q");
}


/// Reference lse2 = log2 Σ_j exp2(q_i·k_j·scale·log2 e) over the keys row i sees, in f64, per
/// row (b·heads + h)·lq + i (the layout of the saved statistics).
fn lse_ref(a: &Attention, q: (&[f32], usize, usize), k: (&[f32], usize, usize)) -> Vec<f64> {
    let d = a.d;
    let mut out = Vec::with_capacity(a.batch * a.heads * a.lq);
    for b in 0..a.batch {
        for h in 0..a.heads {
            for i in 0..a.lq {
                let qa = q.1 + (b * a.lq + i) * q.2 + h * d;
                let nk = if a.causal { (i + 1).min(a.lk) } else { a.lk };
                let s: Vec<f64> = (0..nk)
                    .map(|j| {
                        let ka = k.1 + (b * a.lk + j) * k.2 + h * d;
                        (0..d).map(|c| q.0[qa + c] as f64 * k.0[ka + c] as f64).sum::<f64>() * a.scale as f64
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                out.push((mx + sum.ln()) * std::f64::consts::LOG2_E);
            }
        }
    }
    out
}

/// Saved lse: absolute error allowed per row, relative to max(1, |lse2|). lse2 is a sum of
/// f32 scores over <= 512 dims and an f32 sum of exp2 over the keys, then a log2: f32
/// rounding gives ~1e-6 relative; 2e-5 leaves room for approximate exp2/log2 on GPUs, and
/// a wrong scale, mask, rescale or row is off by 1e-2 or more.
const LSE_BOUND: f64 = 2e-5;

/// Rows x key blocks, past each row's first block, where the coop kernels' lazy rule moves
/// the reference max (so the running output is rescaled): the block's largest visible score
/// in log2 units passes the running reference by more than 8, in blocks of `bk` keys from
/// key 0. From the f64 scores, so a count near the threshold may differ from the GPU's f32.
fn lazy_moves(a: &Attention, q: (&[f32], usize, usize), k: (&[f32], usize, usize), bk: usize) -> usize {
    let d = a.d;
    let sl = a.scale as f64 * std::f64::consts::LOG2_E;
    let mut moves = 0;
    for b in 0..a.batch {
        for h in 0..a.heads {
            for i in 0..a.lq {
                let qa = q.1 + (b * a.lq + i) * q.2 + h * d;
                let nk = if a.causal { (i + 1).min(a.lk) } else { a.lk };
                let mut m = f64::NEG_INFINITY;
                for k0 in (0..nk).step_by(bk) {
                    let mx = (k0..nk.min(k0 + bk))
                        .map(|j| {
                            let ka = k.1 + (b * a.lk + j) * k.2 + h * d;
                            (0..d).map(|c| q.0[qa + c] as f64 * k.0[ka + c] as f64).sum::<f64>() * sl
                        })
                        .fold(f64::NEG_INFINITY, f64::max);
                    if mx > m + 8.0 {
                        moves += (k0 > 0) as usize;
                        m = mx;
                    }
                }
            }
        }
    }
    moves
}

/// Runs `a` (forced to `path`) once without and once with saving lse, on q, k, v slices of
/// one fused [batch, l, 3·heads·d] tensor when `fused` (lq = lk), dense tensors otherwise
/// (key j then scaled by 1 + ramp·j/lk, so later keys outscore earlier ones): o against the
/// reference, the saved lse against the reference, its second column zero, every row
/// written, and o bitwise the same as without saving. Returns how often the lazy rescale
/// fires ([`lazy_moves`]) on the cooperative path, 0 on the scalar one.
fn check_saved_lse(mut a: Attention, amp: f32, ramp: f32, path: KernelPath, fused: bool) -> usize {
    let g = gpu();
    a.path = Some(path);
    let (used, tile) = a.plan(g);
    let what = format!("saved lse {a:?} amp {amp} ramp {ramp} fused {fused} on {used} {tile:?}");
    let s = seed(&what);
    let hd = a.heads * a.d;
    let (mut host, mut tensors) = (Vec::new(), Vec::new());
    let ops: [(usize, usize, usize); 3] = if fused {
        assert_eq!(a.lq, a.lk);
        assert_eq!(ramp, 0.0, "no key ramp on fused q, k, v");
        let ld = 3 * hd;
        let x = input(a.batch * a.lq * ld, amp, s);
        tensors.push(upload(&x, &[a.batch, a.lq, ld]));
        host.push(x);
        [(0, 0, ld), (0, hd, ld), (0, 2 * hd, ld)]
    } else {
        for (i, (l, sc)) in [(a.lq, amp), (a.lk, amp), (a.lk, 1.0)].into_iter().enumerate() {
            let mut x = input(a.batch * l * hd, sc, s ^ i as u64);
            if i == 1 && ramp != 0.0 {
                for (n, row) in x.chunks_mut(hd).enumerate() {
                    let f = 1.0 + ramp * (n % a.lk) as f32 / a.lk as f32;
                    row.iter_mut().for_each(|y| *y *= f);
                }
                x = round_f16(&x);
            }
            tensors.push(upload(&x, &[a.batch, l, hd]));
            host.push(x);
        }
        [(0, 0, hd), (1, 0, hd), (2, 0, hd)]
    };
    let op = |i: usize| Operand::slice(&tensors[ops[i].0], ops[i].1, ops[i].2);
    let (o_plain, o_saving) = (poisoned(&[a.batch, a.lq, hd]), poisoned(&[a.batch, a.lq, hd]));
    let rows = a.batch * a.heads * a.lq;
    let stats = Tensor::empty(g, &[rows, 2], DType::F32, "lse").unwrap();
    stats.fill_words(g, POISON);
    let plain = a.prepare(g, op(0), op(1), op(2), Operand::dense(&o_plain, hd)).unwrap();
    let saving = a.prepare_saving(g, op(0), op(1), op(2), Operand::dense(&o_saving, hd), &stats).unwrap();
    assert!(!plain.label.contains("SAVE_LSE") && saving.label.contains("SAVE_LSE=1"), "{what}: {} / {}", plain.label, saving.label);
    assert!(saving.bytes > plain.bytes && saving.flops == plain.flops);
    g.run_now(&plain).unwrap();
    g.run_now(&saving).unwrap();
    let (po, so) = (o_plain.to_f32(g).unwrap(), o_saving.to_f32(g).unwrap());
    assert!(po.iter().zip(&so).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: o differs when saving lse");
    assert!(po.iter().all(|x| x.is_finite()), "{what}: o not written");
    let arg = |i: usize| (host[ops[i].0].as_slice(), ops[i].1, ops[i].2);
    let eo = rel_l2(&po, &attention_ref(&a, arg(0), arg(1), arg(2)));
    assert!(eo < BOUND, "{what}: o rel L2 {eo:.3e} over {BOUND:.0e}");
    let got = stats.to_f32(g).unwrap();
    let r = lse_ref(&a, arg(0), arg(1));
    let mut worst: f64 = 0.0;
    for (row, (pair, want)) in got.chunks(2).zip(&r).enumerate() {
        assert_eq!(pair[1], 0.0, "{what}: row {row}: second column {}", pair[1]);
        let e = (pair[0] as f64 - want).abs() / want.abs().max(1.0);
        assert!(e <= LSE_BOUND, "{what}: row {row}: lse2 {} against {want} (error {e:.2e} over {LSE_BOUND:.0e})", pair[0]);
        worst = worst.max(e);
    }
    let moves = match (used, tile) {
        (KernelPath::Coop, Some(t)) => lazy_moves(&a, arg(0), arg(1), t.bk as usize),
        _ => 0,
    };
    eprintln!("{what}: {}: o rel L2 {eo:.3e}, worst lse error {worst:.2e}, lazy rescales {moves}", saving.label);
    moves
}

#[test]
fn saved_lse() {
    for path in paths() {
        for (a, amp, fused) in [
            (Attention::new(1, 4, 77, 77, 64, true), 2.0, false),     // CLIP causal
            (Attention::new(1, 2, 20, 50, 40, true), 1.0, false),     // causal, more keys
            (Attention::new(2, 2, 100, 77, 40, false), 2.0, false),   // cross-attention over 77
            (Attention::new(1, 2, 64, 77, 80, false), 2.0, false),
            (Attention::new(1, 1, 40, 70, 160, false), 2.0, false),
            (Attention::new(1, 1, 33, 100, 8, false), 1.0, false),
            (Attention::new(1, 2, 100, 100, 64, true), 8.0, false),   // large logits
            (Attention::new(1, 1, 64, 64, 512, false), 1.0, false),   // VAE head (scalar)
            (Attention::new(2, 3, 45, 45, 40, false), 2.0, true),     // fused qkv slices
            (Attention::new(1, 2, 45, 45, 16, true), 2.0, true),
        ] {
            check_saved_lse(a, amp, 0.0, path, fused);
        }
        // Every cooperative tile (forced), where the device can run it.
        if path == KernelPath::Coop {
            let caps = &gpu().caps;
            for tile in CoopTile::ALL {
                for a in [Attention::new(2, 2, 70, 77, 40, false), Attention::new(1, 1, 50, 45, 80, true)] {
                    if tile.usable(coop_dp(a.d) as u32, caps.limits.max_compute_workgroup_storage_size, caps.subgroup_barrier) {
                        check_saved_lse(Attention { tile: Some(tile), ..a }, 2.0, 0.0, path, false);
                    }
                }
            }
        }
    }
}

#[test]
fn saved_lse_unet_4096() {
    // UNet self-attention at 512x512 (one head of 40 over 4096 tokens).
    for path in paths() {
        check_saved_lse(Attention::new(1, 1, 4096, 4096, 40, false), 2.0, 0.0, path, false);
    }
}

#[test]
fn every_coop_tile_forced() {
    // Every cooperative-matrix tile of both shaders (attention_coop.wgsl, attention_warp.wgsl)
    // forced, forward and forward saving lse, at shapes with partial query and key blocks:
    // d 40 (batch 2, 3 heads), 64 causal, 80, 160 (attention_coop.wgsl only), and a long one
    // (1000 x 1000, d 40) whose keys grow along the sequence so that rows' maxima move by more
    // than 2^8 after their first block and the lazy rescale runs (counted from the reference
    // scores: ~2400 times per tile). Only where the device has cooperative matrices and
    // subgroup barriers (the software GPU of CI has neither).
    let g = gpu();
    if !g.caps.coop_16x16_f16_f32 || !g.caps.subgroup_barrier {
        eprintln!(
            "no cooperative matrices ({}) or no subgroup barriers ({}) on this device: every_coop_tile_forced skipped",
            g.caps.coop_16x16_f16_f32, g.caps.subgroup_barrier
        );
        return;
    }
    let limit = g.caps.limits.max_compute_workgroup_storage_size;
    let cases = [
        (Attention::new(2, 3, 150, 170, 40, false), 2.0, 0.0),
        (Attention::new(2, 2, 77, 77, 64, true), 2.0, 0.0),
        (Attention::new(2, 2, 130, 77, 80, false), 2.0, 0.0),
        (Attention::new(1, 2, 50, 30, 160, true), 1.0, 0.0),
        (Attention::new(1, 2, 1000, 1000, 40, false), 2.0, 3.0),
    ];
    let mut seen = Vec::new();
    for (a, amp, ramp) in cases {
        for t in CoopTile::ALL {
            if !t.usable(coop_dp(a.d) as u32, limit, true) {
                continue;
            }
            seen.push(t);
            let moves = check_saved_lse(Attention { tile: Some(t), ..a }, amp, ramp, KernelPath::Coop, false);
            if ramp > 0.0 {
                assert!(moves >= 100, "{a:?} {t:?}: the lazy rescale fired only {moves} times");
            }
        }
    }
    for t in CoopTile::ALL {
        assert!(seen.contains(&t), "{t:?} never ran");
    }
}

#[test]
fn saved_lse_refuses_bad_stats() {
    let g = gpu();
    let t = upload(&vec![0.0; 2 * 16 * 64], &[2, 16, 64]);
    let o = poisoned(&[2, 16, 64]);
    let dense = |x| Operand::dense(x, 64);
    let a = Attention::new(2, 4, 16, 16, 16, false);
    let st = |shape: &[usize], dt| Tensor::empty(g, shape, dt, "lse").unwrap();
    assert!(a.prepare_saving(g, dense(&t), dense(&t), dense(&t), dense(&o), &st(&[2 * 4 * 16, 2], DType::F32)).is_ok());
    assert!(a.prepare_saving(g, dense(&t), dense(&t), dense(&t), dense(&o), &st(&[2 * 4 * 16, 2], DType::F16)).is_err(), "f16 stats");
    assert!(a.prepare_saving(g, dense(&t), dense(&t), dense(&t), dense(&o), &st(&[2 * 4 * 16 - 1, 2], DType::F32)).is_err(), "too few rows");
    assert!(a.prepare_saving(g, dense(&t), dense(&t), dense(&t), dense(&o), &st(&[2 * 4 * 16 * 2], DType::F32)).is_err(), "not [rows, 2]");
    // Right shape and dtype, but in o's or q's buffer (bound writable).
    for (x, why) in [(&o, "stats in o's buffer"), (&t, "stats in q's buffer")] {
        let alias = Tensor { buffer: x.buffer.clone(), offset: 0, shape: vec![2 * 4 * 16, 2], dtype: DType::F32 };
        assert!(a.prepare_saving(g, dense(&t), dense(&t), dense(&t), dense(&o), &alias).is_err(), "{why}");
    }
}
