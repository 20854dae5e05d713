"""Multi-process training (gloo on CPU), SyncBN, bf16 AMP and resume, tested for real.

Select with ``pytest -k 'ddp or syncbn or amp or resume'``. The runs train the demo Faster
R-CNN (configs/demo) for a few iterations on a tiny generated dataset with tools/train.py.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

# Every test here starts processes or trains: the full tier only.
pytestmark = pytest.mark.slow

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
DEMO_CONFIG = os.path.join(ROOT, 'configs', 'demo', 'faster_rcnn_orepa_r18_demo.py')

TEST_CONFIG = """
_base_ = {base!r}
custom_imports = dict(imports=['orepa_mm', 'tests.dist_hooks'], allow_failed_imports=False)
data_root = {data!r}
pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='PackDetInputs')
]
dataset = dict(data_root=data_root, pipeline=pipeline)
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dataset)
val_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dataset)
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs={epochs}, val_interval=100)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1, max_keep_ckpts=5))
custom_hooks = [dict(type='DumpRankState', out_dir={dump!r}), dict(type='ReseedEveryEpoch')]
randomness = dict(seed=0, deterministic=True)
log_processor = dict(window_size=1)
{extra}
"""


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    from demo_dataset import generate_demo_dataset
    root = tmp_path_factory.mktemp('demo_data') / 'data'
    generate_demo_dataset(str(root), num_train=8, num_val=2, img_size=128, seed=1)
    return str(root) + '/'


def write_config(tmp_path, data, epochs=1, extra=''):
    path = tmp_path / 'cfg.py'
    path.write_text(
        TEST_CONFIG.format(
            base=DEMO_CONFIG, data=data, epochs=epochs, dump=str(tmp_path / 'dump'), extra=extra))
    return str(path)


def env():
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


def train(config, work_dir, *args, nproc=1, timeout=600):
    if nproc == 1:
        cmd = [sys.executable, os.path.join(ROOT, 'tools', 'train.py')]
    else:
        cmd = [
            sys.executable, '-m', 'torch.distributed.run', '--standalone',
            f'--nproc_per_node={nproc}',
            os.path.join(ROOT, 'tools', 'train.py')
        ]
    cmd += [config, '--work-dir', str(work_dir), *args]
    if nproc > 1:
        cmd += ['--launcher', 'pytorch']
    result = subprocess.run(
        cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(work_dir):
    """Per-iteration training losses from mmengine's scalars.json files (all runs)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(work_dir, '*', 'vis_data', 'scalars.json'))):
        for line in open(path):
            record = json.loads(line)
            if 'loss' in record:
                out[record['iter']] = record['loss']
    return out


def rank_states(tmp_path, n):
    return [torch.load(tmp_path / 'dump' / f'rank{r}.pth', weights_only=True) for r in range(n)]


def test_ddp_two_processes_keep_every_parameter_identical(tmp_path, tiny_data):
    config = write_config(tmp_path, tiny_data)
    train(config, tmp_path / 'work', nproc=2)
    r0, r1 = rank_states(tmp_path, 2)
    assert r0['wrapper'] == 'CPUDistributedDataParallel'
    assert r0['find_unused_parameters'] is False  # every OREPA branch gets a gradient
    branch = [n for n in r0['params'] if 'branch_scales' in n]
    assert branch and len(r0['params']) == len(r1['params'])
    for name, value in r0['params'].items():
        assert torch.equal(value, r1['params'][name]), name
    # ... and training moved them: the ranks agree on something non-trivial.
    assert any(not torch.allclose(r0['params'][n], torch.zeros(())) for n in branch)


def test_syncbn_two_processes_sync_statistics_and_reparameterize_on_cpu(tmp_path, tiny_data):
    config = write_config(
        tmp_path,
        tiny_data,
        extra="norm_cfg = dict(type='SyncBN', requires_grad=True)\n"
        "model = dict(backbone=dict(norm_cfg=norm_cfg))")
    train(config, tmp_path / 'work', nproc=2)
    r0, r1 = rank_states(tmp_path, 2)
    assert 'CPUSyncBatchNorm' in r0['norms']
    # Parameters everywhere, and the BN statistics of the SyncBN backbone (other norm layers of
    # the demo model keep per-rank statistics, as plain BN does under DDP).
    synced = list(r0['params'].items()) + [
        (n, b) for n, b in r0['buffers'].items() if n.startswith('backbone.')
    ]
    assert any('running_mean' in n for n, _ in synced)
    for name, value in synced:
        other = r1['params'].get(name, r1['buffers'].get(name))
        assert torch.allclose(value.float(), other.float(), rtol=1e-5, atol=1e-6), name
    from orepa_mm.apis import reparameterize_checkpoint
    checkpoint = sorted(glob.glob(str(tmp_path / 'work' / 'epoch_*.pth')))[-1]
    result = reparameterize_checkpoint(
        config, checkpoint, str(tmp_path / 'deploy'), device='cpu', input_size=(128, 128))
    assert os.path.isfile(result.deploy_checkpoint) and result.num_reparameterized > 0
    assert result.errors and all(e.passes(result.rtol) for e in result.errors)


