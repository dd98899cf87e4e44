// grad_ops.wgsl — backward kernels of the UNet's small ops, and the training loss:
// activation backward (SiLU, erf GELU, quick-GELU), GEGLU backward, nearest-upsample backward
// (2x or to a size), the column-slice copy that makes concat backward, and the MSE loss with
// its gradient.
//
// Layout: channels-last ([batch, H, W, C] / token-major [rows, C]), flat row-major.
// Dtypes: saved forward inputs (x, pred, target) are f16; gradients (dy, dx, dpred) are f16
// by default or f32 with GRAD_F32 (dy and dx always share the dtype); the loss and its
// partial sums are f32; arithmetic is f32. Everything is read and written as u32 words:
// f16 as packed pairs (unpack2x16float, so no shader-f16 is needed), f32 by bitcast.
// Each invocation owns one pair of elements (2e, 2e+1) — one f16 word, two f32 words — so no
// two invocations write the same word; channel counts are even, and for flat tensors of odd
// length the last pair's second element is storage padding (tensors are padded to 16 bytes),
// which may be overwritten and is never read into a result.
// Dispatch: 256 invocations per workgroup; pair u = (wg.y·num_wg.x + wg.x)·256 + local index,
// u < ceil(p.n / 2). The MSE's first stage uses one workgroup per 4096-element chunk, its
// second a single workgroup: a fixed tree order, so the loss is deterministic.
// Gradients overwrite (=), except where `flags & 1` asks slice_cols to add (skip streams).
// Saves nothing for backward.
//
//   act_bwd     dx = dy · f'(x), f = SiLU (op 0), erf GELU (op 1), quick-GELU (op 2)
//   geglu_bwd   x = [a | g] [rows, 2f] (gate second, as diffusers' GEGLU), dy [rows, f]:
//               dx = [dy·gelu(g) | dy·a·gelu'(g)]                       (c1 = f)
//   upsample_bwd  dx[b, iy, ix, c] = Σ dy[b, oy, ox, c] over the output pixels whose source
//               pixel (floor(o·in/out), as the forward) is (iy, ix): a gather, no atomics
//   slice_cols  dst[r, j] (+)= src[r, c2 + j] for j < c1, src rows w elements long;
//               concat backward is two of them (da = columns 0..c1, db = c1..c1+c2)
//   mse_partial dpred = alpha·(pred - target) (alpha = 2·scale/n), and partial[k] =
//               Σ (pred - target)² over chunk k (f32)
//   mse_final   loss[0] = alpha · Σ_k partial[k]      (alpha = 1/n: the mean)

struct Params {
    n: u32,       // elements the launch covers (see above; mse_final: partial count)
    c1: u32,      // channels: geglu f, upsample C, slice_cols columns copied
    c2: u32,      // slice_cols: first source column
    op: u32,      // act_bwd: 0 silu, 1 gelu (erf), 2 quick-gelu
    h: u32,       // upsample: input height
    w: u32,       // upsample: input width; slice_cols: source row length
    oh: u32,      // upsample: output height
    ow: u32,      // upsample: output width
    alpha: f32,   // mse: the gradient's (or the mean's) factor
    flags: u32,   // slice_cols: 1 = add into dst
    _pad0: u32,
    _pad1: u32,
}

override GRAD_F32: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;
@group(0) @binding(3) var<storage, read> aux: array<u32>;
@group(0) @binding(4) var<storage, read_write> dst2: array<u32>;

const INV_SQRT2: f32 = 0.70710678118654752;
const INV_SQRT_2PI: f32 = 0.39894228040143268;
const CHUNK: u32 = 4096u;   // mse_partial: elements per workgroup (256 invocations x 8 pairs)

var<workgroup> red: array<f32, 256>;

fn pair_index(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wg.y * nwg.x + wg.x) * 256u + lid;
}

// Pair (e, e+1), e even, of each binding: f16 words or f32 words.
fn src_f16(e: u32) -> vec2<f32> { return unpack2x16float(src[e >> 1u]); }
fn aux_f16(e: u32) -> vec2<f32> { return unpack2x16float(aux[e >> 1u]); }

fn src_grad(e: u32) -> vec2<f32> {
    if (GRAD_F32) { return vec2<f32>(bitcast<f32>(src[e]), bitcast<f32>(src[e + 1u])); }
    return unpack2x16float(src[e >> 1u]);
}

fn aux_grad(e: u32) -> vec2<f32> {
    if (GRAD_F32) { return vec2<f32>(bitcast<f32>(aux[e]), bitcast<f32>(aux[e + 1u])); }
    return unpack2x16float(aux[e >> 1u]);
}

fn dst_grad(e: u32) -> vec2<f32> {
    if (GRAD_F32) { return vec2<f32>(bitcast<f32>(dst[e]), bitcast<f32>(dst[e + 1u])); }
    return unpack2x16float(dst[e >> 1u]);
}

fn store_dst(e: u32, v: vec2<f32>) {
    if (GRAD_F32) {
        dst[e] = bitcast<u32>(v.x);
        dst[e + 1u] = bitcast<u32>(v.y);
    } else {
        dst[e >> 1u] = pack2x16float(v);
    }
}

