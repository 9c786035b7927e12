//! Write real safetensors checkpoints in every dtype, offload them in both index forms, read them
//! back through mmap: byte-identical, with accelerate's exact index conventions.

mod common;

use common::{checkpoint, listing, tensor, Gen};
use devmap_core::{DType, Device, DeviceMap};
use devmap_offload::{offload, Form, Location, OffloadFolder, OffloadOptions, OffloadReport};

fn options(form: Form) -> OffloadOptions {
    OffloadOptions {
        form,
        // Small windows so the big tensors cross several of them.
        window_bytes: 1 << 20,
        ..OffloadOptions::default()
    }
}

fn index_json(folder: &std::path::Path) -> serde_json::Map<String, serde_json::Value> {
    let text = std::fs::read_to_string(folder.join("index.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn assert_reads_back(folder: &OffloadFolder, tensors: &[&Gen]) {
    assert_eq!(folder.len(), tensors.len());
    for t in tensors {
        let view = folder.get(&t.name).unwrap();
        assert_eq!(view.name(), t.name);
        assert_eq!(view.dtype(), t.dtype, "{}", t.name);
        assert_eq!(view.shape(), t.shape.as_slice(), "{}", t.name);
        assert!(
            view.bytes() == t.data.as_slice(),
            "{}: bytes differ",
            t.name
        );
    }
    let report = folder.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.verified, tensors.len());
    assert!(report.unchecked.is_empty());
}

#[test]
fn every_dtype_copy_form_is_byte_identical_with_accelerate_conventions() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = common::all_dtypes();
    let (_, model) = checkpoint(dir.path(), &tensors);
    let folder = dir.path().join("offload");
    let report = offload(
        &model,
        &DeviceMap::whole(Device::Disk),
        &folder,
        &options(Form::Copy),
    )
    .unwrap();
    let total: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
    // accelerate cannot read these from a .dat file: they stay references.
    let not_dat = |t: &Gen| t.data.is_empty() || (t.shape.is_empty() && t.dtype == DType::U64);
    let empty = tensors.iter().filter(|t| not_dat(t)).count();
    assert_eq!(empty, DType::ALL.len() + 1);
    assert_eq!(
        report,
        OffloadReport {
            tensors: tensors.len(),
            written: tensors.len() - empty,
            referenced: empty,
            bytes: total,
            bytes_written: total - 8, // the 0-d uint64
            ..OffloadReport::default()
        }
    );

    // accelerate's conventions, entry by entry.
    let index = index_json(&folder);
    assert_eq!(index.len(), tensors.len());
    for t in &tensors {
        let e = &index[&t.name];
        if not_dat(t) {
            assert_eq!(e["weight_name"], t.name.as_str());
            assert!(!folder.join(format!("{}.dat", t.name)).exists());
            continue;
        }
        let dtype = e["dtype"].as_str().unwrap();
        let expected = match t.dtype {
            DType::BF16 => "bfloat16",
            DType::F8E4M3 => "float8_e4m3fn",
            DType::F8E5M2 => "float8_e5m2",
            DType::Bool => "bool",
            DType::F16 => "float16",
            _ => dtype, // checked below through the reader
        };
        assert_eq!(dtype, expected);
        // 0-d tensors are indexed as [] but stored as one element.
        assert_eq!(e["shape"], serde_json::json!(t.shape), "{}", t.name);
        assert_eq!(e.as_object().unwrap().len(), 2);
        let dat = std::fs::read(folder.join(format!("{}.dat", t.name))).unwrap();
        assert_eq!(dat, t.data, "{}", t.name);
    }
    assert_eq!(index["m0.weight"]["dtype"], "float64");
    assert_eq!(index["m6.scalar"]["dtype"], "int64");
    assert_eq!(index["m12.weight"]["dtype"], "uint16");
    assert_eq!(
        std::fs::metadata(folder.join("m0.scalar.dat"))
            .unwrap()
            .len(),
        8
    );
    // Pretty-printed with two spaces, like json.dump(index, f, indent=2).
    let text = std::fs::read_to_string(folder.join("index.json")).unwrap();
    assert!(
        text.starts_with(
            "{\n  \"m0.weight\": {\n    \"dtype\": \"float64\",\n    \"shape\": [\n      3,\n"
        ),
        "{text}"
    );

    let opened = OffloadFolder::open(&folder).unwrap();
    let refs: Vec<&Gen> = tensors.iter().collect();
    assert_reads_back(&opened, &refs);
    // Only the index, the checksums and the .dat files remain: no journal, no temporary file.
    let files = listing(&folder);
    assert_eq!(files.len(), tensors.len() - empty + 2, "{files:?}");
    assert!(files.contains(&"devmap-checksums.json".to_string()));
}

