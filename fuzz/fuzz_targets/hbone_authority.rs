//! The `:authority` of an HBONE CONNECT, as an untrusted peer sends it.
//! Run: `cargo +nightly fuzz run hbone_authority`. The same body runs on
//! stable over seeds in mesh-proxy's unit tests (`hbone::authority`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mesh_proxy::hbone::fuzz_authority(data);
});
