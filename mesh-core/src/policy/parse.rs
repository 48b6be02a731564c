//! YAML → [`AuthorizationPolicy`], and back.
//!
//! The text is first loaded into a `serde_norway::Value` under a node budget
//! (aliases expand into counted nodes, so an alias bomb stops early), then
//! read into serde models (`serde_path_to_error` names the field a wrong
//! kind of value was found in) and mapped onto the policy model with the
//! checks serde cannot make. Every error names the policy and the exact field
//! path (`rules[0].to[0].operation.ports[1]`), tells L7-only fields apart
//! from typos, and quotes the value that was refused. Paths under `spec` are
//! written without the `spec.` prefix, as in Istio's documentation.

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::Deserialize;
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use serde_norway::{Mapping, Value};
use serde_path_to_error::Segment;

use super::model::{
    Action, ApiVersion, AuthorizationPolicy, IpBlock, Operation, Rule, SourceMatch,
};
use crate::display::{self, MAX_SHOWN_CHARS, Shown, bounded, bounded_len};

/// Largest policy YAML accepted, in bytes.
pub const MAX_INPUT_BYTES: usize = 1 << 20;
/// Most YAML nodes (scalars, lists, maps; aliases count each time they are
/// expanded) one input may hold.
pub const MAX_YAML_NODES: usize = 200_000;
/// Most policies one input may hold.
pub const MAX_POLICIES: usize = 1_000;
/// Most `rules` in one policy.
pub const MAX_RULES: usize = 256;
/// Most entries in one `from` or `to` list.
pub const MAX_RULE_ENTRIES: usize = 64;
/// Most values in one field (`principals`, `ipBlocks`, `ports`, ...).
pub const MAX_VALUES: usize = 1_024;
/// Longest string value, in bytes (the SPIFFE limit for an ID).
pub const MAX_VALUE_LEN: usize = 2_048;
/// Most labels in `selector.matchLabels`.
pub const MAX_SELECTOR_LABELS: usize = 64;

/// Bytes of a YAML library error a message keeps (room for a key shown by
/// [`Shown`] in our own `duplicate key` error).
const YAML_MESSAGE_BYTES: usize = 1024;
/// Longest plain field name a path shows as it is (a Kubernetes label key:
/// 253-byte prefix, `/`, 63-byte name); longer or unusual keys are shown
/// quoted and bounded.
const MAX_PLAIN_KEY: usize = 317;

/// Longest message a [`PolicyError`] prints: where (`policy <ns>/<name>`,
/// each at most 253 bytes), the field path (which may show one key,
/// bounded), one value shown bounded, and the fixed text; or where and a
/// YAML library message cut to a bound.
pub const MAX_ERROR_LEN: usize = 1024 + 2 * bounded_len(MAX_SHOWN_CHARS);

const KIND: &str = "AuthorizationPolicy";

/// Why policy YAML was refused. Every variant names where (`location`: the
/// policy as `policy <namespace>/<name>`, or `document N` before its name is
/// known) and what (`path`, the field), and quotes the refused value once,
/// escaped once and bounded ([`Shown`]): the YAML may come from anyone who
/// can write a policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy YAML is {len} bytes, more than the limit of {limit} bytes")]
    InputTooLarge { len: usize, limit: usize },
    #[error("policy YAML holds more than {limit} policies")]
    TooManyPolicies { limit: usize },
    #[error("{location}: invalid YAML: {message}")]
    Yaml { location: String, message: String },
    #[error("{location}: {path}: L7 fields are not supported; sockmesh enforces L4 only")]
    L7Field { location: String, path: String },
    #[error("{location}: {path}: {reason}")]
    Unsupported {
        location: String,
        path: String,
        reason: String,
    },
    #[error("{location}: {path}: unknown field; expected one of: {expected}")]
    UnknownField {
        location: String,
        path: String,
        expected: String,
    },
    #[error("{location}: {path}: invalid value {value}: {reason}")]
    InvalidValue {
        location: String,
        path: String,
        value: Shown,
        reason: String,
    },
    #[error("{location}: {path}: {reason}")]
    Invalid {
        location: String,
        path: String,
        reason: String,
    },
    #[error("{location}: {path}: {count} entries, more than the limit of {limit}")]
    TooMany {
        location: String,
        path: String,
        count: usize,
        limit: usize,
    },
    #[error("policy {namespace}/{name}: defined more than once")]
    Duplicate { namespace: String, name: String },
    #[error("cannot print policies as YAML: {message}")]
    Print { message: String },
}

impl PolicyError {
    /// Longest message a policy error prints (see [`MAX_ERROR_LEN`]).
    pub const MAX_MESSAGE_LEN: usize = MAX_ERROR_LEN;

    /// Checks this error's message, refusing `yaml`, against
    /// [`display::check_message`]: at most [`Self::MAX_MESSAGE_LEN`] bytes,
    /// no control character, nothing escaped twice. The policy fuzz target
    /// asserts it on every refusal.
    pub fn check_message(&self, yaml: &str) -> Result<(), String> {
        // YAML decodes escapes (`\x5c`), so a value's backslash run is bounded
        // by the input's backslash count, not its longest run.
        let backslashes = yaml.bytes().filter(|b| *b == b'\\').count();
        display::check_message(&self.to_string(), MAX_ERROR_LEN, backslashes)
    }
}

/// Parses `AuthorizationPolicy` documents: one, several separated by `---`,
/// a YAML list of them, or a Kubernetes `kind: List` with `items`. Empty
/// documents are skipped. Refuses the whole input on the first error.
pub fn parse_policies(yaml: &str) -> Result<Vec<AuthorizationPolicy>, PolicyError> {
    if yaml.len() > MAX_INPUT_BYTES {
        return Err(PolicyError::InputTooLarge {
            len: yaml.len(),
            limit: MAX_INPUT_BYTES,
        });
    }
    let budget = Cell::new(MAX_YAML_NODES);
    let mut policies = Vec::new();
    let mut seen = HashSet::new();
    for (index, document) in serde_norway::Deserializer::from_str(yaml).enumerate() {
        let doc = index + 1;
        let value = Bounded { left: &budget }
            .deserialize(document)
            .map_err(|err| PolicyError::Yaml {
                location: format!("document {doc}"),
                // libyaml and serde may quote the input themselves.
                message: display::text(&err.to_string(), YAML_MESSAGE_BYTES),
            })?;
        match &value {
            Value::Null => {}
            Value::Sequence(items) => {
                for (i, item) in items.iter().enumerate() {
                    let location = format!("document {doc}, item {}", i + 1);
                    push(&mut policies, &mut seen, parse_document(item, location)?)?;
                }
            }
            Value::Mapping(map) if is_list(map) => {
                let location = format!("document {doc}");
                let ctx = Ctx::new(location.clone());
                let list: ListDoc = read(&ctx, &value, LIST_FIELDS)?;
                check_extra(&ctx, &list.extra, "", "", LIST_FIELDS)?;
                for (i, item) in items(&ctx, list.items, "items")?.iter().enumerate() {
                    let location = format!("{location}, items[{i}]");
                    push(&mut policies, &mut seen, parse_document(item, location)?)?;
                }
            }
            _ => push(
                &mut policies,
                &mut seen,
                parse_document(&value, format!("document {doc}"))?,
            )?,
        }
    }
    Ok(policies)
}

