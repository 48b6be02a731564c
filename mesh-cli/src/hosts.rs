//! Service names inside pods: one hosts file per namespace, in the mesh's
//! state directory, shown as `/etc/hosts` to the programs `mesh exec`
//! starts (a private mount namespace with a bind mount: the machine's own
//! `/etc/hosts` is never touched).
//!
//! In namespace `default`, Service `web` is `web`, `web.default`,
//! `web.default.svc` and `web.default.svc.cluster.local`; Services of other
//! namespaces by all but the short name (as Kubernetes DNS).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use mesh_local::{Mesh, ServiceInfo};

/// `<state dir>/hosts/<namespace>`.
pub fn path(state_dir: &Path, namespace: &str) -> PathBuf {
    state_dir.join("hosts").join(namespace)
}

/// The hosts file of `namespace`.
pub fn render(mesh: &str, namespace: &str, services: &[ServiceInfo]) -> String {
    let mut out = format!(
        "# sockmesh mesh {mesh}, namespace {namespace}: written by `mesh up`, shown as /etc/hosts to `mesh exec`\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n"
    );
    for s in services {
        let fq = format!("{}.{}", s.name, s.namespace);
        let mut names = Vec::new();
        if s.namespace == namespace {
            names.push(s.name.clone());
        }
        names.extend([
            fq.clone(),
            format!("{fq}.svc"),
            format!("{fq}.svc.cluster.local"),
        ]);
        out.push_str(&format!("{}\t{}\n", s.vip, names.join(" ")));
    }
    out
}

/// Writes a hosts file for every namespace that has pods; returns the
/// namespaces.
pub fn write_all(mesh: &Mesh) -> Result<Vec<String>> {
    let state = mesh.state();
    let namespaces: BTreeSet<&str> = state.pods.iter().map(|p| p.namespace.as_str()).collect();
    let dir = mesh.state_dir().join("hosts");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    for ns in &namespaces {
        let p = path(&mesh.state_dir(), ns);
        std::fs::write(&p, render(mesh.name(), ns, &state.services))
            .with_context(|| format!("write {}", p.display()))?;
    }
    Ok(namespaces.into_iter().map(str::to_owned).collect())
}

/// `argv` wrapped so that it sees `hosts` as `/etc/hosts`: a new mount
/// namespace (private propagation, so nothing leaks to the machine), a
/// bind mount, then `exec`.
pub fn wrap(hosts: &Path, argv: &[OsString]) -> Vec<OsString> {
    let mut out: Vec<OsString> = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        r#"mount --bind "$0" /etc/hosts || exit 125; exec "$@""#,
    ]
    .iter()
    .map(OsString::from)
    .collect();
    out.push(hosts.as_os_str().to_owned());
    out.extend(argv.iter().cloned());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, vip: &str) -> ServiceInfo {
        ServiceInfo {
            namespace: ns.into(),
            name: name.into(),
            vip: vip.parse().unwrap(),
            ports: vec![(8080, 8080)],
            selector: Default::default(),
            endpoints: vec![],
        }
    }

    #[test]
    fn short_names_only_in_their_own_namespace() {
        let s = [
            svc("default", "web", "10.77.240.1"),
            svc("other", "iperf", "10.77.240.2"),
        ];
        assert_eq!(
            render("demo", "default", &s),
            "# sockmesh mesh demo, namespace default: written by `mesh up`, shown as /etc/hosts to `mesh exec`\n\
             127.0.0.1\tlocalhost\n\
             ::1\tlocalhost ip6-localhost ip6-loopback\n\
             10.77.240.1\tweb web.default web.default.svc web.default.svc.cluster.local\n\
             10.77.240.2\tiperf.other iperf.other.svc iperf.other.svc.cluster.local\n"
        );
        assert!(render("demo", "other", &s).contains("10.77.240.2\tiperf iperf.other "));
    }

    #[test]
    fn wrap_keeps_the_program_intact() {
        let argv: Vec<OsString> = ["curl", "-s", "http://web:8080/"]
            .iter()
            .map(OsString::from)
            .collect();
        let w = wrap(Path::new("/run/sockmesh/demo/hosts/default"), &argv);
        assert_eq!(w[0], "unshare");
        assert_eq!(w[8], "/run/sockmesh/demo/hosts/default");
        assert_eq!(&w[9..], &argv[..]);
    }
}
