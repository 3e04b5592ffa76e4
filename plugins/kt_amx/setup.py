"""Builds kt_amx._kernels with cffi (kt_amx/_build.py); the ISA variants of csrc/kernels.c
are compiled here with their own -m flags and linked into the same extension."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def _build_module():
    spec = importlib.util.spec_from_file_location("_kt_amx_build", HERE / "kt_amx" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildExt(build_ext):
    def build_extension(self, ext):
        if ext.name == "kt_amx._kernels":
            objects = _build_module().build_isa_objects(self.compiler, self.build_temp)
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


setup(cffi_modules=["kt_amx/_build.py:ffibuilder"], cmdclass={"build_ext": BuildExt})
