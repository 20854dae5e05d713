"""Never a stale kernel under the stock hooks that write parameters through ``.data``.

A real mmengine Runner trains a small OREPA model for a few iterations with mmdet's
``MeanTeacherHook`` (momentum update of an eval-mode teacher, ``dst.data.mul_().add_()``) and
mmengine's ``EMAHook`` (which swaps the averaged parameters into the model around validation,
again through ``.data``), with orepa_mm's ``ReparamKernelCacheHook`` caching kernels during
validation. After every update a probe hook compares the unconverted model's outputs with a
freshly re-parameterized copy of it: equal means no kernel was stale.
"""
import copy

import pytest
import torch
import torch.nn as nn
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner

import orepa_mm
from orepa_mm.cnn import OREPAConv1x1, OREPAConv2d
from tests.numerics import rel_err

pytestmark = pytest.mark.usefixtures('one_thread')
PROBE = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _net():
    return nn.Sequential(
        OREPAConv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), OREPAConv1x1(4, 4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


class TeacherStudent(BaseModel):
    """A student trained on the data and an eval-mode teacher that labels it (semi-supervised
    style: the teacher runs every step, so a kernel kept across steps would be seen)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.student = _net()
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, inputs, labels=None, mode='tensor'):
        inputs = torch.stack(inputs) if isinstance(inputs, list) else inputs
        if mode == 'loss':
            with torch.no_grad():
                pseudo = self.teacher(inputs).softmax(-1)
            logits = self.student(inputs)
            return dict(loss=-(pseudo * logits.log_softmax(-1)).sum(-1).mean())
        return self.student(inputs)


class ToyData(torch.utils.data.Dataset):

    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn(3, 8, 8, generator=g), labels=i % 2)


class Outputs(BaseMetric):

    def process(self, data_batch, data_samples):
        self.results.append(0.0)

    def compute_metrics(self, results):
        return dict(n=len(results))


def _assert_matches_deployed(module: nn.Module, what: str):
    module.eval()
    deployed = orepa_mm.reparameterize_model(copy.deepcopy(module))
    assert orepa_mm.count_reparameterizable(deployed) == 0
    with torch.no_grad():
        err = rel_err(module(PROBE), deployed(PROBE))
    assert err < 1e-5, f'{what}: {err}'


class ProbeHook(Hook):
    """Runs after the stock hooks (priority LOWEST) and checks the models they just wrote."""

    priority = 'LOWEST'

    def __init__(self):
        self.checks = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        model = runner.model
        _assert_matches_deployed(model.teacher, f'teacher after iter {runner.iter}')
        self.checks.append('teacher')
        model.student.train()

    def before_val_epoch(self, runner):
        # EMAHook has swapped the averaged parameters into the model (through .data), and
        # ReparamKernelCacheHook has opened the kernel cache.
        assert runner.model.student[0].kernel_source is not None
        _assert_matches_deployed(runner.model.student, 'EMA student in validation')
        self.checks.append('ema')

    def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        _assert_matches_deployed(runner.model.student, 'EMA student, cached kernels')
        self.checks.append('cached')

    def after_val_epoch(self, runner, metrics=None):
        # ... and swapped the trained ones back.
        assert runner.model.student[0].kernel_source is None  # the cache is closed
        _assert_matches_deployed(runner.model.student, 'student after validation')
        self.checks.append('swapped back')


def test_mean_teacher_and_ema_hooks_never_leave_a_stale_kernel(tmp_path):
    import mmdet.engine.hooks  # noqa: F401  (registers MeanTeacherHook)
    probe = ProbeHook()
    runner = Runner(
        model=TeacherStudent(),
        work_dir=str(tmp_path),
        train_dataloader=dict(
            dataset=ToyData(),
            batch_size=4,
            num_workers=0,
            sampler=dict(type='DefaultSampler', shuffle=False),
            collate_fn=dict(type='default_collate')),
        val_dataloader=dict(
            dataset=ToyData(),
            batch_size=4,
            num_workers=0,
            sampler=dict(type='DefaultSampler', shuffle=False),
            collate_fn=dict(type='default_collate')),
        val_evaluator=dict(type=Outputs),
        train_cfg=dict(by_epoch=True, max_epochs=2, val_interval=1),
        val_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.5, momentum=0.9)),
        custom_hooks=[
            dict(type='MeanTeacherHook', momentum=0.5),
            dict(type='EMAHook', momentum=0.5),
            dict(type='ReparamKernelCacheHook'), probe
        ],
        default_hooks=dict(checkpoint=None, logger=None),
        default_scope='mmdet',
    )
    teacher_before = copy.deepcopy(runner.model.teacher)
    runner.train()
    # 2 epochs x 2 iterations, each followed by a teacher check; 2 validations, each checked
    # on the EMA weights and after the swap back.
    assert probe.checks.count('teacher') == 4
    assert probe.checks.count('ema') == probe.checks.count('swapped back') == 2
    assert probe.checks.count('cached') == 4
    with torch.no_grad():  # the teacher did move (the checks compared changing models)
        assert rel_err(runner.model.teacher(PROBE), teacher_before.eval()(PROBE)) > 1e-3
