//! `devmap offload`: the binary on a real checkpoint, both forms, --verify, and its usage errors.

use std::path::Path;
use std::process::{Command, Output};

use devmap_core::{safetensors::write_file, DType};

fn devmap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_devmap"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A two-layer checkpoint and a plan putting layer 1 and the norm on disk.
fn fixture(dir: &Path) -> (String, String) {
    let model = dir.join("model.safetensors");
    let data = |n: usize, seed: u8| (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
    write_file(
        &model,
        &[
            ("layers.0.weight", DType::BF16, vec![64, 64], data(8192, 1)),
            ("layers.1.weight", DType::BF16, vec![64, 64], data(8192, 2)),
            ("norm.weight", DType::F32, vec![64], data(256, 3)),
        ],
    )
    .unwrap();
    let plan = dir.join("plan.json");
    std::fs::write(
        &plan,
        r#"{"layers.0": "cpu", "layers.1": "disk", "norm": "disk"}"#,
    )
    .unwrap();
    (
        model.to_str().unwrap().to_string(),
        plan.to_str().unwrap().to_string(),
    )
}

#[test]
fn copy_then_verify_then_detect_a_change() {
    let dir = tempfile::tempdir().unwrap();
    let (model, plan) = fixture(dir.path());
    let folder = dir.path().join("off");
    let f = folder.to_str().unwrap();
    let o = devmap(&["offload", &model, "--plan", &plan, "--folder", f, "--copy"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("2 disk tensor(s)"), "{out}");
    assert!(
        out.contains("wrote 2 .dat file(s)") && out.contains("GB/s"),
        "{out}"
    );
    assert_eq!(
        std::fs::read(folder.join("norm.weight.dat")).unwrap().len(),
        256
    );

    let o = devmap(&["offload", "--verify", f]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("2 of 2 tensor(s) match"), "{out}");

    let again = devmap(&["offload", &model, "--plan", &plan, "--folder", f, "--copy"]);
    assert!(text(&again).0.contains("2 already complete and verified"));

    let dat = folder.join("layers.1.weight.dat");
    let mut bytes = std::fs::read(&dat).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&dat, bytes).unwrap();
    let o = devmap(&["offload", "--verify", f]);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}{err}");
    assert!(err.contains("\"layers.1.weight\""), "{err}");
}

#[test]
fn reference_form_is_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let (model, plan) = fixture(dir.path());
    let folder = dir.path().join("off");
    let f = folder.to_str().unwrap();
    let o = devmap(&["offload", &model, "--plan", &plan, "--folder", f]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("referenced 2 tensor(s)"), "{out}");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["norm.weight"]["weight_name"], "norm.weight");
    assert!(devmap(&["offload", "--verify", f]).status.success());
}

#[test]
fn usage_and_input_errors_name_the_culprit() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = fixture(dir.path());
    let f = dir.path().join("off");
    let f = f.to_str().unwrap();

    let o = devmap(&["offload", &model, "--folder", f]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("--plan"), "{}", text(&o).1);

    let o = devmap(&["offload", &model, "--verify", f]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("cannot be used with"), "{}", text(&o).1);

    let o = devmap(&["offload", "--verify", f]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("index.json"), "{}", text(&o).1);

    let bad_plan = dir.path().join("bad.json");
    std::fs::write(&bad_plan, r#"{"layers.7": "disk"}"#).unwrap();
    let o = devmap(&[
        "offload",
        &model,
        "--plan",
        bad_plan.to_str().unwrap(),
        "--folder",
        f,
    ]);
    assert!(!o.status.success());
    let err = text(&o).1;
    assert!(
        err.contains("layers.7") && err.contains("bad.json"),
        "{err}"
    );
}
