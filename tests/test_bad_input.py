"""Every tool, every bad input (issue 23): one sentence, exit status 2, nothing half-written.

The matrix below is the issue's list of bad inputs, one row each, for ``tools/train.py``,
``test.py``, ``reparameterize.py``, ``convert_official_checkpoint.py`` and
``quantization_check.py``. Every row checks the same promise:

* the exit status (2 for bad input, 130 / 143 for SIGINT / SIGTERM);
* exactly one line on stderr, ``error: ...``, holding the words the row names, no traceback;
* the output location (the row's own folder, where the run's outputs, work dir and any
  earlier outputs live) byte for byte as it was before the run: no new, changed or temporary
  file, no created folder, no populated work dir;
* no pickled code ran (the malicious checkpoints touch a marker file if they do).

The fast tier calls each tool's ``main(argv)`` in this process on tiny fixtures built here (an
8-channel OREPA ResNet-18 classifier and its checkpoint in every broken form); the slow tier
runs the tools as users do, in a fresh process, and delivers real signals. The write policy's
building block, :class:`orepa_mm.utils.atomic_write.OutputSet`, is tested directly at the end.
"""
import os
import os.path as osp
import pickle
import runpy
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional, Sequence

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PNG = b'\x89PNG\r\n\x1a\n' + bytes(range(256)) * 4

TOY = '''
default_scope = 'mmpretrain'
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)
model = dict(
    type='ImageClassifier',
    backbone=dict(type='{backbone}', depth=18, stem_channels=8, base_channels=8),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes={classes}, in_channels=64,
              loss=dict(type='CrossEntropyLoss')))
dataset = dict(type='CustomDataset', data_root={data_root!r}, data_prefix='',
               pipeline=[dict(type='LoadImageFromFile'), dict(type='Resize', scale=32),
                         dict(type='PackInputs')])
train_dataloader = dict(batch_size=2, num_workers=0, dataset=dataset,
                        sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(batch_size=2, num_workers=0, dataset=dataset,
                      sampler=dict(type='DefaultSampler', shuffle=False))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.01))
train_cfg = dict(by_epoch=True, max_epochs=1)
val_cfg = dict()
test_cfg = dict()
'''


