"""What data-parallel training communicates per step: plain DDP, stock DDP on OREPA, OREPA-DDP.

    python tools/benchmark_ddp.py                                  # ResNet-18 and ResNet-50
    python tools/benchmark_ddp.py --models resnet18 --width 16 --input-size 32 --steps 2

Two gloo processes on this machine train, interleaved step by step, (1) the plain mmdet ResNet
under ``DistributedDataParallel``, (2) the same-depth ``OREPAResNet`` under stock
``DistributedDataParallel`` and (3) that OREPAResNet under ``OREPADistributedDataParallel``
(each with a linear head and cross-entropy; SGD momentum; ``forward_sync_buffers=False``, as
mmengine's default wrapper). Measured per step and rank, between barriers:

* **bytes**: what the process wrote to its sockets, from the kernel's ``wchar`` counter in
  ``/proc/self/io`` (gloo's TCP transport writes with ``writev``; nothing else writes during a
  step), so counted independently of any wrapper. With 2 ranks a ring all-reduce of S bytes
  writes S bytes per rank, so this is directly the gradient bytes of a replica. The loopback
  interface's ``tx_bytes`` (machine-wide, both ranks, TCP/IP headers, and any other process's
  loopback traffic) is reported beside it, halved, as a cross-check;
* **step time**: forward + backward + SGD step, the slower rank's wall time, median over
  ``--steps``; beside it the CPU time of a process per step (all its threads, gloo's
  included; mean of the ranks), which other processes' load on a shared machine disturbs less.

Then a **bandwidth model** (a model, not a measurement): the all-reduce time of those bytes per
step at ``--nodes`` x ``--gpus-per-node`` GPUs over ``--link-gbps`` inter-node links, ring
all-reduce across nodes (each node's link carries 2 (n-1)/n x S bytes; intra-node traffic on
NVLink assumed free; no overlap with compute), and what OREPA-DDP saves against stock DDP.
Writes JSON with ``--json``. A benchmark, not a test (tests/test_orepa_ddp.py runs it small).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
VARIANTS = ('plain + DDP', 'OREPA + DDP', 'OREPA + OREPA-DDP')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--models',
        nargs='+',
        default=['resnet18', 'resnet50'],
        choices=['resnet18', 'resnet34', 'resnet50', 'resnet101'])
    parser.add_argument('--width', type=int, default=64, help='base_channels (64: standard)')
    parser.add_argument('--input-size', type=int, default=64)
    parser.add_argument('--batch-size', type=int, default=2, help='per process')
    parser.add_argument('--steps', type=int, default=3, help='measured steps per variant')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=1, help='torch threads per process')
    parser.add_argument('--nodes', type=int, default=8)
    parser.add_argument('--gpus-per-node', type=int, default=8)
    parser.add_argument('--link-gbps', type=float, nargs='+', default=[25.0, 100.0])
    parser.add_argument('--json', default=None, help='write the results here')
    return parser.parse_args(argv)


def socket_bytes_written() -> int:
    """Bytes this process wrote through write()/writev() (sockets included): /proc/self/io."""
    with open('/proc/self/io') as f:
        for line in f:
            if line.startswith('wchar:'):
                return int(line.split()[1])
    raise RuntimeError('no wchar in /proc/self/io')


def loopback_tx_bytes() -> int:
    try:
        with open('/sys/class/net/lo/statistics/tx_bytes') as f:
            return int(f.read())
    except OSError:
        return -1


class Classifier(torch.nn.Module):

    def __init__(self, backbone, channels):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(channels, 10)

    def forward(self, x):
        return self.head(self.backbone(x)[-1].mean((2, 3)))


def build(model: str, orepa: bool, width: int):
    from mmdet.models.backbones import ResNet

    import orepa_mm  # noqa: F401
    from orepa_mm.models.backbones.for_mmdet import OREPAResNet
    depth = int(model[len('resnet'):])
    torch.manual_seed(0)
    backbone = (OREPAResNet if orepa else ResNet)(
        depth=depth, base_channels=width, out_indices=(3, ), norm_eval=False)
    expansion = 1 if depth < 50 else 4
    return Classifier(backbone, width * 8 * expansion)


def numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


def _worker(rank, world, init_file, args, out_file):
    import torch.distributed as dist
    torch.set_num_threads(args.threads)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel

    from orepa_mm.engine import OREPADistributedDataParallel
    results = []
    for model_name in args.models:
        runs = {}
        for variant in VARIANTS:
            model = build(model_name, orepa=variant != 'plain + DDP', width=args.width)
            params = [p for p in model.parameters() if p.requires_grad]
            if variant == 'OREPA + OREPA-DDP':
                wrapper = OREPADistributedDataParallel(model, forward_sync_buffers=False)
                layers = wrapper._kernel_reducer.layers
                kernel = sum(s.numel() for s in wrapper._kernel_reducer.shapes)
                branch = numel({id(p): p
                                for layer in layers
                                for p in layer.kernel_parameters()}.values())
                reduced = numel(params) - branch + kernel
            else:
                wrapper = DistributedDataParallel(model, forward_sync_buffers=False)
                reduced = numel(params)
            optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
            runs[variant] = dict(
                model=model,
                wrapper=wrapper,
                optimizer=optimizer,
                params=numel(model.parameters()),
                reduced=reduced,
                times=[],
                cpu=[],
                bytes=[],
                lo=[])
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=gen)
        y = torch.randint(0, 10, (args.batch_size, ), generator=gen)
        for step in range(args.warmup + args.steps):
            for variant in VARIANTS:  # interleaved: the machine's load hits all alike
                run = runs[variant]
                dist.barrier()
                w0, l0 = socket_bytes_written(), loopback_tx_bytes()
                c0, t0 = time.process_time(), time.perf_counter()
                run['optimizer'].zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(run['wrapper'](x), y)
                loss.backward()
                run['optimizer'].step()
                t1, c1 = time.perf_counter(), time.process_time()
                w1, l1 = socket_bytes_written(), loopback_tx_bytes()
                # the slower rank's wall time, the ranks' mean CPU time (all threads, gloo's
                # included); the bytes of this rank
                wall = torch.tensor([t1 - t0], dtype=torch.float64)
                dist.all_reduce(wall, op=dist.ReduceOp.MAX)
                cpu = torch.tensor([(c1 - c0) / world], dtype=torch.float64)
                dist.all_reduce(cpu)
                if step >= args.warmup:
                    run['times'].append(wall.item())
                    run['cpu'].append(cpu.item())
                    run['bytes'].append(w1 - w0)
                    run['lo'].append(l1 - l0)
        for variant in VARIANTS:
            run = runs[variant]
            results.append(
                dict(
                    model=model_name,
                    variant=variant,
                    parameters=run['params'],
                    gradient_bytes=4 * run['reduced'],
                    bytes_per_step=int(statistics.median(run['bytes'])),
                    loopback_tx_per_rank=int(statistics.median(run['lo']) / 2),
                    step_time_s=statistics.median(run['times']),
                    step_times_s=run['times'],
                    cpu_time_s=statistics.median(run['cpu'])))
        del runs
    if rank == 0:
        with open(out_file, 'w') as f:
            json.dump(results, f)
    dist.destroy_process_group()


def bandwidth_model(results, nodes, gpus_per_node, link_gbps):
    rows = []
    factor = 2 * (nodes - 1) / nodes
    for model in dict.fromkeys(r['model'] for r in results):
        by = {r['variant']: r for r in results if r['model'] == model}
        for gbps in link_gbps:
            seconds = {v: factor * by[v]['bytes_per_step'] / (gbps * 1e9 / 8) for v in by}
            rows.append(
                dict(
                    model=model,
                    link_gbps=gbps,
                    nodes=nodes,
                    gpus_per_node=gpus_per_node,
                    allreduce_ms={
                        v: 1e3 * s
                        for v, s in seconds.items()
                    },
                    saved_ms_per_step=1e3 *
                    (seconds['OREPA + DDP'] - seconds['OREPA + OREPA-DDP'])))
    return rows


def main(argv=None):
    args = parse_args(argv)
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'results.json')
        mp.spawn(_worker, args=(2, os.path.join(tmp, 'init'), args, out), nprocs=2)
        with open(out) as f:
            results = json.load(f)
    model = bandwidth_model(results, args.nodes, args.gpus_per_node, args.link_gbps)

    print(f'2 gloo processes on this CPU ({platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} cores, {args.threads} thread(s) each), width {args.width}, '
          f'{args.input_size}x{args.input_size}, batch {args.batch_size} per process, '
          f'median of {args.steps} steps')
    print(f'{"model":9} {"variant":18} {"params":>10} {"grad MB":>9} {"sent MB/step":>12} '
          f'{"vs plain":>8} {"lo MB":>8} {"step s":>8} {"vs DDP":>7} {"cpu s":>7} {"vs DDP":>7}')
    for r in results:
        by = {x['variant']: x for x in results if x['model'] == r['model']}
        plain, stock = by['plain + DDP'], by['OREPA + DDP']
        print(f'{r["model"]:9} {r["variant"]:18} {r["parameters"]:>10,} '
              f'{r["gradient_bytes"] / 1e6:>9.2f} {r["bytes_per_step"] / 1e6:>12.2f} '
              f'{r["bytes_per_step"] / plain["bytes_per_step"]:>8.3f} '
              f'{r["loopback_tx_per_rank"] / 1e6:>8.2f} {r["step_time_s"]:>8.3f} '
              f'{r["step_time_s"] / stock["step_time_s"]:>7.2f} {r["cpu_time_s"]:>7.3f} '
              f'{r["cpu_time_s"] / stock["cpu_time_s"]:>7.2f}')
    print(f'\nBandwidth MODEL (not measured): ring all-reduce of the bytes above across '
          f'{args.nodes} nodes x {args.gpus_per_node} GPUs, each node on one link, '
          'intra-node free, no overlap with compute:')
    for row in model:
        t = row['allreduce_ms']
        print(f'  {row["model"]:9} {row["link_gbps"]:>5g} Gb/s: plain {t["plain + DDP"]:7.1f} ms, '
              f'OREPA+DDP {t["OREPA + DDP"]:7.1f} ms, OREPA-DDP {t["OREPA + OREPA-DDP"]:7.1f} ms'
              f' per step -> saves {row["saved_ms_per_step"]:.1f} ms per step')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(args=vars(args), results=results, bandwidth_model=model), f, indent=1)


if __name__ == '__main__':
    sys.path.insert(0, ROOT)
    main()
