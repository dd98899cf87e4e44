//! Op tests for shaders/attention_backward.wgsl, attention_backward_coop.wgsl and
//! attention_backward_warp.wgsl (every case
//! on each path the device offers, `common::paths()`, checking the launches took it): dq, dk, dv of
//! o = softmax(q·kᵀ·scale)·v against an f64 CPU reference that materialises the scores, on
//! fresh seeded random q, k, v, dO with NaN-poisoned outputs: the reference itself against
//! central finite differences of the CPU forward; tiny and odd shapes (sizes not multiples of
//! the tiles, d 8, 40, 80, heads 1, 2, 8), causal (CLIP 77x77, d 64), cross-attention over 77
//! keys, head dim 160, large logits, f16 and f32 dO and gradients, fused-qkv column slices,
//! o as the GPU forward wrote it, two real SD shapes (cross-attention 4096 queries x 77 keys x
//! d 40 x 8 heads; self-attention 1024 x 1024 x d 80 x 2 heads) and refused shapes; dk and dv
//! with the query range split over workgroups (forced 1, 2, 3, not dividing the query blocks,
//! more splits than query blocks; causal; f16 and f32 gradients) and the launcher's choice;
//! the cooperative-matrix tiles' workgroup memory and the path choice, and on a device with
//! cooperative matrices every tile of both coop shaders forced.

mod common;

use atelier::gpu::{DType, KernelPath, Tensor};
use atelier::kernels::attention::{coop_dp, Attention, Operand, COOP_MAX_DP, COOP_SHARED_LIMIT};
use atelier::kernels::attention_backward::{
    default_dkv_splits, AttentionBackward, AttentionGrads, BwdTile, CoopEntry, MAX_DKV_SPLITS, WARP_MAX_DP,
};
use common::{gpu, paths, random, rel_l2, round_f16, seed, POISON};

/// Error bound (relative L2, each of dq, dk, dv). The inputs are the f16 values the GPU
/// sees, so what is left is: gradients stored as f16 (relative rounding 2^-11, ~2.2e-4 RMS:
/// measured 1.9e-4 .. 2.6e-4 on lavapipe), o stored as f16 (enters D = rowsum(dO∘o) and
/// through it every dS = P∘(dP - D); with f32 gradients dq and dk measure ~1e-4, dv ~2e-7)
/// and f32 sums over up to 1024 terms. 1e-3 is 4x the worst measured, and nothing more: a
/// missing scale is off by a factor, a wrong mask, a dropped D or a wrong block boundary by
/// 1e-1 or more.
const BOUND: f64 = 1e-3;

fn poisoned(shape: &[usize], dtype: DType) -> Tensor {
    let t = Tensor::empty(gpu(), shape, dtype, "grad").unwrap();
    t.fill_words(gpu(), POISON);
    t
}

fn input(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    round_f16(&random(n, seed).iter().map(|x| scale * x).collect::<Vec<_>>())
}

/// Reference forward and backward in f64 on dense [batch, l, heads·d] tensors: returns
/// (o, dq, dk, dv). Materialises each (batch, head)'s scores.
fn reference(a: &Attention, q: &[f32], k: &[f32], v: &[f32], dout: &[f32]) -> [Vec<f64>; 4] {
    let (hd, d, lq, lk) = (a.heads * a.d, a.d, a.lq, a.lk);
    let sc = a.scale as f64;
    let mut o = vec![0.0; a.batch * lq * hd];
    let mut dq = vec![0.0; a.batch * lq * hd];
    let mut dk = vec![0.0; a.batch * lk * hd];
    let mut dv = vec![0.0; a.batch * lk * hd];
    let mut p = vec![0.0f64; lq * lk];
    let mut ds = vec![0.0f64; lq * lk];
    for b in 0..a.batch {
        for h in 0..a.heads {
            let qa = |i: usize| (b * lq + i) * hd + h * d;
            let ka = |j: usize| (b * lk + j) * hd + h * d;
            for i in 0..lq {
                let nk = if a.causal { (i + 1).min(lk) } else { lk };
                let mut mx = f64::NEG_INFINITY;
                for j in 0..lk {
                    let s = if j < nk {
                        (0..d).map(|c| q[qa(i) + c] as f64 * k[ka(j) + c] as f64).sum::<f64>() * sc
                    } else {
                        f64::NEG_INFINITY
                    };
                    p[i * lk + j] = s;
                    mx = mx.max(s);
                }
                let mut sum = 0.0;
                for j in 0..lk {
                    let e = (p[i * lk + j] - mx).exp();
                    p[i * lk + j] = e;
                    sum += e;
                }
                for j in 0..lk {
                    p[i * lk + j] /= sum;
                }
                for j in 0..nk {
                    for c in 0..d {
                        o[qa(i) + c] += p[i * lk + j] * v[ka(j) + c] as f64;
                    }
                }
                // dP = dO·vᵀ, D = rowsum(P∘dP) (= rowsum(dO∘o)), dS = P∘(dP - D).
                let mut dd = 0.0;
                for j in 0..lk {
                    let dp: f64 = (0..d).map(|c| dout[qa(i) + c] as f64 * v[ka(j) + c] as f64).sum();
                    ds[i * lk + j] = dp;
                    dd += p[i * lk + j] * dp;
                }
                for j in 0..lk {
                    ds[i * lk + j] = p[i * lk + j] * (ds[i * lk + j] - dd);
                }
            }
            for i in 0..lq {
                for j in 0..lk {
                    let (pij, dsij) = (p[i * lk + j], ds[i * lk + j]);
                    for c in 0..d {
                        dv[ka(j) + c] += pij * dout[qa(i) + c] as f64;
                        dq[qa(i) + c] += sc * dsij * k[ka(j) + c] as f64;
                        dk[ka(j) + c] += sc * dsij * q[qa(i) + c] as f64;
                    }
                }
            }
        }
    }
    [o, dq, dk, dv]
}

