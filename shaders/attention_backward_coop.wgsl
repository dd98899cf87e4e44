// attention_backward_coop.wgsl — the gradients dQ (attnb_dq_coop) and dK, dV (attnb_dkv_coop)
// of o = softmax(q·kᵀ·scale [+ causal mask])·v on cooperative matrices (tensor cores):
// 16x16x16 tiles, f16 inputs, f32 accumulators. Same contract as attention_backward.wgsl
// (read it first): same uniform struct, same bindings, same operand layout (token-major, each
// operand an (element offset, row stride), multiples of 8), the same stats [batch·heads·lq]
// of (lse2, D) written by its attnb_stats, and the same f32 partials [splits, batch, lk,
// heads·d] (unscaled) finished by its attnb_dkv_reduce when the queries are split. The
// statistics launch and the reduce stay scalar (shared by both paths).
//
// Operands: q, k, v read natively as mat2x4<f16> words of 8 halves (as attention_coop.wgsl);
// dout as vec4<u32> words (f16: 8 halves per word; f32 with DO_F32: 4 floats per word) and
// rounded to f16 in workgroup memory (the tensor cores multiply f16); outputs as vec4<u32>
// (packed f16 pairs, or f32 bitcast with OUT_F32). Causal: query i sees keys 0..=i.
//
// Head dim: DP = d rounded up to 16 (40 -> 48), 16 <= DP <= 160. Columns d..DP of every
// shared tile are zero, rows past lq (queries) and lk (keys) too; masked (query, key) pairs
// get P = dS = 0, so they add nothing.
//
// Tiles (BQ query rows, BK keys, WARPS subgroups of 32): BQ, BK in {16, 32, 64}, WARPS 4 or
// 8, NE = BQ·BK / (32·WARPS) <= 8 elements of the score block per invocation. The launcher
// (src/kernels/attention_backward.rs, BwdTile) takes per entry the first tile of its AUTO list
// that fits the workgroup memory: dq (64, 32, 8) for DP <= 48, (32, 32, 4) DP <= 96,
// (16, 32, 4) DP <= 160; dkv (64, 32, 8) DP <= 48, (32, 32, 4) DP <= 64, (32, 16, 4) DP <= 128,
// (16, 16, 4) DP <= 160.
//
// attnb_dq_coop   grid (ceil(lq / BQ), batch·heads): Q and dO tiles [BQ, DP] resident, the
//   running dQ [BQ, DP] f32 in workgroup memory (loaded and stored as accumulators, like the
//   forward's O). Per key block k0 (causal: up to the block's last query), 6 barriers:
//     load K, V tiles [BK, DP];
//     S = Q·Kᵀ -> ss (f32); P = exp2(min(S·scale·log2e - lse2, 0)) by plain invocations
//     (element e = t + n·WG, n < NE, kept in registers as f32) -> sp (f16);
//     dP = dO·Vᵀ -> ss; dS = P∘(dP - D) (f32 P from registers) -> sp (f16, in place);
//     dQ += dS·K.
//   Finally dq = dQ·scale (f16, or f32 with OUT_F32).
// attnb_dkv_coop  grid (ceil(lk / BK), batch·heads, splits): K and V tiles [BK, DP] resident,
//   dK and dV [BK, DP] f32 in workgroup memory. Per query block q0 = qs + z·BQ, qs + (z +
//   splits)·BQ, ... (qs: 0, causal the block holding query k0), 6 barriers: load Q, dO tiles
//   [BQ, DP]; S -> ss; P -> sp; dP = dO·Vᵀ -> ss together with dV += Pᵀ·dO (Pᵀ: sp read
//   column-major); dS -> sp; dK += dSᵀ·Q. Finally with splits = 1 dk = dK·scale, dv = dV
//   (f16/f32); with splits > 1 the unscaled f32 partials of split z, every key row < lk
//   written (zeros where the split saw no query).
// Cooperative products are split among the subgroups fragment by fragment (f = sid, sid +
// WARPS, ...: subgroup-uniform control flow); each output fragment's accumulator is loaded
// from (or, for S and dP, started at zero in) workgroup memory and stored back.
//
// Workgroup memory (bytes): f16 tiles with rows of DP + 8 halves (sq, sdo [BQ]; sk, sv [BK]),
// ss BQ·(BK + 4)·4, sp BQ·(BK + 8)·2, accumulators rows of DP + 4 f32 (dq: one [BQ]; dkv: two
// [BK]). dq: 4·(BQ + BK)·(DP + 8) + 4·BQ·(BK + 4) + 2·BQ·(BK + 8) + 4·BQ·(DP + 4); dkv: the
// same with 8·BK·(DP + 4) for the accumulators. The launcher computes these sums
// (BwdTile::shared_bytes) and checks them against wgpu's default 48 KiB and the device limit;
// e.g. (64, 32) at DP 48: 49152 bytes for each entry, dkv (16, 16) at DP 160: 44544.
// Shared arrays are typed f16 / f32 because naga takes a cooperative load's element type from
// its pointer; strides on the f16 tiles (vec4<f16>) are in vec4<f16> units, on sp in halves,
// on ss and the accumulators in floats. The row pads keep every cooperative stride a
// multiple of 16 bytes.
// What it saves over the scalar kernels: the five products of a block on tensor cores instead
// of f32 FMAs from shared memory (the scalar kernels run at ~8 TFLOP/s on the H100).

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
    splits: u32,    // attnb_dkv_coop: query splits (1: no partials)
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

