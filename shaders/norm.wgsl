// norm.wgsl — group norm over channels-last activations (optionally fused with SiLU) and layer
// norm over rows; f16 storage, f32 statistics.
//
// Layout: group norm takes x as [batch, rows, C] (NHWC flattened: rows = H·W), C a multiple of
// 8 and at most 2560, `groups` groups of C/groups consecutive channels; layer norm takes
// [rows, C]. f16 tensors are read and written as vec4<u32> words of 8 halves
// (unpack2x16float), so no shader-f16 is needed; f32 scratch is bitcast from the same words.
//
// Group norm is three launches:
//   gn_stats  grid (nblocks, batch), 256 invocations: rows [blk·block, +block) of one item;
//             invocation t reads channel octets t % (C/8) (+256, ...) of rows lane, lane +
//             lanes, ... (lanes = 256 / (C/8)), so a subgroup reads consecutive words of a row.
//             Each keeps per-channel sums shifted by the block's first row (little
//             cancellation; one shift per channel, so the lanes' sums add up), four rows a
//             step with their loads issued together (H100, VAE decode: 0.1–0.35 ms less than
//             one row a step); then one invocation per channel adds its lanes' sums into
//             (mean, M2), and one per group merges its channels (equal counts: no division)
//             into one (count, mean, M2) per (item, block, group). (Each lane's own shift and
//             a Chan merge per lane and channel, 64 dependent merges by one invocation per
//             group, was the slower form: docs/PERF.md, group norm.)
//   gn_final  grid (batch·groups), 64 invocations: one workgroup per (item, group) merges
//             its blocks (each invocation every 64th, then a tree in workgroup memory: one
//             invocation per (item, group) walking all blocks took up to 44 us at the VAE's
//             512x512 maps, H100); writes (mean, 1/sqrt(var + eps)) — biased variance, as
//             PyTorch.
//   gn_apply  one invocation per 8 elements: y = (x - mean)·rstd·gamma + beta, then SiLU if
//             `silu`.
// Layer norm (ln): grid (rows), 64 invocations per row; mean, then variance of the centred
// values (two passes over the row, which stays in L1), then y = (x - mean)·rstd·gamma + beta.
// Saved for backward (norm_backward.wgsl): group norm's gn_final output, f32 [batch·groups, 4]
// = (mean, rstd, 0, 0) per (item, group), written to a caller's tensor when asked; layer norm's
// variant `ln_save` (same grid) also writes f32 [rows, 2] = (mean, rstd) per row to `saved`.

struct Params {
    rows: u32,      // group norm: rows per batch item; layer norm: rows
    c: u32,         // channels (row length)
    groups: u32,    // group norm groups
    block: u32,     // gn_stats: rows per block
    nblocks: u32,   // gn_stats: blocks per item
    batch: u32,
    silu: u32,      // gn_apply: 1 applies SiLU after the affine
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
// gn_stats: x -> partials; gn_final: partials -> stats; gn_apply / ln: x -> y.
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> gamma: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> beta: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> stats: array<vec4<u32>>;
// ln_save only (no entry point uses both `stats` and `saved`): per-row (mean, rstd).
@group(0) @binding(5) var<storage, read_write> saved: array<vec2<f32>>;

const MAX_C: u32 = 2560u;

struct Oct { lo: vec4<f32>, hi: vec4<f32> }

fn unpack8(v: vec4<u32>) -> Oct {
    return Oct(vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y)),
               vec4<f32>(unpack2x16float(v.z), unpack2x16float(v.w)));
}

fn pack8(f: Oct) -> vec4<u32> {
    return vec4<u32>(pack2x16float(f.lo.xy), pack2x16float(f.lo.zw), pack2x16float(f.hi.xy), pack2x16float(f.hi.zw));
}

