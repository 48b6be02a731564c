#![forbid(unsafe_code)]
//! The sockmesh node proxy.

pub mod admin;
pub mod cni;
pub mod config;
pub mod drain;
pub mod explain;
pub mod hbone;
pub mod identity;
pub mod metrics;
pub mod notes;
pub mod pod_status;
pub mod proxy;
pub mod registry;
pub mod route;
pub mod run;
pub mod state;
pub mod uninstall;
pub mod workloads;
