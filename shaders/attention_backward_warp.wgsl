// attention_backward_warp.wgsl — the gradients dQ (attnb_dq_warp) and dK, dV (attnb_dkv_warp)
// of o = softmax(q·kᵀ·scale [+ causal mask])·v on cooperative matrices, with every subgroup
// owning 16 rows of the output for the whole kernel (FlashAttention-2's split): its operand
// fragments and its f32 accumulators stay in registers, and its score block lives in a slice
// of workgroup memory only it touches, so the steps between two tile loads synchronise with
// subgroupBarrier instead of workgroupBarrier. For padded head dims up to 80 (SD's d 40 and
// 80, CLIP's 64); attention_backward_coop.wgsl keeps the rest.
//
// Same contract as attention_backward.wgsl and attention_backward_coop.wgsl (read them first):
// the same uniform struct and bindings, token-major operands given as (element offset, row
// stride) with offsets, strides and d multiples of 8, the stats [batch·heads·lq] of (lse2, D)
// written by attnb_stats or attnb_delta, and with split queries the same unscaled f32
// partials [splits, batch, lk, heads·d] summed by attnb_dkv_reduce. q, k, v are read as
// mat2x4<f16> words of 8 halves, dout as vec4<u32> words (f16, or f32 with DO_F32) rounded to
// f16 in workgroup memory; outputs as packed f16 pairs or f32 (OUT_F32). Causal: query i
// sees keys 0..=i.
//
// Head dim: DP = d rounded up to 16, 16 <= DP <= 80 (NDF = DP/16 <= 5 fragments, held in
// separate variables behind override conditions: a private array indexed at run time would
// go to local memory). Columns d..DP of the staged tiles are zero, rows past lq and lk too;
// masked (query, key) pairs get P = dS = 0.
//
// attnb_dq_warp   grid (ceil(lq / (16·WARPS)), batch·heads); BK keys per streamed block.
//   Subgroup s owns queries q0 + 16s .. +16: its Q and dO fragments (A operands, NDF each)
//   and its dQ accumulators (NDF, f32) in registers. Per key block k0 (causal: up to the
//   workgroup's last query):
//     all: K, V tiles [BK, DP] -> sk, sv; workgroupBarrier
//     S = Q·Kᵀ [16, BK] -> its slice of ss; subgroupBarrier
//     lanes: P = exp2(min(S·scale·log2e - lse2, 0)) kept in registers (lane pair r owns
//       row r, each lane every other column); subgroupBarrier
//     dP = dO·Vᵀ -> ss; subgroupBarrier
//     lanes: dS = P∘(dP - D) -> its slice of sp (f16); subgroupBarrier
//     dQ += dS·K; workgroupBarrier (sk, sv are reloaded next)
//   Finally dq = dQ·scale, fragment by fragment through its ss slice.
// attnb_dkv_warp  grid (ceil(lk / (16·WARPS)), batch·heads, splits); BQ queries per block.
//   Subgroup s owns keys k0 + 16s .. +16: its K and V fragments (A operands) and its dK, dV
//   accumulators in registers; it computes the transposed blocks Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ
//   [16, BQ] (lane c owns columns c, c + 32: one query's lse2 and D each). Per query block q0
//   = qs + z·BQ, qs + (z + splits)·BQ, ... (qs: 0, causal the block holding query k0):
//     all: Q, dO tiles [BQ, DP] -> sq, sdo; workgroupBarrier
//     Sᵀ -> ss slice; subgroupBarrier; lanes: Pᵀ -> registers and sp slice (f16);
//     subgroupBarrier; dPᵀ -> ss slice and dV += Pᵀ·dO; subgroupBarrier; lanes: dSᵀ =
//     Pᵀ∘(dPᵀ - D) -> sp slice; subgroupBarrier; dK += dSᵀ·Q; workgroupBarrier.
//   Finally dk = dK·scale, dv = dV (or with splits > 1 the unscaled f32 partials of split z,
//   every key row < lk written, zeros where the split saw no query).
//   The K and V fragments are loaded once at the start, staged through sq and sdo in passes
//   of BQ rows.
//
// Workgroup memory (bytes), with W = WARPS and B = BLK the streamed block (keys for dq, queries for dkv): two f16 tiles
// [B, DP + 8] (4·B·(DP + 8) bytes) and per subgroup an f32 slice [16, B + 4] and an f16 slice
// [16, B + 8]: W·16·(4·(B + 4) + 2·(B + 8)). E.g. W 8, B 32 at DP 48: 7168 + 28672 = 35840;
// W 4, B 64 at DP 80: 22528 + 26624 = 49152. The launcher (src/kernels/attention_backward.rs,
// BwdTile::shared_bytes) computes the same sums. The row pads keep every cooperative stride a
// multiple of 16 bytes.
// Registers per invocation: 2·NDF f16 fragments, 2·NDF (dkv) or NDF (dq) f32 accumulators,
// B/2 (dq) or B/2 (dkv: 16 rows x B/32 columns) f32 probabilities.
// Needs subgroups of 32 and subgroupBarrier (wgpu's SUBGROUP_BARRIER): the launcher takes
// this path only where the device offers both.

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
    lddo: u32,
    lddq: u32,
    lddk: u32,
    lddv: u32,
    off_q: u32,     // element offsets of q[0, 0, 0] etc.
    off_k: u32,
    off_v: u32,
    off_o: u32,
    off_do: u32,
    off_dq: u32,
    off_dk: u32,
    off_dv: u32,
    scale: f32,     // 1/sqrt(d) usually
    splits: u32,    // attnb_dkv_warp: query splits (1: no partials)
    _pad1: u32,
    _pad2: u32,
}

