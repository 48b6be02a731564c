//! `mesh check --pre` (this node: kernel, BTF, cgroup v2, bpffs, CNI conf
//! dir, privileges, the cgroup the proxy would attach to) and `mesh check`
//! (the cluster: CA, node proxies, opted-in pods, redirection per node).
//! Every failed check says what to do.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, ListParams};
use mesh_core::kubelet_cgroup::{self, Choice};
use mesh_core::opt_in::{self, OptInFacts, STATUS_ANNOTATION};
use serde::Serialize;

use crate::cli::CheckArgs;
use crate::failure::code;
use crate::install::{api_failure, connect, rollout};
use crate::manifest::PART_OF;

pub const CHECK_HELP: &str = "\
Examples:
  mesh check --pre                 # on a node, before installing: can it run the proxy?
  mesh check --pre -o json
  mesh check                       # the cluster: CA, every node proxy, every opted-in pod
  mesh check -o json | jq '.checks[] | select(.ok == false)'

Exit codes: 0 every check passed; 6 a --pre check failed (this node lacks
something); 1 a cluster check failed; 7 the API server could not be reached
or refused.";

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: String,
    pub ok: bool,
    pub detail: String,
    /// What to do when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn pass(check: &str, detail: impl Into<String>) -> Check {
    Check {
        check: check.into(),
        ok: true,
        detail: detail.into(),
        fix: None,
    }
}

fn fail(check: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        check: check.into(),
        ok: false,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

/// `mesh check`.
pub fn run(args: &CheckArgs) -> Result<u8> {
    let checks = if args.pre {
        pre_checks(args)
    } else {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start the async runtime")?;
        rt.block_on(cluster_checks(args))?
    };
    print(&checks, args.output.json())?;
    let failed = checks.iter().any(|c| !c.ok);
    Ok(match (failed, args.pre) {
        (false, _) => 0,
        (true, true) => code::MACHINE,
        (true, false) => code::FAILURE,
    })
}

fn print(checks: &[Check], json: bool) -> Result<()> {
    let mut out = std::io::stdout();
    if json {
        let failed = checks.iter().filter(|c| !c.ok).count();
        writeln!(
            out,
            "{}",
            serde_json::json!({"ok": failed == 0, "failed": failed, "checks": checks})
        )?;
        return Ok(());
    }
    let width = checks.iter().map(|c| c.check.len()).max().unwrap_or(5);
    for c in checks {
        let mark = if c.ok { "ok  " } else { "FAIL" };
        writeln!(out, "{mark} {:width$}  {}", c.check, c.detail)?;
        if let Some(fix) = &c.fix {
            writeln!(out, "     {:width$}  fix: {fix}", "")?;
        }
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    if failed == 0 {
        writeln!(out, "all {} checks passed", checks.len())?;
    } else {
        writeln!(out, "{failed} of {} checks failed", checks.len())?;
    }
    Ok(())
}

/// Kernel release `a.b` as numbers.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The oldest kernel the data path runs on (sk_lookup, cgroup sock_addr
/// hooks, bpf_sk_assign, ring buffers, BPF links for cgroups).
pub const MIN_KERNEL: (u32, u32) = (5, 10);

/// Capabilities the node proxy needs (bit numbers of linux/capability.h).
const NEEDED_CAPS: &[(&str, u32)] = &[
    ("CAP_NET_ADMIN", 12),
    ("CAP_SYS_ADMIN", 21),
    ("CAP_BPF", 39),
    ("CAP_PERFMON", 38),
];

/// The capabilities of `needed` missing from a `CapEff:` hex mask.
pub fn missing_caps(cap_eff_hex: &str) -> Vec<&'static str> {
    let mask = u64::from_str_radix(cap_eff_hex.trim(), 16).unwrap_or(0);
    NEEDED_CAPS
        .iter()
        .filter(|(_, bit)| mask & (1u64 << bit) == 0)
        .map(|(name, _)| *name)
        .collect()
}

fn pre_checks(args: &CheckArgs) -> Vec<Check> {
    let mut out = Vec::new();
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    out.push(match kernel_version(&release) {
        Some(v) if v >= MIN_KERNEL => pass("kernel", format!("Linux {release}")),
        _ => fail(
            "kernel",
            format!(
                "Linux {release:?} is older than {}.{}",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
            format!(
                "run the node on a kernel >= {}.{}",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        ),
    });
    out.push(if Path::new("/sys/kernel/btf/vmlinux").is_file() {
        pass("BTF", "/sys/kernel/btf/vmlinux")
    } else {
        fail(
            "BTF",
            "no /sys/kernel/btf/vmlinux",
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's since 2021)",
        )
    });
    match kubelet_cgroup::v2_root(&args.cgroup_root) {
        Ok((root, layout)) => out.push(pass(
            "cgroup v2",
            format!(
                "{} ({} layout)",
                root.display(),
                match layout {
                    kubelet_cgroup::Layout::Unified => "unified",
                    kubelet_cgroup::Layout::Hybrid => "hybrid",
                }
            ),
        )),
        Err(e) => out.push(fail(
            "cgroup v2",
            e.to_string(),
            "boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1) or at least the hybrid layout",
        )),
    }
    out.push(
        // Not checked against this process's own cgroup: `mesh check --pre`
        // runs in a node's shell, outside kubepods, where the proxy's pod
        // will be inside by construction (the proxy checks itself).
        match kubelet_cgroup::detect(&args.cgroup_root, &Choice::Auto, None) {
            Ok(a) => pass(
                "proxy cgroup",
                format!(
                    "would attach to {} (the kubelet's {} driver; cgroup {})",
                    a.dir.display(),
                    match a.driver {
                        kubelet_cgroup::Driver::Systemd => "systemd",
                        kubelet_cgroup::Driver::Cgroupfs => "cgroupfs",
                        kubelet_cgroup::Driver::Explicit => "explicit",
                    },
                    a.cgroup_path
                ),
            ),
            Err(e) => fail(
                "proxy cgroup",
                e.to_string(),
                "run on a Kubernetes node, or install with `mesh install --proxy-cgroup PATH`",
            ),
        },
    );
    out.push(bpffs(Path::new("/sys/fs/bpf")));
    out.push(cni_conf(&args.cni_conf_dir));
    let cap_eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_owned()))
        })
        .unwrap_or_default();
    let missing = missing_caps(&cap_eff);
    out.push(if missing.is_empty() {
        pass(
            "privileges",
            "CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON",
        )
    } else {
        fail(
            "privileges",
            format!("missing {}", missing.join(", ")),
            "run `mesh check --pre` as root on the node (the DaemonSet grants these to the proxy)",
        )
    });
    out
}

