"""Tile sweep of the int4 weight-only matmul (group 128) on DeepSeek-V3 and Qwen3 projection
shapes, on the GPU host, in one command (about 1-2 minutes):

    python plugins/kt_marlin/bench/sweep_gemv.py --out $OUT/gemv_sweep.json

For each shape class of ``wq_matmul.shape_class`` (N and K buckets) and each token bucket of
``wq_matmul.t_bucket`` (default T 1 and 16, both in the bucket "16": the kernel pads 1-16
tokens to one 16-column dot), stage 1 times tile candidates (BLOCK_N, BLOCK_K, warps, XS; the
current table entry too) on every benchmark shape of the class and T of the bucket; stage 2 varies split-K (``WAVES``: programs per SM asked of the
split), stage 3 ``num_stages`` of the best, stage 4 programmatic dependent launch (PDL) on,
stage 5 (if PDL won) the depth ``PF`` of its L2 prefetch. Every result is checked against torch (fp64 on
the dequantised weight) before it is timed; a wrong candidate is reported and never chosen.
Timings replay a CUDA graph of one call per distinct copy of the weights (>= 512 MB
streamed, so they come from HBM, not L2), as ``bench_linear.py``; the ceiling is a 1 GiB
device copy (read + write) measured in the same run.

Prints one table row per (shape, T): best config, µs, GB/s, fraction of the copy ceiling,
speed-up over bf16 ``F.linear``; writes JSON with every measurement and ``table``: the best
entry per ``"<shape class>|<token bucket>"``. Copy that file to
``plugins/kt_marlin/kt_marlin/gemv_table.json`` (or set ``KT_MARLIN_GEMV_TABLE``) and
``wq_matmul.choose_config`` uses it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_linear import GROUP, bench_bf16, graph_time, hbm_ceiling, int4_copies  # noqa: E402

from kt_marlin import wq_matmul as W  # noqa: E402
from kt_marlin.packing import Packed, unpack  # noqa: E402

#: (model, projection, N, K): representative of each shape class
SHAPES = [
    ("DeepSeek-V3", "kv_a_proj_with_mqa", 576, 7168),
    ("DeepSeek-V3", "q_a_proj", 1536, 7168),
    ("Qwen3-32B", "k_proj", 1024, 5120),
    ("DeepSeek-V3", "shared_experts.down_proj", 7168, 2048),
    ("DeepSeek-V3", "o_proj", 7168, 16384),
    ("Qwen3-32B", "q_proj", 8192, 5120),
    ("Qwen3-32B", "mlp.down_proj", 5120, 25600),
    ("DeepSeek-V3", "q_b_proj", 24576, 1536),
    ("DeepSeek-V3", "kv_b_proj", 32768, 512),
    ("DeepSeek-V3", "mlp.gate_proj", 18432, 7168),
    ("Qwen3-32B", "mlp.gate_proj", 25600, 5120),
]


def E(bn, bk, warps=4, waves=2, stages=3, bt=16, xs=1):
    return W._entry(bt, bn, bk, waves, warps, stages, xs, pdl=0, pf=0)


#: stage-1 tile candidates (WAVES 2, three stages; earlier H200 sweeps: BLOCK_N 16/32 and BLOCK_K
#: 512/1024 lost) and the three ways to get the groups' x sums (XS); the current table entry is added
TILES = [E(64, 128), E(64, 128, xs=0), E(64, 128, xs=2), E(128, 128), E(128, 128, xs=0), E(128, 128, xs=2),
         E(64, 256), E(64, 256, xs=0), E(64, 256, xs=2), E(128, 256), E(128, 128, 8), E(256, 128, 8),
         E(256, 128, 8, xs=0),
         # two warps: Triton's mma.sync dot (wgmma needs 4 warps), no async-proxy fence per group
         E(64, 128, 2), E(64, 128, 2, xs=0), E(64, 128, 2, xs=2), E(64, 256, 2), E(64, 256, 2, xs=2),
         E(32, 128, 2, xs=0), E(32, 128, 2, xs=2), E(32, 256, 2, xs=2)]
WAVES = (1, 2, 4, 8, 16)
STAGES = (2, 3, 4, 5)
PREFETCH = (0, 1, 2, 4, 8, 64)  # K tiles per row (64: the whole run of a program, at these shapes)


def key(e: dict) -> str:
    return (f"T{e['BLOCK_T']} N{e['BLOCK_N']} K{e['BLOCK_K']} w{e['WAVES']} warps{e['num_warps']} "
            f"st{e['num_stages']} xs{e.get('XS', 0)} pdl{e.get('PDL', 0)} pf{e.get('PF', 0)}")


class Case:
    """One (shape, T): weight copies, x, the reference, the bf16 timing."""

    def __init__(self, model, proj, n, k, t, copies, nbytes, bf16_us):
        self.name, self.n, self.k, self.t = f"{model} {proj}", n, k, t
        self.copies, self.nbytes, self.bf16_us = copies, nbytes, bf16_us
        self.cls = W.shape_class(n, k)
        self.x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        qw, s, o = copies[0]
        self.ref = self.x.double() @ unpack(Packed(4, GROUP, qw, s, o)).double().T
        self.results: dict[str, dict] = {}

    def run(self, entry: dict) -> dict:
        name = key(entry)
        if name in self.results:
            return self.results[name]
        cfg = W.resolve(entry, self.t, self.n, self.k, GROUP, torch.device("cuda"))
        row = {"entry": entry, "config": cfg}
        try:
            qw, s, o = self.copies[0]
            y = W.launch(self.x, qw, s, o, None, 4, GROUP, cfg)
            err = float((y.double() - self.ref).abs().max() / self.ref.abs().max())
            row["rel_err"] = err
            if not err <= 2e-2:
                row["error"] = f"wrong result: relative error {err:.3g}"
            else:
                sec = graph_time([lambda c=c: W.launch(self.x, c[0], c[1], c[2], None, 4, GROUP, cfg)
                                  for c in self.copies])
                row["us"] = sec * 1e6
        except Exception as e:  # a config that does not compile / launch (shared memory, ...)
            row["error"] = repr(e)[:300]
        self.results[name] = row
        return row


def best_entry(cases: list[Case], entries: list[dict]) -> dict | None:
    """The entry with the lowest geometric mean of time relative to the best per case."""
    best, best_score = None, math.inf
    floor = {id(c): min((r["us"] for r in c.results.values() if "us" in r), default=math.nan) for c in cases}
    for e in entries:
        rows = [c.results.get(key(e), {}) for c in cases]
        if not all("us" in r for r in rows):
            continue
        score = math.exp(sum(math.log(r["us"] / floor[id(c)]) for r, c in zip(rows, cases)) / len(rows))
        if score < best_score:
            best, best_score = e, score
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gemv_sweep.json"))
    parser.add_argument("--tokens", default="1,16")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds; stages 2-3 and later classes are cut past it")
    args = parser.parse_args()
    began = time.time()
    tokens = [int(t) for t in args.tokens.split(",")]
    import triton

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "group": GROUP, "sms": torch.cuda.get_device_properties(0).multi_processor_count}
    copy = hbm_ceiling()
    result["hbm_copy"] = copy

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    print(f"# {result['device']}, triton {triton.__version__}: copy ceiling {copy['GBps']:.0f} GB/s", flush=True)
    save()
    table, rows = {}, []
    classes: dict[str, list] = {}
    for shape in SHAPES:
        classes.setdefault(W.shape_class(shape[2], shape[3]), []).append(shape)
    print("| shape | T | best config | µs | GB/s | of copy | vs bf16 | (table entry µs) | (best, PDL off, µs) |",
          flush=True)
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    for cls, shapes in classes.items():
        if time.time() - began > args.budget:
            result["skipped_after"] = f"class {cls}: budget of {args.budget}s spent"
            break
        data = []
        for model, proj, n, k in shapes:
            copies, nbytes = int4_copies(n, k)
            bf16 = {t: v * 1e6 for t, v in bench_bf16(n, k, tokens).items()}
            data.append((model, proj, n, k, copies, nbytes, bf16))
        buckets: dict[str, list[int]] = {}
        for t in tokens:
            buckets.setdefault(W.t_bucket(t), []).append(t)
        for bucket, ts in buckets.items():  # one table entry per bucket, scored over all its T
            cases = [Case(model, proj, n, k, t, copies, nbytes, bf16[t])
                     for model, proj, n, k, copies, nbytes, bf16 in data for t in ts]
            current = dict(W.GEMV_TABLE[f"{cls}|{bucket}"])
            stage1 = [current] + [e for e in TILES if key(e) != key(current)]
            for c in cases:
                for e in stage1:
                    c.run(e)
            best = best_entry(cases, stage1)
            for values, field in ((WAVES, "WAVES"), (STAGES, "num_stages"), ((0, 1), "PDL"), (PREFETCH, "PF")):
                if best is None or time.time() - began > args.budget:
                    break
                if field == "PF" and not best["PDL"]:
                    continue
                stage = [best] + [dict(best, **{field: v}) for v in values if v != best[field]]
                for c in cases:
                    for e in stage:
                        c.run(e)
                best = best_entry(cases, stage)
            if best is not None:
                table[f"{cls}|{bucket}"] = best
            for c in cases:
                r = c.results.get(key(best), {}) if best else {}
                bad = [f"{name}: {row['error']}" for name, row in c.results.items() if "error" in row]
                row = {"shape": c.name, "N": c.n, "K": c.k, "T": c.t, "class": cls, "bytes": c.nbytes,
                       "bf16_us": c.bf16_us, "best": key(best) if best else None, "best_config": r.get("config"),
                       "best_us": r.get("us"), "table_us": c.results.get(key(current), {}).get("us"),
                       "no_pdl_us": c.results.get(key(dict(best, PDL=0, PF=0)), {}).get("us") if best else None,
                       "errors": bad,
                       "all": {name: {k2: v for k2, v in row.items() if k2 != "entry"} for name, row in c.results.items()}}
                if "us" in r:
                    gbps = c.nbytes / r["us"] / 1e3
                    row.update(GBps=gbps, of_copy=gbps / copy["GBps"], vs_bf16=c.bf16_us / r["us"])
                    cfg = r["config"]
                    desc = (f"T{cfg['BLOCK_T']} N{cfg['BLOCK_N']} K{cfg['BLOCK_K']} split{cfg['SPLIT_K']} "
                            f"warps{cfg['num_warps']} st{cfg['num_stages']} xs{cfg['XS']} pdl{int(cfg['PDL'])} "
                            f"pf{cfg['PF']}")
                    print(f"| {c.name} | {c.t} | {desc} | {r['us']:.1f} | {gbps:.0f} | {row['of_copy']:.2f} | "
                          f"{row['vs_bf16']:.2f}x | {row['table_us'] or float('nan'):.1f} | "
                          f"{row['no_pdl_us'] or float('nan'):.1f} |", flush=True)
                for b in bad:
                    print(f"|   {c.name} T={c.t} FAILED {b} |", flush=True)
                rows.append(row)
            result["rows"], result["table"] = rows, table
            save()
        del data
        torch.cuda.empty_cache()
    result["elapsed_s"] = time.time() - began
    save()
    print(f"# table ({len(table)} entries) and all measurements in {args.out}; {result['elapsed_s']:.0f}s", flush=True)
    for k2, e in table.items():
        print(f"#   {k2}: {key(e)}", flush=True)


if __name__ == "__main__":
    main()
