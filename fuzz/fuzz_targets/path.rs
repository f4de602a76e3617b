//! Request paths in normal form (`meshlimit_core::path`) and rule matching on them.
//!
//! Properties, for any `:path` a client sends:
//! - it has a normal form exactly when it holds no invalid percent-encoding and no
//!   control byte (raw or encoded), and the error names the first problem;
//! - the normal form is a fixed point (`normalize(normalize(p)) == normalize(p)`,
//!   `is_normal`), starts with `/`, has no `//`, no `.`/`..` segment, no `\`, `;`, `?`,
//!   `#`, and no percent-encoded byte that is written literally (unreserved, sub-delims,
//!   `:`, `@`), and its hex digits are upper-case;
//! - every re-spelling of a normal path in the classes the filter promises to see
//!   through (percent-encoding either case, decoded bytes, `//`, `\`, `%2F`, `%5C`, dot
//!   segments plain and encoded, `;params`, `..` above the root, a missing leading `/`,
//!   query and fragment) has that same normal form, so it meets the same rules;
//! - matching a normal path equals matching its re-normalization, ASCII case does not
//!   change what a case-insensitive rule matches, and method case does not change what
//!   a `methods` rule matches;
//! - `matching_rules` yields exactly the rules whose path, method and headers fit, asks
//!   for the method at most once and only when a rule whose path matched names methods.
#![no_main]

use std::cell::Cell;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use meshlimit_core::config::{Limit, Matcher, PathMatch, Rule, Scope};
use meshlimit_core::global::FailureMode;
use meshlimit_core::matching::{matching_rules, method_matches, path_matches};
use meshlimit_core::path::{is_normal, normalize, path_only, with_normal, PathError};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    raw: &'a [u8],
    spellings: Vec<Spelling>,
    rules: Vec<GenRule<'a>>,
    method: &'a [u8],
    headers: Vec<(u8, &'a [u8])>,
}

#[derive(Arbitrary, Debug)]
enum Spelling {
    /// A literal byte as `%XX` (upper or lower case hex).
    EncodeLiteral { at: u16, lower: bool },
    /// A `%XX` with lower-case hex digits.
    LowerHex { at: u16 },
    /// A `%XX` as the raw byte.
    Decode { at: u16 },
    /// A separator spelled another way.
    Separator { at: u16, how: u8 },
    /// `;params` before a separator (dropped with the segment's parameters).
    Params { at: u16, params: Vec<u8> },
    /// `;params` at the end.
    EndParams(Vec<u8>),
    /// `/..` (several times) in front.
    AboveRoot(u8),
    /// No leading `/`.
    Relative,
    /// A query or fragment.
    Tail { fragment: bool, rest: Vec<u8> },
}

/// Spellings of one `/` that name the same place.
const SEPARATORS: &[&[u8]] = &[
    b"//",
    b"///",
    b"\\",
    b"/\\",
    b"%2F",
    b"%2f",
    b"%5C",
    b"%5c",
    b"/./",
    b"/%2e/",
    b"/%2E/",
    b"\\.\\",
    b"/x/../",
    b"/x/%2e%2e/",
    b"/x/.%2E/",
    b"/x;p/..;q/",
    b"%2Fx%2F..%2F",
    b"/%41b%20/../",
];

#[derive(Arbitrary, Debug)]
struct GenRule<'a> {
    /// The rule's path: a prefix of the request's normal path, or bytes of its own.
    from_request: Option<u16>,
    own: &'a [u8],
    prefix: bool,
    case_sensitive: bool,
    methods: Vec<&'a [u8]>,
    headers: Vec<(u8, &'a [u8])>,
}

const HEADER_NAMES: &[&str] = &["x-tier", "x-api-key", "content-type"];

#[derive(Clone, Copy, PartialEq)]
enum Tok {
    Slash,
    Literal(u8),
    Encoded(u8),
}

/// A normal path as tokens and the current spelling of each.
fn tokens(normal: &[u8]) -> Vec<(Tok, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < normal.len() {
        let b = normal[i];
        if b == b'%' {
            let hex = std::str::from_utf8(&normal[i + 1..i + 3]).unwrap();
            let v = u8::from_str_radix(hex, 16).unwrap();
            out.push((Tok::Encoded(v), normal[i..i + 3].to_vec()));
            i += 3;
        } else {
            let t = if b == b'/' {
                Tok::Slash
            } else {
                Tok::Literal(b)
            };
            out.push((t, vec![b]));
            i += 1;
        }
    }
    out
}

/// The `k`-th token (mod their number) for which `want` holds.
fn nth(
    toks: &mut [(Tok, Vec<u8>)],
    k: u16,
    want: impl Fn(Tok) -> bool,
) -> Option<&mut (Tok, Vec<u8>)> {
    let n = toks.iter().filter(|(t, _)| want(*t)).count();
    if n == 0 {
        return None;
    }
    toks.iter_mut()
        .filter(|(t, _)| want(*t))
        .nth(k as usize % n)
}

