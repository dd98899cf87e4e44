// lora_skinny.wgsl — the skinny products of a LoRA layer of rank r <= 16 (src/model/lora.rs),
// memory-bound shapes the tiled matmul runs latency-bound: a narrow output [M, r] from a long
// inner dimension, and a rank-r weight gradient summed over many rows.
//
// Layout: row-major, token-major. f16 tensors are read as packed words (unpack2x16float, so no
// shader-f16 is needed) out of array<vec4<u32>> bindings; f32 outputs as u32 words (bitcast).
// Arithmetic is f32. Column slices: A / X may be columns of a wider tensor (row stride lda,
// start element off_a), e.g. one projection's columns of a fused q/k/v gradient.
//
// Stacked adapters (members > 1): the adapters of one fused product (q, k, v, or k, v) that
// read the same input, each of rank r, their output columns G = members equal segments of
// the N (widen, wgrad) or K (narrow) side, seg = N / G (or K / G) columns each; member g
// pairs segment g with its own r columns [g·r, (g+1)·r) of H (or C), whose row holds G·r
// values. With members 0 or 1 every entry is the single-adapter product below.
//
// Entries (RV: override, vec4 groups of the rank, r <= 4·RV):
//   narrow      C [M, r] f16 = alpha · A [M, K] · W, with W stored [r, K] (flag W_T: A·Wᵀ, the
//               forward's h = xd·Aᵀ) or [K, r] (A·W, the backward's dh = dy·B). Workgroup of
//               256 = 8 groups of 32 lanes, each group two rows: 16 rows a workgroup, grid
//               (ceil(M/16)) folded to 2-D. K runs in chunks of 256: each lane first loads its
//               8 elements of the chunk in both rows (one vec4<u32> load when flag VEC says
//               A's rows start 8-aligned; else halves), then the chunk of W is staged in
//               workgroup memory as f32 [256][4·RV] (zero past K and past r; one row an
//               invocation, shared by the 16 rows: with 4 rows a workgroup the staging was
//               most of the time), then the 32 lanes' partial sums are added in lane order
//               into outv. A workgroup's output elements [16·r·blk, 16·r·(blk+1)) start on a
//               word boundary, so each of its invocations t < 8·r writes whole words; halves
//               past M·r are 0 (padding of C's storage). Stacked (W [K, r] only): C [M, G·r] = alpha · A · blockdiag(W_g)
//               with W the members' [seg, r] stacked [K, r] (the backward's dh of each
//               member from its own columns of dy). With flag MSPLIT (r even) grid z is
//               the member: each workgroup reads its member's K/G columns and [K/G, r] of W
//               and writes its r columns (RV covers r); without it (odd r) RV covers G·r
//               and W is staged with zeros off the diagonal blocks (G times the multiply-adds
//               and the K steps: at 256 rows and K 3840 that was 91 us, latency-bound).
//   widen       Y [M, N] f16 (=, or += with flag ACC) alpha · H [M, r] · W, with W stored
//               [N, r] (flag W_T: H·Wᵀ, the forward's y += scale·h·Bᵀ) or [r, N] (H·W, the
//               backward's dx += dh·A); Y may be columns of a wider tensor (row stride lda,
//               start off_out; both even, N even: whole words). Workgroup of 256 = 64 words
//               x 4 row groups of 8 rows; grid (ceil(N/128), ceil(M/32)). Stacked (W_T):
//               column n of member g = n / seg takes H[row, g·r ..] and row n of the
//               members' B stacked [N, r] (the forward's y += scale·h_g·B_gᵀ of each member).
//   wgrad       G += alpha · Σ_rows X[row, n] · H[row, j] for n < N, j < r: X [M, N] f16 (a
//               slice), H [M, r] f16 dense. Output layout [N, r] (index n·r + j: dB) or with
//               OUT_T [r, N] (j·N + n: dA). Workgroup of 64, each invocation one column pair
//               (n, n+1) (one word of X when flag PAIR says the rows start even), rows loaded 4 ahead; grid
//               (ceil(N/128), splits): split s sums rows [s·rps, min((s+1)·rps, M)) in order,
//               H staged 64 rows at a time. With flag DIRECT (one split) it adds alpha·sum
//               into G at off_out; otherwise it writes the raw sums to partials [splits, N·r]
//               (f32, in G's layout) for `wreduce`. Stacked ([N, r] only, G·RV <= 4): H rows
//               of G·r are staged as G slots of RV vec4s, column n of member g = n / seg
//               reads its member's slots (the members' dB stacked [N, r]).
//   wreduce     G[off_out + i] += alpha · Σ_s partials[s·N·r + i] for i < N·r: 64 outputs a
//               workgroup, 4 lanes each summing every 4th split in order, the four sums
//               then added in lane order. Deterministic (fixed order, no atomics).
//   narrow_masked, widen_masked, wgrad_masked: stacked adapters with input dropout, each
//               member's own mask (the hash of lora.wgsl's dropout: element i = row·K + col of
//               the dense input x, the step seed from `hyper`, member g's stream drop_salt +
//               g), applied where x (or the input gradient) meets the member's columns, so
//               the masked copies of x are never stored: narrow_masked is narrow with W_T (h
//               [M, G·r] = [xd_0·A_0ᵀ, xd_1·A_1ᵀ, ..], A's stacked [G·r, K]); wgrad_masked is
//               wgrad with OUT_T (dA [G·r, K] += dhᵀ·xd_g per member's rows); widen_masked is
//               widen without W_T (dx [M, N] += Σ_g mask_g·scale·(dh_g·A_g)). x, dx dense.
// Saves nothing for backward.

