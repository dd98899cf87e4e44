// norm_backward.wgsl — input gradients (dX) of group norm (optionally fused with SiLU) and of
// layer norm, from the f32 statistics the forward saved (norm.wgsl: gn_final's output via
// GroupNorm::prepare_saving, and ln_save). f16 storage, f32 arithmetic.
//
// Layout: as the forward. Group norm: x, dy, dx [batch, rows, C] (NHWC flattened, rows = H·W),
// C a multiple of 8 and at most 2560, `groups` groups of C/groups consecutive channels; stats
// f32 [batch·groups, 4] = (mean, rstd, -, -). Layer norm: x, dy, dx [rows, C] (token-major), C
// a multiple of 8 (any size); stats f32 [rows, 2] = (mean, rstd). gamma, beta [C] f16.
// x, gamma and beta are f16; dy is f16, or f32 with DY_F32; dx is f16, or f32 with DX_F32.
// Every tensor is read and written as vec4<u32> words (8 halves through unpack2x16float, so
// no shader-f16 is needed; or 4 f32 through bitcast). dx is overwritten (an activation grad),
// or added into with ACCUMULATE (gnb_apply, ln_backward: the old dx, f16 or f32 per DX_F32,
// is read and the gradient added in f32 before the store; the residual stream's gradient).
// gamma and beta are frozen in LoRA training: no dgamma / dbeta here.
//
// Math (N elements per group or row; n = (x - mean)·rstd):
//   group norm: z = n·gamma + beta, y = silu(z) (or y = z); dz = dy·silu'(z) (or dy),
//               silu'(z) = s·(1 + z·(1 - s)), s = sigmoid(z) — z recomputed from x and the
//               stats; layer norm: dz = dy.
//   dn = dz·gamma;  dx = rstd·(dn - mean(dn) - n·mean(dn·n)), the means over the group / row
//   (exact for the biased variance + eps of the forward).
//
// Group norm is three launches:
//   gnb_reduce  grid (nblocks, batch), 256 invocations: rows [blk·block, +block) of one item,
//               read as in the forward's gn_stats (invocation t: channel octet t % (C/8) of
//               rows lane, lane + lanes, ...); per-channel sums of dn and dn·n in workgroup
//               memory, then per group: partials[(b·nblocks + blk)·groups + g] = (Σdn, Σdn·n).
//   gnb_final   grid (ceil(batch·groups / 64)), 64 invocations: one (item, group) each, sums
//               the blocks: coef[b·groups + g] = (mean, rstd, mean(dn), mean(dn·n)).
//   gnb_apply   one invocation per 8 elements (2-D grid of 256-wide workgroups): dx.
// Layer norm (ln_backward): grid (rows) (2-D past 65535), 64 invocations per row: the two
//   sums over the row, then dx (the row stays in L1).
// Saves nothing.

struct Params {
    rows: u32,      // group norm: rows per batch item; layer norm: rows
    c: u32,         // channels (row length)
    groups: u32,    // group norm groups
    block: u32,     // gnb_reduce: rows per block
    nblocks: u32,   // gnb_reduce: blocks per item
    batch: u32,
    silu: u32,      // group norm: 1 when the forward applied SiLU after the affine
    _pad: u32,
}

override DY_F32: bool = false;
override DX_F32: bool = false;
override ACCUMULATE: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
// Bindings per entry point (each uses 1..k):
//   gnb_reduce: dst = partials, a = x, b = dy, gamma, stats = forward stats, beta
//   gnb_final:  dst = coef, a = partials, b = forward stats
//   gnb_apply:  dst = dx, a = x, b = dy, gamma, stats = coef, beta
//   ln_backward: dst = dx, a = x, b = dy, gamma, stats = forward row stats
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> a: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> b: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> gamma: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> stats: array<vec4<u32>>;
@group(0) @binding(6) var<storage, read> beta: array<vec4<u32>>;

const MAX_C: u32 = 2560u;

struct Oct { lo: vec4<f32>, hi: vec4<f32> }

fn unpack8(v: vec4<u32>) -> Oct {
    return Oct(vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y)),
               vec4<f32>(unpack2x16float(v.z), unpack2x16float(v.w)));
}

fn pack8(f: Oct) -> vec4<u32> {
    return vec4<u32>(pack2x16float(f.lo.xy), pack2x16float(f.lo.zw), pack2x16float(f.hi.xy), pack2x16float(f.hi.zw));
}

// dy elements 8u .. 8u+8.
fn load_dy(u: u32) -> Oct {
    if (DY_F32) { return Oct(bitcast<vec4<f32>>(b[2u * u]), bitcast<vec4<f32>>(b[2u * u + 1u])); }
    return unpack8(b[u]);
}

