"""The gates a conversion passes before anything is written (:mod:`.reparameterize`).

Every output of the train-time model and of the deployed one is compared on one input: the
conversion in float64 (exact to ~1e-12, so any structural mistake stands out by orders of
magnitude), the written artefact's float32 weights run in float64, float32-only outputs in
float32, and optionally the exported ONNX graph in onnxruntime. Beyond a gate:
:class:`~orepa_mm.utils.errors.VerificationError`, nothing written.
"""
import contextlib
import copy
import warnings
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from ..utils.errors import ReparameterizeError, VerificationError
from ..utils.text_table import format_rows, log_step
from .verification import (OUTPUT_GROUPS, OutputError, check_onnx, compare_outputs, export_onnx,
                           model_outputs, run_safely)

#: What a conversion writes: the stock checkpoint, its stock config, optionally the ONNX graph.
DEPLOY_CHECKPOINT = 'deploy.pth'
DEPLOY_CONFIG = 'deploy_config.py'
DEPLOY_ONNX = 'deploy_backbone.onnx'

#: Gate of the float64 comparison: conversions are exact to ~1e-12 there, while a wrong
#: conversion (or even a kernel rounded to float32) is off by 1e-7 or much more.
DEFAULT_RTOL = 1e-9
#: Outputs that cannot run in float64 (float32-only post-processing) and onnxruntime (the
#: exported float32 graph) are compared in float32: their agreement is float32 rounding.
FLOAT32_RTOL = ONNX_RTOL = 1e-4
#: Gate of the written artefact: deploy.pth's float32 weights in the stock model, run in float64
#: against the float64 train-time outputs. Their rounding to float32 moves outputs by ~1e-7 to
#: 1e-6; a damaged, swapped or half-precision tensor by 1e-3 or more.
ARTEFACT_RTOL = 1e-4
#: The artefact gate's row in the table (the worst output) and the float32 row (information).
ARTEFACT_ROW = 'deploy.pth as written (float32 weights), worst output'
FLOAT32_ROW = 'float32 (written weights), worst output'


def format_errors(errors: Sequence[OutputError], rtol: float) -> List[str]:
    """One line per compared output: max abs error, relative error, verdict."""
    rows = [('output', 'max abs err', 'rel err', f'rtol {rtol:g}')]
    for e in errors:
        verdict = ('ok' if e.passes(rtol) else 'FAIL') if e.gated else 'info'
        rows.append((e.name, f'{e.max_abs:.3g}', f'{e.rel:.3g}',
                     verdict + (f' ({e.note})' if e.note else '')))
    return format_rows(rows)


def _outputs(model: nn.Module,
             image: torch.Tensor,
             dtype: torch.dtype,
             what: str,
             groups: Sequence[str] = OUTPUT_GROUPS) -> Dict[str, torch.Tensor]:
    with warnings.catch_warnings(), _true_float32():
        warnings.simplefilter('ignore')
        try:
            return run_safely(f'running the {what} model', model_outputs, model, image, dtype,
                              groups)
        except RuntimeError as exc:
            raise ReparameterizeError(f'{exc}; if the input size is the cause, pass --input-size '
                                      'H W.') from exc


