"""OREPAResNet / OREPAVGG: official parity, deploy == stock, drop-in shapes, freezing."""
import copy

import mmdet.models.backbones as mmdet_backbones  # noqa: E402
import mmpretrain.models.backbones as mmpretrain_backbones  # noqa: E402
import mmseg.models.backbones as mmseg_backbones  # noqa: E402
import pytest
import torch
import torch.nn as nn
from mmengine.runner import load_checkpoint

import orepa_mm  # noqa: F401
from orepa_mm.apis.official_checkpoint import convert_official_state_dict
from orepa_mm.cnn import OREPAConv2d, ReparamConv2d
from orepa_mm.deploy import count_reparameterizable
from orepa_mm.models.backbones import for_mmdet, for_mmpretrain, for_mmseg
from tests.official_reference import (random_official_checkpoint, reference_path,
                                      repvgg_stage_outputs, resnet_stage_outputs)


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def randomise(model, seed=0):
    """Random scales, branch weights and BN statistics (default BN init hides mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            if isinstance(m, ReparamConv2d):
                for name, p in m.named_parameters(recurse=False):
                    if 'scale' in name:
                        p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.1)
    model.eval()  # mmdet's and mmseg's ResNet.train() returns None: never chain it
    return model


def stem_output(resnet, x):
    return resnet.maxpool(resnet.relu(resnet.norm1(resnet.conv1(x))))


def save_converted(checkpoint, tmp_path):
    state_dict, report = convert_official_state_dict(checkpoint)
    path = tmp_path / 'converted.pth'
    torch.save(dict(state_dict=state_dict), path)
    return str(path), report


# -- official parity -----------------------------------------------------------------------------
def test_official_resnet18_fixture_reproduces_authors_outputs(tmp_path):
    checkpoint = torch.load(reference_path('official_resnet18_w0.25.pth.tar'), weights_only=True)
    expected = torch.load(reference_path('official_resnet18_w0.25_expected.pt'), weights_only=True)
    path, report = save_converted(checkpoint, tmp_path)
    assert report.architecture == dict(
        family='resnet', depth=18, base_channels=16, stem_channels=16)
    model = for_mmdet.OREPAResNet(
        depth=18,
        base_channels=16,
        stem_channels=16,
        init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    model.eval()
    x = expected['input']
    with torch.no_grad():
        outputs = [stem_output(model, x), *model(x)]
    for ours, theirs in zip(outputs, expected['stage_outputs']):
        assert rel_err(ours, theirs) < 1e-4


@pytest.mark.parametrize('keys,family', [('official_resnet50_keys.json', 'resnet'),
                                         ('official_resnet18_keys.json', 'resnet'),
                                         ('official_repvgg_a0_keys.json', 'repvgg')])
def test_official_format_checkpoints_match_the_authors_formulas(keys, family, tmp_path):
    """Random official-format checkpoints (published key lists, width / 4) through the
    converter reproduce an independent implementation of the authors' models."""
    checkpoint = random_official_checkpoint(keys)
    path, report = save_converted(checkpoint, tmp_path)
    arch = report.architecture
    assert arch['family'] == family
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    if family == 'resnet':
        model = for_mmpretrain.OREPAResNet(
            depth=arch['depth'],
            base_channels=arch['base_channels'],
            stem_channels=arch['stem_channels'],
            out_indices=(0, 1, 2, 3))
        load_checkpoint(model, path, strict=True)
        model.eval()
        with torch.no_grad():
            ours = [stem_output(model, x), *model(x)]
        theirs = resnet_stage_outputs(checkpoint['state_dict'], x)
    else:
        assert arch['arch'] == 'A0'
        model = for_mmpretrain.OREPAVGG(
            arch='A0', base_channels=arch['base_channels'], out_indices=(0, 1, 2, 3))
        load_checkpoint(model, path, strict=True)
        model.eval()
        with torch.no_grad():
            ours = [model.stem(x), *model(x)]
        theirs = repvgg_stage_outputs(checkpoint['state_dict'], x)
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        assert rel_err(a, b) < 1e-4


