"""tools/train.py and tools/test.py, end to end and piece by piece.

The end-to-end tests run the tools as subprocesses, the way users do, on a
tiny mmpretrain config: an ImageClassifier with an 8-channel ResNet-18 on
four 32x32 images in mmpretrain's CustomDataset folder layout. That is the
real Runner, real loops, real CheckpointHook and real evaluator, in seconds.
The argument-to-config helpers in orepa_mm.utils.cli are tested directly.
"""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config

from orepa_mm.utils.checkpoint_io import load_from_local
from orepa_mm.utils.cli import (ToolError, apply_test_args, apply_train_args, config_scope,
                                parse_test_args, parse_train_args, train_splits)

REPO = Path(__file__).resolve().parents[1]

TOY_CONFIG = '''
default_scope = 'mmpretrain'
data_root = {data_root!r}

model = dict(
    type='ImageClassifier',
    backbone=dict(type='ResNet', depth=18, stem_channels=8, base_channels=8),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=2,
        in_channels=64,
        loss=dict(type='CrossEntropyLoss')))
data_preprocessor = dict(
    num_classes=2, mean=[127.5] * 3, std=[127.5] * 3, to_rgb=True)

pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
dataset = dict(
    type='CustomDataset', data_root=data_root, data_prefix='',
    pipeline=pipeline)
train_dataloader = dict(
    batch_size=2, num_workers=0, dataset=dataset,
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=2, num_workers=0, dataset=dataset,
    sampler=dict(type='DefaultSampler', shuffle=False))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator

optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9))
param_scheduler = dict(type='MultiStepLR', by_epoch=True, milestones=[1])
train_cfg = dict(by_epoch=True, max_epochs=1, val_interval=1)
val_cfg = dict()
test_cfg = dict()
auto_scale_lr = dict(enable=False, base_batch_size=2)

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=1),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='VisualizationHook', enable=False))
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))
visualizer = dict(
    type='UniversalVisualizer', vis_backends=[dict(type='LocalVisBackend')])
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
'''


def _write_images(root: Path):
    """Two classes, two 32x32 images each, in CustomDataset's layout."""
    import cv2
    rng = np.random.default_rng(0)
    for label, name in enumerate(('cat', 'dog')):
        (root / name).mkdir(parents=True)
        for i in range(2):
            img = rng.integers(0, 64, (32, 32, 3), dtype=np.uint8) + 128 * label
            cv2.imwrite(str(root / name / f'{name}{i}.png'), img)


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """(config path, data root) of the tiny mmpretrain experiment."""
    base = tmp_path_factory.mktemp('toy')
    data_root = base / 'images'
    _write_images(data_root)
    config = base / 'toy_cls.py'
    config.write_text(TOY_CONFIG.format(data_root=str(data_root)))
    return config, data_root