override DO_F32: bool = false;
override OUT_F32: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<mat2x4<f16>>;
@group(0) @binding(2) var<storage, read> k: array<mat2x4<f16>>;
@group(0) @binding(3) var<storage, read> v: array<mat2x4<f16>>;
@group(0) @binding(4) var<storage, read> dout: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read_write> stats: array<vec2<f32>>;
@group(0) @binding(6) var<storage, read_write> g0: array<vec4<u32>>;
@group(0) @binding(7) var<storage, read_write> g1: array<vec4<u32>>;

const LOG2E: f32 = 1.4426950408889634;

override BLK: u32 = 32u;       // streamed block: keys (dq) or queries (dkv), 32 or 64
override WG_SYNC: bool = false;   // sync the subgroup steps with workgroupBarrier (for measuring)
override DP: u32 = 48u;        // head dim rounded up to 16: 16 ..= 80
override WARPS: u32 = 8u;      // subgroups of 32 per workgroup: 4 or 8
override WG: u32 = WARPS * 32u;
override NDF: u32 = DP / 16u;  // fragments along the head dim (<= 5)
override NB: u32 = BLK / 16u;    // fragments along the streamed block
// Row strides: tiles in vec4<f16> units (8 halves of padding), the f32 slices in floats (4 of
// padding), the f16 slices in halves (8 of padding).
override KLD: u32 = DP / 4u + 2u;
override SLD: u32 = BLK + 4u;
override PLD: u32 = BLK + 8u;
override T_LEN: u32 = BLK * KLD;
override SS_LEN: u32 = WARPS * 16u * SLD;
override SP_LEN: u32 = WARPS * 16u * PLD;

var<workgroup> ta: array<vec4<f16>, T_LEN>;   // dq: K tile; dkv: Q tile [B, DP]
var<workgroup> tb: array<vec4<f16>, T_LEN>;   // dq: V tile; dkv: dO tile [B, DP]
var<workgroup> ss: array<f32, SS_LEN>;        // per subgroup: S, then dP [16, B] (f32)
var<workgroup> sp: array<f16, SP_LEN>;        // per subgroup: P, then dS [16, B] (f16)

// Orders one subgroup's workgroup-memory writes before its other lanes' reads (and its reads
// before later writes). WG_SYNC takes a workgroup barrier instead (to measure what the
// subgroup barriers save; every subgroup runs the same steps, so both are correct).
fn sync_sub() {
    if (WG_SYNC) { workgroupBarrier(); } else { subgroupBarrier(); }
}

// naga 30 needs the store in a helper when the matrix is a var (see DESIGN.md).
fn store_s(m: coop_mat16x16<f32, C>, at: u32) {
    coopStoreT(m, &ss[at], SLD);
}

