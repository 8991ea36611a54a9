//! Safetensors checkpoints: one file or shards with `model.safetensors.index.json`, memory-mapped.
//!
//! bf16 and FP8 matrices stay in the mapped file (1 byte per FP8 weight, 2 per bf16) and are read
//! in place by the kernels; f32 and f16 tensors are copied into f32. Every header offset is checked
//! against the file before any read, so a truncated or corrupt file is an error, never a panic.

use crate::error::{ModelError, Result};
use dsv3_kernels::codec::{bf16_to_f32, f16_to_f32};
use dsv3_kernels::quant::Fp4Kind;
use dsv3_kernels::{GgmlType, MatRef};
use memmap2::Mmap;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

mod header;
mod writer;

pub use header::{dtype_size, header_len, parse_header, HeaderEntry, MAX_HEADER_BYTES};
pub use writer::{write_safetensors, SafetensorsWriter};

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
    /// llama.cpp blocks (GGUF), rows of whole blocks.
    Ggml {
        data: Bytes,
        kind: GgmlType,
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

    /// Rows of ggml blocks (a GGUF tensor read in place).
    pub fn from_ggml(rows: usize, cols: usize, data: Bytes, kind: GgmlType) -> Self {
        Matrix { rows, cols, store: Store::Ggml { data, kind } }
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
            Store::Ggml { data, kind } => MatRef::Ggml { data: data.as_slice(), rows, cols, kind: *kind },
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
    /// Set for GGUF tensors (`dtype` is then the ggml type's name).
    ggml: Option<GgmlType>,
    file: usize,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// The tensors of a checkpoint folder, by name, with a record of which ones were read.
pub struct Checkpoint {
    files: Vec<(PathBuf, ByteSource)>,
    tensors: HashMap<String, TensorInfo>,
    used: Mutex<HashSet<String>>,
    /// Weights to leave on disk ([`Checkpoint::skipping`]).
    skip: Option<Skip>,
}

/// Which weights a load leaves on disk.
type Skip = Box<dyn Fn(&str) -> bool + Send + Sync>;

impl Checkpoint {
    /// Opens `model.safetensors.index.json` shards, else `model.safetensors`, else every
    /// `*.safetensors` file of the folder.
    pub fn open(dir: &Path) -> Result<Self> {
        let ck = Self::open_files(&shard_paths(dir)?)?;
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            ck.check_index(&index, &index_shards(dir, &index)?)?;
        }
        Ok(ck)
    }

    /// Every tensor the index names is in the shard it names (a stale index is a corrupt folder).
    fn check_index(&self, index: &Path, shards: &std::collections::BTreeMap<String, PathBuf>) -> Result<()> {
        for (name, path) in shards {
            let found = self.file_of(name);
            if found != Some(path.as_path()) {
                let where_ = found.map_or("in no shard".to_string(), |f| format!("in {}", f.display()));
                let msg = format!("weight_map puts `{name}` in {}, but it is {where_}", path.display());
                return Err(ModelError::Safetensors { path: index.into(), msg });
            }
        }
        Ok(())
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
        let file = crate::files::open_regular(path)?;
        // SAFETY: the map is read-only; a checkpoint modified while mapped is outside our contract
        // (as for every mmap-based loader). Each tensor's pages are read when it is loaded
        // ([`Checkpoint::bytes`]), so a process loading a share of the tensors reads only those.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let fi = self.files.len();
        for (name, h) in parse_header(path, &map, map.len())? {
            if self.tensors.contains_key(&name) {
                return Err(bad(format!("`{name}` appears in more than one file")));
            }
            let t = TensorInfo { dtype: h.dtype, shape: h.shape, ggml: None, file: fi, start: h.start, end: h.end };
            self.tensors.insert(name, t);
        }
        self.files.push((path.to_path_buf(), ByteSource::Mapped(Arc::new(map))));
        Ok(())
    }

    /// An empty checkpoint that GGUF tensors are added to ([`crate::gguf`]).
    pub(crate) fn empty() -> Self {
        Self::open_files(&[]).expect("no files to open")
    }

    /// A mapped file tensors can point into; its index.
    pub(crate) fn add_mapped(&mut self, path: &Path, map: Arc<Mmap>) -> usize {
        self.files.push((path.to_path_buf(), ByteSource::Mapped(map)));
        self.files.len() - 1
    }

    /// `name` as `bytes[start..end]` of file `file`, `shape` outermost first, in ggml type `kind`.
    pub(crate) fn add_ggml(
        &mut self,
        name: String,
        shape: Vec<usize>,
        kind: GgmlType,
        file: usize,
        start: usize,
        end: usize,
    ) {
        let t = TensorInfo { dtype: kind.name().into(), shape, ggml: Some(kind), file, start, end };
        self.tensors.insert(name, t);
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
        let map = match &self.files[t.file].1 {
            ByteSource::Owned(v) => {
                return Bytes { src: ByteSource::Owned(v.clone()), start: t.start, len: t.end - t.start }
            }
            ByteSource::Mapped(m) => m,
        };
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
        if let Some(kind) = t.ggml {
            let mut v = vec![0f32; shape.iter().product()];
            dsv3_kernels::ggml::dequantize(kind, b, &mut v);
            return Ok(v);
        }
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
        match t.ggml {
            Some(GgmlType::Bf16) => return Ok(Matrix::from_bf16(rows, cols, self.bytes(&t))),
            Some(GgmlType::F32 | GgmlType::F16) => {
                return Ok(Matrix::from_f32(rows, cols, self.f32s(name, &[rows, cols])?))
            }
            Some(kind) => return Ok(Matrix::from_ggml(rows, cols, self.bytes(&t), kind)),
            None => {}
        }
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

/// The safetensors files of a checkpoint folder: the shards of `model.safetensors.index.json`,
/// else `model.safetensors`, else every `*.safetensors` file.
pub fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    let mut paths: Vec<PathBuf> = if index.exists() {
        index_shards(dir, &index)?.into_values().collect()
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
    paths.sort();
    paths.dedup();
    Ok(paths)
}

/// The index's `weight_map`: tensor name → shard path. Shards are plain file names inside the
/// folder (an index may not point the loader at `../` or absolute paths).
pub fn index_shards(dir: &Path, index: &Path) -> Result<std::collections::BTreeMap<String, PathBuf>> {
    let bad = |msg: String| ModelError::Safetensors { path: index.into(), msg };
    let v = crate::files::read_json(index)?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no `weight_map` object".into()))?;
    map.iter()
        .map(|(tensor, f)| {
            let name = f.as_str().ok_or_else(|| bad(format!("weight_map[`{tensor}`] is not a file name")))?;
            let plain = Path::new(name).components().count() == 1
                && matches!(Path::new(name).components().next(), Some(std::path::Component::Normal(_)));
            if !plain {
                return Err(bad(format!("weight_map[`{tensor}`] = `{name}` is not a file name inside the folder")));
            }
            Ok((tensor.clone(), dir.join(name)))
        })
        .collect()
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

    /// Bytes streamed in parts of any size fill the tensors in header order; a part past the
    /// last tensor is an error and leaves no file.
    #[test]
    fn streamed_parts_fill_tensors_in_order() {
        let d = tmpdir("parts");
        let path = d.join("p.safetensors");
        let entries = vec![
            ("a".to_string(), "F32", vec![3], 12),
            ("e".to_string(), "F32", vec![0], 0),
            ("b".to_string(), "U8", vec![2], 2),
        ];
        let bytes: Vec<u8> = [1f32, 2.0, 3.0].iter().flat_map(|v| v.to_le_bytes()).chain([7u8, 9]).collect();
        let mut w = SafetensorsWriter::create_with_metadata(&path, &entries, Some(&[("format", "pt")])).unwrap();
        for part in bytes.chunks(5) {
            w.write_part(part).unwrap();
        }
        let len = w.file_len();
        w.finish().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        let ck = Checkpoint::open_files(std::slice::from_ref(&path)).unwrap();
        assert_eq!(ck.f32s("a", &[3]).unwrap(), [1.0, 2.0, 3.0]);
        let mut w = SafetensorsWriter::create(&path.with_extension("x"), &entries).unwrap();
        assert!(w.write_part(&[0u8; 15]).is_err());
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
