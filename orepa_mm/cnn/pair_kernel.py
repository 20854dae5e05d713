"""The 1 x 1 OREPA kernel as one autograd function with a hand-written backward.

    K = v0[o] * W0[o, i] + v1[o] * sum_j W2[o, j] W1[j, i]

The product of the linear 1x1-1x1 pair is most of ResNet-50's kernel-generation FLOPs (the
bottleneck 1 x 1 convs are wide), so nothing but the inputs is saved for backward: the pair's
product is never stored, the gradient of the scale comes from the already computed ``G W1^T``.
Like the k x k function, it
runs in the inputs' precision with autocast off in both directions and is traced as it is by
torch.compile.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .precision import full_precision_backward, full_precision_forward


class OREPA1x1Kernel(torch.autograd.Function):
    """Inputs: origin W0 (O, I), v0 (O,), second W2 (O, J), first W1 (J, I), v1 (O,)."""

    @staticmethod
    @full_precision_forward
    def forward(ctx, origin: Tensor, v_origin: Tensor, second: Tensor, first: Tensor,
                v_pair: Tensor) -> Tensor:
        out = torch.mm(second * v_pair.view(-1, 1), first)
        out.addcmul_(origin, v_origin.view(-1, 1))
        ctx.save_for_backward(origin, v_origin, second, first, v_pair)
        return out

    @staticmethod
    @full_precision_backward
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        origin, v_origin, second, first, v_pair = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = [None] * 5
        if needs[0]:
            grads[0] = grad * v_origin.view(-1, 1)
        if needs[1]:
            grads[1] = (grad * origin).sum(1)
        if needs[2] or needs[4]:
            # h[o, j] = sum_i G[o, i] W1[j, i]: the unscaled gradient of W2.
            h = torch.mm(grad, first.t())
            if needs[4]:
                grads[4] = (h * second).sum(1)
            if needs[2]:
                grads[2] = h.mul_(v_pair.view(-1, 1))
        if needs[3]:
            grads[3] = torch.mm((second * v_pair.view(-1, 1)).t(), grad)
        return tuple(grads)
