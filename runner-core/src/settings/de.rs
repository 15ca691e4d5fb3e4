//! The merged settings tree (the file's values plus `DROVER_*` overrides) and the deserializer
//! that reads it into the settings types.
//!
//! An override is text until a field asks for a type: the same `42` is a string for
//! `runner_name` and a number for `gc_grace_secs`, so an all-digit password stays a password.
//! Errors say where the bad value is (the file's key path or the variable) and what kind of
//! value was wanted, never the value itself: driver errors are printed in every job's log,
//! and a setting may be a secret.

use std::collections::{BTreeMap, btree_map};
use std::fmt;

use serde::de::{self, DeserializeSeed, Expected, IntoDeserializer, Unexpected, Visitor};

/// One value of the merged settings.
#[derive(Debug)]
pub(super) enum Node {
    /// A table. `created_by` is the variable prefix (`DROVER_POLICY__MOUNTS`) when overrides
    /// made the table, `None` when it is in the file.
    Table {
        /// The table's keys.
        entries: BTreeMap<String, Node>,
        /// Which overrides made it, if the file does not have it.
        created_by: Option<String>,
    },
    /// An array from the file or from an override's TOML array syntax.
    Array(Vec<Node>),
    /// A typed scalar from the file (or from an override's array).
    Scalar(toml::Value),
    /// Text that takes the type its field asks for: an override's value (`variable` is set)
    /// or a table's key.
    Text {
        /// The text as written.
        raw: String,
        /// The override variable it came from.
        variable: Option<String>,
    },
}

impl Node {
    /// An empty table that is in neither the file nor the environment.
    pub(super) fn empty_table() -> Node {
        Node::Table {
            entries: BTreeMap::new(),
            created_by: None,
        }
    }

    /// The file's (or an override array's) value as a node.
    pub(super) fn from_toml(value: toml::Value) -> Node {
        match value {
            toml::Value::Table(table) => Node::Table {
                entries: table
                    .into_iter()
                    .map(|(key, value)| (key, Node::from_toml(value)))
                    .collect(),
                created_by: None,
            },
            toml::Value::Array(items) => {
                Node::Array(items.into_iter().map(Node::from_toml).collect())
            }
            scalar => Node::Scalar(scalar),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Node::Table { .. } => "a table",
            Node::Array(_) => "an array",
            Node::Scalar(toml::Value::Integer(_)) => "an integer",
            Node::Scalar(toml::Value::Float(_)) => "a float",
            Node::Scalar(toml::Value::Boolean(_)) => "a boolean",
            Node::Scalar(toml::Value::Datetime(_)) => "a date-time",
            Node::Scalar(_) | Node::Text { .. } => "a string",
        }
    }
}

/// Where a value is, as the operator would look for it.
#[derive(Debug, Clone)]
pub(super) enum Loc {
    /// A dotted key path in the settings file; empty for the top level.
    File(String),
    /// An override variable (or a pattern of them, `DROVER_POLICY__MOUNTS__*`).
    Env(String),
}

impl Loc {
    /// The top level of the settings file.
    pub(super) fn root() -> Loc {
        Loc::File(String::new())
    }

    /// Where the value `node` under `key` of this table is.
    pub(super) fn child(&self, key: &str, node: &Node) -> Loc {
        match node {
            Node::Text {
                variable: Some(variable),
                ..
            } => Loc::Env(variable.clone()),
            Node::Table {
                created_by: Some(prefix),
                ..
            } => Loc::Env(format!("{prefix}__*")),
            _ => {
                let bare = !key.is_empty()
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                let key = if bare {
                    key.to_owned()
                } else {
                    format!("{key:?}")
                };
                match self {
                    Loc::File(path) if path.is_empty() => Loc::File(key),
                    Loc::File(path) => Loc::File(format!("{path}.{key}")),
                    Loc::Env(name) => Loc::Env(format!("{name}.{key}")),
                }
            }
        }
    }

    fn element(&self, index: usize) -> Loc {
        match self {
            Loc::File(path) => Loc::File(format!("{path}[{index}]")),
            Loc::Env(name) => Loc::Env(format!("{name}[{index}]")),
        }
    }

    fn in_file(&self) -> bool {
        matches!(self, Loc::File(_))
    }

    fn render(&self, origin: &str) -> String {
        match self {
            Loc::File(path) if path.is_empty() => origin.to_owned(),
            Loc::File(path) => format!("{origin}: {path}"),
            Loc::Env(name) => name.clone(),
        }
    }
}

