//! The architecture registry (`devmap-arch-registry/1`, JSON Lines): what transformers builds for
//! each model class that a checkpoint does not say (module tree and registration order, classes,
//! `_no_split_modules`, tie aliases, tensors absent from the checkpoint, key conversions).
//!
//! One version is embedded at build time ([`Registry::embedded`]); `--arch-registry FILE` reads
//! one generated from another transformers version ([`Registry::read`]). Opening a registry
//! indexes its lines by the `{"class":"<Name>",` prefix every class line starts with, so finding
//! a class parses that line (and the lines it `ref`s) only. [`crate::rebuild`] applies a class to
//! a checkpoint's tensor table.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Deserialize;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{Model, TensorSpec};

/// The format tag of line 1.
pub const REGISTRY_FORMAT: &str = "devmap-arch-registry/1";

/// The registry compiled into devmap-core.
const EMBEDDED: &str = include_str!("../registry/arch-registry.jsonl");
/// Its class lines, indexed by build.rs: (class, 1-based line, start, end).
const EMBEDDED_INDEX: &[(&str, usize, usize, usize)] =
    include!(concat!(env!("OUT_DIR"), "/registry_index.rs"));

type LineIndex = HashMap<String, (usize, std::ops::Range<usize>)>;
const EMBEDDED_NAME: &str = "<embedded crates/devmap-core/registry/arch-registry.jsonl>";

/// An opened registry: its text, header and line index.
#[derive(Debug)]
pub struct Registry {
    path: PathBuf,
    text: Cow<'static, str>,
    /// transformers version the file was generated with.
    transformers: String,
    /// Byte length of the header line: `by_model_type` is parsed only when a lookup needs it.
    header_len: usize,
    /// class name -> (1-based line number, byte range of the line).
    lines: LineIndex,
}

/// What opening needs from line 1 (serde skips the rest without allocating).
#[derive(Deserialize)]
struct HeaderLine {
    format: String,
    #[serde(default)]
    transformers: String,
}

#[derive(Deserialize)]
struct ModelTypes {
    #[serde(default)]
    by_model_type: HashMap<String, Vec<String>>,
}

impl Registry {
    /// The embedded registry (parsed once per process).
    pub fn embedded() -> Result<&'static Registry> {
        static REGISTRY: OnceLock<std::result::Result<Registry, String>> = OnceLock::new();
        REGISTRY
            .get_or_init(|| Registry::open_embedded().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::Registry {
                path: PathBuf::from(EMBEDDED_NAME),
                line: 0,
                reason: e.clone(),
            })
    }

    /// Read a registry file (`--arch-registry FILE`).
    pub fn read(path: &Path) -> Result<Registry> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Registry::parse(Cow::Owned(text), path)
    }

    /// Open the embedded file with the line index build.rs computed (no scan of its megabytes);
    /// uncached: [`Registry::embedded`] opens it once per process.
    pub fn open_embedded() -> Result<Registry> {
        let path = Path::new(EMBEDDED_NAME);
        let (transformers, header_len) = check_header(EMBEDDED, path)?;
        let lines = EMBEDDED_INDEX
            .iter()
            .map(|&(class, line, start, end)| (class.to_string(), (line, start..end)))
            .collect();
        Ok(Registry {
            path: path.to_path_buf(),
            text: Cow::Borrowed(EMBEDDED),
            transformers,
            header_len,
            lines,
        })
    }

    /// Check the header and index the class lines; `path` names the file in errors.
    pub fn parse(text: Cow<'static, str>, path: &Path) -> Result<Registry> {
        let (transformers, header_len) = check_header(&text, path)?;
        let lines = index_lines(&text, path, header_len)?;
        Ok(Registry {
            path: path.to_path_buf(),
            text,
            transformers,
            header_len,
            lines,
        })
    }

    /// "FILE, transformers X" for notes.
    pub fn describe(&self) -> String {
        format!(
            "{}, transformers {}, {} classes",
            self.path.display(),
            if self.transformers.is_empty() {
                "unknown"
            } else {
                &self.transformers
            },
            self.lines.len()
        )
    }

    /// Number of class lines.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Whether the registry has no class lines.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// The class config.json names: `architectures` (in order, each first as
    /// `Class@model_type`, the line built with that model type's config, then as `Class`), else
    /// `model_type`'s base class.
    pub fn class_for(&self, config: &ModelConfig) -> Option<&str> {
        let model_type = config.model_type();
        for arch in config.architectures() {
            let typed = model_type.map(|t| format!("{arch}@{t}"));
            for key in typed.as_deref().into_iter().chain([arch]) {
                if let Some((name, _)) = self.lines.get_key_value(key) {
                    return Some(name);
                }
            }
        }
        let model_type = model_type?;
        // The header was checked at open; only a lookup by model_type needs this part of it.
        let types: ModelTypes = serde_json::from_str(&self.text[..self.header_len]).ok()?;
        let classes = types.by_model_type.get(model_type)?;
        classes.iter().find_map(|c| {
            self.lines
                .get_key_value(c.as_str())
                .map(|(k, _)| k.as_str())
        })
    }

    /// The template of the class config.json names, if the registry knows it.
    pub fn find(&self, config: &ModelConfig) -> Result<Option<Template<'_>>> {
        match self.class_for(config) {
            Some(class) => self.template(class).map(Some),
            None => Ok(None),
        }
    }

    /// The template of `class` (an error when the registry does not have it).
    pub fn template(&self, class: &str) -> Result<Template<'_>> {
        let line = self.class_line(class)?;
        Ok(Template {
            registry: self,
            line,
        })
    }

    /// Parse the line of `class`.
    pub(crate) fn class_line(&self, class: &str) -> Result<ClassLine> {
        let (number, range) = self.lines.get(class).ok_or_else(|| Error::Registry {
            path: self.path.clone(),
            line: 0,
            reason: format!("class {class:?} is not in the registry"),
        })?;
        serde_json::from_str(&self.text[range.clone()]).map_err(|e| Error::Registry {
            path: self.path.clone(),
            line: *number,
            reason: format!("class {class}: {e}"),
        })
    }

    /// The file (or embedded name) for errors.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The 1-based line of `class`, for errors.
    pub(crate) fn line_of(&self, class: &str) -> usize {
        self.lines.get(class).map_or(0, |(n, _)| *n)
    }
}

