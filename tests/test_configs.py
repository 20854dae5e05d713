"""Every shipped config: resolves, builds, trains one step on CPU, keeps the OREPA recipe.

The models are built as a CPU user would (SyncBN reverted to BN, ``backbone.init_cfg=None`` so no
checkpoint is read) and take one forward+backward on a tiny synthetic batch.
"""
import glob
import os.path as osp
from copy import deepcopy

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import MODELS, DefaultScope

import orepa_mm  # noqa: F401
from orepa_mm.apis import deploy_config
from orepa_mm.cnn import ReparamConv2d
from orepa_mm.utils.data_check import MissingDatasetError, check_dataset_paths, iter_dataset_paths

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG_DIR = osp.join(REPO, 'configs')
OFFICIAL_R50 = 'checkpoints/orepa_resnet50_official.pth'

# name -> (default_scope, data root the check must ask for)
DETECTION = {
    'faster_rcnn_orepa_r50': 'data/coco/',
    'faster_rcnn_orepa_r50_dcn': 'data/coco/',
    'faster_rcnn_orepa_r50_fpn_orepa': 'data/coco/',
    'retinanet_orepa_r50': 'data/coco/',
    'mask_rcnn_orepa_r50': 'data/coco/',
}
SEGMENTATION = {
    'pspnet_orepa_r50_cityscapes': 'data/cityscapes/',
    'deeplabv3plus_orepa_r50_cityscapes': 'data/cityscapes/',
    'upernet_orepa_r50_ade20k': 'data/ade/ADEChallengeData2016',
    'pspnet_orepa_r50_ade20k': 'data/ade/ADEChallengeData2016',
}
CLASSIFICATION = {
    'orepa_resnet50_imagenet': 'data/imagenet',
    'orepa_resnet18_imagenet': 'data/imagenet',
    'orepa_vgg_a0_imagenet': 'data/imagenet',
}
DEMO = {
    'demo/faster_rcnn_orepa_r18_demo': 'data/demo/',
    'demo/pspnet_orepa_r18_demo': 'data/demo/',
}
SCOPES = {
    **{
        k: 'mmdet'
        for k in DETECTION
    },
    **{
        k: 'mmseg'
        for k in SEGMENTATION
    },
    **{
        k: 'mmpretrain'
        for k in CLASSIFICATION
    }, 'demo/faster_rcnn_orepa_r18_demo': 'mmdet',
    'demo/pspnet_orepa_r18_demo': 'mmseg'
}
DATA_ROOTS = {**DETECTION, **SEGMENTATION, **CLASSIFICATION, **DEMO}
#: Shipped configs that inherit another shipped config (which inherits the stock one).
DERIVED = {'faster_rcnn_orepa_r50_fpn_orepa': 'faster_rcnn_orepa_r50'}
ALL = sorted(SCOPES)
DOWNSTREAM = sorted({**DETECTION, **SEGMENTATION})


def config_path(name):
    return osp.join(CONFIG_DIR, name + '.py')


def load(name):
    return Config.fromfile(config_path(name))


pytestmark = pytest.mark.usefixtures('one_thread')


def test_every_shipped_config_is_listed_here():
    """Every model config (configs/deploy/ holds mmdeploy's deploy configs, which
    tests/test_mmdeploy_plan.py loads)."""
    shipped = {
        osp.relpath(p, CONFIG_DIR)[:-3]
        for p in glob.glob(osp.join(CONFIG_DIR, '**', '*.py'), recursive=True)
    }
    assert shipped - {
        'deploy/detection_onnxruntime_dynamic', 'deploy/segmentation_onnxruntime_dynamic'
    } == set(ALL)


