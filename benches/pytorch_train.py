#!/usr/bin/env python3
"""PyTorch training tokens/s on the same config and batch as `dsv3 train` (issue 3's speed target):
transformers' DeepseekV3ForCausalLM + the MTP module over its modules (scripts/make_fixtures.Mtp),
eager, f32, AdamW, LM + λ·MTP loss, 2 threads.

Usage: python benches/pytorch_train.py [--preset-config runs/tiny/config.json] [--steps 10] [--batch 8] [--seq 128]
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
from make_fixtures import Mtp  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=None, help="a config.json (default: dsv3's tiny preset, vocab 2048)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.config:
        c = json.load(open(a.config))
    else:
        c = dict(vocab_size=2048, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=64,
                 qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, n_shared_experts=1,
                 num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
                 norm_topk_prob=True, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False)
    keep = {k: v for k, v in c.items() if k not in ("architectures", "torch_dtype", "num_nextn_predict_layers", "model_type")}
    config = DeepseekV3Config(**keep)
    config._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(config).float().train()
    mtp = Mtp(config, config.num_hidden_layers).float().train()
    params = list(model.parameters()) + list(mtp.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(a.steps + 2):
        tokens = torch.randint(0, config.vocab_size, (a.batch, a.seq + 1), generator=gen)
        t0 = time.perf_counter()
        h = model.model(tokens[:, :a.seq]).last_hidden_state
        lm = F.cross_entropy(model.lm_head(h).reshape(-1, config.vocab_size), tokens[:, 1:].reshape(-1))
        ml = mtp(model, tokens[:, 1:], h)
        mtp_loss = F.cross_entropy(ml[:, :-1].reshape(-1, config.vocab_size), tokens[:, 2:].reshape(-1))
        loss = lm + 0.3 * mtp_loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    tps = a.batch * a.seq * len(times) / sum(times)
    print(json.dumps({"engine": "pytorch", "torch": torch.__version__, "tokens_per_second": tps,
                      "step_seconds": sum(times) / len(times)}))


if __name__ == "__main__":
    main()
