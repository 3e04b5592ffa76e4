"""Decode speed of a tiny model with every module on one GPU: eager decode vs the decode
step replayed as a CUDA graph (launch overhead is what the graph removes). Prints a table and
writes JSON: python bench/decode_graph.py OUT.json"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import ktcore
from ktcore.models.presets import ARCHITECTURES, make_config
from ktcore.models.synth import SyntheticWeights

RULES = "default_device: cuda:0\nrules:\n  - match: {module: mlp.experts}\n    replace: {op: experts, backend: torch, device: cuda:0}\n"


def decode_tokens_per_s(model, prompt, tokens: int, use_graph: bool) -> float:
    model.generate(prompt, 8, stop_ids=[], use_graph=use_graph)  # warm-up (and capture)
    best = 0.0
    for _ in range(3):
        model.generate(prompt, tokens, stop_ids=[], use_graph=use_graph)
        best = max(best, model.timings.decode_tokens / model.timings.decode_s)
    return best


def main(out: str) -> None:
    rules = Path(tempfile.mkdtemp()) / "all-gpu.yaml"
    rules.write_text(RULES)
    rows = []
    for arch in ARCHITECTURES:
        config = make_config(arch)
        model = ktcore.load(store=SyntheticWeights(config, seed=0, dtype=torch.bfloat16), config=config,
                            rules=rules, dtype="bf16", max_seq_len=256)
        prompt = torch.arange(3, 19)
        eager = decode_tokens_per_s(model, prompt, 128, use_graph=False)
        graph = decode_tokens_per_s(model, prompt, 128, use_graph=True)
        rows.append({"arch": arch, "layers": config.num_hidden_layers, "eager_tokens_per_s": eager,
                     "graph_tokens_per_s": graph, "speedup": graph / eager})
    doc = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "dtype": "bf16",
           "model": "tiny presets, random weights, all modules on cuda:0", "rows": rows,
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(out).write_text(json.dumps(doc, indent=2))
    print(f"{'arch':12} {'eager tok/s':>12} {'graph tok/s':>12} {'speedup':>8}")
    for r in rows:
        print(f"{r['arch']:12} {r['eager_tokens_per_s']:12.1f} {r['graph_tokens_per_s']:12.1f} {r['speedup']:8.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "decode_graph.json")
