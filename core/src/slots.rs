//! The bucket table in Envoy shared data.
//!
//! Shared data has no TTL and no way to list keys, so the filter never creates a key per
//! client. Instead it keeps a fixed table of `slots` entries (a power of two, from
//! `max_clients`), keyed `rl:<8 hex digits>`. Every slot key is created once, empty, when
//! the table is set up; afterwards every write is a compare-and-swap on an existing key,
//! which is exact across workers (an insert is not: see the notes). The memory bound is
//! therefore by construction: `slots × (key + largest entry)`, whatever the number of
//! distinct clients.
//!
//! A (rule, client) pair hashes to a 64-bit fingerprint, which picks two candidate
//! slots (two-choice hashing). An entry is `fingerprint (8 bytes) ‖ tat (8 bytes) per
//! limit`. A request:
//! 1. reads its first slot; if the entry is its own, decides there (1 read, 1 CAS);
//! 2. otherwise reads the second slot; if that one is its own, decides there;
//! 3. otherwise it needs a home: an empty slot, or one whose entry is idle (all its
//!    buckets full again, so dropping it loses nothing), first slot preferred;
//! 4. if both hold active entries of other clients, the one closer to full is evicted.
//!    Only then does a limit lose state (that client restarts from a full bucket, i.e. up
//!    to `burst` extra admissions); it needs more than ~`slots` clients active at once.

/// Prefix of every slot key. Shared data is per `vm_id`, so this only needs to be
/// distinct from other keys of this plugin.
pub const KEY_PREFIX: &str = "rl:";
/// Length of a slot key: prefix + 8 hex digits.
pub const KEY_LEN: usize = KEY_PREFIX.len() + 8;
/// The key whose presence says the table of a given size has been created.
pub fn init_marker_key(slots: u32) -> String {
    format!("rl-init:{slots:08x}")
}

/// Writes the key of `slot` into `buf` without allocating.
pub fn slot_key(slot: u32, buf: &mut [u8; KEY_LEN]) -> &str {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf[..KEY_PREFIX.len()].copy_from_slice(KEY_PREFIX.as_bytes());
    for i in 0..8 {
        let nibble = (slot >> (28 - 4 * i)) & 0xf;
        buf[KEY_PREFIX.len() + i] = HEX[nibble as usize];
    }
    // Only ASCII was written.
    std::str::from_utf8(buf).unwrap_or(KEY_PREFIX)
}

/// The two candidate slots of a fingerprint (distinct when `slots > 1`).
pub fn candidates(fingerprint: u64, slots: u32) -> [u32; 2] {
    let mask = slots.wrapping_sub(1) as u64;
    let a = fingerprint & mask;
    let mut b = (fingerprint >> 32) & mask;
    if b == a {
        b = (a + 1) & mask;
    }
    [a as u32, b as u32]
}

/// What a slot currently holds, as seen by one (rule, client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Occupant {
    /// Never used, or holds something unreadable: free to take.
    Empty,
    /// This client's entry.
    Mine,
    /// Another client's entry whose buckets are all full again: free to take.
    IdleOther,
    /// Another client's entry still holding state. `slack_ns` is how long until its
    /// buckets are all full: the smaller, the less is lost by evicting it.
    ActiveOther { slack_ns: u64 },
}

/// Classifies a slot's value for `fingerprint`, and for `Mine` copies its timestamps
/// into `tats` (which has one element per limit of the rule).
pub fn read_entry(value: &[u8], fingerprint: u64, tats: &mut [u64], now: u64) -> Occupant {
    if value.len() < 16 || value.len() % 8 != 0 {
        return Occupant::Empty;
    }
    let fp = u64::from_le_bytes(value[..8].try_into().unwrap_or([0; 8]));
    let stored = value[8..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
    if fp == fingerprint && value.len() == 8 + 8 * tats.len() {
        for (t, v) in tats.iter_mut().zip(stored) {
            *t = v;
        }
        return Occupant::Mine;
    }
    let latest = stored.max().unwrap_or(0);
    if latest <= now {
        Occupant::IdleOther
    } else {
        Occupant::ActiveOther {
            slack_ns: latest - now,
        }
    }
}

/// Encodes an entry into `buf`; returns the bytes to store.
pub fn write_entry<'a>(fingerprint: u64, tats: &[u64], buf: &'a mut [u8; ENTRY_MAX]) -> &'a [u8] {
    buf[..8].copy_from_slice(&fingerprint.to_le_bytes());
    for (i, t) in tats.iter().enumerate() {
        buf[8 + 8 * i..16 + 8 * i].copy_from_slice(&t.to_le_bytes());
    }
    &buf[..8 + 8 * tats.len()]
}

/// Largest entry: fingerprint + one timestamp per limit.
pub const ENTRY_MAX: usize = 8 + 8 * crate::config::MAX_LIMITS_PER_RULE;

/// Where a request's entry lives or will live, given what its two candidate slots hold.
/// Returns the index (0 or 1) into the candidates, and whether the entry is new
/// (fresh buckets) there.
pub fn choose(first: Occupant, second: Occupant) -> (usize, bool) {
    use Occupant::*;
    match (first, second) {
        (Mine, _) => (0, false),
        (_, Mine) => (1, false),
        (Empty | IdleOther, _) => (0, true),
        (_, Empty | IdleOther) => (1, true),
        (ActiveOther { slack_ns: a }, ActiveOther { slack_ns: b }) => {
            (if b < a { 1 } else { 0 }, true)
        }
    }
}

/// True when the first slot alone settles the question (no second read needed).
pub fn first_suffices(first: Occupant) -> bool {
    first == Occupant::Mine
}

#[cfg(test)]
mod tests;
