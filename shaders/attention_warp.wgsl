// attention_warp.wgsl — scaled-dot-product attention o = softmax(q·kᵀ·scale [+ causal mask])·v
// per (batch, head) on cooperative matrices (16x16x16, f16 inputs, f32 accumulators), with
// every subgroup owning 16 query rows for the whole kernel (FlashAttention-2's split, as
// attention_backward_warp.wgsl): its Q fragments and its f32 output accumulators O stay in
// registers, and its score block lives in a slice of workgroup memory only it touches, so
// the steps inside a key block synchronise with subgroupBarrier; workgroupBarrier is left
// around the swaps of the K and V tiles the workgroup shares. For padded head dims up to 80
// (SD's d 40 and 80, CLIP's 64); attention_coop.wgsl keeps d 160.
//
// Same contract as attention.wgsl and attention_coop.wgsl (read them first): token-major q
// [batch, lq, heads·d], k and v [batch, lk, heads·d], o [batch, lq, heads·d], each as
// (element offset, row stride), offsets, strides and d multiples of 8 (q, k, v read as
// mat2x4<f16> words of 8 halves, o written as vec4<u32> of packed pairs); the same uniform
// struct (bq and bk informative only) and bindings; lse as attention_coop.wgsl (below).
// Causal: query i sees keys 0..=i (top-left aligned, as CLIP).
//
// Head dim: DP = d rounded up to 16, 16 <= DP <= 80: NQF = DP/16 <= 5 Q fragments and as many
// O accumulators, each in its own variable behind override conditions (WGSL has no arrays of
// cooperative matrices, and a private array indexed at run time would go to local memory).
// Columns d..DP of the staged tiles are zero, rows past lq and lk too; padded keys (and,
// causal, keys past the query) get the score NEG.
//
// Dispatch: (ceil(lq / BQ), batch·heads) workgroups of WARPS subgroups of 32 invocations,
// BQ = 16·WARPS; subgroup s owns queries q0 + 16s .. +16. Before the loop the Q tile is staged
// through sk in passes of BKV rows, each subgroup taking its NQF fragments, and the first K
// and V tiles are requested. Per key block k0 (causal: up to the workgroup's last query):
//   all: K, V tiles [BKV, DP] from the prefetch registers -> sk, sv; workgroupBarrier; the
//     next block's K and V requested (global loads into registers, stored next block, so
//     their latency hides behind this block's products)
//   S = Q·Kᵀ [16, BKV] (f32) -> its ss slice; subgroupBarrier
//   lanes: online softmax of the slice, lane pair r owning row r, lane j of it every other
//     column (ordered so the 32 lanes hit 32 different banks), read once into registers;
//     scores scaled by scale·log2(e), masked by select only in blocks that reach past the
//     row's last visible key. As attention_coop.wgsl: the reference max m moves
//     only when the block's max passes it by more than LAZY = 8 (then l, l32 and the row of
//     O are multiplied by alpha = exp2(m - m_new)), so P = exp2(s - m) <= 2^8; P rounded to
//     f16 -> its sp slice, l summing the rounded values; subgroupBarrier
//   rescale (rare): an opaque accumulator cannot be scaled per row, so when any row of the
//     subgroup moved its max in this block (and not for the first time: O is still zero
//     then), each O fragment goes through the ss slice (coopStore, its rows times alpha,
//     coopLoad back)
//   O += P·V (P from the sp slice, V from sv); workgroupBarrier (sk, sv are refilled next)
// Finally o = O / l, one fragment at a time through the ss slice: lane pair r writes row r,
// lane j of it columns 16f + 8j .. +8 (those below d).
//
// Why this rescale (option a) and not the others: with the lazy rule a row's max moves by
// more than 2^8 after its first block only when a later key outscores every earlier one by
// that much, which real attention rows almost never do, so in practice the round trip of
// the option never runs and O stays in registers; storing and reloading O every block
// (option b, what attention_coop.wgsl does through so) costs NQF coopStore/coopLoad pairs a
// block for nothing; a first pass for the exact row max and sum (option c) redoes Q·Kᵀ
// (1.5x its flops, 1.25x the kernel's) and streams K twice. The branch is taken by the whole
// subgroup or none (its condition is a subgroupAny), which is what cooperative operations
// and subgroupBarrier need (uniform within the subgroup). naga 30's uniformity analysis
// treats every subgroup operation's result as non-uniform and rejects a coopLoad written
// directly under that branch ("Expression .. requires uniformity, but control flow is
// not uniform"); it checks only expressions emitted in the function itself, not the calls
// it makes, so the round trip lives in a helper (`rescaled`), as the backward's subgroup-owned
// fragment loads do (their branch depends on subgroup_id).
//
// Workgroup memory (bytes), with W = WARPS and B = BKV: two f16 tiles [B, DP + 8] (4·B·(DP + 8))
// and per subgroup an f32 slice [16, B + 4] and an f16 slice [16, B + 8]: W·16·(4·(B + 4) +
// 2·(B + 8)) — the sums of attention_backward_warp.wgsl. W 4, B 32 at DP 48: 7168 + 14336 =
// 21504, at DP 80: 25600; W 4, B 64 at DP 80: 22528 + 26624 = 49152 (48 KiB); W 8, B 32 at
// DP 80: 11264 + 28672 = 39936; W 8, B 64 never fits. The launcher (CoopTile::shared_bytes
// in src/kernels/attention.rs) computes the same sums. The row pads keep the softmax's
// lanes on different banks and every cooperative stride a multiple of 16 bytes. Shared
// arrays are typed f16 / f32 because naga takes a cooperative load's element type from its
// pointer; strides on sk and sv (vec4<f16>) are in vec4<f16> units, on sp in halves, on ss
// in floats.
// Registers per invocation: NQF <= 5 f16 Q fragments (4 words each), NQF f32 accumulators
// (8 words each), NLD <= 5 prefetch words of 8 halves (4 registers) for each of K and V
// (BKV·DP/8 <= 5·32·W: 40 registers at W 4, B 64, DP 80; 12 at W 4, B 32, DP 48): about 100
// at most with the S accumulator and operands in flight, and the softmax's BKV/2 scores
// (16 at B 32). Reading the slice once into registers instead of twice (the max, then exp2),
// with the lane's columns as two bases plus constants and no mask in full blocks, took the
// d 40 self-attention from 0.86 to 0.61 ms on the H100 (session 14; docs/PERF.md).
// Saved for backward (override SAVE_LSE, for training; default false): as attention_coop.wgsl,
// lse2 = m + log2(l32) per query row into lse [batch·heads·lq] of vec2 (lse2, 0), written by
// lane j = 0 of the row's pair. l32 is a second running sum, of the f32 probabilities before
// their rounding to f16 (l sums the rounded ones, to normalise o like the tensor cores'
// product), rescaled with l: so lse2 is log2 Σ exp2(s) to f32 rounding, as attnb_stats
// computes it. Without SAVE_LSE neither l32 nor the binding is touched (the launcher binds o
// there).
// Needs subgroups of 32 and subgroupBarrier (wgpu's SUBGROUP_BARRIER): the launcher takes this
// path only where the device offers both.

enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    batch: u32,
    heads: u32,
    lq: u32,
    lk: u32,
    d: u32,         // head dim, multiple of 8, <= DP
    causal: u32,    // 1: query i sees keys 0..=i
    bq: u32,        // the tile (informative; the shader uses its overrides)
    bk: u32,
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

override BKV: u32 = 32u;       // keys per block: 32 or 64
override DP: u32 = 48u;        // head dim rounded up to 16: 16 ..= 80
override WARPS: u32 = 4u;      // subgroups of 32 per workgroup: 4 or 8
override SAVE_LSE: bool = false;   // write lse2 per query row (training)
override WG_SYNC: bool = false;    // sync the subgroup steps with workgroupBarrier (for measuring)
override WG: u32 = WARPS * 32u;
override BQ: u32 = 16u * WARPS;          // query rows per workgroup
override NQF: u32 = DP / 16u;            // Q fragments (= O accumulators) per subgroup, <= 5
override NKB: u32 = BKV / 16u;           // fragments along a key block
override NLD: u32 = (BKV * DP / 8u + WG - 1u) / WG;   // K or V tile words per invocation (<= 5)
// Row strides: tiles in vec4<f16> units (8 halves of padding), the f32 slices in floats (4 of
// padding), the f16 slices in halves (8 of padding).
override KLD: u32 = DP / 4u + 2u;
override SLD: u32 = BKV + 4u;
override PLD: u32 = BKV + 8u;
override T_LEN: u32 = BKV * KLD;
override SS_LEN: u32 = WARPS * 16u * SLD;
override SP_LEN: u32 = WARPS * 16u * PLD;