// Chan et al.'s merge of two (count, mean, M2) summaries.
fn merge(a: vec3<f32>, b: vec3<f32>) -> vec3<f32> {
    let n = a.x + b.x;
    if (n == 0.0) { return a; }
    let d = b.y - a.y;
    let f = b.x / n;
    return vec3<f32>(n, a.y + d * f, a.z + b.z + d * d * a.x * f);
}

// Per (lane, channel) shifted sums (lanes·C <= max(2048, C) <= MAX_C), then per channel
// (mean, M2) in lane 0's slots; the shift per channel.
var<workgroup> sh_s1: array<f32, MAX_C>;
var<workgroup> sh_s2: array<f32, MAX_C>;
var<workgroup> sh_shift: array<f32, MAX_C>;

// Eight values into sh_s1, sh_s2 or sh_shift at i.. (explicit stores: a private array indexed
// at run time would go to local memory; a workgroup pointer cannot be passed).
fn put_s1(i: u32, v: Oct) {
    sh_s1[i] = v.lo.x; sh_s1[i + 1u] = v.lo.y; sh_s1[i + 2u] = v.lo.z; sh_s1[i + 3u] = v.lo.w;
    sh_s1[i + 4u] = v.hi.x; sh_s1[i + 5u] = v.hi.y; sh_s1[i + 6u] = v.hi.z; sh_s1[i + 7u] = v.hi.w;
}
fn put_s2(i: u32, v: Oct) {
    sh_s2[i] = v.lo.x; sh_s2[i + 1u] = v.lo.y; sh_s2[i + 2u] = v.lo.z; sh_s2[i + 3u] = v.lo.w;
    sh_s2[i + 4u] = v.hi.x; sh_s2[i + 5u] = v.hi.y; sh_s2[i + 6u] = v.hi.z; sh_s2[i + 7u] = v.hi.w;
}
fn put_shift(i: u32, v: Oct) {
    sh_shift[i] = v.lo.x; sh_shift[i + 1u] = v.lo.y; sh_shift[i + 2u] = v.lo.z; sh_shift[i + 3u] = v.lo.w;
    sh_shift[i + 4u] = v.hi.x; sh_shift[i + 5u] = v.hi.y; sh_shift[i + 6u] = v.hi.z; sh_shift[i + 7u] = v.hi.w;
}