# -- deploy == stock -----------------------------------------------------------------------------
RESNET_LIBS = [
    (for_mmdet.OREPAResNet, mmdet_backbones.ResNet, {}),
    (for_mmseg.OREPAResNetV1c, mmseg_backbones.ResNetV1c,
     dict(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True)),
    (for_mmpretrain.OREPAResNet, mmpretrain_backbones.ResNet, dict(out_indices=(0, 1, 2, 3))),
]


def _deploy_parity(model, stock, x):
    with torch.no_grad():
        before = model(x)
        model.switch_to_deploy()
        model.switch_to_deploy()  # idempotent
        after = model(x)
        assert count_reparameterizable(model) == 0
        stock.load_state_dict(model.state_dict(), strict=True)
        stock.eval()
        reference = stock(x)
    before, after, reference = (
        o if isinstance(o, tuple) else (o, ) for o in (before, after, reference))
    for b, a, r in zip(before, after, reference):
        assert rel_err(a, b) < 1e-4 and rel_err(r, b) < 1e-4


@pytest.mark.parametrize('depth', [18, 34, 50, 101, 152])
@pytest.mark.parametrize(
    'orepa_cls,stock_cls,extra', RESNET_LIBS, ids=['mmdet', 'mmseg-v1c-d8', 'mmpretrain'])
def test_resnet_deploys_to_the_stock_resnet(depth, orepa_cls, stock_cls, extra):
    if depth in (101, 152) and orepa_cls is not for_mmdet.OREPAResNet:
        pytest.skip('deep variants once (mmdet) keep the suite fast')
    kwargs = dict(
        depth=depth,
        base_channels=8,
        stem_channels=8 if 'V1c' not in orepa_cls.__name__ else 16,
        **extra)
    torch.manual_seed(0)
    model = randomise(orepa_cls(**kwargs))
    stock = stock_cls(**kwargs)
    _deploy_parity(model, stock, torch.randn(1, 3, 48, 48))


REPVGG_ARCHS = ['A0', 'A1', 'A2', 'B0', 'B1', 'B1g2', 'B1g4', 'B2', 'B2g4', 'B3', 'B3g4']


@pytest.mark.parametrize('arch', REPVGG_ARCHS)
def test_orepa_vgg_deploys_to_stock_repvgg(arch):
    torch.manual_seed(0)
    kwargs = dict(arch=arch, base_channels=8, out_indices=(0, 1, 2, 3))
    model = randomise(for_mmpretrain.OREPAVGG(**kwargs))
    dense = model.stem.branch_3x3.conv
    assert isinstance(dense, OREPAConv2d) and '1x1' not in dense.branches
    assert type(model.stem.branch_1x1.conv) is nn.Conv2d
    stock = mmpretrain_backbones.RepVGG(deploy=True, **kwargs)
    _deploy_parity(model, stock, torch.randn(1, 3, 32, 32))
    assert set(model.state_dict()) == set(stock.state_dict())


def test_orepa_vgg_custom_arch_and_deploy_flag():
    arch = dict(
        num_blocks=[1, 1, 1, 1], width_factor=[1, 1, 1, 1], group_layer_map=None, se_cfg=None)
    model = for_mmpretrain.OREPAVGG(arch=arch, base_channels=8)
    assert count_reparameterizable(model) == 5  # stem + one block per stage
    deployed = for_mmpretrain.OREPAVGG(arch=arch, base_channels=8, deploy=True)
    assert count_reparameterizable(deployed) == 0
    model.switch_to_deploy()
    assert set(model.state_dict()) == set(deployed.state_dict())