// Row `row` of a staged tile as an A operand (dims 16f .. 16f + 16), from ta or tb.
fn a_frag_ta(row: u32, f: u32) -> coop_mat16x16<f16, A> {
    return coopLoadT<coop_mat16x16<f16, A>>(&ta[row * KLD + f * 4u], KLD);
}
fn a_frag_tb(row: u32, f: u32) -> coop_mat16x16<f16, A> {
    return coopLoadT<coop_mat16x16<f16, A>>(&tb[row * KLD + f * 4u], KLD);
}
// The transposed tile rows cb·16 .. +16 as a B operand: B(i, j) = tile[16cb + j][16f + i].
fn bt_frag_ta(cb: u32, f: u32) -> coop_mat16x16<f16, B> {
    return coopLoad<coop_mat16x16<f16, B>>(&ta[cb * 16u * KLD + f * 4u], KLD);
}
fn bt_frag_tb(cb: u32, f: u32) -> coop_mat16x16<f16, B> {
    return coopLoad<coop_mat16x16<f16, B>>(&tb[cb * 16u * KLD + f * 4u], KLD);
}
// Tile rows kc·16 .. +16, dims 16f .. +16 as a B operand (row-major).
fn b_frag_ta(kc: u32, f: u32) -> coop_mat16x16<f16, B> {
    return coopLoadT<coop_mat16x16<f16, B>>(&ta[kc * 16u * KLD + f * 4u], KLD);
}
fn b_frag_tb(kc: u32, f: u32) -> coop_mat16x16<f16, B> {
    return coopLoadT<coop_mat16x16<f16, B>>(&tb[kc * 16u * KLD + f * 4u], KLD);
}
// Columns kc·16 .. +16 of a subgroup's f16 slice (starting at `base`) as an A operand.
fn p_frag(base: u32, kc: u32) -> coop_mat16x16<f16, A> {
    return coopLoadT<coop_mat16x16<f16, A>>(&sp[base + kc * 16u], PLD);
}

// Rows [0, B) of q, k or v (which = 0, 1, 2) into ta (to_b false) or tb: tile row i is token
// t0 + i of the tensor whose row 0 starts at word `base` (row stride ld words); tokens at or
// past len and octets at or past d/8 read as zero.
fn load_qkv(which: u32, to_b: bool, t0: u32, len: u32, base: u32, ld: u32, t: u32) {
    let dp8 = DP / 8u;
    for (var e = t; e < BLK * dp8; e += WG) {
        let r = e / dp8;
        let c = e % dp8;
        var w = mat2x4<f16>();
        if (t0 + r < len && c < p.d / 8u) {
            let at = base + (t0 + r) * ld + c;
            if (which == 0u) { w = q[at]; } else if (which == 1u) { w = k[at]; } else { w = v[at]; }
        }
        let s = r * KLD + 2u * c;
        if (to_b) {
            tb[s] = w[0];
            tb[s + 1u] = w[1];
        } else {
            ta[s] = w[0];
            ta[s + 1u] = w[1];
        }
    }
}

// dO rows q0 .. q0 + BLK into tb as f16 (zeros past lq and past d). `base` is the element
// index of row 0, column 0 of this (batch, head).
fn load_do(q0: u32, base: u32, t: u32) {
    let dp8 = DP / 8u;
    for (var e = t; e < BLK * dp8; e += WG) {
        let r = e / dp8;
        let c = e % dp8;
        var lo = vec4<f32>(0.0);
        var hi = vec4<f32>(0.0);
        if (q0 + r < p.lq && c < p.d / 8u) {
            let el = base + (q0 + r) * p.lddo + 8u * c;
            if (DO_F32) {
                lo = bitcast<vec4<f32>>(dout[el / 4u]);
                hi = bitcast<vec4<f32>>(dout[el / 4u + 1u]);
            } else {
                let w = dout[el / 8u];
                lo = vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
                hi = vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w));
            }
        }
        tb[r * KLD + 2u * c] = vec4<f16>(lo);
        tb[r * KLD + 2u * c + 1u] = vec4<f16>(hi);
    }
}

// Query qi sees the keys below key_limit(qi): lk, causal qi + 1, none past lq.
fn key_limit(qi: u32) -> u32 {
    if (qi >= p.lq) { return 0u; }
    if (p.causal != 0u) { return min(p.lk, qi + 1u); }
    return p.lk;
}

