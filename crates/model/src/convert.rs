//! `dsv3 convert`: a checkpoint folder to another storage format, streamed.
//!
//! Linear weights (the tensors the official release stores in FP8) become the target format:
//! FP8 E4M3 with 128×128 `weight_scale_inv` blocks, FP4 (NVFP4 in NVIDIA ModelOpt's layout or
//! MXFP4), bf16 or f32. Everything else (embedding, head, norms, router, `eh_proj`) is bf16, or f32
//! for an f32 target; `e_score_correction_bias` stays f32 as in the release. With `quantize_head`
//! the embedding and the head (and the MTP layer's copies of them) are FP8 as well: off by default
//! to stay byte-faithful to the release, where the head is ~5% of the active bytes; on a small
//! model with DeepSeek's 129,280-id vocabulary it is most of them (dsv3 loads such a folder;
//! transformers' FP8 loader expects a bf16 head). FP8 → bf16 is DeepSeek's `fp8_cast_bf16.py`:
//! `bf16(q · scale_inv)` per element.
//!
//! Tensors are read with positioned reads (no mapping) in bands of rows sized so the buffers in
//! flight stay under `max_memory`; each output shard is written to a temporary folder that is
//! renamed into place only when every shard, the config and the tokenizer files are complete.

use crate::error::{ModelError, Result};
use crate::weights::{header_len, parse_header, shard_paths, HeaderEntry, SafetensorsWriter};
use dsv3_kernels::codec::{bf16_to_f32, f16_to_f32, f32_to_bf16};
use dsv3_kernels::quant::{Fp4Blocks, Fp4Kind, Fp8Blocks, ScaleFmt};
use dsv3_kernels::MatRef;
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The storage format of a converted checkpoint's Linear weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    F32,
    Bf16,
    Fp8,
    Fp4(Fp4Kind),
}

/// What a conversion did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    pub files: usize,
    pub tensors: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Largest total of conversion buffers alive at once (the `max_memory` budget bounds it).
    pub peak_buffer_bytes: usize,
    /// Weights a LoRA adapter was merged into.
    pub merged: usize,
}

/// Weights the official checkpoint stores in FP8: every attention and FFN projection, and V3.2's
/// indexer `wq_b` and `wk` (its `weights_proj` stays bf16).
pub fn is_linear_weight(name: &str) -> bool {
    const LINEARS: [&str; 11] = [
        "q_a_proj",
        "q_b_proj",
        "q_proj",
        "kv_a_proj_with_mqa",
        "kv_b_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "wq_b",
        "wk",
    ];
    name.strip_suffix(".weight").and_then(|s| s.rsplit('.').next()).is_some_and(|m| LINEARS.contains(&m))
}

/// Tensors that travel with a weight rather than on their own.
fn is_companion(name: &str) -> bool {
    ["_scale_inv", ".weight_scale", ".weight_scale_2", ".input_scale"].iter().any(|s| name.ends_with(s))
}

fn err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Safetensors { path: path.into(), msg: msg.into() }
}

/// One source shard: the open file and its parsed header.
struct Shard {
    path: PathBuf,
    file: std::fs::File,
    tensors: BTreeMap<String, HeaderEntry>,
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        let file = crate::files::open_regular(path)?;
        let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len() as usize;
        let mut n = [0u8; 8];
        file.read_exact_at(&mut n, 0).map_err(|_| err(path, format!("{len} bytes is too short for a header")))?;
        let hlen = header_len(&n, len).map_err(|m| err(path, m))?;
        let mut head = vec![0u8; 8 + hlen];
        file.read_exact_at(&mut head, 0).map_err(|e| ModelError::io(path, e))?;
        let tensors = parse_header(path, &head, len)?.into_iter().collect();
        Ok(Shard { path: path.into(), file, tensors })
    }

    fn read(&self, e: &HeaderEntry, offset: usize, len: usize, acct: &mut Budget) -> Result<Vec<u8>> {
        let mut buf = acct.alloc(len);
        self.file.read_exact_at(&mut buf, (e.start + offset) as u64).map_err(|x| ModelError::io(&self.path, x))?;
        Ok(buf)
    }
}

