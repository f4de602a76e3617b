//! A small, stable 64-bit hash. Client ids are hashed into fixed-size fingerprints in
//! every VM of every worker, and later in the companion; all of them must agree, so
//! the hash is deterministic (no per-process random seed) and defined here rather than
//! borrowed from a hasher whose output may change between crate versions.
//!
//! It is a multiply-rotate hash over 8-byte words with a murmur3 finaliser: fast on
//! wasm32 (64-bit multiplies are native in wasm), good avalanche, not cryptographic.

const K1: u64 = 0x9e37_79b9_7f4a_7c15;
const K2: u64 = 0xc2b2_ae3d_27d4_eb4f;

#[derive(Clone, Copy, Debug)]
pub struct Hasher64 {
    state: u64,
    len: u64,
}

impl Hasher64 {
    pub fn new(seed: u64) -> Self {
        Hasher64 {
            state: seed ^ K1,
            len: 0,
        }
    }

    #[inline]
    fn mix_word(&mut self, w: u64) {
        self.state = (self.state ^ w.wrapping_mul(K2))
            .rotate_left(31)
            .wrapping_mul(K1);
    }

    pub fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.mix_word(u64::from_le_bytes([
                c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
            ]));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            // The tail length goes into the top byte so "a" and "a\0" differ.
            self.mix_word(u64::from_le_bytes(buf) ^ ((rest.len() as u64) << 59));
        }
        self.len = self.len.wrapping_add(bytes.len() as u64);
        // A separator so that write("ab"), write("c") differs from write("a"), write("bc").
        self.mix_word(self.len);
    }

    pub fn write_u64(&mut self, v: u64) {
        self.mix_word(v);
        self.len = self.len.wrapping_add(8);
    }

    pub fn finish(&self) -> u64 {
        fmix64(self.state ^ self.len)
    }
}

/// Murmur3's 64-bit finaliser.
#[inline]
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// Hash of `bytes` under `seed`.
pub fn hash64(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = Hasher64::new(seed);
    h.write(bytes);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::test;

    const PINNED: [u64; 2] = [7_191_689_287_742_805_795, 12_009_571_085_162_228_443];

    #[test]
    fn stable_values() {
        // Pinned: a change here would silently reset every bucket after an upgrade
        // and make filter and companion disagree; change it only on purpose.
        // The filter (wasm) and the companion (native) must compute the same
        // fingerprints: these values are checked on both targets.
        assert_eq!(hash64(0, b"meshlimit"), PINNED[0]);
        assert_eq!(hash64(42, &[0xff; 21]), PINNED[1]);
        assert_ne!(hash64(0, b"a"), hash64(0, b"a\0"));
        assert_ne!(hash64(0, b"abc"), hash64(1, b"abc"));
        let mut h1 = Hasher64::new(7);
        h1.write(b"ab");
        h1.write(b"c");
        let mut h2 = Hasher64::new(7);
        h2.write(b"a");
        h2.write(b"bc");
        assert_ne!(h1.finish(), h2.finish());
    }

    #[test]
    fn spreads_sequential_ids() {
        // 100k sequential ids into 1024 buckets: no bucket far from the mean (≈98).
        let mut counts = vec![0u32; 1024];
        for i in 0..100_000u32 {
            let id = format!("client-{i}");
            counts[(hash64(1, id.as_bytes()) & 1023) as usize] += 1;
        }
        let max = *counts.iter().max().unwrap();
        let min = *counts.iter().min().unwrap();
        assert!(max < 150 && min > 55, "min {min} max {max}");
    }
}
