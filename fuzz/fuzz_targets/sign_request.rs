//! The CA's request decoder: JSON envelope, then the PKCS#10 CSR (PEM and
//! raw DER). Never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_ca::csr::fuzz_decode(data);
});
