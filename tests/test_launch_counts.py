"""The CUDA path's op count: an OREPA training step dispatches few more ops than the stock one.

On CUDA every kernel-generation op is a launch; the eager OREPA step is launch-bound when a
layer makes 10-25 of them per direction. The CUDA path (:mod:`orepa_mm.cnn.triton_kernels`)
makes one per layer and direction. Counted here on the CPU with a dispatch mode
(tests/dispatch_counts.py) over one forward + backward of mmdet's ResNet-50
(``base_channels=8``, 2 x 3 x 64 x 64, float64), the CUDA implementation run by Triton's
interpreter in a fresh process (``TRITON_INTERPRET=1 OREPA_MM_TRITON_ON_CPU=1``, the switch
must precede the import; ``OREPA_MM_TRITON_TILE=128`` makes the interpreter fast and changes
no count). Goal (issue 25): <= 2x the stock backbone's launching ops, <= 3x its ops in all.
The PyTorch path's counts (what runs without Triton) are reported in the failure message.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dispatch_counts import OpCounter

ROOT = Path(__file__).resolve().parents[1]


def count_step(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """Ops of one training forward + backward, and a checksum of the loss and gradients."""
    model.train()
    with OpCounter() as counter:
        outs = model(x)
        loss = sum(o.square().mean() for o in outs)
        loss.backward()
    grads = [p.grad.abs().sum() for p in model.parameters() if p.grad is not None]
    return dict(
        total=counter.total,
        launching=counter.launching,
        ops=dict(counter.ops),
        loss=float(loss.detach()),
        grad_abs_sum=float(sum(grads)))


def count_models() -> dict:
    """The stock ResNet-50 and OREPAResNet-50 steps, and OREPA's layer counts by kind."""
    from mmdet.models.backbones import ResNet

    from orepa_mm.cnn.fused_ops import triton_route
    from orepa_mm.cnn.orepa import OREPAConv1x1, OREPAConv2d
    from orepa_mm.models.backbones.for_mmdet import OREPAResNet
    torch.set_num_threads(1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = {}
    for name, cls in (('stock', ResNet), ('orepa', OREPAResNet)):
        torch.manual_seed(0)
        model = cls(depth=50, base_channels=8).double()
        result[name] = count_step(model, x)
    result['layers'] = dict(
        kxk=sum(isinstance(m, OREPAConv2d) for m in model.modules()),
        pointwise=sum(isinstance(m, OREPAConv1x1) for m in model.modules()))
    result['triton_route'] = triton_route(x)
    return result


def _count_in_subprocess(triton_route: bool) -> dict:
    """:func:`count_models` in a fresh interpreter, with the Triton route on or off
    (whatever this process's environment says)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ('TRITON_INTERPRET', 'OREPA_MM_TRITON_ON_CPU', 'OREPA_MM_TRITON_TILE')
    }
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    if triton_route:
        env.update(TRITON_INTERPRET='1', OREPA_MM_TRITON_ON_CPU='1', OREPA_MM_TRITON_TILE='128')
    proc = subprocess.run([sys.executable, __file__],
                          cwd=ROOT,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def triton_route_counts() -> dict:
    return _count_in_subprocess(triton_route=True)


@pytest.fixture(scope='module')
def pytorch_path_counts() -> dict:
    return _count_in_subprocess(triton_route=False)


def _summary(counts: dict) -> str:
    stock = counts['stock']
    return ', '.join(f'{name} {c["total"]} / {c["launching"]} '
                     f'({c["total"] / stock["total"]:.2f}x / '
                     f'{c["launching"] / stock["launching"]:.2f}x)' for name, c in counts.items()
                     if name in ('stock', 'orepa'))


def test_cuda_path_launches_at_most_twice_the_stock_ops(triton_route_counts, pytorch_path_counts):
    assert triton_route_counts['triton_route'] and not pytorch_path_counts['triton_route']
    stock, orepa = triton_route_counts['stock'], triton_route_counts['orepa']
    message = (f'all / launching ops of one forward + backward: Triton route: '
               f'{_summary(triton_route_counts)}; PyTorch path: {_summary(pytorch_path_counts)}')
    assert stock['launching'] == pytorch_path_counts['stock']['launching'], message
    assert orepa['launching'] <= 2 * stock['launching'], message
    assert orepa['total'] <= 3 * stock['total'], message


def test_one_op_per_layer_and_direction(triton_route_counts):
    """Every k x k and 1 x 1 OREPA layer generates its kernel with one op each way, and no
    per-row scale ops are left (select_backward zero-pads a row and adds it: launches)."""
    ops, layers = triton_route_counts['orepa']['ops'], triton_route_counts['layers']
    assert layers == {'kxk': 19, 'pointwise': 36}
    assert {
        name: ops.get(name, 0)
        for name in ('kxk_kernel', 'kxk_kernel_backward', 'pointwise_kernel',
                     'pointwise_kernel_backward', 'select_backward', 'bmm', 'mm', 'stack')
    } == {
        'kxk_kernel': 19,
        'kxk_kernel_backward': 19,
        'pointwise_kernel': 36,
        'pointwise_kernel_backward': 36,
        'select_backward': 0,
        'bmm': 0,
        'mm': 0,
        'stack': 0
    }


def test_cuda_path_computes_the_same_step(triton_route_counts, pytorch_path_counts):
    """Same loss and gradients (checksum) as the PyTorch path, float64."""
    for key in ('loss', 'grad_abs_sum'):
        triton_value = triton_route_counts['orepa'][key]
        assert triton_value == pytest.approx(pytorch_path_counts['orepa'][key], rel=1e-9)


if __name__ == '__main__':
    print(json.dumps(count_models()))
