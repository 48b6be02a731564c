//! The compiled policy set and per-connection evaluation.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::model::{Action, AuthorizationPolicy, IpBlock, Operation, SourceMatch};

/// The peer of an inbound connection, as the node proxy authenticated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The peer's SPIFFE ID (`spiffe://td/ns/NS/sa/SA`) from its verified
    /// certificate; `None` for a plaintext (unauthenticated) peer.
    pub principal: Option<String>,
    /// The peer's namespace, from the same verified identity. Only used when
    /// `principal` is set (a plaintext peer has no namespace, whatever this
    /// says); when `None` with a principal, it is read from the principal's
    /// `/ns/<namespace>/` segment, as Istio derives it.
    pub namespace: Option<String>,
    /// The peer's source address.
    pub ip: IpAddr,
}

/// The workload and port a connection is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub port: u16,
}

/// One inbound connection to authorize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub source: Source,
    pub destination: Destination,
}

/// Names a policy in a decision.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRef {
    pub namespace: String,
    pub name: String,
    pub action: Action,
}

impl fmt::Display for PolicyRef {
    /// `namespace/name`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The outcome of [`PolicySet::evaluate`], for logs and `mesh explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The policy whose rule decided, if one did.
    pub policy: Option<PolicyRef>,
    /// The index of that rule in the policy's `rules`.
    pub rule: Option<usize>,
    /// One line saying why, naming the policy and rule that decided.
    pub reason: String,
}

/// The outcome of [`PolicySet::check`]: what [`Decision`] says, without
/// allocating, borrowed from the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// A rule of a DENY policy that applies to the workload matched.
    DeniedByPolicy { policy: &'a PolicyRef, rule: usize },
    /// A rule of an ALLOW policy that applies to the workload matched.
    AllowedByPolicy { policy: &'a PolicyRef, rule: usize },
    /// No DENY rule matched and no ALLOW policy applies to the workload.
    AllowedNoAllowPolicy,
    /// ALLOW policies apply to the workload and none of their rules matched.
    DeniedNoAllowMatch,
}

impl Verdict<'_> {
    pub fn allowed(&self) -> bool {
        matches!(
            self,
            Verdict::AllowedByPolicy { .. } | Verdict::AllowedNoAllowPolicy
        )
    }
}

/// A set of policies compiled for evaluation. Build it once per policy
/// change; evaluating is read-only, so share it (`Arc`) across connections.
#[derive(Debug, Clone)]
pub struct PolicySet {
    root_namespace: String,
    policies: Vec<AuthorizationPolicy>,
    compiled: Vec<Compiled>,
    /// Policies of the root namespace: they apply in every namespace.
    root: Group,
    /// Policies of every other namespace, by namespace.
    namespaces: HashMap<String, Group>,
}

impl Default for PolicySet {
    fn default() -> Self {
        PolicySet::new(Vec::new(), super::DEFAULT_ROOT_NAMESPACE)
    }
}

#[derive(Debug, Clone, Default)]
struct Group {
    deny: Vec<usize>,
    allow: Vec<usize>,
}

impl PolicySet {
    /// Compiles `policies`. Policies of `root_namespace` apply to workloads
    /// of every namespace. Policies are ordered by namespace and name, which
    /// decides which one a decision names when several match.
    pub fn new(mut policies: Vec<AuthorizationPolicy>, root_namespace: impl Into<String>) -> Self {
        let root_namespace = root_namespace.into();
        policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let compiled: Vec<Compiled> = policies.iter().map(Compiled::new).collect();
        let mut root = Group::default();
        let mut namespaces: HashMap<String, Group> = HashMap::new();
        for (i, policy) in policies.iter().enumerate() {
            let group = if policy.namespace == root_namespace {
                &mut root
            } else {
                namespaces.entry(policy.namespace.clone()).or_default()
            };
            match policy.action {
                Action::Deny => group.deny.push(i),
                Action::Allow => group.allow.push(i),
            }
        }
        PolicySet {
            root_namespace,
            policies,
            compiled,
            root,
            namespaces,
        }
    }

    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// The policies, ordered by namespace and name.
    pub fn policies(&self) -> &[AuthorizationPolicy] {
        &self.policies
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policies that apply to `destination`'s workload (root namespace
    /// first), whatever the port: what `mesh explain` lists.
    pub fn policies_for(&self, destination: &Destination) -> Vec<&AuthorizationPolicy> {
        let mut out: Vec<(bool, usize)> = self
            .candidates(&destination.namespace, Action::Deny)
            .chain(self.candidates(&destination.namespace, Action::Allow))
            .filter(|&i| self.compiled[i].selects(destination))
            .map(|i| (self.policies[i].namespace != self.root_namespace, i))
            .collect();
        out.sort_unstable();
        out.into_iter().map(|(_, i)| &self.policies[i]).collect()
    }

    /// Decides `request` without allocating: the per-connection call.
    pub fn check(&self, request: &Request) -> Verdict<'_> {
        let peer = Peer::of(request);
        let destination = &request.destination;
        for i in self.candidates(&destination.namespace, Action::Deny) {
            let policy = &self.compiled[i];
            if policy.selects(destination)
                && let Some(rule) = policy.matching_rule(&peer)
            {
                return Verdict::DeniedByPolicy {
                    policy: &policy.reference,
                    rule,
                };
            }
        }
        let mut selected = false;
        for i in self.candidates(&destination.namespace, Action::Allow) {
            let policy = &self.compiled[i];
            if !policy.selects(destination) {
                continue;
            }
            selected = true;
            if let Some(rule) = policy.matching_rule(&peer) {
                return Verdict::AllowedByPolicy {
                    policy: &policy.reference,
                    rule,
                };
            }
        }
        if selected {
            Verdict::DeniedNoAllowMatch
        } else {
            Verdict::AllowedNoAllowPolicy
        }
    }