fn is_list(map: &Mapping) -> bool {
    matches!(map.get("kind"), Some(Value::String(k)) if k == "List")
}

fn push(
    policies: &mut Vec<AuthorizationPolicy>,
    seen: &mut HashSet<(String, String)>,
    policy: AuthorizationPolicy,
) -> Result<(), PolicyError> {
    if policies.len() >= MAX_POLICIES {
        return Err(PolicyError::TooManyPolicies {
            limit: MAX_POLICIES,
        });
    }
    if !seen.insert((policy.namespace.clone(), policy.name.clone())) {
        return Err(PolicyError::Duplicate {
            namespace: policy.namespace,
            name: policy.name,
        });
    }
    policies.push(policy);
    Ok(())
}

// ---------------------------------------------------------------------------
// Field tables.

const TOP_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];
/// Standard Kubernetes object metadata; only `name` and `namespace` are used,
/// the rest is accepted so `kubectl get -o yaml` output can be fed back.
const METADATA_FIELDS: &[&str] = &[
    "name",
    "namespace",
    "labels",
    "annotations",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "finalizers",
    "ownerReferences",
];
const SPEC_FIELDS: &[&str] = &["selector", "action", "rules"];
const SPEC_L7: &[&str] = &["provider"];
const TARGET_REF: &str = "not supported: sockmesh applies policies to workloads chosen by selector.matchLabels, not to Services or Gateways";
const SPEC_UNSUPPORTED: &[(&str, &str)] = &[("targetRef", TARGET_REF), ("targetRefs", TARGET_REF)];
const SELECTOR_FIELDS: &[&str] = &["matchLabels"];
const RULE_FIELDS: &[&str] = &["from", "to"];
const RULE_L7: &[&str] = &["when"];
const FROM_FIELDS: &[&str] = &["source"];
const TO_FIELDS: &[&str] = &["operation"];
const SOURCE_FIELDS: &[&str] = &[
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
];
const SOURCE_L7: &[&str] = &[
    "requestPrincipals",
    "notRequestPrincipals",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
];
const SERVICE_ACCOUNTS: &str = "not supported yet; write principals: [\"<trust-domain>/ns/<namespace>/sa/<service-account>\"] instead";
const SOURCE_UNSUPPORTED: &[(&str, &str)] = &[
    ("serviceAccounts", SERVICE_ACCOUNTS),
    ("notServiceAccounts", SERVICE_ACCOUNTS),
];
const OPERATION_FIELDS: &[&str] = &["ports", "notPorts"];
const OPERATION_L7: &[&str] = &[
    "hosts",
    "notHosts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
];

// ---------------------------------------------------------------------------
// The models: what serde reads from the loaded YAML. Every mapping keeps the
// keys it does not know (`extra`), so they are told apart afterwards: an L7
// field, a field not supported, or a typo. Leaves refuse a wrong kind of
// value with our own text, and `serde_path_to_error` says where.

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PolicyDoc {
    api_version: Option<Text>,
    kind: Option<Text>,
    metadata: Option<Map<MetadataDoc>>,
    spec: Option<Map<SpecDoc>>,
    #[expect(dead_code, reason = "accepted as Kubernetes writes it, never read")]
    status: Option<IgnoredAny>,
    #[serde(flatten)]
    extra: Extra,
}

/// Standard Kubernetes object metadata: only `name` and `namespace` are
/// read.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
#[expect(dead_code, reason = "the other fields are accepted, never read")]
struct MetadataDoc {
    name: Option<Text>,
    namespace: Option<Text>,
    labels: Option<IgnoredAny>,
    annotations: Option<IgnoredAny>,
    uid: Option<IgnoredAny>,
    resource_version: Option<IgnoredAny>,
    generation: Option<IgnoredAny>,
    creation_timestamp: Option<IgnoredAny>,
    managed_fields: Option<IgnoredAny>,
    finalizers: Option<IgnoredAny>,
    owner_references: Option<IgnoredAny>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize)]
struct SpecDoc {
    selector: Option<Map<SelectorDoc>>,
    action: Option<Text>,
    rules: Option<Seq<Option<Map<RuleDoc>>, MAX_RULES>>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SelectorDoc {
    match_labels: Option<Labels>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize)]
struct RuleDoc {
    from: Option<Seq<Map<FromDoc>, MAX_RULE_ENTRIES>>,
    to: Option<Seq<Map<ToDoc>, MAX_RULE_ENTRIES>>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize)]
struct FromDoc {
    source: Option<Map<SourceDoc>>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize)]
struct ToDoc {
    operation: Option<Map<OperationDoc>>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SourceDoc {
    principals: Option<Seq<Text, MAX_VALUES>>,
    not_principals: Option<Seq<Text, MAX_VALUES>>,
    namespaces: Option<Seq<Text, MAX_VALUES>>,
    not_namespaces: Option<Seq<Text, MAX_VALUES>>,
    ip_blocks: Option<Seq<Text, MAX_VALUES>>,
    not_ip_blocks: Option<Seq<Text, MAX_VALUES>>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OperationDoc {
    ports: Option<Seq<Scalar, MAX_VALUES>>,
    not_ports: Option<Seq<Scalar, MAX_VALUES>>,
    #[serde(flatten)]
    extra: Extra,
}

/// A Kubernetes `kind: List`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
#[expect(dead_code, reason = "only items is read")]
struct ListDoc {
    api_version: Option<IgnoredAny>,
    kind: Option<IgnoredAny>,
    items: Option<Seq<Value, MAX_POLICIES>>,
    metadata: Option<IgnoredAny>,
    #[serde(flatten)]
    extra: Extra,
}

/// The kind of value a visitor was given, as an error names it.
const NULL: &str = "null";
const BOOLEAN: &str = "a boolean";
const NUMBER: &str = "a number";
const STRING: &str = "a string";
const LIST: &str = "a list";
const MAPPING: &str = "a mapping";
/// How every leaf's refusal of a wrong kind of value starts.
const EXPECTED: &str = "expected a ";

/// The `visit_*` methods of a leaf's visitor that refuse a kind of value
/// with `Self::refuse(kind)`: the kind as an error names it.
macro_rules! refuse {
    ($($visit:ident),*) => { $(refuse!(@ $visit);)* };
    (@ bool) => { fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> { Self::refuse(BOOLEAN) } };
    (@ i64) => { fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> { Self::refuse(NUMBER) } };
    (@ u64) => { fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> { Self::refuse(NUMBER) } };
    (@ f64) => { fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> { Self::refuse(NUMBER) } };
    (@ str) => { fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> { Self::refuse(STRING) } };
    (@ unit) => { fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> { Self::refuse(NULL) } };
    (@ none) => { fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> { Self::refuse(NULL) } };
    (@ seq) => { fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> { Self::refuse(LIST) } };
    (@ map) => { fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> { Self::refuse(MAPPING) } };
}

fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// A string; any other kind of value is refused.
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl V {
            fn refuse<E: de::Error>(found: &str) -> Result<Text, E> {
                Err(E::custom(format_args!("expected a string, found {found}")))
            }
        }
        impl<'de> Visitor<'de> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text, E> {
                Ok(Text(v))
            }
            refuse!(bool, i64, u64, f64, unit, none, seq, map);
        }
        deserializer.deserialize_any(V)
    }
}

