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
import logging
import os
import os.path as osp
import shutil
from copy import deepcopy
from importlib import import_module
from numbers import Number
from typing import Mapping, Optional, Sequence

from mmengine.config import Config, ConfigDict, DictAction
from mmengine.logging import print_log

from .atomic_write import OutputSet
from .checkpoint_check import (check_checkpoint_paths, iter_pretrained_checkpoints,
                               state_dict_mismatch)
from .checkpoint_io import checkpoint_weights, read_checkpoint
from .config_io import read_config
from .errors import EXIT_BAD_INPUT, OrepaInputError, first_line

__all__ = [
    'SCOPES', 'ToolError', 'apply_test_args', 'apply_train_args', 'add_dump_results',
    'build_runner', 'check_checkpoint_fits', 'check_checkpoints', 'check_work_dir', 'config_scope',
    'load_config', 'parse_test_args', 'parse_train_args', 'check_test_outputs', 'train_splits'
]

SCOPES = ('mmdet', 'mmseg', 'mmpretrain')

# Exit status for errors the user can fix (orepa_mm.utils.errors.EXIT_BAD_INPUT: argparse's).
USER_ERROR_EXIT = EXIT_BAD_INPUT
TRAIN_FIX = 'pass a checkpoint written by tools/train.py'


class ToolError(OrepaInputError):
    """A one-sentence problem with the command line or config."""


class CfgOptionsAction(DictAction):
    """mmengine's ``DictAction``, with a malformed ``KEY=VALUE`` refused in one sentence
    instead of the ValueError / AssertionError traceback it raises mid-parse."""

    def __call__(self, parser, namespace, values, option_string=None):
        for item in values:
            key, sep, value = item.partition('=')
            if not sep or not key:
                raise ToolError(f'--cfg-options {item!r} is not KEY=VALUE; write it as e.g. '
                                'train_cfg.max_epochs=12.')
            try:
                DictAction._parse_iterable(value)
            except Exception:  # noqa: BLE001 - unbalanced brackets and quotes
                raise ToolError(f'--cfg-options {item!r} has a malformed value; lists and '
                                'tuples are written key="[a,b]" or key="(a,b)", with balanced '
                                'brackets and no spaces.') from None
        super().__call__(parser, namespace, values, option_string)


# ----------------------------------------------------------- command lines
def _add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=CfgOptionsAction,
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