override BQ: u32 = 32u;        // query rows per tile: 16, 32 or 64
override BK: u32 = 32u;        // keys per tile: 16, 32 or 64
override DP: u32 = 48u;        // head dim rounded up to 16: 16 ..= 160
override WARPS: u32 = 4u;      // subgroups of 32 per workgroup: 4 or 8
override WG: u32 = WARPS * 32u;
override NE: u32 = BQ * BK / WG;   // score elements per invocation (<= 8)
override NDF: u32 = DP / 16u;      // fragments along the head dim
// Row strides: f16 tiles in vec4<f16> units (8 halves of padding), sp in halves (8 of
// padding), ss and the accumulators in f32 (4 of padding).
override KLD: u32 = DP / 4u + 2u;
override PLD: u32 = BK + 8u;
override SLD: u32 = BK + 4u;
override OLD: u32 = DP + 4u;
override SQ_LEN: u32 = BQ * KLD;
override SK_LEN: u32 = BK * KLD;
override SS_LEN: u32 = BQ * SLD;
override SP_LEN: u32 = BQ * PLD;
override SQACC_LEN: u32 = BQ * OLD;
override SKACC_LEN: u32 = BK * OLD;

var<workgroup> sq: array<vec4<f16>, SQ_LEN>;     // Q tile [BQ, DP]
var<workgroup> sdo: array<vec4<f16>, SQ_LEN>;    // dO tile [BQ, DP]
var<workgroup> sk: array<vec4<f16>, SK_LEN>;     // K tile [BK, DP]
var<workgroup> sv: array<vec4<f16>, SK_LEN>;     // V tile [BK, DP]
var<workgroup> ss: array<f32, SS_LEN>;           // S, then dP [BQ, BK], f32
var<workgroup> sp: array<f16, SP_LEN>;           // P, then dS [BQ, BK], f16
var<workgroup> sdq: array<f32, SQACC_LEN>;       // dq: running dQ [BQ, DP]
var<workgroup> sdk: array<f32, SKACC_LEN>;       // dkv: running dK [BK, DP]
var<workgroup> sdv: array<f32, SKACC_LEN>;       // dkv: running dV [BK, DP]

// naga 30 needs the store in a helper when the matrix is a var (see DESIGN.md).
fn store_s(m: coop_mat16x16<f32, C>, at: u32) {
    coopStoreT(m, &ss[at], SLD);
}
fn store_dq(m: coop_mat16x16<f32, C>, at: u32) {
    coopStoreT(m, &sdq[at], OLD);
}
fn store_dk(m: coop_mat16x16<f32, C>, at: u32) {
    coopStoreT(m, &sdk[at], OLD);
}
fn store_dv(m: coop_mat16x16<f32, C>, at: u32) {
    coopStoreT(m, &sdv[at], OLD);
}

