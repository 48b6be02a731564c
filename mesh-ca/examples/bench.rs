//! Signing throughput and latency of the CA on one core.
//!
//! `cargo run --release -p mesh-ca --example bench -- [OUT.json] [--count N] [--seconds S]`
//!
//! Drives `Ca::sign` (authorization, CSR decode and signature check, and
//! signing: the work of one request without the network) in a plain loop on
//! this thread, over pre-made CSRs, for at most N certificates or S seconds.
//! Prints a table; writes JSON to OUT.json if given.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_ca::roots::RootSource;
use mesh_ca::{Ca, CaConfig, Caller, FileTokenAuthenticator, auth};
use mesh_core::ca::SignRequest;
use mesh_core::identity::Identity;
use mesh_core::registry::FileRegistry;
use rcgen::{CertificateParams, KeyPair, SanType};

fn main() -> Result<()> {
    let mut out = None;
    let mut count: usize = 20_000;
    let mut seconds: f64 = 10.0;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--count" => {
                count = args
                    .next()
                    .context("--count needs a value")?
                    .parse()
                    .context("--count")?
            }
            "--seconds" => {
                seconds = args
                    .next()
                    .context("--seconds needs a value")?
                    .parse()
                    .context("--seconds")?
            }
            s if s.starts_with("--") => bail!("unknown flag {s}"),
            path => out = Some(path.to_owned()),
        }
    }

    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("registry.yaml"),
        "nodes: [{name: node-1}]\npods: [{namespace: default, name: web-1, uid: u1, node: node-1, service_account: web}]\n",
    )?;
    auth::create_node_token(&dir.path().join("tokens"), "node-1")?;
    let ca = Ca::new(
        CaConfig::new("cluster.local", RootSource::StateDir(dir.path().join("ca"))),
        Arc::new(FileTokenAuthenticator::load(dir.path().join("tokens"))?),
        Arc::new(FileRegistry::load(dir.path().join("registry.yaml"))?),
    )?;
    let identity = Identity::parse("spiffe://cluster.local/ns/default/sa/web")?;
    let caller = Caller {
        node: "node-1".into(),
        principal: "bench".into(),
    };

    // A pool of distinct CSRs, made before timing starts.
    let pool: Vec<SignRequest> = (0..64)
        .map(|_| -> Result<SignRequest> {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::default();
            p.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
            Ok(SignRequest {
                identity: identity.clone(),
                csr: p.serialize_request(&key)?.pem()?,
                ttl_seconds: None,
            })
        })
        .collect::<Result<_>>()?;

    // Warm up.
    for req in pool.iter().take(16) {
        ca.sign(&caller, req)
            .map_err(|r| anyhow::anyhow!("{r:?}"))?;
    }
    let limit = Duration::from_secs_f64(seconds);
    let mut lat = Vec::with_capacity(count);
    let start = Instant::now();
    while lat.len() < count && start.elapsed() < limit {
        let req = &pool[lat.len() % pool.len()];
        let t = Instant::now();
        ca.sign(&caller, req)
            .map_err(|r| anyhow::anyhow!("{r:?}"))?;
        lat.push(t.elapsed());
    }
    let total = start.elapsed();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let rate = lat.len() as f64 / total.as_secs_f64();
    let (p50, p99) = (pct(0.50), pct(0.99));
    println!("mesh-ca signing, one core, ECDSA P-256 root, P-256 CSRs");
    println!("{:<24} {:>12}", "certificates signed", lat.len());
    println!("{:<24} {:>12.1}", "certificates/s", rate);
    println!(
        "{:<24} {:>12.1}",
        "p50 latency (µs)",
        p50.as_secs_f64() * 1e6
    );
    println!(
        "{:<24} {:>12.1}",
        "p99 latency (µs)",
        p99.as_secs_f64() * 1e6
    );
    if let Some(path) = out {
        let json = serde_json::json!({
            "benchmark": "ca_sign",
            "certificates": lat.len(),
            "seconds": total.as_secs_f64(),
            "certificates_per_second": rate,
            "p50_us": p50.as_secs_f64() * 1e6,
            "p99_us": p99.as_secs_f64() * 1e6,
            "key": "ecdsa-p256",
        });
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {path}"))?;
        println!("wrote {path}");
    }
    Ok(())
}
