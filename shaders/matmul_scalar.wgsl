// matmul_scalar.wgsl — tiled scalar matrix product, f16 storage, f32 arithmetic.
//
// C[b] = alpha * op(A[b]) · op(B[b]) (+ bias[n]) (+ C[b] when ACCUMULATE), row-major C [M, N].
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
// Saves nothing for backward.

struct Params {
    m: u32, n: u32, k: u32, batch: u32,
    lda: u32, ldb: u32, ldc: u32, flags: u32,      // flags: 1 bias, 2 accumulate, 4 vector loads ok
    stride_a: u32, stride_b: u32, stride_c: u32, alpha: f32,
    off_a: u32, off_b: u32, off_c: u32, off_bias: u32,
}

override TRANS_A: bool = false;
override TRANS_B: bool = true;
override OUT_F32: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
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

fn ld_a(i: u32) -> f32 { return half_at(a[i >> 3u], i); }
fn ld_b(i: u32) -> f32 { return half_at(b[i >> 3u], i); }

// 8 consecutive halves of A starting at element `i`, 0 where `valid` says so.
fn unpack8(v: vec4<u32>) -> array<f32, 8> {
    let p0 = unpack2x16float(v.x);
    let p1 = unpack2x16float(v.y);
    let p2 = unpack2x16float(v.z);
    let p3 = unpack2x16float(v.w);
    return array<f32, 8>(p0.x, p0.y, p1.x, p1.y, p2.x, p2.y, p3.x, p3.y);
}

// Loads 8 elements along the contiguous axis of a stored [rows, ld] matrix: row `r`,
// columns c0..c0+8, zero outside [0,rows)x[0,cols).
fn load8_a(base: u32, r: u32, c0: u32, rows: u32, cols: u32, ld: u32, vec_ok: bool) -> array<f32, 8> {
    if (r < rows && c0 + 8u <= cols && vec_ok) {
        return unpack8(a[(base + r * ld + c0) >> 3u]);
    }
    var out: array<f32, 8>;
    for (var j = 0u; j < 8u; j++) {
        out[j] = select(0.0, ld_a(base + r * ld + c0 + j), r < rows && c0 + j < cols);
    }
    return out;
}

fn load8_b(base: u32, r: u32, c0: u32, rows: u32, cols: u32, ld: u32, vec_ok: bool) -> array<f32, 8> {
    if (r < rows && c0 + 8u <= cols && vec_ok) {
        return unpack8(b[(base + r * ld + c0) >> 3u]);
    }
    var out: array<f32, 8>;
    for (var j = 0u; j < 8u; j++) {
        out[j] = select(0.0, ld_b(base + r * ld + c0 + j), r < rows && c0 + j < cols);
    }
    return out;
}

// Which 8 elements thread t loads for the tile at k0: returns (row, col0) in the stored matrix.
// K-contiguous storage: 128 rows x 2 groups of 8 k. Otherwise: 16 k-rows x 16 groups of 8.
fn tile_a(t: u32, m0: u32, k0: u32) -> vec2<u32> {
    if (TRANS_A) { return vec2<u32>(k0 + t / 16u, m0 + (t % 16u) * 8u); }
    return vec2<u32>(m0 + t / 2u, k0 + (t % 2u) * 8u);
}
fn tile_b(t: u32, n0: u32, k0: u32) -> vec2<u32> {
    if (TRANS_B) { return vec2<u32>(n0 + t / 2u, k0 + (t % 2u) * 8u); }
    return vec2<u32>(k0 + t / 16u, n0 + (t % 16u) * 8u);
}

fn fetch_a(t: u32, m0: u32, k0: u32, base: u32, vec_ok: bool) -> array<f32, 8> {
    let rc = tile_a(t, m0, k0);
    if (TRANS_A) { return load8_a(base, rc.x, rc.y, p.k, p.m, p.lda, vec_ok); }
    return load8_a(base, rc.x, rc.y, p.m, p.k, p.lda, vec_ok);
}
fn fetch_b(t: u32, n0: u32, k0: u32, base: u32, vec_ok: bool) -> array<f32, 8> {
    let rc = tile_b(t, n0, k0);
    if (TRANS_B) { return load8_b(base, rc.x, rc.y, p.n, p.k, p.ldb, vec_ok); }
    return load8_b(base, rc.x, rc.y, p.k, p.n, p.ldb, vec_ok);
}

