//! Request paths in normal form, so that a rule on `/api/auth/*` counts every spelling
//! an upstream routes to the same handler: `/%61pi/auth/login`, `/./api/auth/login`,
//! `/api/x/../auth/login`, `//api/auth/login`, `/api%2Fauth/login`, `/api\auth\login`,
//! `/api;v=1/auth/login`, and any mix of them.
//!
//! The normal form follows RFC 3986 §6.2.2 (percent-encoding and dot-segment
//! normalization) and then reads the path the way the most permissive common upstream
//! routes it, because counting a request against a rule it might not belong to is the
//! safe direction for a rate limiter, and missing one is a way around the limit:
//!
//! - the query and fragment are cut off (`?`, `#`);
//! - every percent-encoded byte is decoded; bytes a path may hold literally (RFC 3986
//!   `unreserved`, `sub-delims`, `:` and `@`) are then written literally, every other
//!   byte as `%XX` with upper-case hex digits, so `%7e`, `%7E` and `~` are one spelling
//!   and so are `é` and `%C3%A9`;
//! - `/`, `\`, `%2F` and `%5C` all separate segments (servers on Windows and several
//!   frameworks treat `\` and a decoded `%2F` as `/`);
//! - `;` (or `%3B`) starts path parameters, which are dropped up to the next separator
//!   (`/a;jsessionid=1/b` is `/a/b`, as servlet containers and Spring route it), before
//!   dot segments are looked at, so `..;x` is `..`;
//! - empty segments are merged (`//a///b` is `/a/b`) and dot segments are removed,
//!   encoded ones too (`%2e%2E` is `..`); `..` never climbs above the root;
//! - a path that does not start with `/` is read as if it did.
//!
//! What it costs: a rule on `/a/b` also counts `/a%2Fb`, `/a\b` and `/a;x/b`, which
//! some upstreams would serve from another handler (over-counting, never under-counting),
//! and a rule cannot name a path holding a literal `;`, `\` or an encoded `/`.
//!
//! A path with an invalid percent-encoding (`%`, `%4`, `%zz`, IIS's `%u0061`) or a NUL or
//! other control byte (raw, or encoded as `%00`–`%1F`, `%7F`) has no normal form: upstreams
//! disagree on what it names (some decode `%u`, some cut at NUL), so no rule can be said
//! not to apply. The filter answers such requests `400` itself (README, "Security").
//!
//! Paths already in normal form (nearly all of them) are used as they are, without a
//! copy. Others are rewritten into a stack buffer; a path too long for it goes to a heap
//! buffer rather than being skipped, so length is never a way around a rule.

/// Why a path has no normal form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// A `%` not followed by two hex digits.
    BadPercentEncoding,
    /// A NUL or other control byte, raw or percent-encoded.
    ControlByte,
}

/// Paths whose normal form can need up to this many bytes are rewritten on the stack.
/// The normal form of `n` input bytes takes at most `3n + 1` bytes (a byte written as
/// `%XX`, plus the leading `/`), so paths up to 341 bytes never allocate.
pub const STACK_BUF: usize = 1024;

/// The request path without query string or fragment.
pub fn path_only(path: &[u8]) -> &[u8] {
    let end = path
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(path.len());
    &path[..end]
}

/// Calls `f` with the normal form of `raw` (a `:path` as received, query included).
pub fn with_normal<R>(raw: &[u8], f: impl FnOnce(&[u8]) -> R) -> Result<R, PathError> {
    let path = path_only(raw);
    if is_normal(path) {
        return Ok(f(path));
    }
    let need = 3 * path.len() + 1;
    if need <= STACK_BUF {
        let mut buf = [0u8; STACK_BUF];
        let n = normalize_into(path, &mut buf)?;
        Ok(f(&buf[..n]))
    } else {
        let mut buf = vec![0u8; need];
        let n = normalize_into(path, &mut buf)?;
        Ok(f(&buf[..n]))
    }
}

/// The normal form of `raw` as a new vector (configuration and tests; the request path
/// uses [`with_normal`]).
pub fn normalize(raw: &[u8]) -> Result<Vec<u8>, PathError> {
    with_normal(raw, <[u8]>::to_vec)
}

