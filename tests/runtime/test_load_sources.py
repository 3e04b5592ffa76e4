"""Every way to point ktcore at a model, for each architecture's tiny synthetic model:
an HF directory (safetensors), an HF directory plus a GGUF, and a GGUF alone; F32, BF16 and
Q8_0 GGUFs. Each is compared with unmodified transformers on the same (for Q8_0: the
dequantised) weights: logits within 1e-4 of the largest logit, 32 greedy tokens identical."""

from __future__ import annotations

import pytest
import torch

import ktcore
from ktcore.demo import hf_greedy
from ktcore.models.make_model import make_model
from ktcore.models.presets import ARCHITECTURES

LOGIT_TOL = 1e-4  # of the largest |logit|, fp32 compute
GREEDY_TOKENS = 32


@pytest.fixture(scope="module", params=ARCHITECTURES)
def made(request, tmp_path_factory):
    arch = request.param
    out = tmp_path_factory.mktemp(arch)
    made = make_model(arch, out, preset="tiny", dtype="fp32", gguf_types=("F32", "BF16", "Q8_0"), seed=3)
    return arch, out, {qtype: parts[0] for qtype, parts in made.gguf_files}


def _transformers_on(model_dir, store=None):
    """transformers' model of ``model_dir`` in fp32, optionally with ``store``'s weights
    (dequantised; a BF16 GGUF keeps norms and routers in F32, as llama.cpp's files do)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    state = hf.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if store is not None:
                if name.endswith("experts.gate_up_proj"):
                    base = name[: -len("gate_up_proj")]
                    value = torch.cat([store.get(base + "gate").to_dense(torch.float32),
                                       store.get(base + "up").to_dense(torch.float32)], dim=1)
                elif name.endswith("experts.down_proj"):
                    value = store.get(name[: -len("down_proj")] + "down").to_dense(torch.float32)
                else:
                    value = store.get(name).to_dense(torch.float32)
                tensor.copy_(value)
    return hf


def _assert_matches(ours, hf, vocab):
    torch.manual_seed(11)
    prompt = torch.randint(3, vocab, (13,))
    with torch.inference_mode():
        want = hf(prompt[None], use_cache=False).logits[0]
        expected = hf_greedy(hf, prompt, GREEDY_TOKENS)
    got = ours.logits(prompt)
    assert (got - want).abs().max() <= LOGIT_TOL * want.abs().max()
    assert ours.generate(prompt, GREEDY_TOKENS, stop_ids=[]) == expected


def _load(model=None, gguf=None):
    return ktcore.load(model, gguf=gguf, dtype="fp32", max_seq_len=64)


def test_hf_directory(made):
    arch, out, _ = made
    ours = _load(out)
    assert ours.tokenizer is not None and ours.plan.rules.file.endswith(f"{arch}-cpu.yaml")
    _assert_matches(ours, _transformers_on(out), ours.config.vocab_size)


@pytest.mark.parametrize("with_model_dir", [True, False], ids=["gguf+model", "gguf-alone"])
def test_f32_gguf(made, with_model_dir):
    arch, out, ggufs = made
    ours = _load(out if with_model_dir else None, ggufs["F32"])
    assert ours.config.model_type == arch
    if not with_model_dir:  # tokenizer rebuilt from the GGUF metadata encodes alike
        from transformers import AutoTokenizer

        text = "def main(argv):\n    return 0  # done"
        assert ours.tokenizer.encode(text) == AutoTokenizer.from_pretrained(str(out)).encode(text)
    _assert_matches(ours, _transformers_on(out), ours.config.vocab_size)


@pytest.mark.parametrize("qtype", ["BF16", "Q8_0"])
def test_quantised_gguf_matches_transformers_on_its_dequantised_weights(made, qtype):
    from ktcore.formats.gguf_read import GGUFStore

    arch, out, ggufs = made
    ours = _load(out, ggufs[qtype])
    with GGUFStore(ggufs[qtype]) as store:
        reference = _transformers_on(out, store)
        changed = store.get("model.layers.0.self_attn.o_proj.weight").to_dense(torch.float32)
    original = _transformers_on(out).state_dict()["model.layers.0.self_attn.o_proj.weight"]
    assert not torch.equal(changed, original)  # the file really is quantised
    _assert_matches(ours, reference, ours.config.vocab_size)
