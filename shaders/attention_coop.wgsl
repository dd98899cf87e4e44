// attention_coop.wgsl — scaled-dot-product attention o = softmax(q·kᵀ·scale [+ causal
// mask])·v per (batch, head) on cooperative matrices (tensor cores): 16x16x16 tiles, f16
// inputs, f32 accumulators. Flash-attention 2 style: one workgroup owns BQ query rows of one
// (batch, head) and streams the keys through workgroup memory in blocks of BKV, with an online
// softmax (running max m and sum l per row, f32); the score matrix is never materialised.
//
// Same contract as attention.wgsl (read it first): token-major q [batch, lq, heads·d], k and
// v [batch, lk, heads·d], o [batch, lq, heads·d], each as (element offset, row stride);
// offsets, strides and d multiples of 8, so every 8 halves of a row are one aligned 16-byte
// word (q, k, v read as mat2x4<f16>: naga's bitcast cannot make vec4<f16> of vec2<u32>; o
// written as vec4<u32> of packed pairs). Same uniform struct (bq and bk unused here). Causal:
// query i sees keys 0..=i (top-left aligned, as CLIP).
//
// Head dim: DP = d rounded up to 16 (d 40 -> 48), 16 <= DP <= 160 (the launcher keeps larger
// d, e.g. the VAE's 512, on the scalar kernel). Columns d..DP of the shared Q, K and V tiles
// are zero, so they add nothing to q·kᵀ and give output columns that are never written.
// Rows past lq (queries) and lk (keys) are zero-filled; padded keys also get the score NEG.
//
// Dispatch: (ceil(lq / BQ), batch·heads) workgroups of WARPS subgroups of 32 invocations
// (the launcher only takes this path where the subgroup size is 32). Tiles (BQ, BKV, WARPS):
// (32 | 64, 32 | 64, 4 | 8) with R = 32·WARPS/BQ in {2, 4} invocations per softmax row and
// whole score fragments per subgroup; the launcher uses (64, 64, 8) where it fits (DP <= 48:
// d 40) and (32, 32, 4) elsewhere (fastest on the H100, see CoopTile::AUTO in
// src/kernels/attention.rs), where attention_warp.wgsl does not take the shape (DP > 80, or
// a device without subgroup barriers).
// Before the loop: the Q tile [BQ, DP] is staged in skv and each subgroup loads the DP/16 Q
// fragments of its 16-row block into registers, kept for the whole kernel (separate
// variables behind override conditions: a private array indexed at run time would go to
// local memory); the first K tile is requested. Per key block k0 (4 workgroup barriers):
//   1. K tile -> skv from the prefetch registers; this block's V tile requested (global
//      loads into registers, stored a phase later, so their latency hides behind step 2).
//   2. S = Q·Kᵀ (f32) -> ss: the (BQ/16) x (BKV/16) score fragments are split among the
//      subgroups: one 16-row block and NSC column blocks each.
//   3. Next K tile requested; online softmax with plain invocations: R neighbouring lanes
//      per query row take every R-th column (ordered so the 32 lanes of a subgroup hit 32
//      different banks of ss) and combine partial max and sum with subgroupShuffleXor, so
//      they all hold the same m and l. Scores are scaled by scale·log2(e); keys past lk
//      (and, causal, past the query) are masked by select. The reference max m moves only
//      when the block's max passes it by more than LAZY = 8 (FA4's lazy rescale): then
//      l and the row of the running output O in so (f32) are multiplied by
//      alpha = exp2(m - m_new); otherwise P = exp2(s - m) <= 2^8. P is rounded to f16 -> sp
//      and l sums the rounded values (so l matches what the tensor cores multiply). Then
//      the V tile -> skv (every read of K is done).
//   4. O += P·V: the (BQ/16) x (DP/16) output fragments are split among the subgroups; each
//      is loaded from so as the accumulator, multiplied-added over BKV/16 steps and stored
//      back. (An accumulator cannot be scaled per row while opaque; keeping O in workgroup
//      memory makes the rescale of step 3 a plain multiply.)
// Finally each row's invocations write o = O / l as f16. Masked scores become NEG (never
// infinities in the values used); the first block always shows a row key 0, so m leaves NEG
// there.
//
// Workgroup memory (bytes): skv max(BQ, BKV)·(DP + 8)·2, sp BQ·(BKV + 8)·2, ss
// BQ·(BKV + 4)·4, so BQ·(DP + 4)·4 (row pads of 16 bytes keep the fragment loads free of
// bank conflicts and every cooperative stride a multiple of 16 bytes). Within wgpu's default
// limit of 48 KiB: (64, 64) fits DP <= 48 (DP 48: 47104), (64, 32) DP <= 80 (DP 80: 47104),
// (32, 32) DP <= 208 (DP 48: 17408, 64: 20480, 80: 23552, 160: 38912). The launcher
// computes the same sums (CoopTile::shared_bytes) and checks them against the device limit.
// Shared arrays are typed f16 / f32 because naga takes a cooperative load's element type
// from its pointer; strides of coopLoad on skv (vec4<f16>) are in vec4<f16> units, on sp in
// halves, on ss and so in floats.
// Registers: DP/16 <= 10 Q fragments; NLD <= 5 prefetch words of 8 halves for each of K
// and V (BKV·DP/8 <= 5·32·WARPS).
// Saved for backward (override SAVE_LSE, for training; default false): as attention.wgsl,
// lse2 = m + log2(l32) per query row into lse [batch·heads·lq] of vec2 (lse2, 0), written by
// part j = 0 of the row. l32 is a second running sum, of the f32 probabilities before their
// rounding to f16 (l sums the rounded ones, to normalise o like the tensor cores' product),
// rescaled with l: so lse2 is log2 Σ exp2(s) to f32 rounding, as attnb_stats computes it.
// Without SAVE_LSE neither l32 nor the binding is touched (the launcher binds o there).

enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    batch: u32,
    heads: u32,
    lq: u32,
    lk: u32,
    d: u32,         // head dim, multiple of 8, <= DP
    causal: u32,    // 1: query i sees keys 0..=i
    bq: u32,        // unused here (the scalar kernel's tile)
    bk: u32,        // unused here
    ldq: u32,       // row strides, elements
    ldk: u32,
    ldv: u32,
    ldo: u32,
    off_q: u32,     // element offsets of q[0, 0, 0] etc.
    off_k: u32,
    off_v: u32,
    off_o: u32,
    scale: f32,     // 1/sqrt(d) usually; the shader works in log2 units
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<mat2x4<f16>>;
@group(0) @binding(2) var<storage, read> k: array<mat2x4<f16>>;
@group(0) @binding(3) var<storage, read> v: array<mat2x4<f16>>;
@group(0) @binding(4) var<storage, read_write> o: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read_write> lse: array<vec2<f32>>;

const NEG: f32 = -1.0e30;
const LOG2E: f32 = 1.4426950408889634;
const LAZY: f32 = 8.0;         // log2 of the largest probability before the max moves

override BQ: u32 = 32u;        // query rows per workgroup: 32 or 64
override BKV: u32 = 32u;       // keys per block: 32 or 64
override DP: u32 = 48u;        // head dim rounded up to 16: 16 ..= 160
override WARPS: u32 = 4u;      // subgroups of 32 per workgroup: 4 or 8
override SAVE_LSE: bool = false;   // write lse2 per query row (training)
override WG: u32 = WARPS * 32u;

override R: u32 = WG / BQ;               // invocations per softmax row: 2 or 4
override NQF: u32 = DP / 16u;            // Q fragments a subgroup holds (= output column blocks)
override SPR: u32 = WARPS / (BQ / 16u);  // subgroups per 16-row block of S: 1, 2 or 4
override NSC: u32 = BKV / 16u / SPR;     // score column blocks per subgroup
override NLD: u32 = (BKV * DP / 8u + WG - 1u) / WG;   // K or V tile entries per invocation (<= 5)
// Row strides: skv in vec4<f16> units (8 halves of padding), sp in halves (8 of padding), ss
// and so in f32 (4 of padding).
override KLD: u32 = DP / 4u + 2u;
override PLD: u32 = BKV + 8u;
override SLD: u32 = BKV + 4u;
override OLD: u32 = DP + 4u;
override SKV_LEN: u32 = max(BQ, BKV) * KLD;
override SP_LEN: u32 = BQ * PLD;
override SS_LEN: u32 = BQ * SLD;
override SO_LEN: u32 = BQ * OLD;

