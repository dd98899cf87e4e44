
// dropout_hash.wgsl — the LoRA input-dropout hash, appended by `Shader::source` to lora.wgsl
// (the dropout kernel) and lora_skinny.wgsl (the *_masked kernels, which regenerate the same
// masks), so both read one definition; mirrored on the CPU by kernels::lora::dropout_keep.

// A 32-bit integer hash (Wellons' lowbias32): a bijection with good avalanche.
fn mix32(x: u32) -> u32 {
    var h = x;
    h ^= h >> 16u;
    h *= 0x7feb352du;
    h ^= h >> 15u;
    h *= 0x846ca68bu;
    h ^= h >> 16u;
    return h;
}

// The key of one (step seed, layer) stream.
fn stream_key(seed_lo: u32, seed_hi: u32, salt: u32) -> u32 {
    return mix32(seed_lo ^ mix32(seed_hi ^ mix32(salt)));
}

// The random word of element i in a stream.
fn keep_hash(i: u32, key: u32) -> u32 {
    return mix32(mix32(i ^ key) + key);
}
