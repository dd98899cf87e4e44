// matmul_scalar.wgsl — tiled scalar matrix product, f16 storage, f32 arithmetic.
//
// C[b] = alpha * op(A[b]) · op(B[b]) (+ bias[m / bias_rows, n]: one bias vector, or
// one per image, see Params) (+ C[b] when ACCUMULATE), row-major C [M, N].
//   op(A)(m, k) = TRANS_A ? A[k*lda + m] : A[m*lda + k]     (A stored [M,K] or [K,M])
//   op(B)(k, n) = TRANS_B ? B[n*ldb + k] : B[k*ldb + n]     (B stored [N,K] or [K,N])
// Y = X·Wᵀ + b is TRANS_B; X·W is neither; Xᵀ·Y is TRANS_A.
//
// Layout: every tensor is a flat row-major array. f16 tensors are read as packed u32 words
// (unpack2x16float), so this path needs no shader-f16 and runs on every adapter. C is f16
// packed in pairs (ldc and off_c even: the launcher pads odd N) or f32 when OUT_F32.
// Dispatch: (ceil(N/128), ceil(M/128), batch) workgroups of 256 invocations; each workgroup
// computes a 128x128 tile of C, each invocation an 8x8 block (two 4x4 quadrants 64 apart, so
// shared-memory reads are conflict-free vec4s). K advances 16 at a time: the next tile's
// global words are loaded into registers while the current shared tile is multiplied.
// Every private array and register block is indexed by constants only: a run-time index
// makes the driver move the whole array to local memory (measured: 20x slower).
// CONV (override): 2-D convolution as an implicit GEMM, with A gathered from an NHWC input
// (never materialised) and B the weight stored [cout, ks, ks, cin] (TRANS_B): M = images·oh·ow,
// N = cout, K = ks·ks·cin. Eight consecutive k are eight channels of one input pixel, read as
// one 16-byte word when cin is a multiple of 8 (flags bit 8), else one by one; taps outside
// the image read zero (zero padding).
// CONV_T (override, with CONV; default off, and then folded away): the gather of a transposed
// convolution (a strided convolution's input gradient dX, see kernels::conv): the image (dY)
// is read as if dilated by `stride` (stride-1 zeros between pixels) and gathered at stride 1,
// so im2col row (img, y, x) of dX, tap (ty, tx), reads dY at ((y + ty - pad) / stride,
// (x + tx - pad) / stride) when both divide evenly and lie inside dY, zero otherwise. ih, iw,
// cin: dY's size and channels (the forward's oh, ow, cout); oh, ow: dX's size; pad: ks - 1 -
// the forward's padding. B as with B_FLIP.
// B_FLIP (override, with CONV and not TRANS_B; default off, and then folded away): a
// convolution's input gradient dX (M = dX pixels, N = the forward's cin, K = (ty, tx, co) over
// dY's channels co, with or without CONV_T) reads the forward weight W [cout, ks, ks, N] itself
// as B, flipped and channel-transposed through an index remap: B(k, n) = W[co, ks-1-ty,
// ks-1-tx, n] with k = (ty·ks + tx)·cout + co (cout = p.cin, dY's channels). For a fixed k the
// n are contiguous in W, so B is read as in the [K, N] layout (8 consecutive n per 16-byte
// word when N % 8 == 0, flags bit 4; else one by one) with row k starting at element
// ((co·ks + ks-1-ty)·ks + ks-1-tx)·N of W; rows k ≥ K and columns n ≥ N read zero. A split
// over K offsets k by kbase (B's batch stride is unused).
// PHASES (override, with CONV; default off, and then folded away): a nearest 2x upsample
// followed by a 3x3 convolution (padding 1), run on the small image as its four output phases
// (kernels::conv::Upsample2xConv): batch entry z is the phase (a, b) = (z >> 1, z & 1), the
// output pixels (2i + a, 2j + b), each a 2x2 convolution of the input with padding (1 - a,
// 1 - b) before and its own summed weight (B's batch stride apart). Row m = (image, i, j) of
// the [ih, iw] grid writes C's pixel (image, 2i + a, 2j + b) of [2ih, 2iw] (ldc: cout).
// Saves nothing for backward.

