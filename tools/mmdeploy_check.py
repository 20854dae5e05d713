"""The steps of ``tools/mmdeploy_check.sh``: mmdeploy's torch2onnx and test tool, as functions.

Runs inside the mmdeploy venv (torch 2.1.2, mmdeploy 1.3.1), never the project's, and uses
mmdeploy's Python API, so no clone of mmdeploy's repository is needed::

    python tools/mmdeploy_check.py [--block-orepa-mm | --import-orepa-mm] [--threads N] \
        torch2onnx DEPLOY_CFG MODEL_CFG CKPT WORK
    python tools/mmdeploy_check.py [--block-orepa-mm | --import-orepa-mm] [--threads N] \
        test DEPLOY_CFG MODEL_CFG MODEL WORK OUT_JSON
    python tools/mmdeploy_check.py paths DEMO_TASK_DIR {deployed,train-time}
    python tools/mmdeploy_check.py table OUT_DIR

``torch2onnx`` is what mmdeploy's ``tools/deploy.py`` does for ONNX Runtime (the ONNX file is
the backend model); ``test`` is its ``tools/test.py`` (batch size 1) for an ``.onnx`` MODEL,
and the same test runner on the PyTorch model mmdeploy builds (after its
``backbone.switch_to_deploy()``) for a ``.pth`` MODEL, so both metrics come from the same data
loader and evaluator. ``--block-orepa-mm`` makes every ``import orepa_mm`` raise before anything
is imported: the deployed checkpoint must be a stock OpenMMLab model; ``--import-orepa-mm``
(the train-time route) imports it first, so a failure reads as one line. ``--threads N|auto``
(default auto: the cores other processes leave free) sets torch's and ONNX Runtime's threads.
``paths`` and ``table`` need only the standard library (the shell script runs them with any
Python 3).

This module imports orepa_mm only under ``--import-orepa-mm``, and the mm libraries only inside
the step functions.
"""
import argparse
import glob
import importlib.abc
import json
import os
import os.path as osp
import sys
import traceback
from typing import Dict, List, Optional, Tuple

BLOCKED = 'orepa_mm'
ROUTES = ('deployed', 'train-time')
TASKS = ('faster_rcnn', 'pspnet')
# the headline metric of each task, and how the table prints it
METRICS = {
    'faster_rcnn': ('coco/bbox_mAP', 'bbox mAP', '{:.3f}'),
    'pspnet': ('mIoU', 'mIoU', '{:.2f}')
}


class ImportBlocker(importlib.abc.MetaPathFinder):
    """A meta-path finder that refuses one top-level package and its submodules.

    Placed first on ``sys.meta_path``, it is asked before any other finder, so the package
    cannot be imported from site-packages, PYTHONPATH or the current folder alike.
    """

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name or fullname.startswith(self.name + '.'):
            raise ImportError(f'import of {fullname!r} blocked: the deployed checkpoint route '
                              f'of tools/mmdeploy_check.sh must not need {self.name}')
        return None


def block_import(name: str = BLOCKED) -> None:
    """Make ``import name`` raise ImportError in this process from now on."""
    if name in sys.modules:
        raise RuntimeError(f'{name} is imported already; it cannot be blocked any more')
    sys.meta_path.insert(0, ImportBlocker(name))


def import_orepa_mm() -> None:
    """Import orepa_mm first, so that a failure is one sentence, not a traceback in mmengine.

    The train-time route needs it: the train config imports it (custom_imports) and mmdeploy
    calls its ``backbone.switch_to_deploy()``.
    """
    try:
        import orepa_mm  # noqa: F401
    except Exception as err:  # any error: an incompatible torch fails with AttributeError
        import torch
        raise SystemExit(f'error: orepa_mm does not import with torch {torch.__version__} '
                         f'({type(err).__name__}: {err}); the train-time route needs it, the '
                         'deployed route does not.')


