"""Per-MoE-layer time of kt-amx's AmxExperts on DeepSeek-V3 and Qwen3-30B-A3B shapes.

    python plugins/kt_amx/bench/bench_experts.py --json out.json            # full table
    python plugins/kt_amx/bench/bench_experts.py --quick                    # small smoke run
    KT_AMX_NUMA=2 python plugins/kt_amx/bench/bench_experts.py --numa split # I cut over 2 (simulated) nodes

For each (shape, format, T) it prints the median time of one layer forward and its fraction of
a ceiling measured in the same run:

- decode (T <= 32): the read-bandwidth floor = bytes of the selected experts' packed weights
  (codes + scales) / host read bandwidth (every worker streaming its share of a large buffer
  with the ISA's widest loads), so ``frac_bw`` = floor / time;
- prefill (T >= 256): 2*T*K*3*H*I operations / time against the measured peak int8 rate of
  the selected ISA (AMX tdpbsud, vpdpbusd or vpmaddubsw loops on every worker): ``frac_peak``.

Weights are random packed codes and scales (no quantisation pass: a DeepSeek-V3 layer is 5.6 GB
of int4). Routing: K distinct experts per token, uniform. Like a real model, where every layer
has its own weights, no repetition finds the previous one's weights in the cache: repetitions
cycle through 8 routings and through copies of the layer that together exceed 3x the L3 cache. With CUDA present, ``--gpu-io`` also
times inputs and outputs on the GPU (copy to the host, CPU experts, copy back), as kt-kernel's
table was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from kt_amx import _lib
from kt_amx.experts import AmxExperts
from kt_amx.numa import read_topology
from kt_amx.packing import LayerFormat, PackedMatrix
from ktcore.ops.experts import ExpertsSpec

SHAPES = {  # name: (hidden, expert intermediate, top-k, experts)
    "deepseek-v3": (7168, 2048, 8, 256),
    "qwen3-30b-a3b": (2048, 768, 8, 128),
}
FORMATS = {
    "int4": LayerFormat("int4", 128, symmetric=True),  # 4.125 bits per weight
    "int8": LayerFormat("int8", 0),  # per output channel
}
TOKENS = (1, 4, 32, 256, 1024)


def random_bytes(n: int, block: torch.Tensor) -> torch.Tensor:
    """n random-looking bytes: a random block tiled (generating GBs with randint is slow)."""
    reps = -(-n // block.numel())
    return block.repeat(reps)[:n]


def l3_bytes() -> int:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return 64 << 20
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
    return int(text.rstrip("KMG")) * scale


def random_layer(shape: str, fmt: LayerFormat, threads: int, numa: str = "split") -> AmxExperts:
    H, I, K, E = SHAPES[shape]
    amx = AmxExperts(ExpertsSpec(E, H, I, K), "cpu", {"format": fmt.format, "threads": threads, "numa": numa})
    block = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8)
    packed = {}
    for name, (n, k) in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
        per_expert = n * k // (2 if fmt.format == "int4" else 1)
        w = random_bytes(E * per_expert, block).view(E, per_expert)
        G = fmt.group_for(k)
        scale = (torch.rand(E, n // 16, k // G, 16) * 1e-3 + 1e-3).to(fmt.scale_dtype)
        packed[name] = PackedMatrix(w, scale, None, n, k)
    amx.layer_format = fmt
    amx.packed = packed
    amx._create_layer()
    return amx


def expert_bytes(amx: AmxExperts) -> int:
    """Bytes one forward reads per active expert (one copy, also for numa mirror)."""
    copies = amx.plan.n_parts if amx.plan is not None and amx.plan.mode == "mirror" else 1
    return amx.packed_bytes() // copies // amx.spec.num_owned


def read_bandwidth(threads: int, gib: float) -> tuple[float, float]:
    """(best, median) bytes/s of all workers streaming a buffer of ``gib`` (at least 8x L3)."""
    ffi, lib = _lib.kernels()
    n = max(int(gib * (1 << 30)), 8 * l3_bytes()) // 4096 * 4096
    buf = random_bytes(n, torch.randint(0, 256, (1 << 24,), dtype=torch.uint8))
    secs = [lib.kt_pool_bench(1, _lib.address(buf), buf.numel(), 0, threads, ffi.NULL) for _ in range(8)]
    return buf.numel() / min(secs), buf.numel() / statistics.median(secs)


def peak_int8(threads: int) -> float:
    """int8 operations/s of the selected ISA's dot-product instruction on all workers."""
    ffi, lib = _lib.kernels()
    ops = ffi.new("int64_t *")
    iters = 20000
    while True:
        sec = lib.kt_pool_bench(2, ffi.NULL, 0, iters, threads, ops)
        if sec > 0.05:
            break
        iters *= 4
    return ops[0] / sec


def time_layer(fn, min_reps: int = 5, budget_s: float = 0.5) -> float:
    """Median seconds of fn(i) for i = 0, 1, ... after two warm-up calls."""
    fn(0), fn(1)
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 64):
        t0 = time.perf_counter()
        fn(len(times) + 2)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


ROUTINGS = 8


