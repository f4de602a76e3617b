//! The bucket table in shared data: its layout, its bound, and the compare-and-swap loop
//! every request's token take goes through.
//!
//! Shared data has no TTL and no way to list keys, so the filter never creates a key per
//! client. It keeps a fixed table of `sets` keys (`rl:<8 hex digits>`, a power of two
//! derived from `max_clients`), each holding up to [`WAYS`] bucket entries: a
//! set-associative cache. Every key is created once, empty, when the table is set up
//! ([`create`]); afterwards every write is a compare-and-swap on an existing key, which
//! is exact across workers (an insert is not: two inserts race and one is lost).
//!
//! **Memory bound**, by construction: at most `sets` keys, each value at most
//! `WAYS × ENTRY_MAX` bytes, whatever the number of distinct clients.
//!
//! A (rule, client) hashes to a 64-bit fingerprint that picks one set. An entry is
//! `limits count (1 byte) ‖ fingerprint (8) ‖ tat per limit (8 each)`; a **global**
//! rule's entry (its count byte has [`GLOBAL`] set) carries after its `tat`s the key's
//! share state ([`crate::global`]'s trailer, `4·k + 16` bytes) and the index of its rule
//! (2 bytes), so that its share can be released when the entry is evicted. A request
//! reads its set (one get), finds its entry or makes room for a fresh one, and writes
//! the set back (one CAS) when its state changed ([`take`], [`take_global`]); a CAS that
//! another worker's write beat reads and decides again ([`update`]). Room is found in
//! this order:
//! 1. a free way (the set holds fewer than `WAYS` entries);
//! 2. an idle entry (all its buckets are full again: dropping it loses nothing), one
//!    holding no grant and no unreported count before one that does;
//! 3. the active entry closest to full is evicted: that client restarts from a full
//!    bucket (at most `burst` extra admissions). With `sets = max_clients / 2` the
//!    expected load is 2 entries per 8-way set at `max_clients` active clients, and a
//!    set overflows with probability P(Poisson(2) > 8) ≈ 2.4·10⁻⁴.
//!
//! Dropping a global entry that still holds a valid grant is reported to the caller
//! ([`Evicted::grant_of`]): the proxy tells the companion, which gives the share back
//! to the other proxies at once instead of at the end of the lease.

use crate::config::{Limit, MAX_LIMITS_PER_RULE};
use crate::gcra::{self, Decision};
use crate::global::{trailer_len, KeyState};
use crate::host::{SharedData, SharedDataError};

/// Entries per set.
pub const WAYS: usize = 8;
/// Set in an entry's count byte: the entry is a global rule's (trailer and rule index
/// follow the timestamps).
pub const GLOBAL: u8 = 0x80;
/// Bytes after a global entry's timestamps: the share trailer and the rule index.
pub const fn global_extra(limits: usize) -> usize {
    trailer_len(limits) + 2
}
/// Bytes of an entry with `limits` limits.
pub const fn entry_len(limits: usize, global: bool) -> usize {
    9 + 8 * limits + if global { global_extra(limits) } else { 0 }
}
/// Largest entry: a global one with every limit.
pub const ENTRY_MAX: usize = entry_len(MAX_LIMITS_PER_RULE, true);
/// Largest set value.
pub const SET_MAX: usize = WAYS * ENTRY_MAX;
/// Buffer size for [`write`]: a set plus one entry (a corrupted tail is replaced by an
/// entry, so one more than `WAYS` can exist until the next write).
pub const WRITE_MAX: usize = SET_MAX + ENTRY_MAX;

/// Prefix of every set key. Shared data is per `vm_id`, so this only needs to be
/// distinct from other keys of this plugin.
pub const KEY_PREFIX: &str = "rl:";
/// Length of a set key: prefix + 8 hex digits.
pub const KEY_LEN: usize = KEY_PREFIX.len() + 8;

/// Number of sets for a `max_clients` setting: two expected entries per set.
pub fn sets_for(max_clients: u64) -> u32 {
    (max_clients / 2).next_power_of_two().max(8) as u32
}

/// The key whose presence says the table of a given size has been created.
pub fn init_marker_key(sets: u32) -> String {
    format!("rl-init:{sets:08x}")
}