def auto_threads() -> int:
    """Cores for torch and ONNX Runtime: this process's minus those other processes keep busy.

    On a shared machine, threads that wait for a descheduled sibling make every op several
    times slower than one thread would (the rule of tools/demo.py, which imports orepa_mm).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count()
                                                                                   or 1)
    return max(1, min(cores, int(round(cores - os.getloadavg()[0]))))


def set_threads(threads: int) -> None:
    """Give torch and every ONNX Runtime session of mmdeploy ``threads`` intra-op threads.

    mmdeploy's ORTWrapper builds its ``onnxruntime.SessionOptions()`` itself and leaves the
    thread count at ONNX Runtime's default (all cores), so the class is wrapped here.
    """
    import onnxruntime
    import torch

    torch.set_num_threads(threads)
    options_class = onnxruntime.SessionOptions

    def session_options():
        options = options_class()
        options.intra_op_num_threads = threads
        return options

    onnxruntime.SessionOptions = session_options


def first_image(model_cfg) -> str:
    """The first test image of the model config: the sample input torch2onnx traces with."""
    dataset = model_cfg.test_dataloader.dataset
    prefix = dataset.get('data_prefix', {})
    folder = prefix.get('img', prefix.get('img_path', ''))
    root = osp.join(dataset.get('data_root', ''), folder)
    images = sorted(glob.glob(osp.join(root, '*.png')) + glob.glob(osp.join(root, '*.jpg')))
    if not images:
        raise SystemExit(f'error: no test images under {root}; run `make demo` (it generates '
                         'data/demo) first.')
    return images[0]


def torch2onnx(deploy_cfg: str, model_cfg: str, checkpoint: str, work_dir: str) -> str:
    """mmdeploy's tools/deploy.py for ONNX Runtime: export WORK_DIR/end2end.onnx."""
    from mmdeploy.apis import torch2onnx as export
    from mmdeploy.utils import get_onnx_config, load_config

    deploy, model = load_config(deploy_cfg, model_cfg)
    save_file = get_onnx_config(deploy)['save_file']
    export(first_image(model), work_dir, save_file, deploy, model, checkpoint, device='cpu')
    return osp.join(work_dir, save_file)


def test(deploy_cfg: str, model_cfg: str, model_file: str, work_dir: str) -> Dict[str, float]:
    """mmdeploy's tools/test.py (batch size 1) on an .onnx model, or on the .pth it came from."""
    from copy import deepcopy

    from mmdeploy.apis import build_task_processor
    from mmdeploy.utils import load_config

    deploy, model_config = load_config(deploy_cfg, model_cfg)
    processor = build_task_processor(model_config, deploy, 'cpu')
    loader = deepcopy(model_config['test_dataloader'])
    loader['batch_size'] = 1
    loader['dataset'] = processor.build_dataset(loader['dataset'])
    dataloader = processor.build_dataloader(loader)
    if model_file.endswith('.onnx'):
        model = processor.build_backend_model(
            [model_file], data_preprocessor_updater=processor.update_data_preprocessor)
    else:
        model = processor.build_pytorch_model(model_file)
    runner = processor.build_test_runner(model, work_dir, dataloader=dataloader)
    metrics = runner.test()
    return {key: float(value) for key, value in metrics.items()}


def route_paths(task_dir: str, route: str) -> Tuple[str, str]:
    """(model config, checkpoint) of a route, as `make demo` recorded them in demo_result.json.

    The train config is the one the Runner dumped next to the checkpoint (the demo's
    ``demo_result.json`` names the checkpoint, not that config).
    """
    with open(osp.join(task_dir, 'demo_result.json')) as f:
        result = json.load(f)
    if route == 'deployed':
        paths = result['deploy_config'], result['deploy_checkpoint']
    else:
        checkpoint = result['checkpoint']
        configs = result.get('config') or sorted(
            glob.glob(osp.join(osp.dirname(checkpoint), '*.py')))
        paths = (configs if isinstance(configs, str) else (configs or [''])[0]), checkpoint
    missing = [p for p in paths if not osp.isfile(p)]
    if missing:
        raise SystemExit(f'error: {missing[0] or "the train config"} (named by {task_dir}/'
                         'demo_result.json) is missing: run `make demo` again.')
    return paths


def _read(path: str) -> Optional[dict]:
    if not osp.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _errors(work_dir: str) -> List[str]:
    path = osp.join(work_dir, 'errors.txt')
    if not osp.isfile(path):
        return []
    with open(path) as f:
        return [line.rstrip('\n') for line in f if line.strip()]