// Rows [0, rows) of a q, k or v tile (which = 0, 1, 2) into sq, sk or sv: row i is token
// t0 + i of the tensor whose row 0 starts at word `base` (row stride ld words); tokens at or
// past len and octets at or past d/8 read as zero.
fn load_tile(which: u32, rows: u32, t0: u32, len: u32, base: u32, ld: u32, t: u32) {
    let dp8 = DP / 8u;
    for (var e = t; e < rows * dp8; e += WG) {
        let r = e / dp8;
        let c = e % dp8;
        var w = mat2x4<f16>();
        if (t0 + r < len && c < p.d / 8u) {
            let at = base + (t0 + r) * ld + c;
            if (which == 0u) { w = q[at]; } else if (which == 1u) { w = k[at]; } else { w = v[at]; }
        }
        let s = r * KLD + 2u * c;
        if (which == 0u) {
            sq[s] = w[0];
            sq[s + 1u] = w[1];
        } else if (which == 1u) {
            sk[s] = w[0];
            sk[s + 1u] = w[1];
        } else {
            sv[s] = w[0];
            sv[s + 1u] = w[1];
        }
    }
}

// dO rows q0 .. q0 + BQ into sdo as f16 (zeros past lq and past d). `base` is the element
// index of row 0, column 0 of this (batch, head).
fn load_do_tile(q0: u32, base: u32, t: u32) {
    let dp8 = DP / 8u;
    for (var e = t; e < BQ * dp8; e += WG) {
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
        sdo[r * KLD + 2u * c] = vec4<f16>(lo);
        sdo[r * KLD + 2u * c + 1u] = vec4<f16>(hi);
    }
}

// Cooperative fragments, one 16x16 output block each (called from the entry points' loops
// over f = sid, sid + WARPS, ...: naga wants cooperative operations under subgroup-uniform
// control flow, which a function's arguments are not, so no branch here depends on them).
// S = Q·Kᵀ (row block rb, key block cb) -> ss.
fn s_frag(rb: u32, cb: u32) {
    var acc = coop_mat16x16<f32, C>();
    for (var kk = 0u; kk < NDF; kk++) {
        let a = coopLoadT<coop_mat16x16<f16, A>>(&sq[rb * 16u * KLD + kk * 4u], KLD);
        let b = coopLoad<coop_mat16x16<f16, B>>(&sk[cb * 16u * KLD + kk * 4u], KLD);
        acc = coopMultiplyAdd(a, b, acc);
    }
    store_s(acc, rb * 16u * SLD + cb * 16u);
}
// dP = dO·Vᵀ -> ss.
fn dp_frag(rb: u32, cb: u32) {
    var acc = coop_mat16x16<f32, C>();
    for (var kk = 0u; kk < NDF; kk++) {
        let a = coopLoadT<coop_mat16x16<f16, A>>(&sdo[rb * 16u * KLD + kk * 4u], KLD);
        let b = coopLoad<coop_mat16x16<f16, B>>(&sv[cb * 16u * KLD + kk * 4u], KLD);
        acc = coopMultiplyAdd(a, b, acc);
    }
    store_s(acc, rb * 16u * SLD + cb * 16u);
}
// dQ += dS·K (row block rb, head-dim block cb).
fn dq_frag(rb: u32, cb: u32) {
    let at = rb * 16u * OLD + cb * 16u;
    var acc = coopLoadT<coop_mat16x16<f32, C>>(&sdq[at], OLD);
    for (var kk = 0u; kk < BK / 16u; kk++) {
        let a = coopLoadT<coop_mat16x16<f16, A>>(&sp[rb * 16u * PLD + kk * 16u], PLD);
        let b = coopLoadT<coop_mat16x16<f16, B>>(&sk[kk * 16u * KLD + cb * 4u], KLD);
        acc = coopMultiplyAdd(a, b, acc);
    }
    store_dq(acc, at);
}
// dV += Pᵀ·dO (key block kb, head-dim block cb); Pᵀ is sp read column-major.
fn dv_frag(kb: u32, cb: u32) {
    let at = kb * 16u * OLD + cb * 16u;
    var acc = coopLoadT<coop_mat16x16<f32, C>>(&sdv[at], OLD);
    for (var rr = 0u; rr < BQ / 16u; rr++) {
        let a = coopLoad<coop_mat16x16<f16, A>>(&sp[rr * 16u * PLD + kb * 16u], PLD);
        let b = coopLoadT<coop_mat16x16<f16, B>>(&sdo[rr * 16u * KLD + cb * 4u], KLD);
        acc = coopMultiplyAdd(a, b, acc);
    }
    store_dv(acc, at);
}
// dK += dSᵀ·Q.
fn dk_frag(kb: u32, cb: u32) {
    let at = kb * 16u * OLD + cb * 16u;
    var acc = coopLoadT<coop_mat16x16<f32, C>>(&sdk[at], OLD);
    for (var rr = 0u; rr < BQ / 16u; rr++) {
        let a = coopLoad<coop_mat16x16<f16, A>>(&sp[rr * 16u * PLD + kb * 16u], PLD);
        let b = coopLoadT<coop_mat16x16<f16, B>>(&sq[rr * 16u * KLD + cb * 4u], KLD);
        acc = coopMultiplyAdd(a, b, acc);
    }
    store_dk(acc, at);
}