// dx elements 8u .. 8u+8 as they are (ACCUMULATE reads them before the store).
fn load_dx(u: u32) -> Oct {
    if (DX_F32) { return Oct(bitcast<vec4<f32>>(dst[2u * u]), bitcast<vec4<f32>>(dst[2u * u + 1u])); }
    return unpack8(dst[u]);
}

// dx elements 8u .. 8u+8 = f, or += f with ACCUMULATE (added in f32, stored once).
fn store_dx(u: u32, f: Oct) {
    var v = f;
    if (ACCUMULATE) {
        let old = load_dx(u);
        v = Oct(old.lo + f.lo, old.hi + f.hi);
    }
    if (DX_F32) {
        dst[2u * u] = bitcast<vec4<u32>>(v.lo);
        dst[2u * u + 1u] = bitcast<vec4<u32>>(v.hi);
    } else {
        dst[u] = pack8(v);
    }
}

fn dsilu(z: vec4<f32>) -> vec4<f32> {
    let s = 1.0 / (1.0 + exp(-z));
    return s * (1.0 + z * (1.0 - s));
}

// Per channel of one group norm octet: mean, rstd (and for gnb_apply: mean(dn), mean(dn·n)).
struct Coef { mean: Oct, rstd: Oct, ma: Oct, mb: Oct }

fn coef(item: u32, c: u32) -> Coef {
    let cg = p.c / p.groups;
    var v: array<vec4<f32>, 8>;
    for (var k = 0u; k < 8u; k++) {
        v[k] = bitcast<vec4<f32>>(stats[item * p.groups + (c + k) / cg]);
    }
    return Coef(Oct(vec4<f32>(v[0].x, v[1].x, v[2].x, v[3].x), vec4<f32>(v[4].x, v[5].x, v[6].x, v[7].x)),
                Oct(vec4<f32>(v[0].y, v[1].y, v[2].y, v[3].y), vec4<f32>(v[4].y, v[5].y, v[6].y, v[7].y)),
                Oct(vec4<f32>(v[0].z, v[1].z, v[2].z, v[3].z), vec4<f32>(v[4].z, v[5].z, v[6].z, v[7].z)),
                Oct(vec4<f32>(v[0].w, v[1].w, v[2].w, v[3].w), vec4<f32>(v[4].w, v[5].w, v[6].w, v[7].w)));
}

// n and dn of one group norm octet (o: octet index within the row).
struct Grad { n: Oct, dn: Oct }

fn gn_grad(xv: Oct, d: Oct, o: u32, k: Coef) -> Grad {
    let g = unpack8(gamma[o]);
    let n = Oct((xv.lo - k.mean.lo) * k.rstd.lo, (xv.hi - k.mean.hi) * k.rstd.hi);
    var dz = d;
    if (p.silu != 0u) {
        let bt = unpack8(beta[o]);
        dz = Oct(d.lo * dsilu(n.lo * g.lo + bt.lo), d.hi * dsilu(n.hi * g.hi + bt.hi));
    }
    return Grad(n, Oct(dz.lo * g.lo, dz.hi * g.hi));
}

// Per (lane, channel) sums: lanes·C <= max(2048, C) <= MAX_C.
var<workgroup> sh_a: array<f32, MAX_C>;
var<workgroup> sh_b: array<f32, MAX_C>;

fn put8(i: u32, va: Oct, vb: Oct) {
    sh_a[i] = va.lo.x; sh_a[i + 1u] = va.lo.y; sh_a[i + 2u] = va.lo.z; sh_a[i + 3u] = va.lo.w;
    sh_a[i + 4u] = va.hi.x; sh_a[i + 5u] = va.hi.y; sh_a[i + 6u] = va.hi.z; sh_a[i + 7u] = va.hi.w;
    sh_b[i] = vb.lo.x; sh_b[i + 1u] = vb.lo.y; sh_b[i + 2u] = vb.lo.z; sh_b[i + 3u] = vb.lo.w;
    sh_b[i + 4u] = vb.hi.x; sh_b[i + 5u] = vb.hi.y; sh_b[i + 6u] = vb.hi.z; sh_b[i + 7u] = vb.hi.w;
}

