"""A new user's first run of the headline commands (issue 17).

Each mistake a first run makes (no pretrained checkpoint, a missing test
checkpoint, a runner checkpoint given to the converter, an unwritable --out)
ends at once with one sentence on stderr, no traceback and a non-zero exit,
and no tool start prints setuptools' ``pkg_resources is deprecated`` warning.
The checks are tested directly and through the tools run as subprocesses, the
way users run them, on tiny configs so that nothing heavy starts.
"""
import os
import os.path as osp
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from mmengine.config import Config

from orepa_mm.utils.atomic_write import check_writable_dir
from orepa_mm.utils.checkpoint_check import (MissingCheckpointError, check_checkpoint_paths,
                                             check_load_from, check_pretrained_checkpoints,
                                             describe_checkpoint, iter_pretrained_checkpoints)
from orepa_mm.utils.errors import OrepaInputError

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = 'checkpoints/orepa_resnet50_official.pth'
CONVERTER = f'{REPO}/tools/convert_official_checkpoint.py'  # as seen from outside the repo
PKG_RESOURCES = 'pkg_resources is deprecated'

DETECTION = ('faster_rcnn_orepa_r50', 'retinanet_orepa_r50', 'mask_rcnn_orepa_r50')
SEGMENTATION = ('pspnet_orepa_r50_cityscapes', 'deeplabv3plus_orepa_r50_cityscapes',
                'upernet_orepa_r50_ade20k', 'pspnet_orepa_r50_ade20k')


def official_message(cwd, stock):
    """The sentence for the downstream configs' default checkpoint, run from ``cwd``."""
    return (f'Pretrained checkpoint {OFFICIAL} not found in {cwd} '
            "(model.backbone.init_cfg.checkpoint); make it from the authors' ImageNet model "
            f'with "python {CONVERTER} <OREPA ResNet-50 .pth.tar> {OFFICIAL}", or start from '
            f'stock weights with "--cfg-options model.backbone.init_cfg.checkpoint={stock}".')


def backbone(type_='OREPAResNet', checkpoint=OFFICIAL, **kwargs):
    return dict(
        type=type_, depth=50, **kwargs, init_cfg=dict(type='Pretrained', checkpoint=checkpoint))


# ------------------------------------------------------------ checks, directly
def test_pretrained_checkpoints_are_found_anywhere_in_the_model():
    model = dict(
        type='EncoderDecoder',
        pretrained='a.pth',
        backbone=backbone(checkpoint='b.pth'),
        neck=[
            dict(
                type='FPN',
                init_cfg=[dict(type='Xavier'),
                          dict(type='Pretrained', checkpoint='~/c.pth')])
        ],
        head=dict(type='H', init_cfg=dict(type='Pretrained', checkpoint='torchvision://x')),
        init_cfg=dict(type='Pretrained', checkpoint='open-mmlab://resnet50_v1c'))
    found = [(key, path) for key, path, _ in iter_pretrained_checkpoints(model)]
    assert found == [('model.pretrained', 'a.pth'), ('model.backbone.init_cfg.checkpoint', 'b.pth'),
                     ('model.neck.0.init_cfg.1.checkpoint', '~/c.pth')]


@pytest.mark.parametrize('scheme', [
    'torchvision://resnet50', 'open-mmlab://resnet50_v1c', 'mmcls://x', 'https://x/y.pth',
    's3://b/k.pth'
])
def test_remote_checkpoints_are_not_checked(scheme):
    check_pretrained_checkpoints(dict(model=dict(backbone=backbone(checkpoint=scheme))))
    check_load_from(dict(load_from=scheme), 'test')


