"""Reference computations and stated tolerances for kt-llamafile's tests (and the ISA
subprocess checks: ``python -m kt_llamafile.testing``).

The kernels' only deliberate error is the 8-bit quantisation of the activations (per block of
32 for the legacy types, 256 for the K types; none for F32/F16/BF16). So each matmul is
checked twice:

- ``exact``: against ``x_hat @ W.T`` in float64, where ``W`` is dequantised by gguf.quants and
  ``x_hat`` are the activations as the kernels quantised them: only fp32 rounding differs,
  ``|y - ref| <= EXACT_TOL * (|x_hat| @ |W|.T)`` elementwise.
- ``bound``: against ``x @ W.T`` (dequantise, then fp32 matmul): the rounding of x moves each
  element by at most half a step, so ``|y - ref| <= 0.5 * |W| @ step(x) + EXACT_TOL * |x| @ |W|.T``
  with ``step`` = block amax / 127; and the relative Frobenius error stays under ``NORM_TOL``.
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import torch

from kt_llamafile import _lib
from kt_llamafile.random_blocks import BLOCKS, QTYPES, random_weight

#: elementwise, relative to |x_hat| @ |W|.T: fp32 accumulation only
EXACT_TOL = 1e-5
#: relative Frobenius error of y against dequantise-then-fp32-matmul, per type, for normal x
#: (typical: 0.5% with 32-element activation blocks, 0.7% with 256-element ones; the margin
#: covers the spread of small cases: one 256 block, one token, random group offsets)
NORM_TOL = {"F32": 1e-5, "F16": 1e-5, "BF16": 1e-5,
            "Q4_0": 1.2e-2, "Q4_1": 1.2e-2, "Q5_0": 1.2e-2, "Q5_1": 1.2e-2, "Q8_0": 1.2e-2,
            "Q2_K": 3e-2, "Q3_K": 3e-2, "Q4_K": 3e-2, "Q5_K": 3e-2, "Q6_K": 3e-2}


def gguf_dequantize(w: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The oracle: gguf.quants.dequantize of raw rows, float64."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    values = dequantize(np.ascontiguousarray(w).reshape(-1), GGMLQuantizationType[qtype])
    return np.asarray(values, dtype=np.float64).reshape(shape)


#: experts, elementwise against ``emulated_experts``, relative to its ``scale`` (fp32 rounding,
#: and the rare activation code that rounds the other way after a last-bit difference in silu)
EXPERTS_EMULATED_TOL = 2e-3


def emulated_experts(x: torch.Tensor, ids: torch.Tensor, tw: torch.Tensor, layer: dict, spec) -> tuple[np.ndarray, np.ndarray]:
    """Routed experts with the kernels' two activation roundings (x for gate/up, act(g) * u for
    down) in float64 on gguf-dequantised ``layer`` ({"gate", "up", "down"}: GGUFWeight);
    returns (y, scale): ``scale = sum_k |w| |W_down| @ |h_hat|``, what the tolerance is relative to."""
    from ktcore.ops.experts import activation_fn

    E, H, I = spec.num_experts, spec.hidden_size, spec.intermediate_size
    deq = {n: gguf_dequantize(w.data.numpy(), w.qtype, w.shape) for n, w in layer.items()}
    act = activation_fn(spec.activation)
    owned = set(spec.owned_ids)
    y = np.zeros((x.shape[0], H))
    scale = np.zeros((x.shape[0], H))
    xg = _lib.quantized_activations(x, layer["gate"].qtype).double().numpy()
    xu = _lib.quantized_activations(x, layer["up"].qtype).double().numpy()
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e == E or e not in owned:
                continue
            g = torch.from_numpy(deq["gate"][e] @ xg[t]).float()
            u = torch.from_numpy(deq["up"][e] @ xu[t]).float()
            h = (act(g) * u).reshape(1, I)
            h_hat = _lib.quantized_activations(h, layer["down"].qtype).double().numpy()[0]
            w = float(tw[t, k])
            y[t] += w * (deq["down"][e] @ h_hat)
            scale[t] += abs(w) * (np.abs(deq["down"][e]) @ np.abs(h_hat))
    return y, scale


def assert_experts_emulated(y: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, tw: torch.Tensor, layer: dict,
                            spec) -> float:
    """``|y - emulated| <= EXPERTS_EMULATED_TOL * scale`` elementwise; returns the worst ratio."""
    ref, scale = emulated_experts(x, ids, tw, layer, spec)
    ratio = float(np.max(np.abs(y.double().numpy() - ref) / (EXPERTS_EMULATED_TOL * scale + 1e-30)))
    assert ratio <= 1.0, ratio
    return ratio


def act_block(qtype: str) -> int:
    return {0: 0, 1: 32, 2: 256}[_lib.act_kind(qtype)]


def quant_step(x: np.ndarray, qtype: str) -> np.ndarray:
    """Per element of x[T, K]: the activation quantisation step (block amax / 127)."""
    block = act_block(qtype)
    if block == 0:
        return np.zeros_like(x, dtype=np.float64)
    t, k = x.shape
    amax = np.abs(x.astype(np.float64)).reshape(t, k // block, block).max(axis=-1, keepdims=True)
    return np.broadcast_to(amax / 127.0, (t, k // block, block)).reshape(t, k)


def matmul_errors(x: torch.Tensor, w: np.ndarray, qtype: str, y: torch.Tensor) -> dict[str, float]:
    """``exact`` and ``bound`` ratios (<= 1 passes) and the relative Frobenius ``norm`` error."""
    n = w.shape[0]
    k = x.shape[1]
    wd = gguf_dequantize(w, qtype, (n, k))  # [N, K] float64
    x64 = x.double().numpy()
    x_hat = _lib.quantized_activations(x, qtype).double().numpy()
    y64 = y.double().numpy()
    exact_ref = x_hat @ wd.T
    exact_scale = np.abs(x_hat) @ np.abs(wd).T + 1e-30
    ref = x64 @ wd.T
    bound = 0.5 * quant_step(x64, qtype) @ np.abs(wd).T + EXACT_TOL * (np.abs(x64) @ np.abs(wd).T) + 1e-30
    return {
        "exact": float(np.max(np.abs(y64 - exact_ref) / (EXACT_TOL * exact_scale))),
        "bound": float(np.max(np.abs(y64 - ref) / bound)),
        "norm": float(np.linalg.norm(y64 - ref) / max(np.linalg.norm(ref), 1e-30)),
    }


def assert_matmul_close(x: torch.Tensor, w: np.ndarray, qtype: str, y: torch.Tensor) -> dict[str, float]:
    errs = matmul_errors(x, w, qtype, y)
    where = f"{qtype} x{list(x.shape)} W[{w.shape[0]}, {x.shape[1]}]"
    assert errs["exact"] <= 1.0, f"{where}: differs from x_hat @ W.T beyond fp32 rounding: {errs}"
    assert errs["bound"] <= 1.0, f"{where}: exceeds the activation-quantisation bound: {errs}"
    assert errs["norm"] <= NORM_TOL[qtype], f"{where}: relative error {errs['norm']:.2e} > {NORM_TOL[qtype]:.1e}"
    return errs


def shapes_for(qtype: str) -> list[int]:
    """Row lengths K to test: multiples of the block size, an odd number of blocks included."""
    block = BLOCKS[qtype][0]
    if block == 1:
        return [1, 37, 512]
    if block == 32:
        return [32, 96, 544]
    return [256, 768]


def long_row(qtype: str) -> int:
    """A row long enough for the GEMV path to sum it in parts, ending in an odd block."""
    block = BLOCKS[qtype][0]
    return 4608 + (5 if block == 1 else 32 if block == 32 else 256)


def check_all(tokens: tuple[int, ...] = (1, 2, 7, 64), rows: int = 33, threads: int = 2, seed: int = 0) -> dict:
    """Every type, every K of ``shapes_for`` (and a long row with one token), on the selected
    ISA; raises on a failure. Returns the ISA, the worst errors per type and a digest of the
    quantised activations."""
    rng = np.random.default_rng(seed)
    worst: dict[str, dict[str, float]] = {}
    for qtype in QTYPES:
        for k, toks in [(k, tokens) for k in shapes_for(qtype)] + [(long_row(qtype), (1,))]:
            w = random_weight(qtype, rows, k, rng)
            for t in toks:
                x = torch.from_numpy(rng.standard_normal((t, k)).astype(np.float32))
                y = _lib.matmul(x, torch.from_numpy(w), qtype, rows, threads)
                errs = assert_matmul_close(x, w, qtype, y)
                cur = worst.setdefault(qtype, {"exact": 0.0, "bound": 0.0, "norm": 0.0})
                for key, v in errs.items():
                    cur[key] = max(cur[key], v)
    x = torch.from_numpy(np.random.default_rng(seed + 1).standard_normal((3, 512)).astype(np.float32))
    x[0, 5] = float("nan")
    x[1, 300:310] = 0.0
    digest = {q: hashlib.sha256(_lib.quantized_activations(x, q).numpy().tobytes()).hexdigest() for q in ("Q8_0", "Q4_K")}
    return {"isa": _lib.selected_isa(), "worst": worst, "digest": digest}


if __name__ == "__main__":
    print(json.dumps(check_all(threads=int(sys.argv[1]) if len(sys.argv) > 1 else 2)))
