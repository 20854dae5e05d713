"""orepa_mm.utils.checkpoint_io: real runner checkpoints load under torch's
weights-only unpickler through mmengine's own loader; anything else pickled
is refused before it runs.

The checkpoint is written by a real mmengine Runner (toy BaseModel, a few
iterations, CheckpointHook), so it carries what users' checkpoints carry:
the message hub's HistoryBuffers with numpy arrays, optimizer state and
scheduler state (OneCycleLR, whose state pickles a getattr lookup too).
"""
import collections
import copyreg
import os
import pickle
import shlex
import uuid

import pytest
import torch
import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.optim.scheduler.param_scheduler import OneCycleParamScheduler
from mmengine.runner import Runner
from mmengine.runner import checkpoint as mmengine_checkpoint
from mmengine.runner import load_checkpoint
from mmengine.runner.checkpoint import CheckpointLoader, _load_checkpoint
from torch.utils.data import Dataset

from orepa_mm.utils.checkpoint_io import UnsafeCheckpointError, register_safe_checkpoint_loader

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')


class ToyModel(BaseModel):
    """Linear regression; enough parameters for optimizer state."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, inputs, labels=None, mode='tensor'):
        out = self.fc(inputs).squeeze(-1)
        if mode == 'loss':
            return dict(loss=((out - labels)**2).mean())
        return out


class ToyData(Dataset):

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return dict(inputs=torch.tensor([i / 8, 1.0]), labels=torch.tensor(i / 8))


class RecordIters(Hook):
    """Records the iteration every train step starts at."""

    def __init__(self):
        self.iters = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.iters.append(runner.iter)


def make_runner(work_dir, max_iters, **kwargs):
    return Runner(
        model=ToyModel(),
        work_dir=str(work_dir),
        experiment_name=f'ckpt_{uuid.uuid4().hex[:8]}',  # fresh logger/visualizer
        train_dataloader=dict(
            dataset=ToyData(),
            sampler=dict(type='DefaultSampler', shuffle=False),
            batch_size=2,
            num_workers=0,
            collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
        param_scheduler=dict(type='OneCycleLR', eta_max=0.01, total_steps=8, by_epoch=False),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
            logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0),
        default_scope='mmengine',
        **kwargs)


@pytest.fixture(autouse=True)
def _restore_loader_schemes():
    """Each test starts with the safe loader and leaves mmengine's scheme
    table as it found it."""
    saved = dict(CheckpointLoader._schemes)
    register_safe_checkpoint_loader()
    yield
    CheckpointLoader._schemes = collections.OrderedDict(saved)


@pytest.fixture(scope='module')
def runner_ckpt(tmp_path_factory):
    """A checkpoint written by a real Runner after 4 iterations."""
    saved = dict(CheckpointLoader._schemes)
    register_safe_checkpoint_loader()
    work_dir = tmp_path_factory.mktemp('runner')
    make_runner(work_dir, max_iters=4).train()
    CheckpointLoader._schemes = collections.OrderedDict(saved)
    path = work_dir / 'iter_4.pth'
    assert path.is_file()
    return str(path)


def test_plain_mmengine_loader_fails_on_runner_checkpoint(runner_ckpt):
    """The problem being solved: torch >= 2.6 refuses mmengine's own files."""
    CheckpointLoader.register_scheme(
        prefixes='', loader=mmengine_checkpoint.load_from_local, force=True)
    with pytest.raises(pickle.UnpicklingError, match='getattr|HistoryBuffer'):
        _load_checkpoint(runner_ckpt, map_location='cpu')


def test_runner_checkpoint_loads(runner_ckpt):
    ckpt = _load_checkpoint(runner_ckpt, map_location='cpu')
    assert ckpt['meta']['iter'] == 4
    buffers = ckpt['message_hub']['log_scalars']
    assert isinstance(buffers['train/loss'], HistoryBuffer)
    assert len(buffers['train/loss'].data[0]) == 4
    assert buffers['train/loss'].statistics('mean') == pytest.approx(
        buffers['train/loss'].data[0].mean())
    assert ckpt['param_schedulers'][0]['anneal_func'] is \
        OneCycleParamScheduler._annealing_cos

    model = ToyModel()
    load_checkpoint(model, runner_ckpt, map_location='cpu', strict=True)
    assert torch.equal(model.fc.weight, ckpt['state_dict']['fc.weight'])


def test_loading_leaves_torch_allowlist_unchanged(runner_ckpt):
    before = set(torch.serialization.get_safe_globals())
    _load_checkpoint(runner_ckpt, map_location='cpu')
    assert set(torch.serialization.get_safe_globals()) == before


