//! Any JSON as config.json: an error or a config whose derived values are all usable (finite
//! scales, a bounded parameter count), never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    if let Ok(c) = dsv3_model::Config::from_json(&v) {
        assert!(c.softmax_scale().is_finite() && c.softmax_scale() > 0.0);
        assert!(c.param_count() <= (1u64 << 45) as f64);
        let rope = dsv3_model::rope::Rope::new(&c);
        assert!(rope.inv_freq.iter().all(|f| f.is_finite()) && rope.attention_factor.is_finite());
    }
});
