"""cffi (API mode) build of ``kt_llamafile._kernels``.

``setup.py`` names ``ffibuilder`` in ``cffi_modules``; its ``build_ext`` first compiles
``csrc/kernels.c`` once per ISA level (``compile_isa_objects``: scalar, AVX2+FMA+F16C, AVX-512
F/BW/VL/VNNI, each with ``-DKTL_ISA=n`` and its own ``-m`` flags) and links those objects into
the extension. The other sources (reference dequantisation, CPU detection, pool, drivers) are
compiled with baseline x86-64 flags, so the library loads on any x86-64 CPU and picks a kernel
table at run time.

Build-time environment: ``KT_LLAMAFILE_SANITIZE=1`` compiles everything with
``-fsanitize=address,undefined`` (load it with libasan preloaded); ``KT_LLAMAFILE_CFLAGS``
adds compiler flags (tuning experiments, e.g. ``-DKTL_GEMV_RM=4``). ``build_into(dir)`` builds a
copy of the extension into a directory (the sanitizer test).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sysconfig
from pathlib import Path

from cffi import FFI

PACKAGE_DIR = Path(__file__).resolve().parent
CSRC = PACKAGE_DIR.parent / "csrc"
MODULE = "kt_llamafile._kernels"
COMMON_SOURCES = ("dequant.c", "cpu.c", "pool.c", "matmul.c", "experts.c", "job.c")
KERNEL_SOURCE = "kernels.c"
HEADERS = ("ktl_api.h", "ktl_types.h", "ktl_internal.h", "kern_scalar.h", "kern_avx2.h", "kern_avx512.h")

BASE_FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-math-errno",
              "-Wall", "-Wno-unused-function"]
SANITIZE_FLAGS = ["-O0", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                  "-fno-sanitize-recover=undefined"]
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
AVX512_FLAGS = AVX2_FLAGS + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
#: level -> (name, flags); the level numbers are the C ISA levels (csrc/cpu.c).
ISA_LEVELS = {0: ("scalar", []), 1: ("avx2", AVX2_FLAGS), 2: ("avx512", AVX512_FLAGS)}


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def compile_flags(sanitize: bool) -> list[str]:
    extra = shlex.split(os.environ.get("KT_LLAMAFILE_CFLAGS", ""))  # e.g. -DKTL_GEMV_RM=4 (tuning)
    if not sanitize:
        return list(BASE_FLAGS) + extra
    return [f for f in BASE_FLAGS if not f.startswith("-O")] + SANITIZE_FLAGS + extra


def compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")


def compile_isa_objects(out_dir: str | os.PathLike, sanitize: bool | None = None) -> list[str]:
    """Compiles kernels.c once per ISA level into ``out_dir``; returns the object paths."""
    sanitize = env_flag("KT_LLAMAFILE_SANITIZE") if sanitize is None else sanitize
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for level, (name, flags) in ISA_LEVELS.items():  # in parallel: they are independent
        obj = out / f"ktl_kernels_{name}.o"
        cmd = [*compiler(), *compile_flags(sanitize), *flags, f"-DKTL_ISA={level}", f"-I{CSRC}",
               "-c", str(CSRC / KERNEL_SOURCE), "-o", str(obj)]
        jobs.append((cmd, obj, subprocess.Popen(cmd)))
    for cmd, _, proc in jobs:
        if proc.wait() != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd)
    return [str(obj) for _, obj, _ in jobs]


def cdef_text() -> str:
    """The declarations of csrc/ktl_api.h without preprocessor lines (cffi's cdef)."""
    lines = (CSRC / "ktl_api.h").read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def make_ffi(sanitize: bool = False, extra_objects: list[str] | None = None, relative: bool = False) -> FFI:
    """The cffi builder; ``relative`` names the sources relative to the plugin directory (what
    setuptools requires of a setup script; setup.py runs there)."""
    csrc = Path("csrc") if relative else CSRC
    ffi = FFI()
    ffi.cdef(cdef_text())
    link = ["-pthread"] + (["-fsanitize=address,undefined"] if sanitize else [])
    ffi.set_source(
        MODULE,
        '#include "ktl_api.h"',
        sources=[str(csrc / s) for s in COMMON_SOURCES],
        include_dirs=[str(csrc)],
        depends=[str(csrc / h) for h in HEADERS] + [str(csrc / KERNEL_SOURCE)],
        extra_compile_args=compile_flags(sanitize),
        extra_link_args=link,
        extra_objects=list(extra_objects or []),
        libraries=["m"],
    )
    return ffi


def build_into(target_dir: str | os.PathLike, sanitize: bool = False) -> Path:
    """Builds the extension into ``target_dir`` (not installed); returns the .so path."""
    target = Path(target_dir)
    objects = compile_isa_objects(target / "isa", sanitize)
    ffi = make_ffi(sanitize, objects)
    return Path(ffi.compile(tmpdir=str(target), verbose=False))


ffibuilder = make_ffi(env_flag("KT_LLAMAFILE_SANITIZE"), relative=True)

if __name__ == "__main__":
    print(build_into(PACKAGE_DIR.parent / "build" / "manual"))
