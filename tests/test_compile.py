"""torch.compile of the train-time layers and backbones: eager's numbers, no graph breaks of
orepa_mm's own, and the fast CPU paths (fused loops) kept in compiled graphs.
Plus the precision contract of the kernel functions under autocast.

Every model here is tiny (a few channels, 32 px): Dynamo tracing, not arithmetic, is the cost.
"""
import pytest
import torch
import torch._dynamo
import torch.nn as nn
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch._functorch.aot_autograd import make_boxed_func

from orepa_mm.cnn import (OREPA_VGG_BRANCHES, OREPAConv1x1, OREPAConv2d, OREPALargeConv2d,
                          ReparamConv2d, fused_ops)
from tests.numerics import rel_err


@pytest.fixture(autouse=True)
def fresh_dynamo(one_thread):
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def randomise(model, seed=0):
    """Random branch weights and scales of the OREPA layers (the published init zeroes some
    branches' gradients); the host model's own layers keep their init, so that a deep
    backbone stays well-conditioned in float32."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ReparamConv2d):
                for p in m.parameters(recurse=False):
                    p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.5)
    return model


def loss_of(out):
    outs = out if isinstance(out, (tuple, list)) else (out, )
    return sum((o.square() * (1 + torch.arange(o.numel(), dtype=o.dtype).view(o.shape) % 3)).mean()
               for o in outs)


def train_step(model, x, fn=None):
    """Loss, outputs and every parameter's gradient of one forward + backward."""
    out = (model if fn is None else fn)(x)
    grads = torch.autograd.grad(loss_of(out), [p for p in model.parameters() if p.requires_grad])
    outs = out if isinstance(out, (tuple, list)) else (out, )
    return [o.detach() for o in outs], grads


def graph_breaks() -> int:
    return sum(counters['graph_break'].values())


def compiled_step(model, x, backend):
    """A train step of ``torch.compile(model)`` and the number of graph breaks it had."""
    torch._dynamo.reset()
    counters.clear()
    outs, grads = train_step(model, x, torch.compile(model, backend=backend))
    return outs, grads, graph_breaks()


def assert_same(eager, compiled, tol):
    (outs, grads), (c_outs, c_grads) = eager, compiled
    assert len(outs) == len(c_outs) and len(grads) == len(c_grads)
    for a, b in zip(c_outs, outs):
        assert rel_err(a, b) < tol
    for i, (a, b) in enumerate(zip(c_grads, grads)):
        assert rel_err(a, b) < tol, f'gradient {i}: {rel_err(a, b)}'


class RecordingBackend:
    """aot_eager that records the call_function targets of the forward and backward graphs."""

    def __init__(self):
        self.targets = []

    def _record(self, gm, example_inputs):
        self.targets += [str(n.target) for n in gm.graph.nodes if n.op == 'call_function']
        return make_boxed_func(gm.forward)

    def backend(self):
        return aot_autograd(fw_compiler=self._record, bw_compiler=self._record)


# -- (a) layers, float64 (the PyTorch path, as on CUDA) ------------------------------------------
LAYERS = {
    'kxk-all-branches': lambda: OREPAConv2d(4, 6, 3),
    'kxk-5x5': lambda: OREPAConv2d(6, 4, 5, internal_channels=4, expand_ratio=3),
    'kxk-grouped': lambda: OREPAConv2d(4, 8, 3, groups=2),
    'orepa-vgg-dense': lambda: OREPAConv2d(4, 4, 3, stride=2, branches=OREPA_VGG_BRANCHES),
    '1x1': lambda: OREPAConv1x1(4, 6),
    'large-7x7': lambda: OREPALargeConv2d(3, 4, 7, stride=2),
}


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=['f64', 'f32'])
@pytest.mark.parametrize('name', list(LAYERS))
def test_layer_under_aot_eager_matches_eager(name, dtype):
    """float64 takes the PyTorch path (CUDA's), float32 the fused loops."""
    torch.manual_seed(0)
    layer = randomise(LAYERS[name]()).to(dtype)
    x = torch.randn(2, layer.in_channels, 12, 12, dtype=dtype)
    eager = train_step(layer, x)
    *compiled, breaks = compiled_step(layer, x, 'aot_eager')
    assert breaks == 0, dict(counters['graph_break'])
    assert_same(eager, compiled, 1e-10 if dtype == torch.float64 else 1e-5)


