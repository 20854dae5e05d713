"""The deployed artefact of a stock model with DBB convs: baked conv biases folded into BNs.

DBB bakes into a conv with a bias; the stock ResNets build that conv with ``bias=False`` because
a BN follows it. :mod:`orepa_mm.apis.bias_fold` moves the bias into that BN's running mean
(exact), so the baked model loads strictly into the stock model. Checked in float64 on models
trained one step with random BN statistics, for each structure the fold knows (mmdet ResNet
blocks, mmseg's deep stem as a Sequential, a ConvModule), and the refusal everywhere else.
"""
import copy

import pytest
import torch
import torch.nn as nn
from mmengine.registry import MODELS, DefaultScope

import orepa_mm  # noqa: F401  (registers DBB)
from orepa_mm.apis.bias_fold import BiasFoldError, fold_conv_biases
from orepa_mm.cnn import DBBConv2d
from orepa_mm.deploy import reparameterize_model

pytestmark = pytest.mark.usefixtures('one_thread')

DBB = dict(type='DBB')


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def build(scope, cfg):
    with DefaultScope.overwrite_default_scope(scope):
        return MODELS.build(copy.deepcopy(cfg))


def outputs(model, x):
    out = model(x)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def train_one_step(model, seed=0):
    """One SGD step (train mode, BN statistics updated), then random BN statistics and affine
    parameters, so that neither zero-initialised branches nor unit statistics hide a mistake."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = sum(o.square().mean() for o in outputs(model, torch.randn(4, 3, 32, 32, generator=g)))
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.2, generator=g)
    model.eval()  # mmdet's/mmseg's ResNet.train() returns None: never chain it
    return model


def deploy_float64(model, stock):
    """Bake ``model`` in float64, fold, load strictly into ``stock`` (float64); the folded
    conv names."""
    baked = reparameterize_model(copy.deepcopy(model).double())
    folded = fold_conv_biases(baked, set(stock.state_dict()))
    stock.double().load_state_dict(baked.state_dict(), strict=True)
    stock.eval()
    return folded


def dbb_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, DBBConv2d))


@pytest.mark.parametrize(
    'scope,cfg',
    [
        # The brief's case: mmdet ResNet-18, DBB in every block's conv1 and conv2.
        ('mmdet', dict(type='ResNet', depth=18, base_channels=8, norm_eval=False)),
        # Bottlenecks (DBB in conv2) and mmseg's deep stem: stem.0 -> stem.1, stem.3 -> stem.4, ...
        ('mmseg', dict(
            type='ResNetV1c', depth=50, stem_channels=8, base_channels=8, norm_eval=False)),
        # mmpretrain's ResNet, avg_down shortcut (downsample = AvgPool, conv 1x1, BN).
        ('mmpretrain', dict(type='ResNetV1d', depth=18, stem_channels=8, base_channels=8)),
    ])
def test_dbb_resnet_deploys_strictly_into_the_stock_resnet(scope, cfg):
    model = train_one_step(build(scope, dict(cfg, conv_cfg=DBB)))
    stock = build(scope, cfg)
    with pytest.raises(RuntimeError, match='Unexpected key'):  # what the fold is for
        stock.load_state_dict(reparameterize_model(copy.deepcopy(model)).state_dict())
    folded = deploy_float64(model, stock)
    assert sorted(folded) == dbb_names(model) and len(folded) >= 8
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, deployed = outputs(model.double(), x), outputs(stock, x)
    assert len(reference) == len(deployed)
    for a, b in zip(deployed, reference):
        assert rel_err(a, b) < 1e-9


def test_conv_module_conv_then_norm_folds():
    from mmcv.cnn import ConvModule
    torch.manual_seed(0)
    make = lambda conv_cfg: nn.Sequential(  # noqa: E731
        ConvModule(3, 8, 3, padding=1, conv_cfg=conv_cfg, norm_cfg=dict(type='BN')),
        ConvModule(
            8,
            4,
            3,
            padding=1,
            conv_cfg=conv_cfg,
            norm_cfg=dict(type='BN'),
            order=('conv', 'norm', 'act')))
    model = train_one_step(make(DBB))
    stock = make(None)
    assert deploy_float64(model, stock) == ['0.conv', '1.conv']
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(stock(x), model.double()(x)) < 1e-9


@pytest.mark.parametrize('case', ['group_norm', 'norm_before_conv'])
def test_a_bias_with_no_bn_right_after_is_refused_in_one_sentence(case):
    """GN cannot absorb a per-channel shift; a ConvModule ordered norm -> conv has no BN after
    its conv. Nothing is changed when refusing."""
    if case == 'group_norm':
        cfg = dict(type='ResNet', depth=18, base_channels=8, norm_cfg=dict(type='GN', num_groups=2))
        model, stock = build('mmdet', dict(cfg, conv_cfg=DBB)), build('mmdet', cfg)
        name = 'layer1.0.conv1'
    else:
        from mmcv.cnn import ConvModule

        def make(conv_cfg):
            return nn.Sequential(
                ConvModule(
                    8,
                    8,
                    3,
                    padding=1,
                    conv_cfg=conv_cfg,
                    norm_cfg=dict(type='BN'),
                    order=('norm', 'conv', 'act')))

        model, stock = make(DBB), make(None)
        name = '0.conv'
    model.eval()  # mmdet's ResNet.train() returns None: never chain it
    baked = reparameterize_model(copy.deepcopy(model))
    before = {k: v.clone() for k, v in baked.state_dict().items()}
    with pytest.raises(BiasFoldError) as refusal:
        fold_conv_biases(baked, set(stock.state_dict()))
    message = str(refusal.value)
    assert message.startswith(f'{name} bakes into a conv with a bias') and '\n' not in message
    assert message.count('. ') == 0  # one sentence
    after = baked.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_biases_the_stock_model_has_are_left_alone():
    """A conv whose stock counterpart has a bias too (no norm: ConvModule's bias='auto') keeps
    it, BN untouched."""
    from mmcv.cnn import ConvModule
    make = lambda conv_cfg: nn.Sequential(  # noqa: E731
        ConvModule(3, 4, 3, padding=1, conv_cfg=conv_cfg), nn.BatchNorm2d(4))
    model, stock = make(DBB).eval(), make(None)
    baked = reparameterize_model(copy.deepcopy(model))
    mean = baked[1].running_mean.clone()
    assert fold_conv_biases(baked, set(stock.state_dict())) == []
    assert baked[0].conv.bias is not None and torch.equal(baked[1].running_mean, mean)
