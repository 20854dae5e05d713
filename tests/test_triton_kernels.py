"""The Triton kernel-generation ops (the CUDA path) against explicit formulas, on the CPU.

``orepa_mm.cnn.triton_kernels`` runs its Triton kernels on CPU tensors only under Triton's
interpreter, which must be switched on before ``triton`` is imported: the cases run in one
fresh interpreter (this file run as a script, ``TRITON_INTERPRET=1 OREPA_MM_TRITON_ON_CPU=1``),
which prints each case's largest relative error as JSON; the tests below check them. The
reference is plain autograd over the formulas written out here (not the production code):
the kernel and the gradient of every input, float64 (rtol 1e-10) and float32 (rtol 1e-5),
over branch subsets x groups x kernel size x expand ratio, with every gradient wanted and
with only some wanted (the others must come back as None).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ALL = ('origin', 'avg', 'prior', '1x1_kxk', '1x1', 'dws')
#: (branches, in, out, groups, k, expand ratio): every branch subset that matters, grouped
#: and not, k = 1 and 3, expand ratios 1, 2, 3 (not a power of two) and 8; one case with more
#: channels than one 16-wide tile (the kernels' loops over blocks) and one with odd sizes.
KXK_CASES = [
    (ALL, 8, 8, 1, 3, 2),
    (ALL, 8, 12, 2, 3, 3),
    (ALL, 6, 10, 1, 1, 1),
    (('origin', 'avg', 'prior', '1x1_kxk', 'dws'), 8, 8, 4, 3, 8),
    (('origin', ), 5, 7, 1, 3, 1),
    (('origin', 'prior', '1x1'), 8, 8, 2, 3, 1),
    (('origin', '1x1_kxk'), 20, 18, 1, 3, 1),
    (('origin', 'dws'), 18, 20, 2, 3, 2),
]
#: (in, out, inner): the pair's square factor is the smaller side, as the layer builds it.
POINTWISE_CASES = [(8, 16, 8), (16, 8, 8), (6, 20, 6), (20, 12, 12)]
RTOL = {'float64': 1e-10, 'float32': 1e-5}


# -- the reference formulas ---------------------------------------------------------------------
def make_kxk_inputs(branches, cin, cout, groups, k, expand, dtype):
    """Random branch tensors as the layer holds them, and the custom op's int arguments."""
    gen = torch.Generator().manual_seed(len(branches) * 1000 + cin * 10 + groups + k + expand)
    i_g, x = cin // groups, k * k
    t = cin if groups <= 4 else 2 * cin

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    present = [b for b in ('avg', 'prior', '1x1') if b in branches]
    tensors = dict(
        origin=rand(cout, i_g, k, k),
        branch_scales=rand(len(branches), cout),
        avg_1x1=None,
        prior_1x1=None,
        centre_1x1=None,
        patterns=None,
        expand_residual=None,
        expand_identity=None,
        expand_kxk=None,
        depthwise=None,
        pointwise=None)
    for branch, name in (('avg', 'avg_1x1'), ('prior', 'prior_1x1'), ('1x1', 'centre_1x1')):
        if branch in branches:
            tensors[name] = rand(cout, i_g, 1, 1)
    if present:
        tensors['patterns'] = rand(len(present), cout, x)
    if '1x1_kxk' in branches:
        tensors['expand_residual'] = rand(t, i_g, 1, 1)
        identity = torch.zeros(t, i_g, dtype=dtype)
        identity[torch.arange(t), torch.arange(t) % i_g] = 1.0
        tensors['expand_identity'] = identity
        tensors['expand_kxk'] = rand(cout, t // groups, k, k)
    if 'dws' in branches:
        tensors['depthwise'] = rand(cin * expand, 1, k, k)
        tensors['pointwise'] = rand(cout, cin * expand // groups, 1, 1)
    rows = dict(
        pattern_rows=[branches.index(b) for b in present],
        expand_row=branches.index('1x1_kxk') if '1x1_kxk' in branches else 0,
        dws_row=branches.index('dws') if 'dws' in branches else 0,
        groups=groups)
    return tensors, rows


def reference_kxk(t, pattern_rows, expand_row, dws_row, groups):
    """K[o, i] = sum over branches of v_branch[o] times the branch's kernel, per group."""
    origin, scales = t['origin'], t['branch_scales']
    o, i_g, k, _ = origin.shape
    o_g = o // groups

    def scaled(row, kernel):
        return scales[row].view(-1, 1, 1, 1) * kernel

    kernel = scaled(0, origin)
    matrices = [t[n] for n in ('avg_1x1', 'prior_1x1', 'centre_1x1') if t[n] is not None]
    for b, (row, matrix) in enumerate(zip(pattern_rows, matrices)):
        pattern = t['patterns'][b].view(o, 1, k, k)
        kernel = kernel + scaled(row, matrix.view(o, i_g, 1, 1) * pattern)
    if t['expand_kxk'] is not None:
        first = t['expand_residual'].flatten(1) + t['expand_identity']  # (T, I_g)
        second = t['expand_kxk']  # (O, T_g, k, k)
        per_group = [
            torch.einsum('otyx,ti->oiyx', second[g * o_g:(g + 1) * o_g],
                         first[g * second.shape[1]:(g + 1) * second.shape[1]])
            for g in range(groups)
        ]
        kernel = kernel + scaled(expand_row, torch.cat(per_group))
    if t['pointwise'] is not None:
        e = t['pointwise'].shape[1] // i_g
        dw = t['depthwise'].view(groups, i_g, e, k, k)
        pw = t['pointwise'].view(groups, o_g, i_g, e)
        composed = torch.einsum('goie,gieyx->goiyx', pw, dw).reshape(o, i_g, k, k)
        kernel = kernel + scaled(dws_row, composed)
    return kernel


def reference_pointwise(origin, scales, second, first):
    return scales[0].view(-1, 1) * origin + scales[1].view(-1, 1) * (second @ first)


# -- the subprocess: runs the Triton ops under the interpreter ----------------------------------
def _relative_error(actual, expected) -> float:
    if actual is None or expected is None:
        return 0.0 if actual is None and expected is None else float('inf')
    scale = expected.abs().max().clamp_min(1e-30)
    return float((actual - expected).abs().max() / scale)


def _compare(op, reference, tensors: dict, args: dict, wanted) -> dict:
    """Forward and the gradients of ``wanted`` inputs: op (autograd over the custom op)
    against reference (autograd over the formula); largest relative error of each."""
    results = {}
    leaves = {}
    for side, fn in (('op', op), ('ref', reference)):
        inputs = {
            n: None if v is None else v.clone().requires_grad_(n in wanted)
            for n, v in tensors.items()
        }
        out = fn(inputs, args)
        upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
        (out * upstream).sum().backward()
        leaves[side] = (out.detach(), {n: None if v is None else v.grad for n, v in inputs.items()})
    results['forward'] = _relative_error(leaves['op'][0], leaves['ref'][0])
    for name in tensors:
        if name in wanted and tensors[name] is not None:
            results[name] = _relative_error(leaves['op'][1][name], leaves['ref'][1][name])
        elif leaves['op'][1][name] is not None:
            results[name] = float('inf')  # a gradient nobody asked for
    return results


def _kxk_op(inputs, args):
    from orepa_mm.cnn import triton_kernels
    return triton_kernels.kxk_kernel(*inputs.values(), **args)


def _kxk_reference(inputs, args):
    return reference_kxk(inputs, **args)


def _pointwise_op(inputs, args):
    from orepa_mm.cnn import triton_kernels
    return triton_kernels.pointwise_kernel(*inputs.values(), 0, 1)


def _pointwise_reference(inputs, args):
    return reference_pointwise(*inputs.values())


#: A subset of the gradients (the others must come back as None): scales and the first factor
#: (the first-factor task alone), or the depthwise factor and the origin.
KXK_PARTIAL = (('branch_scales', 'expand_residual', 'prior_1x1'), ('origin', 'depthwise'))


def run_cases() -> dict:
    """Every case under the interpreter: {case id: {quantity: relative error}}."""
    results = {}
    for dtype_name in RTOL:
        dtype = getattr(torch, dtype_name)
        for n, case in enumerate(KXK_CASES):
            tensors, args = make_kxk_inputs(*case, dtype)
            every = [
                name for name, v in tensors.items()
                if v is not None and name not in ('patterns', 'expand_identity')
            ]
            results[f'kxk{n}-{dtype_name}'] = _compare(_kxk_op, _kxk_reference, tensors, args,
                                                       every)
            partial = KXK_PARTIAL[n % 2]
            results[f'kxk{n}-partial-{dtype_name}'] = _compare(_kxk_op, _kxk_reference, tensors,
                                                               args, partial)
        for n, (cin, cout, inner) in enumerate(POINTWISE_CASES):
            gen = torch.Generator().manual_seed(n)
            tensors = {
                name: torch.randn(*shape, generator=gen, dtype=dtype)
                for name, shape in (('origin', (cout, cin)), ('scales', (2, cout)),
                                    ('second', (cout, inner)), ('first', (inner, cin)))
            }
            results[f'pointwise{n}-{dtype_name}'] = _compare(_pointwise_op, _pointwise_reference,
                                                             tensors, {}, tuple(tensors))
            results[f'pointwise{n}-partial-{dtype_name}'] = _compare(_pointwise_op,
                                                                     _pointwise_reference, tensors,
                                                                     {}, ('scales', 'first'))
    return results


def run_op_checks() -> dict:
    """torch.library.opcheck of the four ops (schema, autograd registration, fake tensors,
    AOT dispatch), and a fullgraph torch.compile of the k x k op: {check: 'SUCCESS' or error}."""
    from orepa_mm.cnn import triton_kernels
    results = {}
    tensors, args = make_kxk_inputs(*KXK_CASES[1], torch.float64)
    leaves = [
        None if v is None else v.clone().requires_grad_(n not in ('patterns', 'expand_identity'))
        for n, v in tensors.items()
    ]
    rows = (args['pattern_rows'], args['expand_row'], args['dws_row'], args['groups'])
    grad = torch.linspace(
        -1, 1, tensors['origin'].numel(), dtype=torch.float64).view(tensors['origin'].shape)
    detached = [None if v is None else v.detach() for v in leaves]
    pair = [
        torch.randn(
            *shape,
            generator=torch.Generator().manual_seed(3),
            dtype=torch.float64,
            requires_grad=True) for shape in ((8, 6), (2, 8), (8, 6), (6, 6))
    ]
    pair_grad = torch.linspace(-1, 1, 48, dtype=torch.float64).view(8, 6)
    ops = torch.ops.orepa_mm
    checks = {
        'kxk_kernel': (ops.kxk_kernel.default, (*leaves, *rows)),
        'kxk_kernel_backward':
        (ops.kxk_kernel_backward.default,
         (grad, *detached, *rows, [True, True, False, True, True, True, False, True, False])),
        'pointwise_kernel': (ops.pointwise_kernel.default, (*pair, 0, 1)),
        'pointwise_kernel_backward':
        (ops.pointwise_kernel_backward.default, (pair_grad, *(p.detach() for p in pair), 0, 1,
                                                 [False, True, True, True])),
    }
    for name, (op, op_args) in checks.items():
        for check, outcome in torch.library.opcheck(op, op_args).items():
            results[f'{name}:{check}'] = outcome if outcome == 'SUCCESS' else repr(outcome)
    compiled = torch.compile(
        lambda *t: triton_kernels.kxk_kernel(*t, *rows), backend='aot_eager', fullgraph=True)
    out = compiled(*leaves)
    (out * grad).sum().backward()
    eager_leaves = [
        None if v is None else v.detach().clone().requires_grad_(v.requires_grad) for v in leaves
    ]
    (triton_kernels.kxk_kernel(*eager_leaves, *rows) * grad).sum().backward()
    same = all(
        a is None or a.grad is None or torch.equal(a.grad, b.grad)
        for a, b in zip(leaves, eager_leaves))
    results['compile:fullgraph'] = 'SUCCESS' if same else 'gradients differ from eager'
    return results


def _run_interpreted() -> dict:
    env = dict(
        os.environ,
        TRITON_INTERPRET='1',
        OREPA_MM_TRITON_ON_CPU='1',
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, __file__],
                          cwd=ROOT,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def interpreted_run():
    return _run_interpreted()


@pytest.fixture
def interpreted(interpreted_run):
    return interpreted_run['cases']


CASE_IDS = [f'kxk{n}' for n in range(len(KXK_CASES))
            ] + [f'pointwise{n}' for n in range(len(POINTWISE_CASES))]


@pytest.mark.parametrize('dtype_name', list(RTOL))
@pytest.mark.parametrize('case', CASE_IDS)
def test_triton_ops_match_the_formulas(interpreted, case, dtype_name):
    """Forward and every gradient, all wanted and some wanted (the rest None)."""
    for variant in ('', '-partial'):
        errors = interpreted[f'{case}{variant}-{dtype_name}']
        assert 'forward' in errors and len(errors) >= 2, errors
        worst = {name: err for name, err in errors.items() if not err <= RTOL[dtype_name]}
        assert not worst, (case + variant, worst)


def test_cases_cover_every_gradient(interpreted):
    """The all-wanted k x k cases compare a gradient for every branch input, once at least."""
    seen = set()
    for n in range(len(KXK_CASES)):
        seen |= set(interpreted[f'kxk{n}-float64'])
    assert seen == {
        'forward', 'origin', 'branch_scales', 'avg_1x1', 'prior_1x1', 'centre_1x1',
        'expand_residual', 'expand_kxk', 'depthwise', 'pointwise'
    }


def test_ops_pass_opcheck_and_compile_without_graph_breaks(interpreted_run):
    checks = interpreted_run['checks']
    assert len(checks) == 17, checks
    assert {name: c for name, c in checks.items() if c != 'SUCCESS'} == {}


def test_scale_rows_must_belong_to_present_branches():
    """A row of branch_scales that scales nothing would get no gradient: one sentence, raised
    before any launch (so it runs here, without the interpreter)."""
    pytest.importorskip('triton')
    from orepa_mm.cnn import triton_kernels
    tensors, args = make_kxk_inputs(('origin', 'avg'), 4, 4, 1, 3, 1, torch.float64)
    tensors['branch_scales'] = torch.ones(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r'each row of branch_scales \(3, 4\) must scale one'):
        triton_kernels.kxk_kernel(*tensors.values(), **args)


def test_route_is_off_on_the_cpu_without_the_switch():
    """In this (uninterpreted) process CPU tensors keep the PyTorch / fused C++ path."""
    if os.environ.get('OREPA_MM_TRITON_ON_CPU') == '1':
        pytest.skip('the switch is on in this process')
    from orepa_mm.cnn.fused_ops import triton_route
    assert not triton_route(torch.zeros(1))
    assert not triton_route(torch.zeros(1, dtype=torch.float64))


if __name__ == '__main__':
    torch.set_num_threads(1)
    print(json.dumps(dict(cases=run_cases(), checks=run_op_checks())))
