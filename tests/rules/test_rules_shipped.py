"""Every shipped rule file checks and explains against its family's tiny config: the CPU ones
on this host as they are, the GPU ones planned for ``cuda:0,cuda:1,cpu``."""

from __future__ import annotations

import pytest
import torch

from ktcore.models.presets import ARCHITECTURES
from ktcore.rules import RuleErrors, check_rules, shipped_rule_files
from ktcore.rules.explain import device_totals, rows
from ktcore.rules.shipped import describe, resolve_rule_path

SHIPPED = shipped_rule_files()
PLACEMENTS = ("cpu", "gpu", "multi-gpu", "hybrid")
PLANNED = "cuda:0,cuda:1,cpu"


def arch_of(stem: str) -> str:
    return next(a for a in ARCHITECTURES if stem.startswith(a + "-"))


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_every_family_has_every_placement():
    assert sorted(SHIPPED) == sorted(f"{a}-{p}" for a in ARCHITECTURES for p in PLACEMENTS)
    for stem, path in SHIPPED.items():
        assert describe(path), f"{stem} has no comment header"
        assert resolve_rule_path(stem) == path


@pytest.mark.parametrize("stem", sorted(SHIPPED))
def test_shipped_file_checks_and_explains(stem, registry, models):
    model = models[arch_of(stem)]
    devices = None if stem.endswith("-cpu") else PLANNED
    plan = check_rules(SHIPPED[stem], registry, model=model, devices=devices)
    total = sum(m.param_count for m in model.modules if "." not in m.name)
    assert sum(p.params for p in plan.placements) == total
    totals = device_totals(rows(plan))
    assert sum(totals.values()) == total * 2  # bf16 everywhere
    experts = [p for p in plan.replacements if p.op == "experts"]
    moe_layers = {m.layer for m in model.modules if "experts" in m.ops}
    assert {p.layer for p in experts} == moe_layers  # every MoE layer's routed experts are placed
    if stem.endswith("-cpu"):
        assert set(totals) == {"cpu"}
    elif stem.endswith("-multi-gpu"):
        assert set(totals) == {"cuda:0", "cuda:1", "cpu"}
        assert plan.device_of("lm_head") == "cuda:1" and plan.device_of("model.embed_tokens") == "cuda:0"
    else:
        assert set(totals) == {"cuda:0", "cpu"}
    if stem.endswith("-hybrid"):
        split = [p for p in experts if p.experts is not None]
        assert split and {p.device for p in split} == {"cuda:0", "cpu"}
        first = min(moe_layers)
        assert [(p.device, p.experts) for p in plan.placements_of(f"model.layers.{first}.mlp.experts")] == [
            ("cuda:0", None)]
    if arch_of(stem).startswith("deepseek"):
        assert {p.op for p in plan.replacements} == {"mla", "experts"}


@pytest.mark.parametrize("stem", sorted(s for s in SHIPPED if not s.endswith("-cpu")))
def test_gpu_files_fail_on_this_cpu_host(stem, registry, models):
    with pytest.raises(RuleErrors) as info:
        check_rules(SHIPPED[stem], registry, model=models[arch_of(stem)])
    messages = [e.message for e in info.value.errors]
    assert "device cuda:0 is not visible (this host has 0 CUDA devices)" in messages
