//! L4 authorization: `AuthorizationPolicy` documents with the semantics of
//! Istio's AuthorizationPolicy, restricted to what a node proxy can see on a
//! TCP connection (the peer's SPIFFE ID, its source IP, the destination
//! workload and port).
//!
//! Three parts:
//! - the policy model ([`AuthorizationPolicy`] and its rules), what a user
//!   writes;
//! - the parser ([`parse_policies`]), which reads Kubernetes-form YAML
//!   (`security.sockmesh.io/v1`, and Istio's `security.istio.io/v1` and
//!   `v1beta1` so Istio users can reuse their files), refuses unknown and
//!   L7-only fields, checks every value and bounds the size of everything;
//! - the engine ([`PolicySet`]), built once per policy change, which
//!   precompiles selectors, wildcard patterns, CIDRs and ports so that
//!   [`PolicySet::check`] runs per connection without allocating.
//!
//! ```yaml
//! apiVersion: security.sockmesh.io/v1
//! kind: AuthorizationPolicy
//! metadata:
//!   name: allow-frontend
//!   namespace: shop
//! spec:
//!   selector:
//!     matchLabels: {app: cart}
//!   action: ALLOW
//!   rules:
//!   - from:
//!     - source:
//!         principals: ["cluster.local/ns/shop/sa/frontend"]
//!     - source:
//!         namespaces: ["ops"]
//!         notIpBlocks: ["10.0.99.0/24"]
//!     to:
//!     - operation:
//!         ports: ["8080"]
//! ```
//!
//! # Semantics (Istio's, for L4)
//!
//! - **Scope.** A policy applies to the workloads of its own namespace whose
//!   labels contain every `selector.matchLabels` pair (no selector, or an
//!   empty one: every workload of the namespace). A policy in the root
//!   namespace ([`DEFAULT_ROOT_NAMESPACE`] unless configured) applies to
//!   matching workloads of every namespace.
//! - **Order.** DENY policies first: if any rule of a DENY policy that
//!   applies to the workload matches, the connection is denied. Then, if no
//!   ALLOW policy applies to the workload, it is allowed; otherwise it is
//!   allowed only if a rule of an applying ALLOW policy matches.
//! - **Rules.** A policy matches if any of its rules matches; a policy with
//!   no rules matches nothing (so an ALLOW policy with `spec: {}` allows
//!   nothing and denies every connection to the workloads it selects, while
//!   `rules: [{}]` allows everything). A rule matches if (it has no `from`
//!   or any `from` entry matches) and (it has no `to` or any `to` entry
//!   matches). Within a `source` or `operation`, the fields are ANDed and the
//!   values of one field ORed; a `not*` field matches when none of its values
//!   does.
//! - **Values.** Principals and namespaces are exact strings, `*` (any
//!   authenticated peer), a prefix `foo*` or a suffix `*foo`. Principals may be
//!   written Istio-style (`cluster.local/ns/NS/sa/SA`) or as SPIFFE IDs
//!   (`spiffe://cluster.local/ns/NS/sa/SA`); both are compared with the
//!   peer's SPIFFE ID without its `spiffe://` scheme. `ipBlocks` are CIDRs or
//!   single addresses, IPv4 or IPv6. Ports are `"8080"` (Istio's form) or
//!   `8080`.
//! - **Plaintext peers.** A connection without mTLS has no principal and no
//!   namespace. As in Istio (see ztunnel's `rbac.rs` and the advisory
//!   ISTIO-SECURITY-2021-004), `principals` and `namespaces` never match it,
//!   and `notPrincipals` and `notNamespaces` always do: a plaintext peer is
//!   "not" every principal. So `notPrincipals: ["*"]` matches exactly the
//!   plaintext peers (use it in a DENY policy to refuse plaintext), and an
//!   ALLOW rule with only `notNamespaces: ["foo"]` also admits plaintext
//!   traffic, whatever pod sent it.
//!
//! # Validation (what Istio's webhook refuses, refused here too)
//!
//! A DENY policy without `rules` (it could never match), an empty `from` or
//! `to` list, a `source` or `operation` without any field, an empty value, a
//! wildcard in a selector, a bad port or CIDR.
//!
//! # Deliberate differences from Istio
//!
//! - L7-only fields (`methods`, `paths`, `hosts`, `requestPrincipals`,
//!   `remoteIpBlocks`, `when`, `provider`, ...) and the CUSTOM and AUDIT
//!   actions are refused, not ignored; so are `targetRef(s)` and
//!   `serviceAccounts`, and unknown fields.
//! - Port 0 is refused (Istio accepts it; it can never match a connection).
//! - A `*` inside a value (`a*b`, `**`) is refused; Istio reads it as a
//!   literal that no peer has.
//! - `metadata.namespace` is required: a file has no current namespace.
//! - No trust-domain aliasing: a principal matches only the peer's own trust
//!   domain (Istio can rewrite `cluster.local` to the mesh's trust domain).
//! - IPv4-mapped IPv6 addresses and blocks (`::ffff:10.0.0.0/104`) count as
//!   IPv4, so a dual-stack listener sees the same policy as an IPv4 one.

mod engine;
mod model;
mod parse;

pub use engine::{Decision, Destination, PolicyRef, PolicySet, Request, Source, Verdict};
pub use model::{Action, ApiVersion, AuthorizationPolicy, IpBlock, Operation, Rule, SourceMatch};
pub use parse::{
    MAX_INPUT_BYTES, MAX_POLICIES, MAX_RULE_ENTRIES, MAX_RULES, MAX_SELECTOR_LABELS, MAX_VALUE_LEN,
    MAX_VALUES, MAX_YAML_NODES, PolicyError, parse_policies, to_yaml,
};

/// The namespace whose policies apply to workloads of every namespace,
/// unless the operator configures another one.
pub const DEFAULT_ROOT_NAMESPACE: &str = "sockmesh-system";

/// Fuzz entry point for the policy parser and engine (called by
/// `fuzz/fuzz_targets/policy_yaml.rs` and by unit tests over seeds).
///
/// Feeds the bytes, as UTF-8, to [`parse_policies`]. Whatever parses must
/// print back with [`to_yaml`] and parse again to the same policies, and a
/// few fixed requests are evaluated against it: [`PolicySet::check`] and
/// [`PolicySet::evaluate`] must agree. Panics only on a broken invariant.
pub fn fuzz_policy_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policies) = parse_policies(text) else {
        return;
    };
    match to_yaml(&policies) {
        Ok(printed) => match parse_policies(&printed) {
            Ok(again) => assert_eq!(again, policies, "printed policies parse differently"),
            Err(err) => panic!("printed policies do not parse: {err}\n{printed}"),
        },
        Err(err) => panic!("accepted policies do not print: {err}"),
    }
    let set = PolicySet::new(policies, DEFAULT_ROOT_NAMESPACE);
    for request in engine::fuzz_requests() {
        let verdict = set.check(&request).allowed();
        let decision = set.evaluate(&request);
        assert_eq!(verdict, decision.allowed, "check and evaluate disagree");
        assert!(!decision.reason.is_empty(), "decision without a reason");
    }
}
