//! Structure-aware plugin configurations: the fuzzer's bytes choose a configuration
//! shaped like the real one (rules, match, key, limits, ...): each field a valid value,
//! absent, a value of the wrong type, or given twice; each record usually an object and
//! rarely (the way serde reads a struct from an array) a positional array; rarely an
//! unknown field or content after the document. Values come from pools of valid
//! spellings and of spellings on the edge of what is valid, or are any string or
//! number. The choices are weighted toward valid (see [`pick`]), so that most inputs
//! get past the JSON shape and mutations reach the deep checks (windows, bounds,
//! normal-form paths, key sources, duplicates) instead of stalling at the first field.

use arbitrary::{Arbitrary, Unstructured};

/// An index chosen by weight from one byte. The weights favour what makes a valid
/// configuration, so that most inputs get past the JSON shape to the deep checks, and
/// the first choice is what the fuzzer gets when its bytes run out (zeros).
fn pick(u: &mut Unstructured, weights: &[u32]) -> arbitrary::Result<usize> {
    let total: u32 = weights.iter().sum();
    let b = u32::from(u8::arbitrary(u)?) * total / 256;
    let mut acc = 0;
    for (i, w) in weights.iter().enumerate() {
        acc += w;
        if b < acc {
            return Ok(i);
        }
    }
    Ok(weights.len() - 1)
}

#[derive(Debug, Clone)]
pub enum Field<T> {
    Good(T),
    Absent,
    Wrong(Junk),
    Twice(T, T),
}

impl<'a, T: Arbitrary<'a>> Arbitrary<'a> for Field<T> {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match pick(u, &[200, 32, 12, 12])? {
            0 => Field::Good(T::arbitrary(u)?),
            1 => Field::Absent,
            2 => Field::Wrong(Junk::arbitrary(u)?),
            _ => Field::Twice(T::arbitrary(u)?, T::arbitrary(u)?),
        })
    }
}

/// Something that is usually not there (an unknown field, a record as an array, ...).
#[derive(Debug, Clone)]
pub struct Rare<T>(pub Option<T>);

impl<'a, T: Arbitrary<'a>> Arbitrary<'a> for Rare<T> {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Rare(match pick(u, &[240, 16])? {
            0 => None,
            _ => Some(T::arbitrary(u)?),
        }))
    }
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Junk {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    EmptyArray,
    EmptyObject,
}

/// A string: one of the field's valid values, one on the edge, or any.
#[derive(Debug, Clone)]
pub enum Text {
    Valid(u8),
    Edge(u8),
    Own(String),
}

impl<'a> Arbitrary<'a> for Text {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match pick(u, &[200, 40, 16])? {
            0 => Text::Valid(u8::arbitrary(u)?),
            1 => Text::Edge(u8::arbitrary(u)?),
            _ => Text::Own(String::arbitrary(u)?),
        })
    }
}

#[derive(Debug, Clone)]
pub enum Number {
    Valid(u8),
    Edge(u8),
    Own(u64),
    Float(f64),
}

impl<'a> Arbitrary<'a> for Number {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match pick(u, &[200, 32, 16, 8])? {
            0 => Number::Valid(u8::arbitrary(u)?),
            1 => Number::Edge(u8::arbitrary(u)?),
            2 => Number::Own(u64::arbitrary(u)?),
            _ => Number::Float(f64::arbitrary(u)?),
        })
    }
}

#[derive(Arbitrary, Debug, Clone)]
pub struct GenConfig {
    pub rules: Field<Vec<GenRule>>,
    pub headers: Field<Text>,
    pub max_clients: Field<Number>,
    pub xff_hop: Rare<Number>,
    pub unknown: Rare<(Text, Junk)>,
    pub positional: Rare<()>,
}