struct Params {
    rows: u32,           // M
    k: u32,              // narrow: inner length K; wgrad / wreduce / widen: columns N
    r: u32,              // rank (<= 4·RV)
    flags: u32,          // 1 W_T, 2 VEC, 4 PAIR, 8 OUT_T, 16 DIRECT, 32 ACC
    lda: u32,            // A / X row stride (elements); widen: Y's
    off_a: u32,          // A / X start element
    off_out: u32,        // wgrad (DIRECT) / wreduce: G's start element; widen: Y's
    alpha: f32,
    rows_per_split: u32, // wgrad
    splits: u32,         // wreduce
    numel_out: u32,      // N·r
    members: u32,        // stacked adapters (0 or 1: one)
    // *_masked entries: member g's dropout stream is drop_salt + g, an element dropped when
    // (hash >> 8) < drop_threshold, kept ones times drop_scale = 1 / (1 - p); drop_rank: a
    // member's rank (a multiple of 4, so each vec4 group of the rank is one member's).
    drop_salt: u32,
    drop_threshold: u32,
    drop_scale: f32,
    drop_rank: u32,
}

const W_T: u32 = 1u;
const VEC: u32 = 2u;
const PAIR: u32 = 4u;
const OUT_T: u32 = 8u;
const DIRECT: u32 = 16u;
const ACC: u32 = 32u;
const MSPLIT: u32 = 64u;

override RV: u32 = 1u;

@group(0) @binding(0) var<uniform> p: Params;
// narrow: A; wgrad: X; wreduce: the partials; widen: H.
@group(0) @binding(1) var<storage, read> xa: array<vec4<u32>>;
// narrow: C (f16 words); wgrad: partials or G (f32); wreduce: G; widen: Y (f16 words).
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;
// narrow, widen: W; wgrad: H (wreduce: none).
@group(0) @binding(3) var<storage, read> wb: array<vec4<u32>>;
// *_masked: the step's words (lora.wgsl's `hyper`; 0, 1: the dropout seed).
@group(0) @binding(4) var<storage, read> hyper: array<u32>;

// mix32, stream_key, keep_hash: shaders/dropout_hash.wgsl, appended to this file (the same
// hash as lora.wgsl's dropout, so the masks agree).

// The stream keys of members 0..3 this step (the *_masked entries).
fn member_keys() -> vec4<u32> {
    let s = p.drop_salt;
    return vec4<u32>(stream_key(hyper[0], hyper[1], s), stream_key(hyper[0], hyper[1], s + 1u),
                     stream_key(hyper[0], hyper[1], s + 2u), stream_key(hyper[0], hyper[1], s + 3u));
}

// The key of the member that owns vec4 group v of the rank (masked), for a select chain.
fn group_key(keys: vec4<u32>, v: u32) -> u32 {
    let g = 4u * v / max(p.drop_rank, 1u);
    return select(select(select(keys.x, keys.y, g == 1u), keys.z, g == 2u), keys.w, g == 3u);
}

