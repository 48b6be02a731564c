//! `cargo xtask` (or `./x`, which first makes sure Rust itself is there):
//! setup, demo, test, bench. Every command runs `setup` first, which installs
//! only what is missing and says what it did.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

mod image;

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};

/// Apt packages the build, the tests and the demo need.
const APT_PACKAGES: &[&str] = &[
    // bpf-linker links against LLVM 22 (the pinned nightly's LLVM).
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    // Linker for Rust, namespaces, tests' real peers.
    "gcc",
    "libc6-dev",
    "iproute2",
    "nftables",
    "iperf3",
    "bpftool",
    "tcpdump",
    "openssl",
    "curl",
    "python3",
    "prometheus", // promtool: the metrics tests check both exposition formats
    "containernetworking-plugins", // bridge, ptp, host-local: mesh-cni's chain tests
    // A real container runtime for the CNI test (run inside a node netns
    // the test makes; the test starts its own containerd, none is needed
    // on the machine).
    "containerd",
    "runc",
    "busybox-static",
    // checkov's venv (./x setup installs checkov from PyPI into target/).
    "python3-venv",
    // `./x image`: static binaries (ring's C for the musl target) and `file`.
    "musl-tools",
    "file",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// checkov, pinned: a new release brings new checks.
const CHECKOV_VERSION: &str = "3.3.30";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

#[derive(Parser)]
#[command(
    about = "sockmesh's developer tasks",
    long_about = "sockmesh's developer tasks. Run as root on Debian bookworm; every task runs `setup` first.\n\n\
                  Examples:\n  ./x demo            # bring up the local mesh (mesh up) with demo apps\n  \
                  ./x test            # fmt, clippy, every test tier, leftover check\n  \
                  ./x bench redirect  # sk_msg redirect vs plain loopback TCP"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: apt packages, the eBPF nightly with
    /// rust-src, bpf-linker, a bpffs mount. A second run does nothing.
    Setup,
    /// Build and bring up the local mesh (`mesh up`: 2 nodes, pods, CA,
    /// proxies, demo apps) and print what to try; `redirect` instead runs
    /// the eBPF path alone in a sandbox and prints the kernel's counters.
    Demo {
        #[arg(default_value = "mesh")]
        what: String,
    },
    /// Everything CI runs: fmt check, clippy -D warnings, all tests (unit,
    /// privileged, end to end), then a check that nothing was left behind.
    Test,
    /// Run the cargo-fuzz targets in fuzz/ (nightly + libFuzzer), one after
    /// the other, each from its corpus in target/fuzz-corpus/<target> and
    /// the seeds in fuzz/seeds/<target>; print executions per target and
    /// fail on any finding, naming the crash file and how to reproduce it.
    /// Installs cargo-fuzz if it is missing.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Run only this target.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(FUZZ_TARGETS))]
        target: Option<String>,
    },
    /// The integrity soak for a person (release build): minutes of many
    /// concurrent checksummed streams with connection churn over every
    /// path of a local mesh, then the kernel's counts checked; a summary
    /// at the end, JSON under target/bench/soak.json. Fails on any
    /// mismatch. (`./x test` runs a fixed 8 GiB per path.)
    Soak {
        /// Minutes of streams.
        #[arg(long, default_value_t = 3.0)]
        minutes: f64,
        /// Streams in flight at once.
        #[arg(long, default_value_t = 8)]
        workers: usize,
        /// Largest stream, MiB each way.
        #[arg(long, default_value_t = 256)]
        max_mib: u64,
    },
    /// The container images (deploy/images/*.Dockerfile) without a Docker
    /// daemon: static musl binaries, each in an OCI image layout archive
    /// under target/images/ (`ctr images import`, `podman load`). With
    /// --check, a containerd of its own (temp dirs, its own netns) imports
    /// and runs each one with --version.
    Image {
        #[arg(long)]
        check: bool,
    },
    /// Benchmarks (release builds), printed as tables and written as JSON
    /// under target/bench/.
    Bench {
        /// `redirect` (sk_msg vs loopback TCP), `mesh` (pod to pod on the
        /// local mesh vs plain TCP, cross-node and same-node: every
        /// performance target with PASS/FAIL, 5 interleaved repetitions, median
        /// and spread; SOCKMESH_BENCH_REPS=N, SOCKMESH_BENCH_PERF=FILE for
        /// a perf profile of both proxies), `hbone` (the tunnel on loopback, per
        /// rustls provider), `ca` (certificate signing), `kube` (the
        /// Kubernetes mode: pod created / annotation flipped -> enrolled,
        /// p50/p99 over 200 pods) or `all`.
        #[arg(default_value = "all")]
        what: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    std::env::set_current_dir(&root)?;
    setup()?;
    match cli.cmd {
        Cmd::Setup => Ok(()),
        Cmd::Demo { what } => demo(&root, &what),
        Cmd::Test => test(&root),
        Cmd::Bench { what } => bench(&root, &what),
        Cmd::Soak {
            minutes,
            workers,
            max_mib,
        } => soak(&root, minutes, workers, max_mib),
        Cmd::Fuzz { seconds, target } => fuzz(&root, seconds, target.as_deref()),
        Cmd::Image { check } => image::image(&root, &target_dir(&root), check),
    }
}

