#![forbid(unsafe_code)]
//! The sockmesh node proxy.

pub mod identity;
pub mod metrics;
pub mod admin;
pub mod drain;
