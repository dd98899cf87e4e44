// lora_skinny.wgsl — the skinny products of a LoRA layer of rank r <= 16 (src/model/lora.rs),
// memory-bound shapes the tiled matmul runs latency-bound: a narrow output [M, r] from a long
// inner dimension, and a rank-r weight gradient summed over many rows.
//
// Layout: row-major, token-major. f16 tensors are read as packed words (unpack2x16float, so no
// shader-f16 is needed) out of array<vec4<u32>> bindings; f32 outputs as u32 words (bitcast).
// Arithmetic is f32. Column slices: A / X may be columns of a wider tensor (row stride lda,
// start element off_a), e.g. one projection's columns of a fused q/k/v gradient.
//
// Entries (RV: override, vec4 groups of the rank, r <= 4·RV):
//   narrow      C [M, r] f16 = alpha · A [M, K] · W, with W stored [r, K] (flag W_T: A·Wᵀ, the
//               forward's h = xd·Aᵀ) or [K, r] (A·W, the backward's dh = dy·B). Workgroup of
//               128 = 16 rows x 8 lanes; grid (ceil(M/16)) folded to 2-D. K runs in chunks of
//               128: the chunk of W is staged in workgroup memory as f32 [128][4·RV] (zero
//               past K and past r), each lane takes every 8th group of 8 elements of its row
//               (one vec4<u32> load when flag VEC says A's rows start 8-aligned; else halves),
//               then the 8 lanes' partial sums are added in lane order. A workgroup's output
//               elements [16·r·blk, 16·r·(blk+1)) start on a word boundary (16·r is even), so
//               each of its invocations t < 8·r writes whole words; halves past M·r are 0
//               (padding of C's storage).
//   wgrad       G += alpha · Σ_rows X[row, n] · H[row, j] for n < N, j < r: X [M, N] f16 (a
//               slice), H [M, r] f16 dense. Output layout [N, r] (index n·r + j: dB) or with
//               OUT_T [r, N] (j·N + n: dA). Workgroup of 64, each invocation one column pair
//               (n, n+1) (one word of X when flag PAIR says the rows start even); grid
//               (ceil(N/128), splits): split s sums rows [s·rps, min((s+1)·rps, M)) in order,
//               H staged 64 rows at a time. With flag DIRECT (one split) it adds alpha·sum
//               into G at off_out; otherwise it writes the raw sums to partials [splits, N·r]
//               (f32, in G's layout) for `wreduce`.
//   wreduce     one invocation per output element i < N·r: G[off_out + i] += alpha ·
//               Σ_s partials[s·N·r + i], s in order. Deterministic (fixed order, no atomics).
// Saves nothing for backward.

struct Params {
    rows: u32,           // M
    k: u32,              // narrow: inner length K; wgrad / wreduce: columns N
    r: u32,              // rank (<= 4·RV)
    flags: u32,          // 1 W_T, 2 VEC, 4 PAIR, 8 OUT_T, 16 DIRECT
    lda: u32,            // A / X row stride (elements)
    off_a: u32,          // A / X start element
    off_out: u32,        // wgrad (DIRECT) / wreduce: G's start element
    alpha: f32,
    rows_per_split: u32, // wgrad
    splits: u32,         // wreduce
    numel_out: u32,      // N·r
    _pad0: u32,
}

const W_T: u32 = 1u;
const VEC: u32 = 2u;
const PAIR: u32 = 4u;
const OUT_T: u32 = 8u;
const DIRECT: u32 = 16u;

override RV: u32 = 1u;

@group(0) @binding(0) var<uniform> p: Params;
// narrow: A; wgrad: X; wreduce: the partials.
@group(0) @binding(1) var<storage, read> xa: array<vec4<u32>>;
// narrow: C (f16 words); wgrad: partials or G (f32); wreduce: G.
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;
// narrow: W; wgrad: H (wreduce: none).
@group(0) @binding(3) var<storage, read> wb: array<vec4<u32>>;

// Narrow: rows x lanes; wgrad: rows of H per staging.
const NL: u32 = 8u;
const NR: u32 = 16u;
const KC: u32 = 128u;
const HC: u32 = 64u;

var<workgroup> sh: array<vec4<f32>, 512>;

fn half_a(e: u32) -> f32 {
    return unpack2x16float(xa[e / 8u][(e / 2u) % 4u])[e & 1u];
}

fn half_w(e: u32) -> f32 {
    return unpack2x16float(wb[e / 8u][(e / 2u) % 4u])[e & 1u];
}

