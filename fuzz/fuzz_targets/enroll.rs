//! The CNI plugin ↔ node proxy enrollment protocol: a frame's body as a
//! request and as a response (`mesh_core::enroll::fuzz_parse`). Never
//! panics; what is accepted encodes and parses back to itself; a refusal's
//! message is bounded and shows values escaped once.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_core::enroll::fuzz_parse(data);
});