/// Tracks the bytes of live conversion buffers.
struct Budget {
    limit: usize,
    live: usize,
    peak: usize,
}

impl Budget {
    fn alloc(&mut self, n: usize) -> Vec<u8> {
        self.live += n;
        self.peak = self.peak.max(self.live);
        vec![0u8; n]
    }
    fn note(&mut self, n: usize) {
        self.live += n;
        self.peak = self.peak.max(self.live);
    }
    fn free(&mut self, n: usize) {
        self.live -= n;
    }
}

/// How a source tensor decodes: its dtype and the companions it needs.
struct Source<'a> {
    name: &'a str,
    entry: &'a HeaderEntry,
    rows: usize,
    cols: usize,
    /// FP8: `(scale_inv entry, block)`.
    fp8: Option<(&'a HeaderEntry, [usize; 2])>,
    /// FP4: `(scale entry, tensor scale, kind)`.
    fp4: Option<(&'a HeaderEntry, f32, Fp4Kind)>,
}

impl Source<'_> {
    /// Rows `r0..r1` as f32.
    fn rows_f32(&self, shard: &Shard, r0: usize, r1: usize, acct: &mut Budget) -> Result<Vec<f32>> {
        let (n, c) = (r1 - r0, self.cols);
        let bad = |m: String| err(&shard.path, format!("`{}`: {m}", self.name));
        // The f32 result is counted while the source bytes are still alive.
        let decode = |raw: Vec<u8>, width: usize, f: &dyn Fn(&[u8]) -> f32, acct: &mut Budget| {
            acct.note(raw.len() / width * 4);
            let v: Vec<f32> = raw.chunks_exact(width).map(f).collect();
            acct.free(raw.len());
            v
        };
        match (self.entry.dtype.as_str(), self.fp8, self.fp4) {
            ("F32", _, _) => {
                let raw = shard.read(self.entry, r0 * c * 4, n * c * 4, acct)?;
                Ok(decode(raw, 4, &|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]), acct))
            }
            ("BF16", _, _) => {
                let raw = shard.read(self.entry, r0 * c * 2, n * c * 2, acct)?;
                Ok(decode(raw, 2, &|b| bf16_to_f32(u16::from_le_bytes([b[0], b[1]])), acct))
            }
            ("F16", _, _) => {
                let raw = shard.read(self.entry, r0 * c * 2, n * c * 2, acct)?;
                Ok(decode(raw, 2, &|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])), acct))
            }
            ("F8_E4M3", Some((se, block)), _) => {
                let data = shard.read(self.entry, r0 * c, n * c, acct)?;
                let nb = c.div_ceil(block[1]);
                let (b0, b1) = (r0 / block[0], r1.div_ceil(block[0]));
                let sb = shard.read(se, b0 * nb * 4, (b1 - b0) * nb * 4, acct)?;
                let scale_inv: Vec<f32> =
                    sb.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                if let Some(s) = scale_inv.iter().find(|s| !s.is_finite()) {
                    return Err(bad(format!("non-finite scale_inv {s}")));
                }
                acct.note(n * c * 4);
                let v = MatRef::Fp8 { data: &data, scale_inv: &scale_inv, rows: n, cols: c, block }.to_f32();
                acct.free(data.len() + sb.len());
                Ok(v)
            }
            ("U8", _, Some((se, tensor_scale, kind))) => {
                let (pc, nb) = (c.div_ceil(2), c.div_ceil(kind.block()));
                let data = shard.read(self.entry, r0 * pc, n * pc, acct)?;
                let scales = shard.read(se, r0 * nb, n * nb, acct)?;
                acct.note(n * c * 4);
                let v = MatRef::Fp4 { data: &data, scales: &scales, tensor_scale, rows: n, cols: c, kind }.to_f32();
                acct.free(data.len() + scales.len());
                Ok(v)
            }
            (d, _, _) => Err(bad(format!("dtype {d} cannot be converted (or its scale tensor is missing)"))),
        }
    }
}

