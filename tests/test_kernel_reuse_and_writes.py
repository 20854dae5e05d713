"""The generated kernel as users touch it: never stale, `.data` updates, writes.

* no gradient needed (frozen stages, eval, teachers): the kernel is generated without autograd
  from the current values, so every update a user can make, including writes through
  ``.data`` that leave ``_version`` alone, is seen by the next forward;
* ``weight`` writes (``=``, ``.data =``, in-place, ``nn.init``) set the kernel exactly, or raise;
* a stock weight loaded with ``assign=True`` leaves trainable, non-aliased scales.
"""
import copy

import pytest
import torch
import torch.nn as nn

import orepa_mm
from orepa_mm.cnn import DBBConv2d, OREPAConv1x1, OREPAConv2d, OREPALargeConv2d
from tests.numerics import random_bn_statistics, randomise, rel_err

LAYERS = {
    'kxk': lambda: OREPAConv2d(4, 6, 3),
    '1x1': lambda: OREPAConv1x1(4, 6),
    'large': lambda: OREPALargeConv2d(4, 6, 7, padding=3),
}


# -- never stale ---------------------------------------------------------------------------
@pytest.mark.parametrize('name', sorted(LAYERS))
def test_eval_forward_sees_data_writes(name):
    """A teacher kept in eval mode, updated through .data (mmdet's MeanTeacherHook style)."""
    layer = randomise(LAYERS[name]()).eval()
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        before = layer(x)
        assert torch.equal(layer(x), before)  # deterministic: same parameters, same output
        versions = [p._version for p in layer.parameters()]
        for p in layer.parameters():
            p.data.mul_(0.9)  # EMA momentum step: no version bump
        assert [p._version for p in layer.parameters()] == versions
        after = layer(x)
        fresh = copy.deepcopy(layer)
        assert not torch.allclose(after, before)
        assert torch.equal(after, fresh(x))


def test_mean_teacher_hook_update_reaches_an_eval_teacher():
    """mmdet's MeanTeacherHook.momentum_update: dst.data.mul_(1 - m).add_(src.data, alpha=m)."""
    student = randomise(nn.Sequential(OREPAConv2d(3, 4, 3), OREPAConv1x1(4, 4)), seed=1)
    teacher = randomise(copy.deepcopy(student), seed=2).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        teacher(x)
    for src, dst in zip(student.parameters(), teacher.parameters()):
        dst.data.mul_(1 - 0.5).add_(src.data, alpha=0.5)
    reference = copy.deepcopy(teacher)
    with torch.no_grad():
        assert torch.equal(teacher(x), reference(x))


def test_frozen_layer_generates_without_autograd_and_sees_every_change():
    layer = randomise(OREPAConv2d(4, 6, 3))
    for p in layer.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    first = layer.kernel()
    assert not first.requires_grad and first.grad_fn is None
    layer(x).sum().backward()  # input gradients still flow through the frozen kernel
    assert x.grad is not None
    layer.origin.data.add_(1.0)  # changed through .data
    second = layer.kernel()
    assert not torch.equal(second, first) and torch.equal(second, layer.generate_kernel())
    layer.branch_scales.requires_grad_(True)  # unfrozen: differentiable again
    third = layer.kernel()
    assert third.requires_grad
    third.sum().backward()
    assert layer.branch_scales.grad is not None


def test_frozen_stage_in_a_resnet_matches_fresh_generation():
    from mmdet.models.backbones import ResNet
    torch.manual_seed(0)
    model = ResNet(depth=18, frozen_stages=1, conv_cfg=dict(type='OREPA'))
    model.train()
    frozen = [m for m in model.layer1.modules() if hasattr(m, 'kernel')]
    assert frozen and all(not p.requires_grad for m in frozen for p in m.parameters())
    x = torch.randn(1, 3, 32, 32)
    model(x)[-1].sum().backward()
    assert all(not m.kernel().requires_grad for m in frozen)
    for m in frozen:
        for p in m.parameters():
            p.data.mul_(1.1)
    assert all(torch.equal(m.kernel(), m.generate_kernel()) for m in frozen)