@compute @workgroup_size(256)
fn gnb_reduce(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let blk = wg.x;
    let item = wg.y;
    let oct = p.c / 8u;
    let lanes = max(1u, 256u / oct);
    let lane = t / oct;
    let r0 = blk * p.block;
    let r1 = min(r0 + p.block, p.rows);
    let base = item * p.rows * oct;   // in octets
    if (lane < lanes) {
        for (var o = t % oct; o < oct; o += 256u) {
            let k = coef(item, o * 8u);
            var sa = Oct(vec4<f32>(0.0), vec4<f32>(0.0));
            var sb = sa;
            for (var r = r0 + lane; r < r1; r += lanes) {
                let u = base + r * oct + o;
                let gr = gn_grad(unpack8(a[u]), load_dy(u), o, k);
                sa.lo += gr.dn.lo; sa.hi += gr.dn.hi;
                sb.lo += gr.dn.lo * gr.n.lo; sb.hi += gr.dn.hi * gr.n.hi;
            }
            put8(lane * p.c + o * 8u, sa, sb);
        }
    }
    workgroupBarrier();
    if (t < p.groups) {
        let cg = p.c / p.groups;
        var acc = vec2<f32>(0.0);
        for (var l = 0u; l < lanes; l++) {
            var part = vec2<f32>(0.0);
            for (var c = t * cg; c < (t + 1u) * cg; c++) {
                part += vec2<f32>(sh_a[l * p.c + c], sh_b[l * p.c + c]);
            }
            acc += part;
        }
        dst[(item * p.nblocks + blk) * p.groups + t] = bitcast<vec4<u32>>(vec4<f32>(acc, 0.0, 0.0));
    }
}

@compute @workgroup_size(64)
fn gnb_final(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;   // item * groups + g
    if (i >= p.batch * p.groups) { return; }
    let item = i / p.groups;
    let g = i % p.groups;
    var acc = vec2<f32>(0.0);
    for (var k = 0u; k < p.nblocks; k++) {
        acc += bitcast<vec4<f32>>(a[(item * p.nblocks + k) * p.groups + g]).xy;
    }
    let n = f32(p.rows) * f32(p.c / p.groups);
    let st = bitcast<vec4<f32>>(b[i]);
    dst[i] = bitcast<vec4<u32>>(vec4<f32>(st.x, st.y, acc / n));
}

@compute @workgroup_size(256)
fn gnb_apply(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let u = (wg.y * nwg.x + wg.x) * 256u + lid;
    let oct = p.c / 8u;
    if (u >= p.batch * p.rows * oct) { return; }
    let o = u % oct;
    let k = coef(u / (p.rows * oct), o * 8u);
    let gr = gn_grad(unpack8(a[u]), load_dy(u), o, k);
    store_dx(u, Oct(k.rstd.lo * (gr.dn.lo - k.ma.lo - gr.n.lo * k.mb.lo),
                    k.rstd.hi * (gr.dn.hi - k.ma.hi - gr.n.hi * k.mb.hi)));
}

var<workgroup> red: array<vec2<f32>, 64>;

// Sums of `v` over the 64 invocations of the workgroup (every invocation gets them).
fn sum64(t: u32, v: vec2<f32>) -> vec2<f32> {
    red[t] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (t < s) { red[t] += red[t + s]; }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn hsum(v: Oct) -> f32 {
    return dot(v.lo, vec4<f32>(1.0)) + dot(v.hi, vec4<f32>(1.0));
}

@compute @workgroup_size(64)
fn ln_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) t: u32) {
    let row = wg.y * nwg.x + wg.x;
    if (row >= p.rows) { return; }   // uniform across the workgroup
    let oct = p.c / 8u;
    let base = row * oct;
    let sw = bitcast<vec4<f32>>(stats[row / 2u]);
    let st = select(sw.xy, sw.zw, (row & 1u) == 1u);
    let mean = st.x;
    let rstd = st.y;
    var s = vec2<f32>(0.0);
    for (var o = t; o < oct; o += 64u) {
        let v = unpack8(a[base + o]);
        let d = load_dy(base + o);
        let g = unpack8(gamma[o]);
        let dn = Oct(d.lo * g.lo, d.hi * g.hi);
        let n = Oct((v.lo - mean) * rstd, (v.hi - mean) * rstd);
        s += vec2<f32>(hsum(dn), dot(dn.lo, n.lo) + dot(dn.hi, n.hi));
    }
    let m = sum64(t, s) / f32(p.c);
    for (var o = t; o < oct; o += 64u) {
        let v = unpack8(a[base + o]);
        let d = load_dy(base + o);
        let g = unpack8(gamma[o]);
        let n = Oct((v.lo - mean) * rstd, (v.hi - mean) * rstd);
        store_dx(base + o, Oct(rstd * (d.lo * g.lo - m.x - n.lo * m.y), rstd * (d.hi * g.hi - m.x - n.hi * m.y)));
    }
}