def bench_case(layers: list[AmxExperts], T: int, bw: float, peak: float, gpu_io: bool) -> dict:
    spec = layers[0].spec
    H, I, K, E = spec.hidden_size, spec.intermediate_size, spec.top_k, spec.num_experts
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    routes = [(torch.rand(T, E, generator=gen).topk(K, dim=-1).indices.to(torch.int32),
               torch.rand(T, K, generator=gen).softmax(-1)) for _ in range(ROUTINGS)]
    for layer in layers:
        layer.reserve(T, K)

    def step(i):
        ids, w = routes[i % ROUTINGS]
        return layers[i % len(layers)](x, ids, w)

    sec = time_layer(step)
    active = statistics.mean(int(torch.unique(ids).numel()) for ids, _ in routes)
    nbytes = active * expert_bytes(layers[0])
    floor = nbytes / bw
    ops = 2.0 * T * K * 3 * H * I
    row = {"tokens": T, "ms": sec * 1e3, "active_experts": active, "weight_bytes": nbytes,
           "bw_floor_ms": floor * 1e3, "frac_bw": floor / sec, "tops": ops / sec / 1e12, "frac_peak": ops / sec / peak}
    if gpu_io:
        xg = x.cuda()
        routes_g = [(ids.cuda(), w.cuda()) for ids, w in routes]
        xh = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        idh = torch.empty((T, K), dtype=torch.int32, pin_memory=True)
        wh = torch.empty((T, K), dtype=torch.float32, pin_memory=True)

        def step_gpu(i):
            ids, w = routes_g[i % ROUTINGS]
            xh.copy_(xg), idh.copy_(ids), wh.copy_(w)
            torch.cuda.synchronize()
            y = layers[i % len(layers)](xh, idh, wh).cuda(non_blocking=True)
            torch.cuda.synchronize()
            return y

        row["ms_gpu_io"] = time_layer(step_gpu) * 1e3
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores - 1 (- 2 with CUDA)")
    parser.add_argument("--gpu-io", action="store_true", help="also time with inputs/outputs on the GPU")
    parser.add_argument("--quick", action="store_true", help="Qwen shape, int4, T = 1, 4 (smoke run)")
    parser.add_argument("--bw-gib", type=float, default=2.0, help="size of the bandwidth buffer")
    parser.add_argument("--numa", choices=("split", "mirror", "off"), default="split",
                        help="the layers' numa option (nodes from /sys, or simulated with KT_AMX_NUMA=N)")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.formats, args.tokens, args.bw_gib = ["qwen3-30b-a3b"], ["int4"], [1, 4], 0.5
    gpu_io = args.gpu_io and torch.cuda.is_available()
    threads = _lib.ensure_pool(args.threads or _lib.default_threads())
    (bw, bw_median), peak = read_bandwidth(threads, args.bw_gib), peak_int8(threads)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    meta = {"cpu": cpu, "isa": _lib.selected_isa(), "threads": threads, "read_bw_GBps": bw / 1e9,
            "read_bw_median_GBps": bw_median / 1e9, "l3_bytes": l3_bytes(), "peak_int8_TOPS": peak / 1e12,
            "amx_min_rows": os.environ.get("KT_AMX_MIN_ROWS", "default"), "torch": torch.__version__,
            "numa": args.numa, "numa_nodes": [list(c) for c in read_topology().nodes],
            "numa_env": os.environ.get("KT_AMX_NUMA"),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    print(f"# {cpu} | isa {meta['isa']} | {threads} threads | read {bw / 1e9:.1f} GB/s "
          f"(median {bw_median / 1e9:.1f}) | peak int8 {peak / 1e12:.2f} TOPS | KT_AMX_MIN_ROWS {meta['amx_min_rows']} "
          f"| numa {args.numa} over {len(meta['numa_nodes'])} node(s)")
    print(f"{'shape':14s} {'fmt':5s} {'T':>5s} {'ms':>9s} {'floor ms':>9s} {'frac_bw':>8s} {'TOPS':>7s} "
          f"{'frac_pk':>8s}" + (f" {'ms gpu-io':>10s}" if gpu_io else ""))
    results = []
    for shape in args.shapes:
        for fmt_name in args.formats:
            first = random_layer(shape, FORMATS[fmt_name], threads, args.numa)
            copies = max(1, min(8, -(-3 * l3_bytes() // first.packed_bytes())))
            layers = [first] + [random_layer(shape, FORMATS[fmt_name], threads, args.numa) for _ in range(copies - 1)]
            for T in args.tokens:
                plan = first.plan
                row = {"shape": shape, "format": fmt_name, "layer_copies": copies,
                       "numa_parts": plan.n_parts if plan else 1, "numa_bounds": plan.bounds if plan else None,
                       **bench_case(layers, T, bw, peak, gpu_io)}
                results.append(row)
                print(f"{shape:14s} {fmt_name:5s} {T:5d} {row['ms']:9.3f} {row['bw_floor_ms']:9.3f} "
                      f"{row['frac_bw']:8.2f} {row['tops']:7.2f} {row['frac_peak']:8.2f}"
                      + (f" {row['ms_gpu_io']:10.3f}" if gpu_io else ""), flush=True)
            del first, layers
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