# -- resolving -------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ALL)
def test_config_resolves_its_base_and_imports_orepa_mm(name):
    cfg = load(name)
    assert cfg.default_scope == SCOPES[name]
    assert cfg.custom_imports == dict(imports=['orepa_mm'], allow_failed_imports=False)
    assert cfg.custom_hooks == [dict(type='ReparamKernelCacheHook')]
    assert 'custom_hooks' not in deploy_config(cfg)  # the deployed config needs no orepa_mm
    text = open(config_path(name)).read()
    if name in DERIVED:
        assert f"_base_ = './{DERIVED[name]}.py'" in text
        text = open(config_path(DERIVED[name])).read()
    assert f"_base_ = '{SCOPES[name]}::" in text  # inherits the stock OpenMMLab config
    # what the base provides is there: a full model, data and schedule
    for key in ('model', 'train_dataloader', 'val_dataloader', 'test_dataloader', 'optim_wrapper',
                'param_scheduler', 'train_cfg', 'default_hooks'):
        assert key in cfg, key
    assert cfg.model.backbone.type.startswith('OREPA')


# -- building and one training step ------------------------------------------------------------
def tiny_batch(cfg, scope, size):
    """A packed batch of two images (``data_preprocessor`` input) for the config's task."""
    torch.manual_seed(0)
    if scope == 'mmdet':
        from mmdet.testing import demo_mm_inputs
        heads = [cfg.model.get('roi_head', {}).get('bbox_head', {}), cfg.model.get('bbox_head', {})]
        num_classes = next(h['num_classes'] for h in heads if h)
        return demo_mm_inputs(
            batch_size=2,
            image_shapes=(3, size, size),
            num_classes=num_classes,
            num_items=[2, 3],
            with_mask='mask_head' in cfg.model.get('roi_head', {}))
    inputs = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8) for _ in range(2)]
    if scope == 'mmseg':
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample
        samples = []
        for _ in inputs:
            sample = SegDataSample(
                metainfo=dict(
                    img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size)))
            num_classes = cfg.model.decode_head.num_classes
            sample.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, size, size)))
            samples.append(sample)
        return dict(inputs=inputs, data_samples=samples)
    from mmpretrain.structures import DataSample
    samples = [DataSample().set_gt_label(i) for i in range(len(inputs))]
    return dict(inputs=inputs, data_samples=samples)


def build_cpu_model(cfg):
    model_cfg = deepcopy(cfg.model)
    model_cfg.backbone.init_cfg = None  # no checkpoint needed
    if cfg.default_scope == 'mmseg':
        model_cfg.data_preprocessor.size = None  # upstream pads to the 512x1024 crop
        model_cfg.data_preprocessor.size_divisor = 32
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(model_cfg)
    return revert_sync_batchnorm(model)


@pytest.mark.parametrize('name', ALL)
def test_model_builds_and_trains_one_step_on_cpu(name):
    cfg = load(name)
    model = build_cpu_model(cfg)
    backbone = model.backbone
    assert type(backbone).__module__.startswith('orepa_mm.models.backbones.')
    assert any(isinstance(m, ReparamConv2d) for m in backbone.modules())
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())

    model.train()
    size = 64 if SCOPES[name] != 'mmdet' else 96
    data = model.data_preprocessor(tiny_batch(cfg, SCOPES[name], size), True)
    losses = model(**data, mode='loss')
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)
    loss.backward()
    trainable = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
    assert trainable
    assert [n for n, p in trainable if p.grad is None] == []
    assert any(p.grad.abs().sum() > 0 for _, p in trainable)


# -- pretrained weights and the stem learning rate ---------------------------------------------
@pytest.mark.parametrize('name', DOWNSTREAM)
def test_downstream_configs_start_from_the_converted_official_checkpoint(name):
    cfg = load(name)
    assert cfg.model.backbone.init_cfg == dict(type='Pretrained', checkpoint=OFFICIAL_R50)
    assert cfg.model.get('pretrained') is None  # mmseg's model-level `pretrained` is moved
    stem = 'backbone.stem' if cfg.model.backbone.type == 'OREPAResNetV1c' else 'backbone.conv1'
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys == {stem: dict(lr_mult=0.1)}


