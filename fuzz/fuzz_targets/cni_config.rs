//! mesh-cni's network configuration, the JSON the container runtime writes
//! to the plugin's stdin, parsed for every CNI command, and its
//! `prevResult` addresses (`mesh_cni::spec::fuzz_parse`). Never panics; a
//! refusal's message is bounded and shows values escaped once.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_cni::spec::fuzz_parse(data);
});