@compute @workgroup_size(256)
fn gn_stats(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let blk = wg.x;
    let b = wg.y;
    let oct = p.c / 8u;
    let lanes = max(1u, 256u / oct);
    let lane = t / oct;
    let r0 = blk * p.block;
    let r1 = min(r0 + p.block, p.rows);
    let base = b * p.rows * oct;   // in words
    if (lane < lanes) {
        for (var o = t % oct; o < oct; o += 256u) {
            // The shift is the block's first row, the same for every lane of a channel, so
            // the lanes' sums add up without a merge.
            let s = unpack8(src[base + r0 * oct + o]);
            var s1 = Oct(vec4<f32>(0.0), vec4<f32>(0.0));
            var s2 = s1;
            // This invocation's rows first + i·lanes, i < nr: four a step with their loads
            // issued together, then the rest one by one.
            let first = r0 + lane;
            let nr = select(0u, (r1 - first + lanes - 1u) / lanes, first < r1);
            let steps = nr / 4u;
            for (var q = 0u; q < steps; q++) {
                let r = first + 4u * q * lanes;
                let w0 = src[base + r * oct + o];
                let w1 = src[base + (r + lanes) * oct + o];
                let w2 = src[base + (r + 2u * lanes) * oct + o];
                let w3 = src[base + (r + 3u * lanes) * oct + o];
                let v0 = unpack8(w0); let v1 = unpack8(w1); let v2 = unpack8(w2); let v3 = unpack8(w3);
                let a0 = v0.lo - s.lo; let b0 = v0.hi - s.hi;
                let a1 = v1.lo - s.lo; let b1 = v1.hi - s.hi;
                let a2 = v2.lo - s.lo; let b2 = v2.hi - s.hi;
                let a3 = v3.lo - s.lo; let b3 = v3.hi - s.hi;
                s1.lo += (a0 + a1) + (a2 + a3); s1.hi += (b0 + b1) + (b2 + b3);
                s2.lo += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3); s2.hi += (b0 * b0 + b1 * b1) + (b2 * b2 + b3 * b3);
            }
            for (var i = 4u * steps; i < nr; i++) {
                let v = unpack8(src[base + (first + i * lanes) * oct + o]);
                let dl = v.lo - s.lo;
                let dh = v.hi - s.hi;
                s1.lo += dl; s1.hi += dh;
                s2.lo += dl * dl; s2.hi += dh * dh;
            }
            let i = lane * p.c + o * 8u;
            put_s1(i, s1);
            put_s2(i, s2);
            if (lane == 0u) { put_shift(o * 8u, s); }
        }
    }
    workgroupBarrier();
    // Per channel: the lanes' sums, then its mean and M2 over the block's n rows, written to
    // lane 0's slot (read by this invocation only).
    let n = f32(r1 - r0);
    for (var c = t; c < p.c; c += 256u) {
        var a1 = 0.0;
        var a2 = 0.0;
        for (var l = 0u; l < lanes; l++) {
            a1 += sh_s1[l * p.c + c];
            a2 += sh_s2[l * p.c + c];
        }
        sh_s1[c] = sh_shift[c] + a1 / n;
        sh_s2[c] = max(a2 - a1 * a1 / n, 0.0);
    }
    workgroupBarrier();
    // Per group: its channels' n rows each, merged (equal counts: the mean of the means, the
    // M2s plus n times the means' squared spread).
    if (t < p.groups) {
        let cg = p.c / p.groups;
        var mg = 0.0;
        for (var c = t * cg; c < (t + 1u) * cg; c++) { mg += sh_s1[c]; }
        mg /= f32(cg);
        var m2 = 0.0;
        for (var c = t * cg; c < (t + 1u) * cg; c++) {
            let d = sh_s1[c] - mg;
            m2 += sh_s2[c] + n * d * d;
        }
        dst[(b * p.nblocks + blk) * p.groups + t] = bitcast<vec4<u32>>(vec4<f32>(n * f32(cg), mg, m2, 0.0));
    }
}

var<workgroup> fin: array<vec3<f32>, 64>;

@compute @workgroup_size(64)
fn gn_final(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = wg.x;   // b * groups + g, the same for the whole workgroup
    if (i >= p.batch * p.groups) { return; }
    let b = i / p.groups;
    let g = i % p.groups;
    var acc = vec3<f32>(0.0);
    for (var k = t; k < p.nblocks; k += 64u) {
        acc = merge(acc, bitcast<vec4<f32>>(src[(b * p.nblocks + k) * p.groups + g]).xyz);
    }
    fin[t] = acc;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (t < s) { fin[t] = merge(fin[t], fin[t + s]); }
        workgroupBarrier();
    }
    if (t == 0u) {
        let a = fin[0];
        let var_ = a.z / max(a.x, 1.0);
        dst[i] = bitcast<vec4<u32>>(vec4<f32>(a.y, inverseSqrt(var_ + p.eps), 0.0, 0.0));
    }
}

fn affine(v: Oct, o: u32, mean: Oct, rstd: Oct) -> Oct {
    let g = unpack8(gamma[o]);
    let bt = unpack8(beta[o]);
    var y = Oct((v.lo - mean.lo) * rstd.lo * g.lo + bt.lo, (v.hi - mean.hi) * rstd.hi * g.hi + bt.hi);
    if (p.silu != 0u) {
        y = Oct(y.lo / (1.0 + exp(-y.lo)), y.hi / (1.0 + exp(-y.hi)));
    }
    return y;
}

fn stat(b: u32, c: u32) -> vec2<f32> {
    let g = c / (p.c / p.groups);
    return bitcast<vec4<f32>>(stats[b * p.groups + g]).xy;
}

