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
   (:func:`sqnr_db`, :func:`cosine_similarity`, over all test images together);
4. lists the layers most at risk: per deployed conv (the ONNX ``Conv`` nodes, BN folded), the
   spread of its per-output-channel weight ranges (:func:`weight_spread`: max over channels of
   max|w| / median over channels of max|w|), the calibrated range of the activation it consumes
   (what its per-tensor uint8 quantization spans), that activation's own per-channel spread and
   the SQNR of quantizing that activation alone; sorted by weight spread;
5. with ``evaluate=True``: the task metric (the config's ``val_evaluator`` over the whole val
   dataset) with backbone + neck run by the fp32 and by the INT8 ONNX Runtime session inside
   the mm model (``model.extract_feat`` replaced; heads, RPN, post-processing in PyTorch).

The report goes to stdout; ``out`` (JSON) and ``save_onnx`` (the INT8 model) are written only
after everything succeeded, under the tools' write policy (:mod:`orepa_mm.utils.errors`: both
names checked before any work, staged beside them, moved into place together). Bad input
raises :class:`QuantizationCheckError` (one sentence, ``exit_code`` 2) before anything is
written.

:func:`analyse_model` is steps 1-4 on any module with a ``backbone`` (and optionally a neck and
``with_neck``) and given input tensors: what the tests call on small synthetic models.
"""
import contextlib
import copy
import io
import json
import math
import os.path as osp
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ..deploy import count_reparameterizable
from ..utils.atomic_write import OutputSet
from ..utils.checkpoint_check import state_dict_mismatch
from ..utils.checkpoint_io import checkpoint_weights, read_checkpoint
from ..utils.config_io import build_model, read_config
from ..utils.errors import first_line, refusals_as
from ..utils.text_table import format_rows
from .reparameterize import DEPLOY_CHECKPOINT, DEPLOY_CONFIG, ReparameterizeError, log_step
from .verification import FeatureExtractor, export_onnx, flatten_tensors, run_safely

#: Defaults of the command line: small, so that a check takes a minute on a CPU.
DEFAULT_CALIB_IMAGES = 8
DEFAULT_TEST_IMAGES = 8
DEFAULT_TOP_LAYERS = 10
CALIBRATION_METHODS = ('minmax', 'entropy', 'percentile')
INPUT_NAME = 'input'  # what export_onnx names the graph input


class QuantizationCheckError(ReparameterizeError):
    """Bad input for the check: one sentence; nothing was written (exit code 2)."""


# -- the numbers ------------------------------------------------------------------------------
def _as_numpy(value) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


class Agreement:
    """Streaming cosine similarity and SQNR of ``test`` against ``reference`` over many arrays
    (all elements of all images together, as one long vector)."""

    def __init__(self):
        self.signal = self.noise = self.dot = self.test_power = 0.0
        self.count = 0

    def add(self, reference, test) -> 'Agreement':
        ref, got = _as_numpy(reference).ravel(), _as_numpy(test).ravel()
        if ref.shape != got.shape:
            raise ValueError(f'shapes differ: {ref.shape} vs {got.shape}')
        self.signal += float(ref @ ref)
        self.noise += float((ref - got) @ (ref - got))
        self.dot += float(ref @ got)
        self.test_power += float(got @ got)
        self.count += ref.size
        return self

    @property
    def sqnr_db(self) -> float:
        """10 log10(sum ref^2 / sum (ref - test)^2); inf when equal, -inf for a zero reference."""
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    @property
    def cosine(self) -> float:
        """<ref, test> / (|ref| |test|); 1 when both are zero, 0 when exactly one is."""
        if self.signal == 0.0 and self.test_power == 0.0:
            return 1.0
        if self.signal == 0.0 or self.test_power == 0.0:
            return 0.0
        return self.dot / math.sqrt(self.signal * self.test_power)


def sqnr_db(reference, test) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference`` in dB."""
    return Agreement().add(reference, test).sqnr_db


def cosine_similarity(reference, test) -> float:
    """Cosine similarity of the two arrays, flattened."""
    return Agreement().add(reference, test).cosine


