"""What ``tools/train.py`` and ``tools/test.py`` share.

The two tools follow mmdet 3.3's ``tools/train.py`` / ``tools/test.py`` and
serve mmdet, mmseg and mmpretrain configs alike. Where the three libraries'
own test tools differ (how ``--show-dir`` reaches the visualization hook,
what ``--out`` writes, the default test-time augmentation), the behaviour is
picked from the config's ``default_scope``, the same key mmengine's Runner
uses to choose registries.

Every function here takes and returns plain values (``argparse.Namespace``,
``mmengine.Config``) so tests can call them without spawning a process.
"""
import argparse
import contextlib
import logging
import os
import os.path as osp
import sys
from copy import deepcopy
from importlib import import_module
from typing import Iterator, Optional, Sequence

from mmengine.config import Config, ConfigDict, DictAction
from mmengine.logging import print_log

from .checkpoint_check import MissingCheckpointError
from .checkpoint_loading import UnsafeCheckpointError
from .data_check import MissingDatasetError

__all__ = [
    'SCOPES', 'ToolError', 'apply_test_args', 'apply_train_args',
    'add_dump_results', 'build_runner', 'config_scope', 'exit_on_user_error',
    'load_config', 'parse_test_args', 'parse_train_args', 'train_splits'
]

SCOPES = ('mmdet', 'mmseg', 'mmpretrain')

# Exit status for errors the user can fix without reading a traceback
# (argparse uses the same one for bad command lines).
USER_ERROR_EXIT = 2


class ToolError(Exception):
    """A one-sentence problem with the command line or config."""


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn user-fixable errors into their one sentence on stderr and exit 2.

    A missing dataset or checkpoint, a refused checkpoint or an unusable flag
    needs no traceback; every other exception propagates unchanged.
    """
    try:
        yield
    except (MissingDatasetError, MissingCheckpointError, UnsafeCheckpointError,
            ToolError) as err:
        print(err, file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None


# ----------------------------------------------------------- command lines
def _add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file. If the value to '
        'be overwritten is a list, it should be like key="[a,b]" or key=a,b '
        'It also allows nested list/tuple values, e.g. key="[(a,b),(c,d)]" '
        'Note that the quotation marks are necessary and that no white space '
        'is allowed.')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    # torch.distributed.launch passes --local-rank since PyTorch 2.0 and
    # --local_rank before; torchrun sets LOCAL_RANK instead.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def _parse(parser: argparse.ArgumentParser,
           argv: Optional[Sequence[str]]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def parse_train_args(
        argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Arguments of ``tools/train.py`` (mmdet 3.3's, same names)."""
    parser = argparse.ArgumentParser(
        description='Train an mmdet, mmseg or mmpretrain model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--amp',
        action='store_true',
        default=False,
        help='enable automatic-mixed-precision training (needs a GPU)')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='enable automatically scaling LR.')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='If specify checkpoint path, resume from it, while if not '
        'specify, try to auto resume from the latest checkpoint '
        'in the work directory.')
    _add_common_args(parser)
    return _parse(parser, argv)


