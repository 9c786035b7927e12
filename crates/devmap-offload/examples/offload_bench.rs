//! Offload throughput against `cp`, peak memory, and mmap read throughput, on a generated checkpoint.
//!
//! ```sh
//! cargo run --release -p devmap-offload --example offload_bench -- --size-gib 8 --rounds 2
//! ```
//!
//! Generates a Llama-shaped BF16 safetensors file of `--size-gib` GiB in `--dir` (default: a
//! temporary folder under the system's; `--out-dir` puts the copies elsewhere, e.g. on tmpfs),
//! then, each round, on the same bytes: `cp` of the file (then `sync FILE`), devmap's copy form
//! without fsync, devmap's reference form (hashing only), devmap's copy form with fsync (the
//! default); even rounds run the steps in reverse order. Each writer starts from a clean slate
//! (the previous output deleted and the disk synced, then `--pause` seconds of quiet: a virtual
//! disk keeps writing back after `sync` returns, which otherwise slows whichever step comes next). Then mmap reads of the `.dat` files,
//! warm (page cache) and cold (`dd iflag=nocache` drops each file's cached pages first), with `cat`
//! as the cold baseline. Peak RSS is the process's VmHWM, reset (`/proc/self/clear_refs`) before
//! each measured step. Prints a table and deletes every file it made.
//!
//! `--generate FILE` only writes the checkpoint (kept), to measure the CLI on it:
//! `/usr/bin/time -v devmap offload FILE --plan disk.json --folder OUT --copy`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use devmap_core::{DType, Device, DeviceMap, Model};
use devmap_offload::{offload, Form, OffloadFolder, OffloadOptions};
use rayon::prelude::*;

const GIB: u64 = 1 << 30;

struct Args {
    size_gib: f64,
    dir: Option<PathBuf>,
    out_dir: Option<PathBuf>,
    rounds: usize,
    generate: Option<PathBuf>,
    pause: Duration,
}

fn parse_args() -> Args {
    let mut args = Args {
        size_gib: 8.0,
        dir: None,
        out_dir: None,
        rounds: 2,
        generate: None,
        pause: Duration::ZERO,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--size-gib" => {
                args.size_gib = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--size-gib takes a number"))
            }
            "--dir" => args.dir = Some(PathBuf::from(value())),
            "--out-dir" => args.out_dir = Some(PathBuf::from(value())),
            "--generate" => args.generate = Some(PathBuf::from(value())),
            "--pause" => {
                args.pause = Duration::from_secs_f64(
                    value()
                        .parse()
                        .unwrap_or_else(|_| usage("--pause takes seconds")),
                )
            }
            "--rounds" => {
                args.rounds = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--rounds takes an integer"))
            }
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    args
}

fn usage(msg: &str) -> ! {
    eprintln!(
        "{msg}\nusage: offload_bench [--size-gib 8] [--dir DIR] [--out-dir DIR] [--rounds 2] [--pause SECONDS] [--generate FILE]"
    );
    std::process::exit(2)
}

/// Tensors of one decoder layer: (name, rows) of BF16 [rows, 4096], plus a norm of [4096].
const LAYER: [(&str, u64); 4] = [
    ("mlp.up_proj.weight", 14_336),
    ("mlp.down_proj.weight", 14_336),
    ("self_attn.qkv_proj.weight", 3_072),
    ("self_attn.o_proj.weight", 1_024),
];
const WIDTH: u64 = 4096;

