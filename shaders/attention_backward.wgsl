// attention_backward.wgsl — gradients dQ, dK, dV of o = softmax(q·kᵀ·scale [+ causal mask])·v
// per (batch, head), FlashAttention-2 style: the score matrix is never materialised; query and
// key blocks stream through workgroup memory and P = softmax(S) is recomputed block by block
// from per-row statistics. Scalar path: f16 storage read and written as vec4<u32> words of 8
// halves (unpack2x16float), no shader-f16; all arithmetic in f32.
//
// Layout (token-major, as attention.wgsl): q, o [batch, lq, heads·d]; k, v [batch, lk,
// heads·d]; dout like o; dq like q; dk, dv like k. Each given as (element offset, row stride
// in elements), so every operand may be a column slice of a fused tensor. Offsets, strides and
// d are multiples of 8; head h occupies columns [h·d, (h+1)·d). d/8 = P octets, P <= 64.
// Causal: query i sees keys 0..=i (top-left aligned, CLIP).
// dtypes: q, k, v, o f16. dout f16, or f32 with DO_F32. The output of each launch (dq, or dk
// and dv) f16, or f32 with OUT_F32 (written as 4 f32 per word, bitcast). Outputs are
// overwritten (activation grads). stats f32 [batch·heads·lq] of vec2 (lse2, D):
// lse2 = log2 Σ_j exp2(s_ij) with s in log2 units (q·k·scale·log2 e), D_i = Σ_c dO_ic·O_ic.
//
// Three launches (four with split queries), 256 invocations each; the launcher picks the tiles
// (bq, bk) so that the invocations owning an output octet fit (rows·P <= 256), tiles of q/k/v
// fit 256 words and the score block bq·bk <= 1024:
//   attnb_stats grid (ceil(lq / bq), batch·heads): recomputes the forward's softmax statistics
//               (when the forward saved none): Q tile in workgroup memory, K blocks streamed, scores
//               spread over all invocations, invocation r < bq keeps row r's running max and
//               sum; then D_r from o and dout (global, once per row). Writes stats.
//   attnb_delta grid (ceil(lq / 256), batch·heads), instead of attnb_stats when the forward
//               saved lse2 (attention.wgsl's SAVE_LSE, into this stats tensor): invocation t
//               owns query row 256·x + t and writes only D (stats[..].y), keeping lse2.
//               Memory-bound: reads o and dout once.
//   attnb_dq    grid (ceil(lq / bq), batch·heads): Q, dO tiles and the rows' stats resident;
//               per key block: K, V tiles; P = exp2(s - lse2), dP = dO·vᵀ, dS = P∘(dP - D)
//               [bq, bk] over all invocations; invocation t < bq·P owns dq row t / P, octet
//               t % P: dq += dS·k. Finally dq = acc·scale.
//   attnb_dkv   grid (ceil(lk / bk), batch·heads, splits): K, V tiles resident; per query block
//               (from the first that sees the keys when causal, qs): Q, dO tiles and stats; P
//               and dS as above; invocation t < bk·P owns key row t / P, octet t % P:
//               dv += Pᵀ·dO, dk += dSᵀ·q. Workgroup z takes the query blocks qs + z, qs + z +
//               splits, ... With splits = 1: dk = acc·scale, dv = acc into the outputs. With
//               splits > 1 (too few key blocks to fill the GPU, e.g. cross-attention over 77
//               keys): the unscaled f32 partials into pdk, pdv [splits, batch, lk, heads·d]
//               (dense), every element written (zeros where z saw no query). Keys no query
//               sees get zeros.
//   attnb_dkv_reduce  grid (ceil(batch·lk·heads·d / 8 / 256)), only with splits > 1:
//               invocation i owns octet i of [batch, lk, heads·d]: sums the splits' partials
//               in order z = 0, 1, ... (deterministic, no atomics), dk = sum·scale, dv = sum.
// Bindings: 1 q, 2 k, 3 o (stats) or v (dq, dkv), 4 dout, 5 stats, 6 dq (dq) or dk (dkv with
// splits = 1, reduce) or pdk (dkv with splits > 1), 7 dv or pdv likewise, 8 pdk and 9 pdv
// (read by the reduce). stats uses 1..5, delta 3..5, dq 1..6, dkv 1..7, the reduce 6..9.
// Workgroup memory: 3 x 4 KiB (q, k, v tiles) + 8 KiB (dO tile, f32) + 2 x 4 KiB (P, dS)
// + 512 B (row stats) = 28.5 KiB (stats, dq, dkv); none (reduce). No infinities (Metal's fast
// math): masked scores are NEG.
// Saves nothing.

