"""HF model directories written from synthetic weights load in transformers unchanged."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from ktcore.models.hf_dir import DEFAULT_SHARD_BYTES, disk_tensors, plan_shards, write_hf_dir
from ktcore.models.presets import ARCHITECTURES, make_config
from ktcore.models.synth import SyntheticWeights
from ktcore.models.tokenizer import build_tokenizer

SMALL_SHARD = 150_000  # bytes: several shards for every tiny preset


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KTCORE_CACHE", str(tmp_path_factory.getbasetemp() / "ktcore-cache"))


def disk_names(outdir) -> dict[str, str]:
    """On-disk tensor name -> safetensors dtype, over every shard."""
    out = {}
    for path in sorted(outdir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_slice(name).get_dtype()
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_transformers_loads_the_directory_exactly(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    config = make_config(arch)
    weights = SyntheticWeights(config, seed=1)
    write_hf_dir(tmp_path, weights, build_tokenizer(config), shard_bytes=SMALL_SHARD, progress=False)

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    assert type(model).__name__ == json.loads((tmp_path / "config.json").read_text())["architectures"][0]
    state = model.state_dict()
    for name in weights.names():
        ours = weights.tensor(name)
        if name.endswith((".experts.gate", ".experts.up")):
            fused = state[name.rpartition(".")[0] + ".gate_up_proj"]  # [E, 2I, H], gate first
            rows = ours.shape[1]
            theirs = fused[:, :rows] if name.endswith("gate") else fused[:, rows:]
        elif name.endswith(".experts.down"):
            theirs = state[name.rpartition(".")[0] + ".down_proj"]
        else:
            theirs = state[name]
        assert theirs.dtype == ours.dtype, name
        assert torch.equal(theirs, ours), name


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_on_disk_names_are_those_of_real_checkpoints(arch, tmp_path):
    config = make_config(arch)
    write_hf_dir(tmp_path, SyntheticWeights(config), build_tokenizer(config), progress=False)
    names = disk_names(tmp_path)
    assert not any("gate_up_proj" in n or n.endswith("experts.down_proj") for n in names)
    experts = getattr(config, "n_routed_experts", None) or getattr(config, "num_experts", None) or config.num_local_experts
    layer = config.num_hidden_layers - 1
    if arch == "mixtral":
        expected = [f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
                    for e in range(experts) for w in ("w1", "w2", "w3")]
        expected.append(f"model.layers.{layer}.block_sparse_moe.gate.weight")
        assert not any(".mlp." in n for n in names)
    else:
        expected = [f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight"
                    for e in range(experts) for p in ("gate", "up", "down")]
    assert set(expected) <= set(names)
    assert {d for n, d in names.items() if "e_score_correction_bias" not in n} == {"BF16"}
    if arch == "deepseek_v3":
        assert names[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"] == "F32"


def test_config_generation_config_and_tokenizer_files(tmp_path):
    config = make_config("qwen2_moe", num_hidden_layers=2)
    tokenizer = build_tokenizer(config)
    files = write_hf_dir(tmp_path, SyntheticWeights(config, dtype=torch.float16), tokenizer, progress=False)
    assert {p.name for p in files} == {
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "model.safetensors"}
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["Qwen2MoeForCausalLM"]
    assert saved["dtype"] == "float16" and saved["num_hidden_layers"] == 2
    assert (saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (0, 1, 2)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 1 and generation["do_sample"] is False
    assert set(disk_names(tmp_path).values()) == {"F16"}
    assert config.architectures is None  # the caller's config is not modified


def test_sharding_and_index(tmp_path):
    config = make_config("deepseek_v2")
    weights = SyntheticWeights(config)
    write_hf_dir(tmp_path, weights, build_tokenizer(config), shard_bytes=SMALL_SHARD, progress=False)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (tmp_path / "model.safetensors").exists()
    count = len(shards)
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    tensors = disk_tensors(weights)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors)
    assert set(index["weight_map"]) == {t.disk_name for t in tensors}
    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
        assert keys == {n for n, file in index["weight_map"].items() if file == path.name}
        header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
        assert path.stat().st_size - header <= SMALL_SHARD or len(keys) == 1
    # rewriting as one file removes the old shards and index
    write_hf_dir(tmp_path, weights, build_tokenizer(config), shard_bytes=DEFAULT_SHARD_BYTES, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["model.safetensors"]


def test_plan_shards_is_greedy_and_bounded():
    weights = SyntheticWeights(make_config("mixtral"))
    tensors = disk_tensors(weights)
    for limit in (1, 10_000, 100_000, 10**9):
        shards = plan_shards(tensors, limit)
        assert [t for shard in shards for t in shard] == tensors  # order kept, nothing lost
        for shard in shards:
            assert sum(t.nbytes for t in shard) <= limit or len(shard) == 1
    assert len(plan_shards(tensors, 10**9)) == 1
    assert len(plan_shards(tensors, 1)) == len(tensors)
    with pytest.raises(ValueError):
        plan_shards(tensors, 0)


def test_expert_tensors_are_written_expert_by_expert():
    weights = SyntheticWeights(make_config("qwen3_moe"))
    names = [t.disk_name for t in disk_tensors(weights)]
    first = [n for n in names if ".layers.0.mlp.experts." in n]
    assert first[:6] == [f"model.layers.0.mlp.experts.{e}.{p}_proj.weight" for e in (0, 1) for p in ("gate", "up", "down")]
    assert all(re.match(r"model\.layers\.0\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$", n) for n in first)


def test_tied_embeddings_are_stored_once(tmp_path):
    from transformers import AutoModelForCausalLM

    config = make_config("qwen3_moe", tie_word_embeddings=True)
    weights = SyntheticWeights(config)
    assert "lm_head.weight" not in weights.names()
    write_hf_dir(tmp_path, weights, build_tokenizer(config), progress=False)
    assert "lm_head.weight" not in disk_names(tmp_path)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(model.lm_head.weight, weights.tensor("model.embed_tokens.weight"))
