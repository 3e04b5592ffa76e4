"""Benchmark of kt-marlin's fused MoE experts (``torch.ops.kt_marlin.fused_experts``): one
MoE layer's routed experts at decode batch sizes, as a fraction of the HBM bandwidth measured
in the same run.

- ceiling: ``bench_linear.hbm_ceiling`` (a 1 GiB device-to-device copy, read + write);
- shapes: DeepSeek-V3 (H 7168, I 2048, E 256, K 8) and Qwen3-30B-A3B (H 2048, I 768, E 128,
  K 8), T in {1, 4, 16, 64}, weights int4 (group 128, fp16 scales/offsets) and bf16;
- bytes: the weights of the experts the routing selects (each distinct expert's gate, up and
  down once, with its scales), over the time, over the copy bandwidth.

Weights are random tensors built in place on the GPU (a DeepSeek-V3 layer is 22.5 GB in bf16,
5.7 GB in int4; one format at a time). Each timed CUDA graph (``bench_linear.graph_time``)
holds ``CALLS`` calls with different random routings (top-k without repeats, like a router),
so consecutive calls touch mostly different experts and the weights come from HBM.

An int4 tile sweep at T = 1 and 16 (``SWEEP``: GEMV blocks of one row and ``tl.dot`` blocks of
16 rows, several ``BLOCK_N`` / ``BLOCK_K`` / warps / stages) shows what the heuristic of
``fused_moe.choose_config`` leaves on the table.

Usage: ``python bench_experts.py --out results.json`` on the GPU host (then ``report.py``);
``TRITON_INTERPRET=1 python bench_experts.py --smoke --out x.json`` runs a tiny shape on CPU
tensors in Triton's interpreter (wall-clock timings, only to check that it runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: (model, H, I, E, K)
SHAPES = [("DeepSeek-V3", 7168, 2048, 256, 8), ("Qwen3-30B-A3B", 2048, 768, 128, 8)]
SMOKE_SHAPES = [("tiny", 128, 128, 8, 2)]
TOKENS = (1, 4, 16, 64)
CALLS = 8  # routings per timed graph
#: int4 sweep: (BLOCK_M, BLOCK_N, BLOCK_K target, num_warps, num_stages)
SWEEP = [(1, 64, 256, 4, 3), (1, 32, 512, 4, 3), (16, 64, 256, 4, 3), (16, 64, 128, 4, 3), (16, 128, 128, 4, 3),
         (16, 32, 128, 4, 3)]


def make_weights(fmt: str, E: int, H: int, I: int, device: str, group: int = 128) -> dict:
    """Random packed weights of ``fused_experts`` (see ``kt_marlin.fused_moe``), built in place."""
    if fmt == "bf16":
        w13 = torch.empty((E, 2 * I, H), dtype=torch.bfloat16, device=device).normal_(0, H ** -0.5)
        w2 = torch.empty((E, H, I), dtype=torch.bfloat16, device=device).normal_(0, I ** -0.5)
        return dict(w13=w13, s13=None, o13=None, w2=w2, s2=None, o2=None, bits=16, group13=0, group2=0)

    def packed(n, k):  # int16 mma layout (packing.to_mma): random nibbles
        qw = torch.randint(-2**15, 2**15 - 1, (E, n, k // 4), dtype=torch.int16, device=device)
        s = torch.full((E, n, k // group), 0.02 / k ** 0.5, dtype=torch.float16, device=device)
        return qw, s, (-8 * s.float()).half()

    w13, s13, o13 = packed(2 * I, H)
    w2, s2, o2 = packed(H, I)
    return dict(w13=w13, s13=s13, o13=o13, w2=w2, s2=s2, o2=o2, bits=4, group13=group, group2=group)


def expert_bytes(w: dict) -> int:
    """Bytes of one expert's gate, up and down (with scales and offsets)."""
    total = 0
    for name in ("w13", "s13", "o13", "w2", "s2", "o2"):
        t = w[name]
        if t is not None:
            total += t[0].numel() * t.element_size()
    return total


def routings(T: int, E: int, K: int, device: str, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for _ in range(CALLS):
        ids = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K].to(torch.int32)  # [T, K], distinct per token
        weights = torch.rand(T, K, generator=gen)
        out.append((ids.to(device), weights.to(device)))
    return out


def wall_time(fns) -> float:
    """Seconds per call, wall clock (CPU tensors in the interpreter)."""
    for fn in fns:
        fn()
    start = time.perf_counter()
    for fn in fns:
        fn()
    return (time.perf_counter() - start) / len(fns)


def timed(fns, device: str) -> float:
    if device == "cuda":
        from bench_linear import graph_time

        return graph_time(fns)
    return wall_time(fns)


