"""The fast CPU paths of kernel generation against the reference path.

The online/offline tests run in float64, which takes the PyTorch reference path (torch.mm,
no fused loops). Here float32 layers, which take the fused loops of orepa_mm/csrc, must match
the same layers in float64; and those ops must be well-formed dispatcher ops for torch.compile
(tests/test_compile.py compiles them)."""
import os

import pytest
import torch

from orepa_mm.cnn import OREPA_VGG_BRANCHES, OREPAConv1x1, OREPAConv2d
from orepa_mm.cnn.fused_ops import FUSED_OP_NAMES, KXK_KERNEL_OPS, fused_kxk_ops


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_fused_loops_serve_ungrouped_float32_cpu_layers():
    """Built by make install; then every ungrouped fp32 CPU k x k layer up to 7 x 7 uses it."""
    if KXK_KERNEL_OPS is None:
        message = 'orepa_mm._kxk_kernel_ops is not built (make install builds it)'
        if os.environ.get('OREPA_MM_REQUIRE_FUSED_OPS'):
            pytest.fail(message)
        pytest.skip(message)
    kernel = torch.zeros(4, 4, 3, 3)
    assert fused_kxk_ops(kernel, groups=1, expand=8) is KXK_KERNEL_OPS
    assert fused_kxk_ops(kernel, groups=2, expand=8) is None
    assert fused_kxk_ops(kernel.double(), groups=1, expand=8) is None
    assert fused_kxk_ops(torch.zeros(4, 4, 9, 9), groups=1, expand=8) is None


def _fused_op_cases():
    o, i, x, nb, e, t = 5, 4, 9, 3, 2, 6
    r = torch.randn
    return [
        ('assemble', (r(o, i, x), r(o), r(nb, o, i), r(nb, o, x), r(nb, o), r(o, x, i), r(o, i, e),
                      r(i, e, x), r(o))),
        ('assemble', (r(o, i, 25), r(o), None, None, None, None, None, None, None)),
        ('branch_backward', (r(o, i, x), r(o, i, x), r(o), r(nb, o, i), r(nb, o, x), r(nb, o),
                             r(o, i, e), r(i, e, x), r(o), True)),
        ('branch_backward', (r(o, i, x), r(o, i,
                                           x), r(o), None, None, None, None, None, None, False)),
        ('taps_first_scaled', (r(o, t, x), r(o))),
        ('t_major_scaled', (r(o, t, x), r(o))),
        ('compose_backward', (r(o, x, t), r(o, t, x), r(o))),
    ]


@pytest.mark.parametrize('case', range(len(_fused_op_cases())))
def test_fused_loops_are_traceable_dispatcher_ops(case):
    """torch.ops.orepa_mm.kxk_*: schema, fake kernels (shapes for torch.compile) and the
    dispatcher checks of torch.library.opcheck."""
    if KXK_KERNEL_OPS is None:
        pytest.skip('orepa_mm._kxk_kernel_ops is not built (make install builds it)')
    torch.manual_seed(0)
    name, args = _fused_op_cases()[case]
    assert f'kxk_{name}' in FUSED_OP_NAMES
    torch.library.opcheck(getattr(KXK_KERNEL_OPS, name), args)


def test_a_stale_build_of_the_fused_loops_is_not_used(monkeypatch):
    """A module built from an older orepa_mm/csrc (no OPS_VERSION, pybind functions only) is
    recognised: a warning, and the PyTorch path."""
    import types

    from orepa_mm.cnn import fused_ops
    stale = types.ModuleType('orepa_mm._kxk_kernel_ops')
    monkeypatch.setattr(fused_ops.importlib, 'import_module', lambda name: stale)
    with pytest.warns(UserWarning, match='older orepa_mm/csrc'):
        assert fused_ops._load() is None


@pytest.mark.parametrize('layer_fn', [
    lambda: OREPAConv2d(24, 40, 3),
    lambda: OREPAConv2d(40, 24, 5, internal_channels=16, expand_ratio=3),
    lambda: OREPAConv2d(24, 24, 3, branches=OREPA_VGG_BRANCHES),
    lambda: OREPAConv2d(16, 24, 3, branches=('origin', '1x1_kxk')),
    lambda: OREPAConv2d(16, 24, 3, branches=('origin', 'avg', 'dws')),
    lambda: OREPAConv2d(16, 16, 3, branches=('origin', )),
    lambda: OREPAConv2d(40, 24, 3, groups=4),
    lambda: OREPAConv1x1(24, 40),
    lambda: OREPAConv1x1(40, 24),
])
def test_float32_kernel_and_gradients_match_float64(layer_fn):
    """The fp32 path (fused loops) against the same layer in float64 (the PyTorch path)."""
    torch.manual_seed(0)
    layer = layer_fn()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
    grad = torch.randn(layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
    names = [n for n, _ in layer.named_parameters()]
    kernel32 = layer.generate_kernel()
    grads32 = torch.autograd.grad(kernel32, list(layer.parameters()), grad)
    layer64 = layer.double()
    kernel64 = layer64.generate_kernel()
    grads64 = torch.autograd.grad(kernel64, list(layer64.parameters()), grad.double())
    assert _rel_err(kernel32.double(), kernel64) < 1e-5
    for name, g32, g64 in zip(names, grads32, grads64):
        assert _rel_err(g32.double(), g64) < 1e-5, name


@pytest.mark.parametrize('layer_fn', [lambda: OREPAConv2d(8, 8, 3), lambda: OREPAConv1x1(8, 8)])
def test_second_derivatives_are_refused(layer_fn):
    """The analytic backward is not differentiable: say so instead of a wrong result."""
    layer = layer_fn()
    kernel = layer.generate_kernel()
    grads = torch.autograd.grad(kernel.square().sum(), list(layer.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match='once_differentiable'):
        grads[0].sum().backward()
