"""OREPADistributedDataParallel: kernel-gradient all-reduce, exact against stock DDP.

Fast tests run the wrapper on a one-process gloo group in this process (layer selection,
outputs and gradients equal to the bare model's, no_sync, frozen stages, activation
checkpointing, copies, refusals, mmengine's train_step). The slow ones spawn two gloo
processes: three SGD-momentum steps of OREPAResNet-18 (64 x 64 inputs, batch 2 per rank) and
friends give the parameters of stock ``DistributedDataParallel`` -- rel err
||theta - theta_DDP|| / ||theta_DDP|| over all parameters <= 1e-5 in fp32, <= 1e-12 in fp64 --
with bit-identical replicas, under SyncBN, bf16 autocast, gradient accumulation, frozen stages,
activation checkpointing, OREPAVGG and DBB layers; the bytes each rank writes to its sockets
per step (tools/benchmark_ddp.py on a quarter-width ResNet-18) are within 5% of the plain
model's; tools/train.py trains, accumulates and resumes with it; torch.compile runs it.
Gradient accumulation (no_sync) combined with an L2 term over all parameters, a term on
``layer.weight``, a layer frozen or ``zero_grad()`` between micro-steps gives stock DDP's
gradients (<= 1e-6 relative over all gradients, fp32; a small net of every OREPA layer type,
so fast); in-place changes of held gradients are refused. The wrapper keeps no module-level
state and frees its reducer, process group and hooks with itself.

(At 32 x 32 the last stage's BN sees 2 values per channel and training is chaotic: a 1e-15
difference in fp64 grows to O(1) in four steps, for any two ways of summing the gradients;
hence 64 x 64.)
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))

#: Two-process scenarios: model, options. Each trains the same initialisation with stock DDP
#: and with OREPADistributedDataParallel on the same per-rank data.
SCENARIOS = {
    'resnet18': dict(),
    'resnet18_fp64': dict(dtype='float64'),
    'syncbn': dict(backbone=dict(norm_cfg=dict(type='SyncBN'))),
    'syncbn_fp64': dict(backbone=dict(norm_cfg=dict(type='SyncBN')), dtype='float64'),
    'bf16_autocast': dict(autocast=True, steps=2),
    'accumulate': dict(accumulate=2),
    'frozen_stages': dict(backbone=dict(frozen_stages=1)),
    'with_cp': dict(backbone=dict(with_cp=True)),
    'orepavgg': dict(model='orepavgg'),
    'dbb_layer': dict(dbb=True),
}
FP32_RTOL = 1e-5
FP64_RTOL = 1e-12


# -- models ----------------------------------------------------------------------------------
class Classifier(nn.Module):
    """An optional DBB layer on the image, a backbone, global pooling and a linear head."""

    def __init__(self, backbone, channels, dbb=False):
        super().__init__()
        self.dbb = None
        if dbb:  # DBB runs its branches on the features: its parameters stay with DDP
            from orepa_mm.cnn import DBBConv2d
            self.dbb = DBBConv2d(3, 3, 3)
        self.backbone = backbone
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        if self.dbb is not None:
            x = self.dbb(x)
        return self.head(self.backbone(x)[-1].mean((2, 3)))


def build_model(model='resnet18', backbone=None, dbb=False, seed=0, **_):
    import orepa_mm  # noqa: F401
    torch.manual_seed(seed)
    if model == 'orepavgg':
        from orepa_mm.models.backbones.for_mmpretrain import OREPAVGG
        net = OREPAVGG('A0', out_indices=(3, ), **(backbone or {}))
        channels = 1280
    else:
        from orepa_mm.models.backbones.for_mmdet import OREPAResNet
        kwargs = dict(depth=18, out_indices=(3, ), norm_eval=False)
        kwargs.update(backbone or {})
        net = OREPAResNet(**kwargs)
        channels = 512
    return Classifier(net, channels, dbb)


# -- two-process worker ------------------------------------------------------------------------
def _train(model, wrapper, steps, accumulate, autocast, rank, dtype, size=64, batch=2, lr=1e-3):
    """SGD-momentum steps; rank-dependent data, the same for every wrapper."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(1000 + rank)
    for _ in range(steps):
        optimizer.zero_grad()
        for micro in range(accumulate):
            x = torch.randn(batch, 3, size, size, generator=gen).to(dtype)
            y = torch.randint(0, 10, (batch, ), generator=gen)
            sync = micro == accumulate - 1
            ctx = wrapper.no_sync() if not sync else _null()
            with ctx, torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
                out = wrapper(x)
            loss = F.cross_entropy(out.float(), y) / accumulate
            loss.backward()
        optimizer.step()


