//! Safetensors checkpoints: one file or shards with `model.safetensors.index.json`, memory-mapped.
//!
//! bf16 and FP8 matrices stay in the mapped file (1 byte per FP8 weight, 2 per bf16) and are read
//! in place by the kernels; f32 and f16 tensors are copied into f32. Every header offset is checked
//! against the file before any read, so a truncated or corrupt file is an error, never a panic.

use crate::error::{ModelError, Result};
use dsv3_kernels::codec::{bf16_to_f32, f16_to_f32};
use dsv3_kernels::quant::Fp4Kind;
use dsv3_kernels::MatRef;
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Bytes that live either in a mapped file or in memory.
#[derive(Clone)]
pub struct Bytes {
    src: ByteSource,
    start: usize,
    len: usize,
}

#[derive(Clone)]
enum ByteSource {
    Mapped(Arc<Mmap>),
    Owned(Arc<Vec<u8>>),
}

impl Bytes {
    pub fn owned(v: Vec<u8>) -> Self {
        let len = v.len();
        Bytes { src: ByteSource::Owned(Arc::new(v)), start: 0, len }
    }

    pub fn as_slice(&self) -> &[u8] {
        let all: &[u8] = match &self.src {
            ByteSource::Mapped(m) => m,
            ByteSource::Owned(v) => v,
        };
        &all[self.start..self.start + self.len]
    }
}

/// A weight matrix `[rows, cols]` in its stored format.
#[derive(Clone)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    store: Store,
}

#[derive(Clone)]
enum Store {
    F32(Arc<Vec<f32>>),
    Bf16(Bytes),
    Fp8 {
        data: Bytes,
        scale_inv: Arc<Vec<f32>>,
        block: [usize; 2],
    },
    Fp4 {
        data: Bytes,
        scales: Bytes,
        tensor_scale: f32,
        kind: Fp4Kind,
    },
    /// Held by another process (parallel training): the shape only.
    Absent,
}

impl Matrix {
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), rows * cols, "Matrix::from_f32 shape");
        Matrix { rows, cols, store: Store::F32(Arc::new(data)) }
    }

    pub fn from_bf16(rows: usize, cols: usize, data: Bytes) -> Self {
        assert_eq!(data.len, rows * cols * 2, "Matrix::from_bf16 shape");
        Matrix { rows, cols, store: Store::Bf16(data) }
    }

    pub fn from_fp8(rows: usize, cols: usize, data: Bytes, scale_inv: Vec<f32>, block: [usize; 2]) -> Self {
        Matrix { rows, cols, store: Store::Fp8 { data, scale_inv: Arc::new(scale_inv), block } }
    }

    /// Packed E2M1 pairs `[rows, ceil(cols/2)]` with block scale codes `[rows, ceil(cols/block)]`.
    pub fn from_fp4(rows: usize, cols: usize, data: Bytes, scales: Bytes, tensor_scale: f32, kind: Fp4Kind) -> Self {
        Matrix { rows, cols, store: Store::Fp4 { data, scales, tensor_scale, kind } }
    }

    /// The values as trainable f32 (decoding a bf16/FP8 store once: training keeps f32 masters).
    /// A tensor another process holds (parallel training): its shape, no values. Reading it is
    /// a bug, and panics.
    pub fn absent(rows: usize, cols: usize) -> Self {
        Matrix { rows, cols, store: Store::Absent }
    }

    pub fn is_absent(&self) -> bool {
        matches!(self.store, Store::Absent)
    }

    pub fn f32_mut(&mut self) -> &mut [f32] {
        if !matches!(self.store, Store::F32(_)) {
            self.store = Store::F32(Arc::new(self.view().to_f32()));
        }
        match &mut self.store {
            Store::F32(d) => Arc::make_mut(d).as_mut_slice(),
            _ => unreachable!("converted above"),
        }
    }

    pub fn view(&self) -> MatRef<'_> {
        let (rows, cols) = (self.rows, self.cols);
        match &self.store {
            Store::F32(d) => MatRef::F32 { data: d, rows, cols },
            Store::Bf16(b) => MatRef::Bf16 { data: b.as_slice(), rows, cols },
            Store::Fp8 { data, scale_inv, block } => {
                MatRef::Fp8 { data: data.as_slice(), scale_inv, rows, cols, block: *block }
            }
            Store::Absent => panic!("a {rows}×{cols} weight held by another process was read"),
            Store::Fp4 { data, scales, tensor_scale, kind } => MatRef::Fp4 {
                data: data.as_slice(),
                scales: scales.as_slice(),
                tensor_scale: *tensor_scale,
                rows,
                cols,
                kind: *kind,
            },
        }
    }
}