# -- writes --------------------------------------------------------------------------------
def _write_cases():

    def assign(layer, w):
        layer.weight = w

    def assign_parameter(layer, w):
        layer.weight = nn.Parameter(w)

    def data_assign(layer, w):
        layer.weight.data = w

    def data_copy(layer, w):
        layer.weight.data.copy_(w)

    def copy_no_grad(layer, w):
        with torch.no_grad():
            layer.weight.copy_(w)

    def setitem(layer, w):
        with torch.no_grad():
            layer.weight[...] = w

    return dict(
        assign=assign,
        assign_parameter=assign_parameter,
        data_assign=data_assign,
        data_copy=data_copy,
        copy_no_grad=copy_no_grad,
        setitem=setitem)


WRITES = _write_cases()


@pytest.mark.parametrize('name', sorted(LAYERS))
@pytest.mark.parametrize('write', sorted(WRITES))
def test_weight_write_sets_the_kernel_exactly(name, write):
    layer = randomise(LAYERS[name]())
    target = torch.randn(layer.kernel().shape)
    for mode in (True, False):  # in training and in eval mode
        layer.train(mode)
        WRITES[write](layer, target)
        assert torch.equal(layer.generate_kernel(), target)
        assert torch.equal(layer.weight.detach(), target)
        target = target * 2


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_nn_init_on_weight_initialises_the_kernel(name):
    torch.manual_seed(0)  # the std check below is statistical: one fixed draw, in any order
    layer = randomise(LAYERS[name]())
    before = layer.generate_kernel().detach()
    weight = layer.weight
    nn.init.kaiming_normal_(weight, mode='fan_out', nonlinearity='relu')
    kernel = layer.generate_kernel().detach()
    assert torch.equal(kernel, weight.detach()) and not torch.allclose(kernel, before)
    fan_out = kernel.shape[0] * kernel[0, 0].numel()
    assert abs(float(kernel.std()) / (2 / fan_out)**0.5 - 1) < 0.25  # Kaiming's std


def test_init_cfg_override_by_name_initialises_an_orepa_layer():
    from mmengine.model import BaseModule

    class Net(BaseModule):

        def __init__(self):
            super().__init__(
                init_cfg=dict(type='Constant', val=0.5, bias=0.0, override=dict(name='conv')))
            self.conv = OREPAConv2d(3, 4, 3, bias=True)

    net = Net()
    net.init_weights()
    assert torch.equal(net.conv.generate_kernel(), torch.full((4, 3, 3, 3), 0.5))
    assert torch.equal(net.conv.bias.detach(), torch.zeros(4))


def test_reads_of_weight_are_plain_tensors():
    layer = randomise(OREPAConv2d(4, 6, 3))
    w = layer.weight
    derived = w * 2 + 1
    assert type(derived) is torch.Tensor
    assert torch.equal(derived, layer.generate_kernel() * 2 + 1)
    assert w.shape == (6, 4, 3, 3) and w.requires_grad
    before = [p.detach().clone() for p in layer.parameters()]
    w.sum().backward()  # reading and differentiating writes nothing
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    assert layer.branch_scales.grad is not None


@pytest.mark.parametrize('mode', [True, False])
def test_write_through_an_indexed_view_loads_the_kernel(mode):
    layer = randomise(OREPAConv2d(4, 6, 3))
    layer.train(mode)
    before = layer.generate_kernel().detach()
    with torch.no_grad():
        layer.weight[0].zero_()
        layer.weight[1, :, 1, 1] = 2.0
    kernel = layer.generate_kernel().detach()
    expected = before.clone()
    expected[0] = 0
    expected[1, :, 1, 1] = 2.0
    assert torch.equal(kernel, expected)


