"""Training-cost benchmark for whole backbones: plain vs DBB vs OREPA, ratios in one run.

    python tools/benchmark.py                                  # both workloads, default models
    python tools/benchmark.py --workloads cls --models resnet50 --batch-size 16 --steps 10
    python tools/benchmark.py --device cuda --models resnet50 --batch-size cls=64 det=2 \
        --modes eager compiled                                 # what tools/gpu_check.sh runs

Every (model, variant, workload) runs in fresh processes (``--worker train|eval``): one
measures a training step (forward + backward + SGD step, the median over ``--steps`` steps
after warm-up), peak memory (CUDA: max_memory_allocated; CPU: the process's peak RSS, and the
part of it added by training) and parameters; the other times the eval forward of the
unconverted model (cached kernels) and of the deployed model, alternately, step by step.
Prints absolute values and ratios to the plain model of the same run, writes JSON and a PNG
bar chart. ``--modes eager compiled`` also times the training step of every variant (or of
``--compiled-variants``) under ``torch.compile`` (``--compile-backend``, default inductor; the
first warm-up step compiles), with ratios to the plain model in the same mode and compiled /
eager ratios. A benchmark, not a test.
"""
import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

WORKLOADS = {
    'det': dict(batch_size=2, input_size=(800, 1216)),
    'cls': dict(batch_size=16, input_size=(224, 224))
}
MODELS = {
    'resnet18': ('plain', 'dbb', 'orepa'),
    'resnet50': ('plain', 'dbb', 'orepa'),
    'repvgg_a0': ('plain', 'orepa')
}


def build_backbone(model: str, variant: str, workload: str):
    """The stock mm backbone, the same with DBB convs, or the orepa_mm one."""
    import orepa_mm  # noqa: F401  (registers OREPA / DBB)
    if model.startswith('resnet'):
        from mmdet.models.backbones import ResNet

        from orepa_mm.models.backbones.for_mmdet import OREPAResNet
        kwargs = dict(
            depth=int(model[len('resnet'):]),
            norm_eval=False,
            frozen_stages=-1,
            out_indices=(0, 1, 2, 3) if workload == 'det' else (3, ))
        if variant == 'orepa':
            return OREPAResNet(**kwargs)
        return ResNet(conv_cfg=dict(type='DBB') if variant == 'dbb' else None, **kwargs)
    from mmpretrain.models.backbones import RepVGG

    from orepa_mm.models.backbones.for_mmpretrain import OREPAVGG
    kwargs = dict(arch='A0', out_indices=(0, 1, 2, 3) if workload == 'det' else (3, ))
    return OREPAVGG(**kwargs) if variant == 'orepa' else RepVGG(**kwargs)


class Wrapped(torch.nn.Module):
    """Backbone + the cheapest loss that backpropagates through every output."""

    def __init__(self, backbone, num_classes, classify):
        super().__init__()
        self.backbone = backbone
        self.classify = classify
        channels = None
        if classify:
            with torch.no_grad():
                channels = backbone(torch.zeros(1, 3, 64, 64))[-1].shape[1]
            self.head = torch.nn.Linear(channels, num_classes)

    def forward(self, x, target=None):
        outs = self.backbone(x)
        if self.classify:
            logits = self.head(outs[-1].mean((2, 3)))
            return logits if target is None else torch.nn.functional.cross_entropy(logits, target)
        return outs if target is None else sum(o.float().square().mean() for o in outs)


def peak_memory_mb(device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, steps, warmup, device):
    samples = []
    for step in range(warmup + steps):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        if step >= warmup:
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _inputs(args, device, variant=None):
    """The wrapped model (``variant``, default the worker's) and a seeded input batch."""
    torch.manual_seed(0)
    model = Wrapped(
        build_backbone(args.model, variant or args.variant, args.workload), 1000,
        args.workload == 'cls').to(device)
    h, w = args.input_size
    x = torch.randn(args.batch_size, 3, h, w, device=device)
    target = torch.randint(0, 1000, (args.batch_size, ), device=device)
    return model, x, target


def _maybe_compiled(model, args):
    return torch.compile(model, backend=args.compile_backend) if args.compiled else model


