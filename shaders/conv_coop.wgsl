// conv_coop.wgsl — a 3x3 stride-1 convolution ("same" padding) on cooperative matrices
// (tensor cores) that stages the input once per channel chunk instead of gathering the
// im2col matrix (kernels::conv_coop). The matmul shaders' implicit GEMM (override CONV) reads
// every input word nine times through L2 and issues a global load per 8 products of a k-step;
// here a workgroup computes 256 output pixels (TH rows x TW columns of one image) x 64 output
// channels and, 16 input channels at a time, stages the input tile with its one-pixel halo
// ((TH + 2) x (TW + 2) pixels, read once) and the chunk's weights (64 x 9 taps) in workgroup
// memory; the nine taps' A fragments are then strided loads from the halo tile, one pixel
// row further (kx) or one halo row further (ky) per tap. So each barrier pair carries 9 x 16
// products per subgroup instead of the matmul's 2 x 16. With PHASES (below), the same for an
// upsampler's phase convolutions.
//
// x: NHWC [images, h, w, cin] f16; weight [cout, 3, 3, cin] f16; bias f16, read at
// bias_off + image·bias_ld + channel (bias_ld = 0: one vector; else a row per image, the
// UNet's conv1 bias plus the time embedding); y: [images, h, w, cout] f16, written (or, flags
// bit 2, added to). Global tensors are read as mat2x4<f16> words of 8 halves. cin % 16 == 0,
// cout % 64 == 0, w % TW == 0, bias offsets multiples of 8 (the launcher checks). Products
// f16 x f16 -> f32 accumulators; the epilogue adds bias and the previous y in f32 and rounds
// once.
// Dispatch: (cout / 64, images · tiles_y · tiles_x, 1; with PHASES 4) workgroups of 4
// subgroups of 32 invocations (the launcher only picks this kernel where the subgroup size is
// 32). Subgroup s
// holds pixels 64s .. 64s + 64 of the tile (4 fragments of 16 pixels of one row: TW ≥ 16) x
// all 64 channels (4 fragments): 16 accumulators.
// Shared layout (vec4<f16> units, strides multiples of 16 bytes as cooperative loads need):
// the halo's pixel q at sa[q·AS], its 16 channels in the first 4 units (AS = 6: 48-byte
// pixels, so a fragment's 8-row phases hit 8 different 16-byte bank slots); the weights of tap
// t, output channel n at sb[(t·64 + n)·BS]. A chunk is 1152 weight words (9 an invocation)
// and up to 896 halo words (7): each invocation fetches the next chunk's into registers right
// after the barrier that publishes this chunk's, so their latency runs under this chunk's
// products (H100: 255 registers, no spill, two workgroups an SM; without the prefetch 205
// registers and 25-45% slower, docs/PERF.md).
// Saves nothing for backward.

enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    images: u32, h: u32, w: u32, cin: u32,
    cout: u32, tiles_x: u32, tiles_y: u32, flags: u32,   // flags: 1 bias, 2 accumulate
    bias_off: u32, bias_ld: u32, _pad0: u32, _pad1: u32,
}

// Output tile width in pixels (16, 32 or 64, dividing w); TH·TW = 256.
override TW: u32 = 64u;
override TH: u32 = 256u / TW;
// Pixel stride of the halo tile and row stride of the weight tile, in vec4<f16> (4 = 32 bytes,
// no padding; 6 = 48 bytes).
override AS: u32 = 6u;
override BS: u32 = 4u;
override HALO_W: u32 = TW + 2u;
override HALO: u32 = (TH + 2u) * HALO_W;     // halo pixels
override SA_LEN: u32 = HALO * AS;
// PHASES: a nearest 2x upsample followed by the 3x3 convolution, as one of its four output
// phases per workgroup (z = a·2 + b, the output pixels (2i + a, 2j + b)): a 2x2 convolution
// of the small image with the phase's summed weight ([4, cout, 2, 2, cin], see
// kernels::conv::Upsample2xConv) whose tap (dy, dx) reads input pixel (i - 1 + a + dy,
// j - 1 + b + dx): the same halo tile, 4 taps instead of 9. h, w are the small image's.
override PHASES: bool = false;
override NT: u32 = select(9u, 4u, PHASES);   // taps
override SB_LEN: u32 = NT * 64u * BS;

