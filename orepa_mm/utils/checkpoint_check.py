"""Fail fast, in one sentence, when a checkpoint a run needs is not on disk.

Without this check a missing checkpoint surfaces after the datasets and the
model were built: ``init_weights`` (a ``Pretrained`` ``init_cfg``) or the
Runner's ``load_checkpoint`` (``load_from``, ``--resume CKPT``,
``tools/test.py CONFIG CKPT``) raises ``FileNotFoundError`` at the end of a
long traceback. The tools call :func:`check_checkpoint_paths` before building
the Runner, next to :func:`orepa_mm.utils.data_check.check_dataset_paths`.

Only local paths are checked: anything with a scheme (``torchvision://``,
``open-mmlab://``, ``mmcls://``, ``http(s)://``, ``s3://`` ...) is mmengine's
business. Relative paths resolve against the current directory, as mmengine's
loader resolves them.

:func:`describe_checkpoint` tells checkpoints made by mmengine and orepa_mm
apart (runner, converted backbone, deployed), for tools that expect a
different kind (``tools/convert_official_checkpoint.py``).
"""
import os
import os.path as osp
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Tuple

from .errors import OrepaInputError

__all__ = [
    'CheckpointKind', 'MissingCheckpointError', 'check_checkpoint_paths', 'describe_checkpoint',
    'iter_pretrained_checkpoints', 'state_dict_mismatch'
]

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
PRETRAINED_TYPES = ('Pretrained', 'PretrainedInit')
# Stock weights the OREPA ResNets load exactly (mmengine's hub names).
TORCHVISION_DEPTHS = (18, 34, 50, 101, 152)
V1C_DEPTHS = (18, 50, 101)
# Parameter names only orepa_mm's re-param layers have (OREPA k x k, 1 x 1,
# large kernel; DBB).
_OREPA_PARAMS = ('branch_scales', 'origin', 'origin_scale', 'expand_1x1_residual')


class MissingCheckpointError(OrepaInputError, FileNotFoundError):
    """A checkpoint the run will load is not a file.

    ``str(err)`` is the single sentence the tools print; ``path`` and ``key``
    (the config key or argument that names it) are kept for callers.
    """

    def __init__(self, message: str, path: str, key: str):
        self.path, self.key = path, key
        super().__init__(message)


def _is_local(path: Any) -> bool:
    return isinstance(path, str) and bool(path) and '://' not in path


def _status(path: str) -> Optional[str]:
    """None when ``path`` is a file, else how it fails, with where it was
    looked for when the path is relative."""
    full = osp.expanduser(path)
    if osp.isfile(full):
        return None
    where = '' if osp.isabs(full) else f' in {os.getcwd()}'
    if osp.isdir(full):
        return f'is a directory{where}, not a checkpoint file'
    return f'not found{where}'


def _converter_command() -> str:
    """How to call the converter from here: ``tools/...`` in the repository
    root, its absolute path elsewhere (when orepa_mm runs from a checkout)."""
    tool = osp.join(REPO, 'tools', 'convert_official_checkpoint.py')
    if not osp.isfile(tool) or osp.samefile(REPO, os.getcwd()):
        return 'python tools/convert_official_checkpoint.py'
    return f'python {tool}'


def _type_name(module_cfg: Mapping) -> str:
    """``'mmdet.OREPAResNet'`` -> ``'OREPAResNet'``; '' for non-strings."""
    module_type = module_cfg.get('type')
    return module_type.rsplit('.', 1)[-1] if isinstance(module_type, str) else ''


def iter_pretrained_checkpoints(model_cfg: Any,
                                prefix: str = 'model') -> Iterator[Tuple[str, str, Mapping]]:
    """Yield ``(key, path, module_cfg)`` for every local checkpoint that
    ``init_weights`` will read: ``init_cfg=dict(type='Pretrained',
    checkpoint=...)`` (a dict or a list of them) and the older
    ``pretrained='...'`` argument, anywhere under ``model_cfg``. ``key`` is
    the ``--cfg-options`` key that sets it; ``module_cfg`` the config of the
    module it initialises."""
    if isinstance(model_cfg, (list, tuple)):
        for i, sub in enumerate(model_cfg):
            yield from iter_pretrained_checkpoints(sub, f'{prefix}.{i}')
        return
    if not isinstance(model_cfg, Mapping):
        return
    for name, value in model_cfg.items():
        key = f'{prefix}.{name}'
        if name == 'init_cfg':
            inits = value if isinstance(value, (list, tuple)) else [value]
            for i, init in enumerate(inits):
                if (isinstance(init, Mapping) and init.get('type') in PRETRAINED_TYPES
                        and _is_local(init.get('checkpoint'))):
                    at = key if isinstance(value, Mapping) else f'{key}.{i}'
                    yield f'{at}.checkpoint', init['checkpoint'], model_cfg
        elif name == 'pretrained':
            if _is_local(value):
                yield key, value, model_cfg
        else:
            yield from iter_pretrained_checkpoints(value, key)


