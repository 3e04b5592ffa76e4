"""``SafetensorsStore``: the ``WeightStore`` of an HF model directory's safetensors shards.

Reads ``model.safetensors.index.json`` (sharded) or a single ``model.safetensors`` (or, with
neither, every ``*.safetensors`` file of the directory), memory-mapped through
``safetensors.safe_open``. Every header is read when the store opens, so a truncated or
corrupt shard, a missing tensor or a shape that disagrees with ``config.json`` is reported
before any weight is loaded, naming the file and the tensor.

On-disk names are mapped to the canonical names of ``ktcore.formats.store``. Routed experts
may be stored:

- per expert, as DeepSeek and Qwen checkpoints do:
  ``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight``;
- per expert with Mixtral's original names:
  ``model.layers.N.block_sparse_moe.experts.E.{w1,w3,w2}.weight`` (gate, up, down), its router
  as ``block_sparse_moe.gate.weight`` (what transformers' conversion mapping expects);
- fused and stacked, as transformers 5 models hold them:
  ``model.layers.N.mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (gate first) and ``down_proj``
  ``[E, H, I]``.

``get`` of a stacked expert name assembles ``[E, I, H]`` / ``[E, H, I]`` from whichever form the
file has. Layers at or past ``num_hidden_layers`` (DeepSeek-V3's multi-token-prediction layer
61) are not part of the model and are left out of ``names()``.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ktcore.errors import WeightError
from ktcore.formats.store import EXPERT_PARTS
from ktcore.ops.weights import DenseWeight

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

#: Per-expert projection names on disk: HF (DeepSeek, Qwen) and Mixtral's original ones.
HF_EXPERT_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
MIXTRAL_EXPERT_PROJ = {"gate": "w1", "up": "w3", "down": "w2"}
_PART_OF_PROJ = {**{v: k for k, v in HF_EXPERT_PROJ.items()}, **{v: k for k, v in MIXTRAL_EXPERT_PROJ.items()}}

_PER_EXPERT = re.compile(
    r"^(?P<prefix>.*\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(?P<e>\d+)\."
    r"(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_FUSED = re.compile(r"^(?P<prefix>.*\.layers\.\d+)\.mlp\.experts\.(?P<kind>gate_up_proj|down_proj)$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_SUPPORTED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def hf_disk_name(model_type: str, canonical: str, expert: int | None = None) -> str:
    """The on-disk name real checkpoints of ``model_type`` use for a canonical tensor.

    ``expert`` selects one routed expert of a stacked ``...mlp.experts.{gate,up,down}`` name.
    """
    mixtral = model_type == "mixtral"
    if expert is not None:
        head, _, part = canonical.rpartition(".")
        if part not in EXPERT_PARTS or not head.endswith(".mlp.experts"):
            raise ValueError(f"{canonical!r} is not a stacked routed-experts name")
        proj = (MIXTRAL_EXPERT_PROJ if mixtral else HF_EXPERT_PROJ)[part]
        if mixtral:
            head = head[: -len(".mlp.experts")] + ".block_sparse_moe.experts"
        return f"{head}.{expert}.{proj}.weight"
    if mixtral and canonical.endswith(".mlp.gate.weight"):
        return canonical[: -len(".mlp.gate.weight")] + ".block_sparse_moe.gate.weight"
    return canonical


@dataclass(frozen=True)
class _Source:
    """Where a canonical tensor lives on disk."""

    kind: str  # "plain" | "experts" (one tensor per expert) | "fused" (slice of a stacked tensor)
    disk: tuple[str, ...]  # disk names: one, or one per expert in expert order
    shape: tuple[int, ...]  # canonical shape
    half: int | None = None  # for "fused" gate_up_proj: 0 = gate rows, 1 = up rows


class SafetensorsStore:
    """``WeightStore`` over ``model_dir``'s safetensors; checked against ``config`` (default:
    the directory's ``config.json``; ``config=False`` skips the check)."""

    def __init__(self, model_dir: str | Path, config=None):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise WeightError(f"{self.dir}: not a directory")
        self._handles: dict[Path, object] = {}  # shard path -> safe_open handle (headers, shapes)
        self._header_cache: dict[Path, dict] = {}
        self._file_of = self._read_layout()  # disk name -> shard path
        shards = sorted(set(self._file_of.values()))
        for path in shards:
            self._open(path)  # every header is read now: bad shards fail before any load
        self.source = f"{self.dir}/ ({len(shards)} safetensors shard{'s' * (len(shards) != 1)})"
        self._check_index_entries()
        if config is None and (self.dir / "config.json").is_file():
            from ktcore.models.skeleton import load_config

            config = load_config(self.dir)
        self.config = None if config is False else config
        self._sources = self._map_names()
        if self.config is not None:
            self._check_against(self.config)

    # -- WeightStore ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._sources)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._source(name).shape

    def get(self, name: str) -> DenseWeight:
        src = self._source(name)
        if src.kind == "plain":
            return DenseWeight(self._read(src.disk[0]), name)
        if src.kind == "fused":
            rows = src.shape[1]
            (disk,) = src.disk
            sl = slice(0, rows) if src.half == 0 else slice(rows, 2 * rows) if src.half == 1 else slice(None)
            tensor = self._read(disk, lambda view: view[:, sl])  # [E, I, H] or [E, H, I]
            return DenseWeight(tensor, name)
        first = self._read(src.disk[0])
        out = torch.empty(src.shape, dtype=first.dtype)  # [E, I, H] or [E, H, I]
        out[0].copy_(first)
        for e, disk in enumerate(src.disk[1:], start=1):
            out[e].copy_(self._read(disk))
        return DenseWeight(out, name)

    def close(self) -> None:
        """Drops the memory maps (tensors already returned stay valid)."""
        self._handles.clear()

    def __enter__(self) -> "SafetensorsStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- layout ----------------------------------------------------------------------------------

    def _read_layout(self) -> dict[str, Path]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise WeightError(f"{index}: not a safetensors index ({exc})") from None
            return {name: self.dir / file for name, file in weight_map.items()}
        single = self.dir / SINGLE_FILE
        files = [single] if single.is_file() else sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise WeightError(f"{self.dir}: no {INDEX_FILE}, {SINGLE_FILE} or *.safetensors file")
        out = {}
        for path in files:
            for name in self._open(path).keys():
                out.setdefault(name, path)
        return out

    def _open(self, path: Path):
        from safetensors import safe_open

        if path in self._handles:
            return self._handles[path]
        if not path.is_file():
            raise WeightError(f"{path}: shard listed in {INDEX_FILE} does not exist")
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:  # SafetensorError: truncated, bad header, ...
            raise WeightError(f"{path}: not a valid safetensors file (truncated or corrupt?): {exc}") from None
        self._handles[path] = handle
        return handle

    def _check_index_entries(self) -> None:
        keys = {path: set(handle.keys()) for path, handle in self._handles.items()}
        for name, path in self._file_of.items():
            if name not in keys[path]:
                raise WeightError(f"{path}: tensor {name!r} is listed in {INDEX_FILE} but not in the file")

    def _disk_shape(self, disk: str) -> tuple[int, ...]:
        view = self._handles[self._file_of[disk]].get_slice(disk)
        dtype = view.get_dtype()
        if dtype not in _SUPPORTED_DTYPES:
            raise WeightError(f"{self._file_of[disk]}: tensor {disk!r} has dtype {dtype}; ktcore reads "
                              f"{', '.join(_SUPPORTED_DTYPES)} safetensors (quantised checkpoints such as "
                              "FP8 ones need converting first, or use a GGUF)")
        return tuple(view.get_shape())

    def _map_names(self) -> dict[str, _Source]:
        layers = int(self.config.num_hidden_layers) if self.config is not None else None
        sources: dict[str, _Source] = {}
        experts: dict[str, dict[int, str]] = {}  # canonical stacked name -> {e: disk name}
        for disk in self._file_of:
            match = _LAYER.search(disk)
            if layers is not None and match and int(match.group(1)) >= layers:
                log.debug("%s: skipping %s (layer past num_hidden_layers=%d)", self.source, disk, layers)
                continue
            shape = self._disk_shape(disk)
            if m := _PER_EXPERT.match(disk):
                name = f"{m['prefix']}.mlp.experts.{_PART_OF_PROJ[m['proj']]}"
                experts.setdefault(name, {})[int(m["e"])] = disk
            elif m := _FUSED.match(disk):
                if len(shape) != 3:
                    raise WeightError(f"{self._file_of[disk]}: tensor {disk!r} has shape {list(shape)}, "
                                      "expected stacked experts [E, rows, cols]")
                if m["kind"] == "down_proj":
                    sources[f"{m['prefix']}.mlp.experts.down"] = _Source("fused", (disk,), shape)
                else:
                    if shape[1] % 2:
                        raise WeightError(f"{self._file_of[disk]}: tensor {disk!r} has an odd gate_up "
                                          f"dimension {shape[1]}")
                    half = (shape[0], shape[1] // 2, shape[2])
                    sources[f"{m['prefix']}.mlp.experts.gate"] = _Source("fused", (disk,), half, 0)
                    sources[f"{m['prefix']}.mlp.experts.up"] = _Source("fused", (disk,), half, 1)
            else:
                name = re.sub(r"\.block_sparse_moe\.", ".mlp.", disk)
                sources[name] = _Source("plain", (disk,), shape)
        for name, by_expert in sorted(experts.items()):
            sources[name] = self._stack(name, by_expert)
        return sources

    def _stack(self, name: str, by_expert: dict[int, str]) -> _Source:
        count = max(by_expert) + 1
        if self.config is not None:
            count = max(count, int(_num_experts(self.config)))
        any_disk = next(iter(by_expert.values()))
        for e in range(count):
            if e not in by_expert:
                missing = re.sub(r"\.experts\.\d+\.", f".experts.{e}.", any_disk)
                raise WeightError(f"{self.source}: tensor {missing!r} (expert {e} of {name}) is missing")
        disks = tuple(by_expert[e] for e in range(count))
        shape = self._disk_shape(disks[0])
        for disk in disks[1:]:
            if self._disk_shape(disk) != shape:
                raise WeightError(f"{self._file_of[disk]}: tensor {disk!r} has shape "
                                  f"{list(self._disk_shape(disk))}, other experts {list(shape)}")
        return _Source("experts", disks, (count, *shape))

    def _check_against(self, config) -> None:
        from ktcore.models.synth import canonical_tensors

        expected = canonical_tensors(config)
        for name, info in expected.items():
            if name not in self._sources:
                disk = hf_disk_name(config.model_type, name, 0 if info.experts is not None else None)
                raise WeightError(f"{self.source}: tensor {name!r} is missing (looked for {disk!r}"
                                  f"{' or the fused form' if info.experts is not None else ''})")
            src = self._sources[name]
            if src.shape == info.shape:
                continue
            file = self._file_of[src.disk[0]]
            if src.kind == "experts" and src.shape[0] != info.shape[0]:
                raise WeightError(f"{self.source}: {name} has {src.shape[0]} experts on disk "
                                  f"({src.disk[-1]!r} is the last), the config says {info.shape[0]}")
            if src.kind == "experts":  # name the per-expert tensor and its own shape
                raise WeightError(f"{file}: tensor {src.disk[0]!r} has shape {list(src.shape[1:])}, "
                                  f"the config says {list(info.shape[1:])} (experts of {name})")
            raise WeightError(f"{file}: tensor {src.disk[0]!r} has shape {list(src.shape)}, "
                              f"the config says {list(info.shape)}")
        extra = [n for n in self._sources if n not in expected]
        if extra:
            log.warning("%s: %d tensors the model does not use, e.g. %s", self.source, len(extra), extra[0])
        self._sources = {n: self._sources[n] for n in expected}  # skeleton order, used tensors only

    # -- reading ---------------------------------------------------------------------------------

    def _source(self, name: str) -> _Source:
        try:
            return self._sources[name]
        except KeyError:
            raise WeightError(f"{self.source}: no tensor {name!r}") from None

    def _read(self, disk: str, select=None) -> torch.Tensor:
        """Reads one tensor with plain file reads into fresh memory (no memory map stays
        resident, so loading holds little more than the weights already packed)."""
        path = self._file_of[disk]
        try:
            tensor = _pread_tensor(path, self._offsets(path)[disk])
        except (OSError, ValueError, KeyError) as exc:
            raise WeightError(f"{path}: cannot read tensor {disk!r}: {exc}") from None
        return tensor if select is None else select(tensor).clone()

    def _offsets(self, path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
        """disk name -> (safetensors dtype, shape, absolute start, byte count), from the header."""
        if path not in self._header_cache:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            self._header_cache[path] = {
                name: (info["dtype"], tuple(info["shape"]), 8 + size + info["data_offsets"][0],
                       info["data_offsets"][1] - info["data_offsets"][0])
                for name, info in header.items() if name != "__metadata__"
            }
        return self._header_cache[path]


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                 "U8": torch.uint8, "BOOL": torch.bool}


def _pread_tensor(path: Path, entry: tuple[str, tuple[int, ...], int, int]) -> torch.Tensor:
    dtype_name, shape, start, nbytes = entry
    buf = torch.empty(nbytes, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        got = f.readinto(memoryview(buf.numpy()))
    if got != nbytes:
        raise ValueError(f"file ends after {got} of {nbytes} bytes")
    return buf.view(_TORCH_DTYPES[dtype_name]).reshape(shape)


def _num_experts(config) -> int:
    for key in ("n_routed_experts", "num_experts", "num_local_experts"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return 0
