//! JSON read strictly into derived types: a record only from a JSON object, a choice
//! only from a string.
//!
//! serde's derive reads a struct from a JSON array as well as from an object (fields by
//! position), so `[[]]` would pass for a plugin configuration with no rules and
//! `["envoy-a","",1000,[]]` for a report; and serde_json reads a unit variant from
//! `{"ietf":null}` as well as from `"ietf"`. A type derived with
//! `#[serde(remote = "Self")]` has the derived code as inherent functions; its
//! `Deserialize` impl from [`deserialize_strictly!`] calls them through [`Strict`],
//! which asks the format for a map where the derive asks for a struct, and for a string
//! where it asks for an enum. Nested types go through their own impls, so the rule holds
//! at every depth. Used by the plugin configuration ([`crate::config`]) and the wire
//! types ([`crate::protocol`]).
//!
//! [`check_one_object`] and [`parse`] are how the companion reads a request body (its
//! HTTP layer answers their errors with 400), here in the pure core so that the fuzz
//! targets run exactly that code without the service's network stack.

use core::fmt;
use serde::de::{
    self, DeserializeOwned, Deserializer, IgnoredAny, IntoDeserializer, MapAccess, Visitor,
};
use serde::Deserialize;

/// One JSON object and nothing after it (whitespace aside): not an array, not a bare
/// value. Checked without building anything (`IgnoredAny`). The error is the detail of
/// the companion's 400.
pub fn check_one_object(bytes: &[u8]) -> Result<(), String> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err("body: must be one JSON object".into());
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    IgnoredAny::deserialize(&mut de)
        .and_then(|_| de.end())
        .map_err(|e| format!("body: {e}"))
}

/// Parses one JSON document into `T`, naming the offending field (`entries[3].key: ...`);
/// trailing bytes are an error (serde_json's streaming deserializer stops at the end of
/// the first value).
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        }
    })?;
    de.end().map_err(|e| format!("body: {e}"))?;
    Ok(v)
}

/// `impl Deserialize` for types derived with `#[serde(remote = "Self")]`: structs read
/// only from a map, enums (unit variants only) only from a string.
macro_rules! deserialize_strictly {
    ($($t:ty),* $(,)?) => {$(
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                <$t>::deserialize(crate::json::Strict(d))
            }
        }
    )*};
}
pub(crate) use deserialize_strictly;

/// The deserializer of [`deserialize_strictly!`].
pub(crate) struct Strict<D>(pub(crate) D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Strict<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(v)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(Object(v))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_str(Name(v))
    }

    // The derive calls only `deserialize_struct` or `deserialize_enum` on it.
    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
        identifier ignored_any
    }
}

/// The derived struct visitor, reached only through a map; anything else is refused as
/// "expected a JSON object" (not the derive's "expected struct RawConfig").
struct Object<V>(V);

impl<'de, V: Visitor<'de>> Visitor<'de> for Object<V> {
    type Value = V::Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.0.visit_map(map)
    }
}

/// The derived enum visitor, given the variant named by a string.
struct Name<V>(V);

impl<'de, V: Visitor<'de>> Visitor<'de> for Name<V> {
    type Value = V::Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<V::Value, E> {
        self.0.visit_enum(s.into_deserializer())
    }
}
