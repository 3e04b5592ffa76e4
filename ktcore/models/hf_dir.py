"""Writes an HF model directory from ``SyntheticWeights``.

The directory is what ``transformers.AutoModelForCausalLM.from_pretrained`` and other tools
expect of a real checkpoint:

- ``config.json`` (with ``architectures``, ``dtype`` and the tokenizer's bos/eos/pad ids) and
  ``generation_config.json``;
- ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``;
- the weights, under the names real checkpoints of the family use (``hf_disk_name``): routed
  experts one tensor per expert (``mlp.experts.{e}.gate_proj.weight`` for DeepSeek and Qwen,
  ``block_sparse_moe.experts.{e}.w1.weight`` for Mixtral, whose router is
  ``block_sparse_moe.gate.weight``), which transformers' conversion mapping fuses on load.
  A single ``model.safetensors`` when the weights fit in ``shard_bytes``, otherwise
  ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``.

Weights are streamed: the shard plan is computed from shapes alone, then each shard's tensors
are produced, written and freed, so peak memory is one shard (at most ``shard_bytes`` plus one
tensor), never the model. Output is byte-for-byte deterministic for the same inputs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ktcore.formats.safetensors_store import INDEX_FILE, SINGLE_FILE, hf_disk_name

log = logging.getLogger(__name__)

#: Default maximum shard size (bytes).
DEFAULT_SHARD_BYTES = 2 * 1024**3
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass(frozen=True)
class DiskTensor:
    """One tensor of the checkpoint: its on-disk name and where its values come from."""

    disk_name: str
    canonical: str  # canonical name in the WeightStore
    expert: int | None  # routed expert index for per-expert tensors of a stacked name
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def disk_tensors(weights) -> list[DiskTensor]:
    """The checkpoint's tensors in writing order (an expert's gate/up/down together)."""
    model_type = weights.config.model_type
    out = []
    for name in weights.names():
        info = weights.info(name)
        dtype = weights.dtype_of(name)
        if info.experts is None:
            out.append(DiskTensor(hf_disk_name(model_type, name), name, None, info.shape, dtype))
            continue
        head, _, part = name.rpartition(".")
        if part != "gate":  # emitted with the gate, expert by expert
            continue
        for e in range(info.experts):
            for part_name in (f"{head}.gate", f"{head}.up", f"{head}.down"):
                part_info = weights.info(part_name)
                out.append(DiskTensor(hf_disk_name(model_type, part_name, e), part_name, e,
                                      part_info.shape[1:], weights.dtype_of(part_name)))
    return out


def plan_shards(tensors: list[DiskTensor], shard_bytes: int) -> list[list[DiskTensor]]:
    """Greedy, order-preserving split into shards of at most ``shard_bytes`` (a larger tensor
    gets a shard of its own)."""
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
    shards: list[list[DiskTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def write_model_config(outdir: str | Path, config, dtype: torch.dtype, tokenizer) -> list[Path]:
    """``config.json`` and ``generation_config.json`` (``config`` itself is not modified)."""
    from transformers import GenerationConfig

    from ktcore.models.presets import causal_lm_class

    outdir = Path(outdir)
    config = copy.deepcopy(config)
    config.architectures = [causal_lm_class(config.model_type)]
    config.dtype = dtype_name(dtype)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(outdir)
    generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, do_sample=False)
    generation.save_pretrained(outdir)
    return [outdir / "config.json", outdir / "generation_config.json"]


def write_weights(outdir: str | Path, weights, *, shard_bytes: int = DEFAULT_SHARD_BYTES,
                  progress: bool | None = None) -> list[Path]:
    """Writes the safetensors file(s) of ``weights``; returns the paths written (index last)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    _remove_old_weights(outdir)
    tensors = disk_tensors(weights)
    shards = plan_shards(tensors, shard_bytes)
    count = len(shards)
    names = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    total = sum(t.nbytes for t in tensors)
    paths, weight_map = [], {}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="safetensors", disable=None if progress is None else not progress)
    with bar:
        for file_name, shard in zip(names, shards):
            data = {}
            for tensor in shard:
                data[tensor.disk_name] = _values(weights, tensor)
                weight_map[tensor.disk_name] = file_name
                bar.update(tensor.nbytes)
            path = outdir / file_name
            tmp = path.with_name(path.name + ".tmp")
            save_file(data, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, path)
            paths.append(path)
            del data
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        path = outdir / INDEX_FILE
        path.write_text(json.dumps(index, indent=2) + "\n")
        paths.append(path)
    log.info("wrote %d safetensors file(s), %.1f MB, to %s", count, total / 1e6, outdir)
    return paths


def write_hf_dir(outdir: str | Path, weights, tokenizer, *, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 safetensors: bool = True, progress: bool | None = None) -> list[Path]:
    """Writes the whole HF directory (config, tokenizer, weights); returns the files written.

    ``safetensors=False`` writes config and tokenizer only (and removes weight files of an
    earlier write, which would not match).
    """
    from ktcore.models.tokenizer import save_tokenizer

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    vocab = int(weights.config.vocab_size)
    if len(tokenizer) > vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size {vocab}")
    files = write_model_config(outdir, weights.config, weights.dtype, tokenizer)
    files += save_tokenizer(tokenizer, outdir)
    if safetensors:
        files += write_weights(outdir, weights, shard_bytes=shard_bytes, progress=progress)
    else:
        _remove_old_weights(outdir)
    return files


def dtype_name(dtype: torch.dtype) -> str:
    """``bfloat16`` / ``float16`` / ``float32``, as config.json spells it."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"unsupported checkpoint dtype {dtype}; use one of {list(_DTYPE_NAMES.values())}") from None


def _values(weights, tensor: DiskTensor) -> torch.Tensor:
    if tensor.expert is None:
        return weights.tensor(tensor.canonical)
    return weights.expert(tensor.canonical, tensor.expert)  # one expert, without the others


def _remove_old_weights(outdir: Path) -> None:
    """Old shards of an earlier write would be mistaken for part of this checkpoint."""
    for path in [outdir / INDEX_FILE, outdir / SINGLE_FILE, *outdir.glob("model-*-of-*.safetensors")]:
        if path.is_file():
            path.unlink()