// attnb_dq_warp: the column of step i (of BLK/2) for lane j of the pair owning row r, half =
// bit 3 of r. Lane j takes the columns = j (mod 2); rows r and r + 8 are 8·SLD ≡ 0 (mod 32)
// words apart, so rows with bit 3 set take each pair of steps in the other order (i ^ 1):
// their column is 2 off, in another bank, both in the f32 S slice and in the f16 P slice
// (PLD/2 words a row, 8·PLD/2 ≡ 0 (mod 32) too).
fn dq_col(i: u32, j: u32, half: u32) -> u32 {
    return 2u * (i ^ half) + j;
}

// Lane `lane`'s octet of the 16x16 f32 block a subgroup stored at ss[sbase] (row stride
// SLD), times `mul`: lane pair r takes row r, lane j of it columns 8j .. 8j + 8.
fn block_octet(sbase: u32, lane: u32, mul: f32) -> mat2x4<f32> {
    let at = sbase + (lane / 2u) * SLD + 8u * (lane % 2u);
    return mat2x4<f32>(vec4<f32>(ss[at], ss[at + 1u], ss[at + 2u], ss[at + 3u]) * mul,
                       vec4<f32>(ss[at + 4u], ss[at + 5u], ss[at + 6u], ss[at + 7u]) * mul);
}

// Octet x to element `el` of g0 (put_g0) or g1 (put_g1): f32 (as_f32) or packed f16 pairs.
// Two functions, not one with a selector: an entry's bind group holds only the bindings it
// reaches, and the dq launch binds no g1.
fn put_g0(el: u32, x: mat2x4<f32>, as_f32: bool) {
    if (as_f32) {
        g0[el / 4u] = bitcast<vec4<u32>>(x[0]);
        g0[el / 4u + 1u] = bitcast<vec4<u32>>(x[1]);
    } else {
        g0[el / 8u] = vec4<u32>(pack2x16float(x[0].xy), pack2x16float(x[0].zw), pack2x16float(x[1].xy), pack2x16float(x[1].zw));
    }
}
fn put_g1(el: u32, x: mat2x4<f32>, as_f32: bool) {
    if (as_f32) {
        g1[el / 4u] = bitcast<vec4<u32>>(x[0]);
        g1[el / 4u + 1u] = bitcast<vec4<u32>>(x[1]);
    } else {
        g1[el / 8u] = vec4<u32>(pack2x16float(x[0].xy), pack2x16float(x[0].zw), pack2x16float(x[1].xy), pack2x16float(x[1].zw));
    }
}