    /// Decides `request` and says why, naming the policy and rule that
    /// decided (for logs and `mesh explain`).
    pub fn evaluate(&self, request: &Request) -> Decision {
        let destination = &request.destination;
        match self.check(request) {
            Verdict::DeniedByPolicy { policy, rule } => Decision {
                allowed: false,
                policy: Some(policy.clone()),
                rule: Some(rule),
                reason: format!("denied by DENY policy {policy} rules[{rule}]"),
            },
            Verdict::AllowedByPolicy { policy, rule } => Decision {
                allowed: true,
                policy: Some(policy.clone()),
                rule: Some(rule),
                reason: format!("allowed by ALLOW policy {policy} rules[{rule}]"),
            },
            Verdict::AllowedNoAllowPolicy => Decision {
                allowed: true,
                policy: None,
                rule: None,
                reason: format!(
                    "allowed: no DENY rule matched and no ALLOW policy selects {}",
                    Workload(destination)
                ),
            },
            Verdict::DeniedNoAllowMatch => {
                let selecting: Vec<usize> = self
                    .candidates(&destination.namespace, Action::Allow)
                    .filter(|&i| self.compiled[i].selects(destination))
                    .collect();
                let names: Vec<String> = selecting
                    .iter()
                    .map(|&i| self.compiled[i].reference.to_string())
                    .collect();
                let allow_nothing = selecting.iter().all(|&i| self.compiled[i].rules.is_empty());
                let reason = match (names.as_slice(), allow_nothing) {
                    ([one], true) => format!(
                        "denied: ALLOW policy {one} selects {} and has no rules, so it allows nothing",
                        Workload(destination)
                    ),
                    ([one], false) => format!(
                        "denied: ALLOW policy {one} selects {} and none of its rules matched {}",
                        Workload(destination),
                        Connection(request)
                    ),
                    (many, _) => format!(
                        "denied: ALLOW policies {} select {} and none matched {}",
                        many.join(", "),
                        Workload(destination),
                        Connection(request)
                    ),
                };
                Decision {
                    allowed: false,
                    policy: None,
                    rule: None,
                    reason,
                }
            }
        }
    }

    /// The policies of `action` that may apply in `namespace`: the root
    /// namespace's first, then the namespace's own.
    fn candidates(&self, namespace: &str, action: Action) -> impl Iterator<Item = usize> + '_ {
        fn pick(group: &Group, action: Action) -> &[usize] {
            match action {
                Action::Deny => &group.deny,
                Action::Allow => &group.allow,
            }
        }
        let own = self
            .namespaces
            .get(namespace)
            .map_or(&[][..], |group| pick(group, action));
        pick(&self.root, action).iter().chain(own).copied()
    }
}

/// `workload {app=web} in namespace default` for reasons.
struct Workload<'a>(&'a Destination);

impl fmt::Display for Workload<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.labels.is_empty() {
            return write!(f, "workload with no labels in namespace {}", d.namespace);
        }
        f.write_str("workload {")?;
        for (i, (k, v)) in d.labels.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{k}={v}")?;
        }
        write!(f, "}} in namespace {}", d.namespace)
    }
}

/// `(from spiffe://td/ns/a/sa/b at 10.0.0.1 to port 8080)` for reasons.
struct Connection<'a>(&'a Request);

