"""``kt bench``: prefill and decode speed of a full-size-shaped random model on this host.

One case loads a synthetic model (real config shape, deterministic random weights, the real
loading code and rule file) or, with ``source="gguf:q4_k_m"``, the same shape from a GGUF of
random valid blocks in llama.cpp's Q4_K_M type mix, written once into the bench cache
(``ktcore.runtime.bench_gguf``) and read by the real GGUF loader, and measures:

- prefill tokens/s for each prompt length (chunked as the runtime prefills), with the CPU
  experts computing on the CPU and, where the model has CPU experts that can stream to its
  GPU (ktcore.runtime.streamed_experts), with them streamed; ``prefill`` is the faster;
- decode tokens/s eager and with the captured CUDA graph (when the model allows one), and the
  graph's speedup: the median of ``DECODE_RUNS`` runs (every run is kept in the result);
- decode as a fraction of the CPU-bandwidth roofline: the bytes of CPU expert weights a token
  reads on average (top-k experts x the CPU's share of each layer's experts, at their packed
  or GGUF size) / the host read bandwidth, against the measured time per token. The bandwidth
  is read just before and just after the decode runs and the higher reading counts: the
  GPU hosts' bandwidth moves by a third from one minute to the next;
- where the CPU experts are rung through a doorbell that keeps clocks (kt-amx's), the captured
  decode's time per layer split in two (``decode.doorbell``): the CPU experts (request to
  answer), with the GB/s their weights stream at in it, and the gap between two layers (the
  GPU's part);
- for each reduced expert count: decode tokens/s and the mean KL divergence of the logits
  against the full count over held-out tokens.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DECODE_PROMPT = 32  # prompt tokens before a decode measurement
DECODE_RUNS = 3  # decode runs per figure, the median reported


@dataclass(frozen=True)
class BenchCase:
    """One model to benchmark; ``layers`` cuts the preset to its first layers; ``rules`` is
    a rule file (path or shipped name) or the YAML text of one."""

    name: str
    arch: str
    preset: str
    layers: int | None
    rules: str
    dtype: str = "bf16"
    prompt_lengths: tuple[int, ...] = (512, 4096)
    decode_tokens: int = 64
    experts_per_token: tuple[int, ...] = ()
    kl_tokens: int = 128
    seed: int = 0
    compile: bool = True  # the captured step compiled (faster: bench/results/README.md, session 3)
    source: str = "synthetic"  # or a GGUF of random valid blocks: "gguf:q4_k_m" (ktcore.runtime.bench_gguf)

    def __post_init__(self) -> None:
        from ktcore.runtime.bench_gguf import GGUF_SOURCES

        if self.source != "synthetic" and self.source not in GGUF_SOURCES:
            raise ValueError(f"BenchCase {self.name}: source must be 'synthetic' or one of {', '.join(GGUF_SOURCES)}, "
                             f"got {self.source!r}")
        if not self.prompt_lengths or min(self.prompt_lengths) < 1:
            raise ValueError(f"BenchCase {self.name}: prompt lengths must be positive, got {self.prompt_lengths}")
        if self.decode_tokens < 2:
            raise ValueError(f"BenchCase {self.name}: decode_tokens must be at least 2")


#: ``lm_head`` in int8 (group 128) by kt-marlin: llama.cpp's Q4_K_M, the peer's file, holds
#: ``output.weight`` in Q6_K (6.56 bits a weight), so int8 (8.125) reads more than the peer
#: does; bf16 would read twice as much (docs/decisions.md, session 11).
INT8_LM_HEAD = """\
  - match: {name: '^lm_head$'}
    replace: {op: linear, backend: marlin, options: {format: int8}}
"""

#: Every module on the GPU (bf16, lm_head int8) but the routed experts: int4 on the CPU with kt-amx.
GPU_WITH_AMX_INT4_EXPERTS = """\
default_device: cuda:0
rules:
  - match: {module: mlp.experts}
    replace: {op: experts, backend: amx, device: cpu, options: {format: int4}}
""" + INT8_LM_HEAD

#: Every module on the GPU (dense GGUF weights dequantised at load; lm_head's Q6_K as int8) but
#: the routed experts: on the CPU with kt-llamafile, computing on the GGUF blocks as the file
#: holds them.
GPU_WITH_LLAMAFILE_EXPERTS = """\
default_device: cuda:0
rules:
  - match: {module: mlp.experts}
    replace: {op: experts, backend: llamafile, device: cpu}
