"""What post-training INT8 quantization does to a deployed model, per output and per layer.

:func:`quantization_check` is ``tools/quantization_check.py``: it reads a directory written by
``tools/reparameterize.py`` (``deploy.pth`` + ``deploy_config.py``) and

1. exports the deployed backbone (+ neck) to ONNX (:func:`~.verification.export_onnx`: the
   TorchScript exporter folds every eval-mode BN into its conv, as deployment does);
2. quantizes it with ONNX Runtime's post-training static quantization
   (``onnxruntime.quantization.quantize_static``): QDQ format, weights int8 per output channel
   (symmetric), activations uint8 per tensor (asymmetric), ranges calibrated (MinMax by default)
   on the first ``calib`` images of the config's val dataset, each through the model's own
   ``data_preprocessor``;
3. runs the fp32 and the INT8 graphs (ONNX Runtime, CPU) on the ``images`` val images that
   follow and reports, per output, the cosine similarity and the SQNR (dB) of INT8 against fp32
   (:mod:`.quantization_metrics`, over all test images together);
4. lists the layers most at risk: per deployed conv (the ONNX ``Conv`` nodes, BN folded), the
   spread of its per-output-channel weight ranges (``weight_spread``: max over channels of
   max|w| / median over channels of max|w|), the calibrated range of the activation it consumes
   (what its per-tensor uint8 quantization spans), that activation's own per-channel spread and
   the SQNR of quantizing that activation alone; sorted by weight spread;
5. with ``evaluate=True``: the task metric (the config's ``val_evaluator`` over the whole val
   dataset) with backbone + neck run by the fp32 and by the INT8 ONNX Runtime session inside
   the mm model (``model.extract_feat`` replaced; heads, RPN, post-processing in PyTorch).

The report goes to stdout; ``out`` (JSON) and ``save_onnx`` (the INT8 model) are written only
after everything succeeded, under the tools' write policy (:mod:`orepa_mm.utils.atomic_write`: both
names checked before any work, staged beside them, moved into place together). Bad input
raises :class:`QuantizationCheckError` (one sentence, ``exit_code`` 2) before anything is
written.

:func:`~.quantization_onnx.analyse_model` is steps 1-4 on any module with a ``backbone`` (and
optionally a neck and ``with_neck``) and given input tensors: what the tests call on small
synthetic models.
"""
import contextlib
import copy
import io
import json
import os.path as osp
import tempfile
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..deploy import count_reparameterizable
from ..utils.atomic_write import OutputSet
from ..utils.checkpoint_check import state_dict_mismatch
from ..utils.checkpoint_io import checkpoint_weights, read_checkpoint
from ..utils.config_io import build_model, read_config
from ..utils.errors import first_line, refusals_as
from .quantization_onnx import (CALIBRATION_METHODS, OnnxFeatures, QuantizationCheckError,
                                analyse_model)
from .quantization_report import QuantizationReport
from .reparameterize import DEPLOY_CHECKPOINT, DEPLOY_CONFIG, log_step

#: Defaults of the command line: small, so that a check takes a minute on a CPU.
DEFAULT_CALIB_IMAGES = 8
DEFAULT_TEST_IMAGES = 8


def evaluate(model: nn.Module,
             cfg,
             extract_feat: Optional[Callable] = None,
             progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, float]:
    """The config's ``val_evaluator`` over its whole ``val_dataloader``, with ``extract_feat``
    (e.g. :class:`OnnxFeatures`) in place of the model's own backbone (+ neck)."""
    from mmengine.evaluator import Evaluator
    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner

    loader_cfg = copy.deepcopy(cfg.val_dataloader)
    loader_cfg['num_workers'] = 0
    loader_cfg['persistent_workers'] = False
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' "loading annotations"
            loader = Runner.build_dataloader(loader_cfg)
            evaluator = Evaluator(copy.deepcopy(cfg.val_evaluator))
        if hasattr(loader.dataset, 'metainfo'):
            evaluator.dataset_meta = loader.dataset.metainfo
        saved = model.__dict__.get('extract_feat')
        if extract_feat is not None:
            model.extract_feat = extract_feat
        try:
            model.eval()
            # pycocotools and friends print their tables to stdout: not this report's
            with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
                for index, batch in enumerate(loader):
                    outputs = model.test_step(batch)
                    evaluator.process(data_samples=outputs, data_batch=batch)
                    if progress:
                        progress(index + 1, len(loader))
                metrics = evaluator.evaluate(len(loader.dataset))
        finally:
            if saved is None:
                model.__dict__.pop('extract_feat', None)
            else:
                model.extract_feat = saved
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