/// Writes the key of `set` into `buf` without allocating.
pub fn set_key(set: u32, buf: &mut [u8; KEY_LEN]) -> &str {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf[..KEY_PREFIX.len()].copy_from_slice(KEY_PREFIX.as_bytes());
    for i in 0..8 {
        let nibble = (set >> (28 - 4 * i)) & 0xf;
        buf[KEY_PREFIX.len() + i] = HEX[nibble as usize];
    }
    // Only ASCII was written.
    std::str::from_utf8(buf).unwrap_or(KEY_PREFIX)
}

/// The set of a fingerprint. Uses the high bits: the low bits already went into the
/// fingerprint comparison's entropy, and `sets` is a power of two.
pub fn set_of(fingerprint: u64, sets: u32) -> u32 {
    ((fingerprint >> 32) as u32) & sets.wrapping_sub(1)
}

/// Where a client's entry is, or goes, in its set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Its entry is at this byte offset (and its timestamps were copied out).
    Found { offset: usize },
    /// A fresh entry, appended to the set.
    Append,
    /// A fresh entry replacing the entry at `offset` (`len` bytes). `evicted` says what
    /// was lost with it.
    Replace {
        offset: usize,
        len: usize,
        evicted: Evicted,
    },
}

/// What a replaced entry still held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Evicted {
    /// Some bucket was not full again (the set was full of active clients).
    pub active: bool,
    /// A global entry with a grant still valid: (its rule's index, its fingerprint).
    pub grant_of: Option<(u16, u64)>,
}

/// One entry of a set value, as parsed.
struct Entry {
    offset: usize,
    len: usize,
    fingerprint: u64,
    limits: usize,
    global: bool,
}

/// Iterates the entries of a set value; stops at the first malformed one.
fn entries(value: &[u8]) -> impl Iterator<Item = Entry> + '_ {
    let mut offset = 0;
    std::iter::from_fn(move || {
        let head = *value.get(offset)?;
        let global = head & GLOBAL != 0;
        let n = (head & !GLOBAL) as usize;
        if n == 0 || n > MAX_LIMITS_PER_RULE {
            return None;
        }
        let len = entry_len(n, global);
        if offset + len > value.len() {
            return None;
        }
        let fingerprint = read_u64(value, offset + 1);
        let e = Entry {
            offset,
            len,
            fingerprint,
            limits: n,
            global,
        };
        offset += len;
        Some(e)
    })
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Latest timestamp of an entry: the instant it becomes idle.
fn latest_tat(value: &[u8], e: &Entry) -> u64 {
    (0..e.limits)
        .map(|i| read_u64(value, e.offset + 9 + 8 * i))
        .max()
        .unwrap_or(0)
}

/// The share state of a global entry (`None` for a local one or a corrupt trailer).
fn global_state(value: &[u8], e: &Entry) -> Option<KeyState> {
    if !e.global {
        return None;
    }
    let at = e.offset + 9 + 8 * e.limits;
    KeyState::decode(&value[at..at + trailer_len(e.limits)], e.limits)
}

/// The rule index a global entry was written for.
fn global_rule(value: &[u8], e: &Entry) -> u16 {
    let at = e.offset + e.len - 2;
    u16::from_le_bytes([value[at], value[at + 1]])
}

/// Finds the local entry of `fingerprint` (with `tats.len()` limits) in a set value,
/// copying its timestamps into `tats`; or decides where a fresh entry goes.
pub fn find(value: &[u8], fingerprint: u64, tats: &mut [u64], now: u64) -> Place {
    locate(value, fingerprint, tats, false, now).0
}

/// Like [`find`] for a global entry, which also hands back its share state (`None`:
/// a fresh entry, or a trailer that does not decode, which is replaced like a fresh
/// one).
pub fn find_global(
    value: &[u8],
    fingerprint: u64,
    tats: &mut [u64],
    now: u64,
) -> (Place, Option<KeyState>) {
    locate(value, fingerprint, tats, true, now)
}

