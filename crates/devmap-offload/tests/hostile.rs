//! Bad plans, unsafe names, links and broken folders: every one is a typed error naming the culprit,
//! nothing is written outside the folder, and nothing panics.

mod common;

use std::path::Path;

use common::{checkpoint, listing, tensor};
use devmap_core::{DType, Device, DeviceMap, ModelBuilder};
use devmap_offload::{offload, Error, Form, OffloadFolder, OffloadOptions};

fn copy() -> OffloadOptions {
    OffloadOptions {
        form: Form::Copy,
        ..OffloadOptions::default()
    }
}

fn open_err(folder: &Path) -> String {
    OffloadFolder::open(folder).unwrap_err().to_string()
}

#[test]
fn names_that_would_leave_the_folder_are_rejected_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    for (name, needle) in [
        ("sub/dir.weight", "sub-folder"),
        ("back\\slash.weight", "backslash"),
    ] {
        let (_, model) = checkpoint(dir.path(), &[tensor(name, DType::F32, &[2], 1)]);
        let folder = dir.path().join("offload");
        let err = offload(&model, &DeviceMap::whole(Device::Disk), &folder, &copy()).unwrap_err();
        assert!(matches!(err, Error::UnsafeName { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("{name:?}")) && msg.contains(needle),
            "{msg}"
        );
        assert!(!folder.exists());
        // The reference form makes no file of the name: the same model offloads fine.
        let report = offload(
            &model,
            &DeviceMap::whole(Device::Disk),
            &folder,
            &OffloadOptions::default(),
        )
        .unwrap();
        assert_eq!(report.referenced, 1);
        let opened = OffloadFolder::open(&folder).unwrap();
        assert_eq!(opened.get(name).unwrap().bytes().len(), 8);
        std::fs::remove_dir_all(&folder).unwrap();
    }
}

#[cfg(unix)]
#[test]
fn the_writer_never_writes_through_a_link() {
    let dir = tempfile::tempdir().unwrap();
    let (_, model) = checkpoint(dir.path(), &[tensor("a.weight", DType::F32, &[2], 1)]);
    let outside = dir.path().join("outside.txt");
    std::fs::write(&outside, b"precious").unwrap();
    for link_name in ["a.weight.dat", "index.json", "devmap-checksums.json"] {
        let folder = dir.path().join(format!("offload-{link_name}"));
        std::fs::create_dir(&folder).unwrap();
        std::os::unix::fs::symlink(&outside, folder.join(link_name)).unwrap();
        let err = offload(&model, &DeviceMap::whole(Device::Disk), &folder, &copy()).unwrap_err();
        assert!(matches!(err, Error::Symlink { .. }), "{link_name}: {err}");
        assert!(err.to_string().contains(link_name), "{err}");
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
    }
}

