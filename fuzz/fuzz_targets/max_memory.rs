//! accelerate's `max_memory` syntax: `parse_memory_size`, `Device::parse`, `MemoryBudgets::parse`
//! (the `0=22GiB,cpu=64GiB` form and inline JSON) and `MemoryBudgets::from_json_str`.
//! Accepted budgets must be in accelerate's order without duplicates and survive a JSON round trip;
//! a rejected size must quote the text.
#![no_main]

use std::path::Path;

use devmap_core::{format_bytes, parse_memory_size, Device, MemoryBudgets};
use libfuzzer_sys::fuzz_target;

fn check(b: &MemoryBudgets) {
    let devices = b.devices();
    assert!(devices.windows(2).all(|w| w[0] < w[1]), "order {devices:?}");
    let back = MemoryBudgets::from_json_str(&b.to_json().to_string(), Path::new("rt.json"))
        .expect("own JSON reads back");
    assert_eq!(&back, b);
    for x in b.iter() {
        let _ = format_bytes(x.bytes);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_memory_size(text) {
        Ok(bytes) => {
            let _ = format_bytes(bytes);
            let t = text.trim();
            if t.bytes().all(|c| c.is_ascii_digit()) {
                assert_eq!(Some(bytes), t.parse::<u64>().ok());
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("{text:?}")),
                "does not quote the text: {msg}"
            );
        }
    }
    if let Ok(d) = Device::parse(text) {
        assert_eq!(Device::parse(&d.to_string()).ok(), Some(d));
        assert_eq!(Device::from_json(&d.to_json()).ok(), Some(d));
    }
    // `parse` treats a `.json` name, or an existing file without `=`, as a path: keep the fuzzer
    // away from the file system.
    let trimmed = text.trim();
    if !trimmed.ends_with(".json") && !Path::new(trimmed).exists() {
        if let Ok(b) = MemoryBudgets::parse(text) {
            check(&b);
        }
    }
    if let Ok(b) = MemoryBudgets::from_json_str(text, Path::new("fuzz.json")) {
        check(&b);
    }
});
