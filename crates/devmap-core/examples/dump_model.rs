//! Print the model devmap reads from a path as a `devmap-manifest/1` JSON on stdout, and the
//! load notes on stderr: `cargo run -p devmap-core --example dump_model -- FOLDER [REGISTRY]`.
//! `scripts/compare_folder_manifest.py` compares it with the model transformers builds.

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).ok_or("usage: dump_model PATH [REGISTRY]")?;
    let file_registry;
    let registry = match args.get(2) {
        Some(r) => {
            file_registry = devmap_core::Registry::read(Path::new(r))?;
            &file_registry
        }
        None => devmap_core::Registry::embedded()?,
    };
    let loaded = devmap_core::load_model_with(Path::new(path), registry)?;
    for note in &loaded.notes {
        eprintln!("note: {note}");
    }
    let manifest = devmap_core::Manifest::from_model(&loaded.model);
    println!("{}", serde_json::to_string(&manifest)?);
    Ok(())
}