fn bpffs(dir: &Path) -> Check {
    match nix::sys::statfs::statfs(dir) {
        Ok(s) if s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC => {
            pass("bpffs", format!("{} is a bpf file system", dir.display()))
        }
        Ok(_) => fail(
            "bpffs",
            format!("{} is not a bpf file system", dir.display()),
            format!(
                "mount it: `mount -t bpf bpf {}` (systemd does at boot)",
                dir.display()
            ),
        ),
        Err(e) => fail(
            "bpffs",
            format!("{}: {e}", dir.display()),
            format!("mount it: `mount -t bpf bpf {}`", dir.display()),
        ),
    }
}

fn cni_conf(dir: &Path) -> Check {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            return fail(
                "CNI conf dir",
                format!("{}: {e}", dir.display()),
                "install the cluster's primary CNI first, or pass the kubelet's --cni-conf-dir (and `mesh install --cni-conf-dir`)",
            );
        }
    };
    let mut confs: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".conflist") || n.ends_with(".conf") || n.ends_with(".json"))
        .collect();
    confs.sort();
    match confs.first() {
        Some(first) => pass(
            "CNI conf dir",
            format!("{}: mesh-cni would chain into {first}", dir.display()),
        ),
        None => fail(
            "CNI conf dir",
            format!("{} holds no network configuration", dir.display()),
            "install the cluster's primary CNI (mesh-cni chains after it)",
        ),
    }
}

/// The status annotation's JSON, the fields `mesh check` reads.
#[derive(Debug, Clone, serde::Deserialize)]
struct PodStatus {
    meshed: bool,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    mode: Option<String>,
}