@compute @workgroup_size(128)
fn narrow(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let blk = wg.y * nwg.x + wg.x;
    let lane = lid % NL;
    let rl = lid / NL;
    let row = blk * NR + rl;
    let live = row < p.rows;
    let kk = p.k;
    let r = p.r;
    let base = p.off_a + row * p.lda;
    var acc: array<vec4<f32>, 4>;
    for (var v = 0u; v < 4u; v++) { acc[v] = vec4<f32>(0.0); }
    for (var k0 = 0u; k0 < kk; k0 += KC) {
        workgroupBarrier();
        // Stage W[k0 + lid][0 .. 4·RV) (KC = the workgroup size).
        let kw = k0 + lid;
        for (var v = 0u; v < RV; v++) {
            var w = vec4<f32>(0.0);
            for (var c = 0u; c < 4u; c++) {
                let j = 4u * v + c;
                if (kw < kk && j < r) {
                    var e: u32;
                    if ((p.flags & W_T) != 0u) { e = j * kk + kw; } else { e = kw * r + j; }
                    w[c] = half_w(e);
                }
            }
            sh[lid * 4u + v] = w;
        }
        workgroupBarrier();
        if (live) {
            let kc = min(KC, kk - k0);
            for (var g = lane * 8u; g < kc; g += NL * 8u) {
                let k = k0 + g;
                var lo = vec4<f32>(0.0);
                var hi = vec4<f32>(0.0);
                if ((p.flags & VEC) != 0u) {
                    let q = xa[(base + k) / 8u];
                    lo = vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y));
                    hi = vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w));
                    // Past K the halves may be another column's or NaN: select, not scale.
                    if (k + 8u > kk) {
                        let i = vec4<u32>(k, k + 1u, k + 2u, k + 3u);
                        lo = select(vec4<f32>(0.0), lo, i < vec4<u32>(kk));
                        hi = select(vec4<f32>(0.0), hi, i + vec4<u32>(4u) < vec4<u32>(kk));
                    }
                } else {
                    for (var c = 0u; c < 4u; c++) {
                        if (k + c < kk) { lo[c] = half_a(base + k + c); }
                        if (k + 4u + c < kk) { hi[c] = half_a(base + k + 4u + c); }
                    }
                }
                for (var c = 0u; c < 4u; c++) {
                    let s0 = (g + c) * 4u;
                    let s1 = (g + 4u + c) * 4u;
                    for (var v = 0u; v < RV; v++) {
                        acc[v] += lo[c] * sh[s0 + v] + hi[c] * sh[s1 + v];
                    }
                }
            }
        }
    }
    workgroupBarrier();
    for (var v = 0u; v < RV; v++) {
        sh[lid * 4u + v] = acc[v];
    }
    workgroupBarrier();
    // Output words of this workgroup: elements e0 = 16·r·blk + 2t and e0 + 1.
    let total = p.rows * r;
    let first = NR * r * blk;
    if (lid < 8u * r) {
        var o = vec2<f32>(0.0);
        for (var h = 0u; h < 2u; h++) {
            let e = 2u * lid + h;
            if (first + e < total) {
                let rr = e / r;
                let j = e % r;
                var s = 0.0;
                for (var l = 0u; l < NL; l++) {
                    s += sh[(rr * NL + l) * 4u + j / 4u][j % 4u];
                }
                o[h] = p.alpha * s;
            }
        }
        if (first + 2u * lid < total) {
            dst[first / 2u + lid] = pack2x16float(o);
        }
    }
}

@compute @workgroup_size(64)
fn wgrad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let nn = p.k;
    let r = p.r;
    let n = (wg.x * 64u + lid) * 2u;
    let live = n < nn;
    let r0 = wg.y * p.rows_per_split;
    let r1 = min(r0 + p.rows_per_split, p.rows);
    var a0: array<vec4<f32>, 4>;
    var a1: array<vec4<f32>, 4>;
    for (var v = 0u; v < 4u; v++) {
        a0[v] = vec4<f32>(0.0);
        a1[v] = vec4<f32>(0.0);
    }
    for (var c0 = r0; c0 < r1; c0 += HC) {
        workgroupBarrier();
        // Stage H[c0 + lid][0 .. 4·RV) (HC = the workgroup size).
        let hr = c0 + lid;
        for (var v = 0u; v < RV; v++) {
            var w = vec4<f32>(0.0);
            for (var c = 0u; c < 4u; c++) {
                let j = 4u * v + c;
                if (hr < r1 && j < r) { w[c] = half_w(hr * r + j); }
            }
            sh[lid * 4u + v] = w;
        }
        workgroupBarrier();
        if (live) {
            let cn = min(HC, r1 - c0);
            for (var i = 0u; i < cn; i++) {
                let e = p.off_a + (c0 + i) * p.lda + n;
                var x = vec2<f32>(0.0);
                if ((p.flags & PAIR) != 0u) {
                    x = unpack2x16float(xa[e / 8u][(e / 2u) % 4u]);
                    // Column N (odd N) is another column's or NaN: select, not scale.
                    x.y = select(0.0, x.y, n + 1u < nn);
                } else {
                    x.x = half_a(e);
                    if (n + 1u < nn) { x.y = half_a(e + 1u); }
                }
                for (var v = 0u; v < RV; v++) {
                    let h = sh[i * 4u + v];
                    a0[v] += x.x * h;
                    a1[v] += x.y * h;
                }
            }
        }
    }
    if (!live) { return; }
    let direct = (p.flags & DIRECT) != 0u;
    let out_t = (p.flags & OUT_T) != 0u;
    let base = select(wg.y * p.numel_out, p.off_out, direct);
    for (var c = 0u; c < 2u; c++) {
        let col = n + c;
        if (col < nn) {
            for (var j = 0u; j < r; j++) {
                var s: f32;
                if (c == 0u) { s = a0[j / 4u][j % 4u]; } else { s = a1[j / 4u][j % 4u]; }
                let idx = base + select(col * r + j, j * nn + col, out_t);
                if (direct) {
                    dst[idx] = bitcast<u32>(bitcast<f32>(dst[idx]) + p.alpha * s);
                } else {
                    dst[idx] = bitcast<u32>(s);
                }
            }
        }
    }
}

@compute @workgroup_size(256)
fn wreduce(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = (wg.y * nwg.x + wg.x) * 256u + lid;
    if (i >= p.numel_out) { return; }
    var s = 0.0;
    for (var q = 0u; q < p.splits; q++) {
        let e = q * p.numel_out + i;
        s += bitcast<f32>(xa[e / 4u][e % 4u]);
    }
    let idx = p.off_out + i;
    dst[idx] = bitcast<u32>(bitcast<f32>(dst[idx]) + p.alpha * s);
}
