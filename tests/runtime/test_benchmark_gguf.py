"""``kt bench``'s GGUF cases on a tiny model with kt-llamafile CPU experts: the random Q4_K_M
file is written once into the GGUF directory and reused, every figure is present, the
roofline counts the experts' GGUF bytes, and the CLI takes ``--gguf-dir``."""

from __future__ import annotations

import json

import pytest
from gguf import GGUFReader

from ktcore.cli.main import main
from ktcore.models.presets import make_config
from ktcore.runtime import benchmark
from ktcore.runtime.bench_gguf import bench_gguf, default_gguf_dir
from ktcore.runtime.benchmark import CASES, BenchCase, markdown, run_case

pytest.importorskip("kt_llamafile", reason="the GGUF cases run kt-llamafile CPU experts")

CPU_LLAMAFILE_RULES = """\
default_device: cpu
rules:
  - match: {module: mlp.experts}
    replace: {op: experts, backend: llamafile, device: cpu}
"""
TINY_GGUF = BenchCase("tiny-gguf", "qwen3_moe", "tiny", 2, CPU_LLAMAFILE_RULES, dtype="fp32", prompt_lengths=(20,),
                      decode_tokens=6, experts_per_token=(2,), kl_tokens=12, source="gguf:q4_k_m")


def test_the_case_of_the_runtime_issue():
    case = CASES["qwen3-30b-a3b-12l-gguf"]
    assert (case.preset, case.layers, case.source, case.experts_per_token) == ("qwen3-30b-a3b", 12, "gguf:q4_k_m", (6,))
    assert "backend: llamafile, device: cpu" in case.rules and "default_device: cuda:0" in case.rules
    assert benchmark.PEERS[(case.preset, case.layers)]  # compared with llama.cpp like the int4 case
    with pytest.raises(ValueError, match="source must be"):
        BenchCase("x", "qwen3_moe", "tiny", None, CPU_LLAMAFILE_RULES, source="gguf:q8_0")


def test_run_case_from_gguf(tmp_path):
    result = run_case(TINY_GGUF, bandwidth=20e9, gguf_dir=tmp_path)
    path = tmp_path / result.gguf["path"].rsplit("/", 1)[1]
    assert path.is_file() and path.name.startswith("tiny-2L-Q4_K_M-seed0-") and result.gguf["write_s"] > 0
    assert result.gguf["bytes"] == path.stat().st_size and not list(tmp_path.glob(".*"))  # no temporary left
    assert set(result.prefill) == {"20"} and result.prefill["20"] > 0
    d = result.decode
    assert d["eager_tokens_per_s"] > 0 and d["graph_tokens_per_s"] is None
    # the roofline's bytes: per layer, top-k experts' GGUF blocks of gate, up and down
    reader = GGUFReader(path)
    config = make_config("qwen3_moe", "tiny", layers=2)
    expert_bytes = sum(int(t.n_bytes) for t in reader.tensors if "_exps." in t.name) / config.num_experts
    assert d["cpu_expert_bytes_per_token"] == pytest.approx(config.num_experts_per_tok * expert_bytes)
    assert 0 < d["roofline_fraction"] < 1
    (sel,) = result.selective
    assert sel["experts_per_token"] == 2 and sel["mean_kl_nats"] > 0  # finite logits all along
    assert "| tiny-gguf |" in markdown([result])
    again = bench_gguf(config, "tiny", "gguf:q4_k_m", 0, tmp_path)  # the cached file, as it is
    assert again.path == path and again.write_s is None
    assert bench_gguf(config, "tiny", "gguf:q4_k_m", 1, tmp_path).path != path  # another seed, another file


def test_default_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("KTCORE_CACHE", str(tmp_path))
    assert default_gguf_dir() == tmp_path / "bench"


def test_cli_gguf_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(benchmark.CASES, "tiny-gguf", TINY_GGUF)
    monkeypatch.setattr(benchmark, "host_read_bandwidth", lambda: 20e9)
    gguf_dir = tmp_path / "ggufs"
    assert main(["bench", "--case", "tiny-gguf", "--prompt-lengths", "16", "--decode-tokens", "4",
                 "--gguf-dir", str(gguf_dir), "--out", str(tmp_path / "out")]) == 0
    (doc,) = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["case"]["source"] == "gguf:q4_k_m" and doc["gguf"]["path"].startswith(str(gguf_dir))
    assert "| tiny-gguf |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "~/.cache/ktcore/bench" in capsys.readouterr().out  # where the GGUF goes
