//! devmap-cuda against the real driver. Tests that need a GPU print `skipped: ...` (straight to
//! the terminal, past the test harness's capture) and pass where there is none; the plan checks
//! that need no driver run everywhere.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use devmap_core::{load_model, Device, DeviceMap};
use devmap_cuda::bench::{h2d_bandwidth, HostMemory};
use devmap_cuda::{discover, load, Error, LoadOptions, ReadMode};

/// The GPU count, or `None` after printing why the test is skipped.
fn gpus(test: &str) -> Option<u32> {
    match devmap_cuda::device_count() {
        Ok(n) if n > 0 => Some(n),
        Ok(_) => skip(test, "the CUDA driver reports no device"),
        Err(e) => skip(test, &e.to_string()),
    }
}

fn skip(test: &str, why: &str) -> Option<u32> {
    // Direct writes to the handle bypass libtest's capture, so the skip is visible.
    let _ = writeln!(std::io::stderr(), "{test}: skipped: {why}");
    None
}

/// Deterministic bytes that are not all zero (a zero-filled GPU would otherwise pass).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Write a safetensors file; `data: None` leaves a hole (a sparse file) of the tensor's size.
/// A tensor to write: name, dtype, shape, bytes (`None`: a hole of the right size).
type Spec = (String, &'static str, Vec<u64>, Option<Vec<u8>>);

fn write_safetensors(path: &Path, tensors: &[Spec]) {
    let elem = |dtype: &str| match dtype {
        "F32" => 4u64,
        "BF16" | "F16" => 2,
        _ => 1,
    };
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, dtype, shape, _) in tensors {
        let bytes = shape.iter().product::<u64>() * elem(dtype);
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&header).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut f = File::create(path).unwrap();
    f.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&json).unwrap();
    let data_start = 8 + json.len() as u64;
    let mut at = 0u64;
    for (_, dtype, shape, data) in tensors {
        let bytes = shape.iter().product::<u64>() * elem(dtype);
        if let Some(d) = data {
            assert_eq!(d.len() as u64, bytes);
            use std::io::{Seek, SeekFrom};
            f.seek(SeekFrom::Start(data_start + at)).unwrap();
            f.write_all(d).unwrap();
        }
        at += bytes;
    }
    f.set_len(data_start + at).unwrap();
}

/// A small Llama-shaped checkpoint with odd sizes (slots that do not merge), a tied head that the
/// file omits, and config.json. Returns its folder.
fn small_checkpoint(dir: &Path) -> PathBuf {
    let names: Vec<(String, &'static str, Vec<u64>)> = vec![
        ("model.embed_tokens.weight".into(), "BF16", vec![1000, 64]),
        ("model.norm.weight".into(), "F32", vec![3]),
    ]
    .into_iter()
    .chain((0..4).flat_map(|l| {
        vec![
            (
                format!("model.layers.{l}.self_attn.q_proj.weight"),
                "BF16",
                vec![64, 64],
            ),
            (
                format!("model.layers.{l}.self_attn.q_proj.bias"),
                "F32",
                vec![17],
            ),
            (
                format!("model.layers.{l}.mlp.up_proj.weight"),
                "BF16",
                vec![333, 64],
            ),
            (
                format!("model.layers.{l}.input_layernorm.weight"),
                "BF16",
                vec![64],
            ),
        ]
    }))
    .collect();
    let elem = |d: &str| if d == "F32" { 4 } else { 2 };
    let tensors: Vec<Spec> = names
        .into_iter()
        .enumerate()
        .map(|(i, (name, dtype, shape))| {
            let len = shape.iter().product::<u64>() as usize * elem(dtype);
            (name, dtype, shape, Some(pattern(i as u64 + 1, len)))
        })
        .collect();
    let folder = dir.join("ckpt");
    std::fs::create_dir_all(&folder).unwrap();
    write_safetensors(&folder.join("model.safetensors"), &tensors);
    std::fs::write(
        folder.join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "tie_word_embeddings": true, "vocab_size": 1000}"#,
    )
    .unwrap();
    folder
}

fn map(json: &str) -> DeviceMap {
    DeviceMap::from_json_str(json).unwrap()
}

