"""Doorbells: the CPU side of host jobs that a CUDA stream rings through mapped memory.

A CPU-experts layer inside a captured decode step used two CUDA host nodes ("submit" and
"wait", DESIGN §5); each costs a round trip through the driver's callback thread, tens of
microseconds on the GPU host. With a doorbell (``csrc/doorbell.c``) the stream instead writes
a job's code into a page-locked word with a stream memory operation and waits, with another,
for a second word to hold the same code; a watcher thread spinning on the first word runs the
job's submit and wait functions (the job protocol's pair, so kt-llamafile's jobs can ring it
too) and writes the second. ktcore's ``HostExpertsRunner`` rings it where the driver offers
stream memory operations (``ktcore.runtime.stream_memops``) and falls back to host nodes.

``doorbell_for(device_index)`` is the one doorbell of a CUDA device (its requests come from one
stream, one at a time). ``acquire()`` starts the watcher, ``release()`` stops it when no user
is left. ``KT_AMX_DOORBELL_SPIN_US`` (default 5000): how long the watcher spins after a
request before it polls with 20 µs sleeps (1 ms sleeps after a second without requests).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref

import torch

from kt_amx import _lib
from kt_amx.numa import allowed_cpus

logger = logging.getLogger("kt_amx")

#: int32 words between the request and the done word: separate cache lines.
_DONE_OFFSET = 16
_DEFAULT_SPIN_US = 5000

_DOORBELLS: dict[int, "Doorbell"] = {}
_DOORBELLS_LOCK = threading.Lock()


def _destroy(bell, flags: torch.Tensor) -> None:
    """Stops the watcher before the flag words (kept alive by this finaliser) are freed."""
    _lib.kernels()[1].kt_doorbell_destroy(bell)
    del flags


def watcher_cpu() -> int:
    """A CPU for the watcher thread that no pool worker is pinned to, leaving another free one
    for the thread that drives the model; -1 (unpinned) when there is none."""
    lib = _lib.kernels()[1]
    workers = {lib.kt_pool_worker_cpu(i) for i in range(lib.kt_pool_size())}
    free = [c for c in allowed_cpus() if c not in workers]
    return free[-1] if len(free) >= 2 else -1


class Doorbell:
    """Two page-locked int32 words (``req_address``, ``done_address``) and the watcher thread
    answering them; ``add(submit_fn, wait_fn, job_address) -> code`` registers a job."""

    def __init__(self, capacity: int = 4096, pin_memory: bool | None = None):
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.flags = torch.zeros(2 * _DONE_OFFSET, dtype=torch.int32, pin_memory=pin)  # [req, ..., done, ...]
        ffi, lib = _lib.kernels()
        bell = lib.kt_doorbell_create(_lib.address(self.flags, "int32_t *"),
                                      ffi.cast("int32_t *", self.done_address), int(capacity))
        if bell == ffi.NULL:
            raise MemoryError("kt-amx: cannot create a doorbell")
        self._bell = bell
        self._finalizer = weakref.finalize(self, _destroy, bell, self.flags)
        self._users = 0
        self._lock = threading.Lock()

    @property
    def req_address(self) -> int:
        """Host address of the request word (device-mapped: the stream writes job codes here)."""
        return self.flags.data_ptr()

    @property
    def done_address(self) -> int:
        """Host address of the done word (the watcher writes a finished job's code here)."""
        return self.flags.data_ptr() + _DONE_OFFSET * self.flags.element_size()

    def add(self, submit_fn: int, wait_fn: int, job_address: int) -> int:
        """Registers a job (its ``void (*)(void *)`` submit and wait functions and user data);
        returns the code a stream writes into the request word to run it."""
        ffi, lib = _lib.kernels()
        code = lib.kt_doorbell_add(self._bell, ffi.cast("void *", submit_fn), ffi.cast("void *", wait_fn),
                                   ffi.cast("void *", job_address))
        if code < 0:
            raise RuntimeError("kt-amx: the doorbell has no room for another job")
        return code

    def remove(self, code: int) -> None:
        """Forgets a job (call only when no stream can ring its code any more)."""
        _lib.kernels()[1].kt_doorbell_remove(self._bell, int(code))

    def acquire(self) -> None:
        """One more user: starts the watcher thread if it is not running."""
        with self._lock:
            self._users += 1
            if self._users == 1:
                spin = int(os.environ.get("KT_AMX_DOORBELL_SPIN_US", _DEFAULT_SPIN_US))
                cpu = watcher_cpu()
                if _lib.kernels()[1].kt_doorbell_start(self._bell, cpu, spin) != 0:
                    self._users -= 1
                    raise RuntimeError("kt-amx: cannot start the doorbell's watcher thread")
                logger.debug("kt-amx doorbell watcher started (cpu %d, spin %d us)", cpu, spin)

    def release(self) -> None:
        """One user less: the watcher stops with the last one."""
        with self._lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users == 0:
                _lib.kernels()[1].kt_doorbell_stop(self._bell)

    @property
    def running(self) -> bool:
        return bool(_lib.kernels()[1].kt_doorbell_running(self._bell))

    def counts(self) -> tuple[int, int]:
        """``(jobs run, unknown codes answered at once)`` since creation."""
        lib = _lib.kernels()[1]
        return lib.kt_doorbell_count(self._bell, 0), lib.kt_doorbell_count(self._bell, 1)

    def times(self) -> dict[str, float]:
        """Seconds summed over the jobs run since creation: in submit (wait for the pool,
        prepare, wake it), in wait (until the job is done), and ``gap`` from one job's answer
        to the next request when under 5 ms (the stream's own work between two layers:
        copies, kernels and the doorbell's latency both ways), with ``gaps`` such intervals."""
        ffi, lib = _lib.kernels()
        out = ffi.new("int64_t[4]")
        lib.kt_doorbell_times(self._bell, out)
        return {"submit": out[0] * 1e-9, "wait": out[1] * 1e-9, "gap": out[2] * 1e-9, "gaps": int(out[3])}


def doorbell_for(device_index: int) -> Doorbell:
    """The doorbell of CUDA device ``device_index`` (made on first use)."""
    with _DOORBELLS_LOCK:
        bell = _DOORBELLS.get(int(device_index))
        if bell is None:
            bell = _DOORBELLS[int(device_index)] = Doorbell()
        return bell
