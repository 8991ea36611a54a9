"""Expected output of DeepSeek's `inference/fp8_cast_bf16.py` on the committed FP8 fixture
(tests/fixtures/v3_fp8), for `dsv3 convert --format bf16`'s test.

fp8_cast_bf16.py dequantizes every tensor with a `_scale_inv` sibling with `weight_dequant`:
a Triton kernel computing `y = x.to(float32) * s` per 128×128 block and storing into a tensor of
the default dtype (torch.bfloat16, round to nearest even); other tensors are copied unchanged and
the scale tensors dropped. This script keeps the dequantized tensors only and does the same computation in PyTorch (no GPU/Triton here).

Usage: /opt/fixenv/bin/python scripts/make_fp8_cast_fixture.py
"""
import glob
import os

import torch
from safetensors.torch import load_file, save_file

root = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
src = os.path.join(root, "v3_fp8")
out = {}
for path in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
    tensors = load_file(path)
    for name, w in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        s = tensors.get(name + "_scale_inv")
        if s is None:
            continue  # copied unchanged by the script: nothing to check
        m, n = w.shape
        full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:m, :n]
        out[name] = (w.to(torch.float32) * full).to(torch.bfloat16)
dst = os.path.join(root, "fp8_cast_bf16")
os.makedirs(dst, exist_ok=True)
save_file(out, os.path.join(dst, "expected.safetensors"))
print(f"wrote {len(out)} tensors to {dst}")