fn registry_error(path: &Path, line: usize, reason: String) -> Error {
    Error::Registry {
        path: path.to_path_buf(),
        line,
        reason,
    }
}

/// The transformers version and byte length of a valid header line.
fn check_header(text: &str, path: &Path) -> Result<(String, usize)> {
    let first = text.split('\n').next().unwrap_or_default();
    let header: HeaderLine = serde_json::from_str(first).map_err(|e| {
        registry_error(
            path,
            1,
            format!("header: {e} (expected {{\"format\":\"{REGISTRY_FORMAT}\",...}})"),
        )
    })?;
    if header.format != REGISTRY_FORMAT {
        return Err(registry_error(
            path,
            1,
            format!(
                "format is {:?}, expected {REGISTRY_FORMAT:?}",
                header.format
            ),
        ));
    }
    Ok((header.transformers, first.len()))
}

/// class -> (1-based line, byte range) of every class line after the header.
fn index_lines(text: &str, path: &Path, header_len: usize) -> Result<LineIndex> {
    let mut lines = HashMap::new();
    let mut start = header_len + 1;
    for (i, line) in text.split('\n').enumerate().skip(1) {
        let range = start..start + line.len();
        start = range.end + 1;
        if line.trim().is_empty() {
            continue;
        }
        let class = class_of_line(line).ok_or_else(|| {
            registry_error(
                path,
                i + 1,
                "a class line must start with {\"class\":\"<ClassName>\",".to_string(),
            )
        })?;
        if let Some((prev, _)) = lines.insert(class.to_string(), (i + 1, range)) {
            return Err(registry_error(
                path,
                i + 1,
                format!("class {class:?} is also on line {prev}"),
            ));
        }
    }
    Ok(lines)
}

/// `X` for a line starting `{"class":"X",`.
fn class_of_line(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("{\"class\":\"")?;
    let end = rest.find('"')?;
    let name = &rest[..end];
    (!name.is_empty() && !name.contains('\\') && rest[end..].starts_with("\",")).then_some(name)
}

/// One class of the registry, ready to rebuild a checkpoint.
#[derive(Debug)]
pub struct Template<'r> {
    registry: &'r Registry,
    line: ClassLine,
}