// x · drop_scale where element i of the stream `key` is kept, else 0 (select: 0, not 0·x).
fn mask4(x: vec4<f32>, i: vec4<u32>, key: u32) -> vec4<f32> {
    let h = vec4<u32>(keep_hash(i.x, key), keep_hash(i.y, key), keep_hash(i.z, key), keep_hash(i.w, key));
    return select(vec4<f32>(0.0), x * p.drop_scale, (h >> vec4<u32>(8u)) >= vec4<u32>(p.drop_threshold));
}

// An octet of x (elements i0 .. i0 + 8) as vec4 group v's member sees it: unchanged without
// masks.
fn group_octet(o: array<vec4<f32>, 2>, masked: bool, keys: vec4<u32>, v: u32, i0: u32) -> array<vec4<f32>, 2> {
    if (!masked) { return o; }
    let key = group_key(keys, v);
    let i = vec4<u32>(i0, i0 + 1u, i0 + 2u, i0 + 3u);
    return array<vec4<f32>, 2>(mask4(o[0], i, key), mask4(o[1], i + vec4<u32>(4u), key));
}

// Narrow: lanes of a row group, rows a workgroup, K chunk; wgrad: rows of H per staging;
// widen: rows an invocation.
const NL: u32 = 32u;
const NR: u32 = 16u;
const KC: u32 = 256u;
const HC: u32 = 64u;
const WROWS: u32 = 8u;

var<workgroup> sh: array<vec4<f32>, 1024>;
var<workgroup> red: array<f32, 256>;
var<workgroup> outv: array<f32, 256>;  // narrow: the workgroup's outputs [NR][16]

fn half_a(e: u32) -> f32 {
    return unpack2x16float(xa[e / 8u][(e / 2u) % 4u])[e & 1u];
}

fn half_w(e: u32) -> f32 {
    return unpack2x16float(wb[e / 8u][(e / 2u) % 4u])[e & 1u];
}

// W's element e when its rank index j is below r, else 0 (e may be out of range then).
fn w_at(j: u32, e: u32) -> f32 {
    if (j < p.r) { return half_w(e); }
    return 0.0;
}

// narrow's W(k, j) stored [K, r] of stacked members without MSPLIT (odd r): column j of
// member j / r is nonzero only in that member's rows (k / seg).
fn w_diag(kk: u32, j: u32) -> f32 {
    let g = j / p.r;
    let seg = p.k / max(p.members, 1u);
    if (g < max(p.members, 1u) && kk / seg == g) { return half_w(kk * p.r + j - g * p.r); }
    return 0.0;
}

// widen's W(j, n) for j = j0 .. j0 + 3 (0 for j ≥ r): stored [N, r] (W_T) or [r, N].
fn wcol4(n: u32, j0: u32, nn: u32) -> vec4<f32> {
    let r = p.r;
    if ((p.flags & W_T) != 0u) {
        let e = n * r + j0;
        return vec4<f32>(w_at(j0, e), w_at(j0 + 1u, e + 1u), w_at(j0 + 2u, e + 2u), w_at(j0 + 3u, e + 3u));
    }
    return vec4<f32>(w_at(j0, j0 * nn + n), w_at(j0 + 1u, (j0 + 1u) * nn + n),
                     w_at(j0 + 2u, (j0 + 2u) * nn + n), w_at(j0 + 3u, (j0 + 3u) * nn + n));
}

// widen's H[row][j0 .. j0 + 3] from the row's start e = row·r (0 for j ≥ r).
fn hrow4(e: u32, j0: u32) -> vec4<f32> {
    var h = vec4<f32>(0.0);
    let r = p.r;
    if (j0 < r) { h.x = half_a(e + j0); }
    if (j0 + 1u < r) { h.y = half_a(e + j0 + 1u); }
    if (j0 + 2u < r) { h.z = half_a(e + j0 + 2u); }
    if (j0 + 3u < r) { h.w = half_a(e + j0 + 3u); }
    return h;
}

// Component i of a (a select chain: no run-time indexing of a private value).
fn comp(a: vec4<f32>, i: u32) -> f32 {
    return select(select(select(a.x, a.y, i == 1u), a.z, i == 2u), a.w, i == 3u);
}

