"""The k x k OREPA kernel as one autograd function with a hand-written backward.

Generating the squeezed kernel runs every training step, so its cost is OREPA's overhead.
Written with plain autograd, each branch keeps a full-size scaled temporary alive for the
backward pass and the generator is ~40 small ops. This function saves only its inputs (the
parameters, which live anyway) and one (nb, O) stack of scale rows, sums the branches into one
output buffer, and computes all gradients with a handful of (batched) matrix products: same
FLOPs as autograd's, no extra memory, fewer passes over kernel-sized tensors. Not twice
differentiable: ``once_differentiable`` says so instead of returning wrong second derivatives.
Both directions run in the inputs' precision with autocast off
(:func:`.precision.full_precision_forward`), also when ``backward()`` is called inside an
autocast region.

torch.compile traces it (Dynamo traces custom autograd functions, forward and backward): the
fused CPU loops are dispatcher ops (:mod:`.fused_ops`), so compiled graphs keep them, without
graph breaks.

The kernel, for output channel o, per group (I_g = in/groups, X = k * k):

    K[o, i, x] =  v_origin[o] W0[o, i, x]                  origin
               +  sum_b v_b[o] A_b[o, i] P_b[o, x]         pattern branches b: avg, prior, centre
               +  v_expand[o] sum_t C2[o, t, x] M[t, i]    1x1 -> kxk
               +  v_dws[o] sum_e PW[o, i, e] DW[i, e, x]   depthwise-separable

with the names of :class:`KxKBranches` and of the code below: W0 = ``origin``; the v are rows
of ``branch_scales`` (``origin_scale``, ``pattern_scales``, ``expand_scale``, ``dws_scale``);
A_b = ``avg_1x1``, ``prior_1x1``, ``centre_1x1`` (stacked: ``pattern_matrices``), each times a
fixed spatial pattern P_b (``patterns``); C2 = ``expand_kxk`` and M = ``expand_1x1`` =
``expand_identity`` + ``expand_residual``; PW = ``pointwise``, DW = ``depthwise``.

Every term is optional except the origin. The layer hands its branches over as a
:class:`KxKBranches` record (:func:`kxk_kernel`), with the whole scale matrix rather than one
row per branch: the rows are views taken inside, and the matrix's gradient is assembled here in
one op, instead of autograd adding up one zero-padded ``select_backward`` per row. Tested
against plain autograd on explicit feature-space branches (tests/test_orepa_conv.py),
gradients included.

Three implementations, one formula: on CUDA (and on the CPU under Triton's interpreter with
``OREPA_MM_TRITON_ON_CPU=1``, see :func:`.fused_ops.triton_route`) each direction is one
fused Triton launch, ``orepa_mm::kxk_kernel`` / ``kxk_kernel_backward``; float32 on the CPU
takes the fused C++ loops; anything else the PyTorch ops below, the reference.
"""
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .fused_ops import fused_kxk_ops, triton_ops, triton_route
from .kernels import depthwise_pointwise_to_kernel
from .precision import full_precision_backward, full_precision_forward, is_compiling


class KxKBranches(NamedTuple):
    """The parameters and constants of one k x k OREPA block, by branch.

    O = out channels, I_g = in / groups, T = internal width of the 1x1 -> kxk branch, E = the
    depthwise expansion, X = k * k. An absent branch leaves its fields None. The scale rows
    come last: they are not tensors (plain ints, so that reading a row is a view).
    """
    #: W0 (O, I_g, k, k), the plain k x k kernel.
    origin: Tensor
    #: The per-output-channel scale of every present branch, (n_branches, O); row 0 scales
    #: the origin, the ``*_row(s)`` fields below name the others' rows.
    branch_scales: Tensor
    #: The pattern branches' 1 x 1 matrices A_b, (O, I_g, 1, 1) each: average, frequency
    #: prior, centred 1 x 1.
    avg_1x1: Optional[Tensor] = None
    prior_1x1: Optional[Tensor] = None
    centre_1x1: Optional[Tensor] = None
    #: P_b (nb, O, X): the fixed spatial patterns of the present pattern branches, in the
    #: order avg, prior, centre.
    patterns: Optional[Tensor] = None
    #: The 1x1 -> kxk branch: residual R (T, I_g, 1, 1) of its 1 x 1 factor M = identity + R,
    #: the (T, I_g) identity, and its k x k factor C2 (O, T / groups, k, k).
    expand_residual: Optional[Tensor] = None
    expand_identity: Optional[Tensor] = None
    expand_kxk: Optional[Tensor] = None
    #: The depthwise-separable branch: depthwise DW (E * in, 1, k, k), pointwise
    #: PW (O, E * I_g, 1, 1).
    depthwise: Optional[Tensor] = None
    pointwise: Optional[Tensor] = None
    #: Rows in ``branch_scales`` of the pattern branches (in ``patterns`` order), of the
    #: 1x1 -> kxk branch and of the depthwise-separable branch.
    pattern_rows: Tuple[int, ...] = ()
    expand_row: Optional[int] = None
    dws_row: Optional[int] = None


