//! Any bytes as a GGUF file: an error, or metadata and tensors whose byte ranges lie inside the
//! file and hold exactly their dims' whole blocks, never a panic or an allocation sized by an
//! unchecked count.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((_, _, tensors)) = dsv3_model::gguf::parse(std::path::Path::new("fuzz.gguf"), data) {
        for t in tensors.values() {
            assert!(t.start <= t.end && t.end <= data.len());
            let rows: usize = t.dims[1..].iter().product();
            assert_eq!(t.kind.row_bytes(t.dims[0]).unwrap() * rows, t.end - t.start);
        }
    }
});