const BN: u32 = 64u;     // output channels a workgroup
const WG: u32 = 128u;    // invocations a workgroup

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<mat2x4<f16>>;
@group(0) @binding(2) var<storage, read> wt: array<mat2x4<f16>>;
@group(0) @binding(3) var<storage, read> bias: array<mat2x4<f16>>;
@group(0) @binding(4) var<storage, read_write> y: array<vec4<u32>>;

var<workgroup> sa: array<vec4<f16>, SA_LEN>;
var<workgroup> sb: array<vec4<f16>, SB_LEN>;
var<workgroup> stage: array<f32, 1024>;   // one 16x16 f32 tile per subgroup
// PHASES: this workgroup's output phase (z); set once in main.
var<private> phase: u32;

// A fragment: 16 halo pixels from pixel q on (one row), the chunk's 16 channels.
fn frag_a(q: u32) -> coop_mat16x16<f16, A> {
    return coopLoadT<coop_mat16x16<f16, A>>(&sa[q * AS], AS);
}
// B fragment: the chunk's 16 channels x output channels n .. n + 16 of tap t.
fn frag_b(t: u32, n: u32) -> coop_mat16x16<f16, B> {
    return coopLoad<coop_mat16x16<f16, B>>(&sb[(t * BN + n) * BS], BS);
}

// naga 30 needs the store in a helper when the matrix is a var (see DESIGN.md).
fn stage_store(m: coop_mat16x16<f32, C>, at: u32) {
    coopStoreT(m, &stage[at], 16u);
}

// 8 halves as f32, for the epilogue.
fn lo4(v: mat2x4<f16>) -> vec4<f32> { return vec4<f32>(v[0]); }
fn hi4(v: mat2x4<f16>) -> vec4<f32> { return vec4<f32>(v[1]); }
fn unpack8(w: vec4<u32>) -> array<vec2<f32>, 4> {
    return array<vec2<f32>, 4>(unpack2x16float(w.x), unpack2x16float(w.y), unpack2x16float(w.z), unpack2x16float(w.w));
}

// Writes one 16x16 accumulator: tile pixels from tile-local pixel index pf (16 in one row),
// output channels nb .. nb + 16, through this subgroup's staging tile. Lane pair r writes
// pixel r, lane j of it channels 8j .. 8j + 8 as one 16-byte word. b_lo, b_hi: this lane's 8
// bias values. Called in uniform control flow (workgroup barriers).
fn emit(acc: coop_mat16x16<f32, C>, pf: u32, nb: u32, st: u32, lane: u32, y0: u32, x0: u32, img: u32, b_lo: vec4<f32>, b_hi: vec4<f32>) {
    let lr = lane / 2u;
    let lc = (lane % 2u) * 8u;
    let yy = y0 + pf / TW;
    let xx = x0 + pf % TW + lr;
    let live = yy < p.h;
    var px = (img * p.h + min(yy, p.h - 1u)) * p.w + xx;
    if (PHASES) {
        // Pixel (2·yy + a, 2·xx + b) of the 2h x 2w output.
        px = (img * 2u * p.h + 2u * min(yy, p.h - 1u) + (phase >> 1u)) * 2u * p.w + 2u * xx + (phase & 1u);
    }
    let wi = (px * p.cout + nb + lc) >> 3u;
    var lo = b_lo;
    var hi = b_hi;
    if (live && (p.flags & 2u) != 0u) {
        let old = unpack8(y[wi]);
        lo += vec4<f32>(old[0], old[1]);
        hi += vec4<f32>(old[2], old[3]);
    }
    stage_store(acc, st);
    workgroupBarrier();
    if (live) {
        let s = st + lr * 16u + lc;
        lo += vec4<f32>(stage[s], stage[s + 1u], stage[s + 2u], stage[s + 3u]);
        hi += vec4<f32>(stage[s + 4u], stage[s + 5u], stage[s + 6u], stage[s + 7u]);
        y[wi] = vec4<u32>(pack2x16float(lo.xy), pack2x16float(lo.zw), pack2x16float(hi.xy), pack2x16float(hi.zw));
    }
    workgroupBarrier();
}

