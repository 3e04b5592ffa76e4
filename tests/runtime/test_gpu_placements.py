"""On the GPU host: the shipped GPU rule files (attention and dense layers on the GPU, routed
experts on the CPU), the hybrid split and, with two GPUs, the multi-GPU files give the CPU
run's logits and greedy tokens; a decode step captured as a CUDA graph gives the eager tokens.
Run there with: bash scripts/gpu_host_tests.sh"""

from __future__ import annotations

import pytest
import torch

import ktcore
from ktcore.models.presets import ARCHITECTURES, make_config
from ktcore.models.synth import SyntheticWeights

pytestmark = pytest.mark.cuda

LOGIT_TOL = 1e-4  # of the largest |logit|, fp32


def _load(arch, rules, max_seq_len=64):
    config = make_config(arch)
    return ktcore.load(store=SyntheticWeights(config, seed=2, dtype=torch.float32), config=config,
                       rules=rules, dtype="fp32", max_seq_len=max_seq_len)


@pytest.mark.parametrize("placement", ["gpu", "hybrid", "multi-gpu"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gpu_placements_match_the_cpu_run(arch, placement):
    if placement == "multi-gpu" and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    cpu, gpu = _load(arch, f"{arch}-cpu"), _load(arch, f"{arch}-{placement}")
    devices = {p.device for p in gpu.plan.placements}
    assert "cuda:0" in devices and "cpu" in devices  # routed experts stay on the CPU in every file
    prompt = torch.randint(3, cpu.config.vocab_size, (17,), generator=torch.Generator().manual_seed(4))
    want, got = cpu.logits(prompt), gpu.logits(prompt)
    assert (got - want).abs().max() <= LOGIT_TOL * want.abs().max()
    assert gpu.generate(prompt, 32, stop_ids=[]) == cpu.generate(prompt, 32, stop_ids=[])


ALL_ON_GPU = """\
default_device: cuda:0
rules:
  - match: {module: mlp.experts}
    replace: {op: experts, backend: torch, device: cuda:0}
"""


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_captured_decode_gives_the_eager_tokens(arch, tmp_path):
    rules = tmp_path / "all-gpu.yaml"
    rules.write_text(ALL_ON_GPU)
    model = _load(arch, rules, max_seq_len=80)
    prompt = torch.randint(3, model.config.vocab_size, (9,), generator=torch.Generator().manual_seed(6))
    eager = model.generate(prompt, 64, stop_ids=[], use_graph=False)
    graphed = model.generate(prompt, 64, stop_ids=[], use_graph=True)
    assert model.graph_step is not None
    assert graphed == eager
    assert model.generate(prompt, 64, stop_ids=[]) == eager  # the captured graph is reused
