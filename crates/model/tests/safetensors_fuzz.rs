//! The safetensors reader against the `safetensors` crate on seeded random mutations of a valid
//! checkpoint: whatever the crate rejects, dsv3 rejects (with an error, never a panic); whatever
//! dsv3 accepts, the crate accepts too and reads as the same tensors, byte for byte. dsv3 is
//! stricter in two documented ways only: a key that appears twice, and dtypes it does not read.

use dsv3_model::weights::{parse_header, write_safetensors, Checkpoint};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

const DTYPES: [&str; 9] = ["F32", "BF16", "F16", "F8_E4M3", "U8", "I64", "F4", "Q4_K", "f32"];

/// A small valid file: f32, bf16, FP8 with its scale, an empty tensor, metadata.
fn valid_file(dir: &Path) -> Vec<u8> {
    let p = dir.join("valid.safetensors");
    let f32s: Vec<u8> = (0..6).flat_map(|i| (i as f32 * 0.25 - 0.5).to_le_bytes()).collect();
    let bf16s: Vec<u8> = (0..4u16).flat_map(|i| (0x3f80 + i).to_le_bytes()).collect();
    write_safetensors(
        &p,
        &[
            ("a".into(), "F32", vec![2, 3], f32s),
            ("b".into(), "BF16", vec![4], bf16s),
            ("c.weight".into(), "F8_E4M3", vec![2, 2], vec![0x38, 0x40, 0xb8, 0x00]),
            ("c.weight_scale_inv".into(), "F32", vec![1, 1], 2f32.to_le_bytes().to_vec()),
            ("empty".into(), "F32", vec![0, 4], vec![]),
        ],
    )
    .unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    // Add __metadata__ as torch writes it.
    let (mut header, data) = split(&bytes);
    header.as_object_mut().unwrap().insert("__metadata__".into(), json!({"format": "pt"}));
    bytes = join(&header.to_string(), &data);
    assert!(safetensors::SafeTensors::deserialize(&bytes).is_ok());
    bytes
}

fn split(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), bytes[8 + n..].to_vec())
}