// Whether query q0 + r may see key k0 + c (both in range, causal mask).
fn visible(q0: u32, k0: u32, r: u32, c: u32) -> bool {
    let qi = q0 + r;
    let kj = k0 + c;
    return qi < p.lq && kj < p.lk && !(p.causal != 0u && kj > qi);
}

@compute @workgroup_size(WG)
fn attnb_dq_coop(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32,
                 @builtin(subgroup_id) sid: u32) {
    let bh = wg.y;
    let b = bh / p.heads;
    let h = bh % p.heads;
    let q0 = wg.x * BQ;
    let qbase = (p.off_q + b * p.lq * p.ldq + h * p.d) / 8u;
    let kbase = (p.off_k + b * p.lk * p.ldk + h * p.d) / 8u;
    let vbase = (p.off_v + b * p.lk * p.ldv + h * p.d) / 8u;
    let dobase = p.off_do + b * p.lq * p.lddo + h * p.d;
    let sl = p.scale * LOG2E;

    load_tile(0u, BQ, q0, p.lq, qbase, p.ldq / 8u, t);
    load_do_tile(q0, dobase, t);
    for (var i = t; i < SQACC_LEN; i += WG) { sdq[i] = 0.0; }
    workgroupBarrier();

    var kend = p.lk;
    if (p.causal != 0u) { kend = min(kend, q0 + BQ); }
    var pr: array<f32, 8>;
    for (var k0 = 0u; k0 < kend; k0 += BK) {
        load_tile(1u, BK, k0, p.lk, kbase, p.ldk / 8u, t);
        load_tile(2u, BK, k0, p.lk, vbase, p.ldv / 8u, t);
        workgroupBarrier();
        for (var f = sid; f < (BQ / 16u) * (BK / 16u); f += WARPS) { s_frag(f / (BK / 16u), f % (BK / 16u)); }
        workgroupBarrier();
        for (var n = 0u; n < 8u; n++) {
            if (n < NE) {
                let e = t + n * WG;
                let r = e / BK;
                let c = e % BK;
                var pij = 0.0;
                if (visible(q0, k0, r, c)) {
                    let lse = stats[bh * p.lq + q0 + r].x;
                    pij = exp2(min(ss[r * SLD + c] * sl - lse, 0.0));
                }
                pr[n] = pij;
                sp[r * PLD + c] = f16(pij);
            }
        }
        workgroupBarrier();
        for (var f = sid; f < (BQ / 16u) * (BK / 16u); f += WARPS) { dp_frag(f / (BK / 16u), f % (BK / 16u)); }
        workgroupBarrier();
        for (var n = 0u; n < 8u; n++) {
            if (n < NE) {
                let e = t + n * WG;
                let r = e / BK;
                let c = e % BK;
                var ds = 0.0;
                if (visible(q0, k0, r, c)) {
                    let dd = stats[bh * p.lq + q0 + r].y;
                    ds = pr[n] * (ss[r * SLD + c] - dd);
                }
                sp[r * PLD + c] = f16(ds);
            }
        }
        workgroupBarrier();
        // dQ += dS·K.
        for (var f = sid; f < (BQ / 16u) * NDF; f += WARPS) { dq_frag(f / NDF, f % NDF); }
        workgroupBarrier();
    }

    // dq = dQ·scale, octet c of row r.
    let d8 = p.d / 8u;
    for (var e = t; e < BQ * d8; e += WG) {
        let r = e / d8;
        let c = e % d8;
        let qi = q0 + r;
        if (qi < p.lq) {
            let at = r * OLD + 8u * c;
            let lo = vec4<f32>(sdq[at], sdq[at + 1u], sdq[at + 2u], sdq[at + 3u]) * p.scale;
            let hi = vec4<f32>(sdq[at + 4u], sdq[at + 5u], sdq[at + 6u], sdq[at + 7u]) * p.scale;
            let el = p.off_dq + (b * p.lq + qi) * p.lddq + h * p.d + 8u * c;
            if (OUT_F32) {
                g0[el / 4u] = bitcast<vec4<u32>>(lo);
                g0[el / 4u + 1u] = bitcast<vec4<u32>>(hi);
            } else {
                g0[el / 8u] = vec4<u32>(pack2x16float(lo.xy), pack2x16float(lo.zw),
                                        pack2x16float(hi.xy), pack2x16float(hi.zw));
            }
        }
    }
}

