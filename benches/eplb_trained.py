#!/usr/bin/env python3
"""Expert-parallel load imbalance on routing statistics from models trained by `dsv3 train`
(issue 6): per MoE layer, the per-expert token counts of the last STEPS training steps (the
`expert_load` of metrics.jsonl), placed on RANKS ranks statically (expert e on rank e*R/E) and by
`dsv3 eplb` with 0, R and 2R redundant slots (global policy). Imbalance = max/mean tokens per rank.

    python benches/eplb_trained.py runs/exp/aux-free runs/exp/none --ranks 4 --steps 50
"""
import argparse
import json
import subprocess
import tempfile

ap = argparse.ArgumentParser()
ap.add_argument("runs", nargs="+")
ap.add_argument("--ranks", type=int, default=4)
ap.add_argument("--steps", type=int, default=50)
ap.add_argument("--dsv3", default="target/release/dsv3")
a = ap.parse_args()


def imbalance(loads):
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean else 1.0


print(f"| run | layer | static | EPLB, no replica | +{a.ranks} replicas | +{2 * a.ranks} replicas |")
print("|---|---|---|---|---|---|")
for run in a.runs:
    rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
    recent = [r["expert_load"] for r in rows if "expert_load" in r][-a.steps:]
    layers = len(recent[0])
    load = [[sum(step[l][e] for step in recent) for e in range(len(recent[0][l]))] for l in range(layers)]
    e = len(load[0])
    results = {}
    for extra in [0, a.ranks, 2 * a.ranks]:
        slots = e + extra
        slots += (-slots) % a.ranks
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump(load, f)
            f.flush()
            out = subprocess.run([a.dsv3, "eplb", "--load", f.name, "--replicas", str(slots), "--gpus", str(a.ranks), "--json"],
                                 check=True, capture_output=True, text=True).stdout
        p = json.loads(out)
        per = slots // a.ranks
        for l in range(layers):
            ranks = [sum(load[l][x] / p["logcnt"][l][x] for x in p["phy2log"][l][g * per:(g + 1) * per]) for g in range(a.ranks)]
            results.setdefault(l, []).append(imbalance(ranks))
    for l in range(layers):
        static = imbalance([sum(load[l][x] for x in range(g * e // a.ranks, (g + 1) * e // a.ranks)) for g in range(a.ranks)])
        name = "MTP" if l == layers - 1 else str(l + 1)
        print(f"| {run.split('/')[-1]} | {name} | {static:.3f} | " + " | ".join(f"{v:.3f}" for v in results[l]) + " |")