@compute @workgroup_size(WG)
fn attnb_dq_warp(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32,
                 @builtin(subgroup_id) sid: u32, @builtin(subgroup_invocation_id) lane: u32) {
    let bh = wg.y;
    let b = bh / p.heads;
    let h = bh % p.heads;
    let q0 = wg.x * 16u * WARPS;        // the workgroup's first query
    let qw = q0 + 16u * sid;            // this subgroup's first query
    let qbase = (p.off_q + b * p.lq * p.ldq + h * p.d) / 8u;
    let kbase = (p.off_k + b * p.lk * p.ldk + h * p.d) / 8u;
    let vbase = (p.off_v + b * p.lk * p.ldv + h * p.d) / 8u;
    let dobase = p.off_do + b * p.lq * p.lddo + h * p.d;
    let sl = p.scale * LOG2E;
    let sbase = sid * 16u * SLD;
    let pbase = sid * 16u * PLD;

    // Q and dO fragments of this subgroup's rows, staged through ta / tb in passes of B rows.
    var qf0 = coop_mat16x16<f16, A>(); var qf1 = qf0; var qf2 = qf0; var qf3 = qf0; var qf4 = qf0;
    var of0 = qf0; var of1 = qf0; var of2 = qf0; var of3 = qf0; var of4 = qf0;
    for (var s0 = 0u; s0 < 16u * WARPS; s0 += BLK) {
        load_qkv(0u, false, q0 + s0, p.lq, qbase, p.ldq / 8u, t);
        load_do(q0 + s0, dobase, t);
        workgroupBarrier();
        if (16u * sid >= s0 && 16u * sid < s0 + BLK) {
            let row = 16u * sid - s0;
            qf0 = a_frag_ta(row, 0u);
            of0 = a_frag_tb(row, 0u);
            if (NDF > 1u) { qf1 = a_frag_ta(row, 1u); of1 = a_frag_tb(row, 1u); }
            if (NDF > 2u) { qf2 = a_frag_ta(row, 2u); of2 = a_frag_tb(row, 2u); }
            if (NDF > 3u) { qf3 = a_frag_ta(row, 3u); of3 = a_frag_tb(row, 3u); }
            if (NDF > 4u) { qf4 = a_frag_ta(row, 4u); of4 = a_frag_tb(row, 4u); }
        }
        workgroupBarrier();
    }
    var dq0 = coop_mat16x16<f32, C>(); var dq1 = dq0; var dq2 = dq0; var dq3 = dq0; var dq4 = dq0;

    // Softmax role: lane pair r owns row r (query qi), lane j of it the columns dq_col(i, ..).
    let r = lane / 2u;
    let j = lane % 2u;
    let half = (r >> 3u) & 1u;
    let qi = qw + r;
    var lse = 0.0;
    var dd = 0.0;
    if (qi < p.lq) {
        let st = stats[bh * p.lq + qi];
        lse = st.x;
        dd = st.y;
    }
    let vis = key_limit(qi);            // row r sees keys < vis

    var kend = p.lk;
    if (p.causal != 0u) { kend = min(kend, q0 + 16u * WARPS); }
    var pr: array<f32, 32>;
    for (var k0 = 0u; k0 < kend; k0 += BLK) {
        load_qkv(1u, false, k0, p.lk, kbase, p.ldk / 8u, t);
        load_qkv(2u, true, k0, p.lk, vbase, p.ldv / 8u, t);
        workgroupBarrier();
        // S = Q·Kᵀ.
        for (var cb = 0u; cb < NB; cb++) {
            var acc = coop_mat16x16<f32, C>();
            acc = coopMultiplyAdd(qf0, bt_frag_ta(cb, 0u), acc);
            if (NDF > 1u) { acc = coopMultiplyAdd(qf1, bt_frag_ta(cb, 1u), acc); }
            if (NDF > 2u) { acc = coopMultiplyAdd(qf2, bt_frag_ta(cb, 2u), acc); }
            if (NDF > 3u) { acc = coopMultiplyAdd(qf3, bt_frag_ta(cb, 3u), acc); }
            if (NDF > 4u) { acc = coopMultiplyAdd(qf4, bt_frag_ta(cb, 4u), acc); }
            store_s(acc, sbase + cb * 16u);
        }
        sync_sub();
        // P of row r: keys k0 + c with c < lim are visible to it; the mask (a select) only in
        // blocks that reach past its last visible key.
        let lim = vis - min(vis, k0);
        let srow = sbase + r * SLD;
        if (lim >= BLK) {
            for (var i = 0u; i < 32u; i++) {
                if (i < BLK / 2u) {
                    pr[i] = exp2(min(ss[srow + dq_col(i, j, half)] * sl - lse, 0.0));
                }
            }
        } else {
            for (var i = 0u; i < 32u; i++) {
                if (i < BLK / 2u) {
                    let c = dq_col(i, j, half);
                    pr[i] = select(0.0, exp2(min(ss[srow + c] * sl - lse, 0.0)), c < lim);
                }
            }
        }
        sync_sub();
        // dP = dO·Vᵀ.
        for (var cb = 0u; cb < NB; cb++) {
            var acc = coop_mat16x16<f32, C>();
            acc = coopMultiplyAdd(of0, bt_frag_tb(cb, 0u), acc);
            if (NDF > 1u) { acc = coopMultiplyAdd(of1, bt_frag_tb(cb, 1u), acc); }
            if (NDF > 2u) { acc = coopMultiplyAdd(of2, bt_frag_tb(cb, 2u), acc); }
            if (NDF > 3u) { acc = coopMultiplyAdd(of3, bt_frag_tb(cb, 3u), acc); }
            if (NDF > 4u) { acc = coopMultiplyAdd(of4, bt_frag_tb(cb, 4u), acc); }
            store_s(acc, sbase + cb * 16u);
        }
        sync_sub();
        let prow = pbase + r * PLD;
        for (var i = 0u; i < 32u; i++) {
            if (i < BLK / 2u) {
                let c = dq_col(i, j, half);
                sp[prow + c] = f16(pr[i] * (ss[srow + c] - dd));
            }
        }
        sync_sub();
        // dQ += dS·K.
        for (var kc = 0u; kc < NB; kc++) {
            let a = p_frag(pbase, kc);
            dq0 = coopMultiplyAdd(a, b_frag_ta(kc, 0u), dq0);
            if (NDF > 1u) { dq1 = coopMultiplyAdd(a, b_frag_ta(kc, 1u), dq1); }
            if (NDF > 2u) { dq2 = coopMultiplyAdd(a, b_frag_ta(kc, 2u), dq2); }
            if (NDF > 3u) { dq3 = coopMultiplyAdd(a, b_frag_ta(kc, 3u), dq3); }
            if (NDF > 4u) { dq4 = coopMultiplyAdd(a, b_frag_ta(kc, 4u), dq4); }
        }
        workgroupBarrier();
    }

    // dq = dQ·scale, one 16x16 block at a time through this subgroup's ss slice: lane pair
    // r writes row r (query qi), lane j of it columns 16cb + 8j .. +8 (those below d).
    for (var cb = 0u; cb < NDF; cb++) {
        if (cb == 0u) { store_s(dq0, sbase); }
        if (cb == 1u) { store_s(dq1, sbase); }
        if (cb == 2u) { store_s(dq2, sbase); }
        if (cb == 3u) { store_s(dq3, sbase); }
        if (cb == 4u) { store_s(dq4, sbase); }
        sync_sub();
        let col = cb * 16u + 8u * j;
        if (qi < p.lq && col < p.d) {
            put_g0(p.off_dq + (b * p.lq + qi) * p.lddq + h * p.d + col, block_octet(sbase, lane, p.scale), OUT_F32);
        }
        sync_sub();
    }
}

