"""Writing a model as GGUF with llama.cpp's names, metadata, transforms and type rules.

``write_gguf`` streams: the tensor plan comes from the config (``gguf_names.gguf_plan``), so
every tensor info (name, shape, type, offset) is written before any data; then each incoming
tensor is transformed, quantised (``kquants``/``gguf.quants``: real blocks) and written at its offset,
one tensor at a time, in whatever order the caller yields them. ``gguf.GGUFWriter`` writes the
header, metadata and tensor infos (it only holds tensor data when given with ``add_tensor``,
which this module never calls). ``write_gguf_blocks`` is that writing path on its own, for
tensors already encoded, each with its own type (``random_gguf``: random blocks in a
``q4_k_m`` type mix).

Type rules (llama.cpp's converter and ``llama-quant.cpp``): 1-D tensors, ``*_norm.weight``,
biases, the routers ``ffn_gate_inp``/``ffn_gate_inp_shexp`` and ``exp_probs_b`` stay F32; every
other tensor gets the requested type, unless its row length (``ne[0]``) is not a multiple of
the type's block size: then ``tensor_type_fallback`` of llama-quant.cpp applies (Q2_K/Q3_K ->
Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; F16 when that does not fit either, and F16
directly for 32-block types, as the converter does on ``QuantError``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, size_label

from ktcore.errors import KtError, WeightError
from ktcore.formats import kquants
from ktcore.formats.gguf_meta import add_model_metadata, add_tokenizer_metadata
from ktcore.formats.gguf_names import GGUFTensorSpec, canonical_shapes, gguf_arch, gguf_plan, to_gguf
from ktcore.ops.weights import GGUF_TYPES, gguf_nbytes

logger = logging.getLogger(__name__)

#: llama-quant.cpp ``tensor_type_fallback`` for the types of DESIGN §7.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def tensor_type(spec: GGUFTensorSpec, qtype: str) -> str:
    """The GGUF type ``spec`` is stored in when the file type asks for ``qtype``."""
    if spec.keep_f32:
        return "F32"
    cols = spec.shape[-1]
    if cols % GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0] == 0:
        return qtype
    fallback = FALLBACK.get(qtype, "F16")
    if cols % GGML_QUANT_SIZES[GGMLQuantizationType[fallback]][0]:
        fallback = "F16"
    logger.info("%s: %d columns not divisible by the %s block size -> falling back to %s",
                spec.name, cols, qtype, fallback)
    return fallback


def encode(tensor: torch.Tensor, qtype: str, name: str = "<tensor>") -> np.ndarray:
    """GGUF bytes (or F32/F16 values) of a dense tensor: K-quants by ``kquants``, the other types
    by ``gguf.quants``."""
    x = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    try:
        return np.ascontiguousarray(kquants.quantize(x, GGMLQuantizationType[qtype]))
    except (NotImplementedError, ValueError) as exc:
        raise KtError(f"tensor {name!r}: cannot quantise to {qtype}: {exc}") from None


def write_gguf(path: str | Path, config: Any, tokenizer: Any, tensors: Iterable[tuple[str, torch.Tensor]],
               qtype: str = "F32", *, split_max_bytes: int | None = None, name: str | None = None) -> list[Path]:
    """Writes ``tensors`` (canonical name, dense tensor) of ``config``'s model as GGUF.

    ``tokenizer`` is a byte-level BPE `tokenizers`/transformers fast tokenizer (None writes no
    tokenizer; llama.cpp then cannot load the file). With ``split_max_bytes`` the tensors are
    spread over ``NAME-00001-of-0000N.gguf`` parts of at most that many data bytes (llama.cpp's
    ``split.*`` keys; a set that fits in one part stays one plain file). Returns the paths.
    Every tensor of the model must come exactly once; nothing is left behind on error.
    """
    path = Path(path)
    if qtype not in GGUF_TYPES:
        raise KtError(f"GGUF type {qtype!r} is not supported (supported: {', '.join(GGUF_TYPES)})")
    plan = gguf_plan(config)
    types = {spec.name: tensor_type(spec, qtype) for spec in plan}
    fallbacks = sum(1 for spec in plan if not spec.keep_f32 and types[spec.name] != qtype)
    if fallbacks:
        logger.warning("%d of %d tensor(s) required fallback quantization (rows not a multiple of the %s block)",
                       fallbacks, len(plan), qtype)
    return write_gguf_blocks(path, config, tokenizer, types, _encoded(plan, types, config, tensors, path), qtype,
                             split_max_bytes=split_max_bytes, name=name)


def write_gguf_blocks(path: str | Path, config: Any, tokenizer: Any, types: Mapping[str, str],
                      blocks: Iterable[tuple[str, np.ndarray]], file_qtype: str, *,
                      split_max_bytes: int | None = None, name: str | None = None) -> list[Path]:
    """Writes tensors already in their GGUF encoding: the path ``write_gguf`` takes after encoding.

    ``types`` gives the GGUF type of every tensor of ``gguf_plan(config)`` (by GGUF name);
    ``blocks`` yields ``(GGUF name, array)`` once per tensor, in any order, each array holding
    exactly that tensor's bytes (F32/F16 values or raw blocks). ``file_qtype`` is the requested
    type that names the file type (``general.file_type``: Q4_K -> MOSTLY_Q4_K_M). The header,
    metadata and tensor infos are written first, then each tensor at its offset as it comes,
    so only one tensor is in memory at a time. Other arguments and the result as ``write_gguf``.
    """
    path = Path(path)
    plan = gguf_plan(config)
    names = {spec.name for spec in plan}
    if set(types) != names:
        odd = sorted(set(types) ^ names)
        raise KtError(f"{path}: the type plan does not cover the {config.model_type} model's tensors exactly "
                      f"({', '.join(odd[:5])}{' ...' if len(odd) > 5 else ''})")
    unknown = sorted({t for t in types.values() if t not in GGUF_TYPES})
    if unknown or file_qtype not in GGUF_TYPES:
        raise KtError(f"GGUF type(s) {', '.join(unknown or [file_qtype])} not supported "
                      f"(supported: {', '.join(GGUF_TYPES)})")

    writer = GGUFWriter(path, gguf_arch(config), split_max_size=split_max_bytes or 0)
    add_model_metadata(writer, config, qtype=file_qtype, name=name)
    if tokenizer is not None:
        add_tokenizer_metadata(writer, tokenizer, config.vocab_size)
    nbytes = {spec.name: gguf_nbytes(types[spec.name], spec.shape, spec.name) for spec in plan}
    for spec in plan:
        writer.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), nbytes[spec.name],
                               raw_dtype=GGMLQuantizationType[types[spec.name]])
    total, shared, expert, n_expert = writer.get_total_parameter_count()
    writer.add_size_label(size_label(total, shared, expert, n_expert))  # as the converter does
    where, ends = _layout(writer)
    paths = writer.format_shard_names(path)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        starts = []
        for fout in writer.fout:
            writer.write_padding(fout, fout.tell())
            starts.append(fout.tell())
        _write_blocks(writer.fout, starts, where, nbytes, blocks, path)
        for fout, start, end in zip(writer.fout, starts, ends):
            fout.truncate(start + end)  # trailing padding of the last tensor
        writer.close()
    except BaseException:
        writer.close()
        for part in paths:
            part.unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%d tensors, %s) in %d part(s)", path, len(plan), file_qtype, len(paths))
    return paths


def _layout(writer: GGUFWriter) -> tuple[dict[str, tuple[int, int]], list[int]]:
    """Per tensor (part, offset in the part's data section), as the tensor infos record them."""
    where: dict[str, tuple[int, int]] = {}
    ends = []
    for part, infos in enumerate(writer.tensors):
        offset = 0
        for tname, info in infos.items():
            where[tname] = (part, offset)
            offset += GGUFWriter.ggml_pad(info.nbytes, writer.data_alignment)
        ends.append(offset)
    return where, ends


def _write_blocks(fouts: list[Any], starts: list[int], where: dict[str, tuple[int, int]], nbytes: dict[str, int],
                  blocks: Iterable[tuple[str, np.ndarray]], path: Path) -> None:
    """Writes each ``(GGUF name, encoded array)`` at its offset; every tensor exactly once."""
    done: set[str] = set()
    for gname, data in blocks:
        if gname not in where:
            raise WeightError(f"{path}: {gname!r} is not a tensor of this file")
        if gname in done:
            raise WeightError(f"{path}: tensor {gname!r} was given twice")
        if data.nbytes != nbytes[gname]:
            raise WeightError(f"{path}: {gname}: {data.nbytes} bytes given, {nbytes[gname]} planned")
        part, offset = where[gname]
        fouts[part].seek(starts[part] + offset)
        fouts[part].write(np.ascontiguousarray(data).data)
        done.add(gname)
        del data
    missing = [n for n in where if n not in done]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightError(f"{path}: GGUF tensor(s) {', '.join(repr(m) for m in missing[:5])}{more} were not given")


def _encoded(plan: list[GGUFTensorSpec], types: dict[str, str], config: Any,
             tensors: Iterable[tuple[str, torch.Tensor]], path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """``(GGUF name, encoded array)`` of every GGUF tensor made from the canonical ``tensors``."""
    by_source: dict[str, list[GGUFTensorSpec]] = defaultdict(list)
    for spec in plan:
        by_source[spec.source].append(spec)
    shapes = canonical_shapes(config)
    done: set[str] = set()
    for cname, tensor in tensors:
        if cname not in by_source:
            raise WeightError(f"{path}: tensor {cname!r} is not a tensor of this {config.model_type} model")
        if cname in done:
            raise WeightError(f"{path}: tensor {cname!r} was given twice")
        if tuple(tensor.shape) != shapes[cname]:
            raise WeightError(f"{path}: tensor {cname!r} has shape {list(tensor.shape)}, "
                              f"the config expects {list(shapes[cname])}")
        if not tensor.is_floating_point():
            raise WeightError(f"{path}: tensor {cname!r} must be a float tensor, got {tensor.dtype}")
        for spec in by_source[cname]:
            yield spec.name, encode(to_gguf(spec, tensor), types[spec.name], spec.name)
        done.add(cname)
    missing = [c for c in by_source if c not in done]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightError(f"{path}: tensor(s) {', '.join(repr(m) for m in missing[:5])}{more} were not given")