// Stores 8 fetched values into the [k][x] shared layout (x = m or n, 4 per vec4 entry).
fn store_a(t: u32, v: array<f32, 8>) {
    if (TRANS_A) {
        let kk = t / 16u; let x = (t % 16u) * 2u;
        As[kk * 32u + x] = vec4<f32>(v[0], v[1], v[2], v[3]);
        As[kk * 32u + x + 1u] = vec4<f32>(v[4], v[5], v[6], v[7]);
    } else {
        let x = t / 2u; let kk = (t % 2u) * 8u;
        for (var j = 0u; j < 8u; j++) {
            As[(kk + j) * 32u + x / 4u][x % 4u] = v[j];
        }
    }
}
fn store_b(t: u32, v: array<f32, 8>) {
    if (!TRANS_B) {
        let kk = t / 16u; let x = (t % 16u) * 2u;
        Bs[kk * 32u + x] = vec4<f32>(v[0], v[1], v[2], v[3]);
        Bs[kk * 32u + x + 1u] = vec4<f32>(v[4], v[5], v[6], v[7]);
    } else {
        let x = t / 2u; let kk = (t % 2u) * 8u;
        for (var j = 0u; j < 8u; j++) {
            Bs[(kk + j) * 32u + x / 4u][x % 4u] = v[j];
        }
    }
}

fn bias_at(n: u32) -> f32 {
    let i = p.off_bias + n;
    return half_at(bias[i >> 3u], i);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let bz = wg.z;
    let m0 = wg.y * BM;
    let n0 = wg.x * BN;
    let base_a = p.off_a + bz * p.stride_a;
    let base_b = p.off_b + bz * p.stride_b;
    let vec_ok = (p.flags & 4u) != 0u;
    let tx = t % 16u;
    let ty = t / 16u;

    var acc: array<vec4<f32>, 16>;
    for (var i = 0u; i < 16u; i++) { acc[i] = vec4<f32>(0.0); }

    var ra = fetch_a(t, m0, 0u, base_a, vec_ok);
    var rb = fetch_b(t, n0, 0u, base_b, vec_ok);
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        store_a(t, ra);
        store_b(t, rb);
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
            acc[0] += a0.x * b0; acc[1] += a0.x * b1;
            acc[2] += a0.y * b0; acc[3] += a0.y * b1;
            acc[4] += a0.z * b0; acc[5] += a0.z * b1;
            acc[6] += a0.w * b0; acc[7] += a0.w * b1;
            acc[8] += a1.x * b0; acc[9] += a1.x * b1;
            acc[10] += a1.y * b0; acc[11] += a1.y * b1;
            acc[12] += a1.z * b0; acc[13] += a1.z * b1;
            acc[14] += a1.w * b0; acc[15] += a1.w * b1;
        }
        workgroupBarrier();
    }

    // Epilogue: rows ty*4+i and 64+ty*4+i, columns tx*4.. and 64+tx*4..
    let has_bias = (p.flags & 1u) != 0u;
    let accumulate = (p.flags & 2u) != 0u;
    let base_c = p.off_c + bz * p.stride_c;
    for (var i = 0u; i < 8u; i++) {
        let m = m0 + (i / 4u) * 64u + ty * 4u + (i % 4u);
        if (m >= p.m) { continue; }
        for (var h = 0u; h < 2u; h++) {
            let nb = n0 + h * 64u + tx * 4u;
            var v = acc[i * 2u + h] * p.alpha;
            for (var j = 0u; j < 4u; j++) {
                if (has_bias && nb + j < p.n) { v[j] += bias_at(nb + j); }
            }
            let row = base_c + m * p.ldc;
            if (OUT_F32) {
                for (var j = 0u; j < 4u; j++) {
                    if (nb + j < p.n) {
                        var o = v[j];
                        if (accumulate) { o += bitcast<f32>(c[row + nb + j]); }
                        c[row + nb + j] = bitcast<u32>(o);
                    }
                }
            } else {
                // Whole pairs: row + nb is even, and a pair whose first element is in range
                // may write its second (a pad column when N is odd).
                for (var j = 0u; j < 4u; j += 2u) {
                    if (nb + j < p.n) {
                        let w = (row + nb + j) >> 1u;
                        var o = vec2<f32>(v[j], v[j + 1u]);
                        if (accumulate) { o += unpack2x16float(c[w]); }
                        c[w] = pack2x16float(o);
                    }
                }
            }
        }
    }
}
