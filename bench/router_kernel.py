"""The softmax top-k router of a decode step: the one Triton kernel (``torch.ops.ktcore.router_topk``,
what ``SoftmaxTopKRouter`` runs on CUDA for few tokens) against the path it replaces (the
torch router compiled by inductor: GEMV, softmax, ``small_topk`` ranking, renormalisation).

Each path calls ``--calls`` routers of their own weights (as a decode step calls one per
layer) inside one CUDA graph; a replay is timed with CUDA events, the median over the
replays divided by the number of calls is the time per call. The bandwidth column is the
router weight's bytes per call per second as a fraction of the device's copy bandwidth
(``dst.copy_(src)`` of a 1 GiB buffer, read + write, measured in the same run). Prints a
table and writes JSON:

    python bench/router_kernel.py --out FILE.json [--tokens 1,16] [--calls 48]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from gqa_decode import copy_bandwidth, median_us

from ktcore.ops import router as router_mod
from ktcore.ops.router import RouterSpec, build_router

SHAPES = {  # name -> spec; bf16 inputs and weights
    "qwen3-30b-a3b": RouterSpec("softmax_topk", 128, 2048, 8, norm_topk_prob=True, fp32_logits=False),
    "deepseek-v2-lite": RouterSpec("softmax_topk", 64, 2048, 6),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="router_kernel.json", help="JSON result file (default: %(default)s)")
    parser.add_argument("--tokens", default="1,16", help="comma-separated token counts (default: %(default)s)")
    parser.add_argument("--calls", type=int, default=48, help="router calls per graph (default: %(default)s)")
    parser.add_argument("--replays", type=int, default=200, help="timed graph replays (default: %(default)s)")
    return parser.parse_args(argv)


class Routers(nn.Module):
    """``calls`` routers of one spec, each with its own random weight, run one after another."""

    def __init__(self, spec: RouterSpec, calls: int):
        super().__init__()
        self.routers = nn.ModuleList(build_router(spec, device="cuda", dtype=torch.bfloat16) for _ in range(calls))
        for r in self.routers:
            r.weight.data.normal_(0, spec.hidden_size ** -0.5)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [t for r in self.routers for t in r(x)]


def graph_us(fn, x: torch.Tensor, replays: int) -> float:
    """Median replay time of a CUDA graph of ``fn(x)``, in µs."""
    for _ in range(3):
        fn(x)  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x)
    return median_us(graph.replay, replays)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    bw = copy_bandwidth() / 1e9
    rows = []
    for name, spec in SHAPES.items():
        routers = Routers(spec, args.calls)
        weight_bytes = spec.num_experts * spec.hidden_size * 2
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(tokens, spec.hidden_size, device="cuda", dtype=torch.bfloat16)
            kernel = graph_us(routers, x, args.replays) / args.calls
            original = router_mod.uses_router_kernel
            # the torch path; dynamo guards on this global, so it stays patched while timed
            router_mod.uses_router_kernel = lambda x, spec: False
            try:
                torch._dynamo.reset()
                t0 = time.perf_counter()
                compiled = torch.compile(routers, fullgraph=True)
                compiled(x)
                compile_s = time.perf_counter() - t0
                torch_path = graph_us(compiled, x, args.replays) / args.calls
            finally:
                router_mod.uses_router_kernel = original
            for path, us in (("kernel", kernel), ("compiled torch", torch_path)):
                frac = weight_bytes / (us * 1e-6) / 1e9 / bw
                rows.append(dict(model=name, tokens=tokens, path=path, us_per_call=round(us, 3),
                                 weight_bytes=weight_bytes, fraction_of_copy_bw=round(frac, 4)))
                print(f"{name:18s} T={tokens:<3d} {path:15s} {us:8.2f} µs/call  "
                      f"{frac:6.3f} of copy bandwidth", flush=True)
            print(f"  (torch path compile {compile_s:.1f} s)", flush=True)
            result = dict(device=torch.cuda.get_device_name(), copy_gbps=round(bw, 1), calls_per_graph=args.calls,
                          replays=args.replays, torch=torch.__version__, rows=rows)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")  # after every case
    print(f"copy bandwidth {bw:.1f} GB/s; wrote {args.out}")


if __name__ == "__main__":
    main()