#: The metric to put first, by library (the rest follow in the evaluator's order).
HEADLINE_METRICS = ('coco/bbox_mAP', 'mIoU', 'accuracy/top1')


# -- the deploy directory ---------------------------------------------------------------------
def _check_deploy_dir(deploy_dir: str) -> Tuple[str, str]:
    if not osp.exists(deploy_dir):
        raise QuantizationCheckError(f'deploy directory {deploy_dir} does not exist.')
    if not osp.isdir(deploy_dir):
        raise QuantizationCheckError(f'{deploy_dir} is not a directory; pass the --out directory '
                                     'of tools/reparameterize.py.')
    missing = [
        name for name in (DEPLOY_CHECKPOINT, DEPLOY_CONFIG)
        if not osp.isfile(osp.join(deploy_dir, name))
    ]
    if missing:
        raise QuantizationCheckError(
            f'{deploy_dir} is not a deploy directory: it has no {" and no ".join(missing)} '
            '(write them with tools/reparameterize.py CONFIG CHECKPOINT --out DIR).')
    return osp.join(deploy_dir, DEPLOY_CONFIG), osp.join(deploy_dir, DEPLOY_CHECKPOINT)


def _check_deployed(model: nn.Module, config: str) -> None:
    layers = count_reparameterizable(model)
    if layers:
        raise QuantizationCheckError(f'the model of {config} is a train-time model ({layers} '
                                     'OREPA/DBB layers); re-parameterize it first with '
                                     'tools/reparameterize.py.')
    blocks = [
        name for name, m in model.named_modules()
        if callable(getattr(m, 'switch_to_deploy', None)) and getattr(m, 'deploy', None) is False
    ]
    if blocks:
        raise QuantizationCheckError(f'the model of {config} still has multi-branch blocks '
                                     f'({blocks[0]}, deploy=False); deploy it first.')


def _val_dataset(cfg, config: str):
    from mmengine.registry import DATASETS, DefaultScope

    from ..utils.data_check import MissingDatasetError, check_dataset_paths
    loader = cfg.get('val_dataloader')
    if not isinstance(loader, dict) or not isinstance(loader.get('dataset'), dict):
        raise QuantizationCheckError(f'config {config} has no val_dataloader with a dataset; '
                                     'calibration and evaluation take their images from it.')
    try:
        check_dataset_paths(cfg, ('val', ))
    except MissingDatasetError as exc:
        raise QuantizationCheckError(f'{exc}') from None
    try:
        with DefaultScope.overwrite_default_scope(cfg.get('default_scope')), \
                contextlib.redirect_stdout(io.StringIO()):  # pycocotools' "loading annotations"
            dataset = DATASETS.build(copy.deepcopy(loader['dataset']))
    except Exception as exc:  # noqa: BLE001
        raise QuantizationCheckError(f'cannot build the val dataset of {config} '
                                     f'({type(exc).__name__}: {first_line(exc)}).') from exc
    if len(dataset) == 0:
        raise QuantizationCheckError(f'the val dataset of {config} is empty.')
    return dataset


def _preprocessed(model: nn.Module, dataset, indices: Sequence[int]) -> List[Tensor]:
    """Each image through the test pipeline and ``model.data_preprocessor``, one at a time."""
    from mmengine.dataset import pseudo_collate
    inputs = []
    with torch.no_grad():
        for index in indices:
            batch = model.data_preprocessor(pseudo_collate([dataset[index]]), False)
            inputs.append(batch['inputs'].float())
    return inputs


def _split(total: int, calib: int, images: int) -> Tuple[List[int], List[int], bool]:
    """Calibration images first, test images after them; the last ones (overlapping) when
    the dataset is too small."""
    calib_ids = list(range(min(calib, total)))
    start = len(calib_ids)
    if start + images <= total:
        return calib_ids, list(range(start, start + images)), False
    test_ids = list(range(max(0, total - images), total))
    return calib_ids, test_ids, bool(set(test_ids) & set(calib_ids))