def channel_spread(absmax) -> float:
    """max over channels / median over channels of per-channel max|x| (inf if the median is 0)."""
    absmax = _as_numpy(absmax).ravel()
    if absmax.size == 0:
        return math.nan
    median = float(np.median(absmax))
    top = float(absmax.max())
    if median == 0.0:
        return math.inf if top > 0 else 1.0
    return top / median


def weight_spread(weight) -> float:
    """:func:`channel_spread` of a conv weight's per-output-channel (axis 0) max|w|."""
    weight = _as_numpy(weight)
    return channel_spread(np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1))


def fake_quantize_uint8(values, low: float, high: float) -> np.ndarray:
    """``values`` through ONNX Runtime's asymmetric per-tensor uint8 quantization of [low, high]
    (the range widened to contain 0, as ONNX Runtime does), dequantized."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    values = _as_numpy(values)
    if high == low:
        return np.zeros_like(values)
    scale = (high - low) / 255.0
    zero_point = np.clip(np.round(-low / scale), 0, 255)
    q = np.clip(np.round(values / scale) + zero_point, 0, 255)
    return (q - zero_point) * scale


# -- results ----------------------------------------------------------------------------------
@dataclass
class OutputQuality:
    """INT8 against fp32 for one output of backbone (+ neck), over the test images."""
    name: str
    shape: Tuple[int, ...]  # of the first test image's output
    cosine: float
    sqnr_db: float


@dataclass
class LayerRisk:
    """One deployed conv (an ONNX ``Conv`` node, BN folded) and why it may quantize badly."""
    module: str  # the PyTorch module the node came from
    node: str  # the ONNX node name (for ``nodes_to_exclude``)
    out_channels: int
    weight_spread: float  # max_c max|w_c| / median_c max|w_c|
    input_range: Tuple[float, float]  # calibrated range of the activation it consumes
    input_channel_spread: float  # the same statistic over that activation's channels
    layer_sqnr_db: float  # its output: quantized input + weights vs fp32, this layer alone
    quantized: bool = True


@dataclass
class QuantizationReport:
    """Everything :func:`analyse_model` / :func:`quantization_check` measured."""
    source: str
    settings: Dict[str, object]
    calib_images: int
    test_images: int
    outputs: List[OutputQuality]
    layers: List[LayerRisk]  # sorted, most at risk first
    ms_per_image: Dict[str, float] = field(default_factory=dict)
    # 'fp32' / 'int8' -> metric name -> value
    metrics: Dict[str, Dict[str, float]] = field(default_factory=dict)
    metric_names: List[str] = field(default_factory=list)  # headline first
    eval_images: int = 0
    notes: List[str] = field(default_factory=list)
    onnx_file: Optional[str] = None
    json_file: Optional[str] = None

    @property
    def min_sqnr_db(self) -> float:
        return min((o.sqnr_db for o in self.outputs), default=math.nan)

    @property
    def min_cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=math.nan)

    def metric(self, kind: str, name: Optional[str] = None) -> Optional[float]:
        name = name or (self.metric_names[0] if self.metric_names else None)
        return self.metrics.get(kind, {}).get(name) if name else None

    def as_dict(self) -> dict:
        record = asdict(self)
        record['min_sqnr_db'] = self.min_sqnr_db
        record['min_cosine'] = self.min_cosine
        return _json_safe(record)

    def ranked_layers(self, rank_by: str = 'spread') -> List[LayerRisk]:
        """``layers`` by weight spread (as measured, largest first) or by layer SQNR (lowest
        first)."""
        if rank_by == 'sqnr':
            return sorted(self.layers, key=lambda r: (_sortable(r.layer_sqnr_db),
                                                      -_sortable(r.weight_spread)))
        if rank_by != 'spread':
            raise ValueError(f'rank_by must be spread or sqnr, got {rank_by!r}')
        return list(self.layers)

    def table(self, top: int = DEFAULT_TOP_LAYERS, rank_by: str = 'spread') -> str:
        s = self.settings
        lines = [f'INT8 post-training quantization of backbone + neck: {self.source}',
                 f"ONNX Runtime {s.get('onnxruntime')} quantize_static, {s.get('format')}, weights "
                 f"{s.get('weights')}, activations {s.get('activations')}, {s.get('calibration')} "
                 f'calibration on {self.calib_images} images; INT8 vs fp32 on '
                 f'{self.test_images} other images', '']
        rows = [('output', 'shape', 'cosine', 'SQNR dB')]
        for o in self.outputs:
            rows.append((o.name, 'x'.join(map(str, o.shape)), f'{o.cosine:.5f}',
                         _db(o.sqnr_db)))
        lines += format_rows(rows)
        if self.ms_per_image:
            ms = self.ms_per_image
            lines.append(f"ONNX Runtime CPU, median ms/image: fp32 {ms['fp32']:.1f}, "
                         f"INT8 {self.ms_per_image['int8']:.1f} "
                         f"({s.get('threads')} thread(s); shared machines make this noisy)")
        if self.metrics:
            lines.append('')
            rows = [(f'task metric ({self.eval_images} val images)', 'fp32', 'INT8', 'INT8 - fp32')]
            for name in self.metric_names:
                f32, i8 = self.metric('fp32', name), self.metric('int8', name)
                if f32 is None or i8 is None or f32 == i8 == -1:  # -1: no such objects
                    continue
                rows.append((name, f'{f32:.4f}', f'{i8:.4f}', f'{i8 - f32:+.4f}'))
            lines += format_rows(rows)
            lines.append('(backbone + neck in ONNX Runtime, fp32 or INT8; heads and '
                         'post-processing in PyTorch)')
        if top <= 0:
            lines += self.notes
            lines += [f'wrote {path}' for path in (self.onnx_file, self.json_file) if path]
            return '\n'.join(lines)
        shown = self.ranked_layers(rank_by)[:top]
        order = ('per-output-channel weight range spread' if rank_by == 'spread' else
                 'lowest layer SQNR')
        lines.append('')
        lines.append(f'layers most at risk ({len(shown)} of {len(self.layers)} deployed convs, by '
                     f'{order}; BN folded):')
        rows = [('#', 'layer', 'out ch', 'w spread', 'input range', 'in ch spread',
                 'layer SQNR dB')]
        for rank, layer in enumerate(shown, 1):
            lo, hi = layer.input_range
            rows.append((str(rank), layer.module + ('' if layer.quantized else ' (fp32)'),
                         str(layer.out_channels), _num(layer.weight_spread),
                         f'[{lo:.3g}, {hi:.3g}]', _num(layer.input_channel_spread),
                         _db(layer.layer_sqnr_db)))
        lines += format_rows(rows)
        worst = min((l for l in self.layers if not math.isnan(l.layer_sqnr_db)),
                    key=lambda l: l.layer_sqnr_db, default=None)
        lines.append('w spread: max / median over output channels of max|w|; input: the '
                     'activation the conv consumes (one uint8 scale for the whole tensor), its '
                     'calibrated range and the same spread over its channels; layer SQNR: the '
                     "conv's output with its input and weights quantized against fp32, this "
                     'layer alone.')
        if worst is not None:
            lines.append(f'lowest layer SQNR: {_db(worst.layer_sqnr_db)} dB ({worst.module}). '
                         'Layers with a large spread or a low layer SQNR are the ones to keep '
                         'in fp16/fp32 (--keep-fp32 LAYER).')
        lines += self.notes
        for path in (self.onnx_file, self.json_file):
            if path:
                lines.append(f'wrote {path}')
        return '\n'.join(lines)


def _db(value: float) -> str:
    return 'inf' if value == math.inf else f'{value:.2f}'


def _num(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 'n/a'
    return 'inf' if value == math.inf else f'{value:.3g}'


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # 'inf', '-inf', 'nan': JSON has no literal for them
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    return value


# -- ONNX: export, quantize, run --------------------------------------------------------------
def _module_of(node) -> str:
    """The PyTorch module an exported node came from.

    The TorchScript exporter names nodes by module scope, ``/<scope>/.../<scope>/Conv``, where
    a scope is an attribute name (``conv1``) or a name qualified from the previous scope's
    (``layer1`` then ``layer1.1``): ``/backbone/layer1/layer1.1/conv1/Conv`` is
    ``backbone.layer1.1.conv1``, ``/neck/lateral_convs.0/conv/Conv`` is
    ``neck.lateral_convs.0.conv``.
    """
    parts = [p for p in node.name.split('/') if p][:-1]
    if not parts:
        weight = node.input[1] if len(node.input) > 1 else ''
        if weight.startswith('model.') and weight.endswith('.weight'):
            return weight[len('model.'):-len('.weight')]
        return node.name
    path: List[str] = []
    for part in parts:
        if path and part.startswith(path[-1] + '.'):
            path[-1] = part
        else:
            path.append(part)
    return '.'.join(path)


#: Ops between a conv and the op whose output it consumes that carry the same activation.
_PASS_THROUGH = frozenset({'Relu', 'Clip', 'LeakyRelu', 'MaxPool', 'Identity', 'Pad', 'Resize',
                           'Reshape', 'Flatten', 'Squeeze', 'Unsqueeze', 'Transpose'})


def _float_island(graph, conv) -> List[str]:
    """The nodes to leave unquantized so that ``conv`` runs in float on a float input.

    In the QDQ format a tensor is quantized when its producer *or* any consumer is: excluding
    the conv alone keeps its weights in float but still feeds it the activation its producer
    quantized. So the producers of its input are excluded too, back through pass-through ops
    (ReLU, pooling, ...) to the first op that computes (a conv, an Add, a Concat)."""
    producer = {out: node for node in graph.node for out in node.output}
    names = [conv.name]
    tensor = conv.input[0]
    while tensor in producer:
        node = producer[tensor]
        names.append(node.name)
        if node.op_type not in _PASS_THROUGH or not node.input:
            break
        tensor = node.input[0]
    return names


def _session(path: str, threads: int):
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def _calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod
    return {'minmax': CalibrationMethod.MinMax, 'entropy': CalibrationMethod.Entropy,
            'percentile': CalibrationMethod.Percentile}[name]


@dataclass
class QuantizedGraphs:
    """The fp32 and INT8 ONNX files of one backbone (+ neck) and what describes them."""
    fp32_path: str
    int8_path: str
    output_names: List[str]  # graph outputs (feat0, feat1, ...)
    output_labels: List[str]  # what they are in the model (neck.0, ... / backbone.0, ...)
    single_output: bool  # the feature extractor returns one tensor, not a tuple
    ranges: Dict[str, Tuple[float, float]]  # calibrated tensor ranges
    excluded: List[str]  # nodes kept in float (--keep-fp32 convs and their input producers)
    settings: Dict[str, object]


def _numpy_inputs(inputs: Sequence[Tensor]) -> List[np.ndarray]:
    return [x.detach().float().cpu().numpy() for x in inputs]


def quantize_model(model: nn.Module, calib_inputs: Sequence[Tensor], work_dir: str, *,
                   calibration: str = 'minmax', keep_fp32: Sequence[str] = (),
                   per_channel: bool = True) -> QuantizedGraphs:
    """Export ``model``'s backbone (+ neck) and quantize it on ``calib_inputs`` (each a
    preprocessed ``1 x 3 x H x W`` or batched tensor) into ``work_dir``.

    ``keep_fp32``: module names (``backbone.layer1.0.conv1``, or a prefix such as
    ``backbone.stem``) whose convs stay in float.
    """
    import onnx
    import onnxruntime
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.calibrate import load_tensors_data

    if calibration not in CALIBRATION_METHODS:
        raise QuantizationCheckError(f'calibration must be one of {", ".join(CALIBRATION_METHODS)}'
                                     f', got {calibration!r}.')
    if not calib_inputs:
        raise QuantizationCheckError('calibration needs at least one input image.')
    fp32_path = osp.join(work_dir, 'features_fp32.onnx')
    int8_path = osp.join(work_dir, 'features_int8.onnx')
    model.eval()
    with torch.no_grad():
        features = FeatureExtractor(model).eval()(calib_inputs[0])
    single = isinstance(features, Tensor)
    group = 'neck' if getattr(model, 'with_neck', False) else 'backbone'
    labels = [group + key for key in flatten_tensors('', features)]
    try:
        names = run_safely('ONNX export', export_onnx, model, calib_inputs[0], fp32_path)
    except RuntimeError as exc:
        raise QuantizationCheckError(f'{exc}.') from exc

    graph = onnx.load(fp32_path).graph
    convs = [n for n in graph.node if n.op_type == 'Conv']
    excluded = []
    for prefix in keep_fp32:
        hits = [n for n in convs
                if _module_of(n) == prefix or _module_of(n).startswith(prefix + '.')]
        if not hits:
            raise QuantizationCheckError(f'--keep-fp32 {prefix} names no conv of the exported '
                                         'model (use a layer name from the report).')
        for node in hits:
            excluded += [name for name in _float_island(graph, node) if name not in excluded]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{INPUT_NAME: x} for x in _numpy_inputs(calib_inputs)])

        def get_next(self):
            return next(self.items, None)

    cache = osp.join(work_dir, 'calibration.json')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        import logging
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # "please consider pre-processing": not for QDQ convs
        try:
            quantize_static(fp32_path, int8_path, Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, reduce_range=False,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=_calibration_method(calibration),
                            nodes_to_exclude=excluded or None,
                            calibration_cache_path=cache)
        except Exception as exc:  # noqa: BLE001 - turned into one sentence
            raise QuantizationCheckError(f'ONNX Runtime quantization failed ({type(exc).__name__}'
                                         f': {first_line(exc)}).') from exc
        finally:
            root.setLevel(level)
    ranges = {}
    for name, data in load_tensors_data(cache).data.items():
        low, high = data.range_value
        ranges[name] = (float(np.asarray(low).min()), float(np.asarray(high).max()))
    settings = dict(onnxruntime=onnxruntime.__version__, format='QDQ',
                    weights='int8 symmetric ' + ('per output channel' if per_channel
                                                 else 'per tensor'),
                    activations='uint8 asymmetric per tensor', calibration=calibration,
                    keep_fp32=list(keep_fp32))
    return QuantizedGraphs(fp32_path, int8_path, list(names), labels, single, ranges, excluded,
                           settings)


def compare_quantized_outputs(graphs: QuantizedGraphs, test_inputs: Sequence[Tensor],
                    threads: int = 1) -> Tuple[List[OutputQuality], Dict[str, float]]:
    """INT8 vs fp32 per output over ``test_inputs``, and the median ms per image of each."""
    fp32, int8 = _session(graphs.fp32_path, threads), _session(graphs.int8_path, threads)
    agreements = [Agreement() for _ in graphs.output_names]
    shapes: List[Tuple[int, ...]] = []
    times: Dict[str, List[float]] = dict(fp32=[], int8=[])
    for x in _numpy_inputs(test_inputs):
        results = {}
        for kind, session in (('fp32', fp32), ('int8', int8)):
            start = time.perf_counter()
            results[kind] = session.run(graphs.output_names, {INPUT_NAME: x})
            times[kind].append((time.perf_counter() - start) * 1000 / x.shape[0])
        if not shapes:
            shapes = [tuple(r.shape) for r in results['fp32']]
        for agreement, ref, got in zip(agreements, results['fp32'], results['int8']):
            agreement.add(ref, got)
    outputs = [OutputQuality(label, shape, a.cosine, a.sqnr_db)
               for label, shape, a in zip(graphs.output_labels, shapes, agreements)]
    return outputs, {k: float(np.median(v)) for k, v in times.items()}


def fake_quantize_weight(weight) -> np.ndarray:
    """A conv weight through symmetric int8 quantization per output channel ([-127, 127], as
    ONNX Runtime's ``per_channel`` weights), dequantized."""
    weight = _as_numpy(weight)
    flat = weight.reshape(weight.shape[0], -1)
    scale = np.abs(flat).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    return (np.clip(np.round(flat / scale), -127, 127) * scale).reshape(weight.shape)


def _conv_attributes(node) -> Optional[dict]:
    """stride / padding / dilation / groups of a 2-D ONNX Conv (None when not expressible)."""
    from onnx import helper
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    auto_pad = attrs.get('auto_pad', b'NOTSET')
    if auto_pad not in (b'NOTSET', 'NOTSET'):
        return None
    pads = list(attrs.get('pads', [0, 0, 0, 0]))
    if len(pads) != 4:
        return None
    return dict(stride=tuple(attrs.get('strides', [1, 1])),
                dilation=tuple(attrs.get('dilations', [1, 1])), groups=int(attrs.get('group', 1)),
                pads=(pads[1], pads[3], pads[0], pads[2]))  # F.pad order: left right top bottom


def _conv(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], attrs: dict) -> Tensor:
    xt = torch.nn.functional.pad(torch.from_numpy(np.array(x, dtype=np.float32)),
                                 attrs['pads'])
    return torch.nn.functional.conv2d(
        xt, torch.from_numpy(np.array(weight, dtype=np.float32)),
        None if bias is None else torch.from_numpy(np.array(bias, dtype=np.float32)),
        stride=attrs['stride'], dilation=attrs['dilation'], groups=attrs['groups'])


