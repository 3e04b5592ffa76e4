"""The CPU experts inside the captured decode step against the same experts outside it.

Loads ``kt bench``'s Qwen3-30B-A3B 12-layer case (``--source gguf``: its Q4_K_M GGUF on
kt-llamafile, ``int4``: the synthetic model on kt-amx), decodes with the CUDA graph and reads
the doorbell's clocks (``benchmark.doorbell_clocks``: CPU experts per layer, request to
answer, and the GPU's gap between layers); then times the very same experts objects outside
the step: one job per layer, run back to back from the main thread (kt-llamafile's
``job.run()``, kt-amx's submit + wait), cycling through the layers and 16 random routings.
The difference is what the step's setting costs the CPU experts (waking workers, the calling
thread). On the GPU host:

    python bench/experts_in_step.py --source gguf --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

ROUTINGS = 16


def load(source: str):
    """``kt bench``'s case for ``source``, loaded as ``kt bench`` loads it."""
    from dataclasses import asdict

    from ktcore.models.presets import make_config
    from ktcore.runtime import benchmark

    case = benchmark.CASES["qwen3-30b-a3b-12l-gguf" if source == "gguf" else "qwen3-30b-a3b-12l"]
    config = make_config(case.arch, case.preset, layers=case.layers)
    return benchmark.load_case(case, config, benchmark.Result(case=asdict(case), host={}))


def outside_us(model, runs: int = 240) -> float:
    """Median µs of one layer's CPU experts run back to back outside the step (T = 1)."""
    from ktcore.runtime.blocks import ExpertsParts

    parts = [p for m in model.decoder.modules() if isinstance(m, ExpertsParts) for p in m.parts
             if p.device.type == "cpu"]
    spec = parts[0].spec
    g = torch.Generator().manual_seed(1)
    routes = [torch.rand(1, spec.num_experts, generator=g).topk(spec.top_k, dim=1).indices for _ in range(ROUTINGS)]
    x = torch.randn(1, spec.hidden_size, generator=g).bfloat16()
    w = torch.rand(1, spec.top_k, generator=g)
    jobs = []
    for part in parts:
        ids = torch.empty(1, spec.top_k, dtype=torch.int64)
        job = part.make_job(x, ids, w, torch.empty(1, spec.hidden_size, dtype=torch.bfloat16))
        jobs.append((getattr(job, "run", job), ids))  # kt-llamafile: on this thread; kt-amx: submit + wait
    times = []
    for i in range(runs):
        run, ids = jobs[i % len(jobs)]
        ids.copy_(routes[i % ROUTINGS])
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[len(jobs) * 2:]) * 1e6


def main(argv=None) -> dict:
    from ktcore.runtime import benchmark

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=("gguf", "int4"), default="gguf")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model = load(args.source)
    clocks: dict = {}
    rates = benchmark.decode_rates(model, torch.arange(3, 35), args.tokens, True, clocks)
    result = {"source": args.source, "decode_tokens_per_s": rates, "in_step": clocks,
              "outside_us_per_layer": outside_us(model)}
    result["in_step_minus_outside_us"] = clocks["cpu_us_per_job"] - result["outside_us_per_layer"]
    print(json.dumps(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"experts_in_step_{args.source}.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
