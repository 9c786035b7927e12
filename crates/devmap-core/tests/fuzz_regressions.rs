//! Regressions from fuzzing devmap-core's input paths (`fuzz/`, see docs/testing.md): every crash,
//! hang or wrong acceptance a fuzz target (or the review that went with it) found, as a test on the
//! exact input or its minimal form. Each test says which target and what was wrong.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devmap_core::cost::Topology;
use devmap_core::model::MAX_NAME_COMPONENTS;
use devmap_core::{
    load_model, validate, DType, Device, DeviceMap, KvCacheSpec, Manifest, ModelBuilder,
    ModelConfig, SizeRules,
};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write a test file");
    p
}

/// A safetensors file of `tensors` (name, shape) in U8 (one byte per element), data included.
fn safetensors(path: &Path, tensors: &[(String, Vec<u64>)]) {
    let mut header = String::from("{");
    let mut offset = 0u64;
    for (i, (name, shape)) in tensors.iter().enumerate() {
        let n: u64 = shape.iter().product();
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            r#""{name}":{{"dtype":"U8","shape":{shape:?},"data_offsets":[{offset},{}]}}"#,
            offset + n
        ));
        offset += n;
    }
    header.push('}');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + offset as usize, 0);
    std::fs::write(path, bytes).expect("write a safetensors file");
}

/// Generous for a debug build on a loaded 2-core machine; the quadratic versions took minutes.
const LINEAR_TIME: Duration = Duration::from_secs(20);

// ------------------------------------------------------------ target `config`: topology files

/// Crash input `fuzz/artifacts/config/crash-20fd2eb9…` (after the selector byte): a peer link with
/// zero bandwidth was accepted because only the default links were checked, so the cost model
/// returned an infinite transfer time between GPUs 0 and 7.
#[test]
fn topology_peer_link_with_zero_bandwidth_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "topology.json",
        br#"{"peer_links": {"7-0": {"bandwidth": 0e9, "latency": 0}}}"#,
    );
    let e = Topology::read(&p).unwrap_err().to_string();
    assert!(e.contains("topology.json"), "{e}");
    assert!(e.contains("peer_links.7-0.bandwidth"), "{e}");
}

/// Same class: per-GPU host links and every latency were unchecked (a negative latency made
/// negative step times, which the lower bound and the MIP take at face value).
#[test]
fn topology_links_need_positive_bandwidth_and_non_negative_latency() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[u8], &str); 4] = [
        (
            br#"{"gpus": {"1": {"memory_bandwidth": 1e12, "host_link": {"bandwidth": -5, "latency": 0}}}}"#,
            "gpus.1.host_link.bandwidth",
        ),
        (
            br#"{"default_host_link": {"bandwidth": 1e9, "latency": -1e-5}}"#,
            "default_host_link.latency",
        ),
        (
            br#"{"peer_links": {"0-1": {"bandwidth": 1e9, "latency": -1}}}"#,
            "peer_links.0-1.latency",
        ),
        (
            br#"{"default_peer_link": {"bandwidth": 1e9, "latency": 1e999}}"#,
            "", // 1e999 is not valid JSON for serde_json: any error naming the file will do
        ),
    ];
    for (text, culprit) in cases {
        let p = write(dir.path(), "t.json", text);
        let e = Topology::read(&p).unwrap_err().to_string();
        assert!(e.contains("t.json") && e.contains(culprit), "{e}");
    }
    // Zero latency stays valid (the defaults' shape, with an ideal link).
    let p = write(
        dir.path(),
        "ok.json",
        br#"{"peer_links": {"0-1": {"bandwidth": 4.5e11, "latency": 0}}}"#,
    );
    Topology::read(&p).expect("zero latency is allowed");
}

// ------------------------------------------------------------ target `config`: --kv-cache