/// Any scalar, kept with its text for a message that quotes it: a port, a
/// label key or value, a key of a mapping. A list or a mapping is kept as
/// its kind.
enum Scalar {
    Str(String),
    Other {
        kind: &'static str,
        text: String,
        number: Option<u64>,
    },
}

impl Scalar {
    fn other(kind: &'static str, text: impl Into<String>) -> Self {
        Scalar::Other {
            kind,
            text: text.into(),
            number: None,
        }
    }

    /// As an error quotes it.
    fn text(&self) -> &str {
        match self {
            Scalar::Str(s) => s,
            Scalar::Other { text, .. } => text,
        }
    }

    fn as_str(&self) -> Result<&str, &'static str> {
        match self {
            Scalar::Str(s) => Ok(s),
            Scalar::Other { kind, .. } => Err(kind),
        }
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar::Str(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::other(BOOLEAN, v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Other {
                    kind: NUMBER,
                    text: v.to_string(),
                    number: u64::try_from(v).ok(),
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::Other {
                    kind: NUMBER,
                    text: v.to_string(),
                    number: Some(v),
                })
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::other(
                    NUMBER,
                    serde_norway::Number::from(v).to_string(),
                ))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::other(NULL, NULL))
            }
            fn visit_none<E: de::Error>(self) -> Result<Scalar, E> {
                self.visit_unit()
            }
            fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Scalar, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Scalar, A::Error> {
                drain_seq(seq)?;
                Ok(Scalar::other(LIST, LIST))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Scalar, A::Error> {
                drain_map(map)?;
                Ok(Scalar::other(MAPPING, MAPPING))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A list of at most `MAX` items. A longer one is kept as its length only,
/// its items not read.
enum Seq<T, const MAX: usize> {
    Items(Vec<T>),
    TooMany(usize),
}

impl<'de, T: Deserialize<'de>, const MAX: usize> Deserialize<'de> for Seq<T, MAX> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<T, const MAX: usize>(std::marker::PhantomData<T>);
        impl<T, const MAX: usize> V<T, MAX> {
            fn refuse<E: de::Error>(found: &str) -> Result<Seq<T, MAX>, E> {
                Err(E::custom(format_args!("expected a list, found {found}")))
            }
        }
        impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for V<T, MAX> {
            type Value = Seq<T, MAX>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                if let Some(len) = seq.size_hint().filter(|len| *len > MAX) {
                    drain_seq(seq)?;
                    return Ok(Seq::TooMany(len));
                }
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    if items.len() == MAX {
                        return Ok(Seq::TooMany(MAX + 1));
                    }
                    items.push(item);
                }
                Ok(Seq::Items(items))
            }
            refuse!(bool, i64, u64, f64, str, unit, map);
        }
        deserializer.deserialize_any(V(std::marker::PhantomData))
    }
}

/// A mapping read as `T`; any other kind of value (a list too, which serde
/// would read as a struct's fields in order) is refused.
struct Map<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Map<T> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<T> V<T> {
            fn refuse<E: de::Error>(found: &str) -> Result<Map<T>, E> {
                Err(E::custom(format_args!("expected a mapping, found {found}")))
            }
        }
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Map<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Map)
            }
            refuse!(bool, i64, u64, f64, str, unit, seq);
        }
        deserializer.deserialize_any(V(std::marker::PhantomData))
    }
}

/// `selector.matchLabels`: keys and values as written, checked afterwards
/// (a label value that is not a string is quoted in the refusal).
enum Labels {
    Entries(Vec<(Scalar, Scalar)>),
    TooMany(usize),
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl V {
            fn refuse<E: de::Error>(found: &str) -> Result<Labels, E> {
                Err(E::custom(format_args!("expected a mapping, found {found}")))
            }
        }
        impl<'de> Visitor<'de> for V {
            type Value = Labels;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Labels, A::Error> {
                if let Some(len) = map.size_hint().filter(|len| *len > MAX_SELECTOR_LABELS) {
                    drain_map(map)?;
                    return Ok(Labels::TooMany(len));
                }
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    if entries.len() == MAX_SELECTOR_LABELS {
                        return Ok(Labels::TooMany(MAX_SELECTOR_LABELS + 1));
                    }
                    entries.push(entry);
                }
                Ok(Labels::Entries(entries))
            }
            refuse!(bool, i64, u64, f64, str, unit, seq);
        }
        deserializer.deserialize_any(V)
    }
}

/// The keys of a mapping its model does not name, in order.
#[derive(Default)]
struct Extra(Vec<Scalar>);

impl<'de> Deserialize<'de> for Extra {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Extra;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Extra, A::Error> {
                let mut keys = Vec::new();
                while let Some(key) = map.next_key()? {
                    map.next_value::<IgnoredAny>()?;
                    keys.push(key);
                }
                Ok(Extra(keys))
            }
        }
        deserializer.deserialize_map(V)
    }
}

// ---------------------------------------------------------------------------
// From the models to the policy, with the checks serde cannot make.

