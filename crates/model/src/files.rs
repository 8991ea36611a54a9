//! Opening the files of a model folder: regular files only, and JSON/text read under a size cap.
//!
//! A FIFO, socket or device named as a shard or a config would block a reader forever (or feed it
//! without end); the file is opened without blocking and checked to be a regular file before a
//! byte is read.

use crate::error::{ModelError, Result};
use std::io::Read;
use std::path::Path;

/// Largest JSON or text file a model folder may hold (config, tokenizer, template, index): the
/// DeepSeek-V3 tokenizer.json is 7.8 MB.
pub const MAX_TEXT_BYTES: u64 = 256 << 20;

/// Opens `path` for reading if it is a regular file (symlinks followed).
pub fn open_regular(path: &Path) -> Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Opening a FIFO for reading blocks until a writer appears; O_NONBLOCK returns at once, and
        // the type check below then refuses it. Reads of a regular file ignore the flag.
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path).map_err(|e| ModelError::io(path, e))?;
    let meta = file.metadata().map_err(|e| ModelError::io(path, e))?;
    if !meta.is_file() {
        let kind = if meta.is_dir() { "a folder" } else { "not a regular file (a FIFO, socket or device?)" };
        return Err(ModelError::io(path, std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("is {kind}"))));
    }
    Ok(file)
}

/// The bytes of a regular file of at most `max` bytes.
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>> {
    let file = open_regular(path)?;
    let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    if len > max {
        let msg = format!("is {len} bytes; at most {max} are read");
        return Err(ModelError::io(path, std::io::Error::new(std::io::ErrorKind::InvalidData, msg)));
    }
    let mut buf = Vec::with_capacity(len as usize);
    // `take`: a file that grows while read still stops at the cap.
    file.take(max + 1).read_to_end(&mut buf).map_err(|e| ModelError::io(path, e))?;
    if buf.len() as u64 > max {
        let msg = format!("grew past {max} bytes while read");
        return Err(ModelError::io(path, std::io::Error::new(std::io::ErrorKind::InvalidData, msg)));
    }
    Ok(buf)
}

/// A UTF-8 text file of at most [`MAX_TEXT_BYTES`].
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = read_regular(path, MAX_TEXT_BYTES)?;
    String::from_utf8(bytes)
        .map_err(|_| ModelError::io(path, std::io::Error::new(std::io::ErrorKind::InvalidData, "is not UTF-8 text")))
}

/// A JSON file of at most [`MAX_TEXT_BYTES`].
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json { path: path.into(), source })
}

/// Folders `.{name}.{tag}-{pid}` beside `path` (the temporary names of atomic writes: a
/// checkpoint's `tmp`/`old`, a conversion's `partial`) left by processes that no longer run, with
/// their tag. A live process's folders are its own business and are not listed.
pub fn stale_siblings(path: &Path, tags: &[&str]) -> Vec<(std::path::PathBuf, String)> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return vec![];
    };
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    let Ok(entries) = std::fs::read_dir(parent) else { return vec![] };
    let prefix = format!(".{name}.");
    let mut out: Vec<_> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let file = e.file_name().to_str()?.to_string();
            let (tag, pid) = file.strip_prefix(&prefix)?.rsplit_once('-')?;
            let pid: u32 = pid.parse().ok()?;
            (tags.contains(&tag) && !process_alive(pid)).then(|| (e.path(), tag.to_string()))
        })
        .collect();
    out.sort();
    out
}

/// Whether a process with this id runs (Linux: `/proc/<pid>`); this process counts as running.
fn process_alive(pid: u32) -> bool {
    pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
}

/// A file written under a temporary name beside its final one (`<path>.<ext>.tmp`), synced and
/// renamed into place by [`AtomicFile::finish`]; on any error the temporary file is removed, so
/// a reader never sees a partial file under the final name.
pub struct AtomicFile {
    path: std::path::PathBuf,
    tmp: std::path::PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl AtomicFile {
    /// Starts `path` (the temporary file's extension is `ext.tmp`) with `head` as its first bytes.
    pub fn create(path: &Path, ext: &str, head: &[u8]) -> Result<Self> {
        use std::io::Write;
        let tmp = path.with_extension(format!("{ext}.tmp"));
        let open = || -> std::io::Result<std::io::BufWriter<std::fs::File>> {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            f.write_all(head)?;
            Ok(f)
        };
        match open() {
            Ok(file) => Ok(AtomicFile { path: path.to_path_buf(), tmp, file }),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(ModelError::io(path, e))
            }
        }
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        self.file.write_all(bytes).map_err(|e| self.fail(e))
    }

    /// Removes the temporary file; the error, against the final path.
    pub fn fail(&self, e: std::io::Error) -> ModelError {
        let _ = std::fs::remove_file(&self.tmp);
        ModelError::io(&self.path, e)
    }

    /// An [`ErrorKind::InvalidInput`](std::io::ErrorKind::InvalidInput) failure with `msg`.
    pub fn fail_input(&self, msg: String) -> ModelError {
        self.fail(std::io::Error::new(std::io::ErrorKind::InvalidInput, msg))
    }

    pub fn finish(self) -> Result<()> {
        let AtomicFile { path, tmp, file } = self;
        let done = file
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .and_then(|_| std::fs::rename(&tmp, &path));
        done.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            ModelError::io(&path, e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_fifos_folders_and_oversized_files_without_blocking() {
        let d = std::env::temp_dir().join(format!("dsv3-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a plain POSIX call on a path this test owns.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_regular(&fifo).unwrap_err().to_string();
        assert!(e.contains("fifo") && e.contains("not a regular file"), "{e}");
        assert!(open_regular(&d).unwrap_err().to_string().contains("a folder"));
        let big = d.join("big.json");
        std::fs::write(&big, vec![b' '; 100]).unwrap();
        assert!(read_regular(&big, 99).unwrap_err().to_string().contains("at most 99"));
        assert_eq!(read_regular(&big, 100).unwrap().len(), 100);
        std::fs::remove_dir_all(&d).ok();
    }
}