def test_compiled_graphs_keep_the_fused_ops():
    """The fused loops are nodes of the compiled forward and backward."""
    if fused_ops.KXK_KERNEL_OPS is None:
        pytest.skip('orepa_mm._kxk_kernel_ops is not built (make install builds it)')
    torch.manual_seed(0)
    model = randomise(
        nn.Sequential(OREPAConv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), OREPAConv1x1(6, 8)))
    x = torch.randn(2, 4, 12, 12)
    recorder = RecordingBackend()
    eager = train_step(model, x)
    *compiled, breaks = compiled_step(model, x, recorder.backend())
    assert breaks == 0
    assert_same(eager, compiled, 1e-5)
    for name in fused_ops.FUSED_OP_NAMES:
        assert f'orepa_mm.{name}.default' in recorder.targets, name


# -- (b) OREPAResNet (mmdet) ----------------------------------------------------------------------
def _mmdet_backbone(type_, depth):
    # The classes themselves: a registry build would depend on the default scope that earlier
    # tests left behind.
    from mmdet.models.backbones import ResNet

    from orepa_mm.models.backbones.for_mmdet import OREPAResNet
    cls = {'OREPAResNet': OREPAResNet, 'ResNet': ResNet}[type_]
    return cls(depth=depth, base_channels=8, stem_channels=8, out_indices=(0, 1, 2, 3))


def _resnet_case(depth, backend):
    torch.manual_seed(0)
    # (mm backbones' train() returns None: they are built in train mode.)
    model = randomise(_mmdet_backbone('OREPAResNet', depth))
    stock = _mmdet_backbone('ResNet', depth)
    x = torch.randn(2, 3, 32, 32)
    eager = train_step(model, x)
    *compiled, breaks = compiled_step(model, x, backend)
    *_, stock_breaks = compiled_step(stock, x, backend)
    assert breaks <= stock_breaks, dict(counters['graph_break'])
    assert_same(eager, compiled, 1e-5)


@pytest.mark.slow
def test_orepa_resnet18_train_step_under_aot_eager():
    _resnet_case(18, 'aot_eager')


@pytest.mark.slow
def test_orepa_resnet50_train_step_under_aot_eager():
    _resnet_case(50, 'aot_eager')


# -- (c) Inductor ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_small_model_under_inductor_matches_eager_and_calls_the_fused_ops():
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code
    torch.manual_seed(0)
    # No BN at the end: there, Inductor's own fp32 BN backward alone moves the gradients by
    # up to ~7e-5 (eager: ~8e-6 off float64, Inductor: ~6e-5), which is not what this tests.
    model = randomise(
        nn.Sequential(OREPAConv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), OREPAConv1x1(6, 8)))
    x = torch.randn(2, 4, 16, 16)
    eager = train_step(model, x)
    compiled_model = torch.compile(model)
    with inductor_config.patch(fx_graph_cache=False):
        compiled, code = run_and_get_code(lambda: train_step(model, x, compiled_model))
    assert graph_breaks() == 0
    assert_same(eager, compiled, 1e-5)
    code = '\n'.join(code)
    if fused_ops.KXK_KERNEL_OPS is not None:
        for name in fused_ops.FUSED_OP_NAMES:
            assert f'orepa_mm.{name}' in code, name


# -- (d) OREPAVGG (mmpretrain) --------------------------------------------------------------------
def _orepa_vgg(arch):
    from orepa_mm.models.backbones.for_mmpretrain import OREPAVGG
    return OREPAVGG(arch=arch, base_channels=8, out_indices=(0, 1, 2, 3))


def test_orepa_vgg_train_step_under_aot_eager():
    arch = dict(
        num_blocks=[1, 2, 1, 1], width_factor=[1, 1, 1, 1], group_layer_map=None, se_cfg=None)
    torch.manual_seed(0)
    model = randomise(_orepa_vgg(arch))
    x = torch.randn(2, 3, 32, 32)
    eager = train_step(model, x)
    *compiled, breaks = compiled_step(model, x, 'aot_eager')
    assert breaks == 0, dict(counters['graph_break'])
    assert_same(eager, compiled, 1e-5)


@pytest.mark.slow
def test_orepa_vgg_a0_train_step_under_aot_eager():
    torch.manual_seed(0)
    model = randomise(_orepa_vgg('A0'))
    x = torch.randn(2, 3, 32, 32)
    eager = train_step(model, x)
    *compiled, breaks = compiled_step(model, x, 'aot_eager')
    assert breaks == 0, dict(counters['graph_break'])
    assert_same(eager, compiled, 1e-5)


