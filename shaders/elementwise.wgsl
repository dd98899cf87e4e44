// elementwise.wgsl — elementwise ops over flat tensors: unary (copy, SiLU, GELU, quick-GELU,
// affine, clamp, exp), binary (add, mul, with the second operand broadcast along rows, or one of its rows
// per group of output rows: a per-image channel vector), casts between
// f16 and f32 (entry `convert`, 4 elements per invocation), and a 2-D strided copy.
//
// Layout: flat arrays, any shape. Storage is read and written as vec4<u32> words; an f16
// tensor packs 8 values per word (unpack2x16float, so no shader-f16 is needed), an f32
// tensor 4. Each invocation owns 8 consecutive elements of the output, so no two
// invocations write the same word; tensors are padded to 16 bytes, and the padding may be
// overwritten. IN_F32 / OUT_F32 pick each side's dtype (casts are unary copies with
// different dtypes). Arithmetic is f32.
// Dispatch: 256 invocations per workgroup; unit u = (wg.y * num_wg.x + wg.x) * 256 + lid
// covers elements 8u .. 8u+8; the grid is 2-D when one dimension is not enough.
// Saves nothing for backward.

struct Params {
    numel: u32,      // output elements (for copy2d: dst storage elements, rows * ld_dst)
    b_len: u32,      // binary: elements of the second operand (numel), or its row length to broadcast
    op: u32,         // unary: 0 copy, 1 silu, 2 gelu (erf), 3 quick_gelu, 4 affine, 5 clamp to
                     // [alpha, beta], 6 exp(alpha·x); binary: 0 add, 1 mul
    cols: u32,       // copy2d: columns copied; binary: output elements per row of x2 when broadcast
    alpha: f32,      // affine scale, or the scale of the second operand in binary ops
    beta: f32,       // affine shift
    ld_src: u32,     // copy2d: source row stride
    ld_dst: u32,     // copy2d: destination row stride
    bias_off: u32,   // splitk_sum: output row r adds row r / bias_rows of a bias matrix
    bias_rows: u32,  // whose rows are bias_ld elements apart, from element bias_off (a
    bias_ld: u32,    // per-image bias); bias_rows 1 and bias_ld 0 for one vector
    _pad0: u32,
}

override IN_F32: bool = false;
override OUT_F32: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> y: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> x2: array<vec4<u32>>;

fn unit_index(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wg.y * nwg.x + wg.x) * 256u + lid;
}

// Eight values travel as two vec4<f32> (lo = elements 0..3, hi = 4..7): private arrays
// indexed at run time would go to local memory.
struct Oct { lo: vec4<f32>, hi: vec4<f32> }

fn unpack8(v: vec4<u32>) -> Oct {
    return Oct(vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y)),
               vec4<f32>(unpack2x16float(v.z), unpack2x16float(v.w)));
}

fn pack8(f: Oct) -> vec4<u32> {
    return vec4<u32>(pack2x16float(f.lo.xy), pack2x16float(f.lo.zw), pack2x16float(f.hi.xy), pack2x16float(f.hi.zw));
}

// Words of a tensor of `n` f32 elements, in vec4 units.
fn f32_vec4s(n: u32) -> u32 {
    return (n + 3u) / 4u;
}

fn load_x(u: u32) -> Oct {
    if (!IN_F32) { return unpack8(x[u]); }
    var hi = vec4<f32>(0.0);
    if (2u * u + 1u < f32_vec4s(p.numel)) { hi = bitcast<vec4<f32>>(x[2u * u + 1u]); }
    return Oct(bitcast<vec4<f32>>(x[2u * u]), hi);
}

// One element of x2 (same dtype as x) by flat index.
fn x2_at(i: u32) -> f32 {
    if (IN_F32) { return bitcast<f32>(x2[i >> 2u][i & 3u]); }
    return unpack2x16float(x2[i >> 3u][(i >> 1u) & 3u])[i & 1u];
}

fn load_x2(u: u32) -> Oct {
    if (p.b_len == p.numel) {
        if (!IN_F32) { return unpack8(x2[u]); }
        var hi = vec4<f32>(0.0);
        if (2u * u + 1u < f32_vec4s(p.numel)) { hi = bitcast<vec4<f32>>(x2[2u * u + 1u]); }
        return Oct(bitcast<vec4<f32>>(x2[2u * u]), hi);
    }
    let i = 8u * u;
    return Oct(vec4<f32>(x2_row(i), x2_row(i + 1u), x2_row(i + 2u), x2_row(i + 3u)),
               vec4<f32>(x2_row(i + 4u), x2_row(i + 5u), x2_row(i + 6u), x2_row(i + 7u)));
}

// The broadcast second operand for output element i: row i / cols of x2 (b_len elements
// each), repeated along each group of `cols` output elements.
fn x2_row(i: u32) -> f32 {
    return x2_at((i / p.cols) * p.b_len + i % p.b_len);
}

fn store_y(u: u32, f: Oct) {
    if (!OUT_F32) { y[u] = pack8(f); return; }
    y[2u * u] = bitcast<vec4<u32>>(f.lo);
    if (2u * u + 1u < f32_vec4s(p.numel)) { y[2u * u + 1u] = bitcast<vec4<u32>>(f.hi); }
}