class _null:

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _relative_errors(ref, other):
    return {n: ((ref[n] - other[n]).norm() / ref[n].norm().clamp_min(1e-30)).item() for n in ref}


def _scenario_worker(rank, world, init_file, names, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    from orepa_mm.engine import CPUDistributedDataParallel, OREPADistributedDataParallel
    results = {}
    for name in names:
        options = SCENARIOS[name]
        dtype = getattr(torch, options.get('dtype', 'float32'))
        params = {}
        info = {}
        for kind, cls in (('stock', CPUDistributedDataParallel), ('orepa',
                                                                  OREPADistributedDataParallel)):
            model = build_model(**options).to(dtype)
            wrapper = cls(model)
            if kind == 'orepa':
                info['kernel_layers'] = len(wrapper.kernel_layer_names)
                info['norms'] = sorted(
                    {type(m).__name__
                     for m in model.modules() if 'Norm' in type(m).__name__})
            _train(model, wrapper, options.get('steps', 3), options.get('accumulate', 1),
                   options.get('autocast', False), rank, dtype)
            params[kind] = {n: p.detach().clone() for n, p in model.named_parameters()}
        errors = _relative_errors(params['stock'], params['orepa'])
        ref = torch.cat([p.reshape(-1).double() for p in params['stock'].values()])
        got = torch.cat([p.reshape(-1).double() for p in params['orepa'].values()])
        # Replicas: rank 0's parameters, bit for bit, on every rank?
        flat = torch.cat([p.reshape(-1) for p in params['orepa'].values()])
        reference = flat.clone()
        dist.broadcast(reference, 0)
        same = torch.tensor([float(torch.equal(flat, reference))])
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        moved = max((params['orepa'][n] - p0).abs().max().item()
                    for n, p0 in build_model(**options).to(dtype).named_parameters())
        results[name] = dict(
            rel_err=((got - ref).norm() / ref.norm()).item(),
            worst_tensor=max(errors, key=errors.get),
            worst_tensor_rel_err=max(errors.values()),
            replicas_identical=bool(same.item()),
            finite=all(torch.isfinite(p).all().item() for p in params['orepa'].values()),
            moved=moved,
            **info)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, 'results.pth'))
    dist.destroy_process_group()