#[derive(Clone, Debug)]
struct TensorInfo {
    dtype: String,
    shape: Vec<usize>,
    file: usize,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// The tensors of a checkpoint folder, by name, with a record of which ones were read.
pub struct Checkpoint {
    files: Vec<(PathBuf, Arc<Mmap>)>,
    tensors: HashMap<String, TensorInfo>,
    used: Mutex<HashSet<String>>,
    /// Weights to leave on disk ([`Checkpoint::skipping`]).
    skip: Option<Skip>,
}

/// Which weights a load leaves on disk.
type Skip = Box<dyn Fn(&str) -> bool + Send + Sync>;

fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F8_E4M3" | "F8_E5M2" | "I8" | "U8" | "BOOL" => 1,
        _ => return None,
    })
}

impl Checkpoint {
    /// Opens `model.safetensors.index.json` shards, else `model.safetensors`, else every
    /// `*.safetensors` file of the folder.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_files(&shard_paths(dir)?)
    }

    /// The tensors of the given safetensors files (e.g. a training run's optimizer state).
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut ck =
            Checkpoint { files: vec![], tensors: HashMap::new(), used: Mutex::new(HashSet::new()), skip: None };
        for p in paths {
            ck.add_file(p)?;
        }
        Ok(ck)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let bad = |msg: String| ModelError::Safetensors { path: path.into(), msg };
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only; a checkpoint modified while mapped is outside our contract
        // (as for every mmap-based loader). Each tensor's pages are read when it is loaded
        // ([`Checkpoint::bytes`]), so a process loading a share of the tensors reads only those.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        if map.len() < 8 {
            return Err(bad(format!("{} bytes is too short for a header", map.len())));
        }
        let fi = self.files.len();
        for (name, h) in parse_header(path, &map, map.len())? {
            if self.tensors.contains_key(&name) {
                return Err(bad(format!("`{name}` appears in more than one file")));
            }
            self.tensors
                .insert(name, TensorInfo { dtype: h.dtype, shape: h.shape, file: fi, start: h.start, end: h.end });
        }
        self.files.push((path.to_path_buf(), Arc::new(map)));
        Ok(())
    }

    /// Loads the weights `skip` names as [`Matrix::absent`] (their shape only): a process of a
    /// parallel run reads only what it holds.
    pub fn skipping(mut self, skip: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.skip = Some(Box::new(skip));
        self
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A tensor's shape, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    /// The file holding `name`, for error messages.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors.get(name).map(|t| self.files[t.file].0.as_path())
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        let t = self.tensors.get(name).ok_or_else(|| ModelError::Tensor {
            name: name.into(),
            file: None,
            msg: "missing from the checkpoint".into(),
        })?;
        self.used.lock().expect("used set").insert(name.to_string());
        Ok(t)
    }

    fn err(&self, name: &str, msg: String) -> ModelError {
        ModelError::Tensor { name: name.into(), file: self.file_of(name).map(Path::to_path_buf), msg }
    }

    fn bytes(&self, t: &TensorInfo) -> Bytes {
        let map = &self.files[t.file].1;
        // Read and mapped in now (as llama.cpp populates its maps): otherwise the first step to
        // touch each expert pays its page faults, and a first prompt runs 2-3× slower than the
        // next. Advice only: an older kernel without MADV_POPULATE_READ reads ahead instead.
        #[cfg(target_os = "linux")]
        let populated = map.advise_range(memmap2::Advice::PopulateRead, t.start, t.end - t.start).is_ok();
        #[cfg(not(target_os = "linux"))]
        let populated = false;
        if !populated {
            let _ = map.advise_range(memmap2::Advice::WillNeed, t.start, t.end - t.start);
        }
        Bytes { src: ByteSource::Mapped(map.clone()), start: t.start, len: t.end - t.start }
    }

    fn check_shape(&self, name: &str, t: &TensorInfo, want: &[usize]) -> Result<()> {
        if t.shape != want {
            return Err(self.err(name, format!("has shape {:?}, expected {want:?}", t.shape)));
        }
        Ok(())
    }

    /// Any float tensor as f32 values, shape checked.
    pub fn f32s(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.info(name)?;
        self.check_shape(name, t, shape)?;
        let b = self.bytes(t);
        let b = b.as_slice();
        Ok(match t.dtype.as_str() {
            "F32" => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            "BF16" => b.chunks_exact(2).map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            "F16" => b.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            "F8_E4M3" => b.iter().map(|&x| dsv3_kernels::codec::fp8_e4m3_to_f32(x)).collect(),
            d => return Err(self.err(name, format!("dtype {d} is not a float type dsv3 reads"))),
        })
    }

    /// A `[rows, cols]` weight. FP8 weights need their `<name>_scale_inv` sibling of shape
    /// `[ceil(rows/b0), ceil(cols/b1)]`.
    /// FP4 weights are `U8` `[rows, ceil(cols/2)]` pairs with `<name>_scale`: E4M3 per 16
    /// columns plus an f32 `<name>_scale_2` (NVFP4, NVIDIA ModelOpt's layout) or UE8M0 per 32
    /// (MXFP4).
    pub fn matrix(&self, name: &str, rows: usize, cols: usize, block: [usize; 2]) -> Result<Matrix> {
        let t = self.info(name)?.clone();
        if self.skip.as_ref().is_some_and(|skip| skip(name)) {
            let mut used = self.used.lock().expect("used set");
            for sibling in ["_scale_inv", "_scale", "_scale_2"]
                .map(|x| format!("{name}{x}"))
                .into_iter()
                .filter(|n| self.contains(n))
            {
                used.insert(sibling);
            }
            return Ok(Matrix::absent(rows, cols));
        }
        if t.dtype == "U8" {
            return self.fp4_matrix(name, &t, rows, cols);
        }
        self.check_shape(name, &t, &[rows, cols])?;
        match t.dtype.as_str() {
            "BF16" => Ok(Matrix::from_bf16(rows, cols, self.bytes(&t))),
            "F8_E4M3" => {
                let sname = format!("{name}_scale_inv");
                if !self.contains(&sname) {
                    return Err(self.err(name, format!("is FP8 but `{sname}` is missing")));
                }
                let scale = self.f32s(&sname, &[rows.div_ceil(block[0]), cols.div_ceil(block[1])])?;
                if let Some(bad) = scale.iter().find(|s| !s.is_finite()) {
                    return Err(self.err(&sname, format!("holds a non-finite scale {bad}")));
                }
                Ok(Matrix::from_fp8(rows, cols, self.bytes(&t), scale, block))
            }
            _ => Ok(Matrix::from_f32(rows, cols, self.f32s(name, &[rows, cols])?)),
        }
    }

    fn fp4_matrix(&self, name: &str, t: &TensorInfo, rows: usize, cols: usize) -> Result<Matrix> {
        self.check_shape(name, t, &[rows, cols.div_ceil(2)])?;
        let sname = format!("{name}_scale");
        let st = self
            .info(&sname)
            .map_err(|_| self.err(name, format!("is packed FP4 (U8) but `{sname}` is missing")))?
            .clone();
        let kind = match st.dtype.as_str() {
            "F8_E4M3" => Fp4Kind::Nv,
            "U8" => Fp4Kind::Mx,
            d => return Err(self.err(&sname, format!("dtype {d}: FP4 block scales are F8_E4M3 (NVFP4) or U8 (MXFP4)"))),
        };
        self.check_shape(&sname, &st, &[rows, cols.div_ceil(kind.block())])?;
        let tensor_scale = match kind {
            Fp4Kind::Mx => 1.0,
            Fp4Kind::Nv => {
                let s2 = format!("{name}_scale_2");
                let v = self.f32s(&s2, &[]).or_else(|_| self.f32s(&s2, &[1]))?;
                match v.first() {
                    Some(&x) if x.is_finite() && x > 0.0 => x,
                    _ => return Err(self.err(&s2, "must hold one positive finite scale".into())),
                }
            }
        };
        Ok(Matrix::from_fp4(rows, cols, self.bytes(t), self.bytes(&st), tensor_scale, kind))
    }

    /// Tensors under `prefix` that no load read: in a module dsv3 knows, they mean the checkpoint
    /// and the config disagree.
    pub fn unused_under(&self, prefix: &str) -> Vec<String> {
        let used = self.used.lock().expect("used set");
        let mut v: Vec<String> =
            self.tensors.keys().filter(|n| n.starts_with(prefix) && !used.contains(*n)).cloned().collect();
        v.sort();
        v
    }
}