async fn cluster_checks(args: &CheckArgs) -> Result<Vec<Check>> {
    let client = connect(&args.cluster).await?;
    let ns = args.namespace.as_str();
    let mut out = Vec::new();
    match rollout(&client, ns).await {
        Ok(r) if r.ca_ready > 0 => out.push(pass(
            "CA",
            format!("{}/{} replicas ready", r.ca_ready, r.ca_wanted),
        )),
        Ok(r) => out.push(fail(
            "CA",
            format!("0/{} replicas ready", r.ca_wanted),
            format!("see `kubectl -n {ns} describe deployment/mesh-ca` and `kubectl -n {ns} logs deployment/mesh-ca`"),
        )),
        Err(e) => out.push(fail(
            "CA",
            format!("{e:#}"),
            "install sockmesh with `mesh install`",
        )),
    }
    let nodes = list::<Node>(Api::all(client.clone()), "nodes").await?;
    let proxies = list::<Pod>(Api::namespaced(client.clone(), ns), "pods").await?;
    let mut proxy_ready: BTreeMap<String, bool> = BTreeMap::new();
    for p in &proxies {
        let is_proxy = p
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("app.kubernetes.io/name"))
            .is_some_and(|n| n == "mesh-node");
        if !is_proxy {
            continue;
        }
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        *proxy_ready.entry(node).or_default() |= ready;
    }
    // Opted-in pods and the redirection mode each node reports.
    let namespaces = list::<Namespace>(Api::all(client.clone()), "namespaces").await?;
    let ns_labels: BTreeMap<String, BTreeMap<String, String>> = namespaces
        .into_iter()
        .map(|n| {
            (
                n.metadata.name.unwrap_or_default(),
                n.metadata.labels.unwrap_or_default(),
            )
        })
        .collect();
    let pods = list::<Pod>(Api::all(client.clone()), "pods").await?;
    let mut modes: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut pod_checks = Vec::new();
    for p in &pods {
        let meta = &p.metadata;
        let (pns, name) = (
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        );
        let annotations = meta.annotations.clone().unwrap_or_default();
        let labels = meta.labels.clone().unwrap_or_default();
        let spec = p.spec.clone().unwrap_or_default();
        let facts = OptInFacts {
            pod: annotations.get(opt_in::MESH_KEY).map(String::as_str),
            namespace: ns_labels
                .get(&pns)
                .and_then(|l| l.get(opt_in::MESH_KEY))
                .map(String::as_str),
            host_network: spec.host_network.unwrap_or(false),
            mesh_component: labels.get(PART_OF.0).is_some_and(|v| v == PART_OF.1),
        };
        if !opt_in::decide(facts).is_meshed() {
            continue;
        }
        let check = format!("pod {pns}/{name}");
        let node = spec.node_name.clone().unwrap_or_default();
        let Some(raw) = annotations.get(STATUS_ANNOTATION) else {
            pod_checks.push(fail(
                &check,
                format!("opted in but has no {STATUS_ANNOTATION} annotation"),
                format!("its node's proxy has not seen it: check the proxy on node {node:?} (`kubectl -n {ns} logs -l app.kubernetes.io/name=mesh-node --field-selector spec.nodeName={node}`)"),
            ));
            continue;
        };
        match serde_json::from_str::<PodStatus>(raw) {
            Ok(s) if s.meshed && s.identity.is_some() => {
                let mode = s.mode.clone().unwrap_or_else(|| "unknown".into());
                *modes.entry(node).or_default().entry(mode.clone()).or_default() += 1;
                pod_checks.push(pass(
                    &check,
                    format!(
                        "meshed as {} ({mode}); its certificate was issued",
                        s.identity.unwrap_or_default()
                    ),
                ));
            }
            Ok(s) => pod_checks.push(fail(
                &check,
                format!(
                    "not meshed: {} {}",
                    s.reason.unwrap_or_else(|| "no reason given".into()),
                    s.message.unwrap_or_default()
                )
                .trim_end()
                .to_owned(),
                "see `kubectl describe pod` for its sockmesh Events; a certificate-refused pod needs the CA up and its service account allowed",
            )),
            Err(e) => pod_checks.push(fail(
                &check,
                format!("{STATUS_ANNOTATION} is not valid JSON: {e}"),
                "the node proxy rewrites it on its next pass; if it stays, report it",
            )),
        }
    }
    for n in &nodes {
        let node = n.metadata.name.clone().unwrap_or_default();
        let check = format!("node {node}");
        let mode = modes
            .get(&node)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k} ({v} pods)"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_else(|| "no meshed pods".into());
        out.push(match proxy_ready.get(&node) {
            Some(true) => pass(&check, format!("proxy ready; redirection: {mode}")),
            Some(false) => fail(
                &check,
                "proxy not ready",
                format!("`kubectl -n {ns} describe pod -l app.kubernetes.io/name=mesh-node --field-selector spec.nodeName={node}`; meshed pods on this node are refused until it is"),
            ),
            None => fail(
                &check,
                "no node proxy",
                format!("the DaemonSet {ns}/mesh-node has no pod here: check its tolerations and `kubectl -n {ns} describe daemonset/mesh-node`"),
            ),
        });
    }
    out.extend(pod_checks);
    Ok(out)
}

async fn list<K>(api: Api<K>, what: &str) -> Result<Vec<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(api
        .list(&ListParams::default())
        .await
        .map_err(|e| api_failure(e, &format!("listing {what}")))?
        .items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_and_capabilities_are_read() {
        assert_eq!(kernel_version("6.1.0-37-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("5.4.0"), Some((5, 4)));
        assert!(kernel_version("5.4.0").unwrap() < MIN_KERNEL);
        assert_eq!(kernel_version("garbage"), None);
        assert!(missing_caps("000001ffffffffff").is_empty());
        assert_eq!(
            missing_caps("0000000000000000"),
            ["CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_BPF", "CAP_PERFMON"]
        );
    }

    #[test]
    fn a_missing_cni_dir_and_an_empty_one_fail_with_a_fix() {
        let t = tempfile::tempdir().unwrap();
        let c = cni_conf(&t.path().join("nope"));
        assert!(!c.ok && c.fix.is_some());
        let c = cni_conf(t.path());
        assert!(!c.ok && c.detail.contains("no network configuration"));
        std::fs::write(t.path().join("10-flannel.conflist"), "{}").unwrap();
        let c = cni_conf(t.path());
        assert!(c.ok && c.detail.contains("10-flannel.conflist"), "{c:?}");
    }
}