// Σ_c lo[c]·sh[s + 4c] + hi[c]·sh[s + 16 + 4c]: 8 consecutive k of one vec4 group of the
// rank, staged 4 vec4s a k apart.
fn dot8(lo: vec4<f32>, hi: vec4<f32>, s: u32) -> vec4<f32> {
    return lo.x * sh[s] + lo.y * sh[s + 4u] + lo.z * sh[s + 8u] + lo.w * sh[s + 12u]
         + hi.x * sh[s + 16u] + hi.y * sh[s + 20u] + hi.z * sh[s + 24u] + hi.w * sh[s + 28u];
}

// Σ_u x[u]·sh[s + 4u] over 4 staged rows of H.
fn dot4(x: vec4<f32>, s: u32) -> vec4<f32> {
    return x.x * sh[s] + x.y * sh[s + 4u] + x.z * sh[s + 8u] + x.w * sh[s + 12u];
}

// The 8 consecutive elements of A's row at k (zero past K; none for a dead row).
fn a_octet(live: bool, base: u32, k: u32, kk: u32) -> array<vec4<f32>, 2> {
    var lo = vec4<f32>(0.0);
    var hi = vec4<f32>(0.0);
    if (live && k < kk) {
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
    }
    return array<vec4<f32>, 2>(lo, hi);
}

@compute @workgroup_size(256)
fn narrow(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    narrow_body(wg, nwg, lid, false, vec4<u32>());
}

@compute @workgroup_size(256)
fn narrow_masked(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    narrow_body(wg, nwg, lid, true, member_keys());
}

