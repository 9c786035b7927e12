//! Shared helpers for devmap's benches and the `plan_table` binary: the fixture models
//! (`fixtures/models/*.json`, `*.config.json` skipped), the budget scenarios (`fixtures/scenarios.json`),
//! Hugging Face's reference timings (`fixtures/reference/<model>.json`, `time_s_median` for each
//! scenario × strategy × path), the strategies as the benches call them, and a median timer.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use devmap_core::{load_model, Device, MemoryBudgets, Model};
use devmap_solver::{Compat, HfGreedy, HfKind};

/// The repository's `fixtures` folder.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// A named set of budgets from `fixtures/scenarios.json`.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Its name (`2x24G+cpu64`).
    pub name: String,
    /// The `max_memory` dict, parsed.
    pub budgets: MemoryBudgets,
}

impl Scenario {
    /// Whether the scenario offers a disk budget (otherwise disk use counts as "does not fit").
    pub fn has_disk(&self) -> bool {
        self.budgets.contains(Device::Disk)
    }
}

/// Read `fixtures/scenarios.json`.
pub fn scenarios() -> Result<Vec<Scenario>> {
    let path = fixtures_dir().join("scenarios.json");
    let v = read_json(&path)?;
    let list = v["scenarios"]
        .as_array()
        .ok_or_else(|| anyhow!("{}: no \"scenarios\" array", path.display()))?;
    list.iter()
        .map(|s| {
            let name = s["name"]
                .as_str()
                .ok_or_else(|| anyhow!("{}: a scenario has no name", path.display()))?
                .to_string();
            let budgets = MemoryBudgets::from_json_str(&s["max_memory"].to_string(), &path)
                .with_context(|| format!("scenario {name}"))?;
            Ok(Scenario { name, budgets })
        })
        .collect()
}

/// The fixture manifests: `(stem, path)` for every `fixtures/models/*.json` except `*.config.json`,
/// sorted by stem.
pub fn model_paths() -> Result<Vec<(String, PathBuf)>> {
    let dir = fixtures_dir().join("models");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(stem) = name.strip_suffix(".json") {
            if !stem.ends_with(".config") {
                out.push((stem.to_string(), path.clone()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Stems of the models that have Hugging Face references (`fixtures/reference/<stem>.json`), sorted.
pub fn reference_models() -> Result<Vec<String>> {
    let dir = fixtures_dir().join("reference");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                out.push(stem.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The manifest path of a fixture model.
pub fn model_path(stem: &str) -> PathBuf {
    fixtures_dir().join("models").join(format!("{stem}.json"))
}

/// Load a fixture model by stem.
pub fn load_fixture(stem: &str) -> Result<Model> {
    let path = model_path(stem);
    load_model(&path).with_context(|| path.display().to_string())
}

/// One Hugging Face reference run.
#[derive(Debug, Clone)]
pub struct RefRun {
    /// Scenario name.
    pub scenario: String,
    /// `sequential`, `balanced`, `balanced_low_0` or `auto`.
    pub strategy: String,
    /// `transformers` or `accelerate`.
    pub path: String,
    /// Median seconds Hugging Face took to compute the map (`None` when it raised before timing).
    pub time_s_median: Option<f64>,
    /// Hugging Face's error, when it raised instead of planning.
    pub error: Option<String>,
}

/// Hugging Face's reference runs of a model.
pub fn reference_runs(stem: &str) -> Result<Vec<RefRun>> {
    let path = fixtures_dir()
        .join("reference")
        .join(format!("{stem}.json"));
    let v = read_json(&path)?;
    let runs = v["runs"]
        .as_array()
        .ok_or_else(|| anyhow!("{}: no \"runs\" array", path.display()))?;
    runs.iter()
        .map(|r| {
            let field = |k: &str| -> Result<String> {
                r[k].as_str()
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("{}: a run has no {k:?}", path.display()))
            };
            Ok(RefRun {
                scenario: field("scenario")?,
                strategy: field("strategy")?,
                path: field("path")?,
                time_s_median: r["time_s_median"].as_f64(),
                error: r["error"].as_str().map(str::to_string),
            })
        })
        .collect()
}

/// Hugging Face's median time for one case, if the reference has it.
pub fn reference_time(runs: &[RefRun], scenario: &str, strategy: &str, path: &str) -> Option<f64> {
    runs.iter()
        .find(|r| r.scenario == scenario && r.strategy == strategy && r.path == path)
        .and_then(|r| r.time_s_median)
}

/// Hugging Face's greedy on the transformers path, spilling to disk as Hugging Face does.
pub fn hf(kind: HfKind) -> HfGreedy {
    HfGreedy {
        kind,
        compat: Compat::Transformers,
        spill_to_disk: true,
    }
}

/// The median of `durations` (the mean of the two middle values for an even count).
pub fn median(mut durations: Vec<Duration>) -> Duration {
    if durations.is_empty() {
        return Duration::ZERO;
    }
    durations.sort_unstable();
    let n = durations.len();
    if n % 2 == 1 {
        durations[n / 2]
    } else {
        (durations[n / 2 - 1] + durations[n / 2]) / 2
    }
}

/// Run `f` once to warm up, then `runs` times, and return the median wall time and the last result.
pub fn time_median<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut last = f();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        let value = std::hint::black_box(f());
        times.push(start.elapsed());
        // The previous result is dropped here, outside the timed section.
        last = value;
    }
    (median(times), last)
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    serde_json::from_str(&text).with_context(|| path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixtures_are_found() {
        let refs = reference_models().unwrap();
        assert_eq!(refs.len(), 7);
        let models = model_paths().unwrap();
        assert!(models.iter().all(|(s, _)| !s.ends_with(".config")));
        for r in &refs {
            assert!(models.iter().any(|(s, _)| s == r), "{r}");
        }
        let sc = scenarios().unwrap();
        assert_eq!(sc.len(), 8);
        let runs = reference_runs("llama-2-7b").unwrap();
        assert!(reference_time(&runs, &sc[0].name, "balanced", "transformers").is_some());
    }

    #[test]
    fn medians() {
        let ms = Duration::from_millis;
        assert_eq!(median(vec![ms(3), ms(1), ms(2)]), ms(2));
        assert_eq!(
            median(vec![ms(4), ms(1), ms(2), ms(3)]),
            Duration::from_micros(2500)
        );
        assert_eq!(median(Vec::new()), Duration::ZERO);
    }
}
