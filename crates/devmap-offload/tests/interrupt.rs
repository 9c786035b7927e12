//! An offload interrupted mid-stream (the `fail_after_bytes` hook stops the writer as a crash would)
//! leaves a folder that reads exactly as before, and the rerun completes it, skipping what finished.

mod common;

use std::path::Path;

use common::{checkpoint, listing, tensor, Gen};
use devmap_core::{DType, Device, DeviceMap, Model};
use devmap_offload::{offload, Error, Form, OffloadFolder, OffloadOptions};

fn copy_options(fail_after_bytes: Option<u64>) -> OffloadOptions {
    OffloadOptions {
        form: Form::Copy,
        window_bytes: 1 << 20,
        fail_after_bytes,
        ..OffloadOptions::default()
    }
}

fn one_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(f)
}

/// Six 100 KiB tensors in modules `layers.0` .. `layers.5`.
fn six_layers(dir: &Path) -> (Vec<Gen>, Model) {
    let tensors: Vec<Gen> = (0..6)
        .map(|i| tensor(&format!("layers.{i}.weight"), DType::F32, &[25_600], i + 1))
        .collect();
    let (_, model) = checkpoint(dir, &tensors);
    (tensors, model)
}

fn assert_complete(folder: &Path, tensors: &[&Gen]) {
    let opened = OffloadFolder::open(folder).unwrap();
    assert_eq!(opened.len(), tensors.len());
    for t in tensors {
        assert!(
            opened.get(&t.name).unwrap().bytes() == t.data.as_slice(),
            "{}",
            t.name
        );
    }
    let report = opened.verify().unwrap();
    assert!(
        report.is_ok() && report.verified == tensors.len(),
        "{report:?}"
    );
    let files = listing(folder);
    assert!(
        !files
            .iter()
            .any(|f| f.starts_with(".devmap-tmp-") || f.ends_with(".journal")),
        "{files:?}"
    );
}

#[test]
fn interrupted_first_write_leaves_no_index_and_the_rerun_skips_finished_files() {
    let dir = tempfile::tempdir().unwrap();
    let (tensors, model) = six_layers(dir.path());
    let folder = dir.path().join("offload");
    let map = DeviceMap::whole(Device::Disk);

    // 3.5 tensors' worth: three finish, the fourth stops half-way.
    let err =
        one_thread(|| offload(&model, &map, &folder, &copy_options(Some(358_400)))).unwrap_err();
    assert!(
        matches!(err, Error::Interrupted { bytes: 358_400 }),
        "{err}"
    );
    let files = listing(&folder);
    assert!(!files.contains(&"index.json".to_string()), "{files:?}");
    assert_eq!(files.iter().filter(|f| f.ends_with(".dat")).count(), 3);
    assert_eq!(
        files
            .iter()
            .filter(|f| f.starts_with(".devmap-tmp-"))
            .count(),
        1
    );
    let journal = std::fs::read_to_string(folder.join("devmap-checksums.journal")).unwrap();
    assert_eq!(journal.lines().count(), 3);
    // Nothing is indexed yet: the folder says so instead of serving a half-written file.
    let err = OffloadFolder::open(&folder).unwrap_err().to_string();
    assert!(err.contains("index.json"), "{err}");

    let report = offload(&model, &map, &folder, &copy_options(None)).unwrap();
    assert_eq!((report.skipped, report.written), (3, 3));
    assert_eq!(report.stale_temp_files, 1);
    assert_eq!(report.bytes_written, 3 * 102_400);
    assert_complete(&folder, &tensors.iter().collect::<Vec<_>>());
}

#[test]
fn interrupted_update_leaves_the_previous_index_readable() {
    let dir = tempfile::tempdir().unwrap();
    let (tensors, model) = six_layers(dir.path());
    let folder = dir.path().join("offload");
    let first = DeviceMap::from_json_str(
        r#"{"layers.0": "disk", "layers.1": "disk", "layers.2": "cpu", "layers.3": "cpu",
            "layers.4": "cpu", "layers.5": "cpu"}"#,
    )
    .unwrap();
    offload(&model, &first, &folder, &copy_options(None)).unwrap();
    let index_before = std::fs::read(folder.join("index.json")).unwrap();

    let all = DeviceMap::whole(Device::Disk);
    let err =
        one_thread(|| offload(&model, &all, &folder, &copy_options(Some(150_000)))).unwrap_err();
    assert!(matches!(err, Error::Interrupted { .. }), "{err}");
    // Readers see the folder exactly as it was: same index, every entry valid and verified.
    assert_eq!(
        std::fs::read(folder.join("index.json")).unwrap(),
        index_before
    );
    let opened = OffloadFolder::open(&folder).unwrap();
    assert_eq!(opened.len(), 2);
    assert!(opened.verify().unwrap().is_ok());
    for t in &tensors[..2] {
        assert!(opened.get(&t.name).unwrap().bytes() == t.data.as_slice());
    }

    let report = offload(&model, &all, &folder, &copy_options(None)).unwrap();
    // layers.0 and layers.1 from the first run, plus the one the interrupted run finished.
    assert_eq!((report.skipped, report.written), (3, 3));
    assert_complete(&folder, &tensors.iter().collect::<Vec<_>>());
}

#[test]
fn any_interruption_point_with_parallel_writers_is_consistent_and_recoverable() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors: Vec<Gen> = (0..12u64)
        .map(|i| tensor(&format!("layers.{i}.w"), DType::BF16, &[1000 + 997 * i], i))
        .collect();
    tensors.push(tensor("layers.12.w", DType::U8, &[3 << 20], 99));
    let (_, model) = checkpoint(dir.path(), &tensors);
    let total: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
    let map = DeviceMap::whole(Device::Disk);
    for k in 1..=9u64 {
        let folder = dir.path().join(format!("offload{k}"));
        let stop = total * k / 10;
        let err = offload(&model, &map, &folder, &copy_options(Some(stop))).unwrap_err();
        assert!(matches!(err, Error::Interrupted { .. }), "{err}");
        assert!(!folder.join("index.json").exists());
        // A second interruption on top of the first, then a clean run.
        let _ = offload(&model, &map, &folder, &copy_options(Some(stop / 2)));
        let report = offload(&model, &map, &folder, &copy_options(None)).unwrap();
        assert_eq!(report.skipped + report.written, tensors.len());
        assert_complete(&folder, &tensors.iter().collect::<Vec<_>>());
    }
}
