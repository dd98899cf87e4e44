// winograd.wgsl — the transforms of a 3x3 convolution (stride 1, padding 1) computed by
// Winograd's F(2x2, 3x3) (Lavin and Gray, 2015): the input's and the output's, around one
// batched matrix product, and the weight's.
//
// The output is cut into tiles of 2x2 pixels, tile t = (b·th + ty)·tw + tx of image b
// (th = ceil(h/2), tw = ceil(w/2)); tile t reads the 4x4 input patch d whose top-left pixel is
// (2ty - 1, 2tx - 1) (zero outside the image). With g the 3x3 filter of one (output, input)
// channel pair,
//   y(tile) = Aᵀ [ Σ_ci (G g Gᵀ) ⊙ (Bᵀ d_ci B) ] A,
//   Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
//   G  = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]],
//   Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]].
// The sum over input channels at each of the 16 positions ξ = 4i + j of the transformed tile
// is a matrix product: M[ξ] [tiles, cout] = V[ξ] [tiles, cin] · U[ξ] [cout, cin]ᵀ, run as one
// product batched over ξ on the matmul shaders (f32 out). U = G g Gᵀ is computed once when the
// weights load (kernels::winograd::transform_weight), or for large weights before each use by
// the `weight` entry, so that the model keeps them at 9/16 of U's size. The entries here:
//   weight  U[ξ, o, c] = (G g Gᵀ)[i, j] for the filter g = W[o, :, :, c] of the weight W
//           [cout, 3, 3, cin] (f16, read through x; U f16 [16, cout, cin] through v; c = cin,
//           tiles = cout).
//   input   V[ξ, t, c] = (Bᵀ d B)[i, j] for channel c of tile t; V f16 [16, tiles, c].
//   output  y[b, 2ty + i, 2tx + j, c] (=, or += with flags bit 2) = (Aᵀ M[., t, c] A)[i, j]
//           + bias (flags bit 1; bias[off_bias + b·bias_ld + c], bias_ld 0 for one vector) for
//           the pixels inside the image; M f32 [16, tiles, c] (c = cout here), y f16.
// Multiplications: 16·cin·cout a tile against the direct convolution's 36·cin·cout.
//
// Layout: channels-last f16 tensors read and written as pairs of packed u32 words (four
// channels, unpack2x16float: no shader-f16 needed); c a multiple of 4. Each invocation owns
// four channels of one tile (of one output channel's filter in `weight`): u = (wg.y·num_wg.x
// + wg.x)·256 + local index, u < tiles·c/4.
// Arithmetic is f32. Saves nothing for backward.

struct Params {
    batch: u32, h: u32, w: u32, c: u32,        // the image (input: cin; output: cout)
    th: u32, tw: u32, tiles: u32, flags: u32,  // tiles = batch·th·tw; flags: 1 bias, 2 accumulate
    off_bias: u32, bias_ld: u32, _pad0: u32, _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// input: x [batch, h, w, c] and V; weight: W and U.
@group(0) @binding(1) var<storage, read> x: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read_write> v: array<vec2<u32>>;
// output: M, y [batch, h, w, c] and the bias (f16, read as words of two).
@group(0) @binding(3) var<storage, read> m: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> y: array<vec2<u32>>;
@group(0) @binding(5) var<storage, read> bias: array<u32>;

fn unit(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wg.y * nwg.x + wg.x) * 256u + lid;
}

// Tile t -> (image, tile row, tile column).
fn tile_at(t: u32) -> vec3<u32> {
    return vec3<u32>(t / (p.tw * p.th), (t / p.tw) % p.th, t % p.tw);
}

fn unpack4(q: vec2<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y));
}

fn pack4(f: vec4<f32>) -> vec2<u32> {
    return vec2<u32>(pack2x16float(f.xy), pack2x16float(f.zw));
}

// Four channels of input pixel (yy, xx) of image b; zero outside the image.
fn pixel(b: u32, yy: i32, xx: i32, q: u32) -> vec4<f32> {
    if (yy < 0 || xx < 0 || yy >= i32(p.h) || xx >= i32(p.w)) { return vec4<f32>(0.0); }
    return unpack4(x[((b * p.h + u32(yy)) * p.w + u32(xx)) * (p.c / 4u) + q]);
}

// One patch row d0..d3 transformed along x: d·B.
fn row_b(b: u32, yy: i32, x0: i32, q: u32) -> array<vec4<f32>, 4> {
    let d0 = pixel(b, yy, x0, q);
    let d1 = pixel(b, yy, x0 + 1, q);
    let d2 = pixel(b, yy, x0 + 2, q);
    let d3 = pixel(b, yy, x0 + 3, q);
    return array<vec4<f32>, 4>(d0 - d2, d1 + d2, d2 - d1, d1 - d3);
}

fn put_v(xi: u32, t: u32, q: u32, f: vec4<f32>) {
    v[(xi * p.tiles + t) * (p.c / 4u) + q] = pack4(f);
}

// Column j of the row-transformed patch (rows r0..r3) transformed along y: Bᵀ·(d·B), written
// at positions j, 4 + j, 8 + j, 12 + j.
fn col_b(j: u32, t: u32, q: u32, r0: vec4<f32>, r1: vec4<f32>, r2: vec4<f32>, r3: vec4<f32>) {
    put_v(j, t, q, r0 - r2);
    put_v(4u + j, t, q, r1 + r2);
    put_v(8u + j, t, q, r2 - r1);
    put_v(12u + j, t, q, r1 - r3);
}

