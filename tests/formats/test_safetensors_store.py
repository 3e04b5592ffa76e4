"""``SafetensorsStore``: canonical names over HF shards, and clear errors on bad files."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ktcore.errors import WeightError
from ktcore.formats.safetensors_store import SafetensorsStore, hf_disk_name
from ktcore.formats.store import WeightStore
from ktcore.models.hf_dir import write_hf_dir
from ktcore.models.presets import ARCHITECTURES, make_config
from ktcore.models.synth import SyntheticWeights
from ktcore.models.tokenizer import build_tokenizer


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KTCORE_CACHE", str(tmp_path_factory.getbasetemp() / "ktcore-cache"))


def write(outdir, arch="qwen3_moe", shard_bytes=150_000, **overrides):
    config = make_config(arch, **overrides)
    weights = SyntheticWeights(config, seed=2)
    write_hf_dir(outdir, weights, build_tokenizer(config), shard_bytes=shard_bytes, progress=False)
    return weights


def load_file(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_round_trip_equals_synthetic_weights(arch, tmp_path):
    weights = write(tmp_path, arch)
    store = SafetensorsStore(tmp_path)
    assert isinstance(store, WeightStore)
    assert store.names() == weights.names()
    assert "safetensors shards" in store.source
    for name in weights.names():
        assert store.shape(name) == weights.shape(name)
        got = store.get(name)
        assert got.name == name and got.format == "dense"
        assert torch.equal(got.tensor, weights.tensor(name)), name


def test_single_file_and_no_config(tmp_path):
    weights = write(tmp_path, "mixtral", shard_bytes=1 << 30)
    assert (tmp_path / "model.safetensors").is_file()
    store = SafetensorsStore(tmp_path, config=False)  # no shape check; names still canonical
    assert sorted(store.names()) == sorted(weights.names())
    assert "1 safetensors shard)" in store.source
    assert torch.equal(store.get("model.layers.1.mlp.gate.weight").tensor,
                       weights.tensor("model.layers.1.mlp.gate.weight"))


def test_fused_transformers_layout(tmp_path):
    """Stacked ``gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I] as transformers 5 holds them."""
    config = make_config("deepseek_v3")
    weights = SyntheticWeights(config, dtype=torch.float32)
    tensors = {}
    for name in weights.names():
        if name.endswith(".experts.gate"):
            base = name[: -len("gate")]
            tensors[base + "gate_up_proj"] = torch.cat([weights.tensor(name), weights.tensor(base + "up")], 1)
        elif name.endswith(".experts.down"):
            tensors[name[: -len("down")] + "down_proj"] = weights.tensor(name)
        elif not name.endswith(".experts.up"):
            tensors[name] = weights.tensor(name)
    config.save_pretrained(tmp_path)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    store = SafetensorsStore(tmp_path)
    assert store.names() == weights.names()
    for name in ("model.layers.1.mlp.experts.gate", "model.layers.1.mlp.experts.up",
                 "model.layers.2.mlp.experts.down"):
        assert store.shape(name) == weights.shape(name)
        assert torch.equal(store.get(name).tensor, weights.tensor(name))


def test_hf_disk_name():
    assert hf_disk_name("mixtral", "model.layers.3.mlp.experts.up", 5) == \
        "model.layers.3.block_sparse_moe.experts.5.w3.weight"
    assert hf_disk_name("mixtral", "model.layers.3.mlp.experts.down", 0) == \
        "model.layers.3.block_sparse_moe.experts.0.w2.weight"
    assert hf_disk_name("mixtral", "model.layers.3.mlp.gate.weight") == "model.layers.3.block_sparse_moe.gate.weight"
    assert hf_disk_name("deepseek_v3", "model.layers.3.mlp.experts.gate", 7) == \
        "model.layers.3.mlp.experts.7.gate_proj.weight"
    assert hf_disk_name("qwen2_moe", "model.layers.0.mlp.gate.weight") == "model.layers.0.mlp.gate.weight"
    with pytest.raises(ValueError):
        hf_disk_name("qwen3_moe", "model.norm.weight", 0)


def test_layers_past_the_config_are_left_out(tmp_path):
    """DeepSeek-V3 checkpoints carry the MTP layer 61 past num_hidden_layers."""
    write(tmp_path, "deepseek_v3", shard_bytes=1 << 30)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128, dtype=torch.bfloat16)
    save_file(tensors, str(path))
    store = SafetensorsStore(tmp_path)
    assert not any(name.startswith("model.layers.3.") for name in store.names())


def test_unused_tensors_warn(tmp_path, caplog):
    write(tmp_path, shard_bytes=1 << 30)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    tensors["model.extra.weight"] = torch.zeros(4, dtype=torch.bfloat16)
    save_file(tensors, str(path))
    with caplog.at_level(logging.WARNING, logger="ktcore.formats.safetensors_store"):
        store = SafetensorsStore(tmp_path)
    assert "model.extra.weight" in caplog.text and "model.extra.weight" not in store.names()


# -- errors ---------------------------------------------------------------------------------------


def test_truncated_shard(tmp_path):
    write(tmp_path)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightError, match=rf"{shard.name}.*truncated or corrupt"):
        SafetensorsStore(tmp_path)


def test_corrupt_header(tmp_path):
    write(tmp_path)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:16] = b"garbage!"
    shard.write_bytes(bytes(data))
    with pytest.raises(WeightError, match=shard.name):
        SafetensorsStore(tmp_path)


def test_missing_expert_tensor(tmp_path):
    write(tmp_path, shard_bytes=1 << 30)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, str(path))
    with pytest.raises(WeightError, match=r"'model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight'.*missing"):
        SafetensorsStore(tmp_path)


def test_missing_plain_tensor(tmp_path):
    write(tmp_path, shard_bytes=1 << 30)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, str(path))
    with pytest.raises(WeightError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight.*missing"):
        SafetensorsStore(tmp_path)


def test_shape_disagreeing_with_the_config(tmp_path):
    write(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    config["moe_intermediate_size"] = 48
    config_file.write_text(json.dumps(config))
    with pytest.raises(WeightError, match=r"model-\d+-of-\d+\.safetensors: tensor 'model\.layers\.0\.mlp\.experts"
                                          r"\.0\.gate_proj\.weight' has shape \[32, 64\], the config says \[48, 64\]"):
        SafetensorsStore(tmp_path)
    config["moe_intermediate_size"] = 32
    config["num_local_experts"] = 8  # transformers 5 saves num_experts under this name
    config_file.write_text(json.dumps(config))
    with pytest.raises(WeightError, match=r"model\.layers\.0\.mlp\.experts\.gate has 16 experts on disk .* says 8"):
        SafetensorsStore(tmp_path)
    config["num_local_experts"] = 16
    config["hidden_size"] = 96
    config_file.write_text(json.dumps(config))
    with pytest.raises(WeightError, match=r"tensor 'model\.embed_tokens\.weight' has shape \[512, 64\], "
                                          r"the config says \[512, 96\]"):
        SafetensorsStore(tmp_path)


def test_index_pointing_at_a_missing_shard(tmp_path):
    write(tmp_path)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(WeightError, match=rf"{shard.name}: shard listed in .* does not exist"):
        SafetensorsStore(tmp_path)


def test_index_listing_a_tensor_not_in_its_shard(tmp_path):
    write(tmp_path)
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first = sorted(tmp_path.glob("model-*.safetensors"))[0]
    assert index["weight_map"]["model.norm.weight"] != first.name  # written last
    index["weight_map"]["model.norm.weight"] = first.name
    index_file.write_text(json.dumps(index))
    with pytest.raises(WeightError, match=rf"{first.name}: tensor 'model.norm.weight' is listed"):
        SafetensorsStore(tmp_path)


def test_unsupported_dtype(tmp_path):
    write(tmp_path, shard_bytes=1 << 30)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, str(path))
    with pytest.raises(WeightError, match=rf"'{name}' has dtype F8_E4M3"):
        SafetensorsStore(tmp_path)


def test_not_a_model_dir(tmp_path):
    with pytest.raises(WeightError, match="no model.safetensors.index.json"):
        SafetensorsStore(tmp_path)
    with pytest.raises(WeightError, match="not a directory"):
        SafetensorsStore(tmp_path / "nope")


def test_unknown_name(tmp_path):
    write(tmp_path)
    with pytest.raises(WeightError, match=r"no tensor 'model\.layers\.7\.mlp\.experts\.gate'"):
        SafetensorsStore(tmp_path).get("model.layers.7.mlp.experts.gate")
