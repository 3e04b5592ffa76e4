"""Asynchronous experts forwards: the job protocol of ``ktcore.runtime.host_experts`` (DESIGN §5).

An ``ExpertsJob`` is bound once to fixed contiguous CPU buffers (the static pinned tensors of a
CUDA graph): ``x [T, H]`` and ``y [T, H]`` fp32 or bf16, ``topk_ids [T, K]`` int64 (or int32),
``topk_weights [T, K]`` fp32. ``submit()`` hands it to the pool's dispatcher thread and returns
at once; the dispatcher runs it on the pool (kt-llamafile's own workers, or kt-amx's shared
pool through its blocking parallel-for, see kt_llamafile.pools); ``wait()`` blocks until it is
done and raises its error. For graph capture, ``host_functions()`` gives the addresses of the C
functions ``ktl_host_submit`` / ``ktl_host_wait`` (``void (*)(void *)``, what
``cudaLaunchHostFunc`` calls) and ``address`` the job to pass them. A doorbell's watcher (a thread that only
runs jobs) gets ``doorbell_functions()`` instead: ``ktl_host_run`` runs the job on the watcher
itself (no hop through the dispatcher thread) and ``ktl_host_done`` returns at once. y is
bit-identical to the synchronous forward on the same inputs.
"""

from __future__ import annotations

import torch

from kt_llamafile import _lib, ops
from kt_llamafile.pools import spin_for_graphs

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


class ExpertsJob:
    """One forward of one ``LlamafileExperts`` on fixed buffers; one run of a job in flight at a
    time (``submit`` first waits for the previous run of the same job)."""

    def __init__(self, experts, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 y: torch.Tensor | None = None):
        if experts.slot_of is None:
            raise RuntimeError(f"{type(experts).__name__}: load the weights before making a job")
        experts.check_inputs(x, topk_ids, topk_weights)
        y = torch.empty_like(x) if y is None else y
        for name, t in (("x", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights), ("y", y)):
            if t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(f"kt-llamafile job: {name} must be a contiguous CPU tensor")
        if x.dtype not in DTYPE_CODES or y.dtype not in DTYPE_CODES or y.shape != x.shape:
            raise ValueError("kt-llamafile job: x and y must be fp32 or bf16 [T, H]")
        if topk_weights.dtype != torch.float32:
            raise ValueError("kt-llamafile job: topk_weights must be fp32")
        T, K = topk_ids.shape
        spec = experts.spec
        self.slots = experts.slot_of.to(torch.int32).contiguous()  # [E + 1]
        qtypes = [_lib.QTYPE_IDS[experts.qtypes[n]] for n in ("gate", "up", "down")]
        from kt_llamafile.experts import ACT_CODES

        self.desc = ops.experts_desc(experts.rows["gate"], experts.rows["up"], experts.rows["down"], self.slots,
                                     qtypes, spec.hidden_size, spec.intermediate_size, ACT_CODES[spec.activation])
        ffi, lib = _lib.kernels()
        self.pool = _lib.pool(experts.threads)
        handle = lib.ktl_job_create(self.pool, self.desc, T, K, _lib.ptr(x, "void *"), DTYPE_CODES[x.dtype],
                                    _lib.ptr(topk_ids, "void *"), int(topk_ids.dtype == torch.int64),
                                    _lib.ptr(topk_weights, "float *"), _lib.ptr(y, "void *"), DTYPE_CODES[y.dtype])
        if handle == ffi.NULL:
            raise MemoryError(f"kt-llamafile job: cannot create a job for {T} tokens x top-{K}")
        self.experts = experts  # keeps the layer (its rows and slot map) alive
        self.buffers = (x, topk_ids, topk_weights, y)
        self.y = y
        self._job = ffi.gc(handle, lib.ktl_job_destroy)

    def submit(self) -> None:
        _lib.check(_lib.kernels()[1].ktl_job_submit(self._job), "job submit")

    def wait(self) -> torch.Tensor:
        """Blocks until the last run is done; raises its error (IndexError for ids outside [0, E])."""
        _lib.check(_lib.kernels()[1].ktl_job_wait(self._job), "experts job (topk_ids / buffers)")
        return self.y

    def __call__(self) -> torch.Tensor:
        self.submit()
        return self.wait()

    def run(self) -> torch.Tensor:
        """One run on the calling thread, as a doorbell's watcher runs it (no dispatcher hop);
        raises the run's error as ``wait`` does."""
        _lib.check(_lib.kernels()[1].ktl_job_run(self._job), "experts job (topk_ids / buffers)")
        return self.y

    @property
    def address(self) -> int:
        """The ``ktl_job *`` to pass as the host functions' user data."""
        return int(_lib.kernels()[0].cast("uintptr_t", self._job))

    @staticmethod
    def host_functions() -> tuple[int, int]:
        """Addresses of ``ktl_host_submit`` and ``ktl_host_wait`` (``void (*)(void *)``); asking
        for them means CUDA graphs will run the job, so idle workers spin longer from now on
        (``pools.spin_for_graphs``)."""
        spin_for_graphs()
        ffi, lib = _lib.kernels()
        return (int(ffi.cast("uintptr_t", ffi.addressof(lib, "ktl_host_submit"))),
                int(ffi.cast("uintptr_t", ffi.addressof(lib, "ktl_host_wait"))))

    @staticmethod
    def doorbell_functions() -> tuple[int, int]:
        """Addresses of ``ktl_host_run`` (runs the job on the calling thread) and
        ``ktl_host_done`` (returns at once): the pair for a doorbell's watcher thread (workers
        spin longer from now on, as for ``host_functions``)."""
        spin_for_graphs()
        ffi, lib = _lib.kernels()
        return (int(ffi.cast("uintptr_t", ffi.addressof(lib, "ktl_host_run"))),
                int(ffi.cast("uintptr_t", ffi.addressof(lib, "ktl_host_done"))))