#[test]
fn every_dtype_reference_form_copies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = common::all_dtypes();
    let (path, model) = checkpoint(dir.path(), &tensors);
    let folder = dir.path().join("offload");
    let report = offload(
        &model,
        &DeviceMap::whole(Device::Disk),
        &folder,
        &options(Form::Reference),
    )
    .unwrap();
    assert_eq!(report.referenced, tensors.len());
    assert_eq!((report.written, report.bytes_written), (0, 0));
    assert_eq!(
        listing(&folder),
        vec!["devmap-checksums.json", "index.json"]
    );
    let index = index_json(&folder);
    let abs = std::path::absolute(&path).unwrap();
    for t in &tensors {
        let e = index[&t.name].as_object().unwrap();
        assert_eq!(e["safetensors_file"], abs.to_str().unwrap());
        assert_eq!(e["weight_name"], t.name.as_str());
        assert_eq!(e.len(), 3);
    }
    assert_eq!(index["m3.weight"]["dtype"], "bfloat16");
    let opened = OffloadFolder::open(&folder).unwrap();
    for e in opened.entries() {
        assert!(matches!(e.location, Location::Safetensors { .. }));
        assert_eq!(e.cast_to, None);
    }
    let refs: Vec<&Gen> = tensors.iter().collect();
    assert_reads_back(&opened, &refs);
}

#[test]
fn only_disk_tensors_are_offloaded_and_a_tied_head_reads_its_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = vec![
        tensor("model.embed_tokens.weight", DType::BF16, &[16, 8], 1),
        tensor("model.layers.0.mlp.weight", DType::F16, &[8, 8], 2),
        tensor("model.layers.1.mlp.weight", DType::F16, &[8, 8], 3),
        tensor("model.norm.weight", DType::F32, &[8], 4),
    ];
    std::fs::write(
        dir.path().join("config.json"),
        // Llama ties its head only when config.json says so (LlamaConfig defaults to untied).
        r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "tie_word_embeddings": true}"#,
    )
    .unwrap();
    let (path, model) = checkpoint(dir.path(), &tensors);
    assert!(model.node("lm_head.weight").is_some(), "restored tied head");
    let map = DeviceMap::from_json_str(
        r#"{"model.embed_tokens": "cpu", "model.layers.0": 0, "model.layers.1": "disk",
            "model.norm": "disk", "lm_head": "disk"}"#,
    )
    .unwrap();
    for form in [Form::Copy, Form::Reference] {
        let folder = dir.path().join(format!("{form:?}"));
        let report = offload(&model, &map, &folder, &options(form)).unwrap();
        assert_eq!(report.tensors, 3);
        let index = index_json(&folder);
        let keys: Vec<&String> = index.keys().collect();
        assert_eq!(
            keys,
            [
                "model.layers.1.mlp.weight",
                "model.norm.weight",
                "lm_head.weight"
            ]
        );
        if form == Form::Reference {
            // The head's bytes are the embedding's, under the embedding's name in the file.
            assert_eq!(
                index["lm_head.weight"]["weight_name"],
                "model.embed_tokens.weight"
            );
            assert_eq!(
                index["lm_head.weight"]["safetensors_file"],
                std::path::absolute(&path).unwrap().to_str().unwrap()
            );
        }
        let opened = OffloadFolder::open(&folder).unwrap();
        let head = Gen {
            name: "lm_head.weight".into(),
            ..tensor("x", DType::BF16, &[16, 8], 1)
        };
        assert_reads_back(&opened, &[&tensors[2], &tensors[3], &head]);
    }
}

