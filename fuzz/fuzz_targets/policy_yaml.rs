//! The AuthorizationPolicy YAML parser and the policy engine: bytes as
//! UTF-8 to `parse_policies`. A refusal's message must pass
//! `PolicyError::check_message` (bounded, values escaped once); whatever
//! parses must print and parse back the same, and a few fixed connections
//! are evaluated against it (`fuzz_policy_yaml`). Never panics otherwise.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::policy::{fuzz_policy_yaml, parse_policies};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_policies(text) {
        Err(e) => {
            if let Err(why) = e.check_message(text) {
                panic!("{why}");
            }
        }
        Ok(_) => fuzz_policy_yaml(data),
    }
});
