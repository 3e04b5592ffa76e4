"""CPU experts driven from GPU tensors through static pinned buffers and CUDA host nodes.

``HostExpertsRunner(experts, max_tokens)`` works with any Experts operator that offers the
job protocol below (kt-amx's and kt-llamafile's do). It owns pinned host buffers (x,
topk_ids, topk_weights, y) sized for ``max_tokens`` and one job per token count;
``submit(x, ids, w)`` enqueues on the current (or given) stream

    D2H copies into the pinned buffers -> host node "submit"

and returns a ``PendingForward`` whose ``finish()`` enqueues

    host node "wait" -> H2D copy of y into a static GPU buffer

so the caller's GPU work in between (shared experts, GPU-owned experts) overlaps the CPU
experts. It works eagerly and under ``torch.cuda.graph`` capture; a replay runs the CPU
experts with no Python.

Where the backend offers a doorbell (``experts.host_doorbell(device)``, kt_amx.doorbell) and
the driver offers stream memory operations (ktcore.runtime.stream_memops), the two host nodes
become memory operations: "submit" writes the job's code into the doorbell's request word, and
"wait" waits for its done word to hold the code, then resets it. The backend's watcher thread
runs the same submit and wait functions; the driver's callback thread, a round trip of tens
of microseconds per host node, is out of the path. ``runner.signal`` says which one is used.

On CUDA, where the probe of ktcore.runtime.mapped_copies passes, the copies are GPU kernels
that store the inputs into the mapped pinned buffers (one launch) and load y from them,
instead of three D2H and one H2D memcpy: ``runner.copies`` says which. With both, the
kernels also ring the doorbell (``in_kernel``): the stage kernel writes the request word after
its stores (``KTCORE_HOST_RING``), the load kernel spins on the done word, reading it through
the mapping, and resets it (``KTCORE_HOST_WAIT``), so a layer has no stream memory operation.

Job protocol (what an Experts operator must offer to run inside a graph):

- ``make_job(x, topk_ids, topk_weights, y) -> job`` binding fixed contiguous CPU buffers
  (x/y fp32 or bf16 ``[T, H]``, ids int64 ``[T, K]``, weights fp32 ``[T, K]``);
- ``job.host_functions() -> (submit_fn, wait_fn)``: addresses of C functions
  ``void f(void *job)`` that hand the job to the backend's workers and return, and that block
  until it is done; ``job.address``: the ``void *`` to pass them;
- ``job.wait()``: raises the error of the last run (host functions cannot raise);
- optionally ``reserve(tokens, top_k)``: sizes the operator's workspace before capture;
- optionally ``host_doorbell(device)``: an object with ``req_address``/``done_address`` (host
  addresses of two page-locked int32 words), ``add(submit_fn, wait_fn, job_address) -> code``,
  ``remove(code)``, ``acquire()``/``release()`` (its watcher thread runs while acquired);
- optionally ``job.doorbell_functions() -> (run_fn, done_fn)``: the pair the doorbell's watcher
  calls instead of the host functions, e.g. a run on the watcher thread itself and a no-op
  (kt-llamafile: no hop through its dispatcher thread).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import weakref

import torch

from ktcore.runtime import cudart as rt
from ktcore.runtime import mapped_copies, stream_memops


#: Live runners by handle: the custom ops below receive the handle (an int), not the runner.
_RUNNERS: weakref.WeakValueDictionary[int, HostExpertsRunner] = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def in_kernel(env: str) -> bool:
    """Whether a doorbell runner with mapped copies signals from its kernels: ``env`` is
    ``KTCORE_HOST_RING`` (the stage kernel writes the request word) or ``KTCORE_HOST_WAIT``
    (the load kernel spins on the done word and resets it), each ``kernel`` (default) or
    ``memop`` (a stream memory operation). Read when the work is enqueued, i.e. at capture."""
    value = os.environ.get(env, "kernel")
    if value not in ("memop", "kernel"):
        raise ValueError(f"{env} must be 'memop' or 'kernel', got {value!r}")
    return value == "kernel"


def supports_host_jobs(experts) -> bool:
    """True for Experts operators that offer the job protocol (module docstring)."""
    return callable(getattr(experts, "make_job", None))


def _release_doorbell(bell, codes: dict[int, int]) -> None:
    if bell is not None:
        for code in codes.values():
            bell.remove(code)
        codes.clear()
        bell.release()


class PendingForward:
    """A submitted forward: ``finish()`` enqueues the wait and the copy back, returns y."""

    def __init__(self, runner: HostExpertsRunner, job, T: int, stream: int, torch_stream=None):
        self.runner, self.job, self.T, self.stream = runner, job, T, stream
        self.torch_stream = torch_stream  # the same stream as a torch object (mapped copies)

    def finish(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Enqueues the wait and the copy of y into ``out`` (contiguous ``[T, H]`` in the
        runner's dtype on its device; default: the static ``y_gpu[:T]``); returns it."""
        r = self.runner
        y = r.y_gpu[:self.T] if out is None else out
        if r.signals_in_kernel("KTCORE_HOST_WAIT"):
            with torch.cuda.stream(self.torch_stream):
                mapped_copies.wait_load(r.mapped["done"], r.codes[self.T], r.mapped["y"], y)
            return y
        if r.doorbell is not None:
            stream_memops.wait_value(self.stream, r.done_word, r.codes[self.T])
            stream_memops.write_value(self.stream, r.done_word, 0)
        else:
            rt.enqueue_host_func(self.job.host_functions()[1], self.job.address, self.stream)
        if r.mapped is not None:
            with torch.cuda.stream(self.torch_stream):
                mapped_copies.load(r.mapped["y"], y)
        else:
            y_pin = r.y_pin[:self.T]
            rt.cudart().memcpy_async(y.data_ptr(), y_pin.data_ptr(), y_pin.numel() * y_pin.element_size(),
                                     self.stream)
        return y


