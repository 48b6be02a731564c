//! deploy/sockmesh.yaml is what `mesh manifest` prints (no drift), every
//! object in it is a valid Kubernetes object (k8s-openapi's types, unknown
//! fields rejected), and checkov finds nothing in deploy/ beyond the checks
//! each object skips with its reason.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const REGENERATE: &str = "cargo run -q -p mesh-cli -- manifest > deploy/sockmesh.yaml";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn manifest(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_mesh"))
        .arg("manifest")
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(Value::deserialize)
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn deploy_holds_what_mesh_manifest_prints() {
    let path = root().join("deploy/sockmesh.yaml");
    let on_disk = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; regenerate with `{REGENERATE}`", path.display()));
    let printed = manifest(&[]);
    assert!(
        on_disk == printed,
        "deploy/sockmesh.yaml drifted from `mesh manifest`: regenerate it with `{REGENERATE}` and commit it"
    );
}

/// Deserializes `v` into `K`, and fails when serializing it back loses a
/// field (k8s-openapi's types skip fields they do not know).
fn strict<K: DeserializeOwned + serde::Serialize>(v: &Value) -> Result<(), String> {
    let typed: K = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).unwrap();
    let mut lost = Vec::new();
    missing(v, &back, &mut String::new(), &mut lost);
    if lost.is_empty() {
        Ok(())
    } else {
        Err(format!("unknown fields: {}", lost.join(", ")))
    }
}

