//! What the core needs from the proxy it runs in, as small traits.
//!
//! The core makes no host call itself: code that needs one takes an implementation of a
//! trait here. The filter implements each trait once, with proxy-wasm host calls
//! (`src/host.rs` of `meshlimit-filter`); the core's tests implement them in memory and
//! inject, on purpose, the failures and the concurrent writers a real proxy produces.

/// A compare-and-swap token: the version of a shared-data value when it was read.
pub type Cas = u32;

/// A key-value store shared by every worker of one proxy, with compare-and-swap: Envoy's
/// shared data (per `vm_id`, process-wide, no TTL, no listing of keys).
///
/// The semantics the core relies on, as measured in Envoy 1.40:
/// - a missing key reads as `(None, None)`; an existing one as its value and its token
///   (an empty value may read as `None` with a token);
/// - every write gives the key a new token;
/// - a write with a token succeeds only while the token is still the key's, else it is
///   refused with [`SharedDataError::CasMismatch`] and writes nothing;
/// - a write without a token (or to a missing key, token or not) always stores.
pub trait SharedData {
    /// The value of `key` and its CAS token.
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<Cas>), SharedDataError>;

    /// Stores `value` under `key` if `cas` is still its token (`None`: unconditionally).
    fn set(&self, key: &str, value: &[u8], cas: Option<Cas>) -> Result<(), SharedDataError>;
}

/// Why shared data refused a read or a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedDataError {
    /// Another writer stored the key after the token was read: read again and redo.
    CasMismatch,
    /// Any other failure the host reports.
    Other,
}

#[cfg(test)]
pub(crate) mod memory;
