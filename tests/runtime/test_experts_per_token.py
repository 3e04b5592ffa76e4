"""Selective expert count: a model told to run n of its K routed experts per token gives the
logits of the same model configured with n, the KL report measures the change, and bad
counts are refused with the bounds."""

from __future__ import annotations

import pytest
import torch

import ktcore
from ktcore.errors import KtError
from ktcore.models.presets import ARCHITECTURES, make_config
from ktcore.models.synth import SyntheticWeights
from ktcore.runtime.quality import experts_per_token_kl, mean_kl


def _load(arch, top_k=None, **kwargs):
    config = make_config(arch) if top_k is None else make_config(arch, num_experts_per_tok=top_k)
    return ktcore.load(store=SyntheticWeights(config, seed=7), config=config, rules=f"{arch}-cpu",
                       max_seq_len=64, **kwargs)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fewer_experts_give_the_model_configured_with_fewer(arch):
    full = _load(arch)
    K = full.config.num_experts_per_tok
    n = K // 2
    ids = torch.randint(3, full.config.vocab_size, (13,), generator=torch.Generator().manual_seed(1))
    want = _load(arch, top_k=n).logits(ids)
    fewer = _load(arch, experts_per_token=n)
    got = fewer.logits(ids)
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max(), rtol=0)
    kl = experts_per_token_kl(full, ids, [n, K])
    assert kl[K] < 1e-9 < kl[n]  # the full count changes nothing; fewer experts change the logits
    assert torch.equal(full.logits(ids), full.logits(ids))  # restored afterwards
    assert abs(mean_kl(got, got)) < 1e-12


def test_bad_counts_are_refused():
    with pytest.raises(KtError, match=r"between 1 and the config's num_experts_per_tok \(4\), got 9"):
        _load("qwen3_moe", experts_per_token=9)
