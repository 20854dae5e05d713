"""Fail fast, in one sentence, when a config's dataset is not on disk.

Without this check a missing dataset surfaces deep inside dataset
construction (``FileNotFoundError`` from pycocotools, an empty
``CustomDataset``, an mmcv image-loading error after the model was built)
with a long traceback. The tools call :func:`check_dataset_paths` before
building the Runner, so a user who has not downloaded the data yet gets one
line telling them which path is expected and where the docs explain it.

Paths are resolved the way ``mmengine.dataset.BaseDataset._join_prefix``
does: relative ``ann_file`` and ``data_prefix`` entries are joined to
``data_root``; absolute ones are used as they are.
"""
import inspect
import os.path as osp
from importlib import import_module
from typing import Any, Iterator, Mapping, Optional, Sequence, Tuple

from .errors import OrepaInputError

__all__ = ['MissingDatasetError', 'check_dataset_paths', 'iter_dataset_paths']

DATASETS_DOC = "docs/configs.md (section 'Datasets')"
SPLITS = ('train', 'val', 'test')


class MissingDatasetError(OrepaInputError, FileNotFoundError):
    """A dataset path named by the config does not exist.

    ``str(err)`` is the single sentence the tools print; ``path`` and
    ``split`` are kept for callers that want them separately.
    """

    def __init__(self, path: str, split: str):
        self.path, self.split = path, split
        super().__init__(f'Dataset not found: expected {path} (for {split}); see {DATASETS_DOC} '
                         'to download and place it.')


def _is_remote(path: str) -> bool:
    """URIs (``s3://``, ``http://``, ``petrel://`` ...) are not local files."""
    return '://' in path


def _uses_remote_backend(ds_cfg: Mapping) -> bool:
    """A non-local file backend maps the configured paths elsewhere."""
    backend_args = ds_cfg.get('backend_args') or {}
    return backend_args.get('backend', 'local') != 'local'


def _downloads_itself(ds_cfg: Mapping, scope: Optional[str]) -> bool:
    """Whether the dataset fetches missing files itself (mmpretrain's CIFAR
    and MNIST default to ``download=True``, and configs rarely say so)."""
    if 'download' in ds_cfg:
        return bool(ds_cfg['download'])
    ds_type = ds_cfg.get('type')
    if isinstance(ds_type, str) and scope:
        try:
            ds_type = import_module(f'{scope}.registry').DATASETS.get(ds_type)
        except (ImportError, AttributeError, KeyError):
            return False
    if not inspect.isclass(ds_type):
        return False
    param = inspect.signature(ds_type).parameters.get('download')
    return param is not None and param.default is True


def _leaf_datasets(ds_cfg: Any) -> Iterator[Mapping]:
    """Dataset configs under wrappers (``dataset=`` of RepeatDataset,
    ClassBalancedDataset, MultiImageMixDataset; ``datasets=`` of
    ConcatDataset), depth first. Built dataset objects are skipped."""
    if not isinstance(ds_cfg, Mapping):
        return
    wrapped = False
    if isinstance(ds_cfg.get('dataset'), Mapping):
        wrapped = True
        yield from _leaf_datasets(ds_cfg['dataset'])
    if isinstance(ds_cfg.get('datasets'), (list, tuple)):
        wrapped = True
        for sub in ds_cfg['datasets']:
            yield from _leaf_datasets(sub)
    if not wrapped:
        yield ds_cfg


def _join(data_root: Optional[str], path: str) -> str:
    if data_root and not osp.isabs(path):
        return osp.join(data_root, path)
    return path


def _expected_paths(ds_cfg: Mapping) -> Iterator[str]:
    """Local paths one dataset config will read, annotation file first."""
    data_root = ds_cfg.get('data_root') or None
    ann_file = ds_cfg.get('ann_file')
    data_prefix = ds_cfg.get('data_prefix')
    if isinstance(data_prefix, str):  # mmpretrain accepts a bare string
        data_prefix = dict(img_path=data_prefix)
    prefixes = [p for p in (data_prefix or {}).values() if isinstance(p, str)]
    if isinstance(ann_file, str) and ann_file:
        yield _join(data_root, ann_file)
    for prefix in prefixes:
        yield _join(data_root, prefix) if prefix else data_root
    if data_root and not (ann_file or prefixes):
        yield data_root


def iter_dataset_paths(cfg: Mapping, splits: Sequence[str] = SPLITS) -> Iterator[Tuple[str, str]]:
    """Yield ``(split, path)`` for every local path the config's dataloaders
    of ``splits`` will read, skipping datasets without paths, datasets that
    download themselves and remote storage."""
    scope = cfg.get('default_scope')
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if not isinstance(loader, Mapping):
            continue
        for ds_cfg in _leaf_datasets(loader.get('dataset')):
            if _uses_remote_backend(ds_cfg) or _downloads_itself(ds_cfg, scope):
                continue
            for path in _expected_paths(ds_cfg):
                if path and not _is_remote(path):
                    yield split, path


def check_dataset_paths(cfg: Mapping, splits: Sequence[str] = SPLITS) -> None:
    """Raise :class:`MissingDatasetError` for the first missing dataset path.

    Args:
        cfg: The (merged) config, an ``mmengine.Config`` or a plain dict.
        splits: Which of ``train``/``val``/``test`` dataloaders to check;
            ``tools/train.py`` checks train and val, ``tools/test.py`` test.
    """
    for split, path in iter_dataset_paths(cfg, splits):
        if not osp.exists(path):
            raise MissingDatasetError(osp.abspath(path), split)
