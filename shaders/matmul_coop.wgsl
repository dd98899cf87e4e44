// matmul_coop.wgsl — matrix product on cooperative matrices (tensor cores): 16x16x16 tiles,
// f16 inputs, f32 accumulators.
//
// Same contract as matmul_scalar.wgsl (read it first): C[b] = alpha * op(A[b])·op(B[b])
// (+ bias[m / bias_rows, n]) (+ C[b] when ACCUMULATE); TRANS_A: A stored [K,M]; TRANS_B: B
// stored [N,K].
// Global f16 tensors are read as mat2x4<f16> (16 bytes = 8 halves: naga's bitcast cannot
// turn vec2<u32> into vec4<f16>) with zero fill at the edges, so any M, N, K work; C is written as packed f16 pairs (ldc even) or f32 (OUT_F32).
// Dispatch: (ceil(N/BN), ceil(M/BM), batch) workgroups of WARPS subgroups of 32 invocations
// (the launcher only picks this path where the subgroup size is 32). The workgroup tile
// BMxBN is split WARPS_M x (WARPS/WARPS_M) among the subgroups; each subgroup keeps
// (BM/WARPS_M/16) x (BN/WARPS_N/16) accumulators. K advances BK (16, 32 or 64) at a time
// through shared memory stored as vec4<f16> rows padded by 8 halves (no bank conflicts for
// the fragment loads); the next tile's global words are held in registers while the current
// one is used. STAGES = 1: one shared tile, two barriers per step; STAGES = 2: two shared
// tiles used in turn, one barrier per step.
// Shared memory is typed f16 because naga takes a cooperative load's element type from its
// pointer; strides of coopLoad are in vec4<f16> units.
// Epilogue: each accumulator goes through a per-subgroup f32 staging tile in shared memory,
// then each lane writes 8 values with bias, alpha and accumulation.
// Accumulators, fragments and prefetch registers are separate variables indexed by
// constants, the optional ones behind override conditions the driver folds away: a private
// array indexed at run time goes to local memory (measured: 3x slower here, 20x on the
// scalar kernel).
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

enable f16;
enable wgpu_cooperative_matrix;

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

override WARPS: u32 = 8u;
override WG: u32 = WARPS * 32u;
override BK: u32 = 32u;
override STAGES: u32 = 1u;
// VEC: every plain (not gathered) operand word is a whole aligned 16-byte word: flags bit 4,
// and A's and B's contiguous extents (the `cols` of load8) multiples of 8. Loads then take no
// branch: a row or column past the matrix reads a clamped address and is zeroed by select
// (H100, 8192³: 127 -> 153 TFLOP/s; the branchy general path costs that much even where it
// never leaves the fast branch).
override VEC: bool = false;
// The bias is read per row group (Params' bias_rows, bias_ld): a resnet's conv1 with its time
// embedding. Without it the epilogue reads one bias vector.
override PER_IMAGE_BIAS: bool = false;

override TRANS_A: bool = false;
override TRANS_B: bool = true;
override OUT_F32: bool = false;
override CONV: bool = false;
override CONV_T: bool = false;
override B_FLIP: bool = false;
override PHASES: bool = false;
override BM: u32 = 128u;
override BN: u32 = 128u;
override WARPS_M: u32 = 2u;
// Fragments per subgroup along M and N (2 or 4 each), and vec-8 entries per invocation for
// the A and B tiles (1, 2 or 4).
override FM: u32 = BM / WARPS_M / 16u;
override FN: u32 = BN / (WARPS / WARPS_M) / 16u;
override NA: u32 = BM * BK / 8u / WG;
override NB: u32 = BN * BK / 8u / WG;
// Tile order: 0 = row by row; G > 0 = in bands of G tile rows, column by column inside a
// band, so workgroups running together share A rows and B columns in L2.
override GROUP_M: u32 = 0u;

@group(0) @binding(0) var<uniform> p: Params;

// CONV split over K: batch index z computes the partial product over im2col columns
// z·stride_a .. z·stride_a + k (B's batch stride is the same k offset, or 0 with B_FLIP, whose
// remap adds kbase itself; C gets one f32 slice per z, summed by the launcher). Set once per
// invocation in main.
var<private> kbase: u32;
// PHASES: this invocation's output phase (the batch index); set once in main.
var<private> phase: u32;
@group(0) @binding(1) var<storage, read> a: array<mat2x4<f16>>;
@group(0) @binding(2) var<storage, read> b: array<mat2x4<f16>>;
@group(0) @binding(3) var<storage, read> bias: array<mat2x4<f16>>;
@group(0) @binding(4) var<storage, read_write> c: array<u32>;