class RunsShell:
    """A checkpoint payload that runs a shell command when unpickled (if it ever is)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f'touch {self.marker}', )


def _build(config: Path):
    from mmengine.config import Config
    from mmengine.registry import MODELS, DefaultScope
    cfg = Config.fromfile(str(config))
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        return MODELS.build(cfg.model)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """Read-only inputs of every row: configs and checkpoints, good and broken."""
    w = tmp_path_factory.mktemp('inputs')
    for name in ('cat', 'dog'):
        (w / 'images' / name).mkdir(parents=True)
        (w / 'images' / name / f'{name}.png').write_bytes(PNG)
    toy = dict(data_root=str(w / 'images'), backbone='OREPAResNet', classes=2)
    (w / 'toy.py').write_text(TOY.format(**toy))
    (w / 'toy3.py').write_text(TOY.format(**dict(toy, classes=3)))
    (w / 'stock.py').write_text(TOY.format(**dict(toy, backbone='ResNet')))
    (w / 'syntax.py').write_text('model = dict(type=\n')
    (w / 'a_dir.py').mkdir()

    model = _build(w / 'toy.py')
    good = w / 'epoch_1.pth'
    torch.save(dict(state_dict=model.state_dict(), meta=dict(epoch=1, iter=2)), good)
    data = good.read_bytes()
    (w / 'truncated.pth').write_bytes(data[:len(data) // 2])
    (w / 'empty.pth').write_bytes(b'')
    (w / 'image.pth').write_bytes(PNG)
    (w / 'raw.pkl').write_bytes(pickle.dumps({'state_dict': {'a': 1}}))
    torch.save([1, 2, 3], w / 'list.pth')
    torch.save(dict(meta=dict(epoch=1)), w / 'no_state_dict.pth')
    torch.save(dict(state_dict={'backbone.conv.weight': torch.zeros(3)}), w / 'other_model.pth')
    torch.save(dict(state_dict=_build(w / 'toy3.py').state_dict()), w / 'other_shapes.pth')
    # DDP's prefix twice: mmengine strips one, so nothing would load.
    torch.save(
        dict(state_dict={
            f'module.module.{k}': v
            for k, v in model.state_dict().items()
        }), w / 'ddp_twice.pth')
    torch.save(dict(state_dict={}, meta=RunsShell(w / 'pickled_code_ran')), w / 'evil.pth')
    (w / 'evil_raw.pkl').write_bytes(pickle.dumps(RunsShell(w / 'pickled_code_ran')))
    for name, checkpoint in (('deploy_evil', 'evil.pth'), ('deploy_image', 'image.pth')):
        (w / name).mkdir()
        (w / name / 'deploy_config.py').write_text((w / 'stock.py').read_text())
        (w / name / 'deploy.pth').write_bytes((w / checkpoint).read_bytes())
    return w


# -- running a tool ----------------------------------------------------------------------------
class Ran(NamedTuple):
    returncode: object  # an int, or the name of an exception that escaped main()
    stdout: str
    stderr: str


def _tool(tool: str) -> str:
    return str(REPO / 'tools' / f'{tool}.py')


def run_in_process(tool, argv, cwd, capsys, monkeypatch, patch=None) -> Ran:
    monkeypatch.chdir(cwd)
    main = runpy.run_path(_tool(tool), run_name=f'_bad_input_{tool}')['main']
    if patch is not None:
        patch(main, monkeypatch)
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    except BaseException as exc:  # noqa: BLE001 - what escaped is the finding
        code = type(exc).__name__
    captured = capsys.readouterr()
    return Ran(code or 0, captured.out, captured.err)


def run_subprocess(tool, argv, cwd, prelude='') -> Ran:
    """The tool as ``python tools/<tool>.py ARGS``; ``prelude`` runs first (a patch)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    env['PYTHONPATH'] = os.pathsep.join([str(REPO)] +
                                        ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    env.pop('PYTHONWARNINGS', None)
    if prelude:
        script = prelude + textwrap.dedent(f'''
            import runpy, sys
            sys.argv = [{_tool(tool)!r}, *{list(argv)!r}]
            runpy.run_path({_tool(tool)!r}, run_name='__main__')
        ''')
        command = [sys.executable, '-c', script]
    else:
        command = [sys.executable, _tool(tool), *argv]
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return Ran(proc.returncode, proc.stdout, proc.stderr)


def snapshot(root: Path) -> Dict[str, object]:
    """Every entry under ``root``: bytes of files, 'dir' for folders, the target of links."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[osp.relpath(osp.join(folder, name), root)] = 'dir'
        for name in files:
            path = osp.join(folder, name)
            found[osp.relpath(path, root)] = (
                os.readlink(path) if osp.islink(path) else Path(path).read_bytes())
    return found


def assert_refusal(ran: Ran, code: int, says: Sequence[str]) -> str:
    assert ran.returncode == code, (ran.returncode, ran.stderr[-3000:])
    assert 'Traceback' not in ran.stderr, ran.stderr[-3000:]
    lines = [line for line in ran.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, ran.stderr[-3000:]
    assert lines[0].startswith('error: '), lines[0]
    for words in says:
        assert words in lines[0], lines[0]
    return lines[0]


# -- the matrix ---------------------------------------------------------------------------------
@dataclass
class Row:
    """One bad input. ``argv`` and ``setup`` see ``W`` (the inputs) and ``T`` (the row's own
    folder: cwd, outputs, earlier outputs); ``setup`` lays out what must survive the run."""
    id: str
    tool: str
    argv: Sequence[str]
    says: Sequence[str] = ()
    code: int = 2
    setup: Optional[Callable[[Path, Path], None]] = None
    patch: Optional[Callable] = None  # (main, monkeypatch), in-process only
    slow: bool = False
    prelude: str = ''  # subprocess only
    not_said: Sequence[str] = field(default_factory=tuple)


def _file(relative: str, data: bytes = b'previous output\n'):

    def setup(w, t):
        path = t / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return setup


def _deploy_dir_with(blocker: str):
    """An earlier run's outputs in T/O, with ``blocker`` (a folder) in place of one of them."""

    def setup(w, t):
        (t / 'O').mkdir()
        (t / 'O' / 'deploy.pth').write_bytes(b'previous deploy.pth')
        (t / 'O' / 'deploy_config.py').write_text('# previous deploy_config.py\n')
        target = t / 'O' / blocker
        if target.exists():
            target.unlink()
        target.mkdir()

    return setup


def _previous_outputs(w, t):
    (t / 'O').mkdir()
    (t / 'O' / 'deploy.pth').write_bytes(b'previous deploy.pth')
    (t / 'O' / 'deploy_config.py').write_text('# previous deploy_config.py\n')


def _interrupt_writing_the_config(main, monkeypatch):
    """Ctrl-C while deploy_config.py is written, i.e. after deploy.pth was."""
    import orepa_mm.apis.reparameterize as module

    def save_text(text):

        def write(path):
            with open(path, 'w') as f:
                f.write(text[:10])
            raise KeyboardInterrupt

        return write

    monkeypatch.setattr(module, '_save_text', save_text)


def _interrupt_torch_save(main, monkeypatch):
    real = torch.save

    def save(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', save)


def _interrupt_before_the_runner(main, monkeypatch):

    def build_runner(cfg):
        raise KeyboardInterrupt

    monkeypatch.setitem(main.__globals__, 'build_runner', build_runner)


_SIGTERM_WRITING_THE_CONFIG = '''
import os, signal, time
import orepa_mm.apis.reparameterize as module
real = module._save_text
def _save_text(text):
    write = real(text)
    def killed(path):
        write(path)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    return killed
module._save_text = _save_text
'''
_SIGTERM_IN_TORCH_SAVE = '''
import os, signal, time, torch
real = torch.save
def save(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
torch.save = save
'''
# A shell starts background jobs with SIGINT ignored, and Python keeps an inherited SIG_IGN:
# the subprocess gets the handler a terminal gives it, whatever started the suite.
_SIGINT_WRITING_THE_CONFIG = (
    'import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)' +
    _SIGTERM_WRITING_THE_CONFIG.replace('SIGTERM', 'SIGINT'))

SAFETY = ('refused for safety', )
CORRUPT = ('not a PyTorch checkpoint', )
TRAIN_CKPT = ('{W}/toy.py', '--work-dir', '{T}/work', '--cfg-options')

ROWS = [
    # -- tools/train.py
    Row('train-config-missing', 'train', ['{W}/nope.py'], ('{W}/nope.py', 'does not exist')),
    Row('train-config-syntax-error', 'train', ['{W}/syntax.py'],
        ('cannot read config {W}/syntax.py', 'SyntaxError', 'fix the file')),
    Row('train-config-is-a-directory', 'train', ['{W}/a_dir.py'], ('is a directory', )),
    Row('train-cfg-options-no-equals', 'train', ['{W}/toy.py', '--cfg-options', 'foo'],
        ("'foo' is not KEY=VALUE", )),
    Row('train-cfg-options-unbalanced-list', 'train',
        ['{W}/toy.py', '--cfg-options', 'train_cfg.max_epochs=[1,2'], ('malformed value', )),
    Row('train-cfg-options-key-under-a-number', 'train',
        ['{W}/toy.py', '--cfg-options', 'train_dataloader.batch_size.x=3'],
        ('train_dataloader.batch_size', 'not a dict')),
    Row('train-cfg-options-text-for-a-number', 'train',
        ['{W}/toy.py', '--cfg-options', 'train_cfg.max_epochs=abc'],
        ('train_cfg.max_epochs=abc', 'a number')),
    Row('train-work-dir-is-a-file',
        'train', ['{W}/toy.py', '--work-dir', '{T}/work'],
        ('work dir {T}/work is an existing file', ),
        setup=_file('work')),
    Row('train-load-from-truncated', 'train', [*TRAIN_CKPT, 'load_from={W}/truncated.pth'],
        CORRUPT),
    Row('train-resume-empty', 'train',
        ['{W}/toy.py', '--work-dir', '{T}/work', '--resume', '{W}/empty.pth'], ('empty', )),
    Row('train-resume-list', 'train',
        ['{W}/toy.py', '--work-dir', '{T}/work', '--resume', '{W}/list.pth'], ('holds a list', )),
    Row('train-load-from-no-state-dict', 'train', [*TRAIN_CKPT, 'load_from={W}/no_state_dict.pth'],
        ('holds no model weights', )),
    Row('train-load-from-malicious', 'train', [*TRAIN_CKPT, 'load_from={W}/evil.pth'], SAFETY),
    Row('train-ctrl-c',
        'train', ['{W}/toy.py', '--work-dir', '{T}/work'], ('interrupted by SIGINT', ),
        code=130,
        patch=_interrupt_before_the_runner),
    # -- tools/test.py
    Row('test-config-missing', 'test', ['{W}/nope.py', '{W}/epoch_1.pth'], ('does not exist', )),
    Row('test-config-syntax-error', 'test', ['{W}/syntax.py', '{W}/epoch_1.pth'],
        ('cannot read config', 'SyntaxError')),
    Row('test-cfg-options-no-equals', 'test',
        ['{W}/toy.py', '{W}/epoch_1.pth', '--cfg-options', 'foo'], ('not KEY=VALUE', )),
    Row('test-work-dir-is-a-file',
        'test', ['{W}/toy.py', '{W}/epoch_1.pth', '--work-dir', '{T}/work'], ('existing file', ),
        setup=_file('work')),
    Row('test-checkpoint-truncated', 'test', ['{W}/toy.py', '{W}/truncated.pth'], CORRUPT),
    Row('test-checkpoint-empty', 'test', ['{W}/toy.py', '{W}/empty.pth'], ('empty', )),
    Row('test-checkpoint-list', 'test', ['{W}/toy.py', '{W}/list.pth'], ('holds a list', )),
    Row('test-checkpoint-image',
        'test', ['{W}/toy.py', '{W}/image.pth'],
        CORRUPT,
        not_said=('pickles', )),
    Row('test-checkpoint-raw-pickle',
        'test', ['{W}/toy.py', '{W}/raw.pkl'],
        CORRUPT,
        not_said=('pickles', )),
    Row('test-checkpoint-no-state-dict', 'test', ['{W}/toy.py', '{W}/no_state_dict.pth'],
        ('holds no model weights', )),
    Row('test-checkpoint-malicious', 'test', ['{W}/toy.py', '{W}/evil.pth'], SAFETY),
    Row('test-checkpoint-malicious-plain-pickle', 'test', ['{W}/toy.py', '{W}/evil_raw.pkl'],
        SAFETY),
    Row('test-checkpoint-of-another-model', 'test', ['{W}/toy.py', '{W}/other_model.pth'],
        ('does not fit the model of {W}/toy.py', 'missing (backbone.', 'unexpected',
         'backbone.conv.weight', 'pass the checkpoint tools/train.py wrote')),
    Row('test-checkpoint-other-shapes', 'test', ['{W}/toy.py', '{W}/other_shapes.pth'],
        ('does not fit', 'other shapes', 'head.fc.weight')),
    Row('test-checkpoint-ddp-prefix-twice', 'test', ['{W}/toy.py', '{W}/ddp_twice.pth'],
        ('does not fit', 'missing', 'unexpected', 'module.backbone.')),
    Row('test-out-unwritable', 'test',
        ['{W}/toy.py', '{W}/epoch_1.pth', '--work-dir', '{T}/work', '--out', '/proc/x/p.pkl'],
        ('/proc/x/p.pkl', 'not writable')),
    Row('test-out-empty', 'test', ['{W}/toy.py', '{W}/epoch_1.pth', '--out', ''],
        ('--out is empty', )),
    Row('test-out-is-a-directory',
        'test', ['{W}/toy.py', '{W}/epoch_1.pth', '--out', '{T}/preds.pkl'],
        ('existing directory', ),
        setup=lambda w, t: (t / 'preds.pkl').mkdir()),
    # -- tools/reparameterize.py
    Row('reparameterize-config-target-is-a-directory',
        'reparameterize', ['{W}/toy.py', '{W}/epoch_1.pth', '--out', '{T}/O'],
        ('{T}/O/deploy_config.py', 'existing directory'),
        setup=_deploy_dir_with('deploy_config.py')),
    Row('reparameterize-onnx-target-is-a-directory',
        'reparameterize', ['{W}/toy.py', '{W}/epoch_1.pth', '--out', '{T}/O'],
        ('deploy_backbone.onnx', 'existing directory'),
        setup=_deploy_dir_with('deploy_backbone.onnx')),
    Row('reparameterize-out-unwritable', 'reparameterize',
        ['{W}/toy.py', '{W}/epoch_1.pth', '--out', '/proc/x'], ('/proc/x', 'not writable')),
    Row('reparameterize-out-empty', 'reparameterize',
        ['{W}/toy.py', '{W}/epoch_1.pth', '--out', ''], ('--out is empty', )),
    Row('reparameterize-config-missing', 'reparameterize',
        ['{W}/nope.py', '{W}/epoch_1.pth', '--out', '{T}/O'], ('does not exist', 'pass ')),
    Row('reparameterize-checkpoint-malicious',
        'reparameterize', ['{W}/toy.py', '{W}/evil.pth', '--out', '{T}/O'],
        SAFETY,
        not_said=('corrupt', )),
    Row('reparameterize-checkpoint-image',
        'reparameterize', ['{W}/toy.py', '{W}/image.pth', '--out', '{T}/O'],
        CORRUPT,
        not_said=('pickles', )),
    Row('reparameterize-checkpoint-raw-pickle',
        'reparameterize', ['{W}/toy.py', '{W}/raw.pkl', '--out', '{T}/O'],
        CORRUPT,
        not_said=('pickles', )),
    Row('reparameterize-ctrl-c-writing-the-second-file',
        'reparameterize', ['{W}/toy.py', '{W}/epoch_1.pth', '--out', '{T}/O'],
        ('interrupted by SIGINT', ),
        code=130,
        setup=_previous_outputs,
        patch=_interrupt_writing_the_config),
    Row('reparameterize-ctrl-c-into-a-new-directory',
        'reparameterize', ['{W}/toy.py', '{W}/epoch_1.pth', '--out', '{T}/new/O'],
        ('interrupted by SIGINT', ),
        code=130,
        patch=_interrupt_writing_the_config),
    # -- tools/convert_official_checkpoint.py
    Row('convert-dst-is-a-directory',
        'convert_official_checkpoint', ['{W}/official.pth.tar', '{T}/dst.pth'],
        ('{T}/dst.pth', 'existing directory'),
        setup=lambda w, t: (t / 'dst.pth').mkdir()),
    Row('convert-dst-empty', 'convert_official_checkpoint', ['{W}/official.pth.tar', ''],
        ('DST is empty', )),
    Row('convert-src-is-a-directory',
        'convert_official_checkpoint', ['{W}/a_dir.py', '{T}/dst.pth'], ('is a directory', ),
        not_said=('does not exist', )),
    Row('convert-dst-is-the-source',
        'convert_official_checkpoint', ['{T}/src.pth.tar', '{T}/src.pth.tar'],
        ('is the source checkpoint', ),
        setup=lambda w, t: (t / 'src.pth.tar').write_bytes((w / 'official.pth.tar').read_bytes())),
    Row('convert-src-malicious', 'convert_official_checkpoint', ['{W}/evil.pth', '{T}/dst.pth'],
        SAFETY),
    Row('convert-src-image',
        'convert_official_checkpoint', ['{W}/image.pth', '{T}/dst.pth'], ('cannot read', ),
        not_said=('pickles', )),
    Row('convert-src-malicious-plain-pickle', 'convert_official_checkpoint',
        ['{W}/evil_raw.pkl', '{T}/dst.pth'], SAFETY),
    Row('convert-ctrl-c-while-writing',
        'convert_official_checkpoint', ['{W}/official.pth.tar', '{T}/dst.pth'],
        ('interrupted by SIGINT', ),
        code=130,
        setup=_file('dst.pth'),
        patch=_interrupt_torch_save),
    # -- tools/quantization_check.py
    Row('quantization-out-and-save-onnx-the-same', 'quantization_check',
        ['{W}/deploy_evil', '--out', '{T}/x', '--save-onnx', '{T}/x'], ('given twice', )),
    Row('quantization-out-empty', 'quantization_check', ['{W}/deploy_evil', '--out', ''],
        ('--out is empty', )),
    Row('quantization-top-negative', 'quantization_check', ['{W}/deploy_evil', '--top', '-1'],
        ('--top', '-1')),
    Row('quantization-out-unwritable', 'quantization_check',
        ['{W}/deploy_evil', '--out', '/proc/x/r.json'], ('not writable', )),
    Row('quantization-out-is-a-directory',
        'quantization_check', ['{W}/deploy_evil', '--out', '{T}/r.json'], ('existing directory', ),
        setup=lambda w, t: (t / 'r.json').mkdir()),
    Row('quantization-checkpoint-malicious', 'quantization_check', ['{W}/deploy_evil'], SAFETY),
    Row('quantization-checkpoint-image',
        'quantization_check', ['{W}/deploy_image'],
        CORRUPT,
        not_said=('pickles', )),
    # -- the slow tier: real processes, real signals
    Row('subprocess-train-config-missing',
        'train', ['{W}/nope.py'], ('does not exist', ),
        slow=True),
    Row('subprocess-test-checkpoint-of-another-model',
        'test', ['{W}/toy.py', '{W}/other_model.pth', '--work-dir', '{T}/work'], ('does not fit', ),
        slow=True),
    Row('subprocess-train-cfg-options-text-for-a-number',
        'train',
        ['{W}/toy.py', '--work-dir', '{T}/work', '--cfg-options', 'train_cfg.max_epochs=abc'],
        ('a number', ),
        slow=True),
    Row('subprocess-reparameterize-sigterm-writing-the-second-file',
        'reparameterize', ['{W}/toy.py', '{W}/epoch_1.pth', '--out', '{T}/O'],
        ('interrupted by SIGTERM', ),
        code=143,
        setup=_previous_outputs,
        slow=True,
        prelude=_SIGTERM_WRITING_THE_CONFIG),
    Row('subprocess-reparameterize-sigint-into-a-new-directory',
        'reparameterize', ['{W}/toy.py', '{W}/epoch_1.pth', '--out', '{T}/new/O'],
        ('interrupted by SIGINT', ),
        code=130,
        slow=True,
        prelude=_SIGINT_WRITING_THE_CONFIG),
    Row('subprocess-convert-sigterm-while-writing',
        'convert_official_checkpoint', ['{W}/official.pth.tar', '{T}/sub/dst.pth'],
        ('interrupted by SIGTERM', ),
        code=143,
        slow=True,
        prelude=_SIGTERM_IN_TORCH_SAVE),
]


def _params(rows):
    return [
        pytest.param(row, id=row.id, marks=[pytest.mark.slow] if row.slow else []) for row in rows
    ]


@pytest.fixture
def official(world):
    from tests.official_reference import reference_path
    target = world / 'official.pth.tar'
    if not target.exists():
        target.write_bytes(Path(reference_path('official_resnet18_w0.25.pth.tar')).read_bytes())
    return target


@pytest.mark.parametrize('row', _params(ROWS))
def test_bad_input(row, world, official, tmp_path, capsys, monkeypatch):
    t = tmp_path / 'T'
    t.mkdir()
    if row.setup is not None:
        row.setup(world, t)
    fill = dict(W=str(world), T=str(t))
    argv = [arg.format(**fill) for arg in row.argv]
    before = snapshot(t)
    if row.slow:
        ran = run_subprocess(row.tool, argv, t, row.prelude)
    else:
        ran = run_in_process(row.tool, argv, t, capsys, monkeypatch, row.patch)
    line = assert_refusal(ran, row.code, [s.format(**fill) for s in row.says])
    for words in row.not_said:
        assert words not in line, line
    assert snapshot(t) == before
    assert not (world / 'pickled_code_ran').exists()


def test_reparameterize_refuses_an_immutable_target_before_any_work(world, tmp_path, capsys,
                                                                    monkeypatch):
    """The issue's other blocker: ``deploy_config.py`` that cannot be replaced (chattr +i) is
    found by the check, not after ``deploy.pth`` was replaced."""
    t = tmp_path / 'T'
    t.mkdir()
    _previous_outputs(world, t)
    config = t / 'O' / 'deploy_config.py'
    if subprocess.run(['chattr', '+i', str(config)], capture_output=True).returncode != 0:
        pytest.skip('chattr +i is not available here')
    try:
        before = snapshot(t)
        ran = run_in_process(
            'reparameterize',
            [str(world / 'toy.py'),
             str(world / 'epoch_1.pth'), '--out',
             str(t / 'O')], t, capsys, monkeypatch)
        assert_refusal(ran, 2, [f'cannot replace output {config}', 'immutable'])
        assert snapshot(t) == before
    finally:
        subprocess.run(['chattr', '-i', str(config)], capture_output=True)


# -- the write policy, where a run succeeds ---------------------------------------------------
def test_converter_replaces_an_existing_file_whole_and_says_so(official, tmp_path, capsys,
                                                               monkeypatch):
    dst = tmp_path / 'dst.pth'
    dst.write_bytes(b'previous')
    ran = run_in_process('convert_official_checkpoint', [str(official), str(dst)], tmp_path, capsys,
                         monkeypatch)
    assert ran.returncode == 0, ran.stderr
    assert f'wrote {dst} (replaced the previous file)' in ran.stdout
    assert torch.load(dst, weights_only=True)['meta']['converted_from'] == 'official.pth.tar'
    assert sorted(os.listdir(tmp_path)) == ['dst.pth']  # no staging folder left
    assert (dst.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_reparameterize_replaces_the_set_and_drops_a_stale_onnx(world, tmp_path, capsys,
                                                                monkeypatch):
    out = tmp_path / 'O'
    out.mkdir()
    (out / 'deploy.pth').write_bytes(b'previous')
    (out / 'deploy_backbone.onnx').write_bytes(b'an earlier --onnx run')
    ran = run_in_process('reparameterize',
                         [str(world / 'toy.py'),
                          str(world / 'epoch_1.pth'), '--out',
                          str(out)], tmp_path, capsys, monkeypatch)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert sorted(os.listdir(out)) == ['deploy.pth', 'deploy_config.py']
    assert 'previous outputs' in ran.stdout
    for name in ('deploy.pth', 'deploy_config.py'):
        assert ((out / name).stat().st_mode & 0o777) == 0o666 & ~_umask()
    assert sorted(os.listdir(tmp_path)) == ['O']


def test_mmseg_out_is_a_folder_output_staged_for_the_evaluator(tmp_path):
    """mmseg's ``--out`` is the folder IoUMetric writes the maps into: staged like a file."""
    from mmengine.config import Config

    from orepa_mm.utils.cli import check_test_outputs, stage_test_output
    cfg = Config(dict(default_scope='mmseg', test_evaluator=dict(type='IoUMetric')))
    out = str(tmp_path / 'maps')
    outputs = check_test_outputs(cfg, out)
    with outputs.write() as staged:
        where = stage_test_output(cfg, staged, out)
        assert cfg.test_evaluator['output_dir'] == where and osp.isdir(where)
        Path(where, 'a.png').write_bytes(PNG)
    assert os.listdir(out) == ['a.png'] and os.listdir(tmp_path) == ['maps']


# -- OutputSet, directly -------------------------------------------------------------------------
def _outputs(*paths, **kwargs):
    from orepa_mm.utils.atomic_write import OutputSet
    outputs = OutputSet()
    for path in paths:
        outputs.add(str(path), '--out', **kwargs)
    return outputs.check()


def test_outputs_appear_together_with_their_new_folders(tmp_path):
    a, b = tmp_path / 'x' / 'y' / 'a', tmp_path / 'x' / 'y' / 'b'
    outputs = _outputs(a, b)
    assert os.listdir(tmp_path) == []  # the check leaves nothing behind
    with outputs.write() as staged:
        for path in (a, b):
            Path(staged[str(path)]).write_text(path.name)
        assert not (tmp_path / 'x').exists()  # nothing in place before the end
    assert a.read_text() == 'a' and b.read_text() == 'b'
    assert sorted(os.listdir(tmp_path)) == ['x']


@pytest.mark.parametrize('fail_at', [1, 2])
def test_a_failed_move_puts_every_previous_output_back(tmp_path, monkeypatch, fail_at):
    from orepa_mm.utils.errors import OrepaInputError
    a, b = tmp_path / 'a', tmp_path / 'b'
    a.write_text('old a')
    b.write_text('old b')
    outputs = _outputs(a, b)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_at:
            raise OSError(1, 'Operation not permitted', dst)
        return real(src, dst)

    with pytest.raises(OrepaInputError, match='nothing was replaced'):
        with outputs.write() as staged:
            for path in (a, b):
                Path(staged[str(path)]).write_text('new')
            monkeypatch.setattr(os, 'replace', replace)
    monkeypatch.setattr(os, 'replace', real)
    assert (a.read_text(), b.read_text()) == ('old a', 'old b')
    assert sorted(os.listdir(tmp_path)) == ['a', 'b']


def test_an_interrupt_while_staging_leaves_nothing(tmp_path):
    a = tmp_path / 'new' / 'a'
    outputs = _outputs(a)
    with pytest.raises(KeyboardInterrupt):
        with outputs.write() as staged:
            Path(staged[str(a)]).write_text('half')
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_outputs_refused_up_front(tmp_path):
    from orepa_mm.utils.atomic_write import OutputSet
    from orepa_mm.utils.errors import OrepaInputError
    outputs = OutputSet()
    outputs.add(str(tmp_path / 'a'), '--out')
    with pytest.raises(OrepaInputError, match=r'given twice as an output \(--out and --x\)'):
        outputs.add(str(tmp_path / '.' / 'a'), '--x')
    with pytest.raises(OrepaInputError, match='--out is empty'):
        OutputSet().add('', '--out')
    (tmp_path / 'f').write_text('x')
    with pytest.raises(OrepaInputError, match='is a file, not a folder'):
        _outputs(tmp_path / 'f' / 'a')
    (tmp_path / 'maps').write_text('x')
    with pytest.raises(OrepaInputError, match='existing file'):
        _outputs(tmp_path / 'maps', kind='dir')
    assert sorted(os.listdir(tmp_path)) == ['f', 'maps']


def test_a_folder_output_is_replaced_whole(tmp_path):
    maps = tmp_path / 'maps'
    maps.mkdir()
    (maps / 'old.png').write_text('old')
    outputs = _outputs(maps, kind='dir')
    with outputs.write() as staged:
        Path(staged[str(maps)], 'new.png').write_text('new')
    assert os.listdir(maps) == ['new.png']
    assert outputs.replaced == [str(maps)]
    assert sorted(os.listdir(tmp_path)) == ['maps']


def test_one_line_and_the_exit_codes_of_run_tool(capsys):
    from orepa_mm.utils.errors import EXIT_BAD_INPUT, EXIT_FAILED, OrepaInputError, run_tool

    def refuse():
        raise OrepaInputError('two\nlines.')

    def interrupt():
        raise KeyboardInterrupt

    def bug():
        raise ValueError('deep\ninside')

    assert EXIT_BAD_INPUT == 2
    assert [run_tool(refuse),
            run_tool(interrupt),
            run_tool(bug),
            run_tool(lambda: None)] == [2, 130, EXIT_FAILED, 0]
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        'error: two lines.', 'error: interrupted by SIGINT; no output was written or replaced.',
        'error: unexpected ValueError: deep (not a problem with the input as far as the checks '
        'know; OREPA_MM_TRACEBACK=1 shows the traceback).'
    ]


def test_sigterm_becomes_an_interrupt_and_is_restored():
    from orepa_mm.utils.errors import run_tool
    previous = signal.getsignal(signal.SIGTERM)

    def terminated():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes: raises in here
            pass

    assert run_tool(terminated) == 143
    assert signal.getsignal(signal.SIGTERM) is previous