# -- drop-in behaviour ---------------------------------------------------------------------------
SHAPE_CASES = [
    (for_mmdet.OREPAResNet, mmdet_backbones.ResNet, dict(depth=50, out_indices=(0, 1, 2, 3))),
    (for_mmdet.OREPAResNet, mmdet_backbones.ResNet,
     dict(depth=18, out_indices=(1, 2, 3), style='caffe', avg_down=True)),
    (for_mmdet.OREPAResNet, mmdet_backbones.ResNet,
     dict(depth=50, num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1), out_indices=(2, ))),
    (for_mmseg.OREPAResNetV1c, mmseg_backbones.ResNetV1c,
     dict(depth=50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True)),
    (for_mmseg.OREPAResNetV1c, mmseg_backbones.ResNetV1c,
     dict(depth=50, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2), multi_grid=(1, 2, 4))),
    (for_mmpretrain.OREPAResNetV1d, mmpretrain_backbones.ResNetV1d, dict(depth=34)),
]


@pytest.mark.parametrize('orepa_cls,stock_cls,kwargs', SHAPE_CASES)
def test_output_shapes_match_stock(orepa_cls, stock_cls, kwargs):
    kwargs = dict(kwargs, base_channels=8, stem_channels=16)
    x = torch.randn(1, 3, 64, 64)
    ours_model, stock_model = orepa_cls(**kwargs), stock_cls(**kwargs)
    ours_model.eval(), stock_model.eval()
    with torch.no_grad():
        ours, theirs = ours_model(x), stock_model(x)
    assert [o.shape for o in ours] == [t.shape for t in theirs]


def test_basic_block_shortcuts_stay_plain_and_bottleneck_ones_are_orepa():
    r18 = for_mmdet.OREPAResNet(depth=18, base_channels=8)
    assert type(r18.layer2[0].downsample[0]) is nn.Conv2d
    assert isinstance(r18.layer2[0].conv1, OREPAConv2d)
    r50 = for_mmdet.OREPAResNet(depth=50, base_channels=8)
    assert isinstance(r50.layer1[0].downsample[0], ReparamConv2d)


def _frozen(model):
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def _module_prefix(name):
    return name.split('.')[0] if not name.startswith('layer') else name.split('.')[0]


@pytest.mark.parametrize('frozen_stages,deep_stem', [(0, False), (2, False), (1, True)])
def test_frozen_stages_freeze_what_stock_freezes(frozen_stages, deep_stem):
    kwargs = dict(
        depth=50,
        base_channels=8,
        stem_channels=16,
        frozen_stages=frozen_stages,
        deep_stem=deep_stem)
    ours = for_mmdet.OREPAResNet(**kwargs)
    stock = mmdet_backbones.ResNet(**kwargs)
    ours.train(), stock.train()
    stock_modules = {_module_prefix(n) for n in _frozen(stock)}
    our_modules = {_module_prefix(n) for n in _frozen(ours)}
    assert our_modules == stock_modules and stock_modules
    # ... and every branch parameter inside them.
    for name, p in ours.named_parameters():
        assert p.requires_grad == (_module_prefix(name) not in stock_modules), name


def test_stock_checkpoint_initialises_orepa_resnet_exactly(tmp_path):
    """A stock (torchvision-style) ResNet checkpoint is a valid init_cfg: same outputs."""
    torch.manual_seed(0)
    stock = randomise(mmdet_backbones.ResNet(depth=50, base_channels=16))
    path = tmp_path / 'stock.pth'
    torch.save(dict(state_dict=stock.state_dict()), path)
    model = for_mmdet.OREPAResNet(
        depth=50, base_channels=16, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for ours, theirs in zip(model(x), stock(x)):
            assert rel_err(ours, theirs) < 1e-5


def test_with_cp_norm_eval_and_syncbn_behave_like_stock():
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    plain = for_mmdet.OREPAResNet(depth=18, base_channels=8)
    checkpointed = copy.deepcopy(plain)
    checkpointed.with_cp = True
    for layer in checkpointed.modules():
        if hasattr(layer, 'with_cp'):
            layer.with_cp = True
    for m in (plain, checkpointed):
        m.train()
        sum(o.sum() for o in m(x.clone().requires_grad_(True))).backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        assert a.grad is None and b.grad is None or rel_err(b.grad, a.grad) < 1e-5, n
    frozen_bn = for_mmdet.OREPAResNet(depth=18, base_channels=8, norm_eval=True)
    frozen_bn.train()
    assert all(not m.training for m in frozen_bn.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))
    sync = for_mmdet.OREPAResNet(depth=18, base_channels=8, norm_cfg=dict(type='SyncBN'))
    assert isinstance(sync.norm1, nn.SyncBatchNorm)
    sync.switch_to_deploy()
    stock = mmdet_backbones.ResNet(depth=18, base_channels=8, norm_cfg=dict(type='SyncBN'))
    stock.load_state_dict(sync.state_dict(), strict=True)


