#!/usr/bin/env python3
"""GGUF fixtures: two of the transformers-checked tiny models written as llama.cpp writes
DeepSeek GGUFs, with llama.cpp's own `gguf` package (its GGUFWriter and quantizer).

The layout and metadata follow llama.cpp's converter (`convert_hf_to_gguf.py`, DeepseekV2Model):
architecture `deepseek2`, stacked experts `ffn_{gate,up,down}_exps`, `exp_probs_b.bias`, MLA as the
split `attn_k_b` (per head, transposed) / `attn_v_b` (current converter) or as the legacy
`attn_kv_b`, `key_length`/`value_length` as the MQA view with the `_mla` keys holding the real head
dims (current) or the head dims themselves (legacy).

  tests/fixtures/gguf/v3-f32-0000N-of-00002.gguf   v3_f32_sharded, f32, split MLA, MTP as nextn, 2 parts
  tests/fixtures/gguf/v3-q8_0.gguf                 the same quantized to Q8_0 (2-D weights)
  tests/fixtures/gguf/v2-bf16-legacy.gguf          v2_group_limited, bf16, legacy attn_kv_b
  tests/fixtures/gguf/v32-f32.gguf                 v32_f32 as llama.cpp's `deepseek32` (DeepseekV32Model:
                                                   deepseek2 plus `blk.N.indexer.*` and the indexer keys)

  pip install gguf==0.19.0 numpy && python3 scripts/make_gguf_fixtures.py
"""
import json
import os
import struct

import numpy as np
from gguf import ExpertGatingFuncType, GGMLQuantizationType as T, GGUFWriter, quants

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "tests/fixtures")
OUT = os.path.join(FIX, "gguf")


def read_safetensors(folder):
    """name -> (dtype, shape, raw numpy array: float32 for F32, uint16 for BF16)."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    out = {}
    for f in files:
        with open(os.path.join(folder, f), "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
            data = fh.read()
        for name, h in header.items():
            if name == "__metadata__":
                continue
            a, b = h["data_offsets"]
            np_t = {"F32": np.float32, "BF16": np.uint16}[h["dtype"]]
            out[name] = (h["dtype"], h["shape"], np.frombuffer(data[a:b], dtype=np_t).reshape(h["shape"]))
    return out


def as_f32(dtype, arr):
    if dtype == "F32":
        return arr.astype(np.float32)
    return (arr.astype(np.uint32) << 16).view(np.float32)


def metadata(w, cfg, split_mla, n_blocks):
    w.add_block_count(n_blocks)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(1 if split_mla else cfg["num_attention_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
    if cfg.get("q_lora_rank"):
        w.add_q_lora_rank(cfg["q_lora_rank"])
    r, nope, rope, v = cfg["kv_lora_rank"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    w.add_kv_lora_rank(r)
    if split_mla:
        w.add_key_length(r + rope)
        w.add_value_length(r)
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(v)
    else:
        w.add_key_length(nope + rope)
        w.add_value_length(v)
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_count(cfg["n_routed_experts"])
    w.add_expert_shared_count(cfg["n_shared_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_weights_scale(cfg["routed_scaling_factor"])
    if cfg.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_expert_group_count(cfg["n_group"])
    w.add_expert_group_used_count(cfg["topk_group"])
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID if cfg.get("scoring_func") == "sigmoid" else ExpertGatingFuncType.SOFTMAX)
    w.add_rope_dimension_count(rope)
    if cfg.get("num_nextn_predict_layers"):
        w.add_nextn_predict_layers(cfg["num_nextn_predict_layers"])
    if cfg.get("model_type") == "deepseek_v32":
        w.add_indexer_head_count(cfg["index_n_heads"])
        w.add_indexer_key_length(cfg["index_head_dim"])
        w.add_indexer_top_k(cfg["index_topk"])
    w.add_bos_token_id(cfg.get("bos_token_id", 0))
    w.add_eos_token_id(cfg.get("eos_token_id", 1))


SIMPLE = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.q_a_proj": "attn_q_a",
    "self_attn.q_a_layernorm": "attn_q_a_norm",
    "self_attn.q_b_proj": "attn_q_b",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn.kv_a_layernorm": "attn_kv_a_norm",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
    "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
    "eh_proj": "nextn.eh_proj",
    "enorm": "nextn.enorm",
    "hnorm": "nextn.hnorm",
    "shared_head.norm": "nextn.shared_head_norm",
    "shared_head.head": "nextn.shared_head_head",
    "embed_tokens": "nextn.embed_tokens",
    "self_attn.indexer.wq_b": "indexer.attn_q_b",
    "self_attn.indexer.wk": "indexer.attn_k",
    "self_attn.indexer.k_norm": "indexer.k_norm",
    "self_attn.indexer.weights_proj": "indexer.proj",
}


def gguf_tensors(cfg, st, split_mla):
    """(gguf name, f32 array or raw bf16 uint16 array, dtype) in llama.cpp's layout."""
    out = []
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    experts = {}
    for name, (dt, shape, arr) in st.items():
        if name in top:
            out.append((top[name], arr, dt))
            continue
        parts = name.split(".")
        layer, rest = int(parts[2]), ".".join(parts[3:])
        if ".experts." in rest:
            e, proj = int(parts[5]), parts[6]
            experts.setdefault((layer, proj), {})[e] = (arr, dt)
            continue
        if rest == "mlp.gate.e_score_correction_bias":
            out.append((f"blk.{layer}.exp_probs_b.bias", arr, dt))
            continue
        if rest == "self_attn.kv_b_proj.weight":
            h, nope, v, r = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
            if not split_mla:
                out.append((f"blk.{layer}.attn_kv_b.weight", arr, dt))
                continue
            kv = as_f32(dt, arr).reshape(h, nope + v, r)
            out.append((f"blk.{layer}.attn_k_b.weight", np.ascontiguousarray(kv[:, :nope, :].transpose(0, 2, 1)), "F32"))
            out.append((f"blk.{layer}.attn_v_b.weight", np.ascontiguousarray(kv[:, nope:, :]), "F32"))
            continue
        module, kind = rest.rsplit(".", 1)
        out.append((f"blk.{layer}.{SIMPLE[module]}.{kind}", arr, dt))
    for (layer, proj), es in sorted(experts.items()):
        dt = es[0][1]
        stacked = np.stack([es[e][0] for e in range(len(es))])
        out.append((f"blk.{layer}.ffn_{proj.split('_')[0]}_exps.weight", stacked, dt))
    return out


