//! The token-bucket table in Envoy shared data (layout, bound and eviction:
//! `meshlimit_core::slots`).
//!
//! Per request and matched rule: one `get_shared_data` of the client's set and, when
//! the request is admitted, one CAS `set_shared_data` of that set. A rejection writes
//! nothing (except once after the clock went backwards, see `gcra::check`). A CAS
//! mismatch (another worker wrote the set in between) re-reads and decides again.

use meshlimit_core::config::{Rule, MAX_LIMITS_PER_RULE};
use meshlimit_core::gcra::{self, Decision};
use meshlimit_core::slots::{self, Place, KEY_LEN, WRITE_MAX};
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

use crate::metrics::{self, Counter};

/// Past this many CAS mismatches in one request the filter stops trying and admits
/// (fail open): it only happens under extreme contention on one set.
const MAX_CAS_ATTEMPTS: usize = 64;

/// Creates every set key of a table of `sets` keys, empty, unless already done.
/// After this every bucket write is a CAS on an existing key, which is exact across
/// workers (creating a missing key is not: two inserts race and one is lost).
pub fn create_table(sets: u32) {
    let marker = slots::init_marker_key(sets);
    if let Ok((_, Some(_))) = hostcalls::get_shared_data(&marker) {
        return; // another VM of this Envoy already did it
    }
    let _ = hostcalls::set_shared_data(&marker, Some(b"1"), None);
    let mut key = [0u8; KEY_LEN];
    for set in 0..sets {
        let key = slots::set_key(set, &mut key);
        if let Ok((None, None)) = hostcalls::get_shared_data(key) {
            let _ = hostcalls::set_shared_data(key, Some(&[]), None);
        }
    }
}

/// Takes one token from every limit of `rule` for the client with `fingerprint`.
pub fn take(rule: &Rule, fingerprint: u64, sets: u32, now_ns: u64) -> Decision {
    let n = rule.limits.len().min(MAX_LIMITS_PER_RULE);
    let limits = &rule.limits[..n];
    let mut key_buf = [0u8; KEY_LEN];
    let key = slots::set_key(slots::set_of(fingerprint, sets), &mut key_buf);
    let mut out = [0u8; WRITE_MAX];

    for _ in 0..MAX_CAS_ATTEMPTS {
        let (value, cas) = match hostcalls::get_shared_data(key) {
            Ok((value, cas)) => (value.unwrap_or_default(), cas),
            Err(_) => break,
        };
        let mut tats = [0u64; MAX_LIMITS_PER_RULE];
        let state = &mut tats[..n];
        let place = slots::find(&value, fingerprint, state, now_ns);
        if !matches!(place, Place::Found { .. }) {
            state.fill(0);
        }
        let decision = gcra::check(limits, state, now_ns, 1);
        if !decision.changed {
            return decision;
        }
        let new_value = slots::write(&value, place, fingerprint, state, &mut out);
        match hostcalls::set_shared_data(key, Some(new_value), cas) {
            Ok(()) => {
                if let Place::Replace {
                    evicts_active: true,
                    ..
                } = place
                {
                    metrics::count(Counter::Evicted);
                }
                return decision;
            }
            Err(Status::CasMismatch) => continue,
            Err(_) => break,
        }
    }
    metrics::count(Counter::FailedOpen);
    Decision {
        allowed: true,
        tightest: 0,
        remaining: 0,
        reset_ns: 0,
        retry_after_ns: 0,
        changed: false,
    }
}
