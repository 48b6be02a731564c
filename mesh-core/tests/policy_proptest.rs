//! Properties of the policy parser and engine over random input:
//! - printing then parsing gives back the same policies;
//! - the compiled engine agrees with a naive reading of Istio's rules,
//!   written here from the documentation, on random policies and requests;
//! - DENY wins: a request matched by a DENY rule that applies is never allowed;
//! - random or mangled YAML never panics the parser (nor breaks the
//!   round trip of whatever still parses).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use mesh_core::policy::{
    Action, ApiVersion, AuthorizationPolicy, Destination, IpBlock, Operation, PolicySet, Request,
    Rule, Source, SourceMatch, fuzz_policy_yaml, parse_policies, to_yaml,
};
use proptest::prelude::*;
use proptest::sample::select;

const ROOT: &str = "sockmesh-system";
const NAMESPACES: &[&str] = &["default", "prod", ROOT];
const PRINCIPAL_VALUES: &[&str] = &[
    "cluster.local/ns/default/sa/web",
    "spiffe://cluster.local/ns/prod/sa/api",
    "*",
    "spiffe://*",
    "cluster.local/ns/default/*",
    "*/sa/web",
    "other.td/ns/x/sa/y",
];
const NAMESPACE_VALUES: &[&str] = &["default", "prod", "*", "pro*", "*ult", "x"];
const IP_BLOCKS: &[&str] = &[
    "10.0.0.0/8",
    "10.1.2.3",
    "192.168.0.0/16",
    "0.0.0.0/0",
    "2001:db8::/32",
    "::1",
    "::/0",
];
const PORTS: &[u16] = &[80, 443, 8080, 5432];
const LABEL_KEYS: &[&str] = &["app", "version"];
const LABEL_VALUES: &[&str] = &["web", "db", "v1"];
const PEERS: &[Option<&str>] = &[
    None,
    Some("spiffe://cluster.local/ns/default/sa/web"),
    Some("spiffe://cluster.local/ns/prod/sa/api"),
    Some("spiffe://other.td/ns/x/sa/y"),
    Some("spiffe://cluster.local/ns/default/sa/db"),
];
const SOURCE_IPS: &[&str] = &[
    "10.1.2.3",
    "10.9.9.9",
    "192.168.4.4",
    "203.0.113.5",
    "2001:db8::7",
    "::1",
    "::ffff:10.1.2.3",
];

fn strings(values: &'static [&'static str], max: usize) -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(select(values).prop_map(str::to_owned), 0..=max)
}

fn ip_blocks(max: usize) -> impl Strategy<Value = Vec<IpBlock>> {
    prop::collection::vec(
        select(IP_BLOCKS).prop_map(|s| IpBlock::parse(s).unwrap()),
        0..=max,
    )
}

fn ports(max: usize) -> impl Strategy<Value = Vec<u16>> {
    prop::collection::vec(select(PORTS), 0..=max)
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        select(LABEL_KEYS).prop_map(str::to_owned),
        select(LABEL_VALUES).prop_map(str::to_owned),
        0..=2,
    )
}

fn source_match() -> impl Strategy<Value = SourceMatch> {
    (
        strings(PRINCIPAL_VALUES, 2),
        strings(PRINCIPAL_VALUES, 1),
        strings(NAMESPACE_VALUES, 2),
        strings(NAMESPACE_VALUES, 1),
        ip_blocks(2),
        ip_blocks(1),
    )
        .prop_map(|(p, np, n, nn, ip, nip)| {
            let mut s = SourceMatch {
                principals: p,
                not_principals: np,
                namespaces: n,
                not_namespaces: nn,
                ip_blocks: ip,
                not_ip_blocks: nip,
            };
            // The parser refuses an empty source, as Istio does.
            if s.is_empty() {
                s.ip_blocks.push(IpBlock::parse("0.0.0.0/0").unwrap());
            }
            s
        })
}

fn operation() -> impl Strategy<Value = Operation> {
    (ports(2), ports(1)).prop_map(|(ports, not_ports)| {
        let mut o = Operation { ports, not_ports };
        if o.is_empty() {
            o.ports.push(80);
        }
        o
    })
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        prop::collection::vec(source_match(), 0..=2),
        prop::collection::vec(operation(), 0..=2),
    )
        .prop_map(|(from, to)| Rule { from, to })
}

