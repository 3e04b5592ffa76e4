"""Benchmark of kt-marlin's MLA decode kernel as a fraction of the HBM bandwidth measured in
the same run.

Shape: DeepSeek-V3 (128 heads, kv_lora_rank 512, qk_rope_head_dim 64, qk_nope_head_dim 128,
v_head_dim 128), batch 1, bf16, contexts 4k and 32k (and a few more). Per context:

- ``kernel``: ``torch.ops.kt_marlin.mla_decode`` (split + reduce) over the latent cache;
  bytes = the latent cache read once, ``context * (512 + 64) * 2``; fraction = bytes / time /
  the copy ceiling (a 1 GiB device copy, bytes read + written per second);
- ``absorbed``: the whole absorbed attention of ``MarlinMLA`` (``q_nope @ W_UK``, the kernel,
  ``@ W_UV``), bytes adding the ``kv_b_proj`` weight;
- ``torch``: TorchMLA's absorbed einsums over the same cache, for comparison.

Cases: contexts 4k and 32k first, then 1k, 8k, 16k, a 4k context in a 32k static cache, and
batch 8 at 4k; then a sweep of tile sizes, warps, stages and split counts at 4k and 32k,
each sweep getting an equal share of the budget left.

Each timing replays a CUDA graph holding one call per copy of the cache, with enough copies
(as many layers) to exceed the L2 cache several times, so the latents come from HBM and
launch overhead is out; the graph of the 4k case holds ~110 calls back to back, so each
call's launch and tail latency (a few µs for two kernels) are in its time. Usage:
``python bench_mla.py --out results.json [--md results.md] [--budget SECONDS] [--no-sweep]``.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from bench_linear import graph_time, hbm_ceiling, new_result, result_writer  # same directory: the shared helpers

HEADS, RANK, ROPE, NOPE, V = 128, 512, 64, 128, 128
SOFTMAX_SCALE = (NOPE + ROPE) ** -0.5
L2_FOOTPRINT = 512 << 20  # bytes of cache each timed graph streams through, at least
MAX_COPIES = 128

log = logging.getLogger("bench_mla")


def cache_copies(context: int, batch: int = 1, static_len: int | None = None):
    """Independent latent caches (as many layers) of ``static_len`` slots (default
    ``context``), enough that the ``context`` slots read per call exceed the L2 cache."""
    static_len = static_len or context
    nbytes = batch * context * (RANK + ROPE) * 2
    copies = min(MAX_COPIES, max(1, -(-L2_FOOTPRINT // nbytes)))
    out = []
    for _ in range(copies):
        latent = torch.randn(batch, static_len, RANK, device="cuda", dtype=torch.bfloat16)
        k_rope = torch.randn(batch, static_len, ROPE, device="cuda", dtype=torch.bfloat16)
        out.append((latent, k_rope))
    return out, nbytes


class Case:
    """One decode shape: caches, queries and the three timed functions."""

    def __init__(self, context: int, batch: int = 1, static_len: int | None = None):
        from kt_marlin.mla_decode import choose_config

        self.context, self.batch, self.static_len = context, batch, static_len or context
        self.copies, self.nbytes = cache_copies(context, batch, self.static_len)
        self.q_nope = torch.randn(batch, 1, HEADS, NOPE, device="cuda", dtype=torch.bfloat16)
        q_rope = torch.randn(batch, 1, HEADS, ROPE, device="cuda", dtype=torch.bfloat16)
        kv_b = torch.randn(HEADS, NOPE + V, RANK, device="cuda", dtype=torch.bfloat16) * 0.05
        self.w_uk, self.w_uv = kv_b[:, :NOPE], kv_b[:, NOPE:]  # [nH, Dn, R], [nH, Dv, R]
        self.q_latent = torch.einsum("bthd,hdr->bthr", self.q_nope, self.w_uk).reshape(batch, HEADS, RANK)
        self.q_rope = q_rope.reshape(batch, HEADS, ROPE)
        self.limits = torch.full((batch,), context, device="cuda", dtype=torch.int64)
        self.config = choose_config(batch, HEADS, self.static_len, torch.device("cuda"), 2)

    def kernel(self, c, cfg=None):
        from kt_marlin.mla_decode import launch

        return launch(self.q_latent, self.q_rope, c[0], c[1], self.limits, 1, SOFTMAX_SCALE, cfg)

    def absorbed(self, c):  # what MarlinMLA._attend_absorbed runs
        ql = torch.einsum("bthd,hdr->bthr", self.q_nope, self.w_uk).reshape(self.batch, HEADS, RANK)
        o = torch.ops.kt_marlin.mla_decode(ql, self.q_rope, c[0], c[1], self.limits, 1, SOFTMAX_SCALE)
        return torch.einsum("bhr,hvr->bhv", o, self.w_uv)

    def reference(self, c):  # TorchMLA's absorbed einsums over the valid slots only
        latent, k_rope = c[0][:, : self.context], c[1][:, : self.context]
        scores = torch.einsum("bhr,bsr->bhs", self.q_latent, latent) + torch.einsum("bhd,bsd->bhs", self.q_rope, k_rope)
        probs = torch.softmax((scores * SOFTMAX_SCALE).float(), dim=-1).to(torch.bfloat16)
        return torch.einsum("bhs,bsr->bhr", probs, latent)

    def time(self, fn, reps: int = 5) -> float:
        return graph_time([lambda c=c: fn(c) for c in self.copies], reps=reps)


def bench_case(case: Case, gbps: float) -> dict:
    t_kernel = case.time(case.kernel)
    t_absorbed = case.time(case.absorbed)
    t_torch = case.time(case.reference)
    kv_b_bytes = HEADS * (NOPE + V) * RANK * 2
    return {
        "context": case.context, "static_len": case.static_len, "batch": case.batch, "copies": len(case.copies),
        "cache_bytes_read": case.nbytes, "config": case.config,
        "kernel_ms": t_kernel * 1e3, "kernel_GBps": case.nbytes / t_kernel / 1e9,
        "kernel_fraction_of_copy": case.nbytes / t_kernel / gbps,
        "absorbed_ms": t_absorbed * 1e3,
        "absorbed_fraction_of_copy": (case.nbytes + kv_b_bytes) / t_absorbed / gbps,
        "torch_ms": t_torch * 1e3, "speedup_vs_torch": t_torch / t_kernel,
    }


def sweep_points():
    """(BLOCK_H, BLOCK_S, warps, stages, splits) around the heuristic (64 heads, 8 warps,
    BLOCK_S 64, 2 stages, ~one wave of splits), then the 16-head tiles of before."""
    for splits in (64, 66, 96, 128, 32):
        yield 64, 64, 8, 2, splits
    for block_s, stages in ((64, 3), (128, 1), (32, 2), (32, 3)):
        yield 64, block_s, 8, stages, 64
    yield 16, 32, 4, 2, 32


def sweep_case(case: Case, gbps: float, deadline: float) -> dict:
    """Tile sizes, warps, stages and split counts; the best eight, each with its error
    against torch's einsums (max |diff| / max |reference|)."""
    rows, truncated = [], False
    want = case.reference(case.copies[0]).float()
    for block_h, block_s, warps, stages, splits in sweep_points():
        if time.time() > deadline:
            truncated = True
            break
        cfg = dict(BLOCK_H=block_h, BLOCK_S=block_s, SPLITS=splits, num_warps=warps, num_stages=stages)
        try:
            err = float((case.kernel(case.copies[0], cfg).float() - want).abs().max() / want.abs().max())
            t = case.time(lambda c, cfg=cfg: case.kernel(c, cfg), reps=3)
        except Exception as exc:  # out of shared memory or registers: skip the point
            log.info("config %s failed: %s", cfg, str(exc).splitlines()[0][:120])
            continue
        rows.append({"cfg": cfg, "ms": t * 1e3, "fraction_of_copy": case.nbytes / t / gbps, "rel_err": err})
    rows.sort(key=lambda d: d["ms"])
    return {"context": case.context, "heuristic": case.config, "points": len(rows), "truncated": truncated,
            "best": rows[:8]}


