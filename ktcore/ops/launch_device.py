"""The device a Triton kernel launches on.

Triton launches on the *current* CUDA device and that device's current stream. ``with
torch.device(...)`` does not change either: it only sets where new tensors go. With a model
spread over several GPUs the current device is often not the tensors' device. The kernel then
went to another GPU's stream, which does not wait for the tensors' own stream: on two H200s,
the router's top-k ids were read before the kernel wrote them, and the CPU experts got
uninitialised memory as expert ids.

``on_device(t)`` makes ``t``'s device current for the launch (``torch.cuda.device``), and also
the default device for new tensors. For CPU tensors (Triton's interpreter) it only sets the
default device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def on_device(t: torch.Tensor) -> Iterator[None]:
    """Launch Triton kernels on ``t``'s device, on its current stream (see the module docstring)."""
    with torch.device(t.device):
        if t.device.type == "cuda":
            with torch.cuda.device(t.device):
                yield
        else:
            yield
