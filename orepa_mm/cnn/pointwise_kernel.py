"""The 1 x 1 OREPA kernel as one autograd function with a hand-written backward.

    K[o, i] = v_origin[o] W0[o, i] + v_linear[o] sum_j W2[o, j] W1[j, i]

W0 is the origin, W1 / W2 the first / second factor of the linear 1x1-1x1 pair, v_origin and
v_linear the two rows of the layer's ``branch_scales``. The product of the pair is most of
ResNet-50's kernel-generation FLOPs (the bottleneck 1 x 1 convs are wide), so nothing but the
inputs is saved for backward: the pair's product is never stored, the gradient of its scale
comes from the already computed ``G W1^T``. The whole scale matrix goes in (not one row per
branch), so that its gradient is one stacked tensor rather than autograd's sum of zero-padded
``select_backward`` rows. Like the k x k function (:mod:`.kxk_kernel`), it runs in the inputs'
precision with autocast off in both directions and is traced as it is by torch.compile.
On CUDA (see :func:`.fused_ops.triton_route`) each direction is one fused Triton launch,
``orepa_mm::pointwise_kernel`` / ``pointwise_kernel_backward``; the PyTorch ops below are the
reference and the fallback.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .fused_ops import triton_ops, triton_route
from .precision import full_precision_backward, full_precision_forward

#: The inputs of :class:`OREPA1x1Kernel`, in order.
_INPUTS = ('origin', 'branch_scales', 'linear_second', 'linear_first')


def pointwise_kernel(origin: Tensor, branch_scales: Tensor, linear_second: Tensor,
                     linear_first: Tensor) -> Tensor:
    """The squeezed (O, I) kernel of a 1 x 1 OREPA block.

    Args:
        origin: W0 (O, I).
        branch_scales: (2, O); row 0 scales the origin, row 1 the linear pair.
        linear_second: W2 (O, J), the pair's second factor.
        linear_first: W1 (J, I), the pair's first factor.
    """
    return OREPA1x1Kernel.apply(origin, branch_scales, linear_second, linear_first)


class OREPA1x1Kernel(torch.autograd.Function):
    """See the module docstring; called through :func:`pointwise_kernel`."""

    @staticmethod
    @full_precision_forward
    def forward(ctx, origin: Tensor, branch_scales: Tensor, linear_second: Tensor,
                linear_first: Tensor) -> Tensor:
        if triton_route(origin):
            # The CUDA path: one fused launch (:mod:`.triton_kernels`).
            ctx.save_for_backward(origin, branch_scales, linear_second, linear_first)
            return triton_ops().pointwise_kernel(origin, branch_scales, linear_second, linear_first,
                                                 0, 1)
        origin_scale, linear_scale = branch_scales[0], branch_scales[1]
        out = torch.mm(linear_second * linear_scale.view(-1, 1), linear_first)
        out.addcmul_(origin, origin_scale.view(-1, 1))
        ctx.save_for_backward(origin, branch_scales, linear_second, linear_first)
        return out

    @staticmethod
    @full_precision_backward
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        origin, branch_scales, linear_second, linear_first = ctx.saved_tensors
        needs = dict(zip(_INPUTS, ctx.needs_input_grad))
        if triton_route(grad):
            grads = triton_ops().pointwise_kernel_backward(grad, origin, branch_scales,
                                                           linear_second, linear_first, 0, 1,
                                                           [needs[name] for name in _INPUTS])
            return tuple(g if needs[name] else None for name, g in zip(_INPUTS, grads))
        origin_scale, linear_scale = branch_scales[0], branch_scales[1]
        grads = {}
        if needs['origin']:
            grads['origin'] = grad * origin_scale.view(-1, 1)
        if needs['linear_second'] or needs['branch_scales']:
            # h[o, j] = sum_i G[o, i] W1[j, i]: the unscaled gradient of W2.
            h = torch.mm(grad, linear_first.t())
            if needs['branch_scales']:
                grads['branch_scales'] = torch.stack([(grad * origin).sum(1),
                                                      (h * linear_second).sum(1)])
            if needs['linear_second']:
                grads['linear_second'] = h.mul_(linear_scale.view(-1, 1))
        if needs['linear_first']:
            grads['linear_first'] = torch.mm((linear_second * linear_scale.view(-1, 1)).t(), grad)
        return tuple(grads.get(name) for name in _INPUTS)
