//! `mesh-cni install` / `uninstall` as the node DaemonSet runs them: the
//! binary copied, the plugin chained into the first conflist, put back
//! when the primary CNI rewrites the file, removed on SIGTERM or
//! `uninstall`. No root: temporary directories stand in for
//! /opt/cni/bin and /etc/cni/net.d.

// Test helpers outside #[test] fns: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const PRIMARY: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"ptp","ipam":{"type":"host-local","subnet":"10.9.0.0/24"}}]}"#;

fn types(list: &Path) -> Vec<String> {
    let v: Value = serde_json::from_slice(&std::fs::read(list).unwrap()).unwrap();
    v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_owned())
        .collect()
}

fn wait(what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: not within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn install_watches_the_conflist_and_sigterm_uninstalls() {
    let d = tempfile::tempdir().unwrap();
    let (bin, conf) = (d.path().join("bin"), d.path().join("net.d"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&conf).unwrap();
    let list = conf.join("10-k8s.conflist");
    std::fs::write(&list, PRIMARY).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
        .env_remove("CNI_COMMAND")
        .args(["install", "--bin-dir"])
        .arg(&bin)
        .arg("--conf-dir")
        .arg(&conf)
        .args([
            "--socket",
            "/run/sockmesh/cni.sock",
            "--fail-open-namespace",
            "kube-system",
        ])
        .args(["--watch", "--poll-ms", "50", "--watch-seconds", "60"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let guard = scopeguard(child.id());
    wait("the plugin chained", || {
        types(&list) == ["ptp", "mesh-cni"] && bin.join("mesh-cni").exists()
    });
    let v: Value = serde_json::from_slice(&std::fs::read(&list).unwrap()).unwrap();
    assert_eq!(
        v["plugins"][1]["failOpenNamespaces"][0], "kube-system",
        "{v}"
    );
    // The primary CNI writes its file again: mesh-cni is put back.
    std::fs::write(&list, PRIMARY).unwrap();
    wait("the plugin put back", || {
        types(&list) == ["ptp", "mesh-cni"]
    });
    // SIGTERM (the DaemonSet's pod stops): taken out again.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // Exited and reaped: its pid is not ours to signal any more.
    std::mem::forget(guard);
    assert!(status.success(), "{status}");
    assert_eq!(types(&list), ["ptp"]);
    assert!(!bin.join("mesh-cni").exists());
}

#[test]
fn uninstall_is_idempotent_and_a_missing_conflist_is_named() {
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
        .env_remove("CNI_COMMAND")
        .args(["install", "--bin-dir"])
        .arg(d.path())
        .arg("--conf-dir")
        .arg(d.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no *.conflist in"), "{err}");
    for _ in 0..2 {
        let out = Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
            .env_remove("CNI_COMMAND")
            .args(["uninstall", "--bin-dir"])
            .arg(d.path())
            .arg("--conf-dir")
            .arg(d.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Kills the installer if the test fails before it stops it.
struct Guard(u32);

fn scopeguard(pid: u32) -> Guard {
    Guard(pid)
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}
