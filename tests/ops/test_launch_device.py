"""ktcore.ops.launch_device.on_device: Triton launches go to the tensors' GPU, whatever the
current device. With two GPUs: the decode GEMV and the router kernel on cuda:1 while cuda:0 is
current give the reference results (before, the kernels went to cuda:0's stream and the
results were read before they were written). Run there: bash scripts/gpu_host_tests.sh"""

from __future__ import annotations

import pytest
import torch

from ktcore.ops.launch_device import on_device


def test_off_cuda_only_the_default_device_is_set_and_restored():
    t = torch.zeros(2, device="meta")  # not the default device, and not a GPU
    with on_device(t):
        assert torch.empty(1).device == t.device
    assert torch.empty(1).device.type == "cpu"


two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs two CUDA GPUs")


@pytest.mark.cuda
@two_gpus
def test_the_tensors_gpu_becomes_current_for_the_launch():
    t = torch.zeros(2, device="cuda:1")
    with torch.cuda.device(0):
        with on_device(t):
            assert torch.cuda.current_device() == 1 and torch.empty(1).device == t.device
        assert torch.cuda.current_device() == 0


@pytest.mark.cuda
@two_gpus
def test_kernels_on_the_second_gpu_while_the_first_is_current():
    pytest.importorskip("triton")
    from ktcore.ops.decode_gemv import launch as gemv
    from ktcore.ops.router_kernel import router_topk

    g = torch.Generator().manual_seed(7)
    dev = torch.device("cuda:1")
    w = torch.randn(4099, 2048, generator=g).to(dev, torch.bfloat16)  # [N, K]
    x = torch.randn(2048, generator=g).to(dev, torch.bfloat16)  # [K]
    router_w = torch.randn(128, 2048, generator=g).to(dev, torch.bfloat16)  # [E, H]
    counter = torch.zeros(1, dtype=torch.int32, device=dev)
    with torch.cuda.device(0):
        for _ in range(20):  # a race would show at least once
            y = gemv(x, w, None).float().cpu()
            ids, weights = router_topk(x[None], router_w, None, counter, 8, 8, True, 1.0, True, 1, 1)
            ids, weights = ids.cpu(), weights.cpu()
            want = (w.float() @ x.float()).cpu()
            assert (y - want).abs().max() <= 8e-3 * want.abs().max()
            logits = (x.float() @ router_w.float().t()).cpu()  # [E]
            assert set(ids[0].tolist()) == set(logits.topk(8).indices.tolist())
            assert weights.sum().item() == pytest.approx(1.0, abs=1e-5)
