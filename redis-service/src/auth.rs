//! Bearer token check. The comparison runs in constant time over the whole token, and
//! the lengths are hidden too by comparing SHA-256 digests (equal length always), so
//! the timing of a refusal tells nothing about how much of a guess was right.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Clone)]
pub struct Auth {
    /// Digest of the expected token; `None` only with `--insecure-no-auth`.
    expected: Option<[u8; 32]>,
}

impl Auth {
    pub fn new(token: Option<&str>) -> Self {
        Auth {
            expected: token.map(|t| Sha256::digest(t.as_bytes()).into()),
        }
    }

    /// `header` is the raw `Authorization` value: `<scheme> <token>`, the scheme
    /// `Bearer` in any case (auth schemes are case-insensitive, RFC 9110 §11.1). The
    /// token itself is compared byte for byte.
    pub fn allows(&self, header: Option<&[u8]>) -> bool {
        let Some(expected) = &self.expected else {
            return true;
        };
        let Some(h) = header else { return false };
        let Some(token) = bearer_token(h) else {
            return false;
        };
        let got: [u8; 32] = Sha256::digest(token).into();
        got.ct_eq(expected).into()
    }
}

/// The token of `Bearer <token>`: the scheme matched case-insensitively, then one or
/// more spaces (`credentials = auth-scheme 1*SP token68`, RFC 9110 §11.4). Tokens are
/// trimmed when loaded, so none starts with a space.
fn bearer_token(h: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer";
    if h.len() <= SCHEME.len()
        || !h[..SCHEME.len()].eq_ignore_ascii_case(SCHEME)
        || h[SCHEME.len()] != b' '
    {
        return None;
    }
    let rest = &h[SCHEME.len()..];
    let start = rest.iter().position(|&b| b != b' ')?;
    Some(&rest[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_only_exact() {
        let a = Auth::new(Some("s3cret"));
        assert!(a.allows(Some(b"Bearer s3cret")));
        assert!(!a.allows(Some(b"Bearer s3cre")));
        assert!(!a.allows(Some(b"Bearer s3cret ")));
        assert!(!a.allows(Some(b"Basic s3cret")));
        assert!(!a.allows(Some(b"Bearers3cret")));
        assert!(!a.allows(Some(b"Bearer\ts3cret")));
        assert!(!a.allows(Some(b"s3cret")));
        assert!(!a.allows(Some(b"")));
        assert!(!a.allows(None));
        assert!(Auth::new(None).allows(None));
    }

    #[test]
    fn scheme_is_case_insensitive_token_is_not() {
        let a = Auth::new(Some("s3cret"));
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            assert!(
                a.allows(Some(format!("{scheme} s3cret").as_bytes())),
                "{scheme}"
            );
        }
        assert!(!a.allows(Some(b"Bearer S3CRET")));
        assert!(!a.allows(Some(b"BEARER S3cret")));
        assert!(a.allows(Some(b"Bearer   s3cret")), "1*SP");
        assert!(!a.allows(Some(b"Bearer ")));
    }
}