/// Reads `T` from `value`; a refusal names the field path (without the
/// `spec.` prefix) and, for a mapping with a key that is not a string, the
/// key.
fn read<T: DeserializeOwned>(ctx: &Ctx, value: &Value, root: Fields) -> Result<T, PolicyError> {
    serde_path_to_error::deserialize(value).or_else(|err| {
        let segments: Vec<&Segment> = err.path().iter().collect();
        let path = path_text(&segments);
        let message = err.inner().to_string();
        // As the keys of a mapping are checked before its values, a key no
        // model names, on the way to the error or where it is, is the first refusal.
        for end in 0..=segments.len() {
            if let Some(Value::Mapping(map)) = lookup(value, &segments[..end])
                && let Some(fields) = fields_at(root, &segments[..end])
            {
                check_keys(ctx, map, &segments[..end], fields)?;
            }
        }
        // Our leaves' messages hold no input: as they are.
        if message.starts_with(EXPECTED) {
            return Err(ctx.invalid(&path, message));
        }
        // serde reads a mapping's keys as names: a key that is not a string
        // fails there, so say which.
        if let Some(Value::Mapping(map)) = lookup(value, &segments)
            && let Some(key) = map.keys().find(|k| !k.is_string())
        {
            return Err(non_string_key(ctx, &path, key));
        }
        // serde's may quote input: escaped, cut.
        Err(ctx.invalid(&path, display::text(&message, YAML_MESSAGE_BYTES)))
    })
}

fn non_string_key(ctx: &Ctx, display: &str, key: &Value) -> PolicyError {
    ctx.invalid(
        display,
        format!(
            "keys must be strings, found {} {}",
            kind_of(key),
            Shown::new(&scalar_text(key))
        ),
    )
}

/// The fields a model names, and those it refuses with their own message.
#[derive(Clone, Copy)]
struct Fields {
    known: &'static [&'static str],
    l7: &'static [&'static str],
    unsupported: &'static [(&'static str, &'static str)],
}

impl Fields {
    const fn plain(known: &'static [&'static str]) -> Self {
        Fields {
            known,
            l7: &[],
            unsupported: &[],
        }
    }
}

const TOP: Fields = Fields::plain(TOP_FIELDS);
const LIST_FIELDS: Fields = Fields::plain(&["apiVersion", "kind", "items", "metadata"]);
const METADATA: Fields = Fields::plain(METADATA_FIELDS);
const SPEC: Fields = Fields {
    known: SPEC_FIELDS,
    l7: SPEC_L7,
    unsupported: SPEC_UNSUPPORTED,
};
const SELECTOR: Fields = Fields::plain(SELECTOR_FIELDS);
const RULE: Fields = Fields {
    known: RULE_FIELDS,
    l7: RULE_L7,
    unsupported: &[],
};
const FROM: Fields = Fields::plain(FROM_FIELDS);
const TO: Fields = Fields::plain(TO_FIELDS);
const SOURCE: Fields = Fields {
    known: SOURCE_FIELDS,
    l7: SOURCE_L7,
    unsupported: SOURCE_UNSUPPORTED,
};
const OPERATION: Fields = Fields {
    known: OPERATION_FIELDS,
    l7: OPERATION_L7,
    unsupported: &[],
};

/// The model of the mapping at `segments` in a document read as `root`.
fn fields_at(root: Fields, segments: &[&Segment]) -> Option<Fields> {
    let names: Vec<Option<&str>> = segments
        .iter()
        .map(|s| match s {
            Segment::Map { key } => Some(key.as_str()),
            _ => None,
        })
        .collect();
    Some(match names.as_slice() {
        [] => root,
        [Some("metadata")] => METADATA,
        [Some("spec")] => SPEC,
        [Some("spec"), Some("selector")] => SELECTOR,
        [Some("spec"), Some("rules"), None] => RULE,
        [Some("spec"), Some("rules"), None, Some("from"), None] => FROM,
        [Some("spec"), Some("rules"), None, Some("to"), None] => TO,
        [.., Some("from"), None, Some("source")] => SOURCE,
        [.., Some("to"), None, Some("operation")] => OPERATION,
        _ => return None,
    })
}

/// The keys of `map` checked against its model, in order, as
/// [`check_extra`] checks the ones serde kept.
fn check_keys(
    ctx: &Ctx,
    map: &Mapping,
    segments: &[&Segment],
    fields: Fields,
) -> Result<(), PolicyError> {
    let display = path_text(segments);
    // Fields under `spec` are written without the prefix.
    let path = if matches!(segments, [Segment::Map { key }] if key == "spec") {
        String::new()
    } else {
        display.clone()
    };
    for key in map.keys() {
        let Value::String(name) = key else {
            return Err(non_string_key(ctx, &display, key));
        };
        if !fields.known.contains(&name.as_str()) {
            let extra = Extra(vec![Scalar::Str(name.clone())]);
            return check_extra(ctx, &extra, &path, &display, fields);
        }
    }
    Ok(())
}

/// A path as errors write it: `rules[0].from[1]`; `spec` itself keeps its
/// name, fields under it drop the prefix.
fn path_text(segments: &[&Segment]) -> String {
    let skip = match segments {
        [Segment::Map { key }, _, ..] if key == "spec" => 1,
        _ => 0,
    };
    let mut out = String::new();
    for segment in &segments[skip..] {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => out = join(&out, key),
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    out
}

fn lookup<'v>(value: &'v Value, segments: &[&Segment]) -> Option<&'v Value> {
    segments.iter().try_fold(value, |v, segment| match segment {
        Segment::Seq { index } => v.get(index),
        Segment::Map { key } => v.get(key.as_str()),
        Segment::Enum { .. } | Segment::Unknown => Some(v),
    })
}

/// Refuses the first key of `extra`: as an L7 field, as a field not
/// supported (with the reason), or as unknown (with the known ones).
fn check_extra(
    ctx: &Ctx,
    extra: &Extra,
    path: &str,
    display: &str,
    fields: Fields,
) -> Result<(), PolicyError> {
    let Some(key) = extra.0.first() else {
        return Ok(());
    };
    let Scalar::Str(key) = key else {
        return Err(ctx.invalid(
            display,
            format!(
                "keys must be strings, found {} {}",
                key.as_str().err().unwrap_or(STRING),
                Shown::new(key.text())
            ),
        ));
    };
    let key_path = join(path, key);
    if fields.l7.contains(&key.as_str()) {
        return Err(PolicyError::L7Field {
            location: ctx.location.clone(),
            path: key_path,
        });
    }
    if let Some((_, reason)) = fields.unsupported.iter().find(|(k, _)| k == key) {
        return Err(ctx.unsupported(&key_path, *reason));
    }
    Err(PolicyError::UnknownField {
        location: ctx.location.clone(),
        path: key_path,
        expected: fields.known.join(", "),
    })
}

