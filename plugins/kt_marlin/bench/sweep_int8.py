"""One-token tiles of kt-marlin's int8 weight-only kernel on the GPU host, against bf16
``F.linear`` and the int4 kernel on the same shapes, as GB/s of the weights read and their
fraction of a device copy measured in the same run.

The shapes are the ones where an int8 weight is read once per token in a decode step:
``lm_head`` (Qwen3-30B-A3B: 151936 x 2048; DeepSeek-V3: 129280 x 7168) and a projection.
Each timing replays a CUDA graph of one call per weight copy, enough copies to stream at least
512 MB, so the weights come from HBM (``bench_linear.graph_time``).

    python plugins/kt_marlin/bench/sweep_int8.py --out int8_sweep.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from bench_linear import L2_FOOTPRINT, graph_time, hbm_ceiling, int4_copies, new_result  # noqa: E402

from kt_marlin.wq_matmul import choose_config, launch  # noqa: E402

SHAPES = [("Qwen3-30B-A3B", "lm_head", 151936, 2048), ("DeepSeek-V3", "lm_head", 129280, 7168),
          ("DeepSeek-V3", "o_proj", 7168, 16384)]
GROUP = 128
TILES = [dict(BLOCK_T=1, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
         for bn, bk, w, st in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (1, 2))]


def int8_copies(n: int, k: int):
    nbytes = n * k + 2 * n * (k // GROUP)
    count = max(1, min(32, -(-L2_FOOTPRINT // nbytes)))
    out = [(torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda"),
            torch.rand(n, k // GROUP, device="cuda").to(torch.float16)) for _ in range(count)]
    return out, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    ceiling = hbm_ceiling()
    result = new_result(ceiling=ceiling, group=GROUP, shapes=[])
    x = torch.randn(1, 16384, device="cuda").to(torch.bfloat16)
    for model, proj, n, k in SHAPES:
        xs = x[:, :k].contiguous()
        copies, nbytes = int8_copies(n, k)
        default = choose_config(1, n, k, 8, GROUP, xs.device)
        rows = []
        for cfg in [default] + TILES:
            if k % cfg["BLOCK_K"]:
                continue
            cfg = dict(cfg, SPLIT_K=cfg.get("SPLIT_K", 1))
            try:
                t = graph_time([lambda q=q, s=s: launch(xs, q, s, None, None, 8, GROUP, cfg) for q, s in copies])
            except Exception as exc:  # noqa: BLE001 - a tile that does not fit is skipped, and said so
                rows.append({"config": cfg, "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
                continue
            rows.append({"config": cfg, "us": t * 1e6, "GBps": nbytes / t / 1e9,
                         "of_copy": nbytes / t / 1e9 / ceiling["GBps"]})
        timed = sorted((r for r in rows[1:] if "us" in r), key=lambda r: r["us"])
        dense = [torch.randn(n, k, device="cuda").to(torch.bfloat16) for _ in range(max(1, len(copies) // 2))]
        bf16_us = graph_time([lambda w=w: F.linear(xs, w) for w in dense]) * 1e6
        del dense
        q4, q4_bytes = int4_copies(n, k)
        int4_us = graph_time([lambda c=c: launch(xs, *c, None, 4, GROUP) for c in q4]) * 1e6
        del q4, copies
        shape = {"model": model, "projection": proj, "N": n, "K": k, "int8_bytes": nbytes,
                 "default": rows[0], "best": timed[:5], "bf16_us": bf16_us, "int4_us": int4_us,
                 "int4_bytes": q4_bytes, "all": rows[1:]}
        result["shapes"].append(shape)
        print(json.dumps({k: v for k, v in shape.items() if k != "all"}), flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
