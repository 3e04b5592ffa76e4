"""Is the int4 linear bound by HBM? For the table's config at T = 1 on a few projection
shapes, the time per call with the weights streamed from HBM (one call per distinct copy,
as ``bench_linear.py``) against the same graph length on one copy (L2-resident where it fits
in the 50 MB L2), with programmatic dependent launch on and off. Equal times mean the
kernel is bound by its own latency chain, not by the memory bandwidth.

Usage (GPU host): ``python int4_l2_diag.py`` prints one line per (shape, PDL).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_linear import graph_time, int4_copies  # noqa: E402

from kt_marlin import wq_matmul as W  # noqa: E402

SHAPES = [(64, 512), (576, 7168), (1536, 7168), (7168, 2048), (8192, 5120), (24576, 1536), (18432, 7168)]


def main() -> None:
    for n, k in SHAPES:
        copies, nbytes = int4_copies(n, k)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        cfg = W.choose_config(1, n, k, 4, 128, torch.device("cuda"))
        for pdl in (True, False):
            c = dict(cfg, PDL=pdl)
            hbm = graph_time([lambda c0=c0: W.launch(x, *c0, None, 4, 128, c) for c0 in copies])
            one = copies[0]
            l2 = graph_time([lambda: W.launch(x, *one, None, 4, 128, c)] * 32)
            print(f"N={n} K={k} {cfg} pdl={pdl}: hbm {hbm * 1e6:.2f} us ({nbytes / hbm / 1e9:.0f} GB/s), "
                  f"same copy x32 {l2 * 1e6:.2f} us", flush=True)


if __name__ == "__main__":
    main()
