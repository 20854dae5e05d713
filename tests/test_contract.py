"""The re-param layer contract, property-tested over every layer type (issue 20).

*A re-param layer is a pure function of its parameters and buffers; every read of ``weight`` is
that function's value now; every write either lands exactly or raises one sentence; loading a
stock, OREPA or deployed state dict gives exactly the function those tensors describe; no
wrapper changes a gradient.*

The matrix: layer type (OREPA k x k, 1 x 1, large kernel, the OREPA-VGG conv, DBB) x bias x
groups x stride x dilation, drawn by hypothesis (derandomized, so every run checks the same
examples), in float64 so that every comparison is to ~1e-10 relative: a failure is a wrong
function, never rounding. The oracles are the stock ``nn.Conv2d`` where one exists, else the
kernel a fresh deep copy generates (a copy has no state a stale path could reuse).
"""
import copy
import re
import warnings
from collections import OrderedDict
from typing import NamedTuple, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch.nn.utils import parametrizations, parametrize, prune

from orepa_mm.cnn import (DBBConv2d, OREPAConv1x1, OREPAConv2d, OREPALargeConv2d,
                          build_orepa_vgg_conv)
from tests.numerics import randomise, rel_err

pytestmark = pytest.mark.usefixtures('one_thread')

#: float64 throughout: anything above this is a different function, not rounding.
TOL = 1e-10
OREPA_KINDS = ('kxk', '1x1', 'large', 'vgg')
KINDS = OREPA_KINDS + ('dbb', )


def _settings(max_examples: int):
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow])


class Cfg(NamedTuple):
    """One point of the matrix."""
    kind: str
    bias: bool
    groups: int = 1
    stride: int = 1
    dilation: int = 1
    k: int = 3
    channels: Tuple[int, int] = (4, 6)


@st.composite
def configs(draw, kinds=KINDS):
    """A layer type and the geometry it supports (groups for k x k / VGG / DBB, dilation for
    the k x k types; the 1 x 1 and large blocks are published for groups = 1)."""
    kind = draw(st.sampled_from(kinds))
    grouped = kind in ('kxk', 'vgg', 'dbb')
    return Cfg(
        kind=kind,
        bias=draw(st.booleans()),
        groups=draw(st.sampled_from((1, 2))) if grouped else 1,
        stride=draw(st.sampled_from((1, 2))),
        dilation=draw(st.sampled_from((1, 2))) if kind in ('kxk', 'vgg') else 1,
        k={
            'kxk': draw(st.sampled_from((3, 5))),
            '1x1': 1,
            'large': 7
        }.get(kind, 3),
        # 1 x 1: both shapes of its identity-initialised pair (O > I and O <= I).
        channels=draw(st.sampled_from(((4, 6), (6, 4)))) if kind == '1x1' else (4, 6))


def build(cfg: Cfg, seed: int = 0) -> nn.Module:
    """The layer of ``cfg`` in float64, every parameter and BN statistic random."""
    i, o = cfg.channels
    geometry = dict(stride=cfg.stride, bias=cfg.bias)
    if cfg.kind == 'kxk':
        layer = OREPAConv2d(i, o, cfg.k, dilation=cfg.dilation, groups=cfg.groups, **geometry)
    elif cfg.kind == 'vgg':
        layer = build_orepa_vgg_conv(i, o, 3, dilation=cfg.dilation, groups=cfg.groups, **geometry)
    elif cfg.kind == '1x1':
        layer = OREPAConv1x1(i, o, **geometry)
    elif cfg.kind == 'large':
        layer = OREPALargeConv2d(i, o, 7, **geometry)
    else:
        layer = DBBConv2d(i, o, 3, groups=cfg.groups, **geometry)
    return randomise(layer.double(), seed)


