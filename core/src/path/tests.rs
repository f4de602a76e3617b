use super::*;
use crate::testing::test;

fn n(p: &str) -> String {
    String::from_utf8(normalize(p.as_bytes()).unwrap_or_else(|e| panic!("{p:?}: {e:?}"))).unwrap()
}

/// Every spelling of `/api/auth/login` an upstream may route to the login handler.
pub(crate) const LOGIN_SPELLINGS: &[(&str, &str)] = &[
    // class: plain, query, fragment
    ("plain", "/api/auth/login"),
    ("query", "/api/auth/login?x=1"),
    ("fragment", "/api/auth/login#top"),
    // class: percent-encoded unreserved characters (either hex case)
    ("encoded letter", "/%61pi/auth/login"),
    ("encoded letters", "/%61%70%69/%61uth/login"),
    ("encoded segment", "/api/%61%75%74%68/login"),
    ("encoded, both hex cases", "/api/auth/%6c%6Fgin"),
    // class: dot segments
    ("dot", "/./api/auth/login"),
    ("dot inside", "/api/./auth/./login"),
    ("dot-dot", "/api/x/../auth/login"),
    ("dot-dot above root", "/../../api/auth/login"),
    ("encoded dot", "/api/%2e/auth/login"),
    ("encoded dot-dot", "/api/x/%2e%2E/auth/login"),
    ("half encoded dot-dot", "/api/x/.%2e/auth/login"),
    // class: double slashes
    ("leading double slash", "//api/auth/login"),
    ("inner slashes", "/api///auth//login"),
    // class: encoded slash
    ("encoded slash", "/api%2Fauth/login"),
    ("encoded slash lower", "/api%2fauth%2flogin"),
    // class: backslash
    ("backslash", "/api\\auth\\login"),
    ("encoded backslash", "/api%5Cauth%5clogin"),
    // class: path parameters
    ("params", "/api;v=1/auth/login"),
    ("params everywhere", "/api;a/auth;jsessionid=X/login;b=c"),
    ("encoded semicolon", "/api%3Bv=1/auth/login"),
    ("params hide a dot-dot", "/api/x/..;y/auth/login"),
    // class: mixed
    ("mixed", "//%61pi\\x\\..;p/./auth%2F%6cogin?q#f"),
    ("mixed 2", "/api/%2e%2e/api/auth/./login"),
    ("relative", "api/auth/login"),
];

#[test]
fn every_spelling_of_login_is_one_path() {
    for (class, spelling) in LOGIN_SPELLINGS {
        assert_eq!(n(spelling), "/api/auth/login", "{class}: {spelling:?}");
    }
}

#[test]
fn rfc3986_dot_segment_examples() {
    // RFC 3986 §5.2.4 and the trailing-slash rules it implies.
    assert_eq!(n("/a/b/c/./../../g"), "/a/g");
    assert_eq!(n("/mid/content=5/../6"), "/mid/6");
    assert_eq!(n("/a/b/.."), "/a/");
    assert_eq!(n("/a/b/."), "/a/b/");
    assert_eq!(n("/a/"), "/a/");
    assert_eq!(n("/.."), "/");
    assert_eq!(n(""), "/");
    assert_eq!(n("/"), "/");
    assert_eq!(n("/..."), "/...", "three dots are a name");
    assert_eq!(n("/.well-known/x"), "/.well-known/x");
}

#[test]
fn bytes_are_written_in_one_canonical_spelling() {
    // Literal where a path may hold the byte, whether it came encoded or not.
    assert_eq!(n("/%7e%7E~"), "/~~~");
    assert_eq!(n("/a%21b%40c%3Ad"), "/a!b@c:d");
    // Everything else as %XX, upper-case: raw and encoded spellings agree.
    assert_eq!(n("/caf\u{e9}"), "/caf%C3%A9");
    assert_eq!(n("/caf%c3%a9"), "/caf%C3%A9");
    assert_eq!(n("/a b"), "/a%20b");
    assert_eq!(n("/a%20b"), "/a%20b");
    assert_eq!(
        n("/100%25"),
        "/100%25",
        "a literal % stays encoded: decoded once"
    );
    assert_eq!(n("/%252e%252e/x"), "/%252e%252e/x", "no double decoding");
    assert_eq!(
        n("/a%3Fb%23c"),
        "/a%3Fb%23c",
        "encoded ? and # are not a query"
    );
}