def run_tool(tool, *args, cwd):
    """Run tools/<tool>.py like a user would, with the repo importable."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(REPO)] +
                                        ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    env.setdefault('CUDA_VISIBLE_DEVICES', '')  # same path on any machine
    return subprocess.run(
        [sys.executable, str(REPO / 'tools' / f'{tool}.py'), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ---------------------------------------------------------------- end to end
@pytest.mark.slow
def test_train_resume_test_round_trip(toy, tmp_path):
    config, _ = toy
    work_dir = tmp_path / 'work'

    _ok(run_tool('train', config, '--work-dir', work_dir, cwd=tmp_path))
    assert (work_dir / 'epoch_1.pth').is_file()

    # --resume without a path: latest checkpoint of the work dir.
    resumed = _ok(
        run_tool(
            'train',
            config,
            '--work-dir',
            work_dir,
            '--resume',
            '--cfg-options',
            'train_cfg.max_epochs=2',
            cwd=tmp_path))
    log = resumed.stdout + resumed.stderr
    assert 'resumed epoch: 1, iter: 2' in log
    assert 'Epoch(train) [1]' not in log  # epoch 1 was not trained again
    ckpt = load_from_local(str(work_dir / 'epoch_2.pth'))
    assert (ckpt['meta']['epoch'], ckpt['meta']['iter']) == (2, 4)

    out = tmp_path / 'preds.pkl'
    tested = _ok(
        run_tool(
            'test',
            config,
            work_dir / 'epoch_2.pth',
            '--work-dir',
            work_dir,
            '--out',
            out,
            '--show-dir',
            'vis',
            cwd=tmp_path))
    assert 'accuracy/top1' in tested.stdout + tested.stderr
    with open(out, 'rb') as f:
        assert len(pickle.load(f)) == 4
    # mmpretrain's VisualizationHook writes --show-dir relative to the cwd.
    assert len(list((tmp_path / 'vis').glob('*.png'))) == 4


@pytest.mark.slow
def test_missing_dataset_is_one_sentence_and_exit_2(toy, tmp_path):
    config, _ = toy
    missing = tmp_path / 'no_such_dataset'
    proc = run_tool(
        'train',
        config,
        '--work-dir',
        tmp_path / 'work',
        '--cfg-options',
        f'train_dataloader.dataset.data_root={missing}',
        cwd=tmp_path)
    assert proc.returncode == 2
    assert 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f'error: Dataset not found: expected {missing} (for train); see docs/configs.md '
        "(section 'Datasets') to download and place it.")
    assert not (tmp_path / 'work').exists()  # failed before the Runner


class _RunsShell:

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}', )


@pytest.mark.slow
def test_test_tool_refuses_malicious_checkpoint(toy, tmp_path):
    config, _ = toy
    marker = tmp_path / 'ran'
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': _RunsShell(marker)}, evil)
    proc = run_tool('test', config, evil, '--work-dir', tmp_path / 'work', cwd=tmp_path)
    assert proc.returncode == 2
    assert 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f'error: Refusing to load checkpoint {evil}: it pickles the global ')
    assert not marker.exists()


# ------------------------------------------------------- argument handling
def test_resume_flag_forms(toy):
    config, _ = toy
    assert parse_train_args([str(config)]).resume is None
    assert parse_train_args([str(config), '--resume']).resume == 'auto'
    assert parse_train_args([str(config), '--resume', 'x.pth']).resume == \
        'x.pth'

    cfg = apply_train_args(Config.fromfile(config), parse_train_args([str(config), '--resume']))
    assert cfg.resume is True and cfg.load_from is None
    cfg = apply_train_args(
        Config.fromfile(config), parse_train_args([str(config), '--resume', 'x.pth']))
    assert cfg.resume is True and cfg.load_from == 'x.pth'


def test_local_rank_spellings(toy, monkeypatch):
    config, _ = toy
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    assert parse_train_args([str(config), '--local-rank', '3']).local_rank == 3
    assert os.environ['LOCAL_RANK'] == '3'
    assert parse_test_args([str(config), 'c.pth', '--local_rank', '1']).local_rank == 1


def test_auto_scale_lr(toy):
    config, _ = toy
    args = parse_train_args([str(config), '--auto-scale-lr'])
    assert apply_train_args(Config.fromfile(config), args).auto_scale_lr.enable is True
    cfg = Config.fromfile(config)
    cfg.auto_scale_lr = dict(base_batch_size=2)  # no `enable` key
    with pytest.raises(ToolError):
        apply_train_args(cfg, args)


def test_amp_on_cpu_selects_bf16(toy, monkeypatch):
    config, _ = toy
    import orepa_mm.utils.cli as tools_utils
    monkeypatch.setattr(tools_utils, '_has_accelerator', lambda: False)
    cfg = apply_train_args(Config.fromfile(config), parse_train_args([str(config), '--amp']))
    assert cfg.optim_wrapper.type == 'BF16OptimWrapper'


def test_amp_switches_optim_wrapper(toy, monkeypatch):
    config, _ = toy
    import orepa_mm.utils.cli as tools_utils
    monkeypatch.setattr(tools_utils, '_has_accelerator', lambda: True)
    cfg = apply_train_args(Config.fromfile(config), parse_train_args([str(config), '--amp']))
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.loss_scale == 'dynamic'


def test_train_splits_follow_val_cfg(toy):
    config, _ = toy
    cfg = Config.fromfile(config)
    assert train_splits(cfg) == ('train', 'val')
    cfg.val_cfg = None
    assert train_splits(cfg) == ('train', )


def _scoped_cfg(config, scope):
    cfg = Config.fromfile(config)
    cfg.default_scope = scope
    return cfg


def _test_args(config, *extra):
    return parse_test_args([str(config), 'ckpt.pth', *extra])


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg', 'mmpretrain'])
def test_show_dir_per_scope(toy, scope):
    config, _ = toy
    cfg = apply_test_args(_scoped_cfg(config, scope), _test_args(config, '--show-dir', 'vis'))
    hook = cfg.default_hooks.visualization
    assert cfg.load_from == 'ckpt.pth'
    if scope == 'mmdet':
        assert hook.draw is True and hook.test_out_dir == 'vis'
    elif scope == 'mmseg':
        assert hook.draw is True and cfg.visualizer.save_dir == 'vis'
    else:
        assert hook.enable is True and hook.out_dir == 'vis'
        assert hook.interval == 1


def test_show_dir_needs_visualization_hook(toy):
    config, _ = toy
    cfg = Config.fromfile(config)
    del cfg.default_hooks['visualization']
    with pytest.raises(ToolError, match='VisualizationHook'):
        apply_test_args(cfg, _test_args(config, '--show'))


def test_out_per_scope(toy):
    config, _ = toy
    cfg = apply_test_args(_scoped_cfg(config, 'mmseg'), _test_args(config, '--out', 'pred_dir'))
    assert cfg.test_evaluator.output_dir == 'pred_dir'
    assert cfg.test_evaluator.keep_results is True
    with pytest.raises(ToolError, match='.pkl'):
        apply_test_args(_scoped_cfg(config, 'mmdet'), _test_args(config, '--out', 'x.json'))


def test_tta_mmpretrain_defaults(toy):
    config, _ = toy
    cfg = apply_test_args(Config.fromfile(config), _test_args(config, '--tta'))
    assert cfg.model.type == 'mmpretrain.AverageClsScoreTTA'
    assert cfg.model.module.type == 'ImageClassifier'
    tta = cfg.test_dataloader.dataset.pipeline[-1]
    assert tta.type == 'TestTimeAug'
    assert tta.transforms[-1] == [dict(type='PackInputs')]


def test_unsupported_scope_is_refused(toy):
    config, _ = toy
    with pytest.raises(ToolError, match='default_scope'):
        config_scope(_scoped_cfg(config, 'mmocr'))


def test_dist_scripts_are_executable_bash():
    for name in ('dist_train.sh', 'dist_test.sh'):
        script = REPO / 'tools' / name
        assert os.access(script, os.X_OK)
        subprocess.run(['bash', '-n', str(script)], check=True)
        assert 'torchrun' in script.read_text()
        assert '--launcher pytorch' in script.read_text()
