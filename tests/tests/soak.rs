//! End-to-end tier: the integrity soak. Every path through the mesh —
//! cross-node, same-node, a Service VIP and passthrough to a pod outside
//! the mesh — carries at least 8 GiB in 4 concurrent full-duplex streams whose content
//! is checksummed end to end (SHA-256 of every byte each way), with zero
//! tolerance: one byte lost, repeated or reordered fails it. The kernel's
//! flow counters must equal the bytes moved. Needs root; fails (never
//! skips) without it.
//!
//! `SOCKMESH_SOAK_GIB` sets the GiB per path (default 8).
//!
//! The sk_msg redirect is not a path the proxy offers: it failed this soak
//! (a writer outran it until `ENOMEM` at 8 GiB in 4 streams; blocking
//! readers see spurious EAGAIN), so it stays off (ARCHITECTURE.md, known
//! limits). Its kernel mechanism is tested on its own in `redirect.rs`.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use mesh_local::control::ControlOptions;
use serde_json::Value;
use sockmesh_tests::e2e::*;

const STREAMS: u64 = 4;

fn gib_per_path() -> Result<u64> {
    match std::env::var("SOCKMESH_SOAK_GIB") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("SOCKMESH_SOAK_GIB={v:?}: not a whole number")),
        Err(_) => Ok(8),
    }
}

/// `STREAMS` concurrent streams from `client` to `to` (served by `server`
/// in `server_pod` on `port`), `per_way` bytes each way per stream, all
/// checksummed. Returns the bytes moved (both ways).
fn soak_path(
    m: &TestMesh,
    name: &str,
    client: &str,
    server_pod: &str,
    port: u16,
    to: &str,
    per_way: u64,
) -> Result<u64> {
    let start = Instant::now();
    let mut server = serve_concurrent(m, server_pod, port, STREAMS as usize, per_way)?;
    let mut clients = Vec::new();
    for i in 0..STREAMS {
        let mut c = strict_client(m, client, to, per_way, 100 + i)?;
        c.event("connected")?;
        clients.push(c);
    }
    let mut from_clients = Vec::new();
    for c in &mut clients {
        from_clients.push(c.event("transfer")?["transfer"].clone());
    }
    // The server's transfers finish in any order.
    let mut at_server = Vec::new();
    while at_server.len() < STREAMS as usize {
        let v = server.next_event()?;
        if v["event"] == "transfer" {
            at_server.push(v["transfer"].clone());
        }
    }
    for c in clients {
        c.wait()?;
    }
    server.wait()?;
    // Every client's stream arrived whole at the server and back: match
    // digests pairwise (the server's order of accepts is not the clients').
    let key = |t: &Value, f: &str| t[f].as_str().unwrap_or_default().to_owned();
    for (i, ct) in from_clients.iter().enumerate() {
        ensure!(
            ct["sent"] == per_way && ct["received"] == per_way,
            "{name}: stream {i} moved {ct}, want {per_way} each way"
        );
        let st = at_server
            .iter()
            .find(|st| key(st, "received_sha256") == key(ct, "sent_sha256"))
            .with_context(|| {
                format!(
                    "{name}: stream {i}'s bytes reached the server altered: {ct} vs {at_server:?}"
                )
            })?;
        ensure!(
            st["received"] == per_way,
            "{name}: server received {st}, want {per_way}"
        );
        ensure!(
            key(st, "sent_sha256") == key(ct, "received_sha256"),
            "{name}: stream {i}'s answer reached the client altered: {st} vs {ct}"
        );
    }
    let moved = 2 * STREAMS * per_way;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "soak {name}: {} GiB in {STREAMS} streams, checksummed, in {secs:.1} s ({:.2} Gbit/s)",
        moved >> 30,
        moved as f64 * 8.0 / secs / 1e9
    );
    Ok(moved)
}

/// A kernel counter of `node`'s data path (`/stats`).
fn kernel_stat(m: &TestMesh, node: &str, name: &str) -> Result<u64> {
    let (_, body) = m.mesh.admin_get(node, "/stats")?;
    let v: Value = serde_json::from_str(&body)?;
    v["kernel"][name]
        .as_u64()
        .with_context(|| format!("no kernel counter {name} in {body}"))
}