struct Params {
    batch: u32,
    heads: u32,
    lq: u32,
    lk: u32,
    d: u32,         // head dim, multiple of 8, <= 512
    causal: u32,    // 1: query i sees keys 0..=i
    bq: u32,        // query rows per tile
    bk: u32,        // keys per tile
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
    splits: u32,    // attnb_dkv, reduce: query splits (1: no partials, no reduce)
    _pad1: u32,
    _pad2: u32,
}

override DO_F32: bool = false;
override OUT_F32: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> ov: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> dout: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read_write> stats: array<vec2<f32>>;
@group(0) @binding(6) var<storage, read_write> g0: array<vec4<u32>>;
@group(0) @binding(7) var<storage, read_write> g1: array<vec4<u32>>;
@group(0) @binding(8) var<storage, read> pdk: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read> pdv: array<vec4<f32>>;

const WG: u32 = 256u;
const NEG: f32 = -1.0e30;
const LOG2E: f32 = 1.4426950408889634;

struct Oct { lo: vec4<f32>, hi: vec4<f32> }

fn unpack8(w: vec4<u32>) -> Oct {
    return Oct(vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)),
               vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w)));
}

fn pack8(f: Oct) -> vec4<u32> {
    return vec4<u32>(pack2x16float(f.lo.xy), pack2x16float(f.lo.zw), pack2x16float(f.hi.xy), pack2x16float(f.hi.zw));
}

fn dot8(x: Oct, y: Oct) -> vec4<f32> {
    return x.lo * y.lo + x.hi * y.hi;
}

// dout octet starting at element e (a multiple of 8).
fn load_do(e: u32) -> Oct {
    if (DO_F32) {
        let w = e / 4u;
        return Oct(bitcast<vec4<f32>>(dout[w]), bitcast<vec4<f32>>(dout[w + 1u]));
    }
    return unpack8(dout[e / 8u]);
}

fn store_g0(e: u32, x: Oct) {
    if (OUT_F32) {
        let w = e / 4u;
        g0[w] = bitcast<vec4<u32>>(x.lo);
        g0[w + 1u] = bitcast<vec4<u32>>(x.hi);
    } else {
        g0[e / 8u] = pack8(x);
    }
}

fn store_g1(e: u32, x: Oct) {
    if (OUT_F32) {
        let w = e / 4u;
        g1[w] = bitcast<vec4<u32>>(x.lo);
        g1[w + 1u] = bitcast<vec4<u32>>(x.hi);
    } else {
        g1[e / 8u] = pack8(x);
    }
}

var<workgroup> sq: array<vec4<u32>, 256>;    // Q tile [rows, P] octets
var<workgroup> sk: array<vec4<u32>, 256>;    // K tile [keys, P] octets
var<workgroup> sv: array<vec4<u32>, 256>;    // V tile [keys, P] octets
var<workgroup> sdo: array<vec4<f32>, 512>;   // dO tile [rows, P] octets, 2 vec4 each
var<workgroup> sp: array<f32, 1024>;         // P [bq, bk] (stats: scores, log2 units)
var<workgroup> sds: array<f32, 1024>;        // dS [bq, bk]
var<workgroup> srow: array<vec2<f32>, 64>;   // (lse2, D) of the tile's query rows

