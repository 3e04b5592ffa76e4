"""cffi (API mode) build of ``kt_amx._kernels``.

``setup.py`` names ``ffibuilder`` in ``cffi_modules``, so ``pip install -e plugins/kt_amx``
builds the extension. ``csrc/kernels.c`` is compiled once per ISA level with that level's
``-m`` flags and ``-DKT_LEVEL=n`` (setup.py's build_ext adds the objects to the link); the
dispatcher, pool and layer code are compiled once with baseline x86-64 flags and pick a
variant at run time from CPUID/XCR0, so the library loads on any x86-64 CPU.

Environment at build time:

- ``KT_AMX_SANITIZE=1``: ``-fsanitize=address,undefined`` (run with libasan preloaded);
- ``KT_AMX_EMULATE=1``: the AMX variant runs its tile instructions in plain C, so the AMX
  code paths can be tested on CPUs with AVX-512 but no AMX (test builds only).

``build_into(dir)`` builds a variant into a directory (the sanitizer and emulation tests).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

from cffi import FFI

PACKAGE_DIR = Path(__file__).resolve().parent
CSRC = PACKAGE_DIR.parent / "csrc"
MODULE = "kt_amx._kernels"
COMMON_SOURCES = ("cpu_detect.c", "pool.c", "moe.c", "linear.c", "numa.c", "doorbell.c")
KERNEL_SOURCE = "kernels.c"

BASE_FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-pthread", "-fno-strict-aliasing", "-Wall", "-Wno-unused-function"]
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
AVX512_FLAGS = AVX2_FLAGS + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512bf16"]
AMX_FLAGS = AVX512_FLAGS + ["-mamx-tile", "-mamx-int8", "-mamx-bf16"]
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]

#: level -> (name, flags) of the kernel variants.
LEVELS = {1: ("avx2", AVX2_FLAGS), 2: ("avx512", AVX512_FLAGS), 3: ("amx", AMX_FLAGS)}

_AMX_PROBE = "#include <immintrin.h>\nvoid f(void) { _tile_zero(0); _tile_release(); }\n"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0", "false", "no")


def _compiler_command() -> list[str]:
    return (sysconfig.get_config_var("CC") or "cc").split()


def compiler_supports(flags: list[str], source: str) -> bool:
    """True when the C compiler builds ``source`` with ``flags`` (e.g. -mamx-tile on old gcc)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "probe.c")
        src.write_text(source)
        cmd = [*_compiler_command(), *flags, "-c", str(src), "-o", str(Path(tmp, "probe.o"))]
        try:
            return subprocess.run(cmd, capture_output=True).returncode == 0
        except OSError:
            return False


def variant_levels(emulate_amx: bool) -> list[int]:
    """Kernel levels this compiler can build (the AMX one needs gcc >= 11 / clang >= 12)."""
    levels = [1, 2]
    if emulate_amx or compiler_supports(AMX_FLAGS, _AMX_PROBE):
        levels.append(3)
    return levels


def common_flags(sanitize: bool) -> list[str]:
    flags = list(BASE_FLAGS)
    if sanitize:
        flags = [f for f in flags if not f.startswith("-O")] + ["-O1", "-g"] + SANITIZE_FLAGS
    return flags


def _source_path(name: str, absolute: bool = False) -> str:
    """csrc/<name>, relative to the working directory when inside it (setuptools wants that)."""
    path = CSRC / name
    rel = os.path.relpath(path)
    return str(path) if absolute or rel.startswith("..") else rel


def build_isa_objects(compiler, build_temp: str | os.PathLike, *, sanitize: bool | None = None,
                      emulate_amx: bool | None = None, absolute: bool = False) -> list[str]:
    """Compiles kernels.c once per level with a distutils compiler; returns the object files."""
    sanitize = env_flag("KT_AMX_SANITIZE") if sanitize is None else sanitize
    emulate_amx = env_flag("KT_AMX_EMULATE") if emulate_amx is None else emulate_amx
    objects: list[str] = []
    for level in variant_levels(emulate_amx):
        name, isa_flags = LEVELS[level]
        macros = [("KT_LEVEL", str(level))]
        if level == 3 and emulate_amx:
            isa_flags = AVX512_FLAGS
            macros.append(("KT_AMX_EMULATE", "1"))
        out_dir = os.path.join(str(build_temp), f"kernels_{name}")
        objects += compiler.compile([_source_path(KERNEL_SOURCE, absolute)], output_dir=out_dir, macros=macros,
                                    include_dirs=[str(CSRC)], extra_postargs=common_flags(sanitize) + isa_flags)
    return objects


def make_ffibuilder(extra_objects: list[str] | None = None, *, sanitize: bool | None = None,
                    emulate_amx: bool | None = None, absolute: bool = False) -> FFI:
    sanitize = env_flag("KT_AMX_SANITIZE") if sanitize is None else sanitize
    emulate_amx = env_flag("KT_AMX_EMULATE") if emulate_amx is None else emulate_amx
    ffi = FFI()
    ffi.cdef((CSRC / "kt_amx_api.h").read_text())
    macros = [] if 3 in variant_levels(emulate_amx) else [("KT_NO_AMX_VARIANT", "1")]
    ffi.set_source(
        MODULE,
        '#include "kt_amx_api.h"\n',
        sources=[_source_path(s, absolute) for s in COMMON_SOURCES],
        include_dirs=[str(CSRC)],
        define_macros=macros,
        extra_compile_args=common_flags(sanitize),
        extra_link_args=["-pthread"] + (SANITIZE_FLAGS if sanitize else []),
        extra_objects=list(extra_objects or []),
    )
    return ffi


def build_into(target_dir: str | os.PathLike, *, sanitize: bool = False, emulate_amx: bool = False,
               verbose: bool = False) -> Path:
    """Builds a variant of the extension under ``target_dir``; returns the .so path."""
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    target = Path(target_dir).resolve()
    target.mkdir(parents=True, exist_ok=True)
    compiler = new_compiler()
    customize_compiler(compiler)
    objects = build_isa_objects(compiler, target / "objs", sanitize=sanitize, emulate_amx=emulate_amx,
                                absolute=True)
    ffi = make_ffibuilder(objects, sanitize=sanitize, emulate_amx=emulate_amx, absolute=True)
    built = Path(ffi.compile(tmpdir=str(target), verbose=verbose))
    shutil.rmtree(target / "objs", ignore_errors=True)
    return built


ffibuilder = make_ffibuilder()

if __name__ == "__main__":  # python kt_amx/_build.py DIR [--sanitize] [--emulate-amx]
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target_dir")
    parser.add_argument("--sanitize", action="store_true")
    parser.add_argument("--emulate-amx", action="store_true")
    args = parser.parse_args()
    print(build_into(args.target_dir, sanitize=args.sanitize, emulate_amx=args.emulate_amx))
