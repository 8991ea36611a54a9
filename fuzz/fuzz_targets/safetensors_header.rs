//! Any bytes as a safetensors file: dsv3's header check never panics, and never accepts what the
//! `safetensors` crate rejects; what both accept, both read as the same tensors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let ours = dsv3_model::weights::parse_header(Path::new("fuzz.safetensors"), data, data.len());
    let theirs = safetensors::SafeTensors::deserialize(data);
    if let Ok(entries) = ours {
        let st = theirs.expect("dsv3 accepted a file the safetensors crate rejects");
        for (name, e) in entries {
            let v = st.tensor(&name).expect("a tensor the crate does not know");
            assert_eq!(v.shape(), e.shape.as_slice());
            assert_eq!(v.data(), &data[e.start..e.end]);
        }
    }
});
