//! JSON objects relayed member by member. An upstream's answer (and each
//! chunk of its stream) and a client's request to an upstream change in a
//! few members only; the rest are copied as the raw text the peer sent,
//! never parsed into a tree of maps and written again. On the streaming
//! hot path that tree was most of the gateway's serde_json time.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

/// An object key, borrowed unless it holds escapes.
#[derive(serde::Deserialize)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

/// A JSON object's members in order, each value left as its raw text.
pub struct RawObject<'a> {
    members: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> RawObject<'a> {
    pub fn parse(text: &'a [u8]) -> serde_json::Result<Self> {
        serde_json::from_slice(text)
    }

    /// The object `value` holds; `None` when it holds anything else.
    pub fn of(value: &'a RawValue) -> Option<Self> {
        Self::parse(value.get().as_bytes()).ok()
    }

    /// The object under `object`'s member `key`.
    pub fn of_member(object: &Self, key: &str) -> Option<Self> {
        Self::of(object.get(key)?)
    }

    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.members.iter().find(|(name, _)| name == key).map(|(_, value)| *value)
    }

    /// `key`'s value as a `T`; `None` when it is absent or not a `T`.
    pub fn get_as<T: Deserialize<'a>>(&self, key: &str) -> Option<T> {
        serde_json::from_str(self.get(key)?.get()).ok()
    }

    /// Whether `key` is present with a value other than null.
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some_and(|value| value.get() != "null")
    }

    /// Whether `key` holds a string other than "".
    pub fn has_text(&self, key: &str) -> bool {
        self.get(key).is_some_and(|value| value.get().starts_with('"') && value.get().len() > 2)
    }

    /// The elements of the array under `key`; `None` when it holds no array.
    pub fn array(&self, key: &str) -> Option<Vec<&'a RawValue>> {
        self.get_as(key)
    }

    /// The members, less those named in `except`, as they came.
    pub fn others<'s>(&'s self, except: &'s [&str]) -> impl Iterator<Item = (&'s str, &'a RawValue)> + 's {
        self.members
            .iter()
            .filter(|(name, _)| !except.contains(&name.as_ref()))
            .map(|(name, value)| (name.as_ref(), *value))
    }
}

impl<'de> Deserialize<'de> for RawObject<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = RawObject<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((Key(name), value)) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    members.push((name, value));
                }
                Ok(RawObject { members })
            }
        }
        deserializer.deserialize_map(Members)
    }
}

/// Writes one JSON object into a buffer, member by member.
pub struct ObjectWriter<'b> {
    out: &'b mut Vec<u8>,
    empty: bool,
}

impl<'b> ObjectWriter<'b> {
    pub fn open(out: &'b mut Vec<u8>) -> Self {
        out.push(b'{');
        ObjectWriter { out, empty: true }
    }

    fn key(&mut self, key: &str) {
        if !std::mem::take(&mut self.empty) {
            self.out.push(b',');
        }
        write_json(self.out, key);
        self.out.push(b':');
    }

    /// A member whose value is JSON text already.
    pub fn raw(&mut self, key: &str, value: &RawValue) -> &mut Self {
        self.key(key);
        self.out.extend_from_slice(value.get().as_bytes());
        self
    }

    pub fn value<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> &mut Self {
        self.key(key);
        write_json(self.out, value);
        self
    }

    /// A member whose value `write` puts in the buffer itself.
    pub fn with(&mut self, key: &str, write: impl FnOnce(&mut Vec<u8>)) -> &mut Self {
        self.key(key);
        write(self.out);
        self
    }

    pub fn close(self) {
        self.out.push(b'}');
    }
}

/// Appends `value` as JSON. Writing into a `Vec` cannot fail, and the
/// values written here (strings, numbers, our own structs) always serialise.
fn write_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let mut serializer = serde_json::Serializer::new(out);
    let _infallible = value.serialize(&mut serializer);
}

/// An array written by `write_element` for each of `elements`.
pub fn write_array<T>(
    out: &mut Vec<u8>,
    elements: impl IntoIterator<Item = T>,
    mut write_element: impl FnMut(&mut Vec<u8>, T),
) {
    out.push(b'[');
    for (at, element) in elements.into_iter().enumerate() {
        if at > 0 {
            out.push(b',');
        }
        write_element(out, element);
    }
    out.push(b']');
}

/// The buffer as text: it holds JSON, valid UTF-8 by construction.
pub fn into_text(out: Vec<u8>) -> String {
    String::from_utf8(out).unwrap_or_else(|err| String::from_utf8_lossy(err.as_bytes()).into_owned())
}

/// Serialises as the JSON null, for `ObjectWriter::value`.
pub struct Null;

impl Serialize for Null {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_unit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_keep_their_order_and_raw_text_and_replaced_ones_are_written_fresh() {
        let text = r#"{"id":"up-1","a\"b":[1, 2.50],"model":"x","nested":{"k":"\u00e9"},"n":null}"#;
        let object = RawObject::parse(text.as_bytes()).unwrap();
        assert_eq!(object.get("a\"b").unwrap().get(), "[1, 2.50]");
        assert!(object.has("model") && !object.has("n") && !object.has("missing"));
        assert!(object.has_text("model") && !object.has_text("nested"));
        assert_eq!(object.get_as::<String>("model").as_deref(), Some("x"));
        assert_eq!(object.get_as::<u32>("model"), None);

        let mut out = Vec::new();
        let mut writer = ObjectWriter::open(&mut out);
        writer.value("id", "ours").value("model", "m\"1");
        for (name, value) in object.others(&["id", "model"]) {
            writer.raw(name, value);
        }
        writer.with("list", |out| write_array(out, [1, 2], |out, n| write_json(out, &n)));
        writer.value("usage", &Null);
        writer.close();
        let written = into_text(out);
        assert_eq!(
            written,
            r#"{"id":"ours","model":"m\"1","a\"b":[1, 2.50],"nested":{"k":"\u00e9"},"n":null,"list":[1,2],"usage":null}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&written).unwrap();
        assert_eq!(parsed["nested"]["k"], "é");
    }

    #[test]
    fn anything_but_an_object_is_refused() {
        assert!(RawObject::parse(b"[1]").is_err());
        assert!(RawObject::parse(b"{\"a\":").is_err());
        assert!(RawObject::of(&RawValue::from_string("3".into()).unwrap()).is_none());
    }
}
