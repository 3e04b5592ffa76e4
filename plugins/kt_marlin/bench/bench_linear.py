"""Benchmarks of kt-marlin's int4 linear (and, with ``--dequant``, the GGUF dequantisation
kernels) as fractions of the HBM bandwidth measured in the same run.

- ceiling: a large device-to-device copy (bytes read + written per second);
- int4 (group 128, ``mma`` layout) on DeepSeek-V3 and Qwen3 projection shapes at T = 1, 2,
  4, 8, 16: µs, packed weight bytes (int16 elements + fp16 scales/offsets) per second, their
  fraction of the copy ceiling, and the speed-up over torch bf16 ``F.linear`` on the same
  shape and T; where the config uses programmatic dependent launch (PDL: a call overlaps
  the end of the call before it in the graph), also the µs of the same config without it;
- GGUF dequantisation to bf16: (GGUF bytes read + bf16 bytes written) per second over the
  ceiling.

Every timing replays a CUDA graph holding one call per copy of the weights, with enough
copies to exceed the L2 cache several times, so launch overhead is out and the weights come
from HBM. Prints a Markdown table as it goes; writes JSON (``--out``) and Markdown (``--md``,
rendered by ``report.py``). Usage: ``python bench_linear.py --out r.json --md r.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from report import render  # noqa: E402

from kt_marlin.dequant import QTYPES, dequantize  # noqa: E402
from kt_marlin.wq_matmul import choose_config, launch  # noqa: E402

#: (model, projection, out_features N, in_features K)
SHAPES = [
    ("DeepSeek-V3", "q_a_proj", 1536, 7168),
    ("DeepSeek-V3", "q_b_proj", 24576, 1536),
    ("DeepSeek-V3", "kv_a_proj_with_mqa", 576, 7168),
    ("DeepSeek-V3", "kv_b_proj", 32768, 512),
    ("DeepSeek-V3", "o_proj", 7168, 16384),
    ("DeepSeek-V3", "mlp.gate_proj", 18432, 7168),
    ("DeepSeek-V3", "mlp.down_proj", 7168, 18432),
    ("DeepSeek-V3", "shared_experts.gate_proj", 2048, 7168),
    ("DeepSeek-V3", "shared_experts.down_proj", 7168, 2048),
    ("DeepSeek-V3", "lm_head", 129280, 7168),
    ("Qwen3-32B", "q_proj", 8192, 5120),
    ("Qwen3-32B", "k_proj", 1024, 5120),
    ("Qwen3-32B", "o_proj", 5120, 8192),
    ("Qwen3-32B", "mlp.gate_proj", 25600, 5120),
    ("Qwen3-32B", "mlp.down_proj", 5120, 25600),
]
TOKENS = (1, 2, 4, 8, 16)
GROUP = 128
L2_FOOTPRINT = 512 << 20  # bytes of weights each timed graph streams through, at least


def graph_time(fns, reps: int = 5) -> float:
    """Seconds per call of ``fns`` (a list of thunks) replayed in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:  # warm-up: compile, allocate
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(fns))
    times.sort()
    return times[len(times) // 2]


def hbm_ceiling() -> dict:
    n = 1 << 30  # 1 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    t = graph_time([lambda: dst.copy_(src)] * 4)
    return {"bytes": 2 * n, "seconds": t, "GBps": 2 * n / t / 1e9}


def new_result(**fields) -> dict:
    """A benchmark's result record: the device and software versions, then ``fields``."""
    import triton

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            **fields}


def result_writer(result: dict, out: str, md: str | None, render):
    """``save()``: writes ``result`` as JSON to ``out`` and, with ``md``, ``render(result)`` there
    (called as a benchmark goes, so a run cut short keeps what it measured)."""

    def save() -> None:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        if md:
            with open(md, "w") as f:
                f.write(render(result))

    return save