#[test]
fn reference_matches_finite_differences() {
    // L = Σ o∘G for a fixed random G: dL/dx by central differences of the f64 forward
    // against the reference backward, every element of q, k and v, causal and not.
    for a in [Attention::new(2, 2, 3, 4, 3, false), Attention::new(1, 2, 4, 5, 2, true)] {
        let s = seed(&format!("finite differences {a:?}"));
        let hd = a.heads * a.d;
        let q = random(a.batch * a.lq * hd, s);
        let k = random(a.batch * a.lk * hd, s ^ 1);
        let v = random(a.batch * a.lk * hd, s ^ 2);
        let g = random(a.batch * a.lq * hd, s ^ 3);
        let [_, dq, dk, dv] = reference(&a, &q, &k, &v, &g);
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            let [o, ..] = reference(&a, q, k, v, &g);
            o.iter().zip(&g).map(|(o, g)| o * *g as f64).sum()
        };
        let h = 1e-2f32; // f32 inputs: exact steps of 2^-7 would be better; take the rounded step
        for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
            let mut fd = Vec::new();
            for idx in 0..grad.len() {
                let mut x = [q.clone(), k.clone(), v.clone()];
                let x0 = x[which][idx];
                x[which][idx] = x0 + h;
                let hp = (x[which][idx] - x0) as f64;
                let lp = loss(&x[0], &x[1], &x[2]);
                x[which][idx] = x0 - h;
                let hm = (x0 - x[which][idx]) as f64;
                let lm = loss(&x[0], &x[1], &x[2]);
                fd.push(((lp - lm) / (hp + hm)) as f32);
            }
            // Central differences: truncation O(h²) ~ 1e-4 relative at h = 1e-2.
            let e = rel_l2(&fd, grad);
            eprintln!("finite differences {a:?} grad {which}: rel L2 {e:.2e}");
            assert!(e < 1e-3, "reference gradient {which} vs finite differences: {e:.2e}");
        }
    }
}

/// Runs the backward of `a` on dense random inputs (q, k in ±amp, v and dO in ±1; o the
/// reference forward rounded to f16, as the forward stores it); dO and the gradients in the
/// given dtypes. Returns the worst error and the GPU seconds.
fn run(a: Attention, amp: f32, dout_dt: DType, grad_dt: DType) -> (f64, f64) {
    run_bound(a, amp, dout_dt, grad_dt, BOUND)
}

fn run_bound(a: Attention, amp: f32, dout_dt: DType, grad_dt: DType, bound: f64) -> (f64, f64) {
    run_split(a, amp, dout_dt, grad_dt, bound, None)
}

/// As `run_bound`, with the query splits of dk/dv forced (`None`: the launcher's choice);
/// the partials are poisoned too.
fn run_split(a: Attention, amp: f32, dout_dt: DType, grad_dt: DType, bound: f64, splits: Option<usize>) -> (f64, f64) {
    let mut worst: f64 = 0.0;
    let mut secs = 0.0;
    for path in paths() {
        let (e, s) = run_path(Attention { path: Some(path), ..a }, amp, dout_dt, grad_dt, bound, splits, None);
        worst = worst.max(e);
        secs = s;
    }
    (worst, secs)
}

/// Asserts that the dq and dk/dv launches `ds` run on the path asked for by `a.path`: the
/// cooperative-matrix kernels where that is Coop and the padded head dim fits, else scalar.
fn check_path(a: &Attention, bw: &AttentionBackward, ds: &[atelier::gpu::Dispatch]) {
    let want_coop = a.path == Some(KernelPath::Coop) && coop_dp(a.d) <= COOP_MAX_DP;
    assert_eq!(bw.plan(gpu()).0 == KernelPath::Coop, want_coop, "{a:?}: plan");
    for d in &ds[1..3] {
        let coop = d.label.starts_with("attention_backward_coop.") || d.label.starts_with("attention_backward_warp.");
        assert_eq!(coop, want_coop, "{a:?}: launch {}", d.label);
    }
}