@pytest.mark.parametrize('name', DOWNSTREAM)
def test_stem_lr_multiplier_reaches_exactly_the_stem_parameters(name):
    cfg = load(name)
    model = build_cpu_model(cfg)
    for p in model.parameters():
        p.requires_grad_(True)  # upstream freezes the mmdet stem; see that the key fits
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        from mmengine.optim import build_optim_wrapper
        optim = build_optim_wrapper(model, deepcopy(cfg.optim_wrapper))
    base_lr = cfg.optim_wrapper.optimizer.lr
    stem_prefix = 'stem.' if cfg.model.backbone.type == 'OREPAResNetV1c' else 'conv1.'
    stem_ids = {id(p) for n, p in model.backbone.named_parameters() if n.startswith(stem_prefix)}
    assert stem_ids
    for group in optim.optimizer.param_groups:
        for p in group['params']:
            expected = base_lr * 0.1 if id(p) in stem_ids else base_lr
            assert group['lr'] == pytest.approx(expected)


FALLBACK = {'OREPAResNet': 'torchvision://resnet50', 'OREPAResNetV1c': 'open-mmlab://resnet50_v1c'}


@pytest.mark.parametrize('name', DOWNSTREAM)
def test_documented_fallback_switch_names_stock_weights(name):
    """The one --cfg-options switch of the README (stock weights instead of OREPA ones)."""
    cfg = load(name)
    switch = FALLBACK[cfg.model.backbone.type]
    assert f'model.backbone.init_cfg.checkpoint={switch}' in open(config_path(name)).read()
    cfg.merge_from_dict({'model.backbone.init_cfg.checkpoint': switch})
    assert cfg.model.backbone.init_cfg == dict(type='Pretrained', checkpoint=switch)


@pytest.mark.parametrize('name', ['faster_rcnn_orepa_r50', 'pspnet_orepa_r50_cityscapes'])
def test_fallback_stock_weights_load_exactly(name, tmp_path):
    """Stock ResNet-50 weights (what torchvision:// / open-mmlab:// deliver) through the
    config's init_cfg give an OREPA backbone that computes what the stock backbone computes."""
    cfg = load(name)
    stock_cfg = deepcopy(cfg.model.backbone)
    stock_cfg.type = stock_cfg.type.replace('OREPA', '')
    stock_cfg.init_cfg = None
    stock_cfg.norm_cfg = dict(type='BN', requires_grad=True)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        stock = MODELS.build(stock_cfg)
        torch.manual_seed(0)
        stock.init_weights()
        with torch.no_grad():
            for m in stock.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        state = dict(stock.state_dict())
        state['fc.weight'] = torch.zeros(1000, 2048)  # torchvision files carry the classifier
        path = tmp_path / 'stock_resnet50.pth'
        torch.save(state, path)
        cfg.merge_from_dict({'model.backbone.init_cfg.checkpoint': str(path)})
        orepa_cfg = deepcopy(cfg.model.backbone)
        orepa_cfg.norm_cfg = dict(type='BN', requires_grad=True)
        orepa = MODELS.build(orepa_cfg)
        orepa.init_weights()
    stock.eval()  # mmdet's/mmseg's ResNet.train() returns None: never chain it
    orepa.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(stock(x), orepa(x)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


# -- ImageNet recipe ---------------------------------------------------------------------------
@pytest.mark.parametrize('name', sorted(CLASSIFICATION))
def test_imagenet_configs_follow_the_papers_recipe(name):
    cfg = load(name)
    assert cfg.train_cfg.max_epochs == 120
    assert cfg.train_dataloader.batch_size * 8 == 256 == cfg.auto_scale_lr.base_batch_size
    assert cfg.optim_wrapper.optimizer.type == 'SGD' and cfg.optim_wrapper.optimizer.lr == 0.1
    schedulers = cfg.param_scheduler
    schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
    cosine = [s for s in schedulers if s.type == 'CosineAnnealingLR']
    assert len(cosine) == 1 and cosine[0].T_max == 120 and cosine[0].end == 120
    assert cfg.optim_wrapper.paramwise_cfg.norm_decay_mult == 0
    assert cfg.optim_wrapper.paramwise_cfg.bias_decay_mult == 0
    assert cfg.model.backbone.get('init_cfg') is None  # trained from scratch


def test_no_weight_decay_on_norms_and_biases():
    cfg = load('orepa_resnet18_imagenet')
    model = build_cpu_model(cfg)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        from mmengine.optim import build_optim_wrapper
        optim = build_optim_wrapper(model, deepcopy(cfg.optim_wrapper))
    decay = {}
    for group in optim.optimizer.param_groups:
        for p in group['params']:
            decay[id(p)] = group['weight_decay']
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.modules.batchnorm._NormBase) or pname == 'bias':
                assert decay[id(p)] == 0, f'{name}.{pname}'
    assert decay[id(model.head.fc.weight)] == pytest.approx(1e-4)
    assert any(v == pytest.approx(1e-4) for k, v in decay.items()
               if k in {id(p)
                        for p in model.backbone.layer1.parameters() if p.ndim == 4})