struct Params {
    m: u32, n: u32, k: u32, batch: u32,
    lda: u32, ldb: u32, ldc: u32, flags: u32,      // flags: 1 bias, 2 accumulate, 4 vector loads ok, 8 conv cin % 8 == 0
    stride_a: u32, stride_b: u32, stride_c: u32, alpha: f32,
    off_a: u32, off_b: u32, off_c: u32, off_bias: u32,
    // CONV: A is the implicit im2col matrix of an NHWC input [batch, ih, iw, cin]: row m =
    // (image, oy, ox) of the [oh, ow] output, column k = (ky, kx, ci) of a ks x ks window.
    ih: u32, iw: u32, cin: u32, ks: u32,
    stride: u32, pad: u32, oh: u32, ow: u32,
    // The bias of row m is row m / bias_rows of a bias matrix with rows bias_ld elements apart
    // (from off_bias): a per-image bias (a resnet's conv1 bias plus its image's time embedding)
    // with bias_rows = oh·ow; bias_rows = 1 and bias_ld = 0 for one bias vector.
    bias_rows: u32, bias_ld: u32, _pad0: u32, _pad1: u32,
}

override TRANS_A: bool = false;
override TRANS_B: bool = true;
override OUT_F32: bool = false;
override CONV: bool = false;
override CONV_T: bool = false;
override B_FLIP: bool = false;
override PHASES: bool = false;
override PER_IMAGE_BIAS: bool = false;   // the bias read per row group (bias_rows, bias_ld)

@group(0) @binding(0) var<uniform> p: Params;

// CONV split over K: batch index z computes the partial product over im2col columns
// z·stride_a .. z·stride_a + k (B's batch stride is the same k offset, or 0 with B_FLIP, whose
// remap adds kbase itself; C gets one f32 slice per z, summed by the launcher). Set once per
// invocation in main.
var<private> kbase: u32;
// PHASES: this invocation's output phase (the batch index); set once in main.
var<private> phase: u32;
@group(0) @binding(1) var<storage, read> a: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> b: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> bias: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read_write> c: array<u32>;

const BM: u32 = 128u;
const BN: u32 = 128u;
const BK: u32 = 16u;

// [k][m] and [k][n], 4 floats per entry.
var<workgroup> As: array<vec4<f32>, 512>;
var<workgroup> Bs: array<vec4<f32>, 512>;

fn half_at(v: vec4<u32>, i: u32) -> f32 {
    return unpack2x16float(v[(i >> 1u) & 3u])[i & 1u];
}

// One element of a stored [rows, ld] matrix at (r, col), 0 outside [0,rows)x[0,cols).
fn el(is_a: bool, base: u32, r: u32, col: u32, rows: u32, cols: u32, ld: u32) -> f32 {
    if (r >= rows || col >= cols) { return 0.0; }
    let i = base + r * ld + col;
    if (is_a) { return half_at(a[i >> 3u], i); }
    return half_at(b[i >> 3u], i);
}

fn pk(is_a: bool, base: u32, r: u32, c: u32, rows: u32, cols: u32, ld: u32) -> u32 {
    return pack2x16float(vec2<f32>(el(is_a, base, r, c, rows, cols, ld), el(is_a, base, r, c + 1u, rows, cols, ld)));
}

// 8 halves along the contiguous axis of a stored [rows, ld] matrix: row r, columns c0..c0+8,
// packed in 4 words; zero outside [0,rows)x[0,cols).
fn load8(is_a: bool, base: u32, r: u32, c0: u32, rows: u32, cols: u32, ld: u32, vec_ok: bool) -> vec4<u32> {
    if (r < rows && c0 + 8u <= cols && vec_ok) {
        let i = (base + r * ld + c0) >> 3u;
        if (is_a) { return a[i]; }
        return b[i];
    }
    return vec4<u32>(pk(is_a, base, r, c0, rows, cols, ld), pk(is_a, base, r, c0 + 2u, rows, cols, ld),
                     pk(is_a, base, r, c0 + 4u, rows, cols, ld), pk(is_a, base, r, c0 + 6u, rows, cols, ld));
}

