#!/usr/bin/env python3
"""LoRA adapters made by peft on the transformers DeepSeek-V3 model, with the adapted model's
logits, under tests/fixtures/peft/<case>/ (the bases are the golden fixtures' v3_f32_sharded and
v3_fp8, their FP8 weights dequantized exactly as stored).

Environment (CPU): the one of make_fixtures.py plus peft==0.21.2.

    python3 scripts/make_peft_fixtures.py             # writes the fixtures
    python3 scripts/make_peft_fixtures.py --check-all DIR   # scripts/test.sh: every case below, exit 1
                                                      # beyond 1e-4
    python3 scripts/make_peft_fixtures.py CASE DIR    # loads the adapters dsv3 wrote in DIR onto
                                                      # CASE's base with peft and prints the logits'
                                                      # distance from DIR/reference.json (dsv3's) or
                                                      # the committed reference
(DSV3_PEFT_OUT=DIR cargo test --release -p dsv3-model --test lora peft writes DIR/CASE, the fixture
adapters as dsv3 writes them, and DIR/CASE-dsv3, adapters dsv3 made on every projection.)

Each case folder holds peft's adapter_config.json and adapter_model.safetensors (attention
projections, the dense MLP and the shared experts: transformers packs routed experts into one
tensor, which PEFT adapts only through target_parameters) and reference.json: ids and the
adapted model's logits [len(ids), vocab] in float32.
"""
import json
import os
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import from_hub_names  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
CASES = ["v3_f32_sharded", "v3_fp8"]
TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = [0, 17, 250, 3, 99, 381, 42, 7, 128, 64, 5, 300]


def dequantize(w, s, block=128):
    out = w.float().clone()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * block:(i + 1) * block, j * block:(j + 1) * block] *= s[i, j]
    return out


def base_model(case):
    d = os.path.join(FIXTURES, case)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.pop("quantization_config", None)
    config = DeepseekV3Config(**cfg)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config).float().eval()
    tensors = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(d, f)))
    ref = {}
    for k, v in tensors.items():
        if k.endswith("_scale_inv"):
            continue
        s = tensors.get(k + "_scale_inv")
        ref[k] = dequantize(v, s) if s is not None else v.float()
    sd = model.state_dict()
    loaded = from_hub_names(ref, sd.keys(), config.n_routed_experts)
    missing = [k for k in sd if k not in loaded and "rotary_emb" not in k]
    assert not missing, missing
    model.load_state_dict(loaded, strict=False)
    return model


def logits(model):
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].float()


def make(case):
    model = base_model(case)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(1)
    for name, p in pm.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    out = os.path.join(FIXTURES, "peft", case)
    pm.save_pretrained(out)
    json.dump({"ids": IDS, "logits": logits(pm).tolist()}, open(os.path.join(out, "reference.json"), "w"))
    print(f"{case}: {sum('lora_A' in n for n, _ in pm.named_parameters())} adapted modules -> {out}")


def check(case, adapter_dir):
    pm = PeftModel.from_pretrained(base_model(case), adapter_dir).eval()
    # dsv3's own logits when it wrote them beside its adapters, else the committed reference.
    own = os.path.join(adapter_dir, "reference.json")
    ref = json.load(open(own if os.path.exists(own) else os.path.join(FIXTURES, "peft", case, "reference.json")))
    d = (logits(pm) - torch.tensor(ref["logits"])).abs().max().item()
    print(f"{case}: peft with the adapters in {adapter_dir}: max |logits - reference| = {d:.3g}")
    return d


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check-all":
        # The test: every adapter folder dsv3 wrote (DSV3_PEFT_OUT) loads in peft with its logits.
        worst = max(check(c, os.path.join(sys.argv[2], d)) for c in CASES for d in (c, c + "-dsv3"))
        sys.exit(0 if worst < 1e-4 else f"peft's logits differ from dsv3's by {worst:.3g}")
    elif len(sys.argv) == 3:
        check(sys.argv[1], sys.argv[2])
    else:
        for c in CASES:
            make(c)