def quantization_check(deploy_dir: str,
                       calib: int = DEFAULT_CALIB_IMAGES,
                       images: int = DEFAULT_TEST_IMAGES,
                       run_eval: bool = False,
                       out: Optional[str] = None,
                       save_onnx: Optional[str] = None,
                       threads: int = 1,
                       calibration: str = 'minmax',
                       keep_fp32: Sequence[str] = (),
                       verbose: bool = True) -> QuantizationReport:
    """The whole check on a ``tools/reparameterize.py`` output directory (module doc).

    Raises :class:`QuantizationCheckError` (nothing written) on bad input.
    """
    if calib < 1 or images < 1:
        raise QuantizationCheckError(f'--calib and --images must be at least 1, got {calib} '
                                     f'and {images}.')
    if threads < 1:
        raise QuantizationCheckError(f'--threads must be at least 1, got {threads}.')
    if calibration not in CALIBRATION_METHODS:
        raise QuantizationCheckError(f'calibration must be one of {", ".join(CALIBRATION_METHODS)}'
                                     f', got {calibration!r}.')
    config, checkpoint = _check_deploy_dir(deploy_dir)
    outputs = _check_outputs(out, save_onnx)
    with refusals_as(QuantizationCheckError):
        cfg = read_config(config)
    if run_eval and not cfg.get('val_evaluator'):
        raise QuantizationCheckError(f'config {config} has no val_evaluator; run without --eval.')
    dataset = _val_dataset(cfg, config)
    with refusals_as(QuantizationCheckError):
        model = build_model(cfg, 'cpu', 'deployed')
        _check_deployed(model, config)
        state = checkpoint_weights(read_checkpoint(checkpoint), checkpoint)
    mismatch = state_dict_mismatch(model.state_dict(), state)
    if mismatch is not None:
        raise QuantizationCheckError(f'checkpoint {checkpoint} does not fit {config}: '
                                     f'{mismatch}; re-create the directory with '
                                     'tools/reparameterize.py.')
    model.load_state_dict(state, strict=True)
    model.eval()

    calib_ids, test_ids, overlap = _split(len(dataset), calib, images)
    try:
        calib_inputs = _preprocessed(model, dataset, calib_ids)
        test_inputs = _preprocessed(model, dataset, test_ids)
    except Exception as exc:  # noqa: BLE001 - unreadable images, pipeline errors
        raise QuantizationCheckError(f'cannot load the val images of {config} '
                                     f'({type(exc).__name__}: {first_line(exc)}).') from exc
    notes = []
    if len(calib_ids) < calib:
        notes.append(f'note: the val dataset has {len(dataset)} images; calibrated on '
                     f'{len(calib_ids)}.')
    if overlap:
        notes.append('note: too few val images to keep test images apart from calibration '
                     'images; they overlap.')

    with tempfile.TemporaryDirectory(prefix='orepa_int8.') as tmp:
        log_step(f'quantizing backbone + neck on {len(calib_ids)} calibration images', verbose)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            report, graphs = analyse_model(
                model,
                calib_inputs,
                test_inputs,
                work_dir=tmp,
                calibration=calibration,
                keep_fp32=keep_fp32,
                threads=threads,
                source=osp.abspath(deploy_dir))
        report.notes = notes
        if run_eval:
            for kind, path in (('fp32', graphs.fp32_path), ('int8', graphs.int8_path)):
                log_step(f'evaluating with the {kind} backbone + neck in ONNX Runtime', verbose)
                features = OnnxFeatures(path, graphs.output_names, graphs.single_output, threads)
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter('ignore')
                        report.metrics[kind] = evaluate(model, cfg, features)
                except Exception as exc:  # noqa: BLE001
                    raise QuantizationCheckError(
                        f'evaluating the {kind} model failed ({type(exc).__name__}: '
                        f'{first_line(exc)}).') from exc
            names = list(report.metrics['fp32'])
            report.metric_names = [m for m in HEADLINE_METRICS if m in names
                                   ] + [m for m in names if m not in HEADLINE_METRICS]
            report.eval_images = len(dataset)
        if out is not None:
            report.json_file = osp.abspath(out)
        if save_onnx is not None:
            report.onnx_file = osp.abspath(save_onnx)
        with outputs.write() as staged:
            if save_onnx is not None:
                _copy(graphs.int8_path, staged[report.onnx_file])
            if out is not None:
                _write_text(staged[report.json_file], json.dumps(report.as_dict(), indent=1))
    return report


def _check_outputs(out: Optional[str], save_onnx: Optional[str]) -> OutputSet:
    """``--out`` and ``--save-onnx`` as one :class:`~orepa_mm.utils.atomic_write.OutputSet`, checked
    before any work (empty, the same file twice, a directory, an unwritable folder)."""
    outputs = OutputSet('name another file')
    with refusals_as(QuantizationCheckError):
        for path, flag in ((out, '--out'), (save_onnx, '--save-onnx')):
            if path is not None:
                outputs.add(path, flag)
        return outputs.check()


def _copy(source: str, target: str) -> None:
    import shutil
    shutil.copyfile(source, target)


def _write_text(path: str, text: str) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text + '\n')