#[test]
fn invalid_encodings_and_control_bytes_have_no_normal_form() {
    for p in ["/a%", "/a%4", "/a%zz", "/%u0061pi", "/a%4g/b", "/a;%zz/b"] {
        assert_eq!(
            normalize(p.as_bytes()),
            Err(PathError::BadPercentEncoding),
            "{p:?}"
        );
    }
    for p in [
        &b"/a%00"[..],
        b"/a\0b",
        b"/a%0Ab",
        b"/a\tb",
        b"/a%7f",
        b"/a\x7f",
        b"/a%1f",
        b"/a;x%00/b",
    ] {
        assert_eq!(normalize(p), Err(PathError::ControlByte), "{p:?}");
    }
    // The query is not part of the path: odd bytes there change nothing.
    assert_eq!(n("/a?%zz\0"), "/a");
}

#[test]
fn normal_paths_are_used_without_a_copy() {
    let raw = b"/api/auth/login?x=1";
    let same = with_normal(raw, |p| {
        p.as_ptr() == raw.as_ptr() && p == b"/api/auth/login"
    });
    assert_eq!(same, Ok(true));
    let copied = with_normal(b"//api", |p| p.as_ptr() != b"//api".as_ptr());
    assert_eq!(copied, Ok(true));
}

#[test]
fn long_paths_are_normalized_on_the_heap_not_skipped() {
    // 4000 bytes: past the stack buffer.
    let mut long = "/x".repeat(1000);
    long.push_str("/..%2F..//%61pi/auth/login/");
    long.push_str(&"a/../".repeat(400));
    assert!(3 * long.len() + 1 > STACK_BUF);
    let got = n(&long);
    let want = format!("{}/api/auth/login/", "/x".repeat(998));
    assert_eq!(got, want);
    // Worst case growth: every byte becomes %XX.
    let wide = "\u{e9}".repeat(STACK_BUF);
    let got = normalize(format!("/{wide}").as_bytes()).unwrap();
    assert_eq!(got.len(), 1 + 3 * 2 * STACK_BUF);
}

/// A small deterministic generator (no dependency): xorshift64*.
struct Gen(u64);
impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn normal_form_is_idempotent_and_is_normal_agrees() {
    // Random paths from the pieces that matter: separators of every spelling, dots,
    // params, encodings valid and not, literal and non-literal bytes.
    const PIECES: &[&str] = &[
        "/", "\\", "%2F", "%2f", "%5C", ".", "..", "%2e", "%2E", ";", ";p=1", "%3B", "a", "B",
        "%41", "%7e", "~", "é", " ", "%20", "%25", "%", "%z", "%0", "\t", "?", "#", "!", ":", "@",
        "-", "_",
    ];
    let mut g = Gen(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        let len = (g.next() % 12) as usize;
        let p: String = (0..len)
            .map(|_| PIECES[(g.next() % PIECES.len() as u64) as usize])
            .collect();
        match normalize(p.as_bytes()) {
            Ok(once) => {
                assert!(
                    is_normal(&once),
                    "{p:?} -> {:?}",
                    String::from_utf8_lossy(&once)
                );
                assert_eq!(normalize(&once).unwrap(), once, "{p:?} idempotent");
                let raw = path_only(p.as_bytes());
                if is_normal(raw) {
                    assert_eq!(once, raw, "{p:?}: a normal path is its own normal form");
                }
            }
            Err(_) => assert!(!is_normal(path_only(p.as_bytes())), "{p:?}"),
        }
    }
}

#[test]
fn case_insensitive_prefix() {
    assert!(starts_with_ignore_case(b"/API/Auth/x", b"/api/auth/"));
    assert!(!starts_with_ignore_case(b"/api", b"/api/"));
    assert!(starts_with_ignore_case(b"/x", b""));
}
