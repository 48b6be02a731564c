//! Builds the eBPF programs (`mesh-ebpf/kernel`) with the pinned nightly via
//! aya-build, so `cargo build` alone produces a loader with its programs.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, anyhow, bail};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let kernel = Path::new(&manifest_dir).join("kernel");
    let toolchain_file = kernel.join("rust-toolchain.toml");
    println!("cargo::rerun-if-changed={}", toolchain_file.display());
    let toolchain = std::fs::read_to_string(&toolchain_file)
        .with_context(|| format!("reading {}", toolchain_file.display()))?;
    let channel = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .map(|c| c.trim_matches('"').to_owned())
        .ok_or_else(|| anyhow!("{}: no `channel = ` line", toolchain_file.display()))?;

    // Fail early with the fix, not deep inside cargo's output.
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!("bpf-linker is not installed (or not on PATH): run `./x setup` first");
    }
    let root_dir = kernel
        .to_str()
        .ok_or_else(|| anyhow!("{}: path is not UTF-8", kernel.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "mesh-ebpf-kernel",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&channel),
    )
}
