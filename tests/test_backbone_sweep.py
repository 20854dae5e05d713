"""``conv_cfg=dict(type='OREPA')`` on the stock backbones of mmdet, mmseg and mmpretrain.

Each backbone that builds its convs through ``build_conv_layer(conv_cfg, ...)`` is built tiny
with OREPA convs, takes one SGD step, is re-parameterized with ``orepa_mm.reparameterize_model``
and must then load strictly into the same stock class built with ``conv_cfg=None`` and compute
the same outputs (compared in float64, so only a structural difference can fail).

Backbones whose convs OREPA does not support are refused at build time with one clear sentence
(``REFUSED``); a few accept ``conv_cfg`` but never use it and stay plain (``IGNORED``). The
docs/configs.md lists all three groups.
"""
import functools
import importlib

import pytest
import torch
import torch.nn as nn
from mmengine.registry import DefaultScope
from mmpretrain.models.backbones.cspnet import (DarknetBottleneck, ResNetBottleneck,
                                                ResNeXtBottleneck)

import orepa_mm
from orepa_mm.cnn import ReparamConv2d
from orepa_mm.deploy import count_reparameterizable

OREPA = dict(type='OREPA')
#: Stands for the swept conv_cfg inside nested arguments (e.g. a ``backbone_cfg``).
CONV_CFG = '<conv_cfg>'

# A tiny HRNet: every stage, BASIC and BOTTLENECK blocks, fuse layers, 1 module each.
HRNET_EXTRA = dict(
    stage1=dict(
        num_modules=1, num_branches=1, block='BOTTLENECK', num_blocks=(1, ), num_channels=(8, )),
    stage2=dict(
        num_modules=1, num_branches=2, block='BASIC', num_blocks=(1, 1), num_channels=(8, 16)),
    stage3=dict(
        num_modules=1,
        num_branches=3,
        block='BASIC',
        num_blocks=(1, 1, 1),
        num_channels=(8, 16, 32)),
    stage4=dict(
        num_modules=1,
        num_branches=4,
        block='BASIC',
        num_blocks=(1, 1, 1, 1),
        num_channels=(8, 16, 32, 64)))
# Four stages of widths 8, 16, 32, 64 (1, 1, 2, 1 blocks), group width 8: grouped 3 x 3 convs.
TINY_REGNET = dict(w0=8, wa=12, wm=2.0, group_w=8, depth=5, bot_mul=1.0)
R18 = dict(depth=18, base_channels=8)
R50 = dict(depth=50, base_channels=8, stem_channels=8)
R50_DEEP_STEM = dict(depth=50, base_channels=8, stem_channels=16)
UNET = dict(
    base_channels=8,
    num_stages=3,
    strides=(1, 1, 1),
    enc_num_convs=(1, 1, 1),
    dec_num_convs=(1, 1),
    downsamples=(True, True),
    enc_dilations=(1, 1, 1),
    dec_dilations=(1, 1))


def tiny(library, name, arch_settings):
    """``library``'s backbone ``name`` with smaller ``arch_settings`` (a subclass, used for both
    the OREPA and the stock build, so the comparison stays like for like)."""

    @functools.lru_cache(maxsize=None)
    def make():
        base = getattr(importlib.import_module(f'{library}.models.backbones'), name)
        return type(f'Tiny{name}', (base, ), dict(arch_settings=arch_settings))

    return make


# Channels of the stock arch_settings / 4-8 (the stems keep theirs), one block per stage.
TINY_DARKNET = tiny('mmdet', 'Darknet',
                    {53: ((1, 1, 1, 1, 1), ((32, 16), (16, 32), (32, 64), (64, 128), (128, 256)))})
TINY_CSPDARKNET = tiny(
    'mmpretrain', 'CSPDarkNet', {
        53:
        dict(
            block_fn=DarknetBottleneck,
            in_channels=(32, 16, 32, 64, 128),
            out_channels=(16, 32, 64, 128, 256),
            num_blocks=(1, 1, 1, 1, 1),
            expand_ratio=(2, 1, 1, 1, 1),
            bottle_ratio=(2, 1, 1, 1, 1),
            has_downsampler=True,
            down_growth=True)
    })