impl fmt::Display for Connection<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        f.write_str("(from ")?;
        match r.source.principal.as_deref().filter(|p| !p.is_empty()) {
            Some(p) => write!(f, "{p} at {}", r.source.ip)?,
            None => write!(f, "plaintext peer {}", r.source.ip)?,
        }
        write!(f, " to port {})", r.destination.port)
    }
}

// ---------------------------------------------------------------------------
// Compiled form.

/// What the matchers see of a request, with the principal normalised.
struct Peer<'r> {
    /// The SPIFFE ID without `spiffe://`; `None` for plaintext.
    principal: Option<&'r str>,
    /// `None` for plaintext.
    namespace: Option<&'r str>,
    ip: IpAddr,
    port: u16,
}

impl<'r> Peer<'r> {
    fn of(request: &'r Request) -> Self {
        let principal = request
            .source
            .principal
            .as_deref()
            .map(|p| p.strip_prefix("spiffe://").unwrap_or(p))
            .filter(|p| !p.is_empty());
        let namespace = principal.and_then(|p| {
            request
                .source
                .namespace
                .as_deref()
                .filter(|n| !n.is_empty())
                .or_else(|| namespace_of(p))
        });
        Peer {
            principal,
            namespace,
            ip: request.source.ip,
            port: request.destination.port,
        }
    }
}

/// `NS` of `td/ns/NS/sa/SA`.
fn namespace_of(principal: &str) -> Option<&str> {
    let mut parts = principal.split('/');
    parts.next()?;
    if parts.next()? != "ns" {
        return None;
    }
    parts.next().filter(|ns| !ns.is_empty())
}

#[derive(Debug, Clone)]
struct Compiled {
    reference: PolicyRef,
    selector: Box<[(String, String)]>,
    rules: Box<[CompiledRule]>,
}

impl Compiled {
    fn new(policy: &AuthorizationPolicy) -> Self {
        Compiled {
            reference: PolicyRef {
                namespace: policy.namespace.clone(),
                name: policy.name.clone(),
                action: policy.action,
            },
            selector: policy
                .selector
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            rules: policy
                .rules
                .iter()
                .map(|rule| CompiledRule {
                    from: rule.from.iter().map(CompiledSource::new).collect(),
                    to: rule.to.iter().map(CompiledOperation::new).collect(),
                })
                .collect(),
        }
    }

    fn selects(&self, destination: &Destination) -> bool {
        self.selector
            .iter()
            .all(|(k, v)| destination.labels.get(k.as_str()) == Some(v))
    }

    fn matching_rule(&self, peer: &Peer<'_>) -> Option<usize> {
        self.rules.iter().position(|rule| rule.matches(peer))
    }
}

#[derive(Debug, Clone)]
struct CompiledRule {
    from: Box<[CompiledSource]>,
    to: Box<[CompiledOperation]>,
}

impl CompiledRule {
    fn matches(&self, peer: &Peer<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(peer)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(peer.port)))
    }
}

#[derive(Debug, Clone)]
struct CompiledSource {
    principals: Box<[Pattern]>,
    not_principals: Box<[Pattern]>,
    namespaces: Box<[Pattern]>,
    not_namespaces: Box<[Pattern]>,
    ip_blocks: Box<[IpBlock]>,
    not_ip_blocks: Box<[IpBlock]>,
}

impl CompiledSource {
    fn new(source: &SourceMatch) -> Self {
        let principals = |v: &[String]| v.iter().map(|p| Pattern::principal(p)).collect();
        let namespaces = |v: &[String]| v.iter().map(|p| Pattern::new(p)).collect();
        CompiledSource {
            principals: principals(&source.principals),
            not_principals: principals(&source.not_principals),
            namespaces: namespaces(&source.namespaces),
            not_namespaces: namespaces(&source.not_namespaces),
            ip_blocks: source.ip_blocks.clone().into(),
            not_ip_blocks: source.not_ip_blocks.clone().into(),
        }
    }

    /// Fields ANDed; values of a field ORed; a `not` field matches when none
    /// of its values does (so plaintext peers match `notPrincipals` and
    /// `notNamespaces`, as in Istio).
    fn matches(&self, peer: &Peer<'_>) -> bool {
        let principal = |p: &Pattern| p.matches(peer.principal);
        let namespace = |p: &Pattern| p.matches(peer.namespace);
        let ip = |b: &IpBlock| b.contains(peer.ip);
        any_or_empty(&self.principals, principal)
            && none(&self.not_principals, principal)
            && any_or_empty(&self.namespaces, namespace)
            && none(&self.not_namespaces, namespace)
            && any_or_empty(&self.ip_blocks, ip)
            && none(&self.not_ip_blocks, ip)
    }
}