def tokenizer_metadata(w, tok_dir, vocab_size, pre="deepseek-v3"):
    """The tokenizer as llama.cpp's converter stores it (`_set_vocab_gpt2`), padded or cut to
    `vocab_size` ids ([PADn] tokens, UNUSED, fill the gap as the converter does)."""
    tj = json.load(open(os.path.join(tok_dir, "tokenizer.json")))
    tc = json.load(open(os.path.join(tok_dir, "tokenizer_config.json")))
    tokens = {i: (t, 1) for t, i in tj["model"]["vocab"].items()}
    for a in tj["added_tokens"]:
        tokens[a["id"]] = (a["content"], 3 if a["special"] else 4)
    names, types = [], []
    for i in range(vocab_size):
        t, ty = tokens.get(i, (f"[PAD{i}]", 5))
        names.append(t)
        types.append(ty)
    keep = set(names)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    merges = [m for m in merges if all(p in keep for p in m.split(" ", 1)) and m.replace(" ", "", 1) in keep]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(names)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_add_bos_token(True)
    if isinstance(tc.get("chat_template"), str):
        w.add_chat_template(tc["chat_template"])


def write(path, cfg, st, split_mla, quant=None, split_max_tensors=0, tok_dir=None):
    n_blocks = cfg["num_hidden_layers"] + (cfg.get("num_nextn_predict_layers") or 0)
    arch = "deepseek32" if cfg.get("model_type") == "deepseek_v32" else "deepseek2"
    w = GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    metadata(w, cfg, split_mla, n_blocks)
    if tok_dir:
        tokenizer_metadata(w, tok_dir, cfg["vocab_size"])
    else:
        # llama.cpp's no-vocabulary files (it loads them with `vocab_size` dummy tokens), so its
        # own build can score the fixtures from ids (scripts/make_llamacpp_fixtures.sh).
        w.add_tokenizer_model("none")
    for name, arr, dt in gguf_tensors(cfg, st, split_mla):
        if quant is not None and arr.ndim >= 2 and arr.shape[-1] % 32 == 0:
            w.add_tensor(name, quants.quantize(as_f32(dt, arr), quant), raw_dtype=quant)
        elif dt == "BF16" and arr.ndim >= 2:
            w.add_tensor(name, np.ascontiguousarray(arr).view(np.uint8), raw_dtype=T.BF16)
        else:
            w.add_tensor(name, as_f32(dt, arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        os.remove(os.path.join(OUT, f))
    v3 = os.path.join(FIX, "v3_f32_sharded")
    cfg = json.load(open(os.path.join(v3, "config.json")))
    st = read_safetensors(v3)
    write(os.path.join(OUT, "v3-f32.gguf"), cfg, st, split_mla=True, split_max_tensors=40)
    write(os.path.join(OUT, "v3-q8_0.gguf"), cfg, st, split_mla=True, quant=T.Q8_0)
    v2 = os.path.join(FIX, "v2_group_limited")
    cfg2 = json.load(open(os.path.join(v2, "config.json")))
    write(os.path.join(OUT, "v2-bf16-legacy.gguf"), cfg2, read_safetensors(v2), split_mla=False)
    v32 = os.path.join(FIX, "v32_f32")
    cfg32 = json.load(open(os.path.join(v32, "config.json")))
    write(os.path.join(OUT, "v32-f32.gguf"), cfg32, read_safetensors(v32), split_mla=True)
    for f in sorted(os.listdir(OUT)):
        print(f, os.path.getsize(os.path.join(OUT, f)))


if __name__ == "__main__":
    main()
