"""The decode step's wait for the CPU experts, used to read the next layer's weights into L2
(``ktcore.ops.l2_prefetch``): the one-row linears of a Qwen3-30B-A3B layer (fused q/k/v,
o_proj, router; bf16, ktcore's decode GEMV) after a simulated wait, with and without a
prefetch of their weights during it.

A CUDA graph replays ``--layers`` layers with distinct weights (cold in L2 without a
prefetch). A layer is a wait (``torch.cuda._sleep``) with the prefetch on a second stream
beside it, then the GEMVs. "GEMVs" is the time per layer minus that of the waits alone;
"prefetch alone" times the prefetches with nothing else. Prints a table and writes JSON:

    python bench/l2_prefetch.py --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gqa_decode import copy_bandwidth, median_us

#: name -> (N, K) of the Qwen3-30B-A3B projections, in the order a layer uses them
SHAPES = {"qkv": (5120, 2048), "o_proj": (2048, 4096), "router": (128, 2048)}
SUBSETS = {"all": ("qkv", "o_proj", "router"), "qkv": ("qkv",), "o_proj+router": ("o_proj", "router")}


def capture(layers: list[dict], x: dict, wait_cycles: int, prefetch, gemvs: bool):
    """A CUDA graph of the layers; ``prefetch(layer)`` (or None) runs beside each wait."""
    from ktcore.ops.decode_gemv import decode_gemv

    side = torch.cuda.Stream()

    def body():
        main = torch.cuda.current_stream()  # the capture's stream inside torch.cuda.graph
        for layer in layers:
            if prefetch is not None:
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    prefetch(layer)
            if wait_cycles:
                torch.cuda._sleep(wait_cycles)
            if prefetch is not None:
                main.wait_stream(side)
            if gemvs:
                for name, w in layer.items():
                    decode_gemv(x[name], w, None)

    body()  # compiles the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def main(argv: list[str] | None = None) -> None:
    from ktcore.ops import l2_prefetch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="l2_prefetch.json")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--wait-us", type=float, default=100.0, help="simulated CPU-experts wait per layer")
    p.add_argument("--replays", type=int, default=100)
    args = p.parse_args(argv)

    props = torch.cuda.get_device_properties(0)
    wait_cycles = int(args.wait_us * 1e3 * 1.98)  # about: only differences of equal waits count
    layers = [{name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for name, (n, k) in SHAPES.items()}
              for _ in range(args.layers)]
    x = {name: torch.randn(k, device="cuda", dtype=torch.bfloat16) for name, (_, k) in SHAPES.items()}
    doc = dict(device=props.name, l2_bytes=props.L2_cache_size, layers=args.layers, wait_us=args.wait_us,
               copy_GBps=copy_bandwidth() / 1e9, torch=torch.__version__, rows=[])

    def per_layer(prefetch, gemvs, wait=wait_cycles) -> float:
        return median_us(capture(layers, x, wait, prefetch, gemvs).replay, args.replays) / args.layers

    waits_only = per_layer(None, False)
    cold = per_layer(None, True) - waits_only
    doc["rows"].append(dict(method="none", subset="", gemvs_us=cold))
    same = [layers[0]] * args.layers  # every layer reads the same weights: as warm as L2 keeps them
    warm = median_us(capture(same, x, wait_cycles, None, True).replay, args.replays) / args.layers - waits_only
    doc["rows"].append(dict(method="none", subset="same weights every layer", gemvs_us=warm))
    for method in ("load", "bulk"):
        if method == "bulk" and not l2_prefetch.bulk_supported(torch.device("cuda")):
            continue
        for subset, names in SUBSETS.items():
            def prefetch(layer, names=names, method=method):
                l2_prefetch.prefetch([layer[n] for n in names], method)
            mb = sum(layers[0][n].numel() * 2 for n in names) / 2**20
            row = dict(method=method, subset=subset, MiB=mb,
                       gemvs_us=per_layer(prefetch, True) - per_layer(prefetch, False),
                       prefetch_alone_us=per_layer(prefetch, False, wait=0))
            row["saved_us"] = cold - row["gemvs_us"]
            doc["rows"].append(row)
    print(f"{doc['device']}, L2 {doc['l2_bytes'] / 2**20:.0f} MiB, copy {doc['copy_GBps']:.0f} GB/s, "
          f"{args.layers} layers, wait {args.wait_us} us")
    for r in doc["rows"]:
        print(f"{r['method']:>5} {r['subset']:>14} {r.get('MiB', 0):6.1f} MiB  GEMVs {r['gemvs_us']:7.2f} us/layer  "
              f"saved {r.get('saved_us', 0):6.2f}  prefetch alone {r.get('prefetch_alone_us', 0):6.2f}")
    doc["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    Path(args.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