def test_syncbn_with_amp_two_processes_trains_and_keeps_float32_statistics(tmp_path, tiny_data):
    """--amp with SyncBN on CPUs (bf16 activations into CPUSyncBatchNorm): trains, finite
    losses, ranks agree, the backbone's BN statistics stay float32."""
    config = write_config(
        tmp_path,
        tiny_data,
        extra="norm_cfg = dict(type='SyncBN', requires_grad=True)\n"
        "model = dict(backbone=dict(norm_cfg=norm_cfg))")
    result = train(config, tmp_path / 'work', '--amp', nproc=2)
    assert 'BF16OptimWrapper' in result.stdout + result.stderr
    values = losses(tmp_path / 'work')
    assert values and all(v == v and abs(v) < 1e4 for v in values.values())
    r0, r1 = rank_states(tmp_path, 2)
    assert 'CPUSyncBatchNorm' in r0['norms']
    stats = {
        n: b
        for n, b in r0['buffers'].items()
        if n.startswith('backbone.') and n.endswith(('running_mean', 'running_var'))
    }
    assert stats and all(b.dtype == torch.float32 for b in stats.values())
    for name, value in stats.items():
        assert torch.allclose(value, r1['buffers'][name], rtol=1e-5, atol=1e-6), name


def test_amp_bf16_on_cpu_trains_without_nan(tmp_path, tiny_data):
    config = write_config(tmp_path, tiny_data)
    result = train(config, tmp_path / 'work', '--amp')
    assert 'BF16OptimWrapper' in result.stdout + result.stderr
    values = losses(tmp_path / 'work')
    assert len(values) == 4 and all(v == v and abs(v) < 1e4 for v in values.values())


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tiny_data):
    config = write_config(tmp_path, tiny_data, epochs=3)
    train(config, tmp_path / 'straight')
    reference = losses(tmp_path / 'straight')
    assert sorted(reference) == list(range(1, 13))

    interrupted = tmp_path / 'interrupted'
    cmd = [
        sys.executable,
        os.path.join(ROOT, 'tools', 'train.py'), config, '--work-dir',
        str(interrupted)
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (interrupted / 'last_checkpoint').exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (interrupted / 'epoch_1.pth').exists()
    resumed_from = len(losses(interrupted))  # iterations logged before the kill
    assert resumed_from < 12

    train(config, interrupted, '--resume')
    after = {i: v for i, v in losses(interrupted).items() if i > 4 * (resumed_from // 4)}
    assert after and max(after) == 12
    for iteration, value in after.items():
        assert abs(value - reference[iteration]) <= 1e-5 * max(1.0, abs(reference[iteration])), \
            (iteration, value, reference[iteration])


def _syncbn_worker(rank, world, init_file, x, result_file):
    import torch.distributed as dist

    from orepa_mm.engine import CPUSyncBatchNorm
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    torch.manual_seed(0)
    bn = torch.nn.SyncBatchNorm(3, momentum=0.3)
    bn.__class__ = CPUSyncBatchNorm
    part = x.chunk(world)[rank].clone().requires_grad_(True)
    out = bn(part)
    (out * torch.arange(out.numel()).view_as(out)).sum().backward()
    torch.save(
        dict(
            out=out.detach(),
            grad=part.grad,
            weight_grad=bn.weight.grad,
            mean=bn.running_mean,
            var=bn.running_var), f'{result_file}{rank}')
    dist.destroy_process_group()


def test_cpu_syncbn_equals_batchnorm_on_the_whole_batch(tmp_path):
    """Two ranks with half the batch each == one BatchNorm on the whole batch."""
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    mp.spawn(_syncbn_worker, args=(2, str(tmp_path / 'init'), x, str(tmp_path / 'r')), nprocs=2)
    parts = [torch.load(tmp_path / f'r{r}', weights_only=True) for r in range(2)]
    bn = torch.nn.BatchNorm2d(3, momentum=0.3)
    whole = x.clone().requires_grad_(True)
    out = bn(whole)
    # The same per-element weights as the ranks used on their halves.
    weights = torch.cat([torch.arange(out.numel() // 2).view(2, 3, 5, 5)] * 2)
    (out * weights).sum().backward()
    assert torch.allclose(torch.cat([p['out'] for p in parts]), out, atol=1e-5)
    assert torch.allclose(torch.cat([p['grad'] for p in parts]), whole.grad, atol=1e-4)
    assert torch.allclose(
        parts[0]['weight_grad'] + parts[1]['weight_grad'], bn.weight.grad, atol=1e-3)
    for p in parts:
        assert torch.allclose(p['mean'], bn.running_mean, atol=1e-6)
        assert torch.allclose(p['var'], bn.running_var, atol=1e-5)


def _syncbn_bf16_worker(rank, world, init_file, x, result_file):
    import torch.distributed as dist

    from orepa_mm.engine import CPUSyncBatchNorm
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    bn = torch.nn.SyncBatchNorm(3, momentum=0.3)
    bn.__class__ = CPUSyncBatchNorm
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    # What a conv under CPU bf16 autocast hands the BN (--amp): a bf16 activation.
    part = x.chunk(world)[rank].to(torch.bfloat16).requires_grad_(True)
    with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
        out = bn(part)
    (out.float() * torch.arange(out.numel()).view_as(out)).sum().backward()
    torch.save(
        dict(
            out=out.detach(),
            grad=part.grad,
            weight_grad=bn.weight.grad,
            bias_grad=bn.bias.grad,
            mean=bn.running_mean,
            var=bn.running_var), f'{result_file}{rank}')
    dist.destroy_process_group()


def test_cpu_syncbn_under_bf16_autocast_equals_batchnorm_on_the_whole_batch(tmp_path):
    """--amp with SyncBN on CPUs: bf16 activations in, statistics in float32 (as CUDA SyncBN),
    bf16 out; two ranks with half the batch each == one float32 BatchNorm on the whole
    (bf16-rounded) batch, within bf16 rounding; the running statistics stay float32 and equal
    the float32 ones. A large mean (+40) makes bf16 sums visibly wrong."""
    x = torch.randn(4, 3, 6, 6) * 2 + 40
    mp.spawn(
        _syncbn_bf16_worker, args=(2, str(tmp_path / 'init'), x, str(tmp_path / 'r')), nprocs=2)
    parts = [torch.load(tmp_path / f'r{r}', weights_only=True) for r in range(2)]
    bn = torch.nn.BatchNorm2d(3, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    whole = x.to(torch.bfloat16).float().requires_grad_(True)  # the ranks' exact inputs
    out = bn(whole)
    weights = torch.cat([torch.arange(out.numel() // 2).view(2, 3, 6, 6)] * 2)
    (out * weights).sum().backward()

    got = torch.cat([p['out'] for p in parts])
    assert got.dtype == torch.bfloat16
    assert (got.float() - out).abs().max() <= 2**-7 * out.abs().max()  # bf16 rounding
    grad = torch.cat([p['grad'] for p in parts])
    assert grad.dtype == torch.bfloat16
    assert (grad.float() - whole.grad).abs().max() <= 2**-6 * whole.grad.abs().max()
    for key, ref in (('weight_grad', bn.weight.grad), ('bias_grad', bn.bias.grad)):
        total = parts[0][key] + parts[1][key]
        assert total.dtype == torch.float32
        assert torch.allclose(total, ref, rtol=1e-3, atol=1e-3 * ref.abs().max()), key
    for p in parts:
        assert p['mean'].dtype == p['var'].dtype == torch.float32
        assert torch.allclose(p['mean'], bn.running_mean, rtol=1e-6, atol=1e-5)
        assert torch.allclose(p['var'], bn.running_var, rtol=1e-3, atol=1e-5)


def test_amp_bf16_wrapper_autocasts_the_feature_extractor_only():
    from orepa_mm.cnn import OREPAConv2d
    from orepa_mm.engine import BF16OptimWrapper
    seen = {}

    class Toy(torch.nn.Module):

        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Sequential(OREPAConv2d(3, 4, 3), torch.nn.ReLU())
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            feat = self.backbone(x)
            seen['feat'] = feat.dtype
            return self.head(feat.mean((2, 3)))

    model = Toy()
    model.backbone[0].register_forward_hook(
        lambda m, i, o: seen.update(conv=o.dtype, kernel=m.weight.dtype))
    wrapper = BF16OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    with wrapper.optim_context(model):
        out = model(torch.randn(2, 3, 8, 8))
    assert seen == dict(conv=torch.bfloat16, kernel=torch.float32, feat=torch.float32)
    assert out.dtype == torch.float32 and 'forward' not in vars(model.backbone)