/// One output tensor: name, dtype, shape, bytes.
struct OutTensor {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: usize,
}

/// What a source tensor becomes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Plan {
    F32,
    Bf16,
    Fp8,
    Fp4(Fp4Kind),
}

/// The vocabulary matrices: the embedding, the head, and the MTP layer's copies of them.
fn is_vocab_matrix(name: &str) -> bool {
    ["embed_tokens.weight", "lm_head.weight", "shared_head.head.weight"].iter().any(|s| name.ends_with(s))
}

fn plan(name: &str, target: Target, quantize_head: bool, ndim: usize) -> Plan {
    if name.ends_with("e_score_correction_bias") {
        return Plan::F32;
    }
    if quantize_head && target != Target::F32 && ndim == 2 && is_vocab_matrix(name) {
        return Plan::Fp8;
    }
    match (target, is_linear_weight(name) && ndim == 2) {
        (Target::F32, _) => Plan::F32,
        (Target::Fp8, true) => Plan::Fp8,
        (Target::Fp4(k), true) => Plan::Fp4(k),
        _ => Plan::Bf16,
    }
}

fn outputs(name: &str, p: Plan, shape: &[usize], rows: usize, cols: usize) -> Vec<OutTensor> {
    let t = |n: String, dtype, shape: Vec<usize>, bytes| OutTensor { name: n, dtype, shape, bytes };
    let numel = rows * cols;
    match p {
        Plan::F32 => vec![t(name.into(), "F32", shape.to_vec(), numel * 4)],
        Plan::Bf16 => vec![t(name.into(), "BF16", shape.to_vec(), numel * 2)],
        Plan::Fp8 => {
            let sshape = vec![rows.div_ceil(128), cols.div_ceil(128)];
            let sb = sshape[0] * sshape[1] * 4;
            vec![t(name.into(), "F8_E4M3", shape.to_vec(), numel), t(format!("{name}_scale_inv"), "F32", sshape, sb)]
        }
        Plan::Fp4(kind) => {
            let nb = cols.div_ceil(kind.block());
            let mut v = vec![t(name.into(), "U8", vec![rows, cols.div_ceil(2)], rows * cols.div_ceil(2))];
            match kind {
                Fp4Kind::Nv => {
                    v.push(t(format!("{name}_scale"), "F8_E4M3", vec![rows, nb], rows * nb));
                    v.push(t(format!("{name}_scale_2"), "F32", vec![], 4));
                }
                Fp4Kind::Mx => v.push(t(format!("{name}_scale"), "U8", vec![rows, nb], rows * nb)),
            }
            v
        }
    }
}

/// Converts the checkpoint in `from` into a new folder `to` (which must not exist or be empty);
/// `quantize_head` stores the embedding and head in FP8 too.
pub fn convert(from: &Path, to: &Path, target: Target, quantize_head: bool, max_memory: usize) -> Result<Report> {
    convert_merging(from, to, target, quantize_head, max_memory, None)
}

/// The `[out, in]` shape of each `Linear` module's weight in a checkpoint (FP4's packed columns
/// counted twice): what [`crate::lora::read_peft`] checks adapters against.
pub fn linear_shapes(ck: &crate::weights::Checkpoint) -> impl Fn(&str) -> Option<(usize, usize)> + '_ {
    move |module: &str| {
        let w = format!("{module}.weight");
        let s = ck.shape(&w).filter(|s| s.len() == 2)?;
        let packed = ck.contains(&format!("{w}_scale")) && !ck.contains(&format!("{w}_scale_inv"));
        Some((s[0], if packed { 2 * s[1] } else { s[1] }))
    }
}

