// lora.wgsl — the small kernels of LoRA training around the matmuls (src/model/lora.rs):
// inverted dropout on the adapter's input (forward) and on its input gradient (backward), and
// the optimizer step over the one flat f32 buffer of all LoRA parameters: the sum of squares
// of the gradients (two deterministic passes) and AdamW with global gradient-norm clipping.
//
// Layout: flat arrays read and written as vec4<u32> words. f16 tensors pack 8 halves per word
// (unpack2x16float, so no shader-f16 is needed); f32 tensors 4 values per word (bitcast).
// Arithmetic is f32.
//
// `hyper` (binding 3, u32 words, written by the host before each step, so a replayed plan
// sees the new step without rebuilding bind groups):
//   0 dropout seed (low 32 bits)   1 dropout seed (high 32 bits)
//   2 decay = 1 - lr·weight_decay  3 1 - beta1    4 beta2    5 1 - beta2    6 eps
//   7 step_size = lr / (1 - beta1^t)               8 sqrt(1 - beta2^t)
//   9 max_norm (f32; <= 0: no clipping)            10..15 unused
//
// Entries:
//   dropout     one invocation per 8 elements (one word of f16): y = keep(i)·x·scale, or with
//               ACCUMULATE y += keep(i)·x·scale; keep(i) = (hash(i) >> 8) >= threshold, the
//               hash keyed by the step seed and the layer's salt (`keep_hash`; mirrored on the
//               CPU by kernels::lora::dropout_keep), so the backward regenerates the forward's
//               mask instead of saving it. Elements past numel in the last word: y is left
//               as it was (ACCUMULATE) or zeroed.
//   sumsq       grid (parts), 256 invocations: workgroup w sums the squares of flat elements
//               [4096·w, 4096·w + 4096) in a fixed order (invocation t: words w·1024 + j·256
//               + t, j = 0..3, then a tree over the workgroup) into partial w.
//   norm_final  one workgroup of 256: sums the partials in a fixed order (strided per
//               invocation, then a tree) and writes stats = (norm, clip coefficient, sum of
//               squares, skipped), coefficient = min(max_norm / (norm + 1e-6), 1) as
//               torch.nn.utils.clip_grad_norm_, 1 without clipping. Both passes always add the
//               same numbers in the same order: the norm is bit-reproducible on a device.
//               skipped = 1 when the sum is not finite (an f16 gradient overflowed: the step
//               is skipped, as torch's GradScaler skips it, and the caller lowers the loss
//               scale), else 0. Tested on the bit pattern: fast-math drivers may fold isnan.
//   adamw       one invocation per 4 flat elements: g = grad·coef; p *= decay; m += (g - m)·
//               (1 - beta1); v = v·beta2 + (1 - beta2)·g²; p -= step_size·m / (sqrt(v) /
//               sqrt(1 - beta2^t) + eps) (torch.optim.AdamW, non-amsgrad); then writes the f16
//               copy of p and zeroes the gradient. A skipped step only zeroes the gradient.
// Saves nothing for backward (dropout's mask is regenerated).

struct Params {
    numel: u32,      // dropout: elements; sumsq / adamw: flat elements (a multiple of 4)
    salt: u32,       // dropout: the layer's stream
    threshold: u32,  // dropout: drop when (hash >> 8) < threshold (round(p·2^24))
    scale: f32,      // dropout: 1 / (1 - p)
    parts: u32,      // norm_final: partial sums to add
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

override ACCUMULATE: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
// dropout: x -> y; sumsq: grads -> partials; norm_final: partials -> stats; adamw: stats, params.
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> hyper: array<u32>;
// adamw only.
@group(0) @binding(4) var<storage, read_write> grads: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read_write> m1: array<vec4<u32>>;
@group(0) @binding(6) var<storage, read_write> m2: array<vec4<u32>>;
@group(0) @binding(7) var<storage, read_write> p16: array<vec2<u32>>;

fn unit_index(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wg.y * nwg.x + wg.x) * 256u + lid;
}

// mix32, stream_key, keep_hash: shaders/dropout_hash.wgsl, appended to this file.

fn keep_factor(i: u32, key: u32) -> f32 {
    if (i >= p.numel || (keep_hash(i, key) >> 8u) < p.threshold) { return 0.0; }
    return p.scale;
}