/// One tensor of a safetensors header: dtype, shape and its absolute byte range in the file.
#[derive(Clone, Debug)]
pub struct HeaderEntry {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// Parses and checks a safetensors header from the file's first bytes (`head` holds at least the
/// 8-byte length and the JSON), against the file's length: every range inside the file and of the
/// size its shape and dtype need.
pub fn parse_header(path: &Path, head: &[u8], file_len: usize) -> Result<Vec<(String, HeaderEntry)>> {
    let bad = |msg: String| ModelError::Safetensors { path: path.into(), msg };
    if head.len() < 8 || file_len < 8 {
        return Err(bad(format!("{file_len} bytes is too short for a header")));
    }
    let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes")) as usize;
    if n > file_len - 8 || n > head.len() - 8 {
        return Err(bad(format!("header of {n} bytes runs past the end of the {file_len}-byte file (truncated?)")));
    }
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&head[8..8 + n]).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let data_start = 8 + n;
    let data_len = file_len - data_start;
    let mut out = Vec::with_capacity(header.len());
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad(format!("`{name}` has no dtype")))?;
        let size = dtype_size(dtype).ok_or_else(|| bad(format!("`{name}` has unknown dtype {dtype}")))?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|v| v as usize)).collect())
            .ok_or_else(|| bad(format!("`{name}` has no valid shape")))?;
        let offs: Vec<usize> = info
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|v| v as usize)).collect())
            .filter(|v: &Vec<usize>| v.len() == 2)
            .ok_or_else(|| bad(format!("`{name}` has no valid data_offsets")))?;
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("`{name}` shape overflows")))?;
        if offs[0] > offs[1] || offs[1] > data_len {
            return Err(bad(format!(
                "`{name}` data {}..{} lies outside the {data_len} data bytes (truncated file?)",
                offs[0], offs[1]
            )));
        }
        if offs[1] - offs[0] != numel * size {
            return Err(bad(format!(
                "`{name}` holds {} bytes, shape {shape:?} of {dtype} needs {}",
                offs[1] - offs[0],
                numel * size
            )));
        }
        out.push((
            name,
            HeaderEntry { dtype: dtype.to_string(), shape, start: data_start + offs[0], end: data_start + offs[1] },
        ));
    }
    Ok(out)
}

