"""``StreamPool``: the copies of streaming prefill (ktcore.runtime.streamed_experts) on one
target device, shared by every streamed part of a model.

Two staging buffers on the device (flat bytes, allocated once, grown to the largest chunk)
take turns: chunk i+1 is copied on a separate copy stream while chunk i is rebuilt and
computed on the current stream. Events order the two: ``ready[b]`` (copy into b done, on the
copy stream) before the rebuild reads b, ``free[b]`` (rebuild of b done, on the compute
stream) before the next copy overwrites b.

Host tensors are page-locked in place with cudaHostRegister, so the copies are asynchronous
DMA; where registering fails (read-only mmap'd GGUF pages, a locked-memory limit) they go
through two pinned host staging buffers instead. Across layers: the pool learns which part
runs after which, and when a part starts its last chunk it starts copying the first chunk of
the next one, so that copy overlaps this layer's compute and the attention in between.

On a CPU target (tests) the same code runs with plain synchronous copies.
"""

from __future__ import annotations

import logging
import weakref

import torch

log = logging.getLogger(__name__)

_ALIGN = 256


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _unregister(pointers: list[int]) -> None:
    from ktcore.runtime.cudart import host_unregister_ptr

    for ptr in pointers:
        host_unregister_ptr(ptr)


class _HostSource:
    """One host tensor to copy from: registered (pinned in place) or staged."""

    def __init__(self, tensor: torch.Tensor, pinned: bool):
        self.tensor = tensor
        self.pinned = pinned


