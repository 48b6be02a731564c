//! `./x image`: the container images of deploy/images/*.Dockerfile, built
//! without a Docker daemon. The binaries are built static (musl target);
//! each image is one layer holding its binary, written as an OCI image
//! layout in a tar archive (`ctr images import` and `podman load` take it):
//! `target/images/<name>.oci.tar`. With `--check`, a containerd of its own
//! (its own root, state and socket under a temp dir, inside a network
//! namespace it makes) imports each image and `ctr run`s it with
//! `--version`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;
use sha2::{Digest, Sha256};

pub const MUSL: &str = "x86_64-unknown-linux-musl";

/// (image name, binary, package, user): the user as in the Dockerfile's
/// USER (the CA runs unprivileged; the proxy and the CNI installer as root,
/// with the capabilities the DaemonSet grants).
pub const IMAGES: &[(&str, &str, &str, &str)] = &[
    ("mesh-ca", "mesh-ca", "mesh-ca", "10001"),
    ("mesh-cni", "mesh-cni", "mesh-cni", "0"),
    ("mesh-proxy", "mesh-proxy", "mesh-proxy", "0"),
    ("mesh", "mesh", "mesh-cli", "65534"),
];

pub const PREFIX: &str = "localhost/sockmesh";

fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One ustar header + data for a regular file (`mode`), or a directory
/// (`data` None).
fn tar_entry(out: &mut Vec<u8>, path: &str, mode: u32, data: Option<&[u8]>) -> Result<()> {
    ensure!(path.len() < 100, "tar path {path:?} too long");
    let mut h = [0u8; 512];
    h[..path.len()].copy_from_slice(path.as_bytes());
    let octal = |h: &mut [u8; 512], at: usize, len: usize, v: u64| {
        let s = format!("{v:0width$o}\0", width = len - 1);
        h[at..at + len].copy_from_slice(s.as_bytes());
    };
    octal(&mut h, 100, 8, u64::from(mode));
    octal(&mut h, 108, 8, 0);
    octal(&mut h, 116, 8, 0);
    octal(&mut h, 124, 12, data.map_or(0, |d| d.len() as u64));
    octal(&mut h, 136, 12, 0);
    h[148..156].copy_from_slice(b"        ");
    h[156] = if data.is_some() { b'0' } else { b'5' };
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    out.extend_from_slice(&h);
    if let Some(d) = data {
        out.extend_from_slice(d);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    Ok(())
}

fn tar_end(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0u8; 1024]);
}

fn sha256(b: &[u8]) -> String {
    let d = Sha256::digest(b);
    d.iter().map(|x| format!("{x:02x}")).collect()
}

/// The OCI layout of an image whose one layer holds `/<binary>` and an
/// empty `/tmp`, as a tar archive. Returns (archive, manifest digest).
pub fn oci_archive(
    name: &str,
    binary_name: &str,
    user: &str,
    binary: &[u8],
) -> Result<(Vec<u8>, String)> {
    let mut layer = Vec::new();
    tar_entry(&mut layer, "tmp/", 0o1777, None)?;
    tar_entry(&mut layer, binary_name, 0o755, Some(binary))?;
    tar_end(&mut layer);
    let layer_digest = sha256(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": [format!("/{binary_name}")],
            "User": user,
            "Env": ["PATH=/"],
            "WorkingDir": "/",
            "Labels": {"org.opencontainers.image.title": name, "org.opencontainers.image.version": version()},
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
        "history": [{"created_by": format!("cargo xtask image ({binary_name}, static musl)")}],
    }))?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{config_digest}"), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": format!("sha256:{layer_digest}"), "size": layer.len()}],
    }))?;
    let manifest_digest = sha256(&manifest);
    let reference = format!("{PREFIX}/{name}:{}", version());
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": reference,
                "org.opencontainers.image.ref.name": version(),
            },
        }],
    }))?;
    let mut out = Vec::new();
    tar_entry(
        &mut out,
        "oci-layout",
        0o644,
        Some(br#"{"imageLayoutVersion":"1.0.0"}"#),
    )?;
    tar_entry(&mut out, "index.json", 0o644, Some(&index))?;
    tar_entry(&mut out, "blobs/", 0o755, None)?;
    tar_entry(&mut out, "blobs/sha256/", 0o755, None)?;
    for (digest, blob) in [
        (&layer_digest, &layer),
        (&config_digest, &config),
        (&manifest_digest, &manifest),
    ] {
        tar_entry(
            &mut out,
            &format!("blobs/sha256/{digest}"),
            0o644,
            Some(blob),
        )?;
    }
    tar_end(&mut out);
    Ok((out, manifest_digest))
}