fn join(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// One random mutation of the valid file.
fn mutate(valid: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let (header, data) = split(valid);
    let n = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    let names: Vec<String> = header.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect();
    let pick = |rng: &mut StdRng| names[rng.gen_range(0..names.len())].clone();
    let mut h = header.clone();
    match rng.gen_range(0..12) {
        0 => {
            // A random byte of the header text.
            let mut b = valid.to_vec();
            let i = 8 + rng.gen_range(0..n);
            b[i] = rng.gen();
            return b;
        }
        1 => {
            // The length prefix off by a little.
            let mut b = valid.to_vec();
            let delta: i64 = rng.gen_range(-12..=12);
            b[..8].copy_from_slice(&((n as i64 + delta).max(0) as u64).to_le_bytes());
            return b;
        }
        2 => {
            // Truncated, or with bytes appended.
            let mut b = valid.to_vec();
            if rng.gen_bool(0.5) {
                b.truncate(rng.gen_range(0..b.len()));
            } else {
                b.extend((0..rng.gen_range(1..16)).map(|_| rng.gen::<u8>()));
            }
            return b;
        }
        3 => {
            // One offset moved.
            let t = pick(rng);
            let k = rng.gen_range(0..2);
            let v = h[&t]["data_offsets"][k].as_i64().unwrap() + rng.gen_range(-8..=8);
            h[&t]["data_offsets"][k] = json!(v.max(0));
        }
        4 => {
            // Two tensors' offsets swapped, or one aliasing another.
            let (a, b) = (pick(rng), pick(rng));
            let oa = h[&a]["data_offsets"].clone();
            if rng.gen_bool(0.5) {
                h[&a]["data_offsets"] = h[&b]["data_offsets"].clone();
                h[&b]["data_offsets"] = oa;
            } else {
                h[&a]["data_offsets"] = h[&b]["data_offsets"].clone();
            }
        }
        5 => {
            let t = pick(rng);
            h[&t]["dtype"] = json!(DTYPES[rng.gen_range(0..DTYPES.len())]);
        }
        6 => {
            // A shape dimension changed, added or removed.
            let t = pick(rng);
            let s = h[&t]["shape"].as_array_mut().unwrap();
            match rng.gen_range(0..3) {
                0 if !s.is_empty() => {
                    let i = rng.gen_range(0..s.len());
                    s[i] = json!(rng.gen_range(0..5));
                }
                1 => s.push(json!(rng.gen_range(0..3))),
                _ => {
                    s.pop();
                }
            }
        }
        7 => {
            // A tensor removed (its bytes then belong to no one, unless it was the empty one).
            let t = pick(rng);
            h.as_object_mut().unwrap().remove(&t);
        }
        8 => {
            // The same key twice (text level: a JSON map keeps one of them).
            let t = pick(rng);
            let dup = format!("\"{t}\":{},", h[&t]);
            let text = h.to_string();
            return join(&format!("{{{dup}{}", &text[1..]), &data);
        }
        9 => {
            // Whitespace padding and reordered keys: the same file to any reader.
            let mut entries: Vec<(String, Value)> = h.as_object().unwrap().clone().into_iter().collect();
            entries.reverse();
            let body: Vec<String> = entries.iter().map(|(k, v)| format!("{}: {v}", json!(k))).collect();
            let pad = " ".repeat(rng.gen_range(0..9));
            return join(&format!("{{ {} }}{pad}", body.join(", ")), &data);
        }
        10 => {
            // Wrong JSON types for a field, or a bad __metadata__.
            let t = pick(rng);
            match rng.gen_range(0..4) {
                0 => h[&t]["shape"] = json!("2,3"),
                1 => h[&t]["data_offsets"] = json!([0, 1, 2]),
                2 => h[&t]["data_offsets"] = json!([-1, 4]),
                _ => h["__metadata__"] = json!({"format": 3}),
            }
        }
        _ => {
            // A data byte flipped: same header, other values (no reader can tell).
            let mut b = valid.to_vec();
            if b.len() > 8 + n {
                let i = rng.gen_range(8 + n..b.len());
                b[i] ^= 1 << rng.gen_range(0..8);
            }
            return b;
        }
    }
    join(&h.to_string(), &data)
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dsv3-st-fuzz-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn mutated_headers_are_rejected_as_the_safetensors_crate_rejects_them() {
    let dir = tmpdir("mutations");
    let valid = valid_file(&dir);
    let path = dir.join("m.safetensors");
    let mut rng = StdRng::seed_from_u64(7);
    let (mut both_ok, mut both_err, mut stricter) = (0, 0, 0);
    for i in 0..4000 {
        let bytes = mutate(&valid, &mut rng);
        let theirs = safetensors::SafeTensors::deserialize(&bytes);
        let ours = parse_header(&path, &bytes, bytes.len());
        match (&ours, &theirs) {
            (Ok(entries), Ok(st)) => {
                both_ok += 1;
                assert_eq!(entries.len(), st.len(), "case {i}: tensor count");
                for (name, e) in entries {
                    let v = st.tensor(name).unwrap_or_else(|_| panic!("case {i}: `{name}` unknown to the crate"));
                    assert_eq!(format!("{:?}", v.dtype()), e.dtype, "case {i}: `{name}` dtype");
                    assert_eq!(v.shape(), e.shape.as_slice(), "case {i}: `{name}` shape");
                    assert_eq!(v.data(), &bytes[e.start..e.end], "case {i}: `{name}` bytes");
                }
            }
            (Err(e), Ok(_)) => {
                let e = e.to_string();
                assert!(e.contains("appears twice") || e.contains("does not read"), "case {i}: only dsv3 rejects: {e}");
                stricter += 1;
            }
            (Ok(_), Err(e)) => panic!("case {i}: dsv3 accepts what the safetensors crate rejects ({e:?})"),
            (Err(e), Err(_)) => {
                assert!(e.to_string().contains("m.safetensors"), "case {i}: the error names the file: {e}");
                both_err += 1;
            }
        }
        // Every 20th case through the whole loader: it fails cleanly or reads the crate's values.
        if i % 20 == 0 {
            std::fs::write(&path, &bytes).unwrap();
            match (Checkpoint::open_files(std::slice::from_ref(&path)), &theirs) {
                (Ok(ck), Ok(st)) => {
                    for name in ck.names().map(str::to_string).collect::<Vec<_>>() {
                        let v = st.tensor(&name).unwrap();
                        if format!("{:?}", v.dtype()) == "F32" {
                            let want: Vec<f32> =
                                v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                            assert_eq!(ck.f32s(&name, v.shape()).unwrap(), want, "case {i}: `{name}` values");
                        }
                    }
                }
                (Ok(_), Err(e)) => panic!("case {i}: the loader accepts what the crate rejects ({e:?})"),
                (Err(_), _) => {}
            }
        }
    }
    eprintln!("both accept {both_ok}, both reject {both_err}, only dsv3 rejects {stricter}");
    // The mutations reach both sides: plenty of accepted files and plenty of rejected ones.
    assert!(both_ok > 400 && both_err > 1500 && stricter > 50, "ok {both_ok}, err {both_err}, stricter {stricter}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The corruptions the issue lists, one by one, each with the error it gets.
#[test]
fn each_class_of_corrupt_header_is_named() {
    let dir = tmpdir("classes");
    let valid = valid_file(&dir);
    let path = dir.join("x.safetensors");
    let (h, data) = split(&valid);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut h = h.clone();
        f(&mut h);
        join(&h.to_string(), &data)
    };
    let n = u64::from_le_bytes(valid[..8].try_into().unwrap());
    let mut off_by_4 = valid.clone();
    off_by_4[..8].copy_from_slice(&(n - 4).to_le_bytes());
    let dup = {
        let text = h.to_string();
        join(&format!("{{\"a\":{},{}", h["a"], &text[1..]), &data)
    };
    let mut trailing = valid.clone();
    trailing.extend_from_slice(&[0; 8]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("header length off by 4", off_by_4, "not valid"),
        ("overlap", with(&|h| h["b"]["data_offsets"] = json!([20, 28])), "overlaps"),
        (
            "alias",
            with(&|h| h["c.weight_scale_inv"]["data_offsets"] = h["c.weight"]["data_offsets"].clone()),
            "overlaps",
        ),
        ("duplicate key", dup, "appears twice"),
        ("uncovered bytes", trailing, "cover"),
        ("shape × dtype", with(&|h| h["b"]["shape"] = json!([5])), "needs"),
        (
            "huge header",
            {
                let mut b = valid.clone();
                b[..8].copy_from_slice(&(200_000_000u64).to_le_bytes());
                b
            },
            "limit",
        ),
    ];
    for (what, bytes, want) in cases {
        assert!(safetensors::SafeTensors::deserialize(&bytes).is_err() || what == "duplicate key", "{what}");
        std::fs::write(&path, &bytes).unwrap();
        let e = Checkpoint::open_files(std::slice::from_ref(&path)).err().unwrap_or_else(|| panic!("{what} loads"));
        let e = e.to_string();
        assert!(e.contains(want) && e.contains("x.safetensors"), "{what}: {e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