// The gather's padding before the first row and column: the convolution's, or with PHASES
// the phase's (1 - a, 1 - b).
fn pad_yx() -> vec2<u32> {
    if (PHASES) { return vec2<u32>(1u - (phase >> 1u), 1u - (phase & 1u)); }
    return vec2<u32>(p.pad);
}

// One input value of the implicit im2col matrix at (m, k); 0 outside the image or the matrix.
fn conv_el(m: u32, k: u32) -> f32 {
    if (m >= p.m || k >= p.k) { return 0.0; }
    let ohw = p.oh * p.ow;
    let img = m / ohw;
    let oy = (m % ohw) / p.ow;
    let ox = m % p.ow;
    let ci = (k + kbase) % p.cin;
    let tap = (k + kbase) / p.cin;
    let y = i32(oy * p.stride + tap / p.ks) - i32(pad_yx().x);
    let x = i32(ox * p.stride + tap % p.ks) - i32(pad_yx().y);
    if (y < 0 || x < 0 || y >= i32(p.ih) || x >= i32(p.iw)) { return 0.0; }
    let i = p.off_a + ((img * p.ih + u32(y)) * p.iw + u32(x)) * p.cin + ci;
    return half_at(a[i >> 3u], i);
}

// Eight values of the implicit im2col matrix: row m, columns k0..k0+8.
fn conv8(m: u32, k0: u32) -> vec4<u32> {
    if ((p.flags & 8u) != 0u && m < p.m && k0 + 8u <= p.k) {
        // cin % 8 == 0: one pixel, eight channels, one aligned word.
        let ohw = p.oh * p.ow;
        let img = m / ohw;
        let oy = (m % ohw) / p.ow;
        let ox = m % p.ow;
        let ci = (k0 + kbase) % p.cin;
        let tap = (k0 + kbase) / p.cin;
        let y = i32(oy * p.stride + tap / p.ks) - i32(pad_yx().x);
        let x = i32(ox * p.stride + tap % p.ks) - i32(pad_yx().y);
        if (y < 0 || x < 0 || y >= i32(p.ih) || x >= i32(p.iw)) { return vec4<u32>(0u); }
        return a[(p.off_a + ((img * p.ih + u32(y)) * p.iw + u32(x)) * p.cin + ci) >> 3u];
    }
    return vec4<u32>(pack2x16float(vec2<f32>(conv_el(m, k0), conv_el(m, k0 + 1u))),
                     pack2x16float(vec2<f32>(conv_el(m, k0 + 2u), conv_el(m, k0 + 3u))),
                     pack2x16float(vec2<f32>(conv_el(m, k0 + 4u), conv_el(m, k0 + 5u))),
                     pack2x16float(vec2<f32>(conv_el(m, k0 + 6u), conv_el(m, k0 + 7u))));
}

// CONV_T: the pixel (img·ih + y)·iw + x of dY that im2col row m, column kk (with kbase) of a
// transposed convolution reads, or NO_PIXEL where it reads zero.
const NO_PIXEL: u32 = 0xFFFFFFFFu;
fn convt_pixel(m: u32, kk: u32) -> u32 {
    let ohw = p.oh * p.ow;
    let img = m / ohw;
    let oy = (m % ohw) / p.ow;
    let ox = m % p.ow;
    let tap = kk / p.cin;
    let y = i32(oy + tap / p.ks) - i32(p.pad);
    let x = i32(ox + tap % p.ks) - i32(p.pad);
    if (y < 0 || x < 0) { return NO_PIXEL; }
    let yu = u32(y);
    let xu = u32(x);
    if (yu % p.stride != 0u || xu % p.stride != 0u) { return NO_PIXEL; }
    if (yu / p.stride >= p.ih || xu / p.stride >= p.iw) { return NO_PIXEL; }
    return (img * p.ih + yu / p.stride) * p.iw + xu / p.stride;
}

// CONV_T: one value of the implicit im2col matrix at (m, k); 0 outside dY or the matrix.
fn convt_el(m: u32, k: u32) -> f32 {
    if (m >= p.m || k >= p.k) { return 0.0; }
    let px = convt_pixel(m, k + kbase);
    if (px == NO_PIXEL) { return 0.0; }
    let i = p.off_a + px * p.cin + (k + kbase) % p.cin;
    return half_at(a[i >> 3u], i);
}