fn required(ctx: &Ctx, text: Option<Text>, path: &str) -> Result<String, PolicyError> {
    text.map(|t| t.0)
        .ok_or_else(|| ctx.invalid(path, "required"))
}

/// The items of a list field, refused if there are too many.
fn items<T, const MAX: usize>(
    ctx: &Ctx,
    seq: Option<Seq<T, MAX>>,
    path: &str,
) -> Result<Vec<T>, PolicyError> {
    match seq {
        None => Ok(Vec::new()),
        Some(Seq::Items(items)) => Ok(items),
        Some(Seq::TooMany(count)) => Err(ctx.too_many(path, count, MAX)),
    }
}

fn parse_document(value: &Value, fallback: String) -> Result<AuthorizationPolicy, PolicyError> {
    let ctx = Ctx::new(policy_location(value).unwrap_or(fallback));
    if !matches!(value, Value::Mapping(_)) {
        return Err(ctx.invalid(
            "",
            format!(
                "expected an AuthorizationPolicy mapping (or a list of them), found {}",
                kind_of(value)
            ),
        ));
    }
    let doc: PolicyDoc = read(&ctx, value, TOP)?;
    check_extra(&ctx, &doc.extra, "", "", TOP)?;

    let kind = required(&ctx, doc.kind, "kind")?;
    if kind != KIND {
        return Err(ctx.invalid_value("kind", &kind, format!("expected {KIND}")));
    }
    let api = required(&ctx, doc.api_version, "apiVersion")?;
    let api_version = ApiVersion::parse(&api).ok_or_else(|| {
        let all: Vec<&str> = ApiVersion::ALL.iter().map(|v| v.as_str()).collect();
        ctx.invalid_value(
            "apiVersion",
            &api,
            format!("expected one of {}", all.join(", ")),
        )
    })?;

    let Some(Map(metadata)) = doc.metadata else {
        return Err(ctx.invalid("metadata", "required (with name and namespace)"));
    };
    check_extra(&ctx, &metadata.extra, "metadata", "metadata", METADATA)?;
    let name = required(&ctx, metadata.name, "metadata.name")?;
    if let Err(reason) = dns1123_subdomain(&name) {
        return Err(ctx.invalid_value("metadata.name", &name, reason));
    }
    let namespace = required(&ctx, metadata.namespace, "metadata.namespace")?;
    if let Err(reason) = dns1123_label(&namespace) {
        return Err(ctx.invalid_value("metadata.namespace", &namespace, reason));
    }

    let mut policy = AuthorizationPolicy::new(namespace, name, Action::Allow);
    policy.api_version = api_version;
    // A missing or null spec is an empty one, as in Kubernetes.
    let Some(Map(spec)) = doc.spec else {
        return Ok(policy);
    };
    check_extra(&ctx, &spec.extra, "", "spec", SPEC)?;

    if let Some(Text(action)) = spec.action {
        policy.action = match action.as_str() {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            "CUSTOM" | "AUDIT" => {
                return Err(ctx.unsupported(
                    "action",
                    format!("{action} is not supported; sockmesh enforces L4 only (ALLOW or DENY)"),
                ));
            }
            other => return Err(ctx.invalid_value("action", other, "expected ALLOW or DENY")),
        };
    }

    if let Some(Map(selector)) = spec.selector {
        check_extra(&ctx, &selector.extra, "selector", "selector", SELECTOR)?;
        policy.selector = Some(parse_labels(&ctx, selector.match_labels)?);
    }

    for (i, rule) in items(&ctx, spec.rules, "rules")?.into_iter().enumerate() {
        policy
            .rules
            .push(parse_rule(&ctx, rule, &format!("rules[{i}]"))?);
    }
    if policy.action == Action::Deny && policy.rules.is_empty() {
        return Err(ctx.invalid(
            "rules",
            "a DENY policy without rules never matches; write `rules: [{}]` to deny every connection",
        ));
    }
    Ok(policy)
}

fn parse_labels(
    ctx: &Ctx,
    labels: Option<Labels>,
) -> Result<BTreeMap<String, String>, PolicyError> {
    const PATH: &str = "selector.matchLabels";
    let entries = match labels {
        None => return Ok(BTreeMap::new()),
        Some(Labels::TooMany(count)) => {
            return Err(ctx.too_many(PATH, count, MAX_SELECTOR_LABELS));
        }
        Some(Labels::Entries(entries)) => entries,
    };
    let mut out = BTreeMap::new();
    for (key, value) in entries {
        let key = key
            .as_str()
            .map_err(|found| ctx.invalid(PATH, format!("expected a string, found {found}")))?;
        // The key is the value refused: shown once, as the value.
        check_label(ctx, PATH, key, "label key")?;
        let path = join(PATH, key);
        let value = value.as_str().map_err(|_| {
            ctx.invalid_value(
                &path,
                value.text(),
                "label values must be strings; quote it",
            )
        })?;
        if !value.is_empty() {
            check_label(ctx, &path, value, "label value")?;
        }
        out.insert(key.to_owned(), value.to_owned());
    }
    Ok(out)
}

fn parse_rule(ctx: &Ctx, rule: Option<Map<RuleDoc>>, path: &str) -> Result<Rule, PolicyError> {
    let Some(Map(doc)) = rule else {
        return Err(ctx.invalid(
            path,
            "empty rule; write `{}` for a rule that matches every connection",
        ));
    };
    check_extra(ctx, &doc.extra, path, path, RULE)?;
    let mut rule = Rule::default();
    if let Some(from) = doc.from {
        let path = format!("{path}.from");
        let entries = items(ctx, Some(from), &path)?;
        if entries.is_empty() {
            return Err(ctx.invalid(&path, "must not be empty; omit `from` to match any source"));
        }
        for (i, Map(entry)) in entries.into_iter().enumerate() {
            let path = format!("{path}[{i}]");
            check_extra(ctx, &entry.extra, &path, &path, FROM)?;
            let path = format!("{path}.source");
            let Some(Map(source)) = entry.source else {
                return Err(ctx.invalid(&path, "required"));
            };
            rule.from.push(parse_source(ctx, source, &path)?);
        }
    }
    if let Some(to) = doc.to {
        let path = format!("{path}.to");
        let entries = items(ctx, Some(to), &path)?;
        if entries.is_empty() {
            return Err(ctx.invalid(&path, "must not be empty; omit `to` to match any port"));
        }
        for (i, Map(entry)) in entries.into_iter().enumerate() {
            let path = format!("{path}[{i}]");
            check_extra(ctx, &entry.extra, &path, &path, TO)?;
            let path = format!("{path}.operation");
            let Some(Map(operation)) = entry.operation else {
                return Err(ctx.invalid(&path, "required"));
            };
            rule.to.push(parse_operation(ctx, operation, &path)?);
        }
    }
    Ok(rule)
}