fn policy(index: usize) -> impl Strategy<Value = AuthorizationPolicy> {
    (
        select(ApiVersion::ALL.to_vec()),
        select(NAMESPACES),
        prop::option::of(labels()),
        prop::bool::ANY,
        prop::collection::vec(rule(), 0..=3),
    )
        .prop_map(move |(api_version, namespace, selector, deny, mut rules)| {
            let action = if deny { Action::Deny } else { Action::Allow };
            // A DENY policy without rules is refused (Istio's validation).
            if action == Action::Deny && rules.is_empty() {
                rules.push(Rule::default());
            }
            AuthorizationPolicy {
                api_version,
                name: format!("p{index}"),
                namespace: namespace.to_owned(),
                selector,
                action,
                rules,
            }
        })
}

fn policies() -> impl Strategy<Value = Vec<AuthorizationPolicy>> {
    (0usize..=5).prop_flat_map(|n| (0..n).map(policy).collect::<Vec<_>>())
}

fn request() -> impl Strategy<Value = Request> {
    (
        select(PEERS),
        prop::bool::ANY,
        select(SOURCE_IPS),
        select(NAMESPACES),
        labels(),
        prop::sample::select(vec![80u16, 443, 8080, 5432, 9999]),
    )
        .prop_map(|(peer, give_namespace, ip, namespace, labels, port)| {
            let principal = peer.map(str::to_owned);
            // Sometimes the caller fills the namespace, sometimes not.
            let source_namespace = if give_namespace {
                principal.as_deref().and_then(ns_of).map(str::to_owned)
            } else {
                None
            };
            Request {
                source: Source {
                    principal,
                    namespace: source_namespace,
                    ip: ip.parse().unwrap(),
                },
                destination: Destination {
                    namespace: namespace.to_owned(),
                    labels,
                    port,
                },
            }
        })
}

// ---------------------------------------------------------------------------
// A naive reference model, straight from Istio's documentation.

fn ns_of(spiffe: &str) -> Option<&str> {
    let rest = spiffe.strip_prefix("spiffe://")?;
    let parts: Vec<&str> = rest.split('/').collect();
    (parts.len() >= 3 && parts[1] == "ns").then_some(parts[2])
}

fn string_match(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        !value.is_empty()
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else {
        pattern == value
    }
}

fn in_block(block: &IpBlock, ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let len = u32::from(block.prefix_len());
    match (block.network(), ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            len == 0 || (u32::from(n) >> (32 - len)) == (u32::from(a) >> (32 - len))
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            len == 0 || (u128::from(n) >> (128 - len)) == (u128::from(a) >> (128 - len))
        }
        _ => false,
    }
}

fn reference_source(s: &SourceMatch, r: &Request) -> bool {
    // Plaintext: no principal, no namespace; principal/namespace values
    // never match it, their `not` forms always do.
    let principal = r
        .source
        .principal
        .as_deref()
        .and_then(|p| p.strip_prefix("spiffe://"));
    let namespace = r.source.principal.as_deref().and_then(ns_of);
    let p_match = |v: &String| {
        let v = v.strip_prefix("spiffe://").unwrap_or(v);
        principal.is_some_and(|p| string_match(v, p))
    };
    let n_match = |v: &String| namespace.is_some_and(|n| string_match(v, n));
    let ip_match = |b: &IpBlock| in_block(b, r.source.ip);
    (s.principals.is_empty() || s.principals.iter().any(p_match))
        && !s.not_principals.iter().any(p_match)
        && (s.namespaces.is_empty() || s.namespaces.iter().any(n_match))
        && !s.not_namespaces.iter().any(n_match)
        && (s.ip_blocks.is_empty() || s.ip_blocks.iter().any(ip_match))
        && !s.not_ip_blocks.iter().any(ip_match)
}

fn reference_rule(rule: &Rule, r: &Request) -> bool {
    let port = r.destination.port;
    (rule.from.is_empty() || rule.from.iter().any(|s| reference_source(s, r)))
        && (rule.to.is_empty()
            || rule.to.iter().any(|o| {
                (o.ports.is_empty() || o.ports.contains(&port)) && !o.not_ports.contains(&port)
            }))
}