/// `2 × batch × seq × kv_heads × head_dim × dtype` overflowed: a panic in debug builds, and in
/// release a wrapped product (here exactly 0) that reserved no KV cache at all.
#[test]
fn kv_cache_size_overflow_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "config.json",
        br#"{"num_attention_heads": 8, "hidden_size": 64}"#,
    );
    let model = ModelBuilder::new("m")
        .param("w", DType::BF16, &[4])
        .config(Some(ModelConfig::read(&p).unwrap()))
        .build()
        .unwrap();
    let kv = KvCacheSpec::parse("batch=9223372036854775808,seq=2").unwrap();
    let e = kv.bytes_per_layer(&model).unwrap_err().to_string();
    assert!(
        e.contains("1 PiB") && e.contains("9223372036854775808"),
        "{e}"
    );
    // The largest config.json values are read as u64 too.
    let p = write(
        dir.path(),
        "config.json",
        br#"{"num_key_value_heads": 18446744073709551615, "head_dim": 2}"#,
    );
    let model = ModelBuilder::new("m")
        .param("w", DType::BF16, &[4])
        .config(Some(ModelConfig::read(&p).unwrap()))
        .build()
        .unwrap();
    let kv = KvCacheSpec::parse("seq=1").unwrap();
    assert!(kv.bytes_per_layer(&model).is_err());
    // In range it is the plain product.
    let kv = KvCacheSpec::parse("batch=2,seq=3,dtype=f32").unwrap();
    let p = write(
        dir.path(),
        "config.json",
        br#"{"num_key_value_heads": 5, "head_dim": 7}"#,
    );
    let model = ModelBuilder::new("m")
        .param("w", DType::BF16, &[4])
        .config(Some(ModelConfig::read(&p).unwrap()))
        .build()
        .unwrap();
    assert_eq!(kv.bytes_per_layer(&model).unwrap(), 2 * 2 * 3 * 5 * 7 * 4);
}

// ------------------------------------------------------------ targets `manifest`, `safetensors_header`: deep names

/// One name of 200,000 dotted components (400 KB) made 200,000 modules each storing its whole
/// prefix (~40 GB) and recursed once per component: a stack overflow (an abort, not a panic) from
/// about 50,000 components on. Found by review of what the fuzz targets cannot reach (their inputs
/// stay under 4 KiB); the fix bounds names at `MAX_NAME_COMPONENTS` components.
#[test]
fn deeply_dotted_tensor_name_in_a_manifest_is_rejected() {
    let name = vec!["a"; 200_000].join(".");
    let doc = serde_json::json!({
        "format": "devmap-manifest/1",
        "tensors": [{"name": name, "dtype": "F16", "shape": [1]}],
    });
    let origin = Path::new("deep.json");
    let start = Instant::now();
    let e = Manifest::from_json(&doc.to_string(), origin)
        .and_then(|m| m.into_model(origin))
        .unwrap_err()
        .to_string();
    assert!(start.elapsed() < LINEAR_TIME);
    assert!(
        e.contains("deep.json") && e.contains("200000 dotted components"),
        "{e}"
    );
    assert!(
        e.len() < 1000,
        "the message quotes a prefix, not 400 KB: {} bytes",
        e.len()
    );
}

