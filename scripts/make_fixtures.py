#!/usr/bin/env python3
"""Writes small random DeepSeek-V3/V3.2/V2 checkpoints in the official Hugging Face layout, with the
reference outputs of transformers, under tests/fixtures/<case>/.

Environment (CPU): pip install --no-deps torch==2.15.0 (plus its CUDA wheels if the import asks),
then pip install transformers==5.23.0 safetensors numpy.

Each case folder holds config.json, safetensors (per-expert tensors as on the Hub, FP8 with
weight_scale_inv where asked, the MTP module as layer num_hidden_layers) and reference.json:
  ids, logprobs[i] = lp(ids[i+1] | ids[..=i]), top5 per position, mtp_logprobs[i] = lp(ids[i+2])
  from the MTP module at i, and a greedy continuation of a prompt from model.generate.
The reference model runs in float32 on exactly the weights stored (bf16- or FP8-rounded ones).
"""
import copy
import json
import math
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM,
                          DeepseekV32Config, DeepseekV32ForCausalLM)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm
from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32DecoderLayer

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")

BASE = dict(
    vocab_size=384, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
    n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    attention_bias=False, num_nextn_predict_layers=1,
)

CASES = {
    # q_lora, 4 groups keep 2, top-3, MTP, f32, sharded into 3 files.
    "v3_f32_sharded": dict(cfg={}, dtype="f32", shards=3, seq=14),
    # No q_lora (q_proj), 2 groups keep 1, top-2, bf16.
    "v3_bf16_noqlora": dict(cfg=dict(q_lora_rank=None, n_group=2, topk_group=1, num_experts_per_tok=2), dtype="bf16", seq=12),
    # YaRN with a prompt longer than the original window; mscale != mscale_all_dim so cos/sin are
    # scaled too; ungrouped top-4; two dense layers.
    "v3_yarn_long": dict(cfg=dict(n_group=1, topk_group=1, num_experts_per_tok=4, first_k_dense_replace=2,
                                  rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=16,
                                                    beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=1.0)),
                         dtype="f32", seq=48),
    # FP8 128x128 block-scaled with dims that are not multiples of 128 (ragged edge blocks).
    "v3_fp8": dict(cfg=dict(hidden_size=192, intermediate_size=320, moe_intermediate_size=144, q_lora_rank=136,
                            kv_lora_rank=160, num_attention_heads=3, num_key_value_heads=3, qk_nope_head_dim=48, qk_rope_head_dim=16,
                            v_head_dim=40, n_group=2, topk_group=1, num_experts_per_tok=2, num_hidden_layers=2),
                   dtype="fp8", seq=10),
    # deepseek_v2: softmax scoring, group_limited_greedy, no correction bias, no MTP.
    "v2_group_limited": dict(cfg=dict(q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                      num_experts_per_tok=3, routed_scaling_factor=2.0, norm_topk_prob=False,
                                      num_nextn_predict_layers=0), dtype="bf16", seq=12, v2=True),
    # deepseek_v32 (DSA): index_topk below the prompt so the indexer's choice matters, 16 indexer
    # heads (few heads tie at exact zeros), the MTP layer with its own indexer; the greedy prompt
    # is longer than index_topk and decodes past it.
    "v32_f32": dict(cfg=dict(index_topk=6, index_n_heads=16, index_head_dim=24), dtype="f32", seq=24, gen_prompt=10,
                    v32=True),
    # bf16 with YaRN (the indexer's half-split RoPE uses the scaled frequencies and attention factor).
    "v32_bf16_yarn": dict(cfg=dict(index_topk=8, index_n_heads=16, index_head_dim=16, n_group=1, topk_group=1,
                                   num_experts_per_tok=4, num_nextn_predict_layers=0,
                                   rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=16,
                                                     beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=1.0)),
                          dtype="bf16", seq=40, gen_prompt=12, v32=True),
    # FP8 as the official V3.2 release: indexer wq_b/wk block-scaled E4M3, weights_proj bf16.
    "v32_fp8": dict(cfg=dict(hidden_size=192, intermediate_size=320, moe_intermediate_size=144, q_lora_rank=136,
                             kv_lora_rank=160, num_attention_heads=3, num_key_value_heads=3, qk_nope_head_dim=48,
                             qk_rope_head_dim=16, v_head_dim=40, n_group=2, topk_group=1, num_experts_per_tok=2,
                             num_hidden_layers=2, index_topk=5, index_n_heads=16, index_head_dim=32,
                             num_nextn_predict_layers=0),
                    dtype="fp8", seq=14, gen_prompt=7, v32=True),
}


