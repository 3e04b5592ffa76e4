"""Benchmarks of kt-marlin's linear and dequantisation kernels, as fractions of the HBM
bandwidth measured in the same run.

- ceiling: a large device-to-device copy (bytes read + written per second);
- int4 GEMV at 1 token on DeepSeek-V3 and Qwen3 projection shapes: packed weight bytes
  (int4 words + fp16 scales/offsets) per second over the ceiling;
- int4 vs torch bf16 ``F.linear`` at 1..16 tokens: time ratio;
- GGUF dequantisation to bf16: (GGUF bytes read + bf16 bytes written) per second over the
  ceiling.

Every timing replays a CUDA graph holding one call per copy of the weights, with enough
copies to exceed the L2 cache several times, so launch overhead is out and the weights come
from HBM. Usage: ``python bench_linear.py --out results.json [--budget SECONDS]``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from kt_marlin.dequant import QTYPES, dequantize
from kt_marlin.wq_matmul import choose_config, launch

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
    del src, dst
    return {"bytes": 2 * n, "seconds": t, "GBps": 2 * n / t / 1e9}


def int4_copies(n: int, k: int, group: int = 128):
    words = n * k // 8
    nbytes = words * 4 + 2 * 2 * n * (k // group)
    copies = max(1, -(-L2_FOOTPRINT // nbytes))
    out = []
    for _ in range(min(copies, 64)):
        qw = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda")
        s = (torch.rand(n, k // group, device="cuda") * 0.01).half()
        o = (-8 * s.float()).half()
        out.append((qw, s, o))
    return out, nbytes


def bench_int4(n: int, k: int, t: int, copies, config=None) -> float:
    x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
    return graph_time([lambda c=c: launch(x, c[0], c[1], c[2], None, 4, 128, config) for c in copies])


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
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget", type=float, default=150.0, help="seconds; later sections are skipped past it")
    args = parser.parse_args()
    began = time.time()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    result["triton"] = triton.__version__

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    ceiling = hbm_ceiling()
    result["hbm_copy"] = ceiling
    gbps = ceiling["GBps"] * 1e9
    save()
    result["dequant_bf16"] = bench_dequant(gbps)
    save()
    result["int4"] = []
    for model, proj, n, k in SHAPES:
        if time.time() - began > args.budget:
            result["skipped_after"] = f"{model} {proj}: budget of {args.budget}s spent"
            break
        copies, nbytes = int4_copies(n, k)
        row = {"model": model, "proj": proj, "N": n, "K": k, "int4_bytes": nbytes,
               "config_t1": choose_config(1, n, k, 4, 128, torch.device("cuda"))}
        times4 = {t: bench_int4(n, k, t, copies) for t in TOKENS}
        del copies
        times16 = bench_bf16(n, k, TOKENS)
        row["gemv_t1_us"] = times4[1] * 1e6
        row["gemv_t1_GBps"] = nbytes / times4[1] / 1e9
        row["gemv_t1_fraction_of_copy"] = nbytes / times4[1] / gbps
        row["bf16_t1_fraction_of_copy"] = n * k * 2 / times16[1] / gbps
        row["int4_us"] = {t: v * 1e6 for t, v in times4.items()}
        row["bf16_us"] = {t: v * 1e6 for t, v in times16.items()}
        row["speedup_vs_bf16"] = {t: times16[t] / times4[t] for t in TOKENS}
        result["int4"].append(row)
        save()
    # a small sweep of GEMV tiles on three shapes: what the heuristic leaves on the table
    sweep = []
    for model, proj, n, k in (SHAPES[0], SHAPES[5], SHAPES[11]):
        if time.time() - began > args.budget:
            break
        copies, nbytes = int4_copies(n, k)
        for bn in (8, 16, 32):
            for bk in (128, 256, 512):
                for split in (1, 2, 4):
                    if time.time() - began > args.budget:
                        break
                    cfg = dict(BLOCK_T=1, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4)
                    t = bench_int4(n, k, 1, copies, cfg)
                    sweep.append({"proj": f"{model} {proj}", "cfg": cfg, "us": t * 1e6,
                                  "fraction_of_copy": nbytes / t / gbps})
        del copies
    result["gemv_sweep"] = sweep
    result["elapsed_s"] = time.time() - began
    save()


if __name__ == "__main__":
    main()
