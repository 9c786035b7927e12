//! Turning tensor names into file names safely, and touching files of the folder without following
//! symbolic links.
//!
//! A tensor name becomes exactly one file name, `{name}.dat`, directly inside the folder (accelerate's
//! `os.path.join(folder, f"{name}.dat")`). A name holding `/`, `\` or NUL, an empty name, or one whose
//! file name would exceed 255 bytes is rejected, so no name can reach outside the folder (`..` can
//! only appear inside a single file name such as `a..b.dat`, never as a path component). devmap never
//! reads through, writes through or replaces a symbolic link inside the folder; the folder itself may
//! be a link the user chose.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::TEMP_PREFIX;

/// Longest file name most filesystems accept (ext4, xfs, btrfs, APFS: 255 bytes).
const MAX_FILE_NAME: usize = 255;

/// Why `name` cannot be a tensor file name, or `None` if it can.
pub fn unsafe_name_reason(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("the name is empty".to_string());
    }
    if name.contains('\0') {
        return Some("the name contains NUL".to_string());
    }
    if name.starts_with('/') {
        return Some("the name is an absolute path".to_string());
    }
    if name.contains('/') {
        let reason = if name.split('/').any(|c| c == "..") {
            "the name has a `..` path component and would escape the folder"
        } else {
            "the name contains `/`, which would put the file in a sub-folder"
        };
        return Some(reason.to_string());
    }
    if name.contains('\\') {
        return Some("the name contains a backslash, a path separator on Windows".to_string());
    }
    if name.len() + ".dat".len() > MAX_FILE_NAME {
        return Some(format!(
            "its file name would be {} bytes, more than the {MAX_FILE_NAME} a file name may have",
            name.len() + 4
        ));
    }
    None
}

/// `folder/{name}.dat`, or an error naming the tensor if the name is not a safe file name.
pub fn dat_path(folder: &Path, name: &str) -> Result<PathBuf> {
    if let Some(reason) = unsafe_name_reason(name) {
        return Err(Error::UnsafeName {
            tensor: name.to_string(),
            reason,
        });
    }
    Ok(folder.join(format!("{name}.dat")))
}

/// A temporary name in `folder` for the file that will become `final_name`: fixed length whatever
/// the tensor name, and unique per process.
pub(crate) fn temp_path(folder: &Path, final_name: &str) -> PathBuf {
    let h = xxhash_rust::xxh3::xxh3_64(final_name.as_bytes());
    folder.join(format!("{TEMP_PREFIX}{h:016x}.{}", std::process::id()))
}

/// What is at `path`, not following a link: `Ok(None)` if nothing, `Ok(Some(meta))` for a regular
/// file, an error for a link or anything else.
pub(crate) fn file_metadata(path: &Path) -> Result<Option<std::fs::Metadata>> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::Symlink {
            path: path.to_path_buf(),
        }),
        Ok(m) if m.is_file() => Ok(Some(m)),
        Ok(_) => Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Open a regular file of the folder for reading, refusing links.
pub(crate) fn open_regular(path: &Path) -> Result<Option<File>> {
    if file_metadata(path)?.is_none() {
        return Ok(None);
    }
    // Between the check and the open a link could be swapped in; devmap assumes one writer per folder.
    File::open(path).map(Some).map_err(|e| Error::io(path, e))
}

/// The text of a regular file of the folder, `None` if it does not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<String>> {
    let Some(mut f) = open_regular(path)? else {
        return Ok(None);
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut f, &mut text).map_err(|e| Error::io(path, e))?;
    Ok(Some(text))
}

/// Create `folder` if needed and check it is a directory.
pub(crate) fn ensure_folder(folder: &Path) -> Result<()> {
    std::fs::create_dir_all(folder).map_err(|e| Error::io(folder, e))?;
    let meta = std::fs::metadata(folder).map_err(|e| Error::io(folder, e))?;
    if !meta.is_dir() {
        return Err(Error::io(
            folder,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a directory"),
        ));
    }
    Ok(())
}

/// Create a new file for writing; fails if anything, a link included, is already at `path`
/// (`O_CREAT | O_EXCL` never follows a link).
pub(crate) fn create_new(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// Move a finished temporary file onto `dest`, refusing to replace a link (a rename would replace
/// the link itself, but a link there means someone else arranged the folder: better to say so).
pub(crate) fn rename_into_place(temp: &Path, dest: &Path) -> Result<()> {
    file_metadata(dest)?;
    std::fs::rename(temp, dest).map_err(|e| Error::io(dest, e))
}

/// Write `bytes` to `folder/name` through a temporary file and a rename, so readers see the old
/// file or the new one, never a part.
pub(crate) fn write_atomic(folder: &Path, name: &str, bytes: &[u8], fsync: bool) -> Result<()> {
    let dest = folder.join(name);
    let temp = temp_path(folder, name);
    let result = (|| {
        let mut f = create_new(&temp)?;
        f.write_all(bytes).map_err(|e| Error::io(&temp, e))?;
        if fsync {
            f.sync_all().map_err(|e| Error::io(&temp, e))?;
        }
        drop(f);
        rename_into_place(&temp, &dest)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Make renames inside `folder` durable.
pub(crate) fn sync_folder(folder: &Path) -> Result<()> {
    File::open(folder)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(folder, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_names() {
        for (name, needle) in [
            ("", "empty"),
            ("a\0b", "NUL"),
            ("/etc/passwd", "absolute"),
            ("../x", "`..`"),
            ("a/../../b", "`..`"),
            ("a/b", "sub-folder"),
            ("a\\..\\b", "backslash"),
        ] {
            let reason = unsafe_name_reason(name).unwrap_or_default();
            assert!(reason.contains(needle), "{name:?}: {reason}");
        }
        let long = "w".repeat(252);
        assert!(unsafe_name_reason(&long).unwrap().contains("256 bytes"));
        for ok in [
            "model.layers.0.weight",
            "..",
            "a..b",
            ".hidden",
            "x".repeat(251).as_str(),
        ] {
            assert_eq!(unsafe_name_reason(ok), None, "{ok}");
        }
        let err = dat_path(Path::new("/f"), "../x").unwrap_err().to_string();
        assert!(err.contains("\"../x\""), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn links_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"secret").unwrap();
        let link = dir.path().join("index.json");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let err = read_optional(&link).unwrap_err();
        assert!(matches!(err, Error::Symlink { .. }), "{err}");
        let err = write_atomic(dir.path(), "index.json", b"{}", false).unwrap_err();
        assert!(matches!(err, Error::Symlink { .. }), "{err}");
        assert_eq!(std::fs::read(&outside).unwrap(), b"secret");
    }
}
