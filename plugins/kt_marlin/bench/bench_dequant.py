"""Benchmark of kt-marlin's GGUF dequantisation (every type, 7168 x 7168 to bf16) as a
fraction of the HBM copy bandwidth measured in the same run.

Bytes = the GGUF bytes read + the bf16 bytes written, as for a copy (read + write). Each
timing replays a CUDA graph holding one call per distinct copy of the GGUF tensor, with
enough copies (at least 512 MB of GGUF bytes, at most 32 copies) that the input comes from
HBM, not the 50 MB L2. A sweep of the K-quant kernel's super-blocks per program and warps
follows, each point checked against the default config's output. Usage:
``python bench_dequant.py --out results.json [--md results.md] [--budget SECONDS] [--no-sweep]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_linear import graph_time, hbm_ceiling, new_result, result_writer  # same directory: the shared helpers

N = K = 7168
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
INPUT_FOOTPRINT = 512 << 20  # GGUF bytes each timed graph streams through, at least
MAX_COPIES = 32
#: (super-blocks per program, warps) the sweep tries, in this order
SWEEP = [(8, 2), (16, 2), (32, 4), (32, 8), (64, 8), (8, 4), (16, 8), (64, 4), (128, 8)]


def gguf_copies(qtype: str) -> list[torch.Tensor]:
    """Distinct random GGUF tensors of ``qtype`` (random bytes are valid blocks for every type)."""
    from kt_marlin.dequant import QTYPES

    _, qk, size = QTYPES[qtype]
    nbytes = N * K // qk * size
    copies = min(MAX_COPIES, -(-INPUT_FOOTPRINT // nbytes))
    return [torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda") for _ in range(copies)]


def time_type(qtype: str, copies: list[torch.Tensor], config=None) -> float:
    from kt_marlin.dequant import launch

    outs = [torch.empty(N, K, dtype=torch.bfloat16, device="cuda") for _ in range(2)]  # alternate: no reuse wait
    return graph_time([lambda i=i, c=c: launch(c, outs[i % 2], qtype, config) for i, c in enumerate(copies)])


def render(r: dict) -> str:
    """The result as Markdown (``--md``)."""
    lines = [f"# kt-marlin GGUF dequantisation on {r['device']} (torch {r['torch']}, triton {r['triton']})", "",
             f"{N} x {K} to bf16. Ceiling measured in this run: copy {r['hbm_copy']['GBps']:.0f} GB/s (1 GiB device "
             "copy, read + write). Bytes = GGUF bytes read + bf16 bytes written; each graph cycles over distinct "
             "copies of at least 512 MB of GGUF bytes in all, so the input comes from HBM.", "",
             "| type | copies | µs | GB/s (read + write) | of copy | config (super-blocks, warps) |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for row in r.get("dequant_bf16", []):
        cfg = row["config"] or "-"
        lines.append(f"| {row['qtype']} | {row['copies']} | {row['seconds'] * 1e6:.1f} | {row['GBps']:.0f} | "
                     f"{row['fraction_of_copy']:.2f} | {cfg} |")
    if r.get("sweep"):
        lines += ["", "K-quant sweep (best three per type):", "",
                  "| type | super-blocks | warps | µs | of copy |", "| --- | ---: | ---: | ---: | ---: |"]
        for qtype in TYPES:
            points = sorted((p for p in r["sweep"] if p["qtype"] == qtype), key=lambda p: p["seconds"])
            for p in points[:3]:
                lines.append(f"| {qtype} | {p['config'][0]} | {p['config'][1]} | {p['seconds'] * 1e6:.1f} | "
                             f"{p['fraction_of_copy']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="JSON result")
    parser.add_argument("--md", help="also write the result as Markdown here")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds; the sweep stops past it")
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args()
    from kt_marlin.dequant import KQUANT_CONFIG, launch

    began = time.time()
    result = new_result(shape=[N, K])
    save = result_writer(result, args.out, args.md, render)
    result["hbm_copy"] = hbm_ceiling()
    gbps = result["hbm_copy"]["GBps"] * 1e9
    result["dequant_bf16"], result["sweep"] = [], []
    kquants = {}  # K-quant type -> (copies, the default config's output) for the sweep
    for qtype in TYPES:
        copies = gguf_copies(qtype)
        t = time_type(qtype, copies)
        moved = copies[0].numel() + N * K * 2
        row = {"qtype": qtype, "copies": len(copies), "seconds": t, "GBps": moved / t / 1e9,
               "fraction_of_copy": moved / t / gbps, "config": KQUANT_CONFIG.get(qtype)}
        result["dequant_bf16"].append(row)
        save()
        print(f"{qtype}: {t * 1e6:.1f} us, {row['GBps']:.0f} GB/s = {row['fraction_of_copy']:.2f} of copy", flush=True)
        if qtype in KQUANT_CONFIG and not args.no_sweep:
            want = torch.empty(N, K, dtype=torch.bfloat16, device="cuda")
            launch(copies[0], want, qtype)
            kquants[qtype] = (copies, want, moved)
    # the sweep, one config at a time over every K-quant, until the budget is spent
    for config in SWEEP:
        for qtype, (copies, want, moved) in kquants.items():
            if time.time() - began > args.budget:
                break
            got = torch.empty_like(want)
            launch(copies[0], got, qtype, config)
            same = bool(((got == want) | (got.isnan() & want.isnan())).all())
            t = time_type(qtype, copies, config)
            result["sweep"].append({"qtype": qtype, "config": list(config), "seconds": t, "same": same,
                                    "fraction_of_copy": moved / t / gbps})
        save()
    result["elapsed_s"] = time.time() - began
    save()


if __name__ == "__main__":
    main()