# -- data paths --------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ALL)
def test_data_check_reads_the_config_paths(name, tmp_path, monkeypatch):
    cfg = load(name)
    paths = [p for _, p in iter_dataset_paths(cfg)]
    assert paths and all(p.startswith(DATA_ROOTS[name].rstrip('/')) for p in paths), paths
    monkeypatch.chdir(tmp_path)  # no data here
    with pytest.raises(MissingDatasetError) as err:
        check_dataset_paths(cfg, ('train', 'val'))
    message = str(err.value)
    assert osp.join(str(tmp_path), DATA_ROOTS[name].rstrip('/')) in message
    assert "docs/configs.md (section 'Datasets')" in message and message.count('.') >= 1


def test_detection_evaluators_read_the_annotation_files_the_loaders_use():
    for name in list(DETECTION) + ['demo/faster_rcnn_orepa_r18_demo']:
        cfg = load(name)
        ds = cfg.val_dataloader.dataset
        assert cfg.val_evaluator.ann_file == ds.data_root + ds.ann_file


# -- DCN ---------------------------------------------------------------------------------------
def test_dcn_config_is_upstreams_dcn_config_with_an_orepa_backbone():
    cfg = load('faster_rcnn_orepa_r50_dcn')
    from mmengine.hub import get_config
    stock = get_config('mmdet::dcn/faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py')
    assert cfg.model.backbone.dcn == stock.model.backbone.dcn == dict(
        type='DCN', deform_groups=1, fallback_on_stride=False)
    assert cfg.model.backbone.stage_with_dcn == (False, True, True, True)
    ours, theirs = deepcopy(cfg.model), deepcopy(stock.model)
    for model in (ours, theirs):
        model.backbone.pop('type'), model.backbone.pop('init_cfg'), model.pop('_scope_', None)
    assert ours == theirs


def test_dcn_config_deploys_to_upstreams_stock_dcn_model():
    """deploy_config: mmdet's ResNet with the same dcn; the re-parameterized backbone loads into
    it strictly, DCN layers included (tiny widths: the structure is what is checked)."""
    from mmcv.ops import DeformConv2dPack

    from orepa_mm.apis import deploy_config
    cfg = load('faster_rcnn_orepa_r50_dcn')
    deployed = deploy_config(cfg)
    backbone = deployed.model.backbone
    assert backbone.type == 'ResNet' and backbone.get('init_cfg') is None
    assert backbone.dcn == cfg.model.backbone.dcn
    assert backbone.stage_with_dcn == cfg.model.backbone.stage_with_dcn
    assert 'orepa_mm' not in str(deployed.get('custom_imports'))
    tiny = dict(base_channels=8, init_cfg=None)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(dict(deepcopy(cfg.model.backbone), **tiny))
        stock = MODELS.build(dict(deepcopy(backbone), **tiny))
    assert isinstance(model.layer3[0].conv2, DeformConv2dPack)
    assert isinstance(model.layer3[0].conv1, ReparamConv2d)
    model.switch_to_deploy()
    stock.load_state_dict(model.state_dict(), strict=True)
    model.eval(), stock.eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        for a, b in zip(model(x), stock(x)):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


