"""Deterministic synthetic weights: names, shapes, reproducibility, scales, conditioning."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ktcore.errors import WeightError
from ktcore.formats.store import WeightStore
from ktcore.models.presets import ARCHITECTURES, PUBLISHED_PARAMS, make_config, preset_architectures
from ktcore.models.skeleton import build_skeleton
from ktcore.models.synth import (BLOCK_ELEMENTS, CHUNK_ELEMENTS, SyntheticWeights, fill_block_,
                                 tensor_key)

ROOT = Path(__file__).parents[2]


def hf_state_names(config) -> dict[str, tuple[int, ...]]:
    """Canonical names and shapes derived independently from the transformers state dict."""
    model = build_skeleton(config)
    out = {}
    for name, tensor in model.state_dict().items():
        if "rotary_emb" in name:
            continue
        if name.endswith(".experts.gate_up_proj"):
            e, two_i, h = tensor.shape
            out[name[: -len("gate_up_proj")] + "gate"] = (e, two_i // 2, h)
            out[name[: -len("gate_up_proj")] + "up"] = (e, two_i // 2, h)
        elif name.endswith(".experts.down_proj"):
            out[name[: -len("down_proj")] + "down"] = tuple(tensor.shape)
        else:
            out[name] = tuple(tensor.shape)
    return out


def hf_model(config, weights: SyntheticWeights):
    """The transformers model of ``config`` holding ``weights`` (fp32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    state = {}
    for name in weights.names():
        if name.endswith(".experts.gate"):
            continue
        if name.endswith(".experts.up"):
            base = name[: -len("up")]
            state[base + "gate_up_proj"] = torch.cat([weights.tensor(base + "gate"), weights.tensor(name)], 1)
        elif name.endswith(".experts.down"):
            state[name[: -len("down")] + "down_proj"] = weights.tensor(name)
        else:
            state[name] = weights.tensor(name)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary_emb" in k for k in missing)
    return model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_names_and_shapes_match_the_transformers_model(arch):
    config = make_config(arch)
    weights = SyntheticWeights(config)
    assert isinstance(weights, WeightStore)
    expected = hf_state_names(config)
    assert {n: weights.shape(n) for n in weights.names()} == expected
    for name in weights.names():
        assert weights.get(name).shape == expected[name]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tensors_are_reproducible_alone_and_in_any_order(arch):
    config = make_config(arch)
    a = SyntheticWeights(config, seed=3)
    forward = dict(a.items())
    b = SyntheticWeights(config, seed=3)
    for name in reversed(b.names()):
        assert torch.equal(b.tensor(name), forward[name]), name
    other = SyntheticWeights(config, seed=4)
    name = next(n for n in a.names() if n.endswith("q_proj.weight") or n.endswith("q_a_proj.weight"))
    assert not torch.equal(other.tensor(name), forward[name])
    # distinct tensors of one shape are not copies of each other
    assert not torch.equal(forward["model.layers.0.input_layernorm.weight"],
                           forward["model.layers.1.input_layernorm.weight"])


def test_experts_can_be_generated_one_at_a_time():
    weights = SyntheticWeights(make_config("deepseek_v3"), dtype=torch.float16)
    name = "model.layers.2.mlp.experts.down"
    stacked = weights.tensor(name)  # [E, H, I]
    assert stacked.shape == (16, 64, 32) and stacked.dtype == torch.float16
    for e in (0, 7, 15):
        assert torch.equal(weights.expert(name, e), stacked[e])
    assert not torch.equal(stacked[0], stacked[1])
    with pytest.raises(WeightError, match="no expert 16"):
        weights.expert(name, 16)
    with pytest.raises(WeightError, match="not a routed-experts tensor"):
        weights.expert("model.norm.weight", 0)


def test_unknown_name_is_a_weight_error():
    weights = SyntheticWeights(make_config("mixtral"))
    with pytest.raises(WeightError, match="model.layers.9.mlp.gate.weight"):
        weights.get("model.layers.9.mlp.gate.weight")


def test_golden_values():
    """Fixed bits: a change of hash, keys or arithmetic shows here on any machine."""
    block = fill_block_(torch.empty(6), tensor_key(0, "model.norm.weight", None), 0, 1.0)
    assert block.tolist() == [1.1611328125, 0.8583984375, 1.1962890625, -0.2705078125,
                              -0.2041015625, -1.1826171875]
    weights = SyntheticWeights(make_config("qwen3_moe"), dtype=torch.float32)
    down = weights.tensor("model.layers.1.mlp.experts.down")
    assert hashlib.sha256(down.numpy().tobytes()).hexdigest() == (
        "d7528f208d1cf6c58be32dc505e6a471ad848271cb60b6f7013cdd11e5a86a3b")


def test_blocks_and_offsets_are_the_counter():
    """Element i is element i % BLOCK of block i // BLOCK, whatever chunk computes it."""
    config = make_config("mixtral", vocab_size=8192, hidden_size=384, intermediate_size=64)
    weights = SyntheticWeights(config, dtype=torch.float32)
    name = "model.embed_tokens.weight"  # 3 M elements: blocks 0, 1, 2
    flat = weights.tensor(name).view(-1)
    info = weights.info(name)
    key = tensor_key(0, name, None)
    for block, start, n in ((0, 0, 5), (1, 123, 1000), (2, BLOCK_ELEMENTS - 7, 7)):
        part = fill_block_(torch.empty(n), key, block, info.std, info.mean, start=start)
        first = block * BLOCK_ELEMENTS + start
        assert torch.equal(part, flat[first:first + n])


def test_device_path_gives_the_same_bits():
    """The batched path a CUDA device runs (several blocks a step, keys as tensors), run on the CPU."""
    config = make_config("mixtral", vocab_size=8192, hidden_size=384, intermediate_size=64)
    weights = SyntheticWeights(config)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.experts.down"):
        info = weights.info(name)
        expected = weights.tensor(name)
        got = torch.empty_like(expected)
        parts = [(None, got)] if info.experts is None else [(e, got[e]) for e in range(info.experts)]
        weights._generate_on_device(info, [(tensor_key(0, name, e), out.view(-1)) for e, out in parts],
                                    torch.device("cpu"))
        assert torch.equal(got, expected), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_gives_the_same_bits():
    config = make_config("deepseek_v3", hidden_size=256, vocab_size=4096)
    cpu = SyntheticWeights(config, seed=2)
    gpu = SyntheticWeights(config, seed=2, device="cuda")
    for name in cpu.names():
        got = gpu.tensor(name)
        assert got.device.type == "cpu" and torch.equal(got, cpu.tensor(name)), name


def test_statistics_of_the_hash():
    """Moments of the Irwin-Hall values, and no correlation between neighbours, rows or experts."""
    config = make_config("qwen3_moe", "qwen3-30b-a3b", layers=1)
    weights = SyntheticWeights(config, dtype=torch.float32)
    name = "model.layers.0.mlp.experts.gate"
    std = weights.info(name).std
    experts = torch.stack([weights.expert(name, e) for e in (0, 1, 77)]) / std  # [3, 768, 2048], unit
    z = experts.view(3, -1).double()
    n = z.shape[1]
    assert z.mean(1).abs().max().item() < 5 / math.sqrt(n)
    assert z.std(1).sub(1).abs().max().item() < 0.005
    assert z.abs().max().item() <= 1534.5 / 512 + 1e-6  # bounded at +-3 sigma
    assert z.pow(4).mean().item() == pytest.approx(3 - 1.2 / 3, abs=0.01)  # Irwin-Hall(3) kurtosis 2.6

    def corr(a, b):
        return ((a - a.mean()) * (b - b.mean())).mean().item() / (a.std() * b.std()).item()

    limit = 5 / math.sqrt(n)
    for e in range(3):
        flat = z[e]
        for lag in (1, 2, 3, 4, 1024, 2048, BLOCK_ELEMENTS):  # neighbours, rows, next block
            assert abs(corr(flat[:-lag], flat[lag:])) < limit * 2, (e, lag)
        assert abs(corr(flat[:-2] * flat[1:-1], flat[2:])) < limit * 2  # third order
    assert abs(corr(z[0], z[1])) < limit and abs(corr(z[0], z[2])) < limit  # expert vs expert
    low = (experts * 512 + 1022.5).round().long() % 2  # no parity bias in the low bits
    assert low.double().mean().item() == pytest.approx(0.5, abs=0.002)
    # histogram against Irwin-Hall(3)'s density (piecewise quadratic) on 12 bins of half a sigma
    hist = torch.histc(z[0].float(), bins=12, min=-3, max=3) / n
    u = torch.linspace(0, 3, 13, dtype=torch.float64)  # bin edges in Irwin-Hall units (3 sigma = 1.5)

    def cdf(x):  # Irwin-Hall(3) CDF
        return torch.where(x < 1, x**3 / 6, torch.where(x < 2, (-2 * x**3 + 9 * x**2 - 9 * x + 3) / 6,
                                                       1 - (3 - x) ** 3 / 6))
    expected = cdf(u[1:]) - cdf(u[:-1])
    assert (hist.double() - expected).abs().max().item() < 0.002


def test_same_bits_on_the_default_isa_path():
    """torch.randn differs between AVX2/AVX-512 and the default kernels; our values must not."""
    code = ("import hashlib, torch; from ktcore.models.presets import make_config; "
            "from ktcore.models.synth import SyntheticWeights; "
            "w = SyntheticWeights(make_config('deepseek_v2'), seed=5, dtype=torch.float32); "
            "print(hashlib.sha256(b''.join(t.numpy().tobytes() for _, t in w.items())).hexdigest())")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = SyntheticWeights(make_config("deepseek_v2"), seed=5, dtype=torch.float32)
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for _, t in here.items())).hexdigest()
    assert out.stdout.strip() == digest