// Shared tiles in entries of 8 halves (two vec4<f16>): K-contiguous rows hold KE + 1
// entries (KE = BK/8); M- or N-contiguous rows hold X/8 + 1. Sizes in vec4<f16> units.
// SA_LEN / SB_LEN size the arrays (at least STAGES * SA_STAGE / SB_STAGE; the launcher may
// pad them: shared memory per workgroup changes how the driver sizes the SM's shared
// carve-out and its register budget, measured in docs/PERF.md).
override KE: u32 = BK / 8u;
override SA_STAGE: u32 = 2u * max(BM * (KE + 1u), BK * (BM / 8u + 1u));
override SB_STAGE: u32 = 2u * max(BN * (KE + 1u), BK * (BN / 8u + 1u));
override SA_LEN: u32 = SA_STAGE * STAGES;
override SB_LEN: u32 = SB_STAGE * STAGES;
var<workgroup> sa: array<vec4<f16>, SA_LEN>;
var<workgroup> sb: array<vec4<f16>, SB_LEN>;

fn put_a(e: u32, v: mat2x4<f16>) {
    sa[2u * e] = v[0];
    sa[2u * e + 1u] = v[1];
}
fn put_b(e: u32, v: mat2x4<f16>) {
    sb[2u * e] = v[0];
    sb[2u * e + 1u] = v[1];
}
var<workgroup> stage: array<f32, WARPS * 256u>;   // one 16x16 f32 tile per subgroup

fn half_at(v: mat2x4<f16>, i: u32) -> f16 {
    return v[(i >> 2u) & 1u][i & 3u];
}

// 8 halves of a stored [rows, ld] matrix at row r, columns c0..c0+8, zero outside
// [0,rows)x[0,cols).
fn load8(is_a: bool, base: u32, r: u32, c0: u32, rows: u32, cols: u32, ld: u32, vec_ok: bool) -> mat2x4<f16> {
    if (VEC) {
        let i = (base + min(r, rows - 1u) * ld + min(c0, cols - 8u)) >> 3u;
        var v: mat2x4<f16>;
        if (is_a) { v = a[i]; } else { v = b[i]; }
        let inside = r < rows && c0 < cols;
        return mat2x4<f16>(select(vec4<f16>(), v[0], inside), select(vec4<f16>(), v[1], inside));
    }
    if (r < rows && c0 + 8u <= cols && vec_ok) {
        let i = (base + r * ld + c0) >> 3u;
        if (is_a) { return a[i]; }
        return b[i];
    }
    var out = mat2x4<f16>();
    for (var j = 0u; j < 8u; j++) {
        let i = base + r * ld + c0 + j;
        var v = 0.0h;
        if (r < rows && c0 + j < cols) {
            if (is_a) { v = half_at(a[i >> 3u], i); } else { v = half_at(b[i >> 3u], i); }
        }
        out[j / 4u][j % 4u] = v;
    }
    return out;
}

// The gather's padding before the first row and column: the convolution's, or with PHASES
// the phase's (1 - a, 1 - b).
fn pad_yx() -> vec2<u32> {
    if (PHASES) { return vec2<u32>(1u - (phase >> 1u), 1u - (phase & 1u)); }
    return vec2<u32>(p.pad);
}

// One input value of the implicit im2col matrix at (m, k); 0 outside the image or the matrix.
fn conv_el(m: u32, k: u32) -> f16 {
    if (m >= p.m || k >= p.k) { return 0.0h; }
    let ohw = p.oh * p.ow;
    let img = m / ohw;
    let oy = (m % ohw) / p.ow;
    let ox = m % p.ow;
    let ci = (k + kbase) % p.cin;
    let tap = (k + kbase) / p.cin;
    let y = i32(oy * p.stride + tap / p.ks) - i32(pad_yx().x);
    let x = i32(ox * p.stride + tap % p.ks) - i32(pad_yx().y);
    if (y < 0 || x < 0 || y >= i32(p.ih) || x >= i32(p.iw)) { return 0.0h; }
    let i = p.off_a + ((img * p.ih + u32(y)) * p.iw + u32(x)) * p.cin + ci;
    return half_at(a[i >> 3u], i);
}

