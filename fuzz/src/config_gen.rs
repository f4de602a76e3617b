//! Structure-aware plugin configurations: the fuzzer's bytes choose a configuration
//! shaped like the real one (rules, match, key, limits, ...), each field absent, a
//! plausible value, a value of the wrong type, or given twice, each record an object or
//! (the way serde reads a struct from an array) a positional array, plus unknown
//! fields and content after the document. Plausible values come from pools of the
//! spellings that sit on the edges of what is valid, so mutations reach the deep checks
//! (windows, bounds, normal-form paths, key sources) instead of stalling in the JSON
//! syntax.

use arbitrary::Arbitrary;

#[derive(Arbitrary, Debug, Clone)]
pub enum Field<T> {
    Absent,
    Good(T),
    Wrong(Junk),
    Twice(T, T),
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

/// A string: one of the field's pool, or any.
#[derive(Arbitrary, Debug, Clone)]
pub enum Text {
    Pool(u8),
    Own(String),
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Number {
    Pool(u8),
    Own(u64),
    Signed(i64),
    Float(f64),
}

#[derive(Arbitrary, Debug, Clone)]
pub struct GenConfig {
    pub rules: Field<Vec<GenRule>>,
    pub headers: Field<Text>,
    pub max_clients: Field<Number>,
    pub xff_hop: Field<Number>,
    pub unknown: Option<(Text, Junk)>,
    pub positional: bool,
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
    pub unknown: Option<(Text, Junk)>,
    pub positional: bool,
}

#[derive(Arbitrary, Debug, Clone)]
pub struct GenMatch {
    pub path: Field<Text>,
    pub case_sensitive: Field<bool>,
    pub methods: Field<Vec<Text>>,
    pub headers: Field<Vec<(Text, Text)>>,
    pub unknown: Option<(Text, Junk)>,
    pub positional: bool,
}

#[derive(Arbitrary, Debug, Clone)]
pub struct GenLimit {
    pub window: Field<Text>,
    pub max: Field<Number>,
    pub burst: Field<Number>,
    pub unknown: Option<(Text, Junk)>,
    pub positional: bool,
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
    pub trailing: Option<Trailing>,
}

const IDS: &[&str] = &[
    "api",
    "auth",
    "login",
    "a",
    "api.v1_x-2",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "",
    "bad id",
    "caf\u{e9}",
];
const PATHS: &[&str] = &[
    "/api/*",
    "/api/auth/*",
    "/api/auth/login",
    "/",
    "*",
    "/*",
    "/login/",
    "/a*b",
    "/a/**",
    "api",
    "/api/../x",
    "/%61",
    "/a;b",
    "/a%2Fb",
    "/caf%C3%A9",
    "/caf%c3%a9",
    "/a%20b",
    "/A/B",
    "",
    "/a\\b",
    "/%zz",
    "/a%00",
    "/a//b",
    "/./a",
];
const WINDOWS: &[&str] = &[
    "1s",
    "10s",
    "1m",
    "60s",
    "1h",
    "1d",
    "366d",
    "367d",
    "0s",
    "31622400s",
    "31622401s",
    "8784h",
    "527040m",
    "18446744073709551615s",
    "999999999999",
    "1",
    "s",
    "1x",
    "01m",
    " 1m",
    "1M",
];
const METHODS: &[&str] = &[
    "GET",
    "POST",
    "post",
    "HEAD",
    "PUT",
    "DELETE",
    "PATCH",
    "OPTIONS",
    "Get",
    "",
    "GE T",
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
];
const KEYS: &[&str] = &[
    "ip",
    "header:x-api-key",
    "header:x-user-id",
    "header:X-Api-Key",
    "header:authorization",
    "header:",
    "header:a b",
    "IP",
    "cookie:session",
];
const HEADER_NAMES: &[&str] = &["x-tier", "X-Tier", "x-api-key", "", "a b", "x:y"];
const HEADER_VALUES: &[&str] = &["free", "premium", "", "a,b"];
const HEADER_MODES: &[&str] = &["x-ratelimit", "ietf", "both", "none", "IETF", ""];
const SCOPES: &[&str] = &["local", "global", "Local", ""];
const UNKNOWN_NAMES: &[&str] = &["bogus", "rules", "id", "path", "window", "Rules", "x\ny"];
const COUNTS: &[i128] = &[
    1,
    2,
    5,
    10,
    20,
    100,
    1000,
    1_000_000_000,
    1_000_000_001,
    0,
    -1,
];
const PRIORITIES: &[i128] = &[
    0,
    1,
    -1,
    10,
    100,
    2_147_483_647,
    -2_147_483_648,
    2_147_483_648,
];
const MAX_CLIENTS: &[i128] = &[16, 15, 100_000, 1_048_576, 1_048_577, 0, 17, 1 << 40];

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
    fn text(&self, t: &Text, pool: &[&str]) -> String {
        match t {
            Text::Pool(i) => self.string(pool[*i as usize % pool.len()]),
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

    fn number(&self, n: &Number, pool: &[i128]) -> String {
        match n {
            Number::Pool(i) => pool[*i as usize % pool.len()].to_string(),
            Number::Own(v) => v.to_string(),
            Number::Signed(v) => v.to_string(),
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
            Field::Absent => vec![],
            Field::Good(v) => vec![render(v)],
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
        positional: bool,
        fields: Vec<(&str, Vec<String>)>,
        unknown: &Option<(Text, Junk)>,
    ) -> String {
        let sep = if self.style.pretty { ",\n  " } else { "," };
        if positional {
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
        if let Some((name, junk)) = unknown {
            members.push(format!(
                "{}{colon}{}",
                self.text(name, UNKNOWN_NAMES),
                self.junk(junk)
            ));
        }
        format!("{{{}}}", members.join(sep))
    }

    fn config(&self, c: &GenConfig) -> String {
        self.record(
            c.positional,
            vec![
                (
                    "rules",
                    self.field(&c.rules, |rs| self.list(rs, |r| self.rule(r))),
                ),
                (
                    "headers",
                    self.field(&c.headers, |t| self.text(t, HEADER_MODES)),
                ),
                (
                    "xff_hop",
                    self.field(&c.xff_hop, |n| self.number(n, COUNTS)),
                ),
                (
                    "max_clients",
                    self.field(&c.max_clients, |n| self.number(n, MAX_CLIENTS)),
                ),
            ],
            &c.unknown,
        )
    }

    fn rule(&self, r: &GenRule) -> String {
        self.record(
            r.positional,
            vec![
                ("id", self.field(&r.id, |t| self.text(t, IDS))),
                (
                    "priority",
                    self.field(&r.priority, |n| self.number(n, PRIORITIES)),
                ),
                ("match", self.field(&r.matcher, |m| self.matcher(m))),
                (
                    "key",
                    self.field(&r.key, |ks| self.list(ks, |k| self.text(k, KEYS))),
                ),
                (
                    "limits",
                    self.field(&r.limits, |ls| self.list(ls, |l| self.limit(l))),
                ),
                ("shadow", self.field(&r.shadow, bool::to_string)),
                ("scope", self.field(&r.scope, |t| self.text(t, SCOPES))),
                ("continue", self.field(&r.continues, bool::to_string)),
            ],
            &r.unknown,
        )
    }

    fn matcher(&self, m: &GenMatch) -> String {
        self.record(
            m.positional,
            vec![
                ("path", self.field(&m.path, |t| self.text(t, PATHS))),
                (
                    "case_sensitive",
                    self.field(&m.case_sensitive, bool::to_string),
                ),
                (
                    "methods",
                    self.field(&m.methods, |ms| self.list(ms, |t| self.text(t, METHODS))),
                ),
                (
                    "headers",
                    self.field(&m.headers, |hs| {
                        let members: Vec<String> = hs
                            .iter()
                            .map(|(n, v)| {
                                format!(
                                    "{}:{}",
                                    self.text(n, HEADER_NAMES),
                                    self.text(v, HEADER_VALUES)
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
            l.positional,
            vec![
                ("window", self.field(&l.window, |t| self.text(t, WINDOWS))),
                ("max", self.field(&l.max, |n| self.number(n, COUNTS))),
                ("burst", self.field(&l.burst, |n| self.number(n, COUNTS))),
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
        match &self.trailing {
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
