"""ktcore's runtime against unmodified transformers on the same random weights, for every
architecture: logits of a prompt and 32 greedy tokens, with several placements."""

from __future__ import annotations

import textwrap

import pytest
import torch

import ktcore
import ktcore.errors
from ktcore.demo import hf_greedy
from ktcore.formats.state_dict_store import StateDictStore
from ktcore.models.presets import ARCHITECTURES, make_config

FP32_LOGIT_TOL = 1e-4  # of the largest |logit|, fp32 (issue 3)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def reference(request):
    from transformers import AutoModelForCausalLM

    arch = request.param
    config = make_config(arch)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # spread the logits so greedy decoding has no near-ties
        model.lm_head.weight.mul_(20)
    return arch, config, model


def _load(arch, config, model, rules, **kwargs):
    return ktcore.load(store=StateDictStore(model), config=config, rules=rules, dtype="fp32",
                       max_seq_len=64, **kwargs)


@pytest.fixture(scope="module")
def ours(reference):
    arch, config, hf = reference
    return _load(arch, config, hf, f"{arch}-cpu")


def test_logits_and_greedy_tokens_match_transformers(reference, ours):
    arch, config, hf = reference
    torch.manual_seed(7)
    prompt = torch.randint(0, config.vocab_size, (11,))
    with torch.inference_mode():
        want = hf(prompt[None], use_cache=False).logits[0]
    got = ours.logits(prompt)
    assert got.shape == (11, config.vocab_size)
    assert (got - want).abs().max() <= FP32_LOGIT_TOL * want.abs().max()
    with torch.inference_mode():
        expected = hf_greedy(hf, prompt, 32)
    assert ours.generate(prompt, 32, stop_ids=[]) == expected


def test_split_and_per_layer_placements_give_the_same_tokens(reference, tmp_path):
    arch, config, hf = reference
    rules = tmp_path / "hybrid.yaml"
    rules.write_text(textwrap.dedent("""\
        default_device: cpu
        rules:
          - match: {layers: 1, module: mlp.experts}
            replace: {op: experts, backend: torch, device: cpu, options: {dtype: fp32}}
          - match: {module: mlp.experts}
            replace:
              op: experts
              split:
                - {experts: 0-2, backend: torch, device: cpu}
                - {experts: 5-6, backend: torch, device: cpu}
                - {experts: rest, backend: torch, device: cpu}
          - match: {name: '^lm_head$'}
            replace: {op: linear, backend: torch, device: cpu}
        """))
    ours = _load(arch, config, hf, rules)
    split = [p for p in ours.plan.placements if p.experts is not None]
    assert split and {len(p.experts) for p in split} >= {3, 2}
    torch.manual_seed(8)
    prompt = torch.randint(0, config.vocab_size, (9,))
    with torch.inference_mode():
        expected = hf_greedy(hf, prompt, 12)
    assert ours.generate(prompt, 12, stop_ids=[]) == expected


def test_chunked_prefill_equals_one_chunk(reference, ours):
    arch, config, hf = reference
    prompt = torch.randint(0, config.vocab_size, (23,))
    whole = ours.logits(prompt)
    ours.prefill_chunk = 5
    try:
        torch.testing.assert_close(ours.logits(prompt), whole, atol=1e-5, rtol=1e-5)
    finally:
        ours.prefill_chunk = 512


def test_sampling_is_seeded_and_respects_top_k(reference, ours):
    arch, config, hf = reference
    prompt = torch.randint(0, config.vocab_size, (5,))
    a = ours.generate(prompt, 10, temperature=1.0, top_k=5, seed=3, stop_ids=[])
    b = ours.generate(prompt, 10, temperature=1.0, top_k=5, seed=3, stop_ids=[])
    assert a == b
    greedy = ours.generate(prompt, 1, stop_ids=[])
    top1 = ours.generate(prompt, 1, temperature=0.7, top_k=1, seed=5, stop_ids=[])
    assert top1 == greedy


def test_stop_token_ends_generation(reference, ours):
    arch, config, hf = reference
    prompt = torch.randint(0, config.vocab_size, (6,))
    free = ours.generate(prompt, 8, stop_ids=[])
    stopped = ours.generate(prompt, 8, stop_ids=[free[2]])
    assert stopped == free[: free.index(free[2]) + 1]


def test_too_long_a_request_is_refused(reference, ours):
    arch, config, hf = reference
    with pytest.raises(ktcore.errors.KtError, match="exceeds the cache length 64"):
        ours.generate(torch.zeros(60, dtype=torch.long), 10)