/// The values of a list field of strings with their paths (`path.key[i]`),
/// each a string not empty and not too long.
fn values<const MAX: usize>(
    ctx: &Ctx,
    seq: Option<Seq<Text, MAX>>,
    path: &str,
    key: &str,
) -> Result<Vec<(String, String)>, PolicyError> {
    let field_path = join(path, key);
    let mut out = Vec::new();
    for (i, Text(text)) in items(ctx, seq, &field_path)?.into_iter().enumerate() {
        let value_path = format!("{field_path}[{i}]");
        if text.len() > MAX_VALUE_LEN {
            return Err(ctx.invalid_value(
                &value_path,
                &text,
                format!("longer than the limit of {MAX_VALUE_LEN} bytes"),
            ));
        }
        if text.is_empty() {
            return Err(ctx.invalid_value(&value_path, &text, "empty value"));
        }
        out.push((value_path, text));
    }
    Ok(out)
}

fn parse_source(ctx: &Ctx, doc: SourceDoc, path: &str) -> Result<SourceMatch, PolicyError> {
    check_extra(ctx, &doc.extra, path, path, SOURCE)?;
    let patterns = |seq, key: &str, principal: bool| -> Result<Vec<String>, PolicyError> {
        let mut out = Vec::new();
        for (value_path, text) in values(ctx, seq, path, key)? {
            check_pattern(&text, principal)
                .map_err(|reason| ctx.invalid_value(&value_path, &text, reason))?;
            out.push(text);
        }
        Ok(out)
    };
    let ips = |seq, key: &str| -> Result<Vec<IpBlock>, PolicyError> {
        let mut out = Vec::new();
        for (value_path, text) in values(ctx, seq, path, key)? {
            let block = IpBlock::parse(&text).ok_or_else(|| {
                let reason = if text.contains('/') {
                    "malformed CIDR; expected an address and a prefix length such as 10.0.0.0/8 or 2001:db8::/32"
                } else {
                    "malformed IP address; expected an IPv4 or IPv6 address or a CIDR"
                };
                ctx.invalid_value(&value_path, &text, reason)
            })?;
            out.push(block);
        }
        Ok(out)
    };
    let source = SourceMatch {
        principals: patterns(doc.principals, "principals", true)?,
        not_principals: patterns(doc.not_principals, "notPrincipals", true)?,
        namespaces: patterns(doc.namespaces, "namespaces", false)?,
        not_namespaces: patterns(doc.not_namespaces, "notNamespaces", false)?,
        ip_blocks: ips(doc.ip_blocks, "ipBlocks")?,
        not_ip_blocks: ips(doc.not_ip_blocks, "notIpBlocks")?,
    };
    if source.is_empty() {
        return Err(ctx.invalid(
            path,
            format!(
                "must not be empty; set at least one of {}",
                SOURCE_FIELDS.join(", ")
            ),
        ));
    }
    Ok(source)
}

fn parse_operation(ctx: &Ctx, doc: OperationDoc, path: &str) -> Result<Operation, PolicyError> {
    check_extra(ctx, &doc.extra, path, path, OPERATION)?;
    let ports = |seq, key: &str| -> Result<Vec<u16>, PolicyError> {
        let field_path = join(path, key);
        let mut out = Vec::new();
        for (i, value) in items(ctx, seq, &field_path)?.iter().enumerate() {
            out.push(parse_port(ctx, value, &format!("{field_path}[{i}]"))?);
        }
        Ok(out)
    };
    let operation = Operation {
        ports: ports(doc.ports, "ports")?,
        not_ports: ports(doc.not_ports, "notPorts")?,
    };
    if operation.is_empty() {
        return Err(ctx.invalid(path, "must not be empty; set ports or notPorts"));
    }
    Ok(operation)
}

fn parse_port(ctx: &Ctx, value: &Scalar, path: &str) -> Result<u16, PolicyError> {
    const RANGE: &str = "expected a port number from 1 to 65535";
    let number = match value {
        Scalar::Str(s) => {
            let digits = !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
            if digits { s.parse::<u64>().ok() } else { None }
        }
        Scalar::Other { number, .. } => *number,
    };
    let text = value.text();
    match number {
        Some(n @ 1..=65535) => u16::try_from(n).map_err(|_| ctx.invalid_value(path, text, RANGE)),
        Some(_) => Err(ctx.invalid_value(path, text, format!("out of range; {RANGE}"))),
        None => Err(ctx.invalid_value(path, text, format!("not a port number; {RANGE}"))),
    }
}

/// Checks a principal or namespace value: not empty, bounded, no control
/// characters, `*` only alone, as a prefix or as a suffix.
fn check_pattern(value: &str, principal: bool) -> Result<(), &'static str> {
    let body = if principal {
        value.strip_prefix("spiffe://").unwrap_or(value)
    } else {
        value
    };
    if body.is_empty() {
        return Err("empty value");
    }
    if value.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    let stars = body.matches('*').count();
    let ok = stars == 0 || (stars == 1 && (body.starts_with('*') || body.ends_with('*')));
    if !ok {
        return Err(
            "`*` is allowed only alone (\"*\"), as a prefix match (\"foo*\") or as a suffix match (\"*foo\")",
        );
    }
    Ok(())
}

fn check_label(ctx: &Ctx, path: &str, value: &str, what: &str) -> Result<(), PolicyError> {
    if value.is_empty() {
        return Err(ctx.invalid_value(path, value, format!("empty {what}")));
    }
    if value.contains('*') {
        return Err(ctx.invalid_value(path, value, "wildcards are not supported in selectors"));
    }
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ctx.invalid_value(
            path,
            value,
            format!("{what} contains whitespace or a control character"),
        ));
    }
    if value.len() > 317 {
        return Err(ctx.invalid_value(
            path,
            value,
            format!("{what} is longer than Kubernetes allows"),
        ));
    }
    Ok(())
}

/// RFC 1123 subdomain, as Kubernetes checks object names.
fn dns1123_subdomain(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("must not be empty");
    }
    if value.len() > 253 {
        return Err("longer than 253 characters");
    }
    if value.split('.').all(|label| dns1123_label(label).is_ok()) {
        Ok(())
    } else {
        Err(
            "must be a DNS subdomain: lower-case letters, digits, '-' and '.', starting and ending with a letter or digit",
        )
    }
}