// CONV_T: eight values of the implicit im2col matrix, row m, columns k0..k0+8.
fn convt8(m: u32, k0: u32) -> vec4<u32> {
    if ((p.flags & 8u) != 0u && m < p.m && k0 + 8u <= p.k) {
        // cin % 8 == 0: one pixel, eight channels, one aligned 16-byte word.
        let px = convt_pixel(m, k0 + kbase);
        if (px == NO_PIXEL) { return vec4<u32>(0u); }
        return a[(p.off_a + px * p.cin + (k0 + kbase) % p.cin) >> 3u];
    }
    return vec4<u32>(pack2x16float(vec2<f32>(convt_el(m, k0), convt_el(m, k0 + 1u))),
                     pack2x16float(vec2<f32>(convt_el(m, k0 + 2u), convt_el(m, k0 + 3u))),
                     pack2x16float(vec2<f32>(convt_el(m, k0 + 4u), convt_el(m, k0 + 5u))),
                     pack2x16float(vec2<f32>(convt_el(m, k0 + 6u), convt_el(m, k0 + 7u))));
}

// B_FLIP: the element of W where row k (with kbase) of the remapped B starts.
fn flip_row(kk: u32) -> u32 {
    let co = kk % p.cin;
    let tap = kk / p.cin;
    let ty = tap / p.ks;
    let tx = tap % p.ks;
    return p.off_b + ((co * p.ks + (p.ks - 1u - ty)) * p.ks + (p.ks - 1u - tx)) * p.n;
}

// B_FLIP: two values of B's row starting at W element `row`, columns n, n + 1; 0 past N.
fn flip_pk(row: u32, n: u32) -> u32 {
    var v = vec2<f32>(0.0);
    if (n < p.n) { v.x = half_at(b[(row + n) >> 3u], row + n); }
    if (n + 1u < p.n) { v.y = half_at(b[(row + n + 1u) >> 3u], row + n + 1u); }
    return pack2x16float(v);
}

// B_FLIP: B row k, columns n0..n0+8 (n0 a multiple of 8), zero outside [0,K)x[0,N).
fn flip8(k: u32, n0: u32, vec_ok: bool) -> vec4<u32> {
    if (k >= p.k) { return vec4<u32>(0u); }
    let row = flip_row(k + kbase);
    if (n0 + 8u <= p.n && vec_ok) { return b[(row + n0) >> 3u]; }
    return vec4<u32>(flip_pk(row, n0), flip_pk(row, n0 + 2u), flip_pk(row, n0 + 4u), flip_pk(row, n0 + 6u));
}

// Which 8 elements invocation t loads for the tile at k0, as (stored row, stored col0).
// K-contiguous storage: 128 rows x 2 groups of 8 k. Otherwise: 16 k-rows x 16 groups of 8.
fn fetch_a(t: u32, m0: u32, k0: u32, base: u32, vec_ok: bool) -> vec4<u32> {
    if (TRANS_A) { return load8(true, base, k0 + t / 16u, m0 + (t % 16u) * 8u, p.k, p.m, p.lda, vec_ok); }
    if (CONV && CONV_T) { return convt8(m0 + t / 2u, k0 + (t % 2u) * 8u); }
    if (CONV) { return conv8(m0 + t / 2u, k0 + (t % 2u) * 8u); }
    return load8(true, base, m0 + t / 2u, k0 + (t % 2u) * 8u, p.m, p.k, p.lda, vec_ok);
}
fn fetch_b(t: u32, n0: u32, k0: u32, base: u32, vec_ok: bool) -> vec4<u32> {
    if (TRANS_B) { return load8(false, base, n0 + t / 2u, k0 + (t % 2u) * 8u, p.n, p.k, p.ldb, vec_ok); }
    if (CONV && B_FLIP) { return flip8(k0 + t / 16u, n0 + (t % 16u) * 8u, vec_ok); }
    return load8(false, base, k0 + t / 16u, n0 + (t % 16u) * 8u, p.k, p.n, p.ldb, vec_ok);
}