def test_thread_count_does_not_change_values():
    config = make_config("mixtral", vocab_size=8192, hidden_size=256, intermediate_size=64)
    name = "model.embed_tokens.weight"  # 8192 x 256 = 16 chunks: generated in parallel
    assert math.prod(SyntheticWeights(config).shape(name)) >= 16 * CHUNK_ELEMENTS
    one = SyntheticWeights(config, threads=1).tensor(name)
    four = SyntheticWeights(config, threads=4).tensor(name)
    assert torch.equal(one, four)
    before = torch.get_num_threads()
    SyntheticWeights(config, threads=3).tensor(name)
    assert torch.get_num_threads() == before  # torch's intra-op threads are restored


def test_scales():
    config = make_config("deepseek_v3", hidden_size=256, vocab_size=4096)
    w = SyntheticWeights(config, dtype=torch.float32)
    layers = config.num_hidden_layers

    def std(name):
        return w.tensor(name).std().item()

    assert std("model.embed_tokens.weight") == pytest.approx(1.0, rel=0.02)
    assert std("model.layers.0.self_attn.q_a_proj.weight") == pytest.approx(1 / math.sqrt(256), rel=0.05)
    assert std("model.layers.0.mlp.down_proj.weight") == pytest.approx(
        1 / math.sqrt(config.intermediate_size) / math.sqrt(2 * layers), rel=0.05)
    assert std("model.layers.1.mlp.experts.gate") == pytest.approx(1 / math.sqrt(256), rel=0.05)
    assert std("lm_head.weight") == pytest.approx(2.0 / math.sqrt(256), rel=0.05)
    norm = w.tensor("model.layers.0.input_layernorm.weight")
    assert norm.mean().item() == pytest.approx(1.0, abs=0.02) and 0.01 < norm.std().item() < 0.1
    assert (norm - 1).abs().max().item() <= 3 * 0.05 + 1e-6  # Irwin-Hall(3): bounded at 3 sigma
    bias = w.tensor("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.abs().max().item() < 0.2
    # transformers keeps this buffer in fp32; so do we, whatever the model dtype
    assert SyntheticWeights(config).get("model.layers.1.mlp.gate.e_score_correction_bias").tensor.dtype == torch.float32
    assert SyntheticWeights(config).get("model.layers.1.mlp.gate.weight").tensor.dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_random_model_is_well_conditioned(arch):
    """Logits spread over a few units, no near-ties deciding greedy decoding, varied output."""
    config = make_config(arch)
    model = hf_model(config, SyntheticWeights(config, dtype=torch.float32))
    ids = torch.arange(3, 3 + 5 * 24, 5).reshape(1, 24) % config.vocab_size
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        model.generation_config.eos_token_id = None  # a random model may well pick EOS: not the point
        generated = model.generate(ids[:, :4], max_new_tokens=32, do_sample=False, pad_token_id=0)[0, 4:]
    logits = out.logits[0]
    assert 1.0 < logits.std().item() < 4.0
    top2 = logits.topk(2, dim=-1).values
    gaps = top2[:, 0] - top2[:, 1]
    assert gaps.median().item() > 0.1 and gaps.min().item() > 1e-3
    for hidden in out.hidden_states:
        rms = hidden.pow(2).mean().sqrt().item()
        assert 0.5 < rms < 3.0
    assert len(set(generated.tolist())) >= 8  # not stuck on one token


@pytest.mark.parametrize("preset", sorted(PUBLISHED_PARAMS))
def test_full_size_presets_on_meta(preset):
    (arch,) = preset_architectures(preset)
    weights = SyntheticWeights(make_config(arch, preset))  # lists shapes only: nothing generated
    assert weights.num_parameters() == pytest.approx(PUBLISHED_PARAMS[preset], rel=0.01)
    assert weights.nbytes() == 2 * weights.num_parameters() + 2 * sum(  # bf16, fp32 router bias
        math.prod(weights.shape(n)) for n in weights.names() if n.endswith("e_score_correction_bias"))
    layers = {int(n.split(".")[2]) for n in weights.names() if n.startswith("model.layers.")}
    assert layers == set(range(make_config(arch, preset).num_hidden_layers))  # no MTP layer
    short = SyntheticWeights(make_config(arch, preset, layers=2))
    assert 0 < short.num_parameters() < weights.num_parameters() / 10


def test_full_size_shapes():
    v3 = SyntheticWeights(make_config("deepseek_v3", "deepseek-v3"))
    assert v3.shape("model.layers.3.mlp.experts.gate") == (256, 2048, 7168)
    assert v3.shape("model.layers.3.mlp.experts.down") == (256, 7168, 2048)
    assert v3.shape("model.layers.2.mlp.gate_proj.weight") == (18432, 7168)
    assert v3.shape("model.layers.0.self_attn.q_b_proj.weight") == (128 * 192, 1536)
    assert v3.shape("model.layers.0.self_attn.kv_a_proj_with_mqa.weight") == (576, 7168)
    assert v3.shape("model.embed_tokens.weight") == (129280, 7168)
    assert "model.layers.2.mlp.experts.gate" not in v3.names()  # first_k_dense_replace = 3
    qwen = SyntheticWeights(make_config("qwen3_moe", "qwen3-30b-a3b"))
    assert qwen.shape("model.layers.47.self_attn.q_proj.weight") == (4096, 2048)
    assert qwen.shape("model.layers.47.self_attn.k_proj.weight") == (512, 2048)
    assert qwen.shape("model.layers.0.mlp.experts.up") == (128, 768, 2048)
    lite = SyntheticWeights(make_config("deepseek_v2", "deepseek-v2-lite"))
    assert lite.shape("model.layers.0.self_attn.q_proj.weight") == (16 * 192, 2048)
    assert lite.shape("model.layers.1.mlp.shared_experts.up_proj.weight") == (2 * 1408, 2048)
    assert lite.shape("model.layers.26.mlp.experts.gate") == (64, 1408, 2048)
