//! A safetensors file, two ways:
//! 1. the input is the whole file: `load_model` reads it (8-byte length, header, data) and builds
//!    the model; an error must name the file, a model goes through `exercise_model`;
//! 2. the input is `u16 extra data bytes | header JSON`: `Header::parse` on it, without the framing,
//!    so the fuzzer reaches the tensor checks without having to guess a consistent length field.
//!
//! Accepted headers must keep every tensor inside the data section, sized `dtype × elements`, with
//! unique names and no overlap.
#![no_main]

use devmap_core::safetensors::Header;
use devmap_core::{dtype::element_count, load_model};
use devmap_fuzz::{exercise_model, scratch_dir};
use libfuzzer_sys::fuzz_target;

fn check_header(h: &Header, file_len: u64) {
    let mut names = std::collections::HashSet::new();
    let mut ranges = Vec::new();
    for t in &h.tensors {
        assert!(names.insert(t.name.as_str()), "duplicate {:?}", t.name);
        let numel = element_count(&t.shape).expect("accepted shapes do not overflow");
        assert_eq!(
            t.byte_range.end - t.byte_range.start,
            numel * t.dtype.size_bytes()
        );
        assert!(h.data_start <= t.byte_range.start && t.byte_range.end <= file_len);
        if !t.byte_range.is_empty() {
            ranges.push(t.byte_range.clone());
        }
    }
    ranges.sort_by_key(|r| r.start);
    assert!(ranges.windows(2).all(|w| w[0].end <= w[1].start), "overlap");
}

fuzz_target!(|data: &[u8]| {
    let path = scratch_dir().join("model.safetensors");
    std::fs::write(&path, data).expect("write the scratch file");
    match load_model(&path) {
        Ok(model) => {
            for t in model.tensors() {
                if let Some(src) = &t.source {
                    assert!(src.byte_range.end <= data.len() as u64);
                }
            }
            exercise_model(&model);
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&*path.to_string_lossy()),
                "error does not name the file: {msg}"
            );
        }
    }

    if data.len() >= 2 {
        let extra = u64::from(u16::from_le_bytes([data[0], data[1]]));
        let json = &data[2..];
        let file_len = 8 + json.len() as u64 + extra;
        if let Ok(h) = Header::parse(&path, json, file_len) {
            check_header(&h, file_len);
        }
    }
});
