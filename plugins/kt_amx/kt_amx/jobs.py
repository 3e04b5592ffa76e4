"""Asynchronous forwards for the runtime (DESIGN §5): ``submit()`` hands the job to the worker
pool and returns, ``wait()`` blocks until it is done.

An ``ExpertsJob`` is bound once to fixed buffers (static, pinned tensors in a CUDA graph):
``x [T, H]``, ``topk_ids [T, K]``, ``topk_weights [T, K]`` and ``y [T, H]``. For graph capture
the C functions ``kt_host_submit`` / ``kt_host_wait`` have the ``void (*)(void *)`` signature of
a CUDA host function; ``host_functions()`` gives their addresses and ``address`` the user data,
for ``cudaLaunchHostFunc(stream, fn, job)``: ktcore's ``HostExpertsRunner`` enqueues them on a
torch stream.
"""

from __future__ import annotations

import torch

from kt_amx import _lib
from kt_amx.experts import DTYPE_CODES, AmxExperts, status_error


class ExpertsJob:
    """One forward of one ``AmxExperts`` on fixed buffers; one job of a layer in flight at a time."""

    def __init__(self, experts: AmxExperts, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, y: torch.Tensor | None = None):
        if experts._moe is None:
            raise RuntimeError("kt-amx: load the weights before making a job")
        experts.check_inputs(x, topk_ids, topk_weights)
        y = torch.empty_like(x) if y is None else y
        for name, t in (("x", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights), ("y", y)):
            if t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(f"kt-amx job: {name} must be a contiguous CPU tensor")
        if x.dtype not in DTYPE_CODES or y.dtype != x.dtype or y.shape != x.shape:
            raise ValueError("kt-amx job: x must be fp32 or bf16 and y like x")
        if topk_weights.dtype != torch.float32:
            raise ValueError("kt-amx job: topk_weights must be fp32")
        T, K = topk_ids.shape
        experts.reserve(T, K)
        ffi, lib = _lib.kernels()
        self.experts = experts  # keeps the layer (and its packed weights) alive
        self.buffers = (x, topk_ids, topk_weights, y)
        self.y = y
        self._job = ffi.gc(lib.kt_job_create(), lib.kt_job_destroy)
        rc = lib.kt_job_set(self._job, experts._moe, T, K, _lib.address(x), DTYPE_CODES[x.dtype],
                            _lib.address(topk_ids), int(topk_ids.dtype == torch.int64),
                            _lib.address(topk_weights, "float *"), _lib.address(y), experts.threads)
        if rc != 0:
            raise ValueError("kt-amx job: invalid arguments")

    def submit(self) -> None:
        status = _lib.kernels()[1].kt_submit(self._job)
        if status:
            raise status_error(status)

    def wait(self) -> torch.Tensor:
        status = _lib.kernels()[1].kt_wait(self._job)
        if status:
            raise status_error(status)
        return self.y

    def __call__(self) -> torch.Tensor:
        self.submit()
        return self.wait()

    @property
    def address(self) -> int:
        """The ``kt_job *`` to pass as the host function's user data."""
        ffi = _lib.kernels()[0]
        return int(ffi.cast("uintptr_t", self._job))

    @staticmethod
    def host_functions() -> tuple[int, int]:
        """Addresses of ``kt_host_submit`` and ``kt_host_wait`` (``void (*)(void *)``); asking
        for them means host nodes will run the job, so the workers spin longer from now on."""
        _lib.spin_for_graphs()
        ffi, lib = _lib.kernels()
        return (int(ffi.cast("uintptr_t", ffi.addressof(lib, "kt_host_submit"))),
                int(ffi.cast("uintptr_t", ffi.addressof(lib, "kt_host_wait"))))
