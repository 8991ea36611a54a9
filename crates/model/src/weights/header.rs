//! The safetensors header, checked as the format promises (and as the `safetensors` crate checks
//! it, which a fuzz test holds this to): a length within the file and under 100 MB, a JSON object
//! with unique keys, each tensor's dtype, shape and `data_offsets` consistent, and the offsets,
//! sorted, tiling the data section exactly — no gaps, no overlaps, no aliasing, no stray bytes.

use crate::error::{ModelError, Result};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::collections::HashSet;
use std::path::Path;

/// The safetensors crate's `MAX_HEADER_SIZE`: a longer header is refused before it is read.
pub const MAX_HEADER_BYTES: usize = 100_000_000;

/// One tensor of a safetensors header: dtype, shape and its absolute byte range in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderEntry {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// Bytes per element of the dtypes dsv3 reads or carries (sub-byte FP4/FP6 dtypes are not).
pub fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" | "C64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F8_E4M3" | "F8_E5M2" | "F8_E8M0" | "I8" | "U8" | "BOOL" => 1,
        _ => return None,
    })
}

/// The 8-byte header length at the start of a file, checked against the file's length.
pub fn header_len(head: &[u8], file_len: usize) -> std::result::Result<usize, String> {
    let Some(n) = head.get(..8) else { return Err(format!("{file_len} bytes is too short for a header")) };
    let n = u64::from_le_bytes(n.try_into().expect("8 bytes"));
    if n > MAX_HEADER_BYTES as u64 {
        return Err(format!("a header of {n} bytes is over the format's {MAX_HEADER_BYTES}-byte limit"));
    }
    let n = n as usize;
    if n + 8 > file_len {
        return Err(format!("a header of {n} bytes runs past the end of the {file_len}-byte file (truncated?)"));
    }
    Ok(n)
}

/// A header's tensors in file order. `head` holds the file's first bytes (at least the length and
/// the JSON); `file_len` is the whole file's length.
pub fn parse_header(path: &Path, head: &[u8], file_len: usize) -> Result<Vec<(String, HeaderEntry)>> {
    let bad = |msg: String| ModelError::Safetensors { path: path.into(), msg };
    let n = header_len(head, file_len).map_err(bad)?;
    let json = head.get(8..8 + n).ok_or_else(|| bad(format!("{} header bytes given, {n} needed", head.len())))?;
    let text = std::str::from_utf8(json).map_err(|e| bad(format!("the header is not UTF-8: {e}")))?;
    let raw: RawHeader = serde_json::from_str(text).map_err(|e| bad(format!("the header is not valid: {e}")))?;
    let data_len = file_len - 8 - n;
    let mut tensors = Vec::with_capacity(raw.0.len());
    for (name, value) in raw.0 {
        if name == "__metadata__" {
            serde_json::from_value::<std::collections::HashMap<String, String>>(value)
                .map_err(|e| bad(format!("`__metadata__` must map strings to strings: {e}")))?;
            continue;
        }
        let t: RawTensor = serde_json::from_value(value).map_err(|e| bad(format!("`{name}`: {e}")))?;
        let entry = t.check().map_err(|m| bad(format!("`{name}` {m}")))?;
        tensors.push((name, entry));
    }
    tensors.sort_by_key(|(_, e)| (e.start, e.end));
    // The sorted ranges must tile 0..data_len: each starts where the previous ended.
    let mut at = 0usize;
    let mut prev: Option<&str> = None;
    for (name, e) in &tensors {
        if e.start != at {
            let what = match prev {
                Some(p) if e.start < at => format!("overlaps `{p}` (which ends at {at})"),
                Some(p) => format!("starts at {} but `{p}` ends at {at}: bytes no tensor covers", e.start),
                None => format!("starts at {}: the data section's first bytes belong to no tensor", e.start),
            };
            return Err(bad(format!("`{name}` data_offsets [{}, {}] {what}", e.start, e.end)));
        }
        at = e.end;
        prev = Some(name);
    }
    if at != data_len {
        let msg = if at > data_len {
            format!("the tensors need {at} data bytes; the file holds {data_len} (truncated?)")
        } else {
            format!(
                "the tensors cover {at} of the file's {data_len} data bytes (trailing bytes, or a wrong header length)"
            )
        };
        return Err(bad(msg));
    }
    let base = 8 + n;
    Ok(tensors
        .into_iter()
        .map(|(name, e)| (name, HeaderEntry { start: base + e.start, end: base + e.end, ..e }))
        .collect())
}

#[derive(Deserialize)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

impl RawTensor {
    /// The entry with offsets relative to the data section.
    fn check(self) -> std::result::Result<HeaderEntry, String> {
        let size =
            dtype_size(&self.dtype).ok_or_else(|| format!("has dtype {}, which dsv3 does not read", self.dtype))?;
        let shape: Vec<usize> = self
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| format!("shape {:?} does not fit in memory", self.shape))?;
        let bytes = shape
            .iter()
            .try_fold(size, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("shape {shape:?} overflows"))?;
        let (s, e) = self.data_offsets;
        if s > e {
            return Err(format!("data_offsets [{s}, {e}] run backwards"));
        }
        if e - s != bytes as u64 {
            return Err(format!("holds {} bytes; shape {shape:?} of {} needs {bytes}", e - s, self.dtype));
        }
        let start = usize::try_from(s).map_err(|_| format!("data_offsets [{s}, {e}] lie past any file"))?;
        Ok(HeaderEntry { dtype: self.dtype, shape, start, end: start + bytes })
    }
}

/// The header's entries in file order; a repeated key is an error (a JSON map would keep one of
/// the two silently).
struct RawHeader(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = RawHeader;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of tensors")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<RawHeader, A::Error> {
                let mut seen = HashSet::new();
                let mut out = vec![];
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    if !seen.insert(k.clone()) {
                        return Err(serde::de::Error::custom(format!("the key `{k}` appears twice")));
                    }
                    out.push((k, v));
                }
                Ok(RawHeader(out))
            }
        }
        d.deserialize_map(Entries)
    }
}