/// A settings error that names where the bad value is and never shows the value.
#[derive(Debug)]
pub(super) struct DeError {
    message: String,
    located: bool,
}

impl DeError {
    fn new(message: impl Into<String>) -> DeError {
        DeError {
            message: message.into(),
            located: false,
        }
    }

    /// The innermost place that saw the error is the most precise one; outer ones keep it.
    fn at(mut self, loc: &Loc, origin: &str) -> DeError {
        if !self.located {
            self.message = format!("{}: {}", loc.render(origin), self.message);
            self.located = true;
        }
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

/// serde's default messages quote the value (``invalid type: integer `123456` ``); these
/// name only its kind.
impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> DeError {
        DeError::new(msg.to_string())
    }

    fn invalid_type(unexpected: Unexpected<'_>, expected: &dyn Expected) -> DeError {
        DeError::new(format!("expected {expected}, found {}", kind(&unexpected)))
    }

    fn invalid_value(_unexpected: Unexpected<'_>, expected: &dyn Expected) -> DeError {
        DeError::new(format!("invalid value: expected {expected}"))
    }

    fn unknown_variant(_variant: &str, expected: &'static [&'static str]) -> DeError {
        DeError::new(match expected {
            [] => "unknown variant; there are none".to_owned(),
            names => format!("unknown variant, expected {}", one_of(names)),
        })
    }
}

fn kind(unexpected: &Unexpected<'_>) -> &'static str {
    match unexpected {
        Unexpected::Bool(_) => "a boolean",
        Unexpected::Unsigned(_) | Unexpected::Signed(_) => "an integer",
        Unexpected::Float(_) => "a float",
        Unexpected::Char(_) => "a character",
        Unexpected::Str(_) => "a string",
        Unexpected::Bytes(_) => "bytes",
        Unexpected::Unit => "nothing",
        Unexpected::Option => "an optional value",
        Unexpected::NewtypeStruct => "a newtype struct",
        Unexpected::Seq => "an array",
        Unexpected::Map => "a table",
        Unexpected::Enum => "an enum",
        Unexpected::UnitVariant => "a unit variant",
        Unexpected::NewtypeVariant => "a newtype variant",
        Unexpected::TupleVariant => "a tuple variant",
        Unexpected::StructVariant => "a struct variant",
        // A free-form description a Deserialize impl wrote; it could quote the value.
        Unexpected::Other(_) => "another kind of value",
    }
}

fn one_of(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|name| format!("`{name}`")).collect();
    match quoted.as_slice() {
        [only] => only.clone(),
        [first, second] => format!("{first} or {second}"),
        _ => format!("one of {}", quoted.join(", ")),
    }
}

fn mismatch(expected: &str, found: &Node) -> DeError {
    DeError::new(format!("expected {expected}, found {}", found.kind()))
}

/// The bounds of a 64-bit type are too long to be of help in a message.
fn whole_number(bits: u32, signed: bool, min: &dyn fmt::Display, max: &dyn fmt::Display) -> String {
    match (bits >= 64, signed) {
        (true, true) => "a whole number".to_owned(),
        (true, false) => "a whole number, 0 or more".to_owned(),
        (false, _) => format!("a whole number from {min} to {max}"),
    }
}

/// Reads an override's TOML array syntax (`["sleep", "1"]`), the one way to write a list in
/// a single variable.
fn parse_array(raw: &str) -> Option<Vec<Node>> {
    let mut table = format!("v = {raw}").parse::<toml::Table>().ok()?;
    match table.remove("v")? {
        toml::Value::Array(items) => Some(items.into_iter().map(Node::from_toml).collect()),
        _ => None,
    }
}

/// Deserializes one node of the tree; errors raised at this node are located here.
pub(super) struct NodeDe<'o> {
    node: Node,
    loc: Loc,
    origin: &'o str,
}

impl<'o> NodeDe<'o> {
    /// `origin` names the settings file (or says there is none) in file locations.
    pub(super) fn new(node: Node, loc: Loc, origin: &'o str) -> NodeDe<'o> {
        NodeDe { node, loc, origin }
    }

    fn table<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let NodeDe { node, loc, origin } = self;
        let result = match node {
            Node::Table { entries, .. } => visitor.visit_map(TableAccess {
                entries: entries.into_iter(),
                loc: loc.clone(),
                origin,
                value: None,
            }),
            Node::Text {
                variable: Some(variable),
                ..
            } => Err(DeError::new(format!(
                "a table cannot be set by one variable; set its keys with {variable}__<KEY>"
            ))),
            other => Err(mismatch("a table", &other)),
        };
        result.map_err(|err| err.at(&loc, origin))
    }