def test_official_default_names_both_ways_forward(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = dict(model=dict(type='FasterRCNN', backbone=backbone()))
    with pytest.raises(MissingCheckpointError) as info:
        check_pretrained_checkpoints(cfg)
    assert str(info.value) == official_message(os.getcwd(), 'torchvision://resnet50')
    assert (info.value.path, info.value.key) == (OFFICIAL, 'model.backbone.init_cfg.checkpoint')
    assert isinstance(info.value, FileNotFoundError)


def test_deep_stem_backbones_get_the_v1c_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bb in (backbone('OREPAResNetV1c'), backbone('mmseg.OREPAResNetV1c'),
               backbone('OREPAResNet', deep_stem=True)):
        with pytest.raises(MissingCheckpointError) as info:
            check_pretrained_checkpoints(dict(model=dict(backbone=bb)))
        assert str(info.value) == official_message(os.getcwd(), 'open-mmlab://resnet50_v1c')


def test_other_backbones_get_the_ways_that_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    vgg = dict(
        type='OREPAVGG', arch='A0', init_cfg=dict(type='Pretrained', checkpoint='ckpt/vgg.pth'))
    with pytest.raises(MissingCheckpointError) as info:
        check_pretrained_checkpoints(dict(model=dict(backbone=vgg)))
    assert str(info.value).endswith(
        '<OREPA RepVGG-A0 .pth.tar> ckpt/vgg.pth", or train from scratch with '
        '"--cfg-options model.backbone.init_cfg=None".')
    other = dict(type='SwinTransformer', init_cfg=dict(type='Pretrained', checkpoint='/no/s.pth'))
    with pytest.raises(MissingCheckpointError) as info:
        check_pretrained_checkpoints(dict(model=dict(backbone=other)))
    assert str(info.value) == (
        'Pretrained checkpoint /no/s.pth not found (model.backbone.init_cfg.checkpoint); put '
        'the file there or point "--cfg-options model.backbone.init_cfg.checkpoint=..." at an '
        'existing checkpoint, or train from scratch with "--cfg-options '
        'model.backbone.init_cfg=None".')


def test_present_checkpoints_pass_and_directories_do_not(tmp_path):
    (tmp_path / 'w.pth').write_bytes(b'x')
    cfg = dict(
        model=dict(backbone=backbone(checkpoint=str(tmp_path / 'w.pth'))),
        load_from=str(tmp_path / 'w.pth'))
    check_checkpoint_paths(cfg, 'train')
    check_checkpoint_paths(cfg, 'test')
    with pytest.raises(MissingCheckpointError, match='is a directory, not a checkpoint file'):
        check_load_from(dict(load_from=str(tmp_path)), 'test')


def test_load_from_sentence_per_source(tmp_path):
    missing = str(tmp_path / 'nope.pth')
    cases = {
        'test':
        f'Checkpoint {missing} not found; pass tools/test.py a checkpoint written by '
        'tools/train.py (for example work_dirs/<config name>/epoch_12.pth).',
        'resume':
        f'Cannot resume: checkpoint {missing} not found; give --resume an existing '
        'checkpoint, or --resume alone to continue from the latest one in wd.',
        'load_from':
        f'Checkpoint {missing} not found (load_from); point "--cfg-options '
        'load_from=..." at an existing checkpoint or set it to None.',
    }
    for source, sentence in cases.items():
        with pytest.raises(MissingCheckpointError) as info:
            check_load_from(dict(load_from=missing, work_dir='wd'), source)
        assert str(info.value) == sentence
    check_load_from(dict(load_from=None), 'test')


def test_test_mode_does_not_need_pretrained_weights(tmp_path):
    """Testing never calls init_weights: only the CHECKPOINT argument must exist."""
    (tmp_path / 'epoch_1.pth').write_bytes(b'x')
    cfg = dict(
        model=dict(backbone=backbone(checkpoint=str(tmp_path / 'none.pth'))),
        load_from=str(tmp_path / 'epoch_1.pth'))
    check_checkpoint_paths(cfg, 'test')
    with pytest.raises(MissingCheckpointError, match='none.pth not found'):
        check_checkpoint_paths(cfg, 'train')
    cfg['resume'] = True
    cfg['load_from'] = str(tmp_path / 'epoch_9.pth')
    with pytest.raises(MissingCheckpointError, match='^Cannot resume'):
        check_checkpoint_paths(cfg, 'train')


@pytest.mark.parametrize('name', DETECTION + SEGMENTATION)
def test_every_downstream_config_stops_with_both_ways_forward(name, tmp_path, monkeypatch):
    cfg = Config.fromfile(REPO / 'configs' / f'{name}.py')
    monkeypatch.chdir(tmp_path)  # where no checkpoints/ folder exists
    stock = 'torchvision://resnet50' if name in DETECTION else 'open-mmlab://resnet50_v1c'
    with pytest.raises(MissingCheckpointError) as info:
        check_checkpoint_paths(cfg, 'train')
    assert str(info.value) == official_message(os.getcwd(), stock)


def test_inside_the_repository_the_converter_command_is_relative(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = dict(model=dict(backbone=backbone(checkpoint='checkpoints/not_there_17.pth')))
    with pytest.raises(MissingCheckpointError) as info:
        check_pretrained_checkpoints(cfg)
    assert '"python tools/convert_official_checkpoint.py <OREPA ResNet-50 .pth.tar> ' \
           'checkpoints/not_there_17.pth"' in str(info.value)


def runner_checkpoint(state_dict=None):
    """What mmengine's Runner writes: meta, weights, optimizer and the message hub, whose
    HistoryBuffers make a weights-only torch.load fail."""
    from mmengine.logging import MessageHub
    hub = MessageHub.get_instance('first_run_runner_checkpoint')
    hub.update_scalar('train/loss', 0.5)
    if state_dict is None:
        state_dict = {
            'backbone.layer1.0.conv2.origin': torch.zeros(2, 2, 3, 3),
            'backbone.layer1.0.conv2.branch_scales': torch.ones(6, 2)
        }
    return dict(
        meta=dict(epoch=6, iter=300, mmengine_version='0.10.7'),
        state_dict=state_dict,
        message_hub=hub.state_dict(),
        optimizer=dict(state={}, param_groups=[dict(lr=0.1, params=[0, 1])]))


def test_describe_checkpoint_kinds():
    assert describe_checkpoint(runner_checkpoint()) == (
        'runner', 'an mmengine runner checkpoint of an orepa_mm model (epoch 6, iter 300)')
    plain = runner_checkpoint({'backbone.conv1.weight': torch.zeros(1)})
    assert describe_checkpoint(plain).description == (
        'an mmengine runner checkpoint of a model without OREPA layers (epoch 6, iter 300)')
    assert describe_checkpoint(dict(meta=dict(reparameterized=dict()), state_dict={})).kind \
        == 'deployed'
    converted = dict(meta=dict(converted_from='ResNet-50_OREPA.pth.tar'), state_dict={})
    assert describe_checkpoint(converted) == (
        'converted', 'an orepa_mm backbone checkpoint already converted from '
        'ResNet-50_OREPA.pth.tar')
    # The authors' checkpoints: their training script's keys, no meta.
    authors = dict(
        epoch=120,
        arch='ResNet-50',
        best_acc1=77.3,
        optimizer={},
        state_dict={'module.stage0.rbr_dense.weight': torch.zeros(1)})
    assert describe_checkpoint(authors) is None
    assert describe_checkpoint(['not', 'a', 'dict']) is None


def test_writable_dir_probe_refuses_proc_and_leaves_nothing(tmp_path):
    with pytest.raises(OrepaInputError) as info:
        check_writable_dir('/proc/x/deploy')
    assert str(info.value).startswith('output directory /proc/x/deploy is not writable (')
    assert not osp.exists('/proc/x')
    nested = tmp_path / 'a' / 'b' / 'c'
    check_writable_dir(str(nested))  # creatable: passes and leaves nothing behind
    assert list(tmp_path.iterdir()) == []
    (tmp_path / 'out').mkdir()
    check_writable_dir(str(tmp_path / 'out'))
    assert list((tmp_path / 'out').iterdir()) == []


def test_writable_dir_probe_cleans_up_after_a_failed_write(tmp_path, monkeypatch):
    import orepa_mm.utils.atomic_write as module

    def refuse(*args, **kwargs):
        raise PermissionError(13, 'Permission denied', kwargs.get('dir'))

    monkeypatch.setattr(module.tempfile, 'mkstemp', refuse)
    with pytest.raises(OrepaInputError) as info:
        check_writable_dir(str(tmp_path / 'a' / 'b'))
    assert str(info.value) == (f'output directory {tmp_path}/a/b is not writable '
                               f'({tmp_path}/a/b: Permission denied).')
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------ the tools, as a user runs them
TOY_CONFIG = '''
default_scope = 'mmpretrain'
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)
model = dict(
    type='ImageClassifier',
    backbone=dict(type='OREPAResNet', depth=18, stem_channels=8, base_channels=8),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=2, in_channels=64,
              loss=dict(type='CrossEntropyLoss')))
dataset = dict(type='CustomDataset', data_root={data_root!r}, data_prefix='',
               pipeline=[dict(type='LoadImageFromFile'), dict(type='PackInputs')])
train_dataloader = dict(batch_size=2, num_workers=0, dataset=dataset,
                        sampler=dict(type='DefaultSampler', shuffle=True))
test_dataloader = dict(batch_size=2, num_workers=0, dataset=dataset,
                       sampler=dict(type='DefaultSampler', shuffle=False))
test_evaluator = dict(type='Accuracy', topk=(1, ))
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.01))
train_cfg = dict(by_epoch=True, max_epochs=1)
test_cfg = dict()
'''


@pytest.fixture
def toy(tmp_path):
    """A tiny mmpretrain config whose dataset folder exists (the data check passes)."""
    (tmp_path / 'images').mkdir()
    config = tmp_path / 'toy.py'
    config.write_text(TOY_CONFIG.format(data_root=str(tmp_path / 'images')))
    return config


class Ran(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def run_subprocess(tool, *args, cwd):
    """Run tools/<tool>.py as a user does: a fresh process, the repository importable."""
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    env['PYTHONPATH'] = os.pathsep.join([str(REPO)] +
                                        ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    env.pop('PYTHONWARNINGS', None)
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / f'{tool}.py'), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300)
    return Ran(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(params=['in_process', pytest.param('subprocess', marks=pytest.mark.slow)])
def run_tool(request, capsys, monkeypatch):
    """``run_tool(tool, *args, cwd=...)``: the tool's ``main`` in this process (seconds, the
    fast tier), or the script in a fresh process (the mm stack's import alone takes ~6 s of
    CPU, so: slow). Both give the exit status and what was printed."""
    if request.param == 'subprocess':
        return run_subprocess

    def in_process(tool, *args, cwd):
        monkeypatch.chdir(cwd)
        main = runpy.run_path(str(REPO / 'tools' / f'{tool}.py'), run_name=f'_{tool}')['main']
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        return Ran(code or 0, captured.out, captured.err)

    return in_process


def one_sentence(ran, code):
    """The tool exited with ``code`` and said exactly one line on stderr: no traceback, no
    third-party deprecation noise. Returns that line."""
    assert ran.returncode == code, ran.stderr[-3000:]
    assert 'Traceback' not in ran.stderr
    assert PKG_RESOURCES not in ran.stderr
    lines = [line for line in ran.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, ran.stderr
    return lines[0]


def test_train_shipped_config_without_the_official_checkpoint(run_tool, tmp_path):
    """Issue 17.1: COCO in place, no checkpoints/: one sentence before anything is built."""
    coco = tmp_path / 'data' / 'coco'
    (coco / 'annotations').mkdir(parents=True)
    for split in ('train', 'val'):
        (coco / 'annotations' / f'instances_{split}2017.json').write_text('{}')
        (coco / f'{split}2017').mkdir()
    ran = run_tool('train', REPO / 'configs' / 'faster_rcnn_orepa_r50.py', cwd=tmp_path)
    assert one_sentence(
        ran,
        2) == 'error: ' + official_message(os.path.realpath(tmp_path), 'torchvision://resnet50')
    assert not (tmp_path / 'work_dirs').exists()  # stopped before the Runner
    assert ran.stdout == ''


def test_train_resume_from_a_missing_checkpoint(run_tool, toy, tmp_path):
    ran = run_tool(
        'train', toy, '--resume', 'missing.pth', '--work-dir', tmp_path / 'wd', cwd=tmp_path)
    assert one_sentence(ran, 2) == (
        f'error: Cannot resume: checkpoint missing.pth not found in {os.path.realpath(tmp_path)}; '
        'give --resume an existing checkpoint, or --resume alone to continue from the latest '
        f'one in {tmp_path / "wd"}.')
    assert not (tmp_path / 'wd').exists()


def test_test_with_a_missing_checkpoint(run_tool, tmp_path):
    """Issue 17.2, with a shipped config (whose mmdet:: base is what imports pkg_resources)."""
    ran = run_tool(
        'test', REPO / 'configs' / 'faster_rcnn_orepa_r50.py', 'missing.pth', cwd=tmp_path)
    assert one_sentence(
        ran,
        2) == (f'error: Checkpoint missing.pth not found in {os.path.realpath(tmp_path)}; pass '
               'tools/test.py a checkpoint written by tools/train.py (for example '
               'work_dirs/<config name>/epoch_12.pth).')
    assert not (tmp_path / 'work_dirs').exists()


def test_converter_names_a_runner_checkpoint(run_tool, tmp_path):
    """Issue 17.3: the file is fine, so no re-download advice; say what it is instead."""
    src = tmp_path / 'epoch_6.pth'
    torch.save(runner_checkpoint(), src)
    with pytest.raises(Exception):  # what made the converter call it corrupt before
        torch.load(src, weights_only=True)
    ran = run_tool('convert_official_checkpoint', src, tmp_path / 'out.pth', cwd=tmp_path)
    assert one_sentence(ran, 2) == (
        f'error: {src} is an mmengine runner checkpoint of an orepa_mm model (epoch 6, iter '
        '300), which needs no conversion: pass it to tools/test.py or tools/reparameterize.py, '
        "or use it as load_from; this tool converts the authors' ImageNet checkpoints "
        "(ResNet-50_OREPA.pth.tar and the like: a state_dict of 'module.stage0...' tensors).")
    assert sorted(p.name for p in tmp_path.iterdir()) == ['epoch_6.pth']


def test_reparameterize_checks_the_output_directory_first(run_tool, toy, tmp_path):
    """Issue 17.4: before reading config or checkpoint (this checkpoint would be refused)."""
    checkpoint = tmp_path / 'epoch_1.pth'
    checkpoint.write_bytes(b'not a checkpoint')
    ran = run_tool('reparameterize', toy, checkpoint, '--out', '/proc/x', cwd=tmp_path)
    assert one_sentence(ran, 2) == (
        'error: output directory /proc/x is not writable (/proc/x: No such file or directory).')
    assert ran.stdout == ''


def test_converter_still_calls_a_truncated_file_corrupt(tmp_path, capsys):
    src = tmp_path / 'epoch_6.pth'
    torch.save(runner_checkpoint(), src)
    src.write_bytes(src.read_bytes()[:200])
    main = runpy.run_path(
        str(REPO / 'tools' / 'convert_official_checkpoint.py'), run_name='_converter')['main']
    capsys.readouterr()
    assert main([str(src), str(tmp_path / 'out.pth')]) == 2
    line = one_sentence(Ran(2, '', capsys.readouterr().err), 2)
    assert line.startswith(f'error: cannot read {src} as a tensor checkpoint (')
    assert line.endswith('; re-download the file.')


def test_the_mm_stack_does_warn_without_the_filter(tmp_path):
    """Issue 17.5's noise is real here: mmengine resolves a config's ``mmdet::`` base through
    pkg_resources, which setuptools (< 81) marks deprecated with a UserWarning. So the tool runs
    above, which load such a config and stay quiet, test the filter."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('PYTHONWARNINGS', None)
    proc = subprocess.run([
        sys.executable, '-c', 'from mmengine.utils import get_installed_path; '
        'get_installed_path("mmdet")'
    ],
                          cwd=tmp_path,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    if PKG_RESOURCES not in proc.stderr:
        pytest.skip('this setuptools does not warn about pkg_resources')


def test_the_filter_is_exactly_pkg_resources(tmp_path):
    """The tools' filter drops setuptools' notice and keeps every other warning."""
    script = textwrap.dedent(f'''
        import runpy, warnings
        runpy.run_path({str(REPO / 'tools' / 'reparameterize.py')!r}, run_name='not_main')
        warnings.warn('pkg_resources is deprecated as an API. See ...', UserWarning)
        warnings.warn('a real warning', UserWarning)
        warnings.warn('pkg_resources is deprecated as an API', DeprecationWarning)
    ''')
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    env.pop('PYTHONWARNINGS', None)
    proc = subprocess.run([sys.executable, '-W', 'always::DeprecationWarning', '-c', script],
                          cwd=tmp_path,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 'a real warning' in proc.stderr
    assert 'DeprecationWarning: pkg_resources' in proc.stderr  # another category: kept
    assert 'UserWarning: pkg_resources' not in proc.stderr
