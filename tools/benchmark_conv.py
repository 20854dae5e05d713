"""Benchmark one conv layer: plain vs DBB vs OREPA, forward + backward, ratios in one run.

    python tools/benchmark_conv.py --channels 256 --size 64 --batch-size 2
    python tools/benchmark_conv.py --compile  # one OREPA layer: torch.compile vs eager

Each variant is a host-model slice (conv + BN) timed over ``--steps`` steps after warm-up,
interleaved round-robin so that machine noise hits every variant alike; the median is reported
with its ratio to the plain conv measured in the same run. A benchmark, not a test.
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn

from orepa_mm.cnn import DBBConv2d, OREPAConv1x1, OREPAConv2d


def build(variant: str, channels: int, kernel_size: int) -> nn.Module:
    padding = kernel_size // 2
    if variant == 'plain':
        conv = nn.Conv2d(channels, channels, kernel_size, padding=padding, bias=False)
    elif variant == 'dbb':
        conv = DBBConv2d(channels, channels, kernel_size, padding=padding)
    elif kernel_size == 1:
        conv = OREPAConv1x1(channels, channels)
    else:
        conv = OREPAConv2d(channels, channels, kernel_size, padding=padding)
    return nn.Sequential(conv, nn.BatchNorm2d(channels))


def _median_time(fn, steps, warmup):
    samples = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        fn()
        if step >= warmup:
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def benchmark_compile(args):
    """One OREPA layer (conv + BN), fwd + bwd: ``torch.compile(model)`` vs the same model eager.

    Compilation happens before timing (the first call); then both run round-robin on the same
    input, and the compiled step's ratio to the eager one is printed.
    """
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, args.channels, args.size, args.size, device=args.device)
    eager = build('orepa', args.channels, args.kernel_size).to(args.device)
    compiled = torch.compile(eager, backend=args.compile_backend)
    sync = torch.cuda.synchronize if args.device.startswith('cuda') else (lambda: None)
    start = time.perf_counter()
    compiled(x).sum().backward()
    sync()
    compile_s = time.perf_counter() - start
    times = {'eager': [], 'compiled': []}
    for step in range(args.warmup + args.steps):
        for name, model in (('eager', eager), ('compiled', compiled)):
            eager.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            model(x).sum().backward()
            sync()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
    print(f'device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} '
          f'C={args.channels} k={args.kernel_size} HxW={args.size} batch={args.batch_size} '
          f'steps={args.steps} backend={args.compile_backend} (first call, compiling: '
          f'{compile_s:.1f} s)')
    base = statistics.median(times['eager'])
    print(f'{"orepa":<9} {"fwd+bwd ms":>11} {"ratio":>7}')
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f'{name:<9} {median * 1e3:>11.2f} {median / base:>6.2f}x')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--channels', type=int, default=256)
    parser.add_argument('--kernel-size', type=int, default=3)
    parser.add_argument('--size', type=int, default=64, help='feature map height = width')
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--variants', nargs='+', default=['plain', 'dbb', 'orepa'])
    parser.add_argument(
        '--compile',
        action='store_true',
        help='time one OREPA layer under torch.compile against eager instead')
    parser.add_argument(
        '--compile-backend',
        default='inductor',
        help='torch.compile backend for --compile (default: inductor)')
    args = parser.parse_args()
    if args.compile:
        return benchmark_compile(args)

    torch.manual_seed(0)
    x = torch.randn(args.batch_size, args.channels, args.size, args.size, device=args.device)
    models = {v: build(v, args.channels, args.kernel_size).to(args.device) for v in args.variants}
    times = {v: [] for v in models}
    sync = torch.cuda.synchronize if args.device.startswith('cuda') else (lambda: None)
    for step in range(args.warmup + args.steps):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            model(x).sum().backward()
            sync()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)

    print(f'device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} '
          f'C={args.channels} k={args.kernel_size} HxW={args.size} batch={args.batch_size} '
          f'steps={args.steps}')
    base = statistics.median(times[args.variants[0]])
    print(f'{"variant":<8} {"fwd+bwd ms":>11} {"ratio":>7}')
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f'{name:<8} {median * 1e3:>11.2f} {median / base:>6.2f}x')


if __name__ == '__main__':
    main()