fn applies(p: &AuthorizationPolicy, d: &Destination) -> bool {
    (p.namespace == ROOT || p.namespace == d.namespace)
        && p.selector
            .iter()
            .flatten()
            .all(|(k, v)| d.labels.get(k) == Some(v))
}

/// (allowed, some DENY rule matched)
fn reference(policies: &[AuthorizationPolicy], r: &Request) -> (bool, bool) {
    let applying: Vec<&AuthorizationPolicy> = policies
        .iter()
        .filter(|p| applies(p, &r.destination))
        .collect();
    let matches = |p: &&AuthorizationPolicy| p.rules.iter().any(|rule| reference_rule(rule, r));
    if applying
        .iter()
        .filter(|p| p.action == Action::Deny)
        .any(matches)
    {
        return (false, true);
    }
    let mut allows = applying
        .iter()
        .filter(|p| p.action == Action::Allow)
        .peekable();
    if allows.peek().is_none() {
        return (true, false);
    }
    (allows.any(matches), false)
}

// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn print_then_parse_round_trips(policies in policies()) {
        let printed = to_yaml(&policies).unwrap();
        let parsed = parse_policies(&printed);
        prop_assert_eq!(parsed, Ok(policies), "{}", printed);
    }

    #[test]
    fn engine_agrees_with_the_reference_and_deny_wins(
        policies in policies(),
        requests in prop::collection::vec(request(), 1..8),
    ) {
        let set = PolicySet::new(policies.clone(), ROOT);
        for r in &requests {
            let decision = set.evaluate(r);
            let (allowed, denied_by_rule) = reference(&policies, r);
            prop_assert_eq!(decision.allowed, allowed, "{:?}\n{:?}\n{}", r, decision, to_yaml(&policies).unwrap());
            prop_assert_eq!(set.check(r).allowed(), decision.allowed);
            if denied_by_rule {
                prop_assert!(!decision.allowed);
                let policy = decision.policy.as_ref().map(|p| p.action);
                prop_assert_eq!(policy, Some(Action::Deny));
                prop_assert!(decision.reason.starts_with("denied by DENY policy "), "{}", decision.reason);
            }
            match &decision.policy {
                Some(p) => {
                    let rule = decision.rule.unwrap();
                    let source = policies.iter().find(|q| q.namespace == p.namespace && q.name == p.name).unwrap();
                    prop_assert!(applies(source, &r.destination));
                    prop_assert!(reference_rule(&source.rules[rule], r), "named rule does not match");
                    let named = format!("{}/{} rules[{}]", p.namespace, p.name, rule);
                    prop_assert!(decision.reason.contains(&named), "{}", decision.reason);
                }
                None => prop_assert_eq!(decision.rule, None),
            }
        }
    }

    #[test]
    fn random_text_never_panics(text in "\\PC{0,300}") {
        let _ = parse_policies(&text);
        fuzz_policy_yaml(text.as_bytes());
    }

    #[test]
    fn yaml_shaped_text_never_panics(parts in prop::collection::vec(select(vec![
        "apiVersion: security.sockmesh.io/v1\n", "kind: AuthorizationPolicy\n", "metadata:\n",
        "  name: a\n", "  namespace: b\n", "spec:\n", "  action: DENY\n", "  rules:\n",
        "  - {}\n", "  - from:\n", "    - source:\n", "        principals: ['*']\n",
        "        ipBlocks: [10.0.0.0/8]\n", "  - to: [{operation: {ports: ['80']}}]\n",
        "---\n", "- ", "  ", "[", "]", "{", "}", ": ", "&a ", "*a ", "!t ", "'", "\"", "~\n", "\n",
    ]), 0..40)) {
        let text: String = parts.concat();
        fuzz_policy_yaml(text.as_bytes());
    }

    #[test]
    fn mangled_valid_yaml_never_panics(
        policies in policies(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = to_yaml(&policies).unwrap().into_bytes();
        for (at, byte) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        // Whatever still parses must print and parse back the same.
        fuzz_policy_yaml(&bytes);
    }
}