def init_(model, gen):
    """Weights large enough that logits and routing are far from uniform."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            else:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))


def to_hub_names(sd, n_experts):
    """transformers 5 packs experts ([E, 2I, D] gate_up, [E, D, I] down); the Hub has one tensor
    per expert and projection."""
    out = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(n_experts):
                out[f"{pre}{e}.gate_proj.weight"] = v[e, :inter].clone()
                out[f"{pre}{e}.up_proj.weight"] = v[e, inter:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            for e in range(n_experts):
                out[f"{pre}{e}.down_proj.weight"] = v[e].clone()
        elif "rotary_emb" in k:
            continue
        else:
            out[k] = v.clone()
    return out


def fp8_quantize(w, block=128):
    """Block-scaled E4M3: scale_inv = amax/448 per 128x128 block; W ~ q * scale_inv."""
    rows, cols = w.shape
    nb0, nb1 = -(-rows // block), -(-cols // block)
    scale = torch.zeros(nb0, nb1, dtype=torch.float32)
    q = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
    deq = torch.zeros_like(w)
    for i in range(nb0):
        for j in range(nb1):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            qb = (blk / s).clamp(-448, 448).to(torch.float8_e4m3fn)
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = qb
            deq[i * block:(i + 1) * block, j * block:(j + 1) * block] = qb.float() * s
    return q, scale, deq


def is_fp8_linear(name, t):
    """As the official checkpoint: linear weights of attention and FFNs are FP8; embeddings, head,
    norms, router and eh_proj stay bf16."""
    return (t.dim() == 2 and name.endswith(".weight") and "layers." in name and "norm" not in name
            and not name.endswith("mlp.gate.weight") and "eh_proj" not in name and "embed_tokens" not in name
            and "shared_head" not in name and "weights_proj" not in name)


def store(tensors, dtype):
    """Rounds to the stored dtype. Returns (tensors to save, f32 values the reference must use)."""
    saved, ref = {}, {}
    for k, v in tensors.items():
        v = v.float()
        if k.endswith("e_score_correction_bias"):
            saved[k], ref[k] = v, v
        elif dtype == "f32":
            saved[k], ref[k] = v, v
        elif dtype == "fp8" and is_fp8_linear(k, v):
            q, s, deq = fp8_quantize(v)
            saved[k], saved[k + "_scale_inv"], ref[k] = q, s, deq
        else:
            b = v.to(torch.bfloat16)
            saved[k], ref[k] = b, b.float()
    return saved, ref


def from_hub_names(ref, sd_keys, n_experts):
    """Inverse of to_hub_names for loading the rounded weights back into the transformers model."""
    out = {}
    for k in sd_keys:
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            out[k] = torch.stack([torch.cat([ref[f"{pre}{e}.gate_proj.weight"], ref[f"{pre}{e}.up_proj.weight"]]) for e in range(n_experts)])
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            out[k] = torch.stack([ref[f"{pre}{e}.down_proj.weight"] for e in range(n_experts)])
        elif k in ref:
            out[k] = ref[k]
    return out


class Mtp(torch.nn.Module):
    """transformers' MtpLayer, written over its modules: [enorm(emb(t_{i+1})) ; hnorm(h_i)] ->
    eh_proj -> decoder block -> shared_head.norm -> the main head."""

    def __init__(self, config, layer_idx, layer_cls=DeepseekV3DecoderLayer):
        super().__init__()
        d = config.hidden_size
        self.enorm = DeepseekV3RMSNorm(d, config.rms_norm_eps)
        self.hnorm = DeepseekV3RMSNorm(d, config.rms_norm_eps)
        self.eh_proj = torch.nn.Linear(2 * d, d, bias=False)
        self.block = layer_cls(config, layer_idx)
        self.post_norm = DeepseekV3RMSNorm(d, config.rms_norm_eps)

    def forward(self, model, next_ids, h):
        n = next_ids.shape[1]
        e = model.model.embed_tokens(next_ids)
        x = self.eh_proj(torch.cat([self.enorm(e), self.hnorm(h)], dim=-1))
        pos = torch.arange(n)[None]
        pe = model.model.rotary_emb(x, pos)
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        x = self.block(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        if isinstance(x, tuple):
            x = x[0]
        return model.lm_head(self.post_norm(x))

    def hub_tensors(self, layer):
        out = {}
        for k, v in self.state_dict().items():
            k = k.replace("block.", "").replace("post_norm.", "shared_head.norm.")
            out[f"model.layers.{layer}.{k}"] = v
        return out


def make_case(name, spec):
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    cfg_kw = dict(BASE)
    cfg_kw.update(spec["cfg"])
    v2, v32 = spec.get("v2", False), spec.get("v32", False)
    layer_cls = DeepseekV32DecoderLayer if v32 else DeepseekV3DecoderLayer
    if v2:
        cfg_kw.pop("num_nextn_predict_layers", None)
        config = DeepseekV2Config(**cfg_kw)
        model_cls = DeepseekV2ForCausalLM
    elif v32:
        config = DeepseekV32Config(**cfg_kw)
        model_cls = DeepseekV32ForCausalLM
    else:
        config = DeepseekV3Config(**cfg_kw)
        model_cls = DeepseekV3ForCausalLM
    config._attn_implementation = "eager"
    model = model_cls(config).float().eval()
    init_(model, gen)
    n_layers, n_exp = config.num_hidden_layers, cfg_kw["n_routed_experts"]
    mtp = None
    if not v2 and cfg_kw.get("num_nextn_predict_layers", 0) > 0:
        mcfg = config
        if v32:  # transformers builds no MTP layer for V3.2; its per-layer lists stop at the last layer
            mcfg = copy.deepcopy(config)
            mcfg.mlp_layer_types = list(config.mlp_layer_types) + ["sparse"]
        mtp = Mtp(mcfg, n_layers, layer_cls).float().eval()
        init_(mtp, gen)

    hub = to_hub_names(model.state_dict(), n_exp)
    if mtp is not None:
        hub.update(to_hub_names(mtp.hub_tensors(n_layers), n_exp))
    saved, ref = store(hub, spec["dtype"])
    # Load the stored (rounded) values back so transformers computes on exactly them.
    model.load_state_dict(from_hub_names(ref, model.state_dict().keys(), n_exp), strict=False)
    if mtp is not None:
        mref = {k: ref[f"model.layers.{n_layers}.{k.replace('block.', '').replace('post_norm.', 'shared_head.norm.')}"]
                for k in mtp.state_dict() if "mlp.experts." not in k}
        sd = mtp.state_dict()
        for k in sd:
            if k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj"):
                pre = f"model.layers.{n_layers}." + k.replace("block.", "")
                mref[k] = from_hub_names(ref, [pre], n_exp)[pre]
        mtp.load_state_dict(mref, strict=True)
        # The Hub carries copies of the shared embedding and head inside the MTP layer.
        saved[f"model.layers.{n_layers}.embed_tokens.weight"] = saved["model.embed_tokens.weight"].clone()
        saved[f"model.layers.{n_layers}.shared_head.head.weight"] = saved["lm_head.weight"].clone()

    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    write_config(d, config, cfg_kw, spec, v2, v32)
    shards = spec.get("shards", 1)
    names = sorted(saved)
    if shards == 1:
        save_file({k: saved[k].contiguous() for k in names}, os.path.join(d, "model.safetensors"))
    else:
        weight_map = {}
        per = -(-len(names) // shards)
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = names[s * per:(s + 1) * per]
            save_file({k: saved[k].contiguous() for k in part}, os.path.join(d, fname))
            weight_map.update({k: fname for k in part})
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)

    ids = torch.randint(2, config.vocab_size, (1, spec["seq"]), generator=gen)
    with torch.no_grad():
        out = model.model(ids)
        h = out.last_hidden_state
        logits = model.lm_head(h).float()
        lp = torch.log_softmax(logits, -1)[0]
        ref_json = {
            "ids": ids[0].tolist(),
            "logprobs": [lp[i, ids[0, i + 1]].item() for i in range(spec["seq"] - 1)],
            "top5": [torch.topk(lp[i], 5).indices.tolist() for i in range(spec["seq"])],
            "top5_logprobs": [torch.topk(lp[i], 5).values.tolist() for i in range(spec["seq"])],
        }
        if mtp is not None:
            ml = torch.log_softmax(mtp(model, ids[:, 1:], h[:, :-1]).float(), -1)[0]
            ref_json["mtp_logprobs"] = [ml[i, ids[0, i + 2]].item() for i in range(spec["seq"] - 2)]
        prompt = ids[:, : min(spec.get("gen_prompt", 6), spec["seq"])]
        gen_out = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        ref_json["generate"] = {"prompt": prompt[0].tolist(), "output": gen_out[0, prompt.shape[1]:].tolist()}
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref_json, f)
    print(name, "ok", sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)), "bytes")


def write_config(d, config, cfg_kw, spec, v2, v32=False):
    """A config.json as on the Hub (rope_theta + rope_scaling, quantization_config)."""
    family = "v2" if v2 else "v32" if v32 else "v3"
    arch = {"v2": "DeepseekV2ForCausalLM", "v3": "DeepseekV3ForCausalLM", "v32": "DeepseekV32ForCausalLM"}[family]
    c = {"architectures": [arch], "model_type": "deepseek_" + family, "hidden_act": "silu", "rope_theta": 10000.0,
         "torch_dtype": {"f32": "float32", "bf16": "bfloat16", "fp8": "bfloat16"}[spec["dtype"]]}
    for k, v in cfg_kw.items():
        c[k] = v
    c.setdefault("rope_scaling", None)
    c["topk_method"] = cfg_kw.get("topk_method", "greedy" if v2 else "noaux_tc")
    c["scoring_func"] = "softmax" if v2 else "sigmoid"
    c["moe_layer_freq"] = 1
    if spec["dtype"] == "fp8":
        c["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                    "weight_block_size": [128, 128]}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f, indent=1)


if __name__ == "__main__":
    torch.set_num_threads(2)
    for name in sys.argv[1:] or CASES:
        make_case(name, CASES[name])