def bench_shape(model: str, H: int, I: int, E: int, K: int, fmt: str, device: str, ceiling: float,
                tokens, sweep_tokens=(), deadline: float = float("inf")) -> tuple[list[dict], list[dict]]:
    """Rows of the heuristic's config for each T, and a tile sweep for each T in ``sweep_tokens``."""
    from kt_marlin.fused_moe import block_k, choose_config, launch

    w = make_weights(fmt, E, H, I, device)
    slot_of = torch.cat([torch.arange(E, dtype=torch.int32), torch.tensor([-1], dtype=torch.int32)]).to(device)
    per_expert = expert_bytes(w)
    gen = torch.Generator().manual_seed(0)
    rows, sweep = [], []
    for T in tokens:
        x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
        calls = routings(T, E, K, device, gen)
        distinct = sum(int(torch.unique(ids).numel()) for ids, _ in calls) / len(calls)
        nbytes = distinct * per_expert

        def run(config=None):
            fns = [lambda c=c: launch(x, c[0], c[1], slot_of, w["w13"], w["s13"], w["o13"], w["w2"], w["s2"],
                                      w["o2"], w["bits"], w["group13"], w["group2"], "silu", config)
                   for c in calls]
            return timed(fns, device)

        seconds = run()
        rows.append({"model": model, "format": fmt, "T": T, "H": H, "I": I, "E": E, "K": K,
                     "ms": seconds * 1e3, "experts_touched": distinct, "weight_bytes": nbytes,
                     "GBps": nbytes / seconds / 1e9, "fraction_of_copy": nbytes / seconds / ceiling,
                     "config": choose_config(T, K, E, H, I, w["bits"], w["group13"], w["group2"])})
        print(f"{model:14s} {fmt:5s} T={T:3d}  {seconds * 1e3:8.3f} ms  {distinct:6.1f} experts  "
              f"{nbytes / seconds / 1e9:7.0f} GB/s  {rows[-1]['fraction_of_copy']:.2f} of copy", flush=True)
        if T not in sweep_tokens:
            continue
        for bm, bn, bk, warps, stages in SWEEP:
            if time.time() > deadline:
                break
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K_UP": block_k(H, w["bits"], w["group13"], bk),
                   "BLOCK_K_DOWN": block_k(I, w["bits"], w["group2"], bk), "num_warps": warps, "num_stages": stages}
            try:
                s = run(cfg)
            except Exception as exc:  # a tile that does not compile (shared memory, registers) is recorded
                sweep.append({"case": f"{model} {fmt} T={T}", "config": cfg, "error": repr(exc)[:200]})
                continue
            print(f"  sweep {cfg}: {s * 1e3:.3f} ms", flush=True)
            sweep.append({"case": f"{model} {fmt} T={T}", "config": cfg, "ms": s * 1e3,
                          "fraction_of_copy": nbytes / s / ceiling})
    return rows, sweep


def cpu_ceiling() -> dict:
    src = torch.empty(64 << 20, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty_like(src)
    t = wall_time([lambda: dst.copy_(src)] * 4)
    return {"bytes": 2 * src.numel(), "seconds": t, "GBps": 2 * src.numel() / t / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny shape, CPU tensors (TRITON_INTERPRET=1)")
    parser.add_argument("--formats", default="int4,bf16")
    parser.add_argument("--no-sweep", action="store_true", help="skip the int4 tile sweep")
    parser.add_argument("--sweep-tokens", default="1,16", help="T values of the int4 tile sweep")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; later shapes are skipped past it")
    args = parser.parse_args()
    import triton

    began = time.time()
    device = "cpu" if args.smoke else "cuda"
    result = {"device": "cpu (interpreter)" if args.smoke else torch.cuda.get_device_name(),
              "torch": torch.__version__, "triton": triton.__version__}

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    if args.smoke:
        ceiling = cpu_ceiling()
    else:
        from bench_linear import hbm_ceiling

        ceiling = hbm_ceiling()
    result["hbm_copy"] = ceiling
    print(f"copy ceiling: {ceiling['GBps']:.0f} GB/s", flush=True)
    save()
    result["experts"], result["experts_sweep"] = [], []
    for model, H, I, E, K in SMOKE_SHAPES if args.smoke else SHAPES:
        for fmt in args.formats.split(","):
            if time.time() - began > args.budget:
                result["skipped_after"] = f"{model} {fmt}: budget of {args.budget}s spent"
                break
            tokens = (1, 3) if args.smoke else TOKENS
            sweep_tokens = () if args.smoke or args.no_sweep or fmt != "int4" else \
                tuple(int(t) for t in args.sweep_tokens.split(","))
            rows, sweep = bench_shape(model, H, I, E, K, fmt, device, ceiling["GBps"] * 1e9, tokens,
                                      sweep_tokens, began + args.budget)
            result["experts"] += rows
            result["experts_sweep"] += sweep
            save()
            if device == "cuda":
                torch.cuda.empty_cache()  # this format's weights are gone with bench_shape's frame
    result["elapsed_s"] = time.time() - began
    save()


if __name__ == "__main__":
    main()