/// `./x image [--check]`.
pub fn image(root: &Path, target_dir: &Path, check: bool) -> Result<()> {
    let start = Instant::now();
    let installed = sh(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|l| l.trim() == MUSL) {
        println!("image: rustup target add {MUSL}");
        sh(Command::new("rustup").args(["target", "add", MUSL]))?;
    }
    println!("image: building static binaries (cargo build --release --target {MUSL})");
    let mut build = cargo();
    build
        .current_dir(root)
        .args(["build", "--release", "--target", MUSL]);
    for (_, bin, pkg, _) in IMAGES {
        build.args(["-p", pkg, "--bin", bin]);
    }
    let st = build.status().context("spawn cargo build")?;
    ensure!(st.success(), "cargo build --target {MUSL} failed: {st}");
    let bins = target_dir.join(MUSL).join("release");
    let out_dir = target_dir.join("images");
    std::fs::create_dir_all(&out_dir)?;
    let mut archives = Vec::new();
    for (name, bin, _, user) in IMAGES {
        let path = bins.join(bin);
        // The release profile keeps line tables (for the benchmarks'
        // profiles); an image carries none.
        let stripped = out_dir.join(format!("{bin}.stripped"));
        sh(Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&stripped)
            .arg(&path))?;
        let data =
            std::fs::read(&stripped).with_context(|| format!("read {}", stripped.display()))?;
        let _ = std::fs::remove_file(&stripped);
        let static_ok = sh(Command::new("file").arg(&path)).unwrap_or_default();
        if !static_ok.contains("statically linked") && !static_ok.contains("static-pie") {
            bail!("{} is not static: {static_ok}", path.display());
        }
        let (archive, digest) = oci_archive(name, bin, user, &data)?;
        let file = out_dir.join(format!("{name}.oci.tar"));
        std::fs::write(&file, &archive).with_context(|| format!("write {}", file.display()))?;
        println!(
            "image: {PREFIX}/{name}:{} -> {} ({:.1} MiB, manifest sha256:{digest})",
            version(),
            file.display(),
            archive.len() as f64 / (1024.0 * 1024.0)
        );
        archives.push((name.to_string(), bin.to_string(), file));
    }
    if check {
        run_check(&archives)?;
    }
    println!("image: done in {:.0}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// A containerd of our own, in a netns of our own, with its containers in
/// a cgroup subtree of our own; all removed on drop.
struct Containerd {
    netns: String,
    dir: PathBuf,
    /// The subtree's name, directly under the cgroup root(s).
    cgroup: String,
    child: std::process::Child,
}

/// The cgroup hierarchies' mount points (v2, or v1 controllers and
/// `unified` on a hybrid host): where runc makes a container's cgroups.
fn cgroup_mounts() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_owned()];
    }
    std::fs::read_dir(root)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.join("cgroup.procs").exists())
                .collect()
        })
        .unwrap_or_default()
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The snapshots' mounts (a failed run's task and container were
        // deleted through ctr, which ends their shims).
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o ' {}[^ ]*' /proc/self/mounts | sort -r | xargs -r -n1 umount -l",
                self.dir.display()
            ))
            .status();
        for m in cgroup_mounts() {
            let sub = m.join(&self.cgroup);
            if let Ok(children) = std::fs::read_dir(&sub) {
                for c in children
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir())
                {
                    let _ = std::fs::remove_dir(c.path());
                }
            }
            let _ = std::fs::remove_dir(&sub);
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Containerd {
    fn start() -> Result<Self> {
        let netns = format!("sm-image-{}", std::process::id());
        let cgroup = format!("sockmesh-image-{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("sockmesh-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        sh(Command::new("ip").args(["netns", "add", &netns]))?;
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{0}/containerd.sock\"\n[ttrpc]\n  address = \"{0}/containerd.sock.ttrpc\"\n[debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
                dir.display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        // nsenter, not `ip netns exec`: that one also remounts /sys, and
        // runc then finds no cgroup mount.
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{netns}"))
            .args(["--", "containerd", "--config"])
            .arg(&config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start containerd")?;
        let c = Containerd {
            netns,
            dir,
            cgroup,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.ctr(&["version"]).is_err() {
            ensure!(
                Instant::now() < deadline,
                "containerd did not answer within 20s: see {}",
                c.dir.join("containerd.log").display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(c)
    }

    fn ctr(&self, args: &[&str]) -> Result<String> {
        let sock = self.dir.join("containerd.sock");
        sh(Command::new("ctr")
            .arg("--address")
            .arg(&sock)
            // containerd puts a container without --cgroup in
            // /<namespace>/<id>: the namespace is the subtree's name, so
            // its containers land in the subtree drop removes.
            .args(["--namespace", &self.cgroup])
            .args(args))
    }
}

/// The binary `bin` out of an image archive, as a runtime unpacks it:
/// index.json -> manifest -> the layer -> the file.
fn unpack(archive: &Path, bin: &str, into: &Path) -> Result<PathBuf> {
    let work = into.join(format!("{bin}.oci"));
    std::fs::create_dir_all(&work)?;
    sh(Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(&work))?;
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.join("index.json"))?)?;
    let blob = |digest: &str| {
        work.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .context("index: no manifest")?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(manifest_digest))?)?;
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .context("manifest: no layer")?;
    sh(Command::new("tar")
        .arg("-xf")
        .arg(blob(layer))
        .arg("-C")
        .arg(into)
        .arg(bin))?;
    Ok(into.join(bin))
}

/// The images' `mesh`, `mesh-ca` and `mesh-proxy`, unpacked, bring up a
/// one-node local mesh (real netns, eBPF, the proxy enrolling the demo
/// pods) and serve a request through it; `mesh down` always follows.
fn local_mesh_check(archives: &[(String, String, PathBuf)]) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("sockmesh-image-bins-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for (name, bin, file) in archives {
        if ["mesh", "mesh-ca", "mesh-proxy"].contains(&name.as_str()) {
            unpack(file, bin, &dir)?;
        }
    }
    let mesh = dir.join("mesh");
    let start = Instant::now();
    let result = (|| -> Result<String> {
        sh(Command::new(&mesh).args(["up", "--name", "imgcheck", "--nodes", "1"]))?;
        sh(Command::new(&mesh).args(["status", "--name", "imgcheck"]))?;
        sh(Command::new(&mesh).args([
            "exec",
            "--name",
            "imgcheck",
            "default/client",
            "--",
            "curl",
            "-sS",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://web:8080/",
        ]))
    })();
    let down = sh(Command::new(&mesh).args(["down", "--name", "imgcheck"]));
    let _ = std::fs::remove_dir_all(&dir);
    let code = result.context("the images' binaries on a local mesh node")?;
    down.context("mesh down after the image check")?;
    ensure!(
        code.trim() == "200",
        "client -> web through the image's proxy answered {code:?}"
    );
    println!(
        "image: the images' mesh, mesh-ca and mesh-proxy ran a one-node local mesh: client -> web answered 200 ({:.1}s)",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_check(archives: &[(String, String, PathBuf)]) -> Result<()> {
    local_mesh_check(archives)?;
    let c = Containerd::start()?;
    for (name, bin, file) in archives {
        let reference = format!("{PREFIX}/{name}:{}", version());
        c.ctr(&[
            "images",
            "import",
            "--snapshotter",
            "native",
            &file.display().to_string(),
        ])?;
        let id = format!("check-{name}");
        let start = Instant::now();
        let out = c.ctr(&[
            "run",
            "--rm",
            &reference,
            &id,
            &format!("/{bin}"),
            "--version",
        ]);
        if out.is_err() {
            let _ = c.ctr(&["tasks", "rm", "-f", &id]);
            let _ = c.ctr(&["containers", "rm", &id]);
        }
        let out = out?;
        ensure!(
            out.contains(version()),
            "{reference}: `{bin} --version` printed {out:?}, not the version {}",
            version()
        );
        println!(
            "image: ctr run {reference} /{bin} --version -> {} ({} ms)",
            out.trim(),
            start.elapsed().as_millis()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_is_an_oci_layout_whose_digests_match() {
        let (archive, digest) =
            oci_archive("mesh-ca", "mesh-ca", "10001", b"\x7fELF fake").unwrap();
        assert_eq!(archive.len() % 512, 0);
        let text = String::from_utf8_lossy(&archive);
        assert!(text.contains("oci-layout"));
        assert!(text.contains(&format!("blobs/sha256/{digest}")));
        assert!(text.contains("io.containerd.image.name"));
        // Header checksums: tar's own verification.
        let dir = std::env::temp_dir().join(format!("oci-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.tar"), &archive).unwrap();
        let st = Command::new("tar")
            .args(["-tf", "a.tar"])
            .current_dir(&dir)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        let listing = String::from_utf8_lossy(&st.stdout);
        assert!(listing.contains("index.json"), "{listing}");
    }
}
