"""OREPA / DBB conv layers: online == offline, exact stock loading, deploy, cache, AMP.

Equivalence tests run on every available device (CUDA is skipped, not failed, without a GPU).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from orepa_mm.cnn import DBBConv2d, OREPAConv1x1, OREPAConv2d, OREPALargeConv2d, build_orepa_conv
from orepa_mm.deploy import count_reparameterizable, reparameterize_model
from tests.numerics import randomise, rel_err

DEVICES = [
    'cpu',
    pytest.param(
        'cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device'))
]


# -- offline (feature-space) references ---------------------------------------------------------
def _scaled(y, v):
    return y * v.view(1, -1, 1, 1)


def offline_kxk(layer: OREPAConv2d, x):
    """Each branch as its own conv chain on the feature map, scaled, summed."""
    k, s, p, d, g = (layer.kernel_size[0], layer.stride, layer.padding, layer.dilation,
                     layer.groups)
    o = layer.out_channels
    conv = dict(stride=s, padding=p, dilation=d)
    out = _scaled(F.conv2d(x, layer.origin, groups=g, **conv), layer.scale('origin'))
    if 'avg' in layer.branches:
        avg = torch.full((o, 1, k, k), 1.0 / k**2, dtype=x.dtype, device=x.device)
        y = F.conv2d(F.conv2d(x, layer.avg_1x1, groups=g), avg, groups=o, **conv)
        out = out + _scaled(y, layer.scale('avg'))
    if 'prior' in layer.branches:
        y = F.conv2d(
            F.conv2d(x, layer.prior_1x1, groups=g), layer.prior.unsqueeze(1), groups=o, **conv)
        out = out + _scaled(y, layer.scale('prior'))
    if '1x1_kxk' in layer.branches:
        first = (layer.expand_1x1_residual.flatten(1) + layer.expand_identity)[..., None, None]
        y = F.conv2d(F.conv2d(x, first, groups=g), layer.expand_kxk, groups=g, **conv)
        out = out + _scaled(y, layer.scale('1x1_kxk'))
    if '1x1' in layer.branches:
        # Centre tap of a padding = dilation * (k // 2) conv: a stride-s 1x1 conv.
        y = F.conv2d(x, layer.conv_1x1, stride=s, groups=g)
        out = out + _scaled(y, layer.scale('1x1'))
    if 'dws' in layer.branches:
        y = F.conv2d(x, layer.dw_kxk, groups=layer.in_channels, **conv)
        y = F.conv2d(y, layer.pw_1x1, groups=g)
        out = out + _scaled(y, layer.scale('dws'))
    if layer.bias is not None:
        out = out + layer.bias.view(1, -1, 1, 1)
    return out


def offline_1x1(layer: OREPAConv1x1, x):
    s = layer.stride
    v = layer.branch_scales
    out = _scaled(F.conv2d(x, layer.origin, stride=s), v[0])
    pair = F.conv2d(F.conv2d(x, layer.linear_first, stride=s), layer.linear_second)
    return out + _scaled(pair, v[1])


def offline_large(layer: OREPALargeConv2d, x):
    """Pre-pad once, then the stacked 3 x 3 kernels as a chain (later ones rotated 180 deg,
    see kernels.compose_stacked), the stride on the last; plus the direct origin kernel."""
    p, s, d = layer.padding, layer.stride, layer.dilation
    y = F.pad(x, [p[1], p[1], p[0], p[0]])
    origin = F.conv2d(y, layer.origin, stride=s, dilation=d)
    n = len(layer.stem_layers)
    for idx, stem in enumerate(layer.stem_layers):
        w = stem.generate_kernel()
        if idx:
            w = w.flip((-2, -1))
        y = F.conv2d(y, w, stride=s if idx == n - 1 else 1, dilation=d)
    return y + _scaled(origin, layer.origin_scale)


# -- online == offline ---------------------------------------------------------------------------
KXK_CASES = [
    # (in, out, k, stride, dilation, groups, bias, branches)
    (6, 8, 3, 1, 1, 1, False, None),
    (8, 6, 3, 2, 1, 1, True, None),
    (6, 8, 3, 1, 2, 1, False, None),
    (8, 8, 3, 2, 2, 2, False, None),
    (8, 16, 3, 1, 1, 8, False, None),  # groups > 4: internal width 2 I
    (5, 7, 5, 1, 1, 1, False, None),
    (6, 6, 3, 2, 1, 1, False, ('origin', 'avg', 'prior', '1x1_kxk', 'dws')),
]


def _check_grads(layer, offline, x):
    layer = layer.double()
    x = x.double().requires_grad_(True)
    out_on = layer(x)
    out_off = offline(layer, x)
    assert rel_err(out_on, out_off) < 1e-5
    params = [x] + [p for p in layer.parameters()]
    r = torch.randn_like(out_on)
    g_on = torch.autograd.grad((out_on * r).sum(), params)
    g_off = torch.autograd.grad((out_off * r).sum(), params)
    for (name, _), a, b in zip([('input', None)] + list(layer.named_parameters()), g_on, g_off):
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('case', KXK_CASES)
def test_kxk_online_equals_offline(case, device):
    i, o, k, s, d, g, bias, branches = case
    kwargs = {} if branches is None else dict(branches=branches)
    torch.manual_seed(0)
    layer = randomise(OREPAConv2d(i, o, k, stride=s, dilation=d, groups=g, bias=bias,
                                  **kwargs)).to(device)
    x = torch.randn(2, i, 11, 11, device=device)
    _check_grads(layer, offline_kxk, x)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('i,o,s', [(6, 10, 1), (10, 6, 2), (8, 8, 1)])
def test_1x1_online_equals_offline(i, o, s, device):
    torch.manual_seed(0)
    layer = randomise(OREPAConv1x1(i, o, 1, stride=s)).to(device)
    _check_grads(layer, offline_1x1, torch.randn(2, i, 9, 9, device=device))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('k,s,d', [(7, 2, 1), (7, 1, 2), (5, 2, 1)])
def test_large_online_equals_offline(k, s, d, device):
    torch.manual_seed(0)
    layer = randomise(OREPALargeConv2d(3, 6, k, stride=s, dilation=d)).to(device)
    _check_grads(layer, offline_large, torch.randn(2, 3, 17, 17, device=device))


def test_factory_dispatch_and_published_init():
    assert isinstance(build_orepa_conv(4, 8, 1), OREPAConv1x1)
    assert isinstance(build_orepa_conv(4, 8, 3, padding=1), OREPAConv2d)
    assert isinstance(build_orepa_conv(3, 8, 7, stride=2, padding=3), OREPALargeConv2d)
    layer = OREPAConv2d(4, 8, 3)
    assert layer.branch_scales.shape == (6, 8)
    assert torch.equal(layer.branch_scales[:, 0], torch.tensor([0.25, 0.25, 0.0, 0.5, 1.0, 0.5]))
    assert torch.count_nonzero(layer.expand_1x1_residual) == 0
    assert layer.dw_kxk.shape == (32, 1, 3, 3) and layer.pw_1x1.shape == (8, 32, 1, 1)
    vgg = OREPAConv2d(4, 8, 3, branches=('origin', 'avg', 'prior', '1x1_kxk', 'dws'))
    assert torch.equal(vgg.branch_scales[:, 0], torch.tensor([0.25, 0.25, 0.0, 0.5, 0.5]))
    one = OREPAConv1x1(4, 8)
    assert torch.equal(one.linear_first.flatten(1), torch.eye(4))
    assert torch.equal(one.branch_scales[:, 0], torch.tensor([1.0, 0.5]))
    assert torch.equal(OREPAConv1x1(8, 4).linear_second.flatten(1), torch.eye(4))
    with pytest.raises(ValueError, match='groups=1 only'):
        OREPAConv1x1(4, 8, groups=2)
    with pytest.raises(ValueError, match='odd kernel size'):
        OREPAConv2d(4, 8, 4)


# -- stock weights -------------------------------------------------------------------------------
@pytest.mark.parametrize('layer_fn,shape', [
    (lambda: OREPAConv2d(4, 8, 3), (8, 4, 3, 3)),
    (lambda: OREPAConv2d(8, 8, 3, groups=2), (8, 4, 3, 3)),
    (lambda: OREPAConv1x1(4, 8), (8, 4, 1, 1)),
    (lambda: OREPALargeConv2d(3, 8, 7, stride=2, padding=3), (8, 3, 7, 7)),
])
def test_stock_weight_loads_exactly(layer_fn, shape):
    layer = layer_fn()
    stock = torch.randn(shape)
    result = layer.load_state_dict({'weight': stock}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert rel_err(layer.generate_kernel(), stock) < 1e-6
    # The other branches still learn: the scale vectors get a gradient.
    layer.train()
    layer(torch.randn(1, shape[1] * layer.groups, 9, 9)).square().sum().backward()
    grads = [p.grad for n, p in layer.named_parameters() if 'branch_scales' in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads[-1:])


def test_stock_weight_of_wrong_shape_is_reported():
    with pytest.raises(RuntimeError, match='size mismatch for weight'):
        OREPAConv2d(4, 8, 3).load_state_dict({'weight': torch.randn(8, 4, 1, 1)})


# -- deploy --------------------------------------------------------------------------------------
def _host(conv):
    return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU())


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('conv_fn', [
    lambda: OREPAConv2d(6, 8, 3, stride=2, bias=True),
    lambda: OREPAConv2d(8, 8, 3, dilation=2, groups=2),
    lambda: OREPAConv1x1(6, 12, stride=2),
    lambda: OREPALargeConv2d(3, 8, 7, stride=2, padding=3),
    lambda: DBBConv2d(6, 8, 3, stride=2),
    lambda: DBBConv2d(8, 8, 3, groups=8),
])
def test_deploy_matches_train_time_eval(conv_fn, device):
    torch.manual_seed(0)
    model = randomise(_host(conv_fn()), seed=1).to(device).eval()
    x = torch.randn(2, model[0].in_channels, 15, 15, device=device)
    with torch.no_grad():
        before = model(x)
    deployed = reparameterize_model(copy.deepcopy(model))
    assert type(deployed[0]) is nn.Conv2d and count_reparameterizable(deployed) == 0
    assert set(deployed.state_dict()) >= {'0.weight', '1.weight', '1.running_var'}
    with torch.no_grad():
        after = deployed(x)
    assert rel_err(after, before) < 1e-5
    assert reparameterize_model(deployed) is deployed  # idempotent
    assert deployed[0].weight.dtype == torch.float32


# -- the kernel is the function of the current parameters ---------------------------------------
def test_eval_kernel_follows_every_parameter_change():
    layer = OREPAConv2d(4, 8, 3).eval()
    with torch.no_grad():
        first = layer.kernel()
        assert torch.equal(layer.kernel(), first) and not first.requires_grad
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.train()
    layer(torch.randn(1, 4, 6, 6)).sum().backward()
    opt.step()
    layer.eval()
    with torch.no_grad():
        second = layer.kernel()
        assert not torch.equal(second, first)
        assert torch.equal(second, layer.generate_kernel())
        layer.branch_scales.add_(1.0)  # any in-place change is seen
        assert torch.equal(layer.weight, layer.generate_kernel())
    layer.train()
    assert layer.weight.requires_grad  # training: differentiable


# -- mixed precision -----------------------------------------------------------------------------
@pytest.mark.parametrize('device,dtype', [
    ('cpu', torch.bfloat16),
    pytest.param(
        'cuda',
        torch.float16,
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')),
    pytest.param(
        'cuda',
        torch.bfloat16,
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')),
])
@pytest.mark.parametrize('conv_fn', [
    lambda: OREPAConv2d(8, 8, 3), lambda: OREPAConv1x1(8, 16),
    lambda: OREPALargeConv2d(8, 8, 7, padding=3)
])
def test_autocast_generates_kernel_in_fp32(conv_fn, device, dtype):
    torch.manual_seed(0)
    layer = conv_fn().to(device)
    x = torch.randn(2, 8, 12, 12, device=device)
    with torch.autocast(device_type=device, dtype=dtype):
        assert layer.weight.dtype == torch.float32
        out = layer(x)
    assert out.dtype == dtype
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all()
    for p in layer.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    ref = layer(x)
    assert rel_err(out.float(), ref) < 5e-2
