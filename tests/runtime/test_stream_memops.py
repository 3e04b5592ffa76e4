"""Stream memory operations (ktcore.runtime.stream_memops): the choice between them and host
nodes on any host, and by the same helper between mapped copies and memcpys; on the GPU host,
a stream's write and wait on page-locked memory, eager and captured, answered by a Python
thread standing in for a CPU backend's watcher."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ktcore.runtime import mapped_copies, stream_memops


@pytest.mark.parametrize("available,env,off", [
    (stream_memops.available, "KTCORE_HOST_SIGNAL", "host-nodes"),  # memory operations or host nodes
    (mapped_copies.available, "KTCORE_HOST_COPIES", "memcpy"),  # mapped-copy kernels or memcpys
])
def test_cpu_device_and_setting_choose_the_fallback(available, env, off, monkeypatch):
    """Both probed settings (stream_memops.probed_setting): off on a CPU device, off when set
    so, and a clear error for any other value."""
    assert available(torch.device("cpu")) == (False, "not a CUDA device")
    monkeypatch.setenv(env, off)
    ok, why = available(torch.device("cuda", 0))
    assert not ok and off in why
    monkeypatch.setenv(env, "carrier-pigeon")
    with pytest.raises(ValueError, match=env):
        available(torch.device("cpu"))


@pytest.mark.parametrize("env", ["KTCORE_HOST_RING", "KTCORE_HOST_WAIT"])
def test_signalling_from_kernels_setting(env, monkeypatch):
    """Who rings the doorbell and waits for it (host_experts.in_kernel): the kernels unless
    set to ``memop``, a clear error for any other value."""
    from ktcore.runtime.host_experts import in_kernel

    monkeypatch.delenv(env, raising=False)
    assert in_kernel(env)
    monkeypatch.setenv(env, "memop")
    assert not in_kernel(env)
    monkeypatch.setenv(env, "smoke-signals")
    with pytest.raises(ValueError, match=env):
        in_kernel(env)


def answer(words: torch.Tensor, code: int, stop: threading.Event) -> None:
    """A watcher in Python: when the request word holds ``code``, clear it and write ``code + 1``
    into the done word."""
    while not stop.is_set():
        if int(words[0]) == code:
            words[0] = 0
            words[16] = code + 1
        time.sleep(1e-4)


@pytest.mark.cuda
def test_write_then_wait_round_trip_eager_and_in_a_graph():
    ok, why = stream_memops.available(torch.device("cuda"))
    assert ok, why
    words = torch.zeros(32, dtype=torch.int32, pin_memory=True)
    req = stream_memops.device_pointer(words.data_ptr())
    done = req + 16 * 4
    out = torch.zeros(4, device="cuda")
    stop = threading.Event()
    watcher = threading.Thread(target=answer, args=(words, 5, stop), daemon=True)
    watcher.start()

    def step():
        handle = int(torch.cuda.current_stream().cuda_stream)
        out.add_(1)
        stream_memops.write_value(handle, req, 5)
        stream_memops.wait_value(handle, done, 6)
        stream_memops.write_value(handle, done, 0)
        out.mul_(2)  # runs only after the watcher answered

    try:
        step()
        torch.cuda.synchronize()
        assert out.tolist() == [2.0] * 4 and int(words[16]) == 0
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        out.zero_()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        assert out.tolist() == [14.0] * 4  # ((0 + 1) * 2 + 1) * 2 + 1) * 2
    finally:
        stop.set()
        watcher.join()