@compute @workgroup_size(256)
fn input(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let u = unit(wg, nwg, lid);
    let cq = p.c / 4u;
    if (u >= p.tiles * cq) { return; }
    let q = u % cq;
    let t = u / cq;
    let at = tile_at(t);
    let b = at.x;
    let y0 = i32(2u * at.y) - 1;
    let x0 = i32(2u * at.z) - 1;
    let r0 = row_b(b, y0, x0, q);
    let r1 = row_b(b, y0 + 1, x0, q);
    let r2 = row_b(b, y0 + 2, x0, q);
    let r3 = row_b(b, y0 + 3, x0, q);
    col_b(0u, t, q, r0[0], r1[0], r2[0], r3[0]);
    col_b(1u, t, q, r0[1], r1[1], r2[1], r3[1]);
    col_b(2u, t, q, r0[2], r1[2], r2[2], r3[2]);
    col_b(3u, t, q, r0[3], r1[3], r2[3], r3[3]);
}

// G·(f0, f1, f2): (f0, (f0 + f1 + f2) / 2, (f0 - f1 + f2) / 2, f2).
fn g3(f0: vec4<f32>, f1: vec4<f32>, f2: vec4<f32>) -> array<vec4<f32>, 4> {
    return array<vec4<f32>, 4>(f0, 0.5 * (f0 + f1 + f2), 0.5 * (f0 - f1 + f2), f2);
}

// Four input channels of tap (ky, kx) of output channel o's filter.
fn tap(o: u32, ky: u32, kx: u32, q: u32) -> vec4<f32> {
    return unpack4(x[((o * 3u + ky) * 3u + kx) * (p.c / 4u) + q]);
}

// Row i of (G g) Gᵀ, written at positions 4i .. 4i + 3 (put_v's tile index is the output
// channel o here).
fn put_u(i: u32, o: u32, q: u32, r: array<vec4<f32>, 4>) {
    put_v(4u * i, o, q, r[0]);
    put_v(4u * i + 1u, o, q, r[1]);
    put_v(4u * i + 2u, o, q, r[2]);
    put_v(4u * i + 3u, o, q, r[3]);
}

@compute @workgroup_size(256)
fn weight(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let u = unit(wg, nwg, lid);
    let cq = p.c / 4u;
    if (u >= p.tiles * cq) { return; }
    let q = u % cq;
    let o = u / cq;
    // G g: each filter column (kx) transformed along y, giving rows i = 0..3.
    let c0 = g3(tap(o, 0u, 0u, q), tap(o, 1u, 0u, q), tap(o, 2u, 0u, q));
    let c1 = g3(tap(o, 0u, 1u, q), tap(o, 1u, 1u, q), tap(o, 2u, 1u, q));
    let c2 = g3(tap(o, 0u, 2u, q), tap(o, 1u, 2u, q), tap(o, 2u, 2u, q));
    // (G g) Gᵀ: each row i transformed along x.
    put_u(0u, o, q, g3(c0[0], c1[0], c2[0]));
    put_u(1u, o, q, g3(c0[1], c1[1], c2[1]));
    put_u(2u, o, q, g3(c0[2], c1[2], c2[2]));
    put_u(3u, o, q, g3(c0[3], c1[3], c2[3]));
}

// Row i of M (positions 4i .. 4i + 3) transformed along x: (m0 + m1 + m2, m1 - m2 - m3).
fn row_a(i: u32, t: u32, q: u32) -> array<vec4<f32>, 2> {
    let cq = p.c / 4u;
    let m0 = m[((4u * i) * p.tiles + t) * cq + q];
    let m1 = m[((4u * i + 1u) * p.tiles + t) * cq + q];
    let m2 = m[((4u * i + 2u) * p.tiles + t) * cq + q];
    let m3 = m[((4u * i + 3u) * p.tiles + t) * cq + q];
    return array<vec4<f32>, 2>(m0 + m1 + m2, m1 - m2 - m3);
}

// Writes output pixel (yy, xx) of image b (four channels), if it lies inside the image.
fn put_y(b: u32, yy: u32, xx: u32, q: u32, f: vec4<f32>, add: vec4<f32>) {
    if (yy >= p.h || xx >= p.w) { return; }
    let i = ((b * p.h + yy) * p.w + xx) * (p.c / 4u) + q;
    var r = f + add;
    if ((p.flags & 2u) != 0u) { r += unpack4(y[i]); }
    y[i] = pack4(r);
}

@compute @workgroup_size(256)
fn output(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let u = unit(wg, nwg, lid);
    let cq = p.c / 4u;
    if (u >= p.tiles * cq) { return; }
    let q = u % cq;
    let t = u / cq;
    let at = tile_at(t);
    let b = at.x;
    let ty = at.y;
    let tx = at.z;
    var add = vec4<f32>(0.0);
    if ((p.flags & 1u) != 0u) {
        let e = p.off_bias + b * p.bias_ld + 4u * q;   // even: the launcher checks
        add = vec4<f32>(unpack2x16float(bias[e / 2u]), unpack2x16float(bias[e / 2u + 1u]));
    }
    let s0 = row_a(0u, t, q);
    let s1 = row_a(1u, t, q);
    let s2 = row_a(2u, t, q);
    let s3 = row_a(3u, t, q);
    put_y(b, 2u * ty, 2u * tx, q, s0[0] + s1[0] + s2[0], add);
    put_y(b, 2u * ty, 2u * tx + 1u, q, s0[1] + s1[1] + s2[1], add);
    put_y(b, 2u * ty + 1u, 2u * tx, q, s1[0] - s2[0] - s3[0], add);
    put_y(b, 2u * ty + 1u, 2u * tx + 1u, q, s1[1] - s2[1] - s3[1], add);
}
