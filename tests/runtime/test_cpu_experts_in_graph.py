"""CPU experts inside the captured decode step (DESIGN §5), with kt-amx's and kt-llamafile's
experts.

On the GPU host (``cuda`` tests): greedy tokens are identical between eager and captured
decode for 64 tokens on every architecture's tiny model with (a) all routed experts on the
CPU (kt-amx, and kt-llamafile), (b) the experts of layers 0-1 on the GPU and the rest on the
CPU, (c) a per-expert split inside every layer. Here: the same host-runner path through a stand-in CUDA runtime gives the
plain path's logits and tokens, and ``graph_device`` names what keeps a model off the graph.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

import ktcore
from ktcore.errors import KtError
from ktcore.models.presets import ARCHITECTURES, make_config
from ktcore.models.synth import SyntheticWeights
from ktcore.runtime import cudart as rt
from ktcore.runtime.blocks import ExpertsParts
from ktcore.runtime.cuda_graph import graph_device
from ktcore.runtime.fake_cudart import FakeCudart

pytest.importorskip("kt_amx", reason="the host-job experts come from the kt-amx plugin")
pytest.importorskip("kt_llamafile", reason="and from the kt-llamafile plugin")

AMX = "{op: experts, backend: amx, device: cpu, options: {format: bf16}}"


def _split(gpu_backend: str) -> str:
    """Every layer's experts: the first quarter on the GPU with ``gpu_backend``, the rest on kt-amx."""
    return f"""\
default_device: {{device}}
rules:
  - match: {{module: mlp.experts}}
    replace:
      op: experts
      split:
        - {{experts: 0%-25%, backend: {gpu_backend}, device: {{device}}}}
        - {{experts: rest, backend: amx, device: cpu, options: {{format: bf16}}}}
"""


PLACEMENTS = {
    "all-cpu": f"""\
default_device: {{device}}
rules:
  - match: {{module: mlp.experts}}
    replace: {AMX}
""",
    "first-layers-gpu": f"""\
default_device: {{device}}
rules:
  - match: {{layers: 0-1, module: mlp.experts}}
    replace: {{op: experts, backend: torch, device: {{device}}}}
  - match: {{module: mlp.experts}}
    replace: {AMX}
""",
    "all-cpu-llamafile": """\
default_device: {device}
rules:
  - match: {module: mlp.experts}
    replace: {op: experts, backend: llamafile, device: cpu}
""",
    "split-marlin": _split("marlin"),
    "split": _split("torch"),
}


def _load(arch, placement, device, tmp_path, max_seq_len=96):
    rules = tmp_path / f"{placement}.yaml"
    rules.write_text(PLACEMENTS[placement].replace("{device}", device))
    config = make_config(arch)
    return ktcore.load(store=SyntheticWeights(config, seed=3, dtype=torch.float32), config=config,
                       rules=rules, dtype="fp32", max_seq_len=max_seq_len)


def _prompt(model, n=9):
    return torch.randint(3, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(5))


def _experts_parts(model):
    return [m for m in model.decoder.modules() if isinstance(m, ExpertsParts)]


