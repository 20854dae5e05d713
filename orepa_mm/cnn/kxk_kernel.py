"""The k x k OREPA kernel as one autograd function with a hand-written backward.

Generating the squeezed kernel runs every training step, so its cost is OREPA's overhead.
Written with plain autograd, each branch keeps a full-size scaled temporary alive for the
backward pass and the generator is ~40 small ops. This function saves only its inputs (the
parameters, which live anyway), sums the branches into one output buffer, and computes all
gradients with a handful of (batched) matrix products: same FLOPs as autograd's, no extra
memory, fewer passes over kernel-sized tensors. Not twice differentiable:
``once_differentiable`` says so instead of returning wrong second derivatives. Both directions
run in the inputs' precision with autocast off (:func:`.precision.full_precision_forward`),
also when ``backward()`` is called inside an autocast region.

torch.compile traces it (Dynamo traces custom autograd functions, forward and backward): the
fused CPU loops are dispatcher ops (:mod:`.fused_ops`), so compiled graphs keep them, without
graph breaks.

The kernel, for output channel o, per group (I_g = in/groups, X = k * k):

    K[o, i, x] =  v_origin[o] W0[o, i, x]
               +  sum_b v_b[o] A_b[o, i] P_b[o, x]              (avg, prior, centred 1x1)
               +  v_c[o] sum_t C2[o, t, x] M[t, i]              (1x1 -> kxk; M = identity + R)
               +  v_d[o] sum_e PW[o, i, e] DW[i, e, x]          (depthwise-separable)

Every term is optional except the origin. Tested against plain autograd on explicit
feature-space branches (tests/test_orepa_conv.py), gradients included.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .fused_ops import fused_kxk_ops
from .precision import full_precision_backward, full_precision_forward
from .kernels import depthwise_pointwise_to_kernel


class OREPAKxKKernel(torch.autograd.Function):
    """See the module docstring. Inputs with an unused branch are None."""

    @staticmethod
    @full_precision_forward
    def forward(ctx, origin: Tensor, v_origin: Tensor, avg: Optional[Tensor],
                prior: Optional[Tensor], one: Optional[Tensor], patterns: Optional[Tensor],
                v_small: Optional[Tensor], second: Optional[Tensor],
                residual: Optional[Tensor], identity: Optional[Tensor],
                v_compose: Optional[Tensor], pointwise: Optional[Tensor],
                depthwise: Optional[Tensor], v_dws: Optional[Tensor], groups: int) -> Tensor:
        mats = _stack_matrices(avg, prior, one)
        first = _first_factor(residual, identity)
        ops = fused_kxk_ops(origin, groups, _expand_ratio(pointwise, origin))
        if ops is not None:
            out = _forward_fused(ops, origin, v_origin, mats, patterns, v_small, second, first,
                                 v_compose, pointwise, depthwise, v_dws)
        else:
            out = _forward_torch(origin, v_origin, mats, patterns, v_small, second, first,
                                 v_compose, pointwise, depthwise, v_dws, groups)
        ctx.groups = groups
        # Only inputs are saved (parameters and buffers, alive anyway); the stacked matrices
        # and the first factor are rebuilt in backward rather than kept for it.
        ctx.save_for_backward(origin, v_origin, avg, prior, one, patterns, v_small, second,
                              residual, identity, v_compose, pointwise, depthwise, v_dws)
        return out

    @staticmethod
    @full_precision_backward
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        (origin, v_origin, avg, prior, one, patterns, v_small, second, residual, identity,
         v_compose, pointwise, depthwise, v_dws) = ctx.saved_tensors
        mats = _stack_matrices(avg, prior, one)
        first = _first_factor(residual, identity)
        needs = ctx.needs_input_grad
        ops = fused_kxk_ops(grad, ctx.groups, _expand_ratio(pointwise, origin))
        if ops is not None:
            grads = _backward_fused(ops, grad, origin, v_origin, mats, patterns, v_small, second,
                                    first, v_compose, pointwise, depthwise, v_dws)
        else:
            wanted = dict(origin=needs[0], v_origin=needs[1], mats=any(needs[2:5]),
                          v_small=needs[6], second=needs[7], first=needs[8],
                          v_compose=needs[10], pointwise=needs[11], depthwise=needs[12],
                          v_dws=needs[13])
            grads = _backward_torch(grad, wanted, origin, v_origin, mats, patterns, v_small,
                                    second, first, v_compose, pointwise, depthwise, v_dws,
                                    ctx.groups)

        small = [None, None, None]
        if 'mats' in grads:
            present = [j for j, m in enumerate((avg, prior, one)) if m is not None]
            for j, gm in zip(present, grads['mats']):
                small[j] = gm.reshape((avg, prior, one)[j].shape)
        first_grad = grads.get('first')
        return (grads.get('origin'), grads.get('v_origin'), *small, None,
                grads.get('v_small'), grads.get('second'),
                None if first_grad is None else first_grad.reshape(residual.shape), None,
                grads.get('v_compose'), grads.get('pointwise'), grads.get('depthwise'),
                grads.get('v_dws'), None)


def _stack_matrices(avg: Optional[Tensor], prior: Optional[Tensor],
                    one: Optional[Tensor]) -> Optional[Tensor]:
    """The 1x1 matrices of the present pattern branches, (nb, O, I_g)."""
    present = [m.flatten(1) for m in (avg, prior, one) if m is not None]
    return torch.stack(present) if present else None


def _expand_ratio(pointwise: Optional[Tensor], origin: Tensor) -> int:
    """E of the depthwise-separable branch (0 without it)."""
    return 0 if pointwise is None else pointwise.shape[1] // origin.shape[1]


def _first_factor(residual: Optional[Tensor], identity: Optional[Tensor]) -> Optional[Tensor]:
    """M = identity + residual, the first (1 x 1) factor of the 1x1 -> k x k branch."""
    return None if residual is None else residual.flatten(1) + identity


def _forward_torch(origin, v_origin, mats, patterns, v_small, second, first, v_compose,
                   pointwise, depthwise, v_dws, groups: int) -> Tensor:
    """The reference forward in PyTorch ops (any device, dtype and groups)."""
    o, i_g = origin.shape[:2]
    x = origin.shape[-1] * origin.shape[-2]
    out = origin * v_origin.view(-1, 1, 1, 1)
    if mats is not None:
        # (O, I_g, nb) @ (O, nb, X): the scaled 1x1 matrices times their fixed patterns.
        out.view(o, i_g, x).baddbmm_(mats.permute(1, 2, 0),
                                     (patterns * v_small[:, :, None]).transpose(0, 1))
    if second is not None:
        t_g, o_g = second.shape[1], o // groups
        # The k x k factor with its taps before its channels, (g, O_g * X, T_g), so that
        # composing is one large product per group: (O_g X, T_g) @ (T_g, I_g).
        second_t = second.reshape(groups, o_g, t_g, x).transpose(2, 3).reshape(
            groups, o_g * x, t_g)
        composed = torch.bmm(second_t, first.reshape(groups, t_g, i_g))
        out.view(o, i_g, x).addcmul_(composed.view(o, x, i_g).transpose(1, 2),
                                     v_compose.view(-1, 1, 1))
    if pointwise is not None:
        in_channels = depthwise.shape[0] // (pointwise.shape[1] // i_g)
        out += depthwise_pointwise_to_kernel(
            depthwise, pointwise.flatten(1) * v_dws.view(-1, 1), in_channels, groups)
    return out


def _backward_torch(grad, wanted, origin, v_origin, mats, patterns, v_small, second, first,
                    v_compose, pointwise, depthwise, v_dws, g: int) -> dict:
    """The reference backward in PyTorch ops: the wanted gradients, by name."""
    o, i_g = origin.shape[:2]
    x = origin.shape[-1] * origin.shape[-2]
    grad = grad.contiguous()
    g3 = grad.view(o, i_g, x)
    grads = {}
    if wanted['origin']:
        grads['origin'] = grad * v_origin.view(-1, 1, 1, 1)
    if wanted['v_origin']:
        grads['v_origin'] = (g3 * origin.view(o, i_g, x)).sum((1, 2))

    if mats is not None:
        # h[o, b, i] = sum_x P_b[o, x] G[o, i, x]; with I as the long output axis the
        # batched product is ~2x faster than with (I, nb) outputs.
        h = torch.bmm(patterns.transpose(0, 1), g3.transpose(1, 2)).transpose(0, 1)
        if wanted['mats']:
            grads['mats'] = torch.empty_like(mats)
            torch.mul(h, v_small.unsqueeze(-1), out=grads['mats'])
        if wanted['v_small']:
            grads['v_small'] = (h * mats).sum(2)

    if second is not None:
        t_g, o_g = second.shape[1], o // g
        # G with the taps before the input channels: (g, O_g * X, I_g).
        g_t = g3.reshape(g, o_g, i_g, x).transpose(2, 3).reshape(g, o_g * x, i_g)
        # h[o, t, x] = sum_i G[o, i, x] M[t, i]: the unscaled gradient of C2.
        h = torch.bmm(g_t, first.reshape(g, t_g, i_g).transpose(1, 2))
        h = h.view(o, x, t_g).transpose(1, 2).contiguous()
        second3 = second.reshape(o, t_g, x)
        if wanted['v_compose']:
            grads['v_compose'] = (h * second3).sum((1, 2))
        if wanted['second']:
            grads['second'] = h.mul_(v_compose.view(-1, 1, 1)).view(second.shape)
        if wanted['first']:
            # v[o] C2[o, t, x] with t first, (g, T_g, O_g * X): the product below then
            # contracts the contiguous axis of one operand and the outer axis of the other.
            t_first = second3.view(g, o_g, t_g, x).transpose(1, 2)
            if torch.compiler.is_compiling():
                # Traced out= ops do not keep the buffer's strides (AOTAutograd then cannot
                # view the result): the functional form, which Inductor fuses anyway.
                scaled = (t_first * v_compose.view(g, 1, o_g, 1)).reshape(g, t_g, o_g * x)
            else:
                # Eager: one pass straight into the t-first layout.
                scaled = torch.empty(g, t_g, o_g, x, dtype=grad.dtype, device=grad.device)
                torch.mul(t_first, v_compose.view(g, 1, o_g, 1), out=scaled)
                scaled = scaled.view(g, t_g, o_g * x)
            # dM[t, i] = sum_{o, x} v[o] C2[o, t, x] G[o, i, x]
            grads['first'] = torch.bmm(scaled, g_t).reshape(first.shape)

    if pointwise is not None:
        e = pointwise.shape[1] // i_g
        o_g = o // g
        dw = depthwise.reshape(g * i_g, e, x)
        pw = pointwise.reshape(o, i_g, e)
        g_i = g3.reshape(g, o_g, i_g, x).permute(0, 2, 1, 3).reshape(g * i_g, o_g, x)
        # h[o, i, e] = sum_x G[o, i, x] DW[i, e, x]
        h = torch.bmm(g_i, dw.transpose(1, 2))  # (g * I_g, O_g, E)
        h = h.reshape(g, i_g, o_g, e).permute(0, 2, 1, 3).reshape(o, i_g, e)
        if wanted['pointwise']:
            grads['pointwise'] = (h * v_dws.view(-1, 1, 1)).reshape(pointwise.shape)
        if wanted['v_dws']:
            grads['v_dws'] = (h * pw).sum((1, 2))
        if wanted['depthwise']:
            scaled = (pw * v_dws.view(-1, 1, 1)).reshape(g, o_g, i_g, e)
            scaled = scaled.permute(0, 2, 3, 1).reshape(g * i_g, e, o_g)
            # dDW[i, e, x] = sum_o v[o] PW[o, i, e] G[o, i, x]
            grads['depthwise'] = torch.bmm(scaled, g_i).reshape(depthwise.shape)
    return grads


def _forward_fused(ops, origin, v_origin, mats, patterns, v_small, second, first, v_compose,
                   pointwise, depthwise, v_dws) -> Tensor:
    """The forward on the fused CPU loops (float32, groups = 1): same result as the reference."""
    o, i = origin.shape[:2]
    x = origin.shape[-1] * origin.shape[-2]
    composed = None
    if second is not None:
        t = second.shape[1]
        # v[o] C2 with its taps first, (O X, T): one large product composes the branch.
        second_t = ops.taps_first_scaled(*_contiguous(second.reshape(o, t, x), v_compose))
        composed = torch.mm(second_t.view(o * x, t), first).view(o, x, i)
    pw = dw = None
    if pointwise is not None:
        e = pointwise.shape[1] // i
        pw, dw = pointwise.reshape(o, i, e), depthwise.reshape(i, e, x)
    out = ops.assemble(*_contiguous(origin.view(o, i, x), v_origin, mats, patterns, v_small,
                                    composed, pw, dw, v_dws))
    return out.view(origin.shape)


def _backward_fused(ops, grad, origin, v_origin, mats, patterns, v_small, second, first,
                    v_compose, pointwise, depthwise, v_dws) -> dict:
    """All gradients on the fused CPU loops plus three large products, by name."""
    o, i = origin.shape[:2]
    x = origin.shape[-1] * origin.shape[-2]
    grad = grad.contiguous()
    pw = dw = None
    if pointwise is not None:
        e = pointwise.shape[1] // i
        pw, dw = pointwise.reshape(o, i, e), depthwise.reshape(i, e, x)
    (d_origin, dv_origin, d_mats, dv_small, d_pw, d_dw, dv_dws,
     g_t) = ops.branch_backward(*_contiguous(grad.view(o, i, x), origin.view(o, i, x),
                                             v_origin, mats, patterns, v_small, pw, dw, v_dws),
                                second is not None)
    grads = dict(origin=d_origin.view(origin.shape), v_origin=dv_origin)
    if mats is not None:
        grads.update(mats=d_mats, v_small=dv_small)
    if pointwise is not None:
        grads.update(pointwise=d_pw.view(pointwise.shape),
                     depthwise=d_dw.view(depthwise.shape), v_dws=dv_dws)
    if second is not None:
        t = second.shape[1]
        g_t = g_t.view(o * x, i)
        # h[o, x, t] = sum_i G[o, i, x] M[t, i]: the unscaled gradient of C2, taps first.
        h = torch.mm(g_t, first.t())
        second3, v_compose = _contiguous(second.reshape(o, t, x), v_compose)
        d_second, dv_compose = ops.compose_backward(h.view(o, x, t), second3, v_compose)
        # dM[t, i] = sum_{o, x} v[o] C2[o, t, x] G[o, i, x]
        scaled = ops.t_major_scaled(second3, v_compose).view(t, o * x)
        grads.update(second=d_second.view(second.shape), v_compose=dv_compose,
                     first=torch.mm(scaled, g_t))
    return grads


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]
