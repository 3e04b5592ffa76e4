"""ktcore.ops.l2_prefetch: the load kernel reads every word of a tensor (a block whose words sum
to the sentinel is the only thing it writes, so the test plants the sentinel in the last,
partial block), the op leaves its tensors as they were and returns a fresh ticket, opcheck,
and torch.compile(fullgraph=True) keeps it between a ticket's producer and consumer. On the
GPU: both methods over odd sizes and unaligned views, inside CUDA graph capture.

Without a CUDA GPU the load kernel runs in Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the L2 prefetch needs triton (pip install triton)")

from tests.ops.triton_modules import import_kernels  # noqa: E402


@pytest.fixture(scope="module")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def kernels(device):
    return import_kernels("ktcore.ops.l2_prefetch", device, "_load_kernel")


@pytest.mark.parametrize("n_words", [1, 63, 64, 65, 200])
def test_load_kernel_reads_up_to_the_last_word(kernels, device, n_words):
    block = 64
    last_block = (n_words - 1) // block * block
    for planted_at in {0, last_block, n_words - 1}:
        words = torch.zeros(n_words, dtype=torch.int32)
        words[planted_at] = kernels.SENTINEL  # the block holding it sums to the sentinel
        sink = torch.full((1,), -1, dtype=torch.int32)
        words, sink = words.to(device), sink.to(device)
        kernels._load_kernel[(triton_cdiv(n_words, block),)](words, sink, n_words, BLOCK=block)
        assert int(sink.item()) == kernels.SENTINEL, planted_at
    words = torch.arange(n_words, dtype=torch.int32, device=device)  # no block sums to it
    sink = torch.full((1,), -1, dtype=torch.int32, device=device)
    kernels._load_kernel[(triton_cdiv(n_words, block),)](words, sink, n_words, BLOCK=block)
    assert int(sink.item()) == -1


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def test_op_changes_nothing_and_returns_a_new_ticket(kernels, device):
    gen = torch.Generator().manual_seed(11)
    tensors = [torch.randn(37, 29, generator=gen).to(device, torch.bfloat16),  # 2146 bytes: not whole words
               torch.randn(5, generator=gen).to(device),
               torch.randn(41, generator=gen).to(device, torch.bfloat16)[1:],  # starts 2 bytes past a word
               torch.randn(6, 8, generator=gen).to(device).t(),  # not contiguous: skipped
               torch.empty(0, device=device)]
    before = [t.clone() for t in tensors]
    ticket = torch.empty(0, device=device)
    out = torch.ops.ktcore.l2_prefetch(ticket, tensors)
    assert out.shape == (0,) and out.device == ticket.device and out is not ticket
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)
    torch.library.opcheck(torch.ops.ktcore.l2_prefetch.default, (ticket, tensors[:2]))


def test_compiled_graph_keeps_the_prefetch_between_producer_and_consumer(kernels, device):
    calls = []

    @torch.library.custom_op("ktcore_test::produce", mutates_args=())
    def produce(x: torch.Tensor) -> torch.Tensor:
        calls.append("produce")
        return x.new_empty(0)

    @produce.register_fake
    def _(x):
        return x.new_empty(0)

    @torch.library.custom_op("ktcore_test::consume", mutates_args=())
    def consume(ticket: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        calls.append("consume")
        return x * 2

    @consume.register_fake
    def _(ticket, x):
        return torch.empty_like(x)

    weights = [torch.randn(16, 8, device=device)]
    real = kernels.prefetch

    def spy(tensors, method="auto"):
        calls.append("prefetch")
        real(tensors, method)

    kernels.prefetch = spy
    try:
        def step(x):
            ticket = torch.ops.ktcore.l2_prefetch(produce(x), weights)
            return consume(ticket, x + 1)

        x = torch.randn(4, device=device)
        got = torch.compile(step, fullgraph=True)(x)
    finally:
        kernels.prefetch = real
    assert torch.equal(got, (x + 1) * 2)
    assert calls == ["produce", "prefetch", "consume"]


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["load", "bulk"])
def test_both_methods_in_a_captured_graph(kernels, method):
    if method == "bulk" and not kernels.bulk_supported(torch.device("cuda")):
        pytest.skip("the bulk prefetch needs sm_90 or newer")
    base = torch.randn(3 * 2**20 + 7, device="cuda", dtype=torch.bfloat16)
    tensors = [base[1:], base[: 2**20 + 3], base[5:13], base[:1]]  # unaligned starts and ends, tiny
    before = base.clone()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        kernels.prefetch(tensors, method)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.prefetch(tensors, method)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(base, before)
