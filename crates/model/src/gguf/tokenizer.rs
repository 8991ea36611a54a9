//! The tokenizer a GGUF file carries (`tokenizer.ggml.*`: a byte-level BPE's tokens, merges and
//! token types, the pre-tokenizer by name, BOS/EOS, `tokenizer.chat_template`), rebuilt as the
//! `tokenizers` tokenizer the Hugging Face folder would hold.

use super::{Gguf, Value};
use crate::error::{ModelError, Result};
use crate::Tokenizer;
use serde_json::json;

/// llama.cpp's token types (`llama_token_type`).
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

/// A `tokenizer.json` pre-tokenizer: each regex splits the pieces the previous ones left (its
/// matches isolated), then byte-level mapping — the form of every DeepSeek tokenizer.
fn split_then_bytes(regexes: &[&str]) -> serde_json::Value {
    let mut steps: Vec<serde_json::Value> = regexes
        .iter()
        .map(|re| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false}))
        .collect();
    steps.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}));
    json!({"type": "Sequence", "pretokenizers": steps})
}

/// The split rules of DeepSeek-V3's `tokenizer.json` (llama.cpp names them `deepseek-v3`).
fn deepseek_v3_pre() -> serde_json::Value {
    split_then_bytes(&[
        "\\p{N}{1,3}",
        "[\u{4e00}-\u{9fa5}\u{3040}-\u{309f}\u{30a0}-\u{30ff}]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
    ])
}

/// DeepSeek-LLM's and V2's (`deepseek-llm`; non-ASCII as escapes, so no editor normalizes them).
fn deepseek_llm_pre() -> serde_json::Value {
    split_then_bytes(&[
        "[\r\n]",
        "\\s?[A-Za-z\u{b5}\u{c0}-\u{d6}\u{d8}-\u{f6}\u{f8}-\u{1ba}\u{1bc}-\u{1bf}\u{1c4}-\u{293}\u{295}-\u{2af}\u{370}-\u{373}\u{376}\u{377}\u{37b}-\u{37d}\u{37f}\u{386}\u{388}-\u{38a}\u{38c}\u{38e}-\u{3a1}\u{3a3}-\u{3f5}\u{3f7}-\u{481}\u{48a}-\u{52f}\u{531}-\u{556}\u{10a0}-\u{10c5}\u{13a0}-\u{13f5}\u{13f8}-\u{13fd}\u{1c90}-\u{1cba}\u{1cbd}-\u{1cbf}\u{1d00}-\u{1d2b}\u{1d6b}-\u{1d77}\u{1d79}-\u{1d9a}\u{1e00}-\u{1f15}\u{1f18}-\u{1f1d}\u{1f20}-\u{1f45}\u{1f48}-\u{1f4d}\u{1f50}-\u{1f57}\u{1f59}\u{1f5b}\u{1f5d}\u{1f5f}-\u{1f7d}\u{1f80}-\u{1fb4}\u{1fb6}-\u{1fbc}\u{1fbe}\u{1fc2}-\u{1fc4}\u{1fc6}-\u{1fcc}\u{1fd0}-\u{1fd3}\u{1fd6}-\u{1fdb}\u{1fe0}-\u{1fec}\u{1ff2}-\u{1ff4}\u{1ff6}-\u{1ffc}\u{2102}\u{2107}\u{210a}-\u{2113}\u{2115}\u{2119}-\u{211d}\u{2124}\u{2126}\u{2128}\u{212a}-\u{212d}\u{212f}-\u{2134}\u{2139}\u{213c}-\u{213f}\u{2145}-\u{2149}\u{214e}\u{2183}\u{2184}\u{2c00}-\u{2c7b}\u{2c7e}-\u{2ce4}\u{2ceb}-\u{2cee}\u{2cf2}\u{2cf3}\u{a640}-\u{a66d}\u{a680}-\u{a69b}\u{a722}-\u{a76f}\u{a771}-\u{a787}\u{a78b}-\u{a78e}\u{ab70}-\u{abbf}\u{fb00}-\u{fb06}\u{fb13}-\u{fb17}\u{ff21}-\u{ff3a}\u{ff41}-\u{ff5a}\u{10400}-\u{1044f}\u{104b0}-\u{104d3}\u{104d8}-\u{104fb}\u{10c80}-\u{10cb2}\u{10cc0}-\u{10cf2}\u{118a0}-\u{118df}\u{1e900}-\u{1e943}]+",
        "\\s?[!-/:-~\u{ff01}-\u{ff0f}\u{ff1a}-\u{ff5e}\u{2018}-\u{201f}\u{3000}-\u{3002}]+",
        "\\s+$",
        "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+",
        "\\p{N}+",
    ])
}

/// DeepSeek-Coder's and Coder-V2's (`deepseek-coder`).
fn deepseek_coder_pre() -> serde_json::Value {
    split_then_bytes(&[
        "[\r\n]",
        "\\s?\\p{L}+",
        "\\s?\\p{P}+",
        "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+",
        "\\p{N}",
    ])
}

fn strings<'a>(g: &'a Gguf, key: &str) -> Result<Vec<&'a str>> {
    let bad = || g.bad(format!("`{key}` is not an array of strings"));
    let a = g.main().get(key).ok_or_else(|| g.bad(format!("`{key}` is missing")))?.as_array().ok_or_else(bad)?;
    a.iter().map(|v| v.as_str().ok_or_else(bad)).collect()
}

