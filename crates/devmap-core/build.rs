//! Index the embedded architecture registry at build time: one `(class, line, start, end)` row per
//! class line, so opening it at run time never scans its megabytes (the lookup must add under 1 ms
//! to `devmap plan`). Malformed lines are left to the run-time parser, which names them.

use std::fmt::Write as _;

fn main() {
    let path = "registry/arch-registry.jsonl";
    println!("cargo:rerun-if-changed={path}");
    let text = std::fs::read_to_string(path).expect("the embedded registry is readable");
    let mut rows = String::from("&[\n");
    let mut start = 0usize;
    for (i, line) in text.split('\n').enumerate() {
        let end = start + line.len();
        if i > 0 {
            if let Some(class) = line
                .strip_prefix("{\"class\":\"")
                .and_then(|rest| rest.split_once('"'))
                .map(|(name, _)| name)
            {
                writeln!(rows, "    ({class:?}, {}, {start}, {end}),", i + 1).unwrap();
            }
        }
        start = end + 1;
    }
    rows.push_str("]\n");
    let out = std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("registry_index.rs");
    std::fs::write(out, rows).expect("OUT_DIR is writable");
}