// Stores 8 fetched halves as f32 into a [k][x] shared tile (x = m or n, 4 per vec4 entry).
// `x_contig`: the 8 values run along x (one k row); else along k (one x column).
fn put(is_a: bool, x_contig: bool, t: u32, w: vec4<u32>) {
    let p0 = unpack2x16float(w.x);
    let p1 = unpack2x16float(w.y);
    let p2 = unpack2x16float(w.z);
    let p3 = unpack2x16float(w.w);
    if (x_contig) {
        let i = (t / 16u) * 32u + (t % 16u) * 2u;
        let lo = vec4<f32>(p0, p1);
        let hi = vec4<f32>(p2, p3);
        if (is_a) { As[i] = lo; As[i + 1u] = hi; } else { Bs[i] = lo; Bs[i + 1u] = hi; }
        return;
    }
    let x = t / 2u;
    let i = (t % 2u) * 8u * 32u + x / 4u;
    let c = x % 4u;
    if (is_a) {
        As[i][c] = p0.x; As[i + 32u][c] = p0.y; As[i + 64u][c] = p1.x; As[i + 96u][c] = p1.y;
        As[i + 128u][c] = p2.x; As[i + 160u][c] = p2.y; As[i + 192u][c] = p3.x; As[i + 224u][c] = p3.y;
    } else {
        Bs[i][c] = p0.x; Bs[i + 32u][c] = p0.y; Bs[i + 64u][c] = p1.x; Bs[i + 96u][c] = p1.y;
        Bs[i + 128u][c] = p2.x; Bs[i + 160u][c] = p2.y; Bs[i + 192u][c] = p3.x; Bs[i + 224u][c] = p3.y;
    }
}

fn bias_at(i: u32) -> f32 {
    return half_at(bias[i >> 3u], i);
}

// Where row m of C starts, from the batch entry's start: m·ldc, or with PHASES the pixel (2i,
// 2j) of the 2x image for m = (image·ih + i)·iw + j (the phase's own offset is in base_c).
fn c_row(m: u32) -> u32 {
    if (PHASES) {
        let q = m / p.ow;
        return (4u * q * p.ow + 2u * (m - q * p.ow)) * p.ldc;
    }
    return m * p.ldc;
}