    fn array<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let NodeDe { node, loc, origin } = self;
        let items = match node {
            Node::Array(items) => Ok(items),
            Node::Text { raw, .. } => parse_array(&raw)
                .ok_or_else(|| DeError::new("expected an array like [\"a\", \"b\"]")),
            other => Err(mismatch("an array", &other)),
        };
        let result = items.and_then(|items| {
            let total = items.len();
            let mut access = ArrayAccess {
                items: items.into_iter().enumerate(),
                loc: loc.clone(),
                origin,
            };
            let value = visitor.visit_seq(&mut access)?;
            // A tuple reads only the elements it has: more would be silently dropped.
            match access.items.len() {
                0 => Ok(value),
                left => Err(DeError::new(format!(
                    "expected {} elements, found {total}",
                    total - left
                ))),
            }
        });
        result.map_err(|err| err.at(&loc, origin))
    }

    fn text<'de, V: Visitor<'de>>(self, expected: &str, visitor: V) -> Result<V::Value, DeError> {
        let NodeDe { node, loc, origin } = self;
        let result = match node {
            Node::Scalar(toml::Value::String(text)) | Node::Text { raw: text, .. } => {
                visitor.visit_string(text)
            }
            other => Err(mismatch(expected, &other)),
        };
        result.map_err(|err| err.at(&loc, origin))
    }
}

macro_rules! integers {
    ($($method:ident $visit:ident $ty:ty;)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            let NodeDe { node, loc, origin } = self;
            let wanted =
                || whole_number(<$ty>::BITS, <$ty>::MIN != 0, &<$ty>::MIN, &<$ty>::MAX);
            let number = match node {
                Node::Scalar(toml::Value::Integer(n)) => {
                    <$ty>::try_from(n).map_err(|_| DeError::new(format!("expected {}", wanted())))
                }
                Node::Text { raw, .. } => raw
                    .trim()
                    .parse::<$ty>()
                    .map_err(|_| DeError::new(format!("expected {}", wanted()))),
                other => Err(mismatch(&wanted(), &other)),
            };
            number
                .and_then(|n| visitor.$visit(n))
                .map_err(|err| err.at(&loc, origin))
        }
    )*};
}