# -- OREPA in the neck (beyond the paper) ------------------------------------------------------
FPN_OREPA = 'faster_rcnn_orepa_r50_fpn_orepa'


def tiny_faster_rcnn(model_cfg):
    """The Faster R-CNN R50-FPN structure at 1/8 of the width (builds and runs in a second)."""
    model_cfg = deepcopy(model_cfg)
    model_cfg.backbone.update(stem_channels=8, base_channels=8, init_cfg=None)
    model_cfg.neck.update(in_channels=[32, 64, 128, 256], out_channels=16)
    model_cfg.rpn_head.update(in_channels=16, feat_channels=16)
    model_cfg.roi_head.bbox_roi_extractor.out_channels = 16
    model_cfg.roi_head.bbox_head.update(in_channels=16, fc_out_channels=32)
    return model_cfg


def test_fpn_orepa_config_is_the_plain_config_with_an_orepa_neck():
    cfg, plain = load(FPN_OREPA), load('faster_rcnn_orepa_r50')
    assert cfg.model.neck.conv_cfg == dict(type='OREPA')
    ours = deepcopy(cfg.model)
    ours.neck.pop('conv_cfg')
    assert ours == plain.model
    assert cfg.optim_wrapper == plain.optim_wrapper and cfg.train_cfg == plain.train_cfg
    assert 'BEYOND THE PAPER' in open(config_path(FPN_OREPA)).read()


def test_fpn_orepa_config_deploys_to_mmdets_stock_faster_rcnn():
    """Build (1/8 width), one training step, deploy: the deployed config is mmdet's stock
    Faster R-CNN R50-FPN, the baked model loads into it strictly and computes the same
    features and RPN outputs (float64, every FPN level)."""
    from mmengine.hub import get_config

    from orepa_mm.apis import deploy_config
    from orepa_mm.deploy import reparameterize_model
    cfg = load(FPN_OREPA)
    deployed = deploy_config(cfg)
    upstream = get_config('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py').model
    for model_cfg in (deployed.model, upstream):
        model_cfg.backbone.pop('init_cfg', None), model_cfg.pop('_scope_', None)
        model_cfg.neck.pop('conv_cfg', None)  # None (deployed) or absent (upstream)
    assert deployed.model == upstream

    with DefaultScope.overwrite_default_scope('mmdet'):
        model = revert_sync_batchnorm(MODELS.build(tiny_faster_rcnn(cfg.model)))
        stock = MODELS.build(tiny_faster_rcnn(deploy_config(cfg).model))
    neck_layers = [n for n, m in model.neck.named_modules() if isinstance(m, ReparamConv2d)]
    assert len(neck_layers) == 8  # 4 lateral 1x1 + 4 output 3x3
    assert type(model.rpn_head.rpn_conv) is nn.Conv2d  # RPNHead takes no conv_cfg

    model.train()
    data = model.data_preprocessor(tiny_batch(cfg, 'mmdet', 64), True)
    loss, _ = model.parse_losses(model(**data, mode='loss'))
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02).step()
    model.eval()  # mmdet's ResNet.train() returns None: never chain it

    baked = reparameterize_model(deepcopy(model).double())
    stock.double().load_state_dict(baked.state_dict(), strict=True)
    stock.eval()
    model.double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model.extract_feat(x), stock.extract_feat(x)
        ours_rpn, theirs_rpn = model.rpn_head(ours), stock.rpn_head(theirs)
    pairs = list(zip(ours, theirs)) + [(a, b) for levels in zip(ours_rpn, theirs_rpn)
                                       for a, b in zip(*levels)]
    assert len(pairs) == 5 + 2 * 5
    for a, b in pairs:
        assert float((a - b).abs().max() / a.abs().max()) < 1e-9