#[test]
fn a_plan_naming_a_missing_tensor_is_refused_before_any_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let model = load_model(&small_checkpoint(dir.path())).unwrap();
    let plan = map(
        r#"{"model.embed_tokens": 0, "model.layers": 0, "model.norm": 0, "lm_head": 0,
            "model.layers.99": 0}"#,
    );
    let e = load(&model, &plan, &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(&e, Error::MissingTensor { key } if key == "model.layers.99"),
        "{e}"
    );
    assert!(e.to_string().contains("model.layers.99"), "{e}");
}

#[test]
fn a_plan_leaving_tensors_unmapped_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let model = load_model(&small_checkpoint(dir.path())).unwrap();
    let plan = map(r#"{"model.embed_tokens": 0}"#);
    let e = load(&model, &plan, &LoadOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Plan { .. }), "{e}");
    assert!(e.to_string().contains("model.norm.weight"), "{e}");
}

#[test]
fn a_tensor_without_bytes_is_named() {
    // A manifest knows shapes but no bytes.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.json");
    std::fs::write(
        &path,
        r#"{"format": "devmap-manifest/1", "name": "m", "dtype": "F16",
            "tensors": [{"name": "a.weight", "dtype": "F16", "shape": [4]}]}"#,
    )
    .unwrap();
    let model = load_model(&path).unwrap();
    let e = load(&model, &map(r#"{"": "cpu"}"#), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(&e, Error::MissingTensorData { tensor } if tensor == "a.weight"),
        "{e}"
    );
}