impl<'de> de::Deserializer<'de> for NodeDe<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node {
            Node::Table { .. } => self.table(visitor),
            Node::Array(_) => self.array(visitor),
            Node::Scalar(scalar) => {
                let result = match scalar {
                    toml::Value::String(text) => visitor.visit_string(text),
                    toml::Value::Integer(n) => visitor.visit_i64(n),
                    toml::Value::Float(n) => visitor.visit_f64(n),
                    toml::Value::Boolean(b) => visitor.visit_bool(b),
                    toml::Value::Datetime(when) => visitor.visit_string(when.to_string()),
                    toml::Value::Array(_) | toml::Value::Table(_) => {
                        Err(DeError::new("a nested value was not read as a node"))
                    }
                };
                result.map_err(|err| err.at(&self.loc, self.origin))
            }
            // An override's type is unknown until a field asks: as written is the only
            // reading that loses nothing.
            Node::Text { raw, .. } => visitor
                .visit_string::<DeError>(raw)
                .map_err(|err| err.at(&self.loc, self.origin)),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let NodeDe { node, loc, origin } = self;
        let result = match node {
            Node::Scalar(toml::Value::Boolean(b)) => visitor.visit_bool(b),
            Node::Text { raw, .. } => match raw.trim() {
                "true" => visitor.visit_bool(true),
                "false" => visitor.visit_bool(false),
                _ => Err(DeError::new("expected true or false")),
            },
            other => Err(mismatch("true or false", &other)),
        };
        result.map_err(|err| err.at(&loc, origin))
    }

    integers! {
        deserialize_i8 visit_i8 i8;
        deserialize_i16 visit_i16 i16;
        deserialize_i32 visit_i32 i32;
        deserialize_i64 visit_i64 i64;
        deserialize_i128 visit_i128 i128;
        deserialize_u8 visit_u8 u8;
        deserialize_u16 visit_u16 u16;
        deserialize_u32 visit_u32 u32;
        deserialize_u64 visit_u64 u64;
        deserialize_u128 visit_u128 u128;
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let NodeDe { node, loc, origin } = self;
        let number = match node {
            Node::Scalar(toml::Value::Float(n)) => Ok(n),
            // TOML writes `cpus = 4` for a whole number of CPUs; i64 to f64 rounds only
            // beyond 2^53, far past any setting.
            Node::Scalar(toml::Value::Integer(n)) => Ok(n as f64),
            Node::Text { raw, .. } => raw
                .trim()
                .parse::<f64>()
                .map_err(|_| DeError::new("expected a number")),
            other => Err(mismatch("a number", &other)),
        };
        number
            .and_then(|n| visitor.visit_f64(n))
            .map_err(|err| err.at(&loc, origin))
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let NodeDe { node, loc, origin } = self;
        let single = |text: &str| {
            let mut chars = text.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => Some(c),
                _ => None,
            }
        };
        let result = match node {
            Node::Scalar(toml::Value::String(text)) | Node::Text { raw: text, .. } => {
                match single(&text) {
                    Some(c) => visitor.visit_char(c),
                    None => Err(DeError::new("expected a single character")),
                }
            }
            other => Err(mismatch("a single character", &other)),
        };
        result.map_err(|err| err.at(&loc, origin))
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.text("a string", visitor)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.text("a string", visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_any(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_any(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        // TOML has no null: a key that is there is `Some`, one left out is `None`.
        let (loc, origin) = (self.loc.clone(), self.origin);
        visitor.visit_some(self).map_err(|err| err.at(&loc, origin))
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_any(visitor)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_any(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let (loc, origin) = (self.loc.clone(), self.origin);
        visitor
            .visit_newtype_struct(self)
            .map_err(|err| err.at(&loc, origin))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.array(visitor)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.array(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.array(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.table(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.table(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let NodeDe { node, loc, origin } = self;
        let result = match node {
            Node::Scalar(toml::Value::String(text)) | Node::Text { raw: text, .. } => {
                visitor.visit_enum(IntoDeserializer::<DeError>::into_deserializer(text))
            }
            Node::Table { entries, .. } if entries.len() == 1 => match entries.into_iter().next() {
                Some((variant, node)) => visitor.visit_enum(VariantNode {
                    value_loc: loc.child(&variant, &node),
                    variant,
                    node,
                    loc: loc.clone(),
                    origin,
                }),
                None => Err(DeError::new("expected a variant name")),
            },
            other => Err(mismatch("a variant name", &other)),
        };
        result.map_err(|err| err.at(&loc, origin))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.text("a name", visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

struct TableAccess<'o> {
    entries: btree_map::IntoIter<String, Node>,
    loc: Loc,
    origin: &'o str,
    value: Option<NodeDe<'o>>,
}

impl<'de, 'o> de::MapAccess<'de> for TableAccess<'o> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((key, node)) = self.entries.next() else {
            return Ok(None);
        };
        let loc = self.loc.child(&key, &node);
        // A misspelt key in the file is reported in its table (the message names the key);
        // one from an override, by its variable, which is what the operator has to fix.
        let key_loc = if loc.in_file() {
            self.loc.clone()
        } else {
            loc.clone()
        };
        self.value = Some(NodeDe::new(node, loc, self.origin));
        let key = Node::Text {
            raw: key,
            variable: None,
        };
        seed.deserialize(NodeDe::new(key, key_loc, self.origin))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        match self.value.take() {
            Some(value) => seed.deserialize(value),
            None => Err(DeError::new("a value was asked for before its key")),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

struct ArrayAccess<'o> {
    items: std::iter::Enumerate<std::vec::IntoIter<Node>>,
    loc: Loc,
    origin: &'o str,
}

impl<'de> de::SeqAccess<'de> for ArrayAccess<'_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.items.next() {
            Some((index, node)) => seed
                .deserialize(NodeDe::new(node, self.loc.element(index), self.origin))
                .map(Some),
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

/// An enum written as a one-key table, `{ variant = value }`, as TOML writes enums with data.
struct VariantNode<'o> {
    variant: String,
    node: Node,
    loc: Loc,
    value_loc: Loc,
    origin: &'o str,
}

impl<'de, 'o> de::EnumAccess<'de> for VariantNode<'o> {
    type Error = DeError;
    type Variant = NodeDe<'o>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, NodeDe<'o>), DeError> {
        let name = Node::Text {
            raw: self.variant,
            variable: None,
        };
        let variant = seed.deserialize(NodeDe::new(name, self.loc, self.origin))?;
        Ok((variant, NodeDe::new(self.node, self.value_loc, self.origin)))
    }
}

impl<'de> de::VariantAccess<'de> for NodeDe<'_> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        Err(DeError::new("expected the variant's name alone").at(&self.loc, self.origin))
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        self.array(visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.table(visitor)
    }
}