fn missing(orig: &Value, back: &Value, path: &mut String, out: &mut Vec<String>) {
    match (orig, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (k, ov) in o {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                match b.get(k) {
                    Some(bv) => missing(ov, bv, path, out),
                    None => out.push(path.clone()),
                }
                path.truncate(len);
            }
        }
        (Value::Array(o), Value::Array(b)) => {
            for (i, (ov, bv)) in o.iter().zip(b).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                missing(ov, bv, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

fn check_typed(v: &Value) -> Result<(), String> {
    match v["kind"].as_str().unwrap_or("") {
        "Namespace" => strict::<Namespace>(v),
        "ServiceAccount" => strict::<ServiceAccount>(v),
        "ClusterRole" => strict::<ClusterRole>(v),
        "ClusterRoleBinding" => strict::<ClusterRoleBinding>(v),
        "Role" => strict::<Role>(v),
        "RoleBinding" => strict::<RoleBinding>(v),
        "CustomResourceDefinition" => strict::<CustomResourceDefinition>(v),
        "Deployment" => strict::<Deployment>(v),
        "DaemonSet" => strict::<DaemonSet>(v),
        "Service" => strict::<Service>(v),
        "PodDisruptionBudget" => strict::<PodDisruptionBudget>(v),
        "NetworkPolicy" => strict::<NetworkPolicy>(v),
        "ServiceMonitor" => strict::<mesh_cli::manifest::ServiceMonitor>(v),
        other => Err(format!("kind {other:?} has no type here")),
    }
}

#[test]
fn every_object_is_a_kubernetes_object_with_no_unknown_field() {
    let all = docs(&manifest(&["--service-monitor"]));
    let kinds: Vec<_> = all.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for k in [
        "Namespace",
        "CustomResourceDefinition",
        "ClusterRole",
        "Deployment",
        "DaemonSet",
        "PodDisruptionBudget",
        "ServiceMonitor",
    ] {
        assert!(kinds.contains(&k), "no {k} in {kinds:?}");
    }
    for d in &all {
        check_typed(d).unwrap_or_else(|e| panic!("{} {}: {e}", d["kind"], d["metadata"]["name"]));
    }
    // The check itself catches a typo'd field.
    let mut bad = all
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap()
        .clone();
    bad["spec"]["template"]["spec"]["hostNetwrok"] = true.into();
    let e = check_typed(&bad).unwrap_err();
    assert!(e.contains(".spec.template.spec.hostNetwrok"), "{e}");
}

#[test]
fn the_node_daemonset_says_why_it_uses_the_host_network_and_skips_checks_with_reasons() {
    let yaml = std::fs::read_to_string(root().join("deploy/sockmesh.yaml")).unwrap();
    assert!(yaml.contains("# The node proxy, one per node. hostNetwork: true, because"));
    for d in docs(&yaml) {
        for (k, v) in d["metadata"]["annotations"]
            .as_object()
            .into_iter()
            .flatten()
        {
            if k.starts_with("checkov.io/skip") {
                let (id, why) = v.as_str().unwrap().split_once('=').unwrap();
                assert!(why.len() > 20, "{id} skipped without a reason");
                assert!(
                    yaml.contains(&format!("# {id} skipped: ")),
                    "{id}: no YAML comment"
                );
            }
        }
    }
}

/// checkov (PyPI), installed by `./x setup` into target/checkov.
fn checkov() -> PathBuf {
    if let Some(p) = std::env::var_os("CHECKOV") {
        return p.into();
    }
    root().join("target/checkov/bin/checkov")
}

#[test]
fn checkov_scans_deploy_clean() {
    let bin = checkov();
    assert!(
        bin.is_file(),
        "{} not found: `./x setup` installs checkov (pip, into target/checkov)",
        bin.display()
    );
    let o = Command::new(&bin)
        .args([
            "-d",
            "deploy",
            "--framework",
            "kubernetes",
            "--compact",
            "--quiet",
            "-o",
            "json",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| {
        panic!(
            "checkov output is not JSON ({e}): {out}\n{}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    let failed = &v["results"]["failed_checks"];
    let summary = &v["summary"];
    assert!(
        o.status.success() && summary["failed"] == 0,
        "checkov failed checks in deploy/: {}",
        serde_json::to_string_pretty(failed).unwrap()
    );
    assert!(summary["passed"].as_u64().unwrap() > 100, "{summary}");
}

/// The programs next to `mesh` (a workspace build puts them there).
fn sibling(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_mesh"))
        .parent()
        .unwrap()
        .join(name);
    assert!(
        p.is_file(),
        "{} not built: `cargo build -p mesh-proxy -p mesh-ca -p mesh-cni` (./x test builds every binary)",
        p.display()
    );
    p
}

/// `$(VAR)` as the kubelet expands it, with plausible values.
fn expand(arg: &str) -> String {
    arg.replace("$(NODE_NAME)", "node-1")
        .replace("$(POD_NAME)", "mesh-node-x")
        .replace("$(POD_NAMESPACE)", "sockmesh-system")
}

/// Every container's command line in the manifest is one its program
/// accepts: each flag known, each value parsed (`--help` at the end only
/// answers once everything before it parsed).
#[test]
fn every_container_command_line_is_accepted_by_its_program() {
    let all = docs(&manifest(&[]));
    let mut seen = 0;
    for d in &all {
        let Some(spec) = d.pointer("/spec/template/spec") else {
            continue;
        };
        let containers = spec["containers"]
            .as_array()
            .into_iter()
            .chain(spec["initContainers"].as_array())
            .flatten();
        for c in containers {
            let image = c["image"].as_str().unwrap();
            let program = image.rsplit('/').next().unwrap().split(':').next().unwrap();
            let args: Vec<String> = c["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| expand(a.as_str().unwrap()))
                .collect();
            let o = Command::new(sibling(program))
                .args(&args)
                .arg("--help")
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{program} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr)
            );
            seen += 1;
        }
    }
    assert_eq!(seen, 3, "the CA, the proxy and the CNI installer");
}

/// The root key never reaches a node: the DaemonSet mounts no Secret (a
/// Secret volume makes every node's kubelet fetch the whole Secret) but the
/// trust bundle ConfigMap the CA publishes, and nothing bound to the node
/// proxy's ServiceAccount grants anything on secrets.
#[test]
fn the_node_proxy_gets_the_trust_bundle_from_a_configmap_and_no_access_to_secrets() {
    let all = docs(&manifest(&["--service-monitor"]));
    let ds = all.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let spec = &ds["spec"]["template"]["spec"];
    let volumes = spec["volumes"].as_array().unwrap();
    for v in volumes {
        assert!(v.get("secret").is_none(), "a Secret volume: {v}");
        for source in v["projected"]["sources"].as_array().into_iter().flatten() {
            assert!(source.get("secret").is_none(), "a projected Secret: {v}");
        }
    }
    let bundle = volumes.iter().find(|v| v["name"] == "ca-bundle").unwrap();
    assert_eq!(
        bundle["configMap"]["name"], "sockmesh-trust-bundle",
        "{bundle}"
    );
    assert_eq!(bundle["configMap"]["items"][0]["key"], "ca.crt");
    assert!(
        bundle["configMap"].get("optional").is_none(),
        "the proxy waits for it"
    );
    let containers = spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(spec["initContainers"].as_array().into_iter().flatten());
    for c in containers {
        assert!(
            !c.to_string().contains("secretKeyRef") && !c.to_string().contains("secretRef"),
            "{c}"
        );
    }
    // The proxy reads ca.crt of that volume.
    let args: Vec<&str> = spec["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    // The CA by its Service's DNS name (an IPv6 cluster's
    // $(MESH_CA_SERVICE_HOST) would be a bare IPv6 address).
    let ca = args.iter().position(|a| *a == "--ca").unwrap();
    assert_eq!(args[ca + 1], "mesh-ca.sockmesh-system.svc:15012");
    assert!(!spec.to_string().contains("SERVICE_HOST"));
    let at = args.iter().position(|a| *a == "--ca-bundle").unwrap();
    let mount = spec["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "ca-bundle")
        .unwrap();
    assert_eq!(
        args[at + 1],
        format!("{}/ca.crt", mount["mountPath"].as_str().unwrap())
    );

    // Every role bound to the proxy's ServiceAccount: nothing on secrets.
    let bound_to = |sa: &str| -> Vec<(String, String)> {
        all.iter()
            .filter(|d| d["kind"] == "RoleBinding" || d["kind"] == "ClusterRoleBinding")
            .filter(|b| {
                b["subjects"].as_array().into_iter().flatten().any(|s| {
                    s["kind"] == "ServiceAccount"
                        && s["name"] == sa
                        && s["namespace"] == "sockmesh-system"
                })
            })
            .map(|b| {
                (
                    b["roleRef"]["kind"].as_str().unwrap().to_owned(),
                    b["roleRef"]["name"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let rules_of = |kind: &str, name: &str| -> Vec<Value> {
        let role = all
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind} {name} is bound but not in the manifest"));
        role["rules"].as_array().unwrap().clone()
    };
    let proxy_roles = bound_to("mesh-proxy");
    assert_eq!(proxy_roles.len(), 2, "{proxy_roles:?}");
    for (kind, name) in &proxy_roles {
        for r in rules_of(kind, name) {
            let resources: Vec<&str> = r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap())
                .collect();
            assert!(
                !resources.iter().any(|x| *x == "secrets" || *x == "*"),
                "{kind} {name} grants the node proxy {r}"
            );
        }
    }
    // The CA may get and patch the bundle by name; create cannot be
    // narrowed by name in RBAC, and its comment says so.
    let (kind, name) = bound_to("mesh-ca")
        .into_iter()
        .find(|(k, _)| k == "Role")
        .unwrap();
    let rules = rules_of(&kind, &name);
    let cm: Vec<&Value> = rules
        .iter()
        .filter(|r| r["resources"] == serde_json::json!(["configmaps"]))
        .collect();
    assert_eq!(cm.len(), 2, "{rules:?}");
    assert_eq!(cm[0]["verbs"], serde_json::json!(["get", "patch"]));
    assert_eq!(
        cm[0]["resourceNames"],
        serde_json::json!(["sockmesh-trust-bundle"])
    );
    assert_eq!(cm[1]["verbs"], serde_json::json!(["create"]));
    let objects = mesh_cli::manifest::objects(&Default::default()).unwrap();
    let role = objects
        .iter()
        .find(|o| o.api_resource.kind == "Role" && o.name() == "sockmesh-ca")
        .unwrap();
    assert!(
        role.comment
            .contains("create is not and cannot be: RBAC authorizes a create before"),
        "{}",
        role.comment
    );
}