fn narrow_body(wg: vec3<u32>, nwg: vec3<u32>, lid: u32, masked: bool, keys: vec4<u32>) {
    let blk = wg.y * nwg.x + wg.x;
    let lane = lid % NL;
    let grp = lid / NL;
    // This group's two rows (a, b) of the workgroup's NR.
    let row_a = blk * NR + grp * 2u;
    let row_b = row_a + 1u;
    let live_a = row_a < p.rows;
    let live_b = row_b < p.rows;
    // MSPLIT: this workgroup's member g = wg.z, its segment of A's columns and its W.
    let msplit = (p.flags & MSPLIT) != 0u;
    let gm = max(p.members, 1u);
    let g = select(0u, wg.z, msplit);
    let kk = select(p.k, p.k / gm, msplit);
    // Output width: the stacked members' ranks (MSPLIT: the member's).
    let r = select(p.r * gm, p.r, msplit);
    let base_a = p.off_a + row_a * p.lda + g * kk;
    let base_b = base_a + p.lda;
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    var b0 = vec4<f32>(0.0);
    var b1 = vec4<f32>(0.0);
    var b2 = vec4<f32>(0.0);
    var b3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < kk; k0 += KC) {
        // This lane's 8 elements of the chunk in both rows, loaded before W is staged so
        // that the loads' latencies overlap.
        let k = k0 + lane * 8u;
        let xa8 = a_octet(live_a, base_a, k, kk);
        let xb8 = a_octet(live_b, base_b, k, kk);
        workgroupBarrier();
        // Stage W[k0 + lid][0 .. 4·RV) (one row of the chunk an invocation; KC = 256).
        let kw = k0 + lid;
        for (var v = 0u; v < RV; v++) {
            var w = vec4<f32>(0.0);
            let j = 4u * v;
            if (kw < kk) {
                if ((p.flags & W_T) != 0u) {
                    w = vec4<f32>(w_at(j, j * kk + kw), w_at(j + 1u, (j + 1u) * kk + kw),
                                  w_at(j + 2u, (j + 2u) * kk + kw), w_at(j + 3u, (j + 3u) * kk + kw));
                } else if (msplit || gm == 1u) {
                    // One member's W [K, r] (g = 0 for a single adapter).
                    let e = (g * kk + kw) * r + j;
                    w = vec4<f32>(w_at(j, e), w_at(j + 1u, e + 1u), w_at(j + 2u, e + 2u), w_at(j + 3u, e + 3u));
                } else {
                    w = vec4<f32>(w_diag(kw, j), w_diag(kw, j + 1u), w_diag(kw, j + 2u), w_diag(kw, j + 3u));
                }
            }
            sh[lid * 4u + v] = w;
        }
        workgroupBarrier();
        let g = lane * 32u;
        // Masked: element (row, k) of the dense x is row·K + k.
        let ia = row_a * kk + k;
        let ib = ia + kk;
        let xa = group_octet(xa8, masked, keys, 0u, ia);
        let xb = group_octet(xb8, masked, keys, 0u, ib);
        a0 += dot8(xa[0], xa[1], g);
        b0 += dot8(xb[0], xb[1], g);
        if (RV > 1u) {
            let xa = group_octet(xa8, masked, keys, 1u, ia);
            let xb = group_octet(xb8, masked, keys, 1u, ib);
            a1 += dot8(xa[0], xa[1], g + 1u); b1 += dot8(xb[0], xb[1], g + 1u);
        }
        if (RV > 2u) {
            let xa = group_octet(xa8, masked, keys, 2u, ia);
            let xb = group_octet(xb8, masked, keys, 2u, ib);
            a2 += dot8(xa[0], xa[1], g + 2u); b2 += dot8(xb[0], xb[1], g + 2u);
        }
        if (RV > 3u) {
            let xa = group_octet(xa8, masked, keys, 3u, ia);
            let xb = group_octet(xb8, masked, keys, 3u, ib);
            a3 += dot8(xa[0], xa[1], g + 3u); b3 += dot8(xb[0], xb[1], g + 3u);
        }
    }
    // Sum the 32 lanes' partials of each (row, j) in lane order, one row of the pair at a
    // time, into outv [NR][16].
    for (var h = 0u; h < 2u; h++) {
        workgroupBarrier();
        sh[lid * 4u] = select(a0, b0, h == 1u);
        if (RV > 1u) { sh[lid * 4u + 1u] = select(a1, b1, h == 1u); }
        if (RV > 2u) { sh[lid * 4u + 2u] = select(a2, b2, h == 1u); }
        if (RV > 3u) { sh[lid * 4u + 3u] = select(a3, b3, h == 1u); }
        workgroupBarrier();
        if (lid < (256u / NL) * r) {
            let gg = lid / r;
            let j = lid % r;
            var s = 0.0;
            for (var l = 0u; l < NL; l++) {
                s += sh[(gg * NL + l) * 4u + j / 4u][j % 4u];
            }
            outv[(gg * 2u + h) * 16u + j] = s;
        }
    }
    workgroupBarrier();
    if (msplit) {
        // The member's r (even) columns of C's rows of gm·r: word t holds columns j, j + 1.
        if (lid < NR * r / 2u) {
            let e = 2u * lid;
            let rl = e / r;
            let j = e % r;
            let row = blk * NR + rl;
            if (row < p.rows) {
                let o = p.alpha * vec2<f32>(outv[rl * 16u + j], outv[rl * 16u + j + 1u]);
                dst[(row * r * gm + g * r + j) / 2u] = pack2x16float(o);
            }
        }
        return;
    }
    // Output words of this workgroup: elements e0 = NR·r·blk + 2t and e0 + 1 (NR·r is even,
    // so the workgroup's first element starts a word).
    let total = p.rows * r;
    let first = NR * r * blk;
    if (lid < NR * r / 2u) {
        var o = vec2<f32>(0.0);
        for (var h = 0u; h < 2u; h++) {
            let e = 2u * lid + h;
            if (first + e < total) {
                o[h] = p.alpha * outv[(e / r) * 16u + e % r];
            }
        }
        if (first + 2u * lid < total) {
            dst[first / 2u + lid] = pack2x16float(o);
        }
    }
}

// Y[row, n] (=, or += with ACC) alpha · Σ_j H[row, j] · W(j, n): one output word (columns n,
// n + 1) of WROWS consecutive rows an invocation, W's 2·r values held in registers.
@compute @workgroup_size(256)
fn widen(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    widen_body(wg, lid, false, vec4<u32>());
}

@compute @workgroup_size(256)
fn widen_masked(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    widen_body(wg, lid, true, member_keys());
}

// Masked: vec4 group v's share of the pair (columns n, n + 1 of row `row`) under its member's
// mask; unchanged without masks.
fn group_pair(s: vec2<f32>, masked: bool, keys: vec4<u32>, v: u32, i: u32) -> vec2<f32> {
    if (!masked) { return s; }
    let m = mask4(vec4<f32>(s, 0.0, 0.0), vec4<u32>(i, i + 1u, i, i), group_key(keys, v));
    return m.xy;
}

