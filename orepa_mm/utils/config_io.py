"""Configs in and out: read one, build its model, write one and read it back.

Every way a config cannot be used (missing, a syntax error, a failed custom import, a model
that does not build) is one :class:`~.errors.OrepaInputError` sentence naming the file. The
tools, :mod:`orepa_mm.apis.reparameterize` and :mod:`orepa_mm.apis.quantization` all read
and build through here.
"""
import copy
import os.path as osp
import tempfile

import torch.nn as nn
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import MODELS, DefaultScope

from .errors import OrepaInputError, check_readable_file, first_line

__all__ = ['build_model', 'describe_exception', 'read_config', 'reload_config']


def describe_exception(exc: BaseException) -> str:
    """``SyntaxError at line 3: '(' was never closed`` or ``Type: first line``."""
    if isinstance(exc, SyntaxError) and exc.lineno and exc.msg:
        return f'SyntaxError at line {exc.lineno}: {exc.msg}'
    return f'{type(exc).__name__}: {first_line(exc)}'


def read_config(path: str,
                fix: str = 'pass the path of a config file (e.g. configs/...)',
                require_model: bool = True) -> Config:
    """``Config.fromfile(path)`` (with a ``model`` dict unless ``require_model`` is False), or
    one sentence saying what is wrong."""
    full = check_readable_file(path, 'config', fix)
    try:
        cfg = Config.fromfile(full)
    except Exception as exc:  # noqa: BLE001 - syntax errors, bad _base_, failed imports
        raise OrepaInputError(f'cannot read config {path} ({describe_exception(exc)}); fix the '
                              'file.') from None
    if require_model and not isinstance(cfg.get('model'), dict):
        raise OrepaInputError(f'config {path} has no `model` dict.')
    return cfg


def build_model(cfg: Config, device: str = 'cpu', what: str = 'config') -> nn.Module:
    """``cfg.model`` built in the config's scope, SyncBN reverted, in eval mode on ``device``.

    A single process has no process group: SyncBN cannot run, and at inference it is a BN.
    """
    try:
        with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
            model = MODELS.build(copy.deepcopy(cfg.model))  # some models edit their cfg
    except Exception as exc:  # noqa: BLE001 - unknown types, bad arguments
        raise OrepaInputError(f'cannot build the {what} model ({type(exc).__name__}: '
                              f'{first_line(exc)}).') from exc
    model = revert_sync_batchnorm(model)
    model.to(device)
    model.eval()  # mmdet's/mmseg's ResNet.train() returns None: never chain it
    return model


def reload_config(text: str, filename: str) -> Config:
    """A dumped config read back as its file ``filename`` will be read (catches dump
    problems before anything is written)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = osp.join(tmp, osp.basename(filename))
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)
        return Config.fromfile(path)
