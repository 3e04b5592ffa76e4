"""``kt rules check|explain|list`` through ``ktcore.cli.main.main``."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


GOOD = """
    default_device: cuda:0
    rules:
      - match: {module: mlp.experts}
        replace: {op: experts, backend: torch, device: cpu}
"""

BAD = """
    default_device: cpu
    rules:
      - match: {name: '^lm_head$'}
        replace: {op: linear, backend: torhc, device: cpu}
      - match: {modul: mlp.experts}
        replace: {op: experts, backend: torch, device: cuda:0}
      - match: {module: self_attn}
        replace: {op: mla, backend: torch, device: cpu}
"""


def test_check_ok_with_model(cli, capsys, write_rules, tiny_dirs):
    code = cli("rules", "check", write_rules(GOOD), "--model", tiny_dirs["qwen3_moe"], "--devices", "cuda:0,cpu")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines()[0] == "ok: 1 rule, 45 modules placed"
    assert "note: planning for devices cpu, cuda:0: backend availability probes were not run" in out


def test_check_ok_without_model(cli, capsys, write_rules):
    assert cli("rules", "check", write_rules(GOOD), "--devices", "cuda:0") == 0
    assert capsys.readouterr().out.startswith("ok: 1 rule (no --model given")


def test_check_reports_every_error_one_per_line_without_traceback(cli, capsys, write_rules, tiny_dirs):
    path = write_rules(BAD)
    code = cli("rules", "check", path, "--model", tiny_dirs["qwen3_moe"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines[0] == f"{path}:4: unknown backend 'torhc' (did you mean 'torch'?); backends for 'linear': " \
                       "gpuonly, quant, torch"
    assert lines[1].startswith(f"{path}:5: unknown key 'modul' in match (did you mean 'module'?)")
    assert lines[2].startswith(f"{path}:7: rule 3 (module 'self_attn') matches no module: op 'mla' cannot replace")
    assert len(lines) == 3


def test_device_not_visible_on_this_host(cli, capsys, write_rules):
    path = write_rules(GOOD)
    assert cli("rules", "check", path) == 1
    err = capsys.readouterr().err
    assert err == f"{path}:1: device cuda:0 is not visible (this host has 0 CUDA devices)\n"


def test_malformed_yaml(cli, capsys, write_rules):
    path = write_rules("default_device: cpu\nrules:\n  - match: {name: x\n")
    assert cli("rules", "check", path) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:4: invalid YAML") and "Traceback" not in err


def test_missing_file_and_bad_options_are_errors_not_tracebacks(cli, capsys, write_rules, tmp_path):
    assert cli("rules", "check", "qwen3_moe-gpo") == 1
    err = capsys.readouterr().err
    assert "no such rule file" in err and "did you mean 'qwen3_moe-gpu'" in err and "Traceback" not in err
    assert cli("rules", "check", write_rules(GOOD), "--devices", "cuda:0,tpu") == 1
    assert "--devices: 'tpu' is not a device torch accepts" in capsys.readouterr().err
    assert cli("rules", "check", write_rules(GOOD), "--model", tmp_path / "nowhere") == 1
    err = capsys.readouterr().err
    assert "no config.json found" in err and "Traceback" not in err


def test_explain_table(cli, capsys, write_rules, tiny_dirs):
    code = cli("rules", "explain", write_rules(GOOD), "--model", tiny_dirs["deepseek_v3"], "--devices", "cuda:0")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "model.layers.{1-2}.mlp.experts" in out and "\nmodel.layers.0 " in out  # dense layer 0: one row
    assert "bytes per device:" in out and "cuda:0" in out and "cpu" in out


def test_explain_json(cli, capsys, write_rules, tiny_dirs):
    code = cli("rules", "explain", write_rules(GOOD), "--model", tiny_dirs["qwen3_moe"], "--devices", "cuda:0",
               "--json")
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    assert doc["devices"] == {"cuda:0": 212032, "cpu": 589824}
    assert doc["model"] == str(tiny_dirs["qwen3_moe"]) and doc["num_layers"] == 3
    assert {r["module"] for r in doc["rows"]} >= {"model.layers.{0-2}.mlp.experts", "lm_head"}


def test_explain_errors_like_check(cli, capsys, write_rules, tiny_dirs):
    path = write_rules(BAD)
    assert cli("rules", "explain", path, "--model", tiny_dirs["qwen3_moe"], "--json") == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count(f"{path}:") == 3


def test_shipped_file_by_stem_and_list(cli, capsys, tiny_dirs):
    assert cli("rules", "check", "qwen3_moe-cpu", "--model", tiny_dirs["qwen3_moe"]) == 0
    assert capsys.readouterr().out.startswith("ok: 1 rule, 45 modules placed")
    assert cli("rules", "list") == 0
    out = capsys.readouterr().out
    assert "qwen3_moe-cpu" in out and "deepseek_v3-hybrid" in out
    assert cli("rules", "list", "--json") == 0
    assert {"qwen3_moe-cpu", "mixtral-multi-gpu"} <= {f["name"] for f in json.loads(capsys.readouterr().out)}


def test_rules_without_action_prints_usage(cli, capsys):
    assert cli("rules") == 2
    assert "check" in capsys.readouterr().err
