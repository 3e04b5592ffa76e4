"""Checks against the registry and the devices: backends, operators, devices, probes, options."""

from __future__ import annotations

import pytest
import torch

from ktcore.errors import KtError
from ktcore.rules import RuleErrors, check_rules
from ktcore.rules.placement import DeviceSet


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch):
    """Tests see a host without CUDA devices wherever they run."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def errors(path, registry, **kwargs) -> list[str]:
    with pytest.raises(RuleErrors) as info:
        check_rules(path, registry, **kwargs)
    return [str(e) for e in info.value.errors]


def one_rule(write_rules, replace: str, default: str = "cpu"):
    """A file whose rule 1 replaces the experts; ``replace`` is the flow mapping (line 4)."""
    return write_rules(f"default_device: {default}\nrules:\n  - match: {{module: mlp.experts}}\n"
                       f"    replace: {replace}\n")


@pytest.mark.parametrize("replace, needles", [
    ("{op: experts, backend: torh, device: cpu}",
     ["unknown backend 'torh' (did you mean 'torch'?)", "backends for 'experts':"]),
    ("{op: experts, backend: broken, device: cpu}",
     ["backend 'broken' could not be loaded", "failed to import", "No module named 'no_such_module_xyz'"]),
    ("{op: linear, backend: slowcpu, device: cpu}", ["backend 'slowcpu'", "has no 'linear' operator",
                                                     "it provides: experts"]),
    ("{op: experts, backend: gpuonly, device: cpu}", ["backend 'gpuonly' cannot run 'experts' on cpu: it runs on cuda"]),
    ("{op: experts, backend: torch, device: gpu0}", ["'gpu0' is not a device torch accepts",
                                                     "Invalid device string"]),
    ("{op: experts, backend: torch, device: mps}", ["device 'mps': ktcore places modules on cpu or cuda devices"]),
    ("{op: experts, backend: torch, device: cuda:0}",
     ["device cuda:0 is not visible (this host has 0 CUDA devices)"]),
    ("{op: experts, backend: torch, device: cuda}",
     ["device cuda:0 is not visible (this host has 0 CUDA devices)"]),
    ("{op: experts, backend: slowcpu, device: cpu}",
     ["backend 'slowcpu' (<direct>) is unavailable on this host: no AVX-512 on this CPU"]),
    ("{op: experts, backend: quant, device: cpu, options: {formt: int4}}",
     ["backend 'quant' has no option 'formt' for 'experts' (did you mean 'format'?)",
      "its options: format, group_size, threads"]),
    ("{op: experts, backend: quant, device: cpu, options: {format: int3}}",
     ["backend 'quant': option 'format' must be one of 'int8', 'int4', got 'int3'"]),
    ("{op: experts, backend: quant, device: cpu, options: {threads: many}}",
     ["option 'threads' must be of type int"]),
    ("{op: experts, backend: torch, device: cpu, options: {dtype: fp8}}",
     ["backend 'torch': option 'dtype' must be one of"]),
])
def test_host_errors_at_the_rule_line(write_rules, registry, replace, needles):
    path = one_rule(write_rules, replace)
    found = errors(path, registry)
    assert all(e.startswith(f"{path}:4: ") for e in found), found
    assert any(all(needle in e for needle in needles) for e in found), found


def test_errors_point_at_the_key_line_in_block_style(write_rules, registry):
    path = write_rules("""
        default_device: cuda:3
        rules:
          - match: {module: mlp.experts}
            replace:
              op: experts
              backend: torhc
              device: cuda:1
              options:
                dtype: fp8
          - match: {name: '^lm_head$'}
            keep: {device: cuda:2}
          - match: {module: self_attn}
            keep:
              device: tpu
    """)
    found = errors(path, registry)
    assert found == [
        f"{path}:1: device cuda:3 is not visible (this host has 0 CUDA devices)",
        f"{path}:6: unknown backend 'torhc' (did you mean 'torch'?); backends for 'experts': gpuonly, quant, slowcpu, "
        "torch",
        f"{path}:7: device cuda:1 is not visible (this host has 0 CUDA devices)",
        f"{path}:11: device cuda:2 is not visible (this host has 0 CUDA devices)",
        found[4],
    ]
    assert found[4].startswith(f"{path}:14: 'tpu' is not a device torch accepts")
    # options of an unknown backend cannot be checked; nothing is said about them


def test_split_parts_are_checked_each_at_its_line(write_rules, registry):
    path = write_rules("""
        default_device: cpu
        rules:
          - match: {module: mlp.experts}
            replace:
              op: experts
              split:
                - {experts: 0-3, backend: gpuonly, device: cuda:0}
                - {experts: rest, backend: quant, device: cpu, options: {format: int5}}
    """)
    found = errors(path, registry, devices="cuda:0")
    assert found == [f"{path}:8: backend 'quant': option 'format' must be one of 'int8', 'int4', got 'int5'"]
    found = errors(path, registry)
    assert f"{path}:7: device cuda:0 is not visible (this host has 0 CUDA devices)" in found
    assert f"{path}:7: backend 'gpuonly' (<direct>) is unavailable on this host: no CUDA device" in found


def test_visible_cuda_devices_follow_torch(write_rules, registry, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    ok = one_rule(write_rules, "{op: experts, backend: torch, device: cuda:1}")
    assert check_rules(ok, registry).devices == ("cpu", "cuda:0", "cuda:1")
    bad = one_rule(write_rules, "{op: experts, backend: torch, device: cuda:2}")
    assert errors(bad, registry) == [
        f"{bad}:4: device cuda:2 is not visible (this host has 2 CUDA devices, CUDA_VISIBLE_DEVICES='4,5')"]


def test_planned_devices_replace_the_host_and_skip_probes(write_rules, registry):
    path = write_rules("""
        default_device: cuda:0
        rules:
          - match: {module: mlp.experts}
            replace: {op: experts, backend: slowcpu, device: cpu}
          - match: {name: '^lm_head$'}
            replace: {op: linear, backend: gpuonly, device: cuda:1}
    """)
    plan = check_rules(path, registry, devices="cuda:0,cuda:1,cpu")
    assert plan.planned_devices and plan.devices == ("cpu", "cuda:0", "cuda:1")
    assert any("probes were not run" in n for n in plan.notes)
    found = errors(path, registry, devices=["cuda", "cpu"])  # 'cuda' is cuda:0
    assert found == [f"{path}:6: device cuda:1 is not visible (--devices lists cpu, cuda:0)"]


def test_bad_devices_option_is_an_error():
    with pytest.raises(KtError, match="--devices: 'gpu' is not a device torch accepts"):
        DeviceSet.planned_for("cuda:0,gpu")
    assert DeviceSet.planned_for("cuda:1").names() == ("cpu", "cuda:1")  # cpu is always there


def test_without_a_model_model_checks_are_skipped(write_rules, registry):
    path = write_rules("""
        default_device: cpu
        rules:
          - match: {module: no_such_module}
            replace: {op: experts, backend: torch, device: cpu}
    """)
    plan = check_rules(path, registry)
    assert plan.model is None and plan.placements == () and plan.notes == ()