#[test]
fn merges_into_an_existing_index_keeping_foreign_entries() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = vec![
        tensor("a.weight", DType::F32, &[4], 1),
        tensor("b.weight", DType::F32, &[4], 2),
    ];
    let (_, model) = checkpoint(dir.path(), &tensors);
    let folder = dir.path().join("offload");
    std::fs::create_dir(&folder).unwrap();
    // What accelerate's offload_state_dict leaves: a .dat file and its entry, no checksum.
    std::fs::write(folder.join("other.bias.dat"), [7u8; 6]).unwrap();
    std::fs::write(
        folder.join("index.json"),
        r#"{"b.weight": {"dtype": "float16", "shape": [1]}, "other.bias": {"dtype": "int16", "shape": [3]}}"#,
    )
    .unwrap();
    offload(
        &model,
        &DeviceMap::whole(Device::Disk),
        &folder,
        &options(Form::Copy),
    )
    .unwrap();
    let index = index_json(&folder);
    let keys: Vec<&String> = index.keys().collect();
    // dict.update order: existing keys keep their place, new keys are appended.
    assert_eq!(keys, ["b.weight", "other.bias", "a.weight"]);
    assert_eq!(index["b.weight"]["dtype"], "float32");
    let opened = OffloadFolder::open(&folder).unwrap();
    assert_eq!(opened.get("other.bias").unwrap().bytes(), &[7u8; 6]);
    let report = opened.verify().unwrap();
    assert_eq!(report.verified, 2);
    assert_eq!(report.unchecked, vec!["other.bias".to_string()]);
}

#[test]
fn a_second_run_skips_verified_files_and_rewrites_corrupted_ones() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = vec![
        tensor("a.weight", DType::BF16, &[64, 64], 1),
        tensor("b.weight", DType::F32, &[100], 2),
        tensor("c.weight", DType::I8, &[3], 3),
    ];
    let (_, model) = checkpoint(dir.path(), &tensors);
    let folder = dir.path().join("offload");
    let map = DeviceMap::whole(Device::Disk);
    let opts = options(Form::Copy);
    offload(&model, &map, &folder, &opts).unwrap();

    let again = offload(&model, &map, &folder, &opts).unwrap();
    assert_eq!(
        (again.written, again.skipped, again.bytes_written),
        (0, 3, 0)
    );

    // Same length, one byte changed: verify names it, the next run rewrites only it.
    let b = folder.join("b.weight.dat");
    let mut data = std::fs::read(&b).unwrap();
    data[17] ^= 0xff;
    std::fs::write(&b, &data).unwrap();
    let report = OffloadFolder::open(&folder).unwrap().verify().unwrap();
    assert!(!report.is_ok());
    assert_eq!(report.mismatched.len(), 1);
    assert_eq!(report.mismatched[0].tensor, "b.weight");
    let fixed = offload(&model, &map, &folder, &opts).unwrap();
    assert_eq!(
        (fixed.written, fixed.skipped, fixed.bytes_written),
        (1, 2, 400)
    );
    let opened = OffloadFolder::open(&folder).unwrap();
    assert_reads_back(&opened, &tensors.iter().collect::<Vec<_>>());
}

#[test]
fn verify_detects_a_changed_source_of_a_reference_entry() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = vec![tensor("a.weight", DType::F16, &[32], 1)];
    let (path, model) = checkpoint(dir.path(), &tensors);
    let folder = dir.path().join("offload");
    offload(
        &model,
        &DeviceMap::whole(Device::Disk),
        &folder,
        &options(Form::Reference),
    )
    .unwrap();
    let mut changed = tensors;
    changed[0].data[0] ^= 1;
    common::write(&path, &changed);
    let report = OffloadFolder::open(&folder).unwrap().verify().unwrap();
    assert_eq!(report.mismatched.len(), 1);
}

#[test]
fn a_plan_without_disk_tensors_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_, model) = checkpoint(dir.path(), &[tensor("a.weight", DType::F32, &[4], 1)]);
    let folder = dir.path().join("offload");
    let report = offload(
        &model,
        &DeviceMap::whole(Device::Cpu),
        &folder,
        &OffloadOptions::default(),
    )
    .unwrap();
    assert_eq!(report, OffloadReport::default());
    assert!(listing(&folder).is_empty());
}