def run_train_worker(args) -> dict:
    """Training step time and peak memory of one variant, in this (fresh) process."""
    device = torch.device(args.device)
    model, x, target = _inputs(args, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    model = _maybe_compiled(model, args)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = peak_memory_mb(device)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        model(x, target).backward()
        optimizer.step()

    model.train()
    train_s = timed(train_step, args.steps, args.warmup, device)
    peak = peak_memory_mb(device)
    return dict(
        train_step_s=train_s,
        peak_memory_mb=peak,
        train_memory_mb=peak - rss_before,
        params=sum(p.numel() for p in model.parameters()))


def run_eval_worker(args) -> dict:
    """Eval forward of one variant, unconverted (cached kernels as in validation, and
    regenerated every forward) and deployed, against plain.

    Its own fresh process, never after training, and the stock plain model (as trained and
    deployed: they differ for RepVGG) is built in the same process and timed alternately
    with the variant, step by step: on CPU, absolute eval times differ by tens of percent
    between processes (allocator and page-fault state), so eval ratios are only meaningful
    within one process.
    """
    from orepa_mm import cached_kernels
    from orepa_mm.deploy import reparameterize_model
    device = torch.device(args.device)
    model, x, _ = _inputs(args, device)
    plain, _, _ = _inputs(args, device, variant='plain')
    deployed, plain_deployed = copy.deepcopy(model), copy.deepcopy(plain)
    with torch.no_grad():
        for net in (plain_deployed, deployed):
            reparameterize_model(net)
            if hasattr(net.backbone, 'switch_to_deploy'):  # the stock RepVGG's own fusion
                net.backbone.switch_to_deploy()
    regenerated = copy.deepcopy(model)
    nets = {
        'eval_plain_s': plain,
        'eval_unconverted_s': model,
        'eval_regenerated_s': regenerated,
        'eval_plain_deployed_s': plain_deployed,
        'eval_deployed_s': deployed
    }
    with torch.no_grad(), cached_kernels(model):  # what ReparamKernelCacheHook does
        for net in nets.values():
            net.eval()
        samples = {key: [] for key in nets}
        for step in range(args.warmup + args.steps):
            for key, net in nets.items():
                samples[key].append(timed(lambda: net(x), 1, 0, device))
    result = {key: statistics.median(values[args.warmup:]) for key, values in samples.items()}
    result['deployed_params'] = sum(p.numel() for p in deployed.parameters())
    return result


def environment(device: str) -> dict:
    env = dict(
        device=device,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine())
    if device.startswith('cuda') and torch.cuda.is_available():
        env['gpu'] = torch.cuda.get_device_name(0)
    return env


def _eval_columns(r) -> str:
    if 'eval_unconverted_s' not in r:
        return f'{"-":>9}{"-":>7}{"-":>9}{"-":>9}{"-":>7}'
    return (f"{r['eval_unconverted_s']:>9.3f}"
            f"{r['eval_unconverted_s'] / r['eval_plain_s']:>6.2f}x"
            f"{r['eval_regenerated_s'] / r['eval_plain_s']:>8.2f}x"
            f"{r['eval_deployed_s']:>9.3f}"
            f"{r['eval_deployed_s'] / r['eval_plain_deployed_s']:>6.2f}x")


def print_table(results, env):
    print(f"\n{env}")
    header = (
        f'{"workload":<9}{"model":<10}{"mode":<9}{"variant":<8}{"train s":>9}{"x":>7}{"mem MB":>9}'
        f'{"x":>7}{"eval s":>9}{"x":>7}{"regen x":>9}{"deploy s":>9}{"x":>7}'
        f'{"params M":>10}')
    print(header)
    print('-' * len(header))
    for r in results:
        base = next(b for b in results
                    if b['workload'] == r['workload'] and b['model'] == r['model']
                    and b['mode'] == r['mode'] and b['variant'] == 'plain')
        print(f"{r['workload']:<9}{r['model']:<10}{r['mode']:<9}{r['variant']:<8}"
              f"{r['train_step_s']:>9.3f}{r['train_step_s'] / base['train_step_s']:>6.2f}x"
              f"{r['peak_memory_mb']:>9.0f}{r['peak_memory_mb'] / base['peak_memory_mb']:>6.2f}x"
              f"{_eval_columns(r)}{r['params'] / 1e6:>10.1f}")
    print('train and memory x: ratio to the plain model of this run (same mode); eval (deploy) '
          'x: ratio to the plain model as trained (deployed), timed alternately in the same '
          'process; eval: kernels generated once (validation, ReparamKernelCacheHook); regen: '
          'kernels generated every forward.')
    eager = {(r['workload'], r['model'], r['variant']): r for r in results if r['mode'] == 'eager'}
    for r in results:
        e = eager.get((r['workload'], r['model'], r['variant']))
        if r['mode'] == 'compiled' and e:
            print(f"compiled / eager train step: {r['workload']} {r['model']} {r['variant']}: "
                  f"{r['train_step_s'] / e['train_step_s']:.2f}x")


def plot(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    results = [r for r in results if r['mode'] == 'eager'] or results
    groups = sorted({(r['workload'], r['model']) for r in results})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, title in zip(axes, ('train_step_s', 'peak_memory_mb'),
                              ('training step time / plain', 'peak memory / plain')):
        labels, values, colours = [], [], []
        for workload, model in groups:
            rows = [r for r in results if r['workload'] == workload and r['model'] == model]
            base = next(r for r in rows if r['variant'] == 'plain')[key]
            for r in rows:
                labels.append(f"{workload}\n{model}\n{r['variant']}")
                values.append(r[key] / base)
                colours.append({
                    'plain': 'grey',
                    'dbb': 'tab:red',
                    'orepa': 'tab:blue'
                }[r['variant']])
        ax.bar(range(len(values)), values, color=colours)
        ax.axhline(1.0, color='black', linewidth=0.8)
        ax.set_xticks(range(len(values)), labels, fontsize=7)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _batch_sizes(values, parser) -> dict:
    """``['64']`` -> {None: 64}; ``['cls=64', 'det=2']`` -> {'cls': 64, 'det': 2}."""
    sizes = {}
    for value in values:
        workload, _, number = value.rpartition('=')
        if (workload and workload not in WORKLOADS) or not number.isdigit():
            parser.error(f'--batch-size takes N or WORKLOAD=N with WORKLOAD in '
                         f'{sorted(WORKLOADS)}, got {value!r}')
        sizes[workload or None] = int(number)
    return sizes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--workloads', nargs='+', default=['det', 'cls'], choices=WORKLOADS)
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=MODELS)
    parser.add_argument('--variants', nargs='+', default=['plain', 'dbb', 'orepa'])
    parser.add_argument(
        '--batch-size',
        nargs='+',
        default=[],
        metavar='[WORKLOAD=]N',
        help='overrides the workload defaults: N for all, or e.g. cls=64 det=2')
    parser.add_argument('--modes', nargs='+', default=['eager'], choices=('eager', 'compiled'))
    parser.add_argument('--compile-backend', default='inductor')
    parser.add_argument(
        '--compiled-variants',
        nargs='+',
        default=['plain', 'dbb', 'orepa'],
        help='variants also timed compiled (train step only; plain always)')
    parser.add_argument('--compiled', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--input-size', type=int, nargs=2, metavar=('H', 'W'))
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', default='work_dirs/benchmark', help='folder for JSON + PNG')
    parser.add_argument('--worker', choices=('train', 'eval'), help=argparse.SUPPRESS)
    parser.add_argument('--model', help=argparse.SUPPRESS)
    parser.add_argument('--variant', help=argparse.SUPPRESS)
    parser.add_argument('--workload', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.batch_size = int(args.batch_size[0])
        worker = run_train_worker if args.worker == 'train' else run_eval_worker
        print(json.dumps(worker(args)))
        return 0

    batch_sizes = _batch_sizes(args.batch_size, parser)
    results = []
    for workload, mode in [(w, m) for w in args.workloads for m in args.modes]:
        batch = batch_sizes.get(workload, batch_sizes.get(None, WORKLOADS[workload]['batch_size']))
        size = args.input_size or WORKLOADS[workload]['input_size']
        for model in args.models:
            for variant in MODELS[model]:
                if variant not in args.variants and variant != 'plain':
                    continue
                if (mode == 'compiled' and variant not in args.compiled_variants
                        and variant != 'plain'):
                    continue
                print(
                    f'[benchmark] {workload} {model} {variant} {mode} (batch {batch}, {size})',
                    flush=True)
                result = dict(
                    model=model,
                    variant=variant,
                    workload=workload,
                    mode=mode,
                    batch_size=batch,
                    input_size=list(size))
                # Compiled: the training step only (eval is the eager in-process comparison).
                for phase in ('train', 'eval') if mode == 'eager' else ('train', ):
                    cmd = [
                        sys.executable,
                        os.path.abspath(__file__), '--worker', phase, '--model', model, '--variant',
                        variant, '--workload', workload, '--batch-size',
                        str(batch), '--input-size', *map(str, size), '--steps',
                        str(args.steps), '--warmup',
                        str(args.warmup), '--device', args.device, '--compile-backend',
                        args.compile_backend
                    ]
                    cmd += ['--compiled'] if mode == 'compiled' else []
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode != 0:
                        print(out.stderr[-2000:], file=sys.stderr)
                        return 1
                    result.update(json.loads(out.stdout.strip().splitlines()[-1]))
                results.append(result)
    env = environment(args.device)
    print_table(results, env)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'benchmark.json'), 'w') as f:
        json.dump(dict(environment=env, results=results), f, indent=2)
    plot(results, os.path.join(args.out, 'benchmark.png'))
    print(f"\nwrote {os.path.join(args.out, 'benchmark.json')} and benchmark.png")
    return 0


if __name__ == '__main__':
    sys.exit(main())