def test_resume_continues_from_checkpoint(runner_ckpt, tmp_path):
    recorder = RecordIters()
    runner = make_runner(
        tmp_path, max_iters=6, resume=True, load_from=runner_ckpt, custom_hooks=[recorder])
    runner.train()
    assert recorder.iters == [4, 5]
    assert runner.iter == 6
    # The 4 losses logged before the checkpoint came back with it.
    assert len(runner.message_hub.get_scalar('train/loss').data[0]) == 6


# ---------------------------------------------------------- refused pickles
class RunsShell:
    """Pickles as ``os.system(<touch marker>)``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {shlex.quote(str(self.marker))}', )


class OpensFile:
    """Pickles as ``open(marker, 'w')``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), 'w')


class _OsSystemByGetattr:
    """Pickles as ``getattr(os, 'system')``."""

    def __call__(self, *args):
        raise AssertionError('never called while pickling')

    def __reduce__(self):
        return getattr, (os, 'system')


class RunsShellViaGetattr(RunsShell):
    """Pickles as ``getattr(os, 'system')(<touch marker>)``."""

    def __reduce__(self):
        return _OsSystemByGetattr(), super().__reduce__()[1]


class RegistersStatistic:
    """Pickles as ``getattr(HistoryBuffer, 'register_statistics')(OrderedDict)``:
    every name in it is allowlisted except that getattr lookup, which would
    let a checkpoint rewrite HistoryBuffer's class-level statistics table."""

    def __reduce__(self):
        return HistoryBuffer.register_statistics, (collections.OrderedDict, )


class _ModulesByName(pickle.Pickler):
    """Lets ``torch.save`` pickle a module object (as ``import_module``)."""
    dispatch_table = {
        **copyreg.dispatch_table,
        type(os): lambda mod: (__import__, (mod.__name__, )),
    }


class _PickleWithModules:
    Pickler = _ModulesByName


def _save(obj, path, **kwargs):
    torch.save({'state_dict': {}, 'meta': {}, 'payload': obj}, str(path), **kwargs)
    return str(path)


def _assert_refused(path, *expected_in_message):
    with pytest.raises(UnsafeCheckpointError) as info:
        _load_checkpoint(path, map_location='cpu')
    message = str(info.value)
    assert message.startswith(f'Refusing to load checkpoint {path}: ')
    assert '\n' not in message and message.count('. ') == 0
    for text in expected_in_message:
        assert text in message
    return message


def test_reduce_to_os_system_is_refused_without_running(tmp_path):
    marker = tmp_path / 'os_system_ran'
    path = _save(RunsShell(marker), tmp_path / 'evil.pth')
    _assert_refused(path, 'system')
    assert not marker.exists()


def test_reduce_to_open_is_refused_without_running(tmp_path):
    marker = tmp_path / 'open_ran'
    path = _save(OpensFile(marker), tmp_path / 'evil.pth')
    _assert_refused(path, 'open')
    assert not marker.exists()


def test_getattr_of_os_system_is_refused(tmp_path):
    marker = tmp_path / 'getattr_ran'
    path = _save(
        RunsShellViaGetattr(marker), tmp_path / 'evil.pth', pickle_module=_PickleWithModules)
    _assert_refused(path)
    assert not marker.exists()


def test_getattr_beyond_history_buffer_statistics_is_refused(tmp_path):
    methods = dict(HistoryBuffer._statistics_methods)
    path = _save(RegistersStatistic(), tmp_path / 'evil.pth')
    _assert_refused(path, "getattr(HistoryBuffer, 'register_statistics')")
    assert HistoryBuffer._statistics_methods == methods


def test_process_wide_getattr_allowlisting_does_not_widen_it(tmp_path):
    """Another library allowlisting the real getattr must not reopen the hole,
    and its registration must survive our load."""
    path = _save(RegistersStatistic(), tmp_path / 'evil.pth')
    torch.serialization.add_safe_globals([getattr])
    try:
        _assert_refused(path, 'register_statistics')
        assert getattr in torch.serialization.get_safe_globals()
    finally:
        torch.serialization._weights_only_unpickler._remove_safe_globals([getattr])


def test_register_is_idempotent():
    register_safe_checkpoint_loader()
    register_safe_checkpoint_loader()
    loaders = [fn for prefix, fn in CheckpointLoader._schemes.items() if prefix == '']
    assert len(loaders) == 1
    assert loaders[0].__module__ == 'orepa_mm.utils.checkpoint_io'