class StreamPool:
    """Copy buffers, streams and events of streaming on ``device`` (see the module docstring)."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.buffers: list[torch.Tensor | None] = [None, None]  # uint8 on the device
        self.staging: list[torch.Tensor | None] = [None, None]  # pinned uint8 on the host (fallback)
        self.turn = 0  # the buffer the next copy fills
        self.sources: dict[int, dict[str, _HostSource]] = {}  # id(streamed part) -> its host tensors
        self.successor: dict[int, object] = {}  # id(streamed part) -> the part that ran after it
        self.last = None  # the part that ran last
        self.pending: tuple[object, tuple[int, int], torch.dtype, int] | None = None  # prefetched chunk
        self._registered: list[int] = []
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.ready = [torch.cuda.Event(), torch.cuda.Event()]
            self.free = [torch.cuda.Event(), torch.cuda.Event()]
            weakref.finalize(self, _unregister, self._registered)

    # --------------------------------------------------------------------------- host side

    def _sources(self, streamed) -> dict[str, _HostSource]:
        """The part's host tensors, page-locked in place where possible (done once)."""
        key = id(streamed)
        if key not in self.sources:
            from ktcore.runtime.cudart import host_register

            out = {}
            for name, t in streamed.tensors.items():
                pinned = not self.cuda or t.is_pinned()
                if not pinned and t.numel():
                    pinned = host_register(t)
                    if pinned:
                        self._registered.append(t.data_ptr())
                out[name] = _HostSource(t, pinned)
            staged = [n for n, s in out.items() if not s.pinned]
            if staged:
                log.debug("streaming %s: %s copied through pinned staging (cannot be page-locked in place)",
                          type(streamed.part).__name__, staged)
            self.sources[key] = out
        return self.sources[key]

    def _layout(self, streamed, n: int) -> tuple[dict[str, tuple[int, int]], int]:
        """Byte offset and length of each key's n rows in a flat buffer, and the total."""
        offsets, total = {}, 0
        for name, t in streamed.tensors.items():
            nbytes = n * (t[0].numel() * t.element_size() if t.shape[0] else 0)
            offsets[name] = (total, nbytes)
            total = _round_up(total + nbytes)
        return offsets, total

    def _reserve(self, parts, dtype: torch.dtype) -> None:
        """Grows the device (and pinned staging) buffers to the largest chunk of ``parts``;
        done before any copy of a run, so no buffer in use is ever replaced."""
        nbytes, staged = 0, False
        for streamed in parts:
            if streamed is not None:
                nbytes = max(nbytes, self._layout(streamed, streamed.max_slots(dtype))[1])
                staged = staged or any(not s.pinned for s in self._sources(streamed).values())
        if self.buffers[0] is None or self.buffers[0].numel() < nbytes:
            if self.cuda:
                torch.cuda.current_stream(self.device).synchronize()
                self.copy_stream.synchronize()
            self.pending = None
            with torch.inference_mode(False):  # plain tensors: written in and out of inference mode
                self.buffers = [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
        if staged and (self.staging[0] is None or self.staging[0].numel() < nbytes):
            self.copy_stream.synchronize()
            with torch.inference_mode(False):
                self.staging = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]

    # ------------------------------------------------------------------------------ copies

    def _copy(self, streamed, chunk: tuple[int, int]) -> int:
        """Starts copying the chunk's rows into the next buffer; returns its index."""
        a, b = chunk
        sources = self._sources(streamed)
        layout, _ = self._layout(streamed, b - a)
        turn, self.turn = self.turn, 1 - self.turn
        buf = self.buffers[turn]
        if not self.cuda:
            for name, (off, nbytes) in layout.items():
                buf[off:off + nbytes].copy_(sources[name].tensor[a:b].reshape(-1).view(torch.uint8))
            return turn
        staging = self.staging[turn]
        if staging is not None and any(not s.pinned for s in sources.values()):
            self.ready[turn].synchronize()  # the last copy out of this staging buffer is done
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.free[turn])  # the last rebuild from this buffer is done
            for name, (off, nbytes) in layout.items():
                src = sources[name].tensor[a:b].reshape(-1).view(torch.uint8)
                if not sources[name].pinned:
                    staging[off:off + nbytes].copy_(src)
                    src = staging[off:off + nbytes]
                buf[off:off + nbytes].copy_(src, non_blocking=True)
            self.ready[turn].record(self.copy_stream)
        return turn

    def _views(self, streamed, chunk: tuple[int, int], turn: int) -> dict[str, torch.Tensor]:
        """The chunk's tensors in buffer ``turn``, shaped as the host keys sliced ``[a:b]``."""
        a, b = chunk
        layout, _ = self._layout(streamed, b - a)
        buf = self.buffers[turn]
        views = {}
        for name, (off, nbytes) in layout.items():
            t = streamed.tensors[name]
            views[name] = buf[off:off + nbytes].view(t.dtype).view(b - a, *t.shape[1:])
        return views

    def _start(self, streamed, chunk: tuple[int, int], dtype: torch.dtype) -> int:
        """The buffer holding the chunk: the prefetched one, or a fresh copy."""
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] is streamed and pending[1] == chunk and pending[2] == dtype:
            return pending[3]
        return self._copy(streamed, chunk)

    def _prefetch_next(self, streamed, dtype: torch.dtype) -> None:
        """Starts copying the first chunk of the part that ran after ``streamed`` last time."""
        following = self.successor.get(id(streamed))
        if following is None:
            return
        plan = following.chunks(dtype)
        if plan:
            self.pending = (following, plan[0], dtype, self._copy(following, plan[0]))

    # ----------------------------------------------------------------------------- running

    def run(self, streamed, chunks: list[tuple[int, int]], dtype: torch.dtype, compute) -> None:
        """For each chunk ``[a, b)`` of ``streamed``'s slots: copy, rebuild with the part's
        ``stream_dense`` in ``dtype``, and ``compute(chunk, (gate, up, down))``; copies run one
        chunk ahead of the compute."""
        if self.last is not None and self.last is not streamed:
            self.successor[id(self.last)] = streamed
        self.last = streamed
        if not chunks:
            self.pending = None
            return
        self._reserve((streamed, self.successor.get(id(streamed))), dtype)
        turn = self._start(streamed, chunks[0], dtype)
        for i, chunk in enumerate(chunks):
            after = None
            if i + 1 < len(chunks):
                after = self._copy(streamed, chunks[i + 1])
            else:
                self._prefetch_next(streamed, dtype)
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(self.ready[turn])
            dense = streamed.part.stream_dense(self._views(streamed, chunk, turn), dtype)
            if self.cuda:
                self.free[turn].record(torch.cuda.current_stream(self.device))
            compute(chunk, dense)
            turn = after