#[derive(Arbitrary, Debug, Clone)]
pub struct GenRule {
    pub id: Field<Text>,
    pub priority: Field<Number>,
    pub matcher: Field<GenMatch>,
    pub key: Field<Vec<Text>>,
    pub limits: Field<Vec<GenLimit>>,
    pub shadow: Field<bool>,
    pub scope: Field<Text>,
    pub continues: Field<bool>,
    pub unknown: Rare<(Text, Junk)>,
    pub positional: Rare<()>,
}

#[derive(Arbitrary, Debug, Clone)]
pub struct GenMatch {
    pub path: Field<Text>,
    pub case_sensitive: Field<bool>,
    pub methods: Field<Vec<Text>>,
    pub headers: Field<Vec<(Text, Text)>>,
    pub unknown: Rare<(Text, Junk)>,
    pub positional: Rare<()>,
}

#[derive(Arbitrary, Debug, Clone)]
pub struct GenLimit {
    pub window: Field<Text>,
    pub max: Field<Number>,
    pub burst: Field<Number>,
    pub unknown: Rare<(Text, Junk)>,
    pub positional: Rare<()>,
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Trailing {
    Whitespace,
    /// The same document again (`{"rules":[]} {"rules":[...]}`).
    Again,
    Bytes(Vec<u8>),
}

#[derive(Arbitrary, Debug, Clone)]
pub struct GenInput {
    pub config: GenConfig,
    pub trailing: Rare<Trailing>,
}

/// Values of one field: the valid ones, and those on the edge of (or past) what is valid.
struct Pool<T: 'static> {
    valid: &'static [T],
    edge: &'static [T],
}

const IDS: Pool<&str> = Pool {
    valid: &[
        "api",
        "auth",
        "login",
        "a",
        "api.v1_x-2",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ],
    edge: &[
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "",
        "bad id",
        "caf\u{e9}",
    ],
};
const PATHS: Pool<&str> = Pool {
    valid: &[
        "/api/*",
        "/api/auth/*",
        "/api/auth/login",
        "/",
        "*",
        "/*",
        "/login/",
        "/caf%C3%A9",
        "/a%20b",
        "/A/B",
    ],
    edge: &[
        "/a*b",
        "/a/**",
        "api",
        "/api/../x",
        "/%61",
        "/a;b",
        "/a%2Fb",
        "/caf%c3%a9",
        "",
        "/a\\b",
        "/%zz",
        "/a%00",
        "/a//b",
        "/./a",
    ],
};
const WINDOWS: Pool<&str> = Pool {
    valid: &[
        "1s",
        "10s",
        "1m",
        "60s",
        "1h",
        "1d",
        "366d",
        "31622400s",
        "8784h",
        "527040m",
        "2m",
        "01m",
    ],
    edge: &[
        "367d",
        "0s",
        "31622401s",
        "18446744073709551615s",
        "999999999999",
        "1",
        "s",
        "1x",
        " 1m",
        "1M",
        "\u{157}",
        "1\u{157}",
    ],
};
const METHODS: Pool<&str> = Pool {
    valid: &[
        "GET", "POST", "post", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "Get",
    ],
    edge: &["", "GE T", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"],
};
const KEYS: Pool<&str> = Pool {
    valid: &[
        "ip",
        "header:x-api-key",
        "header:x-user-id",
        "header:X-Api-Key",
        "header:authorization",
    ],
    edge: &["header:", "header:a b", "IP", "cookie:session"],
};
const HEADER_NAMES: Pool<&str> = Pool {
    valid: &["x-tier", "X-Tier", "x-api-key"],
    edge: &["", "a b", "x:y"],
};
const HEADER_VALUES: Pool<&str> = Pool {
    valid: &["free", "premium", "", "a,b"],
    edge: &["\n", "\u{0}"],
};
const HEADER_MODES: Pool<&str> = Pool {
    valid: &["x-ratelimit", "ietf", "both", "none"],
    edge: &["IETF", ""],
};
const SCOPES: Pool<&str> = Pool {
    valid: &["local"],
    edge: &["global", "Local", ""],
};
const UNKNOWN_NAMES: Pool<&str> = Pool {
    valid: &["bogus"],
    edge: &["rules", "id", "path", "window", "Rules", "x\ny"],
};
const COUNTS: Pool<i128> = Pool {
    valid: &[1, 2, 5, 10, 20, 100, 1000, 1_000_000_000],
    edge: &[1_000_000_001, 0, -1],
};
const PRIORITIES: Pool<i128> = Pool {
    valid: &[0, 1, -1, 10, 100, 2_147_483_647, -2_147_483_648],
    edge: &[2_147_483_648, -2_147_483_649],
};
const MAX_CLIENTS: Pool<i128> = Pool {
    valid: &[16, 100_000, 1_048_576, 17],
    edge: &[15, 1_048_577, 0, 1 << 40],
};

/// How the JSON is spelled; two spellings of one configuration must parse alike.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    pub pretty: bool,
    /// Every ASCII character of every string and key as a `\uXXXX` escape.
    pub escape: bool,
}

