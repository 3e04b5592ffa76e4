"""Registers and spills of the fused MoE kernels per tile config, without a GPU.

Compiles ``fused_moe._gate_up_kernel`` and ``_down_kernel`` ahead of time for an sm_90
target with Triton's compiler (the nvidia backend ships in the triton wheel), then runs the
bundled ``ptxas -v`` on the PTX. This is how ``fused_moe.choose_config`` picked its tiles
(the largest without spills); rerun it after changing a kernel.

Usage (not under ``TRITON_INTERPRET``): ``python ptxas_check.py [--bits 4 --group 128]``
prints one line per config: ``gate_up=(registers, spill bytes) down=(...)``.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import tempfile

CONFIGS = [(1, 16, 256, 8), (1, 16, 512, 4), (1, 32, 512, 4), (1, 64, 512, 4), (1, 32, 1024, 4),
           (16, 64, 128, 4), (16, 64, 256, 4), (16, 128, 128, 4), (16, 128, 256, 4),
           (1, 32, 256, 4), (1, 32, 512, 8), (1, 64, 256, 8),
           (16, 16, 128, 8), (16, 32, 128, 8), (16, 32, 256, 8), (16, 64, 128, 8), (16, 64, 256, 8),
           (32, 32, 128, 8), (64, 32, 128, 8), (64, 64, 64, 8), (64, 64, 128, 8)]  # BLOCK_M, N, K, warps


def _ptxas() -> str:
    import triton

    found = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas*")))
    return found[-1]  # ptxas-blackwell reads the newest PTX versions when both are bundled


def registers_and_spills(kernel, signature: dict, constexprs: dict, warps: int, arch: int = 90) -> tuple[int, int]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: signature[name] for name in kernel.arg_names}  # in argument order
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        log = subprocess.run([_ptxas(), "-v", "--gpu-name", f"sm_{arch}a", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)
    regs = spills = -1
    for line in log.splitlines():
        if "spill stores" in line:
            spills = int(line.split("bytes spill stores")[0].split(",")[-1])
        if "Used" in line and "registers" in line:
            regs = int(line.split("Used")[1].split("registers")[0])
    return regs, spills


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8, 16))
    parser.add_argument("--group", type=int, default=128)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    from kt_marlin import fused_moe

    w_t = {4: "*i16", 8: "*i8", 16: "*bf16"}[args.bits]
    group = 0 if args.bits == 16 else args.group
    common = {"w_ptr": w_t, "s_ptr": "*fp16", "o_ptr": "*fp16", "sorted_pair_ptr": "*i32", "block_expert_ptr": "*i32",
              "P": "i32", "H": "i32", "I": "i32"}
    for bm, bn, bk, warps in CONFIGS:
        if group and bk % group:
            continue
        ce = {"BITS": args.bits, "GROUP": group, "UNIT": max(group, 64) if args.bits == 4 else group, "MAGIC": 128,
              "ASM": True, "USE_DOT": bm >= 16, "DOT_IEEE": False, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
        up_sig = dict(x_ptr="*bf16", h_ptr="*bf16", stride_x="i32", **common,
                      **{k: "constexpr" for k in ("TOPK", "ACT", *ce)})
        down_sig = dict(h_ptr="*bf16", out_ptr="*fp32", topk_w_ptr="*fp32", **common, **{k: "constexpr" for k in ce})
        up = registers_and_spills(fused_moe._gate_up_kernel, up_sig, dict(ce, TOPK=8, ACT=0), warps)
        down = registers_and_spills(fused_moe._down_kernel, down_sig, ce, warps)
        print(f"bits={args.bits} group={group} BLOCK_M={bm} BLOCK_N={bn} BLOCK_K={bk} warps={warps} "
              f"gate_up={up} down={down}", flush=True)


if __name__ == "__main__":
    main()
