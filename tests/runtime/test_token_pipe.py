"""The decode loop's token pipe: copies come back in order, one buffer per pending step."""

import pytest
import torch

from ktcore.runtime.token_pipe import TokenPipe


def test_tokens_come_back_in_push_order_and_survive_later_writes():
    pipe = TokenPipe(batch=3, device=torch.device("cpu"), depth=2)
    a, b = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    pipe.push(a)
    pipe.push(b)
    a.fill_(0)  # the pipe holds copies, not the sampled tensors
    assert len(pipe) == 2
    assert pipe.pop() == [1, 2, 3]
    pipe.push(torch.tensor([7, 8, 9]))
    assert pipe.pop() == [4, 5, 6]
    assert pipe.pop() == [7, 8, 9]
    assert len(pipe) == 0


def test_pushing_past_the_ring_is_refused():
    pipe = TokenPipe(batch=1, device=torch.device("cpu"), depth=1)
    pipe.push(torch.tensor([1]))
    pipe.push(torch.tensor([2]))
    with pytest.raises(RuntimeError, match="pop before pushing"):
        pipe.push(torch.tensor([3]))


@pytest.mark.cuda
def test_cuda_copies_wait_for_the_stream():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    pipe = TokenPipe(batch=4, device=device)
    x = torch.arange(4, device=device)
    for i in range(2):
        pipe.push(x * (i + 1))
    assert pipe.pop() == [0, 1, 2, 3]
    assert pipe.pop() == [0, 2, 4, 6]