fn locate(
    value: &[u8],
    fingerprint: u64,
    tats: &mut [u64],
    global: bool,
    now: u64,
) -> (Place, Option<KeyState>) {
    let mut count = 0;
    let mut end = 0;
    // Best victim so far: (is active, holds a grant or counts, slack until idle,
    // offset, len, what it holds).
    let mut victim: Option<(bool, bool, u64, usize, usize, Evicted)> = None;
    for e in entries(value) {
        count += 1;
        end = e.offset + e.len;
        let state = global_state(value, &e);
        if e.fingerprint == fingerprint && e.limits == tats.len() && e.global == global {
            for (i, t) in tats.iter_mut().enumerate() {
                *t = read_u64(value, e.offset + 9 + 8 * i);
            }
            if !global || state.is_some() {
                return (Place::Found { offset: e.offset }, state);
            }
            // A corrupt trailer: this client's entry is rewritten fresh, in place.
            let evicted = Evicted::default();
            let place = Place::Replace {
                offset: e.offset,
                len: e.len,
                evicted,
            };
            return (place, None);
        }
        let latest = latest_tat(value, &e);
        let active = latest > now;
        let granted = state.is_some_and(|s| s.expiry_ns > now);
        let holds = granted || state.is_some_and(|s| s.admitted > 0);
        let evicted = Evicted {
            active,
            grant_of: granted.then(|| (global_rule(value, &e), e.fingerprint)),
        };
        let candidate = (
            active,
            holds,
            latest.saturating_sub(now),
            e.offset,
            e.len,
            evicted,
        );
        if victim.is_none_or(|v| (candidate.0, candidate.1, candidate.2) < (v.0, v.1, v.2)) {
            victim = Some(candidate);
        }
    }
    if end < value.len() {
        // Trailing bytes that do not parse: the set is rewritten from its good prefix.
        let place = Place::Replace {
            offset: end,
            len: value.len() - end,
            evicted: Evicted::default(),
        };
        return (place, None);
    }
    let place = match victim {
        Some((active, holds, _, offset, len, evicted)) if count >= WAYS || !(active || holds) => {
            Place::Replace {
                offset,
                len,
                evicted,
            }
        }
        _ => Place::Append,
    };
    (place, None)
}

/// The set's new value with this client's local entry written at `place`.
pub fn write<'a>(
    value: &[u8],
    place: Place,
    fingerprint: u64,
    tats: &[u64],
    out: &'a mut [u8; WRITE_MAX],
) -> &'a [u8] {
    let mut entry = [0u8; ENTRY_MAX];
    let len = encode_entry(&mut entry, fingerprint, tats, None);
    splice(value, place, &entry[..len], out)
}

/// The set's new value with this client's global entry (share state `state`, written
/// for rule `rule`) at `place`.
pub fn write_global<'a>(
    value: &[u8],
    place: Place,
    fingerprint: u64,
    tats: &[u64],
    state: &KeyState,
    rule: u16,
    out: &'a mut [u8; WRITE_MAX],
) -> &'a [u8] {
    let mut entry = [0u8; ENTRY_MAX];
    let len = encode_entry(&mut entry, fingerprint, tats, Some((state, rule)));
    splice(value, place, &entry[..len], out)
}

fn encode_entry(
    entry: &mut [u8; ENTRY_MAX],
    fingerprint: u64,
    tats: &[u64],
    global: Option<(&KeyState, u16)>,
) -> usize {
    let k = tats.len();
    entry[0] = k as u8 | if global.is_some() { GLOBAL } else { 0 };
    entry[1..9].copy_from_slice(&fingerprint.to_le_bytes());
    for (i, t) in tats.iter().enumerate() {
        entry[9 + 8 * i..17 + 8 * i].copy_from_slice(&t.to_le_bytes());
    }
    let mut len = 9 + 8 * k;
    if let Some((state, rule)) = global {
        state.encode(k, &mut entry[len..]);
        len += trailer_len(k);
        entry[len..len + 2].copy_from_slice(&rule.to_le_bytes());
        len += 2;
    }
    len
}

/// `value` with `entry` written at `place`, into `out`.
fn splice<'a>(value: &[u8], place: Place, entry: &[u8], out: &'a mut [u8; WRITE_MAX]) -> &'a [u8] {
    // Values come from this module and are at most SET_MAX bytes; anything longer is
    // cut so that a corrupted value cannot overflow the buffer.
    let value = &value[..value.len().min(WRITE_MAX - ENTRY_MAX)];
    let (offset, old_len) = match place {
        Place::Found { offset } => (offset, entry.len()),
        Place::Append => (value.len(), 0),
        Place::Replace { offset, len, .. } => (offset, len),
    };
    let offset = offset.min(value.len());
    let old_len = old_len.min(value.len() - offset);
    let tail = &value[offset + old_len..];
    out[..offset].copy_from_slice(&value[..offset]);
    out[offset..offset + entry.len()].copy_from_slice(entry);
    let mut len = offset + entry.len();
    out[len..len + tail.len()].copy_from_slice(tail);
    len += tail.len();
    &out[..len]
}

