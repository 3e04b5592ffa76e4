"""CPU experts inside a CUDA graph (DESIGN §5): kt-amx's C host functions on a CUDA stream.

``enqueue_submit(job, stream)`` / ``enqueue_wait(job, stream)`` put the C functions
``kt_host_submit`` / ``kt_host_wait`` of kt-amx's library on a torch CUDA stream with
``cudaLaunchHostFunc`` (user data: the job's ``kt_job *``). Under ``torch.cuda.graph`` capture
they become host nodes, so a replay runs the CPU experts with no Python at all.

``GraphExpertsRunner(experts, max_tokens)`` owns static pinned host buffers (x, topk_ids,
topk_weights, y) sized for ``max_tokens`` and one job per token count; its
``forward_on_stream(x, ids, w)`` enqueues, on the current (or given) stream:

    D2H copies into the pinned buffers -> host node "submit" -> [caller's GPU work]
    -> host node "wait" -> H2D copy of y into a static GPU buffer

It works eagerly and under capture. ``submit_on_stream(x, ids, w)`` stops after the submit
node and returns a ``PendingForward`` whose ``finish()`` enqueues the wait and the copy back
(returning y), so the caller's GPU work between the two overlaps the CPU experts.

libcudart is found lazily (never at import): ``KT_AMX_CUDART`` (a path), else the copy
already mapped into this process by torch (``/proc/self/maps``), else torch's ``lib`` dir,
``site-packages/nvidia/*/lib`` (the ``nvidia-cuda-runtime`` wheels), ``CUDA_HOME``/``CUDA_PATH``
and ``ctypes.util.find_library("cudart")``. The copies are plain ``cudaMemcpyAsync`` calls
(pinned <-> device), not torch copies, so torch's pinned-memory event bookkeeping never runs
during capture.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import glob
import os
import site
import sys
from pathlib import Path

import torch

from ktcore.errors import BackendError

_CUDA_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault (unified addressing)


class CudartNotFound(BackendError):
    """libcudart could not be found or loaded."""


class CudaCallError(RuntimeError):
    """A CUDA runtime call returned an error."""


# ------------------------------------------------------------------------------- libcudart


def _loaded_cudart() -> list[str]:
    """libcudart copies already mapped into this process (torch's own, once CUDA is initialised)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart.so" in line}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


def _site_dirs() -> list[str]:
    dirs = list(sys.path)
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # virtualenv's old site.py
        pass
    user = getattr(site, "getusersitepackages", lambda: None)()
    if user:
        dirs.append(user)
    seen, out = set(), []
    for d in dirs:
        if d and d not in seen and os.path.isdir(d):
            seen.add(d)
            out.append(d)
    return out


def cudart_candidates() -> list[str]:
    """Paths (or sonames) to try, best first; see the module docstring."""
    out: list[str] = []
    env = os.environ.get("KT_AMX_CUDART")
    if env:
        return [env]
    out += _loaded_cudart()
    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    out += sorted(glob.glob(str(torch_lib / "libcudart.so*")), reverse=True)
    for d in _site_dirs():
        for pattern in ("nvidia/cuda_runtime/lib/libcudart.so*", "nvidia/cu*/lib/libcudart.so*"):
            out += sorted(glob.glob(os.path.join(d, pattern)), reverse=True)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            out += sorted(glob.glob(os.path.join(root, "lib64", "libcudart.so*")), reverse=True)
    found = ctypes.util.find_library("cudart")
    if found:
        out.append(found)
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


class Cudart:
    """The few libcudart functions kt-amx uses, with their signatures and error checks."""

    def __init__(self, path: str):
        self.path = path
        lib = ctypes.CDLL(path)
        self.lib = lib
        lib.cudaLaunchHostFunc.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.cudaLaunchHostFunc.restype = ctypes.c_int
        lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                        ctypes.c_void_p]
        lib.cudaMemcpyAsync.restype = ctypes.c_int
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        lib.cudaGetErrorString.restype = ctypes.c_char_p

    def check(self, err: int, what: str) -> None:
        if err != 0:
            text = self.lib.cudaGetErrorString(err)
            raise CudaCallError(f"kt-amx: {what} failed: cudaError_t {err} "
                                f"({text.decode() if text else 'unknown'}) [{self.path}]")

    def launch_host_func(self, stream: int, fn: int, user_data: int) -> None:
        self.check(self.lib.cudaLaunchHostFunc(ctypes.c_void_p(stream), ctypes.c_void_p(fn),
                                               ctypes.c_void_p(user_data)), "cudaLaunchHostFunc")

    def memcpy_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        if nbytes:
            self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), nbytes,
                                                _CUDA_MEMCPY_DEFAULT, ctypes.c_void_p(stream)),
                       "cudaMemcpyAsync")


def load_cudart(candidates: list[str] | None = None) -> Cudart:
    """Loads the first candidate that has ``cudaLaunchHostFunc``; CudartNotFound if none."""
    tried = []
    for path in cudart_candidates() if candidates is None else candidates:
        try:
            cudart = Cudart(path)
        except (OSError, AttributeError) as exc:
            tried.append(f"{path}: {exc}")
            continue
        return cudart
    where = "; ".join(tried) if tried else "no candidate found"
    raise CudartNotFound(
        "kt-amx: cannot find libcudart (the CUDA runtime) for CUDA-graph host nodes "
        f"({where}). Searched: KT_AMX_CUDART, libraries mapped in this process, torch's lib dir, "
        "site-packages/nvidia/*/lib (nvidia-cuda-runtime), CUDA_HOME/lib64 and the linker path. "
        "Install a CUDA build of torch or set KT_AMX_CUDART=/path/to/libcudart.so")


