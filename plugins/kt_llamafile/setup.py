"""Builds kt_llamafile._kernels with cffi (kt_llamafile/_build.py). The ISA variants of
csrc/kernels.c are compiled here, each with its own -m flags, and linked into the extension."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def _build_module():
    spec = importlib.util.spec_from_file_location("_kt_llamafile_build", HERE / "kt_llamafile" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildExt(build_ext):
    def build_extension(self, ext):
        if ext.name == "kt_llamafile._kernels":
            objects = _build_module().compile_isa_objects(Path(self.build_temp) / "ktl_isa")
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


setup(cffi_modules=["kt_llamafile/_build.py:ffibuilder"], cmdclass={"build_ext": BuildExt})
