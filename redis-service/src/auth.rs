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

    /// `header` is the raw `Authorization` value.
    pub fn allows(&self, header: Option<&[u8]>) -> bool {
        let Some(expected) = &self.expected else {
            return true;
        };
        let Some(h) = header else { return false };
        let Some(token) = h
            .strip_prefix(b"Bearer ")
            .or_else(|| h.strip_prefix(b"bearer "))
        else {
            return false;
        };
        let got: [u8; 32] = Sha256::digest(token).into();
        got.ct_eq(expected).into()
    }
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
        assert!(!a.allows(None));
        assert!(Auth::new(None).allows(None));
    }
}