def layer_risks(graphs: QuantizedGraphs, calib_inputs: Sequence[Tensor],
                threads: int = 1) -> List[LayerRisk]:
    """Per deployed conv (on the calibration images): weight spread, the calibrated range of
    its input and that input's channel spread, and the layer's own SQNR: its fp32 output
    against its output from the uint8-quantized input (that range) and the int8 per-channel
    weights, everything before it in fp32. Sorted by weight spread, largest first (ties: lower
    layer SQNR first)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(graphs.fp32_path)
    arrays = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    arrays.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t)
                   for n in model.graph.node if n.op_type == 'Constant' and n.attribute
                   and n.attribute[0].name == 'value'})
    convs = [n for n in model.graph.node if n.op_type == 'Conv' and n.input[1] in arrays
             and arrays[n.input[1]].ndim >= 3]
    sources = sorted({n.input[0] for n in convs})
    wanted = [name for name in sources if name != INPUT_NAME]
    graph_outputs = {o.name for o in model.graph.output}
    for name in wanted:
        if name not in graph_outputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, None))
    absmax: Dict[str, np.ndarray] = {}
    agreements = {n.name: Agreement() for n in convs}
    attributes = {n.name: (_conv_attributes(n) if arrays[n.input[1]].ndim == 4 else None)
                  for n in convs}
    with tempfile.TemporaryDirectory() as tmp:
        path = osp.join(tmp, 'probe.onnx')
        onnx.save(model, path)
        session = _session(path, threads)
        for x in _numpy_inputs(calib_inputs):
            values = dict(zip(wanted, session.run(wanted, {INPUT_NAME: x}))) if wanted else {}
            values[INPUT_NAME] = x
            for name in sources:
                value = values[name]
                per_channel = np.abs(value).max(axis=tuple(i for i in range(value.ndim)
                                                           if i != 1))
                absmax[name] = per_channel if name not in absmax else np.maximum(
                    absmax[name], per_channel)
            for node in convs:
                attrs = attributes[node.name]
                if attrs is None:
                    continue
                value = values[node.input[0]]
                weight = arrays[node.input[1]]
                bias = arrays.get(node.input[2]) if len(node.input) > 2 else None
                low, high = graphs.ranges.get(node.input[0], (value.min(), value.max()))
                with torch.no_grad():
                    reference = _conv(value, weight, bias, attrs)
                    quantized = _conv(fake_quantize_uint8(value, low, high),
                                      fake_quantize_weight(weight), bias, attrs)
                agreements[node.name].add(reference, quantized)

    risks = []
    for node in convs:
        weight = arrays[node.input[1]]
        source = node.input[0]
        agreement = agreements[node.name]
        risks.append(LayerRisk(
            module=_module_of(node), node=node.name, out_channels=int(weight.shape[0]),
            weight_spread=weight_spread(weight),
            input_range=graphs.ranges.get(source, (math.nan, math.nan)),
            input_channel_spread=channel_spread(absmax[source]),
            layer_sqnr_db=agreement.sqnr_db if agreement.count else math.nan,
            quantized=node.name not in graphs.excluded))
    risks.sort(key=lambda r: (-_sortable(r.weight_spread), _sortable(r.layer_sqnr_db)))
    return risks


def _sortable(value: float) -> float:
    return -math.inf if value is None or math.isnan(value) else value


def analyse_model(model: nn.Module, calib_inputs: Sequence[Tensor],
                  test_inputs: Sequence[Tensor], *, work_dir: Optional[str] = None,
                  calibration: str = 'minmax', keep_fp32: Sequence[str] = (),
                  per_channel: bool = True, threads: int = 1,
                  source: str = 'model') -> Tuple[QuantizationReport, QuantizedGraphs]:
    """Quantize ``model``'s backbone (+ neck), compare INT8 with fp32 on ``test_inputs`` and rank
    its convs (steps 1-4 of the module doc). ``work_dir`` keeps the ONNX files (a temporary
    directory, removed again, when None: the returned graphs' paths are then gone)."""
    if not test_inputs:
        raise QuantizationCheckError('the comparison needs at least one test image.')
    with _work_folder(work_dir) as folder:
        graphs = quantize_model(model, calib_inputs, folder, calibration=calibration,
                                keep_fp32=keep_fp32, per_channel=per_channel)
        outputs, ms = compare_quantized_outputs(graphs, test_inputs, threads)
        layers = layer_risks(graphs, calib_inputs, threads)
    settings = dict(graphs.settings, threads=threads)
    report = QuantizationReport(source=source, settings=settings, calib_images=_count(calib_inputs),
                                test_images=_count(test_inputs), outputs=outputs, layers=layers,
                                ms_per_image=ms)
    return report, graphs


def _count(inputs: Sequence[Tensor]) -> int:
    return int(sum(x.shape[0] for x in inputs))


@contextlib.contextmanager
def _work_folder(work_dir: Optional[str]):
    """``work_dir`` itself, or a temporary directory removed on exit."""
    if work_dir is not None:
        yield work_dir
        return
    with tempfile.TemporaryDirectory(prefix='orepa_int8.') as tmp:
        yield tmp


# -- the mm model with backbone + neck in ONNX Runtime ---------------------------------------
class OnnxFeatures:
    """A stand-in for ``model.extract_feat``: backbone (+ neck) run by an ONNX Runtime session,
    returning torch tensors the way the PyTorch modules did (a tuple, or one tensor)."""

    def __init__(self, path: str, output_names: Sequence[str], single: bool, threads: int = 1):
        self.session = _session(path, threads)
        self.output_names = list(output_names)
        self.single = single

    def __call__(self, inputs: Tensor, *args, **kwargs):
        results = self.session.run(self.output_names,
                                   {INPUT_NAME: inputs.detach().float().cpu().numpy()})
        tensors = tuple(torch.from_numpy(r).to(inputs.device) for r in results)
        return tensors[0] if self.single else tensors


def evaluate(model: nn.Module, cfg, extract_feat: Optional[Callable] = None,
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
    missing = [name for name in (DEPLOY_CHECKPOINT, DEPLOY_CONFIG)
               if not osp.isfile(osp.join(deploy_dir, name))]
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
    blocks = [name for name, m in model.named_modules()
              if callable(getattr(m, 'switch_to_deploy', None)) and getattr(m, 'deploy', None)
              is False]
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


def quantization_check(deploy_dir: str, calib: int = DEFAULT_CALIB_IMAGES,
                       images: int = DEFAULT_TEST_IMAGES, run_eval: bool = False,
                       out: Optional[str] = None, save_onnx: Optional[str] = None,
                       threads: int = 1, calibration: str = 'minmax',
                       keep_fp32: Sequence[str] = (), verbose: bool = True) -> QuantizationReport:
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
            report, graphs = analyse_model(model, calib_inputs, test_inputs, work_dir=tmp,
                                           calibration=calibration, keep_fp32=keep_fp32,
                                           threads=threads, source=osp.abspath(deploy_dir))
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
            report.metric_names = [m for m in HEADLINE_METRICS if m in names] + [
                m for m in names if m not in HEADLINE_METRICS]
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
