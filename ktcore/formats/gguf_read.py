"""``GGUFStore``: a ``WeightStore`` over one GGUF file or a split set, memory-mapped.

Tensors come back under canonical ktcore names (``ktcore.formats.store``) with llama.cpp's
converter transforms undone (``gguf_names``): F32/F16/BF16 as ``DenseWeight`` and quantised
types as ``GGUFWeight``, both zero-copy views of the memory map (``gguf.GGUFReader``) except
where a transform reorders rows (Mixtral q/k, fused gate_up/qkv slices: one copy of the raw
blocks, still quantised) and DeepSeek's ``kv_b_proj``, rebuilt from ``attn_k_b``/``attn_v_b``
with ``k_b`` dequantised (its transpose crosses the block axis): a float32 ``DenseWeight``.

Everything is validated when the store opens, before any data is used: each file's structure
(a bounds-checked scan of header, metadata and tensor infos, so a truncated or corrupt file is
a ``WeightError`` naming the file and the tensor, never a numpy error or a crash), the split
set, the architecture, and every tensor's presence, type and shape against the config.
"""

from __future__ import annotations

import logging
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, Keys

from ktcore.errors import KtError, WeightError
from ktcore.formats.gguf_meta import config_from_metadata, tokenizer_from_metadata
from ktcore.formats.gguf_names import (FusedSlice, GGUFTensorSpec, alternatives, canonical_shapes, from_gguf_rows,
                                       gguf_arch, gguf_plan, kv_b_from_parts, legacy_kv_b_name)
from ktcore.ops.weights import GGUF_TYPES, DenseWeight, GGUFWeight, WeightSource

logger = logging.getLogger(__name__)

_SPLIT_NAME = re.compile(r"(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")
_SCALAR_SIZE = {GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
                GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4, GGUFValueType.BOOL: 1,
                GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8}
