"""Kernel algebra against explicit feature-space computations (float64)."""
import math

import pytest
import torch
import torch.nn.functional as F

from orepa_mm.cnn import kernels


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _close(a, b, rtol=1e-10):
    scale = b.abs().max().clamp_min(1e-12)
    assert (a - b).abs().max() / scale < rtol, float((a - b).abs().max() / scale)


@pytest.mark.parametrize('groups,t_mult', [(1, 1), (2, 1), (4, 2)])
def test_compose_1x1_kxk_equals_two_convs(groups, t_mult):
    g = torch.Generator().manual_seed(0)
    i, o, k = 8, 12, 3
    t = i * t_mult
    first = torch.randn(t, i // groups, generator=g)
    second = torch.randn(o, t // groups, k, k, generator=g)
    x = torch.randn(2, i, 9, 9, generator=g)
    ref = F.conv2d(F.conv2d(x, first[..., None, None], groups=groups), second, groups=groups)
    out = F.conv2d(x, kernels.compose_1x1_kxk(first, second, groups), groups=groups)
    _close(out, ref)


@pytest.mark.parametrize('groups', [1, 2, 4])
def test_depthwise_pointwise_equals_two_convs(groups):
    g = torch.Generator().manual_seed(1)
    i, o, k, e = 8, 12, 3, 8
    dw = torch.randn(i * e, 1, k, k, generator=g)
    pw = torch.randn(o, i * e // groups, generator=g)
    x = torch.randn(2, i, 9, 9, generator=g)
    ref = F.conv2d(F.conv2d(x, dw, groups=i), pw[..., None, None], groups=groups)
    out = F.conv2d(x, kernels.depthwise_pointwise_to_kernel(dw, pw, i, groups), groups=groups)
    _close(out, ref)


def test_compose_stacked_is_chain_with_rotated_second_kernel():
    g = torch.Generator().manual_seed(2)
    first = torch.randn(5, 3, 3, 3, generator=g)
    second = torch.randn(4, 5, 3, 3, generator=g)
    x = torch.randn(2, 3, 11, 11, generator=g)
    ref = F.conv2d(F.conv2d(x, first), second.flip((-2, -1)))
    composed = kernels.compose_stacked(first, second)
    assert composed.shape == (4, 3, 5, 5)
    _close(F.conv2d(x, composed), ref)


def test_frequency_prior_matches_published_formula():
    for out_channels in (4, 5, 16):
        d = kernels.frequency_prior(out_channels, 3).double()
        half = out_channels / 2
        for o in range(out_channels):
            for h in range(3):
                for w in range(3):
                    if o < half:
                        want = math.cos(math.pi * (h + 0.5) * (o + 1) / 3)
                    else:
                        want = math.cos(math.pi * (w + 0.5) * (o + 1 - half) / 3)
                    assert abs(d[o, h, w] - want) < 1e-6


def test_grouped_identity_and_average_kernel():
    eye = kernels.grouped_identity(8, 2)
    assert eye.sum() == 8 and all(eye[t, t % 2] == 1 for t in range(8))
    avg = kernels.average_kernel(4, 3, groups=2)
    x = torch.randn(1, 4, 6, 6)
    _close(
        F.conv2d(x, avg.to(x), padding=1, groups=2),
        F.avg_pool2d(x, 3, 1, 1, count_include_pad=True))


def test_fold_batch_norm_matches_eval_bn():
    g = torch.Generator().manual_seed(3)
    bn = torch.nn.BatchNorm2d(6).eval()
    bn.running_mean.uniform_(-1, 1, generator=g)
    bn.running_var.uniform_(0.5, 2, generator=g)
    bn.weight.data.uniform_(0.5, 2, generator=g)
    bn.bias.data.uniform_(-1, 1, generator=g)
    w = torch.randn(6, 3, 3, 3, generator=g)
    b = torch.randn(6, generator=g)
    x = torch.randn(2, 3, 8, 8, generator=g)
    kernel, bias = kernels.fold_batch_norm(w, b, bn.running_mean, bn.running_var, bn.weight,
                                           bn.bias, bn.eps)
    with torch.no_grad():
        _close(F.conv2d(x, kernel, bias), bn(F.conv2d(x, w, b)))


def test_pad_to_kernel_size_centres():
    k = kernels.pad_to_kernel_size(torch.ones(2, 2, 1, 1), 5)
    assert k.shape == (2, 2, 5, 5) and k[..., 2, 2].sum() == 4 and k.sum() == 4