// This lane's 8 bias values for output channels n .. n + 8 (zero without bias).
fn bias8(img: u32, n: u32) -> mat2x4<f16> {
    if ((p.flags & 1u) == 0u) { return mat2x4<f16>(); }
    return bias[(p.bias_off + img * p.bias_ld + n) >> 3u];
}

// Word j of a chunk's weight tile: half (j & 1) of (output channel, tap) row j / 2, which is
// contiguous in [cout, taps, cin] (the phase's, with PHASES) from the workgroup's first
// channel n0; cword: the chunk's first word in a pixel's channels. Past the tile (PHASES: j ≥
// 2·4·64) word 0, which put_w then drops.
fn fetch_w(j: u32, n0: u32, cword: u32) -> mat2x4<f16> {
    let i = ((phase * p.cout + n0) * NT + (j >> 1u)) * (p.cin / 8u) + cword + (j & 1u);
    return wt[select(0u, i, j < 2u * NT * BN)];
}
fn put_w(j: u32, v: mat2x4<f16>) {
    if (j < 2u * NT * BN) {
        let ct = j >> 1u;
        let co = ct / NT;
        let o = ((ct - co * NT) * BN + co) * BS + (j & 1u) * 2u;
        sb[o] = v[0];
        sb[o + 1u] = v[1];
    }
}