@compute @workgroup_size(WG)
fn attnb_dkv_coop(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32,
                  @builtin(subgroup_id) sid: u32) {
    let bh = wg.y;
    let b = bh / p.heads;
    let h = bh % p.heads;
    let k0 = wg.x * BK;
    let qbase = (p.off_q + b * p.lq * p.ldq + h * p.d) / 8u;
    let kbase = (p.off_k + b * p.lk * p.ldk + h * p.d) / 8u;
    let vbase = (p.off_v + b * p.lk * p.ldv + h * p.d) / 8u;
    let dobase = p.off_do + b * p.lq * p.lddo + h * p.d;
    let sl = p.scale * LOG2E;

    load_tile(1u, BK, k0, p.lk, kbase, p.ldk / 8u, t);
    load_tile(2u, BK, k0, p.lk, vbase, p.ldv / 8u, t);
    for (var i = t; i < SKACC_LEN; i += WG) {
        sdk[i] = 0.0;
        sdv[i] = 0.0;
    }
    workgroupBarrier();   // the output loop reads other invocations' zeros when no query block comes

    // Causal: queries before k0 see none of these keys.
    var qstart = 0u;
    if (p.causal != 0u) { qstart = (k0 / BQ) * BQ; }
    let splits = max(p.splits, 1u);
    var pr: array<f32, 8>;
    for (var q0 = qstart + wg.z * BQ; q0 < p.lq; q0 += splits * BQ) {
        load_tile(0u, BQ, q0, p.lq, qbase, p.ldq / 8u, t);
        load_do_tile(q0, dobase, t);
        workgroupBarrier();
        for (var f = sid; f < (BQ / 16u) * (BK / 16u); f += WARPS) { s_frag(f / (BK / 16u), f % (BK / 16u)); }
        workgroupBarrier();
        for (var n = 0u; n < 8u; n++) {
            if (n < NE) {
                let e = t + n * WG;
                let r = e / BK;
                let c = e % BK;
                var pij = 0.0;
                if (visible(q0, k0, r, c)) {
                    let lse = stats[bh * p.lq + q0 + r].x;
                    pij = exp2(min(ss[r * SLD + c] * sl - lse, 0.0));
                }
                pr[n] = pij;
                sp[r * PLD + c] = f16(pij);
            }
        }
        workgroupBarrier();
        // dP = dO·Vᵀ -> ss, and dV += Pᵀ·dO.
        for (var f = sid; f < (BQ / 16u) * (BK / 16u); f += WARPS) { dp_frag(f / (BK / 16u), f % (BK / 16u)); }
        for (var f = sid; f < (BK / 16u) * NDF; f += WARPS) { dv_frag(f / NDF, f % NDF); }
        workgroupBarrier();
        for (var n = 0u; n < 8u; n++) {
            if (n < NE) {
                let e = t + n * WG;
                let r = e / BK;
                let c = e % BK;
                var ds = 0.0;
                if (visible(q0, k0, r, c)) {
                    let dd = stats[bh * p.lq + q0 + r].y;
                    ds = pr[n] * (ss[r * SLD + c] - dd);
                }
                sp[r * PLD + c] = f16(ds);
            }
        }
        workgroupBarrier();
        // dK += dSᵀ·Q.
        for (var f = sid; f < (BK / 16u) * NDF; f += WARPS) { dk_frag(f / NDF, f % NDF); }
        workgroupBarrier();
    }

    // dk = dK·scale, dv = dV (or the unscaled f32 partials of split z), octet c of key row r.
    let d8 = p.d / 8u;
    for (var e = t; e < BK * d8; e += WG) {
        let r = e / d8;
        let c = e % d8;
        let kj = k0 + r;
        if (kj < p.lk) {
            let at = r * OLD + 8u * c;
            var klo = vec4<f32>(sdk[at], sdk[at + 1u], sdk[at + 2u], sdk[at + 3u]);
            var khi = vec4<f32>(sdk[at + 4u], sdk[at + 5u], sdk[at + 6u], sdk[at + 7u]);
            let vlo = vec4<f32>(sdv[at], sdv[at + 1u], sdv[at + 2u], sdv[at + 3u]);
            let vhi = vec4<f32>(sdv[at + 4u], sdv[at + 5u], sdv[at + 6u], sdv[at + 7u]);
            if (splits > 1u) {
                // Partials, f32 [splits, batch, lk, heads·d], unscaled: 2 words per octet.
                let w = (((wg.z * p.batch + b) * p.lk + kj) * p.heads * p.d + h * p.d + 8u * c) / 4u;
                g0[w] = bitcast<vec4<u32>>(klo);
                g0[w + 1u] = bitcast<vec4<u32>>(khi);
                g1[w] = bitcast<vec4<u32>>(vlo);
                g1[w + 1u] = bitcast<vec4<u32>>(vhi);
            } else {
                klo *= p.scale;
                khi *= p.scale;
                let ek = p.off_dk + (b * p.lk + kj) * p.lddk + h * p.d + 8u * c;
                let ev = p.off_dv + (b * p.lk + kj) * p.lddv + h * p.d + 8u * c;
                if (OUT_F32) {
                    g0[ek / 4u] = bitcast<vec4<u32>>(klo);
                    g0[ek / 4u + 1u] = bitcast<vec4<u32>>(khi);
                    g1[ev / 4u] = bitcast<vec4<u32>>(vlo);
                    g1[ev / 4u + 1u] = bitcast<vec4<u32>>(vhi);
                } else {
                    g0[ek / 8u] = vec4<u32>(pack2x16float(klo.xy), pack2x16float(klo.zw),
                                            pack2x16float(khi.xy), pack2x16float(khi.zw));
                    g1[ev / 8u] = vec4<u32>(pack2x16float(vlo.xy), pack2x16float(vlo.zw),
                                            pack2x16float(vhi.xy), pack2x16float(vhi.zw));
                }
            }
        }
    }
}