""" + INT8_LM_HEAD

#: The runtime issue's models.
CASES = {
    "qwen3-30b-a3b-12l": BenchCase("qwen3-30b-a3b-12l", "qwen3_moe", "qwen3-30b-a3b", 12, GPU_WITH_AMX_INT4_EXPERTS,
                                   experts_per_token=(6,)),
    "qwen3-30b-a3b-12l-gguf": BenchCase("qwen3-30b-a3b-12l-gguf", "qwen3_moe", "qwen3-30b-a3b", 12,
                                        GPU_WITH_LLAMAFILE_EXPERTS, experts_per_token=(6,), source="gguf:q4_k_m"),
    "deepseek-v2-lite": BenchCase("deepseek-v2-lite", "deepseek_v2", "deepseek-v2-lite", None,
                                  GPU_WITH_AMX_INT4_EXPERTS, experts_per_token=(4,)),
}

#: llama.cpp on the same GPU host as reported in the runtime issue (12-layer Qwen3-30B-A3B
#: shape, Q4_K_M, all MoE experts on the CPU, best of 8/14/16 threads).
PEERS = {("qwen3-30b-a3b", 12): {"source": "llama.cpp (ggml 0.25.3, CUDA), figures from the runtime issue",
                                 "decode_tokens_per_s": 290.0,
                                 "prefill_tokens_per_s": {"512": 2470.0, "4096": 2979.0}}}


@dataclass
class Result:
    case: dict
    host: dict
    load_s: float = 0.0
    prefill: dict = field(default_factory=dict)  # str(length) -> tokens/s, the faster of the two below
    prefill_cpu: dict = field(default_factory=dict)  # str(length) -> tokens/s, CPU experts on the CPU
    prefill_streamed: dict = field(default_factory=dict)  # str(length) -> tokens/s, streamed to the GPU
    streaming_unavailable: str | None = None  # why prefill_streamed is empty
    gguf: dict | None = None  # GGUF cases: path, bytes, write_s (None: the cached file was reused)
    decode: dict = field(default_factory=dict)
    selective: list = field(default_factory=list)
    peer: dict | None = None


def host_read_bandwidth(gib: float = 4.0, reps: int = 5) -> float:
    """Bytes/s of torch summing a buffer of ``gib`` on all its threads (best of ``reps``)."""
    buf = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best


def host_info() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_expert_bytes_per_token(model, experts_per_token: int | None = None) -> float:
    """Average bytes of CPU expert weights one decode token reads: per layer, the top-k
    experts times the share of them the CPU owns, times one CPU expert's packed bytes."""
    from ktcore.runtime.blocks import ExpertsParts

    total = 0.0
    for module in model.decoder.modules():
        if not isinstance(module, ExpertsParts):
            continue
        for part in module.parts:
            if part.device.type != "cpu":
                continue
            spec = part.spec
            nbytes = part.packed_bytes() if hasattr(part, "packed_bytes") else sum(
                t.numel() * t.element_size() for t in (*part.parameters(), *part.buffers()))
            k = experts_per_token or spec.top_k
            total += k * (spec.num_owned / spec.num_experts) * nbytes / spec.num_owned
    return total


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _prefill_rate(model, ids: torch.Tensor) -> float:
    best = float("inf")
    for _ in range(2):  # the first run also sizes workspaces, caching allocators and page-locks
        model.generate(ids, 1, stop_ids=[])
        best = min(best, model.timings.prefill_s)
    return ids.numel() / best


def decode_rates(model, prompt, tokens: int, use_graph: bool, clocks: dict | None = None) -> list[float]:
    """Tokens/s of ``DECODE_RUNS`` decode runs of ``tokens`` tokens, after a warm-up (and the
    capture); fills ``clocks`` (when given) with ``doorbell_clocks`` over the runs."""
    model.generate(prompt, 4, stop_ids=[], use_graph=use_graph)
    bells = _doorbells(model)
    before = _clock_totals(bells)
    rates, decoded = [], 0
    for _ in range(DECODE_RUNS):
        model.generate(prompt, tokens, stop_ids=[], use_graph=use_graph)
        rates.append(model.timings.decode_tokens / model.timings.decode_s)
        decoded += model.timings.decode_tokens
    if clocks is not None and bells:
        clocks.update(doorbell_clocks(before, _clock_totals(bells), decoded))
    return rates


def _doorbells(model) -> list:
    """The distinct doorbells that ring the model's CPU experts from the captured decode, where
    the backend's doorbell keeps clocks (``times()`` and ``counts()``, as kt_amx.doorbell's)."""
    from ktcore.runtime.blocks import ExpertsParts

    bells = {}
    for module in model.decoder.modules():
        if isinstance(module, ExpertsParts):
            for runner in module.runners.values():
                bell = getattr(runner, "doorbell", None)
                if bell is not None and hasattr(bell, "times") and hasattr(bell, "counts"):
                    bells[id(bell)] = bell
    return list(bells.values())