/// The tokenizer of `g`.
pub fn tokenizer(g: &Gguf) -> Result<Tokenizer> {
    let m = g.main();
    let model = m.string("tokenizer.ggml.model")?.unwrap_or("");
    if model != "gpt2" {
        return Err(g.bad(format!("tokenizer.ggml.model `{model}`: dsv3 reads byte-level BPE (`gpt2`) tokenizers")));
    }
    let pre = m.string("tokenizer.ggml.pre")?.unwrap_or("default");
    let pre_tokenizer = match pre {
        // llama.cpp's converter names a DeepSeek-V3 vocabulary whose folder adds no BOS (as a
        // `dsv3 train` checkpoint's) after the JoyAI model that shares it; llama.cpp splits both
        // alike.
        "deepseek-v3" | "joyai-llm" => deepseek_v3_pre(),
        "deepseek-llm" => deepseek_llm_pre(),
        "deepseek-coder" => deepseek_coder_pre(),
        p => {
            return Err(g.bad(format!(
                "pre-tokenizer `{p}`: dsv3 knows `deepseek-v3` (V3, R1, V3.1), `deepseek-llm` (V2) and \
                 `deepseek-coder` (Coder-V2); put the model's tokenizer.json beside the file to use it"
            )))
        }
    };
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let types: Vec<u64> = match m.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) if a.len() == tokens.len() => a
            .iter()
            .map(|v| v.as_u64().ok_or_else(|| g.bad("token_type holds a non-integer".into())))
            .collect::<Result<_>>()?,
        None => vec![1; tokens.len()],
        Some(_) => return Err(g.bad("tokenizer.ggml.token_type does not have one entry per token".into())),
    };
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = vec![];
    for (id, (&t, &ty)) in tokens.iter().zip(&types).enumerate() {
        vocab.entry(t.to_string()).or_insert(json!(id));
        if ty == CONTROL || ty == USER_DEFINED {
            added.push(json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                              "normalized": false, "special": ty == CONTROL}));
        }
    }
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    let inner = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&tj).expect("json"))
        .map_err(|e| ModelError::Tokenizer(format!("{}: the GGUF vocabulary: {e}", g.path().display())))?;
    let token = |key: &str| -> Result<Option<String>> {
        Ok(match m.uint(key)? {
            Some(id) => Some(
                tokens
                    .get(id as usize)
                    .ok_or_else(|| g.bad(format!("`{key}` {id} is past the vocabulary")))?
                    .to_string(),
            ),
            None => None,
        })
    };
    let add_bos = m.get("tokenizer.ggml.add_bos_token") == Some(&Value::Bool(true));
    let template = m.string("tokenizer.chat_template")?.map(str::to_string);
    Ok(Tokenizer::from_parts(
        inner,
        template,
        token("tokenizer.ggml.bos_token_id")?,
        token("tokenizer.ggml.eos_token_id")?,
        add_bos,
    ))
}

/// A folder's `tokenizer.json` (and `tokenizer_config.json`) as the GGUF metadata llama.cpp's
/// converter writes (`_set_vocab_gpt2`): every id below `vocab_size` (ids the tokenizer lacks as
/// UNUSED `[PADn]`), added special tokens CONTROL, other added tokens USER_DEFINED, the merges,
/// the pre-tokenizer by llama.cpp's name, BOS addition and the chat template.
pub fn to_metadata(dir: &std::path::Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let tj = crate::files::read_json(&path)?;
    let bad = |msg: &str| ModelError::Tokenizer(format!("{}: {msg}", path.display()));
    if tj["model"]["type"] != "BPE" || tj["decoder"]["type"] != "ByteLevel" {
        return Err(bad("a GGUF tokenizer is written for byte-level BPE tokenizers only"));
    }
    if tj["pre_tokenizer"] != deepseek_v3_pre() {
        return Err(bad("its pre-tokenizer is not DeepSeek-V3's, the one dsv3 can name for llama.cpp (`deepseek-v3`)"));
    }
    let mut names: Vec<Option<(String, u32)>> = vec![None; vocab_size];
    let vocab = tj["model"]["vocab"].as_object().ok_or_else(|| bad("model.vocab is not an object"))?;
    for (t, id) in vocab {
        if let Some(slot) = id.as_u64().and_then(|i| names.get_mut(i as usize)) {
            *slot = Some((t.clone(), 1));
        }
    }
    for a in tj["added_tokens"].as_array().map_or(&[][..], |v| v) {
        let (Some(id), Some(t)) = (a["id"].as_u64(), a["content"].as_str()) else { continue };
        if let Some(slot) = names.get_mut(id as usize) {
            *slot = Some((t.to_string(), if a["special"] == true { CONTROL as u32 } else { USER_DEFINED as u32 }));
        }
    }
    let (tokens, types): (Vec<Value>, Vec<Value>) = names
        .into_iter()
        .enumerate()
        .map(|(i, t)| match t {
            Some((t, ty)) => (Value::Str(t), Value::I32(ty as i32)),
            None => (Value::Str(format!("[PAD{i}]")), Value::I32(5)),
        })
        .unzip();
    let merges: Vec<Value> = tj["model"]["merges"]
        .as_array()
        .ok_or_else(|| bad("model.merges is not a list"))?
        .iter()
        .filter_map(|m| match m {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .map(Value::Str)
        .collect();
    let tc_path = dir.join("tokenizer_config.json");
    let tc = if tc_path.exists() { crate::files::read_json(&tc_path)? } else { serde_json::Value::Null };
    let mut m = vec![
        ("tokenizer.ggml.model".to_string(), Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::Str("deepseek-v3".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(tc["add_bos_token"].as_bool().unwrap_or(true))),
    ];
    if let Some(t) = tc["chat_template"].as_str() {
        m.push(("tokenizer.chat_template".into(), Value::Str(t.into())));
    }
    Ok(m)
}