#: The fields of :class:`KxKBranches` that are tensors (or None); the rest are scale rows.
_TENSOR_FIELDS = KxKBranches._fields[:KxKBranches._fields.index('pattern_rows')]
#: The pattern branches' matrices, in ``patterns`` order.
_PATTERN_MATRIX_FIELDS = ('avg_1x1', 'prior_1x1', 'centre_1x1')


def kxk_kernel(branches: KxKBranches, groups: int) -> Tensor:
    """The squeezed (O, I_g, k, k) kernel of a k x k OREPA block (see the module docstring)."""
    # autograd tracks tensors that are direct arguments only: the record goes in unpacked.
    return OREPAKxKKernel.apply(groups, *branches)


class _Terms(NamedTuple):
    """The branches as the formula reads them: scale rows picked, pattern matrices stacked,
    M = identity + R added. Derived from the record in each direction; of them, only the
    pattern scales are kept for backward."""
    origin: Tensor  # W0 (O, I_g, k, k)
    origin_scale: Tensor  # v_origin (O,)
    pattern_matrices: Optional[Tensor]  # A (nb, O, I_g)
    patterns: Optional[Tensor]  # P (nb, O, X)
    pattern_scales: Optional[Tensor]  # v_b (nb, O)
    expand_kxk: Optional[Tensor]  # C2 (O, T_g, k, k)
    expand_1x1: Optional[Tensor]  # M (T, I_g)
    expand_scale: Optional[Tensor]  # v_expand (O,)
    pointwise: Optional[Tensor]  # PW (O, E * I_g, 1, 1)
    depthwise: Optional[Tensor]  # DW (E * in, 1, k, k)
    dws_scale: Optional[Tensor]  # v_dws (O,)


class OREPAKxKKernel(torch.autograd.Function):
    """See the module docstring; called through :func:`kxk_kernel`, with the fields of a
    :class:`KxKBranches` as its inputs after ``groups``."""

    @staticmethod
    @full_precision_forward
    def forward(ctx, groups: int, *fields) -> Tensor:
        branches = KxKBranches(*fields)
        ctx.groups = groups
        ctx.scale_rows = branches[len(_TENSOR_FIELDS):]
        if triton_route(branches.origin):
            # The CUDA path: one fused launch (:mod:`.triton_kernels`); only inputs are saved.
            ctx.save_for_backward(*(getattr(branches, name) for name in _TENSOR_FIELDS), None)
            return triton_ops().kxk_kernel(*_triton_args(branches, groups))
        terms = _terms(branches)
        ops = fused_kxk_ops(branches.origin, groups, _expand_ratio(branches))
        if ops is not None:
            out = _forward_fused(ops, terms)
        else:
            out = _forward_torch(terms, groups)
        # Inputs are saved (parameters and buffers, alive anyway), and the pattern branches'
        # (nb, O) scales (a stack of rows, unless they are adjacent); the other terms
        # (stacked matrices, M) are rebuilt in backward rather than kept for it.
        ctx.save_for_backward(*(getattr(branches, name) for name in _TENSOR_FIELDS),
                              terms.pattern_scales)
        return out

    @staticmethod
    @full_precision_backward
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        *inputs, pattern_scales = ctx.saved_tensors
        branches = KxKBranches(*inputs, *ctx.scale_rows)
        needs = dict(zip(KxKBranches._fields, ctx.needs_input_grad[1:]))
        if triton_route(grad):
            return (None, *_triton_backward(grad, branches, ctx.groups, needs))
        terms = _terms(branches, pattern_scales)
        ops = fused_kxk_ops(grad, ctx.groups, _expand_ratio(branches))
        if ops is not None:
            term_grads = _backward_fused(ops, grad, terms)
        else:
            term_grads = _backward_torch(grad, terms, _wanted_terms(needs), ctx.groups)
        grads = _branch_grads(term_grads, branches, needs['branch_scales'])
        return (None, *(grads.get(name) if needs[name] else None for name in KxKBranches._fields))


