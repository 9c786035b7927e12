//! devmap-offload's reader on a hostile `index.json` (and `devmap-checksums.json`): the input is
//! `index.json`, then optionally a NUL byte and `devmap-checksums.json`. The folder also holds fixed
//! files: `a.dat` (8 bytes), `b.dat` (empty), `model.safetensors` (tensors `x` BF16 [2], `y` U8 [3]),
//! and `link.dat`, a symlink to a file outside the folder. `OffloadFolder::open`, then `get` and
//! `verify` on every entry. Invariants:
//! - no panic; errors from `open` name the index or checksum file;
//! - a view holds exactly its entry's bytes; a `.dat` entry is a file directly inside the folder;
//! - `link.dat` is never read (a `.dat` link is refused);
//! - reading writes nothing: the folder's listing and sizes are unchanged.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use devmap_core::safetensors::write_file;
use devmap_core::DType;
use devmap_fuzz::scratch_dir;
use devmap_offload::{Location, OffloadFolder};
use libfuzzer_sys::fuzz_target;

fn folder() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = scratch_dir();
        let dir = root.join("offload");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.dat"), [0u8, 0, 128, 63, 0, 0, 0, 64]).unwrap();
        std::fs::write(dir.join("b.dat"), []).unwrap();
        write_file(
            &dir.join("model.safetensors"),
            &[
                ("x", DType::BF16, vec![2], vec![1, 2, 3, 4]),
                ("y", DType::U8, vec![3], vec![5, 6, 7]),
            ],
        )
        .unwrap();
        std::fs::write(root.join("outside.dat"), [9u8; 8]).unwrap();
        let _ = std::fs::remove_file(dir.join("link.dat"));
        std::os::unix::fs::symlink(root.join("outside.dat"), dir.join("link.dat")).unwrap();
        dir
    })
}

fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let len = e.path().symlink_metadata().map(|m| m.len()).unwrap_or(0);
            (e.file_name().to_string_lossy().into_owned(), len)
        })
        .collect();
    v.sort();
    v
}

fuzz_target!(|data: &[u8]| {
    let dir = folder();
    let (index, checksums) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    std::fs::write(dir.join("index.json"), index).unwrap();
    match checksums {
        Some(c) => std::fs::write(dir.join("devmap-checksums.json"), c).unwrap(),
        None => {
            let _ = std::fs::remove_file(dir.join("devmap-checksums.json"));
        }
    }
    let before = listing(dir);
    match OffloadFolder::open(dir) {
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("index.json") || msg.contains("devmap-checksums.json"),
                "error names neither file: {msg}"
            );
        }
        Ok(opened) => {
            for entry in opened.entries() {
                if let Location::Dat { path } = &entry.location {
                    assert_eq!(path.parent(), Some(dir.as_path()), "{path:?}");
                }
                match opened.get(&entry.name) {
                    Ok(view) => {
                        assert_eq!(view.bytes().len() as u64, entry.bytes(), "{}", entry.name);
                        if let Location::Dat { path } = &entry.location {
                            assert!(!path.ends_with("link.dat"), "read through a link");
                        }
                    }
                    Err(e) => {
                        let _ = e.to_string();
                    }
                }
            }
            if let Ok(report) = opened.verify() {
                let _ = report.is_ok();
            }
        }
    }
    assert_eq!(listing(dir), before, "reading the folder changed it");
});
