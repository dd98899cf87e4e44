// tensor_ops.wgsl — the small data-movement and embedding ops around the networks' heavy
// kernels: nearest upsample (2x, or to a size) and channel concat over channels-last images, GEGLU, the
// sinusoidal timestep embedding and the token + position embedding.
//
// Layout: channels-last ([batch, H, W, C] / [rows, C]); f16 tensors read and written as
// packed u32 words of two halves (unpack2x16float: no shader-f16 needed), so channel counts
// and feature sizes are even and every invocation owns one output word (two elements).
// Dispatch: 256 invocations per workgroup; word u = (wg.y·num_wg.x + wg.x)·256 + local index,
// u < p.words. Arithmetic is f32. Saves nothing for backward.
//
//   upsample2x  y[b, oy, ox, c] = x[b, oy·h/oh, ox·w/ow, c]       (nearest to a size: h, w in,
//               oh, ow out (2h, 2w for the 2x upsample); c1: C)
//   concat      y[r, c] = c < c1 ? a[r, c] : b[r, c - c1]        (C = c1 + c2)
//   geglu       y[r, j] = x[r, j] · gelu(x[r, f + j])             (x [rows, 2f]; c1 = f; erf GELU)
//   timestep    y[b, j] = cos(t_b·w_j) for j < half, sin(t_b·w_(j-half)) after, with
//               w_j = exp(-ln(10000)·j / (half - shift)), half = c1 / 2 (diffusers'
//               get_timestep_embedding with flip_sin_to_cos; t is f32 [batch])
//   embed       y[b, l, :] = tok[ids[b, l], :] + pos[l, :]       (ids u32 [batch, l]; c1 = D, h = L,
//               w = vocabulary size)
//   softmax_rows y[r, j] = exp(s[r, j] - max_r) / Σ_j exp(s[r, j] - max_r) for j < c1, 0 for
//               c1 <= j < c2 (y's row stride, even): s f32 [h, c1] in a, y f16 [h, c2]. One
//               workgroup of 256 per row (grid folded to 2-D), max and sum by fixed-order
//               trees in workgroup memory, arithmetic in f32 (the scores of an attention whose
//               head is too wide for the flash kernels' registers, e.g. the VAE's 512)

struct Params {
    words: u32,   // output words (2 elements each)
    c1: u32,      // channels / features (see the table above)
    c2: u32,      // concat: channels of the second input
    h: u32,       // upsample: input height; embed: sequence length
    w: u32,       // upsample: input width; embed: vocabulary size
    shift: f32,   // timestep: downscale_freq_shift
    oh: u32,      // upsample: output height
    ow: u32,      // upsample: output width
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<u32>;
@group(0) @binding(2) var<storage, read_write> y: array<u32>;
@group(0) @binding(3) var<storage, read> b: array<u32>;
@group(0) @binding(4) var<storage, read> c: array<u32>;

var<workgroup> red: array<f32, 256>;

fn word_index(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wg.y * nwg.x + wg.x) * 256u + lid;
}

@compute @workgroup_size(256)
fn upsample2x(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let u = word_index(wg, nwg, lid);
    if (u >= p.words) { return; }
    let e = 2u * u;
    let ch = e % p.c1;
    let pix = e / p.c1;
    let ox = pix % p.ow;
    let oy = (pix / p.ow) % p.oh;
    let img = pix / (p.ow * p.oh);
    // Source pixel floor(o · in / out), as torch's nearest interpolation to a size.
    let sy = oy * p.h / p.oh;
    let sx = ox * p.w / p.ow;
    y[u] = a[(((img * p.h + sy) * p.w + sx) * p.c1 + ch) / 2u];
}

@compute @workgroup_size(256)
fn concat(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let u = word_index(wg, nwg, lid);
    if (u >= p.words) { return; }
    let cc = p.c1 + p.c2;
    let e = 2u * u;
    let r = e / cc;
    let ch = e % cc;
    if (ch < p.c1) {
        y[u] = a[(r * p.c1 + ch) / 2u];
    } else {
        y[u] = b[(r * p.c2 + ch - p.c1) / 2u];
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

@compute @workgroup_size(256)
fn geglu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let u = word_index(wg, nwg, lid);
    if (u >= p.words) { return; }
    let f = p.c1;
    let e = 2u * u;
    let r = e / f;
    let j = e % f;
    let hidden = unpack2x16float(a[(r * 2u * f + j) / 2u]);
    let gate = unpack2x16float(a[(r * 2u * f + f + j) / 2u]);
    let gelu = 0.5 * gate * (1.0 + erf_approx(gate * 0.70710678118654752));
    y[u] = pack2x16float(hidden * gelu);
}

fn ts_value(t: f32, j: u32) -> f32 {
    let half = p.c1 / 2u;
    let k = select(j - half, j, j < half);
    let freq = exp(-9.210340371976184 * f32(k) / (f32(half) - p.shift));   // ln(10000)
    let arg = t * freq;
    return select(sin(arg), cos(arg), j < half);
}

@compute @workgroup_size(256)
fn timestep(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let u = word_index(wg, nwg, lid);
    if (u >= p.words) { return; }
    let e = 2u * u;
    let bi = e / p.c1;
    let j = e % p.c1;
    let t = bitcast<f32>(a[bi]);
    y[u] = pack2x16float(vec2<f32>(ts_value(t, j), ts_value(t, j + 1u)));
}

@compute @workgroup_size(256)
fn embed(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let u = word_index(wg, nwg, lid);
    if (u >= p.words) { return; }
    let d = p.c1;
    let e = 2u * u;
    let tokpos = e / d;          // b * L + l
    let j = e % d;
    let l = tokpos % p.h;
    let id = min(a[tokpos], p.w - 1u);   // ids past the table read its last row, never out of bounds
    let v = unpack2x16float(b[(id * d + j) / 2u]) + unpack2x16float(c[(l * d + j) / 2u]);
    y[u] = pack2x16float(v);
}

// Reduces red[0..256) into red[0] by max (or sum), in a fixed order; every invocation calls it.
fn tree(lid: u32, is_max: bool) {
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = select(red[lid] + red[lid + s], max(red[lid], red[lid + s]), is_max);
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn softmax_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let row = wg.y * nwg.x + wg.x;
    if (row >= p.h) { return; }
    let base = row * p.c1;
    var m = -3.0e38;
    for (var j = lid; j < p.c1; j += 256u) {
        m = max(m, bitcast<f32>(a[base + j]));
    }
    red[lid] = m;
    tree(lid, true);
    let mx = red[0];
    workgroupBarrier();
    var sum = 0.0;
    for (var j = lid; j < p.c1; j += 256u) {
        sum += exp(bitcast<f32>(a[base + j]) - mx);
    }
    red[lid] = sum;
    tree(lid, false);
    let inv = 1.0 / red[0];
    for (var w = lid; w < p.c2 / 2u; w += 256u) {
        let j = 2u * w;
        var v = vec2<f32>(0.0);
        if (j < p.c1) { v.x = exp(bitcast<f32>(a[base + j]) - mx) * inv; }
        if (j + 1u < p.c1) { v.y = exp(bitcast<f32>(a[base + j + 1u]) - mx) * inv; }
        y[row * (p.c2 / 2u) + w] = pack2x16float(v);
    }
}
