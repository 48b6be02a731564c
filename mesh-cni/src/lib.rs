#![forbid(unsafe_code)]
//! `mesh-cni`: a chained CNI 1.1 plugin that hands each new pod to the
//! sockmesh node proxy before the pod's first packet, and the installer
//! that puts it into the node's CNI configuration.
//!
//! - [`spec`]: the CNI exec protocol (environment, stdin config, results,
//!   error codes);
//! - [`agent`]: the enrollment client (mesh-core's `enroll` protocol over
//!   the node proxy's Unix socket);
//! - [`plugin`]: what ADD, DEL, CHECK, STATUS, GC and VERSION do;
//! - [`install`]: binary and conflist installation, watch, uninstall.

pub mod agent;
pub mod install;
pub mod plugin;
pub mod spec;
