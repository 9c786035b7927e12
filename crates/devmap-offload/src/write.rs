//! Writing an offload folder from a model read from safetensors and a device map.
//!
//! Order of operations, so that an interruption at any point leaves a folder accelerate and
//! [`crate::OffloadFolder`] read as it was before (or as it is after):
//!
//! 1. stale temporary files (`.devmap-tmp-*`) of an interrupted run are removed;
//! 2. each `.dat` file is streamed into a temporary file, renamed into place, and its checksum
//!    appended to `devmap-checksums.journal` (in parallel across tensors, through bounded
//!    mmap windows of the source: memory stays bounded whatever the model size); a file that
//!    replaces an existing one is fsynced before its rename, since an index may already name it;
//! 3. every new `.dat` file and the folder are fsynced (one wait at the end, like `cp && sync`,
//!    instead of a stall after every file), then `devmap-checksums.json` is replaced through a
//!    rename;
//! 4. `index.json` is replaced through a rename, last: only now do readers see the new entries;
//! 5. the journal is removed.
//!
//! A rerun skips every `.dat` file whose checksum (from the checksums file or the journal) matches
//! a fresh hash of the file.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use devmap_core::safetensors::Header;
use devmap_core::validate::tensor_devices;
use devmap_core::{DType, Device, DeviceMap, Model, Problem, SizeRules, TensorId};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::format::{
    index_bytes, index_dtype_name, journal_line, read_index_object, read_journal, Checksum,
    Checksums, CHECKSUMS_FILE, INDEX_FILE, JOURNAL_FILE, TEMP_PREFIX,
};
use crate::map::{stream_range, DEFAULT_WINDOW_BYTES};
use crate::paths::{
    create_new, dat_path, ensure_folder, file_metadata, open_regular, rename_into_place,
    sync_folder, temp_path, write_atomic,
};

/// The form of the index entries devmap writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Form {
    /// Entries point into the source safetensors files (`{"safetensors_file", "weight_name",
    /// "dtype"}`, the form transformers 5 writes): nothing is copied, only hashed.
    #[default]
    Reference,
    /// One `{name}.dat` file per tensor (`{"dtype", "shape"}`, the form accelerate's
    /// `offload_state_dict` writes). The few tensors accelerate cannot read back from a `.dat`
    /// file (no elements; 0-d uint64) keep a reference entry.
    Copy,
}

/// How to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffloadOptions {
    /// Reference the source files, or copy into `.dat` files.
    pub form: Form,
    /// Make the data durable before the index names it (across power loss, not only across a
    /// crash of the process): every `.dat` file is fsynced before `index.json` is written, a file
    /// replacing an existing one before its rename, and the folder after the renames.
    pub fsync: bool,
    /// Bytes of a source file mapped at a time by each thread.
    pub window_bytes: usize,
    /// Test hook: behave as if the process died once this many bytes of `.dat` data have been
    /// written in this run: the write stops mid-file, the temporary file and the journal are left
    /// as they are, nothing else is renamed, and [`Error::Interrupted`] is returned. `None` (the
    /// default) in real use.
    pub fail_after_bytes: Option<u64>,
}

impl Default for OffloadOptions {
    fn default() -> Self {
        OffloadOptions {
            form: Form::Reference,
            fsync: true,
            window_bytes: DEFAULT_WINDOW_BYTES,
            fail_after_bytes: None,
        }
    }
}

/// What a write did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffloadReport {
    /// Disk-mapped tensors now in the index.
    pub tensors: usize,
    /// `.dat` files written in this run.
    pub written: usize,
    /// `.dat` files found complete and verified, left as they were.
    pub skipped: usize,
    /// Entries pointing into safetensors files.
    pub referenced: usize,
    /// Stored bytes of all the disk-mapped tensors.
    pub bytes: u64,
    /// Bytes written to `.dat` files in this run.
    pub bytes_written: u64,
    /// Temporary files of an interrupted run that were removed.
    pub stale_temp_files: usize,
}

/// The tensors `map` sends to disk, in the model's order. The map must name only modules and
/// tensors of the model, without overlapping keys, and cover every tensor (what `devmap plan`
/// prints always does).
pub fn disk_tensors(model: &Model, map: &DeviceMap) -> Result<Vec<TensorId>> {
    let report = devmap_core::validate(model, map, None, SizeRules::default());
    let fatal: Vec<String> = report
        .problems
        .iter()
        .filter(|p| {
            matches!(
                p,
                Problem::UnknownKey(_)
                    | Problem::OverlappingKeys { .. }
                    | Problem::Uncovered { .. }
            )
        })
        .map(ToString::to_string)
        .collect();
    if !fatal.is_empty() {
        return Err(Error::Plan {
            model: model.name.clone(),
            reason: fatal.join("; "),
        });
    }
    Ok(tensor_devices(model, map)
        .into_iter()
        .enumerate()
        .filter(|(_, d)| *d == Some(Device::Disk))
        .map(|(id, _)| id)
        .collect())
}

