"""A host-experts forward's inputs and output moved by GPU kernels through mapped page-locked
memory, instead of copy-engine memcpys.

Profiled on the GPU host (12-layer Qwen3-30B-A3B shape, session 5), every CPU-experts layer
spent ~10 µs on the three device-to-host copies of x, topk_ids and topk_weights, and ~9 µs on
the host-to-device copy of y plus the wait before the next kernel could start after it. Page-
locked memory is mapped into the GPU's address space (unified addressing), so a kernel can
store the inputs straight into the pinned buffers (one launch for all three) and load y from
them (loads marked volatile, ``.cv``, so no cache holds an older y); its stores and loads
cross PCIe like the copies' but without the copy engine's hand-offs.

Ordering: the doorbell's request is a stream memory write with a memory barrier, so the
kernel's stores are visible to the CPU before the request; a host node runs after the kernel
has completed. The output is loaded only after the stream's wait for the done word (or the
wait host node), which the CPU writes after y.

With a doorbell, the kernels can do its signalling themselves (``ktcore.runtime.host_experts.
in_kernel``): ``stage(..., ring=(req, code))`` writes the request word after its stores, a
barrier and a system-wide fence; ``wait_load`` spins on the done word (volatile loads through
the mapping), then loads y at addresses computed from the word's value (so no load of y is
issued before the word holds the code) and resets the word.

``available(device)`` probes once per device (eagerly and in a captured graph) that the kernels
move exact values. ``KTCORE_HOST_COPIES``: ``auto`` (default: kernels where the probe passes),
``memcpy`` (never).
"""

from __future__ import annotations

import functools

import torch

COPIES_ENV = "KTCORE_HOST_COPIES"
_BLOCK = 1024