var<workgroup> skv: array<vec4<f16>, SKV_LEN>;  // Q tile (at the start), then K or V tile [rows, DP]
var<workgroup> sp: array<f16, SP_LEN>;          // probabilities P [BQ, BKV], f16
var<workgroup> ss: array<f32, SS_LEN>;          // scores S [BQ, BKV], f32
var<workgroup> so: array<f32, SO_LEN>;          // running output O [BQ, DP], f32

// naga 30 needs the store in a helper when the matrix is a var (see DESIGN.md).
fn store_s(m: coop_mat16x16<f32, C>, at: u32) {
    coopStoreT(m, &ss[at], SLD);
}
fn store_o(m: coop_mat16x16<f32, C>, at: u32) {
    coopStoreT(m, &so[at], OLD);
}

// Q fragment f (dims 16f..16f+16) of the 16 rows starting at skv row `row`.
fn q_frag(row: u32, f: u32) -> coop_mat16x16<f16, A> {
    return coopLoadT<coop_mat16x16<f16, A>>(&skv[row * KLD + f * 4u], KLD);
}
// Kᵀ fragment: B(i, j) = K[key 16·cb + j][dim 16f + i], i.e. K's rows read column-major.
fn kt_frag(cb: u32, f: u32) -> coop_mat16x16<f16, B> {
    return coopLoad<coop_mat16x16<f16, B>>(&skv[cb * 16u * KLD + f * 4u], KLD);
}

// Rows [0, rows) x octets [0, DP/8) of one operand into skv: row i of the tile is token
// t0 + i of the tensor whose row 0 starts at word `base` (row stride ld words); tokens at or
// past `len` and octets at or past d/8 read as zero. (Used once, for the Q tile.)
fn load_tile(which: u32, rows: u32, t0: u32, len: u32, base: u32, ld: u32, t: u32) {
    let dp8 = DP / 8u;
    for (var i = t; i < rows * dp8; i += WG) {
        put(i, rows, fetch(which, i, rows, t0, len, base, ld));
    }
}

// Entry e (8 halves) of a [rows, DP] tile: row e / (DP/8), octet e % (DP/8). fetch reads it
// from q, k or v (which = 0, 1, 2; zero at tokens >= len and octets >= d/8); put stores it
// in skv. Entries past the tile (the prefetch's spare ones) are neither read nor stored.
fn fetch(which: u32, e: u32, rows: u32, t0: u32, len: u32, base: u32, ld: u32) -> mat2x4<f16> {
    let dp8 = DP / 8u;
    let r = e / dp8;
    let c = e % dp8;
    var w = mat2x4<f16>();
    if (r < rows && t0 + r < len && c < p.d / 8u) {
        let at = base + (t0 + r) * ld + c;
        if (which == 0u) { w = q[at]; } else if (which == 1u) { w = k[at]; } else { w = v[at]; }
    }
    return w;
}
fn put(e: u32, rows: u32, w: mat2x4<f16>) {
    let dp8 = DP / 8u;
    let r = e / dp8;
    let c = e % dp8;
    if (r < rows) {
        skv[r * KLD + 2u * c] = w[0];
        skv[r * KLD + 2u * c + 1u] = w[1];
    }
}

// Column of the softmax's step i (of BKV/R) for part j of a row whose bit 3 is `half`: each
// part takes the columns = j (mod R); within a subgroup the 32 lanes hit 32 different banks
// of ss (SLD = 4 mod 32: rows r and r + 8 share banks, so they take the other half of each
// group of 4 columns first).
fn score_col(i: u32, j: u32, half: u32) -> u32 {
    return (i / (4u / R)) * 4u + (j + R * (i + half)) % 4u;
}

