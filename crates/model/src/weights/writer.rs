//! Writing safetensors files: whole, or streamed tensor by tensor; atomically either way.

use crate::error::Result;
use crate::files::AtomicFile;
use std::path::Path;

/// Writes tensors as one safetensors file, atomically (temporary file in the same folder, then
/// rename). Each entry: name, dtype string, shape, little-endian bytes.
pub fn write_safetensors(path: &Path, tensors: &[(String, &str, Vec<usize>, Vec<u8>)]) -> Result<()> {
    let entries: Vec<(String, &str, Vec<usize>, usize)> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), *d, s.clone(), b.len())).collect();
    let mut w = SafetensorsWriter::create(path, &entries)?;
    for (_, _, _, b) in tensors {
        w.write(b)?;
    }
    w.finish()
}

/// A safetensors file written tensor by tensor: the header (names, dtypes, shapes, byte sizes)
/// first, then each tensor's bytes in that order, so no more than one tensor need be in memory.
/// Written under a temporary name and renamed by [`SafetensorsWriter::finish`].
pub struct SafetensorsWriter {
    file: AtomicFile,
    /// The byte sizes the header announced, how many tensors were written, and how many bytes of
    /// the one being written (streamed in parts) are in.
    lens: Vec<usize>,
    written: usize,
    partial: usize,
    /// Header and data bytes of the whole file.
    file_len: u64,
}

impl SafetensorsWriter {
    pub fn create(path: &Path, entries: &[(String, &str, Vec<usize>, usize)]) -> Result<Self> {
        Self::create_with_metadata(path, entries, None)
    }

    /// [`SafetensorsWriter::create`] with a `__metadata__` map of strings (torch writes
    /// `{"format": "pt"}`).
    pub fn create_with_metadata(
        path: &Path,
        entries: &[(String, &str, Vec<usize>, usize)],
        metadata: Option<&[(&str, &str)]>,
    ) -> Result<Self> {
        let mut header = serde_json::Map::new();
        if let Some(m) = metadata {
            let m: serde_json::Map<String, serde_json::Value> =
                m.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect();
            header.insert("__metadata__".into(), serde_json::Value::Object(m));
        }
        let mut off = 0usize;
        for (name, dtype, shape, len) in entries {
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + len]}),
            );
            off += len;
        }
        let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).expect("JSON of a map");
        while !(h.len() + 8).is_multiple_of(8) {
            h.push(b' ');
        }
        let mut head = (h.len() as u64).to_le_bytes().to_vec();
        head.extend(&h);
        let file = AtomicFile::create(path, "safetensors", &head)?;
        let lens = entries.iter().map(|e| e.3).collect();
        let file_len = (8 + h.len() + off) as u64;
        Ok(SafetensorsWriter { file, lens, written: 0, partial: 0, file_len })
    }

    /// The length of the file being written.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The next bytes, in header order, however they are split: a tensor may arrive in parts
    /// (bands of rows), several tensors in one part. More than the header announced is an error.
    pub fn write_part(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let Some(&len) = self.lens.get(self.written) else {
                let msg = format!("{} bytes past the {} tensors the header announced", bytes.len(), self.lens.len());
                return Err(self.file.fail_input(msg));
            };
            let n = (len - self.partial).min(bytes.len());
            self.file.write_all(&bytes[..n])?;
            (self.partial, bytes) = (self.partial + n, &bytes[n..]);
            if self.partial == len {
                (self.written, self.partial) = (self.written + 1, 0);
            }
        }
        // Empty tensors are complete as soon as they are reached.
        while self.partial == 0 && self.lens.get(self.written) == Some(&0) {
            self.written += 1;
        }
        Ok(())
    }

    /// The next tensor's bytes (as many as the header announced).
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        if self.partial != 0 || self.lens.get(self.written) != Some(&bytes.len()) {
            let msg = format!(
                "tensor {} has {} bytes; the header announced {:?}",
                self.written,
                bytes.len(),
                self.lens.get(self.written)
            );
            return Err(self.file.fail_input(msg));
        }
        self.written += 1;
        self.file.write_all(bytes)
    }

    pub fn finish(mut self) -> Result<()> {
        while self.partial == 0 && self.lens.get(self.written) == Some(&0) {
            self.written += 1;
        }
        if self.written != self.lens.len() || self.partial != 0 {
            let msg = format!("{} of {} tensors written", self.written, self.lens.len());
            return Err(self.file.fail_input(msg));
        }
        self.file.finish()
    }
}