@compute @workgroup_size(256)
fn gn_apply(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let u = (wg.y * nwg.x + wg.x) * 256u + lid;
    let oct = p.c / 8u;
    if (u >= p.batch * p.rows * oct) { return; }
    let o = u % oct;
    let b = u / (p.rows * oct);
    let c = o * 8u;
    // The octet's statistics: one group when groups hold a multiple of 8 channels, two when
    // they hold 4 (the VAE's 128 channels), else one read per channel.
    let cg = p.c / p.groups;
    var mean: Oct;
    var rstd: Oct;
    if (cg % 8u == 0u) {
        let s = stat(b, c);
        mean = Oct(vec4<f32>(s.x), vec4<f32>(s.x));
        rstd = Oct(vec4<f32>(s.y), vec4<f32>(s.y));
    } else if (cg == 4u) {
        let s = stat(b, c);
        let u = stat(b, c + 4u);
        mean = Oct(vec4<f32>(s.x), vec4<f32>(u.x));
        rstd = Oct(vec4<f32>(s.y), vec4<f32>(u.y));
    } else {
        let s0 = stat(b, c); let s1 = stat(b, c + 1u); let s2 = stat(b, c + 2u); let s3 = stat(b, c + 3u);
        let s4 = stat(b, c + 4u); let s5 = stat(b, c + 5u); let s6 = stat(b, c + 6u); let s7 = stat(b, c + 7u);
        mean = Oct(vec4<f32>(s0.x, s1.x, s2.x, s3.x), vec4<f32>(s4.x, s5.x, s6.x, s7.x));
        rstd = Oct(vec4<f32>(s0.y, s1.y, s2.y, s3.y), vec4<f32>(s4.y, s5.y, s6.y, s7.y));
    }
    dst[u] = pack8(affine(unpack8(src[u]), o, mean, rstd));
}

var<workgroup> red: array<f32, 64>;

// Sum of `v` over the 64 invocations of the workgroup (every invocation gets it).
fn sum64(t: u32, v: f32) -> f32 {
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

// One row of layer norm; returns (mean, rstd). (It must not touch `saved`: `ln` would then
// need a binding 5.)
fn ln_row(row: u32, t: u32) -> vec2<f32> {
    let oct = p.c / 8u;
    let base = row * oct;
    var s = 0.0;
    for (var o = t; o < oct; o += 64u) { s += hsum(unpack8(src[base + o])); }
    let mean = sum64(t, s) / f32(p.c);
    var q = 0.0;
    for (var o = t; o < oct; o += 64u) {
        let v = unpack8(src[base + o]);
        let dl = v.lo - mean;
        let dh = v.hi - mean;
        q += dot(dl, dl) + dot(dh, dh);
    }
    let rstd = inverseSqrt(sum64(t, q) / f32(p.c) + p.eps);
    let m = Oct(vec4<f32>(mean), vec4<f32>(mean));
    let r = Oct(vec4<f32>(rstd), vec4<f32>(rstd));
    for (var o = t; o < oct; o += 64u) {
        let v = unpack8(src[base + o]);
        let g = unpack8(gamma[o]);
        let bt = unpack8(beta[o]);
        dst[base + o] = pack8(Oct((v.lo - m.lo) * r.lo * g.lo + bt.lo, (v.hi - m.hi) * r.hi * g.hi + bt.hi));
    }
    return vec2<f32>(mean, rstd);
}

@compute @workgroup_size(64)
fn ln(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
      @builtin(local_invocation_index) t: u32) {
    let row = wg.y * nwg.x + wg.x;
    if (row >= p.rows) { return; }   // uniform across the workgroup
    _ = ln_row(row, t);
}

@compute @workgroup_size(64)
fn ln_save(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) t: u32) {
    let row = wg.y * nwg.x + wg.x;
    if (row >= p.rows) { return; }   // uniform across the workgroup
    let ms = ln_row(row, t);
    if (t == 0u) { saved[row] = ms; }
}