@compute @workgroup_size(WG)
fn attn(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32,
        @builtin(subgroup_id) sid: u32, @builtin(subgroup_invocation_id) lane: u32) {
    let bh = wg.y;
    let b = bh / p.heads;
    let h = bh % p.heads;
    let q0 = wg.x * BQ;
    // Words (8 halves) of row 0 of this (batch, head) in each tensor, and row strides in words.
    let qbase = (p.off_q + b * p.lq * p.ldq + h * p.d) / 8u;
    let kbase = (p.off_k + b * p.lk * p.ldk + h * p.d) / 8u;
    let vbase = (p.off_v + b * p.lk * p.ldv + h * p.d) / 8u;
    let obase = (p.off_o + b * p.lq * p.ldo + h * p.d) / 8u;
    let ldk = p.ldk / 8u;
    let ldv = p.ldv / 8u;
    let sl = p.scale * LOG2E;

    // Q tile into skv, running output to zero.
    load_tile(0u, BQ, q0, p.lq, qbase, p.ldq / 8u, t);
    for (var i = t; i < SO_LEN; i += WG) { so[i] = 0.0; }
    workgroupBarrier();

    // This subgroup's score fragments: row block rb, column blocks cb0 .. cb0 + NSC.
    let rb = sid / SPR;
    let cb0 = (sid % SPR) * NSC;
    var qf0 = q_frag(rb * 16u, 0u);
    var qf1 = qf0; var qf2 = qf0; var qf3 = qf0; var qf4 = qf0;
    var qf5 = qf0; var qf6 = qf0; var qf7 = qf0; var qf8 = qf0; var qf9 = qf0;
    if (NQF > 1u) { qf1 = q_frag(rb * 16u, 1u); }
    if (NQF > 2u) { qf2 = q_frag(rb * 16u, 2u); }
    if (NQF > 3u) { qf3 = q_frag(rb * 16u, 3u); }
    if (NQF > 4u) { qf4 = q_frag(rb * 16u, 4u); }
    if (NQF > 5u) { qf5 = q_frag(rb * 16u, 5u); }
    if (NQF > 6u) { qf6 = q_frag(rb * 16u, 6u); }
    if (NQF > 7u) { qf7 = q_frag(rb * 16u, 7u); }
    if (NQF > 8u) { qf8 = q_frag(rb * 16u, 8u); }
    if (NQF > 9u) { qf9 = q_frag(rb * 16u, 9u); }

    // Softmax role: query row r of the tile, part j of its R invocations (neighbouring lanes
    // of one subgroup, so subgroupShuffleXor with 1 .. R/2 reaches exactly them).
    let tt = sid * 32u + lane;
    let r = tt / R;
    let j = tt % R;
    let half = (r >> 3u) & 1u;
    let qi = q0 + r;
    var m = NEG;
    var l = 0.0;
    var l32 = 0.0;   // SAVE_LSE: the sum of the unrounded probabilities

    // Causal: rows q0 .. q0+BQ-1 see no key past q0+BQ-1; row qi sees keys < vis.
    var kend = p.lk;
    var vis = p.lk;
    if (p.causal != 0u) {
        kend = min(kend, q0 + BQ);
        vis = min(vis, qi + 1u);
    }

    // Prefetch registers: entries t + n·WG (n < NLD) of the next K tile (rk*) and of the
    // current V tile (rv*), loaded a phase before they are stored to skv.
    var rk0 = fetch(1u, t, BKV, 0u, p.lk, kbase, ldk);
    var rk1 = rk0; var rk2 = rk0; var rk3 = rk0; var rk4 = rk0;
    if (NLD > 1u) { rk1 = fetch(1u, t + WG, BKV, 0u, p.lk, kbase, ldk); }
    if (NLD > 2u) { rk2 = fetch(1u, t + 2u * WG, BKV, 0u, p.lk, kbase, ldk); }
    if (NLD > 3u) { rk3 = fetch(1u, t + 3u * WG, BKV, 0u, p.lk, kbase, ldk); }
    if (NLD > 4u) { rk4 = fetch(1u, t + 4u * WG, BKV, 0u, p.lk, kbase, ldk); }
    var rv0 = rk0; var rv1 = rk0; var rv2 = rk0; var rv3 = rk0; var rv4 = rk0;
    workgroupBarrier();   // every Q fragment is loaded: skv takes the first K tile next

    for (var k0 = 0u; k0 < kend; k0 += BKV) {
        // 1. K tile from the registers; V tile requested.
        put(t, BKV, rk0);
        if (NLD > 1u) { put(t + WG, BKV, rk1); }
        if (NLD > 2u) { put(t + 2u * WG, BKV, rk2); }
        if (NLD > 3u) { put(t + 3u * WG, BKV, rk3); }
        if (NLD > 4u) { put(t + 4u * WG, BKV, rk4); }
        rv0 = fetch(2u, t, BKV, k0, p.lk, vbase, ldv);
        if (NLD > 1u) { rv1 = fetch(2u, t + WG, BKV, k0, p.lk, vbase, ldv); }
        if (NLD > 2u) { rv2 = fetch(2u, t + 2u * WG, BKV, k0, p.lk, vbase, ldv); }
        if (NLD > 3u) { rv3 = fetch(2u, t + 3u * WG, BKV, k0, p.lk, vbase, ldv); }
        if (NLD > 4u) { rv4 = fetch(2u, t + 4u * WG, BKV, k0, p.lk, vbase, ldv); }
        workgroupBarrier();

        // 2. S = Q·Kᵀ.
        for (var n = 0u; n < NSC; n++) {
            let cb = cb0 + n;
            var acc = coop_mat16x16<f32, C>();
            acc = coopMultiplyAdd(qf0, kt_frag(cb, 0u), acc);
            if (NQF > 1u) { acc = coopMultiplyAdd(qf1, kt_frag(cb, 1u), acc); }
            if (NQF > 2u) { acc = coopMultiplyAdd(qf2, kt_frag(cb, 2u), acc); }
            if (NQF > 3u) { acc = coopMultiplyAdd(qf3, kt_frag(cb, 3u), acc); }
            if (NQF > 4u) { acc = coopMultiplyAdd(qf4, kt_frag(cb, 4u), acc); }
            if (NQF > 5u) { acc = coopMultiplyAdd(qf5, kt_frag(cb, 5u), acc); }
            if (NQF > 6u) { acc = coopMultiplyAdd(qf6, kt_frag(cb, 6u), acc); }
            if (NQF > 7u) { acc = coopMultiplyAdd(qf7, kt_frag(cb, 7u), acc); }
            if (NQF > 8u) { acc = coopMultiplyAdd(qf8, kt_frag(cb, 8u), acc); }
            if (NQF > 9u) { acc = coopMultiplyAdd(qf9, kt_frag(cb, 9u), acc); }
            store_s(acc, rb * 16u * SLD + cb * 16u);
        }
        workgroupBarrier();

        // 3. Next K tile requested; online softmax of row r; V tile stored (every read of K
        // is done).
        let kn = k0 + BKV;
        if (kn < kend) {
            rk0 = fetch(1u, t, BKV, kn, p.lk, kbase, ldk);
            if (NLD > 1u) { rk1 = fetch(1u, t + WG, BKV, kn, p.lk, kbase, ldk); }
            if (NLD > 2u) { rk2 = fetch(1u, t + 2u * WG, BKV, kn, p.lk, kbase, ldk); }
            if (NLD > 3u) { rk3 = fetch(1u, t + 3u * WG, BKV, kn, p.lk, kbase, ldk); }
            if (NLD > 4u) { rk4 = fetch(1u, t + 4u * WG, BKV, kn, p.lk, kbase, ldk); }
        }
        // Keys k0 + c with c < lim are visible to row r.
        let lim = vis - min(vis, k0);
        let srow = r * SLD;
        var mx = NEG;
        for (var i = 0u; i < BKV / R; i++) {
            let c = score_col(i, j, half);
            mx = max(mx, select(NEG, ss[srow + c] * sl, c < lim));
        }
        for (var x = 1u; x < R; x <<= 1u) { mx = max(mx, subgroupShuffleXor(mx, x)); }
        // The reference max m moves only when the block's max passes it by more than LAZY
        // (always the first time, m = NEG): the probabilities stay <= 2^LAZY (fine in f16 and
        // in f32 sums) and the running output and sum are rescaled in a few blocks only. The
        // R invocations of a row see the same m and mx, so they decide alike.
        if (mx > m + LAZY) {
            let alpha = exp2(m - mx);
            l *= alpha;
            if (SAVE_LSE) { l32 *= alpha; }
            if (m > NEG) {   // so is still zero while m = NEG
                for (var c = j; c < DP; c += R) { so[r * OLD + c] *= alpha; }
            }
            m = mx;
        }
        var sum = 0.0;
        var sum32 = 0.0;
        for (var i = 0u; i < BKV / R; i++) {
            let c = score_col(i, j, half);
            let e = select(0.0, exp2(ss[srow + c] * sl - m), c < lim);
            let ph = f16(e);
            sp[r * PLD + c] = ph;
            sum += f32(ph);
            if (SAVE_LSE) { sum32 += e; }
        }
        for (var x = 1u; x < R; x <<= 1u) { sum += subgroupShuffleXor(sum, x); }
        l += sum;
        if (SAVE_LSE) {
            for (var x = 1u; x < R; x <<= 1u) { sum32 += subgroupShuffleXor(sum32, x); }
            l32 += sum32;
        }
        put(t, BKV, rv0);
        if (NLD > 1u) { put(t + WG, BKV, rv1); }
        if (NLD > 2u) { put(t + 2u * WG, BKV, rv2); }
        if (NLD > 3u) { put(t + 3u * WG, BKV, rv3); }
        if (NLD > 4u) { put(t + 4u * WG, BKV, rv4); }
        workgroupBarrier();

        // 4. O += P·V.
        for (var f = sid; f < (BQ / 16u) * NQF; f += WARPS) {
            let orb = f / NQF;
            let ocb = f % NQF;
            let at = orb * 16u * OLD + ocb * 16u;
            var acc = coopLoadT<coop_mat16x16<f32, C>>(&so[at], OLD);
            for (var kk = 0u; kk < BKV / 16u; kk++) {
                let pa = coopLoadT<coop_mat16x16<f16, A>>(&sp[orb * 16u * PLD + kk * 16u], PLD);
                let vb = coopLoadT<coop_mat16x16<f16, B>>(&skv[kk * 16u * KLD + ocb * 4u], KLD);
                acc = coopMultiplyAdd(pa, vb, acc);
            }
            store_o(acc, at);
        }
        workgroupBarrier();
    }

    // o = O / l, octets j, j + R, .. of row r.
    if (qi < p.lq) {
        let inv = select(0.0, 1.0 / l, l > 0.0);
        let ldo = p.ldo / 8u;
        for (var c = j; c < p.d / 8u; c += R) {
            let at = r * OLD + c * 8u;
            o[obase + qi * ldo + c] = vec4<u32>(
                pack2x16float(vec2<f32>(so[at], so[at + 1u]) * inv),
                pack2x16float(vec2<f32>(so[at + 2u], so[at + 3u]) * inv),
                pack2x16float(vec2<f32>(so[at + 4u], so[at + 5u]) * inv),
                pack2x16float(vec2<f32>(so[at + 6u], so[at + 7u]) * inv));
        }
        if (SAVE_LSE && j == 0u) {
            // As attnb_stats: l32 >= 1 (key 0 is visible to every row).
            lse[bh * p.lq + qi] = vec2<f32>(m + log2(max(l32, 1.0e-30)), 0.0);
        }
    }
}
