"""``kt make-model`` through ``ktcore.cli.main.main``."""

from __future__ import annotations

import json

import pytest
import torch

from ktcore.cli.main import main
from ktcore.cli.make_model_cmd import parse_size
from ktcore.errors import KtError
from ktcore.formats.safetensors_store import SafetensorsStore
from ktcore.models.make_model import MakeModelSpec
from ktcore.models.presets import ARCHITECTURES, PUBLISHED_PARAMS, preset_architectures


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KTCORE_CACHE", str(tmp_path_factory.getbasetemp() / "ktcore-cache"))


def files_of(outdir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(outdir.iterdir()) if p.is_file()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_make_model_writes_hf_dir_and_gguf(arch, tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["make-model", arch, str(out), "--gguf-types", "f32,Q8_0", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"{arch}-tiny-Q8_0.gguf" in printed and "model.safetensors" in printed
    names = set(files_of(out))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "model.safetensors", f"{arch}-tiny-F32.gguf",
            f"{arch}-tiny-Q8_0.gguf"} == names
    weights = MakeModelSpec(arch, seed=3).weights()
    store = SafetensorsStore(out)
    assert store.names() == weights.names()
    for name in weights.names():
        assert torch.equal(store.get(name).tensor, weights.tensor(name)), name

    from gguf import GGUFReader

    reader = GGUFReader(out / f"{arch}-tiny-Q8_0.gguf")
    types = {t.tensor_type.name for t in reader.tensors}
    assert "Q8_0" in types and types <= {"Q8_0", "F32", "F16"}  # norms/routers stay F32
    gguf_read = pytest.importorskip("ktcore.formats.gguf_read")
    f32 = gguf_read.GGUFStore(out / f"{arch}-tiny-F32.gguf")
    assert sorted(f32.names()) == sorted(weights.names())
    name = weights.names()[-2]
    assert torch.equal(f32.get(name).to_dense(torch.float32), weights.tensor(name).float())


def test_same_arguments_give_byte_identical_files(tmp_path):
    args = ["deepseek_v3", "--gguf-types", "Q8_0,Q4_K", "--shard-size", "200KB", "--seed", "11"]
    assert main(["make-model", args[0], str(tmp_path / "a"), *args[1:]]) == 0
    assert main(["make-model", args[0], str(tmp_path / "b"), *args[1:]]) == 0
    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert sum(n.startswith("model-") for n in a) >= 3  # several shards plus the index
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name
    # a different seed changes the weights, not the tokenizer or config
    assert main(["make-model", args[0], str(tmp_path / "c"), *args[1:-1], "12"]) == 0
    c = files_of(tmp_path / "c")
    assert c["tokenizer.json"] == a["tokenizer.json"] and c["config.json"] == a["config.json"]
    first = sorted(n for n in a if n.startswith("model-0"))[0]
    assert c[first] != a[first]


def test_layers_dtype_and_json(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["make-model", "qwen2_moe", str(out), "--layers", "2", "--dtype", "fp32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["name"] == "qwen2_moe-tiny-2L" and report["gguf_files"] == {}
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["dtype"] == "float32"
    store = SafetensorsStore(out)
    assert store.get("model.layers.1.mlp.experts.up").tensor.dtype == torch.float32
    assert report["parameters"] == sum(t.numel() for t in (store.get(n).tensor for n in store.names()))


def test_no_safetensors_writes_the_model_dir_for_a_gguf(tmp_path):
    out = tmp_path / "m"
    assert main(["make-model", "mixtral", str(out), "--gguf-types", "Q8_0", "--no-safetensors"]) == 0
    assert sorted(files_of(out)) == ["config.json", "generation_config.json", "mixtral-tiny-Q8_0.gguf",
                                     "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("argv, message", [
    (["mixtral", "--preset", "deepseek-v3"], "preset 'deepseek-v3' is a deepseek_v3 model, not mixtral"),
    (["mixtral", "--gguf-types", "Q8_0,Q9_9"], "unsupported GGUF type(s) Q9_9"),
    (["mixtral", "--gguf-types", "Q8_0,q8_0"], "listed twice"),
    (["mixtral", "--layers", "0"], "--layers must be at least 1"),
    (["mixtral", "--shard-size", "lots"], "invalid size 'lots'"),
])
def test_bad_arguments_are_one_line_errors(argv, message, tmp_path, capsys):
    assert main(["make-model", argv[0], str(tmp_path / "m"), *argv[1:]]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_parse_size():
    assert parse_size("123") == 123
    assert parse_size("2KB") == 2048 and parse_size("2KiB") == 2048
    assert parse_size("1.5G") == 3 * 1024**3 // 2
    with pytest.raises(KtError):
        parse_size("-1")


@pytest.mark.parametrize("preset", sorted(PUBLISHED_PARAMS))
def test_full_size_presets_are_described_on_meta_only(preset):
    (arch,) = preset_architectures(preset)
    spec = MakeModelSpec(arch, preset, layers=4)
    assert spec.name == f"{preset}-4L"
    assert spec.config().num_hidden_layers == 4
    full = MakeModelSpec(arch, preset).weights()  # shapes only: no tensor is generated
    assert full.num_parameters() == pytest.approx(PUBLISHED_PARAMS[preset], rel=0.01)


def test_python_api_matches_the_cli(tmp_path):
    from ktcore.models.make_model import make_model

    made = make_model("mixtral", tmp_path / "api", seed=2, gguf_types=["Q8_0"], progress=False)
    assert [q for q, _ in made.gguf_files] == ["Q8_0"]
    assert main(["make-model", "mixtral", str(tmp_path / "cli"), "--seed", "2", "--gguf-types", "Q8_0"]) == 0
    assert files_of(tmp_path / "api") == files_of(tmp_path / "cli")
    with pytest.raises(TypeError):
        make_model(MakeModelSpec("mixtral"), tmp_path / "x", seed=1)