def test_official_fixture_kernels_equal_the_authors_formula(tmp_path):
    """Every squeezed kernel of the fixture, layer by layer, against the published formula."""
    from tests.official_reference import large_kernel, orepa_kernel
    checkpoint = torch.load(reference_path('official_resnet18_w0.25.pth.tar'), weights_only=True)
    official = {
        k[len('module.'):]: v.double()
        for k, v in checkpoint['state_dict'].items() if v.is_floating_point()
    }
    path, _ = save_converted(checkpoint, tmp_path)
    model = for_mmdet.OREPAResNet(depth=18, base_channels=16, stem_channels=16).double()
    load_checkpoint(model, path, strict=True)
    with torch.no_grad():
        assert rel_err(model.conv1.generate_kernel(), large_kernel(official,
                                                                   'stage0.conv1.')) < 1e-5
        checked = 1
        for stage in range(1, 5):
            for block in range(2):
                for conv in ('conv1', 'conv2'):
                    ours = getattr(getattr(model, f'layer{stage}')[block], conv)
                    theirs = orepa_kernel(official, f'stage{stage}.{block}.{conv}.')
                    assert rel_err(ours.generate_kernel(), theirs) < 1e-5
                    checked += 1
    assert checked == 17


# -- DCN stages, plugins, GN / SyncBN ------------------------------------------------------------
def _dcn_kwargs(dcn_type, **extra):
    return dict(
        depth=50,
        base_channels=8,
        stem_channels=16,
        out_indices=(0, 1, 2, 3),
        dcn=dict(type=dcn_type, deform_groups=1, fallback_on_stride=False),
        stage_with_dcn=(False, True, True, True),
        **extra)


def _randomise_offsets(model, seed=1):
    """Non-zero offsets (and masks): a zero-initialised DCN is a plain conv and hides mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, 'conv_offset'):
                m.conv_offset.weight.copy_(
                    torch.randn(m.conv_offset.weight.shape, generator=g) * 0.05)
                m.conv_offset.bias.copy_(torch.randn(m.conv_offset.bias.shape, generator=g))
    return model


def _sgd_step(model, x):
    """One training step (train mode, SGD); every trainable parameter must get a gradient."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    outputs = model(x)
    sum(o.float().pow(2).mean()
        for o in (outputs if isinstance(outputs, tuple) else (outputs, ))).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    optimizer.step()
    model.eval()


def _deploy_equals_stock(model, stock, x, rtol=1e-5):
    model.eval()
    with torch.no_grad():
        before = model(x)
        model.switch_to_deploy()
        after = model(x)
        assert count_reparameterizable(model) == 0
        stock.load_state_dict(model.state_dict(), strict=True)
        stock.eval()
        reference = stock(x)
    for b, a, r in zip(before, after, reference):
        assert rel_err(a, b) < rtol and rel_err(r, b) < rtol