/// A byte the normal form writes literally: RFC 3986 `pchar` without `%` and `;`.
fn is_literal(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@".contains(&b)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// True when `path` (no query) is its own normal form: it starts with `/`, holds only
/// literal bytes, `/` and `%XX` (upper-case, for bytes not written literally), no empty
/// segment except a final one, and no `.` or `..` segment. Exactly the outputs of [`normalize_into`] pass (unit-tested).
pub fn is_normal(path: &[u8]) -> bool {
    if path.first() != Some(&b'/') {
        return false;
    }
    let mut seg_start = 1;
    let mut i = 1;
    loop {
        let end = i == path.len();
        if !end && path[i] != b'/' {
            if path[i] == b'%' {
                // Only the spelling the normal form writes: upper-case hex of a byte
                // that is not written literally and means nothing special.
                let encoded = match (path.get(i + 1), path.get(i + 2)) {
                    (Some(&hi), Some(&lo)) if is_upper_hex(hi) && is_upper_hex(lo) => {
                        hex_value(hi).unwrap_or(0) << 4 | hex_value(lo).unwrap_or(0)
                    }
                    _ => return false,
                };
                if is_literal(encoded)
                    || matches!(encoded, b'/' | b'\\' | b';')
                    || encoded < 0x20
                    || encoded == 0x7f
                {
                    return false;
                }
                i += 3;
                continue;
            }
            if !is_literal(path[i]) {
                return false;
            }
            i += 1;
            continue;
        }
        let seg = &path[seg_start..i];
        let last_empty = end && seg.is_empty();
        if (seg.is_empty() && !last_empty) || seg == b"." || seg == b".." {
            return false;
        }
        if end {
            return true;
        }
        i += 1;
        seg_start = i;
    }
}

fn is_upper_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'A'..=b'F').contains(&b)
}

/// Writes the normal form of `path` (no query) into `out`, which must hold at least
/// `3 * path.len() + 1` bytes, and returns its length.
fn normalize_into(path: &[u8], out: &mut [u8]) -> Result<usize, PathError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out[0] = b'/';
    let mut len = 1;
    let mut seg_start = 1;
    let mut in_params = false;
    let mut i = 0;
    while i < path.len() {
        let raw = path[i];
        let byte = if raw == b'%' {
            let hi = path.get(i + 1).copied().and_then(hex_value);
            let lo = path.get(i + 2).copied().and_then(hex_value);
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(PathError::BadPercentEncoding);
            };
            i += 3;
            hi << 4 | lo
        } else {
            i += 1;
            raw
        };
        if byte == b'/' || byte == b'\\' {
            len = end_segment(out, len, seg_start, false);
            seg_start = len;
            in_params = false;
            continue;
        }
        if byte < 0x20 || byte == 0x7f {
            return Err(PathError::ControlByte);
        }
        if in_params {
            continue;
        }
        if byte == b';' {
            in_params = true;
        } else if is_literal(byte) {
            out[len] = byte;
            len += 1;
        } else {
            out[len] = b'%';
            out[len + 1] = HEX[(byte >> 4) as usize];
            out[len + 2] = HEX[(byte & 0xf) as usize];
            len += 3;
        }
    }
    Ok(end_segment(out, len, seg_start, true))
}

/// Closes the segment `out[seg_start..len]`: drops it if empty or `.`, drops it and
/// its parent if `..`, else keeps it (followed by `/` unless it is the last one).
/// Returns the new length.
fn end_segment(out: &mut [u8], len: usize, seg_start: usize, last: bool) -> usize {
    let seg = &out[seg_start..len];
    if seg == b"." {
        seg_start
    } else if seg == b".." {
        // out[..seg_start] ends with '/'; climb to the '/' before the parent segment.
        match out[..seg_start - 1].iter().rposition(|&b| b == b'/') {
            Some(slash) => slash + 1,
            None => 1,
        }
    } else if seg.is_empty() || last {
        len
    } else {
        out[len] = b'/';
        len + 1
    }
}

/// ASCII case-insensitive `starts_with`.
pub fn starts_with_ignore_case(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

#[cfg(test)]
pub(crate) mod tests;
