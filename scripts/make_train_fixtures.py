#!/usr/bin/env python3
"""Training fixtures from PyTorch autograd and transformers (issue 3), under tests/fixtures/:

train_step/   a small random DeepSeek-V3 (f32, MTP module), a batch, and PyTorch's loss terms and
              gradients of every parameter for L = CE + λ/D·L_MTP + L_seq_balance + L_aux, with
              transformers' DeepseekV3ForCausalLM as the main model, the MTP module written over
              its modules (make_fixtures.Mtp), and the balance losses computed from the routers'
              logits (captured by hooks) as spec §4 / parallel §5 define them.
train_roundtrip/
              a checkpoint written by `dsv3 train` (copied from RUN_DIR, the first argument), and
              transformers' log-probs, MTP log-probs and greedy continuation on it, in the format of
              the golden fixtures (reference.json).
train_roundtrip_v32/
              the same for a DeepSeek-V3.2 run (RUN_DIR_V32, the second argument: `dsv3 train` with
              --dsa-warmup-steps), read by transformers as DeepseekV32ForCausalLM.

Usage: python scripts/make_train_fixtures.py [RUN_DIR [RUN_DIR_V32]]
Environment as scripts/make_fixtures.py.
"""
import copy
import json
import os
import shutil
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32DecoderLayer

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import BASE, OUT, Mtp, from_hub_names, init_, store, to_hub_names, write_config  # noqa: E402

SEQ_ALPHA, AUX_ALPHA, MTP_LAMBDA = 0.05, 0.05, 0.3


def mtp_hub(k, n_layers):
    return f"model.layers.{n_layers}.{k.replace('block.', '').replace('post_norm.', 'shared_head.norm.')}"


def balance_losses(captured, seqs, t, top_k, n_experts):
    """Sequence-wise (plain top-k, per sequence, averaged) and batch-wise (actual selections)."""
    seq, aux = 0.0, 0.0
    for logits, idx in captured:
        s = logits.sigmoid()  # [B*T, E]
        sn = s / s.sum(-1, keepdim=True)
        plain = torch.topk(s.detach(), top_k, dim=-1).indices
        for b in range(seqs):
            rows = slice(b * t, (b + 1) * t)
            f = torch.zeros(n_experts).index_add_(0, plain[rows].reshape(-1), torch.ones(t * top_k))
            f = f * n_experts / (top_k * t)
            seq = seq + SEQ_ALPHA * (f * sn[rows].mean(0)).sum() / seqs
        n = s.shape[0]
        f = torch.zeros(n_experts).index_add_(0, idx.reshape(-1), torch.ones(idx.numel())) * n_experts / (top_k * n)
        aux = aux + AUX_ALPHA * (f * sn.mean(0)).sum()
    return seq + aux