#[test]
fn a_plan_all_on_disk_loads_nothing_and_needs_no_driver() {
    let dir = tempfile::tempdir().unwrap();
    let model = load_model(&small_checkpoint(dir.path())).unwrap();
    let loaded = load(&model, &map(r#"{"": "disk"}"#), &LoadOptions::default()).unwrap();
    assert!(loaded.tensors().is_empty());
    assert_eq!(loaded.left_to_offload().len(), model.tensors().len());
    assert_eq!(loaded.stats().bytes, 0);
}

#[test]
fn zero_sized_staging_is_an_options_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = load_model(&small_checkpoint(dir.path())).unwrap();
    let options = LoadOptions {
        staging_bytes: 0,
        ..LoadOptions::default()
    };
    let e = load(&model, &map(r#"{"": 0}"#), &options).unwrap_err();
    assert!(matches!(e, Error::Options(_)), "{e}");
}

#[test]
fn without_a_driver_discovery_is_an_error_not_a_panic() {
    match discover() {
        Ok(inv) => assert!(!inv.gpus.is_empty()),
        Err(e) => {
            assert!(e.is_no_gpu(), "{e}");
            let text = e.to_string();
            assert!(
                text.contains("no CUDA driver found") || text.contains("no CUDA device"),
                "{text}"
            );
        }
    }
}

#[test]
fn gpu_discovery_reports_every_gpu_and_pair() {
    let Some(n) = gpus("gpu_discovery_reports_every_gpu_and_pair") else {
        return;
    };
    let inv = discover().unwrap();
    assert_eq!(inv.gpus.len() as u32, n);
    for (i, g) in inv.gpus.iter().enumerate() {
        assert_eq!(g.index, i as u32);
        assert!(!g.name.is_empty());
        assert!(
            g.uuid.starts_with("GPU-") && g.uuid.len() == 40,
            "{}",
            g.uuid
        );
        assert!(g.pci_bus_id.contains(':'), "{}", g.pci_bus_id);
        assert!(g.free_memory > 0 && g.free_memory <= g.total_memory);
        assert!(g.compute_capability.0 >= 3);
        assert!(g.multiprocessors > 0);
    }
    assert_eq!(inv.peers.len() as u32, n * (n - 1));
    let budgets = devmap_cuda::budgets::default_budgets(&inv, &Default::default());
    for g in &inv.gpus {
        assert!(budgets.get(Device::Gpu(g.index)).unwrap() < g.free_memory);
    }
    let json = serde_json::to_string(&inv).unwrap();
    assert!(json.contains(&inv.gpus[0].uuid));
}

fn check_small_load(folder: &Path, plan: &DeviceMap, options: &LoadOptions) {
    let model = load_model(folder).unwrap();
    let loaded = load(&model, plan, options).unwrap();
    let report = loaded.verify().unwrap();
    assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);
    assert!(report.tensors > 0);
    // Tied head on the embedding's GPU shares its slot; every slot is aligned.
    let embed = loaded.get("model.embed_tokens.weight").unwrap();
    let head = loaded.get("lm_head.weight").unwrap();
    if embed.device == head.device {
        assert_eq!(embed.ptr, head.ptr);
    } else {
        assert_ne!(embed.ptr, head.ptr);
    }
    for t in loaded.tensors() {
        if t.device.is_gpu() {
            assert_eq!(t.ptr % devmap_cuda::load::TENSOR_ALIGN, 0, "{}", t.name);
        }
    }
    // cpu tensors are readable host memory holding the file's bytes.
    let file = std::fs::read(folder.join("model.safetensors")).unwrap();
    for t in loaded.tensors().iter().filter(|t| t.device == Device::Cpu) {
        let host = loaded.host_bytes(&t.name).unwrap();
        let spec = model
            .tensors()
            .iter()
            .find(|m| m.name == t.name)
            .unwrap()
            .source
            .clone()
            .unwrap();
        assert_eq!(
            host,
            &file[spec.byte_range.start as usize..spec.byte_range.end as usize]
        );
    }
    let loaded_bytes: u64 = loaded.stats().devices.iter().map(|d| d.bytes).sum();
    assert_eq!(loaded_bytes, loaded.stats().bytes);
}

#[test]
fn gpu_load_splits_across_gpu_cpu_and_disk_and_verifies() {
    let Some(_) = gpus("gpu_load_splits_across_gpu_cpu_and_disk_and_verifies") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let folder = small_checkpoint(dir.path());
    let plan = map(
        r#"{"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu",
            "model.layers.2": 0, "model.layers.3": "disk", "model.norm": "cpu", "lm_head": 0}"#,
    );
    // Tiny staging buffers force many chunks, pieces split across chunks, and buffer reuse.
    // Fewer buffers than threads makes threads queue for a buffer. One thread has a home queue
    // (the GPU's or the pinned RAM copy's, whichever is larger) and must steal the other's
    // tasks; the default ring follows the GPU's share of the threads.
    for (read, staging, buffers, threads) in [
        (ReadMode::Mmap, 4096, Some(2), 3),
        (ReadMode::Pread, 5000, Some(3), 3),
        (ReadMode::Mmap, 64 << 20, Some(2), 3),
        (ReadMode::Mmap, 4096, None, 1),
        (ReadMode::Pread, 4096, None, 2),
    ] {
        let options = LoadOptions {
            staging_bytes: staging,
            staging_buffers: buffers,
            copy_threads: threads,
            read,
            ..LoadOptions::default()
        };
        check_small_load(&folder, &plan, &options);
    }
    let model = load_model(&folder).unwrap();
    let loaded = load(&model, &plan, &LoadOptions::default()).unwrap();
    assert!(loaded
        .left_to_offload()
        .iter()
        .all(|n| n.starts_with("model.layers.3.")));
    assert_eq!(loaded.left_to_offload().len(), 4);
    assert_eq!(loaded.get("lm_head.weight").unwrap().device, Device::Gpu(0));
}

#[test]
fn gpu_load_onto_two_gpus_verifies() {
    let Some(n) = gpus("gpu_load_onto_two_gpus_verifies") else {
        return;
    };
    if n < 2 {
        skip(
            "gpu_load_onto_two_gpus_verifies",
            "needs 2 GPUs, this machine has 1",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let folder = small_checkpoint(dir.path());
    // The tied head on another GPU than the embedding gets its own copy.
    let plan = map(
        r#"{"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1,
            "model.layers.2": 0, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}"#,
    );
    check_small_load(&folder, &plan, &LoadOptions::default());
    // One thread serves both GPUs (it steals the other GPU's queue); five split between them.
    for threads in [1, 5] {
        let options = LoadOptions {
            staging_bytes: 4096,
            copy_threads: threads,
            ..LoadOptions::default()
        };
        check_small_load(&folder, &plan, &options);
        let model = load_model(&folder).unwrap();
        let loaded = load(&model, &plan, &options).unwrap();
        let gpus: Vec<_> = loaded.stats().devices.iter().collect();
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus.iter().map(|d| d.home_threads).sum::<usize>(), threads);
        for d in gpus {
            assert_eq!(d.staging_slots, d.home_threads + 8, "{d:?}");
        }
    }
}

#[test]
fn gpu_a_plan_naming_an_absent_gpu_is_refused() {
    let Some(n) = gpus("gpu_a_plan_naming_an_absent_gpu_is_refused") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model = load_model(&small_checkpoint(dir.path())).unwrap();
    let plan = map(&format!(
        r#"{{"model.embed_tokens": {n}, "model.layers": 0, "model.norm": 0, "lm_head": 0}}"#
    ));
    let e = load(&model, &plan, &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(e, Error::NoSuchGpu { index, count, .. } if index == n && count == n),
        "{e}"
    );
    assert!(e.to_string().contains(&format!("GPU {n}")), "{e}");
}

#[test]
fn gpu_out_of_memory_is_an_error_and_frees_what_it_took() {
    let test = "gpu_out_of_memory_is_an_error_and_frees_what_it_took";
    let Some(n) = gpus(test) else {
        return;
    };
    let inv = discover().unwrap();
    let total = inv.gpus[n as usize - 1].total_memory;
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("huge");
    std::fs::create_dir_all(&folder).unwrap();
    // A real 256 MiB tensor for every GPU but the last, then one twice as large as the last GPU,
    // as a hole in a sparse file: the other allocations succeed first, then the last fails.
    let small = 256u64 << 20;
    let mut tensors: Vec<Spec> = (0..n - 1)
        .map(|g| {
            let data = pattern(u64::from(g), small as usize);
            (format!("w.g{g}.weight"), "U8", vec![small], Some(data))
        })
        .collect();
    tensors.push((format!("w.g{}.weight", n - 1), "U8", vec![2 * total], None));
    let host = Some(pattern(99, small as usize));
    tensors.push(("w.host.weight".to_string(), "U8", vec![small], host));
    write_safetensors(&folder.join("model.safetensors"), &tensors);
    let model = load_model(&folder).unwrap();
    let mut plan = DeviceMap::new();
    for g in 0..n {
        plan.insert(format!("w.g{g}"), Device::Gpu(g));
    }
    plan.insert("w.host", Device::Cpu);

    let free_before: Vec<u64> = inv.gpus.iter().map(|g| g.free_memory).collect();
    let e = load(&model, &plan, &LoadOptions::default()).unwrap_err();
    match &e {
        Error::OutOfMemory {
            device,
            requested,
            free,
            tensors,
        } => {
            assert_eq!(*device, Device::Gpu(n - 1));
            assert_eq!(*requested, 2 * total);
            assert!(*free < total);
            assert_eq!(*tensors, 1);
        }
        other => panic!("expected OutOfMemory, got {other}"),
    }
    let text = e.to_string();
    assert!(
        text.contains(&format!("GPU {}", n - 1)) && text.contains("freed"),
        "{text}"
    );
    let after = discover().unwrap();
    for (g, before) in after.gpus.iter().zip(&free_before) {
        let diff = before.abs_diff(g.free_memory);
        let _ = writeln!(
            std::io::stderr(),
            "{test}: GPU {}: free {} before, {} after the failed load",
            g.index,
            before,
            g.free_memory
        );
        // Contexts and allocations are all given back (NVML reads without a context of its own).
        assert!(
            diff < 64 << 20,
            "GPU {}: {before} before, {} after",
            g.index,
            g.free_memory
        );
    }
}

#[test]
fn gpu_pinned_copies_are_measured() {
    let Some(_) = gpus("gpu_pinned_copies_are_measured") else {
        return;
    };
    let pinned = h2d_bandwidth(0, HostMemory::Pinned, 64 << 20, 3).unwrap();
    let pageable = h2d_bandwidth(0, HostMemory::Pageable, 64 << 20, 3).unwrap();
    let _ = writeln!(
        std::io::stderr(),
        "gpu_pinned_copies_are_measured: pinned {:.1} GiB/s, pageable {:.1} GiB/s (64 MiB copies)",
        pinned.median_gib_per_s(),
        pageable.median_gib_per_s()
    );
    assert!(pinned.median > 1e9 && pageable.median > 1e8);
}