impl Template<'_> {
    /// The class name (`LlamaForCausalLM`).
    pub fn class(&self) -> &str {
        &self.line.class
    }

    /// Rebuild the model transformers builds for this class from a checkpoint's tensors.
    /// `Ok(Err(reason))` when the checkpoint does not fit the class (the caller falls back to
    /// inference and says why); `Err` for a malformed registry line.
    pub fn build_model(
        &self,
        name: String,
        checkpoint: Vec<TensorSpec>,
        config: ModelConfig,
    ) -> Result<std::result::Result<Rebuilt, String>> {
        crate::rebuild::rebuild(self.registry, &self.line, name, checkpoint, config)
    }
}

/// A model rebuilt from a registry class, with what the caller should tell the user.
#[derive(Debug, Clone)]
pub struct Rebuilt {
    /// The model.
    pub model: Model,
    /// Notes (checkpoint keys transformers ignores, shapes the registry could not give).
    pub notes: Vec<String>,
}

// ---------------------------------------------------------------- the line format (serde)

/// One class line.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ClassLine {
    pub class: String,
    #[serde(default)]
    pub no_split: Vec<String>,
    #[serde(default)]
    pub tied: Vec<Tie>,
    #[serde(default)]
    pub defaults: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub derived: BTreeMap<String, String>,
    pub tree: TreeNode,
}

/// A tie: `t` takes its storage from `s` when `if` holds (`null`: always).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Tie {
    pub t: String,
    pub s: String,
    #[serde(rename = "if", default)]
    pub when: Option<Condition>,
}

/// When a tie holds, over config.json (the generator probed the config class, so its
/// `__init__` quirks are in the condition).
#[derive(Debug, Clone)]
pub(crate) enum Condition {
    Const(bool),
    /// The boolean at `path`, else `default`.
    Field {
        path: String,
        default: bool,
    },
    Any(Vec<Condition>),
    All(Vec<Condition>),
    /// The row whose values (true/false/absent) equal config.json's picks the result.
    Table {
        fields: Vec<String>,
        rows: Vec<Vec<Option<bool>>>,
    },
    /// The first file's form `{"cfg": SUB, "field": F}`: the default comes from `defaults`.
    Legacy {
        path: String,
    },
}

impl Condition {
    /// Evaluate against `config`; `defaults` serves the legacy form.
    pub(crate) fn holds(
        &self,
        config: &ModelConfig,
        defaults: &serde_json::Map<String, serde_json::Value>,
    ) -> bool {
        let flag = |path: &str| config.get_path(path).and_then(serde_json::Value::as_bool);
        match self {
            Condition::Const(b) => *b,
            Condition::Field { path, default } => flag(path).unwrap_or(*default),
            Condition::Any(cs) => cs.iter().any(|c| c.holds(config, defaults)),
            Condition::All(cs) => cs.iter().all(|c| c.holds(config, defaults)),
            Condition::Table { fields, rows } => {
                let key: Vec<Option<bool>> = fields.iter().map(|f| flag(f)).collect();
                rows.iter()
                    .find(|row| row[..fields.len()] == key[..])
                    .is_some_and(|row| row[fields.len()] == Some(true))
            }
            Condition::Legacy { path } => flag(path)
                .or_else(|| defaults.get(path).and_then(serde_json::Value::as_bool))
                .unwrap_or(false),
        }
    }

    fn from_json(v: &serde_json::Value) -> std::result::Result<Condition, String> {
        use serde_json::Value;
        let bad = || format!("tie condition {v} is not true/false/field/any/all/table");
        let list = |x: &Value| -> std::result::Result<Vec<Condition>, String> {
            x.as_array()
                .ok_or_else(bad)?
                .iter()
                .map(Condition::from_json)
                .collect()
        };
        let Value::Object(m) = v else {
            return v.as_bool().map(Condition::Const).ok_or_else(bad);
        };
        if let Some(x) = m.get("any") {
            return list(x).map(Condition::Any);
        }
        if let Some(x) = m.get("all") {
            return list(x).map(Condition::All);
        }
        if let Some(t) = m.get("table") {
            return Condition::table(t)
                .ok_or_else(|| format!("tie condition table {t} is malformed"));
        }
        let field = m.get("field").and_then(Value::as_str).ok_or_else(bad)?;
        if let Some(cfg) = m.get("cfg").and_then(Value::as_str) {
            let path = if cfg.is_empty() {
                field.to_string()
            } else {
                format!("{cfg}.{field}")
            };
            return Ok(Condition::Legacy { path });
        }
        let default = m.get("default").and_then(Value::as_bool).ok_or_else(bad)?;
        Ok(Condition::Field {
            path: field.to_string(),
            default,
        })
    }

