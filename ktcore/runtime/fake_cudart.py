"""A stand-in for the CUDA runtime, for testing host-node plumbing on hosts without a GPU.

``FakeCudart`` has ``cudart()``'s two methods and runs each enqueued operation at once on
the calling thread: copies with ``memmove`` and host functions called through their C
addresses with their user data, as the CUDA runtime would run them in stream order. Use it
with ``monkeypatch.setattr(ktcore.runtime.cudart, "cudart", lambda: fake)`` and runners whose
device is ``"cpu"``.
"""

from __future__ import annotations

import ctypes

_HOST_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class FakeCudart:
    def __init__(self):
        self.log: list[tuple[str, int]] = []  # ("copy", nbytes) and ("host", function address)

    def launch_host_func(self, stream: int, fn: int, user_data: int) -> None:
        self.log.append(("host", fn))
        _HOST_FN(fn)(user_data)

    def memcpy_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.log.append(("copy", nbytes))
        ctypes.memmove(dst, src, nbytes)