def _parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def parse_train_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Arguments of ``tools/train.py`` (mmdet 3.3's, same names)."""
    parser = argparse.ArgumentParser(description='Train an mmdet, mmseg or mmpretrain model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--amp',
        action='store_true',
        default=False,
        help='enable automatic-mixed-precision training (needs a GPU)')
    parser.add_argument(
        '--auto-scale-lr', action='store_true', help='enable automatically scaling LR.')
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


def parse_test_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Arguments of ``tools/test.py`` (mmdet 3.3's, same names)."""
    parser = argparse.ArgumentParser(
        description='Test (and evaluate) an mmdet, mmseg or mmpretrain model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir', help='the directory to save the file containing evaluation metrics')
    parser.add_argument(
        '--out',
        type=str,
        help='mmdet/mmpretrain: dump predictions to this .pkl file for '
        'offline evaluation; mmseg: directory to save the predicted '
        'segmentation maps to')
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument(
        '--show-dir',
        help='directory where painted images will be saved (mmdet: under '
        'work_dir/timestamp/ when relative; mmseg: the visualizer save_dir; '
        'mmpretrain: as given)')
    parser.add_argument('--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument('--tta', action='store_true', help='test time augmentation')
    _add_common_args(parser)
    return _parse(parser, argv)


# ------------------------------------------------------------------ config
def load_config(args: argparse.Namespace) -> Config:
    """Read the config, apply ``--cfg-options``, ``--launcher`` and the work
    dir (CLI > config > ``./work_dirs/<config name>``), as mmdet does.

    A missing or unreadable config, an override that does not apply, or a work
    dir that is a file is a :class:`ToolError`, before anything is built."""
    try:
        cfg = read_config(args.config, require_model=False)
    except OrepaInputError as exc:
        raise ToolError(str(exc)) from None
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        _merge_options(cfg, args.cfg_options, args.config)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    check_work_dir(cfg)
    return cfg


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + ' ...' + text[-1]


def _lookup(cfg: Mapping, key: str):
    """The current value at a dotted key, and whether it exists."""
    node = cfg
    for part in key.split('.'):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None, False
    return node, True


def _merge_options(cfg: Config, options: dict, config: str) -> None:
    """``cfg.merge_from_dict(options)``, refusing an override that could only fail later:
    a key under a value that is not a dict, text where the config has a number, or a plain
    value where it has a dict."""
    tree = cfg.to_dict()
    for key, value in options.items():
        old, found = _lookup(tree, key)
        if not found:
            parent, parent_found = _lookup(tree,
                                           key.rpartition('.')[0]) if '.' in key else (tree, True)
            if parent_found and not isinstance(parent, (Mapping, list, tuple)):
                raise ToolError(f'--cfg-options {key}={value}: {key.rpartition(".")[0]} is '
                                f'{_short(parent)} in {config}, not a dict, so it has no '
                                f'{key.rpartition(".")[2]!r}; set it as a whole or check the '
                                'key.')
            continue
        wrong = ((isinstance(old, Number) and not isinstance(old, bool) and isinstance(value, str))
                 or (isinstance(old, Mapping) and value is not None
                     and not isinstance(value, Mapping)))
        if wrong:
            kind = 'a number' if isinstance(old, Number) else 'a dict'
            raise ToolError(f'--cfg-options {key}={value}: {config} has {kind} there '
                            f'({_short(old)}), not {type(value).__name__} {_short(value)}; '
                            'give a value of the same kind.')
    try:
        cfg.merge_from_dict(options)
    except Exception as exc:  # noqa: BLE001 - mmengine's own refusal
        raise ToolError(f'--cfg-options cannot be applied to {config} '
                        f'({type(exc).__name__}: {first_line(exc)}); check the keys.') from None


def check_work_dir(cfg: Config) -> None:
    """The work dir must be a folder or creatable: found here, not by the Runner's
    ``makedirs`` (FileExistsError) after the model was built."""
    work_dir = cfg.get('work_dir')
    if not isinstance(work_dir, str) or not work_dir.strip():
        raise ToolError('the work dir is empty; pass --work-dir DIR.')
    probe = osp.abspath(osp.expanduser(work_dir))
    while not osp.exists(probe) and osp.dirname(probe) != probe:
        probe = osp.dirname(probe)
    if not osp.isdir(probe):
        what = 'is an existing file' if probe == osp.abspath(work_dir) else \
            f'cannot be created: {probe} is a file'
        raise ToolError(f'work dir {work_dir} {what}; pass --work-dir with a folder path.')
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ToolError(f'work dir {work_dir} cannot be written ({probe} is not writable); '
                        'pass --work-dir with a writable folder.')


def config_scope(cfg: Config) -> str:
    """The library the config belongs to, from its ``default_scope``."""
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        raise ToolError(f'Config {cfg.filename} has default_scope={scope!r}, but these '
                        f'tools only run configs whose default_scope is one of '
                        f'{", ".join(SCOPES)}.')
    return scope


def train_splits(cfg: Config) -> Sequence[str]:
    """Dataloaders a training run builds: val only when validation is on."""
    return ('train', 'val') if cfg.get('val_cfg') is not None else ('train', )


def _has_accelerator() -> bool:
    from mmengine.device import (is_cuda_available, is_mlu_available, is_musa_available,
                                 is_npu_available)
    return (is_cuda_available() or is_npu_available() or is_mlu_available() or is_musa_available())


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
        raise ToolError('--amp is only supported when the optimizer wrapper type is '
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
            raise ToolError('--auto-scale-lr needs auto_scale_lr=dict(enable=..., '
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
        raise ToolError('--show/--show-dir need a VisualizationHook in the config: add '
                        "default_hooks.visualization=dict(type='VisualizationHook').")
    return hook


def _trigger_visualization(cfg: Config, args: argparse.Namespace, scope: str) -> None:
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
        transforms=[[dict(type='RandomFlip', prob=1.),
                     dict(type='RandomFlip', prob=0.)], [pack]])
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
            raise ToolError('--tta with an mmseg config needs tta_model and tta_pipeline '
                            'in the config.')
    elif scope == 'mmdet':
        if 'tta_model' not in cfg:
            cfg.tta_model = dict(
                type='DetTTAModel',
                tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
        if 'tta_pipeline' not in cfg:
            cfg.tta_pipeline = _flip_tta_pipeline(
                test_dataset.pipeline,
                dict(
                    type='PackDetInputs',
                    meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor',
                               'flip', 'flip_direction')))
    else:
        if 'tta_model' not in cfg:
            cfg.tta_model = dict(type='mmpretrain.AverageClsScoreTTA')
        if 'tta_pipeline' not in cfg:
            cfg.tta_pipeline = _flip_tta_pipeline(test_dataset.pipeline, test_dataset.pipeline[-1])
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
    if args.out:  # '' is refused by check_test_outputs, with the other output checks
        if scope == 'mmseg':
            cfg.test_evaluator['output_dir'] = args.out
            cfg.test_evaluator['keep_results'] = True
        elif not args.out.endswith(('.pkl', '.pickle')):
            raise ToolError(f'--out must name a .pkl file for {scope} configs, got '
                            f'{args.out!r}.')
    return cfg


def check_test_outputs(cfg: Config, out: Optional[str]) -> OutputSet:
    """``--out`` as an :class:`~orepa_mm.utils.atomic_write.OutputSet`, checked before any
    work: a .pkl file (mmdet, mmpretrain) or the folder of segmentation maps (mmseg)."""
    outputs = OutputSet('pass --out another path')
    if out is not None:
        kind = 'dir' if config_scope(cfg) == 'mmseg' else 'file'
        outputs.add(out, '--out', kind=kind)
    return outputs.check()


def stage_test_output(cfg: Config, staged: dict, out: Optional[str]) -> Optional[str]:
    """Point mmseg's ``output_dir`` at the staged folder; the staged ``--out`` path."""
    if out is None:
        return None
    path = staged[osp.abspath(osp.expanduser(out))]
    if config_scope(cfg) == 'mmseg':
        cfg.test_evaluator['output_dir'] = path
    return path


# ------------------------------------------------------------- checkpoints
def check_checkpoints(cfg: Config, mode: str, resume_arg: Optional[str] = None):
    """Every local checkpoint the run will read exists and is a readable, safe checkpoint
    with weights; for ``'test'`` the loaded CHECKPOINT's weights are returned."""
    check_checkpoint_paths(cfg, mode, resume_arg=resume_arg)
    load_from = cfg.get('load_from')
    weights = None
    if isinstance(load_from, str) and load_from and '://' not in load_from:
        fix = TRAIN_FIX if mode == 'test' else (
            'give --resume or load_from a checkpoint written by tools/train.py')
        weights = checkpoint_weights(read_checkpoint(load_from, fix=fix), load_from, fix=fix)
    if mode == 'train':
        for key, path, _ in iter_pretrained_checkpoints(cfg.get('model')):
            fix = f'point --cfg-options {key}=... at a backbone checkpoint'
            checkpoint_weights(
                read_checkpoint(path, 'pretrained checkpoint', fix), path, 'pretrained checkpoint',
                fix)
    return weights


def _inner_model_cfg(cfg: Config):
    model = cfg.model
    if isinstance(model.get('type'), str) and model['type'].endswith('TTAModel') \
            and 'module' in model:
        return model['module']
    return model


def check_checkpoint_fits(cfg: Config, state: Mapping, checkpoint: str, config: str) -> None:
    """Refuse a checkpoint whose weights do not fit the config's model key for key and
    shape for shape (mmengine would load what matches, warn on stdout and test a model that
    is partly random: mAP 0.000, exit 0)."""
    from mmengine.registry import MODELS, DefaultScope
    try:
        with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
            model = MODELS.build(deepcopy(_inner_model_cfg(cfg)))
    except Exception as exc:  # noqa: BLE001 - unknown types, bad arguments
        raise ToolError(f'cannot build the model of {config} ({type(exc).__name__}: '
                        f'{first_line(exc)}); fix the model section of the config.') from None
    mismatch = state_dict_mismatch(model.state_dict(), state)
    if mismatch is None:
        return
    raise ToolError(f'checkpoint {checkpoint} does not fit the model of {config}: '
                    f'{mismatch}; pass the checkpoint tools/train.py wrote for this '
                    'config, or the config the checkpoint was trained with.')


# ------------------------------------------------------------------ runner
def build_runner(cfg: Config):
    """``Runner.from_cfg``, or the scope's ``RUNNERS`` when the config names
    a ``runner_type`` (the scope's registry also finds the library's own
    runners, mmengine's root registry would not). Multi-process runs on a
    machine without CUDA get a gloo process group first (see
    :mod:`orepa_mm.engine.cpu_distributed`)."""
    from orepa_mm.engine.cpu_distributed import prepare_cpu_distributed
    prepare_cpu_distributed(cfg, cfg.get('launcher', 'none'))
    work_dir = osp.abspath(osp.expanduser(cfg.work_dir))
    before = set(os.listdir(work_dir)) if osp.isdir(work_dir) else None
    try:
        if 'runner_type' not in cfg:
            from mmengine.runner import Runner
            return Runner.from_cfg(cfg)
        registry = import_module(f'{config_scope(cfg)}.registry')
        return registry.RUNNERS.build(cfg)
    except Exception as exc:  # noqa: BLE001 - mmengine's build errors, after the checks
        _remove_new_entries(work_dir, before)
        raise ToolError(f'cannot build the runner from {cfg.filename} ({type(exc).__name__}: '
                        f'{first_line(exc)}); fix the config.') from None
    except BaseException:
        _remove_new_entries(work_dir, before)
        raise


def _remove_new_entries(work_dir: str, before: Optional[set]) -> None:
    """Undo what a failed Runner build created in the work dir (its log folder)."""
    if not osp.isdir(work_dir):
        return
    if before is None:
        shutil.rmtree(work_dir, ignore_errors=True)
        return
    for name in set(os.listdir(work_dir)) - before:
        path = osp.join(work_dir, name)
        if osp.isdir(path) and not osp.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


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
