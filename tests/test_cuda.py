"""CUDA behaviour that the CPU suite cannot show (skipped without a GPU; run by tools/gpu_check.sh).

* the CUDA (PyTorch reference) path trains to the float64 CPU gradients, with TF32 off, and
  within TF32 rounding with it on;
* torch.compile (inductor) of an OREPA backbone's training step gives eager's gradients;
* one-GPU DDP (NCCL) gives the gradients of the unwrapped model;
* eval mode sees ``.data`` writes on the GPU too;
* a training step (frozen stages, norm_eval) and an eval forward, cached kernels included,
  make no host-device synchronisation: ``torch.cuda.set_sync_debug_mode('error')`` raises at
  the first one (the stock ResNet is the control).
"""
import copy
import os
import socket

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')


def _backbone():
    from orepa_mm.models.backbones.for_mmdet import OREPAResNet
    torch.manual_seed(0)
    return OREPAResNet(depth=18, norm_eval=False)


def _grads(model, x):
    model.train()
    model.zero_grad(set_to_none=True)
    sum(o.double().square().mean() for o in model(x)).backward()
    return {
        n: p.grad.detach().double().cpu()
        for n, p in model.named_parameters() if p.grad is not None
    }


def _worst(a, b):
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-12)) for n in b)


@pytest.fixture
def reference():
    model = _backbone().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    return model, x, _grads(model, x)


@pytest.mark.parametrize('tf32,tol', [(False, 1e-4), (True, 5e-2)])
def test_cuda_gradients_match_cpu_float64(reference, tf32, tol):
    model64, x, expected = reference
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        got = _grads(copy.deepcopy(model64).float().cuda(), x.float().cuda())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert _worst(got, expected) < tol


def test_cuda_compiled_training_matches_eager(reference):
    model64, x, _ = reference
    eager = copy.deepcopy(model64).float().cuda()
    compiled = torch.compile(copy.deepcopy(eager))
    xc = x.float().cuda()
    assert _worst(_grads(compiled, xc), _grads(eager, xc)) < 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_cuda_single_gpu_ddp_matches_unwrapped(reference):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    model64, x, _ = reference
    plain = copy.deepcopy(model64).float().cuda()
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(_free_port()))
    dist.init_process_group('nccl', rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(copy.deepcopy(plain), device_ids=[0])
        xc = x.float().cuda()
        got = {n[len('module.'):]: g for n, g in _grads(ddp, xc).items()}
        assert _worst(got, _grads(plain, xc)) < 1e-5
    finally:
        dist.destroy_process_group()


def test_cuda_eval_sees_data_writes():
    model = _backbone().cuda().eval()
    x = torch.randn(1, 3, 64, 64, device='cuda')
    with torch.no_grad():
        before = model(x)[-1]
        for p in model.parameters():
            p.data.mul_(0.9)
        after = model(x)[-1]
        fresh = copy.deepcopy(model)
        assert not torch.allclose(after, before)
        assert torch.equal(after, fresh(x)[-1])


@pytest.mark.parametrize('variant', ['stock', 'orepa'])
def test_cuda_training_step_and_eval_make_no_sync(variant):
    from mmdet.models.backbones import ResNet

    from orepa_mm import cached_kernels
    from orepa_mm.models.backbones.for_mmdet import OREPAResNet
    torch.manual_seed(0)
    cls = OREPAResNet if variant == 'orepa' else ResNet
    model = cls(depth=50, frozen_stages=1, norm_eval=True).cuda()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                lr=1e-3,
                                momentum=0.9)
    x = torch.randn(2, 3, 128, 128, device='cuda')
    model.train()
    sum(o.square().mean() for o in model(x)).backward()  # warm-up: lazy CUDA init may sync
    optimizer.step()
    optimizer.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        sum(o.square().mean() for o in model(x)).backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            model(x)
            with cached_kernels(model):
                model(x)
                model(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