#[test]
fn bad_plans_and_models_without_bytes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (_, model) = checkpoint(dir.path(), &[tensor("a.weight", DType::F32, &[2], 1)]);
    let folder = dir.path().join("offload");
    let map = DeviceMap::from_json_str(r#"{"a": "disk", "b": "disk"}"#).unwrap();
    let err = offload(&model, &map, &folder, &copy()).unwrap_err();
    assert!(matches!(err, Error::Plan { .. }), "{err}");
    assert!(err.to_string().contains("\"b\""), "{err}");
    let map = DeviceMap::from_json_str(r#"{"c": "disk"}"#).unwrap();
    assert!(offload(&model, &map, &folder, &copy()).is_err());

    let manifest_like = ModelBuilder::new("m")
        .param("x.weight", DType::F16, &[4])
        .build()
        .unwrap();
    let err = offload(
        &manifest_like,
        &DeviceMap::whole(Device::Disk),
        &folder,
        &copy(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::NoSource { .. }), "{err}");
    assert!(err.to_string().contains("\"x.weight\""), "{err}");
}

#[test]
fn a_checkpoint_changed_since_it_was_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, model) = checkpoint(
        dir.path(),
        &[
            tensor("a.weight", DType::F32, &[2], 1),
            tensor("b.weight", DType::F32, &[2], 2),
        ],
    );
    common::write(&path, &[tensor("b.weight", DType::F16, &[4], 1)]);
    let err = offload(
        &model,
        &DeviceMap::whole(Device::Disk),
        &dir.path().join("o"),
        &copy(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Source { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

/// A folder with one valid `.dat` entry, `good`, and an index replaced by `index`.
fn folder_with_index(dir: &Path, index: &str) -> std::path::PathBuf {
    let folder = dir.join(format!("f{}", listing(dir).len()));
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("good.dat"), [0u8; 8]).unwrap();
    std::fs::write(folder.join("index.json"), index).unwrap();
    folder
}

#[test]
fn the_reader_names_every_broken_entry() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("secret.dat");
    std::fs::write(&outside, [1u8; 4]).unwrap();
    let good = r#""good": {"dtype": "float32", "shape": [2]}"#;
    let cases = [
        ("{not json".to_string(), "invalid JSON"),
        ("[1, 2]".to_string(), "expected a JSON object"),
        (format!("{{{good}, \"x\": 3}}"), "\"x\": expected an object"),
        (
            format!("{{{good}, \"x\": {{\"dtype\": \"complex64\", \"shape\": [1]}}}}"),
            "unknown dtype \"complex64\"",
        ),
        (
            format!("{{{good}, \"x\": {{\"dtype\": \"float32\", \"shape\": [-1]}}}}"),
            "non-negative integers",
        ),
        (
            format!("{{{good}, \"x\": {{\"dtype\": \"float32\", \"shape\": 4}}}}"),
            "must be a list",
        ),
        (
            format!("{{{good}, \"x\": {{\"shape\": [1]}}}}"),
            "no \"dtype\"",
        ),
        (
            format!("{{{good}, \"missing\": {{\"dtype\": \"float32\", \"shape\": [1]}}}}"),
            "missing.dat is missing",
        ),
        (
            r#"{"good": {"dtype": "float32", "shape": [3]}}"#.to_string(),
            "is 8 bytes but float32 [3] needs 12",
        ),
        (
            r#"{"good": {"dtype": "int8", "shape": [2, 2]}}"#.to_string(),
            "is 8 bytes but int8 [2, 2] needs 4",
        ),
        (
            r#"{"../secret": {"dtype": "int8", "shape": [4]}}"#.to_string(),
            "outside the folder",
        ),
        (
            format!(
                "{{\"{}\": {{\"dtype\": \"int8\", \"shape\": [4]}}}}",
                outside.with_extension("").display()
            ),
            "outside the folder",
        ),
        (
            r#"{"x": {"safetensors_file": "nope.safetensors", "weight_name": "x"}}"#.to_string(),
            "nope.safetensors",
        ),
        (
            r#"{"x": {"safetensors_file": 7}}"#.to_string(),
            "\"safetensors_file\" must be a string",
        ),
        (
            r#"{"good": {"dtype": "float32", "shape": [18446744073709551615, 4]}}"#.to_string(),
            "overflows",
        ),
    ];
    for (index, needle) in cases {
        let folder = folder_with_index(dir.path(), &index);
        let err = open_err(&folder);
        assert!(err.contains(needle), "{index}: {err}");
        assert!(err.contains("index.json"), "{index}: {err}");
    }
}

#[cfg(unix)]
#[test]
fn the_reader_refuses_dat_links_and_checks_safetensors_entries() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside.bin");
    std::fs::write(&outside, [1u8; 8]).unwrap();
    let folder = folder_with_index(
        dir.path(),
        r#"{"link": {"dtype": "float32", "shape": [2]}}"#,
    );
    std::os::unix::fs::symlink(&outside, folder.join("link.dat")).unwrap();
    let err = open_err(&folder);
    assert!(
        err.contains("symbolic link") && err.contains("\"link\""),
        "{err}"
    );

    // A safetensors entry: relative paths resolve against the folder; the weight must exist.
    let (_, _) = checkpoint(dir.path(), &[tensor("w", DType::F16, &[3], 1)]);
    let folder = folder_with_index(
        dir.path(),
        r#"{"x": {"safetensors_file": "../model.safetensors", "weight_name": "w", "dtype": "float32"}}"#,
    );
    let opened = OffloadFolder::open(&folder).unwrap();
    let e = opened.entry("x").unwrap();
    assert_eq!(
        (e.dtype, e.cast_to, e.shape.clone()),
        (DType::F16, Some(DType::F32), vec![3])
    );
    assert_eq!(
        opened.get("x").unwrap().bytes(),
        tensor("w", DType::F16, &[3], 1).data
    );
    let err = opened.get("nothing").unwrap_err().to_string();
    assert!(err.contains("\"nothing\""), "{err}");
    let folder = folder_with_index(
        dir.path(),
        r#"{"x": {"safetensors_file": "../model.safetensors", "weight_name": "v"}}"#,
    );
    let err = open_err(&folder);
    assert!(err.contains("holds no tensor \"v\""), "{err}");

    // A file truncated after open is reported, not mapped past its end.
    let folder = folder_with_index(
        dir.path(),
        r#"{"good": {"dtype": "float32", "shape": [2]}}"#,
    );
    let opened = OffloadFolder::open(&folder).unwrap();
    std::fs::write(folder.join("good.dat"), [0u8; 3]).unwrap();
    let err = opened.get("good").unwrap_err().to_string();
    assert!(err.contains("shorter"), "{err}");
    assert!(opened.verify().is_ok_and(|r| r.unchecked.len() == 1));
}

#[test]
fn bad_checksum_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for (text, needle) in [
        ("{}", "devmap-offload-checksums/1"),
        (
            r#"{"format": "devmap-offload-checksums/1", "algorithm": "md5", "tensors": {}}"#,
            "\"md5\"",
        ),
        (
            r#"{"format": "devmap-offload-checksums/1", "algorithm": "xxh3-64", "tensors": {"good": {"bytes": 8, "xxh3": "zz"}}}"#,
            "\"good\"",
        ),
    ] {
        let folder = folder_with_index(
            dir.path(),
            r#"{"good": {"dtype": "float32", "shape": [2]}}"#,
        );
        std::fs::write(folder.join("devmap-checksums.json"), text).unwrap();
        let err = open_err(&folder);
        assert!(
            err.contains(needle) && err.contains("devmap-checksums.json"),
            "{text}: {err}"
        );
    }
}
