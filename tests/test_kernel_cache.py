"""The opt-in kernel cache (``cached_kernels``) and its validation hook.

Outside the context nothing is cached (tests/test_kernel_reuse_and_writes.py); inside it, a
kernel is generated once and reused while the parameters' versions and identities hold, and
never when autograd needs the kernel.
"""
import copy

import pytest
import torch
import torch.nn as nn

from orepa_mm.cnn import DBBConv2d, OREPAConv1x1, OREPAConv2d, OREPALargeConv2d, cached_kernels
from tests.numerics import randomise

LAYERS = {
    'kxk': lambda: OREPAConv2d(4, 6, 3),
    '1x1': lambda: OREPAConv1x1(4, 6),
    'large': lambda: OREPALargeConv2d(4, 6, 7),
    'dbb': lambda: DBBConv2d(4, 6, 3),
}


def _model(name):
    return randomise(nn.Sequential(LAYERS[name](), nn.BatchNorm2d(6))).eval()


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_reused_while_unchanged_and_regenerated_after_any_tracked_change(name):
    model = _model(name)
    layer = model[0]
    x = torch.randn(1, 4, 9, 9)
    with torch.no_grad(), cached_kernels(model):
        first = layer.kernel()
        assert layer.kernel() is first  # reused
        reference = model(x)
        param = next(layer.parameters())
        param.mul_(1.5)  # in-place: version bump
        second = layer.kernel()
        assert second is not first
        assert torch.equal(second, copy.deepcopy(layer).kernel())
        layer.load_state_dict(copy.deepcopy(layer.state_dict()))
        assert torch.equal(layer.kernel(), second) and layer.kernel() is not second
        assert not torch.equal(model(x), reference)
    assert layer.kernel_source is None


@pytest.mark.parametrize('name', ['kxk', '1x1'])
def test_bypassed_when_autograd_needs_the_kernel(name):
    model = _model(name)
    layer = model[0].train()
    with cached_kernels(model):
        with torch.no_grad():
            cached = layer.kernel()
        kernel = layer.kernel()  # grad mode, trainable parameters: a differentiable kernel
        assert kernel is not cached and kernel.requires_grad
        kernel.sum().backward()
        assert all(p.grad is not None for p in layer.parameters())


def test_an_inference_mode_kernel_is_not_reused_for_a_backward():
    model = _model('kxk')
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    with cached_kernels(model):
        with torch.inference_mode():
            model(x.detach())
        model(x).sum().backward()  # raised 'Inference tensors cannot be saved for backward'
    assert x.grad is not None


def test_a_wrapper_supplied_kernel_is_left_alone():
    model = _model('kxk')

    class Source:

        def kernel_for(self, layer):
            return None

    source = Source()
    import weakref
    model[0].kernel_source = weakref.ref(source)
    with cached_kernels(model):
        assert model[0].kernel_source() is source
    assert model[0].kernel_source() is source


def test_the_validation_hook_closes_the_cache_before_training():
    """An unfinished validation epoch (no after-hook) must not leave training on the cache."""
    from types import SimpleNamespace

    from orepa_mm.engine import ReparamKernelCacheHook
    model = _model('kxk')
    hook, runner = ReparamKernelCacheHook(), SimpleNamespace(model=model)
    hook.before_val_epoch(runner)
    assert model[0].kernel_source is not None
    hook.before_train_epoch(runner)
    assert model[0].kernel_source is None