struct Out {
    style: Style,
}

impl Out {
    fn text(&self, t: &Text, pool: &Pool<&str>) -> String {
        match t {
            Text::Valid(i) => self.string(pool.valid[*i as usize % pool.valid.len()]),
            Text::Edge(i) => self.string(pool.edge[*i as usize % pool.edge.len()]),
            Text::Own(s) => self.string(s),
        }
    }

    fn string(&self, s: &str) -> String {
        if !self.style.escape {
            return serde_json::to_string(s).unwrap();
        }
        let mut out = String::from("\"");
        for c in s.chars() {
            if c.is_ascii() {
                out.push_str(&format!("\\u{:04x}", c as u32));
            } else {
                out.push(c);
            }
        }
        out.push('"');
        out
    }

    fn number(&self, n: &Number, pool: &Pool<i128>) -> String {
        match n {
            Number::Valid(i) => pool.valid[*i as usize % pool.valid.len()].to_string(),
            Number::Edge(i) => pool.edge[*i as usize % pool.edge.len()].to_string(),
            Number::Own(v) => v.to_string(),
            Number::Float(f) if f.is_finite() => format!("{f:?}"),
            Number::Float(_) => "null".into(),
        }
    }

    fn junk(&self, j: &Junk) -> String {
        match j {
            Junk::Null => "null".into(),
            Junk::Bool(b) => b.to_string(),
            Junk::Int(i) => i.to_string(),
            Junk::Float(f) if f.is_finite() => format!("{f:?}"),
            Junk::Float(_) => "1e999".into(),
            Junk::Str(s) => self.string(s),
            Junk::EmptyArray => "[]".into(),
            Junk::EmptyObject => "{}".into(),
        }
    }

    /// Zero, one or two renderings of a field's value.
    fn field<T>(&self, f: &Field<T>, render: impl Fn(&T) -> String) -> Vec<String> {
        match f {
            Field::Good(v) => vec![render(v)],
            Field::Absent => vec![],
            Field::Wrong(j) => vec![self.junk(j)],
            Field::Twice(a, b) => vec![render(a), render(b)],
        }
    }

    fn list<T>(&self, items: &[T], render: impl Fn(&T) -> String) -> String {
        let items: Vec<String> = items.iter().map(render).collect();
        let sep = if self.style.pretty { ",\n " } else { "," };
        format!("[{}]", items.join(sep))
    }

    fn record(
        &self,
        positional: &Rare<()>,
        fields: Vec<(&str, Vec<String>)>,
        unknown: &Rare<(Text, Junk)>,
    ) -> String {
        let sep = if self.style.pretty { ",\n  " } else { "," };
        if positional.0.is_some() {
            let values: Vec<String> = fields.into_iter().flat_map(|(_, v)| v).collect();
            return format!("[{}]", values.join(sep));
        }
        let colon = if self.style.pretty { ": " } else { ":" };
        let mut members: Vec<String> = fields
            .into_iter()
            .flat_map(|(name, values)| {
                let key = self.string(name);
                values.into_iter().map(move |v| format!("{key}{colon}{v}"))
            })
            .collect();
        if let Some((name, junk)) = &unknown.0 {
            members.push(format!(
                "{}{colon}{}",
                self.text(name, &UNKNOWN_NAMES),
                self.junk(junk)
            ));
        }
        format!("{{{}}}", members.join(sep))
    }

