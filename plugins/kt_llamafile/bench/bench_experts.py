"""One MoE layer of routed experts on kt-llamafile: tokens/s per token count, synchronous forward
and asynchronous job (submit + wait, what a CUDA-graph host node pair runs).

    python plugins/kt_llamafile/bench/bench_experts.py [--threads N] [--pool own|shared]
        [--types Q4_K,Q4_K,Q6_K] [--experts 256] [--tokens 1,64,512] [--out FILE]

- Layer: DeepSeek-V3 routed experts (hidden 7168, intermediate 2048, top-8) of ``--experts``
  experts, gate/up/down GGUF types from ``--types`` (Q4_K_M's mix by default), random routing
  (K distinct experts per token, uniform).
- Per token count T: best-of-passes wall time of ``experts(x, ids, w)`` and of a job bound to
  fixed buffers (bf16 x/y, int64 ids, as ``HostExpertsRunner`` uses it); tokens/s; the weight
  bytes of the experts the routing touched, and for T = 1 the GB/s this makes against the read
  bandwidth measured in the same run with the same pool (``fraction``).

Writes JSON (default ``bench/results/experts-<cpu>-<threads>t.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
H, I, K = 7168, 2048, 8


def make_layer(types: list[str], experts: int, threads: int):
    from kt_llamafile.experts import LlamafileExperts
    from kt_llamafile.random_blocks import random_weight
    from ktcore.ops.experts import ExpertsSpec
    from ktcore.ops.weights import GGUFWeight

    rng = np.random.default_rng(0)
    sources = {}
    for name, qtype, rows, k in (("gate", types[0], I, H), ("up", types[1], I, H), ("down", types[2], H, I)):
        one = random_weight(qtype, rows, k, rng)  # [rows, row_bytes]: one expert, copied E times
        data = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(one, (experts, *one.shape))))
        sources[name] = GGUFWeight(data, qtype, (experts, rows, k))
    layer = LlamafileExperts(ExpertsSpec(experts, H, I, K), "cpu", {"threads": threads})
    layer.load_weights(sources)
    return layer


def routing(T: int, experts: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, experts, generator=g).topk(K, dim=1).indices  # [T, K] distinct per token
    return torch.randn(T, H, generator=g), ids, torch.rand(T, K, generator=g)


def best_time(fn, passes: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def expert_bytes(layer) -> int:
    return sum(rows.numel() // rows.shape[0] for rows in layer.rows.values())


def bench_tokens(layer, T: int, passes: int, ceiling: float) -> dict:
    x, ids, w = routing(T, layer.spec.num_experts, T)
    sync = best_time(lambda: layer(x, ids, w), passes)
    xb, yb = x.bfloat16(), torch.empty(T, H, dtype=torch.bfloat16)
    job = layer.make_job(xb, ids, w, yb)
    asyn = best_time(job, passes)
    touched = int(torch.unique(ids).numel()) * expert_bytes(layer)
    r = {"sync_ms": sync * 1e3, "job_ms": asyn * 1e3, "tokens_per_s": T / sync, "job_tokens_per_s": T / asyn,
         "experts_touched": int(torch.unique(ids).numel()), "weight_bytes_touched": touched}
    if T == 1:
        r["gbs"] = touched / sync / 1e9
        r["fraction"] = r["gbs"] / ceiling
    return r


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, str(HERE))
    from bench_gemv import ReadProbe, cpu_name, cpu_tag, llc_bytes, select_pool

    from kt_llamafile import _lib

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=_lib.default_threads())
    parser.add_argument("--pool", choices=("own", "shared"), default="own")
    parser.add_argument("--types", default="Q4_K,Q4_K,Q6_K", help="gate,up,down GGUF types")
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--tokens", default="1,64,512")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    types = args.types.split(",")
    if len(types) != 3:
        parser.error("--types needs three GGUF types: gate,up,down")
    pool_info = select_pool(args.pool, args.threads)
    probe = ReadProbe(args.threads, max(4 * llc_bytes(), 512 << 20))
    bw_before = probe.best()
    layer = make_layer(types, args.experts, args.threads)
    results = {t: bench_tokens(layer, int(t), args.passes, bw_before) for t in args.tokens.split(",") if t}
    bw_after = probe.best()
    result = {
        "host": {"cpu": cpu_name(), "isa": _lib.selected_isa(), "physical_cores": _lib.physical_cores()},
        "threads": args.threads, "pool": pool_info,
        "layer": {"experts": args.experts, "hidden": H, "inter": I, "top_k": K, "types": types,
                  "expert_bytes": expert_bytes(layer)},
        "read_bandwidth_gbs": {"before": bw_before, "after": bw_after},
        "tokens": results,
        "method": f"best of {args.passes} passes, wall clock; job: bf16 x/y, int64 ids, submit + wait",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"{cpu_name()}  isa={_lib.selected_isa()}  threads={args.threads}  pool={pool_info}  "
          f"read bandwidth {bw_before:.1f} / {bw_after:.1f} GB/s (before / after)")
    print(f"{'T':>5s} {'sync ms':>9s} {'job ms':>9s} {'tok/s':>9s} {'job tok/s':>10s} {'experts':>8s} {'GB/s':>6s} {'frac':>5s}")
    for t, r in results.items():
        gbs = f"{r['gbs']:6.1f} {r['fraction']:5.2f}" if "gbs" in r else ""
        print(f"{t:>5s} {r['sync_ms']:9.3f} {r['job_ms']:9.3f} {r['tokens_per_s']:9.0f} {r['job_tokens_per_s']:10.0f} "
              f"{r['experts_touched']:8d} {gbs}")
    out = args.out or HERE / "results" / f"experts-{cpu_tag()}-{args.threads}t.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