def test_a_write_through_a_view_of_the_weight_lands():
    """Issue 20, item 4: writes through views other than indexing were silently lost."""
    layer = randomise(OREPAConv2d(4, 6, 3)).eval()
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        reference = layer(x)
        layer.weight.view(-1).mul_(0.5)
        assert rel_err(layer(x), reference * 0.5) < 1e-6
        layer.weight.detach().zero_()
        assert torch.equal(layer(x), torch.zeros_like(reference))


def test_writes_that_cannot_land_raise():
    layer = OREPAConv2d(4, 6, 3)
    with pytest.raises(ValueError, match=r'cannot write a kernel of shape \(6, 4, 1, 1\)'):
        layer.weight = torch.zeros(6, 4, 1, 1)
    with pytest.raises(TypeError, match='can only be set to a tensor'):
        layer.weight = None
    dbb = DBBConv2d(4, 6, 3)
    with pytest.raises(TypeError, match='re-parameterize the model first'):
        dbb.weight.data = torch.zeros(6, 4, 3, 3)


def test_stock_weight_loaded_with_assign_trains():
    """Finding 6: an expanded (stride-0) scale tensor made the next optimizer step fail."""
    for layer in (OREPAConv1x1(4, 6), OREPAConv2d(4, 6, 3)):
        stock = {'weight': torch.randn(layer.kernel().shape)}
        layer.load_state_dict(stock, strict=False, assign=True)
        assert torch.equal(layer.generate_kernel(), stock['weight'])
        opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
        layer(torch.randn(1, 4, 5, 5)).square().sum().backward()
        opt.step()  # raised 'more than one element of the written-to tensor ...' before
        assert layer.branch_scales.stride() == (layer.out_channels, 1)


# -- structural re-param blocks that write their fused kernel -------------------------------
@pytest.mark.parametrize('deploy', ['switch_to_deploy', 'reparameterize_model'])
def test_mmpretrain_repvgg_with_orepa_convs_deploys_exactly(deploy, one_thread):
    """Finding 1: RepVGGBlock.switch_to_deploy writes `branch_reparam.weight.data = fused`
    into a layer built with the same conv_cfg; the write was lost (relative error 1.0)."""
    from mmpretrain.models.backbones import RepVGG
    torch.manual_seed(0)
    arch = dict(
        num_blocks=[1, 1, 1, 1],
        width_factor=[0.25, 0.25, 0.25, 0.25],
        group_layer_map=None,
        se_cfg=None)
    model = random_bn_statistics(RepVGG(arch=arch, conv_cfg=dict(type='OREPA'), out_indices=(1, 3)))
    model.eval()  # mm backbones' train() returns None: never chain it
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
    if deploy == 'switch_to_deploy':
        model.switch_to_deploy()  # what mmdeploy calls
        # Issue 20, item 6: mmpretrain's own method leaves no OREPA layer (22 in RepVGG-A0).
        assert orepa_mm.count_reparameterizable(model) == 0
        with torch.no_grad():
            for out, ref in zip(model(x), reference):
                assert rel_err(out, ref) < 1e-5
    orepa_mm.reparameterize_model(model)
    assert orepa_mm.count_reparameterizable(model) == 0
    stock = RepVGG(arch=arch, deploy=True, out_indices=(1, 3))
    stock.eval()
    stock.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        for out, ref in zip(stock(x), reference):
            assert rel_err(out, ref) < 1e-5


def test_mmcv_fuse_conv_bn_keeps_an_unconverted_model(one_thread):
    from mmcv.cnn import fuse_conv_bn
    from mmdet.models.backbones import ResNet
    torch.manual_seed(0)
    model = random_bn_statistics(ResNet(depth=18, conv_cfg=dict(type='OREPA')))
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        fused = fuse_conv_bn(copy.deepcopy(model))
        for out, ref in zip(fused(x), reference):
            assert rel_err(out, ref) < 1e-5
