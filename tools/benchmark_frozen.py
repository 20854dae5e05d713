"""What reusing frozen layers' kernels saves: the detection workload with ``frozen_stages=1``.

    python tools/benchmark_frozen.py [--depth 50] [--steps 4] [--batch-size 2] [--input-size 800 1216]

mmdet's configs (ours included) freeze the stem and layer1 (``frozen_stages=1``). Their OREPA
layers have no parameter that requires grad, so their kernel is generated once and reused
(``ReparamConv2d.kernel``). This times one OREPAResNet training step (forward + backward +
SGD) in one process, alternately with the reuse and with every kernel cache dropped before the
step (``orepa_mm.clear_kernel_cache``: the frozen kernels are then regenerated every step, as
before reuse existed), and a stock ResNet step with the same freezing as the baseline. Prints
the medians and their ratios. A benchmark, not a test.
"""
import argparse
import statistics
import time

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--depth', type=int, default=50)
    parser.add_argument('--steps', type=int, default=4)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--input-size', type=int, nargs=2, default=(800, 1216))
    parser.add_argument('--frozen-stages', type=int, default=1)
    parser.add_argument('--threads', type=int, default=None)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import orepa_mm
    from mmdet.models.backbones import ResNet
    from orepa_mm.models.backbones.for_mmdet import OREPAResNet

    kwargs = dict(depth=args.depth, frozen_stages=args.frozen_stages, norm_eval=True)
    torch.manual_seed(0)
    models = {'plain': ResNet(**kwargs), 'orepa': OREPAResNet(**kwargs)}
    x = torch.randn(args.batch_size, 3, *args.input_size)
    steps = {}
    for name, model in models.items():
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                    lr=1e-4, momentum=0.9)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            sum(o.square().mean() for o in model(x)).backward()
            optimizer.step()

        steps[name] = step
    variants = {
        'plain': steps['plain'],
        'orepa, frozen kernels reused': steps['orepa'],
        'orepa, regenerated every step': lambda: (orepa_mm.clear_kernel_cache(models['orepa']),
                                                  steps['orepa']()),
    }
    samples = {name: [] for name in variants}
    for round_ in range(args.warmup + args.steps):
        for name, fn in variants.items():  # alternate: the same machine state for all three
            start = time.perf_counter()
            fn()
            if round_ >= args.warmup:
                samples[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(s) for name, s in samples.items()}
    frozen = [m for m in models['orepa'].modules()
              if hasattr(m, 'kernel_parameters')
              and not any(p.requires_grad for p in m.kernel_parameters())]
    print(f'ResNet-{args.depth}, frozen_stages={args.frozen_stages} ({len(frozen)} frozen '
          f'OREPA layers), batch {args.batch_size}, {args.input_size[0]}x{args.input_size[1]}, '
          f'{torch.get_num_threads()} threads, median of {args.steps} steps')
    base = medians['plain']
    regenerated = medians['orepa, regenerated every step']
    for name, median in medians.items():
        print(f'  {name:32s} {median:7.3f} s  {median / base:5.3f}x plain')
    print(f'  saving from reuse: {regenerated - medians["orepa, frozen kernels reused"]:.3f} s '
          f'per step ({medians["orepa, frozen kernels reused"] / regenerated:.3f}x)')


if __name__ == '__main__':
    main()