fn any_or_empty<T>(values: &[T], matches: impl Fn(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(matches)
}

fn none<T>(values: &[T], matches: impl Fn(&T) -> bool) -> bool {
    !values.iter().any(matches)
}

#[derive(Debug, Clone)]
struct CompiledOperation {
    /// Sorted, deduplicated.
    ports: Box<[u16]>,
    not_ports: Box<[u16]>,
}

impl CompiledOperation {
    fn new(operation: &Operation) -> Self {
        let sorted = |v: &[u16]| {
            let mut v = v.to_vec();
            v.sort_unstable();
            v.dedup();
            v.into_boxed_slice()
        };
        CompiledOperation {
            ports: sorted(&operation.ports),
            not_ports: sorted(&operation.not_ports),
        }
    }

    fn matches(&self, port: u16) -> bool {
        (self.ports.is_empty() || self.ports.binary_search(&port).is_ok())
            && self.not_ports.binary_search(&port).is_err()
    }
}

/// Istio's string match: `*` (present), `foo*`, `*foo`, or exact.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Prefix(Box<str>),
    Suffix(Box<str>),
    Exact(Box<str>),
}

impl Pattern {
    /// As Istio: `*` alone is presence, a leading `*` a suffix match, a
    /// trailing `*` a prefix match, anything else exact. (The parser refuses
    /// other uses of `*`; a policy built in code keeps Istio's reading.)
    fn new(value: &str) -> Self {
        if value == "*" {
            Pattern::Any
        } else if let Some(suffix) = value.strip_prefix('*') {
            Pattern::Suffix(suffix.into())
        } else if let Some(prefix) = value.strip_suffix('*') {
            Pattern::Prefix(prefix.into())
        } else {
            Pattern::Exact(value.into())
        }
    }

    /// A principal pattern, compared without the `spiffe://` scheme.
    fn principal(value: &str) -> Self {
        Pattern::new(value.strip_prefix("spiffe://").unwrap_or(value))
    }

    /// `None` (plaintext: no principal or namespace) never matches.
    fn matches(&self, value: Option<&str>) -> bool {
        let Some(value) = value else {
            return false;
        };
        match self {
            Pattern::Any => !value.is_empty(),
            Pattern::Prefix(p) => value.starts_with(&**p),
            Pattern::Suffix(s) => value.ends_with(&**s),
            Pattern::Exact(e) => value == &**e,
        }
    }
}

/// The fixed requests [`super::fuzz_policy_yaml`] evaluates.
pub(crate) fn fuzz_requests() -> Vec<Request> {
    let labels = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>()
    };
    vec![
        Request {
            source: Source {
                principal: Some("spiffe://cluster.local/ns/default/sa/web".to_owned()),
                namespace: Some("default".to_owned()),
                ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            },
            destination: Destination {
                namespace: "default".to_owned(),
                labels: labels(&[("app", "web")]),
                port: 8080,
            },
        },
        Request {
            source: Source {
                principal: None,
                namespace: None,
                ip: IpAddr::V4(Ipv4Addr::new(192, 168, 1, 7)),
            },
            destination: Destination {
                namespace: "prod".to_owned(),
                labels: BTreeMap::new(),
                port: 80,
            },
        },
        Request {
            source: Source {
                principal: Some("spiffe://example.org/ns/sockmesh-system/sa/admin".to_owned()),
                namespace: None,
                ip: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
            },
            destination: Destination {
                namespace: "sockmesh-system".to_owned(),
                labels: labels(&[("app", "db"), ("version", "v1")]),
                port: 5432,
            },
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_matching() {
        assert!(Pattern::new("*").matches(Some("x")));
        assert!(!Pattern::new("*").matches(Some("")));
        assert!(!Pattern::new("*").matches(None));
        assert!(Pattern::new("foo*").matches(Some("foo")));
        assert!(Pattern::new("foo*").matches(Some("foobar")));
        assert!(!Pattern::new("foo*").matches(Some("xfoo")));
        assert!(Pattern::new("*foo").matches(Some("xfoo")));
        assert!(!Pattern::new("*foo").matches(Some("foox")));
        assert!(Pattern::new("foo").matches(Some("foo")));
        assert!(!Pattern::new("foo").matches(Some("foo2")));
        assert_eq!(
            Pattern::principal("spiffe://td/ns/a/sa/b"),
            Pattern::new("td/ns/a/sa/b")
        );
    }

    #[test]
    fn namespace_from_principal() {
        assert_eq!(namespace_of("td/ns/shop/sa/web"), Some("shop"));
        assert_eq!(namespace_of("td/xx/shop/sa/web"), None);
        assert_eq!(namespace_of("td"), None);
        assert_eq!(namespace_of("td/ns//sa/web"), None);
    }
}