/// One tensor to offload: where its bytes are and what to call it.
struct Job<'m> {
    name: &'m str,
    dtype: DType,
    shape: &'m [u64],
    /// Absolute path of the source safetensors file.
    file: PathBuf,
    range: Range<u64>,
    /// Its name inside the source file (differs from `name` for a tied head restored from config.json).
    weight_name: String,
}

impl Job<'_> {
    fn bytes(&self) -> u64 {
        self.range.end - self.range.start
    }
}

/// Offload every tensor `map` sends to disk into `folder` (created if needed), merging into an
/// existing `index.json`. See the module docs for the order of operations.
pub fn offload(
    model: &Model,
    map: &DeviceMap,
    folder: &Path,
    options: &OffloadOptions,
) -> Result<OffloadReport> {
    offload_with_progress(model, map, folder, options, &|_| {})
}

/// [`offload`], calling `progress` with each run of bytes copied, hashed or verified (from several
/// threads; the calls add up to [`OffloadReport::bytes`]).
pub fn offload_with_progress(
    model: &Model,
    map: &DeviceMap,
    folder: &Path,
    options: &OffloadOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<OffloadReport> {
    let ids = disk_tensors(model, map)?;
    offload_tensors(model, &ids, folder, options, progress)
}

/// [`offload_with_progress`] for an explicit list of tensors.
pub fn offload_tensors(
    model: &Model,
    ids: &[TensorId],
    folder: &Path,
    options: &OffloadOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<OffloadReport> {
    let (jobs, sources) = plan_jobs(model, ids)?;
    if options.form == Form::Copy {
        for job in &jobs {
            dat_path(folder, job.name)?;
        }
    }
    ensure_folder(folder)?;
    let mut report = OffloadReport {
        tensors: jobs.len(),
        bytes: jobs.iter().map(Job::bytes).sum(),
        stale_temp_files: remove_stale_temp_files(folder)?,
        ..OffloadReport::default()
    };
    let mut index = read_index_object(folder)?.unwrap_or_default();
    let mut checksums = Checksums::read(folder)?;
    let mut known = checksums.clone();
    for (name, c) in read_journal(folder)? {
        known.insert(&name, c);
    }

    // Largest first, so the last tensors to finish are small ones and every core stays busy.
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(jobs[i].bytes()));
    let ctx = RunCtx {
        folder,
        options,
        sources: &sources,
        written: AtomicU64::new(0),
        progress,
        journal: if options.form == Form::Copy {
            Some(Mutex::new(open_journal(folder)?))
        } else {
            None
        },
    };
    let outcomes: Vec<(usize, Outcome)> = order
        .par_iter()
        .map(|&i| {
            let job = &jobs[i];
            let outcome = match options.form {
                Form::Copy if dat_loadable_by_accelerate(job) => {
                    ctx.copy(job, known.get(job.name))?
                }
                _ => Outcome::Referenced(ctx.hash_source(job)?),
            };
            Ok((i, outcome))
        })
        .collect::<Result<_>>()?;
    let mut by_job: Vec<Option<Outcome>> = vec![None; jobs.len()];
    for (i, o) in outcomes {
        by_job[i] = Some(o);
    }
    let by_job_kind: Vec<bool> = by_job
        .iter()
        .map(|o| matches!(o, Some(Outcome::Written(_))))
        .collect();

    for (job, outcome) in jobs.iter().zip(by_job) {
        let outcome = outcome.expect("every job ran");
        let entry = match outcome {
            Outcome::Referenced(c) => {
                report.referenced += 1;
                checksums.insert(job.name, c);
                serde_json::json!({
                    "safetensors_file": job.file.to_string_lossy(),
                    "weight_name": job.weight_name,
                    "dtype": index_dtype_name(job.dtype),
                })
            }
            Outcome::Written(c) | Outcome::Skipped(c) => {
                if matches!(outcome, Outcome::Written(_)) {
                    report.written += 1;
                    report.bytes_written += c.bytes;
                } else {
                    report.skipped += 1;
                }
                checksums.insert(job.name, c);
                serde_json::json!({"dtype": index_dtype_name(job.dtype), "shape": job.shape})
            }
        };
        // Like Python's dict.update: an existing key keeps its place, a new one goes last.
        index.insert(job.name.to_string(), entry);
    }
    drop(ctx);
    if options.fsync {
        let written: Vec<&Job<'_>> = jobs
            .iter()
            .zip(&by_job_kind)
            .filter(|(_, w)| **w)
            .map(|(j, _)| j)
            .collect();
        written.par_iter().try_for_each(|job| {
            let path = dat_path(folder, job.name)?;
            let f = open_regular(&path)?.ok_or_else(|| {
                Error::io(
                    &path,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "vanished before its fsync"),
                )
            })?;
            f.sync_data().map_err(|e| Error::io(&path, e))
        })?;
        sync_folder(folder)?;
    }
    if !jobs.is_empty() {
        write_atomic(
            folder,
            CHECKSUMS_FILE,
            &checksums.to_json_bytes(),
            options.fsync,
        )?;
        write_atomic(folder, INDEX_FILE, &index_bytes(&index), options.fsync)?;
    }
    match std::fs::remove_file(folder.join(JOURNAL_FILE)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(folder.join(JOURNAL_FILE), e)),
    }
    if options.fsync {
        sync_folder(folder)?;
    }
    Ok(report)
}

