"""One-row linear layers of the decode step: ktcore's Triton GEMV
(``torch.ops.ktcore.decode_gemv``) against cuBLAS (``F.linear``), bf16, on the projection
shapes of the benchmark models (Qwen3-30B-A3B attention and lm_head, DeepSeek-V2-Lite MLA).

Each path is captured in a CUDA graph that calls it once per copy of the weight, with enough
copies that they do not fit in L2 together (a decode step reads each layer's weights cold);
the median replay time over the calls is the time per call (``bench/gqa_decode.py``'s
harness). GB/s counts the weight bytes; "of copy" divides by the device copy bandwidth
measured in the same run. Prints a table and writes JSON:

    python bench/decode_gemv.py --out FILE.json [--sweep]

``--sweep`` also times other tiles (``launch``'s ``config``), to tune ``choose_config``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gqa_decode import copy_bandwidth, graph_us, print_best_of_sweep

#: (model, projection, out_features N, in_features K)
SHAPES = [
    ("Qwen3-30B-A3B", "q/k/v (fused)", 5120, 2048),
    ("Qwen3-30B-A3B", "o_proj", 2048, 4096),
    ("Qwen3-30B-A3B", "lm_head", 151936, 2048),
    ("DeepSeek-V2-Lite", "q_proj", 3072, 2048),
    ("DeepSeek-V2-Lite", "kv_a_proj_with_mqa", 576, 2048),
    ("DeepSeek-V2-Lite", "o_proj", 2048, 2048),
    ("DeepSeek-V2-Lite", "mlp (dense layer) gate_proj", 10944, 2048),
    ("DeepSeek-V2-Lite", "mlp (dense layer) down_proj", 2048, 10944),
]
SWEEP = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
         for bn in (4, 8, 16, 32) for bk in (256, 512, 1024) for nw in (4, 8) for ns in (3,)]


def run_shape(model: str, name: str, n: int, k: int, copy_bw: float, replays: int, sweep: bool) -> dict:
    from ktcore.ops import decode_gemv

    nbytes = n * k * 2
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    copies = max(2, math.ceil(4 * l2 / nbytes))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
    x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    got, want = decode_gemv.decode_gemv(x, weights[0], None).float(), F.linear(x, weights[0]).float()
    rel = float((got - want).abs().max() / want.abs().max())
    gemv_us = graph_us([lambda w=w: decode_gemv.decode_gemv(x, w, None) for w in weights], replays)
    cublas_us = graph_us([lambda w=w: F.linear(x, w) for w in weights], replays)
    row = dict(model=model, projection=name, n=n, k=k, copies=copies,
               config=decode_gemv.choose_config(n, k, x.device), gemv_us=gemv_us, cublas_us=cublas_us,
               speedup=cublas_us / gemv_us, gemv_GBps=nbytes / gemv_us / 1e3, cublas_GBps=nbytes / cublas_us / 1e3,
               gemv_of_copy=nbytes / (gemv_us * 1e-6) / copy_bw, cublas_of_copy=nbytes / (cublas_us * 1e-6) / copy_bw,
               rel_diff_vs_cublas=rel)
    if sweep:
        row["sweep"] = []
        for config in SWEEP:
            if config["BLOCK_K"] > max(16, 2 ** math.ceil(math.log2(k))):
                continue
            us = graph_us([lambda w=w, c=config: decode_gemv.launch(x, w, None, c) for w in weights], replays)
            row["sweep"].append(dict(config, us=us))
    del weights
    torch.cuda.empty_cache()
    return row


def print_table(doc: dict) -> None:
    print(f"{doc['device']}, copy bandwidth {doc['copy_GBps']:.0f} GB/s")
    print(f"{'model':>17} {'projection':>28} {'N':>7} {'K':>6} {'gemv us':>8} {'cuBLAS us':>9} {'speedup':>7} "
          f"{'gemv GB/s':>9} {'cuBLAS GB/s':>11}")
    for r in doc["rows"]:
        print(f"{r['model']:>17} {r['projection']:>28} {r['n']:7d} {r['k']:6d} {r['gemv_us']:8.2f} {r['cublas_us']:9.2f} "
              f"{r['speedup']:7.2f} {r['gemv_GBps']:9.0f} {r['cublas_GBps']:11.0f}")
        print_best_of_sweep(r, 48)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="decode_gemv.json", help="JSON result file (default: %(default)s)")
    parser.add_argument("--replays", type=int, default=100, help="timed graph replays per case (default: %(default)s)")
    parser.add_argument("--sweep", action="store_true", help="also time the kernel under other tiles")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/decode_gemv.py needs a CUDA GPU")
    import triton

    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    rows = [run_shape(*shape, copy_bw, args.replays, args.sweep) for shape in SHAPES]
    doc = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "dtype": "bf16", "copy_GBps": copy_bw / 1e9, "replays": args.replays, "rows": rows,
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print_table(doc)


if __name__ == "__main__":
    main()