fn widen_body(wg: vec3<u32>, lid: u32, masked: bool, keys: vec4<u32>) {
    let nn = p.k;
    let r = p.r;
    let n = (wg.x * 64u + lid % 64u) * 2u;
    if (n >= nn) { return; }
    let row0 = (wg.y * 4u + lid / 64u) * WROWS;
    // W's values of columns n (p*) and n + 1 (q*), one vec4 per group of the rank.
    let p0 = wcol4(n, 0u, nn);
    let q0 = wcol4(n + 1u, 0u, nn);
    var p1 = vec4<f32>(0.0);
    var q1 = vec4<f32>(0.0);
    var p2 = vec4<f32>(0.0);
    var q2 = vec4<f32>(0.0);
    var p3 = vec4<f32>(0.0);
    var q3 = vec4<f32>(0.0);
    if (RV > 1u) { p1 = wcol4(n, 4u, nn); q1 = wcol4(n + 1u, 4u, nn); }
    if (RV > 2u) { p2 = wcol4(n, 8u, nn); q2 = wcol4(n + 1u, 8u, nn); }
    if (RV > 3u) { p3 = wcol4(n, 12u, nn); q3 = wcol4(n + 1u, 12u, nn); }
    let acc = (p.flags & ACC) != 0u;
    let end = min(row0 + WROWS, p.rows);
    // Stacked: H rows of G·r, this column's member's r values at g·r (n, n + 1: one member).
    let gm = max(p.members, 1u);
    let hoff = (n / (nn / gm)) * r;
    for (var row = row0; row < end; row++) {
        let e = row * r * gm + hoff;
        // Masked (Y dense): element (row, n) of dx is row·N + n.
        let im = row * nn + n;
        let h0 = hrow4(e, 0u);
        var s = group_pair(vec2<f32>(dot(h0, p0), dot(h0, q0)), masked, keys, 0u, im);
        if (RV > 1u) { let h = hrow4(e, 4u); s += group_pair(vec2<f32>(dot(h, p1), dot(h, q1)), masked, keys, 1u, im); }
        if (RV > 2u) { let h = hrow4(e, 8u); s += group_pair(vec2<f32>(dot(h, p2), dot(h, q2)), masked, keys, 2u, im); }
        if (RV > 3u) { let h = hrow4(e, 12u); s += group_pair(vec2<f32>(dot(h, p3), dot(h, q3)), masked, keys, 3u, im); }
        let o = p.off_out + row * p.lda + n;
        var y = p.alpha * s;
        if (acc) { y += unpack2x16float(dst[o / 2u]); }
        dst[o / 2u] = pack2x16float(y);
    }
}

@compute @workgroup_size(64)
fn wgrad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    wgrad_body(wg, lid, false, vec4<u32>());
}

@compute @workgroup_size(64)
fn wgrad_masked(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    wgrad_body(wg, lid, true, member_keys());
}

// Masked: four rows' values of one column of the dense X (first element i, rows N apart)
// under vec4 group v's member's mask; unchanged without masks.
fn group_col(x: vec4<f32>, masked: bool, keys: vec4<u32>, v: u32, i: u32, nn: u32) -> vec4<f32> {
    if (!masked) { return x; }
    return mask4(x, vec4<u32>(i, i + nn, i + 2u * nn, i + 3u * nn), group_key(keys, v));
}

