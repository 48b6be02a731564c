//! The SPIFFE ID parser: never panics; what it accepts prints back as-is;
//! a refusal's message is bounded and shows the value escaped once.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_core::identity::fuzz_parse(data);
});