/// The source proxy's kernel counters for flows to `orig` (closed ones
/// included): what the clients sent and received, exactly.
fn counted(m: &TestMesh, node: &str, orig_ip: &str, port: u16) -> Result<(u64, u64, usize)> {
    let (_, body) = m.mesh.admin_get(node, "/flows")?;
    let flows: Value = serde_json::from_str(&body)?;
    let want = format!("{orig_ip}:{port}");
    let mut sent = 0;
    let mut received = 0;
    let mut n = 0;
    for f in flows.as_array().into_iter().flatten() {
        if f["original_dst"] == want.as_str() && f["direction"] == "outbound" {
            sent += f["bytes_sent"].as_u64().unwrap_or(0);
            received += f["bytes_received"].as_u64().unwrap_or(0);
            n += 1;
        }
    }
    Ok((sent, received, n))
}

fn soak_mesh(tag: &str, opts: ControlOptions, paths: &[&str]) -> Result<()> {
    let m = TestMesh::up_with(tag, &soak_topology(), opts)?;
    let per_way = (gib_per_path()? << 30) / (2 * STREAMS);
    for (i, path) in paths.iter().enumerate() {
        let port = 9100 + i as u16;
        let (server, dst) = match *path {
            "cross-node" => ("default/web", m.ip("default/web")?),
            "same-node" | "same-node-kernel" => ("default/web-2", m.ip("default/web-2")?),
            "service" => ("other/iperf", m.vip("other/iperf")?),
            "passthrough" => ("default/plain", m.ip("default/plain")?),
            other => anyhow::bail!("no such path {other}"),
        };
        // A Service VIP maps 8080 to the endpoints' 8080.
        let (port, to) = if *path == "service" {
            (8080, format!("{dst}:8080"))
        } else {
            (port, format!("{dst}:{port}"))
        };
        let name = format!("{tag}/{path}");
        // The kernel same-node path: one connection decided by the proxy
        // authorizes client -> web-2:port; the streams then go pod to pod.
        let (base, direct_before) = if *path == "same-node-kernel" {
            let s = serve(&m, server, port, 1, 1000)?;
            ensure!(
                attempt(&m, "default/client", &to)? == Ok(1000),
                "{name}: the authorizing connection failed"
            );
            s.wait()?;
            let mut base = (0, 0, 0);
            wait_until(
                &format!("{name}: the first connection's counts"),
                std::time::Duration::from_secs(10),
                || {
                    base = counted(&m, "node-a", &dst, port)?;
                    Ok((base.0, base.1) == (1000, 1000))
                },
            )?;
            (base, Some(kernel_stat(&m, "node-a", "connect_direct")?))
        } else {
            ((0, 0, 0), None)
        };
        soak_path(&m, &name, "default/client", server, port, &to, per_way)?;
        if let Some(before) = direct_before {
            let after = kernel_stat(&m, "node-a", "connect_direct")?;
            ensure!(
                after == before + STREAMS,
                "{name}: {} of {STREAMS} streams took the kernel path",
                after - before
            );
        }
        // The kernel counted exactly what moved, on the client's node.
        let mut last = (0, 0, 0);
        wait_until(
            &format!("{name}: the kernel's counts"),
            std::time::Duration::from_secs(10),
            || {
                last = counted(&m, "node-a", &dst, port)?;
                last = (
                    last.0.saturating_sub(base.0),
                    last.1.saturating_sub(base.1),
                    last.2.saturating_sub(base.2),
                );
                Ok(last.0 == STREAMS * per_way && last.1 == STREAMS * per_way)
            },
        )
        .with_context(|| {
            format!(
                "{name}: kernel counted {last:?} (sent, received, flows), moved {} each way",
                STREAMS * per_way
            )
        })?;
    }
    Ok(())
}

#[test]
fn every_path_carries_gibibytes_checksummed_with_nothing_lost_or_repeated() -> Result<()> {
    soak_mesh(
        "sk",
        ControlOptions::default(),
        &["cross-node", "same-node-kernel", "service", "passthrough"],
    )?;
    // Same node through the proxy (its splice): what a pod's first
    // connection to an address takes, and every connection with the
    // kernel path off.
    soak_mesh(
        "sp",
        ControlOptions {
            same_node_direct: false,
            ..ControlOptions::default()
        },
        &["same-node"],
    )
}