/// The safetensors files of a checkpoint folder: the shards of `model.safetensors.index.json`,
/// else `model.safetensors`, else every `*.safetensors` file.
pub fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    let mut paths: Vec<PathBuf> = if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| ModelError::Json { path: index.clone(), source })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Safetensors { path: index.clone(), msg: "no `weight_map` object".into() })?;
        let mut files: Vec<PathBuf> =
            map.values().map(|f| f.as_str().map(|s| dir.join(s))).collect::<Option<_>>().ok_or_else(|| {
                ModelError::Safetensors { path: index.clone(), msg: "weight_map values must be file names".into() }
            })?;
        files.sort();
        files.dedup();
        files
    } else if dir.join("model.safetensors").exists() {
        vec![dir.join("model.safetensors")]
    } else {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ModelError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        v.sort();
        v
    };
    if paths.is_empty() {
        return Err(ModelError::Safetensors { path: dir.into(), msg: "no .safetensors files in the folder".into() });
    }
    paths.dedup();
    Ok(paths)
}

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
    path: PathBuf,
    tmp: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    /// The byte sizes the header announced, and how many tensors were written.
    lens: Vec<usize>,
    written: usize,
}

impl SafetensorsWriter {
    pub fn create(path: &Path, entries: &[(String, &str, Vec<usize>, usize)]) -> Result<Self> {
        let mut header = serde_json::Map::new();
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
        let tmp = path.with_extension("safetensors.tmp");
        let open = || -> std::io::Result<std::io::BufWriter<std::fs::File>> {
            use std::io::Write;
            let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            f.write_all(&(h.len() as u64).to_le_bytes())?;
            f.write_all(&h)?;
            Ok(f)
        };
        let file = open().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            ModelError::io(path, e)
        })?;
        let lens = entries.iter().map(|e| e.3).collect();
        Ok(SafetensorsWriter { path: path.to_path_buf(), tmp, file, lens, written: 0 })
    }

    /// The next tensor's bytes (as many as the header announced).
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        if self.lens.get(self.written) != Some(&bytes.len()) {
            let msg = format!(
                "tensor {} has {} bytes; the header announced {:?}",
                self.written,
                bytes.len(),
                self.lens.get(self.written)
            );
            return Err(self.fail(std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)));
        }
        self.written += 1;
        self.file.write_all(bytes).map_err(|e| self.fail(e))
    }

    pub fn finish(self) -> Result<()> {
        if self.written != self.lens.len() {
            let msg = format!("{} of {} tensors written", self.written, self.lens.len());
            return Err(self.fail(std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)));
        }
        let SafetensorsWriter { path, tmp, file, .. } = self;
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

    fn fail(&self, e: std::io::Error) -> ModelError {
        let _ = std::fs::remove_file(&self.tmp);
        ModelError::io(&self.path, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streamed writer holds the header to its word: a tensor of the wrong size, or too few,
    /// is an error and leaves no file.
    #[test]
    fn streamed_writer_checks_what_the_header_announced() {
        let d = tmpdir("stream");
        let path = d.join("t.safetensors");
        let entries = vec![("a".to_string(), "F32", vec![2], 8), ("b".to_string(), "F32", vec![1], 4)];
        let mut w = SafetensorsWriter::create(&path, &entries).unwrap();
        w.write(&[0u8; 8]).unwrap();
        assert!(w.write(&[0u8; 8]).is_err());
        assert!(!path.exists() && !path.with_extension("safetensors.tmp").exists());
        let mut w = SafetensorsWriter::create(&path, &entries).unwrap();
        w.write(&1f32.to_le_bytes().repeat(2)).unwrap();
        assert!(w.finish().is_err(), "one tensor short");
        let mut w = SafetensorsWriter::create(&path, &entries).unwrap();
        w.write(&1f32.to_le_bytes().repeat(2)).unwrap();
        w.write(&2f32.to_le_bytes()).unwrap();
        w.finish().unwrap();
        let ck = Checkpoint::open_files(&[path]).unwrap();
        assert_eq!(ck.f32s("b", &[1]).unwrap(), [2.0]);
        std::fs::remove_dir_all(d).ok();
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dsv3-weights-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_and_truncation_is_an_error() {
        let d = tmpdir("rt");
        let vals: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let p = d.join("model.safetensors");
        write_safetensors(&p, &[("w".into(), "F32", vec![2, 3], bytes)]).unwrap();
        let ck = Checkpoint::open(&d).unwrap();
        assert_eq!(ck.f32s("w", &[2, 3]).unwrap(), vals);
        let e = ck.f32s("w", &[3, 2]).unwrap_err().to_string();
        assert!(e.contains("`w`") && e.contains("model.safetensors"), "{e}");
        assert!(ck.f32s("nope", &[1]).unwrap_err().to_string().contains("missing"));

        let full = std::fs::read(&p).unwrap();
        for cut in [0, 5, 8, 20, full.len() - 1] {
            std::fs::write(&p, &full[..cut]).unwrap();
            let e = Checkpoint::open(&d).err().expect("truncated file must fail").to_string();
            assert!(e.contains("model.safetensors"), "{e}");
        }
        let mut corrupt = full.clone();
        corrupt[8] = b'!'; // the header's opening brace
        std::fs::write(&p, &corrupt).unwrap();
        assert!(Checkpoint::open(&d).is_err());
    }
}
