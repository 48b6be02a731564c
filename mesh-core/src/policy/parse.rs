//! YAML → [`AuthorizationPolicy`], and back.
//!
//! The text is first loaded into a `serde_norway::Value` under a node budget
//! (aliases expand into counted nodes, so an alias bomb stops early), then
//! walked by hand, so every error names the policy and the exact field path
//! (`rules[0].to[0].operation.ports[1]`), tells L7-only fields apart from
//! typos, and quotes the value that was refused. Paths under `spec` are
//! written without the `spec.` prefix, as in Istio's documentation.

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_norway::{Mapping, Value};

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
                let fields =
                    ctx.fields(&value, "", &["apiVersion", "kind", "items", "metadata"])?;
                for (i, item) in fields.list("items", MAX_POLICIES)?.iter().enumerate() {
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
// The walk.

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
    let top = ctx.fields(value, "", TOP_FIELDS)?;

    let kind = top.required_str("kind")?;
    if kind != KIND {
        return Err(ctx.invalid_value("kind", kind, format!("expected {KIND}")));
    }
    let api = top.required_str("apiVersion")?;
    let api_version = ApiVersion::parse(api).ok_or_else(|| {
        let all: Vec<&str> = ApiVersion::ALL.iter().map(|v| v.as_str()).collect();
        ctx.invalid_value(
            "apiVersion",
            api,
            format!("expected one of {}", all.join(", ")),
        )
    })?;

    let Some(metadata) = top.get("metadata") else {
        return Err(ctx.invalid("metadata", "required (with name and namespace)"));
    };
    let metadata = ctx.fields(metadata, "metadata", METADATA_FIELDS)?;
    let name = metadata.required_str("name")?;
    if let Err(reason) = dns1123_subdomain(name) {
        return Err(ctx.invalid_value("metadata.name", name, reason));
    }
    let namespace = metadata.required_str("namespace")?;
    if let Err(reason) = dns1123_label(namespace) {
        return Err(ctx.invalid_value("metadata.namespace", namespace, reason));
    }

    let mut policy = AuthorizationPolicy::new(namespace, name, Action::Allow);
    policy.api_version = api_version;
    // A missing or null spec is an empty one, as in Kubernetes.
    let Some(spec) = top.get("spec") else {
        return Ok(policy);
    };
    let spec = ctx.fields_with(spec, "", "spec", SPEC_FIELDS, SPEC_L7, SPEC_UNSUPPORTED)?;

    if let Some(action) = spec.get("action") {
        let action = ctx.str(action, "action")?;
        policy.action = match action {
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

    if let Some(selector) = spec.get("selector") {
        let selector = ctx.fields(selector, "selector", SELECTOR_FIELDS)?;
        let mut labels = BTreeMap::new();
        if let Some(match_labels) = selector.get("matchLabels") {
            let map = ctx.mapping(match_labels, "selector.matchLabels")?;
            if map.len() > MAX_SELECTOR_LABELS {
                return Err(ctx.too_many("selector.matchLabels", map.len(), MAX_SELECTOR_LABELS));
            }
            for (key, value) in map {
                let key = ctx.str(key, "selector.matchLabels")?;
                // The key is the value refused: shown once, as the value.
                check_label(&ctx, "selector.matchLabels", key, "label key")?;
                let path = join("selector.matchLabels", key);
                let value = ctx.str(value, &path).map_err(|_| {
                    ctx.invalid_value(
                        &path,
                        &scalar_text(value),
                        "label values must be strings; quote it",
                    )
                })?;
                if !value.is_empty() {
                    check_label(&ctx, &path, value, "label value")?;
                }
                labels.insert(key.to_owned(), value.to_owned());
            }
        }
        policy.selector = Some(labels);
    }

    if let Some(rules) = spec.get("rules") {
        let rules = ctx.list(rules, "rules", MAX_RULES)?;
        for (i, rule) in rules.iter().enumerate() {
            policy
                .rules
                .push(parse_rule(&ctx, rule, &format!("rules[{i}]"))?);
        }
    }
    if policy.action == Action::Deny && policy.rules.is_empty() {
        return Err(ctx.invalid(
            "rules",
            "a DENY policy without rules never matches; write `rules: [{}]` to deny every connection",
        ));
    }
    Ok(policy)
}

fn parse_rule(ctx: &Ctx, value: &Value, path: &str) -> Result<Rule, PolicyError> {
    if value.is_null() {
        return Err(ctx.invalid(
            path,
            "empty rule; write `{}` for a rule that matches every connection",
        ));
    }
    let fields = ctx.fields_with(value, path, path, RULE_FIELDS, RULE_L7, &[])?;
    let mut rule = Rule::default();
    if let Some(from) = fields.get("from") {
        let path = format!("{path}.from");
        let entries = ctx.list(from, &path, MAX_RULE_ENTRIES)?;
        if entries.is_empty() {
            return Err(ctx.invalid(&path, "must not be empty; omit `from` to match any source"));
        }
        for (i, entry) in entries.iter().enumerate() {
            let path = format!("{path}[{i}]");
            let entry = ctx.fields(entry, &path, FROM_FIELDS)?;
            let path = format!("{path}.source");
            let Some(source) = entry.get("source") else {
                return Err(ctx.invalid(&path, "required"));
            };
            rule.from.push(parse_source(ctx, source, &path)?);
        }
    }
    if let Some(to) = fields.get("to") {
        let path = format!("{path}.to");
        let entries = ctx.list(to, &path, MAX_RULE_ENTRIES)?;
        if entries.is_empty() {
            return Err(ctx.invalid(&path, "must not be empty; omit `to` to match any port"));
        }
        for (i, entry) in entries.iter().enumerate() {
            let path = format!("{path}[{i}]");
            let entry = ctx.fields(entry, &path, TO_FIELDS)?;
            let path = format!("{path}.operation");
            let Some(operation) = entry.get("operation") else {
                return Err(ctx.invalid(&path, "required"));
            };
            rule.to.push(parse_operation(ctx, operation, &path)?);
        }
    }
    Ok(rule)
}

fn parse_source(ctx: &Ctx, value: &Value, path: &str) -> Result<SourceMatch, PolicyError> {
    let fields = ctx.fields_with(
        value,
        path,
        path,
        SOURCE_FIELDS,
        SOURCE_L7,
        SOURCE_UNSUPPORTED,
    )?;
    let principals = |key: &str| fields.patterns(key, true);
    let namespaces = |key: &str| fields.patterns(key, false);
    let ips = |key: &str| -> Result<Vec<IpBlock>, PolicyError> {
        let mut out = Vec::new();
        for (value_path, value) in fields.values(key)? {
            let text = ctx.value_str(value, &value_path)?;
            let block = IpBlock::parse(text).ok_or_else(|| {
                let reason = if text.contains('/') {
                    "malformed CIDR; expected an address and a prefix length such as 10.0.0.0/8 or 2001:db8::/32"
                } else {
                    "malformed IP address; expected an IPv4 or IPv6 address or a CIDR"
                };
                ctx.invalid_value(&value_path, text, reason)
            })?;
            out.push(block);
        }
        Ok(out)
    };
    let source = SourceMatch {
        principals: principals("principals")?,
        not_principals: principals("notPrincipals")?,
        namespaces: namespaces("namespaces")?,
        not_namespaces: namespaces("notNamespaces")?,
        ip_blocks: ips("ipBlocks")?,
        not_ip_blocks: ips("notIpBlocks")?,
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

fn parse_operation(ctx: &Ctx, value: &Value, path: &str) -> Result<Operation, PolicyError> {
    let fields = ctx.fields_with(value, path, path, OPERATION_FIELDS, OPERATION_L7, &[])?;
    let ports = |key: &str| -> Result<Vec<u16>, PolicyError> {
        let mut out = Vec::new();
        for (value_path, value) in fields.values(key)? {
            out.push(parse_port(ctx, value, &value_path)?);
        }
        Ok(out)
    };
    let operation = Operation {
        ports: ports("ports")?,
        not_ports: ports("notPorts")?,
    };
    if operation.is_empty() {
        return Err(ctx.invalid(path, "must not be empty; set ports or notPorts"));
    }
    Ok(operation)
}

fn parse_port(ctx: &Ctx, value: &Value, path: &str) -> Result<u16, PolicyError> {
    const RANGE: &str = "expected a port number from 1 to 65535";
    let (text, number) = match value {
        Value::String(s) => {
            let digits = !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
            (s.clone(), if digits { s.parse::<u64>().ok() } else { None })
        }
        Value::Number(n) => (n.to_string(), n.as_u64()),
        other => (scalar_text(other), None),
    };
    match number {
        Some(n @ 1..=65535) => u16::try_from(n).map_err(|_| ctx.invalid_value(path, &text, RANGE)),
        Some(_) => Err(ctx.invalid_value(path, &text, format!("out of range; {RANGE}"))),
        None => Err(ctx.invalid_value(path, &text, format!("not a port number; {RANGE}"))),
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
// Error-building context and checked field access.

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

    fn mapping<'v>(&self, value: &'v Value, path: &str) -> Result<&'v Mapping, PolicyError> {
        match value {
            Value::Mapping(map) => Ok(map),
            other => Err(self.invalid(
                path,
                format!("expected a mapping, found {}", kind_of(other)),
            )),
        }
    }

    fn list<'v>(
        &self,
        value: &'v Value,
        path: &str,
        limit: usize,
    ) -> Result<&'v [Value], PolicyError> {
        match value {
            Value::Sequence(items) if items.len() > limit => {
                Err(self.too_many(path, items.len(), limit))
            }
            Value::Sequence(items) => Ok(items),
            other => Err(self.invalid(path, format!("expected a list, found {}", kind_of(other)))),
        }
    }

    fn str<'v>(&self, value: &'v Value, path: &str) -> Result<&'v str, PolicyError> {
        match value {
            Value::String(s) => Ok(s),
            other => {
                Err(self.invalid(path, format!("expected a string, found {}", kind_of(other))))
            }
        }
    }

    /// A string value of a list field: a string, not too long.
    fn value_str<'v>(&self, value: &'v Value, path: &str) -> Result<&'v str, PolicyError> {
        let text = self.str(value, path)?;
        if text.len() > MAX_VALUE_LEN {
            return Err(self.invalid_value(
                path,
                text,
                format!("longer than the limit of {MAX_VALUE_LEN} bytes"),
            ));
        }
        if text.is_empty() {
            return Err(self.invalid_value(path, text, "empty value"));
        }
        Ok(text)
    }

    fn fields<'c, 'v>(
        &'c self,
        value: &'v Value,
        path: &str,
        known: &[&str],
    ) -> Result<Fields<'c, 'v>, PolicyError> {
        self.fields_with(value, path, path, known, &[], &[])
    }

    /// Checks that `value` is a mapping whose keys are all strings in
    /// `known`; an `l7` key or an `unsupported` key gets its own message.
    /// `display` names the mapping itself in errors, `path` prefixes its keys.
    fn fields_with<'c, 'v>(
        &'c self,
        value: &'v Value,
        path: &str,
        display: &str,
        known: &[&str],
        l7: &[&str],
        unsupported: &[(&str, &str)],
    ) -> Result<Fields<'c, 'v>, PolicyError> {
        let map = self.mapping(value, display)?;
        for key in map.keys() {
            let Value::String(key) = key else {
                return Err(self.invalid(
                    display,
                    format!(
                        "keys must be strings, found {} {}",
                        kind_of(key),
                        Shown::new(&scalar_text(key))
                    ),
                ));
            };
            let key_path = join(path, key);
            if known.contains(&key.as_str()) {
                continue;
            }
            if l7.contains(&key.as_str()) {
                return Err(PolicyError::L7Field {
                    location: self.location.clone(),
                    path: key_path,
                });
            }
            if let Some((_, reason)) = unsupported.iter().find(|(k, _)| k == key) {
                return Err(self.unsupported(&key_path, *reason));
            }
            return Err(PolicyError::UnknownField {
                location: self.location.clone(),
                path: key_path,
                expected: known.join(", "),
            });
        }
        Ok(Fields {
            ctx: self,
            map,
            path: path.to_owned(),
        })
    }
}