    fn table(t: &serde_json::Value) -> Option<Condition> {
        let fields: Vec<String> = t
            .get("fields")?
            .as_array()?
            .iter()
            .map(|f| f.as_str().map(str::to_string))
            .collect::<Option<_>>()?;
        let rows = t
            .get("rows")?
            .as_array()?
            .iter()
            .map(|r| {
                let cells = r.as_array().filter(|c| c.len() == fields.len() + 1)?;
                cells
                    .iter()
                    .map(|c| {
                        if c.is_null() {
                            Some(None)
                        } else {
                            c.as_bool().map(Some)
                        }
                    })
                    .collect::<Option<Vec<_>>>()
            })
            .collect::<Option<_>>()?;
        Some(Condition::Table { fields, rows })
    }
}

impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Condition::from_json(&v).map_err(serde::de::Error::custom)
    }
}

/// A module of the tree.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct TreeNode {
    #[serde(default)]
    pub n: String,
    #[serde(default)]
    pub c: String,
    #[serde(default)]
    pub p: Vec<TensorEntry>,
    #[serde(default)]
    pub m: Vec<TreeNode>,
    #[serde(default)]
    pub b: Vec<TensorEntry>,
    #[serde(default)]
    pub repeat: Option<Repeat>,
    #[serde(default)]
    pub alias: Option<String>,
    #[serde(rename = "ref", default)]
    pub reference: Option<String>,
    /// Sub-config scope of a `ref`'d subtree (`text_config`), when the holder's differs.
    #[serde(default)]
    pub cfg: Option<String>,
}

/// A parameter or buffer entry: a plain name (in the checkpoint) or a description.
#[derive(Debug, Clone)]
pub(crate) enum TensorEntry {
    Plain(String),
    Described(DescribedTensor),
}

// By hand rather than `untagged`: serde's untagged error ("did not match any variant") would
// hide which field of a described tensor is wrong.
impl<'de> Deserialize<'de> for TensorEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(name) => Ok(TensorEntry::Plain(name)),
            v @ serde_json::Value::Object(_) => {
                let name = v.get("n").map(|n| n.to_string()).unwrap_or_default();
                serde_json::from_value(v)
                    .map(TensorEntry::Described)
                    .map_err(|e| D::Error::custom(format!("tensor {name}: {e}")))
            }
            other => Err(D::Error::custom(format!(
                "a tensor entry must be a name or an object, not {other}"
            ))),
        }
    }
}

/// A tensor the checkpoint does not hold under its model key.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct DescribedTensor {
    pub n: String,
    #[serde(default = "yes")]
    pub ckpt: bool,
    /// Buffers only: whether `state_dict()` holds it (what accelerate checks a map against).
    #[serde(default = "yes")]
    pub persistent: bool,
    #[serde(default)]
    pub dtype: Option<String>,
    #[serde(default)]
    pub shape: Option<Vec<Dim>>,
    /// The shape at the class defaults, for `"?"` dimensions.
    #[serde(default)]
    pub shape_default: Option<Vec<u64>>,
    #[serde(default)]
    pub src: Option<Conversion>,
    /// Built in the dtype the model is loaded in (`dtype` is then the float32 default).
    #[serde(default)]
    pub load_dtype: bool,
    /// The tensor exists only when this config list holds this value.
    #[serde(default)]
    pub if_listed: Option<Listed>,
}

/// `{"field": PATH, "value": V}`: a config list and the entry it must contain.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Listed {
    pub field: String,
    pub value: String,
}

fn yes() -> bool {
    true
}

/// One dimension: an integer or an expression (`"?"`: unknown).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum Dim {
    Int(u64),
    Expr(String),
}

/// A model tensor built on load from other checkpoint keys.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Conversion {
    pub keys: Vec<Vec<String>>,
    #[serde(default)]
    pub ops: Vec<Op>,
}

/// One step of a conversion (shapes only: devmap never reads the data).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(crate) enum Op {
    Stack { dim: usize },
    Concat { dim: usize },
    Chunk { dim: usize, n: u64, part: u64 },
    Transpose { dim0: usize, dim1: usize },
    Same,
}