fn erf_approx(v: vec4<f32>) -> vec4<f32> {
    // Abramowitz-Stegun 7.1.26: |error| < 1.5e-7 in exact arithmetic, up to ~4.3e-7 absolute
    // in f32 (cancellation near 0; measured by tests/elementwise.rs): under f16 rounding.
    let s = sign(v);
    let z = abs(v);
    let t = 1.0 / (1.0 + 0.3275911 * z);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    return s * (1.0 - poly * exp(-z * z));
}

fn unary_op(v: vec4<f32>) -> vec4<f32> {
    switch (p.op) {
        case 1u: { return v / (1.0 + exp(-v)); }
        case 2u: { return 0.5 * v * (1.0 + erf_approx(v * 0.70710678118654752)); }
        case 3u: { return v / (1.0 + exp(-1.702 * v)); }
        case 4u: { return v * p.alpha + p.beta; }
        case 5u: { return clamp(v, vec4<f32>(p.alpha), vec4<f32>(p.beta)); }
        case 6u: { return exp(v * p.alpha); }
        default: { return v; }
    }
}

@compute @workgroup_size(256)
fn unary(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let u = unit_index(wg, nwg, lid);
    if (u * 8u >= p.numel) { return; }
    let f = load_x(u);
    store_y(u, Oct(unary_op(f.lo), unary_op(f.hi)));
}

@compute @workgroup_size(256)
fn binary(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let u = unit_index(wg, nwg, lid);
    if (u * 8u >= p.numel) { return; }
    let f = load_x(u);
    let g = load_x2(u);
    if (p.op == 1u) {
        store_y(u, Oct(f.lo * g.lo * p.alpha, f.hi * g.hi * p.alpha));
    } else {
        store_y(u, Oct(f.lo + p.alpha * g.lo, f.hi + p.alpha * g.hi));
    }
}

// convert (cast): y = x with a change of dtype, 4 elements per invocation (unit u covers 4u..4u+4), so
// the f32 side moves one whole 16-byte word per invocation and the f16 side half of one:
// both sides of a subgroup's access are contiguous (the 8-element unit above makes the f32
// side two words 32 bytes apart).
@compute @workgroup_size(256)
fn convert(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let u = unit_index(wg, nwg, lid);
    if (u * 4u >= p.numel) { return; }
    var v: vec4<f32>;
    if (IN_F32) {
        v = bitcast<vec4<f32>>(x[u]);
    } else {
        let w = x[u >> 1u];
        if ((u & 1u) == 0u) {
            v = vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
        } else {
            v = vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w));
        }
    }
    if (OUT_F32) {
        y[u] = bitcast<vec4<u32>>(v);
    } else {
        let o = (u & 1u) * 2u;
        y[u >> 1u][o] = pack2x16float(v.xy);
        y[u >> 1u][o + 1u] = pack2x16float(v.zw);
    }
}

// copy2d's source value for destination storage element s (0 in the pad columns).
fn src_at(s: u32) -> f32 {
    let r = s / p.ld_dst;
    let col = s % p.ld_dst;
    if (col >= p.cols || s >= p.numel) { return 0.0; }
    let i = r * p.ld_src + col;
    if (IN_F32) { return bitcast<f32>(x[i >> 2u][i & 3u]); }
    return unpack2x16float(x[i >> 3u][(i >> 1u) & 3u])[i & 1u];
}

// dst[r*ld_dst + c] = src[r*ld_src + c] for c < cols; columns cols..ld_dst get 0.
// Each invocation owns 8 consecutive destination storage elements.
@compute @workgroup_size(256)
fn copy2d(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let u = unit_index(wg, nwg, lid);
    if (u * 8u >= p.numel) { return; }
    let s = 8u * u;
    store_y(u, Oct(vec4<f32>(src_at(s), src_at(s + 1u), src_at(s + 2u), src_at(s + 3u)),
                   vec4<f32>(src_at(s + 4u), src_at(s + 5u), src_at(s + 6u), src_at(s + 7u))));
}

// splitk_sum: y[i] = Σ_{s < b_len} x[s·numel + i] (+ bias[r / bias_rows, i % cols] of row
// r = i / cols when op & 1) (+ y[i] when op & 2): the reduction of a convolution split over K
// into b_len f32 partial products (IN_F32 is true; x2 holds the f16 bias; numel, cols,
// bias_off and bias_ld multiples of 8). 8 elements per invocation.
@compute @workgroup_size(256)
fn splitk_sum(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let u = unit_index(wg, nwg, lid);
    if (u * 8u >= p.numel) { return; }
    var lo = vec4<f32>(0.0);
    var hi = vec4<f32>(0.0);
    let words = p.numel / 4u;
    for (var s = 0u; s < p.b_len; s++) {
        lo += bitcast<vec4<f32>>(x[s * words + 2u * u]);
        hi += bitcast<vec4<f32>>(x[s * words + 2u * u + 1u]);
    }
    if ((p.op & 1u) != 0u) {
        let i = 8u * u;
        var c = p.bias_off + i % p.cols;
        if (p.bias_ld != 0u) { c += (i / p.cols / p.bias_rows) * p.bias_ld; }
        // Every term a multiple of 8: the eight columns are one word of the bias.
        let bw = unpack8(x2[c / 8u]);
        lo += bw.lo;
        hi += bw.hi;
    }
    if ((p.op & 2u) != 0u) {
        if (OUT_F32) {
            lo += bitcast<vec4<f32>>(y[2u * u]);
            hi += bitcast<vec4<f32>>(y[2u * u + 1u]);
        } else {
            let old = unpack8(y[u]);
            lo += old.lo;
            hi += old.hi;
        }
    }
    store_y(u, Oct(lo, hi));
}
