"""GQA decode attention at the Qwen3-30B-A3B shape (nH 32, nKV 4, D 128, bf16): the
length-bounded Triton kernel (``torch.ops.ktcore.gqa_decode``, here without norms and RoPE)
against the torch path it replaces (the cache write, then masked attention over the whole
static cache, ``ktcore.ops.gqa.cache_attention``),
for static caches of 4200 and 32768 slots and several context lengths.

Each path is captured in a CUDA graph that calls it once per copy of the cache, with enough
copies that they do not fit in L2 together (a decode step reads each layer's cache cold);
a replay is timed with CUDA events, the median over the replays divided by the number of
calls is the time per call. The bandwidth columns are the K/V bytes each path reads (the
visible slots for the kernel, the whole cache for the torch path) per second, as a fraction
of the device's copy bandwidth (``dst.copy_(src)`` of a 1 GiB buffer, read + write, measured
in the same run). Prints a table and writes JSON:

    python bench/gqa_decode.py --out FILE.json [--batch 1,8] [--sweep]

``--sweep`` also times the kernel under a few tile and split choices (``launch``'s
``config``), to tune ``choose_config``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

N_HEADS, N_KV, HEAD_DIM = 32, 4, 128  # Qwen3-30B-A3B attention
CASES = {4200: (64, 512, 4096), 32768: (64, 512, 4096, 32768)}  # static cache length -> contexts
SWEEP = [dict(BLOCK_S=bs, SPLITS=sp, num_warps=nw, num_stages=2)
         for bs in (32, 64, 128) for sp in (8, 16, 32, 64) for nw in (4, 8)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gqa_decode.json", help="JSON result file (default: %(default)s)")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes (default: %(default)s)")
    parser.add_argument("--replays", type=int, default=200, help="timed graph replays per case (default: %(default)s)")
    parser.add_argument("--sweep", action="store_true", help="also time the kernel under other tile/split choices")
    return parser.parse_args(argv)


def median_us(fn, replays: int) -> float:
    """Median wall time of ``fn()`` over ``replays`` calls, by CUDA events, in µs."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def copy_bandwidth(replays: int = 20, nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth in bytes/s: read + write of a ``nbytes`` buffer."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src), replays)
    return 2 * nbytes / (us * 1e-6)


def graph_us(calls: list, replays: int) -> float:
    """Time per call of ``calls`` (closures) captured in one CUDA graph, in µs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls[:1]:
            call()  # warm-up: kernel compilation and allocator outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return median_us(graph.replay, replays) / len(calls)


def make_inputs(batch: int, max_len: int, context: int, copies: int):
    """q [B, nH, D], ``copies`` KV caches [B, S, nKV, D], positions [B, 1], cache_lens [B]."""
    from ktcore.ops.gqa import KVCache

    q = torch.randn(batch, N_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    caches = []
    for _ in range(copies):
        cache = KVCache(batch, max_len, N_KV, HEAD_DIM, torch.bfloat16, "cuda")
        cache.k.normal_()
        cache.v.normal_()
        caches.append(cache)
    positions = torch.full((batch, 1), context - 1, dtype=torch.int64, device="cuda")
    lens = torch.full((batch,), context, dtype=torch.int64, device="cuda")
    return q, caches, positions, lens


def run_case(batch: int, max_len: int, context: int, copy_bw: float, replays: int, sweep: bool) -> dict:
    from ktcore.ops import gqa_decode
    from ktcore.ops.gqa import cache_attention

    kv_bytes_per_slot = batch * N_KV * HEAD_DIM * 2 * 2  # K and V, bf16
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    copies = max(2, math.ceil(4 * l2 / (kv_bytes_per_slot * max_len)))
    q, caches, positions, lens = make_inputs(batch, max_len, context, copies)
    scale = HEAD_DIM ** -0.5

    k, v = (torch.randn(batch, N_KV, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def kernel(cache, config=None):  # the new K/V written, no norm or RoPE
        args = (q, k, v, cache.k, cache.v, cache.split_counters, positions[:, 0], lens, None, None, None, None,
                True, 1e-6, scale)
        return gqa_decode.gqa_decode(*args) if config is None else gqa_decode.launch(*args, dict(config))

    def torch_path(cache):
        cache.write(positions, k[:, None], v[:, None])
        return cache_attention(q[:, None], cache, positions, lens, max_len, scale)[:, 0]

    got, want = kernel(caches[0]).float(), torch_path(caches[0]).float()
    rel_err = float((got - want).abs().max() / want.abs().max())
    new_us = graph_us([lambda c=c: kernel(c) for c in caches], replays)
    old_us = graph_us([lambda c=c: torch_path(c) for c in caches], replays)
    new_bytes, old_bytes = kv_bytes_per_slot * context, kv_bytes_per_slot * max_len
    row = dict(batch=batch, max_len=max_len, context=context, cache_copies=copies,
               config=gqa_decode.choose_config(batch, N_KV, max_len, q.device, 2),
               new_us=new_us, torch_us=old_us, speedup=old_us / new_us,
               new_kv_bytes=new_bytes, torch_kv_bytes=old_bytes,
               new_bw_fraction=new_bytes / (new_us * 1e-6) / copy_bw,
               torch_bw_fraction=old_bytes / (old_us * 1e-6) / copy_bw, rel_err_vs_torch=rel_err)
    if sweep:
        row["sweep"] = [dict(config, us=graph_us([lambda c=c, k=config: kernel(c, k) for c in caches], replays))
                        for config in SWEEP]
    del caches
    torch.cuda.empty_cache()
    return row


def print_best_of_sweep(row: dict, indent: int) -> None:
    """The fastest configuration of ``row["sweep"]`` (other tiles), when the row has one."""
    if "sweep" in row:
        best = min(row["sweep"], key=lambda s: s["us"])
        print(f"{'':{indent}} best of sweep {best['us']:.2f} us: "
              + ", ".join(f"{k}={v}" for k, v in best.items() if k != "us"))


def print_table(doc: dict) -> None:
    print(f"{doc['device']}, copy bandwidth {doc['copy_GBps']:.0f} GB/s")
    print(f"{'batch':>5} {'cache':>6} {'ctx':>6} {'kernel us':>10} {'torch us':>9} {'speedup':>8} "
          f"{'kernel bw':>10} {'torch bw':>9} {'rel err':>8}")
    for r in doc["rows"]:
        print(f"{r['batch']:5d} {r['max_len']:6d} {r['context']:6d} {r['new_us']:10.2f} {r['torch_us']:9.2f} "
              f"{r['speedup']:8.2f} {r['new_bw_fraction']:10.1%} {r['torch_bw_fraction']:9.1%} {r['rel_err_vs_torch']:8.1e}")
        print_best_of_sweep(r, 19)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/gqa_decode.py needs a CUDA GPU")
    import triton

    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    rows = [run_case(batch, max_len, context, copy_bw, args.replays, args.sweep)
            for batch in (int(b) for b in args.batch.split(","))
            for max_len, contexts in CASES.items() for context in contexts]
    doc = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "dtype": "bf16", "shape": {"num_heads": N_HEADS, "num_kv_heads": N_KV, "head_dim": HEAD_DIM},
           "copy_GBps": copy_bw / 1e9, "replays": args.replays, "rows": rows,
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print_table(doc)


if __name__ == "__main__":
    main()