/// Bytes that may sit in a `;params` without ending it or making the path invalid.
fn params(raw: &[u8]) -> Vec<u8> {
    let mut out = vec![b';'];
    out.extend(
        raw.iter().copied().filter(|&b| {
            !(b < 0x20 || b == 0x7f || matches!(b, b'/' | b'\\' | b'?' | b'#' | b'%'))
        }),
    );
    out
}

/// `normal` re-spelled by `edits`; each must leave the normal form unchanged.
fn respell(normal: &[u8], edits: &[Spelling]) -> Vec<u8> {
    let mut toks = tokens(normal);
    let (mut front, mut back) = (Vec::new(), Vec::new());
    let mut relative = false;
    for e in edits {
        match e {
            Spelling::EncodeLiteral { at, lower } => {
                if let Some((Tok::Literal(b), s)) =
                    nth(&mut toks, *at, |t| matches!(t, Tok::Literal(_)))
                {
                    *s = if *lower {
                        format!("%{b:02x}")
                    } else {
                        format!("%{b:02X}")
                    }
                    .into_bytes();
                }
            }
            Spelling::LowerHex { at } => {
                if let Some((Tok::Encoded(b), s)) =
                    nth(&mut toks, *at, |t| matches!(t, Tok::Encoded(_)))
                {
                    *s = format!("%{b:02x}").into_bytes();
                }
            }
            Spelling::Decode { at } => {
                // Not `%`, `?` or `#`: raw, they mean something else.
                let raw_ok = |t| matches!(t, Tok::Encoded(b) if !matches!(b, b'%' | b'?' | b'#'));
                if let Some((Tok::Encoded(b), s)) = nth(&mut toks, *at, raw_ok) {
                    *s = vec![*b];
                }
            }
            Spelling::Separator { at, how } => {
                if let Some((_, s)) = nth(&mut toks, *at, |t| t == Tok::Slash) {
                    *s = SEPARATORS[*how as usize % SEPARATORS.len()].to_vec();
                }
            }
            Spelling::Params { at, params: p } => {
                if let Some((_, s)) = nth(&mut toks, *at, |t| t == Tok::Slash) {
                    let mut spelled = params(p);
                    spelled.extend_from_slice(s);
                    *s = spelled;
                }
            }
            Spelling::EndParams(p) => back.extend(params(p)),
            Spelling::AboveRoot(k) => {
                for _ in 0..=(k % 4) {
                    front.extend_from_slice(b"/..");
                }
            }
            Spelling::Relative => relative = true,
            Spelling::Tail { fragment, rest } => {
                back.push(if *fragment { b'#' } else { b'?' });
                back.extend_from_slice(rest);
            }
        }
    }
    let mut out = front;
    let mut body: Vec<u8> = toks.into_iter().flat_map(|(_, s)| s).collect();
    if relative && out.is_empty() && body.first() == Some(&b'/') {
        body.remove(0);
    }
    out.extend(body);
    out.extend(back);
    out
}

/// What `normalize` must answer, written from the module's contract.
fn expected_error(path: &[u8]) -> Option<PathError> {
    let hex = |b: u8| b.is_ascii_hexdigit();
    let mut i = 0;
    while i < path.len() {
        let mut b = path[i];
        if b == b'%' {
            match (path.get(i + 1), path.get(i + 2)) {
                (Some(&h), Some(&l)) if hex(h) && hex(l) => {
                    b = u8::from_str_radix(std::str::from_utf8(&[h, l]).unwrap(), 16).unwrap();
                    i += 3;
                }
                _ => return Some(PathError::BadPercentEncoding),
            }
        } else {
            i += 1;
        }
        if b < 0x20 || b == 0x7f {
            return Some(PathError::ControlByte);
        }
    }
    None
}

fn is_literal(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@".contains(&b)
}

fn check_normal(n: &[u8]) {
    assert!(is_normal(n), "{:?}", String::from_utf8_lossy(n));
    assert_eq!(normalize(n).as_deref(), Ok(n), "not idempotent");
    assert_eq!(n.first(), Some(&b'/'));
    assert!(!n.windows(2).any(|w| w == b"//"), "// in {n:?}");
    for seg in n[1..].split(|&b| b == b'/') {
        assert!(seg != b"." && seg != b"..", "dot segment in {n:?}");
    }
    let mut i = 0;
    while i < n.len() {
        let b = n[i];
        if b == b'%' {
            let hex = &n[i + 1..i + 3];
            assert!(
                hex.iter()
                    .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h)),
                "lower-case hex in {n:?}"
            );
            let v = u8::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap();
            assert!(
                !is_literal(v) && !matches!(v, b'/' | b'\\' | b';') && v >= 0x20 && v != 0x7f,
                "%{v:02X} should not be encoded in {n:?}"
            );
            i += 3;
        } else {
            assert!(b == b'/' || is_literal(b), "byte {b:#04x} in {n:?}");
            i += 1;
        }
    }
}

