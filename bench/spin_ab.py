"""Same-process A/B on the GPU host: ``kt bench``'s 12-layer Qwen3-30B-A3B GGUF decode
(kt-llamafile experts on kt-amx's pool) with the pool's idle spin at 50 µs (what a GGUF-only
model had before commit be7d79e) and at 2000 µs (what kt-llamafile's graph jobs now ask for),
alternated three times, with the doorbell's per-layer split.

    python bench/spin_ab.py      # writes $OUT/spin_ab.json (or ./spin_ab.json)
"""
import json
import os
import sys
from pathlib import Path

import torch

from kt_amx import _lib
from ktcore.runtime import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experts_in_step import load  # noqa: E402


def main() -> dict:
    model = load("gguf")
    prompt = torch.arange(3, 35)
    result = {"runs": []}
    for _ in range(3):
        for spin in (50, 2000):
            clocks: dict = {}
            benchmark.decode_rates(model, prompt, 8, True)  # settle
            _lib.set_spin_us(spin)
            rates = benchmark.decode_rates(model, prompt, 64, True, clocks)
            result["runs"].append({"spin_us": spin, "tokens_per_s": rates, **clocks})
            print(json.dumps(result["runs"][-1]), flush=True)
    Path(os.environ.get("OUT", "."), "spin_ab.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