/// RFC 1123 label, as Kubernetes checks namespace names.
fn dns1123_label(value: &str) -> Result<(), &'static str> {
    let bytes = value.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if value.is_empty() {
        return Err("must not be empty");
    }
    if value.len() > 63 {
        return Err("longer than 63 characters");
    }
    if bytes.iter().all(|b| alnum(b) || *b == b'-')
        && bytes.first().is_some_and(alnum)
        && bytes.last().is_some_and(alnum)
    {
        Ok(())
    } else {
        Err(
            "must be a DNS label: lower-case letters, digits and '-', starting and ending with a letter or digit",
        )
    }
}

/// `policy <namespace>/<name>` if the document names itself plausibly, so
/// even its first error names the policy.
fn policy_location(value: &Value) -> Option<String> {
    let metadata = value.get("metadata")?;
    let name = metadata.get("name")?.as_str()?;
    let namespace = metadata.get("namespace")?.as_str()?;
    let plain = |s: &str| {
        !s.is_empty() && s.len() <= 253 && s.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
    };
    (plain(name) && plain(namespace)).then(|| format!("policy {namespace}/{name}"))
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// A scalar as text for an error message; collections by their kind.
fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".to_owned(),
        other => kind_of(other).to_owned(),
    }
}

/// `path.key`. A key from the input is shown as it is only if it is plain
/// (printable ASCII, no quote or backslash, not too long); otherwise quoted,
/// escaped once and bounded, like a value.
fn join(path: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key.len() <= MAX_PLAIN_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
    let key = if plain {
        key.to_owned()
    } else {
        bounded(key, MAX_SHOWN_CHARS)
    };
    if path.is_empty() {
        key
    } else {
        format!("{path}.{key}")
    }
}

// ---------------------------------------------------------------------------
// Error building.

struct Ctx {
    location: String,
}

impl Ctx {
    fn new(location: String) -> Self {
        Ctx { location }
    }

    fn invalid(&self, path: &str, reason: impl Into<String>) -> PolicyError {
        PolicyError::Invalid {
            location: self.location.clone(),
            path: if path.is_empty() {
                "(document)".to_owned()
            } else {
                path.to_owned()
            },
            reason: reason.into(),
        }
    }

    fn invalid_value(&self, path: &str, value: &str, reason: impl Into<String>) -> PolicyError {
        PolicyError::InvalidValue {
            location: self.location.clone(),
            path: path.to_owned(),
            value: Shown::new(value),
            reason: reason.into(),
        }
    }

    fn unsupported(&self, path: &str, reason: impl Into<String>) -> PolicyError {
        PolicyError::Unsupported {
            location: self.location.clone(),
            path: path.to_owned(),
            reason: reason.into(),
        }
    }

    fn too_many(&self, path: &str, count: usize, limit: usize) -> PolicyError {
        PolicyError::TooMany {
            location: self.location.clone(),
            path: path.to_owned(),
            count,
            limit,
        }
    }
}

// ---------------------------------------------------------------------------
// Bounded YAML loading.

/// Deserializes any YAML into a `Value`, charging one unit of `left` per
/// node, so the work an input can cause is bounded whatever its aliases.
struct Bounded<'a> {
    left: &'a Cell<usize>,
}

impl Bounded<'_> {
    fn charge<E: de::Error>(&self) -> Result<(), E> {
        match self.left.get().checked_sub(1) {
            Some(left) => {
                self.left.set(left);
                Ok(())
            }
            None => Err(E::custom(format_args!(
                "more than {MAX_YAML_NODES} YAML nodes (aliases count each time they are used)"
            ))),
        }
    }

    fn again(&self) -> Self {
        Bounded { left: self.left }
    }
}

impl<'de> DeserializeSeed<'de> for Bounded<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Bounded<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        Err(E::custom(format_args!("integer {v} is out of range")))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        Err(E::custom(format_args!("integer {v} is out of range")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.charge()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self.again())? {
            items.push(item);
        }
        Ok(Value::Sequence(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.charge()?;
        let mut out = Mapping::new();
        while let Some(key) = map.next_key_seed(self.again())? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "duplicate key {}",
                    Shown::new(&scalar_text(&key))
                )));
            }
            let value = map.next_value_seed(self.again())?;
            out.insert(key, value);
        }
        Ok(Value::Mapping(out))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, _data: A) -> Result<Value, A::Error> {
        Err(de::Error::custom("YAML tags (`!name`) are not supported"))
    }
}

// ---------------------------------------------------------------------------
// Printing.

/// Prints policies as multi-document YAML (`---` between them) that
/// [`parse_policies`] reads back to the same policies. Ports print in
/// Istio's string form.
pub fn to_yaml(policies: &[AuthorizationPolicy]) -> Result<String, PolicyError> {
    let mut out = String::new();
    for (i, policy) in policies.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        let text =
            serde_norway::to_string(&policy_value(policy)).map_err(|err| PolicyError::Print {
                message: format!("policy {}/{}: {err}", policy.namespace, policy.name),
            })?;
        out.push_str(&text);
    }
    Ok(out)
}

fn policy_value(policy: &AuthorizationPolicy) -> Value {
    let mut metadata = Mapping::new();
    metadata.insert("name".into(), policy.name.as_str().into());
    metadata.insert("namespace".into(), policy.namespace.as_str().into());

    let mut spec = Mapping::new();
    if let Some(labels) = &policy.selector {
        let mut match_labels = Mapping::new();
        for (k, v) in labels {
            match_labels.insert(k.as_str().into(), v.as_str().into());
        }
        let mut selector = Mapping::new();
        selector.insert("matchLabels".into(), Value::Mapping(match_labels));
        spec.insert("selector".into(), Value::Mapping(selector));
    }
    spec.insert("action".into(), policy.action.as_str().into());
    if !policy.rules.is_empty() {
        let rules = policy.rules.iter().map(rule_value).collect();
        spec.insert("rules".into(), Value::Sequence(rules));
    }

    let mut top = Mapping::new();
    top.insert("apiVersion".into(), policy.api_version.as_str().into());
    top.insert("kind".into(), KIND.into());
    top.insert("metadata".into(), Value::Mapping(metadata));
    top.insert("spec".into(), Value::Mapping(spec));
    Value::Mapping(top)
}

fn rule_value(rule: &Rule) -> Value {
    let mut out = Mapping::new();
    if !rule.from.is_empty() {
        let from = rule
            .from
            .iter()
            .map(|source| {
                let mut m = Mapping::new();
                put_strings(&mut m, "principals", &source.principals);
                put_strings(&mut m, "notPrincipals", &source.not_principals);
                put_strings(&mut m, "namespaces", &source.namespaces);
                put_strings(&mut m, "notNamespaces", &source.not_namespaces);
                put_display(&mut m, "ipBlocks", &source.ip_blocks);
                put_display(&mut m, "notIpBlocks", &source.not_ip_blocks);
                wrap("source", m)
            })
            .collect();
        out.insert("from".into(), Value::Sequence(from));
    }
    if !rule.to.is_empty() {
        let to = rule
            .to
            .iter()
            .map(|operation| {
                let mut m = Mapping::new();
                put_display(&mut m, "ports", &operation.ports);
                put_display(&mut m, "notPorts", &operation.not_ports);
                wrap("operation", m)
            })
            .collect();
        out.insert("to".into(), Value::Sequence(to));
    }
    Value::Mapping(out)
}