def _clock_totals(bells: list) -> dict:
    totals = {"jobs": 0, "answer": 0.0, "gap": 0.0, "gaps": 0}
    for bell in bells:
        times = bell.times()
        totals["jobs"] += bell.counts()[0]
        totals["answer"] += times["submit"] + times["wait"]  # request to answer, whichever runs the job
        totals["gap"] += times["gap"]
        totals["gaps"] += times["gaps"]
    return totals


def doorbell_clocks(before: dict, after: dict, tokens: int) -> dict:
    """Where a captured decode's time goes, from the doorbells' clocks between two readings:
    per job (one layer's CPU experts for one step) the time from the request's arrival to the
    answer (the CPU experts, whether the watcher's submit function runs them, as kt-llamafile's
    does, or its wait function waits for the pool, as kt-amx's does) and the gap from one
    answer to the next request (the stream's own work between two layers: GPU kernels, copies
    and the doorbell's latency both ways)."""
    jobs = after["jobs"] - before["jobs"]
    gaps = after["gaps"] - before["gaps"]
    return {"jobs_per_token": jobs / max(tokens, 1),
            "cpu_us_per_job": (after["answer"] - before["answer"]) / max(jobs, 1) * 1e6,
            "gap_us_per_job": (after["gap"] - before["gap"]) / max(gaps, 1) * 1e6}


def load_case(case: BenchCase, config, result: Result, gguf_dir: str | Path | None = None):
    """The case's model: from ``SyntheticWeights``, or from its cached GGUF (written first if
    missing; not counted in ``load_s``)."""
    import ktcore

    source: dict = {}
    if case.source == "synthetic":
        from ktcore.models.synth import SyntheticWeights

        source["store"] = SyntheticWeights(config, seed=case.seed, dtype=torch.bfloat16,
                                           device="cuda" if torch.cuda.is_available() else "cpu")  # same bits, faster
        source["config"] = config
    else:
        from ktcore.runtime.bench_gguf import bench_gguf

        made = bench_gguf(config, case.preset, case.source, case.seed, gguf_dir)
        result.gguf = {"path": str(made.path), "bytes": made.nbytes, "write_s": made.write_s}
        source["gguf"] = made.path
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rules = case.rules
        if "\n" in rules:  # the text of a rule file
            rules = Path(tmp, f"{case.name}.yaml")
            rules.write_text(case.rules)
        model = ktcore.load(rules=rules, dtype=case.dtype, compile=case.compile,
                            max_seq_len=max(*case.prompt_lengths, DECODE_PROMPT) + case.decode_tokens + 8, **source)
    result.load_s = time.perf_counter() - t0
    return model