/// Whether accelerate 1.15's `load_offloaded_weight` can read this tensor from a `.dat` file. It
/// cannot when the tensor has no elements (numpy cannot map an empty file) or is a 0-d uint64
/// (`torch.tensor` rejects the `numpy.uint64` scalar it gets); such tensors keep a reference entry,
/// which accelerate reads through safetensors.
fn dat_loadable_by_accelerate(job: &Job<'_>) -> bool {
    job.bytes() > 0 && !(job.shape.is_empty() && job.dtype == DType::U64)
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Referenced(Checksum),
    Written(Checksum),
    Skipped(Checksum),
}

/// Where each disk tensor's bytes are, checked against a fresh read of each source header (the
/// file may have changed since the model was loaded), with the source files opened once.
fn plan_jobs<'m>(
    model: &'m Model,
    ids: &[TensorId],
) -> Result<(Vec<Job<'m>>, HashMap<PathBuf, File>)> {
    // A tied name without bytes of its own (a head restored from config.json) reads its group owner's.
    let mut group_source: HashMap<TensorId, TensorId> = HashMap::new();
    for group in model.tied_groups() {
        if let Some(&with_bytes) = group
            .iter()
            .min_by_key(|&&t| (model.tensor(t).source.is_none(), t))
        {
            if model.tensor(with_bytes).source.is_some() {
                for &t in group {
                    group_source.insert(t, with_bytes);
                }
            }
        }
    }
    let mut headers: HashMap<PathBuf, Header> = HashMap::new();
    let mut files: HashMap<PathBuf, File> = HashMap::new();
    let mut jobs = Vec::with_capacity(ids.len());
    for &id in ids {
        let tensor = model.tensor(id);
        let src_id = if tensor.source.is_some() {
            id
        } else {
            *group_source.get(&id).ok_or_else(|| Error::NoSource {
                tensor: tensor.name.clone(),
            })?
        };
        let src_tensor = model.tensor(src_id);
        let source = src_tensor
            .source
            .as_ref()
            .expect("chosen for having a source");
        let file = std::path::absolute(&source.file).map_err(|e| Error::io(&source.file, e))?;
        if !headers.contains_key(&file) {
            let header = Header::read(&file)?;
            let handle = File::open(&file).map_err(|e| Error::io(&file, e))?;
            headers.insert(file.clone(), header);
            files.insert(file.clone(), handle);
        }
        let header = &headers[&file];
        let entry = header
            .tensors
            .iter()
            .find(|e| e.name == src_tensor.name && e.byte_range == source.byte_range)
            .or_else(|| {
                header
                    .tensors
                    .iter()
                    .find(|e| !e.byte_range.is_empty() && e.byte_range == source.byte_range)
            })
            .ok_or_else(|| Error::Source {
                path: file.clone(),
                tensor: tensor.name.clone(),
                reason: format!(
                    "no tensor of the file holds bytes {}..{} any more (the file changed since the model was read)",
                    source.byte_range.start, source.byte_range.end
                ),
            })?;
        if entry.dtype != tensor.dtype || entry.shape != tensor.shape {
            return Err(Error::Source {
                path: file.clone(),
                tensor: tensor.name.clone(),
                reason: format!(
                    "the file holds {} {} {:?} there, the model expects {} {:?}",
                    entry.name, entry.dtype, entry.shape, tensor.dtype, tensor.shape
                ),
            });
        }
        jobs.push(Job {
            name: &tensor.name,
            dtype: tensor.dtype,
            shape: &tensor.shape,
            file,
            range: entry.byte_range.clone(),
            weight_name: entry.name.clone(),
        });
    }
    Ok((jobs, files))
}

