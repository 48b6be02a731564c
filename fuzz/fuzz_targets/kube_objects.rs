//! Kubernetes objects (Pod, Service, EndpointSlice, AuthorizationPolicy)
//! as JSON from the API server, mapped to mesh-core types. Never panics; a
//! skipped object's problem is bounded and shows values escaped once. The
//! same body runs on stable over `fuzz/seeds/kube_objects` in mesh-kube's
//! unit tests (`convert`).
#![no_main]

// The module's own source file: it needs only mesh-core and k8s-openapi
// (see Cargo.toml), not kube's client and runtime.
#[path = "../../mesh-kube/src/convert.rs"]
#[allow(dead_code)]
mod convert;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    convert::fuzz_parse(data);
});
