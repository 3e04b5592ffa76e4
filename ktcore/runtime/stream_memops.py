"""CUDA stream memory operations: a stream writes a 32-bit word, or waits for one, in
device-mapped host memory (``cuStreamWriteValue32`` / ``cuStreamWaitValue32`` of the driver
API, captured into CUDA graphs as memory-operation nodes).

``HostExpertsRunner`` rings a CPU backend's doorbell with them instead of two host nodes
(kt_amx.doorbell): a write of the job's code after the input copies, a wait for the done word
to hold it, a write that resets the done word, then the copy of the result. The GPU's front
end does the waiting, so nothing runs on the driver's callback thread.

``available(device)`` probes once per device that the calls exist, work on page-locked
memory and capture into a graph, and says why not where they do not. ``KTCORE_HOST_SIGNAL``:
``auto`` (default: memory operations where available), ``host-nodes`` (never use them).
libcuda is found lazily, as the driver torch already loaded (``libcuda.so.1``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)

_WAIT_VALUE_EQ = 0x1  # CU_STREAM_WAIT_VALUE_EQ
_WRITE_VALUE_DEFAULT = 0x0  # CU_STREAM_WRITE_VALUE_DEFAULT: a memory barrier before the write
SIGNAL_ENV = "KTCORE_HOST_SIGNAL"


class StreamMemopsError(RuntimeError):
    """A driver call of this module failed."""


class Driver:
    """The few libcuda functions used here, with their signatures and error checks."""

    def __init__(self, path: str = "libcuda.so.1"):
        lib = ctypes.CDLL(path)
        self.lib = lib
        self.write32 = self._function(("cuStreamWriteValue32_v2", "cuStreamWriteValue32"),
                                      [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint])
        self.wait32 = self._function(("cuStreamWaitValue32_v2", "cuStreamWaitValue32"),
                                     [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint])
        self.device_pointer = self._function(("cuMemHostGetDevicePointer_v2", "cuMemHostGetDevicePointer"),
                                             [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint])
        lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuGetErrorString.restype = ctypes.c_int

    def _function(self, names: tuple[str, ...], argtypes: list):
        for name in names:
            fn = getattr(self.lib, name, None)
            if fn is not None:
                fn.argtypes, fn.restype = argtypes, ctypes.c_int
                return fn
        raise AttributeError(f"libcuda has none of {', '.join(names)}")

    def check(self, err: int, what: str) -> None:
        if err:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(err, ctypes.byref(text))
            raise StreamMemopsError(f"{what} failed: CUresult {err} ({(text.value or b'unknown').decode()})")


@functools.lru_cache(maxsize=1)
def driver() -> Driver:
    torch.cuda.init()
    return Driver()


def device_pointer(host_address: int) -> int:
    """The device address of page-locked host memory (equal to it under unified addressing)."""
    out = ctypes.c_uint64()
    d = driver()
    d.check(d.device_pointer(ctypes.byref(out), ctypes.c_void_p(host_address), 0), "cuMemHostGetDevicePointer")
    return out.value


def write_value(stream: int, address: int, value: int) -> None:
    """Enqueues on ``stream``: once the work before it is done (and visible), ``*address = value``."""
    d = driver()
    d.check(d.write32(ctypes.c_void_p(stream), address, value, _WRITE_VALUE_DEFAULT), "cuStreamWriteValue32")


def wait_value(stream: int, address: int, value: int) -> None:
    """Enqueues on ``stream``: the work after it waits until ``*address == value``."""
    d = driver()
    d.check(d.wait32(ctypes.c_void_p(stream), address, value, _WAIT_VALUE_EQ), "cuStreamWaitValue32")


@functools.lru_cache(maxsize=None)
def _probe(device_index: int) -> str:
    """'' when memory operations on page-locked memory work on this device, eagerly and
    captured in a graph; else why not."""
    try:
        with torch.cuda.device(device_index):
            words = torch.zeros(32, dtype=torch.int32, pin_memory=True)
            where = device_pointer(words.data_ptr())
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                handle = int(side.cuda_stream)
                write_value(handle, where, 7)
                wait_value(handle, where, 7)
                side.synchronize()
                if int(words[0]) != 7:
                    return "a stream write did not reach page-locked memory"
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=side):
                    handle = int(torch.cuda.current_stream().cuda_stream)
                    write_value(handle, where + 64, 9)
                    wait_value(handle, where + 64, 9)
                graph.replay()
                side.synchronize()
                if int(words[16]) != 9:
                    return "a captured stream write did not reach page-locked memory"
    except (OSError, AttributeError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def probed_setting(env: str, off: str, device: torch.device, probe, unavailable: str) -> tuple[bool, str]:
    """``(True, "")`` when the environment setting ``env`` (``auto``, the default, or ``off``)
    lets ``device`` use a CUDA feature and ``probe(device_index)`` (``''`` = it works) passes;
    else ``(False, why)``. ``unavailable``: the INFO log line (``%d`` index, ``%s`` why)."""
    mode = os.environ.get(env, "auto").strip().lower() or "auto"
    if mode not in ("auto", off):
        raise ValueError(f"{env} must be 'auto' or '{off}', got {mode!r}")
    if mode == off:
        return False, f"{env}={off}"
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "not a CUDA device"
    index = device.index if device.index is not None else torch.cuda.current_device()
    why = probe(index)
    if why:
        logger.info(unavailable, index, why)
    return not why, why


def available(device: torch.device) -> tuple[bool, str]:
    """``(True, "")`` when runners on ``device`` may signal with memory operations, else
    ``(False, why)`` (the setting of KTCORE_HOST_SIGNAL, no CUDA, or the probe's finding)."""
    return probed_setting(SIGNAL_ENV, "host-nodes", device, _probe,
                          "CUDA stream memory operations unavailable on cuda:%d (%s): CPU experts use host nodes")