def _triton_args(branches: KxKBranches, groups: int) -> tuple:
    """The record as the Triton ops take it: the tensors, then the scale rows as ints."""
    return (*(getattr(branches, name)
              for name in _TENSOR_FIELDS), list(branches.pattern_rows), branches.expand_row
            or 0, branches.dws_row or 0, groups)


def _triton_backward(grad: Tensor, branches: KxKBranches, groups: int,
                     needs: Dict[str, bool]) -> Tuple[Optional[Tensor], ...]:
    """The wanted gradients of the record's fields in one fused launch (the CUDA path)."""
    wanted = [needs[name] for name in triton_ops().KXK_GRAD_NAMES]
    grads = dict(
        zip(
            triton_ops().KXK_GRAD_NAMES,
            triton_ops().kxk_kernel_backward(grad,
                                             *_triton_args(branches, groups)[:-1], groups, wanted)))
    return tuple(grads[name] if needs[name] and name in grads else None
                 for name in KxKBranches._fields)


def _terms(branches: KxKBranches, pattern_scales: Optional[Tensor] = None) -> _Terms:
    """The formula's terms of a record: views and a few small ops (stacks, M = I + R);
    ``pattern_scales`` are the pattern branches' scale rows when already gathered."""
    scales = branches.branch_scales
    matrices = [m.flatten(1) for m in _pattern_matrices(branches)]
    if matrices and pattern_scales is None:
        pattern_scales = _scale_rows(scales, branches.pattern_rows)
    expand_1x1 = None
    if branches.expand_residual is not None:
        expand_1x1 = branches.expand_residual.flatten(1) + branches.expand_identity
    return _Terms(
        origin=branches.origin,
        origin_scale=scales[0],
        pattern_matrices=torch.stack(matrices) if matrices else None,
        patterns=branches.patterns,
        pattern_scales=pattern_scales,
        expand_kxk=branches.expand_kxk,
        expand_1x1=expand_1x1,
        expand_scale=None if expand_1x1 is None else scales[branches.expand_row],
        pointwise=branches.pointwise,
        depthwise=branches.depthwise,
        dws_scale=None if branches.pointwise is None else scales[branches.dws_row])


def _pattern_matrices(branches: KxKBranches) -> List[Tensor]:
    """The present pattern branches' matrices A_b, in ``patterns`` order."""
    present = (getattr(branches, name) for name in _PATTERN_MATRIX_FIELDS)
    return [m for m in present if m is not None]


def _scale_rows(scales: Tensor, rows: Tuple[int, ...]) -> Tensor:
    """Rows of the scale matrix as one (len(rows), O) tensor: a view when they are adjacent
    (OREPA-VGG's avg and prior), else one stack of row views."""
    if rows == tuple(range(rows[0], rows[0] + len(rows))):
        return scales[rows[0]:rows[0] + len(rows)]
    return torch.stack([scales[row] for row in rows])


def _expand_ratio(branches: KxKBranches) -> int:
    """E of the depthwise-separable branch (0 without it)."""
    pointwise = branches.pointwise
    return 0 if pointwise is None else pointwise.shape[1] // branches.origin.shape[1]


def _wanted_terms(needs: Dict[str, bool]) -> Dict[str, bool]:
    """Which terms' gradients the inputs that need one are made of."""
    scales = needs['branch_scales']
    return dict(
        origin=needs['origin'],
        origin_scale=scales,
        pattern_matrices=any(needs[name] for name in _PATTERN_MATRIX_FIELDS),
        pattern_scales=scales,
        expand_kxk=needs['expand_kxk'],
        expand_1x1=needs['expand_residual'],
        expand_scale=scales,
        pointwise=needs['pointwise'],
        depthwise=needs['depthwise'],
        dws_scale=scales)


