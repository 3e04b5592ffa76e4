"""The CUDA runtime calls that put CPU work inside a CUDA graph (DESIGN §5).

``enqueue_host_func(fn, user_data, stream)`` puts a C function ``void fn(void *)`` on a torch
CUDA stream with ``cudaLaunchHostFunc``; under ``torch.cuda.graph`` capture it becomes a host
node, so a replay calls it with no Python at all. ``cudart().memcpy_async`` copies between
pinned host memory and the GPU with plain ``cudaMemcpyAsync`` (not torch copies, so torch's
pinned-memory event bookkeeping never runs during capture).

libcudart is found lazily (never at import): ``KTCORE_CUDART`` (a path), else the copy
already mapped into this process by torch (``/proc/self/maps``), else torch's ``lib`` dir,
``site-packages/nvidia/*/lib`` (the ``nvidia-cuda-runtime`` wheels), ``CUDA_HOME``/``CUDA_PATH``
and ``ctypes.util.find_library("cudart")``.
"""

from __future__ import annotations

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
_HOST_REGISTER_DEFAULT = 0
_HOST_REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly: pages the process may not write (mmap'd files)


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
    env = os.environ.get("KTCORE_CUDART")
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
    """The few libcudart functions ktcore uses, with their signatures and error checks."""

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
        lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        lib.cudaHostRegister.restype = ctypes.c_int
        lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
        lib.cudaHostUnregister.restype = ctypes.c_int

    def check(self, err: int, what: str) -> None:
        if err != 0:
            text = self.lib.cudaGetErrorString(err)
            raise CudaCallError(f"{what} failed: cudaError_t {err} "
                                f"({text.decode() if text else 'unknown'}) [{self.path}]")

    def launch_host_func(self, stream: int, fn: int, user_data: int) -> None:
        self.check(self.lib.cudaLaunchHostFunc(ctypes.c_void_p(stream), ctypes.c_void_p(fn),
                                               ctypes.c_void_p(user_data)), "cudaLaunchHostFunc")

    def memcpy_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        if nbytes:
            self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), nbytes,
                                                _CUDA_MEMCPY_DEFAULT, ctypes.c_void_p(stream)),
                       "cudaMemcpyAsync")

    def _cleared(self, err: int) -> int:
        """An error code the caller handles itself: the runtime's sticky last error is reset."""
        if err:
            self.lib.cudaGetLastError()
        return err

    def host_register(self, ptr: int, nbytes: int, flags: int) -> int:
        """``cudaHostRegister``; returns the error code (0: page-locked)."""
        return self._cleared(self.lib.cudaHostRegister(ctypes.c_void_p(ptr), nbytes, flags))

    def host_unregister(self, ptr: int) -> int:
        return self._cleared(self.lib.cudaHostUnregister(ctypes.c_void_p(ptr)))


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
        "cannot find libcudart (the CUDA runtime) for CUDA-graph host nodes "
        f"({where}). Searched: KTCORE_CUDART, libraries mapped in this process, torch's lib dir, "
        "site-packages/nvidia/*/lib (nvidia-cuda-runtime), CUDA_HOME/lib64 and the linker path. "
        "Install a CUDA build of torch or set KTCORE_CUDART=/path/to/libcudart.so")


@functools.lru_cache(maxsize=1)
def cudart() -> Cudart:
    """The process's libcudart, loaded on first use (after torch has initialised CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.init()  # maps torch's libcudart first, so we share its runtime
    return load_cudart()


def as_stream(stream: torch.cuda.Stream | int | None) -> torch.cuda.Stream:
    if stream is None:
        return torch.cuda.current_stream()
    return torch.cuda.ExternalStream(stream) if isinstance(stream, int) else stream


def stream_handle(stream: torch.cuda.Stream | int | None) -> int:
    if isinstance(stream, int):
        return stream
    return int(as_stream(stream).cuda_stream)


# ------------------------------------------------------------------------------- host nodes


def enqueue_host_func(fn: int, user_data: int, stream: torch.cuda.Stream | int | None = None) -> None:
    """Enqueues the C function at address ``fn`` (``void (*)(void *)``) with ``user_data`` on
    ``stream`` (default: current): it runs on a CUDA runtime thread once the work before it on
    the stream is done, and the stream does not go past it until it returns."""
    cudart().launch_host_func(stream_handle(stream), fn, user_data)


# ------------------------------------------------------------------------ page-locked memory


def host_register(tensor: torch.Tensor) -> bool:
    """Page-locks a contiguous host tensor's bytes in place (``cudaHostRegister``, read-only
    pages too), so copies from it to a GPU are asynchronous DMA. False where it cannot (no
    CUDA, a read-only mapping the driver refuses, the locked-memory limit, already
    registered): then copy through a pinned staging buffer. Undo with ``host_unregister_ptr``
    before the memory is freed."""
    if not torch.cuda.is_available() or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return False
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return False
    try:
        lib = cudart()
    except CudartNotFound:
        return False
    for flags in (_HOST_REGISTER_DEFAULT, _HOST_REGISTER_READ_ONLY):
        if lib.host_register(tensor.data_ptr(), nbytes, flags) == 0:
            return True
    return False


def host_unregister_ptr(ptr: int) -> None:
    """Undoes ``host_register`` of the tensor whose bytes start at ``ptr`` (errors ignored)."""
    try:
        cudart().host_unregister(ptr)
    except (CudartNotFound, OSError):
        pass