// Writes 4 results of row m starting at column nb (a multiple of 4).
fn emit(m: u32, nb: u32, acc: vec4<f32>, base_c: u32) {
    if (m >= p.m || nb >= p.n) { return; }
    var v = acc * p.alpha;
    if ((p.flags & 1u) != 0u) {
        // This row's bias (per image only in the PER_IMAGE_BIAS variant).
        var bi = p.off_bias + nb;
        if (PER_IMAGE_BIAS) { bi += (m / p.bias_rows) * p.bias_ld; }
        v.x += bias_at(bi);
        if (nb + 1u < p.n) { v.y += bias_at(bi + 1u); }
        if (nb + 2u < p.n) { v.z += bias_at(bi + 2u); }
        if (nb + 3u < p.n) { v.w += bias_at(bi + 3u); }
    }
    let accumulate = (p.flags & 2u) != 0u;
    let i = base_c + c_row(m) + nb;
    if (OUT_F32) {
        if (accumulate) { v.x += bitcast<f32>(c[i]); }
        c[i] = bitcast<u32>(v.x);
        if (nb + 1u < p.n) {
            if (accumulate) { v.y += bitcast<f32>(c[i + 1u]); }
            c[i + 1u] = bitcast<u32>(v.y);
        }
        if (nb + 2u < p.n) {
            if (accumulate) { v.z += bitcast<f32>(c[i + 2u]); }
            c[i + 2u] = bitcast<u32>(v.z);
        }
        if (nb + 3u < p.n) {
            if (accumulate) { v.w += bitcast<f32>(c[i + 3u]); }
            c[i + 3u] = bitcast<u32>(v.w);
        }
    } else {
        // Whole pairs: i is even, and a pair whose first element is in range may write its
        // second (a pad column when N is odd).
        var lo = v.xy;
        if (accumulate) { lo += unpack2x16float(c[i >> 1u]); }
        c[i >> 1u] = pack2x16float(lo);
        if (nb + 2u < p.n) {
            var hi = v.zw;
            if (accumulate) { hi += unpack2x16float(c[(i >> 1u) + 1u]); }
            c[(i >> 1u) + 1u] = pack2x16float(hi);
        }
    }
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let bz = wg.z;
    let m0 = wg.y * BM;
    let n0 = wg.x * BN;
    let base_a = p.off_a + bz * p.stride_a;
    if (CONV) { kbase = bz * p.stride_a; }
    if (PHASES) { phase = bz; }
    let base_b = p.off_b + bz * p.stride_b;
    let vec_ok = (p.flags & 4u) != 0u;
    let tx = t % 16u;
    let ty = t / 16u;

    var c0 = vec4<f32>(0.0); var c1 = vec4<f32>(0.0); var c2 = vec4<f32>(0.0); var c3 = vec4<f32>(0.0);
    var c4 = vec4<f32>(0.0); var c5 = vec4<f32>(0.0); var c6 = vec4<f32>(0.0); var c7 = vec4<f32>(0.0);
    var c8 = vec4<f32>(0.0); var c9 = vec4<f32>(0.0); var c10 = vec4<f32>(0.0); var c11 = vec4<f32>(0.0);
    var c12 = vec4<f32>(0.0); var c13 = vec4<f32>(0.0); var c14 = vec4<f32>(0.0); var c15 = vec4<f32>(0.0);

    var ra = fetch_a(t, m0, 0u, base_a, vec_ok);
    var rb = fetch_b(t, n0, 0u, base_b, vec_ok);
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        put(true, TRANS_A, t, ra);
        put(false, !TRANS_B, t, rb);
        workgroupBarrier();
        if (k0 + BK < p.k) {
            ra = fetch_a(t, m0, k0 + BK, base_a, vec_ok);
            rb = fetch_b(t, n0, k0 + BK, base_b, vec_ok);
        }
        for (var kk = 0u; kk < BK; kk++) {
            let a0 = As[kk * 32u + ty];
            let a1 = As[kk * 32u + 16u + ty];
            let b0 = Bs[kk * 32u + tx];
            let b1 = Bs[kk * 32u + 16u + tx];
            c0 += a0.x * b0; c1 += a0.x * b1;
            c2 += a0.y * b0; c3 += a0.y * b1;
            c4 += a0.z * b0; c5 += a0.z * b1;
            c6 += a0.w * b0; c7 += a0.w * b1;
            c8 += a1.x * b0; c9 += a1.x * b1;
            c10 += a1.y * b0; c11 += a1.y * b1;
            c12 += a1.z * b0; c13 += a1.z * b1;
            c14 += a1.w * b0; c15 += a1.w * b1;
        }
        workgroupBarrier();
    }

    // Rows ty*4+i and 64+ty*4+i, columns tx*4.. and 64+tx*4..
    var base_c = p.off_c + bz * p.stride_c;
    if (PHASES) { base_c = p.off_c + ((bz >> 1u) * 2u * p.ow + (bz & 1u)) * p.ldc; }
    let r0 = m0 + ty * 4u;
    let r1 = m0 + 64u + ty * 4u;
    let n_lo = n0 + tx * 4u;
    let n_hi = n0 + 64u + tx * 4u;
    emit(r0, n_lo, c0, base_c); emit(r0, n_hi, c1, base_c);
    emit(r0 + 1u, n_lo, c2, base_c); emit(r0 + 1u, n_hi, c3, base_c);
    emit(r0 + 2u, n_lo, c4, base_c); emit(r0 + 2u, n_hi, c5, base_c);
    emit(r0 + 3u, n_lo, c6, base_c); emit(r0 + 3u, n_hi, c7, base_c);
    emit(r1, n_lo, c8, base_c); emit(r1, n_hi, c9, base_c);
    emit(r1 + 1u, n_lo, c10, base_c); emit(r1 + 1u, n_hi, c11, base_c);
    emit(r1 + 2u, n_lo, c12, base_c); emit(r1 + 2u, n_hi, c13, base_c);
    emit(r1 + 3u, n_lo, c14, base_c); emit(r1 + 3u, n_hi, c15, base_c);
}
