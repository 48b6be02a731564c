//! Reading AuthorizationPolicy YAML: the forms accepted, and every refusal
//! with the exact message a user sees.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use mesh_core::policy::{
    Action, ApiVersion, AuthorizationPolicy, IpBlock, MAX_INPUT_BYTES, MAX_POLICIES, MAX_RULES,
    MAX_VALUE_LEN, MAX_VALUES, MAX_YAML_NODES, Operation, PolicyError, Rule, SourceMatch,
    fuzz_policy_yaml, parse_policies, to_yaml,
};

fn parse_one(yaml: &str) -> AuthorizationPolicy {
    let mut policies = parse_policies(yaml).unwrap();
    assert_eq!(policies.len(), 1, "{policies:?}");
    policies.remove(0)
}

fn error(yaml: &str) -> String {
    match parse_policies(yaml) {
        Ok(p) => panic!("accepted: {p:?}"),
        Err(err) => err.to_string(),
    }
}

/// A policy `default/p` whose spec is `spec` (indented by two spaces).
fn with_spec(spec: &str) -> String {
    format!(
        "apiVersion: security.sockmesh.io/v1
kind: AuthorizationPolicy
metadata:
  name: p
  namespace: default
spec:
{spec}"
    )
}

/// A policy `default/p` with one ALLOW rule whose only `from` source is `source`.
fn with_source(source: &str) -> String {
    with_spec(&format!("  rules:\n  - from:\n    - source: {source}\n"))
}

/// A policy `default/p` with one ALLOW rule whose only `to` operation is `op`.
fn with_operation(op: &str) -> String {
    with_spec(&format!("  rules:\n  - to:\n    - operation: {op}\n"))
}

const FULL: &str = r#"
apiVersion: security.sockmesh.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-frontend
  namespace: shop
  labels: {team: payments}
  annotations: {note: "ignored"}
spec:
  selector:
    matchLabels:
      app: cart
      version: "1"
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/frontend", "spiffe://cluster.local/ns/ops/*"]
        notPrincipals: ["*/sa/legacy"]
    - source:
        namespaces: [ops, "prod-*"]
        notNamespaces: ["*-test"]
        ipBlocks: [10.0.0.0/8, 192.168.1.10, "2001:db8::/32", "::1"]
        notIpBlocks: [10.99.0.0/16]
    to:
    - operation:
        ports: ["8080", 9090]
        notPorts: ["22"]
  - {}
"#;

#[test]
fn full_policy_parses_to_the_model() {
    let p = parse_one(FULL);
    let ipb = |s: &str| IpBlock::parse(s).unwrap();
    let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let expected = AuthorizationPolicy {
        api_version: ApiVersion::SockmeshV1,
        name: "allow-frontend".to_owned(),
        namespace: "shop".to_owned(),
        selector: Some(BTreeMap::from([
            ("app".to_owned(), "cart".to_owned()),
            ("version".to_owned(), "1".to_owned()),
        ])),
        action: Action::Allow,
        rules: vec![
            Rule {
                from: vec![
                    SourceMatch {
                        principals: strings(&[
                            "cluster.local/ns/shop/sa/frontend",
                            "spiffe://cluster.local/ns/ops/*",
                        ]),
                        not_principals: strings(&["*/sa/legacy"]),
                        ..SourceMatch::default()
                    },
                    SourceMatch {
                        namespaces: strings(&["ops", "prod-*"]),
                        not_namespaces: strings(&["*-test"]),
                        ip_blocks: vec![
                            ipb("10.0.0.0/8"),
                            ipb("192.168.1.10/32"),
                            ipb("2001:db8::/32"),
                            ipb("::1"),
                        ],
                        not_ip_blocks: vec![ipb("10.99.0.0/16")],
                        ..SourceMatch::default()
                    },
                ],
                to: vec![Operation {
                    ports: vec![8080, 9090],
                    not_ports: vec![22],
                }],
            },
            Rule::default(),
        ],
    };
    assert_eq!(p, expected);
}