def make_train_step():
    gen = torch.Generator().manual_seed(31)
    cfg_kw = dict(BASE)
    cfg_kw.update(num_hidden_layers=2, vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                  q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                  num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2,
                  n_group=4, topk_group=2)
    config = DeepseekV3Config(**cfg_kw)
    config._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(config).float()
    init_(model, gen)
    n_layers, n_exp = config.num_hidden_layers, cfg_kw["n_routed_experts"]
    mtp = Mtp(config, n_layers).float()
    init_(mtp, gen)
    seqs, t = 2, 10
    tokens = torch.randint(0, config.vocab_size, (seqs, t + 1), generator=gen)

    captured = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: captured.append((out[0], out[2])))
             for name, m in list(model.named_modules()) + list(mtp.named_modules()) if name.endswith("mlp.gate")]
    inputs, labels = tokens[:, :t], tokens[:, 1:]
    h = model.model(inputs).last_hidden_state
    logits = model.lm_head(h)
    lm = F.cross_entropy(logits.reshape(-1, config.vocab_size), labels.reshape(-1))
    ml = mtp(model, tokens[:, 1:t + 1], h)  # position i reads h_i and token i+1, predicts i+2
    mtp_loss = F.cross_entropy(ml[:, :t - 1].reshape(-1, config.vocab_size), tokens[:, 2:].reshape(-1))
    bal = balance_losses(captured, seqs, t, config.num_experts_per_tok, n_exp)
    loss = lm + MTP_LAMBDA * mtp_loss + bal
    loss.backward()
    for hk in hooks:
        hk.remove()

    grads = to_hub_names({k: p.grad for k, p in model.named_parameters() if p.grad is not None}, n_exp)
    grads.update(to_hub_names({mtp_hub(k, n_layers): p.grad for k, p in mtp.named_parameters() if p.grad is not None}, n_exp))
    weights = to_hub_names(model.state_dict(), n_exp)
    weights.update(to_hub_names({mtp_hub(k, n_layers): v for k, v in mtp.state_dict().items()}, n_exp))
    saved, _ = store(weights, "f32")

    d = os.path.join(OUT, "train_step")
    os.makedirs(d, exist_ok=True)
    write_config(d, config, cfg_kw, {"dtype": "f32"}, False)
    save_file({k: v.contiguous() for k, v in saved.items()}, os.path.join(d, "model.safetensors"))
    save_file({k: v.contiguous().float() for k, v in grads.items()}, os.path.join(d, "grads.safetensors"))
    ref = {"tokens": tokens.reshape(-1).tolist(), "seqs": seqs, "t": t, "mtp_lambda": MTP_LAMBDA,
           "seq_alpha": SEQ_ALPHA, "aux_alpha": AUX_ALPHA, "loss": loss.item(), "lm_loss": lm.item(),
           "mtp_loss": mtp_loss.item(), "balance_loss": float(bal)}
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f)
    print("train_step ok", ref["loss"])


def make_roundtrip(run_dir, name="train_roundtrip"):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(run_dir, f), d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    config = model.config
    n_layers = config.num_hidden_layers
    sd = load_file(os.path.join(d, "model.safetensors"))
    n_exp = config.n_routed_experts
    if config.model_type == "deepseek_v32":
        # transformers builds no MTP layer for V3.2; its per-layer lists stop at the last layer.
        config = copy.deepcopy(config)
        config.mlp_layer_types = list(config.mlp_layer_types) + ["sparse"]
        mtp = Mtp(config, n_layers, DeepseekV32DecoderLayer).float().eval()
    else:
        mtp = Mtp(config, n_layers).float().eval()
    ref = {k: v for k, v in sd.items()}
    mref = {}
    for k in mtp.state_dict():
        hub = mtp_hub(k, n_layers)
        if k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj"):
            mref[k] = from_hub_names(ref, [hub], n_exp)[hub]
        else:
            mref[k] = ref[hub]
    mtp.load_state_dict(mref, strict=True)
    tok = json.load(open(os.path.join(d, "tokenizer.json")))
    from tokenizers import Tokenizer
    ids = torch.tensor([Tokenizer.from_file(os.path.join(d, "tokenizer.json")).encode(
        "pub fn forward(&self, x: &[f32]) -> Vec<f32> {\n        let h = self.norm.forward(x);").ids])
    del tok
    seq = ids.shape[1]
    with torch.no_grad():
        h = model.model(ids).last_hidden_state
        lp = torch.log_softmax(model.lm_head(h).float(), -1)[0]
        out = {"ids": ids[0].tolist(),
               "logprobs": [lp[i, ids[0, i + 1]].item() for i in range(seq - 1)],
               "top5": [torch.topk(lp[i], 5).indices.tolist() for i in range(seq)],
               "top5_logprobs": [torch.topk(lp[i], 5).values.tolist() for i in range(seq)]}
        ml = torch.log_softmax(mtp(model, ids[:, 1:], h[:, :-1]).float(), -1)[0]
        out["mtp_logprobs"] = [ml[i, ids[0, i + 2]].item() for i in range(seq - 2)]
        prompt = ids[:, :6]
        g = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        out["generate"] = {"prompt": prompt[0].tolist(), "output": g[0, 6:].tolist()}
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(out, f)
    print(name, "ok", sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)), "bytes")


if __name__ == "__main__":
    torch.set_num_threads(2)
    make_train_step()
    if len(sys.argv) > 1:
        make_roundtrip(sys.argv[1])
    if len(sys.argv) > 2:
        make_roundtrip(sys.argv[2], "train_roundtrip_v32")