var<workgroup> sk: array<vec4<f16>, T_LEN>;   // Q tile (passes at the start), then K tile [BKV, DP]
var<workgroup> sv: array<vec4<f16>, T_LEN>;   // V tile [BKV, DP]
var<workgroup> ss: array<f32, SS_LEN>;        // per subgroup: S [16, BKV] (f32), O on its way
var<workgroup> sp: array<f16, SP_LEN>;        // per subgroup: P [16, BKV] (f16)

// Orders one subgroup's workgroup-memory writes before its other lanes' reads (and its reads
// before later writes). WG_SYNC takes a workgroup barrier instead (to measure what the
// subgroup barriers save; every subgroup runs the same steps, so both are correct). Not for
// the rescale, whose branch is uniform within a subgroup only.
fn sync_sub() {
    if (WG_SYNC) { workgroupBarrier(); } else { subgroupBarrier(); }
}

// naga 30 needs the store in a helper when the matrix is a var (see DESIGN.md).
fn store_s(m: coop_mat16x16<f32, C>, at: u32) {
    coopStoreT(m, &ss[at], SLD);
}

// Q fragment f (dims 16f .. 16f + 16) of the 16 rows starting at sk row `row`.
fn q_frag(row: u32, f: u32) -> coop_mat16x16<f16, A> {
    return coopLoadT<coop_mat16x16<f16, A>>(&sk[row * KLD + f * 4u], KLD);
}
// Kᵀ fragment: B(i, j) = K[key 16·cb + j][dim 16f + i], i.e. K's rows read column-major.
fn kt_frag(cb: u32, f: u32) -> coop_mat16x16<f16, B> {
    return coopLoad<coop_mat16x16<f16, B>>(&sk[cb * 16u * KLD + f * 4u], KLD);
}
// V rows 16kc .. +16, dims 16f .. +16 as a B operand (row-major).
fn v_frag(kc: u32, f: u32) -> coop_mat16x16<f16, B> {
    return coopLoadT<coop_mat16x16<f16, B>>(&sv[kc * 16u * KLD + f * 4u], KLD);
}
// Columns 16kc .. +16 of a subgroup's P slice (starting at `base`) as an A operand.
fn p_frag(base: u32, kc: u32) -> coop_mat16x16<f16, A> {
    return coopLoadT<coop_mat16x16<f16, A>>(&sp[base + kc * 16u], PLD);
}

// Entry e (8 halves) of a [BKV, DP] tile: row e / (DP/8), octet e % (DP/8). fetch reads it
// from q, k or v (which = 0, 1, 2): token t0 + row of the tensor whose row 0 starts at word
// `base` (row stride ld words), zero at tokens >= len and octets >= d/8; put_k and put_v store
// it in sk or sv. Entries past the tile (the prefetch's spare ones) are neither read nor
// stored.
fn fetch(which: u32, e: u32, t0: u32, len: u32, base: u32, ld: u32) -> mat2x4<f16> {
    let dp8 = DP / 8u;
    let r = e / dp8;
    let c = e % dp8;
    var w = mat2x4<f16>();
    if (r < BKV && t0 + r < len && c < p.d / 8u) {
        let at = base + (t0 + r) * ld + c;
        if (which == 0u) { w = q[at]; } else if (which == 1u) { w = k[at]; } else { w = v[at]; }
    }
    return w;
}
fn put_k(e: u32, w: mat2x4<f16>) {
    let dp8 = DP / 8u;
    let r = e / dp8;
    let c = e % dp8;
    if (r < BKV) {
        sk[r * KLD + 2u * c] = w[0];
        sk[r * KLD + 2u * c + 1u] = w[1];
    }
}
fn put_v(e: u32, w: mat2x4<f16>) {
    let dp8 = DP / 8u;
    let r = e / dp8;
    let c = e % dp8;
    if (r < BKV) {
        sv[r * KLD + 2u * c] = w[0];
        sv[r * KLD + 2u * c + 1u] = w[1];
    }
}

// Column of the softmax's step i (of BKV/2) for a lane whose columns in each group of 4 are
// c0 (even steps) and c1 (odd steps): lane j of a row pair takes columns = j (mod 2); SLD = 4
// (mod 32), so rows r and r + 8 share banks and take the other half of each group of 4 first
// (attention_coop.wgsl's score_col at R = 2): c0 = (j + 2·(r / 8 % 2)) % 4, c1 = (c0 + 2) % 4.
// Computed from c0 and c1 so that, with the step loops unrolled, each column is one of two
// lane bases plus a constant.
fn score_col(i: u32, c0: u32, c1: u32) -> u32 {
    return (i / 2u) * 4u + select(c0, c1, (i & 1u) == 1u);
}