fn erf_approx(v: vec2<f32>) -> vec2<f32> {
    // Abramowitz-Stegun 7.1.26, as in elementwise.wgsl (~4e-7 absolute in f32).
    let s = sign(v);
    let z = abs(v);
    let t = 1.0 / (1.0 + 0.3275911 * z);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    return s * (1.0 - poly * exp(-z * z));
}

fn gelu(v: vec2<f32>) -> vec2<f32> {
    return 0.5 * v * (1.0 + erf_approx(v * INV_SQRT2));
}

// gelu'(v) = Φ(v) + v·φ(v).
fn gelu_grad(v: vec2<f32>) -> vec2<f32> {
    return 0.5 * (1.0 + erf_approx(v * INV_SQRT2)) + v * INV_SQRT_2PI * exp(-0.5 * v * v);
}

// d/dv of v·sigmoid(k·v) = s·(1 + k·v·(1 - s)), s = sigmoid(k·v): SiLU k = 1, quick-GELU 1.702.
// For very negative v, exp overflows to inf and s = 0: the result is 0, not NaN.
fn sig_grad(v: vec2<f32>, k: f32) -> vec2<f32> {
    let s = 1.0 / (1.0 + exp(-k * v));
    return s * (1.0 + k * v * (1.0 - s));
}

@compute @workgroup_size(256)
fn act_bwd(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let e = 2u * pair_index(wg, nwg, lid);
    if (e >= p.n) { return; }
    let x = src_f16(e);
    var d: vec2<f32>;
    switch (p.op) {
        case 0u: { d = sig_grad(x, 1.0); }
        case 1u: { d = gelu_grad(x); }
        default: { d = sig_grad(x, 1.702); }
    }
    store_dst(e, aux_grad(e) * d);
}

@compute @workgroup_size(256)
fn geglu_bwd(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let e = 2u * pair_index(wg, nwg, lid);
    if (e >= p.n) { return; }
    let f = p.c1;
    let r = e / f;
    let j = e % f;
    let ia = r * 2u * f + j;
    let a = src_f16(ia);
    let g = src_f16(ia + f);
    let d = aux_grad(e);
    store_dst(ia, d * gelu(g));
    store_dst(ia + f, d * a * gelu_grad(g));
}

@compute @workgroup_size(256)
fn upsample_bwd(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let e = 2u * pair_index(wg, nwg, lid);
    if (e >= p.n) { return; }
    let c = p.c1;
    let ch = e % c;
    let pix = e / c;
    let ix = pix % p.w;
    let iy = (pix / p.w) % p.h;
    let img = pix / (p.w * p.h);
    // Output rows oy with floor(oy·h/oh) = iy: ceil(iy·oh/h) <= oy < ceil((iy+1)·oh/h).
    let y0 = (iy * p.oh + p.h - 1u) / p.h;
    let y1 = ((iy + 1u) * p.oh + p.h - 1u) / p.h;
    let x0 = (ix * p.ow + p.w - 1u) / p.w;
    let x1 = ((ix + 1u) * p.ow + p.w - 1u) / p.w;
    var acc = vec2<f32>(0.0);
    for (var oy = y0; oy < y1; oy++) {
        for (var ox = x0; ox < x1; ox++) {
            acc += src_grad(((img * p.oh + oy) * p.ow + ox) * c + ch);
        }
    }
    store_dst(e, acc);
}

@compute @workgroup_size(256)
fn slice_cols(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let e = 2u * pair_index(wg, nwg, lid);
    if (e >= p.n) { return; }
    let r = e / p.c1;
    let j = e % p.c1;
    var v = src_grad(r * p.w + p.c2 + j);
    if ((p.flags & 1u) != 0u) { v += dst_grad(e); }
    store_dst(e, v);
}

// Sums red[0..256) into red[0] in a fixed tree order; every invocation must call it.
fn reduce_workgroup(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) { red[lid] += red[lid + s]; }
        workgroupBarrier();
    }
    return red[0];
}

@compute @workgroup_size(256)
fn mse_partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let k = wg.y * nwg.x + wg.x;
    let nchunks = (p.n + CHUNK - 1u) / CHUNK;
    var sum = 0.0;
    for (var i = 0u; i < CHUNK / 512u; i++) {
        let e = k * CHUNK + 2u * (i * 256u + lid);
        if (k < nchunks && e < p.n) {
            let diff = src_f16(e) - aux_f16(e);
            store_dst(e, p.alpha * diff);
            sum += diff.x * diff.x;
            if (e + 1u < p.n) { sum += diff.y * diff.y; }
        }
    }
    let total = reduce_workgroup(lid, sum);
    if (lid == 0u && k < nchunks) { dst2[k] = bitcast<u32>(total); }
}

@compute @workgroup_size(256)
fn mse_final(@builtin(local_invocation_index) lid: u32) {
    var sum = 0.0;
    for (var k = lid; k < p.n; k += 256u) {
        sum += bitcast<f32>(src[k]);
    }
    let total = reduce_workgroup(lid, sum);
    if (lid == 0u) { dst[0] = bitcast<u32>(total * p.alpha); }
}