/// A container whose children are named `0..count` (or `names` with `{i}` replaced by the
/// index: Switch Transformers' `expert_0`, `expert_1`...).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Repeat {
    #[serde(default)]
    pub count: Option<Dim>,
    pub variants: Vec<TreeNode>,
    pub select: Select,
    #[serde(default)]
    pub names: Option<String>,
}

impl Repeat {
    /// The name of child `i`.
    pub fn child_name(&self, i: u64) -> String {
        match &self.names {
            Some(template) => template.replace("{i}", &i.to_string()),
            None => i.to_string(),
        }
    }

    /// The index a child name stands for, if it is one of this container's names.
    pub fn index_of(&self, name: &str) -> Option<u64> {
        let digits = match self.names.as_deref().and_then(|t| t.split_once("{i}")) {
            Some((before, after)) => name.strip_prefix(before)?.strip_suffix(after)?,
            None => name,
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    }
}

/// How an index picks its variant.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "by", rename_all = "lowercase")]
pub(crate) enum Select {
    All {
        variant: usize,
    },
    List {
        field: String,
        values: BTreeMap<String, usize>,
    },
    Checkpoint,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_prefix() {
        assert_eq!(
            class_of_line(r#"{"class":"LlamaModel","model_type":"llama"}"#),
            Some("LlamaModel")
        );
        assert_eq!(class_of_line(r#"{"model_type":"llama","class":"X"}"#), None);
        assert_eq!(class_of_line(r#"{"class":"","x":1}"#), None);
        assert_eq!(class_of_line(r#"{"class":"A\"B","x":1}"#), None);
    }

    fn cond(json: &str) -> Condition {
        serde_json::from_str(json).unwrap()
    }

    fn cfg(json: &str) -> ModelConfig {
        ModelConfig {
            raw: serde_json::from_str(json).unwrap(),
        }
    }

    #[test]
    fn tie_conditions_read_config_json_as_transformers_does() {
        let none = serde_json::Map::new();
        let llama = cond(r#"{"field":"tie_word_embeddings","default":false}"#);
        assert!(!llama.holds(&cfg("{}"), &none));
        assert!(llama.holds(&cfg(r#"{"tie_word_embeddings":true}"#), &none));
        // llava: the text tower's flag is copied up when the top level is false.
        let llava = cond(
            r#"{"any":[{"field":"tie_word_embeddings","default":false},{"field":"text_config.tie_word_embeddings","default":false}]}"#,
        );
        assert!(llava.holds(
            &cfg(r#"{"text_config":{"tie_word_embeddings":true}}"#),
            &none
        ));
        assert!(!llava.holds(&cfg(r#"{"text_config":{}}"#), &none));
        assert!(cond("true").holds(&cfg("{}"), &none));
        let table = cond(
            r#"{"table":{"fields":["a","b"],"rows":[[true,null,true],[false,false,true],[null,null,false]]}}"#,
        );
        assert!(table.holds(&cfg(r#"{"a":true}"#), &none));
        assert!(table.holds(&cfg(r#"{"a":false,"b":false}"#), &none));
        assert!(!table.holds(&cfg("{}"), &none));
        // A non-boolean counts as absent; no matching row is false.
        assert!(!table.holds(&cfg(r#"{"a":"yes","b":true}"#), &none));
        let legacy = cond(r#"{"cfg":"text_config","field":"tie_word_embeddings"}"#);
        let defaults: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"text_config.tie_word_embeddings":true}"#).unwrap();
        assert!(legacy.holds(&cfg("{}"), &defaults));
        assert!(!legacy.holds(
            &cfg(r#"{"text_config":{"tie_word_embeddings":false}}"#),
            &defaults
        ));
        for bad in [
            r#"{"field":1}"#,
            r#"{"any":3}"#,
            r#"{"table":{"fields":["a"],"rows":[[true]]}}"#,
            "7",
        ] {
            let e = serde_json::from_str::<Condition>(bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains("tie condition"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_build_time_index_equals_a_scan_of_the_embedded_file() {
        let r = Registry::embedded().unwrap();
        assert!(!r.is_empty());
        let scanned = Registry::parse(Cow::Borrowed(EMBEDDED), Path::new("scan")).unwrap();
        assert_eq!(r.lines, scanned.lines);
        assert_eq!(r.header_len, scanned.header_len);
    }
}
