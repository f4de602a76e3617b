//! Store keys. A raw client id (an API key, a user id) never reaches the store: it is
//! run through an HMAC-SHA-256 first, and only 16 bytes of that (hex) appear in keys.
//!
//! Every key of one (namespace, rule, client) carries the same hash tag `{...}`, so in a
//! cluster they live in one slot and one Lua script may touch all of them atomically.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// `c` for `/rate-limit/check` clients, `s` for `/v1/sync` keys: the two never share
/// counters (the filter's rule ids and the companion's rules file are separate spaces).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Namespace {
    Check,
    Sync,
}

#[derive(Clone)]
pub struct KeyMaker {
    prefix: String,
    mac: Hmac<Sha256>,
}

impl KeyMaker {
    pub fn new(prefix: &str, hmac_key: &[u8]) -> Self {
        KeyMaker {
            prefix: prefix.to_string(),
            // HMAC accepts keys of any length.
            mac: Hmac::<Sha256>::new_from_slice(hmac_key).expect("hmac takes any key length"),
        }
    }

    /// The hash tag of one (namespace, rule, client): `c.<rule>.<32 hex>`. Rule ids are
    /// `[A-Za-z0-9_.-]` (checked by the config parser and by the report's validation),
    /// so they cannot carry a brace; they are still hashed in, so a rule rename starts
    /// fresh.
    ///
    /// The MAC input is framed: a version and namespace byte, then each field preceded
    /// by its length (8 bytes, big-endian). Without lengths, ("a\0", "b") and
    /// ("a", "\0b") fed the same bytes and shared a counter; with them no two
    /// different (rule, client) pairs give the same input.
    pub fn tag(&self, ns: Namespace, rule: &str, client: &str) -> String {
        let mut m = self.mac.clone();
        m.update(&mac_input(ns, rule, client));
        let d = m.finalize().into_bytes();
        let ns = match ns {
            Namespace::Check => 'c',
            Namespace::Sync => 's',
        };
        // Keep rule ids readable in `redis-cli --bigkeys`, but only safe bytes.
        let rule: String = rule
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            .take(64)
            .collect();
        format!("{ns}.{rule}.{}", hex::encode(&d[..16]))
    }

    /// Sliding-window counter of one window: a hash `{i, c, p}`.
    pub fn sw_key(&self, tag: &str, window_secs: u64) -> String {
        format!("{}:{{{tag}}}:w{window_secs}", self.prefix)
    }

    /// GCRA timestamp of one limit. max and burst are in the key: a changed limit starts
    /// on a fresh bucket instead of reading a timestamp computed with another interval.
    pub fn tb_key(&self, tag: &str, window_secs: u64, max: u64, burst: u64) -> String {
        format!("{}:{{{tag}}}:t{window_secs}.{max}.{burst}", self.prefix)
    }

    /// Per-proxy demand and grants of one sync key and window (in-memory store; in Redis
    /// they live in the sliding-window hash itself, see `lua/sync.lua`).
    pub fn share_key(&self, tag: &str, window_secs: u64) -> String {
        format!("{}:{{{tag}}}:h{window_secs}", self.prefix)
    }
}

/// `2 <ns> len(rule) rule len(client) client`: the leading 2 is the key-derivation
/// version (1 was the unframed input), so keys made before the framing never meet these.
fn mac_input(ns: Namespace, rule: &str, client: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + 16 + rule.len() + client.len());
    v.push(2);
    v.push(match ns {
        Namespace::Check => b'c',
        Namespace::Sync => b's',
    });
    for field in [rule.as_bytes(), client.as_bytes()] {
        v.extend_from_slice(&(field.len() as u64).to_be_bytes());
        v.extend_from_slice(field);
    }
    v
}

/// Hash slots of a Redis Cluster: every key lives in one of them.
pub const SLOTS: u16 = 16384;

/// Redis Cluster slot of a key (CRC16/XMODEM of the hash tag, mod [`SLOTS`]).
pub fn slot(key: &str) -> u16 {
    let k = key.as_bytes();
    let tagged = match k.iter().position(|&b| b == b'{') {
        Some(open) => match k[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &k[open + 1..open + 1 + len],
            _ => k,
        },
        None => k,
    };
    crc16::State::<crc16::XMODEM>::calculate(tagged) % SLOTS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hide_the_client_and_share_a_slot() {
        let k = KeyMaker::new("ml", b"secret key 123456");
        let tag = k.tag(Namespace::Check, "api", "sk_live_very_secret");
        assert!(!tag.contains("sk_live"));
        assert_eq!(tag.len(), "c.api.".len() + 32);
        let a = k.sw_key(&tag, 1);
        let b = k.tb_key(&tag, 60, 10, 10);
        assert_eq!(slot(&a), slot(&b));
        assert_ne!(tag, k.tag(Namespace::Sync, "api", "sk_live_very_secret"));
        assert_ne!(
            tag,
            KeyMaker::new("ml", b"other").tag(Namespace::Check, "api", "sk_live_very_secret")
        );
        // The same inputs give the same tag (the counter is found again).
        assert_eq!(tag, k.tag(Namespace::Check, "api", "sk_live_very_secret"));
        // Known vectors from the Redis cluster spec.
        assert_eq!(slot("123456789"), 0x31C3);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(
            slot("foo{}{bar}"),
            crc16::State::<crc16::XMODEM>::calculate(b"foo{}{bar}") % SLOTS
        );
    }

    #[test]
    fn fields_are_framed_so_nul_bytes_cannot_merge_two_pairs() {
        let k = KeyMaker::new("ml", b"secret key 123456");
        // (rule, client) pairs whose plain concatenation with NUL separators (the input
        // before framing: ns, 0, rule, 0, client) is byte for byte the same, and whose
        // readable rule part in the tag is the same too ("a" once NUL is filtered out).
        let pairs = [("a\0", "b"), ("a", "\0b"), ("a\0\0", ""), ("a", "\0\0b")];
        let unframed = |rule: &str, client: &str| format!("c\0{rule}\0{client}").into_bytes();
        assert_eq!(
            unframed(pairs[0].0, pairs[0].1),
            unframed(pairs[1].0, pairs[1].1)
        );
        let tags: Vec<String> = pairs
            .iter()
            .map(|(r, c)| k.tag(Namespace::Check, r, c))
            .collect();
        for (i, a) in tags.iter().enumerate() {
            assert!(a.starts_with("c.a."), "{a}");
            for b in &tags[i + 1..] {
                assert_ne!(a, b, "two different (rule, client) pairs share a counter");
            }
        }
        // Framed inputs differ wherever the pairs differ.
        assert_ne!(
            mac_input(Namespace::Check, "a\0", "b"),
            mac_input(Namespace::Check, "a", "\0b")
        );
        assert_ne!(
            mac_input(Namespace::Check, "ab", ""),
            mac_input(Namespace::Sync, "ab", "")
        );
    }
}
