// conv_thin.wgsl — a stride-1 convolution (ks 1 or 3, "same" padding) to at most 4 output
// channels computed directly (kernels::conv_thin): the VAE decoder's conv_out (128 -> 3 at the
// image's size). On the matmul shaders such a product is a 4-wide sliver of a tile that still
// gathers the whole 9-tap im2col matrix; here a workgroup computes a tile of TH x TW output
// pixels of one image (one invocation a pixel) and stages, a chunk of 16 channels at a time,
// the input tile with its halo ((TH + ks - 1) x (TW + ks - 1) pixels, read once, coalesced)
// and the chunk's weights in workgroup memory; every tap then reads them from there.
//
// x: NHWC [images, h, w, cin] f16 read as vec4<u32> words of 8 channels (cin % 8 == 0);
// weight [cout, ks, ks, cin] and bias [cout] f16 read as u32 pairs; y: [images, h, w, cout]
// f16 written as u32 pairs through a staging tile: a tile row's TW·cout halves are whole words
// (w even), so no two workgroups share a word. f32 arithmetic, no shader-f16 needed. The chunk
// loop is uniform, so its barriers are too.
// Shared layout: the halo's word j (0, 1) of pixel q at tin[j·HALO + q] (lanes read 16-byte
// words 16 bytes apart: no bank conflicts); weights one vec4<f32> (the cout values) per (tap,
// channel of the chunk).

struct Params {
    images: u32,
    h: u32,
    w: u32,
    cin: u32,
    cout: u32,      // 1..4
    ks: u32,        // 1 or 3
    pad: u32,       // ks / 2
    tiles_x: u32,   // ceil(w / TW)
    tiles_y: u32,   // ceil(h / TH)
    has_bias: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> wt: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<u32>;
@group(0) @binding(4) var<storage, read_write> y: array<u32>;

const TW: u32 = 128u;
const TH: u32 = 2u;
const CC: u32 = 16u;                           // channels a chunk
const HALO: u32 = (TH + 2u) * (TW + 2u);       // halo pixels at ks 3
var<workgroup> tin: array<vec4<u32>, 1040>;    // 2 * HALO
var<workgroup> tws: array<vec4<f32>, 144>;     // 9 taps * CC
var<workgroup> tout: array<vec4<f32>, 256>;    // TH * TW pixels

fn w_at(i: u32) -> f32 {
    let v = unpack2x16float(wt[i >> 1u]);
    return select(v.x, v.y, (i & 1u) == 1u);
}

fn b_at(i: u32) -> f32 {
    let v = unpack2x16float(bias[i >> 1u]);
    return select(v.x, v.y, (i & 1u) == 1u);
}

// The cout weights of tap `tap`, channel `ci` as a vec4 (zero past cout).
fn w4(tap: u32, ci: u32) -> vec4<f32> {
    let taps = p.ks * p.ks;
    var v = vec4<f32>(0.0);
    v.x = w_at(tap * p.cin + ci);
    if (p.cout > 1u) { v.y = w_at((taps + tap) * p.cin + ci); }
    if (p.cout > 2u) { v.z = w_at((2u * taps + tap) * p.cin + ci); }
    if (p.cout > 3u) { v.w = w_at((3u * taps + tap) * p.cin + ci); }
    return v;
}

// The 8 channels of one word times their staged weights from entry e on.
fn dot8(word: vec4<u32>, e: u32) -> vec4<f32> {
    let a = unpack2x16float(word.x);
    let b = unpack2x16float(word.y);
    let c = unpack2x16float(word.z);
    let d = unpack2x16float(word.w);
    return a.x * tws[e] + a.y * tws[e + 1u] + b.x * tws[e + 2u] + b.y * tws[e + 3u]
         + c.x * tws[e + 4u] + c.y * tws[e + 5u] + d.x * tws[e + 6u] + d.y * tws[e + 7u];
}

// Output value h (pixel h / cout, channel h % cout) of tile row r from the staging tile.
fn out_half(r: u32, h: u32) -> f32 {
    let v = tout[r * TW + h / p.cout];
    let ch = h % p.cout;
    return select(select(select(v.x, v.y, ch == 1u), v.z, ch == 2u), v.w, ch == 3u);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let tile = wg.y * nwg.x + wg.x;
    let per_image = p.tiles_x * p.tiles_y;
    if (tile >= p.images * per_image) { return; }   // uniform across the workgroup
    let image = tile / per_image;
    let y0 = (tile % per_image) / p.tiles_x * TH;
    let x0 = tile % p.tiles_x * TW;
    let ly = lid / TW;
    let lx = lid % TW;
    let live = y0 + ly < p.h && x0 + lx < p.w;
    let hw_ = TW + p.ks - 1u;                   // halo width
    let halo = (TH + p.ks - 1u) * hw_;
    let oct = p.cin / 8u;
    let taps = p.ks * p.ks;
    var acc = vec4<f32>(0.0);
    for (var c0 = 0u; c0 < p.cin; c0 += CC) {
        let cc = min(CC, p.cin - c0);           // 16, or 8 for the last chunk
        let wpp = cc / 8u;
        workgroupBarrier();
        for (var e = lid; e < halo * wpp; e += 256u) {
            let q = e / wpp;
            let j = e % wpp;
            let iy = i32(y0 + q / hw_) - i32(p.pad);
            let ix = i32(x0 + q % hw_) - i32(p.pad);
            let inside = iy >= 0 && ix >= 0 && u32(iy) < p.h && u32(ix) < p.w;
            let i = select(0u, ((image * p.h + u32(iy)) * p.w + u32(ix)) * oct + c0 / 8u + j, inside);
            tin[j * HALO + q] = select(vec4<u32>(0u), x[i], inside);
        }
        for (var e = lid; e < taps * cc; e += 256u) {
            tws[e] = w4(e / cc, c0 + e % cc);
        }
        workgroupBarrier();
        if (live) {
            for (var tap = 0u; tap < taps; tap++) {
                let q = (ly + tap / p.ks) * hw_ + lx + tap % p.ks;
                acc += dot8(tin[q], tap * cc);
                if (wpp > 1u) { acc += dot8(tin[HALO + q], tap * cc + 8u); }
            }
        }
    }
    if (p.has_bias != 0u) {
        var bv = vec4<f32>(0.0);
        bv.x = b_at(0u);
        if (p.cout > 1u) { bv.y = b_at(1u); }
        if (p.cout > 2u) { bv.z = b_at(2u); }
        if (p.cout > 3u) { bv.w = b_at(3u); }
        acc += bv;
    }
    tout[lid] = acc;
    workgroupBarrier();
    // Each tile row's pixels x0 .. x0 + n are n·cout consecutive halves of y (n even).
    let n = min(TW, p.w - x0);
    let words = n * p.cout / 2u;
    for (var e = lid; e < TH * TW * 2u; e += 256u) {
        let r = e / (TW * 2u);
        let k = e % (TW * 2u);
        if (y0 + r < p.h && k < words) {
            let at = ((image * p.h + y0 + r) * p.w + x0) * p.cout / 2u + k;
            y[at] = pack2x16float(vec2<f32>(out_half(r, 2u * k), out_half(r, 2u * k + 1u)));
        }
    }
}
