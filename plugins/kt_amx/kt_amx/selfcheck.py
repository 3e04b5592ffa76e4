"""``python -m kt_amx.selfcheck``: a small parity run of every format on every ISA path here.

Compares AmxExperts with kt_amx.reference (exact-format parity) for a few token counts and
prints one line per case, then the same for AmxLinear; exits 1 on any mismatch. ``--numa split|mirror`` with
``KT_AMX_NUMA=N`` runs the layers over N simulated NUMA nodes. The sanitizer test runs it under ASan/UBSan
on a variant build (``KT_AMX_KERNELS``), with ``KT_AMX_MIN_ROWS=1`` so that the AMX tile path
(real or emulated) handles every expert.
"""

from __future__ import annotations

import argparse
import sys

import torch

from kt_amx import _lib, reference
from kt_amx.experts import AmxExperts
from ktcore.ops.experts import ExpertsSpec

# name: (options, (H, I)); H and I odd multiples of 32 where the group allows (a per-channel
# group of 96 or 160 is not a multiple of the 64-byte AMX K step).
CASES = {
    "bf16": ({"format": "bf16"}, (96, 160)),
    "int8-g32": ({"format": "int8", "group_size": 32}, (96, 160)),
    "int8-channel": ({"format": "int8", "group_size": 0}, (96, 160)),
    "int4-sym-g64": ({"format": "int4", "group_size": 64, "symmetric": True}, (128, 192)),
    "int4-g32": ({"format": "int4", "group_size": 32}, (96, 160)),
}


def check(tokens=(1, 3, 37), E=6, K=3, tol=2e-3, numa: str | None = None) -> bool:
    ok = True
    gen = torch.Generator().manual_seed(0)
    for name, (options, (H, I)) in CASES.items():
        weights = {"gate": torch.randn(E, I, H, generator=gen) * H**-0.5,
                   "up": torch.randn(E, I, H, generator=gen) * H**-0.5,
                   "down": torch.randn(E, H, I, generator=gen) * I**-0.5}
        options = options if numa is None else {**options, "numa": numa}
        amx = AmxExperts(ExpertsSpec(E, H, I, K, owned=(0, 2, 3, 5)), "cpu", options)
        amx.load_weights(weights)
        for T in tokens:
            x = torch.randn(T, H, generator=gen)
            ids = torch.randint(0, E + 1, (T, K), generator=gen)
            w = torch.rand(T, K, generator=gen)
            for isa in _lib.isas_here():
                with _lib.use_isa(isa):
                    y = amx(x, ids, w)
                ref = reference.forward(amx, x, ids, w, isa)
                err = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
                good = bool(torch.isfinite(y).all()) and err < tol
                ok &= good
                print(f"{name:14s} T={T:<4d} {isa:7s} rel.err {err:.2e} {'ok' if good else 'MISMATCH'}")
    return ok


def check_linear(tokens=(1, 3, 37), N=80, tol=2e-5) -> bool:
    """AmxLinear (N an odd multiple of 16, with bias) against F.linear on the packed weight
    with the kernels' activation rounding."""
    import torch.nn.functional as F

    from kt_amx.linear import AmxLinear
    from ktcore.ops.linear import LinearSpec

    ok = True
    gen = torch.Generator().manual_seed(1)
    for name, (options, (H, _)) in CASES.items():
        lin = AmxLinear(LinearSpec(H, N, bias=True), "cpu", options)
        b = torch.randn(N, generator=gen)
        lin.load_weights({"weight": torch.randn(N, H, generator=gen) * H**-0.5, "bias": b})
        for T in tokens:
            x = torch.randn(T, H, generator=gen)
            for isa in _lib.isas_here():
                with _lib.use_isa(isa):
                    y = lin(x)
                xr = reference.round_activations(x, lin.layer_format, isa, lin.layer_format.group_for(H))
                ref = F.linear(xr, lin.dequantized(), b)
                err = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
                good = bool(torch.isfinite(y).all()) and err < tol
                ok &= good
                print(f"linear {name:14s} T={T:<4d} {isa:7s} rel.err {err:.2e} {'ok' if good else 'MISMATCH'}")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numa", choices=("split", "mirror", "off"), default=None,
                        help="the layers' numa option (simulate nodes with KT_AMX_NUMA=N)")
    args = parser.parse_args(argv)
    print(f"kt-amx: available {_lib.available_isa()}, emulated AMX {_lib.amx_emulated()}, "
          f"threads {_lib.ensure_pool()}")
    ok = check(numa=args.numa)
    ok &= check_linear()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
