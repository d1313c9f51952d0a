//! The config loader (YAML, schema, validation, templates) on arbitrary text: errors, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = netwarden::config::parse("fuzz.yaml", &text) {
        assert!(!e.to_string().is_empty());
    }
    if let Err(e) = netwarden::config::parse_kubernetes("configmap/fuzz", &text) {
        assert!(!e.to_string().is_empty());
    }
});
