"""The third-party example plugin, installed as its own distribution: discovered through its
entry point, listed by ``kt backends``, selected from YAML, and equal to the reference."""

from __future__ import annotations

import json
import textwrap
from importlib.metadata import PackageNotFoundError, distribution

import pytest
import torch

from ktcore.cli.main import main
from ktcore.ops.experts import ExpertsSpec, TorchExperts


def _installed(name: str) -> bool:
    try:
        distribution(name)
        return True
    except PackageNotFoundError:
        return False


needs_install = pytest.mark.skipif(
    not (_installed("ktcore") and _installed("kt-example-plugin")),
    reason="needs `bash scripts/setup.sh` (ktcore and the plugins pip-installed)",
)


@needs_install
def test_kt_backends_json_lists_every_distribution(capsys):
    assert main(["backends", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    by_key = {(b["name"], b["op"]): b for b in doc["backends"]}
    example = by_key[("example", "experts")]
    assert (example["distribution"], example["version"], example["available"]) == ("kt-example-plugin", "0.3.1", True)
    for op in ("linear", "experts", "mla", "rope"):
        assert by_key[("torch", op)]["distribution"] == "ktcore" and by_key[("torch", op)]["available"]
        marlin = by_key[("marlin", op)]
        assert marlin["distribution"] == "kt-marlin" and marlin["version"] == "0.1.0"
        if not torch.cuda.is_available():
            assert marlin["available"] is False and "no CUDA device" in marlin["reason"]
    for name in ("amx", "llamafile"):
        entry = by_key[(name, "experts")]
        assert entry["distribution"] == f"kt-{name}"
        assert entry["available"] == (entry["reason"] is None)
        if not entry["available"]:  # no kernels built yet, or an unsuitable CPU: said, not crashed
            assert "kt_" in entry["reason"] or "CPU" in entry["reason"]


@needs_install
def test_kt_backends_table_shows_reasons(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "kt-example-plugin 0.3.1" in out
    if not torch.cuda.is_available():
        assert "unavailable: no CUDA device visible" in out


def _weights(spec: ExpertsSpec) -> dict[str, torch.Tensor]:
    E, I, H = spec.num_experts, spec.intermediate_size, spec.hidden_size
    return {"gate": torch.randn(E, I, H) / H**0.5, "up": torch.randn(E, I, H) / H**0.5,
            "down": torch.randn(E, H, I) / I**0.5}


@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize("owned", [None, (0, 2, 3, 6)])
def test_dense_experts_equal_the_reference(tokens, owned):
    from kt_example_plugin.dense_experts import DenseExperts

    torch.manual_seed(tokens)
    spec = ExpertsSpec(num_experts=7, hidden_size=40, intermediate_size=24, top_k=3, owned=owned)
    weights = _weights(spec)
    ours, ref = DenseExperts(spec, "cpu", {}), TorchExperts(spec, "cpu", {"dtype": "fp32"})
    ours.load_weights(weights)
    ref.load_weights(weights)
    x = torch.randn(tokens, 40)
    ids = torch.randint(0, 7, (tokens, 3), dtype=torch.int32)
    ids[0, 1] = ids[0, 0]  # an expert chosen twice counts twice
    w = torch.rand(tokens, 3)
    torch.testing.assert_close(ours(x, ids, w), ref(x, ids, w), atol=1e-5, rtol=1e-5)


@needs_install
def test_yaml_selects_the_example_backend_and_runs_it(tmp_path):
    from ktcore.demo import run_demo

    rules = tmp_path / "example.yaml"
    rules.write_text(textwrap.dedent("""\
        default_device: cpu
        rules:
          - match: {layers: 0, module: mlp.experts}
            replace: {op: experts, backend: example, device: cpu}
          - match: {module: mlp.experts}
            replace:
              op: experts
              split:
                - {experts: 0-5, backend: example, device: cpu, options: {dtype: fp32}}
                - {experts: rest, backend: torch, device: cpu}
        """))
    result = run_demo("qwen3_moe", rules, prompt_len=9, new_tokens=8)
    backends = {(p["modules"], p["backend"], p["experts"]) for p in result["placements"]}
    assert ("model.layers.0.mlp.experts", "example", "all") in backends
    assert ("model.layers.{1-2}.mlp.experts", "example", "0-5") in backends
    assert ("model.layers.{1-2}.mlp.experts", "torch", "6-15") in backends
    assert result["max_abs_logit_diff"] <= 1e-4 * result["max_abs_logit"]
    assert result["tokens_identical"]