    fn config(&self, c: &GenConfig) -> String {
        self.record(
            &c.positional,
            vec![
                (
                    "rules",
                    self.field(&c.rules, |rs| self.list(rs, |r| self.rule(r))),
                ),
                (
                    "headers",
                    self.field(&c.headers, |t| self.text(t, &HEADER_MODES)),
                ),
                (
                    "xff_hop",
                    c.xff_hop
                        .0
                        .iter()
                        .map(|n| self.number(n, &COUNTS))
                        .collect(),
                ),
                (
                    "max_clients",
                    self.field(&c.max_clients, |n| self.number(n, &MAX_CLIENTS)),
                ),
            ],
            &c.unknown,
        )
    }

    fn rule(&self, r: &GenRule) -> String {
        self.record(
            &r.positional,
            vec![
                ("id", self.field(&r.id, |t| self.text(t, &IDS))),
                (
                    "priority",
                    self.field(&r.priority, |n| self.number(n, &PRIORITIES)),
                ),
                ("match", self.field(&r.matcher, |m| self.matcher(m))),
                (
                    "key",
                    self.field(&r.key, |ks| self.list(ks, |k| self.text(k, &KEYS))),
                ),
                (
                    "limits",
                    self.field(&r.limits, |ls| self.list(ls, |l| self.limit(l))),
                ),
                ("shadow", self.field(&r.shadow, bool::to_string)),
                ("scope", self.field(&r.scope, |t| self.text(t, &SCOPES))),
                ("continue", self.field(&r.continues, bool::to_string)),
            ],
            &r.unknown,
        )
    }

    fn matcher(&self, m: &GenMatch) -> String {
        self.record(
            &m.positional,
            vec![
                ("path", self.field(&m.path, |t| self.text(t, &PATHS))),
                (
                    "case_sensitive",
                    self.field(&m.case_sensitive, bool::to_string),
                ),
                (
                    "methods",
                    self.field(&m.methods, |ms| self.list(ms, |t| self.text(t, &METHODS))),
                ),
                (
                    "headers",
                    self.field(&m.headers, |hs| {
                        let members: Vec<String> = hs
                            .iter()
                            .map(|(n, v)| {
                                format!(
                                    "{}:{}",
                                    self.text(n, &HEADER_NAMES),
                                    self.text(v, &HEADER_VALUES)
                                )
                            })
                            .collect();
                        format!("{{{}}}", members.join(","))
                    }),
                ),
            ],
            &m.unknown,
        )
    }

    fn limit(&self, l: &GenLimit) -> String {
        self.record(
            &l.positional,
            vec![
                ("window", self.field(&l.window, |t| self.text(t, &WINDOWS))),
                ("max", self.field(&l.max, |n| self.number(n, &COUNTS))),
                ("burst", self.field(&l.burst, |n| self.number(n, &COUNTS))),
            ],
            &l.unknown,
        )
    }
}

impl GenInput {
    /// The configuration as JSON text in the given style.
    pub fn render(&self, style: Style) -> Vec<u8> {
        let out = Out { style };
        let doc = out.config(&self.config);
        let mut bytes = doc.clone().into_bytes();
        match &self.trailing.0 {
            None => {}
            Some(Trailing::Whitespace) => bytes.extend_from_slice(b" \n\t\r"),
            Some(Trailing::Again) => {
                bytes.push(b' ');
                bytes.extend_from_slice(doc.as_bytes());
            }
            Some(Trailing::Bytes(b)) => bytes.extend_from_slice(b),
        }
        bytes
    }
}