@contextlib.contextmanager
def _true_float32():
    """TF32 off for the comparison: float32 outputs are then float32 on a GPU too."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _exact_outputs(models: Sequence[Tuple[nn.Module, str]],
                   image: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
    """The float64 models' outputs, as far as the model runs in float64: some
    post-processing (mmcv's NMS in an RPN or in ``predict``) has float32-only kernels, so the
    groups from the first that fails on are left to the float32 comparison."""
    for last in range(len(OUTPUT_GROUPS), 0, -1):
        groups = OUTPUT_GROUPS[:last]
        try:
            return [_outputs(m, image, torch.float64, what, groups) for m, what in models]
        except ReparameterizeError:
            if last == 1:
                raise
    raise AssertionError('unreachable')


def verify_deployment(model: nn.Module, stock: nn.Module, exact: Tuple[nn.Module, nn.Module],
                      image: torch.Tensor, rtol: float, verbose: bool) -> List[OutputError]:
    """Every output of both models on ``image``; :class:`VerificationError` beyond the gates.

    ``stock`` is the artefact: the stock model holding exactly the tensors ``deploy.pth`` will
    hold (``deploy_config.py`` + ``deploy.pth`` as read back); ``exact`` are float64 copies of the
    train-time model and of the float64-baked deployed one. Gates, all of which must pass:

    * the conversion, in float64 (both models, kernels baked in float64 and kept in float64):
      rounding, TF32 convolutions and the order of float32 sums cannot touch it, so a
      conversion is exact to ~1e-12 and any structural mistake stands out by orders of
      magnitude (``rtol``);
    * the artefact: its float32 weights, cast exactly to float64 and run in float64, against
      the same float64 train-time outputs. Only the rounding of the weights to float32 is left
      (~1e-7..1e-6), while float32 activations would add 1e-6..2e-4 of noise on deep models;
      a damaged, swapped or half-precision tensor is beyond ``ARTEFACT_RTOL`` by orders of
      magnitude. One row, the worst output (``ARTEFACT_ROW``);
    * outputs whose computation cannot run in float64 (mmcv's float32-only NMS): the artefact
      in float32 with TF32 off against the float32 train-time model, at ``FLOAT32_RTOL``.

    The float32 agreement on the other outputs (what a float32 user sees) is reported beside,
    for information.
    """
    model64, stock64 = exact
    artefact64 = copy.deepcopy(stock).double().eval()  # float32 -> float64 is exact
    reference, actual, written = _exact_outputs([(model64, 'train-time'), (stock64, 'deployed'),
                                                 (artefact64, 'deployed')], image)
    del model64, stock64, artefact64
    errors = compare_outputs(reference, actual)
    gated = [e for e in compare_outputs(reference, written) if e.gated]
    if gated:
        worst = max(gated, key=lambda e: e.rel)
        errors.append(
            OutputError(
                ARTEFACT_ROW, worst.max_abs, worst.rel, tolerance=ARTEFACT_RTOL, note=worst.name))
    fp32 = compare_outputs(
        _outputs(model, image, torch.float32, 'train-time'),
        _outputs(stock, image, torch.float32, 'deployed'))
    for error in fp32:
        if error.name not in reference:
            error.tolerance = FLOAT32_RTOL
            error.note = 'float32: cannot run in float64'
            errors.append(error)
    informative = [e for e in fp32 if e.gated and e.name in reference]
    if informative:
        worst = max(informative, key=lambda e: e.rel)
        errors.append(
            OutputError(FLOAT32_ROW, worst.max_abs, worst.rel, gated=False, note=worst.name))
    log_step('deployed vs train-time, per output:\n' + '\n'.join(format_errors(errors, rtol)),
             verbose)
    failed = [e for e in errors if not e.passes(rtol)]
    if failed:
        raise VerificationError(_failure_message(failed, rtol), errors)
    return errors


def _failure_message(failed: Sequence[OutputError], rtol: float) -> str:
    worst = max(failed, key=lambda e: e.rel)
    if worst.name == ARTEFACT_ROW:
        what = f'{worst.note} of {DEPLOY_CHECKPOINT} as written'
        precision = 'float64 from its float32 weights'
    else:
        what = worst.name
        precision = 'float64' if worst.tolerance is None else 'float32'
    gate = rtol if worst.tolerance is None else worst.tolerance
    return (f'the deployed model differs from the train-time model: {len(failed)} outputs '
            f'beyond their tolerance (worst {what}, relative error {worst.rel:.3g} in '
            f'{precision}, rtol {gate:g}); nothing written.')


def export_and_check_onnx(stock: nn.Module, inputs: torch.Tensor, path: str,
                          errors: List[OutputError], verbose: bool) -> List[OutputError]:
    """Export backbone (+ neck) to ``path`` and compare onnxruntime with PyTorch (float32,
    gated at ``ONNX_RTOL``)."""
    rtol = ONNX_RTOL
    log_step('exporting backbone (+neck) to ONNX and checking onnxruntime', verbose)
    try:
        names = run_safely('ONNX export', export_onnx, stock, inputs, path)
        onnx_errors = run_safely('onnxruntime', check_onnx, stock, inputs, path, names)
    except RuntimeError as exc:
        raise ReparameterizeError(f'{exc}.') from exc
    for error in onnx_errors:
        error.tolerance = rtol
    log_step('onnxruntime vs PyTorch, per output:\n' + '\n'.join(format_errors(onnx_errors, rtol)),
             verbose)
    failed = [e for e in onnx_errors if not e.passes(rtol)]
    if failed:
        worst = max(failed, key=lambda e: e.rel)
        raise VerificationError(
            f'onnxruntime differs from PyTorch on the deployed backbone: {worst.name} '
            f'relative error {worst.rel:.3g} > rtol {rtol:g}; nothing written.',
            errors + onnx_errors)
    return onnx_errors