TINY_CSPRESNET = tiny(
    'mmpretrain', 'CSPResNet', {
        50:
        dict(
            block_fn=ResNetBottleneck,
            in_channels=(64, 16, 32, 64),
            out_channels=(16, 32, 64, 128),
            num_blocks=(1, 1, 1, 1),
            expand_ratio=4,
            bottle_ratio=2,
            has_downsampler=(False, True, True, True),
            down_growth=False)
    })
TINY_CSPRESNEXT = tiny(
    'mmpretrain', 'CSPResNeXt', {
        50:
        dict(
            block_fn=ResNeXtBottleneck,
            in_channels=(16, 32, 64, 128),
            out_channels=(32, 64, 128, 256),
            num_blocks=(1, 1, 1, 1),
            expand_ratio=(4, 2, 2, 2),
            bottle_ratio=4,
            has_downsampler=(False, True, True, True),
            down_growth=False,
            block_args=dict(base_channels=8, groups=4))
    })

# id 'library.Class[-variant]' -> (library, class name or tiny(...), arguments, input size).
SWEEP = {
    # -- mmdet --------------------------------------------------------------------------------
    'mmdet.ResNet-18': ('mmdet', 'ResNet', R18, 32),
    'mmdet.ResNet-50': ('mmdet', 'ResNet', R50, 32),
    'mmdet.ResNetV1d': ('mmdet', 'ResNetV1d', R50_DEEP_STEM, 32),
    'mmdet.ResNeXt': ('mmdet', 'ResNeXt', dict(R50, groups=4, base_width=4), 32),
    'mmdet.RegNet': ('mmdet', 'RegNet', dict(arch=TINY_REGNET, base_channels=8), 32),
    'mmdet.Res2Net': ('mmdet', 'Res2Net', dict(R50_DEEP_STEM, scales=2, base_width=4), 32),
    'mmdet.ResNeSt': ('mmdet', 'ResNeSt', dict(R50_DEEP_STEM, radix=2, reduction_factor=4), 32),
    'mmdet.DetectoRS_ResNet': ('mmdet', 'DetectoRS_ResNet', R50, 32),
    'mmdet.TridentResNet': ('mmdet', 'TridentResNet',
                            dict(
                                R50,
                                num_branch=3,
                                test_branch_idx=1,
                                trident_dilations=(1, 2, 3),
                                num_stages=3,
                                strides=(1, 2, 2),
                                dilations=(1, 1, 1),
                                out_indices=(2, )), 32),
    'mmdet.HRNet': ('mmdet', 'HRNet', dict(extra=HRNET_EXTRA), 32),
    'mmdet.CSPDarknet': ('mmdet', 'CSPDarknet', dict(deepen_factor=0.33, widen_factor=0.125), 64),
    'mmdet.CSPNeXt': ('mmdet', 'CSPNeXt', dict(deepen_factor=0.33, widen_factor=0.125), 64),
    'mmdet.CSPNeXt-depthwise':
    ('mmdet', 'CSPNeXt', dict(deepen_factor=0.33, widen_factor=0.125, use_depthwise=True), 64),
    'mmdet.Darknet': ('mmdet', TINY_DARKNET, dict(depth=53), 32),
    'mmdet.MobileNetV2': ('mmdet', 'MobileNetV2', dict(widen_factor=0.25), 32),
    'mmdet.EfficientNet': ('mmdet', 'EfficientNet', dict(arch='b0', out_indices=(2, 4, 6)), 32),
    # -- mmseg --------------------------------------------------------------------------------
    'mmseg.ResNetV1c-D8':
    ('mmseg', 'ResNetV1c',
     dict(R50_DEEP_STEM, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True), 32),
    'mmseg.ResNetV1d': ('mmseg', 'ResNetV1d', dict(R18, stem_channels=16), 32),
    'mmseg.ResNeXt': ('mmseg', 'ResNeXt', dict(R50, groups=4, base_width=4), 32),
    'mmseg.ResNeSt': ('mmseg', 'ResNeSt', dict(R50_DEEP_STEM, radix=2), 32),
    'mmseg.HRNet': ('mmseg', 'HRNet', dict(extra=HRNET_EXTRA), 32),
    'mmseg.UNet': ('mmseg', 'UNet', UNET, 32),
    'mmseg.CGNet': ('mmseg', 'CGNet',
                    dict(num_channels=(8, 16, 32), num_blocks=(1, 1), reductions=(4, 8)), 32),
    'mmseg.FastSCNN': ('mmseg', 'FastSCNN',
                       dict(
                           downsample_dw_channels=(8, 16),
                           global_in_channels=16,
                           global_block_channels=(16, 24, 32),
                           global_out_channels=32,
                           higher_in_channels=16,
                           lower_in_channels=32,
                           fusion_out_channels=32), 64),
    'mmseg.MobileNetV2': ('mmseg', 'MobileNetV2', dict(widen_factor=0.25), 32),
    'mmseg.MobileNetV3': ('mmseg', 'MobileNetV3', dict(arch='small'), 32),
    'mmseg.BiSeNetV1': (
        'mmseg',
        'BiSeNetV1',
        dict(  # its own convs ignore conv_cfg
            backbone_cfg=dict(type='ResNet', conv_cfg=CONV_CFG, depth=18, base_channels=8),
            context_channels=(16, 32, 64),
            spatial_channels=(8, 8, 8, 16),
            out_channels=32),
        64),
    'mmseg.ICNet': ('mmseg', 'ICNet',
                    dict(
                        backbone_cfg=dict(
                            type='ResNetV1c',
                            conv_cfg=CONV_CFG,
                            depth=18,
                            base_channels=8,
                            stem_channels=16,
                            strides=(1, 2, 1, 1),
                            dilations=(1, 1, 2, 4),
                            contract_dilation=True),
                        layer_channels=(16, 64),
                        light_branch_middle_channels=8,
                        psp_out_channels=16,
                        out_channels=(8, 16, 16)), 64),
    # -- mmpretrain ---------------------------------------------------------------------------
    'mmpretrain.ResNet': ('mmpretrain', 'ResNet', dict(R50, out_indices=(0, 1, 2, 3)), 32),
    'mmpretrain.ResNetV1c': ('mmpretrain', 'ResNetV1c', dict(R50_DEEP_STEM), 32),
    'mmpretrain.ResNetV1d': ('mmpretrain', 'ResNetV1d', dict(R18, stem_channels=16), 32),
    'mmpretrain.ResNet_CIFAR': ('mmpretrain', 'ResNet_CIFAR', dict(R18, stem_channels=8), 32),
    'mmpretrain.ResNeXt': ('mmpretrain', 'ResNeXt', dict(R50, groups=4, width_per_group=4), 32),
    'mmpretrain.SEResNet': ('mmpretrain', 'SEResNet', dict(R50, se_ratio=4), 32),
    'mmpretrain.SEResNeXt': ('mmpretrain', 'SEResNeXt',
                             dict(R50, groups=4, width_per_group=4, se_ratio=4), 32),
    'mmpretrain.Res2Net': ('mmpretrain', 'Res2Net', dict(R50_DEEP_STEM, scales=2,
                                                         base_width=4), 32),
    'mmpretrain.ResNeSt': ('mmpretrain', 'ResNeSt', dict(R50_DEEP_STEM, radix=2), 32),
    'mmpretrain.RegNet': ('mmpretrain', 'RegNet', dict(arch=TINY_REGNET, base_channels=8), 32),
    'mmpretrain.HRNet': ('mmpretrain', 'HRNet', dict(extra=HRNET_EXTRA), 32),
    'mmpretrain.CSPDarkNet': ('mmpretrain', TINY_CSPDARKNET, dict(depth=53), 32),
    'mmpretrain.CSPResNet': ('mmpretrain', TINY_CSPRESNET, dict(depth=50), 32),
    'mmpretrain.CSPResNeXt': ('mmpretrain', TINY_CSPRESNEXT, dict(depth=50), 32),
    'mmpretrain.MobileNetV2': ('mmpretrain', 'MobileNetV2', dict(widen_factor=0.25), 32),
    'mmpretrain.MobileNetV3': ('mmpretrain', 'MobileNetV3', dict(arch='small'), 32),
    'mmpretrain.ShuffleNetV2': ('mmpretrain', 'ShuffleNetV2', dict(widen_factor=0.5), 32),
    'mmpretrain.EfficientNet': ('mmpretrain', 'EfficientNet', dict(arch='b0'), 32),
    'mmpretrain.EfficientNetV2': ('mmpretrain', 'EfficientNetV2', dict(arch='b0'), 32),
    'mmpretrain.MobileViT': ('mmpretrain', 'MobileViT', dict(arch='xx_small'), 64),
    'mmpretrain.VGG':
    ('mmpretrain', 'VGG',
     dict(depth=11, num_stages=3, dilations=(1, 1, 1), out_indices=(2, ),
          norm_cfg=dict(type='BN')), 32),
    'mmpretrain.RepVGG': ('mmpretrain', 'RepVGG', dict(arch='A0', base_channels=8), 32),
}