@pytest.fixture(scope='module')
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp('orepa_ddp')
    mp.spawn(_scenario_worker, args=(2, str(out / 'init'), list(SCENARIOS), str(out)), nprocs=2)
    return torch.load(out / 'results.pth', weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize('name', list(SCENARIOS))
def test_two_processes_match_stock_ddp_with_identical_replicas(two_rank_results, name):
    result = two_rank_results[name]
    assert result['finite'] and result['moved'] > 0, result
    assert result['replicas_identical'], result
    rtol = FP64_RTOL if name.endswith('fp64') else FP32_RTOL
    assert result['rel_err'] <= rtol, result
    assert result['kernel_layers'] == (22 if name == 'orepavgg' else 17), result
    if name == 'syncbn':
        assert 'CPUSyncBatchNorm' in result['norms']


# -- one-process group (fast) --------------------------------------------------------------------
@pytest.fixture(scope='module')
def one_rank_group(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip('a process group already exists in this process')
    init = tmp_path_factory.mktemp('one_rank') / 'init'
    dist.init_process_group('gloo', init_method=f'file://{init}', rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _wrap(model, **kwargs):
    from orepa_mm.engine import OREPADistributedDataParallel
    return OREPADistributedDataParallel(model, **kwargs)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(bare, model, rtol=1e-5):
    """Every gradient of ``model`` equals the bare model's to ``rtol`` (in norm)."""
    ref, got = _grads(bare), _grads(model)
    assert ref.keys() == got.keys()
    errors = _relative_errors(ref, got)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, (worst, errors[worst])


def _small_resnet(**kwargs):
    model = build_model(backbone=dict(base_channels=16, **kwargs))
    model.head = nn.Linear(128, 10)
    return model


# -- gradient accumulation with loss terms that reach the branches directly ----------------------
class TinyNet(nn.Module):
    """Every OREPA layer type (large-kernel stem, k x k, 1 x 1), a BN and a linear head: small
    enough for exact gradient comparisons in a few seconds, no backbone library needed."""

    def __init__(self, seed=0):
        from orepa_mm.cnn import OREPAConv1x1, OREPAConv2d, OREPALargeConv2d
        super().__init__()
        torch.manual_seed(seed)
        self.stem = OREPALargeConv2d(3, 8, 5, padding=2)
        self.conv = OREPAConv2d(8, 8, 3, padding=1)
        self.pw = OREPAConv1x1(8, 8)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)
        with torch.no_grad():  # the stem's origin pair starts at zero: give it gradients
            self.stem.origin_scale.fill_(0.5)

    def forward(self, x):
        x = F.relu(self.conv(F.relu(self.stem(x))))
        return self.head(self.bn(self.pw(x)).mean((2, 3)))

    def reparam_layers(self):
        return [self.stem, self.conv, self.pw]


#: Gradient accumulation (no_sync micro-steps, then a synchronised one) combined with: an L2
#: term over all parameters, a term on ``layer.weight``, a layer frozen after the first
#: micro-step, and ``zero_grad()`` between micro-steps with an L2 term.
ACCUMULATION_SCENARIOS = {
    'l2_over_all_parameters': dict(terms='l2'),
    'term_on_layer_weight': dict(terms='weight'),
    'layer_frozen_between_micro_steps': dict(freeze_after=0),
    'zero_grad_between_micro_steps': dict(terms='l2', reset_after=0),
}
ACCUMULATION_RTOL = 1e-6


def _accumulate(model,
                wrapper,
                rank,
                terms=None,
                freeze_after=None,
                reset_after=None,
                cycles=2,
                micro_steps=3):
    """``cycles`` SGD-momentum steps of ``micro_steps`` micro-steps (all but the last under
    ``no_sync``, unless ``wrapper`` is the bare model); the gradients after each synchronised
    backward."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    gen = torch.Generator().manual_seed(2000 + rank)
    grads = []
    for _ in range(cycles):
        optimizer.zero_grad()
        for micro in range(micro_steps):
            x = torch.randn(2, 3, 12, 12, generator=gen)
            y = torch.randint(0, 10, (2, ), generator=gen)
            last = micro == micro_steps - 1
            ctx = wrapper.no_sync() if wrapper is not model and not last else _null()
            with ctx:
                loss = F.cross_entropy(wrapper(x), y) / micro_steps
                if terms == 'l2':
                    loss = loss + 1e-2 * sum(p.pow(2).sum() for p in model.parameters())
                elif terms == 'weight':
                    loss = loss + 1e-2 * sum(m.weight.pow(2).sum() for m in model.reparam_layers())
                loss.backward()
            if micro == freeze_after:
                model.conv.requires_grad_(False)
            if micro == reset_after:
                optimizer.zero_grad()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
    return grads


def _compare_grads(reference, grads):
    """Relative error over all gradients, and the worst tensor's, across cycles."""
    worst = (0.0, None)
    total = 0.0
    for ref, got in zip(reference, grads):
        assert ref.keys() == got.keys(), (sorted(ref), sorted(got))
        errors = _relative_errors(ref, got)
        name = max(errors, key=errors.get)
        worst = max(worst, (errors[name], name), key=lambda e: e[0])
        flat_ref = torch.cat([ref[n].reshape(-1).double() for n in ref])
        flat_got = torch.cat([got[n].reshape(-1).double() for n in ref])
        total = max(total, ((flat_got - flat_ref).norm() / flat_ref.norm()).item())
    return dict(rel_err=total, worst_tensor=worst[1], worst_tensor_rel_err=worst[0])


def _accumulation_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    from orepa_mm.engine import CPUDistributedDataParallel, OREPADistributedDataParallel
    results = {}
    for name, options in ACCUMULATION_SCENARIOS.items():
        # a parameter used only in no_sync steps needs find_unused_parameters in DDP
        kwargs = dict(find_unused_parameters='freeze_after' in options)
        grads, params = {}, {}
        for kind, cls in (('stock', CPUDistributedDataParallel), ('orepa',
                                                                  OREPADistributedDataParallel)):
            model = TinyNet()
            grads[kind] = _accumulate(model, cls(model, **kwargs), rank, **options)
            params[kind] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        reference = params['orepa'].clone()
        dist.broadcast(reference, 0)
        same = torch.tensor([float(torch.equal(params['orepa'], reference))])
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        results[name] = dict(
            _compare_grads(grads['stock'], grads['orepa']), replicas_identical=bool(same.item()))
    if rank == 0:
        torch.save(results, os.path.join(out_dir, 'accumulation.pth'))
    dist.destroy_process_group()


@pytest.fixture(scope='module')
def two_rank_accumulation(tmp_path_factory):
    out = tmp_path_factory.mktemp('orepa_ddp_accumulation')
    mp.spawn(_accumulation_worker, args=(2, str(out / 'init'), str(out)), nprocs=2)
    return torch.load(out / 'accumulation.pth', weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize('name', list(ACCUMULATION_SCENARIOS))
def test_two_processes_accumulation_with_direct_terms_matches_stock_ddp(
        two_rank_accumulation, name):
    """Branch gradients equal stock DDP's (fp32) when no_sync accumulation meets a loss term
    on the branch parameters or ``layer.weight``, a layer frozen or gradients reset between
    micro-steps. (Before the fix, all four were off: relative 0.03-0.08 over all gradients,
    0.5-1.2 in the worst tensor.)"""
    result = two_rank_accumulation[name]
    assert result['rel_err'] <= ACCUMULATION_RTOL, result
    assert result['worst_tensor_rel_err'] <= 10 * ACCUMULATION_RTOL, result
    assert result['replicas_identical'], result


@pytest.mark.parametrize('name', list(ACCUMULATION_SCENARIOS))
def test_one_rank_accumulation_with_direct_terms_equals_the_bare_model(one_rank_group, name):
    options = ACCUMULATION_SCENARIOS[name]
    bare, model = TinyNet(), TinyNet()
    reference = _accumulate(bare, bare, 0, **options)
    result = _compare_grads(reference, _accumulate(model, _wrap(model), 0, **options))
    assert result['rel_err'] <= ACCUMULATION_RTOL, result


@pytest.mark.parametrize('change', ['zero_in_place', 'rescale', 'replace', 'partial_reset'])
def test_changing_gradients_in_place_between_no_sync_steps_is_refused(one_rank_group, change):
    """The held kernel gradient is not in ``.grad``, so a change of the branch gradients
    between micro-steps other than setting all of them to None cannot be applied to it
    (``zero_()`` and ``mul_(0.5)`` of materialised zeros look alike): it raises. Between
    cycles (nothing held) every form of zero_grad works."""
    model = TinyNet()
    wrapper = _wrap(model)
    x = torch.randn(2, 3, 12, 12)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # a whole cycle, then zero_grad(set_to_none=False): allowed
        with wrapper.no_sync():
            wrapper(x).square().mean().backward()
        wrapper(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    with wrapper.no_sync():
        wrapper(x).square().mean().backward()
    if change == 'zero_in_place':
        optimizer.zero_grad(set_to_none=False)
    elif change == 'rescale':
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-6)
    elif change == 'replace':
        model.conv.origin.grad = torch.zeros_like(model.conv.origin)
    else:
        model.conv.origin.grad = None
    with pytest.raises(RuntimeError, match='other than by setting all of them to None'):
        wrapper(x).square().mean().backward()


def test_freezing_part_of_a_layer_during_accumulation_is_refused(one_rank_group):
    model = TinyNet()
    wrapper = _wrap(model)
    x = torch.randn(2, 3, 12, 12)
    with wrapper.no_sync():
        wrapper(x).square().mean().backward()
    model.conv.origin.requires_grad_(False)
    with pytest.raises(RuntimeError, match='only some parameters of conv'):
        wrapper(x)


# -- ownership: no module-level state, released with the wrapper -----------------------------------
def test_kernel_source_is_the_only_hook_and_the_module_keeps_no_state(one_rank_group):
    """The layers keep their class forward and kernel; the wrapper class is not rewritten; the
    module holds no mutable state; copies and DataParallel replicas are not owned."""
    import weakref

    from orepa_mm.engine import orepa_ddp
    forward = orepa_ddp.OREPADistributedDataParallel.__dict__['forward']
    model = TinyNet()
    wrapper = _wrap(model)
    reducer = wrapper._kernel_reducer
    assert orepa_ddp.OREPADistributedDataParallel.__dict__['forward'] is forward
    for layer in model.reparam_layers():
        assert 'forward' not in vars(layer) and 'kernel' not in vars(layer)
        assert layer.kernel_source() is reducer
    containers = (dict, list, set, weakref.WeakKeyDictionary, weakref.WeakValueDictionary)
    state = [
        name for name, value in vars(orepa_ddp).items()
        if not name.startswith('__') and isinstance(value, containers)
    ]
    assert not state, state
    out = wrapper(torch.randn(2, 3, 12, 12))  # a round is open until the backward
    replica = model.conv._replicate_for_data_parallel()  # shares the weak kernel_source
    assert replica.kernel_source() is reducer and reducer.kernel_for(replica) is None
    assert reducer.kernel_for(copy.deepcopy(model.conv)) is None
    assert reducer.kernel_for(model.conv) is not None
    out.sum().backward()
    assert reducer.kernel_for(model.conv) is None  # closed


def test_deleted_wrappers_free_their_reducers_process_groups_and_layers(one_rank_group):
    """Build and delete three wrappers: the reducers and their process groups go (the layers'
    kernel_source resolves to nothing); with the models dropped too, the layers go."""
    import gc
    import weakref
    kept, refs = [], []
    for keep in (True, True, False):
        model = TinyNet()
        wrapper = _wrap(model)
        wrapper(torch.randn(2, 3, 12, 12)).sum().backward()
        with wrapper.no_sync():  # holds a kernel gradient, with hooks on the branches
            wrapper(torch.randn(2, 3, 12, 12)).sum().backward()
        reducer = wrapper._kernel_reducer
        refs.append((weakref.ref(reducer), weakref.ref(reducer.group), weakref.ref(model.conv)))
        if keep:
            kept.append(model)
        del model, wrapper, reducer
    gc.collect()
    for i, (reducer, group, layer) in enumerate(refs):
        assert reducer() is None and group() is None, i
        assert (layer() is None) == (i == 2), i
    for model in kept:  # the held gradients' hooks went with the reducer
        for layer in model.reparam_layers():
            assert layer.kernel_source() is None
            assert all(not p._backward_hooks and not p._post_accumulate_grad_hooks
                       for p in layer.kernel_parameters())
        x = torch.randn(2, 3, 12, 12)
        model(x).sum().backward()  # a plain model again
        assert model.conv.origin.grad is not None


def test_registered_as_a_model_wrapper():
    from mmengine.model import MMDistributedDataParallel
    from mmengine.registry import MODEL_WRAPPERS

    from orepa_mm.engine import CPUDistributedDataParallel, OREPADistributedDataParallel
    assert MODEL_WRAPPERS.get('OREPADistributedDataParallel') is OREPADistributedDataParallel
    assert issubclass(OREPADistributedDataParallel, CPUDistributedDataParallel)
    assert issubclass(OREPADistributedDataParallel, MMDistributedDataParallel)


def test_kernel_layers_are_the_kernel_forward_reparam_layers():
    from orepa_mm.cnn import DBBConv2d, OREPALargeConv2d
    from orepa_mm.engine.orepa_ddp import kernel_forward_layers
    model = build_model(dbb=True)
    names = [n for n, _ in kernel_forward_layers(model)]
    # stem (its stacked 3x3 kernels are part of it) + 16 convs + 3 shortcuts; no DBB
    assert len(names) == 17 and names[0] == 'backbone.conv1'
    assert isinstance(model.backbone.conv1, OREPALargeConv2d)
    assert not any('stem_layers' in n or n.startswith('dbb') for n in names)
    assert isinstance(model.dbb, DBBConv2d)
    vgg = [n for n, _ in kernel_forward_layers(build_model('orepavgg'))]
    # OREPA-VGG: every RepVGG block's dense 3x3 branch; its 1x1 branch is a plain conv
    assert len(vgg) == 22 and all(n.endswith('branch_3x3.conv') for n in vgg)


def test_one_rank_outputs_and_gradients_equal_the_bare_model(one_rank_group):
    bare = _small_resnet()
    model = copy.deepcopy(bare)
    wrapper = _wrap(model)
    x = torch.randn(2, 3, 32, 32)
    out_bare, out = bare(x), wrapper(x)
    assert torch.equal(out_bare, out)
    out_bare.square().mean().backward()
    out.square().mean().backward()
    _assert_same_grads(bare, model)
    # every kernel went through a proxy: the branch parameters are ignored by DDP
    assert 'backbone.layer1.0.conv1.origin' in model._ddp_params_and_buffers_to_ignore
    assert 'backbone.layer1.0.bn1.weight' not in model._ddp_params_and_buffers_to_ignore
    assert wrapper._kernel_reducer.round is None  # reduced and closed at the end of backward


def test_no_sync_accumulates_kernel_gradients_until_the_synced_step(one_rank_group):
    bare = _small_resnet()
    model = copy.deepcopy(bare)
    wrapper = _wrap(model)
    xs = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    for x in xs:
        bare(x).square().mean().backward()
    origin = model.backbone.layer1[0].conv1.origin
    for x in xs[:2]:
        with wrapper.no_sync():
            out = wrapper(x)
        out.square().mean().backward()
        # held by the wrapper: the branch grads are materialised as zeros meanwhile
        assert origin.grad is not None and not origin.grad.any()
    wrapper(xs[2]).square().mean().backward()
    _assert_same_grads(bare, model)


def test_zero_grad_after_no_sync_drops_the_held_kernel_gradients(one_rank_group):
    bare = _small_resnet()
    model = copy.deepcopy(bare)
    wrapper = _wrap(model)
    x, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with wrapper.no_sync():
        out = wrapper(x)
    out.square().mean().backward()
    model.zero_grad()  # set_to_none: the no_sync step is discarded, as with DDP
    wrapper(x2).square().mean().backward()
    bare(x2).square().mean().backward()
    _assert_same_grads(bare, model)


def test_frozen_stages_make_no_proxy_and_get_no_gradient(one_rank_group):
    model = _small_resnet(frozen_stages=1)
    wrapper = _wrap(model)
    reducer = wrapper._kernel_reducer
    out = wrapper(torch.randn(2, 3, 32, 32))
    frozen = [
        i for i, n in enumerate(reducer.names)
        if n.startswith(('backbone.conv1', 'backbone.layer1.'))
    ]
    assert frozen and not set(frozen) & set(reducer.round.proxies)
    assert len(reducer.round.proxies) == len(reducer.names) - len(frozen)
    out.sum().backward()
    assert model.backbone.layer1[0].conv1.origin.grad is None
    assert model.backbone.layer2[0].conv1.origin.grad is not None


def test_a_kernel_no_rank_used_keeps_its_gradients(one_rank_group):
    from orepa_mm.cnn import OREPAConv2d
    model = _small_resnet()
    model.unused = OREPAConv2d(4, 4, 3)
    wrapper = _wrap(model)
    for _ in range(2):
        wrapper(torch.randn(2, 3, 32, 32)).sum().backward()
        assert model.unused.origin.grad is None
        assert model.backbone.layer1[0].conv1.origin.grad is not None


@pytest.mark.parametrize('use_reentrant', [False, True])
def test_activation_checkpointing_gives_the_bare_gradients(one_rank_group, use_reentrant,
                                                           monkeypatch):
    import torch.utils.checkpoint as cp
    checkpoint = cp.checkpoint
    monkeypatch.setattr(
        cp, 'checkpoint',
        lambda fn, *args, **kwargs: checkpoint(fn, *args, use_reentrant=use_reentrant, **kwargs))
    bare = _small_resnet(with_cp=True)
    model = copy.deepcopy(bare)
    wrapper = _wrap(model)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)  # reentrant checkpoints need it
    bare(x).square().mean().backward()
    wrapper(x).square().mean().backward()
    _assert_same_grads(bare, model)


def test_copies_of_the_wrapped_model_are_plain_models(one_rank_group):
    model = _small_resnet()
    wrapper = _wrap(model)
    twin = copy.deepcopy(model)  # an EMA copy, a deploy copy
    x = torch.randn(2, 3, 32, 32)
    twin(x).sum().backward()  # plain autograd: the branch grads directly
    assert twin.backbone.layer1[0].conv1.origin.grad is not None
    assert wrapper._kernel_reducer.round is None
    with torch.no_grad():
        assert torch.equal(twin(x), wrapper(x))


def test_two_forwards_and_a_direct_module_call_then_one_backward(one_rank_group):
    """As with DDP's hooks, a use of the module between the wrapper's forward and backward
    is reduced too (it shares the kernel proxies), not left with local gradients."""
    bare = _small_resnet()
    model = copy.deepcopy(bare)
    wrapper = _wrap(model)
    x1, x2, x3 = (torch.randn(2, 3, 32, 32) for _ in range(3))
    (bare(x1).square().mean() + bare(x2).abs().mean() + bare.backbone(x3)[-1].mean()).backward()
    (wrapper(x1).square().mean() + wrapper(x2).abs().mean() +
     model.backbone(x3)[-1].mean()).backward()
    _assert_same_grads(bare, model)
    assert wrapper._kernel_reducer.round is None


def test_refusals_are_one_sentence(one_rank_group):
    with pytest.raises(ValueError, match='detect_anomalous_params'):
        _wrap(_small_resnet(), detect_anomalous_params=True)
    with pytest.raises(ValueError, match='mixed_precision'):
        _wrap(_small_resnet(), mixed_precision=object())
    wrapper = _wrap(_small_resnet())
    with pytest.raises(NotImplementedError, match='join'):
        wrapper.join()
    with pytest.raises(NotImplementedError, match='communication hooks'):
        wrapper.register_comm_hook(None, None)
    loss = wrapper(torch.randn(2, 3, 32, 32)).square().mean()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='second backward'):
        loss.backward()
    loss = wrapper(torch.randn(2, 3, 32, 32)).square().mean()
    with pytest.raises(RuntimeError, match='create_graph'):
        loss.backward(create_graph=True)


def test_builds_from_the_registry_and_runs_mmengine_train_step(one_rank_group):
    """MODEL_WRAPPERS.build(dict(type=..., module=model)), then mmengine's train_step."""
    from mmengine.optim import OptimWrapper
    from mmengine.registry import MODEL_WRAPPERS, DefaultScope
    from mmpretrain.models import ImageClassifier

    import orepa_mm  # noqa: F401

    # The head builds its loss by bare name: it needs mmpretrain's scope, whatever scope an
    # earlier test left (this test used to pass only after another had set it).
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = ImageClassifier(
            backbone=dict(type='mmpretrain.OREPAResNet', depth=18, base_channels=16),
            neck=dict(type='mmpretrain.GlobalAveragePooling'),
            head=dict(type='mmpretrain.LinearClsHead', num_classes=4, in_channels=128),
            data_preprocessor=dict(type='mmpretrain.ClsDataPreprocessor'))
    wrapper = MODEL_WRAPPERS.build(dict(type='OREPADistributedDataParallel', module=model))
    from mmpretrain.structures import DataSample
    data = dict(
        inputs=[torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)] * 2,
        data_samples=[DataSample().set_gt_label(1),
                      DataSample().set_gt_label(2)])
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01))
    before = model.backbone.layer1[0].conv1.origin.detach().clone()
    log = wrapper.train_step(data, optim)
    assert torch.isfinite(log['loss'])
    assert not torch.equal(before, model.backbone.layer1[0].conv1.origin)