struct RunCtx<'a> {
    folder: &'a Path,
    options: &'a OffloadOptions,
    sources: &'a HashMap<PathBuf, File>,
    /// `.dat` bytes written so far in this run (for the `fail_after_bytes` hook).
    written: AtomicU64,
    progress: &'a (dyn Fn(u64) + Sync),
    journal: Option<Mutex<File>>,
}

impl RunCtx<'_> {
    fn hash_source(&self, job: &Job<'_>) -> Result<Checksum> {
        let file = &self.sources[&job.file];
        stream_range(
            file,
            &job.file,
            job.range.clone(),
            self.options.window_bytes,
            |s| {
                (self.progress)(s.len() as u64);
                Ok(())
            },
        )
    }

    fn copy(&self, job: &Job<'_>, known: Option<Checksum>) -> Result<Outcome> {
        let dest = dat_path(self.folder, job.name)?;
        if let Some(c) = self.verified_existing(&dest, job, known)? {
            return Ok(Outcome::Skipped(c));
        }
        let temp = temp_path(self.folder, &format!("{}.dat", job.name));
        // An existing file may be named by the current index: its replacement must be durable
        // before the rename. A new name is named by no index until step 4, so its fsync can wait.
        let replaces = file_metadata(&dest)?.is_some();
        let result = self.write_temp(job, &temp, replaces);
        let checksum = match result {
            Ok(c) => c,
            // A simulated crash leaves the half-written file, as a real one would.
            Err(e @ Error::Interrupted { .. }) => return Err(e),
            Err(e) => {
                let _ = std::fs::remove_file(&temp);
                return Err(e);
            }
        };
        if let Err(e) = rename_into_place(&temp, &dest) {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
        if let Some(journal) = &self.journal {
            let path = self.folder.join(JOURNAL_FILE);
            let mut f = journal.lock().unwrap_or_else(|p| p.into_inner());
            f.write_all(&journal_line(job.name, checksum))
                .map_err(|e| Error::io(path, e))?;
        }
        Ok(Outcome::Written(checksum))
    }

    fn write_temp(&self, job: &Job<'_>, temp: &Path, sync_now: bool) -> Result<Checksum> {
        let mut out = create_new(temp)?;
        let file = &self.sources[&job.file];
        let limit = self.options.fail_after_bytes;
        let checksum = stream_range(
            file,
            &job.file,
            job.range.clone(),
            self.options.window_bytes,
            |slice| {
                let len = slice.len() as u64;
                let before = self.written.fetch_add(len, Ordering::Relaxed);
                if let Some(limit) = limit {
                    if before + len > limit {
                        let keep = limit.saturating_sub(before) as usize;
                        out.write_all(&slice[..keep])
                            .map_err(|e| Error::io(temp, e))?;
                        return Err(Error::Interrupted { bytes: limit });
                    }
                }
                out.write_all(slice).map_err(|e| Error::io(temp, e))?;
                (self.progress)(len);
                Ok(())
            },
        )?;
        if self.options.fsync && sync_now {
            out.sync_data().map_err(|e| Error::io(temp, e))?;
        }
        Ok(checksum)
    }

    /// The checksum of `dest` if it already holds this tensor's bytes: right length, and a fresh
    /// hash equal to the one recorded when it was written.
    fn verified_existing(
        &self,
        dest: &Path,
        job: &Job<'_>,
        known: Option<Checksum>,
    ) -> Result<Option<Checksum>> {
        let Some(known) = known.filter(|c| c.bytes == job.bytes()) else {
            return Ok(None);
        };
        match file_metadata(dest)? {
            Some(m) if m.len() == job.bytes() => {}
            _ => return Ok(None),
        }
        let Some(f) = open_regular(dest)? else {
            return Ok(None);
        };
        let fresh = stream_range(&f, dest, 0..job.bytes(), self.options.window_bytes, |s| {
            (self.progress)(s.len() as u64);
            Ok(())
        })?;
        Ok((fresh == known).then_some(fresh))
    }
}

fn open_journal(folder: &Path) -> Result<File> {
    let path = folder.join(JOURNAL_FILE);
    file_metadata(&path)?;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::io(path, e))
}

/// Remove `.devmap-tmp-*` files left by an interrupted write (they are never referenced).
fn remove_stale_temp_files(folder: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(folder).map_err(|e| Error::io(folder, e))? {
        let entry = entry.map_err(|e| Error::io(folder, e))?;
        let is_temp = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(TEMP_PREFIX));
        let ty = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
        // Removing a link removes the link, never its target.
        if is_temp && (ty.is_file() || ty.is_symlink()) {
            std::fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
            removed += 1;
        }
    }
    Ok(removed)
}
