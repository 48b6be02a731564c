#![forbid(unsafe_code)]
//! The sockmesh node proxy.

pub mod admin;
pub mod cni;
pub mod config;
pub mod drain;
pub mod hbone;
pub mod identity;
pub mod metrics;
pub mod node;
pub mod notes;
pub mod run;
