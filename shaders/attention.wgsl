// attention.wgsl — scaled-dot-product attention o = softmax(q·kᵀ·scale [+ causal mask])·v per
// (batch, head), never materialising the score matrix: key blocks stream through workgroup
// memory and an online softmax (running max m and sum l, f32) rescales the accumulator.
// Scalar path: f16 storage read and written as vec4<u32> words of 8 halves
// (unpack2x16float), no shader-f16; all arithmetic in f32.
//
// Layout (token-major): q [batch, lq, heads·d], k and v [batch, lk, heads·d], o [batch, lq,
// heads·d], each given as (element offset, row stride in elements), so q, k and v can be column
// slices of one fused qkv tensor. Offsets, strides and d are multiples of 8 (whole words);
// head h occupies columns [h·d, (h+1)·d) of a row. Causal: query i sees keys 0..=i (top-left
// aligned, as CLIP). d/8 = P octets per row, P <= 64.
//
// Grid (ceil(lq / bq), batch·heads), 256 invocations. The launcher picks bq (query rows per
// workgroup, bq·P <= 256) and bk (keys per block, bk·P <= 1024, bq·bk <= 1024). Per key block:
//   1. K tile [bk, d] into workgroup memory (rows past lk zero-filled);
//   2. scores S [bq, bk] = q·kᵀ·scale·log2(e), spread over all invocations, masked entries
//      set to NEG;
//   3. V tile [bk, d] into the same workgroup memory;
//   4. invocation t < bq·P owns query row t / P and output columns 8·(t % P) .. +8 in
//      registers: it takes the block's row max, rescales acc and l by exp2(m - m_new), and
//      adds exp2(S - m_new)·v (the P invocations of a row do the same softmax arithmetic on
//      the same scores, so they agree without talking).
// Finally o = acc / l. No infinities are used (Metal's fast math): masked scores are NEG.
// Workgroup memory: 8 + 16 + 4 KiB.
// Saved for backward (override SAVE_LSE, for training; default false): per query row the
// softmax statistic lse2 = m + log2(l) = log2 Σ_j exp2(s_ij) (s in log2 units, as above) into
// lse f32 [batch·heads·lq] of vec2 (lse2, 0) at (b·heads + h)·lq + i: the layout and first
// component of attention_backward.wgsl's stats, so its attnb_delta only has to add D. Written
// by the row's invocation with octet 0. Without SAVE_LSE the binding is never touched (the
// launcher binds o there: the layout still lists it).

struct Params {
    batch: u32,
    heads: u32,
    lq: u32,
    lk: u32,
    d: u32,         // head dim, multiple of 8, <= 512
    causal: u32,    // 1: query i sees keys 0..=i
    bq: u32,        // query rows per workgroup
    bk: u32,        // keys per block
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
@group(0) @binding(1) var<storage, read> q: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read_write> o: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read_write> lse: array<vec2<f32>>;

override SAVE_LSE: bool = false;

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

var<workgroup> sq: array<vec4<u32>, 512>;    // Q tile [bq, P] octets
var<workgroup> skv: array<vec4<u32>, 1024>;  // K, then V tile [bk, P] octets
var<workgroup> ss: array<f32, 1024>;         // scores [bq, bk], log2 units

@compute @workgroup_size(256)
fn attn(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let P = p.d / 8u;
    let bq = p.bq;
    let bk = p.bk;
    let bh = wg.y;
    let b = bh / p.heads;
    let h = bh % p.heads;
    let q0 = wg.x * bq;
    // Words (8 halves) of row 0 of this (batch, head) in each tensor.
    let qbase = (p.off_q + b * p.lq * p.ldq + h * p.d) / 8u;
    let kbase = (p.off_k + b * p.lk * p.ldk + h * p.d) / 8u;
    let vbase = (p.off_v + b * p.lk * p.ldv + h * p.d) / 8u;
    let obase = (p.off_o + b * p.lq * p.ldo + h * p.d) / 8u;
    let ldq = p.ldq / 8u;
    let ldk = p.ldk / 8u;
    let ldv = p.ldv / 8u;
    let ldo = p.ldo / 8u;
    let sl = p.scale * LOG2E;

    for (var i = t; i < bq * P; i += WG) {
        let qi = q0 + i / P;
        var w = vec4<u32>(0u);
        if (qi < p.lq) { w = q[qbase + qi * ldq + i % P]; }
        sq[i] = w;
    }

    // This invocation's output row and octet.
    let r = t / P;
    let c = t % P;
    let owner = t < bq * P;
    let qi = q0 + r;
    var m = NEG;
    var l = 0.0;
    var acc = Oct(vec4<f32>(0.0), vec4<f32>(0.0));

    // Causal: rows q0 .. q0+bq-1 see no key past q0+bq-1.
    var kend = p.lk;
    if (p.causal != 0u) { kend = min(kend, q0 + bq); }
    for (var k0 = 0u; k0 < kend; k0 += bk) {
        let nk = min(bk, kend - k0);
        for (var i = t; i < bk * P; i += WG) {
            let j = i / P;
            var w = vec4<u32>(0u);
            if (j < nk) { w = k[kbase + (k0 + j) * ldk + i % P]; }
            skv[i] = w;
        }
        workgroupBarrier();
        for (var i = t; i < bq * bk; i += WG) {
            let rr = i / bk;
            let j = i % bk;
            var s = NEG;
            let masked = j >= nk || (p.causal != 0u && k0 + j > q0 + rr);
            if (!masked) {
                var a = vec4<f32>(0.0);
                for (var cc = 0u; cc < P; cc++) {
                    let x = unpack8(sq[rr * P + cc]);
                    let y = unpack8(skv[j * P + cc]);
                    a += x.lo * y.lo + x.hi * y.hi;
                }
                s = dot(a, vec4<f32>(1.0)) * sl;
            }
            ss[i] = s;
        }
        workgroupBarrier();
        for (var i = t; i < bk * P; i += WG) {
            let j = i / P;
            var w = vec4<u32>(0u);
            if (j < nk) { w = v[vbase + (k0 + j) * ldv + i % P]; }
            skv[i] = w;
        }
        workgroupBarrier();
        if (owner) {
            var mx = m;
            for (var j = 0u; j < nk; j++) { mx = max(mx, ss[r * bk + j]); }
            if (mx > NEG) {   // else every key so far is masked for this row
                let alpha = exp2(m - mx);
                l *= alpha;
                acc.lo *= alpha;
                acc.hi *= alpha;
                for (var j = 0u; j < nk; j++) {
                    let s = ss[r * bk + j];
                    let e = select(exp2(s - mx), 0.0, s <= NEG);
                    l += e;
                    let y = unpack8(skv[j * P + c]);
                    acc.lo += e * y.lo;
                    acc.hi += e * y.hi;
                }
                m = mx;
            }
        }
        workgroupBarrier();
    }

    if (owner && qi < p.lq) {
        let inv = select(0.0, 1.0 / l, l > 0.0);
        o[obase + qi * ldo + c] = pack8(Oct(acc.lo * inv, acc.hi * inv));
        if (SAVE_LSE && c == 0u) {
            // As attnb_stats: l >= 1 (key 0 is visible to every row).
            lse[bh * p.lq + qi] = vec2<f32>(m + log2(max(l, 1.0e-30)), 0.0);
        }
    }
}