def _branch_grads(term_grads: Dict[str, Tensor], branches: KxKBranches,
                  scales_wanted: bool) -> Dict[str, Tensor]:
    """The gradients of the record's tensors, by field, from those of the terms."""
    grads = {
        name: term_grads[name]
        for name in ('origin', 'expand_kxk', 'pointwise', 'depthwise') if name in term_grads
    }
    if 'pattern_matrices' in term_grads:
        present = [name for name in _PATTERN_MATRIX_FIELDS if getattr(branches, name) is not None]
        for name, g in zip(present, term_grads['pattern_matrices']):
            grads[name] = g.reshape(getattr(branches, name).shape)
    if 'expand_1x1' in term_grads:
        grads['expand_residual'] = term_grads['expand_1x1'].reshape(branches.expand_residual.shape)
    if scales_wanted:
        grads['branch_scales'] = _scale_matrix_grad(term_grads, branches)
    return grads


def _scale_matrix_grad(term_grads: Dict[str, Tensor], branches: KxKBranches) -> Tensor:
    """The gradient of ``branch_scales``: the rows' gradients stacked in row order, one op."""
    rows = {0: term_grads['origin_scale']}
    if 'pattern_scales' in term_grads:
        rows.update(zip(branches.pattern_rows, term_grads['pattern_scales'].unbind(0)))
    if 'expand_scale' in term_grads:
        rows[branches.expand_row] = term_grads['expand_scale']
    if 'dws_scale' in term_grads:
        rows[branches.dws_row] = term_grads['dws_scale']
    return torch.stack([rows[row] for row in range(branches.branch_scales.shape[0])])


def _forward_torch(terms: _Terms, groups: int) -> Tensor:
    """The reference forward in PyTorch ops (any device, dtype and groups)."""
    origin, expand_kxk, pointwise = terms.origin, terms.expand_kxk, terms.pointwise
    o, i_g = origin.shape[:2]
    x = origin.shape[-1] * origin.shape[-2]
    out = origin * terms.origin_scale.view(-1, 1, 1, 1)
    if terms.pattern_matrices is not None:
        # (O, I_g, nb) @ (O, nb, X): the scaled 1x1 matrices times their fixed patterns.
        out.view(o, i_g, x).baddbmm_(
            terms.pattern_matrices.permute(1, 2, 0),
            (terms.patterns * terms.pattern_scales[:, :, None]).transpose(0, 1))
    if expand_kxk is not None:
        t_g, o_g = expand_kxk.shape[1], o // groups
        # C2 with its taps before its channels, (g, O_g * X, T_g), so that composing is one
        # large product per group: (O_g X, T_g) @ (T_g, I_g).
        kxk_t = expand_kxk.reshape(groups, o_g, t_g, x).transpose(2, 3)
        kxk_t = kxk_t.reshape(groups, o_g * x, t_g)
        composed = torch.bmm(kxk_t, terms.expand_1x1.reshape(groups, t_g, i_g))
        out.view(o, i_g, x).addcmul_(
            composed.view(o, x, i_g).transpose(1, 2), terms.expand_scale.view(-1, 1, 1))
    if pointwise is not None:
        in_channels = terms.depthwise.shape[0] // (pointwise.shape[1] // i_g)
        out += depthwise_pointwise_to_kernel(terms.depthwise,
                                             pointwise.flatten(1) * terms.dws_scale.view(-1, 1),
                                             in_channels, groups)
    return out


def _backward_torch(grad: Tensor, terms: _Terms, wanted: Dict[str, bool],
                    g: int) -> Dict[str, Tensor]:
    """The reference backward in PyTorch ops: the wanted terms' gradients, by name."""
    origin = terms.origin
    o, i_g = origin.shape[:2]
    x = origin.shape[-1] * origin.shape[-2]
    grad = grad.contiguous()
    g3 = grad.view(o, i_g, x)
    grads = {}
    if wanted['origin']:
        grads['origin'] = grad * terms.origin_scale.view(-1, 1, 1, 1)
    if wanted['origin_scale']:
        grads['origin_scale'] = (g3 * origin.view(o, i_g, x)).sum((1, 2))
    if terms.pattern_matrices is not None:
        grads.update(_pattern_grads(g3, terms, wanted))
    if terms.expand_kxk is not None:
        grads.update(_expand_grads(g3, terms, wanted, g))
    if terms.pointwise is not None:
        grads.update(_dws_grads(g3, terms, wanted, g))
    return grads