def _stock_weights(module_cfg: Mapping) -> Optional[str]:
    """Stock ImageNet weights that an OREPA ResNet of this config loads."""
    name, depth = _type_name(module_cfg), module_cfg.get('depth', 50)
    if name in ('OREPAResNetV1c', 'ResNetV1c') or (name in ('OREPAResNet', 'ResNet')
                                                   and module_cfg.get('deep_stem')
                                                   and not module_cfg.get('avg_down')):
        return f'open-mmlab://resnet{depth}_v1c' if depth in V1C_DEPTHS else None
    if name in ('OREPAResNet', 'ResNet') and not module_cfg.get('deep_stem'):
        return (f'torchvision://resnet{depth}' if depth in TORCHVISION_DEPTHS else None)
    return None


def _authors_model(module_cfg: Mapping) -> Optional[str]:
    """The authors' ImageNet model that the converter turns into weights for
    this orepa_mm backbone, as the configs' comments name it."""
    name = _type_name(module_cfg)
    if name.startswith('OREPAResNet'):
        return f'ResNet-{module_cfg.get("depth", 50)}'
    if name == 'OREPAVGG':
        arch = module_cfg.get('arch')
        return f'RepVGG-{arch}' if isinstance(arch, str) else 'RepVGG'
    return None


def _missing_pretrained(key: str, path: str, status: str,
                        module_cfg: Mapping) -> MissingCheckpointError:
    """The sentence for a missing ``Pretrained`` checkpoint: both ways
    forward for orepa_mm backbones, the generic ones otherwise."""
    authors, stock = _authors_model(module_cfg), _stock_weights(module_cfg)
    ways = []
    if authors:
        ways.append(f"make it from the authors' ImageNet model with "
                    f'"{_converter_command()} <OREPA {authors} .pth.tar> {path}"')
    if stock:
        ways.append(f'start from stock weights with '
                    f'"--cfg-options {key}={stock}"')
    if not ways:
        ways.append(f'put the file there or point "--cfg-options {key}=..." '
                    'at an existing checkpoint')
    if not stock:
        init_key = key[:-len('.checkpoint')] if key.endswith('.checkpoint') else key
        ways.append(f'train from scratch with "--cfg-options {init_key}=None"')
    advice = ', or '.join([', '.join(ways[:-1]), ways[-1]]) if len(ways) > 1 else ways[0]
    return MissingCheckpointError(f'Pretrained checkpoint {path} {status} ({key}); {advice}.', path,
                                  key)


def check_pretrained_checkpoints(cfg: Mapping) -> None:
    """Raise :class:`MissingCheckpointError` for the first missing local
    ``Pretrained`` checkpoint (or ``pretrained=``) under ``cfg['model']``."""
    for key, path, module_cfg in iter_pretrained_checkpoints(cfg.get('model')):
        status = _status(path)
        if status:
            raise _missing_pretrained(key, path, status, module_cfg)


def check_load_from(cfg: Mapping, source: str = 'load_from') -> None:
    """Raise :class:`MissingCheckpointError` when ``cfg['load_from']`` is a
    local path that is not a file.

    Args:
        source: what set ``load_from``, for the sentence: ``'load_from'``
            (the config), ``'resume'`` (``tools/train.py --resume CKPT``) or
            ``'test'`` (``tools/test.py CONFIG CHECKPOINT``).
    """
    path = cfg.get('load_from')
    if not _is_local(path):
        return
    status = _status(path)
    if status is None:
        return
    if source == 'test':
        message = (f'Checkpoint {path} {status}; pass tools/test.py a '
                   'checkpoint written by tools/train.py (for example '
                   'work_dirs/<config name>/epoch_12.pth).')
    elif source == 'resume':
        message = (f'Cannot resume: checkpoint {path} {status}; give --resume '
                   'an existing checkpoint, or --resume alone to continue '
                   f"from the latest one in {cfg.get('work_dir', 'the work dir')}.")
    else:
        message = (f'Checkpoint {path} {status} (load_from); point '
                   '"--cfg-options load_from=..." at an existing checkpoint '
                   'or set it to None.')
    raise MissingCheckpointError(message, path, 'checkpoint' if source == 'test' else 'load_from')