# -- (e) autocast ---------------------------------------------------------------------------------
AUTOCAST_LAYERS = {
    'kxk': lambda: OREPAConv2d(16, 24, 3),
    'kxk-grouped': lambda: OREPAConv2d(16, 24, 3, groups=2),
    'kxk-5x5': lambda: OREPAConv2d(16, 24, 5, expand_ratio=2),
    '1x1': lambda: OREPAConv1x1(16, 24),
}


@pytest.mark.parametrize('path', ['default', 'pytorch'])
@pytest.mark.parametrize('name', list(AUTOCAST_LAYERS))
def test_kernel_functions_run_in_fp32_under_autocast(name, path, monkeypatch):
    """Generating the kernel, or calling backward, inside a bf16 autocast region changes no
    number: the kernel functions run with autocast off ('pytorch': fused loops switched off,
    so that every product is one autocast would lower to bf16)."""
    if path == 'pytorch':
        monkeypatch.setattr(fused_ops, 'KXK_KERNEL_OPS', None)
    torch.manual_seed(0)
    layer = randomise(AUTOCAST_LAYERS[name]())
    params = list(layer.parameters())
    kernel = layer.generate_kernel()
    grad = torch.randn_like(kernel)
    reference = torch.autograd.grad(kernel, params, grad)

    with torch.autocast('cpu', dtype=torch.bfloat16):
        kernel_in_autocast = layer.generate_kernel()
    assert kernel_in_autocast.dtype == torch.float32
    assert rel_err(kernel_in_autocast, kernel) < 1e-6

    kernel = layer.generate_kernel()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        grads = torch.autograd.grad(kernel, params, grad)
    for g, r in zip(grads, reference):
        assert g.dtype == torch.float32 and rel_err(g, r) < 1e-5


@pytest.mark.parametrize('backward_in_autocast', [False, True], ids=['bwd-outside', 'bwd-inside'])
@pytest.mark.parametrize('groups', [1, 2])
def test_compiled_autocast_step_matches_eager(groups, backward_in_autocast):
    """bf16 autocast around a compiled layer: the compiled kernel functions stay fp32 as in
    eager (the traced backward carries its own autocast-off region), so the gradients are
    eager's; grouped layers take the PyTorch path, whose products autocast would lower."""
    torch.manual_seed(0)
    layer = randomise(OREPAConv2d(4, 8, 3, groups=groups))
    x = torch.randn(2, 4, 16, 16)
    params = list(layer.parameters())

    def step(fn):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = fn(x).float().square().mean()
            if backward_in_autocast:
                return torch.autograd.grad(loss, params)
        return torch.autograd.grad(loss, params)

    eager = step(layer)
    compiled = step(torch.compile(layer, backend='aot_eager'))
    assert graph_breaks() == 0
    for g, r in zip(compiled, eager):
        assert rel_err(g, r) < 1e-6


# -- the same on CUDA (skipped without a GPU; tools/gpu_check.sh runs them) -----------------------
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')


@pytest.fixture
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@cuda_only
@pytest.mark.parametrize('backend', ['aot_eager', 'inductor'])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=['f64', 'f32'])
@pytest.mark.parametrize('name', ['kxk-all-branches', 'kxk-grouped', '1x1', 'large-7x7'])
def test_cuda_layer_under_compile_matches_eager(name, dtype, backend, no_tf32):
    torch.manual_seed(0)
    layer = randomise(LAYERS[name]()).to('cuda', dtype)
    x = torch.randn(2, layer.in_channels, 12, 12, dtype=dtype, device='cuda')
    eager = train_step(layer, x)
    *compiled, breaks = compiled_step(layer, x, backend)
    assert breaks == 0, dict(counters['graph_break'])
    assert_same(eager, compiled, 1e-10 if dtype == torch.float64 else 1e-5)


@cuda_only
@pytest.mark.parametrize('amp_dtype', [torch.float16, torch.bfloat16], ids=['fp16', 'bf16'])
@pytest.mark.parametrize('name', list(AUTOCAST_LAYERS))
def test_cuda_kernel_functions_run_in_fp32_under_autocast(name, amp_dtype, no_tf32):
    torch.manual_seed(0)
    layer = randomise(AUTOCAST_LAYERS[name]()).cuda()
    params = list(layer.parameters())
    kernel = layer.generate_kernel()
    grad = torch.randn_like(kernel)
    reference = torch.autograd.grad(kernel, params, grad)
    with torch.autocast('cuda', dtype=amp_dtype):
        kernel = layer.generate_kernel()
        assert kernel.dtype == torch.float32
        grads = torch.autograd.grad(kernel, params, grad)
    for g, r in zip(grads, reference):
        assert g.dtype == torch.float32 and rel_err(g, r) < 1e-5
