//! The GGUF container (version 2 and 3): header, metadata key/values, tensor infos, aligned data.
//! Every count, length and offset is checked against the file before it is used, so a truncated
//! or corrupt file is one clear error, never a panic or a huge allocation.

use crate::error::{ModelError, Result};
use dsv3_kernels::GgmlType;
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            Value::Bool(v) => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor of a GGUF file: ggml dimensions (`dims[0]` innermost), type, absolute byte range.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dims: Vec<usize>,
    pub kind: GgmlType,
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    /// The shape outermost first, as safetensors and PyTorch write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub map: Arc<Mmap>,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    /// Tensors by name, in file order of their data.
    pub tensors: BTreeMap<String, TensorInfo>,
}

/// Most entries one count may declare (a vocabulary of 16M tokens; the largest real counts,
/// vocabularies and merges, are under a million).
const MAX_ENTRIES: u64 = 1 << 24;
const MAX_DIMS: u32 = 4;

struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn bad(&self, msg: impl Into<String>) -> ModelError {
        ModelError::Gguf { path: self.path.into(), msg: format!("{} (at byte {})", msg.into(), self.at) }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        match self.at.checked_add(n) {
            Some(end) if end <= self.buf.len() => {
                let s = &self.buf[self.at..end];
                self.at = end;
                Ok(s)
            }
            _ => Err(self.bad(format!("truncated: {what} needs {n} bytes, the file has {}", self.buf.len() - self.at))),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_bytes` long: more than the rest of the file can hold
    /// is corruption, caught before anything is allocated.
    fn count(&mut self, what: &str, min_bytes: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let room = (self.buf.len() - self.at) / min_bytes.max(1);
        if n > MAX_ENTRIES || n as u128 > room as u128 {
            return Err(self.bad(format!("{what} is {n}, more than the file can hold")));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad(format!("{what} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.bad(format!("{what}: bool byte {b}"))),
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth > 0 {
                    return Err(self.bad(format!("{what}: arrays of arrays are not GGUF")));
                }
                let inner = self.u32(what)?;
                let n = self.count(what, 1)?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(inner, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            t => return Err(self.bad(format!("{what}: unknown value type {t}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::files::open_regular(path)?;
        // SAFETY: read-only map; a file changed while mapped is outside the contract, as for the
        // safetensors loader.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let (version, metadata, tensors) = parse(path, &map)?;
        Ok(GgufFile { path: path.into(), map: Arc::new(map), version, metadata, tensors })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn bad(&self, msg: String) -> ModelError {
        ModelError::Gguf { path: self.path.clone(), msg }
    }

    /// An unsigned integer entry.
    pub fn uint(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                v.as_u64().map(Some).ok_or_else(|| self.bad(format!("`{key}` is {v:?}, not an unsigned integer")))
            }
        }
    }

    pub fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.bad(format!("`{key}` is {v:?}, not a number"))),
        }
    }

    pub fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.bad(format!("`{key}` is not a string"))),
        }
    }

    /// A required unsigned integer entry.
    pub fn need(&self, key: &str) -> Result<u64> {
        self.uint(key)?.ok_or_else(|| self.bad(format!("metadata `{key}` is missing")))
    }
}

/// A parsed image: the version, the metadata and the tensors.
pub type Parsed = (u32, BTreeMap<String, Value>, BTreeMap<String, TensorInfo>);

/// Parses a GGUF image (the whole file's bytes).
pub fn parse(path: &Path, buf: &[u8]) -> Result<Parsed> {
    let mut c = Cursor { buf, at: 0, path };
    if c.take(4, "magic").ok() != Some(b"GGUF".as_slice()) {
        return Err(ModelError::Gguf { path: path.into(), msg: "not a GGUF file (magic is not `GGUF`)".into() });
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(c.bad(format!("GGUF version {version}; dsv3 reads versions 2 and 3")));
    }
    let n_tensors = c.count("tensor count", 24)?;
    let n_kv = c.count("metadata count", 12)?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let ty = c.u32("metadata type")?;
        let v = c.value(ty, &key, 0)?;
        if metadata.insert(key.clone(), v).is_some() {
            return Err(c.bad(format!("metadata key `{key}` appears twice")));
        }
    }
    let align = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
            _ => return Err(c.bad(format!("general.alignment {v:?} is not a power of two"))),
        },
    };
    let mut infos = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = c.string("tensor name")?;
        let nd = c.u32("tensor dimension count")?;
        if nd == 0 || nd > MAX_DIMS {
            return Err(c.bad(format!("tensor `{name}` has {nd} dimensions")));
        }
        let mut dims = Vec::with_capacity(nd as usize);
        for _ in 0..nd {
            let d = c.u64("tensor dimension")?;
            dims.push(usize::try_from(d).map_err(|_| c.bad(format!("tensor `{name}` dimension {d}")))?);
        }
        let id = c.u32("tensor type")?;
        let kind = GgmlType::from_id(id)
            .ok_or_else(|| c.bad(format!("tensor `{name}` has ggml type {id}, which dsv3 does not read")))?;
        let offset = c.u64("tensor offset")?;
        infos.push((name, dims, kind, offset));
    }
    let data_start = c.at.div_ceil(align).checked_mul(align).ok_or_else(|| c.bad("data offset overflows"))?;
    let mut tensors = BTreeMap::new();
    for (name, dims, kind, offset) in infos {
        let bad = |msg: String| ModelError::Gguf { path: path.into(), msg: format!("tensor `{name}`: {msg}") };
        let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| bad("size overflows".into()))?;
        let rows = n.checked_div(dims[0]).unwrap_or(0);
        let bytes = kind.row_bytes(dims[0]).and_then(|r| r.checked_mul(rows)).ok_or_else(|| {
            bad(format!("{kind} needs rows of whole {}-value blocks, dims are {dims:?}", kind.block_elems()))
        })?;
        if !offset.is_multiple_of(align as u64) {
            return Err(bad(format!("offset {offset} is not a multiple of the alignment {align}")));
        }
        let start = usize::try_from(offset).ok().and_then(|o| o.checked_add(data_start));
        let end = start.and_then(|s| s.checked_add(bytes));
        let (start, end) = match (start, end) {
            (Some(s), Some(e)) if e <= buf.len() => (s, e),
            _ => {
                return Err(bad(format!(
                    "data [{offset} + {bytes} bytes] runs past the end of the file ({} bytes)",
                    buf.len()
                )))
            }
        };
        if tensors.insert(name.clone(), TensorInfo { dims, kind, start, end }).is_some() {
            return Err(bad("appears twice".into()));
        }
    }
    let mut spans: Vec<(usize, usize, &String)> = tensors.iter().map(|(n, t)| (t.start, t.end, n)).collect();
    spans.sort();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(c.bad(format!("tensors `{}` and `{}` overlap", w[0].2, w[1].2)));
        }
    }
    Ok((version, metadata, tensors))
}
