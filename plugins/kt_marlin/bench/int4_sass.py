"""SASS instructions per weight in the main loop of the int4 linear kernel, without a GPU.

Compiles ``int4_mma.int4_kernel`` ahead of time for sm_90 (Triton's compiler, pointers and
row lengths marked 16-divisible as the JIT specialises them), disassembles the cubin with
the ``cuobjdump`` bundled in the triton wheel, takes the longest backward branch as the K
loop and counts its instructions by opcode. One loop iteration handles ``BLOCK_N x BLOCK_K``
weights over ``32 num_warps`` threads. Usage (not under ``TRITON_INTERPRET``):
``python int4_sass.py`` prints one line per config: registers, spills, loop length,
instructions per weight per thread and the most frequent opcodes.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

from ptxas_check import _ptxas

#: (BLOCK_N, BLOCK_K, num_warps, XS)
CONFIGS = [(64, 128, 4, 0), (64, 128, 4, 1), (64, 128, 4, 2), (64, 256, 4, 1), (128, 128, 4, 1), (128, 128, 4, 0)]
_INSN = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")


def loop_opcodes(sass: str) -> collections.Counter:
    """Opcodes of the longest ``[branch target, branch]`` range with a backward branch."""
    insns = [(int(m.group(1), 16), m.group(2)) for m in map(_INSN.match, sass.splitlines()) if m]
    best: list = []
    for addr, text in insns:
        m = re.search(r"BRA.*0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in insns if int(m.group(1), 16) <= a <= addr]
            best = body if len(body) > len(best) else best
    return collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in best)


def compile_int4(bn: int, bk: int, warps: int, xs: int, stages: int = 3, group: int = 128, pdl: bool = False,
                 pf: int = 0):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kt_marlin.int4_mma import int4_kernel

    types = dict(x_ptr="*bf16", xs_ptr="*fp32", qw_ptr="*i16", s_ptr="*fp16", o_ptr="*fp16", b_ptr="*bf16",
                 out_ptr="*bf16", part_ptr="*fp32", cnt_ptr="*i32", T="i32", N="i32", K="i32", KQ="i32",
                 stride_x="i32", SPLIT_K="i32")
    ce = dict(GROUP=group, MAGIC=128, ASM=True, DOT_IEEE=False, HAS_BIAS=False, USE_SPLIT=True, XS=xs, PDL=pdl,
              PF=pf, BLOCK_T=16, BLOCK_N=bn, BLOCK_K=bk)
    names = int4_kernel.arg_names
    sig = {n: types.get(n, "constexpr") for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in types and n not in ("T", "SPLIT_K")}
    return triton.compile(ASTSource(fn=int4_kernel, signature=sig, constexprs=ce, attrs=aligned),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    import triton

    cuobjdump = os.path.join(os.path.dirname(_ptxas()), "cuobjdump")
    print(f"# triton {triton.__version__}, sm_90, bf16, group 128, BLOCK_T 16, 3 stages")
    for bn, bk, warps, xs in CONFIGS:
        compiled = compile_int4(bn, bk, warps, xs)
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(compiled.asm["cubin"])
        try:
            sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
            log = subprocess.run([_ptxas(), "-v", "--gpu-name", "sm_90a", "-", "-o", os.devnull],
                                 input=compiled.asm["ptx"], capture_output=True, text=True).stderr
        finally:
            os.unlink(f.name)
        regs = re.search(r"Used (\d+) registers", log)
        spills = re.search(r"(\d+) bytes spill stores", log)
        ops = loop_opcodes(sass)
        n = sum(ops.values())
        per_thread = bn * bk // (32 * warps)
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(8))
        print(f"BLOCK_N={bn} BLOCK_K={bk} warps={warps} XS={xs}: {regs and regs.group(1)} registers, "
              f"{spills and spills.group(1)} B spills; loop {n} instructions, {n / per_thread:.2f} per weight; {top}",
              flush=True)


if __name__ == "__main__":
    main()