@pytest.mark.slow
def test_torch_compile_runs_the_wrapper_forward_eagerly(one_rank_group):
    bare = _small_resnet()
    model = copy.deepcopy(bare)
    compiled = torch.compile(_wrap(model))
    x = torch.randn(2, 3, 32, 32)
    bare(x).square().mean().backward()
    compiled(x).square().mean().backward()
    _assert_same_grads(bare, model)


# -- bytes: tools/benchmark_ddp.py on a small model (slow) ---------------------------------------
@pytest.mark.slow
def test_bytes_per_step_are_the_plain_models(tmp_path):
    out = tmp_path / 'bench.json'
    cmd = [
        sys.executable,
        os.path.join(ROOT, 'tools', 'benchmark_ddp.py'), '--models', 'resnet18', '--width', '16',
        '--input-size', '32', '--batch-size', '2', '--steps', '2', '--warmup', '1', '--json',
        str(out)
    ]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {r['variant']: r for r in json.loads(out.read_text())['results']}
    plain, stock, ours = rows['plain + DDP'], rows['OREPA + DDP'], rows['OREPA + OREPA-DDP']
    # what the sockets carried (per rank, per step) vs. the gradient bytes of each model
    for row in (plain, stock, ours):
        assert row['bytes_per_step'] >= row['gradient_bytes'], row
    assert abs(ours['bytes_per_step'] / plain['bytes_per_step'] - 1) <= 0.05, (ours, plain)
    assert stock['bytes_per_step'] > 2 * plain['bytes_per_step'], (stock, plain)


