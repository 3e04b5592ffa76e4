"""Concurrent sequences: each prompt is prefilled into its own cache row, one decode step
advances all of them (batch buckets of powers of two), and every sequence gets the tokens it
gets alone. The ``cuda`` test checks the same with captured graphs per bucket and CPU experts
from host nodes."""

from __future__ import annotations

import pytest
import torch

import ktcore
from ktcore.errors import KtError
from ktcore.models.presets import ARCHITECTURES, make_config
from ktcore.models.synth import SyntheticWeights


def _load(arch, rules, max_batch=4, max_seq_len=64, dtype="fp32"):
    config = make_config(arch)
    return ktcore.load(store=SyntheticWeights(config, seed=9, dtype=torch.float32), config=config, rules=rules,
                       dtype=dtype, max_seq_len=max_seq_len, max_batch=max_batch)


def _prompts(model, lengths):
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, model.config.vocab_size, (n,), generator=gen) for n in lengths]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batch_gives_each_sequence_its_own_tokens(arch):
    model = _load(arch, f"{arch}-cpu")
    prompts = _prompts(model, (5, 11, 1))
    alone = [model.generate(p, 10, stop_ids=[]) for p in prompts]
    assert model.bucket(3) == 4 and model.bucket(1) == 1 and model.bucket(2) == 2
    assert model.generate_batch(prompts, 10, stop_ids=[]) == alone
    assert model.timings.decode_tokens == 3 * 9 and model.timings.prefill_tokens == 17


def test_stop_tokens_end_one_sequence_and_not_the_others():
    model = _load("qwen3_moe", "qwen3_moe-cpu")
    prompts = _prompts(model, (4, 6))
    alone = [model.generate(p, 12, stop_ids=[]) for p in prompts]
    stop = alone[0][3]  # the first sequence's fourth token
    outs = model.generate_batch(prompts, 12, stop_ids=[stop])
    assert outs[0] == alone[0][:alone[0].index(stop) + 1]
    second = alone[1][:alone[1].index(stop) + 1] if stop in alone[1] else alone[1]
    assert outs[1] == second


def test_batch_limits():
    model = _load("mixtral", "mixtral-cpu", max_batch=2)
    with pytest.raises(KtError, match="give 1 to 2 prompts"):
        model.generate_batch(_prompts(model, (3, 3, 3)), 4)
    with pytest.raises(KtError, match="max_batch must be a positive int"):
        _load("mixtral", "mixtral-cpu", max_batch=0)


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batch_buckets_in_cuda_graphs_with_cpu_experts(arch, tmp_path):
    pytest.importorskip("kt_amx", reason="CPU experts with host jobs come from kt-amx")
    rules = tmp_path / "split.yaml"
    rules.write_text("default_device: cuda:0\nrules:\n  - match: {module: mlp.experts}\n    replace:\n"
                     "      op: experts\n      split:\n        - {experts: 0%-25%, backend: torch, device: cuda:0}\n"
                     "        - {experts: rest, backend: amx, device: cpu, options: {format: bf16}}\n")
    model = _load(arch, rules, max_seq_len=96)
    prompts = _prompts(model, (5, 9, 2))
    eager = model.generate_batch(prompts, 32, stop_ids=[], use_graph=False)
    assert model.generate_batch(prompts, 32, stop_ids=[], use_graph=True) == eager
    assert model.generate_batch(prompts[:2], 32, stop_ids=[], use_graph=True) == eager[:2]
    assert model.generate(prompts[2], 32, stop_ids=[], use_graph=True) == eager[2]
    assert sorted(model.graph_steps) == [1, 2, 4]
