#![forbid(unsafe_code)]
//! Types every part of sockmesh shares.

pub mod admin;
pub mod ca;
pub mod display;
pub mod enroll;
pub mod identity;
pub mod kubelet_cgroup;
pub mod opt_in;
pub mod policy;
pub mod registry;
