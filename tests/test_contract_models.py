"""The re-param layer contract at model level: necks, heads and backbones (issue 20).

``conv_cfg=dict(type='OREPA')`` is accepted by every OpenMMLab module that builds its convs
with ``build_conv_layer``, so the contract must hold where the layers sit inside real modules
(ConvModule's ``bias='auto'``, norms after some convs and not others, 1 x 1 and 3 x 3 convs):

* train one step, deploy, and the deployed state dict loads strictly into the same module built
  with ``conv_cfg=None`` and computes the same function;
* a stock checkpoint of the module (random biases included) loaded into the OREPA one gives the
  stock outputs;
* a backbone's own ``switch_to_deploy()`` (what mmdeploy calls) is exactly
  ``orepa_mm.reparameterize_model``: nothing re-parameterizable left, the same state dict, and
  it loads strictly into the stock deployed class.

Everything in float64, compared to 1e-9 relative.
"""
import copy
from typing import Callable, Dict, Tuple

import pytest
import torch

import orepa_mm
from orepa_mm.deploy import is_reparameterizable
from tests.numerics import randomise, rel_err

pytestmark = pytest.mark.usefixtures('one_thread')

TOL = 1e-9
OREPA = dict(type='OREPA')


def _tensors(out):
    """The tensors of a module's output (a tensor, or nested tuples / lists of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _tensors(item)]


def _features(channels, sizes, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(batch, c, s, s, generator=g, dtype=torch.float64)
        for c, s in zip(channels, sizes))


def _mmdet_fpn(conv_cfg):
    from mmdet.models.necks import FPN
    return FPN([8, 16, 32], 8, num_outs=4, add_extra_convs='on_input', conv_cfg=conv_cfg)


def _mmdet_retina_head(conv_cfg):
    from mmdet.models.dense_heads import RetinaHead
    return RetinaHead(
        num_classes=3, in_channels=8, feat_channels=8, stacked_convs=2, conv_cfg=conv_cfg)


def _mmseg_fpn(conv_cfg):
    from mmseg.models.necks import FPN
    return FPN([8, 16, 32], 8, num_outs=3, conv_cfg=conv_cfg)


def _mmseg_uper_head(conv_cfg):
    from mmseg.models.decode_heads import UPerHead
    return UPerHead(
        in_channels=[8, 16, 32, 64],
        in_index=[0, 1, 2, 3],
        channels=8,
        num_classes=3,
        pool_scales=(1, 2, 3),
        dropout_ratio=0.0,
        conv_cfg=conv_cfg,
        norm_cfg=dict(type='BN'),
        align_corners=False)


#: name -> (build(conv_cfg), the module's input).
MODULES: Dict[str, Tuple[Callable, Callable]] = {
    'mmdet.FPN': (_mmdet_fpn, lambda: _features([8, 16, 32], [16, 8, 4])),
    'mmdet.RetinaHead': (_mmdet_retina_head, lambda: _features([8, 8], [8, 4])),
    'mmseg.FPN': (_mmseg_fpn, lambda: _features([8, 16, 32], [16, 8, 4])),
    'mmseg.UPerHead': (_mmseg_uper_head, lambda: [*_features([8, 16, 32, 64], [16, 8, 4, 2])]),
}


def _build(name, conv_cfg, seed):
    from mmengine.registry import DefaultScope
    torch.manual_seed(seed)
    # Heads build their losses and coders by bare name: in their library's scope, whatever
    # scope an earlier test left behind.
    with DefaultScope.overwrite_default_scope(name.split('.')[0]):
        module = randomise(MODULES[name][0](conv_cfg).double(), seed)
    if conv_cfg is not None:
        assert orepa_mm.count_reparameterizable(module) > 0
    return module


def _eval_outputs(module, x):
    module.eval()
    with torch.no_grad():
        return _tensors(module(x))


def _assert_same_outputs(outputs, expected):
    assert len(outputs) == len(expected)
    for out, ref in zip(outputs, expected):
        assert out.shape == ref.shape
        assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize('name', sorted(MODULES))
def test_trained_module_deploys_into_the_stock_module(name):
    """Train one step, deploy: the deployed state dict is the stock module's, with the same
    outputs, and loads back into a fresh OREPA module as the same function."""
    model = _build(name, OREPA, seed=1)
    x = MODULES[name][1]()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sum(out.square().mean() for out in _tensors(model(x))).backward()
    optimizer.step()
    expected = _eval_outputs(model, x)
    orepa_mm.reparameterize_model(model)
    assert orepa_mm.count_reparameterizable(model) == 0
    _assert_same_outputs(_eval_outputs(model, x), expected)
    stock = _build(name, None, seed=2)
    stock.load_state_dict(model.state_dict(), strict=True)
    _assert_same_outputs(_eval_outputs(stock, x), expected)
    # and back: the deployed checkpoint initialises a fresh train-time module to that function
    fresh = _build(name, OREPA, seed=3)
    fresh.load_state_dict(model.state_dict(), strict=True)
    _assert_same_outputs(_eval_outputs(fresh, x), expected)


@pytest.mark.parametrize('name', sorted(MODULES))
def test_stock_checkpoint_gives_the_stock_outputs(name):
    """A stock neck / head checkpoint (every bias random) initialises the OREPA module to the
    stock function: in eval, and in a training forward (the kernel does not depend on it)."""
    stock = _build(name, None, seed=1)
    model = _build(name, OREPA, seed=2)
    layers = orepa_mm.count_reparameterizable(model)
    model.load_state_dict(stock.state_dict(), strict=True)
    assert orepa_mm.count_reparameterizable(model) == layers  # still the OREPA module
    x = MODULES[name][1]()
    _assert_same_outputs(_eval_outputs(model, x), _eval_outputs(stock, x))
    stock.train()
    model.train()
    with torch.no_grad():
        _assert_same_outputs(_tensors(model(x)), _tensors(stock(x)))


# -- a backbone's own switch_to_deploy() is reparameterize_model ----------------------------
#: A RepVGG-A0-like arch, at a quarter of the width.
REPVGG_ARCH = dict(
    num_blocks=[1, 2, 1, 1],
    width_factor=[0.25, 0.25, 0.25, 0.25],
    group_layer_map=None,
    se_cfg=None)


def _mmpretrain_repvgg(deploy=False):
    from mmpretrain.models.backbones import RepVGG
    if deploy:
        return RepVGG(arch=REPVGG_ARCH, deploy=True, out_indices=(1, 3))
    return RepVGG(arch=REPVGG_ARCH, conv_cfg=OREPA, out_indices=(1, 3))


def _orepa_vgg(deploy=False):
    from mmpretrain.models.backbones import RepVGG

    from orepa_mm.models.backbones.orepa_vgg import OREPAVGG
    if deploy:
        return RepVGG(arch=REPVGG_ARCH, deploy=True, out_indices=(1, 3))
    return OREPAVGG(arch=REPVGG_ARCH, out_indices=(1, 3))


def _orepa_resnet(deploy=False):
    from mmdet.models.backbones import ResNet

    from orepa_mm.models.backbones.for_mmdet import OREPAResNet
    cls = ResNet if deploy else OREPAResNet
    return cls(depth=18, base_channels=8, stem_channels=8, out_indices=(1, 3))


BACKBONES = {
    'mmpretrain.RepVGG(conv_cfg=OREPA)': _mmpretrain_repvgg,
    'OREPAVGG': _orepa_vgg,
    'OREPAResNet': _orepa_resnet,
}


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_switch_to_deploy_is_reparameterize_model(name):
    torch.manual_seed(0)
    model = randomise(BACKBONES[name]().double(), seed=1)
    model.eval()  # mm backbones' train() returns None: never chain it
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = _eval_outputs(model, x)
    twin = copy.deepcopy(model)
    model.switch_to_deploy()
    remaining = [n for n, m in model.named_modules() if is_reparameterizable(m)]
    assert not remaining, f'{len(remaining)} re-param layers left, e.g. {remaining[:3]}'
    orepa_mm.reparameterize_model(twin)
    state, reference = model.state_dict(), twin.state_dict()
    assert list(state) == list(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value), key
    stock = BACKBONES[name](deploy=True).double()
    stock.load_state_dict(state, strict=True)
    _assert_same_outputs(_eval_outputs(stock, x), expected)
    _assert_same_outputs(_eval_outputs(model, x), expected)
