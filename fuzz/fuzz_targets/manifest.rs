//! A `devmap-manifest/1` document: `Manifest::from_json`, then `into_model`, then everything a model
//! goes through (`exercise_model`). Errors must name the file.
#![no_main]

use std::path::Path;

use devmap_core::Manifest;
use devmap_fuzz::exercise_model;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let origin = Path::new("fuzz-manifest.json");
    let result = Manifest::from_json(text, origin).and_then(|m| m.into_model(origin));
    match result {
        Ok(model) => exercise_model(&model),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("fuzz-manifest.json"),
                "error does not name the file: {msg}"
            );
        }
    }
});