def _step_times(out_dir: str) -> List[Tuple[str, str]]:
    path = osp.join(out_dir, 'step_times.tsv')
    if not osp.isfile(path):
        return []
    with open(path) as f:
        return [tuple(line.rstrip('\n').split('\t', 1)) for line in f if '\t' in line]


def format_table(out_dir: str) -> Tuple[str, bool]:
    """The four-row table (route x task) and whether every row has both metrics."""
    rows = [('route', 'task', 'metric', 'PyTorch', 'ONNX Runtime', 'ORT - PyTorch')]
    complete = True
    for route in ROUTES:
        for task in TASKS:
            key, name, fmt = METRICS[task]
            cells = []
            for backend in ('pytorch', 'ort'):
                metrics = _read(osp.join(out_dir, route, task, f'{backend}.json')) or {}
                cells.append(metrics.get(key))
            complete &= None not in cells
            diff = fmt.format(cells[1] - cells[0]) if None not in cells else 'n/a'
            if None not in cells and not diff.startswith('-'):
                diff = '+' + diff
            rows.append((route, task, name, *('failed' if c is None else fmt.format(c)
                                              for c in cells), diff))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, '  '.join('-' * w for w in widths))
    errors = [(route, task, line) for route in ROUTES for task in TASKS
              for line in _errors(osp.join(out_dir, route, task))]
    if errors:
        lines.append('')
        lines.append('why (the last line of each failed step; the log has the traceback):')
        lines.extend(f'  {route} {task}: {line}' for route, task, line in errors)
    times = _step_times(out_dir)
    if times:
        lines.append('')
        lines.append('wall time per step:')
        lines.extend(f'  {name}: {secs}' for name, secs in times)
    return '\n'.join(lines), complete


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--block-orepa-mm',
        action='store_true',
        help='make `import orepa_mm` raise (the deployed checkpoint route)')
    parser.add_argument(
        '--import-orepa-mm',
        action='store_true',
        help='import orepa_mm first (the train-time route), failing in one line')
    parser.add_argument(
        '--threads',
        default='auto',
        help="intra-op threads of torch and ONNX Runtime; 'auto': the cores "
        'other processes leave free')
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('torch2onnx')
    for name in ('deploy_cfg', 'model_cfg', 'checkpoint', 'work_dir'):
        p.add_argument(name)
    p = sub.add_parser('test')
    for name in ('deploy_cfg', 'model_cfg', 'model', 'work_dir'):
        p.add_argument(name)
    p.add_argument('out', help='JSON file for the metrics')
    p = sub.add_parser('paths')
    p.add_argument('task_dir')
    p.add_argument('route', choices=ROUTES)
    p = sub.add_parser('table')
    p.add_argument('out_dir')
    return parser.parse_args(argv)


def run_step(args) -> None:
    """torch2onnx or test, as parsed."""
    set_threads(auto_threads() if args.threads == 'auto' else int(args.threads))
    if args.import_orepa_mm:
        import_orepa_mm()
    if args.command == 'torch2onnx':
        onnx = torch2onnx(args.deploy_cfg, args.model_cfg, args.checkpoint, args.work_dir)
        print(f'wrote {onnx}')
        return
    metrics = test(args.deploy_cfg, args.model_cfg, args.model, args.work_dir)
    tmp = args.out + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(metrics, f, indent=1)
    os.replace(tmp, args.out)  # no half-written metrics


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.block_orepa_mm:
        block_import(BLOCKED)
    if args.command == 'paths':
        print(*route_paths(args.task_dir, args.route), sep='\t')
        return 0
    if args.command == 'table':
        table, complete = format_table(args.out_dir)
        print(table)
        return 0 if complete else 1
    try:
        run_step(args)
    except Exception as err:
        # the traceback for the log, the last line for the table's footer
        traceback.print_exc()
        os.makedirs(args.work_dir, exist_ok=True)
        with open(osp.join(args.work_dir, 'errors.txt'), 'a') as f:
            f.write(f'{args.command}: {type(err).__name__}: {str(err).splitlines()[0]}\n'
                    if str(err) else f'{args.command}: {type(err).__name__}\n')
        return 1
    if args.block_orepa_mm and any(m.split('.')[0] == BLOCKED for m in sys.modules):
        raise SystemExit(f'error: {BLOCKED} was imported on the deployed route')
    return 0


if __name__ == '__main__':
    sys.exit(main())
