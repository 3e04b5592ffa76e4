"""Synthetic models on disk: ``kt make-model``'s HF directory and GGUF files.

A ``MakeModelSpec`` (architecture, preset, dtype, seed, layer override, GGUF types) fixes the
model completely: config from ``presets``, weights from ``SyntheticWeights``, tokenizer from
``tokenizer``. ``make_model`` writes

- ``OUTDIR/`` as an HF model directory (``hf_dir``): config, tokenizer, safetensors shards
  (``safetensors=False`` writes config and tokenizer only: the ``--model`` directory that
  goes with a GGUF, as KTransformers takes it);
- ``OUTDIR/<name>-<TYPE>.gguf`` per requested GGUF type, through ``formats.gguf_write``, from
  the same weights at the same dtype (a Q8_0 file holds the quantised bf16 values).

The same spec gives byte-identical files on every run. For benchmarks that should not write
tens of GB, ``MakeModelSpec.weights()`` is the same model as an in-memory ``WeightStore``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ktcore.errors import KtError
from ktcore.models.hf_dir import DEFAULT_SHARD_BYTES
from ktcore.models.presets import ARCHITECTURES, make_config, preset_architectures, preset_names
from ktcore.ops.weights import GGUF_TYPES

log = logging.getLogger(__name__)

#: ``--dtype`` names.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class MakeModelSpec:
    """Everything a synthetic model depends on."""

    arch: str
    preset: str = "tiny"
    dtype: str = "bf16"
    gguf_types: tuple[str, ...] = ()
    seed: int = 0
    layers: int | None = None  # overrides num_hidden_layers

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise KtError(f"unknown architecture {self.arch!r}; supported: {', '.join(ARCHITECTURES)}")
        if self.preset not in preset_names():
            raise KtError(f"unknown preset {self.preset!r}; presets: {', '.join(preset_names())}")
        archs = preset_architectures(self.preset)
        if self.arch not in archs:
            raise KtError(f"preset {self.preset!r} is a {'/'.join(archs)} model, not {self.arch}")
        if self.dtype not in DTYPES:
            raise KtError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        unknown = [t for t in self.gguf_types if t not in GGUF_TYPES]
        if unknown:
            raise KtError(f"unsupported GGUF type(s) {', '.join(unknown)}; supported: {', '.join(GGUF_TYPES)}")
        if len(set(self.gguf_types)) != len(self.gguf_types):
            raise KtError(f"GGUF types listed twice: {', '.join(self.gguf_types)}")
        if self.seed < 0:
            raise KtError(f"seed must be non-negative, got {self.seed}")
        if self.layers is not None and self.layers < 1:
            raise KtError(f"--layers must be at least 1, got {self.layers}")

    @property
    def name(self) -> str:
        """File-name stem: ``qwen3_moe-tiny``, ``deepseek-v3``, ``deepseek-v3-4L``."""
        stem = f"{self.arch}-tiny" if self.preset == "tiny" else self.preset
        return stem if self.layers is None else f"{stem}-{self.layers}L"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def config(self):
        return make_config(self.arch, self.preset, layers=self.layers)

    def weights(self, config=None):
        """The model's ``SyntheticWeights`` (nothing is generated until a tensor is asked for)."""
        from ktcore.models.synth import SyntheticWeights

        return SyntheticWeights(config if config is not None else self.config(), self.seed, self.torch_dtype)

    def tokenizer(self, config=None):
        from ktcore.models.tokenizer import build_tokenizer

        return build_tokenizer(config if config is not None else self.config())


@dataclass(frozen=True)
class MadeModel:
    """What ``make_model`` wrote."""

    outdir: Path
    hf_files: tuple[Path, ...]
    gguf_files: tuple[tuple[str, tuple[Path, ...]], ...]  # (type, parts), in the requested order
    parameters: int
    nbytes: int  # bytes of the weights at the model dtype


def make_model(arch: str | MakeModelSpec, outdir: str | Path, *, preset: str = "tiny", dtype: str = "bf16",
               gguf_types: tuple[str, ...] | list[str] = (), seed: int = 0, layers: int | None = None,
               safetensors: bool = True, shard_bytes: int = DEFAULT_SHARD_BYTES,
               gguf_split_bytes: int | None = None, progress: bool | None = None) -> MadeModel:
    """Writes a synthetic model into ``outdir`` (created; files of the same names replaced).

    The model is ``arch`` with ``preset``/``dtype``/``gguf_types``/``seed``/``layers``, or a
    ``MakeModelSpec`` given in place of ``arch`` (then those keywords must keep their defaults).
    """
    from ktcore.models.hf_dir import write_hf_dir

    if isinstance(arch, MakeModelSpec):
        if (preset, dtype, tuple(gguf_types), seed, layers) != ("tiny", "bf16", (), 0, None):
            raise TypeError("make_model: pass either a MakeModelSpec or the model keywords, not both")
        spec = arch
    else:
        spec = MakeModelSpec(arch, preset, dtype, tuple(gguf_types), seed, layers)
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise KtError(f"{outdir}: exists and is not a directory")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KtError(f"{outdir}: cannot create the directory: {exc}") from None
    config = spec.config()
    weights = spec.weights(config)
    tokenizer = spec.tokenizer(config)
    log.info("%s: %.3fB parameters, %.2f GB at %s", spec.name, weights.num_parameters() / 1e9,
             weights.nbytes() / 1e9, spec.dtype)
    hf_files = write_hf_dir(outdir, weights, tokenizer, shard_bytes=shard_bytes, safetensors=safetensors,
                            progress=progress)
    ggufs = []
    if spec.gguf_types:
        write_gguf = _gguf_writer()
        for qtype in spec.gguf_types:
            path = outdir / f"{spec.name}-{qtype}.gguf"
            parts = write_gguf(path, config, tokenizer, _progress(weights, f"GGUF {qtype}", progress), qtype,
                               split_max_bytes=gguf_split_bytes, name=spec.name)
            ggufs.append((qtype, tuple(Path(p) for p in parts)))
    return MadeModel(outdir, tuple(hf_files), tuple(ggufs), weights.num_parameters(), weights.nbytes())


def _gguf_writer():
    try:
        from ktcore.formats.gguf_write import write_gguf
    except ImportError as exc:
        raise KtError(f"GGUF writing is unavailable: {exc}") from None
    return write_gguf


def _progress(weights, desc: str, progress: bool | None):
    """``weights.items()`` with a progress bar over bytes."""
    from tqdm.auto import tqdm

    disable = None if progress is None else not progress
    with tqdm(total=weights.nbytes(), unit="B", unit_scale=True, desc=desc, disable=disable) as bar:
        for name, tensor in weights.items():
            yield name, tensor
            bar.update(tensor.numel() * tensor.element_size())