fn rule(matcher: Matcher, i: usize) -> Rule {
    Rule {
        id: format!("r{i}"),
        priority: 0,
        matcher,
        key: vec![],
        limits: vec![Limit::new(60, 10, 10).unwrap()],
        shadow: false,
        scope: Scope::Local,
        failure_mode: FailureMode::Local,
        continues: false,
        seed: i as u64,
    }
}

fuzz_target!(|input: Input| {
    let raw = input.raw;
    let normal = normalize(raw);
    assert_eq!(
        normal.as_ref().err().copied(),
        expected_error(path_only(raw))
    );
    assert_eq!(with_normal(raw, <[u8]>::to_vec), normal);
    let Ok(n) = normal else {
        return;
    };
    check_normal(&n);
    if is_normal(path_only(raw)) {
        assert_eq!(n, path_only(raw), "a normal path was rewritten");
    }

    let spelled = respell(&n, &input.spellings);
    assert_eq!(
        normalize(&spelled).as_deref(),
        Ok(&n[..]),
        "{:?} is a spelling of {:?}",
        String::from_utf8_lossy(&spelled),
        String::from_utf8_lossy(&n)
    );

    let upper = n.to_ascii_uppercase();
    assert!(is_normal(&upper));
    let lower = normalize(&n.to_ascii_lowercase()).unwrap();

    let mut rules = Vec::new();
    for (i, g) in input.rules.iter().take(8).enumerate() {
        let src = match g.from_request {
            Some(k) => &n[..=(k as usize % n.len())],
            None => g.own,
        };
        // Configured paths are in normal form (the configuration refuses others).
        let Ok(p) = normalize(src) else { continue };
        let p = String::from_utf8(p).expect("normal form is ASCII");
        let path = if g.prefix {
            PathMatch::Prefix(p)
        } else {
            PathMatch::Exact(p)
        };
        let methods: Vec<String> = g
            .methods
            .iter()
            .take(4)
            .filter_map(|m| std::str::from_utf8(m).ok())
            .filter(|m| !m.is_empty())
            .map(str::to_ascii_uppercase)
            .collect();
        let headers = g
            .headers
            .iter()
            .take(3)
            .map(|(k, v)| {
                (
                    HEADER_NAMES[*k as usize % HEADER_NAMES.len()].to_string(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect();
        let m = Matcher {
            path,
            case_sensitive: g.case_sensitive,
            methods,
            headers,
        };
        let hit = path_matches(&m, &n);
        assert_eq!(hit, path_matches(&m, &normalize(&n).unwrap()));
        assert_eq!(hit, path_matches(&m, &normalize(&spelled).unwrap()));
        if !m.case_sensitive {
            assert_eq!(
                hit,
                path_matches(&m, &upper),
                "case changed a case-insensitive match"
            );
            assert_eq!(
                hit,
                path_matches(&m, &lower),
                "case changed a case-insensitive match"
            );
        }
        if !m.methods.is_empty() {
            let got = method_matches(&m.methods, input.method);
            assert_eq!(
                got,
                method_matches(&m.methods, &input.method.to_ascii_lowercase())
            );
            assert_eq!(
                got,
                method_matches(&m.methods, &input.method.to_ascii_uppercase())
            );
        }
        rules.push(rule(m, i));
    }

    // The request: `input.method` and the first value of each header name.
    let header = |name: &str| {
        input
            .headers
            .iter()
            .find(|(k, _)| HEADER_NAMES[*k as usize % HEADER_NAMES.len()] == name)
            .map(|(_, v)| v.to_vec())
    };
    let method_calls = Cell::new(0);
    let header_calls = Cell::new(0);
    let found: Vec<usize> = matching_rules(
        &rules,
        &n,
        || {
            method_calls.set(method_calls.get() + 1);
            Some(input.method.to_vec())
        },
        |name| {
            header_calls.set(header_calls.get() + 1);
            header(name)
        },
    )
    .collect();
    let expected: Vec<usize> = (0..rules.len())
        .filter(|&i| {
            let m = &rules[i].matcher;
            path_matches(m, &n)
                && (m.methods.is_empty() || method_matches(&m.methods, input.method))
                && m.headers
                    .iter()
                    .all(|(k, v)| header(k).is_some_and(|h| h == v.as_bytes()))
        })
        .collect();
    assert_eq!(found, expected);
    let asks_method = rules
        .iter()
        .any(|r| path_matches(&r.matcher, &n) && !r.matcher.methods.is_empty());
    assert!(method_calls.get() <= 1, "method fetched twice");
    assert_eq!(
        method_calls.get() == 1,
        asks_method,
        "method fetched without need"
    );
    let path_fit = rules.iter().filter(|r| path_matches(&r.matcher, &n));
    let most_headers: usize = path_fit.map(|r| r.matcher.headers.len()).sum();
    assert!(header_calls.get() <= most_headers);
});