// The accumulator `acc` with row r multiplied by the alpha of lane pair r, through the
// subgroup's ss slice (at `sbase`; free between the softmax and the next block's S). Called
// by the whole subgroup or none of it: the cooperative operations and subgroup barriers need
// no more (see the header on why this is a function).
fn rescaled(acc: coop_mat16x16<f32, C>, sbase: u32, lane: u32, alpha: f32) -> coop_mat16x16<f32, C> {
    coopStoreT(acc, &ss[sbase], SLD);
    subgroupBarrier();
    let at = sbase + (lane / 2u) * SLD + 8u * (lane % 2u);
    for (var c = 0u; c < 8u; c++) {
        ss[at + c] *= alpha;
    }
    subgroupBarrier();
    let res = coopLoadT<coop_mat16x16<f32, C>>(&ss[sbase], SLD);
    subgroupBarrier();   // every lane's share of the load is done before the slice is rewritten
    return res;
}

@compute @workgroup_size(WG)
fn attn(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32,
        @builtin(subgroup_id) sid: u32, @builtin(subgroup_invocation_id) lane: u32) {
    let bh = wg.y;
    let b = bh / p.heads;
    let h = bh % p.heads;
    let q0 = wg.x * BQ;                 // the workgroup's first query
    let qw = q0 + 16u * sid;            // this subgroup's first query
    // Words (8 halves) of row 0 of this (batch, head) in each tensor, and row strides in words.
    let qbase = (p.off_q + b * p.lq * p.ldq + h * p.d) / 8u;
    let kbase = (p.off_k + b * p.lk * p.ldk + h * p.d) / 8u;
    let vbase = (p.off_v + b * p.lk * p.ldv + h * p.d) / 8u;
    let obase = (p.off_o + b * p.lq * p.ldo + h * p.d) / 8u;
    let ldq = p.ldq / 8u;
    let ldk = p.ldk / 8u;
    let ldv = p.ldv / 8u;
    let sl = p.scale * LOG2E;
    let sbase = sid * 16u * SLD;
    let pbase = sid * 16u * PLD;

    // Causal: rows q0 .. q0+BQ-1 see no key past q0+BQ-1.
    var kend = p.lk;
    if (p.causal != 0u) { kend = min(kend, q0 + BQ); }

    // Prefetch registers: entries t + n·WG (n < NLD) of the next K and V tiles, requested a
    // block before they are stored (the first ones before Q is staged).
    var rk0 = fetch(1u, t, 0u, p.lk, kbase, ldk);
    var rk1 = rk0; var rk2 = rk0; var rk3 = rk0; var rk4 = rk0;
    if (NLD > 1u) { rk1 = fetch(1u, t + WG, 0u, p.lk, kbase, ldk); }
    if (NLD > 2u) { rk2 = fetch(1u, t + 2u * WG, 0u, p.lk, kbase, ldk); }
    if (NLD > 3u) { rk3 = fetch(1u, t + 3u * WG, 0u, p.lk, kbase, ldk); }
    if (NLD > 4u) { rk4 = fetch(1u, t + 4u * WG, 0u, p.lk, kbase, ldk); }
    var rv0 = fetch(2u, t, 0u, p.lk, vbase, ldv);
    var rv1 = rv0; var rv2 = rv0; var rv3 = rv0; var rv4 = rv0;
    if (NLD > 1u) { rv1 = fetch(2u, t + WG, 0u, p.lk, vbase, ldv); }
    if (NLD > 2u) { rv2 = fetch(2u, t + 2u * WG, 0u, p.lk, vbase, ldv); }
    if (NLD > 3u) { rv3 = fetch(2u, t + 3u * WG, 0u, p.lk, vbase, ldv); }
    if (NLD > 4u) { rv4 = fetch(2u, t + 4u * WG, 0u, p.lk, vbase, ldv); }

    // Q fragments of this subgroup's rows, staged through sk in passes of BKV rows.
    var qf0 = coop_mat16x16<f16, A>(); var qf1 = qf0; var qf2 = qf0; var qf3 = qf0; var qf4 = qf0;
    for (var s0 = 0u; s0 < BQ; s0 += BKV) {
        for (var e = t; e < BKV * (DP / 8u); e += WG) {
            put_k(e, fetch(0u, e, q0 + s0, p.lq, qbase, ldq));
        }
        workgroupBarrier();
        if (16u * sid >= s0 && 16u * sid < s0 + BKV) {
            let row = 16u * sid - s0;
            qf0 = q_frag(row, 0u);
            if (NQF > 1u) { qf1 = q_frag(row, 1u); }
            if (NQF > 2u) { qf2 = q_frag(row, 2u); }
            if (NQF > 3u) { qf3 = q_frag(row, 3u); }
            if (NQF > 4u) { qf4 = q_frag(row, 4u); }
        }
        workgroupBarrier();   // every Q fragment of the pass is loaded: sk is rewritten next
    }
    var o0 = coop_mat16x16<f32, C>(); var o1 = o0; var o2 = o0; var o3 = o0; var o4 = o0;

    // Softmax role: lane pair r owns row r (query qi), lane j of it the columns score_col(.., c0, c1).
    let r = lane / 2u;
    let j = lane % 2u;
    let c0 = (j + 2u * ((r >> 3u) & 1u)) % 4u;   // see score_col
    let c1 = (c0 + 2u) % 4u;
    let qi = qw + r;
    var vis = p.lk;                     // row r sees keys < vis
    if (p.causal != 0u) { vis = min(vis, qi + 1u); }
    var m = NEG;
    var l = 0.0;
    var l32 = 0.0;   // SAVE_LSE: the sum of the unrounded probabilities

    for (var k0 = 0u; k0 < kend; k0 += BKV) {
        // K and V tiles from the registers; the next ones requested.
        put_k(t, rk0);
        put_v(t, rv0);
        if (NLD > 1u) { put_k(t + WG, rk1); put_v(t + WG, rv1); }
        if (NLD > 2u) { put_k(t + 2u * WG, rk2); put_v(t + 2u * WG, rv2); }
        if (NLD > 3u) { put_k(t + 3u * WG, rk3); put_v(t + 3u * WG, rv3); }
        if (NLD > 4u) { put_k(t + 4u * WG, rk4); put_v(t + 4u * WG, rv4); }
        workgroupBarrier();
        let kn = k0 + BKV;
        if (kn < kend) {
            rk0 = fetch(1u, t, kn, p.lk, kbase, ldk);
            rv0 = fetch(2u, t, kn, p.lk, vbase, ldv);
            if (NLD > 1u) { rk1 = fetch(1u, t + WG, kn, p.lk, kbase, ldk); rv1 = fetch(2u, t + WG, kn, p.lk, vbase, ldv); }
            if (NLD > 2u) { rk2 = fetch(1u, t + 2u * WG, kn, p.lk, kbase, ldk); rv2 = fetch(2u, t + 2u * WG, kn, p.lk, vbase, ldv); }
            if (NLD > 3u) { rk3 = fetch(1u, t + 3u * WG, kn, p.lk, kbase, ldk); rv3 = fetch(2u, t + 3u * WG, kn, p.lk, vbase, ldv); }
            if (NLD > 4u) { rk4 = fetch(1u, t + 4u * WG, kn, p.lk, kbase, ldk); rv4 = fetch(2u, t + 4u * WG, kn, p.lk, vbase, ldv); }
        }

        // S = Q·Kᵀ for this subgroup's 16 rows.
        for (var cb = 0u; cb < NKB; cb++) {
            var acc = coop_mat16x16<f32, C>();
            acc = coopMultiplyAdd(qf0, kt_frag(cb, 0u), acc);
            if (NQF > 1u) { acc = coopMultiplyAdd(qf1, kt_frag(cb, 1u), acc); }
            if (NQF > 2u) { acc = coopMultiplyAdd(qf2, kt_frag(cb, 2u), acc); }
            if (NQF > 3u) { acc = coopMultiplyAdd(qf3, kt_frag(cb, 3u), acc); }
            if (NQF > 4u) { acc = coopMultiplyAdd(qf4, kt_frag(cb, 4u), acc); }
            store_s(acc, sbase + cb * 16u);
        }
        sync_sub();

        // Online softmax of row r: keys k0 + c with c < lim are visible to it.
        let lim = vis - min(vis, k0);
        // The lane's BKV/2 scores are read once, into registers (a private array indexed by
        // the unrolled step), in log2 units; the mask is applied (NEG) only in blocks that
        // reach past the row's last visible key, so that exp2(x - m) is 0 there.
        let srow = sbase + r * SLD;
        var x: array<f32, 32>;   // BKV/2 <= 32
        var mx = NEG;
        if (lim >= BKV) {
            for (var i = 0u; i < BKV / 2u; i++) {
                x[i] = ss[srow + score_col(i, c0, c1)] * sl;
                mx = max(mx, x[i]);
            }
        } else {
            for (var i = 0u; i < BKV / 2u; i++) {
                let c = score_col(i, c0, c1);
                x[i] = select(NEG, ss[srow + c] * sl, c < lim);
                mx = max(mx, x[i]);
            }
        }
        mx = max(mx, subgroupShuffleXor(mx, 1u));
        // The reference max m moves only when the block's max passes it by more than LAZY
        // (always in the first block, m = NEG: key 0 is visible to every row). Both lanes of
        // a row see the same m and mx, so they decide alike.
        var alpha = 1.0;
        var moved = false;   // O's row must be multiplied by alpha (not while O is still zero)
        if (mx > m + LAZY) {
            alpha = exp2(m - mx);
            moved = m > NEG;
            l *= alpha;
            if (SAVE_LSE) { l32 *= alpha; }
            m = mx;
        }
        var sum = 0.0;
        var sum32 = 0.0;
        let prow = pbase + r * PLD;
        for (var i = 0u; i < BKV / 2u; i++) {
            let e = exp2(x[i] - m);   // m is finite: key 0 is visible to every row
            let ph = f16(e);
            sp[prow + score_col(i, c0, c1)] = ph;
            sum += f32(ph);
            if (SAVE_LSE) { sum32 += e; }
        }
        l += sum + subgroupShuffleXor(sum, 1u);
        if (SAVE_LSE) { l32 += sum32 + subgroupShuffleXor(sum32, 1u); }
        // Every lane's reads of S are done (the rescale rewrites the slice) and P is stored.
        sync_sub();

        // Rescale O where a row's max moved: uniform within the subgroup (see the header).
        if (subgroupAny(moved)) {
            o0 = rescaled(o0, sbase, lane, alpha);
            if (NQF > 1u) { o1 = rescaled(o1, sbase, lane, alpha); }
            if (NQF > 2u) { o2 = rescaled(o2, sbase, lane, alpha); }
            if (NQF > 3u) { o3 = rescaled(o3, sbase, lane, alpha); }
            if (NQF > 4u) { o4 = rescaled(o4, sbase, lane, alpha); }
        }

        // O += P·V.
        for (var kc = 0u; kc < NKB; kc++) {
            let a = p_frag(pbase, kc);
            o0 = coopMultiplyAdd(a, v_frag(kc, 0u), o0);
            if (NQF > 1u) { o1 = coopMultiplyAdd(a, v_frag(kc, 1u), o1); }
            if (NQF > 2u) { o2 = coopMultiplyAdd(a, v_frag(kc, 2u), o2); }
            if (NQF > 3u) { o3 = coopMultiplyAdd(a, v_frag(kc, 3u), o3); }
            if (NQF > 4u) { o4 = coopMultiplyAdd(a, v_frag(kc, 4u), o4); }
        }
        workgroupBarrier();   // sk, sv are refilled and the slices rewritten next block
    }

    // o = O / l, one 16x16 fragment at a time through this subgroup's ss slice: lane pair r
    // writes row r (query qi), lane j of it columns 16f + 8j .. +8 (those below d).
    let inv = select(0.0, 1.0 / l, l > 0.0);
    let ldo = p.ldo / 8u;
    for (var f = 0u; f < NQF; f++) {
        if (f == 0u) { store_s(o0, sbase); }
        if (f == 1u) { store_s(o1, sbase); }
        if (f == 2u) { store_s(o2, sbase); }
        if (f == 3u) { store_s(o3, sbase); }
        if (f == 4u) { store_s(o4, sbase); }
        sync_sub();
        let col = 16u * f + 8u * j;
        if (qi < p.lq && col < p.d) {
            let at = sbase + r * SLD + 8u * j;
            o[obase + qi * ldo + col / 8u] = vec4<u32>(
                pack2x16float(vec2<f32>(ss[at], ss[at + 1u]) * inv),
                pack2x16float(vec2<f32>(ss[at + 2u], ss[at + 3u]) * inv),
                pack2x16float(vec2<f32>(ss[at + 4u], ss[at + 5u]) * inv),
                pack2x16float(vec2<f32>(ss[at + 6u], ss[at + 7u]) * inv));
        }
        sync_sub();
    }
    if (SAVE_LSE && qi < p.lq && j == 0u) {
        // As attnb_stats: l32 >= 1 (key 0 is visible to every row).
        lse[bh * p.lq + qi] = vec2<f32>(m + log2(max(l32, 1.0e-30)), 0.0);
    }
}