#[test]
fn printed_policy_parses_back_identically() {
    let policies = parse_policies(FULL).unwrap();
    let printed = to_yaml(&policies).unwrap();
    assert!(
        printed.contains("- '8080'") || printed.contains("- \"8080\""),
        "{printed}"
    );
    assert_eq!(parse_policies(&printed).unwrap(), policies, "{printed}");
}

#[test]
fn istio_api_versions_are_accepted_and_kept() {
    for (api, expected) in [
        ("security.sockmesh.io/v1", ApiVersion::SockmeshV1),
        ("security.istio.io/v1", ApiVersion::IstioV1),
        ("security.istio.io/v1beta1", ApiVersion::IstioV1beta1),
    ] {
        let p = parse_one(&format!(
            "apiVersion: {api}\nkind: AuthorizationPolicy\nmetadata: {{name: a, namespace: b}}\nspec: {{}}\n"
        ));
        assert_eq!(p.api_version, expected);
        assert!(
            to_yaml(&[p])
                .unwrap()
                .starts_with(&format!("apiVersion: {api}\n"))
        );
    }
}

#[test]
fn multi_document_yaml_skips_empty_documents() {
    let yaml = "---
apiVersion: security.sockmesh.io/v1
kind: AuthorizationPolicy
metadata: {name: one, namespace: default}
---
# only a comment
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: two, namespace: default}
spec: {action: DENY, rules: [{}]}
---
";
    let policies = parse_policies(yaml).unwrap();
    let names: Vec<_> = policies
        .iter()
        .map(|p| (p.name.as_str(), p.action))
        .collect();
    assert_eq!(names, [("one", Action::Allow), ("two", Action::Deny)]);
}

