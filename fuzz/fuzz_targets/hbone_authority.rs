//! The `:authority` of an HBONE CONNECT, as an untrusted peer sends it.
//! Run: `./x fuzz --target hbone_authority`. The same body runs on stable
//! over `fuzz/seeds/hbone_authority` in mesh-proxy's unit tests
//! (`hbone::authority`): accepted authorities round-trip, refusals have a
//! bounded message showing the value once, escaped once.
#![no_main]

// The parser's own source file: it needs only mesh-core (see Cargo.toml).
#[path = "../../mesh-proxy/src/hbone/authority.rs"]
#[allow(dead_code)]
mod authority;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    authority::fuzz_authority(data);
});