# Structural re-param backbones deploy to their own deployed form: the stock model to compare
# with is built with these extra arguments, and the tolerance is float32's (RepVGG builds its
# fused conv in the default dtype and writes the fused kernel into it).
DEPLOYED_AS = {
    'mmpretrain.RepVGG': (dict(deploy=True), 1e-5),
}

# id -> (library, class, arguments, exception, message): refused when built with OREPA.
REFUSED = {
    # depthwise 1 x 1 "scale" branches (groups = channels)
    'mmpretrain.MobileOne': ('mmpretrain', 'MobileOne', dict(arch='s0'), ValueError,
                             r'OREPA 1x1 blocks support groups=1 only'),
    # grouped 1 x 1 convs
    'mmpretrain.ShuffleNetV1': ('mmpretrain', 'ShuffleNetV1', dict(groups=3, widen_factor=0.25),
                                ValueError, r'OREPA 1x1 blocks support groups=1 only'),
    # a 2 x 2 (even) patch-embedding conv
    'mmpretrain.RepMLPNet': ('mmpretrain', 'RepMLPNet', dict(arch='b'), ValueError,
                             r'OREPAConv2d needs an odd kernel size >= 3, got 2'),
}

# id -> (library, class, arguments): accept ``conv_cfg`` but never pass it to a conv (the library
# stores it only), so the model stays plain. BiSeNetV1 / ICNet: put conv_cfg in backbone_cfg.
IGNORED = {
    'mmseg.BiSeNetV1': ('mmseg', 'BiSeNetV1',
                        dict(
                            backbone_cfg=dict(type='ResNet', depth=18, base_channels=8),
                            context_channels=(16, 32, 64),
                            spatial_channels=(8, 8, 8, 16),
                            out_channels=32)),
    'mmseg.BiSeNetV2':
    ('mmseg', 'BiSeNetV2',
     dict(detail_channels=(8, 16, 32), semantic_channels=(8, 16, 32, 64), bga_channels=32)),
    'mmseg.ERFNet': ('mmseg', 'ERFNet', dict()),
    'mmpretrain.RepLKNet': ('mmpretrain', 'RepLKNet',
                            dict(
                                arch=dict(
                                    large_kernel_sizes=[7, 7, 7, 7],
                                    layers=[1, 1, 1, 1],
                                    channels=[8, 16, 32, 64],
                                    small_kernel=3,
                                    dw_ratio=1))),
}

