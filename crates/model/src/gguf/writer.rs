//! Writing GGUF v3 files: metadata and tensor infos first, then each tensor's bytes in order (one
//! tensor in memory at a time), under a temporary name renamed at the end.

use super::Value;
use crate::error::{ModelError, Result};
use crate::files::AtomicFile;
use dsv3_kernels::GgmlType;
use std::path::Path;

/// Data alignment (llama.cpp's default; `general.alignment` is not written).
const ALIGN: usize = 32;

/// One tensor to be written: name, ggml dims (innermost first), type.
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<usize>,
    pub kind: GgmlType,
}

impl TensorSpec {
    /// Its bytes; `None` for a shape that is not whole blocks or overflows.
    pub fn bytes(&self) -> Option<usize> {
        let rows = self.dims[1..].iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        self.kind.row_bytes(*self.dims.first()?)?.checked_mul(rows)
    }
}

pub struct GgufWriter {
    file: AtomicFile,
    lens: Vec<usize>,
    written: usize,
    /// Bytes of the tensor being streamed by [`GgufWriter::write_part`].
    partial: usize,
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    h.extend((s.len() as u64).to_le_bytes());
    h.extend(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::Str(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(h: &mut Vec<u8>, v: &Value) -> std::result::Result<(), String> {
    match v {
        Value::U8(x) => h.push(*x),
        Value::I8(x) => h.push(*x as u8),
        Value::U16(x) => h.extend(x.to_le_bytes()),
        Value::I16(x) => h.extend(x.to_le_bytes()),
        Value::U32(x) => h.extend(x.to_le_bytes()),
        Value::I32(x) => h.extend(x.to_le_bytes()),
        Value::F32(x) => h.extend(x.to_le_bytes()),
        Value::Bool(x) => h.push(*x as u8),
        Value::Str(s) => put_str(h, s),
        Value::U64(x) => h.extend(x.to_le_bytes()),
        Value::I64(x) => h.extend(x.to_le_bytes()),
        Value::F64(x) => h.extend(x.to_le_bytes()),
        Value::Array(a) => {
            let inner = a.first().map_or(4, type_id);
            if a.iter().any(|x| type_id(x) != inner || matches!(x, Value::Array(_))) {
                return Err("a GGUF array holds values of one non-array type".into());
            }
            h.extend(inner.to_le_bytes());
            h.extend((a.len() as u64).to_le_bytes());
            for x in a {
                put_value(h, x)?;
            }
        }
    }
    Ok(())
}

impl GgufWriter {
    /// Starts `path` with `metadata` and the infos of `tensors`, whose bytes [`GgufWriter::write`]
    /// then takes in this order.
    pub fn create(path: &Path, metadata: &[(String, Value)], tensors: &[TensorSpec]) -> Result<Self> {
        let bad = |msg: String| ModelError::Gguf { path: path.into(), msg };
        let mut h = b"GGUF".to_vec();
        h.extend(3u32.to_le_bytes());
        h.extend((tensors.len() as u64).to_le_bytes());
        h.extend((metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut h, k);
            h.extend(type_id(v).to_le_bytes());
            put_value(&mut h, v).map_err(|e| bad(format!("`{k}`: {e}")))?;
        }
        let mut lens = vec![];
        let mut off = 0usize;
        for t in tensors {
            let n = t
                .bytes()
                .ok_or_else(|| bad(format!("`{}`: dims {:?} are not whole {} blocks", t.name, t.dims, t.kind)))?;
            put_str(&mut h, &t.name);
            h.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                h.extend((*d as u64).to_le_bytes());
            }
            h.extend(t.kind.id().to_le_bytes());
            h.extend((off as u64).to_le_bytes());
            lens.push(n);
            off = off.checked_add(n.next_multiple_of(ALIGN)).ok_or_else(|| bad("file size overflows".into()))?;
        }
        h.resize(h.len().next_multiple_of(ALIGN), 0);
        let file = AtomicFile::create(path, "gguf", &h)?;
        Ok(GgufWriter { file, lens, written: 0, partial: 0 })
    }

    /// The next tensor's bytes, exactly as many as its info announced.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let want = self.lens.get(self.written).copied();
        if self.partial != 0 || want != Some(bytes.len()) {
            let msg = format!("tensor {} has {} bytes; its info announced {want:?}", self.written, bytes.len());
            return Err(self.file.fail_input(msg));
        }
        let pad = bytes.len().next_multiple_of(ALIGN) - bytes.len();
        self.written += 1;
        self.file.write_all(bytes)?;
        self.file.write_all(&[0u8; ALIGN][..pad])
    }

    /// The next bytes of the tensor being written (rows as they are made); the tensor ends when
    /// its announced size is in. Bytes past it are an error.
    pub fn write_part(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(&len) = self.lens.get(self.written) else {
            let msg = format!("{} bytes past the {} tensors announced", bytes.len(), self.lens.len());
            return Err(self.file.fail_input(msg));
        };
        if self.partial + bytes.len() > len {
            let msg =
                format!("tensor {} gets {} bytes; its info announced {len}", self.written, self.partial + bytes.len());
            return Err(self.file.fail_input(msg));
        }
        self.file.write_all(bytes)?;
        self.partial += bytes.len();
        if self.partial == len {
            let pad = len.next_multiple_of(ALIGN) - len;
            self.file.write_all(&[0u8; ALIGN][..pad])?;
            (self.written, self.partial) = (self.written + 1, 0);
        }
        Ok(())
    }

    pub fn finish(self) -> Result<()> {
        if self.written != self.lens.len() {
            let msg = format!("{} of {} tensors written", self.written, self.lens.len());
            return Err(self.file.fail_input(msg));
        }
        self.file.finish()
    }
}
