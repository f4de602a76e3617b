//! A JSON document as written: objects keep every member in order, duplicates included,
//! so a fuzz target can tell what the input said independently of how the code under
//! test read it (serde_json's own `Value` keeps only the last of two equal keys).

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Tree {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    Array(Vec<Tree>),
    Object(Vec<(String, Tree)>),
}

impl Tree {
    /// One whole JSON document (nothing but whitespace after it), or `None`.
    pub fn parse(bytes: &[u8]) -> Option<Tree> {
        serde_json::from_slice(bytes).ok()
    }

    /// The value of `key` in an object that holds it exactly once.
    pub fn get(&self, key: &str) -> Option<&Tree> {
        let Tree::Object(members) = self else {
            return None;
        };
        let mut it = members.iter().filter(|(k, _)| k == key);
        match (it.next(), it.next()) {
            (Some((_, v)), None) => Some(v),
            _ => None,
        }
    }

    pub fn is_object(&self) -> bool {
        matches!(self, Tree::Object(_))
    }

    pub fn items(&self) -> &[Tree] {
        match self {
            Tree::Array(a) => a,
            _ => &[],
        }
    }

    /// The first object anywhere in the document that names one key twice, as that key.
    pub fn duplicate_key(&self) -> Option<&str> {
        match self {
            Tree::Array(a) => a.iter().find_map(Tree::duplicate_key),
            Tree::Object(m) => {
                for (i, (k, _)) in m.iter().enumerate() {
                    if m[..i].iter().any(|(o, _)| o == k) {
                        return Some(k);
                    }
                }
                m.iter().find_map(|(_, v)| v.duplicate_key())
            }
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Tree {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Tree, D::Error> {
        d.deserialize_any(TreeVisitor)
    }
}

struct TreeVisitor;

impl<'de> Visitor<'de> for TreeVisitor {
    type Value = Tree;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Tree, E> {
        Ok(Tree::Null)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Tree, E> {
        Ok(Tree::Bool(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Tree, E> {
        Ok(Tree::Number(v as f64))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Tree, E> {
        Ok(Tree::Number(v as f64))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Tree, E> {
        Ok(Tree::Number(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Tree, E> {
        Ok(Tree::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Tree, E> {
        Ok(Tree::String(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Tree, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element()? {
            out.push(v);
        }
        Ok(Tree::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Tree, A::Error> {
        let mut out = Vec::new();
        while let Some((k, v)) = map.next_entry::<String, Tree>()? {
            out.push((k, v));
        }
        Ok(Tree::Object(out))
    }
}