def _pattern_grads(g3: Tensor, terms: _Terms, wanted: Dict[str, bool]) -> Dict[str, Tensor]:
    """Gradients of the pattern matrices A_b and their scales v_b."""
    matrices, grads = terms.pattern_matrices, {}
    # h[o, b, i] = sum_x P_b[o, x] G[o, i, x]; with I as the long output axis the batched
    # product is ~2x faster than with (I, nb) outputs.
    h = torch.bmm(terms.patterns.transpose(0, 1), g3.transpose(1, 2)).transpose(0, 1)
    if wanted['pattern_matrices']:
        grads['pattern_matrices'] = torch.empty_like(matrices)
        torch.mul(h, terms.pattern_scales.unsqueeze(-1), out=grads['pattern_matrices'])
    if wanted['pattern_scales']:
        grads['pattern_scales'] = (h * matrices).sum(2)
    return grads


def _expand_grads(g3: Tensor, terms: _Terms, wanted: Dict[str, bool], g: int) -> Dict[str, Tensor]:
    """Gradients of the 1x1 -> kxk branch: C2, M and v_expand."""
    expand_kxk, expand_1x1, expand_scale = terms.expand_kxk, terms.expand_1x1, terms.expand_scale
    o, i_g, x = g3.shape
    t_g, o_g = expand_kxk.shape[1], o // g
    grads = {}
    # G with the taps before the input channels: (g, O_g * X, I_g).
    g_t = g3.reshape(g, o_g, i_g, x).transpose(2, 3).reshape(g, o_g * x, i_g)
    # h[o, t, x] = sum_i G[o, i, x] M[t, i]: the unscaled gradient of C2.
    h = torch.bmm(g_t, expand_1x1.reshape(g, t_g, i_g).transpose(1, 2))
    h = h.view(o, x, t_g).transpose(1, 2).contiguous()
    kxk3 = expand_kxk.reshape(o, t_g, x)
    if wanted['expand_scale']:
        grads['expand_scale'] = (h * kxk3).sum((1, 2))
    if wanted['expand_kxk']:
        grads['expand_kxk'] = h.mul_(expand_scale.view(-1, 1, 1)).view(expand_kxk.shape)
    if wanted['expand_1x1']:
        # v[o] C2[o, t, x] with t first, (g, T_g, O_g * X): the product below then contracts
        # the contiguous axis of one operand and the outer axis of the other.
        t_first = kxk3.view(g, o_g, t_g, x).transpose(1, 2)
        if is_compiling():
            # Traced out= ops do not keep the buffer's strides (AOTAutograd then cannot view
            # the result): the functional form, which Inductor fuses anyway.
            scaled = (t_first * expand_scale.view(g, 1, o_g, 1)).reshape(g, t_g, o_g * x)
        else:
            # Eager: one pass straight into the t-first layout.
            scaled = torch.empty(g, t_g, o_g, x, dtype=g3.dtype, device=g3.device)
            torch.mul(t_first, expand_scale.view(g, 1, o_g, 1), out=scaled)
            scaled = scaled.view(g, t_g, o_g * x)
        # dM[t, i] = sum_{o, x} v[o] C2[o, t, x] G[o, i, x]
        grads['expand_1x1'] = torch.bmm(scaled, g_t).reshape(expand_1x1.shape)
    return grads


def _dws_grads(g3: Tensor, terms: _Terms, wanted: Dict[str, bool], g: int) -> Dict[str, Tensor]:
    """Gradients of the depthwise-separable branch: PW, DW and v_dws."""
    pointwise, depthwise, dws_scale = terms.pointwise, terms.depthwise, terms.dws_scale
    o, i_g, x = g3.shape
    e = pointwise.shape[1] // i_g
    o_g = o // g
    grads = {}
    dw = depthwise.reshape(g * i_g, e, x)
    pw = pointwise.reshape(o, i_g, e)
    g_i = g3.reshape(g, o_g, i_g, x).permute(0, 2, 1, 3).reshape(g * i_g, o_g, x)
    # h[o, i, e] = sum_x G[o, i, x] DW[i, e, x]
    h = torch.bmm(g_i, dw.transpose(1, 2))  # (g * I_g, O_g, E)
    h = h.reshape(g, i_g, o_g, e).permute(0, 2, 1, 3).reshape(o, i_g, e)
    if wanted['pointwise']:
        grads['pointwise'] = (h * dws_scale.view(-1, 1, 1)).reshape(pointwise.shape)
    if wanted['dws_scale']:
        grads['dws_scale'] = (h * pw).sum((1, 2))
    if wanted['depthwise']:
        scaled = (pw * dws_scale.view(-1, 1, 1)).reshape(g, o_g, i_g, e)
        scaled = scaled.permute(0, 2, 3, 1).reshape(g * i_g, e, o_g)
        # dDW[i, e, x] = sum_o v[o] PW[o, i, e] G[o, i, x]
        grads['depthwise'] = torch.bmm(scaled, g_i).reshape(depthwise.shape)
    return grads