fn wrap(key: &str, inner: Mapping) -> Value {
    let mut m = Mapping::new();
    m.insert(key.into(), Value::Mapping(inner));
    Value::Mapping(m)
}

fn put_strings(m: &mut Mapping, key: &str, values: &[String]) {
    if !values.is_empty() {
        let items = values.iter().map(|v| Value::String(v.clone())).collect();
        m.insert(key.into(), Value::Sequence(items));
    }
}

fn put_display<T: fmt::Display>(m: &mut Mapping, key: &str, values: &[T]) {
    if !values.is_empty() {
        let items = values
            .iter()
            .map(|v| Value::String(v.to_string()))
            .collect();
        m.insert(key.into(), Value::Sequence(items));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(check_pattern("*", true).is_ok());
        assert!(check_pattern("spiffe://*", true).is_ok());
        assert!(check_pattern("foo*", false).is_ok());
        assert!(check_pattern("*foo", false).is_ok());
        assert!(check_pattern("a*b", false).is_err());
        assert!(check_pattern("**", false).is_err());
        assert!(check_pattern("*a*", false).is_err());
        assert!(check_pattern("spiffe://", true).is_err());
        assert!(check_pattern("a\u{7}", true).is_err());
    }

    #[test]
    fn dns_names() {
        assert!(dns1123_label("default").is_ok());
        assert!(dns1123_label("a-1").is_ok());
        assert!(dns1123_label("-a").is_err());
        assert!(dns1123_label("A").is_err());
        assert!(dns1123_subdomain("deny.web-1").is_ok());
        assert!(dns1123_subdomain("deny..web").is_err());
    }

    fn refusal(yaml: &str) -> PolicyError {
        match parse_policies(yaml) {
            Ok(p) => panic!("accepted {p:?}"),
            Err(e) => e,
        }
    }

    /// 10 KiB of control characters (YAML `\x01` escapes) wherever the
    /// input reaches an error message: shown once, escaped once, bounded.
    #[test]
    fn hostile_values_and_keys_are_shown_once_escaped_once_and_bounded() {
        let junk: String = (0..10 * 1024)
            .map(|i| format!("\\x{:02x}", 1 + i % 31))
            .collect();
        let head = "apiVersion: security.sockmesh.io/v1\nkind: AuthorizationPolicy\n";
        let meta = "metadata: {name: p, namespace: default}\n";
        let cases = [
            format!(
                "{head}{meta}spec:\n  rules: [{{from: [{{source: {{ipBlocks: [\"{junk}\"]}}}}]}}]\n"
            ),
            format!(
                "{head}{meta}spec:\n  rules: [{{from: [{{source: {{principals: [\"{}\"]}}}}]}}]\n",
                &junk[..400]
            ),
            // An explicit key (`?`): YAML caps implicit keys at 1024 characters.
            format!(
                "{head}{meta}spec:\n  selector:\n    matchLabels:\n      ? \"{junk}\"\n      : a\n"
            ),
            format!(
                "{head}{meta}spec:\n  selector: {{matchLabels: {{\"{}\": a}}}}\n",
                &junk[..400]
            ),
            format!(
                "{head}{meta}spec:\n  selector: {{matchLabels: {{a: \"{}\"}}}}\n",
                &junk[..400]
            ),
            format!("{head}{meta}spec:\n  ? \"{junk}\"\n  : 1\n"),
            format!(
                "{head}{meta}spec:\n  rules: [{{to: [{{operation: {{ports: [\"{junk}\"]}}}}]}}]\n"
            ),
            format!("{head}metadata: {{name: \"{junk}\", namespace: default}}\n"),
            format!("{head}{meta}spec: {{action: \"{junk}\"}}\n"),
            format!("? \"{junk}\"\n: 1\n? \"{junk}\"\n: 2\n"),
        ];
        for yaml in cases {
            let err = refusal(&yaml);
            let msg = err.to_string();
            assert!(msg.len() <= MAX_ERROR_LEN, "{} bytes: {msg}", msg.len());
            assert_eq!(
                msg.matches(" bytes)\"").count(),
                1,
                "shown once, cut: {msg}"
            );
            assert!(!msg.contains("\\\\"), "escaped twice: {msg}");
            assert_eq!(err.check_message(&yaml), Ok(()));
        }
    }

    /// The policy fuzz target's body (`fuzz/fuzz_targets/policy_yaml.rs`)
    /// over its seeds.
    #[test]
    fn fuzz_seed_files() {
        for seed in crate::display::fuzz_seeds("policy_yaml") {
            let Ok(text) = std::str::from_utf8(&seed) else {
                continue;
            };
            match parse_policies(text) {
                Err(e) => assert_eq!(e.check_message(text), Ok(()), "{text}"),
                Ok(_) => crate::policy::fuzz_policy_yaml(&seed),
            }
        }
    }

    #[test]
    fn refusals_of_seeds_pass_the_message_check() {
        for yaml in [
            "",
            "a: [",
            "a: 1\na: 2\n",
            "!Policy {a: 1}\n",
            "{1: 2}",
            "{[1]: 2}",
            "apiVersion: x\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: d}\n",
            "apiVersion: security.sockmesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: 'a\\\\b', namespace: d}\n",
            "apiVersion: security.sockmesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: \"a\\\\\\x01\", namespace: d}\n",
        ] {
            if let Err(err) = parse_policies(yaml) {
                assert_eq!(err.check_message(yaml), Ok(()), "{yaml}");
            }
        }
    }

    #[test]
    fn keys_in_paths_are_plain_or_shown() {
        assert_eq!(join("", "spec"), "spec");
        assert_eq!(
            join("selector.matchLabels", "app.kubernetes.io/name"),
            "selector.matchLabels.app.kubernetes.io/name"
        );
        assert_eq!(join("a", "b c"), "a.\"b c\"");
        assert_eq!(join("a", "x\ny"), "a.\"x\\ny\"");
        assert_eq!(join("a", ""), "a.\"\"");
        let long = "é".repeat(200);
        assert!(join("a", &long).ends_with("… (400 bytes)\""));
    }
}