#[test]
fn deeply_dotted_module_name_and_safetensors_name_are_rejected() {
    let name = vec!["m"; 100_000].join(".");
    let doc = serde_json::json!({
        "format": "devmap-manifest/1",
        "modules": [{"name": name, "class": "Deep"}],
        "tensors": [{"name": "w", "dtype": "F16", "shape": [1]}],
    });
    let origin = Path::new("deep_module.json");
    let e = Manifest::from_json(&doc.to_string(), origin)
        .and_then(|m| m.into_model(origin))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("module name") && e.contains("100000 dotted components"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("deep.safetensors");
    safetensors(&p, &[(format!("{name}.weight"), vec![2])]);
    let e = load_model(&p).unwrap_err().to_string();
    assert!(
        e.contains(&*p.to_string_lossy()) && e.contains("dotted components"),
        "{e}"
    );
}

#[test]
fn names_at_the_component_limit_still_load() {
    let deepest = vec!["b"; MAX_NAME_COMPONENTS].join(".");
    let model = ModelBuilder::new("m")
        .param(deepest.clone(), DType::F16, &[3])
        .build()
        .expect("64 components are allowed");
    assert_eq!(model.modules().len(), MAX_NAME_COMPONENTS); // root + 63 ancestors
    let map = DeviceMap::from_tensor_devices(&model, &[Device::Gpu(0)]);
    assert!(validate(&model, &map, None, SizeRules::default()).is_valid());
    let too_deep = format!("{deepest}.c");
    assert!(ModelBuilder::new("m")
        .param(too_deep, DType::F16, &[3])
        .build()
        .is_err());
}

// ------------------------------------------------------------ quadratic paths on wide inputs

/// `infer_no_split_blocks` looked each child up in the list of numbered children: quadratic in a
/// module's children (10⁶ tensors `x.N.w`, a 30 MB header, took minutes to load).
#[test]
fn a_header_with_100k_numbered_blocks_loads_in_linear_time() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("wide.safetensors");
    let n = 100_000;
    let tensors: Vec<(String, Vec<u64>)> = (0..n).map(|i| (format!("x.{i}.w"), vec![1])).collect();
    safetensors(&p, &tensors);
    let start = Instant::now();
    let model = load_model(&p).unwrap();
    let took = start.elapsed();
    assert_eq!(model.tensors().len(), n);
    assert!(model.modules().iter().filter(|m| m.no_split).count() == n);
    assert!(took < LINEAR_TIME, "loading took {took:?}");
}

/// `DeviceMap::from_json_str` checked for a duplicate key with a linear scan per key, and `clean`
/// grouped keys with a linear search per key: a per-tensor map of a 170k-tensor model (which
/// `devmap check` reads) took minutes.
#[test]
fn a_100k_key_map_parses_validates_and_cleans_in_linear_time() {
    let n = 100_000;
    let mut b = ModelBuilder::new("wide");
    for i in 0..n {
        b = b.param(format!("x.{i}.w"), DType::U8, &[1]);
    }
    let model = b.build().unwrap();
    let mut text = String::from("{");
    for i in 0..n {
        if i > 0 {
            text.push(',');
        }
        text.push_str(&format!(r#""x.{i}.w":{}"#, i % 2));
    }
    text.push('}');
    let start = Instant::now();
    let map = DeviceMap::from_json_str(&text).unwrap();
    let report = validate(&model, &map, None, SizeRules::default());
    let cleaned = map.clean();
    let took = start.elapsed();
    assert!(report.is_valid(), "{:?}", report.problems.first());
    assert_eq!(cleaned.len(), n, "alternating devices: nothing merges");
    assert!(took < LINEAR_TIME, "parse + validate + clean took {took:?}");
    // Duplicates are still caught, by name.
    let e = DeviceMap::from_json_str(r#"{"x.1.w": 0, "x.2.w": 1, "x.1.w": "cpu"}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"x.1.w\"") && e.contains("twice"), "{e}");
}

// ------------------------------------------------------------ hostile files: special files

/// `Header::read` opened whatever a path named: a FIFO among a checkpoint's shards (a tar archive
/// can carry one) blocked `open` forever, for a `.safetensors` path and for a shard named by an
/// index alike. Found by review of the `safetensors_header` target, which only writes regular files.
#[test]
fn a_fifo_as_a_checkpoint_or_a_shard_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model.safetensors");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("mkfifo is not available: skipped");
        return;
    }
    let index = write(
        dir.path(),
        "model.safetensors.index.json",
        br#"{"weight_map": {"w": "model.safetensors"}}"#,
    );
    for path in [fifo.clone(), index, dir.path().to_path_buf()] {
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        // A thread, so that a regression fails the test instead of hanging it.
        std::thread::spawn(move || {
            let _ = tx.send(load_model(&p).map(|_| ()).map_err(|e| e.to_string()));
        });
        let result = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("load_model({}) hangs", path.display()));
        let e = result.expect_err("a FIFO holds no header");
        assert!(
            e.contains(&*fifo.to_string_lossy()) && e.contains("not a regular file"),
            "{e}"
        );
    }
}