/// Past this many CAS mismatches in one update the caller stops trying: it only happens
/// under extreme contention on one set.
pub const MAX_CAS_ATTEMPTS: usize = 64;

/// Creates every set key of a table of `sets` keys, empty, unless already done (by
/// another VM of this proxy: the marker key says so). After this every bucket write is a
/// CAS on an existing key.
pub fn create<S: SharedData + ?Sized>(shared: &S, sets: u32) {
    let marker = init_marker_key(sets);
    if let Ok((_, Some(_))) = shared.get(&marker) {
        return;
    }
    let _ = shared.set(&marker, b"1", None);
    let mut key = [0u8; KEY_LEN];
    for set in 0..sets {
        let key = set_key(set, &mut key);
        if let Ok((None, None)) = shared.get(key) {
            let _ = shared.set(key, &[], None);
        }
    }
}

/// What one attempt of an [`update`] decided, from the set value it was shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt<R> {
    /// Nothing to write: `R` stands as it is.
    Keep(R),
    /// Store the first `len` bytes of the output buffer; `R` stands once that CAS holds.
    Store { len: usize, outcome: R },
}

/// Why an [`update`] decided nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateError {
    /// Every one of [`MAX_CAS_ATTEMPTS`] attempts lost its CAS to another writer.
    Contended,
    /// Shared data failed a read or a write (other than a CAS mismatch).
    SharedData,
}

/// Read-decide-write of one set key, exact across workers: reads the value and its CAS
/// token (one get), lets `attempt` decide from the value (writing a new one into the
/// buffer it is given), and stores it with that token (one CAS). When another writer
/// stored the key in between, the CAS is refused and the whole attempt runs again on
/// the fresh value, so a decision never rests on state someone else already changed.
pub fn update<S, R>(
    shared: &S,
    key: &str,
    mut attempt: impl FnMut(&[u8], &mut [u8; WRITE_MAX]) -> Attempt<R>,
) -> Result<R, UpdateError>
where
    S: SharedData + ?Sized,
{
    let mut out = [0u8; WRITE_MAX];
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (value, cas) = shared.get(key).map_err(|_| UpdateError::SharedData)?;
        let value = value.unwrap_or_default();
        let (len, outcome) = match attempt(&value, &mut out) {
            Attempt::Keep(outcome) => return Ok(outcome),
            Attempt::Store { len, outcome } => (len, outcome),
        };
        // An attempt cannot hand back more than the buffer holds.
        match shared.set(key, &out[..len.min(WRITE_MAX)], cas) {
            Ok(()) => return Ok(outcome),
            Err(SharedDataError::CasMismatch) => continue,
            Err(SharedDataError::Other) => return Err(UpdateError::SharedData),
        }
    }
    Err(UpdateError::Contended)
}

/// A token taken (or refused) by [`take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub decision: Decision,
    /// Storing this client's entry evicted another client's active entry (the table is
    /// too small for the clients it sees).
    pub evicted_active: bool,
}

/// Takes one token from every limit (the first [`MAX_LIMITS_PER_RULE`]) of the client
/// with `fingerprint`, in a table of `sets` sets: one get and, when the request is
/// admitted, one CAS per attempt. A refusal writes nothing (except once after the clock
/// went backwards, see [`gcra::check`]).
pub fn take<S: SharedData + ?Sized>(
    shared: &S,
    limits: &[Limit],
    fingerprint: u64,
    sets: u32,
    now: u64,
) -> Result<Taken, UpdateError> {
    let limits = &limits[..limits.len().min(MAX_LIMITS_PER_RULE)];
    let mut key = [0u8; KEY_LEN];
    let key = set_key(set_of(fingerprint, sets), &mut key);
    update(shared, key, |value, out| {
        let mut tats = [0u64; MAX_LIMITS_PER_RULE];
        let tats = &mut tats[..limits.len()];
        let place = find(value, fingerprint, tats, now);
        if !matches!(place, Place::Found { .. }) {
            tats.fill(0);
        }
        let decision = gcra::check(limits, tats, now, 1);
        if !decision.changed {
            return Attempt::Keep(Taken {
                decision,
                evicted_active: false,
            });
        }
        let len = write(value, place, fingerprint, tats, out).len();
        let evicted_active = evicted_by(place).active;
        Attempt::Store {
            len,
            outcome: Taken {
                decision,
                evicted_active,
            },
        }
    })
}

/// What writing at `place` drops.
pub fn evicted_by(place: Place) -> Evicted {
    match place {
        Place::Replace { evicted, .. } => evicted,
        _ => Evicted::default(),
    }
}