def parse_test_args(
        argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Arguments of ``tools/test.py`` (mmdet 3.3's, same names)."""
    parser = argparse.ArgumentParser(
        description='Test (and evaluate) an mmdet, mmseg or mmpretrain model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir',
        help='the directory to save the file containing evaluation metrics')
    parser.add_argument(
        '--out',
        type=str,
        help='mmdet/mmpretrain: dump predictions to this .pkl file for '
        'offline evaluation; mmseg: directory to save the predicted '
        'segmentation maps to')
    parser.add_argument(
        '--show', action='store_true', help='show prediction results')
    parser.add_argument(
        '--show-dir',
        help='directory where painted images will be saved (mmdet: under '
        'work_dir/timestamp/ when relative; mmseg: the visualizer save_dir; '
        'mmpretrain: as given)')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument(
        '--tta', action='store_true', help='test time augmentation')
    _add_common_args(parser)
    return _parse(parser, argv)


# ------------------------------------------------------------------ config
def load_config(args: argparse.Namespace) -> Config:
    """Read the config, apply ``--cfg-options``, ``--launcher`` and the work
    dir (CLI > config > ``./work_dirs/<config name>``), as mmdet does."""
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    return cfg


def config_scope(cfg: Config) -> str:
    """The library the config belongs to, from its ``default_scope``."""
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        raise ToolError(
            f'Config {cfg.filename} has default_scope={scope!r}, but these '
            f'tools only run configs whose default_scope is one of '
            f'{", ".join(SCOPES)}.')
    return scope


def train_splits(cfg: Config) -> Sequence[str]:
    """Dataloaders a training run builds: val only when validation is on."""
    return ('train', 'val') if cfg.get('val_cfg') is not None else ('train', )


def _has_accelerator() -> bool:
    from mmengine.device import (is_cuda_available, is_mlu_available,
                                 is_musa_available, is_npu_available)
    return (is_cuda_available() or is_npu_available() or is_mlu_available()
            or is_musa_available())


def _enable_amp(cfg: Config) -> None:
    """mmdet's ``--amp``: AmpOptimWrapper (fp16, dynamic loss scale) on a GPU.

    mmengine 0.10.7's AmpOptimWrapper refuses to run without a CUDA/NPU/MLU/MUSA device, so on
    a CPU-only machine ``--amp`` selects orepa_mm's ``BF16OptimWrapper`` (bf16 autocast, no
    loss scaling needed) instead.
    """
    optim_wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if optim_wrapper in ('AmpOptimWrapper', 'BF16OptimWrapper'):
        print_log(
            'AMP training is already enabled in your config.',
            logger='current',
            level=logging.WARNING)
        return
    if optim_wrapper != 'OptimWrapper':
        raise ToolError(
            '--amp is only supported when the optimizer wrapper type is '
            f'OptimWrapper, but the config uses {optim_wrapper}.')
    if not _has_accelerator():
        cfg.optim_wrapper.type = 'BF16OptimWrapper'
        return
    cfg.optim_wrapper.type = 'AmpOptimWrapper'
    cfg.optim_wrapper.loss_scale = 'dynamic'


def apply_train_args(cfg: Config, args: argparse.Namespace) -> Config:
    """``--amp``, ``--auto-scale-lr`` and ``--resume`` as mmdet 3.3 applies
    them; ``--resume`` alone resumes from the work dir's latest checkpoint."""
    if args.amp:
        _enable_amp(cfg)
    if args.auto_scale_lr:
        scale_cfg = cfg.get('auto_scale_lr') or {}
        if 'enable' in scale_cfg and 'base_batch_size' in scale_cfg:
            cfg.auto_scale_lr.enable = True
        else:
            raise ToolError(
                '--auto-scale-lr needs auto_scale_lr=dict(enable=..., '
                'base_batch_size=...) in the config.')
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    return cfg


def _visualization_hook(cfg: Config) -> ConfigDict:
    hook = cfg.get('default_hooks', {}).get('visualization')
    if hook is None:
        raise ToolError(
            '--show/--show-dir need a VisualizationHook in the config: add '
            "default_hooks.visualization=dict(type='VisualizationHook').")
    return hook


def _trigger_visualization(cfg: Config, args: argparse.Namespace,
                           scope: str) -> None:
    """Each library's own ``trigger_visualization_hook``.

    mmdet (DetVisualizationHook) saves to ``test_out_dir``, mmseg
    (SegVisualizationHook) writes through the visualizer's ``save_dir``,
    mmpretrain (VisualizationHook) is off unless ``enable`` and saves to
    ``out_dir``; mmpretrain's test.py also draws every sample (interval 1).
    """
    hook = _visualization_hook(cfg)
    if scope == 'mmpretrain':
        hook.enable = True
        hook.show = args.show
        hook.wait_time = args.wait_time
        hook.out_dir = args.show_dir
        hook.interval = 1
        return
    hook.draw = True
    if args.show:
        hook.show = True
        hook.wait_time = args.wait_time
    if args.show_dir:
        if scope == 'mmdet':
            hook.test_out_dir = args.show_dir
        else:
            cfg.visualizer.save_dir = args.show_dir


def _flip_tta_pipeline(test_pipeline: list, pack: dict) -> list:
    """The default TTA of mmdet's and mmpretrain's test.py: flip and not."""
    tta_pipeline = deepcopy(test_pipeline)
    tta_pipeline[-1] = dict(
        type='TestTimeAug',
        transforms=[[
            dict(type='RandomFlip', prob=1.),
            dict(type='RandomFlip', prob=0.)
        ], [pack]])
    return tta_pipeline


def _enable_tta(cfg: Config, scope: str) -> None:
    """Wrap the model in the scope's TTA model and swap in the TTA pipeline,
    with mmdet's / mmpretrain's defaults when the config has none (mmseg
    has no default and requires both in the config)."""
    test_dataset = cfg.test_dataloader.dataset
    while 'dataset' in test_dataset:
        test_dataset = test_dataset['dataset']
    if scope == 'mmseg':
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise ToolError(
                '--tta with an mmseg config needs tta_model and tta_pipeline '
                'in the config.')
    elif scope == 'mmdet':
        if 'tta_model' not in cfg:
            cfg.tta_model = dict(
                type='DetTTAModel',
                tta_cfg=dict(
                    nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
        if 'tta_pipeline' not in cfg:
            cfg.tta_pipeline = _flip_tta_pipeline(
                test_dataset.pipeline,
                dict(
                    type='PackDetInputs',
                    meta_keys=('img_id', 'img_path', 'ori_shape',
                               'img_shape', 'scale_factor', 'flip',
                               'flip_direction')))
    else:
        if 'tta_model' not in cfg:
            cfg.tta_model = dict(type='mmpretrain.AverageClsScoreTTA')
        if 'tta_pipeline' not in cfg:
            cfg.tta_pipeline = _flip_tta_pipeline(test_dataset.pipeline,
                                                  test_dataset.pipeline[-1])
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    # As the libraries do: the outermost test dataset gets the pipeline.
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline


def apply_test_args(cfg: Config, args: argparse.Namespace) -> Config:
    """``checkpoint``, ``--show``/``--show-dir``, ``--tta`` and (for mmseg,
    whose ``--out`` is a config setting) ``--out``."""
    scope = config_scope(cfg)
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        _trigger_visualization(cfg, args, scope)
    if args.tta:
        _enable_tta(cfg, scope)
    if args.out is not None:
        if scope == 'mmseg':
            cfg.test_evaluator['output_dir'] = args.out
            cfg.test_evaluator['keep_results'] = True
        elif not args.out.endswith(('.pkl', '.pickle')):
            raise ToolError(
                f'--out must name a .pkl file for {scope} configs, got '
                f'{args.out}.')
    return cfg


# ------------------------------------------------------------------ runner
def build_runner(cfg: Config):
    """``Runner.from_cfg``, or the scope's ``RUNNERS`` when the config names
    a ``runner_type`` (the scope's registry also finds the library's own
    runners, mmengine's root registry would not). Multi-process runs on a
    machine without CUDA get a gloo process group first (see
    :mod:`orepa_mm.engine.cpu_distributed`)."""
    from orepa_mm.engine.cpu_distributed import prepare_cpu_distributed
    prepare_cpu_distributed(cfg, cfg.get('launcher', 'none'))
    if 'runner_type' not in cfg:
        from mmengine.runner import Runner
        return Runner.from_cfg(cfg)
    registry = import_module(f'{config_scope(cfg)}.registry')
    return registry.RUNNERS.build(cfg)


def add_dump_results(runner, cfg: Config, out: Optional[str]) -> None:
    """mmdet/mmpretrain ``--out``: append the library's DumpResults metric
    (mmdet's converts masks to RLE first)."""
    if out is None or config_scope(cfg) == 'mmseg':
        return
    if config_scope(cfg) == 'mmdet':
        from mmdet.evaluation import DumpDetResults as DumpResults
    else:
        from mmengine.evaluator import DumpResults
    runner.test_evaluator.metrics.append(DumpResults(out_file_path=out))
