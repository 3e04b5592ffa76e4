"""``kt bench``'s measurements on a tiny model with kt-amx CPU experts: every figure is
present and in range, the roofline's byte count is the experts' packed bytes, and the CLI
writes JSON and Markdown."""

from __future__ import annotations

import json
import types

import pytest

import ktcore
from ktcore.cli.main import main
from ktcore.models.presets import make_config
from ktcore.models.synth import SyntheticWeights
from ktcore.rules.schema import parse_rules
from ktcore.runtime import benchmark
from ktcore.runtime.benchmark import BenchCase, cpu_expert_bytes_per_token, markdown, run_case
from ktcore.runtime.blocks import ExpertsParts
from ktcore.runtime.model import Model

pytest.importorskip("kt_amx", reason="the benchmark cases run kt-amx CPU experts")

CPU_RULES = """\
default_device: cpu
rules:
  - match: {module: mlp.experts}
    replace: {op: experts, backend: amx, device: cpu, options: {format: int4, group_size: 32}}
"""
TINY = BenchCase("tiny", "qwen3_moe", "tiny", None, CPU_RULES, dtype="fp32", prompt_lengths=(20, 40),
                 decode_tokens=6, experts_per_token=(2,), kl_tokens=12)


def test_run_case_reports_every_figure():
    result = run_case(TINY, bandwidth=20e9)
    assert set(result.prefill) == {"20", "40"} and all(v > 0 for v in result.prefill.values())
    assert result.prefill == result.prefill_cpu and result.prefill_streamed == {}
    assert result.streaming_unavailable  # a CPU-only model (and host)
    d = result.decode
    assert d["eager_tokens_per_s"] > 0 and d["graph_tokens_per_s"] is None
    runs = d["eager_runs_tokens_per_s"]
    assert len(runs) == benchmark.DECODE_RUNS and d["eager_tokens_per_s"] == sorted(runs)[len(runs) // 2]
    assert d["host_read_bandwidth_readings_gb_s"] == [20.0]  # given: not read
    assert "embed_tokens on cpu" in d["graph_unavailable"]
    assert 0 < d["roofline_fraction"] < 1
    (sel,) = result.selective
    assert sel["experts_per_token"] == 2 and sel["of"] == 4 and sel["mean_kl_nats"] > 0
    assert len(sel["runs_tokens_per_s"]) == benchmark.DECODE_RUNS
    table = markdown([result])
    assert "| tiny |" in table and "2 of 4 experts per token" in table and "prefill not streamed" in table


@pytest.mark.parametrize("name", sorted(benchmark.CASES))
def test_the_cases_rules_parse_and_put_lm_head_in_int8(name):
    """Every shipped case's rule text builds without an error; its last rule makes lm_head a
    kt-marlin int8 Linear (the peer's GGUF holds it in Q6_K)."""
    rule_file, errors = parse_rules(benchmark.CASES[name].rules)
    assert errors == []
    last = rule_file.rules[-1]
    assert last.match.name == "^lm_head$"
    assert (last.replace.op, last.replace.backend, dict(last.replace.options)) == ("linear", "marlin", {"format": "int8"})


def test_the_roofline_counts_the_higher_of_the_bandwidth_readings_around_decode(monkeypatch):
    readings = iter([10e9, 30e9])
    monkeypatch.setattr(benchmark, "host_read_bandwidth", lambda: next(readings))
    d = run_case(TINY).decode
    assert d["host_read_bandwidth_readings_gb_s"] == [10.0, 30.0] and d["host_read_bandwidth_gb_s"] == 30.0
    assert d["roofline_fraction"] == pytest.approx(d["eager_tokens_per_s"] * d["cpu_expert_bytes_per_token"] / 30e9)


def test_prefill_with_and_without_streaming(monkeypatch):
    """Where the CPU experts can stream, both prefill figures are measured and the faster is
    reported (here the stream's target is the CPU itself, as in test_streamed_experts)."""
    monkeypatch.setattr(ExpertsParts, "stream_device_types", ("cpu",))
    monkeypatch.setattr(Model, "streaming_unavailable", lambda self: None)
    result = run_case(TINY, bandwidth=20e9)
    assert set(result.prefill_cpu) == set(result.prefill_streamed) == {"20", "40"}
    for k, v in result.prefill.items():
        assert v == max(result.prefill_cpu[k], result.prefill_streamed[k]) > 0
    assert result.streaming_unavailable is None
    assert "prefill not streamed" not in markdown([result])


def test_roofline_bytes_are_the_cpu_experts_packed_bytes(tmp_path):
    config = make_config("qwen3_moe")
    rules = "default_device: cpu\nrules:\n  - match: {module: mlp.experts}\n    replace:\n      op: experts\n" \
            "      split:\n        - {experts: 0-3, backend: torch, device: cpu}\n" \
            "        - {experts: rest, backend: amx, device: cpu, options: {format: int4, group_size: 32}}\n"
    path = tmp_path / "split.yaml"
    path.write_text(rules)
    model = ktcore.load(store=SyntheticWeights(config), config=config, rules=path, max_seq_len=16)
    amx = [p for m in model.decoder.modules() if isinstance(m, ExpertsParts) for p in m.parts if hasattr(p, "packed_bytes")]
    torch_parts = [p for m in model.decoder.modules() if isinstance(m, ExpertsParts) for p in m.parts
                   if not hasattr(p, "packed_bytes")]
    K, E = config.num_experts_per_tok, config.num_experts
    want = sum(K * p.packed_bytes() / E for p in amx)
    want += sum(K * sum(t.numel() * t.element_size() for t in p.buffers() if t.is_floating_point()) / E
                for p in torch_parts)
    got = cpu_expert_bytes_per_token(model)
    assert got == pytest.approx(want, rel=0.02)  # torch parts: slot_of is counted too
    assert cpu_expert_bytes_per_token(model, 2) == pytest.approx(got / 2)


class ClockedBell:
    """A doorbell with kt_amx.doorbell's clocks: ``jobs`` jobs of 1 µs in submit and ``wait`` s
    in wait, ``gap`` s apart."""

    def __init__(self, jobs: int, wait: float, gap: float):
        self.jobs, self.wait, self.gap = jobs, wait, gap

    def counts(self):
        return self.jobs, 0

    def times(self):
        return {"submit": self.jobs * 1e-6, "wait": self.jobs * self.wait, "gap": (self.jobs - 1) * self.gap,
                "gaps": self.jobs - 1}


def test_doorbell_clocks_are_read_from_every_distinct_clocked_doorbell(tmp_path, monkeypatch):
    config = make_config("qwen3_moe")
    (tmp_path / "cpu.yaml").write_text(CPU_RULES)
    model = ktcore.load(store=SyntheticWeights(config), config=config, rules=tmp_path / "cpu.yaml", max_seq_len=16)
    blocks = [m for m in model.decoder.modules() if isinstance(m, ExpertsParts)]
    shared, other = ClockedBell(10, 100e-6, 40e-6), ClockedBell(4, 300e-6, 10e-6)
    for i, block in enumerate(blocks):  # runners as the CUDA-graph step attaches them
        bells = [shared, shared, types.SimpleNamespace()] + ([other] if i == 0 else [])
        monkeypatch.setattr(block, "runners", {j: types.SimpleNamespace(doorbell=b) for j, b in enumerate(bells)})
    found = benchmark._doorbells(model)
    assert sorted(map(id, found)) == sorted([id(shared), id(other)])  # no clocks: left out; each once
    before = benchmark._clock_totals(found)
    shared.jobs += 6
    clocks = benchmark.doorbell_clocks(before, benchmark._clock_totals(found), tokens=3)
    assert clocks["jobs_per_token"] == 2.0
    assert clocks["cpu_us_per_job"] == pytest.approx(101.0) and clocks["gap_us_per_job"] == pytest.approx(40.0)
    result = benchmark.Result(case={"name": "c"}, host={}, decode={
        "eager_tokens_per_s": 1.0, "graph_tokens_per_s": 2.0, "graph_speedup": 2.0, "roofline_fraction": 0.5,
        "doorbell": {**clocks, "cpu_experts_gb_s": 90.0, "cpu_experts_bandwidth_fraction": 0.9}})
    assert "CPU experts 101.0 µs (90.0 GB/s, 0.90 of the host's), GPU between layers 40.0 µs" in markdown([result])


def test_cli_writes_json_and_markdown(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(benchmark.CASES, "tiny", TINY)
    monkeypatch.setattr(benchmark, "host_read_bandwidth", lambda: 20e9)
    assert main(["bench", "--case", "tiny", "--prompt-lengths", "16", "--decode-tokens", "4", "--out", str(tmp_path)]) == 0
    (doc,) = json.loads((tmp_path / "results.json").read_text())
    assert doc["case"]["prompt_lengths"] == [16] and doc["decode"]["host_read_bandwidth_gb_s"] == 20.0
    assert "| tiny |" in (tmp_path / "results.md").read_text() and "| tiny |" in capsys.readouterr().out