/// [`convert`] with LoRA adapters folded in: each adapted weight becomes `W + scale·B·A`
/// (computed in f32 on the decoded rows) before it is stored in the target format.
pub fn convert_merging(
    from: &Path,
    to: &Path,
    target: Target,
    quantize_head: bool,
    max_memory: usize,
    merge: Option<&crate::lora::Adapters>,
) -> Result<Report> {
    if to.exists() && std::fs::read_dir(to).map_err(|e| ModelError::io(to, e))?.next().is_some() {
        return Err(ModelError::Input(format!(
            "{} exists and is not empty; convert writes a new folder",
            to.display()
        )));
    }
    let mut cj = crate::files::read_json(&from.join("config.json"))?;
    // The source is checked as a load checks it (headers, index, regular files) before any
    // output exists: a corrupt folder must not come out as a clean-looking one.
    crate::weights::Checkpoint::open(from)?;
    let src_block = crate::config::Config::from_json(&cj)?.quantization.map_or([128, 128], |q| q.weight_block_size);
    let shards = shard_paths(from)?.iter().map(|p| Shard::open(p)).collect::<Result<Vec<_>>>()?;

    let tmp = to.with_file_name(format!(
        ".{}.partial-{}",
        to.file_name().and_then(|s| s.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    for (stale, _) in crate::files::stale_siblings(to, &["partial"]) {
        eprintln!("convert: removing {}, left by an interrupted conversion", stale.display());
        let _ = std::fs::remove_dir_all(&stale);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    let result = (|| {
        let mut report = Report::default();
        let mut acct = Budget { limit: max_memory, live: 0, peak: 0 };
        let mut weight_map = serde_json::Map::new();
        for shard in &shards {
            let fname = shard.path.file_name().expect("a file").to_owned();
            let out_path = tmp.join(&fname);
            let written =
                convert_shard(shard, &out_path, (target, quantize_head, merge), src_block, &mut acct, &mut report)?;
            for name in written {
                weight_map.insert(name, serde_json::Value::String(fname.to_string_lossy().into()));
            }
            report.files += 1;
        }
        report.peak_buffer_bytes = acct.peak;
        if let Some(m) = merge.filter(|m| m.modules.len() != report.merged) {
            return Err(ModelError::Input(format!(
                "merged {} of the adapters' {} modules: the rest have no weight in {}",
                report.merged,
                m.modules.len(),
                from.display()
            )));
        }
        // Config: the target's quantization_config.
        let o = cj.as_object_mut().ok_or_else(|| ModelError::config("config.json", "must be an object"))?;
        match target {
            Target::F32 | Target::Bf16 => {
                o.remove("quantization_config");
            }
            Target::Fp8 => {
                o.insert("quantization_config".into(), serde_json::json!({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}));
            }
            Target::Fp4(Fp4Kind::Nv) => {
                o.insert(
                    "quantization_config".into(),
                    serde_json::json!({"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}),
                );
            }
            Target::Fp4(Fp4Kind::Mx) => {
                o.insert("quantization_config".into(), serde_json::json!({"quant_method": "mxfp4"}));
            }
        }
        let cout = tmp.join("config.json");
        std::fs::write(&cout, serde_json::to_string_pretty(&cj).expect("JSON"))
            .map_err(|e| ModelError::io(&cout, e))?;
        if from.join("model.safetensors.index.json").exists() {
            let idx = serde_json::json!({"metadata": {"total_size": report.bytes_out}, "weight_map": weight_map});
            let ip = tmp.join("model.safetensors.index.json");
            std::fs::write(&ip, serde_json::to_string_pretty(&idx).expect("JSON"))
                .map_err(|e| ModelError::io(&ip, e))?;
        }
        // Tokenizer, generation config and any other side files travel unchanged.
        for e in std::fs::read_dir(from).map_err(|e| ModelError::io(from, e))? {
            let p = e.map_err(|e| ModelError::io(from, e))?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if p.is_file()
                && !name.ends_with(".safetensors")
                && name != "model.safetensors.index.json"
                && name != "config.json"
            {
                std::fs::copy(&p, tmp.join(name)).map_err(|e| ModelError::io(&p, e))?;
            }
        }
        Ok(report)
    })();
    match result {
        Ok(r) => {
            if to.exists() {
                std::fs::remove_dir(to).map_err(|e| ModelError::io(to, e))?;
            }
            std::fs::rename(&tmp, to).map_err(|e| ModelError::io(to, e))?;
            Ok(r)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Writes one output shard; returns the tensor names it holds.
fn convert_shard(
    shard: &Shard,
    out_path: &Path,
    (target, quantize_head, merge): (Target, bool, Option<&crate::lora::Adapters>),
    src_block: [usize; 2],
    acct: &mut Budget,
    report: &mut Report,
) -> Result<Vec<String>> {
    // Every primary tensor (scales travel with their weight), in name order, and the header of
    // the shard its plan implies.
    let mut planned = vec![];
    for (name, e) in &shard.tensors {
        if is_companion(name) {
            continue;
        }
        let (mut rows, mut cols) = match e.shape.len() {
            0 => (1, 1),
            1 => (1, e.shape[0]),
            _ => (e.shape[0], e.shape[1..].iter().product()),
        };
        let mut shape = e.shape.clone();
        let (mut fp8, mut fp4) = (None, None);
        match e.dtype.as_str() {
            "F8_E4M3" => {
                let s = shard.tensors.get(&format!("{name}_scale_inv")).ok_or_else(|| {
                    err(&shard.path, format!("`{name}` is FP8 without `{name}_scale_inv` in the same file"))
                })?;
                let want = [rows.div_ceil(src_block[0]), cols.div_ceil(src_block[1])];
                if s.shape != want {
                    return Err(err(
                        &shard.path,
                        format!("`{name}_scale_inv` has shape {:?}, blocks {src_block:?} need {want:?}", s.shape),
                    ));
                }
                fp8 = Some((s, src_block));
            }
            "U8" if e.shape.len() == 2 => {
                // Packed FP4 pairs: the logical width is twice the stored one (DeepSeek's widths
                // are all even).
                let s = shard
                    .tensors
                    .get(&format!("{name}_scale"))
                    .ok_or_else(|| err(&shard.path, format!("`{name}` is packed FP4 without `{name}_scale`")))?;
                let kind = if s.dtype == "F8_E4M3" { Fp4Kind::Nv } else { Fp4Kind::Mx };
                (rows, cols) = (e.shape[0], 2 * e.shape[1]);
                shape = vec![rows, cols];
                if s.shape != [rows, cols.div_ceil(kind.block())] {
                    return Err(err(
                        &shard.path,
                        format!("`{name}_scale` has shape {:?} for [{rows}, {cols}] FP4", s.shape),
                    ));
                }
                let ts = match kind {
                    Fp4Kind::Mx => 1.0,
                    Fp4Kind::Nv => {
                        let s2 = shard
                            .tensors
                            .get(&format!("{name}_scale_2"))
                            .ok_or_else(|| err(&shard.path, format!("`{name}` is NVFP4 without `{name}_scale_2`")))?;
                        let b = shard.read(s2, 0, 4, acct)?;
                        acct.free(4);
                        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
                    }
                };
                fp4 = Some((s, ts, kind));
            }
            _ => {}
        }
        let p = plan(name, target, quantize_head, shape.len());
        let outs = outputs(name, p, &shape, rows, cols);
        planned.push((Source { name, entry: e, rows, cols, fp8, fp4 }, p, outs));
    }
    let entries: Vec<(String, &str, Vec<usize>, usize)> = planned
        .iter()
        .flat_map(|(_, _, outs)| outs.iter().map(|o| (o.name.clone(), o.dtype, o.shape.clone(), o.bytes)))
        .collect();
    let mut w = SafetensorsWriter::create_with_metadata(out_path, &entries, Some(&[("format", "pt")]))?;
    let mut names = vec![];
    for (src, p, outs) in &planned {
        let delta = merge.and_then(|m| src.name.strip_suffix(".weight").and_then(|n| m.modules.get(n)));
        if delta.is_some() {
            report.merged += 1;
        }
        write_tensor(shard, src, *p, delta, &mut w, acct)?;
        report.tensors += 1;
        report.bytes_in += (src.entry.end - src.entry.start) as u64;
        names.extend(outs.iter().map(|o| o.name.clone()));
    }
    report.bytes_out += w.file_len();
    w.finish()?;
    Ok(names)
}

/// Streams one tensor in bands of rows (a multiple of 128 and of the source's block rows).
fn write_tensor(
    shard: &Shard,
    src: &Source,
    p: Plan,
    delta: Option<&crate::layers::Lora>,
    f: &mut SafetensorsWriter,
    acct: &mut Budget,
) -> Result<()> {
    // Rows r0..r1 as f32, with the adapter's update when one is merged.
    let rows_f32 = |r0: usize, r1: usize, acct: &mut Budget| -> Result<Vec<f32>> {
        let mut v = src.rows_f32(shard, r0, r1, acct)?;
        if let Some(l) = delta {
            l.add_delta_rows(r0, &mut v);
        }
        Ok(v)
    };
    let (rows, cols) = (src.rows, src.cols);
    let unit = src.fp8.map_or(128, |(_, b)| lcm(128, b[0]));
    // Per row in flight: source bytes (≤ 4), the f32 values (4), the encoded output (≤ 4).
    let per_row = 12 * cols.max(1);
    let band = (acct.limit / per_row / unit * unit).min(rows.div_ceil(unit) * unit);
    if band == 0 {
        return Err(ModelError::Input(format!(
            "`{}`: --max-memory {} is too small, a band of {unit} rows of {cols} columns needs {} bytes",
            src.name,
            acct.limit,
            unit * per_row
        )));
    }
    let tensor_scale = match p {
        // NVFP4's tensor scale needs the whole tensor's max first: one extra read pass.
        Plan::Fp4(Fp4Kind::Nv) => {
            let mut amax = 0f32;
            for r0 in (0..rows).step_by(band) {
                let v = rows_f32(r0, (r0 + band).min(rows), acct)?;
                amax = v.iter().fold(amax, |m, x| m.max(x.abs()));
                acct.free(v.len() * 4);
            }
            Some(amax.max(1e-30) / (448.0 * 6.0))
        }
        _ => None,
    };
    // Companion data (scales) is small: kept until the weight is written, then follows it.
    let mut scales_f32: Vec<f32> = vec![];
    let mut scales_u8: Vec<u8> = vec![];
    for r0 in (0..rows).step_by(band) {
        let r1 = (r0 + band).min(rows);
        let v = rows_f32(r0, r1, acct)?;
        let out: Vec<u8> = match p {
            Plan::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Plan::Bf16 => v.iter().flat_map(|&x| f32_to_bf16(x).to_le_bytes()).collect(),
            Plan::Fp8 => {
                let q = Fp8Blocks::quantize(&v, r1 - r0, cols, [128, 128], ScaleFmt::F32);
                scales_f32.extend(&q.scales);
                q.codes
            }
            Plan::Fp4(kind) => {
                let q = Fp4Blocks::quantize_with(&v, r1 - r0, cols, kind, tensor_scale);
                scales_u8.extend(&q.scales);
                q.packed
            }
        };
        acct.note(out.len());
        f.write_part(&out)?;
        acct.free(out.len() + v.len() * 4);
    }
    match p {
        Plan::Fp8 => f.write_part(&scales_f32.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())?,
        Plan::Fp4(kind) => {
            f.write_part(&scales_u8)?;
            if kind == Fp4Kind::Nv {
                f.write_part(&tensor_scale.unwrap_or(1.0).to_le_bytes())?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn lcm(a: usize, b: usize) -> usize {
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    a / gcd(a, b) * b
}