def int4_copies(n: int, k: int, group: int = GROUP):
    """Random int4 weights in the mma layout (int16 ``[n, k/4]``, fp16 scales/offsets), as many
    distinct copies as stream ``L2_FOOTPRINT`` bytes (at most 64), and the bytes of one."""
    nbytes = n * k // 2 + 2 * 2 * n * (k // group)
    out = []
    for _ in range(min(64, max(1, -(-L2_FOOTPRINT // nbytes)))):
        qw = torch.randint(-2**15, 2**15, (n, k // 4), dtype=torch.int16, device="cuda")
        s = (torch.rand(n, k // group, device="cuda") * 0.01).half()
        o = (-8 * s.float()).half()
        out.append((qw, s, o))
    return out, nbytes


def bench_int4(t: int, k: int, copies, config=None, group: int = GROUP) -> float:
    x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
    return graph_time([lambda c=c: launch(x, c[0], c[1], c[2], None, 4, group, config) for c in copies])


def bench_bf16(n: int, k: int, tokens) -> dict:
    nbytes = n * k * 2
    copies = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
              for _ in range(min(16, max(1, -(-L2_FOOTPRINT // nbytes))))]
    result = {}
    for t in tokens:
        x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        result[t] = graph_time([lambda w=w: F.linear(x, w) for w in copies])
    return result


def bench_dequant(ceiling: float) -> list[dict]:
    rows = []
    n, k = 7168, 7168
    for qtype in ("Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "Q5_0", "Q4_1", "Q5_1"):
        _, qk, size = QTYPES[qtype]
        raw = torch.randint(0, 256, (n * k // qk * size,), dtype=torch.uint8, device="cuda")
        t = graph_time([lambda: dequantize(raw, qtype, (n, k), torch.bfloat16)] * 4)
        moved = raw.numel() + n * k * 2
        rows.append({"qtype": qtype, "shape": [n, k], "seconds": t, "GBps": moved / t / 1e9,
                     "fraction_of_copy": moved / t / ceiling})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="JSON result")
    parser.add_argument("--md", help="Markdown report (report.py) written next to the JSON")
    parser.add_argument("--dequant", action="store_true", help="also time the GGUF dequantisation kernels")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds; later shapes are skipped past it")
    args = parser.parse_args()
    began = time.time()
    result = new_result(group=GROUP)
    save = result_writer(result, args.out, args.md, render)
    ceiling = hbm_ceiling()
    result["hbm_copy"] = ceiling
    gbps = ceiling["GBps"] * 1e9
    print(f"# {result['device']}, triton {result['triton']}: copy ceiling {ceiling['GBps']:.0f} GB/s", flush=True)
    print("| shape | N | K | T | int4 µs | GB/s | of copy | bf16 µs | speed-up | int4 µs without PDL |", flush=True)
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    save()
    result["int4"] = []
    for model, proj, n, k in SHAPES:
        if time.time() - began > args.budget:
            result["skipped_after"] = f"{model} {proj}: budget of {args.budget}s spent"
            break
        copies, nbytes = int4_copies(n, k)
        configs = {t: choose_config(t, n, k, 4, GROUP, torch.device("cuda")) for t in TOKENS}
        row = {"model": model, "proj": proj, "N": n, "K": k, "int4_bytes": nbytes, "config": configs}
        times4 = {t: bench_int4(t, k, copies, configs[t]) for t in TOKENS}
        if any(c.get("PDL") for c in configs.values()):
            row["int4_no_pdl_us"] = {t: bench_int4(t, k, copies, dict(configs[t], PDL=False)) * 1e6 for t in TOKENS}
        del copies
        times16 = bench_bf16(n, k, TOKENS)
        row["int4_us"] = {t: v * 1e6 for t, v in times4.items()}
        row["int4_GBps"] = {t: nbytes / v / 1e9 for t, v in times4.items()}
        row["int4_fraction_of_copy"] = {t: nbytes / v / gbps for t, v in times4.items()}
        row["bf16_us"] = {t: v * 1e6 for t, v in times16.items()}
        row["bf16_GBps"] = {t: n * k * 2 / v / 1e9 for t, v in times16.items()}
        row["speedup_vs_bf16"] = {t: times16[t] / times4[t] for t in TOKENS}
        for t in TOKENS:
            no_pdl = row.get("int4_no_pdl_us", {}).get(t, float("nan"))
            print(f"| {model} {proj} | {n} | {k} | {t} | {row['int4_us'][t]:.1f} | {row['int4_GBps'][t]:.0f} | "
                  f"{row['int4_fraction_of_copy'][t]:.2f} | {row['bf16_us'][t]:.1f} | "
                  f"{row['speedup_vs_bf16'][t]:.2f}x | {no_pdl:.1f} |", flush=True)
        result["int4"].append(row)
        save()
    if args.dequant and time.time() - began < args.budget:
        result["dequant_bf16"] = bench_dequant(gbps)
    result["elapsed_s"] = time.time() - began
    save()


if __name__ == "__main__":
    main()
