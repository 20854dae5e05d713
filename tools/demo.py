"""`make demo`: OREPA end to end on data we ship, on a CPU, in minutes.

    python tools/demo.py [--skip-seg] [--work-dir work_dirs/demo] [--data-root data/demo]
                         [--threads N|auto] [--only-data]

1. draw the synthetic shapes dataset into ``data/demo/`` unless it is there already
   (`tools/demo_dataset.py`: COCO instances + mmseg label maps);
2. train the OREPA Faster R-CNN of ``configs/demo/faster_rcnn_orepa_r18_demo.py`` with
   mmengine's Runner, from scratch;
3. evaluate it on the held-out images with mmdet's CocoMetric;
4. re-parameterize the checkpoint (:func:`orepa_mm.apis.reparameterize_checkpoint`: every OREPA
   block baked into one stock conv, outputs verified, ``deploy.pth`` + ``deploy_config.py``);
5. evaluate the deployed model with the same metric and the same images;
6. the same for the OREPA PSPNet of ``configs/demo/pspnet_orepa_r18_demo.py`` (mIoU), unless
   ``--skip-seg``;
7. print one table per model: metric before/after re-parameterization (must be equal),
   parameters and FLOPs train-time vs deployed, inference time unconverted vs deployed (same
   images, same process, alternating rounds) and where checkpoints and configs were written.

Exit status 0 when every model learned something and kept its metric when deployed, 1 if not.
"""
import argparse
import json
import os
import os.path as osp
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO not in sys.path:  # `python tools/demo.py` from anywhere, without installing orepa_mm
    sys.path.insert(0, REPO)

# setuptools' "pkg_resources is deprecated" UserWarning, raised while the mm libraries import:
# nothing a user can act on. Must precede those imports.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)

import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.logging import print_log  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import orepa_mm  # noqa: E402,F401  registers the OREPA modules
from orepa_mm.apis import ReparameterizeError, reparameterize_checkpoint  # noqa: E402
from orepa_mm.utils.data_check import MissingDatasetError, check_dataset_paths  # noqa: E402
from orepa_mm.utils.text_table import format_rows, human_number  # noqa: E402
from demo_dataset import DemoDatasetSpec, ensure_demo_dataset  # noqa: E402

DET_CONFIG = osp.join(REPO, 'configs', 'demo', 'faster_rcnn_orepa_r18_demo.py')
SEG_CONFIG = osp.join(REPO, 'configs', 'demo', 'pspnet_orepa_r18_demo.py')
DEFAULT_DATA_ROOT = 'data/demo'  # what the demo configs name; relative to the repository


@dataclass
class TaskSpec:
    """One demo model: its config and the metrics that summarise it."""
    name: str
    config: str
    metrics: Sequence[str]  # the first one is the headline metric
    min_headline: float  # below this the model learned nothing: the demo failed
    tolerance: float  # largest accepted |before - after| (metrics are rounded by the library)


DET_TASK = TaskSpec(
    'faster_rcnn',
    DET_CONFIG, ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/bbox_mAP_75'),
    min_headline=0.05,
    tolerance=1e-3)
SEG_TASK = TaskSpec(
    'pspnet', SEG_CONFIG, ('mIoU', 'aAcc', 'mAcc'), min_headline=20.0, tolerance=1e-2)


@dataclass
class TaskResult:
    """What :func:`run_task` measured and wrote."""
    name: str
    work_dir: str
    config: str  # the train-time config as run (dumped by the Runner)
    checkpoint: str
    deploy_config: str
    deploy_checkpoint: str
    before: Dict[str, float]
    after: Dict[str, float]
    train_cost: Dict[str, float]
    deploy_cost: Dict[str, float]
    input_size: tuple
    num_reparameterized: int
    max_rel_error: float
    train_seconds: float
    losses: List[float] = field(default_factory=list)
    ms_per_image: Dict[str, float] = field(default_factory=dict)
    timing_images: int = 0
    metric_names: Sequence[str] = ()
    tolerance: float = 0.0

    @property
    def metrics_equal(self) -> bool:
        return all(
            abs(self.before[k] - self.after[k]) <= self.tolerance for k in self.metric_names
            if k in self.before)