@functools.lru_cache(maxsize=1)
def cudart() -> Cudart:
    """The process's libcudart, loaded on first use (after torch has initialised CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.init()  # maps torch's libcudart first, so we share its runtime
    return load_cudart()


def _as_stream(stream: torch.cuda.Stream | int | None) -> torch.cuda.Stream:
    if stream is None:
        return torch.cuda.current_stream()
    return torch.cuda.ExternalStream(stream) if isinstance(stream, int) else stream


def _stream_handle(stream: torch.cuda.Stream | int | None) -> int:
    if isinstance(stream, int):
        return stream
    return int(_as_stream(stream).cuda_stream)


# ------------------------------------------------------------------------------- host nodes


def enqueue_submit(job, stream: torch.cuda.Stream | int | None = None) -> None:
    """Enqueues ``kt_host_submit(job)`` on ``stream`` (default: current): runs once the work
    before it on the stream is done, hands the job to the pool and returns."""
    submit_fn, _ = job.host_functions()
    cudart().launch_host_func(_stream_handle(stream), submit_fn, job.address)


def enqueue_wait(job, stream: torch.cuda.Stream | int | None = None) -> None:
    """Enqueues ``kt_host_wait(job)``: the stream does not go past it until the job is done."""
    _, wait_fn = job.host_functions()
    cudart().launch_host_func(_stream_handle(stream), wait_fn, job.address)


# ------------------------------------------------------------------------------- runner


class PendingForward:
    """A submitted forward: ``finish()`` enqueues the wait and the copy back, returns y."""

    def __init__(self, runner: GraphExpertsRunner, job, T: int, stream: int):
        self.runner, self.job, self.T, self.stream = runner, job, T, stream

    def finish(self) -> torch.Tensor:
        r = self.runner
        enqueue_wait(self.job, self.stream)
        y_pin = r.y_pin[:self.T]
        y = r.y_gpu[:self.T]
        cudart().memcpy_async(y.data_ptr(), y_pin.data_ptr(), y_pin.numel() * y_pin.element_size(), self.stream)
        return y


class GraphExpertsRunner:
    """Runs an ``AmxExperts`` from GPU tensors through static pinned buffers and host nodes.

    ``forward_on_stream(x_gpu, ids_gpu, w_gpu)`` returns a view of a static GPU output buffer
    ``y_gpu[:T]`` (overwritten by the next forward, like any graph output): clone it to keep
    it. One forward of a runner in flight at a time, and none of the layer's eager forwards
    while one is (they share the layer's workspace).
    """

    def __init__(self, experts, max_tokens: int, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.bfloat16):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError("GraphExpertsRunner: dtype must be fp32 or bf16")
        if experts._moe is None:
            raise RuntimeError("GraphExpertsRunner: load the experts' weights first")
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
        experts.reserve(T, K)  # workspace sized once, before any capture
        self._jobs: dict[int, object] = {}
        self.python_calls = 0  # forwards that went through Python (a replay adds none)

    def job(self, T: int):
        """The job bound to the first T rows of the static buffers (made once per T)."""
        job = self._jobs.get(T)
        if job is None:
            job = self.experts.make_job(self.x_pin[:T], self.ids_pin[:T], self.w_pin[:T], self.y_pin[:T])
            self._jobs[T] = job
        return job

    def submit_on_stream(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                         stream: torch.cuda.Stream | int | None = None) -> PendingForward:
        """Enqueues the copies into the pinned buffers and the submit host node."""
        self.python_calls += 1
        T = x.shape[0]
        if T > self.max_tokens or topk_ids.shape != (T, self.experts.spec.top_k) or topk_weights.shape != topk_ids.shape:
            raise ValueError(f"GraphExpertsRunner: got x {tuple(x.shape)}, ids {tuple(topk_ids.shape)}, "
                             f"weights {tuple(topk_weights.shape)} for max {self.max_tokens} tokens of "
                             f"top-{self.experts.spec.top_k}")
        for name, t in (("x", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
            if t.device != self.device:
                raise ValueError(f"GraphExpertsRunner: {name} is on {t.device}, expected {self.device}")
        if self.device.type == "cuda":
            stream = _as_stream(stream)
            handle = int(stream.cuda_stream)
            ctx = torch.cuda.stream(stream)
        else:
            handle, ctx = int(stream or 0), contextlib.nullcontext()
        with ctx:
            # conversions (when needed) are allocated and run on this stream, so their memory
            # is not reused before the copies below (enqueued on the same stream) have read it
            srcs = (x.to(self.dtype).contiguous(), topk_ids.to(torch.int64).contiguous(),
                    topk_weights.to(torch.float32).contiguous())
        job = self.job(T)
        rt = cudart()
        for src, dst in zip(srcs, (self.x_pin, self.ids_pin, self.w_pin)):
            rt.memcpy_async(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size(), handle)
        enqueue_submit(job, handle)
        return PendingForward(self, job, T, handle)

    def check_status(self) -> None:
        """Raises the error of the last finished forward of each token count, if any (host
        nodes cannot raise: e.g. ``topk_ids`` out of range leave y undefined). Call after the
        stream (or graph replay) is synchronised; it does not block on a finished job."""
        for job in self._jobs.values():
            job.wait()

    def forward_on_stream(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                          stream: torch.cuda.Stream | int | None = None) -> torch.Tensor:
        """submit + wait + copy back; returns ``y_gpu[:T]`` (see the class docstring)."""
        return self.submit_on_stream(x, topk_ids, topk_weights, stream).finish()