@pytest.mark.parametrize("placement", ["all-cpu", "all-cpu-llamafile", "split"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_host_runner_path_gives_the_plain_tokens(arch, placement, tmp_path, monkeypatch):
    model = _load(arch, placement, "cpu", tmp_path)
    prompt = _prompt(model)
    want_logits = model.logits(prompt)
    want = model.generate(prompt, 12, stop_ids=[])
    fake = FakeCudart()
    monkeypatch.setattr(rt, "cudart", lambda: fake)
    parts = _experts_parts(model)
    for experts in parts:
        experts.attach_host_runners(4, torch.device("cpu"), torch.float32)
    assert all(experts.runners for experts in parts)
    got = model.generate(prompt, 12, stop_ids=[])
    assert got == want
    calls = [r.python_calls for experts in parts for r in experts.runners.values()]
    assert all(c == 11 for c in calls), calls  # every decode step after the first token
    assert [kind for kind, _ in fake.log[:6]] == ["copy", "copy", "copy", "host", "host", "copy"]
    # a short prompt runs through the runners in prefill as well: same logits
    short = prompt[:3]
    assert torch.allclose(model.logits(short), want_logits[:3], rtol=0, atol=1e-5 * want_logits.abs().max())
    for experts in parts:
        experts.detach_host_runners()
    assert model.generate(prompt, 12, stop_ids=[]) == want


def test_compiled_decode_step_traces_the_host_runners_as_operators(tmp_path, monkeypatch):
    """fullgraph=True: the runners' submit/finish are custom ops, no graph break."""
    model = _load("qwen3_moe", "split", "cpu", tmp_path)
    prompt = _prompt(model)
    want = model.generate(prompt, 6, stop_ids=[])
    monkeypatch.setattr(rt, "cudart", lambda: FakeCudart())
    parts = _experts_parts(model)
    for experts in parts:
        experts.attach_host_runners(1, torch.device("cpu"), torch.float32)
    model.compile = True
    assert model.generate(prompt, 6, stop_ids=[]) == want
    assert model._compiled is not None
    assert all(r.python_calls == 5 for e in parts for r in e.runners.values())


@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen2_moe"])
def test_compiled_step_runs_the_shared_experts_between_submit_and_wait(arch, tmp_path, monkeypatch):
    """Inductor may put independent work anywhere: the shared experts (passed to the finish op)
    must run after the CPU experts are submitted and before the wait, to overlap them."""
    from torch._inductor.utils import run_and_get_code

    model = _load(arch, "all-cpu", "cpu", tmp_path)
    monkeypatch.setattr(rt, "cudart", lambda: FakeCudart())
    for experts in _experts_parts(model):
        experts.attach_host_runners(1, torch.device("cpu"), torch.float32)
    model.compile = True
    _, codes = run_and_get_code(lambda: model.generate(_prompt(model), 3, stop_ids=[]))
    lines = [line.strip() for code in codes for line in code.splitlines()]
    finishes = [i for i, line in enumerate(lines) if "host_experts_finish.default(" in line]
    assert finishes
    for i in finishes:
        after = re.search(r", \[(buf\d+)\]\)$", lines[i])
        assert after, lines[i]  # the shared experts' output is the finish op's `after`
        made = max(j for j in range(i) if re.search(rf"\b(out={after[1]}\b|{after[1]} = )", lines[j]))
        submit = max(j for j in range(i) if "host_experts_submit.default(" in lines[j])
        assert submit < made < i


def test_graph_device_names_what_keeps_a_model_off_the_graph(tmp_path):
    model = _load("qwen3_moe", "all-cpu", "cpu", tmp_path)
    device, reason = graph_device(model.decoder)
    assert device is None
    assert "on cpu" in reason and "mlp.experts" not in reason  # amx experts are not the blocker
    with pytest.raises(KtError, match="cannot decode with a CUDA graph"):
        model.generate(_prompt(model), 2, use_graph=True)
    torch_cpu = tmp_path / "torch-cpu.yaml"
    torch_cpu.write_text("default_device: cpu\nrules:\n  - match: {module: mlp.experts}\n"
                         "    replace: {op: experts, backend: torch, device: cpu}\n")
    config = make_config("qwen3_moe")
    plain = ktcore.load(store=SyntheticWeights(config, seed=3), config=config, rules=torch_cpu, max_seq_len=32)
    device, reason = graph_device(plain.decoder)
    assert device is None and "TorchExperts on the CPU has no host-job support" in reason


@pytest.mark.cuda
@pytest.mark.parametrize(("placement", "compile"),
                         [*((p, False) for p in PLACEMENTS if p != "split-marlin"), ("split", True),
                          pytest.param("split-marlin", False, marks=pytest.mark.skipif(
                              importlib.util.find_spec("kt_marlin") is None, reason="kt-marlin is not installed"))])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_captured_decode_with_cpu_experts_gives_the_eager_tokens(arch, placement, compile, tmp_path):
    model = _load(arch, placement, "cuda:0", tmp_path)
    model.compile = compile
    device, reason = graph_device(model.decoder)
    assert device == torch.device("cuda", 0), reason
    prompt = _prompt(model)
    eager = model.generate(prompt, 64, stop_ids=[], use_graph=False)
    graphed = model.generate(prompt, 64, stop_ids=[], use_graph=True)
    assert model.graph_step is not None and model.graph_step.experts
    assert graphed == eager
    assert model.generate(prompt, 64, stop_ids=[]) == eager  # the graph is reused
    runners = [r for e in model.graph_step.experts for r in e.runners.values()]
    assert runners and all(r.python_calls <= 4 for r in runners)  # warm-up and capture only