def check_checkpoint_paths(cfg: Mapping,
                           mode: str = 'train',
                           resume_arg: Optional[str] = None) -> None:
    """Check every local checkpoint a run of ``mode`` will read.

    ``'train'``: ``load_from`` (which ``--resume CKPT`` sets) and every
    ``Pretrained`` checkpoint, since the Runner calls ``init_weights`` before
    loading ``load_from``; ``'test'``: only ``load_from`` (the CHECKPOINT
    argument), since testing never calls ``init_weights``.

    Args:
        cfg: The merged config (an ``mmengine.Config`` or a plain dict).
        mode: ``'train'`` or ``'test'``.
        resume_arg: the value of ``tools/train.py --resume`` (None, 'auto'
            or a path), for the wording.
    """
    if mode == 'test':
        check_load_from(cfg, 'test')
        return
    resuming = resume_arg not in (None, 'auto') or bool(cfg.get('resume'))
    check_load_from(cfg, 'resume' if resuming else 'load_from')
    check_pretrained_checkpoints(cfg)


# ------------------------------------------------------ what a file is
def _has_orepa_layers(state_dict: Mapping) -> bool:
    return any(isinstance(k, str) and k.rsplit('.', 1)[-1] in _OREPA_PARAMS for k in state_dict)


class CheckpointKind(NamedTuple):
    """What :func:`describe_checkpoint` found: ``kind`` is ``'runner'``,
    ``'deployed'`` or ``'converted'``; ``description`` a noun phrase."""
    kind: str
    description: str


def describe_checkpoint(checkpoint: Any) -> Optional[CheckpointKind]:
    """What a loaded checkpoint is, if mmengine or orepa_mm made it.

    ``'runner'``: written by mmengine's Runner (``tools/train.py``): a
    ``message_hub`` entry, or ``meta`` with ``mmengine_version`` or
    ``epoch`` and ``iter``; ``'deployed'``: written by
    ``tools/reparameterize.py`` (``meta['reparameterized']``);
    ``'converted'``: written by ``tools/convert_official_checkpoint.py``
    (``meta['converted_from']``). None for anything else, the authors'
    checkpoints among them.
    """
    if not isinstance(checkpoint, Mapping):
        return None
    meta = checkpoint.get('meta')
    meta = meta if isinstance(meta, Mapping) else {}
    state = checkpoint.get('state_dict')
    state = state if isinstance(state, Mapping) else {}
    if isinstance(meta.get('reparameterized'), Mapping):
        return CheckpointKind(
            'deployed', 'a re-parameterized (deployed) checkpoint written by '
            'tools/reparameterize.py')
    if meta.get('converted_from'):
        return CheckpointKind(
            'converted', 'an orepa_mm backbone checkpoint already converted '
            f"from {meta['converted_from']}")
    if 'message_hub' in checkpoint or 'mmengine_version' in meta or ('epoch' in meta
                                                                     and 'iter' in meta):
        of = ('an orepa_mm model' if _has_orepa_layers(state) else 'a model without OREPA layers')
        progress = ', '.join(f'{k} {meta[k]}' for k in ('epoch', 'iter')
                             if isinstance(meta.get(k), int))
        return CheckpointKind(
            'runner',
            f'an mmengine runner checkpoint of {of}' + (f' ({progress})' if progress else ''))
    return None


def _listing(keys, limit: int = 3) -> str:
    shown = ', '.join(keys[:limit])
    return shown + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')


def state_dict_mismatch(expected: Mapping, given: Mapping) -> Optional[str]:
    """How ``given`` fails to fit a model whose state dict is ``expected``, key for key and
    shape for shape, in a few words; None if it fits. ``given`` is read as mmengine will load
    it: :func:`~.checkpoint_io.unwrap_state_dict` has stripped one DDP ``module.`` prefix, as
    ``load_checkpoint`` does, and a second one is a mismatch, as it is for mmengine.
    (mmengine loads what matches and only warns; torch's message lists every key.)"""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [
        f'{k} {tuple(given[k].shape)} vs {tuple(v.shape)}' for k, v in expected.items()
        if k in given and hasattr(given[k], 'shape') and tuple(given[k].shape) != tuple(v.shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's keys are missing ({_listing(missing)})")
    if unexpected:
        parts.append(f'{len(unexpected)} keys are unexpected ({_listing(unexpected)})')
    if wrong:
        parts.append(f'{len(wrong)} have other shapes ({_listing(wrong)})')
    return ', '.join(parts) or None
