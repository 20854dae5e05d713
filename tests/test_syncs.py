"""No host-device synchronisation in a training step or an eval forward of an unconverted model.

The stock backbones make none; an OREPA model must make none either (a sync stalls the CPU
until the GPU queue drains). Counted on the CPU with a dispatch mode (tests/dispatch_counts.py):
the same ops synchronise on CUDA. Covers frozen stages + norm_eval (mmdet's default), an eval
forward (validation, teachers), inference_mode, OREPA-VGG and OREPA convs in a neck and head.
"""
import pytest
import torch
import torch.nn as nn
from mmdet.models.backbones import ResNet  # noqa: E402
from mmdet.models.dense_heads import RetinaHead  # noqa: E402
from mmdet.models.necks import FPN  # noqa: E402

import orepa_mm  # noqa: F401
from orepa_mm.models.backbones import for_mmdet, for_mmpretrain
from tests.dispatch_counts import OpCounter

pytestmark = pytest.mark.usefixtures('one_thread')
TINY_VGG = dict(
    num_blocks=[1, 1, 1, 1], width_factor=[0.125] * 4, group_layer_map=None, se_cfg=None)


def _train_step_syncs(model: nn.Module, x: torch.Tensor):
    """Syncs of the second of two training steps (the first fills whatever is lazily made)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                lr=0.01,
                                momentum=0.9)
    model.train()
    for _ in range(2):
        with OpCounter() as counter:
            outs = model(x)
            loss = sum(o.float().square().mean() for o in outs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return counter.syncs


def _eval_syncs(model: nn.Module, x: torch.Tensor, context=torch.no_grad):
    """Syncs of the second of two eval forwards (validation, a teacher)."""
    model.eval()
    for _ in range(2):
        with context(), OpCounter() as counter:
            model(x)
    return counter.syncs


@pytest.mark.parametrize('frozen_stages', [-1, 1])
def test_resnet50_train_step_and_eval_make_no_syncs(frozen_stages):
    torch.manual_seed(0)
    kwargs = dict(depth=50, base_channels=8, frozen_stages=frozen_stages, norm_eval=True)
    x = torch.randn(2, 3, 64, 64)
    stock, orepa = ResNet(**kwargs), for_mmdet.OREPAResNet(**kwargs)
    assert _train_step_syncs(stock, x) == {}  # the control: zero
    assert _train_step_syncs(orepa, x) == {}
    for context in (torch.no_grad, torch.inference_mode):
        assert _eval_syncs(stock, x, context) == {}
        assert _eval_syncs(orepa, x, context) == {}


def test_orepa_vgg_train_step_and_eval_make_no_syncs():
    torch.manual_seed(0)
    model = for_mmpretrain.OREPAVGG(arch=TINY_VGG, out_indices=(3, ))
    x = torch.randn(2, 3, 64, 64)
    assert _train_step_syncs(model, x) == {}
    assert _eval_syncs(model, x) == {}


class _DetectorFeatures(nn.Module):
    """Backbone + FPN + RetinaHead convs: the parts of a detector orepa_mm's conv type builds."""

    def __init__(self, conv_cfg):
        super().__init__()
        self.backbone = ResNet(
            depth=18, base_channels=8, frozen_stages=1, norm_eval=True, conv_cfg=conv_cfg)
        self.neck = FPN([8, 16, 32, 64], 16, num_outs=5, conv_cfg=conv_cfg)
        self.head = RetinaHead(
            num_classes=3, in_channels=16, feat_channels=16, stacked_convs=2, conv_cfg=conv_cfg)

    def forward(self, x):
        cls_scores, bbox_preds = self.head(self.neck(self.backbone(x)))
        return cls_scores + bbox_preds


def test_detector_with_orepa_neck_and_head_makes_no_syncs():
    from mmengine.registry import DefaultScope
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    with DefaultScope.overwrite_default_scope('mmdet'):  # the head builds its coder by name
        model = _DetectorFeatures(dict(type='OREPA'))
    assert orepa_mm.count_reparameterizable(model.neck) and orepa_mm.count_reparameterizable(
        model.head)
    assert _train_step_syncs(model, x) == {}
    assert _eval_syncs(model, x) == {}


def test_the_counter_sees_a_sync():
    """The counter is not blind: an op that reads a value back is counted."""
    with OpCounter() as counter:
        t = torch.ones(3)
        bool(t.sum() > 0)
        torch.equal(t, t)
    assert counter.syncs == {'_local_scalar_dense': 1, 'equal': 1}