# -- tools/train.py with the wrapper (slow) -------------------------------------------------------
@pytest.mark.slow
def test_train_py_with_bf16_accumulation_and_resume(tmp_path):
    """tools/train.py --launcher pytorch with model_wrapper_cfg=OREPADistributedDataParallel:
    --amp (bf16 on CPU), accumulative_counts=2, then --resume from epoch 1. (SyncBN with the
    wrapper: the two-process scenarios; SyncBN together with CPU bf16 fails in CPUSyncBatchNorm
    whatever the wrapper.)"""
    from tests.test_distributed import losses, rank_states, train, write_config
    from demo_dataset import generate_demo_dataset
    data = tmp_path / 'data'
    generate_demo_dataset(str(data), num_train=8, num_val=2, img_size=128, seed=1)
    extra = ("model_wrapper_cfg = dict(type='OREPADistributedDataParallel')\n"
             "optim_wrapper = dict(accumulative_counts=2)")
    config = write_config(tmp_path, str(data) + '/', epochs=2, extra=extra)
    result = train(config, tmp_path / 'straight', '--amp', nproc=2)
    assert 'BF16OptimWrapper' in result.stdout + result.stderr
    r0, r1 = rank_states(tmp_path, 2)
    assert r0['wrapper'] == 'OREPADistributedDataParallel'
    for name, value in r0['params'].items():
        assert torch.equal(value, r1['params'][name]), name
    reference = losses(tmp_path / 'straight')
    assert sorted(reference) == [1, 2, 3, 4]

    resumed = tmp_path / 'resumed'
    resumed.mkdir()
    checkpoint = tmp_path / 'straight' / 'epoch_1.pth'
    train(config, resumed, '--amp', '--resume', str(checkpoint), nproc=2)
    after = losses(resumed)
    assert sorted(after) == [3, 4]
    for iteration, value in after.items():
        assert abs(value - reference[iteration]) <= 1e-5 * max(1.0, abs(reference[iteration]))
    s0, s1 = rank_states(tmp_path, 2)
    for name, value in s0['params'].items():
        assert torch.equal(value, s1['params'][name]), name
        assert torch.allclose(value, r0['params'][name], rtol=1e-4, atol=1e-6), name
