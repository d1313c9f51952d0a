//! The `iptables-save` parser on arbitrary text: errors, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = netwarden::netfilter::parse::iptables_save(&text) {
        assert!(!e.to_string().is_empty());
    }
    let _ = netwarden::netfilter::parse::count_rules(&text);
});