// Element index of column 0 of head h, row i of an operand.
fn row_elem(off: u32, ld: u32, l: u32, b: u32, h: u32, i: u32) -> u32 {
    return off + (b * l + i) * ld + h * p.d;
}

// Q rows q0.. into sq (zeros past lq).
fn load_q_tile(b: u32, h: u32, q0: u32, rows: u32, t: u32) {
    let P = p.d / 8u;
    for (var i = t; i < rows * P; i += WG) {
        let qi = q0 + i / P;
        var w = vec4<u32>(0u);
        if (qi < p.lq) { w = q[(row_elem(p.off_q, p.ldq, p.lq, b, h, qi) + 8u * (i % P)) / 8u]; }
        sq[i] = w;
    }
}

// dO rows q0.. into sdo (zeros past lq), and the rows' stats into srow.
fn load_do_tile(b: u32, h: u32, q0: u32, rows: u32, t: u32) {
    let P = p.d / 8u;
    for (var i = t; i < rows * P; i += WG) {
        let qi = q0 + i / P;
        var x = Oct(vec4<f32>(0.0), vec4<f32>(0.0));
        if (qi < p.lq) { x = load_do(row_elem(p.off_do, p.lddo, p.lq, b, h, qi) + 8u * (i % P)); }
        sdo[2u * i] = x.lo;
        sdo[2u * i + 1u] = x.hi;
    }
    if (t < rows) {
        let qi = q0 + t;
        var s = vec2<f32>(0.0);
        if (qi < p.lq) { s = stats[(b * p.heads + h) * p.lq + qi]; }
        srow[t] = s;
    }
}

// K (and V when with_v) rows k0.. into sk, sv (zeros past lk).
fn load_kv_tile(b: u32, h: u32, k0: u32, keys: u32, t: u32, with_v: bool) {
    let P = p.d / 8u;
    for (var i = t; i < keys * P; i += WG) {
        let j = k0 + i / P;
        var wk = vec4<u32>(0u);
        var wv = vec4<u32>(0u);
        if (j < p.lk) {
            wk = k[(row_elem(p.off_k, p.ldk, p.lk, b, h, j) + 8u * (i % P)) / 8u];
            if (with_v) { wv = ov[(row_elem(p.off_v, p.ldv, p.lk, b, h, j) + 8u * (i % P)) / 8u]; }
        }
        sk[i] = wk;
        sv[i] = wv;
    }
}

// P and dS of the block [bq, bk] (query rows q0.., keys k0..) into sp, sds; zeros where
// masked or out of range. Needs sq, sdo, srow, sk, sv.
fn p_ds_block(q0: u32, k0: u32, t: u32) {
    let P = p.d / 8u;
    let bq = p.bq;
    let bk = p.bk;
    let sl = p.scale * LOG2E;
    for (var i = t; i < bq * bk; i += WG) {
        let r = i / bk;
        let j = i % bk;
        let masked = q0 + r >= p.lq || k0 + j >= p.lk || (p.causal != 0u && k0 + j > q0 + r);
        var pij = 0.0;
        var ds = 0.0;
        if (!masked) {
            var a = vec4<f32>(0.0);
            var g = vec4<f32>(0.0);
            for (var c = 0u; c < P; c++) {
                let x = unpack8(sq[r * P + c]);
                let y = unpack8(sk[j * P + c]);
                a += dot8(x, y);
                let dy = Oct(sdo[2u * (r * P + c)], sdo[2u * (r * P + c) + 1u]);
                let vv = unpack8(sv[j * P + c]);
                g += dot8(dy, vv);
            }
            let st = srow[r];
            pij = exp2(min(dot(a, vec4<f32>(1.0)) * sl - st.x, 0.0));
            ds = pij * (dot(g, vec4<f32>(1.0)) - st.y);
        }
        sp[i] = pij;
        sds[i] = ds;
    }
}

