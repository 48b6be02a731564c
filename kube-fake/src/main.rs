#![forbid(unsafe_code)]
//! `kube-fake --listen 127.0.0.1:6443`: the fake API server as a process,
//! for kubectl and for trying things by hand. Prints a kubeconfig.

use std::net::SocketAddr;

use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on (plain HTTP).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Write a kubeconfig for this server here.
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let api = kube_fake::FakeApiServer::start_with(kube_fake::Options {
        addr: args.listen,
        ..Default::default()
    })
    .await?;
    match &args.kubeconfig {
        Some(path) => std::fs::write(path, api.kubeconfig())?,
        None => print!("{}", api.kubeconfig()),
    }
    eprintln!("kube-fake listening on {}", api.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