_DENSE = {"F32": None, "F16": None, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a file's tensor-info table declares it (validated against the file size)."""

    name: str
    shape: tuple[int, ...]  # torch order (ne reversed)
    qtype: str  # gguf-py type name
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """Bounds-checked little-endian reads over a memory-mapped file."""

    def __init__(self, buf: Any, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > len(self.buf):
            raise WeightError(f"{self.path}: file is truncated in {what} (needs {n} bytes at offset {self.pos}, "
                              f"the file has {len(self.buf)})")
        start, self.pos = self.pos, self.pos + n
        return start

    def uint(self, size: int, what: str) -> int:
        return struct.unpack_from("<I" if size == 4 else "<Q", self.buf, self.take(size, what))[0]

    def string(self, what: str) -> str:
        n = self.uint(8, what)
        start = self.take(n, what)
        return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace")

    def skip_value(self, vtype: int, what: str) -> None:
        if vtype in _SCALAR_SIZE:
            self.take(_SCALAR_SIZE[GGUFValueType(vtype)], what)
        elif vtype == GGUFValueType.STRING:
            self.take(self.uint(8, what), what)
        elif vtype == GGUFValueType.ARRAY:
            itype, n = self.uint(4, what), self.uint(8, what)
            if itype in _SCALAR_SIZE:
                self.take(n * _SCALAR_SIZE[GGUFValueType(itype)], what)
                return
            if n * 8 > len(self.buf) - self.pos:  # every string/array item has an 8-byte length
                self.take(n * 8, what)
            for _ in range(n):
                self.skip_value(itype, what)
        else:
            raise WeightError(f"{self.path}: unknown metadata value type {vtype} in {what}")


def scan_gguf(path: Path) -> list[TensorInfo]:
    """Walks header, metadata and tensor infos of one file with bounds checks; raises ``WeightError``."""
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError:  # an empty file cannot be mapped
        raise WeightError(f"{path}: file is empty (truncated GGUF)") from None
    except OSError as exc:
        raise WeightError(f"{path}: cannot open: {exc.strerror}") from None
    with buf:
        return _scan(_Cursor(buf, path))


def _scan(c: _Cursor) -> list[TensorInfo]:
    if bytes(c.buf[c.take(4, "the header"):c.pos]) != b"GGUF":
        raise WeightError(f"{c.path}: not a GGUF file (bad magic)")
    version = c.uint(4, "the header")
    if version & 0xFFFF == 0:
        raise WeightError(f"{c.path}: big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise WeightError(f"{c.path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = c.uint(8, "the header"), c.uint(8, "the header")
    alignment = 32
    for i in range(n_kv):
        key = c.string(f"metadata entry #{i}")
        vtype = c.uint(4, f"metadata {key!r}")
        if key == Keys.General.ALIGNMENT and vtype == GGUFValueType.UINT32:
            alignment = c.uint(4, f"metadata {key!r}")
            if alignment == 0 or alignment & (alignment - 1):
                raise WeightError(f"{c.path}: invalid {key} {alignment} (not a power of two)")
        else:
            c.skip_value(vtype, f"metadata {key!r}")
    raw = []
    for i in range(n_tensors):
        name = c.string(f"tensor info #{i}")
        what = f"the tensor info of {name!r}"
        n_dims = c.uint(4, what)
        if not 1 <= n_dims <= 4:
            raise WeightError(f"{c.path}: tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to 4)")
        ne = [c.uint(8, what) for _ in range(n_dims)]
        type_id, offset = c.uint(4, what), c.uint(8, what)
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise WeightError(f"{c.path}: tensor {name!r} has unknown GGML type id {type_id}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        if ne[0] % block:
            raise WeightError(f"{c.path}: tensor {name!r}: row length {ne[0]} is not a multiple of the "
                              f"{qtype.name} block size {block}")
        count = 1
        for n in ne:
            count *= n
        raw.append((name, tuple(reversed(ne)), qtype.name, offset, count // block * type_size))
    data_start = -(-c.pos // alignment) * alignment
    infos, seen = [], set()
    for name, shape, qtype, offset, nbytes in raw:
        if name in seen:
            raise WeightError(f"{c.path}: tensor {name!r} appears twice")
        seen.add(name)
        start = data_start + offset
        if start + nbytes > len(c.buf):
            raise WeightError(f"{c.path}: tensor {name!r} is truncated: its data needs bytes "
                              f"{start}..{start + nbytes}, the file ends at {len(c.buf)}")
        infos.append(TensorInfo(name, shape, qtype, start, nbytes))
    return infos


def split_parts(path: str | Path) -> list[Path]:
    """All files of the GGUF ``path`` belongs to: itself, or every ``-0000i-of-0000N`` part."""
    path = Path(path)
    m = _SPLIT_NAME.fullmatch(path.name)
    if not m:
        if not path.is_file():
            raise WeightError(f"{path}: no such GGUF file")
        return [path]
    count = int(m["count"])
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    for i, part in enumerate(parts, 1):
        if not part.is_file():
            raise WeightError(f"{part}: part {i} of the {count}-part GGUF {parts[0].name} is missing")
    return parts


def _open_reader(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path, "c")  # copy-on-write map: writable views for torch, the file is never written
    except Exception as exc:  # the scan already validated the layout; anything left is corruption
        raise WeightError(f"{path}: cannot read GGUF: {exc}") from None


def read_metadata(reader: GGUFReader, path: Path | str = "<gguf>") -> dict[str, Any]:
    """``{key: value}`` of a reader's metadata (strings decoded, arrays as lists)."""
    try:
        return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    except (UnicodeDecodeError, IndexError, ValueError) as exc:
        raise WeightError(f"{path}: corrupt metadata: {exc}") from None


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a GGUF (of the first part of a split set), validated."""
    first = split_parts(path)[0]
    scan_gguf(first)
    return read_metadata(_open_reader(first), first)


def config_from_gguf(path: str | Path):
    """The transformers config a GGUF describes (metadata and tensor names), validated against its tensors."""
    return GGUFStore(path).config


def tokenizer_from_gguf(path: str | Path):
    """The GGUF's tokenizer as a ``transformers.PreTrainedTokenizerFast``."""
    return tokenizer_from_metadata(read_gguf_metadata(path), source=str(path))


def _same_shape(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    strip = lambda s: tuple(s[next((i for i, n in enumerate(s) if n != 1), len(s)):])  # noqa: E731
    return a == b or strip(a) == strip(b)


class GGUFStore:
    """Canonical-name ``WeightStore`` over a GGUF file or split set (given any of its parts).

    ``config`` is the model's transformers config (from an HF directory); without it the config
    is rebuilt from the GGUF metadata. Either way every tensor is checked against it up front.
    """

    def __init__(self, path: str | Path, config: Any = None, in_place: bool = False):
        self.in_place = in_place
        self.paths = split_parts(path)
        n = len(self.paths)
        self.source = str(self.paths[0]) if n == 1 else f"{self.paths[0]} (+{n - 1} more parts)"
        self._tensors: dict[str, tuple[Path, TensorInfo, Any]] = {}
        self._readers = []
        self.metadata: dict[str, Any] = {}
        for i, part in enumerate(self.paths):
            infos = scan_gguf(part)
            reader = _open_reader(part)
            self._readers.append(reader)
            meta = read_metadata(reader, part)
            if i == 0:
                self.metadata = meta
            self._check_split(part, i, meta)
            data = {t.name: t for t in reader.tensors}
            for info in infos:
                if info.name in self._tensors:
                    raise WeightError(f"{part}: tensor {info.name!r} is also in {self._tensors[info.name][0]}")
                self._tensors[info.name] = (part, info, data[info.name])
        total = self.metadata.get(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
        if n > 1 and total is not None and total != len(self._tensors):
            raise WeightError(f"{self.source}: split set declares {total} tensors, its parts hold {len(self._tensors)}")
        arch = self.metadata.get(Keys.General.ARCHITECTURE)
        try:
            self.config = config if config is not None else config_from_metadata(
                self.metadata, self._tensors, source=str(self.paths[0]))
            expected = gguf_arch(self.config)
        except KtError as exc:
            raise WeightError(str(exc)) from None
        if arch != expected:
            raise WeightError(f"{self.paths[0]}: GGUF architecture is {arch!r}, the config "
                              f"({self.config.model_type}) needs {expected!r}")
        self._shapes = canonical_shapes(self.config)
        self._recipes = self._resolve(gguf_plan(self.config))
        unused = set(self._tensors) - {name for recipe in self._recipes.values() for name in recipe[1]}
        if unused:
            logger.info("%s: %d tensor(s) not used by ktcore: %s",
                        self.source, len(unused), ", ".join(sorted(unused)[:8]))

    # ---------------------------------------------------------------- WeightStore protocol
    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        self._check_name(name)
        return self._shapes[name]

    def get(self, name: str) -> WeightSource:
        self._check_name(name)
        kind, gguf_names, spec, extra = self._recipes[name]
        if kind == "kv_b":  # attn_k_b [nH, R, nope] + attn_v_b [nH, v, R] -> [nH*(nope+v), R]
            k_b, v_b = (self._tensor(g).to_dense(None) for g in gguf_names)  # quantised: dequantised to f32
            if k_b.dtype != v_b.dtype:
                k_b, v_b = k_b.float(), v_b.float()
            return DenseWeight(kv_b_from_parts(k_b, v_b), name)
        if kind == "slice":  # rows [start, stop) of a fused tensor, then the spec's row transform
            raw, qtype, _ = self._raw(gguf_names[0])
            fused: FusedSlice = extra
            index = [slice(None)] * raw.dim()
            index[fused.dim] = slice(fused.start, fused.stop)
            raw = raw[tuple(index)].contiguous()
            return self._wrap(from_gguf_rows(spec, raw), qtype, self._shapes[name], name)
        raw, qtype, _ = self._raw(gguf_names[0])
        return self._wrap(from_gguf_rows(spec, raw), qtype, self._shapes[name], name)

    # -------------------------------------------------------------------------- extras
    def gguf_type(self, name: str) -> str:
        """The GGUF type ``name`` is stored in (of its first GGUF tensor)."""
        self._check_name(name)
        return self._tensors[self._recipes[name][1][0]][1].qtype

    def close(self) -> None:
        """Drops the memory maps (weights already handed out keep theirs alive)."""
        self._readers.clear()
        self._tensors.clear()

    def __enter__(self) -> "GGUFStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFStore({self.source!r}, {self.config.model_type}, {len(self._shapes)} tensors)"

    # ------------------------------------------------------------------------- helpers
    def _check_name(self, name: str) -> None:
        if name not in self._shapes:
            raise WeightError(f"{self.source}: no tensor {name!r} in this {self.config.model_type} model")

    def _check_split(self, part: Path, index: int, meta: dict[str, Any]) -> None:
        count, no = meta.get(Keys.Split.LLM_KV_SPLIT_COUNT), meta.get(Keys.Split.LLM_KV_SPLIT_NO)
        if len(self.paths) == 1:
            if count not in (None, 1):
                raise WeightError(f"{part}: file is part {(no or 0) + 1} of a {count}-part split set, but its name "
                                  f"does not say which (expected NAME-0000i-of-{count:05d}.gguf)")
        elif count != len(self.paths) or no != index:
            raise WeightError(f"{part}: split metadata says part {no} of {count}, the file name says part "
                              f"{index + 1} of {len(self.paths)}")

    def _resolve(self, plan: list[GGUFTensorSpec]) -> dict[str, tuple[str, tuple[str, ...], GGUFTensorSpec, Any]]:
        """canonical name -> (kind, GGUF tensors, spec, fused slice); checks presence, types and shapes."""
        recipes: dict[str, tuple[str, tuple[str, ...], GGUFTensorSpec, Any]] = {}
        missing = []
        for spec in plan:
            if spec.transform == "v_b":
                continue
            if spec.transform == "k_b":
                legacy = legacy_kv_b_name(spec)
                if legacy in self._tensors:  # old files: unsplit kv_b, no dequantisation needed
                    self._check(legacy, self._shapes[spec.source])
                    recipes[spec.source] = ("tensor", (legacy,), GGUFTensorSpec(legacy, self._shapes[spec.source],
                                                                                spec.source, spec.kind), None)
                    continue
                v_spec = next(s for s in plan if s.source == spec.source and s.transform == "v_b")
                if spec.name in self._tensors and v_spec.name in self._tensors:
                    self._check(spec.name, spec.shape)
                    self._check(v_spec.name, v_spec.shape)
                    recipes[spec.source] = ("kv_b", (spec.name, v_spec.name), spec, None)
                else:
                    missing.append(spec.name if spec.name not in self._tensors else v_spec.name)
                continue
            if spec.name in self._tensors:
                self._check(spec.name, spec.shape)
                recipes[spec.source] = ("tensor", (spec.name,), spec, None)
                continue
            fused = next((f for f in alternatives(spec, self.config) if f.name in self._tensors), None)
            if fused is None:
                missing.append(spec.name)
                continue
            self._check(fused.name, fused.shape)
            recipes[spec.source] = ("slice", (fused.name,), spec, fused)
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise WeightError(f"{self.source}: tensor {missing[0]!r} is missing"
                              f"{' (also ' + ', '.join(missing[1:5]) + more + ')' if len(missing) > 1 else ''}; "
                              f"a {self.config.model_type} model with this config needs it")
        return recipes

    def _check(self, gguf_name: str, expected: tuple[int, ...]) -> None:
        part, info, _ = self._tensors[gguf_name]
        if info.qtype not in GGUF_TYPES:
            raise WeightError(f"{part}: tensor {gguf_name!r} has GGUF type {info.qtype}, which ktcore does not "
                              f"support (supported: {', '.join(GGUF_TYPES)})")
        if not _same_shape(info.shape, tuple(expected)):
            raise WeightError(f"{part}: tensor {gguf_name!r} has shape {list(info.shape)}, the config "
                              f"({self.config.model_type}) expects {list(expected)}")

    def _raw(self, gguf_name: str) -> tuple[torch.Tensor, str, tuple[int, ...]]:
        """A tensor's data: floats for F32/F16/BF16, uint8 blocks otherwise.

        ``in_place`` stores hand out zero-copy views of the memory map (for backends that
        compute on the mapped blocks); otherwise the bytes are read into fresh memory with
        plain file reads, so pages of the map never stay resident beside the packed copy.
        """
        part, info, rt = self._tensors[gguf_name]
        data = torch.from_numpy(rt.data)  # [rows..., ne0] floats or [rows..., row_bytes] uint8
        if not self.in_place:
            fresh = torch.empty(data.shape, dtype=data.dtype)
            with open(part, "rb", buffering=0) as f:
                f.seek(int(rt.data_offset))
                got = f.readinto(memoryview(fresh.numpy()).cast("B"))
            if got != rt.n_bytes:
                raise WeightError(f"{part}: tensor {gguf_name!r} ends after {got} of {rt.n_bytes} bytes")
            data = fresh
        if info.qtype == "BF16":
            data = data.view(torch.bfloat16)
        return data, info.qtype, info.shape

    def _tensor(self, gguf_name: str) -> WeightSource:
        raw, qtype, shape = self._raw(gguf_name)
        return self._wrap(raw, qtype, shape, gguf_name)

    @staticmethod
    def _wrap(raw: torch.Tensor, qtype: str, shape: tuple[int, ...], name: str) -> WeightSource:
        if qtype in _DENSE:
            return DenseWeight(raw.reshape(shape), name)
        return GGUFWeight(raw.reshape(*shape[:-1], -1), qtype, tuple(shape), name)