fn workspace_root() -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(dir.parent().context("xtask has no parent dir")?.to_owned())
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// Runs a command with inherited output, failing with its status.
fn sh(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("spawn {cmd:?}"))?;
    ensure!(st.success(), "{cmd:?} failed: {st}");
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|u| u.trim() == "0")
}

fn nightly_channel() -> Result<String> {
    let f = Path::new("mesh-ebpf/kernel/rust-toolchain.toml");
    let s = std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?;
    s.lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .map(|c| c.trim_matches('"').to_owned())
        .with_context(|| format!("{}: no channel line", f.display()))
}

fn setup() -> Result<()> {
    let start = Instant::now();
    let mut did: Vec<String> = Vec::new();
    ensure!(
        is_root(),
        "sockmesh's setup, tests and demo need root (apt, network namespaces, cgroups, eBPF): \
         run as root"
    );

    // 1. apt packages.
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        println!("setup: installing apt packages: {}", missing.join(" "));
        sh(Command::new("apt-get").arg("update").arg("-q"))?;
        sh(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing))?;
        did.push(format!("apt: {}", missing.join(" ")));
    }

    // 2. The eBPF nightly with rust-src.
    let nightly = nightly_channel()?;
    let has_src = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        &nightly,
    ]))
    .is_some_and(|l| l.lines().any(|c| c.starts_with("rust-src")));
    if !has_src {
        println!("setup: installing Rust {nightly} with rust-src (builds the eBPF programs)");
        sh(Command::new("rustup").args([
            "toolchain",
            "install",
            &nightly,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
        did.push(format!("rustup: {nightly} + rust-src"));
    }

    // 3. bpf-linker, pinned.
    let linker_ok = output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if !linker_ok {
        println!("setup: installing bpf-linker {BPF_LINKER_VERSION} (LLVM 22)");
        let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
        sh(Command::new("cargo").env("PATH", path).args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ]))?;
        did.push(format!("bpf-linker {BPF_LINKER_VERSION}"));
    }

    // cargo-nextest: `./x test`'s runner.
    if output(cargo().args(["nextest", "--version"])).is_none() {
        println!("setup: installing cargo-nextest (cargo install --locked)");
        sh(cargo().args(["install", "cargo-nextest", "--locked"]))?;
        did.push("cargo-nextest".into());
    }

    // checkov (PyPI), the manifest scanner mesh-cli's tests run on deploy/:
    // in a venv of its own under target/, never in the system's Python.
    // Always target/checkov (mesh-cli's test looks there), whatever
    // CARGO_TARGET_DIR says.
    let venv = PathBuf::from("target/checkov");
    let checkov = venv.join("bin/checkov");
    if output(Command::new(&checkov).arg("--version")).is_none_or(|v| v.trim() != CHECKOV_VERSION) {
        println!(
            "setup: installing checkov {CHECKOV_VERSION} (pip, into {})",
            venv.display()
        );
        sh(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        sh(Command::new(venv.join("bin/pip")).args([
            "install",
            "-q",
            &format!("checkov=={CHECKOV_VERSION}"),
        ]))?;
        did.push(format!("checkov {CHECKOV_VERSION} in {}", venv.display()));
    }

    // 4. bpffs.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        println!("setup: mounting bpffs at /sys/fs/bpf");
        sh(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
        did.push("bpffs mounted at /sys/fs/bpf".into());
    }

    if did.is_empty() {
        println!("setup: nothing to do (all prerequisites present)");
    } else {
        println!(
            "setup: done in {:.0}s: {}",
            start.elapsed().as_secs_f64(),
            did.join("; ")
        );
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn demo(root: &Path, what: &str) -> Result<()> {
    println!("demo: building (the first build takes a few minutes)...");
    sh(cargo().args(["build", "--bins"]))?;
    let bin = target_dir(root).join("debug");
    match what {
        "redirect" => sh(&mut Command::new(bin.join("sockmesh-demo"))),
        "mesh" => {
            // A mesh left by an earlier demo is replaced, not refused.
            let mesh = bin.join("mesh");
            let _ = Command::new(&mesh).args(["down"]).status();
            sh(Command::new(&mesh).arg("up"))?;
            println!(
                "\nThe `mesh` CLI is {}; for the commands above:\n  export PATH={}:$PATH",
                mesh.display(),
                bin.display()
            );
            Ok(())
        }
        w => {
            bail!("unknown demo {w:?}: `mesh` (the local mesh) or `redirect` (the eBPF path alone)")
        }
    }
}

fn test(root: &Path) -> Result<()> {
    let start = Instant::now();
    println!("test: cargo fmt --check");
    sh(cargo().args(["fmt", "--all", "--", "--check"]))?;
    // The fuzz targets (their own workspace; cargo-fuzz needs nightly to
    // run them, but they must keep compiling). Their bodies also run over
    // seeds in ordinary unit tests.
    println!("test: cargo check --manifest-path fuzz/Cargo.toml");
    sh(cargo().args(["check", "--manifest-path", "fuzz/Cargo.toml"]))?;
    fuzz_in_test(root)?;
    // The privileged tiers (namespaces, cgroups, eBPF, local meshes) are
    // behind a feature, so plain `cargo test` passes as a normal user;
    // here, as root, they are built, linted and run.
    const PRIVILEGED: &str = "sockmesh-tests/privileged,mesh-local/privileged,mesh-cni/privileged";
    println!("test: cargo clippy --all-targets --features {PRIVILEGED} -- -D warnings");
    sh(cargo().args([
        "clippy",
        "--all-targets",
        "--features",
        PRIVILEGED,
        "--",
        "-D",
        "warnings",
    ]))?;
    // The end-to-end tests run other packages' binaries (mesh-proxy,
    // mesh-ca, mesh): build them all first.
    println!("test: cargo build --bins");
    sh(cargo().args(["build", "--bins"]))?;
    // cargo-nextest runs every test binary; .config/nextest.toml puts the
    // privileged tests (meshes, namespaces, eBPF) in a serial group.
    println!("test: cargo nextest run --features {PRIVILEGED} (unit, privileged, end-to-end)");
    let junit = target_dir(root).join("nextest/default/junit.xml");
    let _ = std::fs::remove_file(&junit);
    let st = cargo()
        .args([
            "nextest",
            "run",
            "--workspace",
            "--no-fail-fast",
            "--features",
            PRIVILEGED,
        ])
        .status()
        .context("spawn cargo nextest")?;
    let (mut passed, mut failed) = junit_counts(&junit)?;
    // nextest does not run doctests.
    println!("test: cargo test --doc");
    let doc = cargo()
        .args(["test", "--doc", "--workspace", "--features", PRIVILEGED])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("spawn cargo test --doc")?;
    let stdout = String::from_utf8_lossy(&doc.stdout);
    print!("{stdout}");
    for l in stdout.lines().filter(|l| l.starts_with("test result:")) {
        let num = |word: &str| {
            l.split(';')
                .find(|p| p.trim_end().ends_with(word))
                .and_then(|p| p.split_whitespace().rev().nth(1))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        passed += num("passed");
        failed += num("failed");
    }
    // The container images: built static, each started under a containerd
    // of its own, and the mesh run from them (one test; a release build for
    // the musl target, so minutes on a cold cache).
    println!("test: ./x image --check (the images under containerd, a local mesh from them)");
    let images = image::image(root, &target_dir(root), true);
    match &images {
        Ok(()) => passed += 1,
        Err(e) => {
            println!("test: image check FAILED: {e:#}");
            failed += 1;
        }
    }
    let leftovers = leftovers();
    if !leftovers.is_empty() {
        println!(
            "test: left behind on the machine:\n  {}",
            leftovers.join("\n  ")
        );
    }
    println!("test: took {:.0}s", start.elapsed().as_secs_f64());
    println!("test: {passed} passed, {failed} failed");
    ensure!(st.success(), "cargo nextest failed");
    ensure!(doc.status.success(), "cargo test --doc failed");
    images.context("./x image --check failed")?;
    ensure!(
        leftovers.is_empty(),
        "tests left namespaces, cgroups or pins behind"
    );
    ensure!(passed > 0, "no test ran");
    Ok(())
}

/// Tests run and failed, from nextest's JUnit report.
fn junit_counts(path: &Path) -> Result<(u64, u64)> {
    let xml = std::fs::read_to_string(path)
        .with_context(|| format!("{}: nextest wrote no JUnit report", path.display()))?;
    let root = xml
        .split("<testsuites")
        .nth(1)
        .with_context(|| format!("{}: no <testsuites> element", path.display()))?;
    let head = root.split('>').next().unwrap_or_default();
    let attr = |name: &str| -> u64 {
        head.split(&format!(" {name}=\""))
            .nth(1)
            .and_then(|v| v.split('"').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (tests, failures, errors) = (attr("tests"), attr("failures"), attr("errors"));
    Ok((tests.saturating_sub(failures + errors), failures + errors))
}

/// Sandbox objects still present (every test's names start with sockmesh).
fn leftovers() -> Vec<String> {
    let mut left = Vec::new();
    // The cgroup v2 root: /sys/fs/cgroup, or /sys/fs/cgroup/unified on
    // hybrid hosts (the first cgroup2 mount).
    // Every cgroup hierarchy: v2, and on hybrid hosts the v1 controllers
    // too (a container runtime makes its cgroups in each).
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let cgroups: Vec<String> = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| matches!(f.get(2), Some(&"cgroup2") | Some(&"cgroup")))
        .map(|f| f[1].to_owned())
        .collect();
    let dirs = [("/run/netns", "netns"), ("/sys/fs/bpf", "bpffs pins")]
        .into_iter()
        .chain(cgroups.iter().map(|c| (c.as_str(), "cgroup")));
    for (dir, what) in dirs {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with("sockmesh") {
                    left.push(format!("{what}: {dir}/{n}"));
                }
            }
        }
    }
    left
}

/// Release builds of the mesh's programs and the test harness's (probe,
/// bench, soak), plus `extra` packages.
fn build_release(extra: &[&str]) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--release", "--bins"]);
    for p in ["sockmesh-tests", "mesh-proxy", "mesh-ca"]
        .iter()
        .chain(extra)
    {
        cmd.args(["-p", p]);
    }
    sh(&mut cmd)
}

fn soak(root: &Path, minutes: f64, workers: usize, max_mib: u64) -> Result<()> {
    println!("soak: building release binaries...");
    // mesh-cli: `mesh supervise` runs each node's proxy.
    build_release(&["mesh-cli"])?;
    let out_dir = target_dir(root).join("bench");
    std::fs::create_dir_all(&out_dir)?;
    sh(Command::new(target_dir(root).join("release/sockmesh-soak"))
        .arg("--minutes")
        .arg(minutes.to_string())
        .arg("--workers")
        .arg(workers.to_string())
        .arg("--max-mib")
        .arg(max_mib.to_string())
        .arg("--json")
        .arg(out_dir.join("soak.json")))
}

fn bench(root: &Path, what: &str) -> Result<()> {
    let out_dir = target_dir(root).join("bench");
    std::fs::create_dir_all(&out_dir)?;
    const ALL: [&str; 5] = ["redirect", "mesh", "hbone", "ca", "kube"];
    let chosen: Vec<&str> = match what {
        "all" => ALL.to_vec(),
        w if ALL.contains(&w) => vec![w],
        w => bail!(
            "unknown benchmark {w:?}: choose one of {} or all",
            ALL.join(", ")
        ),
    };
    if chosen
        .iter()
        .any(|w| *w == "redirect" || *w == "mesh" || *w == "kube")
    {
        println!("bench: building release binaries...");
        // mesh-cli: `mesh supervise` runs each node's proxy (and `mesh
        // kube-api` the Kubernetes mode's API server); mesh-cni: the
        // Kubernetes mode enrolls pods through it.
        build_release(&["mesh-cli", "mesh-cni"])?;
    }
    for w in chosen {
        let json = out_dir.join(format!("{w}.json"));
        match w {
            "redirect" | "mesh" | "kube" => sh(Command::new(
                target_dir(root).join("release/sockmesh-bench"),
            )
            .arg(w)
            .arg(&json))?,
            "hbone" => sh(cargo()
                .args([
                    "run",
                    "--release",
                    "-p",
                    "mesh-proxy",
                    "--example",
                    "hbone_bench",
                    "--",
                ])
                .arg(&json))?,
            _ => sh(cargo()
                .args([
                    "run",
                    "--release",
                    "-p",
                    "mesh-ca",
                    "--example",
                    "bench",
                    "--",
                ])
                .arg(&json))?,
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Fuzzing (`./x fuzz`, and a short run in `./x test`).

/// The cargo-fuzz targets in fuzz/Cargo.toml, in the order they run.
const FUZZ_TARGETS: &[&str] = &[
    "spiffe_id",
    "sign_request",
    "policy_yaml",
    "hbone_authority",
    "ca_address",
    "enroll",
    "kube_objects",
    "cni_config",
];
/// cargo-fuzz, installed from crates.io when missing.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Seconds each target runs in `./x test`: a new finding in a seed's
/// neighbourhood fails CI, the whole step stays near a minute.
const FUZZ_TEST_SECONDS: u64 = 15;
/// A single input taking longer than this is a finding (a hang).
const FUZZ_INPUT_TIMEOUT_SECONDS: u64 = 25;

/// What one target's run gave.
struct FuzzRun {
    target: &'static str,
    seconds: f64,
    executions: Option<u64>,
    /// Crash, leak, timeout or OOM inputs libFuzzer wrote during the run.
    findings: Vec<PathBuf>,
    /// Why the run failed without a finding (a build or setup error).
    failure: Option<String>,
    /// What libFuzzer reported about a finding, and where its output is.
    report: Option<String>,
    log: PathBuf,
}

fn fuzz(root: &Path, seconds: u64, target: Option<&str>) -> Result<()> {
    let targets: Vec<&'static str> = match target {
        None => FUZZ_TARGETS.to_vec(),
        Some(t) => match FUZZ_TARGETS.iter().find(|k| **k == t) {
            Some(k) => vec![*k],
            None => bail!(
                "unknown fuzz target {t:?}: choose one of {}",
                FUZZ_TARGETS.join(", ")
            ),
        },
    };
    ensure!(seconds > 0, "--seconds must be at least 1");
    fuzz_targets(root, &targets, seconds)
}

/// `./x test`'s step: every target for [`FUZZ_TEST_SECONDS`].
fn fuzz_in_test(root: &Path) -> Result<()> {
    println!(
        "test: fuzz every target for {FUZZ_TEST_SECONDS}s ({} targets)",
        FUZZ_TARGETS.len()
    );
    fuzz_targets(root, FUZZ_TARGETS, FUZZ_TEST_SECONDS)
}

fn fuzz_targets(root: &Path, targets: &[&'static str], seconds: u64) -> Result<()> {
    ensure_cargo_fuzz()?;
    let nightly = nightly_channel()?;
    // Build once, then run the binaries themselves: `cargo fuzz run`
    // would rebuild whenever the shared tree changed between two targets,
    // and every target fuzzes the same code.
    println!("fuzz: building the targets with {nightly} (cargo fuzz build)");
    sh(cargo_fuzz(&nightly).arg("build"))?;
    let host = output(Command::new("rustup").args(["run", &nightly, "rustc", "-vV"]))
        .and_then(|v| {
            v.lines()
                .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        })
        .context("rustc -vV: no host line")?;
    let bin_dir = root.join("fuzz/target").join(host).join("release");
    let mut runs = Vec::new();
    for target in targets {
        runs.push(fuzz_one(root, &bin_dir, target, seconds)?);
    }
    print_fuzz_table(&runs);
    let mut bad = 0;
    for run in &runs {
        for crash in &run.findings {
            bad += 1;
            if let Some(report) = &run.report {
                println!("fuzz: {}: {report}", run.target);
            }
            println!(
                "fuzz: {}: finding {} (libFuzzer's output: {})\n  \
                 reproduce: cargo +{nightly} fuzz run {} {}\n  \
                 minimize:  cargo +{nightly} fuzz tmin {} {}",
                run.target,
                crash.display(),
                run.log.display(),
                run.target,
                crash.display(),
                run.target,
                crash.display(),
            );
        }
        if let Some(why) = &run.failure {
            bad += 1;
            println!("fuzz: {}: {why}", run.target);
        }
    }
    ensure!(
        bad == 0,
        "fuzzing failed: {bad} finding(s) or failed run(s), above"
    );
    Ok(())
}

/// `cargo fuzz` with the eBPF nightly (libFuzzer needs nightly's
/// sanitizer flags); through rustup, as `cargo +<nightly>` would.
fn cargo_fuzz(nightly: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", nightly, "cargo", "fuzz"]);
    cmd
}

/// Installs cargo-fuzz from crates.io if `cargo fuzz` is missing, saying
/// what it did (the setup step's style: a second run does nothing).
fn ensure_cargo_fuzz() -> Result<()> {
    if let Some(v) = output(Command::new("cargo-fuzz").arg("--version")) {
        println!("fuzz: {} present", v.trim());
        return Ok(());
    }
    println!("fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION} (cargo install --locked)");
    let start = Instant::now();
    sh(cargo().args([
        "install",
        &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
        "--locked",
    ]))?;
    println!(
        "fuzz: installed cargo-fuzz {CARGO_FUZZ_VERSION} in {:.0}s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs one built target for `seconds` from its corpus and seeds, as
/// `cargo fuzz run` would (same artifact directory, same ASan options);
/// libFuzzer's output goes to target/fuzz-logs/<target>.<pid>.log.
fn fuzz_one(root: &Path, bin_dir: &Path, target: &'static str, seconds: u64) -> Result<FuzzRun> {
    let binary = bin_dir.join(target);
    ensure!(
        binary.is_file(),
        "{}: not built (cargo fuzz build)",
        binary.display()
    );
    let corpus = target_dir(root).join("fuzz-corpus").join(target);
    let seeds = root.join("fuzz/seeds").join(target);
    let artifacts = root.join("fuzz/artifacts").join(target);
    let logs = target_dir(root).join("fuzz-logs");
    for dir in [&corpus, &artifacts, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    ensure!(
        seeds.is_dir(),
        "{}: no seeds for fuzz target {target}",
        seeds.display()
    );
    let before = fuzz_artifacts(&artifacts);
    // One log per run: another `./x fuzz` or `./x test` in the same tree
    // must not truncate this one under a running fuzzer.
    let log_path = logs.join(format!("{target}.{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("create {}", log_path.display()))?;
    println!(
        "fuzz: {target} for {seconds}s (corpus {}, seeds {}, log {})",
        corpus.display(),
        seeds.display(),
        log_path.display()
    );
    let start = Instant::now();
    // The first corpus directory is where libFuzzer adds new inputs; the
    // seeds are only read.
    let mut asan = std::env::var("ASAN_OPTIONS").unwrap_or_default();
    if !asan.is_empty() {
        asan.push(':');
    }
    asan.push_str("detect_odr_violation=0");
    let status = Command::new(&binary)
        .env("ASAN_OPTIONS", asan)
        .arg(&corpus)
        .arg(&seeds)
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={FUZZ_INPUT_TIMEOUT_SECONDS}"))
        .arg("-print_final_stats=1")
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("spawn {}", binary.display()))?;
    let elapsed = start.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let findings: Vec<PathBuf> = fuzz_artifacts(&artifacts)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    let failure = (!status.success() && findings.is_empty()).then(|| {
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "{target} failed ({status}) without a crash file; last lines of {}:\n  {}",
            log_path.display(),
            tail.join("\n  ")
        )
    });
    Ok(FuzzRun {
        target,
        seconds: elapsed,
        executions: libfuzzer_executions(&text),
        findings,
        failure,
        report: libfuzzer_report(&text),
        log: log_path,
    })
}

/// The reason libFuzzer stopped: a panic's first two lines, or its own
/// `ERROR:` line (sanitizer, timeout, out of memory).
fn libfuzzer_report(log: &str) -> Option<String> {
    let lines: Vec<&str> = log.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains(" panicked at "))
        .or_else(|| lines.iter().position(|l| l.contains("ERROR: ")))?;
    let report: Vec<&str> = lines[at..].iter().take(2).copied().collect();
    let text = report.join("\n    ");
    Some(text.chars().take(400).collect())
}

/// Inputs libFuzzer saved as findings (crash-, leak-, timeout-, oom-).
fn fuzz_artifacts(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        ["crash-", "leak-", "timeout-", "oom-"]
                            .iter()
                            .any(|k| n.starts_with(k))
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// The number of inputs run, from libFuzzer's output: the last
/// `stat::number_of_executed_units: N` (`-print_final_stats=1`), else the
/// largest `#N` status line (`#N DONE`, `#N pulse`, ...).
fn libfuzzer_executions(log: &str) -> Option<u64> {
    let stat = log.lines().rev().find_map(|l| {
        l.trim()
            .strip_prefix("stat::number_of_executed_units:")
            .and_then(|n| n.trim().parse().ok())
    });
    stat.or_else(|| {
        log.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix('#')?;
                let n = rest.split_whitespace().next()?;
                n.parse::<u64>().ok()
            })
            .max()
    })
}

fn print_fuzz_table(runs: &[FuzzRun]) {
    println!(
        "\n{:<16} {:>8} {:>13} {:>9} {:>9}",
        "target", "seconds", "executions", "exec/s", "findings"
    );
    for r in runs {
        let (execs, rate) = match r.executions {
            Some(n) => (
                n.to_string(),
                format!("{:.0}", n as f64 / r.seconds.max(1e-3)),
            ),
            None => ("?".to_owned(), "?".to_owned()),
        };
        let findings = if r.failure.is_some() && r.findings.is_empty() {
            "failed".to_owned()
        } else {
            r.findings.len().to_string()
        };
        println!(
            "{:<16} {:>8.0} {:>13} {:>9} {:>9}",
            r.target, r.seconds, execs, rate, findings
        );
    }
    println!();
}

#[cfg(test)]
mod fuzz_tests {
    use super::*;

    #[test]
    fn executions_come_from_final_stats_or_the_last_status_line() {
        let done = "#2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                    #65536\tpulse  cov: 50 ft: 60 corp: 9/90b exec/s: 21845 rss: 40Mb\n\
                    #81234\tDONE   cov: 52 ft: 63 corp: 9/90b exec/s: 27078 rss: 40Mb\n\
                    Done 81234 runs in 3 second(s)\n\
                    stat::number_of_executed_units: 81235\n\
                    stat::average_exec_per_sec:     27078\n";
        assert_eq!(libfuzzer_executions(done), Some(81235));
        let crashed =
            "#2\tINITED cov: 10\n#4096\tNEW    cov: 12\n==1== ERROR: libFuzzer: deadly signal\n";
        assert_eq!(libfuzzer_executions(crashed), Some(4096));
        assert_eq!(libfuzzer_executions("error: could not compile"), None);
    }

    #[test]
    fn a_finding_is_reported_by_its_panic_or_libfuzzer_error() {
        let panic = "INFO: seed\nthread '<unnamed>' (1) panicked at src/a.rs:1:5:\nbound broken\n==1== ERROR: libFuzzer: deadly signal\n";
        assert_eq!(
            libfuzzer_report(panic).as_deref(),
            Some("thread '<unnamed>' (1) panicked at src/a.rs:1:5:\n    bound broken")
        );
        let timeout = "#1 INITED\n==2== ERROR: libFuzzer: timeout after 25 seconds\n";
        assert_eq!(
            libfuzzer_report(timeout).as_deref(),
            Some("==2== ERROR: libFuzzer: timeout after 25 seconds")
        );
        assert_eq!(libfuzzer_report("#5 DONE\n"), None);
    }
}