#[test]
fn yaml_list_and_kubernetes_list_parse() {
    let list = "
- apiVersion: security.sockmesh.io/v1
  kind: AuthorizationPolicy
  metadata: {name: a, namespace: default}
- apiVersion: security.sockmesh.io/v1
  kind: AuthorizationPolicy
  metadata: {name: b, namespace: default}
";
    assert_eq!(parse_policies(list).unwrap().len(), 2);
    let kube = "
apiVersion: v1
kind: List
metadata: {resourceVersion: \"\"}
items:
- apiVersion: security.istio.io/v1beta1
  kind: AuthorizationPolicy
  metadata:
    name: a
    namespace: default
    uid: 1f7a
    resourceVersion: \"42\"
    generation: 1
    creationTimestamp: \"2024-01-01T00:00:00Z\"
  spec: {}
  status: {}
";
    assert_eq!(parse_policies(kube).unwrap()[0].name, "a");
}

#[test]
fn empty_input_is_no_policies() {
    assert_eq!(parse_policies("").unwrap(), []);
    assert_eq!(parse_policies("---\n---\n").unwrap(), []);
    assert_eq!(parse_policies("[]").unwrap(), []);
}

#[test]
fn null_fields_count_as_absent() {
    let p = parse_one(&with_spec(
        "  action: ~\n  selector: ~\n  rules:\n  - from: ~\n    to: ~\n",
    ));
    assert_eq!(p.action, Action::Allow);
    assert_eq!(p.selector, None);
    assert_eq!(p.rules, [Rule::default()]);
}

#[test]
fn ip_blocks_are_normalised() {
    let p = parse_one(&with_source(
        "{ipBlocks: [10.1.2.3/8, '2001:db8::1/128', 0.0.0.0/0]}",
    ));
    let printed: Vec<String> = p.rules[0].from[0]
        .ip_blocks
        .iter()
        .map(|b| b.to_string())
        .collect();
    assert_eq!(printed, ["10.0.0.0/8", "2001:db8::1", "0.0.0.0/0"]);
    // IPv4-mapped IPv6 blocks are the IPv4 blocks.
    assert_eq!(
        IpBlock::parse("::ffff:10.0.0.0/104"),
        IpBlock::parse("10.0.0.0/8")
    );
    assert_eq!(
        IpBlock::parse("::ffff:10.1.2.3"),
        IpBlock::parse("10.1.2.3")
    );
    assert_ne!(
        IpBlock::parse("::ffff:0:0/95").unwrap().network(),
        "0.0.0.0".parse::<IpAddr>().unwrap()
    );
    let block = IpBlock::parse("10.1.2.3/8").unwrap();
    assert_eq!(block.network(), "10.0.0.0".parse::<IpAddr>().unwrap());
    assert_eq!(block.prefix_len(), 8);
}

// ---------------------------------------------------------------------------
// L7 and unsupported fields.

#[test]
fn l7_fields_are_refused_by_name() {
    let l7 = "L7 fields are not supported; sockmesh enforces L4 only";
    let deny_web = "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: deny-web, namespace: default}
spec:
  action: DENY
  rules:
  - to:
    - operation:
        methods: [GET]
";
    assert_eq!(
        error(deny_web),
        format!("policy default/deny-web: rules[0].to[0].operation.methods: {l7}")
    );
    let cases = [
        (
            with_operation("{paths: [/admin]}"),
            "rules[0].to[0].operation.paths",
        ),
        (
            with_operation("{ports: ['80'], notPaths: [/x]}"),
            "rules[0].to[0].operation.notPaths",
        ),
        (
            with_operation("{hosts: [a.example]}"),
            "rules[0].to[0].operation.hosts",
        ),
        (
            with_operation("{notMethods: [POST]}"),
            "rules[0].to[0].operation.notMethods",
        ),
        (
            with_source("{requestPrincipals: ['*']}"),
            "rules[0].from[0].source.requestPrincipals",
        ),
        (
            with_source("{notRequestPrincipals: ['*']}"),
            "rules[0].from[0].source.notRequestPrincipals",
        ),
        (
            with_source("{remoteIpBlocks: [1.2.3.4]}"),
            "rules[0].from[0].source.remoteIpBlocks",
        ),
        (
            with_spec("  rules:\n  - when:\n    - key: request.headers[x]\n      values: [y]\n"),
            "rules[0].when",
        ),
        (with_spec("  provider: {name: ext-authz}\n"), "provider"),
    ];
    for (yaml, path) in cases {
        assert_eq!(error(&yaml), format!("policy default/p: {path}: {l7}"));
    }
}

#[test]
fn custom_and_audit_actions_are_refused() {
    for action in ["CUSTOM", "AUDIT"] {
        assert_eq!(
            error(&with_spec(&format!(
                "  action: {action}\n  rules: [{{}}]\n"
            ))),
            format!(
                "policy default/p: action: {action} is not supported; sockmesh enforces L4 only (ALLOW or DENY)"
            )
        );
    }
    assert_eq!(
        error(&with_spec("  action: allow\n")),
        "policy default/p: action: invalid value \"allow\": expected ALLOW or DENY"
    );
}

#[test]
fn target_refs_and_service_accounts_are_refused_with_a_hint() {
    assert_eq!(
        error(&with_spec("  targetRefs: [{kind: Service, name: web}]\n")),
        "policy default/p: targetRefs: not supported: sockmesh applies policies to workloads chosen by \
         selector.matchLabels, not to Services or Gateways"
    );
    assert_eq!(
        error(&with_source("{serviceAccounts: [default/web]}")),
        "policy default/p: rules[0].from[0].source.serviceAccounts: not supported yet; write \
         principals: [\"<trust-domain>/ns/<namespace>/sa/<service-account>\"] instead"
    );
}

#[test]
fn unknown_fields_are_refused_with_the_expected_ones() {
    assert_eq!(
        error(&with_source("{principal: [a]}")),
        "policy default/p: rules[0].from[0].source.principal: unknown field; expected one of: \
         principals, notPrincipals, namespaces, notNamespaces, ipBlocks, notIpBlocks"
    );
    assert_eq!(
        error(&with_spec("  rule: []\n")),
        "policy default/p: rule: unknown field; expected one of: selector, action, rules"
    );
    assert_eq!(
        error(&with_spec("  selector: {labels: {a: b}}\n")),
        "policy default/p: selector.labels: unknown field; expected one of: matchLabels"
    );
    assert_eq!(
        error(&with_operation("{port: ['80']}")),
        "policy default/p: rules[0].to[0].operation.port: unknown field; expected one of: ports, notPorts"
    );
    assert_eq!(
        error(&with_spec("  rules:\n  - from: [{src: {}}]\n")),
        "policy default/p: rules[0].from[0].src: unknown field; expected one of: source"
    );
    let top = "apiVersion: security.sockmesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: default}\nsepc: {}\n";
    assert_eq!(
        error(top),
        "policy default/p: sepc: unknown field; expected one of: apiVersion, kind, metadata, spec, status"
    );
    let meta = "apiVersion: security.sockmesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: default, nmae: x}\n";
    assert!(error(meta).starts_with(
        "policy default/p: metadata.nmae: unknown field; expected one of: name, namespace"
    ));
}

// ---------------------------------------------------------------------------
// Bad values.

#[test]
fn bad_ports_are_quoted() {
    let port = |v: &str| error(&with_operation(&format!("{{ports: [{v}]}}")));
    let not_a_port = "not a port number; expected a port number from 1 to 65535";
    let out_of_range = "out of range; expected a port number from 1 to 65535";
    assert_eq!(
        port("abc"),
        format!(
            "policy default/p: rules[0].to[0].operation.ports[0]: invalid value \"abc\": {not_a_port}"
        )
    );
    assert_eq!(
        port("'0'"),
        format!(
            "policy default/p: rules[0].to[0].operation.ports[0]: invalid value \"0\": {out_of_range}"
        )
    );
    assert_eq!(
        port("0"),
        format!(
            "policy default/p: rules[0].to[0].operation.ports[0]: invalid value \"0\": {out_of_range}"
        )
    );
    assert_eq!(
        port("'80', 65536"),
        format!(
            "policy default/p: rules[0].to[0].operation.ports[1]: invalid value \"65536\": {out_of_range}"
        )
    );
    assert_eq!(
        port("'99999999999'"),
        format!(
            "policy default/p: rules[0].to[0].operation.ports[0]: invalid value \"99999999999\": {not_a_port}"
        )
    );
    for bad in [
        "'-1'", "-1", "' 80'", "'80 '", "'+80'", "80.5", "''", "true", "[80]",
    ] {
        assert!(port(bad).contains(not_a_port), "{bad}: {}", port(bad));
    }
    assert!(error(&with_operation("{notPorts: ['x']}")).starts_with(
        "policy default/p: rules[0].to[0].operation.notPorts[0]: invalid value \"x\""
    ));
}

#[test]
fn bad_ip_blocks_are_quoted() {
    let cidr = |v: &str| error(&with_source(&format!("{{ipBlocks: ['{v}']}}")));
    let bad_cidr = "malformed CIDR; expected an address and a prefix length such as 10.0.0.0/8 or 2001:db8::/32";
    let bad_ip = "malformed IP address; expected an IPv4 or IPv6 address or a CIDR";
    for v in [
        "10.0.0.0/33",
        "10.0.0/8",
        "10.0.0.0/",
        "10.0.0.0/-1",
        "10.0.0.0/08",
        "::/129",
        "x/8",
    ] {
        assert_eq!(
            cidr(v),
            format!(
                "policy default/p: rules[0].from[0].source.ipBlocks[0]: invalid value {v:?}: {bad_cidr}"
            )
        );
    }
    for v in [
        "banana",
        "10.0.0.256",
        "10.0.0",
        "fe80::1%eth0",
        " 10.0.0.1",
    ] {
        assert_eq!(
            cidr(v),
            format!(
                "policy default/p: rules[0].from[0].source.ipBlocks[0]: invalid value {v:?}: {bad_ip}"
            )
        );
    }
    assert!(
        error(&with_source("{notIpBlocks: [10.0.0.0/99]}"))
            .starts_with("policy default/p: rules[0].from[0].source.notIpBlocks[0]: invalid value \"10.0.0.0/99\"")
    );
}

#[test]
fn empty_values_are_refused() {
    assert_eq!(
        error(&with_source("{principals: ['']}")),
        "policy default/p: rules[0].from[0].source.principals[0]: invalid value \"\": empty value"
    );
    assert_eq!(
        error(&with_source("{principals: ['spiffe://']}")),
        "policy default/p: rules[0].from[0].source.principals[0]: invalid value \"spiffe://\": empty value"
    );
    for (field, good) in [
        ("notPrincipals", "a"),
        ("namespaces", "a"),
        ("notNamespaces", "a"),
        ("ipBlocks", "10.0.0.1"),
        ("notIpBlocks", "::1"),
    ] {
        assert_eq!(
            error(&with_source(&format!("{{{field}: ['{good}', '']}}"))),
            format!(
                "policy default/p: rules[0].from[0].source.{field}[1]: invalid value \"\": empty value"
            ),
        );
    }
}

#[test]
fn misplaced_wildcards_are_refused() {
    let star = "`*` is allowed only alone (\"*\"), as a prefix match (\"foo*\") or as a suffix match (\"*foo\")";
    for v in ["cluster.local/*/sa/web", "**", "*web*"] {
        assert_eq!(
            error(&with_source(&format!("{{principals: ['{v}']}}"))),
            format!(
                "policy default/p: rules[0].from[0].source.principals[0]: invalid value {v:?}: {star}"
            )
        );
    }
    assert!(error(&with_source("{namespaces: ['a*b']}")).contains(star));
}

#[test]
fn non_string_values_are_refused() {
    assert_eq!(
        error(&with_source("{principals: [42]}")),
        "policy default/p: rules[0].from[0].source.principals[0]: expected a string, found a number"
    );
    assert_eq!(
        error(&with_source("{principals: cluster.local/ns/a/sa/b}")),
        "policy default/p: rules[0].from[0].source.principals: expected a list, found a string"
    );
    assert_eq!(
        error(&with_spec("  selector: {matchLabels: {enabled: true}}\n")),
        "policy default/p: selector.matchLabels.enabled: invalid value \"true\": label values must be strings; quote it"
    );
}

#[test]
fn istio_validation_rules_are_enforced() {
    assert_eq!(
        error(&with_spec("  action: DENY\n")),
        "policy default/p: rules: a DENY policy without rules never matches; write `rules: [{}]` to deny every connection"
    );
    assert_eq!(
        error(&with_spec("  action: DENY\n  rules: []\n")),
        "policy default/p: rules: a DENY policy without rules never matches; write `rules: [{}]` to deny every connection"
    );
    assert_eq!(
        error(&with_spec("  rules:\n  - from: []\n")),
        "policy default/p: rules[0].from: must not be empty; omit `from` to match any source"
    );
    assert_eq!(
        error(&with_spec("  rules:\n  - to: []\n")),
        "policy default/p: rules[0].to: must not be empty; omit `to` to match any port"
    );
    assert_eq!(
        error(&with_source("{}")),
        "policy default/p: rules[0].from[0].source: must not be empty; set at least one of \
         principals, notPrincipals, namespaces, notNamespaces, ipBlocks, notIpBlocks"
    );
    assert_eq!(
        error(&with_source("{principals: []}")),
        "policy default/p: rules[0].from[0].source: must not be empty; set at least one of \
         principals, notPrincipals, namespaces, notNamespaces, ipBlocks, notIpBlocks"
    );
    assert_eq!(
        error(&with_spec("  rules:\n  - from: [{}]\n")),
        "policy default/p: rules[0].from[0].source: required"
    );
    assert_eq!(
        error(&with_operation("{}")),
        "policy default/p: rules[0].to[0].operation: must not be empty; set ports or notPorts"
    );
    assert_eq!(
        error(&with_spec("  rules:\n  - ~\n")),
        "policy default/p: rules[0]: empty rule; write `{}` for a rule that matches every connection"
    );
    assert_eq!(
        error(&with_spec("  selector: {matchLabels: {app: 'web*'}}\n")),
        "policy default/p: selector.matchLabels.app: invalid value \"web*\": wildcards are not supported in selectors"
    );
}

#[test]
fn metadata_kind_and_api_version_are_checked() {
    let doc = |api: &str, kind: &str, meta: &str| {
        format!("apiVersion: {api}\nkind: {kind}\nmetadata: {meta}\n")
    };
    let api = "security.sockmesh.io/v1";
    assert_eq!(
        error(&doc(api, "AuthorizationPolicy", "{name: p}")),
        "document 1: metadata.namespace: required"
    );
    assert_eq!(
        error(&doc(api, "AuthorizationPolicy", "{namespace: default}")),
        "document 1: metadata.name: required"
    );
    assert_eq!(
        error(&doc(
            api,
            "AuthorizationPolicy",
            "{name: p, namespace: Default}"
        )),
        "policy Default/p: metadata.namespace: invalid value \"Default\": must be a DNS label: lower-case \
         letters, digits and '-', starting and ending with a letter or digit"
    );
    assert!(
        error(&doc(
            api,
            "AuthorizationPolicy",
            "{name: 'a b', namespace: x}"
        ))
        .starts_with("document 1: metadata.name: invalid value \"a b\": must be a DNS subdomain")
    );
    assert_eq!(
        error(&doc(
            api,
            "PeerAuthentication",
            "{name: p, namespace: default}"
        )),
        "policy default/p: kind: invalid value \"PeerAuthentication\": expected AuthorizationPolicy"
    );
    assert_eq!(
        error(&doc(
            "security.istio.io/v1alpha1",
            "AuthorizationPolicy",
            "{name: p, namespace: default}"
        )),
        "policy default/p: apiVersion: invalid value \"security.istio.io/v1alpha1\": expected one of \
         security.sockmesh.io/v1, security.istio.io/v1, security.istio.io/v1beta1"
    );
    assert_eq!(
        error("just a string"),
        "document 1: (document): expected an AuthorizationPolicy mapping (or a list of them), found a string"
    );
    assert_eq!(
        error("apiVersion: security.sockmesh.io/v1\nmetadata: {name: p, namespace: d}\n"),
        "policy d/p: kind: required"
    );
}

#[test]
fn list_items_are_located() {
    let yaml = "
- apiVersion: security.sockmesh.io/v1
  kind: AuthorizationPolicy
  metadata: {name: ok, namespace: default}
- apiVersion: security.sockmesh.io/v1
  kind: AuthorizationPolicy
  metadata: {namespace: default}
";
    assert_eq!(error(yaml), "document 1, item 2: metadata.name: required");
    let second_doc = "apiVersion: security.sockmesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: b}\n---\n42\n";
    assert!(
        error(second_doc)
            .starts_with("document 2: (document): expected an AuthorizationPolicy mapping")
    );
}

#[test]
fn duplicate_policies_are_refused() {
    let one = "apiVersion: security.sockmesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: b}\n";
    assert_eq!(
        error(&format!("{one}---\n{one}")),
        "policy b/a: defined more than once"
    );
}

#[test]
fn yaml_errors_name_the_document() {
    let msg = error("apiVersion: [\n");
    assert!(msg.starts_with("document 1: invalid YAML: "), "{msg}");
    let msg = error("a: 1\na: 2\n");
    assert!(
        msg.starts_with("document 1: invalid YAML: duplicate key \"a\""),
        "{msg}"
    );
    let msg = error("!Policy {a: 1}\n");
    assert!(
        msg.contains("YAML tags (`!name`) are not supported"),
        "{msg}"
    );
    let msg = error(&with_operation("{ports: [123456789012345678901234567890]}"));
    assert!(msg.contains("is out of range"), "{msg}");
}

// ---------------------------------------------------------------------------
// Limits.

#[test]
fn input_size_is_limited() {
    let big = format!("# {}\n", "x".repeat(MAX_INPUT_BYTES));
    assert_eq!(
        parse_policies(&big),
        Err(PolicyError::InputTooLarge {
            len: big.len(),
            limit: MAX_INPUT_BYTES
        })
    );
    assert_eq!(
        error(&big),
        format!(
            "policy YAML is {} bytes, more than the limit of {MAX_INPUT_BYTES} bytes",
            big.len()
        )
    );
}

#[test]
fn policy_count_is_limited() {
    let mut yaml = String::new();
    for i in 0..=MAX_POLICIES {
        yaml.push_str(&format!(
            "- {{apiVersion: security.sockmesh.io/v1, kind: AuthorizationPolicy, metadata: {{name: p{i}, namespace: d}}}}\n"
        ));
    }
    assert_eq!(
        error(&yaml),
        format!("policy YAML holds more than {MAX_POLICIES} policies")
    );
}

#[test]
fn rule_and_value_counts_are_limited() {
    let rules = vec!["{}"; MAX_RULES + 1].join(", ");
    assert_eq!(
        error(&with_spec(&format!("  rules: [{rules}]\n"))),
        format!(
            "policy default/p: rules: {} entries, more than the limit of {MAX_RULES}",
            MAX_RULES + 1
        )
    );
    let ports = vec!["'80'"; MAX_VALUES + 1].join(", ");
    assert_eq!(
        error(&with_operation(&format!("{{ports: [{ports}]}}"))),
        format!(
            "policy default/p: rules[0].to[0].operation.ports: {} entries, more than the limit of {MAX_VALUES}",
            MAX_VALUES + 1
        )
    );
    let from = vec!["{source: {namespaces: [a]}}"; 65].join(", ");
    assert_eq!(
        error(&with_spec(&format!("  rules: [{{from: [{from}]}}]\n"))),
        "policy default/p: rules[0].from: 65 entries, more than the limit of 64"
    );
}

#[test]
fn value_length_is_limited() {
    let long = "a".repeat(MAX_VALUE_LEN + 1);
    let msg = error(&with_source(&format!("{{namespaces: [{long}]}}")));
    assert!(
        msg.starts_with(
            "policy default/p: rules[0].from[0].source.namespaces[0]: invalid value \"aaaa"
        ),
        "{msg}"
    );
    assert!(
        msg.ends_with(&format!(
            "… ({} bytes)\": longer than the limit of {MAX_VALUE_LEN} bytes",
            MAX_VALUE_LEN + 1
        )),
        "{msg}"
    );
}

#[test]
fn yaml_node_count_is_limited() {
    // No aliases: about 400 KB of `1,`.
    let yaml = format!("[{}]", vec!["1"; MAX_YAML_NODES + 1].join(","));
    assert!(yaml.len() < MAX_INPUT_BYTES);
    let msg = error(&yaml);
    assert!(msg.starts_with("document 1: invalid YAML: "), "{msg}");
    assert!(
        msg.contains(&format!(
            "more than {MAX_YAML_NODES} YAML nodes (aliases count each time they are used)"
        )),
        "{msg}"
    );
}

#[test]
fn alias_bombs_stop_early() {
    // Each level doubles: 2^30 nodes if expanded.
    let mut yaml = String::from("a0: &a0 [x, x]\n");
    for i in 1..30 {
        yaml.push_str(&format!("a{i}: &a{i} [*a{}, *a{}]\n", i - 1, i - 1));
    }
    let msg = error(&yaml);
    assert!(msg.starts_with("document 1: invalid YAML: "), "{msg}");
    assert!(
        msg.contains("more than 200000 YAML nodes") || msg.contains("repetition limit"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------
// The fuzz target's entry point, over seeds.

#[test]
fn fuzz_entry_point_runs_over_seeds() {
    let seeds: Vec<Vec<u8>> = vec![
        FULL.as_bytes().to_vec(),
        with_spec("  action: DENY\n  rules: [{}]\n").into_bytes(),
        with_spec("  rules: [{to: [{operation: {methods: [GET]}}]}]\n").into_bytes(),
        with_source("{notPrincipals: ['*'], ipBlocks: ['::ffff:10.0.0.0/104']}").into_bytes(),
        with_spec("  selector: {matchLabels: {'yes': 'no', '1': '2.0'}}\n  rules: [{}]\n").into_bytes(),
        b"- {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: x, namespace: y}}".to_vec(),
        b"---\n---\n".to_vec(),
        b"\xff\xfe not utf-8".to_vec(),
        b"{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{".to_vec(),
        b"a: &a [*a]".to_vec(),
        b"kind: List\nitems: 3".to_vec(),
        Vec::new(),
    ];
    for seed in &seeds {
        fuzz_policy_yaml(seed);
    }
}
