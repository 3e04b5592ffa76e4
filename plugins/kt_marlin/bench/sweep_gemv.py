"""Tile sweep of the int4 weight-only matmul (group 128) at T in {1, 4, 16} on DeepSeek-V3 and
Qwen3 projection shapes, on the GPU host, in one command (about 2-3 minutes):

    python plugins/kt_marlin/bench/sweep_gemv.py --out $OUT/gemv_sweep.json

For each shape class of ``wq_matmul.shape_class`` (N and K buckets) and each T, stage 1 times
tile candidates (path fma/dot, BLOCK_T/N/K, warps; the previous kernel and heuristic as
``legacy``, the current table entry as ``table``) on every benchmark shape of the class;
stage 2 varies split-K (``WAVES``: programs per SM asked of the split) and ``num_stages`` of
the best tile. Every result is checked against torch (fp64 on the dequantised weight) before
it is timed; a wrong candidate is reported and never chosen. Timings replay a CUDA graph of
one call per distinct copy of the weights (>= 512 MB streamed, so they come from HBM, not
L2), as ``bench_linear.py``. Ceilings measured in the same run: a 1 GiB device copy (read +
write) and the bf16 ``F.linear`` weight stream at 1 token (``stream``).

Prints one table row per (shape, T): best config, µs, GB/s, fraction of copy and of stream,
speed-up over the legacy kernel and over bf16 ``F.linear``; writes JSON with every
measurement and ``table``: the best entry per ``"<shape class>|<token bucket>"``. Copy that
file to ``plugins/kt_marlin/kt_marlin/gemv_table.json`` (or set ``KT_MARLIN_GEMV_TABLE``) and
``wq_matmul.choose_config`` uses it (T=4's entry serves T 2-4, T=16's serves 5-16).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from bench_linear import graph_time, hbm_ceiling  # noqa: E402

from kt_marlin import wq_matmul as W  # noqa: E402
from kt_marlin.packing import Packed, unpack  # noqa: E402

GROUP = 128
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
L2_FOOTPRINT = 512 << 20


def E(path, bt, bn, bk, waves=4, warps=4, stages=1):
    return W._entry(path, bt, bn, bk, waves, warps, stages)


#: stage-1 tile candidates per T (WAVES 4, one stage); "legacy" and "table" are added
TILES = {
    1: [E("fma", 1, 8, 1024), E("fma", 1, 16, 512), E("fma", 1, 16, 1024), E("fma", 1, 16, 2048, warps=8),
        E("fma", 1, 32, 512), E("fma", 1, 32, 1024, warps=8), E("fma", 1, 64, 512, warps=8)],
    4: [E("fma", 4, 8, 1024), E("fma", 4, 16, 512), E("fma", 4, 16, 1024, warps=8), E("fma", 4, 32, 512, warps=8),
        E("dot", 16, 16, 256), E("dot", 16, 32, 256), E("dot", 16, 64, 256), E("dot", 16, 32, 512, warps=8)],
    16: [E("fma", 8, 16, 512), E("fma", 16, 16, 512, warps=8),
         E("dot", 16, 16, 256), E("dot", 16, 32, 256), E("dot", 16, 64, 256), E("dot", 16, 32, 512, warps=8),
         E("dot", 16, 64, 128), E("dot", 16, 128, 256, warps=8)],
}
WAVES = (0, 1, 2, 4, 8)
STAGES = (1, 2, 3)


def key(entry: dict) -> str:
    if entry["path"] == "legacy":
        return "legacy"
    return (f"{entry['path']} T{entry['BLOCK_T']} N{entry['BLOCK_N']} K{entry['BLOCK_K']} "
            f"w{entry['WAVES']} warps{entry['num_warps']} st{entry['num_stages']}")


def int4_copies(n: int, k: int):
    nbytes = n * k // 2 + 2 * 2 * n * (k // GROUP)
    out = []
    for _ in range(min(64, max(1, -(-L2_FOOTPRINT // nbytes)))):
        qw = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda")
        s = (torch.rand(n, k // GROUP, device="cuda") * 0.01).half()
        o = (-8 * s.float()).half()
        out.append((qw, s, o))
    return out, nbytes


class Case:
    """One (shape, T): weight copies, x, the reference, bf16 and legacy timings."""

    def __init__(self, model, proj, n, k, t, copies, nbytes, bf16_us):
        self.name, self.n, self.k, self.t = f"{model} {proj}", n, k, t
        self.copies, self.nbytes, self.bf16_us = copies, nbytes, bf16_us
        self.cls = W.shape_class(n, k)
        self.x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        qw, s, o = copies[0]
        w = unpack(Packed(4, GROUP, qw, s, o))
        self.ref = self.x.double() @ w.double().T
        self.results: dict[str, dict] = {}

    def run(self, entry: dict) -> dict:
        name = key(entry)
        if name in self.results:
            return self.results[name]
        dev = torch.device("cuda")
        cfg = W.resolve(entry, self.t, self.n, self.k, GROUP, dev)
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


def best_entry(cases: list[Case], entries: list[dict]) -> tuple[dict | None, float]:
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
    return best, best_score


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gemv_sweep.json"))
    parser.add_argument("--tokens", default="1,4,16")
    parser.add_argument("--budget", type=float, default=170.0, help="seconds; stage 2 and later classes are cut past it")
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

    # stream ceiling: bf16 F.linear at 1 token on the largest-weight shape
    n, k = 18432, 7168
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    stream = n * k * 2 / graph_time([lambda w=w: F.linear(x1, w) for w in ws])
    del ws
    result["stream_GBps"] = stream / 1e9
    ceilings = f"copy {copy['GBps']:.0f} GB/s, stream {stream / 1e9:.0f} GB/s"
    print(f"# {result['device']}, triton {triton.__version__}: ceilings {ceilings}", flush=True)
    save()

    table, rows = {}, []
    classes: dict[str, list] = {}
    for shape in SHAPES:
        classes.setdefault(W.shape_class(shape[2], shape[3]), []).append(shape)
    print("| shape | T | best config | µs | GB/s | of copy | of stream | vs legacy | vs bf16 |", flush=True)
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    for cls, shapes in classes.items():
        if time.time() - began > args.budget:
            result["skipped_after"] = f"class {cls}: budget of {args.budget}s spent"
            break
        data = []
        for model, proj, n, k in shapes:
            copies, nbytes = int4_copies(n, k)
            wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                  for _ in range(min(16, max(1, -(-L2_FOOTPRINT // (n * k * 2)))))]
            bf16 = {}
            for t in tokens:
                xt = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
                bf16[t] = graph_time([lambda w=w: F.linear(xt, w) for w in wb]) * 1e6
            del wb
            data.append((model, proj, n, k, copies, nbytes, bf16))
        for t in tokens:
            cases = [Case(model, proj, n, k, t, copies, nbytes, bf16[t])
                     for model, proj, n, k, copies, nbytes, bf16 in data]
            bucket = W.t_bucket(t)
            current = dict(W.GEMV_TABLE[f"{cls}|{bucket}"])
            legacy = dict(current, path="legacy")
            stage1 = [legacy, current] + [e for e in TILES.get(t, TILES[16]) if key(e) != key(current)]
            for c in cases:
                for e in stage1:
                    c.run(e)
            best, _ = best_entry(cases, stage1[1:])
            if best is not None and time.time() - began < args.budget:
                stage2 = [best] + [dict(best, WAVES=wv) for wv in WAVES if wv != best["WAVES"]]
                for c in cases:
                    for e in stage2:
                        c.run(e)
                best, _ = best_entry(cases, stage2)
                stage3 = [best] + [dict(best, num_stages=st) for st in STAGES if st != best["num_stages"]]
                for c in cases:
                    for e in stage3:
                        c.run(e)
                best, _ = best_entry(cases, stage3)
            if best is not None:
                table[f"{cls}|{bucket}"] = best
            for c in cases:
                r = c.results.get(key(best), {}) if best else {}
                leg = c.results.get("legacy", {})
                bad = [f"{name}: {row['error']}" for name, row in c.results.items() if "error" in row]
                row = {"shape": c.name, "N": c.n, "K": c.k, "T": c.t, "class": cls, "bytes": c.nbytes,
                       "bf16_us": c.bf16_us, "legacy_us": leg.get("us"), "best": key(best) if best else None,
                       "best_config": r.get("config"), "best_us": r.get("us"), "errors": bad,
                       "all": {name: {k2: v for k2, v in row.items() if k2 != "entry"} for name, row in c.results.items()}}
                if "us" in r:
                    gbps = c.nbytes / r["us"] / 1e3
                    row.update(GBps=gbps, of_copy=gbps * 1e9 / copy["GBps"] / 1e9, of_stream=gbps * 1e9 / stream,
                               vs_bf16=c.bf16_us / r["us"], vs_legacy=(leg["us"] / r["us"]) if "us" in leg else None)
                    cfg = r["config"]
                    desc = (f"{cfg['path']} T{cfg['BLOCK_T']} N{cfg['BLOCK_N']} K{cfg['BLOCK_K']} "
                            f"split{cfg['SPLIT_K']} warps{cfg['num_warps']} st{cfg.get('num_stages', 1)}")
                    vs_leg = f"{row['vs_legacy']:.2f}x" if row["vs_legacy"] else "-"
                    print(f"| {c.name} | {t} | {desc} | {r['us']:.1f} | {gbps:.0f} | {row['of_copy']:.2f} | "
                          f"{row['of_stream']:.2f} | {vs_leg} | {row['vs_bf16']:.2f}x |", flush=True)
                for b in bad:
                    print(f"|   {c.name} T={t} FAILED {b} |", flush=True)
                rows.append(row)
            result["rows"], result["table"] = rows, table
            save()
        del data
        torch.cuda.empty_cache()
    result["elapsed_s"] = time.time() - began
    save()
    print(f"# table ({len(table)} entries) and all measurements in {args.out}; "
          f"{result['elapsed_s']:.0f}s", flush=True)
    for k2, e in table.items():
        print(f"#   {k2}: {key(e)}", flush=True)


if __name__ == "__main__":
    main()