# ----------------------------------------------------------------------------------- setup
def auto_threads() -> int:
    """Cores for torch: those of this process minus the ones other processes keep busy.

    On a shared machine, OpenMP threads that wait for a descheduled sibling make every op
    several times slower than one thread would; one thread per free core avoids that.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, int(round(cores - busy))))


def use_data_root(cfg: Config, data_root: str) -> None:
    """Point every dataloader and evaluator of a demo config at ``data_root``."""
    old = cfg.get('data_root', DEFAULT_DATA_ROOT + '/')
    new = data_root.rstrip('/') + '/'
    cfg.data_root = new
    for split in ('train', 'val', 'test'):
        loader = cfg.get(f'{split}_dataloader')
        if loader is not None:
            loader.dataset.data_root = new
        evaluator = cfg.get(f'{split}_evaluator')
        if isinstance(evaluator, dict) and isinstance(evaluator.get('ann_file'), str):
            evaluator.ann_file = osp.join(new, osp.relpath(evaluator.ann_file, old))


def load_demo_config(config: str,
                     data_root: str,
                     work_dir: str,
                     cfg_options: Optional[dict] = None) -> Config:
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    use_data_root(cfg, data_root)
    cfg.work_dir = work_dir
    # evaluate once, explicitly, after training (runner.test() returns the metrics)
    cfg.train_cfg.val_begin = 10**9
    return cfg


def _last_checkpoint(work_dir: str) -> str:
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def _loss_history(runner) -> List[float]:
    values, _ = runner.message_hub.get_scalar('train/loss').data
    return [float(v) for v in values]


def _numbers(metrics: dict) -> Dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


# ---------------------------------------------------------------------------------- timing
@torch.no_grad()
def time_inference(models: Dict[str, torch.nn.Module],
                   batches: list,
                   rounds: int = 3) -> Dict[str, float]:
    """Milliseconds per image of each model on the same batches.

    Every model first runs one batch (the unconverted model computes and caches its kernels
    then); then ``rounds`` rounds alternate the models, and the fastest round of each counts,
    which keeps the comparison fair on a machine other processes share.
    """
    images = sum(len(b['inputs']) for b in batches)
    best = {name: float('inf') for name in models}
    for model in models.values():
        model.eval()  # mmdet's/mmseg's ResNet.train() returns None: never chain it
        model.test_step(batches[0])
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            for batch in batches:
                model.test_step(batch)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: 1000 * seconds / images for name, seconds in best.items()}


# ------------------------------------------------------------------------------------ task
def run_task(task: TaskSpec,
             data_root: str,
             work_dir: str,
             cfg_options: Optional[dict] = None,
             timing_batches: int = 4,
             timing_rounds: int = 3) -> TaskResult:
    """Train, evaluate, re-parameterize and re-evaluate one demo model."""
    cfg = load_demo_config(task.config, data_root, work_dir, cfg_options)
    check_dataset_paths(cfg)

    runner = Runner.from_cfg(cfg)
    start = time.perf_counter()
    runner.train()
    train_seconds = time.perf_counter() - start
    losses = _loss_history(runner)
    checkpoint = _last_checkpoint(work_dir)
    train_config = osp.join(work_dir, osp.basename(task.config))  # dumped by the Runner
    before = _numbers(runner.test())

    deploy_dir = osp.join(work_dir, 'deploy')
    result = reparameterize_checkpoint(train_config, checkpoint, deploy_dir, device='cpu')

    deploy_cfg = Config.fromfile(result.deploy_config)
    deploy_cfg.work_dir = deploy_dir
    deploy_cfg.load_from = result.deploy_checkpoint
    if isinstance(deploy_cfg.get('visualizer'), dict):  # one visualizer instance per name
        deploy_cfg.visualizer.name = f'{task.name}_deployed_visualizer'
    deploy_runner = Runner.from_cfg(deploy_cfg)
    after = _numbers(deploy_runner.test())

    ms_per_image, images = {}, 0
    if timing_batches > 0:
        batches = []
        for batch in deploy_runner.test_dataloader:
            batches.append(batch)
            if len(batches) == timing_batches:
                break
        images = sum(len(b['inputs']) for b in batches)
        print_log(
            f'timing inference on {images} images, {timing_rounds} alternating rounds',
            logger='current')
        ms_per_image = time_inference({
            'unconverted': runner.model,
            'deployed': deploy_runner.model
        }, batches, timing_rounds)

    return TaskResult(
        name=task.name,
        work_dir=work_dir,
        config=train_config,
        checkpoint=checkpoint,
        deploy_config=result.deploy_config,
        deploy_checkpoint=result.deploy_checkpoint,
        before=before,
        after=after,
        train_cost=dict(result.train_cost),
        deploy_cost=dict(result.deploy_cost),
        input_size=tuple(result.input_size),
        num_reparameterized=result.num_reparameterized,
        max_rel_error=result.max_rel_error,
        train_seconds=train_seconds,
        losses=losses,
        ms_per_image=ms_per_image,
        timing_images=images,
        metric_names=tuple(task.metrics),
        tolerance=task.tolerance)


# ----------------------------------------------------------------------------------- table
def format_table(res: TaskResult, title: str, threads: int) -> str:
    rows = [('', 'train-time (OREPA)', 'deployed (stock convs)', '')]
    for key in res.metric_names:
        if key not in res.before:
            continue
        b, a = res.before[key], res.after.get(key, float('nan'))
        same = 'equal' if abs(a - b) <= res.tolerance else f'DIFFERENT ({a - b:+.4f})'
        rows.append((key, f'{b:.4f}', f'{a:.4f}', same))
    h, w = res.input_size
    for key, label in (('params', 'parameters (model)'), ('feature_params',
                                                          'parameters (backbone+neck)'),
                       ('flops', f'FLOPs (backbone+neck, {h}x{w})')):
        t, d = res.train_cost.get(key), res.deploy_cost.get(key)
        ratio = f'{d / t:.2f}x' if t and d else ''
        rows.append((label, human_number(t), human_number(d), ratio))
    if res.ms_per_image:
        t, d = res.ms_per_image['unconverted'], res.ms_per_image['deployed']
        rows.append((f'inference ms/image ({res.timing_images} images, {threads} thr.)', f'{t:.1f}',
                     f'{d:.1f}', f'deployed/unconverted {d / t:.2f}x'))
    lines = [title, '=' * len(title)]
    lines += format_rows(rows)
    if res.ms_per_image:
        lines.append('(in eval mode the unconverted model generates its OREPA kernels once and '
                     'caches them,\n so both run the same convs; training regenerates them '
                     'every step)')
    lines.append(f're-parameterized layers: {res.num_reparameterized}, largest relative output '
                 f'error deployed vs train-time: {res.max_rel_error:.2e}')
    if res.losses:
        lines.append(f'training: {len(res.losses)} iterations in {res.train_seconds / 60:.1f} '
                     f'min, loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f}')
    lines.append(f'train-time checkpoint: {res.checkpoint}')
    lines.append(f'train-time config:     {res.config}')
    lines.append(f'deployed checkpoint:   {res.deploy_checkpoint}')
    lines.append(f'deployed config:       {res.deploy_config}  (needs no orepa_mm)')
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='OREPA demo: train, evaluate, re-parameterize and re-evaluate on the '
        'synthetic shapes dataset (CPU, minutes).')
    parser.add_argument(
        '--data-root',
        default=osp.join(REPO, DEFAULT_DATA_ROOT),
        help='where the synthetic dataset is (generated when missing)')
    parser.add_argument(
        '--work-dir',
        default=osp.join(REPO, 'work_dirs', 'demo'),
        help='checkpoints, logs and deployed models go here')
    parser.add_argument(
        '--skip-seg', action='store_true', help='only the detector (skip the PSPNet segmentor)')
    parser.add_argument(
        '--threads',
        default='auto',
        help="torch CPU threads; 'auto': the cores other processes leave free")
    parser.add_argument('--only-data', action='store_true', help='generate the dataset and stop')
    parser.add_argument(
        '--timing-batches',
        type=int,
        default=4,
        help='test batches (of 8 images) for the inference timing; 0: no timing')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = auto_threads() if args.threads == 'auto' else int(args.threads)
    torch.set_num_threads(threads)

    data_root = osp.abspath(args.data_root)
    start = time.perf_counter()
    meta, generated = ensure_demo_dataset(data_root, DemoDatasetSpec())
    counts = meta['counts']
    print(f"{'generated' if generated else 'using'} the synthetic shapes dataset in {data_root}: "
          f"{counts['train']['images']} train images ({counts['train']['objects']} objects), "
          f"{counts['val']['images']} held-out val images ({counts['val']['objects']} objects)")
    if args.only_data:
        return 0
    print(f'torch threads: {threads}')

    tasks = [(DET_TASK, 'OREPA Faster R-CNN (OREPA-ResNet-18, 1/4 width) on synthetic shapes, '
              'held-out images, COCO bbox metric')]
    if not args.skip_seg:
        tasks.append((SEG_TASK, 'OREPA PSPNet (OREPA-ResNet-18-D8, 1/4 width) on synthetic '
                      'shapes, held-out images, mIoU'))
    tables, ok = [], True
    for task, title in tasks:
        try:
            res = run_task(
                task,
                data_root,
                osp.join(osp.abspath(args.work_dir), task.name),
                timing_batches=args.timing_batches)
        except (MissingDatasetError, ReparameterizeError) as err:
            print(f'demo failed ({task.name}): {err}', file=sys.stderr)
            return 1
        tables.append(format_table(res, title, threads))
        with open(osp.join(res.work_dir, 'demo_result.json'), 'w') as f:
            json.dump(
                dict(
                    before=res.before,
                    after=res.after,
                    train_cost=res.train_cost,
                    deploy_cost=res.deploy_cost,
                    ms_per_image=res.ms_per_image,
                    checkpoint=res.checkpoint,
                    deploy_checkpoint=res.deploy_checkpoint,
                    deploy_config=res.deploy_config),
                f,
                indent=1)
        headline = res.before.get(task.metrics[0], 0.0)
        if headline < task.min_headline:
            tables.append(f'FAILED: {task.metrics[0]} {headline:.4f} < {task.min_headline}: the '
                          'model learned nothing.')
            ok = False
        if not res.metrics_equal:
            tables.append('FAILED: the deployed model does not reproduce the metrics.')
            ok = False

    print('\n\n' + '\n\n'.join(tables))
    print(f'\ndemo finished in {(time.perf_counter() - start) / 60:.1f} min')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