fn wgrad_body(wg: vec3<u32>, lid: u32, masked: bool, keys: vec4<u32>) {
    let nn = p.k;
    let r = p.r;
    let n = (wg.x * 64u + lid) * 2u;
    let live = n < nn;
    let r0 = wg.y * p.rows_per_split;
    let r1 = min(r0 + p.rows_per_split, p.rows);
    // Accumulators of column n (a*) and n + 1 (b*), one vec4 per group of the rank.
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    var b0 = vec4<f32>(0.0);
    var b1 = vec4<f32>(0.0);
    var b2 = vec4<f32>(0.0);
    var b3 = vec4<f32>(0.0);
    // Stacked: G members' H columns staged as G slots of RV vec4s; this column's at gs.
    let gm = max(p.members, 1u);
    let gs = select(0u, (n / (nn / gm)) * RV, live);
    for (var c0 = r0; c0 < r1; c0 += HC) {
        workgroupBarrier();
        // Stage H[c0 + lid][g·r + 4v ..] in slot g·RV + v (HC = the workgroup size), zero
        // past r1 and past each member's r.
        let hr = c0 + lid;
        for (var u = 0u; u < gm * RV; u++) {
            var w = vec4<f32>(0.0);
            if (hr < r1) {
                let j = 4u * (u % RV);
                let e = hr * r * gm + (u / RV) * r + j;
                w = vec4<f32>(w_at(j, e), w_at(j + 1u, e + 1u), w_at(j + 2u, e + 2u), w_at(j + 3u, e + 3u));
            }
            sh[lid * 4u + u] = w;
        }
        workgroupBarrier();
        if (live) {
            let cn = min(HC, r1 - c0);
            // Four rows at a time, their loads issued before the arithmetic; rows past cn
            // read x = 0 (and were staged as zero rows of H).
            for (var i0 = 0u; i0 < cn; i0 += 4u) {
                let x0 = x_pair(c0, i0, cn, n, nn);
                let x1 = x_pair(c0, i0 + 1u, cn, n, nn);
                let x2 = x_pair(c0, i0 + 2u, cn, n, nn);
                let x3 = x_pair(c0, i0 + 3u, cn, n, nn);
                let xa4 = vec4<f32>(x0.x, x1.x, x2.x, x3.x);
                let xb4 = vec4<f32>(x0.y, x1.y, x2.y, x3.y);
                let s = i0 * 4u + gs;
                // Masked (X dense): element (row, n) of x is row·N + n.
                let ix = (c0 + i0) * nn + n;
                a0 += dot4(group_col(xa4, masked, keys, 0u, ix, nn), s);
                b0 += dot4(group_col(xb4, masked, keys, 0u, ix + 1u, nn), s);
                if (RV > 1u) {
                    a1 += dot4(group_col(xa4, masked, keys, 1u, ix, nn), s + 1u);
                    b1 += dot4(group_col(xb4, masked, keys, 1u, ix + 1u, nn), s + 1u);
                }
                if (RV > 2u) {
                    a2 += dot4(group_col(xa4, masked, keys, 2u, ix, nn), s + 2u);
                    b2 += dot4(group_col(xb4, masked, keys, 2u, ix + 1u, nn), s + 2u);
                }
                if (RV > 3u) {
                    a3 += dot4(group_col(xa4, masked, keys, 3u, ix, nn), s + 3u);
                    b3 += dot4(group_col(xb4, masked, keys, 3u, ix + 1u, nn), s + 3u);
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
                let v = j / 4u;
                var a: vec4<f32>;
                if (c == 0u) {
                    a = select(select(select(a0, a1, v == 1u), a2, v == 2u), a3, v == 3u);
                } else {
                    a = select(select(select(b0, b1, v == 1u), b2, v == 2u), b3, v == 3u);
                }
                let s = comp(a, j % 4u);
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

// X's columns n, n + 1 of row c0 + i (0 past cn; column N of an odd N is 0).
fn x_pair(c0: u32, i: u32, cn: u32, n: u32, nn: u32) -> vec2<f32> {
    var x = vec2<f32>(0.0);
    if (i < cn) {
        let e = p.off_a + (c0 + i) * p.lda + n;
        if ((p.flags & PAIR) != 0u) {
            x = unpack2x16float(xa[e / 8u][(e / 2u) % 4u]);
            // Column N (odd N) is another column's or NaN: select, not scale.
            x.y = select(0.0, x.y, n + 1u < nn);
        } else {
            x.x = half_a(e);
            if (n + 1u < nn) { x.y = half_a(e + 1u); }
        }
    }
    return x;
}

@compute @workgroup_size(256)
fn wreduce(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    // 64 outputs a workgroup, 4 lanes each: lane q sums splits q, q + 4, ... in order, then
    // lane 0 adds the four sums in lane order (a fixed order: deterministic).
    let i = (wg.y * nwg.x + wg.x) * 64u + lid % 64u;
    let q0 = lid / 64u;
    var s = 0.0;
    if (i < p.numel_out) {
        for (var q = q0; q < p.splits; q += 4u) {
            let e = q * p.numel_out + i;
            s += bitcast<f32>(xa[e / 4u][e % 4u]);
        }
    }
    red[lid] = s;
    workgroupBarrier();
    if (q0 != 0u || i >= p.numel_out) { return; }
    let t = ((red[lid] + red[lid + 64u]) + red[lid + 128u]) + red[lid + 192u];
    let idx = p.off_out + i;
    dst[idx] = bitcast<u32>(bitcast<f32>(dst[idx]) + p.alpha * t);
}