@compute @workgroup_size(WG)
fn attnb_dkv_warp(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32,
                  @builtin(subgroup_id) sid: u32, @builtin(subgroup_invocation_id) lane: u32) {
    let bh = wg.y;
    let b = bh / p.heads;
    let h = bh % p.heads;
    let k0 = wg.x * 16u * WARPS;        // the workgroup's first key
    let kw = k0 + 16u * sid;            // this subgroup's first key
    let qbase = (p.off_q + b * p.lq * p.ldq + h * p.d) / 8u;
    let kbase = (p.off_k + b * p.lk * p.ldk + h * p.d) / 8u;
    let vbase = (p.off_v + b * p.lk * p.ldv + h * p.d) / 8u;
    let dobase = p.off_do + b * p.lq * p.lddo + h * p.d;
    let sl = p.scale * LOG2E;
    let sbase = sid * 16u * SLD;
    let pbase = sid * 16u * PLD;

    // K and V fragments of this subgroup's keys, staged through ta / tb in passes of B rows.
    var kf0 = coop_mat16x16<f16, A>(); var kf1 = kf0; var kf2 = kf0; var kf3 = kf0; var kf4 = kf0;
    var vf0 = kf0; var vf1 = kf0; var vf2 = kf0; var vf3 = kf0; var vf4 = kf0;
    for (var s0 = 0u; s0 < 16u * WARPS; s0 += BLK) {
        load_qkv(1u, false, k0 + s0, p.lk, kbase, p.ldk / 8u, t);
        load_qkv(2u, true, k0 + s0, p.lk, vbase, p.ldv / 8u, t);
        workgroupBarrier();
        if (16u * sid >= s0 && 16u * sid < s0 + BLK) {
            let row = 16u * sid - s0;
            kf0 = a_frag_ta(row, 0u);
            vf0 = a_frag_tb(row, 0u);
            if (NDF > 1u) { kf1 = a_frag_ta(row, 1u); vf1 = a_frag_tb(row, 1u); }
            if (NDF > 2u) { kf2 = a_frag_ta(row, 2u); vf2 = a_frag_tb(row, 2u); }
            if (NDF > 3u) { kf3 = a_frag_ta(row, 3u); vf3 = a_frag_tb(row, 3u); }
            if (NDF > 4u) { kf4 = a_frag_ta(row, 4u); vf4 = a_frag_tb(row, 4u); }
        }
        workgroupBarrier();
    }
    var dk0 = coop_mat16x16<f32, C>(); var dk1 = dk0; var dk2 = dk0; var dk3 = dk0; var dk4 = dk0;
    var dv0 = dk0; var dv1 = dk0; var dv2 = dk0; var dv3 = dk0; var dv4 = dk0;

    // Causal: queries before k0 see none of these keys.
    var qstart = 0u;
    if (p.causal != 0u) { qstart = (k0 / BLK) * BLK; }
    let splits = max(p.splits, 1u);
    // Lane c owns columns (queries) c and c + 32 of the [16, B] block, every row (key).
    var pr: array<f32, 32>;
    for (var q0 = qstart + wg.z * BLK; q0 < p.lq; q0 += splits * BLK) {
        load_qkv(0u, false, q0, p.lq, qbase, p.ldq / 8u, t);
        load_do(q0, dobase, t);
        workgroupBarrier();
        // Sᵀ = K·Qᵀ.
        for (var cb = 0u; cb < NB; cb++) {
            var acc = coop_mat16x16<f32, C>();
            acc = coopMultiplyAdd(kf0, bt_frag_ta(cb, 0u), acc);
            if (NDF > 1u) { acc = coopMultiplyAdd(kf1, bt_frag_ta(cb, 1u), acc); }
            if (NDF > 2u) { acc = coopMultiplyAdd(kf2, bt_frag_ta(cb, 2u), acc); }
            if (NDF > 3u) { acc = coopMultiplyAdd(kf3, bt_frag_ta(cb, 3u), acc); }
            if (NDF > 4u) { acc = coopMultiplyAdd(kf4, bt_frag_ta(cb, 4u), acc); }
            store_s(acc, sbase + cb * 16u);
        }
        sync_sub();
        var lse = vec2<f32>(0.0);
        var dd = vec2<f32>(0.0);
        for (var u = 0u; u < BLK / 32u; u++) {
            let qi = q0 + lane + 32u * u;
            if (qi < p.lq) {
                let st = stats[bh * p.lq + qi];
                lse[u] = st.x;
                dd[u] = st.y;
            }
        }
        // Key kw + rr is visible to query q0 + c (c = lane + 32u) when rr < lim[u]; the mask
        // (a select) only when some of the lane's queries miss some of the subgroup's keys.
        var lim = vec2<u32>(16u);
        for (var u = 0u; u < BLK / 32u; u++) {
            let vis = key_limit(q0 + lane + 32u * u);
            lim[u] = vis - min(vis, kw);
        }
        if (min(lim.x, lim.y) >= 16u) {
            for (var n = 0u; n < 32u; n++) {
                if (n < 16u * (BLK / 32u)) {
                    let rr = n % 16u;
                    let u = n / 16u;
                    let c = lane + 32u * u;
                    let pij = exp2(min(ss[sbase + rr * SLD + c] * sl - lse[u], 0.0));
                    pr[n] = pij;
                    sp[pbase + rr * PLD + c] = f16(pij);
                }
            }
        } else {
            for (var n = 0u; n < 32u; n++) {
                if (n < 16u * (BLK / 32u)) {
                    let rr = n % 16u;
                    let u = n / 16u;
                    let c = lane + 32u * u;
                    let pij = select(0.0, exp2(min(ss[sbase + rr * SLD + c] * sl - lse[u], 0.0)), rr < lim[u]);
                    pr[n] = pij;
                    sp[pbase + rr * PLD + c] = f16(pij);
                }
            }
        }
        sync_sub();
        // dPᵀ = V·dOᵀ, and dV += Pᵀ·dO.
        for (var cb = 0u; cb < NB; cb++) {
            var acc = coop_mat16x16<f32, C>();
            acc = coopMultiplyAdd(vf0, bt_frag_tb(cb, 0u), acc);
            if (NDF > 1u) { acc = coopMultiplyAdd(vf1, bt_frag_tb(cb, 1u), acc); }
            if (NDF > 2u) { acc = coopMultiplyAdd(vf2, bt_frag_tb(cb, 2u), acc); }
            if (NDF > 3u) { acc = coopMultiplyAdd(vf3, bt_frag_tb(cb, 3u), acc); }
            if (NDF > 4u) { acc = coopMultiplyAdd(vf4, bt_frag_tb(cb, 4u), acc); }
            store_s(acc, sbase + cb * 16u);
        }
        for (var qc = 0u; qc < NB; qc++) {
            let a = p_frag(pbase, qc);
            dv0 = coopMultiplyAdd(a, b_frag_tb(qc, 0u), dv0);
            if (NDF > 1u) { dv1 = coopMultiplyAdd(a, b_frag_tb(qc, 1u), dv1); }
            if (NDF > 2u) { dv2 = coopMultiplyAdd(a, b_frag_tb(qc, 2u), dv2); }
            if (NDF > 3u) { dv3 = coopMultiplyAdd(a, b_frag_tb(qc, 3u), dv3); }
            if (NDF > 4u) { dv4 = coopMultiplyAdd(a, b_frag_tb(qc, 4u), dv4); }
        }
        sync_sub();
        for (var n = 0u; n < 32u; n++) {
            if (n < 16u * (BLK / 32u)) {
                let rr = n % 16u;
                let u = n / 16u;
                let c = lane + 32u * u;
                sp[pbase + rr * PLD + c] = f16(pr[n] * (ss[sbase + rr * SLD + c] - dd[u]));
            }
        }
        sync_sub();
        // dK += dSᵀ·Q.
        for (var qc = 0u; qc < NB; qc++) {
            let a = p_frag(pbase, qc);
            dk0 = coopMultiplyAdd(a, b_frag_ta(qc, 0u), dk0);
            if (NDF > 1u) { dk1 = coopMultiplyAdd(a, b_frag_ta(qc, 1u), dk1); }
            if (NDF > 2u) { dk2 = coopMultiplyAdd(a, b_frag_ta(qc, 2u), dk2); }
            if (NDF > 3u) { dk3 = coopMultiplyAdd(a, b_frag_ta(qc, 3u), dk3); }
            if (NDF > 4u) { dk4 = coopMultiplyAdd(a, b_frag_ta(qc, 4u), dk4); }
        }
        workgroupBarrier();
    }

    // dk = dK·scale, dv = dV (or the unscaled f32 partials of split z), one 16x16 block at a
    // time through this subgroup's ss slice: lane pair r writes key row kw + r, lane j of it
    // columns 16cb + 8j .. +8 (those below d).
    let partial = splits > 1u;
    let kmul = select(p.scale, 1.0, partial);
    let kj = kw + lane / 2u;
    for (var cb = 0u; cb < NDF; cb++) {
        let col = cb * 16u + 8u * (lane % 2u);
        let live = kj < p.lk && col < p.d;
        // Partials [splits, batch, lk, heads·d], f32.
        let pel = ((wg.z * p.batch + b) * p.lk + kj) * p.heads * p.d + h * p.d + col;
        if (cb == 0u) { store_s(dk0, sbase); }
        if (cb == 1u) { store_s(dk1, sbase); }
        if (cb == 2u) { store_s(dk2, sbase); }
        if (cb == 3u) { store_s(dk3, sbase); }
        if (cb == 4u) { store_s(dk4, sbase); }
        sync_sub();
        if (live) {
            let x = block_octet(sbase, lane, kmul);
            if (partial) { put_g0(pel, x, true); } else { put_g0(p.off_dk + (b * p.lk + kj) * p.lddk + h * p.d + col, x, OUT_F32); }
        }
        sync_sub();
        if (cb == 0u) { store_s(dv0, sbase); }
        if (cb == 1u) { store_s(dv1, sbase); }
        if (cb == 2u) { store_s(dv2, sbase); }
        if (cb == 3u) { store_s(dv3, sbase); }
        if (cb == 4u) { store_s(dv4, sbase); }
        sync_sub();
        if (live) {
            let x = block_octet(sbase, lane, 1.0);
            if (partial) { put_g1(pel, x, true); } else { put_g1(p.off_dv + (b * p.lk + kj) * p.lddv + h * p.d + col, x, OUT_F32); }
        }
        sync_sub();
    }
}