DCN_LIBS = [
    (for_mmdet.OREPAResNet, mmdet_backbones.ResNet, {}),
    (for_mmdet.OREPAResNetV1d, mmdet_backbones.ResNetV1d, {}),
    (for_mmseg.OREPAResNet, mmseg_backbones.ResNet, {}),
    (for_mmseg.OREPAResNetV1c, mmseg_backbones.ResNetV1c,
     dict(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True)),
]


@pytest.mark.usefixtures('one_thread')
@pytest.mark.parametrize('dcn_type', ['DCN', 'DCNv2'])
@pytest.mark.parametrize(
    'orepa_cls,stock_cls,extra', DCN_LIBS, ids=['mmdet', 'mmdet-v1d', 'mmseg', 'mmseg-v1c-d8'])
def test_dcn_stages_keep_dcn_train_and_deploy_to_stock(dcn_type, orepa_cls, stock_cls, extra):
    from mmcv.ops import DeformConv2dPack, ModulatedDeformConv2dPack
    dcn_cls = DeformConv2dPack if dcn_type == 'DCN' else ModulatedDeformConv2dPack
    torch.manual_seed(0)
    model = orepa_cls(**_dcn_kwargs(dcn_type, **extra))
    for stage in range(1, 5):
        for block in getattr(model, f'layer{stage}'):
            assert isinstance(block.conv1, ReparamConv2d) and isinstance(block.conv3, ReparamConv2d)
            assert isinstance(block.conv2, dcn_cls if stage > 1 else ReparamConv2d)
            if block.downsample is not None:
                assert isinstance(block.downsample[-2], ReparamConv2d)
    assert isinstance(model.layer2[0].conv2, dcn_cls)
    randomise(_randomise_offsets(model))
    x = torch.randn(2, 3, 96, 96)  # mmcv's DCN needs >= 3 x 3 inputs (layer4: 1/32)
    _sgd_step(model, x)
    stock = stock_cls(**_dcn_kwargs(dcn_type, **extra))
    _deploy_equals_stock(model, stock, x[:1])
    assert [type(m) for m in model.modules()][1:] == [type(m) for m in stock.modules()][1:]


def test_dcn_fallback_on_stride_and_avg_down_keep_the_rest_orepa():
    """Exactly the convs the stock ResNet builds as DCN stay DCN; every plain one is OREPA.
    (mmdet pops ``fallback_on_stride`` from the shared dcn dict in the first block it reaches,
    so only that block falls back to a plain conv2: the same in both.)"""
    for fallback in (True, False):
        kwargs = _dcn_kwargs('DCN', avg_down=True)
        kwargs['dcn']['fallback_on_stride'] = fallback
        model = for_mmdet.OREPAResNet(**copy.deepcopy(kwargs))
        stock = mmdet_backbones.ResNet(**copy.deepcopy(kwargs))
        dcn = 0
        for name, theirs in stock.named_modules():
            ours = model.get_submodule(name)
            if type(theirs) is nn.Conv2d and not name.endswith('conv_offset'):
                assert isinstance(ours, ReparamConv2d), name
            elif name:
                assert type(ours) is type(theirs), name
                dcn += hasattr(theirs, 'conv_offset')
        assert dcn == (12 if fallback else 13)
        assert isinstance(model.layer2[0].downsample[1], ReparamConv2d)  # after the AvgPool
        assert isinstance(model.layer2[0].conv2,
                          ReparamConv2d if fallback else type(stock.layer2[1].conv2))


def test_stock_resnet_with_orepa_conv_cfg_refuses_dcn_loudly():
    """The libraries' Bottleneck asserts it; OREPAResNet is the way (docs/configs.md)."""
    for stock_cls in (mmdet_backbones.ResNet, mmseg_backbones.ResNet):
        with pytest.raises(AssertionError, match='conv_cfg must be None for DCN'):
            stock_cls(**_dcn_kwargs('DCN', conv_cfg=dict(type='OREPA')))