/// A mapping whose keys were checked.
struct Fields<'c, 'v> {
    ctx: &'c Ctx,
    map: &'v Mapping,
    path: String,
}

impl<'v> Fields<'_, 'v> {
    /// The value of `key`; a null value counts as absent, as in Kubernetes.
    fn get(&self, key: &str) -> Option<&'v Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn required_str(&self, key: &str) -> Result<&'v str, PolicyError> {
        let path = join(&self.path, key);
        match self.get(key) {
            None => Err(self.ctx.invalid(&path, "required")),
            Some(value) => self.ctx.str(value, &path),
        }
    }

    fn list(&self, key: &str, limit: usize) -> Result<&'v [Value], PolicyError> {
        match self.get(key) {
            None => Ok(&[]),
            Some(value) => self.ctx.list(value, &join(&self.path, key), limit),
        }
    }

    /// The items of a list field with their paths (`path.key[i]`).
    fn values(&self, key: &str) -> Result<Vec<(String, &'v Value)>, PolicyError> {
        let field_path = join(&self.path, key);
        let Some(value) = self.get(key) else {
            return Ok(Vec::new());
        };
        let items = self.ctx.list(value, &field_path, MAX_VALUES)?;
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("{field_path}[{i}]"), v))
            .collect())
    }

    fn patterns(&self, key: &str, principal: bool) -> Result<Vec<String>, PolicyError> {
        let mut out = Vec::new();
        for (value_path, value) in self.values(key)? {
            let text = self.ctx.value_str(value, &value_path)?;
            check_pattern(text, principal)
                .map_err(|reason| self.ctx.invalid_value(&value_path, text, reason))?;
            out.push(text.to_owned());
        }
        Ok(out)
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
