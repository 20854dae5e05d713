"""orepa_mm's layers and deploy walk also run on mmdeploy's torch 2.1 (its own environment, where
mmdeploy calls ``backbone.switch_to_deploy()`` on a train-time model): the older spellings are
used where the newer ones are missing. Checked here by taking the newer ones away."""
import importlib
import importlib.util

import torch
from mmengine.runner.checkpoint import CheckpointLoader

from orepa_mm.cnn import precision
from orepa_mm.utils import checkpoint_io


def test_autocast_state_without_a_device_argument(monkeypatch):
    """torch < 2.4: ``torch.is_autocast_enabled()`` takes no device; the CPU has its own."""

    def without_device(*args):
        if args:
            raise TypeError('is_autocast_enabled() takes 0 positional arguments')
        return False

    monkeypatch.setattr(torch, 'is_autocast_enabled', without_device)
    monkeypatch.setattr(torch, 'is_autocast_cpu_enabled', lambda: True)
    assert precision.autocast_enabled('cpu') is True
    assert precision.autocast_enabled('cuda') is False


def test_is_compiling_without_torch_compiler_is_compiling(monkeypatch):
    """torch < 2.3: only Dynamo's ``is_compiling`` (taken away here, Dynamo's own is replaced
    by a stand-in, since torch 2.14's calls the newer one)."""
    monkeypatch.delattr(torch.compiler, 'is_compiling')
    monkeypatch.setattr(torch._dynamo, 'is_compiling', lambda: 'dynamo says')
    try:
        reloaded = importlib.reload(precision)
        assert reloaded.is_compiling() == 'dynamo says'
    finally:
        monkeypatch.undo()
        importlib.reload(precision)


def test_mmengine_loader_stays_where_torch_has_no_allow_list(monkeypatch):

    def mmengine_own(filename, map_location=None):
        raise AssertionError('not called')

    CheckpointLoader.register_scheme(prefixes='', loader=mmengine_own, force=True)
    try:
        monkeypatch.delattr(torch.serialization, 'safe_globals')
        checkpoint_io.register_safe_checkpoint_loader()
        assert CheckpointLoader._schemes[''] is mmengine_own
        monkeypatch.undo()
    finally:
        checkpoint_io.register_safe_checkpoint_loader()
    assert CheckpointLoader._schemes[''] is checkpoint_io.load_from_local


def test_a_triton_too_old_for_the_kernels_leaves_the_pytorch_path(monkeypatch):
    """CUDA layers fall back to PyTorch ops (one warning) when the Triton kernels cannot load,
    e.g. the triton 2.1 of mmdeploy's torch 2.1 (no ``triton.knobs``, no ``custom_op``)."""
    import warnings

    from orepa_mm.cnn import fused_ops
    real_import = importlib.import_module

    def old_triton(name, *args):
        if name == 'orepa_mm.cnn.triton_kernels':
            raise AttributeError("module 'triton' has no attribute 'knobs'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, 'import_module', old_triton)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: object()
                        if name == 'triton' else real_find_spec(name, *a))
    fused_ops.triton_ops.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            assert fused_ops.triton_ops() is None
        assert len(caught) == 1 and 'PyTorch ops' in str(caught[0].message)
    finally:
        fused_ops.triton_ops.cache_clear()
