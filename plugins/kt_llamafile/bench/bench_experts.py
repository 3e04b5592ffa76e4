"""One MoE layer of routed experts on kt-llamafile: time per token count, synchronous forward
and asynchronous job (submit + wait, what a CUDA-graph host node pair runs).

    python plugins/kt_llamafile/bench/bench_experts.py [--shape qwen3-30b-a3b] [--threads N]
        [--pool own|shared] [--types Q4_K,Q4_K,Q6_K] [--tokens 1,4,64,512] [--out FILE]

- Layer: the routed experts of ``--shape`` (DeepSeek-V3: hidden 7168, intermediate 2048, 256
  experts; Qwen3-30B-A3B: 2048, 768, 128; top-8), gate/up/down GGUF types from ``--types``
  (Q4_K_M's mix by default), random valid blocks.
- Like a real model, where every layer has its own weights, no repetition finds the previous
  one's weights in the cache: repetitions cycle through 16 random routings (K distinct experts
  per token, uniform) and through copies of the layer that together exceed 3x the last-level
  cache (``layer_copies``).
- Per token count T: median wall time of ``experts(x, ids, w)`` and of a job bound to fixed
  buffers (bf16 x/y, int64 ids, as ``HostExpertsRunner`` uses it; the routing is copied into
  its buffers before each run, outside the timing), submitted to the pool's dispatcher and
  waited for (``job_ms``) and run on the calling thread as a doorbell's watcher runs it in the
  decode step (``job_run_ms``); the mean weight bytes of the experts a routing touches, the
  GB/s this makes, and its fraction of the read bandwidth measured in the same run with the
  same pool (the higher of a reading before and one after the layer runs).

Writes JSON (default ``bench/results/experts-<shape>-<cpu>-<threads>t.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SHAPES = {  # name: (hidden, expert intermediate, top-k, experts)
    "deepseek-v3": (7168, 2048, 8, 256),
    "qwen3-30b-a3b": (2048, 768, 8, 128),
}
ROUTINGS = 16


def make_layer(shape: str, types: list[str], threads: int, rng):
    from kt_llamafile.experts import LlamafileExperts
    from kt_llamafile.random_blocks import random_weight
    from ktcore.ops.experts import ExpertsSpec
    from ktcore.ops.weights import GGUFWeight

    H, I, K, E = SHAPES[shape]
    sources = {}
    for name, qtype, rows, k in (("gate", types[0], I, H), ("up", types[1], I, H), ("down", types[2], H, I)):
        one = random_weight(qtype, rows, k, rng)  # [rows, row_bytes]: one expert, copied E times
        data = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(one, (E, *one.shape))))
        sources[name] = GGUFWeight(data, qtype, (E, rows, k))
    layer = LlamafileExperts(ExpertsSpec(E, H, I, K), "cpu", {"threads": threads})
    layer.load_weights(sources)
    return layer


def median_time(fn, prepare, min_reps: int = 8, budget_s: float = 1.0) -> float:
    """Median seconds of fn() over repetitions i = 0, 1, ..., each after prepare(i) (untimed)."""
    for i in range(2):  # warm-up
        prepare(i)
        fn()
    times, start = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 200):
        prepare(len(times) + 2)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def expert_bytes(layer) -> int:
    return sum(rows.shape[1] for rows in layer.rows.values())  # rows: [E, bytes of one expert]


def bench_tokens(layers: list, T: int) -> dict:
    spec = layers[0].spec
    H, K, E = spec.hidden_size, spec.top_k, spec.num_experts
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=g)
    routes = [(torch.rand(T, E, generator=g).topk(K, dim=1).indices, torch.rand(T, K, generator=g))
              for _ in range(ROUTINGS)]  # [T, K] distinct experts per token, weights
    current = {}

    def pick(i: int) -> None:
        current["layer"] = layers[i % len(layers)]
        current["ids"], current["w"] = routes[i % ROUTINGS]

    sync = median_time(lambda: current["layer"](x, current["ids"], current["w"]), pick)
    xb = x.bfloat16()
    bufs = [(torch.empty(T, K, dtype=torch.int64), torch.empty(T, K)) for _ in layers]
    jobs = [layer.make_job(xb, ids, w, torch.empty(T, H, dtype=torch.bfloat16)) for layer, (ids, w) in zip(layers, bufs)]

    def pick_job(i: int) -> None:
        c = i % len(layers)
        ids, w = routes[i % ROUTINGS]
        bufs[c][0].copy_(ids), bufs[c][1].copy_(w)
        current["job"] = jobs[c]

    asyn = median_time(lambda: current["job"](), pick_job)
    direct = median_time(lambda: current["job"].run(), pick_job)
    touched = statistics.mean(int(torch.unique(ids).numel()) for ids, _ in routes)
    nbytes = touched * expert_bytes(layers[0])
    return {"sync_ms": sync * 1e3, "job_ms": asyn * 1e3, "job_run_ms": direct * 1e3, "tokens_per_s": T / sync,
            "experts_touched": touched, "weight_bytes_touched": nbytes, "gbs": nbytes / sync / 1e9,
            "job_run_gbs": nbytes / direct / 1e9}


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, str(HERE))
    from bench_gemv import ReadProbe, cpu_name, cpu_tag, llc_bytes, select_pool

    from kt_llamafile import _lib

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="qwen3-30b-a3b")
    parser.add_argument("--threads", type=int, default=_lib.default_threads())
    parser.add_argument("--pool", choices=("own", "shared"), default="own")
    parser.add_argument("--types", default="Q4_K,Q4_K,Q6_K", help="gate,up,down GGUF types")
    parser.add_argument("--tokens", default="1,4,64,512")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    types = args.types.split(",")
    if len(types) != 3:
        parser.error("--types needs three GGUF types: gate,up,down")
    pool_info = select_pool(args.pool, args.threads)
    probe = ReadProbe(args.threads, max(4 * llc_bytes(), 512 << 20))
    bw_before = probe.best()
    rng = np.random.default_rng(0)
    first = make_layer(args.shape, types, args.threads, rng)
    layer_bytes = expert_bytes(first) * first.spec.num_experts
    copies = max(1, min(8, -(-3 * llc_bytes() // layer_bytes)))
    layers = [first] + [make_layer(args.shape, types, args.threads, rng) for _ in range(copies - 1)]
    results = {t: bench_tokens(layers, int(t)) for t in args.tokens.split(",") if t}
    bw_after = probe.best()
    ceiling = max(bw_before, bw_after)
    for r in results.values():
        r["fraction"], r["job_run_fraction"] = r["gbs"] / ceiling, r["job_run_gbs"] / ceiling
    H, I, K, E = SHAPES[args.shape]
    result = {
        "host": {"cpu": cpu_name(), "isa": _lib.selected_isa(), "physical_cores": _lib.physical_cores(),
                 "llc_bytes": llc_bytes()},
        "threads": args.threads, "pool": pool_info,
        "layer": {"shape": args.shape, "experts": E, "hidden": H, "inter": I, "top_k": K, "types": types,
                  "expert_bytes": expert_bytes(first), "layer_copies": copies, "routings": ROUTINGS},
        "read_bandwidth_gbs": {"before": bw_before, "after": bw_after, "ceiling": ceiling},
        "tokens": results,
        "method": "median wall clock over repetitions cycling through the routings and layer copies; "
                  "job: bf16 x/y, int64 ids, submit + wait (job_ms) or run on the calling thread (job_run_ms)",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"{cpu_name()}  isa={_lib.selected_isa()}  threads={args.threads}  pool={pool_info}  {args.shape} "
          f"{'/'.join(types)} x{copies} copies  read bandwidth {bw_before:.1f} / {bw_after:.1f} GB/s (before / after)")
    print(f"{'T':>5s} {'sync ms':>9s} {'job ms':>9s} {'run ms':>9s} {'tok/s':>9s} {'experts':>8s} "
          f"{'GB/s':>6s} {'frac':>5s} {'run frac':>8s}")
    for t, r in results.items():
        print(f"{t:>5s} {r['sync_ms']:9.3f} {r['job_ms']:9.3f} {r['job_run_ms']:9.3f} {r['tokens_per_s']:9.0f} "
              f"{r['experts_touched']:8.1f} {r['gbs']:6.1f} {r['fraction']:5.2f} {r['job_run_fraction']:8.2f}")
    out = args.out or HERE / "results" / f"experts-{args.shape}-{cpu_tag()}-{args.threads}t.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
