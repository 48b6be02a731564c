//! `mesh-proxy --ca`: `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT`. Run: `./x
//! fuzz --target ca_address`. The same body runs on stable over
//! `fuzz/seeds/ca_address` in mesh-proxy's unit tests
//! (`identity::ca_address`): accepted addresses round-trip, refusals have
//! a bounded message showing the value once, escaped once.
#![no_main]

// The parser's own source file: it needs only mesh-core (see Cargo.toml).
#[path = "../../mesh-proxy/src/identity/ca_address.rs"]
#[allow(dead_code)]
mod ca_address;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ca_address::fuzz_ca_address(data);
});
