"""Peak host memory while loading stays under 1.3x the weights the model ends up holding
(issue 3), measured in a fresh process on a ~200 MB synthetic model of 8 layers. (Loading
holds one layer's temporaries at a time: real models have 27-61 layers, so their ratio is
lower still.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PEAK_LIMIT = 1.3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from ktcore.formats.gguf_write import write_gguf
    from ktcore.models.hf_dir import write_hf_dir
    from ktcore.models.presets import make_config
    from ktcore.models.synth import SyntheticWeights
    from ktcore.models.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("mem-model")
    config = make_config("qwen3_moe", "tiny", hidden_size=512, moe_intermediate_size=256, num_experts=16,
                         num_hidden_layers=8,
                         head_dim=64, num_attention_heads=8, num_key_value_heads=4)
    weights = SyntheticWeights(config, seed=0, dtype=torch.float32)
    tokenizer = build_tokenizer(config)
    write_hf_dir(out, weights, tokenizer)
    write_gguf(out / "model-F32.gguf", config, tokenizer, weights.items(), "F32")
    return out


def _measure(*args: Path) -> dict:
    script = Path(__file__).with_name("measure_load_memory.py")
    done = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure RSS")
@pytest.mark.parametrize("source", ["safetensors", "gguf-F32"])
def test_peak_load_memory_is_under_1_3x_the_weights(model_dir, source):
    args = (model_dir,) if source == "safetensors" else (model_dir, model_dir / "model-F32.gguf")
    figures = _measure(*args)
    assert figures["weights"] > 100e6  # the model is big enough for the ratio to mean something
    print(f"{source}: peak {figures['peak'] / 1e6:.0f} MB for {figures['weights'] / 1e6:.0f} MB of weights "
          f"({figures['peak_ratio']:.2f}x)")
    assert figures["peak_ratio"] < PEAK_LIMIT