@compute @workgroup_size(256)
fn attnb_stats(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let P = p.d / 8u;
    let bq = p.bq;
    let bk = p.bk;
    let b = wg.y / p.heads;
    let h = wg.y % p.heads;
    let q0 = wg.x * bq;
    let sl = p.scale * LOG2E;
    load_q_tile(b, h, q0, bq, t);

    var m = NEG;
    var l = 0.0;
    var kend = p.lk;
    if (p.causal != 0u) { kend = min(kend, q0 + bq); }
    for (var k0 = 0u; k0 < kend; k0 += bk) {
        let nk = min(bk, kend - k0);
        load_kv_tile(b, h, k0, nk, t, false);
        workgroupBarrier();
        for (var i = t; i < bq * bk; i += WG) {
            let r = i / bk;
            let j = i % bk;
            var s = NEG;
            if (!(j >= nk || (p.causal != 0u && k0 + j > q0 + r))) {
                var a = vec4<f32>(0.0);
                for (var c = 0u; c < P; c++) {
                    a += dot8(unpack8(sq[r * P + c]), unpack8(sk[j * P + c]));
                }
                s = dot(a, vec4<f32>(1.0)) * sl;
            }
            sp[i] = s;
        }
        workgroupBarrier();
        if (t < bq) {
            var mx = m;
            for (var j = 0u; j < nk; j++) { mx = max(mx, sp[t * bk + j]); }
            if (mx > NEG) {
                l *= exp2(m - mx);
                for (var j = 0u; j < nk; j++) {
                    let s = sp[t * bk + j];
                    l += select(exp2(s - mx), 0.0, s <= NEG);
                }
                m = mx;
            }
        }
        workgroupBarrier();
    }

    let qi = q0 + t;
    if (t < bq && qi < p.lq) {
        let oe = row_elem(p.off_o, p.ldo, p.lq, b, h, qi);
        let de = row_elem(p.off_do, p.lddo, p.lq, b, h, qi);
        var dsum = vec4<f32>(0.0);
        for (var c = 0u; c < P; c++) {
            dsum += dot8(unpack8(ov[(oe + 8u * c) / 8u]), load_do(de + 8u * c));
        }
        // l >= 1 whenever a key is visible (always: lk >= 1, and key 0 is seen by every row).
        stats[wg.y * p.lq + qi] = vec2<f32>(m + log2(max(l, 1.0e-30)), dot(dsum, vec4<f32>(1.0)));
    }
}

@compute @workgroup_size(256)
fn attnb_delta(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let P = p.d / 8u;
    let b = wg.y / p.heads;
    let h = wg.y % p.heads;
    let qi = wg.x * WG + t;
    if (qi >= p.lq) { return; }
    let oe = row_elem(p.off_o, p.ldo, p.lq, b, h, qi);
    let de = row_elem(p.off_do, p.lddo, p.lq, b, h, qi);
    var dsum = vec4<f32>(0.0);
    for (var c = 0u; c < P; c++) {
        dsum += dot8(unpack8(ov[(oe + 8u * c) / 8u]), load_do(de + 8u * c));
    }
    stats[wg.y * p.lq + qi].y = dot(dsum, vec4<f32>(1.0));
}

@compute @workgroup_size(256)
fn attnb_dq(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let P = p.d / 8u;
    let bq = p.bq;
    let bk = p.bk;
    let b = wg.y / p.heads;
    let h = wg.y % p.heads;
    let q0 = wg.x * bq;
    load_q_tile(b, h, q0, bq, t);
    load_do_tile(b, h, q0, bq, t);

    let r = t / P;
    let c = t % P;
    let owner = t < bq * P;
    var acc = Oct(vec4<f32>(0.0), vec4<f32>(0.0));
    var kend = p.lk;
    if (p.causal != 0u) { kend = min(kend, q0 + bq); }
    for (var k0 = 0u; k0 < kend; k0 += bk) {
        let nk = min(bk, kend - k0);
        load_kv_tile(b, h, k0, bk, t, true);
        workgroupBarrier();
        p_ds_block(q0, k0, t);
        workgroupBarrier();
        if (owner) {
            for (var j = 0u; j < nk; j++) {
                let ds = sds[r * bk + j];
                let y = unpack8(sk[j * P + c]);
                acc.lo += ds * y.lo;
                acc.hi += ds * y.hi;
            }
        }
        workgroupBarrier();
    }

    let qi = q0 + r;
    if (owner && qi < p.lq) {
        store_g0(row_elem(p.off_dq, p.lddq, p.lq, b, h, qi) + 8u * c, Oct(acc.lo * p.scale, acc.hi * p.scale));
    }
}