/// What [`take_global`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TakenGlobal<R> {
    /// What the decision returned.
    pub outcome: R,
    /// Storing this client's entry evicted another one: what it held.
    pub evicted: Evicted,
}

/// One request's read-decide-write of a global key's entry: one get and, when `decide`
/// changed the entry, one CAS per attempt, exactly like [`take`]. `decide` gets the
/// `tat`s and share state (a fresh entry's are zeros, full buckets, and `fresh()`), and
/// returns whether to store them and its outcome. The entry is written for rule index
/// `rule` (kept for the release of its grant on eviction).
#[allow(
    clippy::too_many_arguments,
    reason = "the request path's inputs as it has them, like take's; a struct would be built per request"
)]
pub fn take_global<S, R>(
    shared: &S,
    limits: &[Limit],
    rule: u16,
    fingerprint: u64,
    sets: u32,
    now: u64,
    fresh: impl Fn() -> KeyState,
    mut decide: impl FnMut(&mut [u64], &mut KeyState) -> (bool, R),
) -> Result<TakenGlobal<R>, UpdateError>
where
    S: SharedData + ?Sized,
{
    let limits = &limits[..limits.len().min(MAX_LIMITS_PER_RULE)];
    let mut key = [0u8; KEY_LEN];
    let key = set_key(set_of(fingerprint, sets), &mut key);
    update(shared, key, |value, out| {
        let mut tats = [0u64; MAX_LIMITS_PER_RULE];
        let tats = &mut tats[..limits.len()];
        let (place, found) = find_global(value, fingerprint, tats, now);
        let mut state = match (place, found) {
            (Place::Found { .. }, Some(s)) => s,
            _ => {
                tats.fill(0);
                fresh()
            }
        };
        let (store, outcome) = decide(tats, &mut state);
        if !store {
            return Attempt::Keep(TakenGlobal {
                outcome,
                evicted: Evicted::default(),
            });
        }
        let len = write_global(value, place, fingerprint, tats, &state, rule, out).len();
        Attempt::Store {
            len,
            outcome: TakenGlobal {
                outcome,
                evicted: evicted_by(place),
            },
        }
    })
}

/// A global key's entry as stored (one get), or `None` when it is not in the table.
pub fn read_global<S: SharedData + ?Sized>(
    shared: &S,
    limits: usize,
    fingerprint: u64,
    sets: u32,
) -> Option<([u64; MAX_LIMITS_PER_RULE], KeyState)> {
    let limits = limits.min(MAX_LIMITS_PER_RULE);
    let mut key = [0u8; KEY_LEN];
    let key = set_key(set_of(fingerprint, sets), &mut key);
    let (value, _) = shared.get(key).ok()?;
    let value = value?;
    let mut tats = [0u64; MAX_LIMITS_PER_RULE];
    match find_global(&value, fingerprint, &mut tats[..limits], 0) {
        (Place::Found { .. }, Some(state)) => Some((tats, state)),
        _ => None,
    }
}

/// Changes a global key's entry where it is (off the request path: the leader applying
/// a grant): one get and one CAS per attempt. `change` gets its `tat`s and share state;
/// nothing is written when the entry is not in the table (it was evicted meanwhile).
/// Returns whether the entry was found.
pub fn update_global<S: SharedData + ?Sized>(
    shared: &S,
    limits: usize,
    fingerprint: u64,
    sets: u32,
    mut change: impl FnMut(&mut [u64], &mut KeyState),
) -> Result<bool, UpdateError> {
    let limits = limits.min(MAX_LIMITS_PER_RULE);
    let mut key = [0u8; KEY_LEN];
    let key = set_key(set_of(fingerprint, sets), &mut key);
    update(shared, key, |value, out| {
        let mut tats = [0u64; MAX_LIMITS_PER_RULE];
        let tats = &mut tats[..limits];
        let (place, found) = find_global(value, fingerprint, tats, 0);
        let (Place::Found { offset }, Some(mut state)) = (place, found) else {
            return Attempt::Keep(false);
        };
        change(tats, &mut state);
        let rule = {
            let len = entry_len(limits, true);
            u16::from_le_bytes([value[offset + len - 2], value[offset + len - 1]])
        };
        let len = write_global(value, place, fingerprint, tats, &state, rule, out).len();
        Attempt::Store { len, outcome: true }
    })
}

#[cfg(test)]
mod tests;