def run_case(case: BenchCase, bandwidth: float | None = None, gguf_dir: str | Path | None = None) -> Result:
    """Runs ``case``; ``bandwidth``: the host read bandwidth to count instead of reading it
    around the decode runs; ``gguf_dir`` holds the GGUF of a GGUF case (default
    ``bench_gguf.default_gguf_dir()``)."""
    from ktcore.models.presets import make_config
    from ktcore.runtime.cuda_graph import graph_device
    from ktcore.runtime.quality import experts_per_token_kl
    from ktcore.runtime.streamed_experts import DEFAULT_MIN_TOKENS as DEFAULT_STREAM_MIN_TOKENS

    result = Result(case=asdict(case), host=host_info())
    config = make_config(case.arch, case.preset, layers=case.layers)
    model = load_case(case, config, result, gguf_dir)
    log.info("%s: loaded in %.1f s", case.name, result.load_s)
    gen = torch.Generator().manual_seed(case.seed)
    vocab = config.vocab_size
    result.streaming_unavailable = model.streaming_unavailable()
    for length in case.prompt_lengths:
        key = str(length)
        ids = torch.randint(3, vocab, (length,), generator=gen)
        model.set_stream_min_tokens(0)
        result.prefill_cpu[key] = _prefill_rate(model, ids)
        if result.streaming_unavailable is None:
            model.set_stream_min_tokens(1)  # every prefill chunk streams
            result.prefill_streamed[key] = _prefill_rate(model, ids)
        result.prefill[key] = max(result.prefill_cpu[key], result.prefill_streamed.get(key, 0.0))
        log.info("%s: prefill %d tokens: %.1f tokens/s CPU experts, %s streamed", case.name, length,
                 result.prefill_cpu[key], result.prefill_streamed.get(key, "-"))
    model.set_stream_min_tokens(DEFAULT_STREAM_MIN_TOKENS)
    prompt = torch.randint(3, vocab, (DECODE_PROMPT,), generator=gen)
    readings = [bandwidth or host_read_bandwidth()]
    model.compile = False  # eager: the plain decoder, as a model runs without graphs
    eager_runs = decode_rates(model, prompt, case.decode_tokens, use_graph=False)
    model.compile = case.compile
    device, reason = graph_device(model.decoder)
    clocks: dict = {}
    graph_runs = decode_rates(model, prompt, case.decode_tokens, True, clocks) if device is not None else None
    if not bandwidth:  # given: a figure the caller stands for (tests)
        readings.append(host_read_bandwidth())
    bandwidth = max(readings)
    eager = statistics.median(eager_runs)
    graph = statistics.median(graph_runs) if graph_runs else None
    best = graph or eager
    per_token = cpu_expert_bytes_per_token(model)
    result.decode = {
        "eager_tokens_per_s": eager, "graph_tokens_per_s": graph, "graph_speedup": graph / eager if graph else None,
        "eager_runs_tokens_per_s": eager_runs, "graph_runs_tokens_per_s": graph_runs,
        "graph_unavailable": reason or None, "cpu_expert_bytes_per_token": per_token,
        "host_read_bandwidth_gb_s": bandwidth / 1e9, "host_read_bandwidth_readings_gb_s": [r / 1e9 for r in readings],
        "roofline_tokens_per_s": bandwidth / per_token if per_token else None,
        "roofline_fraction": best * per_token / bandwidth if per_token else None,
    }
    if clocks:  # the CPU experts' share: their bytes per job over their time per job
        per_job = per_token / clocks["jobs_per_token"] if clocks["jobs_per_token"] else 0.0
        clocks["cpu_experts_gb_s"] = per_job / clocks["cpu_us_per_job"] * 1e-3 if clocks["cpu_us_per_job"] else None
        clocks["cpu_experts_bandwidth_fraction"] = (clocks["cpu_experts_gb_s"] * 1e9 / bandwidth
                                                    if clocks["cpu_experts_gb_s"] else None)
        result.decode["doorbell"] = clocks
    log.info("%s: decode %s", case.name, result.decode)
    held_out = torch.randint(3, vocab, (case.kl_tokens,), generator=gen)
    kl = experts_per_token_kl(model, held_out, case.experts_per_token)
    for n in case.experts_per_token:
        model.set_experts_per_token(n)
        runs = decode_rates(model, prompt, case.decode_tokens, use_graph=device is not None)
        rate = statistics.median(runs)
        result.selective.append({"experts_per_token": n, "of": int(config.num_experts_per_tok),
                                 "decode_tokens_per_s": rate, "runs_tokens_per_s": runs, "speedup": rate / best,
                                 "mean_kl_nats": kl[n]})
        log.info("%s: %d experts per token: %s", case.name, n, result.selective[-1])
    model.set_experts_per_token(None)
    result.peer = PEERS.get((case.preset, case.layers))  # only for the same shape
    return result


def markdown(results: list[Result]) -> str:
    """A table of the figures, with the peer's beside them where known."""
    lines = ["| case | prefill tok/s | prefill CPU experts tok/s | prefill streamed tok/s | decode eager tok/s "
             "| decode graph tok/s | graph speedup | roofline fraction |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        def rates(figures: dict) -> str:
            return ", ".join(f"{k}: {v:.0f}" for k, v in figures.items()) or "-"

        d = r.decode
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {r.case['name']} | {rates(r.prefill)} | {rates(r.prefill_cpu)} | {rates(r.prefill_streamed)} "
                     f"| {d['eager_tokens_per_s']:.1f} | {fmt(d['graph_tokens_per_s'], '.1f')} "
                     f"| {fmt(d['graph_speedup'], '.2f')} | {fmt(d['roofline_fraction'], '.2f')} |")
    for r in results:
        if r.streaming_unavailable:
            lines.append(f"\n{r.case['name']}: prefill not streamed ({r.streaming_unavailable})")
        bell = r.decode.get("doorbell")
        if bell:
            gbs = bell.get("cpu_experts_gb_s")
            share = f" ({gbs:.1f} GB/s, {bell['cpu_experts_bandwidth_fraction']:.2f} of the host's)" if gbs else ""
            lines.append(f"\n{r.case['name']}: captured decode per layer: CPU experts {bell['cpu_us_per_job']:.1f} µs"
                         f"{share}, GPU between layers {bell['gap_us_per_job']:.1f} µs")
        for s in r.selective:
            lines.append(f"\n{r.case['name']}: {s['experts_per_token']} of {s['of']} experts per token: "
                         f"{s['decode_tokens_per_s']:.1f} tok/s ({s['speedup']:.2f}x), mean KL {s['mean_kl_nats']:.4f} nats")
        if r.peer:
            d = r.decode["graph_tokens_per_s"] or r.decode["eager_tokens_per_s"]
            ratios = ", ".join(f"{k}: {r.prefill[k] / v:.2f}x" for k, v in r.peer["prefill_tokens_per_s"].items()
                               if k in r.prefill)
            lines.append(f"\n{r.case['name']} against {r.peer['source']}: decode {d / r.peer['decode_tokens_per_s']:.2f}x, "
                         f"prefill {ratios}")
    return "\n".join(lines) + "\n"
