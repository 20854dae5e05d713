"""Re-param layers combined with what users and other libraries do to convs.

Each test is a case where two mechanisms met and the contract broke (silently wrong, or a
crash with a message that did not say what to do): mmcv's ``fuse_conv_bn`` on DBB, writes
that neither landed nor raised, a write inside the opt-in kernel cache, ``functional_call``,
meta-device initialisation, a diverged layer, freezing through ``weight``, DBB and stock
checkpoints, RepVGG's fusion of DBB layers, ``is_parametrized`` scans.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

import orepa_mm
from orepa_mm.cnn import DBBConv2d, OREPAConv1x1, OREPAConv2d, OREPALargeConv2d, cached_kernels
from tests.numerics import random_bn_statistics, randomise, rel_err

LAYERS = {
    'kxk': lambda: OREPAConv2d(4, 6, 3),
    '1x1': lambda: OREPAConv1x1(4, 6),
    'large': lambda: OREPALargeConv2d(4, 6, 7),
}
X = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(0))


def _layer(name):
    return randomise(LAYERS[name]()).eval()


def test_mmcv_fuse_conv_bn_keeps_a_dbb_layer_exact_and_deployable():
    """mmcv fused avg_bn into avg_1x1 across the pad and pool between them (13.5% off)."""
    from mmcv.cnn import ConvModule, fuse_conv_bn
    torch.manual_seed(0)
    model = random_bn_statistics(
        nn.Sequential(
            ConvModule(8, 8, 3, padding=1, conv_cfg=dict(type='DBB'), norm_cfg=dict(type='BN'))))
    model.eval()
    x = torch.randn(1, 8, 10, 10)
    with torch.no_grad():
        reference = model(x)
        fused = fuse_conv_bn(copy.deepcopy(model))
        assert rel_err(fused(x), reference) < 1e-5
        deployed = orepa_mm.reparameterize_model(fused)  # Identity BNs, biased convs: exact
        assert orepa_mm.count_reparameterizable(deployed) == 0
        assert rel_err(deployed(x), reference) < 1e-5


WRITES = {
    'F.relu inplace': lambda w: F.relu(w, inplace=True),
    'F.hardtanh positional inplace': lambda w: F.hardtanh(w, -0.01, 0.01, True),
    'nn.ReLU(inplace=True)': lambda w: nn.ReLU(inplace=True)(w),
    'aten.zero_.default': lambda w: torch.ops.aten.zero_.default(w),
    'aten.fill_.Scalar': lambda w: torch.ops.aten.fill_.Scalar(w, 0.5),
}


@pytest.mark.parametrize('write', sorted(WRITES))
@pytest.mark.parametrize('name', sorted(LAYERS))
def test_writes_through_inplace_flags_and_aten_overloads_land(name, write):
    layer = _layer(name)
    with torch.no_grad():
        handle = layer.weight
        expected = handle.detach().clone()
        WRITES[write](expected)
        WRITES[write](handle)
        assert torch.equal(layer.weight, expected)


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_a_write_inside_the_kernel_cache_lands_and_the_cache_follows(name):
    """The handle shared memory with the cache entry: the write zeroed the cached kernel,
    left the parameters alone and raised a false 'stale handle' error."""
    layer = _layer(name)
    model = nn.Sequential(layer)
    with torch.no_grad(), cached_kernels(model):
        before = model(X)
        layer.weight.mul_(0.5)
        assert rel_err(model(X), before * 0.5) < 1e-6
        nn.init.zeros_(layer.weight)  # a second write through a fresh handle
        assert torch.equal(model(X), torch.zeros_like(before))
    with torch.no_grad():
        assert torch.equal(model(X), torch.zeros_like(before))  # landed in the parameters


def test_functional_call_on_the_derived_weight_is_refused_and_changes_nothing():
    from torch.func import functional_call
    layer = _layer('kxk')
    state = copy.deepcopy(layer.state_dict())
    with pytest.raises(TypeError, match='functional_call cannot swap in a kernel') as err:
        functional_call(layer, {'weight': torch.randn(6, 4, 3, 3)}, (X, ))
    assert '\n' not in str(err.value)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())
    # the branch parameters are the way
    params = {k: v * 2 if k == 'branch_scales' else v for k, v in layer.named_parameters()}
    with torch.no_grad():
        assert rel_err(functional_call(layer, params, (X, )), layer(X) * 2) < 1e-6


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_a_layer_materialised_from_the_meta_device_has_its_constants(name):
    """Non-persistent buffers (patterns, identities) were garbage after to_empty: an OREPA
    state dict then loaded with 'All keys matched' and the outputs were off by 2.3."""
    source = _layer(name)
    with torch.device('meta'):
        layer = LAYERS[name]()
    layer.to_empty(device='cpu')
    layer.load_state_dict(source.state_dict(), strict=True)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(X), source(X))
    with torch.device('meta'):
        layer = LAYERS[name]()
    k = layer.kernel_size[0]
    stock = nn.Conv2d(4, 6, k, padding=k // 2, bias=False)
    with pytest.raises(ValueError, match='on the meta device'):
        layer.load_state_dict(stock.state_dict(), assign=True)


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_a_stock_weight_loads_exactly_into_a_diverged_layer(name):
    layer = _layer(name)
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(float('nan'))
    k = layer.kernel_size[0]
    stock = nn.Conv2d(4, 6, k, padding=k // 2, bias=False)
    layer.load_state_dict(stock.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(layer(X), stock(X)) < 1e-6
        for p in layer.parameters():
            p.fill_(float('nan'))
        nn.init.kaiming_normal_(layer.weight)  # its own handle, NaN and all: not stale
        assert torch.isfinite(layer.weight).all()


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_freezing_through_weight_freezes_the_layer(name):
    layer = _layer(name)
    layer.weight.requires_grad = False
    assert not any(p.requires_grad for p in layer.kernel_parameters())
    with torch.no_grad():
        handle = layer.weight.requires_grad_(True)
    assert all(p.requires_grad for p in layer.kernel_parameters())
    assert handle.requires_grad and handle.is_leaf  # as a stock conv's weight


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_a_detached_copy_of_weight_takes_requires_grad_for_itself(name):
    """``w = layer.weight.detach().requires_grad_()`` (saliency, feature visualisation) makes
    a new leaf; it must not unfreeze or freeze the layer."""
    layer = _layer(name)
    for p in layer.parameters():
        p.requires_grad_(False)
    w = layer.weight.detach().requires_grad_()
    assert w.requires_grad and w.is_leaf
    assert not any(p.requires_grad for p in layer.parameters())
    F.conv2d(X, w, padding=layer.padding).sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape


def test_dbb_refuses_a_stock_or_deployed_checkpoint_loudly():
    """With strict=False (mmengine's default) it used to keep its random init, with a warning."""
    dbb = DBBConv2d(4, 6, 3)
    stock = nn.Conv2d(4, 6, 3, padding=1, bias=True)
    for strict in (True, False):
        with pytest.raises(TypeError, match='cannot initialise the DBB layer'):
            dbb.load_state_dict(stock.state_dict(), strict=strict)
    dbb.load_state_dict(copy.deepcopy(DBBConv2d(4, 6, 3).state_dict()))  # its own: fine


@pytest.mark.parametrize('deploy', ['switch_to_deploy', 'reparameterize_model'])
def test_repvgg_with_dbb_convs_is_refused_in_one_sentence(deploy):
    """RepVGG's fusion drops conv biases: deploying DBB layers through it was 0.3 off (or a
    circular 're-parameterize first' message)."""
    from mmpretrain.models.backbones import RepVGG
    arch = dict(num_blocks=[1, 1, 1, 1], width_factor=[0.25] * 4, group_layer_map=None, se_cfg=None)
    model = RepVGG(arch=arch, conv_cfg=dict(type='DBB'))
    with pytest.raises(TypeError, match='drops the bias') as err:
        if deploy == 'switch_to_deploy':
            model.switch_to_deploy()
        else:
            orepa_mm.reparameterize_model(model)
    assert '\n' not in str(err.value)


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_a_write_with_autograd_on_lands_or_says_to_use_no_grad(name):
    """Where autograd cannot take the in-place write (the k x k kernel is a view made inside
    its autograd function), torch's message about views of custom Functions became ours."""
    layer = _layer(name).train()
    handle = layer.weight
    expected = handle.detach() * 2
    try:
        handle.mul_(2)
    except RuntimeError as err:
        assert 'under torch.no_grad()' in str(err) and '\n' not in str(err)
        assert name == 'kxk'
    else:
        assert torch.equal(layer.weight.detach(), expected)


def test_the_large_kernel_weight_is_contiguous_like_a_stock_weight():
    layer = _layer('large')
    assert layer.weight.is_contiguous()
    with torch.no_grad():
        before = layer.weight.detach().clone()
        layer.weight.view(-1).mul_(0.5)
        assert torch.equal(layer.weight, before * 0.5)


def test_parametrization_scans_see_a_plain_module_and_registering_is_refused():
    layer = _layer('kxk')
    assert not hasattr(layer, 'parametrizations')
    assert not parametrize.is_parametrized(layer)
    with pytest.raises(TypeError, match='re-parameterize the model first'):
        parametrize.register_parametrization(layer, 'weight', nn.Identity())
    assert not parametrize.is_parametrized(layer) and type(layer) is OREPAConv2d