@pytest.mark.usefixtures('one_thread')
def test_dcn_conv2_starts_from_an_orepa_checkpoints_squeezed_kernel(tmp_path):
    """An OREPA ResNet checkpoint (e.g. the converted official one, no DCN) initialises the DCN
    stages' conv2 with its squeezed kernels: with zero offsets, the same outputs."""
    torch.manual_seed(0)
    plain = randomise(for_mmdet.OREPAResNet(depth=50, base_channels=8, stem_channels=16))
    path = tmp_path / 'orepa.pth'
    torch.save(dict(state_dict=plain.state_dict()), path)
    model = for_mmdet.OREPAResNet(
        **_dcn_kwargs('DCN', init_cfg=dict(type='Pretrained', checkpoint=str(path))))
    model.init_weights()
    model.eval()
    torch.testing.assert_close(model.layer3[1].conv2.weight,
                               plain.layer3[1].conv2.to_conv2d().weight)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        for ours, theirs in zip(model(x), plain(x)):
            assert rel_err(ours, theirs) < 1e-5
    # a stock checkpoint (plain conv2.weight) loads as usual, strictly
    dcn_stock = mmdet_backbones.ResNet(**_dcn_kwargs('DCN'))
    model.load_state_dict(_stock_like(model), strict=True)
    dcn_stock.load_state_dict(_stock_like(model), strict=True)


def _stock_like(model):
    deployed = copy.deepcopy(model)
    deployed.switch_to_deploy()
    return deployed.state_dict()


PLUGINS = [
    dict(
        cfg=dict(type='ContextBlock', ratio=1. / 4),
        stages=(False, True, True, True),
        position='after_conv3'),
    dict(
        cfg=dict(
            type='GeneralizedAttention',
            spatial_range=-1,
            num_heads=2,
            attention_type='0010',
            kv_stride=2),
        stages=(False, False, True, True),
        position='after_conv2'),
    dict(
        cfg=dict(type='NonLocal2d', reduction=2, use_scale=True),
        stages=(False, False, True, False),
        position='after_conv1'),
]
NORMS = {
    'GN': dict(type='GN', num_groups=4, requires_grad=True),
    'SyncBN': dict(type='SyncBN', requires_grad=True),
}


@pytest.mark.usefixtures('one_thread')
@pytest.mark.parametrize('case', ['plugins', 'GN', 'SyncBN', 'plugins+GN+DCN'])
def test_plugins_and_norms_train_and_deploy_to_stock(case):
    """mmdet's GCNet / empirical-attention / non-local plugins and GN / SyncBN norms: plugins stay
    stock, the rest is OREPA; deployed == mmdet's ResNet with the same arguments. SyncBN runs
    without a process group on the CPU (torch's SyncBatchNorm then normalises per process)."""
    kwargs = dict(
        depth=50, base_channels=16, stem_channels=16, out_indices=(0, 1, 2, 3), norm_eval=False)
    if 'plugins' in case:
        kwargs['plugins'] = PLUGINS
    for norm in NORMS:
        if norm in case:
            kwargs['norm_cfg'] = NORMS[norm]
    if 'DCN' in case:
        kwargs.update(
            dcn=dict(type='DCNv2', deform_groups=2), stage_with_dcn=(False, False, True, True))
    torch.manual_seed(0)
    model = for_mmdet.OREPAResNet(**copy.deepcopy(kwargs))
    if 'plugins' in case:
        block = model.layer3[0]
        assert {'context_block', 'gen_attention_block',
                'nonlocal_block'} <= set(dict(block.named_children()))
        assert not any(
            isinstance(m, ReparamConv2d)
            for name in ('context_block', 'gen_attention_block', 'nonlocal_block')
            for m in getattr(block, name).modules())
    if 'SyncBN' in case:
        assert isinstance(model.norm1, nn.SyncBatchNorm)
    x = torch.randn(2, 3, 96, 96)
    _sgd_step(randomise(_randomise_offsets(model)), x)
    stock = mmdet_backbones.ResNet(**copy.deepcopy(kwargs))
    _deploy_equals_stock(model, stock, x)