@compute @workgroup_size(256)
fn dropout(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let u = unit_index(wg, nwg, lid);
    if (u * 8u >= p.numel) { return; }
    let key = stream_key(hyper[0], hyper[1], p.salt);
    let w = src[u];
    let i = 8u * u;
    let lo0 = vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y))
        * vec4<f32>(keep_factor(i, key), keep_factor(i + 1u, key), keep_factor(i + 2u, key), keep_factor(i + 3u, key));
    let hi0 = vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w))
        * vec4<f32>(keep_factor(i + 4u, key), keep_factor(i + 5u, key), keep_factor(i + 6u, key), keep_factor(i + 7u, key));
    // Halves past numel are 0 (not 0·x: the padding may hold NaN).
    let lo = select(vec4<f32>(0.0), lo0, vec4<u32>(i, i + 1u, i + 2u, i + 3u) < vec4<u32>(p.numel));
    let hi = select(vec4<f32>(0.0), hi0, vec4<u32>(i + 4u, i + 5u, i + 6u, i + 7u) < vec4<u32>(p.numel));
    var out = vec4<u32>(pack2x16float(lo.xy), pack2x16float(lo.zw), pack2x16float(hi.xy), pack2x16float(hi.zw));
    if (ACCUMULATE) {
        let o = dst[u];
        let olo = vec4<f32>(unpack2x16float(o.x), unpack2x16float(o.y)) + lo;
        let ohi = vec4<f32>(unpack2x16float(o.z), unpack2x16float(o.w)) + hi;
        out = vec4<u32>(pack2x16float(olo.xy), pack2x16float(olo.zw), pack2x16float(ohi.xy), pack2x16float(ohi.zw));
        // Past the end: keep the old halves exactly (they are not ours).
        if (i + 8u > p.numel) {
            for (var j = 0u; j < 4u; j++) {
                if (i + 2u * j >= p.numel) {
                    out[j] = o[j];
                } else if (i + 2u * j + 1u >= p.numel) {
                    out[j] = (out[j] & 0xffffu) | (o[j] & 0xffff0000u);
                }
            }
        }
    }
    dst[u] = out;
}

var<workgroup> red: array<f32, 256>;

// Tree sum of red[0..256] into red[0] (all invocations call it).
fn tree_sum(t: u32) {
    for (var s = 128u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (t < s) { red[t] += red[t + s]; }
    }
    workgroupBarrier();
}

@compute @workgroup_size(256)
fn sumsq(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let words = p.numel / 4u;
    var acc = 0.0;
    for (var j = 0u; j < 4u; j++) {
        let q = wg.x * 1024u + j * 256u + t;
        if (q < words) {
            let v = bitcast<vec4<f32>>(src[q]);
            acc += dot(v, v);
        }
    }
    red[t] = acc;
    tree_sum(t);
    if (t == 0u) {
        dst[wg.x / 4u][wg.x % 4u] = bitcast<u32>(red[0]);
    }
}

@compute @workgroup_size(256)
fn norm_final(@builtin(local_invocation_index) t: u32) {
    var acc = 0.0;
    for (var i = t; i < p.parts; i += 256u) {
        acc += bitcast<f32>(src[i / 4u][i % 4u]);
    }
    red[t] = acc;
    tree_sum(t);
    if (t == 0u) {
        let total = red[0];
        let norm = sqrt(total);
        let max_norm = bitcast<f32>(hyper[9]);
        var coef = 1.0;
        if (max_norm > 0.0) {
            coef = min(max_norm / (norm + 1e-6), 1.0);
        }
        let finite = (bitcast<u32>(total) & 0x7f800000u) != 0x7f800000u;
        dst[0] = bitcast<vec4<u32>>(vec4<f32>(norm, select(0.0, coef, finite), total, select(1.0, 0.0, finite)));
    }
}

@compute @workgroup_size(256)
fn adamw(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let u = unit_index(wg, nwg, lid);
    if (u * 4u >= p.numel) { return; }
    if (bitcast<f32>(src[0].w) != 0.0) {
        grads[u] = vec4<u32>(0u);
        return;
    }
    let coef = bitcast<f32>(src[0].y);
    let decay = bitcast<f32>(hyper[2]);
    let omb1 = bitcast<f32>(hyper[3]);
    let beta2 = bitcast<f32>(hyper[4]);
    let omb2 = bitcast<f32>(hyper[5]);
    let eps = bitcast<f32>(hyper[6]);
    let step_size = bitcast<f32>(hyper[7]);
    let bc2_sqrt = bitcast<f32>(hyper[8]);
    let g = bitcast<vec4<f32>>(grads[u]) * coef;
    var w = bitcast<vec4<f32>>(dst[u]) * decay;
    var m = bitcast<vec4<f32>>(m1[u]);
    m = m + (g - m) * omb1;
    let v = bitcast<vec4<f32>>(m2[u]) * beta2 + omb2 * (g * g);
    let denom = sqrt(v) / bc2_sqrt + eps;
    w = w - step_size * (m / denom);
    dst[u] = bitcast<vec4<u32>>(w);
    m1[u] = bitcast<vec4<u32>>(m);
    m2[u] = bitcast<vec4<u32>>(v);
    grads[u] = vec4<u32>(0u);
    p16[u] = vec2<u32>(pack2x16float(w.xy), pack2x16float(w.zw));
}