/// Write a safetensors file of about `bytes` bytes, streaming generated data through an 8 MiB buffer.
fn generate(path: &Path, bytes: u64) -> std::io::Result<u64> {
    let layer_bytes: u64 = LAYER.iter().map(|(_, r)| r * WIDTH * 2).sum::<u64>() + WIDTH * 2;
    let layers = ((bytes + layer_bytes / 2) / layer_bytes).max(1);
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    let mut push = |name: String, shape: Vec<u64>| {
        let n: u64 = shape.iter().product::<u64>() * 2;
        header.insert(
            name,
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    };
    for l in 0..layers {
        for (name, rows) in LAYER {
            push(format!("model.layers.{l}.{name}"), vec![rows, WIDTH]);
        }
        push(
            format!("model.layers.{l}.input_layernorm.weight"),
            vec![WIDTH],
        );
    }
    let mut json = serde_json::to_vec(&header).expect("JSON");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut f = File::create(path)?;
    f.write_all(&(json.len() as u64).to_le_bytes())?;
    f.write_all(&json)?;
    let mut buf = vec![0u8; 8 << 20];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut left = offset;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            // xorshift64: incompressible, fast.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(offset)
}

fn sh(cmd: &mut Command) {
    let status = cmd.status().expect("spawn");
    assert!(status.success(), "{cmd:?} failed");
}

fn sync_all() {
    sh(&mut Command::new("sync"));
}

/// Reset the peak-RSS counter of this process (Linux ≥ 4.0).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// VmHWM of this process, bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn gbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / 1e9 / t.as_secs_f64()
}

struct Row {
    what: String,
    bytes: u64,
    time: Duration,
    rss: Option<u64>,
}

fn remove(path: &Path) {
    if path.is_dir() {
        std::fs::remove_dir_all(path).expect("remove folder");
    } else if path.exists() {
        std::fs::remove_file(path).expect("remove file");
    }
}

/// Read every byte of every tensor through mmap views, in parallel; returns a checksum-like sum so
/// the reads cannot be optimised away.
fn read_all(folder: &OffloadFolder) -> u64 {
    folder
        .entries()
        .par_iter()
        .map(|e| {
            let view = folder.get(&e.name).expect("get");
            view.bytes().chunks_exact(8).fold(0u64, |acc, w| {
                acc.wrapping_add(u64::from_le_bytes(w.try_into().unwrap()))
            })
        })
        .reduce(|| 0, u64::wrapping_add)
}

fn drop_cache(files: &[PathBuf]) {
    sync_all();
    for f in files {
        sh(Command::new("dd").arg(format!("if={}", f.display())).args([
            "iflag=nocache",
            "count=0",
            "status=none",
        ]));
    }
}

fn offload_run(model: &Model, out: &Path, form: Form, fsync: bool, pause: Duration) -> Row {
    remove(out);
    sync_all();
    std::thread::sleep(pause);
    let options = OffloadOptions {
        form,
        fsync,
        ..OffloadOptions::default()
    };
    reset_peak_rss();
    let t = Instant::now();
    let report = offload(model, &DeviceMap::whole(Device::Disk), out, &options).expect("offload");
    let time = t.elapsed();
    let rss = peak_rss();
    let what = match (form, fsync) {
        (Form::Copy, false) => "devmap offload --copy --no-fsync",
        (Form::Copy, true) => "devmap offload --copy (fsync)",
        (Form::Reference, _) => "devmap offload (reference form: hash only)",
    };
    Row {
        what: what.to_string(),
        bytes: report.bytes,
        time,
        rss: Some(rss),
    }
}

fn scratch_in(dir: Option<&PathBuf>) -> tempfile::TempDir {
    match dir {
        Some(d) => {
            std::fs::create_dir_all(d).expect("create the folder");
            tempfile::tempdir_in(d).expect("temp dir")
        }
        None => tempfile::tempdir().expect("temp dir"),
    }
}