/// One case on `a.path`, with the dk/dv query splits and the cooperative-matrix tiles (dq,
/// dkv) forced where given (the launches must then be those tiles' pipelines).
fn run_path(
    a: Attention,
    amp: f32,
    dout_dt: DType,
    grad_dt: DType,
    bound: f64,
    splits: Option<usize>,
    tiles: Option<(BwdTile, BwdTile)>,
) -> (f64, f64) {
    let g = gpu();
    let what = format!("attention backward {a:?} amp {amp} dO {dout_dt:?} grads {grad_dt:?} splits {splits:?} tiles {tiles:?}");
    let s = seed(&what);
    let hd = a.heads * a.d;
    let (nq, nk) = (a.batch * a.lq * hd, a.batch * a.lk * hd);
    let q = input(nq, amp, s);
    let k = input(nk, amp, s ^ 1);
    let v = input(nk, 1.0, s ^ 2);
    let mut dout = random(nq, s ^ 3);
    if dout_dt == DType::F16 {
        dout = round_f16(&dout);
    }
    let [o, rdq, rdk, rdv] = reference(&a, &q, &k, &v, &dout);
    let o: Vec<f32> = o.iter().map(|&x| x as f32).collect();
    let up = |x: &[f32], l: usize, dt: DType| Tensor::from_f32(g, &[a.batch, l, hd], dt, x, "input").unwrap();
    let (tq, tk, tv, to) = (up(&q, a.lq, DType::F16), up(&k, a.lk, DType::F16), up(&v, a.lk, DType::F16), up(&o, a.lq, DType::F16));
    let tdo = up(&dout, a.lq, dout_dt);
    let (tdq, tdk, tdv) = (poisoned(&[a.batch, a.lq, hd], grad_dt), poisoned(&[a.batch, a.lk, hd], grad_dt), poisoned(&[a.batch, a.lk, hd], grad_dt));
    let mut bw = AttentionBackward::with_dkv_splits(g, a, splits).unwrap();
    if let Some(s) = splits {
        assert_eq!(bw.dkv_splits, s);
    }
    bw.tiles = tiles;
    bw.stats.as_ref().unwrap().fill_words(g, POISON);
    for t in bw.dkv_partials.iter().flatten() {
        t.fill_words(g, POISON);
    }
    let dense = |t| Operand::dense(t, hd);
    let grads = AttentionGrads {
        q: dense(&tq),
        k: dense(&tk),
        v: dense(&tv),
        o: dense(&to),
        dout: dense(&tdo),
        dq: dense(&tdq),
        dk: dense(&tdk),
        dv: dense(&tdv),
    };
    let ds = bw.prepare(g, &grads).unwrap();
    check_path(&a, &bw, &ds);
    if let Some((tq, tk)) = tiles {
        let dp = coop_dp(a.d) as u32;
        let (grads32, do32) = (grad_dt == DType::F32, dout_dt == DType::F32);
        assert_eq!(&*ds[1].label, tq.key(CoopEntry::Dq, dp, do32, grads32).to_string().as_str(), "{what}: dq launch");
        assert_eq!(&*ds[2].label, tk.key(CoopEntry::Dkv, dp, do32, grads32).to_string().as_str(), "{what}: dkv launch");
    }
    // One dk/dv launch without splits; partials and their reduce with.
    assert_eq!(ds.len(), if bw.dkv_splits > 1 { 4 } else { 3 }, "{what}: launches");
    assert_eq!(ds[2].groups[2] as usize, bw.dkv_splits, "{what}: dkv grid");
    let t0 = std::time::Instant::now();
    for d in &ds {
        g.run_now(d).unwrap();
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut worst: f64 = 0.0;
    for (name, t, r) in [("dq", &tdq, &rdq), ("dk", &tdk, &rdk), ("dv", &tdv, &rdv)] {
        let e = rel_l2(&t.to_f32(g).unwrap(), r);
        eprintln!("{what}: {name} rel L2 {e:.3e}");
        assert!(e < bound, "{what}: {name} rel L2 {e:.3e} over {bound:.0e}");
        worst = worst.max(e);
    }
    eprintln!("{what}: {secs:.2} s on the GPU ({} dk/dv splits)", bw.dkv_splits);
    (worst, secs)
}

fn run16(a: Attention, amp: f32) -> (f64, f64) {
    run(a, amp, DType::F16, DType::F16)
}

#[test]
fn tiny_and_odd_shapes() {
    run16(Attention::new(1, 1, 5, 7, 8, false), 1.0);
    run16(Attention::new(2, 2, 5, 7, 16, false), 1.0); // batch 2: per-item offsets
    run16(Attention::new(1, 2, 33, 70, 40, false), 2.0); // partial blocks both ways
    run16(Attention::new(2, 1, 9, 9, 8, true), 1.0);
    run16(Attention::new(1, 2, 70, 33, 80, false), 2.0);
    run16(Attention::new(1, 8, 19, 23, 8, false), 1.0);
}

#[test]
fn dtypes() {
    // f32 dO and f32 gradients, and each mixed.
    let a = Attention::new(2, 2, 37, 45, 40, false);
    run(a, 2.0, DType::F32, DType::F32);
    run(a, 2.0, DType::F32, DType::F16);
    run(a, 2.0, DType::F16, DType::F32);
}

#[test]
fn clip_causal() {
    // CLIP: 77 tokens, d 64, query i sees keys 0..=i.
    run16(Attention::new(1, 4, 77, 77, 64, true), 2.0);
    // More keys than queries, causal: keys past lq get zero gradients.
    run(Attention::new(1, 2, 20, 50, 40, true), 1.0, DType::F32, DType::F32);
    // Large logits (|q|, |k| up to 8 at d 64: scores about ±30, softmax nearly one-hot):
    // exponents stay <= 0 against the recomputed lse. dq and dk measure ~8.6e-4 here: D's
    // error from the f16 o (2^-11 relative) reaches dS = P∘(dP - D) unattenuated where one key
    // dominates, and dq = dS·k·scale, dk = dSᵀ·q·scale grow with |k|, |q| (8x the other tests),
    // while dv (no D) stays at the f16 rounding. 3e-3: 3.5x the measured.
    run_bound(Attention::new(1, 2, 100, 100, 64, true), 8.0, DType::F16, DType::F16, 3e-3);
    // More queries than keys, causal, head dim 160.
    run16(Attention::new(1, 1, 50, 30, 160, true), 1.0);
}

#[test]
fn cross_attention() {
    // UNet cross-attention: image tokens over 77 text tokens, d 40 / 80 / 160.
    run16(Attention::new(2, 2, 256, 77, 40, false), 2.0);
    run16(Attention::new(1, 1, 64, 77, 80, false), 2.0);
    run16(Attention::new(1, 1, 64, 77, 160, false), 2.0);
}

#[test]
fn unet_cross_attention_4096x77() {
    // UNet down block 0 at 512x512, cross-attention: 4096 latent tokens over 77 text tokens,
    // 8 heads of 40, batch 1.
    let (_, secs) = run16(Attention::new(1, 8, 4096, 77, 40, false), 2.0);
    assert!(secs < 60.0, "4096x77 x 8 heads d 40 took {secs:.1} s");
}

#[test]
fn unet_self_attention_1024() {
    // UNet down block 1 at 512x512 (32x32 latent tokens), self-attention: 2 of its 8 heads
    // of 80 (the other heads are the same code; all 8 would take ~4x as long on CI).
    let (_, secs) = run16(Attention::new(1, 2, 1024, 1024, 80, false), 2.0);
    assert!(secs < 60.0, "1024x1024 x 2 heads d 80 took {secs:.1} s");
}

#[test]
fn split_queries() {
    // dk, dv with the query blocks dealt over `splits` workgroups per key block, f32 partials
    // summed by the reduce. UNet cross-attention shape (8 heads of 40 over 77 keys; 256
    // queries = 13 blocks of 20, which neither 2 nor 3 divides), in both gradient dtypes.
    let cross = Attention::new(1, 8, 256, 77, 40, false);
    for (splits, grads) in [(1, DType::F16), (2, DType::F16), (3, DType::F32), (3, DType::F16), (13, DType::F32)] {
        run_split(cross, 2.0, DType::F16, grads, BOUND, Some(splits));
    }
    // Causal (CLIP 77x77, d 64: 3 query blocks of 32; key block 1 sees 2 of them, so with 3
    // splits one workgroup per key block sees none and must write zero partials).
    let clip = Attention::new(1, 4, 77, 77, 64, true);
    run_split(clip, 2.0, DType::F16, DType::F16, BOUND, Some(3));
    run_split(clip, 2.0, DType::F32, DType::F32, BOUND, Some(2));
    // More keys than queries, causal, batch 2: keys past lq get zeros through the reduce.
    run_split(Attention::new(2, 2, 20, 50, 40, true), 1.0, DType::F32, DType::F32, BOUND, Some(2));
    // More splits than query blocks (33 queries = 2 blocks of 20), d 80 and 160.
    run_split(Attention::new(1, 2, 33, 70, 80, false), 2.0, DType::F16, DType::F16, BOUND, Some(5));
    run_split(Attention::new(2, 1, 50, 30, 160, true), 1.0, DType::F16, DType::F32, BOUND, Some(MAX_DKV_SPLITS));
    // Without splits, shapes the launcher would split.
    run_split(Attention::new(1, 2, 70, 33, 80, false), 2.0, DType::F16, DType::F16, BOUND, Some(1));
    run_split(Attention::new(2, 2, 37, 45, 40, false), 2.0, DType::F32, DType::F32, BOUND, Some(1));
}

#[test]
fn split_choice() {
    // The launcher splits the queries where there are too few key blocks to fill a big GPU
    // (about 264 workgroups), not otherwise; the same code picks them on every device.
    let g = gpu();
    let cross = Attention::new(1, 8, 4096, 77, 40, false);
    let s = default_dkv_splits(&cross);
    assert!(s > 1, "4096x77 cross-attention: {s} splits");
    let bw = AttentionBackward::new(g, cross).unwrap();
    assert_eq!(bw.dkv_splits, s);
    assert!(bw.dkv_partials.is_some());
    for (a, splits) in [
        (Attention::new(1, 8, 4096, 4096, 40, false), 1),
        (Attention::new(1, 8, 1024, 1024, 80, false), 1),
        (Attention::new(1, 8, 1024, 77, 80, false), 9),
        (Attention::new(1, 8, 64, 77, 160, false), 5),
        (Attention::new(1, 8, 1, 77, 40, false), 1), // one query block: nothing to split
    ] {
        assert_eq!(default_dkv_splits(&a), splits, "{a:?}");
    }
    // The 4096x77 launch: 4 dispatches, the dk/dv one with >= 264 workgroups.
    let hd = 8 * 40;
    let t = |l: usize, dt| Tensor::from_f32(g, &[1, l, hd], dt, &vec![0.0; l * hd], "x").unwrap();
    let (q, kv) = (t(4096, DType::F16), t(77, DType::F16));
    let (dq, dk, dv) = (t(4096, DType::F16), t(77, DType::F16), t(77, DType::F16));
    let d = |x| Operand::dense(x, hd);
    let grads = AttentionGrads { q: d(&q), k: d(&kv), v: d(&kv), o: d(&q), dout: d(&q), dq: d(&dq), dk: d(&dk), dv: d(&dv) };
    let ds = bw.prepare(g, &grads).unwrap();
    assert_eq!(ds.len(), 4);
    assert_eq!(ds[2].groups[2] as usize, s);
    // The splits come from the scalar tiles' key blocks (51 keys: >= 264 workgroups); the
    // warp-owned kernel takes 128 keys per workgroup, so it gets fewer.
    if !ds[2].label.starts_with("attention_backward_warp.") {
        assert!(ds[2].groups.iter().product::<u32>() >= 264, "{:?}", ds[2].groups);
    }
    assert!(ds[3].bytes > 0.0 && ds[2].flops > 0.0);
    // Forced splits out of range, and a field changed behind the partials' back.
    assert!(AttentionBackward::with_dkv_splits(g, cross, Some(0)).is_err());
    assert!(AttentionBackward::with_dkv_splits(g, cross, Some(MAX_DKV_SPLITS + 1)).is_err());
    let mut bad = AttentionBackward::new(g, cross).unwrap();
    bad.dkv_splits = 1;
    assert!(bad.prepare(g, &grads).is_err(), "splits 1 with partials allocated");
    bad.dkv_splits = s + 1;
    assert!(bad.prepare(g, &grads).is_err(), "splits not matching the partials");
}

#[test]
fn fused_qkv_slices() {
    // q, k, v column slices of one [batch, l, 3·heads·d] tensor; the gradients go to the
    // matching slices of one dqkv tensor (wider by 8 poisoned columns each side), which must
    // stay poisoned outside them.
    let g = gpu();
    let a = Attention::new(2, 3, 45, 45, 16, false);
    let hd = a.heads * a.d;
    let ld = 3 * hd;
    let s = seed("attention backward fused qkv");
    let qkv = input(a.batch * a.lq * ld, 2.0, s);
    let dout = round_f16(&random(a.batch * a.lq * hd, s ^ 3));
    let col = |off: usize| -> Vec<f32> { qkv.chunks(ld).flat_map(|r| r[off..off + hd].to_vec()).collect() };
    let (q, k, v) = (col(0), col(hd), col(2 * hd));
    let [o, rdq, rdk, rdv] = reference(&a, &q, &k, &v, &dout);
    let o: Vec<f32> = o.iter().map(|&x| x as f32).collect();
    let shape = [a.batch, a.lq, hd];
    let t = Tensor::from_f32(g, &[a.batch, a.lq, ld], DType::F16, &qkv, "qkv").unwrap();
    let to = Tensor::from_f32(g, &shape, DType::F16, &o, "o").unwrap();
    let tdo = Tensor::from_f32(g, &shape, DType::F16, &dout, "do").unwrap();
    let ldg = ld + 16;
    let tg = poisoned(&[a.batch, a.lq, ldg], DType::F16);
    // The launcher splits this shape's queries (3 splits): the reduce writes the slices; then
    // again without splits.
    for (path, splits) in paths().into_iter().flat_map(|p| [(p, None), (p, Some(1))]) {
        let a = Attention { path: Some(path), ..a };
        tg.fill_words(g, POISON);
        let bw = AttentionBackward::with_dkv_splits(g, a, splits).unwrap();
        assert_eq!(bw.dkv_splits, splits.unwrap_or(3));
        let grads = AttentionGrads {
            q: Operand::slice(&t, 0, ld),
            k: Operand::slice(&t, hd, ld),
            v: Operand::slice(&t, 2 * hd, ld),
            o: Operand::dense(&to, hd),
            dout: Operand::dense(&tdo, hd),
            dq: Operand::slice(&tg, 8, ldg),
            dk: Operand::slice(&tg, 8 + hd, ldg),
            dv: Operand::slice(&tg, 8 + 2 * hd, ldg),
        };
        let ds = bw.prepare(g, &grads).unwrap();
        check_path(&a, &bw, &ds);
        for d in &ds {
            g.run_now(d).unwrap();
        }
        let out = tg.to_f32(g).unwrap();
        let mut got = [Vec::new(), Vec::new(), Vec::new()];
        for row in out.chunks(ldg) {
            assert!(row[..8].iter().chain(&row[8 + ld..]).all(|x| x.is_nan()), "wrote outside the gradient columns");
            for (i, gi) in got.iter_mut().enumerate() {
                gi.extend_from_slice(&row[8 + i * hd..8 + (i + 1) * hd]);
            }
        }
        for (name, gi, r) in [("dq", &got[0], &rdq), ("dk", &got[1], &rdk), ("dv", &got[2], &rdv)] {
            let e = rel_l2(gi, r);
            eprintln!("fused qkv {path} {name} splits {splits:?}: rel L2 {e:.3e}");
            assert!(e < BOUND, "fused qkv {path} {name} splits {splits:?}: rel L2 {e:.3e} over {BOUND:.0e}");
        }
    }
}

#[test]
fn refuses_bad_shapes() {
    let g = gpu();
    let t = Tensor::from_f32(g, &[2, 16, 64], DType::F16, &vec![0.0; 2 * 16 * 64], "x").unwrap();
    let gq = poisoned(&[2, 16, 64], DType::F16);
    let gk = poisoned(&[2, 16, 64], DType::F16);
    let gv = poisoned(&[2, 16, 64], DType::F32);
    let dense = |x| Operand::dense(x, 64);
    let a = Attention::new(2, 4, 16, 16, 16, false);
    let bw = AttentionBackward::new(g, a).unwrap();
    let ok = AttentionGrads { q: dense(&t), k: dense(&t), v: dense(&t), o: dense(&t), dout: dense(&t), dq: dense(&gq), dk: dense(&gk), dv: dense(&gk) };
    assert!(bw.prepare(g, &ok).is_ok());
    assert!(bw.prepare(g, &AttentionGrads { dv: dense(&gv), ..ok }).is_err(), "dk f16, dv f32");
    assert!(bw.prepare(g, &AttentionGrads { dq: dense(&t), ..ok }).is_err(), "dq in q's buffer");
    assert!(bw.prepare(g, &AttentionGrads { q: dense(&gv), ..ok }).is_err(), "f32 q");
    assert!(bw.prepare(g, &AttentionGrads { k: Operand::slice(&t, 8, 64), ..ok }).is_err(), "k runs past the end");
    assert!(bw.prepare(g, &AttentionGrads { dout: Operand::slice(&t, 4, 64), ..ok }).is_err(), "offset not a multiple of 8");
    for (a, why) in [
        (Attention::new(2, 2, 16, 16, 12, false), "d not a multiple of 8"),
        (Attention::new(1, 1, 16, 16, 520, false), "d over 512"),
        (Attention::new(0, 4, 16, 16, 16, false), "empty batch"),
    ] {
        assert!(AttentionBackward::new(g, a).is_err(), "{why}");
    }
    let long = AttentionBackward::new(g, Attention::new(2, 4, 17, 16, 16, false)).unwrap();
    assert!(long.prepare(g, &ok).is_err(), "q too short");
}

#[test]
fn after_gpu_forward() {
    // As a model's backward runs it: o is what the GPU forward wrote (scalar path, causal
    // CLIP shape and a cross-attention), then the backward.
    let g = gpu();
    for a in [Attention::new(1, 2, 77, 77, 64, true), Attention::new(2, 2, 100, 77, 40, false)] {
        let s = seed(&format!("attention backward after the GPU forward {a:?}"));
        let hd = a.heads * a.d;
        let q = input(a.batch * a.lq * hd, 2.0, s);
        let k = input(a.batch * a.lk * hd, 2.0, s ^ 1);
        let v = input(a.batch * a.lk * hd, 1.0, s ^ 2);
        let dout = round_f16(&random(a.batch * a.lq * hd, s ^ 3));
        let [_, rdq, rdk, rdv] = reference(&a, &q, &k, &v, &dout);
        let up = |x: &[f32], l: usize| Tensor::from_f32(g, &[a.batch, l, hd], DType::F16, x, "input").unwrap();
        let (tq, tk, tv, tdo) = (up(&q, a.lq), up(&k, a.lk), up(&v, a.lk), up(&dout, a.lq));
        let to = poisoned(&[a.batch, a.lq, hd], DType::F16);
        let mut fwd = a;
        fwd.path = Some(atelier::gpu::KernelPath::Scalar);
        let dense = |t| Operand::dense(t, hd);
        g.run_now(&fwd.prepare(g, dense(&tq), dense(&tk), dense(&tv), dense(&to)).unwrap()).unwrap();
        let (tdq, tdk, tdv) = (poisoned(&[a.batch, a.lq, hd], DType::F32), poisoned(&[a.batch, a.lk, hd], DType::F32), poisoned(&[a.batch, a.lk, hd], DType::F32));
        for path in paths() {
            let a = Attention { path: Some(path), ..a };
            for t in [&tdq, &tdk, &tdv] {
                t.fill_words(g, POISON);
            }
            let bw = AttentionBackward::new(g, a).unwrap();
            let grads = AttentionGrads { q: dense(&tq), k: dense(&tk), v: dense(&tv), o: dense(&to), dout: dense(&tdo), dq: dense(&tdq), dk: dense(&tdk), dv: dense(&tdv) };
            let ds = bw.prepare(g, &grads).unwrap();
            check_path(&a, &bw, &ds);
            for d in &ds {
                g.run_now(d).unwrap();
            }
            for (name, t, r) in [("dq", &tdq, &rdq), ("dk", &tdk, &rdk), ("dv", &tdv, &rdv)] {
                let e = rel_l2(&t.to_f32(g).unwrap(), r);
                eprintln!("after the GPU forward {a:?}: {name} rel L2 {e:.3e}");
                assert!(e < BOUND, "after the GPU forward {a:?}: {name} rel L2 {e:.3e} over {BOUND:.0e}");
            }
        }
    }
}

#[test]
fn coop_tiles() {
    // The cooperative-matrix tiles: a tile of each entry fits wgpu's default 48 KiB at every
    // padded head dim up to COOP_MAX_DP (so no d <= 160 falls back to the scalar kernels on a
    // device with the default limit), the sums match the shaders' headers, and the launcher's
    // choice at SD's head dims, with and without subgroup barriers (the warp-owned kernels).
    for dp in (16..=COOP_MAX_DP as u32).step_by(16) {
        for entry in [CoopEntry::Dq, CoopEntry::Dkv] {
            for sb in [false, true] {
                let t = BwdTile::auto(entry, dp, COOP_SHARED_LIMIT, sb).unwrap_or_else(|| panic!("no {entry:?} tile at DP {dp}"));
                assert!(t.shared_bytes(entry, dp) <= COOP_SHARED_LIMIT);
                assert_eq!(t.warp, sb && dp <= WARP_MAX_DP, "{entry:?} at DP {dp}");
            }
        }
    }
    let t = |bq, bk, warps| BwdTile { bq, bk, warps, warp: false };
    let w = |bq, bk, warps| BwdTile { bq, bk, warps, warp: true };
    assert_eq!(t(64, 32, 8).shared_bytes(CoopEntry::Dq, 48), 49152);
    assert_eq!(t(64, 32, 8).shared_bytes(CoopEntry::Dkv, 48), 49152);
    assert_eq!(t(16, 16, 4).shared_bytes(CoopEntry::Dkv, 160), 44544);
    // attention_backward_warp.wgsl's header: W 8, B 32 at DP 48; W 4, B 64 at DP 80.
    assert_eq!(w(128, 32, 8).shared_bytes(CoopEntry::Dq, 48), 35840);
    assert_eq!(w(32, 128, 8).shared_bytes(CoopEntry::Dkv, 48), 35840);
    assert_eq!(w(64, 64, 4).shared_bytes(CoopEntry::Dkv, 80), 49152);
    for (d, dq, dkv) in [
        (40, t(64, 32, 8), t(64, 32, 8)),
        (64, t(32, 32, 4), t(32, 32, 4)),
        (80, t(32, 32, 4), t(32, 16, 4)),
        (160, t(16, 32, 4), t(16, 16, 4)),
    ] {
        let dp = coop_dp(d) as u32;
        assert_eq!(BwdTile::auto(CoopEntry::Dq, dp, COOP_SHARED_LIMIT, false), Some(dq), "dq at d {d}");
        assert_eq!(BwdTile::auto(CoopEntry::Dkv, dp, COOP_SHARED_LIMIT, false), Some(dkv), "dkv at d {d}");
    }
    for (d, dq, dkv) in [(40, w(64, 32, 4), w(32, 128, 8)), (64, w(64, 64, 4), w(64, 64, 4)), (80, w(64, 64, 4), w(64, 64, 4))] {
        let dp = coop_dp(d) as u32;
        assert_eq!(BwdTile::auto(CoopEntry::Dq, dp, COOP_SHARED_LIMIT, true), Some(dq), "dq at d {d}");
        assert_eq!(BwdTile::auto(CoopEntry::Dkv, dp, COOP_SHARED_LIMIT, true), Some(dkv), "dkv at d {d}");
    }
    // A smaller device limit moves to smaller tiles, none at all below the smallest.
    assert_eq!(BwdTile::auto(CoopEntry::Dq, 48, 32 * 1024, false), Some(t(32, 32, 4)));
    assert_eq!(BwdTile::auto(CoopEntry::Dkv, 160, 16 * 1024, true), None);
    // Tiles the warp-owned shader does not take: owned rows not 16 per subgroup, a streamed
    // block other than 32 or 64, a head dim past WARP_MAX_DP.
    assert!(!w(64, 32, 8).valid(CoopEntry::Dq, 48, COOP_SHARED_LIMIT));
    assert!(!w(128, 16, 8).valid(CoopEntry::Dq, 48, COOP_SHARED_LIMIT));
    assert!(!w(128, 32, 8).valid(CoopEntry::Dq, 96, COOP_SHARED_LIMIT));
    // The scalar path is what a device without cooperative matrices (or asked for scalar) gets.
    let g = gpu();
    let scalar = Attention { path: Some(KernelPath::Scalar), ..Attention::new(1, 8, 64, 64, 40, false) };
    assert_eq!(AttentionBackward::new(g, scalar).unwrap().plan(g), (KernelPath::Scalar, None));
    let big = Attention { path: Some(KernelPath::Coop), ..Attention::new(1, 1, 16, 16, 512, false) };
    assert_eq!(AttentionBackward::new(g, big).unwrap().plan(g).0, KernelPath::Scalar, "d 512 is scalar");
}

#[test]
fn every_coop_tile() {
    // Every cooperative-matrix tile of both shaders, forced one entry at a time (the other
    // takes the launcher's choice), at shapes that leave partial blocks both ways: d 40, 64
    // (causal), 80, 160; dk/dv unsplit and split over 3; f16 and f32 gradients. Only where
    // the device has cooperative matrices (the software GPU of CI has none).
    let g = gpu();
    if !g.caps.coop_16x16_f16_f32 {
        eprintln!("no cooperative matrices on this device: every_coop_tile skipped");
        return;
    }
    let limit = g.caps.limits.max_compute_workgroup_storage_size;
    let cases = [
        (Attention::new(1, 2, 150, 170, 40, false), 2.0, DType::F16),
        (Attention::new(2, 2, 77, 77, 64, true), 2.0, DType::F32),
        (Attention::new(1, 2, 130, 77, 80, false), 2.0, DType::F16),
        (Attention::new(1, 1, 50, 30, 160, true), 1.0, DType::F32),
    ];
    let mut seen = std::collections::HashSet::new();
    for (a, amp, grads) in cases {
        let a = Attention { path: Some(KernelPath::Coop), ..a };
        let dp = coop_dp(a.d) as u32;
        let sb = g.caps.subgroup_barrier;
        let (aq, ak) = (BwdTile::auto(CoopEntry::Dq, dp, limit, sb).unwrap(), BwdTile::auto(CoopEntry::Dkv, dp, limit, sb).unwrap());
        for t in BwdTile::ALL {
            for (entry, pair) in [(CoopEntry::Dq, (t, ak)), (CoopEntry::Dkv, (aq, t))] {
                if !t.usable(entry, dp, limit, sb) {
                    continue;
                }
                seen.insert((t.bq, t.bk, t.warps, t.warp, entry == CoopEntry::Dq));
                for splits in [1, 3] {
                    run_path(a, amp, DType::F16, grads, BOUND, Some(splits), Some(pair));
                }
            }
        }
    }
    // Every tile of BwdTile::ALL ran for at least one entry somewhere.
    for t in BwdTile::ALL {
        if !t.warp || g.caps.subgroup_barrier {
            assert!(seen.iter().any(|s| (s.0, s.1, s.2, s.3) == (t.bq, t.bk, t.warps, t.warp)), "{t:?} never ran");
        }
    }
}

#[test]
fn with_saved_lse() {
    // As the UNet's training step runs it: the GPU forward saves lse (on the path under test)
    // into the stats tensor, the backward's first launch (attnb_delta) only adds D, then dq,
    // dk, dv against the reference with the same bound. The saved lse also against what
    // attnb_stats recomputes (to f32 rounding), and D against its D.
    let g = gpu();
    for path in paths() {
        for (a, amp, grad_dt, splits) in [
            (Attention::new(1, 4, 77, 77, 64, true), 2.0, DType::F16, None),   // CLIP causal
            (Attention::new(1, 2, 20, 50, 40, true), 1.0, DType::F32, None),   // causal, more keys
            (Attention::new(2, 2, 100, 77, 40, false), 2.0, DType::F32, None), // cross over 77
            (Attention::new(1, 2, 64, 77, 80, false), 2.0, DType::F16, Some(1)),
            (Attention::new(1, 1, 50, 30, 160, true), 1.0, DType::F16, Some(3)),
            (Attention::new(1, 8, 19, 23, 8, false), 1.0, DType::F16, None),
        ] {
            let a = Attention { path: Some(path), ..a };
            let what = format!("saved lse {a:?} grads {grad_dt:?} splits {splits:?}");
            let s = seed(&what);
            let hd = a.heads * a.d;
            let q = input(a.batch * a.lq * hd, amp, s);
            let k = input(a.batch * a.lk * hd, amp, s ^ 1);
            let v = input(a.batch * a.lk * hd, 1.0, s ^ 2);
            let dout = round_f16(&random(a.batch * a.lq * hd, s ^ 3));
            let [_, rdq, rdk, rdv] = reference(&a, &q, &k, &v, &dout);
            let up = |x: &[f32], l: usize| Tensor::from_f32(g, &[a.batch, l, hd], DType::F16, x, "input").unwrap();
            let (tq, tk, tv, tdo) = (up(&q, a.lq), up(&k, a.lk), up(&v, a.lk), up(&dout, a.lq));
            let to = poisoned(&[a.batch, a.lq, hd], DType::F16);
            let rows = a.batch * a.heads * a.lq;
            let stats = poisoned(&[rows, 2], DType::F32);
            let dense = |t| Operand::dense(t, hd);
            g.run_now(&a.prepare_saving(g, dense(&tq), dense(&tk), dense(&tv), dense(&to), &stats).unwrap()).unwrap();
            let (tdq, tdk, tdv) = (poisoned(&[a.batch, a.lq, hd], grad_dt), poisoned(&[a.batch, a.lk, hd], grad_dt), poisoned(&[a.batch, a.lk, hd], grad_dt));
            let bw = AttentionBackward::for_saved_lse(g, a, splits).unwrap();
            assert!(bw.stats.is_none());
            for t in bw.dkv_partials.iter().flatten() {
                t.fill_words(g, POISON);
            }
            let grads = AttentionGrads { q: dense(&tq), k: dense(&tk), v: dense(&tv), o: dense(&to), dout: dense(&tdo), dq: dense(&tdq), dk: dense(&tdk), dv: dense(&tdv) };
            assert!(bw.prepare(g, &grads).is_err(), "{what}: prepare without statistics");
            let ds = bw.prepare_with_saved_lse(g, &grads, &stats).unwrap();
            check_path(&a, &bw, &ds);
            assert!(ds[0].label.contains("attnb_delta"), "{what}: first launch {}", ds[0].label);
            assert!(ds[0].flops == 0.0 && ds[0].bytes > 0.0, "{what}: delta is memory-bound");
            assert_eq!(ds.len(), if bw.dkv_splits > 1 { 4 } else { 3 }, "{what}: launches");
            for d in &ds {
                g.run_now(d).unwrap();
            }
            for (name, t, r) in [("dq", &tdq, &rdq), ("dk", &tdk, &rdk), ("dv", &tdv, &rdv)] {
                let e = rel_l2(&t.to_f32(g).unwrap(), r);
                eprintln!("{what}: {name} rel L2 {e:.3e}");
                assert!(e < BOUND, "{what}: {name} rel L2 {e:.3e} over {BOUND:.0e}");
            }
            // The same statistics recomputed by attnb_stats (the default backward).
            let own = AttentionBackward::with_dkv_splits(g, a, splits).unwrap();
            own.stats.as_ref().unwrap().fill_words(g, POISON);
            let ds = own.prepare(g, &grads).unwrap();
            assert!(ds[0].label.contains("attnb_stats"), "{}", ds[0].label);
            g.run_now(&ds[0]).unwrap();
            let (saved, recomputed) = (stats.to_f32(g).unwrap(), own.stats.as_ref().unwrap().to_f32(g).unwrap());
            let mut worst = [0.0f64; 2];
            for (row, (x, y)) in saved.chunks(2).zip(recomputed.chunks(2)).enumerate() {
                for c in 0..2 {
                    let e = (x[c] as f64 - y[c] as f64).abs() / (y[c] as f64).abs().max(1.0);
                    // lse: f32 rounding of two different summation orders (2e-5 as
                    // tests/attention.rs); D: the same code on the same data.
                    let bound = [2e-5, 1e-6][c];
                    assert!(e <= bound, "{what}: row {row} col {c}: saved {} recomputed {} (error {e:.2e})", x[c], y[c]);
                    worst[c] = worst[c].max(e);
                }
            }
            eprintln!("{what}: saved vs recomputed: lse {:.2e}, D {:.2e}", worst[0], worst[1]);
        }
    }
    // Refused statistics: wrong dtype, wrong shape, in an operand's buffer.
    let a = Attention::new(2, 4, 16, 16, 16, false);
    let t = Tensor::from_f32(g, &[2, 16, 64], DType::F16, &vec![0.0; 2 * 16 * 64], "x").unwrap();
    let (gq, gk) = (poisoned(&[2, 16, 64], DType::F16), poisoned(&[2, 16, 64], DType::F16));
    let dense = |x| Operand::dense(x, 64);
    let ok = AttentionGrads { q: dense(&t), k: dense(&t), v: dense(&t), o: dense(&t), dout: dense(&t), dq: dense(&gq), dk: dense(&gk), dv: dense(&gk) };
    let bw = AttentionBackward::for_saved_lse(g, a, None).unwrap();
    let rows = 2 * 4 * 16;
    assert!(bw.prepare_with_saved_lse(g, &ok, &poisoned(&[rows, 2], DType::F32)).is_ok());
    assert!(bw.prepare_with_saved_lse(g, &ok, &poisoned(&[rows, 2], DType::F16)).is_err(), "f16 stats");
    assert!(bw.prepare_with_saved_lse(g, &ok, &poisoned(&[rows + 1, 2], DType::F32)).is_err(), "wrong rows");
    for (x, why) in [(&t, "stats in q's buffer"), (&gq, "stats in dq's buffer")] {
        let alias = Tensor { buffer: x.buffer.clone(), offset: 0, shape: vec![rows, 2], dtype: DType::F32 };
        assert!(bw.prepare_with_saved_lse(g, &ok, &alias).is_err(), "{why}");
    }
}