pytestmark = pytest.mark.usefixtures('one_thread')


def with_conv_cfg(value, conv_cfg):
    if isinstance(value, dict):
        return {k: with_conv_cfg(v, conv_cfg) for k, v in value.items()}
    return conv_cfg if value == CONV_CFG else value


def build(library, name, kwargs, conv_cfg):
    """The backbone, built in its library's scope (for nested builds such as UNet's upsample
    layers and ICNet's backbone_cfg)."""
    cls = (
        getattr(importlib.import_module(f'{library}.models.backbones'), name) if isinstance(
            name, str) else name())
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope(library):
        model = cls(conv_cfg=conv_cfg, **with_conv_cfg(kwargs, conv_cfg))
        model.init_weights()
    for m in model.modules():
        if type(m).__name__ == 'TridentConv':  # mmdet leaves it torch.Tensor(...) garbage
            nn.init.kaiming_uniform_(m.weight, a=1)
    return model


def flatten(outputs):
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [t for o in outputs for t in flatten(o)]


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def sweep_params():
    return [
        pytest.param(*case, *DEPLOYED_AS.get(case_id, ({}, 1e-10)), id=case_id)
        for case_id, case in SWEEP.items()
    ]


def randomise_norms(model, x):
    """Random affine norm parameters (zero-init residual norms hide the convs before them) and
    running statistics of this batch (default ones let activations grow without bound)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    model.train()
    for m in norms:
        m.train()  # also under norm_eval=True
        m.momentum = None  # cumulative average: one batch -> its statistics
        m.reset_running_stats()
    with torch.no_grad():
        model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


@pytest.mark.parametrize('library,name,kwargs,size,deployed_as,rtol', sweep_params())
def test_orepa_conv_cfg_trains_and_deploys_to_the_stock_backbone(library, name, kwargs, size,
                                                                 deployed_as, rtol):
    model = build(library, name, kwargs, OREPA)
    assert count_reparameterizable(model) > 0
    x = torch.randn(2, 3, size, size)
    randomise_norms(model, x)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sum(o.pow(2).mean() for o in flatten(model(x))).backward()
    untrained = [
        f'{n}.{p}' for n, m in model.named_modules() if isinstance(m, ReparamConv2d)
        for p, t in m.named_parameters() if t.requires_grad and t.grad is None
    ]
    assert untrained == []  # every branch of every OREPA layer learns
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # tiny batches: keep the step sane
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    model.eval()
    model.double()
    x = x.double()
    with torch.no_grad():
        before = flatten(model(x))
        assert orepa_mm.reparameterize_model(model) is model
        assert count_reparameterizable(model) == 0
        after = flatten(model(x))
        stock = build(library, name, dict(kwargs, **deployed_as), None).double()
        stock.load_state_dict(model.state_dict(), strict=True)
        stock.eval()
        reference = flatten(stock(x))
    assert len(before) == len(after) == len(reference) > 0
    for b, a, r in zip(before, after, reference):
        assert a.shape == b.shape == r.shape and torch.isfinite(b).all()
        assert rel_err(a, b) < rtol and rel_err(r, b) < rtol
    assert ({
        n: type(m)
        for n, m in model.named_modules()
    } == {
        n: type(m)
        for n, m in stock.named_modules()
    })


@pytest.mark.parametrize(
    'library,name,kwargs,error,message', list(REFUSED.values()), ids=list(REFUSED))
def test_unsupported_convs_are_refused_at_build_time(library, name, kwargs, error, message):
    with pytest.raises(error, match=message):
        build(library, name, kwargs, OREPA)


@pytest.mark.parametrize('library,name,kwargs', list(IGNORED.values()), ids=list(IGNORED))
def test_backbones_that_ignore_conv_cfg_stay_plain(library, name, kwargs):
    """Documents the library behaviour: nothing to re-parameterize, nothing silently half-done."""
    assert count_reparameterizable(build(library, name, kwargs, OREPA)) == 0
