//! The AuthorizationPolicy YAML parser and the policy engine: bytes as
//! UTF-8 to `parse_policies`; whatever parses must print and parse back the
//! same, and a few fixed connections are evaluated against it. Never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_core::policy::fuzz_policy_yaml(data);
});
