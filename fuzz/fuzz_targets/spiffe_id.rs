//! The SPIFFE ID parser: never panics; what it accepts prints back as-is.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_core::identity::fuzz_parse(data);
});