def _dws_factors(terms: _Terms) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """PW (O, I, E) and DW (I, E, X) as the fused loops read them (None without the branch)."""
    if terms.pointwise is None:
        return None, None
    o, i = terms.origin.shape[:2]
    x = terms.origin.shape[-1] * terms.origin.shape[-2]
    e = terms.pointwise.shape[1] // i
    return terms.pointwise.reshape(o, i, e), terms.depthwise.reshape(i, e, x)


def _forward_fused(ops, terms: _Terms) -> Tensor:
    """The forward on the fused CPU loops (float32, groups = 1): same result as the reference."""
    origin, expand_kxk = terms.origin, terms.expand_kxk
    o, i = origin.shape[:2]
    x = origin.shape[-1] * origin.shape[-2]
    composed = None
    if expand_kxk is not None:
        t = expand_kxk.shape[1]
        # v[o] C2 with its taps first, (O X, T): one large product composes the branch.
        kxk_t = ops.taps_first_scaled(*_contiguous(expand_kxk.reshape(o, t, x), terms.expand_scale))
        composed = torch.mm(kxk_t.view(o * x, t), terms.expand_1x1).view(o, x, i)
    pw, dw = _dws_factors(terms)
    out = ops.assemble(*_contiguous(
        origin.view(o, i, x), terms.origin_scale, terms.pattern_matrices, terms.patterns,
        terms.pattern_scales, composed, pw, dw, terms.dws_scale))
    return out.view(origin.shape)


def _backward_fused(ops, grad: Tensor, terms: _Terms) -> Dict[str, Tensor]:
    """All terms' gradients on the fused CPU loops plus three large products, by name."""
    origin, expand_kxk = terms.origin, terms.expand_kxk
    o, i = origin.shape[:2]
    x = origin.shape[-1] * origin.shape[-2]
    grad = grad.contiguous()
    pw, dw = _dws_factors(terms)
    (d_origin, d_origin_scale, d_matrices, d_pattern_scales, d_pw, d_dw, d_dws_scale,
     g_t) = ops.branch_backward(
         *_contiguous(
             grad.view(o, i, x), origin.view(o, i, x), terms.origin_scale, terms.pattern_matrices,
             terms.patterns, terms.pattern_scales, pw, dw, terms.dws_scale), expand_kxk is not None)
    grads = dict(origin=d_origin.view(origin.shape), origin_scale=d_origin_scale)
    if terms.pattern_matrices is not None:
        grads.update(pattern_matrices=d_matrices, pattern_scales=d_pattern_scales)
    if terms.pointwise is not None:
        grads.update(
            pointwise=d_pw.view(terms.pointwise.shape),
            depthwise=d_dw.view(terms.depthwise.shape),
            dws_scale=d_dws_scale)
    if expand_kxk is not None:
        t = expand_kxk.shape[1]
        g_t = g_t.view(o * x, i)
        # h[o, x, t] = sum_i G[o, i, x] M[t, i]: the unscaled gradient of C2, taps first.
        h = torch.mm(g_t, terms.expand_1x1.t())
        kxk3, expand_scale = _contiguous(expand_kxk.reshape(o, t, x), terms.expand_scale)
        d_kxk, d_expand_scale = ops.compose_backward(h.view(o, x, t), kxk3, expand_scale)
        # dM[t, i] = sum_{o, x} v[o] C2[o, t, x] G[o, i, x]
        scaled = ops.t_major_scaled(kxk3, expand_scale).view(t, o * x)
        grads.update(
            expand_kxk=d_kxk.view(expand_kxk.shape),
            expand_scale=d_expand_scale,
            expand_1x1=torch.mm(scaled, g_t))
    return grads


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]