@compute @workgroup_size(256)
fn attnb_dkv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let P = p.d / 8u;
    let bq = p.bq;
    let bk = p.bk;
    let b = wg.y / p.heads;
    let h = wg.y % p.heads;
    let k0 = wg.x * bk;
    load_kv_tile(b, h, k0, bk, t, true);

    let j = t / P;
    let c = t % P;
    let owner = t < bk * P;
    var dk = Oct(vec4<f32>(0.0), vec4<f32>(0.0));
    var dv = Oct(vec4<f32>(0.0), vec4<f32>(0.0));
    // Causal: queries before k0 see none of these keys.
    var qstart = 0u;
    if (p.causal != 0u) { qstart = (k0 / bq) * bq; }
    let splits = max(p.splits, 1u);
    for (var q0 = qstart + wg.z * bq; q0 < p.lq; q0 += splits * bq) {
        let nq = min(bq, p.lq - q0);
        load_q_tile(b, h, q0, bq, t);
        load_do_tile(b, h, q0, bq, t);
        workgroupBarrier();
        p_ds_block(q0, k0, t);
        workgroupBarrier();
        if (owner) {
            for (var r = 0u; r < nq; r++) {
                let pij = sp[r * bk + j];
                let ds = sds[r * bk + j];
                let x = unpack8(sq[r * P + c]);
                dk.lo += ds * x.lo;
                dk.hi += ds * x.hi;
                dv.lo += pij * sdo[2u * (r * P + c)];
                dv.hi += pij * sdo[2u * (r * P + c) + 1u];
            }
        }
        workgroupBarrier();
    }

    let kj = k0 + j;
    if (owner && kj < p.lk) {
        if (splits > 1u) {
            // Partials, f32 [splits, batch, lk, heads·d], unscaled: 2 words per octet.
            let w = (((wg.z * p.batch + b) * p.lk + kj) * p.heads * p.d + h * p.d + 8u * c) / 4u;
            g0[w] = bitcast<vec4<u32>>(dk.lo);
            g0[w + 1u] = bitcast<vec4<u32>>(dk.hi);
            g1[w] = bitcast<vec4<u32>>(dv.lo);
            g1[w + 1u] = bitcast<vec4<u32>>(dv.hi);
        } else {
            store_g0(row_elem(p.off_dk, p.lddk, p.lk, b, h, kj) + 8u * c, Oct(dk.lo * p.scale, dk.hi * p.scale));
            store_g1(row_elem(p.off_dv, p.lddv, p.lk, b, h, kj) + 8u * c, dv);
        }
    }
}

@compute @workgroup_size(256)
fn attnb_dkv_reduce(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let hd8 = p.heads * p.d / 8u;
    let n = p.batch * p.lk * hd8;   // octets per split
    let i = wg.x * WG + t;
    if (i >= n) { return; }
    var dk = Oct(vec4<f32>(0.0), vec4<f32>(0.0));
    var dv = Oct(vec4<f32>(0.0), vec4<f32>(0.0));
    for (var z = 0u; z < p.splits; z++) {
        let w = 2u * (z * n + i);
        dk.lo += pdk[w];
        dk.hi += pdk[w + 1u];
        dv.lo += pdv[w];
        dv.hi += pdv[w + 1u];
    }
    let row = i / hd8;   // b·lk + key
    let col = 8u * (i % hd8);
    store_g0(p.off_dk + row * p.lddk + col, Oct(dk.lo * p.scale, dk.hi * p.scale));
    store_g1(p.off_dv + row * p.lddv + col, dv);
}
