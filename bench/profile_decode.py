"""Where a captured decode step spends its time, on the GPU host.

Loads the Qwen3-30B-A3B shape cut to a few layers (int4 kt-amx experts on the CPU, the rest
bf16 on the GPU, as ``kt bench``), then for the step captured with and without
``torch.compile``: the replay time (CUDA events), the kernels and copies one replay runs
(torch.profiler), the gaps between them (a gap is the GPU waiting, usually for a host node),
and the kernels of one eager step grouped by name. Also the load time by phase (cProfile).

    python bench/profile_decode.py --layers 2 --out DIR
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import pstats
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

log = logging.getLogger("profile_decode")


def load_model(layers: int, max_len: int):
    import ktcore
    from ktcore.models.presets import make_config
    from ktcore.models.synth import SyntheticWeights
    from ktcore.runtime.benchmark import GPU_WITH_AMX_INT4_EXPERTS

    config = make_config("qwen3_moe", "qwen3-30b-a3b", layers=layers)
    rules = Path(tempfile.mkdtemp()) / "rules.yaml"
    rules.write_text(GPU_WITH_AMX_INT4_EXPERTS)
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    store = SyntheticWeights(config, seed=0, dtype=torch.bfloat16, device="cuda")
    model = ktcore.load(store=store, config=config,
                        rules=rules, dtype="bf16", max_seq_len=max_len)
    profiler.disable()
    load_s = time.perf_counter() - t0
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
    return model, load_s, text.getvalue()


def gpu_events(trace_path: Path) -> list[dict]:
    """Kernels, copies and memsets of a chrome trace, sorted by start (µs)."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    keep = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    keep.sort(key=lambda e: e["ts"])
    return keep


def summarise(events: list[dict]) -> dict:
    if not events:
        return {"count": 0}
    start = events[0]["ts"]
    rows, gaps, end = [], [], start
    for e in events:
        gap = e["ts"] - end
        if gap > 5:
            gaps.append({"before": e["name"][:80], "gap_us": round(gap, 1), "at_us": round(e["ts"] - start, 1)})
        rows.append({"name": e["name"][:80], "cat": e["cat"], "at_us": round(e["ts"] - start, 1),
                     "dur_us": round(e["dur"], 2), "gap_us": round(gap, 1)})
        end = max(end, e["ts"] + e["dur"])
    busy = sum(e["dur"] for e in events)
    by_name = Counter()
    for e in events:
        by_name[e["name"][:80]] += e["dur"]
    return {"count": len(events), "span_us": round(end - start, 1), "busy_us": round(busy, 1),
            "gaps_over_5us": round(sum(g["gap_us"] for g in gaps), 1), "n_gaps": len(gaps),
            "top_by_time": [[n, round(t, 1)] for n, t in by_name.most_common(25)], "gaps": gaps[:60], "events": rows}


def profile_replays(fn, out: Path, tag: str, n: int = 1) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    path = out / f"trace_{tag}.json"
    prof.export_chrome_trace(str(path))
    summary = summarise(gpu_events(path))
    path.unlink()
    return summary


def replay_ms(step, reps: int = 50) -> dict:
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True, blocking=True)
        a.record()
        step.graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    t0 = time.perf_counter()
    done = torch.cuda.Event(blocking=True)  # a sleeping wait: the polling thread would take a core
    for _ in range(reps):  # back to back, one sync at the end
        step.graph.replay()
    done.record()
    done.synchronize()
    return {"median_ms": times[len(times) // 2], "min_ms": times[0],
            "back_to_back_ms": (time.perf_counter() - t0) * 1e3 / reps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", default=".")
    parser.add_argument("--compile", choices=("both", "off", "on"), default="both")
    parser.add_argument("--max-len", type=int, default=4200)
    parser.add_argument("--prefill", type=int, default=0, help="also profile a prefill of this many tokens "
                        "(CPU experts streamed to the GPU when it reaches the streaming threshold)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from ktcore.runtime.cuda_graph import GraphDecodeStep, graph_device

    model, load_s, load_profile = load_model(args.layers, args.max_len)
    (out / f"load_profile_{args.layers}l.txt").write_text(load_profile)
    log.info("loaded %d layers in %.1f s", args.layers, load_s)
    report = {"layers": args.layers, "load_s": load_s, "device": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "max_len": args.max_len}
    device, reason = graph_device(model.decoder)
    if device is None:
        raise SystemExit(f"no graph: {reason}")
    prompt = torch.arange(3, 35)
    if args.prefill:
        ids = torch.randint(3, 1000, (args.prefill,))
        for _ in range(2):  # warm-up: page-locking, workspaces
            model.generate(ids, 1, stop_ids=[])
        prefill = profile_replays(lambda: model.generate(ids, 1, stop_ids=[]), out, "prefill")
        prefill.pop("events")
        prefill["seconds"] = model.timings.prefill_s
        model.set_stream_min_tokens(None)
        model.generate(ids, 1, stop_ids=[])
        prefill["cpu_experts_seconds"] = model.timings.prefill_s
        model.set_stream_min_tokens(128)
        report["prefill"] = prefill
        log.info("prefill %d: streamed %.1f ms (CPU experts %.1f ms), GPU busy %.1f ms, gaps %.1f ms, top %s",
                 args.prefill, prefill["seconds"] * 1e3, prefill["cpu_experts_seconds"] * 1e3, prefill["busy_us"] / 1e3,
                 prefill["gaps_over_5us"] / 1e3, prefill["top_by_time"][:8])
    # eager step: kernels by name
    model.generate(prompt, 2, stop_ids=[], use_graph=False)
    ids = torch.full((1, 1), 7, device=device)
    pos = torch.full((1, 1), 40, device=device)
    lens = torch.full((1,), 41, device=device)
    with torch.inference_mode():
        model.decoder(ids, pos, lens)
        eager = profile_replays(lambda: model.decoder(ids, pos, lens), out, "eager")
    eager.pop("events")
    report["eager_step"] = eager
    modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.compile]
    for compile in modes:
        tag = "compiled" if compile else "plain"
        t0 = time.perf_counter()
        step = GraphDecodeStep(model.decoder, device, batch=1, compile=compile)
        capture_s = time.perf_counter() - t0
        step.positions.fill_(40)
        step.lens.fill_(41)
        for _ in range(5):
            step.graph.replay()
        timing = replay_ms(step)
        summary = profile_replays(step.graph.replay, out, tag)
        model.graph_steps = {1: step}  # generate() uses this step
        model.compile = compile
        model.generate(prompt, 8, stop_ids=[], use_graph=True)
        model.generate(prompt, 64, stop_ids=[], use_graph=True)
        rate = model.timings.decode_tokens / model.timings.decode_s
        report[tag] = {"capture_s": capture_s, "replay": timing, "generate_tokens_per_s": rate,
                       "replay_profile": summary}
        log.info("%s: replay %s, generate %.1f tok/s, %d GPU events, busy %.0f us, gaps %.0f us", tag, timing, rate,
                 summary["count"], summary.get("busy_us", 0), summary.get("gaps_over_5us", 0))
        step.release()
        model.graph_steps = {}
    (out / f"profile_decode_{args.layers}l.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