fn main() {
    let args = parse_args();
    if let Some(path) = &args.generate {
        // Only write the checkpoint (to measure the CLI on it, e.g. under /usr/bin/time -v).
        let bytes = generate(path, (args.size_gib * GIB as f64) as u64).expect("generate");
        println!("{}: {bytes} bytes of tensor data", path.display());
        return;
    }
    let scratch = scratch_in(args.dir.as_ref());
    let out_scratch = scratch_in(args.out_dir.as_ref().or(args.dir.as_ref()));
    let dir = scratch.path();
    let out_dir = out_scratch.path();
    let source = dir.join("model.safetensors");
    let want = (args.size_gib * GIB as f64) as u64;
    let t = Instant::now();
    let data_bytes = generate(&source, want).expect("generate checkpoint");
    let file_bytes = std::fs::metadata(&source).expect("stat").len();
    eprintln!(
        "generated {} ({:.2} GiB of tensor data) in {:.1} s",
        source.display(),
        data_bytes as f64 / GIB as f64,
        t.elapsed().as_secs_f64()
    );
    let model = devmap_core::load_model(&source).expect("load model");
    assert!(model.tensors().iter().all(|t| t.dtype == DType::BF16));

    let cp_dest = out_dir.join("cp-copy.safetensors");
    let out = out_dir.join("offload");
    let mut rows: Vec<(usize, Row)> = Vec::new();
    for round in 1..=args.rounds {
        // Alternate the order, so neither writer always follows the other's writeback.
        let mut steps = ["cp", "copy-no-fsync", "reference", "copy-fsync"];
        if round % 2 == 0 {
            steps.reverse();
        }
        for step in steps {
            match step {
                "cp" => {
                    remove(&cp_dest);
                    sync_all();
                    std::thread::sleep(args.pause);
                    let t = Instant::now();
                    sh(Command::new("cp").arg(&source).arg(&cp_dest));
                    let cp_time = t.elapsed();
                    sh(Command::new("sync").arg(&cp_dest));
                    let cp_sync_time = t.elapsed();
                    for (what, time) in
                        [("cp (no sync)", cp_time), ("cp && sync FILE", cp_sync_time)]
                    {
                        rows.push((
                            round,
                            Row {
                                what: what.into(),
                                bytes: file_bytes,
                                time,
                                rss: None,
                            },
                        ));
                    }
                    remove(&cp_dest);
                }
                "copy-no-fsync" => rows.push((
                    round,
                    offload_run(&model, &out, Form::Copy, false, args.pause),
                )),
                "copy-fsync" => rows.push((
                    round,
                    offload_run(&model, &out, Form::Copy, true, args.pause),
                )),
                _ => rows.push((
                    round,
                    offload_run(
                        &model,
                        &out_dir.join("refs"),
                        Form::Reference,
                        true,
                        args.pause,
                    ),
                )),
            }
        }
    }
    // The last copy-form folder stays for the reads.
    let folder = OffloadFolder::open(&out).expect("open");
    let dat_files: Vec<PathBuf> = folder
        .entries()
        .iter()
        .filter_map(|e| match &e.location {
            devmap_offload::Location::Dat { path } => Some(path.clone()),
            _ => None,
        })
        .collect();
    let read_rounds = args.rounds;
    for round in 1..=read_rounds {
        read_all(&folder); // warm the page cache (as far as it holds the files)
        reset_peak_rss();
        let t = Instant::now();
        let sum = read_all(&folder);
        let warm = t.elapsed();
        let rss = peak_rss();
        std::hint::black_box(sum);
        rows.push((
            round,
            Row {
                what: "mmap read, warm (OffloadFolder::get, all tensors)".into(),
                bytes: data_bytes,
                time: warm,
                rss: Some(rss),
            },
        ));
        drop_cache(&dat_files);
        reset_peak_rss();
        let t = Instant::now();
        std::hint::black_box(read_all(&folder));
        let cold = t.elapsed();
        let rss = peak_rss();
        rows.push((
            round,
            Row {
                what: "mmap read, cold (OffloadFolder::get, all tensors)".into(),
                bytes: data_bytes,
                time: cold,
                rss: Some(rss),
            },
        ));
        drop_cache(&dat_files);
        let t = Instant::now();
        sh(Command::new("cat")
            .args(&dat_files)
            .stdout(std::process::Stdio::null()));
        rows.push((
            round,
            Row {
                what: "cat of the .dat files, cold".into(),
                bytes: data_bytes,
                time: t.elapsed(),
                rss: None,
            },
        ));
    }
    drop(folder);
    remove(&out);
    remove(&out_dir.join("refs"));
    remove(&source);

    let cp_no_sync: Vec<f64> = rows
        .iter()
        .filter(|(_, r)| r.what == "cp (no sync)")
        .map(|(_, r)| gbps(r.bytes, r.time))
        .collect();
    let cp_sync: Vec<f64> = rows
        .iter()
        .filter(|(_, r)| r.what == "cp && sync FILE")
        .map(|(_, r)| gbps(r.bytes, r.time))
        .collect();
    let mut steps: Vec<&str> = Vec::new();
    for (_, r) in &rows {
        if !steps.contains(&r.what.as_str()) {
            steps.push(&r.what);
        }
    }
    // The middle value; for an even count, the mean of the two middle ones.
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let mut summary = Vec::new();
    for step in &steps {
        let mut rates: Vec<f64> = rows
            .iter()
            .filter(|(_, r)| r.what == *step)
            .map(|(_, r)| gbps(r.bytes, r.time))
            .collect();
        let mut rss: Vec<f64> = rows
            .iter()
            .filter(|(_, r)| r.what == *step)
            .filter_map(|(_, r)| r.rss.map(|b| b as f64))
            .collect();
        let peak_rss = rss.iter().copied().fold(0.0, f64::max);
        summary.push((
            step.to_string(),
            median(&mut rates),
            (!rss.is_empty()).then(|| {
                let _ = median(&mut rss);
                peak_rss
            }),
        ));
    }
    println!(
        "checkpoint: {:.2} GiB of BF16 tensor data, {} tensors, {} rayon threads, {} round(s); \
         steps in the order listed in odd rounds, reversed in even rounds\n",
        data_bytes as f64 / GIB as f64,
        model.tensors().len(),
        rayon::current_num_threads(),
        args.rounds
    );
    println!("| round | step | GiB | s | GB/s | vs cp (same round) | peak RSS MiB |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (round, r) in &rows {
        let rate = gbps(r.bytes, r.time);
        let vs = match r.what.as_str() {
            "devmap offload --copy --no-fsync" => {
                format!("{:.0}% of cp", 100.0 * rate / cp_no_sync[round - 1])
            }
            "devmap offload --copy (fsync)" => {
                format!("{:.0}% of cp && sync", 100.0 * rate / cp_sync[round - 1])
            }
            _ => String::new(),
        };
        println!(
            "| {round} | {} | {:.2} | {:.2} | {:.2} | {vs} | {} |",
            r.what,
            r.bytes as f64 / GIB as f64,
            r.time.as_secs_f64(),
            rate,
            r.rss.map_or(String::new(), |b| format!(
                "{:.0}",
                b as f64 / (1 << 20) as f64
            ))
        );
    }
    let rate_of = |step: &str| summary.iter().find(|(s, _, _)| s == step).map(|x| x.1);
    println!("\nmedian over rounds (peak RSS: the highest of any round)\n");
    println!("| step | GB/s | vs cp | peak RSS MiB |");
    println!("|---|---:|---:|---:|");
    for (step, rate, rss) in &summary {
        let base = match step.as_str() {
            "devmap offload --copy --no-fsync" => rate_of("cp (no sync)"),
            "devmap offload --copy (fsync)" => rate_of("cp && sync FILE"),
            _ => None,
        };
        println!(
            "| {step} | {rate:.2} | {} | {} |",
            base.map_or(String::new(), |b| format!("{:.0}%", 100.0 * rate / b)),
            rss.map_or(String::new(), |b| format!("{:.0}", b / (1 << 20) as f64))
        );
    }
}
