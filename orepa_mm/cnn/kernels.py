"""Pure kernel algebra for structural re-parameterization.

Every function maps kernel-sized tensors to kernel-sized tensors; none touches a feature map
and none holds state, so each is unit-tested on its own and reused by the OREPA layers (online,
every training step), the DBB baseline (offline, at deploy) and the checkpoint tools.

Conventions: a conv kernel is ``(out_channels, in_channels // groups, kh, kw)``; a "matrix" is
a 1 x 1 kernel with the spatial dims dropped, ``(out_channels, in_channels // groups)``.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor


def pad_to_kernel_size(kernel: Tensor, kernel_size: int) -> Tensor:
    """Zero-pad a k0 x k0 kernel (k0 <= kernel_size, same parity) to kernel_size, centred."""
    pad = (kernel_size - kernel.shape[-1]) // 2
    return F.pad(kernel, [pad] * 4) if pad else kernel


def frequency_prior(out_channels: int, kernel_size: int) -> Tensor:
    """The fixed DCT-like spatial patterns D (O, k, k) of OREPA's frequency-prior branch.

    Output channels in the first half vary along h, the second half along w:
    D[o, h, w] = cos(pi (h + 0.5)(o + 1) / k) for o < O/2, else cos(pi (w + 0.5)(o + 1 - O/2) / k).
    O/2 is a true division, as in the authors' code (odd O gives half-integer frequencies);
    for k = 3 this is exactly the published buffer, other k use the same DCT-II form.
    """
    half = out_channels / 2
    o = torch.arange(out_channels, dtype=torch.float64)
    pos = torch.arange(kernel_size, dtype=torch.float64) + 0.5
    first = o < half
    freq = torch.where(first, o + 1, o + 1 - half)  # (O,)
    wave = torch.cos(math.pi * freq[:, None] * pos[None, :] / kernel_size)  # (O, k)
    along_h = wave[:, :, None].expand(-1, -1, kernel_size)
    along_w = wave[:, None, :].expand(-1, kernel_size, -1)
    return torch.where(first[:, None, None], along_h, along_w).float()


def grouped_identity(rows: int, cols: int) -> Tensor:
    """Identity-like (rows, cols) matrix with ``M[t, t % cols] = 1``.

    This is the per-group identity of a grouped 1 x 1 conv whose weight is (rows, in/groups):
    channel t of group g reads its own input channel; with rows = 2 * in, two stacked identities.
    """
    eye = torch.zeros(rows, cols)
    eye[torch.arange(rows), torch.arange(rows) % cols] = 1.0
    return eye


def compose_1x1_kxk(first: Tensor, second: Tensor, groups: int = 1) -> Tensor:
    """Kernel of a 1 x 1 conv ``first`` (T, I/g) followed by a k x k conv ``second`` (O, T/g, k, k).

    Returns (O, I/g, k, k) with K[o, i] = sum_t second[o, t] * first[t, i], per group.
    """
    out_channels, t_per_group, kh, kw = second.shape
    first = first.reshape(groups, -1, first.shape[-1])  # (g, T/g, I/g)
    second = second.reshape(groups, out_channels // groups, t_per_group, kh * kw)
    kernel = torch.einsum('gotx,gti->goix', second, first)
    return kernel.reshape(out_channels, first.shape[-1], kh, kw)


def depthwise_pointwise_to_kernel(depthwise: Tensor,
                                  pointwise: Tensor,
                                  in_channels: int,
                                  groups: int = 1) -> Tensor:
    """Kernel of a depthwise k x k conv (E*I, 1, k, k) followed by a pointwise conv (O, E*I/g).

    The depthwise conv expands every input channel i into E channels E*i .. E*i + E-1; the
    pointwise conv is grouped like the layer. K[o, i] = sum_e pw[o, E*i_local + e] * dw[E*i + e].
    """
    expand = depthwise.shape[0] // in_channels
    kh, kw = depthwise.shape[-2:]
    out_channels = pointwise.shape[0]
    dw = depthwise.reshape(groups, in_channels // groups, expand, kh * kw)
    pw = pointwise.reshape(groups, out_channels // groups, in_channels // groups, expand)
    kernel = torch.einsum('goie,giex->goix', pw, dw)
    return kernel.reshape(out_channels, in_channels // groups, kh, kw)


def compose_stacked(first: Tensor, second: Tensor) -> Tensor:
    """Compose two stacked kernels, ``first`` (T, I, a, a) then ``second`` (O, T, b, b), groups = 1.

    Returns one (O, I, a + b - 1, a + b - 1) kernel, computed as the authors' linear deep stem
    does: ``conv2d(first^T, second, padding=b - 1)^T``. Because conv2d is a cross-correlation,
    this equals the feature-space chain "conv with ``first``, then conv with ``second`` rotated
    by 180 degrees" (both stride 1, unpadded, on a pre-padded input). Matching the published
    formula keeps the authors' checkpoints exact; the rotation is a fixed re-labelling of the
    second kernel's taps, so the family of kernels the block can learn is the same.
    Apply the stride (and dilation) once, to the composed kernel.
    """
    b = second.shape[-1]
    return F.conv2d(first.transpose(0, 1), second, padding=b - 1).transpose(0, 1)


def fold_batch_norm(kernel: Tensor, bias, running_mean: Tensor, running_var: Tensor, gamma, beta,
                    eps: float):
    """Fold an eval-mode BatchNorm that follows a conv into the conv's kernel and bias.

    ``bias``, ``gamma`` and ``beta`` may be None (no conv bias, non-affine BN).
    """
    std = (running_var + eps).sqrt()
    scale = gamma / std if gamma is not None else 1.0 / std
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias * scale
    if beta is not None:
        shift = shift + beta
    return kernel * scale.reshape(-1, 1, 1, 1), shift


def average_kernel(channels: int, kernel_size: int, groups: int = 1) -> Tensor:
    """The k x k average pooling of a (channels)-channel map written as a grouped conv kernel."""
    per_group = channels // groups
    # float64, so that a float64 deploy bake is exact (callers cast it to their kernel's dtype).
    kernel = torch.zeros(channels, per_group, kernel_size, kernel_size, dtype=torch.float64)
    kernel[torch.arange(channels), torch.arange(channels) % per_group] = 1.0 / kernel_size**2
    return kernel
