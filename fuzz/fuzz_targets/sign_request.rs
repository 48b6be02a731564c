//! The CA's request decoder: JSON envelope, then the PKCS#10 CSR (PEM and
//! raw DER). Never panics; every refusal's message is bounded and shows
//! what it quotes escaped once (`mesh_ca::csr::MAX_ERROR_LEN`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_ca::csr::fuzz_decode(data);
});