def render(r: dict) -> str:
    """The result as Markdown (``--md``)."""
    copy = r["hbm_copy"]["GBps"]
    lines = [f"# kt-marlin MLA decode on {r['device']} (torch {r['torch']}, triton {r['triton']})", "",
             f"DeepSeek-V3 shape (128 heads, latent 512 + rope 64, bf16). Ceiling measured in this run: copy "
             f"{copy:.0f} GB/s (1 GiB device copy, read + write). Bytes = the latent cache read once.", "",
             "| context | static len | batch | kernel ms | GB/s | of copy | absorbed ms | torch ms | speed-up "
             "| splits |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in r.get("decode", []):
        lines.append(f"| {row['context']} | {row['static_len']} | {row['batch']} | {row['kernel_ms']:.4f} | "
                     f"{row['kernel_GBps']:.0f} | {row['kernel_fraction_of_copy']:.2f} | {row['absorbed_ms']:.4f} | "
                     f"{row['torch_ms']:.4f} | {row['speedup_vs_torch']:.1f} | {row['config']['SPLITS']} |")
    for sweep in r.get("sweep", []):
        lines += ["", f"Sweep at context {sweep['context']} ({sweep['points']} points"
                  f"{', truncated' if sweep['truncated'] else ''}; heuristic {sweep['heuristic']}):", "",
                  "| BLOCK_H | BLOCK_S | warps | stages | splits | ms | of copy | rel. error vs torch |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for d in sweep["best"]:
            c = d["cfg"]
            lines.append(f"| {c['BLOCK_H']} | {c['BLOCK_S']} | {c['num_warps']} | {c['num_stages']} | {c['SPLITS']} | "
                         f"{d['ms']:.4f} | {d['fraction_of_copy']:.2f} | {d['rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


#: (context, static cache length, batch): 4k and 32k first (the issue's shapes), then more
CASES = [(4096, 4096, 1), (32768, 32768, 1), (1024, 1024, 1), (8192, 8192, 1), (16384, 16384, 1),
         (4096, 32768, 1), (4096, 4096, 8)]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="JSON result")
    parser.add_argument("--md", help="also write the result as Markdown here")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds; later cases/sweeps are skipped past it")
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args()
    began = time.time()
    deadline = began + args.budget
    result = new_result(shape={"heads": HEADS, "kv_lora_rank": RANK, "rope": ROPE, "nope": NOPE, "v": V,
                               "dtype": "bf16"})
    save = result_writer(result, args.out, args.md, render)

    ceiling = hbm_ceiling()
    result["hbm_copy"] = ceiling
    gbps = ceiling["GBps"] * 1e9
    result["decode"], result["sweep"] = [], []
    save()
    for context, static_len, batch in CASES:
        if time.time() > deadline:
            result["skipped_after"] = f"context {context}: budget of {args.budget}s spent"
            break
        case = Case(context, batch, static_len)
        row = bench_case(case, gbps)
        del case
        torch.cuda.empty_cache()
        result["decode"].append(row)
        save()
        print(f"context {context:6d} (cache {static_len}, batch {batch}): kernel {row['kernel_ms']:.4f} ms, "
              f"{row['kernel_GBps']:.0f} GB/s = {row['kernel_fraction_of_copy']:.2f} of copy "
              f"({ceiling['GBps']:.0f} GB/s); absorbed {row['absorbed_ms']:.4f} ms; torch {row['torch_ms']:.4f} ms "
              f"({row['speedup_vs_torch']:.1f}x)", flush=True)
    sweeps = () if args.no_sweep else (4096, 32768)
    for i, context in enumerate(sweeps):
        if time.time() > deadline:
            break
        case = Case(context)
        share = (deadline - time.time()) / (len(sweeps) - i)
        sweep = sweep_case(case, gbps, time.time() + share)
        del case
        torch.cuda.empty_cache()
        result["sweep"].append(sweep)
        save()
        if sweep["best"]:
            best = sweep["best"][0]
            print(f"sweep at {context}: best {best['cfg']} {best['ms']:.4f} ms = "
                  f"{best['fraction_of_copy']:.2f} of copy",
                  flush=True)
    result["elapsed_s"] = time.time() - began
    save()


if __name__ == "__main__":
    main()
