"""What frozen stages save: the detection workload with ``frozen_stages=1`` vs ``-1``.

    python tools/benchmark_frozen.py [--depth 50] [--steps 4] [--batch-size 2]

mmdet's configs (ours included) freeze the stem and layer1 (``frozen_stages=1``). Their OREPA
layers have no parameter that requires grad, so their kernels are generated without autograd
(no graph, no backward through them). This times one training step (forward + backward + SGD)
of the stock ResNet with ``--frozen-stages`` (the baseline), of OREPAResNet with the same
freezing, and of both with nothing frozen, alternately in one process, and prints the medians,
their ratios to the baseline and what freezing saves in each model. A benchmark, not a test.
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


def _training_step(model, x):
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                lr=1e-4,
                                momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        sum(o.square().mean() for o in model(x)).backward()
        optimizer.step()

    return step


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mmdet.models.backbones import ResNet

    import orepa_mm  # noqa: F401
    from orepa_mm.models.backbones.for_mmdet import OREPAResNet

    kwargs = dict(depth=args.depth, norm_eval=True)
    frozen = args.frozen_stages
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, *args.input_size)
    variants = {
        f'plain, frozen_stages={frozen}': _training_step(ResNet(frozen_stages=frozen, **kwargs), x),
        f'orepa, frozen_stages={frozen}':
        _training_step(OREPAResNet(frozen_stages=frozen, **kwargs), x),
        'plain, frozen_stages=-1': _training_step(ResNet(frozen_stages=-1, **kwargs), x),
        'orepa, frozen_stages=-1': _training_step(OREPAResNet(frozen_stages=-1, **kwargs), x),
    }
    samples = {name: [] for name in variants}
    for round_ in range(args.warmup + args.steps):
        for name, step in variants.items():  # alternate: the same machine state for all three
            start = time.perf_counter()
            step()
            if round_ >= args.warmup:
                samples[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(s) for name, s in samples.items()}
    print(f'ResNet-{args.depth}, batch {args.batch_size}, {args.input_size[0]}x'
          f'{args.input_size[1]}, {torch.get_num_threads()} threads, median of {args.steps} steps')
    base = medians[f'plain, frozen_stages={frozen}']
    for name, median in medians.items():
        print(f'  {name:28s} {median:7.3f} s  {median / base:5.3f}x plain')
    for variant in ('plain', 'orepa'):
        saving = (
            medians[f"{variant}, frozen_stages=-1"] - medians[f"{variant}, frozen_stages={frozen}"])
        print(f'  saving of frozen_stages={frozen} in the {variant} model: {saving:.3f} s per step')


if __name__ == '__main__':
    main()
