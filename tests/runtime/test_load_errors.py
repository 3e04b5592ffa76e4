"""Bad models give one clear error that names the file and the tensor, before anything is
built (never a segfault or a half-loaded model), through the API and through `kt generate`."""

from __future__ import annotations

import json
import shutil

import pytest

import ktcore
from ktcore.cli.main import main
from ktcore.errors import KtError
from ktcore.models.make_model import make_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen3")
    made = make_model("qwen3_moe", out, preset="tiny", dtype="fp32", gguf_types=("Q8_0",), seed=1)
    return out, made.gguf_files[0][1][0]


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_truncated_gguf(tiny, tmp_path, capsys):
    _, gguf = tiny
    cut = tmp_path / "cut.gguf"
    data = gguf.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(KtError, match="cut.gguf"):
        ktcore.load(gguf=cut)
    err = _cli_error(capsys, ["generate", "--gguf", str(cut), "--prompt", "x"])
    assert "cut.gguf" in err and err.count("\n") == 1


def test_missing_tensor_in_safetensors(tiny, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    model_dir, _ = tiny
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken, ignore=shutil.ignore_patterns("*.gguf"))
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, broken / "model.safetensors")
    err = _cli_error(capsys, ["generate", "--model", str(broken), "--prompt", "x"])
    assert "model.layers.1.self_attn.o_proj.weight" in err and str(broken) in err
    assert torch.is_tensor(tensors["model.norm.weight"])


def test_shape_that_disagrees_with_the_config(tiny, tmp_path):
    model_dir, gguf = tiny
    other = tmp_path / "other"
    shutil.copytree(model_dir, other, ignore=shutil.ignore_patterns("*.gguf", "*.safetensors"))
    config = json.loads((other / "config.json").read_text())
    config["moe_intermediate_size"] = 48
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(KtError, match=r"ffn_gate_exps|experts") as info:
        ktcore.load(other, gguf=gguf)
    assert gguf.name in str(info.value)


def test_unsupported_architecture(tiny, tmp_path, capsys):
    model_dir, _ = tiny
    other = tmp_path / "gpt2"
    shutil.copytree(model_dir, other, ignore=shutil.ignore_patterns("*.gguf"))
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(config))
    err = _cli_error(capsys, ["generate", "--model", str(other), "--prompt", "x"])
    assert "gpt2" in err


def test_generate_json_reports_text_ids_and_speed(tiny, capsys):
    model_dir, gguf = tiny
    assert main(["generate", "--model", str(model_dir), "--gguf", str(gguf), "--prompt", "import os\n",
                 "--max-new-tokens", "6", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["token_ids"]) <= 6 and doc["prompt_tokens"] >= 2
    assert isinstance(doc["text"], str)
    assert doc["timings"]["prefill_tokens_per_s"] > 0 and doc["rules"].endswith("qwen3_moe-cpu.yaml")


def test_default_model_is_made_once_and_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KTCORE_CACHE", str(tmp_path))
    assert main(["generate", "--prompt", "def f(x):", "--max-new-tokens", "4", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    made = list((tmp_path / "models").iterdir())
    assert [p.name for p in made] == ["tiny-deepseek_v3-seed0"]
    stamp = (made[0] / "config.json").stat().st_mtime_ns
    assert main(["generate", "--prompt", "def f(x):", "--max-new-tokens", "4", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["token_ids"] == first["token_ids"]
    assert (made[0] / "config.json").stat().st_mtime_ns == stamp