@functools.lru_cache(maxsize=1)
def _kernels():
    """(stage, load, wait_load) Triton kernels, compiled on first use (Triton imported lazily)."""
    import triton
    import triton.language as tl

    @triton.jit
    def stage(x_ptr, ids_ptr, w_ptr, x_out, ids_out, w_out, n_x, n_pairs, req_ptr, code,
              BLOCK: tl.constexpr, RING: tl.constexpr):
        """x [n_x] elements over the programs; ids and w [n_pairs] (program 0); each converted
        to its buffer's type. ``RING`` (one program): then, every thread's stores done and a
        system-wide fence, ``code`` into the doorbell's request word."""
        for start in range(tl.program_id(0) * BLOCK, n_x, tl.num_programs(0) * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < n_x)
            tl.store(x_out + offs, x.to(x_out.dtype.element_ty), mask=offs < n_x)
        if tl.program_id(0) == 0:
            for p0 in range(0, n_pairs, BLOCK):
                p = p0 + tl.arange(0, BLOCK)
                ids = tl.load(ids_ptr + p, mask=p < n_pairs)
                tl.store(ids_out + p, ids.to(ids_out.dtype.element_ty), mask=p < n_pairs)
                w = tl.load(w_ptr + p, mask=p < n_pairs)
                tl.store(w_out + p, w.to(w_out.dtype.element_ty), mask=p < n_pairs)
        if RING:
            tl.debug_barrier()
            one = tl.arange(0, 1)
            fenced = tl.inline_asm_elementwise("fence.sc.sys;\n mov.b32 $0, $1;", "=r,r", [one * 0 + code],
                                               dtype=tl.int32, is_pure=False, pack=1)
            tl.store(req_ptr + one, fenced)

    @triton.jit
    def load(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n, cache_modifier=".cv"), mask=offs < n)

    @triton.jit
    def wait_load(done_ptr, code, src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        """One program: spins until the done word holds ``code``, loads y, resets the word."""
        seen = tl.load(done_ptr, volatile=True)
        while seen != code:
            seen = tl.load(done_ptr, volatile=True)
        after = seen - code  # 0: y's addresses depend on the word, so no load of y is issued earlier
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            y = tl.load(src_ptr + after + offs, mask=offs < n, cache_modifier=".cv")
            tl.store(dst_ptr + offs, y, mask=offs < n)
        tl.store(done_ptr, 0)

    return stage, load, wait_load


class Mapped:
    """A device address of page-locked memory as a Triton pointer argument (data_ptr, dtype)."""

    def __init__(self, address: int, dtype: torch.dtype):
        self.address, self.dtype = address, dtype

    def data_ptr(self) -> int:
        return self.address


def mapped(t: torch.Tensor) -> Mapped:
    """The device view of a page-locked CPU tensor's memory."""
    from ktcore.runtime.stream_memops import device_pointer

    return Mapped(device_pointer(t.data_ptr()), t.dtype)


def stage(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, x_pin: Mapped, ids_pin: Mapped,
          w_pin: Mapped, ring: tuple[Mapped, int] | None = None) -> None:
    """Enqueues on the current stream: x, ids, w (contiguous CUDA tensors; ids int32 or int64,
    x and w floating) into the pinned buffers' first elements, converted to their dtypes.
    ``ring`` ``(req, code)``: then the kernel itself (one program) writes ``code`` into the
    doorbell's request word (int32, page-locked and mapped) once its stores are visible to the
    CPU, instead of a stream memory operation (``KTCORE_HOST_RING=kernel``)."""
    n_x = x.numel()
    req, code = ring if ring is not None else (x_pin, 0)  # without RING, req is never touched
    programs = 1 if ring is not None else max(1, -(-n_x // _BLOCK))
    _kernels()[0][(programs,)](x, ids, w, x_pin, ids_pin, w_pin, n_x, ids.numel(), req, int(code),
                               BLOCK=_BLOCK, RING=ring is not None)


def load(y_pin: Mapped, out: torch.Tensor) -> None:
    """Enqueues on the current stream: the first ``out.numel()`` elements of the pinned buffer
    into ``out`` (contiguous, its dtype)."""
    n = out.numel()
    _kernels()[1][(max(1, -(-n // _BLOCK)),)](y_pin, out, n, BLOCK=_BLOCK)


def wait_load(done: Mapped, code: int, y_pin: Mapped, out: torch.Tensor) -> None:
    """Enqueues on the current stream one kernel that waits until the doorbell's done word
    (int32, page-locked and mapped) holds ``code``, loads y as ``load`` does, and sets the word
    back to 0: the stream's wait, reset and load in one launch (``KTCORE_HOST_WAIT=kernel``)."""
    _kernels()[2][(1,)](done, int(code), y_pin, out, out.numel(), BLOCK=_BLOCK)


@functools.lru_cache(maxsize=None)
def _probe(device_index: int) -> str:
    """'' when the kernels move exact values through page-locked memory on this device, eagerly
    and captured in a graph; else why not."""
    try:
        with torch.cuda.device(device_index):
            dev = torch.device("cuda", device_index)
            x = torch.randn(3, 2048, device=dev).to(torch.bfloat16)
            ids = torch.randint(0, 1 << 40, (3, 8), device=dev)
            w = torch.rand(3, 8, device=dev)
            pins = [torch.zeros(t.shape, dtype=t.dtype, pin_memory=True) for t in (x, ids, w, x)]
            views = [mapped(p) for p in pins]
            pins[3].copy_(x.cpu())
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                got = torch.empty_like(x)
                graph = torch.cuda.CUDAGraph()
                for replay in (False, True):
                    if replay:
                        for p in pins[:3]:
                            p.zero_()
                        got.zero_()
                        with torch.cuda.graph(graph, stream=side):
                            stage(x, ids, w, *views[:3])
                            load(views[3], got)
                        graph.replay()
                    else:
                        stage(x, ids, w, *views[:3])
                        load(views[3], got)
                    side.synchronize()
                    moved = all(torch.equal(p, t.cpu()) for p, t in zip(pins[:3], (x, ids, w)))
                    if not moved or not torch.equal(got, x):
                        return "the kernels did not move exact values" + (" in a graph" if replay else "")
    except Exception as exc:  # noqa: BLE001 - any failure (Triton, driver) means: use memcpys
        return f"{type(exc).__name__}: {exc}"
    return ""


def available(device: torch.device) -> tuple[bool, str]:
    """``(True, "")`` when runners on ``device`` may move their data with the kernels, else
    ``(False, why)`` (the setting of KTCORE_HOST_COPIES, no CUDA, or the probe's finding)."""
    from ktcore.runtime.stream_memops import probed_setting

    return probed_setting(COPIES_ENV, "memcpy", device, _probe,
                          "mapped copies unavailable on cuda:%d (%s): CPU experts use memcpys")