// Word j of a chunk's halo tile: half (j & 1) of halo pixel j / 2; zero outside the image and
// past the tile (j ≥ 2·HALO, which put_h then drops).
fn fetch_h(j: u32, img_px: u32, y0: u32, x0: u32, cword: u32) -> mat2x4<f16> {
    let q = j >> 1u;
    let hy = q / HALO_W;
    let iy = y0 + hy - 1u;                    // wraps past the top: fails iy < h
    let ix = x0 + (q - hy * HALO_W) - 1u;
    let inside = iy < p.h && ix < p.w && q < HALO;
    let v = x[select(0u, (img_px + iy * p.w + ix) * (p.cin / 8u) + cword + (j & 1u), inside)];
    return mat2x4<f16>(select(vec4<f16>(), v[0], inside), select(vec4<f16>(), v[1], inside));
}
fn put_h(j: u32, v: mat2x4<f16>) {
    if (j < 2u * HALO) {
        let o = (j >> 1u) * AS + (j & 1u) * 2u;
        sa[o] = v[0];
        sa[o + 1u] = v[1];
    }
}

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32,
        @builtin(subgroup_id) sid: u32, @builtin(subgroup_invocation_id) lane: u32) {
    let n0 = wg.x * BN;
    phase = select(0u, wg.z, PHASES);
    let tiles = p.tiles_x * p.tiles_y;
    let img = wg.y / tiles;
    let r = wg.y - img * tiles;
    let ty0 = r / p.tiles_x;
    let y0 = ty0 * TH;
    let x0 = (r - ty0 * p.tiles_x) * TW;
    let img_px = img * p.h * p.w;

    // Halo pixel of each of this subgroup's four fragments at tap (0, 0).
    let pf0 = sid * 64u;
    let q0 = (pf0 / TW) * HALO_W + pf0 % TW;
    let q1 = ((pf0 + 16u) / TW) * HALO_W + (pf0 + 16u) % TW;
    let q2 = ((pf0 + 32u) / TW) * HALO_W + (pf0 + 32u) % TW;
    let q3 = ((pf0 + 48u) / TW) * HALO_W + (pf0 + 48u) % TW;

    var c00 = coop_mat16x16<f32, C>(); var c01 = coop_mat16x16<f32, C>();
    var c02 = coop_mat16x16<f32, C>(); var c03 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>(); var c11 = coop_mat16x16<f32, C>();
    var c12 = coop_mat16x16<f32, C>(); var c13 = coop_mat16x16<f32, C>();
    var c20 = coop_mat16x16<f32, C>(); var c21 = coop_mat16x16<f32, C>();
    var c22 = coop_mat16x16<f32, C>(); var c23 = coop_mat16x16<f32, C>();
    var c30 = coop_mat16x16<f32, C>(); var c31 = coop_mat16x16<f32, C>();
    var c32 = coop_mat16x16<f32, C>(); var c33 = coop_mat16x16<f32, C>();

    // Chunk 0's words, then per chunk: store them, barrier, fetch the next chunk's (held in
    // registers across this chunk's products), multiply, barrier.
    // (PHASES: the weight tile is 4 words an invocation, w0..w3.)
    var w0 = fetch_w(t, n0, 0u); var w1 = fetch_w(t + WG, n0, 0u); var w2 = fetch_w(t + 2u * WG, n0, 0u);
    var w3 = fetch_w(t + 3u * WG, n0, 0u); var w4 = w0; var w5 = w0; var w6 = w0; var w7 = w0; var w8 = w0;
    if (!PHASES) {
        w4 = fetch_w(t + 4u * WG, n0, 0u); w5 = fetch_w(t + 5u * WG, n0, 0u); w6 = fetch_w(t + 6u * WG, n0, 0u);
        w7 = fetch_w(t + 7u * WG, n0, 0u); w8 = fetch_w(t + 8u * WG, n0, 0u);
    }
    var h0 = fetch_h(t, img_px, y0, x0, 0u); var h1 = fetch_h(t + WG, img_px, y0, x0, 0u);
    var h2 = fetch_h(t + 2u * WG, img_px, y0, x0, 0u); var h3 = fetch_h(t + 3u * WG, img_px, y0, x0, 0u);
    var h4 = fetch_h(t + 4u * WG, img_px, y0, x0, 0u); var h5 = fetch_h(t + 5u * WG, img_px, y0, x0, 0u);
    var h6 = fetch_h(t + 6u * WG, img_px, y0, x0, 0u);
    for (var c0 = 0u; c0 < p.cin; c0 += 16u) {
        put_w(t, w0); put_w(t + WG, w1); put_w(t + 2u * WG, w2); put_w(t + 3u * WG, w3);
        if (!PHASES) {
            put_w(t + 4u * WG, w4); put_w(t + 5u * WG, w5); put_w(t + 6u * WG, w6);
            put_w(t + 7u * WG, w7); put_w(t + 8u * WG, w8);
        }
        put_h(t, h0); put_h(t + WG, h1); put_h(t + 2u * WG, h2); put_h(t + 3u * WG, h3);
        put_h(t + 4u * WG, h4); put_h(t + 5u * WG, h5); put_h(t + 6u * WG, h6);
        workgroupBarrier();
        if (c0 + 16u < p.cin) {
            let nw = (c0 + 16u) / 8u;
            w0 = fetch_w(t, n0, nw); w1 = fetch_w(t + WG, n0, nw); w2 = fetch_w(t + 2u * WG, n0, nw);
            w3 = fetch_w(t + 3u * WG, n0, nw);
            if (!PHASES) {
                w4 = fetch_w(t + 4u * WG, n0, nw); w5 = fetch_w(t + 5u * WG, n0, nw); w6 = fetch_w(t + 6u * WG, n0, nw);
                w7 = fetch_w(t + 7u * WG, n0, nw); w8 = fetch_w(t + 8u * WG, n0, nw);
            }
            h0 = fetch_h(t, img_px, y0, x0, nw); h1 = fetch_h(t + WG, img_px, y0, x0, nw);
            h2 = fetch_h(t + 2u * WG, img_px, y0, x0, nw); h3 = fetch_h(t + 3u * WG, img_px, y0, x0, nw);
            h4 = fetch_h(t + 4u * WG, img_px, y0, x0, nw); h5 = fetch_h(t + 5u * WG, img_px, y0, x0, nw);
            h6 = fetch_h(t + 6u * WG, img_px, y0, x0, nw);
        }
        for (var tap = 0u; tap < NT; tap++) {
            // The tap's offset in the halo tile: (ky, kx), or with PHASES (a + dy, b + dx).
            var ky = tap / 3u;
            var kx = tap - ky * 3u;
            if (PHASES) {
                ky = (phase >> 1u) + tap / 2u;
                kx = (phase & 1u) + tap % 2u;
            }
            let dq = ky * HALO_W + kx;
            let a0 = frag_a(q0 + dq);
            let a1 = frag_a(q1 + dq);
            let a2 = frag_a(q2 + dq);
            let a3 = frag_a(q3 + dq);
            let b0 = frag_b(tap, 0u);
            let b1 = frag_b(tap, 16u);
            let b2 = frag_b(tap, 32u);
            let b3 = frag_b(tap, 48u);
            c00 = coopMultiplyAdd(a0, b0, c00); c01 = coopMultiplyAdd(a0, b1, c01);
            c02 = coopMultiplyAdd(a0, b2, c02); c03 = coopMultiplyAdd(a0, b3, c03);
            c10 = coopMultiplyAdd(a1, b0, c10); c11 = coopMultiplyAdd(a1, b1, c11);
            c12 = coopMultiplyAdd(a1, b2, c12); c13 = coopMultiplyAdd(a1, b3, c13);
            c20 = coopMultiplyAdd(a2, b0, c20); c21 = coopMultiplyAdd(a2, b1, c21);
            c22 = coopMultiplyAdd(a2, b2, c22); c23 = coopMultiplyAdd(a2, b3, c23);
            c30 = coopMultiplyAdd(a3, b0, c30); c31 = coopMultiplyAdd(a3, b1, c31);
            c32 = coopMultiplyAdd(a3, b2, c32); c33 = coopMultiplyAdd(a3, b3, c33);
        }
        workgroupBarrier();
    }

    let st = sid * 256u;
    let lc = (lane % 2u) * 8u;
    let bw0 = bias8(img, n0 + lc);
    let bw1 = bias8(img, n0 + 16u + lc);
    let bw2 = bias8(img, n0 + 32u + lc);
    let bw3 = bias8(img, n0 + 48u + lc);
    emit(c00, pf0, n0, st, lane, y0, x0, img, lo4(bw0), hi4(bw0));
    emit(c01, pf0, n0 + 16u, st, lane, y0, x0, img, lo4(bw1), hi4(bw1));
    emit(c02, pf0, n0 + 32u, st, lane, y0, x0, img, lo4(bw2), hi4(bw2));
    emit(c03, pf0, n0 + 48u, st, lane, y0, x0, img, lo4(bw3), hi4(bw3));
    emit(c10, pf0 + 16u, n0, st, lane, y0, x0, img, lo4(bw0), hi4(bw0));
    emit(c11, pf0 + 16u, n0 + 16u, st, lane, y0, x0, img, lo4(bw1), hi4(bw1));
    emit(c12, pf0 + 16u, n0 + 32u, st, lane, y0, x0, img, lo4(bw2), hi4(bw2));
    emit(c13, pf0 + 16u, n0 + 48u, st, lane, y0, x0, img, lo4(bw3), hi4(bw3));
    emit(c20, pf0 + 32u, n0, st, lane, y0, x0, img, lo4(bw0), hi4(bw0));
    emit(c21, pf0 + 32u, n0 + 16u, st, lane, y0, x0, img, lo4(bw1), hi4(bw1));
    emit(c22, pf0 + 32u, n0 + 32u, st, lane, y0, x0, img, lo4(bw2), hi4(bw2));
    emit(c23, pf0 + 32u, n0 + 48u, st, lane, y0, x0, img, lo4(bw3), hi4(bw3));
    emit(c30, pf0 + 48u, n0, st, lane, y0, x0, img, lo4(bw0), hi4(bw0));
    emit(c31, pf0 + 48u, n0 + 16u, st, lane, y0, x0, img, lo4(bw1), hi4(bw1));
    emit(c32, pf0 + 48u, n0 + 32u, st, lane, y0, x0, img, lo4(bw2), hi4(bw2));
    emit(c33, pf0 + 48u, n0 + 48u, st, lane, y0, x0, img, lo4(bw3), hi4(bw3));
}