// Eight values of the implicit im2col matrix: row m, columns k0..k0+8.
fn conv8(m: u32, k0: u32) -> mat2x4<f16> {
    if ((p.flags & 8u) != 0u && m < p.m && k0 + 8u <= p.k) {
        // cin % 8 == 0: one pixel, eight channels, one aligned 16-byte word.
        let ohw = p.oh * p.ow;
        let img = m / ohw;
        let oy = (m % ohw) / p.ow;
        let ox = m % p.ow;
        let ci = (k0 + kbase) % p.cin;
        let tap = (k0 + kbase) / p.cin;
        let y = i32(oy * p.stride + tap / p.ks) - i32(pad_yx().x);
        let x = i32(ox * p.stride + tap % p.ks) - i32(pad_yx().y);
        if (y < 0 || x < 0 || y >= i32(p.ih) || x >= i32(p.iw)) { return mat2x4<f16>(); }
        return a[(p.off_a + ((img * p.ih + u32(y)) * p.iw + u32(x)) * p.cin + ci) >> 3u];
    }
    var out = mat2x4<f16>();
    out[0] = vec4<f16>(conv_el(m, k0), conv_el(m, k0 + 1u), conv_el(m, k0 + 2u), conv_el(m, k0 + 3u));
    out[1] = vec4<f16>(conv_el(m, k0 + 4u), conv_el(m, k0 + 5u), conv_el(m, k0 + 6u), conv_el(m, k0 + 7u));
    return out;
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
fn convt_el(m: u32, k: u32) -> f16 {
    if (m >= p.m || k >= p.k) { return 0.0h; }
    let px = convt_pixel(m, k + kbase);
    if (px == NO_PIXEL) { return 0.0h; }
    let i = p.off_a + px * p.cin + (k + kbase) % p.cin;
    return half_at(a[i >> 3u], i);
}

// CONV_T: eight values of the implicit im2col matrix, row m, columns k0..k0+8.
fn convt8(m: u32, k0: u32) -> mat2x4<f16> {
    if ((p.flags & 8u) != 0u && m < p.m && k0 + 8u <= p.k) {
        // cin % 8 == 0: one pixel, eight channels, one aligned 16-byte word.
        let px = convt_pixel(m, k0 + kbase);
        if (px == NO_PIXEL) { return mat2x4<f16>(); }
        return a[(p.off_a + px * p.cin + (k0 + kbase) % p.cin) >> 3u];
    }
    var out = mat2x4<f16>();
    out[0] = vec4<f16>(convt_el(m, k0), convt_el(m, k0 + 1u), convt_el(m, k0 + 2u), convt_el(m, k0 + 3u));
    out[1] = vec4<f16>(convt_el(m, k0 + 4u), convt_el(m, k0 + 5u), convt_el(m, k0 + 6u), convt_el(m, k0 + 7u));
    return out;
}

// B_FLIP: the element of W where row k (with kbase) of the remapped B starts.
fn flip_row(kk: u32) -> u32 {
    let co = kk % p.cin;
    let tap = kk / p.cin;
    let ty = tap / p.ks;
    let tx = tap % p.ks;
    return p.off_b + ((co * p.ks + (p.ks - 1u - ty)) * p.ks + (p.ks - 1u - tx)) * p.n;
}

// B_FLIP: one value of B's row starting at W element `row`, column n; 0 past N.
fn flip_el(row: u32, n: u32) -> f16 {
    if (n >= p.n) { return 0.0h; }
    return half_at(b[(row + n) >> 3u], row + n);
}

// B_FLIP: B row k, columns n0..n0+8 (n0 a multiple of 8), zero outside [0,K)x[0,N).
fn flip8(k: u32, n0: u32, vec_ok: bool) -> mat2x4<f16> {
    if (k >= p.k) { return mat2x4<f16>(); }
    let row = flip_row(k + kbase);
    if (n0 + 8u <= p.n && vec_ok) { return b[(row + n0) >> 3u]; }
    var out = mat2x4<f16>();
    out[0] = vec4<f16>(flip_el(row, n0), flip_el(row, n0 + 1u), flip_el(row, n0 + 2u), flip_el(row, n0 + 3u));
    out[1] = vec4<f16>(flip_el(row, n0 + 4u), flip_el(row, n0 + 5u), flip_el(row, n0 + 6u), flip_el(row, n0 + 7u));
    return out;
}

// Entry e of a K-contiguous tile -> (row, chunk). Each subgroup's 32 consecutive entries are
// 8 rows of KE chunks; with KE = 4 lane l takes row (l % 8) / 4 · 4 + l / 8 and chunk l % 4,
// so a quarter-warp (what one 16-byte load or store serves at once) holds chunks 0..3 of
// rows r and r+4: 2 rows of 64 bytes from global memory as before, and in the shared tile
// (rows 5 chunks apart) 8 different 16-byte bank slots, where rows r and r+1 share one.
// Other KE: row by row. An invocation's entries (t + i·WG) all get chunk t % KE.
fn kc_entry(e: u32) -> vec2<u32> {
    if (KE == 4u) {
        let l = e % 32u;
        return vec2<u32>(e / 32u * 8u + (l % 8u) / 4u * 4u + l / 8u, l % 4u);
    }
    return vec2<u32>(e / KE, e % KE);
}

// Tile of A for k0: K-contiguous (!TRANS_A) it is BM rows of BK; else BK rows of BM.
// Entry e (of BM*BK/8) -> (stored row, stored col0) and its shared index.
fn a_entry(e: u32, m0: u32, k0: u32) -> vec3<u32> {
    if (TRANS_A) {
        let per = BM / 8u;
        let r = e / per; let q = e % per;
        return vec3<u32>(k0 + r, m0 + q * 8u, r * (per + 1u) + q);
    }
    let rq = kc_entry(e);
    return vec3<u32>(m0 + rq.x, k0 + rq.y * 8u, rq.x * (KE + 1u) + rq.y);
}
fn b_entry(e: u32, n0: u32, k0: u32) -> vec3<u32> {
    if (!TRANS_B) {
        let per = BN / 8u;
        let r = e / per; let q = e % per;
        return vec3<u32>(k0 + r, n0 + q * 8u, r * (per + 1u) + q);
    }
    let rq = kc_entry(e);
    return vec3<u32>(n0 + rq.x, k0 + rq.y * 8u, rq.x * (KE + 1u) + rq.y);
}

fn fetch_a(e: u32, m0: u32, k0: u32, base: u32, vec_ok: bool) -> mat2x4<f16> {
    let x = a_entry(e, m0, k0);
    if (TRANS_A) { return load8(true, base, x.x, x.y, p.k, p.m, p.lda, vec_ok); }
    if (CONV && CONV_T) { return convt8(x.x, x.y); }
    if (CONV) { return conv8(x.x, x.y); }
    return load8(true, base, x.x, x.y, p.m, p.k, p.lda, vec_ok);
}

// CONV (not CONV_T) with cin % 8 == 0, the gather split in its two halves: the row half of an
// im2col entry (which image, and the top-left input pixel of its window) is fixed for an
// invocation's entry over the whole K loop, so it is computed once before it; the column half
// (tap and channel) is the same for all of an invocation's entries in a K step (their column
// chunk is t % KE), so it is computed once a step, by divisions only before the loop and
// then by moving the channel BK on with a carry into the tap (H100: forward convolutions +3 to
// +16%, docs/PERF.md conv v5). Each word then costs a bounds test, one index and a select (no
// branch), not the four integer divisions of conv8.
// Row half of im2col row m: (first pixel of its image, oy·stride - pad, ox·stride - pad); rows
// past M get a y origin so negative that every tap reads zero.
fn conv_row(m: u32) -> vec3<i32> {
    let ohw = p.oh * p.ow;
    let img = m / ohw;
    let oy = (m % ohw) / p.ow;
    let ox = m % p.ow;
    let y0 = select(-0x40000000, i32(oy * p.stride) - i32(pad_yx().x), m < p.m);
    return vec3<i32>(i32(img * p.ih * p.iw), y0, i32(ox * p.stride) - i32(pad_yx().y));
}
// Column half of im2col column kk (slice-local): (ky, kx, channel, kk inside K).
fn conv_col(kk: u32) -> vec4<u32> {
    let kg = kk + kbase;
    let tap = kg / p.cin;
    return vec4<u32>(tap / p.ks, tap % p.ks, kg % p.cin, select(0u, 1u, kk < p.k));
}
// The column half BK columns on, from this one (kk: the new slice-local column): the channel
// moves BK on and carries into the tap, so no division after the first step.
fn conv_col_next(c: vec4<u32>, kk: u32) -> vec4<u32> {
    var ky = c.x; var kx = c.y; var ci = c.z + BK;
    while (ci >= p.cin) {
        ci -= p.cin;
        kx += 1u;
        if (kx == p.ks) { kx = 0u; ky += 1u; }
    }
    return vec4<u32>(ky, kx, ci, select(0u, 1u, kk < p.k));
}
// The A word of entry e from its row half and this step's column half (general gather where
// cin % 8 != 0). Branch-free: a tap outside the image reads word 0 and is zeroed by select.
fn fetch_a_conv(e: u32, row: vec3<i32>, col: vec4<u32>, m0: u32, k0: u32, base: u32, vec_ok: bool) -> mat2x4<f16> {
    if (!CONV || CONV_T || (p.flags & 8u) == 0u) { return fetch_a(e, m0, k0, base, vec_ok); }
    let y = u32(row.y + i32(col.x));
    let x = u32(row.z + i32(col.y));
    let inside = col.w != 0u && y < p.ih && x < p.iw;
    let i = select(0u, (p.off_a + (u32(row.x) + y * p.iw + x) * p.cin + col.z) >> 3u, inside);
    let v = a[i];
    return mat2x4<f16>(select(vec4<f16>(), v[0], inside), select(vec4<f16>(), v[1], inside));
}

fn fetch_b(e: u32, n0: u32, k0: u32, base: u32, vec_ok: bool) -> mat2x4<f16> {
    let x = b_entry(e, n0, k0);
    if (TRANS_B) { return load8(false, base, x.x, x.y, p.n, p.k, p.ldb, vec_ok); }
    if (CONV && B_FLIP) { return flip8(x.x, x.y, vec_ok); }
    return load8(false, base, x.x, x.y, p.k, p.n, p.ldb, vec_ok);
}

// Fragment loads from the shared tile at offset o (indices and strides in vec4<f16> units).
// A fragment: rows m..m+16, k..k+16 of the tile.
fn frag_a(o: u32, m: u32, k: u32) -> coop_mat16x16<f16, A> {
    if (TRANS_A) {
        let per = BM / 4u + 2u;
        return coopLoad<coop_mat16x16<f16, A>>(&sa[o + k * per + m / 4u], per);
    }
    let ld = 2u * (KE + 1u);
    return coopLoadT<coop_mat16x16<f16, A>>(&sa[o + m * ld + k / 4u], ld);
}
fn frag_b(o: u32, k: u32, n: u32) -> coop_mat16x16<f16, B> {
    if (TRANS_B) {
        let ld = 2u * (KE + 1u);
        return coopLoad<coop_mat16x16<f16, B>>(&sb[o + n * ld + k / 4u], ld);
    }
    let per = BN / 4u + 2u;
    return coopLoadT<coop_mat16x16<f16, B>>(&sb[o + k * per + n / 4u], per);
}

// naga 30 needs the store in a helper when the matrix is a var (see DESIGN.md).
fn stage_store(m: coop_mat16x16<f32, C>, at: u32) {
    coopStoreT(m, &stage[at], 16u);
}

// The bias of columns n, n + 1 at element bi, bi + 1 (0 past N).
fn bias_pair(bi: u32, n: u32) -> vec2<f32> {
    var v = vec2<f32>();
    if (n < p.n) { v.x = f32(half_at(bias[bi >> 3u], bi)); }
    if (n + 1u < p.n) { v.y = f32(half_at(bias[(bi + 1u) >> 3u], bi + 1u)); }
    return v;
}

// What C holds at columns n, n + 1 of the row starting at element `row` (accumulate; 0 past
// N). f16: the packed pair (a pair whose first column is in range may read its pad column).
fn c_pair(row: u32, n: u32) -> vec2<f32> {
    if (n >= p.n) { return vec2<f32>(); }
    if (OUT_F32) {
        var v = vec2<f32>(bitcast<f32>(c[row + n]), 0.0);
        if (n + 1u < p.n) { v.y = bitcast<f32>(c[row + n + 1u]); }
        return v;
    }
    return unpack2x16float(c[(row + n) >> 1u]);
}

// Writes columns n, n + 1 (v) of the row starting at element `row`; nothing past N.
fn put_c(row: u32, n: u32, v: vec2<f32>) {
    if (n >= p.n) { return; }
    if (OUT_F32) {
        c[row + n] = bitcast<u32>(v.x);
        if (n + 1u < p.n) { c[row + n + 1u] = bitcast<u32>(v.y); }
    } else {
        c[(row + n) >> 1u] = pack2x16float(v);
    }
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

// Writes one 16x16 accumulator at tile rows m.., columns n.. through the staging tile: lane
// pair r writes row r, lane j of it columns 8j .. 8j + 8. Its global reads (bias, and C when
// accumulating) are issued before the staging store and barrier, so that their latency
// overlaps them instead of following them: each emit is a dependent chain, sixteen of them
// in a row for a 64x64 subgroup tile, which weighs most where K is short (H100: the UNet's
// 8192x320x320 product +5% in the bench; docs/PERF.md, matmul session 17).
// Called in uniform control flow by every subgroup (it holds workgroup barriers).
fn emit(acc: coop_mat16x16<f32, C>, m_base: u32, n_base: u32, st: u32, lane: u32, base_c: u32) {
    let lr = lane / 2u;
    let lc = (lane % 2u) * 8u;
    let m = m_base + lr;
    let nc = n_base + lc;
    let live = m < p.m;
    let row = base_c + c_row(m);
    // Bias plus (accumulate) the previous C, per column pair.
    var add0 = vec2<f32>(); var add1 = vec2<f32>(); var add2 = vec2<f32>(); var add3 = vec2<f32>();
    if (live) {
        if ((p.flags & 1u) != 0u) {
            // This row's bias (a per-image one only in the PER_IMAGE_BIAS variant: the
            // division cost the VAE decode 2% in every epilogue).
            var bi = p.off_bias + nc;
            if (PER_IMAGE_BIAS) { bi += (m / p.bias_rows) * p.bias_ld; }
            add0 = bias_pair(bi, nc); add1 = bias_pair(bi + 2u, nc + 2u);
            add2 = bias_pair(bi + 4u, nc + 4u); add3 = bias_pair(bi + 6u, nc + 6u);
        }
        if ((p.flags & 2u) != 0u) {
            add0 += c_pair(row, nc); add1 += c_pair(row, nc + 2u);
            add2 += c_pair(row, nc + 4u); add3 += c_pair(row, nc + 6u);
        }
    }
    stage_store(acc, st);
    workgroupBarrier();
    if (live) {
        let s = st + lr * 16u + lc;
        put_c(row, nc, vec2<f32>(stage[s], stage[s + 1u]) * p.alpha + add0);
        put_c(row, nc + 2u, vec2<f32>(stage[s + 2u], stage[s + 3u]) * p.alpha + add1);
        put_c(row, nc + 4u, vec2<f32>(stage[s + 4u], stage[s + 5u]) * p.alpha + add2);
        put_c(row, nc + 6u, vec2<f32>(stage[s + 6u], stage[s + 7u]) * p.alpha + add3);
    }
    workgroupBarrier();
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32,
        @builtin(subgroup_id) sid: u32, @builtin(subgroup_invocation_id) lane: u32) {
    let warps_n = WARPS / WARPS_M;
    let bz = wg.z;
    var tm = wg.y;
    var tn = wg.x;
    if (GROUP_M > 0u) {
        let id = wg.y * nwg.x + wg.x;
        let per_band = GROUP_M * nwg.x;
        let band = id / per_band;
        let rows = min(GROUP_M, nwg.y - band * GROUP_M);
        let r = id % per_band;
        tm = band * GROUP_M + r % rows;
        tn = r / rows;
    }
    let m0 = tm * BM;
    let n0 = tn * BN;
    let base_a = p.off_a + bz * p.stride_a;
    if (CONV) { kbase = bz * p.stride_a; }
    if (PHASES) { phase = bz; }
    let base_b = p.off_b + bz * p.stride_b;
    let vec_ok = (p.flags & 4u) != 0u;
    let wm = (sid / warps_n) * (BM / WARPS_M);
    let wn = (sid % warps_n) * (BN / warps_n);

    var c00 = coop_mat16x16<f32, C>(); var c01 = coop_mat16x16<f32, C>();
    var c02 = coop_mat16x16<f32, C>(); var c03 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>(); var c11 = coop_mat16x16<f32, C>();
    var c12 = coop_mat16x16<f32, C>(); var c13 = coop_mat16x16<f32, C>();
    var c20 = coop_mat16x16<f32, C>(); var c21 = coop_mat16x16<f32, C>();
    var c22 = coop_mat16x16<f32, C>(); var c23 = coop_mat16x16<f32, C>();
    var c30 = coop_mat16x16<f32, C>(); var c31 = coop_mat16x16<f32, C>();
    var c32 = coop_mat16x16<f32, C>(); var c33 = coop_mat16x16<f32, C>();

    // CONV: the row halves of this invocation's A entries (see conv_row), unused otherwise.
    var cr0 = vec3<i32>(); var cr1 = cr0; var cr2 = cr0; var cr3 = cr0;
    if (CONV && !CONV_T) {
        cr0 = conv_row(a_entry(t, m0, 0u).x);
        if (NA > 1u) { cr1 = conv_row(a_entry(t + WG, m0, 0u).x); }
        if (NA > 2u) { cr2 = conv_row(a_entry(t + 2u * WG, m0, 0u).x); cr3 = conv_row(a_entry(t + 3u * WG, m0, 0u).x); }
    }
    let kq = (t % KE) * 8u;   // this invocation's column chunk in a K-contiguous A tile
    var cc = vec4<u32>();
    if (CONV && !CONV_T) { cc = conv_col(kq); }
    var ra0 = fetch_a_conv(t, cr0, cc, m0, 0u, base_a, vec_ok);
    var ra1 = ra0; var ra2 = ra0; var ra3 = ra0;
    if (NA > 1u) { ra1 = fetch_a_conv(t + WG, cr1, cc, m0, 0u, base_a, vec_ok); }
    if (NA > 2u) { ra2 = fetch_a_conv(t + 2u * WG, cr2, cc, m0, 0u, base_a, vec_ok); ra3 = fetch_a_conv(t + 3u * WG, cr3, cc, m0, 0u, base_a, vec_ok); }
    var rb0 = fetch_b(t, n0, 0u, base_b, vec_ok);
    var rb1 = rb0; var rb2 = rb0; var rb3 = rb0;
    if (NB > 1u) { rb1 = fetch_b(t + WG, n0, 0u, base_b, vec_ok); }
    if (NB > 2u) { rb2 = fetch_b(t + 2u * WG, n0, 0u, base_b, vec_ok); rb3 = fetch_b(t + 3u * WG, n0, 0u, base_b, vec_ok); }

    if (STAGES == 2u) {
        put_a(a_entry(t, 0u, 0u).z, ra0);
        if (NA > 1u) { put_a(a_entry(t + WG, 0u, 0u).z, ra1); }
        if (NA > 2u) { put_a(a_entry(t + 2u * WG, 0u, 0u).z, ra2); put_a(a_entry(t + 3u * WG, 0u, 0u).z, ra3); }
        put_b(b_entry(t, 0u, 0u).z, rb0);
        if (NB > 1u) { put_b(b_entry(t + WG, 0u, 0u).z, rb1); }
        if (NB > 2u) { put_b(b_entry(t + 2u * WG, 0u, 0u).z, rb2); put_b(b_entry(t + 3u * WG, 0u, 0u).z, rb3); }
        workgroupBarrier();
    }
    var step = 0u;
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        // Shared tile read this step, and (two stages) the one the next step's data goes to.
        var oa = 0u; var ob = 0u; var na = 0u; var nb = 0u;
        if (STAGES == 2u) {
            let cur = step & 1u;
            oa = cur * SA_STAGE; ob = cur * SB_STAGE;
            na = (cur ^ 1u) * (SA_STAGE / 2u); nb = (cur ^ 1u) * (SB_STAGE / 2u);
        } else {
            put_a(a_entry(t, 0u, 0u).z, ra0);
            if (NA > 1u) { put_a(a_entry(t + WG, 0u, 0u).z, ra1); }
            if (NA > 2u) { put_a(a_entry(t + 2u * WG, 0u, 0u).z, ra2); put_a(a_entry(t + 3u * WG, 0u, 0u).z, ra3); }
            put_b(b_entry(t, 0u, 0u).z, rb0);
            if (NB > 1u) { put_b(b_entry(t + WG, 0u, 0u).z, rb1); }
            if (NB > 2u) { put_b(b_entry(t + 2u * WG, 0u, 0u).z, rb2); put_b(b_entry(t + 3u * WG, 0u, 0u).z, rb3); }
            workgroupBarrier();
        }
        step += 1u;
        let kn = k0 + BK;
        if (kn < p.k) {
            if (CONV && !CONV_T && (p.flags & 8u) != 0u) { cc = conv_col_next(cc, kn + kq); }
            ra0 = fetch_a_conv(t, cr0, cc, m0, kn, base_a, vec_ok);
            if (NA > 1u) { ra1 = fetch_a_conv(t + WG, cr1, cc, m0, kn, base_a, vec_ok); }
            if (NA > 2u) { ra2 = fetch_a_conv(t + 2u * WG, cr2, cc, m0, kn, base_a, vec_ok); ra3 = fetch_a_conv(t + 3u * WG, cr3, cc, m0, kn, base_a, vec_ok); }
            rb0 = fetch_b(t, n0, kn, base_b, vec_ok);
            if (NB > 1u) { rb1 = fetch_b(t + WG, n0, kn, base_b, vec_ok); }
            if (NB > 2u) { rb2 = fetch_b(t + 2u * WG, n0, kn, base_b, vec_ok); rb3 = fetch_b(t + 3u * WG, n0, kn, base_b, vec_ok); }
        }
        for (var kk = 0u; kk < BK; kk += 16u) {
            let a0 = frag_a(oa, wm, kk);
            let a1 = frag_a(oa, wm + 16u, kk);
            let b0 = frag_b(ob, kk, wn);
            let b1 = frag_b(ob, kk, wn + 16u);
            c00 = coopMultiplyAdd(a0, b0, c00); c01 = coopMultiplyAdd(a0, b1, c01);
            c10 = coopMultiplyAdd(a1, b0, c10); c11 = coopMultiplyAdd(a1, b1, c11);
            if (FN > 2u) {
                let b2 = frag_b(ob, kk, wn + 32u);
                let b3 = frag_b(ob, kk, wn + 48u);
                c02 = coopMultiplyAdd(a0, b2, c02); c03 = coopMultiplyAdd(a0, b3, c03);
                c12 = coopMultiplyAdd(a1, b2, c12); c13 = coopMultiplyAdd(a1, b3, c13);
                if (FM > 2u) {
                    let a2 = frag_a(oa, wm + 32u, kk);
                    let a3 = frag_a(oa, wm + 48u, kk);
                    c20 = coopMultiplyAdd(a2, b0, c20); c21 = coopMultiplyAdd(a2, b1, c21);
                    c22 = coopMultiplyAdd(a2, b2, c22); c23 = coopMultiplyAdd(a2, b3, c23);
                    c30 = coopMultiplyAdd(a3, b0, c30); c31 = coopMultiplyAdd(a3, b1, c31);
                    c32 = coopMultiplyAdd(a3, b2, c32); c33 = coopMultiplyAdd(a3, b3, c33);
                }
            } else if (FM > 2u) {
                let a2 = frag_a(oa, wm + 32u, kk);
                let a3 = frag_a(oa, wm + 48u, kk);
                c20 = coopMultiplyAdd(a2, b0, c20); c21 = coopMultiplyAdd(a2, b1, c21);
                c30 = coopMultiplyAdd(a3, b0, c30); c31 = coopMultiplyAdd(a3, b1, c31);
            }
        }
        if (STAGES == 2u && kn < p.k) {
            put_a(na + a_entry(t, 0u, 0u).z, ra0);
            if (NA > 1u) { put_a(na + a_entry(t + WG, 0u, 0u).z, ra1); }
            if (NA > 2u) { put_a(na + a_entry(t + 2u * WG, 0u, 0u).z, ra2); put_a(na + a_entry(t + 3u * WG, 0u, 0u).z, ra3); }
            put_b(nb + b_entry(t, 0u, 0u).z, rb0);
            if (NB > 1u) { put_b(nb + b_entry(t + WG, 0u, 0u).z, rb1); }
            if (NB > 2u) { put_b(nb + b_entry(t + 2u * WG, 0u, 0u).z, rb2); put_b(nb + b_entry(t + 3u * WG, 0u, 0u).z, rb3); }
        }
        workgroupBarrier();
    }

    var base_c = p.off_c + bz * p.stride_c;
    if (PHASES) { base_c = p.off_c + ((bz >> 1u) * 2u * p.ow + (bz & 1u)) * p.ldc; }
    let st = sid * 256u;
    let mb = m0 + wm;
    let nb = n0 + wn;
    emit(c00, mb, nb, st, lane, base_c); emit(c01, mb, nb + 16u, st, lane, base_c);
    emit(c10, mb + 16u, nb, st, lane, base_c); emit(c11, mb + 16u, nb + 16u, st, lane, base_c);
    if (FN > 2u) {
        emit(c02, mb, nb + 32u, st, lane, base_c); emit(c03, mb, nb + 48u, st, lane, base_c);
        emit(c12, mb + 16u, nb + 32u, st, lane, base_c); emit(c13, mb + 16u, nb + 48u, st, lane, base_c);
    }
    if (FM > 2u) {
        emit(c20, mb + 32u, nb, st, lane, base_c); emit(c21, mb + 32u, nb + 16u, st, lane, base_c);
        emit(c30, mb + 48u, nb, st, lane, base_c); emit(c31, mb + 48u, nb + 16u, st, lane, base_c);
        if (FN > 2u) {
            emit(c22, mb + 32u, nb + 32u, st, lane, base_c); emit(c23, mb + 32u, nb + 48u, st, lane, base_c);
            emit(c32, mb + 48u, nb + 32u, st, lane, base_c); emit(c33, mb + 48u, nb + 48u, st, lane, base_c);
        }
    }
}
