//! Istio AuthorizationPolicy L4 semantics, rule by rule: each case is a set
//! of policies, a connection, and the decision a user would see.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use mesh_core::policy::{
    Action, DEFAULT_ROOT_NAMESPACE, Decision, Destination, PolicyRef, PolicySet, Request, Source,
    parse_policies,
};

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const API: &str = "spiffe://cluster.local/ns/prod/sa/api";

fn set(yaml: &str) -> PolicySet {
    set_with_root(yaml, DEFAULT_ROOT_NAMESPACE)
}

fn set_with_root(yaml: &str, root: &str) -> PolicySet {
    match parse_policies(yaml) {
        Ok(policies) => PolicySet::new(policies, root),
        Err(err) => panic!("test policy does not parse: {err}"),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An mTLS peer; its namespace is left for the engine to derive.
fn mtls(id: &str, addr: &str) -> Source {
    Source {
        principal: Some(id.to_owned()),
        namespace: None,
        ip: ip(addr),
    }
}

fn plaintext(addr: &str) -> Source {
    Source {
        principal: None,
        namespace: None,
        ip: ip(addr),
    }
}

fn dest(namespace: &str, labels: &[(&str, &str)], port: u16) -> Destination {
    Destination {
        namespace: namespace.to_owned(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
        port,
    }
}

fn web(port: u16) -> Destination {
    dest("default", &[("app", "web")], port)
}

fn eval(set: &PolicySet, source: Source, destination: Destination) -> Decision {
    let request = Request {
        source,
        destination,
    };
    let decision = set.evaluate(&request);
    assert_eq!(
        set.check(&request).allowed(),
        decision.allowed,
        "check and evaluate disagree: {decision:?}"
    );
    decision
}

fn policy_ref(namespace: &str, name: &str, action: Action) -> Option<PolicyRef> {
    Some(PolicyRef {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        action,
    })
}

/// One ALLOW or DENY policy in `default` with one rule made of `rule_yaml`
/// (indented as the body of a rule list item).
fn one_rule(action: &str, rule_yaml: &str) -> String {
    format!(
        "apiVersion: security.sockmesh.io/v1
kind: AuthorizationPolicy
metadata: {{name: p, namespace: default}}
spec:
  action: {action}
  rules:
  - {rule_yaml}
"
    )
}

/// Whether an ALLOW policy in `default` whose only rule is `rule_yaml`
/// admits the connection.
fn allows(rule_yaml: &str, source: Source, destination: Destination) -> bool {
    eval(&set(&one_rule("ALLOW", rule_yaml)), source, destination).allowed
}

// ---------------------------------------------------------------------------
// Policy order and scope.

#[test]
fn no_policy_allows_and_says_so() {
    let d = eval(&PolicySet::default(), mtls(WEB, "10.0.0.1"), web(8080));
    assert!(d.allowed);
    assert_eq!(d.policy, None);
    assert_eq!(d.rule, None);
    assert_eq!(
        d.reason,
        "allowed: no DENY rule matched and no ALLOW policy selects workload {app=web} in namespace default"
    );
}

#[test]
fn deny_wins_over_a_matching_allow() {
    let s = set("
apiVersion: security.sockmesh.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: default}
spec:
  rules: [{}]
---
apiVersion: security.sockmesh.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-web, namespace: default}
spec:
  action: DENY
  rules:
  - from:
    - source: {principals: [cluster.local/ns/default/sa/web]}
");
    let d = eval(&s, mtls(WEB, "10.0.0.1"), web(8080));
    assert!(!d.allowed);
    assert_eq!(d.policy, policy_ref("default", "deny-web", Action::Deny));
    assert_eq!(d.rule, Some(0));
    assert_eq!(d.reason, "denied by DENY policy default/deny-web rules[0]");

    let d = eval(&s, mtls(API, "10.0.0.2"), web(8080));
    assert!(d.allowed);
    assert_eq!(d.policy, policy_ref("default", "allow-all", Action::Allow));
    assert_eq!(
        d.reason,
        "allowed by ALLOW policy default/allow-all rules[0]"
    );
}

#[test]
fn only_deny_policies_leave_the_rest_allowed() {
    let s = set(&one_rule("DENY", "to: [{operation: {ports: ['22']}}]"));
    assert!(!eval(&s, mtls(WEB, "10.0.0.1"), web(22)).allowed);
    let d = eval(&s, mtls(WEB, "10.0.0.1"), web(80));
    assert!(d.allowed);
    assert_eq!(d.policy, None);
}

#[test]
fn empty_spec_allows_nothing() {
    let s = set("
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: default}
spec: {}
");
    for source in [mtls(WEB, "10.0.0.1"), plaintext("10.0.0.9")] {
        let d = eval(&s, source, web(8080));
        assert!(!d.allowed);
        assert_eq!(d.policy, None);
        assert_eq!(
            d.reason,
            "denied: ALLOW policy default/allow-nothing selects workload {app=web} in namespace default and has no rules, so it allows nothing"
        );
    }
    // A workload of another namespace is not in scope.
    assert!(eval(&s, mtls(WEB, "10.0.0.1"), dest("prod", &[], 80)).allowed);
}

#[test]
fn missing_spec_is_allow_nothing_too() {
    let s = set("
apiVersion: security.sockmesh.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: default}
");
    assert!(!eval(&s, mtls(WEB, "10.0.0.1"), web(1)).allowed);
}

#[test]
fn empty_rule_allows_everything() {
    assert!(allows("{}", plaintext("1.2.3.4"), web(1)));
    assert!(allows("{}", mtls(API, "2001:db8::1"), web(65535)));
}

#[test]
fn empty_rule_in_deny_denies_everything() {
    let s = set(&one_rule("DENY", "{}"));
    let d = eval(&s, plaintext("1.2.3.4"), web(80));
    assert!(!d.allowed);
    assert_eq!(d.reason, "denied by DENY policy default/p rules[0]");
}

#[test]
fn allow_policies_that_do_not_match_deny_and_are_all_named() {
    let s = set("
- apiVersion: security.sockmesh.io/v1
  kind: AuthorizationPolicy
  metadata: {name: allow-b, namespace: default}
  spec:
    rules: [{from: [{source: {principals: [cluster.local/ns/x/sa/b]}}]}]
- apiVersion: security.sockmesh.io/v1
  kind: AuthorizationPolicy
  metadata: {name: allow-a, namespace: default}
  spec:
    rules: [{from: [{source: {principals: [cluster.local/ns/x/sa/a]}}]}]
");
    let d = eval(&s, mtls(WEB, "10.0.0.1"), web(8080));
    assert!(!d.allowed);
    assert_eq!(d.policy, None);
    assert_eq!(
        d.reason,
        "denied: ALLOW policies default/allow-a, default/allow-b select workload {app=web} in namespace default \
         and none matched (from spiffe://cluster.local/ns/default/sa/web at 10.0.0.1 to port 8080)"
    );

    let d = eval(&s, plaintext("10.0.0.7"), web(80));
    assert!(
        d.reason
            .ends_with("(from plaintext peer 10.0.0.7 to port 80)"),
        "{}",
        d.reason
    );
}

#[test]
fn single_allow_policy_that_does_not_match() {
    let s = set(&one_rule("ALLOW", "to: [{operation: {ports: ['443']}}]"));
    let d = eval(&s, mtls(WEB, "10.0.0.1"), web(80));
    assert_eq!(
        d.reason,
        "denied: ALLOW policy default/p selects workload {app=web} in namespace default and none of its rules \
         matched (from spiffe://cluster.local/ns/default/sa/web at 10.0.0.1 to port 80)"
    );
}

#[test]
fn the_rule_that_decided_is_named() {
    let s = set("
apiVersion: security.sockmesh.io/v1
kind: AuthorizationPolicy
metadata: {name: multi, namespace: default}
spec:
  rules:
  - to: [{operation: {ports: ['1']}}]
  - to: [{operation: {ports: ['2']}}]
  - to: [{operation: {ports: ['3']}}]
");
    let d = eval(&s, plaintext("10.0.0.1"), web(3));
    assert!(d.allowed);
    assert_eq!(d.rule, Some(2));
    assert_eq!(d.reason, "allowed by ALLOW policy default/multi rules[2]");
}

#[test]
fn selector_limits_the_workloads() {
    let s = set("
apiVersion: security.sockmesh.io/v1
kind: AuthorizationPolicy
metadata: {name: web-only, namespace: default}
spec:
  selector:
    matchLabels: {app: web, tier: front}
");
    // Every selector label must be present with its value; extra labels are fine.
    let selected = dest(
        "default",
        &[("app", "web"), ("tier", "front"), ("x", "y")],
        80,
    );
    assert!(!eval(&s, plaintext("10.0.0.1"), selected).allowed);
    let partial = dest("default", &[("app", "web")], 80);
    assert!(eval(&s, plaintext("10.0.0.1"), partial).allowed);
    let other_value = dest("default", &[("app", "web"), ("tier", "back")], 80);
    assert!(eval(&s, plaintext("10.0.0.1"), other_value).allowed);
    let d = eval(&s, plaintext("10.0.0.1"), dest("default", &[], 80));
    assert_eq!(
        d.reason,
        "allowed: no DENY rule matched and no ALLOW policy selects workload with no labels in namespace default"
    );
}

#[test]
fn empty_selector_selects_the_whole_namespace() {
    let s = set("
apiVersion: security.sockmesh.io/v1
kind: AuthorizationPolicy
metadata: {name: all, namespace: default}
spec:
  selector: {matchLabels: {}}
");
    assert!(
        !eval(
            &s,
            plaintext("10.0.0.1"),
            dest("default", &[("a", "b")], 80)
        )
        .allowed
    );
    assert!(!eval(&s, plaintext("10.0.0.1"), dest("default", &[], 80)).allowed);
    assert!(eval(&s, plaintext("10.0.0.1"), dest("prod", &[], 80)).allowed);
}

#[test]
fn policy_applies_only_in_its_namespace() {
    let s = set(&one_rule("DENY", "{}"));
    assert!(!eval(&s, plaintext("10.0.0.1"), dest("default", &[], 80)).allowed);
    assert!(eval(&s, plaintext("10.0.0.1"), dest("prod", &[], 80)).allowed);
    assert!(
        eval(
            &s,
            plaintext("10.0.0.1"),
            dest(DEFAULT_ROOT_NAMESPACE, &[], 80)
        )
        .allowed
    );
}

const ROOT_DENY_DB: &str = "
apiVersion: security.sockmesh.io/v1
kind: AuthorizationPolicy
metadata: {name: no-plaintext-db, namespace: sockmesh-system}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules:
  - from: [{source: {notPrincipals: ['*']}}]
";

#[test]
fn root_namespace_policies_apply_everywhere() {
    let s = set(ROOT_DENY_DB);
    for ns in ["default", "prod", DEFAULT_ROOT_NAMESPACE] {
        let d = eval(&s, plaintext("10.0.0.1"), dest(ns, &[("app", "db")], 5432));
        assert!(!d.allowed, "{ns}");
        assert_eq!(
            d.reason,
            "denied by DENY policy sockmesh-system/no-plaintext-db rules[0]"
        );
        // Selector still applies, and mTLS peers are not "not *".
        assert!(eval(&s, plaintext("10.0.0.1"), dest(ns, &[("app", "web")], 80)).allowed);
        assert!(eval(&s, mtls(WEB, "10.0.0.1"), dest(ns, &[("app", "db")], 5432)).allowed);
    }
}

#[test]
fn root_namespace_is_configurable() {
    let s = set_with_root(ROOT_DENY_DB, "istio-system");
    assert_eq!(s.root_namespace(), "istio-system");
    // sockmesh-system is now an ordinary namespace.
    assert!(
        eval(
            &s,
            plaintext("10.0.0.1"),
            dest("prod", &[("app", "db")], 5432)
        )
        .allowed
    );
    assert!(
        !eval(
            &s,
            plaintext("10.0.0.1"),
            dest(DEFAULT_ROOT_NAMESPACE, &[("app", "db")], 5432)
        )
        .allowed
    );
}

#[test]
fn root_allow_policy_makes_other_namespaces_deny_by_default() {
    let s = set("
apiVersion: security.sockmesh.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-allow-prod, namespace: sockmesh-system}
spec:
  rules: [{from: [{source: {namespaces: [prod]}}]}]
");
    assert!(eval(&s, mtls(API, "10.0.0.1"), dest("default", &[], 80)).allowed);
    let d = eval(&s, mtls(WEB, "10.0.0.1"), dest("shop", &[], 80));
    assert!(!d.allowed);
    assert!(d.reason.starts_with("denied: ALLOW policy sockmesh-system/mesh-allow-prod selects workload with no labels in namespace shop"), "{}", d.reason);
}

#[test]
fn policies_for_lists_what_applies() {
    let s = set(&format!("{ROOT_DENY_DB}---\n{}", one_rule("ALLOW", "{}")));
    let names: Vec<&str> = s
        .policies_for(&dest("default", &[("app", "db")], 1))
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["no-plaintext-db", "p"]);
    assert_eq!(s.policies_for(&dest("prod", &[], 1)).len(), 0);
}

// ---------------------------------------------------------------------------
// Rule structure.

#[test]
fn from_entries_are_ored_and_source_fields_anded() {
    let rule = "from:
    - source: {principals: [cluster.local/ns/default/sa/web], ipBlocks: [10.0.0.0/24]}
    - source: {namespaces: [prod]}";
    // First source: both fields must hold.
    assert!(allows(rule, mtls(WEB, "10.0.0.5"), web(80)));
    assert!(!allows(rule, mtls(WEB, "10.9.0.5"), web(80)));
    // Second source alone.
    assert!(allows(rule, mtls(API, "192.168.0.1"), web(80)));
    assert!(!allows(rule, plaintext("10.0.0.5"), web(80)));
}

#[test]
fn values_within_a_field_are_ored() {
    let rule = "from: [{source: {principals: [cluster.local/ns/x/sa/y, cluster.local/ns/default/sa/web]}}]";
    assert!(allows(rule, mtls(WEB, "10.0.0.1"), web(80)));
    assert!(!allows(rule, mtls(API, "10.0.0.1"), web(80)));
}

#[test]
fn from_and_to_must_both_match() {
    let rule = "from: [{source: {namespaces: [default]}}]
    to: [{operation: {ports: ['8080']}}, {operation: {ports: ['9090']}}]";
    assert!(allows(rule, mtls(WEB, "10.0.0.1"), web(8080)));
    assert!(allows(rule, mtls(WEB, "10.0.0.1"), web(9090)));
    assert!(!allows(rule, mtls(WEB, "10.0.0.1"), web(80)));
    assert!(!allows(rule, mtls(API, "10.0.0.1"), web(8080)));
}

// ---------------------------------------------------------------------------
// Principals, namespaces and plaintext peers.

#[test]
fn principals_in_istio_and_spiffe_form() {
    for value in [
        "cluster.local/ns/default/sa/web",
        "spiffe://cluster.local/ns/default/sa/web",
    ] {
        let rule = format!("from: [{{source: {{principals: ['{value}']}}}}]");
        assert!(allows(&rule, mtls(WEB, "10.0.0.1"), web(80)), "{value}");
        assert!(!allows(&rule, mtls(API, "10.0.0.1"), web(80)), "{value}");
        assert!(!allows(&rule, plaintext("10.0.0.1"), web(80)), "{value}");
        // The trust domain is part of the principal.
        let foreign = mtls("spiffe://other.td/ns/default/sa/web", "10.0.0.1");
        assert!(!allows(&rule, foreign, web(80)), "{value}");
    }
}

#[test]
fn principal_wildcards() {
    let cases: &[(&str, &str, bool)] = &[
        ("*", WEB, true),
        ("spiffe://*", WEB, true),
        ("cluster.local/ns/default/*", WEB, true),
        ("cluster.local/ns/default/*", API, false),
        ("spiffe://cluster.local/ns/prod/*", API, true),
        ("*/sa/web", WEB, true),
        ("*/sa/web", API, false),
        ("*/sa/api", API, true),
        ("cluster.local/ns/default/sa/web*", WEB, true),
    ];
    for &(pattern, peer, expected) in cases {
        let rule = format!("from: [{{source: {{principals: ['{pattern}']}}}}]");
        assert_eq!(
            allows(&rule, mtls(peer, "10.0.0.1"), web(80)),
            expected,
            "{pattern} vs {peer}"
        );
        assert!(
            !allows(&rule, plaintext("10.0.0.1"), web(80)),
            "{pattern} vs plaintext"
        );
    }
}

#[test]
fn star_means_any_authenticated_peer() {
    let rule = "from: [{source: {principals: ['*']}}]";
    assert!(allows(
        rule,
        mtls("spiffe://a.b/ns/c/sa/d", "10.0.0.1"),
        web(80)
    ));
    assert!(!allows(rule, plaintext("10.0.0.1"), web(80)));
    // An empty SPIFFE ID is no identity.
    let empty = Source {
        principal: Some(String::new()),
        namespace: None,
        ip: ip("10.0.0.1"),
    };
    assert!(!allows(rule, empty, web(80)));
}

#[test]
fn not_principals_excludes_and_admits_plaintext() {
    let rule = "from: [{source: {notPrincipals: [cluster.local/ns/default/sa/web]}}]";
    assert!(!allows(rule, mtls(WEB, "10.0.0.1"), web(80)));
    assert!(allows(rule, mtls(API, "10.0.0.1"), web(80)));
    // Istio: a plaintext peer is "not" every principal.
    assert!(allows(rule, plaintext("10.0.0.1"), web(80)));
}

#[test]
fn deny_not_principals_star_refuses_exactly_plaintext() {
    let s = set(&one_rule(
        "DENY",
        "from: [{source: {notPrincipals: ['*']}}]",
    ));
    let d = eval(&s, plaintext("10.0.0.1"), web(80));
    assert!(!d.allowed);
    assert_eq!(d.reason, "denied by DENY policy default/p rules[0]");
    assert!(eval(&s, mtls(WEB, "10.0.0.1"), web(80)).allowed);
}

#[test]
fn namespaces_and_not_namespaces() {
    let rule = "from: [{source: {namespaces: [prod, 'def*']}}]";
    assert!(allows(rule, mtls(WEB, "10.0.0.1"), web(80)));
    assert!(allows(rule, mtls(API, "10.0.0.1"), web(80)));
    assert!(!allows(
        rule,
        mtls("spiffe://cluster.local/ns/shop/sa/x", "10.0.0.1"),
        web(80)
    ));
    assert!(!allows(rule, plaintext("10.0.0.1"), web(80)));

    let rule = "from: [{source: {namespaces: ['*od']}}]";
    assert!(allows(rule, mtls(API, "10.0.0.1"), web(80)));
    assert!(!allows(rule, mtls(WEB, "10.0.0.1"), web(80)));

    // ISTIO-SECURITY-2021-004: notNamespaces admits plaintext peers.
    let rule = "from: [{source: {notNamespaces: [prod]}}]";
    assert!(allows(rule, mtls(WEB, "10.0.0.1"), web(80)));
    assert!(!allows(rule, mtls(API, "10.0.0.1"), web(80)));
    assert!(allows(rule, plaintext("10.0.0.1"), web(80)));
}

#[test]
fn namespace_comes_from_the_source_or_the_principal() {
    let rule = "from: [{source: {namespaces: [prod]}}]";
    // Given explicitly.
    let explicit = Source {
        principal: Some(API.to_owned()),
        namespace: Some("prod".to_owned()),
        ip: ip("10.0.0.1"),
    };
    assert!(allows(rule, explicit, web(80)));
    // A plaintext peer has no namespace, whatever the field says.
    let claimed = Source {
        principal: None,
        namespace: Some("prod".to_owned()),
        ip: ip("10.0.0.1"),
    };
    assert!(!allows(rule, claimed.clone(), web(80)));
    let rule_not = "from: [{source: {notNamespaces: [prod]}}]";
    assert!(allows(rule_not, claimed, web(80)));
}

// ---------------------------------------------------------------------------
// IP blocks and ports.

#[test]
fn ip_blocks_v4_v6_and_single_addresses() {
    let rule = "from: [{source: {ipBlocks: [10.1.0.0/16, 192.168.7.7, '2001:db8::/32', '::1']}}]";
    let cases = [
        ("10.1.255.3", true),
        ("10.2.0.1", false),
        ("192.168.7.7", true),
        ("192.168.7.8", false),
        ("2001:db8:ffff::9", true),
        ("2001:db9::1", false),
        ("::1", true),
        // A dual-stack socket reports IPv4 peers as IPv4-mapped IPv6.
        ("::ffff:10.1.0.1", true),
        ("::ffff:10.3.0.1", false),
    ];
    let mapped_rule = "from: [{source: {ipBlocks: ['::ffff:10.1.0.0/112']}}]";
    assert!(allows(mapped_rule, plaintext("10.1.0.9"), web(80)));
    assert!(allows(mapped_rule, plaintext("::ffff:10.1.0.9"), web(80)));
    assert!(!allows(mapped_rule, plaintext("10.2.0.9"), web(80)));
    for (addr, expected) in cases {
        assert_eq!(allows(rule, plaintext(addr), web(80)), expected, "{addr}");
        assert_eq!(
            allows(rule, mtls(WEB, addr), web(80)),
            expected,
            "{addr} (mTLS)"
        );
    }
}

#[test]
fn ip_block_host_bits_and_zero_prefix() {
    assert!(allows(
        "from: [{source: {ipBlocks: [10.1.2.3/8]}}]",
        plaintext("10.200.0.1"),
        web(80)
    ));
    let any_v4 = "from: [{source: {ipBlocks: [0.0.0.0/0]}}]";
    assert!(allows(any_v4, plaintext("203.0.113.9"), web(80)));
    assert!(!allows(any_v4, plaintext("2001:db8::1"), web(80)));
    let any_v6 = "from: [{source: {ipBlocks: ['::/0']}}]";
    assert!(allows(any_v6, plaintext("2001:db8::1"), web(80)));
    assert!(!allows(any_v6, plaintext("10.0.0.1"), web(80)));
}

#[test]
fn not_ip_blocks() {
    let rule = "from: [{source: {notIpBlocks: [10.0.0.0/8, 'fd00::/8']}}]";
    assert!(!allows(rule, plaintext("10.4.4.4"), web(80)));
    assert!(!allows(rule, plaintext("fd12::1"), web(80)));
    assert!(allows(rule, plaintext("11.0.0.1"), web(80)));
    assert!(allows(rule, plaintext("2001:db8::1"), web(80)));
    let both = "from: [{source: {ipBlocks: [10.0.0.0/8], notIpBlocks: [10.9.0.0/16]}}]";
    assert!(allows(both, plaintext("10.1.0.1"), web(80)));
    assert!(!allows(both, plaintext("10.9.0.1"), web(80)));
}

#[test]
fn ports_and_not_ports() {
    let rule = "to: [{operation: {ports: ['80', 443, '8080']}}]";
    for (port, expected) in [
        (80, true),
        (443, true),
        (8080, true),
        (81, false),
        (8443, false),
    ] {
        assert_eq!(
            allows(rule, plaintext("10.0.0.1"), web(port)),
            expected,
            "{port}"
        );
    }
    let rule = "to: [{operation: {notPorts: ['22']}}]";
    assert!(!allows(rule, plaintext("10.0.0.1"), web(22)));
    assert!(allows(rule, plaintext("10.0.0.1"), web(23)));
    let rule = "to: [{operation: {ports: ['22', '80'], notPorts: ['22']}}]";
    assert!(!allows(rule, plaintext("10.0.0.1"), web(22)));
    assert!(allows(rule, plaintext("10.0.0.1"), web(80)));
}

#[test]
fn deny_on_port_only_leaves_other_ports() {
    let s = set(&one_rule(
        "DENY",
        "from: [{source: {notNamespaces: [default]}}]
    to: [{operation: {ports: ['5432']}}]",
    ));
    assert!(!eval(&s, mtls(API, "10.0.0.1"), web(5432)).allowed);
    assert!(!eval(&s, plaintext("10.0.0.1"), web(5432)).allowed);
    assert!(eval(&s, mtls(WEB, "10.0.0.1"), web(5432)).allowed);
    assert!(eval(&s, mtls(API, "10.0.0.1"), web(80)).allowed);
}

#[test]
fn first_matching_deny_policy_in_name_order_is_reported() {
    let s = set("
apiVersion: security.sockmesh.io/v1
kind: AuthorizationPolicy
metadata: {name: zz-deny, namespace: default}
spec: {action: DENY, rules: [{}]}
---
apiVersion: security.sockmesh.io/v1
kind: AuthorizationPolicy
metadata: {name: aa-deny, namespace: default}
spec: {action: DENY, rules: [{to: [{operation: {ports: ['1']}}]}, {}]}
---
apiVersion: security.sockmesh.io/v1
kind: AuthorizationPolicy
metadata: {name: root-deny, namespace: sockmesh-system}
spec: {action: DENY, rules: [{to: [{operation: {ports: ['2']}}]}]}
");
    let d = eval(&s, plaintext("10.0.0.1"), web(80));
    assert_eq!(d.reason, "denied by DENY policy default/aa-deny rules[1]");
    // Root namespace policies come first.
    let d = eval(&s, plaintext("10.0.0.1"), web(2));
    assert_eq!(
        d.reason,
        "denied by DENY policy sockmesh-system/root-deny rules[0]"
    );
}
