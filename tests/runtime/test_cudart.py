"""ktcore.runtime.cudart: finding libcudart (lazily, with clear errors) and the generic
host-experts runner's argument checks. The runs inside CUDA graphs are tested with the CPU
backends that offer the job protocol (kt-amx, kt-llamafile) and in the runtime's tests."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest

from ktcore.errors import KtError
from ktcore.ops.experts import ExpertsSpec, TorchExperts
from ktcore.runtime import cudart
from ktcore.runtime.cudart import CudartNotFound
from ktcore.runtime.host_experts import HostExpertsRunner, supports_host_jobs


def test_cudart_absent_gives_clear_error(monkeypatch):
    cudart.cudart.cache_clear()
    monkeypatch.setattr(cudart, "cudart_candidates", lambda: [])
    with pytest.raises(CudartNotFound) as info:
        cudart.cudart()
    assert isinstance(info.value, KtError)
    msg = str(info.value)
    assert "libcudart" in msg and "KTCORE_CUDART" in msg and "no candidate found" in msg
    cudart.cudart.cache_clear()

    monkeypatch.setattr(cudart, "cudart_candidates", lambda: ["/nonexistent/libcudart.so.99"])
    with pytest.raises(CudartNotFound, match="/nonexistent/libcudart.so.99"):
        cudart.cudart()
    cudart.cudart.cache_clear()


def test_cudart_env_override_and_wrong_library(monkeypatch):
    monkeypatch.setenv("KTCORE_CUDART", "/nonexistent/libcudart.so")
    assert cudart.cudart_candidates() == ["/nonexistent/libcudart.so"]
    # a library that loads but is not the CUDA runtime: no cudaLaunchHostFunc
    libc = ctypes.util.find_library("c")
    if libc:
        with pytest.raises(CudartNotFound, match="cudaLaunchHostFunc"):
            cudart.load_cudart([libc])


def test_import_does_not_load_cudart():
    code = ("import ktcore.runtime.cudart as c, torch; "
            "assert c.cudart.cache_info().currsize == 0 and not torch.cuda.is_initialized(); "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout




def test_runner_refuses_experts_without_jobs():
    torch_experts = TorchExperts(ExpertsSpec(4, 8, 8, 2), "cpu")
    assert not supports_host_jobs(torch_experts)
    with pytest.raises(TypeError, match="make_job"):
        HostExpertsRunner(torch_experts, max_tokens=4, device="cpu")
