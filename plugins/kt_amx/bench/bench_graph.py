"""CPU experts driven from the GPU: per-layer time of ktcore.runtime.host_experts.HostExpertsRunner,
eager (Python enqueues copies and host nodes each layer) against a replayed CUDA graph (no
Python), with the plain CPU op (inputs already on the host) beside them.

    python plugins/kt_amx/bench/bench_graph.py [--threads N] [--json PATH]

Each case captures L copies of the layer (so that consecutive layers do not find each other's
weights in the cache) in one graph: x -> [D2H, submit, wait, H2D] per layer -> y, and reports
the median time per layer. Random packed weights as in bench_experts.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_experts import FORMATS, SHAPES, random_layer  # noqa: E402

from kt_amx import _lib  # noqa: E402
from ktcore.runtime.cudart import cudart  # noqa: E402
from ktcore.runtime.host_experts import HostExpertsRunner  # noqa: E402


def median_time(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def case(shape: str, fmt: str, copies: int, tokens: list[int], threads: int, reps: int) -> list[dict]:
    H, I, K, E = SHAPES[shape]
    layers = [random_layer(shape, FORMATS[fmt], threads) for _ in range(copies)]
    runners = [HostExpertsRunner(layer, max(tokens), dtype=torch.bfloat16) for layer in layers]
    out = []
    for T in tokens:
        gen = torch.Generator().manual_seed(T)
        x = (torch.randn(T, H, generator=gen) * 0.1).bfloat16().cuda()
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).cuda()
        w = torch.rand(T, K, generator=gen).cuda()

        def chain():
            h = x
            for r in runners:
                h = r.forward(h, ids, w)
            return h

        eager = median_time(chain, reps) / copies
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            chain()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = chain()
        replay = median_time(graph.replay, reps) / copies
        y_eager = chain().clone()
        graph.replay()
        torch.cuda.synchronize()
        same = bool(torch.equal(y, y_eager))
        xc, idc, wc = x.cpu(), ids.cpu(), w.cpu()
        t0 = time.perf_counter()
        for _ in range(reps):
            for layer in layers:
                layer(xc, idc, wc)
        cpu = (time.perf_counter() - t0) / reps / copies
        row = {"shape": shape, "format": fmt, "T": T, "layers": copies, "threads": threads,
               "cpu_op_ms": cpu * 1e3, "eager_gpu_io_ms": eager * 1e3, "graph_replay_ms": replay * 1e3,
               "graph_equals_eager": same}
        print(f"{shape:14s} {fmt} T={T:<4d} cpu op {cpu * 1e3:7.3f} ms | runner eager {eager * 1e3:7.3f} ms"
              f" | graph replay {replay * 1e3:7.3f} ms per layer | graph == eager: {same}", flush=True)
        out.append(row)
        del graph
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    threads = args.threads or _lib.default_threads()
    _lib.ensure_pool(threads)
    print(f"device {torch.cuda.get_device_name(0)}, isa {_lib.selected_isa()}, threads {threads}, "
          f"libcudart {cudart().path}", flush=True)
    rows = case("qwen3-30b-a3b", "int4", 8, [1, 4, 32], threads, args.reps)
    rows += case("deepseek-v3", "int4", 2, [1, 4], threads, args.reps)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