def inputs(cfg: Cfg, seed: int = 0, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(batch, cfg.channels[0], 11, 11, generator=g, dtype=torch.float64)


def conv_with(layer: nn.Module, x: torch.Tensor, kernel, bias) -> torch.Tensor:
    """``layer``'s geometry applied with an explicit kernel and bias."""
    return F.conv2d(x, kernel, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def stock_conv(layer: nn.Module, seed: int = 0) -> nn.Conv2d:
    """An ``nn.Conv2d`` of ``layer``'s geometry: random weight, bias 1..O (if any)."""
    conv = nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
        bias=layer.bias is not None).double()
    g = torch.Generator().manual_seed(200 + seed)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        if conv.bias is not None:
            conv.bias.copy_(torch.arange(1, conv.out_channels + 1))
    return conv


def fresh_kernel_bias(layer: nn.Module):
    """The function's value now, from a deep copy (in eval: DBB folds its running statistics;
    the OREPA layers' kernels do not depend on the mode)."""
    reference = copy.deepcopy(layer).eval()
    with torch.no_grad():
        kernel, bias = reference.equivalent_kernel_bias()
    return kernel.detach(), None if bias is None else bias.detach()


def kernel_now(layer: nn.Module) -> torch.Tensor:
    """``layer.weight`` as a plain contiguous tensor, like a conv's weight (read under no_grad).

    Contiguous, so that a write test's expected value is what the op makes of a conv weight
    (``reshape`` of a non-contiguous tensor copies, and a write through it is lost).
    """
    with torch.no_grad():
        weight = layer.weight.detach()
        return weight.clone(memory_format=torch.contiguous_format).as_subclass(torch.Tensor)


def state_snapshot(module: nn.Module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(module: nn.Module, snapshot) -> None:
    now = module.state_dict()
    assert list(now) == list(snapshot)
    for key, value in snapshot.items():
        assert torch.equal(now[key], value), key


def one_sentence(message: str) -> bool:
    """No line break, and no second sentence (a full stop followed by a capital letter)."""
    return '\n' not in message and re.search(r'[.!?]\s+[A-Z]', message) is None


# -- 1-3: loading stock, own and deployed state dicts ----------------------------------------
@given(cfg=configs(OREPA_KINDS))
@_settings(16)
@example(cfg=Cfg('kxk', True)).via('issue 20 item 1: the bias was zeroed')
@example(cfg=Cfg('1x1', True, k=1)).via('issue 20 item 1')
@example(cfg=Cfg('large', True, k=7)).via('issue 20 item 1')
def test_stock_state_dict_gives_the_stock_conv(cfg):
    layer = build(cfg, seed=1)
    conv = stock_conv(layer)
    layer.load_state_dict(conv.state_dict(), strict=True)
    x = inputs(cfg)
    assert torch.equal(kernel_now(layer), conv.weight.detach())
    if cfg.bias:
        assert torch.equal(layer.bias.detach(), conv.bias.detach())
    with torch.no_grad():
        expected = conv(x)
    for mode in (True, False):
        layer.train(mode)
        assert rel_err(layer(x), expected) <= TOL


@pytest.mark.parametrize('bias', [False, True])
def test_dbb_refuses_a_stock_state_dict(bias):
    """DBB has no stock loading (every branch has its own BN): a strict load of a stock conv's
    state dict is an error naming the stock ``weight``, never a silent partial load."""
    layer = build(Cfg('dbb', bias))
    conv = stock_conv(layer)
    with pytest.raises((RuntimeError, TypeError, ValueError), match='weight'):
        layer.load_state_dict(conv.state_dict(), strict=True)


@given(cfg=configs())
@_settings(16)
def test_own_state_dict_round_trip(cfg):
    layer = build(cfg, seed=1)
    fresh = build(cfg, seed=2)
    fresh.load_state_dict(layer.state_dict(), strict=True)
    layer.eval()
    fresh.eval()
    x = inputs(cfg)
    assert torch.equal(kernel_now(fresh), kernel_now(layer))
    with torch.no_grad():
        assert rel_err(fresh(x), layer(x)) <= TOL


@given(cfg=configs())
@_settings(16)
def test_deployed_conv_and_back(cfg):
    """``to_conv2d()`` is the layer's function; its state dict loaded into a fresh OREPA layer
    is again exactly that conv (DBB cannot take a stock state dict, see above)."""
    layer = build(cfg, seed=1).eval()
    x = inputs(cfg)
    conv = layer.to_conv2d()
    assert type(conv) is nn.Conv2d and conv.weight.dtype == torch.float64
    assert not conv.training
    with torch.no_grad():
        deployed = conv(x)
        assert rel_err(deployed, layer(x)) <= TOL
    if cfg.kind == 'dbb':
        return
    fresh = build(cfg, seed=3)
    fresh.load_state_dict(conv.state_dict(), strict=True)
    assert torch.equal(kernel_now(fresh), conv.weight.detach())
    for mode in (True, False):
        fresh.train(mode)
        assert rel_err(fresh(x), deployed) <= TOL


@given(cfg=configs(), train=st.booleans())
@_settings(12)
def test_weight_reads_like_a_conv_weight(cfg, train):
    """What code written for ``nn.Conv2d.weight`` relies on: the shape, a contiguous tensor
    (``weight.view(O, -1)`` in fusion code), plain results of computations, autograd only when
    a gradient can be taken."""
    layer = build(cfg, seed=1).train(train)
    i, o = cfg.channels
    weight = layer.weight
    assert weight.shape == (o, i // cfg.groups, cfg.k, cfg.k)
    assert weight.dtype == torch.float64 and weight.is_contiguous()
    assert type(weight * 2) is torch.Tensor  # views may stay tracked (writes through them land)
    assert torch.equal(weight.view(o, -1), weight.detach().reshape(o, -1))
    assert rel_err(weight, fresh_kernel_bias(layer)[0]) <= TOL
    assert weight.requires_grad
    with torch.no_grad():
        assert not layer.weight.requires_grad


# -- 4: every write form lands exactly -------------------------------------------------------
def _mask(shape):
    g = torch.Generator().manual_seed(7)
    return torch.rand(shape, generator=g) < 0.5


def _value(shape, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


#: name -> (the write, given the layer and one handle ``w = layer.weight``; the same op on a
#: plain tensor ``t``, or None: the value the handle holds afterwards). ``v`` is a random
#: kernel, ``m`` a boolean mask of its shape.
WRITES = {
    'copy_': (lambda layer, w, v, m: w.copy_(v), lambda t, v, m: t.copy_(v)),
    'setitem':
    (lambda layer, w, v, m: w.__setitem__(0, 0.0), lambda t, v, m: t.__setitem__(0, 0.0)),
    'index_zero_': (lambda layer, w, v, m: w[0].zero_(), lambda t, v, m: t[0].zero_()),
    'detach_zero_': (lambda layer, w, v, m: w.detach().zero_(), lambda t, v, m: t.detach().zero_()),
    'view_mul_':
    (lambda layer, w, v, m: w.view(-1).mul_(0.5), lambda t, v, m: t.view(-1).mul_(0.5)),
    'reshape_fill_': (lambda layer, w, v, m: w.reshape(w.shape[0], -1).fill_(1.0),
                      lambda t, v, m: t.reshape(t.shape[0], -1).fill_(1.0)),
    'flatten_copy_': (lambda layer, w, v, m: w.flatten(1).copy_(v.flatten(1)),
                      lambda t, v, m: t.flatten(1).copy_(v.flatten(1))),
    'permute_index_zero_': (lambda layer, w, v, m: w.permute(1, 0, 2, 3)[0].zero_(),
                            lambda t, v, m: t.permute(1, 0, 2, 3)[0].zero_()),
    'foreach_mul_': (lambda layer, w, v, m: torch._foreach_mul_([w], 0.5),
                     lambda t, v, m: torch._foreach_mul_([t], 0.5)),
    'fill_': (lambda layer, w, v, m: w.fill_(2.0), lambda t, v, m: t.fill_(2.0)),
    'masked_fill_':
    (lambda layer, w, v, m: w.masked_fill_(m, 0.0), lambda t, v, m: t.masked_fill_(m, 0.0)),
    'data_setitem':
    (lambda layer, w, v, m: w.data.__setitem__(0, 0.0), lambda t, v, m: t.__setitem__(0, 0.0)),
    'data_assign': (lambda layer, w, v, m: setattr(w, 'data', v), lambda t, v, m: t.copy_(v)),
    'layer_assign': (lambda layer, w, v, m: setattr(layer, 'weight', v),
                     lambda t, v, m: t.copy_(v)),
    'mul_': (lambda layer, w, v, m: w.mul_(2), lambda t, v, m: t.mul_(2)),
    'add_out': (lambda layer, w, v, m: torch.add(v, 1.0, out=w),
                lambda t, v, m: torch.add(v, 1.0, out=t)),
    'kaiming_normal_':
    (lambda layer, w, v, m: nn.init.kaiming_normal_(w, generator=torch.Generator().manual_seed(5)),
     None),
}


def _write(layer, name, value, mask):
    """Apply write ``name`` through a fresh handle; returns the handle (its value afterwards)."""
    handle = layer.weight
    WRITES[name][0](layer, handle, value, mask)
    return handle


@pytest.mark.parametrize('name', sorted(WRITES))
@given(cfg=configs(OREPA_KINDS), train=st.booleans(), no_grad=st.booleans())
@_settings(8)
def test_every_write_form_lands_exactly(name, cfg, train, no_grad):
    """``layer.weight`` afterwards is what the same op makes of a plain tensor holding the kernel
    (torch.equal), and the forward is a conv with it. ``out=`` with autograd on is refused by
    torch itself (for a stock conv too); then the kernel must be unchanged."""
    layer = build(cfg, seed=1).train(train)
    x = inputs(cfg)
    before = kernel_now(layer)
    value, mask = _value(before.shape), _mask(before.shape)
    with torch.set_grad_enabled(not no_grad):
        handle = layer.weight
        if name == 'add_out' and handle.requires_grad:
            with pytest.raises(RuntimeError, match='out='):
                WRITES[name][0](layer, handle, value, mask)
            expected = before
        else:
            WRITES[name][0](layer, handle, value, mask)
            plain_op = WRITES[name][1]
            if plain_op is None:
                expected = handle.detach().clone().as_subclass(torch.Tensor)
                assert not torch.equal(expected, before)
            else:
                expected = before.clone()
                plain_op(expected, value, mask)
    assert torch.equal(kernel_now(layer), expected)
    with torch.no_grad():
        assert rel_err(layer(x), conv_with(layer, x, expected, layer.bias)) <= TOL


@pytest.mark.parametrize('name', sorted(WRITES))
@pytest.mark.parametrize('train', [True, False])
def test_every_write_into_dbb_raises_one_sentence(name, train):
    """A DBB kernel cannot be written (its branches have their own BNs): every form raises
    TypeError, one sentence, and leaves the layer as it was."""
    layer = build(Cfg('dbb', True, groups=2), seed=1).train(train)
    before, state = kernel_now(layer), state_snapshot(layer)
    value, mask = _value(before.shape), _mask(before.shape)
    with torch.no_grad(), pytest.raises(TypeError) as info:
        _write(layer, name, value, mask)
    assert one_sentence(str(info.value)), str(info.value)
    assert_same_state(layer, state)
    assert torch.equal(kernel_now(layer), before)


@pytest.mark.parametrize('how', ['data_assign', 'layer_assign'])
def test_a_write_in_another_dtype_lands_exactly_or_raises(how):
    """``weight.data = v`` / ``weight = v`` with a float64 ``v`` into a float32 layer (what
    mmpretrain's RepVGGBlock.switch_to_deploy does to a float64 model: its fused conv is built
    in the default dtype). A stock conv takes ``v`` as it is; a silent cast to float32 would
    be a write that does not land."""
    for kind in OREPA_KINDS:
        layer = build(Cfg(kind, False, k={'1x1': 1, 'large': 7}.get(kind, 3)), seed=1).float()
        value = _value(kernel_now(layer).shape) / 3  # not representable in float32
        try:
            WRITES[how][0](layer, layer.weight, value, None)
        except (TypeError, ValueError) as error:
            assert one_sentence(str(error)), str(error)
            continue
        assert torch.equal(kernel_now(layer).to(value.dtype), value), kind


# -- 5: a handle read before the parameters changed ------------------------------------------
def _sgd_step(layer, cfg, x):
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().mean().backward()
    opt.step()


def _load_other_state(layer, cfg, x):
    layer.load_state_dict(build(cfg, seed=9).state_dict())


def _data_write(layer, cfg, x):
    for p in layer.parameters():
        p.data.mul_(0.9)  # an EMA / mean-teacher update: no version bump


STALE_EVENTS = dict(sgd_step=_sgd_step, load_state_dict=_load_other_state, data_write=_data_write)


@pytest.mark.parametrize('event', sorted(STALE_EVENTS))
@given(cfg=configs(OREPA_KINDS), no_grad=st.booleans())
@_settings(6)
def test_write_through_a_stale_handle_raises(event, cfg, no_grad):
    """``w = layer.weight; <parameters change>; w[0] = 0`` would load the old kernel back (an
    optimizer step rolled back): it must raise one sentence telling to read ``weight`` again,
    and leave the layer as the change made it."""
    layer = build(cfg, seed=1).train()
    x = inputs(cfg)
    handle = layer.weight
    STALE_EVENTS[event](layer, cfg, x)
    after, state = kernel_now(layer), state_snapshot(layer)
    assert not torch.equal(after, handle.detach().as_subclass(torch.Tensor))
    with torch.set_grad_enabled(not no_grad), pytest.raises((ValueError, RuntimeError)) as info:
        handle[0] = 0.0
    message = str(info.value)
    assert one_sentence(message) and 'weight' in message and 'again' in message, message
    assert_same_state(layer, state)
    assert torch.equal(kernel_now(layer), after)


# -- 6: mode switches in any order never give a stale kernel ---------------------------------
OPS = ('train', 'eval', 'freeze', 'unfreeze', 'read_weight_no_grad', 'forward_no_grad',
       'forward_inference_mode', 'forward_backward_input_grad', 'param_data_mul',
       'param_add_no_grad', 'buffer_mul', 'load_state_dict', 'to_conv2d')


def _apply(layer, cfg, op, index, x):
    params = list(layer.parameters())
    buffers = [b for b in layer.buffers() if b.is_floating_point()]
    if op == 'train':
        layer.train()
    elif op == 'eval':
        layer.eval()
    elif op in ('freeze', 'unfreeze'):
        layer.requires_grad_(op == 'unfreeze')
    elif op == 'read_weight_no_grad':
        with torch.no_grad():
            _ = layer.weight  # what fusion code does (e.g. mmcv's fuse_conv_bn)
    elif op == 'forward_no_grad':
        with torch.no_grad():
            layer(x)
    elif op == 'forward_inference_mode':
        with torch.inference_mode():
            layer(x)
    elif op == 'forward_backward_input_grad':
        x = x.clone().requires_grad_()
        layer(x).square().mean().backward()
        assert x.grad is not None
    elif op == 'param_data_mul':
        params[index % len(params)].data.mul_(0.9)
    elif op == 'param_add_no_grad':
        with torch.no_grad():
            params[index % len(params)].add_(0.01)
    elif op == 'buffer_mul' and buffers:
        # DBB: a BN statistic (e.g. origin_bn.running_var.mul_(4)); OREPA: a fixed pattern.
        buffers[index % len(buffers)].mul_(4.0)
    elif op == 'load_state_dict':
        layer.load_state_dict(build(cfg, seed=index).state_dict())
    elif op == 'to_conv2d':
        conv = layer.to_conv2d()  # the bake reads the function, it changes nothing
        assert conv.training == layer.training
        assert rel_err(conv.weight, fresh_kernel_bias(layer)[0]) <= TOL


def _assert_not_stale(layer, x):
    kernel, bias = fresh_kernel_bias(layer)
    assert rel_err(kernel_now(layer), kernel) <= TOL
    assert rel_err(layer.weight.detach(), kernel) <= TOL  # read with autograd on
    if isinstance(layer, DBBConv2d) and layer.training:
        return  # a training DBB forward uses batch statistics: no single conv to compare
    with torch.no_grad():
        assert rel_err(layer(x), conv_with(layer, x, kernel, bias)) <= TOL


@given(
    cfg=configs(),
    ops=st.lists(
        st.tuples(st.sampled_from(OPS), st.integers(0, 63), st.booleans()), min_size=1, max_size=8))
@_settings(30)
@example(
    cfg=Cfg('kxk', False),
    ops=[('freeze', 0, False), ('eval', 0, False), ('forward_inference_mode', 0, False),
         ('forward_backward_input_grad', 0, True)
         ]).via('issue 20 item 9: an inference tensor saved for backward')
@example(
    cfg=Cfg('dbb', False),
    ops=[('eval', 0, False), ('read_weight_no_grad', 0, False),
         ('buffer_mul', 2, True)]).via('issue 20 item 5: DBB kernel stale after a BN buffer change')
@example(
    cfg=Cfg('1x1', True, k=1),
    ops=[('eval', 0, True), ('forward_no_grad', 0, False),
         ('param_data_mul', 0, True)]).via('a .data write after a reuse')
def test_mode_switches_never_give_a_stale_kernel(cfg, ops):
    """Any sequence of mode switches, forwards and in-place updates: ``weight`` and the forward
    are the function of the current parameters and buffers. Whether the check (itself a read
    and a forward) runs after a step is drawn too, since a read can hide what a later step
    would have met; it always runs after the last one."""
    layer = build(cfg, seed=1)
    x = inputs(cfg)
    for step, (op, index, check) in enumerate(ops):
        _apply(layer, cfg, op, index, x)
        if check or step == len(ops) - 1:
            _assert_not_stale(layer, x)


# -- 7: weight re-parametrizations are refused loudly ----------------------------------------
REFUSALS = {
    'utils.weight_norm':
    lambda layer: nn.utils.weight_norm(layer),
    'utils.spectral_norm':
    lambda layer: nn.utils.spectral_norm(layer),
    'parametrizations.weight_norm':
    lambda layer: parametrizations.weight_norm(layer),
    'parametrizations.spectral_norm':
    lambda layer: parametrizations.spectral_norm(layer),
    'register_parametrization':
    lambda layer: parametrize.register_parametrization(layer, 'weight', nn.Identity()),
    'prune.l1_unstructured':
    lambda layer: prune.l1_unstructured(layer, 'weight', 0.3),
    'prune.random_unstructured':
    lambda layer: prune.random_unstructured(layer, 'weight', 0.3),
}


@pytest.mark.parametrize('name', sorted(REFUSALS))
@given(cfg=configs())
@_settings(4)
def test_weight_reparametrizations_are_refused_in_one_sentence(name, cfg):
    layer = build(cfg, seed=1).eval()
    x = inputs(cfg)
    with torch.no_grad():
        before = layer(x)
    state, layer_type = state_snapshot(layer), type(layer)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # the deprecated nn.utils versions
        with pytest.raises((TypeError, ValueError)) as info:
            REFUSALS[name](layer)
    message = str(info.value)
    assert one_sentence(message), message
    assert re.search(r're-?parameteri[sz]e', message, re.IGNORECASE), message
    assert type(layer) is layer_type and 'parametrizations' not in layer._modules
    assert not layer._forward_pre_hooks and not layer._forward_hooks
    assert_same_state(layer, state)
    with torch.no_grad():
        assert torch.equal(layer(x), before)


@pytest.mark.parametrize('kind', KINDS)
def test_torch_introspection_of_a_layer_is_not_a_refusal(kind):
    """Asking whether a layer is parametrized is not parametrizing it: torch and tools ask every
    module (``torch.ao.quantization`` fusion calls ``type_before_parametrizations``)."""
    layer = build(Cfg(kind, False, k={'1x1': 1, 'large': 7}.get(kind, 3)))
    assert parametrize.is_parametrized(layer) is False
    assert parametrize.is_parametrized(layer, 'weight') is False
    assert parametrize.type_before_parametrizations(layer) is type(layer)


# -- 8: DataParallel replicas ----------------------------------------------------------------
def cpu_replica(network: nn.Module) -> nn.Module:
    """What ``torch.nn.parallel.replicate`` builds for one device, on the CPU (replicate itself
    refuses CPU devices): ``_replicate_for_data_parallel`` copies without registered
    parameters, each parameter set as a plain non-leaf tensor that differentiates back to the
    original (replicate's Broadcast), buffers copied."""
    modules = list(network.modules())
    copies = {id(m): m._replicate_for_data_parallel() for m in modules}
    for module in modules:
        replica = copies[id(module)]
        replica._former_parameters = OrderedDict()
        for key, child in module._modules.items():
            if child is None:
                replica._modules[key] = None
            else:
                setattr(replica, key, copies[id(child)])
        for key, param in module._parameters.items():
            if param is None:
                replica._parameters[key] = None
            else:
                tensor = param.clone()
                setattr(replica, key, tensor)
                replica._former_parameters[key] = tensor
        for key, buf in module._buffers.items():
            setattr(replica, key, None if buf is None else buf.detach().clone())
    return copies[id(network)]


@given(cfg=configs())
@_settings(10)
def test_data_parallel_replica_is_the_layer(cfg):
    """nn.DataParallel's replicas compute the layer's function, and the gradient reaching the
    original parameters through a replica is the one of the layer itself."""
    layer = build(cfg, seed=1)
    x = inputs(cfg)
    reference = copy.deepcopy(layer)
    layer.eval()
    reference.eval()
    with torch.no_grad():
        expected = reference(x)
        layer(x)  # whatever a forward leaves behind, the replica must not be misled by it
        assert rel_err(cpu_replica(layer)(x), expected) <= TOL
    layer.train()
    reference.train()
    out, expected = cpu_replica(layer)(x), reference(x)  # one forward each (DBB's BN stats)
    assert rel_err(out, expected) <= TOL
    out.square().mean().backward()
    expected.square().mean().backward()
    for (name, p), q in zip(layer.named_parameters(), reference.parameters()):
        assert p.grad is not None, name
        assert rel_err(p.grad, q.grad) <= TOL, name


# -- 9: tracing and FLOP counting of an unconverted layer / model ---------------------------
@given(cfg=configs(), train=st.booleans(), double=st.booleans())
@_settings(12)
@example(cfg=Cfg('kxk', False), train=False, double=False).via('issue 20 item 8: oneDNN gemm')
def test_jit_trace_of_an_unconverted_layer(cfg, train, double):
    """torch.jit.trace (what FLOP counters run) of a layer that generates its kernel, in float64
    and in float32 (CPU float32 kernel generation took a private oneDNN route that the tracer
    could not record)."""
    layer = build(cfg, seed=1).train(train and cfg.kind != 'dbb')
    x = inputs(cfg)
    tol = TOL
    if not double:
        layer, x, tol = layer.float(), x.float(), 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.trace is deprecated
        traced = torch.jit.trace(layer, x, check_trace=False)
    with torch.no_grad():
        assert rel_err(traced(x), layer(x)) <= tol


def _flops(model, batch):
    from mmengine.analysis import get_model_complexity_info
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return get_model_complexity_info(
        model, inputs=(x, ), show_table=False, show_arch=False)['flops']


def test_flops_of_an_unconverted_resnet_are_the_deployed_ones_per_image():
    """mmdet's get_flops.py / mmengine's get_model_complexity_info on a training config (float32,
    eval) works, and every image costs exactly what it costs the deployed model: the counted
    difference is the kernel generation, once per forward whatever the batch (the train-time
    vs deployed FLOPs of tools/demo.py's table)."""
    import orepa_mm
    from orepa_mm.models.backbones.for_mmdet import OREPAResNet
    torch.manual_seed(0)
    model = OREPAResNet(depth=18, base_channels=8, stem_channels=8)
    model.eval()
    deployed = orepa_mm.reparameterize_model(copy.deepcopy(model))
    assert orepa_mm.count_reparameterizable(deployed) == 0
    one, two = _flops(model, 1), _flops(model, 2)
    deployed_one, deployed_two = _flops(deployed, 1), _flops(deployed, 2)
    assert deployed_one > 0 and one >= deployed_one
    assert two - one == deployed_two - deployed_one