class HostExpertsRunner:
    """Runs a CPU Experts operator from GPU tensors (see the module docstring).

    ``submit(...).finish()`` returns a view of a static GPU output buffer ``y_gpu[:T]``
    (overwritten by the next forward, like any graph output): clone it to keep it. One
    forward of a runner in flight at a time, and none of the operator's eager forwards while
    one is (they may share the operator's workspace).
    """

    def __init__(self, experts, max_tokens: int, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.bfloat16):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError("HostExpertsRunner: dtype must be fp32 or bf16")
        if not supports_host_jobs(experts):
            raise TypeError(f"HostExpertsRunner: {type(experts).__name__} has no make_job() (the job protocol)")
        self.experts = experts
        self.max_tokens = int(max_tokens)
        self.device = torch.device(device if device is not None else "cuda")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        spec = experts.spec
        H, K, T = spec.hidden_size, spec.top_k, self.max_tokens
        self.dtype = dtype
        pin = self.device.type == "cuda"  # device "cpu": plumbing tests with a fake runtime only
        self.x_pin = torch.zeros(T, H, dtype=dtype, pin_memory=pin)
        self.ids_pin = torch.zeros(T, K, dtype=torch.int64, pin_memory=pin)
        self.w_pin = torch.zeros(T, K, dtype=torch.float32, pin_memory=pin)
        self.y_pin = torch.zeros(T, H, dtype=dtype, pin_memory=pin)
        self.y_gpu = torch.zeros(T, H, dtype=dtype, device=self.device)
        if hasattr(experts, "reserve"):
            experts.reserve(T, K)  # workspace sized once, before any capture
        self._jobs: dict[int, object] = {}
        self._pending: PendingForward | None = None  # between the two custom ops
        self.codes: dict[int, int] = {}  # T -> the doorbell code of job(T)
        self.req_word = self.done_word = 0  # device addresses of the doorbell's two words
        self.doorbell, self.signal = self._ring_doorbell()
        self.mapped = None  # name -> device view of a pinned buffer, where kernels do the copies
        ok, why = mapped_copies.available(self.device) if pin else (False, "not a CUDA device")
        if ok:
            self.mapped = {name: mapped_copies.mapped(t) for name, t in
                           (("x", self.x_pin), ("ids", self.ids_pin), ("w", self.w_pin), ("y", self.y_pin))}
            if self.doorbell is not None:
                self.mapped["req"] = mapped_copies.Mapped(self.req_word, torch.int32)
                self.mapped["done"] = mapped_copies.Mapped(self.done_word, torch.int32)
        self.copies = "kernels" if ok else f"memcpy ({why})"
        self._release = weakref.finalize(self, _release_doorbell, self.doorbell, self.codes)
        self.python_calls = 0  # forwards that went through Python (a replay adds none)
        self.handle = next(_HANDLES)
        _RUNNERS[self.handle] = self

    def _ring_doorbell(self):
        """``(doorbell, "doorbell")`` when the backend's doorbell can be rung with stream memory
        operations on this device (its watcher then runs until ``close()``), else
        ``(None, "host nodes (why)")``."""
        get = getattr(self.experts, "host_doorbell", None)
        if get is None or self.device.type != "cuda":
            return None, "host nodes (the backend offers no doorbell)" if get is None else "host nodes"
        ok, why = stream_memops.available(self.device)
        bell = get(self.device) if ok else None
        if bell is None:
            return None, f"host nodes ({why or 'the backend has no doorbell for this device'})"
        self.req_word = stream_memops.device_pointer(bell.req_address)
        self.done_word = stream_memops.device_pointer(bell.done_address)
        bell.acquire()
        return bell, "doorbell"

    def signals_in_kernel(self, env: str) -> bool:
        """Whether this runner's stage or load kernel (``env``: see ``in_kernel``) does the
        doorbell's signalling: only with a doorbell and mapped copies."""
        return self.doorbell is not None and self.mapped is not None and in_kernel(env)

    def close(self) -> None:
        """Releases the doorbell (its watcher stops with its last user); no forward may be in
        flight, nor captured in a graph that is replayed again. Later forwards use host nodes."""
        self._release()
        self.doorbell, self.signal = None, "host nodes (closed)"

    def job(self, T: int):
        """The job bound to the first T rows of the static buffers (made once per T)."""
        job = self._jobs.get(T)
        if job is None:
            job = self.experts.make_job(self.x_pin[:T], self.ids_pin[:T], self.w_pin[:T], self.y_pin[:T])
            self._jobs[T] = job
            if self.doorbell is not None:
                functions = getattr(job, "doorbell_functions", job.host_functions)()
                self.codes[T] = self.doorbell.add(*functions, job.address)
        return job

    def submit(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
               stream: torch.cuda.Stream | int | None = None) -> PendingForward:
        """Enqueues the copies into the pinned buffers and the submit host node."""
        self.python_calls += 1
        T = x.shape[0]
        K = self.experts.spec.top_k
        if T > self.max_tokens or tuple(topk_ids.shape) != (T, K) or topk_weights.shape != topk_ids.shape:
            raise ValueError(f"HostExpertsRunner: got x {tuple(x.shape)}, ids {tuple(topk_ids.shape)}, "
                             f"weights {tuple(topk_weights.shape)} for max {self.max_tokens} tokens of top-{K}")
        for name, t in (("x", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
            if t.device != self.device:
                raise ValueError(f"HostExpertsRunner: {name} is on {t.device}, expected {self.device}")
        if self.device.type == "cuda":
            stream = rt.as_stream(stream)
            handle = int(stream.cuda_stream)
            ctx = torch.cuda.stream(stream)
        else:
            handle, ctx = int(stream or 0), contextlib.nullcontext()
        job = self.job(T)
        ring = self.signals_in_kernel("KTCORE_HOST_RING")
        with ctx:
            if self.mapped is not None:  # the kernel converts while it stores
                srcs = tuple(t.contiguous() for t in (x, topk_ids, topk_weights))
                views = self.mapped["x"], self.mapped["ids"], self.mapped["w"]
                mapped_copies.stage(*srcs, *views, ring=(self.mapped["req"], self.codes[T]) if ring else None)
            else:
                # conversions (when needed) are allocated and run on this stream, so their memory
                # is not reused before the copies below (enqueued on the same stream) have read it
                srcs = (x.to(self.dtype).contiguous(), topk_ids.to(torch.int64).contiguous(),
                        topk_weights.to(torch.float32).contiguous())
        if self.mapped is None:
            for src, dst in zip(srcs, (self.x_pin, self.ids_pin, self.w_pin)):
                rt.cudart().memcpy_async(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size(), handle)
        if self.doorbell is not None:
            if not ring:
                stream_memops.write_value(handle, self.req_word, self.codes[T])
        else:
            rt.enqueue_host_func(job.host_functions()[0], job.address, handle)
        return PendingForward(self, job, T, handle, stream if self.device.type == "cuda" else None)

    def check_status(self) -> None:
        """Raises the error of the last finished forward of each token count, if any (host
        nodes cannot raise: e.g. ``topk_ids`` out of range leave y undefined). Call after the
        stream (or graph replay) is synchronised; it does not block on a finished job."""
        for job in self._jobs.values():
            job.wait()

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                stream: torch.cuda.Stream | int | None = None) -> torch.Tensor:
        """submit + wait + copy back; returns ``y_gpu[:T]`` (see the class docstring)."""
        return self.submit(x, topk_ids, topk_weights, stream).finish()


# ------------------------------------------------------------------------------- custom ops
# ``submit`` and ``finish`` as operators, so that ``torch.compile(fullgraph=True)`` traces a
# decode step with CPU experts in it: submit returns an empty "ticket" tensor that finish
# takes, which orders the two for the compiler; finish returns y as a new tensor. finish also
# takes the GPU work meant to overlap the CPU (``after``: shared experts, GPU-owned experts),
# so that the compiler schedules that work before the wait, not after it.


@torch.library.custom_op("ktcore::host_experts_submit", mutates_args=())
def host_experts_submit(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                        runner: int) -> torch.Tensor:
    r = _RUNNERS[runner]
    r._pending = r.submit(x, topk_ids, topk_weights)
    return x.new_empty(0)


@host_experts_submit.register_fake
def _submit_fake(x, topk_ids, topk_weights, runner):
    return x.new_empty(0)


@torch.library.custom_op("ktcore::host_experts_finish", mutates_args=())
def host_experts_finish(ticket: torch.Tensor, x: torch.Tensor, runner: int, after: list[torch.Tensor]) -> torch.Tensor:
    """y [T, H] in x's dtype for the forward ``ticket`` stands for (x gives the shape). ``after``
    is not read: its tensors are made to be computed before the wait."""
    r = _RUNNERS[runner]
    pending, r._pending = r._pending, None
    if pending is None:
        raise RuntimeError("host_experts_finish without a submitted forward")
    y = pending.finish(torch.empty(x.shape, dtype=r.dtype, device=r.device))  # copied straight into a new tensor
    return y if y.dtype == x.dtype else y.to(x.dtype)


@host_experts_finish.register_fake
def _finish_fake(ticket, x, runner, after):
    return torch.empty_like(x)
